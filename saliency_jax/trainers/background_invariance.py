r"""The trainer of background-invariant training (Cruz & Cardoso) and of its Attention baseline (Guan et al.).

Cruz, Prates, Simas Filho, Pinto Costa, Cardoso, "Background Invariance by Adversarial Learning", ICPR 2020 (poster:
"Training a CNN to be background invariant"). The method trains three models - the classifier ``f``, the mask
generator ``f_m`` (a U-Net) and the background generator ``f_b`` - each with its own Adam, in the three phases of the
authors' ``train1.py`` / ``train2.py`` / ``train3.py``; the steps, losses and networks are in
:mod:`saliency_jax.training.background_invariance` and :mod:`saliency_jax.models.background_invariance`. This module
is the loop around them, forked beside the generic loop (:func:`saliency_jax.train.train`) as big_vision's
``trainers/proj/*/train.py`` are beside its ``train.py``, because the loop itself differs: several models and
optimizers in one state, phases that change which model trains, a min-max phase updating two players every step.
It lives in :mod:`saliency_jax.trainers` (not in ``training/``, whose modules are pure steps and schemes that know no
loop, nor in ``train.py``, which stays the one obvious loop) and reuses the generic loop's pieces: the mesh
(:func:`~saliency_jax.train.make_mesh`), the input (:func:`~saliency_jax.train.load_sources`,
:func:`~saliency_jax.train.make_train_input`, :func:`~saliency_jax.train.check_batch`), the orbax checkpoint manager
and restore (:func:`~saliency_jax.train.checkpoint_manager`, :func:`~saliency_jax.train.restore_checkpoint`: one
checkpoint holds the whole :class:`~saliency_jax.training.background_invariance.BackgroundInvarianceState` - every
model's parameters and optimizer state - and the grain iterator's position) and the metric log
(:class:`~saliency_jax.train.MetricWriter`, ``metrics.jsonl``).

Methods (``config.background_invariance.method``), each a list of phases run one after the other on one step counter
and one data stream (``config.batch_size`` per step):

==============  ====================================================================================================
``classifier``  phase 1 alone: the "Vanilla CNN" row of Table 1 (``train1.py``).
``adversarial`` phase 1, phase 2 (the U-Net's masks; skipped with ``mask="heuristic"``), phase 3 (the classifier
                against the background generator, both updated every step): the "Proposal" row.
``attention``   Guan et al. 2018 as the authors ran it (``train_att.py``): stage 1 = phase 1 (the global CNN
                ``G``, a :class:`~saliency_jax.models.VanillaCNN`), then stage 2: ``G`` frozen, the crop branch and
                the fusion layers of :class:`~saliency_jax.models.AttentionCNN` trained (``config.model.name =
                "attention_cnn"``): the "Attention" row.
==============  ====================================================================================================

Each phase lasts ``ceil(epochs * num_train / batch_size)`` steps (``classifier_epochs``, ``mask_epochs``,
``adversarial_epochs``, ``attention_epochs``). A step's randomness is ``fold_in(key(seed + 1), step)``, so a run is a
deterministic function of its config: a run killed and relaunched on its workdir resumes from the latest checkpoint
and continues bit-identically; a phase boundary is always checkpointed. :func:`train` returns a
:class:`~saliency_jax.train.TrainResult` whose ``model`` and ``state`` are the final classifier (the
:class:`~saliency_jax.models.AttentionCNN` for ``attention``), so every evaluator works on it unchanged.

Phase cache (``phase_cache``, a folder; relative paths are relative to the run's workdir): the state after a
``classifier`` or ``mask`` phase is stored there under a digest of everything that determines it (seed, dataset,
batch size, image shape, and each phase so far: its network, initial weights, optimizer, losses' settings and
number of steps), with the data iterator's position and the phase's ``metrics.jsonl`` records. A fresh run whose
first phases have the same digest starts from there instead of training them again: the Vanilla CNN arm's phase 1
is the Attention arm's stage 1 and the Proposal's phase 1, and arms that differ only in phase 3 share phases 1-2. The
result is the state those phases would compute (the same jitted computation from the same inputs); the MNIST config
enables it. Code changes between launches are not part of the digest (as for the run's own checkpoints).

Figures (``adversarial``): ``previews`` snapshots of what phase 3 trains on are taken along phase 3 with a fixed
noise key and fixed test images (:func:`~saliency_jax.training.background_invariance.phase3_preview`), kept in
``previews.npz``; at the end the trainer writes ``backgrounds_along_training.png`` (the composites at each snapshot:
the poster's Fig. 4) and ``masks.png`` (image, the U-Net's soft mask, the binarised mask, a generated background and
the composite, with the final weights).

Where this differs from the authors' code: one batch size for every phase (``config.batch_size``; the code's
``--batchsize`` is per script, 8 by default); epochs are the per-phase fields here (the code's ``--epochs``, 100 for
each script); the data are augmented as ``config.dataset.augment`` says (the code's Keras generator - rotation 15,
shifts 0.15, horizontal flip, shear 0.3, brightness 0.8-1.2 - has no shift or shear here; the MNIST config trains
unaugmented); the Attention baseline's crops are resized to the input size so the batch keeps its shape (see
:func:`~saliency_jax.models.background_invariance.crop_and_resize`) and its crops are taken by the frozen global
CNN inside the model; :mod:`saliency_jax.training.background_invariance` lists the differences of the steps.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from saliency_jax import data as data_lib
from saliency_jax import train as train_lib
from saliency_jax import workdirs
from saliency_jax.config import Settings
from saliency_jax.models.background_invariance import (AttentionCNN, BackgroundGenerator, UNet, VanillaCNN)
from saliency_jax.training import background_invariance as bi

Array = jax.Array

__all__ = [
    "METHODS",
    "BackgroundInvarianceTrainerSettings",
    "BackgroundInvarianceResult",
    "Phase",
    "Plan",
    "settings_section",
    "trainer_settings",
    "check",
    "build_plan",
    "phase_steps",
    "classifier_view",
    "train",
]

METHODS = ("classifier", "adversarial", "attention")
"""``config.background_invariance.method``: phase 1 alone (Vanilla CNN), the three phases (Proposal), or the
Attention baseline's two stages."""

