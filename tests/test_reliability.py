"""Reliability of the train loop (issue 13): nothing silently wrong, errors before training, verified checkpoints.

Each test is one case of the issue; it failed on 60896ce (the message or behaviour it asserts did not exist there).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax import experiment
from saliency_jax import train as train_lib
from saliency_jax import workdirs
from saliency_jax.config import ConfigError, default_config
from saliency_jax.training import settings_section

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny(**overrides):
    """Plain training of a 3-layer CNN on 16 x 16 digits, 6 steps (the fastest config that checkpoints and logs)."""
    c = default_config()
    c.distraction = settings_section("distraction")  # an unused scheme's section (schemes = ())
    c.dataset.augment = {}
    c.dataset.image_size = 16
    c.model.kwargs = {"widths": (2, 4, 64)}  # conv3's kernel is large enough to live outside OCDBT's b-tree
    c.optimizer.learning_rate = 1e-3
    c.batch_size = 8
    c.eval_batch_size = 64
    c.num_steps = 6
    c.log_every = 2
    c.checkpoint_every = 2
    c.evaluators = ()
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def _log(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 6-step run every resumed run must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    result = train_lib.train(tiny(), workdir, progress=False)
    return result, workdir


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint integrity.


def _flip_bytes(step_dir: pathlib.Path) -> pathlib.Path:
    """Flips 4 bytes in the middle of the largest array-data file of a checkpoint's state: the OCDBT file holding
    the chunks of the arrays too large to be inlined in its (CRC-checked) b-tree nodes, read without a check."""
    files = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 4):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_flipped_bytes_are_refused_naming_the_step_and_fallback_only_when_asked(tmp_path, straight):
    config = tiny(num_steps=4)
    first = train_lib.train(config, tmp_path, progress=False)  # checkpoints at 2 and 4
    _flip_bytes(tmp_path / "checkpoints" / "4")
    with pytest.raises(RuntimeError, match="checkpoint step 4 .* damaged: 1 array"):  # TrainResult.restore too
        first.restore(4)
    config.num_steps = 6
    with pytest.raises(workdirs.CheckpointError, match=r"checkpoint step 4 in .*checkpoints is damaged.*"
                                                      r"restore_fallback.*step 2"):
        train_lib.train(config, tmp_path, progress=False)
    assert (tmp_path / "checkpoints" / "4").exists()  # nothing moved without being asked

    config.restore_fallback = True
    resumed = train_lib.train(config, tmp_path, progress=False)
    damaged = list((tmp_path / "checkpoints.damaged").iterdir())
    assert [p.name.split("-")[0] for p in damaged] == ["4"]
    # Steps 3..6 retrained from step 2: the same run as the uninterrupted one, log included.
    for a, b in zip(_leaves(straight[0].state), _leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)
    assert _log(tmp_path) == _log(straight[1])


def test_checksums_detect_a_single_changed_word_and_a_swap():
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.int32(3), "b": jnp.ones(5, jnp.bfloat16)}
    base = workdirs.state_checksums(tree)
    assert base == workdirs.state_checksums(jax.tree.map(jnp.copy, tree))
    flipped = dict(tree, w=tree["w"].at[1, 2].set(-1.26e38))
    assert workdirs.state_checksums(flipped)["['w']"] != base["['w']"]
    swapped = dict(tree, w=tree["w"].at[0, 0].set(1.0).at[0, 1].set(0.0))
    assert workdirs.state_checksums(swapped)["['w']"] != base["['w']"]
    assert workdirs.state_checksums(dict(tree, b=tree["b"].at[4].set(2)))["['b']"] != base["['b']"]


# ----------------------------------------------------------------------------------------------------------------
# Resuming with another config; the launch history; num_steps lowered.


def test_resume_with_another_config_or_fewer_steps_is_refused_and_the_history_kept(tmp_path):
    train_lib.train(tiny(num_steps=2), tmp_path, progress=False)
    changed = tiny(num_steps=4, seed=5)
    changed.optimizer.learning_rate = 0.5
    with pytest.raises(workdirs.ResumeError, match=r"config.optimizer.learning_rate: 0.001 .* 0.5 now; "
                                                   r"config.seed: 0 .* 5 now.*allow_config_change"):
        train_lib.train(changed, tmp_path, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0  # the record is not overwritten
    # Fields that do not change the trajectory may change: length, logging, evaluators, an unused scheme's section.
    harmless = tiny(num_steps=4, log_every=4, evaluators=("classification",))
    harmless.distraction.fill = "one"
    train_lib.train(harmless, tmp_path, progress=False)
    with pytest.raises(workdirs.ResumeError, match=r"checkpoint at step 4, past this config's 3 steps"):
        train_lib.train(tiny(num_steps=3), tmp_path, progress=False)
    changed.allow_config_change = True
    changed.num_steps = 6
    train_lib.train(changed, tmp_path, progress=False)
    launches = [json.loads(line) for line in (tmp_path / "launches.jsonl").read_text().splitlines()]
    assert [(r["start_step"], r["config"]["seed"], r["config"]["num_steps"]) for r in launches] == \
        [(0, 0, 2), (2, 0, 4), (4, 5, 6)]
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 5


def test_trajectory_differences_ignore_evaluators_and_unused_schemes():
    a = json.loads(tiny().to_json_best_effort())
    b = json.loads(tiny(num_steps=99, evaluators=("fgsm",), eval_batch_size=8).to_json_best_effort())
    b["distraction"]["threshold"] = 0.1
    b["random_erasing"] = {"probability": 0.3}
    assert workdirs.trajectory_differences(a, b) == []
    b["schemes"] = ["distraction"]  # now the section is used
    assert [d[0] for d in workdirs.trajectory_differences(a, b)] == ["distraction.threshold", "schemes"]


def test_check_resume_reads_legacy_config_json_and_tolerates_new_fields_at_their_default(tmp_path):
    record = json.loads(tiny().to_json_best_effort())
    del record["classification_weight"]  # a field added to the code after the checkpoint was made
    (tmp_path / "config.json").write_text(json.dumps(record))  # what 60896ce wrote at every launch
    workdirs.check_resume(tmp_path, tiny(), checkpoint_step=4)  # at its default: the old behaviour
    with pytest.raises(workdirs.ResumeError, match=r"config.classification_weight: '<absent>' .* 2.0 now"):
        workdirs.check_resume(tmp_path, tiny(classification_weight=2.0), checkpoint_step=4)
    workdirs.check_resume(tmp_path, tiny(seed=3), checkpoint_step=0)  # nothing to resume: nothing to compare


# ----------------------------------------------------------------------------------------------------------------
# The metrics log after a resume.


def test_metrics_log_after_an_interrupted_launch_reads_as_an_uninterrupted_run(tmp_path, straight, monkeypatch):
    """checkpoint_every=3, log_every=2: killed at step 6 after logging step 4 but before the step-6 checkpoint.
    The resumed log drops the line written after checkpoint 3, re-logs step 4 averaging steps 3 (saved with the
    checkpoint) and 4, and equals the uninterrupted log; no duplicates, no gap."""
    config = tiny(checkpoint_every=3)
    original = train_lib.check_batch

    def killed_at_6(batch, num_classes, where="", **kw):
        if where.startswith("train step 6 "):
            raise KeyboardInterrupt("killed")
        return original(batch, num_classes, where, **kw)

    monkeypatch.setattr(train_lib, "check_batch", killed_at_6)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(config, tmp_path, progress=False)
    assert [r["step"] for r in _log(tmp_path)] == [2, 4]
    monkeypatch.setattr(train_lib, "check_batch", original)
    resumed = train_lib.train(config, tmp_path, progress=False)
    assert _log(tmp_path) == _log(straight[1])  # steps [2, 4, 6], the same averages
    for a, b in zip(_leaves(straight[0].state), _leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Failure inside the loop.

FAILING_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_reliability import tiny
    from saliency_jax import train as T
    original = T.check_batch
    def failing(batch, n, where="", **kw):
        if where.startswith("train step 6 "):
            raise ValueError("USER ERROR at step 6")
        return original(batch, n, where, **kw)
    T.check_batch = failing
    T.train(tiny(num_steps=8, checkpoint_every=1, keep_checkpoints=3), sys.argv[1], progress=False)
""")


