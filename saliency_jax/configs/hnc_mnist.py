r"""The HNC loss (Sun et al., ECCV 2020) on MNIST read from the IDX files (real copies: ../shared/data/mnist/).

The arms of ``hnc_cifar10.py`` (CE, CE + HNC-mse 0.07, CE + HNC-kd 0.0065; ``:label_noise``: each with 20% symmetric
label noise) on the small CNN (16/32/64 channels; CAMs at ``conv3``, 7x7 for 28 px digits), Adam 1e-3, 2,000 steps of
batch 64, no augmentation; k = 9 negatives; 2 repeats. Evaluated as ``hnc_cifar10.py``.

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/hnc_mnist.py --workdir runs/hnc_mnist
  saliency-jax experiment --config experiments/configs/hnc_mnist.py:label_noise --workdir runs/hnc_mnist_noise
"""

from saliency_jax.configs import common


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    c = common.hnc_config()
    c.dataset.name = "mnist"
    c.dataset.data_dir = "../shared/data/mnist"
    c.dataset.image_size = None  # native 28 x 28
    c.dataset.augment = dict(hflip=False, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))
    c.model.name = "small_cnn"
    c.model.kwargs = {"widths": (16, 32, 64)}
    c.optimizer.learning_rate = 1e-3
    c.batch_size = 64
    c.eval_batch_size = 500
    c.num_steps = 2000
    c.log_every = 100
    c.checkpoint_every = 1000
    c.negative_cams.examples = 2000
    c.fgsm.examples = 2000
    c.experiment.repeats = 2
    if arg == "label_noise":
        c.experiment.arms = common.HNC_NOISE_ARMS
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'label_noise' or nothing")
    return c
