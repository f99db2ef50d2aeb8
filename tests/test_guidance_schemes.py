"""Attention guidance and RRR as training schemes: in the jitted (and sharded) train step, the terms equal the pure
functions, the update equals an independent gradient of the whole loss (second order included); the data sources
through ``get_source``; the evaluators against hand-computed values; the Decoy MNIST and CelebA configs end to end."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from saliency_jax import data as data_lib
from saliency_jax import training
from saliency_jax.data import celeba, decoy_mnist, regions
from saliency_jax.evaluators import ExperimentData, build_evaluators
from saliency_jax.evaluators.attention_guidance import region_masses
from saliency_jax.experiment import run_experiment
from saliency_jax.models import CNN2
from saliency_jax.saliency import linen_layer
from saliency_jax.train import init_state, make_train_step
from saliency_jax.training import ModelLayers
from saliency_jax.training import attention_guidance as ag

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_guidance_data import ATTRIBUTES_40, make_celeba, make_mnist  # noqa: E402  (generated files)

LAYERS = ModelLayers("relu_conv3", "fc3")


def tiny_cnn2(num_classes=4):
    return CNN2(num_classes, conv_features=(3, 4, 4), fc_features=(6, 5), init_std=0.3)


def toy_batch(n=4, size=12, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    region = np.zeros((n, size, size), np.float32)
    region[:, 3:9, 2:8] = 1.0
    wrong = np.zeros((n, size, size), np.float32)
    wrong[:, :3, -3:] = 1.0
    return {"image": jnp.asarray(rng.uniform(size=(n, size, size, 1)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, num_classes, n), jnp.int32),
            "region": jnp.asarray(region), "wrong_region": jnp.asarray(wrong)}


def sgd_update(model, scheme, batch, classification_weight=1.0):
    """(old params, new params, metrics) of one jitted step with SGD at learning rate 1 (update = -gradient)."""
    opt = optax.sgd(1.0, momentum=None)
    state = init_state(model, opt, batch["image"].shape[1:], 0)
    step = jax.jit(make_train_step(model, opt, scheme, classification_weight=classification_weight))
    new, metrics = step(state, batch, jax.random.key(0))
    return state.params, new.params, metrics


def assert_trees_close(a, b, rtol=2e-4, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------------
# The schemes in the train step.


def test_attention_guidance_step_equals_independent_gradient_of_the_whole_loss():
    model, batch = tiny_cnn2(), toy_batch()
    w_a, w_g = 0.7, 2.5
    scheme = ag.attention_guidance_scheme(ag.GuidanceConfig(w_g=w_g), LAYERS)
    params, new, metrics = sgd_update(model, scheme, batch, classification_weight=w_a)

    def total(p):  # written from the pure functions, outside the train loop
        logits = model.apply({"params": p}, batch["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        loss_g = ag.guidance_loss(linen_layer(model, {"params": p}, "relu_conv3", train=False), batch["image"],
                                  batch["label"], batch["region"])
        return jnp.mean(w_a * ce + w_g * loss_g), loss_g

    (value, loss_g), grads = jax.value_and_grad(total, has_aux=True)(params)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["guidance_loss"], jnp.mean(loss_g), rtol=1e-5)
    assert float(jnp.mean(loss_g)) > 0.05
    assert_trees_close(jax.tree.map(lambda p, q: p - q, params, new), grads)
    # The guidance term reaches the classifier's kernel only through Grad-CAM's weights (second order): its share
    # of the update is not zero, and the bias (which does not change dz/dA) gets none of it.
    g_only = jax.grad(lambda p: total(p)[0] - jnp.mean(w_a * optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, batch["image"]), batch["label"])))(params)
    assert np.abs(g_only["fc3"]["kernel"]).max() > 1e-6
    np.testing.assert_allclose(g_only["fc3"]["bias"], 0.0, atol=1e-7)
    maps = ag.guidance_maps(linen_layer(model, {"params": params}, "relu_conv3", train=False), batch["image"],
                            batch["label"])
    np.testing.assert_allclose(metrics["grad_cam_mass_in_region"],
                               jnp.mean(ag.region_mass_fraction(maps, batch["region"])), rtol=1e-5)


def test_rrr_step_equals_independent_gradient_and_reports_its_terms():
    model, batch = tiny_cnn2(), toy_batch()
    config = ag.RRRConfig(lambda1=50.0, pixel_scale=1.0, region_mass_metric=True)
    params, new, metrics = sgd_update(model, ag.rrr_scheme(config, LAYERS), batch)

    def total(p):
        logits_fn = lambda x: model.apply({"params": p}, x)  # noqa: E731
        ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(batch["image"]), batch["label"])
        penalty = ag.rrr_penalty(logits_fn, batch["image"], batch["wrong_region"], lambda1=50.0, pixel_scale=1.0)
        return jnp.mean(ce + penalty), penalty

    (value, penalty), grads = jax.value_and_grad(total, has_aux=True)(params)
    assert float(jnp.mean(penalty)) > 1e-4
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["rrr_penalty"], jnp.mean(penalty), rtol=1e-5)
    assert_trees_close(jax.tree.map(lambda p, q: p - q, params, new), grads)
    # Input-gradient energy inside A, by hand.
    g = ag.input_gradients(lambda x: model.apply({"params": params}, x), batch["image"])
    e = np.asarray(g[..., 0]) ** 2
    want = np.mean((e * np.asarray(batch["wrong_region"])).sum((1, 2)) / e.sum((1, 2)))
    np.testing.assert_allclose(metrics["input_gradient_mass_in_wrong_region"], want, rtol=1e-4)
    assert 0 <= float(metrics["grad_cam_mass_in_region"]) <= 1


def test_multilabel_guidance_in_the_step_equals_the_pure_function():
    model = tiny_cnn2(num_classes=3)
    batch = toy_batch(n=4)
    labels = jnp.asarray([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 1]], jnp.int32)
    region = jnp.stack([batch["region"], 1.0 - batch["region"]], axis=1)  # two guided attributes: 0 and 2
    batch = {"image": batch["image"], "label": labels, "region": region}
    scheme = ag.attention_guidance_scheme(ag.GuidanceConfig(w_g=1.0, attributes=(0, 2)), LAYERS)
    opt = optax.sgd(1.0, momentum=None)
    state = init_state(model, opt, (12, 12, 1), 0)
    step = jax.jit(make_train_step(model, opt, scheme, loss="sigmoid_binary_cross_entropy"))
    new, metrics = step(state, batch, jax.random.key(0))
    layer_model = linen_layer(model, {"params": state.params}, "relu_conv3", train=False)
    want = ag.multilabel_guidance_loss(layer_model, batch["image"], labels, region, attributes=(0, 2))
    np.testing.assert_allclose(metrics["guidance_loss"], jnp.mean(want), rtol=1e-5)
    assert float(want[1]) == 0.0  # no guided attribute present
    assert np.isfinite(float(metrics["grad_cam_mass_in_region"]))
    assert not np.allclose(np.asarray(new.params["fc3"]["kernel"]), np.asarray(state.params["fc3"]["kernel"]))


def test_start_step_trains_plain_then_guided():
    """With start_step = 1: step 0 is the plain step (no map, metrics 0), step 1 the guided one."""
    model, batch = tiny_cnn2(), toy_batch()
    opt = optax.sgd(0.5, momentum=None)
    state = init_state(model, opt, (12, 12, 1), 0)
    delayed = jax.jit(make_train_step(model, opt, ag.attention_guidance_scheme(
        ag.GuidanceConfig(start_step=1), LAYERS)))
    plain = jax.jit(make_train_step(model, opt, training.Scheme()))
    guided = jax.jit(make_train_step(model, opt, ag.attention_guidance_scheme(ag.GuidanceConfig(), LAYERS)))
    s1, m1 = delayed(state, batch, jax.random.key(0))
    p1, _ = plain(state, batch, jax.random.key(0))
    assert float(m1["guidance_loss"]) == 0.0 and float(m1["grad_cam_mass_in_region"]) == 0.0
    assert_trees_close(s1.params, p1.params, rtol=1e-6)
    s2, m2 = delayed(s1, batch, jax.random.key(0))
    g2, mg = guided(s1, batch, jax.random.key(0))
    assert float(m2["guidance_loss"]) > 0
    np.testing.assert_allclose(m2["guidance_loss"], mg["guidance_loss"], rtol=1e-6)
    assert_trees_close(s2.params, g2.params, rtol=1e-5)


def test_hirescam_maps_hand_computed():
    """HiResCAM on a linear head z_c = sum_{h,w,k} W[h,w,k,c] A[h,w,k]: the gradient is W[..., c], so the map is
    ReLU(sum_k W[h,w,k,c] A[h,w,k]), then min-max normalised (no resize: the layer has the image's size)."""
    from saliency_jax.saliency import split_layer

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4, 2, 3)).astype(np.float32)
    x = rng.uniform(size=(2, 4, 4, 2)).astype(np.float32)
    model = split_layer(lambda im: im, lambda a: jnp.einsum("bhwk,hwkc->bc", a, jnp.asarray(w)))
    got = ag.guidance_maps(model, jnp.asarray(x), jnp.asarray([0, 2]), weighting="hirescam")
    for i, c in enumerate([0, 2]):
        cam = np.maximum(np.einsum("hwk,hwk->hw", x[i], w[..., c]), 0)
        np.testing.assert_allclose(got[i], (cam - cam.min()) / (cam.max() - cam.min()), rtol=1e-5, atol=1e-6)
    # Grad-CAM's averaged weights give another map here (the head is not a global average pool).
    assert not np.allclose(got, ag.guidance_maps(model, jnp.asarray(x), jnp.asarray([0, 2])), atol=1e-3)


