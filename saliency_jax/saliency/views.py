"""One view of a model for every saliency method: a linen module, an NNX module or a pure function.

A :class:`ModelView` bundles what the methods of :mod:`saliency_jax.saliency.methods` need:

* ``output_fn(images) -> outputs [batch, num_outputs]`` (logits, or any output a target function scores) for the
  input-space methods (gradients, guided backprop, SmoothGrad, RISE);
* optionally the network split at one layer, a :class:`~saliency_jax.saliency.core.LayerModel`, for the layer
  methods (Grad-CAM, Grad-CAM++, CAM, Excitation Backprop, contrastive EB).

Constructors:

* :func:`linen_view` - an unmodified Flax linen module, the layer named by its path (as
  :func:`~saliency_jax.saliency.core.linen_layer`: ``"layer4"``, ``"block3/conv"``, ``"Conv_2+relu"``);
* :func:`nnx_view` - an unmodified ``flax.nnx.Module``, the layer named by its attribute path (``"conv3"``,
  ``"blocks/1/norm1"``, ``"conv3+relu"``; :func:`nnx_layer`);
* :func:`function_view` - a pure function ``apply_fn(params, images) -> logits`` and, for the layer methods, the
  user's split ``features_fn(params, images) -> activations`` / ``head_fn(params, activations) -> logits``;
* :func:`as_view` - turns a view, a :class:`LayerModel` or a plain ``images -> logits`` function into a view.

Transformers: token activations ``[batch, tokens, dim]`` become a grid ``[batch, h, w, dim]`` with
``reshape=token_grid(num_prefix_tokens=1)`` (the class token dropped), like pytorch-grad-cam's
``reshape_transform``. The reshape must be linear (a slice and reshape): the view adds the layer perturbation on
the grid and maps it back onto the tokens with the reshape's transpose (``jax.linear_transpose``), so the gradient
(or Excitation Backprop signal) at the grid is exactly the reshaped one at the tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.saliency.core import (LayerModel, LayerOutputs, _layer_tag_p, _split_path, layer_names,
                                        linen_layer, run_exposing_activations, split_layer, split_perturbation)

Array = jax.Array

__all__ = [
    "ModelView",
    "as_view",
    "function_view",
    "linen_view",
    "nnx_apply_with_layers",
    "nnx_layer",
    "nnx_paths",
    "nnx_view",
    "reshaped_layer",
    "token_grid",
]


@dataclasses.dataclass(frozen=True)
class ModelView:
    """A model as every saliency method of :func:`~saliency_jax.saliency.methods.saliency_map` takes it.

    Attributes:
      output_fn: ``images [batch, height, width, channels] -> outputs [batch, num_outputs]`` (logits), in inference
        mode.
      layer_model: the network split at the layer the layer methods explain, or None (then only the input-space
        methods apply).
      variables: the linen variables (a linen view only; lets CAM find its classifier by module path).
    """

    output_fn: Callable[[Array], Array]
    layer_model: LayerModel | None = None
    variables: Any = None

    @property
    def layer(self) -> str | None:
        """The explained layer's name, or None."""
        return None if self.layer_model is None else self.layer_model.layer

    def require_layer(self, method: str) -> LayerModel:
        """The :class:`LayerModel`; raises ``ValueError`` naming ``method`` if the view has no layer."""
        if self.layer_model is None:
            raise ValueError(f"{method} explains a layer, but this view has none: build it with a layer "
                             "(linen_view(..., layer='conv3'), nnx_view(..., layer='conv3'), or function_view(..., "
                             "features_fn=..., head_fn=...))")
        return self.layer_model

    def map_outputs(self, fn: Callable[[Array], Array]) -> "ModelView":
        """The same view with every output replaced by ``fn(outputs)`` (layer activations unchanged)."""
        lm = self.layer_model
        new_lm = None
        if lm is not None:
            def layer_fn(images, perturbation, _fn=lm.fn):
                out, act = _fn(images, perturbation)
                return fn(out), act

            new_lm = LayerModel(fn=layer_fn, layer=lm.layer)
        return ModelView(output_fn=lambda x: fn(self.output_fn(x)), layer_model=new_lm, variables=self.variables)


