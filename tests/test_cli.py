"""The command line (issue 13): help, one-line errors, every None field overridable, distributed flags."""

import glob
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "experiments/configs/distraction_digits.py") + ":runlocal"


def _cli(*args, env=None, script=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "saliency_jax"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_help_shows_commands_flags_and_how_to_list_fields():
    for args in (["--help"], ["train", "--help"], ["experiment", "-h"], ["help"], []):
        out = _cli(*args)
        assert out.returncode == 0, (args, out.stderr[-2000:])
        for text in ("--config=FILE[:ARG]", "--workdir=DIR", "--config.FIELD=VALUE", "--multihost",
                     "--coordinator_address", "--num_processes", "--process_id", "saliency-jax config --config"):
            assert text in out.stdout, (args, text)
    assert "experiment" in _cli("--help").stdout and "experiment  " not in _cli("train", "--help").stdout


@pytest.mark.parametrize("args, message", [
    (["--config.num_stepz=3"], "the config has no field 'num_stepz' (Did you mean \"num_steps\""),
    (["--config.distraction.fil=one"], "the config has no field 'fil' (Did you mean \"fill\""),
    (["--config.num_steps=abc"], "flag --config.num_steps=abc: invalid literal for int()"),
    (["--config.log_every=0"], "config.log_every=0: must be an integer >= 1"),
])
def test_bad_flags_and_configs_print_one_line(tmp_path, args, message):
    out = _cli("train", f"--config={DIGITS}", f"--workdir={tmp_path / 'run'}", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saliency-jax: error: ") and message in lines[0], out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_config_file_and_unknown_command_print_one_line(tmp_path):
    out = _cli("train", "--config=experiments/configs/nope.py", f"--workdir={tmp_path}")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "nope.py" in out.stderr
    out = _cli("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


def test_config_command_lists_every_field_with_overrides():
    out = _cli("config", f"--config={DIGITS}", "--config.num_steps=77", "--config.dataset.data_dir=/somewhere")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    for line in ("num_steps: int = 77", "dataset.data_dir: str = '/somewhere'", "distraction.fill: str = 'zero'",
                 "restore_fallback: bool = False", "allow_config_change: bool = False"):
        assert line in lines, line


def _config_specs():
    for path in sorted(glob.glob(str(REPO / "experiments/configs/*.py"))):
        if path.endswith(("common.py", "__init__.py")):
            continue
        yield path
        if '"runlocal"' in pathlib.Path(path).read_text():
            yield path + ":runlocal"


def _leaves(config, prefix=""):
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _parse(argv):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("spec", list(_config_specs()), ids=lambda s: pathlib.Path(s.split(":")[0]).stem +
                         (":" + s.split(":")[1] if ":" in s else ""))
def test_every_field_whose_value_is_none_can_be_set_from_the_command_line(spec):
    config = _parse(["x", f"--config={spec}"])
    nones = [key for key, value in _leaves(config) if value is None]
    for key in nones:
        *path, leaf = key.split(".")
        parent = config
        for part in path:
            parent = parent[part]
        value, expected = ("true", "True") if parent.get_type(leaf) is bool else ("7", "7")
        node = _parse(["x", f"--config={spec}", f"--config.{key}={value}"])  # raised for image_size=None on 60896ce
        for part in key.split("."):
            node = node[part]
        assert str(node) == expected, key


def test_settings_sections_give_typed_placeholders_for_none_defaults():
    import dataclasses

    from saliency_jax.config import Settings

    @dataclasses.dataclass(frozen=True)
    class Example(Settings):
        layer: str | None = None
        size: int | None = None
        rate: float = 0.5

    section = Example.section()
    assert section.get_type("layer") is str and section.get_type("size") is int
    section.layer = "conv3"
    section.size = 4
    with pytest.raises(TypeError):
        section.size = "four"


DISTRIBUTED_PROBE = textwrap.dedent("""
    import json, sys, jax
    def initialize(**kwargs):
        print(json.dumps(kwargs)); sys.exit(0)
    jax.distributed.initialize = initialize
    from saliency_jax import cli
    sys.argv = ["saliency-jax"] + sys.argv[1:]
    cli.main()
""")


def test_distributed_settings_from_flags_and_from_jax_environment_variables(tmp_path):
    common = ["train", f"--config={DIGITS}", f"--workdir={tmp_path}"]
    out = _cli(*common, "--coordinator_address=10.0.0.1:1234", "--num_processes=4", "--process_id=3",
               "--local_device_ids=0,1", script=DISTRIBUTED_PROBE)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ('{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3, '
                                  '"local_device_ids": [0, 1]}')
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    out = _cli(*common, "--multihost", env=env, script=DISTRIBUTED_PROBE)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ('{"coordinator_address": "10.0.0.2:99", "num_processes": 2, "process_id": 1, '
                                  '"local_device_ids": null}')
    out = _cli(*common, "--multihost", "--process_id=1", env={"JAX_NUM_PROCESSES": "two"}, script=DISTRIBUTED_PROBE)
    assert out.returncode == 2 and "JAX_NUM_PROCESSES='two' must be an integer" in out.stderr


def test_an_io_error_ends_the_run_with_one_line_and_the_tracebacks_in_a_file(tmp_path, monkeypatch, capfd):
    """Disk full (or a permission error) mid-run: exit status 1, one line naming the path, the last good checkpoint and
    the log file; the tracebacks (the main one and those logged by background threads) in ``errors.log``, not on the
    terminal."""
    import errno
    import logging as std_logging
    import threading

    from saliency_jax import cli
    from saliency_jax import train as train_lib

    workdir = tmp_path / "run"

    def full_disk(config, workdir, progress=True):
        (pathlib.Path(workdir) / "checkpoints" / "4").mkdir(parents=True)  # the last good checkpoint
        try:  # what orbax's save thread does before the error reaches the main thread
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            std_logging.getLogger("orbax").error("async save failed", exc_info=True)
        thread = threading.Thread(target=lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
        thread.start()
        thread.join()
        raise OSError(errno.ENOSPC, "No space left on device", str(pathlib.Path(workdir) / "checkpoints" / "6"))

    monkeypatch.setattr(train_lib, "train", full_disk)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored whatever the CLI leaves
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["saliency-jax", "train", f"--config={DIGITS}", f"--workdir={workdir}", "--noprogress",
                  "--compilation_cache=off"])
    assert exit_info.value.code == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("saliency-jax: error:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert "No space left on device" in line and str(workdir / "checkpoints" / "6") in line
    assert "the last checkpoint is step 4" in line and str(workdir / "errors.log") in line
    assert "Traceback" not in err
    log = (workdir / "errors.log").read_text()
    assert log.count("Traceback") == 3 and "orbax: async save failed" in log


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if out.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_ends_the_run_with_one_line_and_the_last_good_checkpoint_kept(small_disk):
    """The real thing: the workdir on a 2 MiB disk, checkpoints of ~0.9 MB; the first fits, a later one does not."""
    workdir = small_disk / "run"
    out = _cli("train", f"--config={DIGITS}", f"--workdir={workdir}", "--noprogress", "--compilation_cache=off",
               "--config.model.kwargs.widths=(32, 64, 96)", "--config.num_steps=6", "--config.checkpoint_every=1",
               "--config.log_every=1", "--config.keep_checkpoints=3", "--config.evaluators=('classification',)")
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("saliency-jax: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], out.stderr[-3000:]
    assert "the last checkpoint is step" in errors[0] and "errors.log" in errors[0]
    assert out.stderr.count("Traceback") == 0, out.stderr[-3000:]
