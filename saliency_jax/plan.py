"""Plans: what the one train loop runs, and the run it returns.

A :class:`Plan` is a sequence of :class:`Phase` s on one step counter and one data stream, each with its un-jitted
step ``(state, batch, key) -> (state, metrics)``, the models it updates (their roles in the state) and its length,
plus the plan's models by name, its initial state and its hooks. :func:`saliency_jax.train.run_plan` runs any plan
with the same mesh, input, verified checkpoints, launch history, metrics log, TensorBoard, progress bar, non-finite
guard and phase cache. Supervised training is the one-phase plan built from
:func:`saliency_jax.training.make_train_step`; a method whose training differs (several models, phases, a min-max
game: background invariance) is a *plan builder* (:mod:`saliency_jax.trainers`), never a second loop.

:class:`TrainResult` is the run a plan's training gives back (and :func:`saliency_jax.load` rebuilds): the final
state, the plan, every model by name, and the classifier that evaluators measure.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import ml_collections

from saliency_jax import workdirs
from saliency_jax.models.trainable import TrainableModel, as_trainable
from saliency_jax.training.step import TrainState

Array = jax.Array
Step = Callable[[Any, dict[str, Array], Array], tuple[Any, dict[str, Array]]]

__all__ = ["Phase", "Plan", "Hooks", "PhaseCache", "TrainResult", "Step"]


class Phase(NamedTuple):
    """One phase of a plan.

    Attributes:
      name: the phase's name (``"train"`` for supervised training; ``"classifier"``, ``"mask"``, ``"adversarial"``,
        ``"attention"`` for background invariance).
      index: 1-based position (logged as ``phase`` in ``metrics.jsonl`` when the plan says so).
      begin, end: global steps before its first and after its last update (``end - begin`` steps).
      step: the un-jitted ``(state, batch, key) -> (state, metrics)``; its metrics must include ``loss`` and
        ``accuracy`` (the progress bar shows them) and may include ``update_skipped`` (the non-finite guard's flag:
        the loop stops the run when a logged window has a skipped update).
      role: the model (a key of :attr:`Plan.models`) this phase trains or measures: its validation accuracy is
        logged every ``config.eval_every`` steps.
      roles: the roles whose parameters and optimizer states the phase changes (what its phase-cache entry keeps).
      enter: ``state -> state`` applied once before its first step (e.g. copying a trained network into the next
        one), or None.
      signature: JSON-able description of everything that determines the phase's result from its input state (the
        phase cache's key); None: never cached.
      guarded: the step guards itself against non-finite updates and reports ``update_skipped`` (the generic step of
        :func:`saliency_jax.training.make_train_step`). Otherwise the loop guards it: a new state holding NaN or inf
        is dropped for the old one (``update_skipped`` = 1), so that no checkpoint holds a non-finite array.
    """

    name: str
    index: int
    begin: int
    end: int
    step: Step
    role: str
    roles: tuple[str, ...]
    enter: Callable[[Any], Any] | None = None
    signature: dict[str, Any] | None = None
    guarded: bool = False


class Hooks(NamedTuple):
    """A plan's hooks into the loop (each optional; all run on every process and write on process 0 only).

    Attributes:
      start: ``(workdir, start_step) -> None`` once before the loop (after restore): e.g. drop stored previews past
        the step the run resumes from.
      after_step: ``(workdir, step, state) -> None`` after every step's log line (e.g. a preview at fixed steps).
      finish: ``(workdir, state) -> None`` once after the last step (e.g. the final figures).
    """

    start: Callable[[pathlib.Path, int], None] | None = None
    after_step: Callable[[pathlib.Path, int, Any], None] | None = None
    finish: Callable[[pathlib.Path, Any], None] | None = None


class PhaseCache(NamedTuple):
    """Where a plan's phase results are cached, and how a phase's part of the state is taken and put back.

    The state after a phase with a ``signature`` is stored under a digest of the run's ``common`` key and every
    phase's signature so far (with the data iterator's position and the phase's metric records); a fresh run whose
    first phases have the same digest starts from there. Every entry is verified like a checkpoint before use: its
    ``manifest.json`` (written last; the entry is built beside its place and renamed into it whole) holds the
    checksums of its arrays, the digests of the iterator positions, and the SHA-256 of its key and metric records;
    an entry without a valid manifest or differing from it is not used (a warning names it), is moved to
    ``<folder>.damaged/``, and its phases are trained again and stored anew.

    Attributes:
      folder: the cache folder.
      common: JSON-able key shared by every phase (seed, dataset, batch size, shapes).
      select: ``(state, roles) -> subtree``: the part of the state phases 1..k determine.
      merge: ``(state, subtree) -> state``: the state with that part put back.
    """

    folder: pathlib.Path
    common: dict[str, Any]
    select: Callable[[Any, Sequence[str]], Any]
    merge: Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the loop runs: phases, models, the initial state and the hooks.

    Attributes:
      phases: in order; ``phases[-1].end`` is the run's length (no phase: nothing to train, the weights-only mode).
      models: ``{role: model}``: every model of the state, by name (a classifier as its
        :class:`~saliency_jax.models.trainable.TrainableModel` or linen module; generators as linen modules).
      init_variables: ``() -> variables``, the argument of ``init_state``: the first model's initial variables (its
        random initialisation or imported weights; called once, by the loop), passed as an argument so that they are
        not compiled into the program as constants.
      init_state: ``variables -> state``: the initial state (the loop jits it with replicated output).
      view: ``(state, role) -> TrainState``: one model's part of the state as a :class:`TrainState` (its params,
        batch statistics and optimizer state), what evaluators and validation read.
      image_shape: (height, width, channels) of one input ((time, height, width, channels) of a clip).
      num_classes: the classifier's outputs (labels are checked against them).
      final_role: the role of the classifier the run returns (:attr:`TrainResult.model` / ``state``).
      log_phase: add the phase index to every logged record (plans of several phases).
      hooks: :class:`Hooks`.
      cache: :class:`PhaseCache`, or None (no phase cache).
    """

    phases: tuple[Phase, ...]
    models: Mapping[str, Any]
    init_variables: Callable[[], Any]
    init_state: Callable[[Any], Any]
    view: Callable[[Any, str], TrainState]
    image_shape: tuple[int, ...]
    num_classes: int
    final_role: str = "classifier"
    log_phase: bool = False
    hooks: Hooks = Hooks()
    cache: PhaseCache | None = None

    @property
    def num_steps(self) -> int:
        """The run's length in steps."""
        return self.phases[-1].end if self.phases else 0

    @property
    def final_model(self) -> TrainableModel:
        """The classifier the run returns, as a :class:`~saliency_jax.models.trainable.TrainableModel`."""
        return as_trainable(self.models[self.final_role])


