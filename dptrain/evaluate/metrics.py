"""Utility metrics for classifiers, computed from predicted probabilities.

``utility_metrics(y_true, scores, threshold=0.5)`` returns a ``dict[str, float]``. Definitions:

Binary (``scores`` of shape ``(n,)`` = P(y=1), or ``(n, 2)`` class probabilities; column 1 is P(y=1)):

- ``accuracy``: fraction of examples with ``(p >= threshold) == y``. The threshold is fixed and public
  (default 0.5); it is never tuned on the evaluation set.
- ``auroc``: area under the ROC curve (``sklearn.metrics.roc_auc_score``).
- ``auprc``: average precision, the step-wise area under the precision-recall curve
  (``sklearn.metrics.average_precision_score``; no linear interpolation).
- ``brier``: ``mean((p - y)^2)``, range [0, 1] (``sklearn.metrics.brier_score_loss``).
- ``ece``: expected calibration error of the positive-class probability, see below.
- ``n``: number of examples; ``positive_rate``: fraction of examples with ``y == 1``.

If the evaluation set holds only one class, AUROC and AUPRC are undefined and are reported as
``float('nan')`` (no exception, no warning); the other metrics are still computed.

Multiclass (``scores`` of shape ``(n, C)``, ``C > 2``, rows summing to 1; labels are ``0 .. C-1``):

- ``accuracy``: fraction with ``argmax_c p_ic == y_i`` (``threshold`` does not apply).
- ``auroc``: macro average over classes of the one-vs-rest AUROC of column ``c``.
- ``auprc``: macro average over classes of the one-vs-rest average precision of column ``c``.
  If any class is absent from ``y_true`` its one-vs-rest curve is undefined, so ``auroc`` and
  ``auprc`` are ``nan`` (not an average over the classes present).
- ``brier``: ``mean_i sum_c (p_ic - 1[y_i == c])^2`` over the one-hot labels, range [0, 2]
  (Brier's original definition, sklearn's multiclass convention; for two classes it is twice the
  binary ``brier``).
- ``ece``: expected calibration error of the top-label confidence ``max_c p_ic`` against
  ``1[argmax_c p_ic == y_i]``.
- ``n``; there is no ``positive_rate``.

``per_class_auroc(y_true, probs, classes)``: ``{class name: one-vs-rest AUROC}`` (column ``c`` against
``y_true == c``; ``nan`` for a class absent from ``y_true`` or alone in it). With every class present their
unweighted mean is the multiclass ``auroc`` (= ``roc_auc_score(multi_class="ovr", average="macro")``).

Expected calibration error (``expected_calibration_error``): split [0, 1] into ``n_bins`` (default 15)
equal-width bins ``B_b = [b/n_bins, (b+1)/n_bins)``, the last one closed at 1.0. With ``n_b`` examples in
bin ``b``, ``ECE = sum_b (n_b / n) * |mean_{i in B_b} y_i - mean_{i in B_b} p_i|``. Empty bins contribute 0.

Invalid inputs (mismatched lengths, NaN or infinite scores, probabilities outside [0, 1], rows not summing
to 1, labels that are not 0/1 or 0..C-1) raise ``ValueError`` naming the argument, the problem and the fix.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

__all__ = ["expected_calibration_error", "per_class_auroc", "utility_metrics"]

DEFAULT_N_BINS = 15
_ROW_SUM_ATOL = 1e-4  # tolerates float32 softmax outputs, catches logits and unnormalised scores


def _as_labels(y_true, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(
            f"{name}: expected a 1-D array of class labels, got shape {y.shape}; "
            f"fix: pass integer labels of shape (n,) (e.g. y.ravel(), or y.argmax(1) for one-hot labels)"
        )
    if y.shape[0] == 0:
        raise ValueError(f"{name}: is empty; fix: evaluate on at least one example")
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind not in "iuf":
        raise ValueError(
            f"{name}: expected numeric class labels, got dtype {y.dtype}; "
            f"fix: encode the labels as integers 0..C-1 (positive class = 1 for binary)"
        )
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise ValueError(
                f"{name}: contains NaN or infinite values; fix: drop or impute unlabelled examples"
            )
        if not np.all(y == np.round(y)):
            raise ValueError(
                f"{name}: contains non-integer values; fix: pass class labels 0..C-1, not probabilities"
            )
    return y.astype(np.int64)


def _as_probabilities(scores, name: str) -> np.ndarray:
    s = np.asarray(scores)
    if s.dtype.kind == "b" or s.dtype.kind not in "iuf":
        raise ValueError(
            f"{name}: expected numeric probabilities, got dtype {s.dtype}; "
            f"fix: pass predicted probabilities as floats in [0, 1]"
        )
    s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError(
            f"{name}: contains {int(np.isnan(s).sum())} NaN value(s); "
            f"fix: check the model's outputs (diverged training or NaN inputs) before evaluating"
        )
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise ValueError(
            f"{name}: probabilities must lie in [0, 1], got values in [{s.min():.6g}, {s.max():.6g}]; "
            f"fix: pass probabilities, not logits (apply a sigmoid for binary, a softmax for multiclass)"
        )
    return s


def _check_binary_labels(y: np.ndarray, name: str = "y_true") -> None:
    bad = np.setdiff1d(np.unique(y), [0, 1])
    if bad.size:
        raise ValueError(
            f"{name}: binary labels must be 0 or 1, got other values {bad[:5].tolist()}; "
            f"fix: encode the positive class as 1 and the negative as 0, or pass scores of shape (n, C) "
            f"for a multiclass problem"
        )


def _check_same_length(y: np.ndarray, s: np.ndarray, name: str) -> None:
    if s.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: has {s.shape[0]} rows but y_true has {y.shape[0]} labels; "
            f"fix: pass one score (row) per label, in the same order"
        )


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins: must be a positive integer, got {n_bins!r}; fix: use e.g. n_bins=15")
    return int(n_bins)


def _binned_calibration_error(correct: np.ndarray, confidence: np.ndarray, n_bins: int) -> float:
    """ECE of ``confidence`` against the 0/1 outcomes ``correct``; bins ``[b/n_bins, (b+1)/n_bins)``."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="right") - 1 puts x in the bin whose left edge is <= x; 1.0 goes to the last bin.
    idx = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(idx, weights=confidence, minlength=n_bins)
    sum_correct = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    filled = counts > 0
    gaps = np.abs(sum_correct[filled] - sum_conf[filled]) / counts[filled]
    return float(np.sum(counts[filled] / confidence.shape[0] * gaps))


