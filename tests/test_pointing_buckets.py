"""Size buckets of the pointing game (saliency_jax.evaluators.pointing_game, ``size_bucket``): images of many sizes
padded to a few buckets give exactly the hits of the unpadded computation, and the padded steps compile once per
bucket instead of once per image size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax import models
from saliency_jax.evaluators import pointing_game as pge
from saliency_jax.saliency import resize_maps

CLASSES = ("a", "b", "c")


class _Data:
    """A tiny localisation data set: images of several sizes, boxes of the 3 classes."""

    num_classes = len(CLASSES)
    class_names = CLASSES

    def __init__(self, sizes, seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for i, (h, w) in enumerate(sizes):
            masks = np.zeros((3, h, w), bool)
            present = rng.permutation(3)[:rng.integers(1, 4)]
            for c in present:
                r0, c0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
                masks[c, r0:r0 + rng.integers(2, h // 2), c0:c0 + rng.integers(2, w // 2)] = True
            self.items.append({"image": rng.random((h, w, 3)).astype(np.float32), "image_id": f"{i:06d}",
                               "class_ids": np.sort(present).astype(np.int32), "class_masks": masks})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# Eight image sizes, three aspect ratios: three network input shapes at input_size 24 (the network compiles per input
# shape in both modes), eight image sizes for the resizes and the hit test.
SIZES = [(30, 40), (33, 44), (36, 48), (39, 52), (40, 30), (44, 33), (29, 29), (45, 45)]


@pytest.fixture(scope="module")
def tiny_model():
    module = models.get_model("small_cnn", 3, widths=(4, 6, 8))
    variables = module.init(jax.random.key(3), jnp.zeros((1, 24, 24, 3)), train=False)
    return module, variables


def _settings(bucket, methods=("center", "grad_cam", "contrastive_excitation_backprop")):
    return pge.PointingGameSettings(
        input_size=24, class_batch=2, size_bucket=bucket, tolerance=3.0, methods=methods,
        layers={"grad_cam": "conv3", "excitation_backprop": "conv2", "contrastive_excitation_backprop": "conv2",
                "contrast": "conv3"})


def test_bucketed_results_equal_unbucketed(tiny_model):
    module, variables = tiny_model
    data = _Data(SIZES)
    plain = pge.run_pointing_game(module, variables, data, _settings(0))
    assert sum(plain["grad_cam"]["hits"].values()) > 0  # not trivially all misses
    assert pge.run_pointing_game(module, variables, data, _settings(32)) == plain


def test_padded_steps_compile_once_per_bucket(tiny_model):
    module, variables = tiny_model
    data = _Data(SIZES, seed=1)
    before = pge._score_padded._cache_size(), pge._resize_image_padded._cache_size()
    pge.run_pointing_game(module, variables, data, _settings(96, methods=("grad_cam",)))
    # 8 image sizes in one 96 x 96 bucket, 3 network input shapes (so 3 map shapes): 3 programs each, not 8.
    assert pge._score_padded._cache_size() - before[0] == 3
    assert pge._resize_image_padded._cache_size() - before[1] == 3


def test_padded_resize_and_score_match_jax_image_resize():
    rng = np.random.default_rng(0)
    for h_img, w_img, h, w in [(37, 53, 5, 7), (64, 30, 8, 4), (20, 20, 20, 20), (129, 70, 9, 5)]:
        maps = rng.normal(size=(2, h, w)).astype(np.float32)
        masks = rng.random((2, h_img, w_img)) > 0.95
        grid = (pge.bucket_size(h_img, 32), pge.bucket_size(w_img, 32))
        padded = np.zeros((2, *grid), bool)
        padded[:, :h_img, :w_img] = masks
        scales = np.array([pge._inv_scale(h, h_img), pge._inv_scale(w, w_img)])
        wy = pge._bilinear_weights(h, grid[0], scales[0], jnp.int32(h))
        wx = pge._bilinear_weights(w, grid[1], scales[1], jnp.int32(w))
        ours = np.asarray(pge._resize_hw(jnp.asarray(maps), wy, wx))
        ref = np.asarray(resize_maps(jnp.asarray(maps), (h_img, w_img)))
        np.testing.assert_allclose(ours[:, :h_img, :w_img], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ours[:, h_img:], 0)
        np.testing.assert_array_equal(ours[:, :, w_img:], 0)
        hits, finite = pge._score_padded(maps, padded, np.array([h_img, w_img], np.int32), scales, 15.0)
        ref_hits, ref_finite = pge._score(maps, masks, 15.0)
        np.testing.assert_array_equal(hits, ref_hits)
        np.testing.assert_array_equal(finite, ref_finite)
        image = rng.random((h_img, w_img, 3)).astype(np.float32)
        hw = pge.input_shape(h_img, w_img, 24)
        got = pge._resize_image_padded(pge._pad_to(image, (*grid, 3)), np.array([h_img, w_img], np.int32), hw,
                                       np.array([pge._inv_scale(h_img, hw[0]), pge._inv_scale(w_img, hw[1])]))
        np.testing.assert_allclose(got, pge._resize_image(image, hw), rtol=1e-5, atol=1e-6)


def test_ties_in_the_padded_grid_keep_the_first_maximum_and_padding_never_wins():
    maps = np.zeros((1, 4, 4), np.float32)  # constant map: the first pixel (0, 0) in row-major order
    masks = np.zeros((1, 10, 12), bool)
    masks[0, 0, 0] = True
    padded = np.zeros((1, 32, 32), bool)
    padded[:, :10, :12] = masks
    scales = np.array([pge._inv_scale(4, 10), pge._inv_scale(4, 12)])
    hits, _ = pge._score_padded(maps, padded, np.array([10, 12], np.int32), scales, 0.0)
    assert bool(hits[0])
    neg = -np.ones((1, 4, 4), np.float32)  # all negative: the zeros of the padding must not be chosen
    padded[0] = False
    padded[0, 0, 0] = True
    hits, _ = pge._score_padded(neg, padded, np.array([10, 12], np.int32), scales, 0.0)
    assert bool(hits[0])


def test_size_bucket_setting_is_checked():
    assert pge.bucket_size(375, 128) == 384 and pge.bucket_size(384, 128) == 384 and pge.bucket_size(375, 0) == 375
    with pytest.raises(ValueError, match="size_bucket"):
        pge.PointingGameSettings(size_bucket=-1)
