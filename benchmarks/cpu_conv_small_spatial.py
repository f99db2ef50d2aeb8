r"""Minimal reproduction: a 3x3 convolution on a 2x2 (or 1x1) feature map is ~100x slower on XLA:CPU.

Plain ``jax.lax.conv_general_dilated`` (NHWC, HWIO, stride 1, padding 1, 512 -> 512 channels, batch 16), timed at
several spatial sizes, next to the same linear map written as im2col + ``dot_general`` and (if importable) this
project's routed :func:`saliency_jax.models.conv.conv2d`. For each size the script also prints how XLA compiled the
convolution: ``ynn`` when it went to a YNNPACK fusion (the fast library path), ``swapped`` when the optimised HLO
has the operands exchanged (``dim_labels=01fb_o01i->f01b``, the kernel as the "input"), which XLA:CPU emits as a
naive loop.

Cause (jaxlib 0.10.2): XLA's algebraic simplifier swaps a convolution's operands when the product of the kernel's
window sizes exceeds the product of the input's spatial sizes (``SwapConvolutionOperandsIfBeneficial`` in
``xla/hlo/transforms/simplifiers/conv_operand_swapper.cc``: 3x3 = 9 > 2x2 = 4, and > 1x1), see the
``after_algsimp`` HLO dump (``XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_pass_re=.*``). The swapped convolution
is not matched by the CPU library rewrites and becomes an ``*_elemental_kernel_module``. Explicit padding does not
avoid it (the simplifier folds a zero pad into the convolution first); no XLA flag disables it.

Usage (no project code needed for the first two columns)::

  JAX_PLATFORMS=cpu python benchmarks/cpu_conv_small_spatial.py [--batch 16] [--channels 512] \
      [--sizes 1 2 3 4 7 14] [--repeats 7] [--grad]

``--grad`` times ``jax.grad`` of ``sum(conv(x, k) ** 2)`` with respect to both operands instead of the forward.
Columns: median milliseconds over ``--repeats`` calls after a compile call, GFLOP/s counting all 9 taps, and the
max |difference| from ``conv_general_dilated`` (relative to its max |value|).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:  # the project's routed convolution, if this runs inside the repository
    from saliency_jax.models.conv import conv2d as project_conv2d
except ImportError:  # pragma: no cover - plain reproduction outside the project
    project_conv2d = None

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, k):
    """The reported operation: 3x3 (any kernel), stride 1, padding 1."""
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMENSION_NUMBERS)


def im2col_conv(x, k):
    """The same map as im2col + one matrix product (kh * kw shifted slices of the padded input)."""
    kh, kw, c_in, c_out = k.shape
    b, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    oh, ow = h + 3 - kh, w + 3 - kw
    cols = jnp.concatenate([xp[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
    return lax.dot_general(cols, k.reshape(kh * kw * c_in, c_out), (((3,), (0,)), ((), ())))


def routed_conv(x, k):
    return project_conv2d(x, k, (1, 1), ((1, 1), (1, 1)))


def compiled_path(fn, *args) -> str:
    """How XLA compiled the convolution(s): 'ynn', 'swapped', 'dot' or 'other' (joined when several)."""
    text = fn.lower(*args).compile().as_text()
    kinds = set()
    for line in text.splitlines():
        if "convolution(" in line and "dim_labels=" in line:
            labels = line.split("dim_labels=")[1].split(",")[0]
            kinds.add("swapped" if not labels.startswith("b") else "conv")
    if "__ynn_fusion" in text:
        kinds.discard("conv")
        kinds.add("ynn")
    if not kinds:
        kinds.add("dot" if " dot(" in text or "dot_general" in text else "other")
    return "+".join(sorted(kinds))


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4, 7, 14])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--grad", action="store_true", help="time d/d(x, k) of sum(conv ** 2) instead")
    args = parser.parse_args()

    print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}, "
          f"backend {jax.default_backend()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    variants = {"conv_general_dilated": xla_conv, "im2col+dot": im2col_conv}
    if project_conv2d is not None:
        variants["saliency_jax conv2d"] = routed_conv
    mode = "grad wrt x and kernel" if args.grad else "forward"
    print(f"{mode}: {args.kernel}x{args.kernel} conv, padding 1, {args.channels} -> {args.channels} channels, "
          f"batch {args.batch}; median ms (GFLOP/s, max rel. diff vs conv_general_dilated) [XLA path]")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, args.channels)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(args.kernel, args.kernel, args.channels, args.channels))
                        / np.sqrt(args.kernel**2 * args.channels), jnp.float32)
        out_size = size + 3 - args.kernel
        flops = 2.0 * args.batch * out_size**2 * args.kernel**2 * args.channels**2 * (3 if args.grad else 1)
        cells, reference = [], None
        for name, op in variants.items():
            if args.grad:
                fn = jax.jit(jax.grad(lambda x, k, op=op: jnp.sum(op(x, k) ** 2), argnums=(0, 1)))
            else:
                fn = jax.jit(op)
            out = jax.tree_util.tree_leaves(fn(x, k))
            if reference is None:
                reference = out
            diff = max(float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r))) for a, r in zip(out, reference))
            seconds = median_seconds(fn, (x, k), args.repeats)
            cells.append(f"{name} {seconds * 1e3:8.2f} ms ({flops / seconds / 1e9:6.1f}, {diff:.0e}) "
                         f"[{compiled_path(fn, x, k)}]")
        print(f"{size:>3}x{size:<3} " + " | ".join(cells), flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
