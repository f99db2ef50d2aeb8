"""Excitation Dropout and the dropout baselines it is compared with, inside the jitted train step.

Bargal, "Grounding deep models of visual data", PhD thesis 2019, Ch. 5 (Fig. 5.1): at a chosen layer (the first
fully-connected layer: ``fc1`` of CNN-2, ``fc6`` of AlexNet / VGG)

1. the mini-batch goes through the forward pass;
2. Excitation Backprop (Eq. 4.1-4.2) with a one-hot prior on each image's ground-truth class runs from the output
   down to that layer, giving ``p_EB`` per image ([batch, units], each row summing to 1);
3. each neuron is retained with probability (Eq. 5.1)
   ``p = 1 - ((1 - P)(N - 1) p_EB) / (((1 - P) N - 1) p_EB + P)`` (base retaining probability ``P``, ``N`` units),
   one Bernoulli mask per image;
4. the rest of the network runs again on the masked activations;
5. the usual backward pass updates the weights.

Every scheme of the thesis's comparison runs through the same code (:func:`make_dropout_forward`), differing only
in how the retaining probabilities are chosen (:data:`SCHEMES`):

* ``"none"``: no dropout;
* ``"standard"``: Standard Dropout, retain probability ``P``, one random mask for the whole mini-batch (the thesis:
  "in Standard Dropout, one random mask is employed per minibatch");
* ``"standard_per_image"``: Standard Dropout with a different random mask per image ("Standard Dropout + Mask/Img");
* ``"curriculum"``: Curriculum Dropout (Morerio et al. 2017): retain probability ``(1 - P) exp(-gamma t) + P`` at
  step ``t`` (``gamma = 5e-4``), one mask per mini-batch as Standard Dropout;
* ``"excitation"``: Excitation Dropout, Eq. 5.1 per image;
* ``"adaptive"``: drops the *least* relevant neurons, the opposite of Excitation Dropout used for Table 5.1: the
  mirror image of Eq. 5.1, ``p = 1 - retain_probability(p_EB, 1 - P, N)`` (``p_EB = 0`` -> 0, ``p_EB = 1`` -> 1,
  ``p_EB = 1/N`` -> ``P``). The thesis gives no formula for its "Adaptive Dropout" arm; this is our formulation.

Kept activations are rescaled as ``rescale`` says (:data:`RESCALE_MODES`). The default, ``"authors"``, is what the
authors ran (:data:`AUTHORS_RESCALE`): Excitation Dropout (and the adaptive arm, its mirror image) divides the kept
units of each image by that image's fraction of units kept, as the authors' released training script does
(andreazuna89/Excitation-Dropout, ``train_with_Excitation_Dropout.py``: the mask's mean per image, "only used during
training"); Standard, per-image and Curriculum Dropout divide by the retaining probability, as Caffe's ``Dropout``
layer that the baselines use does (inverted dropout, ``1 / (1 - ratio)`` in training). The thesis's text gives no
rescaling; ``"none"`` is that reading (one flag away: ``dropout.rescale="none"``), and ``"fraction"`` / ``"inverted"``
force one rule on every scheme. Without rescaling the network sees about twice the activation at test time that it
saw in training. At test time no dropout is applied (the model is used unchanged).

How it is computed for a Flax linen module (:func:`make_dropout_forward`): one train-mode forward pass captures the
layer's activations ``a`` (its output reached with :func:`flax.linen.intercept_methods`, the layer named by its module
path); ``p_EB`` is Excitation Backprop over the *head* of the network (the part above the layer, inference mode, the
same weights) as a function of ``a`` (:func:`layer_excitation`); the head then runs again, in train mode, on
``a * mask``, and ``jax.grad`` flows through the masked forward into every layer. ``p_EB`` and the mask are constants
for the gradient (``stop_gradient``). No loop over examples and no host round-trip: the whole batch is one vectorised
computation and the mask's randomness comes from the step's PRNG key. The part of the network below the layer is
computed once: the copies of it that the head passes trace are dead code that XLA removes.

Key derivation (so that a run is a deterministic function of the step key): ``k_model, k_mask =
jax.random.split(key)``; ``k_model`` feeds the model's own ``"dropout"`` rng, and the mask is
``jax.random.uniform(k_mask, shape) < p`` with ``shape = [batch, *units]`` (``[1, *units]`` for the per-mini-batch
schemes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.models.trainable import as_trainable
from saliency_jax.saliency.excitation_backprop import with_excitation_rules
from saliency_jax.training.scheme import Forward, ModelLayers, Scheme, SchemeSettings, register_scheme

Array = jax.Array

__all__ = [
    "SCHEMES",
    "RESCALE_MODES",
    "AUTHORS_RESCALE",
    "DropoutConfig",
    "DropoutOutput",
    "retain_probability",
    "adaptive_retain_probability",
    "curriculum_retain_probability",
    "layer_excitation",
    "scheme_retain_probability",
    "apply_dropout_mask",
    "dropout_at_layer",
    "make_dropout_forward",
    "dropout_scheme",
]

SCHEMES = ("none", "standard", "standard_per_image", "curriculum", "excitation", "adaptive")
"""The dropout schemes of Bargal 2019, Ch. 5 (see the module docstring)."""

RESCALE_MODES = ("authors", "none", "fraction", "inverted")
"""Rescaling of kept activations: ``"authors"`` (per scheme, :data:`AUTHORS_RESCALE`; the default), ``"none"`` (the
thesis's text), ``"fraction"`` (divide by the per-image fraction of units kept), ``"inverted"`` (divide by ``p``)."""

AUTHORS_RESCALE = {"none": "none", "standard": "inverted", "standard_per_image": "inverted", "curriculum": "inverted",
                   "excitation": "fraction", "adaptive": "fraction"}
"""The rescaling each scheme ran with in the authors' comparison: Excitation Dropout's released script divides by the
per-image fraction kept; the baselines are Caffe's ``Dropout`` layer (inverted dropout); the adaptive arm, which has
no released code, follows Excitation Dropout."""

_EB_SCHEMES = ("excitation", "adaptive")
_PER_BATCH_SCHEMES = ("standard", "curriculum")


@dataclasses.dataclass(frozen=True)
class DropoutConfig(SchemeSettings):
    """Hyper-parameters of a dropout scheme (defaults: the thesis's, Bargal 2019 Sec. 5.2.2).

    The settings of the ``"dropout"`` training scheme (:func:`dropout_scheme`; ``config.dropout``).

    Attributes:
      scheme: one of :data:`SCHEMES`.
      base_retain: ``P``, the base retaining probability (1 - dropout rate); 0.5 in the thesis; in (0, 1].
      layer: module path of the layer whose output is dropped (post-ReLU activations of the first fully-connected
        layer: ``"relu_fc1"`` for CNN-2, ``"relu6"`` for VGG16).
      rescale: one of :data:`RESCALE_MODES`; ``"authors"`` (default) resolves per scheme (:data:`AUTHORS_RESCALE`,
        :attr:`rescale_rule`); ``"none"`` is the thesis's text.
      gamma: Curriculum Dropout's decay rate per step (5e-4, Morerio et al. 2017).
      bypass: module paths that run as the identity in training (e.g. VGG16's own ``"drop6"``, which the scheme
        replaces).
    """

    scheme: str = "excitation"
    base_retain: float = 0.5
    layer: str = "relu_fc1"
    rescale: str = "authors"
    gamma: float = 5e-4
    bypass: tuple[str, ...] = ()

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"DropoutConfig.scheme must be one of {SCHEMES}; got {self.scheme!r}")
        if self.rescale not in RESCALE_MODES:
            raise ValueError(f"DropoutConfig.rescale must be one of {RESCALE_MODES}; got {self.rescale!r}")
        if not 0.0 < float(self.base_retain) <= 1.0:
            raise ValueError(f"DropoutConfig.base_retain (P) must lie in (0, 1]; got {self.base_retain}")
        if float(self.gamma) < 0:
            raise ValueError(f"DropoutConfig.gamma must be >= 0; got {self.gamma}")
        if not self.layer:
            raise ValueError("DropoutConfig.layer must name the module path of the dropout layer")
        object.__setattr__(self, "bypass", tuple(self.bypass or ()))

    @property
    def rescale_rule(self) -> str:
        """The rule applied: ``"none"``, ``"fraction"`` or ``"inverted"`` (``"authors"`` resolved for the scheme)."""
        return AUTHORS_RESCALE[self.scheme] if self.rescale == "authors" else self.rescale


