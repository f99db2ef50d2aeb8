"""Command line: ``saliency-jax {train,experiment,config} --config=CONFIG[:ARG] [--workdir=DIR]
[--config.FIELD=VALUE]``.

* ``train`` trains one model from the config with the trainer ``config.trainer`` names (resuming from ``workdir`` if
  it holds checkpoints), runs the evaluators of ``config.evaluators`` on it and prints their scalar metrics.
* ``experiment`` trains every arm x repeat of ``config.experiment`` with the same seeds, runs the evaluators on each
  run and writes ``report.md``, ``metrics.json`` and the figures into ``workdir``.
* ``config`` prints every field of the config (after the overrides) with its type and value: what
  ``--config.FIELD=VALUE`` can set.

Configs are ``ml_collections`` files (``get_config(arg)``), given by path or, for the configs shipped in
:mod:`saliency_jax.configs`, by name (``--config distraction_digits`` is ``--config
experiments/configs/distraction_digits.py`` from any folder); any field can be overridden on the command line,
e.g. ``--config.num_steps=100 --config.distraction.fill=one``; ``:runlocal`` after the path or name selects a
config's tiny variant. ``saliency-jax --version`` prints the version. ``--multihost`` calls
``jax.distributed.initialize()`` first: on TPU VMs, SLURM and Open MPI it finds the cluster by itself; elsewhere
(e.g. GPU machines started by hand) give ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or the
environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).

Bad flags, unknown fields, invalid settings (a scheme's, an evaluator's, the data source's, the model's) and missing
data paths print one line (``saliency-jax: error: ...``) and exit with status 2 before the workdir is touched: the
config (every arm) is validated and its data read first.

``experiment`` takes ``--arms=A,B`` (a subset of the config's arms) and refuses a ``--config.FIELD=VALUE`` whose
field an arm also sets (the arm's value would win), naming the arms, unless ``--override_arms`` applies it to every
arm (the report says so). Also available as ``python -m saliency_jax``.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import pathlib
import re
import sys
import tempfile
import textwrap
import threading
import time
import traceback

from absl import flags, logging
from ml_collections import config_flags

COMMANDS = {
    "train": "train one model from the config (resuming from --workdir), run its evaluators, print their metrics",
    "experiment": "train every arm x repeat of config.experiment, evaluate each, write report.md and metrics.json",
    "config": "print every field of the config (after --config.FIELD overrides) with its type and value",
}
_USAGE = ("usage: saliency-jax {train,experiment,config} --config=FILE|NAME[:ARG] [--workdir=DIR] "
          "[--config.FIELD=VALUE ...] [--multihost [--coordinator_address=HOST:PORT --num_processes=N "
          "--process_id=I]] [--noprogress] [--compilation_cache=DIR|off]")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config), e.g. "
                                "experiments/configs/distraction_digits.py[:runlocal], or a shipped config's name, "
                                "e.g. distraction_digits[:runlocal].", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, report); reruns resume from it.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU VM pods, GPU clusters, SLURM).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator (env JAX_COORDINATOR_ADDRESS); "
                    "implies --multihost.")
flags.DEFINE_integer("num_processes", None, "Number of processes (env JAX_NUM_PROCESSES); implies --multihost.")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) (env JAX_PROCESS_ID); implies "
                     "--multihost.")
flags.DEFINE_list("local_device_ids", None, "Devices this process uses, e.g. 0,1 (env JAX_LOCAL_DEVICE_IDS).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_list("arms", None, "experiment: run only these arms of config.experiment.arms, e.g. baseline,0-occlusion.")
flags.DEFINE_bool("override_arms", False, "experiment: apply --config.FIELD overrides of fields that arms also set to "
                  "every arm (without it such an override is refused).")
flags.DEFINE_string("compilation_cache", None, "JAX's persistent compilation cache folder (env "
                    "SALIENCY_JAX_COMPILATION_CACHE; default ~/.cache/saliency_jax/jax_compilation_cache); 'off' "
                    "turns it off.")

_FLAG_HELP = [
    ("--config=FILE[:ARG]", "the config file (its get_config(ARG)); e.g. experiments/configs/distraction_digits.py"
                            ":runlocal"),
    ("--config=NAME[:ARG]", "a shipped config by name (saliency_jax/configs), from any folder; e.g. "
                            "distraction_digits:runlocal"),
    ("--config.FIELD=VALUE", "override any field of the config, dotted (--config.num_steps=100, "
                             "--config.distraction.fill=one); list them with: saliency-jax config --config=FILE"),
    ("--workdir=DIR", "output folder (train, experiment); a rerun resumes from it"),
    ("--arms=NAME,...", "experiment: run only these arms of the config (default: all)"),
    ("--override_arms", "experiment: a --config.FIELD that arms also set is applied to every arm (refused "
                        "without it)"),
    ("--[no]progress", "progress bars (default on)"),
    ("--compilation_cache=DIR|off", "JAX's persistent compilation cache (default on, in "
                                    "~/.cache/saliency_jax/jax_compilation_cache; env SALIENCY_JAX_COMPILATION_CACHE)"),
    ("--multihost", "call jax.distributed.initialize() first; on TPU VMs, SLURM and Open MPI the cluster is "
                    "detected"),
    ("--coordinator_address=HOST:PORT", "process 0's address, the same on every process (env "
                                        "JAX_COORDINATOR_ADDRESS)"),
    ("--num_processes=N", "number of processes (env JAX_NUM_PROCESSES)"),
    ("--process_id=I", "this process, 0..N-1 (env JAX_PROCESS_ID)"),
    ("--local_device_ids=0,1", "the accelerators this process drives (env JAX_LOCAL_DEVICE_IDS)"),
    ("--verbosity=0", "absl logging level (default: warnings only)"),
    ("--version", "print the version and exit"),
]


def _help(command: str | None = None) -> str:
    lines = [_USAGE, ""]
    lines.append("Commands:")
    lines += [f"  {name:<12}{text}" for name, text in COMMANDS.items() if command in (None, name)]
    lines += ["", "Flags:"]
    lines += [f"  {flag:<34}{text}" for flag, text in _FLAG_HELP]
    from saliency_jax import configs

    lines += ["", "Shipped configs (--config=NAME[:ARG]):",
              textwrap.fill(" ".join(configs.names()), 118, initial_indent="  ", subsequent_indent="  ")]
    lines += ["", "Examples:",
              "  saliency-jax config --config distraction_digits:runlocal",
              "  saliency-jax train --config experiments/configs/distraction_digits.py:runlocal --workdir runs/t "
              "--config.num_steps=50",
              "  saliency-jax experiment --config distraction_digits --workdir runs/digits",
              "", "Bad flags, unknown config fields and configs that cannot run print one line and exit with 2."]
    return "\n".join(lines)


class _Exit(Exception):
    """A user error: printed as one line, exit status 2."""


class _Failure(Exception):
    """A run that failed on I/O (disk full, permissions, a file gone): printed as one line, exit status 1."""


class _ErrorsLog:
    """Where tracebacks go: ``<workdir>/errors.log`` (created on the first traceback), or the temp folder's when the
    workdir cannot be written."""

    def __init__(self, workdir):
        self.workdir, self._path = workdir, None

    @property
    def path(self) -> pathlib.Path:
        if self._path is None:
            self._path = pathlib.Path(os.devnull)
            for folder in ([pathlib.Path(self.workdir)] if self.workdir else []) + [pathlib.Path(tempfile.gettempdir())]:
                try:
                    with open(folder / "errors.log", "a"):
                        self._path = folder / "errors.log"
                        break
                except OSError:
                    continue
        return self._path

    def append(self, text: str) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n{text}\n")
        except OSError:
            pass

    def __str__(self) -> str:
        return str(self.path)


class _TracebacksToFile(std_logging.Filter):
    """Moves the traceback of every log record that carries one (orbax's and grain's background threads log theirs)
    into the errors log, leaving the message line on the terminal."""

    def __init__(self, log: _ErrorsLog):
        super().__init__()
        self.log = log

    def filter(self, record):
        if record.exc_info:
            self.log.append(f"{record.name}: {record.getMessage()}\n"
                            + "".join(traceback.format_exception(*record.exc_info)))
            record.msg = f"{record.getMessage()} (traceback in {self.log})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


@contextlib.contextmanager
def _tracebacks_to(log: _ErrorsLog):
    """While a command runs: background threads' uncaught exceptions and logged tracebacks go to ``log``."""
    log_filter = _TracebacksToFile(log)
    handlers = [logging.get_absl_handler(), *std_logging.getLogger().handlers]
    for handler in handlers:
        handler.addFilter(log_filter)
    hook = threading.excepthook

    def to_file(args):
        log.append("".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
        print(f"saliency-jax: {args.exc_type.__name__} in thread {getattr(args.thread, 'name', '?')}: "
              f"{args.exc_value} (traceback in {log})", file=sys.stderr)

    def unraisable_to_file(args):  # "Exception ignored in ..." of dying coroutines (orbax's event loops)
        log.append(f"{args.err_msg or 'Exception ignored in'}: {args.object!r}\n"
                   + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    unraisable = sys.unraisablehook
    threading.excepthook, sys.unraisablehook = to_file, unraisable_to_file
    try:
        yield
    finally:
        threading.excepthook, sys.unraisablehook = hook, unraisable
        for handler in handlers:
            handler.removeFilter(log_filter)


def _last_good_step(workdir) -> str:
    """``"the last checkpoint is step N"`` of a run's workdir (what a resume starts from), for the failure line."""
    folder = pathlib.Path(workdir or ".") / "checkpoints"
    try:
        steps = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    except OSError:
        steps = []
    return f"the last checkpoint is step {steps[-1]} in {folder}" if steps else f"no checkpoint in {folder}"


#: How an I/O error reads when a library reports it as another exception (orbax / tensorstore: ``ValueError:
#: RESOURCE_EXHAUSTED: ... Failed writing: "PATH": ... No space left on device [os_error_code='28']``).
_IO_MESSAGE = re.compile(r"os_error_code=|No space left on device|Disk quota exceeded|Read-only file system")


def io_error(e: BaseException) -> BaseException | None:
    """The I/O error behind ``e`` (itself, its cause or context chain): an ``OSError``, or an error whose message is an
    operating-system I/O failure; None for anything else (a ``ConfigError`` is never one)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        config_error = any(c.__name__ == "ConfigError" for c in type(e).__mro__)
        if isinstance(e, OSError) or (not config_error and _IO_MESSAGE.search(str(e))):
            return e
        e = e.__cause__ or e.__context__
    return None


def io_failure_line(e: BaseException, workdir, log) -> str:
    """The one line an I/O error ends a command with: what failed, on which path, the last good checkpoint, how to go
    on, and where the traceback is."""
    if isinstance(e, OSError):
        what, path = e.strerror or str(e) or type(e).__name__, e.filename
    else:
        text = str(e)
        found = re.search(r"(No space left on device|Disk quota exceeded|Read-only file system|Permission denied)",
                          text)
        what = found.group(1) if found else text.splitlines()[0][:200]
        where = re.search(r'(?:Failed (?:writing|to write)[^"]*|local file )"([^"]+)"', text)
        path = where.group(1) if where else None
    where = f" on {path!s}" if path else ""
    return (f"I/O error{where}: {what} ({type(e).__name__}); the run stopped, {_last_good_step(workdir)}; rerun the "
            f"same command to resume once the cause is fixed; traceback in {log}")


def _one_line(e: BaseException) -> str:
    """A flag / config error as one readable line (ml_collections' messages are reprs spanning several lines)."""
    text = str(e.args[0]) if isinstance(e, (AttributeError, KeyError)) and e.args else str(e)
    text = text.replace("\\n", "\n").replace("\\'", "'")
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    if isinstance(e, (AttributeError, KeyError)) and parts:
        parts = [p.strip("'\"") for p in parts]
        field = parts[0]
        hint = " ".join(parts[1:])
        return f"the config has no field {field!r}" + (f" ({hint})" if hint else "")
    if len(parts) > 2:  # a config file that raised: its first line and the error it ended with
        return f"{parts[0]} ... {parts[-1]}"
    return " ".join(parts)


def _config_by_name(argv: list[str]) -> list[str]:
    """``argv`` with a ``--config`` value that names a shipped config (``NAME[:ARG]``, no file of that name here)
    replaced by the config's path in :mod:`saliency_jax.configs`.

    Raises:
      _Exit: a value that is neither a file nor a path-like string (no ``/``, no ``.py``) nor a shipped name.
    """
    from saliency_jax import configs

    out = list(argv)
    for i, arg in enumerate(out):
        prefix = next((p for p in ("--config=", "-config=") if arg.startswith(p)), None)
        if prefix is not None:
            index, value = i, arg[len(prefix):]
        elif arg in ("--config", "-config") and i + 1 < len(out):
            index, prefix, value = i + 1, "", out[i + 1]
        else:
            continue
        name, colon, config_arg = value.partition(":")
        if os.path.exists(name) or not re.fullmatch(r"[A-Za-z_]\w*", name):
            continue  # a path: ml_collections loads it (and says so when it is missing)
        try:
            out[index] = prefix + str(configs.path(name)) + colon + config_arg
        except ValueError as e:
            raise _Exit(f"--config: {name!r} is neither a config file nor a shipped config; the shipped configs "
                        f"are: {', '.join(configs.names())}") from e
    return out


def _parse(argv: list[str]) -> list[str]:
    argv = _config_by_name(argv)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        raise _Exit(_one_line(e)) from e
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections: unknown field, bad type
        raise _Exit(_one_line(e)) from e


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise _Exit(f"environment variable {name}={value!r} must be an integer") from e


def _initialize_distributed() -> None:
    """``jax.distributed.initialize`` with the flags, else JAX's environment variables, else cluster detection."""
    import jax

    address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num = FLAGS.num_processes if FLAGS.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = FLAGS.process_id if FLAGS.process_id is not None else _env_int("JAX_PROCESS_ID")
    local = [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids else None
    given = {"--coordinator_address": address, "--num_processes": num, "--process_id": pid}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        logging.info("multihost: %s not given; asking JAX's cluster detection", missing)
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                                   local_device_ids=local)
    except (ValueError, TypeError) as e:
        raise _Exit(f"--multihost: {e} (outside TPU VMs, SLURM and Open MPI give --coordinator_address=HOST:PORT, "
                    "--num_processes=N and --process_id=I, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                    "JAX_PROCESS_ID)") from e


def _print_fields(node, prefix: str = "") -> None:
    import ml_collections

    for key in node.keys():
        value = node[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            _print_fields(value, path + ".")
            continue
        kind = node.get_type(key)
        print(f"{path}: {getattr(kind, '__name__', kind)} = {value!r}")


def _run(command: str, rest: list[str]) -> None:
    if len(rest) > 1:
        raise _Exit(f"unexpected arguments {rest[1:]}")
    if FLAGS.config is None:
        raise _Exit("--config=FILE[:ARG] is required")
    try:
        FLAGS.config.keys()  # a config file that failed to load raises here (ml_collections defers the error)
    except (OSError, AttributeError) as e:
        raise _Exit(f"--config: {_one_line(OSError(str(e)))}") from e
    if command == "config":
        _print_fields(FLAGS.config)
        return
    if FLAGS.workdir is None:
        raise _Exit(f"--workdir=DIR is required for {command}")
    if command != "experiment" and (FLAGS["arms"].present or FLAGS["override_arms"].present):
        raise _Exit("--arms and --override_arms apply to saliency-jax experiment only")
    import jax

    from saliency_jax.config import ConfigError

    if not FLAGS["verbosity"].present:  # orbax and grain log every checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    if FLAGS.multihost or any(FLAGS[f].present for f in ("coordinator_address", "num_processes", "process_id")):
        _initialize_distributed()
    from saliency_jax import compile_cache

    try:
        cache = compile_cache.enable_compilation_cache(FLAGS.compilation_cache)
    except OSError as e:
        raise _Exit(f"--compilation_cache: {e}") from e
    logging.info("devices: %s; compilation cache: %s", jax.devices(), cache or "off")
    every_arm = _check(command)
    log = _ErrorsLog(FLAGS.workdir)
    try:
        with _tracebacks_to(log):
            _command(command, cache, every_arm)
    except ConfigError as e:
        raise _Exit(str(e)) from e
    except Exception as e:  # an I/O error (disk full, permissions): one line; anything else propagates
        failure = io_error(e)
        if failure is None:
            raise
        log.append("".join(traceback.format_exception(e)))
        raise _Failure(io_failure_line(failure, FLAGS.workdir, log)) from e


def _error_line(e: BaseException) -> str:
    """A validation error as one line: its message (a ``KeyError``'s without the repr quotes), lines joined."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__


def _check(command: str) -> dict:
    """Validates the config before anything is written (:func:`saliency_jax.experiment.check_config`: every arm's
    loop fields, trainer, schemes, evaluators, data source, data paths and model; the data are read); for
    ``experiment``, refuses overrides of fields that arms set unless ``--override_arms``. Returns the fields to set
    in every arm (``every_arm``).

    Raises:
      _Exit: anything that makes the config unable to run, as one line.
    """
    from ml_collections import config_flags as flags_lib

    from saliency_jax import experiment

    config, every_arm, arms = FLAGS.config, {}, None
    if command == "experiment":
        arms = FLAGS.arms
        overrides = flags_lib.get_override_values(FLAGS["config"])
        conflicts = experiment.arms_setting(config, overrides)
        if conflicts and not FLAGS.override_arms:
            named = "; ".join(f"--config.{field} is also set by arm(s) {', '.join(arms_)}"
                              for field, arms_ in conflicts.items())
            raise _Exit(f"{named} (the arm's value would replace yours); drop the override, select other arms with "
                        "--arms, or add --override_arms to apply it to every arm")
        every_arm = {field: overrides[field] for field in conflicts}
    try:
        if command == "train":  # the config as it is: train runs no arm
            experiment.check_run(config)
        else:
            experiment.check_config(config, arms=arms, every_arm=every_arm)
    except (ValueError, KeyError, TypeError, OSError) as e:  # ConfigError, settings, sources, models, data paths
        raise _Exit(_error_line(e)) from e
    return every_arm


def _command(command: str, cache, every_arm: dict) -> None:
    """Runs ``train`` or ``experiment`` (the flags parsed, the devices set up, the config checked)."""
    import jax

    if command == "train":
        from saliency_jax import evaluators, experiment
        from saliency_jax import train as train_lib
        from saliency_jax import workdirs

        config = FLAGS.config
        with workdirs.WorkdirLock(FLAGS.workdir):  # one launch per workdir: training and run.json
            result = train_lib.train(config, FLAGS.workdir, progress=FLAGS.progress)
            record = experiment.evaluate_run(result, evaluators.build_evaluators(config),
                                             evaluators.ExperimentData(config))
        if jax.process_index() == 0:
            print(json.dumps({name: _scalars(m) for name, m in record.metrics.items()}, indent=2))
    else:
        from saliency_jax import experiment

        experiment.run_experiment(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress,
                                  compilation_cache=cache or "off", arms=FLAGS.arms, every_arm=every_arm)
        if jax.process_index() == 0:
            print(f"report: {FLAGS.workdir}/report.md")


def _scalars(metrics):
    """The top-level numbers of an evaluator's metrics (what ``train`` prints)."""
    if not isinstance(metrics, dict):
        return metrics
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main(argv=None) -> None:
    """Entry point of the ``saliency-jax`` console script (``argv``: for calls from Python, e.g. tests)."""
    standalone = argv is None
    argv = list(sys.argv if argv is None else argv)
    args = argv[1:]
    wants_help = any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in args)
    command = args[0] if args and args[0] in COMMANDS else None
    if args and args[0] == "--version":
        from saliency_jax import __version__

        print(f"saliency-jax {__version__}")
        sys.exit(0)
    if not args or args[0] == "help" or (wants_help and (command or args[0].startswith("-"))):
        print(_help(command))
        sys.exit(0)
    if command is None:
        print(f"saliency-jax: error: unknown command {args[0]!r}; choose one of {', '.join(COMMANDS)} "
              "(saliency-jax --help)", file=sys.stderr)
        sys.exit(2)
    try:
        rest = _parse([argv[0]] + args[1:])
        logging.use_absl_handler()
        _run(command, rest)
    except _Exit as e:
        print(f"saliency-jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    except _Failure as e:
        print(f"saliency-jax: error: {e}", file=sys.stderr)
        if standalone:  # skip the interpreter's teardown: dying background threads would print their tracebacks
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        sys.exit(1)


if __name__ == "__main__":
    main()
