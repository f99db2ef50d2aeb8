"""Tests of the transformer / NNX model definitions and of the foreign test models (tests/foreign_models.py):
output shapes, documented layer paths, the ViT token grid and its CAM identity, and NNX train / eval modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import foreign_models as fm
from saliency_jax.models import nnx_models, vit
from saliency_jax.saliency import apply_with_layers, module_paths
from saliency_jax.saliency.views import nnx_apply_with_layers, nnx_paths, token_grid

SMALL_VIT = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=48)


def _key(seed: int) -> jax.Array:
    """A PRNG key of the ``rbg`` implementation: XLA on CPU compiles threefry's random bits slowly (~2 s per shape on
    the 2-core test machine, once per parameter shape in an eager ``init``), ``RngBitGenerator`` at once."""
    return jax.random.key(seed, impl="rbg")


def _images(shape=(2, 32, 32, 3), seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _init(model, shape, **kwargs):
    """``model.init`` under one ``jax.jit`` (one compilation rather than one per operation)."""
    return jax.jit(lambda key: model.init(key, jnp.zeros(shape, jnp.float32), **kwargs))(_key(0))


@pytest.fixture(scope="module")
def linen_vit():
    model = vit.ViT(num_classes=5, patch_size=4, **SMALL_VIT)
    variables = _init(model, (1, 32, 32, 3))
    return model, variables


# ---------------------------------------------------------------------------------------------------------------
# Linen ViT.


def test_vit_output_shape_and_dropout(linen_vit):
    model, variables = linen_vit
    x = _images()
    logits = model.apply(variables, x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert set(variables) == {"params"}
    assert variables["params"]["pos_embedding"].shape == (1, 64, 32)
    np.testing.assert_array_equal(logits, model.apply(variables, x, train=False))
    a = model.apply(variables, x, train=True, rngs={"dropout": _key(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": _key(2)})
    assert a.shape == (2, 5) and not np.allclose(a, b)


def test_vit_layer_paths(linen_vit):
    model, variables = linen_vit
    paths = module_paths(model, variables, jnp.zeros((1, 32, 32, 3)), train=False)
    for p in ("embedding", "dropout", "block0", "block1", "block1/norm1", "block1/attention", "block1/norm2",
              "block1/mlp", "block1/mlp/fc1", "block1/mlp/fc1/dense", "block1/mlp/dropout", "block1/mlp/fc2",
              vit.VIT_GRAD_CAM_LAYER, vit.VIT_CLASSIFIER):
        assert p in paths, (p, paths)
    assert "block2" not in paths
    assert vit.VIT_GRAD_CAM_LAYER == "encoder_norm" and vit.VIT_CLASSIFIER == "head"


def test_vit_tokens_grid_and_mlp_hidden(linen_vit):
    model, variables = linen_vit
    x = _images()
    out = apply_with_layers(model, variables, x, capture=["encoder_norm", "block1/mlp/fc1", "embedding"], train=False)
    tokens = out.activations["encoder_norm"]
    assert tokens.shape == (2, 64, 32)
    assert out.activations["block1/mlp/fc1"].shape == (2, 64, 48)
    # Row-major patch order: the embedding's [b, 8, 8, d] grid flattens to the tokens; token_grid(0) undoes it.
    emb = out.activations["embedding"]
    assert emb.shape == (2, 8, 8, 32)
    grid = token_grid(num_prefix_tokens=0)(tokens)
    assert grid.shape == (2, 8, 8, 32)
    np.testing.assert_array_equal(grid.reshape(2, 64, 32), tokens)
    # Locality of the patch order: changing the pixels of patch (row 2, col 5) changes embedding token 2 * 8 + 5 only.
    x2 = x.at[:, 8:12, 20:24, :].add(0.5)
    emb2 = apply_with_layers(model, variables, x2, capture=["embedding"], train=False).activations["embedding"]
    changed = np.any(np.abs(np.asarray(emb2 - emb).reshape(2, 64, 32)) > 0, axis=(0, 2))
    assert np.flatnonzero(changed).tolist() == [2 * 8 + 5]


def test_vit_cam_identity(linen_vit):
    """The head applied to each token (the CAM over the patch grid) averages to the logits."""
    model, variables = linen_vit
    out = apply_with_layers(model, variables, _images(), capture=["encoder_norm"], train=False)
    head = variables["params"]["head"]
    cam = out.activations["encoder_norm"] @ head["kernel"] + head["bias"]  # [b, tokens, classes]
    np.testing.assert_allclose(cam.mean(axis=1), out.output, atol=1e-5, rtol=1e-5)


def test_vit_rejects_indivisible_images(linen_vit):
    model, variables = linen_vit
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(model.init, _key(0), jnp.zeros((1, 30, 30, 3)))


# ---------------------------------------------------------------------------------------------------------------
# NNX models.


def test_nnx_cnn_shapes_paths_and_grad_cam_layer():
    model = nnx_models.NNXCNN(10, rngs=nnx.Rngs(_key(0)))
    model.eval()
    x = _images((2, 28, 28, 1))
    assert model(x).shape == (2, 10)
    assert set(nnx_paths(model)) == {"conv1", "conv2", "bn", "dropout", "head"}
    graphdef, state = nnx.split(model)
    out = nnx_apply_with_layers(lambda s: nnx.merge(graphdef, s), state, x,
                                capture=[nnx_models.NNX_CNN_GRAD_CAM_LAYER, "bn"])
    feats = out.activations["bn+relu"]
    assert feats.shape == (2, 14, 14, 64) and float(feats.min()) >= 0.0
    np.testing.assert_allclose(feats, jnp.maximum(out.activations["bn"], 0.0))
    # GAP head: the classifier on the pooled Grad-CAM layer gives the logits (dropout off in eval mode).
    head = model.head
    np.testing.assert_allclose(feats.mean(axis=(1, 2)) @ head.kernel[...] + head.bias[...], out.output,
                               atol=1e-5, rtol=1e-5)
    # 3-channel variant (CIFAR-size input).
    rgb = nnx_models.NNXCNN(3, rngs=nnx.Rngs(_key(1)), channels=3)
    rgb.eval()
    assert rgb(_images()).shape == (2, 3)


def test_nnx_cnn_train_eval_modes():
    model = nnx_models.NNXCNN(10, rngs=nnx.Rngs(_key(0)))
    x = _images((2, 28, 28, 1))
    model.train()
    assert model.dropout.deterministic is False and model.bn.use_running_average is False
    a, b = model(x), model(x)  # the dropout stream advances between calls
    assert not np.allclose(a, b)
    assert not np.allclose(model.bn.mean[...], 0.0)  # batch statistics updated in train mode
    model.eval()
    assert model.dropout.deterministic is True and model.bn.use_running_average is True
    stats = np.asarray(model.bn.mean[...])
    np.testing.assert_array_equal(model(x), model(x))
    np.testing.assert_array_equal(model.bn.mean[...], stats)


@pytest.fixture(scope="module")
def nnx_vit():
    return nnx_models.NNXViT(5, rngs=nnx.Rngs(_key(0)), image_size=32, channels=3, patch_size=4, **SMALL_VIT)


def test_nnx_vit_shapes_paths_and_cam_identity(nnx_vit):
    model = nnx_vit
    model.eval()
    x = _images()
    assert model(x).shape == (2, 5)
    paths = nnx_paths(model)
    for p in ("embedding", "dropout", "blocks/0", "blocks/1", "blocks/0/norm1", "blocks/0/attention",
              "blocks/0/dropout1", "blocks/0/norm2", "blocks/0/mlp", "blocks/0/mlp/fc1", "blocks/0/mlp/fc1/linear",
              "blocks/0/mlp/dropout", "blocks/0/mlp/fc2", "blocks/1/mlp/fc1", nnx_models.NNX_VIT_GRAD_CAM_LAYER,
              nnx_models.NNX_VIT_CLASSIFIER):
        assert p in paths, (p, paths)
    assert "blocks/2" not in paths
    graphdef, state = nnx.split(model)
    out = nnx_apply_with_layers(lambda s: nnx.merge(graphdef, s), state, x,
                                capture=["encoder_norm", "blocks/1/mlp/fc1"])
    tokens = out.activations["encoder_norm"]
    assert tokens.shape == (2, 64, 32)
    assert out.activations["blocks/1/mlp/fc1"].shape == (2, 64, 48)
    assert token_grid(num_prefix_tokens=0)(tokens).shape == (2, 8, 8, 32)
    cam = tokens @ model.head.kernel[...] + model.head.bias[...]
    np.testing.assert_allclose(cam.mean(axis=1), out.output, atol=1e-5, rtol=1e-5)


def test_nnx_vit_train_eval_modes(nnx_vit):
    model = nnx_vit
    x = _images()
    model.train()
    assert model.dropout.deterministic is False and model.blocks[0].mlp.dropout.deterministic is False
    assert not np.allclose(model(x), model(x))
    model.eval()
    assert model.blocks[1].dropout2.deterministic is True and model.blocks[0].attention.deterministic is True
    np.testing.assert_array_equal(model(x), model(x))


def test_nnx_vit_rejects_other_sizes():
    with pytest.raises(ValueError, match="divisible"):
        nnx_models.NNXViT(5, rngs=nnx.Rngs(_key(0)), image_size=30)
    model = nnx_models.NNXViT(5, rngs=nnx.Rngs(_key(0)), image_size=16, **SMALL_VIT)
    with pytest.raises(ValueError, match="built for 16x16"):
        model(_images())


# ---------------------------------------------------------------------------------------------------------------
# Foreign models.


@pytest.fixture(scope="module")
def flax_resnet():
    model = fm.FlaxExampleResNet18(num_classes=7, num_filters=8)
    return model, _init(model, (1, 32, 32, 3), train=False)


def test_flax_example_resnet18(flax_resnet):
    model, variables = flax_resnet
    x = _images()
    assert set(variables) == {"params", "batch_stats"}
    paths = module_paths(model, variables, x, train=False)
    assert paths[-1] == fm.RESNET18_CLASSIFIER == "Dense_0"
    assert paths[-2] == fm.RESNET18_GRAD_CAM_LAYER == "ResNetBlock_7"
    assert [p for p in paths if "/" not in p] == ["conv_init", "bn_init", *(f"ResNetBlock_{i}" for i in range(8)),
                                                   "Dense_0"]
    for p in ("ResNetBlock_0/Conv_0", "ResNetBlock_0/BatchNorm_1", "ResNetBlock_2/conv_proj",
              "ResNetBlock_2/norm_proj"):
        assert p in paths, (p, paths)
    assert "ResNetBlock_1/conv_proj" not in paths
    out = jax.jit(lambda v, x: apply_with_layers(model, v, x, capture=["ResNetBlock_7"], train=False))(variables, x)
    logits, feats = out.output, out.activations["ResNetBlock_7"]
    assert logits.shape == (2, 7)
    assert feats.shape == (2, 1, 1, 64) and float(feats.min()) >= 0.0
    dense = variables["params"]["Dense_0"]
    np.testing.assert_allclose(feats.mean(axis=(1, 2)) @ dense["kernel"] + dense["bias"], logits,
                               atol=1e-5, rtol=1e-5)


def test_flax_example_resnet18_train_needs_batch_axis(flax_resnet):
    """Its BatchNorm reduces over the axis 'batch' in train mode: unbound, flax raises; bound (a size-1 vmap) it
    trains."""
    model, variables = flax_resnet
    x = _images()
    with pytest.raises(NameError, match="batch"):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)

    def train_apply(v):
        return jax.vmap(lambda _: model.apply(v, x, train=True, mutable=["batch_stats"]),
                        axis_name="batch")(jnp.zeros((1,)))

    logits, updates = jax.jit(train_apply)(variables)
    assert logits.shape == (1, 2, 7)
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_aux_output_cnn():
    model = fm.AuxOutputCNN(num_classes=4)
    x = _images()
    variables = _init(model, x.shape)
    logits, aux = model.apply(variables, x)
    assert logits.shape == (2, 4) and aux["pre_logits"].shape == (2, 32)
    paths = module_paths(model, variables, x, train=False)
    assert {"conv1", "conv2", "dropout", "head"} <= set(paths)
    out = apply_with_layers(model, variables, x, capture=[fm.AUX_GRAD_CAM_LAYER], train=False)
    feats = out.activations["conv2+relu"]
    assert feats.shape == (2, 16, 16, 32)
    np.testing.assert_allclose(feats.mean(axis=(1, 2)), aux["pre_logits"], atol=1e-6)


def test_hf_style_cnn():
    model = fm.HFStyleCNN(num_classes=4)
    x = _images()
    variables = _init(model, x.shape)
    out = model.apply(variables, x)
    assert isinstance(out, fm.HFStyleOutput)
    assert out.logits.shape == (2, 4) and out.pooled_output.shape == (2, 32)
    det = model.apply(variables, x, deterministic=True).logits
    np.testing.assert_array_equal(out.logits, det)
    a = model.apply(variables, x, deterministic=False, rngs={"dropout": _key(1)}).logits
    assert not np.allclose(a, det)
    paths = module_paths(model, variables, x, deterministic=True)
    assert {"conv1", "conv2", "dropout", "classifier"} <= set(paths)
    layers = apply_with_layers(model, variables, x, capture=[fm.HF_GRAD_CAM_LAYER], deterministic=True)
    assert layers.activations["conv2+relu"].shape == (2, 16, 16, 32)
    assert isinstance(layers.output, fm.HFStyleOutput)
