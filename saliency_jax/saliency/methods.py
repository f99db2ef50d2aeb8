"""One calling convention for every saliency method: ``saliency_map(name, view, images, targets)``.

Every method of :data:`METHODS` takes the same arguments and returns maps of one shape:

* ``view``: a :class:`~saliency_jax.saliency.views.ModelView` (:func:`~saliency_jax.saliency.views.linen_view`,
  :func:`~saliency_jax.saliency.views.nnx_view`, :func:`~saliency_jax.saliency.views.function_view`), or anything
  :func:`~saliency_jax.saliency.views.as_view` accepts (a ``LayerModel``, a function ``images -> logits``);
* ``images``: [batch, height, width, channels] float;
* ``targets``: what to explain per example - ``None`` (the predicted class), an ``int`` class for all examples,
  int [batch] classes, **several classes per example** (int [batch, k], or :func:`~saliency_jax.saliency.
  target_sets.top_k` for each example's ``k`` most likely classes; methods with ``target_sets=True``: the maps of
  all ``k`` from one forward and one batched backward, :mod:`saliency_jax.saliency.target_sets`), or a **target
  function** ``target(outputs) -> [batch]`` score of the model's outputs (a
  multi-label combination, a segmentation region's score, an embedding similarity; like pytorch-grad-cam's target
  objects; :func:`weighted_outputs`, :func:`region_score`, :func:`cosine_similarity` build common ones);
* result: float32 maps ``[batch, height, width]`` (``[batch, k, height, width]`` for several targets per example)
  at the input resolution (layer maps are resized bilinearly), min-max normalised per map to [0, 1] unless
  ``normalize=False``;
* several layers: a view built with a list of layer paths (``linen_view(module, variables, ["layer3",
  "layer4"])``) is taken by the CAM methods with ``several_layers=True``, which average the layers' normalised
  maps as pytorch-grad-cam's ``target_layers`` (:mod:`saliency_jax.saliency.layer_cams`);
* ``return_extras=True`` returns an :class:`Explanation` with the method's extras (Excitation Backprop's
  ``probability``, the layer-resolution map, the unreduced input attribution, ...).

Target functions per method:

* gradient methods (Grad-CAM, Grad-CAM++, gradients, guided backprop, integrated gradients, SmoothGrad) and RISE
  differentiate / average the score ``target(outputs)`` itself (``score`` must then be left at or set to
  ``"logit"``: the function is the score);
* Excitation Backprop and contrastive EB propagate a top-down *prior over the outputs* (Zhang et al. 2016, Eq. 4):
  a target function is accepted when it is linear in the outputs - then the prior is its coefficient vector per
  example, ``prior[b] = d target_b / d outputs[b]`` (a constant term is dropped, as EB ignores biases) - and
  raises ``ValueError`` otherwise (softmax, products, norms). Give a non-linear combination as an explicit
  ``prior=`` array if that is what you mean;
* CAM is defined per class and takes class indices only.
* LRP (``"lrp_epsilon"``, ``"lrp_alpha_beta"``, ``"lrp_zplus"``) starts from relevance ``c * outputs``: a one-hot
  ``c`` on the class (the target logit, Bach et al. 2015), or, for a target function linear in the outputs, its
  coefficients as for EB. Maps are the signed channel sum of the input relevance (``reduction="sum"``); the
  relevance ``[batch, height, width, channels]`` is ``extras["attribution"]``.

SmoothGrad (``"smooth_grad"``, option ``base=`` any deterministic method) averages the base method's raw maps over
noisy copies - for the input-gradient bases the raw attribution, reduced over channels afterwards, as PAIR saliency
does - and normalises the average.

The low-level functions (``grad_cam(layer_model, ...)``, ``excitation_backprop(...)``, ``vanilla_gradient(
logits_fn, ...)``, ...) remain the API underneath with their own defaults; :func:`saliency_map` gives the same
numbers (tests compare them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import importlib

# Submodules by path: the package namespace binds some of these names to the functions they define.
_cam = importlib.import_module("saliency_jax.saliency.cam")
_eb = importlib.import_module("saliency_jax.saliency.excitation_backprop")
_gradients = importlib.import_module("saliency_jax.saliency.gradients")
_grad_cam = importlib.import_module("saliency_jax.saliency.grad_cam")
_lrp = importlib.import_module("saliency_jax.saliency.lrp")
_rise = importlib.import_module("saliency_jax.saliency.rise")
_layer_cams = importlib.import_module("saliency_jax.saliency.layer_cams")
_occlusion = importlib.import_module("saliency_jax.saliency.occlusion")
_sets = importlib.import_module("saliency_jax.saliency.target_sets")
from saliency_jax.saliency.core import (
    at_least_float32,
    check_images,
    invalid_examples,
    degenerate_maps,
    mark_invalid,
    resize_maps,
    resolve_targets,
)
from saliency_jax.saliency.views import ModelView, as_view

Array = jax.Array
Target = Callable[[Array], Array]

__all__ = [
    "METHODS",
    "Explanation",
    "Method",
    "cosine_similarity",
    "region_score",
    "saliency_map",
    "saliency_maps",
    "weighted_outputs",
]


class Explanation(NamedTuple):
    """What :func:`saliency_map` returns with ``return_extras=True``.

    Attributes:
      maps: float32 [batch, height, width] (normalised to [0, 1] per example when ``normalize``).
      extras: method-specific arrays, e.g. ``"layer_map"`` [batch, h, w] (the map at the layer's resolution, before
        resizing and normalising), ``"probability"`` [batch, h, w, channels] (EB's marginal winning probabilities),
        ``"attribution"`` [batch, height, width, channels] (an input-gradient method's unreduced attribution), and
        for every method ``"degenerate"`` bool [batch]: the maps that carry no information, constant (e.g. all zeros:
        no position with positive evidence, or a 1x1 layer) or non-finite
        (:func:`~saliency_jax.saliency.core.degenerate_maps`).
    """

    maps: Array
    extras: dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered saliency method.

    Attributes:
      name: its key in :data:`METHODS`.
      fn: ``fn(view, images, targets, **options) -> (maps [batch, height, width] float32 unnormalised, extras)``.
      paper: the source.
      layer: what it needs of the model (``"none"``: only ``output_fn``; ``"spatial layer"``: a layer
        ``[batch, h, w, channels]`` or tokens reshaped to a grid).
      cost: forward / backward passes per batch.
      targets: ``"score"`` (any target function), ``"linear"`` (class indices, or a target function linear in
        the outputs, turned into EB's prior) or ``"class"`` (class indices only).
      needs_key: whether it is random (takes ``key=``).
      target_sets: whether it takes several targets per example (int [batch, k], :func:`top_k`) and returns
        [batch, k, height, width] maps from one forward (and one batched backward).
      several_layers: whether it takes a view split at several layers (a list of layer paths) and aggregates
        their maps (pytorch-grad-cam's ``target_layers``).
    """

    name: str
    fn: Callable[..., tuple[Array, dict[str, Array]]]
    paper: str
    layer: str
    cost: str
    targets: str = "score"
    needs_key: bool = False
    target_sets: bool = False
    several_layers: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Target functions.


def weighted_outputs(weights: Array) -> Target:
    """``target(outputs) = sum_k weights[k] * outputs[:, k]`` - e.g. a multi-label attribute set (linear: EB too).

    Args:
      weights: [num_outputs] or [batch, num_outputs] float.
    """
    weights = jnp.asarray(weights)

    def target(outputs):
        return jnp.sum(outputs * weights.astype(outputs.dtype), axis=-1)

    return target


def region_score(mask: Array, class_index: int) -> Target:
    """Segmentation target: the sum of ``outputs[b, y, x, class_index]`` over a region (pytorch-grad-cam's
    ``SemanticSegmentationTarget``). Linear: EB too, if the model's outputs are ``[batch, num_outputs]``.

    Args:
      mask: [height, width] or [batch, height, width] float / bool, the region (1 inside).
      class_index: the segmentation class.
    """
    mask = jnp.asarray(mask)

    def target(outputs):
        if outputs.ndim != 4:
            raise ValueError(f"region_score needs segmentation outputs [batch, h, w, classes]; got shape "
                             f"{tuple(outputs.shape)}")
        return jnp.sum(outputs[..., class_index] * mask.astype(outputs.dtype), axis=(-2, -1))

    return target


def cosine_similarity(reference: Array) -> Target:
    """Embedding target: cosine similarity of each output embedding to ``reference`` (pytorch-grad-cam's
    ``SimilarityToConceptTarget``). Not linear: gradient methods and RISE only.

    Args:
      reference: [dim] or [batch, dim] float.
    """
    reference = jnp.asarray(reference)

    def target(outputs):
        ref = reference.astype(outputs.dtype)
        num = jnp.sum(outputs * ref, axis=-1)
        den = jnp.linalg.norm(outputs, axis=-1) * jnp.linalg.norm(ref, axis=-1) + 1e-12
        return num / den

    return target


def _score_column(target: Target, outputs: Array) -> Array:
    """``target(outputs)`` checked to be [batch] and returned as a one-output column [batch, 1]."""
    score = target(outputs)
    batch = outputs.shape[0]
    if getattr(score, "shape", None) != (batch,):
        raise ValueError(f"a target function must return one score per example [batch={batch}]; got shape "
                         f"{getattr(score, 'shape', type(score).__name__)}")
    return at_least_float32(score)[:, None]


def _linear_prior(target: Target, view: ModelView, images: Array) -> Array:
    """EB's top-down prior for a target function linear in the outputs: its coefficients per example."""
    shape = jax.eval_shape(view.output_fn, images)
    try:
        score_shape = jax.eval_shape(target, shape)
        if score_shape.shape != (images.shape[0],):
            raise ValueError(f"a target function must return [batch={images.shape[0]}]; got {score_shape.shape}")
        transpose = jax.linear_transpose(target, shape)
        (prior,) = transpose(jnp.ones(score_shape.shape, score_shape.dtype))
    except ValueError:
        raise
    except Exception as e:  # jax raises several error types for a function that is not linear
        raise ValueError(
            "Excitation Backprop propagates a top-down prior over the outputs, so a target function must be linear "
            "in the outputs (e.g. weighted_outputs); this one is not (softmax, products, norms ...). Pass targets "
            f"as classes or an explicit prior= [batch, num_outputs] instead. ({type(e).__name__}: {e})") from e
    return prior


# ---------------------------------------------------------------------------------------------------------------
# Methods.


def _resize(layer_map: Array, images: Array) -> Array:
    return resize_maps(layer_map, images.shape[1:3])


def _spatial_layer(view: ModelView, method: str, images: Array):
    """The view's layer model, checked to give [batch, h, w, channels] activations (tokens need a reshape)."""
    lm = view.require_layer(method)
    check_images(images)
    if isinstance(lm.layer, tuple) and not METHODS[method].several_layers:
        raise ValueError(f"{method} explains one layer; the view is split at several {list(lm.layer)} (methods that "
                         f"aggregate layers: {sorted(m for m, s in METHODS.items() if s.several_layers)})")
    for name, s in zip(lm.layers, lm.activation_shapes(images)):
        if len(s.shape) == 3:
            raise ValueError(f"{method} needs spatial activations [batch, h, w, channels]; layer {name!r} gives "
                             f"{tuple(s.shape)} (transformer tokens?): build the view with reshape=token_grid("
                             "num_prefix_tokens=1)")
    return lm


def _layer_extras(lm, layer_maps) -> dict[str, Any]:
    if isinstance(lm.layer, tuple):
        return {"layer_maps": tuple(layer_maps)}
    return {"layer_map": layer_maps[0]}


def _general(lm, targets) -> bool:
    """Whether a call needs the general path (a target set or several layers) rather than the single one."""
    return _sets.is_target_set(targets) or isinstance(lm.layer, tuple)


def _grad_cam_method(view, images, targets, *, score="logit", weighting="plain", relu=True):
    lm = _spatial_layer(view, "grad_cam", images)
    if _general(lm, targets):
        if weighting not in ("plain", "guided"):
            raise ValueError(f"weighting must be 'plain' or 'guided'; got {weighting!r}")
        cam = lambda a, g: _layer_cams.grad_cam_map(a, g, weighting)  # noqa: E731
        maps, layer_maps = _layer_cams.gradient_cam(lm, images, targets, cam=cam, score=score, relu=relu)
        return maps, _layer_extras(lm, layer_maps)
    layer_map = _grad_cam.grad_cam(lm, images, targets, score=score, weighting=weighting, relu=relu, resize=False,
                                   normalize=False)
    return _resize(layer_map, images), {"layer_map": layer_map}


def _grad_cam_plus_plus_method(view, images, targets, *, score="logit", relu=True, eps=1e-6):
    lm = _spatial_layer(view, "grad_cam_plus_plus", images)
    if _general(lm, targets):
        cam = lambda a, g: _layer_cams.grad_cam_plus_plus_map(a, g, eps)  # noqa: E731
        maps, layer_maps = _layer_cams.gradient_cam(lm, images, targets, cam=cam, score=score, relu=relu)
        return maps, _layer_extras(lm, layer_maps)
    layer_map = _cam.grad_cam_plus_plus(lm, images, targets, score=score, relu=relu, resize=False, normalize=False,
                                        eps=eps)
    return _resize(layer_map, images), {"layer_map": layer_map}


def _gradient_cam_method(name, cam):
    def method(view, images, targets, *, score="logit", relu=True):
        lm = _spatial_layer(view, name, images)
        maps, layer_maps = _layer_cams.gradient_cam(lm, images, targets, cam=cam, score=score, relu=relu)
        return maps, _layer_extras(lm, layer_maps)

    return method


def _eigen_cam_method(view, images, targets):
    lm = _spatial_layer(view, "eigen_cam", images)
    maps, layer_maps = _layer_cams.eigen_cam(lm, images, targets)
    return maps, _layer_extras(lm, layer_maps)


def _score_cam_method(view, images, targets, *, score="logit", masks_per_step=16):
    lm = _spatial_layer(view, "score_cam", images)
    maps, layer_maps = _layer_cams.score_cam(lm, images, targets, score=score, masks_per_step=masks_per_step)
    return maps, _layer_extras(lm, layer_maps)


def _occlusion_method(view, images, targets, **options):
    return _occlusion.occlusion(view.output_fn, images, targets, **options), {}


def _cam_method(view, images, targets, *, classifier, relu=False):
    lm = _spatial_layer(view, "cam", images)
    if isinstance(classifier, str):
        if view.variables is None:
            raise ValueError("classifier given as a module path needs a linen_view; pass classifier=(kernel, bias)")
        kernel, bias = _cam.classifier_params(view.variables, classifier)
    else:
        kernel, bias = classifier
    logits, features = lm(images)
    if features.ndim != 4:
        raise ValueError(f"CAM needs spatial features [batch, h, w, channels] at layer {lm.layer!r}; got "
                         f"{tuple(features.shape)}")
    kernel = _cam._classifier_matrix(kernel, features.shape[-1])
    pooled = jnp.mean(at_least_float32(features), axis=(1, 2)) @ at_least_float32(kernel)
    if bias is not None:
        pooled = pooled + at_least_float32(jnp.asarray(bias))
    if getattr(logits, "shape", None) != pooled.shape:
        raise ValueError(f"CAM: the model's outputs {getattr(logits, 'shape', None)} are not the classifier applied "
                         f"to the pooled features of {lm.layer!r} {pooled.shape}")
    f_np, p_np = _cam._concrete(logits), _cam._concrete(pooled)
    if f_np is not None and p_np is not None:
        import numpy as np

        tol = 1e-4 * max(1.0, float(np.abs(f_np).max()))
        if not np.allclose(f_np, p_np, rtol=1e-3, atol=tol):
            raise ValueError(f"CAM needs a global-average-pooling network: the logits are not classifier(mean of "
                             f"{lm.layer!r}) (max difference {float(np.abs(f_np - p_np).max()):.3g})")
    if _sets.is_target_set(targets):
        classes = _sets.resolve_target_set(targets, logits)
        layer_map = _cam.class_activation_maps(features, kernel, bias, classes)
        layer_map = jnp.maximum(layer_map, 0.0) if relu else layer_map
        layer_map = _sets.mark_invalid_sets(layer_map, images, classes, logits.shape[-1])
        return _layer_cams._resize_any(layer_map, tuple(images.shape[1:3])), {"layer_map": layer_map}
    classes = resolve_targets(targets, logits)
    layer_map = _cam.class_activation_map(features, kernel, bias, classes, relu=relu)
    layer_map = mark_invalid(layer_map, invalid_examples(images=images))
    return _resize(layer_map, images), {"layer_map": layer_map}


def _excitation(contrastive: bool):
    low = _eb.contrastive_excitation_backprop if contrastive else _eb.excitation_backprop
    name = "contrastive_excitation_backprop" if contrastive else "excitation_backprop"

    def method(view, images, targets, *, prior=None):
        lm = _spatial_layer(view, name, images)
        if _sets.is_target_set(targets):
            if prior is not None:
                raise ValueError("give either several targets per example or prior=, not both")
            probability, _ = _sets.excitation_signals(lm, images, targets, contrastive=contrastive)
            b, k = probability.shape[:2]
            flat = _eb._finish(probability.reshape((b * k, *probability.shape[2:])), images, lm.layer, contrastive,
                               False, False)
            layer_map = flat.saliency.reshape((b, k, *flat.saliency.shape[1:]))
            return (_layer_cams._resize_any(layer_map, tuple(images.shape[1:3])),
                    {"layer_map": layer_map, "probability": probability})
        if callable(targets):
            if prior is not None:
                raise ValueError("give either a target function or prior=, not both")
            prior, targets = _linear_prior(targets, view, images), None
        result = low(lm, images, targets, prior=prior)
        return _resize(result.saliency, images), {"layer_map": result.saliency, "probability": result.probability}

    return method


def _input_gradient(low, times_input: bool | None = None):
    def method(view, images, targets, *, score="logit", reduction="abs_sum", **options):
        if reduction == "none":
            raise ValueError("saliency_map returns [batch, height, width] maps; the unreduced attribution is "
                             "extras['attribution'] (return_extras=True)")
        if _sets.is_target_set(targets):
            if times_input is None:
                raise ValueError(f"{low.__name__} takes one target per example (target sets: "
                                 f"{sorted(m for m, s in METHODS.items() if s.target_sets)})")
            _gradients._check_reduction(reduction)
            gradient, _, _ = _sets.input_gradients(view.output_fn, images, targets, score=score)
            attribution = images[:, None].astype(jnp.float32) * gradient if times_input else gradient
            b, k = attribution.shape[:2]
            maps = _gradients.reduce_attribution(attribution.reshape((b * k, *attribution.shape[2:])), reduction)
            return maps.reshape((b, k, *maps.shape[1:])), {"attribution": attribution}
        attribution = low(view.output_fn, images, targets, score=score, reduction="none", **options)
        return _gradients.reduce_attribution(attribution, reduction), {"attribution": attribution}

    return method


def _lrp_method(rule: str, rule_options: tuple[str, ...]):
    name = f"lrp_{rule}"

    def method(view, images, targets, *, prior=None, reduction="sum", **options):
        unknown = sorted(set(options) - set(rule_options))
        if unknown:
            raise TypeError(f"{name} got unexpected options {unknown}; it takes prior=, reduction= and "
                            f"{', '.join(o + '=' for o in rule_options)}")
        if reduction == "none":
            raise ValueError("saliency_map returns [batch, height, width] maps; the unreduced relevance is "
                             "extras['attribution'] (return_extras=True)")
        if callable(targets):
            if prior is not None:
                raise ValueError("give either a target function or prior=, not both")
            prior, targets = _linear_prior(targets, view, images), None
        relevance = _lrp.lrp(view.output_fn, images, targets, rule=rule, prior=prior, reduction="none", **options)
        return _gradients.reduce_attribution(relevance, reduction), {"attribution": relevance}

    return method


def _rise_method(view, images, targets, *, key, num_masks=4000, grid_size=7, p=0.5, score="softmax",
                 masks_per_step=100):
    maps = _rise.rise(view.output_fn, key, images, targets, num_masks=num_masks, grid_size=grid_size, p=p,
                      score=score, masks_per_step=masks_per_step)
    return maps, {}


_GRADIENT_FAMILY = ("vanilla_gradient", "gradient_x_input", "guided_backprop", "integrated_gradients")


def _smooth_grad_method(view, images, targets, *, key, base="vanilla_gradient", num_samples=50, noise_level=0.15,
                        magnitude=False, samples_per_step=10, **base_options):
    if base not in METHODS or METHODS[base].needs_key:
        raise ValueError(f"smooth_grad averages a deterministic method of METHODS; got base={base!r}")
    base_fn = METHODS[base].fn
    if base in _GRADIENT_FAMILY:  # average the raw attribution, then reduce (PAIR saliency, Smilkov et al.)
        reduction = base_options.pop("reduction", "abs_sum")

        def method(x, t):
            return base_fn(view, x, t, **base_options)[1]["attribution"]

        raw = _gradients.smooth_grad(method, key, images, targets, num_samples=num_samples, noise_level=noise_level,
                                     magnitude=magnitude, samples_per_step=samples_per_step)
        return _gradients.reduce_attribution(raw, reduction), {"attribution": raw}

    def method(x, t):
        return base_fn(view, x, t, **base_options)[0]

    maps = _gradients.smooth_grad(method, key, images, targets, num_samples=num_samples, noise_level=noise_level,
                                  magnitude=magnitude, samples_per_step=samples_per_step)
    return maps, {}


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("grad_cam", _grad_cam_method, "Selvaraju et al., ICCV 2017", "spatial layer", "1 forward + 1 backward",
           target_sets=True, several_layers=True),
    Method("grad_cam_plus_plus", _grad_cam_plus_plus_method, "Chattopadhyay et al., WACV 2018", "spatial layer",
           "1 forward + 1 backward", target_sets=True, several_layers=True),
    Method("hirescam", _gradient_cam_method("hirescam", _layer_cams.hirescam_map), "Draelos & Carin, 2020",
           "spatial layer", "1 forward + 1 backward", target_sets=True, several_layers=True),
    Method("layer_cam", _gradient_cam_method("layer_cam", _layer_cams.layer_cam_map), "Jiang et al., IEEE TIP 2021",
           "spatial layer", "1 forward + 1 backward", target_sets=True, several_layers=True),
    Method("xgrad_cam", _gradient_cam_method("xgrad_cam", _layer_cams.xgrad_cam_map), "Fu et al., BMVC 2020",
           "spatial layer", "1 forward + 1 backward", target_sets=True, several_layers=True),
    Method("eigen_cam", _eigen_cam_method, "Muhammad & Yeasin, IJCNN 2020", "spatial layer", "1 forward + 1 SVD",
           targets="class", target_sets=True, several_layers=True),
    Method("score_cam", _score_cam_method, "Wang et al., CVPR-W 2020", "spatial layer",
           "1 + channels forwards (per layer)", target_sets=True, several_layers=True),
    Method("cam", _cam_method, "Zhou et al., CVPR 2016", "spatial layer pooled into a dense classifier (classifier=)",
           "1 forward", targets="class", target_sets=True),
    Method("excitation_backprop", _excitation(False), "Zhang et al., ECCV 2016", "spatial layer (EB-supported "
           "ops above it)", "1 forward + 1 backward", targets="linear", target_sets=True),
    Method("contrastive_excitation_backprop", _excitation(True), "Zhang et al., ECCV 2016", "spatial layer "
           "(EB-supported ops above it)", "1 forward + 1 backward", targets="linear", target_sets=True),
    Method("vanilla_gradient", _input_gradient(_gradients.vanilla_gradient, False), "Simonyan et al., ICLR-W 2014",
           "none", "1 forward + 1 backward", target_sets=True),
    Method("gradient_x_input", _input_gradient(_gradients.gradient_x_input, True), "Shrikumar et al., 2016", "none",
           "1 forward + 1 backward", target_sets=True),
    Method("guided_backprop", _input_gradient(_gradients.guided_backprop), "Springenberg et al., ICLR-W 2015",
           "none (ReLU network)", "1 forward + 1 backward"),
    Method("integrated_gradients", _input_gradient(_gradients.integrated_gradients), "Sundararajan et al., ICML "
           "2017", "none", "num_steps forwards + backwards"),
    Method("smooth_grad", _smooth_grad_method, "Smilkov et al., 2017", "as its base method",
           "num_samples x base", needs_key=True),
    Method("lrp_epsilon", _lrp_method("epsilon", ("epsilon", "stabilizer")), "Bach et al., PLOS ONE 2015; "
           "Montavon et al. 2019", "none (LRP rules: dense/conv, pooling, ReLU, inference BN, residual sums)",
           "1 forward + 1 backward", targets="linear"),
    Method("lrp_alpha_beta", _lrp_method("alpha_beta", ("alpha", "beta", "stabilizer")), "Bach et al., PLOS ONE "
           "2015", "none (as lrp_epsilon)", "1 forward + 1 backward (4 products per dense/conv layer)",
           targets="linear"),
    Method("lrp_zplus", _lrp_method("zplus", ("stabilizer",)), "Montavon et al., Pattern Recognit. 2017", "none "
           "(as lrp_epsilon)", "1 forward + 1 backward (2 products per dense/conv layer)", targets="linear"),
    Method("rise", _rise_method, "Petsiuk et al., BMVC 2018", "none (black box)", "num_masks forwards",
           needs_key=True),
    Method("occlusion", _occlusion_method, "Zeiler & Fergus, ECCV 2014 (Captum's Occlusion)", "none (black box)",
           "1 + windows forwards", target_sets=True),
]}


