"""Evaluators of attention guidance (poster, seed 003) and Right for the Right Reasons (Ross et al. 2017).

* ``"region_mass"``: the fraction of each test image's Grad-CAM mass (ground-truth class; multi-label: each present
  guided attribute) inside the region ``S`` the data marks (the batch field ``region``: Decoy MNIST's digit, CelebA's
  attribute templates) and, where the data has one, inside the wrong region ``A`` (``wrong_region``: the decoy
  patch) - whether training moved the evidence where the user wanted it
  (:func:`saliency_jax.evaluation.relevance_mass_accuracy`).
* ``"split_accuracy"``: accuracy on (a seeded subset of) the *training* split - the "train" column of Ross et al.'s
  Decoy MNIST table next to the test accuracy of the ``"classification"`` evaluator (on Decoy MNIST the test split is
  the decoy test set, whose patches encode random digits).
* ``"decoy_agreement"``: on the Decoy MNIST test set, how often the predictions follow the patch's digit where it
  differs from the label.
* ``"cooccurrence_accuracy"``: multi-label attribute accuracy on the test split and on the poster's
  co-occurrence-biased subsets (the attribute present, the attribute it usually co-occurs with absent:
  :func:`saliency_jax.data.cooccurrence_subset`), CelebA.

The Grad-CAM figure before / after guidance is the ``"saliency_maps"`` evaluator's (the arms side by side).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax import data as data_lib
from saliency_jax import evaluation
from saliency_jax.data import celeba
from saliency_jax.evaluation.predict import predict
from saliency_jax.models.trainable import as_trainable
from saliency_jax.models.build import model_layers
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, linen_module,
                                          register_evaluator, run_model)
from saliency_jax.saliency import grad_cam, linen_layer
from saliency_jax.training.attention_guidance import INPUT_LAYER, WEIGHTINGS, input_layer_model, raw_guidance_maps

__all__ = ["RegionMassSettings", "SplitAccuracySettings", "DecoyAgreementSettings", "CooccurrenceAccuracySettings",
           "region_mass_evaluator", "split_accuracy_evaluator", "decoy_agreement_evaluator",
           "cooccurrence_accuracy_evaluator", "region_masses", "multilabel_predictions"]


def _subset(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``limit`` of ``n`` examples (all when ``limit`` is 0)."""
    idx = np.arange(n)
    if limit and limit < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    return idx


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


# ----------------------------------------------------------------------------------------------------------------
# Region mass.


@dataclasses.dataclass(frozen=True)
class RegionMassSettings(EvaluatorSettings):
    """Settings of the ``"region_mass"`` evaluator.

    Attributes:
      examples: test images evaluated (a seeded random subset; 0: the whole test split).
      seed: seed of the subset (the same images for every arm).
      score, weighting: Grad-CAM's class score and weights (defaults: those the guidance scheme trains,
        Selvaraju et al. 2017: the logit, plain weights).
      attributes: multi-label only: the logits of the region's planes (``GuidanceConfig.attributes``); ``()`` =
        every logit.
      batch_size: images per Grad-CAM call.
      maps: further maps measured the same way next to Grad-CAM, as ``"layer:weighting"`` strings: ``layer`` a
        layer path of the model or ``"input"``, ``weighting`` one of
        :data:`saliency_jax.training.attention_guidance.WEIGHTINGS` (e.g. ``"relu_conv1:hirescam"``,
        ``"input:gradient_x_activation"``; :func:`~saliency_jax.training.attention_guidance.raw_guidance_maps`):
        the maps a guidance loss can be put on, measured on every arm. Single-label data only.
    """

    examples: int = 0
    seed: int = 0
    score: str = "logit"
    weighting: str = "plain"
    attributes: tuple[int, ...] = ()
    batch_size: int = 250
    maps: tuple[str, ...] = ()

    def __post_init__(self):
        if self.score not in ("logit", "softmax") or self.weighting not in ("plain", "guided"):
            raise ValueError(f"region_mass: score must be 'logit' or 'softmax' and weighting 'plain' or 'guided'; "
                             f"got {self.score!r}, {self.weighting!r}")
        if int(self.examples) < 0 or int(self.batch_size) < 1:
            raise ValueError(f"region_mass: examples must be >= 0 and batch_size >= 1; got {self.examples}, "
                             f"{self.batch_size}")
        maps = (self.maps,) if isinstance(self.maps, str) else tuple(self.maps)
        for spec in maps:
            _parse_map(spec)
        object.__setattr__(self, "maps", maps)


