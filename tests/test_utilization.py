"""Utilization and compression analyses of Excitation Dropout (Bargal 2019, Table 5.3, Fig. 5.5) on hand-built
inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.evaluation import utilization as util


def test_utilization_per_example_by_hand():
    a = jnp.asarray([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    p = jnp.asarray([[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    out = {k: np.asarray(v) for k, v in util.utilization_per_example(a, p).items()}
    np.testing.assert_allclose(out["neurons_on"], [2, 1, 0])
    np.testing.assert_allclose(out["peak_p_eb"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(out["entropy_activations"], [math.log(2), 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out["entropy_p_eb"], [math.log(2), 0.0, 0.0], atol=1e-6)
    # Uneven distribution: entropy of (1, 3) / 4.
    e = util.utilization_per_example(jnp.asarray([[1.0, 3.0]]), jnp.asarray([[0.25, 0.75]]))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(e["entropy_activations"][0]) == pytest.approx(h, rel=1e-5)
    summary = util.utilization_metrics(out)
    assert summary["neurons_on"]["mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        util.utilization_per_example(a, p[:, :3])


def test_conservative_filters_by_hand():
    w0 = np.zeros((3, 4))
    w1 = np.zeros((3, 4))
    w1[:, 1] = [0.1, 0.0, 0.0]      # Delta = 0.1
    w1[:, 2] = [0.3, 0.4, 0.0]      # Delta = 0.5
    w1[:, 3] = [1.0, 1.0, 1.0]      # Delta = sqrt(3)
    np.testing.assert_allclose(util.weight_change(w0, w1), [0.0, 0.1, 0.5, math.sqrt(3)])
    assert util.conservative_filters(w0, w1, [0.05, 0.25, 1.0, 2.0]) == {0.05: 1, 0.25: 2, 1.0: 3, 2.0: 4}
    with pytest.raises(ValueError, match="same"):
        util.weight_change(w0, w1[:, :3])


def test_relevance_masks_by_hand():
    p = jnp.asarray([[0.5, 0.3, 0.2, 0.0]])
    most = np.asarray(util.relevance_masks(p, jnp.asarray([0.0, 0.05, 0.6, 0.95]), most_relevant=True))[:, 0]
    np.testing.assert_array_equal(most, [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    least = np.asarray(util.relevance_masks(p, jnp.asarray([0.0, 0.05, 0.3]), most_relevant=False))[:, 0]
    # ascending: unit3 (0), unit2 (0.2), unit1 (0.3), unit0 (0.5); cumulative before: 0, 0, 0.2, 0.5
    np.testing.assert_array_equal(least, [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def test_random_unit_masks_drop_exactly_k():
    m = np.asarray(util.random_unit_masks(jax.random.key(0), 5, 10, [0, 3, 10]))
    np.testing.assert_array_equal((m == 0).sum(-1), [[0] * 5, [3] * 5, [10] * 5])
    assert len({tuple(r) for r in m[1]}) > 1  # different units per example
    with pytest.raises(ValueError, match="k must"):
        util.random_unit_masks(jax.random.key(0), 2, 4, [5])


def test_compression_curve_on_tiny_model(tmp_path):
    # Head: logits = a @ W, 3 units, 2 classes; fixed activations and p_EB.
    w = jnp.asarray([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    a = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    labels = np.asarray([0, 0])
    p_eb = jnp.asarray([[2 / 3, 1 / 3, 0.0], [2 / 3, 1 / 3, 0.0]])

    def fn(images, y):
        return a[: images.shape[0]], p_eb[: images.shape[0]], (lambda v: v @ w)

    batches = [{"image": np.zeros((2, 1, 1, 1), np.float32), "label": labels, "mask": np.ones(2)}]
    out = util.compression_curves(fn, batches, p_c=[0.0, 0.5, 0.9], k=[0, 3])

    def gt_prob(mask):
        z = (np.asarray(a[0]) * mask) @ np.asarray(w)
        return float(np.exp(z[0]) / np.exp(z).sum())

    expected_most = [gt_prob(np.array([1, 1, 1])), gt_prob(np.array([0, 1, 1])), gt_prob(np.array([0, 0, 1]))]
    # least: order unit2 (0), unit1 (1/3), unit0 (2/3); before: 0, 0, 1/3 -> p_c = 0.5 and 0.9 switch all off
    expected_least = [gt_prob(np.array([1, 1, 1])), gt_prob(np.array([0, 0, 0])), gt_prob(np.array([0, 0, 0]))]
    np.testing.assert_allclose(out["most"], expected_most, rtol=1e-5)
    np.testing.assert_allclose(out["least"], expected_least, rtol=1e-5)
    np.testing.assert_allclose(out["random"], [gt_prob(np.ones(3)), 0.5], rtol=1e-5)
    assert out["examples"] == 2
    path = util.compression_figure({"arm": [out, out]}, tmp_path / "c.png")
    assert path.stat().st_size > 1000
    table = util.utilization_table({"arm": {m: {"mean": 1.0, "std": 0.0} for m in util.UTILIZATION_METRICS}},
                                   {"arm": {0.25: 3}})
    assert "Cons. Filters (Δ=0.25)" in table and "# Neurons ON" in table
