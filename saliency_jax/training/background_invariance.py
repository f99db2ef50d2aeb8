"""Background invariance by adversarial backgrounds (Cruz & Cardoso): losses, masks and the three phases' steps.

Cruz, Prates, Simas Filho, Pinto Costa, Cardoso, "Background Invariance by Adversarial Learning", ICPR 2020
(poster: "Training a CNN to be background invariant"). The poster's objective is

    min_{f, f_m} max_{f_b} sum_i L(f(m_i * x_i + b_j * (1 - m_i)), y_i),    m_i = f_m(x_i),  b_j = f_b(z_j),

and the authors' code (``train1.py``, ``train2.py``, ``train3.py``) optimises it in three phases, which this module
follows:

1. **Classifier** ``f`` alone on the clean data: softmax cross-entropy, Adam 1e-3 (:func:`make_classifier_step`).
2. **Mask generator** ``f_m`` (a U-Net, sigmoid output) with ``f`` frozen (:func:`make_mask_step`, Adam 1e-5):
   ``CE(f(x * m), y) + mean_batch(relu(mean_hwc(m) - area)) + 0.1 * TV(m)``, ``area = 0.2``,
   ``TV(m) = mean|m[:, 1:] - m[:, :-1]| + mean|m[:, :, 1:] - m[:, :, :-1]|`` (:func:`mask_loss`).
3. **Classifier against the background generator** ``f_b`` with ``f_m`` frozen (:func:`make_adversarial_step`):
   the mask is binarised per image (Otsu, ``>= 0.5``, ``>=`` the ``(1 - area)`` quantile, or not at all:
   :func:`binarize_masks`), ``x~ = x * m + b * (1 - m)`` (:func:`composite`) with ``b = f_b(z)``, ``z ~ N(0, I)``
   per tile; ``f`` minimises ``CE(f(x~), y)`` (Adam 1e-3) while ``f_b`` minimises ``-CE(f(x~), y)`` plus, for
   one-channel data, ``relu(mean(b) - 0.5)`` so that it cannot paint everything white (Adam 1e-5). Both gradients
   come from the same forward pass and both models are updated every step (the code's persistent
   ``GradientTape``); here one backward pass gives both, through a gradient-reversal node on ``b``
   (:func:`gradient_reversal`). ``mask="heuristic"`` replaces ``f_m`` by ``m = x > 0`` as the code's
   ``heuristic`` option does.

Every step is a pure function ``(state, batch, key) -> (state, metrics)`` on a :class:`BackgroundInvarianceState`
pytree holding all models' parameters and optimizer states, so it can be jitted with ``NamedSharding`` (state
replicated, batch on ``'data'``) and checkpointed whole with orbax, exactly as the generic loop's ``TrainState``;
randomness comes from ``fold_in(key, state.step)``.

Where this differs from the released code (each on purpose, and documented where it happens):

* Phase 3 computes the mask from the images it trains on; the code computes it from the un-augmented images but
  composites the augmented ones (``unet(Xtr[ix])`` vs ``g.t.all(Xtr[ix])``), so mask and object disagree whenever
  augmentation moves the digit.
* The frozen classifier of phase 2 runs in inference mode (the code passes ``training=True``; the same for its
  networks, which have neither BatchNorm nor dropout).
* Otsu's threshold is computed on the accelerator for the whole batch (256-bin histogram over each mask's range,
  the between-class variance of ``skimage.filters.threshold_otsu``) instead of image by image on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from saliency_jax.models.background_invariance import (BackgroundGenerator, UNet, VanillaCNN,
                                                        background_noise_shape, sample_background_noise)

Array = jax.Array
Step = Callable[["BackgroundInvarianceState", dict[str, Array], Array],
                tuple["BackgroundInvarianceState", dict[str, Array]]]

__all__ = [
    "BINARIZE_METHODS",
    "MASK_SOURCES",
    "BACKGROUND_SOURCES",
    "BackgroundInvarianceConfig",
    "BackgroundInvarianceModels",
    "BackgroundInvarianceState",
    "total_variation",
    "mask_loss",
    "otsu_threshold",
    "binarize_masks",
    "heuristic_mask",
    "composite",
    "brightness_penalty",
    "adversarial_losses",
    "gradient_reversal",
    "make_models",
    "make_optimizers",
    "init_state",
    "make_classifier_step",
    "make_mask_step",
    "make_adversarial_step",
    "phase3_masks",
    "phase3_preview",
    "attention_optimizer",
    "with_global_params",
]

BINARIZE_METHODS = ("otsu", "0.5", "quantile", "none")
"""Mask binarisations of the code's ``binarize_mask`` argument, with its spelling."""

