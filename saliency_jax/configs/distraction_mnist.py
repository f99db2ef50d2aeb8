r"""Distraction training on MNIST read from the four standard IDX files (real copies: ../shared/data/mnist/).

Baseline vs 0-, R- and 1-occlusion (Morales et al. 2021, Algorithm 1; p = 0.25, th = 0.85, Grad-CAM of the
ground-truth class, softmax score, guided weights, at the last conv layer ``conv3``) on the small CNN, trained on
75% of the training split (the paper's 75/25 split, seed = repeat), evaluated on the 10,000 test images clean and
with Random Erasing (Zhong et al. 2020) of every image.

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/distraction_mnist.py \
      --config.dataset.data_dir=../shared/data/mnist --workdir runs/mnist

Runtime: 31 minutes measured on 2 CPU cores shared with other jobs (load average ~8; 4 arms x 2 repeats x 2,000
steps of batch 64, ~3 epochs); expect roughly half on an idle machine.
Expected (measured, seeds 0-1, mean ± sample std): clean accuracy 0.951 ± 0.015 (baseline), 0.954 ± 0.004
(0-occlusion), 0.957 ± 0.008 (R-occlusion), 0.950 ± 0.002 (1-occlusion); with every test image randomly erased
0.420 ± 0.074, 0.383 ± 0.033, 0.578 ± 0.045, 0.483 ± 0.082. At this budget the narrow GAP network is still
under-trained (train accuracy ~0.97 at the end), so clean accuracy stays below the usual 0.99.
"""

from saliency_jax.configs import common


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.
    """
    c = common.distraction_config()
    c.dataset.name = "mnist"
    c.dataset.data_dir = "../shared/data/mnist"
    c.dataset.image_size = None  # native 28 x 28
    c.dataset.augment = dict(hflip=False, rotation=0.0, channel_shift=30.0, brightness=(0.5, 1.5))
    c.model.name = "small_cnn"
    c.model.kwargs = {"widths": (16, 32, 64)}
    c.optimizer.learning_rate = 1e-3  # from scratch
    c.batch_size = 64
    c.eval_batch_size = 500
    c.num_steps = 2000
    c.log_every = 100
    c.checkpoint_every = 1000
    c.experiment.repeats = 2
    if arg == "runlocal":
        c.num_steps = 20
        c.log_every = 10
        c.experiment.repeats = 1
        c.experiment.arms = c.experiment.arms[:2]
    return c
