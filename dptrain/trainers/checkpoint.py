"""Checkpoints: one atomic file, verified on load, loaded without executing code.

Format: ``torch.save`` bytes of a dict of tensors and plain values, then a 32-byte SHA-256 of those
bytes, then the 8-byte magic ``DPTCKPT1``. Loading checks magic and digest before
``torch.load(weights_only=True)``: a truncated or tampered file is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from accounting._io import atomic_write_bytes

MAGIC = b"DPTCKPT1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, payload + hashlib.sha256(payload).digest() + MAGIC)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: no file at {path}; nothing to resume (run without --resume)") from None
    if len(blob) < 40 or blob[-8:] != MAGIC:
        raise CheckpointError(f"checkpoint {path}: truncated or not a dptrain checkpoint; refusing to load it")
    payload, digest = blob[:-40], blob[-40:-8]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch (tampered or corrupt); refusing to load it")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means: refuse
        raise CheckpointError(f"checkpoint {path}: cannot be loaded safely ({type(err).__name__})") from None
