"""Multi-process training anywhere (issue 13): two processes on 127.0.0.1 (CPU, gloo collectives) give the run one
process gives with the same global batch; a checkpoint cannot be resumed with another process count."""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from saliency_jax import data as data_lib
from saliency_jax import train as train_lib
from saliency_jax import workdirs
from saliency_jax.data import augment

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = textwrap.dedent("""
    from saliency_jax.config import default_config
    from saliency_jax.training import settings_section

    def get_config(arg=None):
        c = default_config()
        c.dataset.image_size = 16
        c.dataset.augment = dict(hflip=True, rotation=0.0, channel_shift=30.0, brightness=(0.5, 1.5))
        c.model.kwargs = {"widths": (2, 4, 8)}
        c.optimizer.learning_rate = 1e-3
        # A per-example random batch transform: each image is occluded with its own coin, drawn by row.
        c.schemes = ("distraction",)
        c.distraction = settings_section("distraction", probability=0.5, per_example=True, fill="random")
        c.batch_size = 8  # global: 8 rows on one process, 4 + 4 on two
        c.eval_batch_size = 64
        c.num_steps = 6
        c.log_every = 2
        c.checkpoint_every = 3
        c.evaluators = ("classification",)
        return c
""")


def test_process_rows_stack_to_the_single_process_batch_row_for_row():
    src = data_lib.ImageSource(np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1).repeat(4, 1).repeat(4, 2),
                               np.arange(30) % 3, num_classes=3)
    common = dict(batch_size=6, seed=1, augment_kwargs=augment.PAPER_AUGMENTATION)
    full = [b for _, b in zip(range(7), iter(data_lib.make_train_dataset(src, None, **common)))]
    parts = [[b for _, b in zip(range(7), iter(data_lib.make_train_dataset(src, None, shard_index=k, shard_count=3,
                                                                             **common)))] for k in range(3)]
    for step in range(7):
        stacked = {key: np.concatenate([parts[k][step][key] for k in range(3)]) for key in full[step]}
        np.testing.assert_array_equal(stacked["label"], full[step]["label"])
        np.testing.assert_allclose(stacked["image"], full[step]["image"], atol=1e-6)
    finite = [len(list(data_lib.make_train_dataset(src, None, batch_size=6, seed=0, shard_index=k, shard_count=2,
                                                    num_epochs=1))) for k in range(2)]
    assert finite == [5, 5]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: pathlib.Path, workdir: pathlib.Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "saliency_jax", "train", f"--config={config}",
                             f"--workdir={workdir}", "--noprogress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return "\n".join(line for line in out.splitlines() if not line.startswith("[Gloo]"))  # gloo's own chatter


def _params(workdir: pathlib.Path, step: int, like=None):
    """The checkpoint's state (the two-process one restored onto this process's device, shaped as ``like``)."""
    target = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "state").absolute(), target)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def test_two_processes_give_the_single_process_run(tmp_path):
    config = tmp_path / "config.py"
    config.write_text(CONFIG)
    port = _free_port()
    single = _launch(config, tmp_path / "one")
    pair = [_launch(config, tmp_path / "two", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}") for i in range(2)]
    one_out, two_out = _finish(single), [_finish(p) for p in pair]
    assert two_out[1] == ""  # only process 0 prints (and writes the log)

    # The same metrics at every logged step (float reduction order aside) and the same evaluation.
    log = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
           for name in ("one", "two")}
    assert [r["step"] for r in log["one"]] == [r["step"] for r in log["two"]] == [2, 4, 6]
    for a, b in zip(log["one"], log["two"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert any(r["occluded"] not in (0.0, 1.0) for r in log["one"])  # per-example coins did differ within batches
    one, two = json.loads(one_out), json.loads(two_out[0])
    assert one["classification"] == pytest.approx(two["classification"], rel=1e-4)

    # The same parameters after 6 steps, within float reduction-order tolerance.
    state1 = _params(tmp_path / "one", 6)
    state2 = _params(tmp_path / "two", 6, like=state1)
    p1, p2 = _flat(state1["params"]), _flat(state2["params"])
    assert p1.keys() == p2.keys()
    for name in p1:
        np.testing.assert_allclose(np.asarray(p1[name]), np.asarray(p2[name]), rtol=1e-4, atol=1e-5, err_msg=name)
    launch = json.loads((tmp_path / "two" / "launches.jsonl").read_text().splitlines()[0])
    assert launch["process_count"] == 2 and launch["device_count"] == 2
    assert not (tmp_path / "two" / workdirs.LOCK_FILE).exists()  # taken once (process 0) and released

    # Resuming the two-process run with one process (this one) says it cannot, before anything is compiled.
    spec = importlib.util.spec_from_file_location("two_process_config", config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    longer = module.get_config()
    longer.num_steps = 9
    with pytest.raises(workdirs.ResumeError, match=r"written by 2 process\(es\); this launch has 1.*relaunch "
                                                   r"with 2"):
        train_lib.train(longer, tmp_path / "two", progress=False)
