r"""Background invariance by adversarial backgrounds (Cruz & Cardoso) on MNIST: Table 1 of the poster.

Digits zero-padded to 32x32 (source ``mnist32``, read from the IDX files; real copies in ../shared/data/mnist/), the
whole 60,000-image training split (the authors validate on the test split; no validation split here), evaluated
on the 10,000 test images clean and under the six fixed backgrounds of the protocol (``"backgrounds"`` evaluator).
Arms, trained by the ``background_invariance`` trainer (``saliency_jax/trainers/background_invariance.py``):

* ``vanilla``: the authors' classifier (``mymodels.classifier``: 3 conv blocks 32/64/128, dense 128) alone, phase 1.
* ``attention``: Guan et al. 2018 as the authors ran it (``train_att.py``): the same classifier as global CNN
  (stage 1 = phase 1), then its crop branch and fusion layers with the global CNN frozen, for as many steps as the
  proposal's phase 3 (the same budget on top of phase 1).
* ``proposal``: phase 1, phase 2 (U-Net masks: area 0.2, TV 0.1), phase 3 (Otsu-binarised masks, adversarial
  backgrounds from the generator in 2x2 tiles, both players updated every step), generator Adam lr 1e-3.
* ``proposal_glr1e-5``: the same with the authors' generator learning rate 1e-5 (``mymodels.gen``).

The phase cache (``background_invariance.phase_cache``) trains phase 1 once per seed for all four arms and phase 2
once per seed for both proposals.

Budget (reduced, to fit a shared 2-core CPU; the authors run 100 epochs of batch 8 per phase): batch 64; phase 1
1 epoch, phase 2 0.25 epoch, phase 3 and the attention stage 2 0.6 epoch (``CLASSIFIER_EPOCHS``, ``MASK_EPOCHS``,
``ADVERSARIAL_EPOCHS`` below); U-Net learning rate 1e-3 (``MASK_LR``) instead of the code's 1e-5 (at 1e-5 the U-Net barely moves in a fraction of an
epoch); no augmentation (the code's Keras generator also flips, rotates, shifts and shears); 2 seeds.

Generator learning rate: the code's 1e-5 (``mymodels.gen``) is the ``proposal_glr1e-5`` arm; the ``proposal`` arm
uses 1e-3 (the classifier's), because at 1e-5 the generator barely changes its initial, nearly uniform grey
backgrounds within this budget (see the measured numbers below and the runs' ``backgrounds_along_training.png``).

Command (from the repository root):
  nice -n 5 saliency-jax experiment --config experiments/configs/background_invariance_mnist.py \
      --workdir runs/background_invariance_mnist

Measured (main 8daa0a0, a fresh classifier Adam at phase 3 as the authors' ``train3.py``; 2 seeds, mean ± sample
std, accuracy in %; shared 2-core CPU, load 3-31; the runs' training times add up to 134 min and their evaluations
to 11 min; ``docs/results/background_invariance_mnist.json``):

=================  ==========  ==========  ==========  ==========  ==========  ==========  ==========  ==========
arm                clean       stripes     checker     border      circles     clock       random      bg. mean
=================  ==========  ==========  ==========  ==========  ==========  ==========  ==========  ==========
vanilla            98.7 ± 0.0  50.5 ± 0.1  39.3 ± 13   81.8 ± 2.7  75.9 ± 8.7  61.6 ± 9.8  76.2 ± 0.3  64.2 ± 5.8
attention          95.8 ± 0.2  12.3 ± 3.0  11.3 ± 2.2  36.4 ± 11   20.3 ± 6.0  13.9 ± 2.4  19.5 ± 12   18.9 ± 0.3
proposal           96.0 ± 0.2  87.7 ± 5.4  90.9 ± 6.5  94.5 ± 1.1  91.2 ± 0.6  90.8 ± 4.0  92.4 ± 0.1  91.2 ± 2.9
proposal_glr1e-5   98.2 ± 0.2  37.5 ± 14   49.7 ± 15   92.7 ± 1.4  73.7 ± 1.8  65.1 ± 12   85.4 ± 4.3  67.3 ± 7.7
=================  ==========  ==========  ==========  ==========  ==========  ==========  ==========  ==========

The proposal (generator at 1e-3) is robust on every background (mean 91.2 against the poster's 85.5) with clean
accuracy 96.0, 2.7 points under this vanilla CNN's 98.7; at the code's generator rate 1e-5 the backgrounds stay
nearly uniform within this budget and robustness stays close to the vanilla CNN's (67.3 against 64.2). The vanilla
CNN here is more robust than the poster's (64.2 mean against 31.2): one epoch at batch 64, no augmentation. The
Attention baseline falls well below both here (the poster has it near the vanilla CNN); not investigated further.

The fresh phase-3 optimizer against the carry-over of phase 1's Adam (``phase3_optimizer="continue"``, the
project's behaviour before 2026-12-07; its 2-seed run: proposal clean 97.3 ± 0.2, backgrounds 88.7 ± 5.4 / 95.4 ±
0.7 / 95.2 ± 0.9 / 92.5 ± 2.3 / 91.1 ± 1.7 / 95.2 ± 0.1, mean 93.0; glr1e-5 clean 98.3 ± 0.2, background mean
67.0): at this budget (0.6 epoch of phase 3) the fresh Adam costs the proposal 1.3 points of clean accuracy and
1.8 points of background mean (91.2 ± 2.9 against 93.0); on 4 of the 6 backgrounds (all but checkerboard and
random) the fresh run's mean lies within one sample std of the carry-over's. The ranking and the finding are
unchanged. The vanilla and attention arms never reach phase 3, yet differ from that run's (vanilla background mean
64.2 against 66.0): it was measured at an earlier commit; not investigated.
"""

