"""The report's plots (PNG bytes, matplotlib's Agg backend), the headline first; titles in ``PLOT_TITLES``."""

from __future__ import annotations

import io
import math

import numpy as np

from dptrain.evaluate import fairness as fm
from dptrain.report import multiclass as mc
from dptrain.report.analysis import UTILITY, Analysis
from dptrain.report.fmt import GAP_TITLES
from dptrain.report.summary import attribute_views
from dptrain.report.sweep import eps_label

HEADLINE = "headline_utility_and_worst_group"


def make_plots(an: Analysis) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes, in report order (the headline first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    backends = sorted({c["backend"] for c in an.configs})
    colors = dict(zip(backends, ["tab:blue", "tab:orange", "tab:green"], strict=False))

    def finite(b):
        return [c for c in an.configs if c["backend"] == b and math.isfinite(c["epsilon"])]

    def ref(b):
        return next((c for c in an.configs if c["backend"] == b and not math.isfinite(c["epsilon"])), None)

    def save(name, fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        out[name] = buf.getvalue()

    eps_ticks = sorted({c["epsilon"] for c in an.configs if math.isfinite(c["epsilon"])})

    def eps_axis(ax):
        if not eps_ticks:  # only non-private runs: their horizontal lines, no epsilon axis (nothing to log-scale)
            ax.set_xticks([])
            ax.set_xlabel("epsilon (no private run in this sweep)")
            return
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(eps_ticks, [eps_label(x) for x in eps_ticks])
        ax.set_xlabel("epsilon")

    def line(ax, cs, get, color, label, ls="-", marker="o"):
        if not cs:
            return
        x = [c["epsilon"] for c in cs]
        a = [get(c) for c in cs]
        ax.plot(x, [v["mean"] for v in a], ls, marker=marker, color=color, label=label)
        lo = [v["ci"][0] for v in a]
        hi = [v["ci"][1] for v in a]
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)

    # 0. the headline: AUROC and each attribute's worst-group AUROC vs epsilon (what the summary sentences quote);
    # below, with non-private runs, their paired change vs non-private (the CIs that answer "what did DP cost")
    heads = [(mc.TITLES["auroc"] if an.multiclass else "AUROC", ("utility", "auroc"))]
    heads += [(f"worst-group AUROC by {v}", ("gaps", v, "worst_group_auroc")) for _, v in attribute_views(an)]

    def pick(d, path):
        for k in path:
            d = d[k]
        return d

    paired = any(c["change_vs_nonprivate"] is not None for c in an.configs)
    fig, axes = plt.subplots(1 + paired, len(heads), squeeze=False, figsize=(4.6 * len(heads), 3.6 * (1 + paired)))
    for j, (title, path) in enumerate(heads):
        ax = axes[0][j]
        for b in backends:
            line(ax, finite(b), lambda c, path=path: pick(c, path), colors[b], b)
            rc = ref(b)
            if rc is not None and math.isfinite(pick(rc, path)["mean"]):
                ax.axhline(pick(rc, path)["mean"], color=colors[b], ls="--", lw=1, label=f"{b} non-private")
                ax.axhspan(*pick(rc, path)["ci"], color=colors[b], alpha=0.08)
        eps_axis(ax)
        ax.set_title(title, fontsize=10)
        if paired:
            ax = axes[1][j]
            for b in backends:
                cs = [c for c in finite(b) if c["change_vs_nonprivate"] is not None]
                line(ax, cs, lambda c, path=path: pick(c["change_vs_nonprivate"], path), colors[b], b)
            ax.axhline(0, color="grey", lw=0.8)
            eps_axis(ax)
            ax.set_title(f"change of {title} vs non-private (paired)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.suptitle(f"Headline: utility and worst-group utility vs epsilon (mean over seeds, {int(an.level * 100)}% "
                 "bootstrap CI band; dashed: non-private)", y=1.03, fontsize=10)
    save(HEADLINE, fig)

    # 1. utility vs epsilon (multi-class: also the one-vs-rest AUROC of each class)
    def panels(name, keys, section, point, title, what):
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
        for ax, m in zip(axes, keys, strict=True):
            for b in backends:
                line(ax, finite(b), lambda c, m=m: c[section][m], colors[b], b)
                for r in (r for r in an.runs if r.backend == b and r.private):
                    ax.plot(r.epsilon, getattr(r, point)[m], ".", color=colors[b], alpha=0.5)
                rc = ref(b)
                if rc is not None:
                    u = rc[section][m]
                    ax.axhline(u["mean"], color=colors[b], ls="--", lw=1, label=f"{b} non-private")
                    ax.axhspan(*u["ci"], color=colors[b], alpha=0.08)
            eps_axis(ax)
            ax.set_title(title(m))
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{what} vs epsilon (mean over seeds, {int(an.level * 100)}% bootstrap CI band; dots = runs)",
                     y=1.03)
        save(name, fig)

    panels("utility_vs_epsilon", UTILITY, "utility", "utility", (lambda m: mc.TITLES[m]) if an.multiclass else
           (lambda m: m.upper() if m != "accuracy" else "accuracy"), "Utility")
    if an.multiclass:
        panels("per_class_auroc_vs_epsilon", an.classes, "per_class_auroc", "per_class",
               lambda k: f"AUROC {k} vs rest", "One-vs-rest AUROC per class")

    if not an.groupings:  # no sensitive attributes: no fairness plots
        _audit_plot(an, out, save, backends, colors, markers={b: m for b, m in zip(backends, "os^", strict=False)})
        return out

    # 2. per-group AUROC vs epsilon (one panel per grouping and backend; multi-class: a row per class)
    grid = [(b, row) for b in backends for row in mc.view_rows(an.groupings, an.classes)]
    fig, axes = plt.subplots(len(grid), len(grid[0][1]), squeeze=False,
                             figsize=(4.2 * len(grid[0][1]), 3.4 * len(grid)))
    for i, (b, row) in enumerate(grid):
        for j, g in enumerate(row):
            ax = axes[i][j]
            sub = an.groups[(an.groups["backend"] == b) & (an.groups["grouping"] == g)]
            if g not in an.single:  # intersections: too many groups to read; small ones are noise
                sub = sub[~sub["small"]]
            cmap = plt.get_cmap("tab10")
            for k, (lab, d) in enumerate(sub.groupby("group", sort=True)):
                d = d.sort_values("epsilon")
                fin = d[np.isfinite(d["epsilon"])]
                col = cmap(k % 10)
                ls = ":" if d["small"].any() else "-"
                ax.plot(fin["epsilon"], fin["auroc"], ls, marker="o", ms=3, color=col,
                        label=f"{lab}{' (small)' if d['small'].any() else ''}")
                if not math.isfinite(d["epsilon"].max()) and len(d) > len(fin):
                    ax.axhline(float(d[~np.isfinite(d["epsilon"])]["auroc"].iloc[0]), color=col, ls="--", lw=0.8)
            eps_axis(ax)
            ax.set_title(f"{b}: AUROC by {g}" + ("" if g in an.single else " (not small)"), fontsize=9)
            if len(sub["group"].unique()) <= 8:
                ax.legend(fontsize=6)
    if an.multiclass:  # a row per class: keep titles off the x labels above them
        fig.tight_layout()
    save("group_auroc_vs_epsilon", fig)

    # 3. gaps vs epsilon
    fig, axes = plt.subplots(1, len(fm.GAPS), figsize=(3.8 * len(fm.GAPS), 3.4))
    styles = ["-", "--", "-.", ":"]
    for ax, k in zip(axes, fm.GAPS, strict=True):
        for b in backends:  # line style: the grouping; multi-class: the marker is the class
            for ci, row in enumerate(mc.view_rows(an.groupings, an.classes)):
                for gi, g in enumerate(row):
                    line(ax, finite(b), lambda c, g=g, k=k: c["gaps"][g][k], colors[b], f"{b} · {g}",
                         ls=styles[gi % len(styles)], marker="os^Dv<>ph*"[ci % 10])
        eps_axis(ax)
        ax.set_title(GAP_TITLES[k], fontsize=9)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=6)
    save("gaps_vs_epsilon", fig)

    # 4. DP drop vs group size
    fig, ax = plt.subplots(figsize=(6, 4))
    priv = an.groups[np.isfinite(an.groups["epsilon"]) & np.isfinite(an.groups["auroc_drop_vs_nonprivate"])]
    markers = dict(zip(backends, ["o", "s", "^"], strict=False))
    eps_values = sorted(priv["epsilon"].unique())
    cmap = plt.get_cmap("viridis")
    for b in backends:
        for i, e in enumerate(eps_values):
            d = priv[(priv["backend"] == b) & (priv["epsilon"] == e)]
            ax.scatter(d["n"], d["auroc_drop_vs_nonprivate"], marker=markers[b], s=18,
                       color=cmap(i / max(1, len(eps_values) - 1)), label=f"{b} eps={eps_label(e)}", alpha=0.8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("group size (test examples; proportional to its share of training data)")
    ax.set_ylabel("AUROC drop vs non-private")
    ax.set_title("Does DP hurt small groups more? (the poor get poorer check)")
    if len(priv):
        ax.legend(fontsize=6)
    save("dp_drop_vs_group_size", fig)

    # 5. Pareto: utility vs worst-group gap
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = []
    for c in an.configs:
        gap = c["utility"]["auroc"]["mean"] - c["worst_group_auroc"]["mean"]
        pts.append((gap, c["utility"]["auroc"]["mean"], c))
        ax.scatter(gap, c["utility"]["auroc"]["mean"], color=colors[c["backend"]], s=30)
        ax.annotate(f"{c['backend'][0]}:{eps_label(c['epsilon'])}", (gap, c["utility"]["auroc"]["mean"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front = [p for p in pts if np.isfinite(p[0]) and not any(
        q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in pts if np.isfinite(q[0]))]
    front.sort(key=lambda p: p[0])
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
        ax.legend(fontsize=7)
    ax.set_xlabel("macro AUROC minus worst one-vs-rest group AUROC (lower is fairer)" if an.multiclass
                  else "AUROC minus worst-group AUROC (lower is fairer)")
    ax.set_ylabel("AUROC")
    ax.set_title("Utility vs worst-group gap (each point: backend:epsilon)")
    save("pareto_utility_vs_gap", fig)

    _audit_plot(an, out, save, backends, colors, markers)
    return out


def _audit_plot(an, out, save, backends, colors, markers) -> None:
    """Claimed epsilon vs audited lower bound across the sweep (grey: max certifiable)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fin = [c["epsilon"] for c in an.configs if math.isfinite(c["epsilon"])]
    top = max(fin) * 2 if fin else 10.0
    for b in backends:
        for r in (r for r in an.runs if r.backend == b):
            a = r.record.get("audit") or {}
            lb = a.get("epsilon_lower_bound")
            if lb is None:
                continue
            x = r.epsilon if r.private else top
            bad = a.get("status") == "VIOLATION"
            ax.scatter(x, lb, marker="x" if bad else markers[b], color="red" if bad else colors[b], s=40 if bad else 22,
                       label=f"{b}{' VIOLATION' if bad else ''}")
            if a.get("max_certifiable_epsilon") is not None:
                ax.scatter(x, a["max_certifiable_epsilon"], marker="_", color="grey", s=80)
    lim = [min(fin + [0.5]) / 2, top * 1.3]
    ax.plot(lim, lim, "k--", lw=0.8, label="lower bound = claimed")
    ax.set_xscale("log")
    ax.minorticks_off()
    ticks = sorted(set(fin)) + [top]
    ax.set_xticks(ticks, [eps_label(t) for t in sorted(set(fin))] + ["inf"])
    ax.set_xlabel("claimed epsilon (accountant)")
    ax.set_ylabel("empirical lower bound (95%)")
    ax.set_title("Audit: claimed epsilon vs audited lower bound (grey: max certifiable)")
    h, lab = ax.get_legend_handles_labels()
    uniq = dict(zip(lab, h, strict=True))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    save("audit_claimed_vs_lower_bound", fig)


PLOT_TITLES = {
    HEADLINE: "Headline: utility and worst-group utility vs epsilon",
    "utility_vs_epsilon": "Utility vs epsilon",
    "per_class_auroc_vs_epsilon": "One-vs-rest AUROC per class vs epsilon",
    "group_auroc_vs_epsilon": "Per-group AUROC vs epsilon (dashed: non-private; dotted: small group)",
    "gaps_vs_epsilon": "Fairness gaps vs epsilon",
    "dp_drop_vs_group_size": "DP drop vs group size",
    "pareto_utility_vs_gap": "Pareto: utility vs worst-group gap",
    "audit_claimed_vs_lower_bound": "Audit: claimed epsilon vs empirical lower bound",
}


__all__ = ["HEADLINE", "PLOT_TITLES", "make_plots"]
