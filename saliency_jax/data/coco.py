"""COCO 2014 instance annotations as pointing-game data: image, categories present, per-category instance masks.

Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014. Reads ``annotations/instances_val2014.json``
with the standard library's :mod:`json` (no index is built: only the images, annotations and categories are used);
masks are rasterised and decoded by pycocotools' ``mask`` API, the reference implementation of COCO's formats.
The layout::

    <data_dir>/
      annotations/instances_<split>.json   {"images": [...], "annotations": [...], "categories": [...]}
      <split>/<file_name>                  the images (read with Pillow)

An annotation's ``segmentation`` is one of

* **polygons**: a list of ``[x1, y1, x2, y2, ...]`` in pixel coordinates (non-crowd objects), rasterised by
  pycocotools' scan converter (``frPyObjects`` + ``merge``, as ``COCO.annToRLE``): about the pixels whose centre
  ``(column + 0.5, row + 0.5)`` lies inside, so an axis-aligned rectangle with integer corners ``(x0, y0)``,
  ``(x1, y1)`` covers rows ``y0..y1-1`` and columns ``x0..x1-1`` (its area in pixels);
* **uncompressed RLE**: ``{"counts": [int, ...], "size": [height, width]}`` (crowd regions in the instances files);
* **compressed RLE**: ``{"counts": "<string>", "size": [height, width]}`` (COCO's LEB128-like text encoding).

RLE counts alternate runs of 0 and 1, starting with 0, over the mask flattened in **column-major** order.
A category's mask is the union of the masks of all its annotations (crowd annotations included), as TorchRay's
``coco_as_mask``. Category ids (1..90, with gaps) map to contiguous class ids 0..79 in increasing id order.

Registered as the spec ``"coco14"`` of :func:`saliency_jax.data.get_source` (option ``limit``).
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from saliency_jax.data.core import SOURCES, require_data_dir
from saliency_jax.data.voc import load_image

__all__ = [
    "COCOPointingData",
    "annotation_mask",
    "load_coco",
    "load_coco_instances",
    "polygons_to_mask",
    "rle_decode",
    "rle_encode",
]


def _decode(rle: Any) -> np.ndarray:
    """pycocotools ``decode`` without its NumPy 2 ``__array__(copy=...)`` DeprecationWarning (pycocotools 2.0.11)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return coco_mask.decode(rle)


