"""Spatiotemporal grounding benchmarks of a clip classifier (Bargal 2019, Sec. 7.4, Tables 7.1-7.2, Fig. 7.6).

For a clip model with the :class:`saliency_jax.models.CNNLSTM` interface - ``apply(variables, clips)`` gives logits
[batch, time, classes] and ``apply(variables, frames, method="frame_logits")`` the single-frame baseline's logits
[frames, classes] - and a batch of clips from :class:`saliency_jax.data.MovingDigitClips` (the fields ``image``,
``label``, ``boxes``, ``segment``, ``gt_frames``):

* :func:`clip_groundings` - the per-frame maps and map sums of every method, for the ground-truth class, in one
  jitted call: ``"eb"``, ``"ceb"``, ``"bp"`` treat every frame as an independent image (the single-frame CNN:
  Excitation Backprop, contrastive EB, the gradient; Sec. 7.4.1 "Baselines"), computed by
  :func:`~saliency_jax.saliency.saliency_map` on a view of the single-frame classifier; ``"eb_r"``, ``"ceb_r"``,
  ``"bp_r"`` explain the class at one time step of the recurrent model through time
  (:mod:`saliency_jax.saliency.recurrent`: clips [batch, time, ...] in, maps [batch, time, h, w] out, outside
  ``saliency_map``'s one-image convention, so called directly); ``"probability"`` is the softmax probability of the
  class at every step.
* Table 7.1 shape - :func:`pointing_game_clips` (= :func:`clip_groundings` + :func:`clip_pointing_hits`): the
  pointing game (Zhang et al. 2016) on every frame that shows the ground-truth digit, against its box;
  :func:`pointing_accuracy` gives the mean over classes of the hit rates.
* Table 7.2 shape - :func:`temporal_detections` (= :func:`clip_groundings` + :func:`clip_detections`): one
  detected segment per clip and method, of known length (the
  window with the highest score) or unknown (anchor and greedy extension; Sec. 7.2), scored by the mean frame score
  inside it; :func:`temporal_detection_map`: average precision per class at a temporal IoU threshold (0.5) and
  their mean. The probability baseline localises on the probability thresholded to +1 (>= 0.5) / -1 (Sec. 7.4.2).
* Fig. 7.6 shape - ``clip_groundings(...)[method].frame_sums`` averaged over clips of one layout.

Thesis numbers for orientation (UCF101 / THUMOS14, VGG16-LSTM): pointing EB 55.8, EB-R 61.5, cEB 37.0, cEB-R 39.1,
BP 37.3, BP-R 39.2 %; synthetic detection, known length 65 frames: probability 47.7, EB-R 56.3, cEB-R 73.5 mAP.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.data.clips import box_masks
from saliency_jax.evaluation.pointing_game import pointing_hits
from saliency_jax.saliency.methods import saliency_map
from saliency_jax.saliency.recurrent import (
    RecurrentMaps,
    contrastive_recurrent_excitation_backprop,
    linen_clip_layers,
    recurrent_excitation_backprop,
    recurrent_gradient,
    temporal_localization,
    temporal_localization_known_length,
)
from saliency_jax.saliency.views import linen_view

Array = jax.Array

__all__ = [
    "DETECTION_METHODS",
    "GROUNDING_METHODS",
    "POINTING_METHODS",
    "clip_detections",
    "clip_groundings",
    "clip_pointing_hits",
    "pointing_accuracy",
    "pointing_game_clips",
    "temporal_detection_map",
    "temporal_detections",
    "temporal_iou",
]

POINTING_METHODS = ("eb", "eb_r", "ceb", "ceb_r", "bp", "bp_r")
DETECTION_METHODS = ("probability", "eb_r", "ceb_r")
GROUNDING_METHODS = POINTING_METHODS + ("probability",)
#: The frame-wise baselines and the key of :data:`saliency_jax.saliency.METHODS` each one's maps come from.
_FRAME_METHODS = {"eb": "excitation_backprop", "ceb": "contrastive_excitation_backprop", "bp": "vanilla_gradient"}

#: Pointing-game tolerance in pixels for 64 px canvases: the thesis's 15 px at 320 x 240 frames is ~4.7 % of the
#: width, ~3 px here.
DEFAULT_CLIP_TOLERANCE = 3.0


def _check_methods(methods: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    methods = tuple(methods)
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {tuple(allowed)}; got {methods!r}")
    return methods


@functools.partial(jax.jit, static_argnames=("model", "layer", "boundary", "methods", "time_step", "cell_rule"))
def _groundings(model, variables, clips, labels, *, layer, boundary, methods, time_step, cell_rule):
    batch, time = clips.shape[:2]
    out: dict[str, Any] = {}
    clip_model = linen_clip_layers(model, variables, layer, boundary)
    if "probability" in methods:
        logits = clip_model(clips)
        probs = jax.nn.softmax(logits, axis=-1)
        out["probability"] = jnp.take_along_axis(probs, labels[:, None, None], axis=-1)[..., 0]
    # The -R methods explain a clip through time (saliency.recurrent); the frame-wise ones go through saliency_map.
    if "eb_r" in methods:
        r = recurrent_excitation_backprop(clip_model, clips, labels, time_step=time_step, cell_rule=cell_rule)
        out["eb_r"] = RecurrentMaps(r.saliency, r.frame_sums)
    if "ceb_r" in methods:
        r = contrastive_recurrent_excitation_backprop(clip_model, clips, labels, time_step=time_step,
                                                      cell_rule=cell_rule)
        out["ceb_r"] = RecurrentMaps(r.saliency, r.frame_sums)
    if "bp_r" in methods:
        out["bp_r"] = recurrent_gradient(clip_model, clips, labels, time_step=time_step)
    if any(m in methods for m in _FRAME_METHODS):
        frames = clips.reshape(batch * time, *clips.shape[2:])
        frame_labels = jnp.repeat(labels, time)
        frame_view = linen_view(model, variables, layer, method="frame_logits")

        def explain(method, **options):
            return saliency_map(_FRAME_METHODS[method], frame_view, frames, frame_labels, normalize=False,
                                return_extras=True, **options)

        def per_clip(maps):
            maps = maps.reshape(batch, time, *maps.shape[1:])
            return RecurrentMaps(maps, jnp.sum(maps, axis=(2, 3)))

        if "eb" in methods:  # at the layer's resolution
            out["eb"] = per_clip(explain("eb").extras["layer_map"])
        if "ceb" in methods:  # signed channel sum (the displayed cEB map clamps it at 0; the argmax is the same)
            p = explain("ceb").extras["probability"]
            out["ceb"] = per_clip(jnp.sum(p.astype(jnp.float32), axis=-1))
        if "bp" in methods:  # at the pixels, the largest |gradient| over the channels
            out["bp"] = per_clip(explain("bp", reduction="max_abs").maps)
    return out


def clip_groundings(model, variables, batch: Mapping[str, Any], *, methods: Sequence[str] = GROUNDING_METHODS,
                    layer: str = "conv3", boundary: str = "fc", time_step: int | None = -1,
                    cell_rule: str = "gradient") -> dict[str, Any]:
    """Per-frame maps and map sums of the ground-truth class for every method, one jitted call.

    Args:
      model: a linen clip classifier with the :class:`saliency_jax.models.CNNLSTM` interface (hashable: it is a
        static argument of the jitted computation), in inference mode.
      variables: its variables.
      batch: a dict with ``"image"`` [batch, time, height, width, channels] float32 in [0, 1] and ``"label"`` int
        [batch] (:func:`saliency_jax.data.clips.collate_clips`).
      methods: subset of :data:`GROUNDING_METHODS`.
      layer: module path of the map layer (for every method but BP / BP-R, which are taken at the pixels).
      boundary: module path of the CNN/RNN boundary.
      time_step: the step of the one-hot prior of the -R methods (-1: last; None: every step).
      cell_rule: the LSTM cell's EB rule (``"excitation"`` or ``"gradient"``, see
        :func:`~saliency_jax.saliency.recurrent.recurrent_excitation_backprop`).

    Returns:
      ``{method: RecurrentMaps(saliency [batch, time, h, w] float32, frame_sums [batch, time] float32)}``, and for
      ``"probability"`` the softmax probability of the class [batch, time] float32.

    Raises:
      ValueError: unknown methods, bad shapes; UnsupportedOperationError: a model outside EB's rules.
    """
    methods = _check_methods(methods, GROUNDING_METHODS)
    clips = jnp.asarray(batch["image"])
    labels = jnp.asarray(batch["label"]).astype(jnp.int32)
    return _groundings(model, variables, clips, labels, layer=layer, boundary=boundary, methods=methods,
                       time_step=time_step, cell_rule=cell_rule)


def pointing_game_clips(model, variables, batch: Mapping[str, Any], *, methods: Sequence[str] = POINTING_METHODS,
                        tolerance: float = DEFAULT_CLIP_TOLERANCE, layer: str = "conv3", boundary: str = "fc",
                        time_step: int | None = -1, cell_rule: str = "gradient") -> dict[str, np.ndarray]:
    """Per-frame pointing game for a batch of clips (Bargal 2019, Sec. 7.4.1, Table 7.1 shape).

    :func:`clip_groundings` then :func:`clip_pointing_hits` (call those two to reuse one grounding computation for
    both benchmarks).

    Args:
      model, variables, layer, boundary, time_step, cell_rule: as :func:`clip_groundings`.
      batch: a dict with ``"image"``, ``"label"``, ``"boxes"`` [batch, time, 4] int (y0, x0, y1, x1) and
        ``"gt_frames"`` [batch, time] bool.
      methods: subset of :data:`POINTING_METHODS`.
      tolerance: radius in pixels (:data:`DEFAULT_CLIP_TOLERANCE` for 64 px canvases).

    Returns:
      As :func:`clip_pointing_hits`.
    """
    methods = _check_methods(methods, POINTING_METHODS)
    groundings = clip_groundings(model, variables, batch, methods=methods, layer=layer, boundary=boundary,
                                 time_step=time_step, cell_rule=cell_rule)
    return clip_pointing_hits(groundings, batch, methods=methods, tolerance=tolerance)


def clip_pointing_hits(groundings: Mapping[str, Any], batch: Mapping[str, Any], *,
                       methods: Sequence[str] = POINTING_METHODS,
                       tolerance: float = DEFAULT_CLIP_TOLERANCE) -> dict[str, np.ndarray]:
    """Pointing-game hits of every frame from precomputed maps (:func:`clip_groundings`).

    Every map is resized to the frame (bilinear) and its maximum point is a hit if it lies within ``tolerance``
    pixels of the ground-truth digit's box (:func:`saliency_jax.evaluation.pointing_game.pointing_hits`). Only
    frames that show the ground-truth digit count.

    Args:
      groundings: the output of :func:`clip_groundings` for ``batch`` (with every method in ``methods``).
      batch: a dict with ``"image"`` [batch, time, height, width, channels], ``"boxes"`` [batch, time, 4] int
        (y0, x0, y1, x1) and ``"gt_frames"`` [batch, time] bool.
      methods: subset of :data:`POINTING_METHODS`.
      tolerance: radius in pixels.

    Returns:
      ``{method: hits bool [batch, time]}`` and ``"evaluated"``: bool [batch, time], the frames that count
      (host NumPy arrays).
    """
    methods = _check_methods(methods, POINTING_METHODS)
    b, t, height, width = np.shape(batch["image"])[:4]
    masks = box_masks(jnp.asarray(batch["boxes"]).reshape(b * t, 4), height, width)
    hits = {}
    for method in methods:
        maps = groundings[method].saliency
        hits[method] = np.asarray(pointing_hits(maps.reshape(b * t, *maps.shape[2:]), masks, tolerance)).reshape(b, t)
    hits["evaluated"] = np.asarray(batch["gt_frames"], bool)
    return hits


def pointing_accuracy(hits: np.ndarray, evaluated: np.ndarray, labels: np.ndarray, num_classes: int
                      ) -> tuple[float, np.ndarray]:
    """Pointing-game accuracy: the hit rate of each class over its evaluated frames, and their mean.

    Args:
      hits: bool [clips, time] (concatenate the batches of :func:`pointing_game_clips`).
      evaluated: bool [clips, time], the frames that count.
      labels: int [clips], the class of each clip.
      num_classes: number of classes.

    Returns:
      ``(mean over classes with evaluated frames, per-class accuracy float64 [num_classes] with NaN for classes
      without frames)``, as fractions in [0, 1].
    """
    hits, evaluated, labels = np.asarray(hits, bool), np.asarray(evaluated, bool), np.asarray(labels)
    per_class = np.full(num_classes, np.nan)
    for c in range(num_classes):
        frames = evaluated[labels == c]
        if frames.sum():
            per_class[c] = hits[labels == c][frames].mean()
    return float(np.nanmean(per_class)), per_class


def temporal_detections(model, variables, batch: Mapping[str, Any], *, methods: Sequence[str] = DETECTION_METHODS,
                        known_length: bool = False, layer: str = "conv3", boundary: str = "fc",
                        time_step: int | None = -1, cell_rule: str = "gradient"
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One detected segment of the ground-truth class per clip and method (Bargal 2019, Sec. 7.2, 7.4.2).

    :func:`clip_groundings` then :func:`clip_detections`.

    Args:
      model, variables, layer, boundary, time_step, cell_rule: as :func:`clip_groundings`.
      batch: a dict with ``"image"``, ``"label"`` and ``"segment"`` [batch, 2] int.
      methods: subset of :data:`DETECTION_METHODS`.
      known_length: use the ground-truth segment's length.

    Returns:
      As :func:`clip_detections`.
    """
    methods = _check_methods(methods, DETECTION_METHODS)
    groundings = clip_groundings(model, variables, batch, methods=methods, layer=layer, boundary=boundary,
                                 time_step=time_step, cell_rule=cell_rule)
    return clip_detections(groundings, batch, methods=methods, known_length=known_length)


