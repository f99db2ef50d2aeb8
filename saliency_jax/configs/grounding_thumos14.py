r"""Temporal grounding on THUMOS14 with a VGG16-LSTM (Bargal 2019, Sec. 7.4.2: Tables 7.3-7.4).
DOCUMENTED, NOT RUN: it needs everything listed under "Missing" in ``grounding_ucf101.py`` and more (below);
``saliency-jax experiment`` with this config stops at the first of them ("unknown source spec 'video_frames'").

The thesis's setting: the VGG16-LSTM of ``grounding_ucf101.py`` fine-tuned on UCF101 plus trimmed sequences of the
THUMOS14 background and validation sets (20 action classes); the 213 annotated THUMOS14 test videos split into
128-frame consecutive clips; the class queried is the annotated one. Evaluations:

* Table 7.3, the pointing game in time: the frame with the peak cEB-R map sum (or the peak probability, or both)
  must fall inside a ground-truth segment. Expected: random 57.3, peak probability 65.8, cEB-R 65.1, peak
  probability + cEB-R 77.4 %.
* Table 7.4, action detection: the cEB-R segments (anchor and greedy extension, Sec. 7.2) scored as detections,
  mAP at IoU 0.1 over the untrimmed videos.

Frames as image folders: ``<data_dir>/test/<video>/<frame index>.jpg`` and the THUMOS14 temporal annotations
(``<class>_test.txt``: video, start and end in seconds).

Missing, beyond ``grounding_ucf101.py``'s list: a THUMOS14 source of untrimmed videos cut into 128-frame clips
with their ground-truth segments (several per clip possible) and the frame rate to convert seconds; an evaluator
for the temporal pointing game (Table 7.3) and for detection over untrimmed videos (segments merged across clips,
several ground-truth segments per video; :func:`saliency_jax.evaluation.temporal_grounding.temporal_detection_map`
assumes one per clip); the fine-tuned weights; and :func:`saliency_jax.train.train`'s weights-only path
(``num_steps = num_epochs = 0``) builds the model for images ``(image_size, image_size, channels)``, not for clips
``(time, height, width, channels)``.

Command once they exist::

  saliency-jax experiment --config experiments/configs/grounding_thumos14.py --workdir runs/grounding_thumos14 \
      --config.dataset.data_dir=/data/thumos14_frames --config.model.pretrained=/weights/vgg16_lstm_thumos.npz
"""

from saliency_jax.configs import grounding_ucf101


def get_config(arg: str | None = None):
    """This experiment's ``ml_collections.ConfigDict`` (every field as the module docstring describes it).

    Args:
      arg: the text after ``:`` in ``--config NAME:ARG`` (the variants the module docstring lists;
        ``"runlocal"`` where there is one: the tiny variant the tests run), or None for the default.

    Raises:
      ValueError: an argument the config does not know.
    """
    c = grounding_ucf101.get_config()
    c.dataset.data_dir = "/data/thumos14_frames"
    c.dataset.options.update(length=128)
    c.num_steps = 0  # the fine-tuned weights are evaluated (config.model.pretrained)
    c.num_epochs = 0
    c.model.num_classes = 20
    c.evaluators = ("temporal_grounding",)
    c.temporal_grounding.update(insert_length=128, pointing_clips=1, iou_threshold=0.1)
    c.experiment.title = "Temporal grounding on THUMOS14, VGG16-LSTM (Bargal 2019, Tables 7.3-7.4)"
    if arg:
        raise ValueError(f"unknown config argument {arg!r}")
    return c
