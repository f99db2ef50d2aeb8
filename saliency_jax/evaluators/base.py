"""The evaluator protocol of the experiment runner, and its registry.

An evaluator (big_vision's ``evaluators/``) takes one trained run and returns its metrics; after every arm and
repeat has run, it writes its section of ``report.md`` (and its figures) from the metrics of all runs:

* ``evaluate(run, data) -> metrics``: ``run`` is the :class:`saliency_jax.train.TrainResult` that
  :func:`saliency_jax.train.train` returned (model, final state, initial variables, image shape, config, workdir,
  checkpoints) - nothing is rebuilt; ``data`` is the experiment's :class:`ExperimentData`, which loads each test
  split once per experiment; ``metrics`` is a JSON-able dict (stored in the run's ``run.json`` and reused by a rerun).
  Files an evaluator wants to keep for its figures go into ``run.workdir``.
* ``report(report) -> Section | None``: ``report`` is a :class:`ReportContext` with every run's metrics.

Evaluators are listed by name in ``config.evaluators`` (in report order); the settings of evaluator ``name`` are the
section ``config.<name>`` when the config has one (made with :func:`settings_section`), else its defaults. The
modules of :mod:`saliency_jax.evaluators` register themselves with :func:`register_evaluator` in :data:`EVALUATORS`
(a :class:`saliency_jax.registry.Registry`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping, NamedTuple

import ml_collections

from saliency_jax.data import inputs
from saliency_jax.config import Settings
from saliency_jax.models.trainable import TrainableModel, as_trainable
from saliency_jax.registry import EVALUATORS, name_list

__all__ = ["run_model", "linen_module", "Evaluator", "Stage", "Section", "RunRecord", "ReportContext", "ExperimentData", "EvaluatorSettings", "EVALUATORS",
           "register_evaluator", "build_evaluators", "evaluator_names", "settings_section", "evaluator_settings",
           "scalar_entries", "headline"]


class Section(NamedTuple):
    """A section of ``report.md``: ``## title`` followed by ``markdown`` (which may link figures in the workdir)."""

    title: str
    markdown: str


@dataclasses.dataclass
class RunRecord:
    """One finished run (arm x repeat), as the report sees it.

    Attributes:
      arm: the arm's name.
      seed: the run's seed.
      workdir: the run's folder (checkpoints, ``metrics.jsonl``, ``run.json``, evaluators' files).
      config: the run's config (the arm's overrides applied).
      metrics: ``{evaluator name: metrics}``.
      train_seconds: wall time of the training loop (of the launch that trained it).
      eval_seconds: ``{evaluator name: seconds}`` of the evaluation that produced the metrics.
    """

    arm: str
    seed: int
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    metrics: dict[str, Any]
    train_seconds: float = 0.0
    eval_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ReportContext:
    """What an evaluator's ``report`` sees.

    Attributes:
      config: the experiment's config (before arm overrides).
      arms: arm names in report order.
      runs: ``{arm: [RunRecord, ...]}``, repeats in order.
      workdir: the experiment's folder (figures go here).
    """

    config: ml_collections.ConfigDict
    arms: list[str]
    runs: dict[str, list[RunRecord]]
    workdir: pathlib.Path

    def metrics(self, evaluator: str) -> dict[str, list[Any]]:
        """``{arm: [metrics of evaluator in each repeat]}`` (arms without them are left out)."""
        return {a: [r.metrics[evaluator] for r in self.runs[a] if evaluator in r.metrics] for a in self.arms
                if any(evaluator in r.metrics for r in self.runs[a])}


class Stage(NamedTuple):
    """A model an evaluator needs trained before it evaluates (Guided Zoom's Evidence CNNs): the runner trains it
    through the one loop (:func:`saliency_jax.train.train`, resuming from ``workdir``) and hands the trained run to
    ``evaluate`` as ``run.stages[name]``; the evaluator itself never trains.

    Attributes:
      config: the stage's run config.
      workdir: its folder (inside the run's workdir).
    """

    config: ml_collections.ConfigDict
    workdir: pathlib.Path


class Evaluator(NamedTuple):
    """An evaluator: ``evaluate(run, data) -> metrics``, an optional ``report(context) -> Section | None`` and
    optional ``stages(run, data) -> {name: Stage}``: models to train first (their runs reach ``evaluate`` as
    ``run.stages``)."""

    evaluate: Callable[[Any, "ExperimentData"], dict[str, Any]]
    report: Callable[[ReportContext], Section | None] | None = None
    stages: Callable[[Any, "ExperimentData"], dict[str, Stage]] | None = None


