"""Grad-CAM: gradient-weighted class activation mapping, computed with ``jax.grad``.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV 2017:

* Eq. 1: neuron-importance weights ``alpha_k^c = 1/Z sum_ij d y^c / d A^k_ij`` (global-average-pooled gradients of
  the class score ``y^c`` with respect to the feature maps ``A^k`` of a convolutional layer);
* Eq. 2: ``L^c = ReLU(sum_k alpha_k^c A^k)``.

The "guided" weighting keeps the gradient only where both the activation and the gradient are positive before the
average, as the released code of Morales et al. (2021, "Playing to distraction") does. The map is then resized
bilinearly to the input size and min-max normalised per image, again as in that code.

One call handles a whole batch with no loop over examples: the class scores of all examples are summed before
``jax.grad``; since examples do not interact in inference mode, the gradient of the sum with respect to example
``i``'s activations is the gradient of example ``i``'s own score (tests check it against ``jax.vmap`` of a single-example
call). Models whose forward pass mixes examples (BatchNorm with batch statistics) must be split in inference mode.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from saliency_jax.saliency.core import (
    at_least_float32,
    LayerModel,
    check_images,
    invalid_examples,
    mark_invalid,
    normalize_maps,
    resize_maps,
    resolve_targets,
    select_targets,
)

Array = jax.Array
Score = Literal["logit", "softmax"]
Weighting = Literal["plain", "guided"]

__all__ = ["grad_cam", "grad_cam_weights", "class_scores"]


def class_scores(logits: Array, targets: Array, score: Score) -> Array:
    """The score ``y^c`` that Grad-CAM differentiates, per example.

    Args:
      logits: [batch, num_classes] float.
      targets: int32 [batch] class indices.
      score: ``"logit"`` (pre-softmax score, Selvaraju et al.) or ``"softmax"`` (the probability, as Keras models
        whose output layer is a softmax give it).

    Returns:
      float32 [batch]; NaN (with NaN gradients) for a target outside ``[0, num_classes)``
      (:func:`~saliency_jax.saliency.core.select_targets`).

    Raises:
      ValueError: on an unknown ``score``.
    """
    if score == "logit":
        values = logits
    elif score == "softmax":
        values = jax.nn.softmax(at_least_float32(logits), axis=-1)
    else:
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    return at_least_float32(select_targets(values, targets))


def grad_cam_weights(activations: Array, gradients: Array, weighting: Weighting = "plain") -> Array:
    """Neuron-importance weights ``alpha_k^c`` (Selvaraju et al. 2017, Eq. 1).

    Args:
      activations: [batch, h, w, channels] feature maps ``A``.
      gradients: [batch, h, w, channels] ``d y^c / d A``.
      weighting: ``"plain"``: spatial mean of the gradients; ``"guided"``: spatial mean of the gradients kept only
        where ``A > 0`` and ``d y^c / d A > 0`` (the weights of Morales et al.'s released code).

    Returns:
      float32 [batch, channels].

    Raises:
      ValueError: on an unknown ``weighting``.
    """
    if weighting == "guided":
        gradients = jnp.where((activations > 0) & (gradients > 0), gradients, 0.0)
    elif weighting != "plain":
        raise ValueError(f"weighting must be 'plain' or 'guided'; got {weighting!r}")
    return jnp.mean(at_least_float32(gradients), axis=(1, 2))


def grad_cam(
    model: LayerModel,
    images: Array,
    targets: Array | int | None = None,
    *,
    score: Score = "logit",
    weighting: Weighting = "plain",
    relu: bool = True,
    resize: bool = True,
    normalize: bool = True,
) -> Array:
    """Grad-CAM maps for a batch, one per example, in one pass.

    Args:
      model: the network split at the layer to explain (:func:`~saliency_jax.saliency.core.linen_layer` for a Flax
        linen module, :func:`~saliency_jax.saliency.core.split_layer` for a pair of functions). The layer's
        activations must be ``[batch, h, w, channels]``.
      images: [batch, height, width, channels] float (our models take float32 in [0, 1]).
      targets: the class to explain per example: ``None`` for the predicted class, an ``int`` for one class for all
        examples, or int [batch] (e.g. the ground-truth labels).
      score: ``"logit"`` or ``"softmax"`` (see :func:`class_scores`).
      weighting: ``"plain"`` or ``"guided"`` (see :func:`grad_cam_weights`).
      relu: apply the ReLU of Eq. 2 (keep only evidence for the class).
      resize: bilinearly resize the map from the layer's resolution to ``(height, width)``.
      normalize: per-example min-max normalisation to [0, 1]; a constant map becomes zeros, never NaN.

    Returns:
      float32 maps ``[batch, height, width]`` (``[batch, h, w]`` with ``resize=False``); in [0, 1] when
      ``normalize``. Under ``jit``, all-NaN maps for examples with a NaN / inf pixel or a target outside
      ``[0, num_classes)`` (:func:`~saliency_jax.saliency.core.checked` raises instead).

    Raises:
      ValueError: if ``images`` is not rank 4, the layer's activations are not rank 4, targets have the wrong
        shape, or ``score`` / ``weighting`` are unknown; for concrete inputs, a target outside ``[0, num_classes)``
        or a NaN / inf pixel.
      TypeError: if ``images`` is not floating point or ``targets`` not integer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from saliency_jax.saliency import grad_cam, split_layer
      >>> w = jnp.ones((3, 2))
      >>> model = split_layer(lambda x: x, lambda a: a.mean((1, 2)) @ w)
      >>> grad_cam(model, jnp.ones((4, 5, 5, 3)), targets=1).shape
      (4, 5, 5)
    """
    check_images(images)
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    if weighting not in ("plain", "guided"):
        raise ValueError(f"weighting must be 'plain' or 'guided'; got {weighting!r}")
    shape = model.activation_shape(images)
    if len(shape.shape) != 4:
        raise ValueError(
            f"Grad-CAM needs spatial activations [batch, h, w, channels] at layer {model.layer!r}; got {shape.shape}")

    num_classes = []

    def summed_score(perturbation):
        logits, activations = model(images, perturbation)
        classes = resolve_targets(targets, logits)
        num_classes.append(logits.shape[-1])
        return jnp.sum(class_scores(logits, classes, score)), (activations, classes)

    zeros = jnp.zeros(shape.shape, shape.dtype)
    gradients, (activations, classes) = jax.grad(summed_score, has_aux=True)(zeros)
    alpha = grad_cam_weights(activations, gradients, weighting)
    maps = jnp.einsum("bhwc,bc->bhw", at_least_float32(activations), alpha)
    if relu:
        maps = jax.nn.relu(maps)
    if resize:
        maps = resize_maps(maps, images.shape[1:3])
    if normalize:
        maps = normalize_maps(maps)
    # The guided weighting (and the ReLU) would turn NaN gradients into zeros: mark the invalid examples explicitly.
    return mark_invalid(maps, invalid_examples(images=images, classes=classes, num_classes=num_classes[0]))
