"""Seeing saliency maps: RGB overlays, the saliency grids of Morales et al. 2021 (Figs. 2-3), training curves,
Guided Zoom's evidence patches.

:func:`overlay` blends heat maps over images into RGB arrays (pure JAX, batched, jittable: usable for TensorBoard
images or any plotting library). Figures 2 and 3 of "Playing to distraction" show, for a few test images, the input
(column a) and the Grad-CAM heat map of each trained model overlaid on it (columns b-e: FT-ResNet50, 0-occlusion,
R-occlusion, 1-occlusion); :func:`saliency_figure` draws that grid, with a colour bar for the map scale and, when
given the models' probabilities, the predicted class and its probability under each panel.
:func:`training_curves_figure` draws loss / accuracy against the training step for each arm, with the validation
curve where the history has one.

:func:`evidence_pool_figure` draws Guided Zoom's evidence patches (Bargal 2019, Figs. 6.3-6.5).

:func:`frame_sums_figure` draws per-frame grounding scores over time (Bargal 2019, Fig. 7.6) and
:func:`clip_maps_figure` sample clips with their per-frame maps (Fig. 7.5).

The figures are written as PNG files through matplotlib's Agg canvas (``matplotlib.figure.Figure``, no ``pyplot``:
no window, no global figure state); each function returns the path written.
"""

from __future__ import annotations

import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.cm
import matplotlib.colors
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from saliency_jax.saliency.core import normalize_maps

__all__ = ["TRAIN_CURVE_NOTE", "clip_maps_figure", "evidence_pool_figure", "frame_sums_figure", "overlay",
           "saliency_figure", "signed_overlay", "training_curves_figure"]

_RANGE_TOLERANCE = 1e-6  # Values this far outside [0, 1] are float rounding, clipped silently.


def _as_unit_interval(array: Any, name: str) -> np.ndarray:
    """Returns ``array`` as float32 after checking it is finite and in [0, 1]."""
    try:
        values = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a numeric array: {error}") from None
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    if values.size and (values.min() < -_RANGE_TOLERANCE or values.max() > 1 + _RANGE_TOLERANCE):
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{values.min():.4g}, {values.max():.4g}]; normalise it first."
        )
    return np.clip(values, 0.0, 1.0)


def _prepare_path(path: str | os.PathLike[str]) -> pathlib.Path:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _save(figure: Figure, path: str | os.PathLike[str], dpi: int) -> pathlib.Path:
    """Writes ``figure`` as a PNG to ``path`` (creating its folder); returns the path."""
    out = _prepare_path(path)
    figure.savefig(out, format="png", dpi=dpi)
    return out


def _colormap(name: Any) -> matplotlib.colors.Colormap:
    try:
        return matplotlib.colormaps[name]
    except (KeyError, TypeError):
        raise ValueError(f"colormap {name!r} is not a matplotlib colour map name.") from None


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    return float(alpha)


