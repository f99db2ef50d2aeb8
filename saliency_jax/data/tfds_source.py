"""Prepared TensorFlow Datasets read through ``tfds.data_source`` (array_record files; no TensorFlow needed).

Registers the spec ``"tfds:<name>"`` (:func:`load_tfds`; ``data_dir`` is the TFDS data directory, None for TFDS's
default) of :func:`saliency_jax.data.get_source`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

from saliency_jax.data.core import SOURCES, check_image_size, to_float_image

__all__ = [
    "TfdsSource",
    "load_tfds",
]


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
            "image": to_float_image(image, self.image_size),
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

    check_image_size(image_size, "load_tfds")
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


@SOURCES.register("tfds", argument="<name>")
def _tfds(spec, split, data_dir, image_size):
    return load_tfds(spec.partition(":")[2], split, data_dir, image_size=image_size)
