"""ResNet (He et al. 2016) in Flax linen, laid out like torchvision's so ImageNet weights import by name.

The architecture is torchvision's ResNet v1.5: the stride of a downsampling Bottleneck sits on its 3x3 conv
(``conv2``), not on the first 1x1 conv as in the original paper; BasicBlock strides on ``conv1``. Padding is
explicit and symmetric (as PyTorch's), so a torchvision state dict gives the same logits here
(:mod:`saliency_jax.models.weights`).

Layer paths (``"/".join(module.path)``, what :func:`saliency_jax.saliency.core.linen_layer` and
:func:`flax.linen.intercept_methods` address); every one runs exactly once per forward pass:

==========================  ==========================================================================
path                        ``__call__`` output
==========================  ==========================================================================
``conv1``                   7x7 stride-2 conv, [b, h/2, w/2, 64] (no bias)
``bn1``                     BatchNorm of ``conv1``
``relu``                    :class:`ReLU` of ``bn1``
``maxpool``                 :class:`MaxPool` 3x3 stride 2 pad 1, [b, h/4, w/4, 64]
``layer1`` .. ``layer4``    :class:`ResNetStage`: the stage output, i.e. the last block's final ReLU;
                            [b, h/4, w/4, 64e], [b, h/8, w/8, 128e], [b, h/16, w/16, 256e],
                            [b, h/32, w/32, 512e] with expansion e = 1 (BasicBlock) or 4 (Bottleneck).
                            ``layer4`` is "the last convolutional layer" of Grad-CAM (Keras
                            ``conv5_block3_out``); ``layer3`` is where Excitation Backprop is read.
``layerS/i``                block ``i`` (0-based, as torchvision's ``layerS.i``): the block output
``layerS/i/conv1`` ..       convs of the block (``conv3`` only in Bottleneck), bias-free
``layerS/i/bn1`` ..         their BatchNorms
``layerS/i/relu1`` ..       :class:`ReLU` after ``bn1`` (and ``bn2`` in Bottleneck): ``relu1``, ``relu2``
``layerS/i/downsample``     :class:`Downsample` shortcut (1x1 strided conv ``0`` + BatchNorm ``1``, as
                            torchvision's ``downsample.0`` / ``downsample.1``), only where the block
                            changes stride or width
``layerS/i/add``            :class:`ResidualAdd`: ``residual + shortcut`` (before the final ReLU)
``layerS/i/relu_out``       :class:`ReLU` of ``add``: the block output
``avgpool``                 :class:`GlobalAvgPool`: [b, 512e] (already flattened, unlike torchvision)
``fc``                      ``nn.Dense`` logits [b, num_classes]
==========================  ==========================================================================

Excitation Backprop (Zhang et al. 2016) needs to recognise the two non-parametric linear operations that are
not convs/denses: the residual sum is always a :class:`ResidualAdd` module and the global average pool a
:class:`GlobalAvgPool` module (match on ``type(context.module)`` in an interceptor); max pooling is a
:class:`MaxPool` module and every ReLU a :class:`ReLU` module.

Constructors: :data:`ResNet18`, :data:`ResNet34`, :data:`ResNet50`, :data:`ResNet101`, :data:`ResNet152`
(``functools.partial`` of :class:`ResNet`, as in flax's ImageNet example), e.g. ``ResNet50(num_classes=196)``.

>>> import jax, jax.numpy as jnp
>>> model = ResNet18(num_classes=10)
>>> variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
>>> jax.jit(model.apply)(variables, jnp.zeros((2, 32, 32, 3))).shape
(2, 10)
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.models.conv import Conv

Array = jax.Array

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BN_MOMENTUM",
    "BN_EPSILON",
    "ReLU",
    "MaxPool",
    "ResidualAdd",
    "GlobalAvgPool",
    "Downsample",
    "BasicBlock",
    "Bottleneck",
    "ResNetStage",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "normalize_images",
]

#: ImageNet channel mean and standard deviation in [0, 1] pixel units (torchvision's normalisation), RGB order.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: BatchNorm settings equal to torchvision's (PyTorch momentum 0.1 == Flax momentum 0.9; eps 1e-5).
BN_MOMENTUM: float = 0.9
BN_EPSILON: float = 1e-5

# torchvision's conv init: kaiming normal, fan_out, ReLU gain (not truncated).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torchvision's nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def normalize_images(images: Array, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                     model_name: str) -> Array:
    """Checks model input and applies per-channel normalisation ``(images - pixel_mean) / pixel_std``.

    Args:
      images: [batch, height, width, channels] floating point in [0, 1].
      pixel_mean: [channels] mean in [0, 1] pixel units.
      pixel_std: [channels] standard deviation in [0, 1] pixel units.
      model_name: used in error messages.

    Returns:
      [batch, height, width, channels] float32, normalised.

    Raises:
      ValueError: if ``images`` is not rank 4 or its channel count differs from ``len(pixel_mean)``.
      TypeError: if ``images`` is not floating point (e.g. uint8 in [0, 255]).
    """
    if images.ndim != 4:
        raise ValueError(f"{model_name}: images must be [batch, height, width, channels], got shape "
                         f"{tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"{model_name}: images must be floating point in [0, 1], got dtype {images.dtype} "
                        "(convert uint8 images with images / 255.0)")
    if len(pixel_mean) != len(pixel_std):
        raise ValueError(f"{model_name}: pixel_mean has {len(pixel_mean)} entries but pixel_std has "
                         f"{len(pixel_std)}")
    if images.shape[-1] != len(pixel_mean):
        raise ValueError(f"{model_name}: images have {images.shape[-1]} channels but pixel_mean/pixel_std "
                         f"have {len(pixel_mean)}")
    mean = jnp.asarray(pixel_mean, jnp.float32)
    std = jnp.asarray(pixel_std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


class ReLU(nn.Module):
    """Rectified linear unit as a named module, so its output can be intercepted.

    ``__call__(x)``: x [...] float -> [...] ``max(x, 0)``.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.relu(x)


