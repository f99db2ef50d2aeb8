r"""Speed of Excitation Backprop (EB) and contrastive EB (cEB) vs a plain input gradient, as ratios in one run.

ResNet-50 (:mod:`saliency_jax.models.resnet`, random weights, inference mode), one batch of random images:

* ``grad``: ``jax.grad`` of the summed target logits with respect to the images (the baseline, 1.0x);
* ``EB``: :func:`~saliency_jax.saliency.excitation_backprop` map at ``layer3`` (forward pass + EB backward pass
  through ``layer4`` and ``fc``). Target: <= 1.0x grad;
* ``cEB``: :func:`~saliency_jax.saliency.contrastive_excitation_backprop` map at ``layer3`` (contrast at the
  global pool, the classifier's input). Target: <= 1.6x EB.

Every figure is the median over ``--repeats`` timed calls of a jitted function after a warm-up (compile) call; the
weights are jit arguments, not constants folded into the program.

Usage:
  python benchmarks/eb_benchmark.py [--batch 8] [--size 224] [--repeats 5] [--layer layer3]

Runs on the default JAX backend (set ``JAX_PLATFORMS=cpu`` for the CPU figures); ~3-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.models.resnet import ResNet50
from saliency_jax.saliency import linen_layer
from saliency_jax.saliency.excitation_backprop import contrastive_excitation_backprop, excitation_backprop


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_variables(module, images, seed: int = 0):
    """ResNet variables filled from NumPy (He-normal kernels, BN statistics near identity); no compiled init."""
    r = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), images)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            value = r.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name in ("var", "scale"):
            value = r.uniform(0.8, 1.2, size=leaf.shape)
        else:  # biases, BN means
            value = 0.05 * r.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", default="layer3")
    args = parser.parse_args()

    module = ResNet50(num_classes=1000)
    images = jax.random.uniform(jax.random.key(1), (args.batch, args.size, args.size, 3), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (args.batch,), 0, 1000)
    variables = random_variables(module, images)

    @jax.jit
    def input_gradient(variables, images, targets):
        def score(x):
            logits = module.apply(variables, x, train=False)
            return jnp.take_along_axis(logits, targets[:, None], axis=-1).sum()

        return jax.grad(score)(images)

    @jax.jit
    def eb_map(variables, images, targets):
        model = linen_layer(module, variables, args.layer, train=False)
        return excitation_backprop(model, images, targets).saliency

    @jax.jit
    def ceb_map(variables, images, targets):
        model = linen_layer(module, variables, args.layer, train=False)
        return contrastive_excitation_backprop(model, images, targets).saliency

    seconds = {}
    for name, fn in (("grad", input_gradient), ("EB", eb_map), ("cEB", ceb_map)):
        seconds[name] = median_seconds(lambda fn=fn: fn(variables, images, targets), args.repeats)

    print(f"ResNet-50, batch {args.batch}, {args.size} px, {jax.devices()[0].platform}, EB/cEB at {args.layer}; "
          f"median of {args.repeats} runs after warm-up")
    print(f"{'method':<8}{'median ms':>12}{'x grad':>10}{'x EB':>8}  target")
    targets_text = {"grad": "", "EB": "<= 1.0x grad", "cEB": "<= 1.6x EB"}
    for name, s in seconds.items():
        print(f"{name:<8}{1e3 * s:>12.1f}{s / seconds['grad']:>10.2f}{s / seconds['EB']:>8.2f}  {targets_text[name]}")


if __name__ == "__main__":
    main()
