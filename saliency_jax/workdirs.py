"""A run's working directory: verified checkpoints, the history of launches, the metrics log.

What :func:`saliency_jax.train.train` keeps in ``workdir`` so that a run killed at any point resumes as if it had never
stopped, and so that nothing it reads back is silently wrong:

* ``checkpoints/<step>/`` (orbax ``CheckpointManager``): the train state, each process's data-iterator position, and
  ``meta`` - a JSON item holding a checksum of every array of the state (computed on the device when it is saved:
  the sum of its 32-bit words and their position-weighted sum, mod 2**32, a Fletcher-style checksum), a digest of
  every process's iterator position, the number of processes, and the metrics logged since the last log step
  (:class:`LogState`), the whole item guarded by its own SHA-256. The meta item is written with the checkpoint and
  committed with it (orbax renames the finished step folder into place), so there is never a checkpoint with a
  half-written record. On restore the saved arrays are first compared with the model's (names and shapes): a
  checkpoint of another model is refused as such (:class:`ResumeError`, "does not match the model"), not reported as
  damaged. Every checksum is verified before the state is used: a damaged step raises
  :class:`CheckpointError` naming it, or - only when asked (``config.restore_fallback``) - is moved to
  ``checkpoints.damaged/`` and the newest intact earlier step is used.
* ``launches.jsonl``: one record per launch that trains, and per weights-only launch (time, starting step,
  processes, devices, the full config). ``config.json`` holds the latest launch's config; :func:`saliency_jax.load`
  compares it with the record of the launch that made the checkpoint it restores (:func:`checkpoint_launch`). A
  launch (a weights-only one included) that would resume from a checkpoint made with a config differing in a field
  that changes the trajectory (seed, optimizer, schemes and their settings, data, model...; every field but those of
  :data:`NON_TRAJECTORY_FIELDS`, evaluator sections and sections of schemes the run does not use) is refused with
  :class:`ResumeError` naming the fields, unless ``config.allow_config_change``.
* ``metrics.jsonl``: one JSON line per log step. The pending metrics (steps since the last log step) are saved in the
  checkpoint, and a resumed launch first cuts the log back to the checkpoint's last log step, so the log of a run
  that was interrupted, resumed or extended reads exactly as an uninterrupted run's: no duplicate and no missing
  line, and every average over the same steps. (The alternative - cut the log and recompute the lost steps' metrics
  - would need those steps run again; saving a few scalars per step in the checkpoint costs nothing.) A launch's
  last step is logged even off the ``log_every`` grid; that line is dropped when a later launch extends the run.
* ``launch.lock`` (:class:`WorkdirLock`): present while a launch runs in the workdir, holding its host, PID and start
  time. A second launch is refused at once (:class:`WorkdirLockedError`, naming the holder); a lock left by a launch
  that was killed (its PID no longer alive on this host) is taken over with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import threading
import time
import uuid
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from saliency_jax import registry
from saliency_jax.config import ConfigError, default_config

__all__ = [
    "CheckpointError",
    "ResumeError",
    "WorkdirLockedError",
    "WorkdirLock",
    "LOCK_FILE",
    "LogState",
    "Checkpoints",
    "state_checksums",
    "state_digest",
    "checksum_differences",
    "json_digest",
    "iterator_digests",
    "restore_state",
    "MetricsLog",
    "read_tensorboard_scalars",
    "tensorboard_image_tags",
    "NON_TRAJECTORY_FIELDS",
    "trajectory_differences",
    "config_differences",
    "read_launches",
    "checkpoint_launch",
    "check_resume",
    "record_launch",
    "write_config",
]

#: Config fields that do not change a run's trajectory (what a resumed launch may change freely).
NON_TRAJECTORY_FIELDS = (
    "num_steps", "num_epochs", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size",
    "evaluators", "experiment", "restore_fallback", "allow_config_change", "dataset.read_threads", "dataset.prefetch",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or its arrays differ from the checksums saved with it.

    Attributes:
      step: the checkpoint's step.
      path: its folder.
    """

    def __init__(self, message: str, step: int, path: pathlib.Path):
        super().__init__(message)
        self.step, self.path = step, path


class ResumeError(ConfigError):
    """A workdir that this launch cannot resume, or whose checkpoint :func:`saliency_jax.load` cannot use: another
    config, another process count, fewer steps, a model that does not fit the checkpoint, a ``config.json`` that
    differs from the config the checkpoint was made with."""


