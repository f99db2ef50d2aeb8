"""The CAM family (HiResCAM, LayerCAM, XGrad-CAM, Eigen-CAM, Score-CAM), several layers per map, several targets
per image and occlusion, against pytorch-grad-cam 1.5.7 and Captum 0.9.0 on a tiny CNN with the same weights
(tests/make_cam_references.py).

The references are stored in tests/data/cam_references.npz, so the numbers are checked without torch; where torch,
pytorch-grad-cam and Captum are installed (the ``peers`` extra) the references are recomputed and compared with the
stored ones too. Tolerances: maps in [0, 1] agree to ``atol 2e-5`` at one layer (float32 on both sides; the peers add
``1e-7`` / ``1e-8`` to their normalisation denominators), ``1e-4`` for several layers (the per-layer normalisation's
``1e-7`` on a layer map of small magnitude); occlusion's signed attributions to ``rtol 1e-4, atol 1e-5``.
"""

import sys
import pathlib
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import make_cam_references as R  # noqa: E402

from saliency_jax.saliency import (METHODS, excitation_backprop, grad_cam, hirescam, linen_layer,  # noqa: E402
                                   linen_view, occlusion, saliency_map, saliency_maps, top_k)
from saliency_jax.saliency.occlusion import occlusion_positions  # noqa: E402

REF = dict(np.load(R.PATH))
W = {k[2:]: v for k, v in REF.items() if k.startswith("w_")}
MODULE, VARIABLES = R.linen_model(W)
X = jnp.asarray(REF["images"])
T = jnp.asarray(REF["targets"], jnp.int32)
VIEW = linen_view(MODULE, VARIABLES, "block2", train=False)
VIEW2 = linen_view(MODULE, VARIABLES, ["block1", "block2"], train=False)
OCC = dict(sliding_window_shapes=R.OCCLUSION["window"], strides=R.OCCLUSION["strides"],
           baselines=R.OCCLUSION["baseline"])


