"""Directing a classifier's attention to user-given regions: the Grad-CAM guidance loss and the RRR penalty.

Two per-example loss terms, each differentiable with respect to the model's parameters, to be added to the
classification loss inside the train step's ``loss_fn``:

* **Grad-CAM attention guidance** (poster, seed 003: directing a classifier's attention with user-specified
  regions via Grad-CAM, CelebA / AlexNet): ``Loss = w_a * loss_a + w_g * loss_g`` with
  ``loss_g = -ln(|G intersect S| / |G union S|)``, ``G`` the Grad-CAM map (Selvaraju et al. 2017) of the
  ground-truth class at the last convolutional layer - ReLU, bilinear resize to the input, per-image min-max
  normalisation - and ``S`` the user's region. The intersection and union are computed softly for continuous maps
  (:func:`soft_iou`). ``G`` is computed with the current (traced) weights inside ``loss_fn``, so ``jax.grad`` of the
  loss differentiates *through* Grad-CAM's own gradient: a second-order term (a Hessian-vector product of the class
  score with respect to the layer's activations and the parameters), plus one extra backward pass for the map.
  :func:`guidance_loss` (one class per example) and :func:`multilabel_guidance_loss` (each positive attribute of a
  multi-hot target, the poster's CelebA setting).
* **Right for the Right Reasons** (Ross, Hughes, Doshi-Velez, IJCAI 2017, Eq. 1; code dtak/rrr):
  ``lambda_1 * sum_d (A_d * d/dx_d sum_k log p_k)^2`` per example, ``A`` the annotated *wrong* region
  (:func:`rrr_penalty`). The input gradient is itself differentiated with respect to the parameters (double
  backpropagation).

Both take functions of the images built by the caller from the current variables - a
:class:`~saliency_jax.saliency.LayerModel` (``linen_layer(module, variables, layer, train=False)``) or a logits
function ``images -> logits`` - so the caller decides the mode (inference-mode BatchNorm: the maps of different
examples must not interact) and the whole batch is one vectorised computation with no loop over examples.

As training schemes (:mod:`saliency_jax.training.scheme`), registered here: ``"attention_guidance"``
(:func:`attention_guidance_scheme`, settings :class:`GuidanceConfig` in ``config.attention_guidance``; the
classification loss's weight ``w_a`` is the loop's ``config.classification_weight``) and ``"rrr"``
(:func:`rrr_scheme`, :class:`RRRConfig` in ``config.rrr``). Both are loss terms computed inside the train step's
``loss_fn`` from ``ctx.variables`` (the traced parameters), on the batch fields ``region`` (``S``) and
``wrong_region`` (``A``) that the data sources provide (:mod:`saliency_jax.data.decoy_mnist`,
:mod:`saliency_jax.data.celeba`, :class:`saliency_jax.data.TemplateRegionSource`).

>>> import jax, jax.numpy as jnp
>>> from saliency_jax.saliency import split_layer
>>> from saliency_jax.training.attention_guidance import guidance_loss
>>> def loss(w):  # w: [channels, classes]; the map depends on w, and so does its gradient
...     model = split_layer(lambda x: jnp.tanh(x), lambda a: a.mean((1, 2)) @ w)
...     return guidance_loss(model, jnp.ones((2, 4, 4, 3)), jnp.array([0, 1]), jnp.ones((2, 4, 4))).mean()
>>> jax.grad(loss)(jnp.ones((3, 2))).shape
(3, 2)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp

from saliency_jax.saliency import LayerModel, grad_cam, hirescam, normalize_maps, resize_maps
from saliency_jax.saliency.core import check_images, degenerate_maps
from saliency_jax.training.scheme import Forward, ModelLayers, Scheme, SchemeSettings, StepContext, register_scheme

Array = jax.Array

__all__ = [
    "DEFAULT_IOU_EPSILON",
    "INPUT_LAYER",
    "MODES",
    "WEIGHTINGS",
    "GuidanceConfig",
    "RRRConfig",
    "attention_guidance_scheme",
    "rrr_scheme",
    "soft_iou",
    "guidance_maps",
    "raw_guidance_maps",
    "input_layer_model",
    "guidance_loss",
    "multilabel_guidance_loss",
    "input_gradients",
    "rrr_penalty",
    "region_mass_fraction",
]

DEFAULT_IOU_EPSILON = 1.0
"""Smoothing of :func:`soft_iou`, in pixels (the sums are pixel counts): one pixel's worth of mass."""


# ----------------------------------------------------------------------------------------------------------------
# Settings.