def overlay(
    images: Any,
    maps: Any,
    *,
    colormap: str = "jet",
    alpha: float = 0.5,
    normalize: bool = False,
) -> jax.Array:
    """Heat maps blended over images, as RGB: ``(1 - alpha) * image + alpha * colormap(map)``.

    The colour of a map value ``v`` in [0, 1] is matplotlib's: entry ``min(floor(v * N), N - 1)`` of the colour
    map's ``N``-entry table (``N = 256`` for ``"jet"``), so ``overlay`` equals ``(1 - alpha) * image + alpha *
    matplotlib.colormaps[colormap](v)[..., :3]``. Grey images are repeated over the three channels. Pure JAX on a
    colour table built once on the host: jittable (``colormap``, ``alpha`` and ``normalize`` static) and batched.

    To save or display as 8-bit: ``np.asarray(overlay(...) * 255).round().astype(np.uint8)``.

    Args:
      images: [batch, height, width, channels] float in [0, 1], channels 1 (grey) or 3 (RGB).
      maps: [batch, height, width] float saliency maps at the image resolution (resize lower-resolution maps with
        :func:`saliency_jax.saliency.resize_maps`), in [0, 1] unless ``normalize``.
      colormap: a matplotlib colour map name (``"jet"``, as the Grad-CAM papers; ``"viridis"``, ...).
      alpha: weight of the heat map in [0, 1] (0: the image, 1: the heat map alone).
      normalize: min-max normalise each map to [0, 1] first (:func:`saliency_jax.saliency.normalize_maps`; a
        constant map becomes 0), for maps in any range.

    Returns:
      float32 [batch, height, width, 3] RGB in [0, 1].

    Raises:
      ValueError: if the shapes do not match (naming both), channels is not 1 or 3, ``colormap`` or ``alpha`` is
        invalid, or (for concrete, not traced, arrays) values are non-finite or outside [0, 1] (images; maps unless
        ``normalize``). Under ``jax.jit`` values cannot be checked: they are clipped to [0, 1].
    """
    table = _colormap(colormap)
    alpha = _check_alpha(alpha)
    images = jnp.asarray(images)
    maps = jnp.asarray(maps)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [batch, height, width, channels] with channels 1 or 3, got {images.shape}.")
    if maps.shape != images.shape[:3]:
        raise ValueError(f"maps must be [batch, height, width] = {images.shape[:3]} to match images, got "
                         f"{maps.shape}; resize them with saliency_jax.saliency.resize_maps.")
    if not isinstance(images, jax.core.Tracer):
        _as_unit_interval(images, "images")
    if normalize:
        maps = normalize_maps(maps)
    elif not isinstance(maps, jax.core.Tracer):
        _as_unit_interval(maps, "maps")
    lut = jnp.asarray(table(np.arange(table.N))[:, :3], jnp.float32)  # [N, 3]
    index = jnp.clip(jnp.floor(jnp.clip(maps.astype(jnp.float32), 0.0, 1.0) * table.N), 0, table.N - 1)
    heat = lut[index.astype(jnp.int32)]
    rgb = jnp.broadcast_to(jnp.clip(images.astype(jnp.float32), 0.0, 1.0), (*images.shape[:3], 3))
    return (1.0 - alpha) * rgb + alpha * heat


def signed_overlay(
    images: Any,
    maps: Any,
    *,
    colormap: str = "RdBu_r",
    alpha: float = 0.5,
    scale: float | None = None,
) -> jax.Array:
    """Signed maps (gradient x input, LRP, contrastive EB before clipping, raw Grad-CAM: evidence for and against)
    blended over images with a diverging colour map centred at 0: :func:`overlay` of ``0.5 + 0.5 * map / s``, so 0 is
    the colour map's middle (white for ``"RdBu_r"``), ``+s`` its top (red) and ``-s`` its bottom (blue).

    Args:
      images: [batch, height, width, channels] float in [0, 1], channels 1 or 3.
      maps: [batch, height, width] float, any sign (``normalize=False`` maps), at the image resolution.
      colormap: a diverging matplotlib colour map (``"RdBu_r"``: negative blue, positive red; ``"bwr"``, ...).
      alpha: weight of the heat map in [0, 1].
      scale: ``s``, the magnitude shown at the colour map's ends (larger values are clipped), the same for every map,
        so that maps compare; None: each map's own largest ``|value|`` (a zero map is drawn as 0 everywhere).

    Returns:
      float32 [batch, height, width, 3] RGB in [0, 1].

    Raises:
      ValueError: as :func:`overlay`; ``scale`` not a positive finite number; (concrete arrays) non-finite maps.

    >>> out = signed_overlay(jnp.zeros((1, 2, 2, 1)), jnp.array([[[-1.0, 0.0], [0.5, 1.0]]]), alpha=1.0)
    >>> out.shape, bool(out[0, 0, 0, 2] > out[0, 0, 0, 0]), bool(out[0, 1, 1, 0] > out[0, 1, 1, 2])
    ((1, 2, 2, 3), True, True)
    """
    maps = jnp.asarray(maps, jnp.float32)
    if scale is not None and not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}.")
    if not isinstance(maps, jax.core.Tracer) and maps.size and not bool(jnp.all(jnp.isfinite(maps))):
        raise ValueError("maps contain non-finite values.")
    if scale is None:
        s = jnp.max(jnp.abs(maps), axis=tuple(range(1, maps.ndim)), keepdims=True) if maps.ndim else jnp.abs(maps)
        s = jnp.where(s > 0, s, 1.0)
    else:
        s = jnp.float32(scale)
    centred = jnp.clip(0.5 + 0.5 * maps / s, 0.0, 1.0)
    return overlay(images, centred, colormap=colormap, alpha=alpha)


