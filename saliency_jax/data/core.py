"""The data core: the source protocol, the checks every source shares, and the registry behind :func:`get_source`.

Every source is a grain-compatible random-access data source: it has
``__len__`` and ``__getitem__(index) -> dict`` with

* ``"image"``: [height, width, channels] float32 in [0, 1] (channels=1 for
    grayscale, 3 for RGB);
* ``"label"``: int32 scalar in [0, num_classes).

and carries the metadata ``num_classes``, ``class_names`` and ``name``.
Pixels are converted from uint8 (``/ 255``) lazily, one item at a time, so the
in-memory sources keep the compact uint8 arrays.

:class:`ImageSource` (images held in memory as a numpy array) is defined here;
the dataset families live in their own modules, which import this one and
register their specs in :data:`SOURCES` (``@SOURCES.register("mnist")``):

* :mod:`saliency_jax.data.mnist`: scikit-learn digits (``"digits"``), MNIST
    IDX files (``"mnist"``, ``"mnist32"``);
* :mod:`saliency_jax.data.npz`: NumPy archives (``"npz"``, ``"cifar10"``);
* :mod:`saliency_jax.data.folder`: ``root/<split>/<class>/`` image trees
    (``"folder"``);
* :mod:`saliency_jax.data.tfds_source`: prepared TensorFlow Datasets
    (``"tfds:<name>"``);
* :mod:`saliency_jax.data.decoy_mnist` (``"decoy_mnist"``, ``"clean_mnist"``),
    :mod:`saliency_jax.data.celeba` (``"celeba"``),
    :mod:`saliency_jax.data.clips` (``"mnist_clips"``, ``"digits_clips"``),
    :mod:`saliency_jax.data.voc` (``"voc07"``) and
    :mod:`saliency_jax.data.coco` (``"coco14"``).

This module imports none of them: :mod:`saliency_jax.data` (the package)
imports each once, so that importing anything from the package fills the
registry. :func:`get_source` dispatches on a short spec string such as
``"mnist"`` or ``"tfds:cifar10"``.

A registered loader is ``load(spec, split, data_dir, image_size, **options)``;
its metadata (keywords of :meth:`saliency_jax.registry.Registry.register`):

* ``options``: the keywords of ``config.dataset.options`` the loader takes
    (default none); :func:`get_source` rejects others;
* ``templates``: whether the spec is single-label, so that every item can
    carry its class's region template (``region_templates`` /
    ``template_frame`` options, handled by :func:`get_source`; default True);
* ``own_options``: the loader validates its options and ``image_size`` itself
    (default False);
* ``argument``: the spec is ``"<name>:<argument>"`` (e.g. ``"tfds:<name>"``);
    the value is the placeholder shown in :func:`source_specs`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from saliency_jax.data import augment as augment_lib
from saliency_jax.data import regions as regions_lib
from saliency_jax.registry import SOURCES

__all__ = [
    "SPLITS",
    "SOURCES",
    "SOURCE_OPTIONS",
    "TEMPLATE_OPTIONS",
    "ImageSource",
    "check_split",
    "check_image_size",
    "to_float_image",
    "default_class_names",
    "require_data_dir",
    "source_specs",
    "get_source",
]

SPLITS = ("train", "test")
"""Splits every loader accepts."""


def check_split(split: str, name: str) -> None:
    """Raises ValueError (naming the loader ``name``) unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(
            f"{name}: split must be one of {SPLITS}, got {split!r}."
        )


def check_image_size(image_size: int | None, name: str) -> None:
    """Raises ValueError (naming ``name``) unless ``image_size`` is None or a positive int."""
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(
        image_size, (int, np.integer)
    ) or image_size < 1:
        raise ValueError(
            f"{name}: image_size must be a positive int or None, got"
            f" {image_size!r}."
        )