def binary_inputs(y_true, prob_pos, y_name: str, p_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0/1 labels and positive-class probabilities of shape (n,); errors name the arguments."""
    y = _as_labels(y_true, y_name)
    _check_binary_labels(y, y_name)
    p = _as_probabilities(prob_pos, p_name)
    if p.ndim != 1:
        raise ValueError(
            f"{p_name}: expected shape (n,) with the positive-class probability, got shape {p.shape}; "
            f"fix: pass probs[:, 1] for two-column class probabilities"
        )
    _check_same_length(y, p, p_name)
    return y, p


def expected_calibration_error(y_true, prob_pos, n_bins: int = DEFAULT_N_BINS) -> float:
    """Expected calibration error of binary positive-class probabilities.

    ``ECE = sum_b (n_b / n) * |mean(y in bin b) - mean(prob_pos in bin b)|`` over ``n_bins`` equal-width
    bins ``[b/n_bins, (b+1)/n_bins)`` of [0, 1] (the last bin includes 1.0); empty bins contribute 0.

    Args:
        y_true: labels in {0, 1}, shape (n,).
        prob_pos: predicted probability of the positive class, shape (n,), values in [0, 1].
        n_bins: number of equal-width bins (default 15).

    Raises:
        ValueError: on mismatched shapes, NaN or out-of-range probabilities, non-binary labels or a bad
            ``n_bins``.
    """
    n_bins = _check_n_bins(n_bins)
    y, p = binary_inputs(y_true, prob_pos, "y_true", "prob_pos")
    return _binned_calibration_error(y, p, n_bins)


def _binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    both_classes = bool(np.any(y == 0) and np.any(y == 1))
    return {
        "accuracy": float(np.mean((p >= threshold).astype(np.int64) == y)),
        "auroc": float(roc_auc_score(y, p)) if both_classes else math.nan,
        "auprc": float(average_precision_score(y, p, pos_label=1)) if both_classes else math.nan,
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "ece": _binned_calibration_error(y, p, DEFAULT_N_BINS),
        "n": int(y.shape[0]),
        "positive_rate": float(np.mean(y == 1)),
    }


def _multiclass_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    n, n_classes = probs.shape
    onehot = np.zeros_like(probs)
    onehot[np.arange(n), y] = 1.0
    all_present = bool(np.all(onehot.any(axis=0)))
    pred = probs.argmax(axis=1)
    correct = pred == y
    # The multilabel-indicator path of sklearn averages the per-column (one-vs-rest) binary scores.
    return {
        "accuracy": float(np.mean(correct)),
        "auroc": float(roc_auc_score(onehot, probs, average="macro")) if all_present else math.nan,
        "auprc": float(average_precision_score(onehot, probs, average="macro")) if all_present else math.nan,
        # Computed here: sklearn's brier_score_loss handles multiclass only from 1.7 (project floor is 1.4).
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "ece": _binned_calibration_error(correct, probs.max(axis=1), DEFAULT_N_BINS),
        "n": int(n),
    }


def utility_metrics(y_true: np.ndarray, scores: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, AUROC, AUPRC, Brier score and ECE of predicted probabilities (see the module docstring).

    Args:
        y_true: class labels, shape (n,): 0/1 for binary, 0..C-1 for multiclass.
        scores: probabilities: shape (n,) = P(y=1) or (n, 2) for binary; (n, C), C > 2, rows summing to 1,
            for multiclass.
        threshold: fixed, public decision threshold for binary accuracy (predict 1 when ``p >= threshold``).
            Must be in [0, 1]. Multiclass accuracy uses the argmax; passing another threshold there is an
            error.

    Returns:
        Binary: ``accuracy, auroc, auprc, brier, ece, n, positive_rate``. Multiclass: the same without
        ``positive_rate``. ``auroc``/``auprc`` are ``nan`` when a class is missing from ``y_true``.

    Raises:
        ValueError: on invalid inputs; the message names the argument, the problem and the fix.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.integer | np.floating):
        raise ValueError(f"threshold: must be a number in [0, 1], got {threshold!r}; fix: e.g. threshold=0.5")
    if not 0.0 <= float(threshold) <= 1.0:  # also rejects NaN
        raise ValueError(
            f"threshold: must be in [0, 1], got {threshold!r}; "
            f"fix: pass a probability threshold fixed in advance (default 0.5), not a logit"
        )
    y = _as_labels(y_true)
    s = _as_probabilities(scores, "scores")
    if s.ndim not in (1, 2):
        raise ValueError(
            f"scores: expected shape (n,) or (n, C), got shape {s.shape}; "
            f"fix: pass P(y=1) of shape (n,), or class probabilities of shape (n, C)"
        )
    _check_same_length(y, s, "scores")
    if s.ndim == 1:
        _check_binary_labels(y)
        return _binary_metrics(y, s, float(threshold))

    n_classes = s.shape[1]
    if n_classes < 2:
        raise ValueError(
            f"scores: has shape {s.shape}, a single column is ambiguous; "
            f"fix: pass the positive-class probability as shape (n,), or all class probabilities as (n, C)"
        )
    row_sums = s.sum(axis=1)
    if not np.allclose(row_sums, 1.0, rtol=0.0, atol=_ROW_SUM_ATOL):
        worst = float(np.max(np.abs(row_sums - 1.0)))
        raise ValueError(
            f"scores: rows of class probabilities must sum to 1, worst row is off by {worst:.3g}; "
            f"fix: apply a softmax to the model's outputs (or pass P(y=1) of shape (n,) for binary)"
        )
    if n_classes == 2:
        _check_binary_labels(y)
        return _binary_metrics(y, s[:, 1], float(threshold))

    bad = y[(y < 0) | (y >= n_classes)]
    if bad.size:
        raise ValueError(
            f"y_true: labels must be in 0..{n_classes - 1} to index the {n_classes} columns of scores, "
            f"got {np.unique(bad)[:5].tolist()}; fix: encode classes as 0..C-1 in the column order of scores"
        )
    if float(threshold) != 0.5:
        raise ValueError(
            f"threshold: applies only to binary scores, got threshold={threshold!r} with {n_classes} classes; "
            f"fix: drop the threshold argument (multiclass accuracy uses the argmax)"
        )
    return _multiclass_metrics(y, s)


def per_class_auroc(y_true, probs, classes) -> dict[str, float]:
    """One-vs-rest AUROC per class, keyed by class name (see the module docstring); errors as utility_metrics."""
    y = _as_labels(y_true)
    p = _as_probabilities(probs, "probs")
    names = [str(c) for c in classes]
    if p.ndim != 2 or p.shape[1] != len(names) or len(names) < 2:
        raise ValueError(
            f"probs: expected shape (n, {len(names)}) (one column per class), got shape {p.shape}; "
            f"fix: pass the class probabilities in the order of classes"
        )
    _check_same_length(y, p, "probs")
    bad = y[(y < 0) | (y >= len(names))]
    if bad.size:
        raise ValueError(
            f"y_true: labels must be in 0..{len(names) - 1}, got {np.unique(bad)[:5].tolist()}; "
            f"fix: encode classes as 0..C-1 in the order of classes"
        )
    out = {}
    for k, name in enumerate(names):
        yk = (y == k).astype(np.int64)
        out[name] = float(roc_auc_score(yk, p[:, k])) if 0 < yk.sum() < len(yk) else math.nan
    return out
