"""Tests of saliency_jax.evaluation.faithfulness against hand-computed values and SciPy references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import sklearn.metrics

from saliency_jax.evaluation import faithfulness as fa
from saliency_jax.models.small_cnn import SmallCNN
from saliency_jax.saliency import vanilla_gradient

LN3 = math.log(3.0)
# A linear two-class model on 2 x 2 grey images: logit_0 = <W, x>, logit_1 = 0, so p_0 = sigmoid(<W, x>).
# Pixel weights in row-major order: ln 3, ln 3, -ln 3, -ln 3.
_W = jnp.array([[LN3, LN3], [-LN3, -LN3]], jnp.float32)


def _linear_logits(images):
    score = jnp.sum(images[..., 0] * _W, axis=(1, 2))
    return jnp.stack([score, jnp.zeros_like(score)], axis=-1)


def _ones_and_maps():
    images = jnp.ones((2, 2, 2, 1), jnp.float32)
    maps = jnp.array([[[4.0, 3.0], [2.0, 1.0]],   # order: pixel 0, 1, 2, 3 (row-major)
                      [[1.0, 2.0], [3.0, 4.0]]])  # order: pixel 3, 2, 1, 0
    return images, maps


def test_auc_trapezoid():
    np.testing.assert_allclose(fa.auc(jnp.ones(5)), 1.0)
    np.testing.assert_allclose(fa.auc(jnp.array([0.0, 1.0])), 0.5)
    np.testing.assert_allclose(fa.auc(jnp.array([[0.5, 0.25, 0.1, 0.25, 0.5]])), [1.1 / 4])
    # scikit-learn's trapezoid area on the evenly spaced x of the curve (float32 vs float64: 1e-6).
    curves = np.random.default_rng(0).uniform(size=(6, 9)).astype(np.float32)
    np.testing.assert_allclose(fa.auc(curves), [sklearn.metrics.auc(np.linspace(0, 1, 9), c) for c in curves],
                               atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        fa.auc(jnp.ones(1))


def test_deletion_hand_computed():
    images, maps = _ones_and_maps()
    # Example 0 deletes ln3, ln3, -ln3, -ln3: <W, x> = 0, -ln3, -2 ln3, -ln3, 0 -> p_0 = 1/2, 1/4, 1/10, 1/4, 1/2.
    # Example 1 deletes them in reverse: <W, x> = 0, ln3, 2 ln3, ln3, 0 -> 1/2, 3/4, 9/10, 3/4, 1/2.
    result = jax.jit(functools.partial(fa.deletion, _linear_logits, pixels_per_step=1))(images, maps)
    np.testing.assert_allclose(result.curve, [[0.5, 0.25, 0.1, 0.25, 0.5], [0.5, 0.75, 0.9, 0.75, 0.5]], atol=1e-6)
    # AUC = (sum - first / 2 - last / 2) / 4.
    np.testing.assert_allclose(result.auc, [(1.6 - 0.5) / 4, (3.4 - 0.5) / 4], atol=1e-6)
    np.testing.assert_array_equal(result.targets, [0, 0])  # logits (0, 0): argmax is class 0
    # Default step = the image width (2 pixels): 1/2, 1/10, 1/2 and 1/2, 9/10, 1/2.
    coarse = fa.deletion(_linear_logits, images, maps)
    np.testing.assert_allclose(coarse.curve, [[0.5, 0.1, 0.5], [0.5, 0.9, 0.5]], atol=1e-6)
    np.testing.assert_allclose(coarse.auc, [0.3, 0.7], atol=1e-6)
    # Tracking class 1 gives 1 - p_0; chunking the steps does not change anything; 3 pixels per step: 2 steps.
    other = fa.deletion(_linear_logits, images, maps, 1, pixels_per_step=1, steps_per_call=3)
    np.testing.assert_allclose(other.curve, 1.0 - result.curve, atol=1e-6)
    three = fa.deletion(_linear_logits, images, maps, pixels_per_step=3)
    np.testing.assert_allclose(three.curve, [[0.5, 0.25, 0.5], [0.5, 0.75, 0.5]], atol=1e-6)


def test_deletion_ties_row_major_and_map_resized():
    images, maps = _ones_and_maps()
    flat = fa.deletion(_linear_logits, images, jnp.zeros((2, 2, 2)), pixels_per_step=1)
    np.testing.assert_allclose(flat.curve[0], [0.5, 0.25, 0.1, 0.25, 0.5], atol=1e-6)
    # A 1 x 2 map (left column hot) resized to 2 x 2 orders the left column first: pixels 0, 2 (tie, row-major), 1, 3.
    low = fa.deletion(_linear_logits, images, jnp.array([[[1.0, 0.0]]] * 2), pixels_per_step=1)
    np.testing.assert_allclose(low.curve[0], [0.5, 0.25, 0.5, 0.25, 0.5], atol=1e-6)


def test_insertion_hand_computed_constant_and_blur():
    images, maps = _ones_and_maps()
    # Constant canvas 0: <W, x> = 0, ln3, 2 ln3, ln3, 0 for example 0.
    result = fa.insertion(_linear_logits, images, maps, substrate=0.0, pixels_per_step=1)
    np.testing.assert_allclose(result.curve, [[0.5, 0.75, 0.9, 0.75, 0.5], [0.5, 0.25, 0.1, 0.25, 0.5]], atol=1e-6)
    np.testing.assert_allclose(result.auc, [2.9 / 4, 1.1 / 4], atol=1e-6)
    # Default canvas: the blurred image; the curve starts at the model on the blurred image, ends on the image.
    rng = np.random.default_rng(0)
    colour = jnp.asarray(rng.uniform(size=(3, 6, 5, 3)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(6 * 5 * 3, 4)), jnp.float32)
    logits_fn = lambda x: x.reshape(x.shape[0], -1) @ head  # noqa: E731
    out = fa.insertion(logits_fn, colour, jnp.asarray(rng.uniform(size=(3, 6, 5)), jnp.float32))
    probs = lambda x: jax.nn.softmax(logits_fn(x))[jnp.arange(3), out.targets]  # noqa: E731
    np.testing.assert_array_equal(out.targets, jnp.argmax(logits_fn(colour), -1))
    assert out.curve.shape == (3, 7)  # 30 pixels, 5 per step
    np.testing.assert_allclose(out.curve[:, 0], probs(fa.gaussian_blur(colour)), rtol=1e-5)
    np.testing.assert_allclose(out.curve[:, -1], probs(colour), rtol=1e-5)
    # Deletion with a per-channel colour: the last step is the constant image.
    fill = jnp.array([0.2, 0.4, 0.6])
    gone = fa.deletion(logits_fn, colour, jnp.zeros((3, 6, 5)), substrate=fill)
    np.testing.assert_allclose(gone.curve[:, -1], probs(jnp.broadcast_to(fill, colour.shape)), rtol=1e-5)


def test_gaussian_blur_matches_rise_code_reference():
    # RISE's gkern (impulse smoothed by scipy's gaussian_filter) and conv2d with zero padding klen // 2.
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(2, 13, 9, 2)).astype(np.float32)
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1.0
    kernel = scipy.ndimage.gaussian_filter(impulse, 5.0)
    expected = np.stack([np.stack([scipy.ndimage.correlate(images[b, :, :, c], kernel, mode="constant")
                                   for c in range(2)], -1) for b in range(2)])
    np.testing.assert_allclose(fa.gaussian_blur(jnp.asarray(images)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        fa.gaussian_blur(jnp.asarray(images), kernel_size=4)


def test_causal_metric_errors():
    images, maps = _ones_and_maps()
    with pytest.raises(ValueError, match="maps must be"):
        fa.deletion(_linear_logits, images, maps[:1])
    with pytest.raises(ValueError, match="substrate"):
        fa.insertion(_linear_logits, images, maps, substrate="noise")
    with pytest.raises(ValueError, match="broadcast"):
        fa.deletion(_linear_logits, images, maps, substrate=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="pixels_per_step"):
        fa.deletion(_linear_logits, images, maps, pixels_per_step=0)
    with pytest.raises(ValueError, match="mode"):
        fa.causal_metric(_linear_logits, images, maps, mode="both", substrate=0.0)
    with pytest.raises(ValueError, match="out of range"):
        fa.deletion(_linear_logits, images, maps, 5)
    with pytest.raises(ValueError, match="logits_fn must return"):
        fa.deletion(lambda x: x[:, 0, 0, 0], images, maps)


def test_spearman_against_scipy_with_ties():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(5, 6, 7)).astype(np.float32)  # many ties
    b = (a + rng.integers(0, 3, size=a.shape)).astype(np.float32)
    expected = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(5)]
    np.testing.assert_allclose(fa.spearman_correlation(a, b), expected, atol=1e-5)
    np.testing.assert_allclose(fa.spearman_correlation(a, a), np.ones(5), atol=1e-6)
    np.testing.assert_allclose(fa.spearman_correlation(a, -a), -np.ones(5), atol=1e-6)
    constant = fa.spearman_correlation(np.zeros((1, 4, 4)), a[:1, :4, :4])
    assert np.isnan(constant[0])
    with pytest.raises(ValueError, match="one shape"):
        fa.spearman_correlation(a, b[:, :3])


def _ssim_reference(x, y, win=7, data_range=1.0):
    """scikit-image's structural_similarity (defaults), written out with scipy's uniform_filter."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    ux, uy = scipy.ndimage.uniform_filter(x, win), scipy.ndimage.uniform_filter(y, win)
    uxx, uyy = scipy.ndimage.uniform_filter(x * x, win), scipy.ndimage.uniform_filter(y * y, win)
    uxy = scipy.ndimage.uniform_filter(x * y, win)
    norm = win * win / (win * win - 1)
    vx, vy, vxy = norm * (uxx - ux * ux), norm * (uyy - uy * uy), norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return s[pad:-pad, pad:-pad].mean()


