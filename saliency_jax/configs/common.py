"""Arms and builders shared by the experiment configs beside this file.

A config imports them with (the line at the top of every config here)::

  from saliency_jax.configs import common
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from saliency_jax.config import default_config
from saliency_jax.data.celeba import POSTER_ATTRIBUTES, REGION_TEMPLATES
from saliency_jax.data.clips import ClipSettings
from saliency_jax.evaluators import settings_section as evaluator_section
from saliency_jax.trainers.background_invariance import settings_section as trainer_section
from saliency_jax.training import settings_section as scheme_section

#: The four arms of Morales et al. 2021, Table 1: (arm name, overrides) pairs in the table's column order.
DISTRACTION_ARMS = (
    ("baseline", {"schemes": ()}),
    ("0-occlusion", {"schemes": ("distraction",), "distraction": {"fill": "zero"}}),
    ("R-occlusion", {"schemes": ("distraction",), "distraction": {"fill": "random"}}),
    ("1-occlusion", {"schemes": ("distraction",), "distraction": {"fill": "one"}}),
)

#: The six arms of the Excitation Dropout comparison (Bargal 2019, Tables 5.1-5.2), in report order.
DROPOUT_ARMS = (
    ("none", {"dropout": {"scheme": "none"}}),
    ("standard", {"dropout": {"scheme": "standard"}}),
    ("standard_per_image", {"dropout": {"scheme": "standard_per_image"}}),
    ("curriculum", {"dropout": {"scheme": "curriculum"}}),
    ("excitation", {"dropout": {"scheme": "excitation"}}),
    ("adaptive", {"dropout": {"scheme": "adaptive"}}),
)


def distraction_config() -> ml_collections.ConfigDict:
    """Distraction training (Morales et al. 2021): the scheme's section at the paper's settings (p 0.25, th 0.85,
    the authors' Grad-CAM: softmax score, guided weights), the four arms, and the paper's evaluation (Tables 1, 3, 4:
    clean and randomly erased test metrics; Figs. 2-3: Grad-CAM maps; training curves)."""
    c = default_config()
    c.distraction = scheme_section("distraction")
    c.evaluators = ("classification", "random_erasing", "saliency_maps", "training_curves")
    c.random_erasing = evaluator_section("random_erasing")
    c.saliency_maps = evaluator_section("saliency_maps")
    c.experiment.arms = DISTRACTION_ARMS
    return c


def excitation_dropout_config() -> ml_collections.ConfigDict:
    """The thesis settings of Excitation Dropout (Bargal 2019, Sec. 5.2.1) as the authors' released script runs them
    (andreazuna89/Excitation-Dropout, ``train_with_Excitation_Dropout.py``): CNN-2, dropout at ``relu_fc1``, the six
    arms with each arm's released rescaling (``dropout.rescale="authors"``: Excitation Dropout divides by the
    per-image fraction kept, the Caffe-layer baselines by P), SGD momentum 0.9, weight decay 0.005 on every weight and
    bias, learning rate x10 on the last layer's weights, x20 on its bias and x2 on every other bias (Caffe's
    ``lr_mult``, the script's update), lr 1e-3 -> 1e-4 after 25k of 100k steps, batch 100, 5 repeats; the analyses of
    Ch. 5 (utilization, conservative filters and their evolution; compression). The thesis's text has no rescaling
    (``dropout.rescale="none"``) and no per-layer multipliers (``optimizer.lr_multipliers=()``)."""
    c = default_config()
    c.model.name = "cnn2"
    c.model.kwargs = {}
    c.schemes = ("dropout",)
    c.dropout = scheme_section("dropout", scheme="excitation", base_retain=0.5, layer="relu_fc1", rescale="authors")
    c.evaluators = ("utilization", "compression")
    c.utilization = evaluator_section("utilization", layer="relu_fc1", weights="fc1", test_examples=0,
                                      curve_examples=1000, conservative_deltas=(0.05, 0.1, 0.25))
    c.compression = evaluator_section("compression", layer="relu_fc1", examples=1000)
    c.experiment.arms = DROPOUT_ARMS
    c.experiment.repeats = 5
    # The thesis's optimizer (Sec. 5.2.1) with the released script's per-parameter multipliers (CNN-2's names).
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 0.005
    c.optimizer.lr_multipliers = (("fc3/kernel", 10.0), ("fc3/bias", 20.0), ("*/bias", 2.0))
    c.optimizer.lr_boundaries = [25_000]
    c.optimizer.lr_scales = [0.1]
    c.batch_size = 100
    c.eval_batch_size = 500
    c.num_steps = 100_000
    c.log_every = 500
    c.checkpoint_every = 10_000
    c.keep_checkpoints = 20
    c.dataset.val_fraction = 0.02
    c.dataset.augment = dict(hflip=False, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))
    return c


def reduced_dropout_config(config: ml_collections.ConfigDict, arg: str | None, *, num_steps: int, log_every: int,
                           checkpoint_every: int) -> ml_collections.ConfigDict:
    """The reduced CPU budget shared by the runnable Excitation Dropout configs (their docstrings say why).

    Narrow CNN-2 (16/16/32 filters, 256-unit fc, init std 0.05), Adam 1e-3 without decay or schedule, 2 repeats,
    analyses on 2,000 test images; ``arg == "runlocal"`` gives the tiny variant the tests use. Modifies and returns
    ``config``.
    """
    c = config
    c.model.kwargs = {"conv_features": (16, 16, 32), "fc_features": (256, 256), "init_std": 0.05}
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.lr_boundaries = []
    c.optimizer.lr_scales = []
    c.optimizer.lr_multipliers = ()
    c.num_steps = num_steps
    c.log_every = log_every
    c.checkpoint_every = checkpoint_every
    c.experiment.repeats = 2
    c.utilization.update(test_examples=2000, curve_examples=500, conservative_deltas=(0.05, 0.1, 0.25))
    c.compression.examples = 500
    if arg == "runlocal":
        c.model.kwargs = {"conv_features": (4, 4, 8), "fc_features": (16, 16)}
        c.num_steps = 6
        c.log_every = 3
        c.checkpoint_every = 3
        c.batch_size = 10
        c.eval_batch_size = 50
        c.experiment.repeats = 1
        c.utilization.update(test_examples=50, curve_examples=20, conservative_deltas=(0.01, 0.1))
        c.compression.examples = 20
    return c


#: The arms of the HNC comparison (Sun et al. 2020): cross-entropy alone and with each HNC variant, at the authors'
#: weights (mse 0.07, kd 0.0065); HNC_NOISE_ARMS: the same three with 20% symmetric label noise in the training split.
HNC_ARMS = (
    ("CE", {"schemes": ()}),
    ("CE+HNC-mse", {"schemes": ("hnc",), "hnc": {"variant": "mse"}}),
    ("CE+HNC-kd", {"schemes": ("hnc",), "hnc": {"variant": "kd"}}),
)
HNC_NOISE_ARMS = tuple((f"{name}, 20% noise", {**overrides, "dataset": {"label_noise": 0.2}})
                       for name, overrides in HNC_ARMS)


def hnc_config() -> ml_collections.ConfigDict:
    """The HNC comparison (Sun et al. 2020): the scheme's section (weight 0 = the variant's default), the three arms
    (``HNC_NOISE_ARMS`` for the label-noise experiment), and the evaluation of its claims: test metrics, the negative
    CAMs' peaks, FGSM robustness, training curves."""
    c = default_config()
    c.hnc = scheme_section("hnc")
    c.evaluators = ("classification", "negative_cams", "fgsm", "training_curves")
    c.negative_cams = evaluator_section("negative_cams")
    c.fgsm = evaluator_section("fgsm")
    c.experiment.arms = HNC_ARMS
    c.experiment.title = "HNC loss (Sun et al. 2020)"
    return c