def _parse_map(spec: Any) -> tuple[str, str]:
    """``"layer:weighting"`` -> ``(layer, weighting)`` (see :class:`RegionMassSettings`)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")) \
            or spec.split(":")[1] not in WEIGHTINGS:
        raise ValueError(f"region_mass: each of maps must be 'layer:weighting' with weighting one of {WEIGHTINGS} "
                         f"(e.g. 'relu_conv1:hirescam'); got {spec!r}")
    layer, weighting = spec.split(":")
    return layer, weighting


def region_masses(model, variables, batches, *, layer: str, score: str = "logit", weighting: str = "plain",
                  attributes: tuple[int, ...] = (), maps: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Per-example fractions of the Grad-CAM mass inside the batches' ``region`` (and ``wrong_region``).

    Grad-CAM (ReLU, at the layer's resolution, not normalised) of the ground-truth class with the model in
    inference mode, then :func:`saliency_jax.evaluation.relevance_mass_accuracy` (the map resized bilinearly to the
    region's size; NaN for an all-zero map). Multi-label batches (``label`` [b, num_classes]): the map of every
    guided attribute (``attributes`` index the logits of the planes of ``region`` [b, num_guided, h, w]) against its
    plane, kept for the (example, attribute) pairs where the attribute is present.

    Args:
      model: the linen module.
      variables: its variables.
      batches: iterable of padded eval batches (``image``, ``label``, ``region``, optional ``wrong_region``,
        ``mask``), as :func:`saliency_jax.data.make_eval_batches` yields.
      layer: the Grad-CAM layer.
      score, weighting: Grad-CAM settings.
      attributes: multi-label: the guided logits (``()`` = all).
      maps: further maps, ``"layer:weighting"`` (:class:`RegionMassSettings`), with the ``score``; single-label.

    Returns:
      ``{"region": [n] float, "wrong_region": [n] float (if the data has it)}`` with NaN for all-zero maps;
      multi-label: ``{"region": [pairs] float, "attribute": [pairs] int}`` (the logit of each pair). With ``maps``,
      also ``"<spec>/region"`` and ``"<spec>/wrong_region"`` for each spec.

    Raises:
      ValueError: if the batches have no ``region`` field, on a bad map spec, or ``maps`` with multi-label data.
    """

    layer_fn = lambda v: linen_layer(model, v, layer, train=False)  # noqa: E731
    extra = tuple((spec, *_parse_map(spec)) for spec in maps)

    def extra_layer(v, name):
        if name == INPUT_LAYER:
            return input_layer_model(lambda x: model.apply(v, x, train=False))
        return linen_layer(model, v, name, train=False)

    @jax.jit
    def single(v, images, labels, region, wrong):
        maps = grad_cam(layer_fn(v), images, labels, score=score, weighting=weighting, resize=False, normalize=False)
        out = {"region": evaluation.relevance_mass_accuracy(maps, region)}
        if wrong is not None:
            out["wrong_region"] = evaluation.relevance_mass_accuracy(maps, wrong)
        for spec, name, kind in extra:
            m = raw_guidance_maps(extra_layer(v, name), images, labels, score=score, weighting=kind)
            out[f"{spec}/region"] = evaluation.relevance_mass_accuracy(m, region)
            if wrong is not None:
                out[f"{spec}/wrong_region"] = evaluation.relevance_mass_accuracy(m, wrong)
        return out

    @jax.jit
    def multi(v, images, region, logits_idx):
        def one(k, plane):
            targets = jnp.full(images.shape[:1], k, jnp.int32)
            maps = grad_cam(layer_fn(v), images, targets, score="logit", weighting=weighting, resize=False,
                            normalize=False)
            return evaluation.relevance_mass_accuracy(maps, plane)
        return jax.vmap(one, in_axes=(0, 1), out_axes=1)(logits_idx, region)  # [b, num_guided]

    out: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        if "region" not in batch:
            raise ValueError(f"region_mass needs a 'region' field in the test data; it has {sorted(batch)}")
        keep = np.asarray(batch["mask"]).astype(bool)
        images, labels = jnp.asarray(batch["image"]), np.asarray(batch["label"])
        region = jnp.asarray(batch["region"])
        if labels.ndim == 1:
            wrong = jnp.asarray(batch["wrong_region"]) if "wrong_region" in batch else None
            result = single(variables, images, jnp.asarray(labels, jnp.int32), region, wrong)
            for k, v in result.items():
                out.setdefault(k, []).append(np.asarray(v)[keep])
        else:
            if extra:
                raise ValueError("region_mass: maps (further maps than Grad-CAM) are measured on single-label data "
                                 "only")
            guided = tuple(attributes) or tuple(range(labels.shape[1]))
            if region.ndim != 4 or region.shape[1] != len(guided):
                raise ValueError(f"region_mass: multi-label regions must be [batch, {len(guided)}, h, w] (one plane "
                                 f"per guided attribute {list(guided)}); got {list(region.shape)}")
            fractions = np.asarray(multi(variables, images, region, jnp.asarray(guided, jnp.int32)))
            present = (labels[:, list(guided)] > 0) & keep[:, None]
            rows, cols = np.nonzero(present)
            out.setdefault("region", []).append(fractions[rows, cols])
            out.setdefault("attribute", []).append(np.asarray(guided)[cols])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def _stats(values: np.ndarray) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    return {"mean": float(np.mean(finite)) if finite.size else None, "zero_maps": int(np.sum(~np.isfinite(values))),
            "examples": int(values.size)}


