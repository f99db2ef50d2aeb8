"""One launch per workdir (reliability issue: "two launches on one workdir").

On the old code two launches on one workdir were not told apart: started together, the second hung 5 minutes and died
with ``TimeoutError: ...step_directory_creation`` leaving a duplicate step-1 line in ``metrics.jsonl``; started
mid-run, it reported the healthy checkpoints as damaged. Each test here failed there (there was no lock).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from saliency_jax import train as train_lib
from saliency_jax import workdirs
from saliency_jax.config import ConfigError, default_config

REPO = pathlib.Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def tiny(**overrides):
    """Plain training of a small CNN on 16 x 16 digits (the fastest config that checkpoints and logs)."""
    c = default_config()
    c.dataset.image_size = 16
    c.model.kwargs = {"widths": (2, 4, 8)}
    c.batch_size = 8
    c.eval_batch_size = 64
    c.num_steps = 2
    c.log_every = 2
    c.checkpoint_every = 2
    c.evaluators = ()
    c.update(overrides)
    return c


def _env():
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))},
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def _write_lock(workdir: pathlib.Path, **record) -> pathlib.Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / workdirs.LOCK_FILE
    path.write_text(json.dumps({"host": HOST, "started": "2025-01-01T00:00:00+00:00", **record}))
    return path


def _dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_launch_is_refused_at_once_and_a_killed_launchs_lock_is_taken_over(tmp_path, monkeypatch,
                                                                                      caplog):
    # A launch holding the workdir (another process, the real lock), as a first launch mid-run does.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from saliency_jax import workdirs
        with workdirs.WorkdirLock({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = (tmp_path / workdirs.LOCK_FILE).read_text()
        assert json.loads(lock)["pid"] == holder.pid and json.loads(lock)["host"] == HOST

        # Refused before the config is validated or any data read, in one line naming the holder.
        monkeypatch.setattr(train_lib, "validate", lambda *a, **k: pytest.fail("validated while locked"))
        with pytest.raises(workdirs.WorkdirLockedError, match=rf"{tmp_path} is in use by the launch of host "
                                                              rf"'{HOST}', pid {holder.pid}, started .*one launch "
                                                              rf"per workdir") as refused:
            train_lib.train(tiny(), tmp_path, progress=False)
        assert isinstance(refused.value, ConfigError) and "\n" not in str(refused.value)
        assert refused.value.holder["pid"] == holder.pid
        assert sorted(os.listdir(tmp_path)) == [workdirs.LOCK_FILE]  # nothing written
        assert (tmp_path / workdirs.LOCK_FILE).read_text() == lock  # the holder's lock untouched
        monkeypatch.undo()
    finally:
        holder.kill()  # kill -9: the lock is left behind
        holder.wait()
    assert (tmp_path / workdirs.LOCK_FILE).read_text() == lock

    # The next launch finds the holder gone, takes the lock over with a warning, trains, and releases it.
    with caplog.at_level("WARNING"):
        train_lib.train(tiny(), tmp_path, progress=False)
    assert f"taking over the lock of the launch of host '{HOST}', pid {holder.pid}" in caplog.text
    assert not (tmp_path / workdirs.LOCK_FILE).exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]

    # Released on an error too (here a resume with another seed, refused).
    with pytest.raises(workdirs.ResumeError, match="config.seed"):
        train_lib.train(tiny(num_steps=4, seed=3), tmp_path, progress=False)
    assert not (tmp_path / workdirs.LOCK_FILE).exists()


def test_the_command_line_refuses_a_locked_workdir_in_one_line(tmp_path):
    _write_lock(tmp_path / "run", pid=os.getpid())  # this test's process: alive, on this host
    config = REPO / "experiments/configs/distraction_digits.py"
    out = subprocess.run([sys.executable, "-m", "saliency_jax", "train", f"--config={config}:runlocal",
                          f"--workdir={tmp_path / 'run'}", "--noprogress"], capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saliency-jax: error: ") and \
        f"host '{HOST}', pid {os.getpid()}" in lines[0], out.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "run")) == [workdirs.LOCK_FILE]


def test_a_live_holder_here_or_any_holder_elsewhere_is_refused(tmp_path):
    path = _write_lock(tmp_path, pid=os.getpid())  # alive on this host (e.g. another thread of this process)
    with pytest.raises(workdirs.WorkdirLockedError, match=rf"pid {os.getpid()}, started 2025-01-01"):
        with workdirs.WorkdirLock(tmp_path):
            pass
    assert path.exists()

    # Another host: its PID cannot be checked from here, so even a PID dead here is refused; the message says what
    # to do if that launch is gone.
    _write_lock(tmp_path, host="elsewhere", pid=_dead_pid())
    with pytest.raises(workdirs.WorkdirLockedError, match=r"host 'elsewhere'.*if that launch is no longer running, "
                                                          r"delete the lock file"):
        with workdirs.WorkdirLock(tmp_path):
            pass

    # A lock file whose record is not written yet (a launch between creating and writing it) is held ...
    path.write_text("")
    with pytest.raises(workdirs.WorkdirLockedError, match="lock record is not written yet"):
        with workdirs.WorkdirLock(tmp_path):
            pass
    # ... unless it has stayed empty for long (its launch was killed in between): stale.
    os.utime(path, (path.stat().st_atime - 3600, path.stat().st_mtime - 3600))
    with workdirs.WorkdirLock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_dead_or_reused_pid_is_stale_and_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    path = _write_lock(tmp_path, pid=dead)
    with caplog.at_level("WARNING"):
        with workdirs.WorkdirLock(tmp_path):
            record = json.loads(path.read_text())
            assert record["pid"] == os.getpid() and record["host"] == HOST and record["started"]
    assert f"taking over the lock of the launch of host '{HOST}', pid {dead}" in caplog.text
    assert not path.exists()

    # A PID alive again but for a process that started at another time (the PID was reused, e.g. after a restart).
    if workdirs._process_start(os.getpid()) is not None:
        _write_lock(tmp_path, pid=os.getpid(), process_start=workdirs._process_start(os.getpid()) - 1)
        with workdirs.WorkdirLock(tmp_path):
            assert json.loads(path.read_text())["process_start"] == workdirs._process_start(os.getpid())
        assert not path.exists()


def test_the_lock_is_released_on_an_error_reentrant_in_a_thread_and_refused_to_another(tmp_path):
    path = tmp_path / workdirs.LOCK_FILE
    with pytest.raises(RuntimeError, match="boom"):
        with workdirs.WorkdirLock(tmp_path):
            assert path.exists()
            raise RuntimeError("boom")
    assert not path.exists()

    errors = []

    def other_thread():
        try:
            with workdirs.WorkdirLock(tmp_path):
                pass
        except workdirs.WorkdirLockedError as e:
            errors.append(e)

    with workdirs.WorkdirLock(tmp_path):
        with workdirs.WorkdirLock(tmp_path):  # the holder may take it again (train around run_plan)
            pass
        assert path.exists()  # still held after the inner block
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and f"pid {os.getpid()}" in str(errors[0])
    assert not path.exists()
