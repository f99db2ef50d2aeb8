"""Network utilization and resilience to compression at a dropout layer (Bargal 2019, Sec. 5.2.3-5.2.5).

* :func:`utilization_per_example` / :func:`utilization_metrics` - Table 5.3 and Figs. 5.6-5.9: the number of neurons
  ON (non-zero activation), the peak ``p_EB``, the entropy of the activations and the entropy of ``p_EB`` (Mittal
  et al. 2018's layer scores, computed per test image and averaged).
* :func:`weight_change` / :func:`conservative_filters` - conservative filters (Ma et al.; Bargal 2019 Ch. 3 and
  Sec. 5.2.3): units whose incoming weight vector moved by ``Delta_k = ||w_hat_k - w_k||_2 < Delta`` from its value
  at the start of training.
* :func:`relevance_masks`, :func:`random_unit_masks`, :func:`compression_curves` - Fig. 5.5: at test time switch off
  the most relevant units (by cumulative ``p_EB``, ``p_c = 0, 0.05, ..., 0.95``), the least relevant ones, or ``k``
  random ones, and record the ground-truth class probability.

Definitions where the thesis leaves a choice open (stated so numbers can be compared): entropies are Shannon
entropies in nats of the per-image distribution over units (activations normalised to sum to 1; ``p_EB`` clipped at 0
and normalised), 0 for an all-zero row; "switch off the most relevant units up to ``p_c``" drops units in decreasing
``p_EB`` order while the cumulative ``p_EB`` of the units already dropped is below ``p_c`` (so ``p_c = 0`` drops none
and the dropped units' ``p_EB`` sum to at least ``p_c``); "least relevant" is the same in increasing order (units with
``p_EB = 0`` go first).
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "UTILIZATION_METRICS",
    "utilization_per_example",
    "utilization_metrics",
    "weight_change",
    "conservative_filters",
    "relevance_masks",
    "random_unit_masks",
    "compression_curves",
    "compression_figure",
    "utilization_curves_figure",
    "utilization_table",
]

UTILIZATION_METRICS = ("neurons_on", "peak_p_eb", "entropy_activations", "entropy_p_eb")
"""Keys of :func:`utilization_metrics`, in Table 5.3's row order."""

_LABELS = {"neurons_on": "# Neurons ON", "peak_p_eb": "Peak p_EB", "entropy_activations": "Entropy of Activations",
           "entropy_p_eb": "Entropy of p_EB"}


def _flat(x: Array, name: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must be [batch, *units]; got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point; got dtype {x.dtype}")
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def _entropy(weights: Array) -> Array:
    """Shannon entropy (nats) of each row normalised to sum to 1; 0 for a zero row. weights: [n, units] >= 0."""
    total = jnp.sum(weights, axis=-1, keepdims=True)
    q = weights / jnp.where(total > 0, total, 1.0)
    return -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0), axis=-1)


def utilization_per_example(activations: Array, p_eb: Array) -> dict[str, Array]:
    """Utilization of a layer for each example (Bargal 2019, Table 5.3; Mittal et al. 2018).

    Args:
      activations: [batch, *units] float, the layer's post-ReLU activations in inference mode.
      p_eb: [batch, *units] float, marginal winning probabilities of the ground-truth class at the layer.

    Returns:
      ``{"neurons_on", "peak_p_eb", "entropy_activations", "entropy_p_eb"}``, each float32 [batch]: the count of
      units with activation > 0, the largest ``p_EB``, and the entropies (nats) of the normalised activations and of
      the normalised ``p_EB`` (negative round-off clipped to 0). Jittable.

    Raises:
      ValueError: if the shapes differ or are not [batch, *units].
      TypeError: if an input is not floating point.
    """
    a, p = _flat(activations, "activations"), _flat(p_eb, "p_eb")
    if a.shape != p.shape:
        raise ValueError(f"activations {tuple(a.shape)} and p_eb {tuple(p.shape)} must have the same shape")
    p = jnp.maximum(p, 0.0)
    return {"neurons_on": jnp.sum(a > 0, axis=-1).astype(jnp.float32),
            "peak_p_eb": jnp.max(p, axis=-1),
            "entropy_activations": _entropy(jnp.maximum(a, 0.0)),
            "entropy_p_eb": _entropy(p)}


