"""EB-R, cEB-R, BP-R and temporal localisation (Bargal 2019, Ch. 7) against hand-written NumPy references.

The recurrent rules are checked on a tiny ReLU-LSTM with fixed weights against a slow per-unit NumPy reference of
both cell rules (``"excitation"``: EB with gates as constant weights; ``"gradient"``: the authors' released
``LSTMUnit`` backward); the machinery that reaches inside ``lax.scan`` is checked against the same network unrolled
by hand; the full pipeline on the CNN-LSTM model for conservation, contrast and batching.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saliency_jax.data.clips import LAYOUTS, MovingDigitClips, box_masks, collate_clips, ink_boxes
from saliency_jax.evaluation.temporal_grounding import (
    _average_precision,
    clip_detections,
    clip_groundings,
    clip_pointing_hits,
    pointing_accuracy,
    temporal_detection_map,
    temporal_iou,
)
from saliency_jax.models import CNNLSTM, ReLULSTMCell, get_model
from saliency_jax.saliency import (UnsupportedOperationError, contrastive_excitation_backprop, excitation_backprop,
                                   linen_layer, linen_view, saliency_map, vanilla_gradient, with_excitation_rules)
from saliency_jax.saliency.recurrent import (
    clip_prior,
    contrastive_recurrent_excitation_backprop,
    linen_clip_layers,
    recurrent_excitation_backprop,
    recurrent_gradient,
    split_clip_model,
    temporal_localization,
    temporal_localization_known_length,
    temporal_normalization,
)

D, H, K = 5, 4, 3  # input features, LSTM units, classes


def close(actual, expected, rtol=1e-4):
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=1e-5 * scale)


# ----------------------------------------------------------------------------------------------------------------
# A tiny ReLU-LSTM with fixed weights, and its slow NumPy reference.


def lstm_weights(seed=0):
    r = np.random.default_rng(seed)
    return {
        "wx": r.normal(size=(D, 4 * H)) / np.sqrt(D),
        "b": np.concatenate([r.normal(size=3 * H) * 0.3, np.abs(r.normal(size=H)) * 0.3 + 0.1]),  # g bias > 0
        "wh": r.normal(size=(H, 4 * H)) / np.sqrt(H),
        "wc": r.normal(size=(H, K)) + 0.3,  # mixed signs, mostly positive
        "bc": r.normal(size=K) * 0.1,
    }


class SeqModel(nn.Module):
    """nn.RNN(ReLULSTMCell) + a classifier at every step: features [batch, time, D] -> logits [batch, time, K]."""

    def setup(self):
        self.lstm = nn.RNN(ReLULSTMCell(H))
        self.classifier = nn.Dense(K)

    def __call__(self, x):
        return self.classifier(self.lstm(x))


def seq_variables(w):
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return {"params": {
        "lstm": {"cell": {"x_transform": {"kernel": f32(w["wx"]), "bias": f32(w["b"])},
                          "h_transform": {"kernel": f32(w["wh"])}}},
        "classifier": {"kernel": f32(w["wc"]), "bias": f32(w["bc"])},
    }}


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def reference_forward(w, x):
    """One example: x [T, D] -> per-step records (pre-activations, gates, states) and logits [T, K]."""
    c, h = np.zeros(H), np.zeros(H)
    steps, logits = [], []
    for t in range(x.shape[0]):
        pre = x[t] @ w["wx"] + w["b"] + h @ w["wh"]
        i, f, o = sigmoid(pre[:H]), sigmoid(pre[H:2 * H]), sigmoid(pre[2 * H:3 * H])
        g_pre = pre[3 * H:]
        g = np.maximum(g_pre, 0)
        c_prev = c
        c = f * c_prev + i * g
        h = o * np.maximum(c, 0)
        steps.append(dict(i=i, f=f, o=o, g=g, g_pre=g_pre, c_prev=c_prev, c=c, h=h))
        logits.append(h @ w["wc"] + w["bc"])
    return steps, np.array(logits)


def eb_dense(x, weight, p_out, sign=1.0):
    """Eq. 4.2 edge by edge: p_in[a] = sum_m x[a] w+[a, m] p_out[m] / sum_a' x[a'] w+[a', m] (0 / 0 := 0)."""
    n_in, n_out = weight.shape
    p_in = np.zeros(n_in)
    for m in range(n_out):
        z = sum(x[a] * max(sign * weight[a, m], 0.0) for a in range(n_in))
        if z == 0:
            continue
        for a in range(n_in):
            p_in[a] += x[a] * max(sign * weight[a, m], 0.0) / z * p_out[m]
    return p_in


def reference_eb_r(w, x, prior, cell_rule, classifier_sign=1.0):
    """EB-R signal at the LSTM input, one example, unit by unit (Eq. 7.1, 7.3 and the module's cell rules)."""
    steps, _ = reference_forward(w, x)
    T = x.shape[0]
    p_h = [eb_dense(steps[t]["h"], w["wc"], prior[t], classifier_sign) for t in range(T)]
    p_x = np.zeros_like(x)
    p_c_next = np.zeros(H)
    for t in reversed(range(T)):
        s = steps[t]
        p_pre = np.zeros(4 * H)
        for j in range(H):
            if cell_rule == "excitation":
                # h = o * ReLU(c): the gate is a constant weight, the ReLU routes; c = f c_prev + i g splits in
                # proportion; the gate products pass the signal unchanged; ReLU(g') routes to g'.
                p_c = p_c_next[j] + (p_h[t][j] if s["c"][j] > 0 else 0.0)
                share_prev = s["f"][j] * s["c_prev"][j] / s["c"][j] if s["c"][j] != 0 else 0.0
                share_g = s["i"][j] * s["g"][j] / s["c"][j] if s["c"][j] != 0 else 0.0
                p_c_next[j] = share_prev * p_c
                p_pre[3 * H + j] = share_g * p_c * (s["g_pre"][j] > 0)
            else:
                # The released code's LSTMUnit backward (lstm_unit_layer.cu, Backward_eb_gpu = Backward_gpu).
                c_term = p_c_next[j] + p_h[t][j] * s["o"][j] * (s["c"][j] > 0)
                p_c_next[j] = c_term * s["f"][j]
                i, f, o, g = s["i"][j], s["f"][j], s["o"][j], s["g"][j]
                p_pre[j] = c_term * g * i * (1 - i)
                p_pre[H + j] = c_term * s["c_prev"][j] * f * (1 - f)
                p_pre[2 * H + j] = p_h[t][j] * max(s["c"][j], 0) * o * (1 - o)
                p_pre[3 * H + j] = c_term * i * (s["g_pre"][j] > 0)
        # Gate pre-activation W_h h + b + W_x x: all of the signal to W_x x (Eltwise EB of the released code).
        p_x[t] = eb_dense(x[t], w["wx"], p_pre)
    return p_x


def jax_eb_r(w, x, prior, cell_rule, contrastive=False):
    model, variables = SeqModel(), seq_variables(w)
    fn = with_excitation_rules(lambda a, p: model.apply(variables, a + p), probe_argnums=1, cell_rule=cell_rule,
                               contrastive=contrastive)
    _, pullback = jax.vjp(lambda p: fn(jnp.asarray(x, jnp.float32), p), jnp.zeros(x.shape, jnp.float32))
    return np.asarray(pullback(jnp.asarray(prior, jnp.float32))[0])


def features(seed, batch=2, time=4):
    return np.abs(np.random.default_rng(seed).normal(size=(batch, time, D))) + 0.05


def one_hot_at(batch, time, classes, step):
    prior = np.zeros((batch, time, K))
    prior[np.arange(batch), step, classes] = 1.0
    return prior


# ----------------------------------------------------------------------------------------------------------------
# The recurrent rules.


@pytest.mark.parametrize("cell_rule", ["excitation", "gradient"])
@pytest.mark.parametrize("step", [3, 1])
def test_recurrent_rules_match_numpy_reference(cell_rule, step):
    w, x = lstm_weights(1), features(2)
    prior = one_hot_at(2, 4, [0, 2], step)
    ours = jax_eb_r(w, x, prior, cell_rule)
    expected = np.stack([reference_eb_r(w, x[b], prior[b], cell_rule) for b in range(2)])
    assert np.abs(expected).sum() > 0.1  # the signal reaches the input
    close(ours, expected)
    assert np.all(ours[:, step + 1:] == 0)  # nothing flows forward in time


def test_forward_values_unchanged_and_reference_forward_agrees():
    w, x = lstm_weights(3), features(4)
    model, variables = SeqModel(), seq_variables(w)
    plain = model.apply(variables, jnp.asarray(x, jnp.float32))
    close(with_excitation_rules(lambda a: model.apply(variables, a))(jnp.asarray(x, jnp.float32)), plain, 1e-6)
    close(plain, np.stack([reference_forward(w, x[b])[1] for b in range(2)]), 1e-5)


def test_excitation_rule_conserves_through_time_gradient_rule_does_not():
    w, x = lstm_weights(6), features(7, batch=3, time=6)
    prior = one_hot_at(3, 6, [0, 1, 2], 5)
    eb = jax_eb_r(w, x, prior, "excitation")
    np.testing.assert_allclose(eb.reshape(3, -1).sum(1), 1.0, rtol=1e-5)
    assert np.all(eb >= 0)
    grad = jax_eb_r(w, x, prior, "gradient")
    assert not np.allclose(grad.reshape(3, -1).sum(1), 1.0, rtol=1e-3)
    # The temporal normalisation (Eq. 7.5) restores a distribution over time and units.
    np.testing.assert_allclose(np.asarray(temporal_normalization(jnp.asarray(grad))).reshape(3, -1).sum(1), 1.0,
                               rtol=1e-5)


def test_one_step_recurrence_equals_feed_forward_eb():
    """T = 1 (zero initial state): EB-R equals EB of the feed-forward net ReLU(W_g x + b_g) * (i * o) -> classifier,
    the gates being per-unit constants, which EB's normalisation cancels."""
    w, x = lstm_weights(7), features(8, batch=3, time=1)
    prior = one_hot_at(3, 1, [2, 0, 1], 0)
    ours = jax_eb_r(w, x, prior, "excitation")[:, 0]
    xs = jnp.asarray(x[:, 0], jnp.float32)
    pre = x[:, 0] @ w["wx"] + w["b"]
    gates = jnp.asarray(sigmoid(pre[:, :H]) * sigmoid(pre[:, 2 * H:3 * H]), jnp.float32)  # i * o, constants
    wg, bg = jnp.asarray(w["wx"][:, 3 * H:], jnp.float32), jnp.asarray(w["b"][3 * H:], jnp.float32)
    wc, bc = jnp.asarray(w["wc"], jnp.float32), jnp.asarray(w["bc"], jnp.float32)

    def feed_forward(a):
        return (jax.nn.relu(a @ wg + bg) * gates) @ wc + bc

    _, pullback = jax.vjp(with_excitation_rules(feed_forward), xs)
    expected = pullback(jnp.asarray(prior[:, 0], jnp.float32))[0]
    close(ours, expected)
    np.testing.assert_allclose(np.asarray(ours).sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("cell_rule", ["excitation", "gradient"])
def test_scan_of_length_one_equals_the_body_unrolled(cell_rule):
    w, x = lstm_weights(9), features(10, batch=2, time=1)
    prior = one_hot_at(2, 1, [1, 2], 0)
    cell, variables = ReLULSTMCell(H), seq_variables(w)
    cell_vars = {"params": variables["params"]["lstm"]["cell"]}
    wc, bc = variables["params"]["classifier"]["kernel"], variables["params"]["classifier"]["bias"]

    def unrolled(a, p):
        zeros = jnp.zeros((a.shape[0], H))
        _, h = cell.apply(cell_vars, (zeros, zeros), a[:, 0] + p[:, 0])
        return (h @ wc + bc)[:, None]

    fn = with_excitation_rules(unrolled, probe_argnums=1, cell_rule=cell_rule)
    _, pullback = jax.vjp(lambda p: fn(jnp.asarray(x, jnp.float32), p), jnp.zeros(x.shape, jnp.float32))
    close(jax_eb_r(w, x, prior, cell_rule), pullback(jnp.asarray(prior, jnp.float32))[0])


def test_contrastive_through_time_is_normal_minus_negated_classifier():
    w, x = lstm_weights(11), features(12)
    prior = one_hot_at(2, 4, [0, 1], 3)
    contrast = jax_eb_r(w, x, prior, "excitation", contrastive=True)
    dual = np.stack([reference_eb_r(w, x[b], prior[b], "excitation", classifier_sign=-1.0) for b in range(2)])
    close(contrast, jax_eb_r(w, x, prior, "excitation") - dual)


def test_flax_optimized_lstm_cell_with_relu_gives_the_same_signal():
    """An unmodified nn.OptimizedLSTMCell(activation_fn=nn.relu) (gates i, f, g, o; bias on the recurrent side) is
    the same ReLU-LSTM: the same EB-R signal."""
    w, x = lstm_weights(13), features(14)
    prior = one_hot_at(2, 4, [2, 0], 3)

    class FlaxSeq(nn.Module):
        def setup(self):
            self.lstm = nn.RNN(nn.OptimizedLSTMCell(H, activation_fn=nn.relu))
            self.classifier = nn.Dense(K)

        def __call__(self, a):
            return self.classifier(self.lstm(a))

    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    cell = {}
    for gate, k in zip("ifog", range(4)):
        cols = slice(k * H, (k + 1) * H)
        cell[f"i{gate}"] = {"kernel": f32(w["wx"][:, cols])}
        cell[f"h{gate}"] = {"kernel": f32(w["wh"][:, cols]), "bias": f32(w["b"][cols])}
    variables = {"params": {"lstm": {"cell": cell}, "classifier": {"kernel": f32(w["wc"]), "bias": f32(w["bc"])}}}
    for rule in ("gradient", "excitation"):
        fn = with_excitation_rules(lambda a, p: FlaxSeq().apply(variables, a + p), probe_argnums=1, cell_rule=rule)
        logits, pullback = jax.vjp(lambda p: fn(f32(x), p), jnp.zeros(x.shape, jnp.float32))
        close(logits, SeqModel().apply(seq_variables(w), f32(x)), 1e-5)
        close(pullback(f32(prior))[0], jax_eb_r(w, x, prior, rule))


@pytest.mark.parametrize("build, primitive", [
    (lambda: nn.RNN(nn.OptimizedLSTMCell(H)), "tanh"),  # the standard LSTM: tanh breaks EB's assumptions
    (lambda: nn.RNN(nn.SimpleCell(H)), "tanh"),
])
def test_unsupported_recurrent_cell_raises_naming_the_primitive(build, primitive):
    class Seq(nn.Module):
        @nn.compact
        def __call__(self, a):
            return nn.Dense(K)(build()(a))

    x = jnp.asarray(features(15))
    variables = Seq().init(jax.random.key(0), x)
    fn = with_excitation_rules(lambda a: Seq().apply(variables, a))
    _, pullback = jax.vjp(fn, x)
    with pytest.raises(UnsupportedOperationError, match=f"'{primitive}'"):
        pullback(jnp.ones((2, 4, K)))


def test_while_loop_raises_naming_it_and_sigmoid_activation_is_refused():
    wc = jnp.asarray(lstm_weights(0)["wc"], jnp.float32)

    def looped(a):  # a recurrence with a while loop: reverse mode cannot pass through it
        _, h = jax.lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, jax.nn.relu(s[1] * 0.5 + a)),
                                  (0, jnp.zeros_like(a)))
        return h @ wc

    x = jnp.ones((2, H))
    _, pullback = jax.vjp(with_excitation_rules(looped), x)
    with pytest.raises(UnsupportedOperationError, match="'while'"):
        pullback(jnp.ones((2, K)))
    _, pullback = jax.vjp(with_excitation_rules(lambda a: jax.nn.sigmoid(a) @ wc), x)
    with pytest.raises(UnsupportedOperationError, match="logistic"):
        pullback(jnp.ones((2, K)))