SECTION = "background_invariance"
"""The config section holding :class:`BackgroundInvarianceTrainerSettings`."""

PREVIEW_FILE = "previews.npz"


# ----------------------------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class BackgroundInvarianceTrainerSettings(Settings, bi.BackgroundInvarianceConfig):
    """The method's settings (:class:`~saliency_jax.training.background_invariance.BackgroundInvarianceConfig`:
    area, total variation, binarisation, mask and background sources, tiles, learning rates, epochs of phases 1-3)
    plus the trainer's.

    ``batch_size`` must equal ``config.batch_size`` (the loop's global batch; the configs here set it by reference,
    ``config.get_ref("batch_size")``).

    Attributes:
      method: one of :data:`METHODS`.
      attention_epochs: epochs of the Attention baseline's stage 2 (``train_att.py --epochs``, 100); its stage 1 is
        ``classifier_epochs`` of phase 1. Adam at ``classifier_learning_rate`` (Keras ``'adam'``: 1e-3), the global
        CNN frozen.
      mask_base_features: filters of the U-Net's first block (32 in the code).
      generator_base_features: filters of the background generator's last conv (32 in the code).
      previews: snapshots of phase 3 for ``backgrounds_along_training.png`` (0: none), evenly spaced over it.
      preview_examples: test images in the figures.
      phase_cache: folder of the phase cache (see the module docstring); ``""``: off. Relative paths are taken from
        the run's workdir (the experiment runner's ``workdir/<arm>/seed<k>``: ``"../../phase_cache"`` is one cache
        for the whole experiment).
    """

    method: str = "adversarial"
    attention_epochs: float = 100.0
    mask_base_features: int = 32
    generator_base_features: int = 32
    previews: int = 6
    preview_examples: int = 8
    phase_cache: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if self.attention_epochs < 0:
            raise ValueError(f"attention_epochs must be >= 0; got {self.attention_epochs}")
        for name in ("mask_base_features", "generator_base_features"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if int(self.previews) < 0 or int(self.preview_examples) < 1:
            raise ValueError(f"previews must be >= 0 and preview_examples >= 1; got {self.previews}, "
                             f"{self.preview_examples}")


def settings_section(**overrides) -> ml_collections.ConfigDict:
    """The ``config.background_invariance`` section: every setting at its default, ``overrides`` applied.

    Raises:
      ValueError: on an unknown field.
    """
    return BackgroundInvarianceTrainerSettings.section(**overrides)


def trainer_settings(config: ml_collections.ConfigDict) -> BackgroundInvarianceTrainerSettings:
    """The settings in ``config.background_invariance`` (defaults where the config has no section).

    Raises:
      ValueError: unknown or invalid fields (named).
    """
    try:
        return BackgroundInvarianceTrainerSettings.from_mapping(config.get(SECTION))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{SECTION}: {e}") from e


def check(config: ml_collections.ConfigDict) -> BackgroundInvarianceTrainerSettings:
    """Validates a run config for this trainer before anything is read or compiled.

    Raises:
      ValueError: bad settings; ``config.schemes`` not empty (schemes belong to the generic loop); a loss other than
        softmax cross-entropy; ``background_invariance.batch_size != config.batch_size``; ``method="attention"``
        without ``config.model.name = "attention_cnn"`` or another method with it.
    """
    settings = trainer_settings(config)
    schemes = config.get("schemes") or ()
    if isinstance(schemes, str):
        schemes = tuple(s for s in schemes.split(",") if s.strip())
    if schemes:
        raise ValueError(f"the background_invariance trainer runs no training schemes; config.schemes = "
                         f"{tuple(schemes)} (schemes belong to the supervised trainer)")
    if config.get("loss", "softmax_cross_entropy") != "softmax_cross_entropy":
        raise ValueError(f"the background_invariance trainer trains with softmax cross-entropy; config.loss = "
                         f"{config.loss!r}")
    if int(settings.batch_size) != int(config.batch_size):
        raise ValueError(f"config.{SECTION}.batch_size ({settings.batch_size}) must equal config.batch_size "
                         f"({config.batch_size}), the loop's batch for every phase: set both, or set "
                         f"config.{SECTION}.batch_size = config.get_ref('batch_size') in the config file")
    attention = config.model.name == "attention_cnn"
    if (settings.method == "attention") != attention:
        raise ValueError(f"method {settings.method!r} with config.model.name {config.model.name!r}: the Attention "
                         "baseline (method 'attention') trains model 'attention_cnn', the other methods a plain "
                         "classifier")
    if config.batch_size % jax.device_count():
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.device_count()} devices")
    return settings


