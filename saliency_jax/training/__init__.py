"""Saliency-guided training schemes built on :mod:`saliency_jax.saliency` (no train loop here: see
:mod:`saliency_jax.train`)."""

from saliency_jax.training.distraction import FILL_MODES, DistractionConfig, distract, occlude
from saliency_jax.training.excitation_dropout import (RESCALE_MODES, SCHEMES, DropoutConfig, DropoutOutput,
                                                      adaptive_retain_probability, apply_dropout_mask,
                                                      curriculum_retain_probability, dropout_at_layer,
                                                      layer_excitation, linen_head, make_dropout_forward,
                                                      retain_probability, scheme_retain_probability)
