"""The README's DP-synthetic-text table from finished `dptrain synth` run directories (one row per run).

    python benchmarks/synth_table.py runs/iu-pe-eps8 runs/iu-pe-eps4 ... [--wall name=seconds ...]

Reads each run's private/record.json (the evaluation against real records is private: this table is for the
data owner and the README, not for release). Wall time: the record's timing sections (training this session +
generation + evaluation), or an explicit ``--wall DIR_NAME=SECONDS`` measured around the command (includes
loading the data and the model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _f(v, nd=3):
    return "n/a" if v is None else f"{v:.{nd}f}"


def row(run: Path, wall: dict[str, float]) -> str:
    rec = json.loads((run / "private" / "record.json").read_text())
    p, ev = rec["privacy"], rec["evaluation"]
    ds = ev["downstream"]
    syn, real, rdp = ds.get("synthetic", {}), ds.get("real_non_private", {}), ds.get("real_dp") or {}
    pr = ev["fidelity"]["knn_precision_recall_minilm"]
    ng = ev["memorisation"]["ngram_overlap"]
    can = ev.get("canaries", {}).get("by_repetitions", {})
    exp = " / ".join(_f(v["mean_exposure_bits"], 2) for _, v in sorted(can.items(), key=lambda kv: int(kv[0])))
    eps = "inf" if p.get("epsilon") in (None, "inf") or p.get("mode") != "dp" else \
        f"{p['target_epsilon']:g} ({p['epsilon']:.3f})"
    secs = wall.get(run.name)
    if secs is None:
        t = rec.get("timing_seconds", {})
        secs = sum(v for v in t.values() if isinstance(v, (int, float)))
    nll = ev.get("heldout_nll_per_token")
    nll_s = "n/a (no training)" if nll is None else f"{nll:.2f} ({_f(ev.get('heldout_nll_per_token_base'), 2)})"
    return (f"| {rec.get('method', 'dp_finetune')} | {eps} | {int(secs // 60)} min {int(secs % 60)} s | "
            f"{_f(syn.get('accuracy'))} / {_f(syn.get('auroc'))} | {_f(real.get('auroc'))} | {_f(rdp.get('auroc'))} | "
            f"{_f(pr.get('precision'))} / {_f(pr.get('recall'))} | {nll_s} | {_f(ng.get('train_overlap'))} / "
            f"{_f(ng.get('heldout_overlap'))} | {exp or 'n/a'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--wall", nargs="*", action="extend", default=[], help="DIR_NAME=SECONDS measured around the "
                    "command (repeatable)")
    a = ap.parse_args(argv)
    wall = {k: float(v) for k, v in (w.split("=", 1) for w in a.wall)}
    print("| method | epsilon (spent) | wall time | synthetic-trained acc / AUROC | real AUROC (non-private) | "
          "real DP-SGD AUROC | kNN precision / recall | held-out NLL/token (base) | 8-gram overlap train / "
          "held-out | canary exposure 1x / 10x (bits) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in a.runs:
        try:
            print(row(r, wall))
        except (OSError, KeyError, ValueError) as err:
            print(f"| {r.name}: not a finished synth run ({err}) |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
