"""Layer-wise relevance propagation (LRP) backward rules for JAX primitives, applied by re-evaluating a jaxpr.

Private machinery of :mod:`saliency_jax.saliency.lrp` (read its docstring first). It works like Excitation
Backprop's (:mod:`saliency_jax.saliency._eb_rules`): :func:`with_lrp_rules` traces a function to a jaxpr and
evaluates it again (:func:`saliency_jax.saliency._jaxpr.evaluate_jaxpr`), binding every primitive that touches the
data through a ``jax.custom_vjp`` function whose backward pass is the primitive's LRP rule. Forward values are
unchanged; ``jax.vjp`` of the result propagates relevance instead of gradients, so unmodified Flax linen / NNX
modules and plain functions work. Rules are a registry (:data:`LRP_RULES`, primitive name -> chooser), the shape of
EB's :data:`~saliency_jax.saliency._eb_rules.RULES`: the same primitive gets a different backward rule under LRP,
hence a second table keyed the same way. Unsupported primitives raise
:class:`~saliency_jax.saliency._eb_rules.UnsupportedOperationError` naming the primitive.

Each value is tagged ``True`` when it depends on a data argument (the images), ``False`` for parameters (weights,
biases, batch-norm statistics, literals).

**Merging element-wise affine operations into the linear layer before them** (what zennit's ``MergeBatchNorm``
canonizers do for batch norm, done here for any such chain): a dense / conv / sum-pooling equation is not evaluated
at once; its output stays pending while its only consumer is ``add`` / ``sub`` / ``mul`` / ``div`` with a parameter
operand (a bias, inference-mode batch norm's ``- mean``, ``* scale / sqrt(var + eps)``, ``+ beta``; an average
pool's ``/ window size``) or a float ``convert_element_type``, which are appended to it. The first other consumer
evaluates the merged layer ``y = s * L(x) + t`` (``s``, ``t``: the element-wise scale and shift of the appended
operations, per output element) as one ``jax.custom_vjp`` function whose rule uses the merged weights ``s * W`` and
bias ``t``, as the relevance rules on a canonized torch model do. Merging stops at the boundary of a call-like
primitive (``jit``, ``checkpoint``, custom derivatives): a conv outside a ``jax.jit`` and its batch norm inside one
are not merged (the batch norm then passes relevance unchanged); flax's own layers produce no such boundary.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from saliency_jax.saliency._eb_rules import _with_backward, _zero_cotangent, unsupported_rule
from saliency_jax.saliency._jaxpr import (
    evaluate_jaxpr,
    inner_jaxpr,
    is_float,
    operand_values,
    unbroadcast,
)

Array = jax.Array
RuleName = Literal["epsilon", "alpha_beta", "zplus"]

__all__ = ["LRP_RULES", "LRPOptions", "LRPRule", "RULE_NAMES", "register_lrp_rule", "stabilize", "with_lrp_rules"]

RULE_NAMES = ("epsilon", "alpha_beta", "zplus")

# Primitives that only move, copy or select values: relevance follows the gradient (each output element has one
# source; copies add up).
_STRUCTURAL = frozenset({
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "concatenate", "slice",
    "dynamic_slice", "dynamic_update_slice", "gather", "pad", "rev", "copy", "copy_p", "convert_element_type",
    "reduce_precision", "split", "sharding_constraint", "device_put", "optimization_barrier",
})
# Winner-take-all selections between data values: relevance goes to the winner, like the gradient (max pooling:
# zennit leaves max pooling to the gradient).
_ROUTING = frozenset({"reduce_max", "reduce_window_max", "reduce_min", "select_n"})
# Element-wise activations: relevance passes unchanged (zennit's ``Pass`` rule for activation modules).
_ACTIVATIONS = frozenset({"tanh", "logistic"})
# Element-wise affine operations that can be merged into a preceding linear layer.
_AFFINE = frozenset({"add", "sub", "mul", "div"})


@dataclasses.dataclass(frozen=True)
class LRPOptions:
    """The LRP rule of dense / conv layers and its constants (see :func:`with_lrp_rules`)."""

    rule: RuleName = "epsilon"
    epsilon: float = 1e-6
    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6


@dataclasses.dataclass(frozen=True)
class LRPRule:
    """The backward rule chosen for one equation.

    Attributes:
      name: ``"gradient"`` (bind the primitive as is: relevance follows its gradient, or no relevance flows),
        ``"pass"`` (relevance unchanged to operand ``data_pos``), ``"linear"`` (the layer rule of
        :class:`LRPOptions` for a weighted layer, the stabilised sum rule for a pooling; ``weight_pos`` None for
        pooling), ``"sum"`` (a sum of two data tensors: ``R_i = x_i R / stab(x_1 + x_2)``) or ``"unsupported"``
        (the backward pass raises, giving ``reason``).
      data_pos: the operand that receives relevance (``"pass"``, ``"linear"``).
      weight_pos: the parameter operand of a ``"linear"`` rule, or None.
      affine: an element-wise affine operation with a parameter operand, which a pending linear layer absorbs.
      reason: why there is no rule (``"unsupported"``).
    """

    name: str
    data_pos: int | None = None
    weight_pos: int | None = None
    affine: bool = False
    reason: str = ""


# The registry: primitive name -> chooser(eqn, data) -> LRPRule, for equations with a floating-point output and at
# least one data-dependent operand (``data[i]``: whether operand i depends on the data). Primitives not listed raise.
LRPRuleChooser = Callable[[Any, Sequence[bool]], LRPRule]
LRP_RULES: dict[str, LRPRuleChooser] = {}

_GRADIENT = LRPRule("gradient")


def register_lrp_rule(*names: str) -> Callable[[LRPRuleChooser], LRPRuleChooser]:
    """Registers an LRP rule chooser ``chooser(eqn, data) -> LRPRule`` for the named primitives."""

    def decorate(chooser: LRPRuleChooser) -> LRPRuleChooser:
        for name in names:
            LRP_RULES[name] = chooser
        return chooser

    return decorate


@register_lrp_rule(*_STRUCTURAL, *_ROUTING)
def _follow_gradient(eqn, data):
    """Moves or selects values: the gradient."""
    return _GRADIENT


@register_lrp_rule(*_ACTIVATIONS)
def _activation(eqn, data):
    """Element-wise activation of data: relevance passes unchanged."""
    return LRPRule("pass", data_pos=0)


@register_lrp_rule("max", "min")
def _rectifier(eqn, data):
    """``max(x, 0)`` (ReLU), ``min(x, c)``, clipping: an activation (pass); ``max`` of two data tensors
    (maxout): the winner takes the relevance, like the gradient."""
    if all(data):
        return _GRADIENT
    return LRPRule("pass", data_pos=data.index(True))


@register_lrp_rule("reduce_sum", "reduce_window_sum")
def _pooling(eqn, data):
    """Sum / average pooling, spatial means: the stabilised sum rule ``x * L^T(R / stab(L(x)))``."""
    return LRPRule("linear", data_pos=0)


@register_lrp_rule("conv_general_dilated")
def _convolution(eqn, data):
    """Convolution with a parameter kernel: the layer rule."""
    if data[0] and not data[1]:
        return LRPRule("linear", data_pos=0, weight_pos=1)
    return LRPRule("unsupported", reason="convolution whose kernel depends on the data")


@register_lrp_rule("dot_general")
def _dense(eqn, data):
    """Dense layer (either operand may be the data): the layer rule."""
    if sum(data) == 1:
        pos = data.index(True)
        return LRPRule("linear", data_pos=pos, weight_pos=1 - pos)
    return LRPRule("unsupported", reason="product of two data-dependent tensors (e.g. attention)")


@register_lrp_rule(*_AFFINE)
def _arithmetic(eqn, data):
    """Element-wise arithmetic: a sum of two data tensors (residual connection) splits relevance in proportion;
    a parameter operand (bias, batch norm, input normalisation) is affine: merged into a preceding linear layer,
    otherwise relevance passes unchanged (zennit's ``Pass`` for batch norm)."""
    name = eqn.primitive.name
    if all(data):
        if name == "add":
            return LRPRule("sum")
        return LRPRule("unsupported", reason=(
            f"'{name}' of two data-dependent tensors (e.g. a normaliser with batch statistics, batch norm in "
            "training mode, layer norm, attention, a gated unit such as SiLU / GELU)"))
    pos = data.index(True)
    if name in ("sub", "div") and pos != 0:
        return LRPRule("unsupported", reason=f"'{name}' with the data-dependent tensor as its second operand")
    return LRPRule("pass", data_pos=pos, affine=True)


@register_lrp_rule("scan", "while")
def _loop(eqn, data):
    return LRPRule("unsupported", reason="loops (lax.scan / while_loop, recurrent networks) have no LRP rule here")


@register_lrp_rule("cond")
def _cond(eqn, data):
    return LRPRule("unsupported", reason="data-dependent control flow (lax.cond / lax.switch) has no LRP rule")


def choose_rule(eqn, data: Sequence[bool]) -> LRPRule:
    """The LRP rule of a (non-call) equation from which operands depend on the data, via :data:`LRP_RULES`."""
    if not any(is_float(v.aval) for v in eqn.outvars) or not any(data):
        return _GRADIENT  # parameters only, or boolean / integer results (comparisons, argmax): no relevance
    chooser = LRP_RULES.get(eqn.primitive.name)
    if chooser is None:
        return LRPRule("unsupported", reason="no LRP rule for this operation")
    return chooser(eqn, list(data))


# ---------------------------------------------------------------------------------------------------------------
# The rules.


def stabilize(z: Array, epsilon: float) -> Array:
    """``z + epsilon * sign(z)`` with ``sign(0) = 1``: the denominator of Bach et al. 2015's epsilon-stabilised rule
    (zennit's ``stabilize``). ``z``: any shape, float; the result has its shape and dtype."""
    return z + jnp.where(z >= 0, epsilon, -epsilon).astype(z.dtype)


def _bind(prim, params, operands):
    return prim.bind(*operands, **params)


@dataclasses.dataclass
class _Layer:
    """A linear equation (dense, conv, sum pooling) and the element-wise affine equations merged into it, not yet
    evaluated (a pending value in the environment).

    ``operands``: the linear equation's operand values; ``post``: ``(eqn, operands, data_pos)`` per merged
    equation, ``operands[data_pos]`` being the (ignored) placeholder for the layer's running value.
    """

    eqn: Any
    operands: list
    data_pos: int
    weight_pos: int | None
    post: list = dataclasses.field(default_factory=list)


def _layer_function(layer: _Layer, options: LRPOptions) -> Callable:
    """The merged layer as a ``jax.custom_vjp`` function of its flat operands with the LRP backward rule."""
    n_linear = len(layer.operands)
    post_sizes = [len(ops) for _, ops, _ in layer.post]
    eqn, dp, wp = layer.eqn, layer.data_pos, layer.weight_pos

    def split(flat):
        linear_ops = list(flat[:n_linear])
        post_ops, i = [], n_linear
        for size in post_sizes:
            post_ops.append(list(flat[i:i + size]))
            i += size
        return linear_ops, post_ops

    def post(z, post_ops):
        for (peqn, _, pdp), ops in zip(layer.post, post_ops):
            z = _bind(peqn.primitive, peqn.params, ops[:pdp] + [z] + ops[pdp + 1:])
        return z

    def forward(*flat):
        linear_ops, post_ops = split(flat)
        return post(_bind(eqn.primitive, eqn.params, linear_ops), post_ops)

    def backward(flat, relevance):
        linear_ops, post_ops = split(flat)
        x = linear_ops[dp]

        def linear(xx, weight=None):
            ops = list(linear_ops)
            ops[dp] = xx
            if weight is not None:
                ops[wp] = weight
            return _bind(eqn.primitive, eqn.params, ops)

        z = linear(x)
        zeros = jnp.zeros_like(z)
        shift, scale = jax.jvp(lambda zz: post(zz, post_ops), (zeros,), (jnp.ones_like(z),))  # y = scale * z + shift
        relevance = relevance.astype(z.dtype)
        if wp is None or options.rule == "epsilon":
            epsilon = options.stabilizer if wp is None else options.epsilon
            y = post(z, post_ops)
            _, transpose = jax.vjp(linear, x)
            (c,) = transpose(scale * relevance / stabilize(y, epsilon))
            rx = x * c
        else:
            w = linear_ops[wp]
            w_pos, w_neg = jnp.maximum(w, 0), jnp.minimum(w, 0)
            x_pos, x_neg = jnp.maximum(x, 0), jnp.minimum(x, 0)
            keep = scale >= 0  # a negative merged scale swaps which products of W and x are positive

            def contributions(u, v):
                positive = linear(u, w_pos) + linear(v, w_neg)  # products x_i w_ij >= 0 of the unmerged layer
                negative = linear(u, w_neg) + linear(v, w_pos)  # products <= 0
                z_plus = scale * jnp.where(keep, positive, negative)
                if options.rule == "zplus":
                    return (z_plus,)
                return z_plus, scale * jnp.where(keep, negative, positive)

            parts, transpose = jax.vjp(contributions, x_pos, x_neg)
            stab = options.stabilizer
            g_plus = relevance / stabilize(parts[0] + jnp.maximum(shift, 0), stab)
            if options.rule == "zplus":
                cotangents = (g_plus,)
            else:
                g_minus = relevance / stabilize(parts[1] + jnp.minimum(shift, 0), stab)
                cotangents = (options.alpha * g_plus, -options.beta * g_minus)
            du, dv = transpose(cotangents)
            rx = x_pos * du + x_neg * dv
        linear_cot = [rx.astype(x.dtype) if i == dp else _zero_cotangent(o) for i, o in enumerate(linear_ops)]
        post_cot = [_zero_cotangent(o) for ops in post_ops for o in ops]
        return tuple(linear_cot + post_cot)

    fn = jax.custom_vjp(forward)
    fn.defvjp(lambda *flat: (forward(*flat), flat), backward)
    return fn


def _evaluate_layer(layer: _Layer, options: LRPOptions) -> Array:
    flat = list(layer.operands)
    for _, ops, pdp in layer.post:
        flat += [jnp.zeros((), jnp.float32) if i == pdp else o for i, o in enumerate(ops)]
    return _layer_function(layer, options)(*flat)


def _sum_rule(prim, params, stabilizer):
    """Sum of two data tensors: ``R_i = x_i * R / stab(x_1 + x_2)`` (zennit's ``Norm`` rule on its ``Sum``)."""

    def bwd(operands, r):
        a, b = operands
        g = r / stabilize(a + b, stabilizer)
        return unbroadcast(a * g, a), unbroadcast(b * g, b)

    return _with_backward(prim, params, bwd)


def _pass_rule(prim, params, data_pos):
    def bwd(operands, r):
        return tuple(unbroadcast(r, o) if i == data_pos else _zero_cotangent(o) for i, o in enumerate(operands))

    return _with_backward(prim, params, bwd)


_LRP_SUPPORTED = (
    "LRP cannot propagate relevance through", "Supported between the input and the logits: dense/conv layers with "
    "parameter weights, sum/average/max pooling, ReLU (max(x, 0)), tanh/sigmoid activations, residual sums, batch norm "
    "in inference mode and other affine ops with parameter operands, reshapes/slices/concatenation/padding. Explain "
    "the logits, not softmax probabilities, and apply the model in inference mode.")


# ---------------------------------------------------------------------------------------------------------------
# Traversal.


def _use_counts(jaxpr) -> collections.Counter:
    """How often each variable is read; the jaxpr's outputs count twice (they must be evaluated)."""
    uses: collections.Counter = collections.Counter()
    for eqn in jaxpr.eqns:
        uses.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
    uses.update(v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal))
    uses.update(v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal))
    return uses


