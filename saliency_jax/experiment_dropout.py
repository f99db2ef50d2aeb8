"""Runs an Excitation Dropout comparison (Bargal 2019, Ch. 5) and writes its report.

Every arm of ``config.experiment.arms`` (a dropout scheme: none, standard, standard + mask per image, curriculum,
excitation, adaptive) is trained ``config.experiment.repeats`` times with seeds ``seed, seed + 1, ...`` (the same
seeds, data order and initial weights for every arm) through :func:`saliency_jax.train.train`, then analysed at the
dropout layer ``config.dropout.layer`` in inference mode:

* test accuracy (Tables 5.1, 5.2, 5.5 shape), mean and sample std over repeats;
* utilization over the test set (Table 5.3): # neurons ON, peak ``p_EB``, entropy of activations, entropy of
  ``p_EB`` (``p_EB`` of the ground-truth class), conservative filters of ``config.dropout.weights`` for the
  thresholds ``config.analysis.conservative_deltas``;
* the same metrics and the test accuracy at every saved checkpoint (Figs. 5.3, 5.6-5.9);
* resilience to compression (Fig. 5.5): ground-truth probability with the most / least relevant units switched off
  by cumulative ``p_EB`` and with ``k`` random units switched off.

Writes ``workdir/report.md``, ``metrics.json``, ``compression.png`` and ``utilization_curves.png``; each run's
checkpoints and training log are in ``workdir/<arm>/seed<k>/`` (a rerun resumes or skips finished runs).
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
import orbax.checkpoint as ocp

from saliency_jax import data as data_lib
from saliency_jax import train as train_lib
from saliency_jax.evaluation import utilization as util
from saliency_jax.experiment import arm_config, mean_std, read_metrics_log, to_jsonable
from saliency_jax.saliency import linen_layer
from saliency_jax.training import layer_excitation, linen_head

__all__ = ["run_dropout_experiment", "analyse_layer", "initial_variables", "checkpoint_steps"]

_ANALYSIS_DEFAULTS = dict(test_examples=0, curve_examples=1000, compression_examples=1000,
                          conservative_deltas=(0.05, 0.1, 0.25), p_c=tuple(np.round(np.arange(0, 1.0, 0.05), 2)),
                          seed=0)


def _analysis(config) -> dict[str, Any]:
    a = dict(_ANALYSIS_DEFAULTS)
    a.update(dict(config.get("analysis") or {}))
    return a


def _image_shape(config, source) -> tuple[int, ...]:
    shape = source[0]["image"].shape
    size = config.dataset.get("image_size")
    return (size, size, shape[-1]) if size else tuple(shape)


def initial_variables(config: ml_collections.ConfigDict, model, image_shape: tuple[int, ...]) -> Any:
    """The variables a run of ``config`` starts from (as :func:`saliency_jax.train.train` builds them).

    Random initialisation with ``key(config.seed)``, or the imported pretrained weights when
    ``config.model.pretrained`` is set (fine-tuning: conservative filters are then measured from the pretrained
    weights, Bargal 2019 Ch. 3).
    """
    variables = model.init(jax.random.key(config.seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    if config.model.get("pretrained"):
        from saliency_jax.models import weights
        variables = weights.load_pretrained(config.model.name, config.model.pretrained, variables, skip_head=True)
    return variables


_FUNCTIONS: dict = {}


def _layer_functions(model, layer: str):
    """Jitted ``(variables, images, labels) -> (logits, per-example utilization)`` and the compression closure."""
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


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the checkpoints kept in ``workdir/checkpoints`` (ascending)."""
    path = pathlib.Path(workdir) / "checkpoints"
    if not path.exists():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def _restore_state(workdir: pathlib.Path, step: int, like: train_lib.TrainState) -> train_lib.TrainState:
    mngr = ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(),
                                 item_handlers={"state": ocp.StandardCheckpointHandler()})
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    mngr.close()
    return restored["state"]


def _subset(n: int, limit: int, seed: int) -> np.ndarray:
    idx = np.arange(n)
    if limit and limit < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    return idx


def _get_path(tree, path: str):
    node = tree
    for part in path.split("/"):
        if part not in node:
            raise KeyError(f"no parameter path {path!r} (missing {part!r}; have {list(node)})")
        node = node[part]
    return node




