r"""Table 1 of Morales et al. 2021: FT-ResNet50 vs 0-, R-, 1-occlusion on Stanford Cars or FGVC-Aircraft.

Paper setting (Sec. 4.2-4.3): ResNet-50 initialised from ImageNet weights and fine-tuned, 224 x 224 inputs, Adam
(lr 5e-5, b1 0.9, b2 0.999, eps 7e-7), batch 16, augmentation flip / rotation [-40, 40] / channel shift [-30, 30] /
brightness [0.5, 1.5], 75/25 train/validation split repeated 3 times, Grad-CAM at the last conv layer (``layer4``),
p = 0.25, th = 0.85. The paper gives no epoch count; 30 epochs here (our choice).

Data: prepare an image folder ``DATA/{train,test}/<class>/*.jpg`` (one folder per class; the official splits: Cars
8,144 / 8,041 images of 196 classes; Aircraft 6,667 / 3,333 of 100 variants). Weights: torchvision's ResNet-50
ImageNet weights saved as .safetensors (``safetensors.torch.save_file(model.state_dict(), path)``) or an .npz.

Command:
  saliency-jax experiment --config experiments/configs/distraction_table1.py:stanford_cars \
      --config.dataset.data_dir=DATA --config.model.pretrained=resnet50.safetensors --workdir runs/cars
  (``:fgvc_aircraft`` for the second half of the table; on a TPU VM pod add ``--multihost``.)

Runtime: not run here (no data on this machine); roughly 2-3 hours per arm on one modern GPU.
Expected (paper, Table 1), accuracy: Cars 0.846 (FT-ResNet50), 0.875 (0-occ.), 0.864 (R-occ.), 0.873 (1-occ.);
Aircraft 0.733, 0.751, 0.740, 0.746.
"""

from saliency_jax.configs import common

DATASETS = ("stanford_cars", "fgvc_aircraft")


def get_config(arg: str | None = "stanford_cars"):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    if arg not in DATASETS:
        raise ValueError(f"choose the dataset after the config path: one of {DATASETS}; got {arg!r}")
    c = common.distraction_config()
    c.dataset.name = "folder"
    c.dataset.data_dir = ""  # the user's prepared image folder (required)
    c.dataset.image_size = 224
    c.dataset.read_threads = 16
    c.dataset.augment = dict(hflip=True, rotation=40.0, channel_shift=30.0, brightness=(0.5, 1.5))
    c.model.name = "resnet50"
    c.model.pretrained = ""  # path to torchvision-named ImageNet weights (required for FT-ResNet50)
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 30.0
    c.log_every = 100
    c.checkpoint_every = 1000
    c.experiment.arms = (("FT-ResNet50", common.DISTRACTION_ARMS[0][1]), *common.DISTRACTION_ARMS[1:])
    c.experiment.repeats = 3
    return c
