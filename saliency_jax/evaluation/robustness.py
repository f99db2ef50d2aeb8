"""Random Erasing (Zhong et al., AAAI 2020) for the robustness test of Morales et al. 2021.

Morales et al. 2021 (Sec. 5.2.2, Table 4) measure robustness by evaluating the trained models on
a test set whose images had a random rectangle erased "as proposed in [40]" (Zhong, Zheng, Kang,
Li, Yang, "Random Erasing Data Augmentation", AAAI 2020). This module implements Zhong's
Algorithm 1 in JAX, batched with ``jax.vmap`` and jittable.

Zhong's Algorithm 1, for one image of size H x W (area S = H * W):

1. with probability ``1 - p`` return the image unchanged;
2. draw the erased area ``S_e ~ U(s_l, s_h) * S`` and aspect ratio ``r_e ~ U(r_1, 1 / r_1)``;
   ``H_e = sqrt(S_e * r_e)``, ``W_e = sqrt(S_e / r_e)``;
3. draw the top-left corner ``(y_e, x_e)`` uniformly; if the box fits in the image, fill it with
   random values and return, otherwise go back to step 2 ("while True").

Differences from the paper, all as in Zhong's reference code and ``torchvision``'s
``RandomErasing``:

* the aspect ratio is drawn log-uniformly in ``aspect_range`` (so ``r`` and ``1 / r`` are equally
  likely), box sides are rounded to whole pixels, and the corner is drawn among positions where
  the box fits;
* instead of an unbounded loop, ``max_attempts`` (default 100, Zhong's code) candidate boxes are
  drawn at once (vectorised) and the first that fits (``1 <= H_e <= H`` and ``1 <= W_e <= W``)
  is used; if none fits the image is returned unchanged. For the default ranges a single
  candidate fails with probability about 0.03 on a square image, so all 100 failing is
  practically impossible (about 1e-150).

Because sides are rounded to pixels, the erased fraction ``H_e * W_e / S`` can differ from the
drawn ``S_e / S`` by the rounding, at most ``(H_e + W_e) / (2 S) + 1 / (4 S)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["random_erasing", "erased_test_set"]

_FillSpec = tuple[str, tuple[float, ...]]  # (kind, per-channel constants or ()).


def _check_range(value: Any, name: str, *, low: float, high: float | None, low_inclusive: bool) -> tuple[float, float]:
    """Checks a ``(min, max)`` pair with ``low (<|<=) min <= max (<= high)``."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max) of numbers, got {value!r}.") from None
    bad_low = lo < low if low_inclusive else lo <= low
    bad_high = high is not None and hi > high
    if not (math.isfinite(lo) and math.isfinite(hi)) or bad_low or bad_high or lo > hi:
        bound = f"{low} {'<=' if low_inclusive else '<'} min <= max"
        bound += f" <= {high}" if high is not None else ""
        raise ValueError(f"{name} must satisfy {bound}, got {value!r}.")
    return lo, hi