def to_float_image(image: np.ndarray, image_size: int | None) -> np.ndarray:
    """uint8 or float image [h, w, c] -> float32 [h', w', c] in [0, 1]."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / np.float32(255.0)
    else:
        image = np.asarray(image, dtype=np.float32)
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = augment_lib.resize(image, image_size)
    return image


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """``("0", "1", ...)``: the class names of a source that has none."""
    return tuple(str(i) for i in range(num_classes))


def require_data_dir(spec: str, data_dir: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    """``data_dir``, or ValueError ``get_source(<spec>) needs data_dir.`` when it is None."""
    if data_dir is None:
        raise ValueError(f"get_source({spec!r}) needs data_dir.")
    return data_dir


# ----------------------------------------------------------------------------
# In-memory arrays.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
    """In-memory image classification source (grain random-access source).

    Attributes:
        images: [num_examples, height, width, channels] uint8 in [0, 255] or
            float32 in [0, 1]. uint8 pixels are divided by 255 lazily per item.
        labels: [num_examples] integer class ids in [0, num_classes); stored as
            int32.
        num_classes: number of classes.
        class_names: ``num_classes`` human-readable names, in label order.
            Defaults to ``("0", "1", ...)``.
        name: short name used in error messages and logs, e.g. ``"mnist/train"``.
        image_size: if set, every item is resized (bilinear) to
            [image_size, image_size, channels]; None keeps the stored size.
        fields: other per-example arrays ``{name: [num_examples, ...]}``
            (e.g. ``"region"`` masks [num_examples, height, width] for
            attention guidance / RRR): item ``i`` carries ``fields[name][i]``.
            A field whose per-example shape starts with the images' [height,
            width] is spatial: float32, resized with the image.

    Items are ``{"image": [h, w, c] float32 in [0, 1], "label": int32 scalar,
    **fields}``.

    Raises:
        TypeError: images not uint8/float32 or labels not integer.
        ValueError: images not rank 4, labels not rank 1 or of a different
            length, labels outside [0, num_classes), NaN or out-of-range float
            pixels, ``len(class_names) != num_classes``, or a field named
            ``image``, ``label`` or ``mask`` or not one entry per example; the
            message names the source.

    >>> src = ImageSource(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]),
    ...                   num_classes=2, name="toy")
    >>> src[1]["image"].shape, int(src[1]["label"])
    ((4, 4, 1), 1)
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] = ()
    name: str = "images"
    image_size: int | None = None
    fields: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        name = self.name
        images = self.images
        if not isinstance(images, np.ndarray):
            raise TypeError(
                f"Source {name!r}: images must be a numpy array, got"
                f" {type(images).__name__}."
            )
        if images.ndim != 4:
            raise ValueError(
                f"Source {name!r}: images must have rank 4 [num_examples, height,"
                f" width, channels], got shape {images.shape}."
            )
        if images.dtype != np.uint8 and images.dtype != np.float32:
            raise TypeError(
                f"Source {name!r}: images must be uint8 or float32, got"
                f" {images.dtype}."
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(
                f"Source {name!r}: labels must have rank 1 [num_examples], got"
                f" shape {labels.shape}."
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(
                f"Source {name!r}: labels must be integers, got {labels.dtype}."
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"Source {name!r}: {images.shape[0]} images but {labels.shape[0]}"
                " labels."
            )
        num_classes = self.num_classes
        if isinstance(num_classes, bool) or not isinstance(
            num_classes, (int, np.integer)
        ) or num_classes < 1:
            raise ValueError(
                f"Source {name!r}: num_classes must be a positive int, got"
                f" {num_classes!r}."
            )
        if labels.size:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"Source {name!r}: labels must lie in [0, {num_classes}), got"
                    f" range [{lo}, {hi}]."
                )
        if images.dtype == np.float32 and images.size:
            if np.isnan(images).any():
                raise ValueError(f"Source {name!r}: images contain NaN.")
            lo, hi = float(images.min()), float(images.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(
                    f"Source {name!r}: float32 images must lie in [0, 1], got range"
                    f" [{lo}, {hi}]."
                )
        class_names = tuple(self.class_names) or default_class_names(
            int(num_classes)
        )
        if len(class_names) != num_classes:
            raise ValueError(
                f"Source {name!r}: {len(class_names)} class_names for"
                f" {num_classes} classes."
            )
        check_image_size(self.image_size, f"Source {name!r}")
        fields = {}
        for key, value in dict(self.fields).items():
            value = np.asarray(value)
            if key in ("image", "label", "mask"):
                raise ValueError(f"Source {name!r}: a field cannot be named {key!r} (the pipeline's own)")
            if value.ndim < 1 or value.shape[0] != images.shape[0]:
                raise ValueError(f"Source {name!r}: field {key!r} has shape {value.shape}; it needs one entry per "
                                 f"example ({images.shape[0]})")
            fields[key] = value
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "labels", labels.astype(np.int32))
        object.__setattr__(self, "num_classes", int(num_classes))
        object.__setattr__(self, "class_names", class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        item = {
            "image": to_float_image(self.images[index], self.image_size),
            "label": np.int32(self.labels[index]),
        }
        height_width = self.images.shape[1:3]
        for key, value in self.fields.items():
            value = value[index]
            if value.shape[:2] == height_width:  # spatial: [h, w, ...] resized with the image
                value = np.asarray(value, np.float32)
                if self.image_size is not None and height_width != (self.image_size, self.image_size):
                    moved = np.moveaxis(value, (0, 1), (-2, -1)) if value.ndim > 2 else value
                    moved = augment_lib.resize_spatial(moved, self.image_size)
                    value = np.moveaxis(moved, (-2, -1), (0, 1)) if value.ndim > 2 else moved
            item[key] = value
        return item

    def __repr__(self) -> str:
        return (
            f"ImageSource(name={self.name!r}, len={len(self)},"
            f" image_shape={self.images.shape[1:]}, dtype={self.images.dtype},"
            f" num_classes={self.num_classes}, image_size={self.image_size})"
        )


# ----------------------------------------------------------------------------
# The registry and get_source.
# ----------------------------------------------------------------------------

#: The data sources by spec name: value ``load(spec, split, data_dir, image_size, **options)``, metadata as in the
#: module docstring. Filled by the dataset modules when :mod:`saliency_jax.data` imports them.
# (SOURCES is the shared instance of :mod:`saliency_jax.registry`.)

TEMPLATE_OPTIONS = ("region_templates", "template_frame")
"""The options every single-label spec takes (``templates`` metadata True): see :func:`get_source`."""

SOURCE_OPTIONS: Mapping[str, tuple[str, ...]] = SOURCES.view("options")
"""Loader keywords each spec accepts in ``get_source(..., options=)`` (the specs that take some), besides
:data:`TEMPLATE_OPTIONS` (every single-label spec; see :func:`get_source`). A live view of :data:`SOURCES`."""


def source_specs() -> tuple[str, ...]:
    """The spec strings :func:`get_source` understands, in registration order (``"tfds:<name>"`` for a spec that
    takes an argument)."""
    return tuple(f"{name}:{SOURCES.metadata(name)['argument']}" if "argument" in SOURCES.metadata(name) else name
                 for name in SOURCES.names())


def _lookup(spec: Any):
    """The registry entry of ``spec`` (``"name"`` or ``"name:argument"``), or the ``Unknown source spec`` error."""
    if isinstance(spec, str):
        name, colon, argument = spec.partition(":")
        if name in SOURCES:
            entry = SOURCES.entry(name)
            if ("argument" in entry.metadata) == bool(colon) and (argument or not colon):
                return entry
    raise ValueError(
        f"Unknown source spec {spec!r}; valid specs: {', '.join(source_specs())}."
    )


def _plain(value: Any) -> Any:
    """A config value as plain Python (``ConfigDict`` -> dict, lists/tuples recursively)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _with_templates(source: Any, templates: Any, frame: Any, spec: str):
    """Wraps a single-label source so that every item carries its class's rasterised template as ``region``."""
    if not isinstance(templates, dict) or not templates:
        raise ValueError(f"get_source({spec!r}): options.region_templates must map class names to polygons; got "
                         f"{templates!r}")
    names = [str(n) for n in (getattr(source, "class_names", None) or range(source.num_classes))]
    unknown = sorted(set(map(str, templates)) - set(names))
    if unknown:
        raise ValueError(f"get_source({spec!r}): options.region_templates names unknown classes {unknown}; the "
                         f"classes are {names}")
    missing = [n for n in names if n not in templates]
    if missing:
        raise ValueError(f"get_source({spec!r}): options.region_templates has no template for classes {missing} "
                         "(a per-class template is the region of every image of its class)")
    height, width = source[0]["image"].shape[:2]
    masks = regions_lib.rasterize_templates({str(k): v for k, v in templates.items()}, names, (height, width),
                                            None if frame is None else tuple(frame))
    return regions_lib.TemplateRegionSource(source, masks)


def get_source(
    spec: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    options: Any = None,
):
    """Builds a source from a short spec string.

    Specs (:func:`source_specs`; each registered by its module in
    :data:`SOURCES`):

    * ``"digits"``: :func:`saliency_jax.data.load_digits` (``data_dir``
        unused).
    * ``"mnist"``: :func:`saliency_jax.data.load_mnist`; ``data_dir`` holds the
        IDX files.
    * ``"mnist32"``: :func:`saliency_jax.data.load_mnist` with ``pad=2``: the
        digits zero-padded to 32x32 (Cruz & Cardoso's background protocol), not
        resized.
    * ``"npz"``: :func:`saliency_jax.data.load_npz`; ``data_dir`` is the
        ``.npz`` file.
    * ``"cifar10"``: :func:`saliency_jax.data.load_npz` with
        ``CIFAR10_CLASSES``; ``data_dir`` is the ``.npz`` file or a directory
        holding ``cifar10.npz``.
    * ``"folder"``: :func:`saliency_jax.data.load_image_folder`; ``data_dir``
        is the root; ``image_size`` is required.
    * ``"decoy_mnist"``: :func:`saliency_jax.data.load_decoy_mnist` (Decoy
        MNIST, Ross et al. 2017; fields ``region``, ``wrong_region``,
        ``decoy_label``); ``data_dir`` holds the MNIST IDX files (unused with
        ``options.base = "digits"``). Options: ``seed``, ``region_threshold``,
        ``region_dilation``, ``base``.
    * ``"clean_mnist"``: the same with ``decoy=False`` (clean MNIST with the
        same fields: the ceiling arm).
    * ``"celeba"``: :func:`saliency_jax.data.load_celeba` (multi-hot labels);
        ``data_dir`` is the CelebA root; split ``"test"`` or ``"train"`` (or
        ``"valid"``). Options: ``attributes``, ``region_templates`` (per
        attribute), ``frame``.
    * ``"tfds:<name>"``: :func:`saliency_jax.data.load_tfds` (``data_dir`` is
        the TFDS data directory, None for TFDS's default).
    * ``"mnist_clips"``, ``"digits_clips"``: moving-digit clips
        (:func:`saliency_jax.data.clips.clip_source`: items ``{"image": [time,
        canvas, canvas, 1], "label", ...}``) of the MNIST digits in
        ``data_dir`` or of the embedded 8 x 8 digits; ``options`` are the
        fields of :class:`saliency_jax.data.clips.ClipSettings` (a config's
        ``dataset.options`` section); clips are not resized (``image_size`` must
        be None).
    * ``"voc07"``: :func:`saliency_jax.data.load_voc` (PASCAL VOC 2007
        localisation data of the pointing game; ``data_dir`` is the
        ``VOC2007`` folder or a parent; split an image set such as
        ``"test"``). Option: ``limit``. Not resized (``image_size`` must be
        None).
    * ``"coco14"``: :func:`saliency_jax.data.load_coco` (COCO 2014 instance
        masks; ``data_dir`` is the COCO folder; split such as ``"val2014"``).
        Option: ``limit``. Not resized.

    Options (``config.dataset.options``): the keywords above, and for every
    single-label spec ``region_templates`` (``{class name: [polygon, ...]}``,
    the poster's per-class template drawn once by the user) with
    ``template_frame`` (``(width, height)`` of the polygons' coordinates;
    None = the image size): every item then carries its class's rasterised
    template as ``region`` (:class:`saliency_jax.data.TemplateRegionSource`,
    replacing a region the source has), resized and augmented with the image.

    Args:
        spec: one of the specs above.
        split: "train" or "test" (the spec's own split names for CelebA, VOC
            and COCO).
        data_dir: see above.
        image_size: optional square resize (bilinear) of every item.
        options: a mapping (dict or ``ConfigDict``) of the spec's options; None
            or empty = the loader's defaults.

    Returns:
        ImageSource, ImageFolderSource, TfdsSource, DecoyMNISTSource,
        CelebASource, MovingDigitClips, VOCPointingData, COCOPointingData or
        TemplateRegionSource.

    Raises:
        ValueError: unknown spec (lists the valid ones), missing ``data_dir`` or
            ``image_size`` where needed, an option the spec does not take
            (listing those it takes), a bad template, ``image_size`` with a
            clip, VOC or COCO spec, or any loader error.
        FileNotFoundError: missing files.
    """
    options = dict(_plain(options) or {})
    load, metadata = _lookup(spec)
    if metadata.get("own_options", False):
        return load(spec, split, data_dir, image_size, **options)
    templates_allowed = metadata.get("templates", True)
    allowed = tuple(metadata.get("options", ())) + (TEMPLATE_OPTIONS if templates_allowed else ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"get_source({spec!r}): unknown option(s) {unknown}; this spec takes"
            f" {sorted(allowed)}."
        )
    templates = options.pop("region_templates", None) if templates_allowed else None
    frame = options.pop("template_frame", None)
    source = load(spec, split, data_dir, image_size, **options)
    if templates is not None:
        source = _with_templates(source, templates, frame, spec)
    return source
