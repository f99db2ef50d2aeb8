"""Grad-CAM attention guidance and the RRR penalty against hand computations and float64 NumPy references.

The second-order gradient of the guidance loss (through Grad-CAM's own ``jax.grad``) is checked against central
finite differences of an independent float64 NumPy implementation of the whole loss on a tiny model whose head
parameters reach the map *only* through Grad-CAM's gradient: without the second-order term their gradient would be 0.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from saliency_jax.models import SmallCNN
from saliency_jax.saliency import grad_cam, linen_layer, split_layer
from saliency_jax.training import attention_guidance as ag


# ----------------------------------------------------------------------------------------------------------------
# Soft IoU.


def test_soft_iou_hand_values():
    g = np.array([[[1.0, 0.0], [0.5, 0.0]]], np.float32)
    s = np.array([[[1.0, 1.0], [0.0, 0.0]]], np.float32)
    # I = 1*1 = 1;  U = (1 + 1 - 1) + (0 + 1 - 0) + (0.5 + 0 - 0) + 0 = 2.5.
    np.testing.assert_allclose(ag.soft_iou(jnp.asarray(g), jnp.asarray(s), epsilon=1.0), [(1 + 1) / (2.5 + 1)],
                               rtol=1e-6)
    np.testing.assert_allclose(ag.soft_iou(jnp.asarray(g), jnp.asarray(s), epsilon=1e-6), [1 / 2.5], rtol=1e-5)
    # Soft values: G = 0.5 everywhere on a 2x2 map, S = [1, 0; 0, 0]: I = 0.5, U = 0.5 * 4 + 1 - 0.5 = 2.5.
    half = np.full((1, 2, 2), 0.5, np.float32)
    corner = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(ag.soft_iou(jnp.asarray(half), jnp.asarray(corner), epsilon=0.5), [1.0 / 3.0],
                               rtol=1e-6)


def test_soft_iou_binary_limits():
    a = np.zeros((3, 4, 4), np.float32)
    b = np.zeros((3, 4, 4), np.float32)
    a[0, :2] = 1; b[0, :2] = 1            # identical -> 1
    a[1, :2] = 1; b[1, 2:] = 1            # disjoint, 8 pixels each -> eps / (16 + eps)
    # example 2: both empty -> 1 (no 0/0)
    iou = np.asarray(ag.soft_iou(jnp.asarray(a), jnp.asarray(b), epsilon=1.0))
    np.testing.assert_allclose(iou, [1.0, 1.0 / 17.0, 1.0], rtol=1e-6)


def test_soft_iou_bad_input():
    with pytest.raises(ValueError, match="batch, height, width"):
        ag.soft_iou(jnp.zeros((2, 4, 4)), jnp.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="batch, height, width"):
        ag.soft_iou(jnp.zeros((4, 4)), jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="epsilon"):
        ag.soft_iou(jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 4)), epsilon=0.0)


def test_region_mass_fraction():
    g = jnp.asarray([[[2.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    s = jnp.asarray([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    np.testing.assert_allclose(ag.region_mass_fraction(g, s), [3.0 / 4.0, 0.0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# A tiny model and a float64 NumPy reference of the whole guidance loss.
#
# images x: [b, 4, 4, 2];  features A = tanh(avgpool2x2(x) @ Wf): [b, 2, 2, 3];
# head: z = tanh(flatten(A) @ W1) @ W2, 5 hidden units, 3 classes.  dz_c/dflatA = W1 @ (W2[:, c] * (1 - h^2)).


def tiny_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"wf": rng.normal(size=(2, 3)), "w1": rng.normal(size=(12, 5)) * 0.7, "w2": rng.normal(size=(5, 3))}


def tiny_model(params):
    def features(x):
        b = x.shape[0]
        pooled = x.reshape(b, 2, 2, 2, 2, 2).mean(axis=(2, 4))
        return jnp.tanh(pooled @ params["wf"])

    def head(a):
        return jnp.tanh(a.reshape(a.shape[0], -1) @ params["w1"]) @ params["w2"]

    return split_layer(features, head, layer="features")


def interp_matrix(n_in, n_out):
    """Bilinear resize with half-pixel centres, clamped at the border, as a [n_out, n_in] matrix."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        x = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        lo = int(np.floor(x))
        hi = min(lo + 1, n_in - 1)
        m[o, lo] += 1.0 - (x - lo)
        m[o, hi] += x - lo
    return m


