"""Occlusion semantics of distraction training (Morales et al. 2021, Algorithm 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.saliency import grad_cam, split_layer
from saliency_jax.training import DistractionConfig, distract, occlude


def _images(batch=4, size=6, channels=3, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, channels), minval=0.2, maxval=0.8)


def test_threshold_is_strict_and_all_channels_filled():
    images = _images(1, 2, 3)
    saliency = jnp.array([[[0.85, 0.86], [1.0, 0.1]]])
    out = np.asarray(occlude(images, saliency, 0.85, "zero"))
    expected = np.asarray(images).copy()
    expected[0, 0, 1, :] = 0.0
    expected[0, 1, 0, :] = 0.0
    np.testing.assert_array_equal(out, expected)


def test_fill_modes():
    images = _images()
    saliency = jax.random.uniform(jax.random.key(1), images.shape[:3])
    sel = np.asarray(saliency > 0.5)
    one = np.asarray(occlude(images, saliency, 0.5, "one"))
    assert np.all(one[sel] == 1.0) and np.array_equal(one[~sel], np.asarray(images)[~sel])
    rand = np.asarray(occlude(images, saliency, 0.5, "random", key=jax.random.key(2), data_range=(0.0, 1.0)))
    filled = rand[sel]
    assert np.all((filled >= 0) & (filled < 1))
    assert np.std(filled) > 0.2  # uniform on [0, 1] has std 0.29; images here lie in [0.2, 0.8]
    np.testing.assert_array_equal(rand[~sel], np.asarray(images)[~sel])
    again = np.asarray(occlude(images, saliency, 0.5, "random", key=jax.random.key(2)))
    np.testing.assert_array_equal(rand, again)
    with pytest.raises(ValueError, match="key"):
        occlude(images, saliency, 0.5, "random")
    with pytest.raises(ValueError, match="fill"):
        occlude(images, saliency, 0.5, "blur")
    with pytest.raises(ValueError, match="saliency"):
        occlude(images, saliency[:, :3], 0.5, "zero")


def _model():
    w = jnp.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.3]])
    return split_layer(lambda x: x * 2.0, lambda a: jnp.mean(a, axis=(1, 2)) @ w)


def test_p1_occludes_with_ground_truth_grad_cam_and_p0_is_identity():
    images, labels = _images(), jnp.array([0, 1, 0, 1])
    cfg = DistractionConfig(probability=1.0, threshold=0.5, fill="zero", score="logit", weighting="plain")
    out, occluded = distract(jax.random.key(0), _model(), images, labels, cfg)
    maps = grad_cam(_model(), images, labels, score="logit", weighting="plain")
    np.testing.assert_array_equal(out, occlude(images, maps, 0.5, "zero"))
    assert bool(occluded.all())
    assert np.any(np.asarray(out) != np.asarray(images))
    out0, occluded0 = distract(jax.random.key(0), _model(), images, labels,
                               DistractionConfig(probability=0.0, threshold=0.5))
    np.testing.assert_array_equal(out0, images)
    assert not bool(occluded0.any())


@pytest.mark.parametrize("per_example", [False, True])
def test_probability_honoured_over_many_steps(per_example):
    images, labels = _images(8), jnp.arange(8) % 2
    cfg = DistractionConfig(probability=0.25, threshold=0.5, per_example=per_example)
    step = jax.jit(lambda k: distract(k, _model(), images, labels, cfg)[1])
    n = 400
    flags = np.stack([np.asarray(step(jax.random.fold_in(jax.random.key(7), i))) for i in range(n)])
    rate = flags.mean()
    sd = np.sqrt(0.25 * 0.75 / (n * (8 if per_example else 1)))
    assert abs(rate - 0.25) < 4 * sd, rate
    if per_example:
        # Some steps occlude only part of the batch.
        assert np.any((flags.sum(1) > 0) & (flags.sum(1) < 8))
    else:
        assert np.all((flags.sum(1) == 0) | (flags.sum(1) == 8))


def test_deterministic_for_a_key_and_jittable():
    images, labels = _images(), jnp.array([0, 1, 0, 1])
    cfg = DistractionConfig(probability=1.0, fill="random")
    f = jax.jit(lambda k: distract(k, _model(), images, labels, cfg)[0])
    np.testing.assert_array_equal(f(jax.random.key(3)), f(jax.random.key(3)))
    assert not np.array_equal(f(jax.random.key(3)), f(jax.random.key(4)))


def test_config_validation():
    with pytest.raises(ValueError, match="probability"):
        DistractionConfig(probability=1.5)
    with pytest.raises(ValueError, match="fill"):
        DistractionConfig(fill="two")
    with pytest.raises(ValueError, match="labels"):
        distract(jax.random.key(0), _model(), _images(), jnp.array([0, 1]), DistractionConfig())