class DropoutOutput(NamedTuple):
    """What :func:`dropout_at_layer` returns.

    Attributes:
      activations: [batch, *units] the masked (and rescaled) activations.
      mask: [batch or 1, *units] float32 in {0, 1}, 1 where a unit is kept.
      retain: [batch or 1, *units] float32, the retaining probabilities the mask was drawn with.
      p_eb: [batch, *units] the marginal winning probabilities (zeros for schemes that do not use them).
    """

    activations: Array
    mask: Array
    retain: Array
    p_eb: Array


def _check_p(base_retain: float, name: str = "base_retain") -> float:
    base_retain = float(base_retain)
    if not 0.0 <= base_retain <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {base_retain}")
    return base_retain


def retain_probability(p_eb: Array, base_retain: float, num_units: int) -> Array:
    """Excitation Dropout's retaining probability of each neuron (Bargal 2019, Eq. 5.1).

    ``p = 1 - ((1 - P)(N - 1) p_EB) / (((1 - P) N - 1) p_EB + P)``: ``p_EB = 1`` gives 0 (the neuron carrying all the
    evidence is dropped), ``p_EB = 0`` gives 1, and the uniform ``p_EB = 1/N`` gives ``P``; monotone decreasing in
    between.

    Args:
      p_eb: [...] float, marginal winning probabilities in [0, 1] (values slightly outside, from round-off, are
        clipped).
      base_retain: ``P`` in [0, 1], the retaining probability of a neuron when all contribute equally.
      num_units: ``N >= 2``, the number of neurons of the layer (static).

    Returns:
      float array of ``p_eb``'s shape, in [0, 1].

    Raises:
      ValueError: if ``base_retain`` is outside [0, 1] or ``num_units < 2``.
      TypeError: if ``p_eb`` is not floating point.

    Example:
      >>> round(float(retain_probability(jnp.float32(0.1), 0.5, 10)), 6)  # p_EB = 1/N gives P
      0.5
    """
    P = _check_p(base_retain)
    N = int(num_units)
    if N < 2:
        raise ValueError(f"num_units (N) must be >= 2; got {num_units}")
    p_eb = jnp.asarray(p_eb)
    if not jnp.issubdtype(p_eb.dtype, jnp.floating):
        raise TypeError(f"p_eb must be floating point; got dtype {p_eb.dtype}")
    if P == 1.0:
        return jnp.ones_like(p_eb)
    x = jnp.clip(p_eb, 0.0, 1.0)
    num = (1.0 - P) * (N - 1) * x
    den = ((1.0 - P) * N - 1.0) * x + P  # linear in x, from P (> 0 unless P = 0) to (1 - P)(N - 1) > 0
    safe = jnp.where(den > 0, den, 1.0)
    # P = 0 and p_EB = 0 is 0/0: the limit along p_EB is 1 - (N - 1)/(N - 1) = 0 (everything dropped).
    ratio = jnp.where(den > 0, num / safe, 1.0)
    return jnp.clip(1.0 - ratio, 0.0, 1.0).astype(p_eb.dtype)


