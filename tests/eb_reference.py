"""A slow, explicit NumPy reference of Excitation Backprop for the tests (Bargal 2019, Eq. 4.1 and 4.2).

One example at a time, every layer written as neurons and weighted edges, the probabilities summed edge by edge:

* Eq. 4.2: ``P(a_i | a_j) = Z_j a_i w_ij`` if ``w_ij >= 0`` else 0, with ``Z_j = 1 / sum_{i: w_ij >= 0} a_i w_ij``
  (taken as 0 when that sum is 0);
* Eq. 4.1: ``P(a_i) = sum_{j in parents(i)} P(a_i | a_j) P(a_j)``.

Dense, convolution, average pooling and global average pooling are edge lists built with explicit loops; a residual
sum is a node with two unit-weight edges per element (so Eq. 4.2 gives ``a_i / (a_1 + a_2)``); max pooling and
ReLU pass each parent's probability to its single winning child; batch norm in inference mode (a per-channel
affine map) and flattening pass it unchanged. No JAX here: nothing is shared with the implementation under test.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass
class Dense:
    weight: np.ndarray  # [n_in, n_out]
    bias: np.ndarray  # [n_out]


@dataclasses.dataclass
class Conv:
    kernel: np.ndarray  # [kh, kw, c_in, c_out]
    bias: np.ndarray  # [c_out]
    stride: int = 1
    padding: int = 0  # zero padding, symmetric, in pixels


@dataclasses.dataclass
class AvgPool:
    window: int
    stride: int


@dataclasses.dataclass
class MaxPool:
    window: int
    stride: int
    padding: int = 0  # padded positions never win


@dataclasses.dataclass
class GlobalAvgPool:
    pass


@dataclasses.dataclass
class ReLU:
    pass


@dataclasses.dataclass
class Affine:
    """Batch norm in inference mode: ``x * scale + shift`` per channel."""

    scale: np.ndarray  # [c]
    shift: np.ndarray  # [c]


@dataclasses.dataclass
class Flatten:
    pass


@dataclasses.dataclass
class Residual:
    """``branch(x) + shortcut(x)``; an empty shortcut is the identity."""

    branch: list
    shortcut: list


def _edges(layer, in_shape):
    """Explicit edges ``(child, parent, weight)`` over flattened neurons; returns ``(out_shape, edges, bias)``."""
    edges = []
    if isinstance(layer, Dense):
        n_in, n_out = layer.weight.shape
        for i in range(n_in):
            for j in range(n_out):
                edges.append((i, j, layer.weight[i, j]))
        return (n_out,), edges, layer.bias
    if isinstance(layer, Conv):
        h, w, c_in = in_shape
        kh, kw, _, c_out = layer.kernel.shape
        s, p = layer.stride, layer.padding
        oh, ow = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
        for oy, ox, co, ky, kx, ci in itertools.product(range(oh), range(ow), range(c_out), range(kh), range(kw),
                                                        range(c_in)):
            iy, ix = oy * s + ky - p, ox * s + kx - p
            if 0 <= iy < h and 0 <= ix < w:
                edges.append((np.ravel_multi_index((iy, ix, ci), in_shape),
                              np.ravel_multi_index((oy, ox, co), (oh, ow, c_out)), layer.kernel[ky, kx, ci, co]))
        return (oh, ow, c_out), edges, np.tile(layer.bias, oh * ow)
    if isinstance(layer, AvgPool):
        h, w, c = in_shape
        k, s = layer.window, layer.stride
        oh, ow = (h - k) // s + 1, (w - k) // s + 1
        for oy, ox, ch, ky, kx in itertools.product(range(oh), range(ow), range(c), range(k), range(k)):
            edges.append((np.ravel_multi_index((oy * s + ky, ox * s + kx, ch), in_shape),
                          np.ravel_multi_index((oy, ox, ch), (oh, ow, c)), 1.0 / (k * k)))
        return (oh, ow, c), edges, np.zeros(oh * ow * c)
    if isinstance(layer, GlobalAvgPool):
        h, w, c = in_shape
        for y, x, ch in itertools.product(range(h), range(w), range(c)):
            edges.append((np.ravel_multi_index((y, x, ch), in_shape), ch, 1.0 / (h * w)))
        return (c,), edges, np.zeros(c)
    raise TypeError(f"not a linear layer: {layer}")


def _maxpool_winners(layer: MaxPool, x):
    """For each output neuron, the flat index of its winning child (first maximum in window order)."""
    h, w, c = x.shape
    k, s, p = layer.window, layer.stride, layer.padding
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    winners = np.zeros((oh, ow, c), np.int64)
    values = np.zeros((oh, ow, c))
    for oy, ox, ch in itertools.product(range(oh), range(ow), range(c)):
        best, arg = -np.inf, -1
        for ky, kx in itertools.product(range(k), range(k)):
            iy, ix = oy * s + ky - p, ox * s + kx - p
            if 0 <= iy < h and 0 <= ix < w and x[iy, ix, ch] > best:
                best, arg = x[iy, ix, ch], np.ravel_multi_index((iy, ix, ch), x.shape)
        winners[oy, ox, ch], values[oy, ox, ch] = arg, best
    return winners, values


def forward(layers, x):
    """Runs the network on one example; returns the trace used by :func:`backward`.

    Args:
      layers: list of layer objects.
      x: the example, e.g. [h, w, c] float64.

    Returns:
      list of ``(layer, input, output, extra)``, one per layer.
    """
    trace = []
    for layer in layers:
        extra = None
        if isinstance(layer, (Dense, Conv, AvgPool, GlobalAvgPool)):
            out_shape, edges, bias = _edges(layer, x.shape)
            flat = x.reshape(-1)
            out = np.array(bias, np.float64)
            for i, j, w in edges:
                out[j] += w * flat[i]
            out = out.reshape(out_shape)
            extra = edges
        elif isinstance(layer, MaxPool):
            extra, out = _maxpool_winners(layer, x)
        elif isinstance(layer, ReLU):
            out = np.maximum(x, 0.0)
        elif isinstance(layer, Affine):
            out = x * layer.scale + layer.shift
        elif isinstance(layer, Flatten):
            out = x.reshape(-1)
        elif isinstance(layer, Residual):
            branch = forward(layer.branch, x)
            shortcut = forward(layer.shortcut, x)
            b = branch[-1][2] if branch else x
            s = shortcut[-1][2] if shortcut else x
            out = b + s
            extra = (branch, shortcut, b, s)
        else:
            raise TypeError(f"unknown layer {layer}")
        trace.append((layer, x, out, extra))
        x = out
    return trace


def _backward_layer(layer, x, out, extra, p_out):
    """``P`` at the layer's input from ``P`` at its output (Eq. 4.1 with the layer's Eq. 4.2)."""
    if isinstance(layer, (Dense, Conv, AvgPool, GlobalAvgPool)):
        flat, p_flat = x.reshape(-1), p_out.reshape(-1)
        z = np.zeros(p_flat.shape)  # 1 / Z_j
        for i, j, w in extra:
            if w >= 0:
                z[j] += flat[i] * w
        p_in = np.zeros(flat.shape)
        for i, j, w in extra:
            if w >= 0 and z[j] != 0:
                p_in[i] += flat[i] * w / z[j] * p_flat[j]  # P(a_i | a_j) P(a_j)
        return p_in.reshape(x.shape)
    if isinstance(layer, MaxPool):
        p_in = np.zeros(x.size)
        for j, i in enumerate(extra.reshape(-1)):
            p_in[i] += p_out.reshape(-1)[j]
        return p_in.reshape(x.shape)
    if isinstance(layer, ReLU):
        return np.where(x > 0, p_out, 0.0)
    if isinstance(layer, (Affine, Flatten)):
        return p_out.reshape(x.shape)
    if isinstance(layer, Residual):
        branch, shortcut, b, s = extra
        total = b + s
        share = np.divide(1.0, total, out=np.zeros_like(total), where=total != 0)
        p_b, p_s = b * share * p_out, s * share * p_out
        p_in = backward(branch, p_b)[0] if branch else p_b
        p_in = p_in + (backward(shortcut, p_s)[0] if shortcut else p_s)
        return p_in
    raise TypeError(f"unknown layer {layer}")


def backward(trace, p_top, start=None, stop=0):
    """Propagates ``P`` down the layers ``stop .. start - 1`` of a trace.

    Args:
      trace: from :func:`forward`.
      p_top: ``P`` at the output of layer ``start - 1`` (the logits when ``start`` is None).
      start: boundary to start from (default: the top, ``len(trace)``).
      stop: boundary to stop at (0: the input).

    Returns:
      dict ``{boundary: P}`` for boundaries ``stop .. start``; boundary ``k`` is the input of layer ``k``.
    """
    start = len(trace) if start is None else start
    probs = {start: np.asarray(p_top, np.float64)}
    p = probs[start]
    for k in range(start - 1, stop - 1, -1):
        layer, x, out, extra = trace[k]
        p = _backward_layer(layer, x, out, extra, p)
        probs[k] = p
    return probs


def excitation_backprop(layers, x, prior):
    """``P`` at every layer boundary for one example: dict ``{k: P at the input of layer k}`` (k = len: logits)."""
    return backward(forward(layers, np.asarray(x, np.float64)), prior)


def negate_classifier(layers):
    """A copy of the network whose last Dense layer (the classifier) has negated weights (the dual units)."""
    layers = copy.deepcopy(layers)
    for layer in reversed(layers):
        if isinstance(layer, Dense):
            layer.weight = -layer.weight
            return layers
    raise ValueError("no Dense classifier layer")


def contrastive_excitation_backprop(layers, x, prior, contrast, saliency):
    """The literal contrastive procedure (Zhang et al. 2016; Bargal 2019 Fig. 4.2) for one example.

    EB to the contrast layer with the normal classifier and with the negated one, subtract, and continue the
    difference down to the saliency layer with the normal network.

    Args:
      layers: the network.
      x: one example.
      prior: [num_classes] top-down prior.
      contrast: boundary index of the contrast layer (above ``saliency``, below the classifier).
      saliency: boundary index of the saliency layer.

    Returns:
      the signed contrastive signal at the saliency layer.
    """
    x = np.asarray(x, np.float64)
    trace = forward(layers, x)
    positive = backward(trace, prior, stop=contrast)[contrast]
    negative = backward(forward(negate_classifier(layers), x), prior, stop=contrast)[contrast]
    return backward(trace, positive - negative, start=contrast, stop=saliency)[saliency]
