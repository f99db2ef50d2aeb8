"""The negative class activation maps of a trained GAP network (``"negative_cams"``): what the HNC loss (Sun et al.,
ECCV 2020) flattens, measured on test images."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax import data as data_lib
from saliency_jax.models.build import model_layers
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, register_evaluator,
                                          run_model)
from saliency_jax.evaluators.utilization import test_subset
from saliency_jax.saliency import class_activation_maps, classifier_params
from saliency_jax.training.hnc import negative_cams

__all__ = ["NegativeCamsSettings", "negative_cams_evaluator"]


@dataclasses.dataclass(frozen=True)
class NegativeCamsSettings(EvaluatorSettings):
    """Settings of the ``"negative_cams"`` evaluator.

    Attributes:
      num_negatives: ``k`` hardest negative classes per image (clipped to ``num_classes - 1``).
      examples: test images (a seeded random subset; 0: the whole test split).
      seed: seed of the subset.
    """

    num_negatives: int = 100
    examples: int = 2000
    seed: int = 0


@register_evaluator("negative_cams", NegativeCamsSettings)
def negative_cams_evaluator(settings: NegativeCamsSettings) -> Evaluator:
    """Peaks of the CAMs of each test image's ``k`` hardest negative classes (inference mode), at
    ``config.model``'s Grad-CAM layer and classifier.

    Metrics (means over the images and their negatives): ``peak`` - the largest CAM value (logit units; the HNC
    loss should lower it); ``peak_to_mean`` - the largest minus the mean value, the height of the peak above the
    map's level (a constant map has 0); ``softmax_peak`` - the largest value of the spatial softmax times ``h w`` (1
    for a constant map; what the ``kd`` variant flattens); ``positive_peak`` - the largest value of the
    ground-truth class's CAM, for scale.
    """

    def evaluate(run, data):
        config = run.config
        layers = model_layers(config)
        source = data.test_source(config)
        idx = test_subset(len(source), settings.examples, settings.seed)
        variables = run.variables

        @jax.jit
        def stats(images, labels):
            out = run_model(run).capture(variables, images, (layers.grad_cam_layer,))
            features, logits = out.activations[layers.grad_cam_layer], out.logits
            cams, _ = negative_cams(features, variables["params"], layers.classifier, logits, labels,
                                    settings.num_negatives)
            flat = cams.reshape(*cams.shape[:2], -1)
            kernel, bias = classifier_params(variables, layers.classifier)
            positive = class_activation_maps(features, kernel, bias, labels[:, None])
            return {"peak": jnp.mean(jnp.max(flat, -1), -1),
                    "peak_to_mean": jnp.mean(jnp.max(flat, -1) - jnp.mean(flat, -1), -1),
                    "softmax_peak": jnp.mean(jnp.max(jax.nn.softmax(flat, -1), -1) * flat.shape[-1], -1),
                    "positive_peak": jnp.max(positive.reshape(positive.shape[0], -1), -1)}

        values = {k: [] for k in ("peak", "peak_to_mean", "softmax_peak", "positive_peak")}
        for batch in data_lib.make_eval_batches(source, idx, batch_size=config.eval_batch_size,
                                                image_size=config.dataset.get("image_size")):
            keep = np.asarray(batch["mask"]).astype(bool)
            out = stats(jnp.asarray(batch["image"]), jnp.asarray(batch["label"], jnp.int32))
            for k in values:
                values[k].append(np.asarray(out[k])[keep])
        return {"examples": int(len(idx)), **{k: float(np.mean(np.concatenate(v))) for k, v in values.items()}}

    def report(ctx: ReportContext) -> Section:
        results = ctx.metrics("negative_cams")
        keys = ("peak", "peak_to_mean", "softmax_peak", "positive_peak")
        lines = [f"CAMs of each test image's {settings.num_negatives} (at most classes - 1) highest-scoring wrong "
                 f"classes, inference mode, on {next(iter(results.values()))[0]['examples']} test images. peak: the "
                 "largest CAM value (logit units); peak - mean: its height above the map's mean; softmax peak: the "
                 "largest spatial-softmax value x h w (1 = flat); ground-truth peak: the true class's CAM maximum, "
                 "for scale.", "",
                 "| arm | negative peak | negative peak - mean | negative softmax peak | ground-truth peak |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        for a, runs in results.items():
            cells = []
            for k in keys:
                v = [r[k] for r in runs]
                cells.append(f"{np.mean(v):.3f}" + (f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else ""))
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        return Section("Negative class activation maps (what the HNC loss flattens)", "\n".join(lines))

    return Evaluator(evaluate, report)
