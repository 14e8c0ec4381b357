"""Datasets: tables, images and texts, encoded from declared public facts only (DESIGN.md invariant 4).

Layout, by job (each module imports only the ones above it):

* :mod:`~dptrain.data.core`: the dataset value (:class:`TabularData`), :class:`DataError` and the split by
  privacy unit (split seed apart from the training seed);
* :mod:`~dptrain.data.labels`: class names, labels and sensitive attributes from declarations;
* :mod:`~dptrain.data.registry`: the one registry of built-in datasets (tables, images, text);
* one module per source kind: :mod:`~dptrain.data.tabular` (CSV / Parquet / built-in tables),
  :mod:`~dptrain.data.images` (image manifests; shared per-image steps in :mod:`~dptrain.data.pixels`),
  :mod:`~dptrain.data.medmnist`, :mod:`~dptrain.data.image_builtins`, :mod:`~dptrain.data.text`;
* :mod:`~dptrain.data.load`: :func:`load_data` picks the loader of a source.
"""

from dptrain.data.core import DataError, TabularData
from dptrain.data.load import is_image_source, load_data, load_images
from dptrain.data.registry import (
    BUILTIN_DATASETS,
    BUILTINS,
    IMAGE_BUILTINS,
    BuiltinDataset,
    list_builtins,
    list_datasets,
    list_image_datasets,
)
from dptrain.data.tabular import load_tabular
from dptrain.data.text import TextData, load_text, load_text_from_config

__all__ = [
    "BUILTINS",
    "BUILTIN_DATASETS",
    "IMAGE_BUILTINS",
    "BuiltinDataset",
    "DataError",
    "TabularData",
    "TextData",
    "is_image_source",
    "list_builtins",
    "list_datasets",
    "list_image_datasets",
    "load_data",
    "load_images",
    "load_tabular",
    "load_text",
    "load_text_from_config",
]
