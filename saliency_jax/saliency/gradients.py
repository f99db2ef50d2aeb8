"""Input-gradient saliency: vanilla gradient, gradient x input, guided backprop, and the SmoothGrad wrapper.

Methods (each for a whole batch in one call, with no loop over examples):

* :func:`vanilla_gradient` - Simonyan, Vedaldi, Zisserman, "Deep Inside Convolutional Networks", ICLR workshop
  2014, Sec. 3.1: ``w = d S_c / d I`` at the image ``I``.
* :func:`gradient_x_input` - Shrikumar et al., "Not Just a Black Box" (2016) / "Learning Important Features Through
  Propagating Activation Differences" (DeepLIFT, ICML 2017): ``I * d S_c / d I`` (Captum's ``InputXGradient``).
* :func:`guided_backprop` - Springenberg, Dosovitskiy, Brox, Riedmiller, "Striving for Simplicity: The All
  Convolutional Net", ICLR workshop 2015, Sec. 3.4 / Fig. 1: at every ReLU the backward signal is
  ``R_l = (f_l > 0) * (R_{l+1} > 0) * R_{l+1}`` (positive inputs *and* positive gradients only).
* :func:`integrated_gradients` - Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks", ICML 2017,
  Eq. 3: ``(x - x') * mean_k d S_c(x' + k/m (x - x')) / d x``.
* :func:`smooth_grad` - Smilkov, Thorat, Kim, Viegas, Wattenberg, "SmoothGrad: removing noise by adding noise"
  (2017), Eq. 3: the mean of any saliency method over Gaussian-noised copies of the input.

Input-space methods take a plain model function ``logits_fn(images) -> logits``; a linen model is
``functools.partial(module.apply, variables, train=False)``. The score ``S_c`` is the target class's logit (as
PAIR saliency, Captum and TorchRay use it) or its softmax probability
(:func:`~saliency_jax.saliency.grad_cam.class_scores`).

Batching: the scores of all examples are summed before ``jax.grad``. In inference mode examples do not interact,
so the gradient of the sum with respect to example ``i``'s pixels is the gradient of example ``i``'s own score
(tests check it against ``jax.vmap`` of a single-example call). Models whose forward pass mixes examples (BatchNorm
with batch statistics) must be given in inference mode.

Channel reduction (:func:`reduce_attribution`): the attribution ``[batch, height, width, channels]`` becomes a
per-pixel map as the reference libraries display it: ``"abs_sum"`` (default; PAIR saliency's
``VisualizeImageGrayscale``: sum over channels of the absolute values), ``"sum"`` (signed channel sum, Captum's
``visualize_image_attr`` with ``sign="all"``), ``"max_abs"`` (Simonyan et al. 2014: max over channels of
``|w|``), or ``"none"`` (the raw attribution ``[batch, height, width, channels]``).

Guided backprop on models we did not write: a ReLU is not a layer object but a plain function (``nn.relu`` /
``jax.nn.relu`` is a ``custom_jvp`` around ``max(x, 0)``; ``jnp.maximum(x, 0)`` is ``max`` itself), so
:func:`with_guided_relu` traces the model to a jaxpr and evaluates it again with every ``max(x, 0)`` (``x``
data-dependent, the other operand a constant zero: a literal, ``jnp.zeros_like``, a zero array) replaced by a
``jax.custom_vjp`` function with the guided backward rule; every other primitive is bound unchanged (ordinary
gradients through convolutions, dense layers, batch norm in inference mode, max and average pooling, sigmoid,
tanh, GELU, ...). Call-like primitives (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``) that
contain a rectifier are evaluated recursively; the others are bound unchanged, keeping their custom derivatives.
The per-primitive handlers are a registry (:data:`GUIDED_RULES`, primitive name -> handler), like Excitation
Backprop's (:data:`saliency_jax.saliency._eb_rules.RULES`).
Forms that gate the signal some other way and could hide a ReLU raise :class:`GuidedBackpropError` instead of
silently giving the plain gradient there: ``min``/``clamp``/``abs``/``sign``/``max`` other than with zero on
floating-point data (ReLU6, ``jnp.clip``, leaky or hard variants, maxout), ``jnp.where`` with a data-dependent
condition (``leaky_relu``, ELU, ``jnp.where(x > 0, x, 0)``), a data-dependent boolean turned into a float mask
(``x * (x > 0)``), rectifiers inside ``lax.scan`` / ``while_loop`` / ``cond``, and a model with no recognised ReLU
at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from saliency_jax.saliency._jaxpr import (
    evaluate_jaxpr,
    inner_jaxpr,
    is_float,
    operand_values,
    source_location,
    unbroadcast,
)
from saliency_jax.saliency.core import check_images, invalid_examples, mark_invalid, normalize_maps, resolve_targets
from saliency_jax.saliency.grad_cam import Score, class_scores

Array = jax.Array
Reduction = Literal["abs_sum", "sum", "max_abs", "none"]

__all__ = [
    "GuidedBackpropError",
    "gradient_x_input",
    "guided_backprop",
    "integrated_gradients",
    "reduce_attribution",
    "smooth_grad",
    "vanilla_gradient",
    "with_guided_relu",
]

_REDUCTIONS = ("abs_sum", "sum", "max_abs", "none")


# ---------------------------------------------------------------------------------------------------------------
# Shared plumbing.


def _check_score(score: str) -> None:
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")


def _check_logits(logits, batch: int, name: str = "logits_fn") -> None:
    shape = tuple(getattr(logits, "shape", ()))
    if len(shape) != 2 or shape[0] != batch:
        raise ValueError(f"{name} must return logits [batch={batch}, num_classes]; got shape {shape}")


def reduce_attribution(attribution: Array, reduction: Reduction = "abs_sum") -> Array:
    """Reduces a per-channel input attribution to a per-pixel map, as saliency libraries display it.

    Args:
      attribution: [batch, height, width, channels] float.
      reduction: ``"abs_sum"``: ``sum_c |a_c|`` (PAIR saliency's ``VisualizeImageGrayscale``); ``"sum"``:
        ``sum_c a_c`` (signed; Captum's ``visualize_image_attr``, ``sign="all"``); ``"max_abs"``: ``max_c |a_c|``
        (Simonyan et al. 2014, Sec. 3.1); ``"none"``: the attribution unchanged.

    Returns:
      float32 [batch, height, width] (``[batch, height, width, channels]`` for ``"none"``).

    Raises:
      ValueError: if ``attribution`` is not rank 4 or ``reduction`` is unknown.
    """
    _check_reduction(reduction)
    if getattr(attribution, "ndim", None) != 4:
        raise ValueError(f"attribution must be [batch, height, width, channels]; got shape "
                         f"{getattr(attribution, 'shape', None)}")
    attribution = attribution.astype(jnp.float32)
    if reduction == "abs_sum":
        return jnp.sum(jnp.abs(attribution), axis=-1)
    if reduction == "sum":
        return jnp.sum(attribution, axis=-1)
    if reduction == "max_abs":
        return jnp.max(jnp.abs(attribution), axis=-1)
    return attribution


def _input_gradient(logits_fn: Callable[[Array], Array], images: Array, targets, score: str) -> Array:
    """``d S_c / d images`` for every example at once (batch-sum trick), float32 [batch, h, w, c]."""
    check_images(images)
    _check_score(score)
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be a function images -> logits; got {type(logits_fn).__name__}")
    batch = images.shape[0]

    num_classes = []

    def summed_score(x):
        logits = logits_fn(x)
        _check_logits(logits, batch)
        classes = resolve_targets(targets, logits)
        num_classes.append(logits.shape[-1])
        return jnp.sum(class_scores(logits, classes, score)), classes

    gradient, classes = jax.grad(summed_score, has_aux=True)(images)
    # Guided ReLUs would turn NaN into zeros: mark examples with a NaN / inf pixel or a bad target explicitly.
    invalid = invalid_examples(images=images, classes=classes, num_classes=num_classes[0])
    return mark_invalid(gradient.astype(jnp.float32), invalid)


def _finish(attribution: Array, reduction: str, normalize: bool) -> Array:
    maps = reduce_attribution(attribution, reduction)
    return normalize_maps(maps) if normalize else maps


# ---------------------------------------------------------------------------------------------------------------
# Vanilla gradient and gradient x input.


def vanilla_gradient(
    logits_fn: Callable[[Array], Array],
    images: Array,
    targets: Array | int | None = None,
    *,
    score: Score = "logit",
    reduction: Reduction = "abs_sum",
    normalize: bool = False,
) -> Array:
    """Vanilla gradient saliency ``d S_c / d I`` (Simonyan et al. 2014, Sec. 3.1), for a batch in one pass.

    Args:
      logits_fn: ``images [batch, height, width, channels] -> logits [batch, num_classes]``, in inference mode
        (e.g. ``functools.partial(module.apply, variables, train=False)``).
      images: [batch, height, width, channels] float (our models take float32 in [0, 1]).
      targets: the class to explain per example: ``None`` for the predicted class, an ``int`` for all examples, or
        int [batch] (e.g. the ground-truth labels).
      score: ``"logit"`` (default, as PAIR saliency / Captum) or ``"softmax"``.
      reduction: channel reduction, see :func:`reduce_attribution` (default ``"abs_sum"``; ``"none"`` returns the
        raw gradient).
      normalize: per-example min-max normalisation of the result to [0, 1] (a constant map becomes zeros).

    Returns:
      float32 [batch, height, width] (``[batch, height, width, channels]`` with ``reduction="none"``).

    Raises:
      ValueError: bad image rank, logits not ``[batch, num_classes]``, bad target shape or range, unknown
        ``score`` / ``reduction``.
      TypeError: non-float images, non-integer targets, ``logits_fn`` not callable.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.arange(12.0).reshape(1, 2, 2, 3)
      >>> logits_fn = lambda x: jnp.stack([jnp.sum(x * w, (1, 2, 3)), jnp.zeros(x.shape[0])], -1)
      >>> vanilla_gradient(logits_fn, jnp.ones((2, 2, 2, 3)), targets=0, reduction="sum")[0]
      Array([[ 3., 12.],
             [21., 30.]], dtype=float32)
    """
    _check_reduction(reduction)
    return _finish(_input_gradient(logits_fn, images, targets, score), reduction, normalize)


def gradient_x_input(
    logits_fn: Callable[[Array], Array],
    images: Array,
    targets: Array | int | None = None,
    *,
    score: Score = "logit",
    reduction: Reduction = "abs_sum",
    normalize: bool = False,
) -> Array:
    """Gradient x input ``I * d S_c / d I`` (Shrikumar et al. 2016; Captum ``InputXGradient``), batched.

    For a linear model ``S_c = sum w_c * I + b_c`` the attribution ``I * w_c`` sums to ``S_c - b_c``.

    Args:
      logits_fn: ``images -> logits [batch, num_classes]`` in inference mode.
      images: [batch, height, width, channels] float.
      targets: ``None`` (predicted class), ``int`` or int [batch].
      score: ``"logit"`` or ``"softmax"``.
      reduction: see :func:`reduce_attribution` (``"none"``: the raw ``[batch, height, width, channels]``).
      normalize: per-example min-max normalisation to [0, 1].

    Returns:
      float32 [batch, height, width] (``[batch, height, width, channels]`` with ``reduction="none"``).

    Raises:
      ValueError, TypeError: as :func:`vanilla_gradient`.
    """
    _check_reduction(reduction)
    gradient = _input_gradient(logits_fn, images, targets, score)
    return _finish(images.astype(jnp.float32) * gradient, reduction, normalize)


# ---------------------------------------------------------------------------------------------------------------
# Guided backprop: a jaxpr re-evaluator that swaps ReLUs for guided ReLUs.


class GuidedBackpropError(ValueError):
    """Guided backprop met a model it cannot guide faithfully (raised at trace time, naming the operation).

    Raised for operations that gate the signal like a rectifier but are not ``max(x, 0)`` (ReLU6 / clip,
    leaky ReLU, ELU, ``jnp.where(x > 0, x, 0)``, ``x * (x > 0)``, maxout), rectifiers inside ``lax.scan`` /
    ``while_loop`` / ``cond``, and models in which no ReLU is found: in all these cases the result would otherwise
    silently be (partly) the plain gradient.
    """


# Float-valued primitives that can implement (part of) a rectifier; only ``max(x, 0)`` is understood.
_GATES = frozenset({"max", "min", "clamp", "abs", "sign", "select_n"})
# Primitives through which a constant zero stays a zero.
_ZERO_PRESERVING = frozenset({
    "broadcast_in_dim", "convert_element_type", "reshape", "squeeze", "expand_dims", "transpose", "copy", "copy_p",
})


@dataclasses.dataclass
class _State:
    relus: int = 0  # guided ReLUs applied so far


def _subjaxprs(eqn):
    """Every jaxpr held in an equation's parameters (inner functions, scan bodies, cond branches)."""
    found = []
    for value in eqn.params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jex_core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jex_core.Jaxpr):
                found.append(item)
    return found


def _contains_gate(jaxpr) -> bool:
    """Whether a jaxpr (recursively) contains a float rectifier-like primitive or a float mask conversion."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        floats = any(is_float(v.aval) for v in eqn.outvars)
        if name in _GATES and floats:
            return True
        if name == "convert_element_type" and floats and not is_float(eqn.invars[0].aval):
            return True
        if any(_contains_gate(sub) for sub in _subjaxprs(eqn)):
            return True
    return False


def _is_static_zero(value) -> bool:
    """True for a concrete (non-traced) all-zero array or scalar."""
    if isinstance(value, jax.core.Tracer):
        return False
    try:
        return bool(np.all(np.asarray(value) == 0))
    except Exception:  # noqa: BLE001 - anything not convertible is not a known zero
        return False


def _guided_relu(prim, params, data_pos: int):
    """``max(x, 0)`` with Springenberg et al.'s backward rule: ``g * (x > 0) * (g > 0)``."""

    @jax.custom_vjp
    def relu(a, b):
        return prim.bind(a, b, **params)

    def fwd(a, b):
        return prim.bind(a, b, **params), (a, b)

    def bwd(operands, g):
        x = jnp.broadcast_to(operands[data_pos], g.shape)
        gx = jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g))
        return tuple(unbroadcast(gx, o) if i == data_pos else jnp.zeros_like(o) for i, o in enumerate(operands))

    relu.defvjp(fwd, bwd)
    return relu


