"""Tests of the model zoo (ResNet, VGG16) and of the torchvision weight import.

The import is checked against an independent reference: a random state dict in torchvision naming and layout is
generated here from torchvision's architecture definitions, and the Flax forward pass after import is compared with
a plain-NumPy forward pass (NCHW / OIHW, float64) written directly from that state dict.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.numpy import save_file

from saliency_jax import models
from saliency_jax.models import alexnet as alexnet_lib
from saliency_jax.models import resnet as resnet_lib
from saliency_jax.models import vgg as vgg_lib
from saliency_jax.models import weights

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------------------------------------------
# Helpers: shapes without FLOPs, layer interception.


def abstract_init(model, image_shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(image_shape, jnp.float32))


def numpy_variables(model, image_shape, seed=0):
    """Concrete variables without compiling ``model.init`` (random-number kernels compile slowly on XLA:CPU).

    Kernels ~ N(0, 2 / fan_in), BatchNorm scale 1, biases 0, running mean 0, running var 1 (Flax's BN init).
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, math.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        return np.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_init(model, image_shape))


def trace_layers(model, image_shape):
    """Runs the model abstractly; returns ({path: [output shapes]}, {path: module class name}, logits shape)."""
    variables = abstract_init(model, image_shape)
    shapes, kinds = {}, {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            path = "/".join(context.module.path)
            shapes.setdefault(path, []).append(tuple(out.shape))
            kinds[path] = type(context.module).__name__
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x)

    logits = jax.eval_shape(run, variables, jax.ShapeDtypeStruct(image_shape, jnp.float32))
    return shapes, kinds, logits


# ----------------------------------------------------------------------------------------------------------------
# Independent torchvision-style state dicts and NumPy reference forward passes (NCHW, OIHW, float64).


