r"""Speed of background-invariant training (Cruz & Cardoso), as ratios measured in one run.

The phase-3 step (frozen U-Net mask + per-image binarisation, background generator forward, composite, classifier
forward/backward, one backward pass for both players through the gradient-reversal node, two Adam updates) against
the plain classifier step (phase 1: forward, backward, one Adam update), same classifier, batch and device. Also
the phase-2 (mask) step, phase 3 with the heuristic mask (no U-Net) and with each binarisation, and phase 3 with the
two players' gradients taken by two separate ``jax.grad`` calls (what one backward pass saves).

Usage:
  python benchmarks/background_invariance_benchmark.py [--batch 128] [--size 32] [--channels 1] [--repeats 20]

Every figure is the median over ``--repeats`` timed calls after a warm-up (compile) call; ratios are to the plain
step measured in the same run.

Measured on XLA:CPU (2 cores shared with other jobs, load about 10; ``--batch 64 --repeats 10``): plain 148 ms;
phase 3 with the U-Net mask 3.2-3.3x (any binarisation), with the heuristic mask 2.6x; phase 2 5.6x; two separate
``jax.grad`` calls 1.06x slower than the one backward pass (XLA shares most of the duplicated forward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saliency_jax.models.background_invariance import sample_background_noise
from saliency_jax.training import background_invariance as bi


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def two_grad_adversarial_step(models, optimizers, config):
    """Phase 3 with each player's gradient from its own ``jax.grad`` (two backward passes): the reference design."""
    classifier, generator = models.classifier, models.background_generator

    def step(state, batch, key):
        images, labels = batch["image"], batch["label"]
        key = jax.random.fold_in(key, state.step)
        k_noise, _ = jax.random.split(key)
        masks = bi.phase3_masks(models, state, images, config)
        z = sample_background_noise(k_noise, images.shape[0], images.shape[1:], generator.tiles)

        def ce(fp, gp):
            b = generator.apply({"params": gp}, z)
            logits = classifier.apply({"params": fp}, bi.composite(images, masks, b))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), b

        def gen_loss(gp):
            loss, b = ce(state.params["classifier"], gp)
            return -loss + bi.brightness_penalty(b)

        g_f = jax.grad(lambda fp: ce(fp, state.params["background_generator"])[0])(state.params["classifier"])
        g_b = jax.grad(gen_loss)(state.params["background_generator"])
        params, opt_state = dict(state.params), dict(state.opt_state)
        for role, g in (("classifier", g_f), ("background_generator", g_b)):
            upd, opt_state[role] = optimizers[role].update(g, state.opt_state[role], state.params[role])
            params[role] = optax.apply_updates(state.params[role], upd)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {}

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    shape = (args.size, args.size, args.channels)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(args.batch, *shape)).astype(np.float32)
    images[images < 0.7] = 0.0  # objects on black, so the heuristic mask is not all ones
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(rng.integers(0, 10, args.batch).astype(np.int32))}
    key = jax.random.key(0)

    cfg = bi.BackgroundInvarianceConfig()
    models = bi.make_models(10, shape, cfg)
    optimizers = bi.make_optimizers(cfg)
    state = jax.jit(lambda: bi.init_state(models, optimizers, shape, jax.random.key(0)))()

    def timed(step, state=state):
        fn = jax.jit(step)
        return median_seconds(lambda: fn(state, batch, key)[0].step, args.repeats)

    rows = [("plain classifier step (phase 1)", timed(bi.make_classifier_step(models, optimizers)))]
    rows.append(("phase 2: mask step (U-Net + frozen classifier)", timed(bi.make_mask_step(models, optimizers, cfg))))
    for method in ("otsu", "0.5", "quantile", "none"):
        c = bi.BackgroundInvarianceConfig(binarize=method)
        rows.append((f"phase 3: U-Net mask, binarize={method}", timed(bi.make_adversarial_step(models, optimizers, c))))
    heur_cfg = bi.BackgroundInvarianceConfig(mask="heuristic", binarize="none")
    heur_models = bi.BackgroundInvarianceModels(models.classifier, None, models.background_generator)
    heur_state = state.replace(params={k: v for k, v in state.params.items() if k != "mask_generator"},
                               opt_state={k: v for k, v in state.opt_state.items() if k != "mask_generator"})
    rows.append(("phase 3: heuristic mask (x > 0)",
                 timed(bi.make_adversarial_step(heur_models, optimizers, heur_cfg), heur_state)))
    rows.append(("phase 3, otsu, two jax.grad calls (reference)",
                 timed(two_grad_adversarial_step(models, optimizers, cfg))))

    base = rows[0][1]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; batch {args.batch}, images {shape}; "
          f"median of {args.repeats}")
    print(f"{'step':<52} {'ms':>9} {'x plain':>8}")
    for name, t in rows:
        print(f"{name:<52} {1e3 * t:9.3f} {t / base:8.2f}")
    ref = rows[-1][1]
    print(f"one backward pass (gradient reversal) vs two jax.grad calls: {ref / rows[2][1]:.2f}x faster")


if __name__ == "__main__":
    main()
