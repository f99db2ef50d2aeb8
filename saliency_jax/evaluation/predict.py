"""Predictions of a trained classifier over eval batches: the one jitted inference path of evaluators and the loop.

:func:`predict` runs a linen classifier in inference mode over padded eval batches on the device mesh (compiled once
per process for each model, transform and batch shape); :func:`evaluate_accuracy` is its top-1 accuracy on a split.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from saliency_jax.data import pipeline
from saliency_jax.mesh import make_mesh
from saliency_jax.models.trainable import as_trainable

Array = jax.Array

__all__ = ["predict", "evaluate_accuracy"]


@functools.partial(jax.jit, static_argnames=("model", "transform"))
def _eval_probs(variables, images, key, *, model, transform):
    """Class probabilities [b, num_classes] of ``model`` in inference mode on ``images`` (after ``transform``)."""
    if transform is not None:
        images = transform(key, images)
    probs = jax.nn.softmax(as_trainable(model).apply(variables, images), axis=-1)
    return jnp.mean(probs, axis=1) if probs.ndim == 3 else probs  # sequences: mean over the steps


def predict(model: nn.Module, variables: Any, batches: Iterable[dict[str, np.ndarray]], *,
            mesh: jax.sharding.Mesh | None = None,
            transform: Callable[[Array, Array], Array] | None = None, seed: int = 0,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs the model in inference mode over padded eval batches.

    A sequence classifier's per-step probabilities (logits [b, time, num_classes], e.g. a CNN-LSTM on clips) are
    averaged over the steps: LRCN's clip prediction (Donahue et al. 2015).

    Args:
      model: linen module.
      variables: its variables.
      batches: iterable of ``{"image": [b, h, w, c], "label": [b], "mask": [b]}`` (as
        ``saliency_jax.data.make_eval_batches`` yields; ``b`` divisible by the device count).
      mesh: device mesh (default: :func:`make_mesh`).
      transform: optional on-device corruption ``(key, images) -> images`` applied before the model (e.g. random
        erasing); the key of batch ``i`` is ``fold_in(key(seed), i)``, so a test set is corrupted identically for
        every model. The step is compiled once per process for each (model, transform, batch shape) when both hash
        (flax modules hash by their fields; give a transform that hashes by value, e.g. a frozen dataclass, to share
        the compilation between calls), else once per call.
      seed: seed of ``transform``'s keys.

    Returns:
      ``(labels [n] int, predictions [n] int, probabilities [n, num_classes] float32)`` over the unpadded examples.
    """
    mesh = mesh or make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    try:  # one compilation per (model, transform, shapes) for the whole process: every arm and evaluator shares it
        hash((model, transform))
        eval_step = functools.partial(_eval_probs, model=model, transform=transform)
    except TypeError:  # an unhashable module or transform: compiled for this call
        eval_step = jax.jit(functools.partial(_eval_probs.__wrapped__, model=model, transform=transform))

    base = jax.random.key(seed)
    pi, pc = jax.process_index(), jax.process_count()
    labels, probs = [], []
    for i, batch in enumerate(batches):
        # Every process sees the same eval batch and feeds its own slice of it; the gathered result is the batch.
        rows = batch["image"].shape[0] // pc
        images = jax.make_array_from_process_local_data(data_sharding, batch["image"][pi * rows:(pi + 1) * rows])
        p = eval_step(variables, images, jax.random.fold_in(base, i))
        p = multihost_utils.process_allgather(p, tiled=True) if pc > 1 else p
        keep = np.asarray(batch["mask"]).astype(bool)
        probs.append(np.asarray(p)[keep])
        labels.append(np.asarray(batch["label"])[keep])
    probs = np.concatenate(probs)
    labels = np.concatenate(labels)
    return labels, probs.argmax(-1), probs


def evaluate_accuracy(model, state, source, indices, config, mesh=None) -> float:
    """Top-1 accuracy of ``state`` (anything with ``.variables()``, e.g. a ``TrainState``) on ``source[indices]``
    (inference mode), in eval batches of ``config.eval_batch_size``."""
    batches = pipeline.make_eval_batches(source, indices, batch_size=config.get("eval_batch_size", 256),
                                         image_size=config.dataset.get("image_size"),
                                         pad_to_multiple_of=jax.device_count())
    labels, preds, _ = predict(model, state.variables(), batches, mesh=mesh)
    return float(np.mean(labels == preds))
