# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Saliency methods side by side
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/saliency-jax/saliency_jax/blob/main/colabs/saliency_methods.ipynb)
#
# A small CNN trained on scikit-learn's bundled handwritten digits (8x8, upsampled to 32x32; no download), then
# explained with every saliency method of `saliency_jax.saliency` on the same few test images: vanilla gradient,
# guided backprop, Grad-CAM, Grad-CAM++, Excitation Backprop, contrastive Excitation Backprop and RISE, in one
# figure (rows: images with their label and the model's prediction; columns: methods).
#
# The notebook holds no logic of its own: it trains with `saliency_jax.train.train` on the digits experiment's
# config file (its baseline arm: plain training, no distraction), and every map comes from one call of a
# `saliency_jax.saliency` function — the functions the training schemes and the experiments use. Each method gets
# a whole batch at once and returns one map per image, `[batch, height, width]`, normalised per image to [0, 1].

# %% [markdown]
# ## Setup
#
# `QUICK = False` trains the digits config's baseline (1,200 steps; about 40 s on CPU) — a model above 95% test
# accuracy whose maps are worth looking at. `QUICK = True` trains the config's tiny `:runlocal` variant (12 steps;
# an untrained-looking model, the maps are noise; a few seconds) — the tests force it with the environment variable
# `SALIENCY_JAX_QUICK=1`.

# %% tags=["parameters"]
QUICK = False

# %%
import os
import sys

QUICK = QUICK or os.environ.get("SALIENCY_JAX_QUICK", "0") not in ("", "0")
IN_COLAB = "google.colab" in sys.modules

# %% [markdown]
# On Colab, the next cell fetches the repository and installs the package (its experiment configs included) and
# its dependencies **around Colab's own JAX** (built for the runtime's GPU or TPU): the package
# without dependencies, then every dependency but `jax` with `jax` and `jaxlib` pinned to the installed versions,
# so that pip never replaces them. `REPO_URL` and `REPO_REF` are form fields: point them at your fork or branch.
# Run locally, the cell does nothing (install the package first: `pip install saliency_jax-*.whl`, or
# `pip install -e .` in the repository).

# %%
import pathlib
import subprocess

REPO_URL = "https://github.com/saliency-jax/saliency_jax"  # @param {type:"string"}
REPO_REF = "main"  # @param {type:"string"}

REPO_DIR = None
if IN_COLAB:
    import importlib.metadata
    import re
    import tomllib

    REPO_DIR = pathlib.Path("/content/saliency_jax")
    if not REPO_DIR.exists():
        subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", REPO_REF, REPO_URL, str(REPO_DIR)],
                       check=True)
    installed = {}
    for package in ("jax", "jaxlib"):
        try:
            installed[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    pins = REPO_DIR / "colab_constraints.txt"
    pins.write_text("".join(f"{package}=={version}\n" for package, version in installed.items()))
    requirements = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = [r for r in requirements if not re.match(r"jax(lib)?\b", r)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(REPO_DIR)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(pins), *requirements], check=True)
    print("installed saliency_jax from", REPO_URL, REPO_REF, "keeping", installed)

# %%
import functools

import jax
import matplotlib.pyplot as plt
import numpy as np

import saliency_jax
from saliency_jax import data, experiment, saliency, train
from saliency_jax.configs import distraction_digits

print("devices:", jax.devices())

# %% [markdown]
# ## Train the model
#
# The digits experiment's config, shipped in the package (`get_config("runlocal")` is what
# `--config distraction_digits:runlocal` selects on the command line), and its `baseline` arm: the small CNN
# (`conv1`-`conv3`, each conv + batch norm + ReLU, max pooling between them, global average pooling, `fc`) trained
# plainly. The run folder is the one `saliency-jax experiment --config distraction_digits --workdir runs/digits`
# gives that arm: after the experiment (or a first run of this notebook) `saliency_jax.load`
# reads the trained model back from it and nothing is trained again; otherwise `train.train` trains it there.

# %%
config = distraction_digits.get_config("runlocal" if QUICK else None)

ARM = "baseline"
arm_config = experiment.arm_config(config, ARM, 0)
WORKDIR = pathlib.Path("runs/digits_runlocal" if QUICK else "runs/digits") / ARM / f"seed{arm_config.seed}"
print(f"config distraction_digits{':runlocal' if QUICK else ''}, arm {ARM!r} "
      f"(training schemes: {tuple(arm_config.schemes) or 'none'}), {arm_config.num_steps} steps -> {WORKDIR}")

