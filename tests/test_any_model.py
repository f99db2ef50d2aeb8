"""Saliency-guided training on models nobody here wrote: an NNX CNN, a linen ViT and an NNX ViT, flax's own
``examples/imagenet`` ResNet (BatchNorm ``axis_name="batch"``) and a model returning ``(logits, aux)``.

Every model trains a few steps with distraction, the HNC loss, attention guidance and Excitation Dropout chained in
one step (one compilation per model): the loss falls, the parameters change and each scheme's metric moves. The ViTs
take a dropout baseline at an MLP layer instead of Excitation Dropout, whose Excitation Backprop has no rule for the
attention and layer normalisation above it: that is refused at validation (``check_model``) with EB's error.
The same steps on 8 fake CPU devices (a data-parallel mesh) equal one device.
"""

from __future__ import annotations

import logging
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import foreign_models as fm
from saliency_jax import training
from saliency_jax.config import ConfigError
from saliency_jax.models.nnx_models import NNXCNN, NNXViT
from saliency_jax.models.trainable import linen_model, nnx_model
from saliency_jax.models.vit import ViT
from saliency_jax.saliency import saliency_map, token_grid
from saliency_jax.training import DistractionConfig, DropoutConfig, GuidanceConfig, HNCConfig

NUM_CLASSES = 5


def _vit_kwargs():
    return dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)


MODELS = {
    # name: (model builder, image size, dropout layer, dropout scheme)
    "nnx_cnn": (lambda: nnx_model(lambda rngs: NNXCNN(NUM_CLASSES, rngs=rngs, channels=3),
                                  grad_cam_layer="bn+relu", classifier="head"), 16, "bn+relu", "excitation"),
    "linen_vit": (lambda: linen_model(ViT(NUM_CLASSES, dropout_rate=0.0, **_vit_kwargs()),
                                      grad_cam_layer="encoder_norm", classifier="head",
                                      reshape={"encoder_norm": token_grid(0)}), 16, "block1/mlp/fc1", "standard"),
    "nnx_vit": (lambda: nnx_model(lambda rngs: NNXViT(NUM_CLASSES, rngs=rngs, image_size=16, dropout_rate=0.0,
                                                      **_vit_kwargs()),
                                  grad_cam_layer="encoder_norm", classifier="head",
                                  reshape={"encoder_norm": token_grid(0)}), 16, "blocks/1/mlp/fc1", "standard"),
    "flax_resnet": (lambda: linen_model(fm.FlaxExampleResNet18(num_classes=NUM_CLASSES, num_filters=4),
                                        grad_cam_layer=fm.RESNET18_GRAD_CAM_LAYER, classifier=fm.RESNET18_CLASSIFIER,
                                        axis_name="batch"), 64, fm.RESNET18_GRAD_CAM_LAYER, "excitation"),
    "aux_output": (lambda: linen_model(fm.AuxOutputCNN(NUM_CLASSES), grad_cam_layer=fm.AUX_GRAD_CAM_LAYER,
                                       classifier=fm.AUX_CLASSIFIER, outputs=0), 16, "conv2+relu", "excitation"),
}


def _scheme(layers, dropout_layer, dropout_scheme, everything=True):
    if not everything:
        return training.distraction_scheme(DistractionConfig(probability=1.0, threshold=0.5), layers)
    return training.chain(
        training.distraction_scheme(DistractionConfig(probability=1.0, threshold=0.5), layers),
        training.hnc_scheme(HNCConfig(variant="kd", weight=0.1, num_negatives=2), layers),
        training.attention_guidance_scheme(GuidanceConfig(w_g=0.1), layers),
        training.dropout_scheme(DropoutConfig(scheme=dropout_scheme, layer=dropout_layer, base_retain=0.8)))


def _batch(size, n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
    labels = np.arange(n) % NUM_CLASSES
    region = np.zeros((n, size, size), np.float32)
    region[:, : size // 2, : size // 2] = 1.0
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32), "region": jnp.asarray(region)}