def test_a_plain_accumulator_loop_is_a_residual_sum():
    """h_t = h_{t-1} + x_t (no recurrent weights): the sum splits in proportion (Eq. 4.2 with unit weights), so the
    signal of h_T reaches every x_t as x_t / h_T, back through time; only a recurrent *transform* W_h h is cut."""
    wc = jnp.asarray(np.abs(lstm_weights(0)["wc"]), jnp.float32)

    def accumulate(a):  # a: [batch, time, H]
        h, _ = jax.lax.scan(lambda c, x: (c + x, None), jnp.zeros((a.shape[0], H)), jnp.swapaxes(a, 0, 1))
        return h @ wc

    x = jnp.asarray(np.abs(np.random.default_rng(3).normal(size=(2, 5, H))) + 0.1, jnp.float32)
    prior = jnp.asarray(np.eye(K)[[0, 2]], jnp.float32)
    _, pullback = jax.vjp(with_excitation_rules(accumulate), x)
    h_t = np.asarray(x).sum(1)
    p_h = np.stack([eb_dense(h_t[b], np.asarray(wc), np.asarray(prior[b])) for b in range(2)])
    close(pullback(prior)[0], np.asarray(x) * (p_h / h_t)[:, None, :])


def test_unknown_cell_rule():
    with pytest.raises(ValueError, match="cell_rule"):
        with_excitation_rules(lambda a: a, cell_rule="tanh")