def resnet_state_dict(rng, bottleneck, layers, width=64, num_classes=1000):
    """Random state dict with torchvision ResNet keys/shapes (torchvision.models.resnet._make_layer logic)."""
    sd = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = rng.normal(0, math.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(1234, np.int64)

    expansion = 4 if bottleneck else 1
    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for s, blocks in enumerate(layers):
        planes, stride = width * 2**s, (1 if s == 0 else 2)
        for i in range(blocks):
            p = f"layer{s + 1}.{i}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if i == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = rng.normal(0, 0.1 / math.sqrt(inplanes), (num_classes, inplanes)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
    return sd


def vgg16_state_dict(rng, widths=(64, 128, 256, 512, 512), fc=4096, num_classes=1000):
    """Random state dict with torchvision vgg16 keys/shapes (cfg "D", make_layers indices)."""
    sd, index, cin = {}, 0, 3
    for width, depth in zip(widths, (2, 2, 3, 3, 3)):
        for _ in range(depth):
            sd[f"features.{index}.weight"] = rng.normal(0, math.sqrt(2.0 / (cin * 9)), (width, cin, 3, 3)).astype(
                np.float32)
            sd[f"features.{index}.bias"] = rng.normal(0, 0.1, width).astype(np.float32)
            index, cin = index + 2, width
        index += 1
    for i, (cout, fan_in) in zip((0, 3, 6), ((fc, cin * 49), (fc, fc), (num_classes, fc))):
        sd[f"classifier.{i}.weight"] = rng.normal(0, math.sqrt(2.0 / fan_in), (cout, fan_in)).astype(np.float32)
        sd[f"classifier.{i}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
    return sd


def np_conv(x, w, b=None, stride=1, pad=0):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]  # [n, c, oh, ow, kh, kw]
    out = np.einsum("ncxyij,ocij->noxy", windows, w.astype(np.float64), optimize=True)
    return out if b is None else out + b[None, :, None, None]


def np_bn(x, sd, name):
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"].astype(np.float64) + 1e-5)
    return (x - sd[f"{name}.running_mean"][None, :, None, None]) * scale[None, :, None, None] + sd[
        f"{name}.bias"][None, :, None, None]


def np_maxpool(x, k, stride, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(4, 5))


def relu(x):
    return np.maximum(x, 0.0)


def to_nchw(images):
    x = (np.asarray(images, np.float64) - MEAN) / STD
    return x.transpose(0, 3, 1, 2)


def np_resnet(sd, images, bottleneck, layers):
    x = to_nchw(images)
    x = np_maxpool(relu(np_bn(np_conv(x, sd["conv1.weight"], stride=2, pad=3), sd, "bn1")), 3, 2, 1)
    for s, blocks in enumerate(layers):
        for i in range(blocks):
            p, stride = f"layer{s + 1}.{i}", (2 if s > 0 and i == 0 else 1)
            if bottleneck:
                y = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
                y = relu(np_bn(np_conv(y, sd[f"{p}.conv2.weight"], stride=stride, pad=1), sd, f"{p}.bn2"))
                y = np_bn(np_conv(y, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            else:
                y = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"], stride=stride, pad=1), sd, f"{p}.bn1"))
                y = np_bn(np_conv(y, sd[f"{p}.conv2.weight"], pad=1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                shortcut = np_bn(np_conv(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
            else:
                shortcut = x
            x = relu(y + shortcut)
    x = x.mean(axis=(2, 3))
    return x @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]


def np_adaptive_avg_pool(x, out=7):
    n, c, h, w = x.shape
    result = np.zeros((n, c, out, out))
    for i in range(out):
        h0, h1 = math.floor(i * h / out), math.ceil((i + 1) * h / out)
        for j in range(out):
            w0, w1 = math.floor(j * w / out), math.ceil((j + 1) * w / out)
            result[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return result


def np_vgg16(sd, images):
    x, index = to_nchw(images), 0
    for depth in (2, 2, 3, 3, 3):
        for _ in range(depth):
            x = relu(np_conv(x, sd[f"features.{index}.weight"], sd[f"features.{index}.bias"], pad=1))
            index += 2
        x = np_maxpool(x, 2, 2, 0)
        index += 1
    x = np_adaptive_avg_pool(x).reshape(x.shape[0], -1)  # torch.flatten(x, 1): channels-first
    x = relu(x @ sd["classifier.0.weight"].T + sd["classifier.0.bias"])
    x = relu(x @ sd["classifier.3.weight"].T + sd["classifier.3.bias"])
    return x @ sd["classifier.6.weight"].T + sd["classifier.6.bias"]


@pytest.fixture(scope="module")
def images32():
    return np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet18_sd():
    return resnet_state_dict(np.random.default_rng(1), bottleneck=False, layers=(2, 2, 2, 2))


# ----------------------------------------------------------------------------------------------------------------
# Architecture: shapes, layer paths.


@pytest.mark.parametrize("ctor", [resnet_lib.ResNet18, resnet_lib.ResNet50, vgg_lib.VGG16])
def test_output_shapes(ctor):
    _, _, logits = trace_layers(ctor(num_classes=7), (2, 32, 32, 3))
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


@pytest.mark.parametrize("ctor, expansion", [(resnet_lib.ResNet18, 1), (resnet_lib.ResNet50, 4)])
def test_resnet_layer_paths(ctor, expansion):
    shapes, kinds, _ = trace_layers(ctor(num_classes=5), (2, 64, 96, 3))
    c = 64 * expansion
    assert shapes["conv1"] == [(2, 32, 48, 64)]
    assert shapes["maxpool"] == [(2, 16, 24, 64)]
    assert shapes["layer1"] == [(2, 16, 24, c)]
    assert shapes["layer3"] == [(2, 4, 6, 4 * c)]
    assert shapes["layer4"] == [(2, 2, 3, 8 * c)]  # [b, h/32, w/32, 512 or 2048]
    assert shapes["layer4/1"] == [(2, 2, 3, 8 * c)]
    assert shapes["avgpool"] == [(2, 8 * c)]
    assert shapes["fc"] == [(2, 5)]
    assert kinds["layer4/1/add"] == "ResidualAdd" and kinds["avgpool"] == "GlobalAvgPool"
    assert kinds["layer2/0/downsample"] == "Downsample" and kinds["maxpool"] == "MaxPool"
    assert "layer2/1/downsample" not in shapes
    assert ("layer1/0/downsample" in shapes) == (expansion == 4)  # 64 -> 256 channels in the Bottleneck
    assert all(len(v) == 1 for v in shapes.values()), "every named layer must run once"


def test_vgg16_layer_paths():
    shapes, kinds, logits = trace_layers(vgg_lib.VGG16(num_classes=3), (2, 64, 64, 3))
    for s, depth, c in zip(range(1, 6), (2, 2, 3, 3, 3), (64, 128, 256, 512, 512)):
        for k in range(1, depth + 1):
            assert shapes[f"conv{s}_{k}"] == [(2, 64 >> (s - 1), 64 >> (s - 1), c)]
            assert kinds[f"relu{s}_{k}"] == "ReLU"
        assert shapes[f"pool{s}"] == [(2, 64 >> s, 64 >> s, c)]
    assert shapes["relu5_3"] == [(2, 4, 4, 512)]
    assert shapes["avgpool"] == [(2, 7, 7, 512)]
    assert shapes["fc6"] == shapes["fc7"] == [(2, 4096)]
    assert "drop6" in shapes and shapes["fc8"] == [(2, 3)] and logits.shape == (2, 3)
    assert all(len(v) == 1 for v in shapes.values())


def test_adaptive_pool_matrix_matches_pytorch_bins():
    # torch AdaptiveAvgPool1d(3) on length 5: bins [0, 2), [1, 4), [3, 5).
    expected = np.array([[1 / 2, 1 / 2, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]])
    np.testing.assert_allclose(vgg_lib.adaptive_pool_matrix(5, 3), expected, rtol=1e-6)
    # Upsampling 2 -> 7 replicates: bins 0-2 read input 0, bin 3 both, bins 4-6 input 1.
    np.testing.assert_allclose(vgg_lib.adaptive_pool_matrix(2, 7)[:, 0], [1, 1, 1, 0.5, 0, 0, 0])
    np.testing.assert_allclose(vgg_lib.adaptive_pool_matrix(7, 7), np.eye(7))


def test_bad_inputs_raise():
    model = resnet_lib.ResNet18(num_classes=3)
    with pytest.raises(TypeError, match="floating point"):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8))
    with pytest.raises(ValueError, match="channels"):
        abstract_init(model, (1, 32, 32, 1))
    with pytest.raises(ValueError, match="height, width, channels"):
        abstract_init(model, (32, 32, 3))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        abstract_init(resnet_lib.ResNet50(0), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="at least 32x32"):
        abstract_init(vgg_lib.VGG16(num_classes=3), (1, 16, 16, 3))


# ----------------------------------------------------------------------------------------------------------------
# Train vs eval behaviour.


def test_batchnorm_train_vs_eval(images32):
    model = resnet_lib.ResNet(num_classes=4, stage_sizes=(1, 1, 1, 1), block_cls=resnet_lib.BasicBlock,
                              num_filters=8)
    x = jnp.asarray(images32)
    variables = numpy_variables(model, x.shape)

    @jax.jit
    def run(variables, x):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path == ("conv1",):
                captured["conv1"] = out
            return out

        with nn.intercept_methods(interceptor):
            train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        eval_logits = model.apply(variables, x, train=False)
        eval_single = model.apply(variables, x[:1], train=False)
        train_single = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])[0]
        return train_logits, updates, eval_logits, eval_single, train_single, captured["conv1"]

    train_logits, updates, eval_logits, eval_single, train_single, conv1 = run(variables, x)
    # Eval uses running averages: an example's logits do not depend on the rest of the batch.
    np.testing.assert_allclose(eval_single[0], eval_logits[0], rtol=1e-5, atol=1e-6)
    # Train uses batch statistics: they do.
    assert np.max(np.abs(train_single[0] - train_logits[0])) > 1e-3
    assert np.max(np.abs(train_logits - eval_logits)) > 1e-3
    # Running averages follow torchvision's momentum 0.1 (Flax momentum 0.9), from mean 0 / var 1.
    conv1 = np.asarray(conv1, np.float64)
    new = updates["batch_stats"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * conv1.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    assert set(updates["batch_stats"]) == set(variables["batch_stats"])


def test_vgg_dropout_only_in_train(images32):
    model = vgg_lib.VGG(num_classes=3, stage_features=(4, 4, 8, 8, 8), fc_features=32)
    x = jnp.asarray(images32)
    variables = numpy_variables(model, x.shape)

    @jax.jit
    def run(variables, x):
        eval_logits = model.apply(variables, x, train=False)
        # The same two images twice: in train mode each copy gets its own dropout mask.
        train_logits = model.apply(variables, jnp.concatenate([x, x]), train=True, rngs={"dropout": jax.random.key(1)})
        return eval_logits, train_logits

    eval_logits, train_logits = run(variables, x)
    assert np.max(np.abs(train_logits[:2] - train_logits[2:])) > 1e-6
    assert np.max(np.abs(train_logits[:2] - eval_logits)) > 1e-6
    # Eval mode is deterministic and needs no rng.
    np.testing.assert_allclose(run(variables, x)[0], eval_logits, rtol=0, atol=0)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)


# ----------------------------------------------------------------------------------------------------------------
# Weight import round trips against the NumPy reference.


def save_both(tmp_path, sd, stem):
    st_path, npz_path = tmp_path / f"{stem}.safetensors", tmp_path / f"{stem}.npz"
    save_file(sd, str(st_path))
    np.savez(npz_path, **sd)
    return st_path, npz_path


def test_resnet18_import_matches_numpy_reference(tmp_path, images32, resnet18_sd):
    model = resnet_lib.ResNet18(num_classes=1000)
    shapes = abstract_init(model, images32.shape)  # every leaf is overwritten, so no real init is needed
    reference = np_resnet(resnet18_sd, images32, bottleneck=False, layers=(2, 2, 2, 2))
    apply = jax.jit(model.apply)
    for path in save_both(tmp_path, resnet18_sd, "resnet18"):
        loaded = weights.load_torch_state_dict(path)
        assert set(loaded) == set(resnet18_sd)
        variables = weights.import_resnet(loaded, shapes, arch="resnet18")
        np.testing.assert_array_equal(variables["params"]["layer1"]["0"]["conv1"]["kernel"],
                                      resnet18_sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(variables["batch_stats"]["layer2"]["0"]["downsample"]["1"]["var"],
                                      resnet18_sd["layer2.0.downsample.1.running_var"])
        logits = np.asarray(apply(variables, images32))
        assert np.std(reference) > 0.1  # a meaningful comparison, not near-zero logits
        np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


def test_resnet50_bottleneck_import_matches_numpy_reference(tmp_path, images32):
    sd = resnet_state_dict(np.random.default_rng(2), bottleneck=True, layers=(3, 4, 6, 3), width=8,
                           num_classes=10)
    model = resnet_lib.ResNet50(num_classes=10, num_filters=8)
    _, npz_path = save_both(tmp_path, sd, "resnet50")
    variables = weights.load_pretrained("ResNet-50", npz_path, abstract_init(model, images32.shape))
    logits = np.asarray(jax.jit(model.apply)(variables, images32))
    reference = np_resnet(sd, images32, bottleneck=True, layers=(3, 4, 6, 3))
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


def test_vgg16_import_matches_numpy_reference(tmp_path):
    images = np.random.default_rng(3).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)  # pool5 2x2 -> 7x7
    sd = vgg16_state_dict(np.random.default_rng(4), widths=(4, 4, 8, 8, 8), fc=32, num_classes=6)
    model = vgg_lib.VGG(num_classes=6, stage_features=(4, 4, 8, 8, 8), fc_features=32)
    st_path, _ = save_both(tmp_path, sd, "vgg16")
    variables = weights.load_pretrained("vgg16", st_path, abstract_init(model, images.shape))
    logits = np.asarray(jax.jit(model.apply)(variables, images))
    reference = np_vgg16(sd, images)
    assert np.std(reference) > 0.1
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


def test_skip_head_keeps_our_head(resnet18_sd, images32):
    model = resnet_lib.ResNet18(num_classes=10)
    shapes = abstract_init(model, images32.shape)
    ours = jax.tree.map(lambda s: np.full(s.shape, 7.0, np.float32), shapes)
    with pytest.raises(ValueError, match=r"(?s)fc\.weight.*skip_head=True"):
        weights.import_resnet(resnet18_sd, ours, arch="resnet18")
    variables = weights.import_resnet(resnet18_sd, ours, arch="resnet18", skip_head=True)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], 7.0)
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"], 7.0)
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], resnet18_sd["bn1.weight"])
    np.testing.assert_array_equal(ours["params"]["bn1"]["scale"], 7.0)  # input not modified


