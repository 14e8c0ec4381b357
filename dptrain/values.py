"""Value types shared by the data, model and trainer layers (numpy only: no torch, no jax, no trainers).

``dptrain.data`` and ``dptrain.models`` may import this module without importing ``dptrain.trainers``;
``dptrain.trainers.base`` re-exports every name, so ``from dptrain.trainers.base import Batch`` keeps working.
(Not named ``types``: a module of that name would shadow the standard library when a file of this package is
run as a script.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class TrainerError(ValueError):
    """A model or trainer option cannot be trained as asked; the message says how to fix it."""


@dataclass(frozen=True)
class Batch:
    """One sampled batch. ``units[i]`` is the privacy unit of row i (clipping is per unit).

    ``weights`` (default all 1) scale each row's loss: with augmentation multiplicity K a unit's K augmented
    rows have weight 1/K, so the unit's summed gradient is their mean, clipped once.
    """

    x: np.ndarray
    y: np.ndarray
    units: np.ndarray
    weights: np.ndarray | None = None

    def row_weights(self) -> np.ndarray:
        return np.ones(len(self.y), np.float32) if self.weights is None else self.weights.astype(np.float32)

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class StepStats:
    """Aggregates of one step (never per-example values)."""

    loss_sum: float
    rows: int


__all__ = ["Batch", "StepStats", "TrainerError", "jsonable"]


def jsonable(obj):
    """JSON-safe copy for records and logs: numpy scalars as Python values, non-finite floats as the strings
    "inf"/"-inf"/"nan" (the privacy statement has its own typed serialisation, ``accounting.statement``)."""
    import math

    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return obj
