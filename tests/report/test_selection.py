"""Selection on validation records, one split per sweep, and the public statement of the selection
(release/selection.json): on hand-made run directories in the lifecycle layout (fast, exact control of the
validation and test rankings) and on the real sweep of conftest.py."""

from __future__ import annotations

import html
import json
import math
import shutil
import zlib
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pandas as pd
import pytest
import yaml

import accounting as acc
from dptrain.lifecycle import RunDir
from dptrain.report import ReportError, analyse, build_report
from dptrain.report.analysis import SELECTION_WORDING, dominating_event
from dptrain.report.render import write_report

SPLIT = {"method": "random by example", "seed": 0, "seed_note": "the split seed (data.split_seed)",
         "test_fraction": 0.25, "validation_fraction": 0.2, "rng": "numpy permutation"}
N_TEST = 240
METRIC_WORDS = {"auroc", "auprc", "accuracy", "ece", "brier", "loss", "tpr", "fnr", "fpr", "metric", "metrics",
                "score", "scores", "utility", "gap", "gaps"}
COUNT_WORDS = {"n", "count", "counts", "size", "units", "rows", "records", "examples", "patients", "positives"}


def _y_true() -> np.ndarray:
    return np.tile([0, 1, 1, 0, 1, 0], N_TEST // 6)


def _ledger(q: float, sigma: float, steps: int) -> acc.PrivacyLedger:
    led = acc.PrivacyLedger()
    led.compose(dpa.GaussianDpEvent(20.0), 1, label="unit_count")  # the run's DP count of units
    led.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return led


def fake_run(sweep: Path, name: str, *, validation_auroc: float | None, test_quality: float, q: float = 0.1,
             sigma: float = 1.0, steps: int = 60, split: dict | None = None, y_true: np.ndarray | None = None) -> RunDir:
    """A finished run directory with the minimal files a report reads, in the release/private layout.
    ``test_quality`` in [0, 1]: how well the test scores rank the labels (1 = perfectly)."""
    backend, rest = name.split("-eps", 1)
    eps_s, seed_s = rest.rsplit("-seed", 1)
    eps = math.inf if eps_s == "inf" else float(eps_s)
    rd = RunDir(sweep / "runs" / name)
    rd.make()
    y = _y_true() if y_true is None else y_true
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    score = np.clip(test_quality * y + (1 - test_quality) * rng.random(len(y)) + 0.05 * rng.random(len(y)), 0, 1)
    pd.DataFrame({"y_true": y, "score": score}).to_parquet(rd.private / "predictions.parquet", index=False)
    rd.config.write_text(yaml.safe_dump({"name": "fake", "seed": int(seed_s),
                                         "data": {"split_seed": 0, "validation_fraction": 0.2}}))
    led = _ledger(q, sigma, steps) if math.isfinite(eps) else acc.PrivacyLedger()
    led.save(rd.ledger)
    spent = 0.97 * eps if math.isfinite(eps) else "inf"  # stands for the statement's number (not recomputed here)
    statement = {"epsilon": spent, "target_epsilon": eps if math.isfinite(eps) else "inf", "delta": 1e-5,
                 "accountant": "pld", "accountant_version": "dp-accounting test", "pld_discretization": 1e-4,
                 "privacy_unit": "example",
                 "neighbouring_relation": "add_or_remove", "sampling": "poisson", "sampling_rate": q,
                 "noise_multiplier": sigma if math.isfinite(eps) else 0.0, "steps": steps, "clipping_norm": 1.0,
                 "clipping_granularity": "per example", "mode": "dp" if math.isfinite(eps) else "non_private"}
    rd.statement.write_text(json.dumps(statement))
    metrics = {"test": {"auroc": 0.5}}
    if validation_auroc is not None:
        metrics["validation"] = {"auroc": validation_auroc, "accuracy": 0.7}
    record = {"format": "dptrain.run-record/2", "command": "train", "status": "finished", "recipe": "fake",
              "run_id": "fake", "privacy": statement,
              "metrics": metrics, "training": {"backend": backend},
              "data": {"source": "fake", "preprocessing": {"split": dict(split or SPLIT)}}}
    rd.record.write_text(json.dumps(record))
    return rd


def _two_runs(tmp_path: Path) -> Path:
    """eps1: best on validation, worst on test; eps4: the other way round."""
    sweep = tmp_path / "fake-sweep"
    fake_run(sweep, "opacus-eps1-seed0", validation_auroc=0.81, test_quality=0.2, q=0.101, sigma=1.6)
    fake_run(sweep, "opacus-eps4-seed0", validation_auroc=0.64, test_quality=0.9, q=0.099, sigma=0.9)
    return sweep


def test_selection_follows_validation_not_test(tmp_path):
    sweep = _two_runs(tmp_path)
    an = analyse(sweep, n_boot=100)
    test_auroc = {r.name: r.utility["auroc"] for r in an.runs}
    assert test_auroc["opacus-eps4-seed0"] > test_auroc["opacus-eps1-seed0"] + 0.2  # the rankings disagree
    s = an.selection["opacus"]
    assert s["selected_epsilon"] == 1.0 and s["selected_run"] == "opacus-eps1-seed0"
    assert s["private_runs"] == ["opacus-eps1-seed0", "opacus-eps4-seed0"]
    # the composition covers both runs; RepeatAndSelect is computed although q and steps differ between runs
    total = acc.PrivacyLedger()
    for name in s["private_runs"]:
        total.extend(acc.PrivacyLedger.load(RunDir(sweep / "runs" / name).ledger))
    fine = total.epsilon(1e-5)
    assert fine <= s["composition_epsilon"] <= fine * 1.02
    assert math.isfinite(s["repeat_and_select_epsilon"])

    paths = write_report(an, sweep)  # what build_report(sweep) writes, without analysing twice
    assert set(paths) == {"html", "md", "csv", "selection"}
    assert paths["html"] == sweep / "private" / "report.html" and paths["csv"] == sweep / "private" / "summary.csv"
    assert paths["md"] == sweep / "private" / "report.md"
    assert paths["selection"] == sweep / "release" / "selection.json"
    sel = json.loads(paths["selection"].read_text())
    assert sel["backends"]["opacus"]["selected"] == {"backend": "opacus", "target_epsilon": 1.0,
                                                    "run": "opacus-eps1-seed0",
                                                    "run_epsilon": s["selected_run_epsilon"]}
    summary = pd.read_csv(paths["csv"]).set_index("run")
    assert bool(summary.loc["opacus-eps1-seed0", "selected"]) and not bool(summary.loc["opacus-eps4-seed0", "selected"])
    assert summary.loc["opacus-eps1-seed0", "validation_auroc"] == pytest.approx(0.81)
    _assert_no_metrics_or_counts(sel, [r.record for r in an.runs], an)


def test_selection_without_validation_metrics_is_refused(tmp_path):
    sweep = _two_runs(tmp_path)
    fake_run(sweep, "opacus-eps2-seed0", validation_auroc=None, test_quality=0.99)
    with pytest.raises(ReportError, match=r"selection refused: run\(s\) opacus-eps2-seed0 have no validation AUROC"
                                          r".*never on test records"):
        analyse(sweep, n_boot=100)
    assert not (sweep / "release" / "selection.json").exists()


def test_report_mixing_two_splits_is_refused(tmp_path):
    sweep = _two_runs(tmp_path)
    fake_run(sweep, "opacus-eps2-seed0", validation_auroc=0.7, test_quality=0.5, split={**SPLIT, "seed": 1})
    with pytest.raises(ReportError, match=r"different data splits \(seed 0 vs 1\).*one shared split") as err:
        analyse(sweep, n_boot=100)
    assert "\n" not in str(err.value)
    # the same declared split but other test records (e.g. another data file): refused too
    y = _y_true().copy()
    y[:2] = 1 - y[:2]
    fake_run(sweep, "opacus-eps2-seed0", validation_auroc=0.7, test_quality=0.5, y_true=y)
    with pytest.raises(ReportError, match=r"different test records.*do not share one split"):
        build_report(sweep, n_boot=100)
    assert not (sweep / "private").exists() and not (sweep / "release").exists()


def test_earlier_run_layout_is_refused(tmp_path):
    old = tmp_path / "old" / "runs" / "opacus-eps1-seed0"
    old.mkdir(parents=True)
    (old / "record.json").write_text("{}")
    with pytest.raises(ReportError, match="earlier dptrain"):
        analyse(tmp_path / "old", n_boot=100)


def test_dominating_event_bounds_every_run():
    ledgers = [_ledger(0.101, 1.6, 60), _ledger(0.099, 0.9, 58), _ledger(0.1, 1.2, 61)]
    dom = acc.PrivacyLedger(accountant="rdp")
    dom.compose(dominating_event(ledgers), 1)
    each = [led.epsilon(1e-5, "rdp") for led in ledgers]
    assert dom.epsilon(1e-5) >= max(each)
    # and not the sum of the runs: the unit-count release is kept once, the steps are not added up
    assert dom.epsilon(1e-5) < 1.5 * max(each)


# ---------------------------------------------------------------- the real sweep (conftest.py)

def _assert_no_metrics_or_counts(sel: dict, records: list[dict], an) -> None:
    """No key names a metric or a count; no number equals a metric value or a count of records."""
    forbidden: set[float] = set()
    for rec in records:
        for part in (rec.get("metrics") or {}).values():
            forbidden |= {float(v) for v in part.values() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        data = rec.get("data") or {}
        forbidden |= {float(data[k]) for k in ("n_train", "n_validation", "n_test", "num_units") if k in data}
        units = (rec["privacy"].get("units") or {}).get("value")
        if units is not None:
            forbidden.add(float(units))
    for r in an.runs:
        forbidden |= {float(len(r.preds)), *(float(v) for v in r.utility.values() if math.isfinite(v))}
    forbidden -= {0.0, 1.0}  # trivial values (a perfect AUROC, split seed 0) that public declarations share

    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                words = set(k.lower().replace("-", "_").split("_"))
                assert not words & METRIC_WORDS, f"metric-like key {path}/{k}"
                assert not words & COUNT_WORDS, f"count-like key {path}/{k}"
                walk(v, f"{path}/{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            assert float(obj) not in forbidden, f"{path} = {obj} equals a metric value or a count"
        elif isinstance(obj, str):
            low = obj.lower()
            for v in forbidden:
                if 0 < v < 1:  # a metric written into a sentence
                    assert f"{v:.3f}" not in low or f"{v:.3f}" in SELECTION_WORDING, f"{path} holds {v:.3f}"

    walk(sel, "")


def test_all_runs_of_the_sweep_share_one_split(sweep_dir):
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    assert spec["split"]["validation_fraction"] == 0.2 and spec["split"]["split_seed"] == 0
    assert "set by the sweep" in spec["split"]["validation_fraction_source"]
    log = (sweep_dir / "progress.log").read_text()
    assert "data.validation_fraction=0.2" in log and "one train/validation/test split for every run" in log
    splits, y, seeds = [], [], set()
    for name in spec["points"]:
        rd = RunDir(sweep_dir / "runs" / name)
        rec = rd.finished_record()
        splits.append(rec["data"]["preprocessing"]["split"])
        assert splits[-1]["seed"] == 0 and splits[-1]["validation_fraction"] == 0.2
        assert "auroc" in rec["metrics"]["validation"]
        y.append(pd.read_parquet(rd.private / "predictions.parquet")["y_true"].to_numpy())
        seeds.add(yaml.safe_load(rd.config.read_text())["seed"])
    assert len(seeds) > 1  # the training seed varies, the split does not
    assert all(s == splits[0] for s in splits)
    assert all(np.array_equal(v, y[0]) for v in y)


def test_real_sweep_selects_on_validation(sweep_dir, sweep_analysis):
    for b, s in sweep_analysis.selection.items():
        by_eps: dict[float, list[float]] = {}
        for r in sweep_analysis.runs:
            if r.backend == b and r.private:
                by_eps.setdefault(r.epsilon, []).append(r.record["metrics"]["validation"]["auroc"])
        assert s["selected_epsilon"] == max(by_eps, key=lambda e: np.mean(by_eps[e]))
        sel = json.loads((sweep_dir / "release" / "selection.json").read_text())
        assert sel["backends"][b]["selected"]["target_epsilon"] == s["selected_epsilon"]
        assert sel["backends"][b]["composition"]["epsilon"] == pytest.approx(s["composition_epsilon"])
        assert sel["backends"][b]["repeat_and_select"]["epsilon"] == pytest.approx(s["repeat_and_select_epsilon"])
        assert "fixed grid run to completion does not satisfy it" in sel["backends"][b]["repeat_and_select"][
            "assumption"]
        assert sel["backends"][b]["delta"] == s["delta"]


def test_selection_json_has_no_metrics_and_no_counts(sweep_dir, sweep_analysis):
    sel = json.loads((sweep_dir / "release" / "selection.json").read_text())
    assert sorted(p.name for p in (sweep_dir / "release").iterdir()) == ["selection.json"]
    assert sel["format"] == "dptrain.sweep-selection/1"
    assert set(sel) >= {"rule", "statement", "split", "backends", "not_covered", "non_private_runs"}
    _assert_no_metrics_or_counts(sel, [r.record for r in sweep_analysis.runs], sweep_analysis)


def test_selection_wording_appears(sweep_dir):
    assert SELECTION_WORDING.startswith("the choice uses only the runs' DP outputs (their models' scores on "
                                        "validation records, which are not training records: all runs share one "
                                        "split), so publishing the chosen run's model costs at most the composition "
                                        "of all private runs on these training records (valid for any selection "
                                        "rule that uses only the models and non-training records); RepeatAndSelect "
                                        "(Papernot & Steinke 2022) can be smaller but is valid only if the number of runs "
                                        "was random as it assumes (a fixed grid run to completion does not satisfy "
                                        "it)")
    sel = json.loads((sweep_dir / "release" / "selection.json").read_text())
    assert sel["statement"] == SELECTION_WORDING
    assert SELECTION_WORDING in (sweep_dir / "private" / "report.md").read_text()
    assert SELECTION_WORDING in html.unescape((sweep_dir / "private" / "report.html").read_text())


def test_sweep_layout_keeps_the_report_private(sweep_dir):
    top = sorted(p.name for p in sweep_dir.iterdir())
    assert "report.html" not in top and "summary.csv" not in top and "plots" not in top
    assert {"sweep.json", "runs", "private", "release"} <= set(top)
    priv = sweep_dir / "private"
    assert {p.name for p in priv.iterdir()} >= {"report.html", "report.md", "summary.csv", "plots"}
    md = (priv / "report.md").read_text()
    assert "PRIVATE: this report is computed from real test records" in md
    assert "Selected configuration by mean validation AUROC" in md


def test_rerendered_selection_is_deterministic(sweep_dir, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(sweep_dir, copy)
    (copy / "release" / "selection.json").unlink()
    paths = build_report(copy, n_boot=300)
    assert json.loads(paths["selection"].read_text()) == json.loads(
        (sweep_dir / "release" / "selection.json").read_text())
