"""The released model of a run: ``release/model.safetensors`` + ``release/model.json``, and how to apply it.

A hospital's first question after training is "apply the model to new records". This module writes the
model in a form that can be shared (plain weights and public facts, nothing secret) and reads it back
without a trainer, Opacus or the training data::

    from dptrain.release import load_model, predict
    model = load_model("runs/actg-eps4")              # a run directory, or its release/ folder
    scores = model.predict_file("new_patients.csv")   # one row per input row: score or prob_<class>
    predict("runs/actg-eps4", "new_patients.csv", "scores.csv")

What is in release/model.*
--------------------------
* ``model.safetensors``: the trained weights and nothing else (no optimiser state, step counter, seed or
  metadata), float32, named as the framework names them: torch ``state_dict`` keys (opacus backend, e.g.
  ``0.weight``) or flax parameter paths joined with ``/`` (jax backend, e.g. ``Dense_0/kernel``; variables
  of another flax collection ``C`` would be ``C/path``). With ``training.ema`` these are the moving-average
  weights, the ones the run evaluated.
* ``model.json``: ``format`` (``dptrain.model/1``), ``backend``, ``model`` (the recipe's model section),
  ``inputs`` (encoded features of a table, or the image shape ``[C, H, W]``), ``classes`` (declared class
  names; ``classes[1]`` is the positive class of a binary model), ``input`` (the public input
  specification) and ``weights`` (``file`` and its ``sha256``). ``input`` is, for tables, ``columns``: the
  columns in encoding order, each ``numeric`` with its declared ``bounds`` or ``categorical`` with its
  declared ``categories``, and ``features``: the names of the encoded columns; for images, ``size``,
  ``channels``, the ``intensity`` range (declared, or fixed by the 8-bit format) and the manifest's
  ``path_column``.

Formal guarantee
----------------
The weights are the output of the DP training run (an EMA of the DP iterates is itself post-processing),
so by the post-processing property of DP the weights, and anything computed from them and public inputs
alone (scores of new records, an ONNX export), carry the run's (epsilon, delta) guarantee for the training
records, per privacy unit, as stated in the run's privacy statement. ``model.json`` holds only the
recipe's model section and declared public facts (bounds, categories, class names, image size and range):
no count, no statistic of the data, no split, no seed. The secret DP noise seed stays in the private
checkpoint: with it the noise could be regenerated and subtracted, which would void the guarantee.

Sharp edges
-----------
* A non-private baseline (``privacy.epsilon: inf``) or a ``clip_only`` run writes the same files: the
  weights carry no guarantee then. The run's privacy statement says which; model.json does not repeat it.
* The guarantee is about the *training* records. Scores of new records are computed from those records;
  sharing them discloses what they disclose about the new patients.
* Encoding follows training exactly: numeric values outside the declared bounds are clipped silently,
  categorical values must be among the declared categories, and missing values are refused (the model has
  no rule for them). Columns are matched by name; extra columns are ignored.
* The sha256 detects a damaged or altered weights file, not a forgery: whoever can write both files can
  replace the model. Sign or checksum release/ out of band where that matters.
* Image models read and resize images with MONAI and torch (as training did), also for a jax model; a
  jax table model needs neither torch nor Opacus.
* ONNX export (:func:`export_onnx`, extra ``onnx``) takes encoded inputs and returns probabilities; the
  encoding (``model.encode``) is not part of the ONNX graph. Jax models are exported through their torch
  twin (MLP and logistic regression, checked numerically); a jax CNN is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from dptrain.config import ModelConfig, Recipe
    from dptrain.data.tabular import TabularData

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


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def flax_weight_dict(params, others=None) -> dict[str, np.ndarray]:
    """Flax variables -> {name: float32 array}: ``params`` paths joined with "/", other collections ``C/path``."""
    from flax import traverse_util

    out: dict[str, np.ndarray] = {}
    trees = [("params", params), *sorted((others or {}).items())]
    for collection, tree in trees:
        for path, value in traverse_util.flatten_dict(dict(tree)).items():
            name = "/".join(path) if collection == "params" else "/".join((collection, *path))
            if name in out:
                raise ReleaseError(f"weights: the name {name!r} is used twice (a module named like the flax "
                                   f"collection {collection!r}); rename the module")
            out[name] = _as_float32(np.asarray(value), name)
    return out


def _as_float32(arr: np.ndarray, name: str) -> np.ndarray:
    """Floating point -> float32; integer buffers (none in the built-in models) are kept as they are."""
    if np.issubdtype(arr.dtype, np.floating):
        return np.ascontiguousarray(arr, dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return np.ascontiguousarray(arr)
    raise ReleaseError(f"weights: {name!r} has dtype {arr.dtype}, expected floating point weights")


def _inputs(data: TabularData) -> int | list[int]:
    """The model's input size as ``dptrain.run.build_model`` computes it (JSON: a list for image shapes)."""
    shape = data.x_train.shape[1:]
    return int(shape[0]) if len(shape) == 1 else [int(d) for d in shape]


