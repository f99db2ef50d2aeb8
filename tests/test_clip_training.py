"""Clip classifiers through the project's runner (Bargal 2019, Ch. 7): clip sources and batches, the per-step
classification loss, the frame-classifier scheme, ``train()`` on clips, the ``temporal_grounding`` evaluator and the
``grounding_mnist_clips.py:runlocal`` experiment."""

import importlib.util
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax import data as data_lib
from saliency_jax import train as train_lib
from saliency_jax import training
from saliency_jax.data.clips import ClipSettings
from saliency_jax.evaluation.temporal_grounding import temporal_iou
from saliency_jax.evaluators import ExperimentData, build_evaluators
from saliency_jax.evaluators.temporal_grounding import (TemporalGroundingSettings, detection_rows,
                                                        evaluate_temporal_grounding)
from saliency_jax.models import CNNLSTM
from saliency_jax.saliency import apply_with_layers

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(arg="runlocal"):
    spec = importlib.util.spec_from_file_location("grounding_mnist_clips",
                                                  REPO / "experiments/configs/grounding_mnist_clips.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------------------------
# Losses and accuracy on per-step logits.


def test_per_step_cross_entropy_is_the_mean_over_steps_of_hand_computed_values():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
    labels = np.array([0, 3, 4], np.int32)
    expected = -np.mean(np.take_along_axis(log_softmax(logits.astype(np.float64)), labels[:, None, None], -1)[..., 0],
                        axis=1)
    loss = training.classification_loss("softmax_cross_entropy")(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)
    # Image logits [batch, classes] are unchanged by the generalisation.
    flat = training.classification_loss("softmax_cross_entropy")(jnp.asarray(logits[:, 0]), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(flat), -np.take_along_axis(log_softmax(logits[:, 0].astype(np.float64)),
                                                                     labels[:, None], -1)[:, 0], rtol=1e-5)
    # Multi-label: labels [batch, classes] broadcast over the steps; the mean over steps and classes.
    multi = rng.integers(0, 2, size=(3, 5))
    bce = training.classification_loss("sigmoid_binary_cross_entropy")(jnp.asarray(logits), jnp.asarray(multi))
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ref = -(multi[:, None] * np.log(p) + (1 - multi[:, None]) * np.log(1 - p)).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(bce), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="integer labels"):
        training.classification_loss("softmax_cross_entropy")(jnp.asarray(logits), jnp.zeros((3, 4), jnp.int32))


def test_classification_accuracy_counts_steps():
    logits = np.zeros((2, 3, 4), np.float32)
    logits[0, :, 1] = 1.0  # clip 0: class 1 at every step
    logits[1, 0, 2] = logits[1, 1, 3] = logits[1, 2, 2] = 1.0  # clip 1: 2, 3, 2
    acc = training.classification_accuracy("softmax_cross_entropy", jnp.asarray(logits), jnp.array([1, 2]))
    np.testing.assert_allclose(np.asarray(acc), [1.0, 2 / 3], rtol=1e-6)
    acc = training.classification_accuracy("softmax_cross_entropy", jnp.asarray(logits[:, 1]), jnp.array([1, 2]))
    np.testing.assert_allclose(np.asarray(acc), [1.0, 0.0])


# ----------------------------------------------------------------------------------------------------------------
# The frame-classifier scheme.


def tiny_model_and_clips(batch=3, time=4, canvas=16, seed=0):
    model = CNNLSTM(10, widths=(4, 4, 8), embed_features=16, lstm_features=8)
    clips = jax.random.uniform(jax.random.key(seed), (batch, time, canvas, canvas, 1))
    variables = model.init(jax.random.key(seed + 1), clips)
    return model, variables, clips


