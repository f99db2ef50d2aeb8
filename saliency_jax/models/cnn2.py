"""CNN-2: the three-conv, two-fc network of Curriculum Dropout (Morerio et al. 2017) and Excitation Dropout.

Bargal 2019, Sec. 5.2.1 (and the authors' code): three 5x5 convolutions (padding 2) with 96, 128 and 256 filters,
each followed by ReLU and 3x3 max pooling with stride 2; a fully-connected layer of 2048 units + ReLU (where dropout
is applied), a second of 2048 units + ReLU, and the classifier; Gaussian initialisation with standard deviation 0.01,
zero biases. Pooling follows Caffe's ceil rounding (``SAME`` padding with -inf), so 32 px inputs give 16, 8, 4 px maps.

``head="gap"`` (not in the thesis; the Decoy MNIST guidance table, ``experiments/configs/decoy_mnist.py:maps``)
replaces the third block's max pooling and the flatten by a global average pool of ``relu_conv3``, so the fc layers
read the spatial mean of the last feature maps: every position of ``relu_conv3`` gets the same gradient, and
Grad-CAM there equals HiResCAM (the CAM of Zhou et al. 2016 when the head is one linear layer).

Layer paths (as :func:`saliency_jax.saliency.linen_layer` and the dropout forward take them):

=================================  ==========================================================================
``conv1`` .. ``conv3``             :class:`~saliency_jax.models.conv.Conv` outputs (pre-activation)
``relu_conv1`` .. ``relu_conv3``   post-ReLU feature maps [batch, h, w, filters]
``fc1``, ``fc2``                   :class:`flax.linen.Dense` outputs (pre-activation) [batch, units]
``relu_fc1``                       post-ReLU ``fc1`` activations [batch, units]: **the dropout point**
``relu_fc2``                       post-ReLU ``fc2`` activations
``fc3``                            the logits [batch, num_classes]
=================================  ==========================================================================

The model itself contains no dropout layer: every dropout scheme (standard, curriculum, Excitation Dropout, ...) is
applied at ``relu_fc1`` by :func:`saliency_jax.training.make_dropout_forward`, so all schemes share one code path.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.models.conv import Conv
from saliency_jax.models.resnet import ReLU

Array = jax.Array

__all__ = ["CNN2", "DROPOUT_LAYER", "DROPOUT_WEIGHTS"]

DROPOUT_LAYER = "relu_fc1"
"""Module path of CNN-2's dropout point (post-ReLU ``fc1`` activations)."""

DROPOUT_WEIGHTS = "fc1"
"""Module path of the dense layer whose units are dropped (its kernel columns are the units' weight vectors)."""


class CNN2(nn.Module):
    """CNN-2 (Morerio et al. 2017; Bargal 2019, Ch. 5).

    Attributes:
      num_classes: classifier outputs.
      conv_features: filters of the three 5x5 convolutions (96, 128, 256 in the thesis).
      fc_features: units of ``fc1`` and ``fc2`` (2048, 2048 in the thesis).
      init_std: standard deviation of the Gaussian weight initialisation (0.01); biases start at 0.
      head: ``"flatten"`` (the thesis: max pool, flatten, ``fc1``) or ``"gap"`` (``relu_conv3`` averaged over its
        positions, no third max pool, then ``fc1``; see the module docstring).
    """

    num_classes: int
    conv_features: Sequence[int] = (96, 128, 256)
    fc_features: Sequence[int] = (2048, 2048)
    init_std: float = 0.01
    head: str = "flatten"

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        """Logits for a batch.

        Args:
          images: [batch, height, width, channels] float32 in [0, 1].
          train: unused (the network has no BatchNorm or dropout layer of its own); accepted for the train loop.

        Returns:
          float32 logits [batch, num_classes].

        Raises:
          ValueError: if ``images`` is not rank 4, the layer counts are not 3 and 2, or ``head`` is unknown.
        """
        del train
        if images.ndim != 4:
            raise ValueError(f"CNN2: images must be [batch, height, width, channels]; got shape {images.shape}")
        if len(self.conv_features) != 3 or len(self.fc_features) != 2:
            raise ValueError(f"CNN2 has 3 conv and 2 hidden fc layers; got conv_features={self.conv_features}, "
                             f"fc_features={self.fc_features}")
        if self.head not in ("flatten", "gap"):
            raise ValueError(f"CNN2: head must be 'flatten' or 'gap'; got {self.head!r}")
        init = nn.initializers.normal(self.init_std)
        x = images.astype(jnp.float32)
        for i, features in enumerate(self.conv_features, start=1):
            x = Conv(int(features), (5, 5), padding=((2, 2), (2, 2)), kernel_init=init, name=f"conv{i}")(x)
            x = ReLU(name=f"relu_conv{i}")(x)
            if self.head == "gap" and i == len(self.conv_features):
                break
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = jnp.mean(x, axis=(1, 2)) if self.head == "gap" else x.reshape(x.shape[0], -1)
        for i, features in enumerate(self.fc_features, start=1):
            x = nn.Dense(int(features), kernel_init=init, name=f"fc{i}")(x)
            x = ReLU(name=f"relu_fc{i}")(x)
        return nn.Dense(self.num_classes, kernel_init=init, name="fc3")(x)
