"""Images from NumPy archives (``x_train, y_train, x_test, y_test``), e.g. CIFAR-10.

Registers the specs ``"npz"`` (:func:`load_npz`; ``data_dir`` is the ``.npz`` file) and ``"cifar10"``
(:func:`load_npz` with :data:`CIFAR10_CLASSES`; ``data_dir`` is the file or a directory holding ``cifar10.npz``) of
:func:`saliency_jax.data.get_source`.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np

from saliency_jax.data.core import SOURCES, ImageSource, check_split, default_class_names, require_data_dir

__all__ = [
    "CIFAR10_CLASSES",
    "load_npz",
]

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
    float32 in [0, 1]; ``y_*`` is [n] (or [n, 1]) integer labels. Any other
    array ``<field>_<split>`` whose first dimension is the split's ``n`` is a
    per-example field of the items (:class:`~saliency_jax.data.ImageSource`
    ``fields``): e.g. ``region_train`` [n, h, w] in {0, 1}, the region that
    attention guidance / RRR read as ``"region"`` (``wrong_region`` likewise),
    resized with the image.
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
    check_split(split, "load_npz")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NumPy archive not found: {path}")
    required = ("x_train", "y_train", "x_test", "y_test")
    wanted = (f"x_{split}", f"y_{split}", "y_train", "y_test", "class_names")
    suffix = f"_{split}"
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(
                f"expected a .npz archive, got a single {type(archive).__name__}"
            )
        with archive:
            found = tuple(archive.files)
            arrays = {k: np.asarray(archive[k]) for k in wanted if k in found}
            extra = {k[:-len(suffix)]: np.asarray(archive[k]) for k in found
                     if k.endswith(suffix) and k not in wanted and len(k) > len(suffix)}
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
        class_names = default_class_names(num_classes)
    fields = {k: v for k, v in extra.items() if v.ndim >= 1 and v.shape[0] == labels.shape[0]}
    return ImageSource(
        images=images,
        labels=labels,
        num_classes=num_classes,
        class_names=class_names,
        name=name or f"{path.stem}/{split}",
        image_size=image_size,
        fields=fields,
    )


@SOURCES.register("npz")
def _npz(spec, split, data_dir, image_size):
    return load_npz(
        require_data_dir(spec, data_dir), split, image_size=image_size
    )


@SOURCES.register("cifar10")
def _cifar10(spec, split, data_dir, image_size):
    path = pathlib.Path(require_data_dir(spec, data_dir))
    if path.is_dir():
        path = path / "cifar10.npz"
    return load_npz(
        path,
        split,
        class_names=CIFAR10_CLASSES,
        name=f"cifar10/{split}",
        image_size=image_size,
    )
