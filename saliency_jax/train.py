"""The train loop: one loop that runs any :class:`~saliency_jax.plan.Plan` (jit over a device mesh, orbax checkpoints,
grain input, JSON-lines metrics).

Sections in order (as big_vision's ``train.py``): mesh; input; the plan (models, optimizers, phases: built by the
trainer ``config.trainer`` names, :mod:`saliency_jax.trainers`); sharding; checkpoint restore (or the phase cache);
loop over the phases; hooks. Data parallel: the batch is split over the mesh axis ``'data'`` and the state is
replicated (``NamedSharding``), so the same code runs on 1 CPU, N GPUs or a TPU slice; with ``config.multihost`` the
CLI calls ``jax.distributed.initialize()`` and each process reads its own shard of the data.

Supervised training is the one-phase plan of :mod:`saliency_jax.trainers.supervised`: the saliency-guided scheme of
the config (``config.schemes``: distraction occlusion, Excitation Dropout, the HNC loss, ... chained by
:func:`saliency_jax.training.build_scheme`) runs inside the jitted step of :func:`saliency_jax.training.make_train_step`;
this module knows no scheme and no method by name. A step's randomness comes from ``fold_in(key, step)``, so a run is
a deterministic function of its seed, and a run restarted from its workdir resumes from the latest checkpoint (state,
optimizer, step and data-iterator position) and continues the same trajectory; :mod:`saliency_jax.workdirs` verifies
the checkpoints, keeps the launch history and the metrics log. Every field and source is validated before the first
step (:func:`validate`), and the generic step never writes NaN into the state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import grain
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from saliency_jax import trainers, training
from saliency_jax import workdirs
from saliency_jax.config import ConfigError
from saliency_jax.data import inputs
from saliency_jax.data.inputs import check_batch, check_sources, load_sources, make_train_input
from saliency_jax.evaluation.predict import evaluate_accuracy, predict
from saliency_jax.mesh import make_mesh
from saliency_jax.models.build import build_model, model_layers
from saliency_jax.models.trainable import as_trainable
from saliency_jax.plan import Phase, Plan, TrainResult
from saliency_jax.trainers.supervised import num_train_steps
from saliency_jax.training.step import TrainState, init_state, make_optimizer, make_train_step

Array = jax.Array

__all__ = [
    "Validated",
    "validate",
    "run_plan",
    "train",
    "check_run_config",
    "validate_run",
    "num_train_steps",
    # Re-exported from their owners (the loop's building blocks; import them from there in new code).
    "TrainState",
    "TrainResult",
    "make_mesh",
    "make_optimizer",
    "init_state",
    "make_train_step",
    "model_layers",
    "build_model",
    "check_batch",
    "check_sources",
    "load_sources",
    "make_train_input",
    "predict",
    "evaluate_accuracy",
]


# ----------------------------------------------------------------------------------------------------------------
# Validation: the whole run is checked before the first step.


def check_run_config(config: ml_collections.ConfigDict) -> None:
    """Validates a run config's loop fields before anything is read or compiled.

    Checks ``batch_size`` and ``eval_batch_size`` (positive, divisible by the device count of the mesh), ``num_steps``
    and ``num_epochs`` (>= 0; whether both may be 0 is the trainer's to say), ``log_every`` and ``checkpoint_every``
    (>= 1), ``eval_every`` (>= 0) and ``keep_checkpoints`` (>= 1): the fields every plan's loop reads.

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


class Validated(NamedTuple):
    """What :func:`validate` established for a run config: its trainer, and - unless nothing is trained - the run's
    data (the splits, read once per process, checked against each other)."""

    trainer: trainers.Trainer
    data: inputs.RunData | None


def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> Validated:
    """Everything :func:`train` checks before its first step, without training: the loop fields, the trainer's
    settings (for supervised training the scheme and the model's layers), the train and test sources against each
    other, and the model's initialisation on the input shape (traced, no FLOPs).
    :func:`saliency_jax.experiment.check_config` runs it for every arm before the first arm trains, and
    :func:`train` uses what it established (the splits are read once per process, :func:`saliency_jax.data.inputs.
    read_split`).

    Args:
      config: the run config.
      data: read and check the data (False: the loop fields and the trainer's settings only, e.g. for an arm whose
        dataset and model an earlier arm's validation already covered).

    Raises:
      ConfigError: as :func:`check_run_config` and :func:`~saliency_jax.data.inputs.check_sources`; ValueError: an
        unknown trainer, bad scheme or trainer settings, the model.
    """
    check_run_config(config)
    trainer = trainers.get_trainer(config.get("trainer", "supervised"))
    checked = trainer.check(config)
    if not data or trainer.weights_only(config):
        return Validated(trainer, None)
    run_data = inputs.load_run_data(config)
    model = as_trainable(trainer.classifier(config, run_data.num_classes))
    images = jax.ShapeDtypeStruct((1, *run_data.image_shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape, jnp.float32)))
    layers = [layer for layer in (model.layers.grad_cam_layer, model.layers.classifier) if layer]
    if layers:  # the layers the model section names (or its architecture's defaults) exist: evaluators read them
        try:
            jax.eval_shape(lambda v, x: model.capture(v, x, layers), variables, images)
        except ValueError as e:
            raise ConfigError(f"config.model (grad_cam_layer {model.layers.grad_cam_layer!r}, classifier "
                              f"{model.layers.classifier!r}): {e}") from e
    if isinstance(checked, training.Scheme):  # a trainer whose phases are the generic step of this scheme
        training.check_model(model, checked, run_data.image_shape,
                             multi_label=config.get("loss") == "sigmoid_binary_cross_entropy",
                             allow_small_grid=bool(config.model.get("allow_small_grid", False)))
    return Validated(trainer, run_data)


