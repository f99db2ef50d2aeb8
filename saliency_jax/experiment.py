"""The experiment runner: every arm x repeat with the same seeds, then the evaluators the config lists.

An experiment config (``experiments/configs/*.py``) is a run config plus ``experiment.arms``: ``(arm name,
overrides)`` pairs, the overrides nested like the config (``{"schemes": ("distraction",), "distraction": {"fill":
"zero"}}``). Every arm is trained ``experiment.repeats`` times with seeds ``seed, seed + 1, ...`` (the same seeds for
every arm, so arms differ only by their overrides) by the trainer ``config.trainer`` names
(:mod:`saliency_jax.trainers`: each builds a plan that :func:`saliency_jax.train.train` runs; ``"supervised"`` is the
one-phase plan of the config's scheme); each evaluator of
``config.evaluators`` (:mod:`saliency_jax.evaluators`) then takes the trained run as ``train`` returned it and
gives its metrics; finally each writes its section of ``report.md`` and its figures from the metrics of all runs.

Writes ``workdir/<arm>/seed<k>/`` (each run's checkpoints, ``metrics.jsonl`` and ``run.json``: its evaluations and
wall times, tied to the model they measured by its checkpoint digest and sealed by a SHA-256; a rerun resumes
unfinished runs and reuses the stored evaluations of finished ones, only for that exact model), ``workdir/report.md``
and ``workdir/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from saliency_jax import compile_cache
from saliency_jax import evaluation
from saliency_jax import evaluators as evaluators_lib
from saliency_jax import train as train_lib
from saliency_jax import training
from saliency_jax import workdirs
from saliency_jax.config import ConfigError, apply_overrides
from saliency_jax.evaluators.base import ReportContext, RunRecord, settings_dict
from saliency_jax.plan import TrainResult

__all__ = ["arm_config", "arms_setting", "check_config", "check_paths", "check_run", "evaluate_run", "model_digest",
           "run_experiment", "select_arms", "to_jsonable"]


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def arm_config(config: ml_collections.ConfigDict, arm: str, repeat: int, *,
               every_arm: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The train config of one arm and repeat: the arm's overrides applied, then ``every_arm`` (dotted fields, e.g.
    ``{"distraction.fill": "one"}``: set in every arm over the arm's own value), and ``seed`` advanced by ``repeat``.

    Raises:
      KeyError: if ``arm`` is not in ``config.experiment.arms`` or the overrides name unknown fields.
    """
    arms = dict(config.experiment.arms)
    if arm not in arms:
        raise KeyError(f"unknown arm {arm!r}; the config has {list(arms)}")
    cfg = apply_overrides(config, arms[arm])
    if every_arm:
        cfg = apply_overrides(cfg, _nested(every_arm))
    cfg.seed = config.seed + repeat
    return cfg


def arms_setting(config: ml_collections.ConfigDict, fields: Mapping[str, Any] | list[str]) -> dict[str, list[str]]:
    """Which arms of ``config.experiment.arms`` set each of the dotted ``fields`` (the field itself, a section holding
    it, or a field inside it): ``{field: [arm, ...]}`` for the fields some arm sets. An experiment-level override of
    such a field (``--config.FIELD=VALUE``) would be replaced by those arms' values."""
    out: dict[str, list[str]] = {}
    for field in fields:
        if field == "experiment" or field.startswith("experiment."):
            continue
        for arm, overrides in config.experiment.arms:
            keys = [k.partition("=")[0] for k in _flat(overrides)]
            if any(k == field or field.startswith(k + ".") or k.startswith(field + ".") for k in keys):
                out.setdefault(field, []).append(arm)
    return out


def select_arms(config: ml_collections.ConfigDict, names: list[str] | tuple[str, ...] | None) -> list[str]:
    """The arms to run: ``names`` (in the config's order), or every arm of ``config.experiment.arms`` for None.

    Raises:
      ConfigError: a name the config has no arm for (the message lists the arms), or an empty selection.
    """
    arms = [name for name, _ in config.experiment.arms]
    if names is None:
        return arms
    unknown = [n for n in names if n not in arms]
    if unknown:
        raise ConfigError(f"--arms: unknown arm(s) {unknown}; the config's arms are: {', '.join(arms)}")
    if not names:
        raise ConfigError(f"--arms selects no arm; the config's arms are: {', '.join(arms)}")
    return [a for a in arms if a in names]


