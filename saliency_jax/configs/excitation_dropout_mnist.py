r"""Excitation Dropout vs the dropout baselines on MNIST (real IDX files: ../shared/data/mnist), CNN-2 at fc1.

The six arms of ``excitation_dropout_cifar10.py`` (P = 0.5, same seeds for every arm, each arm's rescaling as the
authors ran it: ``dropout.rescale="authors"``, Excitation / adaptive divided by the per-image fraction kept, the
baselines by P) on 28x28 grey digits with a narrowed CNN-2 (16/16/32 filters, 256-unit fc layers, Gaussian init std
0.05 instead of the thesis's 0.01: at 0.01 with Adam the narrow net's fc1 ReLUs die on the initial plateau and the
Excitation arm collapses, see ``excitation_dropout_cifar10.py``), 300 steps of batch 100 (half an epoch), Adam lr
1e-3, no augmentation, 2 repeats; analyses on 2,000 random test images (compression 500, curves 500).

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/excitation_dropout_mnist.py --workdir runs/ed_mnist

Measured (2026-12-07, main 2abb0c5, 2 shared CPU cores at load 9-31 - other jobs running, so the times are not idle
figures: 67.8 min wall for the 12 runs; about 5.5 min on a quiet machine earlier). Test accuracy on 2,000 test
images, mean ± sample std over seeds 0, 1, with the authors' rescaling: none 0.965 ± 0.003, standard 0.963 ± 0.008,
standard_per_image 0.971 ± 0.005, curriculum 0.966 ± 0.009, excitation 0.967 ± 0.004, adaptive 0.961 ± 0.004
(without rescaling, ``dropout.rescale="none"``, the recorded run of the same seeds: 0.965 / 0.959 / 0.967 / 0.969
/ 0.964 / 0.948 - the "none" arm is the same run, bit for bit). At this budget every arm is within 1 point of
"none" and the seed spread is as large as the gaps: no arm is reliably better. # neurons ON at relu_fc1 (of 256):
122 / 87 / 88 / 116 / 95 / 140; entropy of p_EB 4.47 / 4.13 / 4.15 / 4.42 / 4.34 / 4.65. Compression (500 test
images): with the most relevant units up to p_c = 0.5 (0.75) switched off, the ground-truth probability stays 0.94
(0.87) for excitation vs 0.34 (0.06) none, 0.64 (0.21) standard, 0.72 (0.26) per-image; with 192 random units off
0.85 vs 0.43 / 0.46 / 0.50 (Fig. 5.5's ranking, as without rescaling).
"""

from saliency_jax.configs import common


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.
    """
    c = common.excitation_dropout_config()
    c.dataset.name = "mnist"
    c.dataset.data_dir = "../shared/data/mnist"
    c.dataset.image_size = None
    return common.reduced_dropout_config(c, arg, num_steps=300, log_every=50, checkpoint_every=75)
