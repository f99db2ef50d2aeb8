"""PASCAL VOC 2007 detection annotations as pointing-game data: image, classes present, per-class box masks.

Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010. The layout read here is the
devkit's::

    VOC2007/
      Annotations/<image_id>.xml        one XML per image (read with xml.etree.ElementTree)
      ImageSets/Main/<split>.txt        image ids of a split, one per line ("test": 4952 images)
      JPEGImages/<image_id>.jpg         the images (read with Pillow)

Each XML holds ``filename``, ``size`` (``width``, ``height``, ``depth``) and ``object`` elements with ``name``,
``difficult`` (0/1) and ``bndbox`` (``xmin``, ``ymin``, ``xmax``, ``ymax``: 1-based pixel coordinates, both ends
inclusive). The class mask of a class is the union of all its boxes, pixels
``[ymin - 1, ymax - 1] x [xmin - 1, xmax - 1]`` (0-based, inclusive), as TorchRay's ``voc_as_mask``.

Pointing-game conventions (Zhang et al. 2016; TorchRay's ``PointingGameBenchmark``): a class is evaluated on an
image (:attr:`VOCAnnotation.class_ids`) when at least one of its boxes is not marked "difficult"; its mask
includes its difficult boxes too. Classes whose boxes are all difficult are in :attr:`VOCAnnotation.all_class_ids`
only.

Registered as the spec ``"voc07"`` of :func:`saliency_jax.data.get_source` (option ``limit``).

>>> data = load_voc("data/VOCdevkit/VOC2007", split="test")            # doctest: +SKIP
>>> item = data[0]; item["image"].shape, item["class_masks"].shape       # doctest: +SKIP
((375, 500, 3), (20, 375, 500))
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
from PIL import Image

from saliency_jax.data.core import SOURCES, require_data_dir

__all__ = [
    "VOC_CLASSES",
    "VOCAnnotation",
    "VOCObject",
    "VOCPointingData",
    "find_voc_root",
    "load_image",
    "load_voc",
    "parse_voc_xml",
    "read_image_set",
    "voc_class_masks",
]

#: The 20 PASCAL VOC class names in the standard (devkit, TorchRay) order; a class id is an index into this.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}


@dataclasses.dataclass(frozen=True)
class VOCObject:
    """One annotated object.

    Attributes:
      name: class name (one of :data:`VOC_CLASSES`).
      class_id: index of ``name`` in :data:`VOC_CLASSES`.
      box: ``(xmin, ymin, xmax, ymax)`` in 1-based pixel coordinates, both ends inclusive, as in the XML.
      difficult: the VOC "difficult" flag.
    """

    name: str
    class_id: int
    box: tuple[int, int, int, int]
    difficult: bool


@dataclasses.dataclass(frozen=True)
class VOCAnnotation:
    """The annotation of one image.

    Attributes:
      image_id: file name stem (``"000001"``), the key of difficult-flag tables.
      filename: image file name from the XML (``"000001.jpg"``).
      width, height: image size in pixels.
      objects: the annotated objects.
      path: the XML file it was read from.
    """

    image_id: str
    filename: str
    width: int
    height: int
    objects: tuple[VOCObject, ...]
    path: str = ""

    @property
    def class_ids(self) -> tuple[int, ...]:
        """Sorted ids of the classes evaluated by the pointing game: those with at least one non-difficult box."""
        return tuple(sorted({o.class_id for o in self.objects if not o.difficult}))

    @property
    def all_class_ids(self) -> tuple[int, ...]:
        """Sorted ids of every class with a box, difficult or not."""
        return tuple(sorted({o.class_id for o in self.objects}))

    def class_masks(self) -> np.ndarray:
        """Per-class union of boxes; see :func:`voc_class_masks`."""
        return voc_class_masks(self)


def _text(element: ET.Element, tag: str, path: str, where: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"malformed VOC annotation {path!r}: missing <{tag}> in {where}")
    return child.text.strip()


def _int(element: ET.Element, tag: str, path: str, where: str) -> int:
    text = _text(element, tag, path, where)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"malformed VOC annotation {path!r}: <{tag}> in {where} is not a number: {text!r}") from None
    if not value.is_integer():
        raise ValueError(f"malformed VOC annotation {path!r}: <{tag}> in {where} must be an integer pixel "
                         f"coordinate, got {text!r}")
    return int(value)


def parse_voc_xml(path: str | os.PathLike) -> VOCAnnotation:
    """Parses one VOC annotation XML.

    Boxes are kept as in the file (1-based, inclusive); a box reaching past the image border is clipped to the
    image when masks are drawn (:func:`voc_class_masks`).

    Args:
      path: ``Annotations/<image_id>.xml``.

    Returns:
      :class:`VOCAnnotation`; ``image_id`` is the stem of ``<filename>`` (the XML's stem if that is missing).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming the file, if the XML does not parse, lacks ``size``/``width``/``height``, an object lacks
        ``name`` or ``bndbox`` coordinates, a class name is not a VOC class, a coordinate is not an integer, a box
        is inverted (``xmax < xmin`` or ``ymax < ymin``) or the size is not positive.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VOC annotation file not found: {path!r}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"malformed VOC annotation {path!r}: {e}") from e
    if root.tag != "annotation":
        raise ValueError(f"malformed VOC annotation {path!r}: root element is <{root.tag}>, expected <annotation>")
    filename_el = root.find("filename")
    filename = filename_el.text.strip() if filename_el is not None and filename_el.text else ""
    image_id = os.path.splitext(filename)[0] if filename else pathlib.Path(path).stem
    size = root.find("size")
    if size is None:
        raise ValueError(f"malformed VOC annotation {path!r}: missing <size>")
    width = _int(size, "width", path, "<size>")
    height = _int(size, "height", path, "<size>")
    if width < 1 or height < 1:
        raise ValueError(f"malformed VOC annotation {path!r}: image size must be positive, got {width}x{height}")
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"object #{k}"
        name = _text(obj, "name", path, where)
        if name not in _CLASS_INDEX:
            raise ValueError(f"malformed VOC annotation {path!r}: {where} has unknown class {name!r}; expected one "
                             f"of {VOC_CLASSES}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"malformed VOC annotation {path!r}: {where} ({name}) has no <bndbox>")
        box = tuple(_int(bndbox, t, path, f"{where} <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax"))
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"malformed VOC annotation {path!r}: {where} ({name}) has an inverted box "
                             f"(xmin, ymin, xmax, ymax) = {box}")
        difficult_el = obj.find("difficult")
        difficult = False
        if difficult_el is not None and difficult_el.text is not None and difficult_el.text.strip():
            flag = difficult_el.text.strip()
            if flag not in ("0", "1"):
                raise ValueError(f"malformed VOC annotation {path!r}: {where} has <difficult>{flag}</difficult>, "
                                 "expected 0 or 1")
            difficult = flag == "1"
        objects.append(VOCObject(name=name, class_id=_CLASS_INDEX[name], box=box, difficult=difficult))
    return VOCAnnotation(image_id=image_id, filename=filename or f"{image_id}.jpg", width=width, height=height,
                         objects=tuple(objects), path=path)


