r"""Background invariance (Cruz & Cardoso) on your own images: an image folder, 3 channels, a VGG classifier.

For photographs taken in one setting (e.g. a studio or a laboratory, as the insulator images of the ICPR 2020 paper)
that must be classified elsewhere. The folder is ``DATA_DIR/{train,test}/<class name>/*.jpg|png`` (the ``folder``
source; every image resized to ``IMAGE_SIZE`` x ``IMAGE_SIZE``, bilinear). Arms, trained by the
``background_invariance`` trainer (``saliency_jax/trainers/background_invariance.py``):

* ``vanilla``: the classifier alone (phase 1), as the authors' ``train1.py``.
* ``proposal``: phase 1, the U-Net's masks (phase 2), the classifier against generated backgrounds (phase 3).

The classifier: the authors switch from their small CNN to an ImageNet VGG19 with two dense 4096 layers at inputs of
128 px and more (``mymodels.vgg19``, Adam 1e-5 for it and for phase 3). This library has VGG16 (torchvision's, no
BatchNorm, dropout 0.5 in fc6/fc7), so the config uses ``vgg16`` at the authors' learning rate 1e-5; start it from
ImageNet weights with ``--config.model.pretrained=PATH`` (a torchvision-named ``.safetensors`` / ``.npz``; the head is
replaced). Below 128 px use ``--config.model.name=vanilla_cnn --config.background_invariance.classifier_learning_rate=
1e-3`` (the authors' small CNN). Three channels: the generator makes colour backgrounds and its brightness penalty is
off (the code applies it to one-channel images only). The U-Net at 128 px has five blocks (32 ... 512 filters); the
generator draws each 64 x 64 tile (2 x 2 tiles) from a 48-dimensional noise vector.

Budget: the authors' defaults, batch 8 and 100 epochs per phase (``--config.background_invariance.classifier_epochs=
...`` etc. to change them; ``--config.batch_size`` changes the batch of every phase). The Attention baseline is not an
arm here: :class:`~saliency_jax.models.AttentionCNN`'s global network is the small CNN, not VGG. Evaluated on the
folder's test split (clean accuracy and per-class metrics); the MNIST background protocol does not apply to photos.
The Attention arm and the MNIST protocol are in ``background_invariance_mnist.py``.

Command (from the repository root):
  saliency-jax experiment --config experiments/configs/background_invariance_folder.py \
      --config.dataset.data_dir=/path/to/DATA_DIR --config.model.pretrained=/path/to/vgg16.safetensors \
      --workdir runs/background_invariance_folder

Runtime: not run here (no such data on this machine); expect it to need an accelerator (VGG16 at 128 px, 3 x 100
epochs).
"""

from saliency_jax.configs import common

from ml_collections import config_dict

IMAGE_SIZE = 128


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    if arg:
        raise ValueError(f"unknown config argument {arg!r}")
    c = common.background_invariance_config()
    c.dataset.name = "folder"
    c.dataset.data_dir = config_dict.placeholder(str)  # required: --config.dataset.data_dir=DIR
    c.dataset.image_size = IMAGE_SIZE
    c.dataset.channels = 3
    c.dataset.val_fraction = 0.0
    c.dataset.augment = {}
    c.model.name = "vgg16"
    c.model.kwargs = {}
    c.batch_size = 8
    c.eval_batch_size = 64
    c.log_every = 100
    c.checkpoint_every = 2000
    c.background_invariance.update(dict(classifier_learning_rate=1e-5, mask_learning_rate=1e-5,
                                        generator_learning_rate=1e-5, previews=6, preview_examples=8))
    c.evaluators = ("classification", "training_curves")
    c.experiment.arms = (
        ("vanilla", {"background_invariance": {"method": "classifier"}}),
        ("proposal", {"background_invariance": {"method": "adversarial"}}),
    )
    c.experiment.repeats = 1
    return c