def test_gradient_x_activation_and_input_maps_hand_computed():
    """On a linear head z_c = sum_{h,w,k} W[h,w,k,c] A[h,w,k] the gradient is W[..., c]: gradient x activation is
    |sum_k W A| (HiResCAM its positive part); at the input it is |sum_k W x| (gradient x input)."""
    from saliency_jax.saliency import split_layer

    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 4, 2, 3)).astype(np.float32)
    x = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
    head = lambda a: jnp.einsum("bhwk,hwkc->bc", a, jnp.asarray(w))  # noqa: E731
    targets = jnp.asarray([1, 2])
    contributions = np.stack([np.einsum("hwk,hwk->hw", x[i], w[..., c]) for i, c in enumerate([1, 2])])
    assert (contributions < 0).any() and (contributions > 0).any()
    split = split_layer(lambda im: im, head)
    raw = ag.raw_guidance_maps(split, jnp.asarray(x), targets, weighting="gradient_x_activation")
    np.testing.assert_allclose(raw, np.abs(contributions), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ag.raw_guidance_maps(split, jnp.asarray(x), targets, weighting="hirescam"),
                               np.maximum(contributions, 0), rtol=1e-5, atol=1e-6)
    at_input = ag.input_layer_model(head)
    np.testing.assert_allclose(ag.raw_guidance_maps(at_input, jnp.asarray(x), targets,
                                                    weighting="gradient_x_activation"),
                               np.abs(contributions), rtol=1e-5, atol=1e-6)
    a = np.abs(contributions)
    want = (a - a.min((1, 2), keepdims=True)) / (a.max((1, 2), keepdims=True) - a.min((1, 2), keepdims=True))
    np.testing.assert_allclose(ag.guidance_maps(at_input, jnp.asarray(x), targets, weighting="gradient_x_activation"),
                               want, rtol=1e-5, atol=1e-6)
    # Grad-CAM's raw map is grad_cam's without resize and normalisation.
    from saliency_jax.saliency import grad_cam
    np.testing.assert_allclose(ag.raw_guidance_maps(split, jnp.asarray(x), targets),
                               grad_cam(split, jnp.asarray(x), targets, resize=False, normalize=False), rtol=1e-6)
    with pytest.raises(ValueError, match="weighting must be one of"):
        ag.raw_guidance_maps(split, jnp.asarray(x), targets, weighting="gradcam")