# ----------------------------------------------------------------------------------------------------------------
# The EB-R / cEB-R / BP-R pipeline on the CNN-LSTM.


@pytest.fixture(scope="module")
def cnn_lstm():
    model = CNNLSTM(num_classes=4, widths=(3, 4, 5), embed_features=8, lstm_features=6)
    clips = jax.random.uniform(jax.random.key(0), (2, 3, 16, 16, 1)) + 0.05
    variables = jax.jit(model.init)(jax.random.key(1), clips)
    # A classifier with both signs in every class, so that the dual units of cEB-R receive a signal.
    j, k = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
    variables["params"]["classifier"]["kernel"] = jnp.asarray(np.where((j + k) % 2 == 0, 1.0, -1.0) * (0.5 + 0.1 * j),
                                                              jnp.float32)
    return model, variables, clips


def test_cnn_lstm_model_and_registry(cnn_lstm):
    model, variables, clips = cnn_lstm
    assert model.apply(variables, clips).shape == (2, 3, 4)
    assert model.apply(variables, clips[0], method="frame_logits").shape == (3, 4)
    assert isinstance(get_model("cnn_lstm", 4), CNNLSTM)
    with pytest.raises(ValueError, match="batch, time"):
        model.apply(variables, clips[0])


def test_eb_r_conserves_the_normalised_signal_over_time_and_space(cnn_lstm):
    model, variables, clips = cnn_lstm
    split = linen_clip_layers(model, variables, "conv2", "fc")
    targets = jnp.array([0, 3])

    @jax.jit
    def run(c):
        return (recurrent_excitation_backprop(split, c, targets, cell_rule="excitation"),
                recurrent_excitation_backprop(split, c, targets, cell_rule="gradient"),
                contrastive_recurrent_excitation_backprop(split, c, targets, cell_rule="excitation"),
                recurrent_excitation_backprop(split, c, targets, cell_rule="excitation", normalize=False))

    eb, eb_gradient, ceb, raw = run(clips)
    assert eb.boundary.shape == (2, 3, 8) and eb.saliency.shape == (2, 3, 8, 8)
    for result in (eb, eb_gradient):
        np.testing.assert_allclose(result.boundary.sum((1, 2)), 1.0, rtol=1e-5)  # Eq. 7.5
        np.testing.assert_allclose(result.frame_sums.sum(1), 1.0, rtol=1e-4)  # conserved down the CNN (Eq. 7.9)
        close(result.frame_sums, result.probability.sum((2, 3, 4)))
    np.testing.assert_allclose(ceb.boundary.sum((1, 2)), 0.0, atol=1e-5)  # Eq. 7.7
    np.testing.assert_allclose(ceb.frame_sums.sum(1), 0.0, atol=1e-4)
    assert np.all(np.abs(ceb.boundary).sum((1, 2)) > 0.1)  # the dual units got a signal
    np.testing.assert_allclose(raw.boundary.sum((1, 2)), 1.0, rtol=1e-4)  # excitation: already a distribution