@dataclasses.dataclass
class TrainResult:
    """A trained run, as the train loop returns it and :func:`saliency_jax.load` rebuilds it: everything an evaluator
    needs, so none has to rebuild it.

    Attributes:
      state: the final :class:`TrainState` of the classifier the run returns (``plan.final_role``; on device,
        replicated).
      model: that classifier as a :class:`~saliency_jax.models.trainable.TrainableModel` (``model.apply(variables,
        images)`` gives the logits in inference mode, ``model.view(variables)`` the maps, ``model.module`` the linen
        or NNX module; a module given here is wrapped with :func:`~saliency_jax.models.trainable.as_trainable`).
      history: the logged metrics, one dict per log step (of this launch; the whole run is in ``metrics.jsonl``).
      workdir: where checkpoints, ``metrics.jsonl`` and ``config.json`` are.
      config: the run's config.
      initial_variables: ``{"params", "batch_stats"}`` the classifier started from (random initialisation or
        imported weights), NumPy arrays on the host.
      image_shape: (height, width, channels) of the model's input ((time, height, width, channels) for clips).
      num_classes: the classifier's outputs.
      train_seconds: wall time of this launch's training loop (0 when it only restored a finished run).
      plan: the :class:`Plan` that trained it (None for a run built by hand).
      full_state: the plan's whole state (every model's parameters and optimizer state); ``state`` is its view of
        ``plan.final_role``.
      stages: ``{name: TrainResult}``: the runs an evaluator's stages trained for it
        (:class:`saliency_jax.evaluators.Stage`), as its ``evaluate`` sees the run; empty otherwise.
    """

    state: TrainState
    model: TrainableModel
    history: list[dict[str, float]]
    workdir: pathlib.Path
    config: ml_collections.ConfigDict | None = None
    initial_variables: Any = None
    image_shape: tuple[int, ...] = ()
    num_classes: int = 0
    train_seconds: float = 0.0
    plan: Plan | None = None
    full_state: Any = None
    stages: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.model = as_trainable(self.model)

    @property
    def variables(self) -> dict[str, Any]:
        """The final ``{"params", "batch_stats"}`` of :attr:`model`."""
        return self.state.variables()

    @property
    def role(self) -> str:
        """The role of :attr:`model` in the plan."""
        return self.plan.final_role if self.plan is not None else "classifier"

    @property
    def models(self) -> Mapping[str, Any]:
        """``{role: model}``: every model of the run by name (see :attr:`Plan.models`)."""
        return dict(self.plan.models) if self.plan is not None else {"classifier": self.model}

    def model_state(self, role: str) -> TrainState:
        """The final :class:`TrainState` of the model ``role`` (one of :attr:`models`).

        Raises:
          KeyError: on an unknown role (naming the run's roles).
        """
        if role not in self.models:
            raise KeyError(f"unknown model {role!r}; this run has {sorted(self.models)}")
        if self.plan is None or self.full_state is None:
            return self.state
        return self.plan.view(self.full_state, role)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints kept in ``workdir/checkpoints`` (ascending)."""
        path = self.workdir / "checkpoints"
        if not path.exists():
            return []
        return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())

    def restore_full(self, step: int) -> Any:
        """The plan's whole state saved at ``step`` (one of :meth:`checkpoint_steps`), verified against the checksums
        saved with it.

        Raises:
          CheckpointError: (a ``RuntimeError``) if that checkpoint cannot be read or differs from its checksums (the
            step and path are named).
        """
        like = self.full_state if self.full_state is not None else self.state
        return workdirs.restore_state(self.workdir, step, like)

    def restore(self, step: int) -> TrainState:
        """The returned classifier's :class:`TrainState` saved at ``step`` (one of :meth:`checkpoint_steps`),
        verified against the checksums saved with it.

        Raises:
          CheckpointError: (a ``RuntimeError``) if that checkpoint cannot be read or differs from its checksums (the
            step and path are named).
        """
        full = self.restore_full(step)
        if self.plan is None or self.full_state is None:
            return full
        return self.plan.view(full, self.role)
