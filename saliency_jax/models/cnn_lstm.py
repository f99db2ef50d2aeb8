"""A CNN-LSTM clip classifier with the thesis's ReLU-LSTM cell (Bargal 2019, Ch. 7), with addressable layers.

The model of Bargal 2019, Sec. 7.2 (after Donahue et al.'s LRCN, CVPR 2015), scaled down for synthetic MNIST clips:
every frame goes through the same CNN up to a fully-connected layer (``fc7`` of the thesis's VGG16-LSTM), whose
post-ReLU features feed a single LSTM layer; a classifier is applied to the LSTM output at every time step (as the
authors' ``fc8-final`` with ``axis: 2``), so the logits are ``[batch, time, classes]``. The LSTM is the thesis's
ReLU-LSTM (:class:`ReLULSTMCell`): ``tanh`` replaced by ReLU so that Excitation Backprop's assumptions hold.

A second classifier on the per-frame features (``frame_classifier``, reached through :meth:`CNNLSTM.frame_logits`)
is the single-frame CNN baseline of Sec. 7.4.1 ("spatial top-down saliency using a CNN, treating every video frame
as an independent image"): it shares the CNN with the recurrent model, so EB / cEB / BP of a frame and EB-R /
cEB-R / BP-R of the clip explain the same features. Train it with a per-frame cross-entropy next to the clip loss.

Layer paths (as :func:`saliency_jax.saliency.linen_layer` and :func:`saliency_jax.saliency.recurrent.linen_clip_layers`
take them; activations of frames are ``[batch * time, ...]``, frames of one clip contiguous):

=====================  ===================================================================================
``conv1`` .. ``conv3``  post-ReLU feature maps ``[batch * time, h, w, widths[i]]`` (3x3 conv + ReLU; 2x2 max
                        pooling after each); ``conv3`` is the default layer of the maps (conv5 in the thesis)
``fc``                  post-ReLU frame features ``[batch * time, embed_features]``: the CNN/RNN boundary
``lstm``                the :class:`flax.linen.RNN` of :class:`ReLULSTMCell`, outputs ``[batch, time, units]``
``classifier``          logits at every step ``[batch, time, num_classes]``
``frame_classifier``    per-frame logits ``[batch * time, num_classes]`` (only in :meth:`CNNLSTM.frame_logits`)
=====================  ===================================================================================
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.models.small_cnn import ConvBlock

Array = jax.Array

__all__ = ["CNNLSTM", "DenseReLU", "ReLULSTMCell", "BOUNDARY_LAYER", "MAP_LAYER"]

MAP_LAYER = "conv3"
"""Module path of the convolutional layer whose EB-R / cEB-R maps are reported (conv5 of the thesis's VGG16)."""

BOUNDARY_LAYER = "fc"
"""Module path of the CNN/RNN boundary, where EB-R's signal is normalised over time (fc7 in the thesis)."""


class ReLULSTMCell(nn.RNNCellBase):
    """The thesis's LSTM cell with ReLU in place of tanh (Bargal 2019, Sec. 7.1), usable with :class:`nn.RNN`.

    With ``x`` the step's input and ``(c, h)`` the carry::

        [i', f', o', g'] = W_x x + b + W_h h         (x_transform, with the bias; h_transform, without)
        i, f, o = sigmoid(i'), sigmoid(f'), sigmoid(o')
        g = ReLU(g')
        c_new = f * c + i * g
        h_new = o * ReLU(c_new)

    The layout follows the authors' Caffe LSTM (``W_xc`` with bias ``b_c``, ``W_hc`` without; gates in the order
    i, f, o, g); with a zero initial carry the cell state and output stay non-negative. The ReLU makes the cell
    piecewise linear in ``(c, g)`` for fixed gates, which is what EB-R's rules need (see
    :mod:`saliency_jax.saliency._eb_rules`).

    Attributes:
      features: number of units (the size of ``c`` and ``h``).
      kernel_init: initialiser of ``W_x`` (LeCun normal, as Flax's LSTM cells).
      recurrent_kernel_init: initialiser of ``W_h`` (orthogonal).
      bias_init: initialiser of ``b`` (zeros, as the authors' model).
    """

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    recurrent_kernel_init: Any = nn.initializers.orthogonal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], inputs: Array) -> tuple[tuple[Array, Array], Array]:
        """One step.

        Args:
          carry: ``(c, h)``, each [..., features] float32.
          inputs: [..., input_features] float32 (non-negative for EB, e.g. post-ReLU CNN features).

        Returns:
          ``((c_new, h_new), h_new)``, each [..., features] float32.
        """
        c, h = carry
        x = nn.Dense(4 * self.features, use_bias=True, kernel_init=self.kernel_init, bias_init=self.bias_init,
                     name="x_transform")(inputs)
        r = nn.Dense(4 * self.features, use_bias=False, kernel_init=self.recurrent_kernel_init,
                     name="h_transform")(h)
        i, f, o, g = jnp.split(r + x, 4, axis=-1)
        i, f, o = nn.sigmoid(i), nn.sigmoid(f), nn.sigmoid(o)
        new_c = f * c + i * nn.relu(g)
        new_h = o * nn.relu(new_c)
        return (new_c, new_h), new_h

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> tuple[Array, Array]:
        """Zero ``(c, h)`` of shape ``input_shape[:-1] + (features,)`` (``rng`` unused)."""
        shape = tuple(input_shape[:-1]) + (self.features,)
        return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)

    @property
    def num_feature_axes(self) -> int:
        return 1


