"""Render an :class:`~dptrain.report.analysis.Analysis` into a sweep directory, across its release boundary:

    DIR/private/report.html, report.md, summary.csv, plots/   computed from real test records and sensitive
                                                              attributes: never publish
    DIR/release/selection.json                                the public statement of the selection (no metric
                                                              values, no counts; see analysis.selection_statement)

``report.html`` is self-contained: CSS inline, plots embedded as base64 PNG, no script, no network.
``report.md`` holds the same tables and links the PNG files in ``plots/``. Both open with the answer: the summary's
sentences (:mod:`dptrain.report.summary`) and the headline plot (:mod:`dptrain.report.plots`), then the details.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from accounting.atomic import atomic_write_bytes, atomic_write_json
from dptrain.evaluate import fairness as fm
from dptrain.lifecycle import PRIVATE, RELEASE
from dptrain.report import multiclass as mc
from dptrain.report.analysis import NOT_COVERED, SELECTION_WORDING, UTILITY, Analysis, selection_statement
from dptrain.report.fmt import GAP_TITLES
from dptrain.report.fmt import ci as _ci
from dptrain.report.fmt import num as _f
from dptrain.report.fmt import sd as _sd
from dptrain.report.plots import HEADLINE, PLOT_TITLES, make_plots
from dptrain.report.summary import findings
from dptrain.report.sweep import eps_label

# ---------------------------------------------------------------- tables (list of header, rows)

def _tables(an: Analysis) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """[(id, title, header, rows)] in report order."""
    out = []
    hdr = (["backend", "epsilon", "seeds"] + [f"{mc.TITLES[m] if an.multiclass else m} [95% CI] (sd over seeds)"
                                              for m in UTILITY]
           + ["worst-group AUROC", "validation AUROC (selection only)", "selected"])
    selected = {(b, s["selected_epsilon"]) for b, s in an.selection.items()}
    rows = [[c["backend"], eps_label(c["epsilon"]), str(len(c["seeds"]))]
            + [f"{_ci(c['utility'][m])} {_sd(c['utility'][m])}" for m in UTILITY]
            + [f"{_f(c['worst_group_auroc']['mean'])} {_sd(c['worst_group_auroc'])}",
               f"{_f(c['validation_auroc']['mean'])} {_sd(c['validation_auroc'])}",
               "SELECTED" if (c["backend"], c["epsilon"]) in selected else ""] for c in an.configs]
    out.append(("utility", "Utility vs epsilon (test records)", hdr, rows))
    if an.multiclass:
        out.append(mc.per_class_table(an.configs, an.classes, _ci, _sd, eps_label))

    for g in an.groupings:
        hdr = ["backend", "epsilon"] + [GAP_TITLES[k] for k in fm.GAPS]
        rows = [[c["backend"], eps_label(c["epsilon"])] + [_ci(c["gaps"][g][k]) for k in fm.GAPS] for c in an.configs]
        out.append((f"gaps-{g}", f"Fairness gaps by {g}", hdr, rows))

    hdr = ["backend", "epsilon", "grouping", "pairs", "Δ AUROC"] + [f"Δ {GAP_TITLES[k]}" for k in fm.GAPS]
    rows = []
    for c in an.configs:
        ch = c["change_vs_nonprivate"]
        if ch is None:
            continue
        for g in an.groupings:
            rows.append([c["backend"], eps_label(c["epsilon"]), g, str(ch["n_pairs"]), _ci(ch["utility"]["auroc"])]
                        + [_ci(ch["gaps"][g][k]) for k in fm.GAPS])
    out.append(("change", "Change vs non-private (paired bootstrap, same test examples and seed)", hdr, rows))

    hdr = ["backend", "grouping", "gap", "Pearson r", "p-value", "runs", "epsilons"]
    rows = [[r.backend, r.grouping, GAP_TITLES[r.gap], _f(r.r), _f(r.p_value, 4), str(r.n_runs), str(r.n_epsilons)]
            for r in an.pearson.itertuples()]
    out.append(("pearson", "Correlation between epsilon and each gap (finite-epsilon runs)", hdr, rows))

    gm = [m for m in fm.METRICS if m != "n"]
    for g in an.groupings:
        sub = an.groups[an.groups["grouping"] == g]
        hdr = ["backend", "epsilon", "group", "n (test)", "small"] + [f"{m} [95% CI]" for m in gm]
        rows = [[r["backend"], eps_label(r["epsilon"]), str(r["group"]), _f(r["n"], 0), "SMALL" if r["small"] else ""]
                + [f"{_f(r[m])} [{_f(r[m + '_ci_low'])}, {_f(r[m + '_ci_high'])}]" for m in gm]
                for _, r in sub.iterrows()]
        out.append((f"groups-{g}", f"Per group: {g}", hdr, rows))

    hdr = ["run", "backend", "epsilon claimed", "audit", "empirical lower bound", "max certifiable", "canary AUC",
           "canary TPR@1%FPR", "loss-attack AUC (train vs held-out)"]
    rows = []
    for r in sorted(an.runs, key=lambda r: (r.backend, r.epsilon, r.seed)):
        a = r.record.get("audit") or {}
        full = _audit_file(r)
        rows.append([r.name, r.backend, _f(r.statement.epsilon, 4), a.get("status", "not audited"),
                     _f(a.get("epsilon_lower_bound")), _f(a.get("max_certifiable_epsilon")), _f(a.get("canary_auc")),
                     _f((full.get("canaries") or {}).get("tpr_at_1%_fpr")), _f(a.get("loss_attack_auc"))])
    out.append(("audit", "Empirical privacy audit (one-run canary bound, Steinke-Nasr-Jagielski 2023)", hdr, rows))

    hdr = ["run", "backend", "epsilon (target)", "seed", "epsilon spent", "delta", "accountant", "unit", "relation",
           "sampling", "q", "sigma", "steps", "C", "clipping", "selection accounted"]
    rows = []
    for r in sorted(an.runs, key=lambda r: (r.backend, r.epsilon, r.seed)):
        p = r.statement
        rows.append([r.name, r.backend, eps_label(r.epsilon), str(r.seed), _f(p.epsilon, 4), f"{p.delta:g}",
                     f"{p.accountant} ({p.accountant_version})", p.privacy_unit, p.neighbouring_relation,
                     p.sampling, _f(p.sampling_rate, 4), _f(p.noise_multiplier, 4), str(p.steps),
                     _f(p.clipping_norm, 3), p.clipping_granularity or "none", "no (see selection cost)"])
    out.append(("privacy", "Privacy statement of every run", hdr, rows))
    return out


def _audit_file(r) -> dict[str, Any]:
    p = r.rd.private / "audit.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _audit_lines(an: Analysis) -> list[str]:
    bad = [r for r in an.runs if (r.record.get("audit") or {}).get("status") == "VIOLATION"]
    lines = [f"PRIVACY VIOLATION in {r.name}: {r.record['audit']['message']}" for r in bad]
    audited = [r for r in an.runs if (r.record.get("audit") or {}).get("epsilon_lower_bound") is not None]
    if not audited:
        lines.append("No run has canaries (privacy.audit.canaries): only the loss-threshold attack is reported; "
                     "add canaries to certify an empirical lower bound.")
    else:
        lines.append(f"{len(audited)} of {len(an.runs)} runs carry canaries; no empirical lower bound exceeds its "
                     "claimed epsilon." if not bad else f"{len(bad)} run(s) FAIL the audit: see above.")
    return lines


def _selection_lines(an: Analysis) -> list[str]:
    lines = []
    for b, s in an.selection.items():
        c = next(c for c in an.configs if c["backend"] == b and c["epsilon"] == s["selected_epsilon"])
        u = c["utility"]
        lines.append(
            f"[{b}] Selected configuration by mean validation AUROC over its {len(c['seeds'])} seed(s): epsilon = "
            f"{eps_label(s['selected_epsilon'])} (validation AUROC {_f(c['validation_auroc']['mean'])}); chosen run "
            f"{s['selected_run']} (its own epsilon {_f(s['selected_run_epsilon'], 4)}). Its test numbers, which took "
            f"no part in the choice: AUROC {_ci(u['auroc'])}, accuracy {_ci(u['accuracy'])}, worst-group AUROC "
            f"{_f(c['worst_group_auroc']['mean'])}. Choosing it from the {s['n_private_runs']} private runs tried is "
            "not free:")
        comp = s.get("composition_epsilon", math.nan)
        lines.append(
            f"  - all {s['n_private_runs']} private runs composed: epsilon = {_f(comp, 4)} at delta = {s['delta']:g} "
            f"({s.get('composition_accountant', 'n/a')}, an upper bound on a coarse grid): what publishing any or "
            "all of these runs' models costs; valid for any selection rule that uses only the models and "
            "non-training records, and for a fixed grid."
            + (f" {s['composition_note']}" if "composition_note" in s else ""))
        rs = s.get("repeat_and_select_epsilon", math.nan)
        if math.isfinite(rs):
            lines.append(
                f"  - RepeatAndSelect (Papernot & Steinke 2022, RDP): epsilon = {_f(rs, 4)} at delta = {s['delta']:g}, "
                f"valid only if {s['repeat_and_select_assumption']}."
                + (f" Note: {s['repeat_and_select_note']}." if "repeat_and_select_note" in s else ""))
        else:
            lines.append(f"  - RepeatAndSelect: {s.get('repeat_and_select_note', 'not computed')}.")
    if an.composition_all is not None:
        c = an.composition_all
        lines.append(f"All {len(c['private_runs'])} private runs of every backend composed: epsilon = "
                     f"{_f(c['composition_epsilon'], 4)} at delta = {c['delta']:g}: what publishing the selected "
                     "models of several backends, or any models of this sweep, costs.")
    lines.append(f"Selection: {SELECTION_WORDING}.")
    lines.append(f"Split: every run shares one train/validation/test split (split seed {an.split.get('seed')}, "
                 f"test_fraction {an.split.get('test_fraction')}, validation_fraction "
                 f"{an.split.get('validation_fraction')}); the choice used validation records only, so the selected "
                 "configuration's test numbers are not biased by the choice.")
    lines.append(f"Not covered: {NOT_COVERED}. This report is private (it is computed from real test records and "
                 f"their sensitive attributes); the public statement of the selection is {RELEASE}/selection.json.")
    nonpriv = [r for r in an.runs if not r.private]
    if nonpriv:
        lines.append(f"The {len(nonpriv)} non-private reference run(s) (epsilon = inf) carry no privacy guarantee and "
                     "take no part in the selection: never release their models or predictions.")
    return lines


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f0f0f0}img{max-width:100%;border:1px solid #eee}
.warn{color:#a00;font-weight:bold}.note{color:#555;font-size:13px}details{margin:0.5em 0}code{background:#f5f5f5}"""


