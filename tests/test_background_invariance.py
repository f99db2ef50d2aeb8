"""Background invariance (Cruz & Cardoso): networks, losses, mask binarisation, the three phases' steps, the
Attention baseline's crops and the MNIST background protocol.

References are hand computations (stated next to each), parameter counts of the authors' Keras networks worked out
by hand, scipy's binary dilation, a brute-force NumPy Otsu, and jax.image.resize for the crops.
"""

from __future__ import annotations

import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import scipy.ndimage
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from saliency_jax import models
from saliency_jax.data import get_source
from saliency_jax.evaluation import backgrounds as bg
from saliency_jax.models import background_invariance as bim
from saliency_jax.saliency import grad_cam, linen_layer
from saliency_jax.training import background_invariance as bi


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(module, *args):
    return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)["params"]


def numpy_params(module, *args, seed=0):
    """Concrete params without compiling ``module.init`` (random initialisers compile slowly on XLA:CPU): LeCun-
    normal kernels from NumPy, zero biases."""
    rng = np.random.default_rng(seed)
    shapes = abstract_params(module, *args)

    def make(path, leaf):
        if getattr(path[-1], "key", None) == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape).astype(np.float32))
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


# ----------------------------------------------------------------------------------------------------------------
# Networks.


def test_vanilla_cnn_matches_the_keras_classifier():
    model = models.get_model("vanilla_cnn", 10)
    x = jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)
    params = abstract_params(model, x)
    # conv 1->32, 32->64, 64->128 (3x3 + bias), dense 4*4*128 -> 128, 128 -> 10: 356,234 as Keras' summary.
    assert n_params(params) == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128) + (2048 * 128 + 128) \
        + (128 * 10 + 10) == 356234
    logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), {"params": params}, x)
    assert logits.shape == (2, 10) and feats.shape == (2, 4, 4, 128)
    # 28 px: int(log2(7)) = 2 blocks, a 7x7x64 map.
    _, feats28 = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, return_features=True)[0],
                                jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    assert feats28.shape == (1, 7, 7, 64)
    assert bim.grad_cam_layer(32) == models.GRAD_CAM_LAYER["vanilla_cnn"] == "relu3"
    with pytest.raises(ValueError, match="8 px"):
        bim.num_blocks(4)


def test_unet_and_generator_match_the_keras_networks():
    x = jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)
    unet = bim.UNet()
    # enc 1->32, 32->64, 64->128; bottleneck 128->128; dec 128->128 (then +128 skip), 256->64 (+64), 128->32 (+32);
    # 1x1 64->1.
    expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128) + 2 * (9 * 128 * 128 + 128) \
        + (9 * 256 * 64 + 64) + (9 * 128 * 32 + 32) + (64 + 1)
    assert n_params(abstract_params(unet, x)) == expected == 572321
    assert jax.eval_shape(lambda x: unet.init_with_output(jax.random.key(0), x)[0], x).shape == (2, 32, 32, 1)

    gen = bim.BackgroundGenerator((32, 32, 1), tiles=2)
    assert bim.background_noise_shape((32, 32, 1), 2) == (2, 2, 16)
    z = jax.ShapeDtypeStruct((3, 2, 2, 16), jnp.float32)
    # 4x4x1 -> conv 128 -> up -> conv 64 -> up -> conv 32 -> 1x1 -> 1.
    assert n_params(abstract_params(gen, z)) == (9 * 128 + 128) + (9 * 128 * 64 + 64) + (9 * 64 * 32 + 32) + 33
    assert jax.eval_shape(lambda z: gen.init_with_output(jax.random.key(0), z)[0], z).shape == (3, 32, 32, 1)
    # 224 px RGB: 112 px tiles = 7 * 2^4: a 7x7x3 noise map (147) and four upsamplings.
    assert bim.background_noise_shape((224, 224, 3), 2) == (2, 2, 147)
    for bad, match in (((24, 24, 1), "upsampling"), ((32, 16, 1), "square"), ((30, 30, 1), "divisible")):
        with pytest.raises(ValueError, match=match):
            bim.background_noise_shape(bad, 2)
    with pytest.raises(ValueError, match="z must be"):
        gen.init(jax.random.key(0), jnp.zeros((1, 2, 2, 15)))


def test_generator_tiles_come_from_their_own_noise():
    gen = bim.BackgroundGenerator((16, 16, 1), tiles=2, base_features=4)
    z = bim.sample_background_noise(jax.random.key(0), 2, (16, 16, 1), 2)
    variables = {"params": numpy_params(gen, z, seed=1)}
    apply = jax.jit(gen.apply)
    out = np.asarray(apply(variables, z))
    assert out.shape == (2, 16, 16, 1) and out.min() > 0 and out.max() < 1
    z2 = z.at[:, 1, 0].set(-z[:, 1, 0])  # the bottom-left tile's noise
    changed = np.any(np.asarray(apply(variables, z2)) != out, axis=(0, 3))
    expected = np.zeros((16, 16), bool)
    expected[8:, :8] = True
    np.testing.assert_array_equal(changed, expected)


