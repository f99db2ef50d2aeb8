"""Excitation Backprop backward rules for JAX primitives, applied by re-evaluating a model's jaxpr.

Private machinery of :mod:`saliency_jax.saliency.excitation_backprop` (read that module's docstring first).

:func:`with_excitation_rules` traces a function to a jaxpr (``jax.make_jaxpr``) and evaluates it again, equation by
equation, with every primitive that touches the data replaced by a ``jax.custom_vjp`` function whose backward pass
is the primitive's Excitation Backprop (EB) rule (Zhang et al. 2016, "Top-down Neural Attention by Excitation
Backprop"; Bargal 2019, Eq. 4.1-4.2). The forward values are unchanged; ``jax.vjp`` of the result propagates
marginal winning probabilities instead of gradients. Because the rules act on primitives, any model whose forward
pass is a JAX function works unmodified: Flax linen and NNX modules, plain functions.

Each value of the traced function is classified once, from how it was computed (never from its numbers):

* *parameter* (constant): derived only from closed-over arrays and literals (weights, BN statistics, biases);
* *data*: depends on a data argument (the images);
* *probe*: depends only on a probe argument, a perturbation that the model adds to a layer's activations
  (:class:`~saliency_jax.saliency.core.LayerModel`); ``activations + probe`` passes the signal through unchanged,
  so the cotangent of the probe is the EB signal at that layer.

Rules (``p`` is the top-down signal at the output, ``x`` the data operand; ``0 / 0 := 0``, and more generally a
zero denominator gives zero):

==========================================  =======================================================================
primitive (data operand ``x``)              backward rule
==========================================  =======================================================================
``dot_general``, ``conv_general_dilated``   ``x * L_{W+}^T(p / L_{W+}(x))``: ``W+ = max(W, 0)`` of the parameter
with one parameter operand ``W``            operand, bias ignored (dense and convolution layers, Eq. 4.2)
``reduce_window_sum``, ``reduce_sum``       ``x * L^T(p / L(x))`` (average / global average pooling, spatial sums)
``add`` of two data operands                ``x_i / (x_1 + x_2) * p`` (residual sums)
``add``/``sub``/``mul``/``div`` with a      ``p`` unchanged (bias, batch norm in inference mode, input
parameter operand (data first for ``sub``,  normalisation, the ``1 / n`` of a mean)
``div``)
``max``, ``reduce_max``,                    the gradient (ReLU, max pooling: the signal goes to the winner)
``reduce_window_max``, ``select_n``
reshapes, transposes, broadcasts, slices,   the gradient (they only move values)
``concatenate``, ``gather``, ``pad``,
``convert_element_type``, ...
``jit``, ``custom_jvp_call``,               evaluated recursively (``jax.nn.relu`` is a ``custom_jvp`` around
``custom_vjp_call``, ``checkpoint``         ``max``)
anything else touching data                 forward as usual; the backward pass raises
                                            :class:`UnsupportedOperationError` naming the primitive
==========================================  =======================================================================

All rules are linear in ``p`` for fixed activations, which is what lets contrastive EB run as one pass (see
:func:`with_excitation_rules`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency._jaxpr import (
    evaluate_jaxpr,
    inner_jaxpr,
    is_float,
    operand_values,
    source_location,
    unbroadcast,
)

Array = jax.Array

__all__ = ["UnsupportedOperationError", "with_excitation_rules"]

# Value kinds, as bit flags: 0 = parameter (constant), _DATA = depends on a data argument, _PROBE = depends on a
# probe argument. A value derived from both carries both bits.
_DATA = 1
_PROBE = 2

# Primitives that only move, copy or select values: their gradient is also their EB rule (each output has one
# parent, so Eq. 4.1 sums the signal of the copies, as the gradient does).
_STRUCTURAL = frozenset({
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "concatenate", "slice",
    "dynamic_slice", "dynamic_update_slice", "gather", "pad", "rev", "copy", "copy_p", "convert_element_type",
    "reduce_precision", "split", "sharding_constraint", "device_put", "optimization_barrier",
})
# Winner-take-all selections: the signal is routed like the gradient (ReLU = max(x, 0), max pooling, where).
_ROUTING = frozenset({"max", "reduce_max", "reduce_window_max", "select_n"})
# Linear maps with non-negative coefficients and no parameter operand (pooling): x * L^T(p / L(x)).
_POOLING = frozenset({"reduce_sum", "reduce_window_sum"})
# Linear maps with a parameter operand (dense, conv): the W+ rule.
_WEIGHTED = frozenset({"dot_general", "conv_general_dilated"})


class UnsupportedOperationError(ValueError):
    """The Excitation Backprop signal reached a JAX primitive that has no EB rule.

    Raised (while the backward pass is traced) instead of returning a wrong map. The message names the primitive,
    where it was called from, and why it has no rule (e.g. ``tanh``, a data-dependent normaliser such as batch norm
    in training mode, or a product of two data-dependent tensors as in attention).
    """


@dataclasses.dataclass
class _Context:
    """State shared by one traversal of a jaxpr (and its inner jaxprs), in evaluation order."""

    contrastive: bool
    classifier: int | None = None  # index of the weighted op that gets the contrastive rule
    counter: int = 0  # weighted ops seen so far
    weighted: list = dataclasses.field(default_factory=list)  # (index, kind of its data operand)


def _classify(eqn, kinds: Sequence[int]) -> tuple[str, Any]:
    """Chooses the EB rule of a (non-call) equation from the kinds of its operands.

    Returns:
      ``(rule, info)``: ``("plain", None)`` to bind the primitive as is (its gradient is the EB rule or no signal
      flows); ``("pass", data_pos)``; ``("residual", None)``; ``("linear", (data_pos, weight_pos or None))``;
      ``("unsupported", reason)``.
    """
    name = eqn.primitive.name
    if not any(is_float(v.aval) for v in eqn.outvars) or not any(kinds):
        return "plain", None  # constants, or boolean/integer results (comparisons, argmax): no signal
    has_data = [bool(k & _DATA) for k in kinds]
    probe_only = [k == _PROBE for k in kinds]
    if not any(has_data):
        if name in _STRUCTURAL:
            return "plain", None
        return "unsupported", "a layer perturbation (probe) may only be reshaped/broadcast and added to activations"
    if any(probe_only):
        if name == "add" and len(kinds) == 2:
            return "plain", None  # activations + perturbation: the tap that reads the signal at a layer
        return "unsupported", "a layer perturbation (probe) may only be added to activations"
    if name in _STRUCTURAL or name in _ROUTING:
        return "plain", None
    if name in ("add", "sub", "mul", "div"):
        if all(has_data):
            if name == "add":
                return "residual", None
            return "unsupported", (f"'{name}' of two data-dependent tensors (e.g. a normaliser with batch "
                                   "statistics, batch norm in training mode, gating or attention)")
        data_pos = has_data.index(True)
        if name in ("sub", "div") and data_pos != 0:
            return "unsupported", f"'{name}' with the data-dependent tensor as its second operand"
        return "pass", data_pos
    if name in _POOLING:
        return "linear", (0, None)
    if name in _WEIGHTED:
        if name == "conv_general_dilated":
            if has_data[0] and not has_data[1]:
                return "linear", (0, 1)
            return "unsupported", "convolution whose kernel depends on the data"
        if sum(has_data) == 1:
            data_pos = has_data.index(True)
            return "linear", (data_pos, 1 - data_pos)
        return "unsupported", "product of two data-dependent tensors (e.g. attention)"
    return "unsupported", "no Excitation Backprop rule for this operation"


def _safe_div(p: Array, z: Array) -> Array:
    """``p / z`` with zero wherever ``z == 0`` (the ``0 / 0 := 0`` of EB; a signal on a zero denominator is lost)."""
    nonzero = z != 0
    return jnp.where(nonzero, p / jnp.where(nonzero, z, 1), 0)


def _zero_cotangent(x: Array):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _bind(prim, params, operands):
    return prim.bind(*operands, **params)


def _pass_rule(prim, params, data_pos):
    """Affine op with a parameter operand (bias, batch norm, normalisation): the signal passes unchanged."""

    @jax.custom_vjp
    def rule(*operands):
        return _bind(prim, params, operands)

    def fwd(*operands):
        return _bind(prim, params, operands), operands

    def bwd(operands, p):
        return tuple(unbroadcast(p, o) if i == data_pos else _zero_cotangent(o) for i, o in enumerate(operands))

    rule.defvjp(fwd, bwd)
    return rule


def _residual_rule(prim, params):
    """Sum of two data tensors: ``p_i = x_i / (x_1 + x_2) * p``."""

    @jax.custom_vjp
    def rule(a, b):
        return _bind(prim, params, (a, b))

    def fwd(a, b):
        return _bind(prim, params, (a, b)), (a, b)

    def bwd(res, p):
        a, b = res
        s = _safe_div(p, a + b)
        return unbroadcast(a * s, a), unbroadcast(b * s, b)

    rule.defvjp(fwd, bwd)
    return rule


def _linear_rule(prim, params, data_pos, weight_pos, contrastive):
    """Dense, conv and pooling: ``x * L_{W+}^T(p / L_{W+}(x))`` (Eq. 4.2 with Z_j = 1 / sum_i x_i w+_ij).

    With ``contrastive``, the rule of the dual units (weights negated) is subtracted:
    ``x * L_{W+}^T(p / L_{W+}(x)) - x * L_{(-W)+}^T(p / L_{(-W)+}(x))``.
    """

    @jax.custom_vjp
    def rule(*operands):
        return _bind(prim, params, operands)

    def fwd(*operands):
        return _bind(prim, params, operands), operands

    def bwd(operands, p):
        x = operands[data_pos]

        def excite(sign):
            ops = list(operands)
            if weight_pos is not None:
                ops[weight_pos] = jnp.maximum(sign * ops[weight_pos], 0)

            def linear(xx):
                return _bind(prim, params, ops[:data_pos] + [xx] + ops[data_pos + 1:])

            z, transpose = jax.vjp(linear, x)
            (g,) = transpose(_safe_div(p, z).astype(z.dtype))
            return x * g

        px = excite(1) - excite(-1) if contrastive else excite(1)
        return tuple(px if i == data_pos else _zero_cotangent(o) for i, o in enumerate(operands))

    rule.defvjp(fwd, bwd)
    return rule


def _unsupported_rule(eqn, reason):
    """Forward as usual; the backward pass raises, naming the primitive (only if the signal reaches it)."""
    prim, params = eqn.primitive, eqn.params
    where = source_location(eqn)
    in_shapes = ", ".join(f"{v.aval.str_short()}" for v in eqn.invars)

    @jax.custom_vjp
    def rule(*operands):
        return _bind(prim, params, operands)

    def fwd(*operands):
        return _bind(prim, params, operands), None

    def bwd(_, p):
        raise UnsupportedOperationError(
            f"Excitation Backprop cannot propagate through primitive '{prim.name}' ({in_shapes}) at {where}: "
            f"{reason}. Supported on the path from the layer to the logits: dense/conv layers with parameter "
            "weights, average/global-average/max pooling, ReLU, residual sums, batch norm in inference mode, "
            "affine ops with parameter operands, reshapes/slices/concatenation. Explain the logits, not "
            "softmax probabilities, and apply the model in inference mode.")

    rule.defvjp(fwd, bwd)
    return rule


def _run(jaxpr, consts, args, arg_kinds, ctx: _Context, evaluate: bool):
    """Evaluates (or, with ``evaluate=False``, only classifies) a jaxpr under EB rules.

    Constants are parameters (kind 0), as are literals; ``arg_kinds`` are the kinds of ``args``.

    Returns:
      ``(outputs, output_kinds)``; outputs are None when not evaluating.
    """

    def eval_equation(eqn, values, in_kinds):
        inner = inner_jaxpr(eqn)
        if inner is not None and any(in_kinds):
            body, body_consts = inner
            return _run(body, body_consts, values, in_kinds, ctx, evaluate)
        rule, info = _classify(eqn, in_kinds)
        kind = 0
        for k in in_kinds:
            kind |= k
        out_kinds = [kind if is_float(v.aval) else 0 for v in eqn.outvars]
        contrastive_here = False
        if rule == "linear" and info[1] is not None:
            index = ctx.counter
            ctx.counter += 1
            ctx.weighted.append((index, in_kinds[info[0]]))
            contrastive_here = ctx.contrastive and index == ctx.classifier
        if not evaluate:
            return [None] * len(eqn.outvars), out_kinds
        outs = _apply(eqn, rule, info, values, contrastive_here)
        return (outs if eqn.primitive.multiple_results else [outs]), out_kinds

    return evaluate_jaxpr(jaxpr, consts, 0, args, arg_kinds, eval_equation, literal_tag=lambda _: 0)


def _apply(eqn, rule, info, values, contrastive_here):
    prim, params = eqn.primitive, eqn.params
    if rule == "plain":  # bind as jax.core.eval_jaxpr does (custom_jvp/vjp calls need their bind parameters)
        return prim.bind(*values, **prim.get_bind_params(params))
    operands = operand_values(eqn, values)
    if rule == "pass":
        return _pass_rule(prim, params, info)(*operands)
    if rule == "residual":
        return _residual_rule(prim, params)(*operands)
    if rule == "linear":
        data_pos, weight_pos = info
        return _linear_rule(prim, params, data_pos, weight_pos, contrastive_here)(*operands)
    return _unsupported_rule(eqn, info)(*operands)


def with_excitation_rules(fn: Callable, *, probe_argnums: int | Sequence[int] = (), contrastive: bool = False
                          ) -> Callable:
    """Gives ``fn`` Excitation Backprop backward rules: same outputs, but ``jax.vjp`` propagates EB signals.

    ``jax.vjp(with_excitation_rules(fn), *args)`` evaluated with a top-down prior over the outputs as cotangent
    returns the marginal winning probabilities ``P(a_i)`` (Bargal 2019, Eq. 4.1) of the arguments; with probe
    arguments (perturbations added to layer activations) it returns ``P`` at those layers, one backward pass for
    all of them.

    Args:
      fn: a function of arrays (pytrees of arrays), e.g. ``lambda images, perturbation: ...``. Arrays it closes
        over (model parameters, batch-norm statistics) are the network's weights.
      probe_argnums: positions of the arguments that are layer perturbations (each leaf is added to one layer's
        activations and must otherwise only be reshaped/broadcast). All other arguments are data (images).
      contrastive: contrastive EB (Zhang et al. 2016, Sec. 3.3; Bargal 2019, Fig. 4.2): the classifier layer
        (the last dense/conv operation applied to data, in evaluation order) propagates the signal of the
        output units minus the signal of their dual units, whose weights are negated. Since every rule is linear
        in the signal, this equals running EB with the negated classifier to any contrast layer below the
        classifier, subtracting it from the normal pass there and continuing down: one pass gives the
        contrastive signal at every layer under the classifier.

    Returns:
      A function with ``fn``'s signature and outputs. Under ``jax.vjp``, every backward step uses the rules in
      this module's docstring; reaching a primitive without a rule raises :class:`UnsupportedOperationError`.
      Jittable and vmappable.

    Raises:
      ValueError: (when called) with ``contrastive=True`` if no dense/conv operation is applied to the data, or
        if the classifier found does not depend on the probes (the layer is not below the classifier).
    """
    if isinstance(probe_argnums, int):
        probe_argnums = (probe_argnums,)
    probe_argnums = tuple(probe_argnums)

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        arg_kinds = []
        for i, a in enumerate(args):
            arg_kinds += [_PROBE if i in probe_argnums else _DATA] * len(jax.tree_util.tree_leaves(a))
        leaves = jax.tree_util.tree_leaves(args)
        consts = list(closed.consts)
        classifier = None
        if contrastive:
            scan = _Context(contrastive=False)
            _run(closed.jaxpr, consts, leaves, arg_kinds, scan, evaluate=False)
            if not scan.weighted:
                raise ValueError("contrastive Excitation Backprop needs a classifier layer (a dense or conv "
                                 "operation on the data); the function applies none")
            classifier, kind = scan.weighted[-1]
            if probe_argnums and not kind & _PROBE:
                raise ValueError("contrastive Excitation Backprop: the classifier layer (the last dense/conv "
                                 "operation) does not depend on the layer perturbation; choose a layer below the "
                                 "classifier")
        ctx = _Context(contrastive=contrastive, classifier=classifier)
        outs, _ = _run(closed.jaxpr, consts, leaves, arg_kinds, ctx, evaluate=True)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
