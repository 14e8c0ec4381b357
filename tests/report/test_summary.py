"""The report answers first: the summary's sentences quote the analysis' numbers (recomputed here from summary.csv),
come before the headline plot, which comes before the first table (report.html and report.md), and stay honest when
parts of a sweep are missing (no non-private run, one epsilon, only non-private runs, no sensitive attribute,
unfinished runs, an audit violation)."""

from __future__ import annotations

import html
import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from dptrain.report import analyse
from dptrain.report.fmt import signed
from dptrain.report.plots import HEADLINE
from dptrain.report.render import write_report
from dptrain.report.summary import findings
from tests.report.test_selection import fake_run

SINGLE = ["race", "gender", "age_group"]


@pytest.fixture(scope="module")
def summary(sweep_dir):
    return pd.read_csv(sweep_dir / "private" / "summary.csv")


def _by_key(fs):
    return {f.key: f for f in fs}


def _paired_change(summary, backend, eps, col):
    """Mean over seeds of (private run - non-private run of the same seed), from summary.csv."""
    s = summary[summary.backend == backend]
    ref = s[np.isinf(s.epsilon.astype(float))].set_index("seed")[col]
    rows = s[s.epsilon.astype(float) == eps]
    return float(np.nanmean([r[col] - ref[r.seed] for _, r in rows.iterrows()]))


def test_sentences_quote_the_analysis_numbers(sweep_analysis, summary):
    an = sweep_analysis
    fs = findings(an)
    keys = [f.key for f in fs]
    sel = an.selection["opacus"]
    eps = sel["selected_epsilon"]
    assert keys[0] == "utility" and keys[-1] == "selection" and keys[-2] == "audit"
    assert [k for k in keys if k.startswith("worst_group:")] == [f"worst_group:{a}" for a in SINGLE]
    assert ("strongest" in keys) == (eps > 1.0)
    by = _by_key(fs)

    u = by["utility"]
    rows = summary[(summary.backend == "opacus") & (summary.epsilon.astype(float) == eps)]
    assert u.values["epsilon"] == eps and u.values["auroc"] == pytest.approx(rows.auroc.mean(), abs=1e-12)
    assert u.values["change"] == pytest.approx(_paired_change(summary, "opacus", eps, "auroc"), abs=1e-12)
    c = next(c for c in an.configs if c["backend"] == "opacus" and c["epsilon"] == eps)
    lo, hi = c["change_vs_nonprivate"]["utility"]["auroc"]["ci"]
    assert u.values["change_ci"] == (lo, hi) and lo < hi
    assert f"At epsilon {eps:g} " in u.text
    for x in (u.values["auroc"], *u.values["auroc_ci"]):
        assert f"{x:.3f}" in u.text
    assert f"a change of {signed(u.values['change'])} [{signed(lo)}, {signed(hi)}] vs non-private" in u.text

    for a in SINGLE:
        w = by[f"worst_group:{a}"]
        col = f"worst_group_auroc[{a}]"
        assert w.values["worst_group_auroc"] == pytest.approx(rows[col].mean(), abs=1e-12)
        assert w.values["change"] == pytest.approx(_paired_change(summary, "opacus", eps, col), abs=1e-12, nan_ok=True)
        assert f"worst-group AUROC {w.values['worst_group_auroc']:.3f} [" in w.text
        assert f"a change of {signed(w.values['change'])} [" in w.text
        g = an.groups
        sub = g[(g.backend == "opacus") & (g.epsilon == eps) & (g.grouping == a) & ~g.small]
        assert w.values["group"] == sub.sort_values("auroc").group.iloc[0] and f" is {w.values['group']}:" in w.text

    audit = by["audit"]
    bounds = {r.run: r.audit_epsilon_lower_bound for r in summary.itertuples()}
    top = max(bounds, key=bounds.get)
    assert audit.text.startswith("No audit violation") and not audit.warn
    assert audit.values["run"] == top and audit.values["largest_lower_bound"] == pytest.approx(bounds[top])
    assert f"the largest, {bounds[top]:.2f}, in {top}" in audit.text

    s = by["selection"]
    assert s.values["composition_epsilon"] == sel["composition_epsilon"]
    assert f"cost epsilon {sel['composition_epsilon']:.2f} at delta {sel['delta']:g}" in s.text
    assert f"the {len(rows) * 2} private runs tried" in s.text  # 2 private epsilons x the seeds