def test_grad_cam_reaches_the_last_conv_block():
    model = bim.VanillaCNN(3, base_features=4, dense_features=8)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
    variables = {"params": numpy_params(model, x)}
    split = linen_layer(model, variables, bim.grad_cam_layer(32))
    assert split.activation_shape(x).shape == (2, 8, 8, 16)
    maps = jax.jit(lambda x, y: grad_cam(split, x, y))(x, jnp.array([0, 2]))
    assert maps.shape == (2, 32, 32)


# ----------------------------------------------------------------------------------------------------------------
# Losses, masks, composites.


def test_total_variation_and_mask_loss_by_hand():
    m = np.zeros((1, 3, 3, 1), np.float32)
    m[0, 1, 1, 0] = 1.0
    # Vertical differences: 6 pairs, 2 of them |1|; horizontal likewise.
    np.testing.assert_allclose(bi.total_variation(jnp.asarray(m)), 2 / 6 + 2 / 6, rtol=1e-6)
    masks = np.stack([np.full((4, 4, 1), 0.5), np.full((4, 4, 1), 0.1)]).astype(np.float32)
    logits, labels = jnp.zeros((2, 5)), jnp.array([0, 3])
    loss, parts = bi.mask_loss(logits, labels, jnp.asarray(masks), area=0.2, total_variation_weight=0.1)
    # CE of uniform logits = log 5; area: mean(relu(0.5 - 0.2), relu(0.1 - 0.2)) = 0.15; constant masks: TV 0.
    np.testing.assert_allclose(parts["cross_entropy"], math.log(5), rtol=1e-6)
    np.testing.assert_allclose(parts["area_penalty"], 0.15, rtol=1e-6)
    np.testing.assert_allclose(loss, math.log(5) + 0.15, rtol=1e-6)
    _, sq = bi.mask_loss(logits, labels, jnp.asarray(masks), area_loss="squared")
    np.testing.assert_allclose(sq["area_penalty"], 0.3 ** 2 / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="area_loss"):
        bi.mask_loss(logits, labels, jnp.asarray(masks), area_loss="cubic")


otsu_threshold = jax.jit(bi.otsu_threshold, static_argnums=1)
binarize_masks = jax.jit(bi.binarize_masks, static_argnums=1, static_argnames=("area", "nbins"))


