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
from saliency_jax.evaluators.faithfulness import FAITHFULNESS_METHODS, FaithfulnessSettings

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


def test_every_arm_after_the_first_reuses_the_compiled_scores():
    from saliency_jax.evaluators import faithfulness as evaluator_lib

    settings = FaithfulnessSettings(methods=("gradient",), examples=0, insertion_substrate=0.0, pixels_per_step=1,
                                    randomization=False)
    images = IMAGES.reshape(3, 2, 2, 1)
    first = {"params": {"fc": {"kernel": W, "bias": B}}}
    second = {"params": {"fc": {"kernel": W_RANDOM, "bias": B}}}  # another arm: other weights, same model
    layers = {}
    a = evaluator_lib.evaluate_faithfulness(Linear(), first, images, settings, layers=layers)
    compiled = evaluator_lib._scores._cache_size()
    b = evaluator_lib.evaluate_faithfulness(Linear(), second, images, settings, layers=layers)
    assert evaluator_lib._scores._cache_size() == compiled  # no new trace: the same programs
    assert a["gradient"]["per_image"] != b["gradient"]["per_image"]  # ... run on the new weights
    # the same numbers as the uncached computation of each arm
    for variables, got in ((first, a), (second, b)):
        maps = evaluator_lib.method_maps_fn(Linear(), "gradient", None)
        targets = jax.numpy.argmax(Linear().apply(variables, images), -1)
        from saliency_jax.evaluation import faithfulness as F
        curve = jax.jit(lambda v: F.deletion(lambda x: Linear().apply(v, x), images, maps(v, images, targets),
                                             targets, substrate=0.0, pixels_per_step=1).auc)(variables)
        np.testing.assert_array_equal(got["gradient"]["per_image"]["deletion_auc"], np.asarray(curve))


def test_faithfulness_settings_reject_bad_values():
    with pytest.raises(ValueError, match="methods must name"):
        FaithfulnessSettings(methods=("gradcam",))
    with pytest.raises(ValueError, match="not layer methods"):
        FaithfulnessSettings(layers={"gradient": "fc"})
    with pytest.raises(ValueError, match="insertion_substrate"):
        FaithfulnessSettings(insertion_substrate="noise")


#: The evaluator's default methods run in CI; the other methods' cases are slow (a compilation of three programs
#: each, about 4 s per method on 2 cores).
_DEFAULT_METHODS = FaithfulnessSettings().methods


@pytest.mark.parametrize("method", [
    m if m in _DEFAULT_METHODS else pytest.param(m, marks=pytest.mark.slow)
    for m in FAITHFULNESS_METHODS])
def test_method_maps_are_the_registrys_saliency_map_exactly(method):
    """Every method's maps are saliency_map of its registry method on a linen view (unnormalised), and equal, element
    for element, the low-level calls the evaluator made before it went through the registry."""
    from saliency_jax.evaluators.faithfulness import method_maps_fn
    from saliency_jax.models import SmallCNN
    from saliency_jax.saliency import grad_cam_plus_plus, layer_cams, occlusion
    from saliency_jax.saliency import (METHODS, contrastive_excitation_backprop, excitation_backprop, grad_cam,
                                       linen_layer, linen_view, lrp, rise, saliency_map, vanilla_gradient)

    module = SmallCNN(num_classes=3, widths=(2, 3, 4), use_batchnorm=False)
    images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3))
    variables = module.init(jax.random.key(1), images)
    targets = jax.numpy.array([0, 2, 1], jax.numpy.int32)
    f = lambda x: module.apply(variables, x, train=False)  # noqa: E731
    lm = linen_layer(module, variables, "conv2", train=False)
    before = {  # the evaluator's former private table
        "gradient": lambda x, t: vanilla_gradient(f, x, t),
        "grad_cam": lambda x, t: grad_cam(lm, x, t, normalize=False),
        "excitation_backprop": lambda x, t: excitation_backprop(lm, x, t, resize=True, normalize=False).saliency,
        "contrastive_excitation_backprop": lambda x, t: contrastive_excitation_backprop(
            lm, x, t, resize=True, normalize=False).saliency,
        "rise": lambda x, t: rise(f, jax.random.key(0), x, t, num_masks=500, grid_size=7),
        "lrp_epsilon": lambda x, t: lrp(f, x, t),
        "lrp_alpha_beta": lambda x, t: lrp(f, x, t, rule="alpha_beta"),
        "lrp_zplus": lambda x, t: lrp(f, x, t, rule="zplus"),
        "grad_cam_plus_plus": lambda x, t: grad_cam_plus_plus(lm, x, t, normalize=False),
        "hirescam": lambda x, t: layer_cams.hirescam(lm, x, t, normalize=False),
        "layer_cam": lambda x, t: layer_cams.gradient_cam(lm, x, t, cam=layer_cams.layer_cam_map)[0],
        "xgrad_cam": lambda x, t: layer_cams.gradient_cam(lm, x, t, cam=layer_cams.xgrad_cam_map)[0],
        "eigen_cam": lambda x, t: layer_cams.eigen_cam(lm, x, t)[0],
        "score_cam": lambda x, t: layer_cams.score_cam(lm, x, t)[0],
        "occlusion": lambda x, t: occlusion(f, x, t, sliding_window_shapes=(4, 4), strides=(2, 2)),
    }
    assert set(before) == set(FAITHFULNESS_METHODS)
    name, options = FAITHFULNESS_METHODS[method]
    assert name in METHODS
    got = jax.jit(method_maps_fn(module, method, "conv2"))(variables, images, targets)
    key = jax.random.key(0) if METHODS[name].needs_key else None
    view = linen_view(module, variables, "conv2", train=False)
    registry = jax.jit(lambda x, t: saliency_map(name, view, x, t, normalize=False, key=key, **options))
    want = registry(images, targets)
    assert got.dtype == np.float32 and got.shape == (3, 8, 8)
    np.testing.assert_array_equal(got, want, err_msg=method)
    np.testing.assert_array_equal(got, jax.jit(before[method])(images, targets), err_msg=method)
    with pytest.raises(ValueError, match="unknown method"):
        method_maps_fn(module, "gradcam", "conv2")