def adaptive_retain_probability(p_eb: Array, base_retain: float, num_units: int) -> Array:
    """Retaining probability that drops the *least* relevant neurons: the mirror image of Eq. 5.1 (our formulation
    of the thesis's "Adaptive Dropout" arm, Table 5.1): ``1 - retain_probability(p_eb, 1 - P, N)``.

    ``p_EB = 0`` -> 0 (dropped), ``p_EB = 1`` -> 1 (kept), ``p_EB = 1/N`` -> ``P``.

    Args, Returns, Raises: as :func:`retain_probability`.
    """
    P = _check_p(base_retain)
    return 1.0 - retain_probability(p_eb, 1.0 - P, num_units)


def curriculum_retain_probability(step: Array | int, base_retain: float, gamma: float = 5e-4) -> Array:
    """Curriculum Dropout's retaining probability at step ``t`` (Morerio et al. 2017): ``(1 - P) exp(-gamma t) + P``.

    Args:
      step: int or int32 scalar, the number of updates done (``t``).
      base_retain: ``P``, the limit as ``t`` grows.
      gamma: decay rate per step (5e-4 in the thesis).

    Returns:
      float32 scalar in [P, 1]: 1 at ``t = 0``.
    """
    P = _check_p(base_retain)
    t = jnp.asarray(step, jnp.float32)
    return (1.0 - P) * jnp.exp(-float(gamma) * t) + P


