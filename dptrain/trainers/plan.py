"""PrivacyPlan: the frozen privacy parameters of one run, computed once from the recipe.

The plan, not the backend, chooses the noise multiplier and sampling rate, and it holds the DP
event of every step (DESIGN invariant 1). ``steps`` is the hard stop: the loop never runs more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import dp_accounting as dpa

import accounting as acc
from dptrain.config import Recipe

Mode = Literal["dp", "non_private", "clip_only"]


def default_delta(num_units: int) -> float:
    """Largest power of ten <= 1 / (10 n): well below 1/n, as a DP delta must be."""
    return 10.0 ** math.floor(math.log10(1.0 / (10 * num_units)))


@dataclass(frozen=True)
class PrivacyPlan:
    scheme: acc.SamplingScheme
    noise_multiplier: float
    clipping_norm: float | None  # None: no clipping (non-private baseline)
    steps: int
    expected_batch_size: float
    delta: float
    accountant: str
    mode: Mode
    privacy_unit: str
    num_units: int
    target_epsilon: float | None = None
    releases: tuple[tuple[str, dpa.DpEvent], ...] = ()  # other DP releases on the same units (label, event)

    def __post_init__(self):
        if self.mode == "dp" and not (self.noise_multiplier > 0 and self.clipping_norm):
            raise ValueError(f"plan: a DP run needs noise_multiplier > 0 and a clipping norm, got "
                             f"{self.noise_multiplier} and {self.clipping_norm}")

    @property
    def relation(self) -> str:
        return self.scheme.relation

    def epochs_done(self, steps: int) -> float:
        """Passes over the data after ``steps`` steps (expected passes under Poisson sampling)."""
        if isinstance(self.scheme, acc.ShuffledEpochs):
            return steps / self.scheme.steps_per_epoch()
        return steps * self.expected_batch_size / self.num_units

    def step_event(self, step: int) -> dpa.DpEvent:
        if self.mode != "dp":
            return dpa.NonPrivateDpEvent()
        return self.scheme.step_event(self.noise_multiplier, step)

    def new_ledger(self, **metadata) -> acc.PrivacyLedger:
        return acc.PrivacyLedger(relation=self.relation, privacy_unit=self.privacy_unit,
                                 accountant=self.accountant, metadata=metadata)

    def planned_ledger(self) -> acc.PrivacyLedger:
        """The ledger of the whole run, composed in advance (for budget checks)."""
        led = self.new_ledger(planned=True)
        for label, event in self.releases:
            led.compose(event, label=label)
        if self.mode != "dp":
            led.compose(dpa.NonPrivateDpEvent(), self.steps)
            return led
        for event, count in acc.run_events(self.scheme, self.noise_multiplier, self.steps):
            led.compose(event, count)
        return led

    @classmethod
    def from_recipe(cls, recipe: Recipe, num_units: int, privacy_unit: str = "example",
                    releases: tuple[tuple[str, dpa.DpEvent], ...] = ()) -> PrivacyPlan:
        """``releases``: other DP releases on the same units (e.g. a label histogram); a target epsilon
        covers them and the training run together (the noise multiplier is calibrated for the sum)."""
        p, t = recipe.privacy, recipe.training
        if t.batch_size > num_units:
            raise acc.InvalidParameterError(
                "training.batch_size", t.batch_size, f"<= the number of training units ({num_units})",
                "lower the batch size")
        delta = p.delta if p.delta is not None else default_delta(num_units)
        if delta >= 1.0 / num_units:
            raise acc.InvalidParameterError("privacy.delta", delta, f"< 1/n = {1.0 / num_units:.3g}",
                                            "delta >= 1/n permits releasing a whole record")
        if p.sampling == "poisson" and recipe.trainer.backend == "jax":
            # static shapes for jit: pad to a max batch; truncation is accounted (PLD), and made rare
            scheme: acc.SamplingScheme = acc.TruncatedPoissonSampling.with_headroom(t.batch_size, num_units)
        elif p.sampling == "poisson":
            scheme = acc.PoissonSampling.from_batch_size(t.batch_size, num_units)
        else:
            scheme = acc.ShuffledEpochs(num_units, t.batch_size)
        steps = max(1, math.ceil(t.epochs * scheme.steps_per_epoch())) if p.sampling == "shuffled" else max(
            1, math.ceil(t.epochs * num_units / t.batch_size))
        common = dict(scheme=scheme, steps=steps, expected_batch_size=scheme.sampling_rate * num_units,
                      delta=delta, accountant=p.accountant, privacy_unit=privacy_unit, num_units=num_units,
                      releases=tuple(releases))
        if p.non_private:
            return cls(noise_multiplier=0.0, clipping_norm=None, mode="non_private", target_epsilon=math.inf,
                       **common)
        if p.clip_only:
            return cls(noise_multiplier=0.0, clipping_norm=p.clipping_norm, mode="clip_only", **common)
        if p.noise_multiplier is not None:
            sigma = p.noise_multiplier
            if sigma == 0:
                raise acc.InvalidParameterError(
                    "privacy.noise_multiplier", 0, "> 0", "use privacy.epsilon: inf for a non-private baseline")
        else:
            sigma = acc.calibrate_noise_multiplier(p.epsilon, delta, scheme, steps, accountant=p.accountant,
                                                   extra_events=[(event, 1) for _, event in releases])
        return cls(noise_multiplier=sigma, clipping_norm=p.clipping_norm, mode="dp", target_epsilon=p.epsilon,
                   **common)