def _check_number(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


def _check_mode(mode: Any, name: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}; got {mode!r}")


def _check_field(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must name a batch field (a non-empty string); got {value!r}")


MODES = ("inference", "train")
"""How the schemes run the model for the map / input gradient inside ``loss_fn`` (see :class:`GuidanceConfig`)."""

WEIGHTINGS = ("plain", "guided", "hirescam", "gradient_x_activation")
"""The maps the guidance loss can be put on (:func:`raw_guidance_maps`): Grad-CAM with plain or guided weights (the
poster: ``"plain"``), HiResCAM, or the magnitude of gradient x activation."""

INPUT_LAYER = "input"
"""``GuidanceConfig.layer`` value naming the image itself (the map at the input, :func:`input_layer_model`)."""


@dataclasses.dataclass(frozen=True)
class GuidanceConfig(SchemeSettings):
    """Settings of the ``"attention_guidance"`` training scheme (``config.attention_guidance``).

    The total loss is ``w_a * loss_a + w_g * loss_g``. ``w_a`` is *not* a field here: it is the train loop's
    ``config.classification_weight`` (:func:`saliency_jax.train.make_train_step`), the one place the weight of the
    classification loss lives for every scheme; this section holds ``w_g``. The poster gives no values for either;
    choose them by a sweep (``experiments/configs/decoy_mnist.py``).

    Attributes:
      w_g: weight of the guidance loss ``loss_g = -ln IoU(G, S)``, ``>= 0``.
      epsilon: smoothing of the soft IoU in pixels, ``> 0`` (see :func:`soft_iou`).
      score: Grad-CAM class score, ``"logit"`` (Selvaraju et al. 2017) or ``"softmax"`` (single-label only).
      weighting: the map ``G``: Grad-CAM with ``"plain"`` (Selvaraju et al., Eq. 1; the poster) or ``"guided"``
        weights (see :func:`saliency_jax.saliency.grad_cam_weights`); ``"hirescam"`` (HiResCAM) or
        ``"gradient_x_activation"`` (``|sum_k dS/dA_k A_k|`` per position), ablations defined in
        :func:`raw_guidance_maps`.
      layer: the layer ``A`` the map is taken at: None (default, the poster's) = the model's Grad-CAM layer
        (``config.model.grad_cam_layer``, the last convolutional block), a layer path of the model
        (``"relu_conv1"``), or ``"input"`` (:data:`INPUT_LAYER`): the image itself, where
        ``"gradient_x_activation"`` is gradient x input. An unknown path is reported when the step is first traced.
      mode: how the map's network runs inside ``loss_fn``: ``"inference"`` (``train=False``: running BatchNorm
        statistics, no dropout; each example's map depends on that example only) or ``"train"`` (``train=True``:
        batch statistics, dropout from the loss term's key, which differs from the training forward's draw). Both
        differentiate through the map; for a network without BatchNorm and dropout (CNN-2) they are the same.
      region_field: the batch field holding ``S``: [batch, height, width] (single-label) or
        [batch, num_guided, height, width] (multi-label) in [0, 1]. Which region it holds is the data's choice
        (``config.dataset.options``): the example's own region (Decoy MNIST's digit pixels) or a per-class template
        drawn once by the user (``region_templates``, :class:`saliency_jax.data.TemplateRegionSource`; CelebA's
        per-attribute templates), moved with the image by geometric augmentation either way.
      attributes: multi-label only: indices into the logits of the guided attributes, one per plane of the region
        field (CelebA: ``CelebASource.region_attribute_indices``); ``()`` = every logit.
      start_step: the term is added from this step on (0: from the start). The poster's workflow in one run: the
        network is first trained on the attributes alone (``start_step`` steps), then fine-tuned with the guidance
        loss; before ``start_step`` the map is not computed (``lax.cond``) and the metrics read 0.
    """

    w_g: float = 1.0
    epsilon: float = DEFAULT_IOU_EPSILON
    score: Literal["logit", "softmax"] = "logit"
    weighting: Literal["plain", "guided", "hirescam", "gradient_x_activation"] = "plain"
    layer: str | None = None
    mode: Literal["inference", "train"] = "inference"
    region_field: str = "region"
    attributes: tuple[int, ...] = ()
    start_step: int = 0

    def __post_init__(self):
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, numbers.Integral) \
                or self.start_step < 0:
            raise ValueError(f"GuidanceConfig.start_step must be an int >= 0; got {self.start_step!r}")
        object.__setattr__(self, "w_g", _check_number(self.w_g, "GuidanceConfig.w_g"))
        object.__setattr__(self, "epsilon", _check_number(self.epsilon, "GuidanceConfig.epsilon", positive=True))
        if self.score not in ("logit", "softmax"):
            raise ValueError(f"GuidanceConfig.score must be 'logit' or 'softmax'; got {self.score!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"GuidanceConfig.weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise ValueError(f"GuidanceConfig.layer must be None (the model's Grad-CAM layer), a layer path or "
                             f"{INPUT_LAYER!r}; got {self.layer!r}")
        _check_mode(self.mode, "GuidanceConfig.mode")
        _check_field(self.region_field, "GuidanceConfig.region_field")
        attributes = (self.attributes,) if isinstance(self.attributes, numbers.Integral) else self.attributes
        try:
            attributes = tuple(attributes)
        except TypeError as e:
            raise TypeError(f"GuidanceConfig.attributes must be a tuple of logit indices; got {self.attributes!r}") \
                from e
        if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) and a >= 0 for a in attributes) \
                or len(set(attributes)) != len(attributes):
            raise ValueError(f"GuidanceConfig.attributes must be distinct logit indices >= 0; got {self.attributes!r}")
        object.__setattr__(self, "attributes", tuple(int(a) for a in attributes))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "GuidanceConfig":
        """Builds the settings from a mapping (a dict or an ``ml_collections.ConfigDict``).

        Raises:
          ValueError: on ``w_a`` (it is ``config.classification_weight``), on any other key that is not a field
            (naming the closest ones), or as the constructor.
          TypeError: as the constructor.
        """
        if mapping is not None and "w_a" in mapping:
            raise ValueError("w_a is the train loop's config.classification_weight (the weight of the "
                             "classification loss for every scheme), not a field of the attention_guidance section")
        return super().from_mapping(mapping)


