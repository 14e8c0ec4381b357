"""Property tests of the accountant: monotonicity, round trips, calibration and persistence."""

from __future__ import annotations

import json
import math

import pytest
from dp_accounting import dp_event as dpe
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from accounting import (
    InvalidParameterError,
    PoissonSampling,
    PrivacyLedger,
    ShuffledEpochs,
    UnreachableTargetError,
    calibrate_noise_multiplier,
    calibrate_steps,
    event_from_dict,
    event_to_dict,
    gaussian_release_event,
    run_events,
)
from accounting.errors import MIN_NOISE_MULTIPLIER

FAST = settings(max_examples=15, deadline=None)
FEW = settings(max_examples=4, deadline=None)
SOME = settings(max_examples=6, deadline=None)  # for properties that calibrate (each example ~1 s)
COARSE = 1e-3  # PLD discretisation for property tests (pessimistic, so still an upper bound)

rates = st.floats(0.001, 0.5)
sigmas = st.floats(0.5, 5.0)
steps = st.integers(1, 300)
deltas = st.sampled_from([1e-3, 1e-5, 1e-7])


def eps_of(scheme, sigma: float, t: int, *, accountant: str = "rdp", delta: float = 1e-5) -> float:
    led = PrivacyLedger(relation=scheme.relation, accountant=accountant, pld_discretization=COARSE)
    for event, count in run_events(scheme, sigma, t):
        led.compose(event, count)
    return led.epsilon(delta)


def leq(a: float, b: float, rel: float = 1e-9) -> bool:
    return a <= b + rel * abs(b) + 1e-12


# ---- monotonicity -------------------------------------------------------------------------


@FAST
@given(q=rates, sigma=sigmas, t1=steps, t2=steps, delta=deltas)
def test_rdp_epsilon_grows_with_steps(q, sigma, t1, t2, delta):
    t1, t2 = sorted((t1, t2))
    s = PoissonSampling(q)
    assert leq(eps_of(s, sigma, t1, delta=delta), eps_of(s, sigma, t2, delta=delta))


@FAST
@given(q1=rates, q2=rates, sigma=sigmas, t=steps)
def test_rdp_epsilon_grows_with_sampling_rate(q1, q2, sigma, t):
    q1, q2 = sorted((q1, q2))
    assert leq(eps_of(PoissonSampling(q1), sigma, t), eps_of(PoissonSampling(q2), sigma, t))


@FAST
@given(q=rates, s1=sigmas, s2=sigmas, t=steps)
def test_rdp_epsilon_shrinks_with_noise(q, s1, s2, t):
    s1, s2 = sorted((s1, s2))
    s = PoissonSampling(q)
    assert leq(eps_of(s, s2, t), eps_of(s, s1, t))


@FAST
@given(n=st.integers(100, 5000), b=st.integers(1, 100), sigma=sigmas, t1=steps, t2=steps)
def test_rdp_shuffled_epsilon_grows_with_steps(n, b, sigma, t1, t2):
    t1, t2 = sorted((t1, t2))
    s = ShuffledEpochs(n, b)
    assert leq(eps_of(s, sigma, t1), eps_of(s, sigma, t2))


@FEW
@given(q=rates, sigma=sigmas, t1=steps, t2=steps)
def test_pld_epsilon_grows_with_steps(q, sigma, t1, t2):
    t1, t2 = sorted((t1, t2))
    s = PoissonSampling(q)
    assert leq(eps_of(s, sigma, t1, accountant="pld"), eps_of(s, sigma, t2, accountant="pld"), rel=1e-6)


@FEW
@given(q=rates, s1=sigmas, s2=sigmas, t=steps)
def test_pld_epsilon_shrinks_with_noise(q, s1, s2, t):
    s1, s2 = sorted((s1, s2))
    s = PoissonSampling(q)
    assert leq(eps_of(s, s2, t, accountant="pld"), eps_of(s, s1, t, accountant="pld"), rel=1e-6)


