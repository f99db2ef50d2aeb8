"""Tests of saliency_jax.evaluation.figures: overlay, the saliency grid's colour bar and predictions, validation curves."""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from PIL import Image

from saliency_jax import evaluation as ev


def test_overlay_hand_computed_and_matches_matplotlib():
    images = np.zeros((2, 2, 3, 1), np.float32)
    images[1] = 1.0  # white
    maps = np.array([[[0.0, 0.5, 1.0], [0.25, 0.75, 0.999]]] * 2, np.float32)
    out = ev.overlay(images, maps, alpha=0.5)
    assert out.shape == (2, 2, 3, 3) and out.dtype == jnp.float32
    # jet(0) = (0, 0, 0.5), jet(1) = (0.5, 0, 0); half over black, half over white.
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.0, 0.25], atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 2], [0.25, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[1, 0, 2], [0.75, 0.5, 0.5], atol=1e-6)
    jet = matplotlib.colormaps["jet"]
    expected = 0.5 * np.repeat(images, 3, axis=-1) + 0.5 * jet(maps)[..., :3]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # alpha 0 is the image, alpha 1 the colour map alone; RGB images pass through.
    rgb = np.random.default_rng(0).uniform(size=(2, 2, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(ev.overlay(rgb, maps, alpha=0.0), rgb, atol=1e-6)
    np.testing.assert_allclose(ev.overlay(rgb, maps, alpha=1.0, colormap="viridis"),
                               matplotlib.colormaps["viridis"](maps)[..., :3], atol=1e-6)
    # normalize: any range; jittable (values clipped under jit).
    np.testing.assert_allclose(ev.overlay(images, 10 * maps - 3, normalize=True), out, atol=1e-5)
    jitted = jax.jit(lambda x, m: ev.overlay(x, m, colormap="jet", alpha=0.5))(images, maps)
    np.testing.assert_allclose(jitted, out, atol=1e-6)


def test_overlay_rejects_bad_input():
    images = np.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="resize_maps"):
        ev.overlay(images, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="channels"):
        ev.overlay(np.zeros((2, 4, 4, 2)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="maps must lie in"):
        ev.overlay(images, np.full((2, 4, 4), 1.5))
    with pytest.raises(ValueError, match="colormap"):
        ev.overlay(images, np.zeros((2, 4, 4)), colormap="nope")
    with pytest.raises(ValueError, match="alpha"):
        ev.overlay(images, np.zeros((2, 4, 4)), alpha=2.0)


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_saliency_figure_colorbar_and_predictions(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 8, 8, 1))
    maps = {"grad_cam": rng.uniform(size=(2, 8, 8)), "rise": rng.uniform(size=(2, 8, 8))}
    plain = _pixels(ev.saliency_figure(images, maps, tmp_path / "plain.png", colorbar=False))
    with_bar = _pixels(ev.saliency_figure(images, maps, tmp_path / "bar.png"))
    assert with_bar.shape[0] == plain.shape[0] and with_bar.shape[1] > plain.shape[1] + 50
    # The colour bar's strip holds the colour map's extremes: dark blue (bottom) and dark red (top).
    strip = with_bar[:, plain.shape[1]:]
    assert ((strip[..., 2] > 100) & (strip[..., 0] < 30)).any() and ((strip[..., 0] > 100) & (strip[..., 2] < 30)).any()
    probs = np.array([[0.1, 0.9], [0.7, 0.3]])
    one = _pixels(ev.saliency_figure(images, maps, tmp_path / "one.png", predictions=probs, class_names=["a", "b"]))
    per_column = _pixels(ev.saliency_figure(images, maps, tmp_path / "cols.png",
                                            predictions={"grad_cam": probs, "rise": probs[::-1]}))
    assert one.shape[0] > with_bar.shape[0] and one.shape == per_column.shape  # room for the captions
    assert not np.array_equal(one, per_column)
    with pytest.raises(ValueError, match="softmax"):
        ev.saliency_figure(images, maps, tmp_path / "x.png", predictions=np.array([[2.0, -1.0], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="names no column"):
        ev.saliency_figure(images, maps, tmp_path / "x.png", predictions={"lime": probs})
    with pytest.raises(ValueError, match="class_names"):
        ev.saliency_figure(images, maps, tmp_path / "x.png", predictions=probs, class_names=["a"])
    assert not (tmp_path / "x.png").exists()


def test_training_curves_validation_dashed_in_training_panel(tmp_path):
    history = {"baseline": [{"step": s, "loss": 1.0 / s, "accuracy": 0.1 * s, **({"val_accuracy": 0.08 * s}
                                                                                  if s % 2 == 0 else {})}
                            for s in range(1, 7)]}
    paired = _pixels(ev.training_curves_figure(history, tmp_path / "paired.png"))
    separate = _pixels(ev.training_curves_figure(history, tmp_path / "separate.png", validation_prefix=None))
    # Default: two panels (val_accuracy drawn in the accuracy panel); without pairing, three panels.
    assert separate.shape[1] > 1.4 * paired.shape[1]
    explicit = _pixels(ev.training_curves_figure(history, tmp_path / "explicit.png", metrics=["loss", "accuracy"]))
    np.testing.assert_array_equal(explicit, paired)
    no_val = {"baseline": [{k: v for k, v in r.items() if k != "val_accuracy"} for r in history["baseline"]]}
    without = _pixels(ev.training_curves_figure(no_val, tmp_path / "without.png"))
    assert without.shape == paired.shape and not np.array_equal(without, paired)  # the dashed line and its legend
    unnoted = _pixels(ev.training_curves_figure(history, tmp_path / "unnoted.png", train_note=None))
    assert not np.array_equal(unnoted, paired)


def test_signed_overlay_centres_the_diverging_colormap_at_zero():
    """0 is the colour map's middle, +-max|map| its ends (per map), or +-scale for every map; matplotlib's colours."""
    images = np.zeros((2, 1, 3, 1), np.float32)
    maps = np.array([[[-2.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]], np.float32)
    out = ev.signed_overlay(images, maps, alpha=1.0)
    rdbu = matplotlib.colormaps["RdBu_r"]
    expected = rdbu(np.array([[[0.0, 0.5, 0.75]], [[0.5, 0.5, 0.5]]]))[..., :3]  # -2 / 2 -> 0; 1 / 2 -> 0.75
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 0, 0, 2] > out[0, 0, 0, 0] and out[0, 0, 2, 0] > out[0, 0, 2, 2]  # negative blue, positive red
    fixed = ev.signed_overlay(images, maps, alpha=1.0, scale=4.0)  # the same scale for both maps
    np.testing.assert_allclose(fixed[0, 0], rdbu(np.array([0.25, 0.5, 0.625]))[..., :3], atol=1e-6)
    jitted = jax.jit(lambda x, m: ev.signed_overlay(x, m, alpha=1.0))(images, maps)
    np.testing.assert_allclose(jitted, out, atol=1e-6)
    half = ev.signed_overlay(np.ones_like(images), maps, alpha=0.5)
    np.testing.assert_allclose(half, 0.5 + 0.5 * expected, atol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        ev.signed_overlay(images, maps, scale=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        ev.signed_overlay(images, np.full((2, 1, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="resize_maps"):
        ev.signed_overlay(images, np.zeros((2, 2, 2)))
    import saliency_jax.evaluation

    assert {"overlay", "signed_overlay"} <= set(saliency_jax.evaluation.__all__)
