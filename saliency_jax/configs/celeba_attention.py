r"""Directing AlexNet's attention on CelebA with user-drawn region templates (poster, seed 003). Needs user data.

The poster's setting: AlexNet (ImageNet weights, torchvision layout) fine-tuned on CelebA for the attributes
Wearing_Lipstick, High_Cheekbones and Double_Chin with multi-label binary cross-entropy (``loss_a``); where Grad-CAM
(at ``relu5``, the last convolutional layer) shows the network relying on a co-occurring attribute, the user draws
the right region once on a template of the aligned face (``saliency_jax.data.celeba.REGION_TEMPLATES``: the mouth,
the cheeks, the chin; rasterised at the input size and flipped with the image) and the network is fine-tuned with
``w_a * loss_a + w_g * loss_g``, ``loss_g = -ln IoU(Grad-CAM, template)`` over each present attribute.

Arms (same seeds, the same total budget):

* ``baseline``: ``loss_a`` only for ``num_steps`` steps (the "pre-trained network" of the poster's table, trained
  as long as the guided one);
* ``guidance``: ``loss_a`` alone for the first ``attention_guidance.start_step`` steps, then
  ``w_a * loss_a + w_g * loss_g`` (the poster's fine-tuning stage), in one run: up to ``start_step`` both arms
  follow the same trajectory.

The poster gives neither ``w_a``/``w_g`` nor the optimizer, the steps or the templates: ``w_a = w_g = 1``
(``classification_weight`` / ``attention_guidance.w_g``), SGD momentum 0.9 at lr 1e-3, batch 64, 224 px input,
horizontal flips, 6,000 + 2,000 steps (about 2.4 + 0.8 epochs of the 162,770 training images) are our choices.
Evaluated on the test partition (19,962 images): per-attribute accuracy and accuracy on the co-occurrence-biased
subsets (attribute present, partner absent: Heavy_Makeup, Smiling, Chubby), and the Grad-CAM mass inside the
templates. Poster numbers (pre-trained -> fine-tuned; test set / biased subset): W.L. 92.9 -> 93.25 % /
82.17 -> 83.31 %, H.C. 63.53 -> 65.56 % / 47.41 -> 61.33 %, D.C. 84.18 -> 84.79 % / 81.77 -> 86.45 %.

Not run here (CelebA and ImageNet weights are user data; an accelerator is needed: every guided step differentiates
through Grad-CAM, about 2-3 plain steps' cost). ``:runlocal`` (tiny AlexNet, 64 px, 4 steps) runs the whole path on a
generated CelebA-format tree: the tests set ``--config.dataset.data_dir`` to one.

Command (from the repository root; CelebA in the standard layout, ImageNet AlexNet weights converted from
torchvision, ``saliency_jax.models.weights``):
  saliency-jax experiment --config experiments/configs/celeba_attention.py --workdir runs/celeba_attention \
      --config.dataset.data_dir=/path/to/celeba --config.model.pretrained=/path/to/alexnet.safetensors
"""

from saliency_jax.configs import common

ARMS = (
    ("baseline", {"schemes": ()}),
    ("guidance", {"schemes": ("attention_guidance",)}),
)


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    c = common.celeba_attention_config()
    c.experiment.arms = ARMS
    c.experiment.title = "CelebA: directing AlexNet's attention with region templates (poster)"
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9
    c.batch_size = 64
    c.eval_batch_size = 200
    c.num_steps = 8000
    c.attention_guidance.start_step = 6000
    c.log_every = 100
    c.checkpoint_every = 1000
    c.experiment.repeats = 1
    if arg == "runlocal":
        c.dataset.image_size = 64
        c.model.kwargs = {"conv_features": (4, 8, 8, 8, 8), "fc_features": 16}
        c.num_steps = 4
        c.attention_guidance.start_step = 2
        c.log_every = 2
        c.checkpoint_every = 2
        c.batch_size = 4
        c.eval_batch_size = 4
        c.region_mass.examples = 0
        c.region_mass.batch_size = 4
        c.cooccurrence_accuracy.batch_size = 4
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'runlocal'")
    return c
