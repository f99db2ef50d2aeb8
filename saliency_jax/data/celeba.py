"""CelebA (Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015) from its standard file layout.

The layout read here (as distributed; nothing is downloaded)::

    <root>/
      img_align_celeba/000001.jpg ...   aligned and cropped faces, 178 x 218 (width x height) JPEGs
      list_attr_celeba.txt              line 1: number of images; line 2: the 40 attribute names;
                                        then "<file> v_1 ... v_40" per image, v = 1 (present) or -1 (absent)
      list_eval_partition.txt           "<file> p" per image, p = 0 (train), 1 (valid), 2 (test)

Items are multi-label: ``label`` is the multi-hot vector (1 present, 0 absent) of the chosen attributes, for binary
cross-entropy over them (the poster's setting, seed 003). With region templates (polygons on the aligned face,
:data:`REGION_TEMPLATES`, one per guided attribute: the poster's "user-specified region on a template") every item
also carries ``region`` [num_guided, height, width]: the templates of the guided attributes, the same for every image
(the guidance loss uses the template of an attribute only on images where the attribute is present) and moved by
the pipeline's geometric augmentation with the image.

The co-occurrence-biased evaluation subsets of the poster - images where an attribute is present but the attribute
it usually co-occurs with is absent - are :func:`cooccurrence_subset` (:data:`COOCCURRENCE_PAIRS`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from saliency_jax.data import regions as regions_lib
from saliency_jax.data.core import SOURCES, check_image_size, require_data_dir

__all__ = [
    "CELEBA_FRAME",
    "CELEBA_SPLITS",
    "POSTER_ATTRIBUTES",
    "COOCCURRENCE_PAIRS",
    "REGION_TEMPLATES",
    "CelebASource",
    "read_attribute_file",
    "read_partition_file",
    "load_celeba",
    "cooccurrence_subset",
]

CELEBA_FRAME = (178, 218)
"""(width, height) of the aligned images in ``img_align_celeba/``: the coordinate frame of the region templates."""

CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
"""Split name -> value in ``list_eval_partition.txt``."""

POSTER_ATTRIBUTES = ("Wearing_Lipstick", "High_Cheekbones", "Double_Chin")
"""The three attributes of the poster's experiments."""

COOCCURRENCE_PAIRS = {
    "Wearing_Lipstick": "Heavy_Makeup",
    "High_Cheekbones": "Smiling",
    "Double_Chin": "Chubby",
}
"""attribute -> the attribute it co-occurs with (poster): the biased subset is "attribute present, partner absent"."""

REGION_TEMPLATES: dict[str, list[list[tuple[float, float]]]] = {
    # Around the mouth corners (mean aligned positions about (72, 152) and (105, 152)).
    "Wearing_Lipstick": [[(62, 152), (70, 142), (88, 139), (107, 142), (115, 152), (107, 163), (88, 167),
                          (70, 163)]],
    # Below each eye (about (69, 111) and (108, 111)), beside the nose, above the mouth corners.
    "High_Cheekbones": [[(48, 118), (74, 121), (78, 140), (66, 150), (51, 141)],
                        [(129, 118), (103, 121), (99, 140), (111, 150), (126, 141)]],
    # The chin and below it, down to the image's bottom edge region.
    "Double_Chin": [[(64, 170), (88, 174), (112, 170), (122, 188), (110, 208), (88, 215), (66, 208), (54, 188)]],
}
"""Region templates as config: attribute -> polygons of ``(x, y)`` vertices in the 178 x 218 aligned-face frame.

Drawn by us, as the poster's user would, around the mean positions of CelebA's aligned landmarks (the poster does
not publish its templates); redraw them for another crop or alignment. Rasterised with
:func:`saliency_jax.data.regions.rasterize_polygons`."""

_ATTR_FILE = "list_attr_celeba.txt"
_PARTITION_FILE = "list_eval_partition.txt"
_IMAGE_DIR = "img_align_celeba"


def _read_lines(path: pathlib.Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"CelebA file not found: {path}")
    try:
        return path.read_text(encoding="ascii").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"malformed CelebA file {path}: not ASCII text ({e})") from e


def _first_bad_row(rows: list[list[str]], n_fields: int, start_line: int) -> tuple[int, list[str]] | None:
    for i, row in enumerate(rows):
        if len(row) != n_fields:
            return start_line + i, row
    return None


