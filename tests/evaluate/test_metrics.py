"""Utility metrics: agreement with scikit-learn, hand-computed cases, undefined cases and input errors."""

import math
import warnings

import numpy as np
import pytest
import sklearn
from sklearn.metrics import accuracy_score, average_precision_score, brier_score_loss, roc_auc_score

from dptrain.evaluate import expected_calibration_error, utility_metrics

BINARY_KEYS = {"accuracy", "auroc", "auprc", "brier", "ece", "n", "positive_rate"}
SKLEARN_MULTICLASS_BRIER = tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 7)


def reference_ece(correct, confidence, n_bins):
    """Naive per-bin loop, written independently of the implementation."""
    correct = np.asarray(correct, dtype=float)
    confidence = np.asarray(confidence, dtype=float)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (confidence >= lo) & ((confidence < hi) if b < n_bins - 1 else (confidence <= hi))
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total


def random_binary(seed, n=500):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    p = np.clip(0.35 * y + rng.uniform(0.0, 0.65, size=n), 0.0, 1.0)
    return y, p


def random_multiclass(seed, n=400, n_classes=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


# --- agreement with scikit-learn ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_matches_sklearn(seed):
    y, p = random_binary(seed)
    m = utility_metrics(y, p)
    assert set(m) == BINARY_KEYS
    assert m["accuracy"] == pytest.approx(accuracy_score(y, (p >= 0.5).astype(int)))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["auprc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["ece"] == pytest.approx(reference_ece(y, p, 15))
    assert m["n"] == len(y)
    assert m["positive_rate"] == pytest.approx(y.mean())
    assert all(type(v) in (float, int) for v in m.values())


def test_binary_two_column_scores_equal_one_column():
    y, p = random_binary(3)
    assert utility_metrics(y, np.column_stack([1 - p, p])) == pytest.approx(utility_metrics(y, p))


def test_boolean_and_float_labels_accepted():
    y, p = random_binary(4, n=50)
    expected = utility_metrics(y, p)
    assert utility_metrics(y.astype(bool), p) == pytest.approx(expected)
    assert utility_metrics(y.astype(float), p) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_matches_sklearn(seed):
    y, probs = random_multiclass(seed)
    n_classes = probs.shape[1]
    onehot = np.eye(n_classes)[y]
    m = utility_metrics(y, probs)
    assert set(m) == BINARY_KEYS - {"positive_rate"}
    assert m["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(axis=1)))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["auprc"] == pytest.approx(average_precision_score(onehot, probs, average="macro"))
    assert m["brier"] == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    if SKLEARN_MULTICLASS_BRIER:
        assert m["brier"] == pytest.approx(brier_score_loss(y, probs, labels=list(range(n_classes))))
    correct = probs.argmax(axis=1) == y
    assert m["ece"] == pytest.approx(reference_ece(correct, probs.max(axis=1), 15))
    assert m["n"] == len(y)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_bins", [1, 2, 10, 15])
def test_ece_matches_reference_loop(seed, n_bins):
    y, p = random_binary(seed)
    assert expected_calibration_error(y, p, n_bins=n_bins) == pytest.approx(reference_ece(y, p, n_bins))


# --- hand-computed cases -----------------------------------------------------------------------------


def test_four_example_hand_case():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    m = utility_metrics(y, p)
    assert m["auroc"] == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs are ordered correctly
    assert m["auprc"] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))  # recall steps at precision 1 and 2/3
    assert m["accuracy"] == pytest.approx(0.75)  # predictions 0, 0, 0, 1
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert m["positive_rate"] == 0.5
    assert m["n"] == 4


def test_perfectly_calibrated_has_zero_ece():
    # p=0.25 for four examples with one positive, p=0.75 for four with three positives.
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(y, p) == 0.0
    assert utility_metrics(y, p)["ece"] == 0.0


def test_two_bin_hand_computed_ece():
    # Bin [0, 0.5): p = 0.2, 0.4 (mean 0.3), y = 0, 1 (mean 0.5): gap 0.2, weight 1/2.
    # Bin [0.5, 1]: p = 0.6, 0.9 (mean 0.75), y = 1, 1 (mean 1.0): gap 0.25, weight 1/2.
    y = np.array([0, 1, 1, 1])
    p = np.array([0.2, 0.4, 0.6, 0.9])
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.25)


def test_ece_bin_edges():
    # 0.5 falls in the upper bin [0.5, 1]; 1.0 is in the last bin; 0.0 in the first.
    assert expected_calibration_error([1, 0], [0.5, 0.0], n_bins=2) == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)
    assert expected_calibration_error([1, 1], [1.0, 0.5], n_bins=2) == pytest.approx(0.25)
    assert expected_calibration_error([0, 1], [0.3, 0.3], n_bins=1) == pytest.approx(0.2)


