"""Grad-CAM against hand-computed references on tiny models with fixed weights (PAIR saliency's approach)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.models import SmallCNN
from saliency_jax.saliency import (
    grad_cam,
    linen_layer,
    module_paths,
    normalize_maps,
    resize_maps,
    split_layer,
)

# Feature maps A: [batch=2, h=2, w=2, channels=2], fixed by hand; the "features" are the input itself.
A = np.array(
    [[[[1.0, 0.0], [2.0, 1.0]],
      [[0.0, 3.0], [1.0, -1.0]]],
     [[[0.5, 0.5], [-2.0, 1.0]],
      [[4.0, 0.0], [0.0, 2.0]]]], np.float32)
# Classifier weights W: [channels=2, classes=3].
W = np.array([[1.0, -1.0, 0.5],
              [2.0, 1.0, -0.5]], np.float32)


def gap_linear_model():
    """logits_c = mean_ij sum_k A_ijk W_kc  ->  dy^c/dA_ijk = W_kc / 4 everywhere."""
    return split_layer(lambda x: x, lambda a: jnp.mean(a, axis=(1, 2)) @ W)


def test_plain_grad_cam_equals_hand_computed_map():
    targets = np.array([0, 1])
    maps = grad_cam(gap_linear_model(), jnp.asarray(A), jnp.asarray(targets), relu=False, resize=False,
                    normalize=False)
    # alpha_k^c = mean_ij W_kc / 4 = W_kc / 4;  L = sum_k alpha_k A^k.
    expected = np.stack([A[b] @ (W[:, c] / 4.0) for b, c in enumerate(targets)])
    # Written out for example 0, class 0: alpha = (1/4, 2/4).
    assert expected[0, 0, 1] == pytest.approx(2.0 * 0.25 + 1.0 * 0.5)
    np.testing.assert_allclose(maps, expected, rtol=1e-6)


def test_relu_and_normalisation():
    targets = jnp.array([1, 1])
    raw = grad_cam(gap_linear_model(), jnp.asarray(A), targets, relu=False, resize=False, normalize=False)
    relu = grad_cam(gap_linear_model(), jnp.asarray(A), targets, resize=False, normalize=False)
    np.testing.assert_allclose(relu, np.maximum(raw, 0))
    norm = grad_cam(gap_linear_model(), jnp.asarray(A), targets, resize=False)
    r = np.maximum(np.asarray(raw), 0)
    lo, hi = r.min(axis=(1, 2), keepdims=True), r.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(norm, (r - lo) / (hi - lo), rtol=1e-6)


def test_guided_weights_keep_positive_activation_and_gradient_only():
    # logits_c = mean_ij sum_k V_kc A_ijk^2  ->  dy^c/dA_ijk = 2 V_kc A_ijk / 4, varying in sign over positions.
    V = np.array([[1.0, -2.0], [-1.0, 0.5]], np.float32)
    model = split_layer(lambda x: x, lambda a: jnp.mean(a[..., :, None] ** 2 * V, axis=(1, 2)).sum(1))
    targets = np.array([0, 1])
    guided = grad_cam(model, jnp.asarray(A), jnp.asarray(targets), weighting="guided", relu=False, resize=False,
                      normalize=False)
    plain = grad_cam(model, jnp.asarray(A), jnp.asarray(targets), weighting="plain", relu=False, resize=False,
                     normalize=False)
    for b, c in enumerate(targets):
        g = 2 * V[:, c] * A[b] / 4.0  # [h, w, k]
        alpha_plain = g.mean(axis=(0, 1))
        alpha_guided = np.where((A[b] > 0) & (g > 0), g, 0).mean(axis=(0, 1))
        np.testing.assert_allclose(plain[b], A[b] @ alpha_plain, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(guided[b], A[b] @ alpha_guided, rtol=1e-5, atol=1e-6)
    assert not np.allclose(guided, plain)


def test_softmax_score_gradient():
    targets = np.array([2, 0])
    maps = grad_cam(gap_linear_model(), jnp.asarray(A), jnp.asarray(targets), score="softmax", relu=False,
                    resize=False, normalize=False)
    for b, c in enumerate(targets):
        z = A[b].mean(axis=(0, 1)) @ W
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        # d p_c / d z_j = p_c (delta_cj - p_j);  d z_j / d A_ijk = W_kj / 4.
        dz = p[c] * ((np.arange(3) == c) - p)
        alpha = (W @ dz) / 4.0
        np.testing.assert_allclose(maps[b], A[b] @ alpha, rtol=1e-5, atol=1e-7)


def test_targets_none_int_and_array():
    model = gap_linear_model()
    x = jnp.asarray(A)
    logits = A.mean(axis=(1, 2)) @ W
    pred = grad_cam(model, x, None, relu=False, resize=False, normalize=False)
    explicit = grad_cam(model, x, jnp.asarray(logits.argmax(-1)), relu=False, resize=False, normalize=False)
    np.testing.assert_allclose(pred, explicit)
    one = grad_cam(model, x, 2, relu=False, resize=False, normalize=False)
    np.testing.assert_allclose(one, grad_cam(model, x, jnp.array([2, 2]), relu=False, resize=False, normalize=False))


def _small_cnn():
    model = SmallCNN(num_classes=5, widths=(4, 6, 8))
    x = jax.random.uniform(jax.random.key(1), (6, 16, 16, 1))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    # Non-trivial BatchNorm statistics, so inference mode differs from identity.
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    variables = {"params": variables["params"], **upd}
    return model, variables, x


@pytest.mark.parametrize("weighting", ["plain", "guided"])
def test_batched_equals_vmap_and_per_example_loop(weighting):
    model, variables, x = _small_cnn()
    layer = linen_layer(model, variables, "conv3", train=False)
    labels = jnp.array([0, 1, 2, 3, 4, 0])
    fn = lambda imgs, ys: grad_cam(layer, imgs, ys, score="softmax", weighting=weighting)
    batched = jax.jit(fn)(x, labels)
    vmapped = jax.vmap(lambda im, y: fn(im[None], y[None])[0])(x, labels)
    single = jax.jit(fn)  # one compile for the [1, ...] shape, reused by every example
    looped = np.stack([np.asarray(single(x[i:i + 1], labels[i:i + 1]))[0] for i in range(x.shape[0])])
    assert batched.shape == (6, 16, 16)
    np.testing.assert_allclose(batched, vmapped, atol=1e-5)
    np.testing.assert_allclose(batched, looped, atol=1e-5)
    assert float(batched.min()) >= 0.0 and float(batched.max()) <= 1.0


class ForeignNet(nn.Module):
    """A linen model written without any knowledge of saliency_jax (standard layers only)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))
        x = nn.relu(nn.Conv(4, (3, 3), name="last_conv")(x))
        return nn.Dense(2)(x.mean(axis=(1, 2)))


