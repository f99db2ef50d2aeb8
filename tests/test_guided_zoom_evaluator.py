"""Tests of the ``"guided_zoom"`` evaluator (saliency_jax.evaluators.guided_zoom) through the experiment runner.

The end-to-end test runs the CIFAR-10 config's ``:runlocal`` variant (the embedded digits) and recomputes the
refined accuracy independently with :func:`saliency_jax.evaluation.guided_zoom.decision_refinement` one ``k`` at a
time on the restored conventional and Evidence CNNs; the rerun test checks that pools and Evidence CNNs are reused
when only the refinement changes and rebuilt when a pool setting changes; the resize test checks that the
conventional CNN's view made from the originals is, pixel for pixel, what its training pipeline fed it.
"""

import functools
import importlib.util
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax import data as data_lib
from saliency_jax import train as train_lib
from saliency_jax.evaluation import guided_zoom as gz
from saliency_jax.evaluators import ExperimentData, build_evaluators, settings_section
from saliency_jax.evaluators import guided_zoom as gze
from saliency_jax.experiment import evaluate_run, run_experiment
from saliency_jax.saliency import linen_layer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _runlocal():
    spec = importlib.util.spec_from_file_location("guided_zoom_cifar10",
                                                  REPO / "experiments/configs/guided_zoom_cifar10.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("runlocal")


def test_conventional_view_is_the_training_pipelines_resize(tmp_path):
    # A CIFAR-like archive: 32-px uint8 originals; the run trains on them downsampled to 16 px by the source.
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), y_train=np.arange(6) % 3,
             x_test=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), y_test=np.array([0, 1]))
    trained_on = data_lib.get_source("npz", "train", path, image_size=16)
    batch = next(iter(data_lib.make_eval_batches(trained_on, None, batch_size=6)))
    config = _runlocal()
    config.dataset.name, config.dataset.data_dir, config.dataset.image_size = "npz", str(path), 16
    data = ExperimentData(config)
    originals = gze.native_source(data, config, "train")
    assert gze.native_source(data, config, "train") is originals  # read once per experiment
    native = next(iter(data_lib.make_eval_batches(originals, None, batch_size=6)))["image"]
    assert native.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(gze.conventional_images(native, 16), batch["image"])
    np.testing.assert_array_equal(gze.conventional_images(native, None), native)
    # Originals resized to a size other than the run's input would not give the trained-on pixels: refused.
    with pytest.raises(ValueError, match="original_size"):
        gze.native_source(data, config, "train", original_size=24)
    assert gze.native_source(data, config, "test", original_size=16)[0]["image"].shape == (16, 16, 3)


def test_settings_are_checked_before_training():
    config = _runlocal()
    for field, value, match in (("pools", ("GZ", "ZG"), "pools"), ("border", "wrap", "border"),
                                ("ks", (0,), "ks"), ("patch_ratio", 1.5, "patch_ratio"),
                                ("ensemble_test_grounding", "LRP", "ensemble_test_grounding"),
                                ("evidence_steps", 0, "evidence_steps")):
        bad = config.copy_and_resolve_references()
        bad.guided_zoom[field] = value
        with pytest.raises(ValueError, match=match):
            build_evaluators(bad)
    section = settings_section("guided_zoom", border="shift")
    assert section.border == "shift" and tuple(section.pools) == ("GZ", "EGZ")


def test_a_pool_whose_content_changed_is_rebuilt_not_trained_on(tmp_path, caplog):
    # A tiny conventional CNN (6 steps) and its GZ pool of 16 training images (steps 1 of the evaluator only).
    config = _runlocal()
    config.guided_zoom.pools = ("GZ",)
    config.guided_zoom.pool_examples = 16
    run = train_lib.train(config, tmp_path / "run", progress=False)
    evaluator = build_evaluators(config)["guided_zoom"]
    stages = evaluator.stages(run, ExperimentData(config))
    (pool,) = (tmp_path / "run" / "guided_zoom").glob("pool_gz-*.npz")
    meta = json.loads(pool.with_suffix(".json").read_text())
    with np.load(pool) as archive:
        original = {k: archive[k] for k in archive.files}
    assert meta["content_sha256"] == str(original["content_sha256"])
    assert stages["evidence_GZ"].config.dataset.data_dir == str(pool.absolute())

    # Intact: reused as it is.
    stamp = pool.stat().st_mtime_ns
    assert evaluator.stages(run, ExperimentData(config)) == stages and pool.stat().st_mtime_ns == stamp
    # Its labels changed after it was written (its config fingerprint still matches): refused naming the file and
    # rebuilt; the Evidence CNN trains on the pool as written, in the workdir of that content.
    labels = original["y_train"].copy()
    labels[:5] = (labels[:5] + 1) % 10
    np.savez(pool, **{**original, "y_train": labels})
    with caplog.at_level(logging.WARNING):
        again = evaluator.stages(run, ExperimentData(config))
    assert f"evidence pool {pool} differs from the content digest it was written with" in caplog.text
    assert "rebuilding the GZ pool" in caplog.text
    with np.load(pool) as archive:
        for key, value in original.items():
            np.testing.assert_array_equal(archive[key], value)
    assert again == stages
    assert not list(pool.parent.glob(".*"))  # no temporary files left