def _table_spec(data: TabularData, n_inputs: int) -> dict[str, Any]:
    pre = data.preprocessing
    columns: list[dict[str, Any]] = []
    for col, info in pre.get("numeric", {}).items():
        lo, hi = info["bounds"]
        columns.append({"name": col, "type": "numeric", "bounds": [float(lo), float(hi)], "from": info["from"],
                        "transform": info["transform"]})
    for col, info in pre.get("categorical", {}).items():
        columns.append({"name": col, "type": "categorical", "categories": [str(c) for c in info["categories"]],
                        "from": info["from"], "encoding": "one-hot, in the order of categories"})
    width = sum(1 if c["type"] == "numeric" else len(c["categories"]) for c in columns)
    if not (width == len(data.feature_names) == n_inputs):
        raise ReleaseError(f"release: the declared encoding gives {width} features but the model takes {n_inputs} "
                           f"({len(data.feature_names)} feature names); the data was not encoded by load_tabular")
    return {"kind": "table", "columns": columns, "features": list(data.feature_names),
            "missing_values": "refused", "extra_columns": "ignored"}


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

    from accounting._io import atomic_write_bytes

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


# --------------------------------------------------------------------------------------------------
# The networks (no trainer, no Opacus; torch and jax are imported only for their own backend)
# --------------------------------------------------------------------------------------------------


class _TorchNet:
    def __init__(self, cfg: ModelConfig, inputs, num_classes: int):
        try:
            import torch

            from dptrain.models.torch_models import build_torch_model
        except ImportError as err:
            raise ReleaseError(f"this model needs torch ({err}); pip install 'dptrain[torch]'") from None
        self.torch = torch
        with torch.random.fork_rng(devices=[]):  # the initial values are replaced; the global RNG is untouched
            torch.manual_seed(0)
            self.module = build_torch_model(cfg, inputs if isinstance(inputs, int) else tuple(inputs), num_classes)
        self.module.train(False)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.module.state_dict().items()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        torch = self.torch
        state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        self.module.load_state_dict(state, strict=True)  # copies into the module's own dtypes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.no_grad():
            for start in range(0, len(x), 1024):  # as OpacusTrainer.predict
                logits = self.module(torch.from_numpy(np.ascontiguousarray(x[start:start + 1024])).float())
                out.append(torch.softmax(logits, dim=-1).numpy())
        return np.concatenate(out)


class _FlaxNet:
    def __init__(self, cfg: ModelConfig, inputs, num_classes: int):
        try:
            import jax
            import jax.numpy as jnp
            from flax import traverse_util

            from dptrain.models.flax_models import build_flax_model
        except ImportError as err:
            raise ReleaseError(f"this model needs jax and flax ({err}); pip install 'dptrain[jax]'") from None
        self.jax, self.jnp, self.tu = jax, jnp, traverse_util
        self.model = model = build_flax_model(cfg, inputs if isinstance(inputs, int) else tuple(inputs), num_classes)
        self.dtype = jnp.dtype(getattr(model, "input_dtype", "float32"))
        probe = jnp.zeros((1, *model.input_shape), self.dtype)
        self._struct = jax.eval_shape(lambda: dict(model.init(jax.random.key(0), probe)))
        self._names: dict[str, tuple[str, tuple[str, ...]]] = {}
        for collection in sorted(self._struct, key=lambda c: c != "params"):
            for path in traverse_util.flatten_dict(dict(self._struct[collection])):
                name = "/".join(path) if collection == "params" else "/".join((collection, *path))
                self._names[name] = (collection, path)
        self.variables = None

        def predict(variables, x):
            return jax.nn.softmax(model.apply(variables, x).astype(jnp.float32), axis=-1)

        self._predict = jax.jit(predict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        flat = {c: self.tu.flatten_dict(dict(t)) for c, t in self._struct.items()}
        return {name: tuple(flat[c][p].shape) for name, (c, p) in self._names.items()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        struct = {c: self.tu.flatten_dict(dict(t)) for c, t in self._struct.items()}
        flat: dict[str, dict] = {c: {} for c in self._struct}
        for name, (c, path) in self._names.items():
            flat[c][path] = self.jnp.asarray(arrays[name], struct[c][path].dtype)
        self.variables = {c: self.tu.unflatten_dict(v) for c, v in flat.items()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), 4096):  # as JaxTrainer.predict: padded to a power of two
            part = x[start:start + 4096]
            pad = (1 << max(0, math.ceil(math.log2(max(len(part), 1))))) - len(part)
            padded = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)]) if pad else part
            probs = self._predict(self.variables, self.jnp.asarray(padded, self.dtype))
            out.append(np.asarray(probs)[: len(part)])
        return np.concatenate(out)


