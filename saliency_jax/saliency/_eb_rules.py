"""Excitation Backprop backward rules for JAX primitives, applied by re-evaluating a model's jaxpr.

Private machinery of :mod:`saliency_jax.saliency.excitation_backprop` and :mod:`saliency_jax.saliency.recurrent`
(read their docstrings first).

:func:`with_excitation_rules` traces a function to a jaxpr (``jax.make_jaxpr``) and evaluates it again, equation by
equation, with every primitive that touches the data replaced by a ``jax.custom_vjp`` function whose backward pass
is the primitive's Excitation Backprop (EB) rule (Zhang et al. 2016, "Top-down Neural Attention by Excitation
Backprop"; Bargal 2019, Eq. 4.1-4.2 and, through time, Eq. 7.1-7.4). The forward values are unchanged; ``jax.vjp``
of the result propagates marginal winning probabilities instead of gradients. Because the rules act on primitives,
any model whose forward pass is a JAX function works unmodified: Flax linen and NNX modules, plain functions,
recurrent networks written with ``lax.scan`` (``flax.linen.RNN``, ``nn.scan``).

Each value of the traced function gets a *kind* once, from how it was computed (never from its numbers), as bit
flags:

* *parameter* (no flag): derived only from closed-over arrays and literals (weights, BN statistics, biases);
* ``DATA``: depends on a data argument (the images);
* ``PROBE``: depends on a probe argument, a perturbation that the model adds to a layer's activations
  (:class:`~saliency_jax.saliency.core.LayerModel`); ``activations + probe`` passes the signal through unchanged,
  so the cotangent of the probe is the EB signal at that layer;
* ``GATE``: the output of a sigmoid (``logistic``) of data, and reshapes/slices of it - an LSTM gate;
* ``CARRY``: inside the body of a ``lax.scan``, depends on the loop's carry (the recurrent state ``h_{t-1}``,
  ``c_{t-1}``); values computed from the step's input alone do not carry it;
* ``RECURRENT``: inside the body of a ``lax.scan``, depends on a dense/conv transform of the carry (``W_h h_{t-1}``,
  the recurrent transform of an LSTM's gate pre-activation).

Rules are a registry (:data:`RULES`): for each primitive name, a function of the equation and the kinds of its
operands that chooses the backward rule (:class:`Rule`). ``p`` is the top-down signal at the output, ``x`` the
data operand; ``0 / 0 := 0``, and more generally a zero denominator gives zero:

==========================================  =======================================================================
primitive (operand kinds)                   backward rule
==========================================  =======================================================================
``dot_general``, ``conv_general_dilated``   ``x * L_{W+}^T(p / L_{W+}(x))``: ``W+ = max(W, 0)`` of the parameter
with one parameter operand ``W``            operand, bias ignored (dense and convolution layers, Eq. 4.2 / 7.1)
``reduce_window_sum``, ``reduce_sum``       ``x * L^T(p / L(x))`` (average / global average pooling, spatial sums)
``add`` of two data operands                ``x_i / (x_1 + x_2) * p`` (residual sums; the LSTM cell state
                                            ``c = f * c_prev + i * g``, see *recurrent rules*)
``add`` of the recurrent transform and the  all of ``p`` to the input operand (the LSTM gate pre-activation
input (one operand ``RECURRENT``)           ``W_h h_{t-1} + W_x x_t``), see *recurrent rules*
``mul`` of a ``GATE`` and data              ``p`` unchanged to the data operand, none to the gate
``logistic`` (sigmoid) of data              no signal (the gate is a constant); its output is a ``GATE``
``mul``/``div`` of a ``GATE`` and a         no signal (a constant times a constant, e.g. ``f * c_0`` with a
parameter                                   constant initial state)
``add``/``sub``/``mul``/``div`` with a      ``p`` unchanged (bias, batch norm in inference mode, input
parameter operand (data first for ``sub``,  normalisation, the ``1 / n`` of a mean)
``div``)
``max``, ``reduce_max``,                    the gradient (ReLU, max pooling: the signal goes to the winner)
``reduce_window_max``, ``select_n``
reshapes, transposes, broadcasts, slices,   the gradient (they only move values)
``concatenate``, ``gather``, ``pad``,
``convert_element_type``, ...
``scan``                                    re-evaluated as a ``lax.scan`` with these rules in its body, so the
                                            backward pass runs them back through time (EB-R, Eq. 7.1-7.4)
``jit``, ``custom_jvp_call``,               evaluated recursively (``jax.nn.relu`` is a ``custom_jvp`` around
``custom_vjp_call``, ``checkpoint``         ``max``)
``while``, ``cond``, anything else          forward as usual; the backward pass raises
touching data                               :class:`UnsupportedOperationError` naming the primitive
==========================================  =======================================================================

Recurrent rules (Bargal 2019, Sec. 7.1; the thesis replaces ``tanh`` by ReLU so that EB's assumptions hold:
``g = ReLU(x_g)``, ``h = o * ReLU(c)``, gates sigmoid; ``tanh`` still raises). The thesis says EB (Eq. 7.1) is run
through the unrolled LSTM but not how the cell's products and sums split the signal; the authors' released code
(``sbargal/Caffe-ExcitationBP-RNNs``) settles it and is followed where it is explicit:

* gate pre-activation ``W_h h_{t-1} + b + W_x x_t`` (``add`` with exactly one ``RECURRENT`` operand): the
  released code's ``Eltwise`` EB backward copies the signal to the input transform ``W_x x_t`` (bottoms 1, 2) and
  gives the recurrent transform ``W_h h_{t-1}`` (bottom 0) zero, so the signal goes back in time only through the
  cell state. Pre-activations are signed, so the proportional split of a residual sum would not be a distribution.
  (A sum of the carry itself and the input, ``h_{t-1} + x_t`` with no recurrent weights, is a residual sum.)
* ``cell_rule="excitation"`` (EB read literally, as in the thesis text; one flag away): a gate product ``o * ReLU(c)``,
  ``f * c_prev``, ``i * g`` passes the signal to its data operand with the gate as a constant weight, so the
  signal is unchanged (a unit with a single child, Eq. 4.2: ``Z_j a_i w_ij = 1``) and the gate gets none; the cell
  state ``c = f * c_prev + i * g`` splits it in proportion, ``f c_prev / c`` back in time and ``i g / c`` to the
  step's input (both terms are >= 0 with ReLU). The signal is a probability distribution at every step: EB-R
  conserves it from the prior to the network's input.
* ``cell_rule="gradient"`` (default: the released code, with which the thesis's Tables 7.1 / 7.2 were made): its
  ``LSTMUnit`` layer's EB backward is its ordinary gradient
  (``Backward_eb_gpu`` runs the same kernels as ``Backward_gpu``), so inside the cell the signal follows the
  gradient of the ReLU-LSTM: ``p_c = p_c' + o [c > 0] p_h``, ``p_{c_prev} = f p_c``, ``p_g = i [g' > 0] p_c``, and
  the gates get ``p_i = g i (1 - i) p_c``, ``p_f = c_prev f (1 - f) p_c``, ``p_o = ReLU(c) o (1 - o) p_h``. In
  primitive terms: ``logistic`` and the gate products take their gradient, ``add`` of two ``CARRY`` operands
  copies ``p`` to both. This signal is not a distribution; the temporal normalisation of Eq. 7.5 rescales it.

All rules are linear in ``p`` for fixed activations, which is what lets contrastive EB run as one pass (see
:func:`with_excitation_rules`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency._jaxpr import (
    evaluate_jaxpr,
    evaluate_scan,
    inner_jaxpr,
    is_float,
    operand_values,
    source_location,
    unbroadcast,
)

Array = jax.Array
CellRule = Literal["excitation", "gradient"]

__all__ = ["CELL_RULES", "RULES", "Rule", "UnsupportedOperationError", "register_rule", "with_excitation_rules"]

# Value kinds, as bit flags (0 = parameter). A value derived from several operands carries the union of their
# DATA / PROBE / CARRY / RECURRENT flags; GATE is set only by the rules that make or move gates, RECURRENT by dense
# and conv layers applied to the carry.
DATA = 1
PROBE = 2
GATE = 4
CARRY = 8
RECURRENT = 16
_LOOP = CARRY | RECURRENT  # flags that refer to the innermost enclosing loop
_SIGNAL = DATA | PROBE  # flags of values that a signal can reach

CELL_RULES = ("excitation", "gradient")

# Primitives that only move, copy or select values: their gradient is also their EB rule (each output has one
# parent, so Eq. 4.1 sums the signal of the copies, as the gradient does).
_STRUCTURAL = frozenset({
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "concatenate", "slice",
    "dynamic_slice", "dynamic_update_slice", "gather", "pad", "rev", "copy", "copy_p", "convert_element_type",
    "reduce_precision", "split", "sharding_constraint", "device_put", "optimization_barrier",
})
# Winner-take-all selections: the signal is routed like the gradient (ReLU = max(x, 0), max pooling, where).
_ROUTING = frozenset({"max", "reduce_max", "reduce_window_max", "select_n"})


class UnsupportedOperationError(ValueError):
    """The Excitation Backprop signal reached a JAX primitive that has no EB rule.

    Raised (while the backward pass is traced) instead of returning a wrong map. The message names the primitive,
    where it was called from, and why it has no rule (e.g. ``tanh``, a data-dependent normaliser such as batch norm
    in training mode, a product of two data-dependent tensors as in attention, or a ``while`` loop).
    """


@dataclasses.dataclass(frozen=True)
class Rule:
    """The backward rule chosen for one equation.

    Attributes:
      name: ``"gradient"`` (bind the primitive as is: its gradient is the EB rule, or no signal flows),
        ``"pass"`` (the signal goes unchanged to operand ``data_pos``, none to the others), ``"residual"``
        (``x_i / sum(x) * p``), ``"linear"`` (``x * L_{W+}^T(p / L_{W+}(x))``; ``weight_pos`` None for pooling),
        ``"constant"`` (no signal to any operand), ``"scan"`` (re-evaluate the loop with these rules) or
        ``"unsupported"`` (the backward pass raises, giving ``reason``).
      data_pos: the operand that receives the signal (``"pass"``, ``"linear"``).
      weight_pos: the parameter operand of a ``"linear"`` rule, or None.
      reason: why there is no rule (``"unsupported"``).
      gate: whether the outputs are gates (``GATE`` flag).
    """

    name: str
    data_pos: int | None = None
    weight_pos: int | None = None
    reason: str = ""
    gate: bool = False


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-call settings that the rule choosers read."""

    contrastive: bool = False
    cell_rule: CellRule = "gradient"


