"""Excitation Backprop against a slow explicit NumPy reference of Eq. 4.1/4.2 (tests/eb_reference.py).

Tolerance: JAX runs in float32, the reference in float64; maps are compared with ``rtol=1e-4`` and an absolute
tolerance of ``1e-5`` times the largest magnitude of the reference map (float32 round-off through a few layers of
sums and ratios).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eb_reference as ref
from saliency_jax.saliency import linen_layer, split_layer
from saliency_jax.saliency.excitation_backprop import (
    EBResult,
    UnsupportedOperationError,
    contrastive_excitation_backprop,
    excitation_backprop,
    marginal_winning_probability,
    with_excitation_rules,
)


def assert_close(actual, expected):
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------------------------------------------
# The same networks in JAX, written with lax / flax ops (an implementation independent of the reference's loops).


def _apply(layer, x):
    if isinstance(layer, ref.Dense):
        return x @ jnp.asarray(layer.weight, jnp.float32) + jnp.asarray(layer.bias, jnp.float32)
    if isinstance(layer, ref.Conv):
        p = layer.padding
        y = jax.lax.conv_general_dilated(x, jnp.asarray(layer.kernel, jnp.float32), (layer.stride, layer.stride),
                                         ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + jnp.asarray(layer.bias, jnp.float32)
    if isinstance(layer, ref.AvgPool):
        return nn.avg_pool(x, (layer.window,) * 2, (layer.stride,) * 2)
    if isinstance(layer, ref.MaxPool):
        p = layer.padding
        return nn.max_pool(x, (layer.window,) * 2, (layer.stride,) * 2, padding=((p, p), (p, p)))
    if isinstance(layer, ref.GlobalAvgPool):
        return jnp.mean(x, axis=(1, 2))
    if isinstance(layer, ref.ReLU):
        return jax.nn.relu(x)
    if isinstance(layer, ref.Affine):
        return x * jnp.asarray(layer.scale, jnp.float32) + jnp.asarray(layer.shift, jnp.float32)
    if isinstance(layer, ref.Flatten):
        return x.reshape(x.shape[0], -1)
    if isinstance(layer, ref.Residual):
        b, s = x, x
        for inner in layer.branch:
            b = _apply(inner, b)
        for inner in layer.shortcut:
            s = _apply(inner, s)
        return b + s
    raise TypeError(layer)


def jax_net(layers, start=0, stop=None):
    """Layers ``start .. stop - 1`` as a JAX function of a batch."""
    def f(x):
        for layer in layers[start:stop]:
            x = _apply(layer, x)
        return x
    return f


def jax_net_with_probes(layers):
    """``(images, probes) -> logits`` with ``probes[k]`` added to the input of layer ``k`` (EB taps)."""
    def f(images, probes):
        x = images
        for k, layer in enumerate(layers):
            x = _apply(layer, x + probes[k])
        return x
    return f


def boundary_shapes(layers, images):
    shapes, x = [], images
    for layer in layers:
        shapes.append(x.shape)
        x = jax.eval_shape(lambda a, layer=layer: _apply(layer, a), x)
    return shapes


def eb_every_layer(layers, images, prior, contrastive=False):
    """EB at every layer boundary from one jax.vjp of the model with EB rules."""
    fn = with_excitation_rules(jax_net_with_probes(layers), probe_argnums=1, contrastive=contrastive)
    zeros = tuple(jnp.zeros(s, jnp.float32) for s in boundary_shapes(layers, images))

    @jax.jit
    def run(images, zeros, prior):
        _, pullback = jax.vjp(lambda probes: fn(images, probes), zeros)
        return pullback(prior)[0]

    return run(images, zeros, jnp.asarray(prior, jnp.float32))


def reference_every_layer(layers, images, prior):
    return [ref.excitation_backprop(layers, np.asarray(x, np.float64), np.asarray(p)) for x, p in zip(images, prior)]


# ----------------------------------------------------------------------------------------------------------------
# Small random networks (mixed-sign weights, biases, non-negative inputs).


def rng_layers(kind, seed=0, bias=True):
    r = np.random.default_rng(seed)

    def conv(k, cin, cout, stride=1, padding=0):
        return ref.Conv(r.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin),
                        r.normal(size=cout) * 0.1 * bias, stride, padding)

    def dense(n_in, n_out):
        return ref.Dense(r.normal(size=(n_in, n_out)) / np.sqrt(n_in), r.normal(size=n_out) * 0.1 * bias)

    def affine(c):
        return ref.Affine(r.uniform(0.5, 1.5, size=c), r.normal(size=c) * 0.1 * bias)

    if kind == "dense":
        return [dense(6, 5), ref.ReLU(), dense(5, 4), ref.ReLU(), dense(4, 3)]
    if kind == "conv":
        return [conv(3, 3, 4, padding=1), ref.ReLU(), ref.MaxPool(2, 2), conv(3, 4, 5, padding=1), ref.ReLU(),
                ref.AvgPool(2, 2), ref.GlobalAvgPool(), dense(5, 3)]
    if kind == "residual":
        return [conv(3, 3, 4, padding=1), affine(4), ref.ReLU(), ref.MaxPool(3, 2, padding=1),
                ref.Residual([conv(3, 4, 4, padding=1), affine(4), ref.ReLU(), conv(3, 4, 4, padding=1), affine(4)],
                             []),
                ref.ReLU(),
                ref.Residual([conv(3, 4, 6, stride=2, padding=1), affine(6), ref.ReLU(), conv(3, 6, 6, padding=1),
                              affine(6)],
                             [conv(1, 4, 6, stride=2), affine(6)]),
                ref.ReLU(), ref.GlobalAvgPool(), dense(6, 3)]
    if kind == "contrast":
        return [conv(3, 3, 4, padding=1), ref.ReLU(), ref.MaxPool(2, 2), conv(3, 4, 6, padding=1), ref.ReLU(),
                ref.GlobalAvgPool(), dense(6, 5), ref.ReLU(), dense(5, 3)]
    raise ValueError(kind)


def one_hot(classes, n=3):
    return np.eye(n)[np.asarray(classes)]


@pytest.mark.parametrize("kind,shape", [("dense", (2, 6)), ("conv", (2, 8, 8, 3)), ("residual", (2, 6, 6, 3))])
def test_every_layer_matches_numpy_reference(kind, shape):
    layers = rng_layers(kind)
    images = np.random.default_rng(1).uniform(size=shape).astype(np.float32)
    prior = one_hot([0, 2])
    got = eb_every_layer(layers, jnp.asarray(images), prior)
    want = reference_every_layer(layers, images, prior)
    assert len(got) == len(layers)
    for k in range(len(layers)):
        assert_close(got[k], np.stack([w[k] for w in want]))


def test_reference_rules_by_hand():
    """The reference itself on a 2-input dense layer and a residual sum, worked out on paper."""
    # x = (1, 2); W = [[1, -1], [3, 2]] (2 inputs x 2 outputs): W+ x = (1*1 + 3*2, 0*1 + 2*2) = (7, 4).
    layers = [ref.Dense(np.array([[1.0, -1.0], [3.0, 2.0]]), np.array([5.0, 5.0]))]
    p = ref.excitation_backprop(layers, np.array([1.0, 2.0]), np.array([0.25, 0.75]))[0]
    np.testing.assert_allclose(p, [1 * 1 / 7 * 0.25, 2 * 3 / 7 * 0.25 + 2 * 2 / 4 * 0.75])
    # Residual on one pixel with channels x = (1, 3): the branch (1x1 conv) copies channel 1 into channel 0, the
    # shortcut is the identity, so output channel 0 = 3 + 1 = 4. A prior on output channel 0 splits 3/4 to the
    # branch (which hands it to input channel 1) and 1/4 to the shortcut (input channel 0).
    kernel = np.zeros((1, 1, 2, 2))
    kernel[0, 0, 1, 0] = 1.0
    res = [ref.Residual([ref.Conv(kernel, np.zeros(2))], [])]
    p = ref.excitation_backprop(res, np.array([[[1.0, 3.0]]]), np.array([[[1.0, 0.0]]]))[0]
    np.testing.assert_allclose(p, [[[1 / 4, 3 / 4]]])


def test_conservation_one_hot_and_distribution_prior():
    """Positive activations, one-hot prior: every layer's EB map sums to 1 per example; also for any prior row."""
    layers = rng_layers("residual", seed=3)
    images = np.random.default_rng(2).uniform(size=(3, 6, 6, 3))
    priors = np.concatenate([one_hot([0, 1, 2]), [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]])
    for p in eb_every_layer(layers, jnp.asarray(np.concatenate([images, images]), jnp.float32), priors):
        np.testing.assert_allclose(np.asarray(p).reshape(6, -1).sum(1), np.ones(6), rtol=1e-5)