@pytest.mark.parametrize("layer,weighting", [("relu_conv1", "gradient_x_activation"), ("relu_conv2", "plain"),
                                             ("input", "gradient_x_activation")])
def test_guidance_at_another_layer_equals_independent_gradient(layer, weighting):
    """GuidanceConfig.layer / weighting: the step's update is the gradient of the loss written from the pure
    functions with the map at that layer (the input: input_layer_model) - second order included."""
    model, batch = tiny_cnn2(), toy_batch()
    scheme = ag.attention_guidance_scheme(ag.GuidanceConfig(w_g=2.0, layer=layer, weighting=weighting), LAYERS)
    assert scheme.maps == (() if layer == "input" else (layer,))
    params, new, metrics = sgd_update(model, scheme, batch)

    def total(p):
        v = {"params": p}
        lm = (ag.input_layer_model(lambda x: model.apply(v, x)) if layer == "input"
              else linen_layer(model, v, layer, train=False))
        ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(v, batch["image"]), batch["label"])
        loss_g = ag.guidance_loss(lm, batch["image"], batch["label"], batch["region"], weighting=weighting)
        return jnp.mean(ce + 2.0 * loss_g), loss_g

    (value, loss_g), grads = jax.value_and_grad(total, has_aux=True)(params)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["guidance_loss"], jnp.mean(loss_g), rtol=1e-5)
    assert_trees_close(jax.tree.map(lambda p, q: p - q, params, new), grads)
    # Another layer gives another loss than the poster's (Grad-CAM at relu_conv3).
    poster = ag.guidance_loss(linen_layer(model, {"params": params}, "relu_conv3", train=False), batch["image"],
                              batch["label"], batch["region"])
    assert not np.isclose(float(jnp.mean(poster)), float(metrics["guidance_loss"]), rtol=1e-3)


def test_guidance_layer_and_weighting_settings():
    assert ag.GuidanceConfig().layer is None and ag.GuidanceConfig().weighting == "plain"
    assert ag.GuidanceConfig.from_mapping({"layer": "input", "weighting": "gradient_x_activation"}).layer == "input"
    with pytest.raises(ValueError, match="layer must be None"):
        ag.GuidanceConfig(layer="")
    with pytest.raises(ValueError, match="weighting must be one of"):
        ag.GuidanceConfig(weighting="gradxact")
    with pytest.raises(ValueError, match="names no Grad-CAM layer"):
        ag.attention_guidance_scheme(ag.GuidanceConfig(), ModelLayers(None, None))
    # An unknown layer path: named when the step is traced.
    model, batch = tiny_cnn2(), toy_batch()
    opt = optax.sgd(1.0)
    step = make_train_step(model, opt, ag.attention_guidance_scheme(ag.GuidanceConfig(layer="relu_conv9"), LAYERS))
    with pytest.raises(ValueError, match="relu_conv9"):
        jax.jit(step)(init_state(model, opt, (12, 12, 1), 0), batch, jax.random.key(0))


