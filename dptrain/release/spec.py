"""The files of a released model (``model.json`` + ``model.safetensors``): names, format, errors, checks.

Pure Python and numpy: no torch, no jax. See :mod:`dptrain.release` for what the files hold and guarantee.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "dptrain.model/1"
RELEASE_DIR = "release"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
SPEC_KEYS = ("format", "backend", "model", "inputs", "classes", "input", "weights")
BACKENDS = ("opacus", "jax")
ONNX_TOLERANCE = 1e-5



class ReleaseError(ValueError):
    """A released model cannot be written, read or applied; the one-line message says why and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")).replace("\r", " "))


def _few(values, k: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:k])
    return f"[{shown}{', ...' if len(values) > k else ''}]"


def _check_names(expected: dict[str, tuple[int, ...]], arrays: dict[str, np.ndarray], what: str) -> None:
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ReleaseError(f"{what} do not match the model's architecture (missing {_few(missing, 3)}, "
                           f"unexpected {_few(extra, 3)}); release the weights of the model the run trained")
    bad = [k for k in sorted(expected) if tuple(arrays[k].shape) != tuple(expected[k])]
    if bad:
        k = bad[0]
        raise ReleaseError(f"{what}: {k!r} has shape {tuple(arrays[k].shape)}, the architecture needs "
                           f"{tuple(expected[k])}; release the weights of the model the run trained")


def _release_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir).expanduser()
    if (path / SPEC_FILE).is_file():
        return path
    if (path / RELEASE_DIR / SPEC_FILE).is_file():
        return path / RELEASE_DIR
    if not path.is_dir():
        raise ReleaseError(f"{path}: no such directory; give the --out of a `dptrain train` run or its "
                           f"{RELEASE_DIR}/ folder")
    if (path / "private" / "NOT-PRIVATE" / SPEC_FILE).is_file():
        raise ReleaseError(f"{path}: a NOT PRIVATE run (epsilon inf or clip_only) has no released model; its model "
                           f"is in {path / 'private' / 'NOT-PRIVATE'} (give that folder to use it in-house)")
    raise ReleaseError(f"{path}: no released model ({RELEASE_DIR}/{SPEC_FILE} is missing); give the --out of a "
                       f"finished `dptrain train` run or its {RELEASE_DIR}/ folder")


def _read_spec(folder: Path) -> dict[str, Any]:
    path = folder / SPEC_FILE
    try:
        spec = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseError(f"{path}: not valid JSON ({type(err).__name__}); the file is damaged: copy "
                           f"{RELEASE_DIR}/ again from the run") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ReleaseError(f"{path}: not a dptrain model (format {got!r}, expected {FORMAT!r}); give the "
                           f"{RELEASE_DIR}/ folder of a `dptrain train` run")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ReleaseError(f"{path}: incomplete model description (missing {missing}); copy {RELEASE_DIR}/ again "
                           "from the run")
    if spec["backend"] not in BACKENDS:
        raise ReleaseError(f"{path}: unknown backend {spec['backend']!r} (expected one of {list(BACKENDS)}); "
                           "this dptrain is too old for the model, upgrade it")
    if not isinstance(spec["input"], dict) or spec["input"].get("kind") not in ("table", "image"):
        raise ReleaseError(f"{path}: 'input' must describe a table or image input; this dptrain is too old for "
                           "the model, upgrade it")
    weights = spec["weights"]
    name = weights.get("file") if isinstance(weights, dict) else None
    if not isinstance(name, str) or name != Path(name).name or name.startswith(".") or not isinstance(
            weights.get("sha256"), str):
        raise ReleaseError(f"{path}: 'weights' must name a file in the same folder and its sha256; copy "
                           f"{RELEASE_DIR}/ again from the run")
    return spec