def _restore(config, workdir):
    return train_lib.train(config, workdir, progress=False)  # a finished run: restored, not retrained


# Pools, two Evidence CNNs and refinement through the runner (~270 s on 2 cores); the pieces have fast tests.
@pytest.mark.slow
def test_runlocal_end_to_end_and_pool_reuse(tmp_path):
    config = _runlocal()
    out = run_experiment(config, tmp_path, progress=False)
    metrics = out["runs"]["conventional"][0]["metrics"]["guided_zoom"]
    settings = gze.GuidedZoomSettings.from_mapping(config.guided_zoom)
    assert metrics["examples"] == 40 and metrics["pool_examples"] == 48
    assert metrics["sizes"] == {"patch": 4, "erase": 4, "output": 8}  # 0.5 of the 8-px digits; 0.25 of 16 px
    assert set(metrics["conventional"]) == {"top1", "top3", "top5"}
    assert metrics["conventional"]["top1"] <= metrics["conventional"]["top3"] <= metrics["conventional"]["top5"]
    for pool in ("GZ", "EGZ"):
        assert set(metrics["refined"][pool]) == {"3", "5"}
        ev = metrics["evidence"][pool]
        assert set(ev["test_patch_accuracy"]) == {"l0", "l1", "l2"} and ev["steps"] == 4
    # The pools on disk: GZ has every image's round 0 (released code) and fewer later rounds; EGZ one patch per
    # image and method.
    root = tmp_path / "conventional" / "seed0" / "guided_zoom"
    gz_pool = np.load(next(root.glob("pool_gz-*.npz")))
    assert (gz_pool["round_train"] == 0).sum() == 48 and gz_pool["x_train"].shape[1:] == (8, 8, 1)
    assert metrics["evidence"]["GZ"]["patches"] == len(gz_pool["y_train"])
    egz_pool = np.load(next(root.glob("pool_egz-*.npz")))
    assert list(egz_pool["method_names"]) == ["cEB", "Grad-CAM", "RISE"]
    np.testing.assert_array_equal(np.bincount(egz_pool["method_train"]), [48, 48, 48])
    # The EGZ pool's cEB patches are GZ's round-0 patches (the same map, peak and crop).
    np.testing.assert_array_equal(egz_pool["x_train"][egz_pool["method_train"] == 0],
                                  gz_pool["x_train"][gz_pool["round_train"] == 0])
    report = (tmp_path / "report.md").read_text()
    assert "| conventional | GZ |" in report and "GZ k=3" in report and "EGZ k=5" in report
    assert (tmp_path / "guided_zoom_pool_gz.png").stat().st_size > 1000
    assert (tmp_path / "guided_zoom_pool_egz.png").stat().st_size > 1000

    # Independent recomputation of the refined top-1, one k at a time, with the library's Algorithm 2.
    run_dir = tmp_path / "conventional" / "seed0"
    run = _restore(config, run_dir)
    evidence_dir = next(root.glob("evidence_gz-*"))
    evidence = _restore(gze.evidence_config(config, settings, next(root.glob("pool_gz-*.npz"))), evidence_dir)
    test = data_lib.get_source("digits", "test", image_size=16)  # what the CNN sees (the pipeline's resize)
    originals = data_lib.get_source("digits", "test")
    idx = np.sort(np.random.default_rng(0).choice(len(test), 40, replace=False))
    images = jnp.asarray(np.stack([test[int(i)]["image"] for i in idx]))
    natives = jnp.asarray(np.stack([originals[int(i)]["image"] for i in idx]))
    labels = np.array([int(test[int(i)]["label"]) for i in idx])
    ceb = gz.contrastive_eb_grounding(linen_layer(run.model.module, run.variables, "conv2", train=False))
    evidence_fn = lambda p: evidence.model.apply(evidence.variables, jnp.round(jnp.clip(p, 0, 1) * 255) / 255)
    for k in (3, 5):
        refined = gz.decision_refinement(ceb, functools.partial(run.model.apply, run.variables),
                                         evidence_fn, images, k=k, patch_size=4, erase_size=4, output_size=8,
                                         originals=natives, border="shift")
        assert metrics["refined"]["GZ"][str(k)] == pytest.approx(np.mean(np.asarray(refined.classes) == labels))
    logits = run.model.apply(run.variables, images)
    assert metrics["conventional"]["top1"] == pytest.approx(np.mean(np.asarray(logits).argmax(-1) == labels))

    # Rerun with another refinement (k): the evaluation runs again, the pools and Evidence CNNs are reused.
    stamps = {p.name: p.stat().st_mtime_ns for p in root.glob("pool_*")}
    checkpoints = sorted(str(p.relative_to(root)) for p in root.glob("evidence_*/checkpoints/*"))
    config.guided_zoom.ks = (2, 3)
    record = evaluate_run(run, build_evaluators(config), ExperimentData(config), arm="conventional")
    again = record.metrics["guided_zoom"]
    assert set(again["refined"]["GZ"]) == {"2", "3"}
    assert again["refined"]["GZ"]["3"] == metrics["refined"]["GZ"]["3"]
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("pool_*")} == stamps
    assert sorted(str(p.relative_to(root)) for p in root.glob("evidence_*/checkpoints/*")) == checkpoints
    assert json.loads((run_dir / "run.json").read_text())["evaluations"]["guided_zoom"]["settings"]["ks"] == [2, 3]
    # A pool setting changes (the border): that pool is rebuilt under a new name; the other is reused.
    config.guided_zoom.border = "truncate"
    config.guided_zoom.pools = ("GZ",)
    evaluate_run(run, build_evaluators(config), ExperimentData(config), arm="conventional")
    assert len(list(root.glob("pool_gz-*.npz"))) == 2 and len(list(root.glob("pool_egz-*.npz"))) == 1
    assert not list(root.glob(".*"))  # no temporary files left