def _build_net(backend: str, cfg: ModelConfig, inputs, num_classes: int):
    try:
        return (_TorchNet if backend == "opacus" else _FlaxNet)(cfg, inputs, num_classes)
    except ValueError as err:
        if isinstance(err, ReleaseError):
            raise
        raise ReleaseError(f"model.json: the model section cannot be built ({err})") from None


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


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


def load_model(run_dir: str | Path) -> ReleasedModel:
    """The released model of a run directory (or of its ``release/`` folder), its weights verified."""
    from dptrain.config import ModelConfig

    folder = _release_dir(run_dir)
    spec = _read_spec(folder)
    try:
        cfg = ModelConfig.model_validate_json(json.dumps(spec["model"]))
    except ValueError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise ReleaseError(f"{folder / SPEC_FILE}: the model section is not valid ({first[0].strip()}); "
                           "this dptrain may be older than the one that trained the model") from None
    inputs = spec["inputs"]
    classes = spec["classes"]
    if not (isinstance(inputs, int) or (isinstance(inputs, list) and all(isinstance(d, int) for d in inputs))) or \
            not isinstance(classes, list) or len(classes) < 2:
        raise ReleaseError(f"{folder / SPEC_FILE}: 'inputs' or 'classes' is malformed; copy {RELEASE_DIR}/ again "
                           "from the run")
    wpath = folder / spec["weights"]["file"]
    try:
        blob = wpath.read_bytes()
    except FileNotFoundError:
        raise ReleaseError(f"{wpath}: missing (model.json refers to it); copy {RELEASE_DIR}/ again from the "
                           "run") from None
    if hashlib.sha256(blob).hexdigest() != spec["weights"]["sha256"]:
        raise ReleaseError(f"{wpath}: its sha256 differs from the one in model.json (the weights were damaged "
                           f"or altered); refusing to use them: copy {RELEASE_DIR}/ again from the run")
    from safetensors.numpy import load

    try:
        arrays = load(blob)
    except Exception as err:  # any reader failure becomes one line
        raise ReleaseError(f"{wpath}: not a readable safetensors file ({type(err).__name__}); copy "
                           f"{RELEASE_DIR}/ again from the run") from None
    net = _build_net(spec["backend"], cfg, inputs, len(classes))
    _check_names(net.shapes(), arrays, f"{wpath}: the weights")
    net.load(arrays)
    return ReleasedModel(folder, spec, cfg, net)


