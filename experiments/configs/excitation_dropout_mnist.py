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

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "_excitation_dropout_cifar10", pathlib.Path(__file__).with_name("excitation_dropout_cifar10.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
base_config = _base.base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.dataset.name = "mnist"
    c.dataset.data_dir = "../shared/data/mnist"
    c.dataset.image_size = None
    c.model.kwargs = {"conv_features": (16, 16, 32), "fc_features": (256, 256), "init_std": 0.05}
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.lr_boundaries = []
    c.optimizer.lr_scales = []
    c.num_steps = 300
    c.log_every = 50
    c.checkpoint_every = 75
    c.experiment.repeats = 2
    c.analysis = dict(test_examples=2000, curve_examples=500, compression_examples=500,
                      conservative_deltas=(0.05, 0.1, 0.25), seed=0)
    if arg == "runlocal":
        c.model.kwargs = {"conv_features": (4, 4, 8), "fc_features": (16, 16)}
        c.num_steps = 6
        c.log_every = 3
        c.checkpoint_every = 3
        c.batch_size = 10
        c.eval_batch_size = 50
        c.experiment.repeats = 1
        c.analysis = dict(test_examples=50, curve_examples=20, compression_examples=20,
                          conservative_deltas=(0.01, 0.1), seed=0)
    return c