try:
    result = saliency_jax.load(WORKDIR)  # a finished run: model, variables and config from its last checkpoint
    finished = int(result.state.step) == arm_config.num_steps
except FileNotFoundError:
    finished = False
if not finished:
    result = train.train(arm_config, WORKDIR, progress=False)  # trains (or resumes an unfinished run)
model, variables = result.model.module, result.state.variables()  # the linen module (result.model: its TrainableModel)

# %% [markdown]
# ## The test images
#
# The first `NUM_EXAMPLES` test images, through the evaluation pipeline; `train.predict` gives the model's
# prediction (inference mode). Every method below explains the **predicted** class of each image (`targets`).

# %%
NUM_EXAMPLES = 6
image_size = config.dataset.get("image_size")
test_source = data.get_source(config.dataset.name, "test", data_dir=config.dataset.get("data_dir"),
                              image_size=image_size)
test_labels, test_predictions, _ = train.predict(model, variables, data.make_eval_batches(
    test_source, None, batch_size=config.eval_batch_size, image_size=image_size,
    pad_to_multiple_of=jax.device_count()))
print(f"test accuracy {np.mean(test_labels == test_predictions):.4f} on {len(test_labels)} images")

batch = next(iter(data.make_eval_batches(test_source, np.arange(NUM_EXAMPLES), batch_size=NUM_EXAMPLES,
                                         image_size=image_size)))
images, labels = batch["image"], batch["label"]  # [n, 32, 32, 1] float32 in [0, 1], [n] int32
_, predictions, probabilities = train.predict(model, variables, [batch])
targets = predictions.astype(np.int32)

# The two views of the model the methods take: a plain function images -> logits (input-space methods) and the
# network split at a layer (layer methods; linen_layer intercepts the module's output, the model is unmodified).
logits_fn = functools.partial(model.apply, variables, train=False)
maps = {}  # method name -> [n, 32, 32] float32 in [0, 1]

# %% [markdown]
# ## The methods
#
# One cell per method, each a single library call on the whole batch with the predicted classes as `targets`; the
# layer methods take the model split at `conv3` or `conv2`, the others the plain function `logits_fn`.

# %% [markdown]
# ### Vanilla gradient
# Simonyan, Vedaldi, Zisserman, *Deep Inside Convolutional Networks*, ICLR workshop 2014, Sec. 3.1: the gradient
# of the class logit with respect to the pixels, `|d S_c / d I|`.

# %%
maps["gradient"] = saliency.vanilla_gradient(logits_fn, images, targets, normalize=True)

# %% [markdown]
# ### Guided backprop
# Springenberg, Dosovitskiy, Brox, Riedmiller, *Striving for Simplicity: The All Convolutional Net*, ICLR workshop
# 2015, Sec. 3.4: the input gradient with every ReLU passing back only positive signal where its input was
# positive.

# %%
maps["guided backprop"] = saliency.guided_backprop(logits_fn, images, targets, normalize=True)

# %% [markdown]
# ### Grad-CAM
# Selvaraju et al., *Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization*, ICCV 2017,
# Eq. 1-2: the last conv layer's (`conv3`, 8x8) feature maps weighted by their spatially averaged gradients, ReLU,
# upsampled to the image.

# %%
conv3 = saliency.linen_layer(model, variables, "conv3", train=False)
maps["Grad-CAM (conv3)"] = saliency.grad_cam(conv3, images, targets)

# %% [markdown]
# ### Grad-CAM++
# Chattopadhyay, Sarkar, Howlader, Balasubramanian, *Grad-CAM++: Generalized Gradient-based Visual Explanations
# for Deep Convolutional Networks*, WACV 2018, Eq. 19: Grad-CAM with per-position weights of the positive
# gradients (higher-order terms of an exponential score).

# %%
maps["Grad-CAM++ (conv3)"] = saliency.grad_cam_plus_plus(conv3, images, targets)

# %% [markdown]
# ### Excitation Backprop (EB)
# Zhang, Lin, Brandt, Shen, Sclaroff, *Top-down Neural Attention by Excitation Backprop*, ECCV 2016: the marginal
# winning probability of each neuron, propagated top-down from a one-hot prior on the class through the positive
# weights only; here summed over the channels of `conv2` (16x16).

# %%
conv2 = saliency.linen_layer(model, variables, "conv2", train=False)
maps["EB (conv2)"] = saliency.excitation_backprop(conv2, images, targets, resize=True, normalize=True).saliency

