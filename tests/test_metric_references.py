"""ROAD, infidelity and sensitivity-max against pytorch-grad-cam and Captum.

tests/data/metric_references.npz holds what tests/make_metric_references.py recorded from the reference libraries
(a SmallCNN and its PyTorch twin with the same weights, the same images, maps and perturbations), so these checks
run without torch. The last test re-runs the references live where torch, captum and grad-cam are installed.

Tolerances: the ROAD imputation is a conjugate-gradient solve against the reference's float64 ``spsolve`` (abs 2e-5
on [0, 1] pixels); probabilities and metrics are float32 computations of the same numbers (abs 2e-5 / rel 1e-4).
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.evaluation.infidelity_sensitivity import infidelity, sensitivity_max
from saliency_jax.evaluation.remove_and_debias import noisy_linear_imputation, road
from saliency_jax.models import SmallCNN

DATA = pathlib.Path(__file__).parent / "data" / "metric_references.npz"
MODEL = SmallCNN(num_classes=3, widths=(4, 8, 8), use_batchnorm=False)
FRACTIONS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # removed by pytorch-grad-cam's percentiles 10 .. 90


@functools.lru_cache(maxsize=1)
def recorded():
    with np.load(DATA) as f:
        data = dict(f)
    params = {}
    for name, value in data.items():
        if name.startswith("param/"):
            node = params
            *parents, leaf = name.split("/")[1:]
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = jnp.asarray(value)
    return data, params


def logits_fn(params):
    return functools.partial(MODEL.apply, {"params": params}, train=False)


def test_imputation_equals_grad_cam_noisy_linear_imputer():
    data, _ = recorded()
    got = jax.jit(functools.partial(noisy_linear_imputation, noise=0.0))(
        jnp.asarray(data["images"]), jnp.asarray(data["road_removed"]))
    np.testing.assert_allclose(got, data["road_imputed"], atol=2e-5)


def test_road_equals_grad_cam_road():
    data, params = recorded()
    result = jax.jit(lambda x, m, t: road(logits_fn(params), x, m, t, key=None, fractions=FRACTIONS, noise=0.0,
                                          tie_break=0.0))(data["images"], data["maps"], data["targets"])
    # pytorch-grad-cam's LeRF at percentile p keeps the p % most relevant: it removes the fraction 1 - p / 100.
    np.testing.assert_allclose(result.morf, data["road_morf"], atol=2e-5)
    np.testing.assert_allclose(result.lerf, data["road_lerf"], atol=2e-5)
    np.testing.assert_allclose(result.morf_average, data["road_morf_average"], atol=2e-5)
    np.testing.assert_allclose(result.lerf_average, data["road_lerf_average"], atol=2e-5)
    np.testing.assert_allclose(result.combined, data["road_combined"], atol=2e-5)


def test_infidelity_equals_captum():
    data, params = recorded()
    f = jax.jit(lambda a, normalize: infidelity(logits_fn(params), data["images"], a, data["targets"],
                                                perturbations=data["infidelity_perturbations"], normalize=normalize),
                static_argnums=1)
    for name, attributions in (("infidelity", data["input_x_gradient"]), ("infidelity_maps", data["maps"])):
        np.testing.assert_allclose(f(attributions, False), data[name], rtol=1e-3, err_msg=name)
        np.testing.assert_allclose(f(attributions, True), data[name + "_normalized"], rtol=1e-3, err_msg=name)


def test_input_x_gradient_of_the_twin_equals_captum():
    """The JAX model is the torch model: its input x gradient equals Captum's InputXGradient."""
    data, params = recorded()
    images, targets = jnp.asarray(data["images"]), jnp.asarray(data["targets"])
    grads = jax.grad(lambda x: jnp.sum(logits_fn(params)(x)[jnp.arange(4), targets]))(images)
    np.testing.assert_allclose(images * grads, data["input_x_gradient"], atol=1e-6)


def test_sensitivity_max_equals_captum():
    data, params = recorded()

    def saliency(x, t):  # Captum's Saliency: |d logit_t / d x|
        return jnp.abs(jax.grad(lambda z: jnp.sum(logits_fn(params)(z)[jnp.arange(x.shape[0]), t]))(x))

    got = jax.jit(lambda x, t, u: sensitivity_max(saliency, x, t, perturbations=u))(
        data["images"], data["targets"], data["sensitivity_perturbations"])
    np.testing.assert_allclose(got, data["sensitivity_max"], rtol=1e-4)


@pytest.mark.slow
def test_references_reproduce_live(tmp_path, monkeypatch):
    """Where the peers are installed, the recording script still writes the numbers stored in the file."""
    pytest.importorskip("torch")
    pytest.importorskip("captum")
    pytest.importorskip("pytorch_grad_cam")
    import make_metric_references as script

    monkeypatch.setattr(script, "OUT", tmp_path / "references.npz")
    script.main()
    with np.load(tmp_path / "references.npz") as fresh:
        stored, _ = recorded()
        for name in stored:
            np.testing.assert_allclose(fresh[name], stored[name], rtol=1e-5, atol=1e-6, err_msg=name)
