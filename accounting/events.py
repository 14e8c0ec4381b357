"""DP events of the mechanisms dptrain runs, as immutable dp_accounting values.

A sampling scheme is a frozen value that knows its neighbouring relation and produces the DP event of
one training step; the training loop composes exactly that event into the ledger (DESIGN invariant 2).

Formal guarantees (noise multiplier sigma = noise std / clipping norm C, per-unit clipping):

* ``PoissonSampling``: each unit joins a batch independently with probability q; add/remove-one relation;
  the clipped sum has sensitivity C, so one step is ``PoissonSampled(q, Gaussian(sigma))``.
* ``TruncatedPoissonSampling``: Poisson sampling, then truncated to ``max_batch_size`` by a uniform random
  subset (static shapes for jit); add/remove-one; PLD accountant only.
* ``FixedSizeSampling``: uniform subsets of exactly ``batch_size`` without replacement; replace-one
  relation, under which the clipped sum has sensitivity 2C, so the event's Gaussian has sigma / 2.
  RDP accountant only.
* ``ShuffledEpochs``: every epoch each unit joins exactly one of k = ceil(n / B) batches, chosen
  uniformly and independently of the other units (so adding or removing a unit changes one batch and
  nothing else). No amplification is claimed: under add/remove each unit is in exactly one batch per
  epoch, so one epoch is one Gaussian mechanism with sensitivity C (parallel composition over the
  batches). The whole epoch is charged at its first step (stopping mid-epoch is never cheaper). ``n`` is
  the public (declared or DP-estimated) size; batch sizes vary around B.

Sharp edge: never account shuffled batches as Poisson; that under-states epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import attr
import dp_accounting as dpa
from dp_accounting import dp_event as dpe

from .errors import (
    InvalidParameterError,
    LedgerFormatError,
    check_noise,
    check_positive_int,
    check_probability,
)

ADD_OR_REMOVE = "add_or_remove"
REPLACE_ONE = "replace_one"
RELATIONS = {
    ADD_OR_REMOVE: dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
    REPLACE_ONE: dpa.NeighboringRelation.REPLACE_ONE,
}


@dataclass(frozen=True)
class PoissonSampling:
    """Poisson sampling of privacy units with rate ``sampling_rate`` (q = expected batch / units)."""

    sampling_rate: float
    dataset_size: int | None = None
    name: ClassVar[str] = "poisson"
    relation: ClassVar[str] = ADD_OR_REMOVE

    def __post_init__(self):
        check_probability(self.sampling_rate)
        if self.dataset_size is not None:
            check_positive_int(self.dataset_size, "dataset_size")

    @classmethod
    def from_batch_size(cls, expected_batch_size: int, dataset_size: int) -> PoissonSampling:
        check_positive_int(dataset_size, "dataset_size")
        check_positive_int(expected_batch_size, "batch_size")
        if expected_batch_size > dataset_size:
            raise InvalidParameterError("batch_size", expected_batch_size, f"<= dataset_size ({dataset_size})")
        return cls(expected_batch_size / dataset_size, dataset_size)

    def steps_per_epoch(self) -> int:
        return max(1, round(1 / self.sampling_rate))

    def step_event(self, noise_multiplier: float, step: int = 0) -> dpe.DpEvent:
        sigma = check_noise(noise_multiplier)
        if sigma == 0:
            return dpa.NonPrivateDpEvent()
        return dpa.PoissonSampledDpEvent(self.sampling_rate, dpa.GaussianDpEvent(sigma))


@dataclass(frozen=True)
class TruncatedPoissonSampling:
    """Poisson sampling truncated to ``max_batch_size`` (static shapes in JAX). PLD accountant only."""

    dataset_size: int
    sampling_rate: float
    max_batch_size: int
    name: ClassVar[str] = "truncated_poisson"
    relation: ClassVar[str] = ADD_OR_REMOVE

    def __post_init__(self):
        check_positive_int(self.dataset_size, "dataset_size")
        check_probability(self.sampling_rate)
        check_positive_int(self.max_batch_size, "max_batch_size")

    @classmethod
    def with_headroom(cls, expected_batch_size: int, dataset_size: int,
                      truncation_probability: float = 1e-9) -> TruncatedPoissonSampling:
        """q = expected / n, and the smallest max batch whose overflow probability per step is below
        ``truncation_probability`` (truncation is then so rare it costs almost no epsilon)."""
        from scipy import stats

        base = PoissonSampling.from_batch_size(expected_batch_size, dataset_size)
        cap = int(stats.binom.isf(truncation_probability, dataset_size, base.sampling_rate)) + 1
        return cls(dataset_size, base.sampling_rate, min(dataset_size, max(cap, 1)))

    def steps_per_epoch(self) -> int:
        return max(1, round(1 / self.sampling_rate))

    def step_event(self, noise_multiplier: float, step: int = 0) -> dpe.DpEvent:
        sigma = check_noise(noise_multiplier)
        if sigma == 0:
            return dpa.NonPrivateDpEvent()
        return dpa.TruncatedSubsampledGaussianDpEvent(
            dataset_size=self.dataset_size,
            sampling_probability=self.sampling_rate,
            truncated_batch_size=self.max_batch_size,
            noise_multiplier=sigma,
        )


@dataclass(frozen=True)
class FixedSizeSampling:
    """Uniform batches of exactly ``batch_size`` drawn without replacement; replace-one; RDP only."""

    dataset_size: int
    batch_size: int
    name: ClassVar[str] = "fixed_size"
    relation: ClassVar[str] = REPLACE_ONE

    def __post_init__(self):
        check_positive_int(self.dataset_size, "dataset_size")
        check_positive_int(self.batch_size, "batch_size")
        if self.batch_size > self.dataset_size:
            raise InvalidParameterError("batch_size", self.batch_size, f"<= dataset_size ({self.dataset_size})")

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.dataset_size

    def steps_per_epoch(self) -> int:
        return math.ceil(self.dataset_size / self.batch_size)

    def step_event(self, noise_multiplier: float, step: int = 0) -> dpe.DpEvent:
        sigma = check_noise(noise_multiplier)
        if sigma == 0:
            return dpa.NonPrivateDpEvent()
        # Replace-one: sensitivity of the clipped sum is 2C, hence sigma / 2 relative to it.
        return dpa.SampledWithoutReplacementDpEvent(
            self.dataset_size, self.batch_size, dpa.GaussianDpEvent(sigma / 2)
        )


@dataclass(frozen=True)
class ShuffledEpochs:
    """Each unit joins one of ``steps_per_epoch()`` batches per epoch, uniformly and independently;
    add/remove; no amplification: one Gaussian (sensitivity C) per epoch, charged at its first step."""

    dataset_size: int
    batch_size: int
    name: ClassVar[str] = "shuffled"
    relation: ClassVar[str] = ADD_OR_REMOVE

    def __post_init__(self):
        check_positive_int(self.dataset_size, "dataset_size")
        check_positive_int(self.batch_size, "batch_size")
        if self.batch_size > self.dataset_size:
            raise InvalidParameterError("batch_size", self.batch_size, f"<= dataset_size ({self.dataset_size})")

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.dataset_size

    def steps_per_epoch(self) -> int:
        return math.ceil(self.dataset_size / self.batch_size)

    def step_event(self, noise_multiplier: float, step: int = 0) -> dpe.DpEvent:
        sigma = check_noise(noise_multiplier)
        if step % self.steps_per_epoch() != 0:
            return dpa.NoOpDpEvent()
        if sigma == 0:
            return dpa.NonPrivateDpEvent()
        return dpa.GaussianDpEvent(sigma)  # add/remove: the clipped sum of one batch moves by at most C


SamplingScheme = PoissonSampling | TruncatedPoissonSampling | FixedSizeSampling | ShuffledEpochs
SCHEMES = {s.name: s for s in (PoissonSampling, TruncatedPoissonSampling, FixedSizeSampling, ShuffledEpochs)}


def run_events(scheme: SamplingScheme, noise_multiplier: float, steps: int) -> list[tuple[dpe.DpEvent, int]]:
    """The (event, count) pairs that ``steps`` training steps under ``scheme`` compose to, aggregated."""
    steps = check_positive_int(steps, "steps")
    if isinstance(scheme, ShuffledEpochs):
        epochs = math.ceil(steps / scheme.steps_per_epoch())
        pairs = [(scheme.step_event(noise_multiplier, 0), epochs)]
        if steps > epochs:
            pairs.append((dpa.NoOpDpEvent(), steps - epochs))
        return pairs
    return [(scheme.step_event(noise_multiplier, 0), steps)]


def gaussian_release_event(noise_std: float, l2_sensitivity: float = 1.0) -> dpe.DpEvent:
    """Gaussian mechanism releasing a vector (counts, histogram) with the given L2 sensitivity.

    For a histogram where each privacy unit adds 1 to one bin, the sensitivity is 1 under add/remove
    and sqrt(2) under replace-one; pass it explicitly.
    """
    std = check_noise(noise_std, "noise_std")
    if not l2_sensitivity > 0:
        raise InvalidParameterError("l2_sensitivity", l2_sensitivity, "a number > 0")
    if std == 0:
        return dpa.NonPrivateDpEvent()
    return dpa.GaussianDpEvent(std / l2_sensitivity)


def histogram_sensitivity(relation: str) -> float:
    """L2 sensitivity of a per-unit count histogram (each unit counted once) under ``relation``."""
    return {ADD_OR_REMOVE: 1.0, REPLACE_ONE: math.sqrt(2.0)}[relation]


def repeat_and_select(event: dpe.DpEvent, mean: float, shape: float = math.inf) -> dpe.DpEvent:
    """Privacy cost of running ``event`` a random number of times and releasing only the best run.

    Papernot & Steinke (2022): the number of runs K is drawn from a truncated negative binomial with
    the given ``mean`` and ``shape`` (``inf``: Poisson, 1: geometric, 0: logarithmic). RDP accountant
    only. Sharp edge: the guarantee needs K to be random as stated; a fixed grid of k runs that
    always runs to completion costs the k-fold composition instead.
    """
    if not (isinstance(mean, (int, float)) and mean >= 1):
        raise InvalidParameterError("mean", mean, "a number >= 1 (the expected number of runs)")
    if not (isinstance(shape, (int, float)) and shape >= 0):
        raise InvalidParameterError("shape", shape, "a number >= 0 (inf: Poisson, 1: geometric, 0: logarithmic)")
    return dpe.RepeatAndSelectDpEvent(event, float(mean), float(shape))


# ---- JSON (de)serialisation of DP events: whitelisted classes only, no imports by name ----

_EVENT_CLASSES = {
    cls.__name__: cls
    for cls in (
        dpe.NoOpDpEvent, dpe.NonPrivateDpEvent, dpe.GaussianDpEvent, dpe.LaplaceDpEvent,
        dpe.SelfComposedDpEvent, dpe.ComposedDpEvent, dpe.PoissonSampledDpEvent,
        dpe.SampledWithReplacementDpEvent, dpe.SampledWithoutReplacementDpEvent,
        dpe.RepeatAndSelectDpEvent, dpe.TruncatedSubsampledGaussianDpEvent, dpe.ZCDpEvent,
    )
}


def event_to_dict(event: dpe.DpEvent) -> dict[str, Any]:
    name = type(event).__name__
    if name not in _EVENT_CLASSES:
        raise InvalidParameterError("event", event, f"one of {sorted(_EVENT_CLASSES)}")
    out: dict[str, Any] = {"type": name}
    for f in attr.fields(type(event)):
        v = getattr(event, f.name)
        if isinstance(v, dpe.DpEvent):
            v = event_to_dict(v)
        elif isinstance(v, (list, tuple)):
            v = [event_to_dict(x) if isinstance(x, dpe.DpEvent) else x for x in v]
        elif isinstance(v, float) and math.isinf(v):
            v = "inf"
        out[f.name] = v
    return out


def event_from_dict(data: dict[str, Any]) -> dpe.DpEvent:
    if not isinstance(data, dict) or data.get("type") not in _EVENT_CLASSES:
        raise LedgerFormatError(f"event: unknown DP event {data!r}; the ledger file is corrupt or from a newer version")
    cls = _EVENT_CLASSES[data["type"]]
    kwargs = {}
    for f in attr.fields(cls):
        if f.name not in data:
            raise LedgerFormatError(f"event {data['type']}: missing field {f.name!r}")
        v = data[f.name]
        if isinstance(v, dict):
            v = event_from_dict(v)
        elif isinstance(v, list):
            v = [event_from_dict(x) if isinstance(x, dict) else x for x in v]
        elif v == "inf":
            v = math.inf
        kwargs[f.name] = v
    return cls(**kwargs)