@dataclasses.dataclass
class LogState:
    """The metrics log's position, saved with each checkpoint.

    Attributes:
      last_log_step: the last step logged on the ``log_every`` grid (0 before the first).
      pending: per-step metrics of the steps after it (up to the checkpoint), as floats.
    """

    last_log_step: int = 0
    pending: list[dict[str, float]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Checksums.


def _words(x: jax.Array) -> jax.Array:
    """The array's bytes as uint32 words (narrower types widened), flat."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksums(tree):
    def one(x):
        w = _words(jnp.asarray(x))
        position = jnp.arange(1, w.size + 1, dtype=jnp.uint32)
        return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * position, dtype=jnp.uint32)])

    return jax.tree.map(one, tree)


def state_checksums(tree: Any) -> dict[str, list[int]]:
    """A checksum per array of a pytree, computed where the arrays are (one jitted reduction, exact in any order).

    Args:
      tree: a pytree of arrays (the train state; replicated or sharded).

    Returns:
      ``{keystr(path): [sum of the 32-bit words, sum of word * position] mod 2**32}`` for every leaf.
    """
    sums = jax.device_get(_checksums(tree))
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(leaf)]
            for path, leaf in jax.tree_util.tree_flatten_with_path(sums)[0]}


def state_digest(tree: Any) -> str:
    """One SHA-256 (hex) of a pytree's arrays: of :func:`state_checksums` (the arrays' paths and checksums), so two
    states with the same structure and bit-identical arrays have the same digest, and any changed word changes it.

    Args:
      tree: a pytree of arrays (e.g. a run's final state).
    """
    return _digest(state_checksums(tree))


def checksum_differences(expected: dict[str, list[int]], tree: Any) -> list[str]:
    """The array paths (``keystr``) of ``tree`` whose checksums differ from ``expected`` (a
    :func:`state_checksums` record), plus paths present on one side only; sorted. Empty: the arrays match."""
    actual = state_checksums(tree)
    return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))


def json_digest(obj: Any) -> str:
    """The SHA-256 (hex) of a JSON-able object (``json.dumps`` with sorted keys; non-JSON values as ``str``)."""
    return _digest(obj)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def iterator_digests(iterator) -> list[int]:
    """A 32-bit digest of every process's data-iterator position (``iterator.get_state()``), gathered: the same
    list on every process (a collective when there are several processes: every process must call it)."""
    mine = np.array([int(_digest(iterator.get_state())[:8], 16)], np.uint32)
    if jax.process_count() == 1:
        return [int(mine[0])]
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints.


class Checkpoints:
    """The orbax ``CheckpointManager`` of a workdir, writing and verifying the ``meta`` item of every step.

    Args:
      workdir: the run's folder (checkpoints go to ``workdir/checkpoints``).
      every: save every this many steps (``config.checkpoint_every``).
      keep: checkpoints kept (``config.keep_checkpoints``).
      with_data: the checkpoints hold the grain iterator position (item ``data``).
    """

    def __init__(self, workdir: str | os.PathLike, *, every: int = 1, keep: int = 2, with_data: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.directory = (self.workdir / "checkpoints").absolute()
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        if with_data:
            handlers["data"] = grain.checkpoint.CheckpointHandler()
        self.with_data = with_data
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # Saving.

    def should_save(self, step: int, force: bool = False) -> bool:
        return force or self.manager.should_save(step)

    def save(self, step: int, state: Any, iterator=None, log: LogState | None = None, *, force: bool = False) -> bool:
        """Saves ``state`` (and the iterator position and log state) at ``step`` if it is due (or ``force``).

        Returns:
          Whether a save was started (asynchronous: committed by :meth:`wait` / :meth:`close` or the next save).
        """
        if not self.should_save(step, force):
            return False
        payload = {"step": int(step), "process_count": jax.process_count(), "device_count": jax.device_count(),
                   "state_checksums": state_checksums(state),
                   "data_digests": iterator_digests(iterator) if iterator is not None else None,
                   "log": dataclasses.asdict(log or LogState()), "saved_at": time.time()}
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({"payload": payload, "sha256": _digest(payload)})}
        if self.with_data and iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        """Blocks until the in-flight save is committed."""
        self.manager.wait_until_finished()

    def close(self, *, quiet: bool = False) -> None:
        """Commits the in-flight save and closes the manager. With ``quiet`` (an error is already propagating)
        a failure here is logged rather than raised, so the caller's error is the one shown."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if not quiet:
                raise
            logging.error("could not commit the last checkpoint in %s: %s: %s", self.directory, type(e).__name__, e)
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001
                if not quiet:
                    raise
                logging.error("could not close the checkpoint manager of %s: %s", self.directory, e)

    # Restoring.

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _meta(self, step: int) -> dict[str, Any] | None:
        """The verified meta payload of ``step`` (None for checkpoints written before it existed)."""
        if not (self._step_dir(step) / "meta").exists():
            return None
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            payload, digest = meta["payload"], meta["sha256"]
        except Exception as e:  # noqa: BLE001 - orbax and json raise many types
            raise self._error(step, f"its record is unreadable ({type(e).__name__}: {e})") from e
        if _digest(payload) != digest:
            raise self._error(step, "its record (meta) does not match its SHA-256")
        return payload

    def _error(self, step: int, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {what}", step,
                               self._step_dir(step))

    def check_process_count(self, step: int, meta: dict[str, Any] | None = None) -> None:
        """Raises :class:`ResumeError` if ``step`` was written by another number of processes."""
        if meta is None:
            try:
                meta = self._meta(step)
            except CheckpointError:  # a damaged record: the restore reports it
                meta = None
        count = meta.get("process_count") if meta else None
        if count is None and self.with_data:  # older checkpoints: grain names a file per process
            names = [p.name for p in (self._step_dir(step) / "data").glob("process_*-of-*.json")]
            found = {int(m.group(1)) for n in names if (m := re.match(r"process_\d+-of-(\d+)\.json$", n))}
            count = found.pop() if len(found) == 1 else None
        if count is not None and count != jax.process_count():
            raise ResumeError(
                f"checkpoint step {step} in {self.directory} was written by {count} process(es); this launch has "
                f"{jax.process_count()}. Each process's data-iterator position is part of the checkpoint, so a run "
                f"can only be resumed with the process count it was started with: relaunch with {count} "
                "process(es), or start a fresh workdir.")

    def _verify_state(self, step: int, meta: dict[str, Any] | None, state: Any) -> None:
        if meta is None:
            logging.warning("checkpoint step %d in %s was written without checksums: not verified", step,
                            self.directory)
            return
        bad = checksum_differences(meta["state_checksums"], state)
        if bad:
            raise self._error(step, f"{len(bad)} array(s) differ from the checksums saved with it "
                                    f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})")

    def check_model(self, step: int, abstract_state: Any, meta: dict[str, Any] | None = None, *,
                    model: str = "this launch's model") -> None:
        """Raises :class:`ResumeError` if ``step``'s state does not fit ``abstract_state``: arrays that one has and the
        other lacks (from the checksums' keys in its record), or arrays of another shape (from orbax's metadata of
        the saved arrays). Checked before the arrays are read, so that a checkpoint of another model is reported as
        such and not as damaged. A step whose record or metadata cannot be read is not checked here (its restore
        reports it).

        Args:
          step: the checkpoint step.
          abstract_state: the state the caller's model has (shapes, dtypes).
          meta: the step's verified record (:meth:`_meta`), if already read.
          model: how the message names the caller's model (``load`` says ``"the model in config.json"``).
        """
        def name(entry) -> str:
            for attr in ("key", "name", "idx"):
                if hasattr(entry, attr):
                    return str(getattr(entry, attr))
            return str(entry)

        def flat(tree, is_leaf=None) -> dict[str, tuple[str, Any]]:
            leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
            return {"/".join(name(e) for e in path): (jax.tree_util.keystr(path), leaf) for path, leaf in leaves}

        mine = flat(abstract_state)
        problems = []
        if meta is not None and meta.get("state_checksums") is not None:
            saved_keys, my_keys = set(meta["state_checksums"]), {k for k, _ in mine.values()}
            problems += [f"{k} only in the checkpoint" for k in sorted(saved_keys - my_keys)]
            problems += [f"{k} only in {model}" for k in sorted(my_keys - saved_keys)]
        handler = ocp.StandardCheckpointHandler()
        try:
            saved = handler.metadata(self._step_dir(step) / "state")
        except Exception:  # noqa: BLE001 - no metadata (damaged, or an older format): the restore reports it
            saved = None
        finally:
            handler.close()
        if saved is not None:
            for path, (_, shape_of) in flat(saved, is_leaf=lambda x: hasattr(x, "shape")).items():
                if path not in mine or not hasattr(shape_of, "shape"):
                    continue
                key, leaf = mine[path]
                if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                    continue  # saved as its key data, of another shape
                if tuple(shape_of.shape) != tuple(leaf.shape):
                    problems.append(f"{key}: {list(shape_of.shape)} in the checkpoint, {list(leaf.shape)} in {model}")
        if problems:
            raise ResumeError(
                f"checkpoint step {step} in {self.directory} does not match {model}: {len(problems)} array(s) differ "
                f"({'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}). It was made with another model "
                "(or another optimizer or scheme state): use the config it was trained with (launches.jsonl keeps "
                "each launch's config), or another workdir")

    def restore_step(self, step: int, abstract_state: Any, iterator=None, *, model: str = "this launch's model",
                     ) -> tuple[Any, Any, LogState | None]:
        """Restores and verifies one step.

        Args:
          step: the checkpoint step.
          abstract_state: the state's structure, shapes, dtypes and shardings.
          iterator: the grain iterator whose position to restore (None: not restored).
          model: how a mismatch names the caller's model (:meth:`check_model`).

        Returns:
          ``(state, iterator, log_state)`` (``log_state`` None for checkpoints written before it existed).

        Raises:
          ResumeError: the step was written by another number of processes, or its arrays do not fit
            ``abstract_state`` (another model: "does not match the model").
          CheckpointError: the step is unreadable or differs from its checksums (the step and folder are named).
        """
        meta = self._meta(step)
        self.check_process_count(step, meta)
        self.check_model(step, abstract_state, meta, model=model)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if iterator is not None and self.with_data:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax raises many types; name the checkpoint either way.
            raise self._error(step, f"it cannot be read ({type(e).__name__}: {e})") from e
        state = restored["state"]
        self._verify_state(step, meta, state)
        if iterator is not None and self.with_data:
            iterator = restored["data"]
            if meta is not None and meta.get("data_digests") is not None:
                expected = meta["data_digests"]
                if len(expected) != jax.process_count() or \
                        iterator_digests(iterator)[jax.process_index()] != expected[jax.process_index()]:
                    raise self._error(step, f"the data-iterator position of process {jax.process_index()} differs "
                                            "from its digest")
        log = LogState(**meta["log"]) if meta is not None and meta.get("log") else None
        return state, iterator, log

    def restore_latest(self, abstract_state: Any, iterator=None, *, fallback: bool = False,
                       ) -> tuple[int, Any, Any, LogState | None]:
        """Restores the latest intact checkpoint.

        Args:
          abstract_state: the state's structure, shapes, dtypes and shardings.
          iterator: the grain iterator whose position to restore.
          fallback: when the latest step is damaged, move it to ``workdir/checkpoints.damaged/`` and try the
            previous one (and so on); without it a damaged latest step raises.

        Returns:
          ``(step, state, iterator, log_state)``; ``(0, None, iterator, None)`` when there is no checkpoint.

        Raises:
          CheckpointError: the latest step is damaged (and no ``fallback``), or no step is intact.
          ResumeError: as :meth:`restore_step`.
        """
        while True:
            step = self.manager.latest_step()
            if step is None:
                return 0, None, iterator, None
            try:
                state, iterator, log = self.restore_step(step, abstract_state, iterator)
            except CheckpointError as e:
                earlier = [s for s in self.steps() if s < step]
                if not fallback:
                    hint = (f"set config.restore_fallback=True (--config.restore_fallback) to resume from step "
                            f"{earlier[-1]}, the previous checkpoint" if earlier else
                            "no earlier checkpoint is kept: delete the checkpoints folder to start over")
                    raise CheckpointError(f"{e}; refusing to resume from it: {hint}", e.step, e.path) from e
                if not earlier:
                    raise CheckpointError(f"{e}; no intact earlier checkpoint to fall back to", e.step,
                                          e.path) from e
                logging.warning("%s; falling back to step %d", e, earlier[-1])
                self._quarantine(step)
                continue
            logging.info("resumed from %s step %d", self.directory, step)
            return step, state, iterator, log

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step out of the checkpoints folder (kept for inspection)."""
        if jax.process_index() == 0:
            target = self.workdir / "checkpoints.damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self._step_dir(step)), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()


# ----------------------------------------------------------------------------------------------------------------
# The metrics log.


def restore_state(workdir: str | os.PathLike, step: int, like: Any) -> Any:
    """The state pytree saved at ``step`` in ``workdir/checkpoints``, verified against its checksums.

    Args:
      workdir: the run's folder.
      step: a saved step.
      like: a pytree with the saved state's structure, shapes, dtypes and shardings (e.g. the final state).

    Raises:
      CheckpointError: (a ``RuntimeError``) if that checkpoint cannot be read or differs from its checksums (the step
        and path are named).
      ResumeError: its arrays do not fit ``like`` (another model).
    """
    ckpt = Checkpoints(workdir, with_data=False)
    try:
        return ckpt.restore_step(step, jax.tree.map(ocp.utils.to_shape_dtype_struct, like), model="the run's model")[0]
    finally:
        ckpt.close()


class MetricsLog:
    """``workdir/metrics.jsonl`` and TensorBoard event files in ``workdir/tensorboard/``, process 0 only.

    The event files are written with ``tensorboardX`` (a core dependency): the writer the issue suggests, CLU's
    ``metric_writers`` (as the flax examples use), imports TensorFlow for its summary writer and so cannot write event
    files in an environment without TensorFlow, as this package's is; ``tensorboardX`` writes the same event-file
    format with only protobuf and NumPy. Point TensorBoard at the workdir (``tensorboard --logdir WORKDIR``).

    A launch that resumes (after :meth:`rewind`) opens its event file with ``purge_step`` = the first step it will
    log, so TensorBoard drops the events a killed launch wrote after its checkpoint, as ``metrics.jsonl`` does.

    Args:
      workdir: the run's folder.
      enabled: write anything at all (False on processes other than 0).
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.tensorboard_dir = pathlib.Path(workdir) / "tensorboard"
        self.tb = None
        self._purge_step: int | None = None

    def _writer(self):
        if self.tb is None:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        return self.tb

    def rewind(self, step: int) -> int:
        """Drops every line after ``step`` (lines written after the checkpoint a launch resumes from, and a previous
        launch's last line off the ``log_every`` grid). Returns the number of lines dropped."""
        self._purge_step = step + 1
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                dropped += 1
                continue
            if int(record.get("step", 0)) <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        return dropped

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Appends ``{"step": step, **metrics}`` to ``metrics.jsonl`` and each metric as a TensorBoard scalar."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        tb = self._writer()
        for k, v in metrics.items():
            tb.add_scalar(k, float(v), step)
        tb.flush()

    def write_images(self, step: int, tag: str, images: Any) -> None:
        """Writes images to TensorBoard under ``tag``.

        Args:
          step: the training step they belong to.
          tag: TensorBoard tag (e.g. ``"saliency_maps/grad_cam"``).
          images: [n, height, width, 3] (or 1 channel) float in [0, 1].

        Raises:
          ValueError: if ``images`` is not [n, height, width, 1 or 3].
        """
        if not self.enabled:
            return
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"write_images({tag!r}): images must be [n, height, width, 1 or 3], got {images.shape}")
        tb = self._writer()
        tb.add_images(tag, np.clip(images, 0.0, 1.0), step, dataformats="NHWC")
        tb.flush()

    def write_scalars(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        """Writes ``scalars`` to TensorBoard only (not to ``metrics.jsonl``), each under ``prefix + name`` with the
        dots of dotted names as ``/`` (TensorBoard's tag groups)."""
        if not self.enabled or not scalars:
            return
        tb = self._writer()
        for k, v in scalars.items():
            tb.add_scalar(prefix + k.replace(".", "/"), float(v), step)
        tb.flush()

    def write_figure(self, step: int, tag: str, path: str | os.PathLike) -> None:
        """Writes the PNG figure at ``path`` to TensorBoard as one image under ``tag`` (RGB; alpha dropped).

        Raises:
          OSError: ``path`` cannot be read as an image.
        """
        if not self.enabled:
            return
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0
        tb = self._writer()
        tb.add_image(tag, pixels, step, dataformats="HWC")
        tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _tensorboard_events(workdir: str | os.PathLike):
    """The ``Event`` protobufs of ``workdir/tensorboard/events.out.tfevents.*``, in file order.

    Reads the TFRecord framing (length [uint64], its CRC, the record, its CRC) and parses each record with
    ``tensorboardX``'s ``Event`` message (the writer has no reader of its own; TensorBoard's ``event_accumulator``
    would need the ``tensorboard`` package).
    """
    from tensorboardX.proto import event_pb2

    folder = pathlib.Path(workdir, "tensorboard")
    files = sorted(folder.glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files in {folder}")
    for file in files:
        data, pos = file.read_bytes(), 0
        while pos + 12 <= len(data):
            length = int(np.frombuffer(data[pos:pos + 8], "<u8")[0])
            yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4


def read_tensorboard_scalars(workdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a run's TensorBoard event files: ``{tag: [(step, value), ...]}`` in file order.

    ``purge_step`` markers are not applied (this returns what the files hold, as written).

    Raises:
      FileNotFoundError: if ``workdir/tensorboard`` has no event file.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for event in _tensorboard_events(workdir):
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out


def tensorboard_image_tags(workdir: str | os.PathLike) -> list[str]:
    """The tags of the images in a run's TensorBoard event files, in file order.

    Raises:
      FileNotFoundError: if ``workdir/tensorboard`` has no event file.
    """
    return [v.tag for event in _tensorboard_events(workdir) for v in event.summary.value
            if v.WhichOneof("value") == "image"]


# ----------------------------------------------------------------------------------------------------------------
# One launch per workdir.

#: The lock file of a workdir (:class:`WorkdirLock`), relative to it.
LOCK_FILE = "launch.lock"

#: Seconds after which a lock file that holds no readable record (its launch killed between creating and writing it)
#: counts as stale.
_UNREADABLE_LOCK_SECONDS = 30.0

_held: dict[tuple[str, int], int] = {}  # (lock path, thread) -> depth, for the locks this process holds
_held_guard = threading.Lock()


class WorkdirLockedError(ConfigError):
    """Another launch holds the workdir's lock (:class:`WorkdirLock`). The message is one line naming the holder.

    Attributes:
      path: the lock file.
      holder: the holder's record (``host``, ``pid``, ``started``), or None where it could not be read.
    """

    def __init__(self, message: str, path: pathlib.Path, holder: dict[str, Any] | None):
        super().__init__(message)
        self.path, self.holder = path, holder


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), None where there is none."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``); None where unknown."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def _alive(pid: Any, process_start: Any = None) -> bool:
    """Whether process ``pid`` of this host is running: a zombie, or a PID since reused by a process that started at
    another time than ``process_start``, counts as gone."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except (OverflowError, OSError):
        return False
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc (macOS): the PID answering is all there is to know
    if fields and fields[0] in ("Z", "X"):
        return False
    return process_start is None or _process_start(pid) in (None, process_start)


class WorkdirLock:
    """One launch at a time in a workdir: the file ``workdir/launch.lock``, created with ``O_CREAT | O_EXCL`` and
    holding JSON ``{"host", "pid", "started", "process_start", "token"}``; a context manager.

    :func:`saliency_jax.train.train` and :func:`~saliency_jax.train.run_plan` hold it around a run (taken before the
    data is read or anything is compiled), the command line's ``train`` through training and evaluation, and
    :func:`saliency_jax.experiment.run_experiment` on the experiment's folder. The lock is released (the file
    removed) on every exit from the ``with`` block, an exception included. A launch killed outright (``kill -9``, a
    lost machine) leaves the file behind: the next launch on the same host finds its PID no longer alive (or reused
    by a process that started later) and takes the lock over with a warning. A lock written on another host cannot be
    checked from here: it is refused, and the message says to delete the file if that launch is gone.

    Re-entrant within a thread (a launch that holds the lock may take it again: ``train`` around ``run_plan``); another
    thread of the same process is refused like another process. Multi-process runs (``jax.process_count() > 1``)
    take it once per run: process 0 holds the file and tells the other processes whether it got the lock, so that
    every process of a refused launch raises before anything collective starts. (Taking over a stale lock is not
    atomic against a third launch started in the same instant on the same stale lock.)

    Args:
      workdir: the run's folder (created if missing).

    Raises:
      WorkdirLockedError: (a ``ConfigError``) on entering, when another launch that is alive (or on another host)
        holds the lock: one line naming its host, PID, start time and the lock file.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = pathlib.Path(workdir)
        self.path = (self.workdir / LOCK_FILE).absolute()
        self._token: str | None = None
        self._key = (str(self.path), threading.get_ident())

    # The lock file (process 0).

    def _read(self) -> dict[str, Any] | None:
        """The holder's record; None when there is no lock file. A file without a readable record (being written,
        or its launch killed in between) is re-read for a moment, then given as ``{"unreadable": age in s}``."""
        for _ in range(10):
            try:
                text = self.path.read_text()
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            try:
                record = json.loads(text)
                if isinstance(record, dict):
                    return record
            except json.JSONDecodeError:
                pass
            time.sleep(0.05)
        return {"unreadable": age}

    def _describe(self, holder: dict[str, Any]) -> str:
        if "unreadable" in holder:
            return f"a launch whose lock record is not written yet ({self.path})"
        return (f"the launch of host {holder.get('host')!r}, pid {holder.get('pid')}, started "
                f"{holder.get('started')} ({self.path})")

    def _stale(self, holder: dict[str, Any]) -> bool:
        if "unreadable" in holder:
            return holder["unreadable"] > _UNREADABLE_LOCK_SECONDS
        return holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"),
                                                                          holder.get("process_start"))

    def _acquire(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "process_start": _process_start(os.getpid()), "token": token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # released in between
                    continue
                if not self._stale(holder):
                    other = "" if holder.get("host") == socket.gethostname() else \
                        "; if that launch is no longer running, delete the lock file"
                    raise WorkdirLockedError(
                        f"{self.workdir} is in use by {self._describe(holder)}: one launch per workdir. Wait for it "
                        f"to end, or use another workdir{other}", self.path, holder) from None
                logging.warning("%s: taking over the lock of %s, which is no longer running (a launch killed "
                                "before it could release it)", self.workdir, self._describe(holder))
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
                f.flush()
                os.fsync(f.fileno())
            self._token = token
            return
        holder = self._read() or {"unreadable": 0.0}
        raise WorkdirLockedError(f"{self.workdir} is in use by {self._describe(holder)}: one launch per workdir "
                                 "(another launch took the lock while this one was taking it)", self.path, holder)

    def _release(self) -> None:
        if self._token is None:
            return
        holder = self._read()
        if holder is not None and holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)
        else:
            logging.warning("%s: the lock %s is no longer this launch's (removed or taken over by another launch "
                            "while this one ran)", self.workdir, self.path)
        self._token = None

    # The context manager (every process).

    def __enter__(self) -> "WorkdirLock":
        with _held_guard:
            if self._key in _held:
                _held[self._key] += 1
                return self
        error: BaseException | None = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except Exception as e:  # noqa: BLE001 - told to the other processes, then raised
                error = e
        if jax.process_count() > 1:
            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                error = WorkdirLockedError(f"{self.workdir}: process 0 of this run could not take the workdir's lock "
                                           f"({self.path}; its error names the holder)", self.path, None)
        if error is not None:
            raise error
        with _held_guard:
            _held[self._key] = 1
        return self

    def __exit__(self, *exc_info) -> None:
        with _held_guard:
            _held[self._key] -= 1
            if _held[self._key]:
                return
            del _held[self._key]
        self._release()


