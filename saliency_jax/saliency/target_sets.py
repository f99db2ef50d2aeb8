"""Several targets per example: maps of ``k`` classes from one forward pass and one batched backward pass.

A *target set* is int ``[batch, k]`` classes (``k`` maps per example), or :func:`top_k` - each example's ``k``
highest-scoring classes, read from the same forward pass that the maps use. The gradient methods run the model once
with ``jax.vjp`` and pull ``k`` cotangents back through it together (``jax.vmap`` of the VJP's pullback): the
forward and its residuals are shared, only the backward is batched over the ``k`` targets. Excitation Backprop does
the same with its top-down priors (every EB rule is linear in the signal, so its pullback is a linear map and
vmaps like any other). This is what no peer library does: pytorch-grad-cam, Captum and TorchRay repeat the forward
(and the backward) per target.

For one target per example (``None``, an ``int`` or int ``[batch]``) the transforms keep their single-target path
(``jax.grad`` of the batch-summed score), so their numbers are unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency.core import (LayerModel, at_least_float32, check_images, invalid_examples,
                                       resolve_targets, target_one_hot)
from saliency_jax.saliency.grad_cam import class_scores

Array = jax.Array

__all__ = [
    "TopK",
    "LayerGradients",
    "top_k",
    "is_target_set",
    "resolve_target_set",
    "layer_gradients",
    "input_gradients",
    "excitation_signals",
    "mark_invalid_sets",
]


class TopK(NamedTuple):
    """The ``k`` highest-scoring classes of each example (by the model's outputs on the unperturbed images), as a
    target set. Build it with :func:`top_k`."""

    k: int


def top_k(k: int) -> TopK:
    """Targets for the ``k`` most likely classes of each example, in decreasing order of score.

    Pass it as ``targets`` to :func:`~saliency_jax.saliency.saliency_map`: the classes are read from the forward
    pass that computes the maps (no extra forward), the result is ``[batch, k, height, width]``.

    Raises:
      ValueError: ``k`` not an int >= 1.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_k needs an int k >= 1; got {k!r}")
    return TopK(int(k))


def is_target_set(targets: Any) -> bool:
    """Whether ``targets`` asks for several maps per example (:class:`TopK` or an array of rank 2)."""
    return isinstance(targets, TopK) or getattr(targets, "ndim", None) == 2


def resolve_target_set(targets: TopK | Array, logits: Array) -> Array:
    """int32 ``[batch, k]`` classes of a target set.

    Args:
      targets: :class:`TopK` (classes of the ``k`` largest logits, ties to the lower index), or int ``[batch, k]``.
      logits: [batch, num_classes].

    Returns:
      int32 [batch, k]. Traced out-of-range classes are returned as given (their maps become NaN).

    Raises:
      ValueError: a ``[batch, k]`` array whose batch differs from the logits', ``k`` larger than the number of
        classes (top-k), or (concrete) a class outside ``[0, num_classes)``, naming the examples.
      TypeError: non-integer classes.
    """
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"several targets per example need outputs [batch, num_classes]; got shape "
                         f"{tuple(getattr(logits, 'shape', ()))}")
    if isinstance(targets, TopK):
        if targets.k > logits.shape[-1]:
            raise ValueError(f"top_k({targets.k}) asks for more classes than the model's {logits.shape[-1]}")
        return jax.lax.top_k(jax.lax.stop_gradient(logits), targets.k)[1].astype(jnp.int32)
    traced = isinstance(targets, jax.core.Tracer)
    targets = targets if traced else np.asarray(targets)
    if targets.ndim != 2 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"a target set must be int [batch={logits.shape[0]}, k]; got shape {tuple(targets.shape)}")
    # One column at a time: the range checks (and their messages) of resolve_targets, per target.
    return jnp.stack([resolve_targets(targets[:, j], logits) for j in range(targets.shape[1])], axis=1)


def _score_cotangents(logits: Array, classes: Array, score: str) -> Array:
    """``d score(logits, classes[:, j]) / d logits`` for every target ``j``: float [k, batch, num_classes].

    For ``score="logit"`` these are one-hot rows (NaN rows for out-of-range classes), for ``"softmax"`` the
    softmax's Jacobian row of the class. The single-target path differentiates the same score.
    """
    def cotangent(c):
        return jax.grad(lambda z: jnp.sum(class_scores(z, c, score)))(at_least_float32(logits))

    return jax.vmap(cotangent, in_axes=1)(classes).astype(logits.dtype)


class LayerGradients(NamedTuple):
    """What :func:`layer_gradients` returns.

    Attributes:
      logits: [batch, num_classes].
      activations: one array per layer, [batch, h, w, channels].
      gradients: one array per layer: ``d score / d activations``, [batch, h, w, channels] for one target per
        example, [batch, k, h, w, channels] for a target set.
      classes: int32 [batch] or [batch, k].
    """

    logits: Array
    activations: tuple[Array, ...]
    gradients: tuple[Array, ...]
    classes: Array


