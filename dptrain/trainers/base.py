"""The Trainer protocol every backend implements, and the values passed through the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dptrain.trainers.plan import PrivacyPlan


class TrainerError(ValueError):
    """A model or trainer option cannot be trained as asked; the message says how to fix it."""


@dataclass(frozen=True)
class Batch:
    """One sampled batch. ``units[i]`` is the privacy unit of row i (clipping is per unit)."""

    x: np.ndarray
    y: np.ndarray
    units: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class StepStats:
    """Aggregates of one step (never per-example values)."""

    loss_sum: float
    rows: int


class Trainer(Protocol):
    def init(self, model: Any, plan: PrivacyPlan, *, seed: int, dp_seed: int) -> None: ...

    def dp_step(self, batch: Batch) -> StepStats:
        """Clip per unit, sum, add noise once, normalise by the *expected* batch size, update."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, num_classes)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
