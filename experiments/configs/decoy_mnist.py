r"""Decoy MNIST (Ross, Hughes, Doshi-Velez, IJCAI 2017): Grad-CAM attention guidance vs Right for the Right Reasons.

Every training image carries a 4x4 patch in a random corner whose grey value encodes its label (255 - 25 y); in the
test set the patch encodes a random digit, so a model that learned the patch fails there
(:mod:`saliency_jax.data.decoy_mnist`, built from the MNIST IDX files in ../shared/data/mnist/). Arms, same model,
optimizer, steps and seeds:

* ``plain``: cross-entropy only (learns the decoy);
* ``rrr``: + the RRR penalty on the patch ``A`` (``lambda_1 = 1000``, dtak/rrr's value, pixels in 0-255 units);
* ``guidance``: + ``w_g * -ln IoU(Grad-CAM, S)``, ``S`` the digit's own pixels (poster, seed 003), ``w_a`` =
  ``classification_weight`` = 1;
* ``clean``: cross-entropy on clean MNIST (the ceiling; tested on the clean test set, as dtak/rrr's baseline).

Model: CNN-2 narrowed to 16/32/32 filters (5x5) and 128/128 fc units, init std 0.05, no BatchNorm and no dropout,
so the schemes' inference-mode passes (``mode="inference"``) see the same network as the training forward (with
BatchNorm, penalties computed in inference mode while the cross-entropy trains in train mode collapsed the decoy
test accuracy in earlier smoke runs). Conv + flatten + dense keeps *where* the patch is (a global-average-pooling
CNN hides the corner and did not learn the decoy in 300 steps); Grad-CAM at ``relu_conv3`` (7x7 for 28 px, one cell
per 4x4 patch). Adam 1e-3, batch 64, no augmentation, 2 seeds.

Evaluators: ``classification`` (test accuracy: the decoy test set; the clean arm: clean test), ``split_accuracy``
(accuracy on 10,000 training images), ``region_mass`` (Grad-CAM mass inside the digit S and the patch A, 2,000
test images), ``saliency_maps`` (the figure: Grad-CAM of every arm on the same test images, logit score, plain
weights), ``training_curves``.

Arguments: none = the comparison; ``sweep`` = the guidance arm at w_g in {0.1, 1, 10} and, as an ablation, with
HiResCAM maps instead of Grad-CAM (``weighting="hirescam"``), 2 seeds;
``runlocal`` = tiny variant on Decoy "MNIST" made from scikit-learn's bundled digits (no files), used by tests.

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/decoy_mnist.py --workdir runs/decoy_mnist
  saliency-jax experiment --config experiments/configs/decoy_mnist.py:sweep --workdir runs/decoy_mnist_sweep

Measured (2000 steps, 2 seeds, mean ± sample std; shared 2-core CPU at load 8-20, 76 min for the comparison):

=========  ==============  ==============  ===============  ==================
arm        test accuracy   train accuracy  Grad-CAM mass S  Grad-CAM mass A
=========  ==============  ==============  ===============  ==================
plain      0.776 ± 0.032   0.994 ± 0.000   0.217 ± 0.004    0.018 ± 0.004
rrr        0.988 ± 0.003   0.986 ± 0.007   0.251 ± 0.009    0.009 ± 0.000
guidance   0.836 ± 0.030   0.989 ± 0.002   0.617 ± 0.014    0.000 ± 0.000
clean      0.989 ± 0.001   0.989 ± 0.001   0.220 ± 0.001    0.014 ± 0.000
=========  ==============  ==============  ===============  ==================

Sweep (``:sweep``): test accuracy at w_g = 0.1 / 1 / 10: 0.811 ± 0.034 / 0.836 ± 0.030 / 0.948 ± 0.042; HiResCAM
maps at w_g = 1: 0.841 ± 0.066. The guidance loss pulls the Grad-CAM mass onto the digit (0.6 of it inside S for
every w_g) but at w_g = 1 leaves most of the decoy reliance in place; at w_g = 10 it comes within 4 points of RRR
(whose penalty acts on the input gradient, where the patch is). Grad-CAM at the last conv layer of a flatten +
dense head shows little mass on the patch even for the plain model that relies on it.
"""

import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).parent))  # common.py, beside this file
import common

#: The arms in report order: (name, overrides of the base config).
ARMS = (
    ("plain", {"schemes": ()}),
    ("rrr", {"schemes": ("rrr",)}),
    ("guidance", {"schemes": ("attention_guidance",)}),
    ("clean", {"schemes": (), "dataset": {"name": "clean_mnist"}}),
)

#: The w_g values of the sweep (``:sweep``).
SWEEP_W_G = (0.1, 1.0, 10.0)