@dataclasses.dataclass(frozen=True)
class RRRConfig(SchemeSettings):
    """Settings of the ``"rrr"`` training scheme, Right for the Right Reasons (``config.rrr``; defaults: dtak/rrr's
    Decoy MNIST run).

    Attributes:
      lambda1: ``lambda_1``, weight of the input-gradient penalty (the paper's name; ``l2_grads`` in dtak/rrr).
        1000 is the value of dtak/rrr's Decoy MNIST notebook, where inputs are raw 0-255 pixel values.
      pixel_scale: the input gradient is taken with respect to pixels measured in units of ``1 / pixel_scale`` of
        the model's input range: ``d/d(pixel_scale * x) = (1 / pixel_scale) d/dx``. 255 (default) reproduces
        dtak/rrr's penalty for models that read images in [0, 1] (their MLP reads raw 0-255 values), so that
        ``lambda1 = 1000`` means the same there and here; 1 takes the gradient with respect to the model's own inputs
        (then ``lambda1 = 1000 / 255**2`` is the same penalty).
      activation: ``"softmax"`` (``log p_k = log_softmax``, the paper's single-label case) or ``"sigmoid"``
        (multi-label: ``log p_k = log sigmoid(z_k)``).
      mode: ``"inference"`` or ``"train"``, as :class:`GuidanceConfig` (in train mode with BatchNorm the summed
        log-probabilities couple the examples of a batch through its statistics).
      wrong_region_field: the batch field holding ``A``, [batch, height, width] (or [..., channels]) in [0, 1].
      region_mass_metric: also log ``grad_cam_mass_in_region``, the Grad-CAM mass inside the batch field
        ``region`` (``S``) at ``config.model.grad_cam_layer`` (a first-order diagnostic: one more forward/backward
        per step, under ``stop_gradient``). Off by default: the ``"region_mass"`` evaluator measures it after
        training at no training cost.
    """

    lambda1: float = 1000.0
    pixel_scale: float = 255.0
    activation: Literal["softmax", "sigmoid"] = "softmax"
    mode: Literal["inference", "train"] = "inference"
    wrong_region_field: str = "wrong_region"
    region_mass_metric: bool = False

    def __post_init__(self):
        object.__setattr__(self, "lambda1", _check_number(self.lambda1, "RRRConfig.lambda1"))
        object.__setattr__(self, "pixel_scale",
                           _check_number(self.pixel_scale, "RRRConfig.pixel_scale", positive=True))
        if self.activation not in ("softmax", "sigmoid"):
            raise ValueError(f"RRRConfig.activation must be 'softmax' or 'sigmoid'; got {self.activation!r}")
        _check_mode(self.mode, "RRRConfig.mode")
        _check_field(self.wrong_region_field, "RRRConfig.wrong_region_field")
        if not isinstance(self.region_mass_metric, bool):
            raise TypeError(f"RRRConfig.region_mass_metric must be a bool; got {self.region_mass_metric!r}")


# ----------------------------------------------------------------------------------------------------------------
# Soft IoU and the Grad-CAM guidance loss.


