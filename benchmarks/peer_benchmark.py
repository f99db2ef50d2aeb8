r"""Our saliency transforms vs TorchRay, Captum and pytorch-grad-cam on the same model, weights and input.

One run measures, on the same random weights (ours, exported to torchvision names with
:func:`saliency_jax.models.weights.export_state_dict`), the same images and the same target classes:

=================  ==========================================================================================
method             ours / peers
=================  ==========================================================================================
``forward``        ``model.apply`` (jitted) / torchvision model under ``torch.no_grad``
``gradient``       :func:`~saliency_jax.saliency.vanilla_gradient` (sum over channels of |d logit / d image|)
                   / plain ``torch.autograd`` and Captum ``Saliency(abs=True)`` (summed over channels)
``gradcam``        :func:`~saliency_jax.saliency.grad_cam` at the last conv block (raw map at the layer's
                   resolution) / TorchRay ``grad_cam``, Captum ``LayerGradCam``, pytorch-grad-cam ``GradCAM``
                   (which also min-max normalises and resizes to the image: its only output)
``eb``             :func:`~saliency_jax.saliency.excitation_backprop` / TorchRay ``excitation_backprop``
``ceb``            :func:`~saliency_jax.saliency.contrastive_excitation_backprop` / TorchRay
                   ``contrastive_excitation_backprop``
``gradient_top5``  the maps of each example's 5 most likely classes ([batch, 5, h, w]): ours one call with
``gradcam_top5``   ``targets=top_k(5)`` (one forward, one backward ``vmap``-ed over the 5 cotangents,
``eb_top5``        :mod:`saliency_jax.saliency.target_sets`) / the peer's method called 5 times, once per class
                   column (the classes of our forward, stored with the inputs), as its users do
=================  ==========================================================================================

Layers: ResNet-18/50 Grad-CAM ``layer4``, EB/cEB ``layer3`` (TorchRay: ``update_resnet`` so the residual sums get
the EB rule, as ours; cEB contrast at ``avgpool``); VGG16 Grad-CAM ``relu5_3`` (``features.29``), EB/cEB ``pool4``
(``features.23``; cEB contrast at ``features.30``). The images are in [0, 1]; the torch models get a
normalisation module in front, so every method differentiates the same function of the same input.

Phases:

1. **fresh processes**, one per (library, method): set-up, then one call. Prints the first-call seconds (for JAX
   tracing + compilation + run; for PyTorch the first call's lazy initialisation + run), the resident memory
   after set-up and the process's peak resident memory (``VmHWM``), and saves the map. The maps of each peer are
   compared with ours: max |difference| after dividing every map by its own max |value| (pytorch-grad-cam: its
   output vs its own ``scale_cam_image`` applied to our raw map).
2. **interleaved rounds** in two (or more) persistent worker processes that stay warm: each round calls every
   (library, method) once, in an order rotated every round; only one process computes at a time. Prints the
   median seconds, and peer / ours ratios from the same rounds (> 1: ours faster).

``--variant=NAME:PATCHES_MAX:XLA_FLAGS`` adds a JAX worker with another convolution lowering threshold
(:data:`saliency_jax.models.conv.PATCHES_MAX_INPUT_PIXELS`, 0 = always ``conv_general_dilated``) and/or other
XLA flags (e.g. ``--xla_cpu_use_onednn=true``); its rows are labelled ``ours[NAME]`` and its maps are checked
against the default's. This is how the CPU options of issue 15 part 3 were compared.

Install the PyTorch side into a separate virtual environment (never into the JAX one), e.g.::

  python3.11 -m venv .venv-peers
  .venv-peers/bin/pip install torch==2.14.1 torchvision==0.29.1 captum grad-cam torchray
  # (the same list as pyproject's optional extra "peers"; the torch worker does not import saliency_jax)

Usage (JAX venv; ``--peer-python`` is the interpreter of that environment)::

  JAX_PLATFORMS=cpu nice -n 5 python benchmarks/peer_benchmark.py --model resnet50 --batch 8 --rounds 7 \
      [--methods forward gradcam ...] [--libraries ours torch torchray captum pytorch-grad-cam] \
      [--peer-python .venv-peers/bin/python] [--variant=lax:0:] [--skip-fresh]

State the machine load with every figure: the script prints ``os.getloadavg()`` before and after each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

TOP = 5  # the top-k rows: k
METHODS = ("forward", "gradient", "gradcam", "eb", "ceb", "gradient_top5", "gradcam_top5", "eb_top5")
LIBRARIES = ("ours", "torch", "torchray", "captum", "pytorch-grad-cam")
PEER_METHODS = {  # library -> methods it offers
    "torch": ("forward", "gradient", "gradient_top5"),
    "torchray": ("gradcam", "eb", "ceb", "gradcam_top5", "eb_top5"),
    "captum": ("gradient", "gradcam", "gradient_top5", "gradcam_top5"),
    "pytorch-grad-cam": ("gradcam", "gradcam_top5"),
}
MODELS = ("resnet18", "resnet50", "vgg16")
# (Grad-CAM layer, EB layer) in our paths.
OUR_LAYERS = {"resnet18": ("layer4", "layer3"), "resnet50": ("layer4", "layer3"), "vgg16": ("relu5_3", "pool4")}
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------------------------------
# Process memory (Linux /proc).


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    try:  # Linux >= 4.0: "5" resets the peak resident set size to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Workers: each builds its methods as argument-less callables returning a NumPy map.


def _jax_methods(model_name: str, data: str, methods, patches_max: int | None):
    import functools

    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from saliency_jax import models
    from saliency_jax.models import conv as conv_lib
    from saliency_jax.saliency import (contrastive_excitation_backprop, excitation_backprop, grad_cam, linen_layer,
                                       top_k, vanilla_gradient)
    from saliency_jax.saliency.layer_cams import grad_cam_map
    from saliency_jax.saliency.target_sets import excitation_signals, input_gradients, layer_gradients

    if patches_max is not None:
        conv_lib.PATCHES_MAX_INPUT_PIXELS = patches_max
    module = models.get_model(model_name, 1000)
    with np.load(os.path.join(data, "flax.npz")) as f:
        variables = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files})
    with np.load(os.path.join(data, "inputs.npz")) as f:
        images, targets = jnp.asarray(f["images"]), jnp.asarray(f["targets"])
    cam_layer, eb_layer = OUR_LAYERS[model_name]

    def logits_fn(v):
        return functools.partial(module.apply, v, train=False)

    def gradcam_top(v, x):  # raw Grad-CAM at the layer for each of the top-k classes: [batch, k, h, w]
        lg = layer_gradients(linen_layer(module, v, cam_layer, train=False), x, top_k(TOP))
        cam = jax.vmap(grad_cam_map, in_axes=(None, 1), out_axes=1)(lg.activations[0], lg.gradients[0])
        return jnp.maximum(cam, 0.0)

    fns = {
        "forward": lambda v, x, t: module.apply(v, x, train=False),
        "gradient": lambda v, x, t: vanilla_gradient(logits_fn(v), x, t, reduction="abs_sum"),
        "gradcam": lambda v, x, t: grad_cam(linen_layer(module, v, cam_layer, train=False), x, t, resize=False,
                                            normalize=False),
        "eb": lambda v, x, t: excitation_backprop(linen_layer(module, v, eb_layer, train=False), x, t).saliency,
        "ceb": lambda v, x, t: contrastive_excitation_backprop(linen_layer(module, v, eb_layer, train=False), x,
                                                               t).saliency,
        "gradient_top5": lambda v, x, t: jnp.sum(jnp.abs(input_gradients(logits_fn(v), x, top_k(TOP))[0]), -1),
        "gradcam_top5": lambda v, x, t: gradcam_top(v, x),
        "eb_top5": lambda v, x, t: jnp.sum(excitation_signals(linen_layer(module, v, eb_layer, train=False), x,
                                                              top_k(TOP))[0], -1),
    }
    out = {}
    for name in methods:
        jitted = jax.jit(fns[name])
        out[name] = functools.partial(lambda f: np.asarray(jax.block_until_ready(f(variables, images, targets))),
                                      jitted)
    return out


def _torch_model(model_name: str, data: str):
    import torch
    import torchvision

    net = getattr(torchvision.models, model_name)(weights=None)
    with np.load(os.path.join(data, "torch.npz")) as f:
        state = {k: torch.from_numpy(f[k]) for k in f.files}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    net.eval()

    class Normalize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    return torch.nn.Sequential(Normalize(), net).eval(), net


def _torch_layers(model_name: str, net):
    if model_name.startswith("resnet"):
        return net.layer4, net.layer3, net.avgpool, net.fc
    return net.features[29], net.features[23], net.features[30], net.classifier[6]


def _torch_methods(model_name: str, data: str, wanted):
    import functools

    import torch

    torch.set_grad_enabled(True)
    with np.load(os.path.join(data, "inputs.npz")) as f:
        x = torch.from_numpy(np.ascontiguousarray(np.transpose(f["images"], (0, 3, 1, 2))))
        targets = torch.from_numpy(f["targets"].astype(np.int64))
        top = torch.from_numpy(f["top"].astype(np.int64))  # our forward's top-k classes [batch, k]
    libraries = {lib for lib, _ in wanted}
    model, net = _torch_model(model_name, data)
    cam_layer, eb_layer, contrast_layer, classifier = _torch_layers(model_name, net)
    out = {}

    def numpy(t):
        return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)

    if "torch" in libraries:
        def forward(t):
            with torch.no_grad():
                return numpy(model(x))

        def gradient(t):
            xg = x.clone().requires_grad_(True)
            logits = model(xg)
            (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xg)
            return numpy(g.abs().sum(1))

        out[("torch", "forward")], out[("torch", "gradient")] = forward, gradient
    if "captum" in libraries:
        from captum.attr import LayerGradCam, Saliency

        out[("captum", "gradient")] = lambda t: numpy(
            Saliency(model).attribute(x.clone().requires_grad_(True), target=t, abs=True).sum(1))
        out[("captum", "gradcam")] = lambda t: numpy(
            LayerGradCam(model, cam_layer).attribute(x, target=t, relu_attributions=True)[:, 0])
    if "pytorch-grad-cam" in libraries:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def pgc(t):
            with GradCAM(model=model, target_layers=[cam_layer]) as cam:
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

        out[("pytorch-grad-cam", "gradcam")] = pgc
    if "torchray" in libraries:
        import copy

        from torchray.attribution.excitation_backprop import (contrastive_excitation_backprop,
                                                              excitation_backprop, update_resnet)
        from torchray.attribution.grad_cam import grad_cam

        tr_model, tr_net = copy.deepcopy(model), None
        tr_net = tr_model[1]
        if model_name.startswith("resnet"):
            update_resnet(tr_net)  # residual sums as EltwiseSum modules: TorchRay's EB rule for them
        tr_cam, tr_eb, tr_contrast, tr_classifier = _torch_layers(model_name, tr_net)
        out[("torchray", "gradcam")] = lambda t: numpy(grad_cam(tr_model, x, t, saliency_layer=tr_cam)[:, 0])
        out[("torchray", "eb")] = lambda t: numpy(excitation_backprop(tr_model, x, t, saliency_layer=tr_eb)[:, 0])
        out[("torchray", "ceb")] = lambda t: numpy(contrastive_excitation_backprop(
            tr_model, x, t, saliency_layer=tr_eb, contrast_layer=tr_contrast, classifier_layer=tr_classifier)[:, 0])
    for (lib, method), fn in list(out.items()):
        out[(lib, method)] = functools.partial(fn, targets)
        # the top-k rows: the peer's method once per class column, as its users compute k maps
        out[(lib, f"{method}_top{TOP}")] = functools.partial(
            lambda f: np.stack([f(top[:, j]) for j in range(top.shape[1])], axis=1), fn)
    return {k: v for k, v in out.items() if k in wanted}


def worker_main(args) -> None:
    """Answers JSON commands on stdin: first (time + memory + save), time, quit."""
    wanted = [tuple(item.split(":", 1)) for item in args.worker_methods]
    t0 = time.perf_counter()
    if args.worker == "jax":
        fns = {("ours", m): f for m, f in _jax_methods(args.model, args.data, [m for _, m in wanted],
                                                       args.patches_max).items()}
    else:
        import torch
        fns = _torch_methods(args.model, args.data, wanted)
        print(json.dumps({"info": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}), flush=True)
    print(json.dumps({"ready": time.perf_counter() - t0, "rss_mb": _status_mb("VmRSS")}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        key = (cmd["library"], cmd["method"])
        _reset_peak()
        rss = _status_mb("VmRSS")
        start = time.perf_counter()
        result = fns[key]()
        seconds = time.perf_counter() - start
        reply = {"seconds": seconds, "rss_mb": rss, "peak_mb": _status_mb("VmHWM")}
        if cmd.get("save"):
            np.save(cmd["save"], np.asarray(result, np.float32))
            if key[0] == "pytorch-grad-cam" and os.path.exists(cmd.get("ours_raw", "")):
                from pytorch_grad_cam.utils.image import scale_cam_image
                ours = np.load(cmd["ours_raw"])
                flat = ours.reshape((-1, *ours.shape[-2:]))  # [batch(, k), h, w] -> [n, h, w]
                # pytorch-grad-cam's post-processing: per layer min-max + resize, then over layers max(., 0),
                # mean and min-max again (BaseCAM.forward / aggregate_multi_layers)
                per_layer = scale_cam_image(np.maximum(flat, 0), (result.shape[-1], result.shape[-2]))
                scaled = scale_cam_image(np.maximum(per_layer, 0))
                np.save(cmd["save"].replace(".npy", "_ours_scaled.npy"),
                        scaled.reshape((*ours.shape[:-2], *scaled.shape[-2:])))
        print(json.dumps(reply), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Parent.


class Worker:
    """A worker process speaking one JSON line per command."""

    def __init__(self, label, python, argv, env, cpus=None):
        self.label = label
        pin = ["taskset", "-c", ",".join(str(c) for c in cpus)] if cpus else []  # no fork hooks under JAX
        self.proc = subprocess.Popen(pin + [python, os.path.abspath(__file__)] + argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True, cwd=REPO)
        self.info = None
        while True:
            reply = self._read()
            if "info" in reply:
                self.info = reply["info"]
            if "ready" in reply:
                self.ready = reply
                break

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def call(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait()


def make_data(model_name: str, batch: int, size: int, data: str, seed: int = 0) -> None:
    """Random variables (He-normal kernels, BN statistics near identity), exported to both layouts, and inputs."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from saliency_jax import models
    from saliency_jax.models.weights import export_state_dict

    rng = np.random.default_rng(seed)
    module = models.get_model(model_name, 1000)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    flat = traverse_util.flatten_dict(shapes)
    values = {}
    for key, leaf in flat.items():
        name = key[-1]
        if name == "kernel":
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name in ("var", "scale"):
            value = rng.uniform(0.8, 1.2, size=leaf.shape)
        else:  # biases, BN means
            value = 0.05 * rng.normal(size=leaf.shape)
        values[key] = value.astype(np.float32)
    np.savez(os.path.join(data, "flax.npz"), **{"/".join(k): v for k, v in values.items()})
    np.savez(os.path.join(data, "torch.npz"), **export_state_dict(model_name, traverse_util.unflatten_dict(values)))
    images = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    logits = np.asarray(module.apply(traverse_util.unflatten_dict(values), images, train=False))
    top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP].astype(np.int32)  # ties to the lower index, as top_k
    np.savez(os.path.join(data, "inputs.npz"), images=images, targets=rng.integers(0, 1000, size=batch).astype(
        np.int32), top=top)


