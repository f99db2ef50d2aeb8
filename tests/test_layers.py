"""The one layer helper (saliency_jax.saliency.apply_with_layers): reading, replacing and bypassing layers of an
unmodified linen module, layers after an activation applied as a function call, and saliency maps inside a loss
with gradients flowing to the parameters (finite differences, train mode with BatchNorm)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.models.resnet import ReLU
from saliency_jax.saliency import (apply_with_layers, grad_cam, linen_class_activation_map, linen_head,
                                   linen_layer)


class FunctionalReLU(nn.Module):
    """The common way to write a linen model: activations as function calls (no module to name)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(4, (3, 3), name="c1")(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(nn.Conv(6, (3, 3), name="c2")(x))
        x = nn.relu(x)
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


class NamedReLU(nn.Module):
    """The same network with its ReLUs as named submodules."""

    @nn.compact
    def __call__(self, x, train=False):
        x = ReLU(name="r1")(nn.Conv(4, (3, 3), name="c1")(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(nn.Conv(6, (3, 3), name="c2")(x))
        x = ReLU(name="r2")(x)
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


def _setup():
    x = jax.random.uniform(jax.random.key(1), (5, 8, 8, 2))
    y = jnp.array([0, 1, 2, 0, 1])
    fn, named = FunctionalReLU(), NamedReLU()
    variables = fn.init(jax.random.key(0), x)
    # Perturb the BatchNorm statistics so that inference mode is not the identity.
    stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    return fn, named, variables, x, y


def test_post_relu_layer_of_a_functional_model_equals_the_named_relu():
    fn, named, variables, x, y = _setup()
    for train, kwargs in ((False, {}), (True, {"mutable": ["batch_stats"]})):
        m1 = jax.jit(lambda x: grad_cam(linen_layer(fn, variables, "bn+relu", train=train, **kwargs), x, y,
                                        normalize=False))(x)
        m2 = jax.jit(lambda x: grad_cam(linen_layer(named, variables, "r2", train=train, **kwargs), x, y,
                                        normalize=False))(x)
        np.testing.assert_array_equal(np.asarray(m1), np.asarray(m2))
        assert float(jnp.max(m1)) > 0
    # The pre-activation layer gives a different (wrong for Grad-CAM) map: the suffix matters.
    m3 = grad_cam(linen_layer(fn, variables, "bn", train=False), x, y, normalize=False)
    m2 = grad_cam(linen_layer(named, variables, "r2", train=False), x, y, normalize=False)
    assert float(jnp.max(jnp.abs(m3 - m2))) > 1e-6
    # Activations read through the helper are the post-ReLU ones, equal to the named module's output.
    a1 = apply_with_layers(fn, variables, x, capture=["c1+relu", "bn+relu"]).activations
    a2 = apply_with_layers(named, variables, x, capture=["r1", "r2"]).activations
    np.testing.assert_array_equal(np.asarray(a1["c1+relu"]), np.asarray(a2["r1"]))
    np.testing.assert_array_equal(np.asarray(a1["bn+relu"]), np.asarray(a2["r2"]))


def test_replace_bypass_inputs_and_head():
    fn, named, variables, x, _ = _setup()
    base = named.apply(variables, x)
    out = apply_with_layers(named, variables, x, capture_inputs=["fc"], replace={"r2": lambda a: 2.0 * a})
    # fc's input is the spatial mean of r2's (doubled) output; logits = fc(2 * pooled) = 2 W p + b.
    pooled = jnp.mean(ReLU().apply({}, apply_with_layers(named, variables, x, capture=["bn"]).activations["bn"]),
                      axis=(1, 2))
    np.testing.assert_allclose(np.asarray(out.inputs["fc"]), 2.0 * np.asarray(pooled), rtol=1e-6)
    w, b = variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]
    np.testing.assert_allclose(np.asarray(out.output), np.asarray(2.0 * pooled @ w + b), rtol=1e-5, atol=1e-6)
    # Replacing an activation-suffixed layer, and the head above a layer as a function of its value.
    doubled = apply_with_layers(fn, variables, x, replace={"bn+relu": lambda a: 2.0 * a}).output
    np.testing.assert_allclose(np.asarray(doubled), np.asarray(out.output), rtol=1e-5, atol=1e-6)
    head = linen_head(named, variables, "r2", x)
    r2 = apply_with_layers(named, variables, x, capture=["r2"]).activations["r2"]
    np.testing.assert_allclose(np.asarray(head(r2)), np.asarray(base), rtol=1e-6)
    # Bypass: the BatchNorm as the identity.
    bypassed = apply_with_layers(named, variables, x, bypass=["bn"], capture=["r2"]).activations["r2"]
    c2 = apply_with_layers(named, variables, x, capture=["c2"]).activations["c2"]
    np.testing.assert_array_equal(np.asarray(bypassed), np.maximum(np.asarray(c2), 0))


def test_errors_name_the_problem():
    fn, named, variables, x, _ = _setup()
    with pytest.raises(ValueError, match=r"'nope' not found in NamedReLU; module paths: \['c1', 'r1'"):
        apply_with_layers(named, variables, x, capture=["nope"])
    with pytest.raises(ValueError, match=r"output of 'c2' goes into 'sub', not 'relu'"):  # BatchNorm follows c2
        apply_with_layers(fn, variables, x, capture=["c2+relu"])
    with pytest.raises(ValueError, match="not found"):
        apply_with_layers(fn, variables, x, capture=["c9+relu"])
    with pytest.raises(ValueError, match="without"):
        apply_with_layers(fn, variables, x, bypass=["bn+relu"])
    with pytest.raises(ValueError, match="MODULE/PATH"):
        apply_with_layers(fn, variables, x, capture=["bn+"])


class SharedDense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        dense = nn.Dense(3, name="shared")
        return dense(dense(x.reshape(x.shape[0], -1)[:, :3]))


def test_a_layer_that_runs_twice_is_ambiguous():
    model = SharedDense()
    x = jnp.ones((2, 3, 1, 1))
    v = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="called 2 times"):
        apply_with_layers(model, v, x, capture=["shared"])


def _finite_difference_check(loss, params, key, eps=1e-5, directions=3):
    """d loss / d params along random directions: jax.grad vs central differences (float64)."""
    grads = jax.grad(loss)(params)
    leaves, tree = jax.tree.flatten(params)
    for i in range(directions):
        keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
        direction = jax.tree.unflatten(tree, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
        shifted = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)  # noqa: E731
        numeric = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5, atol=1e-9)
    return grads