def test_ceb_r_is_the_difference_of_two_normalised_passes(cnn_lstm):
    """Eq. 7.7 done literally: EB-R with the classifier's weights negated, both normalised, subtracted."""
    model, variables, clips = cnn_lstm
    split = linen_clip_layers(model, variables, "conv2", "fc")
    negated = jax.tree_util.tree_map(lambda a: a, variables)
    negated["params"]["classifier"]["kernel"] = -variables["params"]["classifier"]["kernel"]
    split_neg = linen_clip_layers(model, negated, "conv2", "fc")
    targets = jnp.array([2, 1])
    normal, dual, ceb = jax.jit(lambda c: (recurrent_excitation_backprop(split, c, targets),
                                           recurrent_excitation_backprop(split_neg, c, targets),
                                           contrastive_recurrent_excitation_backprop(split, c, targets)))(clips)
    close(ceb.boundary, normal.boundary - dual.boundary)
    close(ceb.saliency, normal.saliency - dual.saliency)


def test_linen_split_equals_pure_function_split_and_batching(cnn_lstm):
    model, variables, clips = cnn_lstm
    p = variables["params"]

    def features_fn(frames):
        x = model.apply(variables, frames, method=lambda m, f: nn.max_pool(m.conv1(f), (2, 2), strides=(2, 2)))
        return model.apply(variables, x, method=lambda m, a: m.conv2(a))

    def encoder_fn(a):
        a = nn.max_pool(a, (2, 2), strides=(2, 2))
        a = nn.max_pool(model.apply(variables, a, method=lambda m, v: m.conv3(v)), (2, 2), strides=(2, 2))
        return jax.nn.relu(a.reshape(a.shape[0], -1) @ p["fc"]["dense"]["kernel"] + p["fc"]["dense"]["bias"])

    def sequence_fn(f):
        h = model.apply(variables, f, method=lambda m, v: m.lstm(v))
        return h @ p["classifier"]["kernel"] + p["classifier"]["bias"]

    pure = split_clip_model(features_fn, encoder_fn, sequence_fn)
    linen = linen_clip_layers(model, variables, "conv2", "fc")
    close(pure(clips), linen(clips), 1e-5)
    batched = jax.jit(lambda c: contrastive_recurrent_excitation_backprop(pure, c, 1))(clips)
    single = jax.jit(lambda c: contrastive_recurrent_excitation_backprop(linen, c, 1))(clips[1:])
    close(single.saliency[0], batched.saliency[1])  # the same maps, and examples do not interact
    close(single.boundary[0], batched.boundary[1])