def _agreement(ours: np.ndarray, peer: np.ndarray) -> str:
    """Max |difference| after dividing each map by its own max |value| (per example; per example and class for the
    top-k maps), over the maps where both are finite; maps with a NaN/inf are counted and named instead."""
    if ours.shape != peer.shape:
        return f"shapes differ: {ours.shape} vs {peer.shape}"
    rows = (-1, ours.shape[-2] * ours.shape[-1]) if ours.ndim == 4 else (ours.shape[0], -1)  # a top-k map each
    ours = ours.reshape(rows).astype(np.float64)
    peer = peer.reshape(rows).astype(np.float64)
    finite = np.isfinite(ours).all(axis=1) & np.isfinite(peer).all(axis=1)
    note = "" if finite.all() else (f" (non-finite values in example(s) {np.flatnonzero(~finite).tolist()}: ours "
                                    f"{int((~np.isfinite(ours)).sum())}, peer {int((~np.isfinite(peer)).sum())})")
    if not finite.any():
        return "no finite map" + note

    def unit(m):
        return m / np.maximum(np.abs(m).max(axis=1, keepdims=True), 1e-30)

    return f"{np.abs(unit(ours[finite]) - unit(peer[finite])).max():.1e}" + note


def _load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7, help="phase 2 rounds (0: phase 1 only)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--peer-python", default=os.path.join(REPO, ".venv-peers", "bin", "python"))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:PATCHES_MAX:XLA_FLAGS",
                        help="extra JAX worker (write --variant=...): name, conv lowering threshold (-1: the "
                             "default), XLA_FLAGS")
    parser.add_argument("--cpus", type=int, nargs="+", default=None,
                        help="pin every worker to these CPU ids (XLA's and torch's thread pools then use that many "
                             "threads; e.g. --cpus 0 compares single-core speed, robust to thread contention)")
    parser.add_argument("--skip-fresh", action="store_true", help="skip phase 1 (first calls, memory, agreement)")
    parser.add_argument("--keep", default=None, help="directory to keep weights, inputs and maps in")
    # worker mode (internal)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-methods", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--patches-max", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    data = args.keep or tempfile.mkdtemp(prefix="peer_benchmark_")
    os.makedirs(data, exist_ok=True)
    try:
        run(args, data)
    finally:
        if not args.keep:  # weights, inputs and maps: up to ~1 GB for VGG16
            shutil.rmtree(data, ignore_errors=True)


