"""A dataset's total privacy budget, spanning every run on that dataset (DESIGN invariant 6).

The budget file (JSON) holds the total (epsilon, delta), the accountant, relation and privacy unit,
and one ledger per run. ``reserve`` composes a run's *planned* spending with everything already
recorded and refuses the run (``BudgetExceededError``, file untouched) if the total would exceed the
budget; a run that stops early may ``settle`` to what it actually spent (never more than reserved).
Concurrent runs are serialised with an exclusive lock on ``<file>.lock``.
"""

from __future__ import annotations

import fcntl
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._io import atomic_write_json
from .errors import BudgetExceededError, InvalidParameterError, LedgerFormatError, check_delta, check_epsilon
from .ledger import PrivacyLedger

FORMAT = "dptrain.dataset-budget/1"


class DatasetBudget:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = self._read()
        self.epsilon: float = data["epsilon"]
        self.delta: float = data["delta"]
        self.accountant: str = data["accountant"]
        self.relation: str = data["relation"]
        self.privacy_unit: str = data["privacy_unit"]

    @classmethod
    def create(
        cls, path: str | Path, *, epsilon: float, delta: float, relation: str = "add_or_remove",
        privacy_unit: str = "example", accountant: str = "pld", exist_ok: bool = False,
    ) -> DatasetBudget:
        path = Path(path)
        check_epsilon(epsilon, "budget.epsilon")
        check_delta(delta, "budget.delta")
        PrivacyLedger(relation=relation, privacy_unit=privacy_unit, accountant=accountant)  # validates
        if path.exists():
            if not exist_ok:
                raise InvalidParameterError("budget", str(path), "a path with no budget file yet",
                                            "open the existing budget with DatasetBudget(path)")
            b = cls(path)
            if (b.epsilon, b.delta, b.relation, b.privacy_unit, b.accountant) != (
                    epsilon, delta, relation, privacy_unit, accountant):
                raise InvalidParameterError(
                    "budget", f"epsilon={epsilon}, delta={delta}, {relation}/{privacy_unit}/{accountant}",
                    f"the existing budget's epsilon={b.epsilon}, delta={b.delta}, "
                    f"{b.relation}/{b.privacy_unit}/{b.accountant}", "a dataset has one budget; it cannot be changed")
            return b
        atomic_write_json(path, {
            "format": FORMAT, "epsilon": float(epsilon), "delta": float(delta), "accountant": accountant,
            "relation": relation, "privacy_unit": privacy_unit, "runs": {},
        })
        return cls(path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise LedgerFormatError(f"budget: no file at {self.path}; create it with DatasetBudget.create") from None
        except json.JSONDecodeError as err:
            raise LedgerFormatError(f"budget: {self.path} is not valid JSON ({err})") from None
        if data.get("format") != FORMAT:
            raise LedgerFormatError(f"budget format: expected {FORMAT!r}, got {data.get('format')!r}")
        return data

    @contextmanager
    def _locked(self):
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _total(self, runs: dict[str, Any]) -> PrivacyLedger:
        total = PrivacyLedger(relation=self.relation, privacy_unit=self.privacy_unit, accountant=self.accountant)
        for rec in runs.values():
            total.extend(PrivacyLedger.from_dict(rec["ledger"]))
        return total

    def spent(self) -> float:
        """Epsilon (at the budget's delta) of everything reserved or spent so far."""
        with self._locked() as data:
            return self._total(data["runs"]).epsilon(self.delta)

    def runs(self) -> dict[str, Any]:
        with self._locked() as data:
            return {k: {"status": v["status"]} for k, v in data["runs"].items()}

    def _check_compatible(self, ledger: PrivacyLedger) -> None:
        if (ledger.relation, ledger.privacy_unit) != (self.relation, self.privacy_unit):
            raise InvalidParameterError(
                "run ledger", f"{ledger.relation}/{ledger.privacy_unit}",
                f"the budget's {self.relation}/{self.privacy_unit}",
                "runs against one dataset budget must share the neighbouring relation and privacy unit",
            )

    def reserve(self, run_id: str, planned: PrivacyLedger) -> float:
        """Reserve a run's planned spending; returns the total epsilon after it. Refuses overspending."""
        self._check_compatible(planned)
        with self._locked() as data:
            runs = data["runs"]
            if run_id in runs:
                return self._total(runs).epsilon(self.delta)  # resuming: already reserved
            trial = self._total(runs)
            before = trial.epsilon(self.delta)
            trial.extend(planned)
            after = trial.epsilon(self.delta)
            if after > self.epsilon or math.isnan(after):
                raise BudgetExceededError(
                    f"budget: run {run_id!r} would bring dataset spending to epsilon={after:.4g} "
                    f"(already spent {before:.4g}) at delta={self.delta:g}, over the dataset's total "
                    f"epsilon={self.epsilon:g} ({self.path}); lower privacy.epsilon, train fewer steps, "
                    "or use a dataset with budget left. Nothing was written."
                )
            runs[run_id] = {"status": "reserved", "ledger": planned.to_dict()}
            atomic_write_json(self.path, data)
            return after

    def settle(self, run_id: str, actual: PrivacyLedger) -> None:
        """Replace a reservation by what the run actually spent (must not exceed the reservation)."""
        self._check_compatible(actual)
        with self._locked() as data:
            if run_id not in data["runs"]:
                raise InvalidParameterError("run_id", run_id, "a run reserved in this budget")
            reserved = PrivacyLedger.from_dict(data["runs"][run_id]["ledger"])
            if actual.epsilon(self.delta) > reserved.epsilon(self.delta) + 1e-12:
                raise BudgetExceededError(
                    f"budget: run {run_id!r} spent epsilon={actual.epsilon(self.delta):.4g}, more than the "
                    f"{reserved.epsilon(self.delta):.4g} it reserved; this is a bug, please report it"
                )
            data["runs"][run_id] = {"status": "settled", "ledger": actual.to_dict()}
            atomic_write_json(self.path, data)