def test_unmodified_linen_module_matches_manual_split():
    net = ForeignNet()
    x = jax.random.uniform(jax.random.key(3), (3, 8, 8, 2))
    v = jax.jit(net.init)(jax.random.key(4), x)
    assert "last_conv" in module_paths(net, v, x)
    maps = jax.jit(lambda x: grad_cam(linen_layer(net, v, "last_conv"), x, jnp.array([0, 1, 1]), resize=False,
                                      normalize=False))(x)

    p = v["params"]

    def features(im):
        h = nn.relu(nn.Conv(3, (3, 3)).apply({"params": p["Conv_0"]}, im))
        return nn.Conv(4, (3, 3)).apply({"params": p["last_conv"]}, h)  # pre-ReLU: the module's own output

    def head(a):
        return nn.Dense(2).apply({"params": p["Dense_0"]}, nn.relu(a).mean(axis=(1, 2)))

    manual = jax.jit(lambda x: grad_cam(split_layer(features, head), x, jnp.array([0, 1, 1]), resize=False,
                                        normalize=False))(x)
    np.testing.assert_allclose(maps, manual, atol=1e-6)


def test_resize_and_normalize_helpers():
    m = jnp.arange(4.0).reshape(1, 2, 2)
    up = resize_maps(m, (4, 4))
    assert up.shape == (1, 4, 4)
    # Half-pixel-centre bilinear (cv2.resize): corner pixels keep the corner values.
    assert float(up[0, 0, 0]) == pytest.approx(0.0) and float(up[0, 3, 3]) == pytest.approx(3.0)
    const = normalize_maps(jnp.full((2, 3, 3), 7.0))
    assert not np.any(np.isnan(const)) and np.all(np.asarray(const) == 0)


def test_bad_input_raises():
    model = gap_linear_model()
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        grad_cam(model, jnp.ones((2, 2, 2)))
    with pytest.raises(TypeError, match="floating point"):
        grad_cam(model, jnp.ones((2, 2, 2, 2), jnp.int32))
    with pytest.raises(ValueError, match="shape"):
        grad_cam(model, jnp.asarray(A), jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, jnp.asarray(A), 7)
    with pytest.raises(ValueError, match="score"):
        grad_cam(model, jnp.asarray(A), score="prob")
    with pytest.raises(ValueError, match="spatial"):
        grad_cam(split_layer(lambda x: x.mean((1, 2)), lambda a: a @ W), jnp.asarray(A))
    net = ForeignNet()
    x = jnp.ones((1, 8, 8, 2))
    v = net.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="not found.*last_conv"):
        grad_cam(linen_layer(net, v, "conv9"), x)