def conv_split(layers, at):
    return split_layer(jax_net(layers, 0, at), jax_net(layers, at), layer=f"boundary{at}")


def test_public_api_matches_reference_and_prior_is_linear():
    layers = rng_layers("conv", seed=4)
    images = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 8, 8, 3)), jnp.float32)
    model = conv_split(layers, 3)  # the max-pool output, [2, 4, 4, 4]
    prior = jnp.array([[0.3, 0.0, 0.7], [0.0, 1.0, 0.0]], jnp.float32)
    logits = jax_net(layers)(images)

    @jax.jit
    def run(x):
        return dict(
            out=excitation_backprop(model, x, jnp.array([1, 0])),
            # a prior that mixes classes, and one-hot priors on each class
            mixed=marginal_winning_probability(model, x, prior=prior),
            single=[marginal_winning_probability(model, x, c) for c in range(3)],
            # predicted class by default
            default=excitation_backprop(model, x).probability,
            by_argmax=excitation_backprop(model, x, jnp.argmax(logits, -1)).probability,
            resized=excitation_backprop(model, x, 1, resize=True, normalize=True).saliency,
        )

    r = run(images)
    out = r["out"]
    assert isinstance(out, EBResult)
    want = np.stack([w[3] for w in reference_every_layer(layers, np.asarray(images), one_hot([1, 0]))])
    assert out.probability.shape == (2, 4, 4, 4) and out.saliency.shape == (2, 4, 4)
    assert_close(out.probability, want)
    assert_close(out.saliency, want.sum(-1))
    # EB is linear in the prior: the mixture of priors gives the mixture of one-hot maps.
    p0, p1, p2 = r["single"]
    assert_close(r["mixed"], np.stack([0.3 * p0[0] + 0.7 * p2[0], p1[1]]))
    np.testing.assert_array_equal(r["default"], r["by_argmax"])
    assert r["resized"].shape == (2, 8, 8)
    assert float(r["resized"].min()) == 0.0 and float(r["resized"].max()) == pytest.approx(1.0)


