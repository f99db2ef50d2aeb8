"""LRP-epsilon / alpha-beta / z+ as jaxpr rules: zennit's numbers (recorded, and live where torch is installed),
conservation, LRP-0 = gradient x input, batch-norm merging, the calling convention and the errors.

Tolerances: the small CNN equals zennit to 1e-4 of the map's largest |relevance| (measured ~5e-6: float32 rounding
of a merged vs an unmerged batch norm). ResNet-18 to 1e-3 (measured ~1e-4): zennit's canonizer turns each of the 20
merged batch norms into ``x / sqrt(1 + eps)``, not exactly the identity, which shifts every layer by ~5e-6.
"""

import functools
import pathlib
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.saliency import (UnsupportedOperationError, gradient_x_input, linen_view, lrp, normalize_maps,
                                   saliency_map, weighted_outputs)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import lrp_reference  # noqa: E402

RECORDED = pathlib.Path(__file__).resolve().parent / "data" / "lrp_small_cnn.npz"


def _close_to_reference(ours, ref, tol, what):
    scale = float(np.abs(ref).max())
    err = float(np.abs(np.asarray(ours) - ref).max())
    assert err <= tol * scale, f"{what}: max |ours - zennit| = {err:.3g} > {tol} x {scale:.3g}"


def _small_cnn(sd):
    return functools.partial(lrp_reference.SmallLRPNet().apply, lrp_reference.linen_variables(sd))


def _relevance(f, images, targets, **kwargs):
    """lrp(..., reduction="none") under jit (one compilation is faster than eager dispatch of every rule)."""
    return jax.jit(lambda x, t: lrp(f, x, t, reduction="none", **kwargs))(jnp.asarray(images), jnp.asarray(targets))


@pytest.mark.parametrize("case", lrp_reference.CASES, ids=[c[0] for c in lrp_reference.CASES])
def test_small_cnn_equals_recorded_zennit(case):
    """CI without torch: zennit's relevance recorded by tests/make_lrp_references.py."""
    name, kwargs, _, _ = case
    data = np.load(RECORDED)
    sd = {k[len("weight/"):]: data[k] for k in data.files if k.startswith("weight/")}
    ref = data[f"relevance/{name}"]
    ours = _relevance(_small_cnn(sd), data["images"], data["targets"], **kwargs)
    assert ours.shape == ref.shape == (3, 8, 8, 3)
    _close_to_reference(ours, ref, 1e-4, name)
    _close_to_reference(ours.sum(-1), ref.sum(-1), 1e-4, f"{name} (channel sum)")


@pytest.mark.parametrize("case", lrp_reference.CASES, ids=[c[0] for c in lrp_reference.CASES])
def test_small_cnn_equals_zennit_live(case):
    pytest.importorskip("torch")
    pytest.importorskip("zennit")
    from zennit.canonizers import SequentialMergeBatchNorm

    name, kwargs, rule, rule_kwargs = case
    sd = lrp_reference.state_dict(seed=7)
    images, targets = lrp_reference.images_and_targets(seed=8, batch=4)
    net = lrp_reference.torch_net(sd)
    ref = lrp_reference.zennit_relevance(net, images, targets, rule, rule_kwargs, SequentialMergeBatchNorm())
    ours = _relevance(_small_cnn(sd), images, targets, **kwargs)
    _close_to_reference(ours, ref, 1e-4, name)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in lrp_reference.CASES if c[0] in ("epsilon", "zplus", "alpha2_beta1")],
                         ids=["epsilon", "zplus", "alpha2_beta1"])