def _reject(eqn, reason: str):
    shapes = ", ".join(v.aval.str_short() for v in eqn.invars)
    raise GuidedBackpropError(
        f"guided backprop cannot handle primitive '{eqn.primitive.name}' ({shapes}) at {source_location(eqn)}: "
        f"{reason}. Only ReLUs written as max(x, 0) (nn.relu, jax.nn.relu, jnp.maximum(x, 0)) are guided; a "
        "rectifier in another form would silently receive the plain gradient.")


def _bind(eqn, values):
    """Binds an equation's primitive with its bind parameters, as ``jax.core.eval_jaxpr`` does."""
    return eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))


# The registry of guided-backprop rules: primitive name -> handler(eqn, values, kinds, zeros, state) -> outputs, for
# equations with a data-dependent operand and a floating-point output (others are bound unchanged). ``kinds[i]``:
# whether operand ``i`` depends on the data; ``zeros[i]``: True if it is known to be a constant zero, None if its
# (constant) value must be inspected to tell, False otherwise. A primitive without an entry keeps its ordinary
# gradient (:func:`_default_rule`).
GuidedRule = Callable[[Any, list, list, list, "_State"], Any]
GUIDED_RULES: dict[str, GuidedRule] = {}


def _guided_rule(*names: str) -> Callable[[GuidedRule], GuidedRule]:
    def decorate(handler: GuidedRule) -> GuidedRule:
        for name in names:
            GUIDED_RULES[name] = handler
        return handler

    return decorate


