"""Handwritten digits: scikit-learn's bundled 8 x 8 digits and MNIST from its IDX files.

Registers the specs ``"digits"`` (:func:`load_digits`), ``"mnist"`` (:func:`load_mnist`) and ``"mnist32"``
(:func:`load_mnist` with ``pad=2``) of :func:`saliency_jax.data.get_source`.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib

import numpy as np

from saliency_jax.data.core import SOURCES, ImageSource, check_split, default_class_names, require_data_dir

__all__ = [
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
    "load_digits",
    "load_mnist",
    "load_mnist_labels",
]

DIGITS_TEST_FRACTION = 0.25
"""Fraction of scikit-learn's digits held out as the fixed "test" split."""

DIGITS_SPLIT_SEED = 0
"""Seed (``random_state``) of the stratified digits train/test split."""

_MNIST_IMAGES_MAGIC = 2051
_MNIST_LABELS_MAGIC = 2049
_MNIST_PREFIX = {"train": "train", "test": "t10k"}


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
    check_split(split, "load_digits")
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
    check_split(split, "load_mnist")
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
        class_names=default_class_names(10),
        name=f"mnist{images.shape[1]}/{split}" if pad else f"mnist/{split}",
        image_size=image_size,
    )


def load_mnist_labels(data_dir: str | os.PathLike[str], split: str) -> np.ndarray:
    """The labels of one MNIST split alone, read from its IDX labels file (the images file is not read).

    Args:
        data_dir: directory holding the files (gzip-compressed or not), as :func:`load_mnist`.
        split: "train" or "test".

    Returns:
        int32 [n] in [0, 10).

    Raises:
        FileNotFoundError: ``data_dir`` or the labels file is missing.
        ValueError: unknown split, bad magic number, truncated payload, a label >= 10.
    """
    check_split(split, "load_mnist_labels")
    directory = pathlib.Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {directory}")
    path = _find_file(directory, f"{_MNIST_PREFIX[split]}-labels-idx1-ubyte")
    labels = _parse_idx(path, _MNIST_LABELS_MAGIC, ndim=1)
    if labels.size and int(labels.max()) >= 10:
        raise ValueError(f"MNIST labels in {path} must lie in [0, 10), got max {int(labels.max())}.")
    return labels.astype(np.int32)


@SOURCES.register("digits")
def _digits(spec, split, data_dir, image_size):
    del spec, data_dir  # the digits are embedded
    return load_digits(split, image_size=image_size)


@SOURCES.register("mnist")
def _mnist(spec, split, data_dir, image_size):
    return load_mnist(
        require_data_dir(spec, data_dir), split, image_size=image_size
    )


@SOURCES.register("mnist32")
def _mnist32(spec, split, data_dir, image_size):
    return load_mnist(
        require_data_dir(spec, data_dir), split, image_size=image_size, pad=2
    )