def test_batched_jit_vmap_equal_per_example():
    layers = rng_layers("residual", seed=6)
    model = conv_split(layers, 4)
    images = jnp.asarray(np.random.default_rng(7).uniform(size=(4, 6, 6, 3)), jnp.float32)
    targets = jnp.array([0, 2, 1, 2])
    batched = jax.jit(lambda x, t: excitation_backprop(model, x, t).probability)(images, targets)
    # vmap of single-example calls: each example's map on its own.
    singles = jax.jit(jax.vmap(lambda x, t: excitation_backprop(model, x, t).probability))(images[:, None],
                                                                                          targets[:, None])
    np.testing.assert_allclose(singles[:, 0], batched, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Contrastive EB.


@pytest.mark.parametrize("contrast", [5, 6, 8])
def test_contrastive_matches_literal_two_pass_procedure(contrast):
    """One-pass cEB == reference: negated-classifier EB to the contrast layer, subtract, continue down."""
    layers = rng_layers("contrast", seed=8)
    images = np.random.default_rng(9).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    prior = one_hot([2, 0])
    want = np.stack([ref.contrastive_excitation_backprop(layers, x, p, contrast=contrast, saliency=3)
                     for x, p in zip(images, prior)])
    model = conv_split(layers, 3)
    out = jax.jit(lambda x: contrastive_excitation_backprop(model, x, jnp.array([2, 0])))(jnp.asarray(images))
    assert_close(out.probability, want)
    np.testing.assert_allclose(out.saliency, np.maximum(want.sum(-1), 0), rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_contrastive_two_class_toy_finds_discriminative_evidence():
    """Three regions: A (left) only class 0's evidence, S (middle) shared, B (right) only class 1's.

    Input channels (A, S, B); a 1x1 conv makes h1 = A + S and h2 = S + B; global average pool; logits
    (h1 - h2, h2 - h1). EB for either class spreads over its own region and the shared one equally; the dual of
    class 0 excites h2, which takes S and B, so cEB cancels the shared region and keeps only A.
    """
    images = np.zeros((1, 4, 6, 3), np.float32)
    images[0, :, 0:2, 0] = 1.0  # A on the left
    images[0, :, 2:4, 1] = 1.0  # S in the middle
    images[0, :, 4:6, 2] = 1.0  # B on the right
    kernel = jnp.array([[[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]]])  # [1, 1, 3, 2]
    classifier = jnp.array([[1.0, -1.0], [-1.0, 1.0]])

    def features(x):
        return jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")))

    model = split_layer(lambda x: x, lambda x: jnp.mean(features(x), axis=(1, 2)) @ classifier, layer="input")
    x = jnp.asarray(images)
    left, middle, right = np.s_[:, :, 0:2], np.s_[:, :, 2:4], np.s_[:, :, 4:6]
    for cls, own, other in ((0, left, right), (1, right, left)):
        eb = np.asarray(excitation_backprop(model, x, cls).saliency)
        np.testing.assert_allclose(eb[own].sum(), 0.5, rtol=1e-6)
        np.testing.assert_allclose(eb[middle].sum(), 0.5, rtol=1e-6)
        np.testing.assert_allclose(eb[other], 0.0)
        ceb = contrastive_excitation_backprop(model, x, cls)
        np.testing.assert_allclose(np.asarray(ceb.saliency)[own].sum(), 0.5, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(ceb.saliency)[middle], 0.0, atol=1e-7)
        np.testing.assert_allclose(np.asarray(ceb.saliency)[other], 0.0)
        np.testing.assert_allclose(np.asarray(ceb.probability)[other].sum(), -0.5, rtol=1e-6)


def test_contrastive_layer_must_be_below_classifier():
    layers = rng_layers("conv")
    model = split_layer(jax_net(layers), lambda z: z, layer="logits")
    with pytest.raises(ValueError, match="classifier"):
        marginal_winning_probability(model, jnp.ones((1, 8, 8, 3)), 0, contrastive=True)


# ----------------------------------------------------------------------------------------------------------------
# Models we did not write for EB: an unmodified linen ResNet-like module, an NNX module, saliency_jax's ResNet.


class LinenBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.features, (3, 3), self.stride, padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
        y = nn.BatchNorm(use_running_average=True, name="bn1")(y)
        y = nn.relu(y)
        y = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv2")(y)
        y = nn.BatchNorm(use_running_average=True, name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.stride, padding="VALID", use_bias=False, name="proj")(x)
            x = nn.BatchNorm(use_running_average=True, name="proj_bn")(x)
        return nn.relu(y + x)


class LinenResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name="stem")(x)
        x = nn.BatchNorm(use_running_average=True, name="stem_bn")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        x = LinenBlock(4, name="block1")(x)
        x = LinenBlock(6, 2, name="block2")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(3, name="fc")(x)


def random_variables(module, images, seed):
    """Variables of a linen module filled with NumPy random values (no compiled ``init``: fast on CPU).

    Kernels He-scaled normal; biases, BN scale/shift/mean small normals; BN variances in [0.5, 2].
    """
    r = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), images)

    def f(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            value = r.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name == "var":
            value = r.uniform(0.5, 2.0, size=leaf.shape)
        elif name == "scale":
            value = 1.0 + 0.2 * r.normal(size=leaf.shape)
        else:  # bias, mean
            value = 0.2 * r.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(f, shapes)


def bn_affine(scale, bias, mean, var, eps=1e-5):
    s = np.asarray(scale) / np.sqrt(np.asarray(var) + eps)
    return ref.Affine(s, np.asarray(bias) - np.asarray(mean) * s)


def linen_reference_layers(variables):
    p, s = variables["params"], variables["batch_stats"]

    def conv(params, stride=1, padding=1):
        k = np.asarray(params["kernel"])
        return ref.Conv(k, np.asarray(params.get("bias", np.zeros(k.shape[-1]))), stride, padding)

    def bn(name, scope_p, scope_s):
        return bn_affine(scope_p[name]["scale"], scope_p[name]["bias"], scope_s[name]["mean"], scope_s[name]["var"])

    def block(name, stride, proj):
        bp, bs = p[name], s[name]
        branch = [conv(bp["conv1"], stride), bn("bn1", bp, bs), ref.ReLU(), conv(bp["conv2"]), bn("bn2", bp, bs)]
        shortcut = [conv(bp["proj"], stride, 0), bn("proj_bn", bp, bs)] if proj else []
        return [ref.Residual(branch, shortcut), ref.ReLU()]

    return ([conv(p["stem"]), bn("stem_bn", p, s), ref.ReLU(), ref.MaxPool(3, 2, padding=1)]
            + block("block1", 1, False) + block("block2", 2, True)
            + [ref.GlobalAvgPool(), ref.Dense(np.asarray(p["fc"]["kernel"]), np.asarray(p["fc"]["bias"]))])


def test_unmodified_linen_resnet_matches_reference():
    module = LinenResNet()
    images = np.random.default_rng(10).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    variables = random_variables(module, jnp.asarray(images), seed=11)
    layers = linen_reference_layers(variables)
    # The reference forward pass reproduces the module's logits (the layer translation is right).
    ref_logits = np.stack([ref.forward(layers, x.astype(np.float64))[-1][2] for x in images])
    assert_close(module.apply(variables, jnp.asarray(images)), ref_logits)
    want = reference_every_layer(layers, images, one_hot([1, 2]))
    # Boundaries: 4 = max-pool output (block1 input), 6 = block1 output, 8 = block2 output.
    for layer, boundary in (("block1", 6), ("block2", 8)):
        model = linen_layer(module, variables, layer)
        out = jax.jit(lambda x, model=model: excitation_backprop(model, x, jnp.array([1, 2])))(jnp.asarray(images))
        assert_close(out.probability, np.stack([w[boundary] for w in want]))
        np.testing.assert_allclose(np.asarray(out.probability).reshape(2, -1).sum(1), 1.0, rtol=1e-5)
    ceb = jax.jit(lambda x: contrastive_excitation_backprop(linen_layer(module, variables, "block1"), x,
                                                            jnp.array([1, 2])))(jnp.asarray(images))
    want_ceb = np.stack([ref.contrastive_excitation_backprop(layers, x, p, contrast=8, saliency=6)
                         for x, p in zip(images, one_hot([1, 2]))])
    assert_close(ceb.probability, want_ceb)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(4, 5, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc = nnx.Linear(5, 3, rngs=rngs)

    def features(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.avg_pool(x, (2, 2), (2, 2))

    def head(self, a):
        x = nnx.max_pool(nnx.relu(self.conv2(a)), (2, 2), (2, 2))
        return self.fc(jnp.mean(x, axis=(1, 2)))

    def __call__(self, x):
        return self.head(self.features(x))


def test_nnx_module_matches_reference():
    # Build the module abstractly and fill every variable from NumPy (no compiled random init: fast on CPU).
    net = nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0)))
    r = np.random.default_rng(12)
    for _, variable in nnx.iter_graph(net):
        if isinstance(variable, nnx.Variable):
            shape = variable.get_value().shape
            if isinstance(variable, nnx.BatchStat):
                value = r.uniform(0.5, 2.0, size=shape) if variable is net.bn1.var else 0.2 * r.normal(size=shape)
            else:
                value = r.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
            variable.set_value(jnp.asarray(value, jnp.float32))
    images = r.uniform(size=(2, 8, 8, 3)).astype(np.float32)
    layers = [ref.Conv(np.asarray(net.conv1.kernel[...]), np.asarray(net.conv1.bias[...]), 1, 1),
              bn_affine(net.bn1.scale[...], net.bn1.bias[...], net.bn1.mean[...], net.bn1.var[...],
                        net.bn1.epsilon),
              ref.ReLU(), ref.AvgPool(2, 2),
              ref.Conv(np.asarray(net.conv2.kernel[...]), np.asarray(net.conv2.bias[...]), 1, 1), ref.ReLU(),
              ref.MaxPool(2, 2), ref.GlobalAvgPool(),
              ref.Dense(np.asarray(net.fc.kernel[...]), np.asarray(net.fc.bias[...]))]
    assert_close(net(jnp.asarray(images)), np.stack([ref.forward(layers, x.astype(np.float64))[-1][2]
                                                     for x in images]))
    model = split_layer(net.features, net.head, layer="features")
    out = jax.jit(lambda x: excitation_backprop(model, x, jnp.array([0, 1])))(jnp.asarray(images))
    want = np.stack([w[4] for w in reference_every_layer(layers, images, one_hot([0, 1]))])
    assert_close(out.probability, want)


