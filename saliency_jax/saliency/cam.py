"""CAM and Grad-CAM++: class activation maps from the last convolutional block.

* :func:`class_activation_map` - Zhou, Khosla, Lapedriza, Oliva, Torralba, "Learning Deep Features for
  Discriminative Localization", CVPR 2016, Sec. 2: for a network that ends in global average pooling (GAP) and one
  dense classifier, ``S_c = sum_k w_kc * 1/Z sum_xy f_k(x, y) + b_c``, the class activation map is the classifier
  applied at every position, ``M_c(x, y) = sum_k w_kc f_k(x, y) + b_c`` (Eq. 1-2; the bias is included here, so the
  spatial mean of ``M_c`` equals the logit ``S_c`` exactly). :func:`linen_class_activation_map` reads the features
  and the classifier's kernel/bias out of an unmodified Flax linen module.
* :func:`grad_cam_plus_plus` - Chattopadhyay, Sarkar, Howlader, Balasubramanian, "Grad-CAM++: Generalized
  Gradient-based Visual Explanations for Deep Convolutional Networks", WACV 2018, Eq. 19 with the exponential score
  ``Y^c = exp(S^c)``, whose higher derivatives are powers of the first one:
  ``alpha_ij^kc = g^2 / (2 g^2 + sum_ab A^k_ab g^3)`` with ``g = d S^c / d A^k_ij``, and
  ``w_k^c = sum_ij alpha_ij^kc relu(g)`` (Eq. 10); ``L^c = relu(sum_k w_k^c A^k)``. This is the closed form of
  pytorch-grad-cam's ``GradCAMPlusPlus`` (with its ``1e-6`` in the denominator and ``alpha = 0`` where ``g = 0``).

Both take a whole batch at once with no loop over examples; Grad-CAM++ uses the same batch-sum gradient as
:func:`~saliency_jax.saliency.grad_cam.grad_cam` (see that module).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.saliency.core import (
    LayerModel,
    apply_with_layers,
    at_least_float32,
    check_images,
    invalid_examples,
    mark_invalid,
    normalize_maps,
    resize_maps,
    resolve_targets,
)
from saliency_jax.saliency.grad_cam import Score, class_scores

Array = jax.Array

__all__ = [
    "class_activation_map",
    "class_activation_maps",
    "classifier_params",
    "grad_cam_plus_plus",
    "grad_cam_plus_plus_weights",
    "linen_class_activation_map",
]


# ---------------------------------------------------------------------------------------------------------------
# CAM.


def _classifier_matrix(kernel: Array, channels: int) -> Array:
    """The classifier kernel as [channels, num_classes] (a 1x1 convolution kernel [1, 1, k, n] is accepted)."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim == 4 and kernel.shape[:2] == (1, 1):
        kernel = kernel[0, 0]
    if kernel.ndim != 2 or kernel.shape[0] != channels:
        raise ValueError(f"kernel must be [channels={channels}, num_classes] (a dense layer on the pooled "
                         f"features); got shape {tuple(kernel.shape)}")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"kernel must be floating point; got dtype {kernel.dtype}")
    return kernel


