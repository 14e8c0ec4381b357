"""The report's numbers, recomputed independently from the run directories (sklearn, fairlearn, scipy,
the accountant), and its files."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference
from scipy import stats
from sklearn.metrics import roc_auc_score

import accounting as acc
from dptrain.cli import main
from dptrain.lifecycle import RunDir
from dptrain.report import ReportError, analyse
from tests.report.conftest import THRESHOLD

REQUIRED = ["epsilon", "seed", "backend", "auroc", "worst_group_auroc", "status"]
SINGLE = ["race", "gender", "age_group"]


@pytest.fixture(scope="module")
def an(sweep_analysis):
    return sweep_analysis


@pytest.fixture(scope="module")
def summary(sweep_dir):
    return pd.read_csv(sweep_dir / "private" / "summary.csv")


def _rd(sweep_dir, run) -> RunDir:
    return RunDir(sweep_dir / "runs" / run)


def _preds(sweep_dir, run):
    return pd.read_parquet(_rd(sweep_dir, run).private / "predictions.parquet")


def _eligible(frame, col, min_size=30):
    out = []
    for g, d in frame.groupby(col):
        if len(d) >= min_size and (d.y_true == 1).sum() >= 5 and (d.y_true == 0).sum() >= 5:
            out.append(g)
    return out


def test_summary_has_one_row_per_run_with_required_columns(sweep_dir, summary):
    assert list(summary.columns[:6]) == REQUIRED
    assert len(summary) == 6 and set(summary.status) == {"finished"}
    for row in summary.itertuples():
        p = _preds(sweep_dir, row.run)
        assert row.auroc == pytest.approx(roc_auc_score(p.y_true, p.score), abs=1e-12)
        rec = _rd(sweep_dir, row.run).finished_record()
        assert row.auroc == pytest.approx(rec["metrics"]["test"]["auroc"], abs=1e-9)
        assert row.validation_auroc == pytest.approx(rec["metrics"]["validation"]["auroc"], abs=1e-12)
        assert row.threshold == THRESHOLD


def test_worst_group_auroc_recomputed_with_sklearn(sweep_dir, summary):
    for row in summary.itertuples():
        p = _preds(sweep_dir, row.run)
        aucs = {f"{c}={g}": roc_auc_score(d.y_true, d.score)
                for c in SINGLE for g, d in p.groupby(c) if g in _eligible(p, c)}
        worst = min(aucs, key=aucs.get)
        assert row.worst_group_auroc == pytest.approx(aucs[worst], abs=1e-12)
        assert row.worst_group == worst


def test_gap_columns_match_fairlearn(sweep_dir, summary):
    for row in summary.itertuples():
        p = _preds(sweep_dir, row.run)
        for c in SINGLE:
            keep = p[p[c].isin(_eligible(p, c))]
            dpd = demographic_parity_difference(keep.y_true, (keep.score >= THRESHOLD).astype(int),
                                                sensitive_features=keep[c])
            assert summary.loc[summary.run == row.run, f"demographic_parity_difference[{c}]"].item() == \
                pytest.approx(dpd, abs=1e-12)


def test_config_means_and_paired_changes(an, summary):
    for c in an.configs:
        rows = summary[(summary.backend == c["backend"]) & (summary.epsilon.astype(float) == c["epsilon"])]
        assert c["utility"]["auroc"]["mean"] == pytest.approx(rows.auroc.mean(), abs=1e-12)
        lo, hi = c["utility"]["auroc"]["ci"]
        assert lo < c["utility"]["auroc"]["mean"] < hi
        if math.isfinite(c["epsilon"]):
            ch = c["change_vs_nonprivate"]
            ref = summary[(summary.backend == c["backend"]) & np.isinf(summary.epsilon.astype(float))]
            diffs = [r.auroc - ref[ref.seed == r.seed].auroc.item() for r in rows.itertuples()]
            assert ch["utility"]["auroc"]["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
            g = "race"
            col = f"fnr_gap[{g}]"
            d = [r[col] - ref[ref.seed == r.seed][col].item() for _, r in rows.iterrows()]
            assert ch["gaps"][g]["fnr_gap"]["mean"] == pytest.approx(np.nanmean(d), abs=1e-12, nan_ok=True)
        else:
            assert c["change_vs_nonprivate"] is None


def test_paired_ci_is_narrower_than_the_unpaired_one(an):
    """Pairing removes the test-sampling variance shared by two runs on the same split."""
    c = next(c for c in an.configs if c["backend"] == "opacus" and c["epsilon"] == 4.0)
    r = next(c for c in an.configs if c["backend"] == "opacus" and math.isinf(c["epsilon"]))
    lo, hi = c["change_vs_nonprivate"]["utility"]["auroc"]["ci"]
    w_paired = hi - lo
    w_unpaired = math.hypot(np.subtract(*c["utility"]["auroc"]["ci"][::-1]),
                            np.subtract(*r["utility"]["auroc"]["ci"][::-1]))
    assert w_paired < w_unpaired


def test_pearson_matches_scipy(an, summary):
    for row in an.pearson.itertuples():
        s = summary[(summary.backend == row.backend) & np.isfinite(summary.epsilon.astype(float))]
        y = s[f"{row.gap}[{row.grouping}]"].to_numpy(float)
        x = s.epsilon.astype(float).to_numpy()
        ok = np.isfinite(y)
        if ok.sum() >= 3 and np.ptp(y[ok]) > 0:
            res = stats.pearsonr(x[ok], y[ok])
            assert row.r == pytest.approx(res.statistic, abs=1e-9) and row.p_value == pytest.approx(res.pvalue, abs=1e-9)
        else:
            assert math.isnan(row.r)


def test_selection_cost_is_stated_and_correct(sweep_dir, an, summary):
    for b, s in an.selection.items():
        runs = summary[(summary.backend == b) & np.isfinite(summary.epsilon.astype(float))]
        assert s["n_private_runs"] == len(runs)
        total = acc.PrivacyLedger()
        for r in runs.run:
            total.extend(acc.PrivacyLedger.load(_rd(sweep_dir, r).ledger))
        indep = total.epsilon(s["delta"])
        # the report may use a coarser (pessimistic) PLD grid: an upper bound, never below the fine value
        assert indep <= s["composition_epsilon"] <= indep * 1.02
        assert s["composition_epsilon"] > runs.epsilon_spent.max()
    assert math.isfinite(an.selection["opacus"]["repeat_and_select_epsilon"])
    assert an.selection["opacus"]["repeat_and_select_epsilon"] > 4
    md = (sweep_dir / "private" / "report.md").read_text()
    assert "RepeatAndSelect (Papernot & Steinke 2022, RDP)" in md and "private runs composed" in md


def test_repeat_and_select_refused_for_events_rdp_cannot_analyse():
    """RepeatAndSelect is RDP-only: events the RDP accountant cannot analyse (here truncated-Poisson steps, a
    PLD-only event) make it 'not available' with the accountant's reason, whatever the backend."""
    from dptrain.report.selection_cost import repeat_and_select as _repeat_and_select

    scheme = acc.TruncatedPoissonSampling.with_headroom(256, 1604)
    led = acc.PrivacyLedger()
    led.compose(scheme.step_event(1.5), 10)
    out = _repeat_and_select([led, led], 1e-5)
    assert math.isnan(out["repeat_and_select_epsilon"])
    assert "RDP accountant cannot analyse them" in out["repeat_and_select_note"]
    assert "does not satisfy it" in out["repeat_and_select_assumption"]


