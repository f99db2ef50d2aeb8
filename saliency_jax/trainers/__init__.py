"""Trainers: plan builders the experiment runner can choose from, by name (``config.trainer``).

A trainer holds no loop. It turns a run config and its data into a :class:`~saliency_jax.plan.Plan` - phases, each
with its step and the models it updates, the models by name, the initial state, hooks - and the one loop
(:func:`saliency_jax.train.run_plan`) runs it with the same mesh, input, verified checkpoints, metrics log, guard and
phase cache for every method. ``"supervised"`` is the one-phase plan of the config's training scheme
(:mod:`saliency_jax.trainers.supervised`); ``"background_invariance"`` is Cruz & Cardoso's three phases and the
Attention baseline (:mod:`saliency_jax.trainers.background_invariance`). A new phased method is one module that builds
a plan and registers it with :func:`register_trainer`, plus a config.
"""

from saliency_jax.trainers import background_invariance, supervised  # noqa: F401  (they register themselves)
from saliency_jax.trainers.base import Trainer, get_trainer, register_trainer, trainer_names

__all__ = ["Trainer", "register_trainer", "get_trainer", "trainer_names"]