def _otsu_brute_force(values, nbins=256):
    """Otsu from its definition: try every split of the 256-bin histogram, keep the best (lowest on ties)."""
    lo, hi = values.min(), values.max()
    counts, edges = np.histogram(values, bins=nbins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_var = 0, -1.0
    for k in range(nbins - 1):
        w1, w2 = counts[:k + 1].sum(), counts[k + 1:].sum()
        if w1 == 0 or w2 == 0:
            continue
        mu1 = (counts[:k + 1] * centers[:k + 1]).sum() / w1
        mu2 = (counts[k + 1:] * centers[k + 1:]).sum() / w2
        var = w1 * w2 * (mu1 - mu2) ** 2
        if var > best_var + 1e-9 * max(best_var, 1):
            best, best_var = k, var
    return centers[best]


def test_otsu_by_hand():
    # 12 pixels at 0.1, 4 at 0.9: every split between the two occupied bins has the same variance, the first wins:
    # the centre of bin 0 = 0.1 + 0.8 / 512.
    two = np.array([0.1] * 12 + [0.9] * 4, np.float32)
    # 4 at 0, 4 at 0.5, 8 at 1: split after 0 -> 4 * 12 * (0 - 10/12)^2 = 33.3; after 0.5 -> 8 * 8 * 0.75^2 = 36:
    # the threshold is the centre of 0.5's bin (128), 128.5 / 256, so 0.5 goes to the background.
    three = np.array([0.0] * 4 + [0.5] * 4 + [1.0] * 8, np.float32)
    thr = np.asarray(otsu_threshold(jnp.asarray(np.stack([two, three]))))
    np.testing.assert_allclose(thr, [0.1 + 0.8 / 512, 128.5 / 256], rtol=1e-6)
    masks = jnp.asarray(np.stack([two, three]).reshape(2, 4, 4, 1))
    out = np.asarray(binarize_masks(masks, "otsu")).reshape(2, 16)
    np.testing.assert_array_equal(out[0], two >= 0.5)
    np.testing.assert_array_equal(out[1], three == 1.0)
    # Random masks against the brute-force definition.
    rng = np.random.default_rng(0)
    vals = rng.random((6, 64)).astype(np.float32) ** np.array([[1], [2], [3], [0.5], [4], [1]])
    np.testing.assert_allclose(otsu_threshold(jnp.asarray(vals)),
                               [_otsu_brute_force(v) for v in vals], rtol=1e-5)
    # A constant mask: its value, so every pixel is foreground (scikit-image).
    np.testing.assert_array_equal(binarize_masks(jnp.full((1, 2, 2, 1), 0.3), "otsu"), np.ones((1, 2, 2, 1)))


def test_otsu_matches_scikit_image_if_installed():
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(1)
    vals = rng.random((5, 16, 16, 1)).astype(np.float32) ** 3
    np.testing.assert_allclose(otsu_threshold(jnp.asarray(vals.reshape(5, -1))),
                               [filters.threshold_otsu(v) for v in vals], rtol=1e-6)


def test_binarize_half_quantile_none():
    m = (np.arange(16, dtype=np.float32) / 15).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(np.asarray(binarize_masks(jnp.asarray(m), "0.5")), m >= 0.5)
    # numpy.quantile (linear): position 15 * 0.8 = 12 -> 12/15 = 0.8; 4 pixels are >= it.
    q = np.asarray(binarize_masks(jnp.asarray(m), "quantile", area=0.2))
    np.testing.assert_array_equal(q.reshape(-1), np.arange(16) >= 12)
    # Per image: a second, scaled mask gets its own quantile.
    two = jnp.asarray(np.concatenate([m, m * 0.1]))
    np.testing.assert_array_equal(np.asarray(binarize_masks(two, "quantile", area=0.2))[1].reshape(-1),
                                  np.arange(16) >= 12)
    np.testing.assert_array_equal(binarize_masks(jnp.asarray(m), "none"), m)
    with pytest.raises(ValueError, match="binarize"):
        binarize_masks(jnp.asarray(m), "mean")


def test_heuristic_mask_composite_and_penalty():
    x = jnp.array([[[[0.0], [0.3]], [[1.0], [0.0]]]])
    m = bi.heuristic_mask(x)
    np.testing.assert_array_equal(m[..., 0], [[[0, 1], [1, 0]]])
    b = jnp.full(x.shape, 0.6)
    np.testing.assert_allclose(bi.composite(x, m, b)[..., 0], [[[0.6, 0.3], [1.0, 0.6]]])
    # A one-channel mask broadcasts over three channels.
    rgb = jnp.ones((1, 2, 2, 3)) * 0.2
    np.testing.assert_allclose(bi.composite(rgb, m, jnp.zeros((1, 2, 2, 3)))[0, 0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="masks"):
        bi.composite(rgb, jnp.ones((1, 2, 2, 2)), 0.0)
    np.testing.assert_allclose(bi.brightness_penalty(b), 0.1, rtol=1e-6)
    np.testing.assert_allclose(bi.brightness_penalty(b * 0.5), 0.0)
    ce, gen = bi.adversarial_losses(jnp.zeros((1, 4)), jnp.array([1]), b, penalise_brightness=True)
    np.testing.assert_allclose([ce, gen], [math.log(4), -math.log(4) + 0.1], rtol=1e-6)


def test_settings_from_mapping():
    cfg = bi.BackgroundInvarianceConfig.from_mapping({"binarize": "quantile", "area": 0.3})
    assert cfg.binarize == "quantile" and cfg.area == 0.3 and cfg.classifier_learning_rate == 1e-3
    assert cfg.mask_learning_rate == cfg.generator_learning_rate == 1e-5
    with pytest.raises(ValueError, match="unknown background-invariance settings.*'aera'"):
        bi.BackgroundInvarianceConfig.from_mapping({"aera": 0.2})
    for bad in ({"binarize": "0.6"}, {"area": 1.0}, {"mask": "gt"}, {"background": "real"}, {"tiles": 0}):
        with pytest.raises(ValueError):
            bi.BackgroundInvarianceConfig(**bad)
    assert cfg.penalise_brightness(1) and not cfg.penalise_brightness(3)
    assert bi.BackgroundInvarianceConfig(brightness_penalty=True).penalise_brightness(3)


# ----------------------------------------------------------------------------------------------------------------
# The three phases on tiny models.

SIZE, CLASSES = 16, 3


def tiny_models(mask="unet", background="adversarial"):
    return bi.BackgroundInvarianceModels(
        classifier=bim.VanillaCNN(CLASSES, base_features=4, dense_features=16),
        mask_generator=bim.UNet(base_features=4) if mask == "unet" else None,
        background_generator=(bim.BackgroundGenerator((SIZE, SIZE, 1), tiles=2, base_features=4)
                              if background == "adversarial" else None))


def tiny_batch(n=12, seed=0):
    """Bright squares on a black background; the class is the square's quadrant (0, 1, 2)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = np.zeros((n, SIZE, SIZE, 1), np.float32)
    for i, y in enumerate(labels):
        r, c = [(2, 2), (2, 9), (9, 2)][y]
        images[i, r:r + 5, c:c + 5, 0] = rng.uniform(0.6, 1.0)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)}


def tiny_state(mdl, cfg, seed=0, optimizers=None):
    """The state :func:`bi.init_state` builds (checked in test_init_state_structure), with NumPy-made weights."""
    optimizers = optimizers or bi.make_optimizers(cfg)
    x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 1), jnp.float32)
    params = {"classifier": numpy_params(mdl.classifier, x, seed=seed)}
    if mdl.mask_generator is not None:
        params["mask_generator"] = numpy_params(mdl.mask_generator, x, seed=seed + 1)
    if mdl.background_generator is not None:
        z = jax.ShapeDtypeStruct((1, 2, 2, 16), jnp.float32)
        params["background_generator"] = numpy_params(mdl.background_generator, z, seed=seed + 2)
    opt_state = {k: optimizers[k].init(v) for k, v in params.items()}
    state = bi.BackgroundInvarianceState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                                         opt_state=opt_state)
    return state, optimizers


def test_init_state_structure():
    cfg = bi.BackgroundInvarianceConfig()
    mdl = tiny_models()
    mine, opts = tiny_state(mdl, cfg)
    built = jax.eval_shape(lambda: bi.init_state(mdl, opts, (SIZE, SIZE, 1), jax.random.key(0)))
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    assert shapes(built) == shapes(mine)
    assert set(built.params) == set(built.opt_state) == {"classifier", "mask_generator", "background_generator"}
    heuristic = bi.BackgroundInvarianceModels(classifier=mdl.classifier)
    assert set(jax.eval_shape(lambda: bi.init_state(heuristic, opts, (SIZE, SIZE, 1), jax.random.key(0))).params) \
        == {"classifier"}
    with pytest.raises(KeyError, match="mask_generator"):
        jax.eval_shape(lambda: bi.init_state(mdl, {"classifier": opts["classifier"]}, (SIZE, SIZE, 1),
                                             jax.random.key(0)))


def run_steps(step, state, batch, n):
    step = jax.jit(step)
    key = jax.random.key(42)
    history = []
    for _ in range(n):
        state, metrics = step(state, batch, key)
        history.append(jax.tree.map(float, metrics))
    return state, history


def test_phase1_reduces_cross_entropy():
    cfg = bi.BackgroundInvarianceConfig(classifier_learning_rate=3e-3)
    mdl = tiny_models()
    state, opts = tiny_state(mdl, cfg)
    new, hist = run_steps(bi.make_classifier_step(mdl, opts), state, tiny_batch(), 25)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert int(new.step) == 25
    same = jax.tree.map(np.array_equal, new.params["mask_generator"], state.params["mask_generator"])
    assert all(jax.tree.leaves(same))


def test_phase2_reduces_mask_loss_and_keeps_the_classifier():
    cfg = bi.BackgroundInvarianceConfig(mask_learning_rate=1e-2)
    mdl = tiny_models()
    state, opts = tiny_state(mdl, cfg)
    state, _ = run_steps(bi.make_classifier_step(mdl, opts), state, tiny_batch(), 15)
    new, hist = run_steps(bi.make_mask_step(mdl, opts, cfg), state, tiny_batch(), 20)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.05
    assert set(hist[0]) >= {"cross_entropy", "area_penalty", "total_variation", "mask_area", "accuracy"}
    same = jax.tree.map(np.array_equal, new.params["classifier"], state.params["classifier"])
    assert all(jax.tree.leaves(same))
    with pytest.raises(ValueError, match="heuristic"):
        bi.make_mask_step(tiny_models(mask="heuristic"), opts, cfg)


def _phase3_inputs(mdl, state, batch, key, cfg):
    """The masks and noise the step uses (the step's documented key derivation)."""
    k_noise, _ = jax.random.split(jax.random.fold_in(key, state.step))
    masks = jax.jit(lambda s, x: bi.phase3_masks(mdl, s, x, cfg))(state, batch["image"])
    z = bim.sample_background_noise(k_noise, batch["image"].shape[0], (SIZE, SIZE, 1), 2)
    return masks, z


def _composite_ce(mdl, classifier_params, generator_params, batch, masks, z):
    b = mdl.background_generator.apply({"params": generator_params}, z)
    logits = mdl.classifier.apply({"params": classifier_params}, bi.composite(batch["image"], masks, b))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), b


def test_phase3_min_max_signs():
    cfg = bi.BackgroundInvarianceConfig(binarize="0.5", brightness_penalty=False, generator_learning_rate=1e-3)
    mdl = tiny_models()
    state, opts = tiny_state(mdl, cfg)
    batch, key = tiny_batch(), jax.random.key(7)
    state, _ = run_steps(bi.make_classifier_step(mdl, opts), state, batch, 10)
    masks, z = _phase3_inputs(mdl, state, batch, key, cfg)
    new, metrics = jax.jit(bi.make_adversarial_step(mdl, opts, cfg))(state, batch, key)
    f0, f1 = state.params["classifier"], new.params["classifier"]
    g0, g1 = state.params["background_generator"], new.params["background_generator"]
    ce = jax.jit(lambda f, g: _composite_ce(mdl, f, g, batch, masks, z)[0])
    before = ce(f0, g0)
    np.testing.assert_allclose(metrics["classifier_loss"], before, rtol=1e-5)
    after_f, after_g = ce(f1, g0), ce(f0, g1)
    assert after_f < before  # the classifier's update lowers the CE on the composites ...
    assert after_g > before  # ... the generator's raises it.
    same = jax.tree.map(np.array_equal, new.params["mask_generator"], state.params["mask_generator"])
    assert all(jax.tree.leaves(same))


def test_phase3_gradients_are_each_players_own():
    """With SGD(lr=1) the update is minus the gradient: classifier dCE, generator d(-CE + penalty)."""
    cfg = bi.BackgroundInvarianceConfig(binarize="otsu")  # one channel: brightness penalty on
    sgd = {k: optax.sgd(1.0) for k in ("classifier", "mask_generator", "background_generator")}
    mdl = tiny_models()
    state, _ = tiny_state(mdl, cfg, optimizers=sgd)
    # Bias the generator's output up so that the penalty relu(mean(b) - 0.5) is active.
    gp = dict(state.params["background_generator"])
    gp["out"] = {**gp["out"], "bias": gp["out"]["bias"] + 2.0}
    state = state.replace(params={**state.params, "background_generator": gp})
    batch, key = tiny_batch(), jax.random.key(3)
    masks, z = _phase3_inputs(mdl, state, batch, key, cfg)
    new, metrics = jax.jit(bi.make_adversarial_step(mdl, sgd, cfg))(state, batch, key)
    assert float(metrics["brightness_penalty"]) > 0

    def classifier_loss(fp):
        return _composite_ce(mdl, fp, state.params["background_generator"], batch, masks, z)[0]

    def generator_loss(bp):
        ce, b = _composite_ce(mdl, state.params["classifier"], bp, batch, masks, z)
        return -ce + bi.brightness_penalty(b)

    for role, fn in (("classifier", classifier_loss), ("background_generator", generator_loss)):
        grads = jax.jit(jax.grad(fn))(state.params[role])
        step_taken = jax.tree.map(lambda a, b: a - b, state.params[role], new.params[role])
        for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(step_taken)):
            np.testing.assert_allclose(s, g, rtol=2e-4, atol=1e-6)


def test_phase3_preview_shows_what_the_step_trains_on():
    cfg = bi.BackgroundInvarianceConfig(binarize="quantile")
    mdl = tiny_models()
    state, _ = tiny_state(mdl, cfg)
    batch, key = tiny_batch(4), jax.random.key(11)
    k_noise, _ = jax.random.split(jax.random.fold_in(key, state.step))
    out = jax.jit(lambda s, x, k: bi.phase3_preview(mdl, s, x, k, cfg))(state, batch["image"], k_noise)
    masks, z = _phase3_inputs(mdl, state, batch, key, cfg)
    np.testing.assert_array_equal(out["mask"], masks)
    assert out["soft_mask"].shape == (4, SIZE, SIZE, 1) and out["background"].shape == (4, SIZE, SIZE, 1)
    # Quantile masks keep about 20 % of each image (ties aside).
    np.testing.assert_allclose(np.asarray(out["mask"]).mean(axis=(1, 2, 3)), 0.2, atol=1 / 256 + 1e-6)
    np.testing.assert_allclose(out["composite"], bi.composite(batch["image"], out["mask"], out["background"]),
                               atol=1e-6)


@pytest.mark.parametrize("background", ["black", "noise"])
def test_phase3_ablation_backgrounds_with_heuristic_masks(background):
    cfg = bi.BackgroundInvarianceConfig(mask="heuristic", background=background, binarize="none")
    mdl = tiny_models(mask="heuristic", background=background)
    state, opts = tiny_state(mdl, cfg)
    assert set(state.params) == {"classifier"}
    new, metrics = jax.jit(bi.make_adversarial_step(mdl, opts, cfg))(state, tiny_batch(), jax.random.key(0))
    assert int(new.step) == 1 and np.isfinite(float(metrics["classifier_loss"]))
    # The heuristic mask is x > 0: the squares' area, 25 / 256.
    np.testing.assert_allclose(metrics["mask_area"], 25 / 256, rtol=1e-6)
    with pytest.raises(ValueError, match="background_generator"):
        bi.make_adversarial_step(tiny_models(mask="heuristic"), opts, cfg)


def test_phase3_sharded_jit_and_orbax_round_trip(tmp_path):
    cfg = bi.BackgroundInvarianceConfig()
    mdl = tiny_models()
    opts = bi.make_optimizers(cfg)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(tiny_state(mdl, cfg, optimizers=opts)[0], repl)
    step = jax.jit(bi.make_adversarial_step(mdl, opts, cfg), in_shardings=(repl, shard, repl),
                   out_shardings=(repl, repl))
    batch = jax.device_put(tiny_batch(), shard)
    key = jax.random.key(5)
    state, _ = step(state, batch, key)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    a, ma = step(state, batch, key)
    b, mb = step(restored, batch, key)
    assert int(b.step) == 2
    for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb))):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------------------------
