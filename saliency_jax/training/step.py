"""The supervised update step of a training scheme, its state and its optimizer.

:func:`make_train_step` turns a model, an optax optimizer and a :class:`~saliency_jax.training.scheme.Scheme` into the
pure ``(state, batch, key) -> (state, metrics)`` that the train loop (:mod:`saliency_jax.train`) jits over the device
mesh; :class:`TrainState` is what it updates (parameters, BatchNorm statistics, optimizer state and the scheme's own
state, in optax's manner: ``Scheme.init`` / ``Scheme.update``). Nothing here knows a loop, a workdir or a scheme by
name.
"""

from __future__ import annotations

import fnmatch

import functools
import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import checkify

from saliency_jax.config import ConfigError
from saliency_jax.models.trainable import as_trainable
from saliency_jax.training import scheme as scheme_lib
from saliency_jax.training.scheme import Scheme, StepContext

Array = jax.Array

__all__ = ["TrainState", "make_optimizer", "init_state", "make_train_step", "check_model"]


@flax.struct.dataclass
class TrainState:
    """Everything a step updates: a pytree, replicated over the mesh.

    Attributes:
      step: int32 scalar, number of updates done.
      params: the model's ``params`` collection.
      batch_stats: the model's ``batch_stats`` collection (empty dict for models without BatchNorm).
      opt_state: the optax optimizer state.
      scheme_state: the training scheme's state (``Scheme.init``; ``{}`` for stateless schemes, which all the
        shipped ones are), checkpointed with the rest.
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    scheme_state: Any = flax.struct.field(default_factory=dict)

    def variables(self) -> dict[str, Any]:
        """The ``{"params", "batch_stats"}`` dict that ``module.apply`` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax optimizer of ``config.optimizer``.

    ``name``: ``"adam"`` (paper default of Morales et al.: lr 5e-5, b1 0.9, b2 0.999, eps 7e-7) or ``"sgd"``
    (``momentum``). ``weight_decay`` adds L2 decay of every parameter, biases included
    (``optax.add_decayed_weights``); ``lr_boundaries`` and ``lr_scales`` give a piecewise-constant schedule (e.g. x0.1
    after 25k steps). ``lr_multipliers``: ``((pattern, multiplier), ...)``, Caffe's per-parameter ``lr_mult``: a
    parameter whose path (``"fc3/kernel"``, module names joined by ``/``) matches a ``fnmatch`` pattern has its update
    multiplied (the first matching pattern wins; others x1). With SGD and a constant learning rate this is Caffe's
    update exactly (``m = mu m + lr mult (g + wd w)``, ``w -= m``); after a learning-rate step Caffe's momentum keeps
    the old rate's contributions where optax's trace is rescaled at once.

    Raises:
      ValueError: on an unknown optimizer name, or an ``lr_multipliers`` entry that is not ``(pattern, number)``.
    """
    opt = config.optimizer
    lr = opt.learning_rate
    boundaries = list(opt.get("lr_boundaries") or [])
    if boundaries:
        scales = list(opt.get("lr_scales") or [0.1] * len(boundaries))
        lr = optax.piecewise_constant_schedule(lr, dict(zip(boundaries, scales)))
    if opt.name == "adam":
        tx = optax.adam(lr, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8))
    elif opt.name == "sgd":
        tx = optax.sgd(lr, momentum=opt.get("momentum", 0.9) or None)
    else:
        raise ValueError(f"unknown optimizer {opt.name!r}; choose 'adam' or 'sgd'")
    if opt.get("weight_decay", 0.0):
        tx = optax.chain(optax.add_decayed_weights(opt.weight_decay), tx)
    multipliers = _lr_multipliers(opt.get("lr_multipliers") or ())
    if multipliers:
        tx = optax.chain(tx, _scale_by_pattern(multipliers))
    return tx


def _lr_multipliers(entries: Any) -> tuple[tuple[str, float], ...]:
    out = []
    for entry in entries:
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
                or isinstance(entry[1], bool) or not isinstance(entry[1], (int, float))):
            raise ValueError(f"optimizer.lr_multipliers entries must be (pattern, number) pairs, e.g. "
                             f"('fc3/kernel', 10.0); got {entry!r}")
        out.append((entry[0], float(entry[1])))
    return tuple(out)


def _scale_by_pattern(multipliers: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
    """Multiplies each parameter's update by the multiplier of the first pattern its path matches (else 1)."""

    def label(params):
        def one(path, _):
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return next((f"x{m:g}" for pattern, m in multipliers if fnmatch.fnmatchcase(name, pattern)), "x1")

        return jax.tree_util.tree_map_with_path(one, params)

    transforms = {f"x{m:g}": optax.scale(m) for _, m in multipliers} | {"x1": optax.identity()}
    return optax.multi_transform(transforms, label)