def test_recurrent_gradient_is_the_gradient_through_time(cnn_lstm):
    model, variables, clips = cnn_lstm
    fn = lambda c: model.apply(variables, c)  # noqa: E731
    bp = recurrent_gradient(fn, clips, jnp.array([1, 2]), time_step=1, reduction="sum")
    grad = jax.grad(lambda c: fn(c)[0, 1, 1] + fn(c)[1, 1, 2])(clips)
    close(bp.saliency, grad.sum(-1))
    close(bp.frame_sums, grad.sum((2, 3, 4)))
    assert np.all(np.asarray(bp.saliency)[:, 2] == 0)  # the logit at step 1 does not see frame 2
    assert recurrent_gradient(fn, clips, 0).saliency.shape == (2, 3, 16, 16)


def test_frame_baselines_are_the_registrys_saliency_map_exactly(cnn_lstm):
    """EB / cEB / BP per frame are saliency_map on a view of the single-frame classifier (EB: the layer map; cEB: the
    signed channel sum of its probability; BP: max |gradient| over channels), element for element, and equal the
    low-level calls they made before the registry."""
    model, variables, clips = cnn_lstm
    labels = jnp.array([1, 3], jnp.int32)
    out = clip_groundings(model, variables, {"image": clips, "label": labels}, methods=("eb", "ceb", "bp"))
    frames, frame_labels = clips.reshape(6, *clips.shape[2:]), jnp.repeat(labels, 3)
    view = linen_view(model, variables, "conv3", method="frame_logits")
    lm = linen_layer(model, variables, "conv3", method="frame_logits")
    logits_fn = lambda x: model.apply(variables, x, method="frame_logits")  # noqa: E731

    @jax.jit
    def registry(x, t):
        eb = saliency_map("excitation_backprop", view, x, t, normalize=False, return_extras=True)
        ceb = saliency_map("contrastive_excitation_backprop", view, x, t, normalize=False, return_extras=True)
        bp = saliency_map("vanilla_gradient", view, x, t, normalize=False, reduction="max_abs")
        return {"eb": eb.extras["layer_map"], "ceb": jnp.sum(ceb.extras["probability"], -1), "bp": bp}

    @jax.jit
    def before(x, t):
        return {"eb": excitation_backprop(lm, x, t).saliency,
                "ceb": jnp.sum(contrastive_excitation_backprop(lm, x, t).probability.astype(jnp.float32), -1),
                "bp": vanilla_gradient(logits_fn, x, t, reduction="max_abs")}

    want, old = registry(frames, frame_labels), before(frames, frame_labels)
    for method in ("eb", "ceb", "bp"):
        got = out[method].saliency
        np.testing.assert_array_equal(got, want[method].reshape(got.shape), err_msg=method)
        np.testing.assert_array_equal(want[method], old[method], err_msg=method)


