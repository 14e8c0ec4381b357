"""End-to-end runs: the run directory, honest epsilon, refusals before writing, crash safety, dataset budgets.

Kept lean for slow CPUs: tiny MLPs, one or two epochs on builtin:actg175 (1604 training rows, q ~ 0.16,
7 steps per epoch). Runs that only need *a* DP run use a fixed noise multiplier (no calibration).
"""

from __future__ import annotations

import json
import math
import os
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
from dptrain.run import RunError, train
from dptrain.trainers.checkpoint import CheckpointError, load_checkpoint
from dptrain.trainers.plan import PrivacyPlan

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
TINY = ["training.epochs=1", "training.batch_size=256", "model.hidden=[8]"]
SIGMA = "privacy.noise_multiplier=1.5"  # instead of an epsilon target: no calibration, fast
NO_EPS = "privacy.epsilon="  # empty value -> None, so that noise_multiplier may be given
DP_SEED = 918273645546372819  # secret; must never appear outside the checkpoint
METRIC_KEYS = {"epoch", "step", "epsilon_upper_bound", "train_loss_mean"}
RUN_FILES = {"config.yaml", "run_id", "ledger.json", "metrics.jsonl", "checkpoint.pt", "predictions.parquet",
             "record.json", "audit.json"}


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
    assert {p.name for p in out.iterdir()} == RUN_FILES  # and no temporary files left behind
    record = json.loads((out / "record.json").read_text())
    assert record == json.loads(json.dumps(result.record))  # the returned record is the written one
    assert record["status"] == "finished" and record["training"]["resumed"] is False
    assert record["training"]["steps"] == record["privacy"]["planned_steps"] == record["privacy"]["steps"]
    assert load_recipe(out / "config.yaml") == dp_run[0]  # config.yaml reproduces the recipe
    assert load_checkpoint(out / "checkpoint.pt")["step"] == record["privacy"]["steps"]


def test_metrics_are_per_epoch_aggregates_only(dp_run):
    _, result = dp_run
    lines = (result.out_dir / "metrics.jsonl").read_text().splitlines()
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


def test_the_secret_dp_seed_is_only_in_the_checkpoint(dp_run):
    _, result = dp_run
    for name in ("config.yaml", "ledger.json", "metrics.jsonl", "record.json"):
        assert str(DP_SEED) not in (result.out_dir / name).read_text(), name
    assert load_checkpoint(result.out_dir / "checkpoint.pt")["dp_seed"] == DP_SEED


def test_predictions_are_test_rows_with_sensitive_attributes(dp_run):
    _, result = dp_run
    frame = pd.read_parquet(result.out_dir / "predictions.parquet")
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
    ledger = acc.PrivacyLedger.load(result.out_dir / "ledger.json")
    assert ledger.steps == steps
    assert eps == ledger.epsilon(delta)

    independent = acc.PrivacyLedger()
    event = acc.PoissonSampling(q).step_event(sigma)
    for _ in range(steps):
        independent.compose(event)
    assert independent.epsilon(delta) == pytest.approx(eps, rel=1e-12, abs=0)
    assert p["epsilon_recomputed_from_plan"] == pytest.approx(eps, rel=1e-12, abs=0)

    assert eps <= p["target_epsilon"] == recipe.privacy.epsilon == 1.0
    assert eps > 0.9  # calibrated to the target, not wildly over-noised
    assert q == pytest.approx(256 / result.record["data"]["num_units"])
    assert steps == math.ceil(recipe.training.epochs * result.record["data"]["num_units"] / 256)


def test_epsilon_agrees_with_opacus_accountants(dp_run):
    from opacus.accountants import PRVAccountant, RDPAccountant

    _, result = dp_run
    p = result.record["privacy"]
    delta, q, sigma, steps = p["delta"], p["sampling_rate"], p["noise_multiplier"], p["steps"]
    ledger = acc.PrivacyLedger.load(result.out_dir / "ledger.json")

    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    # eps_error is Opacus's *absolute* slack (default 0.01, itself 1% of an epsilon near 1): tighten it
    assert prv.get_epsilon(delta, eps_error=1e-3) == pytest.approx(p["epsilon"], rel=0.01)

    rdp = RDPAccountant()
    rdp.history = [(sigma, q, steps)]
    assert rdp.get_epsilon(delta) == pytest.approx(ledger.epsilon(delta, "rdp"), rel=0.01)


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
    assert 0 < p["delta"] < 1 / result.record["data"]["n_train"]


