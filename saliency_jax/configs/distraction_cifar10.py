r"""Distraction training on CIFAR-10 at a reduced budget (real copy: ../shared/data/cifar10/cifar10.npz).

Baseline vs 0-, R- and 1-occlusion (Morales et al. 2021; p = 0.25, th = 0.85) on the small CNN (32/64/128 channels)
trained from scratch on 75% of the training split, evaluated on the 10,000 test images clean and with Random
Erasing of every image. The paper's augmentation except rotation (horizontal flip, channel shift [-30, 30],
brightness [0.5, 1.5]); rotation is left out because its per-image host cost would dominate a CPU run.

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/distraction_cifar10.py \
      --config.dataset.data_dir=../shared/data/cifar10/cifar10.npz --workdir runs/cifar10

Runtime: about 12.5 minutes per arm on 2 CPU cores (measured: 727 s baseline, 742 s 0-occlusion of training, 25
min for those two arms with evaluation; train steps 103 ms baseline / 111 ms with occlusion at p = 1, input
18 ms per batch in 2 grain threads); ~50 minutes for the 4 arms. One arm alone: ``saliency-jax train`` with the same
config and ``--config.schemes=distraction --config.distraction.fill=zero`` (``--config.schemes=`` for the baseline).
Expected (measured, seed 0, baseline and 0-occlusion only): clean test accuracy 0.662 / 0.654, macro F1 0.652 /
0.644; with every test image randomly erased 0.344 / 0.397 (R- and 1-occlusion not run yet).
"""

from saliency_jax.configs import common


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.
    """
    c = common.distraction_config()
    c.dataset.name = "cifar10"
    c.dataset.data_dir = "../shared/data/cifar10/cifar10.npz"
    c.dataset.image_size = None  # native 32 x 32
    c.dataset.augment = dict(hflip=True, rotation=0.0, channel_shift=30.0, brightness=(0.5, 1.5))
    c.model.name = "small_cnn"
    c.model.kwargs = {"widths": (32, 64, 128)}
    c.optimizer.learning_rate = 1e-3  # from scratch
    c.batch_size = 64
    c.eval_batch_size = 500
    c.num_steps = 6000
    c.log_every = 200
    c.checkpoint_every = 1000
    if arg == "runlocal":
        c.num_steps = 20
        c.log_every = 10
        c.experiment.arms = c.experiment.arms[:2]
    return c