def test_clip_prior_and_bad_inputs(cnn_lstm):
    model, variables, clips = cnn_lstm
    logits = jnp.zeros((2, 3, 4)).at[:, 1, 2].set(5.0)
    prior = clip_prior(logits, None, 1)
    assert prior[0, 1, 2] == 1 and prior.sum() == 2
    every = clip_prior(logits, jnp.array([0, 1]), None)
    np.testing.assert_allclose(every.sum((1, 2)), 1.0)
    split = linen_clip_layers(model, variables, "conv2", "fc")
    with pytest.raises(ValueError, match="batch, time"):
        recurrent_excitation_backprop(split, clips[0], 0)
    with pytest.raises(ValueError, match="out of range"):
        recurrent_excitation_backprop(split, clips, 0, time_step=3)
    with pytest.raises(ValueError, match="not both"):
        recurrent_excitation_backprop(split, clips, 0, prior=prior)
    with pytest.raises(TypeError, match="ClipLayerModel"):
        recurrent_excitation_backprop(model, clips, 0)
    with pytest.raises(ValueError, match="must differ"):
        linen_clip_layers(model, variables, "fc", "fc")
    with pytest.raises(ValueError, match="spatial"):
        recurrent_excitation_backprop(linen_clip_layers(model, variables, "fc", "lstm"), clips, 0)


# ----------------------------------------------------------------------------------------------------------------
# Temporal localisation.