def test_frame_classifier_term_equals_the_cross_entropy_of_frame_logits():
    model, variables, clips = tiny_model_and_clips()
    labels = jnp.array([1, 2, 7])
    fc = apply_with_layers(model, variables, clips, capture=("fc",)).activations["fc"]
    loss, correct = training.frame_classification_loss(fc, variables["params"], "frame_classifier", labels)
    logits = np.asarray(model.apply(variables, clips.reshape(12, 16, 16, 1), method="frame_logits"),
                        np.float64).reshape(3, 4, 10)
    expected = -np.take_along_axis(log_softmax(logits), np.asarray(labels)[:, None, None], -1)[..., 0].mean(1)
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(correct), (logits.argmax(-1) == np.asarray(labels)[:, None]).mean(1))
    # The term reaches the frame classifier and the CNN, not the LSTM or its classifier.
    def total(params):
        v = {"params": params}
        fwd = apply_with_layers(model, v, clips, capture=("fc",))
        return training.frame_classification_loss(fwd.activations["fc"], params, "frame_classifier", labels)[0].sum()

    grads = jax.grad(total)(variables["params"])
    assert float(jnp.abs(grads["frame_classifier"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["conv1"]["conv"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["classifier"]["kernel"]).sum()) == 0
    with pytest.raises(ValueError, match="multiple of the batch|batch \\* time"):
        training.frame_classification_loss(fc[:5], variables["params"], "frame_classifier", labels)
    with pytest.raises(ValueError, match="no parameters"):
        training.frame_classification_loss(fc, variables["params"], "head", labels)


def test_frame_classifier_settings():
    section = training.settings_section("frame_classifier", weight=0.5)
    assert section.weight == 0.5 and section.features == "fc" and section.classifier == "frame_classifier"
    with pytest.raises(ValueError, match="weight"):
        training.FrameClassifierConfig(weight=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# Clip sources and batches.


def test_clip_specs_through_get_source_and_the_pipeline():
    train_src = data_lib.get_source("digits_clips", "train",
                                    options=dict(num_clips=10, length=3, canvas=16, clutter=1, clutter_size=4))
    test_src = data_lib.get_source("digits_clips", "test",
                                   options=dict(num_clips=10, test_clips=5, length=3, canvas=16))
    assert len(train_src) == 10 and len(test_src) == 5 and train_src.num_classes == 10
    assert train_src[0]["image"].shape == (3, 16, 16, 1)
    # The train clips use the train digits, the test clips the test digits.
    assert len(train_src.images) == 1347 and len(test_src.images) == 450
    assert data_lib.image_shape(train_src) == (3, 16, 16, 1)
    ds = data_lib.make_train_dataset(train_src, None, batch_size=4, seed=0)
    batch = next(iter(ds))
    assert batch["image"].shape == (4, 3, 16, 16, 1) and batch["label"].shape == (4,)
    assert batch["boxes"].shape == (4, 3, 4) and batch["segment"].shape == (4, 2)
    train_lib.check_batch(batch, 10, where="clips")
    eval_batches = list(data_lib.make_eval_batches(test_src, batch_size=4))
    assert eval_batches[1]["image"].shape == (4, 3, 16, 16, 1) and eval_batches[1]["mask"].tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="not augmented"):
        data_lib.make_train_dataset(train_src, None, batch_size=4, seed=0, augment_kwargs={"hflip": True})
    with pytest.raises(ValueError, match="not resized"):
        data_lib.get_source("digits_clips", "train", image_size=32, options=dict(num_clips=2))
    with pytest.raises(ValueError, match="no field 'frames'"):
        data_lib.get_source("digits_clips", "train", options=dict(frames=4))
    with pytest.raises(ValueError, match="unknown option"):
        data_lib.get_source("digits", "train", options=dict(num_clips=3))
    with pytest.raises(ValueError, match="needs data_dir"):
        data_lib.get_source("mnist_clips", "train")
    with pytest.raises(ValueError, match="rank|must be \\[batch"):
        train_lib.check_batch({"image": np.zeros((2, 1, 3, 4, 4, 1), np.float32), "label": np.zeros(2, np.int32)}, 10)
    assert set(ClipSettings.section()) >= {"num_clips", "test_clips", "length", "canvas", "clutter", "speed"}


def test_predict_averages_the_steps_probabilities():
    model, variables, clips = tiny_model_and_clips(batch=2)
    batch = {"image": np.asarray(clips), "label": np.array([3, 4], np.int32), "mask": np.ones(2, np.float32)}
    labels, preds, probs = train_lib.predict(model, variables, [batch])
    expected = np.asarray(jax.nn.softmax(model.apply(variables, clips), -1)).mean(1)
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    assert preds.tolist() == expected.argmax(-1).tolist() and labels.tolist() == [3, 4]


# ----------------------------------------------------------------------------------------------------------------
# train() on clips.


def test_train_on_clip_batches_traces_the_step_once_and_learns(tmp_path, monkeypatch):
    config = load_config()
    config.num_steps = 8
    config.log_every = 4
    config.optimizer.learning_rate = 3e-3
    original = train_lib.make_train_step
    monkeypatch.setattr(train_lib, "make_train_step",
                        lambda *a, **k: chex.assert_max_traces(original(*a, **k), n=1))
    result = train_lib.train(config, tmp_path, progress=False)
    assert result.image_shape == (6, 16, 16, 1) and int(result.state.step) == 8
    first, last = result.history[0], result.history[-1]
    for record in result.history:
        assert np.isfinite(record["loss"]) and 0 <= record["accuracy"] <= 1 and 0 <= record["frame_accuracy"] <= 1
        # The total is the per-step cross-entropy plus the frame classifier's (weight 1).
        np.testing.assert_allclose(record["loss"], record["classification_loss"]
                                   + record["frame_classification_loss"], rtol=1e-5)
    assert last["loss"] < first["loss"]


# ----------------------------------------------------------------------------------------------------------------
# The temporal_grounding evaluator.


def test_temporal_grounding_settings_and_rows():
    s = TemporalGroundingSettings(two_segment_length=8, insert_length=12, gt_lengths=(2, 5))
    assert detection_rows(s) == [("rand+gt", 8, 4), ("gt+rand", 8, 4), ("rand+gt+rand", 12, 2),
                                 ("rand+gt+rand", 12, 5)]
    with pytest.raises(ValueError, match="cell_rules"):
        TemporalGroundingSettings(cell_rules=("tanh",))
    with pytest.raises(ValueError, match="do not fit"):
        TemporalGroundingSettings(insert_length=10, gt_lengths=(9,))


def _probability_known_length_map(model, variables, source, n, num_classes, iou=0.5):
    """Slow NumPy reference of the thresholded-probability baseline with known length (Sec. 7.4.2)."""
    items = [source[i] for i in range(n)]
    clips = np.stack([it["image"] for it in items])
    labels = np.array([int(it["label"]) for it in items])
    gt = np.stack([it["segment"] for it in items])
    probs = np.asarray(jax.nn.softmax(model.apply(variables, jnp.asarray(clips)), -1), np.float64)
    p = probs[np.arange(n), :, labels]  # [n, time]
    scores = np.where(p >= 0.5, 1.0, -1.0)
    found, conf = [], []
    for k in range(n):
        length = gt[k, 1] - gt[k, 0]
        sums = [scores[k, s:s + length].sum() for s in range(scores.shape[1] - length + 1)]
        s = int(np.argmax(sums))
        found.append((s, s + length))
        conf.append(p[k, s:s + length].mean())
    hit = temporal_iou(np.array(found), gt) >= iou
    aps = []
    for c in np.unique(labels):
        mine = labels == c
        order = np.argsort(-np.array(conf)[mine], kind="stable")
        h = hit[mine][order]
        tp, fp = np.cumsum(h), np.cumsum(~h)
        recall, precision = tp / mine.sum(), tp / (tp + fp)
        # All-point interpolation: for each recall step, the best precision at that recall or beyond.
        ap, previous = 0.0, 0.0
        for i in range(len(h)):
            if h[i]:
                ap += (recall[i] - previous) * precision[i:].max()
                previous = recall[i]
        aps.append(ap)
    return float(np.mean(aps))


def test_evaluator_on_a_tiny_model_end_to_end(tmp_path):
    config = load_config()
    config.model.num_classes = 10
    model = train_lib.build_model(config, 10)
    clips = jnp.zeros((1, 6, 16, 16, 1))
    variables = model.init(jax.random.key(3), clips)
    # Scale the LSTM classifier so that probabilities cross 0.5 on some steps (a random init is near uniform).
    variables["params"]["classifier"]["kernel"] = variables["params"]["classifier"]["kernel"] * 40.0
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats={},
                                 opt_state=())
    run = train_lib.TrainResult(state=state, model=model, history=[], workdir=tmp_path, config=config,
                                image_shape=(6, 16, 16, 1), num_classes=10)
    assert list(build_evaluators(config)) == ["temporal_grounding", "training_curves"]
    s = TemporalGroundingSettings.from_mapping(config.temporal_grounding)
    data = ExperimentData(config)
    metrics = evaluate_temporal_grounding(run, data, s)
    rows = [f"{layout}/{g}" for layout, _, g in detection_rows(s)]
    keys = {"probability", "eb_r/excitation", "ceb_r/excitation", "eb_r/gradient", "ceb_r/gradient"}
    for kind in ("known", "unknown"):
        assert sorted(metrics["detection"][kind]) == sorted(rows)
        for row in rows:
            assert set(metrics["detection"][kind][row]) == keys
            assert all(0.0 <= v <= 1.0 for v in metrics["detection"][kind][row].values())
    assert set(metrics["pointing"]) == {"center", "eb", "ceb", "bp", "bp_r", "eb_r/excitation", "ceb_r/excitation",
                                        "eb_r/gradient", "ceb_r/gradient"}
    assert all(0.0 <= v <= 1.0 for v in metrics["pointing"].values())
    # Fig. 7.6 curves: one value per frame; cEB-R's boundary signal sums to ~0 per clip, so do its frame sums.
    curves = metrics["frame_sums"]["rand+gt/3"]
    assert len(curves["ceb_r/excitation"]["mean"]) == 6
    assert abs(sum(curves["ceb_r/excitation"]["mean"])) < 1e-3
    assert abs(sum(curves["eb_r/excitation"]["mean"]) - 1.0) < 1e-2  # EB-R's normalised signal sums to 1
    # The probability baseline (known length) against a slow NumPy reference on the same clips.
    for layout, length, gt in detection_rows(s):
        source = data_lib.get_source("digits_clips", "test", options={**dict(config.dataset.options), "layout": layout,
                                                                       "length": length, "gt_length": gt,
                                                                       "test_clips": s.detection_clips,
                                                                       "seed": s.seed})
        expected = _probability_known_length_map(model, variables, source, s.detection_clips, 10)
        np.testing.assert_allclose(metrics["detection"]["known"][f"{layout}/{gt}"]["probability"], expected,
                                   atol=1e-9)
    assert 0 <= metrics["classification"]["clip_accuracy_last_step"] <= 1
    assert (tmp_path / "temporal_grounding_samples.npz").exists()
    json.dumps(metrics)  # JSON-able


def test_evaluator_refuses_a_dataset_without_clips(tmp_path):
    config = load_config()
    config.dataset.name = "digits"
    model, variables, _ = tiny_model_and_clips()
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats={},
                                 opt_state=())
    run = train_lib.TrainResult(state=state, model=model, history=[], workdir=tmp_path, config=config,
                                num_classes=10)
    with pytest.raises(ValueError, match="clip dataset"):
        evaluate_temporal_grounding(run, ExperimentData(config), TemporalGroundingSettings())


