"""The generic train/eval loop: jit over a device mesh, orbax checkpoints, grain input, JSON-lines metrics.

Sections in order (as big_vision's ``train.py``): mesh; input; model and optimizer; sharding; update step;
checkpoint restore; loop; eval. Data parallel: the batch is split over the mesh axis ``'data'`` and the train state is
replicated (``NamedSharding``), so the same code runs on 1 CPU, N GPUs or a TPU slice; with
``config.multihost`` the CLI calls ``jax.distributed.initialize()`` and each process reads its own shard of the data.

The saliency-guided training scheme of the config (``config.schemes``: distraction occlusion, Excitation Dropout, the
HNC loss, ... chained by :func:`saliency_jax.training.build_scheme`) runs inside the jitted step through the protocol
of :mod:`saliency_jax.training.scheme`; this module knows no scheme by name. Its randomness comes from
``fold_in(key, step)``, so a run is a deterministic function of its seed, and a run restarted from its workdir resumes
from the latest checkpoint (state, optimizer, step and data-iterator position) and continues the same trajectory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from saliency_jax import data as data_lib
from saliency_jax import models
from saliency_jax import training
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
      image_shape: (height, width, channels) of the model's input.
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
        """The :class:`TrainState` saved at ``step`` (one of :meth:`checkpoint_steps`).

        Raises:
          RuntimeError: if that checkpoint cannot be restored (the path is named).
        """
        mngr = ocp.CheckpointManager((self.workdir / "checkpoints").absolute(),
                                     item_handlers={"state": ocp.StandardCheckpointHandler()})
        try:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
            return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:  # orbax raises many types; name the checkpoint either way.
            raise RuntimeError(f"could not restore checkpoint step {step} from {self.workdir / 'checkpoints'} "
                               f"({type(e).__name__}: {e})") from e
        finally:
            mngr.close()


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
        ``oversample``).

    Returns:
      ``(train_source, train_indices, val_indices, test_source)``: the 75/25 train/validation split of the train
      split (Morales et al. 2021, Sec. 4.3) with ``config.seed``, optional oversampling applied to the train indices;
      with ``dataset.label_noise = r`` the train split's labels carry symmetric noise of rate ``r``
      (:func:`saliency_jax.data.symmetric_label_noise`, seed ``config.seed``; the test split stays clean).
    """
    ds = config.dataset
    train_source = data_lib.get_source(ds.name, "train", data_dir=ds.get("data_dir"), image_size=ds.get("image_size"))
    test_source = data_lib.get_source(ds.name, "test", data_dir=ds.get("data_dir"), image_size=ds.get("image_size"))
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
        ``"label": [batch, num_classes]`` in {0, 1}); other fields pass unchecked.
      num_classes: labels must lie in ``[0, num_classes)``.
      where: context for the error message (e.g. ``"train step 12"``).
      multi_label: labels are multi-hot attribute vectors.

    Raises:
      ValueError: wrong rank, non-finite pixels (NaN/inf), labels out of range or of the wrong shape.
      TypeError: non-float images or non-integer labels.
    """
    images, labels = batch["image"], batch["label"]
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be [batch, height, width, channels]; got shape {images.shape}")
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
      image_shape: (height, width, channels) of one input.
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
    attribute decisions at logit 0), ``classification_loss`` (when the scheme adds a loss term) and every metric of
    the scheme's pieces.

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
      ValueError: on an unknown loss; (when traced) if two pieces report the same metric.
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
        param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
                                  batch_stats=updates.get("batch_stats", state.batch_stats), opt_state=opt_state)
        if multi_label:
            accuracy = jnp.mean((logits > 0) == (labels > 0.5))
        else:
            accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        out = {"loss": total, "accuracy": accuracy}
        merge(out, aux, "forward")
        merge(out, metrics, "batch transform")
        return new_state, out

    return step


# ----------------------------------------------------------------------------------------------------------------
# Eval.


def predict(model: nn.Module, variables: Any, batches: Iterable[dict[str, np.ndarray]], *,
            mesh: jax.sharding.Mesh | None = None,
            transform: Callable[[Array, Array], Array] | None = None, seed: int = 0,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs the model in inference mode over padded eval batches.

    Args:
      model: linen module.
      variables: its variables.
      batches: iterable of ``{"image": [b, h, w, c], "label": [b], "mask": [b]}`` (as
        ``saliency_jax.data.make_eval_batches`` yields; ``b`` divisible by the device count).
      mesh: device mesh (default: :func:`make_mesh`).
      transform: optional on-device corruption ``(key, images) -> images`` applied before the model (e.g. random
        erasing); the key of batch ``i`` is ``fold_in(key(seed), i)``, so a test set is corrupted identically for
        every model.
      seed: seed of ``transform``'s keys.

    Returns:
      ``(labels [n] int, predictions [n] int, probabilities [n, num_classes] float32)`` over the unpadded examples.
    """
    mesh = mesh or make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    variables = jax.device_put(variables, NamedSharding(mesh, P()))

    @jax.jit
    def eval_step(variables, images, key):
        if transform is not None:
            images = transform(key, images)
        return jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)

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
# Checkpoints and logging.


