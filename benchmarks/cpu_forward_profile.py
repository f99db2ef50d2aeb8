r"""Where the CPU forward time goes: XLA's per-operation profile of our model next to PyTorch's.

Ours: ``jax.profiler`` trace of ``--repeats`` jitted forward passes (after a compile call), read back with
``jax._src.lib._profile_data`` (no TensorBoard needed). Every executed HLO thunk is attributed to a category
using the optimised HLO: convolutions (grouped by kernel size, stride, input map and channels, with the achieved
GFLOP/s), matrix products, elementwise fusions (batch norm in inference mode, ReLU, residual sums, bias - XLA:CPU
runs them as separate passes: they are not fused into the YNNPACK convolution), pooling, other.

PyTorch (``--peer-python``, the environment of ``benchmarks/peer_benchmark.py``): ``torch.profiler`` self CPU
time per ``aten::`` operator of the same torchvision model under ``torch.no_grad``, convolutions grouped the same
way. Same batch, image size and random weights as the peer benchmark (only the timings matter here).

Usage::

  JAX_PLATFORMS=cpu nice -n 5 python benchmarks/cpu_forward_profile.py --model resnet50 --batch 8 --repeats 3 \
      [--peer-python .venv-peers/bin/python]

Milliseconds are per forward pass (total over the repeats / repeats). The two sides run one after the other, not
interleaved: compare the shares within each column, and read absolute ratios with the load printed beside them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _conv_key(kernel_hw, stride, in_hw, c_in, c_out) -> str:
    return f"conv {kernel_hw[0]}x{kernel_hw[1]}/{stride} on {in_hw[0]}x{in_hw[1]}x{c_in} -> {c_out}"


def profile_jax(model_name: str, batch: int, size: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax._src.lib import _profile_data

    from saliency_jax import models

    module = models.get_model(model_name, 1000)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(0), images)
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
    hlo = forward.lower(variables, images).compile().as_text()
    jax.block_until_ready(forward(variables, images))

    # Fused computations and the category of each top-level instruction (thunk) of the entry computation.
    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if header and line.rstrip().endswith("{"):
            current = header.group(1)
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    category, flops = {}, {}
    for lines in computations.values():
        for line in lines:
            m = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
            if not m:
                continue
            name, opcode = m.group(1), m.group(3)
            called = re.search(r"calls=%([\w.\-]+)", line)
            body = "\n".join(computations.get(called.group(1), [])) if called else line
            convs = list(re.finditer(r"= f32\[(\d+),(\d+),(\d+),(\d+)\]\S* convolution\(%([\w.\-]+), "
                                     r"%[\w.\-]+\), window=\{size=(\d+)x(\d+)(?: stride=(\d+)x\d+)?[^}]*\}, "
                                     r"dim_labels=b01f_01io->b01f", body))
            if convs:
                keys, total = [], 0.0
                for conv in convs:
                    b, oh, ow, co = (int(conv.group(i)) for i in range(1, 5))
                    kh, kw, stride = int(conv.group(6)), int(conv.group(7)), int(conv.group(8) or 1)
                    shape = re.search(rf"%{re.escape(conv.group(5))} = f32\[(\d+),(\d+),(\d+),(\d+)\]", hlo)
                    ih, iw, ci = int(shape.group(2)), int(shape.group(3)), int(shape.group(4))
                    keys.append(_conv_key((kh, kw), stride, (ih, iw), ci, co))
                    total += 2.0 * b * oh * ow * co * kh * kw * ci
                category[name] = keys[0] if len(keys) == 1 else (
                    f"one YNN fusion: {len(keys)} convs + BN/ReLU on {ih}x{iw} maps")
                flops[name] = total
            elif "convolution(" in body:
                category[name] = "conv (other layout: swapped operands / naive loop)"
            elif " dot(" in body:
                category[name] = "matrix product (dense, im2col conv)"
            elif "reduce-window(" in body:
                category[name] = "max pooling (reduce-window)"
            elif " reduce(" in body:
                category[name] = "reduction (global average pool)"
            elif opcode == "fusion" or re.search(r" (add|multiply|maximum|subtract|divide|rsqrt)\(", body):
                category[name] = "elementwise (batch norm, ReLU, residual add, bias)"
            elif opcode in ("copy", "transpose", "bitcast", "reshape"):
                category[name] = "layout (copy/transpose)"
    trace_dir = tempfile.mkdtemp(prefix="jax_profile_")
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(forward(variables, images))
    wall = (time.perf_counter() - t0) / repeats
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    totals, seen_flops = collections.Counter(), collections.Counter()
    for plane in _profile_data.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in category:
                    totals[category[event.name]] += event.duration_ns / 1e6 / repeats
                    seen_flops[category[event.name]] += flops.get(event.name, 0.0) / repeats
    return {"wall_ms": wall * 1e3, "ms": dict(totals), "flops": dict(seen_flops)}


def profile_torch(model_name: str, batch: int, size: int, repeats: int) -> dict:
    import torch
    import torchvision
    from torch.profiler import ProfilerActivity, profile

    net = getattr(torchvision.models, model_name)(weights=None).eval()
    x = torch.from_numpy(np.random.default_rng(0).uniform(size=(batch, 3, size, size)).astype(np.float32))
    convs = {}

    def remember(mod, inp, out):  # conv strides, which the profiler's input shapes do not show
        convs[tuple(inp[0].shape) + tuple(mod.weight.shape)] = (mod.kernel_size, mod.stride[0])

    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(remember)
    with torch.no_grad():
        net(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            for _ in range(repeats):
                net(x)
            wall = (time.perf_counter() - t0) / repeats
    totals, seen_flops = collections.Counter(), collections.Counter()
    conv_ops = ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d",
                "aten::_nnpack_spatial_convolution", "aten::thnn_conv2d", "aten::_slow_conv2d_forward")
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1e3 / repeats
        if ms <= 0:
            continue
        name = event.key
        shapes = event.input_shapes or []
        if name in conv_ops and len(shapes) >= 2 and len(shapes[0]) == 4 and len(shapes[1]) == 4:
            n, ci, ih, iw = shapes[0]
            co, _, kh, kw = shapes[1]
            (kernel, stride) = convs.get(tuple(shapes[0]) + tuple(shapes[1]), ((kh, kw), 1))
            key = _conv_key((kh, kw), stride, (ih, iw), ci, co)
            oh, ow = (ih + 2 * (kh // 2) - kh) // stride + 1, (iw + 2 * (kw // 2) - kw) // stride + 1
            seen_flops[key] += 2.0 * n * oh * ow * co * kh * kw * ci * event.count / repeats
        elif name in ("aten::addmm", "aten::linear", "aten::mm"):
            key = "matrix product (dense, im2col conv)"
        elif "pool" in name and "max" in name:
            key = "max pooling (reduce-window)"
        elif "pool" in name or name in ("aten::mean", "aten::sum"):
            key = "reduction (global average pool)"
        elif any(s in name for s in ("batch_norm", "relu", "add", "mul", "threshold", "clamp")):
            key = "elementwise (batch norm, ReLU, residual add, bias)"
        else:
            key = "other (allocation, views, copies)"
        totals[key] += ms
    return {"wall_ms": wall * 1e3, "ms": dict(totals), "flops": dict(seen_flops),
            "info": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet18", "resnet50", "vgg16"), default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-python", default=None, help="interpreter with torch/torchvision (optional)")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        print(json.dumps(profile_torch(args.model, args.batch, args.size, args.repeats)))
        return

    print(f"{args.model}, batch {args.batch}, {args.size} px; load before %.2f" % os.getloadavg()[0], flush=True)
    ours = profile_jax(args.model, args.batch, args.size, args.repeats)
    print("ours done, load %.2f" % os.getloadavg()[0], flush=True)
    theirs = None
    if args.peer_python:
        out = subprocess.run([args.peer_python, os.path.abspath(__file__), "--torch-worker", "--model", args.model,
                              "--batch", str(args.batch), "--size", str(args.size), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        theirs = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"torch done ({theirs['info']}), load %.2f" % os.getloadavg()[0])
    keys = sorted(set(ours["ms"]) | set(theirs["ms"] if theirs else ()),
                  key=lambda k: -(ours["ms"].get(k, 0) + (theirs["ms"].get(k, 0) if theirs else 0)))

    def cell(side, key):
        if side is None or key not in side["ms"]:
            return f"{'':>9}{'':>8}"
        ms, fl = side["ms"][key], side["flops"].get(key, 0.0)
        rate = f"{fl / ms / 1e6:8.0f}" if fl else f"{'':>8}"
        return f"{ms:9.1f}{rate}"

    print(f"\n{'ms per forward pass':<58}{'ours ms':>9}{'GFLOP/s':>8}{'torch ms':>9}{'GFLOP/s':>8}")
    for key in keys:
        print(f"{key[:57]:<58}{cell(ours, key)}{cell(theirs, key)}")
    for label, prefix in (("all convolutions (rows 'conv ...' and 'one YNN fusion')", ("conv", "one YNN")),):
        sums = [sum(v for k, v in side["ms"].items() if k.startswith(prefix)) if side else None
                for side in (ours, theirs)]
        fl = [sum(v for k, v in side["flops"].items() if k.startswith(prefix)) if side else None
              for side in (ours, theirs)]
        print(f"{label:<58}" + "".join(f"{s:9.1f}{f / s / 1e6:8.0f}" for s, f in zip(sums, fl) if s))
    print(f"{'sum of attributed operations':<58}{sum(ours['ms'].values()):9.1f}{'':>8}"
          + (f"{sum(theirs['ms'].values()):9.1f}" if theirs else ""))
    print(f"{'wall time per forward (profiler on)':<58}{ours['wall_ms']:9.1f}{'':>8}"
          + (f"{theirs['wall_ms']:9.1f}" if theirs else ""))


if __name__ == "__main__":
    main()