# The registry: primitive name -> chooser(eqn, kinds, options) -> Rule, for equations whose operands may carry a
# signal (some operand has DATA or PROBE) and that have a floating-point output. Primitives not listed raise.
RuleChooser = Callable[[Any, Sequence[int], Options], Rule]
RULES: dict[str, RuleChooser] = {}

_GRADIENT = Rule("gradient")


def register_rule(*names: str) -> Callable[[RuleChooser], RuleChooser]:
    """Registers a rule chooser for the named primitives (a new primitive is a new entry, not a new branch).

    Args:
      *names: primitive names (``eqn.primitive.name``).

    Returns:
      A decorator that stores the chooser ``chooser(eqn, kinds, options) -> Rule`` under every name.
    """

    def decorate(chooser: RuleChooser) -> RuleChooser:
        for name in names:
            RULES[name] = chooser
        return chooser

    return decorate


def _data(kinds: Sequence[int]) -> list[bool]:
    return [bool(k & DATA) for k in kinds]


@register_rule(*_STRUCTURAL)
def _structural(eqn, kinds, options):
    """Moves values: the gradient. A gate stays a gate if every signal-carrying operand is one."""
    signal = [k for k in kinds if k & _SIGNAL]
    return Rule("gradient", gate=all(k & GATE for k in signal))