def layer_excitation(head_fn: Callable[[Array], Array], activations: Array, labels: Array) -> Array:
    """Marginal winning probabilities ``p_EB`` at a layer, from its activations and the head above it.

    Excitation Backprop (Bargal 2019, Eq. 4.1-4.2; rules of :mod:`saliency_jax.saliency.excitation_backprop`) from
    a one-hot prior on ``labels`` down to the input of ``head_fn``: one vectorised backward pass for the batch.

    Args:
      head_fn: ``activations -> logits [batch, num_classes]``, the network above the layer in inference mode; the
        weights are arrays it closes over.
      activations: [batch, *units] float, non-negative (post-ReLU).
      labels: int [batch], the class of each example's one-hot prior (the ground truth in training).

    Returns:
      [batch, *units] in the activations' dtype, each row summing to 1 (up to round-off) where the prior's class is
      reachable through positive weights.

    Raises:
      ValueError: if the head does not return rank-2 logits or ``labels`` is not [batch].
      UnsupportedOperationError: if the head holds an operation without an EB rule.
    """
    eb_head = with_excitation_rules(head_fn)
    logits, pullback = jax.vjp(eb_head, activations)
    if logits.ndim != 2:
        raise ValueError(f"the head must return logits [batch, num_classes]; got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [{logits.shape[0]}]; got shape {tuple(labels.shape)}")
    (p_eb,) = pullback(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype))
    return p_eb


def scheme_retain_probability(config: DropoutConfig, p_eb: Array | None, unit_shape: Sequence[int],
                              step: Array | int = 0) -> Array:
    """The retaining probabilities of a scheme.

    Args:
      config: the scheme.
      p_eb: [batch, *units] marginal winning probabilities (needed by ``"excitation"`` and ``"adaptive"``).
      unit_shape: the layer's shape without the batch axis.
      step: the update step (``"curriculum"``).

    Returns:
      float32 [batch, *units] for the per-image schemes, [1, *units] for the per-mini-batch ones
      (``"standard"``, ``"curriculum"``; ``"none"`` gives ones).

    Raises:
      ValueError: if an EB scheme gets no ``p_eb``.
    """
    unit_shape = tuple(int(s) for s in unit_shape)
    num_units = int(np.prod(unit_shape))
    P = float(config.base_retain)
    if config.scheme in _EB_SCHEMES:
        if p_eb is None:
            raise ValueError(f"scheme {config.scheme!r} needs p_eb [batch, *units]")
        fn = retain_probability if config.scheme == "excitation" else adaptive_retain_probability
        return fn(p_eb.astype(jnp.float32), P, num_units)
    if config.scheme == "none":
        return jnp.ones((1, *unit_shape), jnp.float32)
    if config.scheme == "curriculum":
        return jnp.broadcast_to(curriculum_retain_probability(step, P, config.gamma), (1, *unit_shape))
    return jnp.full((1, *unit_shape), P, jnp.float32)  # standard, standard_per_image (broadcast by the caller)


