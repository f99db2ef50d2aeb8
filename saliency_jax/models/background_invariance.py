"""The networks of background-invariant training (Cruz & Cardoso) and of its "Attention" baseline (Guan et al.).

Cruz, Prates, Simas Filho, Pinto Costa, Cardoso, "Background Invariance by Adversarial Learning", ICPR 2020 (poster:
"Training a CNN to be background invariant"); architectures as in the authors' released ``mymodels.py`` (Keras):

* :class:`VanillaCNN` - the classifier ``f`` (``mymodels.classifier``): ``n = floor(log2(H / 4))`` blocks
  [conv 3x3 ``32 * 2^i`` filters (SAME) + ReLU, max-pool 2x2], flatten, dense 128 + ReLU, dense ``num_classes``
  (logits). 32 px inputs: three blocks, a 4x4x128 map before the dense layers.
* :class:`UNet` - the mask generator ``f_m`` (``mymodels.unet``): the same encoder keeping each block's pre-pool
  ReLU output as a skip, a bottleneck conv, a decoder of [2x nearest upsampling, conv 3x3 + ReLU, concatenation
  with the skip] per block, and a 1x1 conv with a sigmoid: one mask channel in (0, 1).
* :class:`BackgroundGenerator` - the adversarial background generator ``f_b`` (``mymodels.gen``): the image is cut
  into ``tiles x tiles`` tiles; each tile comes from its own noise vector ``z ~ N(0, I)`` reshaped to a small
  ``d x d x C`` map, conv 3x3 with ``32 * 2^k`` filters, then ``k`` times [2x upsampling, conv 3x3 with half the
  filters], LeakyReLU(0.2) after each conv, and a 1x1 conv with a sigmoid to ``C`` channels. For 32x32x1 and 2x2
  tiles: z in R^16 -> 4x4x1 -> conv 128 -> up -> conv 64 -> up -> conv 32 -> 1x1 sigmoid, a 16x16 tile.
* :class:`AttentionCNN` - the "Attention" row of the poster's Table 1: Guan et al., "Diagnose like a radiologist:
  attention guided convolutional neural network for thorax disease classification", arXiv:1801.09927 (2018), as
  the authors re-implemented it in ``train_att.py``: a global CNN ``G`` (a :class:`VanillaCNN`, trained first and
  then frozen) gives the activation maps of its last pooling layer; the channel-wise maximum of their absolute
  values, min-max normalised, is thresholded at ``tau = 0.7``; the bounding box of the largest connected region
  crops the image; a local CNN ``L`` classifies the crop. :func:`attention_crop` does the cropping for a whole
  batch inside ``jit``.

Weights start as in Keras (Glorot-uniform kernels, zero biases), the defaults of the authors' code.

Layer paths (``"/".join(module.path)``, as :func:`saliency_jax.saliency.linen_layer` takes them):

=========================  ============================================================================
:class:`VanillaCNN`        ``conv{i}`` (``nn.Conv``, pre-activation), ``relu{i}`` (post-ReLU map),
                           ``pool{i}`` (after the 2x2 pool), ``i = 1..n``; ``fc1``, ``relu_fc1``,
                           ``fc2`` (logits). For 32 px ``relu3`` [b, 8, 8, 128] is the last conv layer
                           (:func:`grad_cam_layer`); ``pool3`` [b, 4, 4, 128] is the map the Attention
                           baseline thresholds.
:class:`UNet`              ``enc{i}``, ``bottleneck``, ``dec{i}``, ``mask`` (the 1x1 sigmoid conv).
:class:`BackgroundGen.`    ``conv0`` .. ``conv{k}``, ``out``.
:class:`AttentionCNN`      ``global_cnn`` (a :class:`VanillaCNN`), ``local_cnn`` (``conv{j}``, ``relu{j}``,
                           ``j = 1..3``), ``fusion1``, ``fusion2``, ``classifier`` (logits).
=========================  ============================================================================
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.models.resnet import MaxPool, ReLU

Array = jax.Array

__all__ = [
    "VanillaCNN",
    "UNet",
    "BackgroundGenerator",
    "LocalCNN",
    "AttentionCNN",
    "num_blocks",
    "grad_cam_layer",
    "background_noise_shape",
    "sample_background_noise",
    "attention_heatmap",
    "largest_component",
    "attention_boxes",
    "crop_and_resize",
    "attention_crop",
]

KERNEL_INIT = nn.initializers.xavier_uniform()
"""Keras' default ``glorot_uniform`` kernel initialiser (biases start at zero, as Keras' ``zeros``)."""


def num_blocks(size: int) -> int:
    """Number of conv blocks of :class:`VanillaCNN` / :class:`UNet` for an input of ``size`` pixels.

    ``int(log2(size / 4))`` as ``mymodels.py``: 3 for 32 px, 4 for 64 px, 2 for 28 px (the last map is then 7x7).

    Raises:
      ValueError: if ``size < 8`` (no block would remain).
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"the background-invariance networks need inputs of at least 8 px; got {size}")
    return int(math.log2(size / 4))


