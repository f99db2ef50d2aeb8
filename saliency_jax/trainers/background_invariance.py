r"""The trainer of background-invariant training (Cruz & Cardoso) and of its Attention baseline (Guan et al.).

Cruz, Prates, Simas Filho, Pinto Costa, Cardoso, "Background Invariance by Adversarial Learning", ICPR 2020 (poster:
"Training a CNN to be background invariant"). The method trains three models - the classifier ``f``, the mask
generator ``f_m`` (a U-Net) and the background generator ``f_b`` - each with its own Adam, in the three phases of the
authors' ``train1.py`` / ``train2.py`` / ``train3.py``; the steps, losses and networks are in
:mod:`saliency_jax.training.background_invariance` and :mod:`saliency_jax.models.background_invariance`. This module
builds the method's :class:`~saliency_jax.plan.Plan` - several models and optimizers in one state
(:class:`~saliency_jax.training.background_invariance.BackgroundInvarianceState`: every model's parameters and
optimizer state, one checkpoint), phases that change which model trains, a min-max phase updating two players every
step - and the one loop (:func:`saliency_jax.train.run_plan`) runs it with the mesh, input, verified checkpoints,
metrics log, guard and phase cache of every run. Phase 1 (and the Attention baseline's stage 2) is the generic step
of :func:`saliency_jax.training.make_train_step` (plain softmax cross-entropy, with its non-finite guard) on the
classifier's part of the state; phases 2 and 3 are the method's own steps.

Methods (``config.background_invariance.method``), each a list of phases run one after the other on one step counter
and one data stream (``config.batch_size`` per step):

==============  ====================================================================================================
``classifier``  phase 1 alone: the "Vanilla CNN" row of Table 1 (``train1.py``).
``adversarial`` phase 1, phase 2 (the U-Net's masks; skipped with ``mask="heuristic"``), phase 3 (the classifier
                against the background generator, both updated every step; the classifier's Adam starts afresh,
                as the authors' ``train3.py`` compiles the loaded classifier anew: ``phase3_optimizer``): the
                "Proposal" row.
``attention``   Guan et al. 2018 as the authors ran it (``train_att.py``): stage 1 = phase 1 (the global CNN
                ``G``, a :class:`~saliency_jax.models.VanillaCNN`), then stage 2: ``G`` frozen, the crop branch and
                the fusion layers of :class:`~saliency_jax.models.AttentionCNN` trained (``config.model.name =
                "attention_cnn"``): the "Attention" row.
==============  ====================================================================================================

Each phase lasts ``ceil(epochs * num_train / batch_size)`` steps (``classifier_epochs``, ``mask_epochs``,
``adversarial_epochs``, ``attention_epochs``). A step's randomness is ``fold_in(key(seed + 1), step)``, so a run is a
deterministic function of its config: a run killed and relaunched on its workdir resumes from the latest checkpoint
and continues bit-identically; a phase boundary is always checkpointed. The run's
:class:`~saliency_jax.plan.TrainResult` has the final classifier as ``model`` and ``state`` (the
:class:`~saliency_jax.models.AttentionCNN` for ``attention``), so every evaluator works on it unchanged, and every
model by name (``run.models``, ``run.model_state("mask_generator")``).

Phase cache (``phase_cache``, a folder; relative paths are relative to the run's workdir): the state after a
``classifier`` or ``mask`` phase is stored there under a digest of everything that determines it (seed, dataset,
batch size, image shape, and each phase so far: its network, initial weights, optimizer, losses' settings and
number of steps), with the data iterator's position and the phase's ``metrics.jsonl`` records. A fresh run whose
first phases have the same digest starts from there instead of training them again: the Vanilla CNN arm's phase 1
is the Attention arm's stage 1 and the Proposal's phase 1, and arms that differ only in phase 3 share phases 1-2. The
result is the state those phases would compute (the same jitted computation from the same inputs); the MNIST config
enables it. Code changes between launches are not part of the digest (as for the run's own checkpoints). The cache
itself is the loop's (:class:`~saliency_jax.plan.PhaseCache`); this plan gives its key and the state's parts.

Figures (``adversarial``, the plan's hooks): ``previews`` snapshots of what phase 3 trains on are taken along phase 3
with a fixed noise key and fixed test images (:func:`~saliency_jax.training.background_invariance.phase3_preview`), kept in
``previews.npz``; at the end the trainer writes ``backgrounds_along_training.png`` (the composites at each snapshot:
the poster's Fig. 4) and ``masks.png`` (image, the U-Net's soft mask, the binarised mask, a generated background and
the composite, with the final weights).

Where this differs from the loop before it was shared (e840573): phase 1 draws a model's dropout keys as the
generic step does (``split(fold_in(key, step))[1]``, not ``fold_in(key, step)``); the networks of the MNIST
configs have no dropout, so their runs are bit-identical (tests/test_recorded.py).

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
import math
import os
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from saliency_jax.config import Settings
from saliency_jax.data import pipeline
from saliency_jax.evaluation.backgrounds import image_grid
from saliency_jax.models.background_invariance import BackgroundGenerator, UNet, VanillaCNN
from saliency_jax.models.build import build_model
from saliency_jax.plan import Hooks, Phase, PhaseCache, Plan, TrainResult
from saliency_jax.trainers.base import classifier_variables, register_trainer
from saliency_jax.training import background_invariance as bi
from saliency_jax.training.scheme import Scheme
from saliency_jax.training.step import TrainState, make_train_step

Array = jax.Array

__all__ = [
    "METHODS",
    "BackgroundInvarianceTrainerSettings",
    "BackgroundInvarianceResult",
    "settings_section",
    "trainer_settings",
    "check",
    "build_plan",
    "phase_steps",
    "classifier_view",
    "write_figures",
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


def phase_steps(epochs: float, num_train: int, batch_size: int) -> int:
    """``ceil(epochs * num_train / batch_size)`` steps (0 for 0 epochs)."""
    return int(math.ceil(float(epochs) * int(num_train) / int(batch_size) - 1e-9)) if epochs > 0 else 0


def classifier_view(state: bi.BackgroundInvarianceState, role: str = "classifier") -> TrainState:
    """One role of the state as a :class:`~saliency_jax.training.TrainState` (what evaluators read).

    The state's ``batch_stats`` belong to the classifier (role ``"classifier"``); other roles have none.
    """
    return TrainState(step=state.step, params=state.params[role],
                      batch_stats=state.batch_stats if role == "classifier" else {},
                      opt_state=state.opt_state[role])


def _generic_step_on_role(model: nn.Module, optimizer: optax.GradientTransformation, role: str) -> bi.Step:
    """:func:`saliency_jax.training.make_train_step` (plain softmax cross-entropy, its non-finite guard) applied to
    one role of the state; the classifier's BatchNorm statistics are the state's, other roles have none."""
    step = make_train_step(model, optimizer, Scheme())

    def wrapped(state, batch, key):
        new, metrics = step(classifier_view(state, role), batch, key)
        return state.replace(step=new.step, params={**state.params, role: new.params},
                             batch_stats=new.batch_stats if role == "classifier" else state.batch_stats,
                             opt_state={**state.opt_state, role: new.opt_state}), metrics

    return wrapped


def _with_loss(step: bi.Step) -> bi.Step:
    """Phase 3's metrics with ``loss`` = the classifier's loss (the key every phase logs)."""

    def wrapped(state, batch, key):
        state, metrics = step(state, batch, key)
        return state, {"loss": metrics["classifier_loss"], **metrics}

    return wrapped


def _sub_state(state: bi.BackgroundInvarianceState, roles) -> dict[str, Any]:
    return {"step": state.step, "batch_stats": state.batch_stats,
            "params": {r: state.params[r] for r in roles}, "opt_state": {r: state.opt_state[r] for r in roles}}


def _merge_sub_state(state: bi.BackgroundInvarianceState, sub: Mapping[str, Any]) -> bi.BackgroundInvarianceState:
    return state.replace(step=sub["step"], batch_stats=sub["batch_stats"], params={**state.params, **sub["params"]},
                         opt_state={**state.opt_state, **sub["opt_state"]})


@register_trainer("background_invariance", check=check, classifier=build_model)
def build_plan(config: ml_collections.ConfigDict, data) -> Plan:
    """The models, optimizers, phases and hooks of ``config.background_invariance.method`` for a run.

    Args:
      config: the run config (``config.model`` names the classifier; ``"attention_cnn"`` for the Attention
        baseline, whose stage-1 global CNN is a :class:`~saliency_jax.models.VanillaCNN` of its ``base_features``
        and ``dense_features``).
      data: the run's :class:`~saliency_jax.data.inputs.RunData` (shapes, the number of training examples for the
        phases' lengths, the test split for the previews).

    Raises:
      ValueError: as :func:`check`, or as the networks (e.g. an image size the background generator cannot produce).
      FileNotFoundError: ``config.model.pretrained`` names no file.
    """
    settings = check(config)
    image_shape = tuple(int(s) for s in data.image_shape)
    num_classes, num_train = int(data.num_classes), len(data.train_indices)
    batch = int(config.batch_size)
    optimizers = dict(bi.make_optimizers(settings))
    extra: dict[str, nn.Module] = {}
    if settings.method == "attention":
        final = build_model(config, num_classes)
        classifier = VanillaCNN(num_classes, final.base_features, final.dense_features)
        models = bi.BackgroundInvarianceModels(classifier)
        extra["attention"] = final
        optimizers["attention"] = bi.attention_optimizer(
            optax.adam(settings.classifier_learning_rate, eps=settings.adam_eps))
    else:
        classifier = build_model(config, num_classes)
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
    by_role = {r: getattr(models, r) for r in ("classifier", "mask_generator", "background_generator")
               if getattr(models, r) is not None} | extra

    phases: list[Phase] = []

    def add(name, epochs, step, role, roles, enter=None, signature=None, guarded=False):
        begin = phases[-1].end if phases else 0
        end = begin + phase_steps(epochs, num_train, batch)
        if signature is not None:
            signature = {"phase": name, "steps": end - begin, **signature}
        phases.append(Phase(name, len(phases) + 1, begin, end, step, role, roles, enter, signature, guarded))

    add("classifier", settings.classifier_epochs, _generic_step_on_role(classifier, optimizers["classifier"],
                                                                        "classifier"),
        "classifier", ("classifier",),
        signature={"model": repr(classifier), "pretrained": str(config.model.get("pretrained") or ""),
                   "learning_rate": settings.classifier_learning_rate, "adam_eps": settings.adam_eps}, guarded=True)
    if settings.method == "adversarial":
        if models.mask_generator is not None:
            add("mask", settings.mask_epochs, bi.make_mask_step(models, optimizers, settings), "classifier",
                ("mask_generator",),
                signature={"model": repr(models.mask_generator), "learning_rate": settings.mask_learning_rate,
                           "adam_eps": settings.adam_eps, "area": settings.area,
                           "total_variation": settings.total_variation, "area_loss": settings.area_loss})
        roles = ("classifier",) + (("background_generator",) if models.background_generator is not None else ())

        def fresh_classifier_optimizer(state):  # the authors' train3.py: the phase-1 classifier with a new Adam
            return state.replace(opt_state={**state.opt_state,
                                            "classifier": optimizers["classifier"].init(state.params["classifier"])})

        add("adversarial", settings.adversarial_epochs,
            _with_loss(bi.make_adversarial_step(models, optimizers, settings)), "classifier", roles,
            enter=fresh_classifier_optimizer if settings.phase3_optimizer == "fresh" else None)
    elif settings.method == "attention":
        def enter(state):
            return state.replace(params={**state.params, "attention": bi.with_global_params(
                state.params["attention"], state.params["classifier"])})

        add("attention", settings.attention_epochs,
            _generic_step_on_role(extra["attention"], optimizers["attention"], "attention"), "attention",
            ("attention",), enter=enter, guarded=True)

    init_key = jax.random.key(config.seed)

    def init_state(classifier_variables):
        """:func:`~saliency_jax.training.background_invariance.init_state` (the classifier from its variables, the
        U-Net and generator from ``split(key, 3)``) plus each extra role's ``init`` from ``fold_in(key, 3 + i)``;
        every role's initial weights are the same in every method."""
        state = bi.init_state(models, optimizers, image_shape, init_key, classifier_variables=classifier_variables)
        params, opt_state = dict(state.params), dict(state.opt_state)
        x = jnp.zeros((1, *image_shape), jnp.float32)
        for i, (role, module) in enumerate(extra.items()):
            params[role] = module.init(jax.random.fold_in(init_key, 3 + i), x, train=False)["params"]
            opt_state[role] = optimizers[role].init(params[role])
        return state.replace(params=params, opt_state=opt_state)

    cache = None
    if settings.phase_cache:
        cache = PhaseCache(pathlib.Path(settings.phase_cache),
                           {"seed": int(config.seed), "dataset": config.dataset.to_dict(),
                            "batch_size": int(config.batch_size), "image_shape": list(image_shape),
                            "num_classes": num_classes},
                           _sub_state, _merge_sub_state)
    adversarial = next((p for p in phases if p.name == "adversarial"), None)
    hooks = _preview_hooks(models, settings, adversarial, data.test_source, config) if adversarial else Hooks()
    return Plan(phases=tuple(phases), models=by_role,
                init_variables=lambda: classifier_variables(config, classifier, image_shape,
                                                            jax.random.split(init_key, 3)[0], skip_head=True),
                init_state=init_state, view=classifier_view, image_shape=image_shape, num_classes=num_classes,
                final_role="attention" if extra else "classifier", log_phase=True, hooks=hooks, cache=cache)


