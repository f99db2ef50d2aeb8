"""Test-set classification metrics: clean (``"classification"``), under Random Erasing (``"random_erasing"``) and under
an FGSM attack (``"fgsm"``).

Morales et al. 2021, Tables 1, 3 and 4: accuracy, macro / weighted precision, recall and F1, per-class true positive
rates (scikit-learn), on the clean test split and with every test image randomly erased (Zhong et al. 2020; the same
erased images for every arm: the erasing keys depend only on the settings' seed and the batch index).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saliency_jax import data as data_lib
from saliency_jax import evaluation
from saliency_jax.evaluation import robustness
from saliency_jax.evaluation.predict import predict
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, register_evaluator,
                                          run_model)

__all__ = ["ClassificationSettings", "RandomErasingSettings", "FGSMSettings", "classification_evaluator",
           "random_erasing_evaluator", "fgsm_evaluator", "fgsm_images", "test_predictions", "summarize"]


def summarize(values: list[Any]):
    """One run: its own numbers; several: mean and sample std of every number (``summarize_repeats``)."""
    return values[0] if len(values) == 1 else evaluation.summarize_repeats(values)


def _mean(value) -> float:
    return value["mean"] if isinstance(value, dict) else value


def _fmt(value) -> str:
    return f"{value['mean']:.3f} ± {value['std']:.3f}" if isinstance(value, dict) else f"{value:.3f}"


def test_predictions(run, data, transform=None, seed: int = 0):
    """``(labels [n], predictions [n], probabilities [n, classes], test_source)`` of a trained run on its test split
    (inference mode, padded eval batches of ``config.eval_batch_size``, an optional on-device ``transform``)."""
    config = run.config
    source = data.test_source(config)
    batches = data_lib.make_eval_batches(source, None, batch_size=config.eval_batch_size,
                                         image_size=config.dataset.get("image_size"),
                                         pad_to_multiple_of=jax.device_count())
    labels, preds, probs = predict(run.model, run.variables, batches, transform=transform, seed=seed)
    return labels, preds, probs, source


def _class_names(source) -> list[str]:
    return list(getattr(source, "class_names", None) or [str(i) for i in range(source.num_classes)])


@dataclasses.dataclass(frozen=True)
class ClassificationSettings(EvaluatorSettings):
    """Settings of the ``"classification"`` evaluator (none: the whole test split, clean)."""


@register_evaluator("classification", ClassificationSettings)
def classification_evaluator(settings: ClassificationSettings) -> Evaluator:
    """Clean test-set metrics (:func:`saliency_jax.evaluation.classification_metrics`), Tables 1 and 3 shape."""
    del settings

    def evaluate(run, data):
        labels, preds, _, source = test_predictions(run, data)
        return evaluation.classification_metrics(labels, preds, source.num_classes, class_names=_class_names(source))

    def report(ctx: ReportContext) -> Section:
        summary = {a: summarize(v) for a, v in ctx.metrics("classification").items()}
        text = "\n".join([
            evaluation.metrics_table(summary), "",
            "Per-class true positive rate (Table 3 shape):", "",
            evaluation.metrics_table(summary, rows=(), per_class=True)])
        return Section("Test set (Table 1 / Table 3 shape)", text)

    return Evaluator(evaluate, report)


@dataclasses.dataclass(frozen=True)
class RandomErasingSettings(EvaluatorSettings):
    """Settings of the ``"random_erasing"`` evaluator (Zhong et al. 2020; Morales et al. 2021, Table 4).

    Attributes:
      probability: probability that a test image is erased (1: every image).
      area_range: (min, max) erased fraction of the image area.
      aspect_range: (min, max) aspect ratio of the erased rectangle.
      fill: ``"random"`` (uniform noise), ``"zero"``, ... (:func:`saliency_jax.evaluation.random_erasing`).
      seed: seed of the erasing keys (the same erased images for every arm).
    """

    probability: float = 1.0
    area_range: tuple[float, float] = (0.02, 0.4)
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3)
    fill: str = "random"
    seed: int = 1234

    def __post_init__(self):  # the erasing's own checks, at config time (Raises: ValueError, as random_erasing's)
        robustness._validated_args(np.zeros((1, 8, 8, 3), np.float32), self.probability, tuple(self.area_range),
                                   tuple(self.aspect_range), self.fill, (0.0, 1.0), 100)


@dataclasses.dataclass(frozen=True)
class _Erase:
    """The on-device erasing ``(key, images) -> images`` of the settings (hashable by value, so that
    :func:`saliency_jax.train.predict` compiles it once for every arm)."""

    settings: RandomErasingSettings

    def __call__(self, key, images):
        s = self.settings
        return evaluation.random_erasing(key, images, probability=s.probability, area_range=tuple(s.area_range),
                                         aspect_range=tuple(s.aspect_range), fill=s.fill)


@register_evaluator("random_erasing", RandomErasingSettings)
def random_erasing_evaluator(settings: RandomErasingSettings) -> Evaluator:
    """Test-set metrics with every test image randomly erased (Table 4 shape)."""

    erase = _Erase(settings)  # hashes by the settings: one compilation for every arm

    def evaluate(run, data):
        labels, preds, _, source = test_predictions(run, data, transform=erase, seed=settings.seed)
        return evaluation.classification_metrics(labels, preds, source.num_classes, class_names=_class_names(source))

    def report(ctx: ReportContext) -> Section:
        erased = {a: summarize(v) for a, v in ctx.metrics("random_erasing").items()}
        clean = {a: summarize(v) for a, v in ctx.metrics("classification").items()}
        lines = [f"Zhong et al. 2020, probability {settings.probability}, area {tuple(settings.area_range)}, fill "
                 f"{settings.fill}, seed {settings.seed} (the same erased images for every arm).", "",
                 evaluation.metrics_table(erased)]
        if clean:
            lines += ["", "| arm | clean accuracy | erased accuracy | drop |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {a} | {_fmt(clean[a]['accuracy'])} | {_fmt(erased[a]['accuracy'])} | "
                      f"{_mean(erased[a]['accuracy']) - _mean(clean[a]['accuracy']):+.3f} |"
                      for a in ctx.arms if a in clean and a in erased]
        return Section("Random Erasing of every test image (Table 4 shape)", "\n".join(lines))

    return Evaluator(evaluate, report)


@dataclasses.dataclass(frozen=True)
class FGSMSettings(EvaluatorSettings):
    """Settings of the ``"fgsm"`` evaluator (Goodfellow, Shlens, Szegedy, ICLR 2015).

    Attributes:
      epsilons: attack strengths in pixel units of images in [0, 1] (``2 / 255`` is two grey levels).
      examples: test images attacked (a seeded random subset; 0: the whole test split).
      seed: seed of the subset.
    """

    epsilons: tuple[float, ...] = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
    examples: int = 0
    seed: int = 0

    def __post_init__(self):
        if not self.epsilons or any(not isinstance(e, (int, float)) or not 0 <= e <= 1 for e in self.epsilons):
            raise ValueError(f"epsilons must be numbers in [0, 1] (pixel units); got {self.epsilons!r}")
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0 (0: the whole test split); got {self.examples}")


def fgsm_images(logits_fn, images, labels, epsilon: float):
    """The Fast Gradient Sign Method: ``clip(x + epsilon * sign(d CE(f(x), y) / d x), 0, 1)``.

    Args:
      logits_fn: ``images -> logits [batch, num_classes]`` (inference mode).
      images: [batch, height, width, channels] float in [0, 1].
      labels: int [batch], the true classes (the attack raises their loss).
      epsilon: the L-infinity step, in the images' units.

    Returns:
      The attacked images, same shape and dtype.
    """
    def loss(x):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), labels))

    step = jnp.sign(jax.grad(loss)(images))
    return jnp.clip(images + epsilon * step, 0.0, 1.0).astype(images.dtype)


@register_evaluator("fgsm", FGSMSettings,  # headline: the accuracy at the largest epsilon
                    headline=lambda m: "accuracy." + list(m["accuracy"])[-1])
def fgsm_evaluator(settings: FGSMSettings) -> Evaluator:
    """Test accuracy under an FGSM attack for each ``epsilon`` (one gradient per image, inference mode).

    The robustness claim of Sun et al. 2020 (HNC), measured: accuracy as the attack grows.
    """
    from saliency_jax.evaluators.utilization import test_subset

    def evaluate(run, data):
        config = run.config
        source = data.test_source(config)
        idx = test_subset(len(source), settings.examples, settings.seed)
        variables = run.variables

        @jax.jit
        def correct(images, labels, epsilon):
            logits_fn = lambda x: run_model(run).apply(variables, x)  # noqa: E731
            attacked = fgsm_images(logits_fn, images, labels, epsilon)
            return jnp.argmax(logits_fn(attacked), -1) == labels

        hits = {float(e): [] for e in settings.epsilons}
        for batch in data_lib.make_eval_batches(source, idx, batch_size=config.eval_batch_size,
                                                image_size=config.dataset.get("image_size")):
            keep = np.asarray(batch["mask"]).astype(bool)
            images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"], jnp.int32)
            for e in hits:
                hits[e].append(np.asarray(correct(images, labels, jnp.float32(e)))[keep])
        return {"examples": int(len(idx)),
                "accuracy": {f"{e:.5f}": float(np.mean(np.concatenate(v))) for e, v in hits.items()}}

    def report(ctx: ReportContext) -> Section:
        results = ctx.metrics("fgsm")
        eps = [f"{float(e):.5f}" for e in settings.epsilons]
        lines = [f"Test accuracy under the Fast Gradient Sign Method (Goodfellow et al. 2015), epsilon in pixel "
                 f"units of [0, 1] images (x 255 in grey levels), on "
                 f"{next(iter(results.values()))[0]['examples']} test images.", "",
                 "| arm | " + " | ".join(f"eps {float(e) * 255:.3g}/255" for e in settings.epsilons) + " |",
                 "| --- |" + " ---: |" * len(eps)]
        for a, runs in results.items():
            cells = []
            for e in eps:
                values = [r["accuracy"][e] for r in runs]
                cells.append(f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""))
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        return Section("Robustness to FGSM", "\n".join(lines))

    return Evaluator(evaluate, report)
