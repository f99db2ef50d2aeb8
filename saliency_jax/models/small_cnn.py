"""A small CNN for 28-32 px images (digits, MNIST, CIFAR-10), with addressable layers.

Layer paths (as :func:`saliency_jax.saliency.linen_layer` takes them): ``conv1``, ``conv2``, ``conv3`` - each a
:class:`ConvBlock` whose output is the post-ReLU feature map - and ``fc`` (the classifier). ``conv3`` is the last
convolutional layer, the default Grad-CAM layer.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.models.conv import Conv


class ConvBlock(nn.Module):
    """3x3 convolution, optional BatchNorm, ReLU.

    Attributes:
      features: output channels.
      use_batchnorm: add BatchNorm (batch statistics when ``train``, running averages otherwise).
    """

    features: int
    use_batchnorm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [batch, h, w, c_in] -> [batch, h, w, features] float32, post-ReLU."""
        x = Conv(self.features, (3, 3), padding="SAME", use_bias=not self.use_batchnorm, name="conv")(x)
        if self.use_batchnorm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
        return nn.relu(x)


class SmallCNN(nn.Module):
    """conv(32) - pool - conv(64) - pool - conv(128) - global average pool - dense(num_classes).

    Attributes:
      num_classes: number of output classes.
      widths: channels of ``conv1``..``conv3``.
      use_batchnorm: BatchNorm in each block.
    """

    num_classes: int
    widths: Sequence[int] = (32, 64, 128)
    use_batchnorm: bool = True

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch.

        Args:
          images: [batch, height, width, channels] float32 in [0, 1]; height and width divisible by 4.
          train: use batch statistics (and update the running averages, ``mutable=["batch_stats"]``).

        Returns:
          float32 logits [batch, num_classes].
        """
        x = images
        for i, width in enumerate(self.widths):
            if i > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = ConvBlock(width, self.use_batchnorm, name=f"conv{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)
