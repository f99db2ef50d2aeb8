r"""Step cost of each saliency-guided scheme on the small ViT vs its plain step, and NNX vs linen, in one run.

The model is the ViT of ``experiments/configs/vit_mnist.py`` (patch 4 on 28x28x1: a 7x7 token grid, hidden 64,
4 pre-LN blocks, 4 heads, MLP 128, GAP head), built from a config exactly as a run builds it
(:func:`saliency_jax.models.build.trainable_model`: ``"vit"``, linen; ``"nnx_vit"``, the same architecture in NNX),
trained by the project's step (:func:`saliency_jax.training.make_train_step`, jitted, Adam 1e-3, batch 64) with:

* ``plain``: ``Scheme()``, softmax cross-entropy and one update;
* ``distraction``: ``probability=1.0`` so that every step makes the Grad-CAM of the ground-truth class at
  ``encoder_norm`` (read as a 7x7 grid) and trains on the occluded batch (p = 0.25 in training pays a quarter of the
  Grad-CAM on average: the batch transform skips it with ``lax.cond``);
* ``hnc``: the HNC loss (Sun et al. 2020, variant ``mse``), the head's CAM over the token grid from the training
  forward's activations;
* ``attention_guidance``: ``-ln IoU(Grad-CAM, region)`` differentiated through Grad-CAM's own gradient (a random
  central region per image in the batch field ``"region"`` [batch, 28, 28]);
* ``dropout``: the ``"standard"`` dropout scheme (P = 0.5) at the last block's MLP hidden layer (``block3/mlp/fc1``;
  NNX: ``blocks/3/mlp/fc1``). Excitation Dropout itself is refused on a ViT (no Excitation Backprop rule for
  attention).

Every step of both models is timed in the same interleaved rounds (each variant once per round, the order fixed), so
load on the machine hits them alike; the median milliseconds per step, the ratio to the same model's plain step, and
each NNX step / the linen step of the same scheme are printed. The machine load (``os.getloadavg``) is printed before
and after the rounds.

Usage:
  python benchmarks/vit_scheme_step.py [--batch 64] [--rounds 15] [--models vit,nnx_vit]

Measured (2026-12-07, 2 shared CPU cores, ``JAX_PLATFORMS=cpu``, ``--rounds 25``; load average 1.73 / 3.02 / 4.96
before the rounds, 2.02 / 2.95 / 4.88 after; the whole script took 2.6 min, most of it compiling):

| model | scheme | ms / step | vs plain | vs vit |
| --- | --- | --- | --- | --- |
| vit | plain | 126.6 | 1.00x | 1.00x |
| vit | distraction | 147.8 | 1.17x | 1.00x |
| vit | hnc | 120.2 | 0.95x | 1.00x |
| vit | attention_guidance | 162.7 | 1.28x | 1.00x |
| vit | dropout | 125.7 | 0.99x | 1.00x |
| nnx_vit | plain | 124.1 | 1.00x | 0.98x |
| nnx_vit | distraction | 146.9 | 1.18x | 0.99x |
| nnx_vit | hnc | 124.8 | 1.01x | 1.04x |
| nnx_vit | attention_guidance | 170.3 | 1.37x | 1.05x |
| nnx_vit | dropout | 127.4 | 1.03x | 1.01x |

NNX is not slower: its steps are within 5% of the linen ones (the difference is within the noise: the hnc step
reads 0.95x its own plain step, which it cannot be). Every-step Grad-CAM costs 1.17x (one inference forward and the
backward to ``encoder_norm``), differentiating through it (attention guidance) 1.3-1.4x; HNC and standard dropout
cost nothing measurable. An earlier run of 15 rounds under load (load average 6.65 / 5.33 / 3.72 before, 6.40 / 5.46
/ 3.84 after) gave plain 224 / 214 ms (vit / nnx_vit) and ratios 1.18 / 0.88 / 1.62 / 1.17 (vit) and 1.43 / 1.35 /
1.69 / 1.21 (nnx_vit) for distraction / hnc / attention_guidance / dropout: under that load the ratios scatter by
+-0.3, so compare only numbers taken at a low load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from saliency_jax.config import default_config
from saliency_jax.models.build import trainable_model
from saliency_jax.training import build_scheme, check_model, init_state, make_train_step, settings_section

SIZE, CHANNELS, NUM_CLASSES = 28, 1, 10
VIT = dict(patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128, dropout_rate=0.0)
MODELS = {  # name -> (config.model.kwargs, the dropout scheme's layer)
    "vit": (VIT, "block3/mlp/fc1"),
    "nnx_vit": ({**VIT, "channels": CHANNELS, "image_size": SIZE}, "blocks/3/mlp/fc1"),
}
SCHEMES = {  # variant -> (config.schemes, sections); the dropout layer is filled in per model
    "plain": ((), {}),
    "distraction": (("distraction",), {"distraction": dict(probability=1.0)}),
    "hnc": (("hnc",), {"hnc": dict(variant="mse")}),
    "attention_guidance": (("attention_guidance",), {"attention_guidance": {}}),
    "dropout": (("dropout",), {"dropout": dict(scheme="standard", base_retain=0.5)}),
}


def model_config(name: str) -> ml_collections.ConfigDict:
    c = default_config()
    c.model.name = name
    c.model.kwargs = dict(MODELS[name][0])
    return c


def scheme_config(variant: str, dropout_layer: str) -> ml_collections.ConfigDict:
    names, sections = SCHEMES[variant]
    c = ml_collections.ConfigDict({"schemes": names})
    for n, overrides in sections.items():
        overrides = dict(overrides, layer=dropout_layer) if n == "dropout" else overrides
        c[n] = settings_section(n, **overrides)
    return c


def batch_of(batch: int) -> dict[str, jax.Array]:
    """Random images and labels, and a random central region (the attention-guidance target) per image."""
    rng = np.random.default_rng(0)
    region = np.zeros((batch, SIZE, SIZE), np.float32)
    q = SIZE // 4
    region[:, q:3 * q, q:3 * q] = rng.random((batch, 2 * q, 2 * q)) < 0.5
    return {"image": jnp.asarray(rng.uniform(size=(batch, SIZE, SIZE, CHANNELS)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32),
            "region": jnp.asarray(region)}


def build_steps(name: str):
    """``{variant: (jitted step, state)}`` for one model; each step compiled and checked to give a finite loss."""
    model = trainable_model(model_config(name), NUM_CLASSES)
    optimizer = optax.adam(1e-3)
    state = init_state(model, optimizer, (SIZE, SIZE, CHANNELS), 0)
    out = {}
    for variant in SCHEMES:
        scheme = build_scheme(scheme_config(variant, MODELS[name][1]), model.layers)
        check_model(model, scheme, (SIZE, SIZE, CHANNELS))
        out[variant] = (jax.jit(make_train_step(model, optimizer, scheme)), scheme)
    return model, state, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit,nnx_vit")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    names = args.models.split(",")
    data = batch_of(args.batch)
    key = jax.random.key(0)
    steps, compile_s = {}, {}
    for name in names:
        model, state, built = build_steps(name)
        for variant, (fn, _) in built.items():
            t0 = time.perf_counter()
            new_state, metrics = fn(state, data, key)
            loss = float(metrics["loss"])
            compile_s[(name, variant)] = time.perf_counter() - t0
            if not np.isfinite(loss) or float(metrics["update_skipped"]):
                raise FloatingPointError(f"{name} {variant}: loss {loss}, update_skipped "
                                         f"{float(metrics['update_skipped'])}")
            if variant == "distraction" and float(metrics["occluded"]) != 1.0:
                raise AssertionError(f"{name}: distraction at probability 1 occluded {float(metrics['occluded'])}")
            steps[(name, variant)] = (fn, state)
    print(f"devices: {jax.devices()}  batch {args.batch}  28x28x1, patch 4 (7x7 tokens), hidden 64, 4 layers, "
          f"4 heads, mlp 128  (median of {args.rounds} interleaved rounds)")
    print("first call (compile + run), s: " + ", ".join(f"{n}/{v} {s:.1f}" for (n, v), s in compile_s.items()))
    load_before = os.getloadavg()
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, (fn, state) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, data, key)[1]["loss"])
            times[k].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = names[0]
    header = ["model", "scheme", "ms / step", "vs plain"] + ([f"vs {base}"] if len(names) > 1 else [])
    print("| " + " | ".join(header) + " |")
    print("| --- " * len(header) + "|")
    for name, variant in steps:
        row = [name, variant, f"{1e3 * med[(name, variant)]:.1f}",
               f"{med[(name, variant)] / med[(name, 'plain')]:.2f}x"]
        if len(names) > 1:
            row.append(f"{med[(name, variant)] / med[(base, variant)]:.2f}x" if (base, variant) in med else "")
        print("| " + " | ".join(row) + " |")
    print("load average (1/5/15 min) before the rounds: " + " / ".join(f"{x:.2f}" for x in load_before)
          + ", after: " + " / ".join(f"{x:.2f}" for x in load_after))


if __name__ == "__main__":
    main()
