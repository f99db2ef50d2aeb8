"""The HNC loss: homogeneous negative class activation maps (Sun, Khan, Li, Cholakkal, Khan, Van Gool, "Fixing
localization errors to improve image classification", ECCV 2020).

A classifier that is confident for the right class can still light up sharp peaks in the class activation maps
(CAMs) of wrong classes; the HNC loss flattens the CAMs of the hardest negative classes. As in the authors' code
(GuoleiSun/HNC_loss, ``train_imagenet_cam_loss.py``):

* the CAM of every class is the classifier applied at every position of the last convolutional block, bias
  included (``M_c(x, y) = sum_k w_kc f_k(x, y) + b_c``), so its spatial mean is the logit (Zhou et al. 2016);
* the negatives are the ``k`` classes with the highest scores other than the ground truth (``k = 100`` on ImageNet;
  clipped here to ``num_classes - 1``), chosen without gradient;
* ``"mse"``: the mean of the squared negative-CAM values (over the ``k`` maps and their positions; weight 0.07);
* ``"kd"``: the cross-entropy between a uniform spatial distribution and the spatial softmax (temperature ``T = 1``)
  of each negative CAM, ``-1/(hw) sum_xy log softmax_xy(M_c / T)``, summed over the ``k`` classes and averaged over
  the batch (weight 0.0065 for ResNet-101, 0.0048 for ResNet-152); its minimum, ``log(hw)`` per class, is reached by
  a constant map;
* total loss = cross-entropy + weight x HNC.

The CAMs come from the training forward itself (the last block's train-mode activations and the classifier's
current kernel and bias), so the term costs one contraction over the last feature map, and its gradient reaches
every parameter below. Works on any model with a global-average-pooled dense head reachable by path (our ResNets,
the small CNN, a user's linen module: ``config.model.grad_cam_layer`` / ``config.model.classifier``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from saliency_jax.saliency.cam import class_activation_maps, classifier_params
from saliency_jax.saliency.core import degenerate_maps
from saliency_jax.training.scheme import Forward, ModelLayers, Scheme, SchemeSettings, StepContext, register_scheme

Array = jax.Array

__all__ = ["HNCConfig", "DEFAULT_WEIGHTS", "hard_negative_classes", "hnc_loss", "hnc_scheme"]

#: The authors' weights (``running-script.sh``): mse 0.07; kd 0.0065 (ResNet-101; 0.0048 for ResNet-152).
DEFAULT_WEIGHTS = {"mse": 0.07, "kd": 0.0065}


@dataclasses.dataclass(frozen=True)
class HNCConfig(SchemeSettings):
    """Settings of the ``"hnc"`` training scheme (``config.hnc``).

    Attributes:
      variant: ``"mse"`` or ``"kd"`` (module docstring).
      weight: multiplies the HNC term in the total loss; 0 (the default) is replaced by the authors' weight of the
        variant (:data:`DEFAULT_WEIGHTS`) when the settings are built.
      num_negatives: ``k``, the hardest negative classes per example (100 on ImageNet); clipped to
        ``num_classes - 1``.
      temperature: ``T`` of the spatial softmax (``"kd"``; 1 in the authors' code).
    """

    variant: Literal["mse", "kd"] = "mse"
    weight: float = 0.0
    num_negatives: int = 100
    temperature: float = 1.0

    def __post_init__(self):
        if self.variant not in ("mse", "kd"):
            raise ValueError(f"HNCConfig.variant must be 'mse' or 'kd'; got {self.variant!r}")
        if float(self.weight) < 0:
            raise ValueError(f"HNCConfig.weight must be >= 0; got {self.weight}")
        if int(self.num_negatives) < 1:
            raise ValueError(f"HNCConfig.num_negatives must be >= 1; got {self.num_negatives}")
        if float(self.temperature) <= 0:
            raise ValueError(f"HNCConfig.temperature must be > 0; got {self.temperature}")
        if not float(self.weight):  # the variant's default, written out so that reports show the weight used
            object.__setattr__(self, "weight", DEFAULT_WEIGHTS[self.variant])


def hard_negative_classes(scores: Array, labels: Array, k: int) -> Array:
    """The ``k`` highest-scoring classes other than each example's label (no gradient).

    Args:
      scores: [batch, num_classes] float, e.g. the logits (the spatial means of the CAMs, as the authors' code ranks).
      labels: int [batch], the ground-truth classes.
      k: how many negatives; must be < num_classes.

    Returns:
      int32 [batch, k], by decreasing score; never the label.

    Raises:
      ValueError: if ``k`` is not in ``[1, num_classes)`` or shapes disagree.
    """
    batch, num_classes = scores.shape
    if not 1 <= k < num_classes:
        raise ValueError(f"k must lie in [1, {num_classes}) (num_classes - 1 negatives at most); got {k}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must be [{batch}]; got shape {labels.shape}")
    scores = jax.lax.stop_gradient(scores)
    masked = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), -jnp.inf, scores)
    return jax.lax.top_k(masked, k)[1].astype(jnp.int32)


def hnc_loss(cams: Array, variant: str = "mse", temperature: float = 1.0) -> Array:
    """The HNC term per example from the negative CAMs.

    Args:
      cams: [batch, k, h, w] float, the CAMs of each example's hard negative classes.
      variant: ``"mse"``: mean over ``k, h, w`` of the squared values; ``"kd"``: sum over the ``k`` classes of the
        cross-entropy between the uniform distribution over the ``h w`` positions and the spatial softmax of
        ``cams / temperature`` (its minimum ``k log(hw)`` on constant maps).
      temperature: the softmax temperature (``"kd"``).

    Returns:
      float32 [batch]; the authors' batch loss is its mean.

    Raises:
      ValueError: on an unknown variant or a ``cams`` that is not rank 4.
    """
    if cams.ndim != 4:
        raise ValueError(f"cams must be [batch, k, h, w]; got shape {cams.shape}")
    flat = cams.reshape(*cams.shape[:2], -1)
    if variant == "mse":
        return jnp.mean(flat ** 2, axis=(1, 2))
    if variant == "kd":
        return jnp.sum(-jnp.mean(jax.nn.log_softmax(flat / temperature, axis=-1), axis=-1), axis=-1)
    raise ValueError(f"variant must be 'mse' or 'kd'; got {variant!r}")


def negative_cams(features: Array, params: Any, classifier: str, logits: Array, labels: Array,
                  num_negatives: int) -> tuple[Array, Array]:
    """The CAMs of each example's hardest negative classes, from a GAP network's last block and its classifier.

    Args:
      features: [batch, h, w, channels], the last convolutional block's output (what is average-pooled).
      params: the model's ``params`` collection (the classifier's ``kernel`` [channels, num_classes] and ``bias``).
      classifier: module path of the classifier.
      logits: [batch, num_classes] of the same forward (ranks the negatives).
      labels: int [batch].
      num_negatives: ``k`` (clipped to ``num_classes - 1``).

    Returns:
      ``(cams [batch, k, h, w], classes int32 [batch, k])``.

    Raises:
      ValueError: naming what is missing when the model is not a GAP network with a dense head at ``classifier``.
    """
    if getattr(features, "ndim", None) != 4:
        raise ValueError(f"HNC needs the spatial output [batch, h, w, channels] of the last convolutional block "
                         f"(config.model.grad_cam_layer); got shape {getattr(features, 'shape', None)}")
    kernel, bias = classifier_params(params, classifier)
    if kernel.ndim != 2 or kernel.shape[0] != features.shape[-1] or kernel.shape[1] != logits.shape[-1]:
        raise ValueError(f"HNC needs a dense classifier on the globally average-pooled features: the kernel of "
                         f"{classifier!r} is {tuple(kernel.shape)}, the last block has {features.shape[-1]} channels "
                         f"and the model {logits.shape[-1]} outputs (set config.model.classifier / grad_cam_layer)")
    k = min(int(num_negatives), logits.shape[-1] - 1)
    classes = hard_negative_classes(logits, labels, k)
    return class_activation_maps(features, kernel, bias, classes), classes


@register_scheme("hnc", HNCConfig)
def hnc_scheme(config: HNCConfig, layers: ModelLayers) -> Scheme:
    """The HNC loss as a training scheme: a loss term on the training forward's last-block activations.

    Args:
      config: the variant, weight, ``k`` and temperature.
      layers: the model's layers (``grad_cam_layer``: the last convolutional block whose output is pooled;
        ``classifier``: the dense head).

    Returns:
      A :class:`~saliency_jax.training.Scheme` whose loss term is ``weight x HNC`` per example; metrics ``hnc``
      (the unweighted term, batch mean), ``negative_cam_peak`` (batch mean of the largest value of the negative
      CAMs, in logit units) and ``hnc_degenerate_maps`` (fraction of the negative CAMs that are constant or
      non-finite: on those the term is constant and trains nothing).
    """
    weight = float(config.weight)

    def loss(ctx: StepContext, batch, forward: Forward):
        cams, _ = negative_cams(forward.activations[layers.grad_cam_layer], ctx.variables["params"],
                                layers.classifier, forward.logits, batch["label"], config.num_negatives)
        term = hnc_loss(cams, config.variant, config.temperature)
        peak = jnp.mean(jnp.max(cams.reshape(*cams.shape[:2], -1), axis=-1))
        flat = jax.lax.stop_gradient(cams).reshape(-1, *cams.shape[2:])
        return weight * term, {"hnc": jnp.mean(term), "negative_cam_peak": jax.lax.stop_gradient(peak),
                               "hnc_degenerate_maps": jnp.mean(degenerate_maps(flat).astype(jnp.float32))}

    return Scheme(loss=loss, layers=(layers.grad_cam_layer,), maps=(layers.grad_cam_layer,))
