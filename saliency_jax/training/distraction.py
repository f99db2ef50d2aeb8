"""Playing to distraction: occlude the Grad-CAM-salient pixels of some mini-batches during training.

Morales, Talavera, Remeseiro, "Playing to distraction: towards a robust training of CNN classifiers through visual
explanation techniques", Neural Computing and Applications 2021 (arXiv:2012.14173), Algorithm 1 and Sec. 3:
with probability ``p`` a mini-batch is replaced by its occluded version - Grad-CAM of the ground-truth class at the
last convolutional layer with the current weights, min-max normalised per image, every pixel whose weight exceeds
``th`` set to the fill value in all channels (0-occlusion; 1-occlusion and R-occlusion in Sec. 4.3) - and the usual
gradient step follows on it, labels unchanged.

Everything happens inside the jitted train step: the coin flip and the random fill use the step's PRNG key (no host
round-trip, deterministic for a seed), the Grad-CAM maps of the whole batch come from one ``jax.grad`` call, and the
mini-batch variant uses ``jax.lax.cond`` so that batches that are not occluded pay for no Grad-CAM.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from saliency_jax.saliency import LayerModel, grad_cam
from saliency_jax.saliency.core import check_images, degenerate_maps
from saliency_jax.training.scheme import ModelLayers, Scheme, SchemeSettings, register_scheme

Array = jax.Array
Fill = Literal["zero", "one", "random"]

__all__ = ["DistractionConfig", "occlude", "distract", "distraction_scheme", "FILL_MODES"]

FILL_MODES = ("zero", "one", "random")


@dataclasses.dataclass(frozen=True)
class DistractionConfig(SchemeSettings):
    """Hyper-parameters of distraction training (defaults: the paper's and its released code's).

    The settings of the ``"distraction"`` training scheme (:func:`distraction_scheme`; ``config.distraction``).

    Attributes:
      probability: ``p``, probability that a mini-batch (or, with ``per_example``, an image) is occluded; paper 0.25.
      threshold: ``th``, pixels whose normalised Grad-CAM weight is ``> th`` are occluded; paper 0.85.
      fill: ``"zero"`` (0-occlusion), ``"one"`` (1-occlusion: the top of ``data_range``) or ``"random"``
        (R-occlusion: independent uniform values over ``data_range`` per pixel and channel).
      per_example: occlude each image independently with probability ``p`` instead of whole mini-batches.
      score: Grad-CAM class score, ``"softmax"`` (released code) or ``"logit"`` (the paper's text / Selvaraju).
      weighting: Grad-CAM weights, ``"guided"`` (released code) or ``"plain"``.
      data_range: (low, high) of the input pixels.
    """

    probability: float = 0.25
    threshold: float = 0.85
    fill: Fill = "zero"
    per_example: bool = False
    score: Literal["logit", "softmax"] = "softmax"
    weighting: Literal["plain", "guided"] = "guided"
    data_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1]; got {self.probability}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (maps are min-max normalised); got {self.threshold}")
        if self.fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}; got {self.fill!r}")
        if self.score not in ("logit", "softmax"):
            raise ValueError(f"score must be 'logit' or 'softmax'; got {self.score!r}")
        if self.weighting not in ("plain", "guided"):
            raise ValueError(f"weighting must be 'plain' or 'guided'; got {self.weighting!r}")
        lo, hi = self.data_range
        if not lo < hi:
            raise ValueError(f"data_range must be (low, high) with low < high; got {self.data_range}")


def occlude(images: Array, saliency: Array, threshold: float, fill: Fill = "zero", *,
            key: Array | None = None, data_range: tuple[float, float] = (0.0, 1.0)) -> Array:
    """Sets the pixels whose saliency exceeds ``threshold`` to the fill value in all channels.

    Morales et al. 2021, Algorithm 1: ``selectedPixels = heatMap > th; image[selectedPixels] = fill``.

    Args:
      images: [batch, height, width, channels] float.
      saliency: [batch, height, width] float, normalised maps in [0, 1].
      threshold: ``th``; a pixel is occluded where ``saliency > threshold`` (strictly).
      fill: ``"zero"``, ``"one"`` (``data_range[1]``) or ``"random"`` (uniform in ``data_range`` per pixel and
        channel, drawn with ``key``).
      key: PRNG key, required for ``fill="random"``.
      data_range: (low, high) of the pixels.

    Returns:
      Occluded images, same shape and dtype as ``images``.

    Raises:
      ValueError: on mismatched shapes, an unknown fill, or ``fill="random"`` without a key.
    """
    check_images(images)
    if saliency.shape != images.shape[:3]:
        raise ValueError(f"saliency must be [batch, height, width] = {images.shape[:3]}; got {saliency.shape}")
    lo, hi = data_range
    if fill == "zero":
        value = jnp.zeros((), images.dtype)
    elif fill == "one":
        value = jnp.asarray(hi, images.dtype)
    elif fill == "random":
        if key is None:
            raise ValueError("fill='random' (R-occlusion) needs a PRNG key")
        value = jax.random.uniform(key, images.shape, images.dtype, lo, hi)
    else:
        raise ValueError(f"fill must be one of {FILL_MODES}; got {fill!r}")
    selected = (saliency > threshold)[..., None]
    return jnp.where(selected, value, images)


def distract(key: Array, model: LayerModel, images: Array, labels: Array,
             config: DistractionConfig = DistractionConfig(), *, return_degenerate: bool = False,
             ) -> tuple[Array, Array] | tuple[Array, Array, Array]:
    """Algorithm 1 of Morales et al. 2021 for one mini-batch, inside a jitted step.

    Args:
      key: the step's PRNG key (decides whether to occlude and, for R-occlusion, the fill values).
      model: the network with its current weights, split at the last convolutional layer in inference mode (e.g.
        ``linen_layer(module, variables, "conv3", train=False)``).
      images: [batch, height, width, channels] float in ``config.data_range``.
      labels: int [batch] ground-truth classes (the Grad-CAM target).
      config: see :class:`DistractionConfig`.
      return_degenerate: also return the fraction of the batch's Grad-CAM maps that were degenerate (constant or
        non-finite, :func:`~saliency_jax.saliency.degenerate_maps`; 0 when no map was made), float32 scalar.

    Returns:
      ``(images, occluded)``: the mini-batch to train on (gradients do not flow into the masks) and bool [batch],
      which images were occluded; ``(images, occluded, degenerate)`` with ``return_degenerate``.
    """
    check_images(images)
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [batch] = [{images.shape[0]}]; got {labels.shape}")
    k_apply, k_fill = jax.random.split(key)

    def occluded_batch():
        maps = grad_cam(model, images, labels, score=config.score, weighting=config.weighting,
                        relu=True, resize=True, normalize=True)
        out = jax.lax.stop_gradient(
            occlude(images, maps, config.threshold, config.fill, key=k_fill, data_range=config.data_range))
        return (out, jnp.mean(degenerate_maps(maps).astype(jnp.float32))) if return_degenerate else out

    if config.per_example:
        chosen = jax.random.bernoulli(k_apply, config.probability, images.shape[:1])
        made = occluded_batch()
        occluded = made[0] if return_degenerate else made
        out = jnp.where(chosen[:, None, None, None], occluded, images)
        return (out, chosen, made[1]) if return_degenerate else (out, chosen)
    apply = jax.random.bernoulli(k_apply, config.probability)
    if return_degenerate:
        out, degenerate = jax.lax.cond(apply, occluded_batch, lambda: (images, jnp.zeros((), jnp.float32)))
        return out, jnp.broadcast_to(apply, images.shape[:1]), degenerate
    out = jax.lax.cond(apply, occluded_batch, lambda: images)
    return out, jnp.broadcast_to(apply, images.shape[:1])


@register_scheme("distraction", DistractionConfig)
def distraction_scheme(config: DistractionConfig, layers: ModelLayers) -> Scheme:
    """Distraction training as a training scheme: a batch transform (Algorithm 1 of Morales et al. 2021).

    With the step's current weights (inference mode, no gradient through the masks), the mini-batch is replaced by
    its occluded version with probability ``config.probability`` (:func:`distract`; Grad-CAM of the ground-truth
    class at ``layers.grad_cam_layer``); the usual gradient step follows on it.

    Args:
      config: the hyper-parameters.
      layers: the model's layers (``grad_cam_layer``: the last convolutional block).

    Returns:
      A :class:`~saliency_jax.training.Scheme` whose batch transform reports the metrics ``occluded`` (fraction of
      the batch occluded) and ``distraction_degenerate_maps`` (fraction of this step's Grad-CAM maps that were
      constant or non-finite - an all-zero map occludes nothing; 0 on steps that made no map).
    """

    def batch_transform(ctx, batch):
        model = ctx.model.layer_model(ctx.variables, layers.grad_cam_layer)
        images, occluded, degenerate = distract(ctx.key, model, batch["image"], batch["label"], config,
                                                return_degenerate=True)
        return {**batch, "image": images}, {"occluded": jnp.mean(occluded.astype(jnp.float32)),
                                            "distraction_degenerate_maps": degenerate}

    return Scheme(batch_transform=batch_transform, maps=(layers.grad_cam_layer,))