@register_rule(*_ROUTING)
def _routing(eqn, kinds, options):
    """ReLU, max pooling, ``where``: the signal goes to the winner, like the gradient."""
    return _GRADIENT


@register_rule("reduce_sum", "reduce_window_sum")
def _pooling(eqn, kinds, options):
    """Linear maps with non-negative coefficients and no parameter operand: ``x * L^T(p / L(x))``."""
    return Rule("linear", data_pos=0)


@register_rule("conv_general_dilated")
def _convolution(eqn, kinds, options):
    """Convolution with a parameter kernel: the ``W+`` rule (Eq. 4.2)."""
    data = _data(kinds)
    if data[0] and not data[1]:
        return Rule("linear", data_pos=0, weight_pos=1)
    return Rule("unsupported", reason="convolution whose kernel depends on the data")


@register_rule("dot_general")
def _dense(eqn, kinds, options):
    """Dense layer (either operand may be the data): the ``W+`` rule (Eq. 4.2 / 7.1)."""
    data = _data(kinds)
    if sum(data) == 1:
        pos = data.index(True)
        return Rule("linear", data_pos=pos, weight_pos=1 - pos)
    return Rule("unsupported", reason="product of two data-dependent tensors (e.g. attention)")


@register_rule("logistic")
def _sigmoid(eqn, kinds, options):
    """A sigmoid of data is a gate: a constant for EB (no signal), or its gradient (the released code)."""
    if options.cell_rule == "gradient":
        return Rule("gradient", gate=True)  # LSTMUnit backward of the released code: sigmoid'(x) * p
    return Rule("constant", gate=True)


