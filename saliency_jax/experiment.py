"""Runs the arms of a comparison with the same seeds and writes the report (``report.md``, ``metrics.json``, figures).

An experiment config (``experiments/configs/*.py``) is a train config plus ``experiment.arms``: ``(arm name,
overrides)`` pairs, the overrides nested like the config (``{"distraction": {"enabled": True, "fill": "zero"}}``). Every arm is trained
``experiment.repeats`` times with seeds ``seed, seed + 1, ...`` (the same seeds for every arm, so arms differ only
by their overrides), then evaluated on the test split clean and under Random Erasing (the same erased images for
every arm). The report has the side-by-side table of Morales et al. 2021 (Table 1: accuracy, precision, recall, F1;
macro and weighted), the clean-vs-erased table (Table 4), per-class true positive rates (Table 3), the mean salient
area of each arm's Grad-CAM maps, and the figure of heat maps side by side (Figs. 2-3).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saliency_jax import data as data_lib
from saliency_jax import evaluation
from saliency_jax import train as train_lib
from saliency_jax.config import apply_overrides
from saliency_jax.saliency import grad_cam, linen_layer

__all__ = ["arm_config", "run_experiment", "evaluate_arm", "grad_cam_maps", "mean_std", "read_metrics_log",
           "to_jsonable"]


def arm_config(config: ml_collections.ConfigDict, arm: str, repeat: int) -> ml_collections.ConfigDict:
    """The train config of one arm and repeat: the arm's overrides applied and ``seed`` advanced by ``repeat``.

    Raises:
      KeyError: if ``arm`` is not in ``config.experiment.arms`` or its overrides name unknown fields.
    """
    arms = dict(config.experiment.arms)
    if arm not in arms:
        raise KeyError(f"unknown arm {arm!r}; the config has {list(arms)}")
    cfg = apply_overrides(config, arms[arm])
    cfg.seed = config.seed + repeat
    return cfg


def evaluate_arm(config: ml_collections.ConfigDict, result: train_lib.TrainResult, test_source) -> dict[str, Any]:
    """Clean and Random-Erasing test metrics of a trained arm (Morales et al. 2021, Tables 1, 3, 4).

    Returns:
      ``{"clean": metrics, "erased": metrics}`` as :func:`saliency_jax.evaluation.classification_metrics` gives.
    """
    rob = config.robustness
    num_classes = test_source.num_classes
    names = list(getattr(test_source, "class_names", None) or [str(i) for i in range(num_classes)])

    def batches():
        return data_lib.make_eval_batches(test_source, None, batch_size=config.eval_batch_size,
                                          image_size=config.dataset.get("image_size"),
                                          pad_to_multiple_of=jax.device_count())

    def erase(key, images):
        return evaluation.random_erasing(key, images, probability=rob.probability, area_range=tuple(rob.area_range),
                                         aspect_range=tuple(rob.aspect_range), fill=rob.fill)

    variables = result.state.variables()
    out = {}
    for name, transform in (("clean", None), ("erased", erase)):
        labels, preds, _ = train_lib.predict(result.model, variables, batches(), transform=transform, seed=rob.seed)
        out[name] = evaluation.classification_metrics(labels, preds, num_classes, class_names=names)
    return out


def grad_cam_maps(config: ml_collections.ConfigDict, result: train_lib.TrainResult, images: np.ndarray,
                  labels: np.ndarray) -> np.ndarray:
    """Grad-CAM maps of the ground-truth classes with a trained arm (the settings of ``config.distraction``).

    Args:
      images: [n, height, width, channels] float32 in [0, 1].
      labels: int [n].

    Returns:
      float32 [n, height, width] in [0, 1].
    """
    layer = linen_layer(result.model, result.state.variables(), config.model.grad_cam_layer, train=False)
    fn = jax.jit(lambda x, y: grad_cam(layer, x, y, score=config.distraction.score,
                                       weighting=config.distraction.weighting))
    return np.asarray(fn(jnp.asarray(images), jnp.asarray(labels)))


def to_jsonable(x):
    """``x`` with dict keys as strings, tuples as lists and NumPy scalars as Python numbers (for ``json.dumps``)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool = True,
                   ) -> dict[str, Any]:
    """Trains and evaluates every arm of ``config.experiment.arms`` and writes the report into ``workdir``.

    Writes ``workdir/<arm>/seed<k>/`` (each run's checkpoints and metrics; a rerun resumes or skips finished runs),
    ``workdir/report.md``, ``workdir/metrics.json``, ``workdir/saliency_maps.png`` (inputs and each arm's Grad-CAM
    maps for the ground-truth class) and ``workdir/training_curves.png``.

    Args:
      config: an experiment config.
      workdir: output folder.
      progress: progress bars.

    Returns:
      The contents of ``metrics.json``: per arm, per repeat and summarised (mean and sample std) clean and erased
      metrics, the mean salient area, and the wall time.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exp = config.experiment
    arms = [name for name, _ in exp.arms]
    if not arms:
        raise ValueError("config.experiment.arms is empty: nothing to run")
    for arm in arms:  # Fail on a typo before any training starts.
        arm_config(config, arm, 0)
    is_main = jax.process_index() == 0

    test_source = data_lib.get_source(config.dataset.name, "test", data_dir=config.dataset.get("data_dir"),
                                      image_size=config.dataset.get("image_size"))
    n_fig = min(exp.figure_examples, len(test_source))
    fig_idx = np.linspace(0, len(test_source) - 1, n_fig).astype(int) if n_fig else np.zeros(0, int)
    fig_batch = next(iter(data_lib.make_eval_batches(test_source, fig_idx, batch_size=max(n_fig, 1),
                                                     image_size=config.dataset.get("image_size"))))
    fig_images, fig_labels = fig_batch["image"][:n_fig], fig_batch["label"][:n_fig]

    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    maps: dict[str, np.ndarray] = {}
    history: dict[str, list[dict[str, float]]] = {}
    start = time.time()
    for repeat in range(exp.repeats):
        for arm in arms:
            cfg = arm_config(config, arm, repeat)
            t0 = time.time()
            result = train_lib.train(cfg, workdir / arm / f"seed{cfg.seed}", progress=progress)
            train_s = time.time() - t0
            metrics = evaluate_arm(cfg, result, test_source)
            arm_maps = grad_cam_maps(cfg, result, fig_images, fig_labels) if n_fig else np.zeros((0,))
            metrics["salient_area"] = float(np.mean(arm_maps > cfg.distraction.threshold)) if n_fig else None
            metrics["train_seconds"] = train_s
            metrics["seed"] = cfg.seed
            runs[arm].append(metrics)
            if repeat == 0:
                maps[arm] = arm_maps
                history[arm] = read_metrics_log(result.workdir)
            if is_main:
                print(f"[{arm} seed {cfg.seed}] clean acc {metrics['clean']['accuracy']:.4f}  "
                      f"erased acc {metrics['erased']['accuracy']:.4f}  ({train_s:.0f} s)", flush=True)

    def combine(values):  # one run: its own numbers; several: mean and sample std.
        return values[0] if len(values) == 1 else evaluation.summarize_repeats(values)

    summary = {arm: {"clean": combine([r["clean"] for r in runs[arm]]),
                     "erased": combine([r["erased"] for r in runs[arm]]),
                     "salient_area": mean_std([r["salient_area"] for r in runs[arm]])}
               for arm in arms}
    out = {"config": config.to_dict(), "arms": arms, "repeats": exp.repeats, "summary": summary, "runs": runs,
           "wall_seconds": time.time() - start, "devices": [str(d) for d in jax.devices()]}
    if is_main:
        (workdir / "metrics.json").write_text(json.dumps(to_jsonable(out), indent=2, default=str))
        if n_fig:
            evaluation.saliency_figure(
                fig_images, maps, workdir / "saliency_maps.png",
                row_labels=[test_source.class_names[int(y)] if getattr(test_source, "class_names", None) else str(y)
                            for y in fig_labels],
                title=f"Grad-CAM ({config.distraction.score}, {config.distraction.weighting}) at "
                      f"{config.model.grad_cam_layer}, ground-truth class")
        evaluation.training_curves_figure(history, workdir / "training_curves.png", metrics=["loss", "accuracy"])
        (workdir / "report.md").write_text(_report(config, summary, out))
    return out


def mean_std(values) -> dict[str, float] | None:
    """``{"mean", "std"}`` (sample std; 0 for one value) of the non-None ``values``; None if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def read_metrics_log(workdir: pathlib.Path) -> list[dict[str, float]]:
    """The records of a run's ``workdir/metrics.jsonl`` (as :func:`saliency_jax.train.train` writes them)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(value) -> float:
    return value["mean"] if isinstance(value, dict) else value


def _fmt(value) -> str:
    return f"{value['mean']:.3f} ± {value['std']:.3f}" if isinstance(value, dict) else f"{value:.3f}"


def _report(config, summary, out) -> str:
    arms = out["arms"]
    d = config.distraction
    lines = [
        f"# Distraction training: {config.dataset.name}, {config.model.name}",
        "",
        f"{out['repeats']} repeat(s) per arm (seeds {config.seed}..{config.seed + out['repeats'] - 1}; mean ± sample "
        f"std over repeats); {len(config.experiment.arms)} arms; wall time {out['wall_seconds'] / 60:.1f} min on "
        f"{len(out['devices'])} device(s) ({out['devices'][0]}).",
        "",
        f"Scheme (Morales et al. 2021, Algorithm 1): p = {d.probability}, th = {d.threshold}, Grad-CAM of the "
        f"ground-truth class ({d.score} score, {d.weighting} weights) at `{config.model.grad_cam_layer}`; "
        f"per-example = {d.per_example}. Optimizer {config.optimizer.name} lr {config.optimizer.learning_rate}, "
        f"batch {config.batch_size}.",
        "",
        "## Test set (Table 1 / Table 3 shape)",
        "",
        evaluation.metrics_table({a: summary[a]["clean"] for a in arms}),
        "",
        "## Random Erasing of every test image (Table 4 shape)",
        "",
        f"Zhong et al. 2020, probability {config.robustness.probability}, area {tuple(config.robustness.area_range)}, "
        f"fill {config.robustness.fill}, seed {config.robustness.seed} (the same erased images for every arm).",
        "",
        evaluation.metrics_table({a: summary[a]["erased"] for a in arms}),
        "",
        "| arm | clean accuracy | erased accuracy | drop |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {a} | {_fmt(summary[a]['clean']['accuracy'])} | {_fmt(summary[a]['erased']['accuracy'])} | "
          f"{_mean(summary[a]['erased']['accuracy']) - _mean(summary[a]['clean']['accuracy']):+.3f} |" for a in arms],
        "",
        "## Per-class true positive rate, clean test set (Table 3 shape)",
        "",
        evaluation.metrics_table({a: summary[a]["clean"] for a in arms}, rows=(), per_class=True),
        "",
        "## Salient area",
        "",
        f"Mean fraction of pixels whose normalised Grad-CAM weight exceeds th = {d.threshold} on the figure's "
        "images (larger: evidence spread over more of the image).",
        "",
        "| arm | salient area |",
        "| --- | --- |",
    ]
    for a in arms:
        s = summary[a]["salient_area"]
        if s is None:
            lines.append(f"| {a} | n/a |")
        else:
            lines.append(f"| {a} | {s['mean']:.3f} ± {s['std']:.3f} |" if out["repeats"] > 1 else f"| {a} | {s['mean']:.3f} |")
    lines += ["", "## Figures", "", "![Grad-CAM maps](saliency_maps.png)", "",
              "![Training curves](training_curves.png)", ""]
    return "\n".join(lines)