def utilization_metrics(per_example: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over examples of :func:`utilization_per_example`'s values.

    Args:
      per_example: ``{metric: [n] values}`` (e.g. concatenated over the test set).

    Returns:
      ``{metric: {"mean": float, "std": float}}`` (population std over examples).

    Raises:
      ValueError: if a metric has no values.
    """
    out = {}
    for k, v in per_example.items():
        v = np.asarray(v, np.float64).ravel()
        if v.size == 0:
            raise ValueError(f"utilization metric {k!r} has no values")
        out[k] = {"mean": float(v.mean()), "std": float(v.std())}
    return out


def weight_change(initial_kernel: Array, final_kernel: Array) -> np.ndarray:
    """``Delta_k = ||w_hat_k - w_k||_2`` of every unit (Ma et al.; Bargal 2019 Ch. 3, Sec. 5.2.3).

    Args:
      initial_kernel: [..., units] the layer's kernel at the start of training (dense: [inputs, units]; conv:
        [kh, kw, in, out]).
      final_kernel: the same layer after training, same shape.

    Returns:
      float64 [units], the L2 norm of each unit's (output column's) weight change.

    Raises:
      ValueError: if the shapes differ or the kernel is a scalar.
    """
    w0, w1 = np.asarray(initial_kernel, np.float64), np.asarray(final_kernel, np.float64)
    if w0.shape != w1.shape or w0.ndim < 1:
        raise ValueError(f"initial kernel {w0.shape} and final kernel {w1.shape} must have the same (non-scalar) "
                         "shape")
    d = (w1 - w0).reshape(-1, w0.shape[-1])
    return np.sqrt(np.sum(d * d, axis=0))


def conservative_filters(initial_kernel: Array, final_kernel: Array, thresholds: Sequence[float]) -> dict[float, int]:
    """Number of conservative filters: units whose weights moved by less than ``Delta`` (Bargal 2019, Table 5.3).

    Args:
      initial_kernel: [..., units] kernel at initialisation (or the pretrained one when fine-tuning).
      final_kernel: [..., units] kernel after training.
      thresholds: the ``Delta`` values (e.g. 0.25 for CIFAR-10 in the thesis).

    Returns:
      ``{Delta: count}`` with ``count = #{k : Delta_k < Delta}``.

    Raises:
      ValueError: as :func:`weight_change`, or a negative threshold.
    """
    delta = weight_change(initial_kernel, final_kernel)
    out = {}
    for t in thresholds:
        if t < 0:
            raise ValueError(f"conservative-filter thresholds must be >= 0; got {t}")
        out[float(t)] = int(np.sum(delta < t))
    return out


def relevance_masks(p_eb: Array, p_c: Array, *, most_relevant: bool = True) -> Array:
    """Masks switching off the most (or least) relevant units up to a cumulative ``p_EB`` (Bargal 2019, Fig. 5.5).

    Args:
      p_eb: [batch, units] float marginal winning probabilities (rows summing to 1).
      p_c: [levels] float in [0, 1], the cumulative ``p_EB`` to switch off (0, 0.05, ..., 0.95 in the thesis).
      most_relevant: drop in decreasing ``p_EB`` order (left panel) or increasing (centre panel).

    Returns:
      float32 [levels, batch, units], 1 = kept, 0 = switched off; unit ``i`` is off when the summed ``p_EB`` of the
      units ranked before it is below ``p_c`` (ties broken by unit index). Jittable.

    Raises:
      ValueError: if ``p_eb`` is not rank 2 or ``p_c`` not rank 1.
    """
    p_eb = jnp.asarray(p_eb, jnp.float32)
    p_c = jnp.asarray(p_c, jnp.float32)
    if p_eb.ndim != 2 or p_c.ndim != 1:
        raise ValueError(f"p_eb must be [batch, units] and p_c [levels]; got {tuple(p_eb.shape)}, "
                         f"{tuple(p_c.shape)}")
    p = jnp.maximum(p_eb, 0.0)
    order = jnp.argsort(-p if most_relevant else p, axis=-1, stable=True)
    ranked = jnp.take_along_axis(p, order, axis=-1)
    before = jnp.cumsum(ranked, axis=-1) - ranked  # p_EB of the units ranked before each one
    off_ranked = before[None] < p_c[:, None, None]
    ranks = jnp.argsort(order, axis=-1)
    off = jnp.take_along_axis(off_ranked, jnp.broadcast_to(ranks[None], off_ranked.shape), axis=-1)
    return 1.0 - off.astype(jnp.float32)


def random_unit_masks(key: Array, batch: int, units: int, k: Sequence[int]) -> Array:
    """Masks switching off ``k`` units chosen at random per example (Bargal 2019, Fig. 5.5 right).

    Args:
      key: PRNG key (the same key gives the same units for every model).
      batch: number of examples.
      units: units of the layer.
      k: [levels] numbers of units to switch off, each in [0, units].

    Returns:
      float32 [levels, batch, units], exactly ``k[j]`` zeros per row of level ``j``.

    Raises:
      ValueError: if a ``k`` is outside [0, units].
    """
    k = np.asarray(k, np.int64)
    if np.any(k < 0) or np.any(k > units):
        raise ValueError(f"k must lie in [0, {units}]; got {k.tolist()}")
    ranks = jnp.argsort(jax.random.uniform(key, (batch, units)), axis=-1).argsort(axis=-1)
    return (ranks[None] >= jnp.asarray(k)[:, None, None]).astype(jnp.float32)


def compression_curves(
    activations_and_eb: Callable[[Array, Array], tuple[Array, Array, Callable[[Array], Array]]],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    p_c: Sequence[float] = tuple(np.round(np.arange(0, 1.0, 0.05), 2)),
    k: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Ground-truth class probability as units of a layer are switched off at test time (Bargal 2019, Fig. 5.5).

    Args:
      activations_and_eb: ``(images, labels) -> (activations [b, units], p_eb [b, units], head)`` where ``head``
        maps (masked) activations to logits [b, num_classes] in inference mode (e.g. built with
        :func:`saliency_jax.training.linen_head` and :func:`saliency_jax.training.layer_excitation`); traced
        under ``jax.jit``.
      batches: iterable of ``{"image", "label", optional "mask"}`` (padding rows have mask 0).
      p_c: cumulative ``p_EB`` levels for the most / least relevant panels.
      k: numbers of random units (default: 17 levels from 0 to all units).
      seed: seed of the random units (batch ``i`` uses ``fold_in(key(seed), i)``).

    Returns:
      ``{"p_c": [...], "k": [...], "most": [levels], "least": [levels], "random": [k levels]}``: mean ground-truth
      softmax probability over the examples, as lists of floats.

    Raises:
      ValueError: if ``batches`` is empty.
    """
    p_c = np.asarray(p_c, np.float32)
    state: dict[str, Any] = {}

    @jax.jit
    def run(images, labels, key, k_levels):
        a, p, head = activations_and_eb(images, labels)
        a2 = a.reshape(a.shape[0], -1)
        shape = a.shape

        def gt_prob(mask):
            logits = head((a2 * mask).reshape(shape))
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            return jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]

        p2 = p.reshape(p.shape[0], -1)
        most = jax.lax.map(gt_prob, relevance_masks(p2, p_c, most_relevant=True))
        least = jax.lax.map(gt_prob, relevance_masks(p2, p_c, most_relevant=False))
        ranks = jnp.argsort(jax.random.uniform(key, a2.shape), axis=-1).argsort(axis=-1)
        rand = jax.lax.map(lambda kk: gt_prob((ranks >= kk).astype(jnp.float32)), k_levels)
        return most, least, rand

    sums = None
    count = 0
    base = jax.random.key(seed)
    for i, batch in enumerate(batches):
        images = jnp.asarray(batch["image"])
        labels = jnp.asarray(batch["label"]).astype(jnp.int32)
        if "k" not in state:
            a, _, _ = jax.eval_shape(lambda x, y: activations_and_eb(x, y)[:2] + (None,), images, labels)
            units = int(np.prod(a.shape[1:]))
            state["k"] = (np.unique(np.linspace(0, units, 17).round().astype(np.int64)) if k is None
                          else np.asarray(k, np.int64))
            if np.any(state["k"] < 0) or np.any(state["k"] > units):
                raise ValueError(f"k must lie in [0, {units}]; got {state['k'].tolist()}")
        keep = np.asarray(batch.get("mask", np.ones(labels.shape[0])), bool)
        outs = run(images, labels, jax.random.fold_in(base, i), jnp.asarray(state["k"]))
        outs = [np.asarray(o)[:, keep].sum(axis=1) for o in outs]
        sums = outs if sums is None else [s + o for s, o in zip(sums, outs)]
        count += int(keep.sum())
    if sums is None or count == 0:
        raise ValueError("compression_curves got no examples")
    most, least, rand = (s / count for s in sums)
    return {"p_c": p_c.tolist(), "k": state["k"].tolist(), "most": most.tolist(), "least": least.tolist(),
            "random": rand.tolist(), "examples": count}


