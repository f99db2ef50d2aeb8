"""Parity grounding methods (vanilla gradient, gradient x input, guided backprop, SmoothGrad, CAM, Grad-CAM++, RISE)
against hand-computed references on tiny models with fixed weights."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from saliency_jax.models import SmallCNN
from saliency_jax.saliency import grad_cam, linen_layer, split_layer
from saliency_jax.saliency.cam import (
    class_activation_map,
    grad_cam_plus_plus,
    grad_cam_plus_plus_weights,
    linen_class_activation_map,
)
from saliency_jax.saliency.gradients import (
    GuidedBackpropError,
    gradient_x_input,
    guided_backprop,
    reduce_attribution,
    smooth_grad,
    vanilla_gradient,
    with_guided_relu,
)
from saliency_jax.saliency.rise import _upsample_crop, rise, rise_masks

# ---------------------------------------------------------------------------------------------------------------
# A linear model on [batch, 3, 4, 2] images: logits = flatten(x) @ WLIN + BLIN, so d logit_c / dx = WLIN[:, c].

_rng = np.random.default_rng(0)
SHAPE = (3, 4, 2)
WLIN = _rng.normal(size=(int(np.prod(SHAPE)), 3)).astype(np.float32)
BLIN = np.array([0.5, -1.0, 2.0], np.float32)
X = _rng.uniform(-1, 1, size=(2, *SHAPE)).astype(np.float32)


def fixed_variables(module, x, seed):
    """Variables of ``module`` filled with fixed NumPy draws (no PRNG compilation): weights ~ N(0, 0.5^2), BatchNorm
    means ~ N(0, 0.1^2) and variances ~ U(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)

    def fill(path, s):
        name = str(path[-1])
        if "var" in name:
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return (rng.normal(size=s.shape) * (0.1 if "mean" in name else 0.5)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def linear_logits(x):
    return x.reshape(x.shape[0], -1) @ WLIN + BLIN


def _w(c):
    return WLIN[:, c].reshape(SHAPE)


def test_vanilla_gradient_of_linear_model_is_the_weights():
    targets = np.array([0, 2])
    raw = vanilla_gradient(linear_logits, jnp.asarray(X), jnp.asarray(targets), reduction="none")
    expected = np.stack([_w(c) for c in targets])
    np.testing.assert_allclose(raw, expected, rtol=1e-6)
    # Channel reductions as PAIR saliency (sum |.|), Captum (signed sum) and Simonyan et al. (max |.|) show them.
    for reduction, ref in [("abs_sum", np.abs(expected).sum(-1)), ("sum", expected.sum(-1)),
                           ("max_abs", np.abs(expected).max(-1))]:
        out = vanilla_gradient(linear_logits, jnp.asarray(X), jnp.asarray(targets), reduction=reduction)
        assert out.shape == (2, 3, 4) and out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref, rtol=1e-6)
    norm = vanilla_gradient(linear_logits, jnp.asarray(X), jnp.asarray(targets), normalize=True)
    a = np.abs(expected).sum(-1)
    lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(norm, (a - lo) / (hi - lo), rtol=1e-5, atol=1e-6)


def test_gradient_x_input_of_linear_model_is_x_times_w_and_complete():
    targets = np.array([1, 1])
    raw = gradient_x_input(linear_logits, jnp.asarray(X), 1, reduction="none")
    expected = X * np.stack([_w(c) for c in targets])
    np.testing.assert_allclose(raw, expected, rtol=1e-6, atol=1e-7)
    # Completeness for a linear model: the attributions sum to logit - bias.
    logits = linear_logits(X)
    np.testing.assert_allclose(np.asarray(raw).sum(axis=(1, 2, 3)), logits[:, 1] - BLIN[1], rtol=1e-5)
    np.testing.assert_allclose(gradient_x_input(linear_logits, jnp.asarray(X), 1, reduction="sum"),
                               expected.sum(-1), rtol=1e-5, atol=1e-6)


