"""Reading and applying a released model: ``load_model`` (weights verified), ``ReleasedModel`` (encode raw
records by the declared public encoding, predict), ``predict`` (score a file). See :mod:`dptrain.release`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dptrain.release.nets import _build_net
from dptrain.release.spec import (
    RELEASE_DIR,
    SPEC_FILE,
    ReleaseError,
    _check_names,
    _few,
    _read_spec,
    _release_dir,
)

if TYPE_CHECKING:
    from dptrain.config import ModelConfig


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
        from dptrain.data.tabular import (
            DataError,
            _apply_missing,
            _canon,
            _encode_categorical,
            _encode_numeric,
        )

        columns = self.input_spec["columns"]
        names = [c["name"] for c in columns]
        missing = [n for n in names if n not in frame.columns]
        if missing:
            more = f" ({len(missing)} missing: {_few(missing)})" if len(missing) > 1 else ""
            raise ReleaseError(f"column {missing[0]!r} is missing from the input{more}; fix: add it (the model "
                               f"needs the columns {_few(names, 20)}; extra columns are ignored)")
        rules = {c["name"]: c.get("missing", {"rule": "refuse"}) for c in columns}  # older model.json: refuse
        for n in names:
            na = frame[n].isna().to_numpy()
            if na.any() and rules[n]["rule"] == "refuse":
                raise ReleaseError(f"column {n!r} has {int(na.sum())} missing value(s) (first at row "
                                   f"{int(np.flatnonzero(na)[0])}); fix: fill them in or drop those rows (the model "
                                   "declares no rule for missing values in this column)")
        blocks = []
        for c in columns:
            n = c["name"]
            filled, indicator = _apply_missing(frame[n], rules[n])  # the declared rule, as in training
            if c["type"] == "numeric":
                lo, hi = c["bounds"]
                try:
                    blocks.append(_encode_numeric(filled.to_frame(n), n, (float(lo), float(hi)))[:, None])
                    if indicator is not None:
                        blocks.append(indicator[:, None])
                except DataError:
                    bad = frame[n][pd.to_numeric(frame[n], errors="coerce").isna()]
                    raise ReleaseError(f"column {n!r} has non-numeric values like {_few(sorted(set(map(str, bad))))}; "
                                       f"fix: give numbers (they are clipped to the declared bounds [{lo}, {hi}])") from None
            elif c["type"] == "categorical":
                cats = [str(v) for v in c["categories"]]
                unknown = sorted(set(filled.map(_canon)) - set(cats))
                if unknown:
                    raise ReleaseError(f"column {n!r} has values {_few(unknown)} outside the model's categories "
                                       f"{cats}; fix: map them to one of these categories or drop those rows (the "
                                       "model was trained on the declared categories only)")
                blocks.append(_encode_categorical(filled.to_frame(n), n, tuple(cats)))
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
    from dptrain.data.core import DataError, read_table

    path = path.expanduser()
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise ReleaseError(f"{path}: expected a .csv or .parquet table of records; convert the file")
    if path.is_dir():
        raise ReleaseError(f"{path}: is a directory; give a .csv or .parquet table of records")
    if not path.is_file():
        raise ReleaseError(f"{path}: no such file; check the path")
    try:  # empty, binary or non-UTF-8, unreadable, no records, duplicate column names: one line naming the file
        frame = read_table(path, "--data")
    except DataError as err:
        raise ReleaseError(str(err)) from None
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
    from accounting.atomic import atomic_write_bytes

    out = _check_out(Path(out), ".csv", overwrite)
    scores = load_model(run_dir).predict_file(data)
    atomic_write_bytes(out, scores.to_csv(index=False).encode())
    return out