def test_cnn2_gap_head_grad_cam_equals_hirescam():
    """head="gap": relu_conv3 averaged over its positions feeds fc1, so every position gets the same gradient and
    Grad-CAM there is HiResCAM; the flatten head (the default) gives different maps."""
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 12, 12, 1)), jnp.float32)
    targets = jnp.asarray([0, 1, 3])
    maps = {}
    for head in ("gap", "flatten"):
        model = CNN2(4, conv_features=(3, 4, 4), fc_features=(6, 5), init_std=0.3, head=head)
        variables = model.init(jax.random.key(0), x)
        assert model.apply(variables, x).shape == (3, 4)
        lm = linen_layer(model, variables, "relu_conv3", train=False)
        maps[head] = [ag.raw_guidance_maps(lm, x, targets, weighting=w) for w in ("plain", "hirescam")]
        assert maps[head][0].shape == (3, 3, 3)
    assert float(jnp.max(maps["gap"][1])) > 0
    np.testing.assert_allclose(maps["gap"][0], maps["gap"][1], rtol=1e-4, atol=1e-7)
    assert not np.allclose(maps["flatten"][0], maps["flatten"][1], atol=1e-4)
    with pytest.raises(ValueError, match="head must be"):
        CNN2(4, conv_features=(3, 4, 4), fc_features=(6, 5), head="avg").init(jax.random.key(0), x)


def test_scheme_settings_and_errors():
    c = ml_collections.ConfigDict({"schemes": ("attention_guidance",),
                                   "attention_guidance": training.settings_section("attention_guidance")})
    scheme = training.build_scheme(c, LAYERS)
    assert scheme.loss is not None and scheme.forward is None and scheme.batch_transform is None
    c.attention_guidance.w_a = 1.0
    with pytest.raises(ValueError, match="classification_weight"):
        training.build_scheme(c, LAYERS)
    with pytest.raises(ValueError, match="mode"):
        ag.GuidanceConfig(mode="eval")
    with pytest.raises(ValueError, match="attributes"):
        ag.GuidanceConfig(attributes=(1, 1))
    with pytest.raises(ValueError, match="region_field"):
        ag.RRRConfig(wrong_region_field="")
    assert ag.RRRConfig.from_mapping({"lambda1": 10}) == ag.RRRConfig(lambda1=10.0)
    # A batch without the region the scheme reads: a clear error when the step is traced.
    model, batch = tiny_cnn2(), toy_batch()
    del batch["region"]
    opt = optax.sgd(1.0)
    step = make_train_step(model, opt, ag.attention_guidance_scheme(ag.GuidanceConfig(), LAYERS))
    with pytest.raises(ValueError, match="batch field 'region'.*config.dataset.options.region_templates"):
        jax.jit(step)(init_state(model, opt, (12, 12, 1), 0), batch, jax.random.key(0))


def test_train_mode_passes_batch_statistics():
    """mode="train" runs the map's network in train mode (BatchNorm on batch statistics): on a BatchNorm model the
    guidance term then differs from inference mode; on CNN-2 (no BatchNorm) both are the same."""
    from saliency_jax.models import SmallCNN

    batch = toy_batch()
    for model, same in ((tiny_cnn2(), True), (SmallCNN(num_classes=4, widths=(3, 4, 4)), False)):
        layers = LAYERS if same else ModelLayers("conv3", "fc")
        values = []
        for mode in ("inference", "train"):
            scheme = ag.attention_guidance_scheme(ag.GuidanceConfig(mode=mode), layers)
            _, _, metrics = sgd_update(model, scheme, batch)
            values.append(float(metrics["guidance_loss"]))
        assert np.isclose(values[0], values[1], rtol=1e-5) == same, values


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from saliency_jax import data
    from saliency_jax.models import CNN2
    from saliency_jax.train import init_state, make_train_step
    from saliency_jax.training import ModelLayers, attention_guidance as ag
    assert jax.device_count() == 4, jax.devices()
    src = data.get_source("decoy_mnist", "train", options={"base": "digits"})
    ds = data.make_train_dataset(src, None, batch_size=8, seed=0)
    batches = [b for _, b in zip(range(2), iter(ds))]
    model = CNN2(10, conv_features=(3, 4, 4), fc_features=(6, 6), init_std=0.3)
    opt = optax.adam(1e-2)
    layers = ModelLayers("relu_conv3", "fc3")
    for scheme in (ag.attention_guidance_scheme(ag.GuidanceConfig(), layers), ag.rrr_scheme(ag.RRRConfig(), layers)):
        step = make_train_step(model, opt, scheme)
        finals = []
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = Mesh(np.array(devices), ("data",))
            repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            state = jax.device_put(init_state(model, opt, (28, 28, 1), 0), repl)
            fn = jax.jit(step, in_shardings=(repl, shard, repl), out_shardings=(repl, repl))
            for b in batches:
                sharded = jax.device_put(b, shard)
                assert len(sharded["region"].sharding.device_set) == len(devices)
                state, m = fn(state, sharded, jax.random.key(1))
            finals.append(jax.device_get(state.params))
        worst = max(float(np.max(np.abs(x - y))) for x, y in zip(*map(jax.tree.leaves, finals)))
        print("MAXDIFF", worst)
