"""A run's working directory: verified checkpoints, the history of launches, the metrics log.

What :func:`saliency_jax.train.train` keeps in ``workdir`` so that a run killed at any point resumes as if it had never
stopped, and so that nothing it reads back is silently wrong:

* ``checkpoints/<step>/`` (orbax ``CheckpointManager``): the train state, each process's data-iterator position, and
  ``meta`` - a JSON item holding a checksum of every array of the state (computed on the device when it is saved:
  the sum of its 32-bit words and their position-weighted sum, mod 2**32, a Fletcher-style checksum), a digest of
  every process's iterator position, the number of processes, and the metrics logged since the last log step
  (:class:`LogState`), the whole item guarded by its own SHA-256. The meta item is written with the checkpoint and
  committed with it (orbax renames the finished step folder into place), so there is never a checkpoint with a
  half-written record. On restore every checksum is verified before the state is used: a damaged step raises
  :class:`CheckpointError` naming it, or - only when asked (``config.restore_fallback``) - is moved to
  ``checkpoints.damaged/`` and the newest intact earlier step is used.
* ``launches.jsonl``: one record per launch that trains (time, starting step, processes, devices, the full config).
  ``config.json`` holds the latest launch's config. A launch that would resume from a checkpoint made with a config
  differing in a field that changes the trajectory (seed, optimizer, schemes and their settings, data, model...;
  every field but those of :data:`NON_TRAJECTORY_FIELDS`, evaluator sections and sections of schemes the run does not
  use) is refused with :class:`ResumeError` naming the fields, unless ``config.allow_config_change``.
* ``metrics.jsonl``: one JSON line per log step. The pending metrics (steps since the last log step) are saved in the
  checkpoint, and a resumed launch first cuts the log back to the checkpoint's last log step, so the log of a run
  that was interrupted, resumed or extended reads exactly as an uninterrupted run's: no duplicate and no missing
  line, and every average over the same steps. (The alternative - cut the log and recompute the lost steps' metrics
  - would need those steps run again; saving a few scalars per step in the checkpoint costs nothing.) A launch's
  last step is logged even off the ``log_every`` grid; that line is dropped when a later launch extends the run.
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
import time
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
    """A workdir that this launch cannot resume: another config, another process count, fewer steps."""


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

    def restore_step(self, step: int, abstract_state: Any, iterator=None) -> tuple[Any, Any, LogState | None]:
        """Restores and verifies one step.

        Returns:
          ``(state, iterator, log_state)`` (``log_state`` None for checkpoints written before it existed).

        Raises:
          ResumeError: the step was written by another number of processes.
          CheckpointError: the step is unreadable or differs from its checksums (the step and folder are named).
        """
        meta = self._meta(step)
        self.check_process_count(step, meta)
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
    """
    ckpt = Checkpoints(workdir, with_data=False)
    try:
        return ckpt.restore_step(step, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))[0]
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
    diffs = trajectory_differences(old, _config_record(config))
    # A field the checkpoint's launch did not know (added to the code since), now at the loop's default, is taken to
    # reproduce that launch's behaviour (new fields default to the old behaviour).

    defaults = _flatten(_config_record(default_config()))
    diffs = [d for d in diffs if not (d[1] == "<absent>" and d[0] in defaults and defaults[d[0]] == d[2])]
    if not diffs:
        return
    lines = "; ".join(f"config.{k}: {v0!r} in the checkpoint's launch, {v1!r} now" for k, v0, v1 in diffs[:8])
    more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
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
    """Appends this launch to ``workdir/launches.jsonl`` and writes ``workdir/config.json`` (process 0 only)."""
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
