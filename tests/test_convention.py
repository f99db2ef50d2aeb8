"""One calling convention: every method of METHODS through saliency_map on a linen module, an unmodified NNX module,
a pure function and a small ViT, against the low-level functions and hand / NumPy references."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saliency_jax import saliency
from saliency_jax.saliency import layer_cams
from saliency_jax.saliency.occlusion import occlusion
from saliency_jax.saliency import (
    METHODS,
    Explanation,
    UnsupportedOperationError,
    contrastive_excitation_backprop,
    excitation_backprop,
    function_view,
    grad_cam,
    grad_cam_plus_plus,
    gradient_x_input,
    guided_backprop,
    integrated_gradients,
    linen_class_activation_map,
    linen_layer,
    linen_view,
    lrp,
    normalize_maps,
    nnx_layer,
    nnx_paths,
    nnx_view,
    reduce_attribution,
    rise,
    saliency_map,
    smooth_grad,
    split_layer,
    token_grid,
    vanilla_gradient,
    weighted_outputs,
)

# ---------------------------------------------------------------------------------------------------------------
# One tiny CNN in three forms with the same weights: linen, NNX, and a pure function written with lax.


class LinenBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3, 3), name="conv")(x))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = LinenBlock(4, name="block1")(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = LinenBlock(5, name="block2")(x)
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


class NNXBlock(nnx.Module):
    def __init__(self, cin, cout, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.conv(x))


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.block1 = NNXBlock(3, 4, rngs)
        self.block2 = NNXBlock(4, 5, rngs)
        self.fc = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(self.block1(x), (2, 2), (2, 2))
        return self.fc(jnp.mean(self.block2(x), axis=(1, 2)))


def _conv(p, x):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + p["bias"])


def fn_features(params, x):
    x = _conv(params["block1"]["conv"], x)
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return _conv(params["block2"]["conv"], x)


def fn_head(params, a):
    return jnp.mean(a, axis=(1, 2)) @ params["fc"]["kernel"] + params["fc"]["bias"]


def fn_apply(params, x):
    return fn_head(params, fn_features(params, x))


def _params():
    r = np.random.default_rng(0)

    def dense(*shape):
        return jnp.asarray(r.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)

    return {"block1": {"conv": {"kernel": dense(3, 3, 3, 4), "bias": dense(4) * 0.1}},
            "block2": {"conv": {"kernel": dense(3, 3, 4, 5), "bias": dense(5) * 0.1 + 0.1}},
            "fc": {"kernel": dense(5, 3), "bias": dense(3) * 0.1}}


PARAMS = _params()
IMAGES = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 8, 8, 3)), jnp.float32)
TARGETS = jnp.array([0, 2])
KEY = jax.random.key(3)


def _nnx_model():
    model = nnx.eval_shape(lambda: NNXCNN(nnx.Rngs(0)))
    for name in ("block1", "block2"):
        conv = getattr(model, name).conv
        conv.kernel.set_value(PARAMS[name]["conv"]["kernel"])
        conv.bias.set_value(PARAMS[name]["conv"]["bias"])
    model.fc.kernel.set_value(PARAMS["fc"]["kernel"])
    model.fc.bias.set_value(PARAMS["fc"]["bias"])
    return model


LINEN = LinenCNN()
VARIABLES = {"params": PARAMS}
NNX = _nnx_model()


def views():
    return {
        "linen": linen_view(LINEN, VARIABLES, "block2"),
        "nnx": nnx_view(NNX, "block2"),
        "function": function_view(fn_apply, PARAMS, features_fn=fn_features, head_fn=fn_head, layer="block2"),
    }


# Options per method (small RISE / SmoothGrad for speed).
OPTIONS = {
    "rise": dict(key=KEY, num_masks=32, grid_size=2, masks_per_step=16),
    "smooth_grad": dict(key=KEY, num_samples=4, samples_per_step=2),
    "integrated_gradients": dict(num_steps=8, steps_per_chunk=4),
    "occlusion": dict(sliding_window_shapes=(4, 4), strides=(2, 2)),
}


def options(method, view_name):
    opts = dict(OPTIONS.get(method, {}))
    if method == "cam":
        opts["classifier"] = "fc" if view_name == "linen" else (PARAMS["fc"]["kernel"], PARAMS["fc"]["bias"])
    return opts


def low_level(method):
    """The same maps from the existing low-level functions on the linen model (their own calls)."""
    lm = linen_layer(LINEN, VARIABLES, "block2")
    logits_fn = functools.partial(LINEN.apply, VARIABLES)
    x, t = IMAGES, TARGETS
    return {
        "grad_cam": lambda: grad_cam(lm, x, t),
        "grad_cam_plus_plus": lambda: grad_cam_plus_plus(lm, x, t),
        "cam": lambda: linen_class_activation_map(LINEN, VARIABLES, x, t, features_layer="block2", classifier="fc"),
        "excitation_backprop": lambda: excitation_backprop(lm, x, t, resize=True, normalize=True).saliency,
        "contrastive_excitation_backprop":
            lambda: contrastive_excitation_backprop(lm, x, t, resize=True, normalize=True).saliency,
        "vanilla_gradient": lambda: vanilla_gradient(logits_fn, x, t, normalize=True),
        "gradient_x_input": lambda: gradient_x_input(logits_fn, x, t, normalize=True),
        "guided_backprop": lambda: guided_backprop(logits_fn, x, t, normalize=True),
        "integrated_gradients":
            lambda: integrated_gradients(logits_fn, x, t, num_steps=8, steps_per_chunk=4, normalize=True),
        "smooth_grad": lambda: normalize_maps(reduce_attribution(smooth_grad(
            functools.partial(vanilla_gradient, logits_fn, reduction="none"), KEY, x, t, num_samples=4,
            samples_per_step=2))),
        "rise": lambda: rise(logits_fn, KEY, x, t, num_masks=32, grid_size=2, masks_per_step=16, normalize=True),
        "lrp_epsilon": lambda: lrp(logits_fn, x, t, normalize=True),
        "lrp_alpha_beta": lambda: lrp(logits_fn, x, t, rule="alpha_beta", normalize=True),
        "lrp_zplus": lambda: lrp(logits_fn, x, t, rule="zplus", normalize=True),
        "hirescam": lambda: layer_cams.hirescam(lm, x, t),
        "layer_cam": lambda: normalize_maps(layer_cams.gradient_cam(lm, x, t, cam=layer_cams.layer_cam_map)[0]),
        "xgrad_cam": lambda: normalize_maps(layer_cams.gradient_cam(lm, x, t, cam=layer_cams.xgrad_cam_map)[0]),
        "eigen_cam": lambda: normalize_maps(layer_cams.eigen_cam(lm, x, t)[0]),
        "score_cam": lambda: normalize_maps(layer_cams.score_cam(lm, x, t)[0]),
        "occlusion": lambda: normalize_maps(occlusion(logits_fn, x, t, **OPTIONS["occlusion"])),
    }[method]()


def test_the_three_forms_are_one_model():
    want = LINEN.apply(VARIABLES, IMAGES)
    np.testing.assert_allclose(NNX(IMAGES), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fn_apply(PARAMS, IMAGES), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_one_convention_on_linen_nnx_function(method):
    want = np.asarray(low_level(method))
    for name, view in views().items():
        maps = saliency_map(method, view, IMAGES, TARGETS, **options(method, name))
        assert maps.shape == (2, 8, 8) and maps.dtype == jnp.float32, (name, maps.shape, maps.dtype)
        assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
        # The linen view gives the low-level function's numbers; NNX and the lax function the same up to float
        # rounding (different programs for the same network).
        tol = dict(rtol=1e-6, atol=1e-6) if name == "linen" else dict(rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(maps, want, **tol, err_msg=f"{method} on the {name} view")


def test_registry_entries_are_documented():
    for name, spec in METHODS.items():
        assert spec.name == name and spec.paper and spec.cost and spec.layer
        assert spec.targets in ("score", "linear", "class")


# ---------------------------------------------------------------------------------------------------------------
# Hand / NumPy references through saliency_map.

A = np.random.default_rng(4).uniform(-1, 2, size=(2, 4, 4, 3)).astype(np.float32)
W = np.random.default_rng(5).normal(size=(3, 2)).astype(np.float32)


def gap_linear_view():
    """logits = mean_ij A_ij @ W: dy_c / dA_ijk = W_kc / 16 everywhere."""
    return function_view(None, W, features_fn=lambda w, x: x, head_fn=lambda w, a: jnp.mean(a, axis=(1, 2)) @ w)


def test_grad_cam_hand_reference_class_and_target_function():
    view = gap_linear_view()
    maps = saliency_map("grad_cam", view, jnp.asarray(A), jnp.array([1, 0]), normalize=False)
    want = np.maximum(np.stack([A[0] @ W[:, 1], A[1] @ W[:, 0]]) / 16.0, 0)
    np.testing.assert_allclose(maps, want, rtol=1e-5, atol=1e-6)
    # A target function: 2 * y_0 - y_1, i.e. alpha = (2 W_0 - W_1) / 16.
    maps = saliency_map("grad_cam", view, jnp.asarray(A), lambda out: 2 * out[:, 0] - out[:, 1], normalize=False)
    want = np.maximum(A @ (2 * W[:, 0] - W[:, 1]) / 16.0, 0)
    np.testing.assert_allclose(maps, want, rtol=1e-5, atol=1e-6)


def test_vanilla_gradient_hand_reference():
    view = function_view(lambda w, x: jnp.mean(x, axis=(1, 2)) @ w, W)
    maps = saliency_map("vanilla_gradient", view, jnp.asarray(A), 1, normalize=False, reduction="sum")
    np.testing.assert_allclose(maps, np.full((2, 4, 4), W[:, 1].sum() / 16.0), rtol=1e-5)
    out = saliency_map("gradient_x_input", view, jnp.asarray(A), 0, normalize=False, return_extras=True)
    assert isinstance(out, Explanation)
    np.testing.assert_allclose(out.extras["attribution"], A * W[:, 0] / 16.0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.maps, np.abs(A * W[:, 0] / 16.0).sum(-1), rtol=1e-5, atol=1e-7)


def test_integrated_gradients_references():
    """Linear model: exact ``(x - x') * w``; a smooth model: the Riemann sum written as a loop, and completeness."""
    x = jnp.asarray(A)
    linear = lambda im: jnp.mean(im, axis=(1, 2)) @ W  # noqa: E731
    ig = integrated_gradients(linear, x, 1, baseline=0.5, num_steps=3, reduction="none")
    np.testing.assert_allclose(ig, (A - 0.5) * W[:, 1] / 16.0, rtol=1e-5, atol=1e-7)

    V = jnp.asarray(0.1 * np.random.default_rng(9).normal(size=(4 * 4 * 3, 2)), jnp.float32)
    smooth = lambda im: jnp.tanh(im.reshape(im.shape[0], -1) @ V)  # noqa: E731
    t = jnp.array([0, 1])
    ig = integrated_gradients(smooth, x, t, num_steps=16, steps_per_chunk=5, reduction="none")
    total = 0.0
    for k in range(1, 17):
        total = total + jax.grad(lambda im: jnp.sum(jnp.take_along_axis(smooth(im), t[:, None], 1)))(x * k / 16)
    np.testing.assert_allclose(ig, A * np.asarray(total) / 16, rtol=1e-4, atol=1e-6)
    many = integrated_gradients(smooth, x, t, num_steps=400, steps_per_chunk=100, reduction="none")
    gap = np.take_along_axis(np.asarray(smooth(x)), np.asarray(t)[:, None], 1)[:, 0]  # S(x) - S(0), S(0) = 0
    np.testing.assert_allclose(np.asarray(many).reshape(2, -1).sum(1), gap, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "vanilla_gradient", "gradient_x_input",
                                    "guided_backprop", "integrated_gradients", "rise", "smooth_grad",
                                    "excitation_backprop", "contrastive_excitation_backprop"])
