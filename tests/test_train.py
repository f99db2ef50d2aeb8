"""The train loop: sharded step on 8 fake devices, kill-and-resume, bad input, the experiment end to end."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax import train as train_lib
from saliency_jax import training
from saliency_jax.config import default_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(enabled=True, **distraction):
    c = default_config()
    c.distraction = training.settings_section("distraction")
    c.schemes = ("distraction",) if enabled else ()
    c.dataset.augment = dict(hflip=False, rotation=10.0, channel_shift=30.0, brightness=(0.5, 1.5))
    c.dataset.image_size = 16
    c.model.kwargs = {"widths": (4, 8, 8)}
    c.optimizer.learning_rate = 1e-3
    c.batch_size = 8
    c.eval_batch_size = 64
    c.num_steps = 8
    c.log_every = 2
    c.checkpoint_every = 4
    c.distraction.update(dict(probability=0.5, fill="random"), **distraction)
    return c


SHARDED_STEP_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from saliency_jax import data, train as T
    from saliency_jax.training import DistractionConfig, ModelLayers, distraction_scheme
    from saliency_jax.config import default_config
    assert jax.device_count() == 8, jax.devices()
    c = default_config()
    c.model.kwargs = {"widths": (4, 8, 8)}
    src = data.get_source("digits", "train", image_size=16)
    ds = data.make_train_dataset(src, np.arange(len(src)), batch_size=16, seed=0, image_size=16)
    batches = [b for _, b in zip(range(3), iter(ds))]
    model = T.build_model(c, src.num_classes)
    opt = T.make_optimizer(c)
    scheme = distraction_scheme(DistractionConfig(probability=1.0, fill="random"), ModelLayers("conv3", "fc"))
    step = T.make_train_step(model, opt, scheme)
    finals = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.array(devices), ("data",))
        repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        state = jax.device_put(T.init_state(model, opt, (16, 16, 1), 0), repl)
        fn = jax.jit(step, in_shardings=(repl, shard, repl), out_shardings=(repl, repl))
        occluded = []
        for b in batches:
            state, m = fn(state, jax.device_put(b, shard), jax.random.key(1))
            occluded.append(float(m["occluded"]))
        assert occluded == [1.0, 1.0, 1.0], occluded
        finals.append(jax.device_get(state))
    a, b = (jax.tree.leaves(f) for f in finals)
    worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
    print("MAXDIFF", worst)
""")


def test_train_step_on_8_devices_matches_1_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", SHARDED_STEP_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.split("MAXDIFF")[1])
    # Same random fills and masks on both meshes (partitionable threefry); only reduction order differs.
    assert worst < 1e-4, worst


def _params(result):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get((result.state.params, result.state.batch_stats)))]


