"""The MNIST background protocol of Cruz & Cardoso: the clean test set and six fixed synthetic backgrounds.

Cruz & Cardoso, "Training a CNN to be background invariant" (poster; ICPR 2020 "Background Invariance by
Adversarial Learning"), Table 1: a CNN trained on MNIST is tested on the clean test set and on six copies in which
every pixel outside a 2-pixel dilation of the digit is replaced by a fixed binary pattern, the same for every image.
Digits are zero-padded from 28x28 to 32x32 (2 px per side) and scaled to [0, 1] (``mydatasets.mnist``).

The patterns, as the authors' ``mybackgrounds.py`` draws them at size ``S`` (32 here; row ``y``, column ``x``):

==================  ==============================================================================================
``stripes``         diagonal lines ``y = x + b``, thickness 2, gap 8: pixel on iff ``(y - x + S - 1) mod 10 < 2``
``checkerboard``    6-px squares offset by -2 px, top-left square off: on iff ``((y + 2) // 6 + (x + 2) // 6)`` odd
``border``          a 2-px frame
``circles``         Bresenham circle outlines (``skimage.draw.circle_perimeter``) of radius 6 centred at (8, 8),
                    (S - 8, 8), (8, S - 8), (S - 8, S - 8)
``clock``           outlines of radius ``S/2 - 1`` and ``S/2 - 2`` (15 and 14) about (S/2, S/2) and four tick bars,
                    ``skimage.draw.rectangle`` with inclusive ends: rows S/2-1..S/2+1 by columns 0..6 and S-6..S-1,
                    columns S/2-1..S/2+1 by rows 0..6 and S-6..S-1 (so the bars are 3 px wide; the left and top bars
                    are 7 px long, the right and bottom 6 px, as in the code)
``random``          salt and pepper: ``int(0.25 S^2)`` pixels on, the first draw of ``RandomState(0).choice(S^2,
                    int(0.25 S^2), replace=False)`` (the code's ``salt_pepper``): the same pixels on every image
==================  ==============================================================================================

The replacement (``mydatasets.apply_background``): ``outside = not binary_dilation(x > 0, disk(2))``, ``x[outside]
= pattern[outside]``. ``disk(2)`` is the 13-pixel Euclidean disk (``dy^2 + dx^2 <= 4``). Pixels inside the dilation
keep their value (zero where they are not the digit), so the digit keeps a dark halo of up to 2 px. With several
channels the code dilates each channel separately (a ``disk(2)[..., None]`` footprint); :func:`apply_background`
does the same.

Where this follows the code rather than the poster's words: the clock's tick bars (the poster says only "four tick
bars"), the checkerboard's -2 px offset, and the exact salt-and-pepper pixels. Nothing here differs from the code.
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from saliency_jax.data.sources import ImageSource, load_mnist

Array = jax.Array

__all__ = [
    "BACKGROUND_NAMES",
    "TEST_SET_NAMES",
    "DILATION_RADIUS",
    "background_pattern",
    "circle_perimeter",
    "disk",
    "dilate",
    "apply_background",
    "background_test_sets",
    "evaluate_backgrounds",
    "background_contact_sheet",
    "image_grid",
    "load_mnist_padded",
]

BACKGROUND_NAMES = ("stripes", "checkerboard", "border", "circles", "clock", "random")
"""The six backgrounds in the order of Table 1 (and of ``mybackgrounds.l``)."""

TEST_SET_NAMES = ("clean",) + BACKGROUND_NAMES
"""The seven test sets (Table 1 columns)."""

DILATION_RADIUS = 2
"""Radius of the disk by which the digit is dilated before the background replaces the rest (``disk(2)``)."""


# ----------------------------------------------------------------------------------------------------------------
# The patterns (host-side NumPy, built once per size).


def circle_perimeter(row: int, col: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Bresenham circle outline, the pixels ``skimage.draw.circle_perimeter(row, col, radius)`` returns.

    Midpoint algorithm with decision variable ``d = 3 - 2r``: starting at ``(0, r)``, step the row by one and, when
    ``d >= 0``, the column down by one (``d += 4 (r_i - c_i) + 10``, else ``d += 4 r_i + 6``), while ``r_i <= c_i``;
    the eight symmetric copies of each point. Radius 6 gives the octant (0, 6), (1, 6), (2, 6), (3, 5), (4, 4).

    Returns:
      ``(rows, cols)`` int arrays (with repeats, as scikit-image's), possibly outside any image.
    """
    rows, cols = [], []
    r, c, d = 0, int(radius), 3 - 2 * int(radius)
    while r <= c:
        rows.extend([r, -r, r, -r, c, -c, c, -c])
        cols.extend([c, c, -c, -c, r, r, -r, -r])
        if d < 0:
            d += 4 * r + 6
        else:
            d += 4 * (r - c) + 10
            c -= 1
        r += 1
    return np.asarray(rows) + int(row), np.asarray(cols) + int(col)