def init_state(model: Any, optimizer: optax.GradientTransformation, image_shape: tuple[int, ...],
               seed: int, variables: Any | None = None, scheme: Scheme = Scheme()) -> TrainState:
    """A fresh :class:`TrainState` (or one built around given ``variables``, e.g. imported weights).

    Args:
      model: a :class:`~saliency_jax.models.trainable.TrainableModel`, a linen module or an NNX module
        (:func:`~saliency_jax.models.trainable.as_trainable`); its ``init`` gives the variables.
      optimizer: the optax optimizer.
      image_shape: (height, width, channels) of one input ((time, height, width, channels) of a clip).
      seed: initialisation seed.
      variables: optional ``{"params", "batch_stats"}`` to start from.
      scheme: the training scheme; its ``init(variables)`` gives ``scheme_state`` (``{}`` without one).
    """
    if variables is None:
        variables = as_trainable(model).init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32))
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    scheme_state = scheme.init({"params": params, "batch_stats": batch_stats}) if scheme.init is not None else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=optimizer.init(params), scheme_state=scheme_state)


def make_train_step(model: Any, optimizer: optax.GradientTransformation, scheme: Scheme = Scheme(), *,
                    loss: str = "softmax_cross_entropy", classification_weight: float = 1.0,
                    ) -> Callable[[TrainState, dict[str, Array], Array], tuple[TrainState, dict[str, Array]]]:
    """Builds the (un-jitted) update step ``(state, batch, key) -> (state, metrics)``.

    The step: this step's key is ``fold_in(key, state.step)``, split into the batch transform's and the forward's
    keys (``k_batch, k_forward = split(key)``; the loss term's is ``fold_in(key, 1)``, the scheme update's
    ``fold_in(key, 2)``); the scheme's batch transform (if any) replaces the batch, with the current weights; inside
    ``loss_fn`` the scheme's training forward (or the model's own, train mode, BatchNorm statistics updated) gives the
    logits, the per-example classification loss ``loss`` (times ``classification_weight``) plus the scheme's loss
    term (if any) is averaged over the batch; one optimizer update; then the scheme's ``update`` (if any) gives its
    next state from the training forward and the step's metrics. Every piece sees the scheme's state as
    ``ctx.state``.

    Metrics: ``loss`` (the total), ``accuracy`` (on the batch trained on; multi-label: the fraction of correct
    attribute decisions at logit 0), ``update_skipped`` (see below), ``classification_loss`` (when the scheme adds a
    loss term) and every metric of the scheme's pieces.

    Guard: the step never writes NaN into the state. When the batch has a label outside ``[0, num_classes)`` (multi-
    label: not 0/1), a NaN / inf pixel, or the loss or a gradient is not finite, the parameters, BatchNorm statistics,
    optimizer state and scheme state are left unchanged (only ``step`` advances) and ``update_skipped`` is 1 (else
    0); ``loss`` then reports the non-finite value or NaN. Under ``jax.experimental.checkify``
    (``errors=checkify.user_checks``) the bad labels and pixels raise instead. The train loop checks every batch on
    the host before it reaches the step.

    Args:
      model: a :class:`~saliency_jax.models.trainable.TrainableModel` (:func:`~saliency_jax.models.trainable.linen_model`,
        :func:`~saliency_jax.models.trainable.nnx_model`), or a linen module (``apply(variables, images,
        train=...)``, dropout from rng ``"dropout"``) or NNX module taken as it is
        (:func:`~saliency_jax.models.trainable.as_trainable`). The step and every scheme reach the model through it.
      optimizer: optax optimizer.
      scheme: the training scheme (:func:`saliency_jax.training.build_scheme`, :func:`saliency_jax.training.chain`);
        ``Scheme()`` is plain training.
      loss: the classification loss (:data:`saliency_jax.training.CLASSIFICATION_LOSSES`):
        ``"softmax_cross_entropy"`` (labels int [batch]) or ``"sigmoid_binary_cross_entropy"`` (multi-hot labels
        [batch, num_classes]).
      classification_weight: the classification loss's weight in the total (``w_a`` of attention guidance: total =
        ``w_a * CE + w_g * loss_g``); 1 for the usual ``CE + scheme terms``.

    Raises:
      ValueError: on an unknown loss; (when traced) if two pieces report the same metric, the batch has 0 examples,
        or multi-hot labels do not have the shape [batch, num_classes].
    """
    model = as_trainable(model)
    base_loss = scheme_lib.classification_loss(loss)
    multi_label = loss == "sigmoid_binary_cross_entropy"
    forward = scheme.forward or scheme_lib.model_forward

    def merge(into, metrics, where):
        for k, v in metrics.items():
            if k in into:
                raise ValueError(f"metric {k!r} of the {where} clashes with another metric of the step")
            into[k] = v

    def step(state: TrainState, batch: dict[str, Array], key: Array):
        if batch["image"].shape[0] == 0 or batch["label"].shape[:1] != batch["image"].shape[:1]:
            raise ValueError(f"train step: a batch needs at least one example and one label per image; got images "
                             f"{batch['image'].shape} and labels {batch['label'].shape}")
        images_ok = jnp.all(jnp.isfinite(batch["image"]))
        checkify.debug_check(images_ok, "train step: images contain NaN or inf")
        key = jax.random.fold_in(key, state.step)
        k_batch, k_forward = jax.random.split(key)
        metrics: dict[str, Array] = {}
        if scheme.batch_transform is not None:
            batch, m = scheme.batch_transform(
                StepContext(model, state.variables(), state.step, k_batch, state.scheme_state), batch)
            merge(metrics, m, "batch transform")
        labels = batch["label"]

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            fwd = forward(StepContext(model, variables, state.step, k_forward, state.scheme_state), batch,
                          scheme.layers)
            per_example = base_loss(fwd.logits, labels)
            aux = dict(fwd.metrics)
            if scheme.loss is not None:
                aux["classification_loss"] = jnp.mean(per_example)
            if classification_weight != 1.0:
                per_example = classification_weight * per_example
            if scheme.loss is not None:
                term, m = scheme.loss(StepContext(model, variables, state.step, jax.random.fold_in(key, 1),
                                                  state.scheme_state), batch, fwd)
                merge(aux, m, "loss term")
                per_example = per_example + term
            # The whole forward comes out only for a scheme that updates its state from it.
            return jnp.mean(per_example), (fwd.logits, fwd.updates, aux, fwd if scheme.update is not None else None)

        (total, (logits, updates, aux, fwd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        num_classes = logits.shape[-1]
        if multi_label:
            if labels.shape != logits.shape:
                raise ValueError(f"train step: multi-hot labels must be [batch, {num_classes}]; got {labels.shape}")
            labels_ok = jnp.all((labels == 0) | (labels == 1))
        else:
            labels_ok = jnp.all((labels >= 0) & (labels < num_classes))
        checkify.debug_check(labels_ok, f"train step: labels must lie in [0, {num_classes})")
        finite = jnp.isfinite(total) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        ok = labels_ok & images_ok & finite
        param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        accuracy = jnp.mean(scheme_lib.classification_accuracy(loss, logits, labels))  # sequences: mean over steps
        out = {"loss": jnp.where(labels_ok, total, jnp.nan), "accuracy": accuracy,
               "update_skipped": 1.0 - ok.astype(jnp.float32)}
        merge(out, aux, "forward")
        merge(out, metrics, "batch transform")
        scheme_state = state.scheme_state
        if scheme.update is not None:
            ctx = StepContext(model, state.variables(), state.step, jax.random.fold_in(key, 2), state.scheme_state)
            scheme_state = keep(scheme.update(ctx, jax.lax.stop_gradient(fwd), dict(out)), state.scheme_state)
        new_state = state.replace(
            step=state.step + 1, params=keep(optax.apply_updates(state.params, param_updates), state.params),
            batch_stats=keep(updates.get("batch_stats", state.batch_stats), state.batch_stats),
            opt_state=keep(opt_state, state.opt_state), scheme_state=scheme_state)
        return new_state, out

    return step


def check_model(model: Any, scheme: Scheme, image_shape: tuple[int, ...], *, multi_label: bool = False,
                allow_small_grid: bool = False) -> None:
    """Checks, before anything is compiled (traced with ``jax.eval_shape``, no FLOPs), that the model trains with
    the scheme: its initialisation and training forward run on a batch of two, so do the scheme's batch transform
    and training forward (distraction's Grad-CAM, Excitation Dropout's Excitation Backprop), and every layer whose
    maps the scheme reads (``Scheme.maps``) is a spatial grid of at least 2x2.

    Args:
      model: as :func:`make_train_step` takes it.
      scheme: the training scheme.
      image_shape: (height, width, channels) of one input.
      multi_label: labels are multi-hot [batch, num_classes] (else int [batch]).
      allow_small_grid: accept a map layer smaller than 2x2 (its maps are constant: distraction occludes all or
        nothing, the HNC term is constant; the schemes' ``*degenerate_maps`` metrics then read 1).

    Raises:
      ConfigError: the model's BatchNorm reduces over an axis name nothing binds (the fix: ``axis_name``); a map
        layer smaller than 2x2; a map layer that is not spatial (a transformer's tokens without
        ``num_prefix_tokens``).
      ValueError: as the model's and the scheme's own application (an unknown layer path, an output that is not
        logits, an operation Excitation Backprop has no rule for).
    """
    model = as_trainable(model)
    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    key = jax.random.key(0)
    try:
        variables = jax.eval_shape(model.init, key, images)
        num_classes = jax.eval_shape(model.apply, variables, images).shape[-1]
        labels = (jax.ShapeDtypeStruct((2, num_classes), jnp.float32) if multi_label
                  else jax.ShapeDtypeStruct((2,), jnp.int32))
        jax.eval_shape(lambda v, x: model.forward(v, x, rng=key, capture=scheme.layers), variables, images)
        _check_map_layers(model, scheme, variables, images, allow_small_grid)
        scheme_state = jax.eval_shape(scheme.init, variables) if scheme.init is not None else {}

        def pieces(v, x, y, state):
            ctx = StepContext(model, v, jnp.zeros((), jnp.int32), key, state)
            batch = {"image": x, "label": y}
            if scheme.batch_transform is not None:
                batch, _ = scheme.batch_transform(ctx, batch)
            if scheme.forward is not None:
                scheme.forward(ctx, batch, scheme.layers)

        jax.eval_shape(pieces, variables, images, labels, scheme_state)
    except NameError as e:
        if "unbound axis name" not in str(e):
            raise
        found = re.search(r"unbound axis name:?\s*'?([A-Za-z_][A-Za-z0-9_]*)", str(e))
        name = found.group(1) if found else "batch"
        raise ConfigError(
            f"the model reduces over the axis name {name!r} (a BatchNorm with axis_name={name!r}, as flax's "
            f"examples write it), which nothing binds inside the train step: set config.model.axis_name={name!r} "
            f"(linen_model / nnx_model(..., axis_name={name!r})); the step then binds it over the whole global "
            "batch, the statistics of every device's examples together") from e


def _check_map_layers(model, scheme, variables, images, allow_small_grid):
    """Every layer of ``scheme.maps`` is a spatial grid of at least 2x2 (:func:`check_model`)."""
    image_shape = images.shape[1:]
    for layer in scheme.maps:
        shape = jax.eval_shape(lambda v, x, layer=layer: model.layer_model(v, layer)(x)[1], variables, images).shape
        if len(shape) != 4:
            raise ConfigError(
                f"the scheme reads spatial maps at layer {layer!r}, whose activations are {tuple(shape)}, not [batch, "
                "h, w, channels]: name a spatial layer (config.model.grad_cam_layer), or for a transformer's tokens "
                "[batch, tokens, dim] set config.model.num_prefix_tokens (tokens before the patches, 1 for a class "
                "token) so that they are read as a grid")
        if min(shape[1:3]) < 2 and not allow_small_grid:
            raise ConfigError(
                f"layer {layer!r} is a {shape[1]}x{shape[2]} grid at {tuple(image_shape)} inputs: every map there is "
                "constant (Grad-CAM all zeros after its ReLU, every CAM flat), so the scheme would train exactly as "
                "without it. Name an earlier layer (config.model.grad_cam_layer), feed larger images, or set "
                "config.model.allow_small_grid=True to train anyway")
