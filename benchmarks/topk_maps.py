r"""Speed of many maps per forward: top-k Grad-CAM maps vs k separate calls, and several methods vs one call each.

ResNet-18 (:mod:`saliency_jax.models.resnet`, random weights, inference mode), one batch of random images, Grad-CAM
at ``layer4``:

* ``separate``: ``k`` jitted calls of :func:`~saliency_jax.saliency.saliency_map` with int [batch] targets (the
  ``j``-th most likely class of each example), as a user of a peer library computes ``k`` maps: ``k`` forwards and
  ``k`` backwards;
* ``top_k``: one jitted call with ``targets=top_k(k)`` ([batch, k] maps; one forward, the backward ``vmap``-ed over
  the ``k`` cotangents, :mod:`saliency_jax.saliency.target_sets`).

Then several methods on one forward (``--methods``, default Grad-CAM, Grad-CAM++, HiResCAM, gradient, gradient x
input, EB), for the predicted class and for the top-k classes:

* ``separate``: one jitted :func:`~saliency_jax.saliency.saliency_map` call per method;
* ``shared``: one jitted :func:`~saliency_jax.saliency.saliency_maps` call (one forward; one backward for the
  gradient CAMs and input gradients together, one EB-ruled backward for EB).

Both sides give the same maps (checked before timing). Every figure is the median over ``--repeats`` timed rounds after a
warm-up (compile) call; within a round the two are interleaved; the weights are jit arguments.

Usage:
  python benchmarks/topk_maps.py [--batch 8] [--size 224] [--k 5] [--repeats 5] [--methods a,b,...]

Prints the load (``os.getloadavg``) before and after; runs on the default JAX backend (``JAX_PLATFORMS=cpu`` for
the CPU figures), ~1-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.models.resnet import ResNet18
from saliency_jax.saliency import linen_view, saliency_map, saliency_maps, top_k


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
        else:
            value = 0.05 * r.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="grad_cam,grad_cam_plus_plus,hirescam,vanilla_gradient,"
                        "gradient_x_input,excitation_backprop")
    args = parser.parse_args()

    print(f"load before: {os.getloadavg()}; backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    module = ResNet18(num_classes=args.num_classes)
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(args.batch, args.size, args.size, 3)), jnp.float32)
    variables = random_variables(module, images[:1])

    @jax.jit
    def one(variables, x, t):
        return saliency_map("grad_cam", linen_view(module, variables, "layer4", train=False), x, t)

    @jax.jit
    def topk(variables, x):
        return saliency_map("grad_cam", linen_view(module, variables, "layer4", train=False), x, top_k(args.k))

    logits = module.apply(variables, images, train=False)
    classes = jnp.argsort(-logits, axis=-1)[:, :args.k].astype(jnp.int32)

    def separate():
        return [one(variables, images, classes[:, j]) for j in range(args.k)]

    def together():
        return topk(variables, images)

    maps_sep = jnp.stack(jax.block_until_ready(separate()), axis=1)
    maps_top = jax.block_until_ready(together())
    err = float(jnp.max(jnp.abs(maps_sep - maps_top)))
    print(f"max |separate - top_k| = {err:.2e} (maps in [0, 1])")
    assert err < 1e-4

    med = _interleaved({"separate": separate, "top_k": together}, args.repeats)
    print(f"ResNet-18, batch {args.batch}, {args.size} px, Grad-CAM at layer4, top-{args.k}; median of "
          f"{args.repeats} rounds:")
    print(f"  {args.k} separate calls: {med['separate']:.3f} s")
    print(f"  one top-{args.k} call:      {med['top_k']:.3f} s")
    print(f"  ratio separate / top_k:  {med['separate'] / med['top_k']:.2f}x")

    methods = args.methods.split(",")
    for label, targets in (("predicted class", None), (f"top-{args.k}", top_k(args.k))):
        def view(variables):
            return linen_view(module, variables, "layer4", train=False)

        calls = {m: jax.jit(lambda v, x, m=m, t=targets: saliency_map(m, view(v), x, t)) for m in methods}
        shared_call = jax.jit(lambda v, x, t=targets: saliency_maps(methods, view(v), x, t))

        def apart():
            return {m: calls[m](variables, images) for m in methods}

        def shared():
            return shared_call(variables, images)

        a, b = jax.block_until_ready(apart()), jax.block_until_ready(shared())
        err = max(float(jnp.max(jnp.abs(a[m] - b[m]))) for m in methods)
        print(f"\n{len(methods)} methods ({', '.join(methods)}), {label}: max |separate - shared| = {err:.2e}")
        assert err < 1e-3
        med = _interleaved({"separate": apart, "shared": shared}, args.repeats)
        print(f"  {len(methods)} separate calls: {med['separate']:.3f} s")
        print(f"  one saliency_maps call: {med['shared']:.3f} s")
        print(f"  ratio separate / shared: {med['separate'] / med['shared']:.2f}x")
    print(f"load after: {os.getloadavg()}")


def _interleaved(fns, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function over ``repeats`` rounds, the functions interleaved in a round."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


if __name__ == "__main__":
    main()