# ----------------------------------------------------------------------------------------------------------------
# The plan: models, optimizers and phases of a method.


class Phase(NamedTuple):
    """One phase of a method.

    Attributes:
      name: ``"classifier"``, ``"mask"``, ``"adversarial"`` or ``"attention"``.
      index: 1-based position (logged as ``phase`` in ``metrics.jsonl``).
      begin, end: global steps before its first and after its last update (``end - begin`` steps).
      step: the un-jitted ``(state, batch, key) -> (state, metrics)``.
      model, role: the classifier this phase trains or uses and the role holding its parameters (validation
        accuracy, progress bar).
      roles: the roles whose parameters and optimizer states the phase changes.
      enter: ``state -> state`` applied once before its first step (the Attention baseline copies the trained global
        CNN into the AttentionCNN), or None.
      signature: JSON-able description of everything that determines the phase's result from its input state (for
        the phase cache); None: never cached.
    """

    name: str
    index: int
    begin: int
    end: int
    step: bi.Step
    model: nn.Module
    role: str
    roles: tuple[str, ...]
    enter: Callable[[bi.BackgroundInvarianceState], bi.BackgroundInvarianceState] | None = None
    signature: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A method's models and phases.

    Attributes:
      models: the method's modules (the classifier is phase 1's).
      optimizers: ``{role: optax optimizer}``.
      phases: in order; ``phases[-1].end`` is the run's length.
      final_model, final_role: the classifier the run returns, and its role.
      extra: ``{role: module}`` further models of the state (the AttentionCNN).
    """

    models: bi.BackgroundInvarianceModels
    optimizers: Mapping[str, optax.GradientTransformation]
    phases: tuple[Phase, ...]
    final_model: nn.Module
    final_role: str
    extra: Mapping[str, nn.Module] = dataclasses.field(default_factory=dict)

    def init(self, key: Array, image_shape: tuple[int, int, int], classifier_variables: Any
             ) -> bi.BackgroundInvarianceState:
        """The initial state: :func:`~saliency_jax.training.background_invariance.init_state` (the classifier from
        ``classifier_variables``, the U-Net and generator from ``split(key, 3)``) plus each extra role's ``init``
        from ``fold_in(key, 3 + i)``; every role's initial weights are the same in every method."""
        state = bi.init_state(self.models, self.optimizers, image_shape, key,
                              classifier_variables=classifier_variables)
        params, opt_state = dict(state.params), dict(state.opt_state)
        x = jnp.zeros((1, *image_shape), jnp.float32)
        for i, (role, module) in enumerate(self.extra.items()):
            params[role] = module.init(jax.random.fold_in(key, 3 + i), x, train=False)["params"]
            opt_state[role] = self.optimizers[role].init(params[role])
        return state.replace(params=params, opt_state=opt_state)


