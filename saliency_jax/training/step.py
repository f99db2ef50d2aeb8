"""The supervised update step of a training scheme, its state and its optimizer.

:func:`make_train_step` turns a model, an optax optimizer and a :class:`~saliency_jax.training.scheme.Scheme` into the
pure ``(state, batch, key) -> (state, metrics)`` that the train loop (:mod:`saliency_jax.train`) jits over the device
mesh; :class:`TrainState` is what it updates (parameters, BatchNorm statistics, optimizer state and the scheme's own
state, in optax's manner: ``Scheme.init`` / ``Scheme.update``). Nothing here knows a loop, a workdir or a scheme by
name.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import checkify

from saliency_jax.training import scheme as scheme_lib
from saliency_jax.training.scheme import Scheme, StepContext

Array = jax.Array

__all__ = ["TrainState", "make_optimizer", "init_state", "make_train_step"]


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
    (``momentum``). ``weight_decay`` adds L2 decay of the weights (``optax.add_decayed_weights``); ``lr_boundaries``
    and ``lr_scales`` give a piecewise-constant schedule (e.g. x0.1 after 25k steps).

    Raises:
      ValueError: on an unknown optimizer name.
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
    return tx


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, image_shape: tuple[int, ...],
               seed: int, variables: Any | None = None, scheme: Scheme = Scheme()) -> TrainState:
    """A fresh :class:`TrainState` (or one built around given ``variables``, e.g. imported weights).

    Args:
      model: the linen module.
      optimizer: the optax optimizer.
      image_shape: (height, width, channels) of one input ((time, height, width, channels) of a clip).
      seed: initialisation seed.
      variables: optional ``{"params", "batch_stats"}`` to start from.
      scheme: the training scheme; its ``init(variables)`` gives ``scheme_state`` (``{}`` without one).
    """
    if variables is None:
        variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    scheme_state = scheme.init({"params": params, "batch_stats": batch_stats}) if scheme.init is not None else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=optimizer.init(params), scheme_state=scheme_state)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, scheme: Scheme = Scheme(), *,
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
      model: linen module ``apply(variables, images, train=...)``; dropout layers draw from rng ``"dropout"``.
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
