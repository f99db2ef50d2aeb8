"""``experiments/configs/vit_mnist.py:runlocal`` end to end: distraction training of a (tiny) ViT through the
experiment runner, Grad-CAM read from the token grid of ``encoder_norm``."""

from __future__ import annotations

import json
import math

import recorded
from saliency_jax import experiment


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_vit_mnist_runlocal_experiment(tmp_path):
    config = recorded.load_config("vit_mnist", "runlocal")
    assert config.model.name == "vit" and config.dataset.name == "digits"  # no files needed
    out = experiment.run_experiment(config, tmp_path, progress=False, compilation_cache="off")
    assert out["arms"] == ["baseline", "0-occlusion"]
    for arm in out["arms"]:
        accuracy = out["runs"][arm][0]["metrics"]["classification"]["accuracy"]
        assert math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0, (arm, accuracy)

    logged = _records(tmp_path / "0-occlusion" / "seed0" / "metrics.jsonl")
    steps = [r for r in logged if "occluded" in r]
    assert steps, logged
    for r in steps:
        assert "distraction_degenerate_maps" in r, r
        assert r["occluded"] == 1.0  # probability 1 in the runlocal arm: Grad-CAM on the token grid every step
        assert 0.0 <= r["distraction_degenerate_maps"] <= 1.0
        assert math.isfinite(r["accuracy"]) and math.isfinite(r["loss"])
    baseline = _records(tmp_path / "baseline" / "seed0" / "metrics.jsonl")
    assert baseline and not any("occluded" in r for r in baseline)
    assert all(math.isfinite(r["accuracy"]) for r in baseline if "accuracy" in r)
