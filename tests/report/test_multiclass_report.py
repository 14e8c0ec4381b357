"""The report of a multi-class sweep (3 declared classes): macro AUROC and top-1 accuracy vs epsilon, a per-class
AUROC section, fairness gaps per class labelled one-vs-rest; a binary sweep of the same table has none of these.

Every number is recomputed from the saved predictions with scikit-learn / fairlearn."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import roc_auc_score

from dptrain.cli import main
from dptrain.config import parse_recipe
from dptrain.report import ReportError, analyse, run_sweep
from dptrain.report.render import write_report
from tests.data.test_multiclass import CLASSES, _data, _table

THRESHOLD = 0.4
TRAIN = {"model": {"hidden": [8]}, "training": {"epochs": 3, "batch_size": 64}, "privacy": {"epsilon": 8}}


def _sweep(root: Path, data: dict, seeds: int) -> tuple[Path, object]:
    out = root / "sweep"
    result = run_sweep(parse_recipe({"name": "mc", "data": data, **TRAIN}), out, epsilons=[4.0, float("inf")],
                       seeds=seeds, backends=["opacus"], jobs=2, threshold=THRESHOLD, progress=lambda _: None)
    assert not result.failed, result.statuses
    an = analyse(out, n_boot=200)
    write_report(an, out)
    return out, an


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcsweep")
    return _sweep(root, _data(_table(root / "t.csv")), seeds=2)


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    root = tmp_path_factory.mktemp("binsweep")
    return _sweep(root, _data(_table(root / "t.csv"), classes=None, positive_label="a"), seeds=1)


def _preds(sweep: Path, run: str) -> pd.DataFrame:
    return pd.read_parquet(sweep / "runs" / run / "private" / "predictions.parquet")


def test_multiclass_utility_is_macro_auroc_and_top1_accuracy(multi):
    sweep, an = multi
    assert an.multiclass and an.classes == CLASSES
    assert an.groupings == [f"grp | class {c} vs rest" for c in CLASSES] and an.single == an.groupings
    summary = pd.read_csv(sweep / "private" / "summary.csv")
    assert len(summary) == 4
    for row in summary.to_dict("records"):
        p = _preds(sweep, row["run"])
        y, probs = p["y_true"].to_numpy(), p[[f"prob_{c}" for c in CLASSES]].to_numpy(np.float64)
        assert row["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-9)
        assert row["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y), abs=1e-12)
        per = {c: roc_auc_score(y == k, probs[:, k]) for k, c in enumerate(CLASSES)}
        for c in CLASSES:
            assert row[f"auroc_one_vs_rest[{c}]"] == pytest.approx(per[c], abs=1e-9)
        assert per["a"] > 0.99 and per["b"] < 0.9 and per["c"] < 0.9
        # worst group: the lowest one-vs-rest AUROC over every class and group
        aucs = {f"grp={g} (class {c} vs rest)": roc_auc_score(d["y_true"] == k, d[f"prob_{c}"])
                for k, c in enumerate(CLASSES) for g, d in p.groupby("grp")}
        worst = min(aucs, key=aucs.get)
        assert row["worst_group"] == worst and row["worst_group_auroc"] == pytest.approx(aucs[worst], abs=1e-9)


def test_fairness_gaps_per_class_are_one_vs_rest(multi):
    sweep, _ = multi
    summary = pd.read_csv(sweep / "private" / "summary.csv")
    for row in summary.to_dict("records"):
        p = _preds(sweep, row["run"])
        for k, c in enumerate(CLASSES):
            yk, pred = (p["y_true"] == k).astype(int), (p[f"prob_{c}"] >= THRESHOLD).astype(int)
            view = f"grp | class {c} vs rest"
            assert row[f"demographic_parity_difference[{view}]"] == pytest.approx(
                demographic_parity_difference(yk, pred, sensitive_features=p["grp"]), abs=1e-12)
            assert row[f"equalized_odds_difference[{view}]"] == pytest.approx(
                equalized_odds_difference(yk, pred, sensitive_features=p["grp"]), abs=1e-12)
            aucs = [roc_auc_score(d["y_true"] == k, d[f"prob_{c}"]) for _, d in p.groupby("grp")]
            assert row[f"auroc_gap[{view}]"] == pytest.approx(max(aucs) - min(aucs), abs=1e-9)


def test_per_class_section_and_labels_in_the_multiclass_report(multi):
    sweep, an = multi
    md = (sweep / "private" / "report.md").read_text()
    html = (sweep / "private" / "report.html").read_text()
    for text in (md, html):
        assert "Per-class AUROC vs epsilon (one-vs-rest, test records)" in text
        assert "macro AUROC (one-vs-rest) [95% CI]" in text and "accuracy (top-1)" in text
        assert "Multi-class (3 declared classes: a, b, c)" in text
        for c in CLASSES:
            assert f"Fairness gaps by grp | class {c} vs rest" in text and f"AUROC {c} vs rest [95% CI]" in text
    assert "One-vs-rest AUROC per class vs epsilon" in html
    assert (sweep / "private" / "plots" / "per_class_auroc_vs_epsilon.png").stat().st_size > 1000
    c = next(c for c in an.configs if np.isfinite(c["epsilon"]))
    lo, hi = c["per_class_auroc"]["a"]["ci"]
    assert 0.9 < lo <= c["per_class_auroc"]["a"]["mean"] <= hi <= 1.0  # CIs over test examples, paired
    assert main(["report", str(sweep)]) == 0  # the CLI re-renders it


def test_binary_report_has_no_per_class_section(binary):
    sweep, an = binary
    assert not an.multiclass and an.groupings == ["grp"]
    md = (sweep / "private" / "report.md").read_text()
    assert "auroc [95% CI] (sd over seeds)" in md and "Fairness gaps by grp" in md
    for absent in ("Per-class", "vs rest", "Multi-class", "macro AUROC", "one-vs-rest"):
        assert absent not in md
    assert not (sweep / "private" / "plots" / "per_class_auroc_vs_epsilon.png").exists()
    summary = pd.read_csv(sweep / "private" / "summary.csv")
    assert not [c for c in summary.columns if "one_vs_rest" in c]
    p = _preds(sweep, summary["run"][0])
    assert summary["auroc"][0] == pytest.approx(roc_auc_score(p["y_true"], p["score"]), abs=1e-12)


def test_multiclass_predictions_without_a_class_column_are_refused(multi, tmp_path):
    sweep, _ = multi
    copy = tmp_path / "copy"
    shutil.copytree(sweep / "runs", copy / "runs")
    run = sorted((copy / "runs").iterdir())[0]
    path = run / "private" / "predictions.parquet"
    pd.read_parquet(path).drop(columns=["prob_b"]).to_parquet(path)
    with pytest.raises(ReportError, match=r"predictions\.parquet: .*'prob_b' is missing"):
        analyse(copy, n_boot=200)


def test_multiclass_summary_names_the_one_vs_rest_view_it_quotes(multi):
    from dptrain.report.summary import attribute_views, findings

    sweep, an = multi
    (attr, view), = attribute_views(an)
    level = {v: np.mean([c["gaps"][v]["worst_group_auroc"]["mean"] for c in an.configs]) for v in an.groupings}
    assert attr == "grp" and view == min(level, key=level.get)  # the lowest one-vs-rest worst-group AUROC
    by = {f.key: f for f in findings(an)}
    eps = an.selection["opacus"]["selected_epsilon"]
    c = next(c for c in an.configs if c["epsilon"] == eps)
    assert by["utility"].text.startswith(f"At epsilon {eps:g} (the configuration selected on validation records), "
                                         "test macro AUROC (one-vs-rest) is ")
    assert by["utility"].values["auroc"] == c["utility"]["auroc"]["mean"]
    w = by["worst_group:grp"]
    cls = view.split(" | class ", 1)[1].removesuffix(" vs rest")
    assert w.text.startswith(f"By grp (class {cls} vs rest), the worst-off group at epsilon {eps:g} is ")
    assert w.values["worst_group_auroc"] == c["gaps"][view]["worst_group_auroc"]["mean"]
    assert w.values["change"] == c["change_vs_nonprivate"]["gaps"][view]["worst_group_auroc"]["mean"]
    md = (sweep / "private" / "report.md").read_text()  # maybe re-rendered by the CLI (other CIs): the words only
    assert md.index("## Summary") < md.index(w.text.split(": worst-group")[0]) < md.index("Per-class AUROC vs epsilon")
