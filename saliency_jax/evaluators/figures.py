"""Evaluators that make the experiment's figures: Grad-CAM maps side by side (``"saliency_maps"``, Morales et al.
2021 Figs. 2-3, with the salient area of each arm) and the training curves (``"training_curves"``)."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax import data as data_lib
from saliency_jax import evaluation
from saliency_jax.models.build import model_layers
from saliency_jax.plan import TrainResult
from saliency_jax import workdirs
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, register_evaluator,
                                          run_model)
from saliency_jax.saliency import grad_cam

__all__ = ["SaliencyMapsSettings", "TrainingCurvesSettings", "saliency_maps_evaluator", "training_curves_evaluator",
           "grad_cam_maps", "read_metrics_log"]


def read_metrics_log(workdir) -> list[dict[str, float]]:
    """The records of a run's ``workdir/metrics.jsonl`` (as :func:`saliency_jax.train.train` writes them)."""
    import pathlib

    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grad_cam_maps(run: TrainResult, images: np.ndarray, labels: np.ndarray, *, layer: str,
                  score: str = "softmax", weighting: str = "guided") -> np.ndarray:
    """Grad-CAM maps of the ground-truth classes with a trained run (inference mode).

    Args:
      run: the trained run.
      images: [n, height, width, channels] float32 in [0, 1].
      labels: int [n].
      layer: the Grad-CAM layer's path.
      score: ``"softmax"`` or ``"logit"``; weighting: ``"guided"`` or ``"plain"`` (:func:`saliency_jax.saliency.grad_cam`).

    Returns:
      float32 [n, height, width] in [0, 1].
    """
    return np.asarray(_grad_cam_maps(run.variables, jnp.asarray(images), jnp.asarray(labels), model=run_model(run),
                                     layer=layer, score=score, weighting=weighting))


@functools.partial(jax.jit, static_argnames=("model", "layer", "score", "weighting"))
def _grad_cam_maps(variables, images, labels, *, model, layer, score, weighting):
    """Jitted once per process for each (model, layer, settings, shapes): the weights are an argument."""
    return grad_cam(model.layer_model(variables, layer), images, labels, score=score, weighting=weighting)


def _figure_examples(data, config, n: int):
    """``n`` test images spread evenly over the test split (the same for every arm), with their labels."""
    source = data.test_source(config)
    n = min(n, len(source))
    idx = np.linspace(0, len(source) - 1, n).astype(int)
    batch = next(iter(data_lib.make_eval_batches(source, idx, batch_size=max(n, 1),
                                                 image_size=config.dataset.get("image_size"))))
    return batch["image"][:n], batch["label"][:n], source


@dataclasses.dataclass(frozen=True)
class SaliencyMapsSettings(EvaluatorSettings):
    """Settings of the ``"saliency_maps"`` evaluator.

    Attributes:
      examples: number of test images in the figure (spread evenly over the test split).
      score, weighting: Grad-CAM's class score and weights (defaults: distraction training's, the authors' code).
      threshold: the salient area of a map is the fraction of its pixels above this (distraction's ``th``).
    """

    examples: int = 8
    score: str = "softmax"
    weighting: str = "guided"
    threshold: float = 0.85

    def __post_init__(self):
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0; got {self.examples}")
        if self.score not in ("logit", "softmax"):
            raise ValueError(f"score must be 'logit' or 'softmax' (Grad-CAM's class score); got {self.score!r}")
        if self.weighting not in ("plain", "guided"):
            raise ValueError(f"weighting must be 'plain' or 'guided' (Grad-CAM's weights); got {self.weighting!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (maps are normalised); got {self.threshold}")


