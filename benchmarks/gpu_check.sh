#!/usr/bin/env bash
# The project's GPU check: one prepared script for a machine with a CUDA GPU (issues 17 and 19), at most ~10
# minutes in all. It runs
#   1. benchmarks/step_cost.py --json (torch / Opacus / JAX DP step per model; JAX runs on the GPU only
#      when a CUDA jaxlib is installed, the table says which device each backend used),
#   2. recipes/br35h-cnn-gpu.yaml at reduced length (2 epochs, augmult 4),
#   3. recipes/iu-xray-reports-synth-gpu.yaml at reduced length (1 epoch, 200 records, no DP baseline),
# each under its own timeout, and writes one Markdown table to $OUT/gpu_check.md (default gpu-check/).
# A step that fails or times out is a row that says so; the script never stops half-way without a table.
# Needs: the project installed (make install, or a carried .venv) with a CUDA build of torch; no downloads.
#
#   bash benchmarks/gpu_check.sh            # writes gpu-check/gpu_check.md
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export DPTRAIN_HOME="$OUT/home"  # budgets of these short runs never touch the user's ledger

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch ($PY); nothing to check" | tee "$OUT/gpu_check.md"
  exit 2
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" > "$OUT/device.txt"
"$PY" -c "import jax; print('jax devices:', jax.devices())" >> "$OUT/device.txt" 2>&1 || true

run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$OUT/status.txt"
}
: > "$OUT/status.txt"
run step_cost 200 "$PY" benchmarks/step_cost.py --json --steps 10 --warmup 2
run br35h 180 "$PY" -m dptrain train recipes/br35h-cnn-gpu.yaml --out "$OUT/br35h" \
  --set training.epochs=2 --set training.augmult=4
run iu_synth 220 "$PY" -m dptrain synth recipes/iu-xray-reports-synth-gpu.yaml --out "$OUT/iu-synth" \
  --set training.epochs=1 --set synthesis.records=200 --set synthesis.evaluation.dp_baseline=false

"$PY" - "$OUT" <<'EOF'
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
status = {l.split()[0]: (int(l.split()[1]), int(l.split()[2])) for l in (out / "status.txt").read_text().splitlines()}
lines = [f"# GPU check {time.strftime('%Y-%m-%d')}", "", (out / "device.txt").read_text().strip(), "",
         "| check | exit | wall s | result |", "|---|---|---|---|"]
def rec(d):
    p = out / d / "private" / "record.json"
    return json.loads(p.read_text()) if p.exists() else None
for name, (rc, secs) in status.items():
    res = "timed out" if rc == 124 else ("failed: see " + name + ".log" if rc else "")
    if name == "step_cost" and rc == 0:
        try:
            rows = json.loads((out / "step_cost.log").read_text().strip().splitlines()[-1])
            res = "; ".join(f"{r.get('model')}/{r.get('mode')}: {r.get('ms_per_step', r.get('ms'))} ms" for r in rows)
        except Exception as e:  # the log is kept; the table says what happened
            res = f"ran; rows not parsed ({e})"
    if name in ("br35h", "iu_synth") and rc == 0:
        r = rec("br35h" if name == "br35h" else "iu-synth")
        if r:
            ev = r.get("evaluation") or r.get("metrics") or {}
            res = f"epsilon {r['privacy'].get('epsilon'):.3f}; " + json.dumps(ev.get("downstream", {}).get("synthetic", ev.get("test", {})))[:200]
    lines.append(f"| {name} | {rc} | {secs} | {res} |")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