def _first(text: str, *needles: str) -> list[int]:
    pos = [text.find(n) for n in needles]
    assert min(pos) >= 0, [n for n, p in zip(needles, pos, strict=True) if p < 0]
    return pos


def test_html_and_markdown_open_with_the_answer(sweep_dir, sweep_analysis):
    page = (sweep_dir / "private" / "report.html").read_text()
    fs = findings(sweep_analysis)
    summ, head, first_table, audit, plots = _first(page, "<h2 id='summary'>Summary</h2>", f"<img alt='{HEADLINE}'",
                                                   "<table", "<h2>Empirical privacy audit</h2>", "<h2>Plots</h2>")
    sentences = [page.find(f"<li class=''>{html.escape(f.text)}</li>") for f in fs]
    assert min(sentences) > summ and sentences == sorted(sentences) and max(sentences) < head
    assert head < audit < first_table < plots
    assert page.count(f"<img alt='{HEADLINE}'") == 1  # at the top only, not again under Plots

    md = (sweep_dir / "private" / "report.md").read_text()
    summ, head, first_table, plots = _first(md, "## Summary", f"(plots/{HEADLINE}.png)", "\n| backend", "## Plots")
    sentences = [md.find(f"- {f.text}\n") for f in fs]
    assert min(sentences) > summ and sentences == sorted(sentences) and max(sentences) < head < first_table < plots
    assert md.index("# Privacy-utility-fairness report") < summ and md.count(f"plots/{HEADLINE}.png") == 1
    assert (sweep_dir / "private" / "plots" / f"{HEADLINE}.png").stat().st_size > 1000


def _subset(sweep_dir, dest, runs):
    for run in runs:
        shutil.copytree(sweep_dir / "runs" / run, dest / "runs" / run)
    return dest


def _report(sweep, **kw):
    an = analyse(sweep, n_boot=200, **kw)
    paths = write_report(an, sweep)
    return an, findings(an), paths["md"].read_text(), paths["html"].read_text()


def test_without_a_non_private_run(sweep_dir, tmp_path):
    sweep = _subset(sweep_dir, tmp_path / "s", [f"opacus-eps{e}-seed{s}" for e in (1, 4) for s in (0, 1)])
    an, fs, md, page = _report(sweep)
    by = _by_key(fs)
    assert "no non-private run of this backend to compare with (add inf to --epsilons)" in by["utility"].text
    assert "change" not in by["utility"].values
    for a in SINGLE:
        assert "change" not in by[f"worst_group:{a}"].values and "vs non-private" not in by[f"worst_group:{a}"].text
    assert md.index("## Summary") < md.index("no non-private run") < md.index("\n| backend")
    assert "<img alt='headline_utility_and_worst_group'" in page


def test_one_epsilon_only(sweep_dir, tmp_path):
    sweep = _subset(sweep_dir, tmp_path / "s", ["opacus-eps4-seed0", "opacus-epsinf-seed0"])
    _, fs, md, _ = _report(sweep)
    keys = [f.key for f in fs]
    assert keys.count("utility") == 1 and "strongest" not in keys
    assert "At epsilon 4 (the configuration selected on validation records)" in md
    assert "paired over 1 seed(s)" in md