def _run(jaxpr, consts, args, arg_data, options: LRPOptions):
    """Evaluates a jaxpr under LRP rules. Returns ``(outputs, output_data_flags)``."""
    uses = _use_counts(jaxpr)

    def ready(values):
        return [_evaluate_layer(x, options) if isinstance(x, _Layer) else x for x in values]

    def pending_or_value(layer: _Layer, var):
        return layer if uses[var] == 1 else _evaluate_layer(layer, options)

    def eval_equation(eqn, values, data):
        flag = any(data)
        out_data = [flag and is_float(v.aval) for v in eqn.outvars]
        inner = inner_jaxpr(eqn)
        if inner is not None and flag:
            body, body_consts = inner
            return _run(body, body_consts, ready(values), data, options)
        rule = choose_rule(eqn, data)
        if rule.affine:
            layer = values[rule.data_pos]
            if (isinstance(layer, _Layer) and is_float(eqn.outvars[0].aval)
                    and eqn.outvars[0].aval.shape == eqn.invars[rule.data_pos].aval.shape):
                layer.post.append((eqn, operand_values(eqn, values), rule.data_pos))
                return [pending_or_value(layer, eqn.outvars[0])], out_data
        if eqn.primitive.name == "convert_element_type" and isinstance(values[0], _Layer) \
                and is_float(eqn.outvars[0].aval):
            layer = values[0]
            layer.post.append((eqn, [None], 0))
            return [pending_or_value(layer, eqn.outvars[0])], out_data
        values = ready(values)
        prim, params = eqn.primitive, eqn.params
        if rule.name == "gradient":  # bind as jax.core.eval_jaxpr does (custom_jvp/vjp calls need their bind params)
            outs = prim.bind(*values, **prim.get_bind_params(params))
            return (outs if prim.multiple_results else [outs]), out_data
        operands = operand_values(eqn, values)
        if rule.name == "linear":
            layer = _Layer(eqn, operands, rule.data_pos, rule.weight_pos)
            return [pending_or_value(layer, eqn.outvars[0])], out_data
        if rule.name == "pass":
            out = _pass_rule(prim, params, rule.data_pos)(*operands)
        elif rule.name == "sum":
            out = _sum_rule(prim, params, options.stabilizer)(*operands)
        else:
            out = unsupported_rule(eqn, rule.reason, _LRP_SUPPORTED)(*operands)
        return (out if prim.multiple_results else [out]), out_data

    outs, out_data = evaluate_jaxpr(jaxpr, consts, False, args, arg_data, eval_equation, literal_tag=lambda _: False)
    return ready(outs), out_data