def _check_size(size: Any, where: str) -> tuple[int, int]:
    if not isinstance(size, Sequence) or len(size) != 2 or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in size):
        raise ValueError(f"{where}: RLE size must be [height, width] non-negative ints; got {size!r}")
    return int(size[0]), int(size[1])


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Decodes a COCO run-length encoding (compressed string or uncompressed list of counts) into a mask.

    Uses pycocotools (``frPyObjects`` for uncompressed counts, then ``decode``). Counts are checked first, since
    pycocotools fills runs that stop short of ``height * width`` pixels with unspecified values: uncompressed counts
    must be non-negative and sum to ``height * width``; a compressed string must decode without error and re-encode
    to itself (COCO's strings are canonical: pycocotools' ``encode`` wrote them), which rejects truncated strings.

    Args:
      rle: ``{"size": [height, width], "counts": str | bytes | list[int]}``; runs alternate 0 and 1 starting with
        0, over the column-major flattened mask.

    Returns:
      bool [height, width].

    Raises:
      ValueError: if the counts do not sum to ``height * width``, are negative, the string is not a valid
        (canonical) COCO string, or the dict is malformed.
      TypeError: on counts of another type.
    """
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE must be a dict with 'size' and 'counts'; got {type(rle).__name__}"
                         + (f" with keys {sorted(rle)}" if isinstance(rle, Mapping) else ""))
    height, width = _check_size(rle["size"], "rle_decode")
    raw = rle["counts"]
    if isinstance(raw, (str, bytes)):
        text = raw.encode("ascii") if isinstance(raw, str) else raw
        compressed = {"size": [height, width], "counts": text}
        try:
            mask = _decode(compressed)
        except ValueError as e:
            raise ValueError(f"invalid compressed RLE string {text[:40]!r} for size {height}x{width}: {e}") from None
        if rle_encode(mask)["counts"].encode("ascii") != text:
            raise ValueError(f"compressed RLE string {text[:40]!r} does not cover the {height}x{width} mask "
                             "exactly (truncated or not canonical)")
        return mask.astype(bool)
    if not isinstance(raw, (list, tuple, np.ndarray)):
        raise TypeError(f"RLE counts must be a str or a list of ints; got {type(raw).__name__}")
    counts = np.asarray(raw)
    if counts.ndim != 1 or (counts.size and not np.issubdtype(counts.dtype, np.integer)):
        raise ValueError(f"uncompressed RLE counts must be a flat list of ints; got {counts.dtype} {counts.shape}")
    if counts.size and counts.min() < 0:
        raise ValueError("uncompressed RLE counts must be non-negative")
    if int(counts.sum()) != height * width:
        raise ValueError(f"RLE counts sum to {int(counts.sum())} but size {height}x{width} has "
                         f"{height * width} pixels")
    if height * width == 0:
        return np.zeros((height, width), dtype=bool)
    encoded = coco_mask.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
    return _decode(encoded).astype(bool)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Encodes a mask as a compressed COCO RLE (pycocotools ``encode``), the inverse of :func:`rle_decode`.

    Args:
      mask: bool [height, width].

    Returns:
      ``{"size": [height, width], "counts": str}`` (the string as COCO's JSON files hold it).

    Raises:
      ValueError: if ``mask`` is not 2-D.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [height, width]; got shape {mask.shape}")
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterises COCO polygons (their union) with pycocotools (``frPyObjects`` + ``merge`` + ``decode``).

    pycocotools' scan conversion sets about the pixels whose centre ``(column + 0.5, row + 0.5)`` lies inside, so
    the mask's area is about the polygon's: the rectangle with corners ``(2, 2)`` and ``(7, 5)`` sets rows 2..4 and
    columns 2..6.
    Polygons with one or two points (zero area) set no pixel; they are padded to three points here because
    pycocotools would read four coordinates as a bounding box.

    Args:
      polygons: list of flat coordinate lists ``[x1, y1, x2, y2, ...]`` in pixels (x: column, y: row).
      height, width: the image size.

    Returns:
      bool [height, width], True inside any polygon.

    Raises:
      ValueError: if a polygon has an odd number of coordinates, fewer than one point, or non-numeric or
        non-finite entries.
    """
    checked = []
    for k, polygon in enumerate(polygons):
        try:
            coords = np.asarray(polygon, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"polygon #{k} has non-numeric coordinates") from e
        if coords.ndim != 1 or coords.size < 2 or coords.size % 2:
            raise ValueError(f"polygon #{k} must be a flat list [x1, y1, x2, y2, ...] with an even number (>= 2) of "
                             f"coordinates; got shape {coords.shape}")
        if not np.all(np.isfinite(coords)):
            raise ValueError(f"polygon #{k} has non-finite coordinates")
        if coords.size < 6:  # a point or a segment: repeat the last point (zero area either way)
            coords = np.concatenate([coords] + [coords[-2:]] * ((6 - coords.size) // 2))
        checked.append(coords.tolist())
    if not checked or height * width == 0:
        return np.zeros((height, width), dtype=bool)
    return _decode(coco_mask.merge(coco_mask.frPyObjects(checked, height, width))).astype(bool)


def annotation_mask(annotation: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """The mask of one COCO annotation (as pycocotools ``COCO.annToMask``), whatever its segmentation format.

    Args:
      annotation: a COCO annotation dict with ``segmentation`` (polygons, uncompressed or compressed RLE).
      height, width: the image size.

    Returns:
      bool [height, width].

    Raises:
      ValueError: naming the annotation id, on a missing/malformed segmentation or an RLE whose size differs from
        the image's.
    """
    ann_id = annotation.get("id", "?")
    segmentation = annotation.get("segmentation")
    try:
        if isinstance(segmentation, list):
            return polygons_to_mask(segmentation, height, width)
        if isinstance(segmentation, Mapping):
            size = _check_size(segmentation.get("size"), "segmentation")
            if size != (height, width):
                raise ValueError(f"RLE size {list(size)} differs from the image size [{height}, {width}]")
            return rle_decode(segmentation)
    except (ValueError, TypeError) as e:
        raise ValueError(f"annotation {ann_id}: bad segmentation: {e}") from e
    raise ValueError(f"annotation {ann_id}: segmentation must be a list of polygons or an RLE dict; got "
                     f"{type(segmentation).__name__}")


def _require(record: Mapping[str, Any], keys: Sequence[str], what: str, path: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"malformed COCO annotation file {path!r}: {what} lacks {missing}")


class COCOPointingData:
    """Random-access COCO instances for the pointing game (JSON parsed eagerly, images and masks lazily).

    Attributes:
      annotation_file: the JSON it was read from.
      image_dir: folder holding the images.
      images: image records (``id``, ``file_name``, ``height``, ``width``), in increasing ``id`` order.
      category_ids: the COCO category ids, increasing; ``class_id = category_ids.index(category_id)``.
      class_names: category names in class-id order.
      num_classes: number of categories (80 for COCO 2014).

    ``data[i]`` returns a dict:

    * ``"image_id"``: str, the file name stem (``"COCO_val2014_000000000042"``), the key of difficult tables;
    * ``"coco_id"``: int, the COCO image id;
    * ``"image"``: float32 [height, width, 3] in [0, 1];
    * ``"class_ids"``: int32 [k] the classes with at least one annotation on the image, sorted;
    * ``"class_masks"``: bool [num_classes, height, width], the union of each class's instance masks.

    Raises (on ``data[i]``):
      FileNotFoundError: missing image; ValueError: undecodable image, image size differing from the JSON's, or a
      malformed segmentation (naming the annotation).
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike | None,
                 dataset: Mapping[str, Any], *, skip_empty: bool = True, limit: int | None = None):
        path = os.fspath(annotation_file)
        self.annotation_file = path
        self.image_dir = pathlib.Path(image_dir) if image_dir is not None else None
        for key in ("images", "annotations", "categories"):
            if key not in dataset or not isinstance(dataset[key], list):
                raise ValueError(f"malformed COCO annotation file {path!r}: missing list {key!r}")
        categories = dataset["categories"]
        for c in categories:
            _require(c, ("id", "name"), "a category", path)
        categories = sorted(categories, key=lambda c: c["id"])
        self.category_ids = tuple(int(c["id"]) for c in categories)
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"malformed COCO annotation file {path!r}: repeated category ids")
        self.class_names = tuple(str(c["name"]) for c in categories)
        self.num_classes = len(self.category_ids)
        class_of = {cid: i for i, cid in enumerate(self.category_ids)}

        images = {}
        for record in dataset["images"]:
            _require(record, ("id", "file_name", "height", "width"), "an image", path)
            images[record["id"]] = record
        self._annotations: dict[Any, list[Mapping[str, Any]]] = {}
        for ann in dataset["annotations"]:
            _require(ann, ("image_id", "category_id", "segmentation"), f"annotation {ann.get('id', '?')}", path)
            if ann["image_id"] not in images:
                raise ValueError(f"malformed COCO annotation file {path!r}: annotation {ann.get('id', '?')} refers "
                                 f"to unknown image id {ann['image_id']}")
            if ann["category_id"] not in class_of:
                raise ValueError(f"malformed COCO annotation file {path!r}: annotation {ann.get('id', '?')} has "
                                 f"unknown category id {ann['category_id']}")
            self._annotations.setdefault(ann["image_id"], []).append(ann)
        self._class_of = class_of
        ids = sorted(images)
        if skip_empty:
            ids = [i for i in ids if self._annotations.get(i)]
        if limit:
            ids = ids[:limit]
        self.images = [images[i] for i in ids]

    def __len__(self) -> int:
        return len(self.images)

    def annotations_of(self, index: int) -> list[Mapping[str, Any]]:
        """The annotation dicts of image ``index``."""
        return list(self._annotations.get(self.images[index]["id"], []))

    def class_ids(self, index: int) -> np.ndarray:
        """int32 [k]: sorted class ids with at least one annotation on image ``index``."""
        return np.asarray(sorted({self._class_of[a["category_id"]] for a in self.annotations_of(index)}), np.int32)

    def class_masks(self, index: int) -> np.ndarray:
        """bool [num_classes, height, width]: per-class union of the instance masks of image ``index``."""
        record = self.images[index]
        height, width = int(record["height"]), int(record["width"])
        masks = np.zeros((self.num_classes, height, width), dtype=bool)
        for ann in self.annotations_of(index):
            masks[self._class_of[ann["category_id"]]] |= annotation_mask(ann, height, width)
        return masks

    def image_path(self, index: int) -> pathlib.Path:
        """Path of the image file of image ``index``.

        Raises:
          ValueError: if the data was loaded without an image folder.
        """
        if self.image_dir is None:
            raise ValueError("no image_dir was given: only annotations and masks are available")
        return self.image_dir / self.images[index]["file_name"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.images[index]
        image = load_image(self.image_path(index))
        if image.shape[:2] != (int(record["height"]), int(record["width"])):
            raise ValueError(f"image {str(self.image_path(index))!r} is {image.shape[1]}x{image.shape[0]} (WxH) but "
                             f"{self.annotation_file!r} says {record['width']}x{record['height']}")
        return {
            "image_id": os.path.splitext(record["file_name"])[0],
            "coco_id": int(record["id"]),
            "image": image,
            "class_ids": self.class_ids(index),
            "class_masks": self.class_masks(index),
        }

    def __repr__(self) -> str:
        return (f"COCOPointingData(annotation_file={self.annotation_file!r}, images={len(self)}, "
                f"classes={self.num_classes})")


def load_coco_instances(annotation_file: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
                        skip_empty: bool = True, limit: int | None = None) -> COCOPointingData:
    """Reads a COCO instances JSON (e.g. ``annotations/instances_val2014.json``).

    Args:
      annotation_file: the JSON file.
      image_dir: folder of the images (``<data_dir>/val2014``); None for annotations and masks only.
      skip_empty: leave out images without any annotation (nothing to point at; TorchRay evaluates nothing on them).
      limit: keep only the first ``limit`` images (by id; None or 0: all).

    Returns:
      :class:`COCOPointingData`.

    Raises:
      FileNotFoundError: if the JSON (or the given image folder) does not exist, naming it.
      ValueError: naming the file, if it is not valid JSON or lacks images / annotations / categories or their
        required fields, or refers to unknown images or categories.
    """
    path = os.fspath(annotation_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {path!r}")
    if image_dir is not None and not os.path.isdir(image_dir):
        raise FileNotFoundError(f"COCO image folder not found: {os.fspath(image_dir)!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (0 or None: all images); got {limit}")
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed COCO annotation file {path!r}: {e}") from e
    if not isinstance(dataset, Mapping):
        raise ValueError(f"malformed COCO annotation file {path!r}: top level is {type(dataset).__name__}, not an "
                         "object")
    return COCOPointingData(path, image_dir, dataset, skip_empty=skip_empty, limit=limit)


def load_coco(data_dir: str | os.PathLike, split: str = "val2014", *, limit: int | None = None) -> COCOPointingData:
    """COCO ``split`` in the standard layout: ``annotations/instances_<split>.json``, ``<split>/`` under ``data_dir``.

    Args:
      data_dir: the COCO folder.
      split: ``"val2014"`` (the pointing-game benchmark of Zhang et al.).
      limit: keep only the first ``limit`` images with annotations.

    Returns:
      :class:`COCOPointingData`.

    Raises:
      FileNotFoundError, ValueError: as :func:`load_coco_instances`.
    """
    data_dir = pathlib.Path(data_dir)
    return load_coco_instances(data_dir / "annotations" / f"instances_{split}.json", data_dir / split, limit=limit)


@SOURCES.register("coco14", options=("limit",), templates=False)
def _coco14_source(spec, split, data_dir, image_size, **options):
    """:func:`load_coco` of COCO 2014 (``get_source("coco14", "val2014", data_dir, options={"limit": n})``)."""
    if image_size is not None:
        raise ValueError(f"get_source({spec!r}): localisation data are not resized (the pointing game resizes each "
                         f"image itself); set image_size None, got {image_size}")
    return load_coco(require_data_dir(spec, data_dir), split, **options)
