"""DP bounds of `dp` numeric features (data.numeric: {COL: dp}, data.dp_bounds): accuracy at large n, the
sensitivity of the searched statistic, training records only, the events in the ledger and the epsilon
recomputed by hand, paid for in calibration, never redrawn on resume, and bad inputs in one line.

The run tests train tiny MLPs on builtin:actg175 (one epoch, ~7 steps) with cd40 and cd80 declared `dp`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pandas as pd
import pytest
from dp_accounting.pld import pld_privacy_accountant

import accounting as acc
from dptrain.cli import main
from dptrain.config import RecipeError, load_recipe, parse_recipe
from dptrain.data import DataError, load_tabular
from dptrain.data.core import _split3
from dptrain.data.dp_bounds import attach, ledger_releases, noisy_bounds, statistic

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
TINY = ["training.epochs=1", "training.batch_size=256", "model.hidden=[8]", "privacy.epsilon=1"]
DP_COLS = ["data.numeric={cd40: dp, cd80: dp}", "data.dp_bounds={range: {default: [0, 5000]}}"]


def zeros(k: int) -> np.ndarray:
    return np.zeros(k)


# ---------------------------------------------------------------- the mechanism


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dist", ["normal", "lognormal"])
def test_bounds_are_near_the_true_quantiles_at_large_n(seed, dist):
    """50k units: each bound lies within the true quantiles at p -/+ 0.005 widened by one grid step (range / 2**8).
    At the defaults (noise_multiplier 20, 8 steps) a count's noise std is 80, i.e. 0.16% of the units."""
    data = np.random.default_rng(100 + seed)
    x = data.normal(200, 40, 50_000) if dist == "normal" else data.lognormal(4, 0.6, 50_000)
    rng = (0.0, 1000.0)
    grid = (rng[1] - rng[0]) / 2**8
    lo, hi = noisy_bounds(x, np.arange(len(x)), rng=rng, quantiles=(0.01, 0.99), steps=8, noise_multiplier=20,
                          normal=np.random.default_rng(seed).standard_normal)
    assert np.quantile(x, 0.005) - grid <= lo <= np.quantile(x, 0.015)
    assert np.quantile(x, 0.985) <= hi <= np.quantile(x, 0.995) + grid
    assert rng[0] <= lo < hi <= rng[1] and ((lo - rng[0]) / grid).is_integer() and ((hi - rng[0]) / grid).is_integer()


def test_without_noise_the_search_is_exact_and_weighs_units_not_rows():
    """Zero noise: the bounds bracket the exact quantiles within one grid step. A unit with many rows weighs as
    much as a unit with one (its share of rows below a threshold), so one heavy unit cannot move a bound."""
    x = np.arange(1000, dtype=np.float64)  # 1000 one-row units, values 0..999
    lo, hi = noisy_bounds(x, np.arange(1000), rng=(0, 1024), quantiles=(0.1, 0.9), steps=10, noise_multiplier=20,
                          normal=zeros)
    assert 98 <= lo <= 100 and 899 <= hi <= 901
    heavy = np.concatenate([x, np.full(5000, 1000.0)])  # unit 1000 holds 5000 rows at 1000
    units = np.concatenate([np.arange(1000), np.full(5000, 1000)])
    _, hi_units = noisy_bounds(heavy, units, rng=(0, 1024), quantiles=(0.1, 0.9), steps=10, noise_multiplier=20,
                               normal=zeros)
    _, hi_rows = noisy_bounds(heavy, np.arange(len(heavy)), rng=(0, 1024), quantiles=(0.1, 0.9), steps=10,
                              noise_multiplier=20, normal=zeros)
    assert 899 <= hi_units <= 902 and hi_rows >= 999


def test_one_unit_moves_the_statistic_by_at_most_one():
    """Add/remove one privacy unit (any number of rows, some values missing): |f(D) - f(D')| <= max(p, 1 - p)."""
    rng = np.random.default_rng(0)
    units = rng.integers(0, 40, 300)
    x = rng.normal(0, 1, 300)
    x[rng.random(300) < 0.2] = np.nan
    x[units == 7] = np.nan  # a unit whose values are all missing
    worst = 0.0
    for p in (0.01, 0.3, 0.99):
        for t in np.linspace(-3, 3, 13):
            full = statistic(x, units, p, t)
            for u in range(40):
                keep = units != u
                worst = max(worst, abs(full - statistic(x[keep], units[keep], p, t)) / max(p, 1 - p))
    assert 0.5 < worst <= 1 + 1e-12  # tight-ish and never over


