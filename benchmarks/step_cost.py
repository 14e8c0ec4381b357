"""Benchmark: cost of one DP step against a non-private step, torch/Opacus vs JAX, on three models.

Models (synthetic data, fixed batch every step):

* ``mlp`` -- MLP 784-512-256-10 (ReLU), batch 512;
* ``cnn`` -- small GroupNorm CNN on 28x28x1 (conv16-GN-relu-pool, conv32-GN-relu-pool, dense 10), batch 256;
* ``br35h`` -- the Br35H recipe's CNN (MONAI ``Classifier`` conv16/32/64 stride 2, GroupNorm, on 64x64x1;
  its flax twin ``ImageCNN`` for JAX), batch 128 (``ex/s`` = images/s);
* ``lora`` -- one pre-LN transformer block (seq 64, d 128, 4 heads, MLP 256, vocab 256) with rank-8 LoRA
  adapters on q/k/v/o and both MLP projections, only the adapters trainable; batch 64.

Modes, all through the real trainers (``OpacusTrainer`` / ``JaxTrainer``) with a ``PrivacyPlan`` built
directly (sigma 1, C 1; JAX under ``TruncatedPoissonSampling`` with max batch = the batch, so one
compilation): ``torch`` (non-private step of the Opacus backend: plain torch), ``opacus-hooks``,
``opacus-ghost``, ``jax`` (non-private), ``jax-vmap`` (vmap per-example gradients), ``jax-fast``
(ghost norms / book-keeping, ``clipping='auto'``).

Columns: ``ms/step`` -- median wall time of ``dp_step`` over the timed steps, after warm-up steps
(which include JAX compilation); ``ex/s`` -- batch / median; ``peak MB`` -- the step's working memory:
the increase of the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``)
over its resident size just before two extra steps, measured after the timed steps with glibc's mmap
threshold lowered to 64 KiB (``mallopt``) so that freed buffers go back to the OS and the baseline does
not already hold the previous step's memory. It counts activations, per-example state, gradients,
noise and temporaries, not parameters, optimiser state or compiled code. ``x non-private`` -- ms/step
over the same framework's non-private step (Opacus / torch, JAX / JAX); ``compiles`` -- JAX only: XLA
compilations during the run's steps (``jax.monitoring`` backend-compile events, warm-up included; the step
program and any helper), then the step program's own count (``JaxTrainer.compilations()``), e.g. ``1/1``.

Targets (issue 19), printed under the table: ``jax-fast`` no slower than the fastest Opacus DP mode and at most
1.1x ``jax``, on every model; one compilation of the step; DP peak memory at most 1.2x non-private (JAX).

Every (model, mode) runs in its own fresh subprocess (clean memory peak, no cross-talk), sequentially.

Run (about 5 minutes on 2 CPU cores; ``--quick`` is a ~2 minute smoke test)::

    .venv/bin/python benchmarks/step_cost.py [--steps 10] [--warmup 2] [--models mlp,cnn,lora]
        [--modes torch,opacus-hooks,...] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/accounting.py would shadow the accounting package: drop this folder from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

MODELS = {"mlp": 512, "cnn": 256, "br35h": 128, "lora": 64}  # batch sizes
BR35H = dict(name="cnn", channels=[16, 32, 64], strides=[2, 2, 2], groups=8)
MODES = ["torch", "opacus-hooks", "opacus-ghost", "jax", "jax-vmap", "jax-fast"]
NUM_UNITS = 60_000
SEQ, VOCAB, D_MODEL, HEADS, MLP_DIM, RANK, LORA_CLASSES = 64, 256, 128, 4, 256, 8, 2


# ------------------------------------------------------------------------------------------------
# torch models (the flax ones live in dptrain.models.flax_models)
# ------------------------------------------------------------------------------------------------


def torch_model(name: str):
    import torch
    from torch import nn

    from dptrain.config import ModelConfig
    from dptrain.models.torch_models import build_torch_model

    if name == "mlp":
        return build_torch_model(ModelConfig(hidden=[512, 256], activation="relu"), 784, 10)
    if name == "br35h":
        return build_torch_model(ModelConfig(**BR35H), (1, 64, 64), 10)
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 5 * 5, 10))

    class LoRALinear(nn.Module):
        def __init__(self, d: int, e: int):
            super().__init__()
            self.base = nn.Linear(d, e).requires_grad_(False)
            self.lora_a = nn.Linear(d, RANK, bias=False)
            self.lora_b = nn.Linear(RANK, e, bias=False)
            nn.init.zeros_(self.lora_b.weight)
            self.scale = 16.0 / RANK

        def forward(self, x):
            return self.base(x) + self.scale * self.lora_b(self.lora_a(x))

    class Block(nn.Module):
        """Attention written with plain Linear layers (Opacus hooks cannot see inside MultiheadAttention)."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, D_MODEL).requires_grad_(False)
            self.register_buffer("pos", 0.02 * torch.randn(SEQ, D_MODEL))
            self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(D_MODEL, elementwise_affine=False) for _ in range(3))
            self.q, self.k, self.v, self.o = (LoRALinear(D_MODEL, D_MODEL) for _ in range(4))
            self.fc1, self.fc2 = LoRALinear(D_MODEL, MLP_DIM), LoRALinear(MLP_DIM, D_MODEL)
            self.head = nn.Linear(D_MODEL, LORA_CLASSES, bias=False).requires_grad_(False)

        def forward(self, tokens):
            h = self.emb(tokens.long()) + self.pos
            x = self.ln1(h)
            b, t, d = x.shape
            q, k, v = (m(x).view(b, t, HEADS, d // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // HEADS) ** 0.5, dim=-1)
            h = h + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
            h = h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))
            return self.head(self.ln3(h).mean(1))

    return Block()


