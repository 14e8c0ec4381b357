"""The run directory: its two sides (the release boundary, DESIGN invariant 8), its files, and its checks.

See :mod:`dptrain.lifecycle` for the layout and ``docs/run-directory.md`` for every file. This module only
names paths and inspects or cleans a directory; ``Session`` (lifecycle) decides when to write.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RELEASE, PRIVATE = "release", "private"
CHECKPOINT = "checkpoint.dptckpt"  # dptrain.trainers.checkpoint's format: arrays + JSON + SHA-256, no pickle
LEGACY_CHECKPOINT = "checkpoint.pt"  # an older dptrain's torch.save checkpoint: never loaded, removed with the secrets
KEPT_CHECKPOINT_NOTE = "CHECKPOINT-HOLDS-SECRET-DP-SEED.txt"


def _is_temp(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")


def recipe_hash(config_text: str) -> str:
    import hashlib

    return hashlib.sha256(config_text.encode()).hexdigest()


class RunError(ValueError):
    """The run cannot start or resume; the message says why and what to do."""


@dataclass
class RunResult:
    """``record``: private/record.json as written (JSON); ``run_record``: the same, typed."""

    out_dir: Path
    record: dict[str, Any]

    @property
    def run_record(self):
        from dptrain.records import RunRecord

        return RunRecord.from_dict(self.record, str(self.out_dir))


class RunDir:
    """Paths of one run directory (see the module docstring for what lives where)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.release = self.root / RELEASE
        self.private = self.root / PRIVATE

    def __getattr__(self, name: str) -> Path:  # rd.checkpoint, rd.record, ... -> the file's path
        places = {"checkpoint": (PRIVATE, CHECKPOINT), "record": (PRIVATE, "record.json"),
                  "state": (PRIVATE, "state.json"), "metrics": (PRIVATE, "metrics.jsonl"),
                  "run_id_file": (PRIVATE, "run_id"), "statement": (RELEASE, "privacy.json"),
                  "ledger": (RELEASE, "ledger.json"), "config": (RELEASE, "config.yaml")}
        if name not in places:
            raise AttributeError(name)
        side, file = places[name]
        return self.root / side / file

    def finished_record(self) -> dict[str, Any] | None:
        if not self.record.exists():
            return None
        from accounting.atomic import read_json

        record = read_json(self.record, RunError, "run record")
        if not isinstance(record, dict):
            raise RunError(f"run record: {self.record} is not a run record (a JSON {type(record).__name__}); restore "
                           "it or choose another --out")
        return record

    def started(self) -> bool:
        """A run began here: its state, config, checkpoint or record exists (``start`` writes config.yaml and
        state.json before any training)."""
        return any(p.exists() for p in (self.state, self.config, self.checkpoint, self.record,
                                        self.private / LEGACY_CHECKPOINT))

    def only_skeleton(self) -> bool:
        """Nothing but what an attempt that never started leaves: the two folders, private/run_id (its budget
        reservation's key), temporary files of killed atomic writes."""
        if not self.root.is_dir():
            return False
        if any(c.name not in (RELEASE, PRIVATE) for c in self.root.iterdir()):
            return False
        for p in self.root.rglob("*"):
            if p.is_dir() or _is_temp(p) or p == self.run_id_file:
                continue
            return False
        return True

    def clean_temp(self) -> None:
        """Remove temporary files that killed atomic writes left behind (one may hold a copy of the seed)."""
        for side in (self.release, self.private):
            if side.is_dir():
                for p in side.rglob(".*.tmp"):
                    p.unlink(missing_ok=True)

    def probe_writable(self) -> None:
        """Refuse an --out we cannot create files in (a file, read-only, /proc, ...) before any work."""
        out = self.root
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out}: is a file, not a directory; choose another --out")
        parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise RunError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dptrain-probe-", dir=parent))
        except OSError as err:
            raise RunError(f"--out {out}: cannot create files in {parent} ({err.strerror or err}); choose another "
                           "--out") from None

    def check(self, resume: bool) -> dict[str, Any] | None:
        """Refuse to overwrite a run or to write where we cannot; on ``resume`` of a finished run return its
        record (nothing to do). A directory holding only an attempt that never started (killed before
        config.yaml and state.json were written) is reused by a new run or a resume alike."""
        out = self.root
        self.probe_writable()
        record = self.finished_record()
        if record is not None and not resume:
            raise RunError(f"--out {out}: a finished run is already there; choose another --out")
        if record is not None:
            if not record.get("checkpoint_kept"):
                self.remove_secrets()  # a crash after the record was written may have left the seed behind
            self.clean_temp()
            return record
        # an earlier attempt that was killed before it started (folders, run_id, temp files; nothing else)
        unstarted = out.is_dir() and any(out.iterdir()) and not self.started() and self.only_skeleton()
        if out.exists() and any(out.iterdir()) and not resume and not unstarted:
            raise RunError(f"--out {out}: directory is not empty (an interrupted run?); pass --resume or another --out")
        if resume and not self.started() and not unstarted:
            raise RunError(f"--resume: no interrupted run in {out}; start a new run without --resume")
        self.clean_temp()
        return None

    def remove_secrets(self) -> None:
        """Delete the checkpoint (the secret DP seed), an older dptrain's ``checkpoint.pt`` and any temporary copy a
        killed atomic write left behind."""
        for name in (CHECKPOINT, LEGACY_CHECKPOINT):
            (self.private / name).unlink(missing_ok=True)
            for tmp in self.private.glob(f".{name}*"):
                tmp.unlink(missing_ok=True)

    def make(self) -> None:
        self.release.mkdir(parents=True, exist_ok=True)
        self.private.mkdir(parents=True, exist_ok=True)

    def read_state(self) -> dict[str, Any] | None:
        if not self.state.exists():
            return None
        from accounting.atomic import read_json

        state = read_json(self.state, RunError, "run state")
        if not isinstance(state, dict) or "unit_count" not in state:
            raise RunError(f"run state: {self.state} is not dptrain run state (no unit_count); the file was edited: "
                           "restore it or start a new run")
        return state

    def run_id(self) -> str | None:
        try:
            return self.run_id_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def files(self) -> dict[str, list[str]]:
        """Relative paths of every file on each side of the boundary."""
        return {side: sorted(str(p.relative_to(self.root / side)) for p in (self.root / side).rglob("*")
                             if p.is_file()) for side in (RELEASE, PRIVATE) if (self.root / side).exists()}


__all__ = ["CHECKPOINT", "KEPT_CHECKPOINT_NOTE", "LEGACY_CHECKPOINT", "PRIVATE", "RELEASE", "RunDir", "RunError",
           "RunResult", "recipe_hash"]
