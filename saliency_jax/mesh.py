"""The device mesh every jitted program of the project runs on: data parallel over every device of every process."""

from __future__ import annotations

import jax

__all__ = ["make_mesh"]


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, axis ``'data'`` (automatic sharding propagation)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
