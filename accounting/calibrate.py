"""Calibration: the noise multiplier for a target (epsilon, delta), or the steps a noise multiplier buys.

Guarantee: the returned noise multiplier (or step count) is *verified* with the very accountant and
discretisation a ledger uses by default, so ``epsilon(result) <= target`` exactly as the ledger will
report it. PLD targets: secant steps on a 5x coarser grid, a Richardson extrapolation to the ledger's
grid, then the ledger's own evaluation certifies the answer (``_pld_search``; usually one evaluation at the
ledger's grid). Where that search gives up, and for RDP targets, a fast RDP proxy (integer orders) steers:
for PLD one Newton step from a mid-size grid, then safeguarded secant steps at the ledger's grid that keep a
bracket lo (fails) < sigma* <= hi (meets); RDP targets are solved exactly with Brent's method.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting import rdp
from scipy import optimize, stats

from . import accountants as _acc
from .errors import (
    MAX_EVALUATED_EPSILON,
    MAX_NOISE_MULTIPLIER,
    MAX_STEPS,
    MIN_NOISE_MULTIPLIER,
    InvalidParameterError,
    PrivacyError,
    UnreachableTargetError,
    check_delta,
    check_noise_range,
    check_steps,
    check_target_epsilon,
)
from .events import RELATIONS, PoissonSampling, SamplingScheme, TruncatedPoissonSampling, run_events

# The noise multipliers calibration searches: below the minimum one PLD evaluation takes minutes to hours.
_SIGMA_MIN, _SIGMA_MAX = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
_TINY = 1e-300  # log() of an epsilon of exactly 0 (a run so noisy it costs nothing at this precision)


class _BelowFloor(Exception):
    """The proxy meets the target at the smallest noise multiplier calibration searches."""


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
    try:
        x = (mu / (q * math.sqrt(steps))) ** 2  # mu = q sqrt(T (exp(1/sigma^2) - 1))
    except (OverflowError, ZeroDivisionError):  # a vanishing sampling rate: any noise meets the target
        return _SIGMA_MIN
    return min(max(1.0 / math.sqrt(math.log1p(x)), _SIGMA_MIN), 100.0)


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
            return math.log(max(eps(math.exp(log_sigma)), _TINY)) - math.log(y)

        g_lo = g_hi = g(lo)
        while g_hi > 0:
            hi += math.log(1.5)
            if hi > math.log(_SIGMA_MAX):
                raise UnreachableTargetError(
                    f"target_epsilon: {y:g} at delta={delta:g} is unreachable: it needs a noise multiplier above "
                    f"{_SIGMA_MAX:g} (at {_SIGMA_MAX:g} epsilon is still {eps(_SIGMA_MAX):.4g}); raise the target "
                    "epsilon or delta, or lower the sampling rate or steps")
            g_hi = g(hi)
        while g_lo < 0:
            lo = max(lo - math.log(1.5), math.log(_SIGMA_MIN))
            g_lo = g(lo)
            if g_lo < 0 and lo <= math.log(_SIGMA_MIN):
                raise _BelowFloor
        if g_lo == 0:
            return math.exp(lo)
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
    target = check_target_epsilon(target_epsilon, "target_epsilon")
    check_delta(delta)
    steps = check_steps(steps, "steps")
    if accountant not in _acc.ACCOUNTANTS:
        raise InvalidParameterError("accountant", accountant, "'pld' or 'rdp'")
    extra = list(extra_events)
    if extra and _acc.epsilon_of(extra, delta, accountant, RELATIONS[scheme.relation],
                                 pld_discretization=pld_discretization) >= target:
        raise UnreachableTargetError(
            f"target_epsilon: the other releases (extra_events) alone spend the whole target {target:g}; "
            "raise the target or give them more noise")
    eps = _eps_fn(scheme, steps, delta, accountant, extra)
    fine = pld_discretization
    if accountant == "pld":
        found = _pld_search(eps, target, _initial_guess(scheme, steps, target, delta), _gdp_slope(
            scheme, steps, target, delta), fine)
        if found is not None:
            return found
    # The general search (RDP targets; PLD targets the fast search above leaves: a root at or below the
    # smallest noise multiplier searched, non-finite epsilons, no convergence).
    proxy, solve = _proxy(scheme, steps, delta, extra)

    def slope(sig: float) -> float:
        return (math.log(max(proxy(sig * 1.01), _TINY)) - math.log(max(proxy(sig), _TINY))) / math.log(1.01)

    def newton(sig: float, e: float, margin: float) -> float:
        """Step in log-log space with the proxy's slope, averaged along the step (trapezoid)."""
        s0 = slope(sig)
        s1 = slope(sig * math.exp((math.log(target) - math.log(e)) / s0))
        return sig * math.exp((math.log(target) - math.log(e)) / ((s0 + s1) / 2)) * (1 + margin)

    try:
        sigma = solve(target)
    except _BelowFloor:
        e_floor = eps(_SIGMA_MIN)
        if e_floor <= target:
            raise _too_large(target, delta, e_floor) from None
        sigma = _SIGMA_MIN  # the proxy is looser than the accountant here: search upwards from the floor
    if accountant == "rdp":  # cheap to evaluate: bracket the proxy's answer and solve exactly
        def g(log_sigma: float) -> float:
            return math.log(max(eps(math.exp(log_sigma)), _TINY)) - math.log(target)

        floor, ceil = math.log(_SIGMA_MIN), math.log(_SIGMA_MAX)
        lo_s, hi_s = max(math.log(sigma) - 0.02, floor), min(math.log(sigma) + 0.02, ceil)
        while g(lo_s) <= 0 and lo_s > floor:
            lo_s = max(lo_s - 0.1, floor)
        if g(lo_s) <= 0:  # met at the smallest noise multiplier searched
            raise _too_large(target, delta, eps(_SIGMA_MIN))
        while g(hi_s) > 0 and hi_s < ceil:
            hi_s = min(hi_s + 0.1, ceil)
        if g(hi_s) > 0:
            raise UnreachableTargetError(
                f"target_epsilon: {target:g} at delta={delta:g} is unreachable: it needs a noise multiplier above "
                f"{_SIGMA_MAX:g}; raise the target epsilon or delta, or lower the sampling rate or steps")
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
        sigma = max(sigma, _SIGMA_MIN)
        if hi is not None and hi[0] <= _SIGMA_MIN:
            break  # met at the smallest noise multiplier searched: nothing below is evaluated
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
    if hi is not None and hi[0] <= _SIGMA_MIN:
        raise _too_large(target, delta, hi[1])
    return hi[0] if hi is not None else _verified(eps, sigma * 1.002, target, fine)