@register_rule("add", "sub", "mul", "div")
def _arithmetic(eqn, kinds, options):
    """Element-wise arithmetic: affine maps with parameters, residual and LSTM-cell sums, gate products."""
    name = eqn.primitive.name
    data = _data(kinds)
    if all(data):
        gates = [bool(k & GATE) for k in kinds]
        carry = [bool(k & CARRY) for k in kinds]
        recurrent = [bool(k & RECURRENT) for k in kinds]
        if name == "add":
            if recurrent[0] != recurrent[1]:
                # Gate pre-activation W_h h_{t-1} + W_x x_t: the released code's Eltwise EB backward copies the
                # signal to the input transform and gives the recurrent one zero (signal back in time only
                # through the cell state).
                return Rule("pass", data_pos=recurrent.index(False))
            if all(carry) and options.cell_rule == "gradient":
                return _GRADIENT  # c = f * c_prev + i * g inside the released code's LSTMUnit: p to both terms
            return Rule("residual")
        if name == "mul" and sum(gates) == 1:
            if options.cell_rule == "gradient":
                return _GRADIENT  # the released code's LSTMUnit: p_x = gate * p, p_gate = x * p
            return Rule("pass", data_pos=gates.index(False))  # gate = constant weight of a single-child unit
        return Rule("unsupported", reason=(
            f"'{name}' of two data-dependent tensors (e.g. a normaliser with batch statistics, batch norm in "
            "training mode, attention, or a product that is not a sigmoid gate times data)"))
    if any(k & GATE for k in kinds):
        if name in ("mul", "div"):  # a gate scaled by a parameter (f * c_0 with a constant initial state)
            return _GRADIENT if options.cell_rule == "gradient" else Rule("constant")
        return _gate_misuse(name)
    pos = data.index(True)
    if name in ("sub", "div") and pos != 0:
        return Rule("unsupported", reason=f"'{name}' with the data-dependent tensor as its second operand")
    return Rule("pass", data_pos=pos)


@register_rule("scan")
def _scan(eqn, kinds, options):
    """``lax.scan`` (``flax.linen.RNN``, ``nn.scan``): the rules are applied inside its body (EB-R)."""
    return Rule("scan")


@register_rule("while")
def _while(eqn, kinds, options):
    return Rule("unsupported", reason=(
        "a while loop (lax.while_loop, or fori_loop with traced bounds) cannot be run backwards; write the loop "
        "with lax.scan (fori_loop with static bounds, flax.linen.RNN, nn.scan)"))


@register_rule("cond")
def _cond(eqn, kinds, options):
    return Rule("unsupported", reason="data-dependent control flow (lax.cond / lax.switch) has no EB rule")


def _gate_misuse(name: str) -> Rule:
    return Rule("unsupported", reason=(
        f"'{name}' applied to a sigmoid ('logistic') output: EB-R treats a sigmoid only as a gate that multiplies "
        "data (an LSTM gate), not as an activation carrying the signal"))


def choose_rule(eqn, kinds: Sequence[int], options: Options) -> Rule:
    """Chooses the EB rule of a (non-call) equation from the kinds of its operands, via :data:`RULES`."""
    name = eqn.primitive.name
    if not any(is_float(v.aval) for v in eqn.outvars) or not any(k & _SIGNAL for k in kinds):
        return _GRADIENT  # constants, or boolean/integer results (comparisons, argmax): no signal
    has_data = [bool(k & DATA) for k in kinds]
    probe_only = [(k & _SIGNAL) == PROBE for k in kinds]
    if not any(has_data):
        if name in _STRUCTURAL:
            return _GRADIENT
        return Rule("unsupported", reason="a layer perturbation (probe) may only be reshaped/broadcast and added "
                                          "to activations")
    if any(probe_only):
        if name == "add" and len(kinds) == 2:
            return _GRADIENT  # activations + perturbation: the tap that reads the signal at a layer
        return Rule("unsupported", reason="a layer perturbation (probe) may only be added to activations")
    if any(k & GATE for k in kinds) and name not in _STRUCTURAL and name != "mul":
        return _gate_misuse(name)
    chooser = RULES.get(name)
    if chooser is None:
        return Rule("unsupported", reason="no Excitation Backprop rule for this operation")
    return chooser(eqn, kinds, options)


