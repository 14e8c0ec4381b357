"""Calibration: the noise multiplier for a target (epsilon, delta), or the steps a noise multiplier buys.

Guarantee: the returned noise multiplier (or step count) is *verified* with the very accountant and
discretisation a ledger uses by default, so ``epsilon(result) <= target`` exactly as the ledger will
report it. Speed comes from steering with a fast RDP proxy (integer orders), one Newton step from a
mid-size PLD grid, then safeguarded secant steps at the ledger's grid that keep a bracket
lo (fails) < sigma* <= hi (meets); RDP targets are solved exactly with Brent's method.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting import rdp
from scipy import optimize, stats

from . import accountants as _acc
from .errors import (
    InvalidParameterError,
    UnreachableTargetError,
    check_delta,
    check_epsilon,
    check_positive_int,
)
from .events import RELATIONS, PoissonSampling, SamplingScheme, TruncatedPoissonSampling, run_events

_SIGMA_MIN, _SIGMA_MAX = 1e-2, 1e4


def _eps_fn(scheme: SamplingScheme, steps: int, delta: float, accountant: str, extra=()):
    relation = RELATIONS[scheme.relation]

    def eps(sigma: float, discretization: float = _acc.DEFAULT_PLD_DISCRETIZATION) -> float:
        return _acc.epsilon_of([*extra, *run_events(scheme, sigma, steps)], delta, accountant, relation,
                               pld_discretization=discretization)

    return eps


def _initial_guess(scheme: SamplingScheme, steps: int, epsilon: float, delta: float) -> float:
    """Rough sigma from the Gaussian-DP central-limit approximation (only a starting point)."""

    def gdp_delta(mu):
        return stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)

    try:
        mu = optimize.brentq(lambda m: gdp_delta(m) - delta, 1e-6, 100.0)
    except ValueError:
        return 1.0
    q = min(scheme.sampling_rate, 1.0)
    x = (mu / (q * math.sqrt(steps))) ** 2  # mu = q sqrt(T (exp(1/sigma^2) - 1))
    return min(max(1.0 / math.sqrt(math.log1p(x)), 0.1), 100.0)


_PROXY_ORDERS = np.concatenate([np.arange(2, 65), [80, 128, 256, 512]]).astype(float)


def _proxy(scheme: SamplingScheme, steps: int, delta: float, extra=()):
    """A fast, smooth stand-in for epsilon(sigma): RDP over a short list of orders (~30 ms).

    Only used to steer the search; every returned value is verified with the real accountant.
    """
    if isinstance(scheme, TruncatedPoissonSampling):  # RDP cannot analyse truncation; Poisson is close
        scheme = PoissonSampling(scheme.sampling_rate)
    relation = RELATIONS[scheme.relation]

    def eps(sigma: float) -> float:
        acc = rdp.RdpAccountant(_PROXY_ORDERS, relation)
        for event, count in [*extra, *run_events(scheme, sigma, steps)]:
            acc.compose(event, count)
        return float(acc.get_epsilon(delta))

    def solve(y: float) -> float:
        """sigma with eps(sigma) == y (log-space Brent, bracket grown from an analytic guess)."""
        lo = hi = math.log(_initial_guess(scheme, steps, y, delta))

        def g(log_sigma: float) -> float:
            return math.log(eps(math.exp(log_sigma))) - math.log(y)

        g_lo = g_hi = g(lo)
        while g_hi > 0:
            hi += math.log(1.5)
            if hi > math.log(_SIGMA_MAX):
                raise UnreachableTargetError(
                    f"target_epsilon: {y:g} at delta={delta:g} needs a noise multiplier above {_SIGMA_MAX:g}; "
                    "raise the target epsilon or delta, or lower the sampling rate or steps")
            g_hi = g(hi)
        while g_lo < 0:
            lo -= math.log(1.5)
            if lo < math.log(_SIGMA_MIN):
                return _SIGMA_MIN
            g_lo = g(lo)
        return math.exp(optimize.brentq(g, lo, hi, xtol=2e-5))

    return eps, solve


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, scheme: SamplingScheme, steps: int, *, accountant: str = "pld",
    pld_discretization: float = _acc.DEFAULT_PLD_DISCRETIZATION, extra_events=(),
) -> float:
    """Noise multiplier within 0.35% of the smallest whose ``steps``-step run meets ``target_epsilon``.

    The result is verified with ``accountant`` at ``pld_discretization`` (the ledger's defaults), so a
    ledger composing this run reports ``epsilon <= target_epsilon``. ``extra_events``: (event, count)
    pairs released on the same data besides training (e.g. a DP label histogram); the target then covers
    them and the run together.
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    check_delta(delta)
    steps = check_positive_int(steps, "steps")
    if accountant not in _acc.ACCOUNTANTS:
        raise InvalidParameterError("accountant", accountant, "'pld' or 'rdp'")
    extra = list(extra_events)
    if extra and _acc.epsilon_of(extra, delta, accountant, RELATIONS[scheme.relation],
                                 pld_discretization=pld_discretization) >= target:
        raise UnreachableTargetError(
            f"target_epsilon: the other releases (extra_events) alone spend the whole target {target:g}; "
            "raise the target or give them more noise")
    eps = _eps_fn(scheme, steps, delta, accountant, extra)
    proxy, solve = _proxy(scheme, steps, delta, extra)
    fine = pld_discretization

    def slope(sig: float) -> float:
        return (math.log(proxy(sig * 1.01)) - math.log(proxy(sig))) / math.log(1.01)

    def newton(sig: float, e: float, margin: float) -> float:
        """Step in log-log space with the proxy's slope, averaged along the step (trapezoid)."""
        s0 = slope(sig)
        s1 = slope(sig * math.exp((math.log(target) - math.log(e)) / s0))
        return sig * math.exp((math.log(target) - math.log(e)) / ((s0 + s1) / 2)) * (1 + margin)

    sigma = solve(target)
    if accountant == "rdp":  # cheap to evaluate: bracket the proxy's answer and solve exactly
        def g(log_sigma: float) -> float:
            return math.log(max(eps(math.exp(log_sigma)), 1e-300)) - math.log(target)

        lo_s, hi_s = math.log(sigma) - 0.02, math.log(sigma) + 0.02
        while g(lo_s) <= 0 and lo_s > math.log(_SIGMA_MIN):
            lo_s -= 0.1
        while g(hi_s) > 0 and hi_s < math.log(_SIGMA_MAX):
            hi_s += 0.1
        return _verified(eps, math.exp(optimize.brentq(g, lo_s, hi_s, xtol=1e-5) + 1e-5), target, fine)

    # PLD: 1. where the proxy meets the target; 2. one Newton step from a mid-size grid; 3. safeguarded
    # secant iterations at the ledger's grid, keeping a bracket lo (fails) < sigma* <= hi (meets).
    # Slopes come from the last two real evaluations once there are two (the proxy's can be 2x off).
    e_mid = eps(sigma, max(fine, min(3e-4, target / 3000.0)))
    last = (sigma, e_mid) if 0 < e_mid < math.inf else None
    if last is not None:
        sigma = newton(sigma, e_mid, 1e-3)
    lo: tuple[float, float] | None = None
    hi: tuple[float, float] | None = None
    for _ in range(12):
        e = eps(sigma, fine)
        if not (0 < e < math.inf):
            break
        real_slope = None
        if last is not None and abs(math.log(sigma / last[0])) > 0.01:
            real_slope = (math.log(e) - math.log(last[1])) / math.log(sigma / last[0])
        last = (sigma, e)
        if e <= target:
            hi = (sigma, e) if hi is None or sigma < hi[0] else hi
        else:
            lo = (sigma, e) if lo is None or sigma > lo[0] else lo
        if hi is not None and lo is not None:
            if hi[0] / lo[0] - 1 < 3.5e-3:  # sigma* in (lo, hi]: hi is within 0.35% of it
                break
            # regula falsi in log-log space, kept strictly inside the bracket
            t = (math.log(target) - math.log(lo[1])) / (math.log(hi[1]) - math.log(lo[1]))
            t = min(max(t, 0.1), 0.9)
            sigma = math.exp(math.log(lo[0]) + t * (math.log(hi[0]) - math.log(lo[0]))) * (1 + 2e-4)
            continue
        s_here = real_slope if real_slope is not None and real_slope < 0 else slope(sigma)
        step = (math.log(target) - math.log(e)) / s_here  # predicted log(sigma* / sigma)
        if hi is not None and -step < 2e-3 and real_slope is not None:
            break  # predicted within 0.2% by a measured slope
        if hi is not None:  # step down, but at least far enough to find a failing sigma soon
            sigma = sigma * math.exp(min(step * (1 - 1e-3), -3e-3))
        else:
            sigma = sigma * math.exp(max(step, 5e-4)) * (1 + 2e-4)
    return hi[0] if hi is not None else _verified(eps, sigma * 1.002, target, fine)


def _verified(eps, sigma: float, target: float, discretization: float) -> float:
    while eps(sigma, discretization) > target:
        sigma *= 1.001
    return sigma


def calibrate_steps(
    noise_multiplier: float, target_epsilon: float, delta: float, scheme: SamplingScheme, *,
    accountant: str = "pld", pld_discretization: float = _acc.DEFAULT_PLD_DISCRETIZATION, max_steps: int = 10**7,
) -> int:
    """Largest number of steps whose epsilon at ``delta`` does not exceed ``target_epsilon``.

    Exact for the given accountant and discretisation (interpolation search over verified bounds).
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    check_delta(delta)
    if accountant not in _acc.ACCOUNTANTS:
        raise InvalidParameterError("accountant", accountant, "'pld' or 'rdp'")
    relation = RELATIONS[scheme.relation]
    cache: dict[int, float] = {}

    def eps(t: int) -> float:
        if t not in cache:
            cache[t] = _acc.epsilon_of(run_events(scheme, noise_multiplier, t), delta, accountant, relation,
                                       pld_discretization=pld_discretization)
        return cache[t]

    if eps(1) > target:
        raise UnreachableTargetError(
            f"noise_multiplier: one step at sigma={noise_multiplier:g} already costs epsilon="
            f"{eps(1):.4g} > target {target:g}; raise the noise multiplier or the target epsilon")
    lo, hi = 1, None  # eps(lo) <= target < eps(hi)
    guess = 2
    while hi is None:
        guess = min(guess, max_steps)
        if eps(guess) <= target:
            lo = guess
            if guess == max_steps:
                return max_steps
            # epsilon grows roughly like sqrt(steps): jump to where that model reaches the target
            guess = max(guess + 1, int(guess * min(16.0, (target / max(eps(guess), 1e-12)) ** 2)))
        else:
            hi = guess
    while hi - lo > 1:
        e_lo, e_hi = math.log(max(eps(lo), 1e-12)), math.log(eps(hi))
        frac = (math.log(target) - e_lo) / (e_hi - e_lo) if e_hi > e_lo else 0.5
        mid = round(math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo))))
        mid = min(max(mid, lo + 1), hi - 1)
        if hi - lo > 8:  # keep interpolation from crawling along one side
            mid = min(max(mid, lo + (hi - lo) // 8), hi - (hi - lo) // 8)
        lo, hi = (mid, hi) if eps(mid) <= target else (lo, mid)
    return lo


def steps_for_epochs(scheme, epochs: float, dataset_size: int, batch_size: int) -> int:
    """The number of steps that make ``epochs`` epochs (the one definition, used by plans and the CLI):
    whole shuffled epochs of ``steps_per_epoch`` steps, or ``ceil(epochs * n / B)`` sampled steps; at least 1."""
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise InvalidParameterError("epochs", epochs, "a finite number > 0")
    if scheme.name == "shuffled":
        return max(1, math.ceil(epochs * scheme.steps_per_epoch()))
    return max(1, math.ceil(epochs * dataset_size / batch_size))


def poisson_from_epochs(dataset_size: int, batch_size: int, epochs: float) -> tuple[PoissonSampling, int]:
    """Poisson sampling with q = batch_size / dataset_size and the steps that make ``epochs`` epochs."""
    scheme = PoissonSampling.from_batch_size(batch_size, dataset_size)
    return scheme, steps_for_epochs(scheme, epochs, dataset_size, batch_size)