def grad_cam_layer(size: int) -> str:
    """Module path of :class:`VanillaCNN`'s last convolutional layer (post-ReLU) for ``size``-pixel inputs."""
    return f"relu{num_blocks(size)}"


def _check_images(images: Array, name: str) -> None:
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"{name}: images must be [batch, height, width, channels]; got shape "
                         f"{getattr(images, 'shape', None)}")


def _upsample2(x: Array) -> Array:
    """Keras ``UpSampling2D()``: nearest-neighbour 2x upsampling of [b, h, w, c] -> [b, 2h, 2w, c]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class VanillaCNN(nn.Module):
    """The classifier ``f`` of Cruz & Cardoso (``mymodels.classifier``) and the global CNN of the Attention baseline.

    Attributes:
      num_classes: number of output classes.
      base_features: filters of the first block (32 in the code); block ``i`` has ``base_features * 2^i``.
      dense_features: units of the hidden dense layer (128 in the code).
    """

    num_classes: int
    base_features: int = 32
    dense_features: int = 128

    @nn.compact
    def __call__(self, images: Array, train: bool = False, *, return_features: bool = False):
        """Logits for a batch.

        Args:
          images: [batch, height, width, channels] float32 in [0, 1]; ``height >= 8``.
          train: unused (no BatchNorm or dropout); accepted for the generic train loop.
          return_features: also return the last pooled map (the Attention baseline's heat-map source).

        Returns:
          float32 logits [batch, num_classes]; with ``return_features``, ``(logits, features)`` where features are
          [batch, height / 2^n, width / 2^n, base_features * 2^(n-1)] (n = :func:`num_blocks`).

        Raises:
          ValueError: if ``images`` is not rank 4 or smaller than 8 px.
        """
        del train
        _check_images(images, "VanillaCNN")
        x = images.astype(jnp.float32)
        for i in range(num_blocks(images.shape[1])):
            x = nn.Conv(self.base_features * 2 ** i, (3, 3), padding="SAME", kernel_init=KERNEL_INIT,
                        name=f"conv{i + 1}")(x)
            x = ReLU(name=f"relu{i + 1}")(x)
            x = MaxPool(name=f"pool{i + 1}")(x)
        features = x
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.dense_features, kernel_init=KERNEL_INIT, name="fc1")(x)
        x = ReLU(name="relu_fc1")(x)
        logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name="fc2")(x)
        return (logits, features) if return_features else logits


class UNet(nn.Module):
    """The mask generator ``f_m`` (``mymodels.unet``): a U-Net with a one-channel sigmoid output.

    Attributes:
      base_features: filters of the first encoder block (32 in the code).
    """

    base_features: int = 32

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        """Soft foreground masks.

        Args:
          images: [batch, height, width, channels] float32 in [0, 1]; height and width divisible by ``2^n``
            (n = :func:`num_blocks` of the height).
          train: unused; accepted for symmetry with the classifiers.

        Returns:
          float32 masks [batch, height, width, 1] in (0, 1).

        Raises:
          ValueError: on a bad rank or a size the pooling cannot halve ``n`` times.
        """
        del train
        _check_images(images, "UNet")
        n = num_blocks(images.shape[1])
        if images.shape[1] % 2 ** n or images.shape[2] % 2 ** n:
            raise ValueError(f"UNet: height and width must be divisible by 2^{n}; got {images.shape[1:3]}")
        x = images.astype(jnp.float32)
        skips = []
        for i in range(n):
            x = nn.relu(nn.Conv(self.base_features * 2 ** i, (3, 3), padding="SAME", kernel_init=KERNEL_INIT,
                                name=f"enc{i + 1}")(x))
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(self.base_features * 2 ** (n - 1), (3, 3), padding="SAME", kernel_init=KERNEL_INIT,
                            name="bottleneck")(x))
        for i, skip in enumerate(reversed(skips)):
            x = _upsample2(x)
            x = nn.relu(nn.Conv(self.base_features * 2 ** (n - 1 - i), (3, 3), padding="SAME",
                                kernel_init=KERNEL_INIT, name=f"dec{i + 1}")(x))
            x = jnp.concatenate([x, skip], axis=-1)
        return nn.sigmoid(nn.Conv(1, (1, 1), kernel_init=KERNEL_INIT, name="mask")(x))


def _factors_of_two(a: int) -> int:
    k = 0
    while a % 2 == 0 and a > 0:
        a //= 2
        k += 1
    return k


def _tile_geometry(image_shape: Sequence[int], tiles: int) -> tuple[int, int, int]:
    """``(tile_size, input_size, num_upsamplings)`` of ``mymodels.gen``; raises where the code would break."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (height, width, channels); got {tuple(image_shape)}")
    height, width, _ = (int(s) for s in image_shape)
    tiles = int(tiles)
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1; got {tiles}")
    if height != width:
        raise ValueError(f"BackgroundGenerator needs square images (the code sizes tiles from the height); got "
                         f"{height}x{width}")
    if height % (4 * tiles):  # mymodels.gen: assert (H / (tiles * 2)) % 2 == 0
        raise ValueError(f"image size {height} must be divisible by 4 * tiles = {4 * tiles}")
    tile = height // tiles
    input_size = max(tile // 2 ** _factors_of_two(tile), 4)
    ups = int(math.log2(tile / input_size))
    if input_size * 2 ** ups != tile:
        raise ValueError(f"tile size {tile} (image {height} / {tiles} tiles) is not (odd >= 5) * 2^k or 2^k with "
                         f"k >= 2, so no upsampling ladder from the noise map reaches it; choose other tiles")
    return tile, input_size, ups


def background_noise_shape(image_shape: Sequence[int], tiles: int = 2) -> tuple[int, int, int]:
    """Shape of one image's noise input to :class:`BackgroundGenerator`: ``(tiles, tiles, noise_dim)``.

    ``noise_dim = d * d * channels`` with ``d`` the tile size divided by its largest power of two (at least 4):
    16 for 32x32x1 with 2x2 tiles, 147 for 224x224x3.

    Raises:
      ValueError: on a non-square ``image_shape`` or a size the generator cannot produce.
    """
    _, input_size, _ = _tile_geometry(image_shape, tiles)
    return int(tiles), int(tiles), input_size * input_size * int(image_shape[2])


def sample_background_noise(key: Array, batch: int, image_shape: Sequence[int], tiles: int = 2) -> Array:
    """Standard-normal noise ``z`` for :class:`BackgroundGenerator`, one vector per tile per image.

    Returns:
      float32 [batch, tiles, tiles, noise_dim] (see :func:`background_noise_shape`).
    """
    return jax.random.normal(key, (batch, *background_noise_shape(image_shape, tiles)), jnp.float32)


class BackgroundGenerator(nn.Module):
    """The adversarial background generator ``f_b`` (``mymodels.gen`` applied per tile, ``train3.adv_back``).

    Attributes:
      image_shape: (height, width, channels) of the images (square; height divisible by ``4 * tiles``).
      tiles: tiles per side (2 in the code); each tile has its own noise vector, all tiles share the weights.
      base_features: filters of the last conv before the output (32 in the code); the first has
        ``base_features * 2^k``.
    """

    image_shape: tuple[int, int, int]
    tiles: int = 2
    base_features: int = 32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        """Backgrounds from noise.

        Args:
          z: [batch, tiles, tiles, noise_dim] float32 (:func:`sample_background_noise`); tile ``(r, c)`` of the
            output (rows ``r * tile ..``, columns ``c * tile ..``) is generated from ``z[:, r, c]``.

        Returns:
          float32 backgrounds [batch, height, width, channels] in (0, 1).

        Raises:
          ValueError: if ``z`` does not have shape [batch, *background_noise_shape(image_shape, tiles)].
        """
        tile, d, ups = _tile_geometry(self.image_shape, self.tiles)
        channels = int(self.image_shape[2])
        expected = background_noise_shape(self.image_shape, self.tiles)
        if z.ndim != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"BackgroundGenerator: z must be [batch, {expected[0]}, {expected[1]}, {expected[2]}]; "
                             f"got {z.shape}")
        batch, t = z.shape[0], int(self.tiles)
        x = z.astype(jnp.float32).reshape(batch * t * t, d, d, channels)
        x = nn.leaky_relu(nn.Conv(self.base_features * 2 ** ups, (3, 3), padding="SAME", kernel_init=KERNEL_INIT,
                                  name="conv0")(x), 0.2)
        for i in range(ups):
            x = _upsample2(x)
            x = nn.leaky_relu(nn.Conv(self.base_features * 2 ** (ups - 1 - i), (3, 3), padding="SAME",
                                      kernel_init=KERNEL_INIT, name=f"conv{i + 1}")(x), 0.2)
        x = nn.sigmoid(nn.Conv(channels, (1, 1), kernel_init=KERNEL_INIT, name="out")(x))
        # [b, t_row, t_col, tile, tile, C] -> [b, t_row, tile, t_col, tile, C] -> [b, H, W, C].
        x = x.reshape(batch, t, t, tile, tile, channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, t * tile, t * tile, channels)


