"""Per-subgroup utility and fairness gaps of binary classifiers, with bootstrap replicates for CIs.

Point estimates come from ``fairlearn`` (``MetricFrame`` and ``fairlearn.metrics``); the weighted,
vectorised re-implementations here exist only for the bootstrap, and agree with fairlearn/sklearn exactly
(up to float rounding) at unit weights and at integer weights (= the data with rows repeated).

Bootstrap scheme: ``bootstrap_weights`` draws a ``(B, n)`` matrix of multinomial resampling counts over the
test examples. Reuse the SAME matrix for every run evaluated on the same test set: replicate ``b`` then
resamples the same examples for each run, so differences between runs are paired bootstrap differences.

Sharp edges:

- Examples are resampled independently. If a test set holds several examples per patient, resample
  patients instead (build the counts per patient and repeat them per example), or the CI is too narrow.
- Group labels are strings (``str(value)``), sorted as strings ("10" sorts before "9").
- Undefined values (one class present, zero total weight) are ``nan``, never an exception or a warning.
- A group is ``small`` (unreliable, flagged but kept in tables) if it has fewer than ``min_group_size``
  examples or fewer than 5 positives or 5 negatives; gaps use the non-small ("eligible") groups only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    equalized_odds_difference,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from dptrain.evaluate.metrics import (
    DEFAULT_N_BINS,
    binary_inputs,
    expected_calibration_error,
)

__all__ = [
    "DEFAULT_MIN_GROUP_SIZE",
    "GAPS",
    "METRICS",
    "Grouping",
    "bootstrap_weights",
    "gaps",
    "gaps_boot",
    "group_metrics_boot",
    "group_table",
    "groupings",
    "percentile_ci",
    "weighted_metrics",
]

METRICS = ("n", "auroc", "auprc", "accuracy", "ece", "tpr", "fnr", "fpr", "selection_rate")
GAPS = (
    "worst_group_auroc",
    "auroc_gap",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "fnr_gap",
    "accuracy_spd",
)
DEFAULT_MIN_GROUP_SIZE = 30
MIN_CLASS_COUNT = 5  # a group with fewer positives (or negatives) than this is flagged small
INTERSECTION_SEP = " / "
_CHUNK_ELEMENTS = (
    1 << 17
)  # replicates are processed in chunks of ~128K (B x n) entries: cache-sized, bounded memory


@dataclass(frozen=True)
class Grouping:
    """One way of splitting the test rows into groups.

    ``labels[i]`` is the group of row ``i`` (a ``str``); for an intersection of attributes the labels of
    each attribute are joined with ``" / "`` in the order of ``attributes``.
    """

    name: str
    attributes: tuple[str, ...]
    labels: np.ndarray

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=object)
        if labels.ndim != 1:
            raise ValueError(f"Grouping {self.name!r}: expected labels of shape (n,), got {labels.shape}")
        object.__setattr__(self, "labels", labels)

    @property
    def groups(self) -> list[str]:
        """Distinct group labels, sorted."""
        return sorted(set(self.labels.tolist()))


def groupings(sensitive: pd.DataFrame, *, intersection: bool = True) -> list[Grouping]:
    """One ``Grouping`` per column of ``sensitive`` (column order), plus, if there are at least two columns
    and ``intersection`` is true, the intersection of all columns (name ``"a × b × c"``).

    Raises:
        ValueError: if a column has missing values (named), or there are no columns.
    """
    if not isinstance(sensitive, pd.DataFrame):
        raise ValueError(
            f"sensitive: expected a pandas DataFrame with one column per sensitive attribute, "
            f"got {type(sensitive).__name__}"
        )
    if sensitive.shape[1] == 0:
        raise ValueError("sensitive: has no columns; fix: pass at least one sensitive attribute")
    columns = [str(c) for c in sensitive.columns]
    per_column: list[np.ndarray] = []
    for col, name in zip(sensitive.columns, columns, strict=True):
        values = sensitive[col]
        if values.isna().any():
            raise ValueError(
                f"sensitive: column {name!r} has missing values; "
                f"fix: fill them with an explicit category (e.g. 'unknown') or drop those rows from the test set"
            )
        per_column.append(np.array([str(v) for v in values], dtype=object))
    result = [Grouping(name, (name,), labels) for name, labels in zip(columns, per_column, strict=True)]
    if intersection and len(columns) >= 2:
        joined = np.array(
            [INTERSECTION_SEP.join(parts) for parts in zip(*per_column, strict=True)], dtype=object
        )
        result.append(Grouping(" × ".join(columns), tuple(columns), joined))
    return result


def bootstrap_weights(n: int, n_boot: int, *, seed: int) -> np.ndarray:
    """``(n_boot, n)`` int32 multinomial resampling counts (each row sums to ``n``), from
    ``numpy.random.default_rng(seed)``. Reuse one matrix for all runs on the same test set (paired)."""
    for name, value in (("n", n), ("n_boot", n_boot)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(int(n), np.full(int(n), 1.0 / int(n)), size=int(n_boot)).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# input validation


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.integer | np.floating):
        raise ValueError(f"threshold: must be a number in [0, 1], got {threshold!r}; fix: e.g. threshold=0.5")
    if not 0.0 <= float(threshold) <= 1.0:  # also rejects NaN
        raise ValueError(
            f"threshold: must be in [0, 1], got {threshold!r}; "
            f"fix: pass a probability threshold fixed in advance (default 0.5), not a logit"
        )
    return float(threshold)


def _check_inputs(y, score) -> tuple[np.ndarray, np.ndarray]:
    return binary_inputs(y, score, "y", "score")


def _check_weights(weights, n: int) -> np.ndarray:
    w = np.asarray(weights)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(
            f"weights: expected shape (B, {n}) (one row of resampling counts per bootstrap replicate) or "
            f"({n},), got {np.asarray(weights).shape}; fix: use bootstrap_weights(n, B, seed=...)"
        )
    if w.dtype.kind not in "iuf":
        raise ValueError(f"weights: expected numeric counts, got dtype {w.dtype}")
    if w.dtype.kind == "f" and not np.all(np.isfinite(w)):
        raise ValueError("weights: contains NaN or infinite values")
    if w.size and w.min() < 0:
        raise ValueError("weights: must be non-negative resampling counts")
    return w


def _check_grouping(grouping: Grouping, n: int) -> np.ndarray:
    if not isinstance(grouping, Grouping):
        raise ValueError(f"grouping: expected a Grouping (see groupings()), got {type(grouping).__name__}")
    if grouping.labels.shape[0] != n:
        raise ValueError(
            f"grouping {grouping.name!r}: has {grouping.labels.shape[0]} labels but y has {n} rows; "
            f"fix: build the grouping from the sensitive attributes of the same test rows, in the same order"
        )
    return grouping.labels


# ----------------------------------------------------------------------------------------------------------
# weighted, vectorised metrics (bootstrap)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with ``nan`` where ``den <= 0``, without warnings."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _weighted_core(
    y: np.ndarray, s: np.ndarray, w: np.ndarray, cols: np.ndarray | None, threshold: float
) -> dict[str, np.ndarray]:
    """Weighted metrics of columns ``cols`` of ``w`` (all if None); ``y``, ``s`` are already restricted.

    Rows are sorted by descending score once. Then every quantity is a difference of cumulative sums along
    that order: predictions (``score >= threshold``) are a prefix, each ECE bin is a contiguous range, and
    the ROC / precision-recall points are read at the last row of each block of tied scores. Also returns
    ``"_correct"``, the weighted number of correct predictions (for the accuracy SPD).
    """
    n_rows = y.shape[0]
    order = np.argsort(-s, kind="stable")  # descending scores
    s_sorted = s[order]
    pos = y[order] == 1
    gather = order if cols is None else cols[order]
    # 1 + index of the last row of each block of tied scores (positions in the zero-padded cumsums below)
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True]) + 1
    tied = ends.shape[0] < n_rows
    n_pred = int(np.count_nonzero(s_sorted >= threshold))  # predicted positive = the first n_pred rows
    # ECE bins [b/15, (b+1)/15) as in metrics.py; bin b holds sorted rows [first[b], last[b])
    edges = np.linspace(0.0, 1.0, DEFAULT_N_BINS + 1)
    bins = np.clip(np.searchsorted(edges, s_sorted, side="right") - 1, 0, DEFAULT_N_BINS - 1)
    bin_ids = np.arange(DEFAULT_N_BINS)
    first = np.count_nonzero(bins[None, :] > bin_ids[:, None], axis=1)
    last = np.count_nonzero(bins[None, :] >= bin_ids[:, None], axis=1)

    n_boot = w.shape[0]
    out = {name: np.empty(n_boot) for name in ("n", "n_pos", "tp", "fp", "sel", "ece_sum", "auroc", "auprc")}
    chunk = max(1, _CHUNK_ELEMENTS // max(n_rows, 1))
    for lo in range(0, n_boot, chunk):  # chunks of replicates (bounded memory), each fully vectorised
        hi = min(lo + chunk, n_boot)
        ws = w[lo:hi][:, gather].astype(np.float64)
        # zero-padded cumulative sums: column j = sum over the first j sorted rows
        cum_all = np.zeros((hi - lo, n_rows + 1))
        cum_pos = np.zeros_like(cum_all)
        cum_score = np.zeros_like(cum_all)
        np.cumsum(ws, axis=1, out=cum_all[:, 1:])
        np.cumsum(ws * s_sorted, axis=1, out=cum_score[:, 1:])
        ws *= pos
        np.cumsum(ws, axis=1, out=cum_pos[:, 1:])
        del ws
        total, p_tot = cum_all[:, -1], cum_pos[:, -1]
        out["n"][lo:hi], out["n_pos"][lo:hi] = total, p_tot
        out["tp"][lo:hi] = cum_pos[:, n_pred]
        out["fp"][lo:hi] = cum_all[:, n_pred] - cum_pos[:, n_pred]
        out["sel"][lo:hi] = cum_all[:, n_pred]
        residual = (cum_pos[:, last] - cum_pos[:, first]) - (cum_score[:, last] - cum_score[:, first])
        out["ece_sum"][lo:hi] = np.abs(residual).sum(axis=1)  # sum_b |sum_{i in b} w_i (y_i - p_i)|

        # ROC / PR points: tp[:, k], fp[:, k] = weighted TP, FP when predicting score >= score of block k
        tp = cum_pos[:, ends] if tied else cum_pos[:, 1:]
        n_above = cum_all[:, ends] if tied else cum_all[:, 1:]
        fp = n_above - tp
        tp_blk = np.diff(tp, axis=1, prepend=0.0)
        fp_blk = np.diff(fp, axis=1, prepend=0.0)
        n_tot = total - p_tot
        defined = (p_tot > 0) & (n_tot > 0)
        # ROC AUC: sum over blocks of dFP * (TP before the block + dTP / 2)  (trapezoid; ties count 1/2)
        area = np.einsum("ij,ij->i", fp_blk, tp - 0.5 * tp_blk)
        out["auroc"][lo:hi] = np.where(defined, _ratio(area, p_tot * n_tot), np.nan)
        # average precision: sum over blocks of dTP * precision / P (sklearn's step-wise, no interpolation)
        precision = np.zeros_like(tp)
        np.divide(tp, n_above, out=precision, where=n_above > 0)
        ap = np.einsum("ij,ij->i", tp_blk, precision)
        out["auprc"][lo:hi] = np.where(defined, _ratio(ap, p_tot), np.nan)

    total, n_pos = out["n"], out["n_pos"]
    n_neg = total - n_pos
    correct = out["tp"] + (n_neg - out["fp"])
    tpr = _ratio(out["tp"], n_pos)
    return {
        "n": total,
        "auroc": out["auroc"],
        "auprc": out["auprc"],
        "accuracy": _ratio(correct, total),
        "ece": _ratio(out["ece_sum"], total),
        "tpr": tpr,
        "fnr": 1.0 - tpr,
        "fpr": _ratio(out["fp"], n_neg),
        "selection_rate": _ratio(out["sel"], total),
        "_correct": correct,
    }


def weighted_metrics(y, score, weights, *, threshold: float) -> dict[str, np.ndarray]:
    """Every metric in ``METRICS`` per bootstrap replicate, as ``(B,)`` float arrays.

    ``weights``: ``(B, n)`` non-negative counts (``(n,)`` is treated as ``B = 1``); integer weights give
    exactly the metric of the data with each row repeated ``weight`` times. With ``pred = score >= threshold``:
    ``n`` = sum of weights; ``auroc`` = ROC AUC with tied scores counted 1/2 (= ``roc_auc_score`` with
    ``sample_weight``); ``auprc`` = average precision (= ``average_precision_score``); ``accuracy``;
    ``ece`` = ``metrics.expected_calibration_error`` (15 equal bins), weighted; ``tpr`` (recall),
    ``fnr = 1 - tpr``, ``fpr``, ``selection_rate`` = weighted mean of ``pred``.

    Undefined values are ``nan`` (no warning): ``auroc``/``auprc`` without both classes, ``tpr``/``fnr``
    without positives, ``fpr`` without negatives, everything but ``n`` at zero total weight.
    Vectorised over replicates: scores are sorted once and tied scores grouped into blocks.
    """
    threshold = _check_threshold(threshold)
    y, s = _check_inputs(y, score)
    w = _check_weights(weights, y.shape[0])
    out = _weighted_core(y, s, w, None, threshold)
    return {name: out[name] for name in METRICS}


# ----------------------------------------------------------------------------------------------------------
# point estimates (fairlearn)


def _auroc(y_true, y_score) -> float:
    y_true = np.asarray(y_true)
    if not (np.any(y_true == 0) and np.any(y_true == 1)):
        return math.nan
    return float(roc_auc_score(y_true, y_score))


def _auprc(y_true, y_score) -> float:
    y_true = np.asarray(y_true)
    if not (np.any(y_true == 0) and np.any(y_true == 1)):
        return math.nan
    return float(average_precision_score(y_true, y_score))


def _point_metric_functions(threshold: float) -> dict:
    """Metric functions of ``(y_true, score)`` for ``MetricFrame``. fairlearn's rates return 0 (not nan)
    when the conditioning class is absent, so they are guarded to nan here."""

    def pred(s):
        return (np.asarray(s) >= threshold).astype(np.int64)

    def has(y, label) -> bool:
        return bool(np.any(np.asarray(y) == label))

    return {
        "n": count,
        "n_pos": lambda y, s: int(np.sum(np.asarray(y) == 1)),
        "auroc": _auroc,
        "auprc": _auprc,
        "accuracy": lambda y, s: float(accuracy_score(y, pred(s))),
        "ece": lambda y, s: expected_calibration_error(y, s),
        "tpr": lambda y, s: float(true_positive_rate(y, pred(s), pos_label=1)) if has(y, 1) else math.nan,
        "fnr": lambda y, s: float(false_negative_rate(y, pred(s), pos_label=1)) if has(y, 1) else math.nan,
        "fpr": lambda y, s: float(false_positive_rate(y, pred(s), pos_label=1)) if has(y, 0) else math.nan,
        "selection_rate": lambda y, s: float(selection_rate(y, pred(s), pos_label=1)),
    }


def group_table(
    y, score, grouping: Grouping, *, threshold: float, min_group_size: int = DEFAULT_MIN_GROUP_SIZE
) -> pd.DataFrame:
    """Point estimates per group via ``fairlearn.metrics.MetricFrame``.

    One row per group (sorted by label); columns ``group, n, n_pos, auroc, ..., selection_rate, small``.
    ``small`` is true if ``n < min_group_size`` or the group has fewer than 5 positives or 5 negatives:
    the estimate is unreliable. Small groups are flagged, not dropped.
    """
    threshold = _check_threshold(threshold)
    y, s = _check_inputs(y, score)
    labels = _check_grouping(grouping, y.shape[0])
    frame = MetricFrame(
        metrics=_point_metric_functions(threshold),
        y_true=y,
        y_pred=s,
        sensitive_features=pd.Series(labels, name=grouping.name, dtype=object),
    )
    by_group = frame.by_group.reindex(grouping.groups)
    table = pd.DataFrame({"group": list(grouping.groups)})
    table["n"] = by_group["n"].to_numpy(dtype=np.int64)
    table["n_pos"] = by_group["n_pos"].to_numpy(dtype=np.int64)
    for name in METRICS[1:]:
        table[name] = by_group[name].to_numpy(dtype=np.float64)
    n_neg = table["n"] - table["n_pos"]
    table["small"] = (
        (table["n"] < min_group_size) | (table["n_pos"] < MIN_CLASS_COUNT) | (n_neg < MIN_CLASS_COUNT)
    )
    return table


def gaps(
    y, score, grouping: Grouping, *, threshold: float, min_group_size: int = DEFAULT_MIN_GROUP_SIZE,
    table: pd.DataFrame | None = None,
) -> dict[str, float]:
    """Point estimates of the ``GAPS`` over the eligible (non-small, see ``group_table``) groups.

    All ``nan`` if fewer than 2 groups are eligible. With ``pred = score >= threshold``:

    - ``worst_group_auroc``: min group AUROC; ``auroc_gap``: max - min group AUROC.
    - ``demographic_parity_difference``, ``equalized_odds_difference``: fairlearn's functions (between groups,
      ``agg="worst_case"``: max of the TPR and FPR ranges) on the rows of the eligible groups.
    - ``fnr_gap``: max - min group FNR (the underdiagnosis gap).
    - ``accuracy_spd``: statistical parity difference on accuracy (Tayebi Arasteh et al. 2024, Commun Med),
      ``P(pred = y | unprivileged) - P(pred = y | privileged)``. No group is privileged a priori: each
      eligible group in turn is "unprivileged" against all other eligible rows, and the MOST NEGATIVE value
      is reported (the most disadvantaged group; negative = that group is less accurate than the rest).
    """
    threshold = _check_threshold(threshold)
    if table is None:  # pass group_table's result for the same inputs to skip recomputing it
        table = group_table(y, score, grouping, threshold=threshold, min_group_size=min_group_size)
    eligible = table.loc[~table["small"], "group"].tolist()
    if len(eligible) < 2:
        return dict.fromkeys(GAPS, math.nan)
    y, s = _check_inputs(y, score)
    labels = grouping.labels
    rows = np.isin(labels, np.array(eligible, dtype=object))
    pred = (s >= threshold).astype(np.int64)
    elig = table.loc[~table["small"]]
    correct = pred == y
    spd = [float(np.mean(correct[labels == g]) - np.mean(correct[rows & (labels != g)])) for g in eligible]
    return {
        "worst_group_auroc": float(elig["auroc"].min()),
        "auroc_gap": float(elig["auroc"].max() - elig["auroc"].min()),
        "demographic_parity_difference": float(
            demographic_parity_difference(y[rows], pred[rows], sensitive_features=labels[rows])
        ),
        "equalized_odds_difference": float(
            equalized_odds_difference(y[rows], pred[rows], sensitive_features=labels[rows])
        ),
        "fnr_gap": float(elig["fnr"].max() - elig["fnr"].min()),
        "accuracy_spd": min(spd),
    }


# ----------------------------------------------------------------------------------------------------------
# bootstrap per group


def _group_core(y, s, labels, w, groups, threshold) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for g in groups:
        cols = np.flatnonzero(labels == g)
        out[g] = _weighted_core(y[cols], s[cols], w, cols, threshold)
    return out


def group_metrics_boot(
    y, score, grouping: Grouping, weights, *, threshold: float
) -> dict[str, dict[str, np.ndarray]]:
    """``{group label: weighted_metrics(...)}`` on that group's rows, with the same weight matrix columns
    (so replicate ``b`` of every group and every run comes from the same resample)."""
    threshold = _check_threshold(threshold)
    y, s = _check_inputs(y, score)
    labels = _check_grouping(grouping, y.shape[0])
    w = _check_weights(weights, y.shape[0])
    core = _group_core(y, s, labels, w, grouping.groups, threshold)
    return {g: {name: m[name] for name in METRICS} for g, m in core.items()}


def _spread(x: np.ndarray) -> np.ndarray:
    """max - min over groups (axis 0); nan if any group is nan."""
    return np.max(x, axis=0) - np.min(x, axis=0)


def gaps_boot(
    y, score, grouping: Grouping, weights, *, threshold: float, eligible: list[str]
) -> dict[str, np.ndarray]:
    """The ``GAPS`` per bootstrap replicate, ``(B,)`` arrays, over the given ``eligible`` group labels.

    Fix ``eligible`` from the original sample (``group_table``'s non-small groups) so replicates are
    comparable. Same definitions as ``gaps``, from the weighted metrics: DPD = max - min selection rate,
    EOD = max(max - min TPR, max - min FPR) (fairlearn's ``worst_case``). A replicate in which a needed
    group metric is undefined (e.g. a group drew no positives) gives ``nan`` for that gap; all ``nan`` if
    fewer than 2 groups are eligible.
    """
    threshold = _check_threshold(threshold)
    y, s = _check_inputs(y, score)
    labels = _check_grouping(grouping, y.shape[0])
    w = _check_weights(weights, y.shape[0])
    eligible = list(dict.fromkeys(eligible))
    unknown = sorted(set(eligible) - set(grouping.groups))
    if unknown:
        raise ValueError(
            f"eligible: labels {unknown[:5]} are not groups of {grouping.name!r} "
            f"(groups: {grouping.groups[:10]}); fix: take them from group_table(...)['group']"
        )
    n_boot = w.shape[0]
    if len(eligible) < 2:
        return {name: np.full(n_boot, np.nan) for name in GAPS}
    core = _group_core(y, s, labels, w, eligible, threshold)

    def stack(name):
        return np.stack([core[g][name] for g in eligible])

    auroc = stack("auroc")
    n = stack("n")
    correct = stack("_correct")
    rest_acc = _ratio(correct.sum(axis=0) - correct, n.sum(axis=0) - n)
    spd = stack("accuracy") - rest_acc
    return {
        "worst_group_auroc": np.min(auroc, axis=0),
        "auroc_gap": _spread(auroc),
        "demographic_parity_difference": _spread(stack("selection_rate")),
        "equalized_odds_difference": np.maximum(_spread(stack("tpr")), _spread(stack("fpr"))),
        "fnr_gap": _spread(stack("fnr")),
        "accuracy_spd": np.min(spd, axis=0),
    }


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval ``(q_{(1-level)/2}, q_{(1+level)/2})`` of the finite replicates
    (``nan``/``inf`` ignored); ``(nan, nan)`` if fewer than 10 are finite."""
    if isinstance(level, bool) or not isinstance(level, int | float | np.floating) or not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level!r}; fix: e.g. level=0.95")
    x = np.asarray(samples, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size < 10:
        return (math.nan, math.nan)
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.percentile(x, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return (float(lo), float(hi))