def _mean_curve(curves: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray([c[key] for c in curves], np.float64)
    return arr.mean(0), (arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1]))


def compression_figure(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | pathlib.Path,
                       title: str = "") -> pathlib.Path:
    """Fig. 5.5 as a PNG: ground-truth probability vs ``p_c`` (most, least relevant) and vs ``k`` (random).

    Args:
      curves: ``{arm: [curves of each repeat]}`` as :func:`compression_curves` returns them.
      path: output PNG.
      title: figure title.

    Returns:
      The path written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("most", "p_c", "most relevant switched off"), ("least", "p_c", "least relevant switched off"),
              ("random", "k", "k random switched off"))
    for ax, (key, xkey, name) in zip(axes, panels):
        for arm, runs in curves.items():
            mean, std = _mean_curve(runs, key)
            x = np.asarray(runs[0][xkey])
            ax.plot(x, mean, marker="o", ms=3, label=arm)
            if len(runs) > 1:
                ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel(xkey)
        ax.set_ylabel("ground-truth class probability")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def utilization_curves_figure(history: Mapping[str, Sequence[Mapping[str, Any]]], path: str | pathlib.Path,
                              metrics: Sequence[str] = ("test_accuracy", *UTILIZATION_METRICS),
                              title: str = "") -> pathlib.Path:
    """Figs. 5.3 / 5.6-5.9 as a PNG: metrics over training iterations, one line per arm.

    Args:
      history: ``{arm: [{"step": int, metric: float, ...}, ...]}``.
      path: output PNG.
      metrics: which keys to plot (one panel each).
      title: figure title.

    Returns:
      The path written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    axes = np.atleast_1d(axes)
    for ax, m in zip(axes, metrics):
        for arm, rows in history.items():
            rows = [r for r in rows if m in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[m] for r in rows], marker="o", ms=3, label=arm)
        ax.set_xlabel("iteration")
        ax.set_title(_LABELS.get(m, m))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def utilization_table(rows: Mapping[str, Mapping[str, Any]], conservative: Mapping[str, Mapping[float, Any]] | None
                      = None) -> str:
    """Table 5.3 as markdown: one column per arm, the utilization metrics and conservative filters as rows.

    Args:
      rows: ``{arm: {metric: {"mean", "std"} or float}}``.
      conservative: optional ``{arm: {Delta: {"mean", "std"} or count}}``.

    Returns:
      A markdown table (values as ``mean (± std)``).
    """
    arms = list(rows)

    def fmt(v):
        if isinstance(v, Mapping):
            m, s = v["mean"], v["std"]
            digits = 4 if abs(m) < 0.1 else 2
            return f"{m:.{digits}f} (± {s:.{digits}f})"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| metric | " + " | ".join(arms) + " |", "| --- |" + " ---: |" * len(arms)]
    for m in UTILIZATION_METRICS:
        lines.append(f"| {_LABELS[m]} | " + " | ".join(fmt(rows[a][m]) for a in arms) + " |")
    if conservative:
        deltas = sorted({d for a in arms for d in conservative.get(a, {})})
        for d in deltas:
            lines.append(f"| Cons. Filters (Δ={d:g}) | " + " | ".join(
                fmt(conservative[a][d]) if d in conservative.get(a, {}) else "n/a" for a in arms) + " |")
    return "\n".join(lines)