MASK_SOURCES = ("unet", "heuristic")
"""Where phase 3's masks come from: the phase-2 U-Net, or ``m = x > 0`` (the code's ``heuristic``)."""

BACKGROUND_SOURCES = ("adversarial", "black", "noise")
"""Phase 3's backgrounds: the generator (the method), zeros, or N(0, 1) noise per pixel (the code's ``adv``,
``black`` and ``noise`` ablations; its ``real`` option needs a background image set and is not provided)."""


# ----------------------------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class BackgroundInvarianceConfig:
    """Hyper-parameters of the three phases (defaults: the authors' code).

    Attributes:
      area: target mask area ``a`` of phase 2 (fraction of the image; ``--area 0.2``) and the quantile level
        ``1 - a`` of ``binarize="quantile"``.
      total_variation: weight of the masks' total variation in phase 2 (``--total-variation 0.1``).
      area_loss: ``"abs"`` (``relu(mean(m) - a)``, the code's default) or ``"squared"`` (its square).
      binarize: phase-3 mask binarisation, one of :data:`BINARIZE_METHODS` (a required argument of the code, no
        default there; Otsu here).
      otsu_bins: histogram bins of Otsu's method (256, scikit-image's default).
      mask: :data:`MASK_SOURCES`.
      background: :data:`BACKGROUND_SOURCES`.
      tiles: background tiles per side, each from its own noise vector (``--tiles 2``).
      brightness_penalty: add ``relu(mean(b) - brightness_limit)`` to the generator's loss; ``None`` (the code):
        only for one-channel images.
      brightness_limit: 0.5 in the code.
      classifier_learning_rate: Adam, phases 1 and 3 (1e-3; the code uses 1e-5 for its VGG19 at >= 128 px).
      mask_learning_rate: Adam, the U-Net in phase 2 (1e-5).
      generator_learning_rate: Adam, the background generator in phase 3 (1e-5).
      adam_eps: Adam's epsilon (1e-7, Keras' default).
      batch_size: per phase (``--batchsize 8``).
      classifier_epochs, mask_epochs, adversarial_epochs: epochs of phases 1, 2, 3 (``--epochs 100`` each).
      phase3_optimizer: the classifier's optimizer state when phase 3 begins: ``"fresh"`` (the authors' code:
        ``train3.py`` loads the phase-1 classifier and compiles it with a new Adam, so moments and step count start
        at zero) or ``"continue"`` (phase 1's Adam moments and step count carried into phase 3).
    """

    area: float = 0.2
    total_variation: float = 0.1
    area_loss: Literal["abs", "squared"] = "abs"
    binarize: str = "otsu"
    otsu_bins: int = 256
    mask: str = "unet"
    background: str = "adversarial"
    tiles: int = 2
    brightness_penalty: bool | None = None
    brightness_limit: float = 0.5
    classifier_learning_rate: float = 1e-3
    mask_learning_rate: float = 1e-5
    generator_learning_rate: float = 1e-5
    adam_eps: float = 1e-7
    batch_size: int = 8
    classifier_epochs: float = 100.0
    mask_epochs: float = 100.0
    adversarial_epochs: float = 100.0
    phase3_optimizer: Literal["fresh", "continue"] = "fresh"

    def __post_init__(self):
        if not 0.0 < self.area < 1.0:
            raise ValueError(f"area must lie in (0, 1); got {self.area}")
        if self.total_variation < 0:
            raise ValueError(f"total_variation must be >= 0; got {self.total_variation}")
        if self.area_loss not in ("abs", "squared"):
            raise ValueError(f"area_loss must be 'abs' or 'squared'; got {self.area_loss!r}")
        if self.binarize not in BINARIZE_METHODS:
            raise ValueError(f"binarize must be one of {BINARIZE_METHODS}; got {self.binarize!r}")
        if int(self.otsu_bins) < 2:
            raise ValueError(f"otsu_bins must be >= 2; got {self.otsu_bins}")
        if self.mask not in MASK_SOURCES:
            raise ValueError(f"mask must be one of {MASK_SOURCES}; got {self.mask!r}")
        if self.background not in BACKGROUND_SOURCES:
            raise ValueError(f"background must be one of {BACKGROUND_SOURCES}; got {self.background!r}")
        if int(self.tiles) < 1:
            raise ValueError(f"tiles must be >= 1; got {self.tiles}")
        for name in ("classifier_learning_rate", "mask_learning_rate", "generator_learning_rate", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        for name in ("classifier_epochs", "mask_epochs", "adversarial_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.phase3_optimizer not in ("fresh", "continue"):
            raise ValueError(f"phase3_optimizer must be 'fresh' or 'continue'; got {self.phase3_optimizer!r}")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "BackgroundInvarianceConfig":
        """Builds the settings from a mapping (e.g. an ``ml_collections`` section).

        Raises:
          ValueError: on keys that are not fields (named, with the valid ones), or as the constructor.
        """
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown background-invariance settings {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def penalise_brightness(self, channels: int) -> bool:
        """Whether the generator's loss has the brightness term for ``channels``-channel images."""
        return (channels == 1) if self.brightness_penalty is None else bool(self.brightness_penalty)


# ----------------------------------------------------------------------------------------------------------------
# Losses and masks (pure functions on arrays).


def _check_masks(masks: Array, name: str = "masks") -> None:
    if getattr(masks, "ndim", None) != 4:
        raise ValueError(f"{name} must be [batch, height, width, channels]; got shape {getattr(masks, 'shape', None)}")


def total_variation(masks: Array) -> Array:
    """Anisotropic total variation of the masks, as ``train2.total_variation``.

    Args:
      masks: [batch, height, width, channels] float.

    Returns:
      float32 scalar ``mean|m[:, 1:] - m[:, :-1]| + mean|m[:, :, 1:] - m[:, :, :-1]|`` (means over every element).
    """
    _check_masks(masks)
    m = masks.astype(jnp.float32)
    return jnp.mean(jnp.abs(m[:, 1:] - m[:, :-1])) + jnp.mean(jnp.abs(m[:, :, 1:] - m[:, :, :-1]))


def mask_loss(logits: Array, labels: Array, masks: Array, *, area: float = 0.2, total_variation_weight: float = 0.1,
              area_loss: Literal["abs", "squared"] = "abs") -> tuple[Array, dict[str, Array]]:
    """Phase-2 objective of the mask generator (``train2.train_step``).

    ``CE(f(x * m), y) + mean_i(relu(mean_hwc(m_i) - area)) + total_variation_weight * TV(m)`` (the relu squared
    with ``area_loss="squared"``).

    Args:
      logits: [batch, num_classes] the frozen classifier's logits on ``images * masks``.
      labels: int [batch].
      masks: [batch, height, width, 1] the generator's soft masks in [0, 1].
      area: target area fraction.
      total_variation_weight: weight of :func:`total_variation`.
      area_loss: ``"abs"`` or ``"squared"``.

    Returns:
      ``(loss, parts)``: float32 scalar and ``{"cross_entropy", "area_penalty", "total_variation", "mask_area"}``.

    Raises:
      ValueError: on mismatched shapes or an unknown ``area_loss``.
    """
    _check_masks(masks)
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or masks.shape[0] != logits.shape[0]:
        raise ValueError(f"logits [batch, classes], labels [batch], masks [batch, ...] must agree; got "
                         f"{logits.shape}, {labels.shape}, {masks.shape}")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    per_image = jnp.mean(masks.astype(jnp.float32), axis=(1, 2, 3))
    excess = jax.nn.relu(per_image - area)
    if area_loss == "abs":
        area_term = jnp.mean(excess)
    elif area_loss == "squared":
        area_term = jnp.mean(excess ** 2)
    else:
        raise ValueError(f"area_loss must be 'abs' or 'squared'; got {area_loss!r}")
    tv = total_variation(masks)
    loss = ce + area_term + total_variation_weight * tv
    return loss, {"cross_entropy": ce, "area_penalty": area_term, "total_variation": tv,
                  "mask_area": jnp.mean(per_image)}


def otsu_threshold(values: Array, nbins: int = 256) -> Array:
    """Otsu's threshold of each row, as ``skimage.filters.threshold_otsu`` computes it, batched.

    Otsu, "A threshold selection method from gray-level histograms", IEEE TSMC 1979: the histogram of each row
    (``nbins`` equal bins over ``[min, max]``, the top value in the last bin, as ``numpy.histogram``) is split at
    the bin boundary maximising the between-class variance ``w1 * w2 * (mu1 - mu2)^2``; the threshold is the
    centre of the last bin of the lower class (scikit-image's convention). A constant row's threshold is its value.

    Args:
      values: [batch, n] float.
      nbins: number of histogram bins.

    Returns:
      float32 [batch] thresholds; ``values >= threshold`` is the foreground.
    """
    if values.ndim != 2:
        raise ValueError(f"values must be [batch, n]; got shape {values.shape}")
    v = values.astype(jnp.float32)
    lo = jnp.min(v, axis=1, keepdims=True)
    hi = jnp.max(v, axis=1, keepdims=True)
    span = hi - lo
    safe = jnp.where(span > 0, span, 1.0)
    idx = jnp.clip(jnp.floor((v - lo) * (nbins / safe)), 0, nbins - 1).astype(jnp.int32)
    counts = jax.vmap(lambda i: jnp.zeros(nbins, jnp.float32).at[i].add(1.0))(idx)
    edges = lo + jnp.arange(nbins + 1, dtype=jnp.float32)[None, :] * (span / nbins)
    centers = (edges[:, :-1] + edges[:, 1:]) / 2
    weight1 = jnp.cumsum(counts, axis=1)
    weight2 = jnp.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    mean1 = jnp.cumsum(counts * centers, axis=1) / jnp.maximum(weight1, 1.0)
    mean2 = jnp.cumsum((counts * centers)[:, ::-1], axis=1)[:, ::-1] / jnp.maximum(weight2, 1.0)
    variance12 = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    best = jnp.argmax(variance12, axis=1)
    threshold = jnp.take_along_axis(centers, best[:, None], axis=1)[:, 0]
    return jnp.where(span[:, 0] > 0, threshold, lo[:, 0])


def binarize_masks(masks: Array, method: str, *, area: float = 0.2, nbins: int = 256) -> Array:
    """Binarises each mask on its own (``train3.binarize_mask`` applied image by image).

    Args:
      masks: [batch, height, width, channels] float soft masks.
      method: ``"otsu"`` (``m >= otsu_threshold(m)``), ``"0.5"`` (``m >= 0.5``), ``"quantile"``
        (``m >= quantile(m, 1 - area)``, linear interpolation as ``numpy.quantile``) or ``"none"`` (unchanged).
      area: the quantile's area fraction.
      nbins: Otsu's histogram bins.

    Returns:
      float32 masks of the same shape, in {0, 1} (``"none"``: the input as float32).

    Raises:
      ValueError: on an unknown method or a mask that is not rank 4.
    """
    _check_masks(masks)
    m = masks.astype(jnp.float32)
    flat = m.reshape(m.shape[0], -1)
    if method == "otsu":
        threshold = otsu_threshold(flat, nbins)
    elif method == "0.5":
        threshold = jnp.full((m.shape[0],), 0.5, jnp.float32)
    elif method == "quantile":
        threshold = jnp.quantile(flat, 1.0 - area, axis=1)
    elif method == "none":
        return m
    else:
        raise ValueError(f"binarize method must be one of {BINARIZE_METHODS}; got {method!r}")
    return (m >= threshold[:, None, None, None]).astype(jnp.float32)


def heuristic_mask(images: Array) -> Array:
    """The code's ``heuristic`` mask: ``m = x > 0`` element-wise (per channel), for objects on a black background.

    Args:
      images: [batch, height, width, channels] float in [0, 1].

    Returns:
      float32 [batch, height, width, channels] in {0, 1}.
    """
    _check_masks(images, "images")
    return (images > 0).astype(jnp.float32)


def composite(images: Array, masks: Array, backgrounds: Array) -> Array:
    """``x~ = x * m + b * (1 - m)``: the object on a new background.

    Args:
      images: [batch, height, width, channels] float.
      masks: [batch, height, width, 1 or channels] float in [0, 1] (1 on the object).
      backgrounds: [batch, height, width, channels] float (or anything broadcasting to it, e.g. a scalar).

    Returns:
      [batch, height, width, channels] float32.

    Raises:
      ValueError: if ``masks`` does not match the images' batch and spatial shape.
    """
    _check_masks(images, "images")
    _check_masks(masks)
    if masks.shape[:3] != images.shape[:3] or masks.shape[3] not in (1, images.shape[3]):
        raise ValueError(f"masks must be [batch, height, width, 1 or channels] matching images {images.shape}; "
                         f"got {masks.shape}")
    m = masks.astype(jnp.float32)
    return images.astype(jnp.float32) * m + jnp.asarray(backgrounds, jnp.float32) * (1.0 - m)


def brightness_penalty(backgrounds: Array, limit: float = 0.5) -> Array:
    """``relu(mean(b) - limit)`` over the whole batch (``train3.train_step``, one-channel data).

    Args:
      backgrounds: [batch, height, width, channels] float in [0, 1].

    Returns:
      float32 scalar.
    """
    return jax.nn.relu(jnp.mean(backgrounds.astype(jnp.float32)) - limit)


def adversarial_losses(logits: Array, labels: Array, backgrounds: Array | None = None, *,
                       penalise_brightness: bool = False, limit: float = 0.5) -> tuple[Array, Array]:
    """Phase-3 losses: the classifier's ``CE(f(x~), y)`` and the generator's ``-CE(f(x~), y) [+ penalty]``.

    Args:
      logits: [batch, num_classes] logits on the composites.
      labels: int [batch].
      backgrounds: the generated backgrounds (needed with ``penalise_brightness``).
      penalise_brightness: add :func:`brightness_penalty` to the generator's loss.
      limit: its limit.

    Returns:
      ``(classifier_loss, generator_loss)``, float32 scalars; each player minimises its own.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    generator_loss = -ce
    if penalise_brightness:
        if backgrounds is None:
            raise ValueError("the brightness penalty needs the backgrounds")
        generator_loss = generator_loss + brightness_penalty(backgrounds, limit)
    return ce, generator_loss


@jax.custom_vjp
def gradient_reversal(x: Array) -> Array:
    """Identity forward, negated gradient backward (Ganin & Lempitsky 2015's gradient reversal layer).

    Placed on the generated backgrounds, one backward pass of ``CE + penalty`` gives the classifier
    ``dCE/dtheta_f`` and the generator ``-dCE/dtheta_b + dpenalty/dtheta_b``: the gradients of both players' own
    losses (:func:`adversarial_losses`), from one forward pass.
    """
    return x


def _reversal_fwd(x):
    return x, None


def _reversal_bwd(_, g):
    return (jax.tree.map(jnp.negative, g),)


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Models, optimizers and state.


@dataclasses.dataclass(frozen=True)
class BackgroundInvarianceModels:
    """The linen modules of the method (static: not part of the state).

    Attributes:
      classifier: ``f``, ``apply(variables, images, train=...) -> logits [batch, num_classes]``.
      mask_generator: ``f_m``, ``apply(variables, images) -> masks [batch, height, width, 1]`` in [0, 1]; ``None``
        with the heuristic mask.
      background_generator: ``f_b``, ``apply(variables, z) -> backgrounds [batch, height, width, channels]``;
        ``None`` unless the backgrounds are adversarial.
    """

    classifier: nn.Module
    mask_generator: nn.Module | None = None
    background_generator: nn.Module | None = None


@flax.struct.dataclass
class BackgroundInvarianceState:
    """Everything the three phases update, as one pytree (replicate it over the mesh; checkpoint it with orbax).

    Attributes:
      step: int32 scalar, updates done over all phases (the step keys are ``fold_in(key, step)``).
      params: ``{"classifier": ..., "mask_generator": ..., "background_generator": ...}`` the ``params``
        collections of the models present.
      batch_stats: the classifier's ``batch_stats`` collection (``{}`` for models without BatchNorm).
      opt_state: optax states, same keys as ``params``.
    """

    step: Array
    params: dict[str, Any]
    batch_stats: Any
    opt_state: dict[str, Any]


def make_models(num_classes: int, image_shape: tuple[int, int, int],
                config: BackgroundInvarianceConfig = BackgroundInvarianceConfig(), *,
                classifier: nn.Module | None = None) -> BackgroundInvarianceModels:
    """The code's networks for ``image_shape``: :class:`VanillaCNN` (unless ``classifier`` is given), a
    :class:`UNet` when ``config.mask == "unet"``, a :class:`BackgroundGenerator` when the backgrounds are
    adversarial.

    Raises:
      ValueError: if the generator cannot produce ``image_shape`` with ``config.tiles`` tiles.
    """
    image_shape = tuple(int(s) for s in image_shape)
    return BackgroundInvarianceModels(
        classifier=classifier if classifier is not None else VanillaCNN(num_classes),
        mask_generator=UNet() if config.mask == "unet" else None,
        background_generator=(BackgroundGenerator(image_shape, config.tiles)
                              if config.background == "adversarial" else None))


def make_optimizers(config: BackgroundInvarianceConfig = BackgroundInvarianceConfig()
                    ) -> dict[str, optax.GradientTransformation]:
    """Adam for each model (Keras defaults b1 0.9, b2 0.999, eps 1e-7): classifier 1e-3, U-Net and generator 1e-5."""
    return {
        "classifier": optax.adam(config.classifier_learning_rate, eps=config.adam_eps),
        "mask_generator": optax.adam(config.mask_learning_rate, eps=config.adam_eps),
        "background_generator": optax.adam(config.generator_learning_rate, eps=config.adam_eps),
    }


def _roles(models: BackgroundInvarianceModels) -> list[str]:
    return [r for r in ("classifier", "mask_generator", "background_generator") if getattr(models, r) is not None]


def init_state(models: BackgroundInvarianceModels, optimizers: Mapping[str, optax.GradientTransformation],
               image_shape: tuple[int, int, int], key: Array, *,
               classifier_variables: Any | None = None) -> BackgroundInvarianceState:
    """A fresh state (jit it with ``out_shardings`` replicated to build it on the devices).

    Args:
      models: the modules.
      optimizers: optax optimizers keyed like :func:`make_optimizers` (only the models present are used).
      image_shape: (height, width, channels) of one input.
      key: initialisation key (one split per model).
      classifier_variables: optional ``{"params", "batch_stats"}`` to start the classifier from (e.g. phase 1's
        result, or imported weights).

    Returns:
      A :class:`BackgroundInvarianceState` with ``step = 0``.

    Raises:
      KeyError: if an optimizer is missing for a model present.
    """
    image_shape = tuple(int(s) for s in image_shape)
    k_f, k_m, k_b = jax.random.split(key, 3)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    params, opt_state = {}, {}
    if classifier_variables is None:
        classifier_variables = models.classifier.init(k_f, x, train=False)
    params["classifier"] = classifier_variables["params"]
    batch_stats = classifier_variables.get("batch_stats", {})
    if models.mask_generator is not None:
        params["mask_generator"] = models.mask_generator.init(k_m, x)["params"]
    if models.background_generator is not None:
        gen = models.background_generator
        z = jnp.zeros((1, *background_noise_shape(gen.image_shape, gen.tiles)), jnp.float32)
        params["background_generator"] = models.background_generator.init(k_b, z)["params"]
    for role in _roles(models):
        if role not in optimizers:
            raise KeyError(f"no optimizer for {role!r}; got {sorted(optimizers)}")
        opt_state[role] = optimizers[role].init(params[role])
    return BackgroundInvarianceState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                                     opt_state=opt_state)


# ----------------------------------------------------------------------------------------------------------------
# Update steps.


def _classifier_forward(model: nn.Module, params: Any, batch_stats: Any, images: Array, key: Array,
                        train: bool) -> tuple[Array, Any]:
    """``(logits, new_batch_stats)``; BatchNorm statistics are updated only in train mode."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    if train and batch_stats:
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": key})
        return logits, updates["batch_stats"]
    return model.apply(variables, images, train=train, rngs={"dropout": key}), batch_stats


def _check_batch(batch: Mapping[str, Array]) -> tuple[Array, Array]:
    images, labels = batch["image"], batch["label"]
    _check_masks(images, "batch['image']")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"batch['label'] must be [{images.shape[0]}]; got {labels.shape}")
    return images, labels


def _apply_update(optimizer: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_classifier_step(models: BackgroundInvarianceModels,
                         optimizers: Mapping[str, optax.GradientTransformation]) -> Step:
    """Phase 1 (``train1.py``): the classifier alone, softmax cross-entropy on the batch.

    Returns:
      ``step(state, batch, key) -> (state, metrics)``: ``batch = {"image": [batch, height, width, channels]
      float32 in [0, 1], "label": [batch] int32}``; only ``params["classifier"]`` (and its batch statistics and
      optimizer state) change. Metrics: ``loss``, ``accuracy``.
    """
    model, optimizer = models.classifier, optimizers["classifier"]

    def step(state: BackgroundInvarianceState, batch: Mapping[str, Array], key: Array):
        images, labels = _check_batch(batch)
        key = jax.random.fold_in(key, state.step)

        def loss_fn(params):
            logits, stats = _classifier_forward(model, params, state.batch_stats, images, key, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, stats)

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["classifier"])
        params, opt_state = _apply_update(optimizer, grads, state.opt_state["classifier"],
                                          state.params["classifier"])
        new = state.replace(step=state.step + 1, params={**state.params, "classifier": params}, batch_stats=stats,
                            opt_state={**state.opt_state, "classifier": opt_state})
        return new, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    return step


def make_mask_step(models: BackgroundInvarianceModels, optimizers: Mapping[str, optax.GradientTransformation],
                   config: BackgroundInvarianceConfig = BackgroundInvarianceConfig()) -> Step:
    """Phase 2 (``train2.py``): the U-Net learns the smallest, smoothest mask that keeps the frozen classifier right.

    Loss :func:`mask_loss` of ``f(x * f_m(x))``; only ``params["mask_generator"]`` and its optimizer state change.
    Metrics: ``loss``, ``cross_entropy``, ``area_penalty``, ``total_variation``, ``mask_area``, ``accuracy``
    (of the frozen classifier on ``x * m``).

    Raises:
      ValueError: if ``models`` has no mask generator (the heuristic mask needs no phase 2).
    """
    if models.mask_generator is None:
        raise ValueError("phase 2 trains the mask generator; models.mask_generator is None (heuristic masks)")
    classifier, unet, optimizer = models.classifier, models.mask_generator, optimizers["mask_generator"]

    def step(state: BackgroundInvarianceState, batch: Mapping[str, Array], key: Array):
        images, labels = _check_batch(batch)
        key = jax.random.fold_in(key, state.step)

        def loss_fn(params):
            masks = unet.apply({"params": params}, images)
            logits, _ = _classifier_forward(classifier, state.params["classifier"], state.batch_stats,
                                            images * masks, key, train=False)
            loss, parts = mask_loss(logits, labels, masks, area=config.area,
                                    total_variation_weight=config.total_variation, area_loss=config.area_loss)
            parts["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
            return loss, parts

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["mask_generator"])
        params, opt_state = _apply_update(optimizer, grads, state.opt_state["mask_generator"],
                                          state.params["mask_generator"])
        new = state.replace(step=state.step + 1, params={**state.params, "mask_generator": params},
                            opt_state={**state.opt_state, "mask_generator": opt_state})
        return new, {"loss": loss, **parts}

    return step


def phase3_masks(models: BackgroundInvarianceModels, state: BackgroundInvarianceState, images: Array,
                 config: BackgroundInvarianceConfig = BackgroundInvarianceConfig()) -> Array:
    """Phase 3's binarised masks for ``images`` (no gradient): the frozen U-Net's or the heuristic, binarised.

    Returns:
      float32 [batch, height, width, 1] (U-Net) or [batch, height, width, channels] (heuristic) in {0, 1}.
    """
    if models.mask_generator is None:
        soft = heuristic_mask(images)
    else:
        soft = models.mask_generator.apply({"params": state.params["mask_generator"]}, images)
    return jax.lax.stop_gradient(binarize_masks(soft, config.binarize, area=config.area, nbins=config.otsu_bins))


def phase3_preview(models: BackgroundInvarianceModels, state: BackgroundInvarianceState, images: Array, key: Array,
                   config: BackgroundInvarianceConfig = BackgroundInvarianceConfig()) -> dict[str, Array]:
    """What phase 3 trains on, for figures of masks and generated backgrounds along training (the poster's Fig. 4).

    Args:
      models, state: the modules and their current state.
      images: [batch, height, width, channels] float32 in [0, 1].
      key: noise key (keep it fixed across epochs to watch the same backgrounds evolve).
      config: the settings (mask source, binarisation, background source).

    Returns:
      ``{"soft_mask": [batch, height, width, 1 or channels], "mask": same, binarised, "background": [batch, height,
      width, channels], "composite": same}``, float32; ``soft_mask`` is ``x > 0`` for the heuristic mask,
      ``background`` zeros or N(0, 1) noise for the ablations.
    """
    _check_masks(images, "images")
    if models.mask_generator is None:
        soft = heuristic_mask(images)
    else:
        soft = models.mask_generator.apply({"params": state.params["mask_generator"]}, images)
    masks = binarize_masks(soft, config.binarize, area=config.area, nbins=config.otsu_bins)
    if models.background_generator is not None:
        gen = models.background_generator
        z = sample_background_noise(key, images.shape[0], images.shape[1:], gen.tiles)
        backgrounds = gen.apply({"params": state.params["background_generator"]}, z)
    elif config.background == "black":
        backgrounds = jnp.zeros(images.shape, jnp.float32)
    else:
        backgrounds = jax.random.normal(key, images.shape, jnp.float32)
    return {"soft_mask": soft.astype(jnp.float32), "mask": masks, "background": backgrounds,
            "composite": composite(images, masks, backgrounds)}


def make_adversarial_step(models: BackgroundInvarianceModels,
                          optimizers: Mapping[str, optax.GradientTransformation],
                          config: BackgroundInvarianceConfig = BackgroundInvarianceConfig()) -> Step:
    """Phase 3 (``train3.py``): the classifier and the background generator, min-max, both updated every step.

    The step: ``k_noise, k_dropout = split(fold_in(key, step))``; masks :func:`phase3_masks` (frozen U-Net or
    ``x > 0``, binarised); backgrounds ``f_b(z)``, ``z = sample_background_noise(k_noise, ...)`` per image and tile
    (or zeros / ``normal(k_noise, images.shape)`` noise for the ablations);
    composites :func:`composite`; one forward pass of the classifier in train mode; one backward pass giving the
    classifier ``dCE/dtheta_f`` and the generator the gradient of ``-CE (+ brightness penalty)``
    (:func:`gradient_reversal`); one Adam update of each.

    Returns:
      ``step(state, batch, key) -> (state, metrics)``; metrics ``classifier_loss`` (CE on the composites),
      ``generator_loss``, ``brightness_penalty``, ``accuracy`` (on the composites), ``mask_area`` (mean of the
      binary masks), ``background_mean``.

    Raises:
      ValueError: if the backgrounds are adversarial but ``models`` has no generator (or the reverse), or the mask
        source does not match ``models``.
    """
    adversarial = config.background == "adversarial"
    if adversarial != (models.background_generator is not None):
        raise ValueError(f"config.background={config.background!r} but models.background_generator is "
                         f"{'missing' if adversarial else 'set'}")
    if (config.mask == "unet") != (models.mask_generator is not None):
        raise ValueError(f"config.mask={config.mask!r} but models.mask_generator is "
                         f"{'missing' if config.mask == 'unet' else 'set'}")
    classifier, generator = models.classifier, models.background_generator

    def step(state: BackgroundInvarianceState, batch: Mapping[str, Array], key: Array):
        images, labels = _check_batch(batch)
        penalise = adversarial and config.penalise_brightness(images.shape[-1])
        key = jax.random.fold_in(key, state.step)
        k_noise, k_dropout = jax.random.split(key)
        masks = phase3_masks(models, state, images, config)
        if adversarial:
            z = sample_background_noise(k_noise, images.shape[0], images.shape[1:], generator.tiles)

        def loss_fn(classifier_params, generator_params):
            if adversarial:
                backgrounds = generator.apply({"params": generator_params}, z)
                shown = gradient_reversal(backgrounds)
            elif config.background == "black":
                backgrounds = shown = jnp.zeros(images.shape, jnp.float32)
            else:  # "noise": train3.train_step draws tf.random.normal(X.shape)
                backgrounds = shown = jax.random.normal(k_noise, images.shape, jnp.float32)
            logits, stats = _classifier_forward(classifier, classifier_params, state.batch_stats,
                                                composite(images, masks, shown), k_dropout, train=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            penalty = brightness_penalty(backgrounds, config.brightness_limit) if penalise else jnp.zeros(())
            # d/d(classifier) = dCE; d/d(generator) = -dCE + dpenalty (reversal on the backgrounds).
            return ce + penalty, (ce, penalty, logits, stats, jnp.mean(backgrounds))

        generator_params = state.params.get("background_generator", {})
        grads, (ce, penalty, logits, stats, b_mean) = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.params["classifier"], generator_params)
        params, opt_state = dict(state.params), dict(state.opt_state)
        params["classifier"], opt_state["classifier"] = _apply_update(
            optimizers["classifier"], grads[0], state.opt_state["classifier"], state.params["classifier"])
        if adversarial:
            params["background_generator"], opt_state["background_generator"] = _apply_update(
                optimizers["background_generator"], grads[1], state.opt_state["background_generator"],
                generator_params)
        new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
        metrics = {"classifier_loss": ce, "generator_loss": -ce + penalty, "brightness_penalty": penalty,
                   "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), "mask_area": jnp.mean(masks),
                   "background_mean": b_mean}
        return new, metrics

    return step


# ----------------------------------------------------------------------------------------------------------------
# The Attention baseline's second stage.


def attention_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` on every parameter of an :class:`~saliency_jax.models.AttentionCNN` except the frozen global CNN.

    ``train_att.py`` trains the global CNN first, then sets it untrainable while the local branch and the fusion
    layers train (Keras ``'adam'``: 1e-3). The global CNN's updates are zero (``optax.set_to_zero``), so the
    generic classifier step (:func:`make_classifier_step`) trains the second stage unchanged.
    """
    def labels(params):
        return {k: jax.tree.map(lambda _: "frozen" if k == "global_cnn" else "train", v) for k, v in params.items()}

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def with_global_params(attention_params: Mapping[str, Any], global_params: Any) -> dict[str, Any]:
    """The AttentionCNN's params with its ``global_cnn`` replaced by a trained :class:`VanillaCNN`'s params.

    Raises:
      ValueError: if the structures or shapes differ (e.g. a classifier trained at another image size).
    """
    current = attention_params["global_cnn"]
    a = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), current)
    b = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), global_params)
    if jax.tree.structure(a) != jax.tree.structure(b) or a != b:
        raise ValueError(f"global_params do not fit the AttentionCNN's global_cnn: expected {a}, got {b}")
    return {**attention_params, "global_cnn": global_params}
