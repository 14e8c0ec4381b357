"""Fairness metrics: weighted bootstrap metrics agree with sklearn/fairlearn, hand-computed gaps, grouping,
the small-group flag, bootstrap weights, percentile intervals and paired comparisons."""

import math
import time

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
)
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    recall_score,
    roc_auc_score,
)

import dptrain.evaluate.fairness as fairness
from dptrain.evaluate.fairness import (
    GAPS,
    METRICS,
    Grouping,
    bootstrap_weights,
    gaps,
    gaps_boot,
    group_metrics_boot,
    group_table,
    groupings,
    percentile_ci,
    weighted_metrics,
)
from dptrain.evaluate.metrics import expected_calibration_error

ATOL = 1e-12
THRESHOLD = 0.5


def synthetic(seed, n=400, ties=False):
    """Labels and informative scores in [0, 1], with scores exactly at 0, 1 and the threshold."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.0, 1.0)
    s[:3] = [0.0, 1.0, THRESHOLD]
    if ties:
        s = np.round(s, 1)
    return y, s


def reference_metrics(y, s, threshold=THRESHOLD):
    """The METRICS of (y, s) computed with sklearn and metrics.expected_calibration_error."""
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "n": len(y),
        "auroc": roc_auc_score(y, s),
        "auprc": average_precision_score(y, s),
        "accuracy": accuracy_score(y, pred),
        "ece": expected_calibration_error(y, s),
        "tpr": recall_score(y, pred),
        "fnr": fn / (fn + tp),
        "fpr": fp / (fp + tn),
        "selection_rate": pred.mean(),
    }


def assert_metrics_equal(got, want, atol=ATOL):
    assert set(got) == set(METRICS)
    for name in METRICS:
        assert got[name] == pytest.approx(want[name], abs=atol, rel=0), name


def grouping_of(labels, name="g"):
    return Grouping(name, (name,), np.asarray(labels, dtype=object))


# ---------------------------------------------------------------------------------------------------------
# weighted_metrics


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_metrics_unit_weights_match_sklearn(seed, ties):
    y, s = synthetic(seed, ties=ties)
    got = weighted_metrics(y, s, np.ones(len(y)), threshold=THRESHOLD)
    assert all(v.shape == (1,) for v in got.values())
    assert_metrics_equal({k: v[0] for k, v in got.items()}, reference_metrics(y, s))


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_metrics_integer_weights_equal_repeated_rows(ties):
    y, s = synthetic(2, n=300, ties=ties)
    rng = np.random.default_rng(3)
    weights = np.vstack([bootstrap_weights(len(y), 3, seed=4), rng.integers(0, 4, (3, len(y)))])
    assert (weights == 0).any()
    got = weighted_metrics(y, s, weights, threshold=THRESHOLD)
    for b, w in enumerate(weights):
        rows = np.repeat(np.arange(len(y)), w)
        assert_metrics_equal({k: v[b] for k, v in got.items()}, reference_metrics(y[rows], s[rows]))


def test_weighted_metrics_other_threshold_and_float_weights():
    y, s = synthetic(5, n=200)
    w = np.random.default_rng(6).integers(1, 5, len(y)).astype(np.float64)
    got = weighted_metrics(y, s, w, threshold=0.3)
    pred = s >= 0.3
    assert got["auroc"][0] == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=ATOL)
    assert got["auprc"][0] == pytest.approx(average_precision_score(y, s, sample_weight=w), abs=ATOL)
    assert got["accuracy"][0] == pytest.approx(accuracy_score(y, pred, sample_weight=w), abs=ATOL)
    assert got["tpr"][0] == pytest.approx(recall_score(y, pred, sample_weight=w), abs=ATOL)
    assert got["selection_rate"][0] == pytest.approx(np.average(pred, weights=w), abs=ATOL)


def test_weighted_metrics_hand_computed_ties():
    # sorted by score: 0.8 (y=1) | 0.4 (y=0), 0.4 (y=1) | 0.1 (y=0)
    # AUROC: pos-neg pairs (0.4>0.1)=1, (0.4=0.4)=1/2, (0.8>0.1)=1, (0.8>0.4)=1 -> 3.5/4 = 0.875
    # AP: recall steps 1/2 at precision 1/1, then 1/2 at precision 2/3 -> 1/2 + 1/3
    # ECE (15 bins): bins of 0.1, 0.4, 0.8 are distinct; |0-0.1|*1/4 + |1/2-0.4|*2/4 + |1-0.8|*1/4 = 0.125
    # threshold 0.5: pred = [0, 0, 0, 1] -> accuracy 3/4, tpr 1/2, fpr 0, selection 1/4
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.4, 0.8])
    got = {k: v[0] for k, v in weighted_metrics(y, s, np.ones(4), threshold=0.5).items()}
    want = {
        "n": 4,
        "auroc": 0.875,
        "auprc": 0.5 + 1 / 3,
        "accuracy": 0.75,
        "ece": 0.125,
        "tpr": 0.5,
        "fnr": 0.5,
        "fpr": 0.0,
        "selection_rate": 0.25,
    }
    assert_metrics_equal(got, want)


@pytest.mark.filterwarnings("error")
def test_weighted_metrics_undefined_values_are_nan_without_warning():
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.2, 0.9, 0.6, 0.7, 0.3])
    weights = np.array(
        [
            [1, 1, 1, 1, 1],  # both classes: everything defined
            [1, 0, 0, 2, 0],  # no positives drawn
            [0, 3, 1, 0, 1],  # no negatives drawn
            [0, 0, 0, 0, 0],  # zero total weight
        ]
    )
    got = weighted_metrics(y, s, weights, threshold=0.5)
    assert all(np.isfinite(got[name][0]) for name in METRICS)
    assert np.isnan([got[k][1] for k in ("auroc", "auprc", "tpr", "fnr")]).all()
    # replicate 1: row 0 (s .2, correct) once, row 3 (s .7, false positive) twice
    assert got["fpr"][1] == pytest.approx(2 / 3) and got["accuracy"][1] == pytest.approx(1 / 3)
    assert np.isnan([got[k][2] for k in ("auroc", "auprc", "fpr")]).all()
    assert got["tpr"][2] == pytest.approx(4 / 5)
    assert got["n"][3] == 0 and np.isnan([got[k][3] for k in METRICS if k != "n"]).all()
    one_class = weighted_metrics(np.ones(5), s, np.ones(5), threshold=0.5)
    assert (
        np.isnan(one_class["auroc"][0]) and np.isnan(one_class["auprc"][0]) and np.isnan(one_class["fpr"][0])
    )


def test_weighted_metrics_chunks_equal_row_by_row(monkeypatch):
    y, s = synthetic(7, n=100, ties=True)
    weights = bootstrap_weights(len(y), 23, seed=8)
    monkeypatch.setattr(fairness, "_CHUNK_ELEMENTS", 500)  # 5 rows per chunk, last chunk of 3
    got = weighted_metrics(y, s, weights, threshold=THRESHOLD)
    for b in range(len(weights)):
        row = weighted_metrics(y, s, weights[b], threshold=THRESHOLD)
        for name in METRICS:
            assert got[name][b] == pytest.approx(row[name][0], abs=ATOL), (name, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": -np.ones(4)}, "non-negative"),
        ({"weights": np.ones((2, 3))}, "expected shape"),
        ({"weights": np.array([1, np.nan, 1, 1])}, "NaN"),
        ({"threshold": 1.5}, "threshold"),
        ({"score": np.array([0.1, 0.2, 2.0, 0.3])}, "logits"),
        ({"y": np.array([0, 1, 2, 1])}, "0 or 1"),
    ],
)
def test_weighted_metrics_rejects_bad_inputs(kwargs, match):
    args = {
        "y": np.array([0, 1, 0, 1]),
        "score": np.array([0.1, 0.2, 0.7, 0.3]),
        "weights": np.ones(4),
        "threshold": 0.5,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        weighted_metrics(args["y"], args["score"], args["weights"], threshold=args["threshold"])


def test_weighted_metrics_speed_b2000_n5000():
    y, s = synthetic(9, n=5000)
    weights = bootstrap_weights(5000, 2000, seed=10)
    start = time.perf_counter()
    got = weighted_metrics(y, s, weights, threshold=THRESHOLD)
    assert time.perf_counter() - start < 5.0
    assert got["auroc"].shape == (2000,) and np.isfinite(got["auroc"]).all()


# ---------------------------------------------------------------------------------------------------------
# groupings


def test_groupings_per_column_and_intersection():
    df = pd.DataFrame({"race": ["b", "a", "b"], "gender": ["F", "M", "M"], "age_group": [10, 9, 10]})
    result = groupings(df)
    assert [g.name for g in result] == ["race", "gender", "age_group", "race × gender × age_group"]
    assert result[3].attributes == ("race", "gender", "age_group")
    assert result[0].labels.tolist() == ["b", "a", "b"]
    assert result[2].labels.tolist() == ["10", "9", "10"]
    assert result[3].labels.tolist() == ["b / F / 10", "a / M / 9", "b / M / 10"]
    assert result[3].groups == ["a / M / 9", "b / F / 10", "b / M / 10"]
    assert [g.name for g in groupings(df, intersection=False)] == ["race", "gender", "age_group"]
    assert [g.name for g in groupings(df[["race"]])] == ["race"]


def test_groupings_missing_values_name_the_column():
    df = pd.DataFrame({"race": ["a", "b"], "gender": ["F", None]})
    with pytest.raises(ValueError, match="'gender'"):
        groupings(df)


# ---------------------------------------------------------------------------------------------------------
# group_table


def grouped_data(seed=11):
    """Groups: A (200, balanced), B (150, balanced), C (40 rows, 3 positives), D (20 rows, balanced)."""
    rng = np.random.default_rng(seed)
    sizes = {"A": 200, "B": 150, "C": 40, "D": 20}
    labels = np.concatenate([[g] * k for g, k in sizes.items()]).astype(object)
    y = rng.integers(0, 2, len(labels))
    y[labels == "C"] = 0
    y[np.flatnonzero(labels == "C")[:3]] = 1
    shift = np.select([labels == "A", labels == "B"], [0.0, 0.1], 0.05)
    s = np.clip(rng.normal(0.35 + 0.3 * y + shift, 0.2), 0.0, 1.0)
    return y, s, grouping_of(labels)


def test_group_table_matches_metricframe():
    y, s, grouping = grouped_data()
    table = group_table(y, s, grouping, threshold=THRESHOLD)
    assert list(table.columns) == ["group", "n", "n_pos", *METRICS[1:], "small"]
    assert table["group"].tolist() == ["A", "B", "C", "D"]
    pred = (s >= THRESHOLD).astype(int)
    on_pred = MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "tpr": recall_score,
            "fpr": false_positive_rate,
            "selection_rate": selection_rate,
        },
        y_true=y,
        y_pred=pred,
        sensitive_features=grouping.labels,
    ).by_group
    on_score = MetricFrame(
        metrics={"auroc": roc_auc_score, "auprc": average_precision_score, "ece": expected_calibration_error},
        y_true=y,
        y_pred=s,
        sensitive_features=grouping.labels,
    ).by_group
    for _, row in table.iterrows():
        g = row["group"]
        mask = grouping.labels == g
        assert row["n"] == mask.sum() and row["n_pos"] == y[mask].sum()
        for name in ("accuracy", "tpr", "fpr", "selection_rate"):
            assert row[name] == pytest.approx(on_pred.loc[g, name], abs=ATOL), (g, name)
        for name in ("auroc", "auprc", "ece"):
            assert row[name] == pytest.approx(on_score.loc[g, name], abs=ATOL), (g, name)
        assert row["fnr"] == pytest.approx(1 - on_pred.loc[g, "tpr"], abs=ATOL)
    # the weighted (bootstrap) implementation agrees with the fairlearn point estimates at unit weights
    boot = group_metrics_boot(y, s, grouping, np.ones((1, len(y))), threshold=THRESHOLD)
    assert list(boot) == ["A", "B", "C", "D"]
    for _, row in table.iterrows():
        for name in METRICS:
            assert boot[row["group"]][name][0] == pytest.approx(row[name], abs=ATOL), (row["group"], name)


def test_group_table_small_flag_and_one_class_group():
    y, s, grouping = grouped_data()
    table = group_table(y, s, grouping, threshold=THRESHOLD).set_index("group")
    # C: 40 >= 30 rows but only 3 positives; D: 20 < 30 rows. Flagged, not dropped.
    assert table["small"].to_dict() == {"A": False, "B": False, "C": True, "D": True}
    relaxed = group_table(y, s, grouping, threshold=THRESHOLD, min_group_size=10).set_index("group")
    assert relaxed["small"].to_dict() == {"A": False, "B": False, "C": True, "D": False}
    y_one = y.copy()
    y_one[grouping.labels == "D"] = 0
    with_one_class = group_table(y_one, s, grouping, threshold=THRESHOLD).set_index("group")
    assert np.isnan(with_one_class.loc["D", ["auroc", "auprc", "tpr", "fnr"]].astype(float)).all()
    assert with_one_class.loc["D", "n_pos"] == 0 and bool(with_one_class.loc["D", "small"])


def test_group_metrics_boot_uses_the_same_weight_columns():
    y, s, grouping = grouped_data()
    weights = bootstrap_weights(len(y), 7, seed=12)
    boot = group_metrics_boot(y, s, grouping, weights, threshold=THRESHOLD)
    for g in grouping.groups:
        mask = grouping.labels == g
        direct = weighted_metrics(y[mask], s[mask], weights[:, mask], threshold=THRESHOLD)
        for name in METRICS:
            np.testing.assert_array_equal(boot[g][name], direct[name])


# ---------------------------------------------------------------------------------------------------------
# gaps


# 12 rows, 3 groups of 4 (y = 1, 1, 0, 0 in each), threshold 0.5:
#   A: s = .9 .4 .6 .2  pred 1 0 1 0  AUROC 3/4 (.4 < .6)  TPR 1/2 FNR 1/2 FPR 1/2 sel 1/2 acc 2/4
#   B: s = .8 .7 .3 .45 pred 1 1 0 0  AUROC 1              TPR 1   FNR 0   FPR 0   sel 1/2 acc 4/4
#   C: s = .95 .65 .9 .85 pred all 1  AUROC 2/4            TPR 1   FNR 0   FPR 1   sel 1   acc 2/4
HAND_Y = np.array([1, 1, 0, 0] * 3)
HAND_S = np.array([0.9, 0.4, 0.6, 0.2, 0.8, 0.7, 0.3, 0.45, 0.95, 0.65, 0.9, 0.85])
HAND_LABELS = np.array(["A"] * 4 + ["B"] * 4 + ["C"] * 4, dtype=object)
HAND_GAPS = {
    "worst_group_auroc": 0.5,  # C
    "auroc_gap": 0.5,  # 1 - 1/2
    "demographic_parity_difference": 0.5,  # selection 1 - 1/2
    "equalized_odds_difference": 1.0,  # max(TPR range 1 - 1/2, FPR range 1 - 0)
    "fnr_gap": 0.5,  # 1/2 - 0
    # accuracy vs the other groups' rows: A .5 - (4+2)/8 = -.25; B 1 - (2+2)/8 = +.5; C .5 - (2+4)/8 = -.25
    "accuracy_spd": -0.25,  # the most negative, not the largest in magnitude (+.5)
}


def test_gaps_hand_computed():
    # every row repeated 5 times -> 20 rows, 10 positives, 10 negatives per group: all eligible
    rows = np.repeat(np.arange(12), 5)
    grouping = grouping_of(HAND_LABELS[rows])
    got = gaps(HAND_Y[rows], HAND_S[rows], grouping, threshold=0.5, min_group_size=20)
    assert list(got) == list(GAPS)
    for name in GAPS:
        assert got[name] == pytest.approx(HAND_GAPS[name], abs=ATOL), name
    # bootstrap version on the 12 original rows, counts 5 and 1: same values
    for w in (np.full(12, 5), np.ones(12)):
        boot = gaps_boot(HAND_Y, HAND_S, grouping_of(HAND_LABELS), w, threshold=0.5, eligible=["A", "B", "C"])
        for name in GAPS:
            assert boot[name].shape == (1,)
            assert boot[name][0] == pytest.approx(HAND_GAPS[name], abs=ATOL), name


def test_gaps_dpd_eod_equal_fairlearn_on_eligible_rows():
    y, s, grouping = grouped_data()
    s = s.copy()
    s[grouping.labels == "C"] = 0.95  # the small group C would dominate DPD if it were not excluded
    got = gaps(y, s, grouping, threshold=THRESHOLD)
    pred = (s >= THRESHOLD).astype(int)
    rows = np.isin(grouping.labels, ["A", "B"])  # C and D are small
    kw = {"sensitive_features": grouping.labels[rows]}
    assert got["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y[rows], pred[rows], **kw), abs=ATOL
    )
    assert got["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y[rows], pred[rows], **kw), abs=ATOL
    )
    all_rows_dpd = demographic_parity_difference(y, pred, sensitive_features=grouping.labels)
    assert all_rows_dpd > got["demographic_parity_difference"] + 0.1


def test_gaps_need_two_eligible_groups():
    y, s, grouping = grouped_data()
    keep = np.isin(grouping.labels, ["A", "C", "D"])  # only A is eligible
    got = gaps(y[keep], s[keep], grouping_of(grouping.labels[keep]), threshold=THRESHOLD)
    assert all(math.isnan(v) for v in got.values())
    boot = gaps_boot(y, s, grouping, np.ones((3, len(y))), threshold=THRESHOLD, eligible=["A"])
    assert all(v.shape == (3,) and np.isnan(v).all() for v in boot.values())


@pytest.mark.parametrize("seed", [13, 14])
def test_gaps_boot_unit_weights_equal_gaps(seed):
    y, s, grouping = grouped_data(seed)
    table = group_table(y, s, grouping, threshold=THRESHOLD)
    eligible = table.loc[~table["small"], "group"].tolist()
    assert eligible == ["A", "B"]
    point = gaps(y, s, grouping, threshold=THRESHOLD)
    boot = gaps_boot(y, s, grouping, np.ones((1, len(y))), threshold=THRESHOLD, eligible=eligible)
    for name in GAPS:
        assert boot[name][0] == pytest.approx(point[name], abs=ATOL), name
    # with the small groups counted too (min_group_size lowered and C forced in), still equal
    relaxed = gaps(y, s, grouping, threshold=THRESHOLD, min_group_size=1)
    boot = gaps_boot(y, s, grouping, np.ones(len(y)), threshold=THRESHOLD, eligible=["A", "B", "D"])
    for name in GAPS:
        assert boot[name][0] == pytest.approx(relaxed[name], abs=ATOL), name


@pytest.mark.filterwarnings("error")
def test_gaps_boot_undefined_replicate_gives_nan():
    y, s = HAND_Y, HAND_S
    w = np.ones((2, 12))
    w[1, (HAND_LABELS == "B") & (y == 1)] = 0  # replicate 1 drew no positives from B
    boot = gaps_boot(y, s, grouping_of(HAND_LABELS), w, threshold=0.5, eligible=["A", "B", "C"])
    for name in GAPS:
        assert np.isfinite(boot[name][0]), name
    for name in ("worst_group_auroc", "auroc_gap", "equalized_odds_difference", "fnr_gap"):
        assert np.isnan(boot[name][1]), name
    assert boot["demographic_parity_difference"][1] == pytest.approx(1.0)  # B selects 0 of its 2 rows


def test_gaps_boot_rejects_unknown_eligible_label():
    with pytest.raises(ValueError, match="not groups"):
        gaps_boot(HAND_Y, HAND_S, grouping_of(HAND_LABELS), np.ones(12), threshold=0.5, eligible=["A", "Z"])


# ---------------------------------------------------------------------------------------------------------
# bootstrap weights, intervals, pairing


def test_bootstrap_weights():
    w = bootstrap_weights(50, 400, seed=15)
    assert w.shape == (400, 50) and w.dtype == np.int32
    assert (w.sum(axis=1) == 50).all() and (w >= 0).all()
    np.testing.assert_array_equal(w, bootstrap_weights(50, 400, seed=15))
    assert not np.array_equal(w, bootstrap_weights(50, 400, seed=16))
    # each count is Binomial(n, 1/n): mean 1, probability of 0 about (1 - 1/n)^n ~ 0.364
    assert w.mean() == pytest.approx(1.0)
    assert (w == 0).mean() == pytest.approx((1 - 1 / 50) ** 50, abs=0.02)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_weights(50, 0, seed=1)


def test_percentile_ci():
    x = np.random.default_rng(17).normal(size=100_000)
    lo, hi = percentile_ci(x)
    assert lo == pytest.approx(-1.96, abs=0.03) and hi == pytest.approx(1.96, abs=0.03)
    lo90, hi90 = percentile_ci(x, level=0.9)
    assert lo90 == pytest.approx(-1.645, abs=0.03) and hi90 == pytest.approx(1.645, abs=0.03)
    with_nan = np.concatenate([np.arange(100.0), [np.nan] * 50, [np.inf]])
    assert percentile_ci(with_nan) == pytest.approx(tuple(np.percentile(np.arange(100.0), [2.5, 97.5])))
    few = np.array([1.0] * 9 + [np.nan] * 100)
    assert all(math.isnan(v) for v in percentile_ci(few))
    with pytest.raises(ValueError, match="level"):
        percentile_ci(x, level=95)


def test_paired_bootstrap_is_narrower_than_unpaired():
    rng = np.random.default_rng(18)
    y, s1 = synthetic(19, n=1000)
    s2 = np.clip(s1 + rng.normal(0.0, 0.05, len(y)), 0.0, 1.0)  # a second run on the same test set
    w = bootstrap_weights(len(y), 500, seed=20)
    w_other = bootstrap_weights(len(y), 500, seed=21)
    a1 = weighted_metrics(y, s1, w, threshold=THRESHOLD)["auroc"]
    paired = a1 - weighted_metrics(y, s2, w, threshold=THRESHOLD)["auroc"]
    unpaired = a1 - weighted_metrics(y, s2, w_other, threshold=THRESHOLD)["auroc"]
    width_paired = np.subtract(*percentile_ci(paired)[::-1])
    width_unpaired = np.subtract(*percentile_ci(unpaired)[::-1])
    assert 0 < width_paired < 0.5 * width_unpaired
