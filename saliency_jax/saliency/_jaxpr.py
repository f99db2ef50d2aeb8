"""Re-evaluating a traced model's jaxpr with some primitives replaced, recursing into call-like primitives.

Private machinery shared by the saliency methods that change a model's backward pass without touching the model:
Excitation Backprop (:mod:`saliency_jax.saliency._eb_rules`) and guided backprop
(:func:`saliency_jax.saliency.gradients.with_guided_relu`). Each traces the model with ``jax.make_jaxpr`` and
evaluates the jaxpr again, equation by equation, with :func:`evaluate_jaxpr`; its per-equation callback binds the
primitives it rewrites through a ``jax.custom_vjp`` function carrying the method's backward rule, binds all others
unchanged, and evaluates call-like primitives (:data:`CALLS`: ``jit``, ``custom_jvp_call``, ``checkpoint``, ...)
recursively on their inner jaxpr (:func:`inner_jaxpr`), so that the rules also reach the primitives inside them
(``jax.nn.relu`` is a ``custom_jvp`` around ``max``). Loops written with ``lax.scan`` (what ``flax.linen.RNN``,
``nn.scan`` and ``lax.fori_loop`` with static bounds lower to) are re-evaluated by :func:`evaluate_scan`: a new
``lax.scan`` whose body is the old body evaluated under the same callback, so the rules act at every time step and
``jax.vjp`` runs them backwards through time.

Every value of the jaxpr carries a *tag* beside it, chosen by the caller and derived from how the value was
computed, never from its numbers (Excitation Backprop: parameter / data / probe / gate / recurrent-state flags;
guided backprop: data-dependent and known-zero flags).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

Array = jax.Array

# Call-like primitives and the name of the parameter that holds their inner jaxpr.
CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}

# eval_equation(eqn, values, tags) -> (outputs, output_tags), one entry per ``eqn.outvars``.
EquationEvaluator = Callable[[Any, list, list], tuple[Sequence[Any], Sequence[Any]]]


def is_float(aval) -> bool:
    """Whether an abstract value (``var.aval``) has a floating-point or complex dtype."""
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def source_location(eqn) -> str:
    """A short "file:line (function)" of the user code that created ``eqn``, or "unknown location".

    Only decorates error messages: any failure to summarise the location gives "unknown location".
    """
    try:
        from jax._src import source_info_util  # no public API summarises a source location

        return source_info_util.summarize(eqn.source_info) or "unknown location"
    except Exception:  # noqa: BLE001 - the location is optional
        return "unknown location"


def inner_jaxpr(eqn):
    """``(jaxpr, consts)`` of a call-like equation (one of :data:`CALLS`), or None for any other equation."""
    key = CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    inner = eqn.params[key]
    if isinstance(inner, jex_core.ClosedJaxpr):
        return inner.jaxpr, list(inner.consts)
    if isinstance(inner, jex_core.Jaxpr):
        return inner, []
    return None


def operand_values(eqn, values: Sequence[Any]) -> list:
    """Operands as arrays (literals converted to their jaxpr dtype, so ``jax.custom_vjp`` sees arrays)."""
    return [jnp.asarray(np.asarray(x), v.aval.dtype) if isinstance(v, jex_core.Literal) else x
            for v, x in zip(eqn.invars, values)]


def unbroadcast(g: Array, like: Array) -> Array:
    """Sums the cotangent ``g`` down to the shape and dtype of ``like`` (undoing an implicit operand broadcast).

    Args:
      g: cotangent of an element-wise primitive's output, [*leading, *shape'] where ``shape'`` equals ``like``'s
        shape except along axes where ``like`` has size 1 (a jaxpr's scalar or size-1 operand).
      like: the operand, [*shape].

    Returns:
      ``g`` summed over the leading and the broadcast axes, [*shape] with ``like``'s dtype.
    """
    like = jnp.asarray(like)
    if g.shape != like.shape:
        g = jnp.sum(g, axis=tuple(range(g.ndim - like.ndim)))
        axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, like.shape)) if b == 1 and a != 1)
        g = jnp.sum(g, axis=axes, keepdims=True).reshape(like.shape)
    return g.astype(like.dtype)


def evaluate_jaxpr(jaxpr, consts: Sequence[Any], const_tag: Any, args: Sequence[Any], arg_tags: Sequence[Any],
                   eval_equation: EquationEvaluator, literal_tag: Callable[[Any], Any]) -> tuple[list, list]:
    """Evaluates ``jaxpr`` equation by equation with ``eval_equation``, carrying a tag beside every value.

    The environment bookkeeping of ``jax.core.eval_jaxpr``; what each equation computes, and whether a call-like
    equation is evaluated recursively (by calling this function again on :func:`inner_jaxpr`), is left to
    ``eval_equation``.

    Args:
      jaxpr: a ``jax.extend.core.Jaxpr`` (``closed_jaxpr.jaxpr``).
      consts: values of ``jaxpr.constvars``; each gets ``const_tag``.
      const_tag: the tag of every constant.
      args: values of ``jaxpr.invars`` (flat leaves), with their tags ``arg_tags``.
      arg_tags: one tag per argument.
      eval_equation: ``eval_equation(eqn, values, tags) -> (outputs, output_tags)``, given the equation's operand
        values and tags in ``eqn.invars`` order (literals as their Python / NumPy value), returning one output
        and one tag per ``eqn.outvars`` (outputs may be None when only tags are wanted).
      literal_tag: ``literal_tag(value)``, the tag of a literal operand.

    Returns:
      ``(outputs, output_tags)``, lists in ``jaxpr.outvars`` order.
    """
    env: dict = {}

    def read(v):
        if isinstance(v, jex_core.Literal):
            return v.val, literal_tag(v.val)
        return env[v]

    def write(v, value, tag):
        if not isinstance(v, jex_core.DropVar):
            env[v] = (value, tag)

    for v, x in zip(jaxpr.constvars, consts):
        write(v, x, const_tag)
    for v, x, t in zip(jaxpr.invars, args, arg_tags):
        write(v, x, t)

    for eqn in jaxpr.eqns:
        pairs = [read(v) for v in eqn.invars]
        outs, out_tags = eval_equation(eqn, [x for x, _ in pairs], [t for _, t in pairs])
        for v, x, t in zip(eqn.outvars, outs, out_tags):
            write(v, x, t)

    results = [read(v) for v in jaxpr.outvars]
    return [x for x, _ in results], [t for _, t in results]


# evaluate_body(args, arg_tags, evaluate, final) -> (outputs, output_tags): evaluates a scan body under the
# caller's rules; ``final`` is False for the rounds that only settle the carry tags.
BodyEvaluator = Callable[[Sequence[Any], Sequence[Any], bool, bool], tuple[Sequence[Any], Sequence[Any]]]

# Bound on the rounds of the carry-tag fixpoint of evaluate_scan (each round can only add information to a tag of a
# finite lattice; real models settle in two or three rounds).
_MAX_FIXPOINT_ROUNDS = 64


def evaluate_scan(eqn, values: Sequence[Any], tags: Sequence[Any], evaluate_body: BodyEvaluator, *,
                  body_tags: Callable[[Sequence[Any], Sequence[Any], Sequence[Any]], list],
                  join: Callable[[Any, Any], Any], output_tags: Callable[[Sequence[Any], Sequence[Any]], list],
                  evaluate: bool = True) -> tuple[list, list]:
    """Re-evaluates a ``scan`` equation as a new ``lax.scan`` whose body is evaluated by ``evaluate_body``.

    The operands of a ``scan`` equation are ``[*consts, *init_carry, *xs]`` (``num_consts``, ``num_carry`` in its
    parameters); its outputs ``[*final_carry, *ys]``. The tags of the body's carry arguments must hold for every
    iteration, so they are found first as a fixpoint: starting from the tags of the initial carry, the body's
    carry-out tags are joined in (``join``) until nothing changes. The body is then evaluated once per trace of the
    new loop, with ``jax.lax.scan(step, init, xs, length, reverse, unroll)``: ``jax.vjp`` of the result runs the
    body's backward rules in reverse time order.

    Args:
      eqn: a ``scan`` equation.
      values: its operand values (``None`` entries when ``evaluate`` is False).
      tags: the operands' tags.
      evaluate_body: ``evaluate_body(args, arg_tags, evaluate, final) -> (outputs, output_tags)`` evaluates the
        body jaxpr (``eqn.params["jaxpr"]``, its constants included) on the body arguments ``[*consts, *carry,
        *xs]``; called with ``evaluate=False`` and ``None`` arguments to compute tags only, and with
        ``final=False`` for the fixpoint rounds (the caller should not record anything then) and ``True`` for the
        one call with the settled tags (per trace of the loop body).
      body_tags: ``body_tags(const_tags, carry_tags, xs_tags) -> arg_tags`` of the body (e.g. marking the carry).
      join: least upper bound of two tags (the union of flags).
      output_tags: ``output_tags(body_output_tags, operand_tags) -> tags`` of the equation's outputs.
      evaluate: False to compute the output tags only (outputs are ``None``).

    Returns:
      ``(outputs, output_tags)`` in ``eqn.outvars`` order.

    Raises:
      RuntimeError: if the carry tags do not settle (cannot happen for a finite lattice and a monotone body).
    """
    params = eqn.params
    num_consts, num_carry = params["num_consts"], params["num_carry"]
    const_tags = list(tags[:num_consts])
    xs_tags = list(tags[num_consts + num_carry:])
    carry_tags = list(tags[num_consts:num_consts + num_carry])
    blanks = [None] * len(tags)
    for _ in range(_MAX_FIXPOINT_ROUNDS):
        _, out_tags = evaluate_body(blanks, body_tags(const_tags, carry_tags, xs_tags), False, False)
        joined = [join(a, b) for a, b in zip(carry_tags, out_tags[:num_carry])]
        if joined == carry_tags:
            break
        carry_tags = joined
    else:
        raise RuntimeError(f"scan at {source_location(eqn)}: the carry tags did not settle")
    arg_tags = body_tags(const_tags, carry_tags, xs_tags)
    if not evaluate:
        _, out_tags = evaluate_body(blanks, arg_tags, False, True)
        return [None] * len(eqn.outvars), output_tags(out_tags, tags)

    operands = operand_values(eqn, values)
    consts = operands[:num_consts]
    init = operands[num_consts:num_consts + num_carry]
    xs = operands[num_consts + num_carry:]
    body_out_tags: list = []

    def step(carry, x):
        outs, out_tags = evaluate_body([*consts, *carry, *x], arg_tags, True, True)
        body_out_tags[:] = out_tags
        outs = list(outs)
        return outs[:num_carry], outs[num_carry:]

    final, ys = jax.lax.scan(step, list(init), list(xs), length=params["length"], reverse=params["reverse"],
                             unroll=params["unroll"])
    return [*final, *ys], output_tags(body_out_tags, tags)