@register_evaluator("region_mass", RegionMassSettings)
def region_mass_evaluator(settings: RegionMassSettings) -> Evaluator:
    """The fraction of the Grad-CAM mass of the ground-truth class inside the test data's ``region`` (``S``) and
    ``wrong_region`` (``A``), per arm (:func:`region_masses`; mean over the test images whose map is not all zero).
    """

    def evaluate(run, data):
        config = run.config
        source = data.test_source(config)
        idx = _subset(len(source), settings.examples, settings.seed)
        batches = data_lib.make_eval_batches(source, idx, batch_size=settings.batch_size,
                                             image_size=config.dataset.get("image_size"))
        layer = model_layers(config).grad_cam_layer
        module = linen_module(run, "the attention_guidance evaluator")
        masses = region_masses(module, run.variables, batches, layer=layer, score=settings.score,
                               weighting=settings.weighting, attributes=tuple(settings.attributes),
                               maps=settings.maps)
        out: dict[str, Any] = {"layer": layer, "region": _stats(masses["region"])}
        if "wrong_region" in masses:
            out["wrong_region"] = _stats(masses["wrong_region"])
        if settings.maps:
            out["maps"] = {spec: {k: _stats(masses[f"{spec}/{k}"]) for k in ("region", "wrong_region")
                                  if f"{spec}/{k}" in masses} for spec in settings.maps}
        if "attribute" in masses:
            out["per_attribute"] = {int(a): _stats(masses["region"][masses["attribute"] == a])
                                    for a in np.unique(masses["attribute"])}
        return out

    def report(ctx: ReportContext) -> Section:
        results = ctx.metrics("region_mass")
        wrong = any("wrong_region" in m for runs in results.values() for m in runs)
        lines = [f"Fraction of the Grad-CAM mass (ground-truth class, {settings.score} score, {settings.weighting} "
                 f"weights, ReLU, at `{next(iter(results.values()))[0]['layer']}` resized to the image) inside the "
                 "region S the user marked" + (" and inside the wrong region A" if wrong else "")
                 + "; mean over test images (maps that are all zero left out; mean ± std over repeats).", "",
                 "| arm | mass in S |" + (" mass in A |" if wrong else "") + " zero maps |",
                 "| --- | ---: |" + (" ---: |" if wrong else "") + " ---: |"]
        for arm in ctx.arms:
            runs = results.get(arm)
            if not runs:
                continue
            row = f"| {arm} | {_mean_std([m['region']['mean'] for m in runs])} |"
            if wrong:
                row += f" {_mean_std([m.get('wrong_region', {}).get('mean') for m in runs])} |"
            row += f" {sum(m['region']['zero_maps'] for m in runs)} / {sum(m['region']['examples'] for m in runs)} |"
            lines.append(row)
        if settings.maps:
            lines += ["", "The same fraction for the further maps (`layer:weighting`, "
                      "saliency_jax.training.attention_guidance.raw_guidance_maps; the first arm's list, `-` where "
                      "an arm measured another list), each cell mass in S"
                      + (" / mass in A" if wrong else "") + ":", "",
                      "| arm | " + " | ".join(f"`{spec}`" for spec in settings.maps) + " |",
                      "| --- |" + " ---: |" * len(settings.maps)]
            for arm in ctx.arms:
                runs = [m for m in results.get(arm, []) if "maps" in m]
                if not runs:
                    continue
                cells = []
                for spec in settings.maps:  # an arm that measured other maps (its own overrides): "-"
                    measured = [m["maps"][spec] for m in runs if spec in m["maps"]]
                    if not measured:
                        cells.append("-")
                        continue
                    cell = _mean_std([r["region"]["mean"] for r in measured])
                    if wrong:
                        cell += " / " + _mean_std([r.get("wrong_region", {}).get("mean") for r in measured])
                    cells.append(cell)
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        return Section("Grad-CAM mass inside the user's region", "\n".join(lines))

    return Evaluator(evaluate, report)