# ----------------------------------------------------------------------------------------------------------------
# The Attention baseline (Guan et al. 2018, as in the authors' train_att.py).


def attention_heatmap(features: Array) -> Array:
    """Guan et al.'s heat map: the channel-wise maximum of the absolute activations.

    Args:
      features: [batch, h, w, channels] float, the global CNN's last pooled map.

    Returns:
      float32 [batch, h, w].
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [batch, h, w, channels]; got shape {features.shape}")
    return jnp.max(jnp.abs(features.astype(jnp.float32)), axis=-1)


def largest_component(mask: Array) -> Array:
    """The largest 8-connected region of each binary map (``skimage.measure.label`` connectivity 2).

    Every ``True`` pixel starts with its raster index as label; labels spread as the minimum over the 3x3
    neighbourhood within the mask, ``h * w`` times (enough for any path), so a region's label is the raster index
    of its first pixel, as skimage numbers regions. Ties in size go to the region met first in raster order (as
    ``np.argmax`` over ``np.bincount`` in the authors' code).

    Args:
      mask: bool [batch, h, w].

    Returns:
      bool [batch, h, w], the largest region (all ``False`` where the mask is empty).
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be [batch, h, w]; got shape {mask.shape}")
    batch, h, w = mask.shape
    big = h * w
    mask = mask.astype(bool)
    labels = jnp.where(mask, jnp.arange(big, dtype=jnp.int32).reshape(1, h, w), big)

    def spread(_, lab):
        neigh = jax.lax.reduce_window(lab, big, jax.lax.min, (1, 3, 3), (1, 1, 1), "SAME")
        return jnp.where(mask, neigh, big)

    labels = jax.lax.fori_loop(0, big, spread, labels)
    counts = jax.vmap(lambda lab: jnp.zeros(big + 1, jnp.int32).at[lab.reshape(-1)].add(1))(labels)[:, :big]
    largest = jnp.argmax(counts, axis=-1)
    return mask & (labels == largest[:, None, None])


def attention_boxes(features: Array, image_size: tuple[int, int], threshold: float = 0.7) -> Array:
    """Crop boxes of the Attention baseline, in image pixels, for a whole batch.

    ``train_att.crop_heatmap``: heat map :func:`attention_heatmap`, min-max normalised; ``m = h >= threshold``;
    bounding box ``[r1, r2) x [c1, c2)`` of :func:`largest_component` on the map; image rows
    ``[H * r1 // h, H * r2 // h + 1)`` and columns likewise, clipped to the image. Where the heat map is constant the
    authors skip the example; here the box is the whole image, so the batch keeps its shape.

    Args:
      features: [batch, h, w, channels] float, the global CNN's last pooled map.
      image_size: (height, width) of the images in pixels.
      threshold: ``tau`` (0.7 in the code and in Guan et al.).

    Returns:
      int32 [batch, 4] boxes ``(top, left, bottom, right)``, bottom/right exclusive, ``0 <= top < bottom <= H``.
    """
    height, width = (int(s) for s in image_size)
    heat = attention_heatmap(features)
    _, h, w = heat.shape
    lo = jnp.min(heat, axis=(1, 2), keepdims=True)
    hi = jnp.max(heat, axis=(1, 2), keepdims=True)
    flat = (hi == lo)[:, 0, 0]
    norm = (heat - lo) / jnp.where(hi > lo, hi - lo, 1.0)
    region = largest_component(norm >= threshold)
    rows, cols = jnp.any(region, axis=2), jnp.any(region, axis=1)
    r1 = jnp.argmax(rows, axis=1)
    r2 = h - jnp.argmax(rows[:, ::-1], axis=1)
    c1 = jnp.argmax(cols, axis=1)
    c2 = w - jnp.argmax(cols[:, ::-1], axis=1)
    top = height * r1 // h
    bottom = jnp.minimum(height * r2 // h + 1, height)
    left = width * c1 // w
    right = jnp.minimum(width * c2 // w + 1, width)
    boxes = jnp.stack([top, left, bottom, right], axis=-1).astype(jnp.int32)
    whole = jnp.array([0, 0, height, width], jnp.int32)
    return jnp.where(flat[:, None], whole, boxes)


def _interpolation_matrix(start: Array, stop: Array, size: int, out: int) -> Array:
    """[out, size] bilinear weights resampling pixels [start, stop) to ``out`` samples (half-pixel centres)."""
    length = (stop - start).astype(jnp.float32)
    pos = start + (jnp.arange(out, dtype=jnp.float32) + 0.5) * length / out - 0.5
    pos = jnp.clip(pos, start.astype(jnp.float32), (stop - 1).astype(jnp.float32))
    return jnp.maximum(0.0, 1.0 - jnp.abs(pos[:, None] - jnp.arange(size, dtype=jnp.float32)[None, :]))


def crop_and_resize(images: Array, boxes: Array, size: tuple[int, int]) -> Array:
    """Crops one box per image and resizes it bilinearly to a fixed size (a batched, jittable crop).

    The crop is resampled with half-pixel centres and edge clamping inside the box (as ``PIL`` / ``cv2.resize`` of
    the cropped array), so pixels outside the box never contribute and a box of exactly ``size`` is copied
    unchanged. Guan et al. resize every crop to the network's input size; the authors' Keras code instead feeds
    variable-size crops one image at a time, which ``jit`` cannot batch.

    Args:
      images: [batch, height, width, channels] float.
      boxes: int [batch, 4] ``(top, left, bottom, right)``, bottom/right exclusive, non-empty.
      size: (out_height, out_width) in pixels.

    Returns:
      float32 [batch, out_height, out_width, channels].
    """
    _check_images(images, "crop_and_resize")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be [batch, 4] = [{images.shape[0]}, 4]; got {boxes.shape}")
    out_h, out_w = (int(s) for s in size)
    _, height, width, _ = images.shape
    rows = jax.vmap(lambda b: _interpolation_matrix(b[0], b[2], height, out_h))(boxes)
    cols = jax.vmap(lambda b: _interpolation_matrix(b[1], b[3], width, out_w))(boxes)
    return jnp.einsum("boh,bhwc,bpw->bopc", rows, images.astype(jnp.float32), cols,
                      precision=jax.lax.Precision.HIGHEST)


def attention_crop(images: Array, features: Array, *, threshold: float = 0.7,
                   size: tuple[int, int] | None = None) -> tuple[Array, Array]:
    """The Attention baseline's crops for a batch: :func:`attention_boxes` then :func:`crop_and_resize`.

    Args:
      images: [batch, height, width, channels] float32 in [0, 1].
      features: [batch, h, w, channels'] the global CNN's last pooled map for these images.
      threshold: ``tau``.
      size: output (height, width); default the input size.

    Returns:
      ``(crops [batch, *size, channels] float32, boxes [batch, 4] int32)``.
    """
    _check_images(images, "attention_crop")
    size = tuple(images.shape[1:3]) if size is None else size
    boxes = attention_boxes(features, images.shape[1:3], threshold)
    return crop_and_resize(images, boxes, size), boxes


class LocalCNN(nn.Module):
    """The local branch ``L`` of ``train_att.AttClassifier``: 3x3 convs with stride 2 (SAME) + ReLU, global mean.

    Attributes:
      features: filters of the convs ((128, 256, 512) in the code).
    """

    features: Sequence[int] = (128, 256, 512)

    @nn.compact
    def __call__(self, crops: Array) -> Array:
        """crops: [batch, h, w, channels] -> float32 [batch, features[-1]] (globally averaged)."""
        x = crops.astype(jnp.float32)
        for j, f in enumerate(self.features, start=1):
            x = nn.Conv(int(f), (3, 3), strides=(2, 2), padding="SAME", kernel_init=KERNEL_INIT, name=f"conv{j}")(x)
            x = ReLU(name=f"relu{j}")(x)
        return jnp.mean(x, axis=(1, 2))


class AttentionCNN(nn.Module):
    """Guan et al. 2018's attention-guided CNN as the authors ran it (``train_att.py``): prediction from the crop.

    The global CNN ``G`` (submodule ``global_cnn``) runs on the whole image in inference mode and its features are
    ``stop_gradient``-ed: it is trained first, alone (a :class:`VanillaCNN` step), and frozen while the rest trains
    (:func:`saliency_jax.training.background_invariance.attention_optimizer`). The local CNN ``L`` runs on the
    crop; its pooled features go through dense 2048, dense 256 and the classifier, all linear as in the code.

    The code's model (``fuse_global=True``, the default) concatenates the global branch's globally averaged pooled
    map with ``L``'s features before those dense layers ("Unlike the paper, we train the concatenation of local and
    global branch at the same time"); ``fuse_global=False`` predicts from ``L`` alone, as the poster describes.

    Attributes:
      num_classes: number of classes.
      threshold: ``tau`` of :func:`attention_boxes` (0.7).
      crop_size: (height, width) the crops are resized to; default the input size (Guan et al.).
      fuse_global: concatenate the global features (code) or not (poster text).
      base_features, dense_features: of the global :class:`VanillaCNN`.
      local_features: filters of :class:`LocalCNN`.
      fusion_features: the hidden dense layers ((2048, 256) in the code).
    """

    num_classes: int
    threshold: float = 0.7
    crop_size: tuple[int, int] | None = None
    fuse_global: bool = True
    base_features: int = 32
    dense_features: int = 128
    local_features: Sequence[int] = (128, 256, 512)
    fusion_features: Sequence[int] = (2048, 256)

    @nn.compact
    def __call__(self, images: Array, train: bool = False, *, return_boxes: bool = False):
        """Logits for a batch.

        Args:
          images: [batch, height, width, channels] float32 in [0, 1].
          train: unused; accepted for the generic train loop.
          return_boxes: also return the crop boxes.

        Returns:
          float32 logits [batch, num_classes]; with ``return_boxes``, ``(logits, boxes [batch, 4] int32)``.
        """
        del train
        _check_images(images, "AttentionCNN")
        _, features = VanillaCNN(self.num_classes, self.base_features, self.dense_features, name="global_cnn")(
            images, return_features=True)
        features = jax.lax.stop_gradient(features)
        crops, boxes = attention_crop(images, features, threshold=self.threshold, size=self.crop_size)
        x = LocalCNN(tuple(self.local_features), name="local_cnn")(crops)
        if self.fuse_global:
            x = jnp.concatenate([x, jnp.mean(features, axis=(1, 2))], axis=-1)
        for k, f in enumerate(self.fusion_features, start=1):
            x = nn.Dense(int(f), kernel_init=KERNEL_INIT, name=f"fusion{k}")(x)
        logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name="classifier")(x)
        return (logits, boxes) if return_boxes else logits