def test_ssim_against_reference():
    rng = np.random.default_rng(3)
    a = rng.uniform(size=(3, 12, 9)).astype(np.float32)
    b = np.clip(a + 0.2 * rng.normal(size=a.shape), 0, 1).astype(np.float32)
    np.testing.assert_allclose(fa.ssim(a, b), [_ssim_reference(a[i], b[i]) for i in range(3)], atol=1e-5)
    np.testing.assert_allclose(fa.ssim(a, a), np.ones(3), atol=1e-5)
    np.testing.assert_allclose(fa.ssim(a, b, window_size=3), [_ssim_reference(a[i], b[i], 3) for i in range(3)],
                               atol=1e-5)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        fa.ssim(a[:, :5, :5], b[:, :5, :5])


def _toy_params(scale):
    return {"a": {"w": scale * jnp.arange(1.0, 65.0).reshape(8, 8)}, "b": {"v": jnp.array(1.0)}}


def _toy_map_fn(params, images, targets):
    del targets
    return jnp.broadcast_to(params["a"]["w"] * params["b"]["v"], (images.shape[0], 8, 8))


def test_model_randomization_hand_computed():
    images = jnp.zeros((2, 8, 8, 1))
    params = _toy_params(1.0)
    # Re-initialised: w reversed (65 - w), v = -1. Layers top first: "b" then "a".
    random_params = {"a": {"w": jnp.flip(params["a"]["w"])}, "b": {"v": jnp.array(-1.0)}}
    result = jax.jit(lambda p, r, x: fa.model_randomization(_toy_map_fn, p, r, ["b", "a"], x))(
        params, random_params, images)
    # Step 1: map -w: ranks reversed (rho = -1), |map| = w (rho_abs = 1, SSIM 1).
    # Step 2: map -(65 - w) = w - 65: same order as w (rho = 1); |map| = 65 - w reversed (rho_abs = -1).
    np.testing.assert_allclose(result.spearman, [[-1, -1], [1, 1]], atol=1e-6)
    np.testing.assert_allclose(result.spearman_abs, [[1, 1], [-1, -1]], atol=1e-6)
    w = np.arange(1.0, 65.0).reshape(8, 8)
    np.testing.assert_allclose(result.ssim[0], [1, 1], atol=1e-5)
    np.testing.assert_allclose(result.ssim[1], [_ssim_reference(w / 64, (65 - w) / 64)] * 2, atol=1e-5)
    np.testing.assert_allclose(result.maps[0, 0], w)
    np.testing.assert_allclose(result.maps[2, 1], w - 65)
    # Re-initialising with the same values leaves every map unchanged.
    same = fa.model_randomization(_toy_map_fn, params, params, ["b", "a"], images)
    np.testing.assert_allclose(same.spearman, np.ones((2, 2)), atol=1e-6)