def test_a_column_release_is_exactly_one_gaussian_event():
    """2 T adaptive Gaussian counts of std s are GaussianDpEvent(s / sqrt(2 T)) (Gaussian DP composition): the
    PLD of the 16 composed counts gives the same epsilon as the one event in the ledger."""
    release = {"columns": {"a": {"ledger": "dp_bounds:a", "count_noise_std": 20 * 4.0, "num_queries": 16}}}
    ((label, event),) = ledger_releases(release)
    assert label == "dp_bounds:a" and event == dpa.GaussianDpEvent(20.0)
    eps = []
    for ev in (event, dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(80.0), 16)):
        pld = pld_privacy_accountant.PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                   value_discretization_interval=1e-4)
        pld.compose(ev)
        eps.append(pld.get_epsilon(1e-5))
    assert eps[0] == pytest.approx(eps[1], rel=1e-2)


# ---------------------------------------------------------------- the loader


def _table(tmp_path: Path, n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"chol": rng.normal(200, 40, n), "age": rng.uniform(20, 80, n), "y": np.arange(n) % 2,
                         "smoker": np.where(np.arange(n) % 3 == 0, "yes", "no")})


def _recipe(tmp_path: Path, frame: pd.DataFrame, **data):
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    tree = {"source": str(path), "label": "y", "numeric": {"chol": "dp", "age": [0, 100]},
            "dp_bounds": {"range": {"chol": [0, 1000]}}}
    tree.update(data)
    return parse_recipe({"name": "t", "data": tree, "model": {"hidden": [4]}, "privacy": {"noise_multiplier": 1.0},
                         "training": {"epochs": 1, "batch_size": 8}})


def test_bounds_come_from_the_training_records_only(tmp_path):
    """Same noise: changing test rows' values changes no bound; changing training rows' values does."""
    frame = _table(tmp_path)
    recipe = _recipe(tmp_path, frame)
    data = load_tabular(attach(recipe.data, noise=zeros))
    release = data.preprocessing["dp_bounds"]
    assert data.preprocessing["numeric"]["chol"]["bounds"] == release["columns"]["chol"]["bounds"]
    assert "DP estimate" in data.preprocessing["numeric"]["chol"]["from"]
    # the split depends on the unit ids (here the rows) and the split seed only, never on values
    test, val = _split3(np.arange(len(frame)), recipe.data.test_fraction, 0.0, recipe.data.split_seed)
    assert test.any() and not val.any() and len(data.y_test) == test.sum()
    moved = frame.copy()
    moved.loc[test, "chol"] = 999.0  # test rows only
    assert load_tabular(attach(_recipe(tmp_path, moved).data, noise=zeros)).preprocessing["dp_bounds"] == release
    moved.loc[~test, "chol"] = 999.0  # and now the training rows too
    assert load_tabular(attach(_recipe(tmp_path, moved).data, noise=zeros)).preprocessing["dp_bounds"] != release


def test_a_default_fill_is_the_midpoint_of_the_released_bounds(tmp_path):
    frame = _table(tmp_path)
    frame.loc[3, "chol"] = np.nan
    data = load_tabular(attach(_recipe(tmp_path, frame, missing={"chol": "indicator"}).data, noise=zeros))
    lo, hi = data.preprocessing["numeric"]["chol"]["bounds"]
    assert data.preprocessing["numeric"]["chol"]["missing"]["value"] == (lo + hi) / 2
    # a declared fill is checked against the declared public range, not the (unknown in advance) bounds
    assert load_tabular(attach(_recipe(tmp_path, frame, missing={"chol": {"fill": 900}}).data, noise=zeros))
    with pytest.raises(RecipeError, match="data.missing.chol: fill 1500"):
        _recipe(tmp_path, frame, missing={"chol": {"fill": 1500}})


def test_restored_bounds_are_reused_and_checked(tmp_path):
    frame = _table(tmp_path)
    recipe = _recipe(tmp_path, frame)
    first = load_tabular(attach(recipe.data, noise=np.random.default_rng(3).standard_normal))

    def refuse(k):
        raise AssertionError("redrawn")

    again = load_tabular(attach(recipe.data, released=first.preprocessing["dp_bounds"], noise=refuse))
    assert np.array_equal(again.x_train, first.x_train) and again.preprocessing == first.preprocessing
    other = _recipe(tmp_path, frame, dp_bounds={"range": {"chol": [0, 500]}})
    with pytest.raises(DataError, match="data.dp_bounds: .*other columns or settings; fix: "):
        load_tabular(attach(other.data, released=first.preprocessing["dp_bounds"]))