def test_recorded_inputs_are_what_the_script_draws():
    np.testing.assert_array_equal(REF["images"], R.images())
    for k, v in R.weights().items():
        np.testing.assert_array_equal(W[k], v)
    np.testing.assert_allclose(MODULE.apply(VARIABLES, X), REF["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m for m, _ in R.SINGLE])
def test_one_layer_maps_equal_pytorch_grad_cam(method):
    """[batch, k] targets in one call equal the reference's one call per target column, and so does each column
    given alone as [batch] targets."""
    maps = saliency_map(method, VIEW, X, T)
    assert maps.shape == (3, 2, 12, 12) and maps.dtype == jnp.float32
    np.testing.assert_allclose(maps, REF[method], atol=2e-5)
    for j in range(T.shape[1]):
        np.testing.assert_allclose(saliency_map(method, VIEW, X, T[:, j]), REF[method][:, j], atol=2e-5)
    assert float(np.abs(REF[method]).max()) > 0.5  # not all degenerate


def test_hirescam_and_xgrad_cam_differ_from_grad_cam_on_this_head():
    """The flatten + dense head makes the methods differ (else the comparisons above would be one test)."""
    for m in ("hirescam", "xgrad_cam", "layer_cam"):
        assert np.abs(REF[m] - REF["grad_cam"]).max() > 0.05, m


@pytest.mark.parametrize("method", [m for m, _ in R.MULTI])
def test_several_layers_equal_pytorch_grad_cam_target_layers(method):
    maps = saliency_map(method, VIEW2, X, T)
    np.testing.assert_allclose(maps, REF["multi_" + method], atol=1e-4)
    out = saliency_map(method, VIEW2, X, T[:, 0], return_extras=True, normalize=False)
    assert [m.shape[1:] for m in out.extras["layer_maps"]] == [(12, 12), (6, 6)]
    np.testing.assert_allclose(out.maps.max(axis=(1, 2)) <= 1.0 + 1e-6, True)


def test_eigen_cam_is_the_first_principal_component_up_to_sign():
    """The raw projection (before the sign rule and the ReLU) is pytorch-grad-cam's get_2d_projection up to sign;
    the maps above use pytorch-grad-cam's sign correction (|max| >= |min|)."""
    layer_map = saliency_map("eigen_cam", VIEW, X, return_extras=True).extras["layer_map"]
    np.testing.assert_allclose(np.abs(layer_map), np.abs(REF["eigen_projection"]), rtol=1e-4, atol=1e-5)
    lm = np.asarray(layer_map).reshape(3, -1)
    assert (np.abs(lm.max(1)) >= np.abs(lm.min(1))).all()


def test_occlusion_equals_captum():
    maps = saliency_map("occlusion", VIEW, X, T, normalize=False, **OCC)
    np.testing.assert_allclose(maps, REF["occlusion"], rtol=1e-4, atol=1e-5)
    one = occlusion(lambda x: MODULE.apply(VARIABLES, x), X, T[:, 1], windows_per_step=3, **OCC)
    np.testing.assert_allclose(one, REF["occlusion"][:, 1], rtol=1e-4, atol=1e-5)
    rows, cols = occlusion_positions((12, 12), (5, 5), (3, 3))
    np.testing.assert_array_equal(rows, [0, 3, 6, 9])  # the last window is cut by the border, as Captum's
    with pytest.raises(ValueError, match="uncovered"):
        occlusion_positions((12, 12), (2, 2), 3)
    with pytest.raises(ValueError, match="exceeds"):
        occlusion_positions((12, 12), 13)


def test_references_are_what_pytorch_grad_cam_and_captum_give():
    pytest.importorskip("torch")
    pytest.importorskip("pytorch_grad_cam")
    pytest.importorskip("captum")
    live = R.torch_references(R.weights(), R.images())
    for key, value in live.items():
        if key == "occlusion_channels":  # Captum's attribution is the same for every channel of a window
            np.testing.assert_allclose(value, np.repeat(value[:, :, :1], value.shape[2], axis=2))
            continue
        if key == "eigen_projection":  # its sign is LAPACK's
            value, stored = np.abs(value), np.abs(REF[key])
        else:
            stored = REF[key]
        np.testing.assert_allclose(value, stored, rtol=1e-5, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Several targets per image: one forward, one batched backward, the numbers of one call per target.


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "vanilla_gradient", "gradient_x_input",
                                    "excitation_backprop", "contrastive_excitation_backprop"])
def test_target_sets_equal_one_call_per_target(method):
    out = saliency_map(method, VIEW, X, T, normalize=False, return_extras=True)
    assert out.maps.shape == (3, 2, 12, 12) and out.extras["degenerate"].shape == (3, 2)
    for j in range(T.shape[1]):
        single = saliency_map(method, VIEW, X, T[:, j], normalize=False)
        np.testing.assert_allclose(out.maps[:, j], single, rtol=1e-5, atol=1e-6 * float(np.abs(single).max()))
    norm = saliency_map(method, VIEW, X, T)
    np.testing.assert_allclose(norm.max(axis=(2, 3)), 1.0, atol=1e-6)  # each [b, j] map normalised by itself


def test_top_k_reads_the_classes_from_the_same_forward_and_jits_once():
    order = np.argsort(-REF["logits"], axis=1, kind="stable")[:, :3]
    traces = []

    @jax.jit
    def maps(x):
        traces.append(1)
        return saliency_map("grad_cam", VIEW, x, top_k(3))

    got = maps(X)
    np.testing.assert_allclose(got, saliency_map("grad_cam", VIEW, X, jnp.asarray(order, jnp.int32)), atol=1e-6)
    maps(X + 0.0)
    assert len(traces) == 1
    # One forward: the jaxpr of top-k Grad-CAM holds the convolutions of one forward and of one (batched) backward.
    jaxpr = jax.make_jaxpr(lambda x: saliency_map("grad_cam", VIEW, x, top_k(3), normalize=False))(X)
    convs = str(jaxpr).count("conv_general_dilated")
    single = str(jax.make_jaxpr(lambda x: saliency_map("grad_cam", VIEW, x, T[:, 0], normalize=False))(X))
    assert convs == single.count("conv_general_dilated")


def test_several_layers_and_target_sets_refuse_methods_that_cannot():
    with pytest.raises(ValueError, match="one layer"):
        saliency_map("excitation_backprop", VIEW2, X, T[:, 0])
    with pytest.raises(ValueError, match="one target per example"):
        saliency_map("integrated_gradients", VIEW, X, T)
    with pytest.raises(ValueError, match="top_k"):
        top_k(0)
    with pytest.raises(ValueError, match="more classes"):
        saliency_map("grad_cam", VIEW, X, top_k(6))
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        saliency_map("grad_cam", VIEW, X, jnp.array([[0, 1], [2, 5], [1, 1]]))
    with pytest.raises(ValueError, match="distinct"):
        linen_view(MODULE, VARIABLES, ["block2", "block2"])
    with pytest.raises(ValueError, match="one layer"):
        grad_cam(linen_layer(MODULE, VARIABLES, ["block1", "block2"]), X, T[:, 0])
    # Under jit an out-of-range class in a set gives NaN maps for that (example, target) only.
    bad = jax.jit(lambda t: saliency_map("grad_cam", VIEW, X, t))(jnp.array([[0, 1], [2, 7], [1, 1]]))
    assert np.isnan(bad[1, 1]).all() and np.isfinite(np.delete(np.asarray(bad).reshape(6, -1), 3, 0)).all()


def test_eb_target_set_is_one_vjp_of_the_eb_rules():
    lm = linen_layer(MODULE, VARIABLES, "block2", train=False)
    out = saliency_map("excitation_backprop", VIEW, X, T, normalize=False, return_extras=True)
    for j in range(2):
        ref = excitation_backprop(lm, X, T[:, j])
        np.testing.assert_allclose(out.extras["probability"][:, j], ref.probability, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.extras["probability"].sum(axis=(2, 3, 4)), 1.0, rtol=1e-4)  # conservation


# ---------------------------------------------------------------------------------------------------------------
# Several methods on one forward: saliency_maps.

SHARED = ["grad_cam", "grad_cam_plus_plus", "hirescam", "layer_cam", "xgrad_cam", "vanilla_gradient",
          "gradient_x_input", "excitation_backprop", "contrastive_excitation_backprop"]


@pytest.mark.parametrize("targets", [None, 1, "column", "set", "top_k"])
def test_several_methods_equal_one_call_each(targets):
    t = {"column": T[:, 0], "set": T, "top_k": top_k(3)}.get(targets, targets)
    got = saliency_maps(SHARED + ["eigen_cam", "occlusion"], VIEW, X, t)
    assert list(got) == SHARED + ["eigen_cam", "occlusion"]
    for name, maps in got.items():
        want = saliency_map(name, VIEW, X, t)
        assert maps.shape == want.shape and maps.dtype == jnp.float32, name
        np.testing.assert_allclose(maps, want, rtol=1e-4, atol=1e-5, err_msg=name)
    raw = saliency_maps(["grad_cam", "vanilla_gradient"], VIEW, X, t, normalize=False, score="softmax")
    for name, maps in raw.items():
        want = saliency_map(name, VIEW, X, t, normalize=False, score="softmax")
        np.testing.assert_allclose(maps, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()), err_msg=name)