def saliency_map(method: str, view: Any, images: Array, targets: Array | int | Target | None = None, *,
                 normalize: bool = True, return_extras: bool = False, key: Array | None = None,
                 **options) -> Array | Explanation:
    """Saliency maps of any registered method, called one way (switching method = changing ``method``).

    Args:
      method: a key of :data:`METHODS` (``"grad_cam"``, ``"grad_cam_plus_plus"``, ``"hirescam"``,
        ``"layer_cam"``, ``"xgrad_cam"``, ``"eigen_cam"``, ``"score_cam"``, ``"cam"``, ``"excitation_backprop"``,
        ``"contrastive_excitation_backprop"``, ``"vanilla_gradient"``, ``"gradient_x_input"``,
        ``"guided_backprop"``, ``"integrated_gradients"``, ``"smooth_grad"``, ``"rise"``, ``"occlusion"``).
      view: a :class:`~saliency_jax.saliency.views.ModelView` (with a layer for the layer methods), a
        ``LayerModel`` or a function ``images -> logits`` (:func:`~saliency_jax.saliency.views.as_view`).
      images: [batch, height, width, channels] float.
      targets: ``None`` (predicted class), ``int``, int [batch], int [batch, k] or ``top_k(k)`` (several per
        example), or a function ``outputs -> [batch]`` (see the module docstring for which methods accept which).
      normalize: per-example min-max normalisation to [0, 1] (the same default for every method).
      return_extras: return an :class:`Explanation` ``(maps, extras)`` instead of the maps.
      key: a PRNG key, required by the random methods (``"smooth_grad"``, ``"rise"``).
      **options: the method's own options, as its low-level function names them (``score``, ``weighting``,
        ``relu``, ``reduction``, ``prior``, ``num_masks``, ``classifier``, ``base`` for SmoothGrad, ...).

    Returns:
      float32 maps [batch, height, width], [batch, k, height, width] for several targets per example (or an
      :class:`Explanation`). Under ``jit``, all-NaN maps for examples with a NaN / inf pixel or an out-of-range
      target class.

    Raises:
      KeyError: an unknown method (the message lists :data:`METHODS`).
      ValueError: the view has no layer for a layer method; several layers or several targets per example where
        the method takes one (the message lists those that do); a target function where the method cannot take it
        (CAM; a non-linear one for EB); a target function with ``score="softmax"``; ``key`` missing for a random
        method; and whatever the low-level function raises (bad shapes, targets, unsupported EB operations).
      TypeError: a view that cannot be built; unknown options.

    Example:
      >>> import jax.numpy as jnp
      >>> from saliency_jax.saliency import function_view, saliency_map
      >>> w = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> view = function_view(None, w, features_fn=lambda p, x: x, head_fn=lambda p, a: a.mean((1, 2)) @ p)
      >>> images = jnp.ones((4, 5, 5, 3))
      >>> [saliency_map(m, view, images, 1).shape for m in ("grad_cam", "excitation_backprop", "vanilla_gradient")]
      [(4, 5, 5), (4, 5, 5), (4, 5, 5)]
    """
    if method not in METHODS:
        raise KeyError(f"unknown saliency method {method!r}; METHODS: {sorted(METHODS)}")
    spec = METHODS[method]
    view = as_view(view)
    check_images(images)
    if spec.needs_key:
        if key is None:
            raise ValueError(f"{method} is random: pass key=jax.random.key(...)")
        options["key"] = key
    elif key is not None:
        raise ValueError(f"{method} is deterministic and takes no key")
    if _sets.is_target_set(targets) and not spec.target_sets:
        raise ValueError(f"{method} takes one target per example; several targets per example (int [batch, k], "
                         f"top_k) are taken by {sorted(m for m, s in METHODS.items() if s.target_sets)}")
    kind = spec.targets
    if method == "smooth_grad":
        base = options.get("base", "vanilla_gradient")
        kind = METHODS[base].targets if base in METHODS else kind
    if callable(targets):
        if kind == "class":
            raise ValueError(f"{method} explains one class per example: targets must be class indices, not a "
                             "function")
        if kind == "score":
            score = options.get("score", "logit")
            if score != "logit":
                raise ValueError(f"a target function is the score itself; {method} cannot also take "
                                 f"score={score!r}")
            options["score"] = "logit"
            target = targets
            view = view.map_outputs(lambda out: _score_column(target, out))
            targets = 0
    maps, extras = spec.fn(view, images, targets, **options)
    maps = at_least_float32(maps)
    if return_extras:
        flat = maps.reshape((-1, *maps.shape[-2:]))
        extras = {**extras, "degenerate": degenerate_maps(flat).reshape(maps.shape[:-2])}
    if normalize:
        maps = _layer_cams.normalize_any(maps)
    return Explanation(maps, extras) if return_extras else maps


