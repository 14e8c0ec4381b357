"""Reference values for the accountant, each recomputed independently (numpy/scipy, or Opacus's PRV).

Nothing here uses dp_accounting to produce an expected value: the expected numbers come from
closed forms (the analytic Gaussian mechanism, the binomial expansion of the subsampled-Gaussian
RDP), from a direct discretised convolution of the privacy-loss distribution, or from a second,
independent implementation (Opacus's PRV accountant).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from scipy import integrate, optimize, signal, special

from accounting import (
    FixedSizeSampling,
    PoissonSampling,
    PrivacyLedger,
    ShuffledEpochs,
    TruncatedPoissonSampling,
    UnreachableTargetError,
    UnsupportedAccountantError,
    calibrate_noise_multiplier,
    calibrate_steps,
    gaussian_release_event,
    histogram_sensitivity,
    run_events,
)

# The DP-SGD MNIST setting used throughout the literature: batch 256 of 60000, sigma 1.12, 60 epochs.
Q_MNIST = 256 / 60000
SIGMA_MNIST = 1.12
T_MNIST = 14040
DELTA = 1e-5


# ---------------------------------------------------------------------------------------------
# Independent reference implementations
# ---------------------------------------------------------------------------------------------


def ledger_for(scheme, sigma: float, steps: int, *, accountant: str = "pld",
               pld_discretization: float = 1e-4) -> PrivacyLedger:
    led = PrivacyLedger(relation=scheme.relation, accountant=accountant, pld_discretization=pld_discretization)
    for event, count in run_events(scheme, sigma, steps):
        led.compose(event, count)
    return led


def subsampled_gaussian_rdp(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at integer orders (Mironov et al. 2019, binomial form).

    A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)); RDP = log(A) / (alpha - 1).
    Every term is positive, so logsumexp is exact up to rounding.
    """
    out = []
    for alpha in orders.astype(int):
        k = np.arange(alpha + 1, dtype=float)
        log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
        log_terms = (log_binom + (alpha - k) * np.log1p(-q) + k * math.log(q)
                     + (k * k - k) / (2 * sigma**2))
        out.append(special.logsumexp(log_terms) / (alpha - 1))
    return np.array(out)


def rdp_to_eps_classic(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Mironov (2017): eps = min_alpha rdp - log(delta) / (alpha - 1)."""
    return float(np.min(rdp - math.log(delta) / (orders - 1)))


def rdp_to_eps_modern(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Balle et al. (2020) / Canonne-Kamath-Steinke (2020) conversion."""
    eps = rdp + np.log((orders - 1) / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.min(eps))


def gaussian_delta(eps: float, mu: float) -> float:
    """Exact delta(eps) of a Gaussian mechanism with mean shift / std = mu (Balle & Wang 2018)."""
    a = special.log_ndtr(-eps / mu - mu / 2) + eps  # log of e^eps Phi(-eps/mu - mu/2), stable for large eps
    return float(special.ndtr(mu / 2 - eps / mu) - math.exp(a))


def gaussian_eps(delta: float, mu: float) -> float:
    """Exact eps(delta) of a Gaussian mechanism with mean shift / std = mu (0 if delta(0) <= delta)."""
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, mu) > delta:
        hi *= 2
    return optimize.brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-13, rtol=1e-13)


