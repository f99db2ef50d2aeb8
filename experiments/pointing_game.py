r"""Runs the pointing game (Zhang et al. 2016) on PASCAL VOC 2007 test and writes the accuracy table.

For every model of ``config.models`` and every method of ``config.methods`` (``center``, ``grad_cam``,
``excitation_backprop``, ``contrastive_excitation_backprop``), every test image and every class present on it: the
class's saliency map is computed at the configured layer of the network fed the image resized to
``config.input_size`` (shorter side), resized bilinearly to the original image and scored with
:func:`saliency_jax.evaluation.pointing_game.pointing_hits`;
:class:`~saliency_jax.evaluation.pointing_game.PointingGame` accumulates the per-class hits on all pairs and on the
difficult subset.

Usage (see the config's docstring for the reference setting and the expected numbers)::

  python experiments/pointing_game.py --config experiments/configs/pointing_game_voc07.py \
      --config.data_dir=/data/VOCdevkit/VOC2007 --workdir runs/pointing_voc07

Writes ``workdir/pointing_game.json`` (per model and method: accuracies, per-class accuracies and counts) and
``workdir/pointing_game.md`` (the table: rows methods, columns all / difficult per model).

The classes present on an image are explained in batches of ``config.class_batch`` (the image repeated once per
class; the last batch padded), so each network compiles once per distinct input shape; resizing the maps to the
image and the hit test compile once per image size (cheap). A persistent compilation cache
(``jax.config.update("jax_compilation_cache_dir", ...)``) makes reruns start fast.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saliency_jax.evaluation.pointing_game import (
    PointingGame,
    hits_at_points,
    load_difficult_flags,
    pointing_game_table,
    pointing_hits,
)
from saliency_jax.saliency import grad_cam, linen_layer, resize_maps

__all__ = [
    "METHODS",
    "build_model",
    "input_shape",
    "main",
    "make_saliency_fn",
    "random_variables",
    "run_pointing_game",
]

#: Methods the runner knows, in table order.
METHODS = ("center", "grad_cam", "excitation_backprop", "contrastive_excitation_backprop")

#: The classifier's input layer of each architecture: where contrastive EB subtracts the dual pass.
CLASSIFIER_INPUT = {"vgg16": "relu7", "resnet50": "avgpool"}


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, *, seed: int = 0,
                allow_random_init: bool = False):
    """Builds a VGG16 / ResNet-50 and loads its weights.

    Args:
      model_config: ``arch`` ("vgg16" or "resnet50"), ``weights`` (local torchvision-named ``.safetensors`` /
        ``.npz`` with a ``num_classes`` head; "" for a random init), ``kwargs`` (constructor overrides).
      num_classes: classifier outputs (20 for VOC).
      seed: PRNG seed of the initialisation.
      allow_random_init: permit ``weights == ""`` (tests only: a random model from :func:`random_variables`,
        which points at random places).

    Returns:
      ``(module, variables)``.

    Raises:
      ValueError: on an unknown arch, or missing weights without ``allow_random_init``.
      FileNotFoundError: if the weights file does not exist.
    """
    arch = model_config.arch
    kwargs = dict(model_config.get("kwargs", {}) or {})
    if arch == "vgg16":
        from saliency_jax.models.vgg import VGG16
        module = VGG16(num_classes=num_classes, **kwargs)
    elif arch == "resnet50":
        from saliency_jax.models.resnet import ResNet50
        module = ResNet50(num_classes=num_classes, **kwargs)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'vgg16' or 'resnet50'")
    weights = model_config.get("weights", "")
    if not weights and not allow_random_init:
        raise ValueError(f"no weights for model {arch!r}: set config.models.<name>.weights to a local "
                         "torchvision-named .safetensors/.npz file with a VOC head (random weights give meaningless "
                         "pointing accuracy)")
    if weights and not os.path.isfile(weights):  # fail before the (slow) initialisation
        raise FileNotFoundError(f"weights file not found: {weights!r}")
    if not weights:
        return module, random_variables(module, seed)
    # Parameter shapes do not depend on the input size (VGG's adaptive pool, ResNet's global pool).
    variables = jax.jit(lambda key: module.init(key, jnp.zeros((1, 64, 64, 3), jnp.float32)))(jax.random.key(seed))
    from saliency_jax.models.weights import load_pretrained
    return module, load_pretrained(arch, weights, variables)


def random_variables(module, seed: int = 0) -> Any:
    """Random variables for a model without compiling its ``init`` (tests: a tiny random model).

    Shapes come from ``jax.eval_shape(module.init)``; conv / dense kernels are drawn He-normal
    (``N(0, 2 / fan_in)``), biases are zero, BatchNorm scales and running variances one, running means zero.

    Returns:
      The variables pytree, float32 NumPy leaves.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def input_shape(height: int, width: int, input_size: int) -> tuple[int, int]:
    """Network input size for an image: shorter side ``input_size``, aspect kept (TorchRay's ``get_transform``).

    ``int`` truncation of the longer side, as TorchRay. ``input_size == 0`` keeps the original size.

    Returns:
      ``(input_height, input_width)`` in pixels.
    """
    if not input_size:
        return height, width
    if width < height:
        return int(input_size * height / width), input_size
    return input_size, int(input_size * width / height)


