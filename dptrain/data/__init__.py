"""Datasets: tabular files and built-ins, encoded from declared public facts only (DESIGN.md invariant 4)."""

from dptrain.data.tabular import (
    BUILTIN_DATASETS,
    BuiltinDataset,
    DataError,
    TabularData,
    list_datasets,
    load_tabular,
)

__all__ = ["BUILTIN_DATASETS", "BuiltinDataset", "DataError", "TabularData", "list_datasets", "load_tabular"]