def _draw(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    keep = (rows >= 0) & (rows < img.shape[0]) & (cols >= 0) & (cols < img.shape[1])
    img[rows[keep], cols[keep]] = 1.0


def _stripes(size: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (((y - x + size - 1) % 10) < 2).astype(np.float32)


def _checkerboard(size: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (((y + 2) // 6 + (x + 2) // 6) % 2).astype(np.float32)


def _border(size: int) -> np.ndarray:
    img = np.zeros((size, size), np.float32)
    img[:2], img[-2:], img[:, :2], img[:, -2:] = 1, 1, 1, 1
    return img


def _circles(size: int) -> np.ndarray:
    img = np.zeros((size, size), np.float32)
    for r, c in ((8, 8), (size - 8, 8), (8, size - 8), (size - 8, size - 8)):
        _draw(img, *circle_perimeter(r, c, 6))
    return img


def _clock(size: int) -> np.ndarray:
    img = np.zeros((size, size), np.float32)
    half = size // 2
    _draw(img, *circle_perimeter(half, half, half - 1))
    _draw(img, *circle_perimeter(half, half, half - 2))
    w, h = 2, 6
    # skimage.draw.rectangle(start, end) includes ``end``.
    img[half - w // 2:half + w // 2 + 1, 0:h + 1] = 1
    img[half - w // 2:half + w // 2 + 1, size - h:size] = 1
    img[0:h + 1, half - w // 2:half + w // 2 + 1] = 1
    img[size - h:size, half - w // 2:half + w // 2 + 1] = 1
    return img


def _salt_and_pepper(size: int, rate: float = 0.25) -> np.ndarray:
    img = np.zeros(size * size, np.float32)
    img[np.random.RandomState(0).choice(size * size, int(size * size * rate), False)] = 1
    return img.reshape(size, size)


_PATTERNS: dict[str, Callable[[int], np.ndarray]] = {
    "stripes": _stripes, "checkerboard": _checkerboard, "border": _border, "circles": _circles,
    "clock": _clock, "random": _salt_and_pepper,
}


@functools.lru_cache(maxsize=None)
def _pattern(name: str, size: int) -> np.ndarray:
    out = _PATTERNS[name](size)
    out.setflags(write=False)
    return out


def background_pattern(name: str, size: int = 32) -> np.ndarray:
    """One of the six fixed binary backgrounds.

    Args:
      name: one of :data:`BACKGROUND_NAMES`.
      size: side of the square image in pixels (at least 16, so the circles and tick bars fit).

    Returns:
      float32 [size, size] in {0, 1} (read-only; the module's table above says what is on).

    Raises:
      ValueError: on an unknown name or a size below 16.
    """
    if name not in _PATTERNS:
        raise ValueError(f"unknown background {name!r}; choose from {BACKGROUND_NAMES}")
    if int(size) < 16:
        raise ValueError(f"background size must be >= 16 px; got {size}")
    return _pattern(name, int(size))


# ----------------------------------------------------------------------------------------------------------------
# Applying them (JAX, batched, jittable).


def disk(radius: int = DILATION_RADIUS) -> np.ndarray:
    """bool [2r + 1, 2r + 1] Euclidean disk ``dy^2 + dx^2 <= r^2`` (``skimage.morphology.disk``)."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (y * y + x * x) <= radius * radius


def dilate(mask: Array, radius: int = DILATION_RADIUS) -> Array:
    """Binary dilation of each channel of each image by :func:`disk` (pixels beyond the border count as off).

    Args:
      mask: bool [batch, height, width, channels].
      radius: the disk's radius in pixels.

    Returns:
      bool [batch, height, width, channels]: on where any pixel within the disk is on.
    """
    if mask.ndim != 4:
        raise ValueError(f"mask must be [batch, height, width, channels]; got shape {mask.shape}")
    m = mask.astype(bool)
    padded = jnp.pad(m, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
    _, height, width, _ = m.shape
    out = jnp.zeros_like(m)
    for dy, dx in zip(*np.nonzero(disk(radius))):
        out = out | padded[:, dy:dy + height, dx:dx + width, :]
    return out


def apply_background(images: Array, pattern: Array | np.ndarray, radius: int = DILATION_RADIUS) -> Array:
    """Replaces every pixel outside the dilated digit by the pattern (``mydatasets.apply_background``, batched).

    Args:
      images: [batch, height, width, channels] float in [0, 1], objects on a zero background.
      pattern: [height, width] or [height, width, channels] float, the background.
      radius: dilation radius (2 in the protocol).

    Returns:
      float32 [batch, height, width, channels]: ``images`` where ``dilate(images > 0)``, ``pattern`` elsewhere.

    Raises:
      ValueError: if the pattern's size differs from the images'.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, height, width, channels]; got shape {images.shape}")
    pattern = jnp.asarray(pattern, jnp.float32)
    if pattern.ndim == 2:
        pattern = pattern[..., None]
    if pattern.shape[:2] != images.shape[1:3]:
        raise ValueError(f"pattern {pattern.shape[:2]} does not match the images' size {images.shape[1:3]}")
    keep = dilate(images > 0, radius)
    return jnp.where(keep, images.astype(jnp.float32), pattern[None])


def background_test_sets(images: Array, names: Sequence[str] = TEST_SET_NAMES) -> dict[str, Array]:
    """The protocol's test sets built from any batch of images (jittable; patterns are constants).

    Args:
      images: [batch, height, width, channels] float32 in [0, 1], square, objects on a zero background (e.g.
        :func:`load_mnist_padded` digits).
      names: which sets, from :data:`TEST_SET_NAMES` (``"clean"`` is the images unchanged).

    Returns:
      ``{name: [batch, height, width, channels] float32}`` in the order of ``names``.

    Raises:
      ValueError: on an unknown name or non-square images.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be [batch, size, size, channels]; got shape {images.shape}")
    out = {}
    for name in names:
        if name == "clean":
            out[name] = images.astype(jnp.float32)
        else:
            out[name] = apply_background(images, background_pattern(name, images.shape[1]))
    return out


def evaluate_backgrounds(predict_fn: Callable[[Array], Array], images: np.ndarray | Array,
                         labels: np.ndarray | Array, *, batch_size: int = 1000,
                         names: Sequence[str] = TEST_SET_NAMES,
                         mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
    """Accuracy of any model on each test set of the protocol.

    Each batch of images goes to the device once; one jitted call builds all test sets from it and runs the model
    on them, and only the per-set correct counts come back. The last batch is padded to ``batch_size`` (so the
    function compiles once) and the padding is not counted.

    Args:
      predict_fn: jittable ``images [n, height, width, channels] float32 -> logits or scores [n, num_classes]``,
        e.g. ``lambda x: model.apply(variables, x, train=False)``.
      images: [num_examples, height, width, channels] float32 in [0, 1] (zero background).
      labels: [num_examples] int.
      batch_size: images per jitted call (each call evaluates ``len(names) * batch_size`` images).
      names: test sets, from :data:`TEST_SET_NAMES`.
      mesh: optional device mesh with an axis ``'data'``: each batch is split over it (``batch_size`` is then
        rounded up to a multiple of its size) and ``predict_fn``'s captured parameters are used as they are placed.

    Returns:
      ``{name: accuracy in [0, 1]}`` in the order of ``names``.

    Raises:
      ValueError: on mismatched lengths, an empty set, or a bad batch size.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"images [n, h, w, c] and labels [n] must agree; got {images.shape}, {labels.shape}")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    names = tuple(names)
    for name in names:
        if name not in TEST_SET_NAMES:
            raise ValueError(f"unknown test set {name!r}; choose from {TEST_SET_NAMES}")
    batch_size = min(int(batch_size), len(images))
    sharding = None
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharding = NamedSharding(mesh, PartitionSpec("data"))
        size = mesh.shape["data"]
        batch_size = -(-batch_size // size) * size

    @jax.jit
    def correct(x, y, valid):
        sets = background_test_sets(x, names)
        stacked = jnp.concatenate([sets[n] for n in names], axis=0)
        preds = jnp.argmax(predict_fn(stacked), axis=-1).reshape(len(names), -1)
        return jnp.sum((preds == y[None]) & valid[None], axis=1)

    totals = np.zeros(len(names), np.int64)
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        n = len(x)
        valid = np.arange(batch_size) < n
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(batch_size - n, y.dtype)])
        if sharding is not None:
            x, y, valid = jax.device_put((x, y, valid), sharding)
        totals += np.asarray(correct(x, y, valid))
    return {name: float(t) / len(images) for name, t in zip(names, totals)}


# ----------------------------------------------------------------------------------------------------------------
# Figure and data.


def image_grid(rows: Mapping[str, Any], path: str | os.PathLike[str], *, column_labels: Sequence[Any] | None = None,
               cell_inches: float = 1.0, title: str | None = None) -> pathlib.Path:
    """A grid of images, one named row per entry (PNG via matplotlib's Agg canvas, no pyplot).

    Used for the contact sheet of the test sets and for figures of phase 3 along training (image, soft mask,
    binary mask, generated background, composite: the poster's Fig. 4; see
    :func:`saliency_jax.training.background_invariance.phase3_preview`).

    Args:
      rows: ``{row name: [n, height, width, 1 or 3] float in [0, 1]}``, the same ``n`` for every row.
      path: output file; parent folders are created.
      column_labels: optional ``n`` column titles.
      cell_inches: size of one image in inches.
      title: optional figure title.

    Returns:
      The path written.

    Raises:
      ValueError: on no rows, bad shapes, different ``n``, values outside [0, 1], or wrong ``column_labels``.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    arrays = {}
    for name, value in rows.items():
        a = np.asarray(value, np.float32)
        if a.ndim != 4 or a.shape[-1] not in (1, 3) or len(a) == 0:
            raise ValueError(f"row {name!r} must be [n >= 1, height, width, 1 or 3]; got shape {a.shape}")
        if not np.all(np.isfinite(a)) or a.min() < -1e-6 or a.max() > 1 + 1e-6:
            raise ValueError(f"row {name!r} must lie in [0, 1]; got [{a.min()}, {a.max()}] (clip or rescale it)")
        arrays[name] = np.clip(a, 0.0, 1.0)
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise ValueError(f"every row needs the same number of images; got {[len(a) for a in arrays.values()]}")
    cols = counts.pop()
    if column_labels is not None and len(column_labels) != cols:
        raise ValueError(f"{len(column_labels)} column labels for {cols} images")
    fig = Figure(figsize=(cell_inches * cols + 1.2, cell_inches * len(arrays) + (0.5 if title else 0.1)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(arrays), cols, squeeze=False)
    for i, (name, a) in enumerate(arrays.items()):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(a[j, ..., 0] if a.shape[-1] == 1 else a[j], cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center")
            if i == 0 and column_labels is not None:
                ax.set_title(str(column_labels[j]))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def background_contact_sheet(images: np.ndarray | Array, path: str | os.PathLike[str], *,
                             labels: Sequence[Any] | None = None, names: Sequence[str] = TEST_SET_NAMES,
                             cell_inches: float = 1.0, title: str | None = None) -> pathlib.Path:
    """A contact sheet of the test sets: one row per set, one column per image (:func:`image_grid`).

    Args:
      images: [n, height, width, channels] float32 in [0, 1] (1 or 3 channels), zero background; a few images.
      path: output file; parent folders are created.
      labels: optional per-column titles (e.g. the digits' classes).
      names: the rows, from :data:`TEST_SET_NAMES`.
      cell_inches: size of one image in inches.
      title: optional figure title.

    Returns:
      The path written.

    Raises:
      ValueError: on a bad shape, values outside [0, 1], or ``labels`` of the wrong length.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be [n >= 1, height, width, 1 or 3]; got shape {images.shape}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must lie in [0, 1]; got [{images.min()}, {images.max()}]")
    sets = background_test_sets(jnp.asarray(images), tuple(names))
    return image_grid({k: np.asarray(v) for k, v in sets.items()}, path, column_labels=labels,
                      cell_inches=cell_inches, title=title)


def load_mnist_padded(data_dir: str | os.PathLike[str], split: str, *, pad: int = 2) -> ImageSource:
    """MNIST digits zero-padded to 32x32 (``mydatasets.mnist``: ``np.pad(X, 2)``, then ``/ 255``).

    :func:`saliency_jax.data.load_mnist` with ``image_size=32`` would stretch the digits by bilinear resizing; the
    protocol pads instead, so the digit keeps its pixels and the border stays black. The same as
    ``load_mnist(data_dir, split, pad=pad)`` and, for ``pad=2``, the source spec ``"mnist32"`` of
    :func:`saliency_jax.data.get_source` (what the experiment configs name).

    Args:
      data_dir: folder with the four IDX files.
      split: ``"train"`` or ``"test"``.
      pad: zero pixels added on each side (2: 28 -> 32).

    Returns:
      An :class:`~saliency_jax.data.ImageSource` of uint8 images [n, 28 + 2 pad, 28 + 2 pad, 1] (items float32 in
      [0, 1]), named ``mnist32/<split>``.

    Raises:
      ValueError, FileNotFoundError: as :func:`~saliency_jax.data.load_mnist`, or a negative ``pad``.
    """
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0; got {pad}")
    return load_mnist(data_dir, split, pad=int(pad))