# ---------------------------------------------------------------------------------------------------------------
# Several methods on one forward pass.

#: The gradient CAMs that :func:`saliency_maps` computes from one shared backward pass: ``cam(A, g)``.
_SHARED_LAYER_CAMS: dict[str, Callable[[Array, Array], Array]] = {
    "grad_cam": lambda a, g: _layer_cams.grad_cam_map(a, g, "plain"),
    "grad_cam_plus_plus": _layer_cams.grad_cam_plus_plus_map,
    "hirescam": _layer_cams.hirescam_map,
    "layer_cam": _layer_cams.layer_cam_map,
    "xgrad_cam": _layer_cams.xgrad_cam_map,
}
#: The input-gradient methods that share that backward pass: whether the gradient is multiplied by the input.
_SHARED_INPUT = {"vanilla_gradient": False, "gradient_x_input": True}
#: Excitation Backprop and contrastive EB: whether contrastive.
_SHARED_EXCITATION = {"excitation_backprop": False, "contrastive_excitation_backprop": True}


def _as_target_set(targets: Any, batch: int) -> Any:
    """One target per example as a target set of one column (``None`` = the predicted class = ``top_k(1)``)."""
    if _sets.is_target_set(targets):
        return targets
    if targets is None:
        return _sets.top_k(1)
    if isinstance(targets, int):
        return jnp.full((batch, 1), targets, jnp.int32)
    return jnp.reshape(targets, (-1, 1))