def test_grad_cam_and_cam_in_a_loss_carry_gradients_to_the_parameters_in_train_mode():
    with jax.enable_x64(True):
        fn, _, _, x, y = _setup()
        x = x.astype(jnp.float64)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), fn.init(jax.random.key(0), x))
        target = jax.random.uniform(jax.random.key(5), (5, 8, 8), jnp.float64)

        def grad_cam_loss(params):  # train mode: BatchNorm on batch statistics, the updated stats discarded
            model = linen_layer(fn, {"params": params, "batch_stats": variables["batch_stats"]}, "bn+relu",
                                train=True, mutable=["batch_stats"])
            maps = grad_cam(model, x, y, score="logit", weighting="plain", normalize=False)
            return jnp.sum((maps - target) ** 2)

        def cam_loss(params):
            maps = linen_class_activation_map(fn, {"params": params, "batch_stats": variables["batch_stats"]}, x, y,
                                              features_layer="bn+relu", classifier="fc", normalize=False,
                                              train=True, mutable=["batch_stats"])
            return jnp.sum((maps - target) ** 2)

        for loss in (grad_cam_loss, cam_loss):
            grads = _finite_difference_check(loss, variables["params"], jax.random.key(9))
            for name in ("c1", "c2", "bn", "fc"):  # every layer below (and the head) gets a gradient
                assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[name])), (loss, name)
