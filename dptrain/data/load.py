"""Which loader reads a source: :func:`load_data` dispatches to images (:func:`load_images`) or a table.

``load_data(cfg)`` and ``load_images(cfg)`` split with ``cfg.split_seed`` (apart from the training seed)
unless ``seed=`` is given explicitly. Image sources (:func:`is_image_source`):

* a **manifest** (``.csv`` / ``.parquet`` with ``data.image``): :mod:`dptrain.data.images`;
* a **MedMNIST** ``.npz`` the user downloaded, with its official split: :mod:`dptrain.data.medmnist`;
* a **built-in** (``builtin:br35h``), converted once to a cached array file: :mod:`dptrain.data.image_builtins`.

A database URL with ``data.query`` (``sqlite:///PATH``, ``duckdb:///PATH``, ``postgresql://HOST/DB``) is a table
read by :mod:`dptrain.data.sql` and encoded by the table loader. Everything else is a table
(:mod:`dptrain.data.tabular`). Text is loaded by :mod:`dptrain.data.text`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dptrain.data.core import TabularData, _error, check_trainable, split_seed
from dptrain.data.image_builtins import _load_builtin
from dptrain.data.images import _load_manifest
from dptrain.data.medmnist import _load_medmnist
from dptrain.data.registry import IMAGE_BUILTINS
from dptrain.data.sql import is_sql_source, load_sql_table
from dptrain.data.tabular import load_tabular

if TYPE_CHECKING:
    from dptrain.config import DataConfig


def _builtin_name(source: str) -> str | None:
    return source.removeprefix("builtin:") if source.startswith("builtin:") else None


def is_image_source(cfg: DataConfig) -> bool:
    """True when ``cfg`` describes images: ``data.image`` is set, an image built-in, or a ``.npz`` file."""
    if is_sql_source(cfg):
        return False
    return (cfg.image is not None or _builtin_name(cfg.source) in IMAGE_BUILTINS
            or cfg.source.lower().endswith(".npz"))


def load_data(cfg: DataConfig, *, seed: int | None = None, check: bool = True) -> TabularData:
    """Load images (:func:`load_images`) or a table (:func:`~dptrain.data.tabular.load_tabular`): what the
    commands that train (and audit) read.

    The split uses ``cfg.split_seed`` unless ``seed`` is given explicitly; never pass the training seed.
    ``check`` (default): refuse data that cannot train and test a classifier by the public rule of
    :func:`~dptrain.data.core.check_trainable` (a label with fewer than two classes, too few training units, a
    class missing from a split), with a :class:`DataError` that quotes no count; image manifests are checked
    before any pixel is read."""
    if is_sql_source(cfg):
        data = load_sql_table(cfg, seed=seed)
    elif is_image_source(cfg):
        data = load_images(cfg, seed=seed, check=check)
    else:
        data = load_tabular(cfg, seed=seed)
    if check:
        check_trainable(y_train=data.y_train, y_test=data.y_test, y_val=data.y_val, num_units=data.num_units,
                        classes=data.classes, source=cfg.source)
    return data


def load_images(cfg: DataConfig, *, seed: int | None = None, check: bool = False) -> TabularData:
    """Read, preprocess (declared facts only) and split the image data described by ``cfg``.

    The split uses ``cfg.split_seed`` unless ``seed`` is given explicitly (MedMNIST: the official split).
    ``check``: refuse a manifest that cannot train a classifier before reading its pixels (see :func:`load_data`).

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
    return _load_manifest(cfg, seed=seed, check=check)


__all__ = ["is_image_source", "load_data", "load_images"]
