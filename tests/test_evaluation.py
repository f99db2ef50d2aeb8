"""Tests of saliency_jax.evaluation: metrics, Random Erasing, figures and report tables."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from saliency_jax import evaluation as ev

# ----------------------------------------------------------------------------------------------
# metrics.py

# 4 classes; class "d" never occurs. Confusion matrix (rows = true):
#   a: [3, 0, 0, 0]   b: [1, 0, 1, 0]   c: [0, 1, 2, 0]   d: [0, 0, 0, 0]
_LABELS = [0, 0, 0, 1, 1, 2, 2, 2]
_PREDICTIONS = [0, 0, 0, 0, 2, 2, 2, 1]


def test_classification_metrics_hand_computed():
    m = ev.classification_metrics(
        np.array(_LABELS), jnp.array(_PREDICTIONS), num_classes=4, class_names=["a", "b", "c", "d"]
    )
    # Precision per class: a 3/4, b 0/1, c 2/3, d 0 (nothing predicted).
    # Recall per class:    a 3/3, b 0/2, c 2/3, d 0 (no support).
    # F1 per class:        a 6/7, b 0,   c 2/3, d 0.   Supports 3, 2, 3, 0 of 8.
    expected = {
        "accuracy": 5 / 8,
        "precision_macro": (3 / 4 + 2 / 3) / 4,  # 17/48
        "recall_macro": (1 + 2 / 3) / 4,  # 5/12
        "f1_macro": (6 / 7 + 2 / 3) / 4,  # 8/21
        "precision_weighted": (3 * 3 / 4 + 3 * 2 / 3) / 8,  # 17/32
        "recall_weighted": (3 * 1 + 3 * 2 / 3) / 8,  # 5/8
        "f1_weighted": (3 * 6 / 7 + 3 * 2 / 3) / 8,  # 4/7
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, abs=1e-12), name
    assert m["true_positive_rate"] == pytest.approx({"a": 1.0, "b": 0.0, "c": 2 / 3, "d": 0.0})
    assert list(m["true_positive_rate"]) == ["a", "b", "c", "d"]
    assert m["confusion_matrix"] == [[3, 0, 0, 0], [1, 0, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    assert m["num_examples"] == 8
    # Plain Python values: the dict survives a JSON round trip unchanged.
    assert json.loads(json.dumps(m)) == m
    assert all(type(m[k]) is float for k in expected)


def test_classification_metrics_default_class_names_and_perfect_score():
    m = ev.classification_metrics([2, 0, 1], [2, 0, 1], num_classes=3)
    assert m["true_positive_rate"] == {"class_0": 1.0, "class_1": 1.0, "class_2": 1.0}
    assert m["accuracy"] == 1.0 and m["f1_macro"] == 1.0 and m["precision_weighted"] == 1.0


@pytest.mark.parametrize(
    "labels, predictions, num_classes, class_names, match",
    [
        ([0, 1], [0], 2, None, "same shape"),
        ([[0, 1]], [[0, 1]], 2, None, r"shape \[n\]"),
        ([0, 2], [0, 1], 2, None, r"labels must lie in \[0, 1\]"),
        ([0, 1], [0, -1], 2, None, "predictions must lie"),
        ([0.0, 1.0], [0, 1], 2, None, "integer"),
        ([], [], 2, None, "empty"),
        ([0, 1], [0, 1], 0, None, "num_classes"),
        ([0, 1], [0, 1], 2, ["a"], "class_names"),
        ([0, 1], [0, 1], 2, ["a", "a"], "distinct"),
    ],
)
def test_classification_metrics_rejects_bad_input(labels, predictions, num_classes, class_names, match):
    with pytest.raises(ValueError, match=match):
        ev.classification_metrics(labels, predictions, num_classes, class_names)


def test_summarize_repeats_sample_and_population_std():
    runs = [
        {"accuracy": 0.5, "true_positive_rate": {"a": 1.0}, "confusion_matrix": [[1]]},
        {"accuracy": 0.7, "true_positive_rate": {"a": 0.0}, "confusion_matrix": [[2]]},
        {"accuracy": 0.9, "true_positive_rate": {"a": 0.5}, "confusion_matrix": [[3]]},
    ]
    summary = ev.summarize_repeats(runs)
    # Sample std of (0.5, 0.7, 0.9): sqrt((0.04 + 0 + 0.04) / 2) = 0.2.
    assert summary["accuracy"] == pytest.approx({"mean": 0.7, "std": 0.2})
    assert summary["true_positive_rate"]["a"] == pytest.approx({"mean": 0.5, "std": 0.5})
    assert "confusion_matrix" not in summary
    population = ev.summarize_repeats(runs, ddof=0)
    assert population["accuracy"]["std"] == pytest.approx(np.sqrt(0.08 / 3))
    single = ev.summarize_repeats(runs[:1], ddof=0)
    assert single["accuracy"] == {"mean": 0.5, "std": 0.0}
    json.dumps(summary)


def test_summarize_repeats_feeds_metrics_table():
    runs = [ev.classification_metrics(_LABELS, _PREDICTIONS, 4), ev.classification_metrics(_LABELS, _LABELS, 4)]
    summary = ev.summarize_repeats(runs)
    assert summary["accuracy"] == pytest.approx({"mean": (5 / 8 + 1) / 2, "std": np.std([5 / 8, 1.0], ddof=1)})
    table = ev.metrics_table({"x": summary}, rows=("accuracy",))
    assert "| Accuracy | 0.812 ± 0.265 |" in table


def test_summarize_repeats_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 runs"):
        ev.summarize_repeats([{"accuracy": 1.0}])
    with pytest.raises(ValueError, match="empty"):
        ev.summarize_repeats([], ddof=0)
    with pytest.raises(ValueError, match="keys"):
        ev.summarize_repeats([{"accuracy": 1.0}, {"recall_macro": 1.0}])
    with pytest.raises(ValueError, match="number in every repeat"):
        ev.summarize_repeats([{"accuracy": 1.0}, {"accuracy": "high"}])
    with pytest.raises(ValueError, match="ddof"):
        ev.summarize_repeats([{"accuracy": 1.0}] * 3, ddof=2)


# ----------------------------------------------------------------------------------------------
# robustness.py


# Few distinct shapes, so the tests share compilations (ranges and probability are traced).
_SMALL = (64, 16, 16, 3)
_LARGE = (400, 48, 64, 2)


def _erased_mask(images, out):
    """[batch, height, width] bool: pixels changed on any channel."""
    return np.asarray(jnp.any(out != images, axis=-1))


def test_random_erasing_probability_zero_is_identity():
    images = jax.random.uniform(jax.random.key(1), _SMALL)
    out = ev.random_erasing(jax.random.key(0), images, probability=0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(images))
    assert out.dtype == images.dtype and out.shape == images.shape


@pytest.mark.parametrize("fill", ["random", "zero"])
def test_random_erasing_probability_one_changes_every_image(fill):
    images = jnp.full(_SMALL, 0.5, jnp.float32)
    out = ev.random_erasing(jax.random.key(3), images, probability=1.0, fill=fill)
    assert _erased_mask(images, out).any(axis=(1, 2)).all()


def _boxes(area_range, aspect_range, key):
    """Erases a constant image with zeros; returns (mask, box heights, box widths)."""
    images = jnp.full(_LARGE, 0.5, jnp.float32)
    out = np.asarray(
        ev.random_erasing(key, images, probability=1.0, area_range=area_range, aspect_range=aspect_range, fill="zero")
    )
    zero = np.all(out == 0.0, axis=-1)
    # Only zeros were written, on all channels together, and nothing else changed.
    np.testing.assert_array_equal(zero, _erased_mask(images, out))
    rows, cols = zero.any(axis=2), zero.any(axis=1)
    # Each erased region is one axis-aligned rectangle.
    np.testing.assert_array_equal(zero, rows[:, :, None] & cols[:, None, :])
    return rows, rows.sum(1).astype(float), cols.sum(1).astype(float)


@pytest.mark.parametrize(
    "area_range, aspect_range",
    [
        ((0.05, 0.3), (0.5, 2.0)),
        ((0.02, 0.4), (0.3, 1 / 0.3)),  # The defaults (Zhong 2020).
    ],
)
def test_random_erasing_area_aspect_and_rectangle(area_range, aspect_range):
    _, height, width, _ = _LARGE
    area = height * width
    rows, box_h, box_w = _boxes(area_range, aspect_range, jax.random.key(7))
    fraction = box_h * box_w / area
    # Sides are the drawn sqrt(S * r), sqrt(S / r) rounded, so S lies in
    # [(h - 1/2)(w - 1/2), (h + 1/2)(w + 1/2)] and r in [(h - 1/2)/(w + 1/2), (h + 1/2)/(w - 1/2)].
    assert np.all((box_h - 0.5) * (box_w - 0.5) <= area_range[1] * area)
    assert np.all((box_h + 0.5) * (box_w + 0.5) >= area_range[0] * area)
    assert np.all((box_h - 0.5) / (box_w + 0.5) <= aspect_range[1])
    assert np.all((box_h + 0.5) / (box_w - 0.5) >= aspect_range[0])
    # Over many draws the measured fraction lies in (about) area_range and spans it.
    assert fraction.min() >= 0.85 * area_range[0] and fraction.max() <= 1.05 * area_range[1]
    assert fraction.min() < area_range[0] + 0.03 and fraction.max() > area_range[1] - 0.06
    # Uniform area fraction, biased low only by the rejection of boxes that do not fit.
    middle = sum(area_range) / 2
    assert middle - 0.05 < fraction.mean() < middle + 0.01
    # Positions are spread over the image, not pinned to a corner.
    tops = rows.argmax(1)
    assert tops.min() == 0 and (tops + box_h).max() == height and len(set(tops)) > 10


def test_random_erasing_probability_is_per_image():
    images = jnp.full(_LARGE, 0.5, jnp.float32)
    out = ev.random_erasing(jax.random.key(5), images, probability=0.5, fill="zero")
    erased = _erased_mask(images, out).any(axis=(1, 2)).mean()
    assert 0.4 < erased < 0.6  # Binomial(400, 0.5): sd 0.025.


def test_random_erasing_fill_values():
    images = jnp.zeros(_SMALL, jnp.float32)
    out = np.asarray(ev.random_erasing(jax.random.key(2), images, probability=1.0, data_range=(2.0, 3.0)))
    erased = out[out != 0.0]
    assert erased.size > 0 and erased.min() >= 2.0 and erased.max() < 3.0
    assert np.unique(erased).size > 100  # Independent values per pixel and channel.
    out = np.asarray(ev.random_erasing(jax.random.key(2), images, probability=1.0, fill=0.25))
    assert set(np.unique(out)) == {0.0, 0.25}
    out = np.asarray(ev.random_erasing(jax.random.key(2), images, probability=1.0, fill=(0.1, 0.2, 0.3)))
    mask = out[..., 0] != 0
    np.testing.assert_allclose(out[mask], np.tile([0.1, 0.2, 0.3], (mask.sum(), 1)), rtol=1e-6)


def test_random_erasing_deterministic_and_jittable():
    images = jax.random.uniform(jax.random.key(4), _SMALL)
    key = jax.random.key(9)
    first = ev.random_erasing(key, images, probability=1.0)
    again = ev.random_erasing(key, images, probability=1.0)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    other = ev.random_erasing(jax.random.key(10), images, probability=1.0)
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    jitted = jax.jit(functools.partial(ev.random_erasing, probability=1.0))
    np.testing.assert_array_equal(np.asarray(jitted(key, images)), np.asarray(first))


def test_erased_test_set_matches_random_erasing_for_any_batch_size():
    images = np.random.default_rng(0).uniform(size=_SMALL).astype(np.float32)
    key = jax.random.key(12)
    whole = np.asarray(ev.random_erasing(key, images, probability=1.0, fill="zero"))
    chunked = ev.erased_test_set(key, images, batch_size=32, fill="zero")
    assert isinstance(chunked, np.ndarray)
    np.testing.assert_array_equal(chunked, whole)
    with pytest.raises(ValueError, match="batch_size"):
        ev.erased_test_set(key, images, batch_size=0)
    with pytest.raises(ValueError, match="unknown"):
        ev.erased_test_set(key, images, area=(0.1, 0.2))


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (np.zeros((8, 8, 3), np.float32), {}, "shape"),
        (np.zeros((2, 8, 8, 3), np.uint8), {}, "floating"),
        (np.zeros((2, 8, 8, 3), np.float32), {"probability": 1.5}, "probability"),
        (np.zeros((2, 8, 8, 3), np.float32), {"area_range": (0.0, 0.4)}, "area_range"),
        (np.zeros((2, 8, 8, 3), np.float32), {"area_range": (0.5, 0.2)}, "area_range"),
        (np.zeros((2, 8, 8, 3), np.float32), {"area_range": (0.1, 1.5)}, "area_range"),
        (np.zeros((2, 8, 8, 3), np.float32), {"aspect_range": (0.0, 2.0)}, "aspect_range"),
        (np.zeros((2, 8, 8, 3), np.float32), {"data_range": (1.0, 0.0)}, "data_range"),
        (np.zeros((2, 8, 8, 3), np.float32), {"fill": "ones"}, "fill"),
        (np.zeros((2, 8, 8, 3), np.float32), {"fill": (0.1, 0.2)}, "fill"),
        (np.zeros((2, 8, 8, 3), np.float32), {"max_attempts": 0}, "max_attempts"),
    ],
)
def test_random_erasing_rejects_bad_input(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ev.random_erasing(jax.random.key(0), images, **kwargs)


# ----------------------------------------------------------------------------------------------
# figures.py


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size  # (width, height)


def test_saliency_figure_writes_grid_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 8, 8, 3))
    maps = {"baseline": rng.uniform(size=(2, 8, 8)), "0-occlusion": rng.uniform(size=(2, 8, 8))}
    path = ev.saliency_figure(
        images, maps, tmp_path / "new" / "dir" / "grid.png", row_labels=["car", "plane"], title="Grad-CAM"
    )
    assert path.exists()
    width, height = _png_size(path)
    assert 1.2 < width / height < 1.8  # 3 square columns, 2 rows, plus margins.
    # One more column widens the figure by about one cell; rows set the height.
    maps["R-occlusion"] = rng.uniform(size=(2, 8, 8))
    wider = ev.saliency_figure(images, maps, tmp_path / "wider.png", row_labels=["car", "plane"], title="Grad-CAM")
    width4, height4 = _png_size(wider)
    assert height4 == height
    assert 0.85 * width / 3 < width4 - width < 1.15 * width / 3
    # Wide images make flat cells.
    flat = ev.saliency_figure(np.zeros((3, 4, 16, 1)), {"m": np.zeros((3, 4, 16))}, str(tmp_path / "flat.png"))
    flat_w, flat_h = _png_size(flat)
    assert flat_w > 1.8 * flat_h  # 2 cells of 4:1 side by side over 3 rows: about 8:3.


def test_saliency_figure_overlays_heat_map(tmp_path):
    images = np.zeros((1, 8, 8, 1))  # Black input.
    path = ev.saliency_figure(images, {"hot": np.ones((1, 8, 8))}, tmp_path / "overlay.png")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    half = pixels.shape[1] // 2
    left, right = pixels[:, :half], pixels[:, half:]
    dark = left.sum(-1) < 30
    assert dark.mean() > 0.3  # The black input.
    assert np.all(np.abs(left[dark][:, 0] - left[dark][:, 2]) < 10)  # Grey, no colour.
    # jet(1.0) is dark red; at alpha 0.5 over black it stays clearly red.
    assert ((right[..., 0] - right[..., 2] > 40) & (right[..., 1] < 30)).mean() > 0.3


def test_saliency_figure_rejects_bad_input(tmp_path):
    images = np.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match="0-occlusion"):
        ev.saliency_figure(
            images, {"baseline": np.zeros((2, 8, 8)), "0-occlusion": np.zeros((2, 8, 7))}, tmp_path / "bad.png"
        )
    with pytest.raises(ValueError, match="baseline"):
        ev.saliency_figure(images, {"baseline": np.full((2, 8, 8), 2.0)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="channels"):
        ev.saliency_figure(np.zeros((2, 8, 8, 2)), {}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="row_labels"):
        ev.saliency_figure(images, {}, tmp_path / "bad.png", row_labels=["one"])
    with pytest.raises(ValueError, match="cmap"):
        ev.saliency_figure(images, {}, tmp_path / "bad.png", cmap="no-such-map")
    assert not (tmp_path / "bad.png").exists()


def test_training_curves_figure(tmp_path):
    history = {
        "baseline": [{"step": s, "loss": 1.0 / (s + 1), "accuracy": s / 10} for s in range(5)],
        "0-occlusion": [{"step": s, "loss": 1.2 / (s + 1), "split": "train"} for s in (4, 0, 2)],
    }
    path = ev.training_curves_figure(history, tmp_path / "curves" / "c.png", title="curves")
    width, height = _png_size(path)
    assert width > 2 * height * 0.9  # Two panels (loss, accuracy) side by side.
    single = ev.training_curves_figure(history, tmp_path / "loss.png", metrics=["loss"])
    assert _png_size(single)[0] < width
    with pytest.raises(ValueError, match="nope"):
        ev.training_curves_figure(history, tmp_path / "x.png", metrics=["nope"])
    with pytest.raises(ValueError, match="step"):
        ev.training_curves_figure({"a": [{"loss": 1.0}]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty"):
        ev.training_curves_figure({}, tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------
# report.py


def test_metrics_table_table1_shape():
    columns = {
        "FT-ResNet50": {"accuracy": 0.846, "precision_macro": 0.853, "recall_macro": 0.846, "f1_macro": 0.845},
        "0-occlusion": {"accuracy": 0.875, "precision_macro": 0.880, "recall_macro": 0.875, "f1_macro": 0.874},
        "R-occlusion": {"accuracy": 0.864, "precision_macro": 0.869, "recall_macro": 0.863, "f1_macro": 0.862},
    }
    expected = (
        "| Metric | FT-ResNet50 | 0-occlusion | R-occlusion |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| Accuracy | 0.846 | **0.875** | 0.864 |\n"
        "| Macro Precision | 0.853 | **0.880** | 0.869 |\n"
        "| Macro Recall | 0.846 | **0.875** | 0.863 |\n"
        "| Macro F1 | 0.845 | **0.874** | 0.862 |\n"
    )
    assert ev.metrics_table(columns, rows=("accuracy", "precision_macro", "recall_macro", "f1_macro")) == expected


def test_metrics_table_mean_std_ties_missing_and_per_class():
    columns = {
        "baseline": {
            "accuracy": {"mean": 0.6712, "std": 0.0104},
            "true_positive_rate": {"bar": 0.31, "kitchen": 0.894},
        },
        "0-occlusion": {
            "accuracy": {"mean": 0.6749, "std": 0.0051},
            "true_positive_rate": {"bar": 0.32, "kitchen": 0.9},
        },
    }
    expected = (
        "| Metric | baseline | 0-occlusion |\n"
        "| --- | ---: | ---: |\n"
        "| TPR bar | 0.31 | **0.32** |\n"
        "| TPR kitchen | 0.89 | **0.90** |\n"
        "| Accuracy | **0.67 ± 0.01** | **0.67 ± 0.01** |\n"  # Equal when printed: both bold.
        "| Weighted F1 | n/a | n/a |\n"
    )
    table = ev.metrics_table(columns, rows=("accuracy", "f1_weighted"), per_class=True, decimals=2)
    assert table == expected


def test_metrics_table_default_rows_single_column_and_escaping():
    m = ev.classification_metrics(_LABELS, _PREDICTIONS, 4)
    expected = (
        "| Metric | a\\|b |\n"
        "| --- | ---: |\n"
        "| Accuracy | 0.625 |\n"
        "| Macro Precision | 0.354 |\n"  # 17/48
        "| Macro Recall | 0.417 |\n"  # 5/12
        "| Macro F1 | 0.381 |\n"  # 8/21
        "| Weighted Precision | 0.531 |\n"  # 17/32
        "| Weighted Recall | 0.625 |\n"
        "| Weighted F1 | 0.571 |\n"
    )  # 4/7
    assert ev.metrics_table({"a|b": m}) == expected


def test_metrics_table_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        ev.metrics_table({})
    with pytest.raises(ValueError, match="accuracy"):
        ev.metrics_table({"a": {"accuracy": [0.5]}}, rows=("accuracy",))
    with pytest.raises(ValueError, match="true_positive_rate"):
        ev.metrics_table({"a": {"accuracy": 0.5}}, per_class=True)
    with pytest.raises(ValueError, match="rows"):
        ev.metrics_table({"a": {"accuracy": 0.5}}, rows="accuracy")


def test_robustness_table_table4_shape():
    clean = {
        "FT-ResNet50": {"accuracy": 0.67, "recall_weighted": 0.67},
        "0-occlusion": {"accuracy": 0.68, "recall_weighted": 0.68},
    }
    erased = {
        "FT-ResNet50": {"accuracy": 0.59, "recall_weighted": 0.59},
        "0-occlusion": {"accuracy": 0.60, "recall_weighted": 0.65},
    }
    expected = (
        "| Metric | FT-ResNet50 clean | FT-ResNet50 erased | FT-ResNet50 drop "
        "| 0-occlusion clean | 0-occlusion erased | 0-occlusion drop |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| Accuracy | 0.67 | 0.59 | **-0.08** | 0.68 | **0.60** | **-0.08** |\n"
        "| Weighted Recall | 0.67 | 0.59 | -0.08 | 0.68 | **0.65** | **-0.03** |\n"
    )
    table = ev.robustness_table(clean, erased, rows=("accuracy", "recall_weighted"), decimals=2)
    assert table == expected


def test_robustness_table_mean_std_and_zero_drop():
    clean = {"x": {"accuracy": {"mean": 0.5, "std": 0.02}, "f1_macro": 0.4}}
    erased = {"x": {"accuracy": {"mean": 0.5001, "std": 0.03}, "f1_macro": 0.1}}
    expected = (
        "| Metric | x clean | x erased | x drop |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| Accuracy | 0.500 ± 0.020 | 0.500 ± 0.030 | +0.000 |\n"
        "| Macro F1 | 0.400 | 0.100 | -0.300 |\n"
    )
    assert ev.robustness_table(clean, erased, rows=("accuracy", "f1_macro")) == expected
    with pytest.raises(ValueError, match="same arms"):
        ev.robustness_table(clean, {"y": {"accuracy": 0.1}})