""")


def test_schemes_in_the_sharded_step_match_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("MAXDIFF")]
    assert len(diffs) == 2 and max(diffs) < 1e-4, diffs


# ----------------------------------------------------------------------------------------------------------------
# Sources through get_source.


def test_decoy_and_clean_mnist_through_get_source(tmp_path):
    images, labels = make_mnist(tmp_path)
    decoy = data_lib.get_source("decoy_mnist", "test", data_dir=str(tmp_path), options={"seed": 3})
    clean = data_lib.get_source("clean_mnist", "test", data_dir=str(tmp_path),
                                options=ml_collections.ConfigDict({"seed": 3}))
    direct = decoy_mnist.load_decoy_mnist(tmp_path, "test", seed=3)
    np.testing.assert_array_equal(decoy.images, direct.images)
    np.testing.assert_array_equal(clean.images[..., 0], images)
    np.testing.assert_array_equal(clean.corners, decoy.corners)  # the same draws: wrong_region where the patch was
    assert decoy.name == "decoy_mnist/test" and clean.name == "clean_mnist/test"
    assert set(decoy[0]) == set(clean[0]) == {"image", "label", "region", "wrong_region", "decoy_label"}
    with pytest.raises(ValueError, match="needs data_dir"):
        data_lib.get_source("decoy_mnist", "train")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dilation'\]; this spec takes"):
        data_lib.get_source("decoy_mnist", "train", data_dir=str(tmp_path), options={"dilation": 1})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['seed'\]"):
        data_lib.get_source("mnist", "train", data_dir=str(tmp_path), options={"seed": 1})
    with pytest.raises(ValueError, match="base must be one of"):
        data_lib.get_source("decoy_mnist", "train", options={"base": "cifar"})


def test_decoy_digits_needs_no_files():
    train = data_lib.get_source("decoy_mnist", "train", options={"base": "digits"})
    test = data_lib.get_source("clean_mnist", "test", options={"base": "digits"})
    assert len(train) == 1347 and len(test) == 450 and train.images.shape[1:] == (28, 28, 1)
    assert train.name == "decoy_digits/train" and test.name == "clean_digits/test"
    # The digit sits in the central 20 x 20 box; the patch overwrote a corner with 255 - 25 * label.
    clean, labels = decoy_mnist.digits_as_mnist("train")
    assert clean[:, :4].max() == 0 and clean[:, :, -4:].max() == 0 and clean[:, 4:24, 4:24].max() > 200
    masks = decoy_mnist.patch_masks(train.corners)
    np.testing.assert_array_equal(train.images[..., 0][masks].reshape(-1, 16),
                                  np.repeat(decoy_mnist.patch_value(labels)[:, None], 16, 1))


def test_per_class_templates_replace_the_region(tmp_path):
    make_mnist(tmp_path)
    square = [[(4, 4), (23, 4), (23, 23), (4, 23)]]
    templates = {str(c): square for c in range(10)}
    templates["1"] = [[(12, 2), (15, 2), (15, 25), (12, 25)]]  # a thin bar for the ones
    src = data_lib.get_source("decoy_mnist", "train", data_dir=str(tmp_path),
                              options={"region_templates": templates})
    assert isinstance(src, data_lib.TemplateRegionSource)
    expected = regions.rasterize_templates(templates, [str(c) for c in range(10)], (28, 28))
    for i in (0, 1, 2):
        item = src[i]
        np.testing.assert_array_equal(item["region"], expected[int(item["label"])])
        assert "wrong_region" in item
    assert src[1]["region"].sum() == 4 * 24 and src[0]["region"].sum() == 20 * 20
    # On digits (image_size resize first: the templates are drawn at the item size, in a 28 px frame).
    digits = data_lib.get_source("digits", "test", image_size=16,
                                 options={"region_templates": {str(c): square for c in range(10)},
                                          "template_frame": (28, 28)})
    assert digits[0]["region"].shape == (16, 16)
    with pytest.raises(ValueError, match=r"no template for classes \['9'\]"):
        data_lib.get_source("digits", "test", options={"region_templates": {str(c): square for c in range(9)}})
    with pytest.raises(ValueError, match=r"unknown classes \['cat'\]"):
        data_lib.get_source("digits", "test", options={"region_templates": {**templates, "cat": square}})


def test_celeba_through_get_source(tmp_path):
    make_celeba(tmp_path)
    options = ml_collections.ConfigDict({"attributes": ["Wearing_Lipstick", "Smiling"],
                                         "region_templates": celeba.REGION_TEMPLATES})
    src = data_lib.get_source("celeba", "train", data_dir=str(tmp_path), image_size=32, options=options)
    assert isinstance(src, data_lib.CelebASource) and src.attributes == ("Wearing_Lipstick", "Smiling")
    assert src.region_attributes == ("Wearing_Lipstick",) and src[0]["region"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['template_frame'\]"):
        data_lib.get_source("celeba", "train", data_dir=str(tmp_path), options={"template_frame": (1, 1)})
    with pytest.raises(ValueError, match="needs data_dir"):
        data_lib.get_source("celeba", "train")


# ----------------------------------------------------------------------------------------------------------------
# Evaluators against hand computations.


class PixelNet(nn.Module):
    """features = ReLU(1x1 conv with weight 1) = the image itself; logits = Dense(flatten(features)).

    Grad-CAM of class c: alpha_c = mean over pixels of the Dense kernel's column c; map = ReLU(alpha_c * image), so
    the mass inside a region is sum(image * region) / sum(image) when alpha_c > 0, and the map is all zero when
    alpha_c < 0."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(1, (1, 1), use_bias=False, kernel_init=nn.initializers.ones, name="conv")(x)
        x = nn.relu(x)
        return nn.Dense(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))


