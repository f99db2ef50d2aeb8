"""Excitation Dropout (Bargal 2019, Ch. 5) and the dropout baselines: formula anchors, masks, and the jitted train
step against a slow per-image reference."""

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saliency_jax.models import CNN2
from saliency_jax.saliency import linen_layer, marginal_winning_probability
from saliency_jax.train import init_state, make_train_step
from saliency_jax.training import (SCHEMES, DropoutConfig, apply_dropout_mask, curriculum_retain_probability,
                                   dropout_at_layer, dropout_scheme, layer_excitation, make_dropout_forward,
                                   retain_probability)
from saliency_jax.training.excitation_dropout import adaptive_retain_probability


def eq51(p_eb, P, N):
    """Eq. 5.1 written out in NumPy."""
    return 1.0 - ((1 - P) * (N - 1) * p_eb) / (((1 - P) * N - 1) * p_eb + P)


# ---------------------------------------------------------------------------------------------------------------
# Eq. 5.1


@pytest.mark.parametrize("P,N", [(0.5, 10), (0.5, 2048), (0.25, 100), (0.75, 4096)])
def test_retain_probability_anchor_points(P, N):
    p = np.asarray(retain_probability(jnp.asarray([1.0, 0.0, 1.0 / N], jnp.float32), P, N))
    np.testing.assert_allclose(p, [0.0, 1.0, P], atol=1e-5)


def test_retain_probability_hand_value_and_shape():
    # N = 10, P = 0.5, p_EB = 0.5: 1 - (0.5 * 9 * 0.5) / ((0.5 * 10 - 1) * 0.5 + 0.5) = 1 - 2.25 / 2.5 = 0.1.
    assert float(retain_probability(jnp.float32(0.5), 0.5, 10)) == pytest.approx(0.1, abs=1e-6)
    x = jax.random.uniform(jax.random.key(0), (2, 3, 4))
    p = retain_probability(x, 0.5, 24)
    assert p.shape == (2, 3, 4)
    np.testing.assert_allclose(np.asarray(p), eq51(np.asarray(x, np.float64), 0.5, 24), rtol=1e-5, atol=1e-6)
    # Monotone decreasing in p_EB.
    grid = jnp.linspace(0, 1, 101)
    assert np.all(np.diff(np.asarray(retain_probability(grid, 0.5, 10))) <= 1e-7)


def test_retain_probability_bad_input():
    with pytest.raises(ValueError, match="base_retain"):
        retain_probability(jnp.float32(0.1), 1.5, 10)
    with pytest.raises(ValueError, match="num_units"):
        retain_probability(jnp.float32(0.1), 0.5, 1)
    with pytest.raises(TypeError, match="floating"):
        retain_probability(jnp.asarray([0, 1]), 0.5, 10)