def grounding_config() -> ml_collections.ConfigDict:
    """Spatiotemporal grounding (Bargal 2019, Ch. 7): a CNN-LSTM (ReLU-LSTM cell) trained on single-digit moving
    clips with the cross-entropy at every LSTM step plus the single-frame classifier's (``frame_classifier``
    scheme, which the EB / cEB / BP baselines explain), no augmentation; evaluated by ``temporal_grounding``
    (Tables 7.1-7.2, Figs. 7.5-7.6) and the training curves. The clips' parameters are ``config.dataset.options``
    (:class:`saliency_jax.data.clips.ClipSettings`)."""

    c = default_config()
    c.dataset.name = "mnist_clips"
    c.dataset.data_dir = "../shared/data/mnist"
    c.dataset.image_size = None  # clips are not resized: the frame size is clips.canvas
    c.dataset.augment = {}  # clips are not augmented (the digits move and the clips are generated fresh)
    c.dataset.val_fraction = 0.0
    c.dataset.options = ClipSettings.section()
    c.model.name = "cnn_lstm"
    c.model.kwargs = {}
    c.schemes = ("frame_classifier",)
    c.frame_classifier = scheme_section("frame_classifier")
    c.evaluators = ("temporal_grounding", "training_curves")
    c.temporal_grounding = evaluator_section("temporal_grounding")
    c.training_curves = evaluator_section("training_curves", metrics=("loss", "accuracy", "frame_accuracy"))
    c.experiment.arms = (("cnn_lstm", {}),)
    c.experiment.title = "Spatiotemporal grounding with EB-R / cEB-R (Bargal 2019, Ch. 7)"
    c.optimizer.learning_rate = 1e-3
    return c


