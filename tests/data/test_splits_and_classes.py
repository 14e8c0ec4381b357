"""Split seed apart from the training seed, the validation split, declared class names, leak-free errors.

What must hold (issue 14): the split depends on ``data.split_seed`` only, never on the training seed; a
validation split never shares a privacy unit with train or test, and asking for none keeps the old two-way
split; class names and their number are public declarations, never read from the labels; error messages
quote no count, row number or numeric value of the data.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from dptrain.config import DataConfig, parse_recipe
from dptrain.data import DataError, TabularData, load_data, load_tabular
from dptrain.data.medmnist import MEDMNIST_CLASSES, medmnist_flag
from dptrain.data.text import load_text, load_text_from_config

# ---------------------------------------------------------------- fixtures


def _patients(n_patients: int = 40, rows_each: int = 3, seed: int = 1) -> pd.DataFrame:
    """Like tests/data/test_tabular.py's table, with each patient's number readable from feature 0."""
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"p{i:03d}" for i in range(n_patients)], rows_each)
    n = len(pid)
    return pd.DataFrame({
        "patient_id": pid,
        "pid_num": np.repeat(np.arange(n_patients), rows_each),
        "age": rng.integers(18, 90, n),
        "sex": rng.choice(["female", "male"], n),
        "outcome": rng.choice(["sick", "well"], n),
    })


def _cfg(path, **kw) -> DataConfig:
    base = dict(source=str(path), label="outcome", positive_label="sick",
                numeric={"pid_num": [0, 1000], "age": [0, 100]}, sensitive=["sex"], privacy_unit="patient_id")
    base.update(kw)
    return DataConfig(**base)


def _pids(x: np.ndarray) -> set[int]:
    return set(np.rint((x[:, 0].astype(np.float64) + 1) / 2 * 1000).astype(int).tolist())


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "patients.csv"
    _patients().to_csv(path, index=False)
    return path


def _recipe(data: dict, seed: int):
    return parse_recipe({"data": data, "privacy": {"epsilon": 1.0}, "seed": seed})


def _no_digits(msg: str, *paths) -> None:
    """No digit in what the message says of the data (before '; fix:', whose recipe examples are public) once
    the (test-made) paths are removed: no count, row number or value."""
    problem = msg.split("; fix:")[0]
    for p in paths:
        problem = problem.replace(str(p), "")
    assert not re.search(r"\d", problem), msg


# ---------------------------------------------------------------- split seed


def test_split_depends_on_split_seed_not_training_seed(table):
    data = {"source": str(table), "label": "outcome", "positive_label": "sick",
            "numeric": {"pid_num": [0, 1000], "age": [0, 100]}, "privacy_unit": "patient_id", "split_seed": 5}
    r1, r2 = _recipe(data, seed=1), _recipe(data, seed=2)
    assert r1.seed != r2.seed and r1.data == r2.data
    a, b = load_data(r1.data), load_data(r2.data)  # what a sweep's runs do: the recipe's data section only
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.units_train, b.units_train)
    assert a.preprocessing["split"]["seed"] == 5
    # the default split seed is 0, whatever the training seed
    assert load_tabular(_cfg(table)).preprocessing["split"]["seed"] == 0
    # another split seed: another split; an explicit seed= overrides the config
    other = load_data(_recipe({**data, "split_seed": 6}, seed=1).data)
    assert _pids(other.x_test) != _pids(a.x_test)
    explicit = load_tabular(_cfg(table, split_seed=6), seed=5)
    np.testing.assert_array_equal(explicit.x_test, a.x_test)
    assert explicit.preprocessing["split"]["seed"] == 5


def test_text_split_seed(tmp_path):
    rows = [{"text": f"report {i}", "label": "pos" if i % 3 else "neg"} for i in range(60)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(path), classes=["neg", "pos"], split_seed=4, test_fraction=0.25)
    a, b = load_text_from_config(cfg), load_text(str(path), classes=["neg", "pos"], test_fraction=0.25, split_seed=4)
    assert a.texts_test == b.texts_test and a.preprocessing["split"]["seed"] == 4
    assert load_text(str(path), classes=["neg", "pos"], test_fraction=0.25, seed=4).texts_test == a.texts_test
    assert load_text(str(path), classes=["neg", "pos"], test_fraction=0.25, split_seed=5).texts_test != a.texts_test
    assert load_text(str(path), classes=["neg", "pos"]).preprocessing["split"]["seed"] == 0
    with pytest.raises(TypeError, match="split_seed or seed"):
        load_text(str(path), classes=["neg", "pos"], split_seed=1, seed=2)


# ---------------------------------------------------------------- validation split


def _old_split(unit_keys: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """The two-way split as it was before validation splits existed (copied, to pin it)."""
    units, inverse = np.unique(unit_keys, return_inverse=True)
    n_test = min(max(int(round(test_fraction * len(units))), 1), len(units) - 1)
    perm = np.random.default_rng(seed).permutation(len(units))
    test_unit = np.zeros(len(units), dtype=bool)
    test_unit[perm[:n_test]] = True
    return test_unit[inverse]


# Test patients of _patients() (40 patients, test_fraction 0.25) with seed 3, computed by the old code.
OLD_TEST_PATIENTS_SEED3 = {2, 3, 11, 12, 17, 20, 23, 30, 32, 33}


def test_validation_fraction_zero_reproduces_the_old_split(table):
    frame = _patients()
    data = load_tabular(_cfg(table, validation_fraction=0.0), seed=3)
    assert _pids(data.x_test) == OLD_TEST_PATIENTS_SEED3
    old = _old_split(frame["patient_id"].to_numpy(dtype=str), 0.25, 3)
    assert _pids(data.x_test) == set(frame.loc[old, "pid_num"])
    assert _pids(data.x_train) == set(frame.loc[~old, "pid_num"])
    assert data.x_val.shape == (0, 2) and data.x_val.dtype == np.float32
    assert data.y_val.shape == (0,) and data.y_val.dtype == np.int64
    assert list(data.sensitive_val.columns) == ["sex"] and len(data.sensitive_val) == 0
    assert data.preprocessing["split"]["validation_fraction"] == 0.0
    for seed in (0, 1, 7):  # and for other seeds, per example as well
        per_example = load_tabular(_cfg(table, privacy_unit=None), seed=seed)
        old = _old_split(np.arange(len(frame)), 0.25, seed)
        np.testing.assert_array_equal(per_example.y_test, (frame.loc[old, "outcome"] == "sick").astype(int))


def test_validation_split_is_disjoint_by_unit_and_sized_by_fraction(tmp_path):
    frame = _patients(n_patients=200, rows_each=2)
    path = tmp_path / "big.csv"
    frame.to_csv(path, index=False)
    data = load_tabular(_cfg(path, test_fraction=0.2, validation_fraction=0.15), seed=11)
    train, val, test = _pids(data.x_train), _pids(data.x_val), _pids(data.x_test)
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    assert train | val | test == set(range(200))
    assert len(test) == 40 and len(val) == 30 and len(train) == 130
    assert len(data.y_val) == 60 and len(data.sensitive_val) == 60 and data.num_units == 130
    np.testing.assert_array_equal(data.y_val, data.y_val.astype(np.int64))
    # the test side is the one without a validation split: validation is carved out of train
    two_way = load_tabular(_cfg(path, test_fraction=0.2), seed=11)
    assert _pids(two_way.x_test) == test and _pids(two_way.x_train) == train | val
    split = data.preprocessing["split"]
    assert split["validation_fraction"] == 0.15 and split["seed"] == 11
    assert not any(isinstance(v, int) and v in (40, 30, 130, 60, 260) for v in split.values())


def test_text_validation_split(tmp_path):
    rows = [{"text": f"report {i}", "label": "pos" if i % 3 else "neg"} for i in range(100)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    d = load_text(str(path), classes=["neg", "pos"], test_fraction=0.2, validation_fraction=0.1, split_seed=2)
    assert len(d.texts_test) == 20 and len(d.texts_val) == 10 and len(d.texts_train) == 70
    assert set(d.texts_train).isdisjoint(d.texts_val) and set(d.texts_val).isdisjoint(d.texts_test)
    assert len(d.y_val) == 10 and d.num_units == 70
    none = load_text(str(path), classes=["neg", "pos"], test_fraction=0.2, split_seed=2)
    assert none.texts_val == [] and none.y_val.shape == (0,) and none.texts_test == d.texts_test


def test_tabular_data_without_validation_fields_still_builds():
    x = np.zeros((3, 2), np.float32)
    data = TabularData(x_train=x, y_train=np.zeros(3, np.int64), units_train=np.arange(3), num_units=3,
                       x_test=x[:1], y_test=np.zeros(1, np.int64), sensitive_train=pd.DataFrame({"s": ["a"] * 3}),
                       sensitive_test=pd.DataFrame({"s": ["a"]}), feature_names=["f", "g"], classes=["0", "1"],
                       privacy_unit="example", source="x", preprocessing={})
    assert data.x_val.shape == (0, 2) and data.y_val.shape == (0,) and list(data.sensitive_val.columns) == ["s"]


def test_too_few_units_for_a_validation_split(tmp_path):
    path = tmp_path / "three.csv"
    _patients(n_patients=3).to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_tabular(_cfg(path, test_fraction=0.7, validation_fraction=0.2), seed=0)
    msg = str(info.value)
    assert msg.startswith("data.validation_fraction:") and "too few privacy units" in msg
    _no_digits(msg)
    path = tmp_path / "one.csv"
    _patients(n_patients=1).to_csv(path, index=False)
    with pytest.raises(DataError, match="^data.privacy_unit: too few privacy units") as info:
        load_tabular(_cfg(path, positive_label=None, classes=["well", "sick"]), seed=0)
    _no_digits(str(info.value))


# ---------------------------------------------------------------- declared classes: tables


def test_table_class_names_come_from_the_declaration_only(tmp_path):
    a, b = _patients(), _patients()
    b["outcome"] = np.where(b["outcome"] == "sick", "sick", "recovered")  # other label values, same declaration
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    ca, cb = load_tabular(_cfg(tmp_path / "a.csv")).classes, load_tabular(_cfg(tmp_path / "b.csv")).classes
    assert ca == cb == ["outcome!=sick", "outcome=sick"]
    # a 0/1 label without positive_label: fixed names, even when one value never occurs
    c = _patients()
    c["y"] = 0
    c.to_csv(tmp_path / "c.csv", index=False)
    assert load_tabular(_cfg(tmp_path / "c.csv", label="y", positive_label=None)).classes == ["y=0", "y=1"]


def test_table_declared_classes_in_order_and_unknown_labels_refused(table, tmp_path):
    data = load_tabular(_cfg(table, positive_label=None, classes=["well", "sick"]), seed=0)
    assert data.classes == ["well", "sick"] and data.preprocessing["label"]["from"] == "declared in recipe"
    frame = _patients()
    got = np.concatenate([data.y_train, data.y_test])
    assert sorted(got.tolist()) == sorted((frame["outcome"] == "sick").astype(int).tolist())
    binary = load_tabular(_cfg(table, positive_label="well", classes=["well", "sick"]), seed=0)
    assert binary.classes == ["sick", "well"]
    three = _patients()
    three.loc[three.index % 5 == 0, "outcome"] = "dead"
    three.to_csv(tmp_path / "three.csv", index=False)
    multi = load_tabular(_cfg(tmp_path / "three.csv", positive_label=None, classes=["well", "sick", "dead"]))
    assert multi.classes == ["well", "sick", "dead"] and multi.num_classes == 3
    with pytest.raises(DataError) as info:
        load_tabular(_cfg(tmp_path / "three.csv", positive_label=None, classes=["well", "sick"]))
    msg = str(info.value)
    assert msg.startswith("data.classes:") and "'dead'" in msg and "\n" not in msg
    _no_digits(msg)
    with pytest.raises(DataError, match=r"^data\.positive_label: 'gone' is not one of the declared classes"):
        load_tabular(_cfg(table, positive_label="gone", classes=["well", "sick"]))
    with pytest.raises(DataError, match=r"^data\.classes: .*listed twice"):
        load_tabular(_cfg(table, positive_label=None, classes=["well", "well"]))


# ---------------------------------------------------------------- declared classes: text


def _jsonl(path, labels) -> str:
    path.write_text("\n".join(json.dumps({"text": f"report {i}", "label": v}) for i, v in enumerate(labels)))
    return str(path)


def test_text_classes_must_be_declared_for_files(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", ["neg", "pos"] * 10)
    with pytest.raises(DataError) as info:
        load_text(src, positive_label="pos")
    msg = str(info.value)
    assert msg.startswith("data.classes:") and "never read from the data" in msg and "e.g. data.classes: [" in msg
    with pytest.raises(DataError, match="^data.classes:"):
        load_text_from_config(DataConfig(source=src))


def test_text_declared_classes_are_used_in_order(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", ["neg", "pos", "pos"] * 10)
    d = load_text(src, classes=["pos", "neg"])  # two declared, no positive_label: the second is positive
    assert d.classes == ["pos", "neg"]
    y = np.concatenate([d.y_train, d.y_test])
    assert int(y.sum()) == 10  # the "neg" records
    assert load_text(src, classes=["pos", "neg"], positive_label="pos").classes == ["neg", "pos"]
    # only one label occurs in the file: the declared classes stand (never read from the data)
    one = _jsonl(tmp_path / "one.jsonl", ["neg"] * 10)
    assert load_text(one, classes=["neg", "pos"]).classes == ["neg", "pos"]
    many = _jsonl(tmp_path / "many.jsonl", ["a", "b", "c"] * 10)
    assert load_text(many, classes=["a", "b", "c"], positive_label="c").classes == ["not c", "c"]
    with pytest.raises(DataError, match=r"^data\.classes: text labels are binary"):
        load_text(many, classes=["a", "b", "c"])
    with pytest.raises(DataError, match=r"^data\.positive_label: 'x' is not one of the classes"):
        load_text(src, classes=["neg", "pos"], positive_label="x")


def test_text_label_outside_declared_classes_is_refused(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", ["neg", "pos", "maybe"] * 7)
    with pytest.raises(DataError) as info:
        load_text(src, classes=["neg", "pos"])
    msg = str(info.value)
    assert msg.startswith("data.classes:") and "'maybe'" in msg and "outside the declared classes" in msg
    _no_digits(msg, tmp_path)


# ---------------------------------------------------------------- declared classes: MedMNIST


def _medmnist(path, n_classes: int = 3, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).reshape(n, 1).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_medmnist_needs_declared_classes_or_a_known_file(tmp_path):
    pytest.importorskip("torch")
    path = _medmnist(tmp_path / "toy.npz")
    with pytest.raises(DataError) as info:
        load_data(DataConfig(source=str(path)))
    msg = str(info.value)
    assert msg.startswith("data.classes:") and "never read from the labels" in msg
    assert "e.g. data.classes: [normal, pneumonia]" in msg and "pneumoniamnist" in msg
    _no_digits(msg, path)
    data = load_data(DataConfig(source=str(path), classes=["c", "b", "a"]))
    assert data.classes == ["c", "b", "a"] and data.preprocessing["label"]["from"].startswith("declared")
    # a file named like an official MedMNIST data set: its public class list
    known = _medmnist(tmp_path / "pneumoniamnist_64.npz", n_classes=2)
    data = load_data(DataConfig(source=str(known)))
    assert data.classes == ["normal", "pneumonia"] and "official" in data.preprocessing["label"]["from"]
    assert load_data(DataConfig(source=str(known), positive_label=0)).classes == ["pneumonia", "normal"]
    assert medmnist_flag("x/OrganAMNIST.npz") == "organamnist" and medmnist_flag("toy.npz") is None
    assert medmnist_flag("pathmnist_224.npz") == "pathmnist" and len(MEDMNIST_CLASSES["pathmnist"]) == 9


def test_medmnist_label_outside_declared_classes_is_refused(tmp_path):
    pytest.importorskip("torch")
    path = _medmnist(tmp_path / "toy.npz", n_classes=3)
    with pytest.raises(DataError) as info:
        load_data(DataConfig(source=str(path), classes=["a", "b"]))
    msg = str(info.value)
    assert msg.startswith("data.classes:") and "outside the classes" in msg
    known = _medmnist(tmp_path / "breastmnist.npz", n_classes=3)  # breastmnist has two official classes
    with pytest.raises(DataError, match=r"^data\.classes: .*outside the classes \['malignant', 'normal, benign'\]"):
        load_data(DataConfig(source=str(known)))


def test_medmnist_official_val_split_as_validation(tmp_path):
    pytest.importorskip("torch")
    path = _medmnist(tmp_path / "toy.npz")
    raw = np.load(path)
    data = load_data(DataConfig(source=str(path), classes=["a", "b", "c"], validation_fraction=0.1))
    assert data.x_train.shape[0] == 10 and data.x_val.shape == (4, 1, 28, 28) and data.x_test.shape[0] == 6
    np.testing.assert_allclose(data.x_val[:, 0], raw["val_images"] / 255, atol=1e-7)
    np.testing.assert_array_equal(data.y_val, np.arange(4) % 3)
    assert len(data.sensitive_val) == 4 and data.num_units == 10
    assert "val as validation" in data.preprocessing["split"]["method"]
    merged = load_data(DataConfig(source=str(path), classes=["a", "b", "c"]))
    assert merged.x_train.shape[0] == 14 and merged.x_val.shape == (0, 1, 28, 28)


# ---------------------------------------------------------------- no counts in messages


def test_missing_values_message_has_no_count(tmp_path):
    frame = _patients()
    frame.loc[[2, 5, 9], "age"] = np.nan  # three missing values
    frame.to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(DataError) as info:
        load_tabular(_cfg(tmp_path / "nan.csv"))
    msg = str(info.value)
    assert msg.startswith("data.numeric.age:") and "missing values" in msg and "3" not in msg
    _no_digits(msg)


def test_reader_failures_quote_no_line_numbers(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError) as info:
        load_text(str(bad), classes=["x", "y"])
    assert "not valid JSON Lines" in str(info.value)
    _no_digits(str(info.value), bad)
    broken = tmp_path / "broken.csv"
    broken.write_text("a,b\n1,2\n3,4,5,6\n7,8\n")
    with pytest.raises(DataError) as info:
        load_tabular(DataConfig(source=str(broken), label="b", numeric={"a": [0, 10]}))
    assert "could not read" in str(info.value)
    _no_digits(str(info.value), broken)


def test_preprocessing_holds_no_counts(tmp_path):
    frame = _patients(n_patients=37, rows_each=3)
    frame.to_csv(tmp_path / "p.csv", index=False)
    data = load_tabular(_cfg(tmp_path / "p.csv", validation_fraction=0.2), seed=1)
    counts = {len(frame), 37, len(data.y_train), len(data.y_test), len(data.y_val), data.num_units,
              int(data.y_train.sum()), int(data.y_test.sum())}

    def ints(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from ints(v)
        elif isinstance(node, list):
            for v in node:
                yield from ints(v)
        elif isinstance(node, int) and not isinstance(node, bool):
            yield node

    text = json.dumps(data.preprocessing)
    assert not set(ints(data.preprocessing)) & (counts - {1}), text


def test_numeric_values_of_records_are_never_quoted(tmp_path):
    frame = _patients()
    frame["age"] = frame["age"].astype(str)
    frame.loc[4, "age"], frame.loc[7, "age"] = "unknown", "71,5 years"
    frame["bp"] = np.linspace(100.25, 140.75, len(frame))
    frame.to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(DataError) as info:
        load_tabular(_cfg(tmp_path / "p.csv"))
    msg = str(info.value)
    assert msg.startswith("data.numeric.age:") and "'unknown'" in msg and "71" not in msg
    frame.loc[4, "age"] = "42 years"  # only values with digits: none quoted
    frame.loc[7, "age"] = "55 years"
    frame.to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(DataError) as info:
        load_tabular(_cfg(tmp_path / "p.csv"))
    msg = str(info.value)
    assert "not quoted" in msg
    _no_digits(msg)
    # a continuous label: neither "not 0/1" nor "never occurs" quotes its values
    for kw in ({"positive_label": None}, {"positive_label": 3}):
        with pytest.raises(DataError) as info:
            load_tabular(_cfg(tmp_path / "p.csv", label="bp", numeric={"pid_num": [0, 1000]}, **kw))
        msg = str(info.value)
        assert "'bp'" in msg and "100" not in msg and "140" not in msg