def test_faithfulness_evaluator_road_infidelity_sensitivity(tmp_path, monkeypatch):
    """The three optional metrics equal the library functions called on the evaluator's maps, keys and targets."""
    from saliency_jax.evaluation import infidelity_sensitivity as inf
    from saliency_jax.evaluation import remove_and_debias as rd

    run = make_run(tmp_path)
    settings = FaithfulnessSettings(methods=("gradient",), examples=0, insertion_substrate=0.0, pixels_per_step=1,
                                    randomization=False, road=True, road_fractions=(0.25, 0.5), infidelity=True,
                                    sensitivity=True, perturb_samples=3)
    evaluator = evaluators.faithfulness_evaluator(settings)
    metrics = evaluator.evaluate(run, types.SimpleNamespace(test_source=lambda config: Source()))
    got = metrics["methods"]["gradient"]

    images = IMAGES.reshape(3, 2, 2, 1)
    f = lambda x: x.reshape(x.shape[0], -1) @ W + B  # noqa: E731
    targets = np.argmax(IMAGES @ W + B, -1)
    maps = np.abs(W[:, targets].T).reshape(3, 2, 2)  # the gradient map of a linear model
    road_key, infidelity_key, sensitivity_key = jax.random.split(jax.random.key(0), 3)
    want = rd.road(f, images, maps, targets, key=road_key, fractions=(0.25, 0.5))
    assert got["road"]["fractions"] == [0.25, 0.5]
    np.testing.assert_allclose(got["road"]["morf"], np.mean(want.morf, 0), rtol=1e-5)
    np.testing.assert_allclose(got["road"]["lerf"], np.mean(want.lerf, 0), rtol=1e-5)
    np.testing.assert_allclose(got["per_image"]["road_combined"], want.combined, atol=1e-6)
    assert got["road"]["combined"] == pytest.approx(float(np.mean(want.combined)), abs=1e-6)

    # Infidelity of |W_t| for the logit change W_t . I (one channel), normalised: by hand, with the same noise.
    noise = np.asarray(inf.gaussian_perturbations(infidelity_key, images, 3, std=0.003)).reshape(3, 3, 4)
    dots = np.einsum("sbp,bp->sb", noise, maps.reshape(3, 4))
    change = np.einsum("sbp,bp->sb", noise, W[:, targets].T)
    beta = (dots * change).sum(0) / (dots * dots).sum(0)
    np.testing.assert_allclose(got["per_image"]["infidelity"], ((beta * dots - change) ** 2).mean(0), rtol=1e-3)
    # A linear model's gradient does not move with the input: max-sensitivity 0.
    np.testing.assert_allclose(got["per_image"]["sensitivity_max"], 0.0, atol=1e-6)

    record = RunRecord(arm="plain", seed=0, workdir=tmp_path, config=run.config, metrics={"faithfulness": metrics})
    section = evaluator.report(ReportContext(config=run.config, arms=["plain"], runs={"plain": [record]},
                                             workdir=tmp_path))
    assert "ROAD (LeRF − MoRF) / 2 ↑ | infidelity ↓ | max-sensitivity ↓ |" in section.markdown
    assert f" {got['road']['combined']:.3f} | {got['infidelity']:.2e} | 0.000 |" in section.markdown


def test_faithfulness_settings_reject_bad_new_values():
    with pytest.raises(ValueError, match="road_fractions"):
        FaithfulnessSettings(road_fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="perturb_samples"):
        FaithfulnessSettings(perturb_samples=0)


def test_digits_runlocal_with_the_new_metrics(tmp_path):
    """A tiny end-to-end run (the quickstart's runlocal, one arm) with ROAD, infidelity and max-sensitivity on."""
    from recorded import load_config
    from saliency_jax import experiment

    config = load_config("distraction_digits", "runlocal")
    config.experiment.arms = config.experiment.arms[:1]
    config.num_steps = 4
    config.evaluators = (*config.evaluators, "faithfulness")
    config.faithfulness.methods = ("gradient",)
    config.faithfulness.examples = 4
    config.faithfulness.randomization = False
    config.faithfulness.road = True
    config.faithfulness.road_fractions = (0.5,)
    config.faithfulness.infidelity = True
    config.faithfulness.sensitivity = True
    config.faithfulness.perturb_samples = 2
    experiment.run_experiment(config, tmp_path, progress=False, compilation_cache="off")
    report = (tmp_path / "report.md").read_text()
    assert "ROAD (LeRF − MoRF) / 2 ↑ | infidelity ↓ | max-sensitivity ↓ |" in report
    row = next(line for line in report.splitlines() if "| gradient |" in line)
    road, infidelity, sensitivity = (float(c) for c in row.strip(" |").split("|")[-3:])  # numbers, not n/a
    assert -1 <= road <= 1 and infidelity >= 0 and sensitivity >= 0