def _check_probabilities(value: Any, num_rows: int, name: str) -> np.ndarray:
    try:
        probs = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a numeric array [n, num_classes]: {error}") from None
    if probs.ndim != 2 or probs.shape[0] != num_rows or probs.shape[1] < 1:
        raise ValueError(f"{name} must be probabilities [n={num_rows}, num_classes], got shape {probs.shape}.")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1 + 1e-6 \
            or np.any(np.abs(probs.sum(axis=1) - 1.0) > 1e-3):
        raise ValueError(f"{name} must hold softmax probabilities (each row in [0, 1], summing to 1); pass "
                         "jax.nn.softmax(logits).")
    return probs


def saliency_figure(
    images: Any,
    maps: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    cell_inches: float = 2.0,
    dpi: int = 100,
    predictions: Any = None,
    class_names: Sequence[str] | None = None,
    colorbar: bool = True,
    colorbar_label: str = "saliency",
) -> pathlib.Path:
    """Writes a PNG grid of input images and heat maps overlaid on them (Morales 2021, Figs. 2-3).

    Row ``i`` shows image ``i``: column 0 the input ("input"), then one column per entry of
    ``maps`` (in the dict's order, headed by its key) with that map drawn with :func:`overlay` (colour map ``cmap``,
    weight ``alpha``). Maps are shown on a fixed [0, 1] colour scale, so columns are comparable; a colour bar at
    the right shows it. Under a panel, ``predictions`` add the predicted class (``class_names`` or its index) and
    its probability. Each cell is ``cell_inches`` wide and keeps the image's aspect ratio; the PNG is therefore
    about ``(1 + len(maps)) * cell_inches * dpi`` pixels wide (plus the colour bar) and
    ``n * cell_inches * height / width * dpi`` pixels high, plus margins for headers, labels and title.

    Args:
      images: [n, height, width, channels] float in [0, 1], channels 1 (grey) or 3 (RGB).
      maps: dict column name -> [n, height, width] float saliency maps in [0, 1] (e.g.
        ``{"baseline": ..., "0-occlusion": ...}``), at the image resolution.
      path: output PNG file; missing parent directories are created.
      row_labels: optional ``n`` strings written left of each row (e.g. the true class).
      title: optional figure title.
      alpha: opacity in [0, 1] of the heat map over the image.
      cmap: name of a matplotlib colour map for the heat maps.
      cell_inches: width of one cell in inches (> 0).
      dpi: resolution in pixels per inch (positive int).
      predictions: optional class probabilities (softmax outputs) [n, num_classes]: one array, written under the
        input column (one model explained by several methods), or a dict column name -> array (one model per
        column, e.g. the arms of an experiment; ``"input"`` names the input column).
      class_names: optional names of the ``num_classes`` classes for the predictions.
      colorbar: draw a colour bar for the [0, 1] map scale at the right.
      colorbar_label: its label.

    Returns:
      The path written, as a ``pathlib.Path``.

    Raises:
      ValueError: if ``images`` is not [n, height, width, 1 or 3] with n >= 1, a map's shape is
        not [n, height, width] (the message names the column), values are non-finite or outside
        [0, 1], ``row_labels`` does not have ``n`` entries, ``maps`` is not a dict, ``alpha``,
        ``cmap``, ``cell_inches`` or ``dpi`` is invalid, ``predictions`` are not probabilities [n, num_classes]
        or name an unknown column, or ``class_names`` does not have ``num_classes`` entries.
    """
    images = _as_unit_interval(images, "images")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1 or min(images.shape[1:3]) < 1:
        raise ValueError(
            f"images must have shape [n, height, width, channels] with n >= 1 and channels 1 or 3, got {images.shape}."
        )
    num_rows, height, width, channels = images.shape
    if not isinstance(maps, Mapping):
        raise ValueError(f"maps must be a dict column name -> [n, h, w] array, got {type(maps)}.")
    checked_maps: dict[str, np.ndarray] = {}
    for column, saliency in maps.items():
        values = _as_unit_interval(saliency, f"maps[{column!r}]")
        if values.shape != (num_rows, height, width):
            raise ValueError(
                f"maps[{column!r}] must have shape [n, height, width] = "
                f"{(num_rows, height, width)} to match images, got {values.shape}."
            )
        checked_maps[str(column)] = values
    if row_labels is not None:
        if isinstance(row_labels, str) or len(row_labels) != num_rows:
            raise ValueError(f"row_labels must be a sequence of n={num_rows} strings, got {row_labels!r}.")
    alpha = _check_alpha(alpha)
    try:
        colormap = matplotlib.colormaps[cmap]
    except (KeyError, TypeError):
        raise ValueError(f"cmap {cmap!r} is not a matplotlib colour map name.") from None
    if not (isinstance(cell_inches, numbers.Real) and cell_inches > 0):
        raise ValueError(f"cell_inches must be positive, got {cell_inches!r}.")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}.")
    column_names = ["input"] + list(checked_maps)
    if predictions is None:
        predictions = {}
    elif not isinstance(predictions, Mapping):
        predictions = {"input": predictions}
    checked_predictions: dict[str, np.ndarray] = {}
    for column, probs in predictions.items():
        if str(column) not in column_names:
            raise ValueError(f"predictions[{column!r}] names no column; columns are {column_names}.")
        checked_predictions[str(column)] = _check_probabilities(probs, num_rows, f"predictions[{column!r}]")
    if class_names is not None:
        for column, probs in checked_predictions.items():
            if isinstance(class_names, str) or len(class_names) != probs.shape[1]:
                raise ValueError(f"class_names must have num_classes={probs.shape[1]} entries (predictions"
                                 f"[{column!r}]), got {class_names!r}.")

    # Layout in inches; axes are placed explicitly so the pixel size is predictable.
    num_cols = len(column_names)
    cell_w = float(cell_inches)
    cell_h = cell_w * height / width
    gap = 0.05 * cell_w
    header = 0.3
    title_h = 0.4 if title else 0.0
    caption_h = 0.22 if checked_predictions else 0.0  # room under each row for the predicted class
    row_h = cell_h + caption_h
    left = 0.3 if row_labels is not None else gap
    bar_w = 0.75 if colorbar else 0.0  # colour bar (0.15) plus its ticks and label
    fig_w = left + num_cols * cell_w + (num_cols - 1) * gap + gap + bar_w
    fig_h = title_h + header + num_rows * row_h + (num_rows - 1) * gap + gap

    figure = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(figure)
    blended = {name: np.asarray(overlay(images, saliency, colormap=cmap, alpha=alpha))
               for name, saliency in checked_maps.items()}
    for row in range(num_rows):
        image = images[row, :, :, 0] if channels == 1 else images[row]
        for col, name in enumerate(column_names):
            x0 = left + col * (cell_w + gap)
            y0 = fig_h - title_h - header - row * (row_h + gap) - cell_h
            axes = figure.add_axes((x0 / fig_w, y0 / fig_h, cell_w / fig_w, cell_h / fig_h))
            if name in blended:
                axes.imshow(blended[name][row], vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                axes.imshow(image, cmap="gray" if channels == 1 else None, vmin=0.0, vmax=1.0,
                            interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(name, fontsize=9)
            if col == 0 and row_labels is not None:
                axes.set_ylabel(str(row_labels[row]), fontsize=8)
            if name in checked_predictions:
                probs = checked_predictions[name][row]
                predicted = int(np.argmax(probs))
                label = class_names[predicted] if class_names is not None else str(predicted)
                axes.set_xlabel(f"pred {label} ({probs[predicted]:.2f})", fontsize=7, labelpad=2)
    if colorbar:
        bar_h = num_rows * row_h + (num_rows - 1) * gap
        bar_x = left + num_cols * cell_w + (num_cols - 1) * gap + gap
        bar_axes = figure.add_axes((bar_x / fig_w, gap / fig_h, 0.15 / fig_w, bar_h / fig_h))
        mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=colormap)
        bar = figure.colorbar(mappable, cax=bar_axes)
        bar.set_label(colorbar_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        figure.text(0.5, 1.0 - 0.5 * title_h / fig_h, title, ha="center", va="center", fontsize=11)
    return _save(figure, path, dpi)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: What the training curves measure: the loss and accuracy the train step logs, on its own (possibly occluded)
#: mini-batches, averaged over the log interval.
TRAIN_CURVE_NOTE = "solid: training batches (possibly occluded)"


def training_curves_figure(
    history: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
    validation_prefix: str | None = "val_",
    train_note: str | None = TRAIN_CURVE_NOTE,
) -> pathlib.Path:
    """Writes a PNG with one panel per metric (loss, accuracy, ...) against step, a line per arm.

    The train loop logs ``loss`` and ``accuracy`` on the mini-batches it trains on - after the training scheme
    changed them (e.g. Grad-CAM occlusion) - and ``val_accuracy`` on held-out clean images. So the panel of metric
    ``m`` draws ``m`` as a solid line per arm and, where the records have ``validation_prefix + m``, that as a
    dashed line of the same colour; each panel with a training curve says so under its title (``train_note``).

    Args:
      history: dict arm name -> list of records ``{"step": int, "loss": float, "accuracy":
        float, "val_accuracy": float, ...}`` in any order (sorted by step before plotting). A record may lack a
        metric; non-numeric entries (e.g. ``"split": "eval"``) are ignored; NaN values leave gaps.
      path: output PNG file; missing parent directories are created.
      metrics: metric names to plot, one panel each, in this order; default: every numeric key
        other than ``"step"``, in order of first appearance, except validation keys whose training metric has a
        panel (they are drawn in it).
      title: optional figure title.
      dpi: resolution in pixels per inch (positive int).
      validation_prefix: prefix of the validation counterpart of a metric (``"val_"``); None: no pairing, every
        metric in its own panel.
      train_note: the line under each panel title that says what the solid (training) curves are measured on;
        None for none. The dashed validation line is named in the legend.

    Returns:
      The path written, as a ``pathlib.Path``.

    Raises:
      ValueError: if ``history`` is empty or not a dict of lists of dicts, a record lacks a
        numeric ``"step"``, no metric is found, or a requested metric has no value in any arm.
    """
    if not isinstance(history, Mapping) or not history:
        raise ValueError("history must be a non-empty dict arm -> list of records.")
    found: dict[str, None] = {}
    for arm, records in history.items():
        if isinstance(records, (str, Mapping)) or not isinstance(records, Sequence) or not records:
            raise ValueError(f"history[{arm!r}] must be a non-empty list of dicts.")
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise ValueError(f"history[{arm!r}][{i}] must be a dict, got {type(record).__name__}.")
            if not _is_number(record.get("step")):
                raise ValueError(f"history[{arm!r}][{i}] needs a numeric 'step', got {record!r}.")
            for name, value in record.items():
                if name != "step" and _is_number(value):
                    found[name] = None

    def validation_of(metric: str) -> str | None:
        if not validation_prefix or metric.startswith(validation_prefix):
            return None
        name = validation_prefix + metric
        return name if name in found else None

    if metrics is None:
        paired = {validation_of(m) for m in found} - {None}
        metrics = [m for m in found if m not in paired]
    else:
        if isinstance(metrics, str):
            raise ValueError("metrics must be a sequence of metric names, got a single string.")
        metrics = list(metrics)
        missing = [m for m in metrics if m not in found]
        if missing:
            raise ValueError(f"metrics {missing} have no numeric value in history; found {list(found)}.")
    if not metrics:
        raise ValueError("history holds no numeric metric besides 'step'.")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}.")

    def points(records, name):
        return sorted((float(r["step"]), float(r[name])) for r in records if _is_number(r.get(name)))

    figure = Figure(figsize=(4.0 * len(metrics), 3.4 + (0.3 if title else 0.0)), dpi=dpi)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axes, metric in zip(panels, metrics):
        validation = validation_of(metric)
        is_training = not (validation_prefix and metric.startswith(validation_prefix))
        for arm_index, (arm, records) in enumerate(history.items()):
            colour = f"C{arm_index % 10}"
            for name, style, label in ((metric, "-", str(arm)), (validation, "--", f"{arm} (validation)")):
                line = points(records, name) if name else []
                if line:
                    steps, values = zip(*line)
                    axes.plot(steps, values, style, label=label, color=colour,
                              marker="." if len(line) < 30 else None)
        axes.set_xlabel("step")
        axes.set_ylabel(metric)
        note = f"\n{train_note}" if train_note and is_training else ""
        axes.set_title(f"{metric}{note}", fontsize=9 if note else None)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path, dpi)


