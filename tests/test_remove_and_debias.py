"""Tests of saliency_jax.evaluation.remove_and_debias (ROAD) against hand-computed values and a dense NumPy solve of
the imputation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.evaluation import remove_and_debias as rd


def dense_imputation(image, removed):
    """The authors' system written out densely: for each removed p, sum_q w_pq (x_p - x_q) = 0 over neighbours q
    inside the image; kept neighbours are known. Solved with np.linalg.solve in float64."""
    h, w, c = image.shape
    unknown = [(i, j) for i in range(h) for j in range(w) if removed[i, j]]
    index = {p: k for k, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), c))
    for k, (i, j) in enumerate(unknown):
        for (di, dj), weight in rd.NEIGHBOR_WEIGHTS:
            q = (i + di, j + dj)
            if not (0 <= q[0] < h and 0 <= q[1] < w):
                continue
            a[k, k] += weight
            if q in index:
                a[k, index[q]] -= weight
            else:
                b[k] += weight * image[q]
    out = image.astype(np.float64).copy()
    if unknown:
        solution = np.linalg.solve(a, b)
        for k, p in enumerate(unknown):
            out[p] = solution[k]
    return out


def test_imputation_hand_computed():
    image = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    centre = np.zeros((1, 3, 3), bool)
    centre[0, 1, 1] = True
    got = rd.noisy_linear_imputation(jnp.asarray(image), centre, noise=0.0)
    # direct neighbours 1, 3, 5, 7 (weight 1/6), diagonals 0, 2, 6, 8 (1/12): 16/6 + 16/12 = 4.
    np.testing.assert_allclose(got[0, 1, 1, 0], 4.0, atol=1e-5)
    corner = np.zeros((1, 3, 3), bool)
    corner[0, 0, 0] = True
    got = rd.noisy_linear_imputation(jnp.asarray(image), corner, noise=0.0)
    # neighbours inside the image: 1 and 3 (1/6 each), 4 (1/12); weights renormalised by 5/12.
    np.testing.assert_allclose(got[0, 0, 0, 0], (1 / 6 + 3 / 6 + 4 / 12) / (5 / 12), atol=1e-5)
    np.testing.assert_array_equal(np.delete(np.asarray(got).ravel(), 0), np.delete(image.ravel(), 0))


def test_imputation_equals_dense_solve_and_noise_only_on_removed_pixels():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(3, 7, 6, 2)).astype(np.float32)
    removed = rng.uniform(size=(3, 7, 6)) < np.array([0.2, 0.6, 0.95])[:, None, None]
    removed[2, 0, 0] = False  # keep at least one pixel
    removed[0] = False  # nothing removed: unchanged
    got = jax.jit(functools.partial(rd.noisy_linear_imputation, noise=0.0))(images, removed)
    want = np.stack([dense_imputation(x, r) for x, r in zip(images, removed)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got[0], images[0])
    noisy = rd.noisy_linear_imputation(images, removed, key=jax.random.key(1), noise=0.5)
    diff = np.asarray(noisy) - np.asarray(got)
    np.testing.assert_allclose(diff[~removed], 0.0, atol=1e-5)
    assert 0.35 < diff[removed].std() < 0.65 and abs(diff[removed].mean()) < 0.15
    with pytest.raises(ValueError, match="needs a key"):
        rd.noisy_linear_imputation(images, removed)  # the authors' noise 0.01 is random
    with pytest.raises(ValueError, match="removed must be"):
        rd.noisy_linear_imputation(images, removed[:, :3])


def _linear_model():
    head = jnp.asarray(np.random.default_rng(2).normal(size=(8 * 8 * 3, 4)), jnp.float32)
    return lambda x: x.reshape(x.shape[0], -1) @ head


def test_road_curves_are_the_model_on_imputed_images():
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
    maps = jnp.asarray(rng.permutation(128).reshape(2, 8, 8), jnp.float32)
    logits_fn = _linear_model()
    fractions = (0.25, 0.5)
    result = jax.jit(functools.partial(rd.road, logits_fn, key=None, fractions=fractions, noise=0.0,
                                       tie_break=0.0))(images, maps)
    rank = np.argsort(np.argsort(-np.asarray(maps).reshape(2, -1), axis=-1), axis=-1).reshape(2, 8, 8)
    targets = np.argmax(logits_fn(images), -1)
    np.testing.assert_array_equal(result.targets, targets)

    def prob(x):
        return np.asarray(jax.nn.softmax(logits_fn(x)))[np.arange(2), targets]

    for column, (removed, kept) in enumerate(((16, 48), (32, 32))):  # floor(f * 64), floor((1 - f) * 64)
        morf = rd.noisy_linear_imputation(images, jnp.asarray(rank < removed), noise=0.0)
        lerf = rd.noisy_linear_imputation(images, jnp.asarray(rank >= kept), noise=0.0)
        np.testing.assert_allclose(result.morf[:, column], prob(morf), atol=1e-5)
        np.testing.assert_allclose(result.lerf[:, column], prob(lerf), atol=1e-5)
    np.testing.assert_allclose(result.original, prob(images), atol=1e-6)
    np.testing.assert_allclose(result.morf_average, np.mean(result.morf - result.original[:, None], -1), atol=1e-6)
    np.testing.assert_allclose(result.combined, (result.lerf_average - result.morf_average) / 2, atol=1e-6)
    assert result.morf_predictions.shape == (2, 2) and result.lerf_predictions.dtype == jnp.int32


def test_road_random_parts_follow_the_key():
    images = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 8, 8, 3)), jnp.float32)
    maps = jnp.zeros((2, 8, 8))  # all tied: the tie-break field decides the order
    f = jax.jit(functools.partial(rd.road, _linear_model(), fractions=(0.5,)))
    a, b, c = f(images, maps, key=jax.random.key(0)), f(images, maps, key=jax.random.key(0)), \
        f(images, maps, key=jax.random.key(1))
    np.testing.assert_array_equal(a.morf, b.morf)
    assert not np.allclose(a.morf, c.morf)


def test_road_errors():
    images = jnp.zeros((1, 4, 4, 1))
    maps = jnp.zeros((1, 4, 4))
    logits_fn = lambda x: x.reshape(x.shape[0], -1)[:, :2]  # noqa: E731
    with pytest.raises(ValueError, match="needs a key"):
        rd.road(logits_fn, images, maps, key=None)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        rd.road(logits_fn, images, maps, key=jax.random.key(0), fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="no pixel"):
        rd.road(logits_fn, images, maps, key=jax.random.key(0), fractions=(0.97,))
    with pytest.raises(ValueError, match="non-empty"):
        rd.road(logits_fn, images, maps, key=jax.random.key(0), fractions=())
    with pytest.raises(ValueError, match="maps must be"):
        rd.road(logits_fn, images, maps[:, 0], key=jax.random.key(0))