def test_only_non_private_runs(sweep_dir, tmp_path):
    sweep = _subset(sweep_dir, tmp_path / "s", ["opacus-epsinf-seed0", "opacus-epsinf-seed1"])
    an, fs, md, _ = _report(sweep)
    by = _by_key(fs)
    assert not an.selection and "selection" not in by
    ref = next(c for c in an.configs if math.isinf(c["epsilon"]))
    assert by["nonprivate_only"].values["auroc"] == ref["utility"]["auroc"]["mean"]
    assert "Only non-private runs (epsilon = inf)" in md and "nothing here may be released" in md
    assert by["worst_group:race"].text.startswith("By race, the worst-off group non-private is ")


def test_no_sensitive_attributes_and_unfinished_runs(tmp_path):
    sweep = tmp_path / "fake"
    fake_run(sweep, "opacus-eps1-seed0", validation_auroc=0.8, test_quality=0.6)
    fake_run(sweep, "opacus-eps4-seed0", validation_auroc=0.7, test_quality=0.8)
    fake_run(sweep, "opacus-epsinf-seed0", validation_auroc=0.9, test_quality=0.9)
    (sweep / "runs" / "opacus-eps8-seed0").mkdir()  # never finished
    an, fs, md, page = _report(sweep)
    by = _by_key(fs)
    assert not an.groupings and not [k for k in by if k.startswith("worst_group")]
    assert by["fairness"].text == "No sensitive attributes in the data (data.sensitive): no fairness finding."
    assert by["audit"].text.startswith("No run carries canaries")
    assert by["missing"].warn and "opacus-eps8-seed0" in by["missing"].text
    assert "<li class='warn'>1 grid point(s) did not finish (opacus-eps8-seed0)" in page
    assert "- **1 grid point(s) did not finish" in md
    # selected: eps1 (best validation AUROC), then the strongest privacy tried is the same: one utility sentence
    assert by["utility"].values["epsilon"] == 1.0 and "strongest" not in by


def test_an_audit_violation_is_the_first_warning(tmp_path):
    sweep = tmp_path / "fake"
    fake_run(sweep, "opacus-eps1-seed0", validation_auroc=0.8, test_quality=0.6)
    rd = fake_run(sweep, "opacus-eps4-seed0", validation_auroc=0.7, test_quality=0.8)
    fake_run(sweep, "opacus-epsinf-seed0", validation_auroc=0.9, test_quality=0.9)
    rec = json.loads(rd.record.read_text())
    rec["audit"] = {"status": "VIOLATION", "epsilon_lower_bound": 6.0, "max_certifiable_epsilon": 7.0,
                    "message": "empirical lower bound 6.0 > claimed 3.88"}
    rd.record.write_text(json.dumps(rec))
    _, fs, md, page = _report(sweep)
    audit = _by_key(fs)["audit"]
    assert audit.warn and audit.values["violations"] == ["opacus-eps4-seed0"]
    assert re.search(r"<li class='warn'>PRIVACY VIOLATION: [^<]*opacus-eps4-seed0", page)
    assert md.index("- **PRIVACY VIOLATION") < md.index("## How to read the details")


def test_two_backends_are_told_apart(tmp_path):
    sweep = tmp_path / "fake"
    for b in ("jax", "opacus"):
        fake_run(sweep, f"{b}-eps1-seed0", validation_auroc=0.7, test_quality=0.6)
        fake_run(sweep, f"{b}-eps4-seed0", validation_auroc=0.8, test_quality=0.8)
        fake_run(sweep, f"{b}-epsinf-seed0", validation_auroc=0.9, test_quality=0.9)
    an, fs, md, _ = _report(sweep)
    assert [(f.key, f.backend) for f in fs if f.key in ("utility", "strongest")] == [
        ("utility", "jax"), ("strongest", "jax"), ("utility", "opacus"), ("strongest", "opacus")]
    for f in fs:
        if f.backend is not None:
            assert f.text.startswith(f"[{f.backend}] At ") or f.text.startswith(f"[{f.backend}] Choosing")
    last = fs[-1]
    assert last.key == "selection_all" and last.values["composition_epsilon"] == an.composition_all["composition_epsilon"]
    assert f"costs epsilon {an.composition_all['composition_epsilon']:.2f}" in last.text and last.text in md
