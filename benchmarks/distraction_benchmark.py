r"""Speed of distraction training (Morales et al. 2021), as ratios measured in one run.

1. Train step with distraction at p = 1 (Grad-CAM + occlusion of every mini-batch) vs the baseline train step, same
   model and batch. Target: <= 1.4x.
2. In-graph batched Grad-CAM occlusion of a mini-batch (one jitted call) vs a per-image Python loop computing the
   same maps, as the authors' Keras code does (one Grad-CAM call per image, then resize, normalisation and
   thresholding on the host with NumPy/Pillow). Target: >= 10x faster.

Usage:
  python benchmarks/distraction_benchmark.py [--models small_cnn,resnet18] [--batch 16] [--repeats 20]

Prints a table; every figure is the median over ``--repeats`` timed calls after a warm-up (compile) call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from saliency_jax import models
from saliency_jax.saliency import grad_cam, linen_layer
from saliency_jax.train import init_state, make_train_step
from saliency_jax.training import DistractionConfig, ModelLayers, distract, distraction_scheme

SETTINGS = {  # model -> (image size, channels)
    "small_cnn": (32, 3),
    "resnet18": (64, 3),
}


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, batch: int, repeats: int) -> dict[str, float]:
    size, channels = SETTINGS[name]
    model = models.get_model(name, 10)
    layer = models.GRAD_CAM_LAYER[name]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(batch, size, size, channels)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    optimizer = optax.adam(5e-5, eps=7e-7)
    state = init_state(model, optimizer, (size, size, channels), 0)
    key = jax.random.key(0)
    cfg = DistractionConfig(probability=1.0)

    base_step = jax.jit(make_train_step(model, optimizer))
    dist_step = jax.jit(make_train_step(model, optimizer,
                                        distraction_scheme(cfg, ModelLayers(layer, models.CLASSIFIER[name]))))
    batch_d = {"image": images, "label": labels}
    t_base = median_seconds(lambda: base_step(state, batch_d, key)[1]["loss"], repeats)
    t_dist = median_seconds(lambda: dist_step(state, batch_d, key)[1]["loss"], repeats)

    variables = state.variables()
    split = linen_layer(model, variables, layer, train=False)
    batched = jax.jit(lambda x, y, k: distract(k, split, x, y, cfg)[0])
    t_batched = median_seconds(lambda: batched(images, labels, key), repeats)

    # The authors' loop: one Grad-CAM call per image (layer resolution), then host-side resize, min-max and occlusion.
    single = jax.jit(lambda x, y: grad_cam(split, x, y, score="softmax", weighting="guided", resize=False,
                                           normalize=False))
    host_images = np.asarray(images)
    host_labels = np.asarray(labels)

    def loop():
        out = host_images.copy()
        for i in range(batch):
            cam = np.asarray(single(host_images[i:i + 1], host_labels[i:i + 1]))[0]
            cam = np.asarray(Image.fromarray(cam).resize((size, size), Image.Resampling.BILINEAR))
            span = cam.max() - cam.min()
            cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
            out[i][cam > cfg.threshold] = 0.0
        return out

    t_loop = median_seconds(loop, max(3, repeats // 4))
    return {"baseline step ms": 1e3 * t_base, "distraction step ms": 1e3 * t_dist,
            "step ratio": t_dist / t_base, "batched occlusion ms": 1e3 * t_batched,
            "per-image loop ms": 1e3 * t_loop, "loop / batched": t_loop / t_batched}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small_cnn,resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}  batch {args.batch}  (median of {args.repeats} calls)")
    rows = {name: bench_model(name, args.batch, args.repeats) for name in args.models.split(",")}
    cols = list(next(iter(rows.values())))
    print("| model | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    print("targets: step ratio <= 1.4x; loop / batched >= 10x")


if __name__ == "__main__":
    main()
