"""Flax linen models used by the experiments; every layer a saliency method needs is a named submodule.

``get_model(name, num_classes)`` builds one; ``GRAD_CAM_LAYER[name]`` is the module path of its last convolutional
layer, the layer Grad-CAM explains by default.
"""

from __future__ import annotations

import flax.linen as nn

from saliency_jax.models.small_cnn import SmallCNN

__all__ = ["SmallCNN", "get_model", "GRAD_CAM_LAYER", "MODEL_NAMES"]

GRAD_CAM_LAYER = {
    "small_cnn": "conv3",
    "resnet18": "layer4",
    "resnet50": "layer4",
}

MODEL_NAMES = tuple(GRAD_CAM_LAYER)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds a model by name.

    Args:
      name: one of :data:`MODEL_NAMES`.
      num_classes: size of the classifier output.
      **kwargs: forwarded to the model's constructor.

    Returns:
      A ``flax.linen.Module`` mapping images [batch, height, width, channels] float32 in [0, 1] to logits
      [batch, num_classes].

    Raises:
      ValueError: on an unknown name.
    """
    if name == "small_cnn":
        return SmallCNN(num_classes=num_classes, **kwargs)
    if name in ("resnet18", "resnet50"):
        from saliency_jax.models import resnet

        return (resnet.ResNet18 if name == "resnet18" else resnet.ResNet50)(num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
