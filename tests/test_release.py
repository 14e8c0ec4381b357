"""The released model (release/model.safetensors + model.json): only public facts and the DP weights, read back
without a trainer, applied to new records with the declared encoding, and refused when damaged or foreign.

Tiny models trained directly with the trainers (a few DP steps; the plan is a stand-in with the attributes the
trainers read, so these tests do not depend on how a PrivacyPlan is constructed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import accounting as acc
from dptrain.config import parse_recipe
from dptrain.data import load_data
from dptrain.release import (
    FORMAT,
    ReleaseError,
    export_onnx,
    load_model,
    predict,
    save_release_model,
    scores_frame,
)
from dptrain.run import build_model, build_trainer
from dptrain.trainers.base import Batch

ROOT = Path(__file__).resolve().parents[1]
DP_SEED = 918273645546372819  # secret: must never reach release/
BACKENDS = ["opacus", "jax"]
HAS_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("flax") is not None
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
SPEC_KEYS = {"format", "backend", "model", "inputs", "classes", "input", "weights"}
TABLE_INPUT_KEYS = {"kind", "columns", "features", "missing_values", "extra_columns"}
COLUMN_KEYS = {"name", "type", "bounds", "categories", "from", "transform", "encoding"}
IMAGE_INPUT_KEYS = {"kind", "size", "channels", "intensity", "path_column", "paths", "channels_rule", "resize",
                    "layout"}


def _backend(b: str):
    return pytest.param(b, marks=pytest.mark.skipif(b == "jax" and not HAS_JAX, reason="jax not installed"))


# ---------------------------------------------------------------- tiny runs


def _table(path: Path, n: int = 120, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "age": rng.integers(18, 95, n), "bp": rng.normal(130, 20, n).round(1),
        "sex": rng.choice(["f", "m"], n), "stage": rng.integers(1, 4, n), "note": "extra column, not a feature"})
    frame["outcome"] = ((frame["age"] > 60) ^ (rng.random(n) < 0.2)).astype(int)
    frame.to_csv(path, index=False)
    return path


def _manifest(folder: Path, n: int = 16) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = (rng.random((12, 10)) * 80 + (150 if i % 2 else 0)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{i}.png")
        rows.append((f"im{i}.png", i % 2, f"id{i}"))
    pd.DataFrame(rows, columns=["file", "label", "image_id"]).to_csv(folder / "m.csv", index=False)
    return folder / "m.csv"


def _recipe(data: dict, model: dict, backend: str):
    return parse_recipe({"name": "tiny", "data": data, "model": model, "trainer": {"backend": backend},
                         "privacy": {"noise_multiplier": 1.0}, "optimizer": {"lr": 0.5},
                         "training": {"epochs": 1, "batch_size": 8, "ema": 0.9}, "seed": 3})


def _train(recipe, steps: int):
    """A few DP steps (batches of 8 units) with the trainer run.py would build; returns (data, trainer).

    ``steps=0``: no step (compiling a jax CNN's DP step costs a minute of CPU); the EMA weights are set through
    the trainer's own ``load_state_dict`` instead, so that they differ from the live parameters."""
    data = load_data(recipe.data, seed=recipe.seed, check=False)  # 16 images: below the trainability rule
    n = len(data.y_train)
    plan = SimpleNamespace(mode="dp", noise_multiplier=1.0, clipping_norm=1.0, expected_batch_size=8.0,
                           privacy_unit="example", scheme=acc.PoissonSampling(8 / n), steps=max(steps, 1))
    trainer = build_trainer(recipe)
    trainer.init(build_model(recipe, data), plan, seed=recipe.seed, dp_seed=DP_SEED, ema=recipe.training.ema)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        rows = rng.choice(n, 8, replace=False)
        trainer.dp_step(Batch(data.x_train[rows], data.y_train[rows], rows))
    if steps == 0:
        state = trainer.state_dict()  # numpy arrays (both backends)
        ema, gen = state["ema"], np.random.default_rng(0)
        for k in (ema if isinstance(ema, dict) else range(len(ema))):
            ema[k] = (ema[k] + 0.05 * gen.standard_normal(ema[k].shape)).astype(ema[k].dtype)
        trainer.load_state_dict(state)
    return data, trainer


def _release(tmp: Path, recipe, steps: int):
    data, trainer = _train(recipe, steps)
    run = tmp / "run"
    save_release_model(run / "release", recipe, data, trainer.release_weights())
    return SimpleNamespace(run=run, recipe=recipe, data=data, trainer=trainer)


@pytest.fixture(scope="module")
def table_csv(tmp_path_factory) -> Path:
    return _table(tmp_path_factory.mktemp("table") / "train.csv")


TABLE_DATA = {"label": "outcome", "numeric": {"age": [0, 100], "bp": [80, 200]},
              "categorical": {"sex": ["f", "m"], "stage": [1, 2, 3]}}


_RUNS: dict[str, SimpleNamespace] = {}


def _table_run(backend: str, table_csv: Path, tmp_path_factory) -> SimpleNamespace:
    """One released table run per backend (Opacus: 5 DP steps; jax: 2, its compilation is the cost)."""
    if backend not in _RUNS:
        recipe = _recipe({"source": str(table_csv), **TABLE_DATA}, {"name": "mlp", "hidden": [8]}, backend)
        _RUNS[backend] = _release(tmp_path_factory.mktemp(f"table-{backend}"), recipe,
                                  steps=5 if backend == "opacus" else 2)
    return _RUNS[backend]


@pytest.fixture(scope="module", params=[_backend(b) for b in BACKENDS])
def table_run(request, table_csv, tmp_path_factory):
    return _table_run(request.param, table_csv, tmp_path_factory)


@pytest.fixture(scope="module", params=[_backend(b) for b in BACKENDS])
def image_run(request, tmp_path_factory):
    pytest.importorskip("monai")
    manifest = _manifest(tmp_path_factory.mktemp(f"images-{request.param}"))
    recipe = _recipe({"source": str(manifest), "label": "label", "positive_label": 1,
                      "image": {"size": 8, "path_column": "file"}},
                     {"name": "cnn", "channels": [4, 4], "strides": [2, 2], "groups": 2}, request.param)
    return _release(manifest.parent, recipe, steps=2 if request.param == "opacus" else 0)


# ---------------------------------------------------------------- what release/ holds


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_release_holds_only_the_weights_and_public_facts(table_run):
    from safetensors.numpy import load_file

    r = table_run
    files = {p.name for p in (r.run / "release").iterdir()}
    assert files == {"model.safetensors", "model.json"}  # no temporary files left behind
    names = set(load_file(r.run / "release" / "model.safetensors"))
    expected = ({"0.weight", "0.bias", "2.weight", "2.bias"} if r.recipe.trainer.backend == "opacus"
                else {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"})
    assert names == expected == set(r.trainer.release_weights())
    assert all(v.dtype == np.float32 for v in r.trainer.release_weights().values())
    text = (r.run / "release" / "model.json").read_text()
    spec = json.loads(text)
    assert set(spec) == SPEC_KEYS and spec["format"] == FORMAT and spec["backend"] == r.recipe.trainer.backend
    assert spec["inputs"] == 7 and spec["classes"] == r.data.classes
    assert spec["model"] == r.recipe.model.model_dump(mode="json")
    assert set(spec["input"]) == TABLE_INPUT_KEYS and spec["input"]["features"] == r.data.feature_names
    assert [c["name"] for c in spec["input"]["columns"]] == ["age", "bp", "sex", "stage"]
    assert spec["input"]["columns"][0]["bounds"] == [0.0, 100.0]
    assert spec["input"]["columns"][3]["categories"] == ["1", "2", "3"]
    assert {k for c in spec["input"]["columns"] for k in c} <= COLUMN_KEYS
    # nothing from the training data or the run: no counts, statistics, split, seeds
    public = {k: v for k, v in spec.items() if k != "model"}  # the model section is the recipe's, checked above
    assert not _keys(public) & {"seed", "dp_seed", "split", "n_train", "n_test", "num_units", "statistics",
                                "counts", "source", "privacy_unit", "sensitive", "label", "mean", "std", "notes"}
    blob = (r.run / "release" / "model.safetensors").read_bytes()
    assert str(DP_SEED) not in text and str(DP_SEED).encode() not in blob


def test_release_weights_are_the_ema_weights_predict_uses(table_run):
    r = table_run
    w = r.trainer.release_weights()
    if r.recipe.trainer.backend == "opacus":
        live = {k: v.detach().cpu().numpy() for k, v in r.trainer.module.state_dict().items()}
    else:
        from dptrain.release import flax_weight_dict

        live = flax_weight_dict(r.trainer.params, r.trainer.others)
    assert set(w) == set(live)
    assert any(not np.allclose(w[k], live[k]) for k in w)  # the EMA, not the last iterate


# ---------------------------------------------------------------- applying it


def test_load_model_predicts_as_the_trainer(table_run):
    r = table_run
    for where in (r.run, r.run / "release"):
        model = load_model(where)
        assert model.classes == r.data.classes and model.backend == r.recipe.trainer.backend
        assert model.input_spec["kind"] == "table"
        np.testing.assert_allclose(model.predict_proba(r.data.x_test), r.trainer.predict(r.data.x_test), atol=1e-6)
        np.testing.assert_allclose(model.predict_proba(r.data.x_train), r.trainer.predict(r.data.x_train), atol=1e-6)


def test_encode_reproduces_the_training_encoding(table_run, table_csv):
    r = table_run
    model = load_model(r.run)
    x = model.encode(pd.read_csv(table_csv).drop(columns=["outcome"]))
    assert x.dtype == np.float32 and x.shape == (120, 7)
    trained = np.concatenate([r.data.x_train, r.data.x_test])
    np.testing.assert_array_equal(np.unique(x, axis=0), np.unique(trained, axis=0))


def test_predict_file_and_predict(table_run, tmp_path):
    r = table_run
    new = _table(tmp_path / "new.csv", n=9, seed=5)
    frame = pd.read_csv(new)
    frame.loc[0, "age"] = 130  # outside the declared bounds: clipped, as in training
    frame = frame.drop(columns=["outcome"])[["stage", "note", "sex", "bp", "age"]]  # order and extras do not matter
    frame.to_csv(new, index=False)
    frame.to_parquet(tmp_path / "new.parquet")
    model = load_model(r.run)
    scores = model.predict_file(new)
    assert list(scores.columns) == ["score"] and len(scores) == 9
    expected = model.predict_proba(model.encode(frame))[:, 1]
    np.testing.assert_allclose(scores["score"], expected, atol=1e-7)
    np.testing.assert_allclose(model.predict_file(tmp_path / "new.parquet")["score"], expected, atol=1e-7)
    assert model.encode(frame)[0, 0] == 1.0
    out = predict(r.run, new, tmp_path / "out" / "scores.csv")
    assert out == tmp_path / "out" / "scores.csv"
    np.testing.assert_allclose(pd.read_csv(out)["score"], expected, atol=1e-7)
    assert [p.name for p in out.parent.iterdir()] == ["scores.csv"]


@pytest.mark.parametrize("change, words", [
    (lambda f: f.drop(columns=["sex"]), ["column 'sex' is missing", "fix"]),
    (lambda f: f.assign(stage=[4] + [1] * (len(f) - 1)), ["column 'stage'", "['4']", "categories", "fix"]),
    (lambda f: f.assign(bp=[np.nan] + [120.0] * (len(f) - 1)), ["column 'bp'", "missing value", "row 0", "fix"]),
    (lambda f: f.assign(sex=[None] + ["f"] * (len(f) - 1)), ["column 'sex'", "missing value", "fix"]),
    (lambda f: f.assign(age=["old"] + [50] * (len(f) - 1)), ["column 'age'", "non-numeric", "'old'", "fix"]),
])
def test_bad_records_are_refused_with_one_line(table_run, change, words):
    model = load_model(table_run.run)
    frame = pd.DataFrame({"age": [70] * 4, "bp": [120.0] * 4, "sex": ["m"] * 4, "stage": [2] * 4})
    model.encode(frame)  # the clean frame encodes
    with pytest.raises(ReleaseError) as err:
        model.encode(change(frame))
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_encoded_inputs_are_checked(table_run):
    model = load_model(table_run.run)
    for bad in (np.zeros((2, 6), np.float32), np.zeros(7, np.float32), np.full((1, 7), np.nan, np.float32)):
        with pytest.raises(ReleaseError, match="predict_proba"):
            model.predict_proba(bad)
    assert model.predict_proba(np.zeros((0, 7), np.float32)).shape == (0, 2)


# ---------------------------------------------------------------- refusals


def _copy_release(r, tmp: Path) -> Path:
    import shutil

    dst = tmp / "copy" / "release"
    shutil.copytree(r.run / "release", dst)
    return dst


def test_damaged_or_foreign_files_are_refused(table_run, tmp_path):
    rel = _copy_release(table_run, tmp_path)
    weights, spec_path = rel / "model.safetensors", rel / "model.json"
    spec = json.loads(spec_path.read_text())
    good = weights.read_bytes()

    def refused(*words):
        with pytest.raises(ReleaseError) as err:
            load_model(rel.parent)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)

    tampered = bytearray(good)
    tampered[-3] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(tampered))
    refused("sha256", "altered")
    weights.unlink()
    refused("missing")
    weights.write_bytes(b"not safetensors")
    spec_path.write_text(json.dumps({**spec, "weights": {"file": "model.safetensors",
                                                          "sha256": hashlib.sha256(b"not safetensors").hexdigest()}}))
    refused("not a readable safetensors file")
    from safetensors.numpy import save

    other = save({"x": np.zeros(3, np.float32)})
    weights.write_bytes(other)
    spec_path.write_text(json.dumps({**spec, "weights": {"file": "model.safetensors",
                                                          "sha256": hashlib.sha256(other).hexdigest()}}))
    refused("do not match the model")
    weights.write_bytes(good)
    spec_path.write_text("{not json")
    refused("not valid JSON")
    spec_path.write_text(json.dumps({**spec, "format": "something/else"}))
    refused("not a dptrain model")
    spec_path.write_text(json.dumps({**spec, "weights": {"file": "../model.safetensors", "sha256": "0"}}))
    refused("weights")
    spec_path.write_text(json.dumps(spec))
    load_model(rel.parent)  # restored: loads again
    with pytest.raises(ReleaseError, match="no released model"):
        load_model(tmp_path)
    with pytest.raises(ReleaseError, match="no such directory"):
        load_model(tmp_path / "nowhere")


def test_predict_refuses_a_bad_out(table_run, table_csv, tmp_path):
    (tmp_path / "taken.csv").write_text("x\n")
    for out, words in ((tmp_path, "is a directory"), (tmp_path / "taken.csv", "already there"),
                       (tmp_path / "scores.txt", ".csv")):
        with pytest.raises(ReleaseError, match=words) as err:
            predict(table_run.run, table_csv, out)
        assert "\n" not in str(err.value)
    assert (tmp_path / "taken.csv").read_text() == "x\n"
    with pytest.raises(ReleaseError, match="no such file"):
        predict(table_run.run, tmp_path / "absent.csv", tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_scores_frame_columns():
    probs = np.array([[0.2, 0.3, 0.5]])
    assert list(scores_frame(probs, ["a", "b", "c"]).columns) == ["prob_a", "prob_b", "prob_c"]
    assert list(scores_frame(probs[:, :2], ["no", "yes"]).columns) == ["score"]


_NO_TORCH = """
import sys
from dptrain.release import load_model
m = load_model(sys.argv[1])
s = m.predict_file(sys.argv[2])
assert len(s) == 4 and m.backend == "jax", s
print(sorted(k for k in ("torch", "opacus", "jax", "flax") if k in sys.modules))
"""


@pytest.mark.skipif(not HAS_JAX, reason="jax not installed")
def test_a_jax_model_loads_and_predicts_without_torch(table_csv, tmp_path_factory, tmp_path):
    r = _table_run("jax", table_csv, tmp_path_factory)
    new = _table(tmp_path / "new.csv", n=4, seed=7)
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(r.run), str(new)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['flax', 'jax']"  # neither torch nor opacus


# ---------------------------------------------------------------- images


def test_image_model(image_run, tmp_path):
    r = image_run
    spec = json.loads((r.run / "release" / "model.json").read_text())
    assert set(spec) == SPEC_KEYS and set(spec["input"]) == IMAGE_INPUT_KEYS
    assert spec["inputs"] == [1, 8, 8] and spec["input"]["path_column"] == "file"
    assert spec["input"]["intensity"]["range"] == [0.0, 255.0] and spec["input"]["intensity"]["declared"] is False
    model = load_model(r.run)
    np.testing.assert_allclose(model.predict_proba(r.data.x_test), r.trainer.predict(r.data.x_test), atol=1e-6)
    manifest = Path(r.recipe.data.source)
    frame = pd.read_csv(manifest)
    x = model.encode(frame, root=manifest.parent)
    trained = np.concatenate([r.data.x_train, r.data.x_test])
    np.testing.assert_array_equal(np.unique(x, axis=0), np.unique(trained, axis=0))  # the same pixels as training
    scores = model.predict_file(manifest)  # paths relative to the manifest, not the working directory
    np.testing.assert_allclose(scores["score"], model.predict_proba(x)[:, 1], atol=1e-7)
    with pytest.raises(ReleaseError, match="column 'file'"):
        model.encode(frame.drop(columns=["file"]), root=manifest.parent)
    with pytest.raises(ReleaseError, match="no image at"):
        model.encode(frame, root=tmp_path)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint16) + 1000).save(tmp_path / "deep.png")
    with pytest.raises(ReleaseError, match="not an 8-bit image"):
        model.encode(pd.DataFrame({"file": ["deep.png"]}), root=tmp_path)


# ---------------------------------------------------------------- ONNX


@pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed")
def test_onnx_export_matches(table_run, tmp_path):
    import onnxruntime as ort

    r = table_run
    path = export_onnx(r.run, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (r.data.x_test, r.data.x_test[:1]):  # the batch axis is dynamic
        got = session.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, load_model(r.run).predict_proba(x), atol=1e-5)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["dptrain.classes"]) == r.data.classes
    with pytest.raises(ReleaseError, match="already there"):
        export_onnx(r.run, path)


@pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed")
def test_onnx_export_of_images(image_run, tmp_path):
    r = image_run
    if r.recipe.trainer.backend == "jax":
        with pytest.raises(ReleaseError, match="not supported yet"):
            export_onnx(r.run, tmp_path / "m.onnx")
        assert not (tmp_path / "m.onnx").exists()
        return
    import onnxruntime as ort

    session = ort.InferenceSession(str(export_onnx(r.run, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": r.data.x_test})[0],
                               load_model(r.run).predict_proba(r.data.x_test), atol=1e-5)