def test_gradient_methods_share_one_forward_and_one_backward():
    def convs(fn):
        return str(jax.make_jaxpr(fn)(X)).count("conv_general_dilated")

    one = convs(lambda x: saliency_map("vanilla_gradient", VIEW, x, top_k(2), normalize=False))
    shared = convs(lambda x: saliency_maps(["grad_cam", "hirescam", "vanilla_gradient", "gradient_x_input"], VIEW, x,
                                           top_k(2), normalize=False))
    apart = sum(convs(lambda x, m=m: saliency_map(m, VIEW, x, top_k(2), normalize=False))
                for m in ("grad_cam", "hirescam", "vanilla_gradient", "gradient_x_input"))
    assert shared == one < apart


def test_several_methods_refuse_what_they_cannot_share():
    with pytest.raises(KeyError, match="unknown saliency method"):
        saliency_maps(["grad_cam", "gradcam"], VIEW, X)
    with pytest.raises(ValueError, match="duplicate"):
        saliency_maps(["grad_cam", "grad_cam"], VIEW, X)
    with pytest.raises(ValueError, match="random"):
        saliency_maps(["rise"], VIEW, X)
    with pytest.raises(ValueError, match="at least one"):
        saliency_maps([], VIEW, X)
    with pytest.raises(ValueError, match="target function"):
        saliency_maps(["grad_cam"], VIEW, X, lambda out: out[:, 0])
    bad = jax.jit(lambda t: saliency_maps(["grad_cam", "excitation_backprop", "vanilla_gradient"], VIEW, X, t))(
        jnp.array([[0, 1], [2, 7], [1, 1]]))
    for maps in bad.values():
        assert np.isnan(maps[1, 1]).all() and np.isfinite(np.delete(np.asarray(maps).reshape(6, -1), 3, 0)).all()


