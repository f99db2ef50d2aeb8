"""Excitation Backprop (EB) and contrastive EB: marginal winning probabilities in one backward pass.

Zhang, Lin, Brandt, Shen, Sclaroff, "Top-down Neural Attention by Excitation Backprop", ECCV 2016 (IJCV 2018);
Bargal, "Grounding deep models of visual data", PhD thesis 2019, Ch. 4:

* Eq. 4.1: ``P(a_i) = sum_{a_j in parents(a_i)} P(a_i | a_j) P(a_j)`` - the marginal winning probability of a
  neuron, starting from a top-down prior ``P`` over the output units (one-hot on a class, or any distribution);
* Eq. 4.2: ``P(a_i | a_j) = Z_j a_i w_ij`` if ``w_ij >= 0`` else 0, with ``Z_j`` normalising over the children.

Written per layer with ``W+ = max(W, 0)``, dense and convolution layers give ``p_in = x * W+^T (p_out / (W+ x))``
(bias ignored, ``0 / 0 := 0``); average pooling ``p_in = x * pool^T(p_out / pool(x))``; residual sums
``p_i = x_i / sum_j x_j * p_out``; batch norm in inference mode passes the signal unchanged; ReLU and max pooling
route it like the gradient. These are the rules of the reference implementations (Caffe-ExcitationBP, TorchRay);
EB equals LRP's z+ rule with biases ignored.

How it is computed: the rules are attached to JAX *primitives* by re-evaluating the model's jaxpr with each
primitive replaced by a ``jax.custom_vjp`` function (:func:`with_excitation_rules`), so ``jax.vjp`` of the model
yields the EB signal, and models we did not write work unmodified - a Flax linen module split with
:func:`~saliency_jax.saliency.core.linen_layer`, a Flax NNX module or any pure function split with
:func:`~saliency_jax.saliency.core.split_layer`. The signal at the explained layer is the cotangent of the
:class:`~saliency_jax.saliency.core.LayerModel` perturbation; only the part of the network between that layer and
the logits is run backwards.

Supported layer kinds (on the path from the explained layer to the logits), by what they compile to:

* dense and convolution layers whose weights are parameters (``dot_general``, ``conv_general_dilated``; grouped and
  strided convolutions included), their biases;
* average pooling (``nn.avg_pool``: ``reduce_window_sum``), global average pooling / spatial means and sums
  (``jnp.mean``: ``reduce_sum``);
* max pooling (``reduce_window_max``), global max pooling (``reduce_max``), ReLU (``jax.nn.relu``, ``jnp.maximum``),
  ``jnp.where``;
* residual sums of two data tensors (``x + shortcut``);
* batch norm in inference mode, input normalisation and any add/subtract/multiply/divide by parameters;
* reshapes, transposes, flattening, broadcasting, slicing, concatenation, padding, dtype conversion; ``jax.jit``,
  ``jax.checkpoint`` and custom-derivative wrappers are looked through;
* ``lax.scan`` loops (``flax.linen.RNN``, ``nn.scan``) are re-run with the rules in their body, so recurrent models
  with ReLU-LSTM cells (sigmoid gates times data) work: EB-R, see :mod:`saliency_jax.saliency.recurrent`.

Anything else that the signal reaches (``tanh``, sigmoid used as an activation, softmax, GELU, layer norm, batch
norm with batch statistics, attention products, ``while`` / ``cond``) raises
:class:`~saliency_jax.saliency._eb_rules.UnsupportedOperationError` naming the primitive, instead of returning a
wrong map. Operations *below* the explained layer are never run backwards and may be anything. EB assumes
non-negative activations (post-ReLU); explain the logits, not softmax probabilities, in inference mode.

Every transform takes a whole batch at once with no loop over examples (examples do not interact in inference
mode), and is jittable and vmappable.

Batch norm and the sign of the weights (:func:`fold_batch_norm`): passing the signal through an inference-mode
batch norm unchanged (as Caffe-ExcitationBP's ``BatchNorm`` and ``Scale`` layers do) leaves the rule of the
convolution below it with ``W+`` of the convolution's own weights, although a channel whose batch-norm scale
``gamma`` is negative responds *negatively* to them. Guided Zoom's released pool generator corrects this by flipping
those channels' weights before EB; :func:`fold_batch_norm` folds the batch norm into the convolution, which gives
the convolution rule the same weights up to a positive factor per channel (to which EB is blind) and keeps the
forward pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from saliency_jax.saliency._eb_rules import UnsupportedOperationError, with_excitation_rules
from saliency_jax.saliency.core import (LayerModel, check_images, invalid_examples, mark_invalid, normalize_maps,
                                       resize_maps, resolve_targets, target_one_hot)

Array = jax.Array

__all__ = [
    "EBResult",
    "UnsupportedOperationError",
    "contrastive_excitation_backprop",
    "excitation_backprop",
    "fold_batch_norm",
    "marginal_winning_probability",
    "with_excitation_rules",
]


class EBResult(NamedTuple):
    """Excitation Backprop output for a batch.

    Attributes:
      probability: [batch, h, w, channels] float - the marginal winning probabilities ``P(a_i)`` at the layer
        (Eq. 4.1); for contrastive EB the signed difference between the class and its dual units.
      saliency: [batch, h, w] float32 - the channel sum of ``probability`` (clamped at 0 for contrastive EB,
        Bargal 2019 Fig. 4.2); ``[batch, height, width]`` when resized to the input, in [0, 1] when normalised.
    """

    probability: Array
    saliency: Array


def _top_down_prior(logits: Array, targets: Array | int | None, prior: Array | None) -> Array:
    """The top-down signal over the output units: one-hot on the target classes, or the given distribution."""
    if prior is None:
        classes = resolve_targets(targets, logits)
        return target_one_hot(classes, logits.shape[-1], dtype=logits.dtype)  # NaN row for an out-of-range class
    if targets is not None:
        raise ValueError("give either targets (a one-hot prior on those classes) or prior, not both")
    prior = jnp.asarray(prior)
    if prior.shape != logits.shape:
        raise ValueError(f"prior must have the logits' shape [batch, num_classes] = {tuple(logits.shape)}; got "
                         f"{tuple(prior.shape)}")
    if not jnp.issubdtype(prior.dtype, jnp.floating):
        raise TypeError(f"prior must be a float distribution over the classes; got dtype {prior.dtype}")
    return prior.astype(logits.dtype)


def _excite(model: LayerModel, images: Array, targets, prior, contrastive: bool) -> Array:
    if not isinstance(model, LayerModel):
        raise TypeError(f"model must be a saliency_jax.saliency.LayerModel (from linen_layer or split_layer); got "
                        f"{type(model).__name__}")
    check_images(images)
    shape = model.activation_shape(images)
    eb_fn = with_excitation_rules(model.fn, probe_argnums=1, contrastive=contrastive)

    def logits_of(perturbation):
        return eb_fn(images, perturbation)[0]

    logits, pullback = jax.vjp(logits_of, jnp.zeros(shape.shape, shape.dtype))
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits [batch, num_classes]; got shape {tuple(logits.shape)}")
    top_down = _top_down_prior(logits, targets, prior)
    (probability,) = pullback(top_down)
    # Examples with a NaN / inf pixel or an out-of-range target (a NaN prior row) get NaN probabilities.
    invalid = invalid_examples(images=images) | ~jnp.all(jnp.isfinite(top_down), axis=-1)
    return mark_invalid(probability, invalid)


def marginal_winning_probability(
    model: LayerModel,
    images: Array,
    targets: Array | int | None = None,
    *,
    prior: Array | None = None,
    contrastive: bool = False,
) -> Array:
    """Marginal winning probabilities ``P(a_i)`` of every neuron of a layer (Bargal 2019, Eq. 4.1-4.2).

    Works for any layer shape, e.g. ``[batch, units]`` at a dense layer (the ``p_EB`` of Excitation Dropout,
    Bargal 2019 Eq. 5.1) or ``[batch, h, w, channels]`` at a convolutional one.

    Args:
      model: the network split at the layer, in inference mode (:func:`~saliency_jax.saliency.core.linen_layer`,
        :func:`~saliency_jax.saliency.core.split_layer`); it must return logits ``[batch, num_classes]``.
      images: [batch, height, width, channels] float (our models take float32 in [0, 1]).
      targets: the class of the one-hot prior per example: ``None`` for the predicted class, an ``int`` for all
        examples, or int [batch] (e.g. ground-truth labels). Must be None when ``prior`` is given.
      prior: optional [batch, num_classes] float top-down distribution over the output units (rows summing to 1)
        instead of a one-hot; EB is linear in the prior.
      contrastive: return the contrastive signal (class minus dual units with negated classifier weights,
        see :func:`contrastive_excitation_backprop`).

    Returns:
      [batch, *layer_shape] in the layer's dtype. With a one-hot (or normalised) prior, non-negative activations
      and no zero denominators, each example sums to 1 (conservation); rows of a contrastive signal sum to 0.

    Raises:
      ValueError: bad image rank, target or prior shape, both targets and prior given, logits not rank 2.
      TypeError: non-float images or prior, non-integer targets, model not a LayerModel.
      UnsupportedOperationError: the signal reaches an operation without an EB rule (named in the message).
    """
    return _excite(model, images, targets, prior, contrastive)


def _finish(probability: Array, images: Array, layer: str, contrastive: bool, resize: bool,
            normalize: bool) -> EBResult:
    if probability.ndim != 4:
        raise ValueError(
            f"an Excitation Backprop map needs spatial activations [batch, h, w, channels] at layer {layer!r}; got "
            f"shape {tuple(probability.shape)} (use marginal_winning_probability for dense layers)")
    maps = jnp.sum(probability.astype(jnp.float32), axis=-1)
    if contrastive:
        maps = jnp.maximum(maps, 0.0)
    if resize:
        maps = resize_maps(maps, images.shape[1:3])
    if normalize:
        maps = normalize_maps(maps)
    return EBResult(probability=probability, saliency=maps)


def excitation_backprop(
    model: LayerModel,
    images: Array,
    targets: Array | int | None = None,
    *,
    prior: Array | None = None,
    resize: bool = False,
    normalize: bool = False,
) -> EBResult:
    """Excitation Backprop maps for a batch, one per example, in one backward pass (Zhang et al. 2016).

    Args:
      model: the network split at the layer to explain (:func:`~saliency_jax.saliency.core.linen_layer` for a
        Flax linen module, e.g. ``linen_layer(resnet, variables, "layer3", train=False)``;
        :func:`~saliency_jax.saliency.core.split_layer` for NNX modules and plain functions), in inference mode.
        The layer's activations must be ``[batch, h, w, channels]``.
      images: [batch, height, width, channels] float (our models take float32 in [0, 1]).
      targets: the class of the one-hot top-down prior per example: ``None`` for the predicted class, an ``int``
        for all examples, or int [batch] (e.g. the ground-truth labels). Must be None when ``prior`` is given.
      prior: optional [batch, num_classes] float top-down distribution over the outputs (rows summing to 1).
      resize: bilinearly resize the map from the layer's resolution to ``(height, width)``.
      normalize: per-example min-max normalisation of the map to [0, 1] (a constant map becomes zeros).

    Returns:
      :class:`EBResult`: ``probability`` [batch, h, w, channels] (the marginal winning probabilities, summing to 1
      per example under the conditions of :func:`marginal_winning_probability`) and ``saliency`` [batch, h, w]
      float32, their channel sum (``[batch, height, width]`` with ``resize``).

    Raises:
      ValueError: bad image rank, non-spatial layer, target/prior shape, both targets and prior given.
      TypeError: non-float images or prior, non-integer targets, model not a LayerModel.
      UnsupportedOperationError: the signal reaches an operation without an EB rule (named in the message).

    Example:
      >>> import jax.numpy as jnp
      >>> from saliency_jax.saliency import split_layer
      >>> w = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> model = split_layer(lambda x: x, lambda a: jnp.mean(a, axis=(1, 2)) @ w)
      >>> out = excitation_backprop(model, jnp.ones((2, 4, 4, 3)), targets=0)
      >>> out.saliency.shape, float(out.probability[0].sum())
      ((2, 4, 4), 1.0)
    """
    probability = _excite(model, images, targets, prior, contrastive=False)
    return _finish(probability, images, model.layer, False, resize, normalize)


def contrastive_excitation_backprop(
    model: LayerModel,
    images: Array,
    targets: Array | int | None = None,
    *,
    prior: Array | None = None,
    resize: bool = False,
    normalize: bool = False,
) -> EBResult:
    """Contrastive Excitation Backprop (cEB) maps for a batch (Zhang et al. 2016; Bargal 2019, Sec. 4, Fig. 4.2).

    Each output unit ``o`` gets a dual unit whose input weights are the negation of ``o``'s at the classifier
    layer. The reference procedure runs EB for the dual units down to a contrast layer, subtracts that from the
    normal pass there and continues down to the saliency layer; the displayed map is the channel sum clamped at 0.
    Every EB rule is linear in the top-down signal for fixed activations, and negating the classifier changes no
    activation below it, so the result is the same whichever contrast layer between the saliency layer and the
    classifier is chosen; it is computed in one pass by giving the classifier the rule
    ``x * W+^T(p / W+ x) - x * (-W)+^T(p / (-W)+ x)`` (subtraction at the classifier's input, e.g. ResNet's global
    pool). The classifier layer is the last dense/conv operation of the network (as TorchRay's default).

    Args:
      model: the network split at the saliency layer (see :func:`excitation_backprop`); the layer must lie below
        the classifier and have activations ``[batch, h, w, channels]``.
      images: [batch, height, width, channels] float.
      targets: the class per example (``None``: predicted; ``int``; int [batch]); None when ``prior`` is given.
      prior: optional [batch, num_classes] float top-down distribution over the outputs (and over their duals).
      resize: bilinearly resize the map to ``(height, width)``.
      normalize: per-example min-max normalisation of the map to [0, 1].

    Returns:
      :class:`EBResult`: ``probability`` [batch, h, w, channels], the contrastive signal (class minus dual; signed,
      each example sums to 0 when both passes conserve) and ``saliency`` [batch, h, w] float32, its channel sum
      clamped at 0.

    Raises:
      ValueError: as :func:`excitation_backprop`, and if the network has no dense/conv classifier above the layer.
      TypeError: as :func:`excitation_backprop`.
      UnsupportedOperationError: the signal reaches an operation without an EB rule.
    """
    probability = _excite(model, images, targets, prior, contrastive=True)
    return _finish(probability, images, model.layer, True, resize, normalize)


# ---------------------------------------------------------------------------------------------------------------
# Batch norm folded into the linear layer before it (Guided Zoom's pool generator).


def _own_kernel(module: nn.Module) -> Any:
    """The module's own ``kernel`` parameter (a conv / dense layer), or None."""
    params = module.variables.get("params", {}) if module.scope is not None else {}
    kernel = params.get("kernel") if hasattr(params, "get") else None
    return kernel if hasattr(kernel, "shape") and len(kernel.shape) >= 2 else None


def _batch_norm_pairs(module: nn.Module, variables: Any, args: tuple, apply_kwargs: dict) -> list[tuple]:
    """``[(linear path, batch-norm path, epsilon, use_scale, use_bias)]``: every inference-mode ``nn.BatchNorm``
    whose input is the output of a module with its own ``kernel`` (found by tracing ``module.apply`` with
    ``jax.eval_shape`` and a method interceptor)."""
    outputs: list[tuple[Any, tuple[str, ...]]] = []  # (output value, path) of layers with a kernel
    pairs: list[tuple] = []
    calls: dict[tuple[str, ...], int] = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
        m = context.module
        path = tuple(str(p) for p in m.path)
        calls[path] = calls.get(path, 0) + 1
        if isinstance(m, nn.BatchNorm) and call_args:
            x = call_args[0]
            producer = next((p for out, p in outputs if out is x), None)
            if producer is not None:
                name = "/".join(path)
                running = call_kwargs.get("use_running_average", call_args[1] if len(call_args) > 1 else None)
                running = m.use_running_average if running is None else running
                if not running:
                    raise ValueError(f"fold_batch_norm: BatchNorm {name!r} uses batch statistics; fold an "
                                     "inference-mode model (e.g. apply_kwargs train=False)")
                axis = m.axis if isinstance(m.axis, int) else None
                if axis is None or axis % x.ndim != x.ndim - 1:
                    raise ValueError(f"fold_batch_norm: BatchNorm {name!r} normalises axis {m.axis!r}; only the "
                                     "last (feature) axis, that of the layer's kernel, can be folded")
                pairs.append((producer, path, float(m.epsilon), bool(m.use_scale), bool(m.use_bias)))
        out = next_fun(*call_args, **call_kwargs)
        kernel = _own_kernel(m)
        if kernel is not None and isinstance(out, jax.Array) and out.shape[-1:] == kernel.shape[-1:]:
            outputs.append((out, path))
        return out

    def run(v, a):
        with nn.intercept_methods(interceptor):
            return module.apply(v, *a, **apply_kwargs)

    jax.eval_shape(run, variables, args)
    for linear, norm, *_ in pairs:
        for path in (linear, norm):
            if calls.get(path, 0) != 1:
                raise ValueError(f"fold_batch_norm: layer {'/'.join(path)!r} runs {calls.get(path, 0)} times; "
                                 "a layer whose weights serve several calls cannot be folded")
    return pairs


def _node(tree: Any, collection: str, path: tuple[str, ...], what: str) -> dict:
    node = tree.get(collection, {})
    for key in path:
        if key not in node:
            raise ValueError(f"fold_batch_norm: no {collection}/{'/'.join(path)} for {what} in the variables")
        node = node[key]
    return node


def fold_batch_norm(module: nn.Module, variables: Any, *args: Any, **apply_kwargs: Any) -> Any:
    """Folds every inference-mode batch norm into the conv / dense layer that feeds it (the signs of Guided Zoom's
    released pool generator), keeping the forward pass.

    For a layer ``z = W x (+ b)`` followed by ``BN(z) = gamma (z - mu) / sqrt(var + eps) + beta``, per output
    channel ``s = gamma / sqrt(var + eps)``:

    * the layer's kernel becomes ``W' = W s`` (its bias, if any, ``b s``);
    * the batch norm keeps only the shift: ``mean' = mu s - beta``, ``var' = 1 - eps``, ``scale' = 1``,
      ``bias' = 0``, so ``BN'(W' x + b') = W' x + b' + beta - mu s = BN(z)``.

    The module is unchanged; only its variables are. Excitation Backprop on the folded variables
    (:func:`excitation_backprop`, :func:`contrastive_excitation_backprop` through ``linen_layer(module, folded,
    layer, train=False)``) equals EB on a network with the convolutions ``(W', b' + beta - mu s)`` and no batch
    norm, since the batch norm's shift passes the signal unchanged and EB ignores biases.

    Why (Bargal et al., Guided Zoom, BMVC 2019; the authors' released ``caffe/evidence_pool_generation.py``): before
    computing the contrastive-EB maps of the evidence pool, that script takes every Caffe ``Scale`` layer
    ``scale<X>`` (the affine part of a ResNet-101 batch norm) that has a negative ``gamma``, negates the output
    channels with ``gamma < 0`` of the convolution ``res<X>`` (the convolutions of the residual branches and
    projection shortcuts; the stem's ``scale_conv1`` has no ``res`` partner) and replaces ``gamma`` by
    ``|gamma|``. Caffe-ExcitationBP's ``BatchNorm`` and ``Scale`` layers copy the EB signal unchanged, so the EB
    rule of the convolution then uses the positive part of the sign-corrected weights, ``(sign(gamma) W)+``.
    Folding gives the rule ``(W s)+ = |s| (sign(gamma) W)+``, and a positive factor per output channel cancels in
    EB's normalisation (``Z_j``, Eq. 4.2): the same signal. Two differences from their script, both deliberate:
    (1) their flip leaves the batch norm's mean (and ``beta``) unchanged, so each flipped channel's output moves by
    ``-2 |gamma| mu / sqrt(var + eps)`` and the network they explain (and whose predictions gate the erasing
    rounds) is no longer the trained one; the fold keeps every activation and prediction; (2) a channel with
    ``gamma = 0`` exactly gets a zero kernel here, so EB sends it nothing, while their flip leaves its weights.
    Their test-time script (``caffe/save_softmax.py``) does not flip; Guided Zoom here folds only for the pools
    (:class:`saliency_jax.evaluators.guided_zoom.GuidedZoomSettings` ``ceb_batch_norm``). With every ``gamma > 0``
    the fold leaves EB's maps unchanged (up to float rounding); the maps change where scales are negative (measured
    figures in :mod:`saliency_jax.evaluators.guided_zoom`).

    Which layers: every ``flax.linen.BatchNorm`` (or subclass) called in inference mode whose input is exactly the
    output of a submodule with its own ``kernel`` parameter whose last axis is the output channels (``nn.Conv``,
    ``nn.Dense``, :class:`saliency_jax.models.conv.Conv`; e.g. every conv of :class:`saliency_jax.models.ResNet`
    and of :class:`saliency_jax.models.SmallCNN` with batch norm). A batch norm fed by anything else (a sum, an
    activation, a pre-activation block) is left as it is. The layer's output must feed only that batch norm (true
    of conv - BN - ReLU networks; not checked). A model without such pairs gets its variables back unchanged.

    Args:
      module: a ``flax.linen.Module``.
      variables: its variables, ``{"params": ..., "batch_stats": ...}`` (a dict or ``FrozenDict``).
      *args: the positional arguments of ``module.apply`` after the variables, e.g. images
        [batch, height, width, channels] float32; only their shapes and dtypes are used (the model is traced
        with ``jax.eval_shape``, never run).
      **apply_kwargs: forwarded to ``module.apply``; the batch norms must run on their running averages
        (``train=False`` for this library's models).

    Returns:
      Variables of the same structure, shapes and dtypes (a ``FrozenDict`` if ``variables`` was one), with the
      kernels (and biases) of the folded layers and the parameters and statistics of their batch norms replaced.

    Raises:
      ValueError: a batch norm fed by a layer uses batch statistics (train mode), normalises another axis than the
        last, or a folded layer or batch norm runs more than once per forward pass; the variables lack a folded
        layer's kernel or a batch norm's statistics.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), use_bias=False)(x))
      ...         return nn.Dense(2)(jnp.mean(nn.relu(x), axis=(1, 2)))
      >>> x = jnp.ones((1, 8, 8, 3))
      >>> v = Net().init(jax.random.key(0), x)
      >>> folded = fold_batch_norm(Net(), v, x)
      >>> bool(jnp.allclose(Net().apply(folded, x), Net().apply(v, x), atol=1e-5))
      True
    """
    pairs = _batch_norm_pairs(module, variables, args, apply_kwargs)
    frozen = isinstance(variables, flax.core.FrozenDict)
    out = flax.core.unfreeze(variables)
    for linear, norm, eps, use_scale, use_bias in pairs:
        layer = _node(out, "params", linear, "the layer before a batch norm")
        stats = _node(out, "batch_stats", norm, "a batch norm's statistics")
        if "mean" not in stats or "var" not in stats:
            raise ValueError(f"fold_batch_norm: batch_stats/{'/'.join(norm)} has no mean / var")
        bn = _node(out, "params", norm, "a batch norm's parameters") if (use_scale or use_bias) else {}
        mean = jnp.asarray(stats["mean"], jnp.float32)
        var = jnp.asarray(stats["var"], jnp.float32)
        gamma = jnp.asarray(bn["scale"], jnp.float32) if use_scale else jnp.ones_like(mean)
        beta = jnp.asarray(bn["bias"], jnp.float32) if use_bias else jnp.zeros_like(mean)
        s = gamma * jax.lax.rsqrt(var + jnp.float32(eps))
        kernel = layer["kernel"]
        if kernel.shape[-1] != s.shape[-1]:
            raise ValueError(f"fold_batch_norm: {'/'.join(linear)} has {kernel.shape[-1]} output channels, its "
                             f"batch norm {'/'.join(norm)} {s.shape[-1]}")
        layer["kernel"] = (jnp.asarray(kernel, jnp.float32) * s).astype(kernel.dtype)
        if "bias" in layer:
            layer["bias"] = (jnp.asarray(layer["bias"], jnp.float32) * s).astype(layer["bias"].dtype)
        stats["mean"] = (mean * s - beta).astype(stats["mean"].dtype)
        stats["var"] = jnp.full_like(stats["var"], 1.0 - eps)
        if use_scale:
            bn["scale"] = jnp.ones_like(bn["scale"])
        if use_bias:
            bn["bias"] = jnp.zeros_like(bn["bias"])
    return flax.core.freeze(out) if frozen else out