def validate_run(config: ml_collections.ConfigDict) -> None:
    """:func:`validate`, for callers that only want the errors.

    Raises:
      ConfigError / ValueError: as :func:`validate`.
    """
    validate(config)


# ----------------------------------------------------------------------------------------------------------------
# Loop.


def _watch_degenerate(pending: list[dict[str, Any]], warned: set[str], threshold: float, step: int, phase: Phase,
                      workdir) -> None:
    """Warns once per metric when a step's fraction of degenerate saliency maps (a metric ending in
    ``degenerate_maps``: constant or non-finite maps, on which a scheme trains nothing) exceeds ``threshold``."""
    for name in sorted({k for m in pending for k in m if k.endswith("degenerate_maps")} - warned):
        worst = max(float(m[name]) for m in pending if name in m)
        if worst > threshold:
            warned.add(name)
            logging.warning(
                "%s = %.2f at a step before %d (phase %s, %s): that fraction of the scheme's saliency maps is constant "
                "or non-finite, and the scheme does nothing on those (distraction occludes no pixel, a constant CAM "
                "gives a constant HNC term). Check the layer (config.model.grad_cam_layer; a 1x1 or 2x2 grid, a "
                "transformer's patch tokens that do not reach the logits), the model's mode, or the inputs. "
                "(config.degenerate_map_warning = %.2f)", name, worst, step, phase.name, workdir, threshold)


