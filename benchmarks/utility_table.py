"""Utility of a recipe across epsilon and seeds: the README's results tables come from here.

Runs ``dptrain train RECIPE`` for every (epsilon, seed) with in-process calls to the library, each
run a normal run directory under ``--out``, and prints a Markdown table of test AUROC and accuracy
(mean +- sd over seeds) with the privacy statement's noise multiplier and epsilon.

    .venv/bin/python benchmarks/utility_table.py recipes/actg175-mlp.yaml --epsilons 1,4,8,inf --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

# benchmarks/accounting.py would shadow the `accounting` package: drop this folder from the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from dptrain.config import load_recipe  # noqa: E402
from dptrain.run import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--epsilons", default="1,4,8,inf")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="runs/utility-table")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    rows = []
    for eps in args.epsilons.split(","):
        aucs, accs, sig, eps_spent, secs = [], [], None, None, 0.0
        for seed in range(args.seeds):
            recipe = load_recipe(args.recipe, [*args.set, f"privacy.epsilon={eps}", f"seed={seed}"])
            out = Path(args.out) / f"eps{eps}-seed{seed}"
            t0 = time.time()
            rec = train(recipe, out, resume=out.exists(), progress=False).record
            secs += time.time() - t0
            aucs.append(rec["metrics"]["test"]["auroc"])
            accs.append(rec["metrics"]["test"]["accuracy"])
            sig, eps_spent = rec["privacy"]["noise_multiplier"], rec["privacy"]["epsilon"]
        rows.append({"epsilon": eps, "auroc": aucs, "accuracy": accs, "noise_multiplier": sig,
                     "epsilon_spent": eps_spent, "seconds_per_run": secs / args.seeds})
        print(json.dumps(rows[-1]), flush=True)

    def ms(v):
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else math.nan:.3f}"

    print(f"\n{args.recipe}, {args.seeds} seeds (seed changes the split, the init and the DP noise)\n")
    print("| epsilon | test AUROC | test accuracy | noise multiplier | epsilon spent (PLD) | s / run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        spent = r["epsilon_spent"] if isinstance(r["epsilon_spent"], str) else f"{r['epsilon_spent']:.3f}"
        print(f"| {r['epsilon']} | {ms(r['auroc'])} | {ms(r['accuracy'])} | {r['noise_multiplier']:.3f} | {spent} "
              f"| {r['seconds_per_run']:.0f} |")


if __name__ == "__main__":
    main()