_ROUND_COLOURS = ("#ff3030", "#30c030", "#3080ff", "#ffb000", "#c040ff", "#00c0c0")


def evidence_pool_figure(
    originals: Any,
    patches: Any,
    valid: Any,
    path: str | os.PathLike[str],
    *,
    boxes: Any = None,
    column_titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.5,
    dpi: int = 100,
) -> pathlib.Path:
    """Writes a PNG of Guided Zoom evidence patches (Bargal 2019, Figs. 6.3-6.5).

    Row ``i`` shows image ``i``: column 0 the original with the patch boxes outlined (one colour per column), then
    one column per pool row (erasing round ``l = 0, 1, 2`` for Guided Zoom: the most salient patch, then after one
    and two erasures; or one column per grounding method for Ensemble Guided Zoom). A patch that did not enter the
    pool (``valid`` False: the erased image was misclassified) is drawn faded and marked "x".

    Args:
      originals: [n, H, W, channels] float in [0, 1], channels 1 or 3.
      patches: [R, n, h, w, channels] float (``EvidencePool.patches``); clipped to [0, 1] (bicubic overshoot).
      valid: [R, n] bool (``EvidencePool.valid``).
      path: output PNG file; missing parent directories are created.
      boxes: optional int [R, n, 4] ``(top, left, bottom, right)`` in ``originals`` pixels (``EvidencePool.boxes``).
      column_titles: ``R`` headers (default ``"l = 0"``, ``"l = 1"``, ...).
      row_labels: optional ``n`` strings left of each row (e.g. the class name).
      title: optional figure title.
      cell_inches: width of one cell in inches (> 0).
      dpi: pixels per inch (positive int).

    Returns:
      The path written.

    Raises:
      ValueError: inconsistent shapes, values outside [0, 1] in ``originals``, non-finite patches, wrong number of
        titles or labels, bad ``cell_inches`` / ``dpi``.
    """
    originals = _as_unit_interval(originals, "originals")
    if originals.ndim != 4 or originals.shape[-1] not in (1, 3) or originals.shape[0] < 1:
        raise ValueError(f"originals must be [n, height, width, 1 or 3] with n >= 1, got {originals.shape}.")
    num_rows, height, width, channels = originals.shape
    patches = np.asarray(patches, dtype=np.float32)
    if patches.ndim != 5 or patches.shape[1] != num_rows or patches.shape[-1] != channels:
        raise ValueError(f"patches must be [R, {num_rows}, h, w, {channels}], got {patches.shape}.")
    if patches.size and not np.all(np.isfinite(patches)):
        raise ValueError("patches contain NaN or infinite values.")
    patches = np.clip(patches, 0.0, 1.0)
    num_pool_rows = patches.shape[0]
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (num_pool_rows, num_rows):
        raise ValueError(f"valid must be [{num_pool_rows}, {num_rows}], got {valid.shape}.")
    if boxes is not None:
        boxes = np.asarray(boxes)
        if boxes.shape != (num_pool_rows, num_rows, 4):
            raise ValueError(f"boxes must be [{num_pool_rows}, {num_rows}, 4], got {boxes.shape}.")
    if column_titles is None:
        column_titles = [f"l = {r}" for r in range(num_pool_rows)]
    if isinstance(column_titles, str) or len(column_titles) != num_pool_rows:
        raise ValueError(f"column_titles must be {num_pool_rows} strings, got {column_titles!r}.")
    if row_labels is not None and (isinstance(row_labels, str) or len(row_labels) != num_rows):
        raise ValueError(f"row_labels must be a sequence of n={num_rows} strings, got {row_labels!r}.")
    if not (isinstance(cell_inches, numbers.Real) and cell_inches > 0):
        raise ValueError(f"cell_inches must be positive, got {cell_inches!r}.")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}.")

    num_cols = 1 + num_pool_rows
    cell = float(cell_inches)
    gap = 0.05 * cell
    header = 0.3
    title_h = 0.4 if title else 0.0
    left = 0.3 if row_labels is not None else gap
    fig_w = left + num_cols * cell + (num_cols - 1) * gap + gap
    fig_h = title_h + header + num_rows * cell + (num_rows - 1) * gap + gap
    figure = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(figure)
    grey = "gray" if channels == 1 else None
    for row in range(num_rows):
        y0 = fig_h - title_h - header - (row + 1) * cell - row * gap
        for col in range(num_cols):
            x0 = left + col * (cell + gap)
            axes = figure.add_axes((x0 / fig_w, y0 / fig_h, cell / fig_w, cell / fig_h))
            axes.set_xticks([])
            axes.set_yticks([])
            if col == 0:
                axes.imshow(originals[row].squeeze(-1) if channels == 1 else originals[row], cmap=grey, vmin=0.0,
                            vmax=1.0, interpolation="nearest")
                for r in range(num_pool_rows if boxes is not None else 0):
                    top, lft, bottom, rgt = (float(v) for v in boxes[r, row])
                    axes.add_patch(Rectangle(
                        (lft - 0.5, top - 0.5), rgt - lft, bottom - top, fill=False, linewidth=1.5,
                        linestyle="-" if valid[r, row] else ":", edgecolor=_ROUND_COLOURS[r % len(_ROUND_COLOURS)]))
                if row == 0:
                    axes.set_title("image", fontsize=9)
                if row_labels is not None:
                    axes.set_ylabel(str(row_labels[row]), fontsize=8)
                continue
            r = col - 1
            patch = patches[r, row]
            axes.imshow(patch.squeeze(-1) if channels == 1 else patch, cmap=grey, vmin=0.0, vmax=1.0,
                        interpolation="nearest", alpha=1.0 if valid[r, row] else 0.25)
            if not valid[r, row]:
                axes.text(0.5, 0.5, "x", transform=axes.transAxes, ha="center", va="center", fontsize=14,
                          color="black")
            for spine in axes.spines.values():
                spine.set_edgecolor(_ROUND_COLOURS[r % len(_ROUND_COLOURS)])
                spine.set_linewidth(1.5)
            if row == 0:
                axes.set_title(str(column_titles[r]), fontsize=9)
    if title:
        figure.text(0.5, 1.0 - 0.5 * title_h / fig_h, title, ha="center", va="center", fontsize=11)
    return _save(figure, path, dpi)


