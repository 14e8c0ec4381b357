"""The release boundary (issue 14): for every command, parse every file under release/ and fail on anything
that must not be there -- the secret DP seed, per-record values, exact counts the statement does not declare
public, evaluation on real records, audit results, canary coins.

The DP count of units is pinned in-process (its noise is the OS CSPRNG's) so that it cannot coincide with the
exact count being searched for; sweeps run in child processes and declare a public size instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from dptrain.config import load_recipe
from dptrain.run import audit_run, train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
DP_SEED = 734512987612345671
FORBIDDEN_KEYS = {"metrics", "audit", "loss_attack", "evaluation", "n_train", "n_test", "n_validation", "num_units",
                  "predictions", "canaries", "included", "dp_seed", "y_true", "score", "n_train_used",
                  "n_train_available", "canary_auc", "auroc", "accuracy", "tpr_at_fpr"}
RELEASE_NAMES = {"config.yaml", "ledger.json", "privacy.json", "model.safetensors", "model.json", "synthetic.jsonl",
                 "DATACARD.md", "selection.json", "adapter_config.json", "adapter_model.safetensors", "README.md",
                 "MODEL_CARD.md"}


def _walk(obj, path="$"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k, None
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, None, obj


def scan_release(release: Path, *, exact_counts: set[int], seed: int | None) -> list[str]:
    """Problems found under ``release`` (empty: clean)."""
    problems = []
    files = [p for p in release.rglob("*") if p.is_file()]
    assert files, f"{release} is empty"
    for f in files:
        rel = f.relative_to(release)
        if f.name not in RELEASE_NAMES:
            problems.append(f"{rel}: not a releasable file name")
        blob = f.read_bytes()
        if seed is not None and (str(seed).encode() in blob or seed.to_bytes(8, "little") in blob
                                 or seed.to_bytes(8, "big") in blob):
            problems.append(f"{rel}: holds the secret DP seed")
        parsed = None
        if f.suffix == ".json":
            parsed = json.loads(blob)
        elif f.suffix == ".yaml":
            parsed = yaml.safe_load(blob)
        elif f.suffix == ".jsonl":
            parsed = [json.loads(line) for line in blob.decode().splitlines()]
        elif f.suffix == ".safetensors":
            from safetensors.numpy import load

            for name, arr in load(blob).items():
                if any(d in exact_counts for d in arr.shape):
                    problems.append(f"{rel}: tensor {name} has a dimension equal to an exact count {arr.shape}")
            continue
        if parsed is not None:
            for path, key, value in _walk(parsed):
                if key is not None and key in FORBIDDEN_KEYS and f.name != "config.yaml":  # the recipe's own fields
                    problems.append(f"{rel}: {path}.{key} must not be released")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                        and float(value).is_integer() and int(value) in exact_counts:
                    problems.append(f"{rel}: {path} = {value} is an exact count of the data")
        if f.suffix in (".md", ".txt", ".yaml", ".jsonl"):
            text = blob.decode()
            for c in exact_counts:
                if f" {c} " in f" {text} ".replace("\n", " ").replace(",", " ").replace(".", " ").replace(":", " "):
                    problems.append(f"{rel}: mentions the exact count {c}")
    return problems


def _counts(record: dict) -> set[int]:
    d = record["data"]
    out = {d["n_train"], d["n_test"], d["num_units"]}
    if d.get("n_validation"):
        out.add(d["n_validation"])
    return {c for c in out if c > 20}  # small numbers (layer sizes, epochs) are not identifying


def test_train_release_is_clean(tmp_path, pinned_count):
    recipe = load_recipe(RECIPE, ["training.epochs=1", "model.hidden=[8]", "privacy.epsilon=4",
                                  "privacy.audit.canaries=50", "data.validation_fraction=0.1"])
    result = train(recipe, tmp_path / "run", dp_seed=DP_SEED, progress=False)
    release = tmp_path / "run" / "release"
    assert scan_release(release, exact_counts=_counts(result.record), seed=DP_SEED) == []
    assert result.record["privacy"]["units"]["value"] != result.record["data"]["num_units"]
    # the audit re-run writes only to private/
    before = {p: p.read_bytes() for p in release.rglob("*") if p.is_file()}
    audit_run(tmp_path / "run")
    assert {p: p.read_bytes() for p in release.rglob("*") if p.is_file()} == before
    assert (tmp_path / "run" / "private" / "audit.json").exists()


def test_jax_release_is_clean(tmp_path, pinned_count):
    recipe = load_recipe(RECIPE, ["training.epochs=1", "model.hidden=[8]", "privacy.epsilon=4",
                                  "trainer.backend=jax"])
    result = train(recipe, tmp_path / "run", dp_seed=DP_SEED, progress=False)
    assert result.record["privacy"]["sampling"] == "poisson"  # no truncation: no n in the event
    assert scan_release(tmp_path / "run" / "release", exact_counts=_counts(result.record), seed=DP_SEED) == []


def test_scan_catches_what_it_must(tmp_path):
    """The scanner itself fails on each kind of leak (so a clean scan means something)."""
    rel = tmp_path / "release"
    rel.mkdir()
    (rel / "privacy.json").write_text(json.dumps({"epsilon": 1.0, "n_train": 1604}))
    assert any("n_train" in p for p in scan_release(rel, exact_counts=set(), seed=None))
    (rel / "privacy.json").write_text(json.dumps({"epsilon": 1.0, "units": {"value": 1604}}))
    assert any("exact count" in p for p in scan_release(rel, exact_counts={1604}, seed=None))
    (rel / "privacy.json").write_text(json.dumps({"epsilon": 1.0}))
    (rel / "checkpoint.pt").write_bytes(b"x" + DP_SEED.to_bytes(8, "little"))
    problems = scan_release(rel, exact_counts=set(), seed=DP_SEED)
    assert any("seed" in p for p in problems) and any("not a releasable" in p for p in problems)
    (rel / "checkpoint.pt").unlink()
    (rel / "DATACARD.md").write_text("Training used 1604 records.")
    assert any("mentions" in p for p in scan_release(rel, exact_counts={1604}, seed=None))