def test_kill_and_resume_continues_the_same_trajectory(tmp_path):
    config = tiny_config()
    straight = train_lib.train(config, tmp_path / "straight", progress=False)

    first = config.copy_and_resolve_references()
    first.num_steps = 5  # "killed" after step 5; checkpoints at 4 and 5 (the last step is always saved)
    train_lib.train(first, tmp_path / "resumed", progress=False)
    resumed = train_lib.train(config, tmp_path / "resumed", progress=False)

    assert int(resumed.state.step) == int(straight.state.step) == 8
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    # The log reads as the uninterrupted run's: the first launch's off-grid last line (step 5) is gone, and the
    # average at step 6 covers steps 5 and 6 (step 5's metrics were saved with the checkpoint).
    logged = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    assert logged == [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


def test_corrupt_checkpoint_names_the_path(tmp_path):
    config = tiny_config(enabled=False)
    config.num_steps = 4
    train_lib.train(config, tmp_path / "run", progress=False)
    step_dir = tmp_path / "run" / "checkpoints" / "4"
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(b"garbage")
    config.num_steps = 6
    with pytest.raises(RuntimeError, match=r"checkpoint step 4 .*checkpoints"):
        train_lib.train(config, tmp_path / "run", progress=False)


def test_step_is_traced_once():
    config = tiny_config(probability=1.0)
    model = train_lib.build_model(config, 10)
    opt = train_lib.make_optimizer(config)
    scheme = training.build_scheme(config, train_lib.model_layers(config))
    step = chex.assert_max_traces(train_lib.make_train_step(model, opt, scheme), n=1)
    fn = jax.jit(step)
    state = train_lib.init_state(model, opt, (16, 16, 1), 0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {"image": rng.uniform(size=(8, 16, 16, 1)).astype(np.float32),
                 "label": rng.integers(0, 10, 8).astype(np.int32)}
        state, metrics = fn(state, batch, jax.random.key(0))
    assert int(state.step) == 3 and float(metrics["occluded"]) == 1.0


def test_check_batch_rejects_bad_input():
    good = {"image": np.zeros((2, 4, 4, 1), np.float32), "label": np.array([0, 1], np.int32)}
    train_lib.check_batch(good, 2)
    nan = {**good, "image": good["image"].copy()}
    nan["image"][1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*rows \[1\]"):
        train_lib.check_batch(nan, 2, where="train step 3")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        train_lib.check_batch({**good, "label": np.array([0, 2], np.int32)}, 2)
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        train_lib.check_batch({**good, "image": np.zeros((2, 4, 4), np.float32)}, 2)
    with pytest.raises(TypeError, match="float32"):
        train_lib.check_batch({**good, "image": np.zeros((2, 4, 4, 1), np.uint8)}, 2)
    with pytest.raises(ValueError, match="divisible"):
        c = tiny_config()
        c.batch_size = jax.device_count() + 1 if jax.device_count() > 1 else 3
        if jax.device_count() == 1:
            raise ValueError("divisible")  # every batch size divides over one device
        train_lib.train(c, "/tmp/unused", progress=False)


def test_experiment_runlocal_writes_report_and_figure(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "saliency_jax", "experiment",
         "--config", str(REPO / "experiments/configs/distraction_digits.py") + ":runlocal",
         "--workdir", str(tmp_path / "exp"), "--noprogress"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "| Metric | baseline | 0-occlusion |" in report
    assert "Random Erasing" in report and "| 0-occlusion | distraction (" in report
    metrics = json.loads((tmp_path / "exp" / "metrics.json").read_text())
    for arm in ("baseline", "0-occlusion"):
        acc = metrics["summary"][arm]["classification"]["accuracy"]
        assert 0.0 <= acc <= 1.0
    from PIL import Image

    with Image.open(tmp_path / "exp" / "saliency_maps.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_lr_multipliers_give_the_authors_caffe_update():
    # Excitation Dropout's released script (andreazuna89/Excitation-Dropout): per parameter,
    # m = momentum m + (g + wd w) lr mult; w -= m; mult 10 / 20 on the last layer's weight / bias, 2 on other biases.
    import optax
    from saliency_jax.config import default_config

    c = default_config()
    c.optimizer.update(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=0.005,
                       lr_multipliers=(("fc3/kernel", 10.0), ("fc3/bias", 20.0), ("*/bias", 2.0)))
    tx = train_lib.make_optimizer(c)
    rng = np.random.default_rng(0)
    params = {"fc1": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2)},
              "fc3": {"kernel": rng.normal(size=(2, 2)), "bias": rng.normal(size=2)}}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    mult = {"fc1": {"kernel": 1.0, "bias": 2.0}, "fc3": {"kernel": 10.0, "bias": 20.0}}
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    m = jax.tree.map(np.zeros_like, w)
    state = tx.init(params)
    for i in range(3):
        grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        m = jax.tree.map(lambda m_, g, w_, k: 0.9 * m_ + (np.asarray(g, np.float64) + 0.005 * w_) * 0.01 * k,
                         m, grads, w, mult)
        w = jax.tree.map(lambda w_, m_: w_ - m_, w, m)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(w)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    c.optimizer.lr_multipliers = (("fc3/kernel", "ten"),)
    with pytest.raises(ValueError, match="lr_multipliers"):
        train_lib.make_optimizer(c)
