r"""Pointing game on PASCAL VOC 2007 test (Zhang et al. 2016, Sec. 5.1; Bargal 2019, Sec. 7.4.1).

The reference setting of Zhang et al. / TorchRay's attribution benchmark:

=================================  ============================  =============================
method                             VGG16                         ResNet-50
=================================  ============================  =============================
Grad-CAM (``grad_cam``)            ``relu5_3`` (last conv block) ``layer4``
EB (``excitation_backprop``)       ``pool4``                     ``layer3``
cEB (``contrastive_...``)          ``pool4``, contrast ``relu7`` ``layer3``, contrast ``avgpool``
center baseline (``center``)       the image centre              the image centre
=================================  ============================  =============================

Protocol: each test image is resized so that its shorter side is ``input_size`` = 224 px (aspect kept, bilinear,
as TorchRay's ``get_transform``); for every class present (at least one non-"difficult" box) the map of that class
is computed at the layer, resized bilinearly to the original image size, and its maximum point is a hit if it lies
within ``tolerance`` = 15 px of a box of the class. Accuracy is the mean over the 20 classes of hits / (hits +
misses), on all (image, class) pairs and on the "difficult" subset (TorchRay's flag table
``pointing_game_ebp_voc07_difficult.txt``: boxes of the class cover < 1/4 of the image and a distractor class is
present).

Command (needs the VOC 2007 test tree, the flag table and VOC-fine-tuned weights; nothing is downloaded)::

  saliency-jax experiment --config experiments/configs/pointing_game_voc07.py \
      --config.pointing_game.data_dir=/data/VOCdevkit/VOC2007 \
      --config.pointing_game.difficult_flags=/data/pointing_game_ebp_voc07_difficult.txt \
      --config.weights.vgg16=/weights/vgg16_voc.safetensors \
      --config.weights.resnet50=/weights/resnet50_voc.safetensors --workdir runs/pointing_voc07

The arms are the two networks (nothing is trained: ``num_steps = num_epochs = 0``, the imported weights are
evaluated); the report's table has one all / difficult column pair per network.

Weights: a local ``.safetensors`` / ``.npz`` with torchvision ``state_dict`` keys and a 20-class head (a VGG16 /
ResNet-50 fine-tuned on VOC 2007 trainval), loaded with :func:`saliency_jax.models.weights.load_pretrained`.

Runtime: 4952 images, about 7,000 (image, class) maps per method and model. Each network compiles once per
distinct input shape (the aspect ratios of VOC give on the order of a hundred), which dominates on a GPU; on CPU
expect hours. ``--config.pointing_game.limit=100`` gives a quick partial run; ``--config.pointing_game.methods=center,grad_cam``
fewer methods. (Not yet run on the real data and weights here: the numbers
below are the targets, not our measurements.)

Expected (TorchRay's benchmark table, its Caffe-converted VOC models; all / difficult, %): VGG16: center 69.6 / 42.4,
Grad-CAM 86.6 / 74.0, EB 77.1 / 56.6, cEB 79.9 / 66.5; ResNet-50: Grad-CAM 90.4 / 82.3, EB 84.5 / 70.8, cEB 90.7 /
82.1. Differences to expect with other weights and with our models: TorchRay converts the networks to fully
convolutional form and back-propagates a spatial softmax of the class score map, whereas our VGG16 classifies
through a 7x7 adaptive average pool and our ResNet-50 through global average pooling (one score per class); the
Caffe VGG16 uses ceil-mode max pooling, and the Caffe ResNet-50 strides its first 1x1 convs (torchvision's v1.5
strides the 3x3), which our ResNet cannot express. The centre baseline does not depend on any of this.

cEB: :func:`saliency_jax.saliency.contrastive_excitation_backprop` subtracts the dual (negated-classifier) pass at
the classifier's input, which *is* ``relu7`` for VGG16 (``fc8``'s input) and ``avgpool`` for ResNet-50 (``fc``'s
input); the ``contrast`` entries below document this and the evaluator checks them (``classifier_input``).

Tiny variant (tests; random tiny models, no weights): ``--config experiments/configs/pointing_game_voc07.py:runlocal``
with ``--config.pointing_game.data_dir`` pointing at a small generated VOC tree.
"""

from saliency_jax.configs import common

import ml_collections

#: Reference layers (module paths of saliency_jax.models.vgg / resnet) of Zhang et al. / TorchRay.
REFERENCE_LAYERS = {
    "vgg16": dict(grad_cam="relu5_3", excitation_backprop="pool4", contrastive_excitation_backprop="pool4",
                  contrast="relu7"),
    "resnet50": dict(grad_cam="layer4", excitation_backprop="layer3", contrastive_excitation_backprop="layer3",
                     contrast="avgpool"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.
    """
    c = common.default_config()
    c.num_steps = 0  # nothing is trained: the arms evaluate imported weights
    c.num_epochs = 0.0
    c.model.num_classes = 20
    c.dataset.image_size = 224  # the shape the models are built with (the pointing game resizes each image itself)
    c.evaluators = ("pointing_game",)
    c.pointing_game = common.evaluator_section(
        "pointing_game", dataset="voc07", data_dir="data/VOCdevkit/VOC2007", split="test",
        # TorchRay's torchray/benchmark/pointing_game_ebp_voc07_difficult.txt; "" to report "all" only.
        difficult_flags="data/pointing_game_ebp_voc07_difficult.txt", tolerance=15.0, input_size=224,
        class_batch=1,  # (image, class) maps per network call; 1 compiles least (VOC has ~1.4 classes per image)
        layers=dict(grad_cam="", excitation_backprop="", contrastive_excitation_backprop="", contrast=""))
    c.weights = ml_collections.ConfigDict(dict(vgg16="weights/vgg16_voc.safetensors",
                                               resnet50="weights/resnet50_voc.safetensors"))
    kwargs = {"vgg16": {}, "resnet50": {}}
    if arg == "runlocal":
        c.pointing_game.data_dir = ""
        c.pointing_game.difficult_flags = ""
        c.pointing_game.input_size = 64
        c.dataset.image_size = 64
        c.model.allow_random_init = True
        c.weights.vgg16 = c.weights.resnet50 = ""
        kwargs = {"vgg16": dict(stage_features=(4, 4, 4, 4, 4), fc_features=8), "resnet50": dict(num_filters=2)}
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'runlocal' or nothing")
    c.experiment.arms = tuple(
        (arch, {"model": {"name": arch, "kwargs": kwargs[arch], "pretrained": c.weights.get_ref(arch)},
                "pointing_game": {"layers": dict(REFERENCE_LAYERS[arch]),
                                  "classifier_input": REFERENCE_LAYERS[arch]["contrast"]}})
        for arch in ("vgg16", "resnet50"))
    return c
