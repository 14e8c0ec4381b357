"""The privacy statement: one frozen value, one serialisation (DESIGN invariant 5).

A ``PrivacyStatement`` is what a reader of a run is told: (epsilon, delta) under a named neighbouring
relation and privacy unit, from which accountant, and -- for a training run -- the plan that produced it
(sampling, noise, clipping, steps, the released unit count, other DP releases, what the statement covers and
what is public). ``PrivacyLedger.statement(delta)`` gives the ledger's part; a run adds its plan with
``dataclasses.replace``.

Serialisation: ``to_dict`` / ``from_dict`` are the only place where a non-finite number becomes text (JSON
has no infinity): ``epsilon`` (and any other float) that is infinite is written ``"inf"`` and read back as
``math.inf``, so readers get floats and never check types. ``from_dict`` refuses a statement of another
format or with a missing or malformed field (``LedgerFormatError``, naming the field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json, read_json
from .errors import LedgerFormatError

FORMAT = "dptrain.privacy-statement/1"


def encode_float(x: float | None) -> float | str | None:
    """A float for JSON: ``inf``/``-inf``/``nan`` as strings (the one place this happens)."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def decode_float(x: Any, name: str) -> float | None:
    """Inverse of :func:`encode_float`; refuses anything else with the field's name."""
    if x is None:
        return None
    if isinstance(x, bool):
        raise LedgerFormatError(f"privacy statement: field {name!r} is {x!r}, not a number")
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    raise LedgerFormatError(f"privacy statement: field {name!r} is {x!r}, not a number")


@dataclass(frozen=True)
class ReleasedUnits:
    """The number of privacy units as released: ``source`` ``declared`` (public), ``dp_count`` (a DP count,
    composed into the ledger) or ``exact`` (non-private runs only). ``added_by_dptrain``: canaries etc."""

    value: int
    added_by_dptrain: int
    source: str
    meaning: str


@dataclass(frozen=True)
class IndependentCheck:
    """Epsilon recomputed by dp_accounting's own accountant from the statement's numbers (not the ledger)."""

    epsilon: float | None
    method: str


_FLOATS = ("epsilon", "delta", "pld_discretization", "sampling_rate", "expected_batch_size", "noise_multiplier",
           "clipping_norm", "target_epsilon")


@dataclass(frozen=True)
class PrivacyStatement:
    """(epsilon, delta)-DP under ``neighbouring_relation`` per ``privacy_unit``; a run's plan fields are
    ``None`` for a bare ledger statement. ``epsilon`` is ``math.inf`` for a non-private run."""

    epsilon: float
    delta: float
    accountant: str
    accountant_version: str
    pld_discretization: float | None
    neighbouring_relation: str
    privacy_unit: str
    steps: int
    # ---- the run's plan (training runs) ----
    relation_meaning: str | None = None
    mode: str | None = None
    sampling: str | None = None
    sampling_rate: float | None = None
    expected_batch_size: float | None = None
    steps_per_epoch: int | None = None
    max_batch_size: int | None = None
    units: ReleasedUnits | None = None
    noise_multiplier: float | None = None
    planned_steps: int | None = None
    clipping_norm: float | None = None
    clipping_granularity: str | None = None
    target_epsilon: float | None = None
    releases: dict[str, dict[str, float]] = field(default_factory=dict)
    hyperparameter_selection_accounted: bool = False
    dp_randomness: str | None = None
    covers: str | None = None
    public: str | None = None
    epsilon_independent_check: IndependentCheck | None = None
    warning: str | None = None

    @property
    def is_private(self) -> bool:
        return math.isfinite(self.epsilon)

    def summary(self) -> str:
        """One line for a terminal."""
        eps = "inf" if not self.is_private else f"{self.epsilon:.4g}"
        line = f"({eps}, {self.delta:g})-DP per {self.privacy_unit}, {self.neighbouring_relation} [{self.accountant}"
        if self.sampling is not None:
            line += f", {self.sampling} q={self.sampling_rate:.4g}, sigma={self.noise_multiplier:.4g}, " \
                    f"C={self.clipping_norm}"
        line += f", {self.steps} steps"
        if self.units is not None:
            line += f"; units: {self.units.source}"
        return line + "]"

    # ---- the one serialisation ----
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _FLOATS:
                v = encode_float(v)
            elif isinstance(v, ReleasedUnits | IndependentCheck):
                v = {k.name: getattr(v, k.name) for k in fields(v)}
                if "epsilon" in v:
                    v["epsilon"] = encode_float(v["epsilon"])
            elif f.name == "releases":
                v = {k: dict(r) for k, r in v.items()}
            if v is None and f.name in ("max_batch_size", "warning"):
                continue  # absent, not null: a statement without a cap or a warning
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Any) -> PrivacyStatement:
        if not isinstance(data, dict) or data.get("format", FORMAT) != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LedgerFormatError(f"privacy statement: expected format {FORMAT!r}, got {got!r}")
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {}
        for name in known:
            if name not in data:
                continue
            v = data[name]
            if name in _FLOATS:
                v = decode_float(v, name)
            elif name == "units" and v is not None:
                v = _sub(ReleasedUnits, v, name)
            elif name == "epsilon_independent_check" and v is not None:
                v = _sub(IndependentCheck, {**v, "epsilon": decode_float(v.get("epsilon"), name + ".epsilon")}, name)
            kw[name] = v
        try:
            return cls(**kw)
        except TypeError as err:
            raise LedgerFormatError(f"privacy statement: missing or malformed field ({err})") from None

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PrivacyStatement:
        return cls.from_dict(read_json(path, LedgerFormatError, "privacy statement"))


def _sub(kind, value: Any, name: str):
    if not isinstance(value, dict):
        raise LedgerFormatError(f"privacy statement: field {name!r} is {value!r}, not an object")
    try:
        return kind(**{f.name: value[f.name] for f in fields(kind)})
    except KeyError as err:
        raise LedgerFormatError(f"privacy statement: field {name!r} lacks {err}") from None


__all__ = ["FORMAT", "IndependentCheck", "PrivacyStatement", "ReleasedUnits", "decode_float", "encode_float"]