@register_evaluator("saliency_maps", SaliencyMapsSettings)
def saliency_maps_evaluator(settings: SaliencyMapsSettings) -> Evaluator:
    """Grad-CAM maps of the ground-truth class on the figure's test images at ``config.model``'s Grad-CAM layer; the
    mean salient area (fraction of pixels above ``threshold``); the figure of inputs and every arm's maps (first
    repeat) side by side. The overlays (:func:`saliency_jax.evaluation.overlay`) also go to the run's TensorBoard log
    (``workdir/tensorboard``, tag ``saliency_maps/grad_cam``, at the final step)."""

    def evaluate(run, data):
        images, labels, source = _figure_examples(data, run.config, settings.examples)
        if not len(images):
            return {"salient_area": None}
        layer = model_layers(run.config).grad_cam_layer
        maps = grad_cam_maps(run, images, labels, layer=layer, score=settings.score, weighting=settings.weighting)
        names = getattr(source, "class_names", None)
        np.savez_compressed(run.workdir / "saliency_maps.npz", maps=maps, images=images, labels=labels,
                            names=np.asarray([names[int(y)] if names else str(y) for y in labels]))
        # The overlays also go to the run's TensorBoard log, at its final step.
        log = workdirs.MetricsLog(run.workdir, enabled=jax.process_index() == 0)
        try:
            log.write_images(int(run.state.step), "saliency_maps/grad_cam", evaluation.overlay(images, maps))
        finally:
            log.close()
        return {"salient_area": float(np.mean(maps > settings.threshold)), "layer": layer}

    def report(ctx: ReportContext) -> Section:
        first = {a: ctx.runs[a][0] for a in ctx.arms}
        maps = {a: np.load(r.workdir / "saliency_maps.npz")["maps"] for a, r in first.items()
                if (r.workdir / "saliency_maps.npz").exists()}
        lines = [f"Mean fraction of pixels whose normalised Grad-CAM weight exceeds {settings.threshold} on the "
                 f"figure's {settings.examples} test images (larger: evidence spread over more of the image).", "",
                 "| arm | salient area |", "| --- | --- |"]
        for a in ctx.arms:
            values = [r.metrics["saliency_maps"]["salient_area"] for r in ctx.runs[a]
                      if r.metrics.get("saliency_maps", {}).get("salient_area") is not None]
            if not values:
                lines.append(f"| {a} | n/a |")
            elif len(values) == 1:
                lines.append(f"| {a} | {values[0]:.3f} |")
            else:
                lines.append(f"| {a} | {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} |")
        if maps:
            arm = next(iter(maps))
            stored = np.load(first[arm].workdir / "saliency_maps.npz")
            layer = model_layers(first[arm].config).grad_cam_layer
            evaluation.saliency_figure(
                stored["images"], maps, ctx.workdir / "saliency_maps.png", row_labels=[str(n) for n in stored["names"]],
                title=f"Grad-CAM ({settings.score}, {settings.weighting}) at {layer}, ground-truth class")
            lines += ["", "![Grad-CAM maps](saliency_maps.png)"]
        return Section("Saliency maps and salient area", "\n".join(lines))

    return Evaluator(evaluate, report)


@dataclasses.dataclass(frozen=True)
class TrainingCurvesSettings(EvaluatorSettings):
    """Settings of the ``"training_curves"`` evaluator.

    Attributes:
      metrics: the logged metrics to plot (``metrics.jsonl`` keys).
    """

    metrics: tuple[str, ...] = ("loss", "accuracy")


@register_evaluator("training_curves", TrainingCurvesSettings, headline="loss")  # the last logged training loss
def training_curves_evaluator(settings: TrainingCurvesSettings) -> Evaluator:
    """The training curves of every arm (first repeat) from ``metrics.jsonl``; the final logged values per run."""

    def evaluate(run, data):
        log = read_metrics_log(run.workdir)
        return {k: v for k, v in (log[-1] if log else {}).items() if k in settings.metrics}

    def report(ctx: ReportContext) -> Section:
        history = {a: read_metrics_log(ctx.runs[a][0].workdir) for a in ctx.arms}
        evaluation.training_curves_figure(history, ctx.workdir / "training_curves.png",
                                          metrics=list(settings.metrics))
        return Section("Training curves", "Logged on the mini-batches trained on (after the scheme's batch "
                       "transform, e.g. occlusion).\n\n![Training curves](training_curves.png)")

    return Evaluator(evaluate, report)
