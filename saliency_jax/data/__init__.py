"""Data: random-access image sources, host-side augmentation, grain pipelines.

Images are [height, width, channels] float32 in [0, 1] everywhere (channels=1
for grayscale); labels are int32.

``saliency_jax.data.augment`` is the augmentation module (its function is
``augment.augment``); sources and pipeline functions are re-exported here.
"""

from saliency_jax.data import augment
from saliency_jax.data import celeba
from saliency_jax.data import clips
from saliency_jax.data import coco
from saliency_jax.data import decoy_mnist
from saliency_jax.data import regions
from saliency_jax.data import voc
from saliency_jax.data import pipeline
from saliency_jax.data import sources
from saliency_jax.data.augment import PAPER_AUGMENTATION
from saliency_jax.data.celeba import CelebASource
from saliency_jax.data.celeba import cooccurrence_subset
from saliency_jax.data.celeba import load_celeba
from saliency_jax.data.decoy_mnist import DecoyMNISTSource
from saliency_jax.data.decoy_mnist import load_decoy_mnist
from saliency_jax.data.pipeline import SPATIAL_FIELDS
from saliency_jax.data.clips import ClipSettings
from saliency_jax.data.clips import MovingDigitClips
from saliency_jax.data.pipeline import EvalBatches
from saliency_jax.data.pipeline import image_shape
from saliency_jax.data.pipeline import make_eval_batches
from saliency_jax.data.pipeline import make_train_dataset
from saliency_jax.data.pipeline import num_classes
from saliency_jax.data.pipeline import oversample
from saliency_jax.data.pipeline import Relabeled
from saliency_jax.data.pipeline import symmetric_label_noise
from saliency_jax.data.pipeline import train_val_split
from saliency_jax.data.sources import CIFAR10_CLASSES
from saliency_jax.data.sources import DIGITS_SPLIT_SEED
from saliency_jax.data.sources import DIGITS_TEST_FRACTION
from saliency_jax.data.sources import SOURCE_SPECS
from saliency_jax.data.sources import ImageFolderSource
from saliency_jax.data.sources import ImageSource
from saliency_jax.data.sources import TfdsSource
from saliency_jax.data.sources import get_source
from saliency_jax.data.sources import load_digits
from saliency_jax.data.sources import load_image_folder
from saliency_jax.data.sources import load_mnist
from saliency_jax.data.sources import load_npz
from saliency_jax.data.sources import load_tfds
from saliency_jax.data.regions import TemplateRegionSource
from saliency_jax.data.regions import rasterize_polygons
from saliency_jax.data.regions import rasterize_templates
from saliency_jax.data.voc import VOC_CLASSES
from saliency_jax.data.voc import load_voc
from saliency_jax.data.coco import load_coco

__all__ = [
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