def test_class_target_function_equals_class_indices(method):
    """``target(out) = out[b, t_b]`` is the class logit: the same maps as the class indices (RISE with its
    logit score, since a target function is the score)."""
    view = views()["linen"]
    opts = dict(OPTIONS.get(method, {}))
    if method == "rise":
        opts["score"] = "logit"

    def target(out):
        return jnp.take_along_axis(out, TARGETS[:, None], axis=1)[:, 0]

    want = saliency_map(method, view, IMAGES, TARGETS, **opts)
    got = saliency_map(method, view, IMAGES, target, **opts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_eb_linear_target_is_its_prior_and_nonlinear_raises():
    view = views()["function"]
    weights = jnp.array([0.25, 0.0, 0.75])
    got = saliency_map("excitation_backprop", view, IMAGES, weighted_outputs(weights), return_extras=True)
    want = saliency_map("excitation_backprop", view, IMAGES, prior=jnp.broadcast_to(weights, (2, 3)),
                        return_extras=True)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-6)
    np.testing.assert_allclose(got.extras["probability"], want.extras["probability"], rtol=1e-6)
    # EB is linear in the prior: the mixture equals the mixture of one-hot maps.
    p0 = saliency_map("excitation_backprop", view, IMAGES, 0, return_extras=True).extras["probability"]
    p2 = saliency_map("excitation_backprop", view, IMAGES, 2, return_extras=True).extras["probability"]
    np.testing.assert_allclose(got.extras["probability"], 0.25 * p0 + 0.75 * p2, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="linear in the outputs"):
        saliency_map("excitation_backprop", view, IMAGES, lambda out: jax.nn.softmax(out)[:, 0])
    with pytest.raises(ValueError, match="class indices"):
        saliency_map("cam", view, IMAGES, lambda out: out[:, 0], classifier=(PARAMS["fc"]["kernel"], None))
    with pytest.raises(ValueError, match="score itself"):
        saliency_map("grad_cam", view, IMAGES, lambda out: out[:, 0], score="softmax")


