"""Synthetic moving-digit clips from MNIST for spatiotemporal grounding (Bargal 2019, Sec. 7.4.2, MNIST version).

The thesis builds a synthetic action-detection set by concatenating a ground-truth (*GT*) UCF101 video with a random
(*rand*) video of another class: ``rand + GT`` or ``GT + rand`` (16-frame clips, boundary at the midpoint) and
``rand + GT + rand`` (the GT inserted at a random position, its length varied), and evaluates temporal detection
and spatial grounding on it. :class:`MovingDigitClips` is the same construction with moving MNIST digits
(Srivastava et al. 2015's moving-MNIST style): in each clip a *GT* digit of class ``c`` and a *rand* digit of
another class move across a larger black canvas with constant velocity, bouncing off its edges; every frame shows one
of them, the *GT* digit in the GT segment and the *rand* digit elsewhere (both trajectories run through the whole
clip, as a video continues behind an inserted segment). The ground-truth box of every frame is the tight box of the
visible digit's ink, and the GT segment is known. Optional static *clutter* (fragments of random digits scattered
over the canvas, the same in every frame, like a video's background) keeps the spatial pointing game from being
trivial: on a black canvas every map that lives on the ink points at the digit.

Layouts (:data:`LAYOUTS`): ``"single"`` (the GT digit in every frame: training clips and the spatial pointing game),
``"rand+gt"``, ``"gt+rand"``, ``"rand+gt+rand"`` (the GT segment starts at a random frame and leaves at least one
rand frame on each side). The GT length is fixed or drawn per clip from a range.

Items are generated from ``(seed, index)`` alone (``numpy.random.default_rng((seed, index))``), so the source is
deterministic and random-access (a grain ``RandomAccessDataSource``)::

    {"image": [time, canvas, canvas, 1] float32 in [0, 1],
     "label": int32 - the GT class c,
     "boxes": [time, 4] int32 - (y0, x0, y1, x1) of the visible digit's ink, pixels, ends exclusive,
     "segment": [2] int32 - (start, end) of the GT frames, start <= t < end,
     "gt_frames": [time] bool - the frames that show the GT digit,
     "frame_labels": [time] int32 - the class of the digit in each frame,
     "layout": int32 - index into LAYOUTS}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.config import Settings
from saliency_jax.data.core import SOURCES
from saliency_jax.data.mnist import load_digits, load_mnist

__all__ = ["CLIP_SPECS", "LAYOUTS", "ClipSettings", "MovingDigitClips", "box_masks", "clip_source", "collate_clips",
           "ink_boxes"]

LAYOUTS = ("single", "rand+gt", "gt+rand", "rand+gt+rand")


def ink_boxes(images: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Tight boxes of the pixels brighter than ``threshold`` in each image.

    Args:
      images: [n, height, width] or [n, height, width, 1], uint8 in [0, 255] or float in [0, 1].
      threshold: in [0, 1] (fraction of full brightness); pixels strictly above it count as ink.

    Returns:
      int32 [n, 4]: ``(y0, x0, y1, x1)``, ends exclusive; ``(0, 0, 0, 0)`` for an image without ink.
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    ink = images.astype(np.float32) / scale > threshold
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    height, width = images.shape[1:3]
    y0 = np.argmax(rows, axis=1)
    y1 = height - np.argmax(rows[:, ::-1], axis=1)
    x0 = np.argmax(cols, axis=1)
    x1 = width - np.argmax(cols[:, ::-1], axis=1)
    boxes = np.stack([y0, x0, y1, x1], axis=1).astype(np.int32)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def box_masks(boxes: jax.Array, height: int, width: int) -> jax.Array:
    """Boolean masks of boxes (the pointing game's ground-truth regions); jittable, any leading shape.

    Args:
      boxes: [..., 4] integer ``(y0, x0, y1, x1)``, ends exclusive.
      height, width: mask size in pixels.

    Returns:
      bool [..., height, width], True inside each box.
    """
    boxes = jnp.asarray(boxes)
    y = jnp.arange(height)[:, None]
    x = jnp.arange(width)[None, :]
    b = boxes[..., None, None, :]
    return (y >= b[..., 0]) & (y < b[..., 2]) & (x >= b[..., 1]) & (x < b[..., 3])


@dataclasses.dataclass(frozen=True)
class MovingDigitClips:
    """A deterministic, random-access source of moving-digit clips (see the module docstring).

    Attributes:
      images: [n, 28, 28, 1] (or [n, h, w, 1]) digits, uint8 in [0, 255] or float32 in [0, 1] (MNIST).
      labels: [n] integer classes of ``images``.
      num_clips: the source's length.
      length: frames per clip (16 in the thesis's two-segment clips, 128 for ``rand + GT + rand``).
      canvas: height and width of the frames in pixels (> the digits' size).
      layout: one of :data:`LAYOUTS`.
      gt_length: frames of the GT segment: an int, an inclusive ``(low, high)`` range drawn per clip, or None for
        the layout's default (all frames for ``"single"``, half the clip otherwise).
      speed: inclusive range of the digits' speed in pixels per frame.
      seed: the source's seed; item ``i`` depends only on ``(seed, i)``.
      num_classes: number of classes (10 for MNIST).
      clutter: number of static clutter fragments per clip (0: a black background).
      clutter_size: side of the square fragments in pixels (at most the digits' size; unused without clutter),
        each cut from a random digit around one of its ink pixels and drawn under the moving digit (pixel-wise
        maximum).

    Raises:
      ValueError: unknown layout, bad shapes, a canvas not larger than the digits, a GT length that does not fit
        the layout (``rand + GT + rand`` needs ``gt_length <= length - 2``), a class with no digit, fewer than two
        classes for layouts with a rand segment.
    """

    images: np.ndarray
    labels: np.ndarray
    num_clips: int
    length: int = 16
    canvas: int = 64
    layout: str = "single"
    gt_length: int | tuple[int, int] | None = None
    speed: tuple[float, float] = (1.0, 3.0)
    seed: int = 0
    num_classes: int = 10
    clutter: int = 0
    clutter_size: int = 10

    def __post_init__(self):
        images = np.asarray(self.images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] != 1:
            raise ValueError(f"images must be [n, height, width, 1]; got shape {images.shape}")
        labels = np.asarray(self.labels).astype(np.int32)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [{images.shape[0]}]; got shape {labels.shape}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {self.layout!r}")
        if self.num_clips < 0 or self.length < 1:
            raise ValueError(f"num_clips must be >= 0 and length >= 1; got {self.num_clips}, {self.length}")
        if self.canvas <= max(images.shape[1:3]):
            raise ValueError(f"canvas ({self.canvas} px) must be larger than the digits {images.shape[1:3]}")
        low, high = self._gt_range()
        limit = {"single": (self.length, self.length), "rand+gt": (1, self.length - 1),
                 "gt+rand": (1, self.length - 1), "rand+gt+rand": (1, self.length - 2)}[self.layout]
        if not limit[0] <= low <= high <= limit[1]:
            raise ValueError(f"gt_length {self.gt_length!r} does not fit layout {self.layout!r} with {self.length} "
                             f"frames: it must lie in [{limit[0]}, {limit[1]}]")
        if self.clutter < 0 or (self.clutter and not 1 <= self.clutter_size <= min(images.shape[1:3])):
            raise ValueError(f"clutter must be >= 0 and clutter_size in [1, {min(images.shape[1:3])}]; got "
                             f"{self.clutter}, {self.clutter_size}")
        if not 0 < self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed must be a range 0 < low <= high; got {self.speed!r}")
        by_class = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
        if any(len(ix) == 0 for ix in by_class):
            raise ValueError("every class needs at least one digit")
        if self.layout != "single" and self.num_classes < 2:
            raise ValueError("layouts with a rand segment need at least two classes")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "_digits", images[..., 0].astype(np.float32) / scale)
        object.__setattr__(self, "_boxes", ink_boxes(images))
        object.__setattr__(self, "_by_class", by_class)

    @classmethod
    def from_mnist(cls, data_dir: str | os.PathLike, split: str, **kwargs) -> "MovingDigitClips":
        """Clips from the MNIST IDX files in ``data_dir`` (:func:`saliency_jax.data.load_mnist`), split
        ``"train"`` or ``"test"``; ``kwargs`` are the other attributes (``num_clips`` required)."""
        source = load_mnist(data_dir, split)
        return cls(images=source.images, labels=source.labels, num_classes=source.num_classes, **kwargs)

    def _gt_range(self) -> tuple[int, int]:
        if self.gt_length is None:
            n = self.length if self.layout == "single" else self.length // 2
            return n, n
        if isinstance(self.gt_length, (int, np.integer)):
            return int(self.gt_length), int(self.gt_length)
        low, high = self.gt_length
        return int(low), int(high)

    def __len__(self) -> int:
        return self.num_clips

    def _trajectory(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Integer top-left positions [length, 2] of a digit bouncing inside the canvas."""
        span = self.canvas - size
        position = rng.uniform(0, span, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        velocity = rng.uniform(*self.speed) * np.array([np.sin(angle), np.cos(angle)])
        out = np.empty((self.length, 2), np.int32)
        for t in range(self.length):
            out[t] = np.round(position).astype(np.int32)
            position = position + velocity
            for axis in range(2):  # reflect at the edges
                if position[axis] < 0:
                    position[axis], velocity[axis] = -position[axis], -velocity[axis]
                elif position[axis] > span:
                    position[axis], velocity[axis] = 2 * span - position[axis], -velocity[axis]
        return out

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """The static clutter [canvas, canvas] float32 in [0, 1]: fragments of random digits."""
        background = np.zeros((self.canvas, self.canvas), np.float32)
        size, height, width = self.clutter_size, *self._digits.shape[1:3]
        for _ in range(self.clutter):
            digit = self._digits[int(rng.integers(len(self._digits)))]
            ys, xs = np.nonzero(digit > 0)
            k = int(rng.integers(len(ys))) if len(ys) else 0
            cy, cx = (int(ys[k]), int(xs[k])) if len(ys) else (height // 2, width // 2)
            y0 = min(max(cy - size // 2, 0), height - size)
            x0 = min(max(cx - size // 2, 0), width - size)
            py, px = (int(v) for v in rng.integers(0, self.canvas - size + 1, size=2))
            patch = background[py:py + size, px:px + size]
            np.maximum(patch, digit[y0:y0 + size, x0:x0 + size], out=patch)
        return background

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range [0, {self.num_clips})")
        rng = np.random.default_rng((self.seed, index))
        label = int(rng.integers(self.num_classes))
        low, high = self._gt_range()
        gt_len = int(rng.integers(low, high + 1))
        t_len = self.length
        if self.layout == "single":
            start = 0
        elif self.layout == "rand+gt":
            start = t_len - gt_len
        elif self.layout == "gt+rand":
            start = 0
        else:
            start = int(rng.integers(1, t_len - gt_len))  # at least one rand frame on each side
        end = start + gt_len
        other = int(rng.integers(self.num_classes - 1))
        rand_label = other + (other >= label)
        gt_digit = int(rng.choice(self._by_class[label]))
        rand_digit = int(rng.choice(self._by_class[rand_label]))
        size = self._digits.shape[1]
        gt_path = self._trajectory(rng, size)
        rand_path = self._trajectory(rng, size)

        background = self._background(rng)

        gt_frames = np.zeros(t_len, bool)
        gt_frames[start:end] = True
        frames = np.repeat(background[None, :, :, None], t_len, axis=0)
        boxes = np.zeros((t_len, 4), np.int32)
        frame_labels = np.where(gt_frames, label, rand_label).astype(np.int32)
        for t in range(t_len):
            digit, (y, x) = (gt_digit, gt_path[t]) if gt_frames[t] else (rand_digit, rand_path[t])
            window = frames[t, y:y + size, x:x + size, 0]
            np.maximum(window, self._digits[digit], out=window)
            boxes[t] = self._boxes[digit] + np.array([y, x, y, x], np.int32)
        return {
            "image": frames,
            "label": np.int32(label),
            "boxes": boxes,
            "segment": np.array([start, end], np.int32),
            "gt_frames": gt_frames,
            "frame_labels": frame_labels,
            "layout": np.int32(LAYOUTS.index(self.layout)),
        }


def collate_clips(source: Sequence[dict] | MovingDigitClips, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Stacks items ``indices`` of a clip source into a batch (each field gets a leading [batch] axis)."""
    items = [source[int(i)] for i in indices]
    return {key: np.stack([item[key] for item in items]) for key in items[0]}


#: The clip source specs of :func:`saliency_jax.data.get_source`: the digits their clips are made of.
CLIP_SPECS = ("mnist_clips", "digits_clips")


@dataclasses.dataclass(frozen=True)
class ClipSettings(Settings):
    """The parameters of a clip source (``config.dataset.clips``; :meth:`section` makes that config section).

    The :class:`MovingDigitClips` fields, plus the number of clips of each split. The train split's clips are made
    of the train split's digits, the test split's of the test split's (both with ``seed``).

    Attributes:
      num_clips: clips in the train split (each is generated when read, from ``(seed, index)``).
      test_clips: clips in the test split.
      length: frames per clip.
      canvas: frame height and width in pixels (a multiple of 8 for :class:`saliency_jax.models.CNNLSTM`).
      layout: one of :data:`LAYOUTS` (``"single"``: one digit per clip, the training clips).
      gt_length: frames of the GT segment; 0 for the layout's default (every frame for ``"single"``, half the clip
        otherwise).
      speed: inclusive range of the digits' speed, pixels per frame.
      seed: the source's seed.
      clutter: static clutter fragments per clip (0: black background).
      clutter_size: side of the clutter fragments in pixels.
    """

    num_clips: int = 20000
    test_clips: int = 2000
    length: int = 16
    canvas: int = 64
    layout: str = "single"
    gt_length: int = 0
    speed: tuple[float, float] = (1.0, 3.0)
    seed: int = 0
    clutter: int = 0
    clutter_size: int = 10

    def clip_kwargs(self, split: str) -> dict:
        """The :class:`MovingDigitClips` keyword arguments of ``split`` (``"train"`` or ``"test"``)."""
        return dict(num_clips=int(self.num_clips if split == "train" else self.test_clips), length=int(self.length),
                    canvas=int(self.canvas), layout=str(self.layout),
                    gt_length=int(self.gt_length) if self.gt_length else None,
                    speed=tuple(float(v) for v in self.speed), seed=int(self.seed), clutter=int(self.clutter),
                    clutter_size=int(self.clutter_size))


def clip_source(spec: str, split: str, data_dir: str | os.PathLike | None = None, **options) -> MovingDigitClips:
    """The clip source of a spec of :data:`CLIP_SPECS` (what :func:`saliency_jax.data.get_source` returns for it).

    Args:
      spec: ``"mnist_clips"`` (digits: :func:`saliency_jax.data.load_mnist` of ``data_dir``, 28 px) or
        ``"digits_clips"`` (scikit-learn's embedded 8 x 8 digits, :func:`saliency_jax.data.load_digits`; no files,
        for tests and ``:runlocal`` configs).
      split: ``"train"`` or ``"test"``: the digits' split (and :attr:`ClipSettings.num_clips` or ``test_clips``).
      data_dir: the MNIST IDX folder (``"mnist_clips"``).
      **options: fields of :class:`ClipSettings` (unknown ones raise).

    Returns:
      A :class:`MovingDigitClips` whose items are ``{"image": [length, canvas, canvas, 1] float32, "label", "boxes",
      "segment", "gt_frames", "frame_labels", "layout"}``.

    Raises:
      ValueError: unknown spec or option, a missing ``data_dir``, or bad clip parameters (see
        :class:`MovingDigitClips`).
    """
    settings = ClipSettings.from_mapping(options)
    if spec == "mnist_clips":
        if data_dir is None:
            raise ValueError("get_source('mnist_clips') needs data_dir (the folder of the MNIST IDX files)")
        digits = load_mnist(data_dir, split)
    elif spec == "digits_clips":
        digits = load_digits(split)
    else:
        raise ValueError(f"unknown clip spec {spec!r}; choose from {CLIP_SPECS}")
    return MovingDigitClips(images=digits.images, labels=digits.labels, num_classes=digits.num_classes,
                            **settings.clip_kwargs(split))


def _clip_source(spec, split, data_dir, image_size, **options):
    """:func:`clip_source`; clips are not resized (their frame size is the ``canvas`` option)."""
    if image_size is not None:
        raise ValueError(f"get_source({spec!r}): clips are not resized; set image_size None (the frame size is "
                         f"the clips' canvas option), got {image_size}")
    return clip_source(spec, split, data_dir, **options)


SOURCES.register("mnist_clips", _clip_source, own_options=True)
SOURCES.register("digits_clips", _clip_source, own_options=True)
