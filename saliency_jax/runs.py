"""Loading a trained run back from its workdir: :func:`load`.

``saliency_jax.load(workdir)`` rebuilds what :func:`saliency_jax.train.train` returned for a run that has finished
(or been stopped), whatever plan trained it: the plan from ``workdir/config.json`` (as ``train`` builds it: the
trainer ``config.trainer`` names; checked against the config the checkpoint was made with, kept in
``launches.jsonl``), the latest checkpoint's state restored and verified against the checksums saved with it
(:class:`saliency_jax.workdirs.Checkpoints`), every model of the plan reachable by name. Nothing is
trained and nothing in the workdir is changed, so notebooks and evaluators can use a run without retraining it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from saliency_jax import trainers
from saliency_jax import workdirs
from saliency_jax.data import inputs
from saliency_jax.mesh import make_mesh
from saliency_jax.plan import TrainResult

__all__ = ["load", "read_config"]


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples the configs use (``schemes``, ``widths``, ...)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config of a run's latest launch, ``workdir/config.json`` (JSON lists read back as tuples).

    Raises:
      FileNotFoundError: the workdir or its ``config.json`` does not exist.
      ValueError: ``config.json`` is not valid JSON (a damaged workdir).
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"load: no run directory at {workdir}")
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"load: {path} does not exist: {workdir} is not the workdir of a run trained by "
                                "saliency_jax.train (an experiment's runs are in <experiment workdir>/<arm>/seed<k>)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load: {path} is damaged (not valid JSON: {e})") from e
    if not isinstance(record, dict) or "model" not in record or "dataset" not in record:
        raise ValueError(f"load: {path} does not hold a run config (no 'model' or 'dataset' section)")
    return ml_collections.ConfigDict(_tuples(record))


def _check_config(workdir: pathlib.Path, step: int) -> None:
    """Raises :class:`~saliency_jax.workdirs.ResumeError` if ``config.json`` differs from the config of the launch
    that made checkpoint ``step`` (its record in ``launches.jsonl``) in a field that changes the trajectory (as
    :func:`saliency_jax.workdirs.check_resume` compares them). Workdirs without a launch history are not checked."""
    launch = workdirs.checkpoint_launch(workdir, step)
    if launch is None:
        return
    path = workdir / "config.json"
    diffs = workdirs.config_differences(launch["config"], json.loads(path.read_text()))
    if not diffs:
        return
    lines, more = workdirs.describe_differences(diffs, "in config.json")
    raise workdirs.ResumeError(
        f"load: {path} differs from the config checkpoint step {step} was made with (launches.jsonl, the launch of "
        f"{launch.get('time')}): {lines}{more}. config.json was edited, or a later launch changed these fields "
        f"(config.allow_config_change) after step {step}: restore config.json from that launch's record in "
        "launches.jsonl, or load a step of the later launch")


def load(workdir: str | os.PathLike, *, step: int | None = None, fallback: bool = False) -> TrainResult:
    """A trained run from its workdir: its models, their variables and its config.

    The plan is rebuilt from ``workdir/config.json`` as :func:`saliency_jax.train.train` builds it (the trainer of
    ``config.trainer``, its models on the run's data's image shape and number of classes, or on
    ``config.model.num_classes`` / ``config.dataset.image_size`` and ``channels`` for a weights-only run), after
    checking ``config.json`` against the record of the launch that made the checkpoint (``launches.jsonl``); the state
    of the latest checkpoint (or of ``step``) is checked against the model (shapes), then restored and verified
    against its checksums. The workdir is only read (and not locked: a run may be loaded while it trains).

    >>> run = saliency_jax.load("runs/digits/baseline/seed0")  # doctest: +SKIP
    >>> logits = run.model.apply(run.variables, images)  # doctest: +SKIP
    >>> masks = run.models["mask_generator"].apply(  # doctest: +SKIP
    ...     {"params": run.model_state("mask_generator").params}, images)

    Args:
      workdir: the run's folder (``train``'s ``workdir``; an experiment's runs are ``<workdir>/<arm>/seed<k>``).
      step: the checkpoint step to restore (default: the latest).
      fallback: when the latest checkpoint is damaged, use the newest intact earlier one (with a warning; nothing is
        moved). Without it a damaged checkpoint raises.

    Returns:
      A :class:`saliency_jax.plan.TrainResult` as ``train`` returns it: ``.model`` (the classifier the run returns),
      ``.variables`` (``{"params", "batch_stats"}``, replicated over the local devices), ``.config``, ``.state``
      (with ``.step``), ``.image_shape``, ``.num_classes``, ``.workdir``, ``.models`` / ``.model_state(name)`` (every
      model of the plan), ``.full_state``; ``.initial_variables`` is the seed's initialisation (None for runs from
      imported weights: reload them from ``config.model.pretrained``); ``.history`` is the ``metrics.jsonl`` log. It
      can be passed to the evaluators of :mod:`saliency_jax.evaluators`.

    Raises:
      FileNotFoundError: no such workdir, no ``config.json``, or no checkpoint in it (or not ``step``).
      ValueError: a damaged ``config.json``, or an unknown trainer.
      ResumeError: (a ``ConfigError``, a ``ValueError``) ``config.json`` differs from the config the checkpoint was
        made with (``launches.jsonl``) in a field that changes the trajectory (the fields are named: an edited seed or
        learning rate), or the checkpoint does not match the model in ``config.json`` (the arrays are named).
      CheckpointError: (a ``RuntimeError``) the checkpoint is unreadable or differs from its checksums (the step and
        folder are named), and no intact earlier one with ``fallback``.
    """
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"load: {workdir} has no checkpoints folder (the run never reached a checkpoint)")
    trainer = trainers.get_trainer(config.get("trainer", "supervised"))
    pretrained = config.model.get("pretrained")
    ckpt = workdirs.Checkpoints(workdir, with_data=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"load: {workdir / 'checkpoints'} holds no checkpoint")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"load: {workdir / 'checkpoints'} has no step {step}; it has {steps}")
        candidates = [step] if step is not None else steps[::-1]
        _check_config(workdir, candidates[0])  # before the plan is built from it
        build_config = config.copy_and_resolve_references()
        with build_config.unlocked():
            build_config.model.pretrained = None  # the checkpoint holds the weights; the file need not exist any more
            build_config.model.allow_random_init = True
        data = None if trainer.weights_only(build_config) else inputs.load_run_data(build_config)
        plan = trainer.build(build_config, data)
        replicated = NamedSharding(make_mesh(), P())
        variables = plan.init_variables()
        shapes = jax.eval_shape(plan.init_state, variables)
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
        for i, s in enumerate(candidates):
            try:
                _check_config(workdir, s)
                full_state = ckpt.restore_step(s, abstract, model="the model in config.json")[0]
                break
            except workdirs.CheckpointError as e:
                if not fallback or i == len(candidates) - 1:
                    hint = " (pass fallback=True to use the newest intact earlier one)" if len(candidates) > 1 else ""
                    raise workdirs.CheckpointError(f"load: {e}{hint}", e.step, e.path) from e
                logging.warning("load: %s; trying step %d", e, candidates[i + 1])
    finally:
        ckpt.close(quiet=True)
    initial = None
    if not pretrained:
        first = plan.view(jax.jit(plan.init_state)(variables), plan.final_role)
        initial = jax.device_get({"params": first.params, "batch_stats": first.batch_stats})
    history = []
    if (workdir / "metrics.jsonl").exists():
        for line in (workdir / "metrics.jsonl").read_text().splitlines():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return TrainResult(state=plan.view(full_state, plan.final_role), model=plan.final_model, history=history,
                       workdir=workdir, config=config, initial_variables=initial, image_shape=tuple(plan.image_shape),
                       num_classes=plan.num_classes, plan=plan, full_state=full_state)
