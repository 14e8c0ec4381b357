"""DP clipping bounds for numeric features whose bounds are not public: ``data.numeric: {COL: dp}``.

The recipe declares public facts only: a coarse range ``[L, H]`` per column (``data.dp_bounds.range``, or its
``default``), the two quantiles ``p_lo < p_hi`` (default 0.01 / 0.99), the number of search ``steps`` T and the
``noise_multiplier`` sigma. The bounds are the output of a DP mechanism run on the TRAINING records only (the
split depends on unit identifiers and the split seed, never on values); they then encode every split.

Mechanism (per column): for each quantile p, a noisy binary search over ``[L, H]`` with T steps; step t asks
the sign of ``f(m) = sum over training units u with a value of (share of u's values <= m) - p`` at the midpoint m,
with Gaussian noise of std ``s = sigma * sqrt(2 T)``, and keeps the half that the noisy sign points to (a
standard DP quantile search: see Gillenwater, Joseph & Kulesza 2021, "Differentially private quantiles", for
this and the exponential mechanism of Smith 2011, which would need a pure-epsilon event). The bounds are
``[min of the final intervals' lower ends, max of their upper ends]``: on the grid ``L + k (H - L) / 2**T``, at
least one grid step wide, inside ``[L, H]`` (post-processing).

Guarantee. Under add/remove of one privacy unit, f changes by at most max(p, 1 - p) <= 1 (a unit adds one term
in [-p, 1 - p]; a unit whose values are all missing adds nothing), whatever the number of rows of a unit: a
unit's rows share one unit of weight, so ``data.privacy_unit`` needs no contribution bound. The 2 T queries are
chosen adaptively from earlier noisy answers; by the composition theorem of Gaussian DP (Dong, Roth & Su 2019)
they are exactly one Gaussian mechanism of L2 sensitivity sqrt(2 T) and noise std s, i.e. noise multiplier
sigma: the event ``GaussianDpEvent(sigma)`` labelled ``dp_bounds:COL`` that the run composes into its ledger and
pays for in calibration (one per column; valid under the PLD and RDP accountants). The noise is standard
normals from the caller (the OS CSPRNG in ``dptrain train``).

Sharp edges
-----------
* Accuracy: each step's noise has std s (80 at the defaults sigma 20, T 8: 20 sqrt(16)); a quantile is found to within
  about 2 s units of rank plus one grid step. With few training units the bounds fall inside the data's
  range (more clipping) or reach the public range's edge; raise sigma only with many units.
* A public range that misses the data puts a bound at its edge (the record notes it): check the range.
* Missing values (with a declared rule) take no part; the filled value is then clipped like any other.
* The guarantee, like the run's, is about neighbouring *training sets*: adding a row to the source file can
  reshuffle the train / test split (it is a permutation of the unit ids), which changes who is trained on.
* The draw is a release: it is made once per run (persisted in ``private/state.json`` and reused on resume) and
  only when the caller attaches a noise source (:func:`attach`); a loader without one refuses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import accounting as acc
from dptrain.config_data import DP, numeric_range
from dptrain.data.core import _error

if TYPE_CHECKING:
    from dptrain.config import DataConfig

LABEL = "dp_bounds:"  # + column: the ledger label of a column's release
MECHANISM = ("noisy binary search per quantile over the declared public range, Gaussian noisy counts of the "
             "training units (sensitivity 1 each; one Gaussian mechanism per column by Gaussian DP composition)")
Normal = Callable[[int], np.ndarray]


@dataclass(frozen=True)
class _Source:
    released: Mapping[str, Any] | None = None  # a run's persisted release: reused, never redrawn
    noise: Normal | None = None  # standard normals: draw afresh


def dp_columns(cfg: DataConfig) -> list[str]:
    """The features of ``data.numeric`` declared ``dp``."""
    return [c for c, decl in (cfg.numeric or {}).items() if decl == DP]


def public_range(cfg: DataConfig, col: str) -> tuple[float, float]:
    """A numeric feature's declared bounds, or a ``dp`` feature's declared public search range."""
    return numeric_range(cfg.numeric, cfg.dp_bounds, col)


def attach(cfg: DataConfig, *, released: Mapping[str, Any] | None = None, noise: Normal | None = None) -> DataConfig:
    """A copy of ``cfg`` that loads its ``dp`` features with the ``released`` bounds (a run's persisted release)
    or draws them with ``noise`` (standard normals). The recipe is unchanged: the attachment is never serialised."""
    out = cfg.model_copy()
    out._dp_source = _Source(released, noise)
    return out


def statistic(values: np.ndarray, units: np.ndarray, p: float, threshold: float) -> float:
    """``sum over units u with a value of (share of u's values <= threshold) - p`` (NaN: missing): the quantity
    whose noisy sign steers the search; one unit moves it by at most max(p, 1 - p)."""
    ok = ~np.isnan(values)
    per_unit = np.bincount(units[ok], minlength=int(units.max(initial=-1)) + 1)
    weight = 1.0 / per_unit[units[ok]]
    return float(weight[values[ok] <= threshold].sum() - p * np.count_nonzero(per_unit))


def search(values: np.ndarray, units: np.ndarray, p: float, rng: tuple[float, float], steps: int,
           count_std: float, normal: Normal) -> tuple[float, float]:
    """The final interval of the noisy binary search for quantile ``p`` in ``rng`` (``steps`` noisy signs)."""
    lo, hi = rng
    for z in np.asarray(normal(steps), dtype=np.float64):
        mid = (lo + hi) / 2
        if statistic(values, units, p, mid) + count_std * float(z) >= 0:
            hi = mid
        else:
            lo = mid
    return lo, hi


def noisy_bounds(values: np.ndarray, units: np.ndarray, *, rng: tuple[float, float], quantiles: tuple[float, float],
                 steps: int, noise_multiplier: float, normal: Normal) -> tuple[float, float]:
    """The DP bounds of one column (see the module docstring): ``values`` of the training rows (NaN: missing),
    ``units`` their training unit (0..U-1), ``normal(k)``: k standard normals."""
    values = np.asarray(values, dtype=np.float64)
    units = np.asarray(units, dtype=np.int64)
    count_std = noise_multiplier * math.sqrt(2 * steps)
    ends = [search(values, units, p, rng, steps, count_std, normal) for p in quantiles]
    return min(a for a, _ in ends), max(b for _, b in ends)


def _settings(cfg: DataConfig, col: str) -> dict[str, Any]:
    s = cfg.dp_bounds
    return {"range": list(public_range(cfg, col)), "quantiles": list(s.quantiles), "steps": int(s.steps),
            "noise_multiplier": float(s.noise_multiplier)}


def release_bounds(cfg: DataConfig, values: Mapping[str, np.ndarray], units: np.ndarray) -> dict[str, Any]:
    """The bounds of every ``dp`` column in ``values`` (its training rows' values, NaN where missing; ``units``: each
    training row's unit), drawn with the noise :func:`attach` gave or restored from a release it gave. Returns the
    release (JSON: persisted by the run, written to the record's preprocessing); refuses without a source."""
    cols = list(values)
    source = getattr(cfg, "_dp_source", None)
    if source is None or (source.released is None and source.noise is None):
        raise _error(f"data.numeric.{cols[0]}", "dp bounds are a DP release that `dptrain train` draws once and "
                     "composes into its ledger; this caller loads the data outside a run",
                     f"run `dptrain train`, or declare public bounds data.numeric.{cols[0]}: [LOW, HIGH]")
    if source.released is not None:
        old = dict(source.released.get("columns") or {})
        same = sorted(old) == sorted(cols) and all(
            {k: old[c].get(k) for k in _settings(cfg, c)} == _settings(cfg, c) for c in cols)
        if not same:
            raise _error("data.dp_bounds", "the dp bounds this run released (private/state.json) were drawn for "
                         "other columns or settings", "resume with the original recipe, or start a new run")
        return {"mechanism": MECHANISM, "columns": {c: dict(old[c]) for c in cols}}
    out = {}
    for col in cols:
        s = _settings(cfg, col)
        lo, hi = noisy_bounds(values[col], units, rng=tuple(s["range"]), quantiles=tuple(s["quantiles"]),
                              steps=s["steps"], noise_multiplier=s["noise_multiplier"], normal=source.noise)
        out[col] = {"bounds": [float(lo), float(hi)], **s, "num_queries": 2 * s["steps"],
                    "count_noise_std": s["noise_multiplier"] * math.sqrt(2 * s["steps"]), "ledger": LABEL + col}
        if lo == s["range"][0] or hi == s["range"][1]:
            out[col]["note"] = ("a bound is at the edge of the public range: the range may be too narrow (values "
                                "beyond it are clipped)")
    return {"mechanism": MECHANISM, "columns": out}


def describe(col_info: Mapping[str, Any]) -> str:
    """Where a column's bounds came from, for the record and model.json ("from")."""
    lo, hi = col_info["range"]
    q1, q2 = col_info["quantiles"]
    return (f"DP estimate of the {q1:g} / {q2:g} quantiles of the training records within the declared public "
            f"range [{lo:g}, {hi:g}] (data.dp_bounds; Gaussian noise multiplier {col_info['noise_multiplier']:g}, "
            f"ledger '{col_info['ledger']}'): a release covered by the run's guarantee")


def ledger_releases(release: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """(label, DpEvent) per column, for ``PrivacyPlan.from_recipe(..., releases=)``: ``2 T`` adaptive Gaussian
    counts of std s and sensitivity 1 are exactly ``GaussianDpEvent(s / sqrt(2 T))``."""
    return tuple((info["ledger"], acc.gaussian_release_event(info["count_noise_std"], math.sqrt(info["num_queries"])))
                 for info in ((release or {}).get("columns") or {}).values())


def statement_releases(release: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """The statement's ``releases`` entries (noise std and L2 sensitivity of the whole column's release)."""
    return {info["ledger"]: {"noise_std": float(info["count_noise_std"]),
                             "l2_sensitivity": math.sqrt(info["num_queries"]), "num_queries": int(info["num_queries"])}
            for info in ((release or {}).get("columns") or {}).values()}


__all__ = ["LABEL", "MECHANISM", "attach", "describe", "dp_columns", "ledger_releases", "noisy_bounds",
           "public_range", "release_bounds", "search", "statement_releases", "statistic"]