#: No augmentation (Decoy MNIST, dtak/rrr: none; a flip would move the patch to another corner, which is harmless,
#: but digits are not flip-invariant).
NO_AUGMENTATION = dict(hflip=False, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))


def decoy_mnist_config() -> ml_collections.ConfigDict:
    """Decoy MNIST (Ross et al. 2017) with the attention-guidance and RRR sections, the model and budget shared by
    every arm, and the evaluators of the comparison (``experiments/configs/decoy_mnist.py`` says why each)."""
    c = default_config()
    c.dataset.name = "decoy_mnist"
    c.dataset.data_dir = "../shared/data/mnist"
    c.dataset.image_size = None  # native 28 x 28
    c.dataset.channels = 1
    c.dataset.val_fraction = 0.0  # no validation split: every training image is trained on (as dtak/rrr)
    c.dataset.options = dict(seed=0, region_threshold=0, region_dilation=0)
    c.dataset.augment = NO_AUGMENTATION
    c.model.name = "cnn2"
    c.model.kwargs = {"conv_features": (16, 32, 32), "fc_features": (128, 128), "init_std": 0.05}
    c.model.grad_cam_layer = "relu_conv3"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.eps = 1e-8
    c.classification_weight = 1.0  # w_a of attention guidance
    c.attention_guidance = scheme_section("attention_guidance", w_g=1.0)
    c.rrr = scheme_section("rrr", lambda1=1000.0, pixel_scale=255.0)
    c.evaluators = ("classification", "split_accuracy", "decoy_agreement", "region_mass", "saliency_maps",
                    "training_curves")
    c.split_accuracy = evaluator_section("split_accuracy", split="train", examples=10_000)
    c.decoy_agreement = evaluator_section("decoy_agreement")
    c.region_mass = evaluator_section("region_mass", examples=2000)
    c.saliency_maps = evaluator_section("saliency_maps", examples=8, score="logit", weighting="plain")
    c.training_curves = evaluator_section("training_curves", metrics=("loss", "accuracy"))
    c.batch_size = 64
    c.eval_batch_size = 500
    c.num_steps = 2000
    c.log_every = 100
    c.checkpoint_every = 1000
    c.experiment.repeats = 2
    return c


