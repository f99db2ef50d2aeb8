"""The generic train/eval loop: jit over a device mesh, orbax checkpoints, grain input, JSON-lines metrics.

Sections in order (as big_vision's ``train.py``): mesh; input; model and optimizer; sharding; update step;
checkpoint restore; loop; eval. Data parallel: the batch is split over the mesh axis ``'data'`` and the train state is
replicated (``NamedSharding``), so the same code runs on 1 CPU, N GPUs or a TPU slice; with
``config.multihost`` the CLI calls ``jax.distributed.initialize()`` and each process reads its own shard of the data.

The saliency-guided training scheme of the config (``config.schemes``: distraction occlusion, Excitation Dropout, the
HNC loss, ... chained by :func:`saliency_jax.training.build_scheme`) runs inside the jitted step through the protocol
of :mod:`saliency_jax.training.scheme`; this module knows no scheme by name. Its randomness comes from
``fold_in(key, step)``, so a run is a deterministic function of its seed, and a run restarted from its workdir resumes
from the latest checkpoint (state, optimizer, step and data-iterator position) and continues the same trajectory;
:mod:`saliency_jax.workdirs` verifies the checkpoints, keeps the launch history and the metrics log. Every field and
source is validated before the first step (:func:`check_run_config`, :func:`check_sources`), and the jitted step
never writes NaN into the state (:func:`make_train_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import checkify, multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from saliency_jax import data as data_lib
from saliency_jax import models
from saliency_jax import training
from saliency_jax import workdirs
from saliency_jax.config import ConfigError
from saliency_jax.training import ModelLayers, Scheme, StepContext

Array = jax.Array

__all__ = [
    "TrainState",
    "TrainResult",
    "make_mesh",
    "make_optimizer",
    "init_state",
    "make_train_step",
    "model_layers",
    "check_batch",
    "check_run_config",
    "check_sources",
    "validate_run",
    "predict",
    "train",
    "build_model",
    "load_sources",
    "make_train_input",
    "num_train_steps",
    "evaluate_accuracy",
    "checkpoint_manager",
    "restore_checkpoint",
    "MetricWriter",
]


@flax.struct.dataclass
class TrainState:
    """Everything a step updates: a pytree, replicated over the mesh.

    Attributes:
      step: int32 scalar, number of updates done.
      params: the model's ``params`` collection.
      batch_stats: the model's ``batch_stats`` collection (empty dict for models without BatchNorm).
      opt_state: the optax optimizer state.
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def variables(self) -> dict[str, Any]:
        """The ``{"params", "batch_stats"}`` dict that ``module.apply`` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: everything an evaluator needs, so none has to rebuild it.

    Attributes:
      state: the final :class:`TrainState` (on device, replicated).
      model: the linen module.
      history: the logged metrics, one dict per log step (of this launch; the whole run is in ``metrics.jsonl``).
      workdir: where checkpoints, ``metrics.jsonl`` and ``config.json`` are.
      config: the run's config.
      initial_variables: ``{"params", "batch_stats"}`` the run started from (random initialisation or imported
        weights), NumPy arrays on the host.
      image_shape: (height, width, channels) of the model's input ((time, height, width, channels) for clips).
      num_classes: the classifier's outputs.
      train_seconds: wall time of this launch's training loop (0 when it only restored a finished run).
    """

    state: TrainState
    model: nn.Module
    history: list[dict[str, float]]
    workdir: pathlib.Path
    config: ml_collections.ConfigDict | None = None
    initial_variables: Any = None
    image_shape: tuple[int, ...] = ()
    num_classes: int = 0
    train_seconds: float = 0.0

    @property
    def variables(self) -> dict[str, Any]:
        """The final ``{"params", "batch_stats"}``."""
        return self.state.variables()

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints kept in ``workdir/checkpoints`` (ascending)."""
        path = self.workdir / "checkpoints"
        if not path.exists():
            return []
        return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())

    def restore(self, step: int) -> TrainState:
        """The :class:`TrainState` saved at ``step`` (one of :meth:`checkpoint_steps`), verified against the checksums
        saved with it.

        Raises:
          CheckpointError: (a ``RuntimeError``) if that checkpoint cannot be read or differs from its checksums (the
            step and path are named).
        """
        return workdirs.restore_state(self.workdir, step, self.state)


# ----------------------------------------------------------------------------------------------------------------
# Mesh.


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, axis ``'data'`` (automatic sharding propagation)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# ----------------------------------------------------------------------------------------------------------------
# Input.


def load_sources(config: ml_collections.ConfigDict):
    """The train, validation and test sources of a config.

    Args:
      config: a config with a ``dataset`` section (``name``, ``data_dir``, ``image_size``, ``val_fraction``,
        ``oversample``; ``clips``: the clip specs' options, :class:`saliency_jax.data.clips.ClipSettings`).

    Returns:
      ``(train_source, train_indices, val_indices, test_source)``: the 75/25 train/validation split of the train
      split (Morales et al. 2021, Sec. 4.3) with ``config.seed``, optional oversampling applied to the train indices;
      with ``dataset.label_noise = r`` the train split's labels carry symmetric noise of rate ``r``
      (:func:`saliency_jax.data.symmetric_label_noise`, seed ``config.seed``; the test split stays clean).
    """
    ds = config.dataset
    train_source = data_lib.get_source(ds.name, "train", data_dir=ds.get("data_dir"), image_size=ds.get("image_size"),
                                       options=ds.get("options"))
    test_source = data_lib.get_source(ds.name, "test", data_dir=ds.get("data_dir"), image_size=ds.get("image_size"),
                                      options=ds.get("options"))
    train_idx, val_idx = data_lib.train_val_split(len(train_source), ds.get("val_fraction", 0.25), seed=config.seed)
    limit = ds.get("train_limit")
    if limit:  # a seeded random subset (sources may be sorted by class)
        train_idx = np.sort(np.random.default_rng(config.seed).choice(train_idx, min(limit, len(train_idx)),
                                                                        replace=False))
    noise = ds.get("label_noise", 0.0)
    if noise:  # fixed symmetric noise on the training split (train and validation indices), clean test split
        train_source = data_lib.Relabeled(train_source, data_lib.symmetric_label_noise(
            train_source.labels, noise, train_source.num_classes, seed=config.seed))
    oversample = dict(ds.get("oversample") or {})
    if oversample:
        train_idx = data_lib.oversample(train_idx, train_source.labels, {int(k): int(v) for k, v in oversample.items()})
    return train_source, train_idx, val_idx, test_source


def make_train_input(config: ml_collections.ConfigDict, train_source, train_indices) -> grain.IterDataset:
    """The training batches of a config: :func:`saliency_jax.data.make_train_dataset` over ``train_source[
    train_indices]`` with ``config.batch_size`` (global), ``config.seed``, ``config.dataset``'s ``image_size``,
    ``augment``, ``read_threads`` and ``prefetch``, this process's shard. ``iter()`` of it is the loop's checkpointable
    data iterator."""
    return data_lib.make_train_dataset(
        train_source, train_indices, batch_size=config.batch_size, seed=config.seed,
        image_size=config.dataset.get("image_size"), augment_kwargs=dict(config.dataset.get("augment") or {}),
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        read_options=grain.ReadOptions(num_threads=config.dataset.get("read_threads", 2),
                                       prefetch_buffer_size=config.dataset.get("prefetch", 256)))


def check_batch(batch: dict[str, np.ndarray], num_classes: int, where: str = "batch", *,
                multi_label: bool = False) -> None:
    """Host-side validation of an input batch before it reaches the device.

    Args:
      batch: ``{"image": [batch, height, width, channels] float, "label": [batch] int}`` (multi-label:
        ``"label": [batch, num_classes]`` in {0, 1}; clips: ``"image": [batch, time, height, width, channels]``
        with per-clip labels); other fields pass unchecked.
      num_classes: labels must lie in ``[0, num_classes)``.
      where: context for the error message (e.g. ``"train step 12"``).
      multi_label: labels are multi-hot attribute vectors.

    Raises:
      ValueError: wrong rank, non-finite pixels (NaN/inf), labels out of range or of the wrong shape.
      TypeError: non-float images or non-integer labels.
    """
    images, labels = batch["image"], batch["label"]
    if images.ndim not in (4, 5):
        raise ValueError(f"{where}: images must be [batch, height, width, channels] (clips: [batch, time, height, "
                         f"width, channels]); got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{where}: images must be float32 in [0, 1]; got dtype {images.dtype}")
    if not np.all(np.isfinite(images)):
        bad = np.unique(np.nonzero(~np.isfinite(images))[0])
        raise ValueError(f"{where}: images contain NaN or inf (batch rows {bad.tolist()[:10]})")
    if multi_label:
        if labels.shape != (images.shape[0], num_classes):
            raise ValueError(f"{where}: multi-hot labels must be [{images.shape[0]}, {num_classes}]; got shape "
                             f"{labels.shape}")
        if labels.size and not np.all((labels == 0) | (labels == 1)):
            raise ValueError(f"{where}: multi-hot labels must be 0 or 1")
        return
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{where}: labels must be [{images.shape[0]}]; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{where}: labels must be integers; got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]")


# ----------------------------------------------------------------------------------------------------------------
# Model and optimizer.


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The linen module named by ``config.model.name`` (kwargs from ``config.model.kwargs``)."""
    return models.get_model(config.model.name, num_classes, **dict(config.model.get("kwargs") or {}))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax optimizer of ``config.optimizer``.

    ``name``: ``"adam"`` (paper default of Morales et al.: lr 5e-5, b1 0.9, b2 0.999, eps 7e-7) or ``"sgd"``
    (``momentum``). ``weight_decay`` adds L2 decay of the weights (``optax.add_decayed_weights``); ``lr_boundaries``
    and ``lr_scales`` give a piecewise-constant schedule (e.g. x0.1 after 25k steps).

    Raises:
      ValueError: on an unknown optimizer name.
    """
    opt = config.optimizer
    lr = opt.learning_rate
    boundaries = list(opt.get("lr_boundaries") or [])
    if boundaries:
        scales = list(opt.get("lr_scales") or [0.1] * len(boundaries))
        lr = optax.piecewise_constant_schedule(lr, dict(zip(boundaries, scales)))
    if opt.name == "adam":
        tx = optax.adam(lr, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8))
    elif opt.name == "sgd":
        tx = optax.sgd(lr, momentum=opt.get("momentum", 0.9) or None)
    else:
        raise ValueError(f"unknown optimizer {opt.name!r}; choose 'adam' or 'sgd'")
    if opt.get("weight_decay", 0.0):
        tx = optax.chain(optax.add_decayed_weights(opt.weight_decay), tx)
    return tx


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, image_shape: tuple[int, ...],
               seed: int, variables: Any | None = None) -> TrainState:
    """A fresh :class:`TrainState` (or one built around given ``variables``, e.g. imported weights).

    Args:
      model: the linen module.
      optimizer: the optax optimizer.
      image_shape: (height, width, channels) of one input ((time, height, width, channels) of a clip).
      seed: initialisation seed.
      variables: optional ``{"params", "batch_stats"}`` to start from.
    """
    if variables is None:
        variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=optimizer.init(params))


# ----------------------------------------------------------------------------------------------------------------
# Update step.


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


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, scheme: Scheme = Scheme(), *,
                    loss: str = "softmax_cross_entropy", classification_weight: float = 1.0,
                    ) -> Callable[[TrainState, dict[str, Array], Array], tuple[TrainState, dict[str, Array]]]:
    """Builds the (un-jitted) update step ``(state, batch, key) -> (state, metrics)``.

    The step: this step's key is ``fold_in(key, state.step)``, split into the batch transform's and the forward's
    keys (``k_batch, k_forward = split(key)``; the loss term's is ``fold_in(key, 1)``); the scheme's batch transform
    (if any) replaces the batch, with the current weights; inside ``loss_fn`` the scheme's training forward (or the
    model's own, train mode, BatchNorm statistics updated) gives the logits, the per-example classification loss
    ``loss`` (times ``classification_weight``) plus the scheme's loss term (if any) is averaged over the batch; one
    optimizer update.

    Metrics: ``loss`` (the total), ``accuracy`` (on the batch trained on; multi-label: the fraction of correct
    attribute decisions at logit 0), ``update_skipped`` (see below), ``classification_loss`` (when the scheme adds a
    loss term) and every metric of the scheme's pieces.

    Guard: the step never writes NaN into the state. When the batch has a label outside ``[0, num_classes)`` (multi-
    label: not 0/1), a NaN / inf pixel, or the loss or a gradient is not finite, the parameters, BatchNorm statistics
    and optimizer state are left unchanged (only ``step`` advances) and ``update_skipped`` is 1 (else 0); ``loss`` then
    reports the non-finite value or NaN. Under ``jax.experimental.checkify`` (``errors=checkify.user_checks``) the bad
    labels and pixels raise instead. The train loop checks every batch on the host before it reaches the step.

    Args:
      model: linen module ``apply(variables, images, train=...)``; dropout layers draw from rng ``"dropout"``.
      optimizer: optax optimizer.
      scheme: the training scheme (:func:`saliency_jax.training.build_scheme`, :func:`saliency_jax.training.chain`);
        ``Scheme()`` is plain training.
      loss: the classification loss (:data:`saliency_jax.training.CLASSIFICATION_LOSSES`):
        ``"softmax_cross_entropy"`` (labels int [batch]) or ``"sigmoid_binary_cross_entropy"`` (multi-hot labels
        [batch, num_classes]).
      classification_weight: the classification loss's weight in the total (``w_a`` of attention guidance: total =
        ``w_a * CE + w_g * loss_g``); 1 for the usual ``CE + scheme terms``.

    Raises:
      ValueError: on an unknown loss; (when traced) if two pieces report the same metric, the batch has 0 examples,
        or multi-hot labels do not have the shape [batch, num_classes].
    """
    base_loss = training.classification_loss(loss)
    multi_label = loss == "sigmoid_binary_cross_entropy"
    forward = scheme.forward or training.model_forward

    def merge(into, metrics, where):
        for k, v in metrics.items():
            if k in into:
                raise ValueError(f"metric {k!r} of the {where} clashes with another metric of the step")
            into[k] = v

    def step(state: TrainState, batch: dict[str, Array], key: Array):
        if batch["image"].shape[0] == 0 or batch["label"].shape[:1] != batch["image"].shape[:1]:
            raise ValueError(f"train step: a batch needs at least one example and one label per image; got images "
                             f"{batch['image'].shape} and labels {batch['label'].shape}")
        images_ok = jnp.all(jnp.isfinite(batch["image"]))
        checkify.debug_check(images_ok, "train step: images contain NaN or inf")
        key = jax.random.fold_in(key, state.step)
        k_batch, k_forward = jax.random.split(key)
        metrics: dict[str, Array] = {}
        if scheme.batch_transform is not None:
            batch, m = scheme.batch_transform(StepContext(model, state.variables(), state.step, k_batch), batch)
            merge(metrics, m, "batch transform")
        labels = batch["label"]

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            fwd = forward(StepContext(model, variables, state.step, k_forward), batch, scheme.layers)
            per_example = base_loss(fwd.logits, labels)
            aux = dict(fwd.metrics)
            if scheme.loss is not None:
                aux["classification_loss"] = jnp.mean(per_example)
            if classification_weight != 1.0:
                per_example = classification_weight * per_example
            if scheme.loss is not None:
                term, m = scheme.loss(StepContext(model, variables, state.step, jax.random.fold_in(key, 1)),
                                      batch, fwd)
                merge(aux, m, "loss term")
                per_example = per_example + term
            return jnp.mean(per_example), (fwd.logits, fwd.updates, aux)

        (total, (logits, updates, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        num_classes = logits.shape[-1]
        if multi_label:
            if labels.shape != logits.shape:
                raise ValueError(f"train step: multi-hot labels must be [batch, {num_classes}]; got {labels.shape}")
            labels_ok = jnp.all((labels == 0) | (labels == 1))
        else:
            labels_ok = jnp.all((labels >= 0) & (labels < num_classes))
        checkify.debug_check(labels_ok, f"train step: labels must lie in [0, {num_classes})")
        finite = jnp.isfinite(total) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        ok = labels_ok & images_ok & finite
        param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        new_state = state.replace(
            step=state.step + 1, params=keep(optax.apply_updates(state.params, param_updates), state.params),
            batch_stats=keep(updates.get("batch_stats", state.batch_stats), state.batch_stats),
            opt_state=keep(opt_state, state.opt_state))
        accuracy = jnp.mean(training.classification_accuracy(loss, logits, labels))  # sequences: mean over steps
        out = {"loss": jnp.where(labels_ok, total, jnp.nan), "accuracy": accuracy,
               "update_skipped": 1.0 - ok.astype(jnp.float32)}
        merge(out, aux, "forward")
        merge(out, metrics, "batch transform")
        return new_state, out

    return step


# ----------------------------------------------------------------------------------------------------------------
# Eval.


@functools.partial(jax.jit, static_argnames=("model", "transform"))
def _eval_probs(variables, images, key, *, model, transform):
    """Class probabilities [b, num_classes] of ``model`` in inference mode on ``images`` (after ``transform``)."""
    if transform is not None:
        images = transform(key, images)
    probs = jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)
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


# ----------------------------------------------------------------------------------------------------------------
# Validation: the whole run is checked before the first step.


def check_run_config(config: ml_collections.ConfigDict) -> None:
    """Validates a run config's loop fields before anything is read or compiled.

    Checks ``batch_size`` and ``eval_batch_size`` (positive, divisible by the device count of the mesh), ``num_steps``
    and ``num_epochs`` (>= 0; both 0 only in the weights-only mode: ``config.model.pretrained`` or
    ``config.model.allow_random_init``), ``log_every`` and ``checkpoint_every`` (>= 1), ``eval_every`` (>= 0) and
    ``keep_checkpoints`` (>= 1).

    Raises:
      ConfigError: naming the field, its value and what it must be.
    """
    devices = jax.device_count()

    defaults = {"log_every": 50, "checkpoint_every": 500, "keep_checkpoints": 2, "eval_every": 0, "num_steps": 0}

    def positive_int(name, minimum=1):
        value = config.get(name, defaults.get(name))
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(f"config.{name}={value!r}: must be an integer >= {minimum}")
        return int(value)

    for name in ("batch_size", "eval_batch_size"):
        value = positive_int(name)
        if value % devices:
            raise ConfigError(f"config.{name}={value} must be divisible by the {devices} devices of the mesh "
                              f"(every device takes {name} / {devices} examples); e.g. "
                              f"--config.{name}={max(devices, value // devices * devices)}")
    positive_int("log_every")
    positive_int("checkpoint_every")
    positive_int("keep_checkpoints")
    positive_int("eval_every", minimum=0)
    positive_int("num_steps", minimum=0)
    epochs = config.get("num_epochs", 0) or 0
    if not isinstance(epochs, (int, float)) or not np.isfinite(epochs) or epochs < 0:
        raise ConfigError(f"config.num_epochs={epochs!r}: must be a number >= 0 (0: train num_steps steps)")
    if not config.get("num_steps", 0) and not epochs:
        if not config.model.get("pretrained") and not config.model.get("allow_random_init"):
            raise ConfigError(
                "config.num_steps = config.num_epochs = 0 and no weights to evaluate: nothing would be trained. Set "
                "--config.num_steps or --config.num_epochs > 0 to train; num_steps = num_epochs = 0 is the "
                "weights-only mode, which evaluates imported weights (config.model.pretrained=PATH)")


def check_sources(config: ml_collections.ConfigDict, train_source, test_source, *,
                  multi_label: bool = False) -> tuple[tuple[int, int, int], int]:
    """Validates the train and test sources of a run against each other before the first step.

    Args:
      config: the run config (``dataset.image_size``, ``evaluators``).
      train_source: the train split (random-access source with ``num_classes``).
      test_source: the test split.
      multi_label: labels are multi-hot attribute vectors (no class-range check).

    Returns:
      ``(image_shape, num_classes)`` of the model: ``(height, width, channels)`` after the pipeline's resize
      (clips: ``(time, height, width, channels)``).

    Raises:
      ConfigError: images with no pixels (0 x 0) or no channel, a test split with another image shape (size or
        channels) than the train split, an empty test split when evaluators are configured, test labels outside
        the training labels' range.
    """
    name = config.dataset.name
    size = config.dataset.get("image_size")
    shapes = {}
    for split, source in (("train", train_source), ("test", test_source)):
        if len(source) == 0:
            if split == "train" or tuple(config.get("evaluators") or ()):
                raise ConfigError(f"dataset {name!r}: the {split} split is empty"
                                  + (f" (config.evaluators={tuple(config.evaluators)} read it)" if split == "test"
                                     else ""))
            continue
        raw = tuple(int(d) for d in np.shape(source[0]["image"]))
        if len(raw) not in (3, 4) or min(raw) < 1:
            raise ConfigError(f"dataset {name!r}: {split} images have shape {raw}; they need height, width and "
                              "channels (clips: time, height, width, channels) of at least 1")
        shapes[split] = tuple(data_lib.image_shape(source, size))
    if "test" in shapes and shapes["test"][-1] != shapes["train"][-1]:
        raise ConfigError(f"dataset {name!r}: test images have {shapes['test'][-1]} channel(s), train images "
                          f"{shapes['train'][-1]}: the two splits must have the same channels")
    if "test" in shapes and shapes["test"] != shapes["train"]:
        how = f"after the resize to config.dataset.image_size={size}" if size else "config.dataset.image_size=None"
        raise ConfigError(f"dataset {name!r}: test images are {shapes['test']} but train images are "
                          f"{shapes['train']} ({how}); the model is built for the train shape: set "
                          "--config.dataset.image_size to resize both")
    num_classes = int(data_lib.num_classes(train_source))
    train_labels, test_labels = getattr(train_source, "labels", None), getattr(test_source, "labels", None)
    if not multi_label and train_labels is not None and test_labels is not None and len(test_labels):
        train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
        if train_labels.ndim == 1 and test_labels.ndim == 1 and len(train_labels):
            top = int(train_labels.max())
            unseen = np.unique(test_labels[(test_labels > top) | (test_labels < 0)])
            if unseen.size:
                raise ConfigError(
                    f"dataset {name!r}: the test split has labels {unseen[:10].tolist()} outside the training "
                    f"split's range [0, {top}] (num_classes grew to {num_classes}): those classes are never "
                    "trained; check the data, or give class names so that num_classes is fixed")
    return shapes["train"], num_classes


def validate_run(config: ml_collections.ConfigDict) -> None:
    """Everything :func:`train` checks before its first step, without training: the loop fields, the scheme, the
    train and test sources against each other, and the model's initialisation on the input shape (traced, no
    FLOPs). :func:`saliency_jax.experiment.check_config` runs it for every arm before the first arm trains.

    Raises:
      ConfigError: as :func:`check_run_config` and :func:`check_sources`; ValueError: as the scheme's settings and
        the model.
    """
    check_run_config(config)
    training.build_scheme(config, model_layers(config))
    if not config.get("num_steps", 0) and not config.get("num_epochs", 0):
        return  # weights-only: no data is read by train()
    multi_label = config.get("loss", "softmax_cross_entropy") == "sigmoid_binary_cross_entropy"
    train_source, _, _, test_source = load_sources(config)
    image_shape, num_classes = check_sources(config, train_source, test_source, multi_label=multi_label)
    model = build_model(config, num_classes)
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32), train=False))


# ----------------------------------------------------------------------------------------------------------------
# Loop.


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """``config.num_steps`` if positive, else ``ceil(config.num_epochs * num_train_examples / batch_size)``."""
    if config.get("num_steps", 0):
        return int(config.num_steps)
    return int(np.ceil(config.num_epochs * num_train_examples / config.batch_size))


def _mean_metrics(pending: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in pending[-1] if all(k in m for m in pending)]
    return {k: float(np.mean([float(m[k]) for m in pending])) for k in keys}


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def _jit_init(key, *, model, image_shape):
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def _init_variables(model: nn.Module, image_shape: tuple[int, ...], seed: int):
    """``model.init`` with ``key(seed)`` on a zero batch of one, jitted once per process for each (model, shape):
    the arms of an experiment share the compilation (an unhashable module compiles for this call)."""
    key = jax.random.key(seed)
    try:
        hash(model)
    except TypeError:
        return jax.jit(functools.partial(_jit_init.__wrapped__, model=model, image_shape=image_shape))(key)
    return _jit_init(key, model=model, image_shape=image_shape)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool | str = True,
          ) -> TrainResult:
    """Trains one model from a config, resuming from ``workdir`` if it holds checkpoints.

    With ``num_steps = 0`` and ``num_epochs = 0`` nothing is trained (the weights-only mode): the model is built
    around the imported weights of ``config.model.pretrained`` (or, only with ``config.model.allow_random_init``, a
    random initialisation) for the evaluators to use; ``config.model.num_classes`` and ``config.dataset.image_size``
    / ``channels`` then give the model's shape, since no training data is read.

    Before the first step the whole run is validated (:func:`check_run_config`, :func:`check_sources`: loop fields,
    mesh and eval batching, train and test sources, model). Resuming (:mod:`saliency_jax.workdirs`): the latest
    checkpoint is verified against its checksums before use (a damaged one is refused, naming the step, unless
    ``config.restore_fallback``); a checkpoint made with a config differing in a trajectory-changing field, or by
    another number of processes, is refused (``config.allow_config_change`` allows the former); ``metrics.jsonl`` is
    cut back to the checkpoint, so that it reads as an uninterrupted run's. Every launch that trains is recorded in
    ``launches.jsonl``. On any error inside the loop the in-flight checkpoint is committed and the checkpoint
    manager closed before the error propagates.

    Args:
      config: a run config (see ``experiments/configs/`` and :func:`saliency_jax.config.default_config`): ``seed``,
        ``dataset``, ``model``, ``optimizer``, ``loss``, ``schemes`` (and a section per listed scheme),
        ``batch_size``, ``num_steps`` / ``num_epochs``, ``log_every``, ``checkpoint_every``, ``eval_every``,
        ``restore_fallback``, ``allow_config_change``.
      workdir: output folder: ``checkpoints/`` (orbax), ``metrics.jsonl``, ``config.json``, ``launches.jsonl``.
      progress: show a tqdm progress bar (process 0 only); a string shows it under that name (the experiment runner
        passes ``"<arm> seed<k>"``), True under the workdir's name.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ConfigError: (a ``ValueError``) a field out of range or not divisible over the devices, sources that do not
        fit together, nothing to train and no weights; ResumeError (a ``ConfigError``): the workdir's checkpoint was
        made with another trajectory-changing config, by another number of processes, or is past this config's last
        step.
      ValueError: a malformed input batch, wrong scheme settings.
      CheckpointError: (a ``RuntimeError``) the latest checkpoint is unreadable or damaged (the step is named).
      FloatingPointError: the loss became non-finite (the update of that step was skipped).
    """
    workdir = pathlib.Path(workdir)
    check_run_config(config)
    is_main = jax.process_index() == 0
    layers = model_layers(config)
    scheme = training.build_scheme(config, layers)  # settings errors before anything is read or compiled
    loss = config.get("loss", "softmax_cross_entropy")
    training.classification_loss(loss)
    multi_label = loss == "sigmoid_binary_cross_entropy"
    workdir.mkdir(parents=True, exist_ok=True)

    # Mesh.
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    # Input.
    train_only_weights = not config.get("num_steps", 0) and not config.get("num_epochs", 0)
    if train_only_weights:
        num_classes = config.model.get("num_classes")
        size = config.dataset.get("image_size")
        if not num_classes or not size:
            raise ConfigError("num_steps = num_epochs = 0 (the weights-only mode: nothing is trained): set "
                              "config.model.num_classes and config.dataset.image_size for the model to build")
        image_shape = (size, size, config.dataset.get("channels", 3))
        train_source = iterator = val_idx = None
        total_steps = 0
    else:
        train_source, train_idx, val_idx, test_source = load_sources(config)
        image_shape, num_classes = check_sources(config, train_source, test_source, multi_label=multi_label)
        iterator = iter(make_train_input(config, train_source, train_idx))
        total_steps = num_train_steps(config, len(train_idx))

    # Resume checks, before anything is compiled: this launch against the workdir's latest checkpoint.
    ckpt = None
    if not train_only_weights:
        ckpt = workdirs.Checkpoints(workdir, every=config.checkpoint_every, keep=config.get("keep_checkpoints", 2))
    writer = None
    pbar = None
    failed = True
    try:
        if ckpt is not None:
            latest = ckpt.latest_step() or 0
            if latest:
                ckpt.check_process_count(latest)
            if latest > total_steps:
                raise workdirs.ResumeError(
                    f"{workdir} holds a checkpoint at step {latest}, past this config's {total_steps} steps "
                    f"(config.num_steps={config.get('num_steps')}, config.num_epochs={config.get('num_epochs')}): "
                    f"the run there is longer than this config describes. Set --config.num_steps={latest} (or "
                    "more) to use it, or use a fresh workdir")
            workdirs.check_resume(workdir, config, latest)

        # Model and optimizer.
        model = build_model(config, num_classes)
        optimizer = make_optimizer(config)
        pretrained = config.model.get("pretrained")
        if not pretrained and config.model.name in ("resnet50", "vgg16", "alexnet"):
            logging.warning("%s starts from random weights: set --config.model.pretrained=PATH (torchvision-named "
                            ".safetensors/.npz) to fine-tune from ImageNet as the papers do", config.model.name)
        if pretrained and not os.path.isfile(pretrained):  # before the (slow) initialisation
            raise FileNotFoundError(f"config.model.pretrained: weights file not found: {pretrained!r}")
        variables = _init_variables(model, tuple(image_shape), config.seed)
        if pretrained:
            from saliency_jax.models import weights
            variables = weights.load_pretrained(config.model.name, pretrained, variables,
                                                skip_head=not train_only_weights)
        initial_variables = jax.device_get({"params": variables["params"],
                                            "batch_stats": variables.get("batch_stats", {})})

        # Sharding.
        state = jax.jit(lambda v: init_state(model, optimizer, image_shape, config.seed, v),
                        out_shardings=replicated)(variables)
        step_fn = jax.jit(make_train_step(model, optimizer, scheme, loss=loss,
                                          classification_weight=config.get("classification_weight", 1.0)),
                          in_shardings=(replicated, data_sharding, replicated),
                          out_shardings=(replicated, replicated), donate_argnums=(0,))
        result = functools.partial(TrainResult, model=model, workdir=workdir, config=config,
                                   initial_variables=initial_variables, image_shape=tuple(image_shape),
                                   num_classes=num_classes)
        if train_only_weights:
            workdirs.write_config(workdir, config)
            failed = False
            return result(state=state, history=[])

        # Checkpoint restore (verified; a damaged step is refused or, with restore_fallback, skipped).
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        start, restored, iterator, log_state = ckpt.restore_latest(abstract, iterator,
                                                                   fallback=config.get("restore_fallback", False))
        if restored is not None:
            state = restored
        writer = workdirs.MetricsLog(workdir, is_main)
        log_state = log_state or workdirs.LogState(last_log_step=start)
        if start < total_steps:
            writer.rewind(log_state.last_log_step)  # lines of a launch killed after its checkpoint, or its last
            workdirs.record_launch(workdir, config, start, total_steps)

        # Loop.
        history: list[dict[str, float]] = []
        key = jax.random.key(config.seed + 1)
        pbar = tqdm(total=total_steps, initial=start, disable=not (progress and is_main), desc=progress if isinstance(progress, str) else workdir.name,
                    dynamic_ncols=True, leave=False)
        pending: list[dict[str, Any]] = list(log_state.pending)
        last_log = log_state.last_log_step
        t0 = time.time()
        for step in range(start + 1, total_steps + 1):
            batch = next(iterator)
            check_batch(batch, num_classes, where=f"train step {step} ({workdir})", multi_label=multi_label)
            batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch)
            state, metrics = step_fn(state, batch, key)
            pending.append(metrics)
            pbar.update(1)
            on_grid = step % config.log_every == 0
            if on_grid or step == total_steps:
                summary = _mean_metrics(pending)
                if not summary.get("update_skipped", 1.0):  # logged only when a step's update was skipped
                    del summary["update_skipped"]
                if on_grid:  # off the grid (a launch's last step) the window stays open for a later launch
                    pending, last_log = [], step
                if config.get("eval_every") and (step % config.eval_every == 0 or step == total_steps) \
                        and len(val_idx):
                    summary["val_accuracy"] = evaluate_accuracy(model, state, train_source, val_idx, config, mesh)
                writer.write(step, summary)
                history.append({"step": step, **summary})
                pbar.set_postfix(loss=f"{summary['loss']:.3f}", acc=f"{summary['accuracy']:.3f}")
                if not np.isfinite(summary["loss"]) or summary.get("update_skipped", 0.0) > 0:
                    raise FloatingPointError(
                        f"loss became {summary['loss']} by step {step} ({workdir}; the updates with a non-finite "
                        "loss or gradient were skipped, the checkpoints hold finite weights): lower the learning "
                        "rate or check the inputs")
            if ckpt.should_save(step, force=step == total_steps):
                log = workdirs.LogState(last_log, [{k: float(v) for k, v in m.items()} for m in pending])
                ckpt.save(step, state, iterator, log, force=step == total_steps)
        ckpt.wait()
        failed = False
    finally:
        # Every exit path: commit the in-flight checkpoint (the last good step) and close the manager; while an
        # error propagates, failures here are logged, not raised, so that the caller sees that error.
        if pbar is not None:
            pbar.close()
        if ckpt is not None:
            ckpt.close(quiet=failed)
        if writer is not None:
            writer.close()
    return result(state=state, history=history, train_seconds=time.time() - t0 if total_steps > start else 0.0)


# The loop's checkpoint and metric-log pieces that the trainers forked beside it (:mod:`saliency_jax.trainers`)
# reuse are in :mod:`saliency_jax.workdirs`: ``Checkpoints`` (verified steps), ``MetricsLog``, ``check_resume``,
# ``record_launch``.


def evaluate_accuracy(model, state: TrainState, source, indices, config, mesh) -> float:
    """Top-1 accuracy of ``state`` on ``source[indices]`` (inference mode)."""
    batches = data_lib.make_eval_batches(source, indices, batch_size=config.get("eval_batch_size", 256),
                                         image_size=config.dataset.get("image_size"),
                                         pad_to_multiple_of=jax.device_count())
    labels, preds, _ = predict(model, state.variables(), batches, mesh=mesh)
    return float(np.mean(labels == preds))