def test_temporal_localization_by_hand():
    sums = jnp.array([
        [-1.0, 0.5, 2.0, 0.0, -0.1, 3.0],   # anchor 5, frame 4 negative: [5, 6)
        [-1.0, 0.5, 2.0, 0.0, 1.0, -3.0],   # anchor 2, grows over the 0 to frame 4: [1, 5)
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],     # ties: anchor 0, no negatives: the whole clip
        [-4.0, -1.0, -2.0, -3.0, -5.0, -6.0],  # all negative: the anchor alone
    ])
    np.testing.assert_array_equal(temporal_localization(sums), [[5, 6], [1, 5], [0, 6], [1, 2]])
    np.testing.assert_array_equal(jax.jit(temporal_localization)(sums), temporal_localization(sums))


def test_temporal_localization_known_length_by_hand():
    sums = jnp.array([[0.0, 1.0, -2.0, 2.0, 2.0, 0.5],
                      [3.0, -1.0, 0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(temporal_localization_known_length(sums, 2), [[3, 5], [0, 2]])  # first of ties
    np.testing.assert_array_equal(temporal_localization_known_length(sums, jnp.array([1, 3])), [[3, 4], [0, 3]])
    np.testing.assert_array_equal(temporal_localization_known_length(sums, 6), [[0, 6], [0, 6]])
    with pytest.raises(ValueError, match="length"):
        temporal_localization_known_length(sums, 7)
    with pytest.raises(ValueError, match="batch, time"):
        temporal_localization(jnp.ones(4))


# ----------------------------------------------------------------------------------------------------------------
# The clip source.


def digits(n=40, seed=0):
    r = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.uint8)
    for k in range(n):  # a filled rectangle per digit, at a random place inside the 28 x 28 patch
        y, x = r.integers(2, 12, size=2)
        images[k, y:y + r.integers(5, 14), x:x + r.integers(4, 12), 0] = 255
    return images, np.arange(n) % 10


def test_clip_source_is_deterministic_and_boxes_match_the_digit():
    images, labels = digits()
    src = MovingDigitClips(images, labels, num_clips=20, length=7, canvas=48, layout="rand+gt+rand",
                           gt_length=(2, 4), seed=3)
    again = MovingDigitClips(images, labels, num_clips=20, length=7, canvas=48, layout="rand+gt+rand",
                             gt_length=(2, 4), seed=3)
    other = MovingDigitClips(images, labels, num_clips=20, length=7, canvas=48, layout="rand+gt+rand",
                             gt_length=(2, 4), seed=4)
    for i in (0, 5, 19):
        a, b = src[i], again[i]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(src[i]["image"], other[i]["image"]) for i in range(5))
    for i in range(20):
        item = src[i]
        assert item["image"].shape == (7, 48, 48, 1) and item["image"].dtype == np.float32
        start, end = item["segment"]
        assert 1 <= start and end <= 6 and 2 <= end - start <= 4  # a rand frame on each side
        np.testing.assert_array_equal(np.flatnonzero(item["gt_frames"]), np.arange(start, end))
        assert np.all(item["frame_labels"][start:end] == item["label"])
        assert np.all(item["frame_labels"][:start] != item["label"])
        for t in range(7):  # on a black canvas, the box is exactly the bounding box of the lit pixels
            ys, xs = np.nonzero(item["image"][t, :, :, 0] > 0)
            np.testing.assert_array_equal(item["boxes"][t], [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    with pytest.raises(IndexError):
        src[20]


def test_clip_layouts_clutter_and_errors():
    images, labels = digits()
    for layout in LAYOUTS:
        src = MovingDigitClips(images, labels, num_clips=3, length=6, canvas=40, layout=layout, clutter=4)
        item = src[1]
        start, end = item["segment"]
        assert {"single": (0, 6), "rand+gt": (3, 6), "gt+rand": (0, 3)}.get(layout, (start, end)) == (start, end)
        inside = box_masks(item["boxes"], 40, 40)
        assert np.all(np.asarray(item["image"][..., 0])[np.asarray(inside)] >= 0)
        assert item["layout"] == LAYOUTS.index(layout)
    batch = collate_clips(src, [0, 2])
    assert batch["image"].shape == (2, 6, 40, 40, 1) and batch["boxes"].shape == (2, 6, 4)
    np.testing.assert_array_equal(ink_boxes(np.zeros((1, 5, 5, 1), np.uint8)), [[0, 0, 0, 0]])
    with pytest.raises(ValueError, match="layout"):
        MovingDigitClips(images, labels, num_clips=1, layout="gt+gt")
    with pytest.raises(ValueError, match="gt_length"):
        MovingDigitClips(images, labels, num_clips=1, length=6, layout="rand+gt+rand", gt_length=5)
    with pytest.raises(ValueError, match="canvas"):
        MovingDigitClips(images, labels, num_clips=1, canvas=28)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark metrics.


def test_temporal_iou_and_average_precision_by_hand():
    np.testing.assert_allclose(temporal_iou([[0, 4], [2, 6], [0, 2]], [[2, 6], [2, 6], [3, 5]]), [1 / 3, 1, 0])
    # Ranked hits: TP, FP, TP with 3 positives -> precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3.
    ap = _average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 3)
    assert ap == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3)
    m, per_class = temporal_detection_map(np.array([[0, 4], [2, 6], [0, 3]]), np.array([0.5, 0.9, 0.1]),
                                          np.array([[0, 4], [0, 4], [0, 3]]), np.array([1, 1, 0]), 3)
    # Class 1: the confident detection misses (IoU 1/3), then a hit: precision 1/2 at recall 1/2 -> AP 1/4.
    assert per_class[1] == pytest.approx(0.25) and per_class[0] == pytest.approx(1.0) and np.isnan(per_class[2])
    assert m == pytest.approx(0.625)
    acc, per = pointing_accuracy(np.array([[True, False], [True, True]]), np.array([[True, True], [False, True]]),
                                 np.array([0, 1]), 2)
    assert per.tolist() == [0.5, 1.0] and acc == pytest.approx(0.75)


def test_benchmark_functions_on_a_tiny_model():
    images, labels = digits()
    src = MovingDigitClips(images, labels, num_clips=4, length=4, canvas=32, layout="rand+gt", clutter=2)
    batch = collate_clips(src, range(4))
    model = CNNLSTM(num_classes=10, widths=(2, 3, 4), embed_features=6, lstm_features=5)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(batch["image"][:1]))
    out = clip_groundings(model, variables, batch)  # every method, one compiled call
    assert out["eb_r"].saliency.shape == (4, 4, 8, 8) and out["bp"].saliency.shape == (4, 4, 32, 32)
    assert out["probability"].shape == (4, 4)
    np.testing.assert_allclose(out["eb_r"].frame_sums.sum(1), 1.0, rtol=1e-4)
    hits = clip_pointing_hits(out, batch)
    assert hits["eb"].shape == (4, 4) and hits["evaluated"].sum() == 8
    masks = np.asarray(box_masks(batch["boxes"], 32, 32))
    maps = np.asarray(jax.image.resize(out["eb_r"].saliency, (4, 4, 32, 32), "bilinear"))
    for b, t in [(0, 2), (3, 3)]:  # a hit iff the map's maximum lies within 3 px of the digit's box
        y, x = np.unravel_index(np.argmax(maps[b, t]), (32, 32))
        by, bx = np.nonzero(masks[b, t])
        assert hits["eb_r"][b, t] == bool(np.min((by - y) ** 2 + (bx - x) ** 2) <= 9)
    found = clip_detections(out, batch, known_length=True)
    for segments, confidence in found.values():
        np.testing.assert_array_equal(segments[:, 1] - segments[:, 0], 2)
        assert confidence.shape == (4,)
    with pytest.raises(ValueError, match="methods"):
        clip_groundings(model, variables, batch, methods=("gradcam",))


