"""Real clinical tables: missing values by declared rules (data.missing), labels as written (a list of positive
labels, label_threshold) and booleans spelled True / False, trained end to end with recipe lines only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dptrain.config import DataConfig, RecipeError, load_recipe
from dptrain.data.tabular import DataError, load_tabular

RECIPE = """\
name: messy
data:
  source: {source}
  label: num
  label_threshold: 0                    # graded outcome 0-4: "> 0" is positive
  numeric: {{age: [20, 90], chol: [100, 600], ca: [0, 3]}}
  categorical: {{thal: [normal, fixed, reversible], fbs: [true, false], exang: ["True", "False"]}}
  missing: {{chol: {{fill: 240}}, ca: indicator, thal: category, fbs: {{fill: false}}}}
model: {{hidden: [4]}}
privacy: {{noise_multiplier: 1.0, dataset_size: 300}}
training: {{epochs: 1, batch_size: 32}}
"""


def _messy(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    f = pd.DataFrame({
        "age": rng.integers(29, 78, n).astype(float),
        "chol": rng.normal(245, 50, n).round(),
        "ca": rng.integers(0, 4, n).astype(float),
        "thal": rng.choice(["normal", "fixed", "reversible"], n).astype(object),
        "fbs": rng.choice([True, False], n).astype(object),
        "exang": rng.choice(["TRUE", "False", "true"], n),
        "num": rng.integers(0, 5, n),
    })
    f.loc[rng.random(n) < 0.2, "chol"] = np.nan
    f.loc[rng.random(n) < 0.8, "ca"] = np.nan  # mostly missing
    f.loc[rng.random(n) < 0.1, "thal"] = np.nan
    f.loc[rng.random(n) < 0.1, "fbs"] = np.nan
    return f


def _cfg(path: Path, **kw) -> DataConfig:
    data = {"source": str(path), "label": "num", "label_threshold": 0,
            "numeric": {"age": [20, 90], "chol": [100, 600], "ca": [0, 3]},
            "categorical": {"thal": ["normal", "fixed", "reversible"], "fbs": [True, False],
                            "exang": ["True", "False"]},
            "missing": {"chol": {"fill": 240}, "ca": "indicator", "thal": "category", "fbs": {"fill": False}}}
    data.update(kw)
    return DataConfig.model_validate({k: v for k, v in data.items() if v is not None})


def _all_x(data) -> np.ndarray:
    return np.concatenate([data.x_train, data.x_val, data.x_test])


def test_messy_csv_trains_and_predicts_with_recipe_lines_only(tmp_path):
    from dptrain.cli import main

    src = tmp_path / "heart.csv"
    _messy().to_csv(src, index=False)
    recipe = tmp_path / "messy.yaml"
    recipe.write_text(RECIPE.format(source=src))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out), "--quiet"]) == 0
    spec = json.loads((out / "release" / "model.json").read_text())
    cols = {c["name"]: c for c in spec["input"]["columns"]}
    assert cols["chol"]["missing"] == {"rule": "fill", "value": 240.0}
    assert cols["ca"]["missing"] == {"rule": "indicator", "value": 1.5, "column": "ca_missing"}
    assert cols["thal"]["categories"] == ["normal", "fixed", "reversible", "missing"]
    assert "missing" not in cols["age"]  # no rule: refused, as in model.json files without the key
    assert spec["classes"] == ["num<=0", "num>0"]
    assert "ca_missing" in spec["input"]["features"] and "fbs=True" in spec["input"]["features"]

    new = _messy(12, seed=5)
    new.loc[0, ["chol", "ca", "thal", "fbs"]] = np.nan
    new.drop(columns="num").to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(out), "--data", str(tmp_path / "new.csv"), "--out", str(tmp_path / "s.csv")]) == 0
    scores = pd.read_csv(tmp_path / "s.csv")
    assert len(scores) == 12 and scores["score"].between(0, 1).all()

    from dptrain.release import load_model

    model = load_model(out)
    train_x = load_tabular(load_recipe(recipe).data)
    row = new.iloc[[0]].drop(columns="num")
    assert model.encode(row).tolist()[0] == _encode_alone(train_x.feature_names, row)


def _encode_alone(names: list[str], row: pd.DataFrame) -> list[float]:
    """The declared encoding of the all-missing row, written out by hand."""
    want = {"age": 2 * (row["age"].iloc[0] - 20) / 70 - 1, "chol": 2 * (240 - 100) / 500 - 1, "ca": 0.0,
            "ca_missing": 1.0, "thal=missing": 1.0, "fbs=False": 1.0,
            f"exang={'True' if str(row['exang'].iloc[0]).lower() == 'true' else 'False'}": 1.0}
    return [float(np.float32(want.get(n, 0.0))) for n in names]


def test_a_row_encodes_the_same_whatever_the_rest_of_the_table(tmp_path):
    rows = []
    for seed in (1, 2):
        f = _messy(200, seed=seed)
        f.loc[0] = [50.0, np.nan, np.nan, np.nan, np.nan, "true", 3]
        f.to_csv(tmp_path / f"t{seed}.csv", index=False)
        data = load_tabular(_cfg(tmp_path / f"t{seed}.csv", validation_fraction=0.0), seed=0)
        x = _all_x(data)
        match = np.flatnonzero((x[:, data.feature_names.index("ca_missing")] == 1)
                               & (x[:, data.feature_names.index("thal=missing")] == 1)
                               & (x[:, data.feature_names.index("fbs=False")] == 1)
                               & np.isclose(x[:, data.feature_names.index("age")], 2 * 30 / 70 - 1)
                               & np.isclose(x[:, data.feature_names.index("chol")], 2 * 140 / 500 - 1))
        rows.append(x[match[0]].tolist())
        assert data.preprocessing["statistics_of_data_used"] == "none"
        assert "240" in data.preprocessing["numeric"]["chol"]["missing_rule"]
    assert rows[0] == rows[1] == _encode_alone(data.feature_names, f.iloc[[0]])
    # the columns never depend on which values are missing
    full = _messy(200).assign(chol=240.0, ca=1.0, thal="fixed", fbs=True)
    full.to_csv(tmp_path / "full.csv", index=False)
    assert load_tabular(_cfg(tmp_path / "full.csv")).feature_names == data.feature_names


def test_declared_category_and_default_indicator(tmp_path):
    f = _messy(200)
    f.to_csv(tmp_path / "t.csv", index=False)
    data = load_tabular(_cfg(tmp_path / "t.csv", missing={"default": "indicator", "thal": {"fill": "normal"}}))
    assert "chol_missing" in data.feature_names and "ca_missing" in data.feature_names
    assert "thal=missing" not in data.feature_names and "fbs=missing" in data.feature_names
    info = data.preprocessing["numeric"]["chol"]
    assert info["missing"] == {"rule": "indicator", "value": 350.0, "column": "chol_missing"}
    assert "age_missing" in data.feature_names  # declared for every feature, whether or not values are missing


def test_refusal_prints_the_yaml_fix_and_no_count(tmp_path):
    f = _messy(200)
    f.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError) as info:
        load_tabular(_cfg(tmp_path / "t.csv", missing=None))
    msg = str(info.value)
    assert msg.startswith("data.numeric.chol: column 'chol' has missing values") and "\n" not in msg
    assert "missing: {chol: indicator, ca: indicator, thal: category, fbs: category}" in msg
    assert not re.search(r"\d", msg.replace(str(tmp_path), ""))  # no count, no row number
    assert "drop those rows" in msg


def test_bad_missing_declarations_are_refused_in_one_line(tmp_path):
    _messy(50).to_csv(tmp_path / "t.csv", index=False)
    for bad, words in [({"zz": "indicator"}, "not declared features"), ({"chol": {"fill": 900}}, "bounds"),
                       ({"chol": "category"}, "categorical"), ({"chol": "mean"}, "unknown rule"),
                       ({"default": "category"}, "refuse or indicator")]:
        with pytest.raises(ValueError, match=words):
            _cfg(tmp_path / "t.csv", missing=bad)
    with pytest.raises(DataError, match=r"^data\.missing\.thal: fill 'unknown' is not one of the declared"):
        load_tabular(_cfg(tmp_path / "t.csv", missing={"thal": {"fill": "unknown"}, "default": "indicator"}))
    with pytest.raises(DataError, match=r"^data\.missing: \['zz'\] are not features"):
        load_tabular(DataConfig(source="builtin:actg175", missing={"zz": "indicator"}))


def test_list_and_threshold_labels(tmp_path):
    f = _messy(200)
    f.to_csv(tmp_path / "t.csv", index=False)
    listed = load_tabular(_cfg(tmp_path / "t.csv", label_threshold=None, positive_label=[1, 2, 3, 4]), seed=0)
    above = load_tabular(_cfg(tmp_path / "t.csv"), seed=0)
    assert np.array_equal(listed.y_train, above.y_train) and np.array_equal(listed.y_test, above.y_test)
    assert listed.classes == ["num not in [1, 2, 3, 4]", "num in [1, 2, 3, 4]"]
    assert above.classes == ["num<=0", "num>0"]
    y = np.concatenate([above.y_train, above.y_test]).sum()
    assert y == (f["num"] > 0).sum()
    high = load_tabular(_cfg(tmp_path / "t.csv", label_threshold=2.5), seed=0)
    assert np.concatenate([high.y_train, high.y_test]).sum() == (f["num"] > 2.5).sum()
    with pytest.raises(ValueError, match="replaces data.positive_label"):
        _cfg(tmp_path / "t.csv", positive_label=1)
    with pytest.raises(RecipeError, match="label_threshold"):
        from dptrain.config import parse_recipe
        parse_recipe({"data": {"source": "notes.jsonl", "text": "note", "label": "y", "label_threshold": 0}})


def test_booleans_are_read_as_written(tmp_path):
    """One rule: True / False (a file's true / True / TRUE, a YAML true, a quoted "true") all match."""
    f = pd.DataFrame({"smoker": ["True", "false", "TRUE", "False"] * 10, "y": ["TRUE", "False"] * 20,
                      "a": np.linspace(0, 1, 40)})
    f.to_csv(tmp_path / "b.csv", index=False)
    for cats in ([True, False], ["True", "False"], ["true", "FALSE"]):
        data = load_tabular(DataConfig(source=str(tmp_path / "b.csv"), label="y", positive_label=True,
                                       numeric={"a": [0, 1]}, categorical={"smoker": cats}), seed=0)
        assert data.feature_names[1:] == [f"smoker={c}" for c in ("True", "False")]
        assert data.classes == ["y!=True", "y=True"]
    plain = load_tabular(DataConfig(source=str(tmp_path / "b.csv"), label="y", numeric={"a": [0, 1]}), seed=0)
    assert plain.classes == ["y=False", "y=True"]
    with pytest.raises(DataError, match="outside the declared categories"):
        load_tabular(DataConfig(source=str(tmp_path / "b.csv"), label="y", numeric={"a": [0, 1]},
                                categorical={"smoker": [0, 1]}))