def class_activation_map(
    features: Array,
    kernel: Array,
    bias: Array | None = None,
    targets: Array | int | None = None,
    *,
    size: tuple[int, int] | None = None,
    relu: bool = False,
    normalize: bool = False,
) -> Array:
    """Class activation maps (Zhou et al. 2016, Eq. 2) from pure arrays, for a batch.

    ``M_c(x, y) = sum_k kernel[k, c] * features[x, y, k] + bias[c]``: the classifier of a GAP network applied at
    every position. With the bias included, ``mean_xy M_c(x, y)`` is the network's logit for ``c``.

    Args:
      features: [batch, h, w, channels] float, the last convolutional block's output - exactly the tensor that
        is global-average-pooled into the classifier (after its ReLU).
      kernel: [channels, num_classes] float, the dense classifier's weights (``[1, 1, channels, num_classes]`` for
        a 1x1 convolution classifier).
      bias: optional [num_classes] float; ``None`` omits it (Zhou et al.'s maps, which have no bias).
      targets: the class per example: ``None`` for the predicted class (argmax of ``mean(features) @ kernel +
        bias``), an ``int`` for all examples, or int [batch].
      size: optional (height, width): bilinearly resize the maps (half-pixel centres) to the input size.
      relu: keep only positive evidence (``max(M_c, 0)``), as pytorch-grad-cam displays CAMs.
      normalize: per-example min-max normalisation to [0, 1] (a constant map becomes zeros).

    Returns:
      float32 [batch, h, w] (``[batch, *size]`` when resized).

    Raises:
      ValueError: ``features`` not rank 4, kernel/bias shapes inconsistent with ``features``, bad targets.
      TypeError: non-float ``features`` / ``kernel``, non-integer targets.

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.arange(8.0).reshape(1, 2, 2, 2)
      >>> class_activation_map(f, jnp.eye(2), jnp.array([1.0, 0.0]), targets=0)
      Array([[[1., 3.],
              [5., 7.]]], dtype=float32)
    """
    if getattr(features, "ndim", None) != 4:
        raise ValueError(f"features must be [batch, h, w, channels]; got shape {getattr(features, 'shape', None)}")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise TypeError(f"features must be floating point; got dtype {features.dtype}")
    kernel = _classifier_matrix(kernel, features.shape[-1])
    num_classes = kernel.shape[1]
    if bias is None:
        bias = jnp.zeros((num_classes,), jnp.float32)
    bias = jnp.asarray(bias)
    if bias.shape != (num_classes,):
        raise ValueError(f"bias must be [num_classes={num_classes}]; got shape {tuple(bias.shape)}")
    features, kernel, bias = at_least_float32(features), at_least_float32(kernel), at_least_float32(bias)
    logits = jnp.mean(features, axis=(1, 2)) @ kernel + bias
    classes = resolve_targets(targets, logits)
    safe = jnp.clip(classes, 0, num_classes - 1)
    maps = jnp.einsum("bhwk,kb->bhw", features, kernel[:, safe]) + bias[safe][:, None, None]
    if relu:
        maps = jnp.maximum(maps, 0.0)
    if size is not None:
        maps = resize_maps(maps, tuple(size))
    if normalize:
        maps = normalize_maps(maps)
    return mark_invalid(maps, invalid_examples(images=features, classes=classes, num_classes=num_classes))


def class_activation_maps(features: Array, kernel: Array, bias: Array | None, classes: Array) -> Array:
    """Class activation maps (Zhou et al. 2016, Eq. 2; bias included) of several classes per example.

    ``M[b, j](x, y) = sum_k kernel[k, classes[b, j]] * features[b, x, y, k] + bias[classes[b, j]]``: one contraction
    over the feature map for the ``n`` requested classes (not all of them). Differentiable in every argument but
    ``classes`` (e.g. the HNC loss's negative CAMs).

    Args:
      features: [batch, h, w, channels] float, the tensor the network average-pools into its classifier.
      kernel: [channels, num_classes] float (``[1, 1, channels, num_classes]`` for a 1x1 convolution classifier).
      bias: [num_classes] float or None.
      classes: int [batch, n], the classes of each example's maps.

    Returns:
      [batch, n, h, w] float32 (float64 for float64 inputs).

    Raises:
      ValueError: on inconsistent shapes.
    """
    if getattr(features, "ndim", None) != 4:
        raise ValueError(f"features must be [batch, h, w, channels]; got shape {getattr(features, 'shape', None)}")
    kernel = _classifier_matrix(kernel, features.shape[-1])
    classes = jnp.asarray(classes)
    if classes.ndim != 2 or classes.shape[0] != features.shape[0]:
        raise ValueError(f"classes must be [batch={features.shape[0]}, n]; got shape {classes.shape}")
    features, kernel = at_least_float32(features), at_least_float32(kernel)
    w = jnp.take(kernel, classes, axis=1)  # [channels, batch, n]
    maps = jnp.einsum("bhwc,cbn->bnhw", features, w)
    if bias is not None:
        maps = maps + at_least_float32(jnp.take(jnp.asarray(bias), classes))[:, :, None, None]
    return maps