# %% [markdown]
# ### Contrastive Excitation Backprop (cEB)
# Zhang et al. 2016, Sec. 3.3 (and Bargal, *Grounding deep models of visual data*, PhD thesis 2019, Fig. 4.2): EB
# of the class minus EB of its "dual" unit (the classifier weights negated), clamped at 0 — what speaks for this
# class rather than for any.

# %%
maps["cEB (conv2)"] = saliency.contrastive_excitation_backprop(conv2, images, targets, resize=True,
                                                               normalize=True).saliency

# %% [markdown]
# ### RISE
# Petsiuk, Das, Saenko, *RISE: Randomized Input Sampling for Explanation of Black-box Models*, BMVC 2018, Eq. 6:
# the class probability on randomly masked copies of the image, averaged with the masks as weights — forward
# passes only (a black box). A fixed key gives the same masks every run; `NUM_MASKS` is small (the paper uses
# 4,000 on ImageNet), enough for 32x32 digits.

# %%
NUM_MASKS = 200 if QUICK else 500
maps["RISE"] = saliency.rise(logits_fn, jax.random.key(0), images, targets, num_masks=NUM_MASKS, grid_size=7,
                             normalize=True)

# %% [markdown]
# ## All methods side by side
#
# Each map over its image (normalised per image: red is the map's maximum, blue its minimum). The methods differ
# first in resolution: the input-space methods (gradient, guided backprop) give one value per pixel, speckled on a
# network this small; Grad-CAM and Grad-CAM++ are as coarse as `conv3` (8x8); EB and cEB at `conv2` (16x16) are
# twice finer and peak on few positions; RISE is as smooth as its 7x7 mask grid.

# %% tags=["figure"]
columns = {"input": None, **maps}
fig, axes = plt.subplots(NUM_EXAMPLES, len(columns), figsize=(1.7 * len(columns), 1.8 * NUM_EXAMPLES),
                         squeeze=False)
for j, (title, column) in enumerate(columns.items()):
    axes[0, j].set_title(title, fontsize=9)
    for i in range(NUM_EXAMPLES):
        axes[i, j].imshow(images[i, ..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        if column is not None:
            axes[i, j].imshow(np.asarray(column[i]), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        axes[i, j].set_xticks([])
        axes[i, j].set_yticks([])
for i in range(NUM_EXAMPLES):
    axes[i, 0].set_ylabel(f"label {int(labels[i])}\npred {int(predictions[i])} ({probabilities[i].max():.2f})",
                          fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## How faithful is each map?
#
# The measures of the experiment runner's `faithfulness` evaluator (which the digits experiment reports per arm, on
# test images spread over the split), here on this model and the first test images: **deletion** AUC (Petsiuk et al. 2018: the predicted class's probability as
# the most salient pixels are set to 0; lower is better), **insertion** AUC (pixels put back into a blurred canvas;
# higher is better), and the rank correlation of `|map|` with the trained model's once every layer is
# re-initialised (Adebayo et al. 2018, cascading randomisation; near 0 means the map depends on what the model
# learnt). Digits have no known object region, so the relevance mass is not reported.

# %% tags=["faithfulness"]
from saliency_jax.evaluators import faithfulness as faithfulness_lib

FAITHFULNESS_EXAMPLES = 32 if QUICK else 256
faithfulness_batch = next(iter(data.make_eval_batches(
    test_source, np.arange(FAITHFULNESS_EXAMPLES), batch_size=FAITHFULNESS_EXAMPLES, image_size=image_size)))
faithfulness_settings = faithfulness_lib.FaithfulnessSettings(randomization_examples=16 if QUICK else 64)
random_params = model.init(jax.random.key(arm_config.seed + 1), faithfulness_batch["image"][:1], train=False)["params"]
scores = faithfulness_lib.evaluate_faithfulness(
    model, variables, faithfulness_batch["image"], faithfulness_settings, random_params=random_params,
    layers={"grad_cam": "conv3", "excitation_backprop": "conv2", "contrastive_excitation_backprop": "conv2"})
print(f"{'method':32s} {'deletion AUC':>13s} {'insertion AUC':>14s} {'rank corr. (random)':>20s}")
for method, s in scores.items():
    print(f"{method:32s} {s['deletion_auc']:13.3f} {s['insertion_auc']:14.3f} "
          f"{s['randomization']['spearman_abs'][-1]:20.3f}")
