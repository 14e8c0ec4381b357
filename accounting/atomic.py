"""Atomic, durable file writes (write a temporary file, fsync, rename, fsync the directory) and one JSON reader.

Public: every dptrain module that writes a file a run depends on uses these (a crash leaves the old file or
the new one, never half of one).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


def read_json(path: str | os.PathLike, error: type[Exception], what: str) -> Any:
    """The parsed JSON of ``path``; a missing, unreadable or non-JSON file raises ``error`` with one line that
    names ``what`` and the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{what}: no file at {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what}: {path} is not valid JSON ({type(err).__name__}: {err}); it is truncated or "
                    "corrupt") from None


__all__ = ["atomic_write_bytes", "atomic_write_json", "read_json"]
