r"""Speed of cEB-R and EB-R vs the plain gradient through time (BP-R), as ratios in one run.

The CNN-LSTM clip classifier (:class:`saliency_jax.models.CNNLSTM`, random weights), one batch of synthetic
moving-digit clips (:class:`saliency_jax.data.MovingDigitClips` from the real MNIST test set when ``--mnist`` points
at it, random clips otherwise; the speed does not depend on the pixels):

* ``grad``: ``jax.grad`` of the class's logit at the last step with respect to every frame, through time (the
  baseline, 1.0x);
* ``grad@layer``: the same gradient taken at ``--layer`` of every frame instead of the pixels (the backward pass
  stops where EB-R's does: the like-for-like baseline);
* ``BP-R``: :func:`~saliency_jax.saliency.recurrent.recurrent_gradient` (the same gradient, reduced to maps);
* ``EB-R``: :func:`~saliency_jax.saliency.recurrent.recurrent_excitation_backprop` maps at ``--layer`` (forward,
  EB back through the LSTM to the boundary, temporal normalisation, EB down the CNN of every frame);
* ``cEB-R``: :func:`~saliency_jax.saliency.recurrent.contrastive_recurrent_excitation_backprop` (a second pass
  through the RNN head for the dual units). Target: same order as the gradient, <= 2x.

Every figure is the median over ``--repeats`` timed calls of a jitted function after a warm-up (compile) call; the
weights are jit arguments, not constants folded into the program.

Usage:
  python benchmarks/eb_recurrent_benchmark.py [--batch 8] [--time 16] [--canvas 64] [--repeats 5]
      [--layer conv3] [--mnist /path/to/mnist]

Runs on the default JAX backend (``JAX_PLATFORMS=cpu`` for the CPU figures); ~1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from saliency_jax.models import CNNLSTM
from saliency_jax.saliency.recurrent import (
    contrastive_recurrent_excitation_backprop,
    linen_clip_layers,
    recurrent_excitation_backprop,
    recurrent_gradient,
)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=16)
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", default="conv3")
    parser.add_argument("--boundary", default="fc")
    parser.add_argument("--mnist", default=None, help="MNIST IDX directory (default: random clips)")
    args = parser.parse_args()

    module = CNNLSTM(num_classes=10)
    if args.mnist:
        from saliency_jax.data.clips import MovingDigitClips, collate_clips

        source = MovingDigitClips.from_mnist(args.mnist, "test", num_clips=args.batch, length=args.time,
                                             canvas=args.canvas, layout="rand+gt", clutter=8)
        batch = collate_clips(source, range(args.batch))
        clips, targets = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    else:
        clips = jax.random.uniform(jax.random.key(1), (args.batch, args.time, args.canvas, args.canvas, 1))
        targets = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
    variables = jax.jit(module.init)(jax.random.key(0), clips[:1])

    @jax.jit
    def gradient_through_time(variables, clips, targets):
        def score(x):
            logits = module.apply(variables, x)
            return jnp.take_along_axis(logits[:, -1], targets[:, None], axis=-1).sum()

        return jax.grad(score)(clips)

    @jax.jit
    def gradient_at_layer(variables, clips, targets):
        model = linen_clip_layers(module, variables, args.layer, args.boundary)
        layer, _ = model.shapes(clips)

        def score(perturbation):
            logits = model.fn(clips, perturbation, jnp.zeros((), clips.dtype))[0]
            return jnp.take_along_axis(logits[:, -1], targets[:, None], axis=-1).sum()

        return jax.grad(score)(jnp.zeros(layer.shape, layer.dtype))

    @jax.jit
    def bp_r(variables, clips, targets):
        return recurrent_gradient(lambda x: module.apply(variables, x), clips, targets).saliency

    @jax.jit
    def eb_r(variables, clips, targets):
        model = linen_clip_layers(module, variables, args.layer, args.boundary)
        return recurrent_excitation_backprop(model, clips, targets).saliency

    @jax.jit
    def ceb_r(variables, clips, targets):
        model = linen_clip_layers(module, variables, args.layer, args.boundary)
        return contrastive_recurrent_excitation_backprop(model, clips, targets).saliency

    seconds = {}
    methods = (("grad", gradient_through_time), ("grad@layer", gradient_at_layer), ("BP-R", bp_r), ("EB-R", eb_r),
               ("cEB-R", ceb_r))
    for name, fn in methods:
        seconds[name] = median_seconds(lambda fn=fn: fn(variables, clips, targets), args.repeats)

    print(f"CNN-LSTM, batch {args.batch} clips x {args.time} frames, {args.canvas} px, {jax.devices()[0].platform}, "
          f"EB-R/cEB-R at {args.layer}; median of {args.repeats} runs after warm-up")
    print(f"{'method':<12}{'median ms':>12}{'x grad':>10}{'x grad@layer':>14}  target")
    for name, s in seconds.items():
        target = "<= 2x grad@layer" if name == "cEB-R" else ""
        print(f"{name:<12}{1e3 * s:>12.1f}{s / seconds['grad']:>10.2f}{s / seconds['grad@layer']:>14.2f}  {target}")


if __name__ == "__main__":
    main()