def test_groups_below_min_size_are_flagged_not_hidden(an):
    g = an.groups
    inter = g[g.grouping == an.groupings[-1]]
    assert inter.small.any() and (~inter.small).any()
    assert (g[g.small].n.min() < 30) or (g[g.small].n_pos.min() < 5)
    assert set(an.groupings[:3]) == set(SINGLE) and len(an.groupings) == 4


def test_report_files(sweep_dir, summary):
    html = (sweep_dir / "private" / "report.html").read_text()
    imgs = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'>", html)
    assert len(imgs) == 7  # the headline at the top, then six under Plots
    for _, b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html), "report.html must open offline"
    for run in summary.run:
        assert run in html
    md = (sweep_dir / "private" / "report.md").read_text()
    for f in re.findall(r"\]\((plots/[^)]+)\)", md):
        assert (sweep_dir / "private" / f).stat().st_size > 1000
    for section in ("Utility vs epsilon", "Fairness gaps by race", "Change vs non-private",
                    "Correlation between epsilon", "Per group: race × gender × age_group", "Privacy statement"):
        assert section in md and section in html


def test_audit_in_summary_and_report(sweep_dir, summary):
    for row in summary.itertuples():
        a = json.loads((_rd(sweep_dir, row.run).private / "audit.json").read_text())
        assert row.audit_status == a["status"] == "ok"
        assert row.audit_epsilon_lower_bound == pytest.approx(a["epsilon_lower_bound"])
        assert row.canary_auc == pytest.approx(a["canary_auc"])
        if math.isfinite(float(row.epsilon)):
            assert row.audit_epsilon_lower_bound <= row.epsilon_spent
    md = (sweep_dir / "private" / "report.md").read_text()
    assert "## Empirical privacy audit" in md and "no empirical lower bound exceeds its claimed epsilon" in md
    assert "Audit: claimed epsilon vs empirical lower bound" in md


