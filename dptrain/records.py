"""The run record (``private/record.json``): one typed value for every command, sharing the statement.

Every command's record has the same common part -- format, command, status, recipe name, run id, the
:class:`~accounting.statement.PrivacyStatement`, the data section, the per-epoch training log, whether the
secret checkpoint was kept, software versions and the files on each side of the release boundary -- and a
command's own sections (``train``: metrics, training, audit, model_files; ``synth``: label_counts, model,
generation, synthetic_stats, evaluation, timing_seconds) kept as they are written.

Sharp edge: the record is PRIVATE (it holds metrics on real records and exact counts); only the statement
inside it is publishable, and it is also written alone to ``release/privacy.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accounting.atomic import atomic_write_json, read_json
from accounting.errors import LedgerFormatError
from accounting.statement import PrivacyStatement
from dptrain.values import jsonable

FORMAT = "dptrain.run-record/2"
COMMON = ("format", "command", "status", "recipe", "run_id", "privacy", "data", "training_log", "checkpoint_kept",
          "versions", "files")


class RecordError(ValueError):
    """A record.json that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class RunRecord:
    command: str
    recipe: str
    run_id: str
    privacy: PrivacyStatement
    data: dict[str, Any]
    training_log: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)  # the command's own sections
    status: str = "finished"
    checkpoint_kept: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        clash = set(self.sections) & set(COMMON)
        if clash:
            raise ValueError(f"record sections {sorted(clash)} clash with the common fields")

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"format": FORMAT, "command": self.command, "status": self.status, "recipe": self.recipe,
                         "run_id": self.run_id, "privacy": self.privacy.to_dict(), "data": self.data,
                         "training_log": self.training_log, "checkpoint_kept": self.checkpoint_kept,
                         "versions": self.versions, "files": self.files, **self.sections})

    @classmethod
    def from_dict(cls, d: Any, where: str = "record") -> RunRecord:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise RecordError(f"{where}: not a dptrain run record (format {got!r}, expected {FORMAT!r}); "
                              "give the --out of a finished run of this dptrain version")
        try:
            privacy = PrivacyStatement.from_dict(d["privacy"])
            return cls(command=str(d["command"]), recipe=str(d["recipe"]), run_id=str(d["run_id"]), privacy=privacy,
                       data=dict(d["data"]), training_log=list(d.get("training_log") or []),
                       sections={k: v for k, v in d.items() if k not in COMMON}, status=str(d["status"]),
                       checkpoint_kept=bool(d.get("checkpoint_kept", False)), versions=dict(d.get("versions") or {}),
                       files=dict(d.get("files") or {}))
        except (KeyError, TypeError, ValueError, LedgerFormatError) as err:
            raise RecordError(f"{where}: malformed run record ({err}); the file was edited or is corrupt") from None

    def __getitem__(self, key: str) -> Any:
        """A command's section by name (``record["metrics"]``, ``record["evaluation"]``)."""
        return self.sections[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.sections.get(key, default)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        return cls.from_dict(read_json(path, RecordError, "run record"), str(path))

__all__ = ["FORMAT", "RecordError", "RunRecord"]
