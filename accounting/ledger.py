"""The privacy ledger: every DP event a run (or a dataset) spent, and the epsilon it adds up to.

Guarantees: events are stored exactly (JSON of dp_accounting events, no floats re-derived), so a
reloaded ledger gives bit-identical epsilon. ``save`` is atomic and durable (write, fsync, rename).
The ledger states which accountant produced each number and never falls back silently.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata as _md
from pathlib import Path
from typing import Any

from dp_accounting import dp_event as dpe

from . import accountants as _acc
from .atomic import atomic_write_json, read_json
from .errors import InvalidParameterError, LedgerFormatError, UnsupportedAccountantError
from .events import RELATIONS, event_from_dict, event_to_dict
from .statement import PrivacyStatement

FORMAT = "dptrain.ledger/1"
TRAIN_STEP = "train_step"


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("dptrain", "dp-accounting", "numpy", "scipy"):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class PrivacyLedger:
    """Composes DP events and reports epsilon(delta) / delta(epsilon).

    ``relation`` is ``"add_or_remove"`` or ``"replace_one"``; every event composed must be stated for
    that relation (sampling schemes carry theirs; see ``accounting.events``). ``privacy_unit`` says
    what one neighbouring record is: ``"example"`` or ``"patient"`` (or another declared unit).
    """

    def __init__(
        self, *, relation: str = "add_or_remove", privacy_unit: str = "example", accountant: str = "pld",
        pld_discretization: float = _acc.DEFAULT_PLD_DISCRETIZATION, metadata: dict | None = None,
    ):
        if relation not in RELATIONS:
            raise InvalidParameterError("relation", relation, f"one of {sorted(RELATIONS)}")
        if accountant not in _acc.ACCOUNTANTS:
            raise InvalidParameterError("accountant", accountant, "'pld' or 'rdp'")
        if not isinstance(privacy_unit, str) or not privacy_unit:
            raise InvalidParameterError("privacy_unit", privacy_unit, "a non-empty name such as 'example' or 'patient'")
        if not (isinstance(pld_discretization, float) and 0 < pld_discretization <= 0.1):
            raise InvalidParameterError("pld_discretization", pld_discretization, "a float in (0, 0.1]")
        self.relation = relation
        self.privacy_unit = privacy_unit
        self.accountant = accountant
        self.pld_discretization = pld_discretization
        self.metadata = dict(metadata or {})
        self.versions = software_versions()
        self._entries: list[dict[str, Any]] = []  # {"event": dict, "count": int, "label": str}
        self._cache: dict[tuple, float] = {}

    # ---- composition ----
    def compose(self, event: dpe.DpEvent, count: int = 1, *, label: str = TRAIN_STEP) -> None:
        """Record ``count`` applications of ``event``; consecutive identical entries are merged."""
        if not isinstance(event, dpe.DpEvent):
            raise InvalidParameterError("event", event, "a dp_accounting DpEvent")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidParameterError("count", count, "an integer >= 0")
        if count == 0:
            return
        ev = event_to_dict(event)
        if self._entries and self._entries[-1]["event"] == ev and self._entries[-1]["label"] == label:
            self._entries[-1]["count"] += count
        else:
            self._entries.append({"event": ev, "count": count, "label": label})
        self._cache.clear()

    def extend(self, other: PrivacyLedger) -> None:
        """Compose every entry of ``other`` (same relation and unit required)."""
        if (other.relation, other.privacy_unit) != (self.relation, self.privacy_unit):
            raise InvalidParameterError(
                "ledger", f"{other.relation}/{other.privacy_unit}",
                f"{self.relation}/{self.privacy_unit} (the same neighbouring relation and privacy unit)",
            )
        for e in other._entries:
            self.compose(event_from_dict(e["event"]), e["count"], label=e["label"])

    def count(self, label: str = TRAIN_STEP) -> int:
        return sum(e["count"] for e in self._entries if e["label"] == label)

    @property
    def steps(self) -> int:
        """Number of training steps composed (entries labelled ``train_step``)."""
        return self.count(TRAIN_STEP)

    def pairs(self) -> list[tuple[dpe.DpEvent, int]]:
        """Distinct events with their total counts (composition is commutative)."""
        agg: dict[str, list] = {}
        for e in self._entries:
            key = json.dumps(e["event"], sort_keys=True)
            agg.setdefault(key, [e["event"], 0])[1] += e["count"]
        return [(event_from_dict(ev), n) for ev, n in agg.values()]

    # ---- numbers ----
    def _accountant(self, accountant: str | None) -> str:
        accountant = accountant or self.accountant
        if accountant not in _acc.ACCOUNTANTS:
            raise InvalidParameterError("accountant", accountant, "'pld' or 'rdp'")
        return accountant

    def epsilon(self, delta: float, accountant: str | None = None, *, quick: bool = False) -> float:
        """Epsilon at ``delta`` (0 for an empty ledger, inf if any event is non-private).

        ``quick=True`` uses a 10x coarser PLD grid: still a valid upper bound (pessimistic rounding),
        slightly above the final number; meant for progress displays, not for records.
        """
        accountant = self._accountant(accountant)
        d = self.pld_discretization * (10 if quick else 1)
        key = ("eps", accountant, float(delta), d)
        if key not in self._cache:
            self._cache[key] = _acc.epsilon_of(self.pairs(), delta, accountant, RELATIONS[self.relation],
                                               pld_discretization=d)
        return self._cache[key]

    def delta(self, epsilon: float, accountant: str | None = None) -> float:
        accountant = self._accountant(accountant)
        key = ("delta", accountant, float(epsilon))
        if key not in self._cache:
            self._cache[key] = _acc.delta_of(
                self.pairs(), epsilon, accountant, RELATIONS[self.relation], pld_discretization=self.pld_discretization
            )
        return self._cache[key]

    def epsilons(self, delta: float) -> dict[str, float | None]:
        """Epsilon from every accountant; ``None`` where an accountant cannot analyse the events."""
        out: dict[str, float | None] = {}
        for a in _acc.ACCOUNTANTS:
            try:
                out[a] = self.epsilon(delta, a)
            except UnsupportedAccountantError:
                out[a] = None
        return out

    def statement(self, delta: float) -> PrivacyStatement:
        """The ledger's part of the privacy statement (DESIGN invariant 5); a run adds its plan."""
        return PrivacyStatement(
            epsilon=self.epsilon(delta), delta=float(delta), accountant=self.accountant,
            accountant_version=f"dp-accounting {self.versions.get('dp-accounting')}",
            pld_discretization=self.pld_discretization if self.accountant == "pld" else None,
            neighbouring_relation=self.relation, privacy_unit=self.privacy_unit, steps=self.steps)

    # ---- persistence ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "relation": self.relation,
            "privacy_unit": self.privacy_unit,
            "accountant": self.accountant,
            "pld_discretization": self.pld_discretization,
            "metadata": self.metadata,
            "versions": self.versions,
            "entries": [dict(e) for e in self._entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LedgerFormatError(
                f"ledger format: expected {FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r}"
            )
        try:
            led = cls(relation=data["relation"], privacy_unit=data["privacy_unit"], accountant=data["accountant"],
                      pld_discretization=float(data["pld_discretization"]), metadata=data.get("metadata"))
            led.versions = dict(data.get("versions", {}))
            for e in data["entries"]:
                led.compose(event_from_dict(e["event"]), int(e["count"]), label=str(e["label"]))
        except (KeyError, TypeError) as err:
            raise LedgerFormatError(f"ledger: missing or malformed field {err}") from None
        return led

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        return cls.from_dict(read_json(path, LedgerFormatError, "ledger"))

    def __repr__(self) -> str:
        return (f"PrivacyLedger(relation={self.relation!r}, privacy_unit={self.privacy_unit!r}, "
                f"accountant={self.accountant!r}, entries={len(self._entries)}, steps={self.steps})")


