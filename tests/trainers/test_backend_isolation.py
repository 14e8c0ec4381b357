"""Backends that stand alone, and checkpoints that are never unpickled.

* A JAX run (``dptrain train`` then ``dptrain predict``) works with torch and Opacus unimportable, and an Opacus
  run with jax, flax, optax and jax_privacy unimportable; asking for what the blocked side provides (the
  Opacus backend without torch, canaries without jax_privacy) is one clear error line and writes nothing.
  Each check runs in a child process whose ``sys.meta_path`` refuses the blocked packages; it reports the exit
  codes, stderr and which blocked modules ended up in ``sys.modules`` (none may).
* The checkpoint file refuses damage (a flipped byte anywhere, truncation, a foreign or legacy file, a
  directory, a valid checksum over a malformed header) with one CheckpointError line naming the file.
* No ``torch.load`` (nor pickle) reads a checkpoint anywhere in dptrain/.
* No import circle among the trainers, the released model and the shared value types, counting the imports
  inside functions too (``distributed`` <-> ``opacus_backend`` was one).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from dptrain.trainers.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
TINY = ["training.epochs=1", "model.hidden=[8]"]
TORCH = ["torch", "opacus", "torchvision", "monai"]
JAX = ["jax", "jaxlib", "flax", "optax", "jax_privacy", "chex", "orbax"]

# The child: block imports, then run steps: ["main", argv] (the CLI, stderr captured) or ["csv", run_dir, path]
# (records for `predict`, built from release/model.json's declared input: mid-bounds and first categories).
CHILD = textwrap.dedent("""
    import contextlib, importlib.abc, io, json, sys

    BLOCKED = set(sys.argv[1].split(","))


    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked by this test")
            return None


    sys.meta_path.insert(0, Blocker())
    from dptrain.cli import main

    out = []
    for step in json.loads(sys.argv[2]):
        if step[0] == "main":
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(step[1])
            out.append({"rc": rc, "stderr": err.getvalue()})
        else:
            import pandas as pd

            spec = json.loads(open(step[1] + "/release/model.json").read())
            cols = {c["name"]: [sum(c["bounds"]) / 2] * 3 if c["type"] == "numeric" else [c["categories"][0]] * 3
                    for c in spec["input"]["columns"]}
            pd.DataFrame(cols).to_csv(step[2], index=False)
            out.append({"rc": 0, "stderr": ""})
    print("RESULT " + json.dumps({"steps": out, "leaked": sorted(m for m in sys.modules
                                                                 if m.split(".")[0] in BLOCKED)}))
