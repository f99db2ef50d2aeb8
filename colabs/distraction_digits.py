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
# # Playing to distraction: the digits comparison
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/saliency-jax/saliency_jax/blob/main/colabs/distraction_digits.ipynb)
#
# **Distraction training** (Morales, Talavera, Remeseiro, *Playing to distraction: towards a robust training of CNN
# classifiers through visual explanation techniques*, Neural Computing and Applications 2021, Algorithm 1) hides
# from the network what it currently looks at. At every training step, with probability `p = 0.25`, the Grad-CAM
# map of the ground-truth class is computed for the mini-batch with the current weights at the last convolutional
# layer; the pixels whose normalised map exceeds `th = 0.85` are set to a fill value — `0` (**0-occlusion**), `1`
# (**1-occlusion**) or uniform noise (**R-occlusion**) — and the network is trained on the occluded images. It has to
# find evidence elsewhere, which the paper shows makes the classifier more robust to occlusion at test time.
#
# This notebook runs the same comparison as
# `saliency-jax experiment --config distraction_digits --workdir runs/digits`: a small CNN
# trained on scikit-learn's bundled handwritten digits (8x8, upsampled to 32x32; no download) as a baseline and
# with 0-, R- and 1-occlusion, with the same seeds. Every arm is tested on the clean test set and under Random
# Erasing (Zhong et al. 2020; the paper's Table 4). It shows
#
# 1. the report the experiment writes: the tables shaped like the paper's Tables 1, 3 and 4, the salient area, and
#    the faithfulness of each saliency method's maps (deletion / insertion AUC, model randomisation) per arm;
# 2. the figures: each arm's Grad-CAM maps on the same test images (the paper's Figs. 2-3) and the training curves;
# 3. an exploration: the Grad-CAM maps of one trained arm and what the training step feeds the network when it
#    occludes them.
#
# The notebook holds no logic of its own: it loads the experiment's config file and calls the functions of
# `saliency_jax` that the command line calls.

# %% [markdown]
# ## Setup
#
# `QUICK = False` runs the full digits comparison (4 arms x 1,200 steps, about 3 minutes on 2 cores, and the
# faithfulness evaluation, about 1 more minute per arm).
# `QUICK = True` runs the config's tiny `:runlocal` variant (2 arms x 12 steps, untrained-looking results; under a
# minute) — the tests force it with the environment variable `SALIENCY_JAX_QUICK=1`.

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
import re

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display

import saliency_jax
from saliency_jax import data, experiment, train, training
from saliency_jax.configs import distraction_digits
from saliency_jax.evaluators.figures import grad_cam_maps

print("devices:", jax.devices())

# %% [markdown]
# ## The config
#
# The experiment's own config, shipped in the package (`saliency_jax/configs/distraction_digits.py`), so that the
# notebook and the command line run the same config (`get_config("runlocal")` is what
# `--config distraction_digits:runlocal` selects on the command line).

# %%
config = distraction_digits.get_config("runlocal" if QUICK else None)

# The command line's default workdir for the full run: a finished `saliency-jax experiment` run is reused.
WORKDIR = pathlib.Path("runs/digits_runlocal" if QUICK else "runs/digits")
print(f"config distraction_digits{':runlocal' if QUICK else ''} -> workdir {WORKDIR}")
print("arms:", [name for name, _ in config.experiment.arms], "| steps per arm:", config.num_steps)

# %% [markdown]
# ## Run the comparison
#
# `run_experiment` trains every arm (resuming from the checkpoints in `WORKDIR`, so a rerun skips finished arms),
# runs the config's evaluators on each (clean and randomly erased test metrics, Grad-CAM maps, training curves,
# faithfulness of the saliency methods) and writes `report.md`, `metrics.json`, `saliency_maps.png` and
# `training_curves.png`.

# %%
metrics = experiment.run_experiment(config, WORKDIR)
print(f"{len(metrics['arms'])} arms, {metrics['repeats']} repeat(s), {metrics['wall_seconds']:.0f} s")

# %% [markdown]
# ## The report

# %%
report = (WORKDIR / "report.md").read_text()
display(Markdown(re.sub(r"!\[[^]]*\]\([^)]*\)\n?", "", report)))  # The tables; the figures follow as images.

# %% [markdown]
# ## Grad-CAM maps of every arm (Figs. 2-3) and training curves

# %%
display(Image(filename=str(WORKDIR / "saliency_maps.png")))
display(Image(filename=str(WORKDIR / "training_curves.png")))

# %% [markdown]
# ## Exploration: what the distraction step feeds the network
#
# `run_experiment` returns metrics, not the trained models. `saliency_jax.load` on an arm's run folder gets one
# back (model, variables and config, from the checkpoint the experiment wrote at the last step): nothing is
# trained. Below, for
# a few test images: the Grad-CAM map of the ground-truth class with the trained 0-occlusion model (the map the
# train step computes: `grad_cam_maps` with the scheme's score and weighting), and the image after
# `training.occlude` with the paper's threshold and each fill — what the network is trained on when the step's
# coin flip (probability `p`) says occlude. (During training the maps come from the weights of that step, not the
# final ones.)

# %% tags=["exploration"]
ARM, NUM_EXAMPLES = "0-occlusion", 5
arm_config = experiment.arm_config(config, ARM, 0)
result = saliency_jax.load(WORKDIR / ARM / f"seed{arm_config.seed}")  # .model, .variables, .config

test_source = data.get_source(config.dataset.name, "test", data_dir=config.dataset.get("data_dir"),
                              image_size=config.dataset.get("image_size"))
batch = next(iter(data.make_eval_batches(test_source, np.arange(NUM_EXAMPLES), batch_size=NUM_EXAMPLES,
                                         image_size=config.dataset.get("image_size"))))
images, labels = batch["image"], batch["label"]
d = arm_config.distraction
maps = grad_cam_maps(result, images, labels, layer=train.model_layers(arm_config).grad_cam_layer, score=d.score,
                     weighting=d.weighting)  # [n, height, width] in [0, 1]
occluded = {fill: np.asarray(training.occlude(jnp.asarray(images), jnp.asarray(maps), d.threshold, fill,
                                              key=jax.random.key(0), data_range=tuple(d.data_range)))
            for fill in training.FILL_MODES}

names = {"zero": "0-occlusion", "one": "1-occlusion", "random": "R-occlusion"}
columns = {"input": images, f"Grad-CAM ({ARM} model)": images,
           **{f"{names[fill]}, th = {d.threshold}": x for fill, x in occluded.items()}}
fig, axes = plt.subplots(NUM_EXAMPLES, len(columns), figsize=(2 * len(columns), 2 * NUM_EXAMPLES), squeeze=False)
for j, (title, column) in enumerate(columns.items()):
    axes[0, j].set_title(title, fontsize=9)
    for i in range(NUM_EXAMPLES):
        axes[i, j].imshow(column[i, ..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        if j == 1:
            axes[i, j].imshow(maps[i], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        axes[i, j].set_xticks([])
        axes[i, j].set_yticks([])
for i in range(NUM_EXAMPLES):
    axes[i, 0].set_ylabel(f"label {int(labels[i])}")
fig.tight_layout()
plt.show()
