"""Markdown tables shaped like Tables 1, 3 and 4 of Morales et al. 2021.

Table 1 has one row per metric (accuracy, precision, recall, F1) and one column per arm
(FT-ResNet50, 0-occlusion, R-occlusion, 1-occlusion); Table 3 adds the macro / weighted averages
and one true-positive-rate row per class; Table 4 repeats the metrics on a randomly erased test
set. In all of them the best value of each row is in bold. :func:`metrics_table` and
:func:`robustness_table` render such tables in GitHub markdown from the dicts of
:func:`saliency_jax.evaluation.classification_metrics` or
:func:`saliency_jax.evaluation.summarize_repeats`.

A metric value is either a number or a ``{"mean": float, "std": float}`` dict (rendered
``0.875 ± 0.004``). All metrics here are higher-is-better. "Best" compares means rounded to the
printed number of decimals, so printed ties are all bold; a row is only bolded when at least two
columns have a finite value. A metric missing from an arm is printed ``n/a``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["metrics_table", "robustness_table", "METRIC_LABELS"]

#: Row labels of the paper's tables, by metric key of ``classification_metrics``.
METRIC_LABELS: dict[str, str] = {
    "accuracy": "Accuracy",
    "precision_macro": "Macro Precision",
    "recall_macro": "Macro Recall",
    "f1_macro": "Macro F1",
    "precision_weighted": "Weighted Precision",
    "recall_weighted": "Weighted Recall",
    "f1_weighted": "Weighted F1",
}

_DEFAULT_ROWS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)
_TPR_KEY = "true_positive_rate"

# A row: (label, path of keys into a metrics dict).
_Row = tuple[str, tuple[str, ...]]
# A cell value: (mean, std or None), or None when missing.
_Value = tuple[float, float | None] | None


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _lookup(metrics: Mapping[str, Any], path: tuple[str, ...], where: str) -> _Value:
    """Returns ``(mean, std)`` of the metric at ``path``, or None if it is missing."""
    value: Any = metrics
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    name = f"{where}{''.join(f'[{k!r}]' for k in path)}"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, Mapping) and "mean" in value:
        mean, std = value["mean"], value.get("std")
        if not (isinstance(mean, numbers.Real) and not isinstance(mean, bool)):
            raise ValueError(f"{name}['mean'] must be a number, got {mean!r}.")
        if std is not None and not (isinstance(std, numbers.Real) and not isinstance(std, bool)):
            raise ValueError(f"{name}['std'] must be a number, got {std!r}.")
        return float(mean), None if std is None else float(std)
    raise ValueError(f"{name} must be a number or a {{'mean', 'std'}} dict, got {value!r}.")


def _format(value: _Value, decimals: int, *, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    mean, std = value
    if math.isfinite(mean) and round(mean, decimals) == 0:
        mean = 0.0  # Avoids "-0.000".
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    if std is not None:
        text += f" ± {std:.{decimals}f}"
    return text


def _best_flags(values: list[_Value], decimals: int) -> list[bool]:
    """True for the cells holding the row's best (highest) rounded mean, if >= 2 are finite."""
    finite = [round(v[0], decimals) for v in values if v is not None and math.isfinite(v[0])]
    if len(finite) < 2:
        return [False] * len(values)
    best = max(finite)
    return [v is not None and math.isfinite(v[0]) and round(v[0], decimals) == best for v in values]


def _check_columns(columns: Any, name: str) -> None:
    if not isinstance(columns, Mapping) or not columns:
        raise ValueError(f"{name} must be a non-empty dict arm name -> metrics dict.")
    for arm, metrics in columns.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"{name}[{arm!r}] must be a metrics dict, got {type(metrics).__name__}.")


