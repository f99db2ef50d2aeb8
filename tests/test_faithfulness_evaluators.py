"""The "faithfulness" evaluator against hand-computed values on a linear model with fixed weights.

The model is ``logits = W^T vec(x) + b`` on 2 x 2 grey images (4 pixels, 3 classes), so the vanilla gradient map of
class ``t`` is ``|W[:, t]|`` per pixel, and every deletion / insertion curve is a softmax of known logits: the
expected values are computed here with NumPy, step by step, as the papers define them.
"""

import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import scipy.stats

from saliency_jax import evaluators
from saliency_jax.evaluators.base import ReportContext, RunRecord
from saliency_jax.evaluators.faithfulness import FaithfulnessSettings

W = np.array([[0.9, -0.2, 0.1],
              [-0.4, 0.7, 0.3],
              [0.2, 0.1, -1.1],
              [0.05, -0.6, 0.5]], np.float32)  # [pixels, classes]
B = np.array([0.1, -0.1, 0.0], np.float32)
W_RANDOM = np.array([[0.3, 0.2, -0.5],
                     [0.8, -0.1, 0.4],
                     [-0.6, 0.9, 0.2],
                     [0.1, 0.5, -0.7]], np.float32)
IMAGES = np.array([[0.9, 0.8, 0.1, 0.3], [0.2, 0.9, 0.4, 0.1], [0.5, 0.1, 0.2, 0.95]], np.float32)
REGIONS = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], np.float32)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


class Source:
    num_classes = 3

    def __len__(self):
        return len(IMAGES)

    def __getitem__(self, i):
        return {"image": IMAGES[i].reshape(2, 2, 1), "label": np.int32(0), "region": REGIONS[i].reshape(2, 2)}


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def expected(image, weights, bias, *, mode):
    """Deletion (to 0) or insertion (into a 0 canvas) curve and AUC, one pixel per step, by hand."""
    t = int(np.argmax(image @ weights + bias))
    order = np.argsort(-np.abs(weights[:, t]), kind="stable")
    curve = []
    for k in range(len(image) + 1):
        changed = np.zeros(len(image), bool)
        changed[order[:k]] = True
        x = np.where(changed, 0.0, image) if mode == "deletion" else np.where(changed, image, 0.0)
        curve.append(softmax(x @ weights + bias)[t])
    curve = np.asarray(curve)
    return t, (curve.sum() - curve[0] / 2 - curve[-1] / 2) / (len(curve) - 1)


def make_run(tmp_path):
    variables = {"params": {"fc": {"kernel": W, "bias": B}}}
    config = ml_collections.ConfigDict({
        "seed": 0, "dataset": {"name": "fake", "image_size": None},
        "model": {"name": "linear", "grad_cam_layer": "fc", "classifier": "fc"}})
    return types.SimpleNamespace(model=Linear(), variables=variables, config=config, workdir=tmp_path,
                                 state=types.SimpleNamespace(step=1))


def test_faithfulness_evaluator_matches_hand_computed_values(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    # The re-initialised weights: W_RANDOM, bias 0 (the evaluator draws them from the model's initialiser).
    monkeypatch.setattr(Linear, "init", lambda self, *a, **k: {"params": {"fc": {"kernel": W_RANDOM,
                                                                                  "bias": np.zeros(3, np.float32)}}})
    settings = FaithfulnessSettings(methods=("gradient",), examples=0, insertion_substrate=0.0, pixels_per_step=1,
                                    randomization_examples=3)
    evaluator = evaluators.faithfulness_evaluator(settings)
    data = types.SimpleNamespace(test_source=lambda config: Source())
    metrics = evaluator.evaluate(run, data)
    got = metrics["methods"]["gradient"]

    deletion = [expected(x, W, B, mode="deletion") for x in IMAGES]
    insertion = [expected(x, W, B, mode="insertion") for x in IMAGES]
    np.testing.assert_allclose(got["per_image"]["deletion_auc"], [a for _, a in deletion], rtol=1e-5)
    np.testing.assert_allclose(got["per_image"]["insertion_auc"], [a for _, a in insertion], rtol=1e-5)
    assert got["deletion_auc"] == pytest.approx(np.mean([a for _, a in deletion]), rel=1e-5)

    targets = [t for t, _ in deletion]
    maps = np.abs(W[:, targets].T)  # [3 images, 4 pixels]
    mass = [(m * r).sum() / m.sum() for m, r in zip(maps, REGIONS)]
    assert got["relevance_mass"] == pytest.approx(np.mean(mass), rel=1e-5)

    # One layer ("fc", the only module with parameters): the map after re-initialisation is |W_RANDOM[:, t]| of the
    # trained model's predicted class t.
    rank = [scipy.stats.spearmanr(np.abs(W[:, t]), np.abs(W_RANDOM[:, t]))[0] for t in targets]
    assert got["randomization"]["layers"] == ["fc"]
    assert got["randomization"]["spearman_abs"][0] == pytest.approx(np.mean(rank), rel=1e-5)

    # The report: one row per arm and method.
    record = RunRecord(arm="plain", seed=0, workdir=tmp_path, config=run.config, metrics={"faithfulness": metrics})
    section = evaluator.report(ReportContext(config=run.config, arms=["plain"], runs={"plain": [record]},
                                             workdir=tmp_path))
    assert f"| plain | gradient | {np.mean([a for _, a in deletion]):.3f} |" in section.markdown
    assert "| gradient | " + f"{np.mean(rank):.3f} |" in section.markdown


def test_faithfulness_settings_reject_bad_values():
    with pytest.raises(ValueError, match="methods must name"):
        FaithfulnessSettings(methods=("gradcam",))
    with pytest.raises(ValueError, match="not layer methods"):
        FaithfulnessSettings(layers={"gradient": "fc"})
    with pytest.raises(ValueError, match="insertion_substrate"):
        FaithfulnessSettings(insertion_substrate="noise")