# The Attention baseline.


def test_largest_component_eight_connected_first_on_ties():
    m = np.array([[[1, 0, 0, 0],
                   [0, 1, 0, 1],
                   [0, 0, 0, 1],
                   [1, 1, 0, 0]],
                  [[1, 1, 0, 0],
                   [0, 0, 0, 0],
                   [0, 0, 1, 1],
                   [0, 0, 0, 0]]], bool)
    out = np.asarray(bim.largest_component(jnp.asarray(m)))
    # Image 0: the diagonal pair (0,0)-(1,1) is one region (8-connectivity), as are (1,3)-(2,3) and (3,0)-(3,1):
    # three regions of 2, the first in raster order wins.
    exp0 = np.zeros((4, 4), bool)
    exp0[0, 0] = exp0[1, 1] = True
    np.testing.assert_array_equal(out[0], exp0)
    np.testing.assert_array_equal(out[1], np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool))
    # A larger, later region wins over a smaller, earlier one.
    m2 = np.zeros((1, 5, 5), bool)
    m2[0, 0, 0] = True
    m2[0, 2:5, 3] = True
    expected = m2[0].copy()
    expected[0, 0] = False
    np.testing.assert_array_equal(np.asarray(bim.largest_component(jnp.asarray(m2)))[0], expected)