def _check_options(options: LRPOptions) -> None:
    if options.rule not in RULE_NAMES:
        raise ValueError(f"rule must be one of {RULE_NAMES}; got {options.rule!r}")
    for name in ("epsilon", "stabilizer"):
        value = getattr(options, name)
        if not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative float; got {value!r}")
    if options.rule == "alpha_beta":
        a, b = options.alpha, options.beta
        if not all(isinstance(v, (int, float)) for v in (a, b)) or a < 0 or b < 0 or abs(a - b - 1) > 1e-12:
            raise ValueError(f"alpha-beta needs alpha >= 0, beta >= 0 and alpha - beta = 1 (Bach et al. 2015: "
                             f"relevance is conserved only then); got alpha={a!r}, beta={b!r}")


def with_lrp_rules(fn: Callable, *, rule: RuleName = "epsilon", epsilon: float = 1e-6, alpha: float = 2.0,
                   beta: float = 1.0, stabilizer: float = 1e-6) -> Callable:
    """Gives ``fn`` LRP backward rules: same outputs, but ``jax.vjp`` propagates relevance instead of gradients.

    ``jax.vjp(with_lrp_rules(fn), *args)`` evaluated with the output relevance as cotangent (e.g. the target logit
    on its class, zeros elsewhere) returns the relevance of every argument element.

    Args:
      fn: a function of arrays (pytrees of arrays), e.g. ``logits_fn(images)``; arrays it closes over (weights,
        batch-norm statistics) are parameters, every argument is data.
      rule: the rule of every dense and convolution layer: ``"epsilon"`` (LRP-epsilon), ``"alpha_beta"``
        (LRP-alpha-beta) or ``"zplus"`` (LRP-z+, which is alpha-beta with alpha=1, beta=0).
      epsilon: the stabiliser of LRP-epsilon (``z + epsilon * sign(z)``).
      alpha: alpha of LRP-alpha-beta (weight of the positive contributions).
      beta: beta of LRP-alpha-beta (weight of the negative contributions); ``alpha - beta`` must be 1.
      stabilizer: the epsilon of the denominators of every other rule (z+, alpha-beta, pooling, residual sums).

    Returns:
      A function with ``fn``'s signature and outputs; reaching a primitive without an LRP rule in the backward
      pass raises :class:`~saliency_jax.saliency._eb_rules.UnsupportedOperationError`. Jittable and vmappable.

    Raises:
      ValueError: an unknown rule, a negative epsilon / stabilizer, or alpha / beta with ``alpha - beta != 1`` or
        negative (at once).
    """
    options = LRPOptions(rule=rule, epsilon=epsilon, alpha=alpha, beta=beta, stabilizer=stabilizer)
    _check_options(options)

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree_util.tree_leaves(args)
        outs, _ = _run(closed.jaxpr, list(closed.consts), leaves, [True] * len(leaves), options)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
