"""Evaluation of saliency-guided training: metrics, robustness, figures and report tables.

Follows the evaluation of Morales et al. 2021, "Playing to distraction: towards a robust
training of CNN classifiers through visual explanation techniques": accuracy, macro / weighted
precision, recall and F1 and per-class true positive rates (Sec. 4.4, Tables 1 and 3), the
Random Erasing robustness test (Zhong et al. 2020; Table 4), heat-map grids (Figs. 2-3), and
markdown tables shaped like the paper's; faithfulness checks of saliency maps (deletion / insertion,
Petsiuk et al. 2018; cascading model-parameter randomisation, Adebayo et al. 2018; relevance mass in a region; ROAD,
Rong et al. 2022; infidelity and max-sensitivity, Yeh et al. 2019);
and ``backgrounds``: the MNIST background protocol of Cruz & Cardoso (the clean test set and six fixed synthetic
backgrounds; Table 1 of "Training a CNN to be background invariant").
"""

from saliency_jax.evaluation.backgrounds import (BACKGROUND_NAMES, TEST_SET_NAMES, background_contact_sheet,
                                                 background_pattern, background_test_sets, evaluate_backgrounds,
                                                 image_grid, load_mnist_padded)
from saliency_jax.evaluation.faithfulness import (CausalMetricResult, RandomizationResult, auc, causal_metric,
                                                  deletion, gaussian_blur, insertion, model_randomization,
                                                  relevance_mass_accuracy, spearman_correlation, ssim)
from saliency_jax.evaluation.infidelity_sensitivity import (gaussian_perturbations, infidelity, sensitivity_max,
                                                            uniform_perturbations)
from saliency_jax.evaluation.remove_and_debias import RoadResult, noisy_linear_imputation, road
from saliency_jax.evaluation.figures import overlay, signed_overlay
from saliency_jax.evaluation.figures import saliency_figure
from saliency_jax.evaluation.figures import training_curves_figure
from saliency_jax.evaluation.metrics import SCALAR_METRICS
from saliency_jax.evaluation.metrics import classification_metrics
from saliency_jax.evaluation.metrics import summarize_repeats
from saliency_jax.evaluation.pointing_game import DEFAULT_TOLERANCE
from saliency_jax.evaluation.pointing_game import PointingGame
from saliency_jax.evaluation.pointing_game import argmax_points
from saliency_jax.evaluation.pointing_game import hits_at_points
from saliency_jax.evaluation.pointing_game import load_difficult_flags
from saliency_jax.evaluation.pointing_game import pointing_game_table
from saliency_jax.evaluation.pointing_game import pointing_hits
from saliency_jax.evaluation.report import METRIC_LABELS
from saliency_jax.evaluation.report import metrics_table
from saliency_jax.evaluation.report import robustness_table
from saliency_jax.evaluation.robustness import erased_test_set
from saliency_jax.evaluation.robustness import random_erasing
from saliency_jax.evaluation.utilization import (UTILIZATION_METRICS, compression_curves, compression_figure,
                                                 conservative_filters, random_unit_masks, relevance_masks,
                                                 utilization_curves_figure, utilization_metrics,
                                                 utilization_per_example, utilization_table, weight_change)

__all__ = [
    "CausalMetricResult",
    "RandomizationResult",
    "auc",
    "causal_metric",
    "deletion",
    "gaussian_blur",
    "insertion",
    "model_randomization",
    "relevance_mass_accuracy",
    "spearman_correlation",
    "ssim",
    "RoadResult",
    "gaussian_perturbations",
    "infidelity",
    "noisy_linear_imputation",
    "road",
    "sensitivity_max",
    "uniform_perturbations",
    "overlay",
    "signed_overlay",
    "BACKGROUND_NAMES",
    "TEST_SET_NAMES",
    "background_contact_sheet",
    "background_pattern",
    "background_test_sets",
    "evaluate_backgrounds",
    "image_grid",
    "load_mnist_padded",
    "UTILIZATION_METRICS",
    "compression_curves",
    "compression_figure",
    "conservative_filters",
    "random_unit_masks",
    "relevance_masks",
    "utilization_curves_figure",
    "utilization_metrics",
    "utilization_per_example",
    "utilization_table",
    "weight_change",
    "DEFAULT_TOLERANCE",
    "PointingGame",
    "argmax_points",
    "hits_at_points",
    "load_difficult_flags",
    "pointing_game_table",
    "pointing_hits",
    "METRIC_LABELS",
    "SCALAR_METRICS",
    "classification_metrics",
    "erased_test_set",
    "metrics_table",
    "random_erasing",
    "robustness_table",
    "saliency_figure",
    "summarize_repeats",
    "training_curves_figure",
]