# ----------------------------------------------------------------------------------------------------------------
# Import errors.


@pytest.fixture(scope="module")
def small_resnet18():
    model = resnet_lib.ResNet18(num_classes=10, num_filters=4)
    sd = resnet_state_dict(np.random.default_rng(5), bottleneck=False, layers=(2, 2, 2, 2), width=4,
                           num_classes=10)
    return abstract_init(model, (1, 32, 32, 3)), sd


def test_small_import_is_complete(small_resnet18):
    shapes, sd = small_resnet18
    variables = weights.import_resnet(sd, shapes, arch="resnet18")
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)


def test_missing_extra_and_misshaped_keys_are_all_listed(small_resnet18):
    shapes, sd = small_resnet18
    bad = dict(sd)
    del bad["layer1.0.conv1.weight"], bad["layer3.1.bn2.running_var"]
    bad["layer5.0.conv1.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    bad["fc.bias"] = np.zeros(11, np.float32)
    with pytest.raises(ValueError) as info:
        weights.import_resnet(bad, shapes, arch="resnet18")
    message = str(info.value)
    for key in ("missing keys (2)", "layer1.0.conv1.weight", "layer3.1.bn2.running_var",
                "unexpected keys (1)", "layer5.0.conv1.weight", "fc.bias: file (11,) vs expected (10,)"):
        assert key in message


@pytest.mark.parametrize("key", ["bn1.num_batches_tracked"])
def test_num_batches_tracked_only_accepted_for_batchnorms(small_resnet18, key):
    shapes, sd = small_resnet18
    weights.import_resnet({k: v for k, v in sd.items() if k != key}, shapes, arch="resnet18")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): conv1\.num_batches_tracked"):
        weights.import_resnet({**sd, "conv1.num_batches_tracked": np.array(1)}, shapes, arch="resnet18")