# ---------------------------------------------------------------- 3. non-private runs are flagged


def test_non_private_baseline_is_flagged(tmp_path, capsys):
    out = tmp_path / "baseline"
    assert _cli_train([*TINY, "privacy.epsilon=inf"], out) == 0
    assert "NOT PRIVATE" in capsys.readouterr().out
    p = json.loads((out / "record.json").read_text())["privacy"]
    assert p["mode"] == "non_private" and p["epsilon"] == "inf" and p["noise_multiplier"] == 0
    assert "NOT PRIVATE" in p["warning"]
    assert math.isinf(acc.PrivacyLedger.load(out / "ledger.json").epsilon(p["delta"]))
    # nothing to protect: the training loss is logged
    assert all(math.isfinite(json.loads(line)["train_loss_mean"]) for line in (out / "metrics.jsonl").open())


def test_clip_only_run_is_flagged(tmp_path):
    record = train(tiny("privacy.clip_only=true"), tmp_path / "clip", progress=False).record
    p = record["privacy"]
    assert p["mode"] == "clip_only" and p["epsilon"] == "inf" and p["noise_multiplier"] == 0
    assert p["clipping_norm"] == 1.0
    assert "NOT PRIVATE" in p["warning"]
    assert json.loads((tmp_path / "clip" / "record.json").read_text())["privacy"]["warning"] == p["warning"]


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


def test_dataset_budget_exceeded_changes_nothing(tmp_path):
    budget_path = tmp_path / "actg175.budget.json"
    acc.DatasetBudget.create(budget_path, epsilon=0.5, delta=1e-5)  # the budget this dataset already has
    before = budget_path.read_bytes()
    out = tmp_path / "r"
    with pytest.raises(acc.BudgetExceededError, match=r"over the dataset's total epsilon=0\.5"):
        train(tiny("privacy.epsilon=1", "privacy.dataset_budget=0.5"), out, progress=False)
    assert budget_path.read_bytes() == before
    assert acc.DatasetBudget(budget_path).runs() == {}
    assert not out.exists()


def test_refused_first_run_creates_no_budget_file(tmp_path):
    parent = tmp_path / "runs"
    with pytest.raises(acc.BudgetExceededError, match="Nothing was written"):
        train(tiny_sigma("privacy.dataset_budget=0.5"), parent / "r", progress=False)
    assert not (parent / "r").exists()
    assert not (parent / "actg175.budget.json").exists()


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
from dptrain.config import load_recipe

def hang(*args, **kwargs):
    Path(sys.argv[2], "ready-to-die").write_text("")
    time.sleep(600)

run.run_loop = hang
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
def test_killed_run_resumes_without_losing_or_double_counting_steps(tmp_path, capsys):
    overrides = ["training.epochs=8", "model.hidden=[8]", "privacy.epsilon=2"]
    recipe = load_recipe(RECIPE, overrides)
    out = tmp_path / "killed"
    log = tmp_path / "child.log"
    _kill_when(_spawn(_CHILD, out, overrides, log), out / "checkpoint.pt", log)
    assert not (out / "record.json").exists()
    killed_at = load_checkpoint(out / "checkpoint.pt")["step"]

    ref = train(recipe, tmp_path / "uninterrupted", dp_seed=DP_SEED, progress=False).record
    plan_steps = ref["privacy"]["planned_steps"]
    assert 40 <= plan_steps <= 60 and 1 <= killed_at < plan_steps  # killed mid-run

    assert main(["train", str(RECIPE), *[a for o in overrides for a in ("--set", o)], "--out", str(out),
                 "--resume", "--quiet"]) == 0
    assert "privacy:" in capsys.readouterr().out
    record = json.loads((out / "record.json").read_text())
    ledger = acc.PrivacyLedger.load(out / "ledger.json")
    assert ledger.steps == record["privacy"]["steps"] == record["training"]["steps"] == plan_steps
    assert record["training"]["resumed"] is True
    assert record["privacy"]["epsilon"] == ref["privacy"]["epsilon"] == ledger.epsilon(ref["privacy"]["delta"])
    assert record["privacy"]["noise_multiplier"] == ref["privacy"]["noise_multiplier"]
    # same secret seed, counter-based randomness: the resumed model is the uninterrupted one
    resumed = pd.read_parquet(out / "predictions.parquet")["score"].to_numpy()
    uninterrupted = pd.read_parquet(tmp_path / "uninterrupted" / "predictions.parquet")["score"].to_numpy()
    np.testing.assert_allclose(resumed, uninterrupted, rtol=0, atol=1e-6)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # no epoch logged twice


