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


def ema_decay_at(decay: float, steps_done: int) -> float:
    """EMA decay with warm-up: min(decay, (1 + t) / (10 + t)), so early steps are not swamped by the init."""
    return min(decay, (1.0 + steps_done) / (10.0 + steps_done))


class Trainer(Protocol):
    def init(self, model: Any, plan: PrivacyPlan, *, seed: int, dp_seed: int) -> None: ...

    def dp_step(self, batch: Batch) -> StepStats:
        """Clip per unit, sum, add noise once, normalise by the *expected* batch size, update."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, num_classes)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
