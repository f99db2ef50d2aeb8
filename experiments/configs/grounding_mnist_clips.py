r"""Spatiotemporal grounding on synthetic moving-MNIST clips (Bargal 2019, Ch. 7: Tables 7.1-7.2, Figs. 7.5-7.6).

A small CNN-LSTM (:class:`saliency_jax.models.CNNLSTM`: 3 conv layers of 8/16/32 channels, ``fc`` 64 units,
a ReLU-LSTM of 64 units, a classifier at every step, and the single-frame classifier on ``fc``) is trained on
single-digit clips from the MNIST **train** digits (16 frames of 48 x 48 px, the digit moving at 1-3 px per frame
and bouncing, 6 static clutter fragments of other digits) with the cross-entropy at every LSTM step plus the frame
classifier's (``frame_classifier`` scheme), Adam 1e-3, batch 32, no augmentation. The ``temporal_grounding``
evaluator then grounds the ground-truth class of clips built from the MNIST **test** digits (fixed seed, the same
for every run):

* Table 7.2 shape: temporal detection mAP at IoU 0.5, known and unknown GT length, for thresholded probability,
  EB-R and cEB-R under both LSTM-cell rules, on ``rand + GT`` / ``GT + rand`` clips of 16 frames and ``rand + GT +
  rand`` clips of 32 frames with GT lengths 3 / 10 / 16 (the thesis's 11 / 41 / 65 of 128 frames, scaled);
* Table 7.1 shape: the per-frame pointing game (tolerance 3 px) of EB, EB-R, cEB, cEB-R, BP, BP-R;
* Fig. 7.6 shape: mean per-frame map sums over time for rand + GT and GT + rand; Fig. 7.5 shape: sample clips.

Command (from the repository root; MNIST IDX files in ../shared/data/mnist)::

  nice -n 5 saliency-jax experiment --config experiments/configs/grounding_mnist_clips.py \
      --workdir runs/grounding_mnist_clips

``:runlocal`` is the tiny variant the tests run (clips of scikit-learn's embedded 8 x 8 digits on 16 px canvases,
6 frames, a tiny model, a few steps; no files needed).

Measured: see "Results" below (filled in from the run).
"""

import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).parent))  # common.py, beside this file
import common


def get_config(arg: str | None = None):
    c = common.grounding_config()
    c.dataset.clips.update(num_clips=50_000, test_clips=1_000, length=16, canvas=48, clutter=4, clutter_size=10,
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
        c.dataset.clips.update(num_clips=64, test_clips=16, length=6, canvas=16, clutter=2, clutter_size=4)
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
