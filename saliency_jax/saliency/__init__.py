"""Saliency transforms: pure, jittable functions from (model, images, targets) to per-example maps.

This package knows nothing of training; :mod:`saliency_jax.training` builds on it.

One call for every method: ``saliency_map(name, view, images, targets)`` (:mod:`saliency_jax.saliency.methods`,
registry :data:`METHODS`) on a view of a linen module, an NNX module or a pure function
(:mod:`saliency_jax.saliency.views`); the per-method functions below remain the low-level API. ``saliency_maps(names, view, images, targets)`` gives several
methods' maps of one batch from a shared forward (and, for the gradient CAMs and input gradients, one shared backward).

Bad inputs (:mod:`saliency_jax.saliency.core`): a target class outside ``[0, num_classes)`` or a NaN / inf pixel
raises for concrete inputs; under ``jax.jit`` the maps of those examples are NaN, and :func:`checked` runs a
transform under ``jax.experimental.checkify`` to raise instead.
"""

from saliency_jax.saliency.core import (
    LayerModel,
    LayerOutputs,
    apply_with_layers,
    check_images,
    checked,
    degenerate_maps,
    linen_head,
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
    fold_batch_norm,
    marginal_winning_probability,
    with_excitation_rules,
)
from saliency_jax.saliency.lrp import lrp, with_lrp_rules
from saliency_jax.saliency.gradients import (
    GuidedBackpropError,
    gradient_x_input,
    guided_backprop,
    integrated_gradients,
    reduce_attribution,
    smooth_grad,
    vanilla_gradient,
    with_guided_relu,
)
from saliency_jax.saliency.cam import (
    class_activation_map,
    class_activation_maps,
    classifier_params,
    grad_cam_plus_plus,
    grad_cam_plus_plus_weights,
    linen_class_activation_map,
)
from saliency_jax.saliency.rise import rise, rise_masks
from saliency_jax.saliency.target_sets import TopK, top_k
from saliency_jax.saliency.layer_cams import (
    eigen_cam,
    hirescam,
    layer_cam_map,
    score_cam,
    xgrad_cam_weights,
)
from saliency_jax.saliency.occlusion import occlusion
from saliency_jax.saliency.recurrent import (
    ClipLayerModel,
    RecurrentEBResult,
    RecurrentMaps,
    clip_prior,
    contrastive_recurrent_excitation_backprop,
    linen_clip_layers,
    recurrent_excitation_backprop,
    recurrent_gradient,
    split_clip_model,
    temporal_localization,
    temporal_localization_known_length,
    temporal_normalization,
)
from saliency_jax.saliency.views import (
    ModelView,
    as_view,
    function_view,
    linen_view,
    nnx_apply_with_layers,
    nnx_layer,
    nnx_paths,
    nnx_view,
    reshaped_layer,
    token_grid,
)
from saliency_jax.saliency.methods import (
    METHODS,
    Explanation,
    Method,
    cosine_similarity,
    region_score,
    saliency_map,
    saliency_maps,
    weighted_outputs,
)
