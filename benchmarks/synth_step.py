"""Benchmark: one DP-SGD step of the synthetic-text recipe's LM, with and without the frozen-layer cache.

SmolLM2-135M (``builtin:smollm2-135m``), real IU X-ray reports with the recipe's prompt, one fixed batch
of ``--batch`` records, LoRA r=8 on q/v, through the real ``OpacusTrainer`` and ``PrefixLMTask`` with a
``PrivacyPlan`` built directly (sigma 1, C 1). Configurations (one process, sequentially):

* ``non-private, all layers``: plain torch step, adapters in all 30 layers (the reference);
* ``DP, all layers``: Opacus per-sample hooks, adapters in all layers;
* ``DP, top K``: adapters only in the last K layers (backward stops there), no cache;
* ``DP, top K + cache``: the same with the frozen layers below run once per record beforehand (what the
  CPU recipe does; the cache's one-off cost per record is printed separately).

Columns: ``s/step`` median over the timed steps after one warm-up step; ``x reference`` = s/step over the
non-private all-layer step.

Run (about 5 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/synth_step.py [--batch 32] [--steps 3] [--top 2] [--max-length 112]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

# benchmarks/accounting.py would shadow the accounting package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=112)
    args = ap.parse_args()

    import accounting as acc
    from dptrain.config import OptimizerConfig, load_recipe
    from dptrain.data.text import load_text
    from dptrain.synth.lm import PrefixLMTask, add_lora, encode_records, load_causal_lm
    from dptrain.trainers.base import Batch
    from dptrain.trainers.opacus_backend import OpacusTrainer
    from dptrain.trainers.plan import PrivacyPlan

    recipe = load_recipe("recipes/iu-xray-reports-synth-finetune.yaml")
    data = load_text("builtin:iu-xray-reports")
    texts, labels = data.texts_train[: args.batch], data.y_train[: args.batch]
    rows = []
    for name, top, cache, mode in [("non-private, all layers", None, False, "non_private"),
                                   ("DP, all layers", None, False, "dp"),
                                   (f"DP, top {args.top}", args.top, False, "dp"),
                                   (f"DP, top {args.top} + cache", args.top, True, "dp")]:
        model, tok = load_causal_lm("builtin:smollm2-135m")
        lora = add_lora(model, r=8, alpha=16, top_layers=top)
        prompts = [recipe.synthesis.prompt.format(label=data.classes[k]) for k in labels]
        x, y = encode_records(tok, prompts, texts, max_length=args.max_length)
        t0 = time.perf_counter()
        task = PrefixLMTask(lora, x, cache_below=top if cache else None)
        cache_s = time.perf_counter() - t0
        plan = PrivacyPlan(scheme=acc.PoissonSampling(0.5), noise_multiplier=1.0 if mode == "dp" else 0.0,
                           clipping_norm=1.0 if mode == "dp" else None, steps=10, expected_batch_size=args.batch,
                           delta=1e-5, accountant="pld", mode=mode, privacy_unit="example", size=2 * args.batch)
        trainer = OpacusTrainer(OptimizerConfig(name="adam", lr=1e-3), task=task, device="cpu",
                                max_physical_batch_size=args.batch)
        trainer.init(lora, plan, seed=0, dp_seed=1)
        batch = Batch(np.arange(len(texts))[:, None], y, np.arange(len(texts)))
        times = []
        for i in range(args.steps + 1):
            t = time.perf_counter()
            trainer.dp_step(batch)
            if i:
                times.append(time.perf_counter() - t)
        rows.append((name, statistics.median(times), cache_s / len(texts) if cache else None,
                     trainer.num_trainable_parameters()))
        print(f"done: {name}", flush=True)
    ref = rows[0][1]
    print(f"\nSmolLM2-135M, batch {args.batch} x <= {args.max_length} tokens, {torch.get_num_threads()} threads\n")
    print("| configuration | trainable | s/step | x reference | cache s/record |\n|---|---|---|---|---|")
    for name, s, c, n in rows:
        print(f"| {name} | {n:,} | {s:.2f} | {s / ref:.2f} | {'-' if c is None else f'{c:.3f}'} |")


if __name__ == "__main__":
    main()
