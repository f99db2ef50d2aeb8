"""Data: random-access image sources, host-side augmentation, grain pipelines.

Images are [height, width, channels] float32 in [0, 1] everywhere (channels=1
for grayscale); labels are int32.

``saliency_jax.data.augment`` is the augmentation module (its function is
``augment.augment``); sources and pipeline functions are re-exported here.

Sources are built by name with :func:`get_source` from the registry
:data:`SOURCES` (:mod:`saliency_jax.data.core`); each dataset module
registers its own specs, and this package imports every one of them once.
"""

from typing import Any

# The helpers, then the core, then every dataset module once, in the order their specs are listed
# (source_specs()): each registers its specs in core.SOURCES when imported here. The core imports none of them.
from saliency_jax.data import augment
from saliency_jax.data import regions
from saliency_jax.data import core
from saliency_jax.data import mnist
from saliency_jax.data import npz
from saliency_jax.data import folder
from saliency_jax.data import decoy_mnist
from saliency_jax.data import celeba
from saliency_jax.data import tfds_source
from saliency_jax.data import clips
from saliency_jax.data import voc
from saliency_jax.data import coco
from saliency_jax.data import pipeline
from saliency_jax.data import sources
from saliency_jax.data.augment import PAPER_AUGMENTATION
from saliency_jax.data.celeba import CelebASource
from saliency_jax.data.celeba import cooccurrence_subset
from saliency_jax.data.celeba import load_celeba
from saliency_jax.data.clips import ClipSettings
from saliency_jax.data.clips import MovingDigitClips
from saliency_jax.data.coco import load_coco
from saliency_jax.data.core import SOURCES
from saliency_jax.data.core import ImageSource
from saliency_jax.data.core import get_source
from saliency_jax.data.core import source_specs
from saliency_jax.data.decoy_mnist import DecoyMNISTSource
from saliency_jax.data.decoy_mnist import load_decoy_mnist
from saliency_jax.data.folder import ImageFolderSource
from saliency_jax.data.folder import load_image_folder
from saliency_jax.data.mnist import DIGITS_SPLIT_SEED
from saliency_jax.data.mnist import DIGITS_TEST_FRACTION
from saliency_jax.data.mnist import load_digits
from saliency_jax.data.mnist import load_mnist
from saliency_jax.data.npz import CIFAR10_CLASSES
from saliency_jax.data.npz import load_npz
from saliency_jax.data.pipeline import SPATIAL_FIELDS
from saliency_jax.data.pipeline import EvalBatches
from saliency_jax.data.pipeline import image_shape
from saliency_jax.data.pipeline import make_eval_batches
from saliency_jax.data.pipeline import make_train_dataset
from saliency_jax.data.pipeline import num_classes
from saliency_jax.data.pipeline import oversample
from saliency_jax.data.pipeline import Relabeled
from saliency_jax.data.pipeline import symmetric_label_noise
from saliency_jax.data.pipeline import train_val_split
from saliency_jax.data.regions import TemplateRegionSource
from saliency_jax.data.regions import rasterize_polygons
from saliency_jax.data.regions import rasterize_templates
from saliency_jax.data.tfds_source import TfdsSource
from saliency_jax.data.tfds_source import load_tfds
from saliency_jax.data.voc import VOC_CLASSES
from saliency_jax.data.voc import load_voc

__all__ = [
    "core",
    "mnist",
    "npz",
    "folder",
    "tfds_source",
    "SOURCES",
    "source_specs",
    "celeba",
    "decoy_mnist",
    "regions",
    "CelebASource",
    "DecoyMNISTSource",
    "SPATIAL_FIELDS",
    "TemplateRegionSource",
    "cooccurrence_subset",
    "load_celeba",
    "load_decoy_mnist",
    "rasterize_polygons",
    "rasterize_templates",
    "ClipSettings",
    "MovingDigitClips",
    "clips",
    "VOC_CLASSES",
    "coco",
    "voc",
    "load_coco",
    "load_voc",
    "PAPER_AUGMENTATION",
    "CIFAR10_CLASSES",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "SOURCE_SPECS",
    "EvalBatches",
    "ImageFolderSource",
    "ImageSource",
    "TfdsSource",
    "augment",
    "pipeline",
    "sources",
    "get_source",
    "image_shape",
    "load_digits",
    "load_image_folder",
    "load_mnist",
    "load_npz",
    "load_tfds",
    "make_eval_batches",
    "make_train_dataset",
    "num_classes",
    "oversample",
    "Relabeled",
    "symmetric_label_noise",
    "train_val_split",
]


def __getattr__(name: str) -> Any:
    """``SOURCE_SPECS``: the spec strings of :func:`get_source` (:func:`source_specs`), read from the registry."""
    if name == "SOURCE_SPECS":
        return core.source_specs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
