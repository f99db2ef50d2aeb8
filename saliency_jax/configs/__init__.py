"""The shipped experiment configs: one ``ml_collections`` file per paper table or runnable comparison.

Each module's ``get_config(arg)`` returns its config and its docstring gives the command, the runtime and the numbers
it should reach; ``common.py`` holds the arms and builders they share. The folder is also reachable as
``experiments/configs/`` in a checkout (a link to this one). The command line takes a config by name or by path:
``saliency-jax experiment --config distraction_digits:runlocal`` is
``--config experiments/configs/distraction_digits.py:runlocal``.
"""

from __future__ import annotations

import pathlib

__all__ = ["names", "path"]

_FOLDER = pathlib.Path(__file__).resolve().parent
_NOT_CONFIGS = ("__init__", "common")


def names() -> tuple[str, ...]:
    """The shipped configs' names, sorted (``saliency-jax ... --config NAME[:ARG]`` takes them)."""
    return tuple(sorted(p.stem for p in _FOLDER.glob("*.py") if p.stem not in _NOT_CONFIGS))


def path(name: str) -> pathlib.Path:
    """The file of the shipped config ``name`` (e.g. ``"distraction_digits"``), what ``--config NAME`` loads; in
    Python, ``from saliency_jax.configs import distraction_digits`` gives its module (``.get_config(arg)``).

    Raises:
      ValueError: ``name`` is not a shipped config (the message lists them).
    """
    if name not in names():
        raise ValueError(f"no shipped config named {name!r}; the shipped configs are: {', '.join(names())}")
    return _FOLDER / f"{name}.py"
