"""A dataset's total privacy budget, spanning every run on that dataset (DESIGN invariant 6).

A budget is keyed to the dataset's *identity* (a string the caller derives, e.g. ``builtin:NAME``,
``sha256:<digest of the source file>`` or ``id:<declared id>``) and lives in one place:
``budget_path(dataset_id)`` = ``$DPTRAIN_HOME/budgets/<slug>-<sha256(id)[:16]>.json`` (default home
``~/.dptrain``), whatever directory a run writes its outputs to.

The budget file (JSON) holds the dataset id, the total (epsilon, delta), the accountant, relation and
privacy unit, and one ledger per run. ``reserve_run`` is what a training run calls: under one hold
of the exclusive lock on ``<file>.lock`` it creates the budget if the run declares one and none
exists, and composes the run's *planned* spending with everything already recorded, refusing the
run (``BudgetExceededError``, nothing written) if the total would exceed the budget; a run that
stops early may ``settle`` to what it actually spent (never more than reserved).

Guarantees: every run on a dataset that has a budget is charged, whether or not it declares one;
create-and-reserve is one locked, atomic write (two first runs cannot overwrite each other); a
refused run leaves no trace (not even a new budget file); resuming a reserved run id charges nothing.

Sharp edges: the budget's delta (and epsilon) are fixed when it is created; every run is composed at
the budget's delta, whatever its own. The lock is ``flock``: sound on one machine's local disk, not
across machines on network filesystems. Identity is only as good as its key: a declared id is
trusted, and an edited file without a declared id is a new dataset with a fresh budget.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .errors import BudgetExceededError, InvalidParameterError, LedgerFormatError, check_delta, check_epsilon
from .ledger import PrivacyLedger

FORMAT = "dptrain.dataset-budget/1"


def budget_home() -> Path:
    """``$DPTRAIN_HOME`` if set and non-empty, else ``~/.dptrain``."""
    home = os.environ.get("DPTRAIN_HOME")
    return Path(home) if home else Path.home() / ".dptrain"


def budget_path(dataset_id: str, home: Path | None = None) -> Path:
    """Where the budget of ``dataset_id`` lives: ``home/budgets/<slug>-<sha256(id)[:16]>.json``.

    The slug is a readable, filesystem-safe short form of the id; the hash keeps distinct ids apart.
    """
    if not isinstance(dataset_id, str) or not dataset_id:
        raise InvalidParameterError("dataset_id", dataset_id, "a non-empty string",
                                    "e.g. 'builtin:actg175', 'sha256:<hex>' or 'id:<name>'")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset_id).strip("._-")[:40].rstrip("._-") or "dataset"
    digest = hashlib.sha256(dataset_id.encode("utf-8")).hexdigest()[:16]
    return Path(home if home is not None else budget_home()) / "budgets" / f"{slug}-{digest}.json"


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``<path>.lock`` (parent directories are created first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LedgerFormatError(f"budget: no file at {path}; create it with DatasetBudget.create") from None
    except json.JSONDecodeError as err:
        raise LedgerFormatError(f"budget: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise LedgerFormatError(f"budget format: expected {FORMAT!r}, got {got!r}")
    return data


def _new_data(*, epsilon: float, delta: float, relation: str, privacy_unit: str, accountant: str,
              dataset: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": FORMAT, "epsilon": float(epsilon), "delta": float(delta), "accountant": accountant,
        "relation": relation, "privacy_unit": privacy_unit, "runs": {},
    }
    if dataset is not None:
        data["dataset"] = dataset
    return data


class DatasetBudget:
    def __init__(self, path: str | Path, *, _data: dict[str, Any] | None = None):
        self.path = Path(path)
        data = _data if _data is not None else self._read()
        self.epsilon: float = data["epsilon"]
        self.delta: float = data["delta"]
        self.accountant: str = data["accountant"]
        self.relation: str = data["relation"]
        self.privacy_unit: str = data["privacy_unit"]
        self.dataset: str | None = data.get("dataset")  # absent in budgets written before it was recorded

    @classmethod
    def create(
        cls, path: str | Path, *, epsilon: float, delta: float, relation: str = "add_or_remove",
        privacy_unit: str = "example", accountant: str = "pld", exist_ok: bool = False,
        dataset: str | None = None,
    ) -> DatasetBudget:
        """Create the budget file; with ``exist_ok`` open an existing one with the same parameters.

        The existence check and the write happen under the budget's lock, so concurrent creators
        never overwrite each other (or a reservation made in between).
        """
        path = Path(path)
        check_epsilon(epsilon, "budget.epsilon")
        check_delta(delta, "budget.delta")
        PrivacyLedger(relation=relation, privacy_unit=privacy_unit, accountant=accountant)  # validates
        with _exclusive(path):
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
                        f"{b.relation}/{b.privacy_unit}/{b.accountant}",
                        "a dataset has one budget; it cannot be changed")
                return b
            data = _new_data(epsilon=epsilon, delta=delta, relation=relation, privacy_unit=privacy_unit,
                             accountant=accountant, dataset=dataset)
            atomic_write_json(path, data)
            return cls(path, _data=data)

    def _read(self) -> dict[str, Any]:
        return _read_file(self.path)

    @contextmanager
    def _locked(self):
        with _exclusive(self.path):
            yield self._read()

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
                "runs against one dataset budget must share the neighbouring relation and privacy unit; "
                f"run with relation {self.relation!r} and privacy unit {self.privacy_unit!r} ({self.path})",
            )

    def _reserve_into(self, data: dict[str, Any], run_id: str, planned: PrivacyLedger) -> tuple[float, bool]:
        """Add the run to ``data`` (in memory) if it fits; returns (total epsilon after, whether added)."""
        runs = data["runs"]
        if run_id in runs:
            return self._total(runs).epsilon(self.delta), False  # resuming: already reserved
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
        return after, True

    def reserve(self, run_id: str, planned: PrivacyLedger) -> float:
        """Reserve a run's planned spending; returns the total epsilon after it. Refuses overspending."""
        self._check_compatible(planned)
        with self._locked() as data:
            after, added = self._reserve_into(data, run_id, planned)
            if added:
                atomic_write_json(self.path, data)
            return after

    def cancel(self, run_id: str) -> bool:
        """Remove a reservation of a run that released nothing and never trained (e.g. refused after it
        reserved). Only a ``reserved`` entry can be cancelled; returns whether one was removed. The caller
        guarantees nothing of the run was released."""
        with self._locked() as data:
            entry = data["runs"].get(run_id)
            if entry is None or entry.get("status") != "reserved":
                return False
            del data["runs"][run_id]
            atomic_write_json(self.path, data)
            return True

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