def _saliency_fn(method: str) -> Callable:
    """The map function of a method: ``(layer_model, images, targets) -> maps [batch, h, w]`` at the layer."""
    if method == "grad_cam":
        return lambda model, images, targets: grad_cam(model, images, targets, resize=False, normalize=False)
    if method in ("excitation_backprop", "contrastive_excitation_backprop"):
        try:  # imported lazily: the Excitation Backprop module is optional for the other methods
            fn = getattr(importlib.import_module("saliency_jax.saliency.excitation_backprop"), method)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"method {method!r} needs saliency_jax.saliency.excitation_backprop.{method}") from e
        return lambda model, images, targets: fn(model, images, targets, resize=False, normalize=False).saliency
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def make_saliency_fn(module, method: str, layer: str) -> Callable:
    """A jitted function computing one method's maps at the layer's resolution.

    Args:
      module: the linen model (``apply(variables, images, train=False) -> logits``).
      method: ``grad_cam``, ``excitation_backprop`` or ``contrastive_excitation_backprop``.
      layer: module path of the saliency layer.

    Returns:
      ``fn(variables, images, targets) -> maps``: ``images`` float32 [batch, h, w, 3] in [0, 1] (network input),
      ``targets`` int32 [batch]; ``maps`` float32 [batch, h_layer, w_layer] (Grad-CAM after its ReLU, EB the
      channel sum, cEB the channel sum clamped at 0; not normalised: only the argmax matters). Compiled once per
      input shape.
    """
    saliency = _saliency_fn(method)
    return jax.jit(lambda variables, images, targets: saliency(
        linen_layer(module, variables, layer, train=False), images, targets))


@functools.partial(jax.jit, static_argnums=1)
def _resize_image(image, input_hw):
    """[H, W, 3] -> [1, *input_hw, 3], bilinear, half-pixel centres, no antialiasing (TorchRay's F.interpolate)."""
    image = image[None].astype(jnp.float32)
    if tuple(input_hw) == tuple(image.shape[1:3]):
        return image
    return jax.image.resize(image, (1, *input_hw, 3), method="bilinear", antialias=False)


@functools.partial(jax.jit, static_argnums=2)
def _score(maps, masks, tolerance):
    """Maps resized to the masks (original image) and their pointing hits; also which maps are finite."""
    maps = resize_maps(maps, tuple(masks.shape[1:]))
    return pointing_hits(maps, masks, tolerance), jnp.all(jnp.isfinite(maps), axis=(1, 2))


