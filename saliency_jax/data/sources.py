"""Random-access image classification sources.

Every source is a grain-compatible random-access data source: it has
``__len__`` and ``__getitem__(index) -> dict`` with

* ``"image"``: [height, width, channels] float32 in [0, 1] (channels=1 for
    grayscale, 3 for RGB);
* ``"label"``: int32 scalar in [0, num_classes).

and carries the metadata ``num_classes``, ``class_names`` and ``name``.
Pixels are converted from uint8 (``/ 255``) lazily, one item at a time, so the
in-memory sources keep the compact uint8 arrays.

Three kinds of source exist:

* :class:`ImageSource`: images held in memory as a numpy array (scikit-learn
    digits, MNIST, NumPy archives such as CIFAR-10).
* :class:`ImageFolderSource`: file paths in a ``root/<split>/<class>/`` tree,
    decoded and resized with Pillow when an item is read.
* :class:`TfdsSource`: a prepared TensorFlow Datasets dataset read through
    ``tfds.data_source`` (array_record files; no TensorFlow needed).

:func:`get_source` dispatches on a short spec string such as ``"mnist"`` or
``"tfds:cifar10"``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pathlib
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from saliency_jax.data import augment as augment_lib

__all__ = [
    "CIFAR10_CLASSES",
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "SOURCE_SPECS",
    "SOURCE_OPTIONS",
    "ImageSource",
    "ImageFolderSource",
    "TfdsSource",
    "load_digits",
    "load_mnist",
    "load_npz",
    "load_image_folder",
    "load_tfds",
    "get_source",
]

SPLITS = ("train", "test")
"""Splits every loader accepts."""

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10 class names in label order (Krizhevsky 2009)."""

DIGITS_TEST_FRACTION = 0.25
"""Fraction of scikit-learn's digits held out as the fixed "test" split."""

DIGITS_SPLIT_SEED = 0
"""Seed (``random_state``) of the stratified digits train/test split."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File extensions (case-insensitive) read by :func:`load_image_folder`."""

SOURCE_SPECS = ("digits", "mnist", "mnist32", "npz", "cifar10", "folder", "decoy_mnist", "clean_mnist", "celeba",
                "tfds:<name>", "mnist_clips", "digits_clips")
"""Spec strings understood by :func:`get_source`."""

_MNIST_IMAGES_MAGIC = 2051
_MNIST_LABELS_MAGIC = 2049
_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _check_split(split: str, name: str) -> None:
    if split not in SPLITS:
        raise ValueError(
            f"{name}: split must be one of {SPLITS}, got {split!r}."
        )


def _check_image_size(image_size: int | None, name: str) -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(
        image_size, (int, np.integer)
    ) or image_size < 1:
        raise ValueError(
            f"{name}: image_size must be a positive int or None, got"
            f" {image_size!r}."
        )