def test_default_cell_rule_is_the_authors_lstm_unit():
    # The released Caffe LSTMUnit back-propagates its ordinary gradient in EB mode (sbargal/Caffe-ExcitationBP-RNNs):
    # the library's default and the grounding evaluator's headline rule; "excitation" is one flag away.
    import inspect

    from saliency_jax.evaluators.temporal_grounding import TemporalGroundingSettings
    from saliency_jax.saliency.recurrent import contrastive_recurrent_excitation_backprop as ceb_r

    for fn in (recurrent_excitation_backprop, ceb_r, with_excitation_rules):
        assert inspect.signature(fn).parameters["cell_rule"].default == "gradient", fn.__name__
    assert TemporalGroundingSettings().cell_rules[0] == "gradient"
    w, x = lstm_weights(1), features(2)
    prior = one_hot_at(2, 4, [0, 2], 3)
    model, variables = SeqModel(), seq_variables(w)
    default = with_excitation_rules(lambda a, p: model.apply(variables, a + p), probe_argnums=1)
    _, pullback = jax.vjp(lambda p: default(jnp.asarray(x, jnp.float32), p), jnp.zeros(x.shape, jnp.float32))
    ours = np.asarray(pullback(jnp.asarray(prior, jnp.float32))[0])
    np.testing.assert_array_equal(ours, jax_eb_r(w, x, prior, "gradient"))
    assert not np.allclose(ours, jax_eb_r(w, x, prior, "excitation"))
