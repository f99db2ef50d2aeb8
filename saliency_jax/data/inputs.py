"""A run config's input: its splits (read once per process), the train/validation indices, the training batches, and
the checks that the train and test splits fit together and that every batch is well formed.

The train loop, the plan builders, the experiment's validation and the evaluators all take a run's data from here, so
what validation established is what training uses, and a split is read from disk once per process however many arms
and evaluators use it (:func:`read_split`).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import numpy as np

from saliency_jax.config import ConfigError
from saliency_jax.data import pipeline
from saliency_jax.data import sources as sources_lib

__all__ = ["RunData", "read_split", "load_sources", "load_run_data", "make_train_input", "check_batch",
           "check_sources"]

_SPLITS: dict[Any, Any] = {}


def _options(options) -> dict[str, Any]:
    return options.to_dict() if hasattr(options, "to_dict") else dict(options or {})


def read_split(dataset: ml_collections.ConfigDict, split: str):
    """The ``split`` ("train" or "test") source of a config's ``dataset`` section, read once per process for each
    distinct (name, data_dir, image_size, options): later calls return the same object.

    Raises:
      FileNotFoundError / ValueError: as :func:`saliency_jax.data.get_source` (missing files, unknown dataset).
    """
    options = _options(dataset.get("options"))
    key = (dataset.name, split, dataset.get("data_dir"), dataset.get("image_size"),
           json.dumps(options, sort_keys=True, default=str))
    if key not in _SPLITS:
        _SPLITS[key] = sources_lib.get_source(dataset.name, split, data_dir=dataset.get("data_dir"),
                                              image_size=dataset.get("image_size"), options=options)
    return _SPLITS[key]


def load_sources(config: ml_collections.ConfigDict):
    """The train, validation and test sources of a config.

    Args:
      config: a config with a ``dataset`` section (``name``, ``data_dir``, ``image_size``, ``val_fraction``,
        ``oversample``; ``clips``: the clip specs' options, :class:`saliency_jax.data.clips.ClipSettings`).

    Returns:
      ``(train_source, train_indices, val_indices, test_source)``: the 75/25 train/validation split of the train
      split (Morales et al. 2021, Sec. 4.3) with ``config.seed``, optional oversampling applied to the train indices;
      with ``dataset.label_noise = r`` the train split's labels carry symmetric noise of rate ``r``
      (:func:`saliency_jax.data.symmetric_label_noise`, seed ``config.seed``; the test split stays clean). Each
      split is read once per process (:func:`read_split`).
    """
    ds = config.dataset
    train_source, test_source = read_split(ds, "train"), read_split(ds, "test")
    train_idx, val_idx = pipeline.train_val_split(len(train_source), ds.get("val_fraction", 0.25), seed=config.seed)
    limit = ds.get("train_limit")
    if limit:  # a seeded random subset (sources may be sorted by class)
        train_idx = np.sort(np.random.default_rng(config.seed).choice(train_idx, min(limit, len(train_idx)),
                                                                        replace=False))
    noise = ds.get("label_noise", 0.0)
    if noise:  # fixed symmetric noise on the training split (train and validation indices), clean test split
        train_source = pipeline.Relabeled(train_source, pipeline.symmetric_label_noise(
            train_source.labels, noise, train_source.num_classes, seed=config.seed))
    oversample = dict(ds.get("oversample") or {})
    if oversample:
        train_idx = pipeline.oversample(train_idx, train_source.labels, {int(k): int(v) for k, v in oversample.items()})
    return train_source, train_idx, val_idx, test_source


class RunData(NamedTuple):
    """A run's data, as validation established it and training uses it.

    Attributes:
      train_source: the train split (random-access source with ``labels`` and ``num_classes``).
      train_indices: int [n_train], the examples trained on (after the validation split, ``train_limit`` and
        oversampling).
      val_indices: int [n_val], the held-out validation examples of the train split.
      test_source: the test split.
      image_shape: (height, width, channels) of the model's input after the pipeline's resize (clips: (time, height,
        width, channels)).
      num_classes: the classifier's outputs.
    """

    train_source: Any
    train_indices: np.ndarray
    val_indices: np.ndarray
    test_source: Any
    image_shape: tuple[int, ...]
    num_classes: int


def load_run_data(config: ml_collections.ConfigDict) -> RunData:
    """:func:`load_sources` and :func:`check_sources` of a run config (multi-label when ``config.loss`` is
    ``"sigmoid_binary_cross_entropy"``).

    Raises:
      ConfigError: as :func:`check_sources`; FileNotFoundError / ValueError: as the dataset's source.
    """
    multi_label = config.get("loss", "softmax_cross_entropy") == "sigmoid_binary_cross_entropy"
    train_source, train_idx, val_idx, test_source = load_sources(config)
    image_shape, num_classes = check_sources(config, train_source, test_source, multi_label=multi_label)
    return RunData(train_source, train_idx, val_idx, test_source, tuple(image_shape), int(num_classes))


def make_train_input(config: ml_collections.ConfigDict, train_source, train_indices) -> grain.IterDataset:
    """The training batches of a config: :func:`saliency_jax.data.make_train_dataset` over ``train_source[
    train_indices]`` with ``config.batch_size`` (global), ``config.seed``, ``config.dataset``'s ``image_size``,
    ``augment``, ``read_threads`` and ``prefetch`` (batches read ahead), this process's shard. ``iter()`` of it is the loop's checkpointable
    data iterator."""
    return pipeline.make_train_dataset(
        train_source, train_indices, batch_size=config.batch_size, seed=config.seed,
        image_size=config.dataset.get("image_size"), augment_kwargs=dict(config.dataset.get("augment") or {}),
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        read_options=grain.ReadOptions(num_threads=config.dataset.get("read_threads", 2),
                                       prefetch_buffer_size=config.dataset.get("prefetch", 4)))


def check_batch(batch: dict[str, np.ndarray], num_classes: int, where: str = "batch", *,
                multi_label: bool = False) -> None:
    """Host-side validation of an input batch before it reaches the device.

    Args:
      batch: ``{"image": [batch, height, width, channels] float, "label": [batch] int}`` (multi-label:
        ``"label": [batch, num_classes]`` in {0, 1}; clips: ``"image": [batch, time, height, width, channels]``
        with per-clip labels); other fields pass unchecked.
      num_classes: labels must lie in ``[0, num_classes)``.
      where: context for the error message (e.g. ``"train step 12"``).
      multi_label: labels are multi-hot attribute vectors.

    Raises:
      ValueError: wrong rank, non-finite pixels (NaN/inf), labels out of range or of the wrong shape.
      TypeError: non-float images or non-integer labels.
    """
    images, labels = batch["image"], batch["label"]
    if images.ndim not in (4, 5):
        raise ValueError(f"{where}: images must be [batch, height, width, channels] (clips: [batch, time, height, "
                         f"width, channels]); got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{where}: images must be float32 in [0, 1]; got dtype {images.dtype}")
    if not np.all(np.isfinite(images)):
        bad = np.unique(np.nonzero(~np.isfinite(images))[0])
        raise ValueError(f"{where}: images contain NaN or inf (batch rows {bad.tolist()[:10]})")
    if multi_label:
        if labels.shape != (images.shape[0], num_classes):
            raise ValueError(f"{where}: multi-hot labels must be [{images.shape[0]}, {num_classes}]; got shape "
                             f"{labels.shape}")
        if labels.size and not np.all((labels == 0) | (labels == 1)):
            raise ValueError(f"{where}: multi-hot labels must be 0 or 1")
        return
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{where}: labels must be [{images.shape[0]}]; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{where}: labels must be integers; got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]")



def check_sources(config: ml_collections.ConfigDict, train_source, test_source, *,
                  multi_label: bool = False) -> tuple[tuple[int, int, int], int]:
    """Validates the train and test sources of a run against each other before the first step.

    Args:
      config: the run config (``dataset.image_size``, ``evaluators``).
      train_source: the train split (random-access source with ``num_classes``).
      test_source: the test split.
      multi_label: labels are multi-hot attribute vectors (no class-range check).

    Returns:
      ``(image_shape, num_classes)`` of the model: ``(height, width, channels)`` after the pipeline's resize
      (clips: ``(time, height, width, channels)``).

    Raises:
      ConfigError: images with no pixels (0 x 0) or no channel, a test split with another image shape (size or
        channels) than the train split, an empty test split when evaluators are configured, test labels outside
        the training labels' range.
    """
    name = config.dataset.name
    size = config.dataset.get("image_size")
    shapes = {}
    for split, source in (("train", train_source), ("test", test_source)):
        if len(source) == 0:
            if split == "train" or tuple(config.get("evaluators") or ()):
                raise ConfigError(f"dataset {name!r}: the {split} split is empty"
                                  + (f" (config.evaluators={tuple(config.evaluators)} read it)" if split == "test"
                                     else ""))
            continue
        raw = tuple(int(d) for d in np.shape(source[0]["image"]))
        if len(raw) not in (3, 4) or min(raw) < 1:
            raise ConfigError(f"dataset {name!r}: {split} images have shape {raw}; they need height, width and "
                              "channels (clips: time, height, width, channels) of at least 1")
        shapes[split] = tuple(pipeline.image_shape(source, size))
    if "test" in shapes and shapes["test"][-1] != shapes["train"][-1]:
        raise ConfigError(f"dataset {name!r}: test images have {shapes['test'][-1]} channel(s), train images "
                          f"{shapes['train'][-1]}: the two splits must have the same channels")
    if "test" in shapes and shapes["test"] != shapes["train"]:
        how = f"after the resize to config.dataset.image_size={size}" if size else "config.dataset.image_size=None"
        raise ConfigError(f"dataset {name!r}: test images are {shapes['test']} but train images are "
                          f"{shapes['train']} ({how}); the model is built for the train shape: set "
                          "--config.dataset.image_size to resize both")
    num_classes = int(pipeline.num_classes(train_source))
    train_labels, test_labels = getattr(train_source, "labels", None), getattr(test_source, "labels", None)
    if not multi_label and train_labels is not None and test_labels is not None and len(test_labels):
        train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
        if train_labels.ndim == 1 and test_labels.ndim == 1 and len(train_labels):
            top = int(train_labels.max())
            unseen = np.unique(test_labels[(test_labels > top) | (test_labels < 0)])
            if unseen.size:
                raise ConfigError(
                    f"dataset {name!r}: the test split has labels {unseen[:10].tolist()} outside the training "
                    f"split's range [0, {top}] (num_classes grew to {num_classes}): those classes are never "
                    "trained; check the data, or give class names so that num_classes is fixed")
    return shapes["train"], num_classes
