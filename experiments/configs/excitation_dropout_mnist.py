r"""Excitation Dropout vs the dropout baselines on MNIST (real IDX files: ../shared/data/mnist), CNN-2 at fc1.

The six arms of ``excitation_dropout_cifar10.py`` (P = 0.5, same seeds for every arm) on 28x28 grey digits with a
narrowed CNN-2 (16/16/32 filters, 256-unit fc layers, Gaussian init std 0.01), 300 steps of batch 100, Adam lr 1e-3,
no augmentation, 2 repeats; analyses on 2,000 test images.

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/excitation_dropout_mnist.py --workdir runs/ed_mnist

Runtime: about 2 minutes per run on 2 idle CPU cores (12 runs). Expected: test accuracy above 0.9 for every arm.
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
    c.model.kwargs = {"conv_features": (16, 16, 32), "fc_features": (256, 256)}
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.lr_boundaries = []
    c.optimizer.lr_scales = []
    c.num_steps = 300
    c.log_every = 50
    c.checkpoint_every = 75
    c.experiment.repeats = 2
    c.analysis = dict(test_examples=2000, curve_examples=500, compression_examples=1000,
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
