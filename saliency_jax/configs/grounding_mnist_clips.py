r"""Spatiotemporal grounding on synthetic moving-MNIST clips (Bargal 2019, Ch. 7: Tables 7.1-7.2, Figs. 7.5-7.6).

A small CNN-LSTM (:class:`saliency_jax.models.CNNLSTM`: 3 conv layers of 8/16/32 channels, ``fc`` 64 units,
a ReLU-LSTM of 64 units, a classifier at every step, and the single-frame classifier on ``fc``) is trained on
single-digit clips from the MNIST **train** digits (16 frames of 48 x 48 px, the digit moving at 1-3 px per frame
and bouncing, 4 static 10-px clutter fragments of other digits) with the cross-entropy at every LSTM step plus the frame
classifier's (``frame_classifier`` scheme), Adam 1e-3, batch 32, no augmentation. The ``temporal_grounding``
evaluator then grounds the ground-truth class of clips built from the MNIST **test** digits (fixed seed, the same
for every run):

* Table 7.2 shape: temporal detection mAP at IoU 0.5, known and unknown GT length, for thresholded probability,
  EB-R and cEB-R under both LSTM-cell rules, on ``rand + GT`` / ``GT + rand`` clips of 16 frames and ``rand + GT +
  rand`` clips of 32 frames with GT lengths 3 / 10 / 16 (the thesis's 11 / 41 / 65 of 128 frames, scaled);
* Table 7.1 shape: the per-frame pointing game (tolerance 3 px) of EB, EB-R, cEB, cEB-R, BP, BP-R;
* Fig. 7.6 shape: mean per-frame map sums over time for rand + GT and GT + rand; Fig. 7.5 shape: sample clips.

Command (from the repository root; MNIST IDX files in ../shared/data/mnist, or pass
``--config.dataset.data_dir``)::

  nice -n 5 saliency-jax experiment --config experiments/configs/grounding_mnist_clips.py \
      --workdir runs/grounding_mnist_clips --config.dataset.data_dir=/work/shared/data/mnist

Runtime: 47.8 min wall for the 2 seeds on 2 CPU cores shared with other jobs (load average 15-24): training
1,500 steps 22 + 21 min, evaluation 3 + 1 min.

Measured (2 seeds, mean ± sample std; % ; the report's tables, ``runs/grounding_mnist_clips/report.md``):

* the models are under-trained (the loss was still falling): clip accuracy on the pointing clips 75.0 ± 12.7 at the
  last step, 73.2 ± 11.0 averaging the steps' probabilities; frame classifier 66.7 ± 11.6 (seed 0: 84.0 / 81.0 /
  74.9; seed 1: 66.0 / 65.5 / 58.4). More steps would help every method.
* Table 7.2 shape, rand + GT + rand (32 frames), GT length 3 / 10 / 16, known length: probability 18.5 / 52.0 /
  67.9, EB-R (exc) 11.1 / 26.4 / 41.5, cEB-R (exc) 33.4 / 64.0 / 79.3, EB-R (grad) 2.1 / 13.0 / 27.8, cEB-R (grad)
  14.3 / 47.0 / 71.2; unknown length: probability 10.9 / 20.7 / 32.6, cEB-R (exc) 16.4 / 37.2 / 49.0, cEB-R (grad)
  5.2 / 21.3 / 35.9 (thesis, 11 / 41 / 65 of 128 frames: known probability 8.5 / 28.2 / 47.7, EB-R 11.3 / 38.5 /
  56.3, cEB-R 15.5 / 53.2 / 73.5; unknown probability 3.4 / 9.5 / 35.7, cEB-R 4.1 / 47.9 / 62.0). cEB-R (exc)
  beats the probability in every rand + GT + rand row, known and unknown length, as in the thesis; EB-R falls
  below the probability here (above it in the thesis); the gradient cell rule trails the excitation rule.
  Two-segment clips (16 frames, known length): rand + GT probability 33.8, EB-R (exc) 94.0, cEB-R (exc) 89.4;
  GT + rand 96.5 / 44.5 / 82.7.
* Table 7.1 shape (tolerance 2 px): centre 88.8, EB 92.8 ± 8.3, EB-R 92.0 ± 9.1 (exc) / 92.2 ± 8.7 (grad), cEB
  90.7 ± 8.2, cEB-R 72.7 ± 7.3 (exc) / 68.8 ± 10.4 (grad), BP 87.6, BP-R 85.7: the digit's box covers much of a
  48 px frame (the centre scores 88.8), so the game barely separates the methods; the contrastive -R maps score
  lowest, as the thesis's contrastive versions do.
* Fig. 7.6 shape: the cEB-R map sums are negative on rand frames and positive on GT frames, changing sign at the
  midpoint in both rand + GT and GT + rand (both cell rules); EB-R's are positive throughout.

The LSTM cell rule: ``(grad)`` is the authors' released Caffe LSTM unit (its gradient), which is what the thesis's
numbers were produced with and is the library's default (``cell_rule="gradient"``, the evaluator's first rule);
``(exc)`` is EB's rule with the gates as constant weights (``temporal_grounding.cell_rules``).

Re-run with the authors' rule as default (2026-12-07, main 9d5184e, seed 0 only - seed 1 was stopped for lack of
time; load 8-31, 81 min for seed 0): clip accuracy 80.5 (last step) / 81.5 (mean of the steps' probabilities),
frame classifier 72.4 (the earlier seed 0 above: 84.0 / 81.0 / 74.9 - the change touches only the evaluation, so
the training differs for another reason, not investigated: the runs above predate several loop changes). Known
length, rand + GT + rand, GT 3 / 10 / 16: probability 21.8 / 53.4 / 70.7, cEB-R (grad) 24.7 / 60.4 / 81.3, cEB-R
(exc) 40.7 / 72.1 / 86.1, EB-R (grad) 4.8 / 19.1 / 37.3, EB-R (exc) 19.0 / 33.8 / 46.4: cEB-R beats the probability
in every row under both rules, and the excitation rule still leads the authors' rule. Pointing game: centre 88.8,
EB 98.7, EB-R 98.6 (grad) / 98.3 (exc), cEB 95.6, cEB-R 78.0 (grad) / 78.4 (exc), BP 88.9, BP-R 87.5.

``:runlocal`` is the tiny variant the tests run (clips of scikit-learn's embedded 8 x 8 digits on 16 px canvases,
6 frames, a tiny model, a few steps; no files needed).
"""

