"""The train loop's default config (configs are data), and the settings mixin of schemes and evaluators.

:func:`default_config` holds the loop's own fields only. A training scheme's section (``config.distraction``,
``config.dropout``, ``config.hnc``, ...) appears in the configs that use it, made by
:func:`saliency_jax.training.settings_section`; an evaluator's section (``config.random_erasing``, ...) likewise by
:func:`saliency_jax.evaluators.settings_section`. Both kinds of settings are frozen dataclasses deriving from
:class:`Settings`, loaded through :meth:`Settings.from_mapping`, which rejects unknown fields. The arms and
builders shared by the experiment configs live beside them, in ``saliency_jax/configs/common.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

__all__ = ["ConfigError", "Settings", "default_config", "apply_overrides"]


class ConfigError(ValueError):
    """A config (or command line) that cannot run; the message names the field and says what to do.

    The command line prints it as one line, without a traceback.
    """


class Settings:
    """Mixin for a frozen settings dataclass (a training scheme's or an evaluator's) built from a config section."""

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None):
        """Builds the settings from a mapping (e.g. ``config.distraction``), rejecting unknown fields.

        Lists become tuples (config files and the command line give lists).

        Raises:
          ValueError: on a field the settings do not have (naming the closest ones), or as the constructor.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        values = dict(mapping or {})
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f"; did you mean {close}" if close else ""
                raise ValueError(f"{cls.__name__} has no field {key!r}{hint} (fields: {names})")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})

    @classmethod
    def section(cls, **overrides) -> ml_collections.ConfigDict:
        """A config section holding every field at its default, with ``overrides`` applied (each field can then be
        overridden from the command line).

        Raises:
          ValueError: on an unknown field.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=3)
                raise ValueError(f"{cls.__name__} has no field {key!r}" + (f"; did you mean {close}" if close else ""))

        def default(f):
            return f.default_factory() if f.default is dataclasses.MISSING else f.default

        def value(name, f):
            v = overrides.get(name, default(f))
            if v is None:  # a typed placeholder, so that the command line can set it (--config.section.field=X)
                return config_dict.placeholder(_field_type(cls, name))
            return v

        return ml_collections.ConfigDict({name: value(name, f) for name, f in fields.items()})


def _field_type(cls, name: str) -> type:
    """The non-None type of an ``X | None`` dataclass field (``object`` when it cannot be told)."""
    try:
        hint = typing.get_type_hints(cls)[name]
    except Exception:  # unresolvable annotations: accept any literal
        return object
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type):
        return args[0]
    return hint if isinstance(hint, type) else object


def default_config() -> ml_collections.ConfigDict:
    """The train loop's defaults: the paper's optimizer (Morales et al. 2021, Sec. 4.3) on the embedded digits data.

    Returns:
      A ``ConfigDict`` with sections ``dataset``, ``model``, ``optimizer``, ``experiment`` and the loop's scalars:
      ``trainer`` (the loop that trains a run: a name registered in :mod:`saliency_jax.trainers`), ``loss`` (the
      classification loss), ``schemes`` (the training schemes in chain order; ``()`` = plain training;
      each listed scheme needs its section), ``evaluators`` (run after training by ``saliency-jax train|experiment``;
      each may have its section). Experiment configs override what they need.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict(dict(
        # image_size: a typed reference, so that a config may set it to None (native size) and the command line can
        # still override it (--config.dataset.image_size=64).
        name="digits", data_dir=config_dict.placeholder(str), image_size=ml_collections.FieldReference(32, int),
        channels=3, val_fraction=0.25,
        options={},  # the source's own settings (saliency_jax.data.get_source: SOURCE_OPTIONS, region_templates)
        train_limit=0, label_noise=0.0, oversample={},
        read_threads=2, prefetch=4,  # grain threads (raise on hosts with many cores) and prefetched batches
        # Morales et al. 2021: flip, rotation [-40, 40], channel shift [-30, 30], brightness [0.5, 1.5].
        augment=dict(hflip=True, rotation=40.0, channel_shift=30.0, brightness=(0.5, 1.5)),
    ))
    c.model = ml_collections.ConfigDict(dict(
        name="small_cnn", kwargs={},
        # The layers schemes and evaluators read; None: the architecture's defaults (saliency_jax.models).
        grad_cam_layer=config_dict.placeholder(str), classifier=config_dict.placeholder(str),
        pretrained="",  # torchvision-named .safetensors / .npz to start from
        num_classes=config_dict.placeholder(int),  # only needed when nothing is trained (num_steps = num_epochs = 0)
        allow_random_init=False,  # with nothing trained: evaluate a random initialisation (tests only)
        # Models nobody here wrote (saliency_jax.models.build.trainable_model): a transformer's Grad-CAM layer holds
        # tokens, read as a grid after dropping num_prefix_tokens (None: the architecture's default, or a spatial
        # layer); outputs says where the logits are ("0" for (logits, aux), "logits" for an output object; "": the
        # output is the logits); axis_name binds the axis a BatchNorm reduces over (flax's examples: "batch").
        num_prefix_tokens=config_dict.placeholder(int), outputs="", axis_name="",
        # A scheme's map layer smaller than 2x2 gives constant maps (a silent no-op): refused unless this is set.
        allow_small_grid=False))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adam", learning_rate=5e-5, b1=0.9, b2=0.999, eps=7e-7, momentum=0.9, weight_decay=0.0,
        lr_boundaries=[], lr_scales=[],
        # Caffe's per-parameter lr_mult: ((fnmatch pattern over "module/param", multiplier), ...), first match wins.
        lr_multipliers=()))
    # The training loop (saliency_jax.trainers): "supervised" = saliency_jax.train.train, the generic loop; a method
    # whose loop differs (several models, min-max) names its own, e.g. "background_invariance".
    c.trainer = "supervised"
    c.loss = "softmax_cross_entropy"
    c.classification_weight = 1.0  # the classification loss's weight in the total (w_a of attention guidance)
    c.schemes = ()
    c.evaluators = ("classification",)
    c.experiment = ml_collections.ConfigDict(dict(
        # (arm name, overrides of this config) pairs, in the report's column order; every arm x repeat is one run.
        arms=(("run", {}),), repeats=1, title=""))
    c.batch_size = 16
    c.eval_batch_size = 256
    c.num_steps = 0
    c.num_epochs = 10.0
    c.log_every = 50
    # The loop warns once when a step's fraction of degenerate saliency maps (metrics *degenerate_maps) exceeds this.
    c.degenerate_map_warning = 0.5
    c.eval_every = 0
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    # Resuming (saliency_jax.workdirs): a damaged latest checkpoint is refused unless restore_fallback, which then
    # resumes from the newest intact earlier one; a workdir whose checkpoint was made with a different
    # trajectory-changing config is refused unless allow_config_change.
    c.restore_fallback = False
    c.allow_config_change = False
    return c


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with nested ``overrides`` (``{"distraction": {"fill": "one"}}``) applied.

    Sections with fields are merged field by field; an empty section (a free-form mapping such as ``model.kwargs``)
    is replaced by the override. An override value may be a reference to another field (``config.get_ref("x")``):
    it is read when the overrides are applied, i.e. after any command-line override of that field.

    Raises:
      KeyError: if an override names a field the config does not have (a typo would otherwise be ignored).
    """
    config = ml_collections.ConfigDict(config.to_dict())

    def merge(node, upd, path):
        for k, v in upd.items():
            if k not in node:
                raise KeyError(f"override {'.'.join(path + [k])!r} names no config field")
            # A section with fields is merged into; an empty one is a free-form mapping (model.kwargs) and replaced.
            if isinstance(v, (dict, ml_collections.ConfigDict)) and isinstance(node[k], ml_collections.ConfigDict) \
                    and len(node[k]):
                merge(node[k], dict(v), path + [k])
            else:
                node[k] = v.get() if isinstance(v, config_dict.FieldReference) else v

    merge(config, dict(overrides), [])
    return config