def voc_class_masks(annotation: VOCAnnotation, num_classes: int = len(VOC_CLASSES)) -> np.ndarray:
    """Per-class ground-truth regions: the union of the boxes of each class (difficult boxes included).

    Box ``(xmin, ymin, xmax, ymax)`` (1-based, inclusive) covers rows ``ymin - 1 .. ymax - 1`` and columns
    ``xmin - 1 .. xmax - 1``, clipped to the image.

    Args:
      annotation: a parsed annotation.
      num_classes: number of class planes (20).

    Returns:
      bool [num_classes, height, width]; plane ``c`` is all False when class ``c`` is absent.
    """
    masks = np.zeros((num_classes, annotation.height, annotation.width), dtype=bool)
    for obj in annotation.objects:
        xmin, ymin, xmax, ymax = obj.box
        r0, r1 = max(ymin - 1, 0), min(ymax, annotation.height)
        c0, c1 = max(xmin - 1, 0), min(xmax, annotation.width)
        masks[obj.class_id, r0:r1, c0:c1] = True
    return masks


def find_voc_root(data_dir: str | os.PathLike, year: str = "2007") -> pathlib.Path:
    """The ``VOC<year>`` folder (with ``Annotations/`` and ``ImageSets/``) under ``data_dir``.

    Args:
      data_dir: the ``VOC<year>`` folder itself, or a folder containing ``VOCdevkit/VOC<year>`` or ``VOC<year>``.
      year: ``"2007"``.

    Returns:
      The folder holding ``Annotations/``.

    Raises:
      FileNotFoundError: naming every place looked at, if none has ``Annotations/``.
    """
    data_dir = pathlib.Path(data_dir)
    candidates = [data_dir, data_dir / "VOCdevkit" / f"VOC{year}", data_dir / f"VOC{year}"]
    for candidate in candidates:
        if (candidate / "Annotations").is_dir():
            return candidate
    raise FileNotFoundError(f"no PASCAL VOC {year} tree (a folder with Annotations/) found; looked in "
                            f"{[str(c) for c in candidates]}")


