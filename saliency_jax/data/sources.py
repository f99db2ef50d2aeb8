"""The image classification sources under their historical module name (re-exports).

The sources now live in :mod:`saliency_jax.data.core` (the protocol, :class:`ImageSource`, the shared checks,
:data:`~saliency_jax.data.core.SOURCES` and :func:`get_source`) and one module per dataset family
(:mod:`~saliency_jax.data.mnist`, :mod:`~saliency_jax.data.npz`, :mod:`~saliency_jax.data.folder`,
:mod:`~saliency_jax.data.tfds_source`, ...), each registering its own specs. This module re-exports their public
names so that ``saliency_jax.data.sources.<name>`` keeps working; new code should import from
:mod:`saliency_jax.data` or the modules above.
"""

from __future__ import annotations

from typing import Any

from saliency_jax.data import core
from saliency_jax.data.core import SOURCE_OPTIONS, SOURCES, SPLITS, ImageSource, get_source, source_specs
from saliency_jax.data.folder import IMAGE_EXTENSIONS, ImageFolderSource, load_image_folder
from saliency_jax.data.mnist import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, load_digits, load_mnist
from saliency_jax.data.npz import CIFAR10_CLASSES, load_npz
from saliency_jax.data.tfds_source import TfdsSource, load_tfds

__all__ = [
    "CIFAR10_CLASSES",
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "SOURCES",
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
    "source_specs",
]


def __getattr__(name: str) -> Any:
    """``SOURCE_SPECS``: the spec strings of :func:`get_source` (:func:`saliency_jax.data.core.source_specs`), read
    from the registry when asked for."""
    if name == "SOURCE_SPECS":
        return core.source_specs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