from saliency_jax.configs import common

CLASSIFIER_EPOCHS = 1.0
MASK_EPOCHS = 0.25
ADVERSARIAL_EPOCHS = 0.6
MASK_LR = 1e-3


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    c = common.background_invariance_config()
    c.dataset.name = "mnist32"
    c.dataset.data_dir = "../shared/data/mnist"
    c.dataset.image_size = None  # 32 x 32 by padding, not resizing
    c.dataset.channels = 1
    c.dataset.val_fraction = 0.0
    c.dataset.augment = {}
    c.batch_size = 64
    c.eval_batch_size = 500
    c.log_every = 50
    c.checkpoint_every = 200
    c.background_invariance.update(dict(
        classifier_epochs=CLASSIFIER_EPOCHS, mask_epochs=MASK_EPOCHS, adversarial_epochs=ADVERSARIAL_EPOCHS,
        attention_epochs=ADVERSARIAL_EPOCHS, mask_learning_rate=MASK_LR, generator_learning_rate=1e-3,
        phase_cache="../../phase_cache", previews=6, preview_examples=10))
    c.backgrounds.reference = common.BACKGROUND_INVARIANCE_TABLE1
    c.backgrounds.contact_examples = 10
    c.experiment.repeats = 2
    vanilla_kwargs, attention_kwargs = {}, {}
    if arg == "runlocal":  # tiny: scikit-learn's digits at 16 px (zero background), tiny networks, a few steps
        c.dataset.name = "digits"
        c.dataset.data_dir = None
        c.dataset.image_size = 16
        c.dataset.train_limit = 48
        c.batch_size = 8
        c.eval_batch_size = 50
        c.log_every = 2
        c.checkpoint_every = 2
        vanilla_kwargs = {"base_features": 4, "dense_features": 16}
        attention_kwargs = {**vanilla_kwargs, "local_features": (8, 8, 8), "fusion_features": (16, 16)}
        c.background_invariance.update(dict(
            classifier_epochs=0.5, mask_epochs=0.5, adversarial_epochs=0.5, attention_epochs=0.5,
            mask_base_features=4, generator_base_features=4, previews=2, preview_examples=4))
        c.backgrounds.update(dict(examples=40, batch_size=20, contact_examples=3))
        c.experiment.repeats = 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'runlocal' or nothing")
    vanilla = {"name": "vanilla_cnn", "kwargs": vanilla_kwargs}
    c.experiment.arms = (
        ("vanilla", {"model": vanilla, "background_invariance": {"method": "classifier"}}),
        ("attention", {"model": {"name": "attention_cnn", "kwargs": attention_kwargs},
                       "background_invariance": {"method": "attention"}}),
        ("proposal", {"model": vanilla, "background_invariance": {"method": "adversarial"}}),
        ("proposal_glr1e-5", {"model": vanilla, "background_invariance": {"method": "adversarial",
                                                                          "generator_learning_rate": 1e-5}}),
    )
    return c