def test_grounding_figures_check_their_inputs(tmp_path):
    from saliency_jax.evaluation.figures import clip_maps_figure, frame_sums_figure

    path = frame_sums_figure({"cEB-R": {"rand+GT": ([0.1, -0.1, 0.2], [0.0, 0.1, 0.1])}}, tmp_path / "f.png",
                             boundary=1.0)
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="one shape"):
        frame_sums_figure({"cEB-R": {"rand+GT": ([0.1, 0.2], [0.0])}}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="non-empty"):
        frame_sums_figure({}, tmp_path / "g.png")
    frames = np.zeros((3, 8, 8), np.float32)
    clip = {"frames": frames, "maps": {"EB-R": np.ones((3, 2, 2))}, "boxes": np.zeros((3, 4), int),
            "gt_frames": np.array([0, 1, 1], bool), "label": 4}
    assert clip_maps_figure([clip], tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="maps 'EB-R' must be"):
        clip_maps_figure([{**clip, "maps": {"EB-R": np.ones((2, 2, 2))}}], tmp_path / "d.png")
    with pytest.raises(ValueError, match="at least one clip"):
        clip_maps_figure([], tmp_path / "d.png")


# ----------------------------------------------------------------------------------------------------------------
# The runlocal experiment.


# The whole runner on clips (~90 s on 2 cores); the evaluator and clip training have their own fast tests.
@pytest.mark.slow
def test_grounding_runlocal_experiment(tmp_path):
    from saliency_jax.experiment import run_experiment

    config = load_config()
    out = run_experiment(config, tmp_path, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert "Spatiotemporal grounding" in report and "Known action length" in report
    assert "| cnn_lstm | rand+GT+rand | 6 | 4 |" in report
    assert "| center | EB | EB-R (exc) | EB-R (grad) | cEB | cEB-R (exc) | cEB-R (grad) | BP | BP-R |" in report
    for figure in ("temporal_grounding_frame_sums.png", "temporal_grounding_samples.png", "training_curves.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    metrics = out["summary"]["cnn_lstm"]["temporal_grounding"]
    assert 0 <= metrics["pointing"]["eb"] <= 1 and "rand+gt/3" in metrics["detection"]["known"]
    log = [json.loads(line) for line in (tmp_path / "cnn_lstm" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert "frame_accuracy" in log[-1] and "classification_loss" in log[-1]