@_guided_rule("max")
def _max_rule(eqn, values, kinds, zeros, state: _State):
    """``max(x, 0)`` on data is a ReLU: Springenberg et al.'s guided backward rule."""
    if all(kinds):
        _reject(eqn, "element-wise max of two data-dependent tensors (maxout)")
    data_pos = kinds.index(True)
    other = 1 - data_pos
    is_zero = zeros[other] if zeros[other] is not None else _is_static_zero(values[other])
    if not is_zero:
        _reject(eqn, "max of data with an operand not known to be zero (a shifted rectifier, or a zero passed "
                     "as a traced argument: write the ReLU as max(x, 0) with a literal 0 or jnp.zeros_like)")
    state.relus += 1
    return _guided_relu(eqn.primitive, eqn.params, data_pos)(*operand_values(eqn, values))


@_guided_rule("min", "clamp", "abs", "sign")
def _rectifier_variant_rule(eqn, values, kinds, zeros, state: _State):
    _reject(eqn, f"'{eqn.primitive.name}' of a data-dependent tensor (ReLU6, clip, hard tanh or another rectifier "
                 "variant)")


@_guided_rule("select_n")
def _select_rule(eqn, values, kinds, zeros, state: _State):
    if kinds[0]:
        _reject(eqn, "jnp.where / lax.select with a data-dependent condition (leaky ReLU, ELU, "
                     "where(x > 0, x, 0))")
    return _default_rule(eqn, values, kinds, zeros, state)