def reserve_run(
    dataset_id: str, run_id: str, planned: PrivacyLedger, *, delta: float,
    declared_epsilon: float | None = None, home: Path | None = None,
) -> DatasetBudget | None:
    """Charge a run to its dataset's budget, creating the budget if the run declares one.

    Under one hold of the budget's lock: no budget and nothing declared -> ``None`` (nothing written);
    no budget and ``declared_epsilon`` -> create it (``delta``; relation, privacy unit and accountant
    from ``planned``) with this run reserved, in one write; an existing budget -> reserve the run
    (a declared epsilon must equal the budget's). A run id already reserved is a resume: not charged
    again. Overspending raises ``BudgetExceededError`` and writes nothing. Returns the budget, so the
    caller can ``settle(run_id, actual)`` later. ``delta`` only matters when the budget is created: a
    run is composed at the budget's delta.
    """
    if not isinstance(run_id, str) or not run_id:
        raise InvalidParameterError("run_id", run_id, "a non-empty string")
    if not isinstance(planned, PrivacyLedger):
        raise InvalidParameterError("planned", planned, "a PrivacyLedger of the run's planned spending")
    check_delta(delta, "delta")
    if declared_epsilon is not None:
        check_epsilon(declared_epsilon, "privacy.dataset_budget")
    path = budget_path(dataset_id, home)
    with _exclusive(path):
        if not path.exists():
            if declared_epsilon is None:
                return None
            data = _new_data(epsilon=declared_epsilon, delta=delta, relation=planned.relation,
                             privacy_unit=planned.privacy_unit, accountant=planned.accountant, dataset=dataset_id)
            budget = DatasetBudget(path, _data=data)
            budget._reserve_into(data, run_id, planned)  # raises before anything is written
            atomic_write_json(path, data)
            return budget
        data = _read_file(path)
        budget = DatasetBudget(path, _data=data)
        if budget.dataset is not None and budget.dataset != dataset_id:
            raise LedgerFormatError(
                f"budget: {path} belongs to dataset {budget.dataset!r}, not {dataset_id!r}; "
                "the file was moved or edited by hand; restore it or move it aside"
            )
        if declared_epsilon is not None and float(declared_epsilon) != budget.epsilon:
            raise InvalidParameterError(
                "privacy.dataset_budget", declared_epsilon,
                f"the dataset's existing budget epsilon={budget.epsilon} ({path})",
                f"a dataset has one budget; remove privacy.dataset_budget or set it to {budget.epsilon}",
            )
        budget._check_compatible(planned)
        _, added = budget._reserve_into(data, run_id, planned)
        if added:
            atomic_write_json(path, data)
        return budget