def test_attention_boxes_by_hand():
    feats = np.zeros((2, 4, 4, 2), np.float32)
    # Image 0: |-1.0| at (1, 2) and 0.9 at (2, 3) (channel max of abs, min-max: 1.0 and 0.9), diagonal neighbours;
    # 0.8 at (0, 0) also passes tau = 0.7 but is a lone pixel: the two-pixel region wins.
    feats[0, 1, 2, 1] = -1.0
    feats[0, 2, 3, 0] = 0.9
    feats[0, 0, 0, 0] = 0.8
    # Image 1: constant map -> the whole image.
    boxes = np.asarray(bim.attention_boxes(jnp.asarray(feats), (32, 32), 0.7))
    # rows [1, 3) -> [32*1//4, 32*3//4 + 1) = [8, 25); cols [2, 4) -> [16, min(33, 32)).
    np.testing.assert_array_equal(boxes, [[8, 16, 25, 32], [0, 0, 32, 32]])


def test_crop_and_resize_is_an_exact_crop_and_a_bilinear_resize():
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    boxes = jnp.array([[8, 16, 25, 32], [3, 5, 20, 21]], jnp.int32)
    out = bim.crop_and_resize(x, boxes, (17, 16))
    np.testing.assert_allclose(out[0], x[0, 8:25, 16:32], atol=1e-6)
    np.testing.assert_allclose(out[1], x[1, 3:20, 5:21], atol=1e-6)
    up = bim.crop_and_resize(x, boxes, (34, 32))
    ref = jax.image.resize(x[0, 8:25, 16:32], (34, 32, 3), "linear")
    np.testing.assert_allclose(up[0], ref, atol=1e-5)


