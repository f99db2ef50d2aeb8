"""Classification metrics of Morales et al. 2021, Sec. 4.4 and Sec. 5.2 (Tables 1, 3, 4).

"Playing to distraction: towards a robust training of CNN classifiers through visual explanation
techniques" reports accuracy, precision, recall and F1 (Eqs. 1-4); on the imbalanced EgoFoodPlaces
dataset it reports the macro- and weighted-averages of the per-class scores plus the per-class true
positive rate (Table 3), each averaged over repeated train/validation splits. scikit-learn does the
arithmetic here; this module fixes the conventions (labels, zero division, output names) and returns
plain Python values that ``json.dump`` accepts.

Output names (the keys that :mod:`saliency_jax.evaluation.report` renders):

* ``accuracy``
* ``precision_macro``, ``recall_macro``, ``f1_macro``
* ``precision_weighted``, ``recall_weighted``, ``f1_weighted``
* ``true_positive_rate``: ``{class_name: recall of that class}``
* ``confusion_matrix``: ``[num_classes][num_classes]`` counts, rows = true class, columns = predicted.
* ``num_examples``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as sk_metrics

__all__ = ["classification_metrics", "summarize_repeats", "SCALAR_METRICS"]

#: The scalar summary metrics, in the order of Table 1 / Table 3 of the paper.
SCALAR_METRICS: tuple[str, ...] = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


def _as_label_vector(values: Any, name: str, num_classes: int) -> np.ndarray:
    """Returns ``values`` as an int64 vector after checking rank, dtype and range."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must have shape [n], got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty; need at least one example.")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}.")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}), got values in [{low}, {high}]."
        )
    return array.astype(np.int64)


def classification_metrics(
    labels: Any,
    predictions: Any,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro/weighted precision, recall and F1, per-class TPR and confusion matrix.

    Implements Eqs. 1-4 of Morales et al. 2021 (Sec. 4.4) with the macro- and weighted-averages
    of Sec. 5.2 (Table 3). The per-class scores are computed one-vs-rest for every class in
    ``range(num_classes)``, including classes absent from both ``labels`` and ``predictions``;
    a score whose denominator is zero (no true or no predicted example of that class) counts as 0
    (scikit-learn ``zero_division=0``). Hence the macro average is over all ``num_classes``
    classes, and a class with no test example has ``true_positive_rate`` 0. The weighted average
    weights each class by its support (number of true examples), so absent classes do not count.

    Args:
      labels: [n] integer true class indices in ``[0, num_classes)`` (numpy, JAX or list).
      predictions: [n] integer predicted class indices in ``[0, num_classes)``.
      num_classes: number of classes, a positive int.
      class_names: optional ``num_classes`` distinct strings naming the classes, in index order;
        defaults to ``"class_0"``, ``"class_1"``, ...

    Returns:
      A dict of plain Python values (JSON-serialisable): ``accuracy``, ``precision_macro``,
      ``recall_macro``, ``f1_macro``, ``precision_weighted``, ``recall_weighted``,
      ``f1_weighted`` (floats in [0, 1]); ``true_positive_rate`` (dict class name -> float, the
      per-class recall TP / (TP + FN)); ``confusion_matrix`` (list of ``num_classes`` lists of
      ``num_classes`` ints, row = true class, column = predicted class); ``num_examples`` (int).

    Raises:
      ValueError: if ``num_classes`` is not a positive int, ``labels`` / ``predictions`` are not
        non-empty integer vectors of equal length with values in ``[0, num_classes)``, or
        ``class_names`` does not hold ``num_classes`` distinct strings.

    >>> m = classification_metrics([0, 1, 1], [0, 1, 0], num_classes=2)
    >>> round(m["accuracy"], 3), m["confusion_matrix"]
    (0.667, [[1, 0], [1, 1]])
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes}.")
    y_true = _as_label_vector(labels, "labels", num_classes)
    y_pred = _as_label_vector(predictions, "predictions", num_classes)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels and predictions must have the same shape [n], got {y_true.shape} and {y_pred.shape}.")
    if class_names is None:
        names = [f"class_{i}" for i in range(num_classes)]
    else:
        if isinstance(class_names, str):
            raise ValueError("class_names must be a sequence of strings, got a single string.")
        names = list(class_names)
        if len(names) != num_classes:
            raise ValueError(f"class_names must have num_classes={num_classes} entries, got {len(names)}.")
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"class_names must all be strings, got {names!r}.")
        if len(set(names)) != len(names):
            raise ValueError(f"class_names must be distinct, got {names!r}.")

    class_indices = list(range(num_classes))
    result: dict[str, Any] = {
        "accuracy": float(sk_metrics.accuracy_score(y_true, y_pred)),
    }
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = sk_metrics.precision_recall_fscore_support(
            y_true, y_pred, labels=class_indices, average=average, zero_division=0
        )
        result[f"precision_{average}"] = float(precision)
        result[f"recall_{average}"] = float(recall)
        result[f"f1_{average}"] = float(f1)
    per_class_recall = sk_metrics.recall_score(y_true, y_pred, labels=class_indices, average=None, zero_division=0)
    result["true_positive_rate"] = {name: float(value) for name, value in zip(names, per_class_recall)}
    confusion = sk_metrics.confusion_matrix(y_true, y_pred, labels=class_indices)
    result["confusion_matrix"] = [[int(v) for v in row] for row in confusion]
    result["num_examples"] = int(y_true.shape[0])
    return result


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _summarize(values: list[Any], where: str, ddof: int) -> Any:
    """Recursive helper of :func:`summarize_repeats`; returns None for skipped entries."""
    first = values[0]
    if _is_scalar(first):
        if not all(_is_scalar(v) for v in values):
            raise ValueError(f"{where}: expected a number in every repeat, got {values!r}.")
        array = np.asarray(values, dtype=np.float64)
        return {"mean": float(array.mean()), "std": float(array.std(ddof=ddof))}
    if isinstance(first, Mapping):
        if not all(isinstance(v, Mapping) for v in values):
            raise ValueError(f"{where}: expected a dict in every repeat.")
        keys = list(first.keys())
        for i, v in enumerate(values[1:], start=1):
            if set(v.keys()) != set(keys):
                raise ValueError(
                    f"{where}: repeat {i} has keys {sorted(map(str, v.keys()))}, repeat 0 has {sorted(map(str, keys))}."
                )
        out = {}
        for key in keys:
            summary = _summarize([v[key] for v in values], f"{where}[{key!r}]", ddof)
            if summary is not None:
                out[key] = summary
        return out
    return None  # Lists (confusion matrices), strings, None: not scalars, left out.