def _mean_metrics(pending: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in pending[-1] if all(k in m for m in pending)]
    return {k: float(np.mean([float(m[k]) for m in pending])) for k in keys}


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool | str = True,
          ) -> TrainResult:
    """Trains one run of a config, resuming from ``workdir`` if it holds checkpoints: validates the config
    (:func:`validate`), builds the plan of the trainer ``config.trainer`` names (default ``"supervised"``: the
    one-phase plan of the config's scheme) and runs it (:func:`run_plan`).

    With ``num_steps = 0`` and ``num_epochs = 0`` (supervised) nothing is trained (the weights-only mode): the model is
    built around the imported weights of ``config.model.pretrained`` (or, only with ``config.model.allow_random_init``,
    a random initialisation) for the evaluators to use; ``config.model.num_classes`` and ``config.dataset.image_size``
    / ``channels`` then give the model's shape, since no training data is read.

    Args:
      config: a run config (see ``experiments/configs/`` and :func:`saliency_jax.config.default_config`): ``seed``,
        ``dataset``, ``model``, ``optimizer``, ``loss``, ``trainer``, ``schemes`` (and a section per listed scheme),
        ``batch_size``, ``num_steps`` / ``num_epochs``, ``log_every``, ``checkpoint_every``, ``eval_every``,
        ``restore_fallback``, ``allow_config_change``.
      workdir: output folder: ``checkpoints/`` (orbax), ``metrics.jsonl``, ``config.json``, ``launches.jsonl``.
      progress: show a tqdm progress bar (process 0 only); a string shows it under that name (the experiment runner
        passes ``"<arm> seed<k>"``), True under the workdir's name.

    Returns:
      A :class:`~saliency_jax.plan.TrainResult`.

    The workdir's lock (:class:`saliency_jax.workdirs.WorkdirLock`, ``workdir/launch.lock``) is taken first, before
    the data is read: one launch per workdir (a multi-process run takes it once, on process 0); it is released
    however ``train`` ends, and a lock left by a killed launch is taken over with a warning.

    Raises:
      WorkdirLockedError: (a ``ConfigError``) another launch is running in ``workdir`` (its host and PID named).
      ConfigError: (a ``ValueError``) a field out of range or not divisible over the devices, sources that do not
        fit together, nothing to train and no weights; ResumeError (a ``ConfigError``): the workdir's checkpoint was
        made with another trajectory-changing config, by another number of processes, or with another model, or is
        past this config's last step (any checkpoint, for a weights-only launch).
      ValueError: a malformed input batch, wrong scheme or trainer settings.
      CheckpointError: (a ``RuntimeError``) the latest checkpoint is unreadable or damaged (the step is named).
      FloatingPointError: the loss became non-finite (the update of that step was skipped).
    """
    # The config's own fields first (nothing read, nothing written: a bad field leaves no workdir behind), then the
    # lock, before the data is read: a second launch is refused at once.
    check_run_config(config)
    trainers.get_trainer(config.get("trainer", "supervised")).check(config)
    with workdirs.WorkdirLock(workdir):
        validated = validate(config)
        plan = validated.trainer.build(config, validated.data)
        return run_plan(plan, config, workdir, validated.data, progress=progress)


def run_plan(plan: Plan, config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             data: inputs.RunData | None, *, progress: bool | str = True) -> TrainResult:
    """Runs a plan's phases, resuming from ``workdir`` if it holds checkpoints: the one train loop.

    The workdir's lock (:class:`saliency_jax.workdirs.WorkdirLock`) is held throughout: a second launch on the same
    workdir is refused at once, naming the holder (in a multi-process run process 0 holds it for all). Before the
    first step: the resume checks (the latest checkpoint is verified against its checksums before use, a damaged one
    is refused naming the step unless ``config.restore_fallback``; a checkpoint made with a config differing in a
    trajectory-changing field, or by another number of processes, is refused unless ``config.allow_config_change``
    allows the former; one whose arrays do not fit the plan's model is refused as such, not as damaged); a plan
    without phases (the weights-only mode) goes through the same checks, so that it is refused in a workdir holding
    another run's checkpoints; a fresh run whose first phases are in the plan's phase cache starts after them (an
    entry is verified against its manifest first - arrays, iterator position, key, metric records -; one that fails
    is not used, with a warning naming it, and is recomputed and rewritten). Then every phase in order on one step
    counter and one data stream: each step's batch checked on the host, the phase's jitted step (state donated), a
    log line every ``config.log_every`` steps and at each phase end (the phase's model's ``val_accuracy`` every
    ``config.eval_every`` steps and at each phase end when the validation split is not empty), a checkpoint every
    ``config.checkpoint_every`` steps and at each phase end, the plan's hooks. ``metrics.jsonl`` is cut back to the
    checkpoint, so that it reads as an uninterrupted run's; every launch that trains, and every weights-only launch,
    is recorded in ``launches.jsonl``. On any error inside the loop the in-flight checkpoint is committed and the
    checkpoint manager closed before the error propagates.

    Args:
      plan: the plan (:mod:`saliency_jax.trainers`).
      config: the run config (loop fields: ``seed``, ``batch_size``, ``log_every``, ``checkpoint_every``,
        ``keep_checkpoints``, ``eval_every``, ``restore_fallback``, ``allow_config_change``; ``dataset`` for the
        input).
      workdir: the run's folder.
      data: the run's data (:func:`saliency_jax.data.inputs.load_run_data`); None only for a plan without phases
        (the weights-only mode).
      progress: as :func:`train`.

    Returns:
      A :class:`~saliency_jax.plan.TrainResult`: ``state`` / ``model`` are the plan's final classifier,
      ``full_state`` the whole state.

    Raises:
      WorkdirLockedError, ResumeError, CheckpointError: as :func:`train`.
      ValueError: a malformed input batch.
      FloatingPointError: a logged loss became non-finite or a logged window had a skipped update.
    """
    with workdirs.WorkdirLock(workdir):
        return _run_plan(plan, config, pathlib.Path(workdir), data, progress=progress)


