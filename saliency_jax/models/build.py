"""A run config's model: the module it names and the layers schemes and evaluators read from it.

The one place that turns ``config.model`` into a module (:func:`build_model`) and into the layers that maps, schemes
and evaluators reach (:func:`model_layers`, :class:`ModelLayers`); the train loop, the plan builders, ``load`` and the
evaluators all go through it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import ml_collections

from saliency_jax import models

__all__ = ["ModelLayers", "build_model", "model_layers"]


@dataclasses.dataclass(frozen=True)
class ModelLayers:
    """The layers of a model that schemes read (one source of truth: ``config.model``).

    Attributes:
      grad_cam_layer: path of the last convolutional block's (post-activation) output, [batch, h, w, channels]:
        the Grad-CAM layer and the features that a GAP head pools (CAM, HNC).
      classifier: module path of the dense layer on the pooled features (CAM's and HNC's kernel and bias).
    """

    grad_cam_layer: str
    classifier: str


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The linen module named by ``config.model.name`` (kwargs from ``config.model.kwargs``).

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
