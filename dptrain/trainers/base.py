"""The Trainer protocol every backend implements, and the values passed through the loop.

Code outside ``dptrain.trainers`` (the run lifecycle, ``dptrain.run``, ``dptrain.synth``) uses a trainer only
through the members of :class:`Trainer`; backend attributes (``module``, ``params``, ...) are private to the
backend and its tests. The value types live in :mod:`dptrain.values` (importable without the trainers) and are
re-exported here.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from dptrain.trainers.plan import PrivacyPlan
from dptrain.values import Batch, StepStats, TrainerError


def ema_decay_at(decay: float, steps_done: int) -> float:
    """EMA decay with warm-up: min(decay, (1 + t) / (10 + t)), so early steps are not swamped by the init."""
    return min(decay, (1.0 + steps_done) / (10.0 + steps_done))


@runtime_checkable
class Trainer(Protocol):
    """One backend's DP trainer. Order of use: construct (backend options) -> ``init`` once -> optionally
    ``load_state_dict`` (resume) -> ``dp_step`` per step -> ``predict`` / ``release_weights`` /
    ``trained_model``.

    Guarantee shared by every backend: ``dp_step`` clips each privacy unit's summed gradient to the plan's
    norm C, adds Gaussian noise of std sigma*C once, and divides by the *expected* batch size; the noise is a
    function of the secret ``dp_seed`` and ``steps_done`` only (or of the OS CSPRNG with ``secure_rng``), so a
    resumed run replays exactly. ``dp_seed`` is never part of ``state_dict``.
    """

    num_devices: int
    """Accelerators this process trains on (data parallel within the process); the run record reports it.
    Processes of a torchrun launch are counted separately (``world_size``)."""

    steps_done: int
    """DP steps taken (restored by ``load_state_dict``)."""

    def init(self, model: Any, plan: PrivacyPlan, *, seed: int, dp_seed: int, fix_batchnorm: bool = False,
             ema: float | None = None) -> None:
        """Take ``model`` (the backend's own kind: a torch module or a flax module) and ``plan``. ``seed``: the
        public initialisation seed; ``dp_seed``: the secret noise seed; ``fix_batchnorm``: replace BatchNorm
        where the backend can (else BatchNorm is refused); ``ema``: keep an exponential moving average of the
        parameters with this decay, used by ``predict`` and ``release_weights`` (post-processing)."""

    def dp_step(self, batch: Batch) -> StepStats:
        """Clip per unit, sum, add noise once, normalise by the *expected* batch size, update."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, num_classes) (the EMA parameters with ``ema``)."""

    def release_weights(self) -> dict[str, np.ndarray]:
        """The weights ``predict`` uses, as float32 numpy arrays named as the framework names them (what
        :func:`dptrain.release.save_release_model` writes)."""

    def trained_model(self) -> Any:
        """The backend's own model object with the trained (live, not EMA) parameters: the torch module
        (Opacus) or the flax module bound to its variables (JAX). For post-processing such as text
        generation; it is the object being trained, not a copy."""

    def num_trainable_parameters(self) -> int:
        """How many scalar parameters the optimiser updates (frozen ones excluded)."""

    def state_dict(self) -> dict:
        """Everything a resume needs except ``dp_seed``: numpy arrays and plain values (str, int, float,
        bool, None) in dicts with str keys and lists, as :mod:`dptrain.trainers.checkpoint` stores them."""

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (after ``init`` with the same model and plan); a state from
        another backend or model is refused with :class:`TrainerError`."""


__all__ = ["Batch", "StepStats", "Trainer", "TrainerError", "ema_decay_at"]