def check_paths(config: ml_collections.ConfigDict) -> None:
    """The paths a run config names exist, when set: ``dataset.data_dir``, ``model.pretrained`` and the ``data_dir``
    of each listed evaluator's section (e.g. ``pointing_game.data_dir``).

    Raises:
      FileNotFoundError: naming the field, the path and the folder a relative path was read from.
    """
    fields = [("dataset.data_dir", config.dataset.get("data_dir")),
              ("model.pretrained", config.model.get("pretrained"))]
    for name in evaluators_lib.base.evaluator_list(config.get("evaluators")):
        section = config.get(name)
        if isinstance(section, ml_collections.ConfigDict) and "data_dir" in section:
            fields.append((f"{name}.data_dir", section.data_dir))
    for field, path in fields:
        if path and not os.path.exists(path):
            where = "" if os.path.isabs(path) else f" (relative to the current folder {os.getcwd()})"
            raise FileNotFoundError(f"config.{field}={str(path)!r}: no such file or folder{where}")


def check_run(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
    """Validates one run config before anything is written: :func:`check_paths`,
    :func:`saliency_jax.train.validate` (loop fields, trainer and scheme settings, the data sources read and checked,
    the model traced), the section of every registered scheme the config has, listed in ``schemes`` or not (a bad
    value is refused even where an arm turns the scheme on), and the evaluators' settings
    (:func:`saliency_jax.evaluators.build_evaluators`).

    Raises:
      FileNotFoundError: as :func:`check_paths`; ConfigError / ValueError / KeyError: as the others.
    """
    check_paths(config)
    train_lib.validate(config, data=data)
    for name in training.scheme.TRAINING_SCHEMES.names():  # sections of schemes the run does not list, too
        if isinstance(config.get(name), ml_collections.ConfigDict):
            training.scheme.scheme_settings(config, name)
    evaluators_lib.build_evaluators(config)


def check_config(config: ml_collections.ConfigDict, *, arms: list[str] | tuple[str, ...] | None = None,
                 every_arm: Mapping[str, Any] | None = None) -> list[str]:
    """Validates every arm (or the ``arms`` selected, :func:`select_arms`) before anything is trained; returns the arm
    names.

    Per arm, :func:`check_run`: its paths (:func:`check_paths`), :func:`saliency_jax.train.validate` (the loop fields,
    the trainer's settings - for supervised training the schemes - and, once per distinct dataset and model, the train
    and test sources against each other and the model and its layers on their shape; every split is read once per
    process, and training reuses it) and its evaluators' settings.

    Args:
      config: the experiment config.
      arms: the arms to run (None: all).
      every_arm: dotted fields set in every arm over the arms' own values (:func:`arm_config`).

    Raises:
      ConfigError: (a ``ValueError``) no arms, a repeated arm name, an unknown selected arm, or an arm that cannot run
        (the arm is named).
      ValueError: an arm whose trainer / schemes / evaluators / settings are wrong (the arm is named).
      KeyError: an arm override naming an unknown field.
      FileNotFoundError: a data path or weights file an arm names does not exist (:func:`check_paths`).
    """
    names = [name for name, _ in config.experiment.arms]
    if not names:
        raise ConfigError("config.experiment.arms is empty: nothing to run")
    if len(set(names)) != len(names):
        raise ConfigError(f"config.experiment.arms repeats a name: {names}")
    arms = select_arms(config, arms)
    validated = set()
    for arm in arms:
        cfg = arm_config(config, arm, 0, every_arm=every_arm)
        what = json.dumps({k: cfg.get(k) and cfg[k].to_dict() for k in ("dataset", "model")}, sort_keys=True,
                          default=str)
        try:
            check_run(cfg, data=what not in validated)
            validated.add(what)
        except ValueError as e:
            error = type(e) if isinstance(e, ConfigError) else ValueError
            raise error(f"arm {arm!r}: {e}" if len(arms) > 1 else str(e)) from e
    return arms


def to_jsonable(x):
    """``x`` with dict keys as strings, tuples as lists and NumPy scalars as Python numbers (for ``json.dumps``)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    return x


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}  # a record cut by a crash: evaluate again


def _record_digest(record: dict[str, Any]) -> str:
    return workdirs.json_digest({k: v for k, v in record.items() if k != "sha256"})


def _stored_record(path: pathlib.Path, checkpoint: str) -> dict[str, Any]:
    """The record of ``run.json`` if it is intact (its ``sha256`` matches) and measured the model ``checkpoint``, else
    ``{}`` (with a warning naming the file when there was a record)."""
    stored = _read_json(path)
    if not stored:
        return {}
    if not isinstance(stored, dict) or stored.get("sha256") != _record_digest(stored):
        logging.warning("%s does not match its SHA-256 (edited, damaged, or written by an older version): its "
                        "evaluations are not reused; evaluating again", path)
        return {}
    if stored.get("checkpoint") != checkpoint:
        logging.warning("%s holds the evaluations of another model (checkpoint digest %s; this run's final state is "
                        "%s: retrained since?): evaluating again", path, stored.get("checkpoint"), checkpoint)
        return {}
    return stored


def model_digest(result: TrainResult) -> str:
    """The digest of the model a run's evaluations measure: :func:`saliency_jax.workdirs.state_digest` of its final
    state (``full_state``, every model of the plan; ``state`` for a run built by hand) - the arrays its last
    checkpoint holds, so a run restored from that checkpoint has the same digest and a retrained one another."""
    return workdirs.state_digest(result.full_state if result.full_state is not None else result.state)


def evaluate_run(result: TrainResult, evaluators: dict[str, evaluators_lib.Evaluator],
                 data: evaluators_lib.ExperimentData, *, arm: str = "run") -> RunRecord:
    """Runs the evaluators on a trained run and writes ``run.json`` (atomically); returns the
    :class:`~saliency_jax.evaluators.RunRecord`.

    ``run.json`` records the evaluations (settings, metrics, seconds), the final step, the training wall time, the
    digest of the model they measured (``checkpoint``: :func:`model_digest`) and a SHA-256 of the whole record
    (``sha256``). A stored evaluation is reused only from an intact record (its SHA-256 matches) of the same model (the
    same checkpoint digest: a run retrained after its checkpoints were deleted is evaluated again) with the same
    evaluator settings; otherwise a warning names the file and the evaluator runs again.

    The numeric entries of the metrics of every evaluator that ran (:func:`saliency_jax.evaluators.scalar_entries`)
    also go to the run's TensorBoard log (``workdir/tensorboard``) at the run's final step, tagged
    ``eval/<evaluator>/<entry>`` (dots as ``/``), with the figures the run's folder holds (``*.png``, e.g. the
    background-invariance masks) as images tagged ``figures/<name>``: under the experiment's workdir TensorBoard shows
    them under the run's ``<arm>/seed<k>``.
    """
    workdir = result.workdir
    step = int(result.state.step)
    checkpoint = model_digest(result)
    stored = _stored_record(workdir / "run.json", checkpoint)
    old = stored.get("evaluations", {})
    metrics, seconds, evaluations, fresh = {}, {}, {}, []
    for name, evaluator in evaluators.items():
        settings = to_jsonable(settings_dict(evaluators_lib.evaluator_settings(result.config, name)))
        if name in old and old[name].get("settings") == settings:
            metrics[name], seconds[name] = old[name]["metrics"], old[name]["seconds"]
        else:
            t0 = time.time()
            run = result
            if evaluator.stages is not None:  # models the evaluator needs, trained through the one loop
                stages = evaluator.stages(result, data)
                run = dataclasses.replace(result, stages={
                    n: train_lib.train(s.config, s.workdir, progress=f"{arm} {n}") for n, s in stages.items()})
            metrics[name] = to_jsonable(evaluator.evaluate(run, data))
            seconds[name] = time.time() - t0
            fresh.append(name)
        evaluations[name] = {"settings": settings, "metrics": metrics[name], "seconds": seconds[name]}
    train_seconds = result.train_seconds or stored.get("train_seconds", 0.0)
    record = to_jsonable({"arm": arm, "seed": int(result.config.seed), "step": step, "checkpoint": checkpoint,
                          "train_seconds": train_seconds, "evaluations": evaluations})
    record = json.loads(json.dumps(record, default=str))
    record["sha256"] = _record_digest(record)
    if jax.process_index() == 0:
        tmp = workdir / "run.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, workdir / "run.json")
        if fresh:  # a rerun that reuses every evaluation wrote them already
            _to_tensorboard(workdir, step, {n: metrics[n] for n in fresh}, figures=sorted(workdir.glob("*.png")),
                            figure_prefix="figures/")
    return RunRecord(arm=arm, seed=int(result.config.seed), workdir=workdir, config=result.config,
                     metrics=metrics, train_seconds=train_seconds, eval_seconds=seconds)


def _to_tensorboard(folder: pathlib.Path, step: int, metrics: dict[str, Any], *, figures=(),
                    figure_prefix: str) -> None:
    """Each evaluator's numeric entries as scalars ``eval/<evaluator>/<entry>`` and the PNG ``figures`` as images
    ``<figure_prefix><file stem>`` in ``folder/tensorboard`` at ``step``."""
    log = workdirs.MetricsLog(folder)
    try:
        for name, m in metrics.items():
            log.write_scalars(step, evaluators_lib.scalar_entries(m), prefix=f"eval/{name}/")
        for path in figures:
            log.write_figure(step, figure_prefix + path.stem, path)
    finally:
        log.close()


def _progress_line(record: RunRecord) -> str:
    """``[arm seed k] <evaluator>.<headline> value ...  (train, eval seconds)``: every evaluator's headline scalar
    (:func:`saliency_jax.evaluators.headline`)."""
    scalars = []
    for name, m in record.metrics.items():
        head = evaluators_lib.headline(name, m)
        if head is not None:
            scalars.append(f"{name}.{head[0]} {head[1]:.4f}")
    return (f"[{record.arm} seed {record.seed}] {'  '.join(scalars)}  ({record.train_seconds:.0f} s train, "
            f"{sum(record.eval_seconds.values()):.0f} s eval)")


def _summary(values: list[Any]):
    if len(values) == 1:
        return values[0]
    try:
        return evaluation.summarize_repeats(values)
    except ValueError:  # metrics without a common structure over repeats (e.g. per-image lists)
        return None


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool = True,
                   compilation_cache: str | os.PathLike | None = None, arms: list[str] | tuple[str, ...] | None = None,
                   every_arm: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Trains every arm x repeat of ``config.experiment``, evaluates each run and writes the report into ``workdir``.

    Args:
      config: an experiment config.
      workdir: output folder.
      progress: progress bars.
      arms: the arms to run, by name (None: every arm; ``saliency-jax experiment --arms=A,B``).
      every_arm: dotted fields set in every arm over the arms' own values (``{"distraction.fill": "one"}``;
        ``saliency-jax experiment --override_arms``); the report lists them.
      compilation_cache: JAX's persistent compilation cache folder, or ``"off"``; None: the environment variable
        ``SALIENCY_JAX_COMPILATION_CACHE``, else the folder JAX already uses, else the default folder
        (:mod:`saliency_jax.compile_cache`). A second launch then reads its compiled programs from disk.

    Returns:
      The contents of ``metrics.json``: per arm, per repeat and summarised (mean and sample std) metrics of every
      evaluator, the wall, training and evaluation seconds, and ``every_arm``.

    Besides each run's TensorBoard log (:func:`evaluate_run`), the report's figures go to ``workdir/tensorboard`` as
    images tagged ``report/<name>`` (at step 0).

    The config is checked first (:func:`check_config`: nothing is written when it cannot run). One experiment launch
    per workdir: ``workdir``'s lock (:class:`saliency_jax.workdirs.WorkdirLock`) is then held throughout, and each
    run's own workdir is locked while it trains and is evaluated.

    Raises:
      WorkdirLockedError: (a ``ConfigError``) another launch holds ``workdir`` (or a run's workdir), at once.
      ValueError / KeyError: as :func:`check_config`, before anything is trained.
    """
    compile_cache.enable_compilation_cache(compilation_cache)
    workdir = pathlib.Path(workdir)
    every_arm = dict(every_arm or {})
    arms = check_config(config, arms=arms, every_arm=every_arm)  # before the workdir is made
    with workdirs.WorkdirLock(workdir):
        return _run_experiment(config, workdir, progress=progress, arms=arms, every_arm=every_arm)


