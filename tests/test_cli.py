"""The command line (issue 13): help, one-line errors, every None field overridable, distributed flags."""

import glob
import json
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


def _cli(*args, env=None, script=None, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "saliency_jax"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


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
        # A config has the tiny variant when its code tests for it (the docstrings of every config mention it)
        # or hands its argument on to the shared reduced-budget helper.
        text = pathlib.Path(path).read_text()
        if '== "runlocal"' in text or "reduced_dropout_config(" in text:
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


# Issue 24: the version, shipped configs by name, every invalid setting and missing path refused before the workdir
# is touched, arm overrides, --arms.

BI_MNIST = str(REPO / "experiments/configs/background_invariance_mnist.py")


def test_version_and_shipped_configs_by_name_from_any_folder(tmp_path):
    from saliency_jax import __version__, configs

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"saliency-jax {__version__}"
    assert "distraction_digits" in configs.names() and "common" not in configs.names()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    by_name = subprocess.run([sys.executable, "-m", "saliency_jax", "config", "--config",
                              "distraction_digits:runlocal"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert by_name.returncode == 0, by_name.stderr[-2000:]
    assert by_name.stdout == _cli("config", f"--config={DIGITS}").stdout  # the same config as by path
    out = _cli("config", "--config=distraction_digit")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "'distraction_digit' is neither a config file nor a shipped " \
        "config" in lines[0] and "distraction_digits" in lines[0]


@pytest.mark.parametrize("command, config, args, message", [
    ("train", DIGITS, ["--config.schemes=distraction", "--config.distraction.fill=two"],
     "config.distraction: fill must be one of ('zero', 'one', 'random'); got 'two'"),
    ("train", DIGITS, ["--config.distraction.fill=two"],  # a section the run does not list is checked too
     "config.distraction: fill must be one of ('zero', 'one', 'random'); got 'two'"),
    ("experiment", DIGITS, ["--config.random_erasing.probability=2.0"],
     "config.random_erasing: probability must lie in [0, 1]"),
    ("experiment", DIGITS, ["--config.saliency_maps.score=logits"], "config.saliency_maps: score must be"),
    ("experiment", DIGITS, ["--config.dataset.name=nope"], "Unknown source spec 'nope'"),
    ("train", DIGITS, ["--config.model.kwargs.widths=(4,)"], "layer 'conv3' not found in SmallCNN"),
    ("train", DIGITS, ["--config.model.name=nope"], "model 'nope'"),
    ("train", DIGITS, ["--config.dataset.name=mnist", "--config.dataset.data_dir=no/such/mnist"],
     "config.dataset.data_dir='no/such/mnist': no such file or folder (relative to the current folder"),
    ("experiment", BI_MNIST, ["--config.dataset.data_dir=/no/such/mnist"],
     "config.dataset.data_dir='/no/such/mnist': no such file or folder"),
    ("train", DIGITS, ["--config.model.pretrained=/no/weights.safetensors"], "config.model.pretrained="),
    ("experiment", DIGITS, ["--config.distraction.fill=one"],
     "--config.distraction.fill is also set by arm(s) 0-occlusion"),
    ("experiment", DIGITS, ["--arms=baseline,nope"], "--arms: unknown arm(s) ['nope']; the config's arms are: "
                                                     "baseline, 0-occlusion"),
    ("train", DIGITS, ["--arms=baseline"], "--arms and --override_arms apply to saliency-jax experiment only"),
])
def test_invalid_settings_and_missing_paths_are_refused_before_the_workdir_is_touched(tmp_path, command, config,
                                                                                         args, message):
    workdir = tmp_path / "run"
    out = _cli(command, f"--config={config}", f"--workdir={workdir}", "--noprogress", *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("saliency-jax: error: ") and message in lines[0], out.stderr
    assert not workdir.exists()


def test_evaluator_settings_are_checked_when_the_evaluators_are_built():
    from saliency_jax import evaluators
    from saliency_jax.config import default_config

    config = default_config()
    config.evaluators = ("fgsm", "random_erasing", "saliency_maps")
    for section, message in ((dict(fgsm={"epsilons": (-0.1,)}), "config.fgsm: epsilons must be numbers in [0, 1]"),
                             (dict(random_erasing={"area_range": (0.5, 0.1)}), "config.random_erasing: area_range"),
                             (dict(saliency_maps={"weighting": "gradcam"}), "config.saliency_maps: weighting")):
        bad = ml_collections.ConfigDict({**config.to_dict(), **section})
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            evaluators.build_evaluators(bad)
    assert set(evaluators.build_evaluators(config)) == {"fgsm", "random_erasing", "saliency_maps"}


def test_experiment_runs_selected_arms_with_an_override_applied_to_every_arm(tmp_path):
    """--arms runs a subset; --override_arms sets a field the arms set in every arm, and the report says so; the
    progress line shows each evaluator's headline; the evaluators' scalars and the figures go to TensorBoard."""
    from saliency_jax import workdirs

    workdir = tmp_path / "exp"
    out = _cli("experiment", f"--config={DIGITS}", f"--workdir={workdir}", "--noprogress", "--compilation_cache=off",
               "--arms=0-occlusion", "--config.distraction.fill=one", "--override_arms", "--config.num_steps=2",
               "--config.checkpoint_every=2", "--config.log_every=1",
               "--config.evaluators=classification,random_erasing,training_curves",  # no Grad-CAM compilation
               timeout=900)  # about a minute on 2 idle cores; the margin is for a loaded host
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["arms"] == ["0-occlusion"] and metrics["every_arm"] == {"distraction.fill": "one"}
    assert not (workdir / "baseline").exists()
    run_config = json.loads((workdir / "0-occlusion" / "seed0" / "config.json").read_text())
    assert run_config["distraction"]["fill"] == "one"  # the arm's own value ("zero") replaced
    report = (workdir / "report.md").read_text()
    assert "Set in every arm over the arms' own values (`--override_arms`): `distraction.fill=one`." in report
    assert "Arms run (`--arms`): 0-occlusion of baseline, 0-occlusion." in report
    progress = [line for line in out.stdout.splitlines() if line.startswith("[0-occlusion seed 0]")]
    assert len(progress) == 1
    for headline in ("classification.accuracy", "random_erasing.accuracy", "training_curves.loss"):
        assert headline in progress[0], progress[0]
    scalars = workdirs.read_tensorboard_scalars(workdir / "0-occlusion" / "seed0")
    run = json.loads((workdir / "0-occlusion" / "seed0" / "run.json").read_text())
    assert scalars["eval/classification/accuracy"] == [(2, pytest.approx(
        run["evaluations"]["classification"]["metrics"]["accuracy"]))]
    assert "eval/random_erasing/f1_macro" in scalars and "eval/classification/true_positive_rate/0" in scalars
    assert set(workdirs.tensorboard_image_tags(workdir)) == {"report/training_curves"}
