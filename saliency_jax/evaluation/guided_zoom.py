"""Guided Zoom and Ensemble Guided Zoom: evidence pools and decision refinement at test time.

Bargal, "Grounding deep models of visual data", PhD thesis, Boston University 2019, Chapter 6 (Bargal, Zunino et
al., "Guided Zoom: Questioning Network Evidence for Fine-grained Classification", BMVC 2019):

* **Evidence pool** (Algorithm 1): for a training image, the saliency map of its ground-truth class (contrastive
  Excitation Backprop for Guided Zoom) locates the most discriminative evidence; a patch centred on the map's peak
  (150 x 150 pixels of a 448 x 448 image) is cut from the image and added to the pool with the image's label. Then
  *adversarial erasing*: a black square (85 x 85 at 448) is painted over that peak, the map is computed again on
  the erased image, and its peak gives the next patch, for ``l = 1 .. L`` (``L = 2``); a patch of round ``l >= 1``
  is added only while the erased image is still correctly classified.
* **Evidence CNN**: a second classifier trained on the pool (patch, label) pairs.
* **Decision refinement** (Algorithm 2): for each of the top-``k`` classes ``t`` of the conventional CNN, the
  evidence patch for ``t`` and its erased successors go through the Evidence CNN;
  ``score_t = w * p_conv(t) + sum_l w_l * p_ev,l(t)`` and the refined class is the argmax over the top-``k``.
* **Ensemble Guided Zoom** (Eq. 6.1): ``P = P_cEB u P_Grad-CAM u P_RISE``, each built with Algorithm 1 and
  ``L = 0``.

Details settled by the authors' released code (``andreazuna89/Guided-Zoom``: ``caffe/evidence_pool_generation.py``,
``caffe/save_softmax.py``, ``caffe/decision_refinement.py``, ``pytorch/*``), all kept here:

* the map is resized bilinearly to the image size and its **first** maximum (row-major ``argmax``) is the peak;
* the patch is always cut from the **original, un-erased** image, also in rounds ``l >= 1``;
* near a border the patch window ``[peak - p/2, peak + p/2)`` is **truncated** at the image border (not shifted
  inside it) and the remaining box is resized to the Evidence CNN input, so a border patch is stretched; bicubic
  resampling (``skimage`` order 3 / ``transform.resize``). ``border="shift"`` instead keeps a full ``p x p`` window
  by moving it inside the image (``jax.lax.dynamic_slice``'s clamping; the thesis text's "150x150-pixel patches");
* erasing sets pixels to 0 in the un-normalised [0, 1] image (black), is truncated at the border likewise, and is
  **cumulative**: round ``l`` sees the squares of all earlier rounds;
* **round 0 is not gated**: both released pool generators add the first patch of *every* training image and gate
  only the erased rounds (``while (pred == label or counter == 0) and counter < 3``); an image leaves the later
  rounds at its first misclassification. Algorithm 1's text gates round 0 too: ``require_correct_first=True``;
* on a batch-norm network the pool generator first corrects the signs of the convolutions whose batch-norm scale
  is negative (so that EB's ``W+`` is the part of the weights that raises the normalised output) and the test-time
  script does not: build the pool's cEB view on ``fold_batch_norm(module, variables, images, train=False)``
  (:func:`saliency_jax.saliency.fold_batch_norm`, which says how the two compare) and Algorithm 2's on the variables
  as trained; the ``"guided_zoom"`` evaluator does so (``ceb_batch_norm = "fold"``);
* at test time nothing is gated: every top-``k`` class gets ``L + 1`` patches; the weights are
  ``w = 0.4, (w_0, w_1, w_2) = (0.3, 0.2, 0.1)`` and ``p`` are softmax probabilities (PyTorch release, and the
  thesis' "class conditional probability"; the Caffe release read the fc outputs, ``score="logit"``);
* the released code's Python-2 integer arithmetic makes the patch ``[x - 75, x + 75)`` clipped to
  ``[0, 448 - 1)``; here windows are exactly ``p`` pixels, centred on the peak pixel as
  ``floor(centre - p / 2)``, and clipped to ``[0, size)`` (the released ``size - 1`` bound drops the last row and
  column; that off-by-one is not reproduced).

Zoom between resolutions: ``images`` (what the conventional CNN sees, where maps, peaks and erasing live) and
``originals`` (where patches are cut) may differ in resolution, e.g. CIFAR-10 downsampled to 16 x 16 for the
conventional CNN while patches come from the 32 x 32 original. A peak pixel ``(r, c)`` of ``images`` maps to the
centre ``((r + 0.5) * H / h, (c + 0.5) * W / w)`` of ``originals``; with one resolution this is the peak pixel.

For that CIFAR-10 setting the proposed sizes are: patch ``pixels(0.5, 32) = 16`` (a 2x zoom on a quarter of the
image, the same pixel count as the conventional input; the thesis' 150 / 448 would leave an 11-pixel crop), erased
square ``pixels(0.25, 16) = 4`` (the thesis' erase / patch side ratio 85 / 150 applied to the 8-pixel patch
footprint at 16 px; 2 x 2 cells of a stride-2 cEB map), Evidence CNN input 16 (native pixels, no resampling) and
``border="shift"`` (with patches half the image side, truncation would stretch every border patch up to 2x).

Everything is pure and jittable; one call handles a whole batch (per-example windows are ``dynamic_slice``-s under
``vmap``, resampling is two small per-example interpolation matrices), the ``L + 1`` rounds are unrolled, and
Algorithm 2 processes the ``batch x k`` (image, class) pairs as one batch. The map function is a parameter: any
method of :data:`saliency_jax.saliency.METHODS` through :func:`saliency_grounding`, or the thesis' three,
:func:`contrastive_eb_grounding`, :func:`grad_cam_grounding` and :func:`rise_grounding`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.evaluation.pointing_game import argmax_points
from saliency_jax.saliency.core import LayerModel, resize_maps
from saliency_jax.saliency.methods import saliency_map
from saliency_jax.saliency.views import ModelView

Array = jax.Array

#: A grounding method ``(images [n, h, w, c] float32, targets int32 [n]) -> maps [n, h', w']`` (any resolution;
#: maps are resized bilinearly to ``(h, w)`` before the peak is taken).
Grounding = Callable[[Array, Array], Array]
#: A classifier ``images [n, h, w, c] float32 -> logits [n, num_classes]`` in inference mode.
LogitsFn = Callable[[Array], Array]

__all__ = [
    "BORDERS",
    "CONVENTIONAL_WEIGHT",
    "ERASE_RATIO",
    "EVIDENCE_WEIGHTS",
    "EvidencePool",
    "Grounding",
    "NUM_ERASURES",
    "PATCH_RATIO",
    "RESAMPLING",
    "Refinement",
    "SCORES",
    "class_evidence",
    "contrastive_eb_grounding",
    "crop_patches",
    "decision_refinement",
    "ensemble_evidence_pool",
    "erase_squares",
    "evidence_patches",
    "evidence_pool",
    "grad_cam_grounding",
    "patch_boxes",
    "peak_locations",
    "pixels",
    "refined_classes",
    "refinement_scores",
    "rise_grounding",
    "saliency_grounding",
    "top_k_correct",
]

#: Patch side as a fraction of the image side (150 / 448 in the thesis, Sec. 6.1.1).
PATCH_RATIO: float = 150 / 448
#: Side of the erased square as a fraction of the image side (85 / 448 in the thesis, Sec. 6.1.1).
ERASE_RATIO: float = 85 / 448
#: Number of adversarial-erasing rounds ``L`` (thesis Sec. 6.2).
NUM_ERASURES: int = 2
#: ``w``, the weight of the conventional CNN's probability in Algorithm 2 (thesis Sec. 6.2; released code).
CONVENTIONAL_WEIGHT: float = 0.4
#: ``(w_0, w_1, w_2)``, the weights of the Evidence CNN's probabilities for rounds l = 0, 1, 2.
EVIDENCE_WEIGHTS: tuple[float, ...] = (0.3, 0.2, 0.1)
#: How a patch window meets the image border: ``"truncate"`` (released code) or ``"shift"`` (full window).
BORDERS: tuple[str, ...] = ("truncate", "shift")
#: Resampling kernels of :func:`crop_patches` (``"cubic"``: Keys, a = -0.5, as ``jax.image.resize``).
RESAMPLING: tuple[str, ...] = ("cubic", "linear")


# ---------------------------------------------------------------------------------------------------------------
# Argument checks (trace time: shapes and Python values only).


def _pair(value: Any, name: str) -> tuple[int, int]:
    """An int or a pair of ints -> (rows, cols), each >= 1."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or (height, width); got {value!r}")
        items = tuple(value)
    else:
        items = (value, value)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or item < 1:
            raise ValueError(f"{name} must be a positive int or a pair of positive ints; got {value!r}")
    return int(items[0]), int(items[1])


