"""Image-folder datasets ``root/<split>/<class_name>/*.{jpg,jpeg,png}``, decoded lazily with Pillow.

Registers the spec ``"folder"`` (:func:`load_image_folder`; ``data_dir`` is the root, ``image_size`` is required) of
:func:`saliency_jax.data.get_source`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
from PIL import Image

from saliency_jax.data.core import SOURCES, check_image_size, check_split, require_data_dir

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "load_image_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File extensions (case-insensitive) read by :func:`load_image_folder`."""


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
        check_image_size(self.image_size, f"Source {self.name!r}")
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
    check_split(split, "load_image_folder")
    check_image_size(image_size, "load_image_folder")
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


@SOURCES.register("folder")
def _folder(spec, split, data_dir, image_size):
    if image_size is None:
        raise ValueError("get_source('folder') needs image_size.")
    return load_image_folder(
        require_data_dir(spec, data_dir), split, image_size=image_size
    )