def test_attention_guidance_hirescam_is_the_shared_one():
    from saliency_jax.training.attention_guidance import guidance_maps

    lm = linen_layer(MODULE, VARIABLES, "block2", train=False)
    np.testing.assert_array_equal(guidance_maps(lm, X, T[:, 0], weighting="hirescam"), hirescam(lm, X, T[:, 0]))
    np.testing.assert_allclose(hirescam(lm, X, T[:, 0]), REF["hirescam"][:, 0], atol=2e-5)


def test_registry_rows():
    for m in ("hirescam", "layer_cam", "xgrad_cam", "eigen_cam", "score_cam", "occlusion"):
        assert m in METHODS and METHODS[m].target_sets
    assert all(METHODS[m].several_layers for m in ("grad_cam", "hirescam", "layer_cam", "xgrad_cam", "eigen_cam",
                                                     "score_cam"))


# ---------------------------------------------------------------------------------------------------------------
# The faithfulness evaluator runs the new methods by name.


class _Source:
    num_classes = R.NUM_CLASSES

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": REF["images"][i], "label": np.int32(0)}


def test_faithfulness_evaluator_runs_new_methods_by_name(tmp_path):
    from saliency_jax import evaluators
    from saliency_jax.evaluation import faithfulness as F
    from saliency_jax.evaluators.faithfulness import FaithfulnessSettings

    config = ml_collections.ConfigDict({"seed": 0, "dataset": {"name": "fake", "image_size": None},
                                        "model": {"name": "tiny", "grad_cam_layer": "block2", "classifier": "fc"}})
    run = types.SimpleNamespace(model=MODULE, variables=VARIABLES, config=config, workdir=tmp_path,
                                state=types.SimpleNamespace(step=1))
    settings = FaithfulnessSettings(methods=("hirescam", "occlusion"), examples=0, insertion_substrate=0.0,
                                    randomization=False)
    metrics = evaluators.faithfulness_evaluator(settings).evaluate(
        run, types.SimpleNamespace(test_source=lambda c: _Source()))
    assert metrics["layers"]["hirescam"] == "block2"
    logits_fn = lambda x: MODULE.apply(VARIABLES, x)  # noqa: E731
    pred = jnp.argmax(logits_fn(X), -1)
    maps = saliency_map("hirescam", VIEW, X, pred, normalize=False)
    expected = F.deletion(logits_fn, X, maps, pred, substrate=0.0)
    np.testing.assert_allclose(metrics["methods"]["hirescam"]["per_image"]["deletion_auc"], expected.auc, rtol=1e-5)
    assert np.isfinite(metrics["methods"]["occlusion"]["deletion_auc"])


def test_several_layers_of_an_nnx_module_with_activation_paths():
    """An unmodified NNX module split at two '+relu' paths: the aggregate is the mean of each layer's normalised,
    resized map (from one forward and one backward)."""
    from flax import nnx

    from saliency_jax.saliency import normalize_maps, nnx_view, resize_maps

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(4, 5, (3, 3), strides=2, rngs=rngs)
            self.fc = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
            return self.fc(h.mean((1, 2)))

    net = Net(nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
    t = jnp.array([0, 2])
    both = saliency_map("grad_cam", nnx_view(net, ["conv1+relu", "conv2+relu"]), x, t, normalize=False)
    parts = [saliency_map("grad_cam", nnx_view(net, layer), x, t, normalize=False, return_extras=True)
             .extras["layer_map"] for layer in ("conv1+relu", "conv2+relu")]
    want = np.mean([resize_maps(normalize_maps(jax.nn.relu(p)), (8, 8)) for p in parts], axis=0)
    np.testing.assert_allclose(both, want, rtol=1e-6, atol=1e-7)