def test_attention_cnn_forward_and_frozen_global_cnn():
    model = models.get_model("attention_cnn", 4, base_features=4, dense_features=8, local_features=(4, 8, 8),
                             fusion_features=(16, 8))
    x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 1))
    variables = {"params": numpy_params(model, x)}
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_boxes=True))
    logits, boxes = apply(variables["params"], x)
    assert logits.shape == (3, 4) and boxes.shape == (3, 4)
    global_model = bim.VanillaCNN(4, base_features=4, dense_features=8)
    gvars = {"params": numpy_params(global_model, x, seed=2)}
    params = bi.with_global_params(variables["params"], gvars["params"])
    feats = jax.jit(lambda v, x: global_model.apply(v, x, return_features=True)[1])(gvars, x)
    np.testing.assert_array_equal(apply(params, x)[1], jax.jit(bim.attention_boxes, static_argnums=1)(feats, (16, 16)))
    tx = bi.attention_optimizer(optax.sgd(0.1))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, x)[0] ** 2)))(params)
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["global_cnn"]))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert all(float(jnp.abs(u).sum()) == 0 for u in jax.tree.leaves(updates["global_cnn"]))
    assert all(float(jnp.abs(u).sum()) > 0 for u in jax.tree.leaves(updates["local_cnn"]))
    with pytest.raises(ValueError, match="global_cnn"):
        bi.with_global_params(params, jax.eval_shape(bim.VanillaCNN(4).init, jax.random.key(0), x)["params"])
    plain = bim.AttentionCNN(4, fuse_global=False, base_features=4, dense_features=8, local_features=(4, 8, 8),
                             fusion_features=(16, 8))
    assert jax.eval_shape(plain.init, jax.random.key(0), x)["params"]["fusion1"]["kernel"].shape == (8, 16)


