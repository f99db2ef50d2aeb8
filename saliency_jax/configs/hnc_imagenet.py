r"""The HNC loss at the paper's scale (Sun et al., ECCV 2020; the authors' ``running-script.sh``): ImageNet,
ResNet-101 or ResNet-152 from scratch. Needs ImageNet and accelerators; documented, not run here.

Setting (the authors' code): SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 every 30 epochs, 120 epochs,
batch 256; CAMs of the k = 100 highest-scoring wrong classes at ``layer4`` (7x7), bias included; weights: mse 0.07,
kd 0.0065 (ResNet-101) / 0.0048 (ResNet-152), temperature 1. Arms: CE, CE + HNC-mse, CE + HNC-kd.

Data: ImageNet prepared for TFDS (``tfds build imagenet2012 --file_format=array_record`` with the archives in the
manual folder), read with ``--config.dataset.data_dir=TFDS_DIR``; the validation split is the test set. The authors'
training loader (``train_imagenet_cam_loss.py``) is ``RandomSizedCrop(224)`` with ``RandomHorizontalFlip`` commented
out, so there is no flip here either (``--config.dataset.augment.hflip=True`` turns a left-right flip with probability
1/2 on). Deviation from the authors: our pipeline resizes every image to 224 x 224, for training (no random-sized
crop) and for evaluation (theirs: ``Scale(256)`` then ``CenterCrop(224)``).

Command (a TPU VM or GPU host; ``:resnet152`` for the other network):
  saliency-jax experiment --config experiments/configs/hnc_imagenet.py:resnet101 \
      --config.dataset.data_dir=/data/tfds --workdir gs://BUCKET/hnc_resnet101 --multihost

Expected: lower top-1 error for both HNC arms than for CE (the paper's claim; its table is not in the seed text this
project has, so no number is quoted here); not run here.
"""

from saliency_jax.configs import common

TRAIN_IMAGES = 1_281_167
KD_WEIGHT = {"resnet101": 0.0065, "resnet152": 0.0048}


def get_config(arg: str | None = "resnet101"):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    arg = arg or "resnet101"
    if arg not in KD_WEIGHT:
        raise ValueError(f"choose the network after the config path: one of {sorted(KD_WEIGHT)}; got {arg!r}")
    c = common.hnc_config()
    c.dataset.name = "tfds:imagenet2012"
    c.dataset.data_dir = ""
    c.dataset.image_size = 224
    c.dataset.val_fraction = 0.0
    c.dataset.read_threads = 32
    c.dataset.augment = dict(hflip=False, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))  # authors: no flip
    c.model.name = arg
    c.hnc.num_negatives = 100
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.batch_size = 256
    c.num_epochs = 120.0
    steps_per_epoch = TRAIN_IMAGES // c.batch_size
    c.optimizer.lr_boundaries = [30 * steps_per_epoch, 60 * steps_per_epoch, 90 * steps_per_epoch]
    c.optimizer.lr_scales = [0.1, 0.1, 0.1]
    c.eval_batch_size = 500
    c.log_every = 500
    c.checkpoint_every = 5000
    c.negative_cams.examples = 5000
    c.fgsm.examples = 5000
    c.experiment.arms = (common.HNC_ARMS[0], common.HNC_ARMS[1],
                         ("CE+HNC-kd", {"schemes": ("hnc",), "hnc": {"variant": "kd", "weight": KD_WEIGHT[arg]}}))
    return c
