"""Flax NNX models: a small GAP CNN and the small pre-LN, GAP-pooled Vision Transformer of :mod:`.vit`.

Both are ordinary ``flax.nnx.Module`` s: parameters live in the module, ``module(images)`` returns logits, and the mode
is set with ``module.train()`` / ``module.eval()`` (every ``nnx.Dropout``'s ``deterministic`` and every
``nnx.BatchNorm``'s ``use_running_average``; nothing is hard-coded). Layers are addressed by attribute path, ``"/"``-
joined, list items by index (:func:`saliency_jax.saliency.views.nnx_paths` lists them;
:func:`saliency_jax.saliency.views.nnx_layer` takes them), optionally ``"PATH+ACT"`` for an activation applied as a
function to a submodule's output.

:class:`NNXCNN` - flax's NNX MNIST tutorial CNN (``conv1``, ``conv2``, ``bn``; 32 / 64 channels) made a global average
pooling network so that CAM and the HNC loss apply:

==================  ==================================================================================================
path                output
==================  ==================================================================================================
``conv1``           ``nnx.Conv`` 3x3, 32 channels, [b, h, w, 32] (then ReLU and 2x2 average pooling, as functions)
``conv2``           ``nnx.Conv`` 3x3, 64 channels, [b, h/2, w/2, 64]
``bn``              ``nnx.BatchNorm`` of ``conv2``
``bn+relu``         ``nnx.relu`` of ``bn``: the last convolutional feature map [b, h/2, w/2, 64], the Grad-CAM layer
                    (:data:`NNX_CNN_GRAD_CAM_LAYER`; the ReLU is a function, reached by the ``+relu`` suffix)
``dropout``         ``nnx.Dropout(0.5)`` of the pooled features [b, 64]
``head``            ``nnx.Linear(64, num_classes)``: the classifier (:data:`NNX_CNN_CLASSIFIER`)
==================  ==================================================================================================

:class:`NNXViT` - the same architecture as the linen :class:`saliency_jax.models.vit.ViT` (Dosovitskiy et al. 2021,
pre-LN, no class token, mean of the patch tokens); the blocks are an ``nnx.List``, so their paths are
``blocks/0``, ``blocks/1``, ...:

=============================  =======================================================================================
path                           output
=============================  =======================================================================================
``embedding``                  ``nnx.Conv`` patch embedding, kernel = stride = ``patch_size``, [b, H/p, W/p, hidden]
                               (flattened row-major to tokens and added to the ``nnx.Param`` ``pos_embedding``)
``dropout``                    dropout of the embedded tokens
``blocks/I``                   :class:`NNXEncoderBlock` ``I``: its output tokens [b, tokens, hidden]
``blocks/I/norm1``             ``nnx.LayerNorm`` before attention
``blocks/I/attention``         ``nnx.MultiHeadAttention`` (self-attention, ``decode=False``)
``blocks/I/dropout1``          dropout of the attention output
``blocks/I/norm2``             ``nnx.LayerNorm`` before the MLP
``blocks/I/mlp``               :class:`NNXMlpBlock`
``blocks/I/mlp/fc1``           :class:`NNXGeluLinear`: ``gelu(linear(x))``, the post-activation MLP hidden layer
                               [b, tokens, mlp_dim] (its linear is ``blocks/I/mlp/fc1/linear``)
``blocks/I/mlp/dropout``       dropout of the hidden layer
``blocks/I/mlp/fc2``           ``nnx.Linear`` back to ``hidden_size``
``blocks/I/dropout2``          dropout of the MLP output
``encoder_norm``               final ``nnx.LayerNorm`` [b, tokens, hidden]: the Grad-CAM layer
                               (:data:`NNX_VIT_GRAD_CAM_LAYER`), a grid with 0 prefix tokens
``head``                       ``nnx.Linear`` on the token mean -> logits (:data:`NNX_VIT_CLASSIFIER`)
=============================  =======================================================================================

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> model = NNXCNN(10, rngs=nnx.Rngs(0))
>>> model.eval()
>>> model(jnp.zeros((2, 28, 28, 1))).shape
(2, 10)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

__all__ = ["NNXCNN", "NNXGeluLinear", "NNXMlpBlock", "NNXEncoderBlock", "NNXViT", "NNX_CNN_GRAD_CAM_LAYER",
           "NNX_CNN_CLASSIFIER", "NNX_VIT_GRAD_CAM_LAYER", "NNX_VIT_CLASSIFIER"]

#: Layer path of :class:`NNXCNN`'s last feature map: the ReLU (a function) of the ``bn`` submodule's output.
NNX_CNN_GRAD_CAM_LAYER = "bn+relu"
#: Attribute path of :class:`NNXCNN`'s classifier on the pooled features.
NNX_CNN_CLASSIFIER = "head"
#: Attribute path of :class:`NNXViT`'s final LayerNorm (token activations [batch, tokens, hidden], 0 prefix tokens).
NNX_VIT_GRAD_CAM_LAYER = "encoder_norm"
#: Attribute path of :class:`NNXViT`'s classifier on the mean of the tokens.
NNX_VIT_CLASSIFIER = "head"


def _check_images(x: Array, name: str, channels: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: images must be [batch, height, width, channels], got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        raise ValueError(f"{name}: images have {x.shape[-1]} channels, the model was built for {channels}")


class NNXCNN(nnx.Module):
    """A small GAP CNN in NNX, after flax's NNX MNIST tutorial CNN.

    conv1 (3x3, 32) - ReLU - 2x2 average pool - conv2 (3x3, 64) - BatchNorm ``bn`` - ReLU (the Grad-CAM layer
    ``"bn+relu"``) - global average pool - ``dropout`` (0.5) - ``head`` (linear, the classifier). See the module
    docstring for the layer paths.

    Args:
      num_classes: number of output logits.
      rngs: parameter initialisation and the dropout stream (``nnx.Rngs(0)``; a ``dropout`` stream if given, else the
        default one).
      channels: input channels (1 for MNIST, 3 for CIFAR-10).

    ``__call__(x)``:
      x: [batch, height, width, channels] float32 in [0, 1]; height and width even.
      Returns logits [batch, num_classes] float32. In train mode (``.train()``, the default after construction, as
      flax's layers) BatchNorm uses and updates batch statistics and dropout is active; after ``.eval()`` it uses
      the running averages and no dropout.
    """

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, channels: int = 1):
        self.channels = channels
        self.conv1 = nnx.Conv(channels, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(64, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        _check_images(x, "NNXCNN", self.channels)
        x = nnx.relu(self.conv1(x))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nnx.relu(self.bn(self.conv2(x)))  # "bn+relu": the Grad-CAM layer
        x = jnp.mean(x, axis=(1, 2))
        x = self.dropout(x)
        return self.head(x)


class NNXGeluLinear(nnx.Module):
    """``gelu(linear(x))`` as one module, so that the post-activation MLP hidden layer has a path.

    Args:
      in_features, out_features: widths of the linear layer (the submodule ``linear``).
      rngs: parameter initialisation.

    ``__call__(x)``: x [..., in_features] float32 -> [..., out_features] (tanh-approximate GELU, as the linen ViT).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, out_features, kernel_init=nnx.initializers.xavier_uniform(),
                                 bias_init=nnx.initializers.normal(stddev=1e-6), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return nnx.gelu(self.linear(x))


class NNXMlpBlock(nnx.Module):
    """Transformer MLP: ``fc1`` (linear + GELU) - ``dropout`` - ``fc2`` (linear back to ``hidden_size``).

    ``__call__(x)``: x [batch, tokens, hidden_size] -> [batch, tokens, hidden_size].
    """

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float, *, rngs: nnx.Rngs):
        self.fc1 = NNXGeluLinear(hidden_size, mlp_dim, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, hidden_size, kernel_init=nnx.initializers.xavier_uniform(),
                              bias_init=nnx.initializers.normal(stddev=1e-6), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.dropout(self.fc1(x)))


