"""Sweeps over epsilon x seed and privacy-utility-fairness reports built from run records."""

from __future__ import annotations

from pathlib import Path

from dptrain.report.analysis import Analysis, ReportError, analyse
from dptrain.report.sweep import SweepError, SweepResult, parse_epsilons, run_sweep


def build_report(sweep_dir: str | Path, **kwargs) -> dict[str, Path]:
    """Analyse the finished runs under ``sweep_dir`` and write, across the release boundary,
    ``DIR/private/`` report.html, report.md, summary.csv, plots/ (computed from real test records: never
    publish) and ``DIR/release/selection.json`` (the public statement of the configuration chosen on
    validation records and its privacy cost; no metrics, no counts).

    Returns the paths: keys ``html``, ``md``, ``csv`` (private) and ``selection`` (release). Keyword arguments
    go to :func:`dptrain.report.analysis.analyse` (threshold, n_boot, level, min_group_size). Nothing is
    retrained. Refuses (ReportError) runs that do not share one split, and a selection without validation
    metrics.
    """
    from dptrain.report.render import write_report

    return write_report(analyse(sweep_dir, **kwargs), sweep_dir)


__all__ = ["Analysis", "ReportError", "SweepError", "SweepResult", "analyse", "build_report", "parse_epsilons",
           "run_sweep"]