def classifier_params(variables: Any, classifier: str) -> tuple[Array, Array | None]:
    """The ``kernel`` and ``bias`` (None if absent) of the dense layer at module path ``classifier``.

    Args:
      variables: a linen model's variables (``{"params": ...}``) or its ``params`` collection.
      classifier: module path, ``"/"``-joined (``"fc"``, ``"head/Dense_0"``).

    Raises:
      ValueError: if there are no parameters at that path or they have no ``kernel``.
    """
    node = variables.get("params", variables) if hasattr(variables, "get") else variables
    for part in classifier.split("/"):
        if not hasattr(node, "get") or part not in node:
            raise ValueError(f"no parameters at classifier path {classifier!r} in variables['params']")
        node = node[part]
    if "kernel" not in node:
        raise ValueError(f"classifier {classifier!r} has no 'kernel' parameter (has {sorted(node)}); name the "
                         "nn.Dense that maps the pooled features to the logits")
    return node["kernel"], node.get("bias")


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array, or None while tracing (under jit/vmap/grad)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def linen_class_activation_map(
    module: nn.Module,
    variables: Any,
    images: Array,
    targets: Array | int | None = None,
    *,
    features_layer: str,
    classifier: str,
    resize: bool = True,
    relu: bool = False,
    normalize: bool = True,
    **apply_kwargs,
) -> Array:
    """Class activation maps (Zhou et al. 2016) of an unmodified Flax linen GAP network.

    Runs ``module.apply(variables, images, **apply_kwargs)`` once, taking the output of the layer
    ``features_layer`` and the input of ``classifier`` (:func:`~saliency_jax.saliency.core.apply_with_layers`) and
    the kernel/bias of ``classifier`` from ``variables["params"]``, then calls :func:`class_activation_map`.

    The network must compute ``logits = classifier(mean_xy(features_layer(...)))``. Outside ``jax.jit`` this is
    verified (the classifier's input must equal the spatial mean of the layer's output, else ``ValueError``, e.g.
    when a ReLU is applied after the named layer outside it); under ``jit`` it cannot be and is the caller's duty.

    Args:
      module: a ``flax.linen.Module`` returning logits [batch, num_classes].
      variables: its variables.
      images: [batch, height, width, channels] float.
      targets: ``None`` (the model's predicted class), ``int`` or int [batch].
      features_layer: path of the last convolutional block (e.g. ``"conv3"`` of
        :class:`~saliency_jax.models.SmallCNN`, ``"layer4"`` of our ResNets, ``"Conv_2+relu"`` for a ReLU applied as
        a function); its output [batch, h, w, channels] must be what is average-pooled.
      classifier: module path of the classifier ``nn.Dense`` (e.g. ``"fc"``, ``"Dense_0"``).
      resize: bilinearly resize the maps to ``(height, width)``.
      relu: keep only positive evidence.
      normalize: per-example min-max normalisation to [0, 1].
      **apply_kwargs: forwarded to ``module.apply`` (``train=False`` for our models; in train mode with
        ``mutable=[...]`` the updated collections are discarded). Inside ``jax.grad`` with traced parameters the
        maps carry gradients to them (a CAM loss term).

    Returns:
      float32 [batch, height, width] (``[batch, h, w]`` without ``resize``).

    Raises:
      ValueError: bad image rank; a path that is not found (the message lists the module paths) or runs more than
        once; a non-spatial layer output; a classifier that is not a dense layer on the pooled features, or (eager
        only) whose input is not the layer output's spatial mean; bad targets.
      TypeError: non-float images, non-integer targets.
    """
    check_images(images)
    out = apply_with_layers(module, variables, images, capture=(features_layer,), capture_inputs=(classifier,),
                            **apply_kwargs)
    logits = out.output[0] if apply_kwargs.get("mutable") else out.output
    features, pooled = out.activations[features_layer], out.inputs[classifier]
    if not isinstance(features, jax.Array) or features.ndim != 4:
        raise ValueError(f"CAM needs spatial features [batch, h, w, channels] at layer {features_layer!r}; got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    kernel, bias = classifier_params(variables, classifier)
    kernel = _classifier_matrix(kernel, features.shape[-1])
    if getattr(pooled, "shape", None) != (features.shape[0], features.shape[-1]):
        raise ValueError(f"classifier {classifier!r} must take the globally average-pooled features "
                         f"[batch, {features.shape[-1]}]; its input has shape {getattr(pooled, 'shape', None)}")
    if getattr(logits, "ndim", None) != 2 or logits.shape[-1] != kernel.shape[-1]:
        raise ValueError(f"the model must return logits [batch, {kernel.shape[-1]}] from classifier {classifier!r}; "
                         f"got {getattr(logits, 'shape', None)}")
    f_np, p_np = _concrete(features), _concrete(pooled)
    if f_np is not None and p_np is not None:
        mean = f_np.astype(np.float64).mean(axis=(1, 2))
        tol = 1e-4 * max(1.0, float(np.abs(mean).max()))
        if not np.allclose(mean, p_np, rtol=1e-4, atol=tol):
            raise ValueError(
                f"the input of classifier {classifier!r} is not the spatial mean of layer {features_layer!r}'s "
                f"output (max difference {float(np.abs(mean - p_np).max()):.3g}): CAM needs a global-average-"
                "pooling network; name the layer whose output is pooled (after its ReLU)")
    classes = resolve_targets(targets, logits)
    size = tuple(images.shape[1:3]) if resize else None
    maps = class_activation_map(features, kernel, bias, classes, size=size, relu=relu, normalize=normalize)
    return mark_invalid(maps, invalid_examples(images=images))


# ---------------------------------------------------------------------------------------------------------------
# Grad-CAM++.


def grad_cam_plus_plus_weights(activations: Array, gradients: Array, eps: float = 1e-6) -> Array:
    """Grad-CAM++ channel weights (Chattopadhyay et al. 2018, Eq. 19 and 10, exponential score).

    ``alpha = g^2 / (2 g^2 + sum_ab A_ab * g^3 + eps)`` (0 where ``g == 0``), ``w_k = sum_ij relu(g_ij) alpha_ij``.

    Args:
      activations: [batch, h, w, channels] feature maps ``A``.
      gradients: [batch, h, w, channels] ``g = d S^c / d A``.
      eps: added to the denominator (pytorch-grad-cam's ``1e-6``).

    Returns:
      float32 [batch, channels].
    """
    a = activations.astype(jnp.float32)
    g = gradients.astype(jnp.float32)
    g2 = g * g
    g3 = g2 * g
    sum_a = jnp.sum(a, axis=(1, 2), keepdims=True)
    alpha = g2 / (2.0 * g2 + sum_a * g3 + eps)
    alpha = jnp.where(g != 0, alpha, 0.0)
    return jnp.sum(jnp.maximum(g, 0.0) * alpha, axis=(1, 2))


def grad_cam_plus_plus(
    model: LayerModel,
    images: Array,
    targets: Array | int | None = None,
    *,
    score: Score = "logit",
    relu: bool = True,
    resize: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
) -> Array:
    """Grad-CAM++ maps for a batch, one per example, in one pass (Chattopadhyay et al. 2018, Eq. 19).

    ``L^c = relu(sum_k w_k^c A^k)`` with the weights of :func:`grad_cam_plus_plus_weights`; the gradients
    ``d S^c / d A`` of all examples come from one ``jax.grad`` of the summed scores.

    Args:
      model: the network split at the layer to explain (:func:`~saliency_jax.saliency.core.linen_layer`,
        :func:`~saliency_jax.saliency.core.split_layer`), in inference mode; activations ``[batch, h, w,
        channels]``.
      images: [batch, height, width, channels] float.
      targets: ``None`` (predicted class), ``int`` or int [batch].
      score: ``"logit"`` (default; ``S^c`` of ``Y^c = exp(S^c)``, as pytorch-grad-cam) or ``"softmax"``.
      relu: apply the final ReLU.
      resize: bilinearly resize to ``(height, width)``.
      normalize: per-example min-max normalisation to [0, 1] (a constant map becomes zeros).
      eps: denominator stabiliser of the weights.

    Returns:
      float32 [batch, height, width] (``[batch, h, w]`` with ``resize=False``).

    Raises:
      ValueError: bad image rank, non-spatial activations, bad targets, unknown ``score``.
      TypeError: non-float images, non-integer targets.
    """
    check_images(images)
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax'; got {score!r}")
    shape = model.activation_shape(images)
    if len(shape.shape) != 4:
        raise ValueError(f"Grad-CAM++ needs spatial activations [batch, h, w, channels] at layer {model.layer!r}; "
                         f"got {shape.shape}")

    num_classes = []

    def summed_score(perturbation):
        logits, activations = model(images, perturbation)
        classes = resolve_targets(targets, logits)
        num_classes.append(logits.shape[-1])
        return jnp.sum(class_scores(logits, classes, score)), (activations, classes)

    gradients, (activations, classes) = jax.grad(summed_score, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
    weights = grad_cam_plus_plus_weights(activations, gradients, eps)
    maps = jnp.einsum("bhwc,bc->bhw", activations.astype(jnp.float32), weights)
    if relu:
        maps = jnp.maximum(maps, 0.0)
    if resize:
        maps = resize_maps(maps, images.shape[1:3])
    if normalize:
        maps = normalize_maps(maps)
    return mark_invalid(maps, invalid_examples(images=images, classes=classes, num_classes=num_classes[0]))
