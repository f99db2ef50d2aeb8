"""Host-side numpy image augmentation (used inside grain ``random_map``).

Reproduces the augmentation of Morales et al. 2021 (Sec. 4.3), which used
Keras' ``ImageDataGenerator`` with ``horizontal_flip=True``,
``rotation_range=40``, ``channel_shift_range=30`` and
``brightness_range=(0.5, 1.5)``. Keras applies, in this order: rotation,
channel shift, horizontal flip, brightness; :func:`augment` keeps that order.

All images are [height, width, channels] float32 in [0, 1]. Every function
works on one image: the pipeline maps it over examples on the host, where
per-example random parameters are drawn from the grain-provided
``np.random.Generator``.

Spatial per-example fields (a user region ``S`` or an annotated wrong region
``A``: [..., height, width] float32 in [0, 1], any leading axes) move with the
image: :func:`augment_example` applies the same rotation and flip to them
(bilinear, zero fill, like the image) and leaves them out of the photometric
steps; :func:`resize_spatial` resizes them like :func:`resize`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "PAPER_AUGMENTATION",
    "augment",
    "augment_example",
    "check_spatial_fields",
    "horizontal_flip",
    "rotate",
    "apply_channel_shift",
    "adjust_brightness",
    "resize",
    "resize_spatial",
]

PAPER_AUGMENTATION: dict[str, Any] = {
    "hflip": True,
    "rotation": 40.0,
    "channel_shift": 30.0,
    "brightness": (0.5, 1.5),
}
"""Keyword arguments of :func:`augment` for Morales et al. 2021, Sec. 4.3."""


def _check_image(image: np.ndarray, fn: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(
            f"{fn}: image must be [height, width, channels], got shape"
            f" {image.shape}."
        )
    return image.astype(np.float32, copy=False)


def horizontal_flip(image: np.ndarray) -> np.ndarray:
    """Mirrors an image left-right.

    Args:
        image: [height, width, channels] float32.

    Returns:
        [height, width, channels] float32 with ``out[:, j] = image[:, w - 1 - j]``.

    Raises:
        ValueError: image not rank 3.
    """
    image = _check_image(image, "horizontal_flip")
    return np.ascontiguousarray(image[:, ::-1, :])


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotates an image about its centre, keeping its size.

    Bilinear interpolation (Keras' ``apply_affine_transform`` uses order 1);
    pixels coming from outside the image are filled with 0 (Keras' default
    fill mode is "nearest"; the paper's setting is not stated, 0 is used here).

    Args:
        image: [height, width, channels] float32 in [0, 1].
        angle: rotation in degrees, counter-clockwise as displayed (same
            convention as ``np.rot90`` and ``PIL.Image.rotate``).

    Returns:
        [height, width, channels] float32 in [0, 1]; ``angle == 0`` returns the
        image unchanged.

    Raises:
        ValueError: image not rank 3 or angle not finite.
    """
    image = _check_image(image, "rotate")
    angle = float(angle)
    if not np.isfinite(angle):
        raise ValueError(f"rotate: angle must be finite, got {angle}.")
    if angle == 0.0:
        return image
    out = ndimage.rotate(
        image,
        angle,
        axes=(0, 1),
        reshape=False,
        order=1,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def apply_channel_shift(image: np.ndarray, intensity: float) -> np.ndarray:
    """Adds one intensity to every channel and clips to [0, 1].

    Keras' ``apply_channel_shift`` adds the same random intensity to all
    channels (and clips to the image's own min/max; here to [0, 1]).

    Args:
        image: [height, width, channels] float32 in [0, 1].
        intensity: shift in 0-255 pixel units (divided by 255 here).

    Returns:
        [height, width, channels] float32 ``clip(image + intensity / 255, 0, 1)``.

    Raises:
        ValueError: image not rank 3.
    """
    image = _check_image(image, "apply_channel_shift")
    shift = np.float32(intensity) / np.float32(255.0)
    return np.clip(image + shift, 0.0, 1.0)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Multiplies an image by a brightness factor and clips to [0, 1].

    Args:
        image: [height, width, channels] float32 in [0, 1].
        factor: brightness factor (1 = unchanged, 0 = black), >= 0.

    Returns:
        [height, width, channels] float32 ``clip(image * factor, 0, 1)``.

    Raises:
        ValueError: image not rank 3 or factor negative.
    """
    image = _check_image(image, "adjust_brightness")
    if not factor >= 0.0:
        raise ValueError(f"adjust_brightness: factor must be >= 0, got {factor}.")
    return np.clip(image * np.float32(factor), 0.0, 1.0)


def check_spatial_fields(
    fields: Mapping[str, np.ndarray], shape: tuple[int, ...], fn: str
) -> dict[str, np.ndarray]:
    """Checks spatial fields against their image and converts them to float32.

    Args:
        fields: ``{name: [..., height, width]}`` array-likes.
        shape: the image's shape [height, width, channels].
        fn: caller's name for messages.

    Returns:
        ``{name: float32 array}`` with the input shapes.

    Raises:
        ValueError: a field of rank < 2 or whose trailing axes differ from the
            image's height and width (names the field).
    """
    out = {}
    for name, field in fields.items():
        field = np.asarray(field, dtype=np.float32)
        if field.ndim < 2 or field.shape[-2:] != tuple(shape[:2]):
            raise ValueError(
                f"{fn}: spatial field {name!r} must be [..., {shape[0]}, {shape[1]}]"
                f" (the image's height and width), got shape {field.shape}."
            )
        out[name] = field
    return out


def _map_planes(field: np.ndarray, fn) -> np.ndarray:
    """Applies an image function ([h, w, c] -> [h', w', c]) to the planes of a [..., h, w] field."""
    lead, (h, w) = field.shape[:-2], field.shape[-2:]
    planes = field.reshape(-1, h, w).transpose(1, 2, 0)  # [h, w, planes]
    out = fn(planes)
    return np.ascontiguousarray(
        out.transpose(2, 0, 1).reshape(*lead, *out.shape[:2])
    ).astype(np.float32, copy=False)


def augment_example(
    image: np.ndarray,
    rng: np.random.Generator,
    spatial: Mapping[str, np.ndarray] | None = None,
    *,
    hflip: bool = False,
    rotation: float = 0.0,
    channel_shift: float = 0.0,
    brightness: tuple[float, float] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`augment` of one image, moving its spatial fields with it.

    The same random draws as :func:`augment` (so ``augment_example(image, rng,
    {}, **kw)[0]`` equals ``augment(image, rng, **kw)`` for the same ``rng``
    state); every field in ``spatial`` gets the image's rotation (bilinear,
    zero fill, clipped to [0, 1]) and flip; channel shift and brightness do not
    apply to them.

    Args:
        image: [height, width, channels] float32 in [0, 1].
        rng: numpy generator.
        spatial: ``{name: [..., height, width] float32 in [0, 1]}``, e.g.
            ``{"region": S, "wrong_region": A}``; None = none.
        hflip, rotation, channel_shift, brightness: as :func:`augment`.

    Returns:
        ``(image, fields)``: the augmented image [height, width, channels] and
        a dict of the transformed fields, each with its input shape, float32 in
        [0, 1].

    Raises:
        ValueError: as :func:`augment`, or a field whose trailing two axes are
            not the image's height and width.
    """
    image = _check_image(image, "augment")
    fields = check_spatial_fields(spatial or {}, image.shape, "augment")
    if rotation < 0 or channel_shift < 0:
        raise ValueError(
            "augment: rotation and channel_shift must be >= 0, got"
            f" {rotation} and {channel_shift}."
        )
    if brightness is not None:
        low, high = (float(b) for b in brightness)
        if not 0.0 <= low <= high:
            raise ValueError(
                f"augment: brightness must be (low, high) with 0 <= low <= high, got"
                f" {brightness}."
            )
    if rotation > 0:
        angle = rng.uniform(-rotation, rotation)
        image = rotate(image, angle)
        fields = {
            k: _map_planes(v, lambda planes: rotate(planes, angle))
            for k, v in fields.items()
        }
    if channel_shift > 0:
        image = apply_channel_shift(
            image, rng.uniform(-channel_shift, channel_shift)
        )
    if hflip and rng.uniform() < 0.5:
        image = horizontal_flip(image)
        fields = {k: np.ascontiguousarray(v[..., ::-1]) for k, v in fields.items()}
    if brightness is not None:
        image = adjust_brightness(image, rng.uniform(low, high))
    return image, fields


def augment(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    hflip: bool = False,
    rotation: float = 0.0,
    channel_shift: float = 0.0,
    brightness: tuple[float, float] | None = None,
) -> np.ndarray:
    """Random augmentation of one image (Morales et al. 2021, Sec. 4.3).

    In Keras ``ImageDataGenerator`` order: rotation by an angle uniform in
    [-rotation, rotation] degrees, channel shift by an intensity uniform in
    [-channel_shift, channel_shift] (0-255 units), horizontal flip with
    probability 0.5, brightness factor uniform in ``brightness``. Each step is
    skipped when disabled (False / 0 / None); only enabled steps draw from
    ``rng``. ``augment(image, rng, **PAPER_AUGMENTATION)`` is the paper's
    setting. :func:`augment_example` does the same and moves per-example
    spatial fields (regions) with the image.

    Args:
        image: [height, width, channels] float32 in [0, 1].
        rng: numpy generator (grain passes one per element in ``random_map``).
        hflip: flip left-right with probability 0.5.
        rotation: maximum absolute rotation in degrees (>= 0).
        channel_shift: maximum absolute channel shift in 0-255 units (>= 0).
        brightness: (low, high) range of the brightness factor, 0 <= low <= high,
            or None.

    Returns:
        [height, width, channels] float32 in [0, 1].

    Raises:
        ValueError: image not rank 3, negative ranges, or a bad brightness range.
    """
    return augment_example(
        image,
        rng,
        None,
        hflip=hflip,
        rotation=rotation,
        channel_shift=channel_shift,
        brightness=brightness,
    )[0]


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one image with Pillow (per channel, float32 mode "F").

    Args:
        image: [height, width, channels] float32 in [0, 1].
        size: output side ``s`` (square) or ``(new_height, new_width)``.

    Returns:
        [new_height, new_width, channels] float32 in [0, 1]; the input itself
        when the size already matches.

    Raises:
        ValueError: image not rank 3 or non-positive size.
    """
    image = _check_image(image, "resize")
    if isinstance(size, (int, np.integer)):
        new_h = new_w = int(size)
    else:
        new_h, new_w = (int(s) for s in size)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"resize: size must be positive, got {size}.")
    if image.shape[:2] == (new_h, new_w):
        return image
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[:, :, c]))
            .resize((new_w, new_h), Image.Resampling.BILINEAR)
        )
        for c in range(image.shape[2])
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


def resize_spatial(field: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a spatial field [..., height, width], plane by plane as :func:`resize`.

    Args:
        field: [..., height, width] float32 in [0, 1] (e.g. a region mask).
        size: output side ``s`` (square) or ``(new_height, new_width)``.

    Returns:
        [..., new_height, new_width] float32 in [0, 1] (a binary mask becomes
        soft at its edges); the input itself when the size already matches.

    Raises:
        ValueError: field of rank < 2 or non-positive size.
    """
    field = np.asarray(field, dtype=np.float32)
    if field.ndim < 2:
        raise ValueError(
            f"resize_spatial: field must be [..., height, width], got shape {field.shape}."
        )
    return _map_planes(field, lambda planes: resize(planes, size))