# ---------------------------------------------------------------------------------------------------------------
# The backward rules, as jax.custom_vjp functions around the primitive.


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


def _with_backward(prim, params, backward: Callable[[tuple, Array], tuple]):
    """The primitive as a ``jax.custom_vjp`` function with ``backward(operands, p) -> operand cotangents``."""

    @jax.custom_vjp
    def rule(*operands):
        return _bind(prim, params, operands)

    def fwd(*operands):
        return _bind(prim, params, operands), operands

    rule.defvjp(fwd, backward)
    return rule


def _pass_rule(prim, params, data_pos):
    """The signal goes unchanged to operand ``data_pos`` (bias, batch norm, gate products, the input transform)."""

    def bwd(operands, p):
        return tuple(unbroadcast(p, o) if i == data_pos else _zero_cotangent(o) for i, o in enumerate(operands))

    return _with_backward(prim, params, bwd)


def _constant_rule(prim, params):
    """No signal to any operand (a sigmoid gate, a constant weight for EB)."""

    def bwd(operands, p):
        return tuple(_zero_cotangent(o) for o in operands)

    return _with_backward(prim, params, bwd)


def _residual_rule(prim, params):
    """Sum of two data tensors: ``p_i = x_i / (x_1 + x_2) * p``."""

    def bwd(operands, p):
        a, b = operands
        s = _safe_div(p, a + b)
        return unbroadcast(a * s, a), unbroadcast(b * s, b)

    return _with_backward(prim, params, bwd)


def _linear_rule(prim, params, data_pos, weight_pos, contrastive):
    """Dense, conv and pooling: ``x * L_{W+}^T(p / L_{W+}(x))`` (Eq. 4.2 with Z_j = 1 / sum_i x_i w+_ij).

    With ``contrastive``, the rule of the dual units (weights negated) is subtracted:
    ``x * L_{W+}^T(p / L_{W+}(x)) - x * L_{(-W)+}^T(p / L_{(-W)+}(x))``.
    """

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

    return _with_backward(prim, params, bwd)


_EB_SUPPORTED = (
    "Excitation Backprop cannot propagate through", "Supported on the path from the layer to the logits: dense/conv "
    "layers with parameter weights, average/global-average/max pooling, ReLU, residual sums, batch norm in inference "
    "mode, affine ops with parameter operands, reshapes/slices/concatenation, lax.scan loops (ReLU-LSTM cells: sigmoid "
    "gates times data). Explain the logits, not softmax probabilities, and apply the model in inference mode.")


def unsupported_rule(eqn, reason: str, method: tuple[str, str] = _EB_SUPPORTED):
    """Forward as usual; the backward pass raises :class:`UnsupportedOperationError`, naming the primitive, its
    operands' shapes and its source line (only if the signal reaches it). ``method``: (what cannot propagate, what is
    supported), the two parts of the message that differ between EB and LRP."""
    prim, params = eqn.primitive, eqn.params
    where = source_location(eqn)
    in_shapes = ", ".join(f"{v.aval.str_short()}" for v in eqn.invars)
    cannot, supported = method

    def bwd(_, p):
        raise UnsupportedOperationError(f"{cannot} primitive '{prim.name}' ({in_shapes}) at {where}: {reason}. "
                                        f"{supported}")

    @jax.custom_vjp
    def rule(*operands):
        return _bind(prim, params, operands)

    rule.defvjp(lambda *operands: (_bind(prim, params, operands), None), bwd)
    return rule


# ---------------------------------------------------------------------------------------------------------------
# Traversal.