def test_softmax_score_and_target_forms():
    x = jnp.asarray(X)
    raw = vanilla_gradient(linear_logits, x, jnp.array([2, 0]), score="softmax", reduction="none")
    logits = linear_logits(X)
    for b, c in enumerate([2, 0]):
        p = np.exp(logits[b] - logits[b].max())
        p /= p.sum()
        dz = p[c] * ((np.arange(3) == c) - p)  # d p_c / d z_j
        np.testing.assert_allclose(raw[b], (WLIN @ dz).reshape(SHAPE), rtol=1e-4, atol=1e-7)
    pred = linear_logits(X).argmax(-1)
    np.testing.assert_allclose(vanilla_gradient(linear_logits, x, None, reduction="none"),
                               np.stack([_w(c) for c in pred]), rtol=1e-6)
    np.testing.assert_allclose(vanilla_gradient(linear_logits, x, 2), vanilla_gradient(linear_logits, x,
                                                                                       jnp.array([2, 2])))


# ---------------------------------------------------------------------------------------------------------------
# Guided backprop.

W1 = np.array([[1.0, -1.0, 0.5, 2.0], [-0.5, 1.0, 1.0, -1.0], [2.0, 0.5, -1.0, 1.0], [-1.0, -2.0, 0.5, 0.5]],
              np.float32)
B1 = np.array([0.1, 0.2, -0.1, 0.0], np.float32)
W2 = np.array([[1.0, -2.0, 0.5], [-1.0, 1.0, 1.0], [0.5, -0.5, -1.0], [1.0, 1.0, -2.0]], np.float32)
B2 = np.array([0.5, 0.3, 0.2], np.float32)
W3 = np.array([[1.0, -1.0], [-2.0, 1.0], [1.5, 0.5]], np.float32)
B3 = np.zeros(2, np.float32)
XMLP = np.array([[[[0.5], [-1.0]], [[1.0], [0.2]]],
                 [[[-0.3], [0.8]], [[0.6], [-0.9]]]], np.float32)  # [2, 2, 2, 1]


class MLP(nn.Module):
    act: object

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = self.act(nn.Dense(4)(x))
        x = self.act(nn.Dense(3)(x))
        return nn.Dense(2)(x)


MLP_PARAMS = {"params": {"Dense_0": {"kernel": W1, "bias": B1}, "Dense_1": {"kernel": W2, "bias": B2},
                         "Dense_2": {"kernel": W3, "bias": B3}}}


def guided_reference(x, c):
    """Springenberg et al. Fig. 1, by hand: R_l = (f_l > 0) (R_{l+1} > 0) R_{l+1} at each ReLU."""
    z1 = x.reshape(-1) @ W1 + B1
    z2 = np.maximum(z1, 0) @ W2 + B2
    g = W3[:, c]
    r2 = g * (z2 > 0) * (g > 0)
    g1 = W2 @ r2
    r1 = g1 * (z1 > 0) * (g1 > 0)
    return (W1 @ r1).reshape(x.shape)


def vanilla_reference(x, c):
    z1 = x.reshape(-1) @ W1 + B1
    z2 = np.maximum(z1, 0) @ W2 + B2
    g1 = W2 @ (W3[:, c] * (z2 > 0))
    return (W1 @ (g1 * (z1 > 0))).reshape(x.shape)


@pytest.mark.parametrize("act", [nn.relu, jax.nn.relu, lambda v: jnp.maximum(v, 0.0),
                                 lambda v: jnp.maximum(jnp.zeros_like(v), v)],
                         ids=["nn.relu", "jax.nn.relu", "maximum", "maximum_zeros_like"])