@_guided_rule("convert_element_type")
def _convert_rule(eqn, values, kinds, zeros, state: _State):
    if not is_float(eqn.invars[0].aval):
        _reject(eqn, "a data-dependent boolean/integer turned into a float mask (e.g. x * (x > 0))")
    return _default_rule(eqn, values, kinds, zeros, state)


def _default_rule(eqn, values, kinds, zeros, state: _State):
    """The ordinary gradient; control flow (scan, while, cond) that hides a rectifier is refused."""
    if inner_jaxpr(eqn) is None and any(_contains_gate(sub) for sub in _subjaxprs(eqn)):
        _reject(eqn, "a rectifier inside a control-flow primitive (lax.scan, while_loop, cond)")
    return _bind(eqn, values)


def _apply_data_eqn(eqn, values, kinds, zeros, state: _State):
    """Evaluates one equation that has a data-dependent operand (not a recursed call), via :data:`GUIDED_RULES`."""
    if not any(is_float(v.aval) for v in eqn.outvars):
        return _default_rule(eqn, values, kinds, zeros, state)
    return GUIDED_RULES.get(eqn.primitive.name, _default_rule)(eqn, values, kinds, zeros, state)


def _literal_tag(value):
    """Tag ``(is_data, is_zero)`` of a literal operand: a constant, known zero or not from its value."""
    return False, _is_static_zero(value)