@dataclasses.dataclass
class _Context:
    """State shared by one traversal of a jaxpr (and its inner jaxprs), in evaluation order.

    ``classifier`` is the *path* of the weighted equation that gets the contrastive rule: the indices of the
    enclosing equations from the top jaxpr down, so a jaxpr shared by two call sites (a jitted layer used twice)
    or a loop body traced twice still names one equation.
    """

    options: Options
    classifier: tuple | None = None
    record: bool = True  # False while only computing the tags of a loop body (its fixpoint rounds)
    weighted: list = dataclasses.field(default_factory=list)  # (path, kind of its data operand), evaluation order


def _join(a: int, b: int) -> int:
    return a | b


def _scan_body_kinds(const_kinds, carry_kinds, xs_kinds):
    """Kinds of a scan body's arguments: CARRY marks the (signal-carrying) carry, and only it; the loop flags of an
    enclosing loop do not enter."""
    inner = [k & ~_LOOP for k in const_kinds]
    carry = [(k & ~_LOOP) | (CARRY if k & _SIGNAL else 0) for k in carry_kinds]
    return inner + carry + [k & ~_LOOP for k in xs_kinds]


def _scan_output_kinds(body_kinds, operand_kinds):
    """The loop's own flags do not leave it; an enclosing loop's flags pass through from the operands."""
    outer = 0
    for k in operand_kinds:
        outer |= k & _LOOP
    return [(k & ~_LOOP) | (outer if k & _SIGNAL else 0) for k in body_kinds]


def _run(jaxpr, consts, args, arg_kinds, ctx: _Context, evaluate: bool, path: tuple = ()):
    """Evaluates (or, with ``evaluate=False``, only classifies) a jaxpr under EB rules.

    Constants are parameters (kind 0), as are literals; ``arg_kinds`` are the kinds of ``args``.

    Returns:
      ``(outputs, output_kinds)``; outputs are None when not evaluating.
    """
    index = iter(range(len(jaxpr.eqns)))

    def eval_equation(eqn, values, in_kinds):
        here = path + (next(index),)
        inner = inner_jaxpr(eqn)
        if inner is not None and any(in_kinds):
            body, body_consts = inner
            return _run(body, body_consts, values, in_kinds, ctx, evaluate, here)
        rule = choose_rule(eqn, in_kinds, ctx.options)
        if rule.name == "scan":
            return _eval_scan(eqn, values, in_kinds, ctx, evaluate, here)
        kind = 0
        for k in in_kinds:
            kind |= k & ~GATE
        if rule.gate and kind & _SIGNAL:
            kind |= GATE
        if rule.name == "linear" and rule.weight_pos is not None and in_kinds[rule.data_pos] & CARRY:
            kind |= RECURRENT  # W_h h_{t-1}: a weighted transform of the recurrent state
        out_kinds = [kind if is_float(v.aval) else 0 for v in eqn.outvars]
        contrastive_here = False
        if rule.name == "linear" and rule.weight_pos is not None:
            if ctx.record:
                ctx.weighted.append((here, in_kinds[rule.data_pos]))
            contrastive_here = ctx.options.contrastive and here == ctx.classifier
        if not evaluate:
            return [None] * len(eqn.outvars), out_kinds
        outs = _apply(eqn, rule, values, contrastive_here)
        return (outs if eqn.primitive.multiple_results else [outs]), out_kinds

    return evaluate_jaxpr(jaxpr, consts, 0, args, arg_kinds, eval_equation, literal_tag=lambda _: 0)


def _eval_scan(eqn, values, kinds, ctx: _Context, evaluate: bool, path: tuple):
    """A ``scan`` equation: its body under the same rules, inside a new ``lax.scan`` (EB through time)."""
    body = eqn.params["jaxpr"]
    settling = dataclasses.replace(ctx, record=False)  # shares options and classifier, records nothing

    def evaluate_body(args, arg_kinds, body_evaluate, final):
        return _run(body.jaxpr, list(body.consts), args, arg_kinds, ctx if final else settling, body_evaluate, path)

    return evaluate_scan(eqn, values, kinds, evaluate_body, body_tags=_scan_body_kinds, join=_join,
                         output_tags=_scan_output_kinds, evaluate=evaluate)


