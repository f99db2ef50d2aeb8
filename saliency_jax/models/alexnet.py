"""AlexNet (Krizhevsky, Sutskever & Hinton 2012) in Flax linen, torchvision-compatible.

The network is torchvision's ``alexnet`` (the one-tower "One weird trick" variant, Krizhevsky 2014, without local
response normalisation): ``conv1`` 64 11x11 stride 4 pad 2 - ReLU - 3x3/2 max pool - ``conv2`` 192 5x5 pad 2 -
ReLU - 3x3/2 max pool - ``conv3`` 384 3x3 pad 1 - ReLU - ``conv4`` 256 3x3 pad 1 - ReLU - ``conv5`` 256 3x3 pad 1 -
ReLU - 3x3/2 max pool - adaptive average pool to 6x6 (torchvision's ``AdaptiveAvgPool2d((6, 6))``, exact PyTorch
bin edges) - dropout 0.5 - ``fc6`` (4096) - ReLU - dropout 0.5 - ``fc7`` (4096) - ReLU - ``fc8`` (num_classes).
Note torchvision's dropout placement: *before* ``fc6`` and ``fc7`` (Caffe's AlexNet drops after ``relu6`` and
``relu7``). At 224 px pool5 is 6x6 and the adaptive pool is the identity; any input of at least 63 px works
(below 224 px pool5 is upsampled by replication exactly as in PyTorch), so ImageNet weights apply at every size
and tests run at 64 px.

Layer paths (``"/".join(module.path)``); every one runs exactly once per forward pass (shapes at 224 px):

========================================  ======================================================================
path                                      ``__call__`` output
========================================  ======================================================================
``conv1`` .. ``conv5``                    ``Conv``, pre-activation (torchvision ``features.0/3/6/8/10``)
``relu1`` .. ``relu5``                    :class:`ReLU` of the conv; ``relu5`` [b, 13, 13, 256] is "the last
                                          convolutional layer" for Grad-CAM (torchvision ``features.11``)
``pool1``, ``pool2``, ``pool5``           :class:`MaxPool` 3x3 stride 2; [b, 27, 27, 64], [b, 13, 13, 192],
                                          [b, 6, 6, 256]
``avgpool``                               :class:`AdaptiveAvgPool` [b, 6, 6, 256]
``drop5``                                 ``nn.Dropout`` of the flattened ``avgpool`` [b, 9216], before ``fc6``
                                          (torchvision ``classifier.0``)
``fc6``, ``fc7``, ``fc8``                 ``nn.Dense`` pre-activation (``classifier.1/4/6``); ``fc8`` are the
                                          logits
``relu6``, ``relu7``                      :class:`ReLU`
``drop6``                                 ``nn.Dropout`` of ``relu6``, before ``fc7`` (``classifier.3``)
========================================  ======================================================================

Both dropouts have rate ``dropout_rate`` (0.5), use rng ``"dropout"`` and act only when ``train``.

``fc6`` consumes the pooled map flattened in (height, width, channels) order; torchvision flattens
(channels, height, width) - :func:`saliency_jax.models.weights.import_alexnet` permutes the weight accordingly.

>>> import jax, jax.numpy as jnp
>>> model = AlexNet(num_classes=10)
>>> jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((2, 64, 64, 3))).shape
(2, 10)
"""

from __future__ import annotations

import numbers
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.models.conv import Conv
from saliency_jax.models.resnet import IMAGENET_MEAN, IMAGENET_STD, MaxPool, ReLU, normalize_images
from saliency_jax.models.vgg import AdaptiveAvgPool

Array = jax.Array

__all__ = ["AlexNet", "ALEXNET_CONVS", "ALEXNET_MIN_SIZE", "alexnet_pool5_size"]

#: (kernel size, stride, padding) of conv1..conv5 (torchvision ``alexnet``).
ALEXNET_CONVS: tuple[tuple[int, int, int], ...] = ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))

#: smallest input side (pixels) for which every 3x3/2 max pool sees at least one full window.
ALEXNET_MIN_SIZE: int = 63

# Convs followed by a 3x3 stride-2 max pool (named pool1, pool2, pool5).
_POOLED = {1: "pool1", 2: "pool2", 5: "pool5"}

