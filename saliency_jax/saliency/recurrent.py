"""Excitation Backprop for recurrent models (EB-R, cEB-R), its gradient baseline (BP-R), temporal localisation.

Bargal, "Grounding deep models of visual data", PhD thesis 2019, Ch. 7 (Bargal, Zunino et al., "Excitation Backprop
for RNNs", CVPR 2018); the authors' code is ``sbargal/Caffe-ExcitationBP-RNNs``. A CNN-LSTM classifies a clip; one
backward pass grounds a class in space (a map per frame) and time (which frames).

The three modules of cEB-R (Fig. 7.1, Algorithm 3), on a clip model split at two layers (:class:`ClipLayerModel`):
the *boundary* between the per-frame CNN and the RNN (``fc7`` in the thesis) and the convolutional *layer* of the
maps (``conv5``):

1. **RNN backward** (Eq. 7.1, 7.3): a one-hot prior on the class at the chosen time step ``n`` (the authors' demo
   default: the last step) is propagated by Excitation Backprop back through the classifier and the unrolled LSTM
   to the boundary, giving ``P^t(a_i)`` for every frame ``t`` and unit ``i``. The rules run inside ``lax.scan``
   (:func:`~saliency_jax.saliency.excitation_backprop.with_excitation_rules`), so the model is used unmodified;
   ``cell_rule`` chooses how the LSTM cell splits the signal (see :mod:`saliency_jax.saliency._eb_rules`:
   ``"excitation"``, EB with gates as constant weights, or ``"gradient"``, the released code's LSTM unit).
2. **Temporal normalisation** (Eq. 7.5-7.6): ``P_N^t(a_i) = P^t(a_i) / sum_t sum_i P^t(a_i)``, per clip, over all
   time steps and units (the authors' demo: ``norm = sum(sum(attMap))`` over the ``fc7`` blob of the clip). cEB-R
   does the same with the classifier's weights negated (the dual units, Eq. 7.2, 7.4) and subtracts at the
   boundary: ``Map^t = P_N^t - Pbar_N^t`` (Eq. 7.7).
3. **CNN backward** (Eq. 7.8-7.9): ``Map^t`` (``P_N^t`` for EB-R) is propagated by EB down the CNN of every frame to
   the layer; the channel sum is the frame's map, and its spatial sum the frame's score for temporal grounding.

Since every EB rule is linear in the signal, the dual pass is taken as the normal pass minus the contrastive pass
(the classifier's rule is the only difference), so cEB-R costs two backward passes through the RNN head and one
through the CNN. BP-R is the gradient of the class's logit at step ``n`` with respect to every frame's pixels,
through time.

Temporal localisation (Sec. 7.2): the frame with the highest map sum is the anchor; the window grows from it in both
directions while frames have non-negative sums (:func:`temporal_localization`); with a known action length, the
window of that length with the highest sum (:func:`temporal_localization_known_length`, Sec. 7.4.2).

All functions take whole batches of clips with no loop over examples and are jittable (``time_step``, ``cell_rule``
and the model are static).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency._eb_rules import CELL_RULES, CellRule, with_excitation_rules
from saliency_jax.saliency.core import resolve_targets, target_one_hot

Array = jax.Array
Reduction = Literal["max_abs", "abs_sum", "sum"]

__all__ = [
    "ClipLayerModel",
    "RecurrentEBResult",
    "RecurrentMaps",
    "clip_prior",
    "contrastive_recurrent_excitation_backprop",
    "linen_clip_layers",
    "recurrent_excitation_backprop",
    "recurrent_gradient",
    "split_clip_model",
    "temporal_localization",
    "temporal_localization_known_length",
    "temporal_normalization",
]


# ---------------------------------------------------------------------------------------------------------------
# A clip model split at a layer and at the CNN/RNN boundary.


@dataclasses.dataclass(frozen=True)
class ClipLayerModel:
    """A clip classifier split at a convolutional layer and at the CNN/RNN boundary.

    Attributes:
      fn: pure function ``(clips, layer_perturbation, boundary_perturbation) -> (logits, layer_activations,
        boundary_activations)``. ``clips``: [batch, time, height, width, channels] float; ``logits``:
        [batch, time, num_classes]; ``layer_activations``: the layer's output for every frame, [batch * time, h, w,
        c] (or [batch, time, h, w, c]); ``boundary_activations``: the per-frame features the RNN reads,
        [batch * time, units] (or [batch, time, units]). Each perturbation has its activation's shape and is added
        to it before the rest of the network consumes it.
      layer: name of the layer of the maps (messages).
      boundary: name of the boundary layer (messages).
    """

    fn: Callable[[Array, Array, Array], tuple[Array, Array, Array]]
    layer: str
    boundary: str

    def shapes(self, clips: Array) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of the layer's and the boundary's activations (traced, no FLOPs)."""
        zero = jnp.zeros((), clips.dtype)
        _, layer, boundary = jax.eval_shape(lambda x: self.fn(x, zero, zero), clips)
        return layer, boundary

    def __call__(self, clips: Array) -> Array:
        """The logits [batch, time, num_classes]."""
        zero = jnp.zeros((), clips.dtype)
        return self.fn(clips, zero, zero)[0]