# ----------------------------------------------------------------------------------------------------------------
# Accuracy on a split (the training split).


@dataclasses.dataclass(frozen=True)
class SplitAccuracySettings(EvaluatorSettings):
    """Settings of the ``"split_accuracy"`` evaluator.

    Attributes:
      split: the split of ``config.dataset`` to evaluate (``"train"``: the data trained on, with its decoys).
      examples: images evaluated (a seeded random subset; 0: the whole split).
      seed: seed of the subset.
    """

    split: str = "train"
    examples: int = 10_000
    seed: int = 0


@register_evaluator("split_accuracy", SplitAccuracySettings)
def split_accuracy_evaluator(settings: SplitAccuracySettings) -> Evaluator:
    """Top-1 accuracy (inference mode) on a split of the run's dataset, e.g. the decoy *training* set (Ross et al.
    2017 report train and test accuracy side by side)."""

    def evaluate(run, data):
        config = run.config
        ds = config.dataset
        options = ds.get("options")
        options = options.to_dict() if hasattr(options, "to_dict") else dict(options or {})
        key = ("split_source", settings.split, ds.name, ds.get("data_dir"), ds.get("image_size"), repr(options))
        source = data.cached(key, lambda: data_lib.get_source(ds.name, settings.split, data_dir=ds.get("data_dir"),
                                                              image_size=ds.get("image_size"), options=options))
        idx = _subset(len(source), settings.examples, settings.seed)
        batches = data_lib.make_eval_batches(source, idx, batch_size=config.eval_batch_size,
                                             image_size=ds.get("image_size"), pad_to_multiple_of=jax.device_count())
        labels, preds, _ = predict(run.model, run.variables, batches)
        return {"split": settings.split, "examples": int(len(idx)), "accuracy": float(np.mean(labels == preds))}

    def report(ctx: ReportContext) -> Section:
        results = ctx.metrics("split_accuracy")
        test = ctx.metrics("classification")
        lines = ["| arm | " + f"{settings.split} accuracy |" + (" test accuracy |" if test else ""),
                 "| --- | ---: |" + (" ---: |" if test else "")]
        for arm in ctx.arms:
            if arm not in results:
                continue
            row = f"| {arm} | {_mean_std([m['accuracy'] for m in results[arm]])} |"
            if test:
                row += f" {_mean_std([m['accuracy'] for m in test.get(arm, [])])} |"
            lines.append(row)
        n = next(iter(results.values()))[0]["examples"] if results else 0
        return Section(f"Accuracy on the {settings.split} split",
                       f"On {n} images of each arm's own {settings.split} split (inference mode); the test column is "
                       "the `classification` evaluator's (each arm's own test split).\n\n" + "\n".join(lines))

    return Evaluator(evaluate, report)


# ----------------------------------------------------------------------------------------------------------------
# Decoy MNIST: how much the predictions follow the patch.


@dataclasses.dataclass(frozen=True)
class DecoyAgreementSettings(EvaluatorSettings):
    """Settings of the ``"decoy_agreement"`` evaluator.

    Attributes:
      examples: test images evaluated (a seeded random subset; 0: the whole test split).
      seed: seed of the subset.
    """

    examples: int = 0
    seed: int = 0