def _names(value: Any) -> tuple[str, ...]:
    """A tuple of names from a tuple/list of names or a comma-separated string (``--config.methods=a,b``)."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


def _load_data(config: ml_collections.ConfigDict):
    if config.dataset == "voc07":
        from saliency_jax.data.voc import load_voc
        return load_voc(config.data_dir, config.split, limit=config.limit or None)
    if config.dataset == "coco14":
        from saliency_jax.data.coco import load_coco
        return load_coco(config.data_dir, config.split, limit=config.limit or None)
    raise ValueError(f"unknown dataset {config.dataset!r}; expected 'voc07' or 'coco14'")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def run_pointing_game(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
                      progress: bool = True) -> dict[str, Any]:
    """Runs every (model, method) of the config over the dataset.

    Args:
      config: a pointing-game config (``experiments/configs/pointing_game_voc07.py``).
      workdir: if given, ``pointing_game.json`` and ``pointing_game.md`` are written there.
      progress: print a progress line every 10% of the images.

    Returns:
      ``{"results": {model: {method: PointingGame.results()}}, "table": markdown str, "images": int,
      "seconds": float}``.

    Raises:
      ValueError: unknown method/dataset/arch, a cEB contrast layer other than the classifier's input, missing
        weights, a non-finite saliency map (naming image, model and method), or a flag table missing an image.
      FileNotFoundError: missing data, flag file or weights.
    """
    methods = _names(config.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    if not methods:
        raise ValueError("config.methods is empty: nothing to run")
    start = time.time()
    data = _load_data(config)
    difficult = load_difficult_flags(config.difficult_flags, data.num_classes) if config.difficult_flags else None
    tolerance = float(config.tolerance)

    model_names = _names(config.model_names)
    unknown = [n for n in model_names if n not in config.models]
    if unknown or not model_names:
        raise ValueError(f"config.model_names {model_names} must name entries of config.models "
                         f"{sorted(config.models)}")
    batch = int(config.class_batch)
    if batch < 1:
        raise ValueError(f"config.class_batch must be >= 1; got {batch}")

    models, saliency_fns, games = {}, {}, {}
    for name in model_names:
        model_config = config.models[name]
        layers = model_config.layers
        if "contrastive_excitation_backprop" in methods:
            expected = CLASSIFIER_INPUT.get(model_config.arch)
            if layers.get("contrast") != expected:
                raise ValueError(f"model {name!r}: contrastive EB contrasts at the classifier's input ({expected!r} "
                                 f"for {model_config.arch}); config asks for {layers.get('contrast')!r}")
        if any(m != "center" for m in methods):
            models[name] = build_model(model_config, data.num_classes, seed=config.seed,
                                       allow_random_init=config.allow_random_init)
        for method in methods:
            games[name, method] = PointingGame(data.num_classes, class_names=data.class_names, difficult=difficult)
            if method != "center":
                saliency_fns[name, method] = make_saliency_fn(models[name][0], method, layers[method])

    report_every = max(len(data) // 10, 1)
    for index in range(len(data)):
        item = data[index]
        class_ids = np.asarray(item["class_ids"], np.int32)
        if class_ids.size == 0:
            continue
        k = class_ids.size
        masks = item["class_masks"][class_ids]  # [k, H, W]
        height, width = masks.shape[1:]
        image_ids = [item["image_id"]] * k
        if "center" in methods:  # TorchRay's baseline: the point (width / 2, height / 2); model-independent.
            points = np.tile(np.array([[height / 2, width / 2]], np.float32), (k, 1))
            center = np.asarray(hits_at_points(points, masks, tolerance))
            for name in model_names:
                games[name, "center"].update(center, class_ids, image_ids)
        if not saliency_fns:
            continue
        image = _resize_image(item["image"], input_shape(height, width, config.input_size))
        # The classes in chunks of `batch` (the last padded with its first class and an empty mask), so that the
        # networks compile once per input shape.
        chunks = []
        for lo in range(0, k, batch):
            n = min(batch, k - lo)
            targets = np.concatenate([class_ids[lo:lo + n], np.full(batch - n, class_ids[lo], np.int32)])
            chunk_masks = np.concatenate([masks[lo:lo + n], np.zeros((batch - n, height, width), bool)])
            chunks.append((n, targets, chunk_masks))
        images = jnp.broadcast_to(image, (batch, *image.shape[1:]))
        for (name, method), fn in saliency_fns.items():
            hits, finite = [], []
            for n, targets, chunk_masks in chunks:
                h, f = _score(fn(models[name][1], images, targets), chunk_masks, tolerance)
                hits.append(np.asarray(h)[:n])
                finite.append(np.asarray(f)[:n])
            hits, finite = np.concatenate(hits), np.concatenate(finite)
            if not finite.all():
                raise ValueError(f"non-finite {method} map for image {item['image_id']!r} (model {name!r}, "
                                 f"classes {class_ids[~finite].tolist()})")
            games[name, method].update(hits, class_ids, image_ids)
        if progress and ((index + 1) % report_every == 0 or index + 1 == len(data)):
            print(f"[{index + 1}/{len(data)}] " + "  ".join(
                f"{n}/{m}: {100 * g.accuracy():.1f}%" for (n, m), g in games.items()), flush=True)

    results = {name: {method: games[name, method].results() for method in methods} for name in model_names}
    title = f"Pointing game, {config.dataset} {config.split} (tolerance {config.tolerance:g} px; accuracy %)"
    table = pointing_game_table(results, title=title)
    out = {"results": results, "table": table, "images": len(data), "seconds": time.time() - start}
    if workdir is not None:
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / "pointing_game.json", "w", encoding="utf-8") as f:
            json.dump(_jsonable({**out, "config": config.to_dict()}), f, indent=2, default=str)
        (workdir / "pointing_game.md").write_text(table, encoding="utf-8")
    return out


def main(argv=None) -> None:
    """Command line: ``python experiments/pointing_game.py --config CONFIG.py[:runlocal] [--workdir DIR]``."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "pointing-game config, e.g. "
                                    "experiments/configs/pointing_game_voc07.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "output folder for pointing_game.json / .md")
    flags.DEFINE_bool("progress", True, "print progress")

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}")
        if flags.FLAGS.config is None:
            raise app.UsageError("--config is required")
        out = run_pointing_game(flags.FLAGS.config, flags.FLAGS.workdir, progress=flags.FLAGS.progress)
        print(out["table"])

    app.run(_main, argv=list(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
