"""Default experiment config shared by every config in ``experiments/configs/`` (configs are data)."""

from __future__ import annotations

import ml_collections

__all__ = ["default_config", "apply_overrides", "DISTRACTION_ARMS", "DROPOUT_ARMS", "excitation_dropout_config",
           "reduced_dropout_config"]

#: The four arms of Morales et al. 2021, Table 1: (arm name, overrides) pairs in the table's column order.
DISTRACTION_ARMS = (
    ("baseline", {"distraction": {"enabled": False}}),
    ("0-occlusion", {"distraction": {"enabled": True, "fill": "zero"}}),
    ("R-occlusion", {"distraction": {"enabled": True, "fill": "random"}}),
    ("1-occlusion", {"distraction": {"enabled": True, "fill": "one"}}),
)

#: The six arms of the Excitation Dropout comparison (Bargal 2019, Tables 5.1-5.2), in report order.
DROPOUT_ARMS = (
    ("none", {"dropout": {"scheme": "none"}}),
    ("standard", {"dropout": {"scheme": "standard"}}),
    ("standard_per_image", {"dropout": {"scheme": "standard_per_image"}}),
    ("curriculum", {"dropout": {"scheme": "curriculum"}}),
    ("excitation", {"dropout": {"scheme": "excitation"}}),
    ("adaptive", {"dropout": {"scheme": "adaptive"}}),
)


def default_config() -> ml_collections.ConfigDict:
    """The train loop's defaults: the paper's optimizer (Morales et al. 2021, Sec. 4.3) on the embedded digits data.

    Returns:
      A ``ConfigDict`` with sections ``dataset``, ``model``, ``optimizer``, ``distraction``, ``dropout``,
      ``robustness``, ``experiment`` and the loop's scalars. Experiment configs override what they need.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict(dict(
        name="digits", data_dir=None, image_size=32, val_fraction=0.25, train_limit=0,
        oversample={},
        read_threads=2, prefetch=256,  # grain threads: raise on hosts with many cores
        # Morales et al. 2021: flip, rotation [-40, 40], channel shift [-30, 30], brightness [0.5, 1.5].
        augment=dict(hflip=True, rotation=40.0, channel_shift=30.0, brightness=(0.5, 1.5)),
    ))
    c.model = ml_collections.ConfigDict(dict(name="small_cnn", kwargs={}, grad_cam_layer="conv3", pretrained=""))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adam", learning_rate=5e-5, b1=0.9, b2=0.999, eps=7e-7, momentum=0.9, weight_decay=0.0,
        lr_boundaries=[], lr_scales=[]))
    c.batch_size = 16
    c.eval_batch_size = 256
    c.num_steps = 0
    c.num_epochs = 10.0
    c.distraction = ml_collections.ConfigDict(dict(
        enabled=False, probability=0.25, threshold=0.85, fill="zero", per_example=False,
        # The authors' released code: Grad-CAM of the ground-truth class on the softmax output, guided weights.
        # The paper's text / Selvaraju et al.: score="logit", weighting="plain".
        score="softmax", weighting="guided", data_range=(0.0, 1.0)))
    c.dropout = ml_collections.ConfigDict(dict(
        # Dropout scheme at one layer (Bargal 2019, Ch. 5; saliency_jax.training.excitation_dropout): "none" leaves
        # the model's own forward untouched. layer: module path of the dropped activations; weights: the dense layer
        # whose units they are (conservative-filter analysis); bypass: model dropout layers the scheme replaces.
        scheme="none", base_retain=0.5, layer="relu_fc1", weights="fc1", rescale="none", gamma=5e-4, bypass=()))
    c.robustness = ml_collections.ConfigDict(dict(
        # Random Erasing (Zhong et al. 2020) on every test image, fixed seed: Table 4 of Morales et al.
        probability=1.0, area_range=(0.02, 0.4), aspect_range=(0.3, 1 / 0.3), fill="random", seed=1234))
    c.experiment = ml_collections.ConfigDict(dict(
        # (arm name, overrides of this config) pairs, in the report's column order.
        arms=DISTRACTION_ARMS[:2],
        repeats=1, figure_examples=8))
    c.log_every = 50
    c.eval_every = 0
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    return c


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with nested ``overrides`` (``{"distraction": {"fill": "one"}}``) applied.

    Raises:
      KeyError: if an override names a field the config does not have (a typo would otherwise be ignored).
    """
    config = ml_collections.ConfigDict(config.to_dict())

    def merge(node, upd, path):
        for k, v in upd.items():
            if k not in node:
                raise KeyError(f"override {'.'.join(path + [k])!r} names no config field")
            if isinstance(v, (dict, ml_collections.ConfigDict)) and isinstance(node[k], ml_collections.ConfigDict):
                merge(node[k], dict(v), path + [k])
            else:
                node[k] = v

    merge(config, dict(overrides), [])
    return config


