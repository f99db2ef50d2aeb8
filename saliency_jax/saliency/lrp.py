"""Layer-wise relevance propagation (LRP): epsilon, alpha-beta and z+ rules on unmodified models.

Bach, Binder, Montavon, Klauschen, Mueller, Samek, "On Pixel-Wise Explanations for Non-Linear Classifier Decisions
by Layer-Wise Relevance Propagation", PLOS ONE 2015; Montavon, Binder, Lapuschkin, Samek, Mueller, "Layer-Wise
Relevance Propagation: An Overview", in *Explainable AI*, LNCS 11700, 2019. The relevance of the explained output,
``R = f_c(x)`` (the target logit), is redistributed layer by layer down to the input pixels. For a dense or
convolution layer ``z_j = sum_i x_i w_ij + b_j`` with relevance ``R_j`` at its outputs:

* **LRP-epsilon** (Bach 2015, section "Pixel-wise decomposition for multilayer networks", the epsilon-stabilised
  rule; Montavon 2019, Sec. 10.2.1): ``R_i = sum_j x_i w_ij / (z_j + eps sign(z_j)) R_j`` with ``sign(0) = 1``;
  ``epsilon -> 0`` is LRP-0 (gradient x input on a ReLU network without biases).
* **LRP-alpha-beta** (Bach 2015, same section): ``R_i = sum_j (alpha (x_i w_ij)^+ / z_j^+ - beta (x_i w_ij)^- /
  z_j^-) R_j`` with ``z_j^+ = sum_i (x_i w_ij)^+ + b_j^+``, ``z_j^- = sum_i (x_i w_ij)^- + b_j^-`` and
  ``alpha - beta = 1``; alpha=2, beta=1 and alpha=1, beta=0 are the usual choices.
* **LRP-z+** (Montavon et al., Pattern Recognition 2017, deep Taylor decomposition; LRP-gamma with
  gamma -> infinity in Montavon 2019, Sec. 10.2.1): alpha-beta with alpha=1, beta=0.

Products ``(x_i w_ij)^+`` are split by the signs of both factors (``x^+ w^+ + x^- w^-`` and ``x^+ w^- + x^- w^+``),
so signed inputs (normalised pixels) are handled; the z+ / alpha-beta denominators use ``stabilizer`` in the same
``+ eps sign`` form. The other layers, as zennit (``zennit.composites.layer_map_base``) treats them:

* ReLU (``max(x, 0)``), ``tanh``, sigmoid and clipping: relevance passes unchanged (zennit's ``Pass``);
* max pooling and ``jnp.where``: relevance goes to the selected element (the gradient);
* sum / average / global average pooling, spatial means: ``R_i = x_i L^T(R / stab(L(x)))`` with ``stabilizer``
  (zennit's ``Norm``);
* residual sums ``x_1 + x_2``: ``R_k = x_k R / stab(x_1 + x_2)`` (zennit's ``Norm`` on the ``Sum`` its
  ``ResNetCanonizer`` inserts);
* element-wise affine operations with parameter operands that directly follow a dense / conv / pooling layer -
  its bias, an inference-mode batch norm, an average pool's ``1 / n`` - are **merged into that layer** before the
  rule is applied (weights ``s * W``, bias ``t`` for ``y = s * L(x) + t``), as zennit's ``MergeBatchNorm`` /
  ``ResNetCanonizer`` canonizers merge batch norm into the preceding conv; elsewhere (e.g. an input normalisation
  ``(x - mean) / std`` before the first conv) they pass relevance unchanged (zennit's ``Pass`` for batch norm);
* reshapes, flattening, transposes, slices, concatenation, padding, dtype conversion: relevance is moved like the
  gradient; ``jax.jit``, ``jax.checkpoint`` and custom-derivative wrappers are looked through.

Every dense and convolution layer gets the chosen rule, the first one included (no special input-layer rule such as
z^B / flat). This equals zennit's ``LayerMapComposite(layer_map_base(stabilizer) + [(Linear, Epsilon(epsilon) |
AlphaBeta(alpha, beta, stabilizer) | ZPlus(stabilizer))])`` on the same network with batch norm merged
(``ResNetCanonizer`` / ``SequentialMergeBatchNorm``); the tests check this. The input relevance is returned as is
(zennit's attribution: the first layer's rule already multiplies by the input, nothing is multiplied afterwards).

How: :func:`~saliency_jax.saliency._lrp_rules.with_lrp_rules` re-evaluates the model's jaxpr with each primitive
bound through a ``jax.custom_vjp`` function carrying its LRP rule (the machinery of Excitation Backprop), so linen /
NNX modules and plain functions work unmodified; one forward and one backward pass per batch. Anything else the
relevance reaches (softmax, GELU/SiLU products, layer norm, batch norm with batch statistics, attention, loops)
raises :class:`~saliency_jax.saliency._eb_rules.UnsupportedOperationError` naming the primitive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from saliency_jax.saliency._lrp_rules import RULE_NAMES, with_lrp_rules
from saliency_jax.saliency.core import (check_images, invalid_examples, mark_invalid, normalize_maps,
                                       resolve_targets, target_one_hot)

Array = jax.Array
Reduction = Literal["sum", "abs_sum", "none"]

__all__ = ["lrp", "with_lrp_rules"]

_REDUCTIONS = ("sum", "abs_sum", "none")


def _output_relevance(logits: Array, targets, prior: Array | None) -> tuple[Array, Array]:
    """The relevance put on the outputs, ``coefficient * logits``, and the coefficients (NaN rows: invalid)."""
    if prior is None:
        coefficients = target_one_hot(resolve_targets(targets, logits), logits.shape[-1], dtype=logits.dtype)
    else:
        if targets is not None:
            raise ValueError("give either targets (the relevance of those classes) or prior, not both")
        coefficients = jnp.asarray(prior)
        if coefficients.shape != logits.shape:
            raise ValueError(f"prior must have the logits' shape [batch, num_classes] = {tuple(logits.shape)}; got "
                             f"{tuple(coefficients.shape)}")
        if not jnp.issubdtype(coefficients.dtype, jnp.floating):
            raise TypeError(f"prior must be float coefficients over the outputs; got dtype {coefficients.dtype}")
        coefficients = coefficients.astype(logits.dtype)
    return coefficients * logits, coefficients


def lrp(
    logits_fn: Callable[[Array], Array],
    images: Array,
    targets: Array | int | None = None,
    *,
    rule: Literal["epsilon", "alpha_beta", "zplus"] = "epsilon",
    epsilon: float = 1e-6,
    alpha: float = 2.0,
    beta: float = 1.0,
    stabilizer: float = 1e-6,
    prior: Array | None = None,
    reduction: Reduction = "sum",
    normalize: bool = False,
) -> Array:
    """LRP relevance of the input pixels for a batch, in one forward and one backward pass (Bach et al. 2015).

    Args:
      logits_fn: ``images -> logits [batch, num_classes]`` in inference mode (e.g.
        ``functools.partial(module.apply, variables, train=False)``), built from the layers listed in the module
        docstring.
      images: [batch, height, width, channels] float.
      targets: the class to explain per example: ``None`` (predicted class), an ``int`` or int [batch]. Its logit
        is the relevance put on the output (Bach 2015, Sec. 2.1). None when ``prior`` is given.
      rule: the rule of every dense / conv layer: ``"epsilon"``, ``"alpha_beta"`` or ``"zplus"``.
      epsilon: LRP-epsilon's stabiliser (zennit's default 1e-6; Montavon 2019 uses about 0.25 times the standard
        deviation of ``z_j`` for a sparser map).
      alpha, beta: LRP-alpha-beta's weights of positive and negative contributions (``alpha - beta = 1``;
        ``alpha=1, beta=0`` equals z+).
      stabilizer: the denominators' epsilon of z+, alpha-beta, pooling and residual sums (zennit's default 1e-6).
      prior: optional [batch, num_classes] float coefficients ``c`` instead of a class: the output relevance is
        ``c * logits`` (a target function linear in the outputs, e.g. several classes at once).
      reduction: ``"sum"`` (default: the signed channel sum, zennit's usual heatmap), ``"abs_sum"``, or ``"none"``
        (the relevance ``[batch, height, width, channels]``).
      normalize: per-example min-max normalisation to [0, 1].

    Returns:
      float32 [batch, height, width] (``[batch, height, width, channels]`` with ``reduction="none"``). Without
      biases and with ``epsilon -> 0`` (or z+ / alpha-beta with non-zero denominators) each example's relevance sums
      to the target logit (conservation, Bach 2015, Eq. 2). NaN for examples with a NaN / inf pixel or an
      out-of-range target under ``jit``.

    Raises:
      ValueError: bad image rank, logits not ``[batch, num_classes]``, bad targets / prior, an unknown rule or
        reduction, alpha - beta != 1.
      TypeError: non-float images or prior, non-integer targets, ``logits_fn`` not callable.
      UnsupportedOperationError: relevance reaches an operation without an LRP rule (named in the message).

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0, -1.0], [2.0, 0.0], [0.0, 1.0]])
      >>> logits_fn = lambda x: jnp.sum(x, axis=(1, 2)) @ w
      >>> r = lrp(logits_fn, jnp.ones((1, 2, 2, 3)), targets=0, reduction="none")
      >>> round(float(r.sum()), 4), [round(float(v), 4) for v in r[0, 0, 0]]
      (12.0, [1.0, 2.0, 0.0])
    """
    if rule not in RULE_NAMES:
        raise ValueError(f"rule must be one of {RULE_NAMES}; got {rule!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be a function images -> logits; got {type(logits_fn).__name__}")
    check_images(images)
    lrp_fn = with_lrp_rules(logits_fn, rule=rule, epsilon=epsilon, alpha=alpha, beta=beta, stabilizer=stabilizer)
    logits, pullback = jax.vjp(lrp_fn, images)
    if getattr(logits, "ndim", None) != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"logits_fn must return logits [batch={images.shape[0]}, num_classes]; got shape "
                         f"{tuple(getattr(logits, 'shape', ()))}")
    relevance_out, coefficients = _output_relevance(logits, targets, prior)
    (relevance,) = pullback(jnp.nan_to_num(relevance_out, nan=0.0))
    invalid = invalid_examples(images=images) | ~jnp.all(jnp.isfinite(coefficients), axis=-1)
    relevance = mark_invalid(relevance.astype(jnp.promote_types(relevance.dtype, jnp.float32)), invalid)
    if reduction == "none":
        return relevance
    maps = jnp.sum(relevance, axis=-1) if reduction == "sum" else jnp.sum(jnp.abs(relevance), axis=-1)
    return normalize_maps(maps) if normalize else maps