def _checkpoint_manager(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.get("keep_checkpoints", 2),
                                           save_interval_steps=config.checkpoint_every, create=True)
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})


def _restore(mngr: ocp.CheckpointManager, state: TrainState, iterator, workdir: pathlib.Path):
    step = mngr.latest_step()
    if step is None:
        return state, iterator
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:  # orbax raises many types; name the checkpoint either way.
        raise RuntimeError(
            f"could not restore checkpoint step {step} from {workdir / 'checkpoints'} ({type(e).__name__}: {e}); "
            "it is corrupt or from a different config: delete that step's folder to fall back to an earlier one, "
            "or use a fresh workdir") from e
    logging.info("resumed from %s step %d", workdir / "checkpoints", step)
    return restored["state"], restored["data"]


class _MetricWriter:
    """JSON lines in ``workdir/metrics.jsonl`` (and TensorBoard event files if ``tensorboardX`` is installed)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional
                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# Loop.


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """``config.num_steps`` if positive, else ``ceil(config.num_epochs * num_train_examples / batch_size)``."""
    if config.get("num_steps", 0):
        return int(config.num_steps)
    return int(np.ceil(config.num_epochs * num_train_examples / config.batch_size))


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool = True) -> TrainResult:
    """Trains one model from a config, resuming from ``workdir`` if it holds checkpoints.

    With ``num_steps = 0`` and ``num_epochs = 0`` nothing is trained: the model is built around the imported
    weights of ``config.model.pretrained`` (or, only with ``config.model.allow_random_init``, a random
    initialisation) for the evaluators to use; ``config.model.num_classes`` and ``config.dataset.image_size`` /
    ``channels`` then give the model's shape, since no training data is read.

    Args:
      config: a run config (see ``experiments/configs/`` and :func:`saliency_jax.config.default_config`): ``seed``,
        ``dataset``, ``model``, ``optimizer``, ``loss``, ``schemes`` (and a section per listed scheme),
        ``batch_size``, ``num_steps`` / ``num_epochs``, ``log_every``, ``checkpoint_every``, ``eval_every``.
      workdir: output folder: ``checkpoints/`` (orbax), ``metrics.jsonl``, ``config.json``.
      progress: show a tqdm progress bar (process 0 only).

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: if the global batch size does not divide over the devices, an input batch is malformed, the
        scheme settings are wrong, or there is nothing to train and no weights to evaluate.
      RuntimeError: if the latest checkpoint cannot be restored (the path is named).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    layers = model_layers(config)
    scheme = training.build_scheme(config, layers)  # settings errors before anything is read or compiled
    loss = config.get("loss", "softmax_cross_entropy")
    training.classification_loss(loss)
    multi_label = loss == "sigmoid_binary_cross_entropy"

    # Mesh.
    mesh = make_mesh()
    if config.batch_size % jax.device_count():
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.device_count()} devices")
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    # Input.
    train_only_weights = not config.get("num_steps", 0) and not config.get("num_epochs", 0)
    if train_only_weights:
        num_classes = config.model.get("num_classes")
        size = config.dataset.get("image_size")
        if not num_classes or not size:
            raise ValueError("num_steps = num_epochs = 0 (no training): set config.model.num_classes and "
                             "config.dataset.image_size for the model to build")
        image_shape = (size, size, config.dataset.get("channels", 3))
        train_source = iterator = val_idx = None
        total_steps = 0
    else:
        train_source, train_idx, val_idx, _ = load_sources(config)
        iterator = iter(make_train_input(config, train_source, train_idx))
        total_steps = num_train_steps(config, len(train_idx))
        num_classes = train_source.num_classes
        image_shape = data_lib.image_shape(train_source, config.dataset.get("image_size"))

    # Model and optimizer.
    model = build_model(config, num_classes)
    optimizer = make_optimizer(config)
    pretrained = config.model.get("pretrained")
    if not pretrained and config.model.name in ("resnet50", "vgg16", "alexnet"):
        logging.warning("%s starts from random weights: set --config.model.pretrained=PATH (torchvision-named "
                        ".safetensors/.npz) to fine-tune from ImageNet as the papers do", config.model.name)
    if train_only_weights and not pretrained and not config.model.get("allow_random_init"):
        raise ValueError("nothing to train (num_steps = num_epochs = 0) and no weights to evaluate: set "
                         "config.model.pretrained=PATH")
    if pretrained and not os.path.isfile(pretrained):  # before the (slow) initialisation
        raise FileNotFoundError(f"config.model.pretrained: weights file not found: {pretrained!r}")
    variables = jax.jit(lambda: model.init(jax.random.key(config.seed), jnp.zeros((1, *image_shape), jnp.float32),
                                           train=False))()
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
                      in_shardings=(replicated, data_sharding, replicated), out_shardings=(replicated, replicated),
                      donate_argnums=(0,))
    result = functools.partial(TrainResult, model=model, workdir=workdir, config=config,
                               initial_variables=initial_variables, image_shape=tuple(image_shape),
                               num_classes=num_classes)
    if train_only_weights:
        return result(state=state, history=[])

    # Checkpoint restore.
    mngr = _checkpoint_manager(workdir, config)
    state, iterator = _restore(mngr, state, iterator, workdir)
    start = int(state.step)

    # Loop.
    writer = _MetricWriter(workdir, is_main)
    history: list[dict[str, float]] = []
    key = jax.random.key(config.seed + 1)
    pbar = tqdm(total=total_steps, initial=start, disable=not (progress and is_main), desc=workdir.name,
                dynamic_ncols=True, leave=False)
    pending = []
    t0 = time.time()
    for step in range(start + 1, total_steps + 1):
        batch = next(iterator)
        check_batch(batch, num_classes, where=f"train step {step} ({workdir})", multi_label=multi_label)
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch)
        state, metrics = step_fn(state, batch, key)
        pending.append(metrics)
        pbar.update(1)
        if step % config.log_every == 0 or step == total_steps:
            summary = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
            pending = []
            if config.get("eval_every") and (step % config.eval_every == 0 or step == total_steps) and len(val_idx):
                summary["val_accuracy"] = evaluate_accuracy(model, state, train_source, val_idx, config, mesh)
            writer.write(step, summary)
            history.append({"step": step, **summary})
            pbar.set_postfix(loss=f"{summary['loss']:.3f}", acc=f"{summary['accuracy']:.3f}")
            if not np.isfinite(summary["loss"]):
                raise FloatingPointError(f"loss became {summary['loss']} at step {step} ({workdir}); lower the "
                                         "learning rate or check the inputs")
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=grain.checkpoint.CheckpointSave(iterator)),
                  force=step == total_steps)
    pbar.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    return result(state=state, history=history, train_seconds=time.time() - t0 if total_steps > start else 0.0)


# The loop's checkpoint and metric-log pieces, public for the trainers forked beside this loop
# (:mod:`saliency_jax.trainers`): ``checkpoint_manager(workdir, config)`` (items ``state`` and ``data``: the state
# pytree and the grain iterator), ``restore_checkpoint(mngr, state, iterator, workdir) -> (state, iterator)`` (any
# state pytree; the latest step, if any), ``MetricWriter(workdir, enabled)`` (``metrics.jsonl``).
checkpoint_manager = _checkpoint_manager
restore_checkpoint = _restore
MetricWriter = _MetricWriter


def evaluate_accuracy(model, state: TrainState, source, indices, config, mesh) -> float:
    """Top-1 accuracy of ``state`` on ``source[indices]`` (inference mode)."""
    batches = data_lib.make_eval_batches(source, indices, batch_size=config.get("eval_batch_size", 256),
                                         image_size=config.dataset.get("image_size"),
                                         pad_to_multiple_of=jax.device_count())
    labels, preds, _ = predict(model, state.variables(), batches, mesh=mesh)
    return float(np.mean(labels == preds))