def excitation_dropout_config() -> ml_collections.ConfigDict:
    """The thesis settings of Excitation Dropout (Bargal 2019, Sec. 5.2.1): CNN-2, dropout at ``relu_fc1``, the six
    arms, SGD momentum 0.9, weight decay 0.005, lr 1e-3 -> 1e-4 after 25k of 100k steps, batch 100, 5 repeats."""
    c = default_config()
    c.model.name = "cnn2"
    c.model.kwargs = {}
    c.model.grad_cam_layer = "relu_conv3"
    c.dropout.scheme = "excitation"
    c.dropout.base_retain = 0.5
    c.dropout.layer = "relu_fc1"
    c.dropout.weights = "fc1"
    c.dropout.rescale = "none"
    c.experiment.runner = "excitation_dropout"
    c.experiment.arms = DROPOUT_ARMS
    c.experiment.repeats = 5
    c.analysis = dict(test_examples=0, curve_examples=1000, compression_examples=1000,
                      conservative_deltas=(0.05, 0.1, 0.25), seed=0)
    # The thesis's optimizer (Sec. 5.2.1).
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 0.005
    c.optimizer.lr_boundaries = [25_000]
    c.optimizer.lr_scales = [0.1]
    c.batch_size = 100
    c.eval_batch_size = 500
    c.num_steps = 100_000
    c.log_every = 500
    c.checkpoint_every = 10_000
    c.keep_checkpoints = 20
    c.dataset.val_fraction = 0.02
    c.dataset.augment = dict(hflip=False, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))
    return c


def reduced_dropout_config(config: ml_collections.ConfigDict, arg: str | None, *, num_steps: int, log_every: int,
                           checkpoint_every: int) -> ml_collections.ConfigDict:
    """The reduced CPU budget shared by the runnable Excitation Dropout configs (their docstrings say why).

    Narrow CNN-2 (16/16/32 filters, 256-unit fc, init std 0.05), Adam 1e-3 without decay or schedule, 2 repeats,
    analyses on 2,000 test images; ``arg == "runlocal"`` gives the tiny variant the tests use. Modifies and returns
    ``config``.
    """
    c = config
    c.model.kwargs = {"conv_features": (16, 16, 32), "fc_features": (256, 256), "init_std": 0.05}
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.lr_boundaries = []
    c.optimizer.lr_scales = []
    c.num_steps = num_steps
    c.log_every = log_every
    c.checkpoint_every = checkpoint_every
    c.experiment.repeats = 2
    c.analysis = dict(test_examples=2000, curve_examples=500, compression_examples=500,
                      conservative_deltas=(0.05, 0.1, 0.25), seed=0)
    if arg == "runlocal":
        c.model.kwargs = {"conv_features": (4, 4, 8), "fc_features": (16, 16)}
        c.num_steps = 6
        c.log_every = 3
        c.checkpoint_every = 3
        c.batch_size = 10
        c.eval_batch_size = 50
        c.experiment.repeats = 1
        c.analysis = dict(test_examples=50, curve_examples=20, compression_examples=20,
                          conservative_deltas=(0.01, 0.1), seed=0)
    return c