def _float_dtype(*arrays: Array) -> jnp.dtype:
    """float32, or float64 when an input is float64 (finite-difference tests under ``enable_x64``)."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def soft_iou(maps: Array, regions: Array, epsilon: float = DEFAULT_IOU_EPSILON) -> Array:
    """Soft intersection over union of continuous maps and regions, per example.

    ``I = sum_ij G_ij S_ij`` and ``U = sum_ij (G_ij + S_ij - G_ij S_ij)`` (the product t-norm and its probabilistic
    sum, which equal the set intersection and union for binary maps), and ``IoU = (I + epsilon) / (U + epsilon)``.

    The epsilon (in pixels, since ``I`` and ``U`` are pixel sums) smooths both numerator and denominator:
    ``IoU`` lies in ``(0, 1]``, two empty maps give 1 (no 0/0), ``-ln IoU <= ln(U / epsilon + 1)`` is finite when the
    map misses the region entirely, and the gradient of ``-ln IoU`` with respect to one pixel of ``G`` is bounded by
    ``1 / (I + epsilon) + 1 / (U + epsilon)`` - with a tiny epsilon (1e-6) a map that misses the region would get
    gradients of order 1e6. The default, one pixel's worth of mass, changes the IoU of regions of hundreds of
    pixels by well under 1 %.

    Args:
      maps: [batch, height, width] float in [0, 1], ``G`` (e.g. normalised Grad-CAM maps).
      regions: [batch, height, width] float in [0, 1], ``S`` (binary user regions or soft ones).
      epsilon: smoothing in pixels, ``> 0``.

    Returns:
      [batch] float32 (float64 for float64 inputs) in (0, 1].

    Raises:
      ValueError: if the shapes differ or are not rank 3, or ``epsilon <= 0``.
    """
    if maps.ndim != 3 or regions.shape != maps.shape:
        raise ValueError(
            f"soft_iou: maps and regions must both be [batch, height, width]; got {maps.shape} and {regions.shape}")
    if not float(epsilon) > 0:
        raise ValueError(f"soft_iou: epsilon must be > 0; got {epsilon}")
    dtype = _float_dtype(maps, regions)
    g, s = maps.astype(dtype), regions.astype(dtype)
    intersection = jnp.sum(g * s, axis=(1, 2))
    union = jnp.sum(g + s - g * s, axis=(1, 2))
    return (intersection + epsilon) / (union + epsilon)


def _check_regions(regions: Array, images: Array, leading: tuple[int, ...], fn: str) -> None:
    want = (*leading, *images.shape[1:3])
    if tuple(regions.shape) != want:
        raise ValueError(f"{fn}: regions must have shape {list(want)} (one region per map, at the image size); "
                         f"got {list(regions.shape)}")


def input_layer_model(logits_fn: Callable[[Array], Array]) -> LayerModel:
    """The network "split" at its input: the activations ``A`` are the images themselves.

    ``fn(images, perturbation) = (logits_fn(images + perturbation), images)``, so ``dS/dA`` is the input gradient and
    :func:`raw_guidance_maps` with ``weighting="gradient_x_activation"`` is gradient x input (Shrikumar et al. 2016),
    summed over the colour channels.

    Args:
      logits_fn: ``images [batch, height, width, channels] -> logits [batch, num_classes]``, built from the current
        (traced) parameters.

    Returns:
      A :class:`~saliency_jax.saliency.LayerModel` named ``"input"``.
    """
    return LayerModel(fn=lambda images, perturbation: (logits_fn(images + perturbation), images), layer=INPUT_LAYER)


def raw_guidance_maps(layer_model: LayerModel, images: Array, targets: Array, *, score: str = "logit",
                      weighting: str = "plain") -> Array:
    """The map the guidance loss is put on, at the layer's resolution, non-negative, not normalised.

    With ``A`` the layer's activations [batch, h, w, K] and ``S`` the class score (``score``) of ``targets``:

    * ``"plain"`` / ``"guided"``: Grad-CAM (Selvaraju et al. 2017, Eq. 1-2), ``ReLU(sum_k alpha_k A_k)`` with
      ``alpha_k`` the spatial mean of ``dS/dA_k`` (``"guided"``: :func:`saliency_jax.saliency.grad_cam_weights`).
      The poster's map.
    * ``"hirescam"``: HiResCAM (Draelos & Carin 2020), ``ReLU(sum_k dS/dA_k * A_k)``: the gradient kept per
      position instead of averaged over the map, so evidence a flatten + dense head reads at one position (the
      Decoy MNIST patch) is not averaged away; for a head that global-average-pools ``A`` the two are equal.
    * ``"gradient_x_activation"``: ``|sum_k dS/dA_k * A_k|`` per position: the magnitude of each position's
      first-order contribution to the score, of either sign. HiResCAM keeps only the positive part, so a position
      whose evidence lowers the score (or that the network uses as a negative cue) is invisible to it and not
      penalised by the loss; a shortcut is used whichever sign it has (RRR, too, penalises the squared input
      gradient). At the input (:func:`input_layer_model`) it is gradient x input, which is 0 wherever the pixel is
      0 (Decoy MNIST's background), so its mass lies on the digit and the patch only.

    Args:
      layer_model: the network split at the layer, built from the current variables (inference mode as a rule).
      images: [batch, height, width, channels] float.
      targets: int [batch] class per example.
      score: ``"logit"`` or ``"softmax"``.
      weighting: one of :data:`WEIGHTINGS`.

    Returns:
      [batch, h, w] float32 (at least), ``>= 0``, ``h, w`` the layer's grid.

    Raises:
      ValueError: on an unknown ``weighting``, or as :func:`saliency_jax.saliency.grad_cam`.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if weighting in ("plain", "guided"):
        return grad_cam(layer_model, images, targets, score=score, weighting=weighting, relu=True, resize=False,
                        normalize=False)
    check_images(images)
    shape = layer_model.activation_shape(images)
    if len(shape.shape) != 4:
        raise ValueError(f"{weighting} maps need a [batch, h, w, channels] layer; {layer_model.layer!r} gives "
                         f"{list(shape.shape)}")
    # sum_k dS/dA_k * A_k per position: HiResCAM before its ReLU (the library's one implementation).
    contributions = hirescam(layer_model, images, targets, score=score, relu=False, resize=False, normalize=False)
    return jax.nn.relu(contributions) if weighting == "hirescam" else jnp.abs(contributions)


def guidance_maps(layer_model: LayerModel, images: Array, targets: Array, *, score: str = "logit",
                  weighting: str = "plain") -> Array:
    """The map ``G`` of the guidance loss: Grad-CAM, ReLU, bilinear resize to the input, per-image min-max.

    Plain :func:`saliency_jax.saliency.grad_cam` for the poster's map; gradients flow through it into whatever
    ``layer_model`` closes over (the parameters). Where a map is constant (``max == min``, e.g. all zeros after the
    ReLU) the normalised map is 0 and its gradient is 0 (never NaN). The ablations (``"hirescam"``,
    ``"gradient_x_activation"``) go through the same resize and normalisation (:func:`raw_guidance_maps`).

    Args:
      layer_model: the network split at its last convolutional layer, built from the current variables in
        inference mode (``linen_layer(module, variables, "conv3", train=False)``), or at another layer / the input
        (:func:`input_layer_model`).
      images: [batch, height, width, channels] float.
      targets: int [batch] class per example (the ground truth).
      score: ``"logit"`` or ``"softmax"``.
      weighting: ``"plain"`` or ``"guided"`` (Grad-CAM's channel weights, :func:`saliency_jax.saliency.grad_cam`),
        or ``"hirescam"`` / ``"gradient_x_activation"``: not Grad-CAM (:func:`raw_guidance_maps`). Ablations; the
        poster uses Grad-CAM.

    Returns:
      [batch, height, width] float32 in [0, 1].

    Raises:
      ValueError: as :func:`raw_guidance_maps`.
    """
    if weighting in ("plain", "guided"):
        return grad_cam(layer_model, images, targets, score=score, weighting=weighting, relu=True, resize=True,
                        normalize=True)
    maps = raw_guidance_maps(layer_model, images, targets, score=score, weighting=weighting)
    return normalize_maps(resize_maps(maps, images.shape[1:3]))


def guidance_loss(layer_model: LayerModel, images: Array, targets: Array, regions: Array, *,
                  epsilon: float = DEFAULT_IOU_EPSILON, score: str = "logit", weighting: str = "plain") -> Array:
    """Grad-CAM attention-guidance loss ``loss_g = -ln IoU(G, S)`` per example (single-label).

    Poster (seed 003), "Loss function": ``G`` the Grad-CAM of the ground-truth class (:func:`guidance_maps`), ``S``
    the user-specified region, the IoU soft (:func:`soft_iou`). Differentiable with respect to the parameters that
    ``layer_model`` closes over, through Grad-CAM's own gradient (second order).

    Args:
      layer_model: see :func:`guidance_maps`; build it inside ``loss_fn`` from the traced parameters.
      images: [batch, height, width, channels] float.
      targets: int [batch] ground-truth classes.
      regions: [batch, height, width] float in [0, 1], ``S`` per example (a per-class template broadcast to the
        images of that class, or a per-example region).
      epsilon: soft-IoU smoothing in pixels.
      score: Grad-CAM class score (``"logit"``, Selvaraju et al.).
      weighting: Grad-CAM weights (``"plain"``, Selvaraju et al. Eq. 1; ``"guided"``; or ``"hirescam"``, see
        :func:`guidance_maps`).

    Returns:
      [batch] float32, ``>= 0``.

    Raises:
      ValueError: if ``images`` is not rank 4, ``targets`` is not [batch], ``regions`` is not
        [batch, height, width], or as :func:`saliency_jax.saliency.grad_cam`.
      TypeError: if ``targets`` is not integer.
    """
    return _guidance_terms(layer_model, images, targets, regions, epsilon=epsilon, score=score,
                           weighting=weighting)[0]


def _guidance_terms(layer_model, images, targets, regions, *, epsilon, score, weighting):
    """``(loss_g [batch], maps [batch, height, width])`` of :func:`guidance_loss` (checks included)."""
    check_images(images)
    targets = jnp.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"guidance_loss: targets must be int class indices [batch]; got dtype {targets.dtype}")
    if targets.shape != images.shape[:1]:
        raise ValueError(f"guidance_loss: targets must have shape [{images.shape[0]}]; got {list(targets.shape)}")
    _check_regions(regions, images, images.shape[:1], "guidance_loss")
    maps = guidance_maps(layer_model, images, targets, score=score, weighting=weighting)
    return -jnp.log(soft_iou(maps, regions, epsilon)), maps


