"""The data section's numeric declarations (``data.numeric``) and DP bounds (``data.dp_bounds``), used by
:class:`dptrain.config.DataConfig` only.

A numeric feature is declared with public bounds ``[low, high]``, or with ``dp``: its bounds are then estimated
by a DP mechanism (:mod:`dptrain.data.dp_bounds`) within a coarse range the recipe declares public in
``data.dp_bounds.range`` (per column, or ``default`` for every ``dp`` column), composed into the run's ledger.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator

from accounting.errors import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER
from dptrain.config_base import Int, _finite, _Strict

DP = "dp"
_RANGE_FIX = ("declare a coarse range known without looking at the data (e.g. the assay's or the form's range): "
              "data.dp_bounds: {range: {%s: [LOW, HIGH]}} (or {default: [LOW, HIGH]} for every dp column)")


def _pair(name: str, pair: Any) -> None:
    """A declared [low, high] (the error follows the field's location, e.g. ``data.numeric: column 'age': ...``)."""
    if not isinstance(pair, list) or len(pair) != 2:
        raise ValueError(f"column {name!r}: must be [low, high], got {pair!r}")
    lo, hi = pair
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"column {name!r}: must be finite with low < high, got [{lo}, {hi}]; fix: give [LOW, HIGH] "
                         "with LOW < HIGH")


class DpBoundsConfig(_Strict):
    """How ``dp`` numeric features get their clipping bounds: public facts only (the coarse ranges) and the
    mechanism's settings; see :mod:`dptrain.data.dp_bounds`."""

    range: dict[str, list[float]] = Field(
        default_factory=dict, description="dp column (or 'default', for every dp column not named) -> a coarse "
                                          "PUBLIC range [low, high] that the bounds are searched in")
    quantiles: list[float] = Field(default_factory=lambda: [0.01, 0.99], description="the two quantiles of the "
                                   "training records' values that become the bounds, 0 < low < high < 1")
    noise_multiplier: float = _finite(20.0, ge=MIN_NOISE_MULTIPLIER, le=MAX_NOISE_MULTIPLIER, description="the "
                                      "noise multiplier of each column's release as ONE Gaussian mechanism (its "
                                      "2 x steps noisy counts each get noise std noise_multiplier x sqrt(2 x steps))")
    steps: Int = Field(8, ge=1, le=20, description="noisy binary-search steps per quantile: the bounds lie on a "
                                                   "grid of range / 2**steps (more steps: finer, more noise each)")

    @field_validator("range")
    @classmethod
    def _ranges(cls, v):
        for name, pair in v.items():
            _pair(name, pair)
        return v

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, v):
        if len(v) != 2 or not (0 < v[0] < v[1] < 1):
            raise ValueError("must be two numbers 0 < low < high < 1; fix: e.g. [0.01, 0.99]")
        return v


def declared_words(v: Any, field: str) -> Any:
    """Before validation: a word in ``data.numeric`` must be ``dp``; ``dp`` is for numeric features only (a categorical
    one declares its categories). One clear line otherwise."""
    for name, decl in (v or {}).items() if isinstance(v, dict) else ():
        if field == "numeric" and isinstance(decl, str) and decl != DP:
            raise ValueError(f"column {name!r}: {decl!r} is neither public bounds [low, high] nor dp; fix: write "
                             f"{name}: [LOW, HIGH], or {name}: dp with a public range in data.dp_bounds.range")
        if field == "categorical" and decl == DP:
            raise ValueError(f"column {name!r}: dp bounds are for numeric features; fix: list the public "
                             f"categories (data.categorical.{name}: [A, B, ...]), or declare it in data.numeric."
                             f"{name}: dp if it holds numbers")
    return v


def check_numeric(v: dict | None) -> dict | None:
    """After validation: each declaration is ``dp`` or finite public bounds with low < high."""
    for name, decl in (v or {}).items():
        if decl != DP:
            _pair(name, decl)
    return v


def check_dp_bounds(numeric: dict | None, dp_bounds: DpBoundsConfig | None) -> None:
    """Every ``dp`` column has a public range (its own or the default), and ``data.dp_bounds`` names dp columns
    only; raises ValueError with the YAML fix."""
    dp = [c for c, decl in (numeric or {}).items() if decl == DP]
    if dp_bounds is None:
        if dp:
            raise ValueError(f"data.numeric.{dp[0]}: dp bounds need a public range to search in, and "
                             f"data.dp_bounds is not set; fix: {_RANGE_FIX % dp[0]}")
        return
    if not dp:
        raise ValueError("data.dp_bounds: set, but no feature of data.numeric is dp; fix: remove data.dp_bounds, or "
                         "write data.numeric: {COLUMN: dp}")
    other = sorted(set(dp_bounds.range) - set(dp) - {"default"})
    if other:
        raise ValueError(f"data.dp_bounds.range.{other[0]}: {other[0]!r} is not a dp feature of data.numeric; fix: "
                         f"remove it, or write data.numeric.{other[0]}: dp")
    for col in dp:
        if col not in dp_bounds.range and "default" not in dp_bounds.range:
            raise ValueError(f"data.numeric.{col}: dp bounds need a public range to search in, and data.dp_bounds."
                             f"range has none for it; fix: {_RANGE_FIX % col}")


def numeric_range(numeric: dict | None, dp_bounds: DpBoundsConfig | None, col: str) -> tuple[float, float]:
    """A numeric feature's declared public bounds, or for a ``dp`` feature its declared public search range."""
    decl = (numeric or {})[col]
    if decl != DP:
        return float(decl[0]), float(decl[1])
    lo, hi = dp_bounds.range.get(col, dp_bounds.range.get("default"))
    return float(lo), float(hi)


__all__ = ["DP", "DpBoundsConfig", "check_dp_bounds", "check_numeric", "declared_words", "numeric_range"]