class MaxPool(nn.Module):
    """Max pooling as a named module (PyTorch semantics: padding is -inf, output size rounds down).

    Attributes:
      window: (height, width) of the pooling window.
      strides: (height, width) strides.
      padding: symmetric padding in pixels per spatial side.

    ``__call__(x)``: x [batch, height, width, channels] -> [batch, height', width', channels] with
    ``height' = floor((height + 2 * padding - window) / stride) + 1``.
    """

    window: tuple[int, int] = (2, 2)
    strides: tuple[int, int] = (2, 2)
    padding: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        return nn.max_pool(x, self.window, strides=self.strides, padding=pad)


class ResidualAdd(nn.Module):
    """The residual sum of a ResNet block, ``residual + shortcut`` (He et al. 2016, Eq. 1), as a named module.

    ``__call__(residual, shortcut)``: both [batch, height, width, channels] -> their sum (same shape).
    ``residual`` is the output of the block's last BatchNorm; ``shortcut`` the block input or its
    :class:`Downsample`. The final ReLU of the block is applied after this module (``relu_out``).
    """

    @nn.compact
    def __call__(self, residual: Array, shortcut: Array) -> Array:
        return residual + shortcut


class GlobalAvgPool(nn.Module):
    """Global average pooling as a named module: mean over the spatial axes.

    ``__call__(x)``: x [batch, height, width, channels] -> [batch, channels] (flattened).
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return jnp.mean(x, axis=(1, 2))


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def _conv(features: int, kernel: int, stride: int, padding: int, name: str, use_bias: bool = False) -> Conv:
    return Conv(features, (kernel, kernel), strides=(stride, stride),
                padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                kernel_init=conv_kernel_init, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class Downsample(nn.Module):
    """Projection shortcut: 1x1 strided conv (submodule ``0``) then BatchNorm (submodule ``1``).

    Names mirror torchvision's ``downsample.0`` / ``downsample.1``.

    Attributes:
      features: output channels.
      stride: spatial stride.

    ``__call__(x, train)``: x [batch, height, width, in_channels] -> [batch, height/stride, width/stride, features].
    """

    features: int
    stride: int

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _conv(self.features, 1, self.stride, 0, name="0")(x)
        return _batch_norm(train, "1")(x)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: 3x3 conv (strided) - BN - ReLU - 3x3 conv - BN, + shortcut, ReLU.

    Attributes:
      features: channels of both convs (the block's output channels; expansion 1).
      stride: stride of ``conv1`` and of the shortcut.

    ``__call__(x, train)``: x [batch, height, width, in_channels] ->
    [batch, ceil(height/stride), ceil(width/stride), features].
    """

    features: int
    stride: int = 1

    expansion = 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        shortcut = x
        y = _conv(self.features, 3, self.stride, 1, "conv1")(x)
        y = _batch_norm(train, "bn1")(y)
        y = ReLU(name="relu1")(y)
        y = _conv(self.features, 3, 1, 1, "conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = Downsample(self.features, self.stride, name="downsample")(x, train)
        y = ResidualAdd(name="add")(y, shortcut)
        return ReLU(name="relu_out")(y)


class Bottleneck(nn.Module):
    """ResNet-50/101/152 block (torchvision v1.5): 1x1 - BN - ReLU - 3x3 (strided) - BN - ReLU - 1x1 - BN,
    + shortcut, ReLU.

    Attributes:
      features: channels of the 1x1 and 3x3 convs; the block outputs ``4 * features`` channels.
      stride: stride of ``conv2`` (the 3x3) and of the shortcut.

    ``__call__(x, train)``: x [batch, height, width, in_channels] ->
    [batch, ceil(height/stride), ceil(width/stride), 4 * features].
    """

    features: int
    stride: int = 1

    expansion = 4

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        out_features = self.features * self.expansion
        shortcut = x
        y = _conv(self.features, 1, 1, 0, "conv1")(x)
        y = _batch_norm(train, "bn1")(y)
        y = ReLU(name="relu1")(y)
        y = _conv(self.features, 3, self.stride, 1, "conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        y = ReLU(name="relu2")(y)
        y = _conv(out_features, 1, 1, 0, "conv3")(y)
        y = _batch_norm(train, "bn3")(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            shortcut = Downsample(out_features, self.stride, name="downsample")(x, train)
        y = ResidualAdd(name="add")(y, shortcut)
        return ReLU(name="relu_out")(y)


class ResNetStage(nn.Module):
    """One stage (torchvision ``layerS``): ``num_blocks`` blocks named ``0`` .. ``num_blocks - 1``.

    Attributes:
      block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
      num_blocks: number of blocks.
      features: the blocks' ``features``.
      stride: stride of the first block (the others use 1).

    ``__call__(x, train)``: x [batch, height, width, channels] -> the last block's output
    [batch, height/stride, width/stride, features * block_cls.expansion].
    """

    block_cls: Any
    num_blocks: int
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        for i in range(self.num_blocks):
            x = self.block_cls(self.features, self.stride if i == 0 else 1, name=str(i))(x, train)
        return x


class ResNet(nn.Module):
    """ResNet image classifier (He et al. 2016, "Deep Residual Learning for Image Recognition"), torchvision layout.

    See the module docstring for the layer paths.

    Attributes:
      num_classes: number of output logits (1000 for ImageNet weights).
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
      block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
      num_filters: width of the stem and of ``layer1`` (64 in every ImageNet ResNet); stage ``s`` uses
        ``num_filters * 2**s``. Smaller values only for tests.
      pixel_mean: [channels] subtracted from the input, in [0, 1] pixel units (ImageNet mean).
      pixel_std: [channels] the input is divided by this, in [0, 1] pixel units (ImageNet std).

    ``__call__(images, train=False)``:
      images: [batch, height, width, channels] float32 in [0, 1].
      train: BatchNorm uses batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``) when True, running averages when False.
      Returns logits [batch, num_classes] float32.

    Raises:
      ValueError: bad ``num_classes``/``stage_sizes`` or image shape; TypeError: non-float images.
    """

    num_classes: int
    stage_sizes: Sequence[int]
    block_cls: Any
    num_filters: int = 64
    pixel_mean: Sequence[float] = IMAGENET_MEAN
    pixel_std: Sequence[float] = IMAGENET_STD

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        name = type(self).__name__
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, numbers.Integral) \
                or self.num_classes < 1:
            raise ValueError(f"{name}: num_classes must be a positive int, got {self.num_classes!r}")
        if len(self.stage_sizes) != 4 or any(int(n) < 1 for n in self.stage_sizes):
            raise ValueError(f"{name}: stage_sizes must be 4 positive ints, got {self.stage_sizes!r}")
        x = normalize_images(images, self.pixel_mean, self.pixel_std, name)
        x = _conv(self.num_filters, 7, 2, 3, "conv1")(x)
        x = _batch_norm(train, "bn1")(x)
        x = ReLU(name="relu")(x)
        x = MaxPool(window=(3, 3), strides=(2, 2), padding=1, name="maxpool")(x)
        for s, num_blocks in enumerate(self.stage_sizes):
            x = ResNetStage(self.block_cls, int(num_blocks), self.num_filters * 2**s, 1 if s == 0 else 2,
                            name=f"layer{s + 1}")(x, train)
        x = GlobalAvgPool(name="avgpool")(x)
        return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, dtype=jnp.float32,
                        param_dtype=jnp.float32, name="fc")(x)


#: ResNet-18: BasicBlock, (2, 2, 2, 2). ``ResNet18(num_classes)``.
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
#: ResNet-34: BasicBlock, (3, 4, 6, 3).
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
#: ResNet-50 (v1.5): Bottleneck, (3, 4, 6, 3).
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
#: ResNet-101 (v1.5): Bottleneck, (3, 4, 23, 3).
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
#: ResNet-152 (v1.5): Bottleneck, (3, 8, 36, 3).
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
