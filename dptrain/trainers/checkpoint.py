"""Checkpoints: one atomic file, verified before it is parsed, read without executing code (no pickle, no torch).

Layout (integers little-endian)::

    b"DPTCKPT2"   8 bytes   magic and format version
    H             8 bytes   length of the JSON header
    header        H bytes   UTF-8 JSON: {"format": "dptrain.checkpoint/2", "tree": TREE}
    arrays        ...       a safetensors blob holding every numpy array of the saved value
    sha256        32 bytes  SHA-256 of every byte before it

``TREE`` is the saved value with each numpy array replaced by ``{"$array": NAME}``, NAME being the array's
JSON Pointer in the value (RFC 6901: "~" written "~0", "/" written "~1") and its key in the safetensors blob.
Dict keys starting with "$" are stored with one more "$" (a key "$array" cannot pass for a reference);
non-finite floats are stored as ``{"$float": "nan" | "inf" | "-inf"}`` (the header is strict JSON).

What round-trips: dicts with str keys, lists, str, int, float, bool, None, and numpy arrays of bool,
(u)int8-64 and float16/32/64 of any shape (0-d included). Sharp edges: tuples come back as lists, numpy
scalars as Python numbers, arrays as fresh writable copies; anything else (a torch tensor, a non-str key,
an object) is refused by ``save_checkpoint`` with TypeError: trainers convert their state first.

Guarantees: the file is replaced atomically (temp file, fsync, rename); ``load_checkpoint`` checks the magic
and the digest over the whole file before parsing anything, and refuses a missing, truncated, tampered,
foreign (e.g. a ``torch.save`` checkpoint of an older dptrain) or malformed file with one
:class:`CheckpointError` line naming the file and the problem. The digest detects damage, not forgery:
whoever can write the file can recompute it. The file holds the secret DP seed: keep it in private/.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from accounting.atomic import atomic_write_bytes

MAGIC = b"DPTCKPT2"
FORMAT = "dptrain.checkpoint/2"
LEGACY_MAGIC = b"DPTCKPT1"  # trailer of the torch.save format (dptrain <= 0.1), never loaded
_DIGEST = 32
_MIN_SIZE = len(MAGIC) + 8 + _DIGEST
_DTYPES = frozenset(np.dtype(t) for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                          "uint64", "float16", "float32", "float64"))


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the one-line message names the file and says what is wrong."""


def _pointer(path: tuple[str, ...]) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path)


def _encode(value: Any, path: tuple[str, ...], arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.generic):
        return _encode(value.item(), path, arrays)  # numpy scalar -> Python number
    if isinstance(value, np.ndarray):
        if value.dtype not in _DTYPES:
            raise TypeError(f"checkpoint: {_pointer(path) or '/'} has dtype {value.dtype}; store one of "
                            f"{sorted(str(d) for d in _DTYPES)}")
        name = _pointer(path)
        arrays[name] = value if value.flags.c_contiguous else value.copy(order="C")  # (keeps 0-d arrays 0-d)
        return {"$array": name}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint: {_pointer(path) or '/'} has a {type(k).__name__} key {k!r}; keys "
                                "must be str")
            out["$" + k if k.startswith("$") else k] = _encode(v, (*path, k), arrays)
        return out
    if isinstance(value, (list, tuple)):
        return [_encode(v, (*path, str(i)), arrays) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"checkpoint: {_pointer(path) or '/'} is a {type(value).__module__}.{type(value).__name__}; "
                    "store numpy arrays and plain values only")


def _decode(node: Any, arrays: dict[str, np.ndarray], used: set[str]) -> Any:
    if isinstance(node, list):
        return [_decode(v, arrays, used) for v in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"$array"}:
        name = node["$array"]
        if not isinstance(name, str) or name not in arrays:
            raise ValueError(f"the header refers to an array {name!r} that is not stored")
        used.add(name)
        return np.array(arrays[name])  # a writable copy, independent of the file's buffer
    if set(node) == {"$float"}:
        if node["$float"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"unknown $float value {node['$float']!r}")
        return float(node["$float"])
    if any(k.startswith("$") and not k.startswith("$$") for k in node):
        raise ValueError(f"unknown reserved key among {sorted(node)[:3]}")
    return {k[1:] if k.startswith("$") else k: _decode(v, arrays, used) for k, v in node.items()}


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (a dict; see the module docstring for what it may hold) to ``path`` atomically."""
    from safetensors.numpy import save

    if not isinstance(state, dict):
        raise TypeError(f"checkpoint: expected a dict, got {type(state).__name__}")
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(state, (), arrays)
    header = json.dumps({"format": FORMAT, "tree": tree}, allow_nan=False, separators=(",", ":")).encode()
    body = MAGIC + len(header).to_bytes(8, "little") + header + save(arrays)
    atomic_write_bytes(path, body + hashlib.sha256(body).digest())


def load_checkpoint(path: str | Path) -> dict:
    """The dict saved at ``path``, after verifying the whole file; :class:`CheckpointError` if anything is off."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: no file at {path}; nothing to resume (run without --resume)") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path}: is a directory, not a checkpoint file; refusing to load "
                              "it") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({err.strerror or type(err).__name__})") from None

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {what}; refusing to load it")

    if blob.endswith(LEGACY_MAGIC):
        raise refuse("written by an older dptrain in the torch/pickle format, which is no longer loaded; finish the "
                     "run with the dptrain version that started it, or start a new run")
    if len(blob) < _MIN_SIZE or not blob.startswith(MAGIC):
        raise refuse("truncated or not a dptrain checkpoint")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise refuse("checksum mismatch (truncated, tampered or corrupt)")
    size = int.from_bytes(body[8:16], "little")
    start = len(MAGIC) + 8
    if size > len(body) - start:
        raise refuse("malformed (the header length exceeds the file)")
    try:
        header = json.loads(body[start:start + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise refuse(f"malformed header (not JSON: {type(err).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("tree"), dict):
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise refuse(f"unknown format {got!r} (expected {FORMAT!r})")
    from safetensors.numpy import load

    try:
        arrays = load(body[start + size:])
    except Exception as err:  # noqa: BLE001 - any reader failure means: refuse, in one line
        raise refuse(f"malformed array section ({type(err).__name__})") from None
    used: set[str] = set()
    try:
        state = _decode(header["tree"], arrays, used)
    except (ValueError, TypeError, RecursionError) as err:
        raise refuse(f"malformed header ({err})") from None
    if set(arrays) - used:
        raise refuse(f"malformed (arrays not referenced by the header: {sorted(set(arrays) - used)[:3]})")
    return state


__all__ = ["CheckpointError", "FORMAT", "load_checkpoint", "save_checkpoint"]
