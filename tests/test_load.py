"""saliency_jax.load: a trained run back from its workdir, and clear errors for missing or damaged workdirs."""

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