def _to_float_image(image: np.ndarray, image_size: int | None) -> np.ndarray:
    """uint8 or float image [h, w, c] -> float32 [h', w', c] in [0, 1]."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / np.float32(255.0)
    else:
        image = np.asarray(image, dtype=np.float32)
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = augment_lib.resize(image, image_size)
    return image


def _default_class_names(num_classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(num_classes))


# ----------------------------------------------------------------------------
# In-memory arrays.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
    """In-memory image classification source (grain random-access source).

    Attributes:
        images: [num_examples, height, width, channels] uint8 in [0, 255] or
            float32 in [0, 1]. uint8 pixels are divided by 255 lazily per item.
        labels: [num_examples] integer class ids in [0, num_classes); stored as
            int32.
        num_classes: number of classes.
        class_names: ``num_classes`` human-readable names, in label order.
            Defaults to ``("0", "1", ...)``.
        name: short name used in error messages and logs, e.g. ``"mnist/train"``.
        image_size: if set, every item is resized (bilinear) to
            [image_size, image_size, channels]; None keeps the stored size.

    Items are ``{"image": [h, w, c] float32 in [0, 1], "label": int32 scalar}``.

    Raises:
        TypeError: images not uint8/float32 or labels not integer.
        ValueError: images not rank 4, labels not rank 1 or of a different
            length, labels outside [0, num_classes), NaN or out-of-range float
            pixels, or ``len(class_names) != num_classes``; the message names the
            source.

    >>> src = ImageSource(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]),
    ...                   num_classes=2, name="toy")
    >>> src[1]["image"].shape, int(src[1]["label"])
    ((4, 4, 1), 1)
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] = ()
    name: str = "images"
    image_size: int | None = None

    def __post_init__(self):
        name = self.name
        images = self.images
        if not isinstance(images, np.ndarray):
            raise TypeError(
                f"Source {name!r}: images must be a numpy array, got"
                f" {type(images).__name__}."
            )
        if images.ndim != 4:
            raise ValueError(
                f"Source {name!r}: images must have rank 4 [num_examples, height,"
                f" width, channels], got shape {images.shape}."
            )
        if images.dtype != np.uint8 and images.dtype != np.float32:
            raise TypeError(
                f"Source {name!r}: images must be uint8 or float32, got"
                f" {images.dtype}."
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(
                f"Source {name!r}: labels must have rank 1 [num_examples], got"
                f" shape {labels.shape}."
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(
                f"Source {name!r}: labels must be integers, got {labels.dtype}."
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"Source {name!r}: {images.shape[0]} images but {labels.shape[0]}"
                " labels."
            )
        num_classes = self.num_classes
        if isinstance(num_classes, bool) or not isinstance(
            num_classes, (int, np.integer)
        ) or num_classes < 1:
            raise ValueError(
                f"Source {name!r}: num_classes must be a positive int, got"
                f" {num_classes!r}."
            )
        if labels.size:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"Source {name!r}: labels must lie in [0, {num_classes}), got"
                    f" range [{lo}, {hi}]."
                )
        if images.dtype == np.float32 and images.size:
            if np.isnan(images).any():
                raise ValueError(f"Source {name!r}: images contain NaN.")
            lo, hi = float(images.min()), float(images.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(
                    f"Source {name!r}: float32 images must lie in [0, 1], got range"
                    f" [{lo}, {hi}]."
                )
        class_names = tuple(self.class_names) or _default_class_names(
            int(num_classes)
        )
        if len(class_names) != num_classes:
            raise ValueError(
                f"Source {name!r}: {len(class_names)} class_names for"
                f" {num_classes} classes."
            )
        _check_image_size(self.image_size, f"Source {name!r}")
        object.__setattr__(self, "labels", labels.astype(np.int32))
        object.__setattr__(self, "num_classes", int(num_classes))
        object.__setattr__(self, "class_names", class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        return {
            "image": _to_float_image(self.images[index], self.image_size),
            "label": np.int32(self.labels[index]),
        }

    def __repr__(self) -> str:
        return (
            f"ImageSource(name={self.name!r}, len={len(self)},"
            f" image_shape={self.images.shape[1:]}, dtype={self.images.dtype},"
            f" num_classes={self.num_classes}, image_size={self.image_size})"
        )


def load_digits(split: str, *, image_size: int | None = None) -> ImageSource:
    """scikit-learn's bundled 8x8 handwritten digits (no download).

    ``sklearn.datasets.load_digits`` has 1797 images with values 0..16 and no
    test split. A fixed stratified split holds out ``DIGITS_TEST_FRACTION`` =
    25% (450 images) as "test" with ``random_state=DIGITS_SPLIT_SEED`` = 0
    (``sklearn.model_selection.train_test_split(..., stratify=target)``); the
    remaining 1347 images are "train".

    Args:
        split: "train" or "test".
        image_size: optional resize of every item (bilinear).

    Returns:
        ImageSource with images [n, 8, 8, 1] float32 in [0, 1] (= value / 16)
        and labels int32 [n] in [0, 10).

    Raises:
        ValueError: unknown split.
    """
    _check_split(split, "load_digits")
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
    from sklearn import model_selection  # pylint: disable=g-import-not-at-top

    digits = sk_datasets.load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = model_selection.train_test_split(
        np.arange(labels.shape[0]),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    return ImageSource(
        images=images[idx],
        labels=labels[idx],
        num_classes=10,
        class_names=tuple(str(int(n)) for n in digits.target_names),
        name=f"digits/{split}",
        image_size=image_size,
    )


# ----------------------------------------------------------------------------
# MNIST IDX files.
# ----------------------------------------------------------------------------


def _read_bytes(path: pathlib.Path) -> bytes:
    """Reads a possibly gzip-compressed file; corrupt gzip -> ValueError."""
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"Corrupt gzip file {path}: {e}") from e
    return path.read_bytes()


def _parse_idx(path: pathlib.Path, magic: int, ndim: int) -> np.ndarray:
    """Parses an IDX file of unsigned bytes (big-endian int32 header).

    Args:
        path: file path (``.gz`` is decompressed).
        magic: expected magic number (2051 images, 2049 labels).
        ndim: number of dimensions announced by the header (3 or 1).

    Returns:
        uint8 array with the header's shape.

    Raises:
        ValueError: bad magic, short header, truncated or oversized payload.
    """
    data = _read_bytes(path)
    header_bytes = 4 * (1 + ndim)
    if len(data) < header_bytes:
        raise ValueError(
            f"Truncated IDX file {path}: {len(data)} bytes, header needs"
            f" {header_bytes}."
        )
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(
            f"Bad IDX magic number in {path}: expected {magic}, got"
            f" {int(header[0])}."
        )
    shape = tuple(int(d) for d in header[1:])
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(data) - header_bytes
    if payload != expected:
        kind = "Truncated" if payload < expected else "Oversized"
        raise ValueError(
            f"{kind} IDX file {path}: header shape {shape} needs {expected}"
            f" payload bytes, found {payload}."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(
        shape
    )


def _find_file(directory: pathlib.Path, stem: str) -> pathlib.Path:
    candidates = [directory / f"{stem}.gz", directory / stem]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST file not found: tried {', '.join(str(c) for c in candidates)}."
    )


def load_mnist(
    data_dir: str | os.PathLike[str],
    split: str,
    *,
    image_size: int | None = None,
    pad: int = 0,
) -> ImageSource:
    """MNIST from the four standard IDX files (LeCun et al. 1998).

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from
    ``data_dir`` with numpy (big-endian int32 header: magic 2051 for images,
    2049 for labels, then the dimensions; the payload is unsigned bytes).

    Args:
        data_dir: directory holding the files (gzip-compressed or not).
        split: "train" (60000 images) or "test" (10000 images, ``t10k``).
        image_size: optional resize of every item (bilinear).
        pad: zero pixels added on each side of every digit (``pad=2`` gives
            the 32x32 digits of Cruz & Cardoso's background protocol,
            ``np.pad(X, 2)`` in their ``mydatasets.mnist``: the digit keeps its
            pixels, unlike a resize); the source is then named
            ``mnist{28 + 2 pad}/<split>``.

    Returns:
        ImageSource with images [n, 28 + 2 pad, 28 + 2 pad, 1] uint8 (items
        float32 in [0, 1]) and labels int32 [n] in [0, 10).

    Raises:
        FileNotFoundError: ``data_dir`` or one of the two files is missing
            (names the path).
        ValueError: unknown split, bad magic number, truncated payload, image
            and label counts differ, corrupt gzip (names the file), or a
            negative ``pad``.
    """
    _check_split(split, "load_mnist")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"load_mnist: pad must be an int >= 0, got {pad!r}.")
    directory = pathlib.Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {directory}")
    prefix = _MNIST_PREFIX[split]
    images_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = _parse_idx(images_path, _MNIST_IMAGES_MAGIC, ndim=3)
    labels = _parse_idx(labels_path, _MNIST_LABELS_MAGIC, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST count mismatch: {images_path} has {images.shape[0]} images"
            f" but {labels_path} has {labels.shape[0]} labels."
        )
    if labels.size and int(labels.max()) >= 10:
        raise ValueError(
            f"MNIST labels in {labels_path} must lie in [0, 10), got max"
            f" {int(labels.max())}."
        )
    images = images[..., None]
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return ImageSource(
        images=images,
        labels=labels.astype(np.int32),
        num_classes=10,
        class_names=_default_class_names(10),
        name=f"mnist{images.shape[1]}/{split}" if pad else f"mnist/{split}",
        image_size=image_size,
    )


# ----------------------------------------------------------------------------
# NumPy archives (CIFAR-10).
# ----------------------------------------------------------------------------


def load_npz(
    path: str | os.PathLike[str],
    split: str,
    *,
    class_names: Sequence[str] | None = None,
    name: str | None = None,
    image_size: int | None = None,
) -> ImageSource:
    """Images from a NumPy archive with x_train, y_train, x_test, y_test.

    The archive is opened with ``allow_pickle=False``. ``x_*`` is
    [n, h, w, c] (or [n, h, w], given a channel axis) uint8 in [0, 255] or
    float32 in [0, 1]; ``y_*`` is [n] (or [n, 1]) integer labels.
    ``num_classes`` is ``len(class_names)`` when names are known, otherwise
    ``max(y_train, y_test) + 1`` so that both splits agree.

    Args:
        path: the ``.npz`` file, e.g. ``/work/shared/data/cifar10/cifar10.npz``.
        split: "train" or "test".
        class_names: class names in label order; if None, an optional
            ``class_names`` array in the archive is used, else ``("0", "1", ...)``.
            Pass ``CIFAR10_CLASSES`` for CIFAR-10.
        name: source name (default: file stem and split).
        image_size: optional resize of every item (bilinear).

    Returns:
        ImageSource over the split.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown split, unreadable archive (including pickled object
            arrays), or missing keys (names the file and the keys found).
    """
    _check_split(split, "load_npz")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NumPy archive not found: {path}")
    required = ("x_train", "y_train", "x_test", "y_test")
    wanted = (f"x_{split}", f"y_{split}", "y_train", "y_test", "class_names")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(
                f"expected a .npz archive, got a single {type(archive).__name__}"
            )
        with archive:
            found = tuple(archive.files)
            arrays = {k: np.asarray(archive[k]) for k in wanted if k in found}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"Cannot read NumPy archive {path}: {e}") from e
    missing = [k for k in required if k not in found]
    if missing:
        raise ValueError(
            f"NumPy archive {path} lacks keys {missing}; required"
            f" {list(required)}, found {list(found)}."
        )
    images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    all_labels = [arrays["y_train"], arrays["y_test"]]
    stored_names = arrays.get("class_names")

    if images.ndim == 3:
        images = images[..., None]
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    all_labels = [y.reshape(-1) for y in all_labels]
    for key, y in zip(("y_train", "y_test"), all_labels):
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"NumPy archive {path}: {key} must hold integer labels, got"
                f" {y.dtype}."
            )
    if images.dtype != np.uint8 and np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
    if class_names is None and stored_names is not None:
        class_names = tuple(str(n) for n in np.asarray(stored_names).reshape(-1))
    if class_names is not None:
        class_names = tuple(class_names)
        num_classes = len(class_names)
    else:
        num_classes = 1 + max(int(y.max()) for y in all_labels if y.size)
        class_names = _default_class_names(num_classes)
    return ImageSource(
        images=images,
        labels=labels,
        num_classes=num_classes,
        class_names=class_names,
        name=name or f"{path.stem}/{split}",
        image_size=image_size,
    )