def test_guided_backprop_matches_hand_computed_rule(act):
    f = functools.partial(MLP(act).apply, MLP_PARAMS)
    targets = np.array([0, 1])
    guided = guided_backprop(f, jnp.asarray(XMLP), jnp.asarray(targets), reduction="none")
    plain = vanilla_gradient(f, jnp.asarray(XMLP), jnp.asarray(targets), reduction="none")
    for b, c in enumerate(targets):
        np.testing.assert_allclose(guided[b], guided_reference(XMLP[b], c), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(plain[b], vanilla_reference(XMLP[b], c), rtol=1e-5, atol=1e-6)
    assert not np.allclose(guided, plain)  # the fixed weights make the guided rule matter
    jitted = jax.jit(lambda x: guided_backprop(f, x, jnp.asarray(targets), reduction="none"))(jnp.asarray(XMLP))
    np.testing.assert_allclose(jitted, guided, rtol=1e-6)


@jax.custom_vjp
def _manual_guided_relu(x):
    return jnp.maximum(x, 0.0)


_manual_guided_relu.defvjp(lambda x: (jnp.maximum(x, 0.0), x),
                           lambda x, g: (jnp.where((x > 0) & (g > 0), g, 0.0),))


class ConvNet(nn.Module):
    """A linen CNN written without saliency_jax in mind: conv, nn.relu, max pool, conv, jax.nn.relu, GAP, dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jax.nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_guided_backprop_on_unmodified_conv_net_matches_manual_guided_network():
    net = ConvNet()
    x = jnp.asarray(_rng.normal(size=(3, 8, 8, 2)).astype(np.float32))
    v = fixed_variables(net, x, 1)
    p = v["params"]

    def manual(im):  # the same network rebuilt with an explicitly guided ReLU
        h = _manual_guided_relu(nn.Conv(3, (3, 3)).apply({"params": p["Conv_0"]}, im))
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = _manual_guided_relu(nn.Conv(4, (3, 3)).apply({"params": p["Conv_1"]}, h))
        return nn.Dense(3).apply({"params": p["Dense_0"]}, h.mean(axis=(1, 2)))

    targets = jnp.array([0, 1, 2])
    ours = jax.jit(lambda im: guided_backprop(functools.partial(net.apply, v), im, targets, reduction="none"))(x)
    reference = jax.jit(jax.grad(lambda im: jnp.sum(jnp.take_along_axis(manual(im), targets[:, None], 1))))(x)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    plain = jax.jit(lambda im: jax.grad(lambda z: jnp.sum(net.apply(v, z)[jnp.arange(3), targets]))(im))(x)
    assert not np.allclose(ours, plain)


def _scan_relu(x):
    return jax.lax.scan(lambda c, row: (c, jnp.maximum(row, 0.0)), 0.0, x)[1]


@pytest.mark.parametrize("act, match", [
    (jax.nn.leaky_relu, "select_n"),
    (jax.nn.relu6, "'min'"),
    (lambda v: jnp.where(v > 0, v, 0.0), "select_n"),
    (lambda v: v * (v > 0), "float mask"),
    (lambda v: jnp.clip(v, 0.0, 1.0), "'min'"),
    (lambda v: jnp.maximum(v, 0.5), "not known to be zero"),
    (lambda v: jnp.maximum(v, 0.1 * v), "maxout"),
    (jnp.tanh, "no ReLU"),
    (_scan_relu, "control-flow"),
], ids=["leaky_relu", "relu6", "where", "mask_product", "clip", "shifted", "max_of_two", "no_relu", "scan"])
def test_guided_backprop_refuses_unrecognised_rectifiers(act, match):
    f = functools.partial(MLP(act).apply, MLP_PARAMS)
    with pytest.raises(GuidedBackpropError, match=match):
        guided_backprop(f, jnp.asarray(XMLP), 0)
    assert issubclass(GuidedBackpropError, ValueError)


def test_with_guided_relu_keeps_forward_values():
    f = functools.partial(MLP(nn.relu).apply, MLP_PARAMS)
    np.testing.assert_allclose(with_guided_relu(f)(jnp.asarray(XMLP)), f(jnp.asarray(XMLP)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# CAM and Grad-CAM++ (feature maps A and classifier W as in test_grad_cam).

A = np.array(
    [[[[1.0, 0.0], [2.0, 1.0]],
      [[0.0, 3.0], [1.0, -1.0]]],
     [[[0.5, 0.5], [-2.0, 1.0]],
      [[4.0, 0.0], [0.0, 2.0]]]], np.float32)
W = np.array([[1.0, -1.0, 0.5],
              [2.0, 1.0, -0.5]], np.float32)
B = np.array([0.25, -0.5, 1.0], np.float32)


def test_class_activation_map_is_classifier_at_every_position():
    targets = np.array([0, 2])
    maps = class_activation_map(jnp.asarray(A), W, B, jnp.asarray(targets))
    expected = np.stack([A[b] @ W[:, c] + B[c] for b, c in enumerate(targets)])
    assert expected[0, 0, 1] == pytest.approx(2.0 * 1.0 + 1.0 * 2.0 + 0.25)
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
    # Spatial mean of the CAM = the GAP network's logit.
    logits = A.mean(axis=(1, 2)) @ W + B
    np.testing.assert_allclose(np.asarray(maps).mean(axis=(1, 2)), logits[[0, 1], targets], rtol=1e-6)
    no_bias = class_activation_map(jnp.asarray(A), W, None, jnp.asarray(targets))
    np.testing.assert_allclose(no_bias, expected - B[targets][:, None, None], rtol=1e-6, atol=1e-7)
    pred = class_activation_map(jnp.asarray(A), W, B)
    np.testing.assert_allclose(pred, class_activation_map(jnp.asarray(A), W, B, jnp.asarray(logits.argmax(-1))))
    big = class_activation_map(jnp.asarray(A), W, B, 0, size=(4, 4), relu=True, normalize=True)
    assert big.shape == (2, 4, 4) and float(big.min()) >= 0 and float(big.max()) <= 1


@functools.cache
def _small_cnn():
    """SmallCNN (3 classes) with fixed weights and non-trivial BatchNorm statistics, and 4 images [16, 16, 1]."""
    model = SmallCNN(num_classes=3, widths=(4, 6, 8))
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(4, 16, 16, 1)).astype(np.float32))
    return model, fixed_variables(model, x, 3), x


def test_linen_cam_spatial_mean_equals_every_logit():
    model, variables, x = _small_cnn()
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    # Every class of every example in one call: the batch repeated once per class.
    x3 = jnp.concatenate([x] * 3)
    classes = jnp.repeat(jnp.arange(3), 4)
    maps = jax.jit(lambda im: linen_class_activation_map(model, variables, im, classes, features_layer="conv3",
                                                         classifier="fc", resize=False, normalize=False,
                                                         train=False))(x3)
    assert maps.shape == (12, 4, 4)
    np.testing.assert_allclose(np.asarray(maps).mean(axis=(1, 2)), np.asarray(logits).T.reshape(-1), rtol=1e-5,
                               atol=1e-5)
    # Same as the pure-array CAM on the layer's output and the dense parameters.
    _, features = jax.jit(linen_layer(model, variables, "conv3", train=False))(x)
    fc = variables["params"]["fc"]
    np.testing.assert_allclose(  # called eagerly: its GAP check must accept this GAP network
        linen_class_activation_map(model, variables, x, features_layer="conv3", classifier="fc", train=False),
        class_activation_map(features, fc["kernel"], fc["bias"], jnp.argmax(logits, -1), size=(16, 16),
                             normalize=True), atol=1e-6)


class PreReluNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="last_conv")(x))  # the module's output is pre-ReLU
        return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


def test_cam_bad_input_raises():
    with pytest.raises(ValueError, match="kernel"):
        class_activation_map(jnp.asarray(A), np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="bias"):
        class_activation_map(jnp.asarray(A), W, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="features"):
        class_activation_map(jnp.asarray(A[0]), W)
    with pytest.raises(ValueError, match="out of range"):
        class_activation_map(jnp.asarray(A), W, B, 5)
    net = PreReluNet()
    x = jnp.asarray(_rng.normal(size=(2, 6, 6, 1)).astype(np.float32))
    v = fixed_variables(net, x, 4)
    with pytest.raises(ValueError, match="spatial mean"):
        linen_class_activation_map(net, v, x, features_layer="last_conv", classifier="head")
    with pytest.raises(ValueError, match="not found.*last_conv"):
        linen_class_activation_map(net, v, x, features_layer="conv9", classifier="head")


def test_grad_cam_plus_plus_matches_hand_computed_reference():
    # logits_c = mean_ij sum_k V_kc A_ijk^2  ->  g = d y^c / d A_ijk = 2 V_kc A_ijk / 4.
    V = np.array([[1.0, -2.0], [-1.0, 0.5]], np.float32)
    model = split_layer(lambda x: x, lambda a: jnp.mean(a[..., :, None] ** 2 * V, axis=(1, 2)).sum(1))
    targets = np.array([0, 1])
    maps = grad_cam_plus_plus(model, jnp.asarray(A), jnp.asarray(targets), relu=False, resize=False,
                              normalize=False)
    for b, c in enumerate(targets):
        g = 2 * V[:, c] * A[b] / 4.0  # [h, w, k]
        weights = np.zeros(2)
        for k in range(2):  # pytorch-grad-cam's GradCAMPlusPlus.get_cam_weights, written out per channel
            s = A[b, :, :, k].sum()
            for i in range(2):
                for j in range(2):
                    gij = g[i, j, k]
                    alpha = gij ** 2 / (2 * gij ** 2 + s * gij ** 3 + 1e-6) if gij != 0 else 0.0
                    weights[k] += max(gij, 0.0) * alpha
        np.testing.assert_allclose(maps[b], A[b] @ weights, rtol=1e-5, atol=1e-6)
    relu = grad_cam_plus_plus(model, jnp.asarray(A), jnp.asarray(targets), resize=False, normalize=False)
    np.testing.assert_allclose(relu, np.maximum(maps, 0))
    # Differs from Grad-CAM's plain mean of the gradients.
    assert not np.allclose(maps, grad_cam(model, jnp.asarray(A), jnp.asarray(targets), relu=False, resize=False,
                                          normalize=False))


def test_grad_cam_plus_plus_weights_for_constant_gradient():
    # g = 0.5 everywhere on a 2x2 map with sum A = 4: alpha = 0.25 / (0.5 + 4 * 0.125) = 0.25; w = 4 * 0.5 * 0.25.
    act = jnp.ones((1, 2, 2, 1))
    w = grad_cam_plus_plus_weights(act, jnp.full((1, 2, 2, 1), 0.5), eps=0.0)
    np.testing.assert_allclose(w, [[0.5]], rtol=1e-6)
    assert float(grad_cam_plus_plus_weights(act, jnp.zeros((1, 2, 2, 1)))[0, 0]) == 0.0  # no NaN at g == 0


# ---------------------------------------------------------------------------------------------------------------
# RISE.


def test_mask_upsampling_matches_mirror_bilinear_reference():
    rng = np.random.default_rng(1)
    for s, (h, w) in [(3, (8, 8)), (4, (10, 7))]:
        grid = (rng.random((s, s)) < 0.5).astype(np.float32)
        cell = (-(-h // s), -(-w // s))
        up = ((s + 1) * cell[0], (s + 1) * cell[1])
        # skimage.transform.resize(order=1, mode="reflect") = ndimage, half-pixel centres, mode "mirror".
        r = (np.arange(up[0]) + 0.5) * s / up[0] - 0.5
        c = (np.arange(up[1]) + 0.5) * s / up[1] - 0.5
        big = ndi.map_coordinates(grid.astype(np.float64), np.meshgrid(r, c, indexing="ij"), order=1, mode="mirror")
        for shift in [(0, 0), (cell[0] - 1, cell[1] - 1)]:
            ours = _upsample_crop(jnp.asarray(grid), jnp.array(shift), (h, w))
            np.testing.assert_allclose(ours, big[shift[0]:shift[0] + h, shift[1]:shift[1] + w], atol=1e-6)


def test_rise_masks_properties():
    m = jax.jit(functools.partial(rise_masks, num_masks=300, image_size=(12, 12), grid_size=3, p=0.25))(
        jax.random.key(0))
    assert m.shape == (300, 12, 12) and m.dtype == jnp.float32
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert abs(float(m.mean()) - 0.25) < 0.05
    ones = jax.jit(functools.partial(rise_masks, num_masks=5, image_size=(8, 8), grid_size=4, p=1.0))
    np.testing.assert_array_equal(ones(jax.random.key(0)), 1.0)


def test_rise_equals_reference_sum_over_its_masks():
    x = jnp.asarray(np.abs(X))
    key = jax.random.key(7)
    maps = jax.jit(lambda k: rise(linear_logits, k, x, jnp.array([0, 2]), num_masks=20, grid_size=2, p=0.5,
                                  masks_per_step=6))(key)
    masks = np.asarray(jax.jit(lambda k: rise_masks(k, 20, (3, 4), grid_size=2, p=0.5))(key))
    xn = np.asarray(x)
    for b, c in enumerate([0, 2]):
        total = np.zeros((3, 4))
        for m in masks:
            z = (xn[b] * m[:, :, None]).reshape(-1) @ WLIN + BLIN
            prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            total += prob[c] * m
        np.testing.assert_allclose(maps[b], total / (20 * 0.5), rtol=1e-5, atol=1e-6)


def _box_logits(x):
    """Class 0: mean intensity inside rows 4:8, columns 10:14; class 1: a tenth of the overall mean."""
    return jnp.stack([x[:, 4:8, 10:14].mean(axis=(1, 2, 3)), 0.1 * x.mean(axis=(1, 2, 3))], -1)


def test_rise_peaks_inside_known_box_and_is_deterministic():
    x = jnp.ones((2, 16, 16, 1))
    def runner(masks_per_step):
        return jax.jit(lambda key: rise(_box_logits, key, x, 0, num_masks=300, grid_size=4, score="logit",
                                        masks_per_step=masks_per_step))

    run = runner(50)
    maps = run(jax.random.key(0))
    for b in range(2):
        r, c = np.unravel_index(np.argmax(maps[b]), (16, 16))
        assert 4 <= r < 8 and 10 <= c < 14, (r, c)
        assert float(maps[b, 4:8, 10:14].mean()) > float(maps[b].mean())
    np.testing.assert_array_equal(run(jax.random.key(0)), maps)
    assert not np.allclose(run(jax.random.key(1)), maps)
    # The masks are drawn per index: the chunking does not change the result.
    np.testing.assert_allclose(runner(64)(jax.random.key(0)), maps, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# SmoothGrad.

XS = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(1, 4, 4, 1)
WS = np.where(np.arange(16) % 3 == 0, -1.0, 1.0).astype(np.float32).reshape(1, 4, 4, 1)


def _relu_logits(x):
    """score_0 = sum w * relu(x): gradient w * 1[x > 0]."""
    return jnp.stack([jnp.sum(WS * jax.nn.relu(x), axis=(1, 2, 3)), jnp.zeros(x.shape[0])], -1)


def test_smooth_grad_matches_gaussian_expectation():
    # E[w 1[x + n > 0]] = w Phi(x / sigma), sigma = noise_level * (max - min) = 0.5 * 2 = 1.
    method = functools.partial(vanilla_gradient, _relu_logits, reduction="none")
    phi = np.vectorize(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))))(XS)
    smoothed, squared = jax.jit(lambda key: [
        smooth_grad(method, key, jnp.asarray(XS), 0, num_samples=3000, noise_level=0.5, magnitude=magnitude,
                    samples_per_step=500) for magnitude in (False, True)])(jax.random.key(0))
    np.testing.assert_allclose(smoothed, WS * phi, atol=0.05)
    np.testing.assert_allclose(squared, WS ** 2 * phi, atol=0.05)
    assert reduce_attribution(smoothed).shape == (1, 4, 4)


def test_smooth_grad_determinism_chunking_and_zero_noise():
    x = jnp.asarray(np.concatenate([XS, -XS]))
    method = functools.partial(gradient_x_input, _relu_logits)

    def runner(samples_per_step, noise_level=0.2):
        return jax.jit(lambda key: smooth_grad(method, key, x, 0, num_samples=10, noise_level=noise_level,
                                               samples_per_step=samples_per_step))

    run = runner(4)
    a = run(jax.random.key(3))
    np.testing.assert_array_equal(run(jax.random.key(3)), a)
    assert not np.allclose(run(jax.random.key(4)), a)
    np.testing.assert_allclose(runner(10)(jax.random.key(3)), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner(10, 0.0)(jax.random.key(3)), method(x, 0), rtol=1e-6)
    # Wraps layer methods too (any method(images, targets)): Grad-CAM averaged over noisy inputs.
    cam = functools.partial(grad_cam, split_layer(lambda im: jax.nn.relu(im), lambda a: jnp.mean(a, (1, 2)) @ W),
                            resize=False, normalize=False)
    smoothed = smooth_grad(cam, jax.random.key(0), jnp.asarray(A), 1, num_samples=3)
    assert smoothed.shape == (2, 2, 2) and not np.allclose(smoothed, cam(jnp.asarray(A), 1))


# ---------------------------------------------------------------------------------------------------------------
# Batched == vmap for every method.


def _methods(model, variables):
    f = functools.partial(model.apply, variables, train=False)
    layer = linen_layer(model, variables, "conv3", train=False)
    return {
        "vanilla_gradient": lambda x, y: vanilla_gradient(f, x, y),
        "gradient_x_input": lambda x, y: gradient_x_input(f, x, y, reduction="sum"),
        "guided_backprop": lambda x, y: guided_backprop(f, x, y, score="softmax"),
        "grad_cam_plus_plus": lambda x, y: grad_cam_plus_plus(layer, x, y),
        "cam": lambda x, y: linen_class_activation_map(model, variables, x, y, features_layer="conv3",
                                                       classifier="fc", train=False),
        "rise": lambda x, y: rise(f, jax.random.key(0), x, y, num_masks=8, grid_size=4, masks_per_step=4),
    }


@pytest.mark.parametrize("name", ["vanilla_gradient", "gradient_x_input", "guided_backprop", "grad_cam_plus_plus",
                                  "cam", "rise"])
def test_batched_equals_vmap(name):
    model, variables, x = _small_cnn()
    fn = _methods(model, variables)[name]
    labels = jnp.array([0, 1, 2, 0])
    batched = jax.jit(fn)(x, labels)
    vmapped = jax.jit(jax.vmap(lambda im, y: fn(im[None], y[None])[0]))(x, labels)
    assert batched.shape == (4, 16, 16) and batched.dtype == jnp.float32
    np.testing.assert_allclose(batched, vmapped, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises():
    x = jnp.asarray(X)
    for method in (vanilla_gradient, gradient_x_input):
        with pytest.raises(ValueError, match="batch, height, width, channels"):
            method(linear_logits, x[0])
        with pytest.raises(TypeError, match="floating point"):
            method(linear_logits, x.astype(jnp.int32))
        with pytest.raises(ValueError, match="shape"):
            method(linear_logits, x, jnp.array([0, 1, 2]))
        with pytest.raises(ValueError, match="out of range"):
            method(linear_logits, x, 3)
        with pytest.raises(ValueError, match="reduction"):
            method(linear_logits, x, reduction="l2")
        with pytest.raises(ValueError, match="score"):
            method(linear_logits, x, score="prob")
        with pytest.raises(ValueError, match=r"logits \[batch=2"):
            method(lambda im: im.reshape(-1), x, 0)
    with pytest.raises(TypeError, match="logits_fn"):
        guided_backprop(None, x)
    with pytest.raises(ValueError, match="num_masks"):
        rise(linear_logits, jax.random.key(0), x, num_masks=0)
    with pytest.raises(ValueError, match="grid_size"):
        rise(linear_logits, jax.random.key(0), x, grid_size=5)
    with pytest.raises(ValueError, match="p "):
        rise(linear_logits, jax.random.key(0), x, grid_size=2, p=0.0)
    with pytest.raises(ValueError, match="score"):
        rise(linear_logits, jax.random.key(0), x, grid_size=2, score="prob")
    method = functools.partial(vanilla_gradient, linear_logits)
    with pytest.raises(ValueError, match="num_samples"):
        smooth_grad(method, jax.random.key(0), x, num_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        smooth_grad(method, jax.random.key(0), x, noise_level=-0.1)
    with pytest.raises(ValueError, match="method must return"):
        smooth_grad(lambda im, t: jnp.zeros(3), jax.random.key(0), x)
    with pytest.raises(ValueError, match="spatial"):
        grad_cam_plus_plus(split_layer(lambda v: v.mean((1, 2)), lambda a: a @ WLIN[:2]), x)
