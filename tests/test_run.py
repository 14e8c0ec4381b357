"""End-to-end runs: the run directory, honest epsilon, refusals before writing, crash safety, dataset budgets.

Kept lean for slow CPUs: tiny MLPs, one or two epochs on builtin:actg175 (1604 training rows, q ~ 0.16,
7 steps per epoch). Runs that only need *a* DP run use a fixed noise multiplier (no calibration).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import accounting as acc
from dptrain.cli import main
from dptrain.config import RecipeError, dump_recipe, load_recipe, parse_recipe
from dptrain.data import DataError, load_tabular
from dptrain.lifecycle import CHECKPOINT
from dptrain.run import RunError, train
from dptrain.trainers.checkpoint import CheckpointError, load_checkpoint
from dptrain.trainers.plan import PrivacyPlan, count_units

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
TINY = ["training.epochs=1", "training.batch_size=256", "model.hidden=[8]"]
SIGMA = "privacy.noise_multiplier=1.5"  # instead of an epsilon target: no calibration, fast
NO_EPS = "privacy.epsilon="  # empty value -> None, so that noise_multiplier may be given
DP_SEED = 918273645546372819  # secret; must never appear outside the checkpoint
METRIC_KEYS = {"epoch", "step", "epsilon_upper_bound", "train_loss_mean"}
RELEASE_FILES = {"config.yaml", "ledger.json", "privacy.json", "model.safetensors", "model.json", "MODEL_CARD.md"}
PRIVATE_FILES = {"run_id", "state.json", "metrics.jsonl", "predictions.parquet", "record.json", "audit.json",
                 "MODEL_CARD.md"}


def rec_path(out: Path) -> Path:
    return out / "private" / "record.json"


def ledger_path(out: Path) -> Path:
    return out / "release" / "ledger.json"



def tiny(*extra: str):
    return load_recipe(RECIPE, [*TINY, *extra])


def tiny_sigma(*extra: str):
    return tiny(NO_EPS, SIGMA, *extra)


def _cli_train(recipe_overrides: list[str], out: Path, *flags: str) -> int:
    sets = [a for o in recipe_overrides for a in ("--set", o)]
    return main(["train", str(RECIPE), *sets, "--out", str(out), "--quiet", *flags])


def _assert_one_clean_line(err: str) -> None:
    assert err.startswith("dptrain: error: ")
    assert err.strip().count("\n") == 0, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 1. a tiny DP run and its directory


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """One tiny DP run with a target epsilon (the calibrated path), shared by the tests below."""
    recipe = tiny("privacy.epsilon=1")
    out = tmp_path_factory.mktemp("dp") / "run"
    result = train(recipe, out, dp_seed=DP_SEED, progress=False)
    return recipe, result


def test_dp_run_writes_the_run_directory(dp_run):
    _, result = dp_run
    out = result.out_dir
    assert {p.name for p in out.iterdir()} == {"release", "private"}
    assert {p.name for p in (out / "release").iterdir()} == RELEASE_FILES  # and no temporary files left behind
    assert {p.name for p in (out / "private").iterdir()} == PRIVATE_FILES  # the checkpoint (secret seed) is gone
    record = json.loads(rec_path(out).read_text())
    assert record == json.loads(json.dumps(result.record))  # the returned record is the written one
    assert record["status"] == "finished" and record["training"]["resumed"] is False
    assert record["training"]["steps"] == record["privacy"]["planned_steps"] == record["privacy"]["steps"]
    assert load_recipe(out / "release" / "config.yaml") == dp_run[0]  # config.yaml reproduces the recipe
    assert json.loads((out / "release" / "privacy.json").read_text()) == record["privacy"]
    assert record["checkpoint_kept"] is False


def test_metrics_are_per_epoch_aggregates_only(dp_run):
    _, result = dp_run
    lines = (result.out_dir / "private" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    steps = result.record["privacy"]["steps"]
    per_epoch = result.record["privacy"]["sampling_rate"]
    # one line per epoch (plus one for a final partial epoch), never one per step or per example
    assert 1 <= len(rows) <= math.ceil(steps * per_epoch) + 1 < steps
    for row in rows:
        assert set(row) == METRIC_KEYS, row
        assert all(v is None or isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in row.values())
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows) and rows[-1]["step"] == steps
    eps = [r["epsilon_upper_bound"] for r in rows]
    assert eps == sorted(eps) and eps[-1] >= result.record["privacy"]["epsilon"]  # an upper bound
    # the training loss is an un-noised statistic of private batches: never written for a DP run
    assert all(r["train_loss_mean"] is None for r in rows)


def test_a_finished_run_keeps_no_secret_seed(dp_run):
    _, result = dp_run
    for path in result.out_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert str(DP_SEED).encode() not in blob and DP_SEED.to_bytes(8, "little") not in blob, path
    assert not list(result.out_dir.rglob("checkpoint*"))


def test_keep_checkpoint_keeps_it_in_private_loudly(tmp_path, capsys):
    out = tmp_path / "kept"
    assert _cli_train([*TINY, NO_EPS, SIGMA], out, "--keep-checkpoint") == 0
    assert "SECRET DP SEED" in capsys.readouterr().err
    assert load_checkpoint(out / "private" / CHECKPOINT)["step"] > 0
    assert (out / "private" / "CHECKPOINT-HOLDS-SECRET-DP-SEED.txt").exists()
    assert not list((out / "release").rglob("checkpoint*"))
    assert json.loads(rec_path(out).read_text())["checkpoint_kept"] is True


def test_predictions_are_test_rows_with_sensitive_attributes(dp_run):
    _, result = dp_run
    frame = pd.read_parquet(result.out_dir / "private" / "predictions.parquet")
    data = result.record["data"]
    assert len(frame) == data["n_test"] != data["n_train"]
    assert {"y_true", "score", "race", "gender", "age_group"} <= set(frame.columns)
    assert frame["score"].between(0, 1).all() and set(frame["y_true"]) <= {0, 1}
    assert set(frame["gender"]) == {"female", "male"} and set(frame["race"]) == {"white", "non-white"}
    assert frame["y_true"].mean() == pytest.approx(result.record["metrics"]["test"]["positive_rate"])


# ---------------------------------------------------------------- 2. epsilon honesty


def test_epsilon_is_the_ledgers_and_matches_an_independent_computation(dp_run):
    recipe, result = dp_run
    p = result.record["privacy"]
    eps, delta, q, sigma, steps = p["epsilon"], p["delta"], p["sampling_rate"], p["noise_multiplier"], p["steps"]
    ledger = acc.PrivacyLedger.load(ledger_path(result.out_dir))
    assert ledger.steps == steps
    assert eps == ledger.epsilon(delta)

    # recomputed directly with dp_accounting under add/remove: the DP count of units, then the steps
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant

    units = p["units"]
    assert units["source"] == "dp_count" and p["releases"]["unit_count"]["l2_sensitivity"] == 1.0
    count_sigma = recipe.privacy.count_noise_multiplier
    direct = pld_privacy_accountant.PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                  value_discretization_interval=1e-4)
    direct.compose(dpa.GaussianDpEvent(count_sigma))
    direct.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    assert direct.get_epsilon(delta) == pytest.approx(eps, rel=1e-3)
    assert p["epsilon_independent_check"]["epsilon"] == pytest.approx(eps, rel=1e-3)

    assert eps <= p["target_epsilon"] == recipe.privacy.epsilon == 1.0
    assert eps > 0.9  # calibrated to the target, not wildly over-noised
    # q and the steps come from the released count, never from the exact one
    assert q == pytest.approx(256 / units["value"])
    assert steps == math.ceil(recipe.training.epochs * units["value"] / 256)


def test_epsilon_agrees_with_opacus_accountants(dp_run):
    from opacus.accountants import PRVAccountant, RDPAccountant

    _, result = dp_run
    p = result.record["privacy"]
    delta, q, sigma, steps = p["delta"], p["sampling_rate"], p["noise_multiplier"], p["steps"]
    ledger = acc.PrivacyLedger.load(ledger_path(result.out_dir))
    ledger_steps_only = acc.PrivacyLedger()
    for event, count in ledger.pairs():
        if not isinstance(event, __import__("dp_accounting").GaussianDpEvent):  # leave out the DP count of units
            ledger_steps_only.compose(event, count)
    steps_eps = ledger_steps_only.epsilon(delta)

    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    # eps_error is Opacus's *absolute* slack (default 0.01, itself 1% of an epsilon near 1): tighten it
    assert prv.get_epsilon(delta, eps_error=1e-3) == pytest.approx(steps_eps, rel=0.01)

    rdp = RDPAccountant()
    rdp.history = [(sigma, q, steps)]
    assert rdp.get_epsilon(delta) == pytest.approx(ledger_steps_only.epsilon(delta, "rdp"), rel=0.01)


def test_record_states_the_full_privacy_statement(dp_run):
    _, result = dp_run
    p = result.record["privacy"]
    required = {"epsilon", "delta", "accountant", "accountant_version", "neighbouring_relation", "privacy_unit",
                "sampling", "sampling_rate", "noise_multiplier", "steps", "clipping_norm", "clipping_granularity",
                "hyperparameter_selection_accounted"}
    assert required <= set(p), required - set(p)
    assert p["accountant"] == "pld" and "dp-accounting" in p["accountant_version"]
    assert p["neighbouring_relation"] == "add_or_remove" and p["privacy_unit"] == "example"
    assert p["sampling"] == "poisson" and p["mode"] == "dp" and "warning" not in p
    assert p["clipping_norm"] == 1.0 and p["clipping_granularity"] == "per example"
    assert p["hyperparameter_selection_accounted"] is False
    assert p["noise_multiplier"] > 0
    assert 0 < p["delta"] < 1 / p["units"]["value"]
    # the exact count is not in the statement (as a whole number; the DP count equals it by chance ~2% of the time)
    n = result.record["data"]["n_train"]
    if p["units"]["value"] != n:
        assert not re.search(rf"(?<![\d.]){n}(?![\d.])", json.dumps(p))


# ---------------------------------------------------------------- 3. non-private runs are flagged


def test_non_private_baseline_is_flagged(tmp_path, capsys):
    out = tmp_path / "baseline"
    assert _cli_train([*TINY, "privacy.epsilon=inf"], out) == 0
    assert "NOT PRIVATE" in capsys.readouterr().out
    p = json.loads(rec_path(out).read_text())["privacy"]
    assert p["mode"] == "non_private" and p["epsilon"] == "inf" and p["noise_multiplier"] == 0
    assert "NOT PRIVATE" in p["warning"]
    assert math.isinf(acc.PrivacyLedger.load(ledger_path(out)).epsilon(p["delta"]))
    # nothing to protect: the training loss is logged
    assert all(math.isfinite(json.loads(line)["train_loss_mean"])
               for line in (out / "private" / "metrics.jsonl").open())


def test_clip_only_run_is_flagged(tmp_path):
    record = train(tiny("privacy.clip_only=true"), tmp_path / "clip", progress=False).record
    p = record["privacy"]
    assert p["mode"] == "clip_only" and p["epsilon"] == "inf" and p["noise_multiplier"] == 0
    assert p["clipping_norm"] == 1.0
    assert "NOT PRIVATE" in p["warning"]
    assert json.loads(rec_path(tmp_path / "clip").read_text())["privacy"]["warning"] == p["warning"]


# ---------------------------------------------------------------- 4. bad input: clear errors, nothing written


def _user_frame(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.random(n), "b": rng.random(n), "y": np.arange(n) % 2,
                         "grp": np.where(np.arange(n) % 3 == 0, "x", "z")})


def _user_recipe(tmp_path: Path, frame: pd.DataFrame, **data) -> dict:
    path = tmp_path / "user.csv"
    frame.to_csv(path, index=False)
    tree_data = {"source": str(path), "label": "y", "numeric": {"a": [0, 1], "b": [0, 1]}, "sensitive": ["grp"]}
    tree_data.update(data)
    return {"name": "user", "data": tree_data, "model": {"hidden": [4]}, "privacy": {"noise_multiplier": 1.0},
            "training": {"epochs": 1, "batch_size": 8}}


def test_user_csv_control_is_valid(tmp_path):
    """The bad-input cases below differ from this valid user file by one defect each."""
    recipe = parse_recipe(_user_recipe(tmp_path, _user_frame()))
    data = load_tabular(recipe.data, seed=0)
    assert data.feature_names == ["a", "b"] and list(data.sensitive_test.columns) == ["grp"]


def _nan_frame():
    f = _user_frame()
    f.loc[5, "a"] = np.nan
    return f


def _text_label_frame():
    f = _user_frame()
    f["y"] = np.where(f["y"] == 1, "yes", "no")
    return f


BAD_DATA = {
    "missing column": (_user_frame, {"numeric": {"a": [0, 1], "b": [0, 1], "c": [0, 1]}},
                       ["data.numeric.c", "'c' is not in"]),
    "non-numeric label": (_text_label_frame, {}, ["data.label", "not numeric", "positive_label"]),
    "NaNs": (_nan_frame, {}, ["data.numeric.a", "missing value"]),
    "sensitive absent": (_user_frame, {"sensitive": ["ethnicity"]}, ["data.sensitive", "'ethnicity'"]),
    "unknown dataset": (_user_frame, {"source": "builtin:nope"}, ["data.source", "'nope'", "builtin:actg175"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_before_anything_is_written(tmp_path, case):
    make_frame, data_fields, words = BAD_DATA[case]
    tree = _user_recipe(tmp_path, make_frame(), **data_fields)
    if case == "unknown dataset":
        tree["data"] = {"source": "builtin:nope"}
    recipe = parse_recipe(tree)
    out = tmp_path / "runs" / "r"
    with pytest.raises(DataError) as err:
        train(recipe, out, progress=False)
    msg = str(err.value)
    for word in words:
        assert word in msg, (word, msg)
    assert "\n" not in msg and "fix:" in msg
    assert not (tmp_path / "runs").exists()


def test_recipe_typos_are_listed_by_field(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, ["privacy.epsilom=2", "trainig.epochs=3"])
    msg = str(err.value)
    assert "privacy.epsilom: unknown field" in msg and "trainig: unknown field" in msg  # all errors at once
    bad = tmp_path / "typo.yaml"
    bad.write_text(RECIPE.read_text().replace("batch_size:", "batchsize:"))
    with pytest.raises(RecipeError, match=r"training\.batchsize: unknown field"):
        load_recipe(bad)


@pytest.mark.parametrize("epsilon", ["0", "-1"])
def test_epsilon_must_be_positive(epsilon):
    with pytest.raises(RecipeError, match=r"privacy.*epsilon must be > 0"):
        load_recipe(RECIPE, [f"privacy.epsilon={epsilon}"])


def test_batch_larger_than_dataset_is_refused(tmp_path):
    out = tmp_path / "runs" / "r"
    with pytest.raises(acc.InvalidParameterError, match=r"training\.batch_size.*5000") as err:
        train(tiny("training.batch_size=5000"), out, progress=False)
    assert err.value.field == "training.batch_size"
    assert not (tmp_path / "runs").exists()


BUDGET_PATH = lambda: acc.budget_path("builtin:actg175")  # noqa: E731 - under this test's $DPTRAIN_HOME


def test_dataset_budget_exceeded_changes_nothing(tmp_path):
    budget_path = BUDGET_PATH()
    budget_path.parent.mkdir(parents=True)
    acc.DatasetBudget.create(budget_path, epsilon=0.5, delta=1e-5)  # the budget this dataset already has
    before = budget_path.read_bytes()
    out = tmp_path / "r"
    with pytest.raises(acc.BudgetExceededError, match=r"over the dataset's total epsilon=0\.5"):
        train(tiny("privacy.epsilon=1", "privacy.delta=0.00001", "privacy.dataset_budget=0.5"), out, progress=False)
    assert budget_path.read_bytes() == before
    assert acc.DatasetBudget(budget_path).runs() == {}
    assert not out.exists()


def test_refused_first_run_creates_no_budget_file(tmp_path):
    parent = tmp_path / "runs"
    with pytest.raises(acc.BudgetExceededError, match="Nothing was written"):
        train(tiny_sigma("privacy.dataset_budget=0.5"), parent / "r", progress=False)
    assert not (parent / "r").exists()
    assert not BUDGET_PATH().exists()


def test_non_empty_out_without_resume_is_refused(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="not empty.*--resume"):
        train(tiny_sigma(), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    cases = [
        ([*TINY, "data.source=builtin:nope"], None, "data.source"),
        ([*TINY, "training.batch_size=5000"], None, "training.batch_size"),
        ([*TINY, "privacy.epsilon=1", "privacy.dataset_budget=0.01"], None, "budget"),
        ([*TINY, NO_EPS, SIGMA], "occupied", "--resume"),
    ]
    for i, (overrides, setup, word) in enumerate(cases):
        out = tmp_path / f"runs{i}" / "r"
        if setup == "occupied":
            out.mkdir(parents=True)
            (out / "x").write_text("")
        assert _cli_train(overrides, out) == 2
        captured = capsys.readouterr()
        _assert_one_clean_line(captured.err)
        assert word in captured.err and captured.out == ""
        assert setup == "occupied" or not out.exists()


def test_cli_reports_recipe_errors_without_traceback(capsys):
    assert main(["train", str(RECIPE), "--set", "privacy.epsilon=-1", "--set", "trainig.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dptrain: error: invalid recipe") and "Traceback" not in err
    assert "privacy.epsilon must be > 0" in err and "trainig: unknown field" in err  # one line per problem
    assert main(["train", str(RECIPE.with_name("nope.yaml"))]) == 2
    _assert_one_clean_line(capsys.readouterr().err)


# ---------------------------------------------------------------- 5. crash safety

_CHILD = """
import sys
from dptrain.config import load_recipe
from dptrain.run import train
train(load_recipe(sys.argv[1], sys.argv[4:]), sys.argv[2], dp_seed=int(sys.argv[3]), progress=False,
      checkpoint_every=1)