def multilabel_guidance_loss(layer_model: LayerModel, images: Array, targets: Array, regions: Array, *,
                             attributes: Sequence[int] | None = None, epsilon: float = DEFAULT_IOU_EPSILON,
                             weighting: str = "plain") -> Array:
    """Multi-label guidance loss: ``-ln IoU`` averaged over each example's positive guided attributes.

    The poster's CelebA setting: one logit per attribute (binary cross-entropy), the Grad-CAM of attribute ``a`` is
    taken on its logit, and each attribute ``a`` has its own region ``S_a`` (e.g. the mouth for Wearing_Lipstick).
    For example ``b``: ``loss_g = mean over {k : targets[b, attributes[k]] = 1} of -ln IoU(G_{b, attributes[k]},
    regions[b, k])``, and 0 when the example has none of the guided attributes.

    The maps of all guided attributes come from one forward pass and ``len(attributes)`` backward passes batched
    with ``jax.vmap`` over the attribute (the forward does not depend on it, so vmap does not repeat it).

    Args:
      layer_model: see :func:`guidance_maps`.
      images: [batch, height, width, channels] float.
      targets: [batch, num_attributes] multi-hot (int or bool; 1 = attribute present), ``num_attributes`` the
        number of logits.
      regions: [batch, num_guided, height, width] float in [0, 1]; ``regions[:, k]`` is the region of attribute
        ``attributes[k]``.
      attributes: static indices into the logits of the guided attributes, ``num_guided`` of them; None = all
        ``num_attributes`` in order.
      epsilon: soft-IoU smoothing in pixels.
      weighting: as :func:`guidance_loss` (the score is the attribute's logit).

    Returns:
      [batch] float32, ``>= 0``.

    Raises:
      ValueError: on mismatched shapes, an attribute index outside ``[0, num_attributes)`` or repeated, or no
        guided attribute.
      TypeError: if ``targets`` is not integer or bool.
    """
    loss, _, _ = _multilabel_terms(layer_model, images, targets, regions, attributes=attributes, epsilon=epsilon,
                                   weighting=weighting)
    return loss


