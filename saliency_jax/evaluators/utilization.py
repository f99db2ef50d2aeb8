"""Excitation Dropout's analyses (Bargal 2019, Ch. 5) as evaluators: ``"utilization"`` and ``"compression"``.

* ``"utilization"``: test accuracy (Tables 5.1, 5.2, 5.5 shape) and network utilization at a layer over the test
  images (Table 5.3: # neurons ON, peak ``p_EB``, entropy of activations, entropy of ``p_EB`` of the ground-truth
  class), conservative filters of the layer's dense weights (units whose weight vector moved less than Δ from the
  run's initial weights, Ch. 3), and the same metrics at step 0 and every kept checkpoint (Figs. 5.3, 5.6-5.9).
* ``"compression"``: ground-truth probability with the most / least relevant units switched off by cumulative
  ``p_EB`` and with ``k`` random units switched off (Fig. 5.5).

Both run in inference mode on a seeded random subset of the test split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax import data as data_lib
from saliency_jax.evaluation import utilization as util
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, linen_module,
                                          register_evaluator)
from saliency_jax.saliency import linen_head, linen_layer
from saliency_jax.training import layer_excitation

__all__ = ["UtilizationSettings", "CompressionSettings", "utilization_evaluator", "compression_evaluator",
           "analyse_layer", "test_subset"]


def test_subset(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``limit`` of ``n`` test examples (all when ``limit`` is 0)."""
    idx = np.arange(n)
    if limit and limit < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    return idx


_FUNCTIONS: dict = {}


def _layer_functions(model, layer: str):
    """``activations_and_eb(variables, images, labels)`` and jitted ``per_example`` for a model and layer (cached)."""
    key = (id(model), layer)
    if key not in _FUNCTIONS:
        _FUNCTIONS[key] = (model, _build_layer_functions(model, layer))  # the model is kept alive with its id
    return _FUNCTIONS[key][1]


def _build_layer_functions(model, layer: str):

    def activations_and_eb(variables, images, labels):
        logits, a = linen_layer(model, variables, layer, train=False)(images)
        head = linen_head(model, variables, layer, images, train=False)
        p_eb = layer_excitation(head, a, labels)
        return logits, a, p_eb, head

    @jax.jit
    def per_example(variables, images, labels):
        logits, a, p_eb, _ = activations_and_eb(variables, images, labels)
        return logits, util.utilization_per_example(a, p_eb)

    return activations_and_eb, per_example


def analyse_layer(model, variables, layer: str, source, indices, config, *, batch_size: int) -> dict[str, Any]:
    """Test accuracy and per-example utilization at ``layer`` over ``source[indices]`` (inference mode).

    Returns:
      ``{"accuracy": float, "utilization": {metric: {"mean", "std"}}, "examples": int}``.
    """
    _, per_example = _layer_functions(model, layer)
    batches = data_lib.make_eval_batches(source, indices, batch_size=batch_size,
                                         image_size=config.dataset.get("image_size"))
    correct, values = [], {k: [] for k in util.UTILIZATION_METRICS}
    for batch in batches:
        keep = np.asarray(batch["mask"]).astype(bool)
        logits, per = per_example(variables, jnp.asarray(batch["image"]), jnp.asarray(batch["label"], jnp.int32))
        correct.append((np.asarray(logits).argmax(-1) == np.asarray(batch["label"]))[keep])
        for k in values:
            values[k].append(np.asarray(per[k])[keep])
    correct = np.concatenate(correct)
    return {"accuracy": float(correct.mean()), "examples": int(correct.size),
            "utilization": util.utilization_metrics({k: np.concatenate(v) for k, v in values.items()})}


def _get_path(tree, path: str):
    node = tree
    for part in path.split("/"):
        if part not in node:
            raise KeyError(f"no parameter path {path!r} (missing {part!r}; have {list(node)})")
        node = node[part]
    return node


