"""The HNC loss (Sun et al., ECCV 2020): CAMs, negatives, both variants, gradients, errors, its evaluators and the
comparison through the runner."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saliency_jax import train as train_lib
from saliency_jax.evaluators.classification import fgsm_images
from saliency_jax.models import CNN2, SmallCNN
from saliency_jax.saliency import apply_with_layers, class_activation_maps, classifier_params
from saliency_jax.training import (Forward, HNCConfig, ModelLayers, StepContext, hard_negative_classes, hnc_loss,
                                   hnc_scheme)
from saliency_jax.training.hnc import negative_cams

REPO = pathlib.Path(__file__).resolve().parents[1]


def _small():
    model = SmallCNN(10, widths=(4, 8, 8))
    x = jax.random.uniform(jax.random.key(0), (6, 16, 16, 1))
    y = jnp.array([0, 1, 2, 3, 4, 5])
    variables = model.init(jax.random.key(1), x)
    return model, variables, x, y


def test_spatial_mean_of_every_cam_is_the_logit():
    model, variables, x, _ = _small()
    out = apply_with_layers(model, variables, x, capture=["conv3"], train=False)
    kernel, bias = classifier_params(variables, "fc")
    classes = jnp.tile(jnp.arange(10), (6, 1))
    cams = class_activation_maps(out.activations["conv3"], kernel, bias, classes)
    assert cams.shape == (6, 10, 4, 4)
    np.testing.assert_allclose(np.asarray(cams.mean(axis=(2, 3))), np.asarray(out.output), rtol=1e-5, atol=1e-6)


def test_negatives_are_the_top_scores_without_the_label():
    scores = jnp.array([[5.0, 4.0, 3.0, 2.0], [0.0, 1.0, 9.0, 2.0]])
    labels = jnp.array([0, 3])
    np.testing.assert_array_equal(np.asarray(hard_negative_classes(scores, labels, 2)), [[1, 2], [2, 1]])
    # The label is excluded even when it scores highest, for any k up to num_classes - 1.
    neg = np.asarray(hard_negative_classes(scores, jnp.array([0, 2]), 3))
    assert 0 not in neg[0] and 2 not in neg[1] and sorted(neg[0]) == [1, 2, 3]
    random_scores = jax.random.normal(jax.random.key(0), (64, 10))
    random_labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    neg = np.asarray(hard_negative_classes(random_scores, random_labels, 9))
    assert not np.any(neg == np.asarray(random_labels)[:, None])
    with pytest.raises(ValueError, match=r"\[1, 4\)"):
        hard_negative_classes(scores, labels, 4)


def test_hnc_variants_hand_values_and_the_kd_minimum():
    cams = jnp.array([[[[1.0, -1.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]]])  # [1, k=2, 2, 2]
    np.testing.assert_allclose(float(hnc_loss(cams, "mse")[0]), (1 + 1 + 4 + 0 + 0 + 0 + 0 + 9) / 8, rtol=1e-6)
    # kd on a constant map: log(h w) per class, its minimum.
    flat = jnp.full((3, 5, 4, 4), 2.5)
    np.testing.assert_allclose(np.asarray(hnc_loss(flat, "kd")), 5 * np.log(16), rtol=1e-6)
    peaked = flat.at[:, :, 0, 0].add(3.0)
    assert np.all(np.asarray(hnc_loss(peaked, "kd")) > 5 * np.log(16) + 1e-3)
    # kd by hand: -1/(hw) sum log softmax.
    x = np.array([1.0, -1.0, 2.0, 0.0])
    expected = -np.mean(x - np.log(np.sum(np.exp(x)))) + -np.mean(np.array([0, 0, 0, 3.0]) - np.log(3 + np.exp(3)))
    np.testing.assert_allclose(float(hnc_loss(cams, "kd")[0]), expected, rtol=1e-6)
    # temperature divides the maps
    np.testing.assert_allclose(float(hnc_loss(cams, "kd", 2.0)[0]), float(hnc_loss(cams / 2, "kd")[0]), rtol=1e-6)


@pytest.mark.parametrize("variant", ["mse", "kd"])
def test_hnc_term_gradient_reaches_the_parameters(variant):
    with jax.enable_x64(True):
        model, variables, x, y = _small()
        x = x.astype(jnp.float64)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(1), x))
        scheme = hnc_scheme(HNCConfig(variant=variant, num_negatives=3), ModelLayers("conv3", "fc"))

        def term(params):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            out = apply_with_layers(model, v, x, capture=["conv3"], train=True, mutable=["batch_stats"])
            fwd = Forward(out.output[0], out.output[1], out.activations, {})
            ctx = StepContext(model, v, jnp.int32(0), jax.random.key(0))
            return jnp.sum(scheme.loss(ctx, {"image": x, "label": y}, fwd)[0])

        params = variables["params"]
        grads = jax.jit(jax.grad(term))(params)
        direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape, p.dtype), params)
        eps = 1e-6
        jitted = jax.jit(term)
        numeric = (jitted(jax.tree.map(lambda p, d: p + eps * d, params, direction)) -
                   jitted(jax.tree.map(lambda p, d: p - eps * d, params, direction))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5)
        for name in ("conv1", "conv3", "fc"):
            assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[name])), name


def test_hnc_in_the_train_step_reports_its_metrics_and_weight():
    model, variables, x, y = _small()
    tx = optax.sgd(0.0)
    state = train_lib.init_state(model, tx, (16, 16, 1), 0, variables=variables)
    batch = {"image": x, "label": y}
    for variant, weight in (("mse", 0.07), ("kd", 0.0065)):
        step = jax.jit(train_lib.make_train_step(model, tx, hnc_scheme(HNCConfig(variant=variant),
                                                                       ModelLayers("conv3", "fc"))))
        _, m = step(state, batch, jax.random.key(0))
        np.testing.assert_allclose(float(m["loss"]), float(m["classification_loss"]) + weight * float(m["hnc"]),
                                   rtol=1e-5)
        assert float(m["negative_cam_peak"]) != 0.0
    assert HNCConfig(variant="kd", weight=0.0048).weight == 0.0048 and HNCConfig(variant="kd").weight == 0.0065
    with pytest.raises(ValueError, match="variant"):
        HNCConfig(variant="l1")


def test_a_model_without_a_gap_dense_head_gets_a_clear_error():
    model = CNN2(10, conv_features=(2, 3, 4), fc_features=(6, 5))  # flattens the last block into fc1
    x = jnp.ones((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    step = train_lib.make_train_step(model, optax.sgd(0.1), hnc_scheme(HNCConfig(), ModelLayers("relu_conv3", "fc3")))
    state = train_lib.init_state(model, optax.sgd(0.1), (8, 8, 3), 0, variables=variables)
    with pytest.raises(ValueError, match="dense classifier on the globally average-pooled features"):
        step(state, {"image": x, "label": jnp.array([0, 1])}, jax.random.key(0))
    step = train_lib.make_train_step(model, optax.sgd(0.1), hnc_scheme(HNCConfig(), ModelLayers("relu_fc2", "fc3")))
    with pytest.raises(ValueError, match="spatial output"):
        step(state, {"image": x, "label": jnp.array([0, 1])}, jax.random.key(0))
    model, variables, x, y = _small()
    with pytest.raises(ValueError, match="no parameters at classifier path 'head'"):
        negative_cams(jnp.ones((6, 4, 4, 8)), variables["params"], "head", jnp.ones((6, 10)), y, 3)


def test_fgsm_moves_each_pixel_by_epsilon_against_the_label():
    w = jnp.array([[1.0, -1.0], [-2.0, 2.0], [0.5, 0.5], [0.0, 0.0]])  # 4 pixels -> 2 classes
    logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w  # noqa: E731
    x = jnp.full((1, 2, 2, 1), 0.5)
    adv = fgsm_images(logits_fn, x, jnp.array([0]), 0.1)
    # d CE / d x = w @ (softmax - onehot(0)) has the sign of -(w[:, 0] - w[:, 1]); a zero gradient moves nothing.
    np.testing.assert_allclose(np.asarray(adv).reshape(-1), [0.4, 0.6, 0.5, 0.5], rtol=1e-6)
    assert float(fgsm_images(logits_fn, jnp.ones((1, 2, 2, 1)), jnp.array([1]), 0.1).max()) <= 1.0  # clipped


def test_hnc_comparison_runs_through_the_runner(tmp_path):
    from saliency_jax.experiment import run_experiment

    spec = importlib.util.spec_from_file_location("hnc_cifar10", REPO / "experiments/configs/hnc_cifar10.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    out = run_experiment(config, tmp_path, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert "Negative class activation maps" in report and "Robustness to FGSM" in report
    assert "| CE+HNC-kd | hnc (variant=kd, weight=0.0065, num_negatives=100" in report
    assert "dataset.label_noise=0.2" in report
    summary = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    for arm in out["arms"]:
        fgsm = summary[arm]["fgsm"]["accuracy"]
        assert sorted(fgsm) == ["0.00000", "0.00392", "0.00784", "0.01569", "0.03137"]
        assert all(0 <= v <= 1 for v in fgsm.values())
        assert 0 <= summary[arm]["classification"]["accuracy"] <= 1 and summary[arm]["negative_cams"]["peak"] != 0
    log = [json.loads(line) for line in (tmp_path / "CE+HNC-kd" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert "hnc" in log[-1] and "negative_cam_peak" in log[-1]
    # The noise arm trained on relabelled data: its config says so.
    noisy = json.loads((tmp_path / "CE+HNC-mse, 20% noise" / "seed0" / "config.json").read_text())
    assert noisy["dataset"]["label_noise"] == 0.2