def apply_dropout_mask(activations: Array, mask: Array, retain: Array, rescale: str) -> Array:
    """Zeroes dropped units and rescales the kept ones.

    Args:
      activations: [batch, *units] float.
      mask: [batch or 1, *units] in {0, 1} (1 = kept).
      retain: the retaining probabilities the mask was drawn with, broadcastable to ``mask``.
      rescale: ``"none"`` (the thesis's text), ``"fraction"`` (divide by the per-image fraction of units kept, the
        authors' Excitation Dropout script; 0 if none is kept) or ``"inverted"`` (divide by ``retain``, Caffe's
        ``Dropout`` layer); ``"authors"`` is resolved by :attr:`DropoutConfig.rescale_rule`, not here.

    Returns:
      [batch, *units] in the activations' dtype.

    Raises:
      ValueError: on an unknown ``rescale``.
    """
    if rescale not in ("none", "fraction", "inverted"):
        raise ValueError(f"rescale must be 'none', 'fraction' or 'inverted'; got {rescale!r} (resolve 'authors' "
                         "with DropoutConfig.rescale_rule)")
    mask = mask.astype(activations.dtype)
    out = activations * mask
    if rescale == "fraction":
        axes = tuple(range(1, mask.ndim))
        kept = jnp.mean(mask, axis=axes, keepdims=True)
        out = out / jnp.where(kept > 0, kept, 1.0)
    elif rescale == "inverted":
        r = jnp.asarray(retain, activations.dtype)
        out = out / jnp.where(r > 0, r, 1.0)
    return out


def dropout_at_layer(key: Array, activations: Array, config: DropoutConfig, *,
                     head_fn: Callable[[Array], Array] | None = None, labels: Array | None = None,
                     step: Array | int = 0) -> DropoutOutput:
    """Applies a dropout scheme to one layer's activations (the functional core; any JAX model).

    For a pure JAX model ``logits = head(features(images))`` the scheme's train-time logits are
    ``head(dropout_at_layer(key, features(images), config, head_fn=head_eval, labels=labels).activations)``.

    Args:
      key: PRNG key of this step's mask (the mask is ``jax.random.uniform(key, shape) < p``).
      activations: [batch, *units] float, the layer's (post-ReLU) activations.
      config: the scheme.
      head_fn: ``activations -> logits`` above the layer in inference mode (needed by the EB schemes; its weights
        are treated as constants).
      labels: int [batch] ground-truth classes (EB schemes).
      step: the update step (curriculum).

    Returns:
      :class:`DropoutOutput`; ``p_eb``, ``mask`` and ``retain`` carry no gradient.

    Raises:
      ValueError: if activations are not at least rank 2, or an EB scheme lacks ``head_fn`` / ``labels``.
    """
    if activations.ndim < 2:
        raise ValueError(f"activations must be [batch, *units]; got shape {tuple(activations.shape)}")
    unit_shape = activations.shape[1:]
    a_const = jax.lax.stop_gradient(activations)
    p_eb = jnp.zeros_like(a_const)
    if config.scheme in _EB_SCHEMES:
        if head_fn is None or labels is None:
            raise ValueError(f"scheme {config.scheme!r} needs head_fn and labels")
        p_eb = jax.lax.stop_gradient(layer_excitation(head_fn, a_const, jnp.asarray(labels)))
    retain = jax.lax.stop_gradient(scheme_retain_probability(config, p_eb, unit_shape, step))
    if config.scheme == "none":
        return DropoutOutput(activations, jnp.ones_like(retain), retain, p_eb)
    shape = retain.shape if config.scheme in _PER_BATCH_SCHEMES else (activations.shape[0], *unit_shape)
    retain = jnp.broadcast_to(retain, shape)
    mask = (jax.random.uniform(key, shape) < retain).astype(jnp.float32)
    return DropoutOutput(apply_dropout_mask(activations, mask, retain, config.rescale_rule), mask, retain, p_eb)


# ----------------------------------------------------------------------------------------------------------------
# Flax linen models.


