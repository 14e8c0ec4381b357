"""From finished run directories to the numbers of a privacy-utility-fairness report.

Statistics (all on the test predictions each run saved; nothing is retrained):

* Point estimates per run use fairlearn's MetricFrame (``dptrain.evaluate.fairness``); a configuration's
  estimate (backend, epsilon) is the mean over its seeds.
* 95% CIs are percentile bootstrap intervals over test examples: for each seed (= one train/test split)
  one (B, n) matrix of resampling counts is drawn and applied to *every* run on that split, so the
  difference between two runs on the same split is a paired bootstrap. A configuration's replicate b is
  the mean over seeds of the runs' replicate b. ``sd`` is the spread over seeds (training randomness).
* The decision threshold is fixed before looking at any test data (``threshold``, recorded in the
  report); it is never tuned on the test set.
* Groups are each sensitive attribute's values and their full intersection; a group with fewer than
  ``min_group_size`` test examples or fewer than 5 of either class is flagged ``small`` and kept in the
  per-group tables, but left out of the gaps (its AUROC is noise).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

import accounting as acc
from dptrain.evaluate import fairness as fm
from dptrain.report.sweep import eps_label

UTILITY = ("auroc", "accuracy", "auprc", "ece")
DEFAULT_BOOT = 1000


class ReportError(ValueError):
    """The report cannot be built; the message says what is missing and how to fix it."""


@dataclass
class RunData:
    name: str
    dir: Path
    backend: str
    epsilon: float
    seed: int
    record: dict[str, Any]
    preds: pd.DataFrame
    sensitive: list[str]
    # filled by analyse()
    utility: dict[str, float] = field(default_factory=dict)
    utility_boot: dict[str, np.ndarray] = field(default_factory=dict)
    group_tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    group_boot: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    gaps: dict[str, dict[str, float]] = field(default_factory=dict)
    gaps_boot: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    worst_group: tuple[str, float] = ("", math.nan)

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def config(self) -> tuple[str, float]:
        return (self.backend, self.epsilon)


def _eps(value) -> float:
    return math.inf if value in ("inf", None) else float(value)


def load_runs(sweep_dir: str | Path) -> tuple[dict[str, Any], list[RunData], list[dict[str, str]]]:
    """(sweep spec, finished runs, [{name, status, error}] for points without a record)."""
    root = Path(sweep_dir)
    spec_path = root / "sweep.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise ReportError(f"{root}: no runs/ directory; run `dptrain sweep RECIPE --out {root}` first")
    names = spec.get("points") or sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
    runs, missing = [], []
    for name in names:
        d = runs_dir / name
        rec_path = d / "record.json"
        if not rec_path.exists():
            fail = root / "failures" / f"{name}.txt"
            missing.append({"name": name, "status": "failed" if fail.exists() else "not run",
                            "error": fail.read_text().split("\n", 1)[0] if fail.exists() else ""})
            continue
        record = json.loads(rec_path.read_text())
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        preds = pd.read_parquet(d / "predictions.parquet")
        if "score" not in preds:
            raise ReportError(f"{d}: predictions have no 'score' column; the fairness report covers binary "
                              "classifiers only")
        sens = [c for c in preds.columns if c not in ("y_true", "score")]
        runs.append(RunData(name=name, dir=d, backend=record["training"]["backend"],
                            epsilon=_eps(record["privacy"].get("target_epsilon")), seed=int(cfg["seed"]),
                            record=record, preds=preds, sensitive=sens))
    if not runs:
        raise ReportError(f"{root}: no finished run (no runs/*/record.json); run or resume the sweep first")
    return spec, runs, missing


def _agg(points: list[float], boots: list[np.ndarray], level: float) -> dict[str, Any]:
    pts = np.asarray(points, float)
    mean = float(np.nanmean(pts)) if np.isfinite(pts).any() else math.nan
    sd = float(np.nanstd(pts, ddof=1)) if np.isfinite(pts).sum() > 1 else math.nan
    if boots:
        with np.errstate(all="ignore"):
            stack = np.vstack(boots)
            rep = np.where(np.isfinite(stack).all(axis=0), stack.mean(axis=0), np.nan)
        lo, hi = fm.percentile_ci(rep, level)
    else:
        lo, hi = math.nan, math.nan
    return {"mean": mean, "ci": (lo, hi), "sd": sd, "n_seeds": int(np.isfinite(pts).sum())}


@dataclass
class Analysis:
    spec: dict[str, Any]
    runs: list[RunData]
    missing: list[dict[str, str]]
    threshold: float
    n_boot: int
    level: float
    min_group_size: int
    groupings: list[str]            # names, single attributes first, intersection last
    single: list[str]               # single-attribute grouping names
    configs: list[dict[str, Any]]
    groups: pd.DataFrame            # one row per (backend, epsilon, grouping, group)
    pearson: pd.DataFrame
    selection: dict[str, Any]

    def summary_frame(self) -> pd.DataFrame:
        rows = []
        for r in sorted(self.runs, key=lambda r: (r.backend, r.epsilon, r.seed)):
            p = r.record["privacy"]
            row = {"run": r.name, "epsilon": eps_label(r.epsilon), "seed": r.seed, "backend": r.backend,
                   "status": "finished", "epsilon_spent": p["epsilon"], "delta": p["delta"],
                   "accountant": p["accountant"], "noise_multiplier": p["noise_multiplier"], "steps": p["steps"],
                   "privacy_unit": p["privacy_unit"]}
            for m in UTILITY:
                row[m] = r.utility[m]
                lo, hi = fm.percentile_ci(r.utility_boot[m], self.level)
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = lo, hi
            row["worst_group_auroc"], row["worst_group"] = r.worst_group[1], r.worst_group[0]
            for g in self.groupings:
                for k in fm.GAPS:
                    row[f"{k}[{g}]"] = r.gaps[g][k]
            a = r.record.get("audit") or {}
            row["audit_status"] = a.get("status", "not audited")
            row["audit_epsilon_lower_bound"] = a.get("epsilon_lower_bound")
            row["audit_max_certifiable_epsilon"] = a.get("max_certifiable_epsilon")
            row["canary_auc"] = a.get("canary_auc")
            row["loss_attack_auc"] = a.get("loss_attack_auc")
            row["threshold"] = self.threshold
            rows.append(row)
        for m in self.missing:
            backend, rest = m["name"].split("-eps", 1)
            eps, seed = rest.rsplit("-seed", 1)
            rows.append({"run": m["name"], "epsilon": eps, "seed": int(seed), "backend": backend,
                         "status": m["status"], "error": m["error"]})
        cols = ["epsilon", "seed", "backend", "auroc", "worst_group_auroc", "status"]
        frame = pd.DataFrame(rows)
        return frame[cols + [c for c in frame.columns if c not in cols]]


def analyse(sweep_dir: str | Path, *, threshold: float | None = None, n_boot: int = DEFAULT_BOOT,
            level: float = 0.95, min_group_size: int = fm.DEFAULT_MIN_GROUP_SIZE, boot_seed: int = 0) -> Analysis:
    spec, runs, missing = load_runs(sweep_dir)
    thr = float(spec.get("threshold", 0.5) if threshold is None else threshold)
    if not 0 < thr < 1:
        raise ReportError(f"--threshold: got {thr}; give the fixed decision threshold in (0, 1)")
    if not isinstance(n_boot, int) or n_boot < 100:
        raise ReportError(f"--bootstrap: got {n_boot!r}; give at least 100 replicates (default {DEFAULT_BOOT})")
    if not isinstance(min_group_size, int) or min_group_size < 1:
        raise ReportError(f"--min-group-size: got {min_group_size!r}; give an integer >= 1")
    sens = runs[0].sensitive
    if any(r.sensitive != sens for r in runs):
        raise ReportError("runs disagree on the sensitive attributes; report one recipe's sweep at a time")

    # ---- one bootstrap matrix per split (seed): paired across every run on that split ----
    by_seed: dict[int, list[RunData]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    weights: dict[int, np.ndarray] = {}
    for seed, rs in by_seed.items():
        ref = rs[0].preds
        for r in rs[1:]:
            if not (len(r.preds) == len(ref) and r.preds["y_true"].equals(ref["y_true"])
                    and r.preds[sens].equals(ref[sens])):
                raise ReportError(f"runs {rs[0].name} and {r.name} have seed {seed} but different test sets; "
                                  "a sweep's runs must come from one recipe (same data and split)")
        weights[seed] = fm.bootstrap_weights(len(ref), n_boot, seed=boot_seed * 100003 + seed)

    # without sensitive attributes (e.g. Br35H) the report has utility, privacy and audit, no fairness sections
    groupings_by_seed = {s: fm.groupings(rs[0].preds[sens]) if sens else [] for s, rs in by_seed.items()}
    names = [g.name for g in next(iter(groupings_by_seed.values()))]
    single = names[:len(sens)]
    for r in runs:
        y, s, w = r.preds["y_true"].to_numpy(), r.preds["score"].to_numpy(), weights[r.seed]
        point = fm.weighted_metrics(y, s, np.ones((1, len(y))), threshold=thr)
        boot = fm.weighted_metrics(y, s, w, threshold=thr)
        r.utility = {m: float(point[m][0]) for m in UTILITY}
        r.utility_boot = {m: boot[m] for m in UTILITY}
        worst = ("", math.inf)
        for g in groupings_by_seed[r.seed]:
            table = fm.group_table(y, s, g, threshold=thr, min_group_size=min_group_size)
            r.group_tables[g.name] = table
            r.group_boot[g.name] = fm.group_metrics_boot(y, s, g, w, threshold=thr)
            r.gaps[g.name] = fm.gaps(y, s, g, threshold=thr, min_group_size=min_group_size, table=table)
            eligible = table.loc[~table["small"], "group"].tolist()
            r.gaps_boot[g.name] = fm.gaps_boot(y, s, g, w, threshold=thr, eligible=eligible)
            if g.name in single:
                for _, row in table[~table["small"]].iterrows():
                    if np.isfinite(row["auroc"]) and row["auroc"] < worst[1]:
                        worst = (f"{g.name}={row['group']}", float(row["auroc"]))
        r.worst_group = worst if math.isfinite(worst[1]) else ("", math.nan)

    configs = _configs(runs, names, level)
    groups = _group_rows(runs, names, level)
    return Analysis(spec=spec, runs=runs, missing=missing, threshold=thr, n_boot=n_boot, level=level,
                    min_group_size=min_group_size, groupings=names, single=single, configs=configs,
                    groups=groups, pearson=_pearson(runs, names), selection=_selection(runs, configs))


def _configs(runs: list[RunData], names: list[str], level: float) -> list[dict[str, Any]]:
    keys = sorted({r.config for r in runs})
    out = []
    for b, e in keys:
        rs = sorted((r for r in runs if r.config == (b, e)), key=lambda r: r.seed)
        ref = {r.seed: r for r in runs if r.backend == b and not r.private}
        c: dict[str, Any] = {"backend": b, "epsilon": e, "seeds": [r.seed for r in rs], "runs": [r.name for r in rs]}
        c["utility"] = {m: _agg([r.utility[m] for r in rs], [r.utility_boot[m] for r in rs], level) for m in UTILITY}
        c["worst_group_auroc"] = _agg([r.worst_group[1] for r in rs], [], level)
        c["gaps"] = {g: {k: _agg([r.gaps[g][k] for r in rs], [r.gaps_boot[g][k] for r in rs], level)
                         for k in fm.GAPS} for g in names}
        # paired change vs the non-private run of the same seed and backend
        paired = [r for r in rs if r.seed in ref] if math.isfinite(e) else []
        c["change_vs_nonprivate"] = None if not paired else {
            "n_pairs": len(paired),
            "utility": {m: _agg([r.utility[m] - ref[r.seed].utility[m] for r in paired],
                                [r.utility_boot[m] - ref[r.seed].utility_boot[m] for r in paired], level)
                        for m in UTILITY},
            "gaps": {g: {k: _agg([r.gaps[g][k] - ref[r.seed].gaps[g][k] for r in paired],
                                 [r.gaps_boot[g][k] - ref[r.seed].gaps_boot[g][k] for r in paired], level)
                         for k in fm.GAPS} for g in names},
        }
        out.append(c)
    return out


def _group_rows(runs: list[RunData], names: list[str], level: float) -> pd.DataFrame:
    rows = []
    for b, e in sorted({r.config for r in runs}):
        rs = [r for r in runs if r.config == (b, e)]
        ref = {r.seed: r for r in runs if r.backend == b and not r.private}
        for g in names:
            labels = sorted({lab for r in rs for lab in r.group_tables[g]["group"]})
            for lab in labels:
                present = [r for r in rs if lab in set(r.group_tables[g]["group"])]
                tabs = [r.group_tables[g].set_index("group").loc[lab] for r in present]
                row = {"backend": b, "epsilon": e, "grouping": g, "group": lab,
                       "n": float(np.mean([t["n"] for t in tabs])), "n_pos": float(np.mean([t["n_pos"] for t in tabs])),
                       "small": bool(any(t["small"] for t in tabs)), "n_seeds": len(present)}
                for m in fm.METRICS:
                    if m == "n":
                        continue
                    a = _agg([float(t[m]) for t in tabs], [r.group_boot[g][lab][m] for r in present], level)
                    row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = a["mean"], *a["ci"]
                drops = [float(ref[r.seed].group_tables[g].set_index("group").loc[lab, "auroc"]) - float(t["auroc"])
                         for r, t in zip(present, tabs, strict=True)
                         if r.private and r.seed in ref and lab in set(ref[r.seed].group_tables[g]["group"])]
                row["auroc_drop_vs_nonprivate"] = float(np.nanmean(drops)) if drops and np.isfinite(drops).any() \
                    else math.nan
                rows.append(row)
    return pd.DataFrame(rows)


def _pearson(runs: list[RunData], names: list[str]) -> pd.DataFrame:
    """Pearson r (two-sided p) between epsilon and each gap over the finite-epsilon runs of a backend."""
    from scipy import stats

    rows = []
    for b in sorted({r.backend for r in runs}):
        rs = [r for r in runs if r.backend == b and r.private]
        x = np.array([r.epsilon for r in rs])
        for g in names:
            for k in fm.GAPS:
                y = np.array([r.gaps[g][k] for r in rs])
                ok = np.isfinite(y)
                r_, p_ = math.nan, math.nan
                if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
                    res = stats.pearsonr(x[ok], y[ok])
                    r_, p_ = float(res.statistic), float(res.pvalue)
                rows.append({"backend": b, "grouping": g, "gap": k, "r": r_, "p_value": p_, "n_runs": int(ok.sum()),
                             "n_epsilons": int(len(set(x[ok].tolist())))})
    return pd.DataFrame(rows)


def _selection(runs: list[RunData], configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best private configuration per backend and the privacy cost of having tried the grid."""
    out: dict[str, Any] = {}
    for b in sorted({r.backend for r in runs}):
        priv = [r for r in runs if r.backend == b and r.private]
        if not priv:
            continue
        cands = [c for c in configs if c["backend"] == b and math.isfinite(c["epsilon"])]
        best = max(cands, key=lambda c: c["utility"]["auroc"]["mean"])
        best_run = max((r for r in priv if r.config == (b, best["epsilon"])), key=lambda r: r.utility["auroc"])
        delta = max(r.record["privacy"]["delta"] for r in priv)
        ledgers = [acc.PrivacyLedger.load(r.dir / "ledger.json") for r in priv]
        entry: dict[str, Any] = {"best_config_epsilon": best["epsilon"], "best_run": best_run.name,
                                 "best_run_epsilon": best_run.record["privacy"]["epsilon"],
                                 "n_private_runs": len(priv), "delta": delta}
        try:
            total = acc.PrivacyLedger(relation=ledgers[0].relation, privacy_unit=ledgers[0].privacy_unit,
                                      accountant=ledgers[0].accountant)
            for led in ledgers:
                total.extend(led)
            entry["composition_epsilon"] = total.epsilon(delta, quick=True)  # coarser PLD grid: an upper bound
            entry["composition_accountant"] = total.accountant
        except acc.PrivacyError as err:
            entry["composition_epsilon"], entry["composition_note"] = math.nan, str(err)
        entry.update(_repeat_and_select(priv, ledgers, delta))
        out[b] = entry
    return out