def test_saliency_jax_resnet18_layer3():
    from saliency_jax.models.resnet import ResNet18

    module = ResNet18(num_classes=5, num_filters=8)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    variables = random_variables(module, images, seed=13)
    model = linen_layer(module, variables, "layer3", train=False)

    @jax.jit
    def run(x):
        return (excitation_backprop(model, x, resize=True), contrastive_excitation_backprop(model, x, 3))

    eb, ceb = run(images)
    assert eb.probability.shape == (2, 2, 2, 32) and eb.saliency.shape == (2, 32, 32)
    np.testing.assert_allclose(np.asarray(eb.probability).reshape(2, -1).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ceb.probability).reshape(2, -1).sum(1), 0.0, atol=1e-5)
    assert ceb.saliency.shape == (2, 2, 2) and float(ceb.saliency.min()) >= 0.0


# ----------------------------------------------------------------------------------------------------------------
# Errors.

W = jnp.asarray(np.random.default_rng(14).normal(size=(3, 2)), jnp.float32)


@pytest.mark.parametrize("head,primitive", [
    (lambda a: jnp.tanh(jnp.mean(a, axis=(1, 2))) @ W, "tanh"),
    (lambda a: jax.nn.softmax(jnp.mean(a, axis=(1, 2)) @ W), "div"),
    (lambda a: jnp.mean(a - jnp.mean(a, axis=-1, keepdims=True), axis=(1, 2)) @ W, "sub"),  # layer-norm-like
    (lambda a: jnp.einsum("bhwc,bhwd->bcd", a, a).sum(-1) @ W, "dot_general"),  # attention-like
])
def test_unsupported_operation_raises_naming_it(head, primitive):
    model = split_layer(lambda x: x, head)
    with pytest.raises(UnsupportedOperationError, match=f"'{primitive}'"):
        excitation_backprop(model, jnp.ones((2, 4, 4, 3)), 0)