def runlocal_decoy(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tiny variant the tests run: Decoy "MNIST" from scikit-learn's bundled digits (no files), a few steps."""
    c.dataset.data_dir = None
    c.dataset.options.base = "digits"
    c.model.kwargs = {"conv_features": (4, 8, 8), "fc_features": (16, 16), "init_std": 0.05}
    c.num_steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
    c.batch_size = 16
    c.eval_batch_size = 50
    c.split_accuracy.examples = 100
    c.region_mass.examples = 40
    c.region_mass.batch_size = 20
    c.saliency_maps.examples = 3
    c.experiment.repeats = 1
    return c


def celeba_attention_config() -> ml_collections.ConfigDict:
    """The poster's CelebA setting (seed 003): AlexNet fine-tuned on three attributes with multi-label binary
    cross-entropy, region templates on the aligned face, Grad-CAM at ``relu5``; the baseline and the guided arm
    (``experiments/configs/celeba_attention.py`` gives the budget and why)."""

    c = default_config()
    c.dataset.name = "celeba"
    c.dataset.data_dir = config_dict.placeholder(str)  # the CelebA root (img_align_celeba/ and the two lists)
    c.dataset.image_size = 224
    c.dataset.channels = 3
    c.dataset.val_fraction = 0.0  # CelebA's own "valid" partition is separate
    c.dataset.options = dict(attributes=POSTER_ATTRIBUTES, region_templates=REGION_TEMPLATES)
    c.dataset.augment = dict(hflip=True, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))
    c.model.name = "alexnet"
    c.model.grad_cam_layer = "relu5"
    c.loss = "sigmoid_binary_cross_entropy"
    c.classification_weight = 1.0  # w_a
    c.attention_guidance = scheme_section("attention_guidance", w_g=1.0, attributes=(0, 1, 2))
    c.evaluators = ("cooccurrence_accuracy", "region_mass", "training_curves")
    c.cooccurrence_accuracy = evaluator_section("cooccurrence_accuracy")
    c.region_mass = evaluator_section("region_mass", examples=2000, attributes=(0, 1, 2), batch_size=50)
    c.training_curves = evaluator_section("training_curves", metrics=("loss", "accuracy"))
    return c


def guided_zoom_config() -> ml_collections.ConfigDict:
    """Guided Zoom (Bargal 2019, Ch. 6): plain training of the conventional CNN (one arm), then the ``guided_zoom``
    evaluator (evidence pools GZ and EGZ, Evidence CNNs, decision refinement at k = 3 and 5) at the thesis'
    defaults (weights 0.4 / (0.3, 0.2, 0.1), L = 2, softmax scores, released code's border truncation)."""
    c = default_config()
    c.evaluators = ("guided_zoom",)
    c.guided_zoom = evaluator_section("guided_zoom")
    c.experiment.arms = (("conventional", {}),)
    c.experiment.title = "Guided Zoom and Ensemble Guided Zoom (Bargal 2019, Ch. 6)"
    return c


def background_invariance_config() -> ml_collections.ConfigDict:
    """Background invariance (Cruz & Cardoso): the ``background_invariance`` trainer with its section at the authors'
    settings (area 0.2, TV 0.1, Otsu, U-Net masks, adversarial backgrounds in 2x2 tiles, Adam 1e-3 / 1e-5 / 1e-5), no
    training scheme, and the MNIST background protocol (``"backgrounds"``: Table 1 shape) with the training curves.
    ``background_invariance.batch_size`` follows ``config.batch_size`` (a reference, so a command-line override of
    ``--config.batch_size`` changes both). The configs set the dataset, the budget and the arms."""

    c = default_config()
    c.trainer = "background_invariance"
    c.schemes = ()
    c.model.name = "vanilla_cnn"
    c.model.kwargs = {}
    c.background_invariance = trainer_section()
    c.background_invariance.batch_size = c.get_ref("batch_size")
    c.evaluators = ("backgrounds", "training_curves")
    c.backgrounds = evaluator_section("backgrounds")
    c.training_curves = evaluator_section("training_curves")
    c.experiment.title = "Background invariance by adversarial backgrounds (Cruz & Cardoso)"
    return c


#: Table 1 of Cruz & Cardoso (poster), accuracy in % on clean, stripes, checkerboard, border, circles, clock, random.
BACKGROUND_INVARIANCE_TABLE1 = (
    ("Vanilla CNN (paper)", (97.3, 38.0, 24.3, 61.4, 32.9, 19.7, 11.2)),
    ("Attention (paper)", (93.4, 28.1, 26.8, 57.3, 40.1, 29.3, 25.1)),
    ("Proposal (paper)", (94.9, 92.3, 76.8, 93.1, 93.7, 70.8, 86.2)),
)