def _run_experiment(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, progress: bool, arms: list[str],
                    every_arm: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_experiment`, with the experiment's lock held (``arms``: as :func:`check_config` returned them)."""
    is_main = jax.process_index() == 0
    data = evaluators_lib.ExperimentData(config)
    runs: dict[str, list[RunRecord]] = {arm: [] for arm in arms}
    start = time.time()
    for repeat in range(config.experiment.repeats):
        for arm in arms:
            cfg = arm_config(config, arm, repeat, every_arm=every_arm)
            run_dir = workdir / arm / f"seed{cfg.seed}"
            with workdirs.WorkdirLock(run_dir):  # training and run.json
                result = train_lib.train(cfg, run_dir, progress=f"{arm} seed{cfg.seed}" if progress else False)
                record = evaluate_run(result, evaluators_lib.build_evaluators(cfg), data, arm=arm)
            runs[arm].append(record)
            if is_main:
                print(_progress_line(record), flush=True)
    wall = time.time() - start
    train_s = sum(r.train_seconds for rs in runs.values() for r in rs)
    eval_s = sum(sum(r.eval_seconds.values()) for rs in runs.values() for r in rs)
    summary = {arm: {name: _summary([r.metrics[name] for r in runs[arm]]) for name in runs[arm][0].metrics}
               for arm in arms}
    out = {"config": config.to_dict(), "arms": arms, "repeats": config.experiment.repeats, "summary": summary,
           "runs": {arm: [{"seed": r.seed, "train_seconds": r.train_seconds, "eval_seconds": r.eval_seconds,
                           "metrics": r.metrics} for r in rs] for arm, rs in runs.items()},
           "wall_seconds": wall, "train_seconds": train_s, "eval_seconds": eval_s,
           "devices": [str(d) for d in jax.devices()], "every_arm": every_arm}
    if is_main:
        (workdir / "metrics.json").write_text(json.dumps(to_jsonable(out), indent=2, default=str))
        ctx = ReportContext(config=config, arms=arms, runs=runs, workdir=workdir)
        sections = []
        for name, evaluator in evaluators_lib.build_evaluators(arm_config(config, arms[0], 0,
                                                                          every_arm=every_arm)).items():
            if evaluator.report is not None:
                section = evaluator.report(ctx)
                if section is not None:
                    sections.append(section)
        (workdir / "report.md").write_text(_report(config, arms, runs, out, sections))
        _to_tensorboard(workdir, 0, {}, figures=sorted(workdir.glob("*.png")), figure_prefix="report/")
    return out


def _describe_schemes(cfg: ml_collections.ConfigDict) -> str:
    if cfg.get("trainer", "supervised") != "supervised":
        return f"trainer {cfg.trainer}"
    names = training.scheme.scheme_list(cfg.get("schemes"))
    if not names:
        return "plain training"
    parts = []
    for name in names:
        settings = training.scheme.scheme_settings(cfg, name)
        parts.append(f"{name} (" + ", ".join(f"{k}={v}" for k, v in settings_dict(settings).items()) + ")")
    return " + ".join(parts)


def _flat(overrides, prefix=""):
    """``{"a": {"b": 1}}`` -> ``["a.b=1"]``."""
    out = []
    for k, v in dict(overrides).items():
        if isinstance(v, dict) and v:
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={v}")
    return out


def _report(config, arms, runs, out, sections) -> str:
    title = config.experiment.get("title") or f"{config.dataset.name}, {config.model.name}"
    lines = [
        f"# {title}",
        "",
        f"{out['repeats']} repeat(s) per arm (seeds {config.seed}..{config.seed + out['repeats'] - 1}, the same for "
        f"every arm; mean ± sample std over repeats); {len(arms)} arm(s) on {len(out['devices'])} device(s) "
        f"({out['devices'][0]}). Wall time {out['wall_seconds'] / 60:.1f} min: training "
        f"{out['train_seconds'] / 60:.1f} min, evaluation {out['eval_seconds'] / 60:.1f} min (runs restored from an "
        "earlier launch count the times of that launch).",
        "",
        (f"Optimizer {config.optimizer.name} lr {config.optimizer.learning_rate}, batch {config.batch_size}, loss "
         f"{config.get('loss', 'softmax_cross_entropy')}." if config.get("trainer", "supervised") == "supervised" else
         f"Trainer {config.trainer} (its settings are in each run's config.json), batch {config.batch_size}."),
        "",
        "| arm | training scheme | overrides |",
        "| --- | --- | --- |",
        *[f"| {a} | {_describe_schemes(runs[a][0].config)} | {', '.join(_flat(dict(config.experiment.arms)[a]))} |"
          for a in arms],
        "",
    ]
    if out.get("every_arm"):
        lines += ["Set in every arm over the arms' own values (`--override_arms`): "
                  + ", ".join(f"`{k}={v}`" for k, v in out["every_arm"].items()) + ".", ""]
    selected = [name for name, _ in config.experiment.arms]
    if arms != selected:
        lines += [f"Arms run (`--arms`): {', '.join(arms)} of {', '.join(selected)}.", ""]
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown, ""]
    return "\n".join(lines)
