"""Schemes that carry state (optax's init / update): the state lives in the train state, every piece reads it, a
chain gives each scheme its own, a skipped update keeps it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from saliency_jax import training
from saliency_jax.training import Scheme
from saliency_jax.training.step import init_state, make_train_step


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def counting_scheme(weight):
    """Counts its updates and keeps a running mean of the loss; its loss term reads the count."""

    def init(variables):
        return {"count": jnp.zeros((), jnp.int32), "mean_loss": jnp.zeros((), jnp.float32)}

    def loss(ctx, batch, forward):
        return weight * ctx.state["count"].astype(jnp.float32) * jnp.zeros(batch["label"].shape), \
            {"seen_count": ctx.state["count"].astype(jnp.float32)}

    def update(ctx, forward, metrics):
        n = ctx.state["count"] + 1
        return {"count": n, "mean_loss": ctx.state["mean_loss"] + (metrics["loss"] - ctx.state["mean_loss"]) / n}

    return Scheme(loss=loss, init=init, update=update)


def _batch(bad=False):
    images = np.linspace(0, 1, 4 * 2 * 2 * 1, dtype=np.float32).reshape(4, 2, 2, 1)
    if bad:
        images[0, 0, 0, 0] = np.nan
    return {"image": jnp.asarray(images), "label": jnp.asarray([0, 1, 2, 0])}


def test_state_is_initialised_read_and_updated():
    model, opt = Tiny(), optax.sgd(0.1)
    scheme = counting_scheme(1.0)
    state = init_state(model, opt, (2, 2, 1), 0, scheme=scheme)
    step = jax.jit(make_train_step(model, opt, scheme))
    losses = []
    for i in range(3):
        state, metrics = step(state, _batch(), jax.random.key(0))
        assert float(metrics["seen_count"]) == i  # the loss term saw the state before this step's update
        losses.append(float(metrics["loss"]))
    assert int(state.scheme_state["count"]) == 3
    np.testing.assert_allclose(float(state.scheme_state["mean_loss"]), np.mean(losses), rtol=1e-6)
    # A skipped update (NaN pixel) keeps the scheme's state too.
    state2, metrics = step(state, _batch(bad=True), jax.random.key(0))
    assert float(metrics["update_skipped"]) == 1.0 and int(state2.scheme_state["count"]) == 3


def test_chain_gives_each_scheme_its_own_state():
    model, opt = Tiny(), optax.sgd(0.1)
    a, b = counting_scheme(1.0), counting_scheme(2.0)
    b = b._replace(loss=lambda ctx, batch, fwd: (jnp.zeros(batch["label"].shape),
                                                  {"other_count": ctx.state["count"].astype(jnp.float32)}))
    chained = training.chain(a, Scheme(), b)
    state = init_state(model, opt, (2, 2, 1), 0, scheme=chained)
    assert sorted(state.scheme_state) == ["0", "1"]
    state, metrics = jax.jit(make_train_step(model, opt, chained))(state, _batch(), jax.random.key(0))
    assert int(state.scheme_state["0"]["count"]) == int(state.scheme_state["1"]["count"]) == 1
    assert float(metrics["seen_count"]) == float(metrics["other_count"]) == 0.0


def test_stateless_schemes_keep_an_empty_state():
    model, opt = Tiny(), optax.sgd(0.1)
    state = init_state(model, opt, (2, 2, 1), 0)
    assert state.scheme_state == {}
    assert training.chain(Scheme()) == Scheme()