from saliency_jax.configs import common


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    c = common.grounding_config()
    c.dataset.options.update(num_clips=50_000, test_clips=1_000, length=16, canvas=48, clutter=4, clutter_size=10,
                           speed=(1.0, 3.0))
    c.model.kwargs = {"widths": (8, 16, 32), "embed_features": 64, "lstm_features": 64}
    c.batch_size = 16
    c.num_steps = 1500
    c.log_every = 25
    c.checkpoint_every = 250
    c.temporal_grounding.update(pointing_clips=200, detection_clips=200, two_segment_length=16, insert_length=32,
                                gt_lengths=(3, 10, 16), tolerance=2.0, batch_size=25)
    c.experiment.repeats = 2
    if arg == "runlocal":
        c.dataset.name = "digits_clips"
        c.dataset.data_dir = None
        c.dataset.options.update(num_clips=64, test_clips=16, length=6, canvas=16, clutter=2, clutter_size=4)
        c.model.kwargs = {"widths": (4, 4, 8), "embed_features": 16, "lstm_features": 8}
        c.batch_size = 8
        c.num_steps = 4
        c.log_every = 2
        c.checkpoint_every = 2
        # One clip length everywhere, so that the pointing and detection passes share their compiled programs.
        c.temporal_grounding.update(pointing_clips=6, detection_clips=6, two_segment_length=6, insert_length=6,
                                    gt_lengths=(1, 4), tolerance=1.0, batch_size=4, figure_clips=1)
        c.experiment.repeats = 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':runlocal' or nothing")
    return c
