"""Faithfulness of saliency maps: deletion / insertion, the model-randomisation sanity check, mass in a region.

Three families of checks that ask whether a map reflects what the model computes, not only what the image shows:

* **Deletion and insertion** (Petsiuk, Das, Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
  Models", BMVC 2018, Sec. 4.1): pixels are removed from the image (deletion) or added to a blurred canvas
  (insertion) in decreasing order of saliency, a fixed number per step, and the probability of the explained class
  is recorded after each step. A faithful map makes the deletion curve fall fast (low AUC) and the insertion curve
  rise fast (high AUC). :func:`deletion`, :func:`insertion`, :func:`causal_metric`, :func:`auc`.
* **Model-parameter randomisation** (Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim, "Sanity Checks for Saliency
  Maps", NeurIPS 2018, Sec. 3.1, cascading randomisation): the layers are re-initialised one after the other from
  the logits down and the map recomputed after each step; a method whose maps stay similar to the trained model's
  (Spearman rank correlation, SSIM) does not depend on what the model learnt. :func:`model_randomization`,
  :func:`spearman_correlation`, :func:`ssim`.
* **Relevance mass accuracy**: the fraction of a map's (positive) mass inside a known region (the object's mask),
  as the "relevance mass accuracy" of Arras, Osman, Samek, "CLEVR-XAI", Information Fusion 2022, and the
  "energy-based pointing game" of Wang et al., "Score-CAM", CVPR-W 2020. :func:`relevance_mass_accuracy`.

Every function is pure and jittable and works on whole batches; the model is queried on all examples of a step at
once, and the steps run inside :func:`jax.lax.map` (no Python loop over examples or steps). A model is a function
``logits_fn(images) -> logits`` as elsewhere in the library (e.g. ``functools.partial(module.apply, variables,
train=False)``); the map of :func:`model_randomization` comes from a function of the parameters.

>>> import functools, jax
>>> result = jax.jit(functools.partial(deletion, logits_fn))(images, maps)  # doctest: +SKIP
>>> result.auc  # [batch] in [0, 1]                                              # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import dm_pix as pix
import numpy as np
import scipy.ndimage
import scipy.stats

from saliency_jax.saliency.core import check_images, resize_maps, resolve_targets

Array = jax.Array

__all__ = [
    "BLUR_KERNEL_SIZE",
    "BLUR_SIGMA",
    "CausalMetricResult",
    "RandomizationResult",
    "auc",
    "causal_metric",
    "deletion",
    "gaussian_blur",
    "insertion",
    "model_randomization",
    "relevance_mass_accuracy",
    "spearman_correlation",
    "ssim",
]

#: Side of the Gaussian blur kernel of the insertion canvas (RISE code: ``klen = 11``).
BLUR_KERNEL_SIZE: int = 11
#: Standard deviation in pixels of the insertion canvas blur (RISE code: ``ksig = 5``).
BLUR_SIGMA: float = 5.0


# ---------------------------------------------------------------------------------------------------------------
# Deletion and insertion (Petsiuk et al. 2018)


class CausalMetricResult(NamedTuple):
    """The result of :func:`deletion`, :func:`insertion` or :func:`causal_metric`.

    Attributes:
      auc: [batch] float32 in [0, 1], the area under each example's curve (:func:`auc`).
      curve: [batch, num_steps + 1] float32 in [0, 1], the probability of the target class before any change
        (column 0) and after each step (the last column: every pixel changed).
      targets: [batch] int32, the class whose probability is tracked.
    """

    auc: Array
    curve: Array
    targets: Array


def auc(curve: Array) -> Array:
    """Normalised area under curves sampled at evenly spaced points of [0, 1], by the trapezoid rule.

    ``(sum_i c_i - c_0 / 2 - c_n / 2) / n`` for ``n + 1`` samples ``c_0 .. c_n`` (RISE code, ``auc``), so a curve
    that is 1 everywhere has area 1: ``sklearn.metrics.auc(np.linspace(0, 1, n + 1), curve)`` (equal to 1e-6 in
    tests/test_faithfulness.py). The sum is written out rather than ``jnp.trapezoid``: that gives the same areas to
    6e-8 but not bit for bit (a quarter of the per-image areas of 256 random 33-point curves differ in the last
    bit), and the recorded quickstart run (tests/data/recorded/digits_quickstart.json) pins them bit for bit.

    Args:
      curve: [..., n + 1] float, n >= 1.

    Returns:
      float32 [...].

    Raises:
      ValueError: if the last axis has fewer than 2 samples.
    """
    curve = jnp.asarray(curve, jnp.float32)
    if curve.ndim < 1 or curve.shape[-1] < 2:
        raise ValueError(f"curve must have at least 2 samples on its last axis; got shape {curve.shape}")
    n = curve.shape[-1] - 1
    return (jnp.sum(curve, axis=-1) - 0.5 * curve[..., 0] - 0.5 * curve[..., -1]) / n


@functools.lru_cache(maxsize=16)
def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """The RISE code's ``gkern``: a centred unit impulse smoothed by ``scipy.ndimage.gaussian_filter`` (its
    default ``reflect`` boundary folds the tails back in, so the kernel sums to 1)."""
    impulse = np.zeros((size, size), np.float64)
    impulse[size // 2, size // 2] = 1.0
    return scipy.ndimage.gaussian_filter(impulse, sigma).astype(np.float32)


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def gaussian_blur(images: Array, *, kernel_size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA) -> Array:
    """The blurred canvas of the insertion metric: each channel convolved with a Gaussian, zero padding.

    Follows the RISE code: the kernel is ``gkern(11, 5)`` (a unit impulse at the centre of an 11 x 11 array smoothed
    by ``scipy.ndimage.gaussian_filter`` with sigma 5) and ``conv2d(x, kern, padding=klen // 2)`` pads with zeros,
    so the border of the canvas darkens towards 0. (In the reference code the input was ImageNet-normalised, so 0
    there was the mean colour; pass a model input space where 0 is the "absent" value, or supply your own canvas to
    :func:`causal_metric`.) ``dm_pix.gaussian_blur`` is not used: its kernel is a truncated, renormalised Gaussian,
    whose 11 x 11, sigma 5 entries differ from RISE's (reflected tails) by up to 0.0033 (the centre weight is 0.0088),
    changing blurred [0, 1] images by up to 0.034.

    Args:
      images: [batch, height, width, channels] float.
      kernel_size: side of the square kernel in pixels (odd, >= 1).
      sigma: standard deviation in pixels (> 0).

    Returns:
      [batch, height, width, channels], the dtype of ``images``.

    Raises:
      ValueError: on a bad rank, an even or non-positive ``kernel_size`` or a non-positive ``sigma``.
      TypeError: if ``images`` is not floating point.
    """
    check_images(images)
    size = _check_positive_int("kernel_size", kernel_size)
    if size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the kernel is centred on the pixel); got {size}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a positive number of pixels; got {sigma!r}")
    channels = images.shape[-1]
    kernel = jnp.asarray(_gaussian_kernel(size, float(sigma)), images.dtype)
    kernel = jnp.tile(kernel[:, :, None, None], (1, 1, 1, channels))  # HWIO, one filter per channel
    return jax.lax.conv_general_dilated(
        images, kernel, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)


def _substrate(images: Array, substrate: Any, kernel_size: int, sigma: float) -> Array:
    if isinstance(substrate, str):
        if substrate != "blur":
            raise ValueError(f'substrate must be "blur", a number or an array broadcastable to the images; '
                             f"got {substrate!r}")
        return gaussian_blur(images, kernel_size=kernel_size, sigma=sigma)
    if isinstance(substrate, bool):
        raise ValueError(f"substrate must be \"blur\", a number or an array; got {substrate!r}")
    value = jnp.asarray(substrate, images.dtype)
    try:
        return jnp.broadcast_to(value, images.shape)
    except ValueError:
        raise ValueError(f"substrate of shape {value.shape} does not broadcast to the images' shape "
                         f"{images.shape}") from None


def _check_maps(maps: Array, images: Array, name: str = "maps") -> Array:
    batch, height, width, _ = images.shape
    if getattr(maps, "ndim", None) != 3 or maps.shape[0] != batch:
        raise ValueError(f"{name} must be [batch={batch}, h, w] (one map per image); got shape "
                         f"{getattr(maps, 'shape', None)}")
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point; got dtype {maps.dtype}")
    return resize_maps(maps, (height, width))


def causal_metric(
    logits_fn: Callable[[Array], Array],
    images: Array,
    maps: Array,
    targets: Array | int | None = None,
    *,
    mode: Literal["deletion", "insertion"],
    substrate: str | float | Array,
    pixels_per_step: int | None = None,
    steps_per_call: int = 8,
    blur_kernel_size: int = BLUR_KERNEL_SIZE,
    blur_sigma: float = BLUR_SIGMA,
) -> CausalMetricResult:
    """Deletion or insertion curves and their AUC for a batch (Petsiuk et al. 2018, Sec. 4.1; RISE code
    ``CausalMetric``).

    The pixels of each image are ordered by decreasing saliency (ties in row-major order). Deletion starts from the
    image and replaces the first ``k * pixels_per_step`` pixels (all channels) by the ``substrate``; insertion starts
    from the substrate and puts back the first ``k * pixels_per_step`` pixels of the image; ``k = 0 .. num_steps``
    with ``num_steps = ceil(height * width / pixels_per_step)``, so the last step has every pixel changed. The curve
    holds ``softmax(logits_fn(x))[target]`` after each step and its :func:`auc` treats the steps as evenly spaced
    in [0, 1] (as the code does, also when the last step changes fewer pixels).

    All ``(num_steps + 1) * batch`` model queries run inside one :func:`jax.lax.map` over
    ``ceil((num_steps + 1) / steps_per_call)`` chunks of (nearly) equal size, at most ``steps_per_call`` steps each;
    each call of ``logits_fn`` sees ``chunk * batch`` images (the last chunk may hold steps past the last one, whose
    results are dropped).

    Args:
      logits_fn: ``images [n, height, width, channels] -> logits [n, num_classes]`` in inference mode.
      images: [batch, height, width, channels] float, as ``logits_fn`` takes them.
      maps: [batch, h, w] float saliency maps; bilinearly resized to (height, width) when of another size (as
        :func:`~saliency_jax.saliency.resize_maps`). Only the order of the values matters; NaN gives an undefined
        order.
      targets: the class to track: ``None`` (default, as the reference code) the class predicted on the unchanged
        image; an ``int``; or int [batch].
      mode: ``"deletion"`` or ``"insertion"``.
      substrate: what removed pixels become (deletion) or the canvas pixels are inserted into (insertion):
        ``"blur"`` (:func:`gaussian_blur` of the image), a number (e.g. ``0.0``), or an array broadcastable to
        ``images`` (e.g. a per-channel mean colour [channels]).
      pixels_per_step: pixels changed per step; default the image width (the paper's 224 on 224 x 224 images).
      steps_per_call: the most steps evaluated together (memory vs. speed; the result does not depend on it).
      blur_kernel_size, blur_sigma: the blur of ``substrate="blur"`` (RISE code: 11 and 5).

    Returns:
      A :class:`CausalMetricResult`: ``auc`` [batch], ``curve`` [batch, num_steps + 1], ``targets`` [batch].

    Raises:
      ValueError: on bad shapes (naming the argument), an unknown ``mode`` or ``substrate``, a non-positive
        ``pixels_per_step`` / ``steps_per_call``, or out-of-range static targets.
      TypeError: if ``images`` or ``maps`` are not floating point or targets are not integers.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f'mode must be "deletion" or "insertion"; got {mode!r}')
    check_images(images)
    batch, height, width, _ = images.shape
    maps = _check_maps(maps, images)
    num_pixels = height * width
    step = width if pixels_per_step is None else _check_positive_int("pixels_per_step", pixels_per_step)
    chunk = _check_positive_int("steps_per_call", steps_per_call)
    num_steps = -(-num_pixels // step)
    num_evals = num_steps + 1
    num_chunks = -(-num_evals // min(chunk, num_evals))
    chunk = -(-num_evals // num_chunks)  # the steps spread evenly over the calls: at most num_chunks - 1 padded

    # The predicted class needs the logits; explicit targets only need their shape.
    logits = logits_fn(images) if targets is None else jax.eval_shape(logits_fn, images)
    if getattr(logits, "ndim", None) != 2 or logits.shape[0] != batch:
        raise ValueError(f"logits_fn must return [batch={batch}, num_classes]; got shape {getattr(logits, 'shape', None)}")
    targets = resolve_targets(targets, logits)
    canvas = _substrate(images, substrate, blur_kernel_size, blur_sigma)
    start, finish = (images, canvas) if mode == "deletion" else (canvas, images)

    # rank[b, p]: position of pixel p in the order of decreasing saliency (0 = most salient).
    flat = maps.reshape(batch, num_pixels)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1).reshape(batch, height, width, 1)

    def evaluate(steps):  # steps: int32 [chunk] -> probabilities [chunk, batch]
        changed = rank[None] < (steps * step)[:, None, None, None, None]  # [chunk, batch, h, w, 1]
        x = jnp.where(changed, finish[None], start[None]).reshape(chunk * batch, *images.shape[1:])
        probs = jax.nn.softmax(logits_fn(x).astype(jnp.float32), axis=-1).reshape(chunk, batch, -1)
        return jnp.take_along_axis(probs, targets[None, :, None], axis=-1)[..., 0]

    steps = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk)
    curve = jax.lax.map(evaluate, steps).reshape(num_chunks * chunk, batch)[:num_evals].T
    return CausalMetricResult(auc=auc(curve), curve=curve, targets=targets)


def deletion(
    logits_fn: Callable[[Array], Array],
    images: Array,
    maps: Array,
    targets: Array | int | None = None,
    *,
    substrate: str | float | Array = 0.0,
    pixels_per_step: int | None = None,
    steps_per_call: int = 8,
    blur_kernel_size: int = BLUR_KERNEL_SIZE,
    blur_sigma: float = BLUR_SIGMA,
) -> CausalMetricResult:
    """The deletion metric (Petsiuk et al. 2018, Sec. 4.1): remove the most salient pixels first; lower AUC is
    better.

    Removed pixels become ``substrate``, by default the constant 0 (the reference code's ``torch.zeros_like``, on
    its normalised input, where 0 was the ImageNet mean colour: pass the dataset's mean colour [channels] to
    reproduce that on [0, 1] images); ``substrate="blur"`` uses the blurred image instead. See
    :func:`causal_metric` for the arguments, result and errors.
    """
    return causal_metric(logits_fn, images, maps, targets, mode="deletion", substrate=substrate,
                         pixels_per_step=pixels_per_step, steps_per_call=steps_per_call,
                         blur_kernel_size=blur_kernel_size, blur_sigma=blur_sigma)


def insertion(
    logits_fn: Callable[[Array], Array],
    images: Array,
    maps: Array,
    targets: Array | int | None = None,
    *,
    substrate: str | float | Array = "blur",
    pixels_per_step: int | None = None,
    steps_per_call: int = 8,
    blur_kernel_size: int = BLUR_KERNEL_SIZE,
    blur_sigma: float = BLUR_SIGMA,
) -> CausalMetricResult:
    """The insertion metric (Petsiuk et al. 2018, Sec. 4.1): insert the most salient pixels first into a canvas;
    higher AUC is better.

    The canvas is by default the blurred image (:func:`gaussian_blur`, as in the paper and its code); a number or
    an array (e.g. ``0.0``, a constant canvas) is the other option. See :func:`causal_metric` for the arguments,
    result and errors.
    """
    return causal_metric(logits_fn, images, maps, targets, mode="insertion", substrate=substrate,
                         pixels_per_step=pixels_per_step, steps_per_call=steps_per_call,
                         blur_kernel_size=blur_kernel_size, blur_sigma=blur_sigma)


# ---------------------------------------------------------------------------------------------------------------
# Similarity of maps: Spearman rank correlation and SSIM


def _average_ranks(values: Array) -> Array:
    """Ranks 1..n along the last axis, ties given their average rank: ``scipy.stats.rankdata`` on the host (a
    :func:`jax.pure_callback`, so it also runs under ``jit`` and ``vmap``)."""

    def rank(x):
        return scipy.stats.rankdata(np.asarray(x), method="average", axis=-1).astype(np.float32)

    return jax.pure_callback(rank, jax.ShapeDtypeStruct(values.shape, jnp.float32), values,
                             vmap_method="expand_dims")


def spearman_correlation(a: Array, b: Array) -> Array:
    """Spearman rank correlation between paired maps, per example (``scipy.stats.spearmanr`` of each pair).

    The ranks come from ``scipy.stats.rankdata`` (ties get average ranks), computed on the host through
    :func:`jax.pure_callback` (under ``jit`` on an accelerator the maps are copied to the host); their Pearson
    correlation is computed in JAX.

    Args:
      a, b: [batch, ...] float, the same shape; each example is flattened.

    Returns:
      float32 [batch] in [-1, 1]; NaN where either map is constant (no ranking: the correlation is undefined, as
      in SciPy).

    Raises:
      ValueError: if the shapes differ or there is no batch axis.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a and b must be [batch, ...] of one shape; got {a.shape} and {b.shape}")
    ranks_a = _average_ranks(a.reshape(a.shape[0], -1).astype(jnp.float32))
    ranks_b = _average_ranks(b.reshape(b.shape[0], -1).astype(jnp.float32))
    ranks_a = ranks_a - jnp.mean(ranks_a, axis=-1, keepdims=True)
    ranks_b = ranks_b - jnp.mean(ranks_b, axis=-1, keepdims=True)
    numerator = jnp.sum(ranks_a * ranks_b, axis=-1)
    denominator = jnp.sqrt(jnp.sum(ranks_a ** 2, axis=-1) * jnp.sum(ranks_b ** 2, axis=-1))
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, jnp.clip(numerator / safe, -1.0, 1.0), jnp.nan)


def ssim(a: Array, b: Array, *, data_range: float = 1.0, window_size: int = 7, k1: float = 0.01,
         k2: float = 0.03) -> Array:
    """Mean structural similarity of paired single-channel maps, per example (Wang, Bovik, Sheikh, Simoncelli,
    "Image quality assessment: from error visibility to structural similarity", IEEE TIP 2004, Eq. 13).

    Matches ``skimage.metrics.structural_similarity(a, b, data_range=data_range)`` with its defaults, the SSIM of
    the sanity-check notebooks: local means, variances and covariance over ``window_size`` x ``window_size``
    uniform windows, sample (``n - 1``) covariance, ``C1 = (k1 * data_range)^2``, ``C2 = (k2 * data_range)^2``,
    averaged over the windows that lie inside the map. Computed by ``dm_pix.ssim`` with a uniform window filter
    (``VALID``: the windows inside the map, the set scikit-image averages after cropping its border) and
    ``k2 * sqrt((n - 1) / n)``, ``n = window_size^2``: dm-pix's population (co)variances are the sample ones times
    ``(n - 1) / n``, and SSIM's covariance factor is unchanged when ``C2`` is scaled by the same factor.

    Args:
      a, b: [batch, height, width] float, the same shape, height and width >= ``window_size``.
      data_range: the range of the values (1 for maps in [0, 1]).
      window_size: odd side of the window (>= 3).
      k1, k2: the stabilising constants.

    Returns:
      float32 [batch] in [-1, 1]; 1 for identical maps.

    Raises:
      ValueError: if the shapes differ or are not [batch, h, w], a map is smaller than the window, or
        ``window_size`` is even or < 3.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"a and b must be [batch, height, width] of one shape; got {a.shape} and {b.shape}")
    win = _check_positive_int("window_size", window_size, 3)
    if win % 2 == 0:
        raise ValueError(f"window_size must be odd; got {win}")
    if min(a.shape[1:]) < win:
        raise ValueError(f"maps of {a.shape[1]}x{a.shape[2]} pixels are smaller than the SSIM window ({win}x{win}); "
                         "resize them (saliency_jax.saliency.resize_maps) or pass a smaller window_size")

    def window_mean(x):  # [batch, h, w, 1] -> mean over each win x win window inside the map
        summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, win, win, 1), (1, 1, 1, 1), "VALID")
        return summed / (win * win)

    n = win * win
    return pix.ssim(a[..., None], b[..., None], max_val=data_range, k1=k1, k2=k2 * math.sqrt((n - 1) / n),
                    filter_fn=window_mean)


