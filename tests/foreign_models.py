"""Models written as other codebases write them (test support, not a test module).

They prove that the library trains and explains "foreign" models unmodified: no named ReLU modules, auto-named
submodules, ``axis_name`` BatchNorm, structured outputs, a ``deterministic`` keyword instead of ``train``.

* :class:`FlaxExampleResNet18` - flax's own ``examples/imagenet/models.py`` ResNet V1.5 (google/flax, commit
  18f8f311c275d57f46d95e41b15aa97b454754c0), reproduced faithfully: :class:`ResNetBlock`, :class:`ResNet`, the
  ``conv`` / ``norm`` partials with ``BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
  dtype=self.dtype, axis_name='batch')``, ``__call__(x, train=True)``, stage sizes [2, 2, 2, 2]. Linen auto-names the
  submodules of the top module: ``conv_init``, ``bn_init``, ``ResNetBlock_0`` .. ``ResNetBlock_7``, ``Dense_0``.
  Inside a block: ``Conv_0``, ``BatchNorm_0``, ``Conv_1``, ``BatchNorm_1`` and, where the shape changes
  (``ResNetBlock_2``, ``_4``, ``_6``), ``conv_proj`` / ``norm_proj``. The block's ``__call__`` returns
  ``act(residual + y)``, so **``ResNetBlock_7`` is the last block's post-ReLU output** [b, h/32, w/32, 8 * num_filters]
  (the Grad-CAM layer: :data:`RESNET18_GRAD_CAM_LAYER`) and **``Dense_0`` is the classifier** on its global average
  (:data:`RESNET18_CLASSIFIER`). In train mode its BatchNorm takes a cross-device mean over the axis ``'batch'``: the
  model must run where that axis name is bound (``jax.pmap(..., axis_name='batch')``, or ``jax.vmap`` over a size-1
  axis; the library's ``axis_name="batch"``). ``train=False`` needs no axis.
* :class:`AuxOutputCNN` - a GAP CNN returning ``(logits, {"pre_logits": pooled})`` as big_vision models do; layers
  ``conv1``, ``conv2`` (``nn.Conv``; the post-ReLU feature maps are ``"conv1+relu"``, ``"conv2+relu"``), ``head``.
* :class:`HFStyleCNN` - a GAP CNN returning :class:`HFStyleOutput` (a ``flax.struct`` dataclass with ``logits`` and
  ``pooled_output``, as Hugging Face's output objects), with ``__call__(pixel_values, deterministic=True)``; layers
  ``conv1``, ``conv2`` (``"conv2+relu"``), ``dropout``, ``classifier``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ResNetBlock", "ResNet", "FlaxExampleResNet18", "RESNET18_GRAD_CAM_LAYER", "RESNET18_CLASSIFIER",
           "AuxOutputCNN", "AUX_GRAD_CAM_LAYER", "AUX_CLASSIFIER", "HFStyleOutput", "HFStyleCNN",
           "HF_GRAD_CAM_LAYER", "HF_CLASSIFIER"]

ModuleDef = Any

# ---------------------------------------------------------------------------------------------------------------
# flax examples/imagenet/models.py (Apache 2.0, The Flax Authors), ResNet V1.5 with a basic block; unchanged except
# for type hints and the Bottleneck variant, which is left out.


class ResNetBlock(nn.Module):
    """ResNet block."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: Tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)

        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(residual)
            residual = self.norm(name='norm_proj')(residual)

        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNetV1.5."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name='batch',
        )

        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
        x = norm(name='bn_init')(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        x = jnp.asarray(x, self.dtype)
        return x


#: flax's ``ResNet18``: ``FlaxExampleResNet18(num_classes=10, num_filters=8)`` for a fast test model (the example's
#: default width is 64). Images [batch, height, width, channels] float32 (the example feeds normalised images; any
#: float input works) -> logits [batch, num_classes].
FlaxExampleResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock)
#: The last block's output (post-ReLU), auto-named by linen.
RESNET18_GRAD_CAM_LAYER = "ResNetBlock_7"
#: The classifier on the global average of ``ResNetBlock_7``, auto-named by linen.
RESNET18_CLASSIFIER = "Dense_0"

# ---------------------------------------------------------------------------------------------------------------
# big_vision style: (logits, aux dict).

AUX_GRAD_CAM_LAYER = "conv2+relu"
AUX_CLASSIFIER = "head"


class AuxOutputCNN(nn.Module):
    """conv(16) - ReLU - 2x2 max pool - conv(32) - ReLU - global average pool - dense, returning
    ``(logits, {"pre_logits": pooled})`` like big_vision's models.

    Attributes:
      num_classes: number of logits.
      widths: channels of ``conv1`` and ``conv2``.
      dropout_rate: dropout on the pooled features when ``train`` (needs ``rngs={"dropout": key}``).

    ``__call__(x, train=False)``: x [batch, height, width, channels] float32 in [0, 1] (height, width even) ->
    ``(logits [batch, num_classes], {"pre_logits": [batch, widths[1]]})``. Layers: ``conv1``, ``conv2`` (``nn.Conv``,
    pre-activation), ``"conv2+relu"`` (the Grad-CAM layer), ``dropout``, ``head`` (the classifier).
    """

    num_classes: int
    widths: Sequence[int] = (16, 32)
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = {}
        x = nn.relu(nn.Conv(self.widths[0], (3, 3), name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(self.widths[1], (3, 3), name="conv2")(x))
        out["pre_logits"] = x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        return nn.Dense(self.num_classes, name="head")(x), out


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face style: an output dataclass, ``deterministic`` instead of ``train``.

HF_GRAD_CAM_LAYER = "conv2+relu"
HF_CLASSIFIER = "classifier"


@flax.struct.dataclass
class HFStyleOutput:
    """A model output as Hugging Face's ``FlaxImageClassifierOutput``.

    Attributes:
      logits: [batch, num_classes] float32.
      pooled_output: [batch, features] float32, the pooled features the classifier reads.
    """

    logits: jax.Array
    pooled_output: jax.Array | None = None


class HFStyleCNN(nn.Module):
    """conv(16) - ReLU - 2x2 max pool - conv(32) - ReLU - global average pool - dropout - dense, returning an
    :class:`HFStyleOutput`.

    Attributes:
      num_classes: number of logits.
      widths: channels of ``conv1`` and ``conv2``.
      dropout_rate: dropout on the pooled features unless ``deterministic`` (needs ``rngs={"dropout": key}``).

    ``__call__(pixel_values, deterministic=True)``: pixel_values [batch, height, width, channels] float32 in [0, 1] ->
    :class:`HFStyleOutput`. Layers: ``conv1``, ``conv2`` (pre-activation), ``"conv2+relu"`` (the Grad-CAM layer),
    ``dropout``, ``classifier``.
    """

    num_classes: int
    widths: Sequence[int] = (16, 32)
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        x = nn.relu(nn.Conv(self.widths[0], (3, 3), name="conv1")(pixel_values))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(self.widths[1], (3, 3), name="conv2")(x))
        pooled = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=deterministic, name="dropout")(pooled)
        return HFStyleOutput(logits=nn.Dense(self.num_classes, name="classifier")(x), pooled_output=pooled)
