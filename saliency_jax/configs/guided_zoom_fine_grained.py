r"""Guided Zoom and Ensemble Guided Zoom at the thesis' scale (Bargal 2019, Sec. 6.2, Tables 6.1-6.3): CUB-200-2011,
Stanford Dogs or FGVC-Aircraft. Needs the datasets, ImageNet weights and an accelerator; documented, not run here.

Setting (thesis Sec. 6.2 and the authors' released code, andreazuna89/Guided-Zoom):
* conventional CNN: ResNet-101 from ImageNet weights at 448 x 448; SGD, batch 64, lr 0.001 x 0.1 every 10k
  iterations, 30k iterations, momentum 0.9 (the thesis' schedule; no weight decay is stated, none used);
* Evidence CNN: ResNet-101 from ImageNet weights, input 224 x 224, the same optimizer and schedule, trained on the
  evidence pool;
* pools (Algorithm 1): 150 x 150 patches of the 448-px input around the peak (``patch_ratio = 150 / 448``) resized to
  224, erased squares 85 x 85 (``erase_ratio = 85 / 448``), L = 2, cEB at ``res4a`` (= ``layer3/0`` here), border
  windows truncated (released code), bicubic, the pool's cEB maps on the ResNet with its batch norms folded into
  the convolutions (``ceb_batch_norm = "fold"``: the released pool generator's correction of the convolutions
  whose batch-norm scale is negative; ``"pass"`` leaves them); Ensemble Guided Zoom adds Grad-CAM at ``layer4`` and
  RISE (1000 masks, grid 8, p = 0.5), L = 0;
* refinement (Algorithm 2): k = 3 and 5, w = 0.4, (w_0, w_1, w_2) = (0.3, 0.2, 0.1), softmax probabilities.

Targets (thesis, top-1 %): CUB 82.3 (ResNet-101) -> 85.0 (GZ, k = 3) / 85.4 (GZ, k = 5), EGZ 84.6 / 85.0; Dogs
86.9 -> 88.4 / 88.5, EGZ 88.3 / 88.3; Aircraft 87.5 -> 89.1 / 89.0, EGZ 89.0 / 88.9. Top-3 / top-5 of the
conventional CNN: CUB 92.8 / 95.6, Dogs 97.8 / 98.9, Aircraft 95.2 / 96.1.

Deviations: our pipeline resizes every image to 448 (Evidence CNN: patches resized to 224) and flips; the thesis
takes random 448 crops of 475-px images for training and centre crops for testing (224 of 256 for the Evidence CNN).
Patches are cut from the 448-px conventional input itself (``original_size = 448``), as in the thesis.

Data: image folders ``DATA/{train,test}/<class>/*.jpg`` with the official splits (CUB 5,994 / 5,794 images of 200
species; Dogs 12,000 / 8,580 of 120 breeds; Aircraft 6,667 / 3,333 of 100 variants); CUB and Dogs also exist in
TFDS (``--config.dataset.name=tfds:caltech_birds2011`` / ``tfds:stanford_dogs`` with ``--config.dataset.data_dir``
the TFDS directory). Weights: torchvision's ResNet-101 ImageNet weights as .safetensors
(``safetensors.torch.save_file(torchvision.models.resnet101(weights="IMAGENET1K_V1").state_dict(), path)``); the
Evidence CNN starts from the same file (``guided_zoom.evidence_pretrained`` follows ``model.pretrained``).

Command (a GPU host or TPU VM; ``:dogs`` / ``:aircraft`` for the other tables):
  saliency-jax experiment --config experiments/configs/guided_zoom_fine_grained.py:cub \
      --config.dataset.data_dir=DATA --config.model.pretrained=resnet101.safetensors --workdir runs/gz_cub

Runtime: not run here. Per dataset: two 30k-iteration ResNet-101 trainings at batch 64 per pool (the conventional
CNN at 448 px, each Evidence CNN at 224 px), plus RISE's 1000 forward passes per training image for the EGZ pool
(the dominant cost of the pools) and k x 3 cEB maps per test image.
"""

from saliency_jax.configs import common

#: name -> number of classes (the folder source counts them; listed for the docstring's record).
DATASETS = {"cub": 200, "dogs": 120, "aircraft": 100}


def get_config(arg: str | None = "cub"):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    if arg not in DATASETS:
        raise ValueError(f"choose the dataset after the config path: one of {tuple(DATASETS)}; got {arg!r}")
    c = common.guided_zoom_config()
    c.experiment.title = f"Guided Zoom on {arg} (Bargal 2019, Tables 6.1-6.3)"
    c.dataset.name = "folder"
    c.dataset.data_dir = ""  # the user's prepared image folder (required)
    c.dataset.image_size = 448
    c.dataset.val_fraction = 0.0  # the whole official training split trains the conventional CNN
    c.dataset.read_threads = 16
    c.dataset.augment = dict(hflip=True, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))
    c.model.name = "resnet101"
    c.model.pretrained = ""  # torchvision-named ImageNet weights (required)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.lr_boundaries = [10_000, 20_000]
    c.optimizer.lr_scales = [0.1, 0.1]
    c.batch_size = 64
    c.eval_batch_size = 32
    c.num_steps = 30_000
    c.log_every = 100
    c.checkpoint_every = 2000
    gzc = c.guided_zoom
    gzc.evidence_size = 224
    gzc.original_size = 448
    gzc.border = "truncate"
    gzc.ceb_layer = "layer3/0"  # res4a
    gzc.grad_cam_layer = "layer4"
    gzc.rise_masks = 1000
    gzc.rise_grid = 8
    gzc.rise_masks_per_step = 10
    gzc.evidence_pretrained = c.model.get_ref("pretrained")
    gzc.evidence_steps = 30_000  # the conventional CNN's optimizer section and schedule are inherited
    gzc.evidence_val_fraction = 0.05
    gzc.batch_size = 16
    c.experiment.repeats = 1
    return c
