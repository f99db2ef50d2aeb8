"""A model as the train step, the training schemes and the evaluators take it: linen or NNX, any output structure.

A :class:`TrainableModel` is a model reduced to pure functions over its *variables*, a pytree ``{"params": ...,
"batch_stats": ...}`` of plain nested dicts whatever the framework (the train state, the optimizer and the
checkpoints hold nothing else):

* ``init(key, images)`` - the initial variables;
* ``apply(variables, images)`` - the logits in inference mode (what evaluators and accuracy read);
* ``forward(variables, images, rng=..., capture=..., replace=..., bypass=...)`` - the training forward: logits, the
  updated batch statistics, and the activations of named layers (read, replaced or bypassed);
* ``layer_model(variables, layer)`` / ``head(...)`` / ``view(...)`` - the network split at a layer, as the saliency
  transforms take it (:class:`~saliency_jax.saliency.core.LayerModel`, :class:`~saliency_jax.saliency.views.ModelView`).

Every way a scheme or an evaluator reaches a layer goes through these, so the same three adjustments apply
everywhere: ``outputs`` picks the logits out of a structured output (``(logits, aux)`` of big_vision, an output
object of Hugging Face), ``reshape`` maps a transformer's token activations to a spatial grid
(:func:`~saliency_jax.saliency.views.token_grid`), and ``axis_name`` binds the axis name a foreign model's BatchNorm
reduces over (flax's own ``examples/imagenet`` ResNet: ``BatchNorm(axis_name="batch")``).

Constructors: :func:`linen_model` (an unmodified linen module: ``train=True`` / ``train=False`` keywords by default),
:func:`nnx_model` (an NNX module or a factory ``rngs -> module``; ``.train()`` / ``.eval()`` set the mode of each
copy), and :func:`as_trainable`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.saliency.cam import classifier_params
from saliency_jax.saliency.core import LayerModel, LayerOutputs, apply_with_layers, linen_head, linen_layer
from saliency_jax.saliency.views import ModelView, nnx_apply_with_layers, nnx_paths, reshaped_layer

Array = jax.Array

__all__ = ["ModelLayers", "Applied", "TrainableModel", "linen_model", "nnx_model", "as_trainable", "select_outputs"]


@dataclasses.dataclass(frozen=True)
class ModelLayers:
    """The layers of a model that schemes and evaluators read by default.

    Attributes:
      grad_cam_layer: path of the layer Grad-CAM explains and whose features a GAP head pools (CAM, HNC): the last
        convolutional block's output ``[batch, h, w, channels]``, or a transformer's token activations
        ``[batch, tokens, dim]`` seen through the model's ``reshape`` as a grid. None when not known.
      classifier: module path of the dense layer on the pooled features (CAM's and HNC's kernel and bias), or None.
    """

    grad_cam_layer: str | None = None
    classifier: str | None = None


class Applied(NamedTuple):
    """The training forward of :meth:`TrainableModel.forward`.

    Attributes:
      logits: [batch, num_classes] (the ``outputs`` selection applied).
      updates: ``{"batch_stats": ...}`` after the train-mode pass, ``{}`` for a model without batch statistics.
      activations: ``{path: array}`` of the captured layers (before any replacement; a reshaped layer as a grid).
    """

    logits: Array
    updates: Any
    activations: dict[str, Array]


def select_outputs(outputs: int | str | Callable[[Any], Array] | None) -> Callable[[Any], Array]:
    """The function that picks the logits out of a model's output.

    Args:
      outputs: None (the output is the logits), an int (``out[i]``: ``0`` for big_vision's ``(logits, aux)``), a
        str (``out[name]`` for a mapping, else ``getattr(out, name)``: ``"logits"`` for a Hugging Face output), or a
        callable ``out -> logits``.

    Returns:
      ``select(out) -> logits``; it raises ``ValueError`` (when called) if the result is not an array
      ``[batch, ...]``, naming the fix.
    """
    if outputs is None:
        pick = None
    elif isinstance(outputs, int) and not isinstance(outputs, bool):
        pick = lambda out: out[outputs]  # noqa: E731
    elif isinstance(outputs, str):
        pick = lambda out: out[outputs] if isinstance(out, Mapping) else getattr(out, outputs)  # noqa: E731
    elif callable(outputs):
        pick = outputs
    else:
        raise TypeError(f"outputs must be None, an int, a str or a callable; got {type(outputs).__name__}")

    def select(out):
        logits = out if pick is None else pick(out)
        if not isinstance(logits, jax.Array) or logits.ndim < 2:
            what = (f"a {type(logits).__name__}" if not isinstance(logits, jax.Array)
                    else f"an array of shape {tuple(logits.shape)}")
            raise ValueError(f"the model's output is {what}, not logits [batch, num_classes]: say where the logits "
                             "are with outputs= (linen_model / nnx_model; config.model.outputs): 0 for (logits, aux), "
                             "'logits' for an output object or dict, or a function out -> logits")
        return logits

    return select


@dataclasses.dataclass(frozen=True, eq=False)
class TrainableModel:
    """A model as pure functions over its variables (module docstring). Build it with :func:`linen_model`,
    :func:`nnx_model` or :func:`as_trainable`.

    Attributes:
      kind: ``"linen"`` or ``"nnx"``.
      module: the linen module, or the NNX module (a template: never called or changed).
      layers: the default layers (:class:`ModelLayers`).
      reshape: ``{layer path: linear reshape of its activations to [batch, h, w, channels]}``
        (:func:`~saliency_jax.saliency.views.token_grid`), applied wherever that layer is read.
      axis_name: the axis name the model's BatchNorm reduces over, bound around every application (None: none).
    """

    kind: str
    module: Any
    layers: ModelLayers
    reshape: Mapping[str, Callable[[Array], Array]]
    axis_name: str | None
    _select: Callable[[Any], Array]
    _init: Callable[[Array, Array], Any]
    _run: Callable[..., Any]
    _key: Any = None

    # Linen models compare by their definition, so that the arms of an experiment share compilations.
    def __hash__(self):
        return hash(self._key) if self._key is not None else id(self)

    def __eq__(self, other):
        if not isinstance(other, TrainableModel):
            return NotImplemented
        return self is other or (self._key is not None and self._key == other._key)

    # -- the pure functions -------------------------------------------------------------------------------------

    def init(self, key: Array, images: Array) -> dict[str, Any]:
        """The initial variables ``{"params", "batch_stats"}`` (plain nested dicts) for a batch shaped like
        ``images`` [batch, ...] (an NNX module built already returns its own state; ``key`` then goes unused)."""
        variables = self._bind(lambda: self._init(key, images))
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    def apply(self, variables: Any, images: Array, **kwargs) -> Array:
        """Logits [batch, num_classes] in inference mode (linen ``train=False`` / the eval keywords; NNX ``.eval()``).

        Raises:
          TypeError: on keyword arguments (the mode is the model's: the training forward is :meth:`forward`).
        """
        if kwargs:
            raise TypeError(f"TrainableModel.apply(variables, images) runs inference and takes no {sorted(kwargs)}: "
                            "the training forward is model.forward(variables, images, rng=key); the linen module "
                            "itself is model.module")
        out = self._bind(lambda: self._run(variables, images, train=False, rng=None).output)
        return self._select(out)

    def capture(self, variables: Any, images: Array, layers: Sequence[str]) -> Applied:
        """Logits and the activations of ``layers`` in inference mode (a reshaped layer as its grid; ``updates``
        empty): what an evaluator reads."""
        out = self._bind(lambda: self._run(variables, images, train=False, rng=None, capture=tuple(layers)))
        return Applied(self._select(out.output), {}, self._reshaped(out.activations))

    def forward(self, variables: Any, images: Array, *, rng: Array, capture: Sequence[str] = (),
                replace: Mapping[str, Callable[[Array], Array]] | None = None,
                bypass: Sequence[str] = ()) -> Applied:
        """The training forward (train mode: dropout drawn from ``rng``, batch statistics of this batch, updated).

        Args:
          variables: ``{"params", "batch_stats"}``.
          images: [batch, ...] float32.
          rng: PRNG key of the model's dropout.
          capture: layer paths whose activations to return.
          replace: ``{path: fn}``: the layer's output ``a`` replaced by ``fn(a)`` (an Excitation Dropout mask).
          bypass: submodule paths run as the identity (the model's own dropout that a scheme replaces).

        Returns:
          :class:`Applied`.

        Raises:
          ValueError: as :func:`~saliency_jax.saliency.core.apply_with_layers`; the output not logits (see
            :func:`select_outputs`).
        """
        out = self._bind(lambda: self._run(variables, images, train=True, rng=rng, capture=tuple(capture),
                                           replace=replace, bypass=tuple(bypass)))
        output, updates = out.output
        return Applied(self._select(output), updates, self._reshaped(out.activations))

    def layer_model(self, variables: Any, layer: str | None = None, *, train: bool = False,
                    rng: Array | None = None) -> LayerModel:
        """The network split at ``layer`` (default ``layers.grad_cam_layer``), as the saliency transforms take it.

        Inference mode unless ``train`` (then dropout from ``rng`` and this batch's statistics, the updated
        statistics discarded). The layer's ``reshape`` applies. Differentiable with respect to ``variables``.

        Raises:
          ValueError: no layer given and no default.
        """
        layer = self._layer(layer)
        if self.kind == "linen" and self.axis_name is None and self._select is _IDENTITY_SELECT:
            # The linen path exactly as the schemes have always taken it (recorded results stay bit-identical).
            kwargs = self._kwargs(train, rng)
            lm = linen_layer(self.module, variables, layer, **kwargs)
        else:
            def fn(images, perturbation):
                out = self._bind(lambda: self._run(variables, images, train=train, rng=rng, capture=(layer,),
                                                   replace={layer: lambda a: a + perturbation}))
                output = out.output[0] if train else out.output
                return self._select(output), out.activations[layer]

            lm = LayerModel(fn=fn, layer=layer)
        return reshaped_layer(lm, self.reshape[layer]) if layer in self.reshape else lm

    def head(self, variables: Any, layer: str, images: Array) -> Callable[[Array], Array]:
        """The network above ``layer`` in inference mode as a function of that layer's output: ``head(v [batch,
        *units]) -> logits`` (``images`` only traces the model; the part below the layer is dead code under jit)."""
        if self.kind == "linen" and self.axis_name is None and self._select is _IDENTITY_SELECT:
            return linen_head(self.module, variables, layer, images, **self._kwargs(False, None))

        def head(v):
            out = self._bind(lambda: self._run(variables, images, train=False, rng=None, replace={layer: lambda _: v}))
            return self._select(out.output)

        return head

    def view(self, variables: Any, layer: str | None = None) -> ModelView:
        """The inference-mode :class:`~saliency_jax.saliency.views.ModelView` for
        :func:`~saliency_jax.saliency.saliency_map` (layer default ``layers.grad_cam_layer``; None and no default:
        the input-space methods only)."""
        layer = layer or self.layers.grad_cam_layer
        lm = None if layer is None else self.layer_model(variables, layer)
        return ModelView(output_fn=lambda x: self.apply(variables, x), layer_model=lm,
                         variables=variables if self.kind == "linen" else None)

    def classifier_params(self, params: Any) -> tuple[Array, Array | None]:
        """The kernel [features, num_classes] and bias of ``layers.classifier`` in ``params`` (CAM, HNC).

        Raises:
          ValueError: no classifier named, or none at that path.
        """
        if not self.layers.classifier:
            raise ValueError("this model names no classifier (the dense layer on the pooled features): set "
                             "config.model.classifier, or classifier= of linen_model / nnx_model")
        return classifier_params(params, self.layers.classifier)

    @property
    def linen_module(self) -> nn.Module | None:
        """The linen module when it is applied as it is (no ``outputs`` selection, ``reshape`` or ``axis_name``), for
        code that reaches layers through the linen functions of :mod:`saliency_jax.saliency`; else None."""
        plain = (self.kind == "linen" and not self.reshape and self.axis_name is None
                 and self._select is _IDENTITY_SELECT)
        return self.module if plain else None

    def require_linen(self, what: str) -> nn.Module:
        """:attr:`linen_module`, or ``ValueError`` naming ``what`` needs it."""
        if self.linen_module is None:
            raise ValueError(f"{what} reads layers with the linen functions of saliency_jax.saliency and takes a "
                             f"linen module applied as it is; this run's model is {self.kind}"
                             f"{' with outputs/reshape/axis_name' if self.kind == 'linen' else ''}. The maps of any "
                             "model: saliency_map(method, run.model.view(run.variables), images, labels)")
        return self.linen_module

    def paths(self) -> list[str]:
        """The submodule paths layers can be named by (NNX); for linen, :func:`~saliency_jax.saliency.module_paths`."""
        if self.kind == "nnx":
            return nnx_paths(self.module)
        return []

    # -- helpers ------------------------------------------------------------------------------------------------

    def _layer(self, layer):
        layer = layer or self.layers.grad_cam_layer
        if not layer:
            raise ValueError("no layer named and the model has no default Grad-CAM layer: set "
                             "config.model.grad_cam_layer, or grad_cam_layer= of linen_model / nnx_model")
        return layer

    def _kwargs(self, train, rng):
        return self._run.kwargs(train, rng)

    def reshaped(self, layer: str, activations: Array) -> Array:
        """``activations`` of ``layer`` as the schemes read them (through the layer's ``reshape``, if any)."""
        return self.reshape[layer](activations) if layer in self.reshape else activations

    def _reshaped(self, activations):
        return {k: self.reshaped(k, v) for k, v in activations.items()}

    def _bind(self, fn):
        """``fn()`` where ``axis_name`` is bound (a mapped axis of size 1: a BatchNorm's cross-device mean is then
        the mean over the whole, global batch, as the train step's batch is)."""
        if self.axis_name is None:
            return fn()
        out = jax.vmap(lambda _: fn(), axis_name=self.axis_name)(jnp.zeros((1,), jnp.float32))
        return jax.tree.map(lambda a: a[0], out)


_IDENTITY_SELECT = select_outputs(None)


@functools.lru_cache(maxsize=None)
def _selector(outputs):
    return _IDENTITY_SELECT if outputs is None else select_outputs(outputs)


def _reshape_items(reshape) -> tuple:
    return tuple(sorted((dict(reshape or {})).items()))


class _LinenRun:
    """``run(variables, images, train, rng, capture, replace, bypass) -> LayerOutputs`` of a linen module."""

    def __init__(self, module, train_kwargs, eval_kwargs, mutable, rng_name):
        self.module, self.train_kwargs, self.eval_kwargs = module, dict(train_kwargs), dict(eval_kwargs)
        self.mutable, self.rng_name = list(mutable), rng_name

    def kwargs(self, train, rng):
        if not train:
            return dict(self.eval_kwargs)
        return dict(self.train_kwargs, mutable=list(self.mutable),
                    **({"rngs": {self.rng_name: rng}} if rng is not None else {}))

    def __call__(self, variables, images, *, train, rng, capture=(), replace=None, bypass=()):
        if not (train or capture or replace or bypass):
            return LayerOutputs(self.module.apply(variables, images, **self.eval_kwargs), {}, {})
        out = apply_with_layers(self.module, variables, images, capture=capture, replace=replace, bypass=bypass,
                                **self.kwargs(train, rng))
        if train and not isinstance(out.output, tuple):
            raise ValueError("the linen model's train-mode apply with mutable=... did not return (output, updates)")
        if train:
            output, updates = out.output
            updates = dict(updates)
            return out._replace(output=(output, {"batch_stats": updates["batch_stats"]} if "batch_stats" in updates
                                        else {}))
        return out


def linen_model(module: nn.Module, *, grad_cam_layer: str | None = None, classifier: str | None = None,
                reshape: Mapping[str, Callable[[Array], Array]] | None = None,
                outputs: int | str | Callable[[Any], Array] | None = None, axis_name: str | None = None,
                train_kwargs: Mapping[str, Any] | None = None, eval_kwargs: Mapping[str, Any] | None = None,
                mutable: Sequence[str] = ("batch_stats",), rng_name: str = "dropout") -> TrainableModel:
    """A :class:`TrainableModel` of an unmodified linen module.

    Args:
      module: ``module.apply(variables, images, **kwargs) -> output`` (logits, or a structure holding them).
      grad_cam_layer: the default layer of the layer methods and schemes (module path, ``"Conv_2+relu"``, or a
        transformer block's output with ``reshape``).
      classifier: module path of the dense head on the pooled features (CAM, HNC).
      reshape: ``{path: linear reshape to [batch, h, w, channels]}``, e.g. ``{"Transformer/encoder_norm":
        token_grid(0)}``.
      outputs: where the logits are in the output (:func:`select_outputs`).
      axis_name: the axis name the module's BatchNorm reduces over (flax's examples: ``"batch"``), bound around
        every application; without it such a module raises ``unbound axis name``.
      train_kwargs: keywords of the training forward (default ``{"train": True}``; ``{}`` for a module without a
        ``train`` argument; ``{"deterministic": False}`` ...).
      eval_kwargs: keywords of inference (default ``{"train": False}``).
      mutable: the collections a training forward updates (BatchNorm's ``"batch_stats"``).
      rng_name: the rng collection the module's dropout draws from.

    Returns:
      A :class:`TrainableModel` (``kind="linen"``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"linen_model takes a flax.linen.Module; got {type(module).__name__} (an NNX module: "
                        "nnx_model)")
    train_kwargs = {"train": True} if train_kwargs is None else dict(train_kwargs)
    eval_kwargs = {"train": False} if eval_kwargs is None else dict(eval_kwargs)
    run = _LinenRun(module, train_kwargs, eval_kwargs, mutable, rng_name)
    select = _selector(outputs) if _hashable(outputs) else select_outputs(outputs)

    def init(key, images):
        return module.init(key, images, **eval_kwargs)

    key = None
    parts = ("linen", module, grad_cam_layer, classifier, _reshape_items(reshape), outputs, axis_name,
             tuple(sorted(train_kwargs.items())), tuple(sorted(eval_kwargs.items())), tuple(mutable), rng_name)
    if _hashable(parts):
        key = parts
    return TrainableModel("linen", module, ModelLayers(grad_cam_layer, classifier), dict(reshape or {}), axis_name,
                          select, init, run, key)


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# NNX.


def _nnx():
    from flax import nnx
    return nnx


def _filled(template, pure):
    """A copy of the NNX state ``template`` holding the arrays of the plain dict ``pure``."""
    nnx = _nnx()
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


class _NNXRun:
    """``run(variables, images, train, rng, capture, replace, bypass) -> LayerOutputs`` of an NNX module."""

    def __init__(self, graphdef, params, stats, rest, method):
        nnx = _nnx()
        self.graphdef, self.params, self.stats, self.rest, self.method = graphdef, params, stats, rest, method
        self.streams = tuple(sorted({v.tag for _, v in nnx.to_flat_state(rest) if isinstance(v, nnx.RngKey)}))

    def make(self, args):
        nnx = _nnx()
        variables, rng, train = args
        copy = nnx.merge(self.graphdef, _filled(self.params, variables["params"]),
                         _filled(self.stats, variables.get("batch_stats", {})),
                         jax.tree.map(lambda a: a, self.rest))  # a copy: reseeding mutates its rng streams
        if train:
            copy.train()
            if rng is not None and self.streams:
                nnx.reseed(copy, **{s: rng for s in self.streams})
        else:
            copy.eval()
        return copy

    def __call__(self, variables, images, *, train, rng, capture=(), replace=None, bypass=()):
        nnx = _nnx()
        collect = (lambda m: nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))) if train else None
        out = nnx_apply_with_layers(lambda a: self.make((a[0], a[1], train)), (variables, rng), images,
                                    capture=capture, replace=replace, bypass=bypass, method=self.method,
                                    collect=collect)
        if train:
            output, stats = out.output
            return out._replace(output=(output, {"batch_stats": stats} if stats else {}))
        return out


def nnx_model(module: Any, *, grad_cam_layer: str | None = None, classifier: str | None = None,
              reshape: Mapping[str, Callable[[Array], Array]] | None = None,
              outputs: int | str | Callable[[Any], Array] | None = None, axis_name: str | None = None,
              method: str = "__call__") -> TrainableModel:
    """A :class:`TrainableModel` of an NNX module.

    The variables are plain nested dicts: ``params`` (every ``nnx.Param``) and ``batch_stats`` (every
    ``nnx.BatchStat``). Each application merges a fresh copy of the module (``nnx.merge``) and sets its mode
    (``.train()`` for the training forward, its dropout streams reseeded from the step's key; ``.eval()`` for
    inference and maps), so the given module is never changed. Layers are named by attribute path (``"conv2"``,
    ``"blocks/3/mlp"``, ``"conv2+relu"``; :func:`~saliency_jax.saliency.views.nnx_paths` lists them).

    Args:
      module: an NNX module ``module(images) -> output``, or a factory ``rngs -> module`` (then :meth:`init` builds
        it from the run's seed: ``factory(nnx.Rngs(key))``).
      grad_cam_layer, classifier, reshape, outputs, axis_name: as :func:`linen_model`.
      method: the module's method that computes the output.

    Returns:
      A :class:`TrainableModel` (``kind="nnx"``).

    Raises:
      TypeError: ``module`` is neither an NNX module nor callable.
    """
    nnx = _nnx()
    if isinstance(module, nnx.Module):
        factory, built = None, module
    elif callable(module):
        factory, built = module, module(nnx.Rngs(0))  # its structure and non-parameter state (dropout streams)
    else:
        raise TypeError(f"nnx_model takes a flax.nnx.Module or a factory rngs -> module; got "
                        f"{type(module).__name__}")
    graphdef, params, stats, rest = nnx.split(built, nnx.Param, nnx.BatchStat, ...)
    run = _NNXRun(graphdef, params, stats, rest, method)

    if factory is None:
        fixed = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}

        def init(key, images):
            del key, images  # a built module's own state
            return fixed
    else:
        def init(key, images):
            del images
            _, p, s, _ = nnx.split(factory(nnx.Rngs(key)), nnx.Param, nnx.BatchStat, ...)
            return {"params": nnx.to_pure_dict(p), "batch_stats": nnx.to_pure_dict(s)}

    return TrainableModel("nnx", built, ModelLayers(grad_cam_layer, classifier), dict(reshape or {}), axis_name,
                          select_outputs(outputs), init, run, None)


def as_trainable(model: Any, layers: ModelLayers | None = None) -> TrainableModel:
    """A :class:`TrainableModel` from one, a linen module (:func:`linen_model` defaults: ``train=`` keywords) or an
    NNX module (:func:`nnx_model`), with ``layers`` as its default layers.

    Raises:
      TypeError: anything else.
    """
    if isinstance(model, TrainableModel):
        return model
    layers = layers or ModelLayers()
    if isinstance(model, nn.Module):
        return linen_model(model, grad_cam_layer=layers.grad_cam_layer, classifier=layers.classifier)
    nnx = _nnx()
    if isinstance(model, nnx.Module):
        return nnx_model(model, grad_cam_layer=layers.grad_cam_layer, classifier=layers.classifier)
    raise TypeError(f"cannot train {type(model).__name__}: pass a flax linen module, a flax NNX module, or a "
                    "TrainableModel (linen_model / nnx_model)")