def _multilabel_terms(layer_model, images, targets, regions, *, attributes, epsilon, weighting):
    """``(loss_g [batch], maps [batch, num_guided, h, w], positive [batch, num_guided] float)`` of
    :func:`multilabel_guidance_loss` (checks included)."""
    check_images(images)
    targets = jnp.asarray(targets)
    if not (jnp.issubdtype(targets.dtype, jnp.integer) or targets.dtype == jnp.bool_):
        raise TypeError(f"multilabel_guidance_loss: targets must be multi-hot int or bool; got {targets.dtype}")
    if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError("multilabel_guidance_loss: targets must be multi-hot [batch, num_attributes] with batch = "
                         f"{images.shape[0]}; got {list(targets.shape)}")
    num_attributes = targets.shape[1]
    attributes = tuple(range(num_attributes)) if attributes is None else tuple(int(a) for a in attributes)
    if not attributes:
        raise ValueError("multilabel_guidance_loss: no guided attribute")
    if len(set(attributes)) != len(attributes) or not all(0 <= a < num_attributes for a in attributes):
        raise ValueError(f"multilabel_guidance_loss: attributes must be distinct indices in [0, {num_attributes}); "
                         f"got {list(attributes)}")
    _check_regions(regions, images, (images.shape[0], len(attributes)), "multilabel_guidance_loss")
    batch = images.shape[0]
    logits_shape = jax.eval_shape(lambda x: layer_model(x)[0], images).shape
    if logits_shape != (batch, num_attributes):
        raise ValueError(f"multilabel_guidance_loss: targets have {num_attributes} attributes but the model's logits "
                         f"are {list(logits_shape)}")

    def maps_of(attribute):
        return guidance_maps(layer_model, images, jnp.full((batch,), attribute, jnp.int32), score="logit",
                             weighting=weighting)

    maps = jax.vmap(maps_of, out_axes=1)(jnp.asarray(attributes, jnp.int32))  # [batch, num_guided, h, w]
    height, width = images.shape[1:3]
    iou = soft_iou(maps.reshape(-1, height, width), regions.reshape(-1, height, width), epsilon)
    per_attribute = -jnp.log(iou).reshape(batch, len(attributes))
    positive = (targets[:, jnp.asarray(attributes)] > 0).astype(per_attribute.dtype)
    count = jnp.sum(positive, axis=1)
    return jnp.sum(per_attribute * positive, axis=1) / jnp.maximum(count, 1.0), maps, positive


def region_mass_fraction(maps: Array, regions: Array) -> Array:
    """Fraction of a saliency map's mass inside a region: ``sum(G * S) / sum(G)`` per example.

    The diagnostic of the Decoy MNIST comparison (how much of the Grad-CAM mass lies on the digit, ``S``, or on
    the decoy patch, ``A``).

    Args:
      maps: [batch, height, width] float, non-negative.
      regions: [batch, height, width] float in [0, 1].

    Returns:
      [batch] float32 in [0, 1]; 0 for an all-zero map.

    Raises:
      ValueError: if the shapes differ or are not rank 3.
    """
    if maps.ndim != 3 or regions.shape != maps.shape:
        raise ValueError(f"region_mass_fraction: maps and regions must both be [batch, height, width]; got "
                         f"{maps.shape} and {regions.shape}")
    dtype = _float_dtype(maps, regions)
    g, s = maps.astype(dtype), regions.astype(dtype)
    total = jnp.sum(g, axis=(1, 2))
    inside = jnp.sum(g * s, axis=(1, 2))
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Right for the Right Reasons.


def input_gradients(logits_fn: Callable[[Array], Array], images: Array, *,
                    activation: str = "softmax") -> Array:
    """``d/dx sum_k log p_k(x)`` per example: the explanation RRR constrains (Ross et al. 2017, Eq. 1).

    dtak/rrr's default (``scale='log'``, ``y='sum'``): the gradient of the log-probabilities summed over all
    classes (not only the true or predicted one). The sum also runs over the batch, which gives each example its
    own gradient as long as ``logits_fn`` treats examples independently (inference-mode BatchNorm, no batch
    statistics).

    Args:
      logits_fn: ``images -> logits [batch, num_classes]``, built from the current (traced) parameters.
      images: [batch, height, width, channels] float.
      activation: ``"softmax"`` (``log p = log_softmax(z)``) or ``"sigmoid"`` (``log p_k = log sigmoid(z_k)``).

    Returns:
      [batch, height, width, channels], dtype of ``images`` promoted to at least float32.

    Raises:
      ValueError: on an unknown ``activation`` or logits that are not [batch, num_classes].
    """
    check_images(images)
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid'; got {activation!r}")

    def summed_log_probs(x):
        logits = logits_fn(x)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"logits_fn must return [batch, num_classes] = [{x.shape[0]}, ...]; got {logits.shape}")
        logits = logits.astype(_float_dtype(logits))
        log_p = jax.nn.log_softmax(logits, axis=-1) if activation == "softmax" else jax.nn.log_sigmoid(logits)
        return jnp.sum(log_p)

    return jax.grad(summed_log_probs)(images.astype(_float_dtype(images)))