def _repeat_and_select(priv: list[RunData], ledgers: list[acc.PrivacyLedger], delta: float) -> dict[str, Any]:
    """RepeatAndSelect (Papernot & Steinke 2022, RDP) with mean = number of private runs, Poisson count.

    The grid's runs share sampling and steps and differ in sigma, so the run with the smallest sigma has the
    largest RDP at every order and bounds a random choice among them (Renyi divergence is quasi-convex).
    """
    sig = {(r.record["privacy"]["sampling"], r.record["privacy"]["sampling_rate"], r.record["privacy"]["steps"])
           for r in priv}
    if len(sig) != 1:
        return {"repeat_and_select_epsilon": math.nan,
                "repeat_and_select_note": "not computed: the private runs differ in sampling scheme, rate or steps"}
    worst = min(range(len(priv)), key=lambda i: priv[i].record["privacy"]["noise_multiplier"])
    import dp_accounting.dp_event as dpe

    pairs = ledgers[worst].pairs()
    inner = dpe.ComposedDpEvent([dpe.SelfComposedDpEvent(e, c) for e, c in pairs])
    led = acc.PrivacyLedger(relation=ledgers[worst].relation, privacy_unit=ledgers[worst].privacy_unit,
                            accountant="rdp")
    led.compose(acc.repeat_and_select(inner, mean=float(len(priv)), shape=math.inf), 1, label="repeat_and_select")
    try:
        with _quiet_absl():  # dp-accounting logs every RDP order it drops (dropping one is conservative)
            eps = led.epsilon(delta, "rdp")
        return {"repeat_and_select_epsilon": eps, "repeat_and_select_mean": len(priv)}
    except acc.PrivacyError as err:
        return {"repeat_and_select_epsilon": math.nan,
                "repeat_and_select_note": "not available for these runs' events (RepeatAndSelect is RDP-only and "
                f"the RDP accountant cannot analyse them, e.g. truncated Poisson sampling): {err}"}


class _quiet_absl:
    def __enter__(self):
        import logging

        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


__all__ = ["Analysis", "ReportError", "RunData", "analyse", "load_runs", "UTILITY"]