def saliency_maps(methods: Any, view: Any, images: Array, targets: Array | int | None = None, *,
                  score: str = "logit", normalize: bool = True) -> dict[str, Array]:
    """Maps of several methods for one batch, sharing the forward pass and every backward pass that can be shared.

    What is shared (the maps equal :func:`saliency_map`'s, each method at its defaults, up to float rounding):

    * the gradient CAMs (``"grad_cam"``, ``"grad_cam_plus_plus"``, ``"hirescam"``, ``"layer_cam"``,
      ``"xgrad_cam"``) and the input gradients (``"vanilla_gradient"``, ``"gradient_x_input"``, reduced with
      ``"abs_sum"``): **one** forward (``jax.vjp`` with respect to the images and the view's layer) and **one**
      backward pass, ``vmap``-ed over the ``k`` score cotangents of a target set - the layer's gradient is read
      on the way down to the input's;
    * Excitation Backprop and contrastive EB: one EB-ruled pullback each, ``vmap``-ed over the ``k`` targets
      (their forward values are the network's; under ``jax.jit`` XLA merges the duplicate forward computations);
    * any other method of :data:`METHODS`: its own :func:`saliency_map` call at its defaults (under ``jit`` its
      forward is merged where it is identical).

    Top-k targets (:func:`~saliency_jax.saliency.target_sets.top_k`) are read from the shared forward pass. Method
    options other than ``score`` are not taken here: call :func:`saliency_map` for a method with other options.

    Args:
      methods: names of :data:`METHODS` (a sequence of str, no duplicates).
      view: as :func:`saliency_map` (a view with a layer when a layer method is asked for).
      images: [batch, height, width, channels] float.
      targets: ``None`` (predicted class), ``int``, int [batch], int [batch, k] or ``top_k(k)``.
      score: ``"logit"`` or ``"softmax"``, for every gradient method.
      normalize: per-map min-max normalisation to [0, 1].

    Returns:
      ``{method: float32 maps}``, [batch, height, width] or [batch, k, height, width] for a target set; all-NaN
      maps for examples with a NaN / inf pixel or an out-of-range target (under ``jit``).

    Raises:
      KeyError: an unknown method. ValueError: duplicate methods, an empty list, a random method (give it a key
      through :func:`saliency_map`), a target function (use :func:`saliency_map`), and what :func:`saliency_map`
      raises for the same method and inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> from saliency_jax.saliency import function_view, saliency_maps, top_k
      >>> w = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
      >>> view = function_view(None, w, features_fn=lambda p, x: x, head_fn=lambda p, a: a.mean((1, 2)) @ p)
      >>> maps = saliency_maps(["grad_cam", "vanilla_gradient"], view, jnp.ones((4, 5, 5, 3)), top_k(2))
      >>> {name: m.shape for name, m in maps.items()}
      {'grad_cam': (4, 2, 5, 5), 'vanilla_gradient': (4, 2, 5, 5)}
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise ValueError("saliency_maps needs at least one method")
    for name in names:
        if name not in METHODS:
            raise KeyError(f"unknown saliency method {name!r}; METHODS: {sorted(METHODS)}")
        if METHODS[name].needs_key:
            raise ValueError(f"{name} is random: call saliency_map({name!r}, ..., key=...) for it")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate methods in {names}")
    if callable(targets):
        raise ValueError("saliency_maps takes class targets; give a target function to saliency_map")
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    view = as_view(view)
    check_images(images)
    several = _sets.is_target_set(targets)
    target_set = _as_target_set(targets, images.shape[0])
    maps: dict[str, Array] = {}

    layer_names = [n for n in names if n in _SHARED_LAYER_CAMS]
    input_names = [n for n in names if n in _SHARED_INPUT]
    if layer_names or input_names:
        if layer_names:
            lm = _spatial_layer(view, layer_names[0], images)
            _layer_cams._check_spatial(lm.activation_shapes(images), lm, layer_names[0])
            multi = isinstance(lm.layer, tuple)
            zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in lm.activation_shapes(images))

            def run(x, perturbations):
                logits, activations = lm(x, perturbations if multi else perturbations[0])
                return logits, (tuple(activations) if multi else (activations,))

            logits, pullback, activations = jax.vjp(run, images, zeros, has_aux=True)
        else:
            logits, pullback = jax.vjp(view.output_fn, images)
        classes = _sets.resolve_target_set(target_set, logits)
        cotangents = jax.vmap(pullback)(_sets._score_cotangents(logits, classes, score))
        input_gradient = jnp.moveaxis(cotangents[0], 0, 1).astype(jnp.float32)
        num_classes = logits.shape[-1]
        gradients = tuple(jnp.moveaxis(g, 0, 1) for g in cotangents[1]) if layer_names else ()
        for name in layer_names:
            layer_maps = tuple(_layer_cams._per_target(_SHARED_LAYER_CAMS[name], a, g)
                               for a, g in zip(activations, gradients))
            maps[name] = _sets.mark_invalid_sets(_layer_cams.image_maps(layer_maps, images, True), images, classes,
                                                 num_classes)
        for name in input_names:
            attribution = (images[:, None].astype(jnp.float32) * input_gradient if _SHARED_INPUT[name]
                           else input_gradient)
            b, k = attribution.shape[:2]
            reduced = _gradients.reduce_attribution(attribution.reshape((b * k, *attribution.shape[2:])), "abs_sum")
            maps[name] = _sets.mark_invalid_sets(reduced.reshape((b, k, *reduced.shape[1:])), images, classes,
                                                 num_classes)

    for name in names:
        if name in _SHARED_EXCITATION:
            maps[name] = METHODS[name].fn(view, images, target_set)[0]
    if not several:  # the shared paths ran on one column
        maps = {name: m[:, 0] for name, m in maps.items()}
    for name in names:
        if name not in maps:
            maps[name] = saliency_map(name, view, images, targets, normalize=False)
    return {name: (_layer_cams.normalize_any(at_least_float32(maps[name])) if normalize
                   else at_least_float32(maps[name])) for name in names}