def _intro(an: Analysis) -> list[str]:
    spec = an.spec
    n_runs = len(an.runs) + len(an.missing)
    lines = [
        f"Recipe: {an.runs[0].record.get('recipe', '?')}; data: {an.runs[0].record['data']['source']}; "
        + (f"sensitive attributes: {', '.join(an.runs[0].sensitive)}." if an.runs[0].sensitive else
           "no sensitive attributes in the data (set data.sensitive): fairness sections are omitted."),
        f"Grid: epsilons {', '.join(spec.get('epsilons', sorted({eps_label(r.epsilon) for r in an.runs})))}; "
        f"seeds {', '.join(str(s) for s in spec.get('seeds', sorted({r.seed for r in an.runs})))}; "
        f"backends {', '.join(sorted({r.backend for r in an.runs}))}; {len(an.runs)} of {n_runs} runs finished.",
        f"One train/validation/test split shared by every run (split seed {an.split.get('seed')}, apart from the "
        f"training seed; test_fraction {an.split.get('test_fraction')}, validation_fraction "
        f"{an.split.get('validation_fraction')}): the configuration is selected on validation records, every table "
        "and plot below is on test records.",
        f"Decision threshold {an.threshold:g}, fixed before evaluation (never tuned on the test set). "
        f"CIs: {int(an.level * 100)}% percentile bootstrap over test examples, {an.n_boot} replicates, paired "
        "across all runs (one test set). 'sd' is the spread over seeds (training randomness).",
        "PRIVATE: this report is computed from real test records and their sensitive attributes; never publish it. "
        f"The public statement of the selection is {RELEASE}/selection.json.",
        f"Groups with fewer than {an.min_group_size} test examples or fewer than 5 of either class are flagged SMALL: "
        "shown in the per-group tables, left out of the gaps. worst-group AUROC = lowest AUROC over the groups "
        "of every single attribute.",
        "Gaps are maxima/minima over groups: their bootstrap distribution is biased (the extremes of noisy group "
        "estimates), so a percentile interval can sit beside its point estimate; read the paired changes vs "
        "non-private for conclusions.",
    ]
    if an.multiclass:
        lines.insert(1, mc.intro_line(an.classes, an.threshold))
    if an.missing:
        lines.append("NOT IN THIS REPORT: " + "; ".join(f"{m['name']} ({m['status']}{': ' + m['error'] if m['error'] else ''})"
                                                      for m in an.missing))
    return lines