def rrr_penalty(logits_fn: Callable[[Array], Array], images: Array, wrong_regions: Array, *,
                lambda1: float = 1000.0, pixel_scale: float = 255.0, activation: str = "softmax") -> Array:
    """Right-for-the-right-reasons penalty per example (Ross, Hughes, Doshi-Velez, IJCAI 2017, Eq. 1).

    ``lambda1 * sum_d (A_d * (1 / pixel_scale) * d/dx_d sum_k log p_k)^2``, ``A`` the annotation of the input
    features that should *not* matter. As in dtak/rrr (``l2_irrelevant_input_gradients`` with ``normalize=False``)
    the penalty is not divided by the size of ``A``; there both the cross-entropy and the penalty are summed over
    the batch, so averaging both over the batch (the mean of this and of the per-example cross-entropy) weighs them
    the same. dtak/rrr's separate ``lambda_2`` (L2 on the parameters, 1e-4) is the optimizer's business. Gradients
    flow into the parameters that ``logits_fn`` closes over (double backpropagation).

    Args:
      logits_fn: ``images -> logits [batch, num_classes]`` (see :func:`input_gradients`).
      images: [batch, height, width, channels] float.
      wrong_regions: ``A``, [batch, height, width] (the same for every channel) or [batch, height, width, channels],
        float in [0, 1] (1 = a wrong reason, e.g. the Decoy MNIST patch).
      lambda1: ``lambda_1`` (1000 in dtak/rrr's Decoy MNIST run, with ``pixel_scale=255``).
      pixel_scale: see :class:`RRRConfig`.
      activation: ``"softmax"`` or ``"sigmoid"`` (see :func:`input_gradients`).

    Returns:
      [batch] float32 (float64 for float64 inputs), ``>= 0``.

    Raises:
      ValueError: if ``wrong_regions`` does not match the images, or as :func:`input_gradients`.
    """
    return _rrr_terms(logits_fn, images, wrong_regions, lambda1=lambda1, pixel_scale=pixel_scale,
                      activation=activation)[0]


def _rrr_terms(logits_fn, images, wrong_regions, *, lambda1, pixel_scale, activation):
    """``(penalty [batch], input gradients [batch, h, w, c], mask [batch, h, w, 1 or c])`` of :func:`rrr_penalty`."""
    check_images(images)
    if wrong_regions.shape not in (images.shape, images.shape[:3]):
        raise ValueError(f"rrr_penalty: wrong_regions must be [batch, height, width] = {list(images.shape[:3])} or "
                         f"the images' shape {list(images.shape)}; got {list(wrong_regions.shape)}")
    if not float(pixel_scale) > 0:
        raise ValueError(f"rrr_penalty: pixel_scale must be > 0; got {pixel_scale}")
    grads = input_gradients(logits_fn, images, activation=activation)
    mask = wrong_regions.astype(grads.dtype)
    if mask.ndim == 3:
        mask = mask[..., None]
    return lambda1 * jnp.sum(jnp.square(mask * grads / pixel_scale), axis=(1, 2, 3)), grads, mask


# ----------------------------------------------------------------------------------------------------------------
# The two training schemes (the protocol of saliency_jax.training.scheme).


def _batch_field(batch, name: str, scheme: str) -> Array:
    if name not in batch:
        raise ValueError(f"the {scheme!r} scheme reads the batch field {name!r}, which the data does not provide "
                         f"(fields: {sorted(batch)}); use a source with that field (decoy_mnist, celeba with "
                         "region templates, or config.dataset.options.region_templates)")
    return batch[name]


def _layer_model(ctx: StepContext, variables: Any, layer: str, mode: str) -> LayerModel:
    """The network split at ``layer`` (or at its input, :data:`INPUT_LAYER`) for a scheme's extra pass in ``mode``
    (see :class:`GuidanceConfig`)."""
    if layer == INPUT_LAYER:
        return input_layer_model(_logits_fn(ctx, mode, variables))
    return ctx.model.layer_model(variables, layer, train=mode == "train", rng=ctx.key)


def _logits_fn(ctx: StepContext, mode: str, variables: Any = None) -> Callable[[Array], Array]:
    variables = ctx.variables if variables is None else variables
    if mode == "train":
        return lambda x: ctx.model.forward(variables, x, rng=ctx.key).logits
    return lambda x: ctx.model.apply(variables, x)


def _masked_mean(values: Array, weights: Array) -> Array:
    """``sum(values * weights) / sum(weights)`` (0 when no weight)."""
    total = jnp.sum(weights)
    return jnp.sum(values * weights) / jnp.maximum(total, 1.0)


