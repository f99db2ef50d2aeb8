"""TensorBoard event files in a run's workdir: the logged metrics as scalars, the saliency maps as images."""

import json

import numpy as np
import pytest

from saliency_jax import evaluators
from saliency_jax import train as train_lib
from saliency_jax import workdirs
from saliency_jax.config import default_config


def tiny_config():
    c = default_config()
    c.dataset.image_size = 16
    c.dataset.augment = dict(hflip=False, rotation=0.0, channel_shift=0.0, brightness=(1.0, 1.0))
    c.model.kwargs = {"widths": (4, 8, 8)}
    c.batch_size = 8
    c.eval_batch_size = 64
    c.num_steps = 8
    c.log_every = 2
    c.checkpoint_every = 4
    return c


def test_train_writes_metrics_to_tensorboard(tmp_path):
    result = train_lib.train(tiny_config(), tmp_path / "run", progress=False)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    scalars = workdirs.read_tensorboard_scalars(tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    for key in ("loss", "accuracy"):
        assert [s for s, _ in scalars[key]] == [2, 4, 6, 8]
        np.testing.assert_allclose([v for _, v in scalars[key]], [r[key] for r in log], rtol=1e-6)

    # The saliency_maps evaluator adds its overlays, at the final step.
    c = tiny_config()
    c.evaluators = ("saliency_maps",)
    c.saliency_maps = evaluators.settings_section("saliency_maps", examples=2)
    evaluator = evaluators.build_evaluators(c)["saliency_maps"]
    evaluator.evaluate(result, evaluators.ExperimentData(c))
    assert workdirs.tensorboard_image_tags(tmp_path / "run") == ["saliency_maps/grad_cam"]


def test_resumed_launch_purges_the_events_after_its_checkpoint(tmp_path):
    c = tiny_config()
    c.num_steps = 4
    train_lib.train(c, tmp_path / "run", progress=False)
    c.num_steps = 8
    train_lib.train(c, tmp_path / "run", progress=False)
    scalars = workdirs.read_tensorboard_scalars(tmp_path / "run")
    assert [s for s, _ in scalars["loss"]] == [2, 4, 6, 8]  # two launches, one line per log step
    # The second launch's file starts with the purge marker at the first step it logs (TensorBoard drops older
    # events at or after it): SessionLog START with step 5.
    files = sorted((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    events = list(workdirs._tensorboard_events(tmp_path / "run"))
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert 5 in starts


def test_metrics_log_rejects_bad_images(tmp_path):
    log = workdirs.MetricsLog(tmp_path)
    try:
        with pytest.raises(ValueError, match="images must be"):
            log.write_images(0, "x", np.zeros((4, 4, 3)))
    finally:
        log.close()


def test_evaluators_results_and_run_figures_go_to_tensorboard(tmp_path):
    """Every evaluator's numeric entries (nested dicts flattened) as ``eval/<evaluator>/<entry>`` at the final step,
    and the PNG figures of the run's folder as images; a rerun that reuses the stored evaluations writes nothing."""
    from saliency_jax import experiment

    c = tiny_config()
    c.num_steps = 2
    c.evaluators = ("classification", "training_curves")
    result = train_lib.train(c, tmp_path / "run", progress=False)
    from PIL import Image

    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "run" / "masks.png")  # a figure a trainer leaves
    record = experiment.evaluate_run(result, evaluators.build_evaluators(c), evaluators.ExperimentData(c))
    scalars = workdirs.read_tensorboard_scalars(tmp_path / "run")
    metrics = record.metrics["classification"]
    assert scalars["eval/classification/accuracy"] == [(2, pytest.approx(metrics["accuracy"]))]
    assert scalars["eval/classification/true_positive_rate/3"] == [
        (2, pytest.approx(metrics["true_positive_rate"]["3"]))]
    assert scalars["eval/training_curves/loss"] == [(2, pytest.approx(record.metrics["training_curves"]["loss"]))]
    assert not [k for k in scalars if "confusion_matrix" in k]  # lists are not scalars
    assert workdirs.tensorboard_image_tags(tmp_path / "run") == ["figures/masks"]
    experiment.evaluate_run(result, evaluators.build_evaluators(c), evaluators.ExperimentData(c))  # all reused
    assert workdirs.read_tensorboard_scalars(tmp_path / "run") == scalars


def test_scalar_entries_and_headlines():
    metrics = {"examples": 10, "accuracy": {"clean": 0.9, "noise": 0.5}, "layer": "conv3", "ok": True,
               "curve": [0.1, 0.2]}
    assert evaluators.scalar_entries(metrics) == {"examples": 10, "accuracy.clean": 0.9, "accuracy.noise": 0.5}
    assert evaluators.headline("backgrounds", metrics) == ("accuracy.clean", 0.9)  # the first non-count entry
    fgsm = {"examples": 5, "accuracy": {"0.00000": 0.9, "0.03137": 0.2}}
    assert evaluators.headline("fgsm", fgsm) == ("accuracy.0.03137", 0.2)  # the largest epsilon, as registered
    assert evaluators.headline("classification", {"num_examples": 3}) is None
    assert evaluators.headline("training_curves", {"accuracy": 0.5, "loss": 1.5}) == ("loss", 1.5)  # registered
    assert evaluators.headline("training_curves", {"accuracy": 0.5}) == ("accuracy", 0.5)  # loss not logged
    assert evaluators.headline("not_an_evaluator", metrics) is None
