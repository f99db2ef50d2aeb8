"""saliency_jax.load: a trained run back from its workdir, and clear errors for missing or damaged workdirs."""

import json
import shutil

import jax
import numpy as np
import pytest

import saliency_jax
from saliency_jax import train as train_lib
from saliency_jax import workdirs
from saliency_jax.config import default_config


def tiny_config():
    c = default_config()
    c.dataset.image_size = 16
    c.model.kwargs = {"widths": (4, 8, 8)}
    c.batch_size = 8
    c.eval_batch_size = 64
    c.num_steps = 6
    c.log_every = 2
    c.checkpoint_every = 3
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("load") / "run"
    return train_lib.train(tiny_config(), workdir, progress=False)


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_returns_the_trained_model_variables_and_config(trained):
    run = saliency_jax.load(trained.workdir)
    assert int(run.state.step) == 6
    assert run.config.model.kwargs.widths == (4, 8, 8) and run.config.num_steps == 6
    assert run.image_shape == trained.image_shape and run.num_classes == trained.num_classes == 10
    _same(run.variables, trained.variables)
    _same(run.initial_variables, trained.initial_variables)
    x = np.random.default_rng(0).uniform(size=(3, *run.image_shape)).astype(np.float32)
    np.testing.assert_allclose(run.model.apply(run.variables, x),
                               trained.model.apply(trained.variables, x), rtol=1e-6, atol=1e-6)
    assert [r["step"] for r in run.history] == [2, 4, 6]
    _same(saliency_jax.load(trained.workdir, step=3).variables, trained.restore(3).variables())


def test_load_errors_name_what_is_missing_or_damaged(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory"):
        saliency_jax.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        saliency_jax.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        saliency_jax.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no step 5"):
        saliency_jax.load(trained.workdir, step=5)

    # A damaged latest checkpoint: refused (naming the step), or with fallback the earlier intact one.
    copy = tmp_path / "copy"
    shutil.copytree(trained.workdir, copy)
    for f in (copy / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100 and "ocdbt" not in f.name and f.suffix != ".json":
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
    with pytest.raises(workdirs.CheckpointError, match="step 6"):
        saliency_jax.load(copy)
    run = saliency_jax.load(copy, fallback=True)
    assert int(run.state.step) == 3
    assert (copy / "checkpoints" / "6").exists()  # load only reads


# ----------------------------------------------------------------------------------------------------------------
# config.json tied to the checkpoint it describes (reliability issue: "load() and weights-only launches"). On the
# old code a weights-only launch overwrote config.json with another model unchecked (load then called the healthy
# checkpoint "damaged"), and load() used an edited config.json silently.


def _weights_only(widths):
    c = tiny_config()
    c.num_steps, c.num_epochs = 0, 0.0
    c.model.kwargs = {"widths": widths}
    c.model.num_classes = 10
    c.model.allow_random_init = True
    return c


def _files(workdir):
    return {name: (workdir / name).read_bytes() for name in ("config.json", "launches.jsonl")}


def test_weights_only_launch_into_another_models_workdir_is_refused_and_otherwise_recorded(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained.workdir, copy)
    before = _files(copy)
    with pytest.raises(workdirs.ResumeError, match=r"holds a checkpoint \(step 6\) made with another config: .*"
                                                   r"config.model.kwargs.widths: \[4, 8, 8\] in the checkpoint's "
                                                   r"launch, \[2, 4, 8\] now"):
        train_lib.train(_weights_only((2, 4, 8)), copy, progress=False)
    other = _weights_only((4, 8, 8))
    other.allow_config_change = True  # even then: the workdir holds a trained run, which this launch is not
    with pytest.raises(workdirs.ResumeError, match=r"checkpoint at step 6, and this config trains nothing"):
        train_lib.train(other, copy, progress=False)
    assert _files(copy) == before and not (copy / workdirs.LOCK_FILE).exists()
    assert int(saliency_jax.load(copy).state.step) == 6  # the run is intact

    # Into a fresh workdir it runs, and is recorded in the launch history as a training launch is.
    fresh = tmp_path / "weights"
    train_lib.train(_weights_only((2, 4, 8)), fresh, progress=False)
    (launch,) = [json.loads(line) for line in (fresh / "launches.jsonl").read_text().splitlines()]
    assert (launch["start_step"], launch["total_steps"], launch["config"]["model"]["kwargs"]["widths"]) == \
        (0, 0, [2, 4, 8])
    assert json.loads((fresh / "config.json").read_text())["model"]["kwargs"]["widths"] == [2, 4, 8]


def test_load_refuses_a_config_json_that_differs_from_the_checkpoints_launch(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained.workdir, copy)
    record = json.loads((copy / "config.json").read_text())
    edited = {**record, "seed": 7, "optimizer": {**record["optimizer"], "learning_rate": 0.5}}
    (copy / "config.json").write_text(json.dumps(edited))
    with pytest.raises(workdirs.ResumeError, match=r"load: .*config.json differs from the config checkpoint step 6 "
                                                   r"was made with \(launches.jsonl.*: "
                                                   r"config.optimizer.learning_rate: 5e-05 in the checkpoint's launch, "
                                                   r"0.5 in config.json; config.seed: 0 in the checkpoint's launch, "
                                                   r"7 in config.json"):
        saliency_jax.load(copy)
    with pytest.raises(workdirs.ResumeError, match="checkpoint step 3 was made with"):
        saliency_jax.load(copy, step=3)

    # Fields that do not change the trajectory may differ (a later launch that only extended the run, say).
    (copy / "config.json").write_text(json.dumps({**record, "log_every": 5, "evaluators": ["classification"]}))
    assert int(saliency_jax.load(copy).state.step) == 6


def test_a_checkpoint_of_another_model_is_reported_as_such_not_as_damaged(trained, tmp_path):
    # The workdir the old code left: a weights-only launch of another model overwrote config.json.
    copy = tmp_path / "run"
    shutil.copytree(trained.workdir, copy)
    (copy / "config.json").write_text(_weights_only((2, 4, 8)).to_json_best_effort(indent=2))
    with pytest.raises(workdirs.ResumeError, match=r"config.model.kwargs.widths: \[4, 8, 8\] in the checkpoint's "
                                                   r"launch, \[2, 4, 8\] in config.json"):
        saliency_jax.load(copy)

    # Without a launch history to compare with (a workdir from before it), the arrays themselves tell.
    (copy / "launches.jsonl").unlink()
    with pytest.raises(workdirs.ResumeError, match=r"checkpoint step 6 in .*checkpoints does not match the model in "
                                                   r"config.json: \d+ array\(s\) differ .*\[4\] in the checkpoint, "
                                                   r"\[2\] in the model in config.json") as mismatch:
        saliency_jax.load(copy)
    assert "damaged" not in str(mismatch.value)
