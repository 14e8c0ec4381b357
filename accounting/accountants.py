"""Turn aggregated (event, count) pairs into epsilon / delta with PLD or RDP.

PLD (``pld``) is the default: tight, and with ``pessimistic_estimate`` its discretised value is an upper
bound on the true epsilon (coarser discretisation is conservative, never optimistic). RDP (``rdp``) is
looser but is the only one that supports ``RepeatAndSelect`` and fixed-size sampling without
replacement; PLD is the only one that supports truncated Poisson sampling. We never fall back from
one to the other: an unsupported combination raises ``UnsupportedAccountantError``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable

import dp_accounting as dpa
from dp_accounting import dp_event as dpe
from dp_accounting import pld, rdp
from dp_accounting.pld import privacy_loss_distribution

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


@functools.lru_cache(maxsize=64)
def _pld_single(key: str, relation_name: str, d: float):
    """PLD of one application of a (PLD-translated) event; cached: building it dominates the cost."""
    event = event_from_dict(json.loads(key))
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
        part = single.self_compose(count)
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
        eps = math.inf if total is None else total.get_epsilon_for_delta(delta)
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
