"""Recorded results: what a run wrote, reduced to exact digests, so that a redesign can be shown to change nothing.

``python tests/recorded.py NAME ...`` runs each named case (``CASES``) on the checkout it is run from and writes its
fingerprint to ``tests/data/recorded/NAME.json``; ``tests/test_recorded.py`` runs the same cases and asserts equality
(bit for bit: the digests are SHA-256 of the raw bytes of every array of every kept checkpoint, every line of every
``metrics.jsonl`` and the evaluators' metrics of ``run.json``). The recorded files were written on main e840573,
before the redesign of the loop (one loop running phased plans), and are never rewritten to make a test pass.

A fingerprint keeps only what the run computes, not when or how fast: wall times are dropped. A checkpoint's state is
digested per top-level field (``step``, ``params``, ``batch_stats``, ``opt_state``), leaf by leaf in path order, so
that a state that gains a field (a scheme's state) still compares on the fields it had.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import sys
from typing import Any, Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RECORDED = REPO / "tests" / "data" / "recorded"
TIMES = {"train_seconds", "eval_seconds", "seconds", "wall_seconds"}


def load_config(name: str, arg: str | None = None):
    """``experiments/configs/<name>.py``'s ``get_config(arg)``."""
    configs = REPO / "experiments" / "configs"
    sys.path.insert(0, str(configs))
    try:
        spec = importlib.util.spec_from_file_location(f"_recorded_{name}", configs / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module.get_config(arg) if arg else module.get_config()


def _digest_leaves(tree: Any) -> str:
    import jax

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def checkpoint_digests(step_dir: pathlib.Path) -> dict[str, str]:
    """``{field: digest}`` of the ``state`` item of one orbax checkpoint step folder (restored as saved)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore((step_dir / "state").absolute())
    return {k: _digest_leaves(v) for k, v in sorted(state.items())}


def _strip_times(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if k not in TIMES}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


def run_fingerprint(run_dir: pathlib.Path) -> dict[str, Any]:
    """What one run folder holds: every kept checkpoint's digests, the metrics log lines, the evaluations."""
    out: dict[str, Any] = {}
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        steps = sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit())
        out["checkpoints"] = {str(s): checkpoint_digests(ckpts / str(s)) for s in steps}
    log = run_dir / "metrics.jsonl"
    if log.exists():
        out["metrics_log"] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    record = run_dir / "run.json"
    if record.exists():
        stored = json.loads(record.read_text())
        out["evaluations"] = {k: v["metrics"] for k, v in stored.get("evaluations", {}).items()}
    return out


def experiment_fingerprint(workdir: pathlib.Path) -> dict[str, Any]:
    """Every run of an experiment folder plus ``metrics.json``'s summary and per-run metrics (no times)."""
    metrics = json.loads((workdir / "metrics.json").read_text())
    runs = {}
    for arm in metrics["arms"]:
        for run_dir in sorted((workdir / arm).glob("seed*")):
            runs[f"{arm}/{run_dir.name}"] = run_fingerprint(run_dir)
    return {"summary": metrics["summary"], "runs": _strip_times(metrics["runs"]), "run_dirs": runs}


def _experiment(name: str, arg: str | None = None, **overrides) -> Callable[[pathlib.Path], dict[str, Any]]:
    def run(workdir: pathlib.Path) -> dict[str, Any]:
        from saliency_jax import experiment

        config = load_config(name, arg)
        for k, v in overrides.items():
            node = config
            *parents, leaf = k.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = v
        experiment.run_experiment(config, workdir, progress=False, compilation_cache="off")
        return experiment_fingerprint(workdir)

    return run


def _background_invariance_straight(workdir: pathlib.Path) -> dict[str, Any]:
    """The trainer's tiny adversarial run of tests/test_background_invariance_trainer.py (phases 1-3, 3 steps
    each, a checkpoint every 2 steps, previews): the run its kill-and-resume test must equal."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from test_background_invariance_trainer import tiny_config
    finally:
        sys.path.pop(0)
    from saliency_jax import experiment

    config = tiny_config(phase3_optimizer="continue")  # recorded before phase 3's fresh optimizer (issue 21)
    config.experiment = {"arms": (("proposal", {}),), "repeats": 1}
    experiment.run_experiment(config, workdir, progress=False, compilation_cache="off")
    out = run_fingerprint(workdir / "proposal" / "seed0")
    previews = np.load(workdir / "proposal" / "seed0" / "previews.npz")
    out["previews"] = {k: hashlib.sha256(np.ascontiguousarray(previews[k]).tobytes()).hexdigest()
                       for k in sorted(previews.files)}
    return out


CASES: dict[str, Callable[[pathlib.Path], dict[str, Any]]] = {
    # Fast (tests/test_recorded.py in CI).
    "digits_runlocal": _experiment("distraction_digits", "runlocal"),
    # Recorded when phase 3 carried phase 1's Adam over; the default became a fresh one (issue 21).
    "background_invariance_runlocal": _experiment("background_invariance_mnist", "runlocal",
                                                  **{"background_invariance.phase3_optimizer": "continue"}),
    "background_invariance_straight": _background_invariance_straight,
    # The Excitation Dropout cases were recorded with no rescaling; the default became the authors' per-scheme
    # rescaling afterwards (issue 21), so they run with the recorded setting, one flag away.
    "excitation_dropout_runlocal": _experiment("excitation_dropout_mnist", "runlocal",
                                               **{"dataset.name": "digits", "dataset.data_dir": None,
                                                  "dataset.image_size": 28, "dropout.rescale": "none"}),
    # Slow (-m slow): the quickstart and the Excitation Dropout MNIST runner as their docstrings launch them.
    "digits_quickstart": _experiment("distraction_digits"),
    "excitation_dropout_mnist": _experiment("excitation_dropout_mnist", None,
                                            **{"dataset.data_dir": str(REPO.parent / "shared" / "data" / "mnist"),
                                               "dropout.rescale": "none"}),
}


def record(name: str, workdir: pathlib.Path) -> dict[str, Any]:
    """Runs case ``name`` in ``workdir`` and returns its fingerprint (JSON-able)."""
    return json.loads(json.dumps(CASES[name](workdir), sort_keys=True, default=str))


def main(argv: list[str]) -> None:
    import tempfile

    RECORDED.mkdir(parents=True, exist_ok=True)
    for name in argv or list(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            out = record(name, pathlib.Path(tmp))
        (RECORDED / f"{name}.json").write_text(json.dumps(out, sort_keys=True, indent=1) + "\n")
        print(f"recorded {name} -> {RECORDED / (name + '.json')}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