def test_architecture_and_name_errors(small_resnet18, tmp_path):
    shapes, sd = small_resnet18
    with pytest.raises(ValueError, match="basic blocks, resnet50 uses bottleneck"):
        weights.import_resnet(sd, shapes, arch="resnet50")
    with pytest.raises(ValueError, match="layer1 has 2 blocks in variables, resnet34 has 3"):
        weights.import_resnet(sd, shapes, arch="resnet34")
    with pytest.raises(ValueError, match="unknown arch"):
        weights.import_resnet(sd, shapes, arch="resnet19")
    with pytest.raises(ValueError, match="batch_stats"):
        weights.import_resnet(sd, {"params": shapes["params"]}, arch="resnet18")
    with pytest.raises(ValueError, match="not VGG16-shaped"):
        weights.import_vgg16(sd, shapes)
    with pytest.raises(ValueError, match="module."):
        weights.import_resnet({f"module.{k}": v for k, v in sd.items()}, shapes, arch="resnet18")
    path = tmp_path / "r.npz"
    np.savez(path, **sd)
    with pytest.raises(ValueError, match="unknown model_name"):
        weights.load_pretrained("vgg19", path, shapes)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        weights.load_torch_state_dict(tmp_path / "nope.safetensors")
    for name, content in [("bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"),
                          ("bad.npz", b"PK\x03\x04 this is not a zip archive"),
                          ("pickle.npz", b"\x80\x04\x95 pickled")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=name):
            weights.load_torch_state_dict(path)
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="single.npz"):
        weights.load_torch_state_dict(single)
    other = tmp_path / "model.pth"
    other.write_bytes(b"whatever")
    with pytest.raises(ValueError, match=r"model\.pth.*\.safetensors or \.npz"):
        weights.load_torch_state_dict(other)
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    with pytest.raises(ValueError, match="no tensors"):
        weights.load_torch_state_dict(empty)
    with pytest.raises(ValueError, match=r"corrupt\.safetensors"):
        truncated = tmp_path / "corrupt.safetensors"
        save_file({"a": np.ones((100,), np.float32)}, str(truncated))
        truncated.write_bytes(truncated.read_bytes()[:-40])
        weights.load_torch_state_dict(truncated)