def frame_sums_figure(
    panels: Mapping[str, Mapping[str, tuple[Any, Any]]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    ylabel: str = "sum of the frame's map",
    boundary: float | None = None,
    dpi: int = 100,
) -> pathlib.Path:
    """Writes a PNG of per-frame scores over time, mean and standard deviation over clips (Bargal 2019, Fig. 7.6).

    One panel per entry of ``panels`` (e.g. per method: cEB-R, EB-R, the class probability), one line per curve
    (e.g. the layouts ``rand + GT`` and ``GT + rand``) with a band of +-1 standard deviation.

    Args:
      panels: ``{panel title: {curve label: (mean [time], std [time])}}``, float arrays of one length per curve.
      path: output PNG file; missing parent directories are created.
      title: optional figure title.
      ylabel: the y axis label of every panel.
      boundary: optional frame position (e.g. the midpoint ``time / 2`` between the segments, in frames from the
        first frame's centre: ``time / 2 - 0.5``) drawn as a dashed vertical line.
      dpi: resolution in pixels per inch.

    Returns:
      The path written.

    Raises:
      ValueError: no panels, an empty panel, or a mean and std of different shapes or not rank 1.
    """
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError("panels must be a non-empty dict title -> {curve label: (mean, std)}.")
    figure = Figure(figsize=(4.2 * len(panels), 3.4 + (0.3 if title else 0.0)), dpi=dpi)
    FigureCanvasAgg(figure)
    axes_row = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (panel, curves) in zip(axes_row, panels.items()):
        if not curves:
            raise ValueError(f"panel {panel!r} has no curves.")
        for i, (label, (mean, std)) in enumerate(curves.items()):
            mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
            if mean.ndim != 1 or mean.shape != std.shape:
                raise ValueError(f"curve {label!r} of panel {panel!r}: mean and std must be [time] arrays of one "
                                 f"shape; got {mean.shape} and {std.shape}.")
            t = np.arange(mean.shape[0])
            axes.plot(t, mean, color=f"C{i % 10}", label=str(label), marker=".")
            axes.fill_between(t, mean - std, mean + std, color=f"C{i % 10}", alpha=0.2, linewidth=0)
        axes.axhline(0.0, color="0.4", linewidth=0.8)
        if boundary is not None:
            axes.axvline(boundary, color="0.4", linestyle="--", linewidth=0.8)
        axes.set_xlabel("frame")
        axes.set_ylabel(ylabel)
        axes.set_title(str(panel))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path, dpi)


