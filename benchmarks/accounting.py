"""Benchmark: noise-multiplier calibration time and resulting sigma, ours vs Opacus vs dp-accounting.

For a Poisson-sampled Gaussian run (default q = 256/60000, T = 10000 steps, delta = 1e-5) and each
target epsilon (default 1, 2, 4, 8) it times, with the median over ``--repeats`` runs:

* ours (pld) -- ``accounting.calibrate_noise_multiplier`` (PLD, the default; verified at the ledger's grid)
* ours (rdp) -- the same with ``accountant="rdp"``
* opacus rdp / opacus prv -- ``opacus.accountants.utils.get_noise_multiplier`` (its default
  ``epsilon_tolerance=0.01``); skipped with a note when Opacus is not installed
* dp_accounting pld -- ``dp_accounting.calibrate_dp_mechanism`` with a fresh ``PLDAccountant()``
  (discretisation 1e-4, like ours), bracket ``LowerEndpointAndGuess(0, 1)``, ``tol=1e-3`` in sigma
  (its default, 1e-6, is far tighter than any other method here)

Every row also reports ``eps@ours_pld``: the epsilon our PLD ledger gives the returned sigma, so one
sees which methods land above the target (or leave budget on the table). ``sigma/ours`` is the
sigma divided by ours (pld) at the same epsilon. Our PLD cache is cleared before each timed call of
ours, so repeats are cold, like the first run.

Run (several minutes at the defaults; ``--quick`` is a ~1 minute smoke test)::

    .venv/bin/python benchmarks/accounting.py [--repeats 3] [--epsilons 1,2,4,8] [--steps 10000]
        [--sampling-rate 0.0042667] [--delta 1e-5] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

# This file is named like the package it benchmarks: drop its own folder from the path when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import dp_accounting as dpa  # noqa: E402

import accounting  # noqa: E402
from accounting import accountants as _acc  # noqa: E402

DPA_TOL = 1e-3  # absolute tolerance in sigma for dp_accounting.calibrate_dp_mechanism (~0.1% here)
OURS = "ours (pld)"
_opacus_warnings: set[str] = set()


def _clear_our_cache() -> None:
    cached = getattr(_acc, "_pld_single", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


def ours(accountant: str):
    def run(eps: float, delta: float, q: float, steps: int) -> float:
        _clear_our_cache()
        return accounting.calibrate_noise_multiplier(eps, delta, accounting.PoissonSampling(q), steps,
                                                     accountant=accountant)
    return run


def opacus(accountant: str, get_noise_multiplier):
    def run(eps: float, delta: float, q: float, steps: int) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sigma = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                         accountant=accountant)
        _opacus_warnings.update(f"opacus {accountant}: {w.message}" for w in caught)
        return float(sigma)
    return run


def dp_accounting_pld(eps: float, delta: float, q: float, steps: int) -> float:
    return float(dpa.calibrate_dp_mechanism(
        make_fresh_accountant=lambda: dpa.pld.PLDAccountant(),
        make_event_from_param=lambda s: dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), steps),
        target_epsilon=eps, target_delta=delta,
        bracket_interval=dpa.LowerEndpointAndGuess(0, 1), discrete=False, tol=DPA_TOL))


def methods() -> tuple[list[tuple[str, object]], list[str]]:
    found: list[tuple[str, object]] = [(OURS, ours("pld")), ("ours (rdp)", ours("rdp"))]
    notes = []
    try:
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as err:
        notes.append(f"opacus not importable ({err}); its rows are skipped")
    else:
        found += [("opacus rdp", opacus("rdp", get_noise_multiplier)),
                  ("opacus prv", opacus("prv", get_noise_multiplier))]
    found.append(("dp_accounting pld", dp_accounting_pld))
    return found, notes


def eps_ours_pld(sigma: float, delta: float, q: float, steps: int) -> float:
    ledger = accounting.PrivacyLedger()
    ledger.compose(accounting.PoissonSampling(q).step_event(sigma), steps)
    return float(ledger.epsilon(delta))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epsilons", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--sampling-rate", type=float, default=256 / 60_000)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--quick", action="store_true", help="epsilon 2 and 4, one repeat (smoke test)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    a = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    epsilons = [2.0, 4.0] if a.quick else [float(e) for e in a.epsilons.split(",") if e.strip()]
    repeats = 1 if a.quick else max(1, a.repeats)
    q, steps, delta = a.sampling_rate, a.steps, a.delta
    todo, notes = methods()
    out = sys.stderr if a.json else sys.stdout
    for n in notes:
        print(f"note: {n}", file=out)

    rows = []
    for eps in epsilons:
        for name, fn in todo:
            times, sigma = [], float("nan")
            for _ in range(repeats):
                t0 = time.perf_counter()
                sigma = fn(eps, delta, q, steps)
                times.append(time.perf_counter() - t0)
            rows.append({"method": name, "epsilon": eps, "sigma": sigma, "median_s": statistics.median(times),
                         "achieved_epsilon_pld": eps_ours_pld(sigma, delta, q, steps)})
            print(f"  [{name} eps={eps:g}] sigma={sigma:.5f} median {rows[-1]['median_s']:.2f}s", file=sys.stderr)

    if a.json:
        print(json.dumps(rows, indent=2))
        return 0

    ref = {r["epsilon"]: r["sigma"] for r in rows if r["method"] == OURS}
    print(f"\nq={q:.6g}  steps={steps}  delta={delta:g}  repeats={repeats} (median time)")
    head = f"{'method':<18} | {'epsilon':>7} | {'sigma':>8} | {'sigma/ours':>10} | {'median s':>8} | {'eps@ours_pld':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["sigma"] / ref[r["epsilon"]]
        flag = " >target" if r["achieved_epsilon_pld"] > r["epsilon"] else ""
        print(f"{r['method']:<18} | {r['epsilon']:>7g} | {r['sigma']:>8.5f} | {ratio:>10.4f} | "
              f"{r['median_s']:>8.2f} | {r['achieved_epsilon_pld']:>12.4f}{flag}")

    print(f"\nSummary over epsilon in {{{', '.join(f'{e:g}' for e in epsilons)}}}:")
    ours_med = statistics.median(r["median_s"] for r in rows if r["method"] == OURS)
    print(f"  median time of {OURS}: {ours_med:.2f} s")
    head = f"  {'method':<18} | {'median s':>8} | {'x ours time':>11} | {'sigma/ours min':>14} | {'sigma/ours max':>14}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    for name, _ in todo:
        mine = [r for r in rows if r["method"] == name]
        med = statistics.median(r["median_s"] for r in mine)
        ratios = [r["sigma"] / ref[r["epsilon"]] for r in mine]
        print(f"  {name:<18} | {med:>8.2f} | {med / ours_med:>11.2f} | {min(ratios):>14.4f} | {max(ratios):>14.4f}")
    over = [r for r in rows if r["achieved_epsilon_pld"] > r["epsilon"]]
    if over:
        print("\n>target: our PLD ledger reports epsilon above the target for "
              + ", ".join(f"{r['method']} @ eps={r['epsilon']:g}" for r in over))
    for w in sorted(_opacus_warnings):
        print(f"note: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