def test_resnet18_equals_zennit(case):
    """torchvision resnet18 (random init, random BN statistics) ported to our ResNet18 with the library's importer;
    zennit with its ResNetCanonizer (BN merged, residual sums as Sum modules). Our ResNet normalises the images
    itself and that affine step passes relevance unchanged, so zennit gets the normalised images. 32x32 inputs:
    layer3/layer4 convolutions run as im2col + dot_general here (saliency_jax.models.conv)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("zennit")
    from zennit.torchvision import ResNetCanonizer

    from saliency_jax.models.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet18
    from saliency_jax.models.weights import import_resnet

    name, kwargs, rule, rule_kwargs = case
    r = np.random.default_rng(0)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.from_numpy(r.uniform(-0.5, 1.5, n).astype(np.float32)))
                m.bias.copy_(torch.from_numpy(r.normal(0, 0.1, n).astype(np.float32)))
                m.running_mean.copy_(torch.from_numpy(r.normal(0, 0.1, n).astype(np.float32)))
                m.running_var.copy_(torch.from_numpy(r.uniform(0.5, 1.5, n).astype(np.float32)))
    model = ResNet18(num_classes=10)
    images = r.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    targets = np.array([1, 7])
    variables = model.init(jax.random.key(0), jnp.asarray(images))
    variables = import_resnet({k: v.numpy() for k, v in net.state_dict().items()}, variables, arch="resnet18")
    normalised = (images - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    ref = lrp_reference.zennit_relevance(net, normalised, targets, rule, rule_kwargs, ResNetCanonizer())
    ours = _relevance(functools.partial(model.apply, variables), images, targets, **kwargs)
    _close_to_reference(ours, ref, 1e-3, name)
    _close_to_reference(ours.sum(-1), ref.sum(-1), 1e-3, f"{name} (channel sum)")


# ---------------------------------------------------------------------------------------------------------------
# Properties without torch.


class BiasFreeResNet(nn.Module):
    """conv - ReLU - max pool - [conv - ReLU - conv] + shortcut - ReLU - avg pool 2 - global mean - dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        y = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
        y = nn.Conv(4, (3, 3), use_bias=False)(y)
        x = nn.relu(x + y)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(3, use_bias=False)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def bias_free():
    module = BiasFreeResNet()
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    variables = flax.core.unfreeze(module.init(jax.random.key(1), images))
    # Mostly positive classifier weights (one negative row): positive logits, and both signs of contribution
    # (z+ and alpha-beta conserve only where their denominators are non-zero).
    kernel = jnp.abs(variables["params"]["Dense_0"]["kernel"])
    variables["params"]["Dense_0"]["kernel"] = kernel.at[0].multiply(-0.2)
    return functools.partial(module.apply, variables), images


@pytest.mark.parametrize("kwargs", [dict(rule="epsilon", epsilon=1e-9), dict(rule="zplus"),
                                    dict(rule="alpha_beta", alpha=2.0, beta=1.0)], ids=["epsilon", "zplus", "ab"])
def test_conservation_on_a_bias_free_network(bias_free, kwargs):
    """Bach 2015, Eq. 2: sum_p R_p = f_c(x) when no bias absorbs relevance (epsilon -> 0; z+ / alpha-beta with
    non-zero denominators)."""
    f, images = bias_free
    targets = jnp.argmax(f(images), axis=-1)
    logits = f(images)[jnp.arange(2), targets]
    assert float(logits.min()) > 0  # z+ needs a positive contribution at the output
    relevance = _relevance(f, images, targets, stabilizer=1e-9, **kwargs)
    np.testing.assert_allclose(relevance.sum((1, 2, 3)), logits, rtol=1e-4)


def test_lrp_0_is_gradient_times_input_on_a_bias_free_relu_network(bias_free):
    """Montavon 2019, Sec. 10.2.1: LRP-0 on a ReLU network without biases equals gradient x input."""
    f, images = bias_free
    relevance = _relevance(f, images, 1, epsilon=1e-9, stabilizer=1e-9)
    want = gradient_x_input(f, images, 1, reduction="none")
    np.testing.assert_allclose(relevance, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))