# torchvision's AlexNet keeps PyTorch's default init: weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (biases zero here).
_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def alexnet_pool5_size(size: int) -> int:
    """Side of AlexNet's ``pool5`` map for an input side of ``size`` pixels (PyTorch floor rounding).

    Args:
      size: input height or width in pixels.

    Returns:
      ``pool5`` side (6 at 224 px, 1 at 63 px); values < 1 mean the input is too small.
    """
    x = size
    for i, (k, s, p) in enumerate(ALEXNET_CONVS, start=1):
        x = (x + 2 * p - k) // s + 1
        if i in _POOLED:
            x = (x - 3) // 2 + 1 if x >= 3 else 0
    return x


class AlexNet(nn.Module):
    """AlexNet classifier (Krizhevsky et al. 2012, "ImageNet Classification with Deep CNNs"), torchvision layout.

    See the module docstring for the layer paths.

    Attributes:
      num_classes: number of logits (1000 for ImageNet weights).
      conv_features: channels of conv1..conv5; (64, 192, 384, 256, 256) for AlexNet (smaller only for tests).
      fc_features: width of ``fc6``/``fc7`` (4096).
      pool_size: output size of ``avgpool`` (6, 6).
      dropout_rate: dropout before ``fc6`` (``drop5``) and after ``relu6`` (``drop6``) when ``train`` (0.5).
      pixel_mean: [channels] subtracted from the input, in [0, 1] pixel units (ImageNet mean).
      pixel_std: [channels] the input is divided by this, in [0, 1] pixel units (ImageNet std).

    ``__call__(images, train=False)``:
      images: [batch, height, width, channels] float32 in [0, 1], height and width >= 63.
      train: enables dropout (apply with ``rngs={"dropout": key}``).
      Returns logits [batch, num_classes] float32.

    Raises:
      ValueError: images smaller than 63 px, wrong rank/channels, bad ``num_classes`` or ``conv_features``.
      TypeError: non-float images.
    """

    num_classes: int
    conv_features: Sequence[int] = (64, 192, 384, 256, 256)
    fc_features: int = 4096
    pool_size: tuple[int, int] = (6, 6)
    dropout_rate: float = 0.5
    pixel_mean: Sequence[float] = IMAGENET_MEAN
    pixel_std: Sequence[float] = IMAGENET_STD

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        name = type(self).__name__
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, numbers.Integral) \
                or self.num_classes < 1:
            raise ValueError(f"{name}: num_classes must be a positive int, got {self.num_classes!r}")
        if len(self.conv_features) != len(ALEXNET_CONVS):
            raise ValueError(f"{name}: conv_features needs {len(ALEXNET_CONVS)} entries (conv1..conv5), got "
                             f"{self.conv_features!r}")
        x = normalize_images(images, self.pixel_mean, self.pixel_std, name)
        if x.shape[1] < ALEXNET_MIN_SIZE or x.shape[2] < ALEXNET_MIN_SIZE:
            raise ValueError(f"{name}: images must be at least {ALEXNET_MIN_SIZE}x{ALEXNET_MIN_SIZE} (stride-4 "
                             f"conv1 and three 3x3/2 max pools), got {x.shape[1]}x{x.shape[2]}")
        for i, (features, (k, s, p)) in enumerate(zip(self.conv_features, ALEXNET_CONVS), start=1):
            x = Conv(int(features), (k, k), strides=(s, s), padding=((p, p), (p, p)), kernel_init=_kernel_init,
                     dtype=jnp.float32, param_dtype=jnp.float32, name=f"conv{i}")(x)
            x = ReLU(name=f"relu{i}")(x)
            if i in _POOLED:
                x = MaxPool(window=(3, 3), strides=(2, 2), name=_POOLED[i])(x)
        x = AdaptiveAvgPool(tuple(self.pool_size), name="avgpool")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="drop5")(x)
        x = nn.Dense(self.fc_features, kernel_init=_kernel_init, dtype=jnp.float32, param_dtype=jnp.float32,
                     name="fc6")(x)
        x = ReLU(name="relu6")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="drop6")(x)
        x = nn.Dense(self.fc_features, kernel_init=_kernel_init, dtype=jnp.float32, param_dtype=jnp.float32,
                     name="fc7")(x)
        x = ReLU(name="relu7")(x)
        return nn.Dense(self.num_classes, kernel_init=_kernel_init, dtype=jnp.float32, param_dtype=jnp.float32,
                        name="fc8")(x)