def test_adaptive_is_the_mirror_and_curriculum_schedule():
    N = 10
    p = np.asarray(adaptive_retain_probability(jnp.asarray([0.0, 1.0, 0.1]), 0.5, N))
    np.testing.assert_allclose(p, [0.0, 1.0, 0.5], atol=1e-6)
    assert float(curriculum_retain_probability(0, 0.5)) == pytest.approx(1.0)
    assert float(curriculum_retain_probability(1000, 0.5, 5e-4)) == pytest.approx(0.5 * math.exp(-0.5) + 0.5, 1e-6)
    assert float(curriculum_retain_probability(10 ** 6, 0.5)) == pytest.approx(0.5, abs=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="scheme"):
        DropoutConfig(scheme="gaussian")
    with pytest.raises(ValueError, match="rescale"):
        DropoutConfig(rescale="half")
    with pytest.raises(ValueError, match="base_retain"):
        DropoutConfig(base_retain=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Masks


def _linear_head(num_units=8, num_classes=3, seed=0):
    w = jax.random.normal(jax.random.key(seed), (num_units, num_classes))
    return w, (lambda a: a @ w)


def test_layer_excitation_on_linear_head_by_hand():
    w, head = _linear_head()
    a = jax.random.uniform(jax.random.key(1), (5, 8))
    labels = jnp.asarray([0, 1, 2, 0, 1])
    p = np.asarray(layer_excitation(head, a, labels))
    wp = np.maximum(np.asarray(w), 0)[:, np.asarray(labels)].T  # [5, 8]
    expected = np.asarray(a) * wp / np.sum(np.asarray(a) * wp, axis=1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)


def test_masks_differ_per_image_and_follow_the_drop_rate():
    w, head = _linear_head(num_units=16)
    a = jax.random.uniform(jax.random.key(2), (4, 16))
    labels = jnp.asarray([0, 1, 2, 0])
    cfg = DropoutConfig(scheme="excitation", layer="x")
    keys = jax.random.split(jax.random.key(3), 2000)
    draws = jax.jit(jax.vmap(lambda k: dropout_at_layer(k, a, cfg, head_fn=head, labels=labels)))(keys)
    masks = np.asarray(draws.mask)  # [draws, 4, 16]
    p_eb = np.asarray(draws.p_eb[0])
    expected = eq51(p_eb.astype(np.float64), 0.5, 16)
    np.testing.assert_allclose(masks.mean(0), expected, atol=0.04)  # binomial std <= 0.012
    assert np.mean(np.any(masks[:, 0] != masks[:, 1], axis=-1)) > 0.9  # images get different masks
    # Standard dropout per image: rate 1 - P; one mask per mini-batch: every row the same.
    per_image = jax.vmap(lambda k: dropout_at_layer(k, a, DropoutConfig(scheme="standard_per_image", layer="x")))
    m = np.asarray(per_image(keys[:500]).mask)
    assert m.mean() == pytest.approx(0.5, abs=0.01) and np.any(m[:, 0] != m[:, 1])
    out = dropout_at_layer(keys[0], a, DropoutConfig(scheme="standard", base_retain=0.75, layer="x"))
    assert out.mask.shape == (1, 16)
    # The authors' default for Standard Dropout is Caffe's layer: kept units divided by P.
    np.testing.assert_allclose(np.asarray(out.activations), np.asarray(a) * np.asarray(out.mask) / 0.75, rtol=1e-6)
    m = np.asarray(jax.vmap(lambda k: dropout_at_layer(k, a, DropoutConfig(scheme="standard", base_retain=0.75,
                                                                            layer="x")).mask)(keys))
    assert m.mean() == pytest.approx(0.75, abs=0.01)


def test_rescale_modes_by_hand():
    a = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    m = jnp.asarray([[1.0, 0.0, 1.0, 0.0]])
    r = jnp.asarray([[0.5, 0.5, 0.25, 1.0]])
    np.testing.assert_allclose(apply_dropout_mask(a, m, r, "none"), [[1, 0, 3, 0]])
    np.testing.assert_allclose(apply_dropout_mask(a, m, r, "fraction"), [[2, 0, 6, 0]])
    np.testing.assert_allclose(apply_dropout_mask(a, m, r, "inverted"), [[2, 0, 12, 0]])


def test_default_rescale_is_the_authors_per_scheme():
    # Excitation Dropout's released script (andreazuna89/Excitation-Dropout): per image, the mask's mean is the scale
    # and the kept units are divided by it; the baselines' Caffe Dropout layer divides by the retaining probability.
    a = jax.random.uniform(jax.random.key(0), (4, 16)) + 0.1
    head = lambda h: h[:, :3] * 2.0
    labels = jnp.asarray([0, 1, 2, 0])
    key = jax.random.key(5)
    assert DropoutConfig().rescale == "authors"
    for scheme in ("excitation", "adaptive"):
        out = dropout_at_layer(key, a, DropoutConfig(scheme=scheme, layer="x"), head_fn=head, labels=labels)
        mask = np.asarray(out.mask, np.float64)
        for i in range(4):  # the authors' arithmetic, one image at a time
            scale = mask[i].mean()
            np.testing.assert_allclose(np.asarray(out.activations[i]), mask[i] * np.asarray(a[i]) / scale, rtol=1e-6)
        assert DropoutConfig(scheme=scheme).rescale_rule == "fraction"
    for scheme in ("standard", "standard_per_image", "curriculum"):
        cfg = DropoutConfig(scheme=scheme, layer="x", base_retain=0.6)
        out = dropout_at_layer(key, a, cfg, step=1000)
        retain = np.asarray(out.retain, np.float64)
        np.testing.assert_allclose(np.asarray(out.activations), np.asarray(out.mask) * np.asarray(a) / retain,
                                   rtol=1e-6)
        assert cfg.rescale_rule == "inverted"
    # The thesis's text (no rescaling) is one flag away.
    out = dropout_at_layer(key, a, DropoutConfig(scheme="excitation", layer="x", rescale="none"), head_fn=head,
                           labels=labels)
    np.testing.assert_allclose(np.asarray(out.activations), np.asarray(out.mask) * np.asarray(a), rtol=1e-6)
    with pytest.raises(ValueError, match="rescale_rule"):
        apply_dropout_mask(a, out.mask, out.retain, "authors")


# ---------------------------------------------------------------------------------------------------------------
# Linen forward and the train step


def _tiny():
    model = CNN2(num_classes=3, conv_features=(2, 3, 4), fc_features=(6, 5), init_std=0.5)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    y = jnp.asarray([0, 1, 2, 1])
    variables = model.init(jax.random.key(1), x)
    return model, variables, x, y


def test_ed_train_step_equals_slow_per_image_reference():
    model, variables, x, y = _tiny()
    tx = optax.sgd(1.0)
    state = init_state(model, tx, (8, 8, 3), seed=0, variables=variables)
    key = jax.random.key(7)
    step = jax.jit(make_train_step(model, tx, dropout_scheme(DropoutConfig(scheme="excitation", layer="relu_fc1"))))
    new_state, metrics = step(state, {"image": x, "label": y}, key)

    # The documented key derivation: fold_in(key, step) -> (batch, forward); forward -> (model, mask).
    _, k_dropout = jax.random.split(jax.random.fold_in(key, 0))
    _, k_mask = jax.random.split(k_dropout)
    u = np.asarray(jax.random.uniform(k_mask, (4, 6)))
    params = variables["params"]
    n_units = 6

    def head(p, v):  # fc2 + ReLU + fc3 written out
        h = jax.nn.relu(v @ p["fc2"]["kernel"] + p["fc2"]["bias"])
        return h @ p["fc3"]["kernel"] + p["fc3"]["bias"]

    @jax.jit
    def p_eb_of(xi, yi):  # EB of the whole model split at relu_fc1 (the saliency package's own path)
        return marginal_winning_probability(linen_layer(model, variables, "relu_fc1", train=False), xi, yi)

    @jax.jit
    def loss_and_grad(p, xi, yi, mask):
        def loss_i(p):
            _, a = linen_layer(model, {"params": p}, "relu_fc1", train=False)(xi)
            logits = head(p, a * mask / jnp.mean(mask))  # the authors' per-image scale (the default rescale)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yi)[0]

        return jax.value_and_grad(loss_i)(p)

    grads_sum = jax.tree.map(jnp.zeros_like, params)
    losses = []
    for i in range(4):  # slow reference: one image at a time
        xi, yi = x[i:i + 1], y[i:i + 1]
        p_eb = np.asarray(p_eb_of(xi, yi))[0]
        retain = eq51(np.clip(p_eb, 0, 1).astype(np.float64), 0.5, n_units)
        mask = jnp.asarray((u[i] < retain).astype(np.float32))
        li, gi = loss_and_grad(params, xi, yi, mask)
        losses.append(float(li))
        grads_sum = jax.tree.map(jnp.add, grads_sum, gi)
    expected = jax.tree.map(lambda p, g: p - g / 4, params, grads_sum)
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_trains_in_the_jitted_step(scheme):
    model, variables, x, y = _tiny()
    tx = optax.sgd(0.1)
    state = init_state(model, tx, (8, 8, 3), seed=0, variables=variables)
    config = DropoutConfig(scheme=scheme, layer="relu_fc1", rescale="inverted")
    step = jax.jit(make_train_step(model, tx, dropout_scheme(config)))
    for i in range(2):
        state, metrics = step(state, {"image": x, "label": y}, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"]))
        if scheme != "none":  # the forward's diagnostics reach the step's metrics
            assert 0.0 <= float(metrics["kept_fraction"]) <= 1.0
            assert ("peak_p_eb" in metrics) == (scheme in ("excitation", "adaptive"))
    assert int(state.step) == 2
    assert step._cache_size() == 1  # traced once
    fwd = make_dropout_forward(model, config)
    logits, updates, _ = fwd(variables, x, y, jax.random.key(0), jnp.int32(0))
    assert logits.shape == (4, 3)
    if scheme == "none":
        np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply(variables, x)), rtol=1e-6)
        assert float(updates["dropout"]["mask"].min()) == 1.0