"""

_CHILD_HANG_BEFORE_LOOP = """
import sys, time
from pathlib import Path
import dptrain.run as run
import dptrain.trainers.loop as loop
from dptrain.config import load_recipe

def hang(*args, **kwargs):
    Path(sys.argv[2], "ready-to-die").write_text("")
    time.sleep(600)

loop.run_loop = hang
run.train(load_recipe(sys.argv[1], sys.argv[4:]), sys.argv[2], dp_seed=int(sys.argv[3]), progress=False)
"""


def _spawn(script: str, out: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-c", script, str(RECIPE), str(out), str(DP_SEED), *overrides],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=fh)


def _kill_when(proc: subprocess.Popen, path: Path, log: Path, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {log.read_text()[-2000:]}")
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_double_counting_steps(tmp_path, capsys, monkeypatch):
    overrides = ["training.epochs=8", "model.hidden=[8]", "privacy.epsilon=2"]
    recipe = load_recipe(RECIPE, overrides)
    out = tmp_path / "killed"
    log = tmp_path / "child.log"
    _kill_when(_spawn(_CHILD, out, overrides, log), out / "private" / CHECKPOINT, log)
    assert not rec_path(out).exists()
    killed_at = load_checkpoint(out / "private" / CHECKPOINT)["step"]

    # the reference run releases the same DP count as the killed one (its noise draw pinned to it), so the two
    # plans -- q, steps, sigma -- are the same; the resumed run must reuse its persisted count, not draw again
    import dptrain.trainers.sampler as sampler

    released = json.loads((out / "private" / "state.json").read_text())["unit_count"]["value"]
    n_true = len(load_tabular(recipe.data).y_train)
    with monkeypatch.context() as m:
        m.setattr(sampler, "secure_normal", lambda n: np.full(n, (released - n_true) / 20.0))
        ref = train(recipe, tmp_path / "uninterrupted", dp_seed=DP_SEED, progress=False).record
    assert ref["privacy"]["units"]["value"] == released
    plan_steps = ref["privacy"]["planned_steps"]
    assert 40 <= plan_steps <= 60 and 1 <= killed_at < plan_steps  # killed mid-run

    assert main(["train", str(RECIPE), *[a for o in overrides for a in ("--set", o)], "--out", str(out),
                 "--resume", "--quiet"]) == 0
    assert "privacy:" in capsys.readouterr().out
    record = json.loads(rec_path(out).read_text())
    ledger = acc.PrivacyLedger.load(ledger_path(out))
    assert ledger.steps == record["privacy"]["steps"] == record["training"]["steps"] == plan_steps
    assert record["training"]["resumed"] is True
    assert record["privacy"]["epsilon"] == ref["privacy"]["epsilon"] == ledger.epsilon(ref["privacy"]["delta"])
    assert record["privacy"]["noise_multiplier"] == ref["privacy"]["noise_multiplier"]
    assert not (out / "private" / CHECKPOINT).exists()  # the finished run keeps no secret seed
    # same secret seed, counter-based randomness: the resumed model is the uninterrupted one
    resumed = pd.read_parquet(out / "private" / "predictions.parquet")["score"].to_numpy()
    uninterrupted = pd.read_parquet(tmp_path / "uninterrupted" / "private" / "predictions.parquet")["score"].to_numpy()
    np.testing.assert_allclose(resumed, uninterrupted, rtol=0, atol=1e-6)
    epochs = [json.loads(line)["epoch"] for line in (out / "private" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # no epoch logged twice


def _interrupted_copy(dp_dir: Path, dest: Path) -> Path:
    shutil.copytree(dp_dir, dest)
    rec_path(dest).unlink()
    return dest


@pytest.fixture(scope="module")
def sigma_run(tmp_path_factory):
    recipe = tiny_sigma()
    out = tmp_path_factory.mktemp("sigma") / "run"
    return recipe, train(recipe, out, dp_seed=DP_SEED, progress=False, keep_checkpoint=True)


@pytest.mark.parametrize("damage", ["flip one byte", "truncate"])
def test_damaged_checkpoint_is_refused_on_resume(sigma_run, tmp_path, damage, capsys):
    recipe, result = sigma_run
    out = _interrupted_copy(result.out_dir, tmp_path / "r")
    ckpt = out / "private" / CHECKPOINT
    blob = bytearray(ckpt.read_bytes())
    if damage == "flip one byte":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = blob[: len(blob) // 2]
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="truncated|checksum mismatch") as err:
        train(recipe, out, resume=True, progress=False)
    assert "refusing to load" in str(err.value)
    assert ckpt.read_bytes() == bytes(blob) and not rec_path(out).exists()
    # and through the CLI: one clear line
    assert _cli_train([*TINY, NO_EPS, SIGMA], out, "--resume") == 2
    err_text = capsys.readouterr().err
    _assert_one_clean_line(err_text)
    assert "checkpoint" in err_text


def test_resume_refuses_a_different_recipe(sigma_run, tmp_path):
    _, result = sigma_run
    out = _interrupted_copy(result.out_dir, tmp_path / "r")
    with pytest.raises(RunError, match="recipe differs"):
        train(tiny(NO_EPS, "privacy.noise_multiplier=0.5"), out, resume=True, progress=False)


def test_resume_without_an_interrupted_run_is_refused(tmp_path):
    with pytest.raises(RunError, match="no interrupted run"):
        train(tiny_sigma(), tmp_path / "nothing", resume=True, progress=False)
    assert not (tmp_path / "nothing").exists()


def test_crash_before_any_checkpoint_then_resume_starts_cleanly(tmp_path, monkeypatch):
    """Simulated in-process: the loop dies before its first step (the state a kill there leaves)."""
    parent = tmp_path / "runs"
    budget = _budget_for(tiny_sigma(DECLARED), runs_that_fit=1)
    recipe = tiny_sigma(DECLARED, f"privacy.dataset_budget={budget!r}")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill before the first step")

    import dptrain.trainers.loop as loop_module

    monkeypatch.setattr(loop_module, "run_loop", crash)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, parent / "r", progress=False)
    monkeypatch.undo()
    assert not (parent / "r" / "private" / CHECKPOINT).exists()
    assert (parent / "r" / "release" / "config.yaml").exists()

    record = train(recipe, parent / "r", resume=True, progress=False).record  # the reservation is reused
    ledger = acc.PrivacyLedger.load(ledger_path(parent / "r"))
    assert ledger.steps == record["privacy"]["steps"] == record["privacy"]["planned_steps"]
    assert record["privacy"]["epsilon_independent_check"]["epsilon"] == pytest.approx(record["privacy"]["epsilon"],
                                                                                      rel=1e-3)
    assert record["training"]["resumed"] is True
    runs = acc.DatasetBudget(BUDGET_PATH()).runs()
    assert list(runs.values()) == [{"status": "settled"}] and next(iter(runs)).startswith("r-")


@pytest.mark.slow
def test_sigkill_before_any_checkpoint_then_resume_starts_cleanly(tmp_path):
    overrides = [*TINY, NO_EPS, SIGMA]
    out = tmp_path / "r"
    log = tmp_path / "child.log"
    _kill_when(_spawn(_CHILD_HANG_BEFORE_LOOP, out, overrides, log), out / "ready-to-die", log)
    (out / "ready-to-die").unlink()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "private/run_id", "private/state.json", "release/config.yaml"]
    result = train(load_recipe(RECIPE, overrides), out, resume=True, dp_seed=1, progress=False)
    assert result.record["training"]["resumed"] is True
    assert acc.PrivacyLedger.load(ledger_path(out)).steps == result.record["privacy"]["planned_steps"]
    assert {p.name for p in (out / "release").iterdir()} == RELEASE_FILES


# ---------------------------------------------------------------- 6. dataset budget spans runs


DECLARED = "privacy.dataset_size=1604"  # a declared public size: the same plan in every run


def _budget_for(recipe, runs_that_fit: int) -> float:
    assert recipe.privacy.dataset_size is not None
    plan = PrivacyPlan.from_recipe(recipe, count_units(recipe, 0))
    total = plan.new_ledger()
    eps = []
    for _ in range(runs_that_fit + 1):
        total.extend(plan.planned_ledger())
        eps.append(total.epsilon(plan.delta))
    return (eps[-2] + eps[-1]) / 2


def test_dataset_budget_spans_runs(tmp_path):
    budget = _budget_for(tiny_sigma(DECLARED), runs_that_fit=2)
    recipe = tiny_sigma(DECLARED, f"privacy.dataset_budget={budget!r}")
    parent = tmp_path / "runs"
    budget_path = BUDGET_PATH()
    train(recipe, parent / "first", progress=False)
    train(recipe, parent / "second", progress=False)
    before = budget_path.read_bytes()
    with pytest.raises(acc.BudgetExceededError, match="third"):
        train(recipe, parent / "third", progress=False)
    assert not (parent / "third").exists() and budget_path.read_bytes() == before
    data = json.loads(budget_path.read_text())
    assert sorted(k.rsplit("-", 1)[0] for k in data["runs"]) == ["first", "second"]  # <out name>-<unique id>
    assert all(r["status"] == "settled" for r in data["runs"].values())
    assert data["epsilon"] == pytest.approx(budget)
    assert acc.DatasetBudget(budget_path).spent() <= budget


def test_reusing_a_run_name_is_charged_again(tmp_path):
    budget = _budget_for(tiny_sigma(DECLARED), runs_that_fit=1)
    recipe = tiny_sigma(DECLARED, f"privacy.dataset_budget={budget!r}")
    parent = tmp_path / "runs"
    train(recipe, parent / "first", progress=False)
    with pytest.raises(acc.BudgetExceededError):  # the budget is full ...
        train(recipe, parent / "second", progress=False)
    shutil.rmtree(parent / "first")
    with pytest.raises(acc.BudgetExceededError):  # ... so a fresh run under an old name must be refused too
        train(recipe, parent / "first", progress=False)


# ---------------------------------------------------------------- 7. dptrain datasets


def test_datasets_command_lists_builtins(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "builtin:actg175" in out and "builtin:framingham" in out
    assert main(["datasets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert {"actg175", "framingham"} <= set(by_name)
    assert by_name["actg175"]["label"] == "cens" and by_name["actg175"]["rows"] == 2139
    assert {"race", "gender", "age_group"} <= set(by_name["actg175"]["sensitive"])


def test_config_yaml_round_trips(dp_run):
    recipe, result = dp_run
    assert (result.out_dir / "release" / "config.yaml").read_text() == dump_recipe(recipe)


# ---------------------------------------------------------------- 8. budgets that cannot be side-stepped


def test_budget_cannot_be_side_stepped(tmp_path):
    """Issue 14 finding 2: four runs on one dataset whose composition exceeds the budget. A run that omits
    privacy.dataset_budget is still charged, and another --out parent does not start a fresh budget."""
    budget = _budget_for(tiny_sigma(DECLARED), runs_that_fit=2)
    declared = tiny_sigma(DECLARED, f"privacy.dataset_budget={budget!r}")
    silent = tiny_sigma(DECLARED)  # no dataset_budget in the recipe
    train(declared, tmp_path / "a" / "first", progress=False)
    train(silent, tmp_path / "b" / "second", progress=False)  # another parent, no budget named: still charged
    with pytest.raises(acc.BudgetExceededError):
        train(silent, tmp_path / "c" / "third", progress=False)
    with pytest.raises(acc.BudgetExceededError):
        train(declared, tmp_path / "d" / "fourth", progress=False)
    spent = acc.DatasetBudget(BUDGET_PATH()).spent()
    assert spent <= budget
    assert len(acc.DatasetBudget(BUDGET_PATH()).runs()) == 2


def test_a_users_file_is_budgeted_by_its_content(tmp_path):
    """The same CSV under two names is one dataset; budgets key on its content hash."""
    tree = _user_recipe(tmp_path, _user_frame(200))
    tree["privacy"] = {"noise_multiplier": 1.0, "dataset_size": 200}
    recipe = parse_recipe(tree)
    plan = PrivacyPlan.from_recipe(recipe, count_units(recipe, 0))
    one = plan.planned_ledger().epsilon(plan.delta)
    train(parse_recipe({**tree, "privacy": {**tree["privacy"], "dataset_budget": one * 1.2}}), tmp_path / "r1",
          progress=False)  # one run fits, two do not (two compose to ~1.4 x one)
    copy = tmp_path / "copy.csv"
    shutil.copy(tmp_path / "user.csv", copy)
    with pytest.raises(acc.BudgetExceededError):
        train(parse_recipe({**tree, "data": {**tree["data"], "source": str(copy)}}), tmp_path / "r2", progress=False)


# ---------------------------------------------------------------- 9. using the released model


def test_predict_and_load_model_on_a_finished_run(dp_run, tmp_path, capsys):
    """`dptrain predict` applies release/ to new raw records with the declared preprocessing; the Python API
    gives the same model; a column that does not match is refused in one line."""
    import dptrain
    from dptrain.data.registry import _read_actg175

    _, result = dp_run
    model = dptrain.load_model(result.out_dir)
    frame = pd.read_parquet(result.out_dir / "private" / "predictions.parquet")
    data = load_tabular(dp_run[0].data)
    np.testing.assert_allclose(model.predict_proba(data.x_test)[:, 1], frame["score"], atol=1e-6)

    raw = _read_actg175().head(40)
    (tmp_path / "new.csv").write_text(raw.to_csv(index=False))
    assert main(["predict", str(result.out_dir), "--data", str(tmp_path / "new.csv"), "--out",
                 str(tmp_path / "scores.csv")]) == 0
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 40
    np.testing.assert_allclose(scores["score"], model.predict_proba(model.encode(raw))[:, 1], atol=1e-6)

    raw.drop(columns=["age"]).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["predict", str(result.out_dir), "--data", str(tmp_path / "bad.csv"), "--out",
                 str(tmp_path / "bad-scores.csv")]) == 2
    err = capsys.readouterr().err
    _assert_one_clean_line(err)
    assert "age" in err and not (tmp_path / "bad-scores.csv").exists()


def test_progress_bar_of_a_dp_run_shows_no_training_loss(tmp_path, capsys):
    """The training loss is an un-noised statistic of the private batches: a DP run's bar shows step, epoch,
    epsilon and ETA only; a non-private run may show it."""
    from dptrain.lifecycle import _Progress

    recipe = tiny_sigma(DECLARED)
    plan = PrivacyPlan.from_recipe(recipe, count_units(recipe, 0))
    ledger = plan.new_ledger()
    from dptrain.trainers.base import StepStats

    for show_loss in (False, True):
        bar = _Progress(plan, 0, True, show_loss)
        for step in range(3):
            ledger.compose(plan.step_event(step))
            bar(step + 1, StepStats(loss_sum=123.0, rows=10), ledger)
        bar.bar.refresh()
        bar.close()
        err = capsys.readouterr().err
        assert ("loss=" in err) is show_loss and "eps=" in err
