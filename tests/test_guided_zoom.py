"""Tests of Guided Zoom (saliency_jax.evaluation.guided_zoom) and its pool archive (saliency_jax.data.evidence_pool).

References: hand-set maps and images whose pixels encode their coordinates (peaks, boxes, erased squares, which
round is valid), arithmetic written out by hand (Algorithm 2's weighted sum), and a slow per-image NumPy loop over
Algorithm 1 (slicing + ``jax.image.resize`` on the cut box) for a small CNN with fixed weights.
"""

import functools
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.data import evidence_pool as ep
from saliency_jax.data.sources import get_source
from saliency_jax.evaluation import guided_zoom as gz
from saliency_jax.models import SmallCNN
from saliency_jax.saliency import (contrastive_excitation_backprop, grad_cam, linen_layer, linen_view, rise,
                                   saliency_map)


# ---------------------------------------------------------------------------------------------------------------
# Sizes, peaks, boxes, patches, erasing.


def test_paper_sizes_from_ratios():
    assert gz.pixels(gz.PATCH_RATIO, 448) == 150
    assert gz.pixels(gz.ERASE_RATIO, 448) == 85
    assert gz.pixels(0.5, 32) == 16
    assert gz.pixels(0.01, 16) == 1  # never 0
    with pytest.raises(ValueError, match="ratio"):
        gz.pixels(0.0, 32)
    with pytest.raises(ValueError, match="side"):
        gz.pixels(0.5, 0)


def test_peak_location_of_hand_set_maps():
    maps = np.zeros((3, 6, 5), np.float32)
    maps[0, 4, 1] = 1.0
    maps[1, 2, 3] = maps[1, 5, 0] = 2.0  # tie: the first in row-major order wins (released code's np.argmax)
    # maps[2] constant: (0, 0)
    np.testing.assert_array_equal(gz.peak_locations(maps, (6, 5)), [[4, 1], [2, 3], [0, 0]])
    # A coarse map is resized bilinearly (half-pixel centres, edge clamp) before the argmax: a 2x2 map with its
    # maximum at (1, 0) becomes a 4x4 map whose unique maximum 1.0 is the corner pixel (3, 0); (2, 0) and (3, 1)
    # get 0.75.
    coarse = np.array([[[0.0, 0.0], [1.0, 0.0]]], np.float32)
    np.testing.assert_array_equal(gz.peak_locations(coarse, (4, 4)), [[3, 0]])


def test_patch_boxes_clamped_at_the_borders():
    peaks = jnp.array([[0, 0], [10, 12], [19, 23], [4, 20]])
    # 20 x 24 image, p = 9: window [floor(r + 0.5 - 4.5), + 9) = [r - 4, r + 5).
    truncated = gz.patch_boxes(peaks, 9, (20, 24))
    np.testing.assert_array_equal(truncated, [[0, 0, 5, 5], [6, 8, 15, 17], [15, 19, 20, 24], [0, 16, 9, 24]])
    shifted = gz.patch_boxes(peaks, 9, (20, 24), border="shift")
    np.testing.assert_array_equal(shifted, [[0, 0, 9, 9], [6, 8, 15, 17], [11, 15, 20, 24], [0, 15, 9, 24]])
    # Zoom: peaks on a 10 x 12 image, boxes on the 20 x 24 original. Pixel (5, 6) covers original pixels
    # [10, 12) x [12, 14) whose centre is (11, 13); an even p = 8 window is [11 - 4, 11 + 4) x [13 - 4, 13 + 4).
    zoomed = gz.patch_boxes(jnp.array([[5, 6], [0, 11]]), 8, (10, 12), (20, 24))
    np.testing.assert_array_equal(zoomed, [[7, 9, 15, 17], [0, 19, 5, 24]])
    with pytest.raises(ValueError, match="exceeds"):
        gz.patch_boxes(peaks, 25, (20, 24))
    with pytest.raises(ValueError, match="border"):
        gz.patch_boxes(peaks, 9, (20, 24), border="wrap")


