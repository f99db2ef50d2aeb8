r"""Tables 3 and 4 of Morales et al. 2021: FT-ResNet50 vs 0-occlusion on EgoFoodPlaces (15 food-scene classes).

Setting as Table 1 (``distraction_table1.py``) at 250 x 250 inputs; the report's per-class true positive rates give
Table 3 and its Random Erasing section Table 4. The dataset is heavily imbalanced; the paper reports weighted and
macro metrics (``oversample`` can repeat chosen classes: ``--config.dataset.oversample='{"11": 3}'``).

Data: an image folder ``DATA/{train,test}/<class>/*.jpg`` prepared by the user (33,810 images from 11 users).
Weights: torchvision ResNet-50 ImageNet weights (.safetensors / .npz).

Command:
  saliency-jax experiment --config experiments/configs/distraction_egofoodplaces.py \
      --config.dataset.data_dir=DATA --config.model.pretrained=resnet50.safetensors --workdir runs/egofood

Runtime: not run here (no data on this machine).
Expected (paper): Table 3 accuracy 0.67 (FT-ResNet50) vs 0.68 (0-occlusion), weighted F1 0.64 vs 0.66;
Table 4 (randomly erased test images) accuracy 0.59 vs 0.60.
"""

from saliency_jax.configs import common


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.
    """
    c = common.distraction_config()
    c.dataset.name = "folder"
    c.dataset.data_dir = ""  # the user's prepared image folder (required)
    c.dataset.image_size = 250
    c.dataset.read_threads = 16
    c.dataset.augment = dict(hflip=True, rotation=40.0, channel_shift=30.0, brightness=(0.5, 1.5))
    c.model.name = "resnet50"
    c.model.pretrained = ""  # path to torchvision-named ImageNet weights (required for FT-ResNet50)
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 30.0
    c.log_every = 100
    c.checkpoint_every = 1000
    c.experiment.arms = (("FT-ResNet50", common.DISTRACTION_ARMS[0][1]), common.DISTRACTION_ARMS[1])
    c.experiment.repeats = 3
    return c
