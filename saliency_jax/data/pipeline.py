"""grain input pipelines for training and evaluation.

Training (:func:`make_train_dataset`)::

        source -> [indices] -> shuffle (reseeded every epoch) -> repeat
                      -> resize -> random_map(augment) -> this process's shard -> batch

The shuffle and the augmentation are functions of the seed and of the
position in the *global* example stream, and each process keeps its
contiguous rows of every global batch of that stream (process ``i`` rows
``[i * b, (i + 1) * b)``, ``b = batch_size // shard_count``). Hence the
processes' batches at step t, stacked in process order, are exactly batch t
of the single-process pipeline with the same global batch size, row for row:
results do not depend on how many hosts read the data.

Evaluation (:func:`make_eval_batches`) reads examples in order and pads the
last batch, with a ``mask`` marking the real rows.

Clips: a source whose items have ``"image": [time, height, width, channels]``
(e.g. :class:`saliency_jax.data.MovingDigitClips`) yields batches of clips
``[batch, time, height, width, channels]``; clips are neither resized nor
augmented (``image_size`` and ``augment_kwargs`` must be unset: the moving-digit
clips vary their digits' positions themselves), and their other fields (boxes,
segments) pass through unchanged.

Fields: every field a source yields travels into the batches. ``"image"`` and
``"label"`` are required; the spatial fields named in :data:`SPATIAL_FIELDS`
(``"region"``, ``"wrong_region"``: [..., height, width] float32 in [0, 1]) are
resized and geometrically augmented together with their image; any other field
(e.g. an int ``"decoy_label"``) is passed through unchanged. ``"mask"`` is
reserved for the evaluation padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from saliency_jax.data import augment as augment_lib

__all__ = [
    "train_val_split",
    "oversample",
    "symmetric_label_noise",
    "Relabeled",
    "make_train_dataset",
    "make_eval_batches",
    "EvalBatches",
    "EVAL_READ_OPTIONS",
    "num_classes",
    "image_shape",
    "SPATIAL_FIELDS",
]

SPATIAL_FIELDS = ("region", "wrong_region")
"""Per-example fields [..., height, width] that are resized and rotated/flipped with their image."""


def train_val_split(
    num_examples: int, val_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random train/validation split of ``range(num_examples)``.

    The paper's 75/25 split of the training data (Morales et al. 2021, Sec. 4.3): a permutation drawn with
    ``np.random.default_rng(seed)``; its first ``round(val_fraction * num_examples)`` entries are the validation
    set. ``val_fraction=0`` gives an empty validation set.

    Args:
        num_examples: number of examples, >= 1.
        val_fraction: fraction held out for validation, in [0, 1).
        seed: permutation seed.

    Returns:
        (train_idx, val_idx): sorted int64 index arrays [n_train] and [n_val], disjoint, together covering
        ``range(num_examples)``; ``n_train >= 1``.

    Raises:
        ValueError: num_examples < 1, val_fraction outside [0, 1), or a split that would leave no training example.
    """
    num_examples = int(num_examples)
    if num_examples < 1:
        raise ValueError(f"train_val_split: num_examples must be >= 1, got {num_examples}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must lie in [0, 1), got {val_fraction}.")
    num_val = int(round(val_fraction * num_examples))
    if num_val >= num_examples:
        raise ValueError(
            f"train_val_split: val_fraction={val_fraction} of {num_examples} examples leaves no training example."
        )
    permutation = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])


