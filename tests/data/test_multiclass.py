"""Multi-class tables and image manifests with declared ``data.classes``: softmax cross-entropy on both backends,
accuracy, macro AUROC (one-vs-rest) and per-class AUROC in the record; bad declarations refused in one line.

The table has three classes: ``a`` is perfectly separable (feature x1), ``b`` and ``c`` are drawn alike, so a
working K-way head gives ``a`` a one-vs-rest AUROC of ~1 and ``b``, ``c`` clearly less."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from dptrain.cli import main
from dptrain.config import DataConfig, parse_recipe
from dptrain.data import DataError, load_tabular
from dptrain.evaluate.metrics import per_class_auroc
from dptrain.run import train

CLASSES = ["a", "b", "c"]
TRAIN = {"model": {"hidden": [8]}, "training": {"epochs": 4, "batch_size": 64}, "privacy": {"epsilon": 8}}


def _table(path: Path, n: int = 480, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x1 = np.where(y == 0, 3.0, 0.0) + rng.normal(0, 0.3, n)  # class a: separable
    x2 = rng.normal(0, 1, n)  # no signal: b and c look alike
    grp = np.where(rng.random(n) < 0.5, "F", "M")
    frame = pd.DataFrame({"x1": x1.round(4), "x2": x2.round(4), "grp": grp, "y": np.array(CLASSES)[y]})
    frame.to_csv(path, index=False)
    return path


def _data(source: Path, **extra) -> dict:
    return {"source": str(source), "label": "y", "classes": CLASSES, "numeric": {"x1": [-2, 5], "x2": [-4, 4]},
            "sensitive": ["grp"], "validation_fraction": 0.2, **extra}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return _table(tmp_path_factory.mktemp("mc") / "t.csv")


def _check_record(out: Path, rec: dict, classes: list[str]) -> None:
    preds = pd.read_parquet(out / "private" / "predictions.parquet")
    cols = [f"prob_{c}" for c in classes]
    assert "score" not in preds and list(preds.columns[:1 + len(classes)]) == ["y_true", *cols]
    y, p = preds["y_true"].to_numpy(), preds[cols].to_numpy(np.float64)
    for split in ("test", "validation"):
        m = rec["metrics"][split]
        assert set(m) >= {"accuracy", "auroc", "auroc_per_class", "auprc", "brier", "ece", "n"}
        assert m["auroc_average"] == "macro one-vs-rest" and list(m["auroc_per_class"]) == classes
        assert np.mean(list(m["auroc_per_class"].values())) == pytest.approx(m["auroc"], abs=1e-12)
    m = rec["metrics"]["test"]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-9)
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y), abs=1e-12)
    for k, c in enumerate(classes):
        assert m["auroc_per_class"][c] == pytest.approx(roc_auc_score(y == k, p[:, k]), abs=1e-9)


@pytest.mark.parametrize("backend", ["opacus", "jax"])
def test_table_with_three_declared_classes_trains_a_softmax_head(table, tmp_path, backend):
    recipe = parse_recipe({"name": "mc", "data": _data(table), "trainer": {"backend": backend}, **TRAIN})
    out = tmp_path / backend
    rec = train(recipe, out, progress=False).record
    assert rec["data"]["classes"] == CLASSES
    assert rec["data"]["preprocessing"]["label"]["encoding"] == "index of the label in the declared classes"
    _check_record(out, rec, CLASSES)
    per = rec["metrics"]["test"]["auroc_per_class"]
    assert per["a"] > 0.99 and per["b"] < 0.9 and per["c"] < 0.9, per  # the separable class, and only it
    assert rec["privacy"]["epsilon"] <= 8 and "loss_attack_auc" in rec["audit"]  # accounting, audit: as binary
    from dptrain import load_model

    model = load_model(out)
    assert model.classes == CLASSES and model.predict_proba(np.zeros((2, 2), np.float32)).shape == (2, 3)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """150 PNGs (16x16) of three classes told apart by brightness; labels written as text. 150, not fewer: the
    DP unit count (noise std 20) must stay above the batch size for every draw."""
    root = tmp_path_factory.mktemp("mcimg")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(150):
        k = i % 3
        img = (rng.random((16, 16)) * 60 + 90 * k).astype(np.uint8)
        Image.fromarray(img).save(root / f"i{i}.png")
        rows.append((f"i{i}.png", ["normal", "benign", "malignant"][k]))
    pd.DataFrame(rows, columns=["path", "diagnosis"]).to_csv(root / "m.csv", index=False)
    return root / "m.csv"


@pytest.mark.parametrize("backend", ["opacus", "jax"])
def test_image_manifest_with_three_declared_classes(manifest, tmp_path, backend):
    classes = ["normal", "benign", "malignant"]
    recipe = parse_recipe({
        "name": "mcimg", "data": {"source": str(manifest), "label": "diagnosis", "classes": classes,
                                  "validation_fraction": 0.2, "image": {"size": 16}},
        "model": {"name": "cnn", "channels": [4, 4], "strides": [2, 2], "groups": 2},
        "privacy": {"epsilon": 8}, "optimizer": {"lr": 0.5}, "trainer": {"backend": backend},
        "training": {"epochs": 3, "batch_size": 16}})
    out = tmp_path / backend
    rec = train(recipe, out, progress=False).record
    assert rec["data"]["classes"] == classes
    _check_record(out, rec, classes)


# ---------------------------------------------------------------- refusals, one line each


def _cli_error(tmp_path: Path, capsys, data: dict) -> str:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bad", "data": data, **TRAIN}))
    capsys.readouterr()
    rc = main(["train", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err.strip()


def test_label_outside_the_declared_classes_is_refused(tmp_path, capsys):
    frame = pd.read_csv(_table(tmp_path / "t.csv"))
    frame.loc[frame.index[5], "y"] = "d"
    frame.to_csv(tmp_path / "t.csv", index=False)
    line = _cli_error(tmp_path, capsys, _data(tmp_path / "t.csv"))
    assert "data.classes:" in line and "column 'y'" in line and "'d'" in line
    assert "fix: add them to data.classes" in line


def test_positive_label_with_more_than_two_declared_classes_is_refused(tmp_path, capsys):
    line = _cli_error(tmp_path, capsys, _data(_table(tmp_path / "t.csv"), positive_label="a"))
    assert "data.positive_label:" in line and "3 declared classes" in line and "remove data.positive_label" in line
    with pytest.raises(DataError, match=r"^data\.positive_label: \['a', 'b'\] is given with 3 declared classes"):
        load_tabular(DataConfig(**_data(tmp_path / "t.csv", positive_label=["a", "b"])))
    # binary stays: positive_label alone, or with two declared classes
    alone = load_tabular(DataConfig(**_data(tmp_path / "t.csv", classes=None, positive_label="a")))
    assert alone.classes == ["y!=a", "y=a"] and alone.num_classes == 2
    frame = pd.read_csv(tmp_path / "t.csv")
    frame[frame["y"] != "c"].to_csv(tmp_path / "two.csv", index=False)
    two = load_tabular(DataConfig(**_data(tmp_path / "two.csv", classes=["a", "b"], positive_label="a")))
    assert two.classes == ["b", "a"] and two.num_classes == 2


def test_per_class_auroc_one_vs_rest():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    p = rng.dirichlet(np.ones(4), 300)
    p[:, 2] = 0.0
    target = np.where(y == 2, 0.9, 0.05)  # class 2 perfectly ranked, the others at random
    p *= ((1 - target) / p.sum(1))[:, None]
    p[:, 2] = target
    per = per_class_auroc(y, p, ["w", "x", "y", "z"])
    assert per["y"] == 1.0 and all(0.3 < per[c] < 0.7 for c in "wxz")
    assert np.mean(list(per.values())) == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    assert np.isnan(per_class_auroc(np.zeros(5, int), np.full((5, 3), 1 / 3), "abc")["b"])  # absent: nan
    with pytest.raises(ValueError, match=r"^probs: expected shape \(n, 3\)"):
        per_class_auroc(y, p, ["a", "b", "c"])
