r"""Cost of the HNC loss (Sun et al. 2020) in the train step, as ratios measured in one run.

The train step with the ``hnc`` scheme (mse and kd) vs the plain cross-entropy step, same model, batch and
optimizer; the steps are timed in interleaved rounds so that load on the machine hits them alike. The HNC term reads
the training forward's last-block activations and the classifier's kernel (one extra contraction over the last
feature map), so the target is <= 1.15x.

Usage:
  python benchmarks/hnc_benchmark.py [--models small_cnn,resnet18] [--batch 64] [--rounds 15]

Prints the median milliseconds per step and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saliency_jax import models
from saliency_jax.train import init_state, make_train_step
from saliency_jax.training import HNCConfig, ModelLayers, Scheme, hnc_scheme

SETTINGS = {  # model -> (image size, channels, constructor kwargs)
    "small_cnn": (32, 3, {"widths": (32, 64, 128)}),
    "resnet18": (64, 3, {}),
}


def bench(name: str, batch: int, rounds: int) -> dict[str, float]:
    size, channels, kwargs = SETTINGS[name]
    model = models.get_model(name, 10, **kwargs)
    layers = ModelLayers(models.GRAD_CAM_LAYER[name], models.CLASSIFIER[name])
    optimizer = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.uniform(size=(batch, size, size, channels)).astype(np.float32)),
            "label": jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))}
    schemes = {"plain": Scheme(), "hnc-mse": hnc_scheme(HNCConfig(variant="mse"), layers),
               "hnc-kd": hnc_scheme(HNCConfig(variant="kd"), layers)}
    steps = {k: jax.jit(make_train_step(model, optimizer, s)) for k, s in schemes.items()}
    state = init_state(model, optimizer, (size, size, channels), 0)
    key = jax.random.key(0)
    for fn in steps.values():  # compile
        jax.block_until_ready(fn(state, data, key)[1]["loss"])
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, data, key)[1]["loss"])
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"plain ms": 1e3 * med["plain"], "hnc-mse ms": 1e3 * med["hnc-mse"], "hnc-kd ms": 1e3 * med["hnc-kd"],
            "mse / plain": med["hnc-mse"] / med["plain"], "kd / plain": med["hnc-kd"] / med["plain"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small_cnn,resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}  batch {args.batch}  (median of {args.rounds} interleaved rounds)")
    rows = {name: bench(name, args.batch, args.rounds) for name in args.models.split(",")}
    cols = list(next(iter(rows.values())))
    print("| model | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    print("target: HNC step / plain step <= 1.15x")


if __name__ == "__main__":
    main()
