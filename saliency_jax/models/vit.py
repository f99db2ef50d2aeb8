"""A small Vision Transformer (Dosovitskiy et al. 2021) in Flax linen, pooled by global average pooling.

The architecture is the ViT of "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(Dosovitskiy et al., ICLR 2021) with pre-LN encoder blocks, laid out as big_vision's ``vit.py`` with
``pool_type='gap'``: there is **no class token**; the image is classified from the mean of the patch tokens after the
final LayerNorm. The classifier is therefore a dense layer on globally average-pooled features, exactly like a GAP
CNN's: ``head`` applied to each token gives a class activation map (CAM, Zhou et al. 2016) over the patch grid whose
spatial mean is the logit, so CAM, Grad-CAM and the HNC loss apply unchanged once the tokens are read as a grid.

Tokens are ``[batch, (H/p) * (W/p), hidden_size]`` in row-major patch order (the order of the patch embedding's
output grid), so ``tokens.reshape(batch, H/p, W/p, hidden_size)`` is the spatial grid;
:func:`saliency_jax.saliency.views.token_grid` with ``num_prefix_tokens=0`` does this reshape.

Layer paths (``"/".join(module.path)``, what :func:`saliency_jax.saliency.core.apply_with_layers` and
:func:`saliency_jax.saliency.linen_layer` take); every one runs exactly once per forward pass:

==============================  ======================================================================================
path                            ``__call__`` output
==============================  ======================================================================================
``embedding``                   patch embedding: conv, kernel = stride = ``patch_size``, [b, H/p, W/p, hidden]
                                (flattened to tokens [b, (H/p)(W/p), hidden] and added to the parameter
                                ``pos_embedding`` [1, (H/p)(W/p), hidden], a variable of the top module, not a layer)
``dropout``                     dropout of the embedded tokens
``blockI``                      :class:`EncoderBlock` ``I`` (``block0`` .. ``block{num_layers-1}``): its output tokens
``blockI/norm1``                LayerNorm before attention
``blockI/attention``            ``nn.MultiHeadDotProductAttention`` (self-attention), [b, tokens, hidden]
``blockI/dropout1``             dropout of the attention output (added to the residual stream after it)
``blockI/norm2``                LayerNorm before the MLP
``blockI/mlp``                  :class:`MlpBlock`: [b, tokens, hidden]
``blockI/mlp/fc1``              :class:`GeluDense`: ``gelu(Dense(mlp_dim)(x))``, the post-activation MLP hidden layer
                                [b, tokens, mlp_dim] (its dense is ``blockI/mlp/fc1/dense``)
``blockI/mlp/dropout``          dropout of the hidden layer
``blockI/mlp/fc2``              ``nn.Dense`` back to ``hidden_size``
``blockI/dropout2``             dropout of the MLP output (added to the residual stream after it)
``encoder_norm``                final LayerNorm, [b, tokens, hidden]: the Grad-CAM layer (:data:`VIT_GRAD_CAM_LAYER`),
                                read as a grid with 0 prefix tokens
``head``                        ``nn.Dense`` on the token mean [b, hidden] -> logits [b, num_classes]
                                (:data:`VIT_CLASSIFIER`)
==============================  ======================================================================================

Dropout (every ``nn.Dropout``, deterministic unless ``train``) needs ``rngs={"dropout": key}`` when ``train=True``.

>>> import jax, jax.numpy as jnp
>>> model = ViT(num_classes=10)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
>>> model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape
(2, 10)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.models.conv import Conv

Array = jax.Array

__all__ = ["GeluDense", "MlpBlock", "EncoderBlock", "ViT", "VIT_GRAD_CAM_LAYER", "VIT_CLASSIFIER"]

#: Module path of the ViT's final LayerNorm, the token activations [batch, tokens, hidden] Grad-CAM / CAM read (as a
#: grid: ``token_grid(num_prefix_tokens=0)``).
VIT_GRAD_CAM_LAYER = "encoder_norm"
#: Module path of the ViT's classifier, the dense layer on the mean of the ``encoder_norm`` tokens.
VIT_CLASSIFIER = "head"

# big_vision's initialisers: xavier-uniform dense kernels in the MLP, tiny normal biases.
_mlp_kernel_init = nn.initializers.xavier_uniform()
_mlp_bias_init = nn.initializers.normal(stddev=1e-6)


class GeluDense(nn.Module):
    """A dense layer followed by GELU, as one module so that its post-activation output has a path.

    Attributes:
      features: output width.

    ``__call__(x)``: x [..., d_in] float32 -> ``gelu(Dense(features)(x))`` [..., features] (tanh-approximate GELU,
    ``nn.gelu``'s default as in big_vision). The dense is the submodule ``dense``.
    """

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.features, kernel_init=_mlp_kernel_init, bias_init=_mlp_bias_init, name="dense")(x)
        return nn.gelu(x)


class MlpBlock(nn.Module):
    """The transformer MLP: ``fc1`` (dense + GELU) - ``dropout`` - ``fc2`` (dense back to the input width).

    Attributes:
      mlp_dim: hidden width.
      dropout_rate: dropout probability of the hidden layer.

    ``__call__(x, train=False)``: x [batch, tokens, hidden] float32 -> [batch, tokens, hidden]; dropout is active
    only when ``train``.
    """

    mlp_dim: int
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        hidden = x.shape[-1]
        y = GeluDense(self.mlp_dim, name="fc1")(x)
        y = nn.Dropout(rate=self.dropout_rate, deterministic=not train, name="dropout")(y)
        return nn.Dense(hidden, kernel_init=_mlp_kernel_init, bias_init=_mlp_bias_init, name="fc2")(y)


class EncoderBlock(nn.Module):
    """Pre-LN transformer encoder block: ``x + attention(norm1(x))``, then ``x + mlp(norm2(x))``.

    Attributes:
      num_heads: attention heads (``hidden`` must be divisible by it).
      mlp_dim: MLP hidden width.
      dropout_rate: dropout after the attention, in the MLP and after the MLP (attention weights: no dropout, as
        big_vision).

    ``__call__(x, train=False)``: x [batch, tokens, hidden] float32 -> [batch, tokens, hidden].
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        y = nn.LayerNorm(name="norm1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
                                            deterministic=not train, name="attention")(y, y)
        y = nn.Dropout(rate=self.dropout_rate, deterministic=not train, name="dropout1")(y)
        x = x + y
        y = nn.LayerNorm(name="norm2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, name="mlp")(y, train)
        y = nn.Dropout(rate=self.dropout_rate, deterministic=not train, name="dropout2")(y)
        return x + y


class ViT(nn.Module):
    """Vision Transformer classifier (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), pre-LN, GAP head.

    Patch embedding (``embedding``), learned position embedding (``pos_embedding``), ``num_layers`` pre-LN encoder
    blocks (``block0`` ..), final LayerNorm (``encoder_norm``), mean over the patch tokens (no class token: big_vision's
    ``pool_type='gap'``), dense classifier (``head``). See the module docstring for every layer path.

    Attributes:
      num_classes: number of output logits.
      patch_size: side of the square patches (the embedding conv's kernel and stride).
      hidden_size: token width.
      num_layers: encoder blocks.
      num_heads: attention heads per block.
      mlp_dim: hidden width of each block's MLP.
      dropout_rate: dropout of the embedded tokens and inside the blocks.

    ``__call__(images, train=False)``:
      images: [batch, height, width, channels] float32 in [0, 1]; height and width divisible by ``patch_size`` and
        equal to those given to ``init`` (the position embedding has one row per patch).
      train: dropout active (apply with ``rngs={"dropout": key}``); there is no BatchNorm, so no ``batch_stats``.
      Returns logits [batch, num_classes] float32.

    Raises:
      ValueError: images not rank 4, or height / width not divisible by ``patch_size``.
    """

    num_classes: int
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        p = self.patch_size
        if x.ndim != 4:
            raise ValueError(f"ViT: images must be [batch, height, width, channels], got shape {tuple(x.shape)}")
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"ViT: image size {x.shape[1]}x{x.shape[2]} is not divisible by patch_size {p}")
        x = Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
        batch, gh, gw, width = x.shape
        x = x.reshape(batch, gh * gw, width)  # row-major patch order
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=width ** -0.5), (1, gh * gw, width),
                         jnp.float32)
        x = x + pos
        x = nn.Dropout(rate=self.dropout_rate, deterministic=not train, name="dropout")(x)
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, name=f"block{i}")(x, train)
        x = nn.LayerNorm(name="encoder_norm")(x)
        x = jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, name="head")(x)
