"""MedMNIST: a ``.npz`` file the user downloaded (nothing is downloaded here), with its official split.

The official train / val / test split is used: ``val`` is the validation split when
``data.validation_fraction`` > 0, else it is trained on. Class names come from ``data.classes`` or from the
official class list of a MedMNIST data set recognised by its file name (:data:`MEDMNIST_CLASSES`), never
from the labels. MedMNIST files carry no patient ids: each image is its own privacy unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dptrain.data.core import DataError, TabularData, _canon, _error, _reader_failure
from dptrain.data.labels import binary_classes, declared_classes
from dptrain.data.pixels import (
    _CHANNELS,
    _RESIZE,
    _SCALE,
    FROM_RECIPE,
    _no_units_or_sensitive,
    _prepare_batch,
)

if TYPE_CHECKING:
    from dptrain.config import DataConfig

_MEDMNIST_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")

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
