"""From finished run directories to the numbers of a privacy-utility-fairness report.

Run directories are read through :class:`dptrain.lifecycle.RunDir` (``private/record.json``,
``private/predictions.parquet``, ``release/config.yaml``, ``release/ledger.json``).

One split: every run of a sweep must have been trained, validated and tested on the same split (the split
seed is apart from the training seed). ``analyse`` checks it -- every record's
``data.preprocessing.split`` and every run's test labels (and sensitive attributes) must agree -- and
refuses a report that mixes splits.

Selection (``Analysis.selection``, published as ``release/selection.json`` by the renderer): per backend the
private configuration with the highest mean *validation* AUROC over its seeds (the records' validation
metrics); test numbers never take part. A run without validation metrics makes the selection, and the
report, refuse (never a fallback to test). The cost of the choice is stated two ways: the PLD composition of
every private run's ledger (valid for any rule that uses only the models and non-training records) and
RepeatAndSelect (Papernot & Steinke 2022), valid only under its assumption of a random number of runs.

Statistics (all on the test predictions each run saved; nothing is retrained):

* Point estimates per run use fairlearn's MetricFrame (``dptrain.evaluate.fairness``); a configuration's
  estimate (backend, epsilon) is the mean over its seeds.
* 95% CIs are percentile bootstrap intervals over test examples: one (B, n) matrix of resampling counts is
  drawn for the sweep's one test set and applied to *every* run, so the difference between two runs is a
  paired bootstrap. A configuration's replicate b is the mean over seeds of the runs' replicate b. ``sd`` is
  the spread over seeds (training randomness).
* The decision threshold is fixed before looking at any test data (``threshold``, recorded in the
  report); it is never tuned on the test set.
* Groups are each sensitive attribute's values and their full intersection; a group with fewer than
  ``min_group_size`` test examples or fewer than 5 of either class is flagged ``small`` and kept in the
  per-group tables, but left out of the gaps (its AUROC is noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

import accounting as acc
from accounting.atomic import read_json
from accounting.statement import PrivacyStatement
from dptrain.evaluate import fairness as fm
from dptrain.lifecycle import RunDir, jsonable
from dptrain.records import RecordError, RunRecord
from dptrain.report import multiclass as mc
from dptrain.report.multiclass import UTILITY
from dptrain.report.selection_cost import composition, dominating_event, repeat_and_select
from dptrain.report.sweep import eps_label

DEFAULT_BOOT = 1000
SELECTION_FORMAT = "dptrain.sweep-selection/1"
# The guarantee of the selection, word for word (report and release/selection.json).
SELECTION_WORDING = (
    "the choice uses only the runs' DP outputs (their models' scores on validation records, which are not "
    "training records: all runs share one split), so publishing the chosen run's model costs at most the "
    "composition of all private runs on these training records (valid for any selection rule that uses only "
    "the models and non-training records); RepeatAndSelect (Papernot & Steinke 2022) can be smaller but is valid only "
    "if the number of runs was random as it assumes (a fixed grid run to completion does not satisfy it)")
SELECTION_RULE = ("per backend, the private configuration (target epsilon) with the highest mean validation AUROC "
                  "over its seeds; within it, the seed with the highest validation AUROC. Test records take no part")
NOT_COVERED = ("the validation records (the choice depends on them) and the test records are not training records "
               "and are not protected by DP: their metrics, counts and predictions stay in the sweep's private/ "
               "folder and the runs' private/ folders")


class ReportError(ValueError):
    """The report cannot be built; the message says what is missing and how to fix it."""


@dataclass
class RunData:
    name: str
    dir: Path  # the run directory's root (see ``rd`` for its files)
    backend: str
    epsilon: float
    seed: int
    record: dict[str, Any]
    preds: pd.DataFrame
    sensitive: list[str]
    statement: PrivacyStatement | None = None  # the record's privacy statement, typed
    classes: list[str] = field(default_factory=list)  # record data.classes; more than two: multi-class
    # filled by analyse()
    utility: dict[str, float] = field(default_factory=dict)
    utility_boot: dict[str, np.ndarray] = field(default_factory=dict)
    per_class: dict[str, float] = field(default_factory=dict)  # multi-class: one-vs-rest AUROC per class
    per_class_boot: dict[str, np.ndarray] = field(default_factory=dict)
    group_tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    group_boot: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    gaps: dict[str, dict[str, float]] = field(default_factory=dict)
    gaps_boot: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    worst_group: tuple[str, float] = ("", math.nan)

    @property
    def rd(self) -> RunDir:
        return RunDir(self.dir)

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def validation_auroc(self) -> float:
        """The run's AUROC on the validation records (its record's metrics); nan when it has none."""
        try:
            return float(self.record["metrics"]["validation"]["auroc"])
        except (KeyError, TypeError, ValueError):
            return math.nan

    @property
    def config(self) -> tuple[str, float]:
        return (self.backend, self.epsilon)


_RERUN = "rerun (or resume) that run, or remove its directory from runs/"
_SPEC_TYPES = {"points": lambda v: isinstance(v, list) and all(isinstance(p, str) and p and "/" not in p for p in v),
               "epsilons": lambda v: isinstance(v, list) and all(isinstance(e, str) for e in v),
               "seeds": lambda v: isinstance(v, list) and all(type(x) is int for x in v),
               "threshold": lambda v: type(v) in (int, float)}


def _read_spec(root: Path) -> dict[str, Any]:
    path = root / "sweep.json"  # optional: a JSON object whose fields the report uses have the right types
    spec = read_json(path, ReportError, "sweep spec") if path.exists() else {}
    bad = [k for k, ok in _SPEC_TYPES.items() if isinstance(spec, dict) and k in spec and not ok(spec[k])]
    if not isinstance(spec, dict) or bad:
        what = f"'{bad[0]}' has the wrong type" if bad else f"a JSON {type(spec).__name__}, not an object"
        raise ReportError(f"sweep spec: {path}: {what} (not written by `dptrain sweep`, or edited); restore it, or "
                          "delete it to report every run under runs/")
    return spec


def _read_run_files(rd: RunDir) -> tuple[dict[str, Any], RunRecord, int, pd.DataFrame]:
    """(record as written, typed record, seed, test predictions) of a finished run; one ReportError naming the file
    for a missing, truncated or foreign record.json, config.yaml or predictions.parquet."""
    record = read_json(rd.record, ReportError, "run record")
    try:
        typed = RunRecord.from_dict(record, str(rd.record))
    except RecordError as err:
        raise ReportError(str(err)) from None
    if not isinstance((record.get("training") or {}).get("backend"), str) or "source" not in typed.data:
        raise ReportError(f"{rd.record}: not the record of a `dptrain train` run (no training.backend or data.source)"
                          f"; {_RERUN}")
    try:
        cfg = yaml.safe_load(rd.config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ReportError(f"{rd.config}: missing or not valid YAML ({type(err).__name__}); {_RERUN}") from None
    if not isinstance(cfg, dict) or type(cfg.get("seed")) is not int:
        raise ReportError(f"{rd.config}: not a dptrain recipe with an integer 'seed'; {_RERUN}")
    path = rd.private / "predictions.parquet"
    try:
        preds = pd.read_parquet(path)
    except Exception as err:  # missing, truncated or foreign: one line, the reader's message is not quoted
        raise ReportError(f"{path}: missing or not a readable Parquet file ({type(err).__name__}); {_RERUN}") from None
    problem = mc.check_predictions(preds, mc.run_classes(record))  # binary: y_true 0/1 and score; else prob_<class>
    if problem:
        raise ReportError(f"{path}: {problem} (not written by dptrain, or edited); {_RERUN}")
    return record, typed, int(cfg["seed"]), preds


def load_runs(sweep_dir: str | Path) -> tuple[dict[str, Any], list[RunData], list[dict[str, str]]]:
    """(sweep spec, finished runs, [{name, status, error}] for points without a record). A missing, truncated or
    foreign file of a finished run raises ReportError (one line naming the file) before anything is written."""
    root = Path(sweep_dir)
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise ReportError(f"{root}: no runs/ directory; run `dptrain sweep RECIPE --out {root}` first")
    spec = _read_spec(root)
    names = spec.get("points") or sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
    runs, missing = [], []
    for name in names:
        rd = RunDir(runs_dir / name)
        if not rd.record.exists():
            if (rd.root / "record.json").exists():
                raise ReportError(f"{rd.root}: a run directory of an earlier dptrain (record.json at its top, no "
                                  "release/ and private/ folders, no validation split); rerun the sweep with this "
                                  "dptrain into a new --out")
            fail = root / "failures" / f"{name}.txt"
            missing.append({"name": name, "status": "failed" if fail.exists() else "not run",
                            "error": fail.read_text(errors="replace").split("\n", 1)[0] if fail.is_file() else ""})
            continue
        record, typed, seed, preds = _read_run_files(rd)
        st, classes = typed.privacy, mc.run_classes(record)
        runs.append(RunData(name=name, dir=rd.root, backend=record["training"]["backend"], seed=seed, record=record,
                            epsilon=st.epsilon if st.target_epsilon is None else st.target_epsilon, preds=preds,
                            sensitive=mc.sensitive_columns(preds, classes), statement=st, classes=classes))
    if not runs:
        raise ReportError(f"{root}: no finished run (no runs/*/private/record.json); run or resume the sweep first")
    return spec, runs, missing


def _split_of(r: RunData) -> dict[str, Any]:
    split = ((r.record.get("data") or {}).get("preprocessing") or {}).get("split")
    if not isinstance(split, dict):
        raise ReportError(f"{r.dir}: the record has no data.preprocessing.split (a run of an earlier dptrain?), so "
                          "its data split cannot be checked; rerun the sweep with this dptrain into a new --out")
    return split


def check_one_split(runs: list[RunData]) -> dict[str, Any]:
    """Refuse runs that do not share one train/validation/test split: every record's
    ``data.preprocessing.split`` must agree, and every run's test labels and sensitive attributes must be
    the same records in the same order. Returns the shared split."""
    ref = runs[0]
    split = _split_of(ref)
    fix = ("a report compares runs on one shared split only (one run's test or validation records must never be "
           "another's training records): report one sweep at a time, or rerun the sweep into a new --out")
    for r in runs[1:]:
        other = _split_of(r)
        if other != split:
            diff = "; ".join(f"{k} {split.get(k)!r} vs {other.get(k)!r}" for k in sorted(set(split) | set(other))
                             if split.get(k) != other.get(k))
            raise ReportError(f"runs {ref.name} and {r.name} were trained on different data splits ({diff}); {fix}")
    sens = ref.sensitive
    for r in runs[1:]:
        if not (len(r.preds) == len(ref.preds) and r.preds["y_true"].equals(ref.preds["y_true"])
                and r.preds[sens].equals(ref.preds[sens])):
            raise ReportError(f"runs {ref.name} and {r.name} have different test records (their predictions' y_true "
                              f"or sensitive attributes differ), so they do not share one split; {fix}")
    return split


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
    selection: dict[str, Any]       # backend -> the selection and its privacy cost (holds private numbers too)
    split: dict[str, Any]           # the one split every run shares (record data.preprocessing.split)
    composition_all: dict[str, Any] | None = None  # every private run of every backend (None: one backend)
    classes: list[str] = field(default_factory=list)  # more than two: multi-class (groupings are one-vs-rest views)

    @property
    def multiclass(self) -> bool:
        return mc.is_multiclass(self.classes)

    def is_selected(self, r: RunData) -> bool:
        s = self.selection.get(r.backend)
        return s is not None and s["selected_run"] == r.name

    def summary_frame(self) -> pd.DataFrame:
        rows = []
        for r in sorted(self.runs, key=lambda r: (r.backend, r.epsilon, r.seed)):
            p = r.statement
            row = {"run": r.name, "epsilon": eps_label(r.epsilon), "seed": r.seed, "backend": r.backend,
                   "status": "finished", "epsilon_spent": p.epsilon, "delta": p.delta,
                   "accountant": p.accountant, "noise_multiplier": p.noise_multiplier, "steps": p.steps,
                   "privacy_unit": p.privacy_unit}
            for m in UTILITY:
                row[m] = r.utility[m]
                lo, hi = fm.percentile_ci(r.utility_boot[m], self.level)
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = lo, hi
            row.update({f"auroc_one_vs_rest[{k}]": v for k, v in r.per_class.items()})  # multi-class only
            row["worst_group_auroc"], row["worst_group"] = r.worst_group[1], r.worst_group[0]
            for g in self.groupings:
                for k in fm.GAPS:
                    row[f"{k}[{g}]"] = r.gaps[g][k]
            a = r.record.get("audit") or {}
            row["validation_auroc"] = r.validation_auroc
            row["selected"] = self.is_selected(r)
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


MAX_BOOT = 20_000  # the bootstrap draws a (replicates x test records) matrix: memory grows with it


def check_report_options(threshold: float | None, n_boot: int, min_group_size: int) -> None:
    """The report's options (``threshold`` None: the sweep's), checked before any work: ``dptrain sweep`` calls
    this before the grid trains."""
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold < 1):
        raise ReportError(f"--threshold: got {threshold}; give the fixed decision threshold in (0, 1)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or not 100 <= n_boot <= MAX_BOOT:
        raise ReportError(f"--bootstrap: got {n_boot!r}; give 100 to {MAX_BOOT} replicates (default {DEFAULT_BOOT}; "
                          "the bootstrap holds a replicates x test records matrix)")
    if isinstance(min_group_size, bool) or not isinstance(min_group_size, int) or min_group_size < 1:
        raise ReportError(f"--min-group-size: got {min_group_size!r}; give an integer >= 1")


def analyse(sweep_dir: str | Path, *, threshold: float | None = None, n_boot: int = DEFAULT_BOOT,
            level: float = 0.95, min_group_size: int = fm.DEFAULT_MIN_GROUP_SIZE, boot_seed: int = 0) -> Analysis:
    spec, runs, missing = load_runs(sweep_dir)
    thr = float(spec.get("threshold", 0.5) if threshold is None else threshold)
    check_report_options(thr, n_boot, min_group_size)
    sens = runs[0].sensitive
    if any(r.sensitive != sens for r in runs):
        raise ReportError("runs disagree on the sensitive attributes; report one recipe's sweep at a time")
    classes = runs[0].classes
    if any(r.classes != classes for r in runs):
        raise ReportError("runs disagree on the classes (record data.classes); report one recipe's sweep at a time")
    split = check_one_split(runs)

    # ---- one test set shared by every run: one bootstrap matrix, paired across all runs ----
    ref = runs[0].preds
    w = fm.bootstrap_weights(len(ref), n_boot, seed=boot_seed)

    # without sensitive attributes (e.g. Br35H) the report has utility, privacy and audit, no fairness sections;
    # a multi-class sweep has one one-vs-rest view per class and grouping (binary: one view per grouping)
    groupings = fm.groupings(ref[sens]) if sens else []
    names = [v.name for v in mc.views(ref, classes, groupings, len(sens))]
    single = [v.name for v in mc.views(ref, classes, groupings, len(sens)) if v.single]
    for r in runs:
        r.utility, r.utility_boot, r.per_class, r.per_class_boot = mc.utility(r.preds, classes, w, thr)
        worst = ("", math.inf)
        for v in mc.views(r.preds, classes, groupings, len(sens)):
            y, s, g = v.y, v.s, v.grouping
            table = fm.group_table(y, s, g, threshold=thr, min_group_size=min_group_size)
            r.group_tables[v.name] = table
            r.group_boot[v.name] = fm.group_metrics_boot(y, s, g, w, threshold=thr)
            r.gaps[v.name] = fm.gaps(y, s, g, threshold=thr, min_group_size=min_group_size, table=table)
            eligible = table.loc[~table["small"], "group"].tolist()
            r.gaps_boot[v.name] = fm.gaps_boot(y, s, g, w, threshold=thr, eligible=eligible)
            if v.single:
                for _, row in table[~table["small"]].iterrows():
                    if np.isfinite(row["auroc"]) and row["auroc"] < worst[1]:
                        worst = (v.label(row["group"]), float(row["auroc"]))
        r.worst_group = worst if math.isfinite(worst[1]) else ("", math.nan)

    configs = _configs(runs, names, level)
    groups = _group_rows(runs, names, level)
    selection, composition_all = _selection(runs, configs)
    return Analysis(spec=spec, runs=runs, missing=missing, threshold=thr, n_boot=n_boot, level=level,
                    min_group_size=min_group_size, groupings=names, single=single, configs=configs,
                    groups=groups, pearson=_pearson(runs, names), selection=selection, split=split,
                    composition_all=composition_all, classes=classes)


def _configs(runs: list[RunData], names: list[str], level: float) -> list[dict[str, Any]]:
    keys = sorted({r.config for r in runs})
    out = []
    for b, e in keys:
        rs = sorted((r for r in runs if r.config == (b, e)), key=lambda r: r.seed)
        ref = {r.seed: r for r in runs if r.backend == b and not r.private}
        c: dict[str, Any] = {"backend": b, "epsilon": e, "seeds": [r.seed for r in rs], "runs": [r.name for r in rs]}
        c["utility"] = {m: _agg([r.utility[m] for r in rs], [r.utility_boot[m] for r in rs], level) for m in UTILITY}
        c["per_class_auroc"] = {k: _agg([r.per_class[k] for r in rs], [r.per_class_boot[k] for r in rs], level)
                                for k in rs[0].per_class}  # multi-class only
        c["validation_auroc"] = _agg([r.validation_auroc for r in rs], [], level)  # the selection's criterion
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


def _selection(runs: list[RunData], configs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(backend -> the configuration chosen on validation AUROC and the privacy cost of the choice,
    the composition of the private runs of every backend or None with one backend)."""
    out: dict[str, Any] = {}
    all_ledgers: list[acc.PrivacyLedger] = []
    all_deltas: list[float] = []
    for b in sorted({r.backend for r in runs}):
        priv = [r for r in runs if r.backend == b and r.private]
        if not priv:
            continue
        lacking = [r.name for r in priv if not math.isfinite(r.validation_auroc)]
        if lacking:
            raise ReportError(
                f"selection refused: run(s) {', '.join(lacking)} have no validation AUROC (private/record.json "
                "metrics.validation missing or not a number: trained without data.validation_fraction, e.g. by an "
                "earlier dptrain); the configuration is chosen on validation records only, never on test records: "
                "rerun the sweep with this dptrain into a new --out (it sets data.validation_fraction=0.2)")
        cands = [c for c in configs if c["backend"] == b and math.isfinite(c["epsilon"])]
        best = max(cands, key=lambda c: c["validation_auroc"]["mean"])
        best_run = max((r for r in priv if r.config == (b, best["epsilon"])), key=lambda r: r.validation_auroc)
        delta = max(r.statement.delta for r in priv)
        ledgers = [acc.PrivacyLedger.load(r.rd.ledger) for r in priv]
        all_ledgers += ledgers
        all_deltas.append(delta)
        entry: dict[str, Any] = {"selected_epsilon": best["epsilon"], "selected_run": best_run.name,
                                 "selected_run_epsilon": best_run.statement.epsilon,
                                 "private_runs": [r.name for r in priv], "n_private_runs": len(priv),
                                 "delta": delta}
        entry.update(composition(ledgers, delta))
        entry.update(repeat_and_select(ledgers, delta))
        rs, comp = entry["repeat_and_select_epsilon"], entry["composition_epsilon"]
        if math.isfinite(rs) and math.isfinite(comp) and rs >= comp:
            entry["repeat_and_select_note"] = (
                "for these runs RepeatAndSelect is not smaller than the composition (with few runs its overhead "
                "dominates): the composition is the number to use")
        out[b] = entry
    composition_all = None
    if len(out) > 1:
        delta = max(all_deltas)
        composition_all = {"private_runs": [n for e in out.values() for n in e["private_runs"]], "delta": delta,
                           **composition(all_ledgers, delta)}
    return out, composition_all


