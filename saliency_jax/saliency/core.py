"""Shared plumbing of the saliency transforms: reaching a layer of a model, targets, map post-processing.

Every transform in :mod:`saliency_jax.saliency` sees a model as a :class:`LayerModel`: a pure function
``(images, perturbation) -> (logits, activations)`` that runs the whole network, returns the activations of one
chosen layer, and adds ``perturbation`` to those activations before the rest of the network consumes them. The
gradient with respect to ``perturbation`` (evaluated at zero) is therefore the gradient with respect to the layer's
activations, with no change to the model's code. Two constructors build one:

* :func:`linen_layer` - a Flax linen module used unmodified, the layer named by its module path (``"layer4"``,
  ``"block3/conv"``, or ``"Conv_2+relu"`` for the output of an activation applied as a function call);
* :func:`split_layer` - any pure JAX model given as a pair ``(features_fn, head_fn)``.

:func:`apply_with_layers` is the one way this library reaches inside a linen module: it runs ``module.apply`` (in
train or inference mode, with mutable collections) and reads the outputs (and inputs) of named layers, replaces
outputs, or runs layers as the identity. :func:`linen_layer`, :func:`linen_head`, class activation maps
(:mod:`saliency_jax.saliency.cam`) and the training schemes (:mod:`saliency_jax.training`) all use it.

Layer paths: a submodule's path, ``"/"``-joined (``"conv3"``, ``"layer4/1/conv2"``, ``"Conv_2"``), reads the output
of that submodule's ``__call__``. ``"PATH+ACT"`` reads the output of the activation function ``ACT`` applied, as a
plain function call, to that submodule's output - the way linen models are usually written
(``nn.relu(nn.Conv(...)(x))``: ``"Conv_0+relu"``). ``ACT`` names the single operation that consumes the submodule's
output: a ``jax.nn`` function that compiles to one call (``relu``, ``relu6``, ``silu``, ``sigmoid``, ``softplus``,
...) or a single element-wise primitive (``tanh``, ``logistic``, ``max``). Such paths are reached by tracing the model
to a jaxpr once and evaluating it again with the layer's value exposed (same numbers, same gradients, same compiled
program); a name that does not match what consumes the output raises, naming what does.

Bad inputs. Every transform validates its inputs: for concrete arrays (called outside ``jax.jit``) a target class
outside ``[0, num_classes)`` (negative ones included: no wrap-around) or a NaN / inf pixel raises ``ValueError``
naming the examples. Traced inputs (inside ``jax.jit``) cannot raise; there the maps of the offending examples are
NaN (every pixel), so they cannot be mistaken for real maps, and the other examples' maps are unaffected. For errors
inside ``jit``, run the transform under :func:`checked` (``jax.experimental.checkify``): the same conditions then
raise ``checkify.JaxRuntimeError`` (a ``ValueError``) after the jitted call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.extend import core as jex_core
from jax.interpreters import mlir

from saliency_jax.saliency._jaxpr import evaluate_jaxpr, inner_jaxpr

Array = jax.Array

__all__ = [
    "LayerModel",
    "LayerOutputs",
    "apply_with_layers",
    "linen_layer",
    "linen_head",
    "split_layer",
    "module_paths",
    "resolve_targets",
    "select_targets",
    "target_one_hot",
    "invalid_examples",
    "mark_invalid",
    "checked",
    "normalize_maps",
    "degenerate_maps",
    "resize_maps",
    "check_images",
    "at_least_float32",
]


@dataclasses.dataclass(frozen=True)
class LayerModel:
    """A model split at one layer, as the saliency transforms consume it.

    Attributes:
      fn: pure function ``(images, perturbation) -> (logits, activations)``. ``images``: [batch, height, width,
        channels] float; ``perturbation``: same shape as ``activations`` (added to them before the head runs);
        ``logits``: [batch, num_classes]; ``activations``: [batch, ...] the layer's output (before the perturbation).
        For a split at several layers (``layer`` a tuple) ``activations`` and ``perturbation`` are tuples, one
        entry per layer (a scalar perturbation is added to every layer).
      layer: a human-readable name of the layer (for error messages and figures), or a tuple of names for a split
        at several layers (:func:`linen_layer` with a list of paths; pytorch-grad-cam's ``target_layers``).
    """

    fn: Callable[[Array, Array], tuple[Array, Array]]
    layer: str | tuple[str, ...]

    @property
    def layers(self) -> tuple[str, ...]:
        """The split's layer names: ``(layer,)``, or the several layers of a multi-layer split."""
        return self.layer if isinstance(self.layer, tuple) else (self.layer,)

    def activation_shapes(self, images: Array) -> tuple[jax.ShapeDtypeStruct, ...]:
        """Shapes and dtypes of every layer's activations (one per name of :attr:`layers`), via ``jax.eval_shape``."""
        shapes = jax.eval_shape(lambda x: self.fn(x, jnp.zeros((), x.dtype))[1], images)
        return tuple(shapes) if isinstance(self.layer, tuple) else (shapes,)

    def activation_shape(self, images: Array) -> jax.ShapeDtypeStruct:
        """Shape and dtype of the layer's activations for ``images`` (no FLOPs: traced with ``jax.eval_shape``).

        Raises:
          ValueError: for a split at several layers (only the CAM methods that aggregate layers take one).
        """
        if isinstance(self.layer, tuple):
            raise ValueError(f"this transform explains one layer; the model is split at {len(self.layer)} layers "
                             f"{list(self.layer)} (several layers are aggregated by the CAM methods of saliency_map "
                             "whose registry entry has several_layers=True)")

        def probe(x):
            # The perturbation's shape is unknown before tracing; run with a scalar zero, which broadcasts.
            return self.fn(x, jnp.zeros((), x.dtype))[1]

        return jax.eval_shape(probe, images)

    def __call__(self, images: Array, perturbation: Array | None = None) -> tuple[Array, Array]:
        if perturbation is None:
            perturbation = jnp.zeros((), images.dtype)
        return self.fn(images, perturbation)


class LayerOutputs(NamedTuple):
    """What :func:`apply_with_layers` returns.

    Attributes:
      output: what ``module.apply`` returned (logits, or ``(logits, updates)`` with ``mutable``).
      activations: ``{path: array}``, the output of each layer named in ``capture`` (before any replacement).
      inputs: ``{path: array}``, the first positional argument of each layer named in ``capture_inputs``.
    """

    output: Any
    activations: dict[str, Array]
    inputs: dict[str, Array]


def _path_str(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _split_path(layer: str) -> tuple[str, str | None]:
    """``"a/b+relu"`` -> ``("a/b", "relu")``; ``"a/b"`` -> ``("a/b", None)``."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"a layer path must be a non-empty string; got {layer!r}")
    base, sep, act = layer.partition("+")
    if sep and (not base or not act or "+" in act):
        raise ValueError(f"layer path {layer!r} must be 'MODULE/PATH' or 'MODULE/PATH+ACTIVATION'")
    return base, (act or None)


def module_paths(module: nn.Module, variables: Any, images: Array, **apply_kwargs) -> list[str]:
    """Lists the module paths of a linen model (as :func:`linen_layer` accepts them), in call order.

    Args:
      module: the Flax linen module.
      variables: its variables (``{"params": ..., "batch_stats": ...}``).
      images: an example input, e.g. ``[1, height, width, channels]``; only its shape is used.
      **apply_kwargs: forwarded to ``module.apply`` (e.g. ``train=False``).

    Returns:
      The paths (``"/"``-joined) of every submodule whose ``__call__`` ran, outermost last.
    """
    seen: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            p = _path_str(context.module)
            if p and p not in seen:
                seen.append(p)
        return out

    def run(x):
        with nn.intercept_methods(interceptor):
            return module.apply(variables, x, **apply_kwargs)

    jax.eval_shape(run, images)
    return seen


# ---------------------------------------------------------------------------------------------------------------
# The layer tag: an identity primitive that marks a layer's value in a traced jaxpr (only ever traced, never run:
# apply_with_layers evaluates the jaxpr itself and passes tagged values through).

_layer_tag_p = jex_core.Primitive("saliency_layer_tag")
_layer_tag_p.def_impl(lambda x, *, index: x)
_layer_tag_p.def_abstract_eval(lambda x, *, index: x)
mlir.register_lowering(_layer_tag_p, lambda ctx, x, *, index: [x])


def _activation_name(eqn) -> str | None:
    """The name of the activation an equation computes: a named ``jit`` / ``custom_jvp`` call or a primitive."""
    prim = eqn.primitive.name
    if prim in ("jit", "pjit") and eqn.params.get("name"):
        return str(eqn.params["name"])
    if prim in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        inner = inner_jaxpr(eqn)
        if inner is not None and len(inner[0].eqns) == 1:
            return _activation_name(inner[0].eqns[0]) or prim
        return prim
    return prim


_ALIASES = {"sigmoid": "logistic"}


def _tap_vars(jaxpr, tags: dict[int, str]) -> dict[Any, str]:
    """Maps the jaxpr variable holding each requested layer's value to its path."""
    tag_out: dict[int, Any] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is _layer_tag_p:
            tag_out[eqn.params["index"]] = eqn.outvars[0]
    taps: dict[Any, str] = {}
    for index, layer in tags.items():
        base, act = _split_path(layer)
        if index not in tag_out:
            raise ValueError(f"layer {base!r} ran inside a transformed call (jit/remat/scan) of the module; "
                             f"{layer!r} can only be reached at the top level")
        var = tag_out[index]
        if act is None:
            taps[var] = layer
            continue
        consumers = [e for e in jaxpr.eqns if any(v is var for v in e.invars)]
        names = [_activation_name(e) for e in consumers]
        if len(consumers) != 1:
            what = "is the model's output" if not consumers else f"is consumed by {len(consumers)} operations {names}"
            raise ValueError(f"layer {layer!r}: the output of {base!r} {what}; '+{act}' needs exactly one activation "
                             "applied to it")
        name = names[0]
        if name != act and name != _ALIASES.get(act):
            raise ValueError(f"layer {layer!r}: the output of {base!r} goes into {name!r}, not {act!r}; name the "
                             f"path {base + '+' + name!r} (only single-operation activations can be reached)")
        if len(consumers[0].outvars) != 1:
            raise ValueError(f"layer {layer!r}: {name!r} has {len(consumers[0].outvars)} outputs")
        taps[consumers[0].outvars[0]] = layer
    return taps


def _bind(eqn, values):
    """Evaluates one equation as ``jax.core.eval_jaxpr`` does."""
    outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _intercept(capture, capture_inputs, replace, bypass, tag_paths, found_out, found_in):
    """A linen method interceptor reading / replacing / bypassing / tagging submodule calls by path."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = _path_str(context.module)
        if path in bypass:
            return args[0]
        if path in capture_inputs:
            found_in.setdefault(path, []).append(args[0] if args else None)
        out = next_fun(*args, **kwargs)
        if path in capture or path in replace or path in tag_paths:
            if not isinstance(out, jax.Array):
                raise ValueError(f"layer {path!r} returns {type(out).__name__}, not a single array; name a "
                                 "submodule whose __call__ returns one activation tensor")
            found_out.setdefault(path, []).append(out)
            if path in replace:
                out = replace[path](out)
            for index in tag_paths.get(path, ()):
                out = _layer_tag_p.bind(out, index=index)
        return out

    return interceptor


def _check_found(module, variables, args, apply_kwargs, wanted, found, what):
    for path in wanted:
        hits = found.get(path, [])
        if not hits:
            paths = module_paths(module, variables, *args, **apply_kwargs)
            raise ValueError(f"layer {path!r} not found in {type(module).__name__}; module paths: {paths}")
        if len(hits) > 1:
            raise ValueError(f"layer {path!r} was called {len(hits)} times; name a layer that runs once")
        if what == "input" and hits[0] is None:
            raise ValueError(f"layer {path!r} is called without a positional input")


def apply_with_layers(module: nn.Module, variables: Any, *args, capture: Sequence[str] = (),
                      capture_inputs: Sequence[str] = (), replace: Mapping[str, Callable[[Array], Array]] | None = None,
                      bypass: Sequence[str] = (), **apply_kwargs) -> LayerOutputs:
    """Runs an unmodified linen module, reading, replacing or bypassing named layers.

    ``module.apply(variables, *args, **apply_kwargs)`` - in train or inference mode, with ``mutable`` collections
    and ``rngs`` as the caller passes them - with:

    * ``capture``: the output of each named layer returned in :attr:`LayerOutputs.activations`;
    * ``capture_inputs``: the first positional argument of each named submodule returned in
      :attr:`LayerOutputs.inputs` (e.g. the pooled features a classifier receives);
    * ``replace``: ``{path: fn}``, the layer's output ``a`` replaced by ``fn(a)`` before the rest of the network
      consumes it (what :attr:`LayerOutputs.activations` holds is ``a``);
    * ``bypass``: submodules that run as the identity (return their first argument), e.g. a dropout layer that a
      training scheme replaces.

    Paths are described in the module docstring (``"conv3"``, ``"Conv_2+relu"``). Jittable, differentiable with
    respect to ``variables`` and ``args`` (inside ``jax.grad`` the values it returns carry the gradient).

    Args:
      module: a ``flax.linen.Module``.
      variables: its variables.
      *args: positional arguments of ``module.apply`` (the images).
      capture: layer paths to read.
      capture_inputs: module paths (no ``+ACT``) whose input to read.
      replace: layer paths to replace, with the function giving the new value (same shape).
      bypass: module paths (no ``+ACT``) run as the identity.
      **apply_kwargs: forwarded to ``module.apply`` (``train=``, ``mutable=``, ``rngs=``).

    Returns:
      :class:`LayerOutputs`.

    Raises:
      ValueError: a path that is not found (the message lists the module paths), that runs more than once, whose
        output is not one array, or (``+ACT``) whose output is not consumed by exactly the named activation.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         h = nn.relu(nn.Dense(3, name="hidden")(x))
      ...         return nn.Dense(2, name="out")(h)
      >>> net = Net()
      >>> variables = net.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> out = apply_with_layers(net, variables, jnp.ones((5, 4)), capture=["hidden+relu"])
      >>> out.activations["hidden+relu"].shape, bool(out.activations["hidden+relu"].min() >= 0)
      ((5, 3), True)
    """
    capture, capture_inputs, bypass = tuple(capture), tuple(capture_inputs), frozenset(bypass)
    replace = dict(replace or {})
    for layer in (*capture_inputs, *bypass):
        if _split_path(layer)[1] is not None:
            raise ValueError(f"{layer!r}: capture_inputs and bypass take module paths without '+ACTIVATION'")
    tagged = tuple(dict.fromkeys(p for p in (*capture, *replace) if _split_path(p)[1] is not None))
    plain_capture = frozenset(p for p in capture if p not in tagged)
    plain_replace = {k: v for k, v in replace.items() if k not in tagged}
    tag_paths: dict[str, list[int]] = {}
    for index, layer in enumerate(tagged):
        tag_paths.setdefault(_split_path(layer)[0], []).append(index)
    wanted = tuple(dict.fromkeys((*plain_capture, *plain_replace, *tag_paths)))
    static = {k: v for k, v in apply_kwargs.items() if k != "rngs"}
    rngs = apply_kwargs.get("rngs")

    def run(variables, args, rngs):
        found_out: dict[str, list] = {}
        found_in: dict[str, list] = {}
        kwargs = dict(static, **({"rngs": rngs} if rngs is not None else {}))
        with nn.intercept_methods(_intercept(plain_capture, frozenset(capture_inputs), plain_replace, bypass,
                                             tag_paths, found_out, found_in)):
            output = module.apply(variables, *args, **kwargs)
        _check_found(module, variables, args, apply_kwargs, wanted, found_out, "output")
        _check_found(module, variables, args, apply_kwargs, capture_inputs, found_in, "input")
        return (output, {k: found_out[k][0] for k in plain_capture}, {k: found_in[k][0] for k in capture_inputs})

    if not tagged:  # every layer is a submodule's output: the intercepted calls are all it takes
        output, activations, inputs = run(variables, args, rngs)
        return LayerOutputs(output, {k: activations[k] for k in capture}, inputs)

    (output, activations, inputs), exposed = run_exposing_activations(run, (variables, args, rngs), tagged, replace)
    activations = {**activations, **exposed}
    return LayerOutputs(output, {k: activations[k] for k in capture}, inputs)


def run_exposing_activations(run: Callable[..., Any], args: tuple, tagged: Sequence[str],
                             replace: Mapping[str, Callable[[Array], Array]]) -> tuple[Any, dict[str, Array]]:
    """``run(*args)`` with the values of ``"PATH+ACT"`` layers exposed (and replaced), for a ``run`` that tags the
    output of each ``PATH`` with ``_layer_tag_p`` (index = position in ``tagged``).

    Some layer follows an activation applied as a function: trace to a jaxpr with those submodules' outputs tagged,
    find the activation that consumes each, and evaluate the jaxpr again exposing (and replacing) its value. The
    evaluation binds the same primitives, so values, gradients and the compiled program are unchanged. Shared by the
    linen (:func:`apply_with_layers`) and NNX (:func:`saliency_jax.saliency.views.nnx_apply_with_layers`) paths.

    Returns:
      ``(run's output, {layer: value before replacement})``.

    Raises:
      ValueError: a tagged output not consumed by exactly the named activation.
    """
    closed, out_shape = jax.make_jaxpr(run, return_shape=True)(*args)
    taps = _tap_vars(closed.jaxpr, dict(enumerate(tagged)))
    exposed: dict[str, Array] = {}

    def eval_equation(eqn, values, _):
        outs = [values[0]] if eqn.primitive is _layer_tag_p else _bind(eqn, values)
        for i, v in enumerate(eqn.outvars):
            layer = taps.get(v)
            if layer is not None:
                exposed[layer] = outs[i]
                if layer in replace:
                    outs[i] = replace[layer](outs[i])
        return outs, [None] * len(outs)

    flat = jax.tree.leaves(args)
    outs, _ = evaluate_jaxpr(closed.jaxpr, closed.consts, None, flat, [None] * len(flat), eval_equation,
                             literal_tag=lambda _: None)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs), exposed


def linen_layer(module: nn.Module, variables: Any, layer: str, **apply_kwargs) -> LayerModel:
    """Splits an unmodified Flax linen module at the layer ``layer``.

    Args:
      module: a ``flax.linen.Module`` whose ``apply(variables, images, **apply_kwargs)`` returns logits
        ``[batch, num_classes]``.
      variables: the module's variables (inside ``jax.grad`` of a loss, traced parameters: the maps then carry
        gradients to them, e.g. a saliency loss term).
      layer: the layer's path (module docstring): a module path ``"/"``-joined (``"layer4"``, ``"Conv_2"``,
        ``"block3/conv"``) for its ``__call__`` output, or ``"Conv_2+relu"`` for the output of an activation applied
        to it as a function call. :func:`module_paths` lists the module paths. A list of paths splits the model at
        all of them in one run (activations and perturbations are then tuples; the CAM methods aggregate their maps
        as pytorch-grad-cam's ``target_layers``).
      **apply_kwargs: forwarded to ``module.apply``; saliency maps are normally taken in inference mode
        (``train=False`` for our models). With ``mutable=[...]`` (train mode with BatchNorm: batch statistics) the
        updated collections are discarded.

    Returns:
      A :class:`LayerModel`.

    Raises:
      ValueError: (when the returned model is first called) as :func:`apply_with_layers`: a path that is not found
        (naming the available paths), runs more than once, or is not followed by the named activation.
    """
    layer = layer_names(layer)
    mutable = bool(apply_kwargs.get("mutable"))
    layers = layer if isinstance(layer, tuple) else (layer,)

    def fn(images, perturbation):
        perturbations = split_perturbation(perturbation, len(layers))
        out = apply_with_layers(module, variables, images, capture=layers,
                                replace={name: (lambda a, p=p: a + p) for name, p in zip(layers, perturbations)},
                                **apply_kwargs)
        logits = out.output[0] if mutable else out.output
        activations = tuple(out.activations[name] for name in layers)
        return logits, (activations if isinstance(layer, tuple) else activations[0])

    return LayerModel(fn=fn, layer=layer)


def layer_names(layer: str | Sequence[str]) -> str | tuple[str, ...]:
    """A layer path, or a list of paths as a tuple (a one-element list is the plain path), checked.

    Raises:
      ValueError: an empty list, a repeated path, or a path that is not a non-empty string.
    """
    if isinstance(layer, str):
        _split_path(layer)
        return layer
    if not isinstance(layer, Sequence) or not layer:
        raise ValueError(f"layer must be a path or a non-empty list of paths; got {layer!r}")
    names = tuple(layer)
    for name in names:
        _split_path(name)
    if len(set(names)) != len(names):
        raise ValueError(f"layer paths must be distinct; got {list(names)}")
    return names[0] if len(names) == 1 else names


def split_perturbation(perturbation: Any, count: int) -> tuple[Any, ...]:
    """The per-layer perturbations of a multi-layer split: a tuple of ``count``, or one value broadcast to all."""
    if isinstance(perturbation, (tuple, list)):
        if len(perturbation) != count:
            raise ValueError(f"a split at {count} layers takes {count} perturbations; got {len(perturbation)}")
        return tuple(perturbation)
    return (perturbation,) * count


def linen_head(module: nn.Module, variables: Any, layer: str, images: Array, *, bypass: Sequence[str] = (),
               **apply_kwargs) -> Callable[[Array], Array]:
    """The part of a linen module above ``layer`` as a function of that layer's output.

    ``head(v)`` runs ``module.apply(variables, images, **apply_kwargs)`` with the output of ``layer`` replaced by
    ``v``; the computation below the layer does not reach the result, so under ``jax.jit`` it is removed as dead
    code.

    Args:
      module: a linen module returning logits.
      variables: its variables.
      layer: the layer's path (as :func:`linen_layer`).
      images: [batch, height, width, channels], the batch the activations belong to (only needed to trace the
        module; it does not influence the result).
      bypass: module paths run as the identity (as :func:`apply_with_layers`).
      **apply_kwargs: e.g. ``train=False``.

    Returns:
      ``head(v [batch, *units]) -> logits [batch, num_classes]``.

    Raises:
      ValueError: (when called) as :func:`apply_with_layers`.
    """

    def head(v):
        return apply_with_layers(module, variables, images, replace={layer: lambda _: v}, bypass=bypass,
                                 **apply_kwargs).output

    return head


def split_layer(features_fn: Callable[[Array], Array], head_fn: Callable[[Array], Array],
                layer: str = "features") -> LayerModel:
    """Builds a :class:`LayerModel` from any pure JAX model given as two functions.

    Args:
      features_fn: ``images [batch, ...] -> activations [batch, ...]`` (e.g. ``[batch, h, w, channels]``).
      head_fn: ``activations -> logits [batch, num_classes]``.
      layer: a name for the split point, used in messages.

    Returns:
      A :class:`LayerModel` computing ``head_fn(features_fn(images) + perturbation)``.
    """

    def fn(images, perturbation):
        activations = features_fn(images)
        return head_fn(activations + perturbation), activations

    return LayerModel(fn=fn, layer=layer)


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_images(images: Array, name: str = "images") -> None:
    """Validates a batch of images: shape and dtype at trace time, finite pixels when the values are known.

    Args:
      images: [batch, height, width, channels] floating point.
      name: the argument's name for messages.

    Raises:
      ValueError: if the rank is not 4, or (concrete ``images``, i.e. outside ``jax.jit``) a pixel is NaN or inf,
        naming the examples. Traced images are checked only under :func:`checked` (``checkify``); otherwise the
        transforms give NaN maps for such examples (:func:`invalid_examples`).
      TypeError: if the dtype is not floating point.
    """
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"{name} must be [batch, height, width, channels]; got shape {getattr(images, 'shape', None)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point (float32 in [0, 1]); got dtype {images.dtype}")
    if _is_traced(images):
        checkify.debug_check(jnp.all(jnp.isfinite(images)), f"{name} contain NaN or inf pixels")
        return
    if isinstance(images, np.ndarray):
        finite = np.isfinite(images).all(axis=(1, 2, 3))
    else:  # a concrete device array (maybe a constant inside a jit trace): reduce there, move [batch] booleans
        with jax.ensure_compile_time_eval():
            finite = np.asarray(jnp.isfinite(images).all(axis=(1, 2, 3)))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name} contain NaN or inf pixels (examples {bad[:10].tolist()}"
                         f"{' ...' if bad.size > 10 else ''} of {finite.size})")


def resolve_targets(targets: Array | int | None, logits: Array) -> Array:
    """Turns a target specification into one class index per example.

    Args:
      targets: ``None`` for each example's predicted class (argmax of the logits); an ``int`` for that class for
        every example; or an int array ``[batch]`` of per-example classes (e.g. the ground-truth labels).
      logits: [batch, num_classes].

    Returns:
      int32 [batch] class indices. Traced targets are returned as given, out-of-range ones included: the transforms
      turn the maps of those examples into NaN (:func:`select_targets`, :func:`target_one_hot`,
      :func:`invalid_examples`) and :func:`checked` raises on them.

    Raises:
      ValueError: if an array of targets does not have shape [batch], or a concrete target (an ``int`` or an array
        known outside ``jit``) lies outside ``[0, num_classes)``; negative targets are errors, not Python-style
        indices from the end.
      TypeError: if targets are not integers.
    """
    batch, num_classes = logits.shape
    if targets is None:
        return jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, (bool, np.bool_)):
        if not 0 <= targets < num_classes:
            raise ValueError(f"target class {targets} out of range [0, {num_classes})")
        return jnp.full((batch,), targets, jnp.int32)
    traced = _is_traced(targets)
    if not traced:  # known values (also a constant inside a jit trace): check them on the host
        targets = np.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer class indices; got dtype {targets.dtype}")
    if targets.ndim != 0 and targets.shape != (batch,):
        raise ValueError(f"targets must have shape [{batch}] (one class per example); got {targets.shape}")
    if traced:
        checkify.debug_check(jnp.all((targets >= 0) & (targets < num_classes)),
                             f"target classes must lie in [0, {num_classes})")
    else:
        values = np.broadcast_to(targets, (batch,))
        bad = np.flatnonzero((values < 0) | (values >= num_classes))
        if bad.size:
            raise ValueError(f"target classes must lie in [0, {num_classes}); got {values[bad[:10]].tolist()} "
                             f"at examples {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}")
    return jnp.broadcast_to(jnp.asarray(targets).astype(jnp.int32), (batch,))


def _valid_classes(classes: Array, num_classes: int) -> Array:
    return (classes >= 0) & (classes < num_classes)


def select_targets(values: Array, classes: Array) -> Array:
    """``values[b, classes[b]]`` per example; NaN, with NaN gradients, where the class is out of range.

    Use it (rather than indexing) wherever a transform picks the target class's score: a traced out-of-range target
    then makes that example's score and every gradient through it NaN, instead of indexing a wrapped-around
    (negative) or clamped (too large) class.

    Args:
      values: [batch, num_classes] float (logits or probabilities).
      classes: int [batch] (from :func:`resolve_targets`).

    Returns:
      [batch] in ``values``' dtype.
    """
    num_classes = values.shape[-1]
    picked = jnp.take_along_axis(values, jnp.clip(classes, 0, num_classes - 1)[:, None], axis=-1)[:, 0]
    return picked * jnp.where(_valid_classes(classes, num_classes), 1.0, jnp.nan).astype(picked.dtype)


def target_one_hot(classes: Array, num_classes: int, dtype=jnp.float32) -> Array:
    """One-hot rows of the target classes, a NaN row where the class is out of range (not a row of zeros).

    Args:
      classes: int [batch].
      num_classes: the number of classes.
      dtype: the rows' float dtype.

    Returns:
      [batch, num_classes] ``dtype``.
    """
    one_hot = jax.nn.one_hot(classes, num_classes, dtype=dtype)
    return jnp.where(_valid_classes(classes, num_classes)[:, None], one_hot, jnp.nan).astype(dtype)


def invalid_examples(*, images: Array | None = None, classes: Array | None = None,
                     num_classes: int | None = None) -> Array | None:
    """Which examples have no valid map: a NaN / inf pixel, or a target class outside ``[0, num_classes)``.

    Args:
      images: optional [batch, ...] float inputs.
      classes: optional int [batch] target classes (with ``num_classes``).
      num_classes: the number of classes.

    Returns:
      bool [batch] (True = invalid), or None when nothing was given.
    """
    invalid = None
    if images is not None:
        invalid = ~jnp.all(jnp.isfinite(images), axis=tuple(range(1, images.ndim)))
    if classes is not None:
        bad = ~_valid_classes(classes, num_classes)
        invalid = bad if invalid is None else invalid | bad
    return invalid


def mark_invalid(maps: Array, invalid: Array | None) -> Array:
    """``maps`` with every value of the invalid examples set to NaN (floating maps; others unchanged).

    Args:
      maps: [batch, ...] float.
      invalid: bool [batch] (:func:`invalid_examples`), or None for no change.

    Returns:
      ``maps``' shape and dtype.
    """
    if invalid is None:
        return maps
    mask = invalid.reshape(invalid.shape + (1,) * (maps.ndim - 1))
    return jnp.where(mask, jnp.asarray(jnp.nan, maps.dtype), maps)


def checked(fn: Callable[..., Any], *, jit: bool = True) -> Callable[..., Any]:
    """The checked mode of the saliency transforms: ``fn`` under ``jax.experimental.checkify``, raising on bad input.

    Inside ``jax.jit`` a transform cannot raise on values; it gives NaN maps for examples with a NaN / inf pixel or
    an out-of-range target class. ``checked(fn)`` instead runs ``fn`` (jitted, by default) with those checks
    functionalised and raises after the call.

    Args:
      fn: a function calling saliency transforms, e.g. ``lambda x, y: grad_cam(split, x, y)``.
      jit: jit the checkified function (the usual use: the checks are then compiled in).

    Returns:
      A function with ``fn``'s signature and outputs.

    Raises:
      jax.experimental.checkify.JaxRuntimeError: (a ``ValueError``, when the returned function is called) naming the
        failed check, e.g. ``"target classes must lie in [0, 10)"``.

    Example:
      >>> from saliency_jax.saliency import grad_cam, split_layer
      >>> model = split_layer(lambda x: x, lambda a: a.mean((1, 2)) @ jnp.ones((3, 2)))
      >>> safe = checked(lambda x, y: grad_cam(model, x, y))
      >>> safe(jnp.ones((2, 4, 4, 3)), jnp.array([0, 1])).shape
      (2, 4, 4)
      >>> try:
      ...     safe(jnp.ones((2, 4, 4, 3)), jnp.array([0, 5]))
      ... except ValueError as e:
      ...     print(str(e).splitlines()[0])
      target classes must lie in [0, 2) (`check` failed)
    """
    inner = checkify.checkify(fn, errors=checkify.user_checks)
    if jit:
        inner = jax.jit(inner)

    def run(*args, **kwargs):
        err, out = inner(*args, **kwargs)
        err.throw()
        return out

    return run


def at_least_float32(x: Array) -> Array:
    """``x`` in float32, or in its own dtype if that is wider (float64 stays float64: gradient checks in x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def degenerate_maps(maps: Array) -> Array:
    """Which maps carry no spatial information: constant over their positions (all zeros - Grad-CAM's after the
    ReLU when no position has positive evidence, every map of a 1x1 layer - or any other constant) or non-finite
    anywhere.

    A scheme that occludes, penalises or guides by such a map silently does nothing (distraction occludes every
    pixel or none; HNC's term is constant), so the schemes log the fraction (``*degenerate_maps`` metrics) and the
    train loop warns.

    Args:
      maps: [batch, ...] float (raw or normalised; a normalised constant map is all zeros).

    Returns:
      bool [batch].
    """
    flat = maps.reshape(maps.shape[0], -1)
    finite = jnp.all(jnp.isfinite(flat), axis=1)
    constant = jnp.max(flat, axis=1) == jnp.min(flat, axis=1)
    return ~finite | constant


def normalize_maps(maps: Array) -> Array:
    """Per-example min-max normalisation to [0, 1].

    Args:
      maps: [batch, ...] float.

    Returns:
      float32 (float64 for float64 input) maps of the same shape, each example scaled to span [0, 1]; a constant
      map becomes all zeros (never NaN); a map holding a NaN or inf value becomes all NaN (an invalid map stays
      recognisable).
    """
    maps = at_least_float32(maps)
    axes = tuple(range(1, maps.ndim))
    lo = jnp.min(maps, axis=axes, keepdims=True)
    hi = jnp.max(maps, axis=axes, keepdims=True)
    span = hi - lo
    safe = jnp.where(span > 0, span, 1.0)
    out = jnp.where(span > 0, (maps - lo) / safe, 0.0)
    return jnp.where(jnp.isfinite(span), out, jnp.nan)  # a map with a NaN / inf value stays NaN (never "constant")


def resize_maps(maps: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of per-example maps (half-pixel centres, as OpenCV's ``cv2.resize`` used by Grad-CAM code).

    Args:
      maps: [batch, h, w] float.
      size: (height, width) in pixels.

    Returns:
      float32 [batch, height, width].
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be [batch, h, w]; got shape {maps.shape}")
    if tuple(maps.shape[1:]) == tuple(size):
        return at_least_float32(maps)
    return jax.image.resize(at_least_float32(maps), (maps.shape[0], *size), method="bilinear", antialias=False)
