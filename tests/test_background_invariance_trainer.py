"""The background-invariance trainer (saliency_jax/trainers/background_invariance.py), the "backgrounds" evaluator
and the runlocal experiment.

References: the library's phase steps applied by hand to the same batches (the trainer must do exactly that), a
straight run (a killed-and-resumed run must equal it bit for bit), a run without the phase cache (a run starting
from the cache must equal it), and NumPy (scipy dilation + a linear model) for the evaluator's accuracies.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import re
import shutil
import sys

import flax.linen as nn
import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest
import scipy.ndimage
from jax.sharding import NamedSharding, PartitionSpec as P

from saliency_jax import data as data_lib
from saliency_jax import experiment
from saliency_jax import train as train_lib
from saliency_jax import trainers
from saliency_jax import workdirs
from saliency_jax.config import default_config
from saliency_jax.data.inputs import RunData
from saliency_jax.evaluation import backgrounds as bg
from saliency_jax.evaluators import ExperimentData, ReportContext, RunRecord, build_evaluators
from saliency_jax.evaluators import backgrounds as bg_eval
from saliency_jax.evaluators import settings_section as evaluator_section
from saliency_jax.models import AttentionCNN, VanillaCNN
from saliency_jax.models import background_invariance as bim
from saliency_jax.trainers import background_invariance as tb
from saliency_jax.trainers import supervised

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"base_features": 4, "dense_features": 16}


def tiny_config(method="adversarial", **settings):
    """scikit-learn digits at 16 px, 24 training images, batch 8: 3 steps per phase (1 epoch each)."""
    c = default_config()
    c.trainer = "background_invariance"
    c.dataset.update(dict(name="digits", image_size=16, train_limit=24, augment={}))
    c.model.name = "attention_cnn" if method == "attention" else "vanilla_cnn"
    c.model.kwargs = ({**TINY, "local_features": (8, 8, 8), "fusion_features": (16, 16)} if method == "attention"
                      else dict(TINY))
    c.batch_size = 8
    c.eval_batch_size = 64
    c.log_every = 2
    c.checkpoint_every = 2
    c.keep_checkpoints = 20
    c.evaluators = ()
    c.background_invariance = tb.settings_section(
        method=method, batch_size=8, classifier_epochs=1.0, mask_epochs=1.0, adversarial_epochs=1.0,
        attention_epochs=1.0, mask_base_features=4, generator_base_features=4, previews=2, preview_examples=3)
    c.background_invariance.update(settings)
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def logged_steps(workdir):
    return [(r["step"], r["phase"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """Every launch of the trainer jits its phases afresh; XLA's persistent cache compiles each program once."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # take the new directory even if something compiled before
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted adversarial run: phases 1-3, 3 steps each."""
    workdir = tmp_path_factory.mktemp("straight")
    return tiny_config(), train_lib.train(tiny_config(), workdir, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# The trainer.


def test_each_phase_is_the_library_step_on_the_loops_batches(straight):
    config, run = straight
    plan, full = run.plan, run.full_state
    assert [(p.name, p.begin, p.end) for p in plan.phases] == [("classifier", 0, 3), ("mask", 3, 6),
                                                                ("adversarial", 6, 9)]
    # By hand: the same initial state, the same batches in order, each phase's library step, key(seed + 1).
    source, train_idx, _, _ = train_lib.load_sources(config)
    iterator = iter(train_lib.make_train_input(config, source, train_idx))
    mesh = train_lib.make_mesh()
    repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    classifier = plan.models["classifier"]
    init_key = jax.random.key(config.seed)
    variables = classifier.init(jax.random.split(init_key, 3)[0], np.zeros((1, 16, 16, 1), np.float32))
    state = jax.jit(plan.init_state, out_shardings=repl)(variables)
    init = jax.device_get(state)
    snapshots = {}
    for phase in plan.phases:  # jitted as the trainer does, so XLA's cache has the programs
        if phase.enter is not None:  # phase 3: the classifier's Adam starts afresh (the authors' train3.py)
            state = jax.jit(phase.enter, out_shardings=repl)(state)
        step = jax.jit(phase.step, in_shardings=(repl, shard, repl), out_shardings=(repl, repl), donate_argnums=(0,))
        for s in range(phase.begin + 1, phase.end + 1):
            state, _ = step(state, jax.device_put(next(iterator), shard), jax.random.key(config.seed + 1))
        snapshots[phase.name] = jax.device_get(state)
    assert int(full.step) == 9
    assert_trees_equal(full, state)

    # Each phase changes only its own models (checkpoints at the phase ends).
    def changed(a, b):
        return {role for role in a.params if any(np.any(x != y) for x, y in zip(leaves(a.params[role]),
                                                                                leaves(b.params[role])))}

    at = {s: run.restore_full(s) for s in (3, 6, 9)}
    assert changed(init, at[3]) == {"classifier"}
    assert changed(at[3], at[6]) == {"mask_generator"}
    assert changed(at[6], at[9]) == {"classifier", "background_generator"}
    assert_trees_equal(at[6], snapshots["mask"])
    # Phase 3 began with a fresh classifier optimizer: its Adam has counted phase 3's 3 steps, not 6.
    assert adam_counts(at[6].opt_state["classifier"]) == [3] and adam_counts(at[9].opt_state["classifier"]) == [3]
    # The result is the classifier, in the generic loop's form, usable by any evaluator.
    assert isinstance(run, train_lib.TrainResult) and isinstance(run.model.module, VanillaCNN)
    assert_trees_equal(run.state.params, full.params["classifier"])
    assert_trees_equal(run.restore(6).params, at[6].params["classifier"])
    logits = run.model.apply(run.variables, np.zeros((2, 16, 16, 1), np.float32))
    assert logits.shape == (2, 10)
    # Logged at every log_every step and every phase end, with its phase.
    assert logged_steps(run.workdir) == [(2, 1), (3, 1), (4, 2), (6, 2), (8, 3), (9, 3)]
    records = [json.loads(line) for line in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"area_penalty", "total_variation", "mask_area"} <= set(records[2])
    assert {"classifier_loss", "generator_loss", "background_mean", "loss", "accuracy"} <= set(records[-1])
    # Figures: masks and the phase-3 previews (2 snapshots, at steps 7 and 9).
    previews = np.load(run.workdir / tb.PREVIEW_FILE)
    assert previews["steps"].tolist() == [7, 9] and previews["composite"].shape == (2, 3, 16, 16, 1)
    assert (run.workdir / "masks.png").is_file() and (run.workdir / "backgrounds_along_training.png").is_file()


def adam_counts(opt_state):
    return [int(np.asarray(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
            if "count" in jax.tree_util.keystr(path)]


def test_phase3_optimizer_continue_carries_phase_1_adam(tmp_path):
    # The carry-over, one flag away: phase 3 goes on with phase 1's moments and step count.
    config = tiny_config(phase3_optimizer="continue")
    run = train_lib.train(config, tmp_path / "continue", progress=False)
    assert adam_counts(run.restore_full(9).opt_state["classifier"]) == [6]
    with pytest.raises(ValueError, match="phase3_optimizer"):
        tb.check(tiny_config(phase3_optimizer="keep"))


class Killed(Exception):
    pass


def kill_at(monkeypatch, step):
    """The loop dies when it reads the batch of ``step`` (after the checkpoints of the steps before)."""
    calls = {"n": 0}
    real = train_lib.check_batch

    def check(*args, **kwargs):
        calls["n"] += 1
        if f"train step {step} " in kwargs.get("where", ""):
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(train_lib, "check_batch", check)


def test_killed_twice_and_resumed_is_bit_identical(straight, tmp_path, monkeypatch):
    config, run = straight
    workdir = tmp_path / "resumed"
    for step in (5, 8):  # mid phase 2 (last checkpoint 4), then mid phase 3 (last checkpoint 6, the phase-2 end)
        kill_at(monkeypatch, step)
        with pytest.raises(Killed):
            train_lib.train(config, workdir, progress=False)
        monkeypatch.undo()
    resumed = train_lib.train(config, workdir, progress=False)
    assert int(resumed.state.step) == 9
    assert_trees_equal(resumed.full_state, run.full_state)
    assert logged_steps(workdir) == logged_steps(run.workdir)  # what the killed launches logged past 4 / 6 is gone
    np.testing.assert_array_equal(np.load(workdir / tb.PREVIEW_FILE)["composite"],
                                  np.load(run.workdir / tb.PREVIEW_FILE)["composite"])
    # A finished run restores without training.
    again = train_lib.train(config, workdir, progress=False)
    assert again.train_seconds == 0.0
    assert_trees_equal(again.full_state, run.full_state)


def test_phase_cache_gives_the_state_the_phases_compute(straight, tmp_path):
    config, run = straight
    cache = {"phase_cache": str(tmp_path / "cache")}
    vanilla = train_lib.train(tiny_config("classifier", **cache), tmp_path / "vanilla", progress=False)
    assert int(vanilla.state.step) == 3
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].startswith("1-classifier-")
    proposal = train_lib.train(tiny_config(**cache), tmp_path / "proposal", progress=False)
    assert_trees_equal(proposal.full_state, run.full_state)  # phase 1 from the cache, phases 2-3 trained
    assert logged_steps(tmp_path / "proposal") == logged_steps(run.workdir)
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache").iterdir()) == ["classifier", "mask"]
    # A phase-3 variant starts after phase 2; another phase-1 setting misses the cache.
    variant = train_lib.train(tiny_config(generator_learning_rate=1e-3, **cache), tmp_path / "variant", progress=False)
    assert_trees_equal(variant.full_state.params["mask_generator"], run.full_state.params["mask_generator"])
    assert not np.array_equal(leaves(variant.full_state.params["background_generator"])[0],
                              leaves(run.full_state.params["background_generator"])[0])
    other = tiny_config(classifier_learning_rate=1e-4, **cache)
    assert train_lib._cache_keys(tb.build_plan(other, train_lib.validate(other).data)) != \
        train_lib._cache_keys(run.plan)


# The phase cache's integrity: every entry is verified like a checkpoint (manifest.json: the arrays' checksums, the
# SHA-256 of key.json and metrics.jsonl, written last); an entry failing any check is refused with a warning, moved
# to <cache>.damaged/ and recomputed, never used and never a crash for the runs that share it.


@pytest.fixture(scope="module")
def cached_vanilla(tmp_path_factory):
    """A vanilla run (phase 1 only, 3 steps) that wrote its phase-cache entry: the clean run every run recomputing a
    refused entry must reproduce, and a pristine cache each test copies."""
    root = tmp_path_factory.mktemp("cached_vanilla")
    run = train_lib.train(tiny_config("classifier", phase_cache=str(root / "cache")), root / "run", progress=False)
    return run, root / "cache"


def copied_cache(cached_vanilla, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(cached_vanilla[1], cache)
    (entry,) = [p for p in cache.iterdir() if p.name.startswith("1-classifier-")]
    assert sorted(p.name for p in entry.iterdir()) == ["checkpoint", "key.json", "manifest.json", "metrics.jsonl"]
    return cache, entry


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_recomputed(run, reference, cache, entry):
    """``run`` trained phase 1 again and equals the clean run; the refused entry is in ``cache.damaged`` and a valid
    one replaced it: the next run takes phase 1 from the cache, without a warning."""
    assert run.train_seconds > 0
    assert_trees_equal(run.full_state, reference.full_state)
    assert records(run.workdir) == records(reference.workdir)
    assert [p.name.startswith(entry.name) for p in (cache.parent / "cache.damaged").iterdir()] == [True]
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no temporary folder left
    again = train_lib.train(tiny_config("classifier", phase_cache=str(cache)), cache.parent / "again", progress=False)
    assert again.train_seconds == 0.0  # the whole run from the rewritten entry
    assert_trees_equal(again.full_state, reference.full_state)
    assert records(again.workdir) == records(reference.workdir)


def test_phase_cache_entry_with_a_flipped_bit_is_refused_and_recomputed(cached_vanilla, tmp_path, caplog):
    reference = cached_vanilla[0]
    cache, entry = copied_cache(cached_vanilla, tmp_path)
    # One bit of the largest array-data file (the OCDBT chunks, read without a check of their own). Where it lands
    # varies between runs (the order of the compressed chunks in the file does): inside a chunk's values it decodes to
    # a wrong array (the checksum refuses it), in a header the chunk cannot be decoded (the read refuses it).
    files = [p for p in entry.glob("checkpoint/*/state/ocdbt.process_*/d/*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        run = train_lib.train(tiny_config("classifier", phase_cache=str(cache)), tmp_path / "run", progress=False)
    assert re.search(rf"phase cache entry .*{entry.name} is not used: (1 array\(s\) differ from the checksums in its "
                     r"manifest.json \(\[.*\)|its checkpoint cannot be read \(.*\)); training phase 1 again",
                     caplog.text, re.S)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert_recomputed(run, reference, cache, entry)
    assert "phase cache" not in caplog.text


def test_phase_cache_entry_whose_array_differs_from_its_checksum_is_refused_and_recomputed(cached_vanilla, tmp_path,
                                                                                              caplog):
    """The checksum check itself, deterministically: the manifest (re-signed, as if the array had decoded to other
    values) records another checksum for one array."""
    reference = cached_vanilla[0]
    cache, entry = copied_cache(cached_vanilla, tmp_path)
    manifest = json.loads((entry / "manifest.json").read_text())
    payload = manifest["payload"]
    name = sorted(k for k in payload["state_checksums"] if "kernel" in k)[0]
    payload["state_checksums"][name] = "0" * len(str(payload["state_checksums"][name]))
    manifest["sha256"] = workdirs.json_digest(payload)
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        run = train_lib.train(tiny_config("classifier", phase_cache=str(cache)), tmp_path / "run", progress=False)
    assert re.search(rf"phase cache entry .*{entry.name} is not used: 1 array\(s\) differ from the checksums in its "
                     r"manifest.json \(\[.*\]\); training phase 1 again", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert_recomputed(run, reference, cache, entry)
    assert "phase cache" not in caplog.text


def test_half_written_phase_cache_entry_is_recomputed_not_a_crash(cached_vanilla, tmp_path, monkeypatch, caplog):
    reference = cached_vanilla[0]
    # An entry whose checkpoint was written and its key and manifest not (the layout a kill in that window left
    # before: every run sharing the cache then died at the phase end with StepAlreadyExistsError).
    cache, entry = copied_cache(cached_vanilla, tmp_path)
    (entry / "manifest.json").unlink()
    (entry / "key.json").unlink()
    with caplog.at_level(logging.WARNING):
        run = train_lib.train(tiny_config("classifier", phase_cache=str(cache)), tmp_path / "run", progress=False)
    assert f"{entry.name} is not used: it has no manifest.json" in caplog.text
    assert_recomputed(run, reference, cache, entry)

    # Killed now while writing an entry (after its checkpoint and manifest, before it is renamed into place): the
    # entry is not there, and the next run writes it.
    cache = tmp_path / "cache2"

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_lib, "_publish_entry", killed)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(tiny_config("classifier", phase_cache=str(cache)), tmp_path / "killed", progress=False)
    monkeypatch.undo()
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    later = train_lib.train(tiny_config("classifier", phase_cache=str(cache)), tmp_path / "later", progress=False)
    assert_trees_equal(later.full_state, reference.full_state)
    assert len([p for p in cache.iterdir() if p.name.startswith("1-classifier-")]) == 1


def test_edited_phase_cache_metrics_are_refused_and_recomputed(cached_vanilla, tmp_path, caplog):
    reference = cached_vanilla[0]
    cache, entry = copied_cache(cached_vanilla, tmp_path)
    lines = (entry / "metrics.jsonl").read_text().splitlines()
    edited = {**json.loads(lines[0]), "accuracy": 0.99}
    (entry / "metrics.jsonl").write_text("\n".join([json.dumps(edited)] + lines[1:]) + "\n")
    with caplog.at_level(logging.WARNING):
        run = train_lib.train(tiny_config("classifier", phase_cache=str(cache)), tmp_path / "run", progress=False)
    assert f"{entry.name} is not used: its metrics.jsonl differs from the SHA-256 in its manifest.json" in caplog.text
    assert all(r["accuracy"] != 0.99 for r in records(run.workdir))
    assert_recomputed(run, reference, cache, entry)


def test_attention_method_trains_the_crop_branch_on_a_frozen_global_cnn(tmp_path):
    run = train_lib.train(tiny_config("attention"), tmp_path / "att", progress=False)
    full = run.full_state
    assert [p.name for p in run.plan.phases] == ["classifier", "attention"]
    assert isinstance(run.model.module, AttentionCNN) and run.role == "attention"
    # The global CNN is phase 1's classifier, copied when stage 2 began and frozen since.
    assert_trees_equal(full.params["attention"]["global_cnn"], full.params["classifier"])
    assert_trees_equal(run.restore_full(3).params["classifier"], full.params["classifier"])
    before = run.restore_full(3).params["attention"]
    assert any(np.any(x != y) for x, y in zip(leaves(before["local_cnn"]), leaves(full.params["attention"]["local_cnn"])))
    assert_trees_equal(run.state.params, full.params["attention"])
    assert run.model.apply(run.variables, np.zeros((2, 16, 16, 1), np.float32)).shape == (2, 10)


def test_settings_are_checked_before_training():
    c = tiny_config()
    assert tb.check(c).method == "adversarial"
    for field, value, match in (("batch_size", 16, "must equal config.batch_size"),
                                ("method", "gan", "method must be one of"),
                                ("area", 1.5, "area"),
                                ("previews", -1, "previews")):
        bad = tiny_config()
        bad.background_invariance[field] = value
        with pytest.raises(ValueError, match=match):
            tb.check(bad)
    bad = tiny_config()
    bad.model.name = "attention_cnn"
    with pytest.raises(ValueError, match="attention_cnn"):
        tb.check(bad)
    bad = tiny_config()
    bad.schemes = ("distraction",)
    with pytest.raises(ValueError, match="no training schemes"):
        tb.check(bad)
    with pytest.raises(ValueError, match="has no field 'aera'"):
        tb.BackgroundInvarianceTrainerSettings.from_mapping({"aera": 0.3})
    # The runner picks the trainer by name and names the arm on bad settings.
    assert trainers.get_trainer("background_invariance").build is tb.build_plan
    assert trainers.get_trainer("supervised").build is supervised.build_plan
    with pytest.raises(ValueError, match="unknown trainer 'background'.*did you mean"):
        trainers.get_trainer("background")
    c.experiment.arms = (("ok", {}), ("broken", {"background_invariance": {"tiles": 0}}))
    with pytest.raises(ValueError, match="arm 'broken'.*tiles"):
        experiment.check_config(c)


# ----------------------------------------------------------------------------------------------------------------
# The "backgrounds" evaluator.


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class FakeRun:
    def __init__(self, config, model, variables, workdir=None):
        self.config, self.model, self.variables, self.workdir = config, model, variables, workdir


def numpy_test_sets(images):
    """The protocol by hand: scipy's binary dilation by the 13-pixel disk, the pattern outside it."""
    footprint = np.zeros((5, 5), bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            footprint[dy + 2, dx + 2] = dy * dy + dx * dx <= 4
    keep = np.stack([scipy.ndimage.binary_dilation(im[..., 0] > 0, footprint) for im in images])[..., None]
    out = {"clean": images}
    for name in bg.BACKGROUND_NAMES:
        out[name] = np.where(keep, images, bg.background_pattern(name, images.shape[1])[None, :, :, None])
    return out


def test_backgrounds_evaluator_table_on_a_fixed_linear_model(tmp_path):
    c = tiny_config()
    c.evaluators = ("backgrounds",)
    c.backgrounds = evaluator_section("backgrounds", examples=40, batch_size=16, contact_examples=2,
                                      reference=(("paper", (97.3, 38.0, 24.3, 61.4, 32.9, 19.7, 11.2)),))
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 10)).astype(np.float32)
    b = rng.normal(size=10).astype(np.float32)
    variables = {"params": {"Dense_0": {"kernel": w, "bias": b}}}
    data = ExperimentData(c)
    evaluator = build_evaluators(c)["backgrounds"]
    metrics = evaluator.evaluate(FakeRun(c, Linear(), variables), data)

    images, labels = bg_eval.test_arrays(data.test_source(c), c, 40)
    assert images.shape == (40, 16, 16, 1)
    expected = {name: float(np.mean((x.reshape(40, -1) @ w + b).argmax(-1) == labels))
                for name, x in numpy_test_sets(images).items()}
    assert metrics.pop("examples") == 40
    assert metrics == pytest.approx(expected, abs=1e-9)
    assert len(set(expected.values())) > 2  # the backgrounds change the linear model's answers

    # The report: one row per arm, mean ± sample std over repeats in %, the paper's row, the contact sheet, and the
    # figures a run left in its workdir.
    runs_dir = tmp_path / "proposal" / "seed0"
    runs_dir.mkdir(parents=True)
    (runs_dir / "masks.png").write_bytes(b"png")
    one = {s: 0.5 for s in bg.TEST_SET_NAMES} | {"examples": 40}
    two = {s: 0.7 for s in bg.TEST_SET_NAMES} | {"examples": 40}
    runs = {"proposal": [RunRecord("proposal", 0, runs_dir, c, {"backgrounds": one}),
                         RunRecord("proposal", 1, tmp_path / "proposal" / "seed1", c, {"backgrounds": two})]}
    section = evaluator.report(ReportContext(c, ["proposal"], runs, tmp_path))
    row = next(r for r in section.markdown.splitlines() if r.startswith("| proposal |"))
    assert row == "| proposal |" + " 60.0 ± 14.1 |" * 8  # seven sets and their mean, (50, 70) -> 60.0 ± 14.1
    assert "| *paper* | *97.3* | *38.0* |" in section.markdown and "*31.2* |" in section.markdown
    assert (tmp_path / "background_test_sets.png").is_file()
    assert "](proposal/seed0/masks.png)" in section.markdown


