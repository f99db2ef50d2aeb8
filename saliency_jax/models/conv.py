"""A 2-D convolution layer that lowers convolutions on small feature maps, and 1x1 convolutions, to one matrix product.

Why: XLA's algebraic simplifier swaps the two operands of a convolution whose kernel window is larger than the
input's spatial extent (``ConvOperandSwapper``: it swaps when the product of the kernel sizes exceeds the
product of the input sizes, e.g. a 3x3 kernel on a 2x2 or 1x1 feature map). On the CPU backend of jaxlib 0.10 the
swapped convolution (``dim_labels=01fb_o01i->f01b``) is neither sent to YNNPACK/XNNPACK nor to Eigen but emitted as
a naive loop: a 3x3, 512 -> 512 channel convolution on a batch of 16 2x2 maps took 108 ms instead of 1.5 ms, its
gradient 350 ms instead of 5 ms (2 CPU cores; ``benchmarks/cpu_conv_small_spatial.py`` reproduces it with plain
``jax.lax.conv_general_dilated``, ``benchmarks/README.md`` has the tables). ResNet-18's ``layer4`` at 64 px input and VGG16's ``conv5_x`` at 32 px hit it.

How: :func:`conv2d` computes such a convolution as im2col + ``dot_general`` (the kh * kw shifted, strided slices
of the zero-padded input are concatenated along channels, ``[b, oh, ow, kh * kw * c_in]``, and multiplied by the
kernel reshaped to ``[kh * kw * c_in, c_out]``). This is the same linear map; only the float32 summation order
differs (max relative difference ~1e-6, tested against ``flax.linen.Conv``). Larger feature maps keep
``jax.lax.conv_general_dilated``, which is faster there, except for unpadded 1x1 kernels (:data:`DOT_1X1`: half of
ResNet-50's convolutions), which are a strided slice and one ``dot_general`` on the channels at every size: 1.2x
faster forward, input gradient, Grad-CAM and EB on ResNet-50 at batch 8 (``benchmarks/cpu_conv_lowering.py``), and
bit-identical there. Both lowerings are built from primitives that
:mod:`saliency_jax.saliency` handles (pad, slice, concatenate, reshape, ``dot_general``), so gradients, Grad-CAM
and Excitation Backprop see the same layer.

:class:`Conv` is a drop-in for ``flax.linen.Conv`` restricted to what the models use (2-D, explicit or
``"SAME"``/``"VALID"`` padding, no dilation or groups): same parameters ``kernel`` [kh, kw, c_in, c_out] and
``bias`` [c_out], created in the same order from the same initialisers, so weight import, checkpoints and layer
paths are unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = ["Conv", "conv2d", "patches_conv2d", "uses_patches", "DOT_1X1", "PATCHES_MAX_INPUT_PIXELS"]

#: Inputs whose spatial area (height * width) is at most this many pixels, or smaller than the kernel's window
#: (where XLA swaps the operands), are convolved by :func:`patches_conv2d` when the kernel is larger than 1x1.
#: 16 (4x4 and smaller) also covers the sizes where im2col was measured faster than XLA's convolution (3x3, 4x4:
#: 1.1-1.6x forward); at 7x7 both were about equal and at 14x14 ``conv_general_dilated`` was ~1.6x faster
#: (``benchmarks/cpu_conv_small_spatial.py``). 0 disables the routing (always ``jax.lax.conv_general_dilated``).
#: Read when a function is traced: functions already jitted keep the lowering they were traced with.
PATCHES_MAX_INPUT_PIXELS: int = 16

#: Unpadded 1x1 convolutions (ResNet bottlenecks and projection shortcuts) are computed as a strided slice and one
#: ``dot_general`` on the channels instead of ``lax.conv_general_dilated``: on XLA:CPU (jaxlib 0.10, 2 cores) the
#: product was 1.1-3.5x faster than the convolution for every 1x1 convolution of ResNet-50 at batch 8, forward and
#: input gradient (``benchmarks/cpu_conv_lowering.py``). False: ``conv_general_dilated`` for them too. Read when a
#: function is traced.
DOT_1X1: bool = True

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding: str | Sequence[tuple[int, int]], input_hw: Sequence[int], kernel_hw: Sequence[int],
                      strides: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"conv2d: padding must be 'SAME', 'VALID' or ((top, bottom), (left, right)), got "
                             f"{padding!r}")
        pads = lax.padtype_to_pads(tuple(input_hw), tuple(kernel_hw), tuple(strides), padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        raise ValueError(f"conv2d: padding must be 'SAME', 'VALID' or ((top, bottom), (left, right)), got "
                         f"{padding!r}")
    return pads  # type: ignore[return-value]


def uses_patches(input_hw: Sequence[int], kernel_hw: Sequence[int], max_input_pixels: int | None = None) -> bool:
    """Whether :func:`conv2d` lowers a convolution to im2col + ``dot_general``.

    Args:
      input_hw: (height, width) of the input feature map (before padding).
      kernel_hw: (height, width) of the kernel.
      max_input_pixels: threshold on ``height * width``; None reads :data:`PATCHES_MAX_INPUT_PIXELS` (at trace
        time).

    Returns:
      True when ``max_input_pixels > 0``, the kernel is larger than 1x1 and either ``height * width <=
      max_input_pixels`` or the kernel window has more pixels than the input (XLA's operand-swap condition).
    """
    limit = PATCHES_MAX_INPUT_PIXELS if max_input_pixels is None else max_input_pixels
    area, kernel_area = input_hw[0] * input_hw[1], kernel_hw[0] * kernel_hw[1]
    return limit > 0 and kernel_area > 1 and (area <= limit or kernel_area > area)


def patches_conv2d(inputs: Array, kernel: Array, strides: Sequence[int] = (1, 1),
                   padding: str | Sequence[tuple[int, int]] = "VALID", precision: Any = None) -> Array:
    """2-D convolution as im2col + one ``dot_general``; equals ``lax.conv_general_dilated`` (NHWC, HWIO).

    Args:
      inputs: [batch, height, width, in_channels] floating point.
      kernel: [kernel_height, kernel_width, in_channels, out_channels], same dtype as ``inputs``.
      strides: (vertical, horizontal) strides, each >= 1.
      padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))`` zero padding in pixels (negative
        values crop, as in ``lax.conv_general_dilated``).
      precision: passed to ``lax.dot_general``.

    Returns:
      [batch, out_height, out_width, out_channels] with
      ``out_height = (height + top + bottom - kernel_height) // stride + 1`` (likewise for the width).

    Raises:
      ValueError: on a rank other than 4, mismatched channels, bad strides/padding, or an empty output.
    """
    if inputs.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"patches_conv2d: inputs must be [b, h, w, c] and kernel [kh, kw, c_in, c_out], got "
                         f"shapes {tuple(inputs.shape)} and {tuple(kernel.shape)}")
    kh, kw, c_in, c_out = kernel.shape
    if inputs.shape[-1] != c_in:
        raise ValueError(f"patches_conv2d: inputs have {inputs.shape[-1]} channels but the kernel expects {c_in} "
                         "(feature groups are not supported)")
    sh, sw = (int(s) for s in strides)
    if sh < 1 or sw < 1:
        raise ValueError(f"patches_conv2d: strides must be >= 1, got {tuple(strides)}")
    (pt, pb), (pl, pr) = _explicit_padding(padding, inputs.shape[1:3], (kh, kw), (sh, sw))
    zero = jnp.zeros((), inputs.dtype)
    padded = lax.pad(inputs, zero, ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    batch, hp, wp, _ = padded.shape
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if hp < kh or wp < kw:
        raise ValueError(f"patches_conv2d: padded input {hp}x{wp} is smaller than the kernel {kh}x{kw}")
    # Tap (i, j) of every output pixel: a strided slice of the padded input. Concatenated in (i, j, c) order,
    # which is the row order of kernel.reshape(kh * kw * c_in, c_out).
    taps = [lax.slice(padded, (0, i, j, 0), (batch, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c_in),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else lax.concatenate(taps, 3)
    return lax.dot_general(patches, kernel.reshape(kh * kw * c_in, c_out), (((3,), (0,)), ((), ())),
                           precision=precision)


def conv2d(inputs: Array, kernel: Array, strides: Sequence[int] = (1, 1),
           padding: str | Sequence[tuple[int, int]] = "VALID", precision: Any = None,
           max_input_pixels: int | None = None) -> Array:
    """2-D convolution (NHWC input, HWIO kernel), via :func:`patches_conv2d` on small maps (see module docstring).

    Args:
      inputs: [batch, height, width, in_channels] floating point.
      kernel: [kernel_height, kernel_width, in_channels, out_channels].
      strides: (vertical, horizontal) strides.
      padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
      precision: ``jax.lax.Precision`` of the product.
      max_input_pixels: see :func:`uses_patches` (None: :data:`PATCHES_MAX_INPUT_PIXELS`).

    Returns:
      [batch, out_height, out_width, out_channels], the value of ``jax.lax.conv_general_dilated`` with
      ``dimension_numbers=("NHWC", "HWIO", "NHWC")`` up to float rounding.

    Raises:
      ValueError: on bad shapes or padding (as :func:`patches_conv2d` / ``lax.conv_general_dilated``).
    """
    if inputs.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"conv2d: inputs must be [b, h, w, c] and kernel [kh, kw, c_in, c_out], got shapes "
                         f"{tuple(inputs.shape)} and {tuple(kernel.shape)}")
    if uses_patches(inputs.shape[1:3], kernel.shape[:2], max_input_pixels):
        return patches_conv2d(inputs, kernel, strides, padding, precision)
    pads = _explicit_padding(padding, inputs.shape[1:3], kernel.shape[:2], strides)
    if DOT_1X1 and kernel.shape[:2] == (1, 1) and all(p == (0, 0) for p in pads):
        return patches_conv2d(inputs, kernel, strides, pads, precision)  # one tap: a strided slice and a dot_general
    return lax.conv_general_dilated(inputs, kernel, tuple(strides), pads, dimension_numbers=_DIMENSION_NUMBERS,
                                    precision=precision)


class Conv(nn.Module):
    """2-D convolution layer with ``flax.linen.Conv``'s parameters, lowered by :func:`conv2d`.

    Attributes:
      features: output channels.
      kernel_size: (height, width) of the kernel.
      strides: (vertical, horizontal) strides (an int: the same for both).
      padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))`` (an int ``p`` means ``p`` on every
        side).
      use_bias: add a ``bias`` [features].
      dtype: computation dtype (None: promoted from the input and parameters, as ``nn.Conv``).
      param_dtype: dtype of ``kernel`` and ``bias``.
      precision: ``jax.lax.Precision`` of the convolution.
      kernel_init: initialiser of ``kernel`` [kh, kw, in_features, features] (``nn.Conv``'s default).
      bias_init: initialiser of ``bias`` (zeros).
      max_input_pixels: see :func:`uses_patches`; None reads :data:`PATCHES_MAX_INPUT_PIXELS`.

    ``__call__(inputs)``: inputs [batch, height, width, in_features] -> [batch, out_height, out_width, features].

    Raises:
      ValueError: if ``inputs`` is not rank 4 or the padding is malformed.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = (1, 1)
    padding: str | int | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    max_input_pixels: int | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        if inputs.ndim != 4:
            raise ValueError(f"Conv {self.name}: inputs must be [batch, height, width, channels], got shape "
                             f"{tuple(inputs.shape)}")
        kernel_size = tuple(int(k) for k in self.kernel_size)
        strides = (self.strides, self.strides) if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        kernel = self.param("kernel", self.kernel_init, kernel_size + (inputs.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = conv2d(inputs, kernel, strides, padding, self.precision, self.max_input_pixels)
        if bias is not None:
            y = y + bias
        return y