#: The map table (``:maps``): (arm, attention_guidance.weighting, attention_guidance.layer) of the guided arms on
#: the flatten + dense model; "guidance" is the poster's map (Grad-CAM at the model's Grad-CAM layer, relu_conv3).
MAP_ARMS = (
    ("guidance", "plain", None),
    ("grad x input", "gradient_x_activation", "input"),
    ("grad x act relu_conv1", "gradient_x_activation", "relu_conv1"),
    ("hirescam relu_conv1", "hirescam", "relu_conv1"),
    ("grad-cam relu_conv1", "plain", "relu_conv1"),
    ("hirescam relu_conv3", "hirescam", "relu_conv3"),
    ("grad x act relu_conv3", "gradient_x_activation", "relu_conv3"),
    ("grad x act relu_conv2", "gradient_x_activation", "relu_conv2"),
    ("hirescam relu_conv2", "hirescam", "relu_conv2"),
    ("grad-cam relu_conv2", "plain", "relu_conv2"),
)


#: Steps of the map table (``:maps``), every arm; see the module docstring for why fewer than the comparison's.
MAPS_STEPS = 1000


def maps_arms() -> tuple:
    """The arms of ``:maps``, in the order they are run (the most telling first, so that a run cut short by its
    budget has them): plain, the poster's guidance, the input and relu_conv1 maps of :data:`MAP_ARMS`, the GAP-head
    model plain and guided with Grad-CAM at relu_conv3 (= HiResCAM there), relu_conv3's and relu_conv2's other
    maps, and rrr (the most expensive step; its 2000-step result is the comparison's). The ``region_mass`` evaluator measures, besides Grad-CAM at relu_conv3,
    every arm's own map; on plain and rrr every map of the table."""
    guided = {}
    for name, weighting, layer in MAP_ARMS:
        section = {"weighting": weighting, **({"layer": layer} if layer else {})}
        own = (f"{layer}:{weighting}",) if layer else ()
        guided[name] = {"schemes": ("attention_guidance",), "attention_guidance": section, "region_mass": {"maps": own}}
    gap = {"model": {"kwargs": {"head": "gap"}}, "region_mass": {"maps": ()}}  # relu_conv3 averaged over positions
    names = [name for name, _, _ in MAP_ARMS]
    return (("plain", {"schemes": ()}),
            *((n, guided[n]) for n in names[:5]),
            ("gap plain", {"schemes": (), **gap}),
            ("gap grad-cam relu_conv3", {"schemes": ("attention_guidance",), **gap}),
            *((n, guided[n]) for n in names[5:]),
            ("rrr", {"schemes": ("rrr",)}))

def get_config(arg: str | None = None):
    c = common.decoy_mnist_config()
    c.experiment.arms = ARMS
    c.experiment.title = "Decoy MNIST: Grad-CAM attention guidance vs RRR (Ross et al. 2017)"
    if arg == "sweep":
        # The w_g = 1 arm is the comparison's "guidance" arm (same name and config): run the sweep in the
        # comparison's workdir, or link its guidance/ folder into the sweep's, and that run is reused.
        c.experiment.arms = tuple(("guidance" if w == 1.0 else f"guidance w_g={w:g}",
                                   {"schemes": ("attention_guidance",), "attention_guidance": {"w_g": w}})
                                  for w in SWEEP_W_G)
        # Ablation: the same loss on HiResCAM maps (gradient x activation per position), which a flatten + dense
        # head cannot hide a corner patch from (Grad-CAM averages the gradient over the map first).
        c.experiment.arms += (("guidance hirescam", {"schemes": ("attention_guidance",),
                                                     "attention_guidance": {"weighting": "hirescam"}}),)
        c.experiment.title = "Decoy MNIST: sweep of the guidance weight w_g"
    elif arg in ("maps", "maps_runlocal"):
        c.experiment.arms = maps_arms()
        c.model.kwargs["head"] = "flatten"  # CNN2's default, named so that the GAP arms can override it
        c.experiment.title = "Decoy MNIST: which map the guidance loss is put on"
        c.num_steps = MAPS_STEPS
        c.checkpoint_every = 250  # a run stopped by its time budget resumes from the last quarter
        # Every arm's own map measured on every arm, next to the poster's Grad-CAM at relu_conv3.
        c.region_mass.maps = tuple(f"{layer}:{weighting}" for _, weighting, layer in MAP_ARMS if layer)
        c.region_mass.examples = 1000
        c.split_accuracy.examples = 2000
        c.evaluators = ("classification", "split_accuracy", "decoy_agreement", "region_mass", "training_curves")
        if arg == "maps_runlocal":
            common.runlocal_decoy(c)
            c.model.kwargs["head"] = "flatten"
    elif arg == "runlocal":
        common.runlocal_decoy(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'sweep', 'maps', 'maps_runlocal' or 'runlocal'")
    return c