def _path_str(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def linen_clip_layers(module: nn.Module, variables: Any, layer: str, boundary: str, **apply_kwargs) -> ClipLayerModel:
    """Splits an unmodified Flax linen clip classifier at two submodules (cf. ``linen_layer``).

    Args:
      module: a linen module whose ``apply(variables, clips, **apply_kwargs)`` returns logits
        [batch, time, num_classes] (e.g. :class:`saliency_jax.models.CNNLSTM`).
      variables: its variables.
      layer: module path of the convolutional layer of the maps (``"conv3"``); its ``__call__`` must run once,
        on all frames at once ([batch * time, h, w, c]).
      boundary: module path of the layer whose output the RNN reads (``"fc"``), likewise called once.
      **apply_kwargs: forwarded to ``module.apply`` (e.g. ``train=False``).

    Returns:
      A :class:`ClipLayerModel`.

    Raises:
      ValueError: ``layer == boundary`` (at once); (when first called) a path not found or called more than once,
        or a submodule that does not return a single array.
    """
    if layer == boundary:
        raise ValueError(f"the map layer and the CNN/RNN boundary must differ; both are {layer!r}")

    def fn(clips, layer_perturbation, boundary_perturbation):
        captured: dict[str, list] = {layer: [], boundary: []}
        perturbation = {layer: layer_perturbation, boundary: boundary_perturbation}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = _path_str(context.module)
            if context.method_name == "__call__" and path in captured:
                if not isinstance(out, jax.Array):
                    raise ValueError(f"layer {path!r} returns {type(out).__name__}, not a single array")
                captured[path].append(out)
                out = out + perturbation[path]
            return out

        with nn.intercept_methods(interceptor):
            logits = module.apply(variables, clips, **apply_kwargs)
        for path, outs in captured.items():
            if len(outs) != 1:
                raise ValueError(f"layer {path!r} of {type(module).__name__} ran {len(outs)} times; name a "
                                 "submodule that runs once on all frames")
        return logits, captured[layer][0], captured[boundary][0]

    return ClipLayerModel(fn=fn, layer=layer, boundary=boundary)


def split_clip_model(features_fn: Callable[[Array], Array], encoder_fn: Callable[[Array], Array],
                     sequence_fn: Callable[[Array], Array], layer: str = "features",
                     boundary: str = "boundary") -> ClipLayerModel:
    """Builds a :class:`ClipLayerModel` from a pure CNN-RNN given as three functions.

    Args:
      features_fn: frames [batch * time, height, width, channels] -> the layer's activations [batch * time, h, w, c].
      encoder_fn: the layer's activations -> per-frame features [batch * time, units] (the rest of the CNN).
      sequence_fn: features [batch, time, units] -> logits [batch, time, num_classes] (the RNN and classifier).
      layer: a name for the layer.
      boundary: a name for the boundary.

    Returns:
      A :class:`ClipLayerModel` computing ``sequence_fn(encoder_fn(features_fn(frames) + pl) + pb)``.
    """

    def fn(clips, layer_perturbation, boundary_perturbation):
        batch, time = clips.shape[:2]
        activations = features_fn(clips.reshape(batch * time, *clips.shape[2:]))
        features = encoder_fn(activations + layer_perturbation)
        logits = sequence_fn((features + boundary_perturbation).reshape(batch, time, -1))
        return logits, activations, features

    return ClipLayerModel(fn=fn, layer=layer, boundary=boundary)


# ---------------------------------------------------------------------------------------------------------------
# EB-R and cEB-R.


class RecurrentEBResult(NamedTuple):
    """EB-R / cEB-R output for a batch of clips.

    Attributes:
      boundary: [batch, time, units] float32 - the signal at the CNN/RNN boundary after temporal normalisation:
        ``P_N`` (EB-R, Eq. 7.5; sums to 1 per clip) or ``Map = P_N - Pbar_N`` (cEB-R, Eq. 7.7; sums to 0).
      probability: [batch, time, h, w, channels] float32 - the signal at the layer (Eq. 7.9).
      saliency: [batch, time, h, w] float32 - its channel sum, the map of every frame; signed for cEB-R (the
        authors' demo clamps it at 0 only to display it).
      frame_sums: [batch, time] float32 - the sum of every frame's map, the temporal grounding score (Sec. 7.2).
    """

    boundary: Array
    probability: Array
    saliency: Array
    frame_sums: Array


class RecurrentMaps(NamedTuple):
    """BP-R output for a batch of clips.

    Attributes:
      saliency: [batch, time, height, width] float32 - the per-frame gradient maps.
      frame_sums: [batch, time] float32 - the sum of every frame's map.
    """

    saliency: Array
    frame_sums: Array


def _check_clips(clips: Array) -> None:
    if getattr(clips, "ndim", None) != 5:
        raise ValueError(f"clips must be [batch, time, height, width, channels]; got shape "
                         f"{getattr(clips, 'shape', None)}")
    if not jnp.issubdtype(clips.dtype, jnp.floating):
        raise TypeError(f"clips must be floating point (float32 in [0, 1]); got dtype {clips.dtype}")
    if not isinstance(clips, jax.core.Tracer):  # concrete clips: NaN / inf frames raise (traced: NaN maps)
        with jax.ensure_compile_time_eval():
            finite = np.asarray(jnp.isfinite(clips).all(axis=(1, 2, 3, 4)))
        if not finite.all():
            raise ValueError(f"clips contain NaN or inf pixels (clips {np.flatnonzero(~finite)[:10].tolist()})")


def _check_logits(logits: Array, batch: int, time: int) -> None:
    if logits.ndim != 3 or logits.shape[:2] != (batch, time):
        raise ValueError(f"the model must return logits [batch={batch}, time={time}, num_classes]; got shape "
                         f"{tuple(logits.shape)}")


def _resolve_step(time_step: int | None, time: int) -> int | None:
    if time_step is None:
        return None
    if isinstance(time_step, bool) or not isinstance(time_step, int):
        raise TypeError(f"time_step must be a static int (or None for every step); got {time_step!r}")
    if not -time <= time_step < time:
        raise ValueError(f"time_step {time_step} out of range for {time} time steps")
    return time_step % time


def clip_prior(logits: Array, targets: Array | int | None = None, time_step: int | None = -1) -> Array:
    """The top-down prior of EB-R: a one-hot on the class at one time step (Algorithm 3, step 1).

    Args:
      logits: [batch, time, num_classes].
      targets: the class per clip: ``None`` for the class predicted at ``time_step`` (at the last step when
        ``time_step`` is None), an ``int`` for all clips, or int [batch].
      time_step: the step ``n`` that gets the one-hot (negative counts from the end; -1, the last step, is the
        authors' demo default ``propLastFrameOnly``), or None for every step, each with weight ``1 / time``.

    Returns:
      [batch, time, num_classes] in the logits' dtype, summing to 1 per clip.

    Raises:
      ValueError: logits not rank 3, ``time_step`` out of range, bad targets.
      TypeError: non-integer targets or ``time_step``.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, time, num_classes]; got shape {tuple(logits.shape)}")
    batch, time, num_classes = logits.shape
    step = _resolve_step(time_step, time)
    classes = resolve_targets(targets, logits[:, time - 1 if step is None else step])
    one_hot = target_one_hot(classes, num_classes, dtype=logits.dtype)  # [batch, classes]; NaN row: bad target
    if step is None:
        return jnp.broadcast_to(one_hot[:, None] / time, logits.shape)
    at_step = (jnp.arange(time) == step).astype(logits.dtype)
    return at_step[None, :, None] * one_hot[:, None, :]


def temporal_normalization(signal: Array) -> Array:
    """Eq. 7.5 / 7.6: the signal divided by its sum over all time steps and units, per clip.

    Args:
      signal: [batch, time, ...] float (the EB-R signal at the CNN/RNN boundary).

    Returns:
      float32, same shape, each clip summing to 1 (all zeros where a clip's sum is 0: no signal reached it).
    """
    signal = signal.astype(jnp.float32)
    total = jnp.sum(signal.reshape(signal.shape[0], -1), axis=1).reshape((-1,) + (1,) * (signal.ndim - 1))
    nonzero = total != 0
    return jnp.where(nonzero, signal / jnp.where(nonzero, total, 1.0), 0.0)


def _boundary_pass(model: ClipLayerModel, clips: Array, boundary_zeros: Array, layer_zeros: Array,
                   contrastive: bool, cell_rule: CellRule):
    """``(logits, pullback)``: EB from the logits back through the RNN to the boundary perturbation."""
    fn = with_excitation_rules(lambda x, pb: model.fn(x, layer_zeros, pb)[0], probe_argnums=1,
                               contrastive=contrastive, cell_rule=cell_rule)
    return jax.vjp(lambda pb: fn(clips, pb), boundary_zeros)


def _excite_recurrent(model: ClipLayerModel, clips: Array, targets, time_step, prior, contrastive: bool,
                      cell_rule: CellRule, normalize: bool) -> RecurrentEBResult:
    if not isinstance(model, ClipLayerModel):
        raise TypeError(f"model must be a ClipLayerModel (from linen_clip_layers or split_clip_model); got "
                        f"{type(model).__name__}")
    if cell_rule not in CELL_RULES:
        raise ValueError(f"cell_rule must be one of {CELL_RULES}; got {cell_rule!r}")
    _check_clips(clips)
    batch, time = clips.shape[:2]
    layer_shape, boundary_shape = model.shapes(clips)
    frames_first = (batch * time,)
    if layer_shape.shape[:1] != frames_first and layer_shape.shape[:2] != (batch, time):
        raise ValueError(f"layer {model.layer!r} must give activations for every frame, [batch * time, ...] = "
                         f"[{batch * time}, ...]; got shape {tuple(layer_shape.shape)}")
    if boundary_shape.shape[:1] != frames_first and boundary_shape.shape[:2] != (batch, time):
        raise ValueError(f"boundary {model.boundary!r} must give features for every frame, [batch * time, ...]; "
                         f"got shape {tuple(boundary_shape.shape)}")
    spatial = layer_shape.shape[1:] if layer_shape.shape[:1] == frames_first else layer_shape.shape[2:]
    if len(spatial) != 3:
        raise ValueError(f"EB-R maps need spatial activations [h, w, channels] per frame at layer {model.layer!r}; "
                         f"got shape {tuple(layer_shape.shape)}")
    layer_zeros = jnp.zeros(layer_shape.shape, layer_shape.dtype)
    boundary_zeros = jnp.zeros(boundary_shape.shape, boundary_shape.dtype)

    # 1. RNN backward (Eq. 7.1, 7.3), from the one-hot prior at the time step.
    logits, pullback = _boundary_pass(model, clips, boundary_zeros, layer_zeros, False, cell_rule)
    _check_logits(logits, batch, time)
    if prior is None:
        prior = clip_prior(logits, targets, time_step)
    else:
        if targets is not None:
            raise ValueError("give either targets (a one-hot prior at time_step) or prior, not both")
        prior = jnp.asarray(prior)
        if prior.shape != logits.shape:
            raise ValueError(f"prior must have the logits' shape [batch, time, num_classes] = "
                             f"{tuple(logits.shape)}; got {tuple(prior.shape)}")
        if not jnp.issubdtype(prior.dtype, jnp.floating):
            raise TypeError(f"prior must be float; got dtype {prior.dtype}")
        prior = prior.astype(logits.dtype)
    (signal,) = pullback(prior)
    signal = signal.reshape(batch, time, -1)
    # 2. Temporal normalisation (Eq. 7.5) and, for cEB-R, the dual units' pass and the subtraction (Eq. 7.6-7.7).
    normal = temporal_normalization(signal) if normalize else signal.astype(jnp.float32)
    if contrastive:
        _, contrast_pullback = _boundary_pass(model, clips, boundary_zeros, layer_zeros, True, cell_rule)
        (contrast,) = contrast_pullback(prior)
        dual = signal - contrast.reshape(batch, time, -1)  # rules are linear: P - (P - Pbar) = Pbar
        boundary = normal - (temporal_normalization(dual) if normalize else dual.astype(jnp.float32))
    else:
        boundary = normal
    # 3. CNN backward (Eq. 7.8-7.9) of every frame from the boundary signal to the layer.
    cnn = with_excitation_rules(lambda x, pl: model.fn(x, pl, boundary_zeros)[2], probe_argnums=1,
                                cell_rule=cell_rule)
    _, cnn_pullback = jax.vjp(lambda pl: cnn(clips, pl), layer_zeros)
    (probability,) = cnn_pullback(boundary.reshape(boundary_shape.shape).astype(boundary_shape.dtype))
    probability = probability.reshape(batch, time, *spatial).astype(jnp.float32)
    maps = jnp.sum(probability, axis=-1)
    return RecurrentEBResult(boundary=boundary, probability=probability, saliency=maps,
                             frame_sums=jnp.sum(maps, axis=(2, 3)))


def recurrent_excitation_backprop(
    model: ClipLayerModel,
    clips: Array,
    targets: Array | int | None = None,
    *,
    time_step: int | None = -1,
    prior: Array | None = None,
    cell_rule: CellRule = "gradient",
    normalize: bool = True,
) -> RecurrentEBResult:
    """EB-R: Excitation Backprop through time, per-frame maps for a batch of clips (Bargal 2019, Sec. 7.1).

    A one-hot prior on the class at ``time_step`` is propagated by EB through the classifier and the unrolled RNN
    to the CNN/RNN boundary (Eq. 7.1, 7.3), normalised over all time steps and units (Eq. 7.5), then propagated by
    EB down the CNN of every frame to the layer (Eq. 7.8-7.9 with ``P_N`` in place of ``Map``).

    Args:
      model: the clip model split at the map layer and the boundary (:func:`linen_clip_layers`,
        :func:`split_clip_model`), in inference mode, returning logits [batch, time, num_classes].
      clips: [batch, time, height, width, channels] float32 in [0, 1].
      targets: the class per clip: ``None`` for the class predicted at ``time_step``, an ``int`` for all clips, or
        int [batch] (e.g. the ground-truth labels). Must be None when ``prior`` is given.
      time_step: the step of the one-hot (-1: the last, the authors' default), or None for every step.
      prior: optional [batch, time, num_classes] float top-down distribution instead of the one-hot.
      cell_rule: ``"gradient"`` (default: the authors' released Caffe ``LSTMUnit``, whose EB backward is the
        gradient of the ReLU-LSTM unit; the thesis's Tables 7.1 / 7.2 were made with it) or ``"excitation"`` (EB read
        literally, the gates as constant weights: the signal stays a distribution); see
        :mod:`saliency_jax.saliency._eb_rules`.
      normalize: apply the temporal normalisation (Eq. 7.5); False keeps the raw ``P^t``.

    Returns:
      :class:`RecurrentEBResult` (boundary [batch, time, units], probability [batch, time, h, w, channels],
      saliency [batch, time, h, w], frame_sums [batch, time]). With ``normalize`` every clip's ``boundary`` sums to
      1, and so do its maps over all frames when EB loses no signal in the CNN (no zero denominators).

    Raises:
      ValueError: bad clip rank, layer or boundary shapes, time step, targets or prior; unknown ``cell_rule``.
      TypeError: non-float clips or prior, non-integer targets, model not a ClipLayerModel.
      UnsupportedOperationError: the signal reaches an operation without an EB rule (e.g. ``tanh`` in a standard
        LSTM cell; use :class:`saliency_jax.models.ReLULSTMCell`), named in the message.
    """
    return _excite_recurrent(model, clips, targets, time_step, prior, False, cell_rule, normalize)


def contrastive_recurrent_excitation_backprop(
    model: ClipLayerModel,
    clips: Array,
    targets: Array | int | None = None,
    *,
    time_step: int | None = -1,
    prior: Array | None = None,
    cell_rule: CellRule = "gradient",
    normalize: bool = True,
) -> RecurrentEBResult:
    """cEB-R: contrastive EB-R, per-frame maps for a batch of clips (Bargal 2019, Eq. 7.1-7.9, Algorithm 3).

    EB-R from the class's output units and, separately, from their dual units (the classifier's weights negated,
    Eq. 7.2, 7.4), each normalised over time and units at the CNN/RNN boundary (Eq. 7.5-7.6), subtracted there
    (``Map^t = P_N^t - Pbar_N^t``, Eq. 7.7) and propagated by EB down the CNN of every frame to the layer
    (Eq. 7.8-7.9). Frames with evidence unique to the class get positive sums, frames of another class negative
    ones (Fig. 7.6), which is what :func:`temporal_localization` uses. The classifier is the last dense/conv
    operation of the model (the authors' ``fc8-final``).

    Args:
      model, clips, targets, time_step, prior, cell_rule, normalize: as :func:`recurrent_excitation_backprop`.

    Returns:
      :class:`RecurrentEBResult`; ``boundary`` sums to 0 per clip (with ``normalize``), ``saliency`` is signed.

    Raises:
      As :func:`recurrent_excitation_backprop`, and ValueError if the model has no classifier above the boundary.
    """
    return _excite_recurrent(model, clips, targets, time_step, prior, True, cell_rule, normalize)


# ---------------------------------------------------------------------------------------------------------------
# BP-R.


def recurrent_gradient(
    logits_fn: Callable[[Array], Array],
    clips: Array,
    targets: Array | int | None = None,
    *,
    time_step: int | None = -1,
    reduction: Reduction = "max_abs",
) -> RecurrentMaps:
    """BP-R: the gradient of the class's logit at ``time_step`` with respect to every frame, through time.

    The baseline of Bargal 2019, Table 7.1 (gradient backprop, Simonyan et al. 2014, extended in time): one
    ``jax.grad`` of ``sum_b logits[b, n, c_b]`` (examples do not interact in inference mode), reduced over the
    colour channels as Simonyan et al. (``"max_abs"``: ``max_c |d S / d I|``).

    Args:
      logits_fn: clips [batch, time, height, width, channels] -> logits [batch, time, num_classes], in inference
        mode (e.g. ``functools.partial(module.apply, variables)``, or a :class:`ClipLayerModel`).
      clips: [batch, time, height, width, channels] float32.
      targets: ``None`` (class predicted at ``time_step``), ``int`` or int [batch].
      time_step: the step of the explained logit (-1: last), or None for the mean over all steps.
      reduction: ``"max_abs"`` (default), ``"abs_sum"`` or ``"sum"`` (signed) over channels.

    Returns:
      :class:`RecurrentMaps`: saliency [batch, time, height, width] float32 and frame_sums [batch, time].

    Raises:
      ValueError: bad clip rank, logits shape, time step, targets or reduction.
      TypeError: non-float clips, non-integer targets.
    """
    _check_clips(clips)
    if reduction not in ("max_abs", "abs_sum", "sum"):
        raise ValueError(f"reduction must be 'max_abs', 'abs_sum' or 'sum'; got {reduction!r}")
    batch, time = clips.shape[:2]

    def score(x):
        logits = logits_fn(x)
        _check_logits(logits, batch, time)
        prior = clip_prior(jax.lax.stop_gradient(logits), targets, time_step)
        return jnp.sum(logits * prior)

    gradient = jax.grad(score)(clips).astype(jnp.float32)
    if reduction == "max_abs":
        maps = jnp.max(jnp.abs(gradient), axis=-1)
    elif reduction == "abs_sum":
        maps = jnp.sum(jnp.abs(gradient), axis=-1)
    else:
        maps = jnp.sum(gradient, axis=-1)
    return RecurrentMaps(saliency=maps, frame_sums=jnp.sum(maps, axis=(2, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Temporal localisation (Sec. 7.2, 7.4.2).


def _check_sums(frame_sums: Array) -> Array:
    frame_sums = jnp.asarray(frame_sums)
    if frame_sums.ndim != 2 or frame_sums.shape[1] == 0:
        raise ValueError(f"frame_sums must be [batch, time] with time >= 1; got shape {tuple(frame_sums.shape)}")
    if not jnp.issubdtype(frame_sums.dtype, jnp.floating):
        raise TypeError(f"frame_sums must be float; got dtype {frame_sums.dtype}")
    return frame_sums


def temporal_localization(frame_sums: Array) -> Array:
    """The grounded segment of unknown length (Bargal 2019, Sec. 7.2).

    The anchor is the frame with the highest map sum (the first one on ties); the window extends from it in both
    directions, greedily, up to (not including) the first frame with a negative sum on each side, or the clip's
    ends. (With non-negative scores, e.g. EB-R, the window is the whole clip: the thesis reports this variant for
    thresholded probabilities and cEB-R only.)

    Args:
      frame_sums: [batch, time] float, e.g. :attr:`RecurrentEBResult.frame_sums` of cEB-R, or per-step
        probabilities thresholded to +-1.

    Returns:
      int32 [batch, 2]: ``(start, end)`` of each segment, frames ``start <= t < end``.

    Raises:
      ValueError: ``frame_sums`` not [batch, time]. TypeError: not float.

    Example:
      >>> temporal_localization(jnp.array([[-1.0, 0.5, 2.0, 0.0, -0.1, 3.0]]))
      Array([[5, 6]], dtype=int32)
    """
    frame_sums = _check_sums(frame_sums)
    time = frame_sums.shape[1]
    t = jnp.arange(time)
    anchor = jnp.argmax(frame_sums, axis=1)[:, None]
    negative = frame_sums < 0
    start = jnp.max(jnp.where(negative & (t < anchor), t + 1, 0), axis=1)
    end = jnp.min(jnp.where(negative & (t > anchor), t, time), axis=1)
    return jnp.stack([start, end], axis=1).astype(jnp.int32)


def temporal_localization_known_length(frame_sums: Array, length: Array | int) -> Array:
    """The grounded segment of known length: the window with the highest sum (Bargal 2019, Sec. 7.4.2).

    Args:
      frame_sums: [batch, time] float.
      length: the segment length in frames, ``1 <= length <= time``: an int for all clips or int [batch].

    Returns:
      int32 [batch, 2]: ``(start, start + length)``; the first such window on ties.

    Raises:
      ValueError: bad shapes, or a static ``length`` out of range (a traced one is clipped to [1, time]).
      TypeError: non-float sums or non-integer length.

    Example:
      >>> temporal_localization_known_length(jnp.array([[0.0, 1.0, -2.0, 2.0, 2.0, 0.5]]), 2)
      Array([[3, 5]], dtype=int32)
    """
    frame_sums = _check_sums(frame_sums)
    batch, time = frame_sums.shape
    if isinstance(length, int) and not isinstance(length, bool):
        if not 1 <= length <= time:
            raise ValueError(f"length must be in [1, {time}]; got {length}")
    length = jnp.asarray(length)
    if not jnp.issubdtype(length.dtype, jnp.integer):
        raise TypeError(f"length must be an integer number of frames; got dtype {length.dtype}")
    if length.ndim not in (0, 1) or (length.ndim == 1 and length.shape[0] != batch):
        raise ValueError(f"length must be an int or int [{batch}]; got shape {tuple(length.shape)}")
    length = jnp.clip(jnp.broadcast_to(length, (batch,)), 1, time).astype(jnp.int32)[:, None]
    cumulative = jnp.concatenate([jnp.zeros((batch, 1), jnp.float32),
                                  jnp.cumsum(frame_sums.astype(jnp.float32), axis=1)], axis=1)  # [batch, time+1]
    starts = jnp.arange(time)[None, :]
    ends = jnp.minimum(starts + length, time)
    window = jnp.take_along_axis(cumulative, ends, axis=1) - cumulative[:, :time]
    window = jnp.where(starts + length <= time, window, -jnp.inf)
    start = jnp.argmax(window, axis=1).astype(jnp.int32)
    return jnp.stack([start, start + length[:, 0]], axis=1)
