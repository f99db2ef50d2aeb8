"""Loading a trained run back from its workdir: :func:`load`.

``saliency_jax.load(workdir)`` rebuilds what :func:`saliency_jax.train.train` returned for a run that has finished
(or been stopped): the model from ``workdir/config.json`` (as ``train`` builds it), the latest checkpoint's state
restored and verified against the checksums saved with it (:class:`saliency_jax.workdirs.Checkpoints`). Nothing is
trained and nothing in the workdir is changed, so notebooks and evaluators can use a run without retraining it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from saliency_jax import data as data_lib
from saliency_jax import train as train_lib
from saliency_jax import workdirs

__all__ = ["load", "read_config"]


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples the configs use (``schemes``, ``widths``, ...)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config of a run's latest launch, ``workdir/config.json`` (JSON lists read back as tuples).

    Raises:
      FileNotFoundError: the workdir or its ``config.json`` does not exist.
      ValueError: ``config.json`` is not valid JSON (a damaged workdir).
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"load: no run directory at {workdir}")
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"load: {path} does not exist: {workdir} is not the workdir of a run trained by "
                                "saliency_jax.train (an experiment's runs are in <experiment workdir>/<arm>/seed<k>)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load: {path} is damaged (not valid JSON: {e})") from e
    if not isinstance(record, dict) or "model" not in record or "dataset" not in record:
        raise ValueError(f"load: {path} does not hold a run config (no 'model' or 'dataset' section)")
    return ml_collections.ConfigDict(_tuples(record))


def _shapes(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], int]:
    """(image_shape, num_classes) of the model: from the config where it gives them, else from the train split."""
    ds = config.dataset
    num_classes = config.model.get("num_classes")
    size = ds.get("image_size")
    if num_classes and size and ds.get("channels"):
        return (size, size, int(ds.channels)), int(num_classes)
    source = data_lib.get_source(ds.name, "train", data_dir=ds.get("data_dir"), image_size=size,
                                 options=ds.get("options"))
    return tuple(data_lib.image_shape(source, size)), int(num_classes or data_lib.num_classes(source))


def load(workdir: str | os.PathLike, *, step: int | None = None, fallback: bool = False,
         ) -> train_lib.TrainResult:
    """A trained run from its workdir: the model, its variables and its config.

    The model is rebuilt from ``workdir/config.json`` as :func:`saliency_jax.train.train` builds it (its
    ``config.model``, with the image shape and number of classes of the run's train split, or of
    ``config.model.num_classes`` / ``config.dataset.image_size`` and ``channels`` where set); the state of the latest
    checkpoint (or of ``step``) is restored and verified against its checksums. The workdir is only read.

    >>> run = saliency_jax.load("runs/digits/baseline/seed0")  # doctest: +SKIP
    >>> logits = run.model.apply(run.variables, images, train=False)  # doctest: +SKIP

    Args:
      workdir: the run's folder (``train``'s ``workdir``; an experiment's runs are ``<workdir>/<arm>/seed<k>``).
      step: the checkpoint step to restore (default: the latest).
      fallback: when the latest checkpoint is damaged, use the newest intact earlier one (with a warning; nothing is
        moved). Without it a damaged checkpoint raises.

    Returns:
      A :class:`saliency_jax.train.TrainResult` as ``train`` returns it: ``.model`` (the linen module),
      ``.variables`` (``{"params", "batch_stats"}``, replicated over the local devices), ``.config``, ``.state``
      (with ``.step``), ``.image_shape``, ``.num_classes``, ``.workdir``; ``.initial_variables`` is the seed's
      initialisation (None for runs from imported weights: reload them from ``config.model.pretrained``); ``.history``
      is the ``metrics.jsonl`` log. It can be passed to the evaluators of :mod:`saliency_jax.evaluators`.

    Raises:
      FileNotFoundError: no such workdir, no ``config.json``, or no checkpoint in it (or not ``step``).
      ValueError: a damaged ``config.json``, or a run of another trainer than the generic loop (``config.trainer``).
      CheckpointError: (a ``RuntimeError``) the checkpoint is unreadable or differs from its checksums (the step and
        folder are named), and no intact earlier one with ``fallback``.
    """
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    if config.get("trainer", "supervised") != "supervised":
        raise ValueError(f"load: {workdir} was trained by trainer {config.trainer!r}, whose state is not the generic "
                         "loop's; load supports runs of saliency_jax.train (config.trainer='supervised')")
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"load: {workdir} has no checkpoints folder (the run never reached a checkpoint)")
    image_shape, num_classes = _shapes(config)
    model = train_lib.build_model(config, num_classes)
    optimizer = train_lib.make_optimizer(config)
    replicated = NamedSharding(train_lib.make_mesh(), P())
    shapes = jax.eval_shape(lambda: train_lib.init_state(model, optimizer, image_shape, config.seed))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
    ckpt = workdirs.Checkpoints(workdir, with_data=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"load: {workdir / 'checkpoints'} holds no checkpoint")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"load: {workdir / 'checkpoints'} has no step {step}; it has {steps}")
        candidates = [step] if step is not None else steps[::-1]
        for i, s in enumerate(candidates):
            try:
                state = ckpt.restore_step(s, abstract)[0]
                break
            except workdirs.CheckpointError as e:
                if not fallback or i == len(candidates) - 1:
                    hint = " (pass fallback=True to use the newest intact earlier one)" if len(candidates) > 1 else ""
                    raise workdirs.CheckpointError(f"load: {e}{hint}", e.step, e.path) from e
                logging.warning("load: %s; trying step %d", e, candidates[i + 1])
    finally:
        ckpt.close(quiet=True)
    initial = None
    if not config.model.get("pretrained"):
        init = jax.jit(lambda: model.init(jax.random.key(config.seed), jnp.zeros((1, *image_shape), jnp.float32),
                                          train=False))()
        initial = jax.device_get({"params": init["params"], "batch_stats": init.get("batch_stats", {})})
    history = []
    if (workdir / "metrics.jsonl").exists():
        for line in (workdir / "metrics.jsonl").read_text().splitlines():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return train_lib.TrainResult(state=state, model=model, history=history, workdir=workdir, config=config,
                                 initial_variables=initial, image_shape=tuple(image_shape), num_classes=num_classes)