def test_unsupported_operation_below_the_layer_is_fine():
    model = split_layer(lambda x: jnp.tanh(x) * 0.5 + 0.5, lambda a: jnp.mean(a, axis=(1, 2)) @ jnp.abs(W))
    p = marginal_winning_probability(model, jnp.ones((2, 4, 4, 3)), 1)
    np.testing.assert_allclose(np.asarray(p).reshape(2, -1).sum(1), 1.0, rtol=1e-6)


def test_bad_inputs():
    model = split_layer(lambda x: x, lambda a: jnp.mean(a, axis=(1, 2)) @ W)
    images = jnp.ones((2, 4, 4, 3))
    with pytest.raises(ValueError, match="prior"):
        excitation_backprop(model, images, prior=jnp.ones((2, 5)) / 5)
    with pytest.raises(ValueError, match="not both"):
        excitation_backprop(model, images, 0, prior=jnp.ones((2, 2)) / 2)
    with pytest.raises(TypeError, match="integer"):
        excitation_backprop(model, images, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="batch, height, width"):
        excitation_backprop(model, jnp.ones((4, 4, 3)), 0)
    with pytest.raises(TypeError, match="LayerModel"):
        excitation_backprop(lambda x: x, images, 0)
    dense_layer = split_layer(lambda x: jnp.mean(x, axis=(1, 2)), lambda a: a @ W, layer="pooled")
    with pytest.raises(ValueError, match="marginal_winning_probability"):
        excitation_backprop(dense_layer, images, 0)
    assert marginal_winning_probability(dense_layer, images, 0).shape == (2, 3)


