"""Tests of saliency_jax.evaluation.infidelity_sensitivity against hand-computed values (a linear model, identity
explanations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.evaluation import infidelity_sensitivity as inf

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.normal(size=(4, 4, 2)), jnp.float32)  # logit_0 = <W, x>, logit_1 = 0
IMAGES = jnp.asarray(RNG.uniform(size=(3, 4, 4, 2)), jnp.float32)


def linear_logits(x):
    score = jnp.sum(x * W, axis=(1, 2, 3))
    return jnp.stack([score, jnp.zeros_like(score)], -1)


def test_infidelity_of_a_linear_model():
    noise = inf.gaussian_perturbations(jax.random.key(0), IMAGES, 5, std=0.1)
    exact = jnp.broadcast_to(W, IMAGES.shape)
    f = jax.jit(lambda a, normalize: inf.infidelity(linear_logits, IMAGES, a, 0, perturbations=noise,
                                                    normalize=normalize), static_argnums=1)
    # f(x) - f(x - I) = <W, I> = I . W: the gradient explains a linear model exactly.
    np.testing.assert_allclose(f(exact, False), 0.0, atol=1e-6)  # float32 rounding of <W, x>
    # Twice the gradient: the error is <W, I>^2, averaged over the samples; normalising finds beta = 1/2.
    dots = np.einsum("sbhwc,hwc->sb", np.asarray(noise, np.float64), np.asarray(W, np.float64))
    np.testing.assert_allclose(f(2 * exact, False), np.mean(dots ** 2, 0), rtol=1e-4)
    np.testing.assert_allclose(f(2 * exact, True), 0.0, atol=1e-6)
    # A map [batch, h, w] counts for every channel.
    maps = jnp.broadcast_to(W[..., 0], IMAGES.shape[:3])
    shared = np.einsum("sbhwc,hw->sb", np.asarray(noise, np.float64), np.asarray(W[..., 0], np.float64))
    np.testing.assert_allclose(f(maps, False), np.mean((shared - dots) ** 2, 0), rtol=1e-4)


def test_sensitivity_max_of_the_identity_explanation():
    shifts = inf.uniform_perturbations(jax.random.key(1), IMAGES, 4, radius=0.05)
    assert shifts.shape == (4, *IMAGES.shape) and float(jnp.max(jnp.abs(shifts))) <= 0.05
    got = jax.jit(lambda x, u: inf.sensitivity_max(lambda z, t: z, x, jnp.zeros(3, jnp.int32), perturbations=u))(
        IMAGES, shifts)
    # Phi(x + u) - Phi(x) = u: the largest ||u|| / ||x|| over the samples.
    u, x = np.asarray(shifts).reshape(4, 3, -1), np.asarray(IMAGES).reshape(3, -1)
    np.testing.assert_allclose(got, np.max(np.linalg.norm(u, axis=-1), 0) / np.linalg.norm(x, axis=-1), rtol=1e-5)
    # A constant explanation never moves; a zero one divides by 1 (Captum).
    constant = inf.sensitivity_max(lambda z, t: jnp.ones_like(z), IMAGES, 0, perturbations=shifts)
    np.testing.assert_allclose(constant, 0.0)
    zero_at_x = inf.sensitivity_max(lambda z, t: z - IMAGES, IMAGES, 0, perturbations=shifts)
    np.testing.assert_allclose(zero_at_x, np.max(np.linalg.norm(u, axis=-1), 0), rtol=1e-5)


def test_errors():
    noise = inf.gaussian_perturbations(jax.random.key(0), IMAGES, 2)
    with pytest.raises(ValueError, match="perturbations must be"):
        inf.infidelity(linear_logits, IMAGES, IMAGES, perturbations=noise[:, :2])
    with pytest.raises(ValueError, match="attributions must have"):
        inf.infidelity(linear_logits, IMAGES, IMAGES[:, :, :, 0:1], perturbations=noise)
    with pytest.raises(ValueError, match="out of range"):
        inf.infidelity(linear_logits, IMAGES, IMAGES, 2, perturbations=noise)
    with pytest.raises(ValueError, match="n_perturb_samples"):
        inf.gaussian_perturbations(jax.random.key(0), IMAGES, 0)
    with pytest.raises(ValueError, match="radius"):
        inf.uniform_perturbations(jax.random.key(0), IMAGES, radius=0.0)
    with pytest.raises(ValueError, match="explanation_fn must return"):
        inf.sensitivity_max(lambda z, t: jnp.sum(z), IMAGES, 0, perturbations=noise)