def test_report_cli_rerenders_without_retraining(sweep_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(sweep_dir, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.glob("runs/**/*") if p.is_file()}
    (copy / "private" / "summary.csv").unlink()
    (copy / "release" / "selection.json").unlink()
    assert main(["report", str(copy), "--bootstrap", "300"]) == 0
    printed = capsys.readouterr().out
    assert f"report (private: computed on real test records): {copy / 'private' / 'report.html'}" in printed
    assert f"(publishable): {copy / 'release' / 'selection.json'}" in printed
    assert {p: p.stat().st_mtime_ns for p in copy.glob("runs/**/*") if p.is_file()} == before
    # deterministic: the same numbers as the report written after the sweep
    pd.testing.assert_frame_equal(pd.read_csv(copy / "private" / "summary.csv"),
                                  pd.read_csv(sweep_dir / "private" / "summary.csv"))
    assert (copy / "release" / "selection.json").read_text() == (sweep_dir / "release" / "selection.json").read_text()


def test_threshold_changes_threshold_metrics_only(sweep_dir, tmp_path):
    import shutil

    sub = tmp_path / "two"
    for run in ("opacus-eps1-seed0", "opacus-epsinf-seed0"):
        shutil.copytree(sweep_dir / "runs" / run, sub / "runs" / run)
    a, b = analyse(sub, n_boot=200, threshold=0.25), analyse(sub, n_boot=200, threshold=0.5)
    fa, fb = a.summary_frame(), b.summary_frame()
    np.testing.assert_allclose(fa.auroc, fb.auroc)
    assert (fa.threshold == 0.25).all() and (fb.threshold == 0.5).all()
    p = _preds(sweep_dir, "opacus-epsinf-seed0")
    for thr, an_ in ((0.25, a), (0.5, b)):
        acc_ = ((p.score >= thr).astype(int) == p.y_true).mean()
        assert an_.summary_frame().set_index("run").loc["opacus-epsinf-seed0", "accuracy"] == pytest.approx(acc_)


def test_report_errors(tmp_path, capsys):
    with pytest.raises(ReportError, match="no runs/ directory"):
        analyse(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dptrain: error: ") and "Traceback" not in err
