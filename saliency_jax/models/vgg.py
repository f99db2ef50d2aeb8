"""VGG16 (Simonyan & Zisserman 2015, configuration D) in Flax linen, torchvision-compatible.

The network is torchvision's ``vgg16`` (no BatchNorm): thirteen 3x3 convs (pad 1) with ReLU, five 2x2 max pools,
an adaptive average pool to 7x7 (as torchvision's ``AdaptiveAvgPool2d((7, 7))``, exact PyTorch bin edges), then
``fc6`` (4096) - ReLU - dropout 0.5 - ``fc7`` (4096) - ReLU - dropout 0.5 - ``fc8`` (num_classes). At 224 px the
adaptive pool is the identity; any input of at least 32 px works (below 224 px pool5 is upsampled by
replication exactly as in PyTorch), so ImageNet weights apply at every size and tests run at 32 px.

Layer paths (``"/".join(module.path)``); every one runs exactly once per forward pass:

========================================  ======================================================================
path                                      ``__call__`` output
========================================  ======================================================================
``conv1_1`` .. ``conv5_3``                ``Conv`` 3x3, pre-activation (conv ``k`` of block ``s``)
``relu1_1`` .. ``relu5_3``                :class:`ReLU` of the conv; ``relu5_3`` [b, h/16, w/16, 512] is
                                          "the last convolutional layer" for Grad-CAM (Keras
                                          ``block5_conv3``, torchvision ``features.29``)
``pool1`` .. ``pool5``                    :class:`MaxPool` 2x2 stride 2; ``pool5`` [b, h/32, w/32, 512]
``avgpool``                               :class:`AdaptiveAvgPool` [b, 7, 7, 512]
``fc6``, ``fc7``, ``fc8``                 ``nn.Dense`` pre-activation; ``fc8`` are the logits
``relu6``, ``relu7``                      :class:`ReLU`
``drop6``, ``drop7``                      ``nn.Dropout`` (rate 0.5, rng ``"dropout"``, only when ``train``)
========================================  ======================================================================

``fc6`` consumes the pooled map flattened in (height, width, channels) order; torchvision flattens
(channels, height, width) - :func:`saliency_jax.models.weights.import_vgg16` permutes the weight accordingly.

>>> import jax, jax.numpy as jnp
>>> model = VGG16(num_classes=10)
>>> jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((2, 32, 32, 3))).shape
(2, 10)
"""

from __future__ import annotations

import functools
import numbers
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.models.conv import Conv
from saliency_jax.models.resnet import IMAGENET_MEAN, IMAGENET_STD, MaxPool, ReLU, normalize_images

Array = jax.Array

__all__ = ["AdaptiveAvgPool", "VGG", "VGG16", "VGG16_STAGE_DEPTHS", "adaptive_pool_matrix"]

#: convs per stage of VGG16 (configuration D).
VGG16_STAGE_DEPTHS: tuple[int, ...] = (2, 2, 3, 3, 3)

# torchvision's VGG init: conv kaiming normal fan_out (ReLU gain), linear N(0, 0.01), biases 0.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(stddev=0.01)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Averaging matrix of PyTorch's 1-D adaptive average pooling.

    Output bin ``i`` averages inputs ``floor(i * in / out)`` .. ``ceil((i + 1) * in / out) - 1``
    (``torch.nn.AdaptiveAvgPool1d``); bins overlap or repeat inputs when ``in_size`` is not a multiple of
    ``out_size`` or is smaller than it.

    Args:
      in_size: input length (>= 1).
      out_size: output length (>= 1).

    Returns:
      [out_size, in_size] float32; each row sums to 1.

    Raises:
      ValueError: if a size is < 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"adaptive_pool_matrix: sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class AdaptiveAvgPool(nn.Module):
    """Adaptive average pooling to a fixed spatial size (``torch.nn.AdaptiveAvgPool2d``), a linear map.

    Attributes:
      output_size: (height, width) of the output.

    ``__call__(x)``: x [batch, height, width, channels] -> [batch, out_height, out_width, channels], computed
    as ``einsum(P_h, P_w, x)`` with :func:`adaptive_pool_matrix` (identity when the sizes already match).
    """

    output_size: tuple[int, int] = (7, 7)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if tuple(x.shape[1:3]) == tuple(self.output_size):
            return x
        p_h = jnp.asarray(adaptive_pool_matrix(x.shape[1], self.output_size[0]))
        p_w = jnp.asarray(adaptive_pool_matrix(x.shape[2], self.output_size[1]))
        return jnp.einsum("oh,pw,bhwc->bopc", p_h, p_w, x, precision=jax.lax.Precision.HIGHEST)


