"""The answer first: a few plain sentences generated from an :class:`~dptrain.report.analysis.Analysis`.

Each :class:`Finding` is one sentence and the numbers it quotes (``values``), taken as they are from the analysis
(no number is written here). The sentences speak about, per backend, the configuration selected on validation
records (the one that would be released) and the strongest privacy tried, each against the non-private runs of
the same seeds (paired bootstrap CIs); then each sensitive attribute's worst-group AUROC, the audit and what the
selection cost. Whatever is missing (no non-private run, one epsilon, no sensitive attribute, only non-private
runs, unfinished runs) is said instead of a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dptrain.report import multiclass as mc
from dptrain.report.analysis import Analysis
from dptrain.report.fmt import ci, num, signed_ci
from dptrain.report.sweep import eps_label


@dataclass(frozen=True)
class Finding:
    """One sentence of the summary: ``key`` says what it is about (``utility``, ``strongest``,
    ``worst_group:ATTRIBUTE``, ``audit``, ``selection``, ...), ``values`` the numbers it quotes."""

    key: str
    text: str
    backend: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    warn: bool = False


def attribute_views(an: Analysis) -> list[tuple[str, str]]:
    """(attribute, view) per sensitive attribute, in column order. Binary: the view is the attribute's grouping;
    multi-class: its one-vs-rest view with the lowest worst-group AUROC (mean over every configuration)."""
    attrs = list(an.runs[0].sensitive) if an.groupings else []
    if not an.multiclass:
        return [(a, a) for a in attrs if a in an.groupings]

    def level(v: str) -> float:
        vals = [c["gaps"][v]["worst_group_auroc"]["mean"] for c in an.configs]
        vals = [x for x in vals if math.isfinite(x)]
        return sum(vals) / len(vals) if vals else math.inf

    out = []
    for a in attrs:
        cands = [mc.view_name(a, k) for k in an.classes if mc.view_name(a, k) in an.groupings]
        if cands:
            out.append((a, min(cands, key=level)))
    return out


def _shown(an: Analysis, attr: str, view: str) -> str:
    return view.replace(f"{attr} | ", f"{attr} (", 1) + ")" if an.multiclass else attr


def worst_group(an: Analysis, backend: str, epsilon: float, view: str) -> str | None:
    """The group of ``view`` (not SMALL) with the lowest mean AUROC over the seeds of (backend, epsilon)."""
    g = an.groups
    if g.empty:
        return None
    sub = g[(g["backend"] == backend) & (g["epsilon"] == epsilon) & (g["grouping"] == view) & ~g["small"]]
    sub = sub[sub["auroc"].notna()]
    return None if sub.empty else str(sub.loc[sub["auroc"].idxmin(), "group"])


def _config(an: Analysis, backend: str, epsilon: float) -> dict[str, Any] | None:
    return next((c for c in an.configs if c["backend"] == backend and c["epsilon"] == epsilon), None)


def _agg_values(prefix: str, a: dict[str, Any]) -> dict[str, Any]:
    return {prefix: a["mean"], f"{prefix}_ci": tuple(a["ci"])}


def _utility(an: Analysis, b: str, tag: str, eps: float, strongest: bool) -> Finding:
    c = _config(an, b, eps)
    assert c is not None
    metric = mc.TITLES["auroc"] if an.multiclass else "AUROC"
    u, ch = c["utility"]["auroc"], c["change_vs_nonprivate"]
    where = (f"At the strongest privacy tried, epsilon {eps_label(eps)}," if strongest else
             f"At epsilon {eps_label(eps)} (the configuration selected on validation records),")
    values = {"epsilon": eps, **_agg_values("auroc", u)}
    if ch is None:
        text = (f"{tag}{where} test {metric} is {ci(u)}; there is no non-private run of this backend to compare with "
                "(add inf to --epsilons).")
    else:
        values.update(_agg_values("change", ch["utility"]["auroc"]))
        ref = _config(an, b, math.inf)
        text = (f"{tag}{where} test {metric} is {ci(u)}: a change of {signed_ci(ch['utility']['auroc'])} vs "
                f"non-private ({ci(ref['utility']['auroc'])}; paired over {ch['n_pairs']} seed(s)).")
    return Finding("strongest" if strongest else "utility", text, b, values)


def _fairness(an: Analysis, b: str, tag: str, eps: float) -> list[Finding]:
    c = _config(an, b, eps)
    out = []
    for attr, view in attribute_views(an):
        w = c["gaps"][view]["worst_group_auroc"]
        shown = _shown(an, attr, view)
        at = "non-private" if not math.isfinite(eps) else f"at epsilon {eps_label(eps)}"
        if not math.isfinite(w["mean"]):
            out.append(Finding(f"worst_group:{attr}", f"{tag}By {shown}, every group is SMALL {at} (fewer than "
                               f"{an.min_group_size} test examples or 5 of a class): no worst-group AUROC.", b))
            continue
        grp = worst_group(an, b, eps, view)
        values = {"epsilon": eps, "group": grp, **_agg_values("worst_group_auroc", w)}
        text = f"{tag}By {shown}, the worst-off group {at} is {grp}: worst-group AUROC {ci(w)}"
        ch = c["change_vs_nonprivate"]
        if ch is not None:
            cw, cu = ch["gaps"][view]["worst_group_auroc"], ch["utility"]["auroc"]
            values.update(_agg_values("change", cw))
            text += f", a change of {signed_ci(cw)} vs non-private (overall: {signed_ci(cu)})"
        out.append(Finding(f"worst_group:{attr}", text + ".", b, values))
    return out


def _audit(an: Analysis) -> Finding:
    audits = {r.name: (r.record.get("audit") or {}) for r in an.runs}
    bad = sorted(n for n, a in audits.items() if a.get("status") == "VIOLATION")
    if bad:
        return Finding("audit", f"PRIVACY VIOLATION: the empirical lower bound exceeds the claimed epsilon in "
                       f"{', '.join(bad)}: the implementation leaks more than it claims; release nothing.",
                       values={"violations": bad}, warn=True)
    bounds = {n: a["epsilon_lower_bound"] for n, a in audits.items() if a.get("epsilon_lower_bound") is not None}
    if not bounds:
        return Finding("audit", "No run carries canaries (privacy.audit.canaries): no empirical lower bound; only the "
                       "loss-threshold attack is reported.", values={"violations": []})
    top = max(bounds, key=bounds.get)
    return Finding("audit", f"No audit violation: in the {len(bounds)} of {len(an.runs)} runs with canaries, no "
                   f"empirical lower bound exceeds its claimed epsilon (the largest, {num(bounds[top], 2)}, in {top}; a "
                   "small bound is not evidence of privacy).",
                   values={"violations": [], "largest_lower_bound": bounds[top], "run": top})


def _selection(an: Analysis, b: str, tag: str) -> Finding:
    s = an.selection[b]
    comp = s.get("composition_epsilon", math.nan)
    return Finding("selection", f"{tag}Choosing the best configuration cost epsilon {num(comp, 2)} at delta "
                   f"{s['delta']:g} (the {s['n_private_runs']} private runs tried, composed), against "
                   f"{num(s['selected_run_epsilon'], 2)} claimed by the chosen run ({s['selected_run']}) alone.", b,
                   {"composition_epsilon": comp, "selected_run_epsilon": s["selected_run_epsilon"],
                    "n_private_runs": s["n_private_runs"]})


def findings(an: Analysis) -> list[Finding]:
    """The summary's sentences in order: per backend utility and fairness, then the audit and the selection cost."""
    backends = sorted({c["backend"] for c in an.configs})
    out: list[Finding] = []
    for b in backends:
        tag = f"[{b}] " if len(backends) > 1 else ""
        private = sorted(c["epsilon"] for c in an.configs if c["backend"] == b and math.isfinite(c["epsilon"]))
        if not private:
            ref = _config(an, b, math.inf)
            out.append(Finding("nonprivate_only", f"{tag}Only non-private runs (epsilon = inf): test AUROC "
                               f"{ci(ref['utility']['auroc'])}; no privacy-utility trade-off to report, and nothing "
                               "here may be released.", b, _agg_values("auroc", ref["utility"]["auroc"])))
            out += _fairness(an, b, tag, math.inf)
            continue
        eps = an.selection[b]["selected_epsilon"]
        out.append(_utility(an, b, tag, eps, strongest=False))
        if private[0] < eps:
            out.append(_utility(an, b, tag, private[0], strongest=True))
        out += _fairness(an, b, tag, eps)
    if not an.groupings:
        out.append(Finding("fairness", "No sensitive attributes in the data (data.sensitive): no fairness finding."))
    out.append(_audit(an))
    out += [_selection(an, b, f"[{b}] " if len(backends) > 1 else "") for b in backends if b in an.selection]
    if an.composition_all is not None:
        c = an.composition_all
        out.append(Finding("selection_all", f"Publishing the selected models of every backend costs epsilon "
                           f"{num(c['composition_epsilon'], 2)} at delta {c['delta']:g} (all "
                           f"{len(c['private_runs'])} private runs composed).",
                           values={"composition_epsilon": c["composition_epsilon"]}))
    if an.missing:
        out.append(Finding("missing", f"{len(an.missing)} grid point(s) did not finish "
                           f"({', '.join(m['name'] for m in an.missing)}): every number above leaves them out.",
                           values={"missing": [m["name"] for m in an.missing]}, warn=True))
    return out


__all__ = ["Finding", "attribute_views", "findings", "worst_group"]