# ---------------------------------------------------------------- bad inputs: one clear line


def _one_line(text: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text


@pytest.mark.parametrize("data, words", [
    ({"dp_bounds": None}, ["data.numeric.chol", "data.dp_bounds: {range: {chol: [LOW, HIGH]}}"]),
    ({"dp_bounds": {"range": {"age": [0, 1]}}}, ["data.dp_bounds.range.age", "not a dp feature"]),
    ({"dp_bounds": {"range": {"chol": [500, 500]}}}, ["data.dp_bounds.range", "low < high", "fix:"]),
    ({"dp_bounds": {"range": {"chol": [900, 100]}}}, ["data.dp_bounds.range", "low < high", "fix:"]),
    ({"dp_bounds": {"range": {"chol": [0, 1000]}, "quantiles": [0.99, 0.01]}}, ["quantiles", "0 < low < high < 1"]),
    ({"categorical": {"smoker": "dp"}}, ["data.categorical", "'smoker'", "numeric features", "fix:"]),
    ({"numeric": {"chol": "DP", "age": [0, 100]}}, ["data.numeric", "'DP'", "fix:"]),
    ({"numeric": {"age": [0, 100]}}, ["data.dp_bounds", "no feature of data.numeric is dp", "fix:"]),
])
def test_bad_declarations_are_refused_in_one_line(tmp_path, data, words):
    with pytest.raises(RecipeError) as err:
        _recipe(tmp_path, _table(tmp_path), **data)
    _one_line(str(err.value))
    for w in words:
        assert w in str(err.value)


def test_dp_on_a_column_of_words_is_refused_before_any_draw(tmp_path):
    def refuse(k):
        raise AssertionError("drawn")

    recipe = _recipe(tmp_path, _table(tmp_path), numeric={"smoker": "dp", "age": [0, 100]},
                     dp_bounds={"range": {"smoker": [0, 1]}})
    with pytest.raises(DataError, match="data.numeric.smoker: column 'smoker' has non-numeric values.*"
                                        "declare it in data.categorical.smoker"):
        load_tabular(attach(recipe.data, noise=refuse))


def test_a_loader_without_a_source_refuses(tmp_path):
    """Outside a run nothing draws (or would compose) the release: one line, with the public-bounds fix."""
    with pytest.raises(DataError, match=r"data.numeric.chol: dp bounds are a DP release .*fix: run `dptrain train`"):
        load_tabular(_recipe(tmp_path, _table(tmp_path)).data)


def test_cli_refuses_dp_without_a_public_range_in_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", str(RECIPE), "--set", "data.numeric={cd40: dp}", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dptrain: error: ") and err.strip().count("\n") == 0 and "Traceback" not in err
    assert "data.numeric.cd40" in err and "data.dp_bounds: {range: {cd40: [LOW, HIGH]}}" in err
    assert not out.exists()


