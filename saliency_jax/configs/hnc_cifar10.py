r"""The HNC loss (Sun et al., ECCV 2020) on CIFAR-10 at a reduced budget (real copy: ../shared/data/cifar10/).

Three arms, the same seeds and data order for each: cross-entropy (CE), CE + HNC-mse (weight 0.07), CE + HNC-kd (weight
0.0065) - the authors' ImageNet weights; ``:label_noise`` gives the same three trained with 20% symmetric label noise
(a fixed corruption of the training labels; the test set is clean). The small CNN (16/32/64 channels, BatchNorm,
global average pooling, dense head; HNC's CAMs at ``conv3``, 8x8 for 32 px inputs) from scratch, Adam 1e-3, 3,000
steps of batch 64 (~5 epochs of the 37,500 training images), horizontal flips; k = 9 negatives (all wrong classes:
``num_negatives`` 100 is clipped to classes - 1). The narrow network and short budget are for this shared 2-core
CPU (about 2 CPU-minutes per 100 steps there); widen ``model.kwargs.widths`` and ``num_steps`` elsewhere.

Evaluated on the 10,000 test images (accuracy, macro F1), and on 2,000 of them: the peaks of the negative classes'
CAMs (what HNC flattens) and the accuracy under an FGSM attack (epsilon 0, 1, 2, 4, 8 grey levels).

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/hnc_cifar10.py --workdir runs/hnc_cifar10
  saliency-jax experiment --config experiments/configs/hnc_cifar10.py:label_noise --workdir runs/hnc_cifar10_noise
Tiny variant (tests): ``:runlocal`` (the embedded digits, 3 arms, a few steps).

Paper scale: ``hnc_imagenet.py``. Runtime and measured numbers: see the closing note of the issue that added this
config (measured under load, so not repeated here).
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
    c.dataset.name = "cifar10"
    c.dataset.data_dir = "../shared/data/cifar10/cifar10.npz"
    c.dataset.image_size = None  # native 32 x 32
    c.dataset.augment = dict(hflip=True, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))
    c.model.name = "small_cnn"
    c.model.kwargs = {"widths": (16, 32, 64)}
    c.optimizer.learning_rate = 1e-3  # from scratch
    c.batch_size = 64
    c.eval_batch_size = 500
    c.num_steps = 3000
    c.log_every = 200
    c.checkpoint_every = 1000
    c.negative_cams.examples = 2000
    c.fgsm.examples = 2000
    c.experiment.repeats = 2
    if arg == "runlocal":
        c.dataset.name = "digits"
        c.dataset.data_dir = None
        c.dataset.image_size = 16
        c.model.kwargs = {"widths": (4, 8, 8)}
        c.num_steps = 6
        c.log_every = 3
        c.checkpoint_every = 3
        c.batch_size = 8
        c.eval_batch_size = 64
        c.negative_cams.examples = 40
        c.fgsm.examples = 40
        c.experiment.repeats = 1
        c.experiment.arms = common.HNC_ARMS[:1] + common.HNC_ARMS[2:] + common.HNC_NOISE_ARMS[1:2]
    elif arg == "label_noise":
        c.experiment.arms = common.HNC_NOISE_ARMS
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'label_noise', 'runlocal' or nothing")
    return c