class ReleasedModel:
    """A released classifier: ``encode`` raw records by the declared public encoding, ``predict_proba``."""

    def __init__(self, folder: Path, spec: dict[str, Any], cfg: ModelConfig, net):
        self.path = folder
        self.spec = spec
        self.model_config = cfg
        self._net = net

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    @property
    def backend(self) -> str:
        return self.spec["backend"]

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.spec["input"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one encoded example: (features,) or (channels, size, size)."""
        inputs = self.spec["inputs"]
        return (inputs,) if isinstance(inputs, int) else tuple(inputs)

    @property
    def is_image(self) -> bool:
        return self.input_spec.get("kind") == "image"

    def __repr__(self) -> str:
        return (f"ReleasedModel({self.model_config.name}, backend={self.backend}, inputs={self.input_shape}, "
                f"classes={self.classes})")

    # ---- inference ----
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (n, len(classes)) of already-encoded inputs (see :meth:`encode`)."""
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise ReleaseError(f"predict_proba: expected encoded inputs of shape (n, {', '.join(map(str, self.input_shape))}), "
                               f"got {x.shape}; encode raw records with model.encode(frame) first")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ReleaseError(f"predict_proba: expected numbers, got dtype {x.dtype}; encode raw records with "
                               "model.encode(frame) first")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ReleaseError("predict_proba: the inputs contain NaN or infinite values; encoded inputs are "
                               "always finite (model.encode refuses missing values)")
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return self._net(x)

    def encode(self, frame: pd.DataFrame, root: str | Path | None = None) -> np.ndarray:
        """Raw records -> model inputs, by the declared public encoding of model.json.

        Tables: columns matched by name (extra ones ignored); numeric values clipped to the declared bounds and
        mapped to [-1, 1], categorical ones one-hot over the declared categories, exactly as in training.
        Images: ``frame`` is a manifest whose path column holds image paths, relative to ``root`` (default:
        the working directory)."""
        if not isinstance(frame, pd.DataFrame):
            raise ReleaseError(f"encode: expected a pandas DataFrame of records, got {type(frame).__name__}")
        if self.is_image:
            return self._encode_images(frame, Path.cwd() if root is None else Path(root))
        return self._encode_table(frame)

    def _encode_table(self, frame: pd.DataFrame) -> np.ndarray:
        from dptrain.data.tabular import DataError, _canon, _encode_categorical, _encode_numeric

        columns = self.input_spec["columns"]
        names = [c["name"] for c in columns]
        missing = [n for n in names if n not in frame.columns]
        if missing:
            more = f" ({len(missing)} missing: {_few(missing)})" if len(missing) > 1 else ""
            raise ReleaseError(f"column {missing[0]!r} is missing from the input{more}; fix: add it (the model "
                               f"needs the columns {_few(names, 20)}; extra columns are ignored)")
        for n in names:
            na = frame[n].isna().to_numpy()
            if na.any():
                raise ReleaseError(f"column {n!r} has {int(na.sum())} missing value(s) (first at row "
                                   f"{int(np.flatnonzero(na)[0])}); fix: fill them in or drop those rows (the model "
                                   "has no rule for missing values)")
        blocks = []
        for c in columns:
            n = c["name"]
            if c["type"] == "numeric":
                lo, hi = c["bounds"]
                try:
                    blocks.append(_encode_numeric(frame, n, (float(lo), float(hi)))[:, None])
                except DataError:
                    bad = frame[n][pd.to_numeric(frame[n], errors="coerce").isna()]
                    raise ReleaseError(f"column {n!r} has non-numeric values like {_few(sorted(set(map(str, bad))))}; "
                                       f"fix: give numbers (they are clipped to the declared bounds [{lo}, {hi}])") from None
            elif c["type"] == "categorical":
                cats = [str(v) for v in c["categories"]]
                unknown = sorted(set(frame[n].map(_canon)) - set(cats))
                if unknown:
                    raise ReleaseError(f"column {n!r} has values {_few(unknown)} outside the model's categories "
                                       f"{cats}; fix: map them to one of these categories or drop those rows (the "
                                       "model was trained on the declared categories only)")
                blocks.append(_encode_categorical(frame, n, tuple(cats)))
            else:
                raise ReleaseError(f"model.json: column {n!r} has an unknown type {c['type']!r}; this dptrain is "
                                   "too old for the model, upgrade it")
        x = np.concatenate(blocks, axis=1).astype(np.float32) if blocks else np.zeros((len(frame), 0), np.float32)
        if x.shape[1:] != self.input_shape:
            raise ReleaseError(f"model.json: the encoding gives {x.shape[1]} features but the model takes "
                               f"{self.input_shape[0]}; copy {RELEASE_DIR}/ again from the run")
        return x

    def _encode_images(self, frame: pd.DataFrame, root: Path) -> np.ndarray:
        from dptrain.data.images import _format, _one_torch_thread, _Post, _Reader
        from dptrain.data.tabular import DataError

        spec = self.input_spec
        col = spec["path_column"]
        if col not in frame.columns:
            raise ReleaseError(f"column {col!r} (the image paths) is missing from the manifest; fix: add it, one "
                               f"image path per row, relative to the manifest's folder (columns: "
                               f"{_few(list(map(str, frame.columns)), 12)})")
        na = frame[col].isna().to_numpy()
        if na.any():
            raise ReleaseError(f"column {col!r} has {int(na.sum())} missing path(s) (first at row "
                               f"{int(np.flatnonzero(na)[0])}); fix: fill them in or drop those rows")
        paths, formats = [], []
        for i, raw in enumerate(frame[col].astype(str)):
            p = Path(raw).expanduser()
            p = p if p.is_absolute() else root / p
            fmt = _format(p)
            if fmt is None:
                raise ReleaseError(f"row {i}: {raw!r} is not a supported image file; fix: use PNG, JPEG, BMP, "
                                   "DICOM or NIfTI files")
            if not p.is_file():
                raise ReleaseError(f"row {i}: no image at {str(p)!r}; fix: relative paths are taken from the "
                                   f"manifest's folder {str(root)!r}")
            paths.append(p)
            formats.append(fmt)
        lo, hi = spec["intensity"]["range"]
        size, channels = int(spec["size"]), int(spec["channels"])
        x = np.empty((len(paths), channels, size, size), dtype=np.float32)
        if not paths:
            return x
        reader, post = _Reader(), _Post(size, channels, (float(lo), float(hi)))
        with _one_torch_thread():
            for i, (p, fmt) in enumerate(zip(paths, formats, strict=True)):
                try:
                    raw = reader(p, fmt)
                except Exception as exc:  # any reader failure becomes one clear line
                    raise ReleaseError(f"row {i}: could not read {str(p)!r} ({type(exc).__name__}); fix: check "
                                       "that the file is a valid, uncorrupted image") from None
                if not spec["intensity"]["declared"] and not raw.eight_bit:
                    raise ReleaseError(f"row {i}: {str(p)!r} is not an 8-bit image, but the model's intensity "
                                       f"range [{lo:g}, {hi:g}] is that of 8-bit images; fix: give 8-bit PNG / "
                                       "JPEG images, as in training")
                try:
                    x[i] = post(raw.pixels, f"row {i}")
                except DataError as err:
                    raise ReleaseError(str(err).split(": ", 1)[-1]) from None
        return x

    def predict_file(self, path: str | Path) -> pd.DataFrame:
        """Scores of a CSV / Parquet table of records (image models: a manifest whose path column is relative
        to the manifest's folder), one row per input row, in input order: ``score`` (probability of
        ``classes[1]``) for a binary model, else ``prob_<class>`` per class."""
        frame, root = _read_table(Path(path))
        return scores_frame(self.predict_proba(self.encode(frame, root)), self.classes)


def scores_frame(probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """``score`` = P(classes[1]) for two classes, else one ``prob_<class>`` column per class (as predictions.parquet)."""
    if len(classes) == 2:
        return pd.DataFrame({"score": probs[:, 1]})
    return pd.DataFrame({f"prob_{c}": probs[:, i] for i, c in enumerate(classes)})


def _read_table(path: Path) -> tuple[pd.DataFrame, Path]:
    """A CSV / Parquet table and the folder relative image paths are taken from."""
    from dptrain.data.tabular import DataError, _read_file

    path = path.expanduser()
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise ReleaseError(f"{path}: expected a .csv or .parquet table of records; convert the file")
    if not path.is_file():
        raise ReleaseError(f"{path}: no such file; check the path")
    try:
        frame = _read_file(str(path))
    except DataError:
        raise ReleaseError(f"{path}: could not be read as a table; check that it is a valid CSV / Parquet "
                           "file") from None
    return frame, path.resolve().parent


def _check_out(out: Path, suffix: str, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.is_dir():
        example = out / ("scores.csv" if suffix == ".csv" else "model" + suffix)
        raise ReleaseError(f"--out {out}: is a directory; give a file name, e.g. {example}")
    if out.suffix.lower() != suffix:
        raise ReleaseError(f"--out {out}: expected a file name ending in {suffix}")
    if out.exists() and not overwrite:
        raise ReleaseError(f"--out {out}: a file is already there; choose another --out (nothing is overwritten)")
    if out.parent.exists() and not out.parent.is_dir():
        raise ReleaseError(f"--out {out}: {out.parent} is not a directory")
    return out


def predict(run_dir: str | Path, data: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Score the records of ``data`` (CSV / Parquet; image models: a manifest) with the released model of
    ``run_dir`` and write the scores to the CSV ``out`` atomically; returns ``out``."""
    from accounting._io import atomic_write_bytes

    out = _check_out(Path(out), ".csv", overwrite)
    scores = load_model(run_dir).predict_file(data)
    atomic_write_bytes(out, scores.to_csv(index=False).encode())
    return out


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter)
        import torch
    except ImportError as err:
        raise ReleaseError(f"ONNX export needs the onnx extra ({err}); pip install 'dptrain[onnx]'") from None
    return torch, onnx, onnxruntime


def _torch_twin(model: ReleasedModel):
    """The torch model of a jax MLP / logistic regression, with the flax weights (kernels transposed)."""
    from torch import nn

    cfg = model.model_config
    if cfg.name not in ("mlp", "logistic"):
        raise ReleaseError(f"ONNX export of a jax {cfg.name} model is not supported yet (only mlp and logistic "
                           "have an exact torch twin); train with trainer.backend: opacus to export it")
    net = _TorchNet(cfg, model.input_shape[0], len(model.classes))
    params = model._net.variables["params"]
    if set(model._net.variables) != {"params"}:
        raise ReleaseError("ONNX export: this jax model has non-trainable variables; not supported yet")
    linears = [m for m in net.module if isinstance(m, nn.Linear)]
    if len(linears) != len(params):
        raise ReleaseError("ONNX export: the jax and torch models differ in depth; not supported yet")
    arrays = {}
    for lin, dense in zip(linears, [params[f"Dense_{j}"] for j in range(len(params))], strict=True):
        idx = list(net.module).index(lin)
        arrays[f"{idx}.weight"] = np.asarray(dense["kernel"]).T
        arrays[f"{idx}.bias"] = np.asarray(dense["bias"])
    net.load(arrays)
    return net.module


def export_onnx(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Export the released model of ``run_dir`` to ONNX at ``out`` (atomically); returns ``out``.

    The graph takes the encoded inputs (``input``: float32 (batch, ...), dynamic batch) and returns the class
    probabilities (``probabilities``: (batch, classes)); the export is checked with onnxruntime against
    :meth:`ReleasedModel.predict_proba` (max abs difference <= 1e-5) before it is written. Jax models are
    exported through their torch twin (mlp, logistic); a jax cnn is refused."""
    out = _check_out(Path(out), ".onnx", overwrite)
    torch, onnx, ort = _onnx_modules()
    from torch import nn

    from accounting._io import atomic_write_bytes

    model = load_model(run_dir)
    module = model._net.module if model.backend == "opacus" else _torch_twin(model)
    wrapped = nn.Sequential(module, nn.Softmax(dim=-1)).train(False)
    probe = np.random.default_rng(0).uniform(0.0 if model.is_image else -1.0, 1.0,
                                             size=(5, *model.input_shape)).astype(np.float32)
    expected = model.predict_proba(probe)
    with torch.no_grad():
        twin = torch.softmax(module(torch.from_numpy(probe)), dim=-1).numpy()
    if np.max(np.abs(twin - expected)) > ONNX_TOLERANCE:
        raise ReleaseError(f"ONNX export: the torch model differs from the released model by "
                           f"{np.max(np.abs(twin - expected)):.2g}; not exported")
    quiet = logging.getLogger("torch.onnx")  # the exporter logs skipped torchvision ops, irrelevant here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export internals
            program = torch.onnx.export(wrapped, (torch.from_numpy(probe[:2]),), input_names=["input"],
                                        output_names=["probabilities"], dynamo=True, external_data=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as err:  # the exporter's failures are long; one line
        raise ReleaseError(f"ONNX export failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    for key, value in (("dptrain.format", FORMAT), ("dptrain.classes", json.dumps(model.classes)),
                       ("dptrain.input", json.dumps(model.input_spec)), ("dptrain.weights_sha256",
                                                                        model.spec["weights"]["sha256"])):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    blob = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(blob))
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"input": probe})[0]
    if np.max(np.abs(got - expected)) > ONNX_TOLERANCE:
        raise ReleaseError(f"ONNX export: onnxruntime differs from the released model by "
                           f"{np.max(np.abs(got - expected)):.2g}; not exported")
    atomic_write_bytes(out, blob)
    return out


__all__ = ["FORMAT", "ReleaseError", "ReleasedModel", "export_onnx", "flax_weight_dict", "load_model", "predict",
           "save_release_model", "scores_frame"]
