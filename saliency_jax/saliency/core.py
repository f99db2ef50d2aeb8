"""Shared plumbing of the saliency transforms: splitting a model at a layer, targets, map post-processing.

Every transform in :mod:`saliency_jax.saliency` sees a model as a :class:`LayerModel`: a pure function
``(images, perturbation) -> (logits, activations)`` that runs the whole network, returns the activations of one
chosen layer, and adds ``perturbation`` to those activations before the rest of the network consumes them. The
gradient with respect to ``perturbation`` (evaluated at zero) is therefore the gradient with respect to the layer's
activations, with no change to the model's code. Two constructors build one:

* :func:`linen_layer` - a Flax linen module used unmodified, the layer named by its module path (``"layer4"``,
  ``"block3/conv"``); the layer's output is reached with :func:`flax.linen.intercept_methods`.
* :func:`split_layer` - any pure JAX model given as a pair ``(features_fn, head_fn)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "LayerModel",
    "linen_layer",
    "split_layer",
    "module_paths",
    "resolve_targets",
    "normalize_maps",
    "resize_maps",
    "check_images",
]


@dataclasses.dataclass(frozen=True)
class LayerModel:
    """A model split at one layer, as the saliency transforms consume it.

    Attributes:
      fn: pure function ``(images, perturbation) -> (logits, activations)``. ``images``: [batch, height, width,
        channels] float; ``perturbation``: same shape as ``activations`` (added to them before the head runs);
        ``logits``: [batch, num_classes]; ``activations``: [batch, ...] the layer's output (before the perturbation).
      layer: a human-readable name of the layer (for error messages and figures).
    """

    fn: Callable[[Array, Array], tuple[Array, Array]]
    layer: str

    def activation_shape(self, images: Array) -> jax.ShapeDtypeStruct:
        """Shape and dtype of the layer's activations for ``images`` (no FLOPs: traced with ``jax.eval_shape``)."""
        def probe(x):
            # The perturbation's shape is unknown before tracing; run with a scalar zero, which broadcasts.
            return self.fn(x, jnp.zeros((), x.dtype))[1]

        return jax.eval_shape(probe, images)

    def __call__(self, images: Array, perturbation: Array | None = None) -> tuple[Array, Array]:
        if perturbation is None:
            perturbation = jnp.zeros((), images.dtype)
        return self.fn(images, perturbation)


def _path_str(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


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


def linen_layer(module: nn.Module, variables: Any, layer: str, **apply_kwargs) -> LayerModel:
    """Splits an unmodified Flax linen module at the submodule named ``layer``.

    Args:
      module: a ``flax.linen.Module`` whose ``apply(variables, images, **apply_kwargs)`` returns logits
        ``[batch, num_classes]``.
      variables: the module's variables.
      layer: module path of the layer, ``"/"``-joined (``"layer4"``, ``"Conv_2"``, ``"block3/conv"``); its
        ``__call__`` output is the activation the saliency method uses. :func:`module_paths` lists the candidates.
      **apply_kwargs: forwarded to ``module.apply``; saliency maps are normally taken in inference mode
        (``train=False`` for our models).

    Returns:
      A :class:`LayerModel`.

    Raises:
      ValueError: (when the returned model is first called) if no submodule has path ``layer``, naming the
        available paths, or if the layer ran more than once (shared modules are ambiguous).
    """

    def fn(images, perturbation):
        captured = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and _path_str(context.module) == layer:
                if not isinstance(out, jax.Array):
                    raise ValueError(
                        f"layer {layer!r} returns {type(out).__name__}, not a single array; name a submodule "
                        "whose __call__ returns one activation tensor")
                captured.append(out)
                out = out + perturbation
            return out

        with nn.intercept_methods(interceptor):
            logits = module.apply(variables, images, **apply_kwargs)
        if not captured:
            paths = module_paths(module, variables, images, **apply_kwargs)
            raise ValueError(f"layer {layer!r} not found in {type(module).__name__}; module paths: {paths}")
        if len(captured) > 1:
            raise ValueError(f"layer {layer!r} was called {len(captured)} times; name a layer that runs once")
        return logits, captured[0]

    return LayerModel(fn=fn, layer=layer)


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


def check_images(images: Array, name: str = "images") -> None:
    """Validates a batch of images at trace time (shape and dtype; values are checked by callers on the host).

    Args:
      images: [batch, height, width, channels] floating point.
      name: the argument's name for messages.

    Raises:
      ValueError: if the rank is not 4.
      TypeError: if the dtype is not floating point.
    """
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"{name} must be [batch, height, width, channels]; got shape {getattr(images, 'shape', None)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point (float32 in [0, 1]); got dtype {images.dtype}")


def resolve_targets(targets: Array | int | None, logits: Array) -> Array:
    """Turns a target specification into one class index per example.

    Args:
      targets: ``None`` for each example's predicted class (argmax of the logits); an ``int`` for that class for
        every example; or an int array ``[batch]`` of per-example classes (e.g. the ground-truth labels).
      logits: [batch, num_classes].

    Returns:
      int32 [batch] class indices.

    Raises:
      ValueError: if an array of targets does not have shape [batch], or a static int is out of range.
      TypeError: if targets are not integers.
    """
    batch, num_classes = logits.shape
    if targets is None:
        return jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)
    if isinstance(targets, int):
        if not 0 <= targets < num_classes:
            raise ValueError(f"target class {targets} out of range [0, {num_classes})")
        return jnp.full((batch,), targets, jnp.int32)
    targets = jnp.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer class indices; got dtype {targets.dtype}")
    if targets.ndim == 0:
        return jnp.broadcast_to(targets.astype(jnp.int32), (batch,))
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape [{batch}] (one class per example); got {targets.shape}")
    return targets.astype(jnp.int32)


def normalize_maps(maps: Array) -> Array:
    """Per-example min-max normalisation to [0, 1].

    Args:
      maps: [batch, ...] float.

    Returns:
      float32 maps of the same shape, each example scaled to span [0, 1]; a constant map becomes all zeros
      (never NaN).
    """
    maps = maps.astype(jnp.float32)
    axes = tuple(range(1, maps.ndim))
    lo = jnp.min(maps, axis=axes, keepdims=True)
    hi = jnp.max(maps, axis=axes, keepdims=True)
    span = hi - lo
    safe = jnp.where(span > 0, span, 1.0)
    return jnp.where(span > 0, (maps - lo) / safe, 0.0)


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
        return maps.astype(jnp.float32)
    return jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], *size), method="bilinear", antialias=False)
