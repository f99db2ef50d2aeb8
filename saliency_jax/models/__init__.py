"""Flax linen models used by the experiments; every layer a saliency method needs is a named submodule.

Every architecture is registered in :data:`MODELS` (a :class:`saliency_jax.registry.Registry`) with its default
layers; ``get_model(name, num_classes)`` builds one; ``GRAD_CAM_LAYER[name]`` is the module path of its last
convolutional layer (post-ReLU), the layer Grad-CAM explains by default, and ``CLASSIFIER[name]`` the module path of
its output dense layer (for the GAP networks: the classifier on the pooled features, which CAM and the HNC loss read).
A run's config takes both from here unless ``config.model.grad_cam_layer`` / ``config.model.classifier`` say otherwise.
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
from saliency_jax.models.nnx_models import NNXCNN, NNXViT
from saliency_jax.models.resnet import ResNet18, ResNet34, ResNet50, ResNet101, ResNet152
from saliency_jax.models.small_cnn import SmallCNN
from saliency_jax.models.vgg import VGG16
from saliency_jax.models.vit import ViT
from saliency_jax.registry import MODELS

__all__ = ["AlexNet", "AttentionCNN", "BackgroundGenerator", "CNN2", "CNNLSTM", "ReLULSTMCell", "SmallCNN", "ResNet18",
           "ResNet34", "ResNet50", "ResNet101", "ResNet152", "UNet", "VanillaCNN", "VGG16", "ViT", "NNXCNN", "NNXViT", "MODELS",
           "get_model", "GRAD_CAM_LAYER", "CLASSIFIER", "MODEL_NAMES"]

#: The architectures by name: value the linen module class (built as ``cls(num_classes=..., **kwargs)``), metadata
#: ``grad_cam_layer`` (module path of the last convolutional layer, post-ReLU) and ``classifier`` (module path of the
#: output dense layer).
# (MODELS is the shared instance of :mod:`saliency_jax.registry`.)

MODELS.register("small_cnn", SmallCNN, grad_cam_layer="conv3", classifier="fc")
MODELS.register("resnet18", ResNet18, grad_cam_layer="layer4", classifier="fc")
MODELS.register("resnet34", ResNet34, grad_cam_layer="layer4", classifier="fc")
MODELS.register("resnet50", ResNet50, grad_cam_layer="layer4", classifier="fc")
MODELS.register("resnet101", ResNet101, grad_cam_layer="layer4", classifier="fc")
MODELS.register("resnet152", ResNet152, grad_cam_layer="layer4", classifier="fc")
MODELS.register("vgg16", VGG16, grad_cam_layer="relu5_3", classifier="fc8")
MODELS.register("cnn2", CNN2, grad_cam_layer="relu_conv3", classifier="fc3")
MODELS.register("alexnet", AlexNet, grad_cam_layer="relu5", classifier="fc8")
MODELS.register("cnn_lstm", CNNLSTM, grad_cam_layer="conv3", classifier="classifier")
# Cruz & Cardoso's classifier and the Attention baseline: layers at 32 px (background_invariance.grad_cam_layer(size)
# gives the path for other sizes); vanilla_cnn has a flatten + dense head: no CAM / HNC (not a GAP network).
MODELS.register("vanilla_cnn", VanillaCNN, grad_cam_layer="relu3", classifier="fc2")
MODELS.register("attention_cnn", AttentionCNN, grad_cam_layer="local_cnn/relu3", classifier="classifier")
# Transformers: the Grad-CAM layer holds tokens [batch, tokens, dim], read as a grid after num_prefix_tokens (0: a GAP
# ViT has no class token); its head on each token is a CAM whose mean is the logit (HNC applies).
MODELS.register("vit", ViT, grad_cam_layer="encoder_norm", classifier="head", num_prefix_tokens=0)
# NNX architectures (kind="nnx"): built from the run's seed as cls(num_classes=..., rngs=..., **kwargs); their
# constructors take the input's channels (and the ViT its image_size) in config.model.kwargs.
MODELS.register("nnx_cnn", NNXCNN, grad_cam_layer="bn+relu", classifier="head", kind="nnx")
MODELS.register("nnx_vit", NNXViT, grad_cam_layer="encoder_norm", classifier="head", num_prefix_tokens=0, kind="nnx")

#: ``{name: Grad-CAM layer path}`` of every registered architecture (a live read-only view of :data:`MODELS`).
GRAD_CAM_LAYER = MODELS.view("grad_cam_layer")

#: ``{name: classifier module path}`` of every registered architecture (a live read-only view of :data:`MODELS`).
CLASSIFIER = MODELS.view("classifier")

#: The names of the built-in architectures, in registration order.
MODEL_NAMES = MODELS.names()


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds a model by name.

    Args:
      name: one of :data:`MODEL_NAMES` (a name registered in :data:`MODELS`).
      num_classes: size of the classifier output.
      **kwargs: forwarded to the model's constructor.

    Returns:
      A ``flax.linen.Module`` (for an architecture registered with ``kind="nnx"``, the factory ``rngs -> module``
      that :func:`saliency_jax.models.trainable.nnx_model` takes) mapping images [batch, height, width, channels] float32 in [0, 1] to logits
      [batch, num_classes] (``"cnn_lstm"``: clips [batch, time, height, width, channels] to logits
      [batch, time, num_classes]).

    Raises:
      ValueError: on an unknown name (``unknown model 'x'; did you mean [...]? (registered: [...])``).
    """
    cls = MODELS.get(name)
    if MODELS.metadata(name).get("kind") == "nnx":  # an NNX class: built from the run's seed by nnx_model
        return lambda rngs: cls(num_classes=num_classes, rngs=rngs, **kwargs)
    return cls(num_classes=num_classes, **kwargs)