def _parse_fill(fill: Any, channels: int) -> _FillSpec:
    """Returns a hashable fill description ``(kind, constants)``."""
    if isinstance(fill, str):
        if fill in ("random", "zero"):
            return fill, ()
        raise ValueError(f'fill must be "random", "zero", a number or {channels} numbers, got {fill!r}.')
    if isinstance(fill, (bool, np.bool_)):
        raise ValueError(f"fill must not be a bool, got {fill!r}.")
    try:
        values = np.asarray(fill, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim > 1 or (values.ndim == 1 and values.shape[0] != channels):
        raise ValueError(
            f'fill must be "random", "zero", a number, or a sequence of channels={channels} numbers, got {fill!r}.'
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"fill must be finite, got {fill!r}.")
    return "constant", tuple(float(v) for v in np.broadcast_to(values, (channels,)))


@functools.partial(jax.jit, static_argnames=("fill_kind", "max_attempts"))
def _erase_with_keys(
    keys: jax.Array,
    images: jax.Array,
    params: dict[str, jax.Array],
    *,
    fill_kind: str,
    max_attempts: int,
) -> jax.Array:
    """Random Erasing with one PRNG key per image; see :func:`random_erasing`.

    ``params`` holds float32 arrays (traced, so new values do not recompile): ``probability`` [],
    ``area_range`` [2], ``log_aspect_range`` [2], ``data_range`` [2], ``fill_value`` [channels].
    """
    _, height, width, _ = images.shape
    area_lo, area_hi = params["area_range"][0], params["area_range"][1]
    log_aspect_lo, log_aspect_hi = params["log_aspect_range"][0], params["log_aspect_range"][1]

    def erase_one(key: jax.Array, image: jax.Array) -> jax.Array:
        k_apply, k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(key, 6)
        apply = jax.random.uniform(k_apply) < params["probability"]
        # Candidate boxes, Zhong Alg. 1 lines 5-8, all `max_attempts` at once.
        area = jax.random.uniform(k_area, (max_attempts,), minval=area_lo, maxval=area_hi) * (height * width)
        aspect = jnp.exp(jax.random.uniform(k_aspect, (max_attempts,), minval=log_aspect_lo, maxval=log_aspect_hi))
        box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
        box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
        fits = (box_h >= 1) & (box_h <= height) & (box_w >= 1) & (box_w <= width)
        first = jnp.argmax(fits)  # Index of the first fitting candidate (0 if none fits).
        h, w = box_h[first], box_w[first]
        erase = apply & fits[first]
        # Corner uniform over the positions where the box fits (Alg. 1 lines 9-10).
        top = jax.random.randint(k_top, (), 0, jnp.maximum(height - h + 1, 1))
        left = jax.random.randint(k_left, (), 0, jnp.maximum(width - w + 1, 1))
        rows = jnp.arange(height)
        cols = jnp.arange(width)
        in_rows = (rows >= top) & (rows < top + h)
        in_cols = (cols >= left) & (cols < left + w)
        mask = in_rows[:, None] & in_cols[None, :] & erase  # [height, width]
        if fill_kind == "random":
            values = jax.random.uniform(
                k_fill,
                image.shape,
                dtype=image.dtype,
                minval=params["data_range"][0].astype(image.dtype),
                maxval=params["data_range"][1].astype(image.dtype),
            )
        elif fill_kind == "zero":
            values = jnp.zeros_like(image)
        else:
            values = jnp.broadcast_to(params["fill_value"].astype(image.dtype), image.shape)
        return jnp.where(mask[:, :, None], values, image)

    return jax.vmap(erase_one)(keys, images)


def _validated_args(
    images: Any,
    probability: float,
    area_range: Sequence[float],
    aspect_range: Sequence[float],
    fill: Any,
    data_range: Sequence[float],
    max_attempts: int,
) -> tuple[Any, ...]:
    """Checks the arguments of :func:`random_erasing`.

    Returns:
      ``(params, static)``: the float32 arrays and the static keyword arguments of
      :func:`_erase_with_keys`.
    """
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"images must have shape [batch, height, width, channels], got shape {shape}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"images must have a floating dtype (e.g. float32), got {dtype}.")
    if min(shape[1:]) < 1:
        raise ValueError(f"images must have non-empty height, width and channels, got {shape}.")
    if isinstance(probability, bool) or not isinstance(probability, (int, float, np.number)):
        raise ValueError(f"probability must be a Python number in [0, 1], got {probability!r}.")
    probability = float(probability)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {probability}.")
    area = _check_range(area_range, "area_range", low=0.0, high=1.0, low_inclusive=False)
    aspect = _check_range(aspect_range, "aspect_range", low=0.0, high=None, low_inclusive=False)
    data = _check_range(data_range, "data_range", low=-math.inf, high=None, low_inclusive=False)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be a positive int, got {max_attempts!r}.")
    fill_kind, fill_value = _parse_fill(fill, int(shape[3]))
    params = {
        "probability": np.float32(probability),
        "area_range": np.asarray(area, np.float32),
        "log_aspect_range": np.log(np.asarray(aspect, np.float64)).astype(np.float32),
        "data_range": np.asarray(data, np.float32),
        "fill_value": np.asarray(fill_value or (0.0,) * int(shape[3]), np.float32),
    }
    return params, {"fill_kind": fill_kind, "max_attempts": max_attempts}


def random_erasing(
    key: jax.Array,
    images: jax.Array,
    *,
    probability: float = 0.5,
    area_range: Sequence[float] = (0.02, 0.4),
    aspect_range: Sequence[float] = (0.3, 1 / 0.3),
    fill: str | float | Sequence[float] = "random",
    data_range: Sequence[float] = (0.0, 1.0),
    max_attempts: int = 100,
) -> jax.Array:
    """Erases one random rectangle per image (Zhong et al. 2020, Alg. 1).

    Each image of the batch independently (``jax.vmap`` over per-image keys from
    ``jax.random.split(key, batch)``), with probability ``probability``, gets one axis-aligned
    rectangle replaced by ``fill``, on all channels. The rectangle's area is a fraction of the
    image area drawn uniformly from ``area_range``, its aspect ratio (height / width) is drawn
    log-uniformly from ``aspect_range``, and its position uniformly among those where it fits. Of
    ``max_attempts`` candidate boxes drawn at once, the first that fits is used; if none fits the
    image is left unchanged (see the module docstring). Sides are rounded to whole pixels.

    The output is a deterministic function of ``key``; the keyword arguments are static Python
    values, so the function can be wrapped as
    ``jax.jit(functools.partial(random_erasing, probability=1.0))``.

    Args:
      key: a ``jax.random`` PRNG key.
      images: [batch, height, width, channels] floating (e.g. float32) images.
      probability: probability in [0, 1] that an image is erased (Zhong's ``p``; 0.5 in his
        training setup). 1.0 erases every image (the erased-test-set setting).
      area_range: ``(s_l, s_h)`` with ``0 < s_l <= s_h <= 1``: the erased area as a fraction of
        the image area.
      aspect_range: ``(r_1, r_2)`` with ``0 < r_1 <= r_2``: range of the box aspect ratio
        height / width; Zhong uses ``(0.3, 1 / 0.3)``.
      fill: ``"random"``: independent uniform values in ``data_range`` for every erased pixel
        and channel (Zhong's default); ``"zero"``: zeros; a number: that constant; a sequence of
        ``channels`` numbers: a per-channel constant (e.g. the dataset mean pixel).
      data_range: ``(low, high)`` of the random fill values (the image value range).
      max_attempts: number of candidate boxes drawn per image (Zhong's code uses 100).

    Returns:
      [batch, height, width, channels] images of the input dtype, erased.

    Raises:
      ValueError: if ``images`` is not rank 4 or not floating, or ``probability``,
        ``area_range``, ``aspect_range``, ``data_range``, ``fill`` or ``max_attempts`` is out of
        range or malformed.

    >>> images = jnp.full((2, 8, 8, 3), 0.5)
    >>> out = random_erasing(jax.random.key(0), images, probability=1.0, fill="zero")
    >>> bool((out == 0).any(axis=(1, 2, 3)).all())
    True
    """
    params, static = _validated_args(images, probability, area_range, aspect_range, fill, data_range, max_attempts)
    images = jnp.asarray(images)
    keys = jax.random.split(key, images.shape[0])
    return _erase_with_keys(keys, images, params, **static)


def erased_test_set(
    key: jax.Array,
    images: Any,
    *,
    batch_size: int | None = None,
    probability: float = 1.0,
    **kwargs: Any,
) -> np.ndarray:
    """Randomly erases a whole test set, chunk by chunk (Morales et al. 2021, Table 4).

    Image ``i`` gets the ``i``-th key of ``jax.random.split(key, num_images)``, so the result does
    not depend on ``batch_size`` and equals ``random_erasing(key, images, ...)`` on the full array.
    Unlike :func:`random_erasing`, ``probability`` defaults to 1.0: every test image is erased.

    Args:
      key: a ``jax.random`` PRNG key.
      images: [num_images, height, width, channels] floating images (numpy or JAX).
      batch_size: number of images processed per device call; ``None`` processes all at once.
      probability: probability that an image is erased (default 1.0).
      **kwargs: the other keyword arguments of :func:`random_erasing` (``area_range``,
        ``aspect_range``, ``fill``, ``data_range``, ``max_attempts``).

    Returns:
      [num_images, height, width, channels] numpy array of the input dtype.

    Raises:
      ValueError: as :func:`random_erasing`, or if ``batch_size`` is not a positive int.
    """
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    params, static = _validated_args(
        images,
        probability,
        **{
            "area_range": kwargs.pop("area_range", (0.02, 0.4)),
            "aspect_range": kwargs.pop("aspect_range", (0.3, 1 / 0.3)),
            "fill": kwargs.pop("fill", "random"),
            "data_range": kwargs.pop("data_range", (0.0, 1.0)),
            "max_attempts": kwargs.pop("max_attempts", 100),
        },
    )
    if kwargs:
        raise ValueError(f"unknown arguments to erased_test_set: {sorted(kwargs)}.")
    num_images = images.shape[0]
    if batch_size is None:
        batch_size = max(num_images, 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    keys = jax.random.split(key, num_images)
    chunks = [
        np.asarray(
            _erase_with_keys(
                keys[start : start + batch_size], jnp.asarray(images[start : start + batch_size]), params, **static
            )
        )
        for start in range(0, num_images, batch_size)
    ]
    if not chunks:
        return np.asarray(images).copy()
    return np.concatenate(chunks, axis=0)
