"""A run config's model: the module it names and the :class:`~saliency_jax.models.trainable.TrainableModel` that
trains it.

The one place that turns ``config.model`` into a module (:func:`build_model`), into the model the train step, the
schemes and the evaluators take (:func:`trainable_model`), and into its default layers (:func:`model_layers`); the
train loop, the plan builders, ``load`` and the evaluators all go through it.

``config.model`` fields read here: ``name`` (a name of :data:`saliency_jax.registry.MODELS`: linen classes, and NNX
classes registered with ``kind="nnx"``), ``kwargs``, ``grad_cam_layer`` / ``classifier`` (defaults from the
registry), ``num_prefix_tokens`` (a transformer: the Grad-CAM layer holds tokens ``[batch, tokens, dim]``, read as a
grid after dropping that many leading tokens, :func:`~saliency_jax.saliency.views.token_grid`), ``outputs`` (where the
logits are in a structured output, :func:`~saliency_jax.models.trainable.select_outputs`) and ``axis_name`` (the axis
a foreign model's BatchNorm reduces over).
"""

from __future__ import annotations

import ml_collections

from saliency_jax import models
from saliency_jax.models.trainable import ModelLayers, TrainableModel, linen_model, nnx_model
from saliency_jax.registry import MODELS
from saliency_jax.saliency.views import token_grid

__all__ = ["ModelLayers", "build_model", "model_layers", "trainable_model"]


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The module named by ``config.model.name`` (kwargs from ``config.model.kwargs``): a linen module, or for an
    NNX architecture the factory ``rngs -> module``.

    Raises:
      ValueError: on an unknown model name.
    """
    return models.get_model(config.model.name, num_classes, **dict(config.model.get("kwargs") or {}))


def model_layers(config: ml_collections.ConfigDict) -> ModelLayers:
    """The layers schemes and evaluators read, from ``config.model`` (defaults: :data:`saliency_jax.models.GRAD_CAM_LAYER`
    and :data:`saliency_jax.models.CLASSIFIER` for the architecture).

    Raises:
      ValueError: if the architecture has no default and the config names no layer.
    """
    m = config.model
    name = m.name
    grad_cam = m.get("grad_cam_layer") or models.GRAD_CAM_LAYER.get(name)
    classifier = m.get("classifier") or models.CLASSIFIER.get(name)
    if not grad_cam or not classifier:
        raise ValueError(f"model {name!r} has no default layers: set config.model.grad_cam_layer (last conv block) "
                         "and config.model.classifier (the dense layer on the pooled features)")
    return ModelLayers(grad_cam_layer=grad_cam, classifier=classifier)


def trainable_model(config: ml_collections.ConfigDict, num_classes: int) -> TrainableModel:
    """The :class:`~saliency_jax.models.trainable.TrainableModel` of ``config.model`` (module docstring).

    Raises:
      ValueError: an unknown model name; a model without default layers (:func:`model_layers`).
    """
    m = config.model
    layers = model_layers(config)
    prefix = m.get("num_prefix_tokens", None)
    if prefix is None:
        prefix = MODELS.metadata(m.name).get("num_prefix_tokens")
    reshape = {layers.grad_cam_layer: token_grid(int(prefix))} if prefix is not None else None
    outputs = m.get("outputs", None)
    if isinstance(outputs, str) and outputs.isdigit():
        outputs = int(outputs)
    axis_name = m.get("axis_name", None) or None
    module = build_model(config, num_classes)
    common = dict(grad_cam_layer=layers.grad_cam_layer, classifier=layers.classifier, reshape=reshape,
                  outputs=outputs if outputs not in ("", None) else None, axis_name=axis_name)
    if MODELS.metadata(m.name).get("kind") == "nnx":
        return nnx_model(module, **common)
    return linen_model(module, **common)
