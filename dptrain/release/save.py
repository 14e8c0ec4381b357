"""Writing a released model: ``model.safetensors`` (the weights) and ``model.json`` (architecture and the
declared, public input specification), each atomically. See :mod:`dptrain.release` for the guarantees.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dptrain.release.nets import _as_float32, _build_net
from dptrain.release.spec import BACKENDS, FORMAT, SPEC_FILE, WEIGHTS_FILE, ReleaseError, _check_names

if TYPE_CHECKING:
    from dptrain.config import Recipe
    from dptrain.data.tabular import TabularData


def _inputs(data: TabularData) -> int | list[int]:
    """The model's input size as ``dptrain.run.build_model`` computes it (JSON: a list for image shapes)."""
    shape = data.x_train.shape[1:]
    return int(shape[0]) if len(shape) == 1 else [int(d) for d in shape]


def _missing(info: dict[str, Any]) -> dict[str, Any]:
    """A column's declared missing-value rule (absent: refused, as in model.json files without it)."""
    return {"missing": info["missing"]} if "missing" in info else {}


def _table_spec(data: TabularData, n_inputs: int) -> dict[str, Any]:
    pre = data.preprocessing
    columns: list[dict[str, Any]] = []
    for col, info in pre.get("numeric", {}).items():
        lo, hi = info["bounds"]
        columns.append({"name": col, "type": "numeric", "bounds": [float(lo), float(hi)], "from": info["from"],
                        "transform": info["transform"], **_missing(info)})
    for col, info in pre.get("categorical", {}).items():
        columns.append({"name": col, "type": "categorical", "categories": [str(c) for c in info["categories"]],
                        "from": info["from"], "encoding": "one-hot, in the order of categories", **_missing(info)})
    width = sum((1 + (c.get("missing", {}).get("rule") == "indicator")) if c["type"] == "numeric" else len(c["categories"])
                for c in columns)
    if not (width == len(data.feature_names) == n_inputs):
        raise ReleaseError(f"release: the declared encoding gives {width} features but the model takes {n_inputs} "
                           f"({len(data.feature_names)} feature names); the data was not encoded by load_tabular")
    return {"kind": "table", "columns": columns, "features": list(data.feature_names),
            "missing_values": "per column: its declared missing rule (refuse, fill, indicator: a 0/1 column right "
                              "after the value, category)", "extra_columns": "ignored"}


def _image_spec(recipe: Recipe, data: TabularData, shape: list[int]) -> dict[str, Any]:
    from dptrain.config import ImageConfig

    pre = data.preprocessing
    image = recipe.data.image if recipe.data.image is not None else ImageConfig()
    c, h, w = shape
    lo, hi = pre["intensity"]["range"]
    declared = recipe.data.image is not None and recipe.data.image.intensity is not None
    return {"kind": "image", "size": int(h), "channels": int(c),
            "intensity": {"range": [float(lo), float(hi)], "declared": declared, "from": pre["intensity"]["from"],
                          "transform": pre["intensity"]["transform"]},
            "path_column": image.path_column, "paths": "relative to the manifest's folder",
            "channels_rule": pre["channels"]["rule"], "resize": pre["resize"]["method"],
            "layout": "(n, channels, size, size) float32 in [0, 1]"}


def save_release_model(release_dir: Path, recipe: Recipe, data: TabularData, weights: dict[str, np.ndarray]) -> None:
    """Write ``release_dir/model.safetensors`` and ``release_dir/model.json`` (each atomically).

    ``weights``: a trainer's ``release_weights()``. They are checked against the architecture of
    ``recipe.model`` before anything is written. Only declared, public facts of ``data`` are used."""
    from safetensors.numpy import save

    from accounting.atomic import atomic_write_bytes

    backend = recipe.trainer.backend
    if recipe.model.name == "causal_lm":
        raise ReleaseError("release: causal_lm models are released by `dptrain synth`, not as a classifier")
    if backend not in BACKENDS:
        raise ReleaseError(f"release: unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    inputs = _inputs(data)
    spec_input = (_table_spec(data, inputs) if isinstance(inputs, int) else _image_spec(recipe, data, inputs))
    arrays = {str(k): _as_float32(np.asarray(v), str(k)) for k, v in weights.items()}
    model_cfg = recipe.model.model_dump(mode="json")
    net = _build_net(backend, recipe.model, inputs, len(data.classes))
    _check_names(net.shapes(), arrays, "release: the weights")
    blob = save(arrays)
    spec = {"format": FORMAT, "backend": backend, "model": model_cfg, "inputs": inputs,
            "classes": [str(c) for c in data.classes], "input": spec_input,
            "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest()}}
    text = json.dumps(spec, indent=1, allow_nan=False) + "\n"
    release_dir = Path(release_dir)
    atomic_write_bytes(release_dir / WEIGHTS_FILE, blob)
    atomic_write_bytes(release_dir / SPEC_FILE, text.encode())