def test_custom_jvp_applied_to_weights_only_is_evaluated_plainly():
    """A custom_jvp function (jax.nn.relu) applied to a parameter, not to data, is just evaluated."""
    w = jax.random.normal(jax.random.key(0), (4, 3))
    x = jax.random.uniform(jax.random.key(1), (2, 4)) + 0.1
    prior = jax.nn.one_hot(jnp.array([0, 2]), 3)
    _, vjp = jax.vjp(with_excitation_rules(lambda a: a @ jax.nn.relu(w)), x)
    p = vjp(prior)[0]
    w_plus = np.maximum(np.asarray(w), 0)
    z = np.asarray(x) @ w_plus
    expected = np.asarray(x) * ((np.asarray(prior) / np.where(z > 0, z, 1)) @ w_plus.T)
    np.testing.assert_allclose(p, expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p).sum(1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Batch norm folded into the conv before it (Guided Zoom's pool generator).


class _BatchNormNet(nn.Module):
    """conv - BN - ReLU, three times, then global average pool and a dense classifier; ``batch_norm=False`` is the
    same network with biased convs and no batch norm (the explicitly folded network)."""

    batch_norm: bool = True

    @nn.compact
    def __call__(self, x):
        from saliency_jax.models.resnet import ReLU

        for i, features in enumerate((4, 5, 6)):
            x = nn.Conv(features, (3, 3), use_bias=not self.batch_norm, name=f"conv{i}")(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name=f"bn{i}")(x)
            x = ReLU(name=f"relu{i}")(x)
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


def _batch_norm_variables(seed=0, mean_scale=0.3):
    """Variables of _BatchNormNet with trained-looking batch norms: scales of both signs (2 of 5 / 6 channels
    negative at least), shifts, means, variances."""
    x = jnp.zeros((1, 10, 10, 3))
    variables = _BatchNormNet().init(jax.random.key(seed), x)
    params, stats = jax.tree.map(np.asarray, dict(variables["params"])), {}
    rng = np.random.default_rng(seed)
    for i, features in enumerate((4, 5, 6)):
        gamma = rng.uniform(0.5, 1.5, features) * np.where(np.arange(features) % 3 == 1, -1.0, 1.0)
        params[f"bn{i}"] = {"scale": gamma.astype(np.float32),
                            "bias": rng.normal(0.0, 0.2, features).astype(np.float32)}
        stats[f"bn{i}"] = {"mean": (mean_scale * rng.normal(size=features)).astype(np.float32),
                           "var": rng.uniform(0.3, 2.0, features).astype(np.float32)}
    return {"params": params, "batch_stats": stats}


def _explicit_fold(variables, eps=1e-3):
    """The folded network's variables, by hand: conv kernel W s, bias beta - mean s, s = gamma / sqrt(var + eps)."""
    params = {"fc": variables["params"]["fc"]}
    for i in range(3):
        bn, stats = variables["params"][f"bn{i}"], variables["batch_stats"][f"bn{i}"]
        s = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
        kernel = np.asarray(variables["params"][f"conv{i}"]["kernel"], np.float64)
        params[f"conv{i}"] = {"kernel": (kernel * s).astype(np.float32),
                              "bias": (np.asarray(bn["bias"]) - np.asarray(stats["mean"]) * s).astype(np.float32)}
    return {"params": params}


def _relative_l1(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).sum() / np.abs(b).sum())


def test_fold_batch_norm_equals_eb_on_an_explicitly_folded_network():
    from saliency_jax.saliency import fold_batch_norm

    net, plain = _BatchNormNet(), _BatchNormNet(batch_norm=False)
    variables = _batch_norm_variables()
    images = jax.random.uniform(jax.random.key(5), (4, 10, 10, 3))
    targets = jnp.array([0, 1, 2, 1])
    folded = fold_batch_norm(net, variables, images)
    explicit = _explicit_fold(variables)
    # The forward pass is kept (also the explicit network's), and the variables given are not modified.
    np.testing.assert_allclose(net.apply(folded, images), net.apply(variables, images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain.apply(explicit, images), net.apply(variables, images), rtol=1e-5, atol=1e-5)
    assert float(np.min(variables["params"]["bn1"]["scale"])) < 0
    np.testing.assert_array_equal(jax.tree.structure(folded), jax.tree.structure(variables))
    for method, layer in ((contrastive_excitation_backprop, "relu0"), (excitation_backprop, "relu1")):
        got = method(linen_layer(net, folded, layer), images, targets)
        want = method(linen_layer(plain, explicit, layer), images, targets)
        assert_close(got.probability, want.probability)
        assert_close(got.saliency, want.saliency)
        if method is contrastive_excitation_backprop:
            # Without the fold the batch norms pass the signal and the negative scales are ignored: other maps.
            passed = method(linen_layer(net, variables, layer), images, targets)
            assert _relative_l1(got.saliency, passed.saliency) > 0.1


def test_fold_batch_norm_gives_eb_the_authors_sign_flip():
    """Guided Zoom's released pool generator negates the conv channels whose batch-norm scale is negative and
    takes |scale|, leaving mean and shift (restated here from reading caffe/evidence_pool_generation.py). With zero
    means their flip keeps the forward pass, and EB through it equals EB through the fold."""
    from saliency_jax.saliency import fold_batch_norm

    net = _BatchNormNet()
    variables = _batch_norm_variables(seed=1, mean_scale=0.0)
    images = jax.random.uniform(jax.random.key(2), (3, 10, 10, 3))
    flipped = jax.tree.map(np.array, variables)
    for i in range(3):
        negative = flipped["params"][f"bn{i}"]["scale"] < 0
        flipped["params"][f"conv{i}"]["kernel"][..., negative] *= -1
        flipped["params"][f"bn{i}"]["scale"] = np.abs(flipped["params"][f"bn{i}"]["scale"])
    np.testing.assert_allclose(net.apply(flipped, images), net.apply(variables, images), rtol=1e-5, atol=1e-6)
    folded = fold_batch_norm(net, variables, images)
    got = contrastive_excitation_backprop(linen_layer(net, folded, "relu0"), images, 1)
    want = contrastive_excitation_backprop(linen_layer(net, flipped, "relu0"), images, 1)
    assert_close(got.probability, want.probability)


def test_fold_batch_norm_on_the_library_resnet_and_bad_input():
    from saliency_jax.models import ResNet18
    from saliency_jax.saliency import fold_batch_norm

    model = ResNet18(num_classes=3, num_filters=2)
    images = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(1), images)  # random variables of the right shapes
    rng = np.random.default_rng(0)
    stats = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), shapes["batch_stats"])
    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.5).astype(a.dtype), shapes["params"])
    variables = {"params": params, "batch_stats": stats}
    folded = fold_batch_norm(model, variables, images, train=False)
    apply = jax.jit(functools.partial(model.apply, train=False))
    np.testing.assert_allclose(apply(folded, images), apply(variables, images), rtol=1e-4, atol=1e-5)
    # Every conv (stem, blocks, projection shortcuts) was folded: its batch norm is now a shift.
    for path in ("bn1", "layer1/0/bn2", "layer3/0/downsample/1", "layer4/1/bn1"):
        node = folded["params"]
        for key in path.split("/"):
            node = node[key]
        np.testing.assert_array_equal(node["scale"], 1.0)
    with pytest.raises(ValueError, match="batch statistics"):
        fold_batch_norm(model, variables, images, train=True)
