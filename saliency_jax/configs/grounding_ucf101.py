r"""Spatiotemporal grounding on UCF101 with a VGG16-LSTM (Bargal 2019, Sec. 7.4: Tables 7.1-7.2, Fig. 7.6).
DOCUMENTED, NOT RUN: the pieces listed under "Missing" do not exist yet; ``saliency-jax experiment`` with this
config stops at the first of them with an "unknown source spec 'video_frames'" error.

The thesis's setting:

* model: VGG16 (Ma et al., trained on UCF101 frames and BU101 web images; 83.5 % frame accuracy) truncated at
  ``fc7``, whose post-ReLU features (``relu7``) feed one LSTM layer of 256 units with a classifier at every step
  (LRCN, Donahue et al. 2015), fine-tuned on UCF101 16-frame clips (83.3 %); the LSTM is the ReLU-LSTM
  (:class:`saliency_jax.models.ReLULSTMCell`). A frame classifier on ``relu7`` (the VGG16's own ``fc8``) is the
  single-frame baseline. Maps at conv5 (``relu5_3``), the CNN/RNN boundary at ``relu7``.
* training: cross-entropy at every step + the frame classifier's (the ``frame_classifier`` scheme, as the
  synthetic config), frames 224 x 224 (UCF101's 320 x 240 frames resized), no flip within a clip.
* Table 7.1: the per-frame pointing game on the ~3K UCF101 videos of 24 classes with THUMOS14 per-frame person
  boxes, tolerance 15 px at 320 x 240. Expected: EB 55.8, EB-R 61.5, cEB 37.0, cEB-R 39.1, BP 37.3, BP-R 39.2 %.
* Table 7.2 / Fig. 7.6: synthetic clips of UCF101 test videos (3783): rand + GT and GT + rand of 16 frames, the
  boundary at the midpoint; rand + GT + rand of 128 frames with GT lengths 11 / 41 / 65. Expected (mAP at IoU 0.5,
  known length): probability 8.5 / 28.2 / 47.7, EB-R 11.3 / 38.5 / 56.3, cEB-R 15.5 / 53.2 / 73.5; unknown length:
  probability 3.4 / 9.5 / 35.7, cEB-R 4.1 / 47.9 / 62.0.

Frames as image folders: ``<data_dir>/<split>/<class>/<video>/<frame index>.jpg`` (UCF101 extracted at 25 fps with
e.g. ``ffmpeg -i v.avi %05d.jpg``; the official split lists decide train / test).

Missing (what must be built for this config to run):

1. a ``"video_frames"`` clip source in :func:`saliency_jax.data.get_source`: clips of ``clips.length``
   consecutive frames read from the folders above (random start for training, fixed for testing), items
   ``{"image": [time, 224, 224, 3], "label"}``, plus the synthetic rand / GT concatenations of
   :class:`saliency_jax.data.MovingDigitClips`'s layouts (items with ``"segment"``, ``"gt_frames"``) built from
   two videos of different classes, and the THUMOS14 person boxes per frame (``"boxes"``) for the 24 classes;
2. a ``"vgg16_lstm"`` model in :func:`saliency_jax.models.get_model`: :class:`saliency_jax.models.VGG16` up to
   ``relu7`` applied once to the [batch * time] frames, ``nn.RNN(ReLULSTMCell(256))``, a classifier per step and
   the VGG16's ``fc8`` as the frame classifier (``frame_logits``), as :class:`saliency_jax.models.CNNLSTM`;
3. the ``temporal_grounding`` evaluator reading those sources (it builds its test clips through
   ``get_source(config.dataset.name, "test", ...)`` with the layouts as options; today it accepts the digit clip
   specs only);
4. weights: the UCF101-trained VGG16 of Ma et al. (``config.model.pretrained``, torchvision names), not bundled.

Command once they exist::

  saliency-jax experiment --config experiments/configs/grounding_ucf101.py --workdir runs/grounding_ucf101 \
      --config.dataset.data_dir=/data/ucf101_frames --config.model.pretrained=/weights/vgg16_ucf101.safetensors
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
    c.dataset.name = "video_frames"  # not implemented (see "Missing")
    c.dataset.data_dir = "/data/ucf101_frames"
    c.dataset.options.update(length=16, canvas=224, clutter=0)
    c.model.name = "vgg16_lstm"  # not implemented (see "Missing")
    c.model.kwargs = {"lstm_features": 256}
    c.model.grad_cam_layer = "relu5_3"
    c.model.classifier = "classifier"
    c.frame_classifier.update(features="relu7", classifier="fc8")
    c.temporal_grounding.update(layer="relu5_3", boundary="relu7", two_segment_length=16, insert_length=128,
                                gt_lengths=(11, 41, 65), tolerance=15.0 * 224 / 320, pointing_clips=3000,
                                detection_clips=3783, pointing_length=16, batch_size=4)
    c.optimizer.learning_rate = 1e-5
    c.batch_size = 8
    c.num_steps = 30_000
    c.experiment.repeats = 1
    c.experiment.title = "Spatiotemporal grounding on UCF101, VGG16-LSTM (Bargal 2019, Tables 7.1-7.2)"
    if arg:
        raise ValueError(f"unknown config argument {arg!r}")
    return c