def flax_model(name: str):
    from dptrain.config import ModelConfig
    from dptrain.models import flax_models as fm

    if name == "mlp":
        return fm.build_flax_model(ModelConfig(hidden=[512, 256], activation="relu"), 784, 10)
    if name == "cnn":
        return fm.SmallCNN()
    if name == "br35h":
        return fm.build_flax_model(ModelConfig(**BR35H), (1, 64, 64), 10)
    return fm.LoRATransformer(vocab=VOCAB, seq_len=SEQ, d_model=D_MODEL, heads=HEADS, mlp=MLP_DIM, rank=RANK,
                              num_classes=LORA_CLASSES)


def data(name: str, batch: int, channels_last: bool):
    import numpy as np

    rng = np.random.default_rng(0)
    if name == "mlp":
        x = rng.normal(size=(batch, 784)).astype(np.float32)
    elif name == "cnn":
        x = rng.normal(size=(batch, 28, 28, 1) if channels_last else (batch, 1, 28, 28)).astype(np.float32)
    elif name == "br35h":  # both backends take NCHW (ImageCNN transposes inside)
        x = rng.random((batch, 1, 64, 64), dtype=np.float32)
    else:
        x = rng.integers(0, VOCAB, (batch, SEQ)).astype(np.int64 if not channels_last else np.int32)
    y = rng.integers(0, LORA_CLASSES if name == "lora" else 10, batch).astype(np.int64)
    return x, y


def plan(mode: str, batch: int, truncated: bool):
    import accounting as acc
    from dptrain.trainers.plan import PrivacyPlan

    q = batch / NUM_UNITS
    scheme = acc.TruncatedPoissonSampling(NUM_UNITS, q, batch) if truncated else acc.PoissonSampling(q)
    private = mode not in ("torch", "jax")
    return PrivacyPlan(scheme=scheme, noise_multiplier=1.0 if private else 0.0,
                       clipping_norm=1.0 if private else None, steps=10**6, expected_batch_size=float(batch),
                       delta=1e-6, accountant="pld", mode="dp" if private else "non_private",
                       privacy_unit="example", size=NUM_UNITS)


def trainer(model_name: str, mode: str):
    from dptrain.config import OptimizerConfig

    opt = OptimizerConfig(name="sgd", lr=0.01, momentum=0.9)
    batch = MODELS[model_name]
    if mode.startswith("jax"):
        from dptrain.trainers.jax_backend import JaxTrainer

        tr = JaxTrainer(opt, clipping="vmap" if mode == "jax-vmap" else "auto", max_physical_batch_size=batch)
        tr.init(flax_model(model_name), plan(mode, batch, truncated=True), seed=0, dp_seed=1)
        return tr, data(model_name, batch, channels_last=True)
    import torch

    from dptrain.trainers.opacus_backend import OpacusTrainer

    torch.manual_seed(0)
    tr = OpacusTrainer(opt, grad_sample_mode="ghost" if mode == "opacus-ghost" else "hooks",
                       max_physical_batch_size=batch)
    tr.init(torch_model(model_name), plan(mode, batch, truncated=False), seed=0, dp_seed=1)
    return tr, data(model_name, batch, channels_last=False)