def test_model_randomization_errors():
    images = jnp.zeros((1, 8, 8, 1))
    params = _toy_params(1.0)
    with pytest.raises(ValueError, match="layer 'c' matches no parameter"):
        fa.model_randomization(_toy_map_fn, params, params, ["c"], images)
    with pytest.raises(ValueError, match="variables\\['params'\\]"):
        fa.model_randomization(_toy_map_fn, {"params": params}, {"params": params}, ["a"], images)
    with pytest.raises(ValueError, match="structure"):
        fa.model_randomization(_toy_map_fn, params, {"a": params["a"]}, ["a"], images)
    with pytest.raises(ValueError, match="shape"):
        fa.model_randomization(_toy_map_fn, params, {"a": {"w": jnp.ones((2, 2))}, "b": params["b"]}, ["a"], images)
    with pytest.raises(ValueError, match="non-empty"):
        fa.model_randomization(_toy_map_fn, params, params, [], images)
    with pytest.raises(ValueError, match="map_fn must return"):
        fa.model_randomization(lambda p, x, t: p["a"]["w"], params, params, ["a"], images)


def test_model_randomization_correlation_drops_for_gradient_on_small_cnn():
    model = SmallCNN(num_classes=4, widths=(4, 8, 8), use_batchnorm=False)
    images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    init = jax.jit(model.init)
    params = init(jax.random.key(1), images)["params"]
    random_params = init(jax.random.key(2), images)["params"]
    targets = jnp.argmax(model.apply({"params": params}, images), -1)

    def map_fn(p, x, t):
        return vanilla_gradient(functools.partial(model.apply, {"params": p}), x, t)

    result = jax.jit(lambda p, r: fa.model_randomization(map_fn, p, r, ["fc", "conv3", "conv2", "conv1"], images,
                                                         targets))(params, random_params)
    assert result.spearman_abs.shape == (4, 4) and result.maps.shape == (5, 4, 8, 8)
    assert np.all(np.isfinite(result.spearman_abs)) and np.all(np.isfinite(result.ssim))
    # Every layer re-initialised: the maps no longer follow the original ones.
    assert float(jnp.mean(result.spearman_abs[-1])) < 0.5
    # The maps of the model as given correlate perfectly with themselves (step 0 is the reference).
    np.testing.assert_allclose(fa.spearman_correlation(result.maps[0], map_fn(params, images, targets)), 1.0,
                               atol=1e-6)


def test_relevance_mass_accuracy_hand_computed():
    maps = jnp.array([[[1.0, -2.0], [3.0, 0.0]],
                      [[1.0, -2.0], [3.0, 0.0]],
                      [[-1.0, -1.0], [-1.0, -1.0]]])
    masks = jnp.array([[[1, 0], [0, 0]],
                       [[1, 1], [0, 0]],   # the negative value inside neither adds nor cancels
                       [[1, 1], [1, 1]]], bool)
    out = fa.relevance_mass_accuracy(maps, masks)
    np.testing.assert_allclose(out[:2], [0.25, 0.25])  # positive mass 4, inside 1
    assert np.isnan(out[2])  # no positive mass
    # A 1 x 1 map is constant after resizing: the mass fraction is the region's area fraction.
    np.testing.assert_allclose(fa.relevance_mass_accuracy(jnp.full((1, 1, 1), 2.0), masks[1:2]), [0.5])
    with pytest.raises(ValueError, match="batch"):
        fa.relevance_mass_accuracy(maps[:2], masks)