@functools.lru_cache(maxsize=None)
def token_grid(num_prefix_tokens: int = 1, grid_size: tuple[int, int] | None = None) -> Callable[[Array], Array]:
    """A reshape of transformer token activations to a spatial grid (pytorch-grad-cam's ``reshape_transform``).

    The same arguments give the same function (cached), so models built twice from one config compare equal and share
    their compiled programs.

    Args:
      num_prefix_tokens: leading tokens that are not image patches (1 for a ViT's class token; 0 for none); they
        are dropped.
      grid_size: (h, w) patches per column / row; None for a square grid (``h = w = sqrt(tokens -
        num_prefix_tokens)``).

    Returns:
      ``reshape(activations [batch, tokens, dim]) -> [batch, h, w, dim]``; it raises ``ValueError`` (when called)
      if the activations are not rank 3 or the patch tokens do not fill the grid.
    """
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0; got {num_prefix_tokens}")

    def reshape(activations: Array) -> Array:
        if activations.ndim != 3:
            raise ValueError(f"token_grid takes token activations [batch, tokens, dim]; got shape "
                             f"{tuple(activations.shape)}")
        batch, tokens, dim = activations.shape
        patches = tokens - num_prefix_tokens
        if grid_size is None:
            side = math.isqrt(max(patches, 0))
            h, w = side, side
        else:
            h, w = grid_size
        if patches <= 0 or h * w != patches:
            raise ValueError(f"{tokens} tokens minus {num_prefix_tokens} prefix tokens = {patches} patch tokens do "
                             f"not fill a {h}x{w} grid; pass grid_size=(h, w)")
        return activations[:, num_prefix_tokens:, :].reshape(batch, h, w, dim)

    return reshape


def reshaped_layer(model: LayerModel, reshape: Callable[[Array], Array]) -> LayerModel:
    """``model`` with its layer's activations seen through a linear ``reshape`` (e.g. :func:`token_grid`).

    The perturbation is given in the reshaped space and added to the original activations through the transpose of
    ``reshape``, so gradients / EB signals with respect to it are the reshaped gradients at the original layer.

    Args:
      model: the network split at a layer.
      reshape: a linear function of the activations (slicing, reshaping, transposing).

    Returns:
      A :class:`LayerModel` whose activations are ``reshape(activations)``.

    Raises:
      ValueError: (when called) if ``reshape`` is not linear.
    """

    def fn(images, perturbation):
        def run(p_original):
            return model.fn(images, p_original)

        shape = jax.eval_shape(lambda x: model.fn(x, jnp.zeros((), x.dtype))[1], images)
        perturbation = jnp.broadcast_to(perturbation, jax.eval_shape(reshape, shape).shape)
        try:
            (p_original,) = jax.linear_transpose(reshape, shape)(perturbation.astype(shape.dtype))
        except Exception as e:  # jax raises various error types for non-linear functions
            raise ValueError(f"the reshape of layer {model.layer!r} must be linear (slice / reshape / transpose of "
                             f"the activations): {type(e).__name__}: {e}") from e
        out, activations = run(p_original)
        return out, reshape(activations)

    return LayerModel(fn=fn, layer=model.layer)


def _maybe_reshape(model: LayerModel | None, reshape) -> LayerModel | None:
    if model is None or reshape is None:
        return model
    if isinstance(model.layer, tuple):
        raise ValueError(f"reshape= applies to one layer; got several {list(model.layer)}")
    return reshaped_layer(model, reshape)


def linen_view(module: nn.Module, variables: Any, layer: str | None = None, *,
               reshape: Callable[[Array], Array] | None = None, **apply_kwargs) -> ModelView:
    """A view of an unmodified Flax linen module.

    Args:
      module: a ``flax.linen.Module`` whose ``apply(variables, images, **apply_kwargs)`` returns logits
        ``[batch, num_classes]``.
      variables: its variables (``{"params": ..., "batch_stats": ...}``).
      layer: the path of the layer the layer methods explain (see :func:`~saliency_jax.saliency.core.linen_layer`),
        a list of paths (several layers, aggregated by the CAM methods that take them, pytorch-grad-cam's
        ``target_layers``), or None for the input-space methods only.
      reshape: optional linear map of the layer's activations to ``[batch, h, w, channels]`` (e.g.
        ``token_grid(1)`` for a ViT's tokens).
      **apply_kwargs: forwarded to ``module.apply`` (``train=False`` for our models). With ``mutable=[...]`` the
        updated collections are discarded.

    Returns:
      A :class:`ModelView`.
    """
    mutable = bool(apply_kwargs.get("mutable"))

    def output_fn(images):
        out = module.apply(variables, images, **apply_kwargs)
        return out[0] if mutable else out

    lm = None if layer is None else linen_layer(module, variables, layer, **apply_kwargs)
    return ModelView(output_fn=output_fn, layer_model=_maybe_reshape(lm, reshape), variables=variables)