""")


def _child(blocked: list[str], steps: list, tmp_path: Path) -> dict:
    env = {**os.environ, "DPTRAIN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(blocked), json.dumps(steps)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _train(out: Path, backend: str, *more: str) -> list:
    sets = [a for o in [*TINY, f"trainer.backend={backend}", *more] for a in ("--set", o)]
    return ["main", ["train", str(RECIPE), *sets, "--out", str(out), "--quiet"]]


def _one_line_error(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dptrain: error: "), stderr
    assert "Traceback" not in stderr and all(n in stderr for n in needles), stderr


def _released(run: Path) -> None:
    assert {p.name for p in (run / "release").iterdir()} >= {"model.safetensors", "model.json", "privacy.json"}
    assert not list(run.rglob("checkpoint*"))  # the secret seed is gone after the run


def test_jax_run_and_predict_without_torch(tmp_path):
    run, scores, records = tmp_path / "jax", tmp_path / "scores.csv", tmp_path / "new.csv"
    res = _child(TORCH, [_train(run, "jax", "privacy.audit.canaries=0"), ["csv", str(run), str(records)],
                         ["main", ["predict", str(run), "--data", str(records), "--out", str(scores)]],
                         _train(tmp_path / "refused", "opacus")], tmp_path)
    train, _, predict, refused = res["steps"]
    assert train["rc"] == 0 and predict["rc"] == 0, res
    assert res["leaked"] == []  # torch never imported, not even half-way
    _released(run)
    assert json.loads((run / "release" / "model.json").read_text())["backend"] == "jax"
    assert len(scores.read_text().splitlines()) == 4  # header + one score per record
    assert refused["rc"] == 2
    _one_line_error(refused["stderr"], "trainer.backend: opacus needs torch")
    assert not (tmp_path / "refused").exists()


def test_opacus_run_and_predict_without_jax(tmp_path):
    run, scores, records = tmp_path / "opacus", tmp_path / "scores.csv", tmp_path / "new.csv"
    res = _child(JAX, [_train(tmp_path / "canaries", "opacus", "privacy.audit.canaries=20"),
                       _train(run, "opacus", "privacy.audit.canaries=0"), ["csv", str(run), str(records)],
                       ["main", ["predict", str(run), "--data", str(records), "--out", str(scores)]]], tmp_path)
    canaries, train, _, predict = res["steps"]
    assert canaries["rc"] == 2
    _one_line_error(canaries["stderr"], "privacy.audit.canaries", "canaries=0")
    assert not (tmp_path / "canaries").exists()  # refused before anything was written
    assert train["rc"] == 0 and predict["rc"] == 0, res
    assert res["leaked"] == []
    _released(run)
    assert len(scores.read_text().splitlines()) == 4


# ---------------------------------------------------------------- the checkpoint file


STATE = {"trainer": {"params": {"Dense_0/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "~x": np.zeros(0)},
                     "optimizer": [np.array(3, np.int32), np.float64(0.5)], "steps_done": 3,
                     "$array": "a plain key", "ema": None, "betas": (0.9, 0.999)},
         "dp_seed": 2**62 + 12345, "ledger": '{"entries": []}', "loss": float("nan"), "step": 7}


def test_checkpoint_round_trips_arrays_and_plain_values(tmp_path):
    path = tmp_path / "c.dptckpt"
    save_checkpoint(path, STATE)
    got = load_checkpoint(path)
    t = got["trainer"]
    np.testing.assert_array_equal(t["params"]["Dense_0/kernel"], STATE["trainer"]["params"]["Dense_0/kernel"])
    assert t["params"]["Dense_0/kernel"].dtype == np.float32 and t["params"]["~x"].shape == (0,)
    assert t["optimizer"][0].shape == () and t["optimizer"][0].dtype == np.int32 and t["optimizer"][1] == 0.5
    assert t["$array"] == "a plain key" and t["ema"] is None and t["betas"] == [0.9, 0.999]  # tuples: lists
    assert got["dp_seed"] == STATE["dp_seed"] and got["step"] == 7 and np.isnan(got["loss"])
    assert path.read_bytes().startswith(MAGIC)


def test_checkpoint_refuses_what_it_cannot_store(tmp_path):
    for bad in ({"x": object()}, {1: np.zeros(2)}, {"x": np.array(["a"])}, [np.zeros(1)]):
        with pytest.raises(TypeError, match="checkpoint"):
            save_checkpoint(tmp_path / "c", bad)
    assert not (tmp_path / "c").exists()


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and all(n in msg for n in needles), msg
    return msg


def test_every_flipped_byte_and_every_truncation_is_refused(tmp_path):
    path = tmp_path / "c.dptckpt"
    save_checkpoint(path, STATE)
    blob = path.read_bytes()
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x01
        path.write_bytes(bytes(damaged))
        _refused(path, "refusing to load")
    for n in range(0, len(blob), 7):
        path.write_bytes(blob[:n])
        assert re.search("truncated|checksum mismatch", _refused(path, "refusing to load"))


def test_valid_checksum_over_a_malformed_header_is_refused(tmp_path):
    """Damage the digest cannot see (a buggy writer): garbage JSON, another format, a dangling array."""
    path = tmp_path / "c.dptckpt"

    def write(header: bytes, arrays: bytes = save({})) -> None:
        body = MAGIC + len(header).to_bytes(8, "little") + header + arrays
        path.write_bytes(body + hashlib.sha256(body).digest())

    write(b"{not json")
    _refused(path, "malformed header")
    write(b'{"format": "something/else", "tree": {}}')
    _refused(path, "unknown format")
    write(b'{"format": "dptrain.checkpoint/2", "tree": {"w": {"$array": "/w"}}}')
    _refused(path, "not stored")
    write(b'{"format": "dptrain.checkpoint/2", "tree": {}}', b"garbage")
    _refused(path, "array section")
    body = MAGIC + (10**9).to_bytes(8, "little") + b"{}"
    path.write_bytes(body + hashlib.sha256(body).digest())
    _refused(path, "header length")


def test_foreign_legacy_missing_and_directory_files_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100 + b"\x11" * 32 + b"DPTCKPT1")  # dptrain <= 0.1: torch.save
    _refused(path, "older dptrain", "no longer loaded")
    path.write_bytes(b"\x80\x04" + b"\x00" * 60)  # a pickle
    _refused(path, "not a dptrain checkpoint")
    _refused(tmp_path, "is a directory")
    with pytest.raises(CheckpointError, match="no file at"):
        load_checkpoint(tmp_path / "missing")


def test_no_torch_load_or_pickle_reads_checkpoints():
    """Checkpoints are never unpickled: torch.load only where a public backbone's .pth file is read, and there
    with ``weights_only=True`` (torch's restricted unpickler: tensors and plain containers, no code); the checkpoint
    module and the run lifecycle that reads it import neither pickle nor torch."""
    sources = {p: p.read_text() for p in (ROOT / "dptrain").rglob("*.py")}
    loads = {str(p.relative_to(ROOT)): [line for line in text.splitlines() if "torch.load(" in line]
             for p, text in sources.items() if "torch.load(" in text}
    assert set(loads) <= {"dptrain/models/backbones.py"}, loads
    assert all("weights_only=True" in call for calls in loads.values() for call in calls), loads
    for name in ("trainers/checkpoint.py", "lifecycle.py"):
        text = sources[ROOT / "dptrain" / name]
        assert not re.search(r"^\s*(import|from)\s+(pickle|torch|dill|cloudpickle|joblib)\b", text, re.M), name


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The dptrain modules ``path`` imports, at module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out & modules


def test_no_import_circle_in_trainers_release_and_values():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "dptrain").rglob("*.py")}
    graph = {m: _imports(p, set(files)) - {m} for m, p in files.items()}
    ours = [m for m in graph if m.startswith(("dptrain.trainers.", "dptrain.release", "dptrain.values"))]

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    assert [m for m in ours if reaches(m, m)] == []
    assert "dptrain.trainers.distributed" not in graph["dptrain.trainers.opacus_backend"]
