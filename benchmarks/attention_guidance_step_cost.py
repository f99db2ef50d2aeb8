r"""Step cost of Grad-CAM attention guidance and of RRR vs plain training, as ratios measured in one run.

Four jitted update steps on the same model, batch and optimizer (plain optax, outside the project's train loop):

* ``plain``: softmax cross-entropy (BatchNorm in train mode), one Adam update;
* ``guidance_first_order``: + ``w_g * -ln IoU(G, S)`` with the Grad-CAM map ``G`` under ``stop_gradient`` - the
  cost of the extra forward/backward that makes the map, without differentiating through it (for reference; this
  variant does not train the map);
* ``guidance``: the scheme: ``G`` computed from the traced parameters, so the update differentiates through
  Grad-CAM's own gradient (second order);
* ``rrr``: + ``lambda_1 ||A * d/dx sum_k log p_k||^2`` (Ross et al. 2017): input gradient + double backprop.

The maps and the input gradients use the model in inference mode (running BatchNorm statistics), as the schemes
do. Every figure is the median over ``repeats`` rounds of ``steps`` consecutive steps, the variants interleaved
round by round so that machine load affects them alike.

Usage:
  python benchmarks/attention_guidance_step_cost.py [--batch_size 128] [--image_size 28] [--steps 10]
      [--repeats 7] [--widths 32,64,128]

or from Python: ``step_costs(batch_size=128)`` returns the seconds per step of each variant.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saliency_jax.models import GRAD_CAM_LAYER, SmallCNN
from saliency_jax.saliency import linen_layer
from saliency_jax.training import attention_guidance as ag

VARIANTS = ("plain", "guidance_first_order", "guidance", "rrr")


def make_steps(model: SmallCNN, optimizer: optax.GradientTransformation, guidance: ag.GuidanceConfig,
               rrr: ag.RRRConfig, layer: str = GRAD_CAM_LAYER["small_cnn"]) -> dict[str, Callable]:
    """The four jitted steps ``(params, batch_stats, opt_state, batch) -> (params, batch_stats, opt_state, loss)``.

    ``batch``: ``{"image": [b, h, w, c] float32, "label": [b] int32, "region": [b, h, w] float32 (S),
    "wrong_region": [b, h, w] float32 (A)}``.
    """

    def make(variant: str) -> Callable:
        def loss_fn(params, batch_stats, batch):
            variables = {"params": params, "batch_stats": batch_stats}
            logits, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            if variant == "plain":
                per_example = ce
            elif variant in ("guidance", "guidance_first_order"):
                frozen = variables if variant == "guidance" else jax.lax.stop_gradient(variables)
                layer_model = linen_layer(model, frozen, layer, train=False)
                loss_g = ag.guidance_loss(layer_model, batch["image"], batch["label"], batch["region"],
                                          epsilon=guidance.epsilon, score=guidance.score,
                                          weighting=guidance.weighting)
                per_example = guidance.w_a * ce + guidance.w_g * loss_g
            elif variant == "rrr":
                logits_fn = lambda x: model.apply(variables, x, train=False)
                per_example = ce + ag.rrr_penalty(logits_fn, batch["image"], batch["wrong_region"],
                                                  lambda1=rrr.lambda1, pixel_scale=rrr.pixel_scale,
                                                  activation=rrr.activation)
            else:
                raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
            return jnp.mean(per_example), updates.get("batch_stats", batch_stats)

        @jax.jit
        def step(params, batch_stats, opt_state, batch):
            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, loss

        return step

    return {v: make(v) for v in VARIANTS}


def synthetic_batch(batch_size: int, image_size: int, channels: int = 1, seed: int = 0) -> dict[str, jax.Array]:
    """A Decoy-MNIST-shaped random batch: images, labels, a central region S and a corner patch A."""
    rng = np.random.default_rng(seed)
    region = np.zeros((batch_size, image_size, image_size), np.float32)
    q = image_size // 4
    region[:, q:3 * q, q:3 * q] = rng.random((batch_size, 2 * q, 2 * q)) < 0.4
    wrong = np.zeros_like(region)
    wrong[:, :4, :4] = 1.0
    return {"image": jnp.asarray(rng.random((batch_size, image_size, image_size, channels)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
            "region": jnp.asarray(region), "wrong_region": jnp.asarray(wrong)}


def step_costs(batch_size: int = 128, image_size: int = 28, steps: int = 10, repeats: int = 7,
               widths: tuple[int, ...] = (32, 64, 128), guidance: ag.GuidanceConfig = ag.GuidanceConfig(),
               rrr: ag.RRRConfig = ag.RRRConfig(), verbose: bool = True) -> dict[str, dict[str, float]]:
    """Measures the four steps (see the module docstring) on ``SmallCNN``.

    Args:
      batch_size: examples per step.
      image_size: side of the (square, 1-channel) images; divisible by 4.
      steps: consecutive steps per timed round.
      repeats: timed rounds per variant (median reported).
      widths: ``SmallCNN`` channel widths.
      guidance: settings of the guidance term.
      rrr: settings of the RRR term.
      verbose: print the table.

    Returns:
      ``{variant: {"seconds_per_step", "ratio_to_plain", "compile_seconds"}}``.
    """
    model = SmallCNN(num_classes=10, widths=tuple(widths))
    batch = synthetic_batch(batch_size, image_size)
    variables = model.init(jax.random.key(0), batch["image"][:1])
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(variables["params"])
    fns = make_steps(model, optimizer, guidance, rrr)
    states, compile_s = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out = fn(variables["params"], variables["batch_stats"], opt_state, batch)
        jax.block_until_ready(out)
        compile_s[name] = time.perf_counter() - t0
        if not np.isfinite(float(out[3])):
            raise FloatingPointError(f"{name}: non-finite loss {float(out[3])}")
        states[name] = out[:3]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            params, batch_stats, opt = states[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                params, batch_stats, opt, loss = fn(params, batch_stats, opt, batch)
            jax.block_until_ready(loss)
            times[name].append((time.perf_counter() - t0) / steps)
            states[name] = (params, batch_stats, opt)
    plain = statistics.median(times["plain"])
    result = {name: {"seconds_per_step": statistics.median(t), "ratio_to_plain": statistics.median(t) / plain,
                     "compile_seconds": compile_s[name]} for name, t in times.items()}
    if verbose:
        print(f"backend={jax.default_backend()} devices={jax.device_count()} SmallCNN widths={tuple(widths)} "
              f"batch={batch_size} image={image_size}x{image_size}x1 steps={steps} repeats={repeats}")
        print(f"{'variant':<22} {'ms/step':>9} {'x plain':>8} {'compile s':>10}")
        for name, r in result.items():
            print(f"{name:<22} {1e3 * r['seconds_per_step']:9.2f} {r['ratio_to_plain']:8.2f} "
                  f"{r['compile_seconds']:10.1f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--widths", default="32,64,128")
    args = parser.parse_args()
    step_costs(batch_size=args.batch_size, image_size=args.image_size, steps=args.steps, repeats=args.repeats,
               widths=tuple(int(w) for w in args.widths.split(",")))


if __name__ == "__main__":
    main()