def oversample(
    indices: np.ndarray | Sequence[int],
    labels: np.ndarray,
    factors: Mapping[int, int],
) -> np.ndarray:
    """Repeats the indices of chosen classes (class-balancing by oversampling).

    Args:
        indices: [n] int example indices into ``labels``.
        labels: [num_examples] int labels of the whole source (``source.labels``).
        factors: ``{class_id: k}`` repeats every index of class ``class_id``
            ``k`` times in total (k >= 1); other classes appear once.

    Returns:
        [n + sum((k - 1) * count[c])] int64 indices, in the input order with each
        oversampled index repeated in place (shuffling is the pipeline's job).

    Raises:
        ValueError: labels not rank 1, indices out of range, or a factor < 1 or
            not an integer.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"oversample: labels must be rank 1, got shape {labels.shape}.")
    if indices.size and (indices.min() < 0 or indices.max() >= labels.shape[0]):
        raise ValueError(
            f"oversample: indices must lie in [0, {labels.shape[0]}), got range"
            f" [{indices.min()}, {indices.max()}]."
        )
    counts = np.ones(indices.shape[0], dtype=np.int64)
    index_labels = labels[indices]
    for class_id, factor in factors.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ValueError(
                f"oversample: factor for class {class_id} must be an int >= 1, got"
                f" {factor!r}."
            )
        counts[index_labels == class_id] = int(factor)
    return np.repeat(indices, counts)


def symmetric_label_noise(
    labels: np.ndarray, rate: float, num_classes: int, seed: int = 0
) -> np.ndarray:
    """Symmetric label noise: each label is replaced, with probability ``rate``, by another class drawn uniformly.

    The usual protocol for training with noisy labels (e.g. the label-noise experiments of Sun et al., ECCV 2020):
    a fixed corruption of the training labels, drawn once (not per epoch). The new class is drawn uniformly from the
    ``num_classes - 1`` *other* classes, so the expected fraction of wrong labels is exactly ``rate``.

    Args:
        labels: [n] int class ids in [0, num_classes).
        rate: fraction of labels to corrupt, in [0, 1].
        num_classes: number of classes, >= 2.
        seed: seed of ``np.random.default_rng`` (which labels, and their new classes).

    Returns:
        [n] int32 labels; ``labels`` unchanged where not corrupted.

    Raises:
        ValueError: ``rate`` outside [0, 1], fewer than 2 classes, or labels out of range.
    """
    labels = np.asarray(labels)
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"label noise rate must lie in [0, 1]; got {rate}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes; got {num_classes}")
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must be [n] ints in [0, {num_classes}); got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    flip = rng.uniform(size=labels.shape) < rate
    offset = rng.integers(1, num_classes, size=labels.shape)  # 1..num_classes-1: never the same class
    return np.where(flip, (labels + offset) % num_classes, labels).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Relabeled:
    """A source with its labels replaced (grain random-access source), e.g. by :func:`symmetric_label_noise`.

    Attributes:
        source: the wrapped source (items ``{"image", "label", ...}``; ``num_classes`` and ``class_names`` are
            passed through).
        labels: [len(source)] int32, the new labels.
    """

    source: Any
    labels: np.ndarray

    def __post_init__(self):
        if np.shape(self.labels) != (len(self.source),):
            raise ValueError(f"Relabeled: {len(self.source)} examples but labels of shape {np.shape(self.labels)}")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {**self.source[index], "label": np.int32(self.labels[int(index)])}

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def class_names(self):
        return getattr(self.source, "class_names", None)


@dataclasses.dataclass(frozen=True)
class _Subset:
    """Random-access view ``source[indices[i]]`` (grain data source)."""

    source: Any
    indices: np.ndarray

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.source[int(self.indices[index])]


def _check_indices(source: Any, indices: Any, fn: str, allow_empty: bool = False) -> np.ndarray:
    """Validates [n] int indices into ``source`` (None = all) and returns them as int64."""
    if indices is None:
        indices = np.arange(len(source), dtype=np.int64)
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"{fn}: indices must be rank 1, got shape {indices.shape}.")
    if indices.size == 0:
        if allow_empty:
            return indices.astype(np.int64)
        raise ValueError(f"{fn}: no examples (indices or source is empty).")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{fn}: indices must be integers, got {indices.dtype}.")
    if indices.min() < 0 or indices.max() >= len(source):
        raise ValueError(
            f"{fn}: indices must lie in [0, {len(source)}), got range"
            f" [{indices.min()}, {indices.max()}]."
        )
    return indices.astype(np.int64)


def _prepare(example: Mapping[str, Any], image_size: int | None) -> dict[str, np.ndarray]:
    """Checks an item, resizes its image to [image_size, image_size, c] and its spatial fields alike (images; clips
    [time, h, w, c] pass unchanged)."""
    image = np.asarray(example["image"], dtype=np.float32)
    if image.ndim not in (3, 4):
        raise ValueError(
            f"Source items must have image [height, width, channels] (or a clip"
            f" [time, height, width, channels]), got shape {image.shape}."
        )
    if "mask" in example:
        raise ValueError(
            "Source items must not have a 'mask' field (reserved for the padding"
            " mask of evaluation batches)."
        )
    if image.ndim == 4:  # a clip: no resize, no spatial fields
        if image_size is not None:
            raise ValueError(
                f"Clips [time, height, width, channels] are not resized; set"
                f" image_size None (got {image_size})."
            )
        spatial = [k for k in SPATIAL_FIELDS if k in example]
        if spatial:
            raise ValueError(f"Clip items cannot have the spatial fields {spatial}.")
        out = {"image": image, "label": np.asarray(example["label"], dtype=np.int32)}
        out.update({k: np.asarray(v) for k, v in example.items() if k not in out})
        return out
    spatial = augment_lib.check_spatial_fields(
        {k: example[k] for k in SPATIAL_FIELDS if k in example}, image.shape,
        "Source item"
    )
    if image_size is not None:
        image = augment_lib.resize(image, image_size)
        spatial = {k: augment_lib.resize_spatial(v, image_size) for k, v in spatial.items()}
    out = {"image": image, "label": np.asarray(example["label"], dtype=np.int32)}
    for key, value in example.items():
        if key not in out:
            out[key] = spatial[key] if key in spatial else np.asarray(value)
    return out


def _augment_example(
    example: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    augment_kwargs: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """random_map transform: augments the image of one example and moves its spatial fields with it."""
    spatial = {k: example[k] for k in SPATIAL_FIELDS if k in example}
    image, spatial = augment_lib.augment_example(
        example["image"], rng, spatial, **augment_kwargs
    )
    return {**example, "image": image, **spatial}


def make_train_dataset(
    source: Any,
    indices: np.ndarray | Sequence[int] | None,
    *,
    batch_size: int,
    seed: int,
    image_size: int | None = None,
    augment_kwargs: Mapping[str, Any] | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Shuffled, augmented, sharded training batches (grain).

    ``grain.MapDataset.source`` over ``source[indices]``, shuffled with
    ``seed`` and reshuffled differently (but deterministically) every epoch
    (``shuffle`` then ``repeat``), resized, augmented with
    :func:`saliency_jax.data.augment.augment` in ``random_map`` (a function of
    ``seed`` and the global stream position), then this process keeps its
    rows ``[shard_index * b, (shard_index + 1) * b)`` of every global batch of
    the stream (``b = batch_size // shard_count``) and batches them with
    ``drop_remainder``.
    Batches may span an epoch boundary. With ``num_epochs`` set, the stream is
    cut to a whole number of global batches so that every process yields the
    same number of batches.

    Args:
        source: random-access source (``__len__``, ``__getitem__`` -> dict with
            "image" [h, w, c] float32 in [0, 1] (or a clip [time, h, w, c]),
            "label" int (or multi-hot [num_attributes]) and optional further
            fields, see the module docstring).
        indices: [n] int indices of ``source`` to train on (e.g. from
            :func:`train_val_split` / :func:`oversample`); None = all.
        batch_size: GLOBAL batch size over all processes; must be divisible by
            ``shard_count``.
        seed: seed of the shuffle and the augmentation.
        image_size: optional square resize (bilinear) of every image.
        augment_kwargs: keyword arguments of ``augment`` (e.g.
            ``augment.PAPER_AUGMENTATION``); None or {} = no augmentation.
        shard_index: this process, usually ``jax.process_index()``.
        shard_count: number of processes, usually ``jax.process_count()``.
        num_epochs: number of passes; None = infinite.
        read_options: grain threading/prefetch options (grain's default if None); the prefetch buffer counts
            batches (the threads read whole batches).

    Returns:
        ``grain.IterDataset``; ``iter()`` gives a ``grain.DatasetIterator`` (with
        ``get_state`` / ``set_state``; the position is ``{"next_batch": k}``, and an older checkpoint's
        ``{"next_index": n}`` in examples is read as batch ``n / b``) of dicts ``{"image": [b, h, w, c] float32
        in [0, 1] (clips: [b, time, h, w, c]), "label": [b] int32 (or [b, num_attributes] for multi-hot
        labels)}`` with ``b = batch_size // shard_count``, plus the source's
        other fields stacked over the batch (spatial fields resized and
        augmented with the image).

    Raises:
        ValueError: bad indices, batch_size not a positive multiple of
            shard_count, shard_index outside [0, shard_count), num_epochs < 1,
            unknown augment keyword or bad augmentation range, augmentation of
            clips, or fewer examples than one global batch in ``num_epochs``
            epochs.
    """
    fn = "make_train_dataset"
    indices = _check_indices(source, indices, fn)
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"{fn}: need 0 <= shard_index < shard_count, got shard_index="
            f"{shard_index}, shard_count={shard_count}."
        )
    if batch_size < 1 or batch_size % shard_count:
        raise ValueError(
            f"{fn}: global batch_size={batch_size} must be a positive multiple of"
            f" shard_count={shard_count}."
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"{fn}: num_epochs must be >= 1 or None, got {num_epochs}.")
    augment_kwargs = dict(augment_kwargs or {})
    allowed = {"hflip", "rotation", "channel_shift", "brightness"}
    unknown = set(augment_kwargs) - allowed
    if unknown:
        raise ValueError(
            f"{fn}: unknown augment_kwargs {sorted(unknown)}; allowed"
            f" {sorted(allowed)}."
        )
    if augment_kwargs:  # Fail here on bad ranges, not later inside a grain worker thread.
        augment_lib.augment(np.zeros((1, 1, 1), np.float32), np.random.default_rng(0), **augment_kwargs)
        if np.ndim(source[int(indices[0])]["image"]) == 4:
            raise ValueError(
                f"{fn}: clips are not augmented; set augment_kwargs to None or {{}}"
                f" (config.dataset.augment = {{}})."
            )
    local_batch_size = batch_size // shard_count

    ds = grain.MapDataset.source(_Subset(source, indices)).seed(seed)
    ds = ds.shuffle().repeat(num_epochs)
    if num_epochs is not None:
        num_batches = len(ds) // batch_size
        if num_batches == 0:
            raise ValueError(
                f"{fn}: {len(indices)} examples x {num_epochs} epochs is less than"
                f" one global batch of {batch_size}."
            )
        ds = ds[: num_batches * batch_size]
    ds = ds.map(functools.partial(_prepare, image_size=image_size))
    if augment_kwargs:
        ds = ds.random_map(
            functools.partial(_augment_example, augment_kwargs=augment_kwargs)
        )
    if shard_count > 1:
        ds = _ProcessRows(ds, local_batch_size, shard_index, shard_count)
    # Batched before the reading threads: grain prefetches whole batches. (Its per-example prefetch rescans a buffer
    # of hundreds of futures on every example: 5x slower for MNIST-sized images.) The batches are the same.
    ds = ds.batch(local_batch_size, drop_remainder=True)
    return _BatchPosition(ds.to_iter_dataset(read_options), local_batch_size)