def read_attribute_file(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """Parses ``list_attr_celeba.txt``.

    Args:
      path: the file.

    Returns:
      ``(filenames, attribute_names, values)``: ``n`` file names in file order, the attribute names of the header,
      and int8 [n, num_attributes] in {0, 1} (the file's -1 becomes 0).

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file and line: a first line that is not the image count, an empty or duplicated
        attribute header, a row with the wrong number of fields, a value other than 1 / -1 (naming the attribute),
        a repeated file name, or a row count that differs from the first line.
    """
    path = pathlib.Path(path)
    lines = _read_lines(path)
    if len(lines) < 2:
        raise ValueError(f"malformed CelebA attribute file {path}: needs a count line and a header line; got "
                         f"{len(lines)} line(s)")
    try:
        count = int(lines[0].strip())
    except ValueError as e:
        raise ValueError(f"malformed CelebA attribute file {path}:1: expected the number of images, got "
                         f"{lines[0]!r}") from e
    names = tuple(lines[1].split())
    if not names:
        raise ValueError(f"malformed CelebA attribute file {path}:2: empty attribute header")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"malformed CelebA attribute file {path}:2: repeated attribute names {dupes}")
    rows = [line.split() for line in lines[2:] if line.strip()]
    bad = _first_bad_row(rows, 1 + len(names), 3)
    if bad is not None:
        line_no, row = bad
        raise ValueError(f"malformed CelebA attribute file {path}:{line_no}: expected a file name and "
                         f"{len(names)} values, got {len(row)} field(s)")
    if len(rows) != count:
        raise ValueError(f"malformed CelebA attribute file {path}: the first line announces {count} images but "
                         f"{len(rows)} rows follow")
    filenames = tuple(row[0] for row in rows)
    table = np.array([row[1:] for row in rows], dtype=str).reshape(len(rows), len(names))
    valid = (table == "1") | (table == "-1")
    if not valid.all():
        r, c = np.argwhere(~valid)[0]
        raise ValueError(f"malformed CelebA attribute file {path}:{r + 3}: attribute {names[c]!r} of "
                         f"{filenames[r]!r} is {str(table[r, c])!r}; values must be 1 or -1")
    if len(set(filenames)) != len(filenames):
        seen: set[str] = set()
        for i, f in enumerate(filenames):
            if f in seen:
                raise ValueError(f"malformed CelebA attribute file {path}:{i + 3}: file {f!r} listed twice")
            seen.add(f)
    return filenames, names, (table == "1").astype(np.int8)


def read_partition_file(path: str | os.PathLike[str]) -> dict[str, int]:
    """Parses ``list_eval_partition.txt``.

    Args:
      path: the file.

    Returns:
      ``{file name: partition}`` with partition 0 (train), 1 (valid) or 2 (test).

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file and line: a row that is not ``<file> <partition>``, a partition outside
        {0, 1, 2}, or a repeated file name.
    """
    path = pathlib.Path(path)
    partition: dict[str, int] = {}
    for i, line in enumerate(_read_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"malformed CelebA partition file {path}:{i}: expected '<file> <0|1|2>', got "
                             f"{line.strip()!r}")
        if fields[0] in partition:
            raise ValueError(f"malformed CelebA partition file {path}:{i}: file {fields[0]!r} listed twice")
        partition[fields[0]] = int(fields[1])
    if not partition:
        raise ValueError(f"malformed CelebA partition file {path}: no entries")
    return partition


