"""Saliency transforms: pure, jittable functions from (model, images, targets) to per-example maps.

This package knows nothing of training; :mod:`saliency_jax.training` builds on it.
"""

from saliency_jax.saliency.core import (
    LayerModel,
    check_images,
    linen_layer,
    module_paths,
    normalize_maps,
    resize_maps,
    resolve_targets,
    split_layer,
)
from saliency_jax.saliency.grad_cam import class_scores, grad_cam, grad_cam_weights
from saliency_jax.saliency.excitation_backprop import (
    EBResult,
    UnsupportedOperationError,
    contrastive_excitation_backprop,
    excitation_backprop,
    marginal_winning_probability,
    with_excitation_rules,
)
