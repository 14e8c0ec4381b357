"""The audit inside real runs (ACTG175): canaries, audit.json, `dptrain audit`, and a broken trainer caught."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dptrain.audit.canaries import FILE, load_canaries
from dptrain.cli import main
from dptrain.config import RecipeError, load_recipe
from dptrain.data import load_tabular
from dptrain.run import train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
# a wider MLP memorises canaries better: a stronger attack on the non-private run
AUDITED = ["privacy.audit.canaries=1000", "model.hidden=[128]"]
KEYS = {"epsilon_lower_bound", "max_certifiable_epsilon", "claimed_epsilon", "canary_auc", "confidence"}


def recipe(*extra: str):
    return load_recipe(RECIPE, [*AUDITED, *extra])


@pytest.fixture(scope="module")
def nonprivate_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "inf"
    train(recipe("privacy.epsilon=inf"), out, progress=False)
    return out


def test_nonprivate_run_gives_a_clearly_positive_lower_bound(nonprivate_run):
    a = json.loads((nonprivate_run / "private" / "audit.json").read_text())
    assert KEYS <= set(a)
    assert a["claimed_epsilon"] == "inf" and a["status"] == "ok" and a["confidence"] == 0.95
    assert a["epsilon_lower_bound"] > 0.7, a  # measured ~1.3 (max certifiable with 1000 canaries: 4.98)
    assert a["canary_auc"] > 0.7, a           # measured ~0.79
    assert a["max_certifiable_epsilon"] == pytest.approx(4.98, abs=0.05)
    rec = json.loads((nonprivate_run / "private" / "record.json").read_text())
    assert rec["audit"]["epsilon_lower_bound"] == a["epsilon_lower_bound"]
    assert 0 <= a["loss_attack"]["auc"] <= 1 and a["loss_attack"]["n_pos"] == rec["data"]["n_train"]


def test_canaries_never_reach_metrics_or_predictions(nonprivate_run):
    rec = json.loads((nonprivate_run / "private" / "record.json").read_text())
    data = load_tabular(recipe().data, seed=0)
    preds = pd.read_parquet(nonprivate_run / "private" / "predictions.parquet")
    assert len(preds) == len(data.y_test) == rec["metrics"]["test"]["n"]
    np.testing.assert_array_equal(preds.y_true.to_numpy(), data.y_test)
    metrics = (nonprivate_run / "private" / "metrics.jsonl").open()
    assert all(m["train_loss_mean"] is None for m in map(json.loads, metrics))
    # the units (and q) count every canary, included or not: q does not reveal the coins
    assert rec["privacy"]["sampling_rate"] == pytest.approx(256 / (data.num_units + 1000))
    can = load_canaries(nonprivate_run / "private" / FILE)
    assert len(can) == 1000 and 350 < can.included.sum() < 650
    # the coins appear nowhere but canaries.npz
    coins = "".join("1" if b else "0" for b in can.included[:64])
    for f in (p for p in nonprivate_run.rglob("*") if p.is_file()):
        if f.name not in (FILE, "predictions.parquet"):
            assert coins not in f.read_text(errors="ignore"), f
    # canaries are synthetic: no canary equals a real training row
    x = np.concatenate([data.x_train, data.x_test])
    assert not (np.abs(can.x[:, None, :5] - x[None, :, :5]).sum(-1) == 0).all(-1).any()


def test_audit_cli_recomputes_the_same_numbers(nonprivate_run, capsys):
    before = json.loads((nonprivate_run / "private" / "audit.json").read_text())
    assert main(["audit", str(nonprivate_run)]) == 0
    out = capsys.readouterr().out
    assert "empirical lower bound" in out and "max certifiable" in out
    after = json.loads((nonprivate_run / "private" / "audit.json").read_text())
    assert after["epsilon_lower_bound"] == pytest.approx(before["epsilon_lower_bound"], abs=1e-9)
    assert after["canary_auc"] == pytest.approx(before["canary_auc"], abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_dp_run_at_epsilon_1_stays_below_1(tmp_path, seed):
    out = tmp_path / f"eps1-{seed}"
    train(recipe("privacy.epsilon=1", f"seed={seed}", "training.epochs=10"), out, progress=False)
    a = json.loads((out / "private" / "audit.json").read_text())
    assert a["status"] == "ok" and a["epsilon_lower_bound"] <= 1.0, a


def test_broken_trainer_is_caught(tmp_path, monkeypatch, capsys):
    """Noise switched off inside the trainer while the ledger still accounts for it: the audit must flag it."""
    import torch

    from dptrain.trainers.opacus_backend import OpacusTrainer

    monkeypatch.setattr(OpacusTrainer, "_noise", lambda self, shape, std, dtype: torch.zeros(shape, dtype=dtype))
    out = tmp_path / "broken"
    rc = main(["train", str(RECIPE), "--out", str(out), "--quiet", "--set", "privacy.epsilon=0.3",
               "--set", "optimizer.lr=2.0", *(a for s in AUDITED for a in ("--set", s))])
    err = capsys.readouterr().err
    a = json.loads((out / "private" / "audit.json").read_text())
    assert a["claimed_epsilon"] <= 0.3
    assert a["status"] == "VIOLATION" and a["epsilon_lower_bound"] > a["claimed_epsilon"], a
    assert rc == 3 and "PRIVACY VIOLATION" in err
    assert json.loads((out / "private" / "record.json").read_text())["audit"]["status"] == "VIOLATION"


def test_too_few_canaries_refused():
    with pytest.raises(RecipeError, match="privacy.audit.canaries must be 0"):
        load_recipe(RECIPE, ["privacy.audit.canaries=5"])


def test_run_without_canaries_still_has_the_loss_attack(tmp_path):
    out = tmp_path / "plain"
    train(load_recipe(RECIPE, ["training.epochs=1", "model.hidden=[8]"]), out, progress=False)
    a = json.loads((out / "private" / "audit.json").read_text())
    assert a["epsilon_lower_bound"] is None and a["status"] == "no canaries"
    assert math.isfinite(a["loss_attack"]["auc"])
    assert not (out / FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["opacus", "jax"])
def test_dp_runs_at_epsilon_1_never_exceed_1_across_seeds(tmp_path, backend):
    """make test-slow: 6 seeds per backend, full recipe length."""
    for seed in range(6):
        out = tmp_path / f"{backend}-{seed}"
        train(recipe("privacy.epsilon=1", f"seed={seed}", f"trainer.backend={backend}"), out, progress=False)
        a = json.loads((out / "private" / "audit.json").read_text())
        assert a["status"] == "ok" and a["epsilon_lower_bound"] <= 1.0, (seed, a)