def test_nonlinear_target_functions_for_gradient_methods():
    """An embedding-similarity target (cosine to a reference) against jax.grad written out."""
    ref = jnp.array([1.0, -0.5, 0.25])
    view = views()["function"]
    maps = saliency_map("vanilla_gradient", view, IMAGES, saliency.cosine_similarity(ref), normalize=False,
                        reduction="sum")

    def cos(x):
        out = fn_apply(PARAMS, x)
        return jnp.sum(out @ ref / (jnp.linalg.norm(out, axis=-1) * jnp.linalg.norm(ref)))

    np.testing.assert_allclose(maps, jax.grad(cos)(IMAGES).sum(-1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="one score per example"):
        saliency_map("vanilla_gradient", view, IMAGES, lambda out: out)


def test_errors_and_extras():
    view = views()["linen"]
    with pytest.raises(KeyError, match="METHODS"):
        saliency_map("gradcam", view, IMAGES)
    with pytest.raises(ValueError, match="has none"):
        saliency_map("grad_cam", linen_view(LINEN, VARIABLES), IMAGES)
    with pytest.raises(ValueError, match="key"):
        saliency_map("rise", view, IMAGES)
    with pytest.raises(ValueError, match="no key"):
        saliency_map("grad_cam", view, IMAGES, key=KEY)
    out = saliency_map("excitation_backprop", view, IMAGES, TARGETS, return_extras=True)
    assert out.extras["probability"].shape == (2, 4, 4, 5) and out.extras["layer_map"].shape == (2, 4, 4)
    np.testing.assert_allclose(np.asarray(out.extras["probability"]).reshape(2, -1).sum(1), 1.0, rtol=1e-5)
    # Under jit, with a traced target array.
    jitted = jax.jit(lambda x, t: saliency_map("grad_cam", view, x, t))(IMAGES, TARGETS)
    np.testing.assert_allclose(jitted, saliency_map("grad_cam", view, IMAGES, TARGETS), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# NNX layer access.


def test_nnx_layer_leaves_the_module_unchanged_and_checks_paths():
    assert nnx_paths(NNX) == [p for p in nnx_paths(NNX)] and "block2/conv" in nnx_paths(NNX)
    model = nnx_layer(NNX, "block2/conv")
    logits, act = model(IMAGES)
    assert act.shape == (2, 4, 4, 5) and type(NNX.block2.conv) is nnx.Conv
    np.testing.assert_allclose(logits, NNX(IMAGES), rtol=1e-6)
    # Pre-ReLU conv output, against the lax function.
    x = jax.lax.reduce_window(_conv(PARAMS["block1"]["conv"], IMAGES), -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                              (1, 2, 2, 1), "VALID")
    pre = jax.lax.conv_general_dilated(x, PARAMS["block2"]["conv"]["kernel"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + PARAMS["block2"]["conv"]["bias"]
    np.testing.assert_allclose(act, pre, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="submodule paths"):
        nnx_layer(NNX, "block3")
    # An activation applied as a function: "block2/conv+relu" is block2's output, exactly, under jit too.
    relu_model = nnx_layer(NNX, "block2/conv+relu")
    logits2, act2 = jax.jit(relu_model)(IMAGES)
    np.testing.assert_allclose(act2, np.maximum(pre, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits2, logits, rtol=1e-6, atol=1e-7)
    view = nnx_view(NNX, "block2/conv+relu")
    np.testing.assert_allclose(saliency_map("grad_cam", view, IMAGES, TARGETS),
                               saliency_map("grad_cam", nnx_view(NNX, "block2"), IMAGES, TARGETS), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not 'tanh'"):
        nnx_layer(NNX, "block2/conv+tanh")(IMAGES)

    class Twice(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(self.fc(jnp.mean(x, axis=(1, 2))))

    with pytest.raises(ValueError, match="called 2 times"):
        nnx_layer(Twice(), "fc")(IMAGES)


# ---------------------------------------------------------------------------------------------------------------
# A small ViT: Grad-CAM on token activations reshaped to a grid.


class ViTBlock(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="norm1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
        y = nn.LayerNorm(name="norm2")(x)
        y = nn.Dense(2 * self.dim, name="mlp1")(y)
        return x + nn.Dense(self.dim, name="mlp2")(nn.gelu(y))


class TinyViT(nn.Module):
    """Patch embedding (4x4 patches), class token, learned position embedding, 2 blocks, head on the class token."""
    num_classes: int = 3
    dim: int = 8
    patch: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dim, (self.patch, self.patch), (self.patch, self.patch), name="embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, h * w + 1, d))
        for i in range(2):
            x = ViTBlock(self.dim, 2, name=f"block{i}")(x)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


VIT = TinyViT()
VIT_IMAGES = jnp.asarray(np.random.default_rng(6).uniform(size=(2, 12, 12, 3)), jnp.float32)
VIT_VARIABLES = VIT.init(jax.random.key(7), VIT_IMAGES[:1])
VIT_LAYER = "block1/norm1"  # the last block's input norm (pytorch-grad-cam's choice for ViTs)


def test_vit_grad_cam_on_token_grid_matches_numpy():
    view = linen_view(VIT, VIT_VARIABLES, VIT_LAYER, reshape=token_grid(1))
    maps = jax.jit(lambda x: saliency_map("grad_cam", view, x, TARGETS, normalize=False, return_extras=True))(
        VIT_IMAGES)
    assert maps.maps.shape == (2, 12, 12) and maps.extras["layer_map"].shape == (2, 3, 3)
    # Reference: the gradient of the class logit with respect to the token activations, by jax.grad on the
    # unsplit layer model; class token dropped and reshaped in NumPy; Grad-CAM written out.
    lm = linen_layer(VIT, VIT_VARIABLES, VIT_LAYER)
    _, tokens = jax.jit(lm)(VIT_IMAGES)

    def score(p):
        logits = lm(VIT_IMAGES, p)[0]
        return jnp.sum(jnp.take_along_axis(logits, TARGETS[:, None], axis=1))

    grads = np.asarray(jax.jit(jax.grad(score))(jnp.zeros(tokens.shape)))
    a = np.asarray(tokens)[:, 1:].reshape(2, 3, 3, -1)
    g = grads[:, 1:].reshape(2, 3, 3, -1)
    assert np.abs(grads[:, 1:]).max() > 1e-4  # the patch tokens matter (not only the class token)
    want = np.maximum(np.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2))), 0)
    np.testing.assert_allclose(maps.extras["layer_map"], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "vanilla_gradient", "gradient_x_input",
                                    "integrated_gradients", "smooth_grad", "rise"])
def test_vit_methods_that_apply(method):
    view = linen_view(VIT, VIT_VARIABLES, VIT_LAYER, reshape=token_grid(1))
    maps = jax.jit(lambda x, t: saliency_map(method, view, x, t, **OPTIONS.get(method, {})))(VIT_IMAGES, TARGETS)
    assert maps.shape == (2, 12, 12) and maps.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(maps))) and float(maps.max()) == pytest.approx(1.0)


def test_vit_unsupported_methods_raise_clearly():
    view = linen_view(VIT, VIT_VARIABLES, VIT_LAYER, reshape=token_grid(1))
    with pytest.raises(UnsupportedOperationError):
        saliency_map("excitation_backprop", view, VIT_IMAGES, TARGETS)
    with pytest.raises(saliency.GuidedBackpropError):  # attention's softmax has a max that is not a ReLU
        saliency_map("guided_backprop", view, VIT_IMAGES, TARGETS)
    with pytest.raises(ValueError, match="do not fill"):
        saliency_map("grad_cam", linen_view(VIT, VIT_VARIABLES, VIT_LAYER, reshape=token_grid(0)), VIT_IMAGES)
    with pytest.raises(ValueError, match="must be linear"):
        saliency_map("grad_cam", linen_view(VIT, VIT_VARIABLES, VIT_LAYER,
                                            reshape=lambda t: token_grid(1)(t) ** 2), VIT_IMAGES)


def test_reshaped_layer_model_equals_reshaped_view():
    """A LayerModel passed directly (as_view) with reshaped_layer gives the view's numbers."""
    lm = linen_layer(VIT, VIT_VARIABLES, VIT_LAYER)
    split = saliency.reshaped_layer(lm, token_grid(1))
    view = linen_view(VIT, VIT_VARIABLES, VIT_LAYER, reshape=token_grid(1))
    want = jax.jit(lambda x: saliency_map("grad_cam", view, x, 1))(VIT_IMAGES)
    np.testing.assert_allclose(jax.jit(lambda x: saliency_map("grad_cam", split, x, 1))(VIT_IMAGES), want,
                               rtol=1e-6, atol=1e-7)


class NNXViTBlock(nnx.Module):
    def __init__(self, dim, heads, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y)
        return x + self.mlp2(nnx.gelu(self.mlp1(self.norm2(x))))


class NNXViT(nnx.Module):
    """The same architecture as TinyViT, written in NNX (its own random weights)."""

    def __init__(self, rngs, num_classes=3, dim=8, patch=4, tokens=10):
        self.embed = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), rngs=rngs)
        self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
        self.blocks = nnx.List([NNXViTBlock(dim, 2, rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        b, h, w, d = x.shape
        x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, d)), x.reshape(b, h * w, d)], axis=1)
        x = x + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def test_nnx_vit_grad_cam_on_token_grid_matches_numpy_under_jit():
    vit = NNXViT(nnx.Rngs(8))
    view = nnx_view(vit, "blocks/1/norm1", reshape=token_grid(1))
    out = jax.jit(lambda x: saliency_map("grad_cam", view, x, TARGETS, normalize=False, return_extras=True))(
        VIT_IMAGES)
    assert out.maps.shape == (2, 12, 12) and out.extras["layer_map"].shape == (2, 3, 3)
    lm = nnx_layer(vit, "blocks/1/norm1")
    _, tokens = jax.jit(lm)(VIT_IMAGES)

    def score(p):
        return jnp.sum(jnp.take_along_axis(lm(VIT_IMAGES, p)[0], TARGETS[:, None], axis=1))

    grads = np.asarray(jax.jit(jax.grad(score))(jnp.zeros(tokens.shape)))
    a = np.asarray(tokens)[:, 1:].reshape(2, 3, 3, -1)
    g = grads[:, 1:].reshape(2, 3, 3, -1)
    want = np.maximum(np.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2))), 0)
    np.testing.assert_allclose(out.extras["layer_map"], want, rtol=1e-4, atol=1e-6)
    # Without the reshape, the token layer is refused with a pointer to token_grid; EB refuses attention.
    with pytest.raises(ValueError, match="token_grid"):
        saliency_map("grad_cam", nnx_view(vit, "blocks/1/norm1"), VIT_IMAGES, TARGETS)
    with pytest.raises(UnsupportedOperationError):
        saliency_map("excitation_backprop", view, VIT_IMAGES, TARGETS)