BackgroundInvarianceResult = TrainResult
"""The run of this trainer: a :class:`~saliency_jax.plan.TrainResult` (``full_state``: the whole
:class:`~saliency_jax.training.background_invariance.BackgroundInvarianceState`; ``role``: the final classifier's)."""


def _preview_hooks(models: bi.BackgroundInvarianceModels, settings: BackgroundInvarianceTrainerSettings,
                   adversarial: Phase, test_source, config: ml_collections.ConfigDict) -> Hooks:
    """Phase 3's previews (fixed test images and noise key, at fixed steps, kept in ``previews.npz``) and the final
    figures, as the plan's hooks."""
    key = jax.random.key(0)
    preview_fn = jax.jit(lambda s, x: bi.phase3_preview(models, s, x, key, settings))
    steps: set[int] = set()
    if settings.previews and adversarial.end > adversarial.begin:
        steps = {int(round(s)) for s in np.linspace(adversarial.begin + 1, adversarial.end, settings.previews)}
    fields = ("soft_mask", "mask", "background", "composite")
    stored: dict[str, list] = {"steps": [], **{k: [] for k in fields}}
    is_main = jax.process_index() == 0

    images = None

    def start(workdir, start_step):
        nonlocal images
        images = _preview_images(test_source, config, settings.preview_examples)
        stored.update({"steps": [], **{k: [] for k in fields}})
        path = workdir / PREVIEW_FILE
        if path.exists():
            old = np.load(path)
            keep = old["steps"] <= start_step
            stored.update({k: list(old[k][keep]) for k in stored})

    def after_step(workdir, step, state):
        if step not in steps:
            return
        shown = jax.device_get(preview_fn(state, images))
        stored["steps"].append(step)
        for k in fields:
            stored[k].append(np.asarray(shown[k]))
        if is_main:
            tmp = workdir / (PREVIEW_FILE + ".tmp.npz")
            np.savez_compressed(tmp, image=images, **{k: np.asarray(v) for k, v in stored.items()})
            os.replace(tmp, workdir / PREVIEW_FILE)

    def finish(workdir, state):
        if is_main:
            shown = jax.device_get(preview_fn(state, images))
            write_figures(workdir, {"image": images, **shown})

    return Hooks(start, after_step, finish)


# ----------------------------------------------------------------------------------------------------------------
# Figures.


def _preview_images(source, config, n: int) -> np.ndarray:
    """``n`` test images spread evenly over the split (the same for every arm)."""
    n = min(int(n), len(source))
    idx = np.linspace(0, len(source) - 1, n).astype(int)
    batch = next(iter(pipeline.make_eval_batches(source, idx, batch_size=n,
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