def phase_steps(epochs: float, num_train: int, batch_size: int) -> int:
    """``ceil(epochs * num_train / batch_size)`` steps (0 for 0 epochs)."""
    return int(math.ceil(float(epochs) * int(num_train) / int(batch_size) - 1e-9)) if epochs > 0 else 0


def _on_role(step: bi.Step, role: str) -> bi.Step:
    """``step`` (written for the role ``"classifier"``) applied to another role of the state."""

    def wrapped(state, batch, key):
        sub = state.replace(params={"classifier": state.params[role]},
                            opt_state={"classifier": state.opt_state[role]}, batch_stats={})
        new, metrics = step(sub, batch, key)
        return state.replace(step=new.step, params={**state.params, role: new.params["classifier"]},
                             opt_state={**state.opt_state, role: new.opt_state["classifier"]}), metrics

    return wrapped


def _with_loss(step: bi.Step) -> bi.Step:
    """Phase 3's metrics with ``loss`` = the classifier's loss (the key every phase logs)."""

    def wrapped(state, batch, key):
        state, metrics = step(state, batch, key)
        return state, {"loss": metrics["classifier_loss"], **metrics}

    return wrapped


def build_plan(config: ml_collections.ConfigDict, settings: BackgroundInvarianceTrainerSettings, num_classes: int,
               image_shape: tuple[int, int, int], num_train: int) -> Plan:
    """The models, optimizers and phases of ``settings.method`` for a run.

    Args:
      config: the run config (``config.model`` names the classifier; ``"attention_cnn"`` for the Attention
        baseline, whose stage-1 global CNN is a :class:`~saliency_jax.models.VanillaCNN` of its ``base_features``
        and ``dense_features``).
      settings: :func:`check`'s result.
      num_classes: classes of the data.
      image_shape: (height, width, channels).
      num_train: training examples (for the phases' lengths).

    Raises:
      ValueError: as the networks (e.g. an image size the background generator cannot produce).
    """
    image_shape = tuple(int(s) for s in image_shape)
    batch = int(config.batch_size)
    optimizers = dict(bi.make_optimizers(settings))
    extra: dict[str, nn.Module] = {}
    if settings.method == "attention":
        final = train_lib.build_model(config, num_classes)
        classifier = VanillaCNN(num_classes, final.base_features, final.dense_features)
        models = bi.BackgroundInvarianceModels(classifier)
        extra["attention"] = final
        optimizers["attention"] = bi.attention_optimizer(
            optax.adam(settings.classifier_learning_rate, eps=settings.adam_eps))
    else:
        classifier = final = train_lib.build_model(config, num_classes)
        if settings.method == "classifier":
            models = bi.BackgroundInvarianceModels(classifier)
        else:
            models = bi.BackgroundInvarianceModels(
                classifier,
                UNet(settings.mask_base_features) if settings.mask == "unet" else None,
                BackgroundGenerator(image_shape, settings.tiles, settings.generator_base_features)
                if settings.background == "adversarial" else None)
    optimizers = {role: optimizers[role] for role in ("classifier", "mask_generator", "background_generator")
                  if getattr(models, role) is not None} | {r: optimizers[r] for r in extra}

    phases: list[Phase] = []

    def add(name, epochs, step, model, role, roles, enter=None, signature=None):
        begin = phases[-1].end if phases else 0
        end = begin + phase_steps(epochs, num_train, batch)
        if signature is not None:
            signature = {"phase": name, "steps": end - begin, **signature}
        phases.append(Phase(name, len(phases) + 1, begin, end, step, model, role, roles, enter, signature))

    add("classifier", settings.classifier_epochs, bi.make_classifier_step(models, optimizers), classifier,
        "classifier", ("classifier",),
        signature={"model": repr(classifier), "pretrained": str(config.model.get("pretrained") or ""),
                   "learning_rate": settings.classifier_learning_rate, "adam_eps": settings.adam_eps})
    if settings.method == "adversarial":
        if models.mask_generator is not None:
            add("mask", settings.mask_epochs, bi.make_mask_step(models, optimizers, settings), classifier,
                "classifier", ("mask_generator",),
                signature={"model": repr(models.mask_generator), "learning_rate": settings.mask_learning_rate,
                           "adam_eps": settings.adam_eps, "area": settings.area,
                           "total_variation": settings.total_variation, "area_loss": settings.area_loss})
        roles = ("classifier",) + (("background_generator",) if models.background_generator is not None else ())
        add("adversarial", settings.adversarial_epochs,
            _with_loss(bi.make_adversarial_step(models, optimizers, settings)), classifier, "classifier", roles)
    elif settings.method == "attention":
        attention = extra["attention"]

        def enter(state):
            return state.replace(params={**state.params, "attention": bi.with_global_params(
                state.params["attention"], state.params["classifier"])})

        add("attention", settings.attention_epochs,
            _on_role(bi.make_classifier_step(bi.BackgroundInvarianceModels(attention),
                                             {"classifier": optimizers["attention"]}), "attention"),
            attention, "attention", ("attention",), enter=enter)
    return Plan(models, optimizers, tuple(phases), final, "attention" if extra else "classifier", extra)