def clip_detections(groundings: Mapping[str, Any], batch: Mapping[str, Any], *,
                    methods: Sequence[str] = DETECTION_METHODS, known_length: bool = False
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Detected segments from precomputed frame scores (:func:`clip_groundings`).

    The frame scores are the map sums (``"eb_r"``, ``"ceb_r"``) or the class probability thresholded to +-1
    (``"probability"``, Sec. 7.4.2 "Baselines"); the segment is the window of the ground truth's length with the
    highest score sum (``known_length``) or the anchor-and-extend window
    (:func:`~saliency_jax.saliency.recurrent.temporal_localization`; the thesis reports it for the probability and
    cEB-R only, since EB-R sums are non-negative). The detection's confidence is the mean frame score inside the
    segment (the raw probability for ``"probability"``).

    Args:
      groundings: the output of :func:`clip_groundings` for ``batch``.
      batch: a dict with ``"segment"`` [batch, 2] int (the GT frames; its length is the known length).
      methods: subset of :data:`DETECTION_METHODS`.
      known_length: use the ground-truth segment's length.

    Returns:
      ``{method: (segments int32 [batch, 2] (start, end), confidences float32 [batch])}`` as host arrays.
    """
    methods = _check_methods(methods, DETECTION_METHODS)
    segment = jnp.asarray(batch["segment"])
    result = {}
    for method in methods:
        if method == "probability":
            raw = groundings["probability"]
            scores = jnp.where(raw >= 0.5, 1.0, -1.0)
        else:
            raw = scores = groundings[method].frame_sums
        if known_length:
            found = temporal_localization_known_length(scores, segment[:, 1] - segment[:, 0])
        else:
            found = temporal_localization(scores)
        t = jnp.arange(raw.shape[1])[None, :]
        inside = (t >= found[:, :1]) & (t < found[:, 1:])
        confidence = jnp.sum(jnp.where(inside, raw, 0.0), axis=1) / jnp.maximum(jnp.sum(inside, axis=1), 1)
        result[method] = (np.asarray(found), np.asarray(confidence, np.float32))
    return result


def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Temporal intersection over union of segments.

    Args:
      a, b: int [n, 2] ``(start, end)``, frames ``start <= t < end``.

    Returns:
      float64 [n] in [0, 1] (0 for two empty segments).
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    inter = np.clip(np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    union = (a[:, 1] - a[:, 0]) + (b[:, 1] - b[:, 0]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _average_precision(confidences: np.ndarray, true_positive: np.ndarray, num_positives: int) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+, THUMOS): area under the monotone precision-recall curve."""
    order = np.argsort(-confidences, kind="stable")
    tp = np.cumsum(true_positive[order])
    fp = np.cumsum(~true_positive[order])
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def temporal_detection_map(segments: np.ndarray, confidences: np.ndarray, gt_segments: np.ndarray,
                           labels: np.ndarray, num_classes: int, iou_threshold: float = 0.5
                           ) -> tuple[float, np.ndarray]:
    """Temporal detection mAP with one ground-truth segment and one detection per clip (Table 7.2 shape).

    A detection is a true positive if its temporal IoU with the clip's ground-truth segment is at least
    ``iou_threshold``; detections of a class are ranked by confidence over all its clips; AP is the area under the
    interpolated precision-recall curve, and mAP its mean over the classes present.

    Args:
      segments: int [clips, 2] detections (concatenate the batches of :func:`temporal_detections`).
      confidences: float [clips].
      gt_segments: int [clips, 2] ground truth.
      labels: int [clips] class of each clip.
      num_classes: number of classes.
      iou_threshold: the overlap ``alpha`` (0.5 in Table 7.2).

    Returns:
      ``(mAP, AP per class float64 [num_classes] with NaN for absent classes)``, fractions in [0, 1].
    """
    labels = np.asarray(labels)
    hit = temporal_iou(segments, gt_segments) >= iou_threshold
    confidences = np.asarray(confidences, np.float64)
    ap = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mine = labels == c
        if mine.any():
            ap[c] = _average_precision(confidences[mine], hit[mine], int(mine.sum()))
    return float(np.nanmean(ap)), ap