def make_dropout_forward(model: Any, config: DropoutConfig):
    """The training forward pass of a model with a dropout scheme at the layer ``config.layer``.

    Drop-in for the model's own training forward in a train step (the ``"dropout"`` training scheme wraps it,
    :func:`dropout_scheme`); works for any model whose dropout point is reachable by layer path
    (:meth:`~saliency_jax.models.trainable.TrainableModel.forward`: a linen module path or ``"Dense_0+relu"``, an NNX
    attribute path). Excitation Backprop runs over the inference-mode head above the layer
    (:meth:`~saliency_jax.models.trainable.TrainableModel.head`); a head with operations EB has no rule for
    (attention, layer normalisation) raises EB's error naming the operation.

    Args:
      model: a :class:`~saliency_jax.models.trainable.TrainableModel`, or a linen / NNX module (taken with
        :func:`~saliency_jax.models.trainable.as_trainable`: ``train=True`` / ``train=False`` keywords for linen).
      config: the scheme and the layer.

    Returns:
      ``forward(variables, images, labels, key, step, capture=()) -> (logits, updates, activations)``:
      ``images`` [batch, height, width, channels] float32; ``labels`` int [batch] (ground truth, the EB prior);
      ``key`` this step's PRNG key (``k_model, k_mask = split(key)``: ``k_model`` is the model's dropout rng);
      ``step`` int32 scalar; ``capture`` other layer paths to read from the training pass; ``logits`` [batch,
      num_classes]; ``updates`` the updated batch statistics plus ``"dropout"``: ``{"mask", "retain", "p_eb"}`` (see
      :class:`DropoutOutput`) for inspection; ``activations`` ``{path: array}`` for ``capture``. Jittable; no loop
      over examples.
    """
    model = as_trainable(model)
    layer, bypass = config.layer, config.bypass

    def forward(variables, images, labels, key, step, capture=()):
        k_model, k_mask = jax.random.split(key)
        wants_layer = layer in capture  # a loss term reading the dropout layer gets its activations before the mask
        capture = tuple(c for c in capture if c != layer)
        if config.scheme in _EB_SCHEMES:
            # One forward captures the activations (its head is dead code); EB over the inference-mode head as a
            # function of them; the head runs again in train mode on the masked activations.
            activations = model.forward(variables, images, rng=k_model, capture=(layer,),
                                        bypass=bypass).activations[layer]
            head = model.head(jax.lax.stop_gradient(variables), layer, images)
            out = dropout_at_layer(k_mask, activations, config, head_fn=head, labels=labels, step=step)
            run = model.forward(variables, images, rng=k_model, capture=capture, bypass=bypass,
                                replace={layer: lambda _: out.activations})
        else:
            holder: dict = {}

            def replace(a):
                holder["original"] = a
                holder["out"] = dropout_at_layer(k_mask, a, config, step=step)
                return holder["out"].activations

            run = model.forward(variables, images, rng=k_model, capture=capture, bypass=bypass,
                                replace={layer: replace})
            out = holder["out"]
            activations = holder.get("original")
        updates = dict(run.updates)
        updates["dropout"] = {"mask": out.mask, "retain": out.retain, "p_eb": out.p_eb}
        if wants_layer:
            return run.logits, updates, {**run.activations, layer: model.reshaped(layer, activations)}
        return run.logits, updates, run.activations

    return forward


@register_scheme("dropout", DropoutConfig)
def dropout_scheme(config: DropoutConfig, layers: ModelLayers | None = None) -> Scheme:
    """A dropout scheme (Excitation Dropout or a baseline) as a training scheme: a training forward pass.

    The forward of :func:`make_dropout_forward` at ``config.layer``. ``scheme="none"`` without ``bypass`` is plain
    training (``Scheme()``: the model's own forward).

    Args:
      config: the scheme and the layer.
      layers: unused (the dropout layer is ``config.layer``); accepted for the scheme registry.

    Returns:
      A :class:`~saliency_jax.training.Scheme` whose forward reports the metrics ``kept_fraction`` (mean of the
      masks), ``retain_probability`` (mean retaining probability) and, for the EB schemes, ``peak_p_eb`` (batch mean
      of each image's largest ``p_EB``).
    """
    del layers
    if config.scheme == "none" and not config.bypass:
        return Scheme()

    def forward(ctx, batch, capture):
        fwd = make_dropout_forward(ctx.model, config)
        logits, updates, activations = fwd(ctx.variables, batch["image"], batch["label"], ctx.key, ctx.step,
                                           capture)
        diagnostics = updates.pop("dropout")
        metrics = {"kept_fraction": jnp.mean(diagnostics["mask"]),
                   "retain_probability": jnp.mean(diagnostics["retain"])}
        if config.scheme in _EB_SCHEMES:
            p_eb = diagnostics["p_eb"].reshape(diagnostics["p_eb"].shape[0], -1)
            metrics["peak_p_eb"] = jnp.mean(jnp.max(p_eb, axis=-1))
        return Forward(logits, updates, activations, metrics)

    return Scheme(forward=forward)