def _interrupted_copy(dp_dir: Path, dest: Path) -> Path:
    shutil.copytree(dp_dir, dest)
    (dest / "record.json").unlink()
    return dest


@pytest.fixture(scope="module")
def sigma_run(tmp_path_factory):
    recipe = tiny_sigma()
    out = tmp_path_factory.mktemp("sigma") / "run"
    return recipe, train(recipe, out, dp_seed=DP_SEED, progress=False)


@pytest.mark.parametrize("damage", ["flip one byte", "truncate"])
def test_damaged_checkpoint_is_refused_on_resume(sigma_run, tmp_path, damage, capsys):
    recipe, result = sigma_run
    out = _interrupted_copy(result.out_dir, tmp_path / "r")
    ckpt = out / "checkpoint.pt"
    blob = bytearray(ckpt.read_bytes())
    if damage == "flip one byte":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = blob[: len(blob) // 2]
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="truncated|checksum mismatch") as err:
        train(recipe, out, resume=True, progress=False)
    assert "refusing to load" in str(err.value)
    assert ckpt.read_bytes() == bytes(blob) and not (out / "record.json").exists()
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
    import dptrain.run as run_module

    parent = tmp_path / "runs"
    budget = _budget_for(tiny_sigma(), runs_that_fit=1)
    recipe = tiny_sigma(f"privacy.dataset_budget={budget!r}")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill before the first step")

    monkeypatch.setattr(run_module, "run_loop", crash)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, parent / "r", progress=False)
    monkeypatch.undo()
    assert not (parent / "r" / "checkpoint.pt").exists() and (parent / "r" / "config.yaml").exists()

    record = train(recipe, parent / "r", resume=True, progress=False).record  # the reservation is reused
    ledger = acc.PrivacyLedger.load(parent / "r" / "ledger.json")
    assert ledger.steps == record["privacy"]["steps"] == record["privacy"]["planned_steps"]
    assert record["privacy"]["epsilon"] == record["privacy"]["epsilon_recomputed_from_plan"]
    assert record["training"]["resumed"] is True
    runs = acc.DatasetBudget(parent / "actg175.budget.json").runs()
    assert list(runs.values()) == [{"status": "settled"}] and next(iter(runs)).startswith("r-")


@pytest.mark.slow
def test_sigkill_before_any_checkpoint_then_resume_starts_cleanly(tmp_path):
    overrides = [*TINY, NO_EPS, SIGMA]
    out = tmp_path / "r"
    log = tmp_path / "child.log"
    _kill_when(_spawn(_CHILD_HANG_BEFORE_LOOP, out, overrides, log), out / "ready-to-die", log)
    (out / "ready-to-die").unlink()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "run_id"]
    result = train(load_recipe(RECIPE, overrides), out, resume=True, dp_seed=1, progress=False)
    assert result.record["training"]["resumed"] is True
    assert acc.PrivacyLedger.load(out / "ledger.json").steps == result.record["privacy"]["planned_steps"]
    assert {p.name for p in out.iterdir()} == RUN_FILES


# ---------------------------------------------------------------- 6. dataset budget spans runs


def _budget_for(recipe, runs_that_fit: int) -> float:
    n = load_tabular(recipe.data, seed=recipe.seed).num_units
    plan = PrivacyPlan.from_recipe(recipe, n)
    total = plan.new_ledger()
    eps = []
    for _ in range(runs_that_fit + 1):
        total.extend(plan.planned_ledger())
        eps.append(total.epsilon(plan.delta))
    return (eps[-2] + eps[-1]) / 2


def test_dataset_budget_spans_runs(tmp_path):
    budget = _budget_for(tiny_sigma(), runs_that_fit=2)
    recipe = tiny_sigma(f"privacy.dataset_budget={budget!r}")
    parent = tmp_path / "runs"
    budget_path = parent / "actg175.budget.json"
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
    budget = _budget_for(tiny_sigma(), runs_that_fit=1)
    recipe = tiny_sigma(f"privacy.dataset_budget={budget!r}")
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
    assert (result.out_dir / "config.yaml").read_text() == dump_recipe(recipe)