class _WithOwnDropout(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(8, name="fc6")(x))
        x = nn.Dropout(0.5, deterministic=not train, name="drop6")(x)
        return nn.Dense(3, name="fc8")(x)


def test_bypass_and_missing_layer():
    model = _WithOwnDropout()
    x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1))
    y = jnp.asarray([0, 1])
    v = model.init(jax.random.key(1), x)
    fwd = make_dropout_forward(model, DropoutConfig(scheme="none", layer="fc6", bypass=("drop6",)))
    logits, _, _ = fwd(v, x, y, jax.random.key(2), 0)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply(v, x, train=False)), rtol=1e-6)
    bad = make_dropout_forward(model, DropoutConfig(scheme="standard", layer="nope"))
    with pytest.raises(ValueError, match="not found"):
        bad(v, x, y, jax.random.key(2), 0)


def test_p_eb_at_relu_fc1_is_a_distribution_over_live_units():
    # The quantities checked while diagnosing the Excitation arm's collapse at init std 0.01: p_EB at relu_fc1 is a
    # distribution over the *live* units of each image (rows sum to 1, exactly 0 where the ReLU is off), the
    # retaining probabilities are Eq. 5.1 of it, and dead units (p_EB = 0) are always kept.
    model = CNN2(num_classes=3, conv_features=(2, 3, 4), fc_features=(16, 5), init_std=0.5)
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
    y = jnp.asarray([0, 1, 2, 0, 1, 2])
    variables = model.init(jax.random.key(1), x)
    fwd = make_dropout_forward(model, DropoutConfig(scheme="excitation", layer="relu_fc1"))
    _, updates, _ = jax.jit(fwd)(variables, x, y, jax.random.key(2), jnp.int32(0))
    p_eb, retain, mask = (np.asarray(updates["dropout"][k]) for k in ("p_eb", "retain", "mask"))
    _, a = linen_layer(model, variables, "relu_fc1", train=False)(x)
    a = np.asarray(a)
    dead = a <= 0
    assert dead.any() and (~dead).any()  # the tiny net has both live and dead units
    # Reference by hand: EB through fc2 -> ReLU -> fc3 with positive weights, biases ignored.
    p = variables["params"]
    w2, w3 = np.maximum(np.asarray(p["fc2"]["kernel"]), 0), np.maximum(np.asarray(p["fc3"]["kernel"]), 0)
    a2 = np.maximum(a @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"]), 0)
    top = np.eye(3)[np.asarray(y)]  # [6, 3]
    z3 = a2 @ w3
    p2 = a2 * ((top / np.where(z3 > 0, z3, 1)) @ w3.T)
    z2 = a @ w2
    expected = a * ((p2 / np.where(z2 > 0, z2, 1)) @ w2.T)
    np.testing.assert_allclose(p_eb, expected, rtol=1e-4, atol=1e-6)
    reachable = expected.sum(1) > 0
    np.testing.assert_allclose(p_eb.sum(1)[reachable], 1.0, rtol=1e-5)
    assert np.all(p_eb[dead] == 0)
    np.testing.assert_allclose(retain, eq51(np.clip(p_eb, 0, 1).astype(np.float64), 0.5, 16), rtol=1e-5, atol=1e-6)
    assert np.all(mask[dead] == 1)


def test_dropout_experiment_runner_writes_report(tmp_path):
    """The Excitation Dropout comparison through the one runner (the CIFAR-10 config's :runlocal variant on the
    embedded digits): the utilization and compression evaluators write their sections and figures."""
    import importlib.util
    import json

    from saliency_jax import experiment

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments/configs/excitation_dropout_cifar10.py"
    spec = importlib.util.spec_from_file_location("ed_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.dataset.name = "digits"
    config.dataset.data_dir = None
    config.dataset.image_size = 16
    config.dataset.augment = {}
    config.experiment.arms = (config.experiment.arms[1], config.experiment.arms[4])  # standard, excitation
    out = experiment.run_experiment(config, tmp_path, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert "Test accuracy" in report and "utilization" in report.lower() and "compression" in report.lower()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for arm in ("standard", "excitation"):
        acc = metrics["summary"][arm]["utilization"]["test_accuracy"]
        assert 0.0 <= acc <= 1.0
        # Step 0 (the run's initial weights), then every kept checkpoint up to the last step.
        steps = [h["step"] for h in metrics["summary"][arm]["utilization"]["history"]]
        assert steps[0] == 0 and steps[-1] == 6 and steps == sorted(set(steps)) and 3 in steps
    log = [json.loads(line) for line in (tmp_path / "excitation" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert "peak_p_eb" in log[-1] and "kept_fraction" in log[-1]  # scheme metrics reach metrics.jsonl
    assert (tmp_path / "compression.png").stat().st_size > 1000
    assert (tmp_path / "utilization_curves.png").stat().st_size > 1000
    assert out["arms"] == ["standard", "excitation"]