def _check_batch(images: Any, name: str) -> None:
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"{name} must be [batch, height, width, channels]; got shape {getattr(images, 'shape', None)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point (float32 in [0, 1]); got dtype {images.dtype}")


def _check_originals(images: Array, originals: Array | None) -> Array:
    if originals is None:
        return images
    _check_batch(originals, "originals")
    if originals.shape[0] != images.shape[0] or originals.shape[3] != images.shape[3]:
        raise ValueError(
            f"originals {tuple(originals.shape)} must match images {tuple(images.shape)} in batch and channels")
    return originals


def _check_choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def _check_labels(labels: Any, batch: int, name: str = "labels") -> Array:
    labels = jnp.asarray(labels)
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one class per image); got {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer class indices; got dtype {labels.dtype}")
    return labels.astype(jnp.int32)


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _check_weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number; got {value!r}")
    return float(value)


def pixels(ratio: float, side: int) -> int:
    """A size given as a fraction of the image side, in whole pixels: ``max(1, round(ratio * side))``.

    Args:
      ratio: fraction of the side in (0, 1], e.g. :data:`PATCH_RATIO` = 150 / 448.
      side: the image side in pixels.

    Returns:
      The size in pixels (``pixels(PATCH_RATIO, 448) == 150``, ``pixels(ERASE_RATIO, 448) == 85``).

    Raises:
      ValueError: ``ratio`` outside (0, 1] or ``side`` < 1.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1]; got {ratio!r}")
    side = _check_count(side, "side", 1)
    return max(1, int(round(float(ratio) * side)))


# ---------------------------------------------------------------------------------------------------------------
# Peaks, boxes, patches, erasing.


def peak_locations(maps: Array, image_size: tuple[int, int]) -> Array:
    """The peak of each map at the image's resolution (released code: bilinear resize to the image, then argmax).

    Args:
      maps: [batch, h', w'] float saliency maps at any resolution.
      image_size: (height, width) of the images the maps explain.

    Returns:
      int32 [batch, 2] ``(row, col)`` pixel of the first maximum (row-major) of the map resized bilinearly (half-pixel
      centres) to ``image_size``; a constant map points at (0, 0).

    Raises:
      ValueError: ``maps`` not rank 3.
    """
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [batch, height, width]; got shape {tuple(maps.shape)}")
    return argmax_points(resize_maps(maps, tuple(image_size)))


def _window_starts(peaks: Array, size: tuple[int, int], image_size: tuple[int, int],
                   target_size: tuple[int, int]) -> Array:
    """``floor(centre - size / 2)`` in ``target_size`` pixels of each peak pixel of an ``image_size`` image."""
    scale = jnp.asarray([target_size[0] / image_size[0], target_size[1] / image_size[1]], jnp.float32)
    centres = (peaks.astype(jnp.float32) + 0.5) * scale
    return jnp.floor(centres - jnp.asarray(size, jnp.float32) / 2.0).astype(jnp.int32)


def patch_boxes(peaks: Array, patch_size: int | tuple[int, int], image_size: tuple[int, int],
                original_size: tuple[int, int] | None = None, border: str = "truncate") -> Array:
    """Boxes of the patches centred on the peaks (Sec. 6.1.1), in ``originals`` pixels.

    Args:
      peaks: int [batch, 2] ``(row, col)`` peak pixels in ``image_size`` coordinates.
      patch_size: patch side ``p`` in ``originals`` pixels (int or ``(rows, cols)``); at most the original size.
      image_size: (h, w) of the images the peaks refer to.
      original_size: (H, W) of the images patches are cut from (default ``image_size``).
      border: ``"truncate"``: ``[start, start + p)`` with ``start = floor(centre - p / 2)`` clipped to the image
        (released code; border boxes are smaller); ``"shift"``: the full ``p``-pixel window moved inside the image.

    Returns:
      int32 [batch, 4] half-open boxes ``(top, left, bottom, right)``, ``0 <= top < bottom <= H``.

    Raises:
      ValueError: bad ``border``, ``peaks`` not [batch, 2], or a patch larger than the original image.
    """
    _check_choice(border, BORDERS, "border")
    original_size = tuple(image_size) if original_size is None else tuple(original_size)
    size = _pair(patch_size, "patch_size")
    if size[0] > original_size[0] or size[1] > original_size[1]:
        raise ValueError(f"patch_size {size} exceeds the original image size {original_size}")
    peaks = jnp.asarray(peaks)
    if peaks.ndim != 2 or peaks.shape[1] != 2:
        raise ValueError(f"peaks must be [batch, 2]; got shape {tuple(peaks.shape)}")
    starts = _window_starts(peaks, size, tuple(image_size), original_size)
    limit = jnp.asarray(original_size, jnp.int32)
    extent = jnp.asarray(size, jnp.int32)
    if border == "shift":
        top_left = jnp.clip(starts, 0, limit - extent)
        bottom_right = top_left + extent
    else:
        top_left = jnp.maximum(starts, 0)
        bottom_right = jnp.minimum(starts + extent, limit)
    return jnp.concatenate([top_left, bottom_right], axis=1).astype(jnp.int32)


def _kernel(x: Array, method: str) -> Array:
    x = jnp.abs(x)
    if method == "linear":
        return jnp.maximum(0.0, 1.0 - x)
    a = -0.5  # Keys' cubic convolution kernel, as jax.image.resize's "cubic"
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return jnp.where(x <= 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _resampling_matrix(start: Array, stop: Array, window: int, out: int, method: str, antialias: bool) -> Array:
    """[out, window] weights resizing pixels ``[start, stop)`` of a ``window``-pixel axis to ``out`` pixels.

    Half-pixel centres; taps outside ``[start, stop)`` get no weight and each row is renormalised, so the result
    equals cropping ``[start, stop)`` first and then ``jax.image.resize``-ing it (edge handling included).
    """
    length = (stop - start).astype(jnp.float32)
    scale = out / length
    kernel_scale = jnp.maximum(1.0 / scale, 1.0) if antialias else 1.0
    sample = start.astype(jnp.float32) + (jnp.arange(out, dtype=jnp.float32) + 0.5) / scale - 0.5  # [out]
    taps = jnp.arange(window, dtype=jnp.float32)  # [window]
    weights = _kernel((taps[None, :] - sample[:, None]) / kernel_scale, method)
    inside = (taps >= start) & (taps < stop)
    weights = jnp.where(inside[None, :], weights, 0.0)
    total = jnp.sum(weights, axis=1, keepdims=True)
    return jnp.where(total != 0.0, weights / jnp.where(total != 0.0, total, 1.0), 0.0)


def crop_patches(originals: Array, peaks: Array, *, patch_size: int | tuple[int, int],
                 output_size: int | tuple[int, int], image_size: tuple[int, int] | None = None,
                 border: str = "truncate", method: str = "cubic", antialias: bool = True) -> tuple[Array, Array]:
    """Patches centred on the peaks, cut per example and resized to the Evidence CNN input (Sec. 6.1.1).

    Each example's ``p x p`` window is a ``jax.lax.dynamic_slice`` (start clamped into the image); with
    ``border="truncate"`` the part of the centred window outside the image is dropped and the rest is stretched to
    ``output_size``, as the released code does; with ``"shift"`` the whole (moved) window is resized.

    Args:
      originals: [batch, H, W, channels] float images the patches are cut from (not erased).
      peaks: int [batch, 2] ``(row, col)`` in ``image_size`` pixels.
      patch_size: window side ``p`` in ``originals`` pixels (int or pair), e.g. ``pixels(PATCH_RATIO, H)``.
      output_size: side of the returned patches (the Evidence CNN input), int or pair.
      image_size: (h, w) the peaks refer to (default ``(H, W)``).
      border: see :func:`patch_boxes`.
      method: ``"cubic"`` (released code: bicubic) or ``"linear"``.
      antialias: widen the kernel when shrinking (as ``jax.image.resize``); no effect when enlarging.

    Returns:
      ``(patches, boxes)``: float32 [batch, out_h, out_w, channels] and int32 [batch, 4] ``(top, left, bottom,
      right)`` in ``originals`` pixels. A box exactly ``output_size`` large is copied unchanged (linear and cubic
      kernels interpolate). Cubic resampling can overshoot the input range slightly.

    Raises:
      ValueError: bad shapes, sizes, ``border`` or ``method``.
      TypeError: non-float ``originals``.
    """
    _check_batch(originals, "originals")
    _check_choice(method, RESAMPLING, "method")
    original_size = tuple(originals.shape[1:3])
    image_size = original_size if image_size is None else tuple(image_size)
    size = _pair(patch_size, "patch_size")
    out = _pair(output_size, "output_size")
    boxes = patch_boxes(peaks, size, image_size, original_size, border)
    if boxes.shape[0] != originals.shape[0]:
        raise ValueError(f"{boxes.shape[0]} peaks for {originals.shape[0]} images")
    limit = jnp.asarray(original_size, jnp.int32)
    starts = _window_starts(jnp.asarray(peaks), size, image_size, original_size)
    window_starts = jnp.clip(starts, 0, limit - jnp.asarray(size, jnp.int32))

    def one(image, box, corner):
        window = jax.lax.dynamic_slice(image, (corner[0], corner[1], 0), (size[0], size[1], image.shape[2]))
        rows = _resampling_matrix(box[0] - corner[0], box[2] - corner[0], size[0], out[0], method, antialias)
        cols = _resampling_matrix(box[1] - corner[1], box[3] - corner[1], size[1], out[1], method, antialias)
        return jnp.einsum("ij,jkc,lk->ilc", rows, window.astype(jnp.float32), cols,
                          precision=jax.lax.Precision.HIGHEST)

    return jax.vmap(one)(originals, boxes, window_starts), boxes


def erase_squares(images: Array, peaks: Array, erase_size: int | tuple[int, int], fill: float | Array = 0.0) -> Array:
    """Adversarial erasing (Sec. 6.1.1): a ``fill``-valued square centred on each example's peak.

    The square covers ``[floor(r + 0.5 - e / 2), + e)`` rows (likewise columns), truncated at the image border
    (released code).

    Args:
      images: [batch, h, w, channels] float.
      peaks: int [batch, 2] ``(row, col)`` in ``images`` pixels.
      erase_size: side ``e`` in pixels (int or pair), e.g. ``pixels(ERASE_RATIO, h)``.
      fill: the value written (0.0: black in [0, 1] images, as the released code), a scalar or [channels].

    Returns:
      float [batch, h, w, channels], ``images`` with the squares painted.

    Raises:
      ValueError: bad shapes or ``erase_size`` larger than the image.
    """
    _check_batch(images, "images")
    size = _pair(erase_size, "erase_size")
    height, width = images.shape[1:3]
    if size[0] > height or size[1] > width:
        raise ValueError(f"erase_size {size} exceeds the image size {(height, width)}")
    peaks = jnp.asarray(peaks)
    if peaks.shape != (images.shape[0], 2):
        raise ValueError(f"peaks must be [{images.shape[0]}, 2]; got shape {tuple(peaks.shape)}")
    starts = _window_starts(peaks, size, (height, width), (height, width))
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= starts[:, :1]) & (rows < starts[:, :1] + size[0])  # [batch, h]
    in_cols = (cols >= starts[:, 1:]) & (cols < starts[:, 1:] + size[1])  # [batch, w]
    mask = in_rows[:, :, None, None] & in_cols[:, None, :, None]
    return jnp.where(mask, jnp.asarray(fill, images.dtype), images)


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1: evidence pools.


class EvidencePool(NamedTuple):
    """Evidence patches of a batch, ``R`` rounds deep (fixed shapes; ``valid`` says which belong to the pool).

    Attributes:
      patches: float32 [R, batch, out_h, out_w, channels], cut from the originals.
      valid: bool [R, batch]: the patch enters the pool (Algorithm 1's rules).
      peaks: int32 [R, batch, 2] ``(row, col)`` peaks in ``images`` pixels.
      boxes: int32 [R, batch, 4] ``(top, left, bottom, right)`` of the patches in ``originals`` pixels.
      rounds: int32 [R]: the erasing round ``l`` of each row (``l = 0`` is the most salient evidence).
      methods: int32 [R]: index of the grounding method of each row (0 for :func:`evidence_pool`; the position in
        ``groundings`` for :func:`ensemble_evidence_pool`).
    """

    patches: Array
    valid: Array
    peaks: Array
    boxes: Array
    rounds: Array
    methods: Array


class _Zoom(NamedTuple):
    patches: Array  # [R, n, oh, ow, c]
    peaks: Array  # [R, n, 2]
    boxes: Array  # [R, n, 4]
    alive: Array  # [R, n] bool


def _zoom_rounds(grounding: Grounding, logits_fn: LogitsFn | None, images: Array, originals: Array,
                 targets: Array, num_rounds: int, alive: Array, *, patch_size, erase_size, output_size, border,
                 method, fill) -> _Zoom:
    """Map -> peak -> patch, then erase and repeat; ``alive`` drops an example once ``logits_fn`` misclassifies it.

    ``logits_fn=None`` gates nothing (Algorithm 2). The rounds are unrolled (``num_rounds`` is static).
    """
    image_size = tuple(images.shape[1:3])
    patches, peaks, boxes, alives = [], [], [], []
    current = images
    for l in range(num_rounds):
        peak = peak_locations(grounding(current, targets), image_size)
        patch, box = crop_patches(originals, peak, patch_size=patch_size, output_size=output_size,
                                  image_size=image_size, border=border, method=method)
        patches.append(patch)
        peaks.append(peak)
        boxes.append(box)
        alives.append(alive)
        if l + 1 < num_rounds:
            current = erase_squares(current, peak, erase_size, fill)
            if logits_fn is not None:
                alive = alive & (jnp.argmax(logits_fn(current), axis=-1) == targets)
    return _Zoom(jnp.stack(patches), jnp.stack(peaks), jnp.stack(boxes), jnp.stack(alives))


def _pool_setup(images, labels, originals, num_erasures, border, method):
    _check_batch(images, "images")
    labels = _check_labels(labels, images.shape[0])
    originals = _check_originals(images, originals)
    _check_count(num_erasures, "num_erasures", 0)
    _check_choice(border, BORDERS, "border")
    _check_choice(method, RESAMPLING, "method")
    return labels, originals


def _initially_alive(logits_fn, images, labels, require_correct_first):
    if require_correct_first:
        return jnp.argmax(logits_fn(images), axis=-1) == labels
    return jnp.ones(labels.shape, bool)


def evidence_pool(grounding: Grounding, logits_fn: LogitsFn, images: Array, labels: Array, *,
                  patch_size: int | tuple[int, int], erase_size: int | tuple[int, int],
                  output_size: int | tuple[int, int], originals: Array | None = None,
                  num_erasures: int = NUM_ERASURES, border: str = "truncate", method: str = "cubic",
                  fill: float | Array = 0.0, require_correct_first: bool = False) -> EvidencePool:
    """Algorithm 1 (Generation of Evidence Pool) for a whole batch: patches of rounds ``l = 0 .. L``.

    Round ``l``: the ``grounding`` map of the ground-truth class on the image with ``l`` squares erased; its peak;
    the patch around the peak cut from ``originals``. Round ``l >= 1`` is valid only while every erased image so far
    (1 .. l squares) is still classified as its label by ``logits_fn``; an image misclassified once is dropped from
    all later rounds. Round 0 is valid for every image (released code); ``require_correct_first=True`` keeps it for
    correctly classified images only (Algorithm 1's text, line 3).

    Jit it with the functions and sizes bound, e.g.
    ``jax.jit(functools.partial(evidence_pool, grounding, logits_fn, patch_size=p, erase_size=e, output_size=s))``.

    Args:
      grounding: ``(images, targets) -> maps`` (:data:`Grounding`); cEB for Guided Zoom.
      logits_fn: the conventional CNN ``images -> logits [batch, num_classes]`` (inference mode).
      images: [batch, h, w, channels] float32, what the conventional CNN sees.
      labels: int [batch] ground-truth classes.
      patch_size: patch side in ``originals`` pixels (``pixels(PATCH_RATIO, H)``).
      erase_size: erased square side in ``images`` pixels (``pixels(ERASE_RATIO, h)``).
      output_size: Evidence CNN input side (patches are resized to it).
      originals: [batch, H, W, channels] float32 to cut patches from (default ``images``), same field of view.
      num_erasures: ``L`` (2 for Guided Zoom; 0 gives only the most salient patch).
      border: ``"truncate"`` (released code) or ``"shift"``; see :func:`patch_boxes`.
      method: patch resampling, ``"cubic"`` (released code) or ``"linear"``.
      fill: erasing value (0.0 = black in [0, 1] images).
      require_correct_first: also gate round 0 on the un-erased image's classification.

    Returns:
      :class:`EvidencePool` with ``R = L + 1`` rows, ``rounds = [0, .., L]``, ``methods = 0``.

    Raises:
      ValueError: bad shapes, sizes, ``num_erasures``, ``border`` or ``method``.
      TypeError: non-float images or non-integer labels.
    """
    labels, originals = _pool_setup(images, labels, originals, num_erasures, border, method)
    alive = _initially_alive(logits_fn, images, labels, require_correct_first)
    zoom = _zoom_rounds(grounding, logits_fn, images, originals, labels, num_erasures + 1, alive,
                        patch_size=patch_size, erase_size=erase_size, output_size=output_size, border=border,
                        method=method, fill=fill)
    rounds = jnp.arange(num_erasures + 1, dtype=jnp.int32)
    return EvidencePool(zoom.patches, zoom.alive, zoom.peaks, zoom.boxes, rounds, jnp.zeros_like(rounds))


def ensemble_evidence_pool(groundings: Sequence[Grounding], logits_fn: LogitsFn, images: Array, labels: Array, *,
                           patch_size: int | tuple[int, int], output_size: int | tuple[int, int],
                           erase_size: int | tuple[int, int] = 1, originals: Array | None = None,
                           num_erasures: int = 0, border: str = "truncate", method: str = "cubic",
                           fill: float | Array = 0.0, require_correct_first: bool = False) -> EvidencePool:
    """Ensemble Guided Zoom's pool (Eq. 6.1): the union of Algorithm 1's pools of several grounding methods.

    ``P = P_cEB u P_Grad-CAM u P_RISE``, each with ``L = 0`` (no erasing) in the thesis; the rows of the result are
    grouped by method (``methods[i]`` is the index into ``groundings``), then by round.

    Args:
      groundings: the grounding methods, e.g. ``(contrastive_eb_grounding(m), grad_cam_grounding(m),
        rise_grounding(f, key))``.
      logits_fn, images, labels, patch_size, output_size, originals, border, method, fill, require_correct_first:
        as :func:`evidence_pool`.
      erase_size: only used when ``num_erasures > 0``.
      num_erasures: ``L`` per method (0 in Eq. 6.1).

    Returns:
      :class:`EvidencePool` with ``R = len(groundings) * (L + 1)`` rows.

    Raises:
      ValueError: no groundings, and as :func:`evidence_pool`.
    """
    groundings = tuple(groundings)
    if not groundings:
        raise ValueError("ensemble_evidence_pool needs at least one grounding method")
    labels, originals = _pool_setup(images, labels, originals, num_erasures, border, method)
    alive = _initially_alive(logits_fn, images, labels, require_correct_first)
    zooms = [
        _zoom_rounds(g, logits_fn, images, originals, labels, num_erasures + 1, alive, patch_size=patch_size,
                     erase_size=erase_size, output_size=output_size, border=border, method=method, fill=fill)
        for g in groundings
    ]
    rounds = jnp.tile(jnp.arange(num_erasures + 1, dtype=jnp.int32), len(groundings))
    methods = jnp.repeat(jnp.arange(len(groundings), dtype=jnp.int32), num_erasures + 1)
    return EvidencePool(*(jnp.concatenate([getattr(z, f) for z in zooms]) for f in ("patches", "alive", "peaks",
                                                                                       "boxes")), rounds, methods)


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 2: decision refinement.


class Refinement(NamedTuple):
    """Decision refinement of a test batch (Algorithm 2).

    Attributes:
      classes: int32 [batch] refined class ``c_ref``.
      top_classes: int32 [batch, k] the conventional CNN's top-``k`` classes, most probable first.
      scores: float32 [batch, k] ``tot[t]`` for each top class.
      conventional: float32 [batch, k] ``p_conv(t)``.
      evidence: float32 [batch, k, L + 1] ``p_ev,l(t)``: the Evidence CNN's score of class ``t`` on round ``l``'s
        patch for ``t``.
    """

    classes: Array
    top_classes: Array
    scores: Array
    conventional: Array
    evidence: Array


def _check_weights(conventional_weight, evidence_weights) -> tuple[float, tuple[float, ...]]:
    w = _check_weight(conventional_weight, "conventional_weight")
    if isinstance(evidence_weights, (str, bytes)) or not isinstance(evidence_weights, Sequence) \
            or len(evidence_weights) < 1:
        raise ValueError(f"evidence_weights must be a non-empty sequence (w_0, .., w_L); got {evidence_weights!r}")
    return w, tuple(_check_weight(v, f"evidence_weights[{i}]") for i, v in enumerate(evidence_weights))


def refinement_scores(conventional: Array, evidence: Array, conventional_weight: float = CONVENTIONAL_WEIGHT,
                      evidence_weights: Sequence[float] = EVIDENCE_WEIGHTS) -> Array:
    """Algorithm 2, lines 3, 7 and 12: ``tot[t] = w * p_conv(t) + sum_l w_l * p_ev,l(t)``.

    Args:
      conventional: [batch, k] float ``p_conv(t)`` of each top class.
      evidence: [batch, k, L + 1] float ``p_ev,l(t)``.
      conventional_weight: ``w`` (0.4).
      evidence_weights: ``(w_0, .., w_L)`` ((0.3, 0.2, 0.1)); its length must be ``L + 1``.

    Returns:
      float32 [batch, k] scores; the refined class is the top class at their (first) argmax.

    Raises:
      ValueError: mismatched shapes or bad weights.
    """
    w, ws = _check_weights(conventional_weight, evidence_weights)
    conventional, evidence = jnp.asarray(conventional), jnp.asarray(evidence)
    if conventional.ndim != 2 or evidence.shape != (*conventional.shape, len(ws)):
        raise ValueError(f"conventional must be [batch, k] and evidence [batch, k, {len(ws)}] (one column per "
                         f"evidence weight); got {tuple(conventional.shape)} and {tuple(evidence.shape)}")
    return w * conventional.astype(jnp.float32) + jnp.einsum("bkl,l->bk", evidence.astype(jnp.float32),
                                                             jnp.asarray(ws, jnp.float32))


#: How the conventional and Evidence CNNs' outputs are scored in Algorithm 2.
SCORES: tuple[str, ...] = ("probability", "logit")


def _scores(logits: Array, score: str) -> Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1) if score == "probability" else logits.astype(
        jnp.float32)


def evidence_patches(grounding: Grounding, images: Array, targets: Array, *, num_erasures: int,
                     patch_size: int | tuple[int, int], erase_size: int | tuple[int, int],
                     output_size: int | tuple[int, int], originals: Array | None = None, border: str = "truncate",
                     method: str = "cubic", fill: float | Array = 0.0) -> EvidencePool:
    """Algorithm 2, lines 5 and 9-10: the evidence of class ``targets[i]`` in image ``i`` and its erased successors.

    The same zoom as :func:`evidence_pool` (map of the target class, peak, patch cut from ``originals``, cumulative
    erasing), but nothing is gated: at test time every (image, class) pair gets ``L + 1`` patches. Pass each test
    image once per top-``k`` class (``jnp.repeat(images, k, axis=0)`` with the flattened top classes) to get
    Algorithm 2's ``batch x k`` pairs in one call.

    Args:
      grounding: ``(images, targets) -> maps``; the method the Evidence CNN's pool was built with.
      images: [n, h, w, channels] float32 as the conventional CNN sees them.
      targets: int [n] the class whose evidence is sought for each image.
      num_erasures: ``L`` (rounds ``0 .. L``).
      patch_size, erase_size, output_size, originals, border, method, fill: as :func:`evidence_pool`.

    Returns:
      :class:`EvidencePool` with ``R = L + 1`` rows, all valid, ``rounds = [0, .., L]``, ``methods = 0``.

    Raises:
      ValueError: bad shapes, sizes, ``num_erasures``, ``border`` or ``method``.
      TypeError: non-float images or non-integer targets.
    """
    targets, originals = _pool_setup(images, targets, originals, num_erasures, border, method)
    zoom = _zoom_rounds(grounding, None, images, originals, targets, num_erasures + 1, jnp.ones(targets.shape, bool),
                        patch_size=patch_size, erase_size=erase_size, output_size=output_size, border=border,
                        method=method, fill=fill)
    rounds = jnp.arange(num_erasures + 1, dtype=jnp.int32)
    return EvidencePool(zoom.patches, zoom.alive, zoom.peaks, zoom.boxes, rounds, jnp.zeros_like(rounds))


def class_evidence(evidence_logits_fn: LogitsFn, patches: Array, targets: Array,
                   score: str = "probability") -> tuple[Array, Array]:
    """Algorithm 2, lines 6-7 and 11-12: the Evidence CNN's score ``v_l[t]`` of each pair's class on its patches.

    Args:
      evidence_logits_fn: the Evidence CNN ``patches [m, out_h, out_w, channels] -> logits [m, num_classes]``.
      patches: [R, n, out_h, out_w, channels] float32 (:attr:`EvidencePool.patches` of :func:`evidence_patches`);
        all ``R n`` patches go through the Evidence CNN in one call.
      targets: int [n] the class of each pair.
      score: ``"probability"`` (softmax) or ``"logit"``.

    Returns:
      ``(evidence, predicted)``: float32 [n, R] ``p_ev,l(t)`` and int32 [n, R] the Evidence CNN's top class on each
      patch (its accuracy on patches of the true class is a diagnostic of the Evidence CNN).

    Raises:
      ValueError: bad shapes or ``score``.
    """
    _check_choice(score, SCORES, "score")
    patches = jnp.asarray(patches)
    if patches.ndim != 5:
        raise ValueError(f"patches must be [rounds, n, height, width, channels]; got shape {tuple(patches.shape)}")
    num_rounds, n = patches.shape[:2]
    targets = _check_labels(targets, n, "targets")
    logits = evidence_logits_fn(patches.reshape(num_rounds * n, *patches.shape[2:]))
    values = _scores(logits, score).reshape(num_rounds, n, -1)
    picked = jnp.take_along_axis(values, jnp.broadcast_to(targets[None, :, None], (num_rounds, n, 1)), axis=-1)
    return picked[..., 0].T, jnp.argmax(values, axis=-1).T.astype(jnp.int32)


def decision_refinement(grounding: Grounding, logits_fn: LogitsFn, evidence_logits_fn: LogitsFn, images: Array, *,
                        k: int, patch_size: int | tuple[int, int], erase_size: int | tuple[int, int],
                        output_size: int | tuple[int, int], originals: Array | None = None,
                        conventional_weight: float = CONVENTIONAL_WEIGHT,
                        evidence_weights: Sequence[float] = EVIDENCE_WEIGHTS, border: str = "truncate",
                        method: str = "cubic", fill: float | Array = 0.0, score: str = "probability") -> Refinement:
    """Algorithm 2 (Decision Refinement) for a test batch: all ``batch x k`` (image, class) pairs at once.

    For each top-``k`` class ``t``: the map of ``t``, its peak, the patch (from ``originals``) and, for
    ``l = 1 .. L``, the same after erasing the previous peaks (cumulatively, never gated; :func:`evidence_patches`);
    the ``(L + 1) batch k`` patches go through the Evidence CNN in one call (:func:`class_evidence`); the scores of
    :func:`refinement_scores` pick the refined class. ``L = len(evidence_weights) - 1``. A class's score does not
    depend on ``k``, so the refined class for any ``k' < k`` is the top class at the argmax of
    ``scores[:, :k']`` (:func:`refined_classes`).

    Args:
      grounding: ``(images, targets) -> maps``; the method the Evidence CNN's pool was built with.
      logits_fn: the conventional CNN ``images -> logits``.
      evidence_logits_fn: the Evidence CNN ``patches [n, out_h, out_w, channels] -> logits [n, num_classes]``.
      images: [batch, h, w, channels] float32 test images as the conventional CNN sees them.
      k: number of top classes examined (3 or 5 in the thesis), ``1 <= k <= num_classes``.
      patch_size, erase_size, output_size, originals, border, method, fill: as :func:`evidence_pool`.
      conventional_weight: ``w`` (0.4).
      evidence_weights: ``(w_0, .., w_L)`` ((0.3, 0.2, 0.1)).
      score: ``"probability"`` (softmax; thesis, PyTorch release) or ``"logit"`` (Caffe release's fc outputs).

    Returns:
      :class:`Refinement`.

    Raises:
      ValueError: bad shapes, ``k`` out of range, bad weights, ``score``, ``border`` or ``method``.
      TypeError: non-float images.
    """
    _check_batch(images, "images")
    originals = _check_originals(images, originals)
    _check_choice(border, BORDERS, "border")
    _check_choice(method, RESAMPLING, "method")
    _check_choice(score, SCORES, "score")
    w, ws = _check_weights(conventional_weight, evidence_weights)
    batch = images.shape[0]
    conventional = _scores(logits_fn(images), score)
    num_classes = conventional.shape[-1]
    k = _check_count(k, "k", 1)
    if k > num_classes:
        raise ValueError(f"k={k} exceeds the number of classes {num_classes}")
    top_scores, top_classes = jax.lax.top_k(conventional, k)  # [batch, k], most probable first
    targets = top_classes.reshape(-1).astype(jnp.int32)  # pair (b, j) at row b * k + j
    zoom = evidence_patches(grounding, jnp.repeat(images, k, axis=0), targets, num_erasures=len(ws) - 1,
                            patch_size=patch_size, erase_size=erase_size, output_size=output_size,
                            originals=jnp.repeat(originals, k, axis=0), border=border, method=method, fill=fill)
    evidence, _ = class_evidence(evidence_logits_fn, zoom.patches, targets, score)
    evidence = evidence.reshape(batch, k, len(ws))
    scores = refinement_scores(top_scores, evidence, w, ws)
    return Refinement(refined_classes(top_classes, scores, k), top_classes.astype(jnp.int32), scores, top_scores,
                      evidence)


def refined_classes(top_classes: Array, scores: Array, k: int) -> Array:
    """Algorithm 2, line 13 for the first ``k`` top classes: ``c_ref = argmax over c_1 .. c_k of tot[c]``.

    Args:
      top_classes: int [batch, K] the conventional CNN's top classes, most probable first (``K >= k``).
      scores: float [batch, K] ``tot`` of each (:func:`refinement_scores`).
      k: how many of the top classes compete, ``1 <= k <= K`` (ties: the more probable class).

    Returns:
      int32 [batch] refined classes.

    Raises:
      ValueError: mismatched shapes or ``k`` out of range.
    """
    top_classes, scores = jnp.asarray(top_classes), jnp.asarray(scores)
    if top_classes.ndim != 2 or scores.shape != top_classes.shape:
        raise ValueError(f"top_classes and scores must both be [batch, K]; got {tuple(top_classes.shape)} and "
                         f"{tuple(scores.shape)}")
    k = _check_count(k, "k", 1)
    if k > top_classes.shape[1]:
        raise ValueError(f"k={k} exceeds the {top_classes.shape[1]} top classes given")
    best = jnp.argmax(scores[:, :k], axis=-1)
    return jnp.take_along_axis(top_classes[:, :k], best[:, None], axis=-1)[:, 0].astype(jnp.int32)


def top_k_correct(logits: Array, labels: Array, k: int) -> Array:
    """Whether each label is among the ``k`` highest logits (top-k accuracy per example).

    Args:
      logits: [batch, num_classes] float.
      labels: int [batch].
      k: ``1 <= k <= num_classes``.

    Returns:
      bool [batch].

    Raises:
      ValueError: bad shapes or ``k``.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, num_classes]; got shape {tuple(logits.shape)}")
    labels = _check_labels(labels, logits.shape[0])
    k = _check_count(k, "k", 1)
    if k > logits.shape[1]:
        raise ValueError(f"k={k} exceeds the number of classes {logits.shape[1]}")
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Grounding methods (the map function of Algorithms 1 and 2).


def saliency_grounding(method: str, view: ModelView | LayerModel | LogitsFn, *, key: Array | None = None,
                       **options) -> Grounding:
    """A grounding from any method of :data:`saliency_jax.saliency.METHODS`, called through
    :func:`~saliency_jax.saliency.saliency_map`.

    Args:
      method: a key of ``saliency.METHODS`` (``"contrastive_excitation_backprop"``, ``"grad_cam"``, ``"rise"``, ...).
      view: the conventional CNN: a :class:`~saliency_jax.saliency.views.ModelView` (``linen_view(module,
        variables, layer, train=False)``), a :class:`~saliency_jax.saliency.core.LayerModel` split at the saliency
        layer, or a function ``images -> logits`` (input-space methods).
      key: the PRNG key of a random method (RISE); the same key, hence the same masks, serves every call, so the
        grounding is deterministic.
      **options: the method's options (``score``, ``weighting``, ``num_masks``, ...).

    Returns:
      A :data:`Grounding` giving unnormalised maps (the peak is unchanged): at the layer's resolution [n, h', w'] for
      a layer method (``extras["layer_map"]``), at the input resolution [n, h, w] otherwise.
    """
    def grounding(images: Array, targets: Array) -> Array:
        maps, extras = saliency_map(method, view, images, targets, normalize=False, return_extras=True, key=key,
                                    **options)
        return extras.get("layer_map", maps)

    return grounding


def contrastive_eb_grounding(model: ModelView | LayerModel) -> Grounding:
    """Guided Zoom's grounding: contrastive Excitation Backprop (Sec. 6.1.1) at ``model``'s layer.

    The released code takes cEB at ``res4a`` of ResNet-101 (a middle layer, stride 16) for 448-pixel inputs.

    Args:
      model: the conventional CNN split at the saliency layer (``linen_layer(module, variables, layer,
        train=False)``, or a view with that layer). For the evidence pool of a batch-norm network the released pool
        generator's maps are those of ``linen_view(module, fold_batch_norm(module, variables, images, train=False),
        layer, train=False)`` (:func:`saliency_jax.saliency.fold_batch_norm`); its test-time maps (Algorithm 2) are
        those of the variables as trained.

    Returns:
      A :data:`Grounding` giving cEB maps [n, h', w'] at the layer's resolution (:func:`saliency_grounding`).
    """
    return saliency_grounding("contrastive_excitation_backprop", model)


def grad_cam_grounding(model: ModelView | LayerModel, *, score: str = "logit", weighting: str = "plain") -> Grounding:
    """Grad-CAM grounding (Ensemble Guided Zoom; released code: last conv block, logit score, plain weights, ReLU).

    Args:
      model: the conventional CNN split at the Grad-CAM layer (a ``LayerModel`` or a view with that layer).
      score, weighting: as :func:`saliency_jax.saliency.grad_cam`.

    Returns:
      A :data:`Grounding` giving Grad-CAM maps at the layer's resolution (not normalised: the peak is unchanged).
    """
    return saliency_grounding("grad_cam", model, score=score, weighting=weighting)


def rise_grounding(logits_fn: LogitsFn | ModelView, key: Array, *, num_masks: int = 1000, grid_size: int = 8,
                   p: float = 0.5, masks_per_step: int = 100) -> Grounding:
    """RISE grounding (Ensemble Guided Zoom); released code: 1000 masks, 8 x 8 grid, p = 0.5, softmax score.

    The same ``key`` (hence the same masks) serves every call, so the grounding is deterministic.

    Args:
      logits_fn: the conventional CNN ``images -> logits`` (or a view of it).
      key: a JAX PRNG key.
      num_masks, grid_size, p, masks_per_step: as :func:`saliency_jax.saliency.rise`.

    Returns:
      A :data:`Grounding` giving RISE maps [n, h, w].
    """
    return saliency_grounding("rise", logits_fn, key=key, num_masks=num_masks, grid_size=grid_size, p=p,
                              masks_per_step=masks_per_step)