def _apply(eqn, rule: Rule, values, contrastive_here):
    prim, params = eqn.primitive, eqn.params
    if rule.name == "gradient":  # bind as jax.core.eval_jaxpr does (custom_jvp/vjp calls need their bind params)
        return prim.bind(*values, **prim.get_bind_params(params))
    operands = operand_values(eqn, values)
    if rule.name == "pass":
        return _pass_rule(prim, params, rule.data_pos)(*operands)
    if rule.name == "constant":
        return _constant_rule(prim, params)(*operands)
    if rule.name == "residual":
        return _residual_rule(prim, params)(*operands)
    if rule.name == "linear":
        return _linear_rule(prim, params, rule.data_pos, rule.weight_pos, contrastive_here)(*operands)
    return unsupported_rule(eqn, rule.reason)(*operands)


def with_excitation_rules(fn: Callable, *, probe_argnums: int | Sequence[int] = (), contrastive: bool = False,
                          cell_rule: CellRule = "gradient") -> Callable:
    """Gives ``fn`` Excitation Backprop backward rules: same outputs, but ``jax.vjp`` propagates EB signals.

    ``jax.vjp(with_excitation_rules(fn), *args)`` evaluated with a top-down prior over the outputs as cotangent
    returns the marginal winning probabilities ``P(a_i)`` (Bargal 2019, Eq. 4.1; through time Eq. 7.3) of the
    arguments; with probe arguments (perturbations added to layer activations) it returns ``P`` at those layers,
    one backward pass for all of them.

    Args:
      fn: a function of arrays (pytrees of arrays), e.g. ``lambda images, perturbation: ...``. Arrays it closes
        over (model parameters, batch-norm statistics) are the network's weights.
      probe_argnums: positions of the arguments that are layer perturbations (each leaf is added to one layer's
        activations and must otherwise only be reshaped/broadcast). All other arguments are data (images).
      contrastive: contrastive EB (Zhang et al. 2016, Sec. 3.3; Bargal 2019, Fig. 4.2, Eq. 7.2/7.4): the
        classifier layer (the last dense/conv operation applied to data, in evaluation order) propagates the
        signal of the output units minus the signal of their dual units, whose weights are negated. Since every
        rule is linear in the signal, this equals running EB with the negated classifier to any contrast layer
        below the classifier, subtracting it from the normal pass there and continuing down: one pass gives the
        contrastive signal at every layer under the classifier.
      cell_rule: how gated recurrent cells (sigmoid gates times data inside ``lax.scan``) split the signal:
        ``"excitation"`` (EB with gates as constant weights; conserves the signal) or ``"gradient"`` (the
        authors' released code: the gradient of the ReLU-LSTM unit). See this module's docstring.

    Returns:
      A function with ``fn``'s signature and outputs. Under ``jax.vjp``, every backward step uses the rules in
      this module's docstring; reaching a primitive without a rule raises :class:`UnsupportedOperationError`.
      Jittable and vmappable.

    Raises:
      ValueError: (when called) with ``contrastive=True`` if no dense/conv operation is applied to the data, or
        if the classifier found does not depend on the probes (the layer is not below the classifier); an unknown
        ``cell_rule`` (at once).
    """
    if cell_rule not in CELL_RULES:
        raise ValueError(f"cell_rule must be one of {CELL_RULES}; got {cell_rule!r}")
    if isinstance(probe_argnums, int):
        probe_argnums = (probe_argnums,)
    probe_argnums = tuple(probe_argnums)

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        arg_kinds = []
        for i, a in enumerate(args):
            arg_kinds += [PROBE if i in probe_argnums else DATA] * len(jax.tree_util.tree_leaves(a))
        leaves = jax.tree_util.tree_leaves(args)
        consts = list(closed.consts)
        classifier = None
        if contrastive:
            scan = _Context(Options(contrastive=False, cell_rule=cell_rule))
            _run(closed.jaxpr, consts, leaves, arg_kinds, scan, evaluate=False)
            if not scan.weighted:
                raise ValueError("contrastive Excitation Backprop needs a classifier layer (a dense or conv "
                                 "operation on the data); the function applies none")
            classifier, kind = scan.weighted[-1]
            if probe_argnums and not kind & PROBE:
                raise ValueError("contrastive Excitation Backprop: the classifier layer (the last dense/conv "
                                 "operation) does not depend on the layer perturbation; choose a layer below the "
                                 "classifier")
        ctx = _Context(Options(contrastive=contrastive, cell_rule=cell_rule), classifier=classifier)
        outs, _ = _run(closed.jaxpr, consts, leaves, arg_kinds, ctx, evaluate=True)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