def classifier_view(state: bi.BackgroundInvarianceState, role: str = "classifier") -> train_lib.TrainState:
    """One role of the state as the generic loop's :class:`~saliency_jax.train.TrainState` (what evaluators read).

    The state's ``batch_stats`` belong to the classifier (role ``"classifier"``); other roles have none.
    """
    return train_lib.TrainState(step=state.step, params=state.params[role],
                                batch_stats=state.batch_stats if role == "classifier" else {},
                                opt_state=state.opt_state[role])


@dataclasses.dataclass
class BackgroundInvarianceResult(train_lib.TrainResult):
    """:class:`~saliency_jax.train.TrainResult` of this trainer: ``model`` / ``state`` are the final classifier.

    Attributes:
      full_state: the whole :class:`~saliency_jax.training.background_invariance.BackgroundInvarianceState`.
      role: the role of ``state`` in it.
      plan: the method's models and phases.
    """

    full_state: Any = None
    role: str = "classifier"
    plan: Plan | None = None

    def restore(self, step: int) -> train_lib.TrainState:
        """The classifier's :class:`~saliency_jax.train.TrainState` saved at ``step`` (one of
        :meth:`checkpoint_steps`).

        Raises:
          RuntimeError: if that checkpoint cannot be restored (the path is named).
        """
        return classifier_view(self.restore_full(step), self.role)

    def restore_full(self, step: int) -> bi.BackgroundInvarianceState:
        """The whole state saved at ``step``, verified against the checksums saved with it.

        Raises:
          CheckpointError: (a ``RuntimeError``) if that checkpoint cannot be read or differs from its checksums (the
            step and path are named).
        """
        return workdirs.restore_state(self.workdir, step, self.full_state)


# ----------------------------------------------------------------------------------------------------------------
# Phase cache.


def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_keys(config, plan: Plan, image_shape, num_classes) -> list[dict[str, Any] | None]:
    """Per phase: the description its cache entry is keyed by (None after the first uncacheable phase)."""
    common = {"seed": int(config.seed), "dataset": config.dataset.to_dict(), "batch_size": int(config.batch_size),
              "image_shape": list(image_shape), "num_classes": int(num_classes)}
    keys, so_far = [], []
    for phase in plan.phases:
        if phase.signature is None or (keys and keys[-1] is None):
            keys.append(None)
            continue
        so_far.append(phase.signature)
        keys.append({**common, "phases": list(so_far)})
    return keys


def _sub_state(state: bi.BackgroundInvarianceState, roles) -> dict[str, Any]:
    return {"step": state.step, "batch_stats": state.batch_stats,
            "params": {r: state.params[r] for r in roles}, "opt_state": {r: state.opt_state[r] for r in roles}}


def _cache_handlers():
    return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


def _cache_dir(cache: pathlib.Path, phase: Phase, key: dict[str, Any]) -> pathlib.Path:
    return cache / f"{phase.index}-{phase.name}-{_digest(key)}"


def _save_cache(path: pathlib.Path, key, state, roles, iterator, records, is_main: bool) -> None:
    if (path / "key.json").exists():
        return
    mngr = ocp.CheckpointManager(path.absolute() / "checkpoint", item_handlers=_cache_handlers(),
                                 options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(_sub_state(state, roles)),
                                                       data=grain.checkpoint.CheckpointSave(iterator)), force=True)
    mngr.wait_until_finished()
    mngr.close()
    if is_main:  # key.json last: its presence marks a complete entry
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp = path / "key.json.tmp"
        tmp.write_text(json.dumps(key, sort_keys=True, default=str, indent=1))
        os.replace(tmp, path / "key.json")


