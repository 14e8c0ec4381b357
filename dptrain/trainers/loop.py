"""THE training loop (the only one): sample -> dp_step -> ledger.compose(step event) -> callbacks.

Guarantees: exactly one DP event per step, produced by the plan's sampling scheme; the loop never
runs past ``plan.steps`` (the budget's hard stop); it refuses to start from a ledger whose step count
disagrees with ``start_step`` (a resume that would lose or double-count privacy spending).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

import accounting as acc
from dptrain.trainers.base import Batch, StepStats, Trainer
from dptrain.trainers.plan import PrivacyPlan
from dptrain.trainers.sampler import UnitSampler

Callback = Callable[[int, StepStats, acc.PrivacyLedger], None]


def run_loop(
    trainer: Trainer, sampler: UnitSampler, plan: PrivacyPlan, ledger: acc.PrivacyLedger,
    x: np.ndarray, y: np.ndarray, units: np.ndarray, *, start_step: int = 0,
    callbacks: Sequence[Callback] = (), augment: Callable[[Batch, int], Batch] | None = None,
) -> acc.PrivacyLedger:
    """Run steps ``start_step .. plan.steps - 1``; callbacks get (steps done, stats, ledger).

    ``augment(batch, step)`` may transform the sampled batch (data augmentation, multiplicity); it must keep
    every row's unit, so clipping still bounds each unit's contribution."""
    if ledger.steps != start_step:
        raise RuntimeError(f"ledger has {ledger.steps} steps but the loop would resume at step {start_step}; "
                           "refusing to lose or double-count privacy spending")
    for step in range(start_step, plan.steps):
        rows = sampler.sample(step)
        batch = Batch(x[rows], y[rows], units[rows])
        stats = trainer.dp_step(augment(batch, step) if augment is not None else batch)
        ledger.compose(plan.step_event(step))
        for cb in callbacks:
            cb(step + 1, stats, ledger)
    assert ledger.steps == plan.steps
    return ledger
