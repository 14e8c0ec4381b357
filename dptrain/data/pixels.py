"""What every image source shares: per-image preprocessing from declared facts, and reading one file with MONAI.

Used by :mod:`~dptrain.data.images` (manifests), :mod:`~dptrain.data.medmnist` and
:mod:`~dptrain.data.image_builtins`; ``dptrain.release`` preprocesses a released model's inputs with the same
steps (it imports them from :mod:`dptrain.data.images`).

Formal guarantees (towards invariant 4 of DESIGN.md)
----------------------------------------------------
* Each image is preprocessed from its own pixels and *declared* public facts only: the target size and
  channels from the recipe, and the intensity range from the recipe (``data.image.intensity``) or from the
  file format (8-bit PNG / JPEG: [0, 255]). No mean, standard deviation, min / max, percentile or histogram
  of any image or of the data set is computed. Changing one image never changes how another is encoded.
* DICOM and NIfTI values have no format-given range (Hounsfield units, scanner units): a declared range
  is required, and the loader refuses to guess one from the data.

Sharp edge: images are stretched to ``size x size``: the aspect ratio is not preserved (nothing is cropped).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dptrain.data.core import DataError, _error

if TYPE_CHECKING:
    from dptrain.config import DataConfig

FROM_RECIPE = "declared in recipe (data.image.intensity)"
FROM_FORMAT = "8-bit image format: pixel values are 0..255 by definition"
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PIL_8BIT = ("L", "LA", "RGB", "RGBA")

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
# Sources without patient ids (MedMNIST, built-ins)
# --------------------------------------------------------------------------------------------------


def _no_units_or_sensitive(cfg: DataConfig, what: str) -> None:
    if cfg.privacy_unit is not None:
        raise _error("data.privacy_unit", f"{what} has no patient ids, so each image is its own privacy unit",
                     "remove data.privacy_unit (or use a manifest with a patient column)")
    if cfg.sensitive:
        raise _error("data.sensitive", f"{what} has no sensitive attributes",
                     "remove data.sensitive (or use a manifest with those columns)")