@FEW
@given(q1=rates, q2=rates, sigma=sigmas, t=steps)
def test_pld_epsilon_grows_with_sampling_rate(q1, q2, sigma, t):
    q1, q2 = sorted((q1, q2))
    a = eps_of(PoissonSampling(q1), sigma, t, accountant="pld")
    b = eps_of(PoissonSampling(q2), sigma, t, accountant="pld")
    assert leq(a, b, rel=1e-6)


# ---- delta(epsilon(delta)) ----------------------------------------------------------------


@FAST
@given(q=rates, sigma=sigmas, t=steps, delta=deltas)
def test_rdp_delta_epsilon_round_trip(q, sigma, t, delta):
    led = PrivacyLedger(accountant="rdp")
    led.compose(PoissonSampling(q).step_event(sigma), t)
    eps = led.epsilon(delta)
    assert math.isfinite(eps)
    back = led.delta(eps)
    assert back <= delta * (1 + 1e-6)
    if eps > 0:
        assert back == pytest.approx(delta, rel=1e-6)


@FEW
@given(q=rates, sigma=sigmas, t=steps, delta=deltas)
def test_pld_delta_epsilon_round_trip(q, sigma, t, delta):
    led = PrivacyLedger(accountant="pld", pld_discretization=COARSE)
    led.compose(PoissonSampling(q).step_event(sigma), t)
    eps = led.epsilon(delta)
    assert math.isfinite(eps)
    back = led.delta(eps)
    assert back <= delta * (1 + 1e-6)
    if eps > 0:
        assert back == pytest.approx(delta, rel=1e-3)


# ---- calibration --------------------------------------------------------------------------


# Tightness is checked loosely here (2%): the documented 0.5% is not always met, see the strict xfail
# test_calibrate_noise_multiplier_is_within_half_a_percent in test_reference_values.py.
TIGHT = 1.02


@SOME
@given(q=rates, t=steps, target=st.floats(0.3, 10.0), delta=deltas)
def test_rdp_calibration_meets_target(q, t, target, delta):
    scheme = PoissonSampling(q)
    try:
        sigma = calibrate_noise_multiplier(target, delta, scheme, t, accountant="rdp")
    except InvalidParameterError:  # refused only when the smallest noise multiplier searched already meets it
        assert eps_of(scheme, MIN_NOISE_MULTIPLIER, t, delta=delta) <= target
        return
    assert eps_of(scheme, sigma, t, delta=delta) <= target
    assume(sigma / TIGHT > MIN_NOISE_MULTIPLIER)  # the search's lower limit
    assert eps_of(scheme, sigma / TIGHT, t, delta=delta) > target


@settings(max_examples=3, deadline=None)
@given(q=rates, t=st.integers(1, 100), target=st.floats(0.5, 8.0))
def test_pld_calibration_meets_target(q, t, target):
    scheme = PoissonSampling(q)
    try:
        sigma = calibrate_noise_multiplier(target, 1e-5, scheme, t, pld_discretization=COARSE)
    except InvalidParameterError:  # refused only when the smallest noise multiplier searched already meets it
        assert eps_of(scheme, MIN_NOISE_MULTIPLIER, t, accountant="pld") <= target
        return
    assert eps_of(scheme, sigma, t, accountant="pld") <= target
    assume(sigma / TIGHT > MIN_NOISE_MULTIPLIER)
    assert eps_of(scheme, sigma / TIGHT, t, accountant="pld") > target


@SOME
@given(q=rates, sigma=st.floats(0.8, 5.0), target=st.floats(0.5, 10.0))
def test_rdp_calibrate_steps_is_the_largest(q, sigma, target):
    scheme = PoissonSampling(q)
    try:
        t = calibrate_steps(sigma, target, 1e-5, scheme, accountant="rdp", max_steps=10**5)
    except UnreachableTargetError:  # one step already over the target
        assert eps_of(scheme, sigma, 1) > target
        return
    assert eps_of(scheme, sigma, t) <= target
    if t < 10**5:
        assert eps_of(scheme, sigma, t + 1) > target


