"""Supervised training as a plan: one phase, the generic step of the config's training scheme.

The plan of every config with ``trainer = "supervised"`` (the default): the classifier ``config.model`` names, the
optimizer of ``config.optimizer``, the chained scheme of ``config.schemes`` (:func:`saliency_jax.training.build_scheme`)
inside :func:`saliency_jax.training.make_train_step`, for ``config.num_steps`` steps (or ``config.num_epochs``
epochs). With ``num_steps = num_epochs = 0`` the plan has no phase: the weights-only mode, which evaluates imported
weights (``config.model.pretrained``) without training.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from saliency_jax import training
from saliency_jax.config import ConfigError
from saliency_jax.models.build import model_layers, trainable_model
from saliency_jax.plan import Phase, Plan
from saliency_jax.trainers.base import classifier_variables, register_trainer
from saliency_jax.training.step import init_state, make_optimizer, make_train_step

__all__ = ["build_plan", "check", "weights_only", "num_train_steps"]


def weights_only(config: ml_collections.ConfigDict) -> bool:
    """``num_steps = num_epochs = 0``: nothing is trained, no data is read."""
    return not config.get("num_steps", 0) and not config.get("num_epochs", 0)


def check(config: ml_collections.ConfigDict) -> training.Scheme:
    """Validates the supervised trainer's settings before anything is read or compiled: the classification loss, the
    scheme and its settings (on the model's layers), and that something is trained or weights are given.

    Returns:
      The chained scheme.

    Raises:
      ConfigError: ``num_steps = num_epochs = 0`` without weights to evaluate.
      ValueError: an unknown loss, scheme or field, bad settings, a model without default layers.
    """
    training.classification_loss(config.get("loss", "softmax_cross_entropy"))
    scheme = training.build_scheme(config, model_layers(config))
    if weights_only(config) and not config.model.get("pretrained") and not config.model.get("allow_random_init"):
        raise ConfigError(
            "config.num_steps = config.num_epochs = 0 and no weights to evaluate: nothing would be trained. Set "
            "--config.num_steps or --config.num_epochs > 0 to train; num_steps = num_epochs = 0 is the "
            "weights-only mode, which evaluates imported weights (config.model.pretrained=PATH)")
    return scheme


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """``config.num_steps`` if positive, else ``ceil(config.num_epochs * num_train_examples / batch_size)``."""
    if config.get("num_steps", 0):
        return int(config.num_steps)
    return int(np.ceil(config.num_epochs * num_train_examples / config.batch_size))


@register_trainer("supervised", check=check, classifier=trainable_model, weights_only=weights_only)
def build_plan(config: ml_collections.ConfigDict, data) -> Plan:
    """The one-phase plan of a config (or the phase-less plan of the weights-only mode).

    Args:
      config: the run config.
      data: the run's :class:`~saliency_jax.data.inputs.RunData`; None in the weights-only mode, where
        ``config.model.num_classes`` and ``config.dataset.image_size`` / ``channels`` give the model's shape.

    Raises:
      ConfigError: the weights-only mode without ``config.model.num_classes`` or ``config.dataset.image_size``.
      FileNotFoundError: ``config.model.pretrained`` names no file.
      ValueError: as :func:`check`.
    """
    scheme = check(config)
    if data is None:
        num_classes = config.model.get("num_classes")
        size = config.dataset.get("image_size")
        if not num_classes or not size:
            raise ConfigError("num_steps = num_epochs = 0 (the weights-only mode: nothing is trained): set "
                              "config.model.num_classes and config.dataset.image_size for the model to build")
        image_shape, total = (size, size, config.dataset.get("channels", 3)), 0
    else:
        image_shape, num_classes = data.image_shape, data.num_classes
        total = num_train_steps(config, len(data.train_indices))
    image_shape = tuple(int(s) for s in image_shape)
    model = trainable_model(config, num_classes)
    optimizer = make_optimizer(config)
    step = make_train_step(model, optimizer, scheme, loss=config.get("loss", "softmax_cross_entropy"),
                           classification_weight=config.get("classification_weight", 1.0))
    phases = (Phase("train", 1, 0, total, step, "classifier", ("classifier",), guarded=True),) if total else ()
    return Plan(phases=phases, models={"classifier": model},
                init_variables=lambda: classifier_variables(config, model, image_shape, jax.random.key(config.seed),
                                                            skip_head=data is not None),
                init_state=lambda v: init_state(model, optimizer, image_shape, config.seed, v, scheme),
                view=lambda state, role: state, image_shape=image_shape, num_classes=int(num_classes))
