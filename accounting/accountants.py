"""Turn aggregated (event, count) pairs into epsilon / delta with PLD or RDP.

PLD (``pld``) is the default: tight, and with ``pessimistic_estimate`` its discretised value is an upper
bound on the true epsilon (coarser discretisation is conservative, never optimistic). RDP (``rdp``) is
looser but is the only one that supports ``RepeatAndSelect`` and fixed-size sampling without
replacement; PLD is the only one that supports truncated Poisson sampling. We never fall back from
one to the other: an unsupported combination raises ``UnsupportedAccountantError``.

Speed: the Poisson-subsampled Gaussian's PLD is built, self-composed and read off with vectorised
re-implementations of dp_accounting's own steps that give the same floats, bit for bit (see
tests/accounting/test_fast_pld.py); everything else is dp_accounting's code as is.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable

import dp_accounting as dpa
import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting import pld, rdp
from dp_accounting.pld import common, pld_pmf, privacy_loss_distribution, privacy_loss_mechanism
from scipy import fft, special

from .errors import InvalidParameterError, UnsupportedAccountantError, check_delta
from .events import event_from_dict, event_to_dict

ACCOUNTANTS = ("pld", "rdp")
DEFAULT_PLD_DISCRETIZATION = 1e-4


def make_accountant(accountant: str, relation, *, pld_discretization: float = DEFAULT_PLD_DISCRETIZATION):
    if accountant == "pld":
        return pld.PLDAccountant(relation, value_discretization_interval=pld_discretization)
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    raise InvalidParameterError("accountant", accountant, "'pld' or 'rdp'")


def _pld_replace_one(event: dpe.DpEvent) -> dpe.DpEvent | None:
    """Translate an event to dp_accounting's PLD semantics under REPLACE_ONE, or None if unsupported.

    Sharp edge in dp_accounting 0.6: under REPLACE_ONE the RDP accountant reads ``GaussianDpEvent(s)``
    as noise std ``s`` x (replace-one sensitivity), while the PLD accountant shifts the mean by 2 (reads
    it as std ``s`` x add/remove sensitivity). Ours is the RDP reading everywhere, so for PLD we pass
    ``2 s``. Subsampled events under REPLACE_ONE are not given to PLD at all.
    """
    if isinstance(event, (dpe.NoOpDpEvent, dpe.NonPrivateDpEvent)):
        return event
    if isinstance(event, dpe.GaussianDpEvent):
        return dpe.GaussianDpEvent(2 * event.noise_multiplier)
    if isinstance(event, dpe.SelfComposedDpEvent):
        inner = _pld_replace_one(event.event)
        return None if inner is None else dpe.SelfComposedDpEvent(inner, event.count)
    if isinstance(event, dpe.ComposedDpEvent):
        inner = [_pld_replace_one(e) for e in event.events]
        return None if any(e is None for e in inner) else dpe.ComposedDpEvent(inner)
    return None


def _check_supported(event: dpe.DpEvent, accountant: str, relation, pld_discretization: float) -> None:
    acc = make_accountant(accountant, relation, pld_discretization=pld_discretization)
    if acc.supports(event):
        return
    alt = [a for a in ACCOUNTANTS if a != accountant
           and make_accountant(a, relation, pld_discretization=pld_discretization).supports(event)]
    hint = f"use accountant '{alt[0]}'" if alt else "no accountant here supports it"
    raise UnsupportedAccountantError(
        f"accountant: '{accountant}' cannot analyse {type(event).__name__} under the "
        f"{relation.name.lower()} relation; {hint}")


class _VectorisedGaussianLoss(privacy_loss_mechanism.GaussianPrivacyLoss):
    """dp_accounting's subsampled-Gaussian privacy loss with ``get_delta_for_epsilon`` vectorised.

    dp_accounting inverts the privacy loss one epsilon at a time in Python (~80% of building a PLD); this
    does the same float operations, in the same order, on whole arrays, so the connect-the-dots PLD is
    bit-identical (asserted in tests/accounting/test_fast_pld.py). Anything unusual (q = 1, the
    replace adjacency, an epsilon at the edge of the loss's range) goes to dp_accounting's own code.
    """

    def get_delta_for_epsilon(self, epsilon):
        q, s, adjacency = self.sampling_prob, self.sensitivity, self.adjacency_type
        kind = privacy_loss_mechanism.AdjacencyType
        if isinstance(epsilon, (int, float)) or not 0 < q < 1 or adjacency not in (kind.ADD, kind.REMOVE):
            return super().get_delta_for_epsilon(epsilon)
        epsilons = np.asarray(epsilon, dtype=float)
        deltas = np.zeros_like(epsilons, dtype=float)
        if adjacency == kind.ADD:  # privacy loss without subsampling: -log(1 + (exp(-eps) - 1) / q)
            inverse = epsilons < -math.log1p(-q)
            b, edge, x_at_edge = -epsilons[inverse], -math.log(1 - q), -math.inf
        else:  # REMOVE: log(1 + (exp(eps) - 1) / q)
            inverse = epsilons > math.log1p(-q)
            deltas[~inverse] = -np.expm1(epsilons[~inverse])
            b, edge, x_at_edge = epsilons[inverse], math.log(1 - q), math.inf
        eps = epsilons[inverse]
        at_edge = np.abs(eps - edge) <= 1e-9 * np.maximum(np.abs(eps), abs(edge))  # math.isclose
        # common.log_a_times_exp_b_plus_c(1 / q, b, 1 - 1 / q), elementwise
        a, c = 1 / q, 1 - 1 / q
        d = b + np.log(a)
        log_minus_c = np.log(-c)
        if np.any((d <= log_minus_c) & ~at_edge):  # dp_accounting raises here: let it
            return super().get_delta_for_epsilon(epsilon)
        with np.errstate(divide="ignore", invalid="ignore"):
            loss = np.where(b == 0, np.log(a + c), d + np.log1p(-np.exp(log_minus_c - d)))
        var = self._standard_deviation ** 2
        if adjacency == kind.ADD:
            x = s + (-0.5 * s - (-loss) * var / s)
        else:
            x = -0.5 * s - loss * var / s
        x = np.where(at_edge, x_at_edge, x)
        deltas[inverse] = self.mu_upper_cdf(x) - np.exp(eps + self.mu_lower_log_cdf(x))
        return np.clip(deltas, 0, 1)


def _connect_dots_pmf(loss, d: float):
    """``_create_pld_pmf_from_monotone_privacy_loss(loss, True, d, use_connect_dots=True)`` for a continuous loss:
    ``create_pmf_pessimistic_connect_dots_fixed_gap`` without its dict round trip for a dense result."""
    bounds = loss.connect_dots_bounds()
    lower, upper = math.floor(bounds.epsilon_lower / d), math.ceil(bounds.epsilon_upper / d)
    deltas = np.asarray(loss.get_delta_for_epsilon(np.arange(lower, upper + 1) * d), dtype=np.float64)
    if (upper - lower + 1 <= pld_pmf._MAX_PMF_SPARSE_SIZE or np.any(deltas < 0) or np.any(deltas > 1)  # noqa: SLF001
            or np.any(np.diff(deltas) > pld_pmf._DELTA_DIFF_TOLERANCE)):  # noqa: SLF001 - sparse or odd: theirs
        return pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(d, lower, upper, deltas)
    deltas = np.minimum.accumulate(deltas)
    diffs = np.diff(deltas)
    probs = np.zeros_like(deltas)
    probs[0] = 1 - deltas[0] + diffs[0] / math.expm1(d)
    probs[1:-1] = (diffs[1:] - diffs[:-1] * math.exp(d)) / math.expm1(d)
    probs[-1] = diffs[-1] / math.expm1(-d)
    return pld_pmf.DensePLDPmf(d, lower, np.maximum(0.0, probs), deltas[-1], True)


def _subsampled_gaussian_pld(sigma: float, q: float, d: float):
    """``PLD.from_gaussian_mechanism(sigma, value_discretization_interval=d, sampling_prob=q)`` (add/remove),
    with its defaults (sensitivity 1, pessimistic, connect-the-dots, log mass truncation -50), vectorised."""
    def single(adjacency):
        return _connect_dots_pmf(_VectorisedGaussianLoss(
            sigma, sensitivity=1, pessimistic_estimate=True, log_mass_truncation_bound=-50, sampling_prob=q,
            adjacency_type=adjacency), d)

    return privacy_loss_distribution._pld_for_subsampled_mechanism(single, q)  # noqa: SLF001


_CHERNOFF_ORDERS = np.concatenate((np.arange(-20, 0), np.arange(1, 21)))  # as common.compute_self_convolve_bounds


def _self_convolve_bounds(probs: np.ndarray, num_times: int, tail_mass_truncation: float) -> tuple[int, int]:
    """``common.compute_self_convolve_bounds`` with its 40 log-MGFs computed without scipy's per-call overhead.

    Each bound is ceil/floor of a float; wherever ours could round differently from dp_accounting's (within
    a generous allowance for summation-order differences of the log-MGF), that order is recomputed exactly
    as dp_accounting does, so the bounds, and hence the composed PLD, are the same.
    """
    n = len(probs)
    upper_bound, lower_bound = (n - 1) * num_times, 0
    if tail_mass_truncation == 0:
        return lower_bound, upper_bound
    nonzero = np.flatnonzero(probs)
    if len(nonzero) == 0:
        return common.compute_self_convolve_bounds(probs, num_times, tail_mass_truncation)
    index, weight = nonzero.astype(float), probs[nonzero]
    log_2_over_tail = math.log(2 / tail_mass_truncation)
    # sum_i w_i exp(order * i) for order = +-k / n, k = 1..20, shifted by the largest exponent: powers of
    # exp(+-(i - i_max) / n), by repeated multiplication (k ulps at most: far inside the slack below)
    powers = {}
    for sign, i_max in ((1, index[-1]), (-1, index[0])):
        base, term = np.exp(sign * (index - i_max) / n), weight
        for k in range(1, 21):
            term = term * base
            powers[sign * k] = (float(np.sum(term)), sign * k * i_max / n)
    for j in _CHERNOFF_ORDERS:
        order = j / n
        total, a_max = powers[int(j)]
        log_mgf = math.log(total) + a_max if total > 0 and math.isfinite(total) else math.nan
        bound = (num_times * log_mgf + log_2_over_tail) / order
        slack = 1e-6 + 1e-11 * num_times * max(1.0, abs(log_mgf)) / abs(order)
        if not math.isfinite(bound) or abs(bound - round(bound)) < slack:  # recompute exactly as dp_accounting
            log_mgf = special.logsumexp(np.arange(n) * order, b=probs)
            bound = (num_times * log_mgf + log_2_over_tail) / order
            if not math.isfinite(bound):
                continue
        if order > 0:
            upper_bound = min(upper_bound, math.ceil(bound))
        else:
            lower_bound = max(lower_bound, math.floor(bound))
    return lower_bound, upper_bound


def _self_compose_pmf(pmf, num_times: int, tail_mass_truncation: float):
    """``pmf.self_compose(num_times, tail_mass_truncation)`` (dp_accounting's algorithm, same result)."""
    if isinstance(pmf, pld_pmf.SparsePLDPmf):
        if num_times <= 1 or pmf.size < 2 or pmf.size ** min(num_times, 64) <= pld_pmf._MAX_PMF_SPARSE_SIZE:  # noqa: SLF001
            return pmf.self_compose(num_times, tail_mass_truncation)  # stays sparse: dp_accounting's own loop
        pmf = pmf.to_dense_pmf()
    if not isinstance(pmf, pld_pmf.DensePLDPmf) or num_times <= 0:
        return pmf.self_compose(num_times, tail_mass_truncation)
    # DensePLDPmf.self_compose with common.self_convolve inlined
    probs = pmf._probs  # noqa: SLF001
    lower, upper = _self_convolve_bounds(probs, num_times, tail_mass_truncation)
    output_len = upper - lower + 1
    fast_len = fft.next_fast_len(max(output_len, len(probs)))
    out = np.real(fft.ifft(fft.fft(probs, fast_len) ** num_times))
    out = np.array(np.roll(out, -lower)[:output_len])
    inf_prob = tail_mass_truncation - math.expm1(num_times * math.log1p(-pmf._infinity_mass))  # noqa: SLF001
    return pld_pmf.DensePLDPmf(pmf._discretization, pmf._lower_loss * num_times + lower, out, inf_prob,  # noqa: SLF001
                               pmf._pessimistic_estimate)  # noqa: SLF001


def _self_compose(dist, num_times: int, tail_mass_truncation: float = 1e-15):
    """``PrivacyLossDistribution.self_compose`` with the faster (identical) PMF self-composition above."""
    remove = _self_compose_pmf(dist._pmf_remove, num_times, tail_mass_truncation)  # noqa: SLF001
    if dist._symmetric:  # noqa: SLF001
        return privacy_loss_distribution.PrivacyLossDistribution(remove)
    add = _self_compose_pmf(dist._pmf_add, num_times, tail_mass_truncation)  # noqa: SLF001
    return privacy_loss_distribution.PrivacyLossDistribution(remove, add)


def _dense_epsilon_for_delta(pmf, delta: float) -> float:
    """``DensePLDPmf.get_epsilon_for_delta`` (dp_accounting's loop from the largest loss down) in numpy chunks.

    Same floats as the loop: losses accumulate like its ``itertools.count``, masses are sequential cumulative
    sums of the same terms (``math.exp``), and wherever numpy's log could decide the stopping test differently
    from ``math.log`` it is redone with ``math.log``.
    """
    mass_upper, mass_lower = pmf._infinity_mass, 0.0  # noqa: SLF001
    if mass_upper > delta:
        return math.inf
    d = pmf._discretization  # noqa: SLF001
    probs = np.flip(pmf._probs)  # noqa: SLF001
    loss = (pmf._lower_loss + len(probs) - 1) * d  # noqa: SLF001
    start, size = 0, 2048
    while start < len(probs):
        p = probs[start:start + size]
        steps = np.full(len(p), -d)
        steps[0] = loss
        losses = np.cumsum(steps)
        if losses[-1] < -700:  # math.exp would overflow in this chunk: dp_accounting's loop decides what happens
            return pmf.get_epsilon_for_delta(delta)
        terms = np.fromiter(map(math.exp, (-losses).tolist()), float, len(p)) * p
        upper = np.cumsum(np.concatenate(([mass_upper], p)))
        lower = np.cumsum(np.concatenate(([mass_lower], terms)))
        ok = (upper[:-1] > delta) & (lower[:-1] > 0)
        with np.errstate(all="ignore"):
            log_ratio = np.log(np.where(ok, (upper[:-1] - delta) / np.where(ok, lower[:-1], 1.0), 1.0))
        stop = ok & (log_ratio >= losses)
        for j in np.flatnonzero(ok & (np.abs(log_ratio - losses) <= 1e-12 * (1 + np.abs(losses)))):
            stop[j] = math.log((upper[j] - delta) / lower[j]) >= losses[j]
        done = (upper[1:] >= delta) & (lower[1:] == 0)  # checked after adding element j
        j_stop = int(np.argmax(stop)) if stop.any() else len(p)
        j_done = int(np.argmax(done)) if done.any() else len(p)
        if j_done < j_stop:
            return max(0, float(losses[j_done]))
        if j_stop < len(p):
            mass_upper, mass_lower = upper[j_stop], lower[j_stop]
            break
        mass_upper, mass_lower = upper[-1], lower[-1]
        loss = losses[-1] + (-d)
        start, size = start + size, size * 2
    if mass_upper <= mass_lower + delta:
        return 0
    return math.log((mass_upper - delta) / mass_lower)


def _epsilon_for_delta(dist, delta: float) -> float:
    """``PrivacyLossDistribution.get_epsilon_for_delta`` with dense PMFs done by the function above."""
    def one(pmf):
        if isinstance(pmf, pld_pmf.DensePLDPmf):
            return _dense_epsilon_for_delta(pmf, delta)
        return pmf.get_epsilon_for_delta(delta)

    eps = one(dist._pmf_remove)  # noqa: SLF001
    return eps if dist._symmetric else max(eps, one(dist._pmf_add))  # noqa: SLF001


def _is_fast_subsampled_gaussian(event, relation_name: str) -> bool:
    return (relation_name == dpa.NeighboringRelation.ADD_OR_REMOVE_ONE.name
            and isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(event.event, dpe.GaussianDpEvent)
            and 0 < event.sampling_probability < 1 and event.event.noise_multiplier > 0)


@functools.lru_cache(maxsize=64)
def _pld_single(key: str, relation_name: str, d: float):
    """PLD of one application of a (PLD-translated) event; cached: building it dominates the cost.

    A Poisson-subsampled Gaussian is built exactly as ``PLDAccountant.compose(event, 1)`` builds it
    (identity composed with the mechanism's PLD self-composed once) but with the vectorised loss above.
    """
    event = event_from_dict(json.loads(key))
    if _is_fast_subsampled_gaussian(event, relation_name):
        mech = _subsampled_gaussian_pld(event.event.noise_multiplier, event.sampling_probability, d)
        return privacy_loss_distribution.identity(value_discretization_interval=d).compose(_self_compose(mech, 1)), False
    acc = pld.PLDAccountant(dpa.NeighboringRelation[relation_name], value_discretization_interval=d)
    acc.compose(event, 1)
    return acc._pld, acc._contains_non_dp_event  # noqa: SLF001 - same object PLDAccountant composes


def _pld_total(pairs, relation, d: float):
    """Compose like ``PLDAccountant.compose(event, count)`` but reuse each event's single-step PLD.

    Plain Gaussians go through ``PLDAccountant`` with their count (it uses the exact sigma/sqrt(count)
    identity); everything else is ``single.self_compose(count)``, exactly as PLDAccountant does.
    """
    total = None
    for event, count in pairs:
        if isinstance(event, (dpe.GaussianDpEvent, dpe.ComposedDpEvent, dpe.SelfComposedDpEvent)):
            acc = pld.PLDAccountant(relation, value_discretization_interval=d)
            acc.compose(event, count)
            if acc._contains_non_dp_event:  # noqa: SLF001
                return None
            total = acc._pld if total is None else total.compose(acc._pld)  # noqa: SLF001
            continue
        single, non_dp = _pld_single(json.dumps(event_to_dict(event), sort_keys=True), relation.name, d)
        if non_dp:
            return None
        if isinstance(event, dpe.NoOpDpEvent):
            continue
        part = _self_compose(single, count)
        total = part if total is None else total.compose(part)
    return total if total is not None else privacy_loss_distribution.identity(value_discretization_interval=d)


def _prepared(pairs, accountant: str, relation, pld_discretization: float):
    out = []
    for event, count in pairs:
        if count <= 0:
            continue
        if accountant == "pld" and relation == dpa.NeighboringRelation.REPLACE_ONE:
            translated = _pld_replace_one(event)
            if translated is None:
                raise UnsupportedAccountantError(
                    f"accountant: 'pld' cannot analyse {type(event).__name__} under the replace_one relation; "
                    "use accountant 'rdp'")
            event = translated
        _check_supported(event, accountant, relation, pld_discretization)
        out.append((event, count))
    return out


def composed(
    pairs: Iterable[tuple[dpe.DpEvent, int]], accountant: str, relation, *,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
):
    """A dp_accounting accountant with every (event, count) composed (reference path, uncached)."""
    acc = make_accountant(accountant, relation, pld_discretization=pld_discretization)
    for event, count in _prepared(pairs, accountant, relation, pld_discretization):
        acc.compose(event, count)
    return acc


def epsilon_of(pairs, delta: float, accountant: str, relation, *,
               pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
    check_delta(delta)
    pairs = _prepared(pairs, accountant, relation, pld_discretization)
    if accountant == "pld":
        total = _pld_total(pairs, relation, pld_discretization)
        eps = math.inf if total is None else _epsilon_for_delta(total, delta)
    else:
        acc = make_accountant(accountant, relation)
        for event, count in pairs:
            acc.compose(event, count)
        eps = acc.get_epsilon(delta)
    return float(max(eps, 0.0)) if not math.isinf(eps) else math.inf


def delta_of(pairs, epsilon: float, accountant: str, relation, *,
             pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
        raise InvalidParameterError("epsilon", epsilon, "a number >= 0")
    pairs = _prepared(pairs, accountant, relation, pld_discretization)
    if accountant == "pld":
        total = _pld_total(pairs, relation, pld_discretization)
        return 1.0 if total is None else float(total.get_delta_for_epsilon(epsilon))
    acc = make_accountant(accountant, relation)
    for event, count in pairs:
        acc.compose(event, count)
    return float(acc.get_delta(epsilon))
