"""The training-scheme protocol: behaviour unchanged against values recorded before it existed, chaining, the
registry and its settings, the classification losses and label noise."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saliency_jax import data as data_lib
from saliency_jax import train as train_lib
from saliency_jax import training
from saliency_jax.config import default_config
from saliency_jax.models import CNN2, SmallCNN
from saliency_jax.training import (DistractionConfig, DropoutConfig, Forward, ModelLayers, Scheme, chain,
                                   distraction_scheme, dropout_scheme)

REPO = pathlib.Path(__file__).resolve().parents[1]
# Recorded with the code before the protocol (main at f2ec7cc: make_train_step(distraction=, grad_cam_layer=,
# forward=) and train() with config.distraction.enabled / config.dropout): 20 steps of each case, the metrics of
# every step and, per parameter leaf, the sum and sum of squares after the last one.
REFERENCE = json.loads((REPO / "tests" / "data" / "scheme_reference.json").read_text())
LAYERS = ModelLayers(grad_cam_layer="conv3", classifier="fc")


def _common():
    spec = importlib.util.spec_from_file_location("common", REPO / "experiments" / "configs" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(state):
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get((state.params, state.batch_stats)))
    return {jax.tree_util.keystr(p): [float(np.sum(np.asarray(x, np.float64))),
                                      float(np.sum(np.asarray(x, np.float64) ** 2))] for p, x in leaves}


def _assert_stats(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _step_cases():
    small = SmallCNN(10, widths=(4, 8, 8))
    cnn2 = CNN2(10, conv_features=(4, 4, 8), fc_features=(16, 16), init_std=0.05)
    cases = {
        "plain": (small, Scheme(), (16, 16, 1)),
        "distraction": (small, distraction_scheme(DistractionConfig(probability=0.5, fill="random"), LAYERS),
                        (16, 16, 1)),
        "distraction_per_example": (small, distraction_scheme(DistractionConfig(
            probability=0.5, fill="zero", per_example=True, score="logit", weighting="plain"), LAYERS), (16, 16, 1)),
    }
    for s in ("excitation", "standard", "curriculum"):  # recorded without rescaling (the default since: "authors")
        cases[f"dropout_{s}"] = (cnn2, dropout_scheme(DropoutConfig(scheme=s, layer="relu_fc1", rescale="none")),
                                 (16, 16, 3))
    return cases


@pytest.mark.parametrize("name", list(REFERENCE["step"]))
def test_train_step_unchanged_against_the_recorded_reference(name):
    model, scheme, shape = _step_cases()[name]
    optimizer = optax.adam(1e-3)
    state = train_lib.init_state(model, optimizer, shape, 0)
    step = jax.jit(train_lib.make_train_step(model, optimizer, scheme))
    rng = np.random.default_rng(0)
    want = REFERENCE["step"][name]
    for i in range(20):
        batch = {"image": rng.uniform(size=(8, *shape)).astype(np.float32),
                 "label": rng.integers(0, 10, 8).astype(np.int32)}
        state, metrics = step(state, batch, jax.random.key(3))
        ref = want["metrics"][i]
        np.testing.assert_allclose(float(metrics["loss"]), ref["loss"], rtol=1e-5, atol=1e-6, err_msg=f"step {i}")
        assert float(metrics["accuracy"]) == ref["accuracy"]
        assert float(metrics.get("occluded", 0.0)) == ref["occluded"]  # the old step always reported it
    _assert_stats(_stats(state), want["stats"])


def _train_config(name):
    common = _common()
    if name in ("plain", "distraction"):
        c = common.distraction_config()
        c.dataset.image_size = 16
        c.dataset.augment = dict(hflip=True, rotation=10.0, channel_shift=30.0, brightness=(0.5, 1.5))
        c.model.kwargs = {"widths": (4, 8, 8)}
        c.optimizer.learning_rate = 1e-3
        if name == "distraction":
            c.schemes = ("distraction",)
            c.distraction.update(probability=0.5, fill="random")
    else:
        c = common.excitation_dropout_config()
        c.dataset.image_size = 16
        c = common.reduced_dropout_config(c, "runlocal", num_steps=20, log_every=1, checkpoint_every=10)
        c.dropout.rescale = "none"  # the recorded setting (the default since: the authors' per-scheme rescaling)
        if name == "standard_per_image":
            c.dropout.scheme = "standard_per_image"
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 8, 20, 1, 10
    return c


@pytest.mark.parametrize("name", list(REFERENCE["train"]))
def test_train_from_config_unchanged_against_the_recorded_reference(name, tmp_path):
    result = train_lib.train(_train_config(name), tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = REFERENCE["train"][name]
    np.testing.assert_allclose([r["loss"] for r in log], want["loss"], rtol=1e-5, atol=1e-6)
    _assert_stats(_stats(result.state), want["stats"])
    # The scheme's own metrics reach the log (Excitation Dropout's diagnostics used to be dropped).
    expected = {"plain": set(), "distraction": {"occluded", "distraction_degenerate_maps"},
                "excitation_dropout": {"kept_fraction", "retain_probability", "peak_p_eb"},
                "standard_per_image": {"kept_fraction", "retain_probability"}}[name]
    assert set(log[-1]) == {"step", "loss", "accuracy"} | expected
    # What evaluators need, from train() itself.
    assert result.image_shape == (16, 16, 1)  # the embedded digits
    assert result.num_classes == 10 and result.checkpoint_steps()[-1] == 20
    restored = result.restore(20)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------------------------
# Chaining.


def _loss_term(name, scale, layer="conv3"):
    """A loss term reading a layer of the training forward: scale * mean(activation) per example."""

    def loss(ctx, batch, forward):
        a = forward.activations[layer]
        per_example = scale * jnp.mean(a.reshape(a.shape[0], -1), axis=-1)
        return per_example, {name: jnp.mean(per_example)}

    return Scheme(loss=loss, layers=(layer,))


def _tiny_state():
    model = SmallCNN(10, widths=(4, 8, 8))
    optimizer = optax.sgd(0.1)
    state = train_lib.init_state(model, optimizer, (16, 16, 1), 0)
    rng = np.random.default_rng(1)
    batch = {"image": rng.uniform(size=(8, 16, 16, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}
    return model, optimizer, state, batch


def test_chain_adds_loss_terms_from_the_training_forward_and_composes_with_a_batch_transform():
    model, optimizer, state, batch = _tiny_state()
    occlude_all = distraction_scheme(DistractionConfig(probability=1.0), LAYERS)
    scheme = chain(occlude_all, _loss_term("term_a", 1.0), _loss_term("term_b", 2.0))
    _, metrics = jax.jit(train_lib.make_train_step(model, optimizer, scheme))(state, batch, jax.random.key(0))
    assert float(metrics["occluded"]) == 1.0
    # loss = CE + 3 * mean(conv3) on the occluded batch, in the same forward pass (train mode).
    np.testing.assert_allclose(float(metrics["term_b"]), 2 * float(metrics["term_a"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(metrics["classification_loss"]) + 3 * float(metrics["term_a"]), rtol=1e-6)
    # A classification weight scales the cross-entropy in the total (w_a * CE + terms).
    weighted = jax.jit(train_lib.make_train_step(model, optimizer, scheme, classification_weight=0.5))
    _, m2 = weighted(state, batch, jax.random.key(0))
    np.testing.assert_allclose(float(m2["loss"]), 0.5 * float(metrics["classification_loss"]) +
                               3 * float(metrics["term_a"]), rtol=1e-6)
    # The loss term's gradient reaches the parameters: with it, the update differs from CE alone.
    plain = jax.jit(train_lib.make_train_step(model, optimizer, occlude_all))
    with_term = jax.jit(train_lib.make_train_step(model, optimizer, chain(occlude_all, _loss_term("t", 10.0))))
    a, _ = plain(state, batch, jax.random.key(0))
    b, _ = with_term(state, batch, jax.random.key(0))
    assert not np.allclose(np.asarray(a.params["conv1"]["conv"]["kernel"]),
                           np.asarray(b.params["conv1"]["conv"]["kernel"]))


def test_chain_rejects_two_forwards_and_clashing_metrics():
    forward = Scheme(forward=lambda ctx, batch, capture: training.model_forward(ctx, batch, capture))
    with pytest.raises(ValueError, match="at most one"):
        chain(forward, forward)
    model, optimizer, state, batch = _tiny_state()
    step = train_lib.make_train_step(model, optimizer, chain(_loss_term("same", 1.0), _loss_term("same", 2.0)))
    with pytest.raises(ValueError, match="'same'"):
        step(state, batch, jax.random.key(0))
    step = train_lib.make_train_step(model, optimizer, _loss_term("loss", 1.0))  # the step's own metric
    with pytest.raises(ValueError, match="'loss'"):
        step(state, batch, jax.random.key(0))


def test_a_single_scheme_sees_the_steps_keys_unchanged():
    seen = {}

    def transform(ctx, batch):
        seen["batch"] = ctx.key
        return batch, {}

    def forward(ctx, batch, capture):
        seen["forward"] = ctx.key
        return training.model_forward(ctx, batch, capture)

    model, optimizer, state, batch = _tiny_state()
    train_lib.make_train_step(model, optimizer, Scheme(batch_transform=transform, forward=forward))(
        state, batch, jax.random.key(4))
    k_batch, k_forward = jax.random.split(jax.random.fold_in(jax.random.key(4), 0))
    assert jnp.array_equal(jax.random.key_data(seen["batch"]), jax.random.key_data(k_batch))
    assert jnp.array_equal(jax.random.key_data(seen["forward"]), jax.random.key_data(k_forward))


# ---------------------------------------------------------------------------------------------------------------
# The registry and settings.


def test_build_scheme_from_config_and_its_errors():
    c = default_config()
    assert training.build_scheme(c, LAYERS) == Scheme()
    c.schemes = ("distraction",)
    with pytest.raises(ValueError, match="no section config.distraction"):
        training.build_scheme(c, LAYERS)
    c.distraction = training.settings_section("distraction", fill="one")
    assert training.build_scheme(c, LAYERS).batch_transform is not None
    c.distraction.fil = "zero"  # a typo
    with pytest.raises(ValueError, match=r"config.distraction: DistractionConfig has no field 'fil'; did you mean "
                                         r"\['fill'\]"):
        training.build_scheme(c, LAYERS)
    del c.distraction["fil"]
    c.distraction.probability = 1.5
    with pytest.raises(ValueError, match="probability"):
        training.build_scheme(c, LAYERS)
    c.distraction.probability = 0.5
    c.schemes = ("distraction,distractoin",)  # --config.schemes=distraction,distractoin gives this
    with pytest.raises(ValueError, match=r"unknown training scheme 'distractoin'; did you mean \['distraction'\]"):
        training.build_scheme(c, LAYERS)
    with pytest.raises(ValueError, match="no field"):
        training.settings_section("dropout", layr="relu_fc1")
    assert set(training.scheme_names()) >= {"distraction", "dropout"}


def test_dropout_none_without_bypass_is_plain_training():
    assert dropout_scheme(DropoutConfig(scheme="none")) == Scheme()
    assert dropout_scheme(DropoutConfig(scheme="none", bypass=("drop6",))).forward is not None


def test_model_layers_default_to_the_architecture_and_can_be_overridden():
    c = default_config()
    assert train_lib.model_layers(c) == ModelLayers("conv3", "fc")
    c.model.name, c.model.grad_cam_layer = "resnet50", "layer3"
    assert train_lib.model_layers(c) == ModelLayers("layer3", "fc")
    c.model.name, c.model.grad_cam_layer = "mine", None
    with pytest.raises(ValueError, match="no default layers"):
        train_lib.model_layers(c)


# ---------------------------------------------------------------------------------------------------------------
# Classification losses.


def test_sigmoid_binary_cross_entropy_for_multi_label_attributes():
    model, optimizer, state, batch = _tiny_state()
    labels = (np.random.default_rng(2).uniform(size=(8, 10)) > 0.5).astype(np.int32)
    batch = {**batch, "label": labels}
    step = jax.jit(train_lib.make_train_step(model, optimizer, loss="sigmoid_binary_cross_entropy"))
    _, metrics = step(state, batch, jax.random.key(0))
    logits, _ = model.apply(state.variables(), batch["image"], train=True, mutable=["batch_stats"])
    z, y = np.asarray(logits, np.float64), labels.astype(np.float64)
    bce = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))  # mean over attributes and examples
    np.testing.assert_allclose(float(metrics["loss"]), bce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean((z > 0) == (y > 0.5)), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown classification loss"):
        train_lib.make_train_step(model, optimizer, loss="hinge")
    with pytest.raises(ValueError, match="integer labels"):
        train_lib.make_train_step(model, optimizer)(state, batch, jax.random.key(0))
    train_lib.check_batch({"image": batch["image"], "label": labels}, 10, multi_label=True)
    with pytest.raises(ValueError, match="0 or 1"):
        train_lib.check_batch({"image": batch["image"], "label": 2 * labels}, 10, multi_label=True)


# ---------------------------------------------------------------------------------------------------------------
# Label noise.


def test_symmetric_label_noise():
    labels = np.random.default_rng(0).integers(0, 10, 20_000)
    noisy = data_lib.symmetric_label_noise(labels, 0.2, 10, seed=3)
    flipped = noisy != labels
    assert abs(flipped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / labels.size)
    # A flipped label is uniform over the 9 other classes.
    offsets = np.bincount((noisy[flipped] - labels[flipped]) % 10, minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() > 0.8 * offsets[1:].mean()
    np.testing.assert_array_equal(noisy, data_lib.symmetric_label_noise(labels, 0.2, 10, seed=3))
    np.testing.assert_array_equal(data_lib.symmetric_label_noise(labels, 0.0, 10), labels)
    with pytest.raises(ValueError, match="rate"):
        data_lib.symmetric_label_noise(labels, 1.5, 10)


def test_label_noise_is_a_pipeline_option_of_every_run():
    c = default_config()
    c.dataset.label_noise = 0.3
    train_source, train_idx, val_idx, test_source = train_lib.load_sources(c)
    clean = data_lib.get_source("digits", "train", image_size=32)
    noisy_labels = np.array([int(train_source[i]["label"]) for i in range(len(train_source))])
    assert 0.2 < np.mean(noisy_labels != clean.labels) < 0.4
    np.testing.assert_array_equal(train_source[5]["image"], clean[5]["image"])
    assert train_source.num_classes == 10 and test_source.labels.tolist() == data_lib.get_source(
        "digits", "test", image_size=32).labels.tolist()  # the test split stays clean
