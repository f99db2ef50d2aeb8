"""Saliency transforms on bad input (issue 13): concrete inputs raise, traced ones give NaN maps, checked mode raises.

Every transform that takes target classes or images is run on a tiny SmallCNN (BatchNorm in inference mode) with
(a) a target >= num_classes, (b) a negative target (no wrap-around to the last class) and (c) a NaN / inf pixel:
outside ``jit`` each raises ``ValueError`` naming the examples; inside ``jit`` the bad examples' maps are all NaN
and the good examples' maps equal the maps computed for the good examples alone.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax import models
from saliency_jax.saliency import (
    checked,
    clip_prior,
    contrastive_excitation_backprop,
    excitation_backprop,
    grad_cam,
    grad_cam_plus_plus,
    gradient_x_input,
    guided_backprop,
    linen_class_activation_map,
    linen_layer,
    marginal_winning_probability,
    resolve_targets,
    rise,
    vanilla_gradient,
)
from saliency_jax.saliency.core import check_images, normalize_maps

NUM_CLASSES = 3


@functools.lru_cache(maxsize=None)
def _model():
    module = models.get_model("small_cnn", NUM_CLASSES, widths=(2, 3, 4))
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    return module, variables


def _images(n=4):
    return jax.random.uniform(jax.random.key(1), (n, 8, 8, 1))


def _transforms():
    """name -> fn(images, targets) -> maps [batch, ...] for every transform taking targets."""
    module, variables = _model()
    split = linen_layer(module, variables, "conv3", train=False)

    def logits_fn(x):
        return module.apply(variables, x, train=False)

    return {
        "grad_cam": lambda x, t: grad_cam(split, x, t),
        "grad_cam_guided": lambda x, t: grad_cam(split, x, t, weighting="guided", score="softmax"),
        "grad_cam_plus_plus": lambda x, t: grad_cam_plus_plus(split, x, t),
        "excitation_backprop": lambda x, t: excitation_backprop(split, x, t, normalize=True).saliency,
        "marginal_winning_probability": lambda x, t: marginal_winning_probability(split, x, t),
        "contrastive_excitation_backprop": lambda x, t: contrastive_excitation_backprop(split, x, t).saliency,
        "vanilla_gradient": lambda x, t: vanilla_gradient(logits_fn, x, t),
        "gradient_x_input": lambda x, t: gradient_x_input(logits_fn, x, t),
        "guided_backprop": lambda x, t: guided_backprop(logits_fn, x, t),
        "rise": lambda x, t: rise(logits_fn, jax.random.key(2), x, t, num_masks=4, grid_size=2),
        "cam": lambda x, t: linen_class_activation_map(module, variables, x, t, features_layer="conv3",
                                                       classifier="fc", train=False),
    }


TRANSFORMS = sorted(_transforms())


@pytest.mark.parametrize("name", TRANSFORMS)
def test_concrete_bad_input_raises(name):
    fn = _transforms()[name]
    for bad in (NUM_CLASSES, -1):
        with pytest.raises(ValueError, match=rf"\[0, {NUM_CLASSES}\).*\[{bad}\] at examples \[2\]"):
            fn(_images(), jnp.array([0, 1, bad, 2]))
        with pytest.raises(ValueError, match="out of range"):
            fn(_images(), bad)  # a Python int for every example
    for value in (np.nan, np.inf):
        images = np.asarray(_images()).copy()
        images[1, 3, 4, 0] = value
        with pytest.raises(ValueError, match=r"NaN or inf pixels \(examples \[1\]"):
            fn(jnp.asarray(images), jnp.array([0, 1, 2, 0]))
        with pytest.raises(ValueError, match=r"NaN or inf pixels \(examples \[1\]"):
            fn(images, None)  # NumPy input, predicted class


@pytest.mark.parametrize("name", TRANSFORMS)
def test_traced_bad_input_gives_nan_maps(name):
    """Under jit: examples 1 (NaN pixel), 2 (inf pixel), 3 (target = num_classes) and 4 (target -1) get all-NaN
    maps; examples 0 and 5 get the maps they get when every example is good (examples do not interact)."""
    fn = jax.jit(_transforms()[name])
    images = np.asarray(_images(6)).copy()
    good_targets = jnp.array([0, 1, 2, 1, 0, 2])
    reference = np.asarray(fn(jnp.asarray(images), good_targets))
    assert np.all(np.isfinite(reference))
    images[1, 0, 0, 0] = np.nan
    images[2, 5, 5, 0] = np.inf
    maps = np.asarray(fn(jnp.asarray(images), jnp.array([0, 1, 2, NUM_CLASSES, -1, 2])))
    for row in (1, 2, 3, 4):
        assert np.all(np.isnan(maps[row])), f"example {row} should be all NaN"
    np.testing.assert_allclose(maps[[0, 5]], reference[[0, 5]], rtol=1e-5, atol=1e-6)


def test_checked_mode_raises_inside_jit():
    fn = _transforms()["grad_cam"]
    safe = checked(fn)
    good = safe(_images(), jnp.array([0, 1, 2, 0]))
    assert good.shape == (4, 8, 8) and np.all(np.isfinite(good))
    with pytest.raises(ValueError, match=r"target classes must lie in \[0, 3\)"):
        safe(_images(), jnp.array([0, 1, 5, 0]))
    with pytest.raises(ValueError, match=r"target classes must lie in \[0, 3\)"):
        safe(_images(), jnp.array([0, -1, 2, 0]))
    images = np.asarray(_images()).copy()
    images[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        safe(jnp.asarray(images), jnp.array([0, 1, 2, 0]))
    # The checks inside a user's own jitted function: checkify it there.
    from jax.experimental import checkify
    err, _ = jax.jit(checkify.checkify(fn, errors=checkify.user_checks))(_images(), jnp.array([0, 9, 2, 0]))
    assert "target classes" in str(err.get())


def test_resolve_targets_never_wraps_negative_targets():
    logits = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=r"\[-1\] at examples \[1\]"):
        resolve_targets(np.array([0, -1]), logits)
    with pytest.raises(ValueError, match="out of range"):
        resolve_targets(-1, logits)
    np.testing.assert_array_equal(resolve_targets(np.array([3, 0]), logits), [3, 0])


def test_check_images_names_the_bad_examples():
    images = np.zeros((12, 2, 2, 1), np.float32)
    images[[3, 11]] = np.inf
    with pytest.raises(ValueError, match=r"examples \[3, 11\] of 12"):
        check_images(images)
    check_images(jnp.zeros((2, 2, 2, 1)))  # fine


def test_normalize_maps_keeps_nan_maps_nan():
    maps = jnp.array([[[0.0, 1.0]], [[np.nan, 1.0]], [[2.0, 2.0]]])
    out = np.asarray(normalize_maps(maps))
    np.testing.assert_array_equal(out[0], [[0.0, 1.0]])
    assert np.all(np.isnan(out[1]))  # was all zeros: looked like a constant map
    np.testing.assert_array_equal(out[2], [[0.0, 0.0]])


def test_clip_prior_bad_targets():
    logits = jnp.zeros((3, 2, 4))
    with pytest.raises(ValueError, match=r"\[4\] at examples \[1\]"):
        clip_prior(logits, jnp.array([0, 4, 1]))
    prior = jax.jit(clip_prior)(logits, jnp.array([0, 4, -1]))
    assert np.all(np.isfinite(prior[0])) and np.all(np.isnan(prior[1:]))