def function_view(apply_fn: Callable[[Any, Array], Array] | None, params: Any, *,
                  features_fn: Callable[[Any, Array], Array] | None = None,
                  head_fn: Callable[[Any, Array], Array] | None = None, layer: str = "features",
                  reshape: Callable[[Array], Array] | None = None) -> ModelView:
    """A view of a pure function ``apply_fn(params, images) -> logits``, split by the user for the layer methods.

    Args:
      apply_fn: ``(params, images [batch, height, width, channels]) -> logits [batch, num_classes]``; None to use
        ``head_fn(params, features_fn(params, images))``.
      params: the parameters (any pytree; traced parameters carry gradients through the maps).
      features_fn: ``(params, images) -> activations [batch, ...]``, the network up to the explained layer.
      head_fn: ``(params, activations) -> logits``, the rest; ``head_fn(p, features_fn(p, x))`` must equal
        ``apply_fn(p, x)``.
      layer: a name for the split point (messages).
      reshape: optional linear map of the activations to ``[batch, h, w, channels]`` (:func:`token_grid`).

    Returns:
      A :class:`ModelView`.

    Raises:
      ValueError: if only one of ``features_fn`` / ``head_fn`` is given, or neither nor ``apply_fn``.
    """
    if (features_fn is None) != (head_fn is None):
        raise ValueError("give both features_fn and head_fn (the split at the explained layer), or neither")
    lm = None
    if features_fn is not None:
        lm = split_layer(lambda x: features_fn(params, x), lambda a: head_fn(params, a), layer=layer)
    if apply_fn is None:
        if lm is None:
            raise ValueError("give apply_fn, or features_fn and head_fn")
        output_fn = lambda x: lm(x)[0]  # noqa: E731
    else:
        output_fn = lambda x: apply_fn(params, x)  # noqa: E731
    return ModelView(output_fn=output_fn, layer_model=_maybe_reshape(lm, reshape))


# ---------------------------------------------------------------------------------------------------------------
# NNX: a layer of an unmodified module, reached by attribute path.


def _nnx():
    from flax import nnx
    return nnx


def _path_key(path) -> str:
    return "/".join(str(p) for p in path)


def nnx_paths(module) -> list[str]:
    """The ``"/"``-joined attribute paths of every submodule of an NNX module (as :func:`nnx_layer` accepts them)."""
    nnx = _nnx()
    return [_path_key(path) for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Module) and path]


