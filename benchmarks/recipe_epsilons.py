"""Epsilon of each shipped recipe before and after issue 14 (one honest relation), side by side.

Before: q = B / n with the exact n (released), training noise calibrated to the target alone; the statement said
add/remove, which is false when n is released. Honest readings of that old configuration: under replace-one
(n public, neighbours of the same size) the same noise costs more; synth also charged its histogram at sqrt(2).
After: n is never used -- q and the steps come from a Gaussian DP count (std privacy.count_noise_multiplier,
here taken at its expected value n), whose event is composed and paid for; the histogram at sensitivity 1.

    .venv/bin/python benchmarks/recipe_epsilons.py [recipes/*.yaml ...]

Prints: recipe, n, target, sigma before/after, epsilon printed before, the old configuration's epsilon under
replace-one (what it was really worth with n public), epsilon printed now (add/remove, count included).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

# benchmarks/accounting.py is named like the package: drop this folder from the path when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import dp_accounting as dpa  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402

import accounting as acc  # noqa: E402
from dptrain.config import load_recipe  # noqa: E402
from dptrain.trainers.plan import PrivacyPlan, UnitCount  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DISC = 1e-4


def _units(recipe) -> int:
    if recipe.model.name == "causal_lm":
        from dptrain.data.text import load_text_from_config
        from dptrain.synth.pipeline import _subset

        d = load_text_from_config(recipe.data)
        ev = recipe.synthesis.evaluation
        return len(_subset(d.texts_train, recipe.synthesis.train_fraction, recipe.seed)), ev.canaries * sum(
            ev.canary_repetitions)
    from dptrain.data import load_data

    return load_data(recipe.data).num_units, recipe.privacy.audit.canaries


def _eps(relation, events, delta) -> float:
    a = pld_privacy_accountant.PLDAccountant(relation, value_discretization_interval=DISC)
    for ev, k in events:
        a.compose(ev, k)
    return a.get_epsilon(delta)


def row(path: Path) -> str:
    recipe = load_recipe(path)
    p, t = recipe.privacy, recipe.training
    n, extra = _units(recipe)
    total = n + extra
    hist_sigma = None
    if recipe.synthesis is not None and recipe.synthesis.label_counts == "dp_histogram":
        hist_sigma = recipe.synthesis.histogram_noise_multiplier
    # before: exact n, target covers training (+ histogram charged at sqrt(2) std sqrt(2)*h)
    q_old = t.batch_size / total
    steps_old = max(1, math.ceil(t.epochs * total / t.batch_size))
    delta = p.delta if p.delta is not None else 10.0 ** math.floor(math.log10(1.0 / (10 * total)))
    old_extra = [] if hist_sigma is None else [(dpa.GaussianDpEvent(hist_sigma), 1)]  # std sqrt2*h / sens sqrt2
    sigma_old = acc.calibrate_noise_multiplier(p.epsilon, delta, acc.PoissonSampling(q_old), steps_old,
                                               extra_events=old_extra)
    step_old = dpa.PoissonSampledDpEvent(q_old, dpa.GaussianDpEvent(sigma_old))
    printed_old = _eps(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, [(step_old, steps_old), *old_extra], delta)
    # the old configuration read honestly with n public: replace-one (histogram then at sensitivity sqrt 2)
    # (dp_accounting's PLD reads a Gaussian under replace-one as a mean shift of 2: the histogram's sensitivity
    # sqrt 2 with std sqrt2 * h is then GaussianDpEvent(sqrt2 * h))
    old_extra_r1 = [] if hist_sigma is None else [(dpa.GaussianDpEvent(math.sqrt(2) * hist_sigma), 1)]
    replace = _eps(dpa.NeighboringRelation.REPLACE_ONE, [(step_old, steps_old), *old_extra_r1], delta)
    # after: the count (expected value n) and the histogram at sensitivity 1, all under add/remove
    releases = () if hist_sigma is None else (("label_histogram", acc.gaussian_release_event(hist_sigma, 1.0)),)
    plan = PrivacyPlan.from_recipe(recipe, UnitCount(n, "dp_count", p.count_noise_multiplier, extra),
                                   releases=releases)
    now = plan.planned_ledger().epsilon(plan.delta)
    return (f"| {path.name} | {n} (+{extra}) | {p.epsilon:g} | {sigma_old:.4f} | {plan.noise_multiplier:.4f} | "
            f"{printed_old:.3f} | {replace:.3f} | {now:.3f} |")


def main(paths: list[str]) -> None:
    recipes = [Path(x) for x in paths] or sorted((ROOT / "recipes").glob("*.yaml"))
    print("| recipe | units (+ added) | target | sigma before | sigma now | eps printed before | before, read under "
          "replace-one | eps printed now (add/remove, count incl.) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in recipes:
        try:
            print(row(path), flush=True)
        except Exception as err:  # noqa: BLE001 - a recipe whose data is not installed: say so, go on
            print(f"| {path.name} | skipped: {type(err).__name__}: {err} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