def read_image_set(root: str | os.PathLike, split: str = "test") -> list[str]:
    """Image ids of a split, from ``ImageSets/Main/<split>.txt``.

    Args:
      root: the ``VOC2007`` folder.
      split: ``"test"``, ``"trainval"``, ``"train"`` or ``"val"``.

    Returns:
      The ids in file order (first whitespace-separated field of each non-blank line).

    Raises:
      FileNotFoundError: if the split file does not exist (naming it).
      ValueError: if it lists no ids or an id twice.
    """
    path = pathlib.Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"VOC image set file not found: {str(path)!r}")
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"VOC image set file {str(path)!r} lists no images")
    if len(set(ids)) != len(ids):
        raise ValueError(f"VOC image set file {str(path)!r} lists some image ids more than once")
    return ids


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as RGB.

    Args:
      path: an image file Pillow can read (JPEG for VOC and COCO).

    Returns:
      float32 [height, width, 3] in [0, 1] (grayscale images are replicated to 3 channels).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming the file, if Pillow cannot decode it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {path!r}: {type(e).__name__}: {e}") from e
    return array.astype(np.float32) / 255.0


class VOCPointingData:
    """Random-access PASCAL VOC split for the pointing game (annotations parsed eagerly, images read lazily).

    Attributes:
      root: the ``VOC2007`` folder.
      split: the image set.
      annotations: one :class:`VOCAnnotation` per image, in split order.
      class_names: :data:`VOC_CLASSES`.
      num_classes: 20.

    ``data[i]`` returns a dict:

    * ``"image_id"``: str, e.g. ``"000001"``;
    * ``"image"``: float32 [height, width, 3] in [0, 1];
    * ``"class_ids"``: int32 [k] the classes evaluated on this image (at least one non-difficult box), sorted;
    * ``"class_masks"``: bool [20, height, width] union of each class's boxes.

    Raises (on ``data[i]``):
      FileNotFoundError: missing JPEG; ValueError: undecodable image, or image size differing from the XML's.
    """

    def __init__(self, root: str | os.PathLike, split: str, annotations: list[VOCAnnotation]):
        self.root = pathlib.Path(root)
        self.split = split
        self.annotations = list(annotations)
        self.class_names = VOC_CLASSES
        self.num_classes = len(VOC_CLASSES)

    def __len__(self) -> int:
        return len(self.annotations)

    def image_path(self, index: int) -> pathlib.Path:
        """Path of the JPEG of image ``index``."""
        return self.root / "JPEGImages" / self.annotations[index].filename

    def __getitem__(self, index: int) -> dict[str, Any]:
        annotation = self.annotations[index]
        image = load_image(self.image_path(index))
        if image.shape[:2] != (annotation.height, annotation.width):
            raise ValueError(f"image {str(self.image_path(index))!r} is {image.shape[1]}x{image.shape[0]} (WxH) but "
                             f"its annotation {annotation.path!r} says {annotation.width}x{annotation.height}")
        return {
            "image_id": annotation.image_id,
            "image": image,
            "class_ids": np.asarray(annotation.class_ids, np.int32),
            "class_masks": annotation.class_masks(),
        }

    def __repr__(self) -> str:
        return f"VOCPointingData(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"


def load_voc(data_dir: str | os.PathLike, split: str = "test", *, year: str = "2007",
             limit: int | None = None) -> VOCPointingData:
    """Reads the annotations of a PASCAL VOC split (default: VOC 2007 test, the pointing-game benchmark).

    Args:
      data_dir: the ``VOC2007`` folder or a parent (see :func:`find_voc_root`).
      split: image set name (``ImageSets/Main/<split>.txt``).
      year: ``"2007"``.
      limit: keep only the first ``limit`` images of the split (None or 0: all), for quick runs.

    Returns:
      :class:`VOCPointingData`.

    Raises:
      FileNotFoundError: missing tree, split file or annotation XML (naming the path).
      ValueError: malformed XML (naming the file), or a negative ``limit``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (0 or None: all images); got {limit}")
    root = find_voc_root(data_dir, year)
    ids = read_image_set(root, split)
    if limit:
        ids = ids[:limit]
    annotations = [parse_voc_xml(root / "Annotations" / f"{image_id}.xml") for image_id in ids]
    return VOCPointingData(root, split, annotations)


@SOURCES.register("voc07", options=("limit",), templates=False)
def _voc07_source(spec, split, data_dir, image_size, **options):
    """:func:`load_voc` of VOC 2007 (``get_source("voc07", split, data_dir, options={"limit": n})``)."""
    if image_size is not None:
        raise ValueError(f"get_source({spec!r}): localisation data are not resized (the pointing game resizes each "
                         f"image itself); set image_size None, got {image_size}")
    return load_voc(require_data_dir(spec, data_dir), split, year="2007", **options)
