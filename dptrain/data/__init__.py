"""Datasets: tabular files and built-ins, encoded from declared public facts only (DESIGN.md invariant 4)."""

from dptrain.data.images import IMAGE_BUILTINS, is_image_source, list_image_datasets, load_data, load_images
from dptrain.data.tabular import (
    BUILTIN_DATASETS,
    BuiltinDataset,
    DataError,
    TabularData,
    list_datasets,
    load_tabular,
)
from dptrain.data.text import TextData, load_text, load_text_from_config

__all__ = [
    "BUILTIN_DATASETS",
    "IMAGE_BUILTINS",
    "BuiltinDataset",
    "DataError",
    "TabularData",
    "TextData",
    "is_image_source",
    "list_datasets",
    "list_image_datasets",
    "load_data",
    "load_images",
    "load_tabular",
    "load_text",
    "load_text_from_config",
]
