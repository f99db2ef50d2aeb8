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

Measured (2 seeds, mean ± sample std, accuracy in %; shared 2-core CPU at load 8-20, about 95 min of training and
evaluation for the 8 runs):

=================  ==========  ==========  ==========  ==========  ==========  ==========  ==========
arm                clean       stripes     checker     border      circles     clock       random
=================  ==========  ==========  ==========  ==========  ==========  ==========  ==========
vanilla            98.8 ± 0.1  53.4 ± 0.9  39.3 ± 9.7  85.2 ± 2.1  77.7 ± 3.7  62.6 ± 4.2  77.7 ± 4.2
attention          94.5 ± 1.5  14.5 ± 0.5  11.7 ± 2.7  30.5 ± 8.2  20.2 ± 11   14.7 ± 6.3  22.5 ± 11
proposal           97.3 ± 0.2  88.7 ± 5.4  95.4 ± 0.7  95.2 ± 0.9  92.5 ± 2.3  91.1 ± 1.7  95.2 ± 0.1
proposal_glr1e-5   98.3 ± 0.2  43.0 ± 19   48.7 ± 23   92.0 ± 1.9  76.2 ± 2.5  60.7 ± 20   81.6 ± 4.5
=================  ==========  ==========  ==========  ==========  ==========  ==========  ==========

Phase 3 starts a fresh classifier Adam (``phase3_optimizer="fresh"``, the authors' ``train3.py``) since
2026-12-07; the table above was measured with phase 1's Adam carried over (``phase3_optimizer="continue"``). Re-run
with the fresh optimizer (main 9d5184e, seed 0 only, the proposal arm - its glr1e-5 arm and seed 1 were stopped for
lack of time; load 8-31): clean 95.9, stripes 83.9, checker 86.3, border 93.7, circles 90.8, clock 88.0, random 92.4
(mean over the backgrounds 89.1, against 93.0 for the 2-seed means with the carry-over; vanilla seed 0, untouched
by the change: clean 98.7, background mean 60.1). At this budget (0.6 epoch of phase 3) the fresh optimizer gave
1.4 points less clean accuracy and about 4 points less on the backgrounds; with one seed, the difference is inside
the carry-over's seed spread (mean ± one sample std) on 2 of the 6 backgrounds (stripes, circles) and outside it on
4. The proposal stays far above the vanilla CNN either way.

The proposal (generator at 1e-3) is robust on every background (mean 93.0 against the poster's 85.5) with clean
accuracy 97.3, 1.5 points under this vanilla CNN's 98.8; at the code's generator rate 1e-5 the backgrounds stay
nearly uniform within this budget and robustness is close to the vanilla CNN's. The vanilla CNN here is more
robust than the poster's (66.0 mean against 31.2): one epoch at batch 64, no augmentation. The Attention baseline
falls well below both here (the poster has it near the vanilla CNN); not investigated further.
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