def run_dropout_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                           progress: bool = True) -> dict[str, Any]:
    """Trains and analyses every arm of an Excitation Dropout config and writes the report into ``workdir``.

    Args:
      config: an experiment config with a ``dropout`` section, ``experiment.arms`` (overrides such as
        ``{"dropout": {"scheme": "excitation"}}``) and an optional ``analysis`` section (``test_examples``: 0 = the
        whole test set; ``curve_examples``, ``compression_examples``, ``conservative_deltas``, ``p_c``, ``seed``).
      workdir: output folder.
      progress: progress bars.

    Returns:
      The contents of ``metrics.json``.

    Raises:
      ValueError: if there are no arms; KeyError: on a bad arm override or weights path.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exp, an = config.experiment, _analysis(config)
    arms = [name for name, _ in exp.arms]
    if not arms:
        raise ValueError("config.experiment.arms is empty: nothing to run")
    for arm in arms:
        arm_config(config, arm, 0)
    test_source = data_lib.get_source(config.dataset.name, "test", data_dir=config.dataset.get("data_dir"),
                                      image_size=config.dataset.get("image_size"))
    n_test = len(test_source)
    test_idx = _subset(n_test, an["test_examples"], an["seed"])
    curve_idx = _subset(n_test, an["curve_examples"], an["seed"] + 1)
    comp_idx = _subset(n_test, an["compression_examples"], an["seed"] + 2)
    image_shape = _image_shape(config, test_source)
    bs = config.get("eval_batch_size", 256)
    deltas = tuple(float(d) for d in an["conservative_deltas"])

    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    curves: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    start = time.time()
    for repeat in range(exp.repeats):
        for arm in arms:
            cfg = arm_config(config, arm, repeat)
            layer = cfg.dropout.layer
            t0 = time.time()
            result = train_lib.train(cfg, workdir / arm / f"seed{cfg.seed}", progress=progress)
            train_s = time.time() - t0
            model, variables = result.model, result.state.variables()
            t1 = time.time()
            final = analyse_layer(model, variables, layer, test_source, test_idx, cfg, batch_size=bs)
            init_vars = initial_variables(cfg, model, image_shape)
            w0 = _get_path(init_vars["params"], cfg.dropout.weights)["kernel"]
            w1 = _get_path(variables["params"], cfg.dropout.weights)["kernel"]
            conservative = util.conservative_filters(w0, w1, deltas)
            # Over training: step 0 (initial weights) and every kept checkpoint.
            history = []
            at0 = analyse_layer(model, init_vars, layer, test_source, curve_idx, cfg, batch_size=bs)
            history.append({"step": 0, "test_accuracy": at0["accuracy"],
                            **{k: v["mean"] for k, v in at0["utilization"].items()}})
            for step in checkpoint_steps(result.workdir):
                state = _restore_state(result.workdir, step, result.state)
                r = analyse_layer(model, state.variables(), layer, test_source, curve_idx, cfg, batch_size=bs)
                history.append({"step": step, "test_accuracy": r["accuracy"],
                                **{k: v["mean"] for k, v in r["utilization"].items()}})
            activations_and_eb, _ = _layer_functions(model, layer)
            comp = util.compression_curves(
                lambda x, y: activations_and_eb(variables, x, y)[1:],
                data_lib.make_eval_batches(test_source, comp_idx, batch_size=bs,
                                           image_size=cfg.dataset.get("image_size")),
                p_c=an["p_c"], seed=an["seed"])
            curves[arm].append(comp)
            runs[arm].append({"seed": cfg.seed, "test_accuracy": final["accuracy"],
                              "test_examples": final["examples"], "utilization": final["utilization"],
                              "conservative_filters": {str(k): v for k, v in conservative.items()},
                              "history": history, "compression": comp, "train_seconds": train_s,
                              "analysis_seconds": time.time() - t1,
                              "train_log": read_metrics_log(result.workdir)})
            print(f"[{arm} seed {cfg.seed}] test acc {final['accuracy']:.4f}  neurons ON "
                  f"{final['utilization']['neurons_on']['mean']:.0f}  ({train_s:.0f} s train)", flush=True)

    summary = {}
    for arm in arms:
        rs = runs[arm]
        summary[arm] = {
            "test_accuracy": mean_std([r["test_accuracy"] for r in rs]),
            "utilization": {m: mean_std([r["utilization"][m]["mean"] for r in rs])
                            for m in util.UTILIZATION_METRICS},
            "conservative_filters": {d: mean_std([r["conservative_filters"][str(d)] for r in rs]) for d in deltas},
            "train_seconds": mean_std([r["train_seconds"] for r in rs]),
        }
    out = {"config": config.to_dict(), "arms": arms, "repeats": exp.repeats, "summary": summary, "runs": runs,
           "wall_seconds": time.time() - start, "devices": [str(d) for d in jax.devices()]}
    if jax.process_index() == 0:
        (workdir / "metrics.json").write_text(json.dumps(to_jsonable(out), indent=2, default=str))
        util.compression_figure(curves, workdir / "compression.png",
                                title=f"{config.dataset.name}, {config.model.name}: units of "
                                      f"{config.dropout.layer} switched off at test time")
        util.utilization_curves_figure({a: runs[a][0]["history"] for a in arms}, workdir / "utilization_curves.png",
                                       title=f"{config.dataset.name}: {config.dropout.layer} during training "
                                             f"(seed {config.seed}, {len(curve_idx)} test images)")
        (workdir / "report.md").write_text(_report(config, summary, runs, curves, out, len(test_idx),
                                                   len(curve_idx), len(comp_idx)))
    return out






def _fmt(v: dict[str, float], digits: int = 4) -> str:
    return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"


def _report(config, summary, runs, curves, out, n_test, n_curve, n_comp) -> str:
    arms = out["arms"]
    d = config.dropout
    ref = "none" if "none" in arms else arms[0]
    base = summary[ref]["test_accuracy"]["mean"]
    lines = [
        f"# Excitation Dropout: {config.dataset.name}, {config.model.name}",
        "",
        f"{out['repeats']} repeat(s) per arm (seeds {config.seed}..{config.seed + out['repeats'] - 1}, the same for "
        f"every arm; mean ± sample std over repeats); wall time {out['wall_seconds'] / 60:.1f} min on "
        f"{len(out['devices'])} device(s) ({out['devices'][0]}).",
        "",
        f"Dropout at `{d.layer}` (units of `{d.weights}`), base retaining probability P = {d.base_retain}, rescale "
        f"`{d.rescale}`, curriculum gamma = {d.gamma}. Optimizer {config.optimizer.name} lr "
        f"{config.optimizer.learning_rate}, batch {config.batch_size}, {config.num_steps} steps.",
        "",
        "## Test accuracy (Tables 5.1, 5.2, 5.5 shape)",
        "",
        f"On {n_test} test images.",
        "",
        f"| arm | test accuracy | vs {ref} | train time per run (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for a in arms:
        s = summary[a]
        lines.append(f"| {a} | {_fmt(s['test_accuracy'])} | {100 * (s['test_accuracy']['mean'] - base):+.2f} pts | "
                     f"{s['train_seconds']['mean']:.0f} |")
    lines += [
        "",
        "## Network utilization at the dropout layer (Table 5.3 shape)",
        "",
        f"Per test image ({n_test} images), inference mode, averaged over the images, then mean ± std over repeats. "
        "Entropies in nats of the per-image normalised activations / p_EB (ground-truth class). Conservative "
        f"filters: units of `{d.weights}` whose weight vector moved by less than Δ (L2) from initialisation.",
        "",
        util.utilization_table({a: summary[a]["utilization"] for a in arms},
                               {a: summary[a]["conservative_filters"] for a in arms}),
        "",
        "## Resilience to compression (Fig. 5.5)",
        "",
        f"Mean ground-truth class probability on {n_comp} test images with units of `{d.layer}` switched off at test "
        "time (no rescaling).",
        "",
    ]
    pcs = curves[arms[0]][0]["p_c"]
    ks = curves[arms[0]][0]["k"]
    show_pc = [i for i, p in enumerate(pcs) if round(p, 2) in (0.0, 0.25, 0.5, 0.75, 0.95)]
    show_k = sorted({0, len(ks) // 4, len(ks) // 2, 3 * len(ks) // 4, len(ks) - 1})
    header = ["arm"] + [f"most p_c={pcs[i]:g}" for i in show_pc[1:]] + [f"least p_c={pcs[i]:g}" for i in show_pc[1:]] \
        + [f"random k={ks[i]}" for i in show_k[1:]]
    lines += ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for a in arms:
        most = np.mean([c["most"] for c in curves[a]], axis=0)
        least = np.mean([c["least"] for c in curves[a]], axis=0)
        rnd = np.mean([c["random"] for c in curves[a]], axis=0)
        cells = [f"{most[i]:.3f}" for i in show_pc[1:]] + [f"{least[i]:.3f}" for i in show_pc[1:]] + \
            [f"{rnd[i]:.3f}" for i in show_k[1:]]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "(p_c = 0 / k = 0, nothing switched off: " + ", ".join(
        f"{a} {np.mean([c['most'][0] for c in curves[a]]):.3f}" for a in arms) + ")", "",
        "![compression](compression.png)", "",
        "## Over training (Figs. 5.3, 5.6-5.9 shape)", "",
        f"Test accuracy and utilization on {n_curve} test images at every kept checkpoint (first repeat).", "",
        "![utilization over training](utilization_curves.png)", ""]
    return "\n".join(lines)