# ---------------------------------------------------------------- runs: ledger, statement, calibration, resume


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dp-bounds run (checkpoint kept, for the resume test) and the same run with the built-in's declared bounds.
    The OS CSPRNG's standard normals are pinned to 0.5 for both, so that both release the same unit count (q and
    the steps then match, and the noise multipliers differ only by what the bounds cost)."""
    import dptrain.trainers.sampler as sampler
    from dptrain.run import train

    root = tmp_path_factory.mktemp("dpb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "secure_normal", lambda n: np.full(n, 0.5))
        dp = train(load_recipe(RECIPE, [*TINY, *DP_COLS]), root / "dp", progress=False, keep_checkpoint=True)
        declared = train(load_recipe(RECIPE, TINY), root / "declared", progress=False)
    return dp, declared


def test_the_ledger_holds_the_bound_events_and_epsilon_recomputes_by_hand(runs):
    dp, _ = runs
    out, p = dp.out_dir, dp.record["privacy"]
    recipe = load_recipe(out / "release" / "config.yaml")
    ledger = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    labels = [e["label"] for e in ledger.to_dict()["entries"]]
    assert ledger.count("dp_bounds:cd40") == ledger.count("dp_bounds:cd80") == ledger.count("unit_count") == 1
    assert sum(label.startswith("dp_bounds:") for label in labels) == 2 and ledger.steps == p["steps"] > 0
    assert set(p["releases"]) == {"unit_count", "dp_bounds:cd40", "dp_bounds:cd80"}

    # by hand with dp_accounting: the count, 2 x 8 Gaussian counts of std 20 sqrt(16) per column, the steps
    steps, s = recipe.data.dp_bounds.steps, recipe.data.dp_bounds.noise_multiplier * math.sqrt(2 * 8)
    direct = pld_privacy_accountant.PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                  value_discretization_interval=1e-4)
    direct.compose(dpa.GaussianDpEvent(recipe.privacy.count_noise_multiplier))
    for _ in ("cd40", "cd80"):
        direct.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), 2 * steps))
    direct.compose(dpa.PoissonSampledDpEvent(p["sampling_rate"], dpa.GaussianDpEvent(p["noise_multiplier"])),
                   p["steps"])
    assert direct.get_epsilon(p["delta"]) == pytest.approx(p["epsilon"], rel=1e-2)
    assert p["epsilon_independent_check"]["epsilon"] == pytest.approx(p["epsilon"], rel=1e-3)
    assert p["epsilon"] == ledger.epsilon(p["delta"]) <= p["target_epsilon"] == 1.0


def test_bounds_are_recorded_as_dp_releases_everywhere(runs):
    """The record's preprocessing, release/model.json (what `dptrain predict` applies) and private/state.json hold
    the same released bounds, each marked a DP estimate with its ledger label."""
    dp, _ = runs
    out = dp.out_dir
    pre = dp.record["data"]["preprocessing"]
    state = json.loads((out / "private" / "state.json").read_text())
    columns = {c["name"]: c for c in json.loads((out / "release" / "model.json").read_text())["input"]["columns"]}
    for col in ("cd40", "cd80"):
        released = state["dp_bounds"]["columns"][col]["bounds"]
        assert pre["numeric"][col]["bounds"] == released == columns[col]["bounds"]
        assert 0 <= released[0] < released[1] <= 5000
        assert "DP estimate" in columns[col]["from"] and f"dp_bounds:{col}" in columns[col]["from"]
    assert pre["numeric"]["age"]["bounds"] == [0.0, 100.0] and "DP" not in pre["numeric"]["age"]["from"]
    assert "dp_bounds" in dp.record["privacy"]["public"]


def test_the_dp_bounds_run_pays_for_its_bounds(runs):
    """Same target epsilon, same data: declaring the bounds public leaves more of the budget to training."""
    dp, declared = runs
    assert set(declared.record["privacy"]["releases"]) == {"unit_count"}
    p, q = dp.record["privacy"], declared.record["privacy"]
    assert p["target_epsilon"] == q["target_epsilon"] and p["units"]["value"] == q["units"]["value"]
    assert p["steps"] == q["steps"] and p["sampling_rate"] == q["sampling_rate"]
    assert p["noise_multiplier"] > q["noise_multiplier"] * 1.005  # calibration is within 0.35%: a real gap
    assert p["epsilon"] <= p["target_epsilon"] and q["epsilon"] <= q["target_epsilon"]


def test_resume_restores_the_bounds_and_never_redraws(runs, tmp_path, monkeypatch):
    from dptrain.run import audit_run, train

    dp, _ = runs
    out = tmp_path / "r"
    shutil.copytree(dp.out_dir, out)
    (out / "private" / "record.json").unlink()  # an interrupted run (its checkpoint was kept)

    import dptrain.trainers.sampler as sampler

    def refuse(n):
        raise AssertionError("a noise draw on resume: a second release")

    monkeypatch.setattr(sampler, "secure_normal", refuse)
    record = train(load_recipe(out / "release" / "config.yaml"), out, resume=True, progress=False).record
    assert record["training"]["resumed"] is True
    assert record["data"]["preprocessing"]["dp_bounds"] == dp.record["data"]["preprocessing"]["dp_bounds"]
    assert record["privacy"]["epsilon"] == dp.record["privacy"]["epsilon"]
    ledger = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    assert ledger.count("dp_bounds:cd40") == 1  # not composed twice
    assert audit_run(out)["claimed_epsilon"] == record["privacy"]["epsilon"]  # the audit reloads the same bounds