class VGG(nn.Module):
    """VGG classifier (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks"), torchvision layout.

    See the module docstring for the layer paths.

    Attributes:
      num_classes: number of logits (1000 for ImageNet weights).
      stage_depths: convs per stage; (2, 2, 3, 3, 3) is VGG16. Always five stages (five 2x2 pools).
      stage_features: conv channels per stage; (64, 128, 256, 512, 512) for VGG16 (smaller only for tests).
      fc_features: width of ``fc6``/``fc7`` (4096).
      pool_size: output size of ``avgpool`` (7, 7).
      dropout_rate: dropout after ``relu6`` and ``relu7`` when ``train`` (0.5).
      pixel_mean: [channels] subtracted from the input, in [0, 1] pixel units (ImageNet mean).
      pixel_std: [channels] the input is divided by this, in [0, 1] pixel units (ImageNet std).

    ``__call__(images, train=False)``:
      images: [batch, height, width, channels] float32 in [0, 1], height and width >= 32.
      train: enables dropout (apply with ``rngs={"dropout": key}``).
      Returns logits [batch, num_classes] float32.

    Raises:
      ValueError: images smaller than 32 px, wrong rank/channels, or inconsistent stage settings.
      TypeError: non-float images.
    """

    num_classes: int
    stage_depths: Sequence[int] = VGG16_STAGE_DEPTHS
    stage_features: Sequence[int] = (64, 128, 256, 512, 512)
    fc_features: int = 4096
    pool_size: tuple[int, int] = (7, 7)
    dropout_rate: float = 0.5
    pixel_mean: Sequence[float] = IMAGENET_MEAN
    pixel_std: Sequence[float] = IMAGENET_STD

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        name = type(self).__name__
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, numbers.Integral) \
                or self.num_classes < 1:
            raise ValueError(f"{name}: num_classes must be a positive int, got {self.num_classes!r}")
        if len(self.stage_depths) != 5 or len(self.stage_features) != 5:
            raise ValueError(f"{name}: stage_depths and stage_features need 5 entries, got "
                             f"{self.stage_depths!r} and {self.stage_features!r}")
        x = normalize_images(images, self.pixel_mean, self.pixel_std, name)
        if x.shape[1] < 32 or x.shape[2] < 32:
            raise ValueError(f"{name}: images must be at least 32x32 (five 2x2 max pools), got "
                             f"{x.shape[1]}x{x.shape[2]}")
        for s, (depth, features) in enumerate(zip(self.stage_depths, self.stage_features), start=1):
            for k in range(1, int(depth) + 1):
                x = Conv(int(features), (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init,
                            dtype=jnp.float32, param_dtype=jnp.float32, name=f"conv{s}_{k}")(x)
                x = ReLU(name=f"relu{s}_{k}")(x)
            x = MaxPool(window=(2, 2), strides=(2, 2), name=f"pool{s}")(x)
        x = AdaptiveAvgPool(tuple(self.pool_size), name="avgpool")(x)
        x = x.reshape(x.shape[0], -1)
        for layer in (6, 7):
            x = nn.Dense(self.fc_features, kernel_init=_dense_init, dtype=jnp.float32, param_dtype=jnp.float32,
                         name=f"fc{layer}")(x)
            x = ReLU(name=f"relu{layer}")(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop{layer}")(x)
        return nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=jnp.float32, param_dtype=jnp.float32,
                        name="fc8")(x)


#: VGG16 (configuration D, no BatchNorm). ``VGG16(num_classes)``.
VGG16 = functools.partial(VGG, stage_depths=VGG16_STAGE_DEPTHS, stage_features=(64, 128, 256, 512, 512),
                          fc_features=4096)
