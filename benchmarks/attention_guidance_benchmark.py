r"""Step cost of Grad-CAM attention guidance and of RRR vs plain training, as ratios measured in one run.

The project's train step (:func:`saliency_jax.train.make_train_step`, jitted) with the registered schemes, built
from config sections as a run builds them (:func:`saliency_jax.training.build_scheme`), on the same model, batch and
optimizer:

* ``plain``: softmax cross-entropy, one Adam update;
* ``guidance``: the ``"attention_guidance"`` scheme: + ``w_g * -ln IoU(G, S)`` with ``G`` computed from the traced
  parameters, so the update differentiates through Grad-CAM's own gradient (one extra forward and backward for the
  map, plus the second-order term);
* ``guidance_first_order``: reference only (not a scheme): the same term with ``G`` under ``stop_gradient``,
  i.e. the cost of making the map without differentiating through it (this variant does not train the map);
* ``rrr``: the ``"rrr"`` scheme: + ``lambda_1 ||A * d/dx sum_k log p_k||^2`` (Ross et al. 2017): an input
  gradient and double backpropagation.

Models: ``cnn2`` as in ``experiments/configs/decoy_mnist.py`` (16/32/32 filters, 128/128 fc, 28x28x1, Grad-CAM at
``relu_conv3``) and ``small_cnn`` (32/64/128, BatchNorm; 32x32x3, Grad-CAM at ``conv3``). Timing: each step is run
in interleaved rounds (every variant once per round) so that load on the machine hits them alike; the median
milliseconds per step and the ratio to plain are printed.

Usage:
  python benchmarks/attention_guidance_benchmark.py [--models cnn2,small_cnn] [--batch 64] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from saliency_jax import models
from saliency_jax.train import init_state, make_train_step
from saliency_jax.training import ModelLayers, Scheme, build_scheme, settings_section
from saliency_jax.training import attention_guidance as ag

SETTINGS = {  # model -> (image size, channels, constructor kwargs, layers)
    "cnn2": (28, 1, {"conv_features": (16, 32, 32), "fc_features": (128, 128), "init_std": 0.05},
             ModelLayers("relu_conv3", "fc3")),
    "small_cnn": (32, 3, {"widths": (32, 64, 128)}, ModelLayers("conv3", "fc")),
}
VARIANTS = ("plain", "guidance", "guidance_first_order", "rrr")


def first_order_guidance(layers: ModelLayers) -> Scheme:
    """The guidance term with the map under ``stop_gradient`` (a cost reference; not a training scheme)."""

    def loss(ctx, batch, forward):
        del forward
        frozen = jax.lax.stop_gradient(ctx.variables)
        layer_model = ctx.model.layer_model(frozen, layers.grad_cam_layer)
        return ag.guidance_loss(layer_model, batch["image"], batch["label"], batch["region"]), {}

    return Scheme(loss=loss)


def schemes(layers: ModelLayers) -> dict[str, Scheme]:
    def built(*names):
        c = ml_collections.ConfigDict({"schemes": names, **{n: settings_section(n) for n in names}})
        return build_scheme(c, layers)

    return {"plain": built(), "guidance": built("attention_guidance"),
            "guidance_first_order": first_order_guidance(layers), "rrr": built("rrr")}


def batch_of(batch: int, size: int, channels: int) -> dict[str, jax.Array]:
    """A Decoy-MNIST-shaped random batch: images, labels, a central region S and a corner patch A."""
    rng = np.random.default_rng(0)
    region = np.zeros((batch, size, size), np.float32)
    q = size // 4
    region[:, q:3 * q, q:3 * q] = rng.random((batch, 2 * q, 2 * q)) < 0.4
    wrong = np.zeros_like(region)
    wrong[:, :4, :4] = 1.0
    return {"image": jnp.asarray(rng.uniform(size=(batch, size, size, channels)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
            "region": jnp.asarray(region), "wrong_region": jnp.asarray(wrong)}


def bench(name: str, batch: int, rounds: int) -> dict[str, float]:
    size, channels, kwargs, layers = SETTINGS[name]
    model = models.get_model(name, 10, **kwargs)
    optimizer = optax.adam(1e-3)
    data = batch_of(batch, size, channels)
    steps = {k: jax.jit(make_train_step(model, optimizer, s)) for k, s in schemes(layers).items()}
    state = init_state(model, optimizer, (size, size, channels), 0)
    key = jax.random.key(0)
    for k, fn in steps.items():  # compile, and check the step runs
        loss = float(fn(state, data, key)[1]["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"{name} {k}: non-finite loss {loss}")
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, data, key)[1]["loss"])
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {f"{k} ms": 1e3 * med[k] for k in VARIANTS}
    out.update({f"{k} / plain": med[k] / med["plain"] for k in VARIANTS[1:]})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn2,small_cnn")
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


if __name__ == "__main__":
    main()
