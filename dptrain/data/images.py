"""Image manifests: a table of image files (PNG / JPEG / BMP, DICOM, NIfTI) read with MONAI; split by unit.

A **manifest** (``.csv`` / ``.parquet``, needs ``data.image``) has one row per image, with the image path
(``data.image.path_column``, relative to the manifest's folder), the label (``data.label``), optionally a
patient column (``data.privacy_unit``) and sensitive attributes (``data.sensitive``). PNG / JPEG / BMP,
DICOM and NIfTI files are read with ``monai.transforms.LoadImage`` (:mod:`dptrain.data.pixels`).

**Paths are confined to the manifest's folder** by default: every entry, relative or absolute, is resolved
('..' and every symbolic link followed) and must lie inside the manifest's (resolved) folder or a subfolder;
an entry that escapes it (``../x.png``, ``/elsewhere/x.png``, a link pointing outside) is refused before any
pixel is read, and the resolved path is the one read. A recipe that means to read images elsewhere opts out
with ``data.image.allow_outside: true`` (paths are then used as written, relative ones from the folder).

It is one of three image sources; :func:`dptrain.data.load.load_images` picks the source (manifest, a
MedMNIST ``.npz``: :mod:`dptrain.data.medmnist`, or a built-in: :mod:`dptrain.data.image_builtins`) and
returns the same :class:`~dptrain.data.core.TabularData` container as tables, with ``x_*`` float32 of shape
(n, C, H, W) in [0, 1].

Formal guarantees (towards invariant 4 of DESIGN.md)
----------------------------------------------------
* Each image is preprocessed from its own pixels and declared public facts only (:mod:`dptrain.data.pixels`).
* The train / validation / test split depends only on the split seed, the declared fractions and the set
  of privacy-unit ids (the same rule as tables, :mod:`dptrain.data.core`), so every image of a patient lands
  on one side.
* Class names and their number come from declarations only (``data.classes`` or the positive label,
  :mod:`dptrain.data.labels`); they are never read from the labels, and labels outside the declared classes
  are refused. More than two declared classes make a multi-class label (softmax over the classes).

Sharp edges
-----------
* Without ``data.privacy_unit`` every image is its own privacy unit: the guarantee is per image, and a
  patient with several images is protected less. The loader warns when a manifest has a column that looks
  like a patient id (or DICOM files carry PatientID tags) but ``data.privacy_unit`` is not set.
* Error messages follow the rule of :mod:`dptrain.data.core`: they may name file paths and label values,
  never counts, row numbers, pixel values or a reader's own message.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dptrain.data.core import (
    TabularData,
    _assemble,
    _canon,
    _error,
    _reader_failure,
    check_split_trainable,
    read_table,
)
from dptrain.data.labels import GENERIC_DERIVED, _encode_label, _sensitive_frame
from dptrain.data.pixels import (
    _CHANNELS,
    _DICOM_SUFFIXES,
    _NIFTI_SUFFIXES,
    _ORIENTATION,
    _PIL_SUFFIXES,
    _READERS,
    _RESIZE,
    _SCALE,
    _VOLUMES,
    FROM_FORMAT,
    FROM_RECIPE,
    _format,
    _intensity_error,
    _one_torch_thread,
    _Post,
    _Reader,
)
from dptrain.data.registry import IMAGE_BUILTINS

if TYPE_CHECKING:
    from dptrain.config import DataConfig

PATIENT_LIKE = ("patient_id", "patient", "subject_id", "patientid")


def _read_manifest(source: str) -> tuple[pd.DataFrame, Path]:
    path = Path(source).expanduser()
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise _error("data.source", f"{source!r} is neither builtin:NAME, a .npz file nor a .csv / .parquet "
                     "manifest", "list the images in a CSV manifest (one row per image: path, label, ...), "
                     f"or use one of: {', '.join('builtin:' + n for n in IMAGE_BUILTINS)}")
    if path.is_dir():
        raise _error("data.source", f"{str(path)!r} is a directory, not a manifest",
                     "give the path of a .csv / .parquet manifest (one row per image: path, label, ...)")
    if not path.is_file():
        raise _error("data.source", f"no manifest at {str(path)!r}",
                     "check the path (relative paths are taken from the working directory)")
    frame = read_table(path, "data.source", "CSV / Parquet manifest")
    return frame, path.resolve().parent


def _entry(raw: str, source: str) -> str:
    """Where a manifest entry is: its path as written in the manifest (never a row number)."""
    return f"the image {raw!r} listed in {source}"


def _image_path(raw: str, folder: Path, source: str, allow_outside: bool) -> Path:
    """The file of a manifest entry: relative paths are taken from the manifest's (resolved) ``folder``. Unless
    ``allow_outside``, the path with '..' and every symbolic link resolved must lie inside ``folder`` (absolute
    paths too), and the resolved path is the one read."""
    p = Path(raw).expanduser()
    p = p if p.is_absolute() else folder / p
    if allow_outside:
        return p
    real = p.resolve()
    if not real.is_relative_to(folder):
        raise _error("data.image.path_column", f"{_entry(raw, source)} is outside the manifest's folder "
                     f"{str(folder)!r} (after resolving '..' and symbolic links)",
                     "move the images into the manifest's folder (or a subfolder of it), or set "
                     "data.image.allow_outside: true to read images anywhere")
    return real


def _patient_warning(frame: pd.DataFrame, paths: Sequence[Path], formats: Sequence[str]) -> str | None:
    for col in frame.columns:
        if str(col).lower() in PATIENT_LIKE:
            return (f"the manifest has a {str(col)!r} column but data.privacy_unit is not set: the guarantee is "
                    f"per image, not per patient; set data.privacy_unit: {col}")
    for path, fmt in zip(paths, formats, strict=True):
        if fmt == "dicom" and _dicom_patient_id(path):
            return ("the DICOM files carry PatientID tags but data.privacy_unit is not set: the guarantee is per "
                    "image, not per patient; add a patient column to the manifest and set data.privacy_unit")
    return None


def _dicom_patient_id(path: Path) -> bool:
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # unreadable headers are reported when the pixels are read
        return False
    return bool(str(ds.get("PatientID", "") or "").strip())


def _load_manifest(cfg: DataConfig, *, seed: int, check: bool = False) -> TabularData:
    """The manifest's images, split by unit. ``check``: refuse data that cannot train a classifier
    (:func:`~dptrain.data.core.check_trainable`) before any pixel is read."""
    if cfg.image is None:
        raise _error("data.image", f"{cfg.source!r} is read as a table because data.image is not set",
                     "set data.image (e.g. data.image: {size: 64, channels: 1}) to read it as a manifest of "
                     "images, or use data.numeric / data.categorical for a table")
    image = cfg.image
    frame, folder = _read_manifest(cfg.source)
    cols = ", ".join(map(str, frame.columns))
    if cfg.label is None:
        raise _error("data.label", f"no label column given for the manifest {cfg.source!r}",
                     f"set data.label to one of the columns: {cols}")
    used: dict[str, str] = {image.path_column: "data.image.path_column", cfg.label: "data.label"}
    if cfg.privacy_unit is not None:
        used.setdefault(cfg.privacy_unit, "data.privacy_unit")
    sensitive = list(cfg.sensitive or [])
    for name in sensitive:
        if name in GENERIC_DERIVED and name not in frame.columns:
            used.setdefault(GENERIC_DERIVED[name].source, "data.sensitive")
        else:
            used.setdefault(name, "data.sensitive")
    for col, field_name in used.items():
        if col not in frame.columns:
            raise _error(field_name, f"column {col!r} is not in the manifest {cfg.source!r}",
                         f"use one of the available columns: {cols}")
    nans = frame[list(used)].isna().any()
    for col, some in nans.items():
        if some:
            raise _error(used[col], f"column {col!r} has missing values",
                         "fill them in or drop those rows from the manifest")
    frame = frame.reset_index(drop=True)

    # Resolve and check every path before reading any pixels.
    raws, paths, formats = frame[image.path_column].astype(str).tolist(), [], []
    for raw in raws:
        p = _image_path(raw, folder, cfg.source, image.allow_outside)
        fmt = _format(p)
        if fmt is None:
            raise _error("data.image.path_column", f"{_entry(raw, cfg.source)} is not a supported image file",
                         f"use {', '.join(_PIL_SUFFIXES + _DICOM_SUFFIXES + _NIFTI_SUFFIXES)} files")
        paths.append(p)
        formats.append(fmt)
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        i = missing[0]
        raise _error("data.image.path_column", f"{_entry(raws[i], cfg.source)}: no image at {str(paths[i])!r}"
                     + (" (and other files are missing)" if len(missing) > 1 else ""),
                     f"relative paths are taken from the manifest's folder {str(folder)!r}; fix the paths")
    if image.intensity is None:
        for fmt in ("dicom", "nifti"):
            if fmt in formats:
                raise _intensity_error(fmt)
        intensity, origin = (0.0, 255.0), FROM_FORMAT
    else:
        intensity, origin = (float(image.intensity[0]), float(image.intensity[1])), FROM_RECIPE

    y, classes, label_info = _encode_label(frame, cfg.label, cfg.positive_label, None, cfg.classes)
    if cfg.privacy_unit is None:
        unit_keys = np.arange(len(frame))
    else:
        unit_keys = frame[cfg.privacy_unit].map(_canon).to_numpy(dtype=str)
    if check:  # before any pixel is read
        check_split_trainable(cfg, y, unit_keys, classes, seed=seed)
    sens, sensitive_info = _sensitive_frame(frame, sensitive, GENERIC_DERIVED)

    warning = _patient_warning(frame, paths, formats) if cfg.privacy_unit is None else None
    if warning is not None:
        warnings.warn(warning, UserWarning, stacklevel=3)

    reader, post = _Reader(), _Post(image.size, image.channels, intensity)
    x = np.empty((len(frame), image.channels, image.size, image.size), dtype=np.float32)
    volumes = False
    with _one_torch_thread():
        for i, (p, fmt) in enumerate(zip(paths, formats, strict=True)):
            try:
                raw = reader(p, fmt)
            except Exception as exc:  # any reader failure becomes one clear line
                raise _error("data.image.path_column", f"{_entry(raws[i], cfg.source)}: could not read "
                             f"{str(p)!r} ({_reader_failure(exc)})",
                             "check that the file is a valid, uncorrupted image") from None
            if fmt == "pil" and not raw.eight_bit and image.intensity is None:
                raise _intensity_error(str(raw.mode))
            volumes |= raw.volume
            x[i] = post(raw.pixels, _entry(raws[i], cfg.source))

    used_formats = sorted(set(formats))
    notes = []
    if volumes:
        notes.append(_VOLUMES)
    preprocessing = {
        "source": cfg.source,
        "kind": "image manifest",
        "reader": {"library": f"monai {_monai_version()}: LoadImage(image_only=True), EnsureChannelFirst",
                   "formats": {fmt: _READERS[fmt] for fmt in used_formats},
                   "paths": f"column {image.path_column!r}, relative to the manifest's folder"},
        "orientation": {fmt: _ORIENTATION[fmt] for fmt in used_formats},
        "channels": {"output": image.channels, "rule": _CHANNELS[image.channels]},
        "resize": {"size": [image.size, image.size], "method": _RESIZE},
        "intensity": {"range": list(intensity), "from": origin,
                      "transform": _SCALE,
                      "output": [0.0, 1.0]},
        "label": label_info,
        "sensitive": sensitive_info,
        "notes": notes,
    }
    if warning is not None:
        preprocessing["warning"] = warning
    return _assemble(cfg, x, y, classes, unit_keys, sens, preprocessing, seed=seed)


def _monai_version() -> str:
    import monai

    return monai.__version__


# _format, _one_torch_thread, _Post and _Reader are imported from here by dptrain.release.
__all__ = ["PATIENT_LIKE"]