def selection_statement(an: Analysis) -> dict[str, Any]:
    """The public statement of the selection (``release/selection.json``): which configuration was chosen
    per backend, the composed epsilon of all private runs and the RepeatAndSelect bound with its assumption,
    the delta and the wording of the guarantee. No metric values and no counts of records: everything here
    is the public grid, the public split declaration and privacy parameters."""
    backends = {}
    for b, s in an.selection.items():
        rs = {"epsilon": s["repeat_and_select_epsilon"] if math.isfinite(s["repeat_and_select_epsilon"]) else None,
              "accountant": "rdp", "mean_number_of_runs": s["repeat_and_select_mean"],
              "assumption": s["repeat_and_select_assumption"]}
        if "repeat_and_select_note" in s:
            rs["note"] = s["repeat_and_select_note"]
        comp = {"epsilon": s["composition_epsilon"] if math.isfinite(s["composition_epsilon"]) else None,
                "accountant": s["composition_accountant"], "runs": s["private_runs"],
                "meaning": "what publishing any or all of these private runs' models costs, whatever the selection "
                           "rule that used only the models and non-training records",
                "method": "composition of the runs' ledgers (release/ledger.json), PLD on a coarse grid: an upper "
                          "bound"}
        if "composition_note" in s:
            comp["note"] = s["composition_note"]
        backends[b] = {
            "selected": {"backend": b, "target_epsilon": s["selected_epsilon"], "run": s["selected_run"],
                         "run_epsilon": s["selected_run_epsilon"]},
            "delta": s["delta"],
            "composition": comp,
            "repeat_and_select": rs,
        }
    out: dict[str, Any] = {
        "format": SELECTION_FORMAT,
        "rule": SELECTION_RULE,
        "statement": SELECTION_WORDING,
        "split": {k: an.split.get(k) for k in ("method", "seed", "test_fraction", "validation_fraction")},
        "backends": backends,
        "not_covered": NOT_COVERED,
        "non_private_runs": {"runs": sorted(r.name for r in an.runs if not r.private),
                             "warning": "NOT PRIVATE: no guarantee; never release their models or predictions"},
        "private_report": "private/report.html (test numbers of the selected configurations: never publish)",
    }
    if an.composition_all is not None:
        c = an.composition_all
        out["composition_all_backends"] = {
            "epsilon": c["composition_epsilon"] if math.isfinite(c["composition_epsilon"]) else None,
            "accountant": c["composition_accountant"], "delta": c["delta"], "runs": c["private_runs"],
            "meaning": "publishing the selected models of several backends, or any models of this sweep"}
    return jsonable(out)


__all__ = ["Analysis", "MAX_BOOT", "ReportError", "RunData", "SELECTION_WORDING", "UTILITY", "analyse", "check_one_split",
           "check_report_options", "dominating_event", "load_runs", "selection_statement"]