class _BatchPosition(grain.IterDataset):
    """The training stream with its iterator position counted in batches: state ``{"next_batch": k}``.

    ``set_state`` also reads the per-example position ``{"next_index": n}`` of checkpoints written when the stream
    was batched after the prefetch (before 2026-12-07): batch ``n / b``; it raises ``ValueError`` if ``n`` is not a
    whole number of batches ``b``.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> grain.DatasetIterator:
        return _BatchPositionIterator(self._parent.__iter__(), self._batch_size)


class _BatchPositionIterator(grain.DatasetIterator):
    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": int(self._parent.get_state()["next_index"])}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if set(state) == {"next_batch"}:
            position = int(state["next_batch"])
        elif set(state) == {"next_index"}:  # a checkpoint from before the batches were made before the prefetch
            examples = int(state["next_index"])
            if examples % self._batch_size:
                raise ValueError(
                    f"data-iterator state {dict(state)} (an older checkpoint's position in examples) is not a whole "
                    f"number of batches of {self._batch_size}: was it written with another batch size?"
                )
            position = examples // self._batch_size
        else:
            raise ValueError(
                f"unknown training data-iterator state {dict(state)}: expected {{'next_batch': k}} (or an older "
                "checkpoint's {'next_index': n})"
            )
        self._parent.set_state({"next_index": position})


class _ProcessRows(grain.MapDataset):
    """Process ``shard_index``'s contiguous rows of every global batch of a stream.

    Element ``i`` is stream element ``k * B + shard_index * b + j`` with ``k, j = divmod(i, b)``, ``b`` the local and
    ``B = b * shard_count`` the global batch size. ``jax.make_array_from_process_local_data`` stacks the processes'
    batches in process order, so the global batch is row for row the single-process batch (per-example randomness
    keyed by row - e.g. a scheme's per-example coin flips - then also agrees across process counts).
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, local_batch_size: int, shard_index: int, shard_count: int):
        super().__init__(parent)
        self._rows, self._index, self._count = local_batch_size, shard_index, shard_count
        self._length = len(parent) // (local_batch_size * shard_count) * local_batch_size

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        batch, row = divmod(index, self._rows)
        return (batch * self._count + self._index) * self._rows + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            parent_index = self._parent_index(index)
        return self._parent[parent_index]

    def __str__(self) -> str:
        return f"ProcessRows(shard {self._index} of {self._count}, {self._rows} rows per batch)"