# ---- persistence --------------------------------------------------------------------------

schemes = st.one_of(
    st.builds(PoissonSampling, rates),
    st.builds(lambda n, b: ShuffledEpochs(n, min(b, n)), st.integers(10, 1000), st.integers(1, 50)),
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(st.floats(0.001, 0.5), sigmas, steps), min_size=1, max_size=3),
       releases=st.lists(st.floats(1.0, 50.0), max_size=3), delta=deltas)
def test_ledger_save_load_round_trip(tmp_path, parts, releases, delta):
    led = PrivacyLedger(accountant="pld", pld_discretization=COARSE, metadata={"run": "x"})
    for q, sigma, t in parts:
        for event, count in run_events(PoissonSampling(q), sigma, t):
            led.compose(event, count)
    for std in releases:
        led.compose(gaussian_release_event(std), 1, label="release")
    path = tmp_path / "ledger.json"
    led.save(path)
    back = PrivacyLedger.load(path)
    assert back.to_dict()["entries"] == led.to_dict()["entries"]
    assert back.steps == led.steps == sum(t for _, _, t in parts)
    assert back.count("release") == len(releases)
    assert back.epsilon(delta) == led.epsilon(delta)
    assert back.epsilon(delta, accountant="rdp") == led.epsilon(delta, accountant="rdp")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=schemes, sigma=sigmas, t=steps)
def test_ledger_save_load_round_trip_per_scheme(tmp_path, scheme, sigma, t):
    led = PrivacyLedger(relation=scheme.relation, accountant="rdp")
    for step in range(t):  # step by step, as a training loop composes
        led.compose(scheme.step_event(sigma, step))
    path = tmp_path / "ledger.json"
    led.save(path)
    back = PrivacyLedger.load(path)
    assert back.relation == scheme.relation
    assert back.epsilon(1e-5) == led.epsilon(1e-5)
    assert led.epsilon(1e-5) == pytest.approx(eps_of(scheme, sigma, t), rel=1e-9)


# ---- event (de)serialisation --------------------------------------------------------------

pos = st.floats(0.01, 100.0)
prob = st.floats(1e-6, 1.0)
leaves = st.one_of(
    st.just(dpe.NoOpDpEvent()),
    st.just(dpe.NonPrivateDpEvent()),
    st.builds(dpe.GaussianDpEvent, pos),
    st.builds(dpe.LaplaceDpEvent, pos),
    st.builds(dpe.ZCDpEvent, pos, st.floats(0.0, 10.0)),
    st.builds(lambda n, q, b, s: dpe.TruncatedSubsampledGaussianDpEvent(n, q, min(b, n), s),
              st.integers(1, 10**6), prob, st.integers(1, 10**4), pos),
)


def _extend(children):
    return st.one_of(
        st.builds(dpe.PoissonSampledDpEvent, prob, children),
        st.builds(lambda n, b, e: dpe.SampledWithReplacementDpEvent(n, min(b, n), e),
                  st.integers(1, 10**6), st.integers(1, 10**4), children),
        st.builds(lambda n, b, e: dpe.SampledWithoutReplacementDpEvent(n, min(b, n), e),
                  st.integers(1, 10**6), st.integers(1, 10**4), children),
        st.builds(dpe.SelfComposedDpEvent, children, st.integers(1, 10**6)),
        st.builds(dpe.ComposedDpEvent, st.lists(children, max_size=4)),
        st.builds(dpe.RepeatAndSelectDpEvent, children, st.floats(1.0, 100.0),
                  st.one_of(st.just(math.inf), st.floats(0.0, 10.0))),
    )


events = st.recursive(leaves, _extend, max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(event=events)
def test_event_dict_round_trip(event):
    d = event_to_dict(event)
    assert event_from_dict(d) == event
    # through JSON, as the ledger stores it (strict JSON: no NaN / Infinity literals)
    text = json.dumps(d, allow_nan=False)
    assert event_from_dict(json.loads(text)) == event
    assert event_to_dict(event_from_dict(json.loads(text))) == d