def _check_workdir(ckpt: workdirs.Checkpoints, config: ml_collections.ConfigDict, workdir: pathlib.Path,
                   total: int) -> int:
    """The resume checks of a launch of ``total`` steps (0: the weights-only mode) before anything is compiled: the
    latest checkpoint's process count, the config it was made with (:func:`saliency_jax.workdirs.check_resume`), and
    that it is not past ``total``. Returns the latest step (0 without a checkpoint)."""
    latest = ckpt.latest_step() or 0
    if latest:
        ckpt.check_process_count(latest)
    workdirs.check_resume(workdir, config, latest)
    if latest > total:
        what = (f"and this config trains nothing (config.num_steps = config.num_epochs = 0, the weights-only mode), "
                f"so the workdir would no longer describe the run its checkpoints hold. Use a fresh workdir for the "
                f"weights, or saliency_jax.load({str(workdir)!r}) for the trained run" if not total else
                f"past this config's {total} steps (config.num_steps={config.get('num_steps')}, "
                f"config.num_epochs={config.get('num_epochs')}, or the phases' epochs): the run there is longer than "
                f"this config describes. Set the length to {latest} steps (or more) to use it, or use a fresh workdir")
        raise workdirs.ResumeError(f"{workdir} holds a checkpoint at step {latest}, {what}")
    return latest