# ----------------------------------------------------------------------------------------------------------------
# The MNIST background protocol.


def hand_digit():
    """One lit pixel at (16, 16): its dilation by disk(2) is the 13 pixels with dy^2 + dx^2 <= 4."""
    x = np.zeros((1, 32, 32, 1), np.float32)
    x[0, 16, 16, 0] = 0.7
    return x


def test_background_pixels_on_a_hand_made_digit():
    x = hand_digit()
    yy, xx = np.mgrid[:32, :32]
    kept = (yy - 16) ** 2 + (xx - 16) ** 2 <= 4
    assert kept.sum() == 13 and kept[14, 16] and kept[15, 15] and not kept[14, 15]
    sets = {k: np.asarray(v)[0, ..., 0] for k, v in bg.background_test_sets(jnp.asarray(x)).items()}
    np.testing.assert_array_equal(sets["clean"], x[0, ..., 0])
    for name in bg.BACKGROUND_NAMES:
        out, pattern = sets[name], bg.background_pattern(name)
        assert out[16, 16] == np.float32(0.7)
        np.testing.assert_array_equal(out[kept & ~((yy == 16) & (xx == 16))], 0.0)  # the dark halo
        np.testing.assert_array_equal(out[~kept], pattern[~kept])
    p = {name: bg.background_pattern(name) for name in bg.BACKGROUND_NAMES}
    # Stripes y = x + b, b = -31, -21, ..., 29, thickness 2: row 0 is on at x = 0, 1, 10, 11, 20, 21, 30, 31.
    np.testing.assert_array_equal(np.nonzero(p["stripes"][0])[0], [0, 1, 10, 11, 20, 21, 30, 31])
    assert p["stripes"][9, 0] == 1 and p["stripes"][1, 0] == 0 and p["stripes"][5, 5] == 1
    # Checkerboard: squares start at -2: (0,0) off, (0,4) on, (4,4) off, (0,3) off, 512 pixels on.
    assert [p["checkerboard"][i, j] for i, j in ((0, 0), (0, 4), (4, 4), (0, 3))] == [0, 1, 0, 0]
    assert p["checkerboard"].sum() == 512
    # Border: 2 px.
    assert p["border"].sum() == 32 * 32 - 28 * 28 and p["border"][1, 5] == 1 and p["border"][2, 5] == 0
    # Circles: Bresenham octant of radius 6 is (0,6), (1,6), (2,6), (3,5), (4,4); 32 points per circle.
    octant = [(0, 6), (1, 6), (2, 6), (3, 5), (4, 4)]
    ring = {(sr * a, sc * b) for a, b in octant for sr in (1, -1) for sc in (1, -1)}
    ring |= {(c, r) for r, c in ring}
    assert len(ring) == 32
    for cy, cx in ((8, 8), (24, 8), (8, 24), (24, 24)):
        on = {(int(r) - cy, int(c) - cx) for r, c in zip(*np.nonzero(p["circles"])) if
              abs(int(r) - cy) <= 6 and abs(int(c) - cx) <= 6}
        assert on == ring
    assert p["circles"].sum() == 128
    # Clock: outlines of radius 15 and 14 about (16, 16), bars rows 15-17 x cols 0-6 / 26-31, cols 15-17 x rows
    # 0-6 / 26-31.
    c = p["clock"]
    assert c[16, 1] == c[16, 2] == c[1, 16] == c[2, 16] == 1
    assert c[15:18, 0:7].all() and c[15:18, 26:32].all() and c[0:7, 15:18].all() and c[26:32, 15:18].all()
    assert c[16, 7] == 0 and c[16, 25] == 0 and c[7, 16] == 0 and c[25, 16] == 0 and c[16, 16] == 0
    # Salt and pepper: 25 % of the pixels, the first draw of RandomState(0), the same every time.
    expected = np.zeros(1024, np.float32)
    expected[np.random.RandomState(0).choice(1024, 256, False)] = 1
    np.testing.assert_array_equal(p["random"], expected.reshape(32, 32))