def clip_maps_figure(
    clips: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    max_frames: int = 16,
    dpi: int = 100,
) -> pathlib.Path:
    """Writes a PNG of sample clips: the frames (ground-truth box drawn, GT frames marked) and per-frame maps below.

    Maps are drawn with a diverging colour map centred at 0, one scale per row (the row's largest absolute value),
    so the signed maps of cEB-R show evidence for (red) and against (blue) the class; each map is titled with its
    sum (the frame's temporal grounding score).

    Args:
      clips: one dict per clip: ``"frames"`` [time, height, width] (or [..., 1]) float in [0, 1]; ``"maps"``
        ``{row label: [time, h, w] float}`` at any resolution (drawn stretched over the frame); optional
        ``"boxes"`` [time, 4] int (y0, x0, y1, x1), ``"gt_frames"`` [time] bool, ``"label"`` (shown in the row
        title).
      path: output PNG file; missing parent directories are created.
      title: optional figure title.
      max_frames: at most this many frames per clip (evenly spaced).
      dpi: resolution in pixels per inch.

    Returns:
      The path written.

    Raises:
      ValueError: no clips, or frames / maps / boxes of mismatched time lengths.
    """
    if not clips:
        raise ValueError("clips must hold at least one clip.")
    rows = []
    for k, clip in enumerate(clips):
        frames = np.asarray(clip["frames"], np.float32)
        if frames.ndim == 4:
            frames = frames[..., 0]
        if frames.ndim != 3:
            raise ValueError(f"clip {k}: frames must be [time, height, width]; got shape {frames.shape}.")
        time = frames.shape[0]
        for label, maps in clip["maps"].items():
            if np.shape(maps)[0] != time or np.ndim(maps) != 3:
                raise ValueError(f"clip {k}: maps {label!r} must be [time={time}, h, w]; got {np.shape(maps)}.")
        if "boxes" in clip and np.shape(clip["boxes"]) != (time, 4):
            raise ValueError(f"clip {k}: boxes must be [{time}, 4]; got {np.shape(clip['boxes'])}.")
        rows.append((k, frames, clip))
    columns = min(max(int(max_frames), 1), max(f.shape[0] for _, f, _ in rows))
    num_rows = sum(1 + len(c["maps"]) for _, _, c in rows)
    figure = Figure(figsize=(1.1 * columns + 1.0, 1.2 * num_rows + (0.4 if title else 0.0)), dpi=dpi)
    FigureCanvasAgg(figure)
    grid = figure.subplots(num_rows, columns, squeeze=False)
    r = 0
    for k, frames, clip in rows:
        time, height, width = frames.shape
        picks = np.unique(np.linspace(0, time - 1, min(columns, time)).round().astype(int))
        gt = np.asarray(clip.get("gt_frames", np.zeros(time, bool)), bool)
        for j in range(columns):
            axes = grid[r, j]
            axes.set_axis_off()
            if j >= len(picks):
                continue
            t = picks[j]
            axes.imshow(frames[t], cmap="gray", vmin=0.0, vmax=1.0)
            if "boxes" in clip:
                y0, x0, y1, x1 = (float(v) for v in clip["boxes"][t])
                axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                         edgecolor="#30c030" if gt[t] else "#ffb000", linewidth=1.0))
            axes.set_title(f"t={t}" + (" GT" if gt[t] else ""), fontsize=7)
        label = f" (class {int(clip['label'])})" if "label" in clip else ""
        grid[r, 0].text(-0.1, 0.5, f"clip {k}{label}", transform=grid[r, 0].transAxes, ha="right", va="center",
                        fontsize=7)
        r += 1
        for name, maps in clip["maps"].items():
            maps = np.asarray(maps, np.float32)
            scale = float(np.max(np.abs(maps))) or 1.0
            for j in range(columns):
                axes = grid[r, j]
                axes.set_axis_off()
                if j >= len(picks):
                    continue
                t = picks[j]
                axes.imshow(frames[t], cmap="gray", vmin=0.0, vmax=1.0)
                axes.imshow(maps[t], cmap="RdBu_r", vmin=-scale, vmax=scale, alpha=0.6,
                            extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear")
                axes.set_title(f"{maps[t].sum():+.2f}", fontsize=7)
            grid[r, 0].text(-0.1, 0.5, str(name), transform=grid[r, 0].transAxes, ha="right", va="center",
                            fontsize=7)
            r += 1
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, path, dpi)