def test_fine_grained_configs_and_the_evidence_cnns_config(tmp_path):
    spec = importlib.util.spec_from_file_location("guided_zoom_fine_grained",
                                                  REPO / "experiments/configs/guided_zoom_fine_grained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from saliency_jax import trainers
    from saliency_jax.evaluators import build_evaluators, evaluator_settings
    from saliency_jax.experiment import arm_config, check_config
    for name in ("cub", "dogs", "aircraft"):
        config = module.get_config(name)
        config.model.pretrained = "resnet101.safetensors"
        with pytest.raises(FileNotFoundError):  # the runner checks the data exists before anything trains
            check_config(config)
        run_config = arm_config(config, "conventional", 0)
        train_lib.validate(run_config, data=False)  # the rest of the run's checks, without the data
        build_evaluators(run_config)
        settings = evaluator_settings(run_config, "guided_zoom")
        # The thesis' sizes at 448 px: 150-px patches, 85-px squares, the Evidence CNN at 224 from the same weights.
        assert gze.pool_sizes(settings, 448, 448) == {"patch": 150, "erase": 85, "output": 224}
        assert settings.evidence_pretrained == "resnet101.safetensors" and settings.ceb_layer == "layer3/0"
        evidence = gze.evidence_config(run_config, settings, tmp_path / "pool.npz")
        assert (evidence.dataset.name, evidence.dataset.image_size, evidence.model.name) == ("npz", None, "resnet101")
        assert evidence.dataset.data_dir == str((tmp_path / "pool.npz").absolute())
        assert (evidence.optimizer.name, evidence.batch_size, evidence.num_steps) == ("sgd", 64, 30_000)
        assert tuple(evidence.schemes) == () and tuple(evidence.evaluators) == ()
    with pytest.raises(ValueError, match="cub"):
        module.get_config("birds")


def test_grounding_fns_are_the_registrys_saliency_map():
    """The evaluator's groundings are saliency_map of cEB / Grad-CAM (layer-resolution map) and RISE (masks from the
    settings' seed) on views of the run's model, element for element."""
    import types

    from saliency_jax.models import SmallCNN
    from saliency_jax.saliency import linen_view, saliency_map

    model = SmallCNN(num_classes=4, widths=(2, 3, 4), use_batchnorm=False)
    images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3))
    variables = model.init(jax.random.key(1), images)
    targets = jnp.array([0, 3, 1], jnp.int32)
    settings = gze.GuidedZoomSettings(rise_masks=40, rise_grid=4, rise_masks_per_step=20, seed=7)
    layers = {"cEB": "conv2", "Grad-CAM": "conv3"}
    groundings = gze._grounding_fns(types.SimpleNamespace(model=model, variables=variables), settings, layers)
    assert tuple(groundings) == gze.GROUNDINGS
    for name, method in (("cEB", "contrastive_excitation_backprop"), ("Grad-CAM", "grad_cam")):
        view = linen_view(model, variables, layers[name], train=False)
        want = saliency_map(method, view, images, targets, normalize=False, return_extras=True).extras["layer_map"]
        np.testing.assert_array_equal(groundings[name](images, targets), want, err_msg=name)
    want = saliency_map("rise", linen_view(model, variables, train=False), images, targets, normalize=False,
                        key=jax.random.key(7), num_masks=40, grid_size=4, masks_per_step=20)
    np.testing.assert_array_equal(groundings["RISE"](images, targets), want)