@register_evaluator("decoy_agreement", DecoyAgreementSettings)
def decoy_agreement_evaluator(settings: DecoyAgreementSettings) -> Evaluator:
    """How much a model follows the decoy on the Decoy MNIST test set, where the patch encodes a random digit.

    On the test images whose patch digit (the field ``decoy_label``) differs from the label: the accuracy, and the
    fraction predicted as the patch's digit (chance: about 1/10 of the errors); on those where they agree, the
    accuracy. A model that ignores the patch follows it at chance; one that learned the decoy rule follows it often.
    On the clean ceiling's test set ``decoy_label`` is the digit a patch *would* encode (no patch is drawn).
    """

    def evaluate(run, data):
        config = run.config
        source = data.test_source(config)
        idx = _subset(len(source), settings.examples, settings.seed)
        logits_fn = jax.jit(lambda v, x: jnp.argmax(run_model(run).apply(v, x), -1))
        labels, decoys, preds = [], [], []
        for batch in data_lib.make_eval_batches(source, idx, batch_size=config.eval_batch_size,
                                                image_size=config.dataset.get("image_size")):
            if "decoy_label" not in batch:
                raise ValueError(f"decoy_agreement needs the field 'decoy_label' (Decoy MNIST); the test data has "
                                 f"{sorted(batch)}")
            keep = np.asarray(batch["mask"]).astype(bool)
            preds.append(np.asarray(logits_fn(run.variables, jnp.asarray(batch["image"])))[keep])
            labels.append(np.asarray(batch["label"])[keep])
            decoys.append(np.asarray(batch["decoy_label"])[keep])
        labels, decoys, preds = (np.concatenate(a) for a in (labels, decoys, preds))
        conflict = decoys != labels
        return {"examples": int(labels.size), "conflicting": int(conflict.sum()),
                "accuracy_conflicting": float(np.mean(preds[conflict] == labels[conflict])) if conflict.any() else None,
                "follows_decoy": float(np.mean(preds[conflict] == decoys[conflict])) if conflict.any() else None,
                "accuracy_agreeing": float(np.mean(preds[~conflict] == labels[~conflict])) if (~conflict).any()
                else None}

    def report(ctx: ReportContext) -> Section:
        results = ctx.metrics("decoy_agreement")
        lines = ["On the test images whose patch encodes another digit than the label: accuracy, and the fraction "
                 "predicted as the patch's digit (following the decoy); on those whose patch agrees: accuracy.", "",
                 "| arm | accuracy, patch disagrees | predicts the patch's digit | accuracy, patch agrees |",
                 "| --- | ---: | ---: | ---: |"]
        for arm in ctx.arms:
            runs = results.get(arm)
            if runs:
                lines.append(f"| {arm} | {_mean_std([m['accuracy_conflicting'] for m in runs])} | "
                             f"{_mean_std([m['follows_decoy'] for m in runs])} | "
                             f"{_mean_std([m['accuracy_agreeing'] for m in runs])} |")
        return Section("Following the decoy", "\n".join(lines))

    return Evaluator(evaluate, report)


# ----------------------------------------------------------------------------------------------------------------
# CelebA: co-occurrence-biased subsets.


@dataclasses.dataclass(frozen=True)
class CooccurrenceAccuracySettings(EvaluatorSettings):
    """Settings of the ``"cooccurrence_accuracy"`` evaluator (poster, seed 003).

    Attributes:
      pairs: ``{attribute: the attribute it co-occurs with}``; empty =
        :data:`saliency_jax.data.celeba.COOCCURRENCE_PAIRS` for the chosen attributes that have a partner.
      batch_size: images per model call.
    """

    pairs: Any = dataclasses.field(default_factory=dict)
    batch_size: int = 100

    def __post_init__(self):
        pairs = self.pairs.to_dict() if hasattr(self.pairs, "to_dict") else dict(self.pairs or {})
        object.__setattr__(self, "pairs", {str(k): str(v) for k, v in pairs.items()})