# ----------------------------------------------------------------------------------------------------------------
# AlexNet (torchvision layout): shapes, layer paths, dropout, import against a NumPy reference.

ALEXNET_WIDTHS = (4, 6, 8, 6, 5)  # narrow conv1..conv5 widths keep the reference forward pass fast


def alexnet_state_dict(rng, widths=(64, 192, 384, 256, 256), fc=4096, num_classes=1000):
    """Random state dict with torchvision alexnet keys/shapes (features.0/3/6/8/10, classifier.1/4/6)."""
    sd, cin = {}, 3
    for index, width, k in zip((0, 3, 6, 8, 10), widths, (11, 5, 3, 3, 3)):
        sd[f"features.{index}.weight"] = rng.normal(0, math.sqrt(2.0 / (cin * k * k)), (width, cin, k, k)).astype(
            np.float32)
        sd[f"features.{index}.bias"] = rng.normal(0, 0.1, width).astype(np.float32)
        cin = width
    for i, (cout, fan_in) in zip((1, 4, 6), ((fc, cin * 36), (fc, fc), (num_classes, fc))):
        sd[f"classifier.{i}.weight"] = rng.normal(0, math.sqrt(2.0 / fan_in), (cout, fan_in)).astype(np.float32)
        sd[f"classifier.{i}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
    return sd


def np_alexnet(sd, images):
    """torchvision AlexNet.forward in NumPy (eval mode: dropout is the identity)."""
    x = to_nchw(images)
    x = np_maxpool(relu(np_conv(x, sd["features.0.weight"], sd["features.0.bias"], stride=4, pad=2)), 3, 2, 0)
    x = np_maxpool(relu(np_conv(x, sd["features.3.weight"], sd["features.3.bias"], pad=2)), 3, 2, 0)
    x = relu(np_conv(x, sd["features.6.weight"], sd["features.6.bias"], pad=1))
    x = relu(np_conv(x, sd["features.8.weight"], sd["features.8.bias"], pad=1))
    x = np_maxpool(relu(np_conv(x, sd["features.10.weight"], sd["features.10.bias"], pad=1)), 3, 2, 0)
    x = np_adaptive_avg_pool(x, out=6).reshape(x.shape[0], -1)  # torch.flatten(x, 1): channels-first
    x = relu(x @ sd["classifier.1.weight"].T + sd["classifier.1.bias"])
    x = relu(x @ sd["classifier.4.weight"].T + sd["classifier.4.bias"])
    return x @ sd["classifier.6.weight"].T + sd["classifier.6.bias"]


def test_alexnet_output_shape():
    _, _, logits = trace_layers(alexnet_lib.AlexNet(num_classes=7), (2, 64, 64, 3))
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert models.get_model("alexnet", 7).num_classes == 7
    assert models.GRAD_CAM_LAYER["alexnet"] == "relu5"


def test_alexnet_layer_paths():
    shapes, kinds, logits = trace_layers(alexnet_lib.AlexNet(num_classes=3), (2, 224, 224, 3))
    # Hand-computed torchvision sizes at 224 px: 55 -> 27 -> 27 -> 13 -> 13 -> 6.
    assert shapes["conv1"] == [(2, 55, 55, 64)] and shapes["pool1"] == [(2, 27, 27, 64)]
    assert shapes["conv2"] == [(2, 27, 27, 192)] and shapes["pool2"] == [(2, 13, 13, 192)]
    assert shapes["conv3"] == [(2, 13, 13, 384)]
    assert shapes["conv4"] == shapes["conv5"] == [(2, 13, 13, 256)]
    assert shapes["relu5"] == [(2, 13, 13, 256)]  # the Grad-CAM layer
    assert shapes["pool5"] == shapes["avgpool"] == [(2, 6, 6, 256)]
    assert shapes["drop5"] == [(2, 9216)]
    assert shapes["fc6"] == shapes["relu6"] == shapes["drop6"] == shapes["fc7"] == shapes["relu7"] == [(2, 4096)]
    assert shapes["fc8"] == [(2, 3)] and logits.shape == (2, 3)
    for i in range(1, 8):
        assert kinds[f"relu{i}"] == "ReLU"
    assert {kinds[p] for p in ("pool1", "pool2", "pool5")} == {"MaxPool"}
    assert kinds["avgpool"] == "AdaptiveAvgPool" and kinds["drop5"] == kinds["drop6"] == "Dropout"
    assert "drop7" not in shapes  # torchvision has no dropout after relu7
    assert all(len(v) == 1 for v in shapes.values()), "every named layer must run once"


def test_alexnet_size_checks():
    assert [alexnet_lib.alexnet_pool5_size(h) for h in (62, 63, 96, 128, 224)] == [0, 1, 2, 3, 6]
    with pytest.raises(ValueError, match="at least 63x63"):
        abstract_init(alexnet_lib.AlexNet(num_classes=3), (1, 62, 80, 3))
    abstract_init(alexnet_lib.AlexNet(num_classes=3), (1, 63, 63, 3))
    with pytest.raises(ValueError, match="conv_features needs 5 entries"):
        abstract_init(alexnet_lib.AlexNet(num_classes=3, conv_features=(4, 4)), (1, 64, 64, 3))


def test_alexnet_dropout_only_in_train():
    model = alexnet_lib.AlexNet(num_classes=3, conv_features=ALEXNET_WIDTHS, fc_features=16)
    x = jnp.asarray(np.random.default_rng(6).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32))
    variables = numpy_variables(model, x.shape)

    @jax.jit
    def run(variables, x):
        eval_logits = model.apply(variables, x, train=False)
        train_logits = model.apply(variables, jnp.concatenate([x, x]), train=True, rngs={"dropout": jax.random.key(1)})
        return eval_logits, train_logits

    eval_logits, train_logits = run(variables, x)
    assert np.max(np.abs(train_logits[:2] - train_logits[2:])) > 1e-6
    assert np.max(np.abs(train_logits[:2] - eval_logits)) > 1e-6
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)