@dataclasses.dataclass(frozen=True, eq=False)
class CelebASource:
    """CelebA images with multi-hot attribute labels (grain random-access source), built by :func:`load_celeba`.

    Attributes:
      image_dir: the ``img_align_celeba`` directory.
      filenames: ``n`` image file names of the split, in ``list_attr_celeba.txt`` order.
      all_attributes: int8 [n, num_file_attributes] in {0, 1}, every attribute of the file (for subset selection).
      attribute_names: the file's attribute names (header order).
      attributes: the chosen attributes: the label's entries, in order.
      name: e.g. ``"celeba/test"``.
      image_size: if set, images are resized (bilinear) to [image_size, image_size]; None keeps 218 x 178.
      frame: ``(width, height)`` every image file must have (the aligned frame the templates are drawn in).
      region_attributes: the chosen attributes that have a region template, in ``attributes`` order (empty: no
        ``region`` field).
      region_templates: [len(region_attributes), height, width] float32 in {0, 1} at the output size, or None.

    Items: ``{"image": [h, w, 3] float32 in [0, 1], "label": [num_attributes] int32 multi-hot}`` plus, with
    templates, ``"region": [num_guided, h, w] float32``. Reading a file Pillow cannot decode, or of another size
    than ``frame``, raises ValueError naming it.
    """

    image_dir: str
    filenames: tuple[str, ...]
    all_attributes: np.ndarray
    attribute_names: tuple[str, ...]
    attributes: tuple[str, ...]
    name: str = "celeba"
    image_size: int | None = None
    frame: tuple[int, int] = CELEBA_FRAME
    region_attributes: tuple[str, ...] = ()
    region_templates: np.ndarray | None = None

    def __post_init__(self):
        unknown = [a for a in self.attributes if a not in self.attribute_names]
        if unknown or not self.attributes:
            raise ValueError(f"Source {self.name!r}: unknown or no attributes {unknown or list(self.attributes)}; "
                             f"the attribute file has {list(self.attribute_names)}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"Source {self.name!r}: repeated attributes {list(self.attributes)}")
        if self.all_attributes.shape != (len(self.filenames), len(self.attribute_names)):
            raise ValueError(f"Source {self.name!r}: all_attributes must be [{len(self.filenames)}, "
                             f"{len(self.attribute_names)}]; got {self.all_attributes.shape}")
        check_image_size(self.image_size, f"Source {self.name!r}")
        columns = [self.attribute_names.index(a) for a in self.attributes]
        object.__setattr__(self, "labels", self.all_attributes[:, columns].astype(np.int32))
        if self.region_templates is not None:
            templates = np.asarray(self.region_templates, np.float32).copy()
            if templates.shape != (len(self.region_attributes), *self.output_size):
                raise ValueError(f"Source {self.name!r}: region_templates must be [{len(self.region_attributes)}, "
                                 f"{self.output_size[0]}, {self.output_size[1]}]; got {templates.shape}")
            templates.setflags(write=False)
            object.__setattr__(self, "region_templates", templates)
        missing = [a for a in self.region_attributes if a not in self.attributes]
        if missing:
            raise ValueError(f"Source {self.name!r}: region attributes {missing} are not among {self.attributes}")

    @property
    def num_classes(self) -> int:
        """Number of outputs (one logit per chosen attribute)."""
        return len(self.attributes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The chosen attributes."""
        return self.attributes

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the items' images."""
        if self.image_size is not None:
            return (self.image_size, self.image_size)
        return (self.frame[1], self.frame[0])

    @property
    def region_attribute_indices(self) -> tuple[int, ...]:
        """Indices into ``attributes`` (the logits) of ``region_attributes``: ``attributes=`` of
        :func:`saliency_jax.training.attention_guidance.multilabel_guidance_loss`."""
        return tuple(self.attributes.index(a) for a in self.region_attributes)

    def __len__(self) -> int:
        return len(self.filenames)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        path = os.path.join(self.image_dir, self.filenames[index])
        try:
            with Image.open(path) as pil_image:
                rgb = pil_image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"Cannot decode CelebA image {path}: {e}") from e
        if rgb.size != tuple(self.frame):
            raise ValueError(f"CelebA image {path} is {rgb.size[0]} x {rgb.size[1]} (width x height); the aligned "
                             f"images (and the region templates) are {self.frame[0]} x {self.frame[1]}")
        if self.image_size is not None:
            rgb = rgb.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        item = {"image": np.asarray(rgb, np.float32) / np.float32(255.0), "label": self.labels[index]}
        if self.region_templates is not None:
            item["region"] = self.region_templates
        return item

    def __repr__(self) -> str:
        return (f"CelebASource(name={self.name!r}, len={len(self)}, attributes={self.attributes}, "
                f"image_size={self.image_size}, region_attributes={self.region_attributes})")


def load_celeba(root: str | os.PathLike[str], split: str, *, attributes: Sequence[str] = POSTER_ATTRIBUTES,
                image_size: int | None = None,
                region_templates: Mapping[str, Sequence[Any]] | None = None,
                frame: tuple[int, int] = CELEBA_FRAME) -> CelebASource:
    """CelebA from ``root`` in the standard layout (see the module docstring).

    Args:
      root: directory holding ``img_align_celeba/``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt``.
      split: ``"train"``, ``"valid"`` or ``"test"`` (``list_eval_partition.txt`` values 0, 1, 2).
      attributes: the attributes to predict (the label's entries, in order), names from the file's header.
      image_size: optional square resize (bilinear; AlexNet: 227).
      region_templates: ``{attribute: [polygon, ...]}`` in the ``frame`` coordinates (e.g. :data:`REGION_TEMPLATES`);
        the chosen attributes that have one are guided and get a ``region`` plane. None = no regions.
      frame: ``(width, height)`` of the image files and of the templates' coordinates.

    Returns:
      :class:`CelebASource` over the split.

    Raises:
      FileNotFoundError: ``root``, the image directory or a list file is missing.
      ValueError: unknown split, unknown or repeated attributes (listing the file's), malformed list files (naming
        file and line, see :func:`read_attribute_file` / :func:`read_partition_file`), images of the attribute file
        missing from the partition file, an empty split, or a bad template.
    """
    if split not in CELEBA_SPLITS:
        raise ValueError(f"load_celeba: split must be one of {tuple(CELEBA_SPLITS)}; got {split!r}")
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA root not found: {root}")
    image_dir = root / _IMAGE_DIR
    if not image_dir.is_dir():
        raise FileNotFoundError(f"CelebA image directory not found: {image_dir}")
    filenames, names, values = read_attribute_file(root / _ATTR_FILE)
    attributes = tuple(attributes)
    unknown = [a for a in attributes if a not in names]
    if unknown:
        raise ValueError(f"load_celeba: unknown attributes {unknown}; {root / _ATTR_FILE} has {list(names)}")
    partition = read_partition_file(root / _PARTITION_FILE)
    missing = [f for f in filenames if f not in partition]
    if missing:
        raise ValueError(f"load_celeba: {len(missing)} image(s) of {root / _ATTR_FILE} are not in "
                         f"{root / _PARTITION_FILE}, e.g. {missing[:3]}")
    wanted = CELEBA_SPLITS[split]
    keep = np.array([partition[f] == wanted for f in filenames], dtype=bool)
    if not keep.any():
        raise ValueError(f"load_celeba: split {split!r} is empty in {root / _PARTITION_FILE}")
    source_kwargs = dict(image_dir=str(image_dir), filenames=tuple(f for f, k in zip(filenames, keep) if k),
                         all_attributes=values[keep], attribute_names=names, attributes=attributes,
                         name=f"celeba/{split}", image_size=image_size, frame=tuple(frame))
    if region_templates is not None:
        guided = tuple(a for a in attributes if a in region_templates)
        if not guided:
            raise ValueError(f"load_celeba: none of {list(attributes)} has a region template; templates exist for "
                             f"{sorted(region_templates)}")
        height, width = (image_size, image_size) if image_size is not None else (frame[1], frame[0])
        source_kwargs.update(region_attributes=guided, region_templates=regions_lib.rasterize_templates(
            region_templates, guided, (height, width), frame))
    return CelebASource(**source_kwargs)


def cooccurrence_subset(source: CelebASource, attribute: str, cooccurring: str | None = None) -> np.ndarray:
    """Indices of the images where ``attribute`` is present but ``cooccurring`` is absent (the poster's subsets).

    Args:
      source: a :class:`CelebASource` (any of its file's attributes can be used, chosen or not).
      attribute: e.g. ``"Wearing_Lipstick"``.
      cooccurring: e.g. ``"Heavy_Makeup"``; None = ``COOCCURRENCE_PAIRS[attribute]``.

    Returns:
      int64 [m] sorted indices into ``source``.

    Raises:
      ValueError: an attribute not in the source's file, or no default partner for ``attribute``.
    """
    if cooccurring is None:
        if attribute not in COOCCURRENCE_PAIRS:
            raise ValueError(f"cooccurrence_subset: no default co-occurring attribute for {attribute!r}; known: "
                             f"{COOCCURRENCE_PAIRS}")
        cooccurring = COOCCURRENCE_PAIRS[attribute]
    for a in (attribute, cooccurring):
        if a not in source.attribute_names:
            raise ValueError(f"cooccurrence_subset: unknown attribute {a!r}; the source has "
                             f"{list(source.attribute_names)}")
    present = source.all_attributes[:, source.attribute_names.index(attribute)] == 1
    absent = source.all_attributes[:, source.attribute_names.index(cooccurring)] == 0
    return np.flatnonzero(present & absent).astype(np.int64)


@SOURCES.register("celeba", options=("attributes", "region_templates", "frame"), templates=False)
def _celeba_source(spec, split, data_dir, image_size, **options):
    """:func:`load_celeba` (multi-label: its ``region_templates`` option is per attribute, not per class)."""
    if "frame" in options:
        options["frame"] = tuple(options["frame"])
    if "attributes" in options:
        options["attributes"] = tuple(options["attributes"])
    return load_celeba(require_data_dir(spec, data_dir), split, image_size=image_size, **options)
