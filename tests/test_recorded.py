"""Recorded results stay bit-identical: each case of tests/recorded.py run now equals its fingerprint recorded on
main e840573, before the loop redesign (every kept checkpoint's arrays, every metrics-log line, every evaluation).

The slow cases (the background-invariance Table 1 and Excitation Dropout ``:runlocal`` experiments, 3-6 min each on
2 cores; the digits quickstart and the Excitation Dropout MNIST runner as their docstrings launch them) run with
``-m slow``; the MNIST one needs ../shared/data/mnist.
"""

from __future__ import annotations

import json

import pytest

import recorded

FAST = ["digits_runlocal", "background_invariance_straight"]

#: Diagnostics that schemes log since the recording (metric name -> the issue that added it). They are new keys of a
#: log line, dropped from the lines before comparing; every value that was recorded still compares bit for bit.
ADDED_METRICS = {
    "distraction_degenerate_maps": "training on any JAX model (the fraction of degenerate Grad-CAM maps)",
    "hnc_degenerate_maps": "training on any JAX model",
    "guidance_degenerate_maps": "training on any JAX model",
}


def _without_added(lines):
    return None if lines is None else [{k: v for k, v in line.items() if k not in ADDED_METRICS} for line in lines]
SLOW = ["background_invariance_runlocal", "excitation_dropout_runlocal", "digits_quickstart", "excitation_dropout_mnist"]


def _compare(name, tmp_path):
    path = recorded.RECORDED / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} was not recorded")
    expected = json.loads(path.read_text())
    got = recorded.record(name, tmp_path)
    for run in sorted(expected["run_dirs"] if "run_dirs" in expected else [None]):
        want = expected["run_dirs"][run] if run else expected
        have = got["run_dirs"][run] if run else got
        for step, digests in want.get("checkpoints", {}).items():
            assert step in have["checkpoints"], f"{name} {run}: no checkpoint at step {step}"
            for field, digest in digests.items():  # a state that gained a field still compares on the old ones
                assert have["checkpoints"][step][field] == digest, f"{name} {run}: step {step} {field} differs"
        assert sorted(have.get("checkpoints", {})) == sorted(want.get("checkpoints", {})), f"{name} {run}"
        assert _without_added(have.get("metrics_log")) == want.get("metrics_log"), f"{name} {run}: metrics.jsonl differs"
        assert have.get("evaluations") == want.get("evaluations"), f"{name} {run}: evaluations differ"
        assert have.get("previews") == want.get("previews"), f"{name} {run}: previews differ"
    if "summary" in expected:
        assert got["summary"] == expected["summary"] and got["runs"] == expected["runs"]


@pytest.mark.parametrize("name", FAST)
def test_recorded_results_are_unchanged(name, tmp_path):
    _compare(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_recorded_paper_runs_are_unchanged(name, tmp_path):
    if name == "excitation_dropout_mnist" and not (recorded.REPO.parent / "shared" / "data" / "mnist").is_dir():
        pytest.skip("../shared/data/mnist is not here")
    _compare(name, tmp_path)