def _run_plan(plan: Plan, config: ml_collections.ConfigDict, workdir: pathlib.Path, data: inputs.RunData | None, *,
              progress: bool | str) -> TrainResult:
    """:func:`run_plan`, with the workdir's lock held."""
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    multi_label = config.get("loss", "softmax_cross_entropy") == "sigmoid_binary_cross_entropy"
    phases, total = plan.phases, plan.num_steps

    # Mesh.
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    # The weights-only mode (nothing to train) goes through the same resume checks as a training launch (a workdir
    # holding another run's checkpoints is refused) and is recorded in the launch history.
    if not phases and (workdir / "checkpoints").is_dir():
        ckpt = workdirs.Checkpoints(workdir, with_data=False)
        try:
            _check_workdir(ckpt, config, workdir, 0)
        finally:
            ckpt.close(quiet=True)

    # Sharding: the initial state, replicated.
    state = jax.jit(plan.init_state, out_shardings=replicated)(plan.init_variables())
    first = plan.view(state, plan.final_role)
    result = functools.partial(TrainResult, model=plan.final_model, workdir=workdir, config=config,
                               initial_variables=jax.device_get({"params": first.params,
                                                                 "batch_stats": first.batch_stats}),
                               image_shape=tuple(plan.image_shape), num_classes=plan.num_classes, plan=plan)
    if not phases:
        workdirs.record_launch(workdir, config, 0, 0)
        return result(state=first, history=[], full_state=state)

    # Input.
    iterator = iter(make_train_input(config, data.train_source, data.train_indices))

    # Checkpoint restore (verified; a damaged step is refused or, with restore_fallback, skipped), or the phase cache.
    ckpt = workdirs.Checkpoints(workdir, every=config.checkpoint_every, keep=config.get("keep_checkpoints", 2))
    writer = pbar = None
    failed = True
    try:
        _check_workdir(ckpt, config, workdir, total)
        # A step that guards itself takes the state donated; another keeps the old state for the guard.
        step_fns = {p.index: jax.jit(p.step, in_shardings=(replicated, data_sharding, replicated),
                                     out_shardings=(replicated, replicated),
                                     donate_argnums=(0,) if p.guarded else ()) for p in phases}
        enter_fns = {p.index: jax.jit(p.enter, out_shardings=replicated) for p in phases if p.enter is not None}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        start, restored, iterator, log_state = ckpt.restore_latest(abstract, iterator,
                                                                   fallback=config.get("restore_fallback", False))
        if restored is not None:
            state = restored
        log_state = log_state or workdirs.LogState(last_log_step=start)
        writer = workdirs.MetricsLog(workdir, is_main)
        cache_keys = _cache_keys(plan)
        if plan.cache is not None and start == 0:
            loaded = _load_from_cache(plan, cache_keys, state, iterator, workdir)
            if loaded is not None:
                state, iterator, records = loaded
                state = jax.device_put(state, replicated)
                start = int(state.step)
                log_state = workdirs.LogState(last_log_step=start)
                ckpt.save(start, state, iterator, log_state, force=True)
                if is_main:
                    _write_records(workdir / "metrics.jsonl", records)
        if start < total:
            writer.rewind(log_state.last_log_step)  # lines of a launch killed after its checkpoint, or its last
            workdirs.record_launch(workdir, config, start, total)
        if plan.hooks.start is not None:
            plan.hooks.start(workdir, start)

        # Loop.
        history: list[dict[str, float]] = []
        warned: set[str] = set()  # the degenerate-map metrics warned about (once each)
        key = jax.random.key(config.seed + 1)
        pbar = tqdm(total=total, initial=start, disable=not (progress and is_main),
                    desc=progress if isinstance(progress, str) else workdir.name, dynamic_ncols=True, leave=False)
        launch_start = start
        last_log = log_state.last_log_step
        t0 = time.time()
        for phase, cache_key in zip(phases, cache_keys):
            if start >= phase.end and phase.end > phase.begin:
                continue
            if start == phase.begin and phase.enter is not None:
                state = enter_fns[phase.index](state)
            step_fn = step_fns[phase.index]
            final = phase is phases[-1]
            # The metrics of the steps since the last log line come back with a checkpoint inside this phase, so that
            # a resumed run logs exactly what an uninterrupted one does.
            pending: list[dict[str, Any]] = list(log_state.pending) if phase.begin < start < phase.end else []
            for step in range(max(start, phase.begin) + 1, phase.end + 1):
                batch = next(iterator)
                check_batch(batch, plan.num_classes, where=f"train step {step} ({workdir})", multi_label=multi_label)
                batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch)
                new_state, metrics = step_fn(state, batch, key)
                if not phase.guarded:  # the loop's non-finite guard: no NaN ever reaches the state
                    new_state, skipped = _keep_finite(new_state, state)
                    metrics = {**metrics, "update_skipped": skipped}
                state = new_state
                pending.append(metrics)
                pbar.update(1)
                on_grid = step % config.log_every == 0
                if on_grid or step == phase.end:
                    summary = _mean_metrics(pending)
                    _watch_degenerate(pending, warned, float(config.get("degenerate_map_warning", 0.5)), step,
                                      phase, workdir)
                    if not summary.get("update_skipped", 1.0):  # logged only when a step's update was skipped
                        del summary["update_skipped"]
                    # A phase end closes the logging window; the run's last step off the grid leaves it open for a
                    # later launch that extends the run (that line is then dropped and logged again).
                    if on_grid or not final:
                        pending, last_log = [], step
                    if config.get("eval_every") and (step % config.eval_every == 0 or step == phase.end) \
                            and len(data.val_indices):
                        summary["val_accuracy"] = evaluate_accuracy(plan.models[phase.role],
                                                                    plan.view(state, phase.role), data.train_source,
                                                                    data.val_indices, config, mesh)
                    if plan.log_phase:
                        summary["phase"] = phase.index
                    writer.write(step, summary)
                    history.append({"step": step, **summary})
                    pbar.set_postfix(**({"phase": phase.name} if len(phases) > 1 else {}),
                                     loss=f"{summary['loss']:.3f}", acc=f"{summary['accuracy']:.3f}")
                    bad = sorted(k for k, v in summary.items() if not np.isfinite(v))
                    if bad or summary.get("update_skipped", 0.0) > 0:
                        raise FloatingPointError(
                            f"{'loss' if 'loss' in bad else bad or 'loss'} became non-finite by step {step} "
                            f"(phase {phase.name}, {workdir}; loss {summary['loss']}; the updates with a non-finite "
                            "loss or gradient were skipped, the checkpoints hold finite weights): lower the learning "
                            "rate or check the inputs")
                if plan.hooks.after_step is not None:
                    plan.hooks.after_step(workdir, step, state)
                if ckpt.should_save(step, force=step == phase.end):
                    log = workdirs.LogState(last_log, [{k: float(v) for k, v in m.items()} for m in pending])
                    ckpt.save(step, state, iterator, log, force=step == phase.end)
            start = max(start, phase.end)
            if cache_key is not None and phase.end > phase.begin:
                _save_to_cache(plan, phase, cache_key, state, iterator, workdir, is_main)
        ckpt.wait()
        failed = False
    finally:
        # Every exit path: commit the in-flight checkpoint (the last good step) and close the manager; while an
        # error propagates, failures here are logged, not raised, so that the caller sees that error.
        if pbar is not None:
            pbar.close()
        ckpt.close(quiet=failed)
        if writer is not None:
            writer.close()

    # Hooks.
    if plan.hooks.finish is not None:
        plan.hooks.finish(workdir, state)
    train_seconds = time.time() - t0 if total > launch_start else 0.0
    return result(state=plan.view(state, plan.final_role), history=history, train_seconds=train_seconds,
                  full_state=state)


