r"""The pointing game (Zhang et al. 2016, Sec. 5.1; Bargal 2019, Sec. 7.4.1) as an evaluator: ``"pointing_game"``.

For every image of a localisation data set (PASCAL VOC 2007 test, COCO 2014 val) and every class present on it, the
class's saliency map is computed at the configured layer of the network fed the image resized to ``input_size``
(shorter side, aspect kept, bilinear, as TorchRay's ``get_transform``), resized bilinearly to the original image,
and its maximum point is a hit if it lies within ``tolerance`` pixels of a region of the class
(:func:`saliency_jax.evaluation.pointing_game.pointing_hits`). :class:`~saliency_jax.evaluation.PointingGame`
accumulates the per-class hits on all pairs and on the "difficult" subset; the methods are ``center`` (the image
centre, model-free), ``grad_cam``, ``excitation_backprop`` and ``contrastive_excitation_backprop``.

The classes present on an image are explained in batches of ``class_batch`` (the image repeated once per class; the
last batch padded), so each network compiles once per distinct input shape. Resizing the image to the network input
and resizing the maps back to the image with the hit test would compile once per image size (VOC 2007 test has
hundreds); with ``size_bucket`` (default 128 pixels) the image and its masks are zero-padded to the next multiple of
it, the resizes use the true size's bilinear weights (those of ``jax.image.resize``: half-pixel centres, no
antialiasing) and the padding is left out of the argmax, so the hits are those of the unpadded computation and these
steps compile once per bucket (``size_bucket = 0``: per image size, the unpadded functions). The network itself still
compiles once per distinct input shape: padding its input would change its maps. The data set is read once per
experiment.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.evaluation.pointing_game import (PointingGame, argmax_points, hits_at_points, load_difficult_flags,
                                                   pointing_game_table, pointing_hits)
from saliency_jax import data as data_lib
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, linen_module,
                                          register_evaluator)
from saliency_jax.registry import name_list
from saliency_jax.saliency import linen_view, resize_maps, saliency_map

__all__ = ["METHODS", "PointingGameSettings", "pointing_game_evaluator", "input_shape", "make_saliency_fn",
           "run_pointing_game"]

#: The localisation data sets the pointing game reads (specs of :func:`saliency_jax.data.get_source`).
DATASETS = ("voc07", "coco14")

#: Methods the pointing game knows, in table order: ``"center"`` (TorchRay's image-centre baseline, model-free) and
#: the layer methods of :data:`saliency_jax.saliency.METHODS` it plays (their maps: :func:`make_saliency_fn`).
METHODS = ("center", "grad_cam", "excitation_backprop", "contrastive_excitation_backprop")


@dataclasses.dataclass(frozen=True)
class PointingGameSettings(EvaluatorSettings):
    """Settings of the ``"pointing_game"`` evaluator.

    Attributes:
      dataset: ``"voc07"`` or ``"coco14"`` (:func:`saliency_jax.data.load_voc`, :func:`saliency_jax.data.load_coco`).
      data_dir: the data set's root (``VOCdevkit/VOC2007``; the COCO folder).
      split: ``"test"`` (VOC) / ``"val2014"`` (COCO).
      limit: the first N images only (0: all).
      difficult_flags: TorchRay's flag table of the "difficult" pairs (``""``: report "all" only).
      tolerance: hit tolerance in pixels (15).
      input_size: shorter side of the network input, in pixels (0: the original image).
      class_batch: (image, class) maps per network call.
      size_bucket: image heights and widths are padded up to a multiple of this (pixels) for the resizes and the hit
        test, so that they compile once per bucket, with the hits unchanged; 0: no padding (one compilation per
        image size).
      methods: methods to run (:data:`METHODS`).
      layers: ``{"grad_cam": path, "excitation_backprop": path, "contrastive_excitation_backprop": path,
        "contrast": path}``: where each method's maps are taken; ``contrast`` documents the classifier's input (where
        contrastive EB subtracts the dual pass) and is checked against ``classifier_input``.
      classifier_input: the module path of the classifier's input layer of the arm's model (``"relu7"`` for VGG16,
        ``"avgpool"`` for ResNet-50), or ``""`` not to check.
    """

    dataset: str = "voc07"
    data_dir: str = ""
    split: str = "test"
    limit: int = 0
    difficult_flags: str = ""
    tolerance: float = 15.0
    input_size: int = 224
    class_batch: int = 1
    size_bucket: int = 128
    methods: tuple[str, ...] = METHODS
    layers: Any = dataclasses.field(default_factory=dict)
    classifier_input: str = ""

    def __post_init__(self):
        methods = name_list(self.methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"pointing_game.methods must name some of {METHODS}; got {self.methods!r}")
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "layers", dict(self.layers or {}))
        if int(self.class_batch) < 1:
            raise ValueError(f"pointing_game.class_batch must be >= 1; got {self.class_batch}")
        if int(self.size_bucket) < 0:
            raise ValueError(f"pointing_game.size_bucket must be >= 0 (0: no padding); got {self.size_bucket}")

    def check_layers(self) -> None:
        """Raises ValueError if a method has no layer, or cEB's contrast layer is not the classifier's input."""
        missing = [m for m in self.methods if m != "center" and not self.layers.get(m)]
        if missing:
            raise ValueError(f"pointing_game.layers has no layer for {missing}")
        if ("contrastive_excitation_backprop" in self.methods and self.classifier_input
                and self.layers.get("contrast") != self.classifier_input):
            raise ValueError(f"contrastive EB contrasts at the classifier's input ({self.classifier_input!r}); "
                             f"pointing_game.layers.contrast is {self.layers.get('contrast')!r}")


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


def make_saliency_fn(module, method: str, layer: str) -> Callable:
    """A jitted function computing one method's maps at the layer's resolution.

    The maps are :func:`~saliency_jax.saliency.saliency_map`'s layer-resolution map (``extras["layer_map"]``, before
    resizing and normalising) of ``method`` on ``linen_view(module, variables, layer, train=False)``.

    Args:
      module: the linen model (``apply(variables, images, train=False) -> logits``).
      method: ``grad_cam``, ``excitation_backprop`` or ``contrastive_excitation_backprop``.
      layer: path of the saliency layer.

    Returns:
      ``fn(variables, images, targets) -> maps``: ``images`` float32 [batch, h, w, 3] in [0, 1] (network input),
      ``targets`` int32 [batch]; ``maps`` float32 [batch, h_layer, w_layer] (Grad-CAM after its ReLU, EB the
      channel sum, cEB the channel sum clamped at 0; not normalised: only the argmax matters). Compiled once per
      input shape.

    Raises:
      ValueError: on an unknown method.
    """
    if method not in METHODS[1:]:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS[1:]}")

    def saliency(variables, images, targets):
        view = linen_view(module, variables, layer, train=False)
        return saliency_map(method, view, images, targets, normalize=False, return_extras=True).extras["layer_map"]

    return jax.jit(saliency)


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


def bucket_size(size: int, bucket: int) -> int:
    """``size`` rounded up to a multiple of ``bucket`` (pixels); ``bucket == 0`` keeps it."""
    return int(size) if not bucket else int(-(-int(size) // int(bucket)) * int(bucket))


def _bilinear_weights(in_size: int, out_size: int, inv_scale, in_valid):
    """The bilinear resize weights of ``jax.image.resize`` (triangle kernel, half-pixel centres, no antialiasing) for
    an axis whose first ``in_valid`` of ``in_size`` entries are real (the rest padding, given no weight).

    Args:
      in_size, out_size: static axis lengths (padded input, padded or true output).
      inv_scale: float32 scalar ``true input size / true output size`` (as ``jax.image.resize`` computes it: the
        reciprocal, in float64, of ``output / input``, rounded to float32).
      in_valid: int32 scalar, the true input size.

    Returns:
      float32 [in_size, out_size]; output entries past the true output size get no weight (their sample point lies
      past the input's last pixel).
    """
    sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale - 0.5
    index = jnp.arange(in_size, dtype=jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample[None, :] - index[:, None]))
    weights = jnp.where((index < in_valid)[:, None], weights, 0.0)
    total = jnp.sum(weights, axis=0, keepdims=True)
    weights = jnp.where(jnp.abs(total) > 1000.0 * float(np.finfo(np.float32).eps),
                        weights / jnp.where(total != 0, total, 1.0), 0.0)
    inside = (sample >= -0.5) & (sample <= in_valid.astype(jnp.float32) - 0.5)
    return jnp.where(inside[None, :], weights, 0.0)


def _inv_scale(in_size: int, out_size: int) -> np.float32:
    """``jax.image.resize``'s inverse scale of an axis: ``1 / (out / in)`` in float64, then float32."""
    return np.float32(1.0 / (out_size / in_size))


def _resize_hw(x, wy, wx):
    """``x`` [batch, h, w, ...] resized by the weights ``wy`` [h, H], ``wx`` [w, W] -> [batch, H, W, ...]: the two
    contractions of ``jax.image.resize`` in its order (height first), so the numbers match it."""
    dims = (([0], [1]), ([], []))
    hi = jax.lax.Precision.HIGHEST
    t = jax.lax.dot_general(wy, x, dims, precision=(hi, hi), preferred_element_type=jnp.float32)  # [H, b, w, ...]
    t = jax.lax.dot_general(t, wx, (([2], [0]), ([], [])), precision=(hi, hi),
                            preferred_element_type=jnp.float32)  # [H, b, ..., W]
    rest = tuple(range(2, t.ndim - 1))
    return jnp.transpose(t, (1, 0, t.ndim - 1, *rest))


@functools.partial(jax.jit, static_argnums=2)
def _resize_image_padded(image, hw, input_hw, inv_scales):
    """The padded image [Hb, Wb, 3] (true size ``hw`` int32 [2]) -> [1, *input_hw, 3], as :func:`_resize_image`."""
    image = image[None].astype(jnp.float32)
    wy = _bilinear_weights(image.shape[1], input_hw[0], inv_scales[0], hw[0])
    wx = _bilinear_weights(image.shape[2], input_hw[1], inv_scales[1], hw[1])
    return _resize_hw(image, wy, wx)


@functools.partial(jax.jit, static_argnums=4)
def _score_padded(maps, masks, hw, inv_scales, tolerance):
    """As :func:`_score` for masks zero-padded to [k, Hb, Wb] (true size ``hw`` int32 [2]): the maps are resized
    to the true size inside the padded grid and the padding is left out of the argmax (row-major order, and so the
    first maximum on ties, is kept)."""
    maps = maps.astype(jnp.float32)
    hb, wb = masks.shape[1:]
    wy = _bilinear_weights(maps.shape[1], hb, inv_scales[0], jnp.int32(maps.shape[1]))
    wx = _bilinear_weights(maps.shape[2], wb, inv_scales[1], jnp.int32(maps.shape[2]))
    resized = _resize_hw(maps, wy, wx)
    valid = (jnp.arange(hb) < hw[0])[:, None] & (jnp.arange(wb) < hw[1])[None, :]
    points = argmax_points(jnp.where(valid[None], resized, -jnp.inf))
    finite = jnp.all(jnp.isfinite(resized) | ~valid[None], axis=(1, 2))
    return hits_at_points(points, masks, tolerance), finite


def _pad_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` zero-padded at the end of every axis to ``shape``."""
    return np.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


def load_data(settings: PointingGameSettings):
    """The localisation data set of the settings (VOC 2007 / COCO 2014 class masks), through
    :func:`saliency_jax.data.get_source` (specs ``"voc07"``, ``"coco14"``).

    Raises:
      ValueError: unknown data set; FileNotFoundError: missing files.
    """
    if settings.dataset not in DATASETS:
        raise ValueError(f"unknown pointing-game dataset {settings.dataset!r}; expected 'voc07' or 'coco14'")
    return data_lib.get_source(settings.dataset, settings.split, data_dir=settings.data_dir,
                               options={"limit": settings.limit or None})


def run_pointing_game(module, variables, data, settings: PointingGameSettings, *, difficult=None,
                      progress: bool = False) -> dict[str, dict[str, Any]]:
    """Plays the pointing game with one model for every method of ``settings``.

    Args:
      module: the linen model; variables: its variables (both unused when the only method is ``center``).
      data: a localisation data set (:func:`load_data`): items ``{"image", "image_id", "class_ids",
        "class_masks"}``.
      settings: the evaluator's settings.
      difficult: the flag table (:func:`saliency_jax.evaluation.load_difficult_flags`) or None.
      progress: print a line every 10% of the images.

    Returns:
      ``{method: PointingGame.results()}``.

    Raises:
      ValueError: a non-finite saliency map (naming the image, method and classes).
    """
    methods, tolerance, batch = settings.methods, float(settings.tolerance), int(settings.class_batch)
    games = {m: PointingGame(data.num_classes, class_names=data.class_names, difficult=difficult) for m in methods}
    fns = {m: make_saliency_fn(module, m, settings.layers[m]) for m in methods if m != "center"}
    bucket = int(settings.size_bucket)
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
            games["center"].update(np.asarray(hits_at_points(points, masks, tolerance)), class_ids, image_ids)
        if not fns:
            continue
        input_hw = input_shape(height, width, settings.input_size)
        grid = (bucket_size(height, bucket), bucket_size(width, bucket))  # the padded (bucket) image size
        if bucket:
            hw = np.array([height, width], np.int32)
            image = _resize_image_padded(_pad_to(np.asarray(item["image"]), (*grid, 3)), hw, input_hw,
                                         np.array([_inv_scale(height, input_hw[0]), _inv_scale(width, input_hw[1])]))
        else:
            image = _resize_image(item["image"], input_hw)
        # The classes in chunks of `batch` (the last padded with its first class and an empty mask), so that the
        # network compiles once per input shape.
        chunks = []
        for lo in range(0, k, batch):
            n = min(batch, k - lo)
            targets = np.concatenate([class_ids[lo:lo + n], np.full(batch - n, class_ids[lo], np.int32)])
            chunk_masks = np.zeros((batch, *grid), bool)
            chunk_masks[:n, :height, :width] = masks[lo:lo + n]
            chunks.append((n, targets, chunk_masks))
        images = jnp.broadcast_to(image, (batch, *image.shape[1:]))
        for method, fn in fns.items():
            hits, finite = [], []
            for n, targets, chunk_masks in chunks:
                maps = fn(variables, images, targets)
                if bucket:  # maps (layer size) -> the true image size inside the padded grid
                    scales = np.array([_inv_scale(maps.shape[1], height), _inv_scale(maps.shape[2], width)])
                    h, f = _score_padded(maps, chunk_masks, hw, scales, tolerance)
                else:
                    h, f = _score(maps, chunk_masks, tolerance)
                hits.append(np.asarray(h)[:n])
                finite.append(np.asarray(f)[:n])
            hits, finite = np.concatenate(hits), np.concatenate(finite)
            if not finite.all():
                raise ValueError(f"non-finite {method} map for image {item['image_id']!r} (classes "
                                 f"{class_ids[~finite].tolist()})")
            games[method].update(hits, class_ids, image_ids)
        if progress and ((index + 1) % report_every == 0 or index + 1 == len(data)):
            print(f"[{index + 1}/{len(data)}] " + "  ".join(f"{m}: {100 * g.accuracy():.1f}%"
                                                            for m, g in games.items()), flush=True)
    return {m: games[m].results() for m in methods}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


@register_evaluator("pointing_game", PointingGameSettings)
def pointing_game_evaluator(settings: PointingGameSettings) -> Evaluator:
    """The pointing game of a trained (or imported) model, one table column pair (all / difficult) per arm.

    Raises:
      ValueError: a method without a layer, or a contrast layer other than the classifier's input.
    """
    settings.check_layers()

    def evaluate(run, data):
        dataset = data.cached(("pointing_game", settings.dataset, settings.data_dir, settings.split, settings.limit),
                              lambda: load_data(settings))
        difficult = None
        if settings.difficult_flags:
            difficult = data.cached(("difficult", settings.difficult_flags),
                                    lambda: load_difficult_flags(settings.difficult_flags, dataset.num_classes))
        return _jsonable(run_pointing_game(linen_module(run, 'the pointing game'), run.variables, dataset, settings, difficult=difficult))

    def report(ctx: ReportContext) -> Section:
        results = {a: v[0] for a, v in ctx.metrics("pointing_game").items()}
        title = f"Pointing game, {settings.dataset} {settings.split} (tolerance {settings.tolerance:g} px; accuracy %)"
        table = pointing_game_table(results, title=title)
        (ctx.workdir / "pointing_game.md").write_text(table, encoding="utf-8")
        return Section("Pointing game (Zhang et al. 2016)", table + "\n\n(first repeat of each arm; per-class "
                       "accuracies in metrics.json)")

    return Evaluator(evaluate, report)
