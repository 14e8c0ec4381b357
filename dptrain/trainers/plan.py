"""PrivacyPlan: the frozen privacy parameters of one run, computed once from the recipe.

The plan, not the backend, chooses the noise multiplier and sampling rate, and it holds the DP
event of every step (DESIGN invariant 1). ``steps`` is the hard stop: the loop never runs more.

One neighbouring relation (invariant 9): every plan accounts under add/remove one privacy unit. The
number of units n is private under that relation, so the plan never uses it: q = B / size, the number
of steps and the default delta come from :class:`UnitCount` -- a size the user declared public
(``privacy.dataset_size``), or a Gaussian DP count of the units whose event is one of the plan's
``releases`` (composed into the same ledger and paid for in calibration). Non-private baselines use the
exact count (they are not private anyway and say so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import dp_accounting as dpa

import accounting as acc
from dptrain.config import Recipe

Mode = Literal["dp", "non_private", "clip_only"]
UNIT_COUNT = "unit_count"


def default_delta(num_units: int) -> float:
    """Largest power of ten <= 1 / (10 n): well below 1/n, as a DP delta must be."""
    return 10.0 ** math.floor(math.log10(1.0 / (10 * num_units)))


@dataclass(frozen=True)
class UnitCount:
    """The number of privacy units a plan may use, as released.

    ``source``: ``declared`` (the recipe's public ``privacy.dataset_size``), ``dp_count`` (the true count
    plus Gaussian noise of std ``noise_multiplier``, sensitivity 1 under add/remove, rounded and at least 1:
    post-processing) or ``exact`` (non-private runs only). ``public_extra`` counts units dptrain adds
    itself (audit canaries, canary sentences), which are public."""

    value: int
    source: Literal["declared", "dp_count", "exact"]
    noise_multiplier: float | None = None
    public_extra: int = 0

    @property
    def total(self) -> int:
        return self.value + self.public_extra

    def release(self) -> tuple[str, dpa.DpEvent] | None:
        if self.source != "dp_count":
            return None
        return UNIT_COUNT, acc.gaussian_release_event(float(self.noise_multiplier), 1.0)

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source, "noise_multiplier": self.noise_multiplier,
                "public_extra": self.public_extra}

    @classmethod
    def from_dict(cls, d: dict) -> UnitCount:
        return cls(int(d["value"]), d["source"], d.get("noise_multiplier"), int(d.get("public_extra", 0)))

    def describe(self) -> str:
        extra = f" + {self.public_extra} units added by dptrain (public)" if self.public_extra else ""
        if self.source == "declared":
            return f"{self.value} declared public (privacy.dataset_size){extra}"
        if self.source == "dp_count":
            return (f"{self.value}: a DP count (Gaussian noise std {self.noise_multiplier:g}, sensitivity 1, "
                    f"composed into the ledger as '{UNIT_COUNT}'); the exact count is not released{extra}")
        return f"{self.value} exact (NOT PRIVATE run){extra}"


def count_units(recipe: Recipe, true_units: int, public_extra: int = 0) -> UnitCount:
    """The plan's unit count for ``true_units`` real units (see :class:`UnitCount`). A DP count draws its
    noise from the OS CSPRNG; the caller must persist the result before anything is released, and reuse it
    on resume (a second draw would be a second release)."""
    p = recipe.privacy
    if p.dataset_size is not None:
        return UnitCount(int(p.dataset_size), "declared", None, public_extra)
    if p.non_private or p.clip_only:
        return UnitCount(int(true_units), "exact", None, public_extra)
    from dptrain.trainers.sampler import secure_normal

    noisy = float(true_units) + float(secure_normal(1)[0]) * p.count_noise_multiplier
    return UnitCount(max(1, int(round(noisy))), "dp_count", float(p.count_noise_multiplier), public_extra)


def plan_delta(recipe: Recipe, n: int) -> float:
    """``privacy.delta`` (or the default for ``n`` released units), refused unless < 1/n."""
    p = recipe.privacy
    delta = p.delta if p.delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise acc.InvalidParameterError("privacy.delta", delta, "< 1/n for the number of units",
                                        "delta >= 1/n permits releasing a whole record")
    return delta


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
    size: int  # the public size q and steps are computed from (UnitCount.total); never the exact count
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
        return steps * self.expected_batch_size / self.size

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
    def from_recipe(cls, recipe: Recipe, count: UnitCount, privacy_unit: str = "example",
                    releases: tuple[tuple[str, dpa.DpEvent], ...] = ()) -> PrivacyPlan:
        """``count``: the released unit count (:func:`count_units`); its DP count event, if any, joins
        ``releases``: other DP releases on the same units (e.g. a label histogram). A target epsilon covers
        them and the training run together (the noise multiplier is calibrated for the sum)."""
        p, t = recipe.privacy, recipe.training
        n = count.total
        if count.release() is not None:
            releases = (count.release(), *releases)
        if t.batch_size > n:
            raise acc.InvalidParameterError(
                "training.batch_size", t.batch_size,
                "<= the number of training units" + (" (as declared)" if count.source == "declared" else
                                                     " (too few units for this batch size)"),
                "lower the batch size")
        delta = plan_delta(recipe, n)
        if p.sampling == "poisson":  # the JAX backend pads to a few static shapes; no truncation, no n in the event
            scheme: acc.SamplingScheme = acc.PoissonSampling.from_batch_size(t.batch_size, n)
        else:
            scheme = acc.ShuffledEpochs(n, t.batch_size)
        steps = acc.steps_for_epochs(scheme, t.epochs, n, t.batch_size)
        common = dict(scheme=scheme, steps=steps, expected_batch_size=scheme.sampling_rate * n,
                      delta=delta, accountant=p.accountant, privacy_unit=privacy_unit, size=n,
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