def summarize_repeats(runs: Sequence[Mapping[str, Any]], *, ddof: int = 1) -> dict[str, Any]:
    """Mean and standard deviation of every scalar metric over repeated runs.

    The paper averages each metric over 3 (Sec. 4.3) or 5 (Sec. 5.2) random splits. Every number in
    the input dicts (at any depth of nested dicts, e.g. ``true_positive_rate[class]``) becomes
    ``{"mean": float, "std": float}`` at the same place; non-scalar entries such as
    ``confusion_matrix`` (a list) are left out of the result.

    The standard deviation is the *sample* standard deviation (``ddof=1``, divisor ``n - 1``) by
    default, the usual estimate of run-to-run spread; pass ``ddof=0`` for the population standard
    deviation (divisor ``n``), e.g. when only one run exists.

    Args:
      runs: a non-empty sequence of metric dicts with identical keys, e.g. the outputs of
        :func:`classification_metrics` for each repeat.
      ddof: delta degrees of freedom of the standard deviation: 1 (sample, default) or 0
        (population).

    Returns:
      A dict with the structure of ``runs[0]`` restricted to numbers, each number replaced by
      ``{"mean": float, "std": float}``.

    Raises:
      ValueError: if ``runs`` is empty, is not a sequence of dicts, the dicts' keys or value types
        differ between runs, ``ddof`` is not 0 or 1, or ``len(runs) <= ddof`` (the sample standard
        deviation of one run is undefined).
    """
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence):
        raise ValueError(f"runs must be a list of metric dicts, got {type(runs).__name__}.")
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population) or 1 (sample), got {ddof!r}.")
    if not runs:
        raise ValueError("runs is empty; need at least one metric dict.")
    if len(runs) <= ddof:
        raise ValueError(
            f"the sample standard deviation (ddof=1) needs at least 2 runs, got {len(runs)}; "
            "pass ddof=0 for the population standard deviation."
        )
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise ValueError(f"runs[{i}] must be a dict of metrics, got {type(run).__name__}.")
    return _summarize(list(runs), "runs", ddof)
