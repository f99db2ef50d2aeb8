"""ROAD: RemOve And Debias, with noisy linear imputation (Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent
and Efficient Evaluation Strategy for Attribution Methods", ICML 2022).

Removing pixels by painting them a constant colour leaks the removed region's shape to the model (the paper's
"class information leakage"), so deletion-style curves then measure the mask, not the map. ROAD removes a
pixel by *imputing* it: every removed pixel becomes the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct
neighbours, 1/12 for the 4 diagonal ones, renormalised at the image border), all removed pixels solved together as
one sparse linear system, plus Gaussian noise. The model is then queried on the imputed images
after removing a fraction of the pixels, the most relevant first (MoRF: a faithful map makes the probability fall
fast) or the least relevant first (LeRF: it should stay high).

* :func:`noisy_linear_imputation` - the imputation operator, batched and jittable: the system is symmetric positive
  definite whenever some pixel is kept, and is solved with :func:`jax.scipy.sparse.linalg.cg` on the pixel grid (an
  8-neighbour stencil as the matrix-vector product), to a relative residual of ``1e-6``; it equals the authors'
  ``scipy.sparse.linalg.spsolve`` to about ``4e-6`` on images in [0, 1] (tests/test_metric_references.py,
  tests/test_remove_and_debias.py). The solve runs on the device inside ``jit``; no host round trip.
* :func:`road` - MoRF and LeRF curves for a batch and the summaries that pytorch-grad-cam's port reports
  (``ROADMostRelevantFirstAverage``, ``ROADLeastRelevantFirstAverage``, ``ROADCombined``).

Following the authors' code (``road/imputed_dataset.py``, ``road/imputations.py`` of tleemann/road_evaluation):
the map is min-max normalised (``(s - min) / (max - min + 1e-5)``) and a fixed field of ``1e-4``-scaled standard
normal noise, one per call and shared by the images, is added before ordering (it breaks ties); MoRF at a fraction
``f`` removes the ``floor(f * n)`` most relevant of the ``n`` pixels, LeRF keeps the ``floor((1 - f) * n)`` most
relevant and removes the rest (the code's ``remove=False`` branch with ``th_p = 1 - f``); the score is the softmax
probability of the explained class (the code's ``road_eval`` probability; its accuracy is ``predictions == labels``).
pytorch-grad-cam's port thresholds the map at ``np.percentile(map, 100 * (1 - f))`` instead (linear interpolation
between pixels), which removes the same pixels when ``f * n`` is a whole number (e.g. ``n`` a multiple of 10 with the
default fractions) and may differ by one pixel otherwise; with ``noise=0`` and ``tie_break=0`` the curves and
averages equal its ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` (percentile ``100 * (1 - f)``),
``...Average`` and ``ROADCombined`` with a ``ClassifierOutputSoftmaxTarget`` (tests/test_metric_references.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import cg

from saliency_jax.evaluation.faithfulness import _check_maps
from saliency_jax.saliency.core import check_images, resolve_targets

Array = jax.Array

__all__ = ["NEIGHBOR_WEIGHTS", "ROAD_FRACTIONS", "RoadResult", "noisy_linear_imputation", "road"]

#: ``((row offset, column offset), weight)`` of the 8 neighbours in the imputation (authors' ``neighbors_weights``).
NEIGHBOR_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
#: Fractions of pixels removed (pytorch-grad-cam's ROAD averages: percentiles 10, 20, ..., 90).
ROAD_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Relative residual at which the conjugate-gradient solve stops.
_CG_TOL = 1e-6


def _neighbour_sum(x: Array) -> Array:
    """``sum_o w_o x[p + o]`` for every pixel ``p`` of [..., height, width, channels], zero outside the image."""
    height, width = x.shape[-3:-1]
    pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    padded = jnp.pad(x, pad)
    return sum(weight * padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width, :]
               for (dy, dx), weight in NEIGHBOR_WEIGHTS)


def _check_float(name: str, value, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= minimum \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= {minimum}; got {value!r}")
    return float(value)


def noisy_linear_imputation(images: Array, removed: Array, *, key: Array | None = None,
                            noise: float = 0.01) -> Array:
    """Replace the removed pixels of each image by the noisy linear imputation of Rong et al. 2022.

    For each removed pixel ``p`` and channel, ``x_p = sum_q w_pq x_q / sum_q w_pq`` over its neighbours ``q`` inside
    the image (:data:`NEIGHBOR_WEIGHTS`), where neighbours that are kept contribute their pixel values and removed
    ones their own unknowns; all removed pixels of an image are solved together (a sparse symmetric positive
    definite system, by :func:`jax.scipy.sparse.linalg.cg`), then ``noise * N(0, 1)`` is added to each imputed value.
    Kept pixels are returned unchanged.

    Args:
      images: [batch, height, width, channels] float.
      removed: [batch, height, width] bool (or 0 / 1), True where a pixel is removed. At least one pixel per image
        must be kept (with none kept the system is singular); an image with none removed is returned unchanged.
      key: PRNG key of the noise; may be None only when ``noise`` is 0.
      noise: standard deviation of the added noise, in the images' units (authors' default 0.01).

    Returns:
      [batch, height, width, channels], the dtype of ``images``.

    Raises:
      ValueError: bad shapes, a negative ``noise``, or ``noise > 0`` without a key.
      TypeError: if ``images`` is not floating point.
    """
    check_images(images)
    removed = jnp.asarray(removed)
    if removed.shape != images.shape[:3]:
        raise ValueError(f"removed must be [batch, height, width] = {images.shape[:3]}; got shape {removed.shape}")
    noise = _check_float("noise", noise)
    if noise > 0 and key is None:
        raise ValueError("noisy_linear_imputation needs a key when noise > 0")
    m = (removed != 0)[..., None].astype(jnp.float32)  # [batch, h, w, 1]
    x_known = images.astype(jnp.float32)
    weight_sum = _neighbour_sum(jnp.ones(images.shape[1:3] + (1,), jnp.float32))

    def solve(x, mask):  # one image: [h, w, c], [h, w, 1]
        def operator(z):  # (D - W) restricted to the removed pixels
            return mask * (weight_sum * z - _neighbour_sum(mask * z))

        rhs = mask * _neighbour_sum((1 - mask) * x)
        solution, _ = cg(operator, rhs, tol=_CG_TOL, maxiter=10 * x.shape[0] * x.shape[1])
        return solution

    filled = jax.vmap(solve)(x_known, m)
    if noise > 0:
        filled = filled + noise * jax.random.normal(key, filled.shape, jnp.float32)
    return jnp.where(m > 0, filled, x_known).astype(images.dtype)


class RoadResult(NamedTuple):
    """The result of :func:`road` (a NamedTuple of arrays, so it can leave ``jax.jit``).

    Attributes:
      morf: [batch, num_fractions] float32, softmax probability of the target class after removing (imputing) each
        fraction of the pixels, most relevant first; lower is more faithful.
      lerf: [batch, num_fractions] float32, the same, least relevant first; higher is more faithful.
      morf_predictions, lerf_predictions: [batch, num_fractions] int32, the predicted class at each point (the
        authors' accuracy is their agreement with the labels).
      original: [batch] float32, the probability on the unchanged image.
      morf_average: [batch] float32, mean over fractions of ``morf - original`` (pytorch-grad-cam's
        ``ROADMostRelevantFirstAverage`` with a softmax target).
      lerf_average: [batch] float32, mean of ``lerf - original`` (``ROADLeastRelevantFirstAverage``).
      combined: [batch] float32, ``(lerf_average - morf_average) / 2`` (``ROADCombined``); higher is more faithful.
      fractions: [num_fractions] float32, the fractions of pixels removed.
      targets: [batch] int32, the explained classes.
    """

    morf: Array
    lerf: Array
    morf_predictions: Array
    lerf_predictions: Array
    original: Array
    morf_average: Array
    lerf_average: Array
    combined: Array
    fractions: Array
    targets: Array


def road(
    logits_fn: Callable[[Array], Array],
    images: Array,
    maps: Array,
    targets: Array | int | None = None,
    *,
    key: Array | None,
    fractions: Sequence[float] = ROAD_FRACTIONS,
    noise: float = 0.01,
    tie_break: float = 1e-4,
) -> RoadResult:
    """ROAD curves (MoRF and LeRF) with noisy linear imputation for a batch (Rong et al. 2022).

    For each fraction ``f``, MoRF imputes (:func:`noisy_linear_imputation`) the ``floor(f * n)`` most relevant of
    the ``n = height * width`` pixels (every channel) and LeRF all but the ``floor((1 - f) * n)`` most relevant ones
    (1e-6 slack against binary rounding of ``f``), and the model is queried on the imputed batch. Relevance is the
    map min-max normalised per image plus ``tie_break * N(0, 1)``, one field per call shared by the images (the
    authors' code; ties then fall in a random order). The fractions run in :func:`jax.lax.map`; each step solves
    ``2 * batch`` imputations (vmapped) and calls ``logits_fn`` once on ``2 * batch`` images.

    Args:
      logits_fn: ``images [n, height, width, channels] -> logits [n, num_classes]`` in inference mode.
      images: [batch, height, width, channels] float, as ``logits_fn`` takes them.
      maps: [batch, h, w] float saliency maps (bilinearly resized to the images when of another size).
      targets: the class to track: None (default, as the code's ``prediction``) the class predicted on the
        unchanged image; an int; or int [batch].
      key: PRNG key of the imputation noise and the tie-break field; may be None only when both are 0.
      fractions: fractions of pixels removed, each in [0, 1) (default 0.1, 0.2, ..., 0.9).
      noise: standard deviation of the imputation noise (authors' 0.01; in the images' units).
      tie_break: scale of the tie-breaking noise on the normalised map (authors' 1e-4; 0 keeps ties in row-major
        order).

    Returns:
      A :class:`RoadResult`.

    Raises:
      ValueError: bad shapes, empty or out-of-range ``fractions``, negative ``noise`` / ``tie_break``, a missing key,
        out-of-range static targets.
      TypeError: non-floating images or maps, non-integer targets.
    """
    check_images(images)
    batch, height, width, _ = images.shape
    maps = _check_maps(maps, images)
    if isinstance(fractions, (str, numbers.Real)) or not len(fractions):
        raise ValueError(f"fractions must be a non-empty sequence of numbers in [0, 1); got {fractions!r}")
    fractions = tuple(_check_float("fractions", f) for f in fractions)
    if any(f >= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1) (removing every pixel leaves nothing to impute from); "
                         f"got {fractions}")
    n = height * width
    if any(math.floor((1.0 - f) * n + 1e-6) < 1 for f in fractions):
        raise ValueError(f"fractions {fractions} leave no pixel of {height}x{width} for LeRF to keep (the imputation "
                         "needs at least one)")
    noise = _check_float("noise", noise)
    tie_break = _check_float("tie_break", tie_break)
    if key is None and (noise > 0 or tie_break > 0):
        raise ValueError("road needs a key (the imputation noise and the tie-break field are random); pass "
                         "noise=0 and tie_break=0 for a deterministic run")
    key = jax.random.key(0) if key is None else key
    tie_key, noise_key = jax.random.split(key)

    logits = logits_fn(images)
    if getattr(logits, "ndim", None) != 2 or logits.shape[0] != batch:
        raise ValueError(f"logits_fn must return [batch={batch}, num_classes]; got shape "
                         f"{getattr(logits, 'shape', None)}")
    targets = resolve_targets(targets, logits)
    original = jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32), -1), targets[:, None], -1)[:, 0]

    flat = maps.reshape(batch, n).astype(jnp.float32)
    low, high = jnp.min(flat, -1, keepdims=True), jnp.max(flat, -1, keepdims=True)
    relevance = (flat - low) / (high - low + 1e-5) + tie_break * jax.random.normal(tie_key, (1, n), jnp.float32)
    order = jnp.argsort(-relevance, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1).reshape(batch, height, width)  # 0 = most relevant
    morf_removed = jnp.asarray([math.floor(f * n + 1e-6) for f in fractions], jnp.int32)
    lerf_kept = jnp.asarray([math.floor((1.0 - f) * n + 1e-6) for f in fractions], jnp.int32)
    keys = jax.random.split(noise_key, len(fractions))

    def evaluate(args):
        removed_count, kept_count, step_key = args
        removed = jnp.concatenate([rank < removed_count, rank >= kept_count])  # [2 * batch, h, w]
        x = noisy_linear_imputation(jnp.concatenate([images, images]), removed, key=step_key, noise=noise)
        probs = jax.nn.softmax(logits_fn(x).astype(jnp.float32), axis=-1)
        both = jnp.concatenate([targets, targets])
        return (jnp.take_along_axis(probs, both[:, None], -1)[:, 0].reshape(2, batch),
                jnp.argmax(probs, -1).astype(jnp.int32).reshape(2, batch))

    probs, predicted = jax.lax.map(evaluate, (morf_removed, lerf_kept, keys))  # [fractions, 2, batch]
    morf, lerf = probs[:, 0].T, probs[:, 1].T
    morf_average = jnp.mean(morf - original[:, None], -1)
    lerf_average = jnp.mean(lerf - original[:, None], -1)
    return RoadResult(morf=morf, lerf=lerf, morf_predictions=predicted[:, 0].T, lerf_predictions=predicted[:, 1].T,
                      original=original, morf_average=morf_average, lerf_average=lerf_average,
                      combined=(lerf_average - morf_average) / 2, fractions=jnp.asarray(fractions, jnp.float32),
                      targets=targets)