def multilabel_predictions(model, variables, source, indices, *, batch_size: int, image_size=None) -> tuple[
        np.ndarray, np.ndarray]:
    """``(labels [n, k] int, decisions [n, k] bool)``: multi-hot targets and ``logit > 0`` decisions (inference mode)
    on ``source[indices]``."""
    logits_fn = jax.jit(lambda v, x: as_trainable(model).apply(v, x))
    labels, decisions = [], []
    for batch in data_lib.make_eval_batches(source, indices, batch_size=batch_size, image_size=image_size):
        keep = np.asarray(batch["mask"]).astype(bool)
        logits = np.asarray(logits_fn(variables, jnp.asarray(batch["image"])))
        labels.append(np.asarray(batch["label"])[keep])
        decisions.append(logits[keep] > 0)
    if not labels:
        return np.zeros((0, source.num_classes), np.int32), np.zeros((0, source.num_classes), bool)
    return np.concatenate(labels), np.concatenate(decisions)


@register_evaluator("cooccurrence_accuracy", CooccurrenceAccuracySettings)
def cooccurrence_accuracy_evaluator(settings: CooccurrenceAccuracySettings) -> Evaluator:
    """Per-attribute accuracy (decision ``logit > 0``) on the test split and on each attribute's co-occurrence-biased
    subset (present, partner absent; there every label is 1, so the accuracy is the recall), the poster's table.

    The test data must be a :class:`saliency_jax.data.CelebASource` (it knows every attribute of the file).
    """

    def evaluate(run, data):
        config = run.config
        source = data.test_source(config)
        if not hasattr(source, "all_attributes"):
            raise ValueError(f"cooccurrence_accuracy needs CelebA test data (a CelebASource); got {source!r}")

        pairs = settings.pairs or {a: celeba.COOCCURRENCE_PAIRS[a] for a in source.attributes
                                   if a in celeba.COOCCURRENCE_PAIRS}
        unknown = [a for a in pairs if a not in source.attributes]
        if unknown:
            raise ValueError(f"cooccurrence_accuracy: pairs name attributes {unknown} that the model does not "
                             f"predict ({list(source.attributes)})")
        labels, decisions = multilabel_predictions(run.model, run.variables, source, None,
                                                   batch_size=settings.batch_size,
                                                   image_size=config.dataset.get("image_size"))
        correct = decisions == (labels > 0)
        out: dict[str, Any] = {"examples": int(labels.shape[0]), "attributes": {}}
        for k, attribute in enumerate(source.attributes):
            entry = {"accuracy": float(np.mean(correct[:, k])) if labels.shape[0] else None}
            if attribute in pairs:
                subset = celeba.cooccurrence_subset(source, attribute, pairs[attribute])
                entry.update(partner=pairs[attribute], subset_examples=int(subset.size),
                             subset_accuracy=float(np.mean(correct[subset, k])) if subset.size else None)
            out["attributes"][attribute] = entry
        return out

    def report(ctx: ReportContext) -> Section:
        results = ctx.metrics("cooccurrence_accuracy")
        lines = ["Accuracy of each attribute's decision (logit > 0) on the test split, and on its co-occurrence-"
                 "biased subset (attribute present, partner absent). Poster targets (baseline -> guided): "
                 "Wearing_Lipstick 92.9 -> 93.25 % / 82.17 -> 83.31 %, High_Cheekbones 63.53 -> 65.56 % / "
                 "47.41 -> 61.33 %, Double_Chin 84.18 -> 84.79 % / 81.77 -> 86.45 %.", "",
                 "| arm | attribute | test accuracy | without partner | subset accuracy | subset size |",
                 "| --- | --- | ---: | --- | ---: | ---: |"]
        for arm in ctx.arms:
            runs = results.get(arm)
            if not runs:
                continue
            for attribute, entry in runs[0]["attributes"].items():
                acc = _mean_std([r["attributes"][attribute]["accuracy"] for r in runs])
                if "partner" in entry:
                    sub = _mean_std([r["attributes"][attribute]["subset_accuracy"] for r in runs])
                    lines.append(f"| {arm} | {attribute} | {acc} | {entry['partner']} | {sub} | "
                                 f"{entry['subset_examples']} |")
                else:
                    lines.append(f"| {arm} | {attribute} | {acc} | | | |")
        return Section("Attribute accuracy on co-occurrence-biased subsets (poster)", "\n".join(lines))

    return Evaluator(evaluate, report)