class NNXEncoderBlock(nnx.Module):
    """Pre-LN encoder block: ``x + dropout1(attention(norm1(x)))``, then ``x + dropout2(mlp(norm2(x)))``.

    ``__call__(x)``: x [batch, tokens, hidden_size] -> [batch, tokens, hidden_size]. The attention has no dropout on
    its weights (as the linen :class:`saliency_jax.models.vit.EncoderBlock`).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, dropout_rate: float, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(hidden_size, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=num_heads, in_features=hidden_size,
                                                kernel_init=nnx.initializers.xavier_uniform(), decode=False,
                                                rngs=rngs)
        self.dropout1 = nnx.Dropout(dropout_rate, rngs=rngs)
        self.norm2 = nnx.LayerNorm(hidden_size, rngs=rngs)
        self.mlp = NNXMlpBlock(hidden_size, mlp_dim, dropout_rate, rngs=rngs)
        self.dropout2 = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        y = self.norm1(x)
        x = x + self.dropout1(self.attention(y))
        return x + self.dropout2(self.mlp(self.norm2(x)))


class NNXViT(nnx.Module):
    """Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") in NNX: pre-LN blocks, no class
    token, mean of the patch tokens (big_vision's ``pool_type='gap'``), the architecture of the linen
    :class:`saliency_jax.models.vit.ViT`. See the module docstring for the layer paths.

    Args:
      num_classes: number of output logits.
      rngs: parameter initialisation and the dropout streams.
      image_size: input height = width (the position embedding has ``(image_size / patch_size) ** 2`` rows).
      channels: input channels.
      patch_size: side of the square patches.
      hidden_size: token width.
      num_layers: encoder blocks (``blocks/0`` ..).
      num_heads: attention heads.
      mlp_dim: MLP hidden width.
      dropout_rate: dropout of the embedded tokens and in the blocks.

    ``__call__(x)``:
      x: [batch, image_size, image_size, channels] float32 in [0, 1].
      Returns logits [batch, num_classes] float32; dropout active in train mode (``.train()``, the default after
      construction), none after ``.eval()``.

    Raises:
      ValueError: ``image_size`` not divisible by ``patch_size`` (at construction), or images of another shape.
    """

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, image_size: int = 32, channels: int = 3,
                 patch_size: int = 4, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
                 mlp_dim: int = 128, dropout_rate: float = 0.1):
        if image_size % patch_size:
            raise ValueError(f"NNXViT: image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        num_tokens = (image_size // patch_size) ** 2
        self.embedding = nnx.Conv(channels, hidden_size, kernel_size=(patch_size, patch_size),
                                  strides=(patch_size, patch_size), padding="VALID", rngs=rngs)
        self.pos_embedding = nnx.Param(
            nnx.initializers.normal(stddev=hidden_size ** -0.5)(rngs.params(), (1, num_tokens, hidden_size)))
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.blocks = nnx.List([NNXEncoderBlock(hidden_size, num_heads, mlp_dim, dropout_rate, rngs=rngs)
                                for _ in range(num_layers)])
        self.encoder_norm = nnx.LayerNorm(hidden_size, rngs=rngs)
        self.head = nnx.Linear(hidden_size, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        _check_images(x, "NNXViT", self.channels)
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"NNXViT: images are {x.shape[1]}x{x.shape[2]}, the model was built for "
                             f"{self.image_size}x{self.image_size}")
        x = self.embedding(x)
        batch, gh, gw, width = x.shape
        x = x.reshape(batch, gh * gw, width) + self.pos_embedding[...]  # row-major patch order
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        x = self.encoder_norm(x)
        return self.head(jnp.mean(x, axis=1))
