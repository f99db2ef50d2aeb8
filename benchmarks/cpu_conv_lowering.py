r"""ResNet-50 on XLA:CPU: which lowering of its convolutions and batch norms is fastest (issue 23, item 2).

Each row times two choices interleaved in one process (same threads, same load); "now" is
``lax.conv_general_dilated`` (the lowering before :data:`saliency_jax.models.conv.DOT_1X1`), "alt" the other one:

* ``--only convs``: every distinct 1x1 convolution of ResNet-50 at batch ``--batch`` (224 px input) as
  ``conv_general_dilated`` vs ``dot_general`` on the channels (stride 2: a strided slice first), forward and input
  gradient (the VJP with respect to the input: Grad-CAM's and EB's backward); the 3x3 convolutions' input gradient
  (now) against their forward (alt); the 7x7/2 stem and two 3x3 convolutions as ``conv_general_dilated`` vs
  im2col + ``dot_general`` (:func:`saliency_jax.models.conv.patches_conv2d`), forward and input gradient.
* ``--only model``: the whole ResNet-50 (random weights and running statistics, inference mode) - forward, input
  gradient, Grad-CAM at ``layer4`` and EB at ``layer3`` - traced with ``DOT_1X1 = False`` (now) and ``True`` (alt),
  with the maximum relative difference of their outputs; then the forward with its batch norms as they are vs
  folded into the convolutions (:func:`saliency_jax.saliency.fold_batch_norm`: the batch norm keeps only a shift).

Usage::

  JAX_PLATFORMS=cpu python benchmarks/cpu_conv_lowering.py --batch 8 --rounds 5 [--only convs|model]

Prints milliseconds (median of ``--rounds``) and the ratio now / alternative (> 1: the alternative is faster), with
the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _median_ms(fn, args, rounds: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _pairs(rows, rounds):
    """rows: [(label, fn_now, fn_alt, args)] -> prints interleaved medians."""
    print(f"{'':<44}{'now ms':>10}{'alt ms':>10}{'now/alt':>9}")
    total_now = total_alt = 0.0
    for label, now, alt, args in rows:
        ts_now, ts_alt = [], []
        for _ in range(rounds):  # interleaved
            ts_now.append(_median_ms(now, args, 1))
            ts_alt.append(_median_ms(alt, args, 1))
        a, b = float(np.median(ts_now)), float(np.median(ts_alt))
        total_now, total_alt = total_now + a, total_alt + b
        print(f"{label:<44}{a:>10.2f}{b:>10.2f}{a / b:>9.2f}", flush=True)
    return total_now, total_alt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("convs", "model", "all"), default="all")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from jax import lax

    from saliency_jax.models import conv as conv_lib

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch} [{_load()}]")
    key = jax.random.key(0)
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x, k, s):
        return lax.conv_general_dilated(x, k, (s, s), "SAME" if k.shape[0] > 1 else "VALID", dimension_numbers=dn)

    def dot1x1(x, k, s):
        if s > 1:
            x = x[:, ::s, ::s, :]
        return lax.dot_general(x, k[0, 0], (((3,), (0,)), ((), ())))

    def grad_in(f):
        def g(x, k, s):
            y, vjp = jax.vjp(lambda xx: f(xx, k, s), x)
            return vjp(jnp.ones_like(y))[0]
        return g

    if args.only in ("convs", "all"):
        # ResNet-50's distinct 1x1 convs at 224 px: (map, c_in, c_out, stride, count in the network)
        shapes_1x1 = [(56, 64, 64, 1, 1), (56, 64, 256, 1, 4), (56, 256, 64, 1, 2), (56, 256, 128, 1, 1),
                      (28, 128, 512, 1, 4), (56, 256, 512, 2, 1), (28, 512, 128, 1, 3), (28, 512, 256, 1, 1),
                      (14, 256, 1024, 1, 6), (28, 512, 1024, 2, 1), (14, 1024, 256, 1, 5), (14, 1024, 512, 1, 1),
                      (7, 512, 2048, 1, 3), (14, 1024, 2048, 2, 1), (7, 2048, 512, 1, 2)]
        rows_f, rows_b = [], []
        for hw, ci, co, s, n in shapes_1x1:
            x = jax.random.normal(key, (args.batch, hw, hw, ci), jnp.float32)
            k = jax.random.normal(key, (1, 1, ci, co), jnp.float32) * 0.05
            label = f"1x1/{s} {hw}x{hw}x{ci}->{co} (x{n})"
            rows_f.append((label, jax.jit(conv, static_argnums=2), jax.jit(dot1x1, static_argnums=2), (x, k, s)))
            rows_b.append((label, jax.jit(grad_in(conv), static_argnums=2),
                           jax.jit(grad_in(dot1x1), static_argnums=2), (x, k, s)))
        print(f"\n== 1x1 conv forward: conv_general_dilated (now) vs dot_general [{_load()}]")
        _pairs(rows_f, args.rounds)
        print(f"\n== 1x1 conv input gradient: conv_general_dilated (now) vs dot_general [{_load()}]")
        _pairs(rows_b, args.rounds)
        shapes_3x3 = [(56, 64, 1), (28, 128, 1), (14, 256, 1), (7, 512, 1), (56, 128, 2), (28, 256, 2), (14, 512, 2)]
        rows = []
        for hw, c, s in shapes_3x3:
            x = jax.random.normal(key, (args.batch, hw, hw, c), jnp.float32)
            k = jax.random.normal(key, (3, 3, c, c), jnp.float32) * 0.05
            rows.append((f"3x3/{s} {hw}x{hw}x{c}->{c}: fwd vs input grad", jax.jit(grad_in(conv), static_argnums=2),
                         jax.jit(conv, static_argnums=2), (x, k, s)))
        print(f"\n== 3x3 conv: input gradient (now) vs forward (alt) [{_load()}]")
        _pairs(rows, args.rounds)

        def explicit(f, pad):
            return lambda x, k, s: f(x, k, s, ((pad, pad), (pad, pad)))

        def xla(x, k, s, pads):
            return lax.conv_general_dilated(x, k, (s, s), pads, dimension_numbers=dn)

        def im2col(x, k, s, pads):
            return conv_lib.patches_conv2d(x, k, (s, s), pads)

        rows_f, rows_b = [], []
        for hw, ci, co, kk, s, p in [(224, 3, 64, 7, 2, 3), (56, 64, 64, 3, 1, 1), (28, 128, 128, 3, 1, 1)]:
            x = jax.random.normal(key, (args.batch, hw, hw, ci), jnp.float32)
            k = jax.random.normal(key, (kk, kk, ci, co), jnp.float32) * 0.05
            label = f"{kk}x{kk}/{s} {hw}x{hw}x{ci}->{co}"
            now, alt = explicit(xla, p), explicit(im2col, p)
            rows_f.append((label, jax.jit(now, static_argnums=2), jax.jit(alt, static_argnums=2), (x, k, s)))
            rows_b.append((label, jax.jit(grad_in(now), static_argnums=2), jax.jit(grad_in(alt), static_argnums=2),
                           (x, k, s)))
        print(f"\n== stem and 3x3 convs forward: conv_general_dilated (now) vs im2col + dot_general [{_load()}]")
        _pairs(rows_f, args.rounds)
        print(f"\n== ... their input gradient [{_load()}]")
        _pairs(rows_b, args.rounds)

    if args.only in ("model", "all"):
        from saliency_jax import models
        from saliency_jax.saliency import excitation_backprop, fold_batch_norm, grad_cam, linen_layer

        module = models.get_model("resnet50", 1000)
        images = jax.random.uniform(key, (args.batch, 224, 224, 3), jnp.float32)
        targets = jnp.arange(args.batch, dtype=jnp.int32)
        variables = jax.jit(module.init)(key, images[:1])
        # random running statistics, as a trained network has
        stats = jax.tree.map(lambda v: jnp.abs(v) + 0.5 + 0.1 * jax.random.uniform(key, v.shape),
                             variables["batch_stats"])
        variables = {"params": variables["params"], "batch_stats": stats}
        methods = {
            "forward": lambda v, x: module.apply(v, x, train=False),
            "input gradient": lambda v, x: jax.grad(lambda xx: jnp.sum(module.apply(v, xx, train=False)[:, 0]))(x),
            "Grad-CAM (layer4)": lambda v, x: grad_cam(linen_layer(module, v, "layer4", train=False), x, targets,
                                                       resize=False, normalize=False),
            "EB (layer3)": lambda v, x: excitation_backprop(linen_layer(module, v, "layer3", train=False), x,
                                                            targets).saliency,
        }

        def traced(fn, dot_1x1):  # DOT_1X1 is read at trace time: trace (compile) under the setting now
            old, conv_lib.DOT_1X1 = conv_lib.DOT_1X1, dot_1x1
            try:
                jitted = jax.jit(lambda *a: fn(*a))  # a new function: no trace cached from the other setting
                compiled = jitted.lower(variables, images).compile()
            finally:
                conv_lib.DOT_1X1 = old
            return lambda x: compiled(variables, x)

        rows, diffs = [], []
        for name, fn in methods.items():
            now, alt = traced(fn, False), traced(fn, True)
            a, b = now(images), alt(images)
            diffs.append(f"{name} {float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)):.1e}")
            rows.append((name, now, alt, (images,)))
        print(f"\n== ResNet-50: 1x1 convs as conv_general_dilated (now) vs dot_general (alt) [{_load()}]")
        print("max |difference| / max |value|: " + ", ".join(diffs))
        _pairs(rows, args.rounds)

        folded = fold_batch_norm(module, variables, images, train=False)
        fwd = jax.jit(methods["forward"])
        diff = float(jnp.max(jnp.abs(fwd(variables, images) - fwd(folded, images))))
        print(f"\n== ResNet-50 forward with its batch norms (now) vs folded (alt); max |logit difference| {diff:.2e} "
              f"[{_load()}]")
        _pairs([("forward", lambda x: fwd(variables, x), lambda x: fwd(folded, x), (images,))], args.rounds)
    print(f"\n[{_load()}]")


if __name__ == "__main__":
    main()