def render_html(an: Analysis, plots: dict[str, bytes]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<title>dptrain privacy-utility-fairness report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>Privacy-utility-fairness report</h1>", "<h2 id='summary'>Summary</h2><ul id='findings'>"]
    parts += [f"<li class='{'warn' if f.warn else ''}'>{e(f.text)}</li>" for f in findings(an)]
    parts.append("</ul>")
    if HEADLINE in plots:
        parts.append(_img(HEADLINE, plots[HEADLINE]))
    parts.append("<h2 id='details'>How to read the details</h2>")
    parts += [f"<p class='note'>{e(x)}</p>" for x in _intro(an)]
    parts.append("<h2>Empirical privacy audit</h2>")
    parts += [f"<p class='{'warn' if x.startswith('PRIVACY VIOLATION') else ''}'>{e(x)}</p>" for x in _audit_lines(an)]
    parts.append("<h2>Privacy and the cost of selection</h2>")
    parts += [f"<p>{e(x)}</p>" for x in _selection_lines(an)]
    tables = _tables(an)
    for tid, title, hdr, rows in tables:
        if tid.startswith("groups-") or tid == "privacy":
            continue
        parts.append(f"<h2 id='{e(tid)}'>{e(title)}</h2>" + _html_table(hdr, rows))
    parts.append("<h2>Plots</h2>")
    parts += [f"<h3>{e(PLOT_TITLES[name])}</h3>{_img(name, png)}" for name, png in plots.items() if name != HEADLINE]
    parts.append("<h2>Per group (every attribute and their intersection)</h2>")
    for tid, title, hdr, rows in tables:
        if tid.startswith("groups-"):
            parts.append(f"<details open><summary>{e(title)}</summary>{_html_table(hdr, rows)}</details>")
    tid, title, hdr, rows = next(t for t in tables if t[0] == "privacy")
    parts.append(f"<h2 id='privacy'>{e(title)}</h2>" + _html_table(hdr, rows))
    parts.append("</body></html>")
    return "\n".join(parts)


def _img(name: str, png: bytes) -> str:
    return f"<img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _html_table(hdr: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in hdr)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_markdown(an: Analysis, plot_files: dict[str, str]) -> str:
    def md_table(hdr, rows):
        esc = [[c.replace("|", "\\|") for c in r] for r in rows]
        return "\n".join(["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
                         + ["| " + " | ".join(r) + " |" for r in esc])

    parts = ["# Privacy-utility-fairness report", "", "## Summary", ""]
    parts += [f"- **{f.text}**" if f.warn else f"- {f.text}" for f in findings(an)]
    if HEADLINE in plot_files:
        parts += ["", f"![{PLOT_TITLES[HEADLINE]}]({plot_files[HEADLINE]})"]
    parts += ["", "## How to read the details", ""] + [f"- {x}" for x in _intro(an)]
    parts += ["", "## Empirical privacy audit", ""] + [f"**{x}**" if x.startswith("PRIVACY VIOLATION") else x
                                                         for x in _audit_lines(an)]
    parts += ["", "## Privacy and the cost of selection", ""] + [x for x in _selection_lines(an)]
    tables = _tables(an)
    for tid, title, hdr, rows in tables:
        if tid.startswith("groups-") or tid == "privacy":
            continue
        parts += ["", f"## {title}", "", md_table(hdr, rows)]
    parts += ["", "## Plots", ""] + [f"![{PLOT_TITLES[n]}]({p})" for n, p in plot_files.items() if n != HEADLINE]
    for tid, title, hdr, rows in tables:
        if tid.startswith("groups-") or tid == "privacy":
            parts += ["", f"## {title}", "", md_table(hdr, rows)]
    return "\n".join(parts) + "\n"


def write_report(an: Analysis, sweep_dir: str | Path) -> dict[str, Path]:
    """Write the report into the sweep directory: ``private/`` report.html, report.md, summary.csv and
    plots/*.png, and ``release/selection.json``; returns their paths (keys html, md, csv, selection)."""
    root = Path(sweep_dir)
    out = root / PRIVATE
    plots = make_plots(an)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    files = {}
    for name, png in plots.items():
        atomic_write_bytes(out / "plots" / f"{name}.png", png)
        files[name] = f"plots/{name}.png"
    paths = {"html": out / "report.html", "md": out / "report.md", "csv": out / "summary.csv",
             "selection": root / RELEASE / "selection.json"}
    atomic_write_bytes(paths["html"], render_html(an, plots).encode())
    atomic_write_bytes(paths["md"], render_markdown(an, files).encode())
    frame: pd.DataFrame = an.summary_frame()
    atomic_write_bytes(paths["csv"], frame.to_csv(index=False).encode())
    atomic_write_json(paths["selection"], selection_statement(an))
    return paths


__all__ = ["render_html", "render_markdown", "write_report"]