def _rows(rows: Sequence[str], per_class: bool, column_sets: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[_Row]:
    """Per-class TPR rows (Table 3 order: first) followed by the metric rows."""
    if isinstance(rows, str):
        raise ValueError(f"rows must be a sequence of metric names, got the string {rows!r}.")
    out: list[_Row] = []
    if per_class:
        class_names: dict[str, None] = {}
        for columns in column_sets:
            for metrics in columns.values():
                tpr = metrics.get(_TPR_KEY)
                if isinstance(tpr, Mapping):
                    class_names.update((str(name), None) for name in tpr)
        if not class_names:
            raise ValueError(f"per_class=True but no column has a {_TPR_KEY!r} dict.")
        out.extend((f"TPR {name}", (_TPR_KEY, name)) for name in class_names)
    out.extend((METRIC_LABELS.get(row, row), (row,)) for row in rows)
    return out


def _markdown(header: list[str], body: list[list[str]], aligns: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    lines.extend("| " + " | ".join(cells) + " |" for cells in body)
    return "\n".join(lines) + "\n"


def _check_decimals(decimals: Any) -> None:
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 10:
        raise ValueError(f"decimals must be an int in [0, 10], got {decimals!r}.")


def metrics_table(
    columns: Mapping[str, Mapping[str, Any]],
    rows: Sequence[str] = _DEFAULT_ROWS,
    *,
    per_class: bool = False,
    decimals: int = 3,
) -> str:
    """Markdown table with one row per metric and one column per arm (Morales 2021, Tables 1, 3).

    Example output for ``metrics_table({"baseline": {"accuracy": 0.846}, "0-occlusion":
    {"accuracy": {"mean": 0.875, "std": 0.004}}}, rows=("accuracy",))``::

      | Metric | baseline | 0-occlusion |
      | --- | ---: | ---: |
      | Accuracy | 0.846 | **0.875 ± 0.004** |

    Args:
      columns: dict arm name -> metrics dict (from ``classification_metrics`` or
        ``summarize_repeats``); the columns appear in the dict's order.
      rows: metric keys, one row each, in order; labelled with :data:`METRIC_LABELS` (e.g.
        ``"precision_macro"`` -> "Macro Precision"), other keys verbatim.
      per_class: if True, first add one row ``TPR <class>`` per class of the columns'
        ``true_positive_rate`` dicts (Table 3), in order of first appearance.
      decimals: number of decimals printed (and compared for "best").

    Returns:
      The markdown table, one line per row, ending with a newline. The best value of each row is
      in ``**bold**`` (see the module docstring for ties and missing values).

    Raises:
      ValueError: if ``columns`` is empty or not a dict of dicts, a metric value is neither a
        number nor a ``{"mean", "std"}`` dict, ``rows`` is a string, ``decimals`` is not an int in
        [0, 10], or ``per_class`` is True and no column has ``true_positive_rate``.
    """
    _check_columns(columns, "columns")
    _check_decimals(decimals)
    body = []
    for label, path in _rows(rows, per_class, [columns]):
        values = [_lookup(metrics, path, f"columns[{arm!r}]") for arm, metrics in columns.items()]
        flags = _best_flags(values, decimals)
        cells = [f"**{_format(v, decimals)}**" if bold else _format(v, decimals) for v, bold in zip(values, flags)]
        body.append([_escape(label)] + cells)
    header = ["Metric"] + [_escape(arm) for arm in columns]
    return _markdown(header, body, ["---"] + ["---:"] * len(columns))


def robustness_table(
    clean: Mapping[str, Mapping[str, Any]],
    erased: Mapping[str, Mapping[str, Any]],
    rows: Sequence[str] = _DEFAULT_ROWS,
    *,
    per_class: bool = False,
    decimals: int = 3,
) -> str:
    """Markdown table of clean vs randomly-erased test metrics per arm (Morales 2021, Table 4).

    For each arm (in the order of ``clean``) three columns: ``<arm> clean``, ``<arm> erased`` and
    ``<arm> drop`` = erased mean - clean mean, printed with a sign (negative: the metric fell on
    the erased test set). In each row the best ``erased`` value and, separately, the best
    (highest, i.e. smallest loss) ``drop`` across arms are in bold, as Table 4 bolds the best
    erased result. The drop carries no ``± std`` (the runs' correlation is unknown).

    Example output for ``robustness_table({"a": {"accuracy": 0.9}, "b": {"accuracy": 0.8}},
    {"a": {"accuracy": 0.6}, "b": {"accuracy": 0.7}}, rows=("accuracy",))``::

      | Metric | a clean | a erased | a drop | b clean | b erased | b drop |
      | --- | ---: | ---: | ---: | ---: | ---: | ---: |
      | Accuracy | 0.900 | 0.600 | -0.300 | 0.800 | **0.700** | **-0.100** |

    Args:
      clean: dict arm name -> metrics dict on the clean test set.
      erased: dict arm name -> metrics dict on the erased test set; the same arms as ``clean``.
      rows: metric keys, one row each (labels as in :func:`metrics_table`).
      per_class: if True, first add one ``TPR <class>`` row per class (as in Table 3).
      decimals: number of decimals printed (and compared for "best").

    Returns:
      The markdown table, ending with a newline.

    Raises:
      ValueError: if ``clean`` or ``erased`` is empty or not a dict of dicts, their arms differ,
        a metric value is malformed, or ``decimals`` / ``rows`` / ``per_class`` is invalid (see
        :func:`metrics_table`).
    """
    _check_columns(clean, "clean")
    _check_columns(erased, "erased")
    _check_decimals(decimals)
    if set(clean) != set(erased):
        raise ValueError(f"clean and erased must have the same arms, got {list(clean)} and {list(erased)}.")
    arms = list(clean)
    body = []
    for label, path in _rows(rows, per_class, [clean, erased]):
        clean_values = [_lookup(clean[a], path, f"clean[{a!r}]") for a in arms]
        erased_values = [_lookup(erased[a], path, f"erased[{a!r}]") for a in arms]
        drops: list[_Value] = [
            None if c is None or e is None else (e[0] - c[0], None) for c, e in zip(clean_values, erased_values)
        ]
        erased_best = _best_flags(erased_values, decimals)
        drop_best = _best_flags(drops, decimals)
        cells = [_escape(label)]
        for c, e, d, e_bold, d_bold in zip(clean_values, erased_values, drops, erased_best, drop_best):
            cells.append(_format(c, decimals))
            cells.append(f"**{_format(e, decimals)}**" if e_bold else _format(e, decimals))
            drop_text = _format(d, decimals, signed=True)
            cells.append(f"**{drop_text}**" if d_bold else drop_text)
        body.append(cells)
    header = ["Metric"]
    for arm in arms:
        header += [f"{_escape(arm)} clean", f"{_escape(arm)} erased", f"{_escape(arm)} drop"]
    return _markdown(header, body, ["---"] + ["---:"] * (3 * len(arms)))
