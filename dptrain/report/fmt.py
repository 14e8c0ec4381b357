"""How the report writes numbers and names (tables, sentences and plot titles share them)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

GAP_TITLES = {
    "worst_group_auroc": "worst-group AUROC", "auroc_gap": "AUROC gap (max-min)",
    "demographic_parity_difference": "demographic parity diff.", "equalized_odds_difference": "equalized odds diff.",
    "fnr_gap": "FNR gap (underdiagnosis)", "accuracy_spd": "accuracy SPD (Tayebi Arasteh)",
}


def num(x: Any, nd: int = 3) -> str:
    """A cell: ``n/a`` for nan, ``inf``, ``yes`` / empty for booleans, ``nd`` decimals for floats."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{nd}f}"


def _with_ci(a: dict[str, Any], fmt, nd: int) -> str:
    lo, hi = a["ci"]
    s = fmt(a["mean"], nd)
    if not (math.isnan(lo) or math.isnan(hi)):
        s += f" [{fmt(lo, nd)}, {fmt(hi, nd)}]"
    return s


def ci(a: dict[str, Any], nd: int = 3) -> str:
    """``mean [low, high]`` of an aggregate (``{"mean", "ci"}``); the interval is left out when it is nan."""
    return _with_ci(a, num, nd)


def sd(a: dict[str, Any]) -> str:
    return "" if math.isnan(a["sd"]) else f"±{a['sd']:.3f}"


def signed(x: float, nd: int = 3) -> str:
    """A change, with its sign: ``+0.012``, ``-0.030`` (``n/a`` for nan)."""
    return "n/a" if math.isnan(x) else f"{x:+.{nd}f}"


def signed_ci(a: dict[str, Any], nd: int = 3) -> str:
    """``+mean [low, high]`` of a change; the interval is left out when it is nan."""
    return _with_ci(a, signed, nd)