def _gdp_slope(scheme: SamplingScheme, steps: int, epsilon: float, delta: float) -> float:
    """d log(epsilon) / d log(sigma) of the Gaussian-DP approximation: the first step's slope (-2 if unusable)."""
    lo, hi = _initial_guess(scheme, steps, epsilon, delta), _initial_guess(scheme, steps, epsilon * 1.1, delta)
    slope = math.log(1.1) / math.log(hi / lo) if hi != lo else math.nan
    return slope if -20 < slope < -0.2 else -2.0


def _pld_search(eps, target: float, sigma0: float, slope: float, fine: float) -> float | None:
    """The PLD calibration: a noise multiplier certified at the ledger's grid, or None (use the general search).

    1. Secant steps (log-log, safeguarded by a bracket) solve epsilon = target on a grid ``k`` times coarser
       than ``fine`` (pessimistic, so an upper bound; each evaluation costs ~1/k of a fine one).
    2. The grid error shrinks like the square of the interval: one more evaluation at 2k extrapolates
       (Richardson) the coarse epsilon to the fine grid; a margin of a quarter of that correction (seen
       <= 1/6 of it) covers the extrapolation error.
    3. One fine evaluation, the ledger's own, certifies the prediction; a miss takes a measured step and is
       evaluated again. A hit predicted more than 0.1% above the smallest noise multiplier meeting the target
       gets one fine step down (kept only if it also meets the target).
    Returned values are only ever ones whose fine (ledger) epsilon is <= target.
    """
    k = max(1, min(5, int(target / (200 * fine))))
    log_t, floor, ceil = math.log(target), math.log(_SIGMA_MIN), math.log(_SIGMA_MAX)
    lo = hi = None  # (log sigma, log eps) on the coarse grid: eps > target at lo, <= target at hi
    x, last = min(max(math.log(sigma0), floor), ceil), None
    for _ in range(12):
        e = eps(math.exp(x), k * fine)
        if not 0 < e < math.inf:
            return None
        point = (x, math.log(e))
        if last is not None and abs(x - last[0]) > 1e-9:
            measured = (point[1] - last[1]) / (x - last[0])
            slope = measured if -50 < measured < 0 else slope
        last = point
        if point[1] > log_t:
            lo = point if lo is None or x > lo[0] else lo
        else:
            hi = point if hi is None or x < hi[0] else hi
        step = (log_t - point[1]) / slope
        if abs(step) < 1e-3:
            if k == 1 and e <= target:  # compared as floats: log() can map a value just above onto the target
                return math.exp(x)  # the steering grid is the ledger's: this evaluation certifies it
            break
        nxt = x + min(max(step, -0.5), 0.5)
        if lo is not None and hi is not None and not lo[0] < nxt < hi[0]:
            nxt = (lo[0] + hi[0]) / 2
        if nxt < floor or nxt > ceil:
            return None  # the root is outside the noise multipliers searched: the general search says why
        x = nxt
    else:
        return None
    x, log_e = last
    log_pred, margin = log_e, 2e-5
    if k > 1:  # Richardson extrapolation of the coarse epsilon to the fine grid
        e1, e2 = math.exp(log_e), eps(math.exp(x), 2 * k * fine)
        pred = e1 - (e2 - e1) * (k * k - 1) / (3 * k * k)
        if e2 >= e1 and 0 < pred <= e1:
            log_pred = math.log(pred)
            margin += 0.25 * (log_e - log_pred)
    x_try = x + (log_t - margin - log_pred) / slope
    best = None  # the smallest noise multiplier whose fine (ledger) epsilon is <= target
    for _ in range(4):
        if not floor <= x_try <= ceil:
            return best
        e = eps(math.exp(x_try), fine)
        if not 0 < e < math.inf:
            return best
        gap = (log_t - math.log(e)) / slope  # predicted log(sigma* / sigma) on the fine grid
        if e <= target:
            best = math.exp(x_try)  # each hit after the first is a step down from the previous one
            if -gap < 1e-3:
                return best
            x_try += gap + max(1e-4, -0.05 * gap)  # meets, but more than 0.1% above sigma*: step down
        elif best is not None:
            return best  # the step down missed: keep the certified one
        else:
            x_try += gap + max(1e-4, 0.25 * gap)  # missed: step up past the predicted root
    return best