def pixel_net(signs, size=8):
    model = PixelNet(len(signs))
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)))
    kernel = np.full((size * size, len(signs)), 0.1, np.float32) * np.asarray(signs, np.float32)
    variables = {"params": {**variables["params"], "fc": {"kernel": jnp.asarray(kernel),
                                                          "bias": jnp.zeros(len(signs))}}}
    return model, variables


def test_region_masses_hand_computed():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 8, 8, 1)).astype(np.float32)
    region = (rng.uniform(size=(5, 8, 8)) < 0.3).astype(np.float32)
    wrong = np.zeros((5, 8, 8), np.float32)
    wrong[:, :2, :2] = 1
    labels = np.array([0, 1, 0, 0, 1])  # class 1 has a negative alpha: all-zero maps
    model, variables = pixel_net([1.0, -1.0])
    batches = data_lib.make_eval_batches(
        _ArraySource(images, labels, region=region, wrong_region=wrong), None, batch_size=4)  # 2 batches, 3 padded
    got = region_masses(model, variables, batches, layer="conv+relu")
    x = images[..., 0]
    want = (x * region).sum((1, 2)) / x.sum((1, 2))
    want_wrong = (x * wrong).sum((1, 2)) / x.sum((1, 2))
    assert got["region"].shape == (5,)
    np.testing.assert_allclose(got["region"][labels == 0], want[labels == 0], rtol=1e-5)
    np.testing.assert_allclose(got["wrong_region"][labels == 0], want_wrong[labels == 0], rtol=1e-5)
    assert np.all(np.isnan(got["region"][labels == 1]))
    # Multi-label: attribute 0 (positive alpha) and 2 (positive) guided, each with its own plane; pairs kept where
    # the attribute is present.
    model, variables = pixel_net([1.0, -1.0, 1.0])
    multi = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    planes = np.stack([region, wrong], axis=1)
    batches = data_lib.make_eval_batches(_ArraySource(images, multi, region=planes), None, batch_size=4)
    got = region_masses(model, variables, batches, layer="conv+relu", attributes=(0, 2))
    rows, cols = np.nonzero(multi[:, [0, 2]])
    np.testing.assert_array_equal(got["attribute"], np.array([0, 2])[cols])
    expected = np.where(cols == 0, want[rows], want_wrong[rows])
    np.testing.assert_allclose(got["region"], expected, rtol=1e-5)


def test_region_masses_of_further_maps_hand_computed():
    """maps=("layer:weighting", ...): on PixelNet with a constant positive kernel column, HiResCAM and gradient x
    activation at the conv are 0.1 * image, gradient x input is the same, so each mass is sum(image * region) /
    sum(image); with a negative column HiResCAM is all zero (NaN) while gradient x activation keeps the magnitude."""
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 8, 8, 1)).astype(np.float32)
    region = (rng.uniform(size=(5, 8, 8)) < 0.3).astype(np.float32)
    wrong = np.zeros((5, 8, 8), np.float32)
    wrong[:, :2, :2] = 1
    labels = np.array([0, 1, 0, 0, 1])
    model, variables = pixel_net([1.0, -1.0])
    specs = ("conv+relu:hirescam", "conv+relu:gradient_x_activation", "input:gradient_x_activation")
    batches = data_lib.make_eval_batches(
        _ArraySource(images, labels, region=region, wrong_region=wrong), None, batch_size=4)
    got = region_masses(model, variables, batches, layer="conv+relu", maps=specs)
    x = images[..., 0]
    want = (x * region).sum((1, 2)) / x.sum((1, 2))
    want_wrong = (x * wrong).sum((1, 2)) / x.sum((1, 2))
    for spec in specs:
        keep = labels == 0 if "hirescam" in spec else np.ones(5, bool)
        np.testing.assert_allclose(got[f"{spec}/region"][keep], want[keep], rtol=1e-5)
        np.testing.assert_allclose(got[f"{spec}/wrong_region"][keep], want_wrong[keep], rtol=1e-5)
    assert np.all(np.isnan(got["conv+relu:hirescam/region"][labels == 1]))
    with pytest.raises(ValueError, match="layer:weighting"):
        from saliency_jax.evaluators.attention_guidance import RegionMassSettings
        RegionMassSettings(maps=("relu_conv1",))