# ----------------------------------------------------------------------------------------------------------------
# Launch history and config comparison.


def _config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _ignored_sections(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """Top-level sections that do not reach the trajectory: evaluators' sections (the registered ones and those the
    two configs list) and the sections of registered schemes neither config uses."""
    schemes = set(registry.TRAINING_SCHEMES.names())
    used = set(registry.name_list(old.get("schemes"))) | set(registry.name_list(new.get("schemes")))
    listed = set(registry.name_list(old.get("evaluators"))) | set(registry.name_list(new.get("evaluators")))
    return (schemes - used) | ((set(registry.EVALUATORS.names()) | listed) - schemes)


def trajectory_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The fields that differ between two config records (``config.to_json_best_effort``, parsed) and change the
    trajectory: every field but :data:`NON_TRAJECTORY_FIELDS`, evaluator sections and unused schemes' sections.

    Returns:
      ``[(dotted field, old value, new value)]`` sorted by field; a field missing on one side shows as ``"<absent>"``.
    """
    ignored = _ignored_sections(old, new)
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        top = key.split(".", 1)[0]
        if top in ignored or any(key == f or key.startswith(f + ".") for f in NON_TRAJECTORY_FIELDS):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            out.append((key, va, vb))
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """:func:`trajectory_differences` less the fields ``old`` lacks (added to the code since it was recorded) that
    ``new`` has at the default of :func:`saliency_jax.config.default_config`: new fields default to the old
    behaviour, so such a field reproduces the recorded launch."""
    defaults = _flatten(_config_record(default_config()))
    return [d for d in trajectory_differences(old, new)
            if not (d[1] == "<absent>" and d[0] in defaults and defaults[d[0]] == d[2])]


def describe_differences(diffs: list[tuple[str, Any, Any]], new_name: str) -> tuple[str, str]:
    """``("config.f: old in the checkpoint's launch, new <new_name>; ...", " (and k more)")`` for the first 8."""
    lines = "; ".join(f"config.{k}: {v0!r} in the checkpoint's launch, {v1!r} {new_name}" for k, v0, v1 in diffs[:8])
    return lines, f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""


def read_launches(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``workdir/launches.jsonl`` in order (a line cut by a kill skipped; [] without the file)."""
    path = pathlib.Path(workdir) / "launches.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "config" in record:
                out.append(record)
    return out


def checkpoint_launch(workdir: str | os.PathLike, step: int) -> dict[str, Any] | None:
    """The record (``launches.jsonl``) of the launch that wrote checkpoint ``step``: the last launch that started
    before it (a later launch resuming from an earlier step rewrote the steps after its start). None without one."""
    launches = read_launches(workdir)
    made = [r for r in launches if int(r.get("start_step", 0)) < step] or \
        [r for r in launches if int(r.get("start_step", 0)) == step]  # its first checkpoint (the phase cache's)
    return made[-1] if made else None


def _last_launch_config(workdir: pathlib.Path) -> dict[str, Any] | None:
    path = workdir / "launches.jsonl"
    if path.exists():
        for line in reversed(path.read_text().splitlines()):
            try:
                return json.loads(line)["config"]
            except (json.JSONDecodeError, KeyError):
                continue  # a record cut by a kill
    legacy = workdir / "config.json"  # workdirs from before the launch history
    if legacy.exists():
        try:
            return json.loads(legacy.read_text())
        except json.JSONDecodeError:
            return None
    return None


def check_resume(workdir: str | os.PathLike, config: ml_collections.ConfigDict, checkpoint_step: int) -> None:
    """Refuses to resume a checkpoint made with a config whose trajectory-changing fields differ from ``config``.

    Args:
      workdir: the run's folder.
      config: this launch's config.
      checkpoint_step: the step being resumed from (0: nothing to resume, nothing checked).

    Raises:
      ResumeError: naming every differing field with both values, unless ``config.allow_config_change``. A field
        absent from the checkpoint's record (added to the code since) counts only when it is not at the default of
        :func:`saliency_jax.config.default_config`.
    """
    if not checkpoint_step:
        return
    workdir = pathlib.Path(workdir)
    old = _last_launch_config(workdir)
    if old is None:
        logging.warning("%s has no record of the config its checkpoint was made with: not compared", workdir)
        return
    diffs = config_differences(old, _config_record(config))
    if not diffs:
        return
    lines, more = describe_differences(diffs, "now")
    if config.get("allow_config_change", False):
        logging.warning("resuming %s at step %d with a changed config (allow_config_change): %s%s", workdir,
                        checkpoint_step, lines, more)
        return
    raise ResumeError(
        f"{workdir} holds a checkpoint (step {checkpoint_step}) made with another config: {lines}{more}. These fields "
        "change the trajectory, so the run would not be the one either config describes. Use a fresh workdir, or "
        "set config.allow_config_change=True (--config.allow_config_change) to continue anyway (each launch's "
        "config is kept in launches.jsonl).")


def record_launch(workdir: str | os.PathLike, config: ml_collections.ConfigDict, start_step: int,
                  total_steps: int) -> None:
    """Appends this launch to ``workdir/launches.jsonl`` and writes ``workdir/config.json`` (process 0 only): every
    launch that trains, and every weights-only launch (``total_steps`` 0)."""
    if jax.process_index() != 0:
        return
    workdir = pathlib.Path(workdir)
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "start_step": int(start_step), "total_steps": int(total_steps), "process_count": jax.process_count(),
              "device_count": jax.device_count(), "config": _config_record(config)}
    with (workdir / "launches.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    write_config(workdir, config)


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes ``workdir/config.json`` atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    workdir = pathlib.Path(workdir)
    tmp = workdir / "config.json.tmp"
    tmp.write_text(config.to_json_best_effort(indent=2))
    os.replace(tmp, workdir / "config.json")
