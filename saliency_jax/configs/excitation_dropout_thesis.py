r"""Excitation Dropout at the thesis's settings (Bargal 2019, Sec. 5.2.1-5.2.2): needs your data and time.

Arguments (``--config experiments/configs/excitation_dropout_thesis.py:<arg>``):

* ``cifar10``, ``cifar100``, ``caltech256``: CNN-2 (96/128/256 filters, 2048-unit fc layers, Gaussian init std
  0.01) from scratch, dropout at ``fc1``, 100k iterations of batch 100, SGD momentum 0.9, weight decay 0.005 (biases
  too), lr 1e-3 then 1e-4 after 25k with the authors' released script's multipliers (x10 / x20 on the last layer's
  weights / bias, x2 on other biases) and rescaling (see ``common.excitation_dropout_config``); Caltech-256 at
  128 px. Six arms (none, standard, standard + mask per image, curriculum,
  excitation, adaptive), P = 0.5, five repeats. Tables 5.1, 5.3, 5.5 and Figs. 5.3, 5.5-5.8.
* ``ucf101_vgg16``: VGG16 fine-tuned on UCF101 frames at 224 px (an image folder of extracted frames:
  ``DIR/{train,test}/<class>/*.jpg``), dropout at ``fc6`` (the model's own ``drop6`` bypassed; ``drop7`` kept),
  30k iterations of batch 50, lr 1e-3, ImageNet weights from ``--config.model.pretrained=PATH``. Table 5.2.
* ``ucf101_alexnet``: the same with torchvision's AlexNet (ImageNet weights from a torchvision ``alexnet`` state
  dict), dropout at ``fc6`` (the output of ``relu6``; the model's own ``drop6`` after it is bypassed, its
  ``drop5`` before ``fc6`` kept, as ``drop7`` is kept for VGG16). Table 5.2.

Data: ``cifar10`` reads ../shared/data/cifar10/cifar10.npz; CIFAR-100 and Caltech-256 through TFDS prepared with
``tfds build --file_format=array_record`` (``--config.dataset.data_dir``) or an image folder.

Command:
  saliency-jax experiment --config experiments/configs/excitation_dropout_thesis.py:cifar10 --workdir runs/ed_thesis_c10

Runtime: about 100k x 2 s on a GPU-less host per run (days); on one modern GPU roughly an hour per run.
Expected (thesis, mean of 5): CIFAR-10 ED 81.94% / SD 80.13%; CIFAR-100 52.04% / 50.36%; Caltech-256 35.77% /
28.73%; UCF101 VGG16 73.23% / 71.93%.
"""

from saliency_jax.configs import common


def get_config(arg: str | None = "cifar10"):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    c = common.excitation_dropout_config()  # CNN-2 and the thesis optimizer, 100k steps, 5 repeats
    arg = arg or "cifar10"
    if arg == "cifar10":
        c.dataset.name = "cifar10"
        c.dataset.data_dir = "../shared/data/cifar10/cifar10.npz"
        c.dataset.image_size = None
    elif arg == "cifar100":
        c.dataset.name = "tfds:cifar100"
        c.dataset.image_size = None
    elif arg == "caltech256":
        c.dataset.name = "tfds:caltech256"  # or "folder" with --config.dataset.data_dir
        c.dataset.image_size = 128
    elif arg in ("ucf101_vgg16", "ucf101_alexnet"):
        c.dataset.name = "folder"
        c.dataset.data_dir = ""
        c.dataset.image_size = 224
        c.model.name = "vgg16" if arg == "ucf101_vgg16" else "alexnet"
        c.dropout.layer = "relu6"
        c.dropout.bypass = ("drop6",)
        c.utilization.update(layer="relu6", weights="fc6", test_examples=0, curve_examples=1000,
                             conservative_deltas=(0.15,))
        c.compression.update(layer="relu6", examples=1000)
        c.optimizer.weight_decay = 0.0
        c.optimizer.lr_multipliers = ()  # the released script's multipliers are CNN-2's; none for fine-tuning
        c.optimizer.lr_boundaries = []
        c.optimizer.lr_scales = []
        c.batch_size = 50
        c.num_steps = 30_000
        c.checkpoint_every = 3_000
    else:
        raise ValueError(f"unknown argument {arg!r}; choose cifar10, cifar100, caltech256, ucf101_vgg16 or "
                         "ucf101_alexnet")
    if arg not in ("ucf101_vgg16", "ucf101_alexnet"):
        c.utilization.update(test_examples=0, curve_examples=1000, conservative_deltas=(
            {"cifar10": 0.25, "cifar100": 0.30, "caltech256": 1.25}[arg],))
        c.compression.examples = 2000
    return c
