"""Decoy MNIST (Ross, Hughes, Doshi-Velez, IJCAI 2017, Sec. 4; built as dtak/rrr's ``rrr/decoy_mnist.py`` does).

Every MNIST image gets a 4 x 4 patch in one of its four corners, the corner drawn uniformly (top or bottom with
probability 1/2, then left or right with probability 1/2). The patch's gray value is ``255 - 25 * d``: in the
training set ``d`` is the image's own label, so the patch alone predicts the class (the decoy rule); in the test set
``d`` is a digit drawn uniformly from 0-9 independently of the label, so a model that learned the patch fails. The
patch overwrites the pixels under it.

Built here from the four IDX files (:func:`saliency_jax.data.load_mnist`), deterministically from a seed, with no
file written, in dtak/rrr's draw order (:func:`draw_decoys`): one ``numpy.random.RandomState(seed)`` stream, which
serves the training images first, in file order, two uniform draws each (row side, then column side), then the test
images, in file order, three draws each (the patch digit, chosen among the training set's distinct labels, then
the row side, then the column side). dtak/rrr draw from NumPy's global generator, unseeded; after
``np.random.seed(seed)`` their ``generate_dataset`` gives the images of ``load_decoy_mnist(..., seed=seed)`` for both
splits. A test split therefore depends on the number of training images (the draws it consumes first), which is
why loading it reads the training labels too.

Per-example fields besides ``image`` and ``label``:

* ``"wrong_region"`` (``A``, the annotation of RRR): [28, 28] float32 in {0, 1}, 1 on the patch (dtak/rrr's ``E``).
* ``"region"`` (``S``, the region Grad-CAM guidance pulls the map onto): [28, 28] float32 in {0, 1}, the digit's
  own pixels - those of the decoy image brighter than ``region_threshold`` outside the patch (exactly the original
  digit's pixels that the patch did not overwrite), optionally dilated.
* ``"decoy_label"``: int32, the digit ``d`` the patch encodes (= ``label`` in the training set).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from saliency_jax.data import augment as augment_lib
from saliency_jax.data.core import SOURCES, check_image_size, check_split, require_data_dir
from saliency_jax.data.mnist import load_digits, load_mnist, load_mnist_labels

__all__ = [
    "PATCH_SIZE",
    "CORNERS",
    "patch_value",
    "DecoyDraws",
    "draw_decoys",
    "patch_masks",
    "add_patches",
    "DecoyMNISTSource",
    "load_decoy_mnist",
    "digits_as_mnist",
    "BASES",
    "DIGITS_BOX",
    "DECOY_OPTIONS",
]

PATCH_SIZE = 4
"""Side of the decoy patch in pixels (dtak/rrr: rows/columns 0..3 or -1..-4)."""

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
"""Corner codes 0..3 used by :func:`draw_decoys` and :func:`patch_masks`."""

def patch_value(digits: np.ndarray) -> np.ndarray:
    """Gray value of the patch that encodes ``digits``: ``255 - 25 * d`` (dtak/rrr, ``mult=25``).

    Args:
      digits: int array in [0, 9].

    Returns:
      uint8 array of the same shape (255 for 0, ..., 30 for 9).

    Raises:
      ValueError: a digit outside [0, 9].
    """
    digits = np.asarray(digits)
    if digits.size and (digits.min() < 0 or digits.max() > 9):
        raise ValueError(f"patch_value: digits must lie in [0, 9]; got range [{digits.min()}, {digits.max()}]")
    return (255 - 25 * digits.astype(np.int64)).astype(np.uint8)


class DecoyDraws(NamedTuple):
    """The random draws of a Decoy MNIST dataset (:func:`draw_decoys`).

    Attributes:
      train_corners: int8 [n_train] corner codes in [0, 3] (see :data:`CORNERS`); a training patch encodes the label.
      test_digits: int32 [n_test] in [0, 9], the digit each test patch encodes (independent of the test label).
      test_corners: int8 [n_test] corner codes in [0, 3].
    """

    train_corners: np.ndarray
    test_digits: np.ndarray
    test_corners: np.ndarray


def _corner_codes(top: np.ndarray, left: np.ndarray) -> np.ndarray:
    return (2 * (~top) + (~left)).astype(np.int8)


def draw_decoys(train_labels: np.ndarray, num_test: int, seed: int) -> DecoyDraws:
    """Draws every patch corner and test patch digit in dtak/rrr's order (``rrr/decoy_mnist.py``).

    One ``np.random.RandomState(seed)`` serves, as NumPy's global generator does in dtak/rrr's
    ``_generate_dataset``:

    1. each training image in order: ``rand() < 0.5`` (the patch on the top rows 0-3, else the bottom rows),
       then ``rand() < 0.5`` (the left columns 0-3, else the right ones);
    2. then each test image in order: ``choice(digits)``, ``digits`` being the sorted distinct training labels
       (their ``list(set(y))``), the digit its patch encodes; then the row side and the column side as in 1.

    The training draws come first, so the test split's draws depend on ``len(train_labels)``.

    Args:
      train_labels: [n_train] int labels in [0, 9] of the training split (their number and distinct values are
        what the draws use).
      num_test: number of test images (0: draw the training split's only).
      seed: the ``RandomState`` seed (an int in [0, 2**32)).

    Returns:
      :class:`DecoyDraws`.

    Raises:
      ValueError: labels not 1-D or outside [0, 9], an empty training split with test images to draw, a negative
        ``num_test``.
    """
    train_labels = np.asarray(train_labels)
    if train_labels.ndim != 1:
        raise ValueError(f"draw_decoys: train_labels must be [n_train]; got shape {train_labels.shape}")
    if train_labels.size and (train_labels.min() < 0 or train_labels.max() > 9):
        raise ValueError(f"draw_decoys: train_labels must lie in [0, 9]; got range "
                         f"[{train_labels.min()}, {train_labels.max()}]")
    num_test = int(num_test)
    if num_test < 0:
        raise ValueError(f"draw_decoys: num_test must be >= 0; got {num_test}")
    if num_test and not train_labels.size:
        raise ValueError("draw_decoys: the test patch digits are drawn among the training labels; got none")
    rng = np.random.RandomState(int(seed))
    # Training images: (row side, column side) per image. random_sample(2 n) is the same stream as 2 n rand() calls.
    sides = rng.random_sample(2 * train_labels.shape[0]).reshape(-1, 2) < 0.5
    train_corners = _corner_codes(sides[:, 0], sides[:, 1])
    digits = np.unique(train_labels.astype(np.int64))
    test_digits = np.empty(num_test, np.int32)
    top = np.empty(num_test, bool)
    left = np.empty(num_test, bool)
    for i in range(num_test):  # choice interleaved with the two sides: one image at a time, as theirs
        test_digits[i] = rng.choice(digits)
        top[i] = rng.random_sample() < 0.5
        left[i] = rng.random_sample() < 0.5
    return DecoyDraws(train_corners, test_digits, _corner_codes(top, left))


def patch_masks(corners: np.ndarray, height: int = 28, width: int = 28) -> np.ndarray:
    """The patch of each image as a boolean mask.

    Args:
      corners: int [n] corner codes in [0, 3] (see :data:`CORNERS`).
      height, width: image size in pixels.

    Returns:
      bool [n, height, width], True on the :data:`PATCH_SIZE` x :data:`PATCH_SIZE` patch.
    """
    corners = np.asarray(corners)
    rows = np.arange(height)
    cols = np.arange(width)
    bottom = (corners // 2 == 1)[:, None]
    right = (corners % 2 == 1)[:, None]
    row_in = np.where(bottom, rows >= height - PATCH_SIZE, rows < PATCH_SIZE)  # [n, height]
    col_in = np.where(right, cols >= width - PATCH_SIZE, cols < PATCH_SIZE)  # [n, width]
    return row_in[:, :, None] & col_in[:, None, :]


def add_patches(images: np.ndarray, patch_digits: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Writes the decoy patches into a copy of the images.

    Args:
      images: uint8 [n, height, width] (or [n, height, width, 1]).
      patch_digits: int [n] in [0, 9].
      corners: int [n] in [0, 3].

    Returns:
      uint8 array like ``images`` with the patch pixels set to ``255 - 25 * d``.
    """
    out = np.array(images, dtype=np.uint8, copy=True)
    grid = out[..., 0] if out.ndim == 4 else out
    masks = patch_masks(corners, grid.shape[1], grid.shape[2])
    values = np.broadcast_to(patch_value(patch_digits)[:, None, None], masks.shape)
    grid[masks] = values[masks]
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class DecoyMNISTSource:
    """Decoy MNIST as a random-access source (grain), with the regions of both guidance schemes.

    Attributes:
      images: uint8 [n, 28, 28, 1], the decoy images.
      labels: int32 [n] true digits.
      patch_digits: int32 [n] the digit each patch encodes.
      corners: int8 [n] corner codes (see :data:`CORNERS`).
      num_classes: 10.
      class_names: ``("0", ..., "9")``.
      name: e.g. ``"decoy_mnist/train"``.
      region_threshold: a pixel belongs to the digit where its uint8 value is ``> region_threshold``.
      region_dilation: dilate the digit region by this many pixels (3 x 3 cross per step,
        ``scipy.ndimage.binary_dilation``; 0 = the exact pixels), never onto the patch.
      image_size: if set, image and regions are resized (bilinear) to [image_size, image_size].

    Items: ``{"image": [h, w, 1] float32 in [0, 1], "label": int32, "region": [h, w] float32, "wrong_region":
    [h, w] float32, "decoy_label": int32}`` (regions in {0, 1}; in [0, 1] after a resize).
    """

    images: np.ndarray
    labels: np.ndarray
    patch_digits: np.ndarray
    corners: np.ndarray
    num_classes: int = 10
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10))
    name: str = "decoy_mnist"
    region_threshold: int = 0
    region_dilation: int = 0
    image_size: int | None = None

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 1:
            raise ValueError(f"DecoyMNISTSource: images must be uint8 [n, h, w, 1]; got {self.images.dtype} "
                             f"{self.images.shape}")
        for field in ("labels", "patch_digits", "corners"):
            if np.shape(getattr(self, field)) != (n,):
                raise ValueError(f"DecoyMNISTSource: {field} must be [{n}]; got {np.shape(getattr(self, field))}")
        if not 0 <= int(self.region_threshold) < 255:
            raise ValueError(f"DecoyMNISTSource: region_threshold must lie in [0, 255); got {self.region_threshold}")
        if int(self.region_dilation) < 0:
            raise ValueError(f"DecoyMNISTSource: region_dilation must be >= 0; got {self.region_dilation}")
        check_image_size(self.image_size, f"Source {self.name!r}")
        object.__setattr__(self, "labels", np.asarray(self.labels, np.int32))
        object.__setattr__(self, "patch_digits", np.asarray(self.patch_digits, np.int32))
        object.__setattr__(self, "corners", np.asarray(self.corners, np.int8))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        pixels = self.images[index]
        wrong = patch_masks(self.corners[index:index + 1], *pixels.shape[:2])[0]
        digit = pixels[..., 0] > self.region_threshold
        if self.region_dilation:
            digit = ndimage.binary_dilation(digit, iterations=int(self.region_dilation))
        digit &= ~wrong
        image = pixels.astype(np.float32) / np.float32(255.0)
        region, wrong_region = digit.astype(np.float32), wrong.astype(np.float32)
        if self.image_size is not None and pixels.shape[:2] != (self.image_size, self.image_size):
            image = augment_lib.resize(image, self.image_size)
            region = augment_lib.resize_spatial(region, self.image_size)
            wrong_region = augment_lib.resize_spatial(wrong_region, self.image_size)
        return {"image": image, "label": np.int32(self.labels[index]), "region": region,
                "wrong_region": wrong_region, "decoy_label": np.int32(self.patch_digits[index])}

    def __repr__(self) -> str:
        return (f"DecoyMNISTSource(name={self.name!r}, len={len(self)}, image_size={self.image_size}, "
                f"region_threshold={self.region_threshold}, region_dilation={self.region_dilation})")


