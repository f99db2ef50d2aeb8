"""Guided Zoom and Ensemble Guided Zoom as an evaluator of a trained run (``"guided_zoom"``).

Bargal, "Grounding deep models of visual data", PhD thesis, Boston University 2019, Chapter 6 (Bargal, Zunino et
al., BMVC 2019). The run is the *conventional CNN*; for it this evaluator

1. writes the **evidence pool** of its training images (Algorithm 1; :mod:`saliency_jax.evaluation.guided_zoom`)
   into ``run.workdir/guided_zoom/`` as ``.npz`` archives (:class:`saliency_jax.data.evidence_pool.EvidencePoolWriter`,
   atomic); ``"GZ"``: cEB with ``L`` adversarial-erasing rounds; ``"EGZ"`` (Eq. 6.1): the union of the cEB, Grad-CAM
   and RISE pools with ``L = 0``. A pool is reused by a rerun when its fingerprint (the conventional CNN's weights and
   every setting the pool depends on) matches the one stored beside it and its content (labels, patches, names)
   still has the digest it was written with (:func:`saliency_jax.data.evidence_pool.verify_evidence_pool`); a pool
   whose content changed is rebuilt, with a warning naming the file;
2. trains an **Evidence CNN** on each pool through the generic loop (:func:`saliency_jax.train.train` with a config
   derived from the run's: ``dataset.name = "npz"`` on the pool, its own workdir beside the pool, named after the
   pool's fingerprint and content digest, so a rerun
   resumes or reuses it);
3. **refines** the test split (Algorithm 2): for each test image the conventional CNN's top-``K`` classes
   (``K = max(ks)``), the evidence patch of each class and its ``L`` erased successors, the Evidence CNN's score of
   the class on them, ``tot = w p_conv + sum_l w_l p_ev,l``; the refined class for every ``k`` in ``ks`` is the
   argmax over the first ``k`` (a class's score does not depend on ``k``), all in one jitted call per batch.

Resolution (the zoom): the conventional CNN sees ``config.dataset.image_size`` pixels; patches are cut from the
*originals*, the same images at the dataset's stored resolution (``original_size = 0``; for image folders, which
have no single stored size, ``original_size = image_size``: the conventional input itself, as in the thesis).
The evaluator reads only the originals (:func:`native_source`, loaded once per experiment through
``ExperimentData.cached``) and makes the conventional CNN's view of them with :func:`conventional_images`, the
resize the data pipeline applies when the run trains (:func:`saliency_jax.data.augment.resize` per image), so the
maps, peaks, erasing and classification of the pool see exactly the pixels the CNN was trained on.

Ensemble Guided Zoom at test time: the thesis does not say which grounding method Algorithm 2 uses with the
ensemble pool, and the released code has one test script per method (``save_softmax.py`` for cEB,
``gradcam_save_softmax.py``, ``rise_save_softmax.py``), each with ``L = 2`` erasing rounds. The thesis compares the
two *pool generation* approaches ("both pool generation techniques improve a base model's prediction accuracy
similarly"), so by default EGZ refines with the same test-time procedure as GZ (cEB, ``L = len(evidence_weights) -
1``) and differs only in the pool its Evidence CNN was trained on; the test patches are then computed once and go
through both Evidence CNNs. ``ensemble_test_grounding = "Grad-CAM"`` or ``"RISE"`` selects another method.

Batch norm (``ceb_batch_norm``): the authors' pool generator (``caffe/evidence_pool_generation.py``) corrects the
signs of the convolutions whose batch-norm scale is negative before computing the pool's cEB maps, and their test-time
script (``save_softmax.py``) does not. Here ``"fold"`` (the default) computes the pool's cEB maps on the conventional
CNN with every batch norm folded into the convolution before it
(:func:`saliency_jax.saliency.excitation_backprop.fold_batch_norm`: the same EB signal as their sign flip, the forward
pass unchanged), while Algorithm 2's test-time cEB and the Grad-CAM / RISE pools use the network as trained;
``"pass"`` computes the pool's cEB maps with the batch norms passing the signal unchanged, as everywhere else. A
network without batch norm, or whose batch-norm scales are all positive, gets the same pools either way (EB is blind
to a positive factor per channel). Measured (``experiments/batch_norm_fold.py``): the conventional CNN of
``guided_zoom_cifar10.py`` after 2000 steps has no negative scale (min 0.88), so its pool maps do not change
(relative L1 of the cEB maps at ``conv2`` on 2000 training images 8.7e-7, float rounding; no peak moved); on the test's
network with a third of the scales negative the cEB maps change by a relative L1 of 0.61-0.86 (three draws, two
layers). Whether and how much the authors' fine-grained ResNet-101s change depends on their negative scales,
which their script tests for; no such weights are here to measure.

Metrics: ``conventional`` top-1/3/5 accuracy (and top-``k`` for each ``k``); ``refined[pool][k]`` top-1 after
refinement; ``evidence[pool]``: pool size and patches per round / method, the Evidence CNN's accuracy on its
held-out pool patches (``val_accuracy``) and on the test images' patches of their true class per round
(``test_patch_accuracy``, over the images whose class is among the top ``K``); seconds per phase.
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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from saliency_jax import data as data_lib
from saliency_jax.data import inputs
from saliency_jax.evaluation.predict import evaluate_accuracy
from saliency_jax.data import augment
from saliency_jax.data.evidence_pool import EvidencePoolError, EvidencePoolWriter, verify_evidence_pool
from saliency_jax.evaluation import guided_zoom as gz
from saliency_jax.evaluation.figures import evidence_pool_figure
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, Stage, linen_module,
                                          register_evaluator, run_model)
from saliency_jax.models.build import model_layers
from saliency_jax.saliency import fold_batch_norm, linen_view

__all__ = ["BATCH_NORM_RULES", "CEB_LAYERS", "GROUNDINGS", "POOLS", "GuidedZoomSettings", "conventional_images",
           "evidence_config", "guided_zoom_evaluator", "native_source", "pool_sizes"]

#: The evidence pools the evaluator can build: Guided Zoom (cEB + adversarial erasing) and Ensemble Guided Zoom.
POOLS: tuple[str, ...] = ("GZ", "EGZ")
#: Grounding methods, in Ensemble Guided Zoom's pool order (Eq. 6.1); the names stored in the pool archives.
GROUNDINGS: tuple[str, ...] = ("cEB", "Grad-CAM", "RISE")
#: The key of :data:`saliency_jax.saliency.METHODS` each grounding computes its maps with
#: (:func:`saliency_jax.evaluation.guided_zoom.saliency_grounding`).
_GROUNDING_METHODS: dict[str, str] = {"cEB": "contrastive_excitation_backprop", "Grad-CAM": "grad_cam",
                                      "RISE": "rise"}
#: How the pool's cEB maps treat batch norm: ``"fold"`` (the authors' pool generator; folded into the conv before
#: it) or ``"pass"`` (the signal passes batch norm unchanged, as at test time).
BATCH_NORM_RULES: tuple[str, ...] = ("fold", "pass")
#: Default cEB layer per architecture: a middle layer (the released code reads ResNet-101's ``res4a``, the first
#: block of stage 4 = ``layer3/0`` here, stride 16); ``conv2`` (stride 2) for the small CNN.
CEB_LAYERS: dict[str, str] = {
    "small_cnn": "conv2",
    **{f"resnet{d}": "layer3/0" for d in (18, 34, 50, 101, 152)},
}


@dataclasses.dataclass(frozen=True)
class GuidedZoomSettings(EvaluatorSettings):
    """Settings of the ``"guided_zoom"`` evaluator (Bargal 2019, Ch. 6).

    Attributes:
      pools: which pools to build, train an Evidence CNN on and refine with: ``"GZ"`` and / or ``"EGZ"``.
      patch_ratio: patch side / original image side (thesis 150 / 448).
      erase_ratio: erased square side / conventional input side (thesis 85 / 448).
      evidence_size: the Evidence CNN's input side (patches are resized to it); 0: the patch side (no resampling).
      original_size: side of the originals patches are cut from: 0, the dataset's stored images (the zoom when the
        run trains on downsampled ones), or ``dataset.image_size`` (image folders: the conventional input itself).
      num_erasures: ``L`` of Guided Zoom's pool (Algorithm 1).
      border: ``"truncate"`` (released code: border windows cut and stretched) or ``"shift"`` (full windows).
      method: patch resampling, ``"cubic"`` (released code) or ``"linear"``.
      require_correct_first: gate round 0 on the un-erased image's classification too (Algorithm 1's text; the
        released code adds every training image's first patch).
      ceb_layer: cEB's layer ("": :data:`CEB_LAYERS` of the architecture).
      ceb_batch_norm: batch norm in the *pool's* cEB maps (Algorithm 1): ``"fold"`` (default; the authors' pool
        generator: every batch norm folded into the conv before it, :func:`~saliency_jax.saliency.fold_batch_norm`)
        or ``"pass"`` (the signal passes batch norm unchanged). The test-time cEB of Algorithm 2 always passes
        (the authors' ``save_softmax.py`` does not fold).
      grad_cam_layer: Grad-CAM's layer ("": ``config.model``'s Grad-CAM layer, the last conv block).
      rise_masks, rise_grid, rise_p: RISE's ``N``, grid ``s`` and keep probability (released code: 1000, 8, 0.5).
      rise_masks_per_step: masks evaluated per ``vmap`` chunk (memory vs speed; results do not depend on it).
      ensemble_test_grounding: the grounding method of Algorithm 2 for the EGZ Evidence CNN (module docstring).
      ks: the numbers of top classes refined over (thesis: 3 and 5).
      conventional_weight: ``w`` of Algorithm 2 (0.4).
      evidence_weights: ``(w_0, .., w_L)`` (0.3, 0.2, 0.1); ``L = len - 1`` erasing rounds at test time.
      score: ``"probability"`` (softmax; thesis, PyTorch release) or ``"logit"`` (Caffe release).
      evidence_model: the Evidence CNN's architecture ("": the run's ``config.model``, kwargs included).
      evidence_pretrained: weights file the Evidence CNN starts from ("": random initialisation).
      evidence_optimizer: ``"adam"`` / ``"sgd"`` ("": the run's ``config.optimizer``).
      evidence_learning_rate: 0: the run's.
      evidence_steps: the Evidence CNN's training steps.
      evidence_batch_size: 0: the run's ``batch_size``.
      evidence_val_fraction: pool patches held out to measure the Evidence CNN (``val_accuracy``).
      pool_examples: training images the pool is built from (a seeded subset of the run's training indices; 0: all).
      test_examples: test images refined (a seeded subset; 0: the whole test split).
      batch_size: images per jitted call (0: ``config.eval_batch_size``).
      figure_examples: training images in the pool figure (Figs. 6.3-6.5).
      seed: seed of RISE's masks and of the subsets.
    """

    pools: tuple[str, ...] = POOLS
    patch_ratio: float = gz.PATCH_RATIO
    erase_ratio: float = gz.ERASE_RATIO
    evidence_size: int = 0
    original_size: int = 0
    num_erasures: int = gz.NUM_ERASURES
    border: str = "truncate"
    method: str = "cubic"
    require_correct_first: bool = False
    ceb_layer: str = ""
    ceb_batch_norm: str = "fold"
    grad_cam_layer: str = ""
    rise_masks: int = 1000
    rise_grid: int = 8
    rise_p: float = 0.5
    rise_masks_per_step: int = 10
    ensemble_test_grounding: str = "cEB"
    ks: tuple[int, ...] = (3, 5)
    conventional_weight: float = gz.CONVENTIONAL_WEIGHT
    evidence_weights: tuple[float, ...] = gz.EVIDENCE_WEIGHTS
    score: str = "probability"
    evidence_model: str = ""
    evidence_pretrained: str = ""
    evidence_optimizer: str = ""
    evidence_learning_rate: float = 0.0
    evidence_steps: int = 1000
    evidence_batch_size: int = 0
    evidence_val_fraction: float = 0.05
    pool_examples: int = 0
    test_examples: int = 0
    batch_size: int = 0
    figure_examples: int = 8
    seed: int = 0

    def __post_init__(self):
        def fail(field, message):
            raise ValueError(f"guided_zoom.{field}: {message}; got {getattr(self, field)!r}")

        def positive_int(field, minimum=1):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                fail(field, f"must be an int >= {minimum}")

        pools = tuple(self.pools)
        if not pools or any(p not in POOLS for p in pools) or len(set(pools)) != len(pools):
            fail("pools", f"must be distinct names from {POOLS}")
        for field in ("patch_ratio", "erase_ratio", "rise_p"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                fail(field, "must lie in (0, 1]")
        for field in ("evidence_size", "original_size", "num_erasures", "evidence_batch_size", "pool_examples",
                      "test_examples", "batch_size", "figure_examples"):
            positive_int(field, 0)
        for field in ("rise_masks", "rise_masks_per_step", "evidence_steps"):
            positive_int(field)
        positive_int("rise_grid", 2)
        if self.border not in gz.BORDERS:
            fail("border", f"must be one of {gz.BORDERS}")
        if self.method not in gz.RESAMPLING:
            fail("method", f"must be one of {gz.RESAMPLING}")
        if self.score not in gz.SCORES:
            fail("score", f"must be one of {gz.SCORES}")
        if self.ceb_batch_norm not in BATCH_NORM_RULES:
            fail("ceb_batch_norm", f"must be one of {BATCH_NORM_RULES}")
        if self.ensemble_test_grounding not in GROUNDINGS:
            fail("ensemble_test_grounding", f"must be one of {GROUNDINGS}")
        ks = tuple(self.ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            fail("ks", "must be a non-empty tuple of ints >= 1")
        weights = tuple(self.evidence_weights)
        if not weights or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
                              for w in weights):
            fail("evidence_weights", "must be a non-empty tuple of finite numbers (w_0, .., w_L)")
        if isinstance(self.conventional_weight, bool) or not isinstance(self.conventional_weight, (int, float)):
            fail("conventional_weight", "must be a number")
        if self.evidence_optimizer not in ("", "adam", "sgd"):
            fail("evidence_optimizer", "must be '', 'adam' or 'sgd'")
        if not 0.0 <= self.evidence_val_fraction < 1.0:
            fail("evidence_val_fraction", "must lie in [0, 1)")
        if self.evidence_learning_rate < 0:
            fail("evidence_learning_rate", "must be >= 0 (0: the run's)")


# ---------------------------------------------------------------------------------------------------------------
# Data: the originals and the conventional CNN's view of them.


def native_source(data, config: ml_collections.ConfigDict, split: str, original_size: int = 0):
    """The ``split`` of the run's dataset at the originals' resolution (read once per experiment).

    Args:
      data: the experiment's :class:`~saliency_jax.evaluators.ExperimentData`.
      config: the run's config (``config.dataset``).
      split: ``"train"`` or ``"test"``.
      original_size: 0: the stored images (``image_size=None``, the dataset's native resolution); else it must be
        ``config.dataset.image_size`` (image folders have no single stored size: patches are then cut from the
        conventional input itself, the thesis' setting of 150-px patches of the 448-px input).

    Raises:
      ValueError: ``original_size`` neither 0 nor ``dataset.image_size``.
    """
    ds = config.dataset
    if original_size and original_size != ds.get("image_size"):
        raise ValueError(f"guided_zoom.original_size must be 0 (the stored images) or the run's dataset.image_size "
                         f"({ds.get('image_size')}); got {original_size}: only then is the conventional CNN's view "
                         "of the originals exactly the pixels it was trained on")
    size = original_size or None
    key = ("guided_zoom/originals", ds.name, ds.get("data_dir"), split, size)
    return data.cached(key, lambda: data_lib.get_source(ds.name, split, data_dir=ds.get("data_dir"), image_size=size))


def conventional_images(originals: np.ndarray, image_size: int | None) -> np.ndarray:
    """What the conventional CNN sees of ``originals``: the data pipeline's resize (``augment.resize``, Pillow
    bilinear per image), the function a source with ``image_size`` applies to every item when the run trains.

    Args:
      originals: [n, H, W, channels] float32 in [0, 1].
      image_size: the run's ``config.dataset.image_size`` (None: the originals themselves).

    Returns:
      float32 [n, image_size, image_size, channels] in [0, 1] (``originals`` when no resize is needed).

    Raises:
      ValueError: ``originals`` not rank 4.
    """
    originals = np.asarray(originals, np.float32)
    if originals.ndim != 4:
        raise ValueError(f"originals must be [n, height, width, channels]; got shape {originals.shape}")
    if image_size is None or originals.shape[1:3] == (image_size, image_size):
        return originals
    if not len(originals):
        return np.zeros((0, image_size, image_size, originals.shape[3]), np.float32)
    return np.stack([augment.resize(image, image_size) for image in originals])


def pool_sizes(settings: GuidedZoomSettings, original_side: int, image_side: int) -> dict[str, int]:
    """Patch, erased-square and Evidence CNN input sides in pixels (originals, conventional input, patches)."""
    patch = gz.pixels(settings.patch_ratio, original_side)
    return {"patch": patch, "erase": gz.pixels(settings.erase_ratio, image_side),
            "output": settings.evidence_size or patch}


def _subset(indices: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if limit and limit < len(indices):
        return np.sort(np.random.default_rng(seed).choice(indices, limit, replace=False))
    return np.asarray(indices)


# ---------------------------------------------------------------------------------------------------------------
# The Evidence CNN's config.


def evidence_config(config: ml_collections.ConfigDict, settings: GuidedZoomSettings,
                    pool_path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The train config of the Evidence CNN: the run's config on the pool archive, plain training.

    ``dataset.name = "npz"`` with ``data_dir`` the pool (patches stored at the Evidence CNN's input size, so no
    resize), no subset / label noise / oversampling, ``val_fraction = evidence_val_fraction``; the run's
    augmentation, loss and optimizer section (``evidence_optimizer`` / ``evidence_learning_rate`` override name and
    rate); the run's model unless ``evidence_model`` names another; ``num_steps = evidence_steps``; no training
    scheme, no evaluators; the run's seed.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.dataset.name = "npz"
    c.dataset.data_dir = str(pathlib.Path(pool_path).absolute())
    c.dataset.image_size = None
    c.dataset.train_limit = 0
    c.dataset.label_noise = 0.0
    c.dataset.oversample = {}
    c.dataset.val_fraction = settings.evidence_val_fraction
    if settings.evidence_model:
        c.model.name = settings.evidence_model
        c.model.kwargs = {}
        c.model.grad_cam_layer = None
        c.model.classifier = None
    c.model.pretrained = settings.evidence_pretrained
    if settings.evidence_optimizer:
        c.optimizer.name = settings.evidence_optimizer
    if settings.evidence_learning_rate:
        c.optimizer.learning_rate = settings.evidence_learning_rate
    c.num_steps = settings.evidence_steps
    c.num_epochs = 0.0
    c.batch_size = settings.evidence_batch_size or config.batch_size
    c.schemes = ()
    c.evaluators = ()
    c.experiment.arms = (("evidence", {}),)
    c.experiment.repeats = 1
    return c


# ---------------------------------------------------------------------------------------------------------------
# Pools on disk.


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _weights_digest(variables: Any) -> str:
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(jax.device_get(variables)):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def _pool_fingerprint(name: str, settings: GuidedZoomSettings, config, layers: dict[str, str], weights: str,
                      sizes: dict[str, int], pool_indices: np.ndarray) -> dict[str, Any]:
    """Everything a pool's content depends on (not batch sizes: results do not depend on them)."""
    ds = config.dataset
    common = {"pool": name, "weights": weights, "dataset": [ds.name, ds.get("data_dir"), ds.get("image_size")],
              "original_size": settings.original_size, "sizes": sizes, "border": settings.border,
              "method": settings.method, "require_correct_first": settings.require_correct_first,
              "ceb_layer": layers["cEB"], "ceb_batch_norm": settings.ceb_batch_norm,
              "indices": _digest(np.asarray(pool_indices).tolist())}
    if name == "GZ":
        return {**common, "num_erasures": settings.num_erasures}
    return {**common, "grad_cam_layer": layers["Grad-CAM"], "rise": [settings.rise_masks, settings.rise_grid,
                                                                      settings.rise_p, settings.seed]}


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def _write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def _stale_pools(paths: dict[str, pathlib.Path], prints: dict[str, Any],
                 metas: dict[str, dict[str, Any]]) -> dict[str, pathlib.Path]:
    """The pools to (re)build: absent, of another fingerprint, or whose content is not what was written (its digest
    differs from the one sealed in it or recorded beside it; a warning names the file)."""
    stale = {}
    for name, path in paths.items():
        if not path.is_file() or metas[name].get("fingerprint") != prints[name]:
            stale[name] = path
            continue
        try:
            verify_evidence_pool(path, metas[name].get("content_sha256") or "<not recorded>")
        except (EvidencePoolError, OSError) as e:
            logging.warning("guided_zoom: %s; rebuilding the %s pool", e, name)
            stale[name] = path
    return stale


def _evidence_stages(config, settings: GuidedZoomSettings, root: pathlib.Path, paths: dict[str, pathlib.Path],
                     prints: dict[str, Any], metas: dict[str, dict[str, Any]]) -> dict[str, Stage]:
    """One Evidence CNN stage per pool, its workdir named after the pool's fingerprint, its content digest (as
    recorded beside it) and the Evidence CNN's settings: a pool rebuilt with other content gets another CNN."""
    stages = {}
    for name in settings.pools:
        cfg = evidence_config(config, settings, paths[name])
        fields = {k: cfg[k].to_dict() if isinstance(cfg[k], ml_collections.ConfigDict) else cfg[k]
                  for k in ("model", "optimizer", "dataset", "num_steps", "batch_size", "seed", "loss")}
        key = [prints[name], fields, metas[name].get("content_sha256")]
        stages[f"evidence_{name}"] = Stage(cfg, root / f"evidence_{name.lower()}-{_digest(key)}")
    return stages


def _grounding_fns(run, settings: GuidedZoomSettings, layers: dict[str, str]) -> dict[str, Any]:
    """``{grounding: Grounding}`` on views of the run's model, as Algorithm 2 uses them at test time: cEB and
    Grad-CAM at ``layers[name]``; RISE (masks from ``settings.seed``) on the logits."""
    options = {"RISE": dict(key=jax.random.key(settings.seed), num_masks=settings.rise_masks,
                            grid_size=settings.rise_grid, p=settings.rise_p,
                            masks_per_step=settings.rise_masks_per_step)}
    return {name: gz.saliency_grounding(_GROUNDING_METHODS[name],
                                        linen_view(linen_module(run, 'Guided Zoom'), run.variables, layers.get(name), train=False),
                                        **options.get(name, {}))
            for name in GROUNDINGS}


def _pool_grounding_fns(run, settings: GuidedZoomSettings, layers: dict[str, str], groundings) -> dict[str, Any]:
    """The groundings of the pools (Algorithm 1): the test-time ones, with cEB on the batch-norm-folded model when
    ``ceb_batch_norm == "fold"`` (the authors' pool generator)."""
    if settings.ceb_batch_norm == "pass":
        return groundings
    module = linen_module(run, 'Guided Zoom')
    folded = fold_batch_norm(module, run.variables, jnp.zeros((1, *run.image_shape), jnp.float32), train=False)
    return {**groundings, "cEB": gz.contrastive_eb_grounding(linen_view(module, folded, layers["cEB"], train=False))}


def _pool_functions(settings: GuidedZoomSettings, groundings, logits_fn, sizes) -> dict[str, Any]:
    """``{pool: jitted (images, labels, originals) -> EvidencePool}``."""
    common = dict(patch_size=sizes["patch"], output_size=sizes["output"], border=settings.border,
                  method=settings.method, require_correct_first=settings.require_correct_first)
    gz_fn = functools.partial(gz.evidence_pool, groundings["cEB"], logits_fn, erase_size=sizes["erase"],
                              num_erasures=settings.num_erasures, **common)
    egz_fn = functools.partial(gz.ensemble_evidence_pool, tuple(groundings[g] for g in GROUNDINGS), logits_fn,
                               num_erasures=0, **common)
    fns = {"GZ": gz_fn, "EGZ": egz_fn}
    return {name: jax.jit(lambda x, y, o, f=fns[name]: f(x, y, originals=o)) for name in settings.pools}


def _write_pools(paths: dict[str, pathlib.Path], fns, source, indices: np.ndarray, image_size, batch_size: int,
                 class_names) -> dict[str, str]:
    """Streams the pools of ``source[indices]`` into ``paths`` (one pass; every archive written atomically); returns
    ``{pool: content digest}`` (:func:`saliency_jax.data.evidence_pool.pool_content_digest`)."""
    writers = {name: EvidencePoolWriter(path, class_names=class_names,
                                        method_names=GROUNDINGS[:1] if name == "GZ" else GROUNDINGS)
               for name, path in paths.items()}
    try:
        batches = data_lib.make_eval_batches(source, indices, batch_size=batch_size)
        bar = tqdm(total=len(indices), desc="guided_zoom pool", dynamic_ncols=True, leave=False)
        for i, batch in enumerate(batches):
            keep = np.asarray(batch["mask"]).astype(bool)
            rows = np.zeros(batch_size, np.int64)
            chunk = indices[i * batch_size:(i + 1) * batch_size]
            rows[:len(chunk)] = chunk
            originals = np.asarray(batch["image"], np.float32)
            labels = np.asarray(batch["label"], np.int32)
            images = conventional_images(originals, image_size)
            for name, fn in fns.items():
                if name in writers:
                    pool = fn(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(originals))
                    valid = np.asarray(pool.valid) & keep[None]
                    writers[name].add_pool("train", pool._replace(valid=valid), labels, rows)
            bar.update(int(keep.sum()))
        bar.close()
        digests = {}
        for name in list(writers):
            writer = writers.pop(name)
            writer.close()
            digests[name] = writer.content_sha256
        return digests
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def _pool_stats(path: pathlib.Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as archive:
        rounds, methods = archive["round_train"], archive["method_train"]
        names = [str(m) for m in archive["method_names"]]
        images = len(np.unique(archive["index_train"]))
    stats = {"patches": int(len(rounds)), "images": int(images),
             "per_round": {f"l{int(r)}": int(np.sum(rounds == r)) for r in np.unique(rounds)}}
    if len(names) > 1:
        stats["per_method"] = {n: int(np.sum(methods == i)) for i, n in enumerate(names)}
    return stats


def _quantize(patches: jax.Array) -> jax.Array:
    """Test patches as the pool stores them (uint8): the Evidence CNN sees the same kind of pixels."""
    return jnp.round(jnp.clip(patches, 0.0, 1.0) * 255.0) / 255.0


# ---------------------------------------------------------------------------------------------------------------
# The evaluator.


def _layers(run, settings: GuidedZoomSettings) -> dict[str, str]:
    name = run.config.model.name
    ceb = settings.ceb_layer or CEB_LAYERS.get(name)
    if not ceb:
        raise ValueError(f"guided_zoom.ceb_layer: no default cEB layer for model {name!r}; set it (a middle layer, "
                         "e.g. 'layer3/0' of a ResNet)")
    return {"cEB": ceb, "Grad-CAM": settings.grad_cam_layer or model_layers(run.config).grad_cam_layer}


@register_evaluator("guided_zoom", GuidedZoomSettings)
def guided_zoom_evaluator(settings: GuidedZoomSettings) -> Evaluator:
    """Guided Zoom / Ensemble Guided Zoom on a trained conventional CNN: pools, Evidence CNNs, refined accuracy."""
    ks = tuple(sorted(set(int(k) for k in settings.ks)))
    num_rounds = len(settings.evidence_weights)  # L + 1 at test time

    def prepare(run, data):
        """What steps 1-2 need, from the trained run: the pools' paths (reused when their fingerprint matches) and
        the Evidence CNNs' configs and workdirs."""
        config = run.config
        image_size = config.dataset.get("image_size")
        layers = _layers(run, settings)
        train_native = native_source(data, config, "train", settings.original_size)
        test_native = native_source(data, config, "test", settings.original_size)
        class_names = list(getattr(train_native, "class_names", None)
                           or [str(i) for i in range(train_native.num_classes)])
        original_shape = data_lib.image_shape(train_native, None)
        if tuple(conventional_images(np.zeros((1, *original_shape), np.float32), image_size).shape[1:]) \
                != tuple(run.image_shape):
            raise ValueError(f"guided_zoom: the conventional view of the {original_shape} originals does not match "
                             f"the run's input {tuple(run.image_shape)}")
        if max(ks) > run.num_classes:
            raise ValueError(f"guided_zoom.ks: k={max(ks)} exceeds the {run.num_classes} classes")
        sizes = pool_sizes(settings, original_shape[0], run.image_shape[0])
        batch_size = settings.batch_size or config.eval_batch_size
        logits_fn = functools.partial(run_model(run).apply, run.variables)
        groundings = _grounding_fns(run, settings, layers)
        pool_groundings = _pool_grounding_fns(run, settings, layers, groundings)
        _, train_idx, _, _ = inputs.load_sources(config)
        pool_indices = _subset(np.asarray(train_idx), settings.pool_examples, settings.seed)
        weights = _weights_digest(run.variables)
        root = run.workdir / "guided_zoom"
        prints = {name: _pool_fingerprint(name, settings, config, layers, weights, sizes, pool_indices)
                  for name in settings.pools}
        paths = {name: root / f"pool_{name.lower()}-{_digest(prints[name])}.npz" for name in settings.pools}
        metas = {name: _read_json(paths[name].with_suffix(".json")) for name in settings.pools}
        stages = _evidence_stages(config, settings, root, paths, prints, metas)
        return dict(image_size=image_size, test_native=test_native, train_native=train_native,
                    class_names=class_names, sizes=sizes, batch_size=batch_size, logits_fn=logits_fn,
                    groundings=groundings, pool_groundings=pool_groundings, pool_indices=pool_indices,
                    prints=prints, paths=paths, stages=stages)

    def stages(run, data):
        """Step 1, the evidence pools of the training images (written unless their fingerprint matches), and the
        Evidence CNNs to train on them: one :class:`~saliency_jax.evaluators.base.Stage` per pool, which the runner
        trains through the one loop before :func:`evaluate` runs."""
        p = prepare(run, data)
        metas = {name: _read_json(p["paths"][name].with_suffix(".json")) for name in settings.pools}
        missing = _stale_pools(p["paths"], p["prints"], metas)
        if not missing:
            return p["stages"]
        t0 = time.time()
        digests = _write_pools(missing, _pool_functions(settings, p["pool_groundings"], p["logits_fn"], p["sizes"]),
                               p["train_native"], p["pool_indices"], p["image_size"], p["batch_size"],
                               p["class_names"])
        elapsed = time.time() - t0
        for name, path in missing.items():
            metas[name] = {"fingerprint": p["prints"][name], "content_sha256": digests[name],
                           "stats": _pool_stats(path), "seconds": elapsed, "written_together": sorted(missing)}
            _write_json(path.with_suffix(".json"), metas[name])
        return _evidence_stages(run.config, settings, run.workdir / "guided_zoom", p["paths"], p["prints"], metas)

    def evaluate(run, data):
        p = prepare(run, data)
        image_size, test_native, sizes = p["image_size"], p["test_native"], p["sizes"]
        train_native, pool_indices, class_names = p["train_native"], p["pool_indices"], p["class_names"]
        layers, prints = _layers(run, settings), p["prints"]
        root = run.workdir / "guided_zoom"
        pool_fns = _pool_functions(settings, p["pool_groundings"], p["logits_fn"], sizes)
        batch_size, logits_fn, groundings, num_classes = p["batch_size"], p["logits_fn"], p["groundings"], \
            run.num_classes
        metas = {name: _read_json(p["paths"][name].with_suffix(".json")) for name in settings.pools}
        trained = getattr(run, "stages", None) or {}
        absent = [n for n in p["stages"] if n not in trained or metas[n[len("evidence_"):]].get("fingerprint")
                  != p["prints"][n[len("evidence_"):]]
                  or pathlib.Path(trained[n].workdir) != pathlib.Path(p["stages"][n].workdir)]
        if absent:
            raise ValueError(f"guided_zoom: the stages {absent} (pools and Evidence CNNs) were not run for this model: "
                             "evaluate through saliency_jax.experiment.evaluate_run, which trains them first")
        seconds: dict[str, float] = {}
        seconds["pool"] = float(sum({tuple(m["written_together"]): m["seconds"] for m in metas.values()}.values()))

        # 2. The Evidence CNNs (trained by the runner through the one loop: run.stages).
        evidence_runs, evidence_metrics = {}, {}
        for name in settings.pools:
            result = trained[f"evidence_{name}"]
            seconds[f"evidence_{name}"] = result.train_seconds
            source, _, val_idx, _ = inputs.load_sources(result.config)
            val_accuracy = (evaluate_accuracy(result.model, result.state, source, val_idx, result.config)
                            if len(val_idx) else None)
            evidence_runs[name] = result
            evidence_metrics[name] = {**metas[name]["stats"], "val_accuracy": val_accuracy,
                                      "steps": int(result.state.step)}

        # 3. Decision refinement of the test split (Algorithm 2), every k at once.
        test_grounding = {"GZ": "cEB", "EGZ": settings.ensemble_test_grounding}
        refine = _refine_function(logits_fn, groundings, evidence_runs, test_grounding, settings, sizes, ks,
                                  num_classes)
        test_idx = _subset(np.arange(len(test_native)), settings.test_examples, settings.seed)
        sums: dict[str, np.ndarray] = {}
        t0 = time.time()
        bar = tqdm(total=len(test_idx), desc="guided_zoom refine", dynamic_ncols=True, leave=False)
        for batch in data_lib.make_eval_batches(test_native, test_idx, batch_size=batch_size):
            keep = np.asarray(batch["mask"]).astype(bool)
            originals = np.asarray(batch["image"], np.float32)
            images = conventional_images(originals, image_size)
            out = refine(jnp.asarray(images), jnp.asarray(originals), jnp.asarray(batch["label"], jnp.int32))
            for key, value in out.items():
                value = np.asarray(value)[keep].sum(axis=0)
                sums[key] = sums.get(key, 0) + value
            bar.update(int(keep.sum()))
        bar.close()
        seconds["refine"] = time.time() - t0
        n = len(test_idx)
        metrics = {
            "examples": int(n), "pool_examples": int(len(pool_indices)), "sizes": sizes, "layers": layers,
            "conventional": {f"top{k}": float(sums[f"top{k}"] / n) for k in _top_ks(ks, num_classes)},
            "refined": {name: {str(k): float(sums[f"{name}/{k}"] / n) for k in ks} for name in settings.pools},
            "evidence": {},
            "seconds": seconds,
        }
        for name in settings.pools:
            pairs = float(sums[f"{name}/pairs"])
            metrics["evidence"][name] = {
                **evidence_metrics[name],
                "test_patch_accuracy": {f"l{l}": (float(sums[f"{name}/hits"][l]) / pairs if pairs else None)
                                        for l in range(num_rounds)},
                "test_patch_images": int(pairs)}
        figure = root / f"figure-{_digest([prints[name] for name in settings.pools])}.npz"
        if not figure.is_file():
            _save_figure_examples(figure, pool_fns, train_native, pool_indices, image_size, settings, class_names)
        metrics["figure"] = figure.name if figure.is_file() else None
        return metrics

    def report(ctx: ReportContext) -> Section | None:
        return _report(ctx, settings, ks)

    return Evaluator(evaluate, report, stages)


def _top_ks(ks, num_classes) -> tuple[int, ...]:
    return tuple(k for k in sorted({1, 3, 5, *ks}) if k <= num_classes)


def _refine_function(logits_fn, groundings, evidence_runs, test_grounding, settings: GuidedZoomSettings, sizes, ks,
                     num_classes):
    """One jitted call per test batch: conventional top-K, the test patches of each needed grounding (computed once
    and shared by the Evidence CNNs that use that method), every Evidence CNN's scores, refined classes per k."""
    top_k = max(ks)
    num_erasures = len(settings.evidence_weights) - 1
    weights = (settings.conventional_weight, tuple(settings.evidence_weights))
    evidence_fns = {name: functools.partial(run_model(r).apply, r.variables)
                    for name, r in evidence_runs.items()}
    needed = sorted({test_grounding[name] for name in evidence_fns})

    @jax.jit
    def refine(images, originals, labels):
        batch = images.shape[0]
        logits = logits_fn(images)
        out = {f"top{k}": gz.top_k_correct(logits, labels, k) for k in _top_ks(ks, num_classes)}
        conventional = (jax.nn.softmax(logits, axis=-1) if settings.score == "probability" else logits)
        top_scores, top_classes = jax.lax.top_k(conventional.astype(jnp.float32), top_k)
        targets = top_classes.reshape(-1).astype(jnp.int32)  # pair (b, j) at row b * K + j
        patches = {}
        for g in needed:
            zoom = gz.evidence_patches(groundings[g], jnp.repeat(images, top_k, axis=0), targets,
                                       num_erasures=num_erasures, patch_size=sizes["patch"],
                                       erase_size=sizes["erase"], output_size=sizes["output"],
                                       originals=jnp.repeat(originals, top_k, axis=0), border=settings.border,
                                       method=settings.method)
            patches[g] = _quantize(zoom.patches)
        is_label = top_classes == labels[:, None]  # [batch, K]
        for name, fn in evidence_fns.items():
            evidence, predicted = gz.class_evidence(fn, patches[test_grounding[name]], targets, settings.score)
            evidence = evidence.reshape(batch, top_k, num_erasures + 1)
            predicted = predicted.reshape(batch, top_k, num_erasures + 1)
            scores = gz.refinement_scores(top_scores, evidence, *weights)
            for k in ks:
                out[f"{name}/{k}"] = gz.refined_classes(top_classes, scores, k) == labels
            out[f"{name}/hits"] = jnp.any((predicted == labels[:, None, None]) & is_label[..., None], axis=1)
            out[f"{name}/pairs"] = jnp.any(is_label, axis=1)
        return out

    return refine


def _save_figure_examples(path: pathlib.Path, pool_fns, source, pool_indices, image_size, settings, class_names):
    n = min(settings.figure_examples, len(pool_indices))
    if not n:
        return
    idx = pool_indices[np.linspace(0, len(pool_indices) - 1, n).astype(int)]
    batch = next(iter(data_lib.make_eval_batches(source, idx, batch_size=n)))
    originals = np.asarray(batch["image"], np.float32)
    labels = np.asarray(batch["label"], np.int32)
    images = conventional_images(originals, image_size)
    arrays = {"originals": originals, "names": np.asarray([class_names[int(y)] for y in labels])}
    for name, fn in pool_fns.items():
        pool = fn(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(originals))
        for field in ("patches", "valid", "boxes"):
            arrays[f"{name}_{field}"] = np.asarray(getattr(pool, field))
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Report.


def _cell(values: list[float | None], reference: list[float] | None = None) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if all(isinstance(v, int) for v in values) and not reference:
        return f"{np.mean(values):.0f}" + (f" ± {np.std(values, ddof=1):.0f}" if len(values) > 1 else "")
    text = f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")
    if reference:
        text += f" ({np.mean(values) - np.mean(reference):+.4f})"
    return text


def _report(ctx: ReportContext, settings: GuidedZoomSettings, ks) -> Section | None:
    results = ctx.metrics("guided_zoom")
    if not results:
        return None
    first = next(iter(results.values()))[0]
    pools = [p for p in POOLS if p in first["refined"]]
    tops = list(first["conventional"])
    sizes, layers = first["sizes"], first["layers"]
    lines = [
        f"Bargal 2019, Ch. 6 (Algorithms 1-2, Eq. 6.1) on each run's conventional CNN, {first['examples']} test "
        f"images, pools from {first['pool_examples']} training images. Patches of {sizes['patch']} px cut from the "
        f"originals around the map's peak (border: {settings.border}, {settings.method}), Evidence CNN input "
        f"{sizes['output']} px; erased squares {sizes['erase']} px on the conventional input; GZ pool: cEB at "
        f"`{layers['cEB']}`, L = {settings.num_erasures}; EGZ pool: cEB, Grad-CAM at `{layers['Grad-CAM']}`, RISE "
        f"({settings.rise_masks} masks, grid {settings.rise_grid}), L = 0. Refinement: w = "
        f"{settings.conventional_weight}, (w_l) = {tuple(settings.evidence_weights)} ({settings.score}); GZ tests "
        f"with cEB, EGZ with {settings.ensemble_test_grounding}. Mean ± sample std over repeats; in brackets the "
        "change from the conventional top-1.", "",
        "| arm | " + " | ".join(f"conventional {t.replace('top', 'top-')}" for t in tops) + " | "
        + " | ".join(f"{p} k={k}" for p in pools for k in ks) + " |",
        "| --- |" + " ---: |" * (len(tops) + len(pools) * len(ks)),
    ]
    for arm, runs in results.items():
        top1 = [r["conventional"]["top1"] for r in runs]
        cells = [_cell([r["conventional"][t] for r in runs]) for t in tops]
        cells += [_cell([r["refined"][p][str(k)] for r in runs], top1) for p in pools for k in ks]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    rounds = list(first["evidence"][pools[0]]["test_patch_accuracy"])
    lines += ["", "Evidence CNNs: pool size, accuracy on held-out pool patches and on the test images' patches of "
              "their true class (round l of Algorithm 2; images whose class is among the top "
              f"{max(ks)}).", "",
              "| arm | pool | patches | per round / method | val accuracy | "
              + " | ".join(f"test patches {r}" for r in rounds) + " |",
              "| --- | --- | ---: | --- | ---: |" + " ---: |" * len(rounds)]
    for arm, runs in results.items():
        for p in pools:
            ev = [r["evidence"][p] for r in runs]
            split = ev[0].get("per_method") or ev[0]["per_round"]
            lines.append(f"| {arm} | {p} | {_cell([e['patches'] for e in ev])} | "
                         + ", ".join(f"{k} {v}" for k, v in split.items()) + f" | "
                         f"{_cell([e['val_accuracy'] for e in ev])} | "
                         + " | ".join(_cell([e["test_patch_accuracy"][r] for e in ev]) for r in rounds) + " |")
    seconds = {k: [r["seconds"][k] for rs in results.values() for r in rs] for k in first["seconds"]}
    lines += ["", "Seconds per run (mean): " + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in seconds.items()) + "."]
    arm = next(iter(results))
    figure = ctx.runs[arm][0].workdir / "guided_zoom" / str(results[arm][0].get("figure"))
    if results[arm][0].get("figure") and figure.is_file():
        stored = np.load(figure)
        labels = [str(n) for n in stored["names"]]
        for p in pools:
            if f"{p}_patches" not in stored:
                continue
            titles = ([f"l = {r}" for r in range(stored[f"{p}_patches"].shape[0])] if p == "GZ"
                      else list(GROUNDINGS))
            name = f"guided_zoom_pool_{p.lower()}.png"
            caption = ("most salient patch, then after one and two erasures (Figs. 6.3-6.5)" if p == "GZ"
                       else "one patch per grounding method (Eq. 6.1, Fig. 6.6)")
            evidence_pool_figure(stored["originals"], stored[f"{p}_patches"], stored[f"{p}_valid"],
                                 ctx.workdir / name, boxes=stored[f"{p}_boxes"], column_titles=titles,
                                 row_labels=labels, title=f"{p} evidence pool ({arm}, first repeat)")
            lines += ["", f"{p} pool patches of training images: {caption}; faded with x: not in the pool "
                      "(Algorithm 1: the image was misclassified after an erasure"
                      + (", or before it" if settings.require_correct_first else "") + ").", "",
                      f"![{p} pool]({name})"]
    return Section("Guided Zoom: decision refinement with evidence pools", "\n".join(lines))