# ----------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFolderSource:
    """Image files decoded lazily with Pillow (grain random-access source).

    Attributes:
        paths: ``num_examples`` image file paths.
        labels: [num_examples] int32 class ids in [0, num_classes).
        num_classes: number of classes.
        class_names: class (sub-folder) names in label order.
        name: short name used in error messages.
        image_size: every image is decoded to RGB and resized (bilinear) to
            [image_size, image_size, 3].

    Items are ``{"image": [image_size, image_size, 3] float32 in [0, 1],
    "label": int32 scalar}``. Reading an item that Pillow cannot decode raises
    ValueError naming the file.
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    image_size: int

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] != len(self.paths):
            raise ValueError(
                f"Source {self.name!r}: labels must be [{len(self.paths)}], got"
                f" shape {labels.shape}."
            )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"Source {self.name!r}: {len(self.class_names)} class_names for"
                f" {self.num_classes} classes."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"Source {self.name!r}: labels must lie in [0, {self.num_classes})."
            )
        if self.image_size is None:
            raise ValueError(
                f"Source {self.name!r}: image_size is required for image folders."
            )
        _check_image_size(self.image_size, f"Source {self.name!r}")
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "labels", labels.astype(np.int32))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        path = self.paths[index]
        try:
            with Image.open(path) as pil_image:
                rgb = pil_image.convert("RGB")
                if rgb.size != (self.image_size, self.image_size):
                    rgb = rgb.resize(
                        (self.image_size, self.image_size), Image.Resampling.BILINEAR
                    )
                pixels = np.asarray(rgb, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"Cannot decode image file {path}: {e}") from e
        return {
            "image": pixels.astype(np.float32) / np.float32(255.0),
            "label": np.int32(self.labels[index]),
        }

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(name={self.name!r}, len={len(self)},"
            f" num_classes={self.num_classes}, image_size={self.image_size})"
        )


def load_image_folder(
    root: str | os.PathLike[str],
    split: str,
    *,
    image_size: int,
    name: str | None = None,
) -> ImageFolderSource:
    """An image-folder dataset ``root/<split>/<class_name>/*.{jpg,jpeg,png}``.

    One sub-folder per class; sorted class names give label ids 0, 1, ...
    (the class list comes from the split's own folder, so "train" and "test"
    must hold the same class folders). Suits user-prepared copies of Stanford
    Cars, FGVC-Aircraft or EgoFoodPlaces. Files are only listed here; each
    item is decoded to RGB with Pillow and resized (bilinear) when read.

    Args:
        root: dataset root.
        split: "train" or "test".
        image_size: side of the square output images, in pixels.
        name: source name (default: folder name and split).

    Returns:
        ImageFolderSource with items [image_size, image_size, 3] float32.

    Raises:
        FileNotFoundError: ``root/<split>`` does not exist.
        ValueError: unknown split, bad image_size, no class folders, or no
            images found.
    """
    _check_split(split, "load_image_folder")
    _check_image_size(image_size, "load_image_folder")
    if image_size is None:
        raise ValueError("load_image_folder: image_size is required.")
    split_dir = pathlib.Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"Image folder split not found: {split_dir}")
    class_names = tuple(
        sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    )
    if not class_names:
        raise ValueError(
            f"Image folder {split_dir} has no class sub-folders"
            " (expected <split>/<class_name>/*.png)."
        )
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        files = sorted(
            p for p in (split_dir / class_name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        paths.extend(str(p) for p in files)
        labels.extend([label] * len(files))
    if not paths:
        raise ValueError(
            f"Image folder {split_dir} has no {'/'.join(IMAGE_EXTENSIONS)} files."
        )
    return ImageFolderSource(
        paths=tuple(paths),
        labels=np.asarray(labels, dtype=np.int32),
        num_classes=len(class_names),
        class_names=class_names,
        name=name or f"{pathlib.Path(root).name}/{split}",
        image_size=int(image_size),
    )


# ----------------------------------------------------------------------------
# TensorFlow Datasets.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
    """A prepared TFDS dataset read with ``tfds.data_source`` (random access).

    Attributes:
        data_source: the ``tfds.data_source`` object (``__len__``/``__getitem__``
            returning feature dicts).
        num_classes: number of classes (from the ClassLabel feature).
        class_names: class names in label order.
        name: e.g. ``"cifar10/train"``.
        image_size: if set, items are resized (bilinear) to that square size.
        image_key: feature key of the image (uint8 [h, w, c]).
        label_key: feature key of the label.
        label_source: the same split with the image decoding skipped, used only
            to read :attr:`labels` cheaply; None reads labels through
            ``data_source``.

    Items are ``{"image": [h, w, c] float32 in [0, 1], "label": int32}``.
    """

    data_source: Any
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    image_size: int | None = None
    image_key: str = "image"
    label_key: str = "label"
    label_source: Any = None

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self.data_source[int(index)]
        image = np.asarray(record[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise ValueError(
                f"Source {self.name!r}: item {index} has image shape {image.shape},"
                " expected [height, width, channels]."
            )
        return {
            "image": _to_float_image(image, self.image_size),
            "label": np.int32(record[self.label_key]),
        }

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """[num_examples] int32 labels of every item (read once, then cached)."""
        reader = self.label_source if self.label_source is not None else (
            self.data_source
        )
        return np.fromiter(
            (int(reader[i][self.label_key]) for i in range(len(reader))),
            dtype=np.int32,
            count=len(reader),
        )

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self.name!r}, len={len(self)},"
            f" num_classes={self.num_classes}, image_size={self.image_size})"
        )


def load_tfds(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> TfdsSource:
    """A prepared TensorFlow Datasets dataset through ``tfds.data_source``.

    Nothing is downloaded: the dataset must already be prepared in a
    random-access file format (array_record or parquet), e.g. with
    ``tfds build <name> --data_dir=<data_dir> --file_format=array_record``.
    Reading needs no TensorFlow (images are decoded with Pillow by TFDS).

    Args:
        name: TFDS name, optionally with config/version, e.g. "cifar10".
        split: a split of the dataset ("train", "test", or any split it has,
            with TFDS slicing syntax such as "train[:90%]").
        data_dir: TFDS data directory (default: TFDS's own, ``~/tensorflow_datasets``).
        image_size: optional resize of every item (bilinear); needed when images
            differ in size.
        image_key: feature key of the image.
        label_key: feature key of the label (a ``tfds.features.ClassLabel``).

    Returns:
        TfdsSource.

    Raises:
        FileNotFoundError: the dataset is not prepared under ``data_dir`` (the
            message gives the ``tfds build`` command).
        ValueError: unknown split, a TFRecord-only preparation, or missing /
            non-ClassLabel features.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    _check_image_size(image_size, "load_tfds")
    build_cmd = (
        f"tfds build {name}"
        + (f" --data_dir={data_dir}" if data_dir is not None else "")
        + " --file_format=array_record"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is neither registered nor prepared under"
            f" data_dir={data_dir}; prepare it with `{build_cmd}`."
        ) from e
    if not prepared:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared under {builder.data_dir};"
            f" prepare it first with `{build_cmd}` (nothing is downloaded at run"
            " time)."
        )
    info = builder.info
    file_format = str(getattr(info.file_format, "value", info.file_format))
    if file_format not in ("array_record", "parquet"):
        raise ValueError(
            f"TFDS dataset {name!r} under {builder.data_dir} is stored as"
            f" {file_format}, which has no random access; rebuild it with"
            f" `{build_cmd}`."
        )
    base_split = split.split("[", 1)[0]
    if base_split not in info.splits:
        raise ValueError(
            f"TFDS dataset {name!r} has no split {split!r}; available:"
            f" {sorted(info.splits.keys())}."
        )
    features = info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(
                f"TFDS dataset {name!r} has no feature {key!r}; features:"
                f" {sorted(features.keys())}."
            )
    label_feature = features[label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(
            f"TFDS dataset {name!r}: feature {label_key!r} must be a ClassLabel,"
            f" got {type(label_feature).__name__}."
        )
    data_source = builder.as_data_source(split=split)
    label_source = builder.as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()}
    )
    return TfdsSource(
        data_source=data_source,
        num_classes=int(label_feature.num_classes),
        class_names=tuple(label_feature.names),
        name=f"{name}/{split}",
        image_size=image_size,
        image_key=image_key,
        label_key=label_key,
        label_source=label_source,
    )


# ----------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------


def _require_data_dir(spec: str, data_dir: str | None) -> str:
    if data_dir is None:
        raise ValueError(f"get_source({spec!r}) needs data_dir.")
    return data_dir


SOURCE_OPTIONS = {
    "decoy_mnist": ("seed", "region_threshold", "region_dilation", "base"),
    "clean_mnist": ("seed", "region_threshold", "region_dilation", "base"),
    "celeba": ("attributes", "region_templates", "frame"),
}
"""Loader keywords each spec accepts in ``get_source(..., options=)``, besides ``region_templates`` (every
single-label spec; see :func:`get_source`)."""


def _plain(value: Any) -> Any:
    """A config value as plain Python (``ConfigDict`` -> dict, lists/tuples recursively)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _with_templates(source: Any, templates: Any, frame: Any, spec: str):
    """Wraps a single-label source so that every item carries its class's rasterised template as ``region``."""
    from saliency_jax.data import regions as regions_lib  # pylint: disable=g-import-not-at-top

    if not isinstance(templates, dict) or not templates:
        raise ValueError(f"get_source({spec!r}): options.region_templates must map class names to polygons; got "
                         f"{templates!r}")
    names = [str(n) for n in (getattr(source, "class_names", None) or range(source.num_classes))]
    unknown = sorted(set(map(str, templates)) - set(names))
    if unknown:
        raise ValueError(f"get_source({spec!r}): options.region_templates names unknown classes {unknown}; the "
                         f"classes are {names}")
    missing = [n for n in names if n not in templates]
    if missing:
        raise ValueError(f"get_source({spec!r}): options.region_templates has no template for classes {missing} "
                         "(a per-class template is the region of every image of its class)")
    height, width = source[0]["image"].shape[:2]
    masks = regions_lib.rasterize_templates({str(k): v for k, v in templates.items()}, names, (height, width),
                                            None if frame is None else tuple(frame))
    return regions_lib.TemplateRegionSource(source, masks)


def get_source(
    spec: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    options: Any = None,
):
    """Builds a source from a short spec string.

    Specs (``SOURCE_SPECS``):

    * ``"digits"``: :func:`load_digits` (``data_dir`` unused).
    * ``"mnist"``: :func:`load_mnist`; ``data_dir`` holds the IDX files.
    * ``"mnist32"``: :func:`load_mnist` with ``pad=2``: the digits
        zero-padded to 32x32 (Cruz & Cardoso's background protocol), not
        resized.
    * ``"npz"``: :func:`load_npz`; ``data_dir`` is the ``.npz`` file.
    * ``"cifar10"``: :func:`load_npz` with ``CIFAR10_CLASSES``; ``data_dir`` is
        the ``.npz`` file or a directory holding ``cifar10.npz``.
    * ``"folder"``: :func:`load_image_folder`; ``data_dir`` is the root;
        ``image_size`` is required.
    * ``"decoy_mnist"``: :func:`saliency_jax.data.load_decoy_mnist` (Decoy
        MNIST, Ross et al. 2017; fields ``region``, ``wrong_region``,
        ``decoy_label``); ``data_dir`` holds the MNIST IDX files (unused with
        ``options.base = "digits"``). Options: ``seed``, ``region_threshold``,
        ``region_dilation``, ``base``.
    * ``"clean_mnist"``: the same with ``decoy=False`` (clean MNIST with the
        same fields: the ceiling arm).
    * ``"celeba"``: :func:`saliency_jax.data.load_celeba` (multi-hot labels);
        ``data_dir`` is the CelebA root; split ``"test"`` or ``"train"`` (or
        ``"valid"``). Options: ``attributes``, ``region_templates`` (per
        attribute), ``frame``.
    * ``"tfds:<name>"``: :func:`load_tfds` (``data_dir`` is the TFDS data
        directory, None for TFDS's default).
    * ``"mnist_clips"``, ``"digits_clips"``: moving-digit clips
        (:func:`saliency_jax.data.clips.clip_source`: items ``{"image": [time,
        canvas, canvas, 1], "label", ...}``) of the MNIST digits in
        ``data_dir`` or of the embedded 8 x 8 digits; ``options`` are the
        fields of :class:`saliency_jax.data.clips.ClipSettings` (a config's
        ``dataset.options`` section); clips are not resized (``image_size`` must
        be None).

    Options (``config.dataset.options``): the keywords above, and for every
    single-label spec ``region_templates`` (``{class name: [polygon, ...]}``,
    the poster's per-class template drawn once by the user) with
    ``template_frame`` (``(width, height)`` of the polygons' coordinates;
    None = the image size): every item then carries its class's rasterised
    template as ``region`` (:class:`saliency_jax.data.TemplateRegionSource`,
    replacing a region the source has), resized and augmented with the image.

    Args:
        spec: one of the specs above.
        split: "train" or "test".
        data_dir: see above.
        image_size: optional square resize (bilinear) of every item.
        options: a mapping (dict or ``ConfigDict``) of the spec's options; None
            or empty = the loader's defaults.

    Returns:
        ImageSource, ImageFolderSource, TfdsSource, DecoyMNISTSource,
        CelebASource or TemplateRegionSource.

    Raises:
        ValueError: unknown spec (lists the valid ones), missing ``data_dir`` or
            ``image_size`` where needed, an option the spec does not take
            (listing those it takes), a bad template, ``image_size`` with a
            clip spec, or any loader error.
        FileNotFoundError: missing files.
    """
    options = dict(_plain(options) or {})
    if spec in ("mnist_clips", "digits_clips"):
        from saliency_jax.data import clips  # pylint: disable=g-import-not-at-top (clips imports this module)

        if image_size is not None:
            raise ValueError(f"get_source({spec!r}): clips are not resized; set image_size None (the frame size is "
                             f"the clips' canvas option), got {image_size}")
        return clips.clip_source(spec, split, data_dir, **options)
    allowed = SOURCE_OPTIONS.get(spec, ())
    if spec != "celeba":
        allowed = allowed + ("region_templates", "template_frame")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"get_source({spec!r}): unknown option(s) {unknown}; this spec takes"
            f" {sorted(allowed)}."
        )
    templates = options.pop("region_templates", None) if spec != "celeba" else None
    frame = options.pop("template_frame", None)
    source = _get_source(spec, split, data_dir, image_size, options)
    if templates is not None:
        source = _with_templates(source, templates, frame, spec)
    return source


def _get_source(spec, split, data_dir, image_size, options):
    if spec in ("decoy_mnist", "clean_mnist"):
        from saliency_jax.data import decoy_mnist  # pylint: disable=g-import-not-at-top

        if options.get("base", "mnist") == "mnist":
            data_dir = _require_data_dir(spec, data_dir)
        return decoy_mnist.load_decoy_mnist(
            data_dir, split, image_size=image_size, decoy=spec == "decoy_mnist", **options
        )
    if spec == "celeba":
        from saliency_jax.data import celeba  # pylint: disable=g-import-not-at-top

        if "frame" in options:
            options["frame"] = tuple(options["frame"])
        if "attributes" in options:
            options["attributes"] = tuple(options["attributes"])
        return celeba.load_celeba(
            _require_data_dir(spec, data_dir), split, image_size=image_size, **options
        )
    if spec == "digits":
        return load_digits(split, image_size=image_size)
    if spec == "mnist":
        return load_mnist(
            _require_data_dir(spec, data_dir), split, image_size=image_size
        )
    if spec == "mnist32":
        return load_mnist(
            _require_data_dir(spec, data_dir), split, image_size=image_size, pad=2
        )
    if spec == "npz":
        return load_npz(
            _require_data_dir(spec, data_dir), split, image_size=image_size
        )
    if spec == "cifar10":
        path = pathlib.Path(_require_data_dir(spec, data_dir))
        if path.is_dir():
            path = path / "cifar10.npz"
        return load_npz(
            path,
            split,
            class_names=CIFAR10_CLASSES,
            name=f"cifar10/{split}",
            image_size=image_size,
        )
    if spec == "folder":
        if image_size is None:
            raise ValueError("get_source('folder') needs image_size.")
        return load_image_folder(
            _require_data_dir(spec, data_dir), split, image_size=image_size
        )
    if isinstance(spec, str) and spec.startswith("tfds:") and len(spec) > 5:
        return load_tfds(spec[5:], split, data_dir, image_size=image_size)
    raise ValueError(
        f"Unknown source spec {spec!r}; valid specs: {', '.join(SOURCE_SPECS)}."
    )