DIGITS_BOX = 20
"""Side in pixels of the box the 8 x 8 scikit-learn digits are upsampled to (MNIST's digits fit a 20 x 20 box)."""


def digits_as_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8 x 8 digits laid out like MNIST, for runs and tests without the IDX files.

    Each digit (:func:`saliency_jax.data.load_digits`, its fixed 75/25 split) is upsampled bilinearly (Pillow) to
    :data:`DIGITS_BOX` x :data:`DIGITS_BOX` pixels and centred on a 28 x 28 black canvas, as MNIST's digits are.

    Args:
      split: ``"train"`` (1347 images) or ``"test"`` (450).

    Returns:
      ``(images uint8 [n, 28, 28], labels int32 [n])``.

    Raises:
      ValueError: unknown split.
    """
    digits = load_digits(split)
    images = np.zeros((len(digits), 28, 28), np.uint8)
    offset = (28 - DIGITS_BOX) // 2
    for i, image in enumerate(digits.images[..., 0]):
        pil = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((DIGITS_BOX, DIGITS_BOX),
                                                                              Image.Resampling.BILINEAR)
        images[i, offset:offset + DIGITS_BOX, offset:offset + DIGITS_BOX] = np.asarray(pil)
    return images, digits.labels


BASES = ("mnist", "digits")
"""What :func:`load_decoy_mnist` adds the patches to: the MNIST IDX files, or :func:`digits_as_mnist`."""


def load_decoy_mnist(data_dir: str | os.PathLike[str] | None, split: str, *, seed: int = 0,
                     region_threshold: int = 0, region_dilation: int = 0, image_size: int | None = None,
                     decoy: bool = True, base: str = "mnist") -> DecoyMNISTSource:
    """Decoy MNIST built from the MNIST IDX files in ``data_dir`` (see the module docstring).

    Args:
      data_dir: directory of the four MNIST IDX files (as :func:`saliency_jax.data.load_mnist`); unused (may be
        None) with ``base="digits"``.
      split: ``"train"`` (60000 images, patch = label) or ``"test"`` (10000 images, patch = random digit).
      seed: seed of the patch digits and corners (:func:`draw_decoys`, dtak/rrr's draw order); the same seed
        gives the same dataset, and dtak/rrr's after ``np.random.seed(seed)``.
      region_threshold: uint8 level above which a pixel is the digit's (``region``).
      region_dilation: pixels of dilation of the digit region (0 = exact).
      image_size: optional square resize (bilinear) of images and regions.
      decoy: False gives clean MNIST with the same fields (the patches drawn but not written into the images:
        ``wrong_region`` marks where the patch would be, ``decoy_label`` what it would encode), for the
        clean-data ceiling arm with the same train step and evaluation.
      base: ``"mnist"`` (the IDX files in ``data_dir``) or ``"digits"`` (the bundled scikit-learn digits laid out
        as MNIST, :func:`digits_as_mnist`: a small Decoy "MNIST" that needs no files, for tests and ``:runlocal``
        configs).

    Returns:
      :class:`DecoyMNISTSource`.

    Raises:
      FileNotFoundError, ValueError: as :func:`saliency_jax.data.load_mnist` (the test split also reads the
        training labels file); ValueError for an unknown split or bad region settings.
    """
    check_split(split, "load_decoy_mnist")
    if base == "mnist":
        if data_dir is None:
            raise ValueError("load_decoy_mnist: base='mnist' needs data_dir (the MNIST IDX files)")
        mnist = load_mnist(data_dir, split)
        clean, labels = mnist.images, mnist.labels
        train_labels = labels if split == "train" else load_mnist_labels(data_dir, "train")
    elif base == "digits":
        clean, labels = digits_as_mnist(split)
        clean = clean[..., None]
        train_labels = labels if split == "train" else load_digits("train").labels
    else:
        raise ValueError(f"load_decoy_mnist: base must be one of {BASES}; got {base!r}")
    if split == "train":
        digits, corners = labels.copy(), draw_decoys(train_labels, 0, seed).train_corners
    else:
        _, digits, corners = draw_decoys(train_labels, len(labels), seed)
    images = add_patches(clean, digits, corners) if decoy else clean
    prefix = ("decoy" if decoy else "clean") + ("_mnist" if base == "mnist" else "_digits")
    return DecoyMNISTSource(images=images, labels=labels, patch_digits=digits, corners=corners,
                            name=f"{prefix}/{split}", region_threshold=region_threshold,
                            region_dilation=region_dilation, image_size=image_size)


DECOY_OPTIONS = ("seed", "region_threshold", "region_dilation", "base")
"""The ``get_source(..., options=)`` keywords of the ``"decoy_mnist"`` and ``"clean_mnist"`` specs."""


def _decoy_source(spec, split, data_dir, image_size, **options):
    """``"decoy_mnist"``: :func:`load_decoy_mnist`; ``"clean_mnist"``: the same with ``decoy=False``."""
    if options.get("base", "mnist") == "mnist":
        data_dir = require_data_dir(spec, data_dir)
    return load_decoy_mnist(data_dir, split, image_size=image_size, decoy=spec == "decoy_mnist", **options)


SOURCES.register("decoy_mnist", _decoy_source, options=DECOY_OPTIONS)
SOURCES.register("clean_mnist", _decoy_source, options=DECOY_OPTIONS)