def test_dilation_matches_scipy_and_backgrounds_are_the_same_for_every_image():
    rng = np.random.default_rng(0)
    x = ((rng.random((6, 32, 32, 1)) > 0.97) * rng.random((6, 32, 32, 1))).astype(np.float32)
    ref = np.stack([scipy.ndimage.binary_dilation(im[..., 0] > 0, structure=bg.disk(2)) for im in x])[..., None]
    np.testing.assert_array_equal(bg.dilate(jnp.asarray(x) > 0), ref)
    out = np.asarray(bg.apply_background(jnp.asarray(x), bg.background_pattern("checkerboard")))
    both = ~ref[0] & ~ref[1]
    np.testing.assert_array_equal(out[0][both], out[1][both])
    with pytest.raises(ValueError, match="pattern"):
        bg.apply_background(jnp.asarray(x), np.zeros((28, 28)))
    with pytest.raises(ValueError, match="unknown background"):
        bg.background_pattern("waves")


def test_evaluate_backgrounds_counts_every_set_and_ignores_padding():
    x = np.repeat(hand_digit(), 5, axis=0)
    labels = np.ones(5, np.int32)

    def predict(images):  # class 1 iff the top-left pixel is lit
        on = images[:, 0, 0, 0] > 0.5
        return jnp.stack([~on, on], axis=-1).astype(jnp.float32)

    acc = bg.evaluate_backgrounds(predict, x, labels, batch_size=2)
    expected = {name: float(bg.background_pattern(name)[0, 0]) for name in bg.BACKGROUND_NAMES}
    assert acc == {"clean": 0.0, **expected}
    assert acc["stripes"] == acc["border"] == 1.0 and acc["checkerboard"] == 0.0
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert bg.evaluate_backgrounds(predict, x, labels, batch_size=3, mesh=mesh) == acc
    with pytest.raises(ValueError, match="unknown test set"):
        bg.evaluate_backgrounds(predict, x, labels, names=("clean", "waves"))


def test_contact_sheet(tmp_path):
    x = np.repeat(hand_digit(), 3, axis=0)
    path = bg.background_contact_sheet(x, tmp_path / "sheet" / "bg.png", labels=[1, 2, 3], title="test sets")
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="column labels"):
        bg.background_contact_sheet(x, tmp_path / "x.png", labels=[1])
    grid = bg.image_grid({"x": x, "mask": x > 0}, tmp_path / "grid.png", column_labels=["a", "b", "c"])
    assert grid.is_file()
    with pytest.raises(ValueError, match="same number"):
        bg.image_grid({"x": x, "y": x[:2]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bg.image_grid({"noise": x - 0.5}, tmp_path / "bad.png")


def test_load_mnist_padded(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (4, 28, 28), dtype=np.uint8)
    for stem, arr, magic in (("t10k-images-idx3-ubyte", images, 2051),
                             ("t10k-labels-idx1-ubyte", np.array([0, 3, 9, 1], np.uint8), 2049)):
        header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
        (tmp_path / stem).write_bytes(header + arr.tobytes())
    src = bg.load_mnist_padded(tmp_path, "test")
    item = src[1]
    assert item["image"].shape == (32, 32, 1) and int(item["label"]) == 3
    np.testing.assert_array_equal(item["image"][2:30, 2:30, 0], images[1] / np.float32(255))
    assert item["image"][:2].max() == 0 and item["image"][:, 30:].max() == 0
    # The same source through the spec the configs name.
    spec = get_source("mnist32", "test", data_dir=tmp_path)
    assert spec.name == src.name == "mnist32/test"
    np.testing.assert_array_equal(spec.images, src.images)
    with pytest.raises(ValueError, match="pad"):
        bg.load_mnist_padded(tmp_path, "test", pad=-1)