def test_maps_config_arms(tmp_path):
    """decoy_mnist.py:maps: every arm runs (config checks only, no training), the guided arms put the loss on the
    map they are named after, the GAP arms change only the head, and every guided arm's map is measured."""
    from saliency_jax.experiment import arm_config, check_config

    for arg in ("maps", "maps_runlocal"):
        config = load_config("decoy_mnist", arg)
        if config.dataset.get("data_dir"):  # generated IDX files: the checks load the sources, not real MNIST
            make_mnist(tmp_path)
            config.dataset.data_dir = str(tmp_path)
        arms = check_config(config)
        assert arms[:2] == ["plain", "guidance"] and arms[-1] == "rrr" and len(arms) == 14
        assert arm_config(config, "hirescam relu_conv1", 0).region_mass.maps == ("relu_conv1:hirescam",)
        assert arm_config(config, "guidance", 0).attention_guidance.layer is None
        g = arm_config(config, "grad x input", 1).attention_guidance
        assert (g.layer, g.weighting) == ("input", "gradient_x_activation")
        gap = arm_config(config, "gap grad-cam relu_conv3", 0)
        assert gap.model.kwargs.head == "gap" and arm_config(config, "plain", 0).model.kwargs.head == "flatten"
        assert tuple(gap.schemes) == ("attention_guidance",)
        for name, weighting, layer in load_module("decoy_mnist").MAP_ARMS[1:]:
            assert f"{layer}:{weighting}" in config.region_mass.maps
    with pytest.raises(ValueError, match="maps"):
        load_config("decoy_mnist", "map")


class _ArraySource:
    def __init__(self, images, labels, **fields):
        self.images, self.labels, self.fields = images, labels, fields
        self.num_classes = 3

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": np.asarray(self.labels[i], np.int32),
                **{k: v[i] for k, v in self.fields.items()}}


def _run(model, variables, config, workdir=None):
    return types.SimpleNamespace(model=model, variables=variables, config=config, workdir=workdir)


def test_split_accuracy_and_region_mass_evaluators_on_decoy_digits():
    config = load_config("decoy_mnist", "runlocal")
    config.split_accuracy.examples = 60
    config.region_mass.examples = 30
    model, variables = pixel_net([1.0] * 10, size=28)
    evaluators = build_evaluators(config)
    data = ExperimentData(config)
    got = evaluators["split_accuracy"].evaluate(_run(model, variables, config), data)
    train = data_lib.get_source("decoy_mnist", "train", options={"base": "digits"})
    idx = np.sort(np.random.default_rng(0).choice(len(train), 60, replace=False))
    x = np.stack([train[i]["image"] for i in idx])
    want = np.mean(np.argmax(np.asarray(model.apply(variables, x)), -1) == train.labels[idx])
    assert got == {"split": "train", "examples": 60, "accuracy": pytest.approx(want)}
    config.model.grad_cam_layer = "conv+relu"
    got = evaluators["region_mass"].evaluate(_run(model, variables, config), data)
    test = data_lib.get_source("decoy_mnist", "test", options={"base": "digits"})
    idx = np.sort(np.random.default_rng(0).choice(len(test), 30, replace=False))
    items = [test[i] for i in idx]
    x = np.stack([it["image"][..., 0] for it in items])
    inside = np.mean([(xi * it["region"]).sum() / xi.sum() for xi, it in zip(x, items)])
    on_patch = np.mean([(xi * it["wrong_region"]).sum() / xi.sum() for xi, it in zip(x, items)])
    assert got["region"]["examples"] == 30 and got["region"]["zero_maps"] == 0
    np.testing.assert_allclose([got["region"]["mean"], got["wrong_region"]["mean"]], [inside, on_patch], rtol=1e-5)


def test_decoy_agreement_evaluator_hand_values():
    """A model that always answers 0: its accuracy and decoy-following on the conflicting test images are the
    fractions of labels and of patch digits equal to 0 there."""
    config = load_config("decoy_mnist", "runlocal")
    model, variables = pixel_net([0.0] * 10, size=28)
    variables["params"]["fc"]["bias"] = jnp.asarray([1.0] + [0.0] * 9)
    got = build_evaluators(config)["decoy_agreement"].evaluate(_run(model, variables, config),
                                                               ExperimentData(config))
    test = data_lib.get_source("decoy_mnist", "test", options={"base": "digits"})
    conflict = test.patch_digits != test.labels
    assert got["examples"] == 450 and got["conflicting"] == int(conflict.sum()) > 350
    assert got["accuracy_conflicting"] == pytest.approx(np.mean(test.labels[conflict] == 0))
    assert got["follows_decoy"] == pytest.approx(np.mean(test.patch_digits[conflict] == 0))
    assert got["accuracy_agreeing"] == pytest.approx(np.mean(test.labels[~conflict] == 0))