def _abs_max_normalize(maps: Array) -> Array:
    """``|m| / max |m|`` per example (the sanity-check code's ``abs_grayscale_norm``); an all-zero map stays 0."""
    magnitude = jnp.abs(maps.astype(jnp.float32))
    top = jnp.max(magnitude, axis=(1, 2), keepdims=True)
    return jnp.where(top > 0, magnitude / jnp.where(top > 0, top, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Cascading model-parameter randomisation (Adebayo et al. 2018)


class RandomizationResult(NamedTuple):
    """The result of :func:`model_randomization`; row ``k - 1`` of each metric is step ``k``, which has
    ``layers[:k]`` re-initialised (a NamedTuple of arrays, so it can leave ``jax.jit``).

    Attributes:
      spearman: [num_layers, batch] float32, Spearman rank correlation between the map of the trained model and the
        map after each step (signed maps: the code's "no abs" variant); NaN where a map is constant.
      spearman_abs: [num_layers, batch] float32, the same on ``|map|`` (the paper's "rank correlation (ABS)").
      ssim: [num_layers, batch] float32, :func:`ssim` between the maps normalised by ``|m| / max |m|``
        (data range 1); NaN when ``ssim_window`` is None.
      maps: [num_layers + 1, batch, h, w] float32, the maps of the trained model (index 0) and after each step.
    """

    spearman: Array
    spearman_abs: Array
    ssim: Array
    maps: Array


def _path_names(path) -> tuple[str, ...]:
    names = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                names.append(str(getattr(entry, attribute)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def _layer_ranks(params: Any, layers: Sequence[str]) -> list[int]:
    """For each leaf of ``params`` (in ``jax.tree`` order) the index of the first layer path containing it, or
    ``len(layers)`` when no listed layer contains it (never re-initialised)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [_path_names(path) for path, _ in leaves]
    ranks = [len(layers)] * len(leaves)
    for index, layer in enumerate(layers):
        prefix = tuple(p for p in layer.split("/") if p)
        hits = [i for i, name in enumerate(names) if name[:len(prefix)] == prefix]
        if not hits:
            tops = sorted({"/".join(name[:2]) for name in names})
            raise ValueError(f"layer {layer!r} matches no parameter; parameter paths start with {tops} (pass "
                             "variables['params'], and '/'-joined module paths such as 'conv3' or 'block3/conv')")
        for i in hits:
            ranks[i] = min(ranks[i], index)
    return ranks


def model_randomization(
    map_fn: Callable[[Any, Array, Any], Array],
    params: Any,
    random_params: Any,
    layers: Sequence[str],
    images: Array,
    targets: Array | int | None = None,
    *,
    ssim_window: int | None = 7,
) -> RandomizationResult:
    """The cascading model-parameter randomisation test (Adebayo et al. 2018, Sec. 3.1 and Fig. 2).

    Step ``k = 1 .. len(layers)`` replaces the parameters of ``layers[:k]`` (from the logits down: list the top
    layer first) by their values in ``random_params`` and recomputes the maps; each step's maps are compared with
    the trained model's (step 0) per example. Re-initialising means drawing the layer again from its own
    initialiser, as the authors' code (``tf.initialize_variables``) does: pass ``random_params =
    module.init(other_key, images)["params"]``. Non-parameter state (BatchNorm statistics) stays as trained, since
    the code re-initialises trainable variables only: ``map_fn`` closes over it.

    The steps run inside :func:`jax.lax.map`; at step ``k`` every parameter leaf is
    ``where(k > rank(leaf), random, trained)`` (``rank`` = index of the first listed layer holding the leaf), so no
    copies of the parameter tree are stacked.

    Similarity follows the authors' notebooks: Spearman rank correlation of the flattened maps with and without
    absolute values (``scipy.stats.spearmanr``), and SSIM of the maps scaled by ``|m| / max |m|``.

    Args:
      map_fn: ``(params, images, targets) -> maps [batch, h, w]`` float, any saliency method of the model
        with these parameters (e.g. ``lambda p, x, t: grad_cam(linen_layer(module, {"params": p, **state},
        "conv3", train=False), x, t)``).
      params: the trained parameter pytree (``variables["params"]`` of a linen model).
      random_params: a pytree of the same structure and shapes with re-initialised values.
      layers: module paths (``"/"``-joined, as :func:`~saliency_jax.saliency.linen_layer`: ``"fc"``, ``"conv3"``,
        ``"block3/conv"``), top (logits) first; each must hold at least one leaf of ``params``.
      images: [batch, height, width, channels] float.
      targets: passed to ``map_fn`` unchanged at every step. Give the classes explicitly (labels or the trained
        model's predictions) so that every step explains the same class; ``None`` lets each step's model pick its
        own predicted class.
      ssim_window: SSIM window side (scikit-image's default 7); None skips SSIM (maps smaller than the window).

    Returns:
      A :class:`RandomizationResult`.

    Raises:
      ValueError: if ``layers`` is empty or a path matches no parameter (listing the available ones), the two trees
        differ in structure or leaf shapes, ``map_fn`` does not return [batch, h, w], or the maps are smaller than
        ``ssim_window``.
    """
    check_images(images)
    if isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be a non-empty sequence of module paths, top layer first; got {layers!r}")
    layers = tuple(str(layer) for layer in layers)
    trained, treedef = jax.tree_util.tree_flatten(params)
    random, random_treedef = jax.tree_util.tree_flatten(random_params)
    if treedef != random_treedef:
        raise ValueError(f"random_params must have the structure of params; got {random_treedef} vs {treedef}")
    for path_leaf, a, b in zip(jax.tree_util.tree_flatten_with_path(params)[0], trained, random):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"random_params leaf {'/'.join(_path_names(path_leaf[0]))} has shape {jnp.shape(b)}, "
                             f"params has {jnp.shape(a)}")
    ranks = _layer_ranks(params, layers)
    batch = images.shape[0]

    def maps_at(k):
        leaves = [jnp.where(k > rank, r, t) for t, r, rank in zip(trained, random, ranks)]
        maps = map_fn(jax.tree_util.tree_unflatten(treedef, leaves), images, targets)
        if getattr(maps, "ndim", None) != 3 or maps.shape[0] != batch:
            raise ValueError(f"map_fn must return maps [batch={batch}, h, w]; got shape {getattr(maps, 'shape', None)}")
        return maps.astype(jnp.float32)

    maps = jax.lax.map(maps_at, jnp.arange(len(layers) + 1, dtype=jnp.int32))  # [steps + 1, batch, h, w]
    reference = jnp.broadcast_to(maps[0], maps[1:].shape).reshape(-1, *maps.shape[2:])
    randomized = maps[1:].reshape(-1, *maps.shape[2:])
    shape = (len(layers), batch)
    spearman = spearman_correlation(reference, randomized).reshape(shape)
    spearman_abs = spearman_correlation(jnp.abs(reference), jnp.abs(randomized)).reshape(shape)
    if ssim_window is None:
        similarity = jnp.full(shape, jnp.nan, jnp.float32)
    else:
        similarity = ssim(_abs_max_normalize(reference), _abs_max_normalize(randomized),
                          window_size=ssim_window).reshape(shape)
    return RandomizationResult(spearman=spearman, spearman_abs=spearman_abs, ssim=similarity,
                               maps=maps)


# ---------------------------------------------------------------------------------------------------------------
# Mass of the map inside a known region


def relevance_mass_accuracy(maps: Array, masks: Array) -> Array:
    """Fraction of each map's positive mass inside a region: ``sum(max(m, 0) * mask) / sum(max(m, 0))``.

    The relevance mass accuracy of Arras et al. 2022 (CLEVR-XAI, Sec. 4.2, positive relevance only) and the
    energy-based pointing game of Wang et al. 2020 (Score-CAM). Maps are clipped at 0 first, so negative evidence
    neither adds to nor cancels the mass; a map of another size than the masks is clipped, then bilinearly resized
    to the masks' resolution (:func:`~saliency_jax.saliency.resize_maps`).

    Args:
      maps: [batch, h, w] float.
      masks: [batch, height, width] bool (or 0/1), the known region of each example (an object mask or box).

    Returns:
      float32 [batch] in [0, 1]; NaN where a map has no positive mass (the fraction is undefined).

    Raises:
      ValueError: on shapes that are not [batch, h, w] / [batch, height, width] with one batch size.
      TypeError: if ``maps`` is not floating point.
    """
    maps = jnp.asarray(maps)
    masks = jnp.asarray(masks)
    if masks.ndim != 3 or maps.ndim != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"maps must be [batch, h, w] and masks [batch, height, width] with one batch size; got "
                         f"{maps.shape} and {masks.shape}")
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        raise TypeError(f"maps must be floating point; got dtype {maps.dtype}")
    positive = resize_maps(jnp.maximum(maps.astype(jnp.float32), 0.0), masks.shape[1:])
    total = jnp.sum(positive, axis=(1, 2))
    inside = jnp.sum(positive * (masks != 0), axis=(1, 2))
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), jnp.nan)