@register_scheme("attention_guidance", GuidanceConfig)
def attention_guidance_scheme(config: GuidanceConfig, layers: ModelLayers) -> Scheme:
    """Grad-CAM attention guidance (poster, seed 003) as a training scheme: the loss term ``w_g * loss_g``.

    Inside ``loss_fn`` the network is split at ``config.layer`` (default ``layers.grad_cam_layer``; ``"input"``: at
    the image, :func:`input_layer_model`) with the step's *traced* parameters
    (``ctx.model.layer_model(ctx.variables, layer)``), so the update differentiates through Grad-CAM's own
    gradient (second order). Single-label batches (``label`` [batch] int): :func:`guidance_loss` with the batch's
    region field ``[batch, height, width]``. Multi-label batches (``label`` [batch, num_classes] multi-hot, with
    ``loss="sigmoid_binary_cross_entropy"``): :func:`multilabel_guidance_loss` over ``config.attributes`` with the
    region field ``[batch, num_guided, height, width]``. ``w_a`` is ``config.classification_weight``.

    Args:
      config: the scheme's settings.
      layers: the model's layers (``grad_cam_layer``: the last convolutional layer, post-ReLU).

    Raises:
      ValueError: if ``config.layer`` is None and the model names no Grad-CAM layer.

    Returns:
      A :class:`~saliency_jax.training.Scheme` with a loss term and no forward or batch transform. Metrics:
      ``guidance_loss`` (batch mean of ``loss_g``, unweighted; multi-label: of the examples' means over their
      positive guided attributes) and ``grad_cam_mass_in_region`` (batch mean of the fraction of the normalised
      map ``G``'s mass inside ``S``, :func:`region_mass_fraction`; multi-label: over positive (example, attribute)
      pairs) and ``guidance_degenerate_maps`` (fraction of the maps ``G`` that are constant or non-finite, on which
      the guidance term trains nothing; same averaging).
    """
    layer = layers.grad_cam_layer if config.layer is None else config.layer
    if layer is None:
        raise ValueError("attention_guidance: the model names no Grad-CAM layer (config.model.grad_cam_layer); set "
                         "config.attention_guidance.layer")

    def loss(ctx: StepContext, batch, forward: Forward):
        del forward  # the map needs the network split at the layer; it is recomputed from ctx.variables
        if not config.start_step:
            return term(ctx, batch)
        # Before start_step: no term and no map (the branch not taken is not run).
        guided = lambda: term(ctx, batch)  # noqa: E731
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(guided))
        return jax.lax.cond(ctx.step >= config.start_step, guided, lambda: zeros)

    def term(ctx: StepContext, batch):
        images, labels = batch["image"], batch["label"]
        regions = _batch_field(batch, config.region_field, "attention_guidance")
        layer_model = _layer_model(ctx, ctx.variables, layer, config.mode)
        if labels.ndim == 1:
            loss_g, maps = _guidance_terms(layer_model, images, labels, regions, epsilon=config.epsilon,
                                           score=config.score, weighting=config.weighting)
            mass = jnp.mean(region_mass_fraction(jax.lax.stop_gradient(maps), regions))
            degenerate = jnp.mean(degenerate_maps(jax.lax.stop_gradient(maps)).astype(jnp.float32))
        else:
            if config.score != "logit":
                raise ValueError("attention_guidance: multi-label targets take Grad-CAM on each attribute's logit; "
                                 f"score must be 'logit', got {config.score!r}")
            loss_g, maps, positive = _multilabel_terms(
                layer_model, images, labels, regions, attributes=config.attributes or None, epsilon=config.epsilon,
                weighting=config.weighting)
            height, width = images.shape[1:3]
            fractions = region_mass_fraction(jax.lax.stop_gradient(maps).reshape(-1, height, width),
                                             regions.reshape(-1, height, width)).reshape(positive.shape)
            mass = _masked_mean(fractions, positive)
            degenerate = _masked_mean(degenerate_maps(jax.lax.stop_gradient(maps).reshape(-1, height, width))
                                      .astype(jnp.float32).reshape(positive.shape), positive)
        return config.w_g * loss_g, {"guidance_loss": jnp.mean(loss_g), "grad_cam_mass_in_region": mass,
                                     "guidance_degenerate_maps": degenerate}

    return Scheme(loss=loss, maps=() if layer == INPUT_LAYER else (layer,))


@register_scheme("rrr", RRRConfig)
def rrr_scheme(config: RRRConfig, layers: ModelLayers) -> Scheme:
    """Right for the Right Reasons (Ross et al., IJCAI 2017, Eq. 1) as a training scheme: the loss term
    :func:`rrr_penalty` on the batch's wrong-region field ``A``, from the step's traced parameters (double
    backpropagation).

    Args:
      config: the scheme's settings.
      layers: the model's layers (``grad_cam_layer`` is read only for ``config.region_mass_metric``).

    Returns:
      A :class:`~saliency_jax.training.Scheme` with a loss term. Metrics: ``rrr_penalty`` (batch mean of the
      weighted penalty, the amount added to the loss), ``input_gradient_mass_in_wrong_region`` (batch mean of
      ``sum((A g)^2) / sum(g^2)``, ``g`` the input gradient) and, with ``region_mass_metric``,
      ``grad_cam_mass_in_region``.
    """
    layer = layers.grad_cam_layer

    def loss(ctx: StepContext, batch, forward: Forward):
        del forward
        images = batch["image"]
        wrong = _batch_field(batch, config.wrong_region_field, "rrr")
        penalty, grads, mask = _rrr_terms(_logits_fn(ctx, config.mode), images, wrong, lambda1=config.lambda1,
                                          pixel_scale=config.pixel_scale, activation=config.activation)
        energy = jnp.square(jax.lax.stop_gradient(grads))
        total = jnp.sum(energy, axis=(1, 2, 3))
        inside = jnp.sum(energy * mask, axis=(1, 2, 3))
        metrics = {"rrr_penalty": jnp.mean(penalty),
                   "input_gradient_mass_in_wrong_region": jnp.mean(
                       jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0))}
        if config.region_mass_metric:
            labels = batch["label"]
            if labels.ndim != 1:
                raise ValueError("rrr: region_mass_metric needs single-label batches (label [batch])")
            regions = _batch_field(batch, "region", "rrr")
            frozen = jax.lax.stop_gradient(ctx.variables)
            layer_model = _layer_model(ctx, frozen, layer, config.mode)
            maps = guidance_maps(layer_model, images, labels)
            metrics["grad_cam_mass_in_region"] = jnp.mean(region_mass_fraction(maps, regions))
        return penalty, metrics

    return Scheme(loss=loss, maps=(layer,) if config.region_mass_metric else ())