@jax.jit
def _keep_finite(new: Any, old: Any) -> tuple[Any, Array]:
    """The non-finite guard of a phase whose step does not guard itself: ``new`` where every floating array of it is
    finite, else ``old`` with ``new``'s step; and ``update_skipped`` (1.0 when ``old`` was kept). A separate program
    from the step, so that the step's own computation (and its rounding) is the same with or without the guard."""
    leaves = [x for x in jax.tree.leaves(new) if jnp.issubdtype(x.dtype, jnp.inexact)]
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return kept.replace(step=new.step), 1.0 - ok.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Phase cache.


def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_keys(plan: Plan) -> list[dict[str, Any] | None]:
    """Per phase: the description its cache entry is keyed by (None without a cache, and after the first uncacheable
    phase)."""
    if plan.cache is None:
        return [None] * len(plan.phases)
    keys, so_far = [], []
    for phase in plan.phases:
        if phase.signature is None or (keys and keys[-1] is None):
            keys.append(None)
            continue
        so_far.append(phase.signature)
        keys.append({**plan.cache.common, "phases": list(so_far)})
    return keys


def _roles_after(plan: Plan) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for phase in plan.phases:
        out.append(tuple(dict.fromkeys((out[-1] if out else ()) + phase.roles)))
    return out


def _cache_folder(plan: Plan, workdir: pathlib.Path) -> pathlib.Path:
    folder = pathlib.Path(plan.cache.folder)
    return folder if folder.is_absolute() else workdir / folder


def _cache_dir(cache: pathlib.Path, phase: Phase, key: dict[str, Any]) -> pathlib.Path:
    return cache / f"{phase.index}-{phase.name}-{_digest(key)}"


def _cache_handlers():
    return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


# An entry <cache>/<index>-<phase>-<digest of its key>/ holds checkpoint/<step>/ (orbax: the part of the state phases
# 1..k determine, and the data-iterator position), metrics.jsonl (their log records), key.json (the key) and
# manifest.json, verified like a checkpoint's meta: the checksums of the arrays (computed on the device before the
# save, workdirs.state_checksums), the iterator digests, the SHA-256 of key.json, metrics.jsonl and of the key, the
# whole payload guarded by its own SHA-256. An entry is built in a hidden folder beside it (``.<name>.<run>.tmp``)
# and renamed into place whole once the manifest is written, so a kill leaves either no entry or a complete one; an
# entry that fails any check (no manifest: a half-written entry of an older version; a flipped bit; an edited
# metrics.jsonl) is not used - a warning names it and why - and is moved to ``<cache>.damaged/``; its phases are
# trained again and the entry is written anew at their end.

_MANIFEST = "manifest.json"
_CACHE_FORMAT = 1


class _InvalidEntry(Exception):
    """A phase-cache entry this launch cannot use. ``damaged``: it is wrong for every run (moved aside and rewritten);
    otherwise only for this launch (e.g. another process count), left in place."""

    def __init__(self, message: str, damaged: bool = True):
        super().__init__(message)
        self.damaged = damaged


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _key_record(key: dict[str, Any]) -> Any:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str, indent=1)