def _mean_std(values) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _fmt(v: dict[str, float], digits: int = 4) -> str:
    return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class UtilizationSettings(EvaluatorSettings):
    """Settings of the ``"utilization"`` evaluator.

    Attributes:
      layer: path of the analysed layer's (post-ReLU) activations (CNN-2: ``"relu_fc1"``, the dropout point).
      weights: module path of the dense layer whose units they are (its kernel columns: conservative filters).
      test_examples: test images for the final metrics (0: the whole test split).
      curve_examples: test images for the metrics at every checkpoint.
      conservative_deltas: thresholds Δ (L2 weight change) of the conservative-filter counts.
      seed: seed of the test subsets.
    """

    layer: str = "relu_fc1"
    weights: str = "fc1"
    test_examples: int = 0
    curve_examples: int = 1000
    conservative_deltas: tuple[float, ...] = (0.05, 0.1, 0.25)
    seed: int = 0


@register_evaluator("utilization", UtilizationSettings)
def utilization_evaluator(settings: UtilizationSettings) -> Evaluator:
    """Test accuracy, utilization, conservative filters and their evolution over the kept checkpoints."""
    deltas = tuple(float(d) for d in settings.conservative_deltas)

    def evaluate(run, data):
        config = run.config
        source = data.test_source(config)
        bs = config.get("eval_batch_size", 256)
        test_idx = test_subset(len(source), settings.test_examples, settings.seed)
        curve_idx = test_subset(len(source), settings.curve_examples, settings.seed + 1)
        final = analyse_layer(linen_module(run, 'the utilization evaluator'), run.variables, settings.layer, source, test_idx, config, batch_size=bs)
        w0 = _get_path(run.initial_variables["params"], settings.weights)["kernel"]
        w1 = _get_path(run.variables["params"], settings.weights)["kernel"]
        conservative = util.conservative_filters(w0, w1, deltas)
        history = []
        for step, variables in [(0, run.initial_variables)] + [(s, None) for s in run.checkpoint_steps()]:
            if variables is None:
                variables = run.restore(step).variables()
            r = analyse_layer(linen_module(run, 'the utilization evaluator'), variables, settings.layer, source, curve_idx, config, batch_size=bs)
            history.append({"step": step, "test_accuracy": r["accuracy"],
                            **{k: v["mean"] for k, v in r["utilization"].items()}})
        return {"test_accuracy": final["accuracy"], "test_examples": final["examples"],
                "curve_examples": len(curve_idx), "utilization": final["utilization"],
                "conservative_filters": {str(k): v for k, v in conservative.items()}, "history": history}

    def report(ctx: ReportContext) -> Section:
        runs = ctx.metrics("utilization")
        arms = list(runs)
        summary = {a: {"test_accuracy": _mean_std([r["test_accuracy"] for r in rs]),
                       "utilization": {m: _mean_std([r["utilization"][m]["mean"] for r in rs])
                                       for m in util.UTILIZATION_METRICS},
                       "conservative_filters": {d: _mean_std([r["conservative_filters"][str(d)] for r in rs])
                                                for d in deltas},
                       "train_seconds": _mean_std([r.train_seconds for r in ctx.runs[a]])}
                   for a, rs in runs.items()}
        ref = "none" if "none" in arms else arms[0]
        base = summary[ref]["test_accuracy"]["mean"]
        n_test = runs[arms[0]][0]["test_examples"]
        n_curve = runs[arms[0]][0]["curve_examples"]
        lines = [f"On {n_test} test images.", "", f"| arm | test accuracy | vs {ref} | train time per run (s) |",
                 "| --- | ---: | ---: | ---: |"]
        for a in arms:
            s = summary[a]
            lines.append(f"| {a} | {_fmt(s['test_accuracy'])} | {100 * (s['test_accuracy']['mean'] - base):+.2f} "
                         f"pts | {s['train_seconds']['mean']:.0f} |")
        lines += ["", "### Network utilization (Table 5.3 shape)", "",
                  f"At `{settings.layer}`, per test image ({n_test} images), inference mode, averaged over the "
                  "images, then mean ± std over repeats. Entropies in nats of the per-image normalised activations / "
                  f"p_EB (ground-truth class). Conservative filters: units of `{settings.weights}` whose weight vector "
                  "moved by less than Δ (L2) from initialisation.", "",
                  util.utilization_table({a: summary[a]["utilization"] for a in arms},
                                         {a: summary[a]["conservative_filters"] for a in arms}), "",
                  "### Over training (Figs. 5.3, 5.6-5.9 shape)", "",
                  f"Test accuracy and utilization on {n_curve} test images at every kept checkpoint (first repeat).",
                  "", "![utilization over training](utilization_curves.png)"]
        util.utilization_curves_figure({a: runs[a][0]["history"] for a in arms},
                                       ctx.workdir / "utilization_curves.png",
                                       title=f"{ctx.config.dataset.name}: {settings.layer} during training "
                                             f"(seed {ctx.config.seed}, {n_curve} test images)")
        return Section("Test accuracy and network utilization (Tables 5.1-5.3, 5.5 shape)", "\n".join(lines))

    return Evaluator(evaluate, report)