def reference_guidance_loss(params, x, targets, regions, epsilon):
    """float64 NumPy: Grad-CAM (plain weights, logit score), ReLU, resize, min-max, -ln soft IoU."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    b = x.shape[0]
    a = np.tanh(x.reshape(b, 2, 2, 2, 2, 2).mean(axis=(2, 4)) @ params["wf"])  # [b, 2, 2, 3]
    h = np.tanh(a.reshape(b, -1) @ params["w1"])  # [b, 5]
    out = []
    r = interp_matrix(2, 4)
    for i in range(b):
        grad_flat = params["w1"] @ (params["w2"][:, targets[i]] * (1.0 - h[i] ** 2))  # [12]
        alpha = grad_flat.reshape(2, 2, 3).mean(axis=(0, 1))  # [3]
        cam = np.maximum(np.einsum("hwc,c->hw", a[i], alpha), 0.0)
        cam = r @ cam @ r.T
        span = cam.max() - cam.min()
        g = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
        s = np.asarray(regions[i], np.float64)
        inter, union = np.sum(g * s), np.sum(g + s - g * s)
        out.append(-np.log((inter + epsilon) / (union + epsilon)))
    return np.asarray(out)


def tiny_batch():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(2, 4, 4, 2)).astype(np.float32)
    targets = np.array([0, 2])
    regions = np.zeros((2, 4, 4), np.float32)
    regions[0, :2, :2] = 1.0
    regions[1, 1:, 2:] = 1.0
    return x, targets, regions


def test_guidance_loss_matches_numpy_reference():
    params = tiny_params()
    x, targets, regions = tiny_batch()
    got = ag.guidance_loss(tiny_model(jax.tree.map(jnp.float32, params)), jnp.asarray(x), jnp.asarray(targets),
                           jnp.asarray(regions), epsilon=1.0)
    want = reference_guidance_loss(params, x, targets, regions, 1.0)
    assert np.all(want > 0.05)  # not a degenerate case
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_guidance_loss_second_order_gradient_matches_finite_differences():
    params = tiny_params()
    x, targets, regions = tiny_batch()

    def loss(p):
        return jnp.sum(ag.guidance_loss(tiny_model(p), jnp.asarray(x), jnp.asarray(targets), jnp.asarray(regions),
                                        epsilon=1.0))

    grads = jax.jit(jax.grad(loss))(jax.tree.map(jnp.float32, params))
    step = 1e-6
    for name, value in params.items():
        fd = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus = {**params, name: value.copy()}
            minus = {**params, name: value.copy()}
            plus[name][idx] += step
            minus[name][idx] -= step
            fd[idx] = (reference_guidance_loss(plus, x, targets, regions, 1.0).sum()
                       - reference_guidance_loss(minus, x, targets, regions, 1.0).sum()) / (2 * step)
        # The head (w1, w2) reaches the map only through alpha = mean(dz/dA): a purely second-order path.
        assert np.abs(fd).max() > 1e-3, name
        np.testing.assert_allclose(grads[name], fd, rtol=2e-4, atol=2e-5 * np.abs(fd).max(), err_msg=name)


def test_normalisation_gradient_is_zero_not_nan_where_max_equals_min():
    x = jnp.full((2, 4, 4, 2), 0.5)
    regions = jnp.ones((2, 4, 4)).at[:, :2].set(0.0)

    @jax.jit
    def loss(w, sign):
        # Spatially constant activations -> constant Grad-CAM map (max == min), before and after the ReLU.
        model = split_layer(lambda im: jnp.tanh(im @ w), lambda a: sign * jnp.sum(jnp.mean(a, (1, 2)), -1,
                                                                                   keepdims=True))
        return jnp.sum(ag.guidance_loss(model, x, jnp.array([0, 0]), regions, epsilon=1.0))

    w = jnp.array([[1.0, -0.5], [0.3, 0.2]])
    for sign in (1.0, -1.0):  # positive constant map; all-negative map (zero after the ReLU)
        value, grad = jax.value_and_grad(loss)(w, sign)
        # G = 0 everywhere: I = 0, U = |S| = 8 per example.
        np.testing.assert_allclose(value, 2 * -np.log(1.0 / 9.0), rtol=1e-6)
        assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


def test_guidance_maps_equal_grad_cam():
    params = jax.tree.map(jnp.float32, tiny_params())
    x, targets, _ = tiny_batch()
    np.testing.assert_array_equal(
        ag.guidance_maps(tiny_model(params), jnp.asarray(x), jnp.asarray(targets)),
        grad_cam(tiny_model(params), jnp.asarray(x), jnp.asarray(targets), relu=True, resize=True, normalize=True))


def test_guidance_loss_bad_input():
    model = tiny_model(jax.tree.map(jnp.float32, tiny_params()))
    x = jnp.zeros((2, 4, 4, 2))
    with pytest.raises(ValueError, match="regions must have shape"):
        ag.guidance_loss(model, x, jnp.array([0, 1]), jnp.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="targets must have shape"):
        ag.guidance_loss(model, x, jnp.array([0, 1, 2]), jnp.zeros((2, 4, 4)))
    with pytest.raises(TypeError, match="int class indices"):
        ag.guidance_loss(model, x, jnp.array([0.0, 1.0]), jnp.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        ag.guidance_loss(model, jnp.zeros((2, 4, 4)), jnp.array([0, 1]), jnp.zeros((2, 4, 4)))


# ----------------------------------------------------------------------------------------------------------------
# Multi-label.


def test_multilabel_guidance_loss_averages_positive_attributes():
    params = jax.tree.map(jnp.float32, tiny_params())
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(size=(3, 4, 4, 2)), jnp.float32)
    regions = jnp.asarray(rng.uniform(size=(3, 2, 4, 4)) > 0.5, jnp.float32)  # for attributes (2, 0)
    targets = jnp.array([[1, 1, 1], [0, 1, 1], [0, 1, 0]])  # ex0: both guided; ex1: only 2; ex2: none

    @jax.jit
    def losses(p):
        model = tiny_model(p)
        multi = ag.multilabel_guidance_loss(model, x, targets, regions, attributes=[2, 0], epsilon=1.0)
        l2 = ag.guidance_loss(model, x, jnp.full((3,), 2), regions[:, 0], epsilon=1.0)
        l0 = ag.guidance_loss(model, x, jnp.full((3,), 0), regions[:, 1], epsilon=1.0)
        # All attributes by default (regions [batch, 3, h, w]); attribute 1 is never positive here.
        full = ag.multilabel_guidance_loss(model, x, targets.at[:, 1].set(0), jnp.stack(
            [regions[:, 1], regions[:, 1], regions[:, 0]], 1))
        return multi, l2, l0, full

    got, l2, l0, full = (np.asarray(v) for v in losses(params))
    np.testing.assert_allclose(got, [(l2[0] + l0[0]) / 2, l2[1], 0.0], rtol=1e-5)
    np.testing.assert_allclose(full, got, rtol=1e-5)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(losses(p)[0])))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
    assert np.abs(grad["w2"]).max() > 0


def test_multilabel_guidance_loss_bad_input():
    model = tiny_model(jax.tree.map(jnp.float32, tiny_params()))
    x = jnp.zeros((2, 4, 4, 2))
    t = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="regions must have shape"):
        ag.multilabel_guidance_loss(model, x, t, jnp.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="distinct indices"):
        ag.multilabel_guidance_loss(model, x, t, jnp.zeros((2, 2, 4, 4)), attributes=[0, 3])
    with pytest.raises(ValueError, match="distinct indices"):
        ag.multilabel_guidance_loss(model, x, t, jnp.zeros((2, 2, 4, 4)), attributes=[1, 1])
    with pytest.raises(ValueError, match="logits"):
        ag.multilabel_guidance_loss(model, x, jnp.ones((2, 4), jnp.int32), jnp.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="multi-hot"):
        ag.multilabel_guidance_loss(model, x, jnp.ones((2,), jnp.int32), jnp.zeros((2, 3, 4, 4)))
    with pytest.raises(TypeError, match="multi-hot"):
        ag.multilabel_guidance_loss(model, x, jnp.ones((2, 3)), jnp.zeros((2, 3, 4, 4)))


# ----------------------------------------------------------------------------------------------------------------
# A linen model inside jit (the way a train step uses it).


def test_guidance_loss_on_linen_model_in_jit():
    model = SmallCNN(num_classes=3, widths=(4, 4, 4))
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    variables = model.init(jax.random.key(1), x)
    regions = jnp.zeros((2, 8, 8)).at[:, 2:6, 2:6].set(1.0)

    def loss(params):
        layer_model = linen_layer(model, {**variables, "params": params}, "conv3", train=False)
        return jnp.mean(ag.guidance_loss(layer_model, x, jnp.array([0, 2]), regions))

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    np.testing.assert_allclose(value, jax.jit(loss)(variables["params"]), rtol=1e-5)
    assert np.all(np.isfinite(value))
    assert np.abs(grads["conv1"]["conv"]["kernel"]).max() > 0
    assert np.abs(grads["fc"]["kernel"]).max() > 0  # only through Grad-CAM's weights (second order)
    np.testing.assert_array_equal(grads["fc"]["bias"], 0.0)  # the bias does not change dz/dA


# ----------------------------------------------------------------------------------------------------------------
# Right for the Right Reasons.


def linear_setup():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * 3 * 2, 4)) * 0.5  # [d, classes]
    b = rng.normal(size=(4,))
    x = rng.uniform(size=(2, 3, 3, 2))
    a = np.zeros((2, 3, 3))
    a[0, 0, 0] = a[0, 2, 2] = 1.0
    a[1, 1] = 1.0
    return w, b, x, a


def numpy_rrr(w, b, x, a, lambda1, pixel_scale, activation="softmax"):
    """Hand computation for z = flat(x) @ w + b.

    softmax: sum_k log p_k = sum_k z_k - K logsumexp(z)  ->  d/dx = w @ (1 - K p);
    sigmoid: sum_k log sigmoid(z_k)                       ->  d/dx = w @ (1 - sigmoid(z)).
    """
    n, k = x.shape[0], w.shape[1]
    z = x.reshape(n, -1) @ w + b
    if activation == "softmax":
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (1.0 - k * p) @ w.T
    else:
        g = (1.0 - 1.0 / (1.0 + np.exp(-z))) @ w.T
    g = g.reshape(x.shape)
    return lambda1 * np.sum((a[..., None] * g / pixel_scale) ** 2, axis=(1, 2, 3))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_rrr_penalty_hand_computed_linear_model(activation):
    w, b, x, a = linear_setup()
    logits_fn = lambda im: im.reshape(im.shape[0], -1) @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32)
    got = ag.rrr_penalty(logits_fn, jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32), lambda1=1000.0,
                         pixel_scale=255.0, activation=activation)
    want = numpy_rrr(w, b, x, a, 1000.0, 255.0, activation)
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # pixel_scale = 1 with lambda1 / 255^2 is the same penalty.
    same = ag.rrr_penalty(logits_fn, jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32),
                          lambda1=1000.0 / 255.0 ** 2, pixel_scale=1.0, activation=activation)
    np.testing.assert_allclose(same, want, rtol=1e-5)
    # A per channel ([b, h, w, c]) equals the broadcast [b, h, w] mask.
    per_channel = ag.rrr_penalty(logits_fn, jnp.asarray(x, jnp.float32),
                                 jnp.asarray(np.repeat(a[..., None], 2, -1), jnp.float32), activation=activation)
    np.testing.assert_allclose(per_channel, want, rtol=1e-5)


def test_rrr_penalty_double_backprop_matches_finite_differences():
    w, b, x, a = linear_setup()
    with jax.enable_x64(True):
        def loss(w_):
            logits_fn = lambda im: im.reshape(im.shape[0], -1) @ w_ + jnp.asarray(b)
            return jnp.sum(ag.rrr_penalty(logits_fn, jnp.asarray(x), jnp.asarray(a), lambda1=1.0, pixel_scale=1.0))

        grad = np.asarray(jax.grad(loss)(jnp.asarray(w)))
        assert grad.dtype == np.float64
    step = 1e-6
    fd = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        plus, minus = w.copy(), w.copy()
        plus[idx] += step
        minus[idx] -= step
        fd[idx] = (numpy_rrr(plus, b, x, a, 1.0, 1.0).sum() - numpy_rrr(minus, b, x, a, 1.0, 1.0).sum()) / (2 * step)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_rrr_penalty_zero_outside_annotation_and_bad_input():
    w, b, x, _ = linear_setup()
    logits_fn = lambda im: im.reshape(im.shape[0], -1) @ jnp.asarray(w, jnp.float32)
    np.testing.assert_array_equal(ag.rrr_penalty(logits_fn, jnp.asarray(x, jnp.float32), jnp.zeros((2, 3, 3))), 0.0)
    with pytest.raises(ValueError, match="wrong_regions"):
        ag.rrr_penalty(logits_fn, jnp.asarray(x, jnp.float32), jnp.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match="activation"):
        ag.rrr_penalty(logits_fn, jnp.asarray(x, jnp.float32), jnp.zeros((2, 3, 3)), activation="tanh")
    with pytest.raises(ValueError, match="logits_fn must return"):
        ag.rrr_penalty(lambda im: im.sum((1, 2, 3)), jnp.asarray(x, jnp.float32), jnp.zeros((2, 3, 3)))


# ----------------------------------------------------------------------------------------------------------------
# Settings.


def test_configs_from_mapping():
    cfg = ag.GuidanceConfig.from_mapping({"w_g": 1, "epsilon": 2.0})
    assert cfg == ag.GuidanceConfig(w_g=1.0, epsilon=2.0) and isinstance(cfg.w_g, float)
    cd = ml_collections.ConfigDict({"lambda1": 10.0, "pixel_scale": 1.0})
    assert ag.RRRConfig.from_mapping(cd) == ag.RRRConfig(lambda1=10.0, pixel_scale=1.0)
    with pytest.raises(ValueError, match=r"has no field 'w_c'"):
        ag.GuidanceConfig.from_mapping({"w_c": 1.0})
    with pytest.raises(ValueError, match=r"has no field 'lambda'"):
        ag.RRRConfig.from_mapping({"lambda": 1.0})
    with pytest.raises(ValueError, match="classification_weight"):  # w_a lives in the train loop's config
        ag.GuidanceConfig.from_mapping({"w_a": 1.0})
    with pytest.raises(ValueError, match="w_g must be >= 0"):
        ag.GuidanceConfig(w_g=-1.0)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        ag.GuidanceConfig(epsilon=0.0)
    with pytest.raises(ValueError, match="score"):
        ag.GuidanceConfig(score="probability")
    with pytest.raises(TypeError, match="lambda1 must be a number"):
        ag.RRRConfig(lambda1="big")
    with pytest.raises(ValueError, match="pixel_scale must be > 0"):
        ag.RRRConfig(pixel_scale=0.0)
    with pytest.raises(ValueError, match="activation"):
        ag.RRRConfig(activation="relu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.w_g = 2.0


def test_guidance_loss_keeps_float64_under_x64():
    # Grad-CAM's maps are at least float32, float64 under x64: finite differences can run on the loss itself.
    with jax.enable_x64(True):
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), tiny_params())
        x, targets, regions = tiny_batch()
        maps = ag.guidance_maps(tiny_model(params), jnp.asarray(x, jnp.float64), jnp.asarray(targets))
        assert maps.dtype == jnp.float64