def _everywhere(ok: bool) -> bool:
    """``ok`` on every process (one decision for all, so that the processes take the same branch)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(np.asarray(multihost_utils.process_allgather(np.array([ok], np.bool_)))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _read_manifest(path: pathlib.Path, key: dict[str, Any]) -> dict[str, Any]:
    """The verified manifest payload of the entry ``path`` for ``key``; its files (key.json, metrics.jsonl) are checked
    against it, its arrays are not (see :func:`_restore_entry`).

    Raises:
      _InvalidEntry: naming what is wrong.
    """
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        payload, digest = manifest["payload"], manifest["sha256"]
    except FileNotFoundError as e:
        raise _InvalidEntry(f"it has no {_MANIFEST} (the file written last: an entry cut by a kill, or one written "
                            "by an older version)") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _InvalidEntry(f"its {_MANIFEST} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or workdirs.json_digest(payload) != digest:
        raise _InvalidEntry(f"its {_MANIFEST} does not match its SHA-256")
    if payload.get("format") != _CACHE_FORMAT:
        raise _InvalidEntry(f"its format {payload.get('format')!r} is not this version's ({_CACHE_FORMAT})")
    if payload.get("key_sha256") != workdirs.json_digest(_key_record(key)):
        raise _InvalidEntry("its key is not this run's phases (an entry copied or renamed by hand?)")
    for name, expected in payload.get("files", {}).items():
        try:
            text = (path / name).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise _InvalidEntry(f"its {name} is unreadable ({type(e).__name__}: {e})") from e
        if _sha256(text) != expected:
            raise _InvalidEntry(f"its {name} differs from the SHA-256 in its {_MANIFEST} (edited or damaged)")
    if sorted(payload.get("files", {})) != ["key.json", "metrics.jsonl"]:
        raise _InvalidEntry(f"its {_MANIFEST} does not cover key.json and metrics.jsonl")
    if payload.get("process_count") != jax.process_count():
        raise _InvalidEntry(f"it was written by {payload.get('process_count')} process(es), this launch has "
                            f"{jax.process_count()} (each process's data-iterator position is part of it)",
                            damaged=False)
    return payload


def _restore_entry(plan: Plan, phase: Phase, path: pathlib.Path, key, roles, state, iterator):
    """``(subtree, iterator, records)`` of a verified entry: manifest, files, every array against its checksum, this
    process's iterator position against its digest.

    Raises:
      _InvalidEntry: naming what is wrong.
    """
    payload = _read_manifest(path, key)
    step = payload.get("step")
    if step != phase.end:
        raise _InvalidEntry(f"it holds step {step}, not the end of phase {phase.index} ({phase.end})")
    if not (path / "checkpoint" / str(step)).is_dir():
        raise _InvalidEntry(f"its checkpoint step {step} is missing")
    mngr = ocp.CheckpointManager(path.absolute() / "checkpoint", item_handlers=_cache_handlers())
    try:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, plan.cache.select(state, roles))
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:  # noqa: BLE001 - orbax and grain raise many types
        raise _InvalidEntry(f"its checkpoint cannot be read ({type(e).__name__}: {e})") from e
    finally:
        mngr.close()
    bad = workdirs.checksum_differences(payload.get("state_checksums", {}), restored["state"])
    if bad:
        raise _InvalidEntry(f"{len(bad)} array(s) differ from the checksums in its {_MANIFEST} "
                            f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})")
    digests = payload.get("data_digests") or []
    mine = int(workdirs.json_digest(restored["data"].get_state())[:8], 16)
    if len(digests) != jax.process_count() or digests[jax.process_index()] != mine:
        raise _InvalidEntry(f"the data-iterator position of process {jax.process_index()} differs from its digest")
    try:
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:  # checked against its SHA-256 above: only a race gets here
        raise _InvalidEntry(f"its metrics.jsonl is unreadable ({type(e).__name__}: {e})") from e
    return restored["state"], restored["data"], records


def _quarantine_entry(folder: pathlib.Path, path: pathlib.Path) -> None:
    """Moves a damaged entry to ``<cache>.damaged/`` (kept for inspection), process 0 only; another run moving or
    replacing it at the same time is not an error."""
    if jax.process_index() == 0:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        target = folder.parent / f"{folder.name}.damaged" / f"{path.name}-{stamp}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        except OSError as e:
            logging.warning("could not move the damaged phase-cache entry %s aside (%s)", path, e)


def _save_to_cache(plan: Plan, phase: Phase, key, state, iterator, workdir: pathlib.Path, is_main: bool) -> None:
    """Writes the entry of phases 1..``phase.index`` unless a valid one is there (see the comment above): built in a
    hidden folder beside it, manifest last, then renamed into place; a damaged entry there is moved aside first."""
    folder = _cache_folder(plan, workdir)
    path = _cache_dir(folder, phase, key)
    try:
        _read_manifest(path, key)
        present = True  # its arrays are verified by whichever run reads it
    except _InvalidEntry as e:
        present = path.exists() and not e.damaged  # usable by other launches: left alone
    if _everywhere(present):
        return
    roles = _roles_after(plan)[phase.index - 1]
    sub = plan.cache.select(state, roles)
    records = [r for r in _read_records(workdir / "metrics.jsonl") if r["step"] <= phase.end]
    metrics_text = "".join(json.dumps(r) + "\n" for r in records)
    key_text = _key_text(key)
    payload = {"format": _CACHE_FORMAT, "step": int(state.step), "phase": phase.name,
               "process_count": jax.process_count(), "key_sha256": workdirs.json_digest(_key_record(key)),
               "files": {"key.json": _sha256(key_text), "metrics.jsonl": _sha256(metrics_text)},
               "state_checksums": workdirs.state_checksums(sub), "data_digests": workdirs.iterator_digests(iterator),
               "written_by": str(workdir.absolute())}
    tmp = folder / f".{path.name}.{_sha256(str(workdir.absolute()))[:8]}.tmp"  # the same name on every process
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a launch of this workdir killed while writing it
    _sync("phase cache: start of an entry")
    mngr = ocp.CheckpointManager(tmp.absolute() / "checkpoint", item_handlers=_cache_handlers(),
                                 options=ocp.CheckpointManagerOptions(create=True))
    try:
        mngr.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(sub),
                                                           data=grain.checkpoint.CheckpointSave(iterator)), force=True)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    if is_main:
        (tmp / "metrics.jsonl").write_text(metrics_text)
        (tmp / "key.json").write_text(key_text)
        manifest = tmp / f"{_MANIFEST}.tmp"
        manifest.write_text(json.dumps({"payload": payload, "sha256": workdirs.json_digest(payload)}, indent=1))
        os.replace(manifest, tmp / _MANIFEST)  # last: the entry is complete
        _publish_entry(folder, tmp, path, key)
    _sync("phase cache: entry written")


def _publish_entry(folder: pathlib.Path, tmp: pathlib.Path, path: pathlib.Path, key) -> None:
    """Renames the finished entry ``tmp`` to ``path``; a damaged entry there is moved aside first, a valid one (another
    run published it meanwhile) is kept and ``tmp`` dropped."""
    for attempt in range(2):
        try:
            os.rename(tmp, path)  # refused while ``path`` is a non-empty folder
            return
        except OSError:
            if attempt:
                break
            try:
                _read_manifest(path, key)
                break  # another run's entry, complete
            except _InvalidEntry as e:
                if not e.damaged:
                    break
                logging.warning("phase cache entry %s is replaced: %s", path, e)
                _quarantine_entry(folder, path)
    shutil.rmtree(tmp, ignore_errors=True)


def _load_from_cache(plan: Plan, keys, state, iterator, workdir: pathlib.Path):
    """``(state, iterator, records)`` from the latest verified cache entry matching the plan's phases, or None.

    An entry that fails verification is not used: a warning names it and the reason, a damaged one is moved to
    ``<cache>.damaged/``, and the next earlier entry is tried (its phases are trained again and their entry rewritten).
    """
    folder = _cache_folder(plan, workdir)
    position = iterator.get_state()  # grain restores the position into the iterator: put back if refused
    for phase, key, roles in reversed(list(zip(plan.phases, keys, _roles_after(plan)))):
        if key is None or phase.end == 0:
            continue
        path = _cache_dir(folder, phase, key)
        if not _everywhere(path.is_dir()):
            continue
        try:
            sub, data, records = _restore_entry(plan, phase, path, key, roles, state, iterator)
            problem = None
        except _InvalidEntry as e:
            problem = e
        if not _everywhere(problem is None):
            logging.warning("phase cache entry %s is not used%s; training phase%s again", path,
                            f": {problem}" if problem is not None else " (unusable on another process)",
                            f"s 1-{phase.index}" if phase.index > 1 else " 1")
            iterator.set_state(position)
            if problem is not None and problem.damaged:
                _quarantine_entry(folder, path)
            _sync("phase cache: entry refused")
            continue
        logging.info("%s: phases 1-%d from the phase cache %s (step %d)", workdir, phase.index, folder, phase.end)
        return plan.cache.merge(state, sub), data, records
    return None


def _read_records(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash
    return out


def _write_records(path: pathlib.Path, records) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
