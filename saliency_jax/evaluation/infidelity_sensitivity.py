"""Infidelity and max-sensitivity of explanations (Yeh, Hsieh, Suggala, Inouye, Ravikumar, "On the (In)fidelity and
Sensitivity of Explanations", NeurIPS 2019), with Captum's definitions (``captum.metrics.infidelity``,
``captum.metrics.sensitivity_max``).

* **Infidelity** (Definition 2.1): ``E_I[(I . Phi(x) - (f(x) - f(x - I)))^2]`` over random perturbations ``I``,
  where ``Phi`` is the attribution and ``f`` the model's output for the explained class; a map that predicts how the
  output moves under small perturbations has low infidelity. Captum's ``normalize=True`` first rescales the attribution by the
  least-squares ``beta = E[(I . Phi) (f(x) - f(x - I))] / E[(I . Phi)^2]``, so maps in arbitrary units compare.
* **Max-sensitivity** (Definition 3.1, Captum's ``sensitivity_max``): ``max_u ||Phi(x + u) - Phi(x)|| / ||Phi(x)||``
  over ``n_perturb_samples`` draws of ``u`` uniform in ``[-radius, radius]`` per input element (Frobenius norms over all
  attribution elements; a zero ``||Phi(x)||`` divides by 1, as Captum).

The perturbations are arrays drawn by :func:`gaussian_perturbations` / :func:`uniform_perturbations` (Captum's
documented infidelity perturbation ``N(0, 0.003^2)``, subtracted from the input; its default sensitivity perturbation,
uniform of radius 0.02, added) or supplied by the caller (e.g. the paper's square removals), so a comparison with
another library can feed both the same numbers. Each function is pure, jittable and batched: the samples run in
:func:`jax.lax.map`, each calling the model (or the explanation) once on the whole batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from saliency_jax.saliency.core import check_images, resize_maps, resolve_targets

Array = jax.Array

__all__ = ["gaussian_perturbations", "infidelity", "sensitivity_max", "uniform_perturbations"]


def _check_samples(n_perturb_samples) -> int:
    if isinstance(n_perturb_samples, bool) or not isinstance(n_perturb_samples, numbers.Integral) \
            or n_perturb_samples < 1:
        raise ValueError(f"n_perturb_samples must be an int >= 1; got {n_perturb_samples!r}")
    return int(n_perturb_samples)


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


def gaussian_perturbations(key: Array, images: Array, n_perturb_samples: int = 10, *, std: float = 0.003) -> Array:
    """Perturbations ``I ~ N(0, std^2)`` per input element, the one of Captum's infidelity documentation.

    Args:
      key: PRNG key.
      images: [batch, height, width, channels] float (only the shape and dtype are used).
      n_perturb_samples: number of perturbations per image (Captum's default 10).
      std: standard deviation in the images' units (Captum's example: 0.003).

    Returns:
      [n_perturb_samples, batch, height, width, channels], the dtype of ``images``.

    Raises:
      ValueError: a bad ``n_perturb_samples`` or non-positive ``std``; TypeError: non-floating images.
    """
    check_images(images)
    n = _check_samples(n_perturb_samples)
    return (_check_scale("std", std) * jax.random.normal(key, (n, *images.shape), jnp.float32)).astype(images.dtype)


def uniform_perturbations(key: Array, images: Array, n_perturb_samples: int = 10, *, radius: float = 0.02) -> Array:
    """Perturbations ``u ~ U(-radius, radius)`` per input element, Captum's ``sensitivity_max`` default.

    Args:
      key: PRNG key.
      images: [batch, height, width, channels] float (only the shape and dtype are used).
      n_perturb_samples: number of perturbations per image (Captum's default 10).
      radius: half-width in the images' units (Captum's ``perturb_radius=0.02``).

    Returns:
      [n_perturb_samples, batch, height, width, channels], the dtype of ``images``.

    Raises:
      ValueError: a bad ``n_perturb_samples`` or non-positive ``radius``; TypeError: non-floating images.
    """
    check_images(images)
    n = _check_samples(n_perturb_samples)
    r = _check_scale("radius", radius)
    return jax.random.uniform(key, (n, *images.shape), jnp.float32, -r, r).astype(images.dtype)


def _check_perturbations(perturbations: Array, images: Array) -> Array:
    if getattr(perturbations, "ndim", None) != 5 or tuple(perturbations.shape[1:]) != tuple(images.shape):
        raise ValueError(f"perturbations must be [n_perturb_samples, *images.shape] = "
                         f"[n, {', '.join(map(str, images.shape))}]; got shape {getattr(perturbations, 'shape', None)}")
    return jnp.asarray(perturbations, jnp.float32)


def _attributions_like(attributions: Array, images: Array) -> Array:
    """[batch, h, w, channels] as given; [batch, h, w] resized to the images and shared by the channels."""
    attributions = jnp.asarray(attributions)
    if not jnp.issubdtype(attributions.dtype, jnp.floating):
        raise TypeError(f"attributions must be floating point; got dtype {attributions.dtype}")
    if attributions.shape == images.shape:
        return attributions.astype(jnp.float32)
    if attributions.ndim == 3 and attributions.shape[0] == images.shape[0]:
        return jnp.broadcast_to(resize_maps(attributions.astype(jnp.float32), images.shape[1:3])[..., None],
                                images.shape)
    raise ValueError(f"attributions must have the images' shape {images.shape} or be maps [batch={images.shape[0]}, "
                     f"h, w]; got shape {attributions.shape}")


def infidelity(
    logits_fn: Callable[[Array], Array],
    images: Array,
    attributions: Array,
    targets: Array | int | None = None,
    *,
    perturbations: Array,
    normalize: bool = False,
) -> Array:
    """Infidelity of attributions for a batch (Yeh et al. 2019, Definition 2.1; ``captum.metrics.infidelity``).

    ``mean_s (I_s . Phi - (f(x) - f(x - I_s)))^2`` over the ``n`` perturbations ``I_s``, with ``f`` the output of
    ``logits_fn`` for the target class (logits as returned; wrap the model in a softmax for probabilities) and
    ``I . Phi`` summed over every input element. With ``normalize`` the attribution is first scaled by the
    least-squares ``beta`` (Captum's ``normalize=True``: ``beta^2 E[a^2] - 2 beta E[ab] + E[b^2]``).

    Args:
      logits_fn: ``images [n, height, width, channels] -> logits [n, num_classes]``.
      images: [batch, height, width, channels] float.
      attributions: [batch, height, width, channels] float (one value per input element, as Captum), or maps
        [batch, h, w] (bilinearly resized to the images and used for every channel).
      targets: the explained class: None (the predicted class), an int, or int [batch].
      perturbations: [n_perturb_samples, batch, height, width, channels] float, the ``I_s``; the model is queried on
        ``images - I_s`` (e.g. :func:`gaussian_perturbations`).
      normalize: rescale the attributions by the optimal ``beta`` first (Captum's flag; default False as Captum).

    Returns:
      float32 [batch], >= 0 (lower is better).

    Raises:
      ValueError: bad shapes (naming the argument), out-of-range static targets.
      TypeError: non-floating images or attributions, non-integer targets.
    """
    check_images(images)
    batch = images.shape[0]
    phi = _attributions_like(attributions, images)
    noise = _check_perturbations(perturbations, images)
    logits = logits_fn(images)
    if getattr(logits, "ndim", None) != 2 or logits.shape[0] != batch:
        raise ValueError(f"logits_fn must return [batch={batch}, num_classes]; got shape "
                         f"{getattr(logits, 'shape', None)}")
    targets = resolve_targets(targets, logits)
    output = jnp.take_along_axis(logits.astype(jnp.float32), targets[:, None], -1)[:, 0]

    def sample(perturbation):  # [batch, h, w, c] -> (I . Phi, f(x) - f(x - I)), each [batch]
        moved = logits_fn((images - perturbation).astype(images.dtype)).astype(jnp.float32)
        change = output - jnp.take_along_axis(moved, targets[:, None], -1)[:, 0]
        return jnp.sum((perturbation * phi).reshape(batch, -1), -1), change

    dot, change = jax.lax.map(sample, noise)  # [n, batch] each
    if not normalize:
        return jnp.mean((dot - change) ** 2, axis=0)
    a2, ab, b2 = jnp.sum(dot * dot, 0), jnp.sum(dot * change, 0), jnp.sum(change * change, 0)
    beta = ab / jnp.where(a2 != 0, a2, 1.0)  # Captum's safe_div
    return (beta * beta * a2 - 2 * beta * ab + b2) / noise.shape[0]


def sensitivity_max(
    explanation_fn: Callable[[Array, Array], Array],
    images: Array,
    targets: Array,
    *,
    perturbations: Array,
) -> Array:
    """Max-sensitivity of an explanation for a batch (Yeh et al. 2019, Definition 3.1;
    ``captum.metrics.sensitivity_max`` with its default ``norm_ord="fro"``).

    ``max_s ||Phi(x + u_s) - Phi(x)||_F / ||Phi(x)||_F`` per example, ``Phi = explanation_fn(., targets)``, the
    norms over all elements of one example's attribution; where ``||Phi(x)|| = 0`` the difference is divided by 1
    (Captum). The explanation of every perturbed batch explains the same ``targets``.

    Args:
      explanation_fn: ``(images [batch, height, width, channels], targets int [batch]) -> attributions [batch, ...]``
        float (any saliency method; jittable).
      images: [batch, height, width, channels] float.
      targets: int [batch] (or an int), the explained classes; give them explicitly so that every perturbed input
        explains the same class.
      perturbations: [n_perturb_samples, batch, height, width, channels] float, the ``u_s`` added to the images
        (e.g. :func:`uniform_perturbations`).

    Returns:
      float32 [batch], >= 0 (lower is more stable).

    Raises:
      ValueError: bad shapes of ``perturbations`` or of the explanations; TypeError: non-floating images.
    """
    check_images(images)
    batch = images.shape[0]
    noise = _check_perturbations(perturbations, images)
    targets = jnp.broadcast_to(jnp.asarray(targets), (batch,))
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer class indices; got dtype {targets.dtype}")

    def explain(x):
        phi = explanation_fn(x, targets)
        if getattr(phi, "ndim", 0) < 2 or phi.shape[0] != batch:
            raise ValueError(f"explanation_fn must return [batch={batch}, ...]; got shape "
                             f"{getattr(phi, 'shape', None)}")
        return phi.reshape(batch, -1).astype(jnp.float32)

    reference = explain(images)
    norm = jnp.linalg.norm(reference, axis=-1)
    norm = jnp.where(norm == 0, 1.0, norm)

    def sample(u):
        return jnp.linalg.norm(explain((images + u).astype(images.dtype)) - reference, axis=-1) / norm

    return jnp.max(jax.lax.map(sample, noise), axis=0)
