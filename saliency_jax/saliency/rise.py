"""RISE: Randomized Input Sampling for Explanation of black-box models.

Petsiuk, Das, Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018:

* Eq. 6: ``S_{I,f}(lambda) ~= 1 / (E[M] * N) sum_{i=1}^N f(I . M_i) M_i(lambda)`` - the saliency of pixel
  ``lambda`` is the score of the class on randomly masked copies of the image, averaged with the masks as weights;
  ``E[M] = p``.
* Sec. 3.2 (mask generation): ``N`` binary grids of ``s x s`` cells, each cell kept with probability ``p``; each
  grid is upsampled bilinearly to ``(s + 1) * C`` (``C = ceil(H / s)``, the cell size in pixels) and cropped to
  ``H x W`` at a random shift in ``[0, C)``, giving smooth masks in [0, 1] whose cell borders fall anywhere.

Implementation notes, matching the authors' released code (``eclique/RISE``): the upsampling uses half-pixel
centres with mirror extension at the border (``skimage.transform.resize(order=1, mode="reflect")``); the score is the
model's softmax probability by default (the released models end in a softmax). One set of masks serves the whole
batch. The uniform numbers behind all ``N`` masks are drawn at once from ``key`` (``N * (s * s + 2)`` floats), so
the result depends only on ``key`` and ``N``, not on how masks are chunked; chunks of ``masks_per_step`` masks are
``vmap``-ed under a ``lax.scan`` that accumulates the sum (no Python loop over masks, memory of one chunk).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency.core import check_images, invalid_examples, mark_invalid, normalize_maps, resolve_targets
from saliency_jax.saliency.grad_cam import Score, class_scores
from saliency_jax.saliency.gradients import _check_logits, _chunked_sum

Array = jax.Array

__all__ = ["rise", "rise_masks"]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def _check_mask_args(image_size, grid_size, p) -> tuple[int, int]:
    if len(tuple(image_size)) != 2:
        raise ValueError(f"image_size must be (height, width); got {image_size!r}")
    height, width = (int(v) for v in image_size)
    _check_int("grid_size", grid_size, 2)
    if grid_size > min(height, width):
        raise ValueError(f"grid_size ({grid_size}) must not exceed the image size ({height}, {width})")
    if not (isinstance(p, (float, int, np.floating)) and 0.0 < float(p) <= 1.0):
        raise ValueError(f"p (the probability of keeping a grid cell) must be in (0, 1]; got {p!r}")
    return height, width


def _interpolation_matrix(size: int, up: int) -> np.ndarray:
    """[up, size] bilinear upsampling matrix: half-pixel centres, mirrored at the border (``ndimage`` "mirror").

    Output pixel ``o`` samples the input at ``u = (o + 0.5) * size / up - 0.5``, between ``floor(u)`` and
    ``floor(u) + 1``; an index ``-1`` is mirrored to ``1`` and ``size`` to ``size - 2`` (no repeated edge).
    """
    u = (np.arange(up) + 0.5) * size / up - 0.5
    lo = np.floor(u).astype(np.int64)
    frac = u - lo

    def mirror(i):
        return np.where(i < 0, -i, np.where(i > size - 1, 2 * (size - 1) - i, i))

    matrix = np.zeros((up, size), np.float64)
    np.add.at(matrix, (np.arange(up), mirror(lo)), 1.0 - frac)
    np.add.at(matrix, (np.arange(up), mirror(lo + 1)), frac)
    return matrix.astype(np.float32)


def _upsample_crop(grid: Array, shift: Array, image_size: tuple[int, int]) -> Array:
    """Bilinear upsampling of an ``s x s`` grid to ``(s + 1) * cell`` pixels and a crop at ``shift``.

    Args:
      grid: [s, s] float.
      shift: int [2], the crop's top-left corner, in ``[0, cell)`` per axis.
      image_size: (height, width) of the crop.

    Returns:
      float32 [height, width]: pixel ``(r, c)`` of the upsampled map samples the grid at
      ``((r + 0.5) * s / up - 0.5, ...)`` (half-pixel centres), mirrored at the border (``ndimage`` mode
      ``"mirror"``, i.e. ``skimage`` mode ``"reflect"`` of the reference code).
    """
    s = grid.shape[0]
    height, width = image_size
    cell = (math.ceil(height / s), math.ceil(width / s))
    rows = _interpolation_matrix(s, (s + 1) * cell[0])
    cols = _interpolation_matrix(s, (s + 1) * cell[1])
    big = jnp.asarray(rows) @ grid.astype(jnp.float32) @ jnp.asarray(cols).T
    return jax.lax.dynamic_slice(big, (shift[0], shift[1]), (height, width))


def _mask_draws(key: Array, num_masks: int, grid_size: int) -> Array:
    """The uniform draws behind ``num_masks`` masks: [num_masks, grid_size**2 + 2] float32 in [0, 1)."""
    per_mask = grid_size * grid_size + 2
    # Drawn flat and reshaped: XLA compiles the 1-D draw much faster on CPU.
    return jax.random.uniform(key, (num_masks * per_mask,), jnp.float32).reshape(num_masks, per_mask)


def _rise_mask(draws: Array, image_size: tuple[int, int], grid_size: int, p: float) -> Array:
    """One RISE mask [height, width] float32 (Petsiuk et al. 2018, Sec. 3.2) from its draws [grid_size**2 + 2].

    Cell ``j`` is kept where ``draws[j] < p`` (a Bernoulli(p) grid); the crop shift is ``floor(draws[-2:] * C)``,
    uniform in ``[0, C)`` per axis.
    """
    height, width = image_size
    cell = jnp.array([math.ceil(height / grid_size), math.ceil(width / grid_size)], jnp.int32)
    grid = (draws[:-2] < p).astype(jnp.float32).reshape(grid_size, grid_size)
    shift = jnp.minimum(jnp.floor(draws[-2:] * cell.astype(jnp.float32)).astype(jnp.int32), cell - 1)
    return _upsample_crop(grid, shift, image_size)


def rise_masks(key: Array, num_masks: int, image_size: tuple[int, int], *, grid_size: int = 7,
               p: float = 0.5) -> Array:
    """The random masks RISE uses for ``key`` (Petsiuk et al. 2018, Sec. 3.2), e.g. to display or inspect them.

    Args:
      key: a JAX PRNG key.
      num_masks: ``N``.
      image_size: (height, width) in pixels.
      grid_size: ``s``, cells per side of the coarse binary grid (>= 2, at most the image size).
      p: probability of keeping a cell, in (0, 1].

    Returns:
      float32 [num_masks, height, width] in [0, 1]; ``rise`` with the same ``key`` uses exactly these masks.

    Raises:
      ValueError: ``num_masks`` < 1, ``grid_size`` < 2 or larger than the image, ``p`` outside (0, 1], bad
        ``image_size``.
    """
    _check_int("num_masks", num_masks, 1)
    size = _check_mask_args(image_size, grid_size, p)
    draws = _mask_draws(key, int(num_masks), grid_size)
    return jax.vmap(lambda d: _rise_mask(d, size, grid_size, float(p)))(draws)


def rise(
    logits_fn: Callable[[Array], Array],
    key: Array,
    images: Array,
    targets: Array | int | None = None,
    *,
    num_masks: int = 4000,
    grid_size: int = 7,
    p: float = 0.5,
    score: Score = "softmax",
    masks_per_step: int = 100,
    normalize: bool = False,
) -> Array:
    """RISE saliency maps for a batch (Petsiuk et al. 2018, Eq. 6), deterministic for a PRNG key.

    ``S(lambda) = 1 / (N p) sum_i score_c(I . M_i) M_i(lambda)`` over the masks of :func:`rise_masks`; the model
    is only queried forward (a black box), ``N * batch`` times, in chunks of ``masks_per_step * batch`` images.

    Args:
      logits_fn: ``images [batch, height, width, channels] -> logits [batch, num_classes]`` in inference mode
        (e.g. ``functools.partial(module.apply, variables, train=False)``).
      key: a JAX PRNG key (``jax.random.key(0)``); the same key gives the same maps.
      images: [batch, height, width, channels] float (masked pixels become 0, as in the reference code).
      targets: ``None`` (the predicted class on the unmasked image), ``int`` or int [batch].
      num_masks: ``N`` (the paper uses 4000 for ResNet-50 on ImageNet).
      grid_size: ``s`` (paper: 7).
      p: probability of keeping a grid cell (paper: 0.5).
      score: ``"softmax"`` (default: the class probability, as the paper's models output) or ``"logit"``.
      masks_per_step: masks evaluated together in one ``vmap`` (memory vs. speed; the result does not depend on
        it beyond float summation order).
      normalize: per-example min-max normalisation to [0, 1] (a constant map becomes zeros).

    Returns:
      float32 [batch, height, width].

    Raises:
      ValueError: bad image rank, logits not ``[batch, num_classes]``, bad targets, ``num_masks`` or
        ``masks_per_step`` < 1, bad ``grid_size`` / ``p`` (see :func:`rise_masks`), unknown ``score``.
      TypeError: non-float images, non-integer targets, ``logits_fn`` not callable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> logits_fn = lambda x: jnp.stack([x[:, :4, :4].mean((1, 2, 3)), jnp.zeros(x.shape[0])], -1)
      >>> maps = rise(logits_fn, jax.random.key(0), jnp.ones((1, 8, 8, 1)), 0, num_masks=64, grid_size=4,
      ...             score="logit")
      >>> maps.shape
      (1, 8, 8)
    """
    check_images(images)
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be a function images -> logits; got {type(logits_fn).__name__}")
    _check_int("num_masks", num_masks, 1)
    _check_int("masks_per_step", masks_per_step, 1)
    size = _check_mask_args(images.shape[1:3], grid_size, p)
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    batch = images.shape[0]
    logits = logits_fn(images) if targets is None else jax.eval_shape(logits_fn, images)
    _check_logits(logits, batch)
    classes = resolve_targets(targets, logits)

    draws = _mask_draws(key, int(num_masks), grid_size)

    def weighted_mask(i):
        mask = _rise_mask(draws[i], size, grid_size, float(p))
        scores = class_scores(logits_fn(images * mask[None, :, :, None].astype(images.dtype)), classes, score)
        return scores[:, None, None] * mask[None]

    total = _chunked_sum(weighted_mask, int(num_masks), int(masks_per_step))
    maps = total / (num_masks * float(p))
    maps = normalize_maps(maps) if normalize else maps
    return mark_invalid(maps, invalid_examples(images=images, classes=classes, num_classes=logits.shape[-1]))