def _train(name, steps=4, mesh=None, everything=True):
    build, size, dropout_layer, dropout_scheme = MODELS[name]
    model = build()
    scheme = _scheme(model.layers, dropout_layer, dropout_scheme, everything)
    training.check_model(model, scheme, (size, size, 3))
    optimizer = optax.adam(3e-3)
    state = training.init_state(model, optimizer, (size, size, 3), seed=0, scheme=scheme)
    step = jax.jit(training.make_train_step(model, optimizer, scheme))
    batch = _batch(size)
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec as P
        batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
        state = jax.device_put(state, NamedSharding(mesh, P()))
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.key(1))
        history.append({k: float(v) for k, v in metrics.items()})
    return model, state, history


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_scheme_trains_any_model(name):
    build, size, _, _ = MODELS[name]
    initial = training.init_state(build(), optax.adam(3e-3), (size, size, 3), seed=0)
    model, state, history = _train(name)
    first, last = history[0], history[-1]
    assert all(np.isfinite(v) for m in history for v in m.values()), history
    assert last["loss"] < first["loss"], [m["loss"] for m in history]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), initial.params, state.params)
    assert all(jax.tree.leaves(changed)), f"{name}: some parameters never changed"
    assert int(state.step) == 4
    # Each scheme ran and its metric moved.
    assert first["occluded"] == 1.0
    assert first["distraction_degenerate_maps"] < 1.0
    assert last["hnc"] != first["hnc"] and last["guidance_loss"] != first["guidance_loss"]
    assert 0.0 < first["kept_fraction"] < 1.0
    assert last["hnc_degenerate_maps"] == 0.0 and first["guidance_degenerate_maps"] < 1.0
    # The trained model's maps through the same view.
    images = _batch(size, n=2)["image"]
    maps = saliency_map("grad_cam", model.view(state.variables()), images, jnp.array([0, 1]))
    assert maps.shape == (2, size, size) and bool(jnp.all(jnp.isfinite(maps)))


@pytest.mark.parametrize("name", ["linen_vit", "nnx_vit"])
def test_excitation_dropout_on_a_vit_is_refused_at_validation(name):
    build, size, dropout_layer, _ = MODELS[name]
    model = build()
    scheme = training.dropout_scheme(DropoutConfig(scheme="excitation", layer=dropout_layer))
    with pytest.raises((ValueError, NotImplementedError), match="(?i)excitation|rule"):
        training.check_model(model, scheme, (size, size, 3))


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from jax.sharding import Mesh
    import test_any_model as t
    assert jax.device_count() == 8
    for name, everything in (("nnx_cnn", True), ("flax_resnet", False)):
        finals = []
        for devices in (jax.devices()[:1], jax.devices()):
            _, state, history = t._train(name, steps=3, mesh=Mesh(np.array(devices), ("data",)),
                                         everything=everything)
            finals.append(jax.device_get(state))
        a, b = (jax.tree.leaves(f) for f in finals)
        print(name, "MAXDIFF", max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b)))
""")


# 80 s on 2 cores; in CI the library's sharded steps equal one device (tests/test_train.py, test_guidance_schemes.py)
@pytest.mark.slow
def test_eight_devices_equal_one():
    """The data-parallel step (batch sharded over 8 fake CPU devices) equals one device: the NNX CNN's BatchNorm and
    flax's ResNet's ``axis_name`` BatchNorm both take the statistics of the whole global batch."""
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(tests=str(pathlib.Path(__file__).parent))],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = {line.split()[0]: float(line.split()[-1]) for line in out.stdout.splitlines() if "MAXDIFF" in line}
    assert set(diffs) == {"nnx_cnn", "flax_resnet"}, out.stdout
    assert all(d < 1e-4 for d in diffs.values()), diffs


def test_unbound_batchnorm_axis_is_refused_with_the_fix():
    model = linen_model(fm.FlaxExampleResNet18(num_classes=NUM_CLASSES, num_filters=4),
                        grad_cam_layer=fm.RESNET18_GRAD_CAM_LAYER, classifier=fm.RESNET18_CLASSIFIER)
    with pytest.raises(ConfigError, match="axis_name='batch'"):
        training.check_model(model, training.Scheme(), (64, 64, 3))


def test_a_1x1_saliency_layer_is_refused_unless_forced():
    """flax's ResNet18 on 32 px images: the last block is 1x1, every Grad-CAM map all zeros."""
    model = linen_model(fm.FlaxExampleResNet18(num_classes=NUM_CLASSES, num_filters=4),
                        grad_cam_layer=fm.RESNET18_GRAD_CAM_LAYER, classifier=fm.RESNET18_CLASSIFIER,
                        axis_name="batch")
    scheme = training.distraction_scheme(DistractionConfig(probability=1.0), model.layers)
    with pytest.raises(ConfigError, match="1x1 grid"):
        training.check_model(model, scheme, (32, 32, 3))
    training.check_model(model, scheme, (32, 32, 3), allow_small_grid=True)
    # Forced: the degenerate-map metric says what happens (every map constant).
    optimizer = optax.sgd(0.01)
    state = training.init_state(model, optimizer, (32, 32, 3), seed=0, scheme=scheme)
    _, metrics = jax.jit(training.make_train_step(model, optimizer, scheme))(state, _batch(32), jax.random.key(0))
    assert float(metrics["distraction_degenerate_maps"]) == 1.0
    # ... and saliency_map flags them.
    out = saliency_map("grad_cam", model.view(state.variables()), _batch(32, n=2)["image"], jnp.array([0, 1]),
                       return_extras=True)
    assert out.extras["degenerate"].tolist() == [True, True]


