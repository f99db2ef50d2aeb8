r"""Spatiotemporal grounding of a trained clip classifier as an evaluator: ``"temporal_grounding"``.

Bargal 2019, Sec. 7.4 (Tables 7.1-7.2, Figs. 7.5-7.6) on the synthetic moving-digit clips of the run's dataset
(:mod:`saliency_jax.data.clips`; ``config.dataset.name`` ``"mnist_clips"`` or ``"digits_clips"``, the clip options
of ``config.dataset.options``: canvas, clutter, speed). The evaluation clips are generated deterministically from the
**test** split's digits with the evaluator's own seed, so every arm and repeat sees the same clips:

* **Table 7.2 shape** (temporal detection): for each row - ``rand + GT`` and ``GT + rand`` clips of
  ``two_segment_length`` frames (the boundary at the midpoint, as the thesis's 16-frame clips), and
  ``rand + GT + rand`` clips of ``insert_length`` frames with the GT segment of each length in ``gt_lengths``
  inserted at a random position (the thesis: 11, 41, 65 of 128 frames) - one segment of the ground-truth class is
  detected per clip, of known length (the window with the highest score sum) or of unknown length (anchor and
  greedy extension, Sec. 7.2), from the thresholded probability, EB-R or cEB-R; mAP at temporal IoU
  ``iou_threshold`` (:func:`saliency_jax.evaluation.temporal_grounding.temporal_detection_map`).
* **Table 7.1 shape** (spatial pointing game): on ``"single"`` clips (the digit in every frame), every frame's map
  of EB, cEB, BP (the single-frame classifier, every frame an independent image) and EB-R, cEB-R, BP-R (the
  recurrent model, through time) points at its maximum; a hit if within ``tolerance`` pixels of the digit's box;
  accuracy = mean over classes of the hit rates. The centre of the frame is the model-free baseline.
* **Fig. 7.6 shape**: the mean (and standard deviation over clips) of every frame's map sum over time, for the
  ``rand + GT`` and ``GT + rand`` rows; and a figure of sample clips with their EB-R and cEB-R maps (Fig. 7.5).

EB-R and cEB-R are computed with each LSTM-cell rule of ``cell_rules``
(:func:`saliency_jax.saliency.recurrent.recurrent_excitation_backprop`): ``"gradient"`` (first, the default of the
library: the authors' released Caffe ``LSTMUnit`` backward, i.e. the cell's gradient, what the thesis's numbers were
produced with; the first rule also gets the frame-wise baselines) and ``"excitation"`` (EB's rule with the gates as
constant weights: the signal stays a distribution).
The top-down prior is a one-hot on the ground-truth class at step ``time_step`` (-1, the last: the authors' demo).
The clip classifier's accuracy on the pointing clips (at the last step, and of the per-step probabilities averaged)
and the frame classifier's are reported beside them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax import data as data_lib
from saliency_jax.data.clips import CLIP_SPECS, box_masks, collate_clips
from saliency_jax.evaluation import figures
from saliency_jax.evaluation.pointing_game import hits_at_points
from saliency_jax.evaluation.temporal_grounding import (DEFAULT_CLIP_TOLERANCE, clip_detections, clip_groundings,
                                                        clip_pointing_hits, pointing_accuracy,
                                                        temporal_detection_map)
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, linen_module,
                                          register_evaluator)
from saliency_jax.saliency._eb_rules import CELL_RULES

__all__ = ["TemporalGroundingSettings", "detection_rows", "evaluate_temporal_grounding", "temporal_grounding_evaluator"]

_RULE_NAMES = {"excitation": "exc", "gradient": "grad"}
_METHOD_NAMES = {"probability": "probability", "eb": "EB", "eb_r": "EB-R", "ceb": "cEB", "ceb_r": "cEB-R",
                 "bp": "BP", "bp_r": "BP-R", "center": "center"}


@dataclasses.dataclass(frozen=True)
class TemporalGroundingSettings(EvaluatorSettings):
    """Settings of the ``"temporal_grounding"`` evaluator.

    Attributes:
      pointing_clips: ``"single"`` test clips of the pointing game (Table 7.1) and of the classification accuracy.
      pointing_length: frames of those clips (0: the dataset's ``clips.length``, the training length).
      detection_clips: test clips per detection row (Table 7.2).
      two_segment_length: frames of the ``rand + GT`` and ``GT + rand`` clips (GT = half of them).
      insert_length: frames of the ``rand + GT + rand`` clips.
      gt_lengths: GT lengths of the ``rand + GT + rand`` rows (each <= ``insert_length - 2``).
      iou_threshold: temporal IoU of a correct detection (``alpha = 0.5``).
      tolerance: pointing-game tolerance in pixels (:data:`DEFAULT_CLIP_TOLERANCE` = 3 px for 64 px frames, the
        thesis's 15 px at 320 x 240 scaled).
      cell_rules: the LSTM cell rules of EB-R / cEB-R to compare, the first the headline (``"gradient"``, the
        authors'; ``"excitation"``).
      time_step: the step of the one-hot prior (-1: the last).
      layer: module path of the maps' layer (``conv3``; conv5 in the thesis).
      boundary: module path of the CNN/RNN boundary (``fc``; fc7 in the thesis).
      batch_size: clips per jitted call.
      seed: seed of the evaluation clips (the same for every run).
      figure_clips: ``rand + GT`` sample clips in the figure of maps.
    """

    pointing_clips: int = 200
    pointing_length: int = 0
    detection_clips: int = 200
    two_segment_length: int = 16
    insert_length: int = 32
    gt_lengths: tuple[int, ...] = (3, 10, 16)
    iou_threshold: float = 0.5
    tolerance: float = DEFAULT_CLIP_TOLERANCE
    cell_rules: tuple[str, ...] = ("gradient", "excitation")
    time_step: int = -1
    layer: str = "conv3"
    boundary: str = "fc"
    batch_size: int = 25
    seed: int = 1234
    figure_clips: int = 2

    def __post_init__(self):
        rules = tuple(self.cell_rules)
        if not rules or any(r not in CELL_RULES for r in rules) or len(set(rules)) != len(rules):
            raise ValueError(f"temporal_grounding.cell_rules must be distinct names from {CELL_RULES}; got {rules!r}")
        object.__setattr__(self, "cell_rules", rules)
        object.__setattr__(self, "gt_lengths", tuple(int(g) for g in self.gt_lengths))
        for name in ("pointing_clips", "detection_clips", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"temporal_grounding.{name} must be >= 1; got {getattr(self, name)}")
        if int(self.two_segment_length) < 2 or int(self.insert_length) < 3:
            raise ValueError("temporal_grounding.two_segment_length must be >= 2 and insert_length >= 3")
        bad = [g for g in self.gt_lengths if not 1 <= g <= int(self.insert_length) - 2]
        if bad:
            raise ValueError(f"temporal_grounding.gt_lengths {bad} do not fit rand + GT + rand clips of "
                             f"{self.insert_length} frames (1 <= length <= {int(self.insert_length) - 2})")
        if not 0 < float(self.iou_threshold) <= 1 or float(self.tolerance) < 0:
            raise ValueError("temporal_grounding.iou_threshold must be in (0, 1] and tolerance >= 0")


def detection_rows(settings: TemporalGroundingSettings) -> list[tuple[str, int, int]]:
    """The rows of the detection table: ``(layout, clip length, GT length)``."""
    half = int(settings.two_segment_length) // 2
    rows = [("rand+gt", int(settings.two_segment_length), int(settings.two_segment_length) - half),
            ("gt+rand", int(settings.two_segment_length), int(settings.two_segment_length) - half)]
    return rows + [("rand+gt+rand", int(settings.insert_length), g) for g in settings.gt_lengths]


def _row_key(layout: str, gt_length: int) -> str:
    return f"{layout}/{gt_length}"


def _eval_source(data, config, *, layout: str, length: int, gt_length: int | None, num_clips: int, seed: int):
    """Test clips of the run's clip dataset with the given layout (cached per experiment)."""
    ds = config.dataset
    if ds.name not in CLIP_SPECS:
        raise ValueError(f"the temporal_grounding evaluator needs a clip dataset ({CLIP_SPECS}); "
                         f"config.dataset.name is {ds.name!r}")
    options = {**dict(ds.get("options") or {}), "layout": layout, "length": int(length),
               "gt_length": int(gt_length or 0), "test_clips": int(num_clips), "seed": int(seed)}
    key = ("temporal_grounding", ds.name, ds.get("data_dir"), tuple(sorted((k, repr(v)) for k, v in options.items())))
    return data.cached(key, lambda: data_lib.get_source(ds.name, "test", data_dir=ds.get("data_dir"), options=options))


def _batches(source, num_clips: int, batch_size: int):
    """``(batch, real)``: collated clips ``[batch_size, ...]`` in order, the last batch padded with its last clip."""
    for start in range(0, num_clips, batch_size):
        idx = np.arange(start, min(start + batch_size, num_clips))
        real = len(idx)
        idx = np.concatenate([idx, np.full(batch_size - real, idx[-1])])
        yield collate_clips(source, idx), real


def _groundings(run, batch, settings, methods_by_rule: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """``{"probability", "eb", ..., "eb_r/<rule>", "ceb_r/<rule>"}`` for one batch (the -R EB methods per rule)."""
    out: dict[str, Any] = {}
    for rule, methods in methods_by_rule.items():
        g = clip_groundings(linen_module(run, 'temporal grounding'), run.variables, batch, methods=methods, layer=settings.layer,
                            boundary=settings.boundary, time_step=int(settings.time_step), cell_rule=rule)
        for method, value in g.items():
            out[f"{method}/{rule}" if method in ("eb_r", "ceb_r") else method] = value
    return out


def _rule_view(groundings: dict[str, Any], rule: str) -> dict[str, Any]:
    """The groundings of one cell rule under the plain method names (what :func:`clip_detections` reads)."""
    return {m.split("/")[0]: v for m, v in groundings.items() if "/" not in m or m.endswith(f"/{rule}")}


@functools.partial(jax.jit, static_argnames=("model",))
def _classify(model, variables, clips):
    logits = model.apply(variables, clips)
    frames = clips.reshape(-1, *clips.shape[2:])
    frame_logits = model.apply(variables, frames, method="frame_logits")
    return jax.nn.softmax(logits, -1), frame_logits.reshape(*clips.shape[:2], -1)


def evaluate_temporal_grounding(run, data, settings: TemporalGroundingSettings) -> dict[str, Any]:
    """The metrics of one trained run (see the module docstring); writes the sample clips' maps to
    ``run.workdir/temporal_grounding_samples.npz``.

    Returns:
      ``{"classification": {...}, "pointing": {method: accuracy}, "detection": {"known" | "unknown": {row:
      {method: mAP}}}, "frame_sums": {row: {method: {"mean": [time], "std": [time]}}}, "rows": [...],
      "clips": {...}}``, fractions in [0, 1].
    """
    config = run.config
    num_classes = int(run.num_classes)
    rules = settings.cell_rules
    first, bs = rules[0], int(settings.batch_size)

    # Table 7.1 shape: the pointing game on single-digit clips, and the classifiers' accuracies on them.
    length = int(settings.pointing_length) or int(dict(config.dataset.get("options") or {}).get("length", 16))
    source = _eval_source(data, config, layout="single", length=length, gt_length=None,
                          num_clips=settings.pointing_clips, seed=settings.seed)
    methods_by_rule = {first: ("eb", "eb_r", "ceb", "ceb_r", "bp", "bp_r")}
    methods_by_rule.update({rule: ("eb_r", "ceb_r") for rule in rules[1:]})
    hits: dict[str, list] = {}
    evaluated, labels, last, mean_prob, frame_correct = [], [], [], [], []
    for batch, real in _batches(source, settings.pointing_clips, bs):
        groundings = _groundings(run, batch, settings, methods_by_rule)
        for rule in rules:
            view = _rule_view(groundings, rule)
            methods = methods_by_rule[rule]
            h = clip_pointing_hits(view, batch, methods=methods, tolerance=float(settings.tolerance))
            for m in methods:
                key = f"{m}/{rule}" if m in ("eb_r", "ceb_r") else m
                hits.setdefault(key, []).append(h[m][:real])
        b, t, height, width = batch["image"].shape[:4]
        masks = box_masks(jnp.asarray(batch["boxes"]).reshape(b * t, 4), height, width)
        centre = jnp.tile(jnp.array([[height / 2, width / 2]], jnp.float32), (b * t, 1))
        hits.setdefault("center", []).append(
            np.asarray(hits_at_points(centre, masks, float(settings.tolerance))).reshape(b, t)[:real])
        evaluated.append(np.asarray(batch["gt_frames"], bool)[:real])
        labels.append(np.asarray(batch["label"])[:real])
        probs, frame_logits = (np.asarray(a) for a in _classify(linen_module(run, 'temporal grounding'), run.variables, jnp.asarray(batch["image"])))
        y = np.asarray(batch["label"])[:real]
        last.append(probs[:real, -1].argmax(-1) == y)
        mean_prob.append(probs[:real].mean(1).argmax(-1) == y)
        frame_correct.append((frame_logits[:real].argmax(-1) == y[:, None]).mean(1))
    evaluated, labels = np.concatenate(evaluated), np.concatenate(labels)
    pointing = {m: pointing_accuracy(np.concatenate(h), evaluated, labels, num_classes)[0] for m, h in hits.items()}
    classification = {"clip_accuracy_last_step": float(np.mean(np.concatenate(last))),
                      "clip_accuracy_mean_probability": float(np.mean(np.concatenate(mean_prob))),
                      "frame_accuracy": float(np.mean(np.concatenate(frame_correct)))}

    # Table 7.2 shape and Fig. 7.6 shape: detection rows.
    methods_by_rule = {first: ("probability", "eb_r", "ceb_r")}
    methods_by_rule.update({rule: ("eb_r", "ceb_r") for rule in rules[1:]})
    detection: dict[str, dict[str, dict[str, float]]] = {"known": {}, "unknown": {}}
    frame_sums: dict[str, dict[str, dict[str, list[float]]]] = {}
    samples = None
    for layout, clip_length, gt_length in detection_rows(settings):
        row = _row_key(layout, gt_length)
        source = _eval_source(data, config, layout=layout, length=clip_length, gt_length=gt_length,
                              num_clips=settings.detection_clips, seed=settings.seed)
        found: dict[tuple[str, str], list] = {}
        sums: dict[str, list] = {}
        gt_segments, row_labels = [], []
        for batch, real in _batches(source, settings.detection_clips, bs):
            groundings = _groundings(run, batch, settings, methods_by_rule)
            for rule in rules:
                view = _rule_view(groundings, rule)
                methods = methods_by_rule[rule]
                for known in (True, False):
                    for m, (segments, confidences) in clip_detections(view, batch, methods=methods,
                                                                      known_length=known).items():
                        key = f"{m}/{rule}" if m != "probability" else m
                        found.setdefault((key, "known" if known else "unknown"), []).append(
                            (segments[:real], confidences[:real]))
            for key, value in groundings.items():
                sums.setdefault(key, []).append(np.asarray(value if key == "probability" else value.frame_sums)[:real])
            gt_segments.append(np.asarray(batch["segment"])[:real])
            row_labels.append(np.asarray(batch["label"])[:real])
            if samples is None and layout == "rand+gt":
                n = min(int(settings.figure_clips), real)
                samples = {"frames": np.asarray(batch["image"])[:n, ..., 0], "boxes": np.asarray(batch["boxes"])[:n],
                           "gt_frames": np.asarray(batch["gt_frames"])[:n], "labels": np.asarray(batch["label"])[:n],
                           "eb_r": np.asarray(groundings[f"eb_r/{first}"].saliency)[:n],
                           "ceb_r": np.asarray(groundings[f"ceb_r/{first}"].saliency)[:n], "rule": first}
        gt_segments, row_labels = np.concatenate(gt_segments), np.concatenate(row_labels)
        for (key, kind), parts in found.items():
            segments = np.concatenate([p[0] for p in parts])
            confidences = np.concatenate([p[1] for p in parts])
            detection[kind].setdefault(row, {})[key] = temporal_detection_map(
                segments, confidences, gt_segments, row_labels, num_classes, float(settings.iou_threshold))[0]
        if layout in ("rand+gt", "gt+rand"):
            frame_sums[row] = {k: {"mean": np.concatenate(v).mean(0).tolist(), "std": np.concatenate(v).std(0).tolist()}
                               for k, v in sums.items()}
    if samples is not None and run.workdir is not None:
        np.savez_compressed(run.workdir / "temporal_grounding_samples.npz", **samples)
    return {"classification": classification, "pointing": pointing, "detection": detection,
            "frame_sums": frame_sums,
            "rows": [[layout, n, g] for layout, n, g in detection_rows(settings)],
            "clips": {"pointing": int(settings.pointing_clips), "pointing_length": length,
                      "detection": int(settings.detection_clips)}}


def _label(key: str) -> str:
    """``"ceb_r/gradient"`` -> ``"cEB-R (grad)"``."""
    method, _, rule = key.partition("/")
    return _METHOD_NAMES.get(method, method) + (f" ({_RULE_NAMES.get(rule, rule)})" if rule else "")


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def _report(settings: TemporalGroundingSettings, ctx: ReportContext) -> Section | None:
    results = ctx.metrics("temporal_grounding")
    if not results:
        return None
    rules = settings.cell_rules
    lines = []
    repeats = max(len(v) for v in results.values())
    spread = " (mean ± sample std over repeats)" if repeats > 1 else ""

    # Classification.
    lines += [f"**Classification** of the pointing clips (test digits; %){spread}:", "",
              "| arm | clip, last step | clip, mean of the steps' probabilities | frame classifier |",
              "| --- | --- | --- | --- |"]
    for arm, runs in results.items():
        c = [r["classification"] for r in runs]
        lines.append(f"| {arm} | {_cell([x['clip_accuracy_last_step'] for x in c])} | "
                     f"{_cell([x['clip_accuracy_mean_probability'] for x in c])} | "
                     f"{_cell([x['frame_accuracy'] for x in c])} |")

    # Table 7.1 shape.
    pointing_keys = ["center", "eb", *[f"eb_r/{r}" for r in rules], "ceb", *[f"ceb_r/{r}" for r in rules], "bp",
                     "bp_r"]
    first = next(iter(results.values()))[0]
    lines += ["", f"**Pointing game** (Table 7.1 shape; accuracy %, mean over classes of the per-frame hit rates; "
              f"{first['clips']['pointing']} single-digit test clips of {first['clips']['pointing_length']} frames, "
              f"tolerance {settings.tolerance:g} px){spread}. EB / cEB / BP: the single-frame classifier on every "
              f"frame; -R: the CNN-LSTM through time (prior at step {settings.time_step}); (exc) / (grad): the "
              "LSTM cell's rule, EB's with the gates as constant weights / the cell's gradient as in the authors' "
              "released Caffe LSTM unit (the thesis's numbers). The centre of the frame (no model) shows how much "
              "of the frame the digits' boxes cover. Thesis (UCF101, VGG16-LSTM): EB 55.8, EB-R 61.5, cEB 37.0, "
              "cEB-R 39.1, BP 37.3, BP-R 39.2.", "",
              "| arm | " + " | ".join(_label(k) for k in pointing_keys) + " |",
              "| --- |" + " --- |" * len(pointing_keys)]
    for arm, runs in results.items():
        lines.append(f"| {arm} | " + " | ".join(_cell([r["pointing"].get(k) for r in runs]) for k in pointing_keys)
                     + " |")

    # Table 7.2 shape.
    rows = [tuple(r) for r in first["rows"]]
    known_keys = ["probability", *[f"{m}/{r}" for r in rules for m in ("eb_r", "ceb_r")]]
    lines += ["", f"**Temporal detection** (Table 7.2 shape; mAP % at temporal IoU {settings.iou_threshold:g}; "
              f"{first['clips']['detection']} test clips per row; the class known){spread}. Known length: the window "
              "of the GT length with the highest score sum; unknown length: anchor at the highest frame score, "
              "extended while frame scores are non-negative (Sec. 7.2). Probability: the class probability "
              "thresholded to +-1 at 0.5. EB-R with unknown length (not in the thesis) returns the whole clip "
              "(non-negative frame sums), a hit exactly when the GT covers at least half of the clip (IoU = GT "
              "length / clip length). The thesis's numbers were produced with the gradient cell rule. Thesis, "
              "synthetic UCF101 clips of 128 frames, known length 11 / 41 / 65: probability 8.5 / 28.2 / 47.7, EB-R 11.3 / 38.5 / 56.3, cEB-R 15.5 / 53.2 / "
              "73.5; unknown: probability 3.4 / 9.5 / 35.7, cEB-R 4.1 / 47.9 / 62.0."]
    for kind in ("known", "unknown"):
        lines += ["", f"{kind.capitalize()} action length:", "",
                  "| arm | layout | frames | GT length | " + " | ".join(_label(k) for k in known_keys) + " |",
                  "| --- | --- | --- | --- |" + " --- |" * len(known_keys)]
        for arm, runs in results.items():
            for layout, frames, gt in rows:
                row = _row_key(layout, gt)
                cells = [_cell([r["detection"][kind].get(row, {}).get(k) for r in runs]) for k in known_keys]
                lines.append(f"| {arm} | {layout.replace('gt', 'GT')} | {frames} | {gt} | " + " | ".join(cells) + " |")

    # Fig. 7.6 shape and the sample maps (first arm, first repeat).
    arm0 = next(iter(results))
    run0 = results[arm0][0]
    panels: dict[str, dict[str, tuple]] = {}
    for key in [*[f"ceb_r/{r}" for r in rules], *[f"eb_r/{r}" for r in rules], "probability"]:
        curves = {}
        for row, per_method in run0["frame_sums"].items():
            if key in per_method:
                curves[row.split("/")[0].replace("gt", "GT")] = (per_method[key]["mean"], per_method[key]["std"])
        if curves:
            panels[_label(key) + (" map sum" if key != "probability" else " of the class")] = curves
    if panels:
        half = int(settings.two_segment_length) / 2 - 0.5
        figures.frame_sums_figure(panels, ctx.workdir / "temporal_grounding_frame_sums.png", boundary=half,
                                  ylabel="per-frame score",
                                  title=f"Per-frame map sums over time, mean ± std over clips ({arm0}, first repeat; "
                                        "Fig. 7.6 shape)")
        lines += ["", f"**Per-frame map sums over time** (Fig. 7.6 shape: rand + GT and GT + rand clips, the boundary "
                  f"at the midpoint; the sums of the maps at {settings.layer}, which EB's conservation makes the "
                  f"frame's signal at the boundary {settings.boundary} but for units without input (the thesis plots "
                  "fc7); mean ± std over clips; first repeat of the first arm):", "",
                  "![frame sums](temporal_grounding_frame_sums.png)"]
    sample_path = ctx.runs[arm0][0].workdir / "temporal_grounding_samples.npz"
    if sample_path.exists():
        stored = np.load(sample_path)
        rule = str(stored["rule"])
        clips = [{"frames": stored["frames"][k], "boxes": stored["boxes"][k], "gt_frames": stored["gt_frames"][k],
                  "label": int(stored["labels"][k]),
                  "maps": {f"EB-R ({_RULE_NAMES.get(rule, rule)})": stored["eb_r"][k],
                           f"cEB-R ({_RULE_NAMES.get(rule, rule)})": stored["ceb_r"][k]}}
                 for k in range(stored["frames"].shape[0])]
        if clips:
            figures.clip_maps_figure(clips, ctx.workdir / "temporal_grounding_samples.png",
                                     title="rand + GT test clips: frames (box: green GT digit, orange rand digit) and "
                                           "the maps of the GT class (red +, blue -; title: the map's sum)")
            lines += ["", "**Sample clips** (Fig. 7.5 shape; first repeat of the first arm):", "",
                      "![sample clips](temporal_grounding_samples.png)"]
    return Section("Spatiotemporal grounding (Bargal 2019, Ch. 7)", "\n".join(lines))


@register_evaluator("temporal_grounding", TemporalGroundingSettings)
def temporal_grounding_evaluator(settings: TemporalGroundingSettings) -> Evaluator:
    """The spatiotemporal grounding benchmark of a trained clip classifier (module docstring)."""

    def evaluate(run, data):
        return evaluate_temporal_grounding(run, data, settings)

    return Evaluator(evaluate, functools.partial(_report, settings))
