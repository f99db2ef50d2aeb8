"""Saliency-guided training schemes built on :mod:`saliency_jax.saliency` (no train loop here: see
:mod:`saliency_jax.train`).

:mod:`saliency_jax.training.scheme` defines the protocol (:class:`Scheme`, :func:`chain`, the registry);
:mod:`saliency_jax.training.step` turns a scheme into the update step (:func:`make_train_step`, :class:`TrainState`);
each other module here is one scheme, registered under its config name when imported below.
"""

from saliency_jax.training.scheme import (CLASSIFICATION_LOSSES, TRAINING_SCHEMES, Forward, ModelLayers, Scheme,
                                          SchemeSettings, StepContext, build_scheme, chain, classification_accuracy,
                                          classification_loss, model_forward, register_scheme, scheme_names,
                                          settings_section)
from saliency_jax.models.trainable import TrainableModel, as_trainable, linen_model, nnx_model
from saliency_jax.training.step import TrainState, check_model, init_state, make_optimizer, make_train_step
from saliency_jax.training.distraction import FILL_MODES, DistractionConfig, distract, distraction_scheme, occlude
from saliency_jax.training.excitation_dropout import (RESCALE_MODES, SCHEMES, DropoutConfig, DropoutOutput,
                                                      adaptive_retain_probability, apply_dropout_mask,
                                                      curriculum_retain_probability, dropout_at_layer,
                                                      dropout_scheme, layer_excitation, make_dropout_forward,
                                                      retain_probability, scheme_retain_probability)
from saliency_jax.training.hnc import HNCConfig, hard_negative_classes, hnc_loss, hnc_scheme
from saliency_jax.training.frame_classifier import (FrameClassifierConfig, frame_classification_loss,
                                                    frame_classifier_scheme)
from saliency_jax.training.attention_guidance import (GuidanceConfig, RRRConfig, attention_guidance_scheme,
                                                      guidance_loss, multilabel_guidance_loss, rrr_penalty,
                                                      rrr_scheme)