def test_a_transformer_layer_without_a_grid_is_refused():
    model = linen_model(ViT(NUM_CLASSES, **_vit_kwargs()), grad_cam_layer="encoder_norm", classifier="head")
    scheme = training.hnc_scheme(HNCConfig(), model.layers)
    with pytest.raises(ConfigError, match="num_prefix_tokens"):
        training.check_model(model, scheme, (16, 16, 3))


def test_structured_outputs_without_a_selection_are_refused_clearly():
    model = linen_model(fm.AuxOutputCNN(NUM_CLASSES), grad_cam_layer=fm.AUX_GRAD_CAM_LAYER, classifier="head")
    with pytest.raises(ValueError, match="outputs="):
        training.check_model(model, training.Scheme(), (16, 16, 3))
    hf = linen_model(fm.HFStyleCNN(NUM_CLASSES), grad_cam_layer=fm.HF_GRAD_CAM_LAYER, classifier=fm.HF_CLASSIFIER,
                     outputs="logits", train_kwargs={"deterministic": False}, eval_kwargs={"deterministic": True})
    scheme = training.distraction_scheme(DistractionConfig(probability=1.0, threshold=0.5), hf.layers)
    training.check_model(hf, scheme, (16, 16, 3))


def test_nnx_model_is_left_unchanged_and_its_variables_are_plain_dicts():
    module = NNXCNN(NUM_CLASSES, rngs=nnx.Rngs(0), channels=3)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    model = nnx_model(module, grad_cam_layer="bn+relu", classifier="head")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert isinstance(variables["params"], dict) and isinstance(variables["batch_stats"], dict)
    scheme = training.hnc_scheme(HNCConfig(), model.layers)
    optimizer = optax.sgd(0.1)
    state = training.init_state(model, optimizer, (16, 16, 3), seed=0, variables=variables, scheme=scheme)
    state, _ = jax.jit(training.make_train_step(model, optimizer, scheme))(state, _batch(16), jax.random.key(0))
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables["params"], state.params))


def test_the_loop_warns_once_on_degenerate_maps(caplog):
    from saliency_jax import train as train_lib
    from saliency_jax.plan import Phase

    pending = [{"distraction_degenerate_maps": 0.0}, {"distraction_degenerate_maps": 1.0}]
    warned: set[str] = set()
    phase = Phase("train", 1, 0, 2, None, "classifier", ("classifier",))
    with caplog.at_level(logging.WARNING):
        train_lib._watch_degenerate(pending, warned, 0.5, 2, phase, "wd")
        train_lib._watch_degenerate(pending, warned, 0.5, 4, phase, "wd")
    hits = [r for r in caplog.records if "distraction_degenerate_maps" in r.getMessage()]
    assert len(hits) == 1 and "constant" in hits[0].getMessage()
    train_lib._watch_degenerate([{"hnc_degenerate_maps": 0.2}], warned, 0.5, 6, phase, "wd")
    assert warned == {"distraction_degenerate_maps"}
