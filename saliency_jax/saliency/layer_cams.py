"""The CAM family beyond Grad-CAM: HiResCAM, LayerCAM, XGrad-CAM, Eigen-CAM, Score-CAM, and maps aggregated over
several layers.

Every map here is a combination of one layer's activations ``A`` [batch, h, w, channels] (and, for the gradient
methods, ``g = d S^c / d A``, the gradient of the target's score), rectified (``ReLU``), resized bilinearly to the
image and, for several layers, aggregated:

* :func:`hirescam_map` - Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
  convolutional neural networks", 2020, Eq. 3: ``L = ReLU(sum_k g_k * A_k)`` (the gradient kept per position, not
  averaged; for a global-average-pooling head it equals Grad-CAM up to a constant).
* :func:`layer_cam_map` - Jiang, Zhang, Hou, Cheng, Wei, "LayerCAM: Exploring Hierarchical Class Activation Maps
  for Localization", IEEE TIP 2021, Eq. 4-5: ``L = ReLU(sum_k ReLU(g_k) * A_k)``.
* :func:`xgrad_cam_weights` - Fu, Hu, Xie, Chen, Zhou, Zhou, "Axiom-based Grad-CAM: Towards Accurate
  Visualization and Explanation of CNNs", BMVC 2020, Eq. 11: ``w_k = sum_ij A_k(ij) / sum_ij A_k(ij) * g_k(ij)``;
  ``L = ReLU(sum_k w_k A_k)`` (with pytorch-grad-cam's ``1e-7`` added to the denominator).
* :func:`eigen_cam` - Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN 2020,
  Eq. 5-6: the projection of the activations (positions x channels, centred over the positions, as
  pytorch-grad-cam's ``get_2d_projection``) onto their first right singular vector; needs no gradient and no class.
  The sign of a singular vector is arbitrary (pytorch-grad-cam's ``EigenCAM`` keeps whatever its LAPACK call
  returns, then rectifies); here the map is flipped when ``|min| > |max|``, the sign correction pytorch-grad-cam
  ships as ``get_2d_projection_with_sign_correction`` (Chung & Ying 2025, Eq. 13), so the result does not depend on
  the SVD routine (CPU / GPU).
* :func:`score_cam` - Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu, "Score-CAM: Score-Weighted Visual
  Explanations for Convolutional Neural Networks", CVPR workshops 2020, Eq. 6-8: each channel ``A_k``, upsampled to
  the image and min-max normalised, masks the image; the model's score of the target on each masked image gives
  the channel's weight; ``L = ReLU(sum_k w_k A_k)``. As pytorch-grad-cam's ``ScoreCAM`` (the reference library
  here): the upsampling aligns corners (``nn.UpsamplingBilinear2d``), the normalisation adds ``1e-8``, the score is
  the target's logit (``ClassifierOutputTarget``; ``score="softmax"``: its probability) and the weights are the
  softmax of the scores over the channels. The authors' released code (haofanwang/Score-CAM) differs: it weights
  the upsampled *masks* by each masked image's softmax probability, with no softmax over the channels; that variant
  is not offered. No gradient; ``channels`` forwards per image, run ``masks_per_step`` masks at a time (``vmap``
  under ``lax.map``).

Several layers (pytorch-grad-cam's ``target_layers``, e.g. ``["layer3", "layer4"]``): the split
(:func:`~saliency_jax.saliency.core.linen_layer` with a list of paths) runs the model once and gives every layer's
activations and gradients from one backward; each layer's rectified map is min-max normalised and resized to the
image, the maps are averaged (``BaseCAM.aggregate_multi_layers``), and the average is normalised again by
:func:`~saliency_jax.saliency.saliency_map` (``normalize=True``).

Several targets per example (int ``[batch, k]`` or :func:`~saliency_jax.saliency.target_sets.top_k`): the gradient
maps come from one forward and one ``vmap``-ed backward (:mod:`saliency_jax.saliency.target_sets`); Score-CAM's
masked forwards give every class's score at once, so its ``k`` maps share them; Eigen-CAM's map does not depend on
the class and is repeated.

Every function takes a whole batch with no loop over examples and is jittable.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency.cam import grad_cam_plus_plus_weights
from saliency_jax.saliency.core import (LayerModel, at_least_float32, check_images, invalid_examples, mark_invalid,
                                       normalize_maps, resize_maps, resolve_targets)
from saliency_jax.saliency.grad_cam import Score, class_scores, grad_cam_weights
from saliency_jax.saliency.target_sets import (TopK, is_target_set, layer_gradients, mark_invalid_sets,
                                               resolve_target_set)

Array = jax.Array
CamFn = Callable[[Array, Array], Array]

__all__ = [
    "eigen_cam",
    "gradient_cam",
    "grad_cam_map",
    "grad_cam_plus_plus_map",
    "hirescam",
    "hirescam_map",
    "image_maps",
    "layer_cam_map",
    "normalize_any",
    "score_cam",
    "score_cam_masks",
    "xgrad_cam_map",
    "xgrad_cam_weights",
]


# ---------------------------------------------------------------------------------------------------------------
# Per-layer combinations of activations A [batch, h, w, channels] and gradients g (same shape) -> [batch, h, w].


def grad_cam_map(activations: Array, gradients: Array, weighting: str = "plain") -> Array:
    """Grad-CAM before its ReLU: ``sum_k alpha_k A_k`` (Selvaraju et al. 2017, Eq. 1-2), float32 [batch, h, w]."""
    return jnp.einsum("bhwc,bc->bhw", at_least_float32(activations),
                      grad_cam_weights(activations, gradients, weighting))


def grad_cam_plus_plus_map(activations: Array, gradients: Array, eps: float = 1e-6) -> Array:
    """Grad-CAM++ before its ReLU (Chattopadhyay et al. 2018, Eq. 19), float32 [batch, h, w]."""
    return jnp.einsum("bhwc,bc->bhw", at_least_float32(activations),
                      grad_cam_plus_plus_weights(activations, gradients, eps))


def hirescam_map(activations: Array, gradients: Array) -> Array:
    """HiResCAM before its ReLU: ``sum_k g_k * A_k`` (Draelos & Carin 2020, Eq. 3), float32 [batch, h, w]."""
    return jnp.sum(at_least_float32(gradients) * at_least_float32(activations), axis=-1)


def layer_cam_map(activations: Array, gradients: Array) -> Array:
    """LayerCAM before its ReLU: ``sum_k ReLU(g_k) * A_k`` (Jiang et al. 2021, Eq. 4-5), float32 [batch, h, w]."""
    return jnp.sum(jax.nn.relu(at_least_float32(gradients)) * at_least_float32(activations), axis=-1)


def xgrad_cam_weights(activations: Array, gradients: Array, eps: float = 1e-7) -> Array:
    """XGrad-CAM channel weights ``w_k = sum_ij A_k(ij) g_k(ij) / (sum_ij A_k(ij) + eps)`` (Fu et al. 2020,
    Eq. 11; ``eps`` as pytorch-grad-cam's ``XGradCAM``).

    Args:
      activations: [batch, h, w, channels].
      gradients: [batch, h, w, channels].
      eps: added to the denominator.

    Returns:
      float32 [batch, channels].
    """
    a, g = at_least_float32(activations), at_least_float32(gradients)
    return jnp.sum(g * a, axis=(1, 2)) / (jnp.sum(a, axis=(1, 2)) + eps)


def xgrad_cam_map(activations: Array, gradients: Array) -> Array:
    """XGrad-CAM before its ReLU: ``sum_k w_k A_k`` (Fu et al. 2020, Eq. 11), float32 [batch, h, w]."""
    return jnp.einsum("bhwc,bc->bhw", at_least_float32(activations), xgrad_cam_weights(activations, gradients))


# ---------------------------------------------------------------------------------------------------------------
# Shared finishing: rectify, resize, aggregate layers.


def _resize_any(maps: Array, size: tuple[int, int]) -> Array:
    """``resize_maps`` for [batch, h, w] or [batch, k, h, w]."""
    if maps.ndim == 3:
        return resize_maps(maps, size)
    lead = maps.shape[:-2]
    return resize_maps(maps.reshape((-1, *maps.shape[-2:])), size).reshape((*lead, *size))


def normalize_any(maps: Array) -> Array:
    """Per-map min-max normalisation of [batch, h, w] or [batch, k, h, w] maps (each ``[b, j]`` map by itself)."""
    if maps.ndim == 3:
        return normalize_maps(maps)
    return normalize_maps(maps.reshape((-1, *maps.shape[-2:]))).reshape(maps.shape)


def image_maps(layer_maps: tuple[Array, ...], images: Array, relu: bool = True) -> Array:
    """Rectified layer maps at the image's size; several layers are each min-max normalised (at the layer's
    resolution), resized and averaged (pytorch-grad-cam's ``compute_cam_per_layer`` / ``aggregate_multi_layers``).

    Args:
      layer_maps: one [batch, (k,) h_l, w_l] map per layer, before the ReLU.
      images: [batch, height, width, channels].
      relu: rectify each layer's map.

    Returns:
      float32 [batch, (k,) height, width]: one layer's map resized; for several, the mean of the layers' normalised
      and resized maps (in [0, 1]).
    """
    size = tuple(images.shape[1:3])
    maps = [jax.nn.relu(m) if relu else m for m in layer_maps]
    if len(maps) == 1:
        return _resize_any(maps[0], size)
    # Normalised at the layer's resolution, then resized (scale_cam_image): the resize can lower a map's maximum.
    return jnp.mean(jnp.stack([_resize_any(normalize_any(m), size) for m in maps]), axis=0)


def _check_spatial(shapes, model: LayerModel, method: str) -> None:
    for name, s in zip(model.layers, shapes):
        if len(s.shape) != 4:
            raise ValueError(f"{method} needs spatial activations [batch, h, w, channels]; layer {name!r} gives "
                             f"{tuple(s.shape)}")


def _per_target(fn: CamFn, activations: Array, gradients: Array) -> Array:
    """``fn(A, g)`` for one target per example, or ``vmap``-ed over the targets of ``g`` [batch, k, ...]."""
    if gradients.ndim == activations.ndim:
        return fn(activations, gradients)
    return jax.vmap(fn, in_axes=(None, 1), out_axes=1)(activations, gradients)


def gradient_cam(model: LayerModel, images: Array, targets: Any = None, *, cam: CamFn, score: Score = "logit",
                 relu: bool = True) -> tuple[Array, tuple[Array, ...]]:
    """A gradient CAM (``cam(A, g) -> [batch, h, w]``) at one or several layers, for one target or a target set.

    Args:
      model: the network split at one layer or several (:func:`~saliency_jax.saliency.core.linen_layer`), in
        inference mode; activations [batch, h, w, channels].
      images: [batch, height, width, channels] float.
      targets: ``None``, ``int``, int [batch], int [batch, k] or :func:`~saliency_jax.saliency.target_sets.top_k`.
      cam: the combination, e.g. :func:`hirescam_map`, :func:`layer_cam_map`, :func:`xgrad_cam_map`,
        :func:`grad_cam_map`.
      score: ``"logit"`` or ``"softmax"``.
      relu: rectify each layer's map.

    Returns:
      ``(maps, layer_maps)``: float32 [batch, (k,) height, width] (see :func:`image_maps`; NaN for examples with a
      NaN / inf pixel or an out-of-range target) and the unrectified maps at each layer's resolution.

    Raises:
      ValueError: non-spatial activations, bad targets, unknown ``score``.
    """
    check_images(images)
    _check_spatial(model.activation_shapes(images), model, "this CAM")
    lg = layer_gradients(model, images, targets, score=score)
    layer_maps = tuple(_per_target(cam, a, g) for a, g in zip(lg.activations, lg.gradients))
    maps = image_maps(layer_maps, images, relu)
    return _mark(maps, images, lg.classes, lg.logits.shape[-1]), layer_maps


def _mark(maps: Array, images: Array, classes: Array, num_classes: int) -> Array:
    if classes.ndim == 2:
        return mark_invalid_sets(maps, images, classes, num_classes)
    return mark_invalid(maps, invalid_examples(images=images, classes=classes, num_classes=num_classes))


def hirescam(model: LayerModel, images: Array, targets: Any = None, *, score: Score = "logit", relu: bool = True,
             resize: bool = True, normalize: bool = True) -> Array:
    """HiResCAM maps for a batch (Draelos & Carin 2020, Eq. 3): ``ReLU(sum_k dS/dA_k * A_k)``.

    The gradient is kept per position instead of averaged over the map (Grad-CAM): faithful to heads that are not
    a global average pool (flatten + dense), where Grad-CAM's averaged weights can hide evidence the head reads at
    one position. pytorch-grad-cam's ``HiResCAM``.

    Args:
      model: the network split at one layer (:func:`~saliency_jax.saliency.core.linen_layer`), in inference mode;
        activations [batch, h, w, channels]. Traced parameters carry gradients through the maps.
      images: [batch, height, width, channels] float.
      targets: ``None``, ``int``, int [batch] (or a target set: [batch, k] maps).
      score: ``"logit"`` or ``"softmax"``.
      relu: apply the final ReLU.
      resize: bilinearly resize to ``(height, width)``.
      normalize: per-map min-max normalisation to [0, 1] (a constant map becomes zeros).

    Returns:
      float32 [batch, (k,) height, width] (``[batch, (k,) h, w]`` without ``resize``).

    Raises:
      ValueError: non-spatial activations, a split at several layers, bad targets, unknown ``score``.
    """
    check_images(images)
    shape = model.activation_shape(images)
    _check_spatial((shape,), model, "HiResCAM")
    lg = layer_gradients(model, images, targets, score=score)
    maps = _per_target(hirescam_map, lg.activations[0], lg.gradients[0])
    if relu:
        maps = jax.nn.relu(maps)
    if resize:
        maps = _resize_any(maps, tuple(images.shape[1:3]))
    if normalize:
        maps = normalize_any(maps)
    return _mark(maps, images, lg.classes, lg.logits.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Eigen-CAM.


def _first_component(activations: Array) -> Array:
    """Projection of the centred [positions, channels] activations on their first right singular vector, with
    the sign that makes ``|max| >= |min|``: float32 [batch, h, w]."""
    a = at_least_float32(activations)
    b, h, w, c = a.shape
    x = a.reshape(b, h * w, c)
    x = x - jnp.mean(x, axis=1, keepdims=True)
    _, _, vt = jnp.linalg.svd(x, full_matrices=False)
    projection = jnp.einsum("bpc,bc->bp", x, vt[:, 0, :])
    flip = jnp.abs(jnp.min(projection, axis=1)) > jnp.abs(jnp.max(projection, axis=1))
    return jnp.where(flip[:, None], -projection, projection).reshape(b, h, w)


def _set_size(targets: Any) -> int | None:
    if isinstance(targets, TopK):
        return targets.k
    return targets.shape[1] if is_target_set(targets) else None


def eigen_cam(model: LayerModel, images: Array, targets: Any = None) -> tuple[Array, tuple[Array, ...]]:
    """Eigen-CAM maps (Muhammad & Yeasin 2020, Eq. 5-6) at one or several layers; one forward, no gradient.

    Args:
      model: the network split at one layer or several, in inference mode; activations [batch, h, w, channels].
      images: [batch, height, width, channels] float.
      targets: not used by the method (its map is class-agnostic); a target set repeats the map ``k`` times
        ([batch, k, height, width]), anything else gives [batch, height, width]. Target classes are checked.

    Returns:
      ``(maps float32 [batch, (k,) height, width], layer maps [batch, h, w] per layer)``: ``ReLU`` of the first
      principal component's projection (sign as the module docstring), resized (several layers: normalised per
      layer and averaged); NaN for an example with a NaN / inf pixel.

    Raises:
      ValueError: non-spatial activations, bad targets.
    """
    check_images(images)
    _check_spatial(model.activation_shapes(images), model, "Eigen-CAM")
    logits, activations = model(images)
    activations = activations if isinstance(model.layer, tuple) else (activations,)
    layer_maps = tuple(_first_component(a) for a in activations)
    maps = mark_invalid(image_maps(layer_maps, images), invalid_examples(images=images))
    k = _set_size(targets)
    if k is None:
        if targets is not None:
            resolve_targets(targets, logits)
        return maps, layer_maps
    resolve_target_set(targets, logits)
    return jnp.repeat(maps[:, None], k, axis=1), layer_maps


# ---------------------------------------------------------------------------------------------------------------
# Score-CAM.


@functools.lru_cache(maxsize=None)
def _align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] bilinear interpolation with aligned corners (``nn.UpsamplingBilinear2d``): output ``o``
    samples the input at ``o * (size_in - 1) / (size_out - 1)``."""
    matrix = np.zeros((size_out, size_in), np.float64)
    if size_in == 1 or size_out == 1:
        matrix[:, 0] = 1.0
        return matrix.astype(np.float32)
    u = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    lo = np.minimum(np.floor(u).astype(np.int64), size_in - 2)
    frac = u - lo
    matrix[np.arange(size_out), lo] += 1.0 - frac
    matrix[np.arange(size_out), lo + 1] += frac
    return matrix.astype(np.float32)


