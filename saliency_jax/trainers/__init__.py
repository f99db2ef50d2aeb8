"""Training loops the experiment runner can choose from, by name (``config.trainer``).

The generic loop, :func:`saliency_jax.train.train`, trains one model with one optimizer; a training scheme
(:mod:`saliency_jax.training.scheme`) changes its batch, forward or loss. A method whose loop really differs - several
models, each with its own optimizer, trained in phases or as a min-max game - gets its own trainer here, forked beside
the generic loop as big_vision's ``trainers/proj/*/train.py`` are beside its ``train.py``: it reuses the loop's mesh,
input pipeline, checkpointing and metric log (the public pieces of :mod:`saliency_jax.train`) and returns the same
:class:`saliency_jax.train.TrainResult`, so the runner and every evaluator stay unchanged.

A trainer is ``train(config, workdir, *, progress=True) -> TrainResult`` (``progress``: a progress bar, named by
it when a string) with ``check(config)`` validating its settings before anything is trained (raising
``ValueError``); it is registered with :func:`register_trainer`.
Registered: ``"supervised"`` (the generic loop) and ``"background_invariance"``
(:mod:`saliency_jax.trainers.background_invariance`, Cruz & Cardoso's three phases and the Attention baseline).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, NamedTuple

import ml_collections

from saliency_jax import train as train_lib
from saliency_jax import training

__all__ = ["Trainer", "register_trainer", "get_trainer", "trainer_names", "check_trainer"]


class Trainer(NamedTuple):
    """A training loop: ``train(config, workdir, *, progress) -> TrainResult`` and ``check(config)`` (raises
    ``ValueError`` on bad settings, before anything is read or compiled)."""

    train: Callable[..., train_lib.TrainResult]
    check: Callable[[ml_collections.ConfigDict], Any]


_REGISTRY: dict[str, Trainer] = {}


def register_trainer(name: str, check: Callable[[ml_collections.ConfigDict], Any]):
    """Decorator registering a ``train(config, workdir, *, progress=True)`` function under ``name``.

    Raises:
      ValueError: if another function is already registered under ``name``.
    """
    def register(train_fn):
        if name in _REGISTRY and _REGISTRY[name].train is not train_fn:
            raise ValueError(f"trainer {name!r} is registered twice")
        _REGISTRY[name] = Trainer(train_fn, check)
        return train_fn

    return register


def trainer_names() -> tuple[str, ...]:
    """The registered trainer names."""
    return tuple(_REGISTRY)


def get_trainer(name: str) -> Trainer:
    """The trainer registered under ``name``.

    Raises:
      ValueError: on an unknown name (naming the close ones and the registered ones).
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        raise ValueError(f"unknown trainer {name!r}" + (f"; did you mean {close}?" if close else "")
                         + f" (registered: {sorted(_REGISTRY)})")
    return _REGISTRY[name]


def check_trainer(config: ml_collections.ConfigDict, *, data_validated: bool = False) -> Trainer:
    """The trainer of ``config.trainer`` (default ``"supervised"``), after its ``check`` passed.

    Args:
      config: the run config.
      data_validated: the same dataset and model passed an earlier arm's check (the runner validates each distinct
        pair once): the generic loop then skips reading the sources and tracing the model again.

    Raises:
      ValueError: unknown trainer or bad settings.
    """
    trainer = get_trainer(config.get("trainer", "supervised"))
    if trainer.train is train_lib.train:
        _check_supervised(config, data_validated=data_validated)
    else:
        trainer.check(config)
    return trainer


def _check_supervised(config: ml_collections.ConfigDict, *, data_validated: bool = False) -> None:
    if data_validated:
        train_lib.check_run_config(config)
        training.build_scheme(config, train_lib.model_layers(config))
    else:
        train_lib.validate_run(config)


register_trainer("supervised", _check_supervised)(train_lib.train)

from saliency_jax.trainers import background_invariance  # noqa: E402  (registers "background_invariance")
