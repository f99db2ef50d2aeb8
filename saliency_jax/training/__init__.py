"""Saliency-guided training schemes built on :mod:`saliency_jax.saliency` (no train loop here: see
:mod:`saliency_jax.train`)."""

from saliency_jax.training.distraction import FILL_MODES, DistractionConfig, distract, occlude