# ----------------------------------------------------------------------------------------------------------------
# The runlocal experiment end to end.


@pytest.mark.slow  # 70 s on 2 cores; in CI: every phase (test_each_phase_...) and the recorded straight run
def test_runlocal_experiment_end_to_end(tmp_path):
    config = load_config("background_invariance_mnist").get_config("runlocal")
    out = experiment.run_experiment(config, tmp_path, progress=False)
    arms = ["vanilla", "attention", "proposal", "proposal_glr1e-5"]
    assert out["arms"] == arms
    for arm in arms:
        accuracy = out["summary"][arm]["backgrounds"]
        assert set(bg.TEST_SET_NAMES) <= set(accuracy) and all(0 <= accuracy[s] <= 1 for s in bg.TEST_SET_NAMES)
    report = (tmp_path / "report.md").read_text()
    assert "Background invariance (Table 1 shape)" in report and "*Proposal (paper)*" in report
    assert (tmp_path / "background_test_sets.png").is_file() and (tmp_path / "training_curves.png").is_file()
    assert (tmp_path / "proposal" / "seed0" / "backgrounds_along_training.png").is_file()
    # Phase 1 trained once (vanilla) and reused by the attention arm and both proposals; phase 2 once.
    cache = sorted(p.name.split("-")[1] for p in (tmp_path / "phase_cache").iterdir())
    assert cache == ["classifier", "mask"]
    first = [json.loads(line) for line in (tmp_path / "attention" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    vanilla = [json.loads(line) for line in (tmp_path / "vanilla" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert first[:len(vanilla)] == vanilla


def load_config(name):
    sys.path.insert(0, str(REPO / "experiments" / "configs"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_configs_check_and_the_folder_config_builds_the_vgg_plan():
    mnist = load_config("background_invariance_mnist").get_config()
    data_dir = REPO.parent / "shared" / "data" / "mnist"  # validation reads the data: point at it from anywhere
    if not data_dir.is_dir():
        pytest.skip(f"{data_dir} is not here")
    mnist.dataset.data_dir = str(data_dir)
    assert experiment.check_config(mnist) == ["vanilla", "attention", "proposal", "proposal_glr1e-5"]
    assert mnist.background_invariance.batch_size == mnist.batch_size == 64
    folder = load_config("background_invariance_folder").get_config()
    with pytest.raises(ValueError, match="needs data_dir"):  # every trainer's data is checked up front
        experiment.check_config(folder)
    assert [name for name, _ in folder.experiment.arms] == ["vanilla", "proposal"]
    cfg = experiment.arm_config(folder, "proposal", 0)
    settings = tb.check(cfg)
    plan = tb.build_plan(cfg, RunData(None, np.arange(80), np.arange(0), None, (128, 128, 3), 5))
    assert [(p.name, p.end - p.begin) for p in plan.phases] == [("classifier", 1000), ("mask", 1000),
                                                                 ("adversarial", 1000)]  # 100 epochs of 80 / 8
    assert type(plan.models["classifier"]).__name__ == "VGG" and not settings.penalise_brightness(3)
    assert bim.background_noise_shape((128, 128, 3), settings.tiles) == (2, 2, 48)
    assert settings.classifier_learning_rate == settings.generator_learning_rate == 1e-5


def test_load_returns_every_model_of_the_plan(straight):
    from saliency_jax.runs import load

    _, run = straight
    loaded = load(run.workdir)
    assert sorted(loaded.models) == ["background_generator", "classifier", "mask_generator"]
    assert_trees_equal(loaded.full_state, run.full_state)
    assert_trees_equal(loaded.state.params, run.state.params)
    assert_trees_equal(loaded.model_state("mask_generator").params, run.full_state.params["mask_generator"])
    assert isinstance(loaded.model.module, VanillaCNN) and loaded.role == "classifier"


def test_a_diverging_phase_is_stopped_and_no_checkpoint_holds_a_non_finite_array(tmp_path):
    """Every phase runs under the loop's non-finite guard (phases 2-3 too, which are not the generic step)."""
    config = tiny_config(mask_learning_rate=1e30, generator_learning_rate=1e30)  # phase 1 healthy, 2 diverges
    config.log_every, config.checkpoint_every = 3, 1  # a checkpoint at every step, the first log at the phase end
    with pytest.raises(FloatingPointError, match="non-finite"):
        train_lib.train(config, tmp_path / "run", progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps
    from saliency_jax import workdirs

    like = tb.build_plan(config, train_lib.validate(config).data)
    abstract = jax.eval_shape(like.init_state, like.init_variables())
    for step in steps:
        state = workdirs.restore_state(tmp_path / "run", step, abstract)
        assert all(np.all(np.isfinite(x)) for x in leaves(state)), f"checkpoint {step} holds a non-finite array"


@pytest.mark.parametrize("field", ["log_every", "checkpoint_every", "keep_checkpoints"])
def test_background_invariance_loop_fields_are_checked_before_anything_runs(tmp_path, field):
    """The background-invariance trainer runs in the one loop and so gets its checks: 0 for these fields used to pass
    ``check_config`` and fail after compiling (``ZeroDivisionError``) or keep no checkpoint."""
    from saliency_jax.config import ConfigError

    config = tiny_config()
    config[field] = 0
    with pytest.raises(ConfigError, match=rf"config.{field}=0: must be an integer >= 1"):
        experiment.check_config(config)
    with pytest.raises(ConfigError, match=rf"config.{field}=0"):
        train_lib.train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
