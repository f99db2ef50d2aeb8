r"""Excitation Dropout vs the dropout baselines on MNIST (real IDX files: ../shared/data/mnist), CNN-2 at fc1.

The six arms of ``excitation_dropout_cifar10.py`` (P = 0.5, same seeds for every arm, rescale "none") on 28x28 grey
digits with a narrowed CNN-2 (16/16/32 filters, 256-unit fc layers, Gaussian init std 0.05 instead of the thesis's
0.01: at 0.01 with Adam the narrow net's fc1 ReLUs die on the initial plateau and the Excitation arm collapses, see
``excitation_dropout_cifar10.py``), 300 steps of batch 100 (half an epoch), Adam lr 1e-3, no augmentation, 2 repeats;
analyses on 2,000 random test images (compression 500, curves 500).

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/excitation_dropout_mnist.py --workdir runs/ed_mnist

Measured (2026-11-23, 2 shared CPU cores, ``--noprogress``): 5.5 min wall for the 12 runs (22-27 s of training per
run). Test accuracy on 2,000 test images, mean ± sample std over seeds 0, 1: none 0.967 ± 0.003, standard
0.960 ± 0.007, standard_per_image 0.967 ± 0.004, curriculum 0.966 ± 0.007, excitation 0.964 ± 0.003, adaptive
0.948 ± 0.003. # neurons ON at relu_fc1 (of 256): 121 / 94 / 89 / 116 / 92 / 144; entropy of p_EB 4.46 / 4.20 /
4.16 / 4.41 / 4.33 / 4.71. Compression (500 test images): with the most relevant units up to p_c = 0.5 (0.75)
switched off, the ground-truth probability stays 0.94 (0.90) for excitation vs 0.32 (0.06) none, 0.78 (0.25)
standard, 0.87 (0.44) per-image; with 192 random units off 0.87 vs 0.43 / 0.69 / 0.74 (Fig. 5.5's ranking).
"""

from saliency_jax.configs import common


def get_config(arg: str | None = None):
    c = common.excitation_dropout_config()
    c.dataset.name = "mnist"
    c.dataset.data_dir = "../shared/data/mnist"
    c.dataset.image_size = None
    return common.reduced_dropout_config(c, arg, num_steps=300, log_every=50, checkpoint_every=75)