def test_alexnet_import_matches_numpy_reference(tmp_path):
    # 96x128 px: pool5 is 2x3, upsampled to 6x6 by overlapping bins, so fc6's flatten order is fully exercised.
    images = np.random.default_rng(7).uniform(0, 1, (2, 96, 128, 3)).astype(np.float32)
    sd = alexnet_state_dict(np.random.default_rng(8), widths=ALEXNET_WIDTHS, fc=24, num_classes=6)
    model = alexnet_lib.AlexNet(num_classes=6, conv_features=ALEXNET_WIDTHS, fc_features=24)
    st_path, _ = save_both(tmp_path, sd, "alexnet")
    variables = weights.load_pretrained("AlexNet", st_path, abstract_init(model, images.shape))
    np.testing.assert_array_equal(variables["params"]["conv4"]["kernel"],
                                  sd["features.8.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc7"]["kernel"], sd["classifier.4.weight"].T)
    logits = np.asarray(jax.jit(model.apply)(variables, images))
    reference = np_alexnet(sd, images)
    assert np.std(reference) > 0.1
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


def test_alexnet_import_errors():
    model = alexnet_lib.AlexNet(num_classes=6, conv_features=ALEXNET_WIDTHS, fc_features=24)
    shapes = abstract_init(model, (1, 64, 64, 3))
    sd = alexnet_state_dict(np.random.default_rng(9), widths=ALEXNET_WIDTHS, fc=24, num_classes=6)
    weights.import_alexnet(sd, shapes)
    bad = {k: v for k, v in sd.items() if k != "features.8.weight"}
    with pytest.raises(ValueError, match=r"(?s)import_alexnet.*missing keys \(1\): features\.8\.weight"):
        weights.import_alexnet(bad, shapes)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): classifier\.0\.weight"):
        weights.import_alexnet({**sd, "classifier.0.weight": np.zeros((24, 180), np.float32)}, shapes)
    # A 1000-class head is refused unless skip_head keeps ours.
    big_head = alexnet_state_dict(np.random.default_rng(9), widths=ALEXNET_WIDTHS, fc=24, num_classes=1000)
    with pytest.raises(ValueError, match=r"(?s)classifier\.6\.weight.*skip_head=True"):
        weights.import_alexnet(big_head, shapes)
    ours = jax.tree.map(lambda s: np.full(s.shape, 7.0, np.float32), shapes)
    variables = weights.import_alexnet(big_head, ours, skip_head=True)
    np.testing.assert_array_equal(variables["params"]["fc8"]["kernel"], 7.0)
    np.testing.assert_array_equal(variables["params"]["conv1"]["bias"], big_head["features.0.bias"])
    vgg_shapes = abstract_init(vgg_lib.VGG(num_classes=3, stage_features=(4, 4, 8, 8, 8), fc_features=32),
                               (1, 32, 32, 3))
    with pytest.raises(ValueError, match="not AlexNet-shaped"):
        weights.import_alexnet(sd, vgg_shapes)


def test_ucf101_alexnet_config_names_existing_layers():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "experiments" / "configs" / "excitation_dropout_thesis.py"
    spec = importlib.util.spec_from_file_location("_ed_thesis", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("ucf101_alexnet")
    assert c.model.name == "alexnet" and c.dataset.image_size == 224
    shapes, kinds, _ = trace_layers(models.get_model(c.model.name, 5), (1, 224, 224, 3))
    from saliency_jax.train import model_layers

    assert model_layers(c).grad_cam_layer == models.GRAD_CAM_LAYER["alexnet"] == "relu5"
    assert kinds[model_layers(c).grad_cam_layer] == "ReLU" and kinds[model_layers(c).classifier] == "Dense"
    assert c.dropout.layer == "relu6" and kinds[c.dropout.layer] == "ReLU"
    assert c.utilization.layer == c.compression.layer == c.dropout.layer
    assert c.utilization.weights == "fc6" and kinds["fc6"] == "Dense"
    assert tuple(c.dropout.bypass) == ("drop6",) and kinds["drop6"] == "Dropout"
