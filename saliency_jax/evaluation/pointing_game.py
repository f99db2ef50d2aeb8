"""The pointing game (Zhang et al. 2016): does the maximum of a saliency map fall on the object of the class?

Zhang, Lin, Brandt, Shen, Sclaroff, "Top-down Neural Attention by Excitation Backprop", ECCV 2016, Sec. 5.1;
used for spatial grounding in Bargal, "Grounding deep models of visual data", PhD thesis 2019, Sec. 7.4.1:

* for an image and a ground-truth class present in it, compute the class's saliency map at the image's resolution
  and locate its maximum point;
* a **hit** if the point lies within ``tolerance`` = 15 pixels (Euclidean) of a ground-truth pixel of that class
  (a pixel of one of its boxes for PASCAL VOC, of one of its instance masks for COCO), otherwise a **miss**;
* the accuracy of a class is ``#hits / (#hits + #misses)`` over its (image, class) trials, and the reported
  accuracy is the **mean over classes** of the class accuracies;
* the **difficult** subset keeps only the (image, class) pairs listed in a flag file: in Zhang et al. the images
  where the boxes of the class cover less than 1/4 of the image and a distractor class is present (TorchRay ships
  the table for PASCAL VOC 2007 test as ``pointing_game_ebp_voc07_difficult.txt``).

The thesis words the tolerance as "a 15-pixel diameter circle around the located point intersects the ground-truth
box"; Zhang et al.'s code and TorchRay use a *radius* of 15 pixels, as here.

Three layers of API:

* :func:`argmax_points`, :func:`hits_at_points`, :func:`pointing_hits`: pure, batched, jittable JAX functions from
  maps and masks to per-example hits (no Python loop over pixels or examples: the hit test is a vectorised
  squared-distance comparison, equivalent to dilating the mask with a disk of radius ``tolerance``);
* :class:`PointingGame`: a host-side (NumPy) accumulator of per-class hits and misses, on all pairs and on the
  difficult subset at once; :func:`load_difficult_flags` reads TorchRay's flag table;
* :func:`pointing_game_table`: a markdown table of results (rows: methods; columns: all / difficult per model).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency.core import resize_maps

Array = jax.Array

__all__ = [
    "DEFAULT_TOLERANCE",
    "PointingGame",
    "argmax_points",
    "hits_at_points",
    "load_difficult_flags",
    "pointing_game_table",
    "pointing_hits",
]

#: Tolerance of the pointing game in pixels at the original image resolution (Zhang et al. 2016).
DEFAULT_TOLERANCE: int = 15


def _check_tolerance(tolerance: Any) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number of pixels >= 0; got {tolerance!r}")
    return float(tolerance)


def argmax_points(maps: Array) -> Array:
    """The maximum point of each map, as (row, column) pixel indices.

    Ties: the **first** maximum in row-major (C) order wins, i.e. the smallest row, then the smallest column - the
    behaviour of ``torch.argmax`` on the flattened map in TorchRay and of MATLAB's ``max`` in Zhang et al.'s code
    (which scan the same flattened order). A constant map (e.g. all zeros after a ReLU) therefore points at (0, 0).
    NaN values are not checked here (inside ``jit`` values cannot raise); ``jnp.argmax`` returns the first NaN, so
    callers should test ``jnp.isfinite(maps)`` on the host (the runner in ``experiments/pointing_game.py`` does).

    Args:
      maps: [batch, height, width] real saliency maps.

    Returns:
      int32 [batch, 2]: ``(row, column)`` of each map's maximum, ``0 <= row < height``, ``0 <= column < width``.

    Raises:
      ValueError: if ``maps`` is not rank 3 or has an empty spatial axis.
      TypeError: if ``maps`` is not a real (integer or floating) array.
    """
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [batch, height, width]; got shape {tuple(maps.shape)}")
    if maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ValueError(f"maps must have a non-empty spatial extent; got shape {tuple(maps.shape)}")
    if not (jnp.issubdtype(maps.dtype, jnp.floating) or jnp.issubdtype(maps.dtype, jnp.integer)) \
            or maps.dtype == jnp.bool_:
        raise TypeError(f"maps must be real-valued (float32 saliency maps); got dtype {maps.dtype}")
    width = maps.shape[2]
    flat = jnp.argmax(maps.reshape(maps.shape[0], -1), axis=1).astype(jnp.int32)  # first maximum
    return jnp.stack([flat // width, flat % width], axis=1)


def hits_at_points(points: Array, region_masks: Array, tolerance: float = DEFAULT_TOLERANCE) -> Array:
    """Whether each point lies within ``tolerance`` pixels of its ground-truth region (the pointing-game test).

    A hit iff some pixel ``(i, j)`` of the region satisfies ``(i - row)**2 + (j - column)**2 <= tolerance**2``:
    the region dilated with a disk of radius ``tolerance`` contains the point. A point at Euclidean distance exactly
    ``tolerance`` from the region is a hit. (TorchRay's ``PointingGame.evaluate`` uses a strict ``<``; the two
    differ only for region pixels at distance exactly 15, i.e. offsets (15, 0), (9, 12), (12, 9) and their
    reflections; ``tolerance=15 - 1e-3`` reproduces TorchRay.) An empty region is always a miss.

    Args:
      points: [batch, 2] ``(row, column)`` in pixels of the mask grid, integer or float (e.g. the image centre
        ``(height / 2, width / 2)`` of the "center" baseline).
      region_masks: [batch, height, width] bool (or integer, nonzero = inside): the ground-truth region of the
        class explained in each example (union of its boxes or instance masks).
      tolerance: radius in pixels (>= 0; static under ``jit``). Zhang et al. use 15.

    Returns:
      bool [batch].

    Raises:
      ValueError: on wrong ranks, mismatched batch sizes or a negative / non-finite tolerance.
      TypeError: if ``region_masks`` is floating point (pass a boolean mask, not a soft map).
    """
    tolerance = _check_tolerance(tolerance)
    points = jnp.asarray(points)
    region_masks = jnp.asarray(region_masks)
    if region_masks.ndim != 3:
        raise ValueError(f"region_masks must be [batch, height, width]; got shape {tuple(region_masks.shape)}")
    if region_masks.dtype != jnp.bool_:
        if not jnp.issubdtype(region_masks.dtype, jnp.integer):
            raise TypeError(f"region_masks must be bool (or integer 0/1); got dtype {region_masks.dtype}")
        region_masks = region_masks != 0
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] != region_masks.shape[0]:
        raise ValueError(f"points must be [batch, 2] = [{region_masks.shape[0]}, 2] (row, column); got shape "
                         f"{tuple(points.shape)}")
    _, height, width = region_masks.shape
    points = points.astype(jnp.float32)
    rows = jnp.arange(height, dtype=jnp.float32)
    cols = jnp.arange(width, dtype=jnp.float32)
    d_row = jnp.square(rows[None, :] - points[:, 0:1])  # [batch, height]
    d_col = jnp.square(cols[None, :] - points[:, 1:2])  # [batch, width]
    # Squared distances of integer offsets are exact in float32 for any realistic image (< 2**24).
    within = (d_row[:, :, None] + d_col[:, None, :]) <= jnp.float32(tolerance * tolerance)
    return jnp.any(within & region_masks, axis=(1, 2))


def pointing_hits(maps: Array, region_masks: Array, tolerance: float = DEFAULT_TOLERANCE) -> Array:
    """Pointing-game hits for a batch of saliency maps (Zhang et al. 2016, Sec. 5.1).

    The maximum point of each map (first maximum on ties, see :func:`argmax_points`) is tested against the
    ground-truth region of the explained class with :func:`hits_at_points`. Maps must be at the image (mask)
    resolution; maps of another size are first resized bilinearly to the mask size with
    :func:`saliency_jax.saliency.resize_maps` (half-pixel centres, as TorchRay's ``resize=image_size``).
    Batched and jittable (``tolerance`` static).

    Args:
      maps: [batch, h, w] float32 saliency maps, one per (image, class) pair; any scale (only the argmax matters).
      region_masks: [batch, height, width] bool ground-truth region of the class of each map, at the original
        image resolution (pixels).
      tolerance: radius in pixels at the mask resolution; 15 in Zhang et al.

    Returns:
      bool [batch]: True for a hit.

    Raises:
      ValueError: on wrong ranks, mismatched batch sizes or a bad tolerance.
      TypeError: on non-real maps or floating-point masks.

    Example:
      >>> import jax.numpy as jnp
      >>> maps = jnp.zeros((1, 40, 40)).at[0, 5, 5].set(1.0)
      >>> mask = jnp.zeros((1, 40, 40), bool).at[0, 20, 5].set(True)   # 15 px below the peak
      >>> bool(pointing_hits(maps, mask)[0]), bool(pointing_hits(maps, mask, tolerance=14)[0])
      (True, False)
    """
    maps = jnp.asarray(maps)
    region_masks = jnp.asarray(region_masks)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [batch, h, w]; got shape {tuple(maps.shape)}")
    if region_masks.ndim != 3:
        raise ValueError(f"region_masks must be [batch, height, width]; got shape {tuple(region_masks.shape)}")
    if maps.shape[0] != region_masks.shape[0]:
        raise ValueError(f"maps and region_masks need the same batch size; got {maps.shape[0]} and "
                         f"{region_masks.shape[0]}")
    if tuple(maps.shape[1:]) != tuple(region_masks.shape[1:]):
        if not jnp.issubdtype(maps.dtype, jnp.floating):
            raise TypeError(f"maps of dtype {maps.dtype} cannot be resized; pass float maps")
        maps = resize_maps(maps, tuple(region_masks.shape[1:]))
    return hits_at_points(argmax_points(maps), region_masks, tolerance)


# ---------------------------------------------------------------------------------------------------------------
# Host-side accumulation.


def load_difficult_flags(path: str | os.PathLike, num_classes: int) -> dict[str, np.ndarray]:
    """Reads a difficult-subset flag table (TorchRay's ``pointing_game_ebp_voc07_difficult.txt`` format).

    One line per image: the image id (file name without extension, e.g. ``000001`` for VOC, ``COCO_val2014_...``
    for COCO) followed by ``num_classes`` flags 0/1, separated by tabs or spaces; flag ``c`` is 1 when the pair
    (image, class c) belongs to the difficult subset. Blank lines are ignored.

    Args:
      path: the flag file.
      num_classes: number of flags per line (20 for PASCAL VOC, 80 for COCO).

    Returns:
      ``{image_id: bool [num_classes]}``.

    Raises:
      FileNotFoundError: if ``path`` does not exist (naming it).
      ValueError: naming the file and line, on a wrong number of flags, a flag other than 0/1 or a repeated id.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"difficult flag file not found: {path!r}")
    flags: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            image_id, values = fields[0], fields[1:]
            if len(values) != num_classes:
                raise ValueError(f"{path}:{line_no}: expected an image id and {num_classes} flags, got "
                                 f"{len(values)} flags")
            if any(v not in ("0", "1") for v in values):
                raise ValueError(f"{path}:{line_no}: flags must be 0 or 1, got {values}")
            if image_id in flags:
                raise ValueError(f"{path}:{line_no}: image id {image_id!r} is listed twice")
            flags[image_id] = np.array([v == "1" for v in values], dtype=bool)
    if not flags:
        raise ValueError(f"difficult flag file {path!r} lists no images")
    return flags


class PointingGame:
    """Accumulates pointing-game hits and misses per class, on all pairs and on the difficult subset.

    Zhang et al. 2016, Sec. 5.1: the accuracy of class ``c`` is ``hits_c / (hits_c + misses_c)``; the reported
    accuracy is the mean of the class accuracies. Classes with no trial are left out of the mean (TorchRay instead
    averages over all ``num_classes``, counting a class without trials as 0; the two agree whenever every class has
    a trial, as on the full VOC 2007 test set).

    The difficult subset: with ``difficult`` flags (see :func:`load_difficult_flags`), a trial (image, class) is
    also counted in the difficult counters when ``difficult[image_id][class]`` is set. Every image id passed to
    :meth:`update` must be listed in the table (TorchRay silently keeps unlisted images in its difficult subset;
    here an unlisted image is an error, so a wrong or partial flag file cannot pass unnoticed).

    Args:
      num_classes: number of classes (20 for PASCAL VOC, 80 for COCO).
      class_names: optional names of the classes (for :meth:`results`); default ``"0"``, ``"1"``, ...
      difficult: optional ``{image_id: bool [num_classes]}`` difficult flags.

    Attributes:
      hits, misses: int64 [num_classes] counts over all trials.
      difficult_hits, difficult_misses: int64 [num_classes] counts over the difficult trials.

    Raises:
      ValueError: on a bad ``num_classes``, a ``class_names`` of the wrong length or flags of the wrong shape.

    Example:
      >>> game = PointingGame(num_classes=2)
      >>> game.update(hits=np.array([True, False, True]), class_ids=np.array([0, 0, 1]))
      >>> float(game.accuracy())   # mean of 1/2 and 1/1
      0.75
    """

    def __init__(self, num_classes: int, *, class_names: Sequence[str] | None = None,
                 difficult: Mapping[str, Any] | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
        self.num_classes = int(num_classes)
        if class_names is None:
            class_names = [str(c) for c in range(self.num_classes)]
        class_names = [str(n) for n in class_names]
        if len(class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes is {self.num_classes}")
        self.class_names = tuple(class_names)
        self.difficult: dict[str, np.ndarray] | None = None
        if difficult is not None:
            self.difficult = {}
            for image_id, flags in difficult.items():
                flags = np.asarray(flags)
                if flags.shape != (self.num_classes,) or flags.dtype != np.bool_:
                    raise ValueError(f"difficult flags of image {image_id!r} must be bool [{self.num_classes}]; got "
                                     f"{flags.dtype} {flags.shape}")
                self.difficult[str(image_id)] = flags
        self.reset()

    def reset(self) -> None:
        """Sets every counter to zero."""
        self.hits = np.zeros(self.num_classes, np.int64)
        self.misses = np.zeros(self.num_classes, np.int64)
        self.difficult_hits = np.zeros(self.num_classes, np.int64)
        self.difficult_misses = np.zeros(self.num_classes, np.int64)

    def update(self, hits: Any, class_ids: Any, image_ids: Sequence[str] | None = None) -> None:
        """Adds a batch of trials.

        Args:
          hits: bool [n] (e.g. :func:`pointing_hits` moved to the host).
          class_ids: int [n] class of each trial, in [0, num_classes).
          image_ids: n image ids (file name stems); required when difficult flags were given.

        Raises:
          ValueError: on shape mismatches, out-of-range classes, missing ``image_ids`` when difficult flags are
            set, or an image id absent from the flag table.
          TypeError: if ``hits`` is not boolean or ``class_ids`` not integer.
        """
        hits = np.asarray(hits)
        class_ids = np.asarray(class_ids)
        if hits.ndim != 1:
            raise ValueError(f"hits must be bool [n]; got shape {hits.shape}")
        if hits.dtype != np.bool_:
            raise TypeError(f"hits must be boolean; got dtype {hits.dtype}")
        if class_ids.shape != hits.shape:
            raise ValueError(f"class_ids must have the shape of hits {hits.shape}; got {class_ids.shape}")
        if class_ids.size and (class_ids.dtype == np.bool_ or not np.issubdtype(class_ids.dtype, np.integer)):
            raise TypeError(f"class_ids must be integer class indices; got dtype {class_ids.dtype}")
        class_ids = class_ids.astype(np.int64)
        if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= self.num_classes):
            raise ValueError(f"class_ids must lie in [0, {self.num_classes}); got values in "
                             f"[{class_ids.min()}, {class_ids.max()}]")
        in_difficult = None
        if self.difficult is not None:
            if image_ids is None:
                raise ValueError("image_ids are required when the pointing game has difficult flags")
            image_ids = [str(i) for i in image_ids]
            if len(image_ids) != hits.shape[0]:
                raise ValueError(f"image_ids has {len(image_ids)} entries but hits has {hits.shape[0]}")
            missing = sorted({i for i in image_ids if i not in self.difficult})
            if missing:
                raise ValueError(f"image ids not listed in the difficult flag table: {missing[:10]}"
                                 + (f" ... ({len(missing)} in all)" if len(missing) > 10 else ""))
            in_difficult = np.array([bool(self.difficult[i][c]) for i, c in zip(image_ids, class_ids)], bool)
        elif image_ids is not None and len(image_ids) != hits.shape[0]:
            raise ValueError(f"image_ids has {len(image_ids)} entries but hits has {hits.shape[0]}")
        np.add.at(self.hits, class_ids[hits], 1)
        np.add.at(self.misses, class_ids[~hits], 1)
        if in_difficult is not None:
            np.add.at(self.difficult_hits, class_ids[hits & in_difficult], 1)
            np.add.at(self.difficult_misses, class_ids[~hits & in_difficult], 1)

    def _counts(self, subset: str) -> tuple[np.ndarray, np.ndarray]:
        if subset == "all":
            return self.hits, self.misses
        if subset == "difficult":
            if self.difficult is None:
                raise ValueError("no difficult flags were given to this PointingGame")
            return self.difficult_hits, self.difficult_misses
        raise ValueError(f"subset must be 'all' or 'difficult'; got {subset!r}")

    def class_accuracies(self, subset: str = "all") -> np.ndarray:
        """Per-class accuracy ``hits / (hits + misses)``.

        Args:
          subset: ``"all"`` or ``"difficult"``.

        Returns:
          float64 [num_classes], NaN for classes without a trial in the subset.

        Raises:
          ValueError: on an unknown subset, or ``"difficult"`` without difficult flags.
        """
        hits, misses = self._counts(subset)
        trials = hits + misses
        out = np.full(self.num_classes, np.nan)
        np.divide(hits, trials, out=out, where=trials > 0)
        return out

    def accuracy(self, subset: str = "all") -> float:
        """Mean over classes (with at least one trial) of the class accuracies (Zhang et al. 2016).

        Args:
          subset: ``"all"`` or ``"difficult"``.

        Returns:
          The accuracy in [0, 1]; NaN if no trial was recorded in the subset (undefined, not 0).

        Raises:
          ValueError: on an unknown subset, or ``"difficult"`` without difficult flags.
        """
        per_class = self.class_accuracies(subset)
        valid = ~np.isnan(per_class)
        return float(per_class[valid].mean()) if valid.any() else float("nan")

    def results(self) -> dict[str, Any]:
        """The result dict: accuracies on all pairs and on the difficult subset, per class and overall.

        Returns:
          ``{"all": float, "difficult": float (only with difficult flags), "per_class": {"all": {name: acc},
          "difficult": {name: acc}}, "hits": {name: int}, "misses": {name: int}, "difficult_hits": ...,
          "difficult_misses": ..., "trials": int, "difficult_trials": int}``; accuracies in [0, 1], NaN where
          undefined (no trials); classes without trials are left out of the per-class dicts.
        """
        def per_class(values: np.ndarray) -> dict[str, float]:
            return {n: float(v) for n, v in zip(self.class_names, values) if not np.isnan(v)}

        def counts(values: np.ndarray) -> dict[str, int]:
            return {n: int(v) for n, v in zip(self.class_names, values)}

        out: dict[str, Any] = {"all": self.accuracy("all"),
                               "per_class": {"all": per_class(self.class_accuracies("all"))},
                               "hits": counts(self.hits), "misses": counts(self.misses),
                               "trials": int(self.hits.sum() + self.misses.sum())}
        if self.difficult is not None:
            out["difficult"] = self.accuracy("difficult")
            out["per_class"]["difficult"] = per_class(self.class_accuracies("difficult"))
            out["difficult_hits"] = counts(self.difficult_hits)
            out["difficult_misses"] = counts(self.difficult_misses)
            out["difficult_trials"] = int(self.difficult_hits.sum() + self.difficult_misses.sum())
        return out

    def __repr__(self) -> str:
        text = f"PointingGame(num_classes={self.num_classes}, all={100 * self.accuracy('all'):.1f}%"
        if self.difficult is not None:
            text += f", difficult={100 * self.accuracy('difficult'):.1f}%"
        return text + ")"


def pointing_game_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], *, title: str | None = None) -> str:
    """A markdown table of pointing accuracies, shaped like Zhang et al. 2016 Table 2 / TorchRay's benchmark.

    Args:
      results: ``{model_name: {method_name: PointingGame.results()}}`` (each inner dict needs ``"all"`` and may
        have ``"difficult"``).
      title: optional first line (e.g. ``"PASCAL VOC 2007 test"``).

    Returns:
      Markdown: one row per method (in order of first appearance), columns ``<model> all`` and
      ``<model> difficult`` in percent with one decimal; ``-`` where a result is missing or undefined.

    Raises:
      ValueError: if ``results`` is empty.
    """
    if not results:
        raise ValueError("results is empty: nothing to tabulate")
    models = list(results)
    methods: list[str] = []
    for model in models:
        for method in results[model]:
            if method not in methods:
                methods.append(method)

    def cell(model: str, method: str, subset: str) -> str:
        value = results[model].get(method, {}).get(subset)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{100 * float(value):.1f}"

    header = ["method"] + [f"{m} {s}" for m in models for s in ("all", "difficult")]
    lines = [] if title is None else [title, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for method in methods:
        row = [method] + [cell(m, method, s) for m in models for s in ("all", "difficult")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