def _coordinate_image(height, width):
    """[1, h, w, 2] float32: channel 0 the row, channel 1 the column of each pixel."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols], -1)[None].astype(np.float32)


def test_crop_patches_border_handling():
    image = np.repeat(_coordinate_image(20, 24), 2, axis=0)
    peaks = np.array([[1, 2], [18, 22]])
    # shift: the full 9 x 9 window moved inside the image, copied unchanged when output_size = 9.
    patches, boxes = gz.crop_patches(jnp.asarray(image), peaks, patch_size=9, output_size=9, border="shift")
    np.testing.assert_array_equal(boxes, [[0, 0, 9, 9], [11, 15, 20, 24]])
    np.testing.assert_allclose(patches[0], image[0, 0:9, 0:9], atol=1e-5)
    np.testing.assert_allclose(patches[1], image[1, 11:20, 15:24], atol=1e-5)
    # truncate (released code): the centred window [r - 4, r + 5) cut at the border and stretched to 9 x 9: rows
    # [0, 6) and columns [0, 7) for the first peak; the patch's first and last rows are the box's edge rows.
    patches, boxes = gz.crop_patches(jnp.asarray(image), peaks, patch_size=9, output_size=9, method="linear")
    np.testing.assert_array_equal(boxes, [[0, 0, 6, 7], [14, 18, 20, 24]])
    for b, (top, left, bottom, right) in enumerate(np.asarray(boxes)):
        reference = jax.image.resize(image[b, top:bottom, left:right], (9, 9, 2), "linear")
        np.testing.assert_allclose(patches[b], reference, atol=1e-5)
        rows, cols = np.asarray(patches[b, :, :, 0]), np.asarray(patches[b, :, :, 1])
        # no pixel from outside the box
        np.testing.assert_allclose([rows.min(), rows.max()], [top, bottom - 1], atol=1e-5)
        np.testing.assert_allclose([cols.min(), cols.max()], [left, right - 1], atol=1e-5)
    # bicubic, any output size: crop-then-resize with jax.image.resize.
    patches, boxes = gz.crop_patches(jnp.asarray(image), peaks, patch_size=9, output_size=(5, 14))
    for b, (top, left, bottom, right) in enumerate(np.asarray(boxes)):
        reference = jax.image.resize(image[b, top:bottom, left:right], (5, 14, 2), "cubic")
        np.testing.assert_allclose(patches[b], reference, atol=1e-4)


def test_erased_square():
    images = jnp.ones((3, 10, 10, 2), jnp.float32)
    peaks = jnp.array([[5, 5], [0, 0], [9, 4]])
    erased = np.asarray(gz.erase_squares(images, peaks, 3))
    expected = np.ones((3, 10, 10, 2), np.float32)
    expected[0, 4:7, 4:7] = 0.0  # 3 x 3 centred on (5, 5)
    expected[1, 0:2, 0:2] = 0.0  # [-1, 2) truncated at the border
    expected[2, 8:10, 3:6] = 0.0  # rows [8, 11) truncated
    np.testing.assert_array_equal(erased, expected)
    # even side: [floor(r + 0.5 - 2), + 4) = [r - 2, r + 2) (released code: [x - e/2, x + e/2)); per-channel fill.
    erased = np.asarray(gz.erase_squares(images, peaks, 4, fill=jnp.array([0.25, 0.5])))
    assert np.all(erased[0, 3:7, 3:7] == [0.25, 0.5]) and (erased[0] != 1.0).all(-1).sum() == 16
    with pytest.raises(ValueError, match="exceeds"):
        gz.erase_squares(images, peaks, 11)


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1 with hand-set maps: which rounds enter the pool.

_DOTS = ((1, 1), (6, 8), (10, 3))  # saliency 1.0, 0.9, 0.8: the peaks of rounds 0, 1, 2
# Channel 1 at the dots per image; the class is correct iff its sum > 0.5. Expected valid rounds (released code:
# round 0 always; a round l >= 1 only while every erased image so far is correctly classified).
_EVIDENCE = {
    "A stays correct": ((1, 1, 1), (True, True, True)),
    "B wrong after 1 erasure": ((1, 0, 0), (True, False, False)),
    "C wrong after 2 erasures": ((1, 1, 0), (True, True, False)),
    "D wrong from the start": ((0, 0, 0), (True, False, False)),
    "E wrong, then right again": ((1, -1, 1), (True, False, False)),
}


def _dot_images():
    images = np.zeros((len(_EVIDENCE), 12, 12, 2), np.float32)
    for b, (evidence, _) in enumerate(_EVIDENCE.values()):
        for (r, c), saliency, e in zip(_DOTS, (1.0, 0.9, 0.8), evidence):
            images[b, r, c] = (saliency, e)
    return jnp.asarray(images)


def _dot_grounding(images, targets):
    del targets
    return images[..., 0]  # the map is the saliency channel: the brightest remaining dot is the peak


def _dot_logits(images):
    total = images[..., 1].sum(axis=(1, 2))
    return jnp.stack([total - 0.5, jnp.zeros_like(total)], axis=-1)  # class 0 iff the evidence sum > 0.5


def test_algorithm1_rounds_peaks_and_dropping():
    images = _dot_images()
    labels = jnp.zeros(len(_EVIDENCE), jnp.int32)
    pool_fn = jax.jit(functools.partial(gz.evidence_pool, _dot_grounding, _dot_logits, patch_size=5, erase_size=3,
                                        output_size=5))
    pool = pool_fn(images, labels)
    assert pool.patches.shape == (3, 5, 5, 5, 2)
    np.testing.assert_array_equal(pool.rounds, [0, 1, 2])
    np.testing.assert_array_equal(pool.methods, [0, 0, 0])
    expected_valid = np.array([valid for _, valid in _EVIDENCE.values()]).T
    np.testing.assert_array_equal(pool.valid, expected_valid)
    # Peaks: the dots in saliency order for every image (erasing removes the earlier ones).
    np.testing.assert_array_equal(pool.peaks, np.broadcast_to(np.array(_DOTS)[:, None], (3, 5, 2)))
    # Boxes around (1, 1) are truncated at the border: [-1, 4) -> [0, 4).
    # Boxes [r - 2, r + 3): around (1, 1) truncated at the top-left border, around (10, 3) at the bottom.
    np.testing.assert_array_equal(pool.boxes[:, 0], [[0, 0, 4, 4], [4, 6, 9, 11], [8, 1, 12, 6]])
    # Round 1's patch of image A is its 5x5 box copied unchanged (box size = output size): dot 2 at the centre.
    np.testing.assert_allclose(pool.patches[1, 0, 2, 2], [0.9, 1.0], atol=1e-5)
    # Algorithm 1's text (line 3) also gates round 0: image D is then dropped entirely.
    strict = gz.evidence_pool(_dot_grounding, _dot_logits, images, labels, patch_size=5, erase_size=3,
                              output_size=5, require_correct_first=True)
    np.testing.assert_array_equal(strict.valid[0], [True, True, True, False, True])
    np.testing.assert_array_equal(strict.valid[1:], expected_valid[1:])


def test_patches_are_cut_from_the_unerased_original():
    # Rounds 1 and 2 of image A: the peaks are dots 2 and 3, and their 12x12 patches (the whole image) also cover
    # the erased squares of the earlier dots; the patches must show the original values (cut from the original,
    # not from the erased image).
    images = _dot_images()[:1]
    pool = gz.evidence_pool(_dot_grounding, _dot_logits, images, jnp.zeros(1, jnp.int32), patch_size=12,
                            erase_size=3, output_size=12, border="shift")
    np.testing.assert_array_equal(pool.boxes[:, 0], [[0, 0, 12, 12]] * 3)
    for l in range(3):
        np.testing.assert_allclose(pool.patches[l, 0], images[0], atol=1e-5)


def test_zoom_patches_from_a_larger_original():
    # Maps and erasing on a 6x6 image; patches from the 12x12 original of the same field of view.
    small = np.zeros((1, 6, 6, 1), np.float32)
    small[0, 2, 4] = 1.0
    original = _coordinate_image(12, 12)[..., :1]
    pool = gz.evidence_pool(lambda x, t: x[..., 0], lambda x: jnp.zeros((x.shape[0], 2)), jnp.asarray(small),
                            jnp.zeros(1, jnp.int32), originals=jnp.asarray(original), patch_size=4,
                            erase_size=1, output_size=4, num_erasures=0)
    # Pixel (2, 4) of the 6x6 image is original pixels [4, 6) x [8, 10), centre (5, 9): box [3, 7) x [7, 11).
    np.testing.assert_array_equal(pool.boxes[0, 0], [3, 7, 7, 11])
    np.testing.assert_allclose(pool.patches[0, 0, :, 0, 0], [3, 4, 5, 6], atol=1e-5)


def test_ensemble_pool_is_the_union_of_single_method_pools():
    images = _dot_images()
    labels = jnp.zeros(len(_EVIDENCE), jnp.int32)
    inverted = lambda x, t: -x[..., 0] + 2.0 * (x[..., 0] > 0)  # a second "method": dots ranked 0.8 > 0.9 > 1.0
    kwargs = dict(patch_size=5, output_size=5)
    ensemble = jax.jit(functools.partial(gz.ensemble_evidence_pool, (_dot_grounding, inverted), _dot_logits,
                                         **kwargs))(images, labels)
    np.testing.assert_array_equal(ensemble.rounds, [0, 0])
    np.testing.assert_array_equal(ensemble.methods, [0, 1])
    np.testing.assert_array_equal(ensemble.valid, np.ones((2, 5), bool))  # L = 0: round 0 only, never gated
    for m, grounding in enumerate((_dot_grounding, inverted)):
        single = gz.evidence_pool(grounding, _dot_logits, images, labels, erase_size=1, num_erasures=0, **kwargs)
        np.testing.assert_allclose(ensemble.patches[m], single.patches[0], atol=1e-6)
        np.testing.assert_array_equal(ensemble.peaks[m], single.peaks[0])
    np.testing.assert_array_equal(ensemble.peaks[1], np.broadcast_to([10, 3], (5, 2)))


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 2: decision refinement.


def test_refinement_scores_by_hand():
    conventional = np.array([[0.5, 0.3, 0.2]], np.float32)
    evidence = np.array([[[0.1, 0.1, 0.1], [0.9, 0.8, 0.7], [0.2, 0.2, 0.2]]], np.float32)
    scores = gz.refinement_scores(conventional, evidence)
    # 0.4 * 0.5 + 0.3 * 0.1 + 0.2 * 0.1 + 0.1 * 0.1 = 0.26; 0.12 + 0.27 + 0.16 + 0.07 = 0.62; 0.08 + 0.06 + 0.04
    # + 0.02 = 0.20.
    np.testing.assert_allclose(scores, [[0.26, 0.62, 0.20]], atol=1e-6)
    # Only the most salient patch (L = 0) with other weights.
    np.testing.assert_allclose(gz.refinement_scores(conventional, evidence[..., :1], 1.0, (2.0,)),
                               [[0.7, 2.1, 0.6]], atol=1e-6)
    with pytest.raises(ValueError, match="evidence"):
        gz.refinement_scores(conventional, evidence[..., :2])
    with pytest.raises(ValueError, match="evidence_weights"):
        gz.refinement_scores(conventional, evidence, 0.4, ())


# Algorithm 2 on hand-set functions: 6x6 single-channel images whose pixel (r, c) holds the id 1 + 6r + c; the map
# of class t peaks at _PLACES[t][0], then (once that pixel is erased to 0) at _PLACES[t][1], then _PLACES[t][2];
# 1x1 patches are the id of the peak pixel; the "Evidence CNN" is a table P[id, class].
_PLACES = {0: ((0, 0), (0, 1), (0, 2)), 1: ((1, 0), (1, 1), (1, 2)), 2: ((2, 0), (2, 1), (2, 2)),
           3: ((3, 0), (3, 1), (5, 5))}


def _place_grounding(images, targets):
    prior = np.zeros((4, 6, 6), np.float32)
    for t, places in _PLACES.items():
        for value, (r, c) in zip((3.0, 2.0, 1.0), places):
            prior[t, r, c] = value
    return jnp.asarray(prior)[targets] * (images[..., 0] > 0)


def _evidence_table():
    rng = np.random.default_rng(3)
    table = rng.random((37, 4)).astype(np.float32) + 0.05
    return table / table.sum(1, keepdims=True)


def test_decision_refinement_against_hand_computation():
    ids = (1 + np.arange(36, dtype=np.float32)).reshape(1, 6, 6, 1)
    images = jnp.asarray(np.repeat(ids, 2, axis=0))
    conventional = np.array([[0.1, 0.45, 0.15, 0.3], [0.4, 0.35, 0.05, 0.2]], np.float32)
    table = _evidence_table()
    logits_fn = lambda x: jnp.log(jnp.asarray(conventional))[: x.shape[0]]
    evidence_fn = lambda p: jnp.log(jnp.asarray(table))[jnp.round(p[:, 0, 0, 0]).astype(jnp.int32)]
    refine = jax.jit(functools.partial(gz.decision_refinement, _place_grounding, logits_fn, evidence_fn, k=3,
                                       patch_size=1, erase_size=1, output_size=1))
    result = refine(images)
    top = np.argsort(-conventional, axis=1)[:, :3]  # [[1, 3, 2], [0, 1, 3]]
    np.testing.assert_array_equal(result.top_classes, top)
    np.testing.assert_allclose(result.conventional, np.take_along_axis(conventional, top, 1), atol=1e-6)
    expected_evidence = np.zeros((2, 3, 3), np.float32)
    for b in range(2):
        for j, t in enumerate(top[b]):
            for l, (r, c) in enumerate(_PLACES[t]):
                expected_evidence[b, j, l] = table[1 + 6 * r + c, t]
    np.testing.assert_allclose(result.evidence, expected_evidence, atol=1e-5)
    expected_scores = 0.4 * np.take_along_axis(conventional, top, 1) + expected_evidence @ np.array([0.3, 0.2, 0.1])
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-5)
    np.testing.assert_array_equal(result.classes, top[np.arange(2), expected_scores.argmax(1)])
    # Weights that ignore the conventional CNN: the refined class maximises the evidence alone.
    only = gz.decision_refinement(_place_grounding, logits_fn, evidence_fn, images, k=4, patch_size=1,
                                  erase_size=1, output_size=1, conventional_weight=0.0,
                                  evidence_weights=(1.0, 0.0, 0.0))
    first = np.stack([[table[1 + 6 * _PLACES[t][0][0] + _PLACES[t][0][1], t] for t in range(4)]] * 2)
    np.testing.assert_array_equal(only.classes, first.argmax(1))
    with pytest.raises(ValueError, match="k=5"):
        gz.decision_refinement(_place_grounding, logits_fn, evidence_fn, images, k=5, patch_size=1, erase_size=1,
                               output_size=1)


def test_evidence_patches_are_the_ungated_rounds():
    # Algorithm 2's zoom: the same patches and peaks as Algorithm 1's, every round kept (nothing is gated at test
    # time, even for images the conventional CNN gets wrong after an erasure).
    images = _dot_images()
    labels = jnp.zeros(len(_EVIDENCE), jnp.int32)
    kwargs = dict(patch_size=5, erase_size=3, output_size=5)
    pool = gz.evidence_pool(_dot_grounding, _dot_logits, images, labels, **kwargs)
    zoom = jax.jit(functools.partial(gz.evidence_patches, _dot_grounding, num_erasures=2, **kwargs))(images, labels)
    np.testing.assert_array_equal(zoom.valid, np.ones((3, 5), bool))
    np.testing.assert_array_equal(zoom.peaks, pool.peaks)
    np.testing.assert_array_equal(zoom.peaks[:, 0], _DOTS)
    np.testing.assert_allclose(zoom.patches, pool.patches, atol=1e-6)
    np.testing.assert_array_equal(zoom.rounds, [0, 1, 2])
    with pytest.raises(ValueError, match="num_erasures"):
        gz.evidence_patches(_dot_grounding, images, labels, num_erasures=-1, **kwargs)


def test_class_evidence_by_hand():
    # 2 rounds x 3 pairs of 1x1 patches whose value is an id; the "Evidence CNN" is the table log P[id].
    table = _evidence_table()
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    patches = jnp.asarray(ids[:, :, None, None, None])
    evidence_fn = lambda p: jnp.log(jnp.asarray(table))[jnp.round(p[:, 0, 0, 0]).astype(jnp.int32)]
    targets = np.array([3, 0, 2])
    evidence, predicted = gz.class_evidence(evidence_fn, patches, targets)
    expected = np.array([[table[int(ids[l, j]), targets[j]] for l in range(2)] for j in range(3)])
    np.testing.assert_allclose(evidence, expected, atol=1e-6)
    np.testing.assert_array_equal(predicted, table[ids.astype(int)].argmax(-1).T)
    logits, _ = gz.class_evidence(evidence_fn, patches, targets, score="logit")
    np.testing.assert_allclose(logits, np.log(expected), atol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        gz.class_evidence(evidence_fn, patches, targets[:2])
    with pytest.raises(ValueError, match="score"):
        gz.class_evidence(evidence_fn, patches, targets, score="rank")


def test_refined_classes_for_each_k():
    top_classes = jnp.array([[4, 1, 7, 2], [0, 3, 5, 6]])
    scores = jnp.array([[0.5, 0.7, 0.9, 0.1], [0.6, 0.6, 0.2, 0.8]])
    np.testing.assert_array_equal(gz.refined_classes(top_classes, scores, 1), [4, 0])
    np.testing.assert_array_equal(gz.refined_classes(top_classes, scores, 2), [1, 0])  # tie: the more probable
    np.testing.assert_array_equal(gz.refined_classes(top_classes, scores, 3), [7, 0])
    np.testing.assert_array_equal(gz.refined_classes(top_classes, scores, 4), [7, 6])
    with pytest.raises(ValueError, match="k=5"):
        gz.refined_classes(top_classes, scores, 5)
    # A class's score does not depend on k: refining over K classes and keeping the first k equals refining over k.
    ids = (1 + np.arange(36, dtype=np.float32)).reshape(1, 6, 6, 1)
    images = jnp.asarray(np.repeat(ids, 2, axis=0))
    conventional = jnp.log(jnp.array([[0.1, 0.45, 0.15, 0.3], [0.4, 0.35, 0.05, 0.2]]))
    table = _evidence_table()
    evidence_fn = lambda p: jnp.log(jnp.asarray(table))[jnp.round(p[:, 0, 0, 0]).astype(jnp.int32)]
    refine = functools.partial(gz.decision_refinement, _place_grounding, lambda x: conventional, evidence_fn, images,
                               patch_size=1, erase_size=1, output_size=1)
    full = refine(k=4)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(gz.refined_classes(full.top_classes, full.scores, k), refine(k=k).classes)


def test_top_k_correct():
    logits = jnp.array([[0.1, 0.5, 0.4], [0.9, 0.0, 0.1]])
    np.testing.assert_array_equal(gz.top_k_correct(logits, jnp.array([2, 2]), 1), [False, False])
    np.testing.assert_array_equal(gz.top_k_correct(logits, jnp.array([2, 2]), 2), [True, True])
    np.testing.assert_array_equal(gz.top_k_correct(logits, jnp.array([0, 1]), 2), [False, False])


# ---------------------------------------------------------------------------------------------------------------
# Batched Algorithm 1 == a per-image loop, on a small CNN with fixed weights and cEB.


def _small_cnn(batch):
    """A 4-class SmallCNN (no BatchNorm) with fixed random weights and images on which erasing changes decisions."""
    model = SmallCNN(num_classes=4, widths=(8, 8, 8), use_batchnorm=False)
    originals = jax.random.uniform(jax.random.key(2), (batch, 32, 32, 3)) ** 3
    images = jax.image.resize(originals, (batch, 16, 16, 3), "linear")
    variables = model.init(jax.random.key(14), images)
    return model, variables, functools.partial(model.apply, variables, train=False), images, originals


def _reference_pool(grounding, logits_fn, images, originals, labels, *, patch_size, erase_size, output_size,
                    num_erasures, method):
    """Algorithm 1 one image at a time with NumPy slicing (released-code rules)."""
    images, originals, labels = np.asarray(images), np.asarray(originals), np.asarray(labels)
    h, w = images.shape[1:3]
    big_h, big_w = originals.shape[1:3]
    patches, valid, peaks = [], [], []
    for b in range(images.shape[0]):
        image = images[b:b + 1].copy()
        alive = True
        per_round = []
        for l in range(num_erasures + 1):
            saliency = np.asarray(grounding(jnp.asarray(image), jnp.asarray(labels[b:b + 1])))[0]
            saliency = np.asarray(jax.image.resize(saliency, (h, w), "linear", antialias=False))
            r, c = np.unravel_index(np.argmax(saliency), saliency.shape)
            cr, cc = (r + 0.5) * big_h / h, (c + 0.5) * big_w / w
            top, left = int(np.floor(cr - patch_size / 2)), int(np.floor(cc - patch_size / 2))
            box = originals[b, max(top, 0):min(top + patch_size, big_h), max(left, 0):min(left + patch_size, big_w)]
            patch = np.asarray(jax.image.resize(box, (output_size, output_size, box.shape[2]), method))
            per_round.append((patch, alive, (r, c)))
            if l < num_erasures:
                er, ec = int(np.floor(r + 0.5 - erase_size / 2)), int(np.floor(c + 0.5 - erase_size / 2))
                image[0, max(er, 0):er + erase_size, max(ec, 0):ec + erase_size] = 0.0
                alive = alive and int(np.argmax(np.asarray(logits_fn(jnp.asarray(image)))[0])) == labels[b]
        patches.append([p for p, _, _ in per_round])
        valid.append([v for _, v, _ in per_round])
        peaks.append([q for _, _, q in per_round])
    return (np.transpose(np.array(patches), (1, 0, 2, 3, 4)), np.array(valid).T,
            np.transpose(np.array(peaks), (1, 0, 2)))


def test_batched_pool_equals_per_image_reference():
    model, variables, logits_fn, images, originals = _small_cnn(8)
    predicted = np.asarray(jnp.argmax(logits_fn(images), -1))
    labels = predicted.copy()
    labels[[1, 4]] = (labels[[1, 4]] + 1) % 4  # two misclassified images
    grounding = gz.contrastive_eb_grounding(linen_layer(model, variables, "conv2", train=False))
    sizes = dict(patch_size=11, erase_size=6, output_size=14)
    pool = jax.jit(functools.partial(gz.evidence_pool, grounding, logits_fn, **sizes))(images, labels,
                                                                                         originals=originals)
    patches, valid, peaks = _reference_pool(grounding, logits_fn, images, originals, labels, num_erasures=2,
                                            method="cubic", **sizes)
    np.testing.assert_array_equal(pool.peaks, peaks)
    np.testing.assert_array_equal(pool.valid, valid)
    np.testing.assert_allclose(pool.patches, patches, atol=1e-4)
    # The case exercises every rule: images kept for 3, 2 and 1 rounds among the correctly classified ones.
    kept = {"".join(str(int(v)) for v in valid[:, b]) for b in np.nonzero(labels == predicted)[0]}
    assert {"111", "110", "100"} <= kept


def test_groundings_are_the_registrys_saliency_map_exactly():
    """cEB / Grad-CAM groundings are saliency_map's layer-resolution map, RISE its maps (unnormalised), on a layer
    model or a view alike, and equal element for element the low-level calls they made before the registry."""
    model, variables, logits_fn, images, _ = _small_cnn(3)
    targets = jnp.array([0, 3, 1], jnp.int32)
    lm = linen_layer(model, variables, "conv2", train=False)
    view = linen_view(model, variables, "conv2", train=False)
    key = jax.random.key(5)

    def layer_map(method, **options):
        return jax.jit(lambda x, t: saliency_map(method, view, x, t, normalize=False, return_extras=True,
                                                 **options).extras["layer_map"])(images, targets)

    cases = [
        (gz.contrastive_eb_grounding, layer_map("contrastive_excitation_backprop"),
         lambda x, t: contrastive_excitation_backprop(lm, x, t).saliency),
        (functools.partial(gz.grad_cam_grounding, score="softmax", weighting="guided"),
         layer_map("grad_cam", score="softmax", weighting="guided"),
         lambda x, t: grad_cam(lm, x, t, score="softmax", weighting="guided", resize=False, normalize=False)),
    ]
    for make, want, before in cases:
        for model_form in (lm, view):
            got = jax.jit(make(model_form))(images, targets)
            assert got.shape == (3, 8, 8)
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(want, jax.jit(before)(images, targets))
    options = dict(num_masks=40, grid_size=4, p=0.4, masks_per_step=20)
    registry = jax.jit(lambda x, t: saliency_map("rise", view, x, t, normalize=False, key=key, **options))
    want = registry(images, targets)
    for model_form in (logits_fn, view):
        np.testing.assert_array_equal(jax.jit(gz.rise_grounding(model_form, key, **options))(images, targets), want)
    np.testing.assert_array_equal(want, jax.jit(lambda x, t: rise(logits_fn, key, x, t, **options))(images, targets))
    with pytest.raises(ValueError, match="has none"):
        gz.contrastive_eb_grounding(logits_fn)(images, targets)


# ---------------------------------------------------------------------------------------------------------------
# The pool archive.


def _write(path, batches, **kwargs):
    with ep.EvidencePoolWriter(path, class_names=["a", "b", "c"], method_names=["cEB", "RISE"], **kwargs) as w:
        for split, patches, labels, rounds, methods, indices in batches:
            w.add(split, patches, labels, rounds=rounds, methods=methods, indices=indices)


def test_pool_archive_roundtrip_through_the_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    first, second = rng.random((3, 4, 4, 3), np.float32), rng.random((2, 4, 4, 3), np.float32)
    path = tmp_path / "pools" / "gz.npz"
    _write(path, [("train", first, [0, 1, 2], [0, 1, 2], [0, 0, 0], [5, 5, 5]),
                  ("train", second, [2, 2], [0, 0], [1, 1], [6, 7])])
    assert sorted(p.name for p in path.parent.iterdir()) == ["gz.npz"]  # no temporary files left
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, readable as the umask allows
    source = get_source("npz", "train", path)
    assert len(source) == 5 and source.class_names == ("a", "b", "c")
    expected = np.round(np.concatenate([first, second]) * 255) / 255
    np.testing.assert_allclose(np.stack([source[i]["image"] for i in range(5)]), expected, atol=1e-6)
    assert [int(source[i]["label"]) for i in range(5)] == [0, 1, 2, 2, 2]
    assert len(get_source("npz", "test", path)) == 0
    with np.load(path) as archive:
        np.testing.assert_array_equal(archive["round_train"], [0, 1, 2, 0, 0])
        np.testing.assert_array_equal(archive["index_train"], [5, 5, 5, 6, 7])
        assert list(archive["method_names"]) == ["cEB", "RISE"]
    assert len(ep.load_evidence_pool(path, "train", methods=["RISE"])) == 2
    assert len(ep.load_evidence_pool(path, "train", methods=["cEB"], rounds=[1, 2])) == 2


def test_pool_writer_is_atomic(tmp_path):
    path = tmp_path / "pool.npz"
    patches = np.zeros((1, 2, 2, 1), np.float32)
    _write(path, [("train", patches, [0], [0], [0], [0])])
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="crash"):
        with ep.EvidencePoolWriter(path, class_names=["a"], method_names=["cEB"]) as w:
            w.add("train", np.ones((4, 2, 2, 1), np.float32), [0] * 4, rounds=[0] * 4, methods=[0] * 4,
                  indices=range(4))
            raise RuntimeError("crash")
    assert path.read_bytes() == before  # the previous complete archive is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.npz"]
    with pytest.raises(ValueError, match="y must lie"):  # a label outside the 3 classes: nothing is written
        _write(tmp_path / "bad.npz", [("train", patches, [3], [0], [0], [0])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.npz"]


def test_write_evidence_split_streams_valid_patches(tmp_path):
    images = _dot_images()
    labels = np.zeros(len(_EVIDENCE), np.int32)
    pool_fn = jax.jit(functools.partial(gz.evidence_pool, _dot_grounding, _dot_logits, patch_size=5, erase_size=3,
                                        output_size=5))
    path = tmp_path / "pool.npz"
    with ep.EvidencePoolWriter(path, class_names=["x", "y"], method_names=["dots"]) as writer:
        written = ep.write_evidence_split(writer, "train", pool_fn, np.asarray(images), labels, batch_size=2)
    expected_valid = np.array([valid for _, valid in _EVIDENCE.values()])  # [image, round]
    assert written == expected_valid.sum() == 8
    with np.load(path) as archive:
        pairs = sorted(zip(archive["index_train"].tolist(), archive["round_train"].tolist()))
    assert pairs == sorted((b, l) for b, l in zip(*np.nonzero(expected_valid)))


def test_evidence_pool_figure(tmp_path):
    from saliency_jax.evaluation.figures import evidence_pool_figure
    images = _dot_images()
    pool = gz.evidence_pool(_dot_grounding, _dot_logits, images, jnp.zeros(5, jnp.int32), patch_size=5,
                            erase_size=3, output_size=5)
    originals = np.repeat(np.clip(np.asarray(images[..., :1]), 0, 1), 3, axis=-1)
    path = evidence_pool_figure(originals, np.repeat(np.clip(pool.patches[..., :1], 0, 1), 3, -1), pool.valid,
                                tmp_path / "fig" / "pool.png", boxes=pool.boxes, row_labels=list("ABCDE"),
                                title="pool")
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="valid"):
        evidence_pool_figure(originals, np.repeat(pool.patches[..., :1], 3, -1), pool.valid[:2], tmp_path / "x.png")


def test_bad_input_is_refused():
    images = _dot_images()
    labels = jnp.zeros(5, jnp.int32)
    kwargs = dict(patch_size=5, erase_size=3, output_size=5)
    with pytest.raises(ValueError, match="labels must have shape"):
        gz.evidence_pool(_dot_grounding, _dot_logits, images, labels[:4], **kwargs)
    with pytest.raises(TypeError, match="integer"):
        gz.evidence_pool(_dot_grounding, _dot_logits, images, labels.astype(jnp.float32), **kwargs)
    with pytest.raises(ValueError, match="originals"):
        gz.evidence_pool(_dot_grounding, _dot_logits, images, labels, originals=images[:2], **kwargs)
    with pytest.raises(TypeError, match="floating"):
        gz.evidence_pool(_dot_grounding, _dot_logits, images.astype(jnp.int32), labels, **kwargs)
    with pytest.raises(ValueError, match="num_erasures"):
        gz.evidence_pool(_dot_grounding, _dot_logits, images, labels, num_erasures=-1, **kwargs)
    with pytest.raises(ValueError, match="method"):
        gz.evidence_pool(_dot_grounding, _dot_logits, images, labels, method="nearest", **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        gz.ensemble_evidence_pool((), _dot_logits, images, labels, patch_size=5, output_size=5)
    with pytest.raises(ValueError, match="score"):
        gz.decision_refinement(_dot_grounding, _dot_logits, _dot_logits, images, k=1, score="rank", **kwargs)


def _rewrite(path, **changes):
    """The archive rewritten by hand (``np.savez``) with some keys changed: what an edit after the writer leaves."""
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)


def test_pool_content_is_sealed_and_a_changed_pool_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "gz.npz"
    rng = np.random.default_rng(0)
    with ep.EvidencePoolWriter(path, class_names=["a", "b", "c"], method_names=["cEB"]) as w:
        w.add("train", rng.random((4, 4, 4, 3), np.float32), [0, 1, 2, 1], rounds=[0] * 4, methods=[0] * 4,
              indices=range(4))
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    # The digest the writer computed from the streamed data is the one recomputed from the file.
    assert w.content_sha256 == str(arrays["content_sha256"]) == ep.pool_content_digest(arrays)
    assert ep.verify_evidence_pool(path) == ep.verify_evidence_pool(path, w.content_sha256) == w.content_sha256
    assert len(ep.load_evidence_pool(path, "train", expected_digest=w.content_sha256)) == 4
    with pytest.raises(ep.EvidencePoolError, match="not the pool recorded beside it"):
        ep.verify_evidence_pool(path, "0" * 64)

    patches = arrays["x_train"].copy()
    patches[2, 1, 1, 0] ^= 1  # one bit of one pixel
    for key, value in (("y_train", np.array([0, 1, 2, 2], np.int32)),  # one label changed
                       ("x_train", patches), ("class_names", np.array(["a", "b", "d"]))):
        _rewrite(path, **{key: value})
        with pytest.raises(ep.EvidencePoolError, match=f"evidence pool {re.escape(str(path))} differs from the "
                                                       "content digest it was written with"):
            ep.load_evidence_pool(path, "train")
        _rewrite(path, **{key: arrays[key]})
        assert ep.verify_evidence_pool(path) == w.content_sha256
    # A pool without a digest (an older writer, or made by hand) cannot be verified: refused too.
    _rewrite(path, content_sha256=None)
    with pytest.raises(ep.EvidencePoolError, match="has no content digest"):
        ep.load_evidence_pool(path, "train")