def test_threshold_is_fixed_and_inclusive():
    y = np.array([0, 1, 1, 0])
    p = np.array([0.2, 0.5, 0.7, 0.6])
    assert utility_metrics(y, p)["accuracy"] == pytest.approx(0.75)  # 0.5 >= 0.5 predicts positive
    assert utility_metrics(y, p, threshold=0.65)["accuracy"] == pytest.approx(0.75)  # 0.5 wrong, 0.6 right
    assert utility_metrics(y, p, threshold=0.0)["accuracy"] == pytest.approx(0.5)
    # The threshold only affects accuracy.
    a, b = utility_metrics(y, p), utility_metrics(y, p, threshold=0.65)
    assert {k: v for k, v in a.items() if k != "accuracy"} == {k: v for k, v in b.items() if k != "accuracy"}


def test_multiclass_hand_case():
    y = np.array([0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3]])
    m = utility_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(2 / 3)
    expected_brier = ((0.04 + 0.01 + 0.01) + (0.04 + 0.09 + 0.01) + (0.25 + 0.04 + 0.49)) / 3
    assert m["brier"] == pytest.approx(expected_brier)
    # Top-label confidences 0.8, 0.7, 0.5 fall in three different bins with outcomes 1, 1, 0.
    assert m["ece"] == pytest.approx((0.2 + 0.3 + 0.5) / 3)


# --- undefined cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_ranking_metrics_without_warnings(label):
    y = np.full(6, label)
    p = np.array([0.1, 0.3, 0.5, 0.6, 0.8, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = utility_metrics(y, p)
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert m["accuracy"] == pytest.approx(np.mean((p >= 0.5) == label))
    assert m["brier"] == pytest.approx(np.mean((p - label) ** 2))
    assert m["positive_rate"] == float(label)
    assert not math.isnan(m["ece"])


def test_multiclass_missing_class_gives_nan_ranking_metrics():
    y, probs = random_multiclass(5, n=60)
    y[y == 3] = 0  # class 3 never occurs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = utility_metrics(y, probs)
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert not math.isnan(m["accuracy"]) and not math.isnan(m["brier"]) and not math.isnan(m["ece"])


# --- bad inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "scores", "match"),
    [
        ([0, 1, 1], [0.2, 0.8], r"scores: has 2 rows but y_true has 3 labels.*fix"),
        ([0, 1], [0.2, np.nan], r"scores: contains 1 NaN.*fix"),
        ([0, 1], [0.2, 1.5], r"scores: probabilities must lie in \[0, 1\].*fix.*sigmoid"),
        ([0, 1], [-0.1, 0.5], r"scores: probabilities must lie in \[0, 1\]"),
        ([0, 1], [0.2, np.inf], r"scores: probabilities must lie in \[0, 1\]"),
        ([0, 2], [0.2, 0.8], r"y_true: binary labels must be 0 or 1.*fix"),
        ([0, 1], [[0.2, 0.2], [0.5, 0.5]], r"scores: rows of class probabilities must sum to 1.*softmax"),
        ([0, 1], [[0.2], [0.5]], r"scores: has shape \(2, 1\).*fix"),
        ([0, 1], np.full((2, 2, 2), 0.25), r"scores: expected shape \(n,\) or \(n, C\).*fix"),
        ([0, 1], ["a", "b"], r"scores: expected numeric probabilities.*fix"),
        (["a", "b"], [0.2, 0.8], r"y_true: expected numeric class labels.*fix"),
        ([0.0, 0.5], [0.2, 0.8], r"y_true: contains non-integer values.*fix"),
        ([[0, 1]], [0.2, 0.8], r"y_true: expected a 1-D array.*fix"),
        ([], [], r"y_true: is empty.*fix"),
        ([0, 3], np.full((2, 3), 1 / 3), r"y_true: labels must be in 0\.\.2.*fix"),
    ],
)
def test_bad_inputs_raise_value_error(y, scores, match):
    with pytest.raises(ValueError, match=match):
        utility_metrics(np.asarray(y), np.asarray(scores))


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        utility_metrics(np.array([0, 1]), np.array([0.2, 0.8]), threshold=threshold)


def test_threshold_rejected_for_multiclass():
    y, probs = random_multiclass(0, n=20)
    with pytest.raises(ValueError, match="threshold: applies only to binary"):
        utility_metrics(y, probs, threshold=0.3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y_true": [0, 1], "prob_pos": [0.2]}, r"prob_pos: has 1 rows but y_true has 2"),
        (
            {"y_true": [0, 1], "prob_pos": [[0.8, 0.2], [0.3, 0.7]]},
            r"prob_pos: expected shape \(n,\).*probs\[:, 1\]",
        ),
        ({"y_true": [0, 1], "prob_pos": [0.2, np.nan]}, r"prob_pos: contains 1 NaN"),
        ({"y_true": [0, 1], "prob_pos": [0.2, 1.2]}, r"prob_pos: probabilities must lie in \[0, 1\]"),
        ({"y_true": [0, 1], "prob_pos": [0.2, 0.8], "n_bins": 0}, r"n_bins: must be a positive integer"),
        ({"y_true": [0, 1], "prob_pos": [0.2, 0.8], "n_bins": 2.5}, r"n_bins: must be a positive integer"),
    ],
)
def test_ece_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(**kwargs)