def test_cooccurrence_accuracy_evaluator_hand_values(tmp_path):
    values = np.array(pytest.importorskip("test_guidance_data").celeba_values(6))
    make_celeba(tmp_path, partition=(2,) * 6)
    config = load_config("celeba_attention", "runlocal")
    config.dataset.data_dir = str(tmp_path)
    # A model that says "present" for attribute 0 and "absent" for 1 and 2, whatever the image.
    model = PixelNet(3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    variables = {"params": {**variables["params"], "fc": {"kernel": jnp.zeros_like(variables["params"]["fc"]["kernel"]),
                                                          "bias": jnp.asarray([1.0, -1.0, -1.0])}}}
    evaluator = build_evaluators(config)["cooccurrence_accuracy"]
    got = evaluator.evaluate(_run(model, variables, config), ExperimentData(config))
    col = ATTRIBUTES_40.index
    wl, hc, dc = (values[:, col(a)] == 1 for a in celeba.POSTER_ATTRIBUTES)
    assert got["examples"] == 6
    a = got["attributes"]
    assert a["Wearing_Lipstick"] == {"accuracy": pytest.approx(wl.mean()), "partner": "Heavy_Makeup",
                                     "subset_examples": 2, "subset_accuracy": 1.0}
    assert a["High_Cheekbones"] == {"accuracy": pytest.approx(1 - hc.mean()), "partner": "Smiling",
                                    "subset_examples": 1, "subset_accuracy": 0.0}
    assert a["Double_Chin"]["accuracy"] == pytest.approx(1 - dc.mean()) and a["Double_Chin"]["subset_accuracy"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# The configs end to end.


def load_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name, arg=None):
    return load_module(name).get_config(arg)


# The whole Decoy MNIST comparison at runlocal scale (~190 s on 2 cores); schemes, sources and evaluators have fast
# tests.
@pytest.mark.slow
def test_decoy_mnist_runlocal_experiment_end_to_end(tmp_path):
    config = load_config("decoy_mnist", "runlocal")
    out = run_experiment(config, tmp_path, progress=False)
    assert out["arms"] == ["plain", "rrr", "guidance", "clean"]
    report = (tmp_path / "report.md").read_text()
    for title in ("Grad-CAM mass inside the user's region", "Accuracy on the train split", "Saliency maps",
                  "Following the decoy"):
        assert title in report
    assert (tmp_path / "saliency_maps.png").stat().st_size > 0
    summary = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    for arm in out["arms"]:
        assert 0 <= summary[arm]["classification"]["accuracy"] <= 1
        assert 0 <= summary[arm]["region_mass"]["region"]["mean"] <= 1
        assert 0 <= summary[arm]["region_mass"]["wrong_region"]["mean"] <= 1
    assert json.loads((tmp_path / "clean" / "seed0" / "config.json").read_text())["dataset"]["name"] == "clean_mnist"
    logs = {arm: [json.loads(line) for line in (tmp_path / arm / "seed0" / "metrics.jsonl").read_text().splitlines()]
            for arm in ("rrr", "guidance")}
    assert {"guidance_loss", "grad_cam_mass_in_region"} <= set(logs["guidance"][-1])
    assert {"rrr_penalty", "input_gradient_mass_in_wrong_region"} <= set(logs["rrr"][-1])
    sweep = load_config("decoy_mnist", "sweep")
    assert [a for a, _ in sweep.experiment.arms] == ["guidance w_g=0.1", "guidance", "guidance w_g=10",
                                                    "guidance hirescam"]


def test_celeba_attention_runlocal_end_to_end(tmp_path):
    values = np.ones((12, 40), int) * -1
    col = ATTRIBUTES_40.index
    rng = np.random.default_rng(0)
    for a in celeba.POSTER_ATTRIBUTES + ("Heavy_Makeup", "Smiling", "Chubby"):
        values[:, col(a)] = np.where(rng.random(12) < 0.5, 1, -1)
    make_celeba(tmp_path / "celeba", n=12, partition=(0,) * 8 + (1,) + (2,) * 3, values=values)
    config = load_config("celeba_attention", "runlocal")
    config.dataset.data_dir = str(tmp_path / "celeba")
    out = run_experiment(config, tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "co-occurrence-biased subsets" in report and "Grad-CAM mass inside the user's region" in report
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    for arm in out["arms"]:
        assert set(summary[arm]["cooccurrence_accuracy"]["attributes"]) == set(celeba.POSTER_ATTRIBUTES)
    log = (tmp_path / "run" / "guidance" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert "guidance_loss" in json.loads(log[-1])
