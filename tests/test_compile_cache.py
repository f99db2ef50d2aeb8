"""JAX's persistent compilation cache (saliency_jax.compile_cache): where it goes, the flag / argument / environment
variable that move or disable it, and that the test suite itself runs with it off."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

from saliency_jax import compile_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_suite_runs_with_the_cache_off():
    assert os.environ[compile_cache.ENV_VAR] == "off"  # tests/conftest.py
    assert compile_cache.enable_compilation_cache() is None
    assert compile_cache.compilation_cache_dir() is None
    assert not jax.config.jax_compilation_cache_dir


def test_resolve_order_explicit_then_environment_then_jax_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir(tmp_path / "flag") == str(tmp_path / "flag")
    for off in ("off", "", "0", "None", "FALSE"):
        assert compile_cache.resolve_cache_dir(off) is None
    assert compile_cache.resolve_cache_dir() == str(tmp_path / "env")
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir() is None
    monkeypatch.delenv(compile_cache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve_cache_dir() == str(tmp_path / "xdg" / "saliency_jax" / "jax_compilation_cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_cache_dir() == pathlib.Path.home() / ".cache" / "saliency_jax" / \
        "jax_compilation_cache"


_CHILD = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from saliency_jax import compile_cache
    folder = compile_cache.enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else None,
                                                    min_compile_seconds=0.0)
    print("FOLDER", folder, jax.config.jax_compilation_cache_dir)
    jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((32, 32))).block_until_ready()
""")


def _child(env, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    env = {k: v for k, v in env.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_a_compiled_program_is_written_where_the_environment_or_argument_says(tmp_path):
    env_dir, arg_dir, home = tmp_path / "env", tmp_path / "arg", tmp_path / "home"
    out = _child({compile_cache.ENV_VAR: str(env_dir), "HOME": str(home), "XDG_CACHE_HOME": None})
    assert f"FOLDER {env_dir} {env_dir}" in out
    assert any(env_dir.iterdir())
    _child({compile_cache.ENV_VAR: str(env_dir), "HOME": str(home), "XDG_CACHE_HOME": None}, str(arg_dir))
    assert any(arg_dir.iterdir())
    # Off: nothing written, neither in the folder named elsewhere nor in the default one.
    out = _child({compile_cache.ENV_VAR: "off", "HOME": str(home), "XDG_CACHE_HOME": None})
    assert "FOLDER None None" in out
    _child({compile_cache.ENV_VAR: str(tmp_path / "unused"), "HOME": str(home), "XDG_CACHE_HOME": None}, "off")
    assert not (tmp_path / "unused").exists() and not home.exists()
    # Nothing given: the default folder under XDG_CACHE_HOME (here a temporary one).
    _child({compile_cache.ENV_VAR: None, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(home)})
    assert any((tmp_path / "xdg" / "saliency_jax" / "jax_compilation_cache").iterdir())


def test_the_runner_turns_the_cache_on_before_anything_runs(monkeypatch, tmp_path):
    from saliency_jax import experiment
    from saliency_jax.config import ConfigError, default_config

    calls = []
    monkeypatch.setattr(compile_cache, "enable_compilation_cache", lambda path=None: calls.append(path))
    config = default_config()
    config.experiment.arms = ()
    with pytest.raises(ConfigError, match="empty"):
        experiment.run_experiment(config, tmp_path / "out", progress=False, compilation_cache=tmp_path / "c")
    assert calls == [tmp_path / "c"]


@pytest.mark.slow
def test_cli_flag_moves_and_disables_the_cache(tmp_path):
    config = str(REPO / "experiments/configs/distraction_digits.py") + ":runlocal"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", compile_cache.ENV_VAR: str(tmp_path / "env")}
    base = [sys.executable, "-m", "saliency_jax", "train", "--config", config, "--config.num_steps=2",
            "--config.evaluators=classification", "--noprogress"]
    out = subprocess.run(base + ["--workdir", str(tmp_path / "a"), f"--compilation_cache={tmp_path / 'flag'}"],
                         env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert any((tmp_path / "flag").iterdir()) and not (tmp_path / "env").exists()
    out = subprocess.run(base + ["--workdir", str(tmp_path / "b"), "--compilation_cache=off"],
                         env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (tmp_path / "env").exists()