def test_an_error_in_the_loop_commits_the_last_checkpoint_and_is_shown_first(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", FAILING_RUN.format(tests=str(REPO / "tests")), str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 1
    assert out.stderr.rstrip().splitlines()[-1] == "ValueError: USER ERROR at step 6", out.stderr[-2000:]
    assert out.stderr.count("Traceback") == 1, out.stderr[-3000:]
    assert "Event loop is closed" not in out.stderr and "cannot schedule new futures" not in out.stderr
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["3", "4", "5"], names  # step 5 committed, no half-written *.orbax-checkpoint-tmp folder


# ----------------------------------------------------------------------------------------------------------------
# The jitted train step used from the library.


def _step_setup(loss="softmax_cross_entropy"):
    config = tiny()
    model = train_lib.build_model(config, 3)
    optimizer = train_lib.make_optimizer(config)
    step = jax.jit(train_lib.make_train_step(model, optimizer, loss=loss))
    state = train_lib.init_state(model, optimizer, (8, 8, 1), 0)
    images = np.asarray(jax.random.uniform(jax.random.key(0), (4, 8, 8, 1)))
    return model, optimizer, step, state, images


def test_train_step_never_writes_nan_into_the_state():
    model, optimizer, step, state, images = _step_setup()
    key = jax.random.key(1)
    with pytest.raises(ValueError, match="at least one example"):
        step(state, {"image": images[:0], "label": np.zeros((0,), np.int32)}, key)
    before = _leaves(state.params) + _leaves(state.opt_state)
    bad_batches = {
        "label >= num_classes": {"image": images, "label": np.array([0, 1, 3, 2], np.int32)},
        "negative label": {"image": images, "label": np.array([0, -1, 1, 2], np.int32)},
        "NaN pixel": {"image": np.where(np.arange(4)[:, None, None, None] == 2, np.nan, images),
                      "label": np.array([0, 1, 2, 0], np.int32)},
    }
    for what, batch in bad_batches.items():
        new, metrics = step(state, batch, key)
        assert float(metrics["update_skipped"]) == 1.0, what
        assert int(new.step) == 1, what
        after = _leaves(new.params) + _leaves(new.opt_state)
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b, err_msg=what)
    good, metrics = step(state, {"image": images, "label": np.array([0, 1, 2, 0], np.int32)}, key)
    assert float(metrics["update_skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(state.params), _leaves(good.params)))


def test_train_step_checked_mode_raises_on_bad_labels():
    from jax.experimental import checkify

    model, optimizer, _, state, images = _step_setup()
    checked = jax.jit(checkify.checkify(train_lib.make_train_step(model, optimizer), errors=checkify.user_checks))
    err, _ = checked(state, {"image": images, "label": np.array([0, 1, 2, 0], np.int32)}, jax.random.key(1))
    err.throw()  # fine
    err, _ = checked(state, {"image": images, "label": np.array([0, 7, 2, 0], np.int32)}, jax.random.key(1))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        err.throw()


def test_multi_label_step_skips_labels_that_are_not_0_or_1():
    model, optimizer, step, state, images = _step_setup("sigmoid_binary_cross_entropy")
    labels = np.array([[0, 1, 0], [1, 1, 0], [0, 2, 0], [0, 0, 1]], np.float32)
    _, metrics = step(state, {"image": images, "label": labels}, jax.random.key(1))
    assert float(metrics["update_skipped"]) == 1.0
    with pytest.raises(ValueError, match=r"multi-hot labels \[batch, 3\]"):
        step(state, {"image": images, "label": labels[:, :2]}, jax.random.key(1))


# ----------------------------------------------------------------------------------------------------------------
# Errors before the first step: loop fields.


@pytest.mark.parametrize("override, message", [
    ({"num_steps": -3}, r"config.num_steps=-3: must be an integer >= 0"),
    ({"num_steps": 0, "num_epochs": -1.0}, r"config.num_epochs=-1.0: must be a number >= 0"),
    ({"num_steps": 0, "num_epochs": 0.0}, r"nothing would be trained.*weights-only mode"),
    ({"log_every": 0}, r"config.log_every=0: must be an integer >= 1"),
    ({"checkpoint_every": 0}, r"config.checkpoint_every=0: must be an integer >= 1"),
    ({"eval_batch_size": 0}, r"config.eval_batch_size=0"),
])
def test_bad_loop_fields_fail_before_anything_is_read(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train_lib.train(tiny(**override), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_eval_batch_size_not_divisible_by_the_devices_names_the_field(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda backend=None: 8)
    with pytest.raises(ConfigError, match=r"config.eval_batch_size=100 must be divisible by the 8 devices.*"
                                          r"--config.eval_batch_size=96"):
        train_lib.check_run_config(tiny(eval_batch_size=100))
    with pytest.raises(ConfigError, match=r"config.batch_size=12 must be divisible by the 8 devices"):
        train_lib.check_run_config(tiny(batch_size=12))


def test_experiment_checks_every_arm_before_the_first_trains(tmp_path):
    config = tiny()
    config.experiment.arms = (("ok", {}), ("broken", {"log_every": 0}))
    with pytest.raises(ConfigError, match=r"arm 'broken': config.log_every=0"):
        experiment.run_experiment(config, tmp_path, progress=False)
    assert not (tmp_path / "ok").exists()


# ----------------------------------------------------------------------------------------------------------------
# Errors before the first step: the train and test sources.


def _npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def _images(n, h=8, w=8, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c)).astype(np.uint8)


@pytest.mark.parametrize("case, test_images, test_labels, message", [
    ("channels", _images(6, c=3), np.arange(6) % 3, r"test images have 3 channel\(s\), train images 1"),
    ("size", _images(6, 12, 12), np.arange(6) % 3, r"test images are \(12, 12, 1\) but train images are \(8, 8, 1\)"),
    ("empty", _images(0), np.zeros(0, np.int64), r"the test split is empty"),
    ("labels", _images(6), np.array([0, 1, 2, 5, 5, 9]), r"labels \[5, 9\] outside the training split's range "
                                                         r"\[0, 2\] \(num_classes grew to 10\)"),
])
def test_test_split_mismatches_fail_before_training(tmp_path, case, test_images, test_labels, message):
    data = _npz(tmp_path / "d.npz", _images(24), np.arange(24) % 3, test_images, test_labels)
    config = tiny(**{"dataset.name": "npz", "dataset.data_dir": data, "dataset.image_size": None,
                     "evaluators": ("classification",)})
    with pytest.raises(ConfigError, match=message):
        train_lib.train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match=message):  # and the experiment runner says so before any arm trains
        experiment.check_config(config)


def test_zero_by_zero_images_fail_before_training(tmp_path):
    data = _npz(tmp_path / "d.npz", _images(24, 0, 0), np.arange(24) % 3, _images(6, 0, 0), np.arange(6) % 3)
    config = tiny(**{"dataset.name": "npz", "dataset.data_dir": data, "dataset.image_size": None})
    with pytest.raises(ConfigError, match=r"train images have shape \(0, 0, 1\); they need height, width"):
        train_lib.train(config, tmp_path / "run", progress=False)