def run(args, data: str) -> None:
    make_data(args.model, args.batch, args.size, data)
    jax_variants = [("ours", None, os.environ.get("XLA_FLAGS", ""))]
    for spec in args.variant:
        name, patches, flags = spec.split(":", 2)
        jax_variants.append((f"ours[{name}]", None if int(patches) < 0 else int(patches), flags))
    jobs = []  # (label, worker kind, library, method, patches, flags)
    for label, patches, flags in jax_variants:
        if "ours" in args.libraries:
            jobs += [(label, "jax", "ours", m, patches, flags) for m in args.methods]
    for lib, offered in PEER_METHODS.items():
        if lib in args.libraries:
            jobs += [(lib, "torch", lib, m, None, "") for m in offered if m in args.methods]

    def spawn(kind, items, patches=None, flags=""):
        env = dict(os.environ)
        env["XLA_FLAGS"] = flags
        env.setdefault("PYTHONPATH", REPO)
        python = sys.executable if kind == "jax" else args.peer_python
        argv = ["--worker", kind, "--model", args.model, "--data", data, "--worker-methods",
                *[f"{lib}:{m}" for lib, m in items]]
        if patches is not None:
            argv += ["--patches-max", str(patches)]
        return Worker(kind, python, argv, env, args.cpus)

    import jax
    print(f"{args.model}, batch {args.batch}, {args.size} px, random weights; jax {jax.__version__}; "
          f"{os.cpu_count()} CPUs{f', workers pinned to CPUs {args.cpus}' if args.cpus else ''}; data in {data}")

    if not args.skip_fresh:
        print(f"\n== phase 1: one fresh process per (library, method) [{_load()}]")
        print(f"{'library':<22}{'method':<14}{'first call s':>13}{'RSS set-up MB':>15}{'peak RSS MB':>13}"
              f"{'  max |diff| vs ours (normalised)'}")
        saved = {}
        for label, kind, lib, method, patches, flags in jobs:
            worker = spawn(kind, [(lib, method)], patches, flags)
            path = os.path.join(data, f"{label}_{method}.npy".replace("[", "_").replace("]", ""))
            reply = worker.call(cmd="first", library=lib, method=method, save=path,
                                ours_raw=saved.get(("ours", method), ""))
            worker.close()
            saved[(label, method)] = path
            diff = ""
            if (label, method) != ("ours", method) and ("ours", method) in saved:
                ours = np.load(saved[("ours", method)])
                peer = np.load(path)
                if lib == "pytorch-grad-cam":
                    ours = np.load(path.replace(".npy", "_ours_scaled.npy"))
                diff = _agreement(ours, peer)
            info = f"  ({worker.info})" if worker.info else ""
            print(f"{label:<22}{method:<14}{reply['seconds']:>13.2f}{worker.ready['rss_mb']:>15.0f}"
                  f"{reply['peak_mb']:>13.0f}  {diff}{info}", flush=True)
        print(f"[{_load()}]")

    if args.rounds < 1:
        return
    print(f"\n== phase 2: {args.rounds} interleaved rounds, persistent warm workers [{_load()}]")
    groups = {}
    for label, kind, lib, method, patches, flags in jobs:
        groups.setdefault((label if kind == "jax" else "torch", kind, patches, flags), []).append((label, lib,
                                                                                                  method))
    workers = {}
    for (glabel, kind, patches, flags), items in groups.items():
        workers[glabel] = spawn(kind, [(lib, m) for _, lib, m in items], patches, flags)
        for _, lib, m in items:  # warm up: first call (compile) and one more
            workers[glabel].call(cmd="time", library=lib, method=m)
            workers[glabel].call(cmd="time", library=lib, method=m)
    order = [(glabel, label, lib, m) for (glabel, *_), items in groups.items() for label, lib, m in items]
    times = {(label, m): [] for _, label, _, m in order}
    for r in range(args.rounds):
        shift = r % len(order)
        for glabel, label, lib, m in order[shift:] + order[:shift]:
            times[(label, m)].append(workers[glabel].call(cmd="time", library=lib, method=m)["seconds"])
    for w in workers.values():
        w.close()
    print(f"[{_load()}]")
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'method':<14}{'library':<22}{'median s':>10}{'min s':>9}{'max s':>9}{'  vs ours: peer/ours'}")
    for method in args.methods:
        base = medians.get(("ours", method))
        for (label, m), value in medians.items():
            if m != method:
                continue
            ratio = f"{value / base:6.2f}x" if base and label != "ours" else ""
            print(f"{m:<14}{label:<22}{value:>10.3f}{min(times[(label, m)]):>9.3f}{max(times[(label, m)]):>9.3f}"
                  f"  {ratio}")
    # per-round ratios (same round), for the spread of the ratio itself
    print("\nper-round ratio peer/ours, median [min, max] over rounds:")
    for (label, m), values in times.items():
        if label == "ours" or ("ours", m) not in times:
            continue
        ratios = [v / o for v, o in zip(values, times[("ours", m)])]
        print(f"  {m:<14}{label:<22}{statistics.median(ratios):6.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]")


if __name__ == "__main__":
    main()