def test_pool_ceb_folds_batch_norm_as_the_authors_pool_generator():
    """``ceb_batch_norm="fold"`` (default): the pool's cEB maps of a batch-norm SmallCNN equal cEB on the explicitly
    folded network (the same convs with kernels W gamma / sqrt(var + eps) and biases beta - mean gamma /
    sqrt(var + eps) set by hand, no batch norm); the test-time cEB and "pass" keep the network as trained."""
    import types

    from saliency_jax.models import SmallCNN
    from saliency_jax.saliency import contrastive_excitation_backprop

    widths = (3, 4, 5)
    model = SmallCNN(num_classes=4, widths=widths)
    images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(1), images)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.5).astype(np.float32), shapes["params"])
    stats = {name: {"mean": rng.normal(0.0, 0.3, w).astype(np.float32),
                    "var": rng.uniform(0.3, 2.0, w).astype(np.float32)}
             for name, w in zip(("conv1", "conv2", "conv3"), widths)}
    variables = {"params": params, "batch_stats": {k: {"bn": v} for k, v in stats.items()}}
    explicit = {"fc": params["fc"]}
    for name in stats:
        bn = params[name]["bn"]
        s = bn["scale"] / np.sqrt(stats[name]["var"] + 1e-5)
        explicit[name] = {"conv": {"kernel": params[name]["conv"]["kernel"] * s,
                                   "bias": bn["bias"] - stats[name]["mean"] * s}}
    assert min(float(params[n]["bn"]["scale"].min()) for n in stats) < 0
    plain = SmallCNN(num_classes=4, widths=widths, use_batchnorm=False)
    targets = jnp.array([0, 3, 1], jnp.int32)
    run = types.SimpleNamespace(model=model, variables=variables, image_shape=(8, 8, 3))
    layers = {"cEB": "conv2", "Grad-CAM": "conv3"}
    settings = gze.GuidedZoomSettings(rise_masks=10, rise_grid=4, rise_masks_per_step=10)
    assert settings.ceb_batch_norm == "fold"
    groundings = gze._grounding_fns(run, settings, layers)
    pool = gze._pool_grounding_fns(run, settings, layers, groundings)
    want = contrastive_excitation_backprop(linen_layer(plain, {"params": explicit}, "conv2"), images, targets)
    np.testing.assert_allclose(pool["cEB"](images, targets), want.saliency, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want.saliency).max()))
    trained = contrastive_excitation_backprop(linen_layer(model, variables, "conv2", train=False), images, targets)
    np.testing.assert_array_equal(groundings["cEB"](images, targets), trained.saliency)  # test time: as trained
    assert not np.allclose(pool["cEB"](images, targets), trained.saliency, atol=1e-6)
    assert pool["Grad-CAM"] is groundings["Grad-CAM"] and pool["RISE"] is groundings["RISE"]
    passing = gze.GuidedZoomSettings(ceb_batch_norm="pass")
    assert gze._pool_grounding_fns(run, passing, layers, groundings) is groundings
    # The rule is part of the pools' fingerprint, and checked.
    config = _runlocal()
    prints = [gze._pool_fingerprint("GZ", s, config, layers, "w", {}, np.arange(3)) for s in (settings, passing)]
    assert prints[0] != prints[1]
    config.guided_zoom.ceb_batch_norm = "flip"
    with pytest.raises(ValueError, match="ceb_batch_norm"):
        build_evaluators(config)
