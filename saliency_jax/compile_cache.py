"""JAX's persistent compilation cache, on by default for the command line and the experiment runner.

A jitted transform costs seconds to compile for every new input shape (a ResNet-50 Grad-CAM: 3-5 s on a CPU); with
the cache on, a second launch of the same run reads the compiled programs from disk instead (JAX's "Persistent
compilation cache" guide; the cache is keyed by the program, its shapes, the jaxlib version and the device).

Where the cache lives, first match wins:

1. an explicit ``path`` (the CLI's ``--compilation_cache=DIR``; ``run_experiment(..., compilation_cache=DIR)``);
2. the environment variable ``SALIENCY_JAX_COMPILATION_CACHE`` (:data:`ENV_VAR`);
3. a cache folder the user already gave JAX itself (``JAX_COMPILATION_CACHE_DIR`` or
   ``jax.config.update("jax_compilation_cache_dir", ...)``): left as it is;
4. the default, ``$XDG_CACHE_HOME/saliency_jax/jax_compilation_cache`` (``~/.cache/...`` without ``XDG_CACHE_HOME``).

A path of ``""``, ``"0"``, ``"off"``, ``"none"`` or ``"false"`` (any case) turns the cache off. The test suite sets
``SALIENCY_JAX_COMPILATION_CACHE=off`` (``tests/conftest.py``), so that tests never write a cache by surprise.

Only programs that took at least :data:`MIN_COMPILE_SECONDS` to compile are stored (JAX's
``jax_persistent_cache_min_compile_time_secs``; every entry size is allowed: ``jax_persistent_cache_min_entry_size_bytes
= -1``), so the many tiny programs of eager ``jnp`` calls do not fill the folder. The cache is trusted code: do not
point it at a folder others can write to (JAX's warning).
"""

from __future__ import annotations

import os
import pathlib

import jax

__all__ = ["ENV_VAR", "MIN_COMPILE_SECONDS", "OFF_VALUES", "default_cache_dir", "resolve_cache_dir",
           "enable_compilation_cache", "compilation_cache_dir"]

#: The environment variable naming the cache folder (or turning the cache off).
ENV_VAR = "SALIENCY_JAX_COMPILATION_CACHE"
#: Values of the path / environment variable that turn the cache off.
OFF_VALUES = ("", "0", "off", "none", "false", "no")
#: Programs that compile faster than this (seconds) are not stored.
MIN_COMPILE_SECONDS = 0.2


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/saliency_jax/jax_compilation_cache`` (``~/.cache`` when ``XDG_CACHE_HOME`` is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "saliency_jax" / "jax_compilation_cache"


def _is_off(value: str) -> bool:
    return value.strip().lower() in OFF_VALUES


def resolve_cache_dir(path: str | os.PathLike | None = None) -> str | None:
    """The cache folder the rules of this module give (``None``: the cache is off).

    Args:
      path: an explicit folder, or an off value (``"off"``, ``""``, ...); None: the environment variable, then JAX's
        own setting, then :func:`default_cache_dir`.
    """
    if path is not None:
        path = os.fspath(path)
        return None if _is_off(path) else os.path.abspath(os.path.expanduser(path))
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return None if _is_off(env) else os.path.abspath(os.path.expanduser(env))
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    return str(default_cache_dir())


def compilation_cache_dir() -> str | None:
    """The folder JAX's persistent compilation cache uses in this process now (None: off)."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or None


def enable_compilation_cache(path: str | os.PathLike | None = None, *,
                             min_compile_seconds: float = MIN_COMPILE_SECONDS) -> str | None:
    """Points JAX's persistent compilation cache at the folder :func:`resolve_cache_dir` gives, or turns it off.

    Idempotent; switching folders (or off) after programs were compiled resets JAX's cache object so that the new
    setting holds for later compilations.

    Args:
      path: see :func:`resolve_cache_dir`.
      min_compile_seconds: programs compiling faster than this are not stored
        (``jax_persistent_cache_min_compile_time_secs``).

    Returns:
      The folder now in use, or None when the cache is off.

    Raises:
      OSError: the folder cannot be created (named in the message).
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    folder = resolve_cache_dir(path)
    before = compilation_cache_dir()
    if folder is None:
        if before is not None:
            jax.config.update("jax_compilation_cache_dir", None)
            cc.reset_cache()
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"the compilation cache folder {folder!r} cannot be created ({e}); set {ENV_VAR}=DIR to "
                      f"another folder or {ENV_VAR}=off") from e
    if not jax.config.jax_enable_compilation_cache:
        jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if before != folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        if before is not None:
            cc.reset_cache()
    return folder