def _run(jaxpr, consts, args, arg_tags, state: _State):
    """Evaluates a jaxpr with guided ReLUs.

    Every value is tagged ``(is_data, is_zero)``: whether it depends on the data, and True if it is known to be a
    constant zero, None if its (constant) value must be inspected to tell, False otherwise. A constant's value is
    inspected only if a max needs it (weights stay on device).

    Returns:
      ``(outputs, output_tags)``.
    """

    def eval_equation(eqn, values, tags):
        in_data = [d for d, _ in tags]
        in_zero = [z for _, z in tags]
        if not any(in_data):
            outs = _bind(eqn, values)
            outs = outs if eqn.primitive.multiple_results else [outs]
            keeps_zero = eqn.primitive.name in _ZERO_PRESERVING and len(in_zero) == 1 and in_zero[0] is True
            return outs, [(False, True if keeps_zero else None)] * len(outs)
        inner = inner_jaxpr(eqn)
        if inner is not None and _contains_gate(inner[0]):
            body, body_consts = inner
            outs, out_tags = _run(body, body_consts, values, tags, state)
            return outs, [(d, False) for d, _ in out_tags]
        outs = _apply_data_eqn(eqn, values, in_data, in_zero, state)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return outs, [(True, False)] * len(outs)

    return evaluate_jaxpr(jaxpr, consts, (False, None), args, arg_tags, eval_equation, literal_tag=_literal_tag)


def _describe(fn) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__qualname__", type(inner).__name__)