def _verified(eps, sigma: float, target: float, discretization: float) -> float:
    sigma = max(sigma, _SIGMA_MIN)
    while eps(sigma, discretization) > target:
        sigma *= 1.001
    return sigma


def _too_large(target: float, delta: float, e_floor: float) -> InvalidParameterError:
    return InvalidParameterError(
        "target_epsilon", target,
        f"at most {e_floor:.4g} for this run (the epsilon at the smallest noise multiplier calibrated, "
        f"{_SIGMA_MIN:g}, at delta={delta:g})",
        "a larger target buys no more utility from calibration: give a smaller target, a fixed noise multiplier, "
        "or inf for a non-private baseline")


def epsilon_upper_bound(scheme: SamplingScheme, noise_multiplier: float, steps: int, delta: float) -> float:
    """A fast upper bound on the epsilon of ``steps`` steps (RDP at integer orders, ~30 ms): used to refuse runs
    too expensive for the PLD accountant before evaluating them."""
    return _proxy(scheme, steps, delta)[0](noise_multiplier)


def check_evaluable(scheme: SamplingScheme, noise_multiplier: float, steps: int, delta: float,
                    flags: str = "--noise-multiplier, --sampling-rate or --steps") -> None:
    """Refuse (PrivacyError) a run whose epsilon is so large that the PLD accountant would need gigabytes:
    its memory grows with epsilon. Such a run is not private in any useful sense."""
    check_noise_range(noise_multiplier)
    check_steps(steps)
    check_delta(delta)
    if noise_multiplier == 0:
        return  # no noise: epsilon is infinite without any computation
    bound = epsilon_upper_bound(scheme, noise_multiplier, steps, delta)
    if not bound <= MAX_EVALUATED_EPSILON:
        raise PrivacyError(
            f"{flags}: this run's epsilon is far beyond any useful guarantee (RDP upper bound {bound:.4g} > "
            f"{MAX_EVALUATED_EPSILON:g}) and the PLD accountant's memory grows with epsilon, so it is not evaluated; "
            "add noise or lower the sampling rate or steps (or use --accountant rdp for the RDP bound)")


def calibrate_steps(
    noise_multiplier: float, target_epsilon: float, delta: float, scheme: SamplingScheme, *,
    accountant: str = "pld", pld_discretization: float = _acc.DEFAULT_PLD_DISCRETIZATION, max_steps: int = MAX_STEPS,
) -> int:
    """Largest number of steps whose epsilon at ``delta`` does not exceed ``target_epsilon``.

    Exact for the given accountant and discretisation (interpolation search over verified bounds).
    """
    target = check_target_epsilon(target_epsilon, "target_epsilon")
    check_delta(delta)
    check_noise_range(noise_multiplier, allow_zero=False)
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
