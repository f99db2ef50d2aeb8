"""Tests of the small-map convolution lowering (saliency_jax.models.conv) and of the torchvision weight export."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.models import alexnet as alexnet_lib
from saliency_jax.models import conv as conv_lib
from saliency_jax.models import resnet as resnet_lib
from saliency_jax.models import vgg as vgg_lib
from saliency_jax.models import weights
from saliency_jax.saliency import excitation_backprop, linen_layer

# (input h, w), kernel, stride, padding: the swapped-operand cases of XLA (2x2 / 1x1 maps under a 3x3 kernel),
# strides, SAME/VALID, asymmetric and cropping (negative) padding, a 5x5 kernel, non-square maps.
CASES = [
    ((2, 2), 3, 1, ((1, 1), (1, 1))),
    ((1, 1), 3, 1, "SAME"),
    ((1, 3), 3, 1, ((1, 1), (1, 1))),
    ((4, 4), 3, 2, ((1, 1), (1, 1))),
    ((3, 4), 5, 1, ((2, 2), (2, 2))),
    ((5, 5), 3, 2, "VALID"),
    ((4, 3), 3, 1, ((0, 2), (1, 0))),
    ((4, 4), 3, 1, ((-1, 1), (1, 1))),
    ((6, 5), 2, 2, "SAME"),
    ((4, 5), 5, 1, ((2, 2), (2, 2))),
]


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("hw, k, stride, padding", CASES)
def test_patches_lowering_equals_nn_conv(hw, k, stride, padding):
    x = _images((2, *hw, 5))
    reference = nn.Conv(6, (k, k), strides=(stride, stride), padding=padding)
    ours = conv_lib.Conv(6, (k, k), strides=(stride, stride), padding=padding, max_input_pixels=10**9)
    variables = reference.init(jax.random.key(1), x)
    # Same parameter names, shapes and initial values (same initialisers, created in the same order).
    ours_variables = ours.init(jax.random.key(1), x)
    assert jax.tree.structure(ours_variables) == jax.tree.structure(variables)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours_variables), jax.tree.leaves(variables)))

    @jax.jit
    def outputs_and_gradients(v, xx):
        # Gradients with respect to the input and the kernel (training, Grad-CAM, input gradients).
        def loss(module, vv, xxx):
            y = module.apply(vv, xxx)
            return jnp.sum(jnp.sin(y)), y

        return [jax.grad(loss, argnums=(1, 2), has_aux=True)(m, v, xx) for m in (reference, ours)]

    (g_ref, expected), (g_ours, got) = outputs_and_gradients(variables, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_patches_conv2d_matches_a_numpy_loop():
    x = np.random.default_rng(2).normal(size=(1, 2, 3, 2)).astype(np.float32)
    w = np.random.default_rng(3).normal(size=(3, 3, 2, 4)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((1, 2, 3, 4), np.float32)
    for i in range(2):
        for j in range(3):
            expected[0, i, j] = np.einsum("hwc,hwco->o", xp[0, i:i + 3, j:j + 3], w)
    got = conv_lib.patches_conv2d(jnp.asarray(x), jnp.asarray(w), (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_routing_rule():
    assert conv_lib.uses_patches((2, 2), (3, 3), 16)
    assert conv_lib.uses_patches((4, 4), (3, 3), 16)
    assert not conv_lib.uses_patches((7, 7), (3, 3), 16)
    assert not conv_lib.uses_patches((2, 2), (1, 1), 16)  # 1x1 kernels are already matrix products
    assert not conv_lib.uses_patches((2, 2), (3, 3), 0)
    assert conv_lib.uses_patches((4, 5), (5, 5), 16)  # 20 pixels, but the 5x5 window is larger: XLA would swap
    assert not conv_lib.uses_patches((8, 8), (5, 5), 16)
    assert conv_lib.uses_patches((2, 2), (3, 3)) == (4 <= conv_lib.PATCHES_MAX_INPUT_PIXELS)


def test_conv2d_uses_a_dot_on_small_maps_and_a_convolution_on_large_ones():
    w = jnp.zeros((3, 3, 4, 4))
    small = jax.make_jaxpr(lambda x: conv_lib.conv2d(x, w, (1, 1), "SAME", max_input_pixels=16))(
        jnp.zeros((1, 2, 2, 4)))
    large = jax.make_jaxpr(lambda x: conv_lib.conv2d(x, w, (1, 1), "SAME", max_input_pixels=16))(
        jnp.zeros((1, 8, 8, 4)))
    names = lambda jaxpr: {e.primitive.name for e in jaxpr.jaxpr.eqns}  # noqa: E731
    assert "dot_general" in names(small) and "conv_general_dilated" not in names(small)
    assert "conv_general_dilated" in names(large) and "dot_general" not in names(large)


@pytest.mark.parametrize("stride", [1, 2])
def test_unpadded_1x1_convolutions_are_one_dot_and_equal_nn_conv(stride, monkeypatch):
    x = _images((2, 7, 6, 5))
    reference, ours = nn.Conv(6, (1, 1), strides=stride, padding=0), conv_lib.Conv(6, (1, 1), strides=stride,
                                                                                  padding=0)
    variables = reference.init(jax.random.key(1), x)
    names = lambda f: {e.primitive.name for e in jax.make_jaxpr(f)(x).jaxpr.eqns}  # noqa: E731
    assert "dot_general" in names(lambda xx: ours.apply(variables, xx))
    assert "conv_general_dilated" not in names(lambda xx: ours.apply(variables, xx))

    def loss(module, xx):
        return jnp.sum(jnp.sin(module.apply(variables, xx)))

    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(functools.partial(loss, ours))(x),
                               jax.grad(functools.partial(loss, reference))(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(conv_lib, "DOT_1X1", False)
    assert "conv_general_dilated" in names(lambda xx: ours.apply(variables, xx))
    padded = conv_lib.Conv(6, (1, 1), padding=1)  # a padded 1x1 convolution keeps the convolution
    monkeypatch.setattr(conv_lib, "DOT_1X1", True)
    assert "conv_general_dilated" in names(lambda xx: padded.apply(padded.init(jax.random.key(0), xx), xx))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="inputs must be"):
        conv_lib.Conv(4, (3, 3)).init(jax.random.key(0), jnp.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="padding"):
        conv_lib.conv2d(jnp.zeros((1, 2, 2, 3)), jnp.zeros((3, 3, 3, 4)), (1, 1), "FULL")
    with pytest.raises(ValueError, match="channels"):
        conv_lib.patches_conv2d(jnp.zeros((1, 2, 2, 3)), jnp.zeros((3, 3, 2, 4)), (1, 1), "SAME")
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv_lib.patches_conv2d(jnp.zeros((1, 2, 2, 3)), jnp.zeros((3, 3, 3, 4)), (1, 1), "VALID")


class _TinyNet(nn.Module):
    """4x4 input - conv - ReLU - 2x2 max pool - conv on a 2x2 map - ReLU - mean - dense."""

    max_input_pixels: int

    @nn.compact
    def __call__(self, x):
        conv = lambda f, name: conv_lib.Conv(f, (3, 3), padding=((1, 1), (1, 1)),  # noqa: E731
                                             max_input_pixels=self.max_input_pixels, name=name)
        x = nn.relu(conv(6, "conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(conv(5, "conv2")(x))
        return nn.Dense(4, name="fc")(jnp.mean(x, axis=(1, 2)))


def test_logits_and_excitation_backprop_are_the_same_with_either_lowering():
    """EB through the im2col + dot_general lowering equals EB through conv_general_dilated (the EB rule of a
    matrix product on copied patches sums the copies' signals, which is the convolution's rule)."""
    images = jax.random.uniform(jax.random.key(3), (3, 4, 4, 2))
    variables = _TinyNet(0).init(jax.random.key(4), images)

    def run(model):
        def fn(v, x):
            logits = model.apply(v, x)
            eb = excitation_backprop(linen_layer(model, v, "conv1"), x, targets=jnp.array([0, 1, 3]))
            return logits, eb.probability

        return str(jax.make_jaxpr(fn)(variables, images)), jax.jit(fn)(variables, images)

    jaxpr_lax, (logits_lax, eb_lax) = run(_TinyNet(0))
    jaxpr_patches, (logits_patches, eb_patches) = run(_TinyNet(16))
    assert "conv_general_dilated" in jaxpr_lax
    assert "conv_general_dilated" not in jaxpr_patches
    np.testing.assert_allclose(logits_patches, logits_lax, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eb_patches, eb_lax, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(eb_patches.sum(axis=(1, 2, 3)), 1.0, rtol=1e-4)


@pytest.mark.parametrize("name, model, size", [
    ("resnet18", resnet_lib.ResNet18(num_classes=5, num_filters=4), 32),
    ("resnet50", resnet_lib.ResNet50(num_classes=5, num_filters=4), 32),
    ("vgg16", vgg_lib.VGG16(num_classes=5, stage_features=(4, 4, 8, 8, 8), fc_features=16), 32),
    ("alexnet", alexnet_lib.AlexNet(num_classes=5, conv_features=(4, 8, 8, 8, 8), fc_features=16), 64),
])
def test_export_state_dict_round_trips(name, model, size):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    # Distinct values everywhere, so a wrong permutation cannot go unnoticed.
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    variables = jax.tree.unflatten(treedef, [rng.normal(size=v.shape).astype(np.float32) for v in leaves])
    state_dict = weights.export_state_dict(name, variables)
    assert all(v.dtype == np.float32 for v in state_dict.values())
    if name.startswith("resnet"):
        assert state_dict["conv1.weight"].shape == (4, 3, 7, 7)
        np.testing.assert_array_equal(state_dict["conv1.weight"][2, 1, 3, 4],
                                      variables["params"]["conv1"]["kernel"][3, 4, 1, 2])
        back = weights.import_resnet(state_dict, variables, arch=name)
    elif name == "vgg16":
        back = weights.import_vgg16(state_dict, variables)
    else:
        back = weights.import_alexnet(state_dict, variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_export_unknown_model_raises():
    with pytest.raises(ValueError, match="unknown model_name"):
        weights.export_state_dict("inception", {"params": {}})


def test_int_strides_and_padding_as_nn_conv():
    x = _images((1, 5, 5, 2))
    reference = nn.Conv(3, (3, 3), strides=2, padding=1)
    variables = reference.init(jax.random.key(0), x)
    got = conv_lib.Conv(3, (3, 3), strides=2, padding=1).apply(variables, x)
    np.testing.assert_allclose(got, reference.apply(variables, x), rtol=1e-5, atol=1e-5)