def with_guided_relu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Gives ``fn`` guided-backprop ReLUs: same outputs, but gradients follow Springenberg et al. (2015).

    Every ``max(x, 0)`` on data (``nn.relu``, ``jax.nn.relu``, ``jnp.maximum(x, 0)``, ``jnp.clip(x, 0)``)
    backpropagates ``g * (x > 0) * (g > 0)``; all other operations keep their ordinary gradients. See this module's
    docstring for what is recognised and what raises.

    Args:
      fn: a function of arrays (pytrees of arrays), e.g. ``logits_fn(images)``; arrays it closes over (weights)
        are constants. Every argument is treated as data.

    Returns:
      A function with ``fn``'s signature and outputs whose ``jax.grad`` / ``jax.vjp`` is the guided backward
      pass. Jittable and vmappable.

    Raises:
      GuidedBackpropError: (when called) if ``fn`` contains a rectifier-like operation other than ``max(x, 0)``,
        a rectifier inside ``lax.scan`` / ``while_loop`` / ``cond``, or no ReLU at all.
    """

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree_util.tree_leaves(args)
        state = _State()
        outs, _ = _run(closed.jaxpr, list(closed.consts), leaves, [(True, False)] * len(leaves), state)
        if state.relus == 0:
            raise GuidedBackpropError(
                f"guided backprop found no ReLU (max(x, 0)) in {_describe(fn)}: the result would be "
                "the plain gradient; the model's rectifiers must be nn.relu / jax.nn.relu / jnp.maximum(x, 0)")
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def guided_backprop(
    logits_fn: Callable[[Array], Array],
    images: Array,
    targets: Array | int | None = None,
    *,
    score: Score = "logit",
    reduction: Reduction = "abs_sum",
    normalize: bool = False,
) -> Array:
    """Guided backpropagation maps (Springenberg et al. 2015, Sec. 3.4, Fig. 1), for a batch in one pass.

    The gradient of the class score with every ReLU's backward pass replaced by
    ``R_l = (f_l > 0) * (R_{l+1} > 0) * R_{l+1}`` (:func:`with_guided_relu`); the model is used unmodified.

    Args:
      logits_fn: ``images -> logits [batch, num_classes]`` in inference mode; its ReLUs must be ``max(x, 0)``
        (``nn.relu``, ``jax.nn.relu``, ``jnp.maximum(x, 0)``).
      images: [batch, height, width, channels] float.
      targets: ``None`` (predicted class), ``int`` or int [batch].
      score: ``"logit"`` (default) or ``"softmax"``; the softmax is outside the guided network.
      reduction: see :func:`reduce_attribution` (``"none"``: the raw ``[batch, height, width, channels]``).
      normalize: per-example min-max normalisation to [0, 1].

    Returns:
      float32 [batch, height, width] (``[batch, height, width, channels]`` with ``reduction="none"``).

    Raises:
      GuidedBackpropError: (a ValueError) if the model has a rectifier that is not ``max(x, 0)`` or no ReLU.
      ValueError, TypeError: as :func:`vanilla_gradient`.
    """
    _check_reduction(reduction)
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be a function images -> logits; got {type(logits_fn).__name__}")
    gradient = _input_gradient(with_guided_relu(logits_fn), images, targets, score)
    return _finish(gradient, reduction, normalize)


# ---------------------------------------------------------------------------------------------------------------
# SmoothGrad.


def _chunked_sum(fn: Callable[[Array], Any], count: int, chunk_size: int) -> Any:
    """``sum_{i < count} fn(i)`` as a ``lax.scan`` over ``ceil(count / chunk_size)`` chunks of ``vmap(fn)``.

    The last chunk is padded with repeated indices whose terms are masked out, so the sum does not depend on
    ``chunk_size`` (up to float summation order).
    """
    chunk_size = max(1, min(int(chunk_size), count))
    num_chunks = -(-count // chunk_size)
    template = jax.eval_shape(fn, jnp.zeros((), jnp.int32))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template)

    def body(total, chunk):
        index = chunk * chunk_size + jnp.arange(chunk_size, dtype=jnp.int32)
        valid = index < count
        values = jax.vmap(fn)(jnp.minimum(index, count - 1))

        def masked_sum(v):
            keep = valid.reshape((chunk_size,) + (1,) * (v.ndim - 1))
            return jnp.sum(jnp.where(keep, v, jnp.zeros_like(v)), axis=0)

        return jax.tree.map(lambda t, v: t + masked_sum(v), total, values), None

    total, _ = jax.lax.scan(body, init, jnp.arange(num_chunks, dtype=jnp.int32))
    return total


def smooth_grad(
    method: Callable[[Array, Any], Array],
    key: Array,
    images: Array,
    targets: Array | int | None = None,
    *,
    num_samples: int = 50,
    noise_level: float = 0.15,
    magnitude: bool = False,
    samples_per_step: int = 10,
) -> Array:
    """SmoothGrad (Smilkov et al. 2017, Eq. 3): any saliency method averaged over noisy copies of the input.

    ``M_hat(x) = 1/n sum_{i=1}^n M(x + N(0, sigma^2))`` with ``sigma = noise_level * (max(x) - min(x))`` per image
    (Sec. 3: 10-20 % noise works best; PAIR saliency's ``stdev_spread``). Sample ``i`` uses the key
    ``jax.random.fold_in(key, i)``, so the result depends only on ``key`` (not on ``samples_per_step``); samples
    are ``vmap``-ed in chunks of ``samples_per_step`` under a ``lax.scan``, summing as they go (memory of one
    chunk, no Python loop).

    Args:
      method: ``method(images, targets) -> maps [batch, ...]``, e.g. ``functools.partial(vanilla_gradient,
        logits_fn, reduction="none")`` or ``functools.partial(grad_cam, layer_model)``. It is averaged as it is:
        to follow PAIR saliency (average the raw gradient, then reduce channels) pass ``reduction="none"`` and
        call :func:`reduce_attribution` on the result; a method that normalises its maps is averaged normalised.
      key: a JAX PRNG key (``jax.random.key(0)``).
      images: [batch, height, width, channels] float.
      targets: passed to ``method`` for every sample. With ``None`` each noisy copy is explained for its own
        predicted class; pass ``jnp.argmax(logits_fn(images), -1)`` to fix the clean prediction (as PAIR does).
      num_samples: ``n``, the number of noisy copies (Smilkov et al. use 50).
      noise_level: ``sigma / (max - min)`` of each image, >= 0 (``0`` returns ``method(images, targets)``).
      magnitude: average the squared maps instead (PAIR saliency's ``magnitude=True``, Smilkov et al. Sec. 4).
      samples_per_step: noisy copies evaluated together in one ``vmap`` (memory vs. speed).

    Returns:
      float32 maps with ``method``'s output shape, e.g. [batch, height, width].

    Raises:
      ValueError: bad image rank, ``num_samples`` or ``samples_per_step`` < 1, ``noise_level`` < 0, or ``method``
        not returning ``[batch, ...]``; and whatever ``method`` raises.
      TypeError: non-float images, ``method`` not callable.

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> w = jnp.ones((1, 4, 4, 3))
      >>> logits_fn = lambda x: jnp.stack([jnp.sum(x * w, (1, 2, 3)), jnp.zeros(x.shape[0])], -1)
      >>> method = functools.partial(vanilla_gradient, logits_fn, reduction="none")
      >>> raw = smooth_grad(method, jax.random.key(0), jnp.ones((2, 4, 4, 3)), targets=0, num_samples=8)
      >>> reduce_attribution(raw).shape
      (2, 4, 4)
    """
    check_images(images)
    if not callable(method):
        raise TypeError(f"method must be a function (images, targets) -> maps; got {type(method).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
    if isinstance(samples_per_step, bool) or not isinstance(samples_per_step, (int, np.integer)) \
            or samples_per_step < 1:
        raise ValueError(f"samples_per_step must be a positive int; got {samples_per_step!r}")
    if not np.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite float >= 0; got {noise_level!r}")
    out = jax.eval_shape(method, images, targets)
    if getattr(out, "ndim", 0) < 1 or out.shape[0] != images.shape[0]:
        raise ValueError(f"method must return maps [batch={images.shape[0]}, ...]; got "
                         f"{getattr(out, 'shape', type(out).__name__)}")

    x = images
    span = jnp.max(x, axis=(1, 2, 3), keepdims=True) - jnp.min(x, axis=(1, 2, 3), keepdims=True)
    sigma = (noise_level * span).astype(x.dtype)

    def sample(i):
        # Drawn flat and reshaped: XLA compiles the 1-D draw much faster on CPU.
        noise = jax.random.normal(jax.random.fold_in(key, i), (x.size,), x.dtype).reshape(x.shape)
        maps = method(x + sigma * noise, targets).astype(jnp.float32)
        return maps * maps if magnitude else maps

    return _chunked_sum(sample, int(num_samples), int(samples_per_step)) / num_samples


# ---------------------------------------------------------------------------------------------------------------
# Integrated gradients.


def integrated_gradients(
    logits_fn: Callable[[Array], Array],
    images: Array,
    targets: Array | int | None = None,
    *,
    baseline: Array | float = 0.0,
    num_steps: int = 50,
    score: Score = "logit",
    reduction: Reduction = "abs_sum",
    normalize: bool = False,
    steps_per_chunk: int = 10,
) -> Array:
    """Integrated gradients (Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks", ICML 2017, Eq. 3).

    ``IG_i(x) = (x_i - x'_i) * 1/m sum_{k=1}^{m} d S_c(x' + k/m (x - x')) / d x_i``: the right Riemann sum of the
    path integral of the gradient along the straight line from the baseline ``x'`` to the image. By completeness
    (Sec. 3, Prop. 1) the attributions of an example sum to ``S_c(x) - S_c(x')`` as ``m`` grows. The ``m`` points
    are ``vmap``-ed in chunks of ``steps_per_chunk`` under a ``lax.scan`` (no Python loop, memory of one chunk).

    Args:
      logits_fn: ``images -> logits [batch, num_classes]`` in inference mode.
      images: [batch, height, width, channels] float.
      targets: ``None`` (the class predicted on the image itself, fixed for every point of the path), ``int`` or
        int [batch].
      baseline: ``x'``: a float (0.0: a black image, the paper's choice for images) or an array broadcastable to
        ``images``.
      num_steps: ``m`` (the paper: 20 to 300).
      score: ``"logit"`` or ``"softmax"``.
      reduction: see :func:`reduce_attribution` (``"none"``: the raw ``[batch, height, width, channels]``).
      normalize: per-example min-max normalisation to [0, 1].
      steps_per_chunk: path points evaluated together in one ``vmap`` (memory vs. speed).

    Returns:
      float32 [batch, height, width] (``[batch, height, width, channels]`` with ``reduction="none"``).

    Raises:
      ValueError: as :func:`vanilla_gradient`; ``num_steps`` or ``steps_per_chunk`` < 1; a baseline that does not
        broadcast to ``images``.
      TypeError: as :func:`vanilla_gradient`.
    """
    _check_reduction(reduction)
    check_images(images)
    _check_score(score)
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be a function images -> logits; got {type(logits_fn).__name__}")
    for name, value in (("num_steps", num_steps), ("steps_per_chunk", steps_per_chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    baseline = jnp.asarray(baseline, images.dtype)
    try:
        baseline = jnp.broadcast_to(baseline, images.shape)
    except ValueError as e:
        raise ValueError(f"baseline of shape {baseline.shape} does not broadcast to images {images.shape}") from e
    logits = logits_fn(images) if targets is None else jax.eval_shape(logits_fn, images)
    _check_logits(logits, images.shape[0])
    classes = resolve_targets(targets, logits)
    delta = images - baseline

    def gradient_at(k):
        alpha = (k + 1).astype(images.dtype) / num_steps
        return _input_gradient(logits_fn, baseline + alpha * delta, classes, score)

    mean_gradient = _chunked_sum(gradient_at, int(num_steps), int(steps_per_chunk)) / num_steps
    attribution = delta.astype(jnp.float32) * mean_gradient
    attribution = mark_invalid(attribution, invalid_examples(images=images, classes=classes,
                                                             num_classes=logits.shape[-1]))
    return _finish(attribution, reduction, normalize)