class ExperimentData:
    """Data shared by the runs of one experiment: each test split is read once, not once per arm.

    Attributes:
      config: the experiment's config.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self._cache: dict[Any, Any] = {}

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for, the same object afterwards."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def test_source(self, config: ml_collections.ConfigDict):
        """The test split of a run's dataset (``config.dataset``), read once per process
        (:func:`saliency_jax.data.inputs.read_split`: the split training validated)."""
        return inputs.read_split(config.dataset, "test")


class EvaluatorSettings(Settings):
    """Base of an evaluator's frozen settings dataclass (built from ``config.<name>`` by
    :meth:`~saliency_jax.config.Settings.from_mapping`, which rejects unknown fields)."""


#: The evaluators by name: value ``builder(settings) -> Evaluator``, metadata ``settings`` (the evaluator's
#: :class:`EvaluatorSettings` dataclass). Filled by :func:`register_evaluator`.
# (EVALUATORS is the shared instance of :mod:`saliency_jax.registry`.)


def register_evaluator(name: str, settings: type, *, headline: str | Callable[[Mapping[str, Any]], str] | None = None):
    """Decorator registering ``builder(settings) -> Evaluator`` under ``name`` in :data:`EVALUATORS` (settings: an
    :class:`EvaluatorSettings` dataclass; ``config.<name>`` holds its fields).

    Args:
      name: the evaluator's config name.
      settings: its settings dataclass.
      headline: the entry of its metrics the runner's progress line shows (:func:`headline`): a dotted key of
        :func:`scalar_entries`, or a function ``metrics -> key``; None: the first non-integer entry.

    Raises:
      TypeError: if ``settings`` is not an :class:`EvaluatorSettings` dataclass.
      ValueError: if another builder is registered under ``name``.
    """
    if not (dataclasses.is_dataclass(settings) and issubclass(settings, EvaluatorSettings)):
        raise TypeError(f"settings of evaluator {name!r} must be an EvaluatorSettings dataclass; got {settings}")
    return EVALUATORS.register(name, settings=settings, headline=headline)


def scalar_entries(metrics: Any) -> dict[str, float | int]:
    """The numeric entries of an evaluator's metrics, nested dicts flattened with dotted keys
    (``{"accuracy": 0.9, "per_set": {"clean": 0.95}}`` -> ``{"accuracy": 0.9, "per_set.clean": 0.95}``), in the
    metrics' order; lists, strings, booleans and None are left out."""
    out: dict[str, float | int] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}{key}"] = value
    if isinstance(metrics, Mapping):
        walk(metrics, "")
    return out


def headline(name: str, metrics: Any) -> tuple[str, float] | None:
    """The headline scalar of evaluator ``name``'s metrics, ``(dotted key, value)``: the entry its registration
    names (``headline=``) when the metrics have it, else the first non-integer entry of :func:`scalar_entries`
    (counts such as ``examples`` are integers); None when there is none (or the evaluator is not registered)."""
    if name not in EVALUATORS:
        return None
    entries = scalar_entries(metrics)
    key = EVALUATORS.metadata(name).get("headline")
    if callable(key):
        try:
            key = key(metrics)
        except (KeyError, TypeError, ValueError, StopIteration):
            key = None
    if key not in entries:
        key = next((k for k, v in entries.items() if isinstance(v, float)), None)
    return None if key is None else (key, float(entries[key]))


def evaluator_names() -> tuple[str, ...]:
    """The registered evaluator names."""
    return EVALUATORS.names()


def settings_section(name: str, **overrides) -> ml_collections.ConfigDict:
    """A config section holding every setting of evaluator ``name`` at its default, with ``overrides`` applied.

    Raises:
      ValueError: unknown evaluator or field.
    """
    return EVALUATORS.metadata(name)["settings"].section(**overrides)


def evaluator_list(value: Any) -> tuple[str, ...]:
    """``config.evaluators`` as a tuple of names (tuple/list, or a comma-separated string from the command line)."""
    return name_list(value)


def evaluator_settings(config: ml_collections.ConfigDict, name: str):
    """The settings of evaluator ``name`` in ``config`` (its section, or the defaults without one).

    Raises:
      ValueError: unknown evaluator or field.
    """
    cls = EVALUATORS.metadata(name)["settings"]
    try:
        return cls.from_mapping(config[name] if name in config else None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{name}: {e}") from e


def build_evaluators(config: ml_collections.ConfigDict) -> dict[str, Evaluator]:
    """``{name: Evaluator}`` for ``config.evaluators``, in order.

    Raises:
      ValueError: an unknown evaluator name, a name listed twice, or bad settings.
    """
    names = evaluator_list(config.get("evaluators"))
    if len(set(names)) != len(names):
        raise ValueError(f"config.evaluators lists an evaluator twice: {names}")
    return {name: EVALUATORS.get(name)(evaluator_settings(config, name)) for name in names}


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a JSON-able dict (tuples as lists), to store beside its metrics."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def run_model(run) -> TrainableModel:
    """The classifier of a run as a :class:`~saliency_jax.models.trainable.TrainableModel` (a run built by hand may
    hold the linen module itself)."""
    return as_trainable(run.model)


def linen_module(run, what: str):
    """The run's linen module, for an evaluator that reads layers with the linen functions of
    :mod:`saliency_jax.saliency`.

    Raises:
      ValueError: the run's model is an NNX model or a linen model with an ``outputs`` selection, token reshape or
        bound axis (naming ``what`` and the way to any model's maps).
    """
    return run_model(run).require_linen(what)