@dataclasses.dataclass(frozen=True)
class CompressionSettings(EvaluatorSettings):
    """Settings of the ``"compression"`` evaluator (Fig. 5.5).

    Attributes:
      layer: path of the layer whose units are switched off (post-ReLU activations).
      examples: test images (a seeded random subset; 0: all).
      p_c: cumulative-``p_EB`` fractions of the most / least relevant units switched off.
      seed: seed of the subset and of the random units.
    """

    layer: str = "relu_fc1"
    examples: int = 1000
    p_c: tuple[float, ...] = tuple(float(x) for x in np.round(np.arange(0, 1.0, 0.05), 2))
    seed: int = 0


@register_evaluator("compression", CompressionSettings)
def compression_evaluator(settings: CompressionSettings) -> Evaluator:
    """Resilience to compression at test time: the ground-truth probability as units are switched off."""

    def evaluate(run, data):
        config = run.config
        source = data.test_source(config)
        idx = test_subset(len(source), settings.examples, settings.seed + 2)
        activations_and_eb, _ = _layer_functions(linen_module(run, 'the utilization evaluator'), settings.layer)
        variables = run.variables
        return util.compression_curves(
            lambda x, y: activations_and_eb(variables, x, y)[1:],
            data_lib.make_eval_batches(source, idx, batch_size=config.get("eval_batch_size", 256),
                                       image_size=config.dataset.get("image_size")),
            p_c=tuple(settings.p_c), seed=settings.seed)

    def report(ctx: ReportContext) -> Section:
        curves = ctx.metrics("compression")
        arms = list(curves)
        util.compression_figure(curves, ctx.workdir / "compression.png",
                                title=f"{ctx.config.dataset.name}, {ctx.config.model.name}: units of "
                                      f"{settings.layer} switched off at test time")
        first = curves[arms[0]][0]
        pcs, ks = first["p_c"], first["k"]
        show_pc = [i for i, p in enumerate(pcs) if round(p, 2) in (0.0, 0.25, 0.5, 0.75, 0.95)]
        show_k = sorted({0, len(ks) // 4, len(ks) // 2, 3 * len(ks) // 4, len(ks) - 1})
        header = ["arm"] + [f"most p_c={pcs[i]:g}" for i in show_pc[1:]] + \
            [f"least p_c={pcs[i]:g}" for i in show_pc[1:]] + [f"random k={ks[i]}" for i in show_k[1:]]
        lines = [f"Mean ground-truth class probability on {settings.examples or 'all'} test images with units of "
                 f"`{settings.layer}` switched off at test time (no rescaling).", "",
                 "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        for a in arms:
            most = np.mean([c["most"] for c in curves[a]], axis=0)
            least = np.mean([c["least"] for c in curves[a]], axis=0)
            rnd = np.mean([c["random"] for c in curves[a]], axis=0)
            cells = [f"{most[i]:.3f}" for i in show_pc[1:]] + [f"{least[i]:.3f}" for i in show_pc[1:]] + \
                [f"{rnd[i]:.3f}" for i in show_k[1:]]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines += ["", "(p_c = 0 / k = 0, nothing switched off: " + ", ".join(
            f"{a} {np.mean([c['most'][0] for c in curves[a]]):.3f}" for a in arms) + ")", "",
            "![compression](compression.png)"]
        return Section("Resilience to compression (Fig. 5.5)", "\n".join(lines))

    return Evaluator(evaluate, report)