def score_cam_masks(activations: Array, size: tuple[int, int]) -> Array:
    """Score-CAM's masks: every channel upsampled to ``size`` (aligned corners) and min-max normalised (``+1e-8``).

    Args:
      activations: [batch, h, w, channels].
      size: (height, width) of the image.

    Returns:
      float32 [batch, height, width, channels] in [0, 1].
    """
    a = at_least_float32(activations)
    rows = jnp.asarray(_align_corners_matrix(a.shape[1], size[0]))
    cols = jnp.asarray(_align_corners_matrix(a.shape[2], size[1]))
    up = jnp.einsum("Hh,bhwc,Ww->bHWc", rows, a, cols, precision=jax.lax.Precision.HIGHEST)
    lo = jnp.min(up, axis=(1, 2), keepdims=True)
    hi = jnp.max(up, axis=(1, 2), keepdims=True)
    return (up - lo) / (hi - lo + 1e-8)


def _masked_scores(output_fn: Callable[[Array], Array], images: Array, activations: Array, classes: Array,
                   score: str, masks_per_step: int) -> Array:
    """Target scores on the images masked by each channel's mask: float32 [batch, channels] ([batch, k, channels]
    for classes [batch, k]). ``masks_per_step`` masks per ``vmap``, the chunks under ``lax.map``; each chunk's masks
    are made from its channels only (memory of one chunk, not of all channels' image-size masks)."""
    channels = activations.shape[-1]
    size = tuple(images.shape[1:3])
    step = max(1, min(int(masks_per_step), channels))
    chunks = -(-channels // step)
    index = jnp.minimum(jnp.arange(chunks * step, dtype=jnp.int32), channels - 1).reshape(chunks, step)

    def one(mask):  # [batch, height, width] -> [batch] or [batch, k]
        outputs = output_fn(images * mask[..., None].astype(images.dtype))
        if classes.ndim == 1:
            return class_scores(outputs, classes, score)
        return jax.vmap(lambda c: class_scores(outputs, c, score), in_axes=1, out_axes=1)(classes)

    def chunk(idx):
        masks = score_cam_masks(jnp.take(activations, idx, axis=-1), size)
        return jax.vmap(one, in_axes=-1, out_axes=-1)(masks)

    scores = jax.lax.map(chunk, index)  # [chunks, batch, (k,) step]
    scores = jnp.moveaxis(scores, 0, -2)  # [batch, (k,) chunks, step]
    return scores.reshape((*scores.shape[:-2], chunks * step))[..., :channels]


def score_cam(model: LayerModel, images: Array, targets: Any = None, *, score: Score = "logit",
              masks_per_step: int = 16) -> tuple[Array, tuple[Array, ...]]:
    """Score-CAM maps (Wang et al. 2020, Eq. 6-8) at one or several layers, as pytorch-grad-cam's ``ScoreCAM``.

    ``w_k = softmax_k(S^c(X * M_k))`` over the channels ``k``, ``M_k`` the channel's upsampled, normalised
    activation (:func:`score_cam_masks`); ``L = ReLU(sum_k w_k A_k)``.

    Args:
      model: the network split at one layer or several, in inference mode; activations [batch, h, w, channels].
        Its logits on the masked images are the scores.
      images: [batch, height, width, channels] float.
      targets: ``None`` (predicted class), ``int``, int [batch], int [batch, k] or
        :func:`~saliency_jax.saliency.target_sets.top_k` (the ``k`` maps share the masked forwards).
      score: ``"logit"`` (pytorch-grad-cam's ``ClassifierOutputTarget``) or ``"softmax"`` (the class probability,
        ``ClassifierOutputSoftmaxTarget``).
      masks_per_step: masked images per ``vmap`` (pytorch-grad-cam's ``batch_size``, 16); memory vs. speed, the
        result does not depend on it.

    Returns:
      ``(maps float32 [batch, (k,) height, width], layer maps [batch, (k,) h, w] per layer, before the ReLU)``;
      NaN for examples with a NaN / inf pixel or an out-of-range target. Cost: one forward plus ``channels``
      forwards per layer, per image.

    Raises:
      ValueError: non-spatial activations, bad targets, unknown ``score``, ``masks_per_step`` < 1.
    """
    check_images(images)
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    if isinstance(masks_per_step, bool) or not isinstance(masks_per_step, (int, np.integer)) or masks_per_step < 1:
        raise ValueError(f"masks_per_step must be an int >= 1; got {masks_per_step!r}")
    _check_spatial(model.activation_shapes(images), model, "Score-CAM")
    logits, activations = model(images)
    activations = activations if isinstance(model.layer, tuple) else (activations,)
    classes = resolve_target_set(targets, logits) if is_target_set(targets) else resolve_targets(targets, logits)
    output_fn = lambda x: model(x)[0]  # noqa: E731
    layer_maps = []
    for a in activations:
        scores = _masked_scores(output_fn, images, jax.lax.stop_gradient(a), classes, score, masks_per_step)
        weights = jax.nn.softmax(scores, axis=-1)
        if classes.ndim == 1:
            layer_maps.append(jnp.einsum("bhwc,bc->bhw", at_least_float32(a), weights))
        else:
            layer_maps.append(jnp.einsum("bhwc,bkc->bkhw", at_least_float32(a), weights))
    maps = image_maps(tuple(layer_maps), images)
    return _mark(maps, images, classes, logits.shape[-1]), tuple(layer_maps)
