"""Flax linen models used by the experiments; every layer a saliency method needs is a named submodule.

``get_model(name, num_classes)`` builds one; ``GRAD_CAM_LAYER[name]`` is the module path of its last convolutional
layer (post-ReLU), the layer Grad-CAM explains by default, and ``CLASSIFIER[name]`` the module path of its output
dense layer (for the GAP networks: the classifier on the pooled features, which CAM and the HNC loss read). A run's
config takes both from here unless ``config.model.grad_cam_layer`` / ``config.model.classifier`` say otherwise.
``"cnn_lstm"`` is a clip classifier (clips [batch, time, height, width, channels] -> logits [batch, time,
num_classes]; see :mod:`saliency_jax.models.cnn_lstm`).
"""

from __future__ import annotations

import flax.linen as nn

from saliency_jax.models.alexnet import AlexNet
from saliency_jax.models.background_invariance import (AttentionCNN, BackgroundGenerator, UNet,
                                                        VanillaCNN)
from saliency_jax.models.cnn2 import CNN2
from saliency_jax.models.cnn_lstm import CNNLSTM, ReLULSTMCell
from saliency_jax.models.resnet import ResNet18, ResNet34, ResNet50, ResNet101, ResNet152
from saliency_jax.models.small_cnn import SmallCNN
from saliency_jax.models.vgg import VGG16

__all__ = ["AlexNet", "AttentionCNN", "BackgroundGenerator", "CNN2", "CNNLSTM", "ReLULSTMCell", "SmallCNN", "ResNet18",
           "ResNet34", "ResNet50", "ResNet101", "ResNet152", "UNet", "VanillaCNN", "VGG16", "get_model",
           "GRAD_CAM_LAYER", "CLASSIFIER", "MODEL_NAMES"]

GRAD_CAM_LAYER = {
    "small_cnn": "conv3",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "resnet101": "layer4",
    "resnet152": "layer4",
    "vgg16": "relu5_3",
    "cnn2": "relu_conv3",
    "alexnet": "relu5",
    "cnn_lstm": "conv3",
    # Cruz & Cardoso's classifier and the Attention baseline at 32 px (background_invariance.grad_cam_layer(size)
    # gives the path for other sizes).
    "vanilla_cnn": "relu3",
    "attention_cnn": "local_cnn/relu3",
}

CLASSIFIER = {
    "small_cnn": "fc",
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "resnet101": "fc",
    "resnet152": "fc",
    "vgg16": "fc8",
    "cnn2": "fc3",
    "alexnet": "fc8",
    "cnn_lstm": "classifier",
    "vanilla_cnn": "fc2",  # flatten + dense head: no CAM / HNC (not a global-average-pooling network)
    "attention_cnn": "classifier",
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
      [batch, num_classes] (``"cnn_lstm"``: clips [batch, time, height, width, channels] to logits
      [batch, time, num_classes]).

    Raises:
      ValueError: on an unknown name.
    """
    if name == "small_cnn":
        return SmallCNN(num_classes=num_classes, **kwargs)
    resnets = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50, "resnet101": ResNet101,
               "resnet152": ResNet152}
    if name in resnets:
        return resnets[name](num_classes=num_classes, **kwargs)
    if name == "cnn2":
        return CNN2(num_classes=num_classes, **kwargs)
    if name == "vgg16":
        return VGG16(num_classes=num_classes, **kwargs)
    if name == "alexnet":
        return AlexNet(num_classes=num_classes, **kwargs)
    if name == "cnn_lstm":
        return CNNLSTM(num_classes=num_classes, **kwargs)
    if name == "vanilla_cnn":
        return VanillaCNN(num_classes=num_classes, **kwargs)
    if name == "attention_cnn":
        return AttentionCNN(num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
