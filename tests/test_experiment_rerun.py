"""The experiment runner: a rerun of a finished experiment reuses the stored evaluations and keeps the original
training wall times; the progress bars name the arm and the seed."""

import dataclasses
import json
import logging
import re
import shutil

import pytest

from saliency_jax import evaluators
from saliency_jax import experiment
from saliency_jax import train as train_lib
from saliency_jax.config import default_config
from saliency_jax.evaluators.base import Evaluator, EvaluatorSettings, register_evaluator

CALLS = []


@dataclasses.dataclass(frozen=True)
class _CounterSettings(EvaluatorSettings):
    scale: float = 1.0


@register_evaluator("test_rerun_counter", _CounterSettings)
def _counter(settings):
    def evaluate(run, data):
        CALLS.append((run.workdir.parent.name, int(run.state.step)))
        return {"value": settings.scale * len(CALLS)}

    return Evaluator(evaluate)


def tiny_experiment():
    c = default_config()
    c.dataset.image_size = 16
    c.model.kwargs = {"widths": (4, 8, 8)}
    c.batch_size = 8
    c.eval_batch_size = 64
    c.num_steps = 4
    c.log_every = 2
    c.checkpoint_every = 4
    c.evaluators = ("test_rerun_counter",)
    c.test_rerun_counter = evaluators.settings_section("test_rerun_counter")
    c.experiment.arms = (("plain", {}), ("other", {"optimizer": {"learning_rate": 3e-3}}))
    return c


def test_rerun_reuses_evaluations_and_wall_times_and_bars_name_the_arm(tmp_path, monkeypatch):
    descs = []
    real_tqdm = train_lib.tqdm

    def recording_tqdm(*args, **kwargs):
        descs.append(kwargs.get("desc"))
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(train_lib, "tqdm", recording_tqdm)
    CALLS.clear()
    first = experiment.run_experiment(tiny_experiment(), tmp_path / "exp", progress=True)
    assert descs == ["plain seed0", "other seed0"]
    assert CALLS == [("plain", 4), ("other", 4)]
    stored = {arm: json.loads((tmp_path / "exp" / arm / "seed0" / "run.json").read_text()) for arm in first["arms"]}
    assert all(r["train_seconds"] > 0 for r in stored.values())

    second = experiment.run_experiment(tiny_experiment(), tmp_path / "exp", progress=False)
    assert CALLS == [("plain", 4), ("other", 4)]  # nothing evaluated again
    for arm in first["arms"]:
        again = json.loads((tmp_path / "exp" / arm / "seed0" / "run.json").read_text())
        assert again == stored[arm]  # the original train and eval seconds, and metrics
        assert second["runs"][arm] == first["runs"][arm]
    assert second["train_seconds"] == pytest.approx(first["train_seconds"])

    # Changed evaluator settings: evaluated again (the training is still reused).
    c = tiny_experiment()
    c.test_rerun_counter.scale = 2.0
    third = experiment.run_experiment(c, tmp_path / "exp", progress=False)
    assert CALLS[2:] == [("plain", 4), ("other", 4)]
    assert third["runs"]["plain"][0]["train_seconds"] == first["runs"]["plain"][0]["train_seconds"]
    assert third["runs"]["plain"][0]["metrics"]["test_rerun_counter"] == {"value": 6.0}


def test_evaluations_belong_to_the_model_they_measured(tmp_path, caplog):
    c = tiny_experiment()
    c.experiment.arms = (("plain", {}),)
    run_dir = tmp_path / "exp" / "plain" / "seed0"
    CALLS.clear()
    first = experiment.run_experiment(c, tmp_path / "exp", progress=False)
    stored = json.loads((run_dir / "run.json").read_text())
    restored = train_lib.train(c, run_dir, progress=False)  # finished: restored from its checkpoint
    assert stored["checkpoint"] == experiment.model_digest(restored)

    # The checkpoints deleted to start over (as the error for a damaged one suggests) and the run retrained with
    # another learning rate: the stored evaluations measured the old model, so they are not reused.
    shutil.rmtree(run_dir / "checkpoints")
    c.optimizer.learning_rate = 3e-3
    with caplog.at_level(logging.WARNING):
        second = experiment.run_experiment(c, tmp_path / "exp", progress=False)
    assert re.search(r"run\.json holds the evaluations of another model .*evaluating again", caplog.text)
    assert CALLS == [("plain", 4), ("plain", 4)]
    assert second["runs"]["plain"][0]["metrics"]["test_rerun_counter"] == {"value": 2.0}
    assert first["runs"]["plain"][0]["metrics"]["test_rerun_counter"] == {"value": 1.0}
    again = json.loads((run_dir / "run.json").read_text())
    assert again["checkpoint"] == experiment.model_digest(train_lib.train(c, run_dir, progress=False))
    assert again["checkpoint"] != stored["checkpoint"]
    assert again["train_seconds"] > 0 and again["train_seconds"] != stored["train_seconds"]

    # The same model: reused. An edited record (its SHA-256 no longer matches): evaluated again.
    experiment.run_experiment(c, tmp_path / "exp", progress=False)
    assert len(CALLS) == 2
    edited = {**again, "evaluations": {"test_rerun_counter": {**again["evaluations"]["test_rerun_counter"],
                                                              "metrics": {"value": 0.5}}}}
    (run_dir / "run.json").write_text(json.dumps(edited))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = experiment.run_experiment(c, tmp_path / "exp", progress=False)
    assert "run.json does not match its SHA-256" in caplog.text
    assert len(CALLS) == 3 and third["runs"]["plain"][0]["metrics"]["test_rerun_counter"] == {"value": 3.0}