class DenseReLU(nn.Module):
    """Dense layer + ReLU as one named module, so its post-ReLU output can be intercepted.

    ``__call__(x)``: x [..., d_in] -> [..., features] float32, ``max(W x + b, 0)``.
    """

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.relu(nn.Dense(self.features, name="dense")(x))


class CNNLSTM(nn.Module):
    """Per-frame CNN, ReLU-LSTM over time, a classifier at every step (Bargal 2019, Sec. 7.2; LRCN).

    ``conv(w1) - pool - conv(w2) - pool - conv(w3) - pool - flatten - fc + ReLU`` per frame, then
    ``nn.RNN(ReLULSTMCell)`` and ``classifier`` at every step. Frames' height and width must be divisible by 8.

    Attributes:
      num_classes: number of classes.
      widths: channels of ``conv1`` .. ``conv3``.
      embed_features: units of ``fc`` (the LSTM's input).
      lstm_features: LSTM units (256 in the thesis).
    """

    num_classes: int
    widths: Sequence[int] = (16, 32, 64)
    embed_features: int = 128
    lstm_features: int = 64

    def setup(self):
        if len(self.widths) != 3:
            raise ValueError(f"widths must give the channels of 3 conv layers; got {self.widths!r}")
        self.conv1 = ConvBlock(self.widths[0], use_batchnorm=False)
        self.conv2 = ConvBlock(self.widths[1], use_batchnorm=False)
        self.conv3 = ConvBlock(self.widths[2], use_batchnorm=False)
        self.fc = DenseReLU(self.embed_features)
        self.lstm = nn.RNN(ReLULSTMCell(self.lstm_features))
        self.classifier = nn.Dense(self.num_classes)
        self.frame_classifier = nn.Dense(self.num_classes)

    def frame_features(self, frames: Array) -> Array:
        """The CNN: frames [n, height, width, channels] float32 in [0, 1] -> [n, embed_features] (post-ReLU)."""
        x = frames
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nn.max_pool(conv(x), (2, 2), strides=(2, 2))
        return self.fc(x.reshape(x.shape[0], -1))

    def __call__(self, clips: Array, train: bool = False) -> Array:
        """Logits at every time step.

        Args:
          clips: [batch, time, height, width, channels] float32 in [0, 1].
          train: unused (no dropout or batch norm); accepted for the train loop's calling convention.

        Returns:
          float32 logits [batch, time, num_classes].

        Raises:
          ValueError: if ``clips`` is not rank 5.
        """
        if clips.ndim != 5:
            raise ValueError(f"clips must be [batch, time, height, width, channels]; got shape {clips.shape}")
        batch, time = clips.shape[:2]
        features = self.frame_features(clips.reshape(batch * time, *clips.shape[2:]))
        if self.is_initializing():  # create the frame classifier's parameters too
            self.frame_classifier(features)
        hidden = self.lstm(features.reshape(batch, time, -1))
        return self.classifier(hidden)

    def frame_logits(self, frames: Array, train: bool = False) -> Array:
        """The single-frame baseline: frames [n, height, width, channels] -> logits [n, num_classes].

        Use with ``module.apply(variables, frames, method="frame_logits")`` or
        ``linen_layer(module, variables, "conv3", method="frame_logits")``.
        """
        return self.frame_classifier(self.frame_features(frames))