_TAPPED: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` returns its first argument when the instance is bypassed
    (``_saliency_bypass``) and otherwise hands its output to the instance's ``_saliency_tap``."""
    if cls not in _TAPPED:
        def __call__(self, *args, **kwargs):
            if getattr(self, "_saliency_bypass", False):
                return args[0]
            out = cls.__call__(self, *args, **kwargs)
            tap = getattr(self, "_saliency_tap", None)
            return out if tap is None else tap(out)

        _TAPPED[cls] = type(f"Tapped{cls.__name__}", (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _TAPPED[cls]


def nnx_apply_with_layers(make: Callable[[Any], Any], args: Any, images: Array, *, capture: Sequence[str] = (),
                          replace: Mapping[str, Callable[[Array], Array]] | None = None, bypass: Sequence[str] = (),
                          method: str = "__call__", collect: Callable[[Any], Any] | None = None) -> LayerOutputs:
    """Runs an NNX module reading, replacing or bypassing named submodules (the NNX counterpart of
    :func:`~saliency_jax.saliency.core.apply_with_layers`).

    ``make(args)`` builds a fresh copy of the module (``nnx.merge`` of its states, in the wanted mode); the copy's
    named submodules get a ``__call__`` that records their output, replaces it, or returns their first argument, and
    ``getattr(copy, method)(images)`` runs. The caller's module is never changed and the function is pure
    (jittable, differentiable with respect to every array in ``args`` and ``images``). ``"PATH+ACT"`` paths (the
    output of an activation applied as a function to a submodule's output, ``nnx.relu(self.conv(x))``:
    ``"conv+relu"``) are reached as for linen: the run is traced to a jaxpr with the submodule's output tagged and
    evaluated again with the activation's value exposed (and replaced); the same primitives are bound.

    Args:
      make: ``args -> module``, a fresh NNX module copy.
      args: a pytree of arrays ``make`` reads (the states, a PRNG key), passed explicitly so that tracing sees them.
      images: the module's input [batch, ...].
      capture: layer paths whose output to return (before any replacement).
      replace: ``{path: fn}``: the layer's output ``a`` replaced by ``fn(a)``.
      bypass: submodule paths (no ``+ACT``) run as the identity.
      method: the module's method that computes the outputs.
      collect: optional ``module -> pytree of arrays`` read from the copy after the run (e.g. updated batch
        statistics); then :attr:`LayerOutputs.output` is ``(outputs, collect(copy))``.

    Returns:
      :class:`~saliency_jax.saliency.core.LayerOutputs` (``inputs`` empty).

    Raises:
      ValueError: a path that is not a submodule (naming the submodule paths), a layer called more than once or
        returning something other than one array, or (``+ACT``) whose output is not consumed by exactly the named
        activation.
    """
    nnx = _nnx()
    capture, replace, bypass = tuple(capture), dict(replace or {}), frozenset(bypass)
    for layer in bypass:
        if _split_path(layer)[1] is not None:
            raise ValueError(f"{layer!r}: bypass takes submodule paths without '+ACTIVATION'")
    tagged = tuple(dict.fromkeys(p for p in (*capture, *replace) if _split_path(p)[1] is not None))
    plain_capture = tuple(p for p in capture if p not in tagged)
    plain_replace = {k: v for k, v in replace.items() if k not in tagged}
    tag_paths: dict[str, list[int]] = {}
    for index, layer in enumerate(tagged):
        tag_paths.setdefault(_split_path(layer)[0], []).append(index)
    tapped = tuple(dict.fromkeys((*plain_capture, *plain_replace, *tag_paths)))

    def run(args, images):
        copy = make(args)
        nodes = {_path_key(path): node for path, node in nnx.iter_graph(copy)
                 if isinstance(node, nnx.Module) and path}
        missing = [p for p in (*tapped, *bypass) if p not in nodes]
        if missing:
            raise ValueError(f"layer {missing[0]!r} not found in {type(copy).__name__}; submodule paths: "
                             f"{list(nodes)}")
        found: dict[str, list] = {}
        for base in tapped:
            def tap(out, base=base):
                if not isinstance(out, jax.Array):
                    raise ValueError(f"layer {base!r} returns {type(out).__name__}, not a single array; name a "
                                     "submodule whose __call__ returns one activation tensor")
                found.setdefault(base, []).append(out)
                if base in plain_replace:
                    out = plain_replace[base](out)
                for index in tag_paths.get(base, ()):
                    out = _layer_tag_p.bind(out, index=index)
                return out

            object.__setattr__(nodes[base], "_saliency_tap", tap)
        for base in bypass:
            object.__setattr__(nodes[base], "_saliency_bypass", True)
        for base in (*tapped, *bypass):
            node = nodes[base]
            object.__setattr__(node, "__class__", _tapped_class(type(node)))
        output = getattr(copy, method)(images)
        for base in tapped:
            hits = len(found.get(base, []))
            if hits != 1:
                raise ValueError(f"layer {base!r} was called {hits} times; name a layer that runs once")
        if collect is not None:
            output = (output, collect(copy))
        return output, {k: found[k][0] for k in plain_capture}

    if not tagged:
        output, activations = run(args, images)
        return LayerOutputs(output, activations, {})

    (output, activations), exposed = run_exposing_activations(run, (args, images), tagged, replace)
    activations = {**activations, **exposed}
    return LayerOutputs(output, {k: activations[k] for k in capture}, {})


def nnx_layer(module, layer: str, *, method: str = "__call__") -> LayerModel:
    """Splits an unmodified ``flax.nnx.Module`` at the submodule ``layer``.

    Each call merges a fresh copy of the module (``nnx.split`` once, ``nnx.merge`` per call) and gives that copy's
    submodule a ``__call__`` that records its output and adds the perturbation to it
    (:func:`nnx_apply_with_layers`); the caller's module is never changed, and the function is pure (jittable,
    differentiable; module state updates of the copy, e.g. batch norm statistics in train mode, are discarded).
    ``"PATH+ACT"`` (the output of an activation applied as a function to the submodule's output,
    ``nnx.relu(self.conv(x))``: ``"conv+relu"``) is reached as for linen (:mod:`saliency_jax.saliency.core`).

    Args:
      module: an NNX module ``module(images) -> logits [batch, num_classes]`` (put it in inference mode first:
        ``nnx.view(module, deterministic=True, use_running_average=True)`` or ``module.eval()``).
      layer: the submodule's attribute path, ``"/"``-joined (``"conv3"``, ``"blocks/1/norm1"``; list items by
        index), optionally ``"+ACT"`` (``"conv3+relu"``); :func:`nnx_paths` lists the submodule paths. A list of
        paths splits the module at all of them (tuples of activations, as
        :func:`~saliency_jax.saliency.core.linen_layer`).
      method: the module's method that computes the logits.

    Returns:
      A :class:`~saliency_jax.saliency.core.LayerModel`.

    Raises:
      ValueError: (at once) an unknown path, naming the available ones; (when called) a layer that is not called
        exactly once, that returns something other than one array, or (``+ACT``) whose output is not consumed by
        exactly the named activation.
    """
    nnx = _nnx()
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module; got {type(module).__name__}")
    layer = layer_names(layer)
    layers = layer if isinstance(layer, tuple) else (layer,)
    paths = nnx_paths(module)
    for name in layers:
        base, _ = _split_path(name)
        if base not in paths:
            raise ValueError(f"layer {base!r} not found in {type(module).__name__}; submodule paths: {paths}")
    graphdef, state = nnx.split(module)

    def fn(images, perturbation):
        perturbations = split_perturbation(perturbation, len(layers))
        out = nnx_apply_with_layers(lambda s: nnx.merge(graphdef, s), state, images, capture=layers,
                                    replace={name: (lambda a, p=p: a + p) for name, p in zip(layers, perturbations)},
                                    method=method)
        activations = tuple(out.activations[name] for name in layers)
        return out.output, (activations if isinstance(layer, tuple) else activations[0])

    return LayerModel(fn=fn, layer=layer)


def nnx_view(module, layer: str | None = None, *, reshape: Callable[[Array], Array] | None = None,
             method: str = "__call__") -> ModelView:
    """A view of an unmodified ``flax.nnx.Module`` (in inference mode), the layer by attribute path.

    Args:
      module: the NNX module, ``module(images) -> logits [batch, num_classes]``.
      layer: the submodule path the layer methods explain (:func:`nnx_layer`), a list of paths (several layers),
        or None.
      reshape: optional linear map of the layer's activations to ``[batch, h, w, channels]`` (:func:`token_grid`).
      method: the module's method that computes the logits.

    Returns:
      A :class:`ModelView`; its functions merge a copy of the module per call, leaving ``module`` unchanged.
    """
    nnx = _nnx()
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module; got {type(module).__name__}")
    graphdef, state = nnx.split(module)

    def output_fn(images):
        return getattr(nnx.merge(graphdef, state), method)(images)

    lm = None if layer is None else nnx_layer(module, layer, method=method)
    return ModelView(output_fn=output_fn, layer_model=_maybe_reshape(lm, reshape))


def as_view(model) -> ModelView:
    """A :class:`ModelView` from a view, a :class:`LayerModel`, or a function ``images -> logits``.

    Raises:
      TypeError: for anything else (linen / NNX modules need :func:`linen_view` / :func:`nnx_view`).
    """
    if isinstance(model, ModelView):
        return model
    if isinstance(model, LayerModel):
        return ModelView(output_fn=lambda x: model(x)[0], layer_model=model)
    if isinstance(model, nn.Module):
        raise TypeError("a linen module needs its variables: use linen_view(module, variables, layer, train=False)")
    try:
        nnx = _nnx()
        if isinstance(model, nnx.Module):
            return nnx_view(model)
    except ImportError:  # pragma: no cover
        pass
    if callable(model):
        return ModelView(output_fn=model)
    raise TypeError(f"cannot view {type(model).__name__} as a model: pass a ModelView (linen_view, nnx_view, "
                    "function_view), a LayerModel, or a function images -> logits")
