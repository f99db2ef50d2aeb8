r"""Compile time: size buckets of the pointing game, and JAX's persistent compilation cache on a second launch.

Part A - the pointing game on ``--images`` (50) synthetic images of random sizes (VOC-like: height and width uniform
in [100, 500] pixels, seeded), one small CNN with random weights, Grad-CAM, network input shorter side
``--input_size``: the number of XLA compilations and their total time (JAX's monitoring events: tracing, lowering
and backend compilation), with ``size_bucket = 0`` (one compilation of the image resize and of the hit test per image
size: the code before buckets) and with ``size_bucket = 128``; each mode in a fresh subprocess with the persistent
cache off, so every compilation is counted. The per-stage counts split the network (one per distinct input shape in
both modes: padding its input would change its maps) from the resizes and hit test (one per bucket). The two modes'
results are compared (they must be equal).

Part B - the digits quickstart (``experiments/configs/distraction_digits.py``, 4 arms; ``--steps`` steps per arm to
keep compilation visible, 0: the config's 1,200) launched three times in subprocesses, each into a fresh workdir so
that it trains: with the cache off; with an empty cache (the first launch, which writes it); again with that cache
(the second launch, which reads it). Wall seconds of each launch, and the runner's train / eval seconds.

Command (from the repository root; the machine's load is printed with the figures):
  PYTHONPATH=$PWD python benchmarks/compile_cache_benchmark.py [--images 50] [--input_size 64] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------------------------
# Part A: the child process.


def pointing_child(images: int, input_size: int, bucket: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from saliency_jax import models
    from saliency_jax.evaluators import pointing_game as pge

    events = {"count": 0, "seconds": 0.0, "backend": 0.0}

    def listener(event, duration, **_):
        if event.startswith("/jax/core/compile/"):
            events["seconds"] += duration
            if event.endswith("backend_compile_duration"):
                events["count"] += 1
                events["backend"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)

    class Data:
        num_classes = 20
        class_names = tuple(str(i) for i in range(20))

        def __init__(self):
            rng = np.random.default_rng(seed)
            self.items = []
            for i in range(images):
                h, w = (int(x) for x in rng.integers(100, 501, 2))
                k = int(rng.integers(1, 4))
                ids = np.sort(rng.permutation(20)[:k]).astype(np.int32)
                masks = np.zeros((20, h, w), bool)
                for c in ids:
                    r0, c0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
                    masks[c, r0:r0 + h // 3, c0:c0 + w // 3] = True
                self.items.append({"image": rng.random((h, w, 3), np.float32), "image_id": str(i),
                                   "class_ids": ids, "class_masks": masks})

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    data = Data()
    module = models.get_model("small_cnn", 20, widths=(16, 32, 64))
    variables = jax.jit(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))()
    settings = pge.PointingGameSettings(input_size=input_size, class_batch=2, size_bucket=bucket,
                                        methods=("grad_cam",), layers={"grad_cam": "conv3"})
    start = dict(events)
    t0 = time.perf_counter()
    results = pge.run_pointing_game(module, variables, data, settings)
    wall = time.perf_counter() - t0
    shapes = {(it["class_masks"].shape[1], it["class_masks"].shape[2]) for it in data.items}
    return {
        "bucket": bucket, "wall_s": wall, "compiles": events["count"] - start["count"],
        "compile_s": events["seconds"] - start["seconds"], "backend_compile_s": events["backend"] - start["backend"],
        "image_sizes": len(shapes),
        "network_input_shapes": len({pge.input_shape(h, w, input_size) for h, w in shapes}),
        "resize_programs": (pge._resize_image_padded if bucket else pge._resize_image)._cache_size(),
        "score_programs": (pge._score_padded if bucket else pge._score)._cache_size(),
        "hits": results["grad_cam"]["hits"], "misses": results["grad_cam"]["misses"],
        "accuracy": results["grad_cam"]["all"],
    }


def _run_child(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_a(images: int, input_size: int, seed: int) -> None:
    env = {**os.environ, "SALIENCY_JAX_COMPILATION_CACHE": "off"}
    rows = {}
    for bucket in (0, 128):
        print(f"  [A] size_bucket={bucket}: running (load {_load()})", flush=True)
        rows[bucket] = _run_child(["--child", "pointing", "--images", str(images), "--input_size", str(input_size),
                                   "--bucket", str(bucket), "--seed", str(seed)], env)
    before, after = rows[0], rows[128]
    print(f"\nA. Pointing game, {images} images of random sizes ({before['image_sizes']} distinct; "
          f"{before['network_input_shapes']} distinct network inputs at input_size {input_size}), small CNN, "
          f"Grad-CAM; load after: {_load()}")
    print("| size_bucket | compilations | compile s (trace+lower+backend) | backend s | resize programs | "
          "score programs | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b, r in rows.items():
        print(f"| {b} | {r['compiles']} | {r['compile_s']:.1f} | {r['backend_compile_s']:.1f} | "
              f"{r['resize_programs']} | {r['score_programs']} | {r['wall_s']:.1f} |")
    print(f"ratios (bucket 0 / bucket 128): compilations {before['compiles'] / max(after['compiles'], 1):.2f}x, "
          f"compile time {before['compile_s'] / max(after['compile_s'], 1e-9):.2f}x, wall "
          f"{before['wall_s'] / after['wall_s']:.2f}x")
    same = (before["hits"], before["misses"]) == (after["hits"], after["misses"])
    print(f"results identical (per-class hits and misses): {same} (accuracy {before['accuracy']:.4f} / "
          f"{after['accuracy']:.4f})")


# ---------------------------------------------------------------------------------------------------------------
# Part B.


def part_b(steps: int) -> None:
    config = str(REPO / "experiments/configs/distraction_digits.py")
    with tempfile.TemporaryDirectory(prefix="compile_cache_bench_") as tmp:
        tmp = pathlib.Path(tmp)
        launches = [("cache off", "off"), ("cache on, empty (1st launch)", str(tmp / "cache")),
                    ("cache on, filled (2nd launch)", str(tmp / "cache"))]
        rows = []
        for i, (name, cache) in enumerate(launches):
            env = {**os.environ, "SALIENCY_JAX_COMPILATION_CACHE": cache, "JAX_PLATFORMS": os.environ.get(
                "JAX_PLATFORMS", "cpu")}
            cmd = [sys.executable, "-m", "saliency_jax", "experiment", "--config", config, "--workdir",
                   str(tmp / f"run{i}"), "--noprogress"] + ([f"--config.num_steps={steps}"] if steps else [])
            load = _load()
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=7200)
            wall = time.perf_counter() - t0
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            m = json.loads((tmp / f"run{i}" / "metrics.json").read_text())
            files = sum(1 for _ in (tmp / "cache").glob("*")) if (tmp / "cache").exists() else 0
            rows.append((name, wall, m["wall_seconds"], m["train_seconds"], m["eval_seconds"], files, load,
                         m["summary"]))
            print(f"  [B] {name}: {wall:.1f} s (load before {load})", flush=True)
    print(f"\nB. Digits quickstart, 4 arms x {steps or 1200} steps, each launch a fresh subprocess and workdir; "
          f"load after: {_load()}")
    print("| launch | process wall s | runner wall s | train s | eval s | cache entries after | load before |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, wall, rwall, tr, ev, files, load, _ in rows:
        print(f"| {name} | {wall:.1f} | {rwall:.1f} | {tr:.1f} | {ev:.1f} | {files} | {load} |")
    print(f"ratio cache off / 2nd launch with cache: {rows[0][1] / rows[2][1]:.2f}x (process wall), "
          f"{rows[0][2] / rows[2][2]:.2f}x (runner wall)")
    print(f"metrics identical across the three launches: {rows[0][7] == rows[1][7] == rows[2][7]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--input_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100, help="steps per arm of part B (0: the config's)")
    parser.add_argument("--parts", default="ab")
    parser.add_argument("--child", default=None)
    parser.add_argument("--bucket", type=int, default=0)
    args = parser.parse_args()
    if args.child == "pointing":
        print(json.dumps(pointing_child(args.images, args.input_size, args.bucket, args.seed)))
        return
    print(f"load at start: {_load()}")
    if "a" in args.parts:
        part_a(args.images, args.input_size, args.seed)
    if "b" in args.parts:
        part_b(args.steps)


if __name__ == "__main__":
    main()
