"""The single-frame classifier's cross-entropy as a loss term of clip training (Bargal 2019, Sec. 7.4.1).

A CNN-LSTM (:class:`saliency_jax.models.CNNLSTM`) is trained on clips with the classification loss at every LSTM
step (the train step's ``loss`` on logits [batch, time, classes]). The spatial baselines of Table 7.1 - EB, cEB and
BP on every frame as an independent image - need a single-frame CNN classifier; the model carries one
(``frame_classifier``, a dense layer on the same per-frame features ``fc`` that feed the LSTM, so both explain the
same CNN). Without a loss on it that head stays at its random initialisation. This scheme adds its cross-entropy:

    loss = CE(LSTM logits at every step, averaged over steps) + weight * CE(frame classifier, averaged over frames)

with every frame of a clip labelled with the clip's class (the training clips show one digit). The frame
classifier is applied to the per-frame features of the training forward itself (``Scheme.layers``), so the term
costs one dense layer, not a second pass through the CNN; it equals the cross-entropy of
``model.apply(variables, frames, method="frame_logits")`` (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from saliency_jax.saliency.cam import classifier_params
from saliency_jax.training.scheme import Forward, ModelLayers, Scheme, SchemeSettings, StepContext, register_scheme

Array = jax.Array

__all__ = ["FrameClassifierConfig", "frame_classification_loss", "frame_classifier_scheme"]


@dataclasses.dataclass(frozen=True)
class FrameClassifierConfig(SchemeSettings):
    """Settings of the ``"frame_classifier"`` training scheme (``config.frame_classifier``).

    Attributes:
      weight: multiplies the frame classifier's cross-entropy in the total loss (1: the two heads weigh the same).
      features: layer path of the per-frame features the frame classifier reads, [batch * time, units] (``"fc"``:
        the CNN/RNN boundary of :class:`saliency_jax.models.CNNLSTM`).
      classifier: module path of the frame classifier, a dense layer (``kernel`` [units, num_classes], ``bias``).
    """

    weight: float = 1.0
    features: str = "fc"
    classifier: str = "frame_classifier"

    def __post_init__(self):
        if float(self.weight) < 0:
            raise ValueError(f"FrameClassifierConfig.weight must be >= 0; got {self.weight}")
        if not self.features or not self.classifier:
            raise ValueError("FrameClassifierConfig.features and .classifier must name layers")


def frame_classification_loss(features: Array, params: Any, classifier: str, labels: Array
                              ) -> tuple[Array, Array]:
    """The per-clip cross-entropy of the single-frame classifier on every frame of each clip.

    Args:
      features: [batch * time, units] float32, the per-frame features (frames of one clip contiguous), or
        [batch, time, units].
      params: the model's ``params`` collection (the classifier's ``kernel`` [units, num_classes] and ``bias``).
      classifier: module path of the frame classifier.
      labels: int [batch], the class of each clip (every frame's label).

    Returns:
      ``(loss float32 [batch], correct float32 [batch])``: the cross-entropy averaged over each clip's frames, and
      the fraction of its frames classified correctly (argmax).

    Raises:
      ValueError: features whose leading size is not a multiple of the batch, labels not [batch], or a classifier
        whose kernel does not fit the features.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be int [batch]; got shape {tuple(labels.shape)}")
    batch = labels.shape[0]
    features = features.reshape(-1, features.shape[-1]) if features.ndim == 3 else features
    if features.ndim != 2 or features.shape[0] % batch:
        raise ValueError(f"frame features must be [batch * time, units] with batch {batch}; got shape "
                         f"{tuple(features.shape)}")
    kernel, bias = classifier_params(params, classifier)
    if kernel.ndim != 2 or kernel.shape[0] != features.shape[-1]:
        raise ValueError(f"the frame classifier {classifier!r} has a kernel {tuple(kernel.shape)}; the frame features "
                         f"have {features.shape[-1]} units")
    logits = features @ kernel + (0.0 if bias is None else bias)
    logits = logits.reshape(batch, -1, logits.shape[-1])  # [batch, time, classes]
    frame_labels = jnp.broadcast_to(labels[:, None], logits.shape[:2])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, frame_labels), axis=1)
    correct = jnp.mean((jnp.argmax(logits, -1) == frame_labels).astype(jnp.float32), axis=1)
    return loss, correct


@register_scheme("frame_classifier", FrameClassifierConfig)
def frame_classifier_scheme(config: FrameClassifierConfig, layers: ModelLayers) -> Scheme:
    """The frame classifier's cross-entropy as a loss term, on the training forward's per-frame features.

    Args:
      config: weight and layer paths.
      layers: unused (the frame classifier's layers are the scheme's own settings).

    Returns:
      A :class:`~saliency_jax.training.Scheme` whose loss term is ``weight x CE(frame classifier)`` per clip;
      metrics ``frame_classification_loss`` (unweighted, batch mean) and ``frame_accuracy`` (fraction of frames).
    """
    del layers
    weight = float(config.weight)

    def loss(ctx: StepContext, batch, forward: Forward):
        term, correct = frame_classification_loss(forward.activations[config.features], ctx.variables["params"],
                                                  config.classifier, batch["label"])
        return weight * term, {"frame_classification_loss": jnp.mean(term),
                               "frame_accuracy": jax.lax.stop_gradient(jnp.mean(correct))}

    return Scheme(loss=loss, layers=(config.features,))
