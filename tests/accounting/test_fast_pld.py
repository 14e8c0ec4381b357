"""The fast PLD path: the same numbers as dp_accounting's own code, and a calibration still certified by them.

``accounting.accountants`` builds, self-composes and reads epsilon off the subsampled-Gaussian PLD with
vectorised code; every float must equal dp_accounting's (so the ledger's epsilon does not change, not even
in the last bit). ``calibrate_noise_multiplier`` steers on coarse grids; what it returns must still meet the
target under the ledger and sit within 0.5% of the smallest noise multiplier that does (direct bisection).
"""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.pld import common, pld_pmf

from accounting import PoissonSampling, PrivacyLedger, ShuffledEpochs, calibrate_noise_multiplier, run_events
from accounting import accountants as acc
from accounting import calibrate as cal

REL = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


def reference_total(q: float, sigma: float, steps: int, d: float):
    """The ledger's PLD before the fast path: PLDAccountant's one-step PLD, self-composed by dp_accounting."""
    one = dpa.pld.PLDAccountant(REL, value_discretization_interval=d)
    one.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), 1)
    return one._pld.self_compose(steps)  # noqa: SLF001


def same_pmf(a, b) -> bool:
    if type(a) is not type(b) or a._infinity_mass != b._infinity_mass:  # noqa: SLF001
        return False
    if isinstance(a, pld_pmf.DensePLDPmf):
        return a._lower_loss == b._lower_loss and np.array_equal(a._probs, b._probs)  # noqa: SLF001
    return a._loss_probs == b._loss_probs  # noqa: SLF001


CASES = [  # (q, sigma, steps, d)
    (256 / 60000, 1.1, 1000, 1e-4),
    (256 / 60000, 0.8, 3, 1e-4),
    (0.01, 0.5, 50, 1e-3),
    (0.3, 2.0, 20, 1e-4),
    (0.9, 6.0, 7, 1e-2),
    (1e-3, 1.5, 1, 1e-3),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "d"), CASES)
def test_fast_pld_is_bit_identical_to_dp_accounting(q, sigma, steps, d):
    acc._pld_single.cache_clear()
    ref = reference_total(q, sigma, steps, d)
    ours = acc._pld_total([(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)], REL, d)
    assert same_pmf(ref._pmf_remove, ours._pmf_remove)  # noqa: SLF001
    assert same_pmf(ref._pmf_add, ours._pmf_add)  # noqa: SLF001
    for delta in (0.3, 1e-3, 1e-5, 1e-9, 1e-14):
        expected = ref.get_epsilon_for_delta(delta)
        assert acc._epsilon_for_delta(ours, delta) == expected
        led = PrivacyLedger(pld_discretization=d)
        led.compose(PoissonSampling(q).step_event(sigma), steps)
        assert led.epsilon(delta) == float(max(expected, 0.0))


def test_fast_epsilon_matches_where_the_loss_itself_is_returned():
    """dp_accounting's early return (exp(-loss) underflows to 0) and the non-finite case, on crafted PMFs."""
    probs = np.array([0.5, 0.2, 0.2, 0.1])
    for lower_loss, inf_mass, delta in [(800_000, 0.0, 0.05), (0, 0.0, 1e-3), (-5, 1e-4, 1e-5), (3, 0.2, 0.1)]:
        pmf = pld_pmf.DensePLDPmf(1e-3, lower_loss, probs, inf_mass, True)
        assert acc._dense_epsilon_for_delta(pmf, delta) == pmf.get_epsilon_for_delta(delta)


@pytest.mark.parametrize("num_times", [1, 2, 100, 10_000])
def test_self_convolve_bounds_match(num_times):
    rng = np.random.default_rng(num_times)
    for n in (3, 50, 4000):
        probs = rng.random(n) ** 8
        probs[rng.integers(0, n, n // 10)] = 0.0
        probs[rng.integers(0, n, 2)] = -1e-19  # FFT round-off leaves such entries in composed PMFs
        probs /= probs.sum()
        expected = common.compute_self_convolve_bounds(probs, num_times, 1e-15)
        assert acc._self_convolve_bounds(probs, num_times, 1e-15) == expected


def ledger_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    led = PrivacyLedger()
    for event, count in run_events(PoissonSampling(q), sigma, steps):
        led.compose(event, count)
    return led.epsilon(delta)


def smallest_meeting(q: float, steps: int, target: float, delta: float, lo: float, hi: float) -> tuple[float, float]:
    """Bisection on the ledger's epsilon: (lo, hi) with epsilon(lo) > target >= epsilon(hi), hi / lo < 1.0005."""
    assert ledger_epsilon(q, lo, steps, delta) > target >= ledger_epsilon(q, hi, steps, delta)
    while hi / lo > 1.0005:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if ledger_epsilon(q, mid, steps, delta) <= target else (mid, hi)
    return lo, hi


@pytest.mark.parametrize(("q", "steps", "target", "delta"), [
    (256 / 60000, 10_000, 2.0, 1e-5),  # the benchmark's setting
    (0.01, 300, 1.0, 1e-5),
    (0.05, 40, 4.0, 1e-6),
    (0.2, 10, 8.0, 1e-5),
    (0.001, 2000, 0.3, 1e-5),
])
def test_calibration_is_certified_and_within_half_a_percent_of_bisection(q, steps, target, delta):
    sigma = calibrate_noise_multiplier(target, delta, PoissonSampling(q), steps)
    assert ledger_epsilon(q, sigma, steps, delta) <= target  # certified by the ledger itself
    lo, hi = smallest_meeting(q, steps, target, delta, sigma / 1.02, sigma)
    assert lo < sigma <= hi * 1.005


def test_benchmark_setting_takes_the_fast_path():
    """The coarse-grid search, not the general fallback, answers the common case: one fine evaluation."""
    scheme, steps, target, delta = PoissonSampling(256 / 60000), 10_000, 4.0, 1e-5
    fine_calls = []

    def eps(sigma, d=acc.DEFAULT_PLD_DISCRETIZATION):
        if d == acc.DEFAULT_PLD_DISCRETIZATION:
            fine_calls.append(sigma)
        return base(sigma, d)

    base = cal._eps_fn(scheme, steps, delta, "pld")
    sigma = cal._pld_search(eps, target, cal._initial_guess(scheme, steps, target, delta),
                            cal._gdp_slope(scheme, steps, target, delta), acc.DEFAULT_PLD_DISCRETIZATION)
    assert sigma is not None and fine_calls[-1] == sigma
    assert len(fine_calls) <= 2
    assert sigma == calibrate_noise_multiplier(target, delta, scheme, steps)
    assert ledger_epsilon(256 / 60000, sigma, steps, delta) <= target


def test_shuffled_epochs_pld_calibration_meets_target():
    """No subsampling (the fast builder does not apply): the search still ends at the ledger's epsilon."""
    scheme, steps, target, delta = ShuffledEpochs(1000, 100), 200, 3.0, 1e-5
    sigma = calibrate_noise_multiplier(target, delta, scheme, steps)
    led = PrivacyLedger()
    for event, count in run_events(scheme, sigma, steps):
        led.compose(event, count)
    assert led.epsilon(delta) <= target
    led_lower = PrivacyLedger()
    for event, count in run_events(scheme, sigma / 1.005, steps):
        led_lower.compose(event, count)
    assert led_lower.epsilon(delta) > target
