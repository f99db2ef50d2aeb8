"""The trainer protocol and registry (:mod:`saliency_jax.trainers`)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from saliency_jax.models import weights
from saliency_jax.models.trainable import as_trainable
from saliency_jax.plan import Plan
from saliency_jax.registry import TRAINERS

__all__ = ["Trainer", "register_trainer", "get_trainer", "trainer_names", "classifier_variables"]


def _never(config: ml_collections.ConfigDict) -> bool:
    return False


class Trainer(NamedTuple):
    """A plan builder and its checks.

    Attributes:
      build: ``(config, data) -> Plan``: ``data`` is the run's :class:`~saliency_jax.data.inputs.RunData` (None in
        the weights-only mode).
      check: ``config -> Any``: validates the trainer's settings before anything is read or compiled (raises
        ``ValueError`` naming the field).
      classifier: ``(config, num_classes) -> model``: the model validation traces on the data's shape (a
        :class:`~saliency_jax.models.trainable.TrainableModel`, or a linen module taken as it is).
      weights_only: ``config -> bool``: nothing is trained and no data is read (the plan has no phase).
    """

    build: Callable[[ml_collections.ConfigDict, Any], Plan]
    check: Callable[[ml_collections.ConfigDict], Any]
    classifier: Callable[[ml_collections.ConfigDict, int], nn.Module]
    weights_only: Callable[[ml_collections.ConfigDict], bool] = _never


def register_trainer(name: str, *, check, classifier, weights_only=_never):
    """Decorator registering a plan builder ``build(config, data) -> Plan`` under ``name`` (in
    :data:`saliency_jax.registry.TRAINERS`).

    Raises:
      ValueError: if another builder is already registered under ``name``.
    """
    def register(build):
        if name in TRAINERS and TRAINERS.get(name).build is not build:
            raise ValueError(f"trainer {name!r} is registered twice")
        if name not in TRAINERS:
            TRAINERS.register(name, Trainer(build, check, classifier, weights_only))
        return build

    return register


def trainer_names() -> tuple[str, ...]:
    """The registered trainer names."""
    return tuple(TRAINERS.names())


def get_trainer(name: str) -> Trainer:
    """The trainer registered under ``name``.

    Raises:
      ValueError: on an unknown name (naming the close ones and the registered ones).
    """
    return TRAINERS.get(str(name))


#: Architectures the papers fine-tune from ImageNet weights (:func:`saliency_jax.models.weights.load_pretrained`):
#: starting them from random weights is allowed, with a warning.
PRETRAINED_ARCHITECTURES = ("resnet50", "vgg16", "alexnet")


def classifier_variables(config: ml_collections.ConfigDict, model: nn.Module, image_shape: tuple[int, ...],
                         key, *, skip_head: bool) -> Any:
    """A plan's first classifier's initial variables: ``model.init(key)`` on a zero batch of one (jitted once per
    process for each (model, shape) when the module hashes), then the imported weights of ``config.model.pretrained``
    when set (the head kept only without ``skip_head``).

    Raises:
      FileNotFoundError: ``config.model.pretrained`` names no file (checked before the initialisation).
      ValueError: as :func:`saliency_jax.models.weights.load_pretrained` (weights that do not fit the model).
    """
    pretrained = config.model.get("pretrained")
    if not pretrained and config.model.name in PRETRAINED_ARCHITECTURES:
        logging.warning("%s starts from random weights: set --config.model.pretrained=PATH (torchvision-named "
                        ".safetensors/.npz) to fine-tune from ImageNet as the papers do", config.model.name)
    if pretrained and not os.path.isfile(pretrained):  # before the (slow) initialisation
        raise FileNotFoundError(f"config.model.pretrained: weights file not found: {pretrained!r}")
    variables = _init_variables(model, tuple(image_shape), key)
    if pretrained:
        variables = weights.load_pretrained(config.model.name, pretrained, variables, skip_head=skip_head)
    return variables


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def _jit_init(key, *, model, image_shape):
    return as_trainable(model).init(key, jnp.zeros((1, *image_shape), jnp.float32))


def _init_variables(model: nn.Module, image_shape: tuple[int, ...], key):
    """``model.init(key)`` on a zero batch of one, jitted once per process for each (model, shape): the arms of an
    experiment share the compilation (an unhashable module compiles for this call)."""
    try:
        hash(model)
    except TypeError:
        return jax.jit(functools.partial(_jit_init.__wrapped__, model=model, image_shape=image_shape))(key)
    return _jit_init(key, model=model, image_shape=image_shape)
