"""User-given regions: polygons drawn once on a template and rasterised, and per-class templates as a data field.

The poster's workflow (seed 003): the user looks at the Grad-CAM maps of a few images and, where the network relies
on the wrong evidence, marks the right region *once* on a template of the (aligned) image; that template is the
region ``S`` of every image of the class. Here a template is data: a list of polygons, each a list of ``(x, y)``
vertices in the pixel coordinates of a reference frame (e.g. the 178 x 218 aligned CelebA face), rasterised with
Pillow's ``ImageDraw.polygon`` at the size the images have when they are read.

:class:`TemplateRegionSource` adds the field ``"region"`` (the template of each example's class) to any
single-label source; the pipeline then resizes, rotates and flips it together with the image
(:data:`saliency_jax.data.pipeline.SPATIAL_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "Polygon",
    "rasterize_polygons",
    "rasterize_templates",
    "TemplateRegionSource",
]

Polygon = Sequence[tuple[float, float]]
"""A closed polygon: ``(x, y)`` vertices in pixels of the reference frame (x to the right, y down)."""


def _check_polygon(polygon: Any, where: str) -> list[tuple[float, float]]:
    try:
        points = [(float(p[0]), float(p[1])) for p in polygon if len(p) == 2]
        complete = len(points) == len(polygon)
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{where}: vertices must be (x, y) number pairs; got {polygon!r}") from e
    if not complete:
        raise ValueError(f"{where}: vertices must be (x, y) number pairs; got {polygon!r}")
    if len(points) < 3:
        raise ValueError(f"{where}: a polygon needs at least 3 vertices; got {len(points)}")
    if not all(math.isfinite(v) for p in points for v in p):
        raise ValueError(f"{where}: vertices must be finite; got {points}")
    return points


def rasterize_polygons(polygons: Sequence[Polygon], size: tuple[int, int], frame: tuple[int, int] | None = None, *,
                       where: str = "rasterize_polygons") -> np.ndarray:
    """Rasterises the union of polygons into a binary mask.

    Vertices are given in the pixel coordinates of ``frame`` (pixel centres at integers, as Pillow's) and mapped to
    the output by the half-pixel rule ``x' = (x + 0.5) * width / frame_width - 0.5`` (likewise for y), the
    convention of the bilinear resize the images go through; then Pillow's ``ImageDraw.polygon`` fills the
    interior and the outline.

    Args:
      polygons: one or more polygons, each >= 3 ``(x, y)`` vertices.
      size: ``(height, width)`` of the output mask in pixels.
      frame: ``(width, height)`` of the coordinate frame of the vertices (Pillow's order, e.g. ``(178, 218)`` for
        aligned CelebA); None = the output's own ``(width, height)``.
      where: name used in error messages (e.g. the attribute the template belongs to).

    Returns:
      [height, width] float32 in {0, 1}.

    Raises:
      ValueError: no polygon, a polygon with fewer than 3 vertices or non-numeric / non-finite vertices, or a
        non-positive size or frame.
    """
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"{where}: size must be positive (height, width); got {size}")
    frame_w, frame_h = (width, height) if frame is None else (float(frame[0]), float(frame[1]))
    if not (frame_w > 0 and frame_h > 0):
        raise ValueError(f"{where}: frame must be positive (width, height); got {frame}")
    if isinstance(polygons, (str, bytes)) or not len(polygons):
        raise ValueError(f"{where}: need at least one polygon; got {polygons!r}")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for k, polygon in enumerate(polygons):
        points = _check_polygon(polygon, f"{where}: polygon {k}")
        scaled = [((x + 0.5) * width / frame_w - 0.5, (y + 0.5) * height / frame_h - 0.5) for x, y in points]
        draw.polygon(scaled, fill=1, outline=1)
    return np.asarray(canvas, dtype=np.float32)


def rasterize_templates(templates: Mapping[str, Sequence[Polygon]], names: Sequence[str], size: tuple[int, int],
                        frame: tuple[int, int] | None = None) -> np.ndarray:
    """Rasterises the templates of several classes (or attributes), in the order of ``names``.

    Args:
      templates: ``{name: [polygon, ...]}`` as in a config.
      names: the classes whose templates to draw, in output order.
      size: ``(height, width)`` of each mask.
      frame: ``(width, height)`` of the vertices' coordinate frame (see :func:`rasterize_polygons`).

    Returns:
      [len(names), height, width] float32 in {0, 1}.

    Raises:
      ValueError: a name without a template (listing those that have one), or as :func:`rasterize_polygons`.
    """
    missing = [n for n in names if n not in templates]
    if missing:
        raise ValueError(f"no region template for {missing}; templates exist for {sorted(templates)}")
    masks = [rasterize_polygons(templates[n], size, frame, where=f"region template {n!r}") for n in names]
    return np.stack(masks) if masks else np.zeros((0, *size), np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class TemplateRegionSource:
    """A single-label source whose items also carry ``"region"``: the template of the example's class.

    Attributes:
      source: random-access source with items ``{"image": [h, w, c], "label": int, ...}`` and ``num_classes``.
      templates: [num_classes, h, w] float32 in [0, 1], the user's region per class, at the items' image size
        (e.g. from :func:`rasterize_templates`).

    Items are the source's with ``"region": [h, w] float32 = templates[label]``. ``num_classes``, ``labels``,
    ``class_names`` and any other attribute are the wrapped source's.

    Raises:
      ValueError: templates not [num_classes, h, w] with values in [0, 1] (at construction), or an item whose image
        size differs from the templates' (when read).
    """

    source: Any
    templates: np.ndarray

    def __post_init__(self):
        templates = np.asarray(self.templates, dtype=np.float32)
        num_classes = int(self.source.num_classes)
        if templates.ndim != 3 or templates.shape[0] != num_classes:
            raise ValueError(f"TemplateRegionSource: templates must be [num_classes={num_classes}, height, width]; "
                             f"got shape {templates.shape}")
        if templates.size and not (np.all(np.isfinite(templates)) and templates.min() >= 0 and templates.max() <= 1):
            raise ValueError("TemplateRegionSource: templates must lie in [0, 1]")
        templates = templates.copy()
        templates.setflags(write=False)
        object.__setattr__(self, "templates", templates)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        item = dict(self.source[index])
        label = np.asarray(item["label"])
        if label.ndim != 0:
            raise ValueError(f"TemplateRegionSource: item {index} has label shape {label.shape}; per-class templates "
                             "need single-label sources (multi-label sources carry one template per attribute)")
        if item["image"].shape[:2] != self.templates.shape[1:]:
            raise ValueError(f"TemplateRegionSource: item {index} has image size {item['image'].shape[:2]} but the "
                             f"templates are {self.templates.shape[1:]}")
        item["region"] = self.templates[int(label)]
        return item

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "templates") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return f"TemplateRegionSource({self.source!r}, templates={self.templates.shape})"