def layer_gradients(model: LayerModel, images: Array, targets: Any, *, score: str = "logit") -> LayerGradients:
    """Activations of the split's layer(s) and the gradients of the target scores with respect to them.

    One target per example: ``jax.grad`` of the batch-summed score (as :func:`~saliency_jax.saliency.grad_cam`; the
    examples do not interact in inference mode). A target set (:func:`is_target_set`): one ``jax.vjp`` (one
    forward) and its pullback ``vmap``-ed over the ``k`` score cotangents (one batched backward). A split at several
    layers (``model.layer`` a tuple) gets all layers' gradients from the same backward.

    Args:
      model: the network split at one or several layers (:func:`~saliency_jax.saliency.core.linen_layer`), in
        inference mode.
      images: [batch, height, width, channels] float.
      targets: ``None``, ``int``, int [batch], int [batch, k] or :func:`top_k`.
      score: ``"logit"`` or ``"softmax"`` (:func:`~saliency_jax.saliency.grad_cam.class_scores`).

    Returns:
      :class:`LayerGradients`.

    Raises:
      ValueError: unknown ``score``, bad targets (see :func:`resolve_target_set`,
        :func:`~saliency_jax.saliency.core.resolve_targets`).
    """
    check_images(images)
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    shapes = model.activation_shapes(images)
    zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
    multi_layer = isinstance(model.layer, tuple)

    def run(perturbations):
        logits, activations = model(images, perturbations if multi_layer else perturbations[0])
        return logits, (tuple(activations) if multi_layer else (activations,))

    if not is_target_set(targets):
        def summed_score(perturbations):
            logits, activations = run(perturbations)
            classes = resolve_targets(targets, logits)
            return jnp.sum(class_scores(logits, classes, score)), (logits, activations, classes)

        gradients, (logits, activations, classes) = jax.grad(summed_score, has_aux=True)(zeros)
        return LayerGradients(logits, activations, tuple(gradients), classes)

    logits, pullback, activations = jax.vjp(run, zeros, has_aux=True)
    classes = resolve_target_set(targets, logits)
    (gradients,) = jax.vmap(pullback)(_score_cotangents(logits, classes, score))
    return LayerGradients(logits, activations, tuple(jnp.moveaxis(g, 0, 1) for g in gradients), classes)


def input_gradients(output_fn: Callable[[Array], Array], images: Array, targets: Any, *,
                    score: str = "logit") -> tuple[Array, Array, Array]:
    """``d score / d images`` of a target set from one forward and one batched backward.

    Args:
      output_fn: ``images -> logits [batch, num_classes]`` in inference mode.
      images: [batch, height, width, channels] float.
      targets: int [batch, k] or :func:`top_k`.
      score: ``"logit"`` or ``"softmax"``.

    Returns:
      ``(gradients float32 [batch, k, height, width, channels], classes int32 [batch, k], logits)``; NaN for
      examples with a NaN / inf pixel or an out-of-range class (:func:`mark_invalid_sets`).

    Raises:
      ValueError: bad targets, unknown ``score``, outputs not [batch, num_classes].
    """
    check_images(images)
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    logits, pullback = jax.vjp(output_fn, images)
    classes = resolve_target_set(targets, logits)
    (gradients,) = jax.vmap(pullback)(_score_cotangents(logits, classes, score))
    gradients = jnp.moveaxis(gradients, 0, 1).astype(jnp.float32)
    return mark_invalid_sets(gradients, images, classes, logits.shape[-1]), classes, logits


def excitation_signals(model: LayerModel, images: Array, targets: Any, *,
                       contrastive: bool = False) -> tuple[Array, Array]:
    """Excitation Backprop's (or contrastive EB's) marginal winning probabilities of a target set, from one forward
    and one batched backward: the pullback of the EB-ruled model (:func:`~saliency_jax.saliency.
    excitation_backprop.with_excitation_rules`) ``vmap``-ed over the ``k`` one-hot top-down priors.

    Args:
      model: the network split at one layer, in inference mode (the EB rules apply above it).
      images: [batch, height, width, channels] float.
      targets: int [batch, k] or :func:`top_k`.
      contrastive: contrastive EB (class minus dual units, Zhang et al. 2016).

    Returns:
      ``(probability [batch, k, *layer_shape], classes int32 [batch, k])``; the ``k`` entries equal
      :func:`~saliency_jax.saliency.marginal_winning_probability` of each column of targets.

    Raises:
      ValueError: bad targets; as :func:`~saliency_jax.saliency.marginal_winning_probability`.
      UnsupportedOperationError: the signal reaches an operation without an EB rule.
    """
    from saliency_jax.saliency._eb_rules import with_excitation_rules

    check_images(images)
    shape = model.activation_shape(images)
    eb_fn = with_excitation_rules(model.fn, probe_argnums=1, contrastive=contrastive)
    logits, pullback = jax.vjp(lambda p: eb_fn(images, p)[0], jnp.zeros(shape.shape, shape.dtype))
    classes = resolve_target_set(targets, logits)
    priors = jax.vmap(lambda c: target_one_hot(c, logits.shape[-1], logits.dtype), in_axes=1)(classes)
    (probability,) = jax.vmap(pullback)(priors)
    probability = jnp.moveaxis(probability, 0, 1)
    return mark_invalid_sets(probability, images, classes, logits.shape[-1]), classes


def mark_invalid_sets(values: Array, images: Array, classes: Array, num_classes: int) -> Array:
    """``values [batch, k, ...]`` with NaN for examples with a NaN / inf pixel and for out-of-range classes.

    Args:
      values: [batch, k, ...] float.
      images: [batch, ...] the inputs.
      classes: int [batch, k].
      num_classes: the number of classes.
    """
    bad = invalid_examples(images=images)[:, None] | ~((classes >= 0) & (classes < num_classes))
    bad = bad.reshape(bad.shape + (1,) * (values.ndim - 2))
    return jnp.where(bad, jnp.asarray(jnp.nan, values.dtype), values)
