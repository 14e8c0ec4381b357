"""The privacy cost of choosing one run among several (Papernot & Steinke 2022; composition).

``composition`` composes every ledger (PLD): what publishing any or all of the runs' outputs costs, valid for
any selection rule that uses only the models and non-training records. ``repeat_and_select`` is the RDP bound
of RepeatAndSelect over :func:`dominating_event`, valid only under its assumption (a random number of runs).
Pure accounting over ledgers: no run directory, no records.
"""

from __future__ import annotations

import json
import math
from typing import Any

import accounting as acc


def composition(ledgers: list[acc.PrivacyLedger], delta: float) -> dict[str, Any]:
    """PLD composition of every ledger: what publishing any or all of these runs' outputs costs."""
    try:
        total = acc.PrivacyLedger(relation=ledgers[0].relation, privacy_unit=ledgers[0].privacy_unit,
                                  accountant=ledgers[0].accountant)
        for led in ledgers:
            total.extend(led)
        # coarser PLD grid (pessimistic rounding): an upper bound, slightly above the fine-grid number
        return {"composition_epsilon": total.epsilon(delta, quick=True), "composition_accountant": total.accountant}
    except acc.PrivacyError as err:
        return {"composition_epsilon": math.nan, "composition_accountant": ledgers[0].accountant,
                "composition_note": str(err)}


def dominating_event(ledgers: list[acc.PrivacyLedger]):
    """One DP event whose RDP is at least every ledger's at every order (the base mechanism of
    RepeatAndSelect when a run's configuration is any of these runs').

    Poisson-subsampled Gaussian steps are merged into max(q) x min(sigma) x max(steps): their RDP increases
    with the sampling rate and the number of steps and decreases with sigma (each run's DP count of units
    makes q and the steps differ slightly between runs). Every other event is kept with its largest count
    over the runs (RDP adds up under composition, so the union dominates each run's). Events the RDP
    accountant cannot analyse stay as they are: the caller then reports RepeatAndSelect as unavailable."""
    import dp_accounting.dp_event as dpe

    from accounting.events import event_to_dict

    q, sigma, steps = 0.0, math.inf, 0
    other: dict[str, tuple[Any, int]] = {}
    for led in ledgers:
        run_steps, run_other = 0, {}
        for ev, n in led.pairs():
            if isinstance(ev, dpe.PoissonSampledDpEvent) and isinstance(ev.event, dpe.GaussianDpEvent):
                q = max(q, float(ev.sampling_probability))
                sigma = min(sigma, float(ev.event.noise_multiplier))
                run_steps += n
            else:
                key = json.dumps(event_to_dict(ev), sort_keys=True)
                run_other[key] = (ev, run_other.get(key, (ev, 0))[1] + n)
        steps = max(steps, run_steps)
        for key, (ev, n) in run_other.items():
            if n > other.get(key, (ev, 0))[1]:
                other[key] = (ev, n)
    parts = []
    if steps:
        parts.append(dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps))
    parts += [dpe.SelfComposedDpEvent(ev, n) for ev, n in other.values()]
    return dpe.ComposedDpEvent(parts)


def repeat_and_select(ledgers: list[acc.PrivacyLedger], delta: float) -> dict[str, Any]:
    """RepeatAndSelect (Papernot & Steinke 2022, RDP) with mean = number of private runs, Poisson count,
    over the event that dominates every run (:func:`dominating_event`; Renyi divergence is quasi-convex,
    so a run with a configuration drawn at random from the grid is dominated too).

    Generic about the events: if the RDP accountant cannot analyse them, the bound is reported as not
    available with the accountant's reason."""
    mean = len(ledgers)
    assumption = (f"the number of runs was drawn at random from a Poisson distribution with mean {mean}, each run's "
                  "configuration drawn at random from the grid, before the sweep, and only the selected run is "
                  "published; a fixed grid run to completion does not satisfy it (then the composition applies)")
    base = {"repeat_and_select_mean": mean, "repeat_and_select_assumption": assumption}
    try:
        led = acc.PrivacyLedger(relation=ledgers[0].relation, privacy_unit=ledgers[0].privacy_unit, accountant="rdp")
        led.compose(acc.repeat_and_select(dominating_event(ledgers), mean=float(mean), shape=math.inf), 1,
                    label="repeat_and_select")
        with _quiet_absl():  # dp-accounting logs every RDP order it drops (dropping one is conservative)
            eps = led.epsilon(delta, "rdp")
        return {**base, "repeat_and_select_epsilon": eps}
    except (acc.PrivacyError, NotImplementedError, ValueError, TypeError) as err:
        return {**base, "repeat_and_select_epsilon": math.nan,
                "repeat_and_select_note": "not available for these runs' events (RepeatAndSelect is RDP-only and "
                f"the RDP accountant cannot analyse them): {err}"}


class _quiet_absl:
    """dp-accounting logs every RDP order it drops (dropping one is conservative): silence absl meanwhile."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


__all__ = ["composition", "dominating_event", "repeat_and_select"]