def test_batch_norm_is_merged_into_the_conv_before_it():
    """conv -> BN (negative scales included) gives the relevance of the single conv with the merged weights
    ``W * gamma / sqrt(var + eps)`` and bias ``beta - mean * gamma / sqrt(var + eps)`` (zennit's MergeBatchNorm),
    for every rule; without merging the z+ rule would see the unmerged signs."""
    r = np.random.default_rng(3)
    kernel = r.normal(size=(3, 3, 3, 4)).astype(np.float32)
    gamma = np.array([1.5, -0.7, 0.3, -2.0], np.float32)
    beta, mean = r.normal(size=4).astype(np.float32), r.normal(size=4).astype(np.float32)
    var = r.uniform(0.5, 2.0, 4).astype(np.float32)
    dense = r.normal(size=(4, 2)).astype(np.float32)
    scale = gamma / np.sqrt(var + 1e-5)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def head(y):
        return jnp.mean(jax.nn.relu(y), axis=(1, 2)) @ dense

    def with_bn(x):
        return head((conv(x, kernel) - mean) / jnp.sqrt(var + 1e-5) * gamma + beta)

    def merged(x):
        return head(conv(x, kernel * scale) + (beta - mean * scale))

    images = jnp.asarray(r.normal(size=(2, 6, 6, 3)), jnp.float32)
    np.testing.assert_allclose(with_bn(images), merged(images), rtol=1e-5, atol=1e-5)
    for kwargs in (dict(rule="epsilon"), dict(rule="zplus"), dict(rule="alpha_beta")):
        got = _relevance(with_bn, images, 0, **kwargs)
        want = _relevance(merged, images, 0, **kwargs)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()), err_msg=str(kwargs))


def test_zplus_is_alpha1_beta0_and_jit_gives_the_same(bias_free):
    f, images = bias_free
    zplus = lrp(f, images, 1, rule="zplus", reduction="none")
    np.testing.assert_allclose(_relevance(f, images, 1, rule="alpha_beta", alpha=1.0, beta=0.0), zplus,
                               rtol=1e-6, atol=1e-7)
    jitted = jax.jit(lambda x: lrp(f, x, 1, rule="zplus", reduction="none"))(images)
    np.testing.assert_allclose(jitted, zplus, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# The calling convention and errors.


def test_saliency_map_convention_extras_and_target_functions():
    sd = lrp_reference.state_dict(seed=0)
    module, variables = lrp_reference.SmallLRPNet(), lrp_reference.linen_variables(sd)
    images = jnp.asarray(lrp_reference.images_and_targets(seed=1)[0])
    view = linen_view(module, variables)
    f = functools.partial(module.apply, variables)
    for method, kwargs in [("lrp_epsilon", dict(rule="epsilon", epsilon=0.1)),
                           ("lrp_alpha_beta", dict(rule="alpha_beta", alpha=1.0, beta=0.0)),
                           ("lrp_zplus", dict(rule="zplus"))]:
        options = {k: v for k, v in kwargs.items() if k != "rule"}
        out = saliency_map(method, view, images, 2, return_extras=True, **options)
        relevance = _relevance(f, images, 2, **kwargs)
        np.testing.assert_allclose(out.extras["attribution"], relevance, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.maps, normalize_maps(relevance.sum(-1)), rtol=1e-5, atol=1e-5)
        assert out.maps.shape == (3, 8, 8) and float(out.maps.min()) >= 0.0 and float(out.maps.max()) <= 1.0
        # A target function linear in the outputs: its coefficients weight the output relevance.
        target = weighted_outputs(jnp.array([0.0, 0.0, 1.0, 0.0, 0.0]))
        by_function = jax.jit(lambda x: saliency_map(method, view, x, target, normalize=False, **options))(images)
        np.testing.assert_allclose(by_function, relevance.sum(-1), rtol=1e-5, atol=1e-6)


def test_bad_options_raise():
    f = lambda x: jnp.mean(x, axis=(1, 2)) @ jnp.ones((3, 2))  # noqa: E731
    images = jnp.ones((1, 4, 4, 3))
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        lrp(f, images, 0, rule="alpha_beta", alpha=2.0, beta=0.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        lrp(f, images, 0, rule="gamma")
    with pytest.raises(TypeError, match="unexpected options"):
        saliency_map("lrp_zplus", f, images, 0, epsilon=0.1)
    with pytest.raises(ValueError, match="extras\\['attribution'\\]"):
        saliency_map("lrp_epsilon", f, images, 0, reduction="none")


@pytest.mark.parametrize("body, primitive", [
    (lambda h: jnp.sin(h), "sin"),
    (lambda h: h * h, "mul"),
    (lambda h: jnp.exp(h), "exp"),
])
def test_unsupported_primitive_raises_naming_it(body, primitive):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)

    def f(x):
        return body(jnp.mean(x, axis=(1, 2)) @ w)

    with pytest.raises(UnsupportedOperationError, match=f"primitive '{primitive}'"):
        lrp(f, jnp.ones((1, 4, 4, 3)), 0)
