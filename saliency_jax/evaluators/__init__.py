"""Evaluators of trained runs for the experiment runner (:mod:`saliency_jax.experiment`).

:mod:`saliency_jax.evaluators.base` defines the protocol (``evaluate(run, data) -> metrics``, ``report(context) ->
Section``) and the registry; each other module here registers its evaluators under their config names when imported
below. ``config.evaluators`` lists the ones a run uses, in report order.
"""

from saliency_jax.evaluators.base import (EVALUATORS, Evaluator, EvaluatorSettings, ExperimentData, ReportContext,
                                          RunRecord, Section, build_evaluators, evaluator_names, evaluator_settings,
                                          headline, register_evaluator, scalar_entries, settings_section)
from saliency_jax.evaluators.classification import (classification_evaluator, fgsm_evaluator,
                                                    random_erasing_evaluator)
from saliency_jax.evaluators.figures import read_metrics_log, saliency_maps_evaluator, training_curves_evaluator
from saliency_jax.evaluators.utilization import compression_evaluator, utilization_evaluator
from saliency_jax.evaluators.pointing_game import pointing_game_evaluator
from saliency_jax.evaluators.hnc import negative_cams_evaluator
from saliency_jax.evaluators.temporal_grounding import temporal_grounding_evaluator
from saliency_jax.evaluators.attention_guidance import (cooccurrence_accuracy_evaluator, decoy_agreement_evaluator,
                                                        region_mass_evaluator, split_accuracy_evaluator)
from saliency_jax.evaluators.guided_zoom import guided_zoom_evaluator
from saliency_jax.evaluators.backgrounds import backgrounds_evaluator
from saliency_jax.evaluators.faithfulness import faithfulness_evaluator

__all__ = [
    "EVALUATORS",
    "Evaluator",
    "EvaluatorSettings",
    "ExperimentData",
    "ReportContext",
    "RunRecord",
    "Section",
    "build_evaluators",
    "evaluator_names",
    "evaluator_settings",
    "headline",
    "scalar_entries",
    "register_evaluator",
    "settings_section",
    "classification_evaluator",
    "random_erasing_evaluator",
    "fgsm_evaluator",
    "negative_cams_evaluator",
    "guided_zoom_evaluator",
    "saliency_maps_evaluator",
    "training_curves_evaluator",
    "utilization_evaluator",
    "compression_evaluator",
    "pointing_game_evaluator",
    "temporal_grounding_evaluator",
    "region_mass_evaluator",
    "split_accuracy_evaluator",
    "decoy_agreement_evaluator",
    "cooccurrence_accuracy_evaluator",
    "backgrounds_evaluator",
    "faithfulness_evaluator",
    "read_metrics_log",
]
