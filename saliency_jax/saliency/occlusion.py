"""Occlusion: the change of the target's score when a sliding window of the image is replaced by a baseline.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, Sec. 4.2 (occlusion
sensitivity), in the form of Captum's ``Occlusion`` (the reference here): windows of ``sliding_window_shapes``
pixels (all channels) start at the top-left corner and move by ``strides`` until the image is covered (the last
window in a direction may be cut off by the border: ``ceil((size - window) / stride) + 1`` positions per axis); each
window is set to ``baselines``; a pixel's attribution is ``f_c(x) - f_c(x with the window occluded)`` averaged over
the windows that cover it.

The windows are evaluated ``windows_per_step`` at a time (``vmap``) under a ``lax.scan`` that accumulates the
weighted sum (memory of one chunk, no Python loop over windows or examples); the model is only run forward
(``1 + windows`` forwards per image).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency.core import check_images, invalid_examples, mark_invalid, resolve_targets
from saliency_jax.saliency.grad_cam import Score, class_scores
from saliency_jax.saliency.gradients import _check_logits, _chunked_sum
from saliency_jax.saliency.target_sets import is_target_set, mark_invalid_sets, resolve_target_set

Array = jax.Array

__all__ = ["occlusion", "occlusion_positions"]


def _pair(name: str, value: Any) -> tuple[int, int]:
    values = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                               for v in values):
        raise ValueError(f"{name} must be an int >= 1 or a pair (height, width) of them; got {value!r}")
    return int(values[0]), int(values[1])


def occlusion_positions(image_size: tuple[int, int], sliding_window_shapes: Any,
                        strides: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The windows' top-left rows and columns, as Captum places them.

    Args:
      image_size: (height, width).
      sliding_window_shapes: window (height, width), or one int for both.
      strides: step (height, width), one int, or None for 1.

    Returns:
      ``(rows int [n_rows], cols int [n_cols])``: every window is one (row, col) pair.

    Raises:
      ValueError: a window larger than the image, or a stride larger than a window that does not span the image
        (pixels would be left uncovered; Captum asserts the same).
    """
    window = _pair("sliding_window_shapes", sliding_window_shapes)
    stride = _pair("strides", 1 if strides is None else strides)
    positions = []
    for axis, (size, w, s) in enumerate(zip(image_size, window, stride)):
        if w > size:
            raise ValueError(f"sliding_window_shapes {window} exceeds the image size {tuple(image_size)}")
        if w < size and s > w:
            raise ValueError(f"strides {stride} must not exceed the window {window} (axis {axis}): pixels would be "
                             "left uncovered")
        positions.append(np.arange(math.ceil((size - w) / s) + 1) * s)
    return positions[0], positions[1]


def occlusion(
    output_fn: Callable[[Array], Array],
    images: Array,
    targets: Any = None,
    *,
    sliding_window_shapes: Any = (8, 8),
    strides: Any = None,
    baselines: Array | float = 0.0,
    score: Score = "logit",
    windows_per_step: int = 16,
) -> Array:
    """Occlusion maps for a batch (Zeiler & Fergus 2014; Captum's ``Occlusion``).

    Args:
      output_fn: ``images [batch, height, width, channels] -> logits [batch, num_classes]`` in inference mode.
      images: [batch, height, width, channels] float.
      targets: ``None`` (predicted class), ``int``, int [batch], or a target set (int [batch, k],
        :func:`~saliency_jax.saliency.target_sets.top_k`: the ``k`` maps share the occluded forwards).
      sliding_window_shapes: the window (height, width) in pixels (or one int), over all channels (Captum's
        ``(channels, height, width)``).
      strides: its step (height, width), one int, or None (1, Captum's default).
      baselines: what occluded pixels become: a number, or an array broadcastable to ``images`` ([height, width,
        channels], [batch, height, width, channels]).
      score: ``"logit"`` (Captum: the model's output for the target) or ``"softmax"``.
      windows_per_step: occluded copies per ``vmap`` (memory vs. speed; the result does not depend on it beyond float
        summation order).

    Returns:
      float32 [batch, (k,) height, width], signed (Captum's attribution, the same for every channel); NaN for examples
      with a NaN / inf pixel or an out-of-range target.

    Raises:
      ValueError: bad window / strides (:func:`occlusion_positions`), a baseline that does not broadcast, bad
        targets, unknown ``score``, ``windows_per_step`` < 1.
    """
    check_images(images)
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    if isinstance(windows_per_step, bool) or not isinstance(windows_per_step, (int, np.integer)) \
            or windows_per_step < 1:
        raise ValueError(f"windows_per_step must be an int >= 1; got {windows_per_step!r}")
    height, width = images.shape[1:3]
    rows, cols = occlusion_positions((height, width), sliding_window_shapes, strides)
    wh, ww = _pair("sliding_window_shapes", sliding_window_shapes)
    baselines = jnp.asarray(baselines, images.dtype)
    try:
        jnp.broadcast_shapes(baselines.shape, images.shape)
    except ValueError as e:
        raise ValueError(f"baselines of shape {tuple(baselines.shape)} do not broadcast to the images "
                         f"{tuple(images.shape)}") from e
    logits = output_fn(images)
    _check_logits(logits, images.shape[0], "output_fn")
    multi = is_target_set(targets)
    classes = resolve_target_set(targets, logits) if multi else resolve_targets(targets, logits)

    def scores(outputs):  # [batch] or [batch, k]
        if not multi:
            return class_scores(outputs, classes, score)
        return jax.vmap(lambda c: class_scores(outputs, c, score), in_axes=1, out_axes=1)(classes)

    reference = scores(logits)
    rows_j, cols_j = jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)
    grid_r = jnp.arange(height, dtype=jnp.int32)[:, None]
    grid_c = jnp.arange(width, dtype=jnp.int32)[None, :]

    def window_term(i):
        r0, c0 = rows_j[i // len(cols)], cols_j[i % len(cols)]
        mask = ((grid_r >= r0) & (grid_r < r0 + wh) & (grid_c >= c0) & (grid_c < c0 + ww)).astype(images.dtype)
        occluded = images * (1 - mask[None, :, :, None]) + baselines * mask[None, :, :, None]
        delta = reference - scores(output_fn(occluded))
        return delta[..., None, None] * mask.astype(jnp.float32)

    total = _chunked_sum(window_term, len(rows) * len(cols), int(windows_per_step))
    # Windows covering each pixel: separable (rows x columns), known statically.
    cover_r = ((np.arange(height)[:, None] >= rows[None]) & (np.arange(height)[:, None] < rows[None] + wh)).sum(1)
    cover_c = ((np.arange(width)[:, None] >= cols[None]) & (np.arange(width)[:, None] < cols[None] + ww)).sum(1)
    maps = total / jnp.asarray(np.outer(cover_r, cover_c), jnp.float32)
    if multi:
        return mark_invalid_sets(maps, images, classes, logits.shape[-1])
    return mark_invalid(maps, invalid_examples(images=images, classes=classes, num_classes=logits.shape[-1]))