# ------------------------------------------------------------------------------------------------
# one measurement (in a fresh subprocess)
# ------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(model_name: str, mode: str, steps: int, warmup: int) -> dict:
    import numpy as np

    from dptrain.trainers.base import Batch

    compiles = [0]
    if mode.startswith("jax"):
        import jax

        def count(event, _secs, **_kw):
            compiles[0] += event == "/jax/core/compile/backend_compile_duration"

        jax.monitoring.register_event_duration_secs_listener(count)
    tr, (x, y) = trainer(model_name, mode)
    rows = np.arange(len(y))
    batch = Batch(x, y, rows)
    compiles[0] = 0  # the steps' compilations only (not the model's initialisation)
    for _ in range(warmup):
        tr.dp_step(batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.dp_step(batch)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    # working memory of a step (see the module docstring)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    tr.dp_step(batch)
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    for _ in range(2):
        tr.dp_step(batch)
    peak = (_status_kb("VmHWM") - base) / 1024
    out = {"model": model_name, "mode": mode, "ms_per_step": round(ms, 2),
           "examples_per_s": round(len(y) / (ms / 1000), 1), "peak_mem_mb": round(peak, 1)}
    if mode.startswith("jax"):
        out["compiles"] = compiles[0]
        out["step_compiles"] = tr.compilations()
    return out


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def _run_one(model_name: str, mode: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_name, mode, "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"model": model_name, "mode": mode, "ms_per_step": None, "examples_per_s": None,
                "peak_mem_mb": None, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    base = {}
    for r in rows:
        if r["mode"] in ("torch", "jax") and r["ms_per_step"]:
            base[(r["model"], r["mode"])] = r["ms_per_step"]
    lines = [f"{'model':<6} {'mode':<13} {'ms/step':>10} {'ex/s':>10} {'peak MB':>9} {'x non-private':>14} "
             f"{'compiles':>9}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        ref = base.get((r["model"], "jax" if r["mode"].startswith("jax") else "torch"))
        ratio = r["ms_per_step"] / ref if ref and r["ms_per_step"] else None
        comp = f"{r['compiles']}/{r['step_compiles']}" if "compiles" in r else "-"
        lines.append(f"{r['model']:<6} {r['mode']:<13} {_fmt(r['ms_per_step'], '10.1f')} "
                     f"{_fmt(r['examples_per_s'], '10.0f')} {_fmt(r['peak_mem_mb'], '9.1f')} "
                     f"{_fmt(ratio, '13.2f')}{'x' if ratio else ' '} {comp:>9}"
                     + (f"  ERROR {r['error']}" if "error" in r else ""))
    lines.append("")
    lines += targets(rows)
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    by = {(r["model"], r["mode"]): r for r in rows if r["ms_per_step"]}
    out = ["targets (issue 19):"]

    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    for m in MODELS:
        fast, np_ = by.get((m, "jax-fast")), by.get((m, "jax"))
        if fast and np_:
            x = fast["ms_per_step"] / np_["ms_per_step"]
            out.append(f"  {m}: jax-fast / jax = {x:.2f}x (target <= 1.1x) {verdict(x <= 1.1)}")
            if fast["peak_mem_mb"] and np_["peak_mem_mb"]:
                mem = fast["peak_mem_mb"] / np_["peak_mem_mb"]
                out.append(f"  {m}: jax-fast / jax peak memory = {mem:.2f}x (target <= 1.2x) {verdict(mem <= 1.2)}")
        opacus = [by[(m, k)]["ms_per_step"] for k in ("opacus-hooks", "opacus-ghost") if (m, k) in by]
        if fast and opacus:
            x = fast["ms_per_step"] / min(opacus)
            out.append(f"  {m}: jax-fast vs fastest Opacus = {x:.2f}x (target <= 1) {verdict(x <= 1)}")
        if fast and "step_compiles" in fast:
            out.append(f"  {m}: jax-fast step compilations = {fast['step_compiles']} (target 1) "
                       f"{verdict(fast['step_compiles'] == 1)}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per (model, mode)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (JAX compiles in the first)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 timed steps, 1 warm-up")
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.worker:
        model_name, mode = args.worker
        print(json.dumps(measure(model_name, mode, args.steps, args.warmup)))
        return
    rows = []
    for m in args.models.split(","):
        for mode in args.modes.split(","):
            if m not in MODELS or mode not in MODES:
                raise SystemExit(f"unknown model/mode {m}/{mode}; models {list(MODELS)}, modes {MODES}")
            steps = args.steps if mode != "opacus-hooks" or args.quick else max(3, args.steps // 3)
            rows.append(_run_one(m, mode, steps, args.warmup))
            if not args.json:
                print(f"  measured {m}/{mode}: {rows[-1]['ms_per_step']} ms/step", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