def _pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads every [n, ...] field of a batch with zero rows to [batch_size, ...] and adds a mask."""
    n = batch["label"].shape[0]
    pad = batch_size - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    out = {}
    for key, value in batch.items():
        if pad:
            value = np.concatenate([value, np.zeros((pad,) + value.shape[1:], value.dtype)])
        out[key] = value
    out["mask"] = mask
    return out


#: Threads and prefetched batches of :func:`make_eval_batches` (each thread reads whole batches): up to 8 threads
#: (the CPU count), twice as many batches ahead.
EVAL_READ_OPTIONS = grain.ReadOptions(num_threads=min(8, os.cpu_count() or 1),
                                      prefetch_buffer_size=2 * min(8, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class EvalBatches:
    """Re-iterable, sized sequence of padded evaluation batches.

    ``len()`` is the number of batches; each ``iter()`` reads the examples
    again in order. Built by :func:`make_eval_batches`.

    Attributes:
        dataset: the grain pipeline yielding the padded batches.
        num_examples: number of real (unpadded) examples.
        batch_size: rows per batch.
    """

    dataset: grain.IterDataset
    num_examples: int
    batch_size: int

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset)


def make_eval_batches(
    source: Any,
    indices: np.ndarray | Sequence[int] | None = None,
    *,
    batch_size: int,
    image_size: int | None = None,
    pad_to_multiple_of: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> EvalBatches:
    """Deterministic, padded evaluation batches.

    Examples ``source[indices[0]], source[indices[1]], ...`` in order, in
    batches of exactly ``batch_size`` rows; the last partial batch is padded
    with zero images and label 0 and ``mask`` 0.

    Args:
        source: random-access source (see :func:`make_train_dataset`).
        indices: [n] int indices to evaluate; None = all of ``source``.
        batch_size: rows per batch (global), a multiple of ``pad_to_multiple_of``.
        image_size: optional square resize (bilinear) of every image.
        pad_to_multiple_of: usually the device count, so that batches shard
            evenly over devices.
        read_options: grain threading/prefetch options for whole batches
            (:data:`EVAL_READ_OPTIONS` if None).

    Returns:
        :class:`EvalBatches` of ``ceil(n / batch_size)`` dicts ``{"image":
        [batch_size, h, w, c] float32 in [0, 1], "label": [batch_size] int32
        (or [batch_size, num_attributes]), "mask": [batch_size] float32 (1 real,
        0 padding)}`` plus the source's other fields (zero rows as padding); no
        batches when ``indices`` is empty.

    Raises:
        ValueError: bad indices, batch_size < 1, or batch_size not a multiple of
            pad_to_multiple_of.
    """
    fn = "make_eval_batches"
    indices = _check_indices(source, indices, fn, allow_empty=True)
    if pad_to_multiple_of < 1:
        raise ValueError(f"{fn}: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}.")
    if batch_size < 1 or batch_size % pad_to_multiple_of:
        raise ValueError(
            f"{fn}: batch_size={batch_size} must be a positive multiple of"
            f" pad_to_multiple_of={pad_to_multiple_of}."
        )
    # Batched before the threads: grain prefetches whole batches (a few futures) instead of single examples (its
    # per-example prefetch rescans a buffer of hundreds of futures on every example: most of an evaluation's time
    # for small images).
    ds = (
        grain.MapDataset.source(_Subset(source, indices))
        .map(functools.partial(_prepare, image_size=image_size))
        .batch(batch_size, drop_remainder=False)
        .map(functools.partial(_pad_batch, batch_size=batch_size))
        .to_iter_dataset(read_options or EVAL_READ_OPTIONS)
    )
    return EvalBatches(dataset=ds, num_examples=len(indices), batch_size=batch_size)


def num_classes(source: Any) -> int:
    """Number of classes of a source (its ``num_classes`` attribute).

    Raises:
        TypeError: the source has no ``num_classes``.
    """
    if not hasattr(source, "num_classes"):
        raise TypeError(f"{type(source).__name__} has no num_classes attribute.")
    return int(source.num_classes)


def image_shape(source: Any, image_size: int | None = None) -> tuple[int, ...]:
    """Shape [height, width, channels] of the images a pipeline will yield ([time, height, width, channels] for
    clips).

    Args:
        source: random-access source; its first item is read.
        image_size: the pipeline's resize, if any.

    Returns:
        (height, width, channels), or (time, height, width, channels) for clips.

    Raises:
        ValueError: empty source or items without a rank-3 image or rank-4 clip.
    """
    if len(source) == 0:
        raise ValueError(f"image_shape: source {source!r} is empty.")
    image = _prepare(source[0], image_size)["image"]
    return tuple(int(d) for d in image.shape)
