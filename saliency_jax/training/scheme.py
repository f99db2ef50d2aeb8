"""The training-scheme protocol: what a saliency-guided scheme may contribute to a train step, and how schemes chain.

A scheme is a small NamedTuple of pure functions (the optax way: :class:`optax.GradientTransformation` is two), each
optional:

* ``batch_transform(ctx, batch) -> (batch, metrics)``: a new mini-batch made with the current weights and no
  gradient through it (distraction occlusion, Morales et al. 2021);
* ``forward(ctx, batch, capture) -> Forward``: a training forward pass that replaces the model's own (Excitation
  Dropout, Bargal 2019 Ch. 5); ``capture`` names layers the loss terms read;
* ``loss(ctx, batch, forward) -> (per_example, metrics)``: an extra loss term computed inside ``loss_fn``, one value
  per example, differentiable with respect to the parameters in ``ctx.variables`` (the HNC loss, Sun et al. 2020;
  attention guidance), reading the training forward's logits and the activations of ``Scheme.layers``.

Every piece also returns scalar metrics that reach ``metrics.jsonl``. :func:`chain` composes schemes into one
(distraction + HNC in one run); the train step (:func:`saliency_jax.train.make_train_step`) takes one scheme and
knows none by name. Schemes are built from a config through :func:`build_scheme` and the registry
:data:`TRAINING_SCHEMES` (a :class:`saliency_jax.registry.Registry`) that the scheme modules fill with
:func:`register_scheme`; each scheme's settings are a frozen dataclass deriving from
:class:`SchemeSettings`, whose :meth:`SchemeSettings.from_mapping` rejects unknown fields.

Config idiom (``experiments/configs/``): ``config.schemes`` lists the schemes of a run in chain order (``()`` = plain
training); the settings of scheme ``name`` are the section ``config.<name>`` (made with :func:`settings_section`,
which holds every field at its default so that each can be overridden from the command line). The layers a scheme
reads come from ``config.model`` (``grad_cam_layer``, ``classifier``; defaults per architecture in
:data:`saliency_jax.models.GRAD_CAM_LAYER` and :data:`saliency_jax.models.CLASSIFIER`, the metadata of
:data:`saliency_jax.models.MODELS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from saliency_jax.config import Settings
from saliency_jax.models.trainable import ModelLayers, TrainableModel
from saliency_jax.registry import TRAINING_SCHEMES, name_list

Array = jax.Array
Batch = dict[str, Array]
Metrics = dict[str, Array]

__all__ = [
    "StepContext",
    "Forward",
    "Scheme",
    "SchemeSettings",
    "ModelLayers",
    "chain",
    "model_forward",
    "TRAINING_SCHEMES",
    "register_scheme",
    "build_scheme",
    "scheme_settings",
    "scheme_names",
    "scheme_list",
    "settings_section",
    "CLASSIFICATION_LOSSES",
    "classification_accuracy",
    "classification_loss",
]


class StepContext(NamedTuple):
    """What every piece of a scheme sees.

    Attributes:
      model: the :class:`~saliency_jax.models.trainable.TrainableModel` (a linen or NNX module as pure functions:
        ``model.forward`` is the training forward, ``model.layer_model(variables, layer)`` the network split at a
        layer for maps, ``model.apply`` inference). Every layer a scheme reads goes through it, so its ``outputs``
        selection, token ``reshape`` and bound ``axis_name`` apply.
      variables: ``{"params", "batch_stats"}``, the step's current weights. In ``forward`` and ``loss`` the params
        are the ones ``jax.grad`` differentiates (use them to make a loss term differentiable); in
        ``batch_transform`` they are constants.
      step: int32 scalar, the number of updates done before this step.
      key: this piece's PRNG key (derived from the run's seed and the step; see
        :func:`saliency_jax.training.make_train_step`).
      state: the scheme's own state (``Scheme.init`` / ``Scheme.update``; in a chain, each scheme sees its own);
        ``None`` for stateless schemes.
    """

    model: TrainableModel
    variables: Any
    step: Array
    key: Array
    state: Any = None


class Forward(NamedTuple):
    """The training forward pass's outputs.

    Attributes:
      logits: [batch, num_classes] float32.
      updates: the updated mutable collections (``{"batch_stats": ...}``; ``{}`` without BatchNorm).
      activations: ``{path: array}``, the activations of the layers the loss terms asked for (``Scheme.layers``),
        from this same pass (train mode), differentiable with respect to the parameters.
      metrics: scalar diagnostics of the forward (e.g. the fraction of units a dropout scheme kept).
    """

    logits: Array
    updates: Any
    activations: dict[str, Array]
    metrics: Metrics


BatchTransform = Callable[[StepContext, Batch], tuple[Batch, Metrics]]
ForwardFn = Callable[[StepContext, Batch, Sequence[str]], Forward]
LossTerm = Callable[[StepContext, Batch, Forward], tuple[Array, Metrics]]


class Scheme(NamedTuple):
    """A saliency-guided training scheme: up to three pure pieces (module docstring) and the layers its loss reads.

    ``Scheme()`` is plain training. Build composite schemes with :func:`chain`.

    Attributes:
      batch_transform: ``(ctx, batch) -> (batch, metrics)`` or None.
      forward: ``(ctx, batch, capture) -> Forward`` or None (the model's own train-mode forward,
        :func:`model_forward`).
      loss: ``(ctx, batch, forward) -> (per_example [batch] float32, metrics)`` or None; the train step adds its
        batch mean to the classification loss.
      layers: paths of the layers whose training-forward activations ``loss`` reads (``Forward.activations``).
      init: ``variables -> state`` or None: the scheme's state at step 0 (optax's ``init``), for a scheme that keeps
        something across steps (a curriculum, an adaptive weight, a running average of maps). It lives in the train
        state (``TrainState.scheme_state``) and its checkpoint; every piece reads it as ``ctx.state``.
      update: ``(ctx, forward, metrics) -> state`` or None: the next state after the step's update, from the training
        forward (``Forward``, gradients stopped, with the ``layers`` activations) and the step's metrics; ``ctx.state``
        is the current state. A step whose update is skipped (non-finite loss) keeps the old state.
      maps: paths of the layers whose spatial maps the scheme reads (Grad-CAM, CAM). Validation
        (:func:`saliency_jax.training.check_model`) refuses a layer whose grid is smaller than 2x2, on which every
        map is constant and the scheme would silently do nothing; a scheme reading maps also reports the fraction of
        degenerate maps per step (a metric whose name ends in ``degenerate_maps``,
        :func:`~saliency_jax.saliency.degenerate_maps`), which the train loop watches.
    """

    batch_transform: BatchTransform | None = None
    forward: ForwardFn | None = None
    loss: LossTerm | None = None
    layers: tuple[str, ...] = ()
    init: Callable[[Any], Any] | None = None
    update: Callable[[StepContext, Forward, Metrics], Any] | None = None
    maps: tuple[str, ...] = ()


def _merge_metrics(into: dict, metrics: Mapping[str, Array], where: str) -> None:
    for name, value in metrics.items():
        if name in into:
            raise ValueError(f"two pieces of a chained scheme report the metric {name!r} ({where}); rename one")
        into[name] = value


def _keys(key: Array, n: int) -> list[Array]:
    """One key for each of ``n`` pieces: the key itself for one piece (so a lone scheme sees the step's key)."""
    return [key] if n == 1 else list(jax.random.split(key, n))


def chain(*schemes: Scheme) -> Scheme:
    """Composes schemes into one (optax's ``chain`` for training schemes).

    Batch transforms run in order, each on the previous one's output; at most one scheme may replace the forward;
    loss terms are summed per example; metrics are merged (a name reported twice raises when the step is traced);
    layers are united. With several batch transforms (or loss terms) each gets its own key, split from the step's;
    a single one gets the step's key unchanged.

    Args:
      *schemes: :class:`Scheme` instances (``Scheme()`` entries are skipped).

    Returns:
      A :class:`Scheme`.

    Raises:
      ValueError: if more than one scheme contributes a forward pass.
    """
    schemes = tuple(s for s in schemes if s != Scheme())
    if len(schemes) == 1:
        return schemes[0]
    if any(s.init is not None for s in schemes):
        schemes = _own_states(schemes)
    transforms = [s.batch_transform for s in schemes if s.batch_transform is not None]
    forwards = [s.forward for s in schemes if s.forward is not None]
    losses = [s.loss for s in schemes if s.loss is not None]
    if len(forwards) > 1:
        raise ValueError(f"{len(forwards)} chained schemes replace the training forward pass; at most one may")
    layers = tuple(dict.fromkeys(layer for s in schemes for layer in s.layers))
    maps = tuple(dict.fromkeys(layer for s in schemes for layer in s.maps))

    batch_transform = None
    if len(transforms) == 1:
        batch_transform = transforms[0]
    elif transforms:
        def batch_transform(ctx, batch):
            metrics: dict = {}
            for fn, key in zip(transforms, _keys(ctx.key, len(transforms))):
                batch, m = fn(ctx._replace(key=key), batch)
                _merge_metrics(metrics, m, "batch transforms")
            return batch, metrics

    loss = None
    if len(losses) == 1:
        loss = losses[0]
    elif losses:
        def loss(ctx, batch, forward):
            total, metrics = 0.0, {}
            for fn, key in zip(losses, _keys(ctx.key, len(losses))):
                term, m = fn(ctx._replace(key=key), batch, forward)
                total = total + term
                _merge_metrics(metrics, m, "loss terms")
            return total, metrics

    stateful = [(i, s) for i, s in enumerate(schemes) if s.init is not None]
    init = update = None
    if stateful:
        def init(variables):
            return {str(i): s.init(variables) for i, s in stateful}

        def update(ctx, forward, metrics):
            return {str(i): (s.update(ctx._replace(state=ctx.state[str(i)]), forward, metrics)
                             if s.update is not None else ctx.state[str(i)]) for i, s in stateful}

    return Scheme(batch_transform, forwards[0] if forwards else None, loss, layers, init, update, maps)


def _own_states(schemes: Sequence[Scheme]) -> tuple[Scheme, ...]:
    """Each scheme's pieces with ``ctx.state`` narrowed to that scheme's entry of the chain's state
    (``{str(position): state}``)."""

    def narrow(fn, i):
        if fn is None:
            return None
        return lambda ctx, *args: fn(ctx._replace(state=ctx.state[str(i)] if ctx.state else None), *args)

    return tuple(s._replace(batch_transform=narrow(s.batch_transform, i), forward=narrow(s.forward, i),
                            loss=narrow(s.loss, i)) if s.init is not None else s for i, s in enumerate(schemes))


def model_forward(ctx: StepContext, batch: Batch, capture: Sequence[str] = ()) -> Forward:
    """The model's own training forward (:meth:`~saliency_jax.models.trainable.TrainableModel.forward`: a linen
    module's ``apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": ctx.key})``, an NNX
    module's copy in ``.train()`` mode), reading the layers in ``capture`` from the same pass.

    Args:
      ctx: the step context (``ctx.key`` feeds the model's dropout).
      batch: ``{"image": [batch, height, width, channels] float32, "label": ...}``.
      capture: layer paths (a reshaped layer, e.g. a transformer's tokens, comes as its grid).

    Returns:
      :class:`Forward` (no metrics).
    """
    out = ctx.model.forward(ctx.variables, batch["image"], rng=ctx.key, capture=capture)
    return Forward(out.logits, out.updates, out.activations, {})


# ---------------------------------------------------------------------------------------------------------------
# Classification losses.


def _per_step_labels(logits: Array, labels: Array) -> Array:
    """``labels`` [batch, ...] with the logits' step axes (those between batch and classes) inserted after the batch
    axis, of size 1 (none for image classifiers)."""
    return labels.reshape(labels.shape[:1] + (1,) * (logits.ndim - 2) + labels.shape[1:])


def _mean_over_steps(values: Array) -> Array:
    """[batch, *steps] -> [batch]: the mean over the step axes (none for image classifiers)."""
    return jnp.mean(values.reshape(values.shape[0], -1), axis=1)


def _softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    if labels.ndim != 1 or logits.ndim < 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"softmax cross-entropy needs logits [batch, (time,) classes] and integer labels [batch]; "
                         f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)} (use "
                         "loss='sigmoid_binary_cross_entropy' for multi-label targets)")
    labels = jnp.broadcast_to(_per_step_labels(logits, labels), logits.shape[:-1])
    return _mean_over_steps(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _sigmoid_binary_cross_entropy(logits: Array, labels: Array) -> Array:
    if labels.ndim != 2 or labels.shape[0] != logits.shape[0] or labels.shape[-1] != logits.shape[-1]:
        raise ValueError(f"sigmoid binary cross-entropy needs multi-hot labels [batch, {logits.shape[-1]}] in "
                         f"{{0, 1}}; got shape {labels.shape} for logits {tuple(logits.shape)}")
    labels = jnp.broadcast_to(_per_step_labels(logits, labels), logits.shape).astype(logits.dtype)
    return _mean_over_steps(optax.sigmoid_binary_cross_entropy(logits, labels))


#: Per-example classification losses by name: ``fn(logits [batch, (time,) classes], labels) -> [batch]``.
CLASSIFICATION_LOSSES: dict[str, Callable[[Array, Array], Array]] = {
    "softmax_cross_entropy": _softmax_cross_entropy,          # labels int [batch]
    "sigmoid_binary_cross_entropy": _sigmoid_binary_cross_entropy,  # labels multi-hot [batch, classes]; mean over classes
}


def classification_loss(name: str) -> Callable[[Array, Array], Array]:
    """The per-example classification loss called ``name`` (:data:`CLASSIFICATION_LOSSES`).

    ``"softmax_cross_entropy"``: single-label, integer labels [batch]. ``"sigmoid_binary_cross_entropy"``:
    multi-label attributes, multi-hot labels [batch, num_classes] in {0, 1}; the mean over the classes of each
    example's binary cross-entropies.

    Sequence classifiers (logits at every time step, ``[batch, time, num_classes]``, e.g.
    :class:`saliency_jax.models.CNNLSTM`) take the same per-clip labels: the loss is taken at every step and averaged
    over the steps (LRCN, Donahue et al. 2015; Bargal 2019, Sec. 7.2: a classifier at every LSTM step).

    Raises:
      ValueError: on an unknown name; (when called) on labels of the wrong shape.
    """
    if name not in CLASSIFICATION_LOSSES:
        raise ValueError(f"unknown classification loss {name!r}; choose from {sorted(CLASSIFICATION_LOSSES)}")
    return CLASSIFICATION_LOSSES[name]


def classification_accuracy(name: str, logits: Array, labels: Array) -> Array:
    """Per-example accuracy of logits for the loss called ``name`` (the train step's ``accuracy`` metric).

    Args:
      name: a key of :data:`CLASSIFICATION_LOSSES`.
      logits: [batch, num_classes], or [batch, time, num_classes] for a sequence classifier.
      labels: int [batch] (``"softmax_cross_entropy"``) or multi-hot [batch, num_classes]
        (``"sigmoid_binary_cross_entropy"``).

    Returns:
      float32 [batch]: single-label, whether the argmax is the label (the fraction of steps where it is, for
      sequences); multi-label, the fraction of correct attribute decisions at logit 0 (and steps).

    Raises:
      ValueError: on an unknown name.
    """
    classification_loss(name)
    if name == "sigmoid_binary_cross_entropy":
        correct = (logits > 0) == (_per_step_labels(logits, labels) > 0.5)
    else:
        correct = jnp.argmax(logits, -1) == _per_step_labels(logits, labels)
    return _mean_over_steps(correct.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------------------------
# Settings and the registry.


class SchemeSettings(Settings):
    """Base of a scheme's frozen settings dataclass: :meth:`~saliency_jax.config.Settings.from_mapping` builds it
    from the config section, rejecting unknown fields."""


#: The training schemes by name: value ``builder(settings, layers) -> Scheme``, metadata ``settings`` (the scheme's
#: :class:`SchemeSettings` dataclass). Filled by :func:`register_scheme`.
# (TRAINING_SCHEMES is the shared instance of :mod:`saliency_jax.registry`.)


def register_scheme(name: str, settings: type):
    """Decorator registering ``builder(settings, layers) -> Scheme`` under ``name`` (in :data:`TRAINING_SCHEMES`).

    ``settings`` is the scheme's settings dataclass (a :class:`SchemeSettings`); ``config.<name>`` holds its fields.

    Raises:
      TypeError: if ``settings`` is not a :class:`SchemeSettings` dataclass.
      ValueError: if another builder is registered under ``name``.
    """
    if not (dataclasses.is_dataclass(settings) and issubclass(settings, SchemeSettings)):
        raise TypeError(f"settings of scheme {name!r} must be a SchemeSettings dataclass; got {settings}")
    return TRAINING_SCHEMES.register(name, settings=settings)


def scheme_names() -> tuple[str, ...]:
    """The registered scheme names."""
    return TRAINING_SCHEMES.names()


def settings_section(name: str, **overrides) -> ml_collections.ConfigDict:
    """A config section holding every setting of scheme ``name`` at its default, with ``overrides`` applied.

    Raises:
      ValueError: unknown scheme or field.
    """
    return TRAINING_SCHEMES.metadata(name)["settings"].section(**overrides)


def scheme_list(value: Any) -> tuple[str, ...]:
    """``config.schemes`` as a tuple of names (a tuple/list, or a comma-separated string from the command line)."""
    return name_list(value)


def scheme_settings(config: ml_collections.ConfigDict, name: str):
    """The settings dataclass of scheme ``name`` from ``config.<name>``.

    Raises:
      ValueError: unknown scheme, missing section, unknown field or bad settings (naming the section).
    """
    cls = TRAINING_SCHEMES.metadata(name)["settings"]
    if name not in config:
        raise ValueError(f"config.schemes lists {name!r} but the config has no section config.{name} (add "
                         f"saliency_jax.training.settings_section({name!r}))")
    try:
        return cls.from_mapping(config[name])
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{name}: {e}") from e


def build_scheme(config: ml_collections.ConfigDict, layers: ModelLayers) -> Scheme:
    """The chained scheme of a config: ``chain`` of each scheme in ``config.schemes``, settings from its section.

    Args:
      config: a run config with ``schemes`` and a section per listed scheme.
      layers: the model's layers (from ``config.model``, see :func:`saliency_jax.train.model_layers`).

    Returns:
      A :class:`Scheme` (``Scheme()`` when no scheme is listed).

    Raises:
      ValueError: an unknown scheme name, a missing section, an unknown field in a section, bad settings, or two
        schemes replacing the forward pass.
    """
    names = scheme_list(config.get("schemes"))
    if len(set(names)) != len(names):
        raise ValueError(f"config.schemes lists a scheme twice: {names}")
    return chain(*[TRAINING_SCHEMES.get(name)(scheme_settings(config, name), layers) for name in names])