def _x_of_loss_remove(loss: np.ndarray, q: float, s: float) -> np.ndarray:
    """Inverse of L(x) = log((1-q) + q exp((2x - 1) / (2 s^2))), the log-ratio of the mixture to N(0, s^2)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return s * s * np.log((np.expm1(loss) + q) / q) + 0.5


def poisson_gaussian_loss_pmfs(q: float, s: float, h: float):
    """Privacy-loss pmfs of one Poisson-subsampled Gaussian step, on the grid l = h * (offset + i).

    Two dominating pairs (remove, add), mixture M = (1-q) N(0, s^2) + q N(1, s^2), base N = N(0, s^2):
      remove: P = M, Q = N,  L(x) = log(M/N)(x), x ~ M;  L in (log(1-q), inf)
      add:    P = N, Q = M,  L(x) = -log(M/N)(x), x ~ N;  L in (-inf, -log(1-q))
    Bin masses come from the exact CDFs (L is monotone in x), so the only error is where inside its
    bin a mass sits; the returned pmf puts it at the bin's lower edge (an optimistic discretisation;
    shifting every atom up by h gives a pessimistic one). Returns {direction: (offset, pmf, mass_at_inf)}.
    """

    def cdf_mix(x):
        return (1 - q) * special.ndtr(x / s) + q * special.ndtr((x - 1) / s)

    lo_rm = math.floor(math.log1p(-q) / h)
    x_max = 1 + 10 * s  # P(x > x_max) < 1e-23; that mass is put at +inf (pessimistic for the upper bound)
    hi_rm = math.ceil(np.logaddexp(math.log1p(-q), math.log(q) + (2 * x_max - 1) / (2 * s * s)) / h)
    edges = h * np.arange(lo_rm, hi_rm + 1, dtype=float)
    cdf = np.where(edges <= math.log1p(-q), 0.0, cdf_mix(_x_of_loss_remove(edges, q, s)))
    remove = (lo_rm, np.diff(cdf), 1.0 - cdf[-1])

    # add: P(L <= l) = P_N(x >= x_rm(-l)); losses below -5 are lumped into the lowest bin (with at most
    # 0.7 per step of positive loss, they can never reach an eps >= 0 in a few-fold composition)
    hi_add = math.ceil(-math.log1p(-q) / h)
    lo_add = math.floor(-5.0 / h)
    edges = h * np.arange(lo_add, hi_add + 1, dtype=float)
    cdf = np.where(-edges <= math.log1p(-q), 1.0, special.ndtr(-_x_of_loss_remove(-edges, q, s) / s))
    pmf = np.diff(cdf)
    pmf[0] += cdf[0]
    add = (lo_add, pmf, 0.0)
    return {"remove": remove, "add": add}


def composed_delta_bounds(q: float, s: float, steps: int, eps_values, h: float = 1e-4):
    """(optimistic, pessimistic) delta(eps) of the ``steps``-fold composition, max over both directions."""
    lower = np.zeros(len(eps_values))
    upper = np.zeros(len(eps_values))
    for offset, pmf, inf_mass in poisson_gaussian_loss_pmfs(q, s, h).values():
        total, total_offset = pmf, offset
        for _ in range(steps - 1):
            total = np.clip(signal.fftconvolve(total, pmf), 0.0, None)
            total_offset += offset
        # mass at +inf: a step that has it makes the composition infinite
        finite_mass = (1 - inf_mass) ** steps
        total = total * (finite_mass / total.sum()) if total.sum() > 0 else total
        losses = h * (total_offset + np.arange(len(total)))
        for i, eps in enumerate(eps_values):
            for shift, out in ((0.0, lower), (steps * h, upper)):
                lv = losses + shift
                m = lv > eps
                d = float(np.sum(total[m] * -np.expm1(eps - lv[m]))) + (1 - finite_mass)
                out[i] = max(out[i], d)
    return lower, upper


def poisson_gaussian_delta_one_step(q: float, s: float, eps: float) -> float:
    """delta(eps) of a single subsampled-Gaussian step by quadrature, max over the two directions."""

    c = 1 / (s * math.sqrt(2 * math.pi))

    def base(x):
        return c * math.exp(-x * x / (2 * s * s))

    def mix(x):
        return (1 - q) * base(x) + q * base(x - 1)

    e = math.exp(eps)
    lim = 1 + 20 * s
    kw = {"points": [0.5], "limit": 200, "epsabs": 1e-13, "epsrel": 1e-9}
    remove = integrate.quad(lambda x: max(mix(x) - e * base(x), 0.0), -lim, lim, **kw)[0]
    add = integrate.quad(lambda x: max(base(x) - e * mix(x), 0.0), -lim, lim, **kw)[0]
    return max(remove, add)


# ---------------------------------------------------------------------------------------------
# The DP-SGD MNIST reference point
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_ledger() -> PrivacyLedger:
    return ledger_for(PoissonSampling(Q_MNIST), SIGMA_MNIST, T_MNIST)


def test_mnist_reference_epsilons(mnist_ledger):
    assert mnist_ledger.epsilon(DELTA, accountant="rdp") == pytest.approx(2.516, abs=5e-3)
    assert mnist_ledger.epsilon(DELTA, accountant="pld") == pytest.approx(2.308, abs=5e-3)
    eps = mnist_ledger.epsilons(DELTA)
    assert eps["pld"] < eps["rdp"]


def test_mnist_rdp_independent_binomial_expansion(mnist_ledger):
    orders = np.arange(2, 257, dtype=float)
    rdp = T_MNIST * subsampled_gaussian_rdp(Q_MNIST, SIGMA_MNIST, orders)
    # the pre-2020 conversion, as printed by TF Privacy / Opacus <1.0 for this setting
    assert rdp_to_eps_classic(rdp, orders, DELTA) == pytest.approx(2.92, abs=0.02)
    ours = mnist_ledger.epsilon(DELTA, accountant="rdp")
    modern = rdp_to_eps_modern(rdp, orders, DELTA)
    # ours also searches fractional orders, so it may be (slightly) below the integer-order value
    assert ours <= modern + 1e-9
    assert modern <= ours * 1.015


def test_binomial_rdp_matches_closed_form_without_subsampling():
    # sanity of the reference itself: q = 1 is the plain Gaussian, RDP = alpha / (2 sigma^2)
    orders = np.arange(2, 40, dtype=float)
    rdp = subsampled_gaussian_rdp(1 - 1e-15, 1.3, orders)
    np.testing.assert_allclose(rdp, orders / (2 * 1.3**2), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Pure Gaussian mechanism against the analytic Gaussian (Balle & Wang 2018)
# ---------------------------------------------------------------------------------------------

GAUSSIAN_CASES = [(1.0, 1, 1e-5), (0.8, 3, 1e-6), (5.0, 100, 1e-5), (20.0, 50, 1e-3)]


@pytest.mark.parametrize("relation", ["add_or_remove", "replace_one"])
@pytest.mark.parametrize(("sigma", "k", "delta"), GAUSSIAN_CASES)
def test_gaussian_composition_matches_analytic_gaussian(relation, sigma, k, delta):
    exact = gaussian_eps(delta, math.sqrt(k) / sigma)
    led = PrivacyLedger(relation=relation)
    for _ in range(k):  # composed one at a time, as a training loop does
        led.compose(dpe.GaussianDpEvent(sigma))
    pld_eps = led.epsilon(delta)
    assert pld_eps == pytest.approx(exact, rel=1e-3)
    assert pld_eps >= exact - 1e-9  # the PLD is pessimistic: never below the truth
    assert led.epsilon(delta, accountant="rdp") >= exact - 1e-9
    # composing with a count is the same thing
    led_count = PrivacyLedger(relation=relation)
    led_count.compose(dpe.GaussianDpEvent(sigma), k)
    assert led_count.pairs() == led.pairs()


@pytest.mark.parametrize("relation", ["add_or_remove", "replace_one"])
@pytest.mark.parametrize(("sigma", "k"), [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_gaussian_delta_matches_analytic_gaussian(relation, sigma, k):
    led = PrivacyLedger(relation=relation)
    led.compose(dpe.GaussianDpEvent(sigma), k)
    for eps in (0.5, 3.0):
        exact = gaussian_delta(eps, math.sqrt(k) / sigma)
        got = led.delta(eps)
        assert got >= exact * (1 - 1e-9) - 1e-15, eps
        assert got == pytest.approx(exact, rel=2e-3, abs=1e-12), eps


def test_relations_agree_on_gaussian_in_our_convention():
    a = PrivacyLedger(relation="add_or_remove")
    r = PrivacyLedger(relation="replace_one")
    for led in (a, r):
        led.compose(dpe.GaussianDpEvent(1.5), 7)
    assert a.epsilon(DELTA) == pytest.approx(r.epsilon(DELTA), rel=1e-6)
    assert a.epsilon(DELTA, "rdp") == pytest.approx(r.epsilon(DELTA, "rdp"), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Shuffled epochs: one Gaussian per epoch at sensitivity C (add/remove: one unit changes one batch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "epochs"), [(1.0, 1), (2.0, 3), (4.0, 10)])
def test_shuffled_epochs_is_one_gaussian_per_epoch(sigma, epochs):
    scheme = ShuffledEpochs(10000, 100)
    assert scheme.steps_per_epoch() == 100
    led = ledger_for(scheme, sigma, 100 * epochs)
    assert scheme.relation == "add_or_remove"
    exact = gaussian_eps(DELTA, math.sqrt(epochs) / sigma)
    assert led.epsilon(DELTA) == pytest.approx(exact, rel=1e-3)
    assert led.epsilon(DELTA) >= exact - 1e-9
    assert led.epsilon(DELTA, accountant="rdp") >= exact - 1e-9


def test_shuffled_epochs_mid_epoch_costs_a_full_epoch():
    scheme = ShuffledEpochs(10000, 100)
    sigma = 2.0
    two_epochs = gaussian_eps(DELTA, math.sqrt(2) / sigma)
    e150 = ledger_for(scheme, sigma, 150).epsilon(DELTA)
    e200 = ledger_for(scheme, sigma, 200).epsilon(DELTA)
    assert e150 == e200
    assert e150 == pytest.approx(two_epochs, rel=1e-3)
    assert e150 >= two_epochs - 1e-9
    rdp = {t: ledger_for(scheme, sigma, t, accountant="rdp").epsilon(DELTA) for t in (101, 150, 200, 201)}
    assert rdp[101] == rdp[150] == rdp[200] < rdp[201]
    # step-by-step composition, as the training loop does it, charges the same events
    led = PrivacyLedger(relation=scheme.relation)
    for step in range(150):
        led.compose(scheme.step_event(sigma, step))
    assert led.steps == 150
    assert sorted(led.pairs(), key=repr) == sorted(run_events(scheme, sigma, 150), key=repr)
    assert led.epsilon(DELTA, accountant="rdp") == rdp[150]


def test_histogram_release_under_replace_one_is_analytic_gaussian():
    # a count histogram has L2 sensitivity sqrt(2) under replace-one: noise std 3 is mu = sqrt(2) / 3
    led = PrivacyLedger(relation="replace_one")
    led.compose(gaussian_release_event(3.0, histogram_sensitivity("replace_one")), label="release")
    assert led.steps == 0
    assert led.epsilon(DELTA) == pytest.approx(gaussian_eps(DELTA, math.sqrt(2) / 3.0), rel=1e-3)
    led = PrivacyLedger(relation="add_or_remove")
    led.compose(gaussian_release_event(3.0, histogram_sensitivity("add_or_remove")), label="release")
    assert led.epsilon(DELTA) == pytest.approx(gaussian_eps(DELTA, 1 / 3.0), rel=1e-3)


def test_unsupported_combinations_raise_instead_of_falling_back():
    with pytest.raises(UnsupportedAccountantError):
        ledger_for(FixedSizeSampling(1000, 10), 1.0, 10).epsilon(DELTA)  # PLD: no sampling w/o replacement
    with pytest.raises(UnsupportedAccountantError):
        ledger_for(TruncatedPoissonSampling(1000, 0.01, 20), 1.0, 10, accountant="rdp").epsilon(DELTA)
    eps = ledger_for(FixedSizeSampling(1000, 10), 1.0, 10, accountant="rdp").epsilons(DELTA)
    assert eps["pld"] is None and eps["rdp"] is not None and eps["rdp"] > 0


# ---------------------------------------------------------------------------------------------
# Poisson subsampling: Opacus PRV and a direct convolution of the privacy-loss distribution
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("q", "sigma", "steps"), [(Q_MNIST, SIGMA_MNIST, T_MNIST), (0.01, 1.0, 1000),
                                                   (0.1, 2.0, 200)])
def test_poisson_pld_matches_opacus_prv(q, sigma, steps, request):
    prv_mod = pytest.importorskip("opacus.accountants")
    acc = prv_mod.PRVAccountant()
    acc.history = [(sigma, q, steps)]  # (noise_multiplier, sample_rate, steps), as PRVAccountant.step keeps it
    prv_eps = acc.get_epsilon(DELTA, eps_error=0.01)
    if (q, sigma, steps) == (Q_MNIST, SIGMA_MNIST, T_MNIST):
        led = request.getfixturevalue("mnist_ledger")
    else:
        led = ledger_for(PoissonSampling(q), sigma, steps)
    ours = led.epsilon(DELTA)
    assert ours == pytest.approx(prv_eps, rel=0.015)
    # PRV returns an upper bound (estimate + eps_error); a tight PLD cannot be far above it
    assert ours <= prv_eps + 1e-6


@pytest.mark.parametrize(("q", "sigma"), [(0.1, 1.0), (0.5, 2.0), (0.01, 0.7)])
def test_poisson_single_step_delta_by_quadrature(q, sigma):
    led = PrivacyLedger()
    led.compose(PoissonSampling(q).step_event(sigma))
    for eps in (0.0, 0.05, 0.3, 1.0, 2.0):
        exact = poisson_gaussian_delta_one_step(q, sigma, eps)
        got = led.delta(eps)
        assert got >= exact * (1 - 1e-6) - 1e-12, eps
        assert got == pytest.approx(exact, rel=2e-3, abs=1e-10), eps


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.1, 1.0, 3), (0.5, 2.0, 3), (0.2, 1.5, 5)])
def test_poisson_composed_delta_by_direct_convolution(q, sigma, steps):
    eps_values = [0.02, 0.3, 1.0, 2.0]
    lower, upper = composed_delta_bounds(q, sigma, steps, eps_values)
    led = PrivacyLedger()
    led.compose(PoissonSampling(q).step_event(sigma), steps)
    for eps, lo, hi in zip(eps_values, lower, upper, strict=True):
        assert lo <= hi
        got = led.delta(eps)
        assert got >= lo * (1 - 1e-6) - 1e-12, eps
        assert got <= hi * 1.02 + 1e-12, eps
        assert got == pytest.approx((lo + hi) / 2, rel=0.02, abs=1e-10)


def test_direct_convolution_reference_is_sane_for_q_one():
    # the reference itself: with q = 1 the subsampled Gaussian is the Gaussian, known in closed form
    sigma, steps = 2.0, 4
    lower, upper = composed_delta_bounds(1 - 1e-12, sigma, steps, [0.5, 1.0], h=1e-4)
    for eps, lo, hi in zip([0.5, 1.0], lower, upper, strict=True):
        exact = gaussian_delta(eps, math.sqrt(steps) / sigma)
        assert lo <= exact * (1 + 1e-6) and exact <= hi * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------
# Truncated Poisson sampling
# ---------------------------------------------------------------------------------------------


def _truncated_vs_poisson(discretization: float):
    steps, sigma = 1000, 1.0
    poisson = ledger_for(PoissonSampling(0.01), sigma, steps, pld_discretization=discretization).epsilon(DELTA)
    loose = ledger_for(TruncatedPoissonSampling(10000, 0.01, 400), sigma, steps,
                       pld_discretization=discretization).epsilon(DELTA)
    tight = ledger_for(TruncatedPoissonSampling(10000, 0.01, 130), sigma, steps,
                       pld_discretization=discretization).epsilon(DELTA)
    assert loose == pytest.approx(poisson, rel=1e-6)
    assert tight > poisson * 1.01


def test_truncated_poisson_far_above_mean_is_poisson_coarse():
    _truncated_vs_poisson(1e-3)


@pytest.mark.slow
def test_truncated_poisson_far_above_mean_is_poisson_default_grid():
    _truncated_vs_poisson(1e-4)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0, pytest.param(8.0, marks=pytest.mark.slow)])
def test_calibrate_noise_multiplier_pld_is_tight_and_safe(target):
    scheme, steps = PoissonSampling(Q_MNIST), 10000
    sigma = calibrate_noise_multiplier(target, DELTA, scheme, steps)
    assert ledger_for(scheme, sigma, steps).epsilon(DELTA) <= target
    assert ledger_for(scheme, sigma / 1.005, steps).epsilon(DELTA) > target


@pytest.mark.parametrize("target", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_calibrate_noise_multiplier_rdp_round_trip(target):
    scheme, steps = PoissonSampling(Q_MNIST), 10000
    sigma = calibrate_noise_multiplier(target, DELTA, scheme, steps, accountant="rdp")
    assert ledger_for(scheme, sigma, steps, accountant="rdp").epsilon(DELTA) <= target
    assert ledger_for(scheme, sigma / 1.005, steps, accountant="rdp").epsilon(DELTA) > target


@pytest.mark.slow  # RDP of sampling without replacement costs ~1 s per evaluation
@pytest.mark.parametrize("target", [1.0, 3.0])
def test_calibrate_fixed_size_sampling_rdp_round_trip(target):
    scheme, steps = FixedSizeSampling(60000, 256), 5000
    sigma = calibrate_noise_multiplier(target, DELTA, scheme, steps, accountant="rdp")
    led = ledger_for(scheme, sigma, steps, accountant="rdp")
    assert led.relation == "replace_one"
    assert led.epsilon(DELTA) <= target
    assert ledger_for(scheme, sigma / 1.005, steps, accountant="rdp").epsilon(DELTA) > target


# Regression cases found by the hypothesis property test: an earlier stopping rule trusted the slope of
# the fast RDP proxy (which can be 2-3x off the real accountant's) and stopped up to ~1% above the
# smallest sigma. The promise is: epsilon <= target, and sigma within 0.5% of the smallest that meets it.
CALIBRATION_NOT_TIGHT = [
    # (q, steps, target_eps, delta, accountant, pld_discretization), measured excess over sigma*
    pytest.param(0.0078125, 95, 2.25, 1e-3, "rdp", 1e-4, id="rdp-0.56pct"),
    pytest.param(0.0011081730712359126, 53, 9.153729099593901, 1e-7, "rdp", 1e-4, id="rdp-1.06pct"),
    pytest.param(0.0032838063439833377, 144, 8.59570165058458, 1e-3, "pld", 1e-3, id="pld-1.03pct",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("q", "steps", "target", "delta", "accountant", "d"), CALIBRATION_NOT_TIGHT)
def test_calibrate_noise_multiplier_is_within_half_a_percent(q, steps, target, delta, accountant, d):
    scheme = PoissonSampling(q)
    sigma = calibrate_noise_multiplier(target, delta, scheme, steps, accountant=accountant, pld_discretization=d)
    assert ledger_for(scheme, sigma, steps, accountant=accountant, pld_discretization=d).epsilon(delta) <= target
    assert ledger_for(scheme, sigma / 1.005, steps, accountant=accountant,
                      pld_discretization=d).epsilon(delta) > target


@pytest.mark.parametrize(("scheme", "sigma", "target", "accountant"), [
    (PoissonSampling(0.01), 1.0, 1.0, "pld"),
    (PoissonSampling(0.01), 1.0, 2.0, "rdp"),
    (ShuffledEpochs(1000, 100), 8.0, 2.0, "pld"),
    pytest.param(FixedSizeSampling(1000, 50), 4.0, 2.0, "rdp", marks=pytest.mark.slow),
])
def test_calibrate_steps_is_exact(scheme, sigma, target, accountant):
    steps = calibrate_steps(sigma, target, DELTA, scheme, accountant=accountant)
    assert steps >= 1
    assert ledger_for(scheme, sigma, steps, accountant=accountant).epsilon(DELTA) <= target
    assert ledger_for(scheme, sigma, steps + 1, accountant=accountant).epsilon(DELTA) > target


# ---------------------------------------------------------------------------------------------
# Discretisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "sigma", "steps"), [
    (PoissonSampling(0.01), 1.0, 1000),
    (PoissonSampling(0.1), 2.0, 200),
    (ShuffledEpochs(1000, 100), 3.0, 50),
])
def test_coarse_pld_discretisation_is_conservative(scheme, sigma, steps):
    fine = ledger_for(scheme, sigma, steps, pld_discretization=1e-4).epsilon(DELTA)
    coarse = ledger_for(scheme, sigma, steps, pld_discretization=1e-2).epsilon(DELTA)
    assert coarse >= fine


@pytest.mark.parametrize("accountant", [pytest.param("pld", marks=pytest.mark.slow), "rdp"])  # PLD: ~20 s
def test_calibration_with_extra_release_covers_both(accountant):
    """A DP histogram released before training: the target covers histogram + run, and stays tight."""
    scheme, steps, target, delta = PoissonSampling(0.03), 60, 4.0, 1e-5
    hist = gaussian_release_event(10.0, histogram_sensitivity("add_or_remove"))
    sigma = calibrate_noise_multiplier(target, delta, scheme, steps, accountant=accountant, extra_events=[(hist, 1)])
    alone = calibrate_noise_multiplier(target, delta, scheme, steps, accountant=accountant)
    assert sigma > alone  # the histogram's share must be paid for with more noise

    def eps(s):
        led = ledger_for(scheme, s, steps, accountant=accountant)
        led.compose(hist, label="label_histogram")
        return led.epsilon(delta)

    assert eps(sigma) <= target < eps(sigma / 1.005)
    with pytest.raises(UnreachableTargetError, match="extra_events"):
        calibrate_noise_multiplier(0.01, delta, scheme, steps, accountant=accountant, extra_events=[(hist, 1)])