def _load_cache(path: pathlib.Path, key, state, roles, iterator):
    """``(state, iterator, records)`` from a complete cache entry matching ``key``, or None."""
    try:
        stored = json.loads((path / "key.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if stored != json.loads(json.dumps(key, sort_keys=True, default=str)):
        return None
    mngr = ocp.CheckpointManager(path.absolute() / "checkpoint", item_handlers=_cache_handlers())
    try:
        step = mngr.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _sub_state(state, roles))
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:  # a damaged entry: train the phases again
        logging.warning("phase cache %s could not be restored (%s: %s); training those phases", path,
                        type(e).__name__, e)
        return None
    finally:
        mngr.close()
    sub = restored["state"]
    new = state.replace(step=sub["step"], batch_stats=sub["batch_stats"],
                        params={**state.params, **sub["params"]}, opt_state={**state.opt_state, **sub["opt_state"]})
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return new, restored["data"], records


# ----------------------------------------------------------------------------------------------------------------
# Logs and figures.


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


def _preview_images(source, config, n: int) -> np.ndarray:
    """``n`` test images spread evenly over the split (the same for every arm)."""
    n = min(int(n), len(source))
    idx = np.linspace(0, len(source) - 1, n).astype(int)
    batch = next(iter(data_lib.make_eval_batches(source, idx, batch_size=n,
                                                 image_size=config.dataset.get("image_size"))))
    return np.asarray(batch["image"][:n], np.float32)


def _unit(x) -> np.ndarray:
    return np.clip(np.asarray(x, np.float32), 0.0, 1.0)


def write_figures(workdir: pathlib.Path, final_preview: Mapping[str, np.ndarray] | None = None) -> list[pathlib.Path]:
    """``masks.png`` (from ``final_preview``) and ``backgrounds_along_training.png`` (from ``previews.npz``).

    Args:
      workdir: the run's folder.
      final_preview: :func:`~saliency_jax.training.background_invariance.phase3_preview` of the final state, with
        ``"image"`` added; None: no masks figure.

    Returns:
      The paths written.
    """
    from saliency_jax.evaluation.backgrounds import image_grid

    out = []
    if final_preview is not None:
        rows = {"image": final_preview["image"], "soft mask": final_preview["soft_mask"][..., :1],
                "binary mask": final_preview["mask"][..., :1], "background": final_preview["background"],
                "composite": final_preview["composite"]}
        out.append(image_grid({k: _unit(v) for k, v in rows.items()}, workdir / "masks.png",
                              title="Final masks and backgrounds"))
    path = workdir / PREVIEW_FILE
    if path.exists():
        stored = np.load(path)
        if len(stored["steps"]):
            rows = {"image": stored["image"]}
            rows |= {f"step {int(s)}": c for s, c in zip(stored["steps"], stored["composite"])}
            out.append(image_grid({k: _unit(v) for k, v in rows.items()}, workdir / "backgrounds_along_training.png",
                                  title="Phase 3 inputs along training"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loop.


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool | str = True
          ) -> BackgroundInvarianceResult:
    """Trains one run of the method in ``config.background_invariance``, resuming from ``workdir``'s checkpoints.

    Sections in the generic loop's order: mesh; input; models, optimizers and phases; sharding; checkpoint restore
    (or the phase cache); the loop over phases (log every ``config.log_every`` steps and at each phase end,
    ``val_accuracy`` of the phase's classifier every ``config.eval_every`` steps when the validation split is not
    empty, a checkpoint every ``config.checkpoint_every`` steps and at each phase end); figures.

    Args:
      config: a run config with ``trainer = "background_invariance"`` and the section ``background_invariance``
        (:class:`BackgroundInvarianceTrainerSettings`); ``dataset``, ``model``, ``seed``, ``batch_size``,
        ``log_every``, ``checkpoint_every``, ``keep_checkpoints``, ``eval_every`` as for the generic loop
        (``num_steps`` / ``num_epochs`` are not read: each phase has its epochs).
      workdir: output folder: ``checkpoints/``, ``metrics.jsonl`` (each record with its ``phase`` index),
        ``config.json``, ``previews.npz`` and the figures.
      progress: tqdm progress bar (process 0 only); a string names it (as :func:`saliency_jax.train.train`).

    Returns:
      A :class:`BackgroundInvarianceResult`: ``model`` and ``state`` are the final classifier (the AttentionCNN for
      ``method="attention"``).

    Raises:
      ValueError: as :func:`check`, or a malformed input batch.
      RuntimeError: if the latest checkpoint cannot be restored (the path is named).
      FloatingPointError: if a logged metric becomes NaN or infinite.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    settings = check(config)

    # Mesh.
    mesh = train_lib.make_mesh()
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    # Input.
    train_source, train_idx, val_idx, test_source = train_lib.load_sources(config)
    iterator = iter(train_lib.make_train_input(config, train_source, train_idx))
    num_classes = train_source.num_classes
    image_shape = tuple(data_lib.image_shape(train_source, config.dataset.get("image_size")))

    # Models, optimizers and phases.
    plan = build_plan(config, settings, num_classes, image_shape, len(train_idx))
    phases = plan.phases
    total = phases[-1].end
    init_key = jax.random.key(config.seed)
    classifier = plan.models.classifier
    x0 = jnp.zeros((1, *image_shape), jnp.float32)
    classifier_variables = jax.jit(lambda: classifier.init(jax.random.split(init_key, 3)[0], x0, train=False))()
    pretrained = config.model.get("pretrained")
    if pretrained:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"config.model.pretrained: weights file not found: {pretrained!r}")
        from saliency_jax.models import weights
        classifier_variables = weights.load_pretrained(config.model.name, pretrained, classifier_variables,
                                                       skip_head=True)
    elif config.model.name in ("vgg16", "resnet50"):
        logging.warning("%s starts from random weights: set --config.model.pretrained=PATH to fine-tune from "
                        "ImageNet as the authors' VGG19 does", config.model.name)

    # Sharding.
    state = jax.jit(lambda v: plan.init(init_key, image_shape, v), out_shardings=replicated)(classifier_variables)
    view0 = classifier_view(state, plan.final_role)
    initial_variables = jax.device_get({"params": view0.params, "batch_stats": view0.batch_stats})
    step_fns = {p.index: jax.jit(p.step, in_shardings=(replicated, data_sharding, replicated),
                                 out_shardings=(replicated, replicated), donate_argnums=(0,)) for p in phases}
    enter_fns = {p.index: jax.jit(p.enter, out_shardings=replicated) for p in phases if p.enter is not None}
    result = functools.partial(BackgroundInvarianceResult, model=plan.final_model, workdir=workdir, config=config,
                               initial_variables=initial_variables, image_shape=image_shape,
                               num_classes=num_classes, role=plan.final_role, plan=plan)

    # Checkpoint restore (verified, as the generic loop's), or the phase cache for a fresh run.
    ckpt = workdirs.Checkpoints(workdir, every=config.checkpoint_every, keep=config.get("keep_checkpoints", 2))
    writer = pbar = None
    failed = True
    try:
        latest = ckpt.latest_step() or 0
        if latest > total:
            raise workdirs.ResumeError(f"{workdir} holds a checkpoint at step {latest}, past this config's {total} "
                                       "steps (the phases' epochs): use a fresh workdir or the config it was made with")
        workdirs.check_resume(workdir, config, latest)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        start, restored, iterator, log_state = ckpt.restore_latest(abstract, iterator,
                                                                   fallback=config.get("restore_fallback", False))
        if restored is not None:
            state = restored
        log_state = log_state or workdirs.LogState(last_log_step=start)
        workdirs.record_launch(workdir, config, start, total)
        log_path = workdir / "metrics.jsonl"
        records = [r for r in _read_records(log_path) if r.get("step", 0) <= start]  # drop what the last launch lost
        cache = pathlib.Path(settings.phase_cache) if settings.phase_cache else None
        if cache is not None and not cache.is_absolute():
            cache = workdir / cache
        keys = _cache_keys(config, plan, image_shape, num_classes)
        roles_after = []
        for phase in phases:
            roles_after.append(tuple(dict.fromkeys((roles_after[-1] if roles_after else ()) + phase.roles)))
        if cache is not None and start == 0:
            for phase, key, roles in reversed(list(zip(phases, keys, roles_after))):
                if key is None or phase.end == 0:
                    continue
                loaded = _load_cache(_cache_dir(cache, phase, key), key, state, roles, iterator)
                if loaded is not None:
                    state, iterator, records = loaded
                    state = jax.device_put(state, replicated)
                    start = int(state.step)
                    ckpt.save(start, state, iterator, workdirs.LogState(last_log_step=start), force=True)
                    logging.info("%s: phases 1-%d from the phase cache %s (step %d)", workdir, phase.index, cache, start)
                    break
        if is_main:
            _write_records(log_path, records)

        # Previews (phase 3): fixed test images and noise key, at fixed steps.
        adversarial = next((p for p in phases if p.name == "adversarial"), None)
        preview_fn = preview_images = None
        preview_steps: set[int] = set()
        stored_previews: dict[str, list] = {"steps": [], "soft_mask": [], "mask": [], "background": [], "composite": []}
        if adversarial is not None:
            preview_images = _preview_images(test_source, config, settings.preview_examples)
            preview_key = jax.random.key(0)
            preview_fn = jax.jit(lambda s, x: bi.phase3_preview(plan.models, s, x, preview_key, settings))
            if settings.previews and adversarial.end > adversarial.begin:
                preview_steps = {int(round(s)) for s in np.linspace(adversarial.begin + 1, adversarial.end,
                                                                     settings.previews)}
            path = workdir / PREVIEW_FILE
            if path.exists():
                old = np.load(path)
                keep = old["steps"] <= start
                stored_previews = {k: list(old[k][keep]) for k in stored_previews}

        def save_previews():
            if not is_main:
                return
            arrays = {k: np.asarray(v) for k, v in stored_previews.items()}
            tmp = workdir / (PREVIEW_FILE + ".tmp.npz")
            np.savez_compressed(tmp, image=preview_images, **arrays)
            os.replace(tmp, workdir / PREVIEW_FILE)

        # Loop.
        launch_start = start
        last_log = log_state.last_log_step
        writer = workdirs.MetricsLog(workdir, is_main)
        history: list[dict[str, float]] = []
        key = jax.random.key(config.seed + 1)
        pbar = tqdm(total=total, initial=start, disable=not (progress and is_main), desc=progress if isinstance(progress, str) else workdir.name,
                    dynamic_ncols=True, leave=False)
        t0 = time.time()
        for phase, key_desc, roles in zip(phases, keys, roles_after):
            if start >= phase.end and phase.end > phase.begin:
                continue
            if start == phase.begin and phase.enter is not None:
                state = enter_fns[phase.index](state)
            step_fn = step_fns[phase.index]
            # The metrics of the steps since the last log line come back with a checkpoint inside this phase, so
            # that a resumed run logs exactly what an uninterrupted one does.
            pending = list(log_state.pending) if phase.begin < start < phase.end else []
            for step in range(max(start, phase.begin) + 1, phase.end + 1):
                batch = next(iterator)
                train_lib.check_batch(batch, num_classes, where=f"train step {step} ({workdir})")
                batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch)
                state, metrics = step_fn(state, batch, key)
                pending.append(metrics)
                pbar.update(1)
                if step % config.log_every == 0 or step == phase.end:
                    summary = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
                    pending, last_log = [], step
                    if config.get("eval_every") and (step % config.eval_every == 0 or step == phase.end) \
                            and len(val_idx):
                        summary["val_accuracy"] = train_lib.evaluate_accuracy(
                            phase.model, classifier_view(state, phase.role), train_source, val_idx, config, mesh)
                    summary["phase"] = phase.index
                    writer.write(step, summary)
                    history.append({"step": step, **summary})
                    records.append({"step": step, **summary})
                    pbar.set_postfix(phase=phase.name, loss=f"{summary['loss']:.3f}",
                                     acc=f"{summary['accuracy']:.3f}")
                    bad = [k for k, v in summary.items() if not np.isfinite(v)]
                    if bad:
                        raise FloatingPointError(f"{bad} became non-finite at step {step} (phase {phase.name}, "
                                                 f"{workdir}); lower the learning rates or check the inputs")
                if step in preview_steps:
                    shown = jax.device_get(preview_fn(state, preview_images))
                    stored_previews["steps"].append(step)
                    for k in ("soft_mask", "mask", "background", "composite"):
                        stored_previews[k].append(np.asarray(shown[k]))
                    save_previews()
                if ckpt.should_save(step, force=step == phase.end):
                    log = workdirs.LogState(last_log, [{k: float(v) for k, v in m.items()} for m in pending])
                    ckpt.save(step, state, iterator, log, force=step == phase.end)
            start = max(start, phase.end)
            if cache is not None and key_desc is not None and phase.end > phase.begin:
                _save_cache(_cache_dir(cache, phase, key_desc), key_desc, state, roles, iterator,
                            [r for r in records if r["step"] <= phase.end], is_main)
        ckpt.wait()
        failed = False
    finally:
        # Every exit path: commit the in-flight checkpoint and close the manager (as the generic loop does).
        if pbar is not None:
            pbar.close()
        ckpt.close(quiet=failed)
        if writer is not None:
            writer.close()

    # Figures.
    if is_main and adversarial is not None:
        shown = jax.device_get(preview_fn(state, preview_images))
        write_figures(workdir, {"image": preview_images, **shown})
    train_seconds = time.time() - t0 if total > launch_start else 0.0
    return result(state=classifier_view(state, plan.final_role), history=history, train_seconds=train_seconds,
                  full_state=state)


def _register():
    from saliency_jax.trainers import register_trainer

    register_trainer("background_invariance", check)(train)


_register()
