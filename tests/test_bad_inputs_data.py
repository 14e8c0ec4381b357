"""Every bad input a clean error: data that cannot train a classifier, manifest paths, files of the wrong kind.

One row per case (``CASES``): each builds a small bad input under ``tmp_path`` and calls ``dptrain.cli.main``;
what must hold for every row: exit status 2, stderr exactly ONE line ``dptrain: error: ...`` naming the field or
the file, no traceback, nothing written (train/synth: no --out directory; audit/report: the run or sweep
directory unchanged; predict: no scores file), and no exact count of the data in the message (checked on the
message with the test's own paths removed). Every case fails in validation, before any training; the cases that
need a finished run (audit, report, predict) copy ONE tiny module-scoped run and break one file of the copy.

The controls at the end show that each input differs from a valid one by its one defect.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dptrain.cli import main

# ---------------------------------------------------------------- inputs


def _frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.random(n).round(3), "b": rng.random(n).round(3),
                         "grp": np.where(np.arange(n) % 3 == 0, "x", "z"), "y": np.arange(n) % 2})


TABLE = {"label": "y", "numeric": {"a": [0, 1], "b": [0, 1]}, "sensitive": ["grp"]}
DP = {"noise_multiplier": 1.0}  # a DP run (no calibration: fast)
TRAIN = {"model": {"hidden": [4]}, "training": {"epochs": 1, "batch_size": 8}}


def _recipe(tmp: Path, data: dict, *, privacy: dict | None = None, **sections) -> Path:
    tree = {"name": "bad", "data": data, "privacy": privacy or DP, **TRAIN, **sections}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _write(path: Path, content: pd.DataFrame | str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, pd.DataFrame):
        content.to_csv(path, index=False) if path.suffix == ".csv" else content.to_parquet(path, index=False)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


def _test_rows(n: int, test_fraction: float = 0.25, validation_fraction: float = 0.0):
    """The (test, validation) row masks the loader will make for n rows of single-row units (split seed 0)."""
    from dptrain.data.core import _split3

    return _split3(np.arange(n), test_fraction, validation_fraction, 0)


@dataclass
class Built:
    argv: list[str]
    watch: Path  # nothing may change under it
    counts: tuple[int, ...] = ()  # exact counts of the data that the message must not quote


@dataclass
class Case:
    build: Callable[[Path, dict], Built]
    needles: tuple[str, ...]  # what the one line must name (the field or the file, and what is wrong)
    run: bool = False  # needs the module's finished run


def _train(tmp: Path, content, data: dict | None = None, *, name: str = "t.csv", privacy: dict | None = None,
           counts: tuple[int, ...] = ()) -> Built:
    src = tmp / name
    if content is not None:
        _write(src, content)
    recipe = _recipe(tmp, {"source": str(src), **TABLE, **(data or {})}, privacy=privacy)
    return Built(["train", str(recipe), "--out", str(tmp / "out"), "--quiet"], tmp / "out", counts)


# ---- tables


def _one_class(tmp, _):
    f = _frame()
    f["y"] = 0
    return _train(tmp, f, counts=(40, 30, 10))


def _positive_everywhere(tmp, _):
    f = _frame()
    f["y"] = "yes"
    return _train(tmp, f, {"positive_label": "yes"}, counts=(40, 30, 10))


def _one_class_nonprivate(tmp, _):
    f = _frame()
    f["y"] = 1
    return _train(tmp, f, privacy={"epsilon": float("inf")})


def _three_rows(tmp, _):
    return _train(tmp, _frame(3), counts=(3, 2))


def _nine_rows(tmp, _):
    return _train(tmp, _frame(9), counts=(9, 7))


def _only_in(split: str):
    """A label with one class in ``split`` only (both classes everywhere else)."""
    def build(tmp, _):
        vf = 0.0 if split == "test" else 0.2
        test, val = _test_rows(44, 0.25, vf)  # 11 test, 9 validation: no count equals a number of the rule
        train = ~(test | val)
        f = _frame(44)
        f.loc[{"test": test, "train": train, "validation": val}[split], "y"] = 0
        data = {"validation_fraction": vf} if vf else {}
        return _train(tmp, f, data, counts=(44, int(train.sum()), int(test.sum()), int(val.sum()) or 44))
    return build


def _declared_class_absent(tmp, _):
    f = _frame()
    f["y"] = np.where(f["y"] == 1, "b", "a")
    return _train(tmp, f, {"classes": ["a", "b", "c"]}, counts=(40,))


def _duplicate_header(tmp, _):
    body = "\n".join(f"{r.a},{r.a},{r.b},{r.grp},{r.y}" for r in _frame().itertuples())
    return _train(tmp, "a,a,b,grp,y\n" + body + "\n")


def _duplicate_label_header(tmp, _):
    body = "\n".join(f"{r.a},{r.b},{r.grp},{r.y},{1 - r.y}" for r in _frame().itertuples())
    return _train(tmp, "a,b,grp,y,y\n" + body + "\n")


def _header_only(tmp, _):
    return _train(tmp, "a,b,grp,y\n")


def _not_utf8(tmp, _):
    return _train(tmp, ("a,b,grp,y\n" + "0.1,0.2,caf\xe9,0\n0.3,0.4,z,1\n" * 20).encode("latin-1"))


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4


def _label_missing_everywhere(tmp, _):
    f = _frame()
    f["y"] = np.nan
    return _train(tmp, f)


def _feature_missing_everywhere(tmp, _):
    f = _frame()
    f["a"] = np.nan
    return _train(tmp, f)


def _one_unit(tmp, _):
    f = _frame()
    f["pid"] = "p1"
    return _train(tmp, f, {"privacy_unit": "pid"})


def _directory_source(tmp, _):
    (tmp / "t.csv").mkdir()
    return _train(tmp, None)


def _garbage_parquet(tmp, _):
    return _train(tmp, "this is not parquet\n", name="t.parquet")


def _label_outside_classes(tmp, _):
    f = _frame()
    f.loc[3, "y"] = 2
    return _train(tmp, f, {"classes": [0, 1]})


# ---- image manifests (paths are confined to the manifest's folder by default)


def _png(path: Path, value: int = 0) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path.name


def _manifest(tmp: Path, n: int = 12, labels=None, extra: list[tuple[str, int]] = (), header: str | None = None,
              raw: str | bytes | None = None, counts: tuple[int, ...] = ()) -> Built:
    folder = tmp / "imgs"
    rows = [(_png(folder / f"i{i}.png", 40 * (i % 2)), (labels[i] if labels is not None else i % 2)) for i in range(n)]
    rows += list(extra)
    manifest = folder / "m.csv"
    if raw is not None:
        _write(manifest, raw)
    elif header is not None:
        _write(manifest, header + "\n" + "".join(f"{p},{y},{y}\n" for p, y in rows))
    else:
        pd.DataFrame(rows, columns=["path", "label"]).to_csv(manifest, index=False)
    recipe = _recipe(tmp, {"source": str(manifest), "label": "label", "positive_label": 1, "image": {"size": 8}},
                     model={"name": "cnn", "channels": [4], "strides": [2], "groups": 2})
    return Built(["train", str(recipe), "--out", str(tmp / "out"), "--quiet"], tmp / "out", counts)


def _dotdot(tmp, _):
    _png(tmp / "outside.png")
    return _manifest(tmp, extra=[("../outside.png", 1)])


def _absolute_outside(tmp, _):
    _png(tmp / "elsewhere" / "x.png")
    return _manifest(tmp, extra=[(str(tmp / "elsewhere" / "x.png"), 0)])


def _symlink_outside(tmp, _):
    _png(tmp / "secret.png")
    (tmp / "imgs").mkdir(parents=True, exist_ok=True)
    os.symlink(tmp / "secret.png", tmp / "imgs" / "link.png")
    return _manifest(tmp, extra=[("link.png", 1)])


def _symlinked_folder_outside(tmp, _):
    _png(tmp / "elsewhere" / "y.png")
    (tmp / "imgs").mkdir(parents=True, exist_ok=True)
    os.symlink(tmp / "elsewhere", tmp / "imgs" / "sub")
    return _manifest(tmp, extra=[("sub/y.png", 0)])


# ---- MedMNIST .npz


def _npz(tmp: Path, train_labels: np.ndarray, **arrays) -> Built:
    n = len(train_labels)
    full = {"train_images": np.zeros((n, 8, 8), np.uint8), "train_labels": train_labels.reshape(n, 1),
            "val_images": np.zeros((4, 8, 8), np.uint8), "val_labels": np.zeros((4, 1), np.uint8),
            "test_images": np.zeros((6, 8, 8), np.uint8), "test_labels": (np.arange(6) % 2).reshape(6, 1)}
    full.update(arrays)
    path = tmp / "pneumoniamnist.npz"
    np.savez(path, **full)
    recipe = _recipe(tmp, {"source": str(path)}, model={"name": "cnn", "channels": [4], "strides": [2], "groups": 2})
    return Built(["train", str(recipe), "--out", str(tmp / "out"), "--quiet"], tmp / "out", (n, 6))


# ---- text for `dptrain synth`


def _texts(n: int = 40, one_class: bool = False) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"report number {i} heart size normal" for i in range(n)],
                         "label": ["normal" if one_class or i % 2 else "abnormal" for i in range(n)]})


def _synth(tmp: Path, content, *, name: str = "r.csv", model: str = "builtin:smollm2-135m",
           counts: tuple[int, ...] = ()) -> Built:
    src = tmp / name
    if content is not None:
        _write(src, content)
    tree = {"name": "bad-synth", "data": {"source": str(src), "classes": ["normal", "abnormal"]},
            "model": {"name": "causal_lm", "source": model, "max_length": 32},
            "trainer": {"backend": "opacus"}, "privacy": {"epsilon": 8.0}, "training": {"epochs": 1, "batch_size": 8},
            "synthesis": {"prompt": "report ({label}):", "records": 4}}
    recipe = tmp / "synth.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return Built(["synth", str(recipe), "--out", str(tmp / "out"), "--quiet"], tmp / "out", counts)


def _model_dir(tmp: Path, config: str | None) -> str:
    d = tmp / "model"
    d.mkdir()
    (d / "README.md").write_text("not a model\n")
    if config is not None:
        (d / "config.json").write_text(config)
    return str(d)


# ---- a finished run: audit, report, predict


def _run_copy(tmp: Path, env: dict) -> Path:
    return Path(shutil.copytree(env["run"], tmp / "run"))


def _audit(mutate: Callable[[Path], None]):
    def build(tmp, env):
        run = _run_copy(tmp, env)
        mutate(run / "private" / "canaries.npz")
        return Built(["audit", str(run)], run)
    return build


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _object_canaries(path: Path) -> None:
    np.savez(path, x=np.array([{"a": 1}] * 20, dtype=object), y=np.zeros(20, np.int64), included=np.ones(20, bool))


def _misshapen_canaries(path: Path) -> None:
    with np.load(path) as z:
        x, y, inc = z["x"], z["y"], z["included"]
    np.savez(path, x=x, y=y, included=inc[:-1])


def _canaries_without_coins(path: Path) -> None:
    with np.load(path) as z:
        x, y = z["x"], z["y"]
    np.savez(path, x=x, y=y)


def _canaries_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _report(mutate: Callable[[Path], None]):
    def build(tmp, env):
        sweep = tmp / "sweep"
        shutil.copytree(env["run"], sweep / "runs" / "p0")
        mutate(sweep)
        return Built(["report", str(sweep)], sweep)
    return build


def _p0(sweep: Path, *parts: str) -> Path:
    return sweep.joinpath("runs", "p0", *parts)


def _record_without_training(sweep: Path) -> None:
    path = _p0(sweep, "private", "record.json")
    rec = json.loads(path.read_text())
    del rec["training"]
    path.write_text(json.dumps(rec))


def _predictions_without_labels(sweep: Path) -> None:
    path = _p0(sweep, "private", "predictions.parquet")
    pd.read_parquet(path).drop(columns=["y_true"]).to_parquet(path)


def _predict(content, name: str = "new.csv"):
    def build(tmp, env):
        data = tmp / name
        if content == "DIR":
            data.mkdir()
        else:
            _write(data, content(env) if callable(content) else content)
        return Built(["predict", str(env["run"]), "--data", str(data), "--out", str(tmp / "scores.csv")],
                     tmp / "scores.csv")
    return build


# ---------------------------------------------------------------- the table

_FEW = ("data.source", "too few privacy units")
CASES: dict[str, Case] = {
    # data that cannot train a classifier (no count quoted: "too few", "fewer than two")
    "table: label with one class": Case(_one_class, ("data.label", "fewer than two classes")),
    "table: positive label on every row": Case(_positive_everywhere, ("data.label", "fewer than two classes")),
    "table: one class, non-private run": Case(_one_class_nonprivate, ("data.label", "fewer than two classes")),
    "table: 3 rows": Case(_three_rows, _FEW),
    "table: 9 rows (too few to train)": Case(_nine_rows, _FEW),
    "table: one class in the test split": Case(_only_in("test"), ("data.test_fraction", "test split",
                                                                  "fewer than two classes")),
    "table: one class in the training split": Case(_only_in("train"), ("data.label", "training split")),
    "table: one class in the validation split": Case(_only_in("validation"), ("data.validation_fraction",
                                                                              "validation split")),
    "table: a declared class never occurs": Case(_declared_class_absent, ("data.label", "training split", "classes ['a', 'b', 'c'] missing")),
    "table: one privacy unit": Case(_one_unit, ("data.privacy_unit", "too few privacy units")),
    "table: label outside data.classes": Case(_label_outside_classes, ("data.classes", "outside the declared")),
    "table: positive_label never occurs": Case(lambda t, e: _train(t, _frame(), {"positive_label": 7}),
                                               ("data.positive_label", "never occurs")),
    "table: unknown label column": Case(lambda t, e: _train(t, _frame(), {"label": "outcome"}),
                                        ("data.label", "'outcome'")),
    "table: label missing everywhere": Case(_label_missing_everywhere, ("data.label", "missing values")),
    "table: feature missing everywhere": Case(_feature_missing_everywhere, ("data.numeric.a", "missing values")),
    # files of the wrong kind: tables
    "table: duplicate column header": Case(_duplicate_header, ("data.source", "t.csv", "duplicate column names",
                                                               "'a'")),
    "table: duplicate label header": Case(_duplicate_label_header, ("data.source", "duplicate column names", "'y'")),
    "table: empty file": Case(lambda t, e: _train(t, b""), ("data.source", "t.csv", "is empty")),
    "table: blank lines only": Case(lambda t, e: _train(t, "\n \n\n"), ("data.source", "t.csv", "is empty")),
    "table: binary file": Case(lambda t, e: _train(t, BINARY), ("data.source", "t.csv", "binary")),
    "table: not UTF-8": Case(_not_utf8, ("data.source", "t.csv", "not UTF-8")),
    "table: header only": Case(_header_only, ("data.source", "t.csv", "no records")),
    "table: a directory named t.csv": Case(_directory_source, ("data.source", "t.csv", "directory")),
    "table: garbage Parquet": Case(_garbage_parquet, ("data.source", "t.parquet", "could not read")),
    # image manifests
    "manifest: '../' escapes the folder": Case(_dotdot, ("data.image.path_column", "'../outside.png'", "m.csv",
                                                         "outside the manifest's folder", "allow_outside")),
    "manifest: absolute path outside": Case(_absolute_outside, ("data.image.path_column", "x.png",
                                                                "outside the manifest's folder")),
    "manifest: symlink pointing outside": Case(_symlink_outside, ("data.image.path_column", "'link.png'",
                                                                  "outside the manifest's folder")),
    "manifest: symlinked folder pointing outside": Case(_symlinked_folder_outside, ("data.image.path_column",
                                                                                    "'sub/y.png'", "outside")),
    "manifest: one class": Case(lambda t, e: _manifest(t, labels=[1] * 12, counts=(12, 9, 3)),
                                ("data.label", "fewer than two classes")),
    "manifest: too few images": Case(lambda t, e: _manifest(t, n=6, counts=(6, 4)), _FEW),
    "manifest: duplicate header": Case(lambda t, e: _manifest(t, header="path,label,label"),
                                       ("data.source", "m.csv", "duplicate column names")),
    "manifest: empty file": Case(lambda t, e: _manifest(t, raw=b""), ("data.source", "m.csv", "is empty")),
    "medmnist: one class in the training split": Case(lambda t, e: _npz(t, np.zeros(12, np.uint8)),
                                                      ("data.label", "training split", "fewer than two classes")),
    "medmnist: object arrays": Case(lambda t, e: _npz(t, np.zeros(12, np.uint8),
                                                      val_images=np.array([{"x": 1}] * 4, dtype=object)),
                                    ("data.source", "pneumoniamnist.npz", "could not read")),
    # text for `dptrain synth` and its model source
    "synth: empty CSV": Case(lambda t, e: _synth(t, b""), ("data.source", "r.csv", "is empty")),
    "synth: binary CSV": Case(lambda t, e: _synth(t, BINARY), ("data.source", "r.csv", "binary")),
    "synth: JSON Lines not UTF-8": Case(lambda t, e: _synth(t, '{"text": "caf\xe9", "label": "normal"}\n'
                                                            .encode("latin-1"), name="r.jsonl"),
                                        ("data.source", "r.jsonl", "not UTF-8")),
    "synth: JSON Lines of lists": Case(lambda t, e: _synth(t, "[1, 2]\n[3, 4]\n", name="r.jsonl"),
                                       ("data.source", "r.jsonl", "not an object")),
    "synth: duplicate header": Case(lambda t, e: _synth(t, "text,label,label\na,normal,normal\n"),
                                    ("data.source", "duplicate column names")),
    "synth: one class": Case(lambda t, e: _synth(t, _texts(one_class=True), counts=(40, 30, 10)),
                             ("data.label", "fewer than two classes")),
    "synth: too few records": Case(lambda t, e: _synth(t, _texts(7), counts=(7, 5)), _FEW),
    "synth: unknown built-in model": Case(lambda t, e: _synth(t, _texts(), model="builtin:nope"),
                                          ("model.source", "'builtin:nope'")),
    "synth: model path that does not exist": Case(lambda t, e: _synth(t, _texts(), model=str(t / "no" / "model")),
                                                  ("model.source", "no model directory")),
    "synth: a directory that is not a model": Case(lambda t, e: _synth(t, _texts(), model=_model_dir(t, None)),
                                                   ("model.source", "without config.json")),
    "synth: a file as the model": Case(lambda t, e: _synth(t, _texts(), model=str(_write(t / "m.gguf", b"GGUF"))),
                                       ("model.source", "m.gguf", "is a file")),
    "synth: a model directory with a garbage config": Case(lambda t, e: _synth(t, _texts(),
                                                                               model=_model_dir(t, "{not json")),
                                                           ("model.source", "could not be loaded")),
    # `dptrain audit RUN`: private/canaries.npz of the wrong kind
    "audit: canaries.npz missing": Case(_audit(lambda p: p.unlink()), ("canaries.npz", "missing"), run=True),
    "audit: canaries.npz truncated": Case(_audit(_truncate), ("canaries.npz", "truncated"), run=True),
    "audit: canaries.npz of object arrays": Case(_audit(_object_canaries), ("canaries.npz", "object arrays"),
                                                 run=True),
    "audit: canaries.npz of wrong shapes": Case(_audit(_misshapen_canaries), ("canaries.npz", "do not describe"),
                                                run=True),
    "audit: canaries.npz without the coins": Case(_audit(_canaries_without_coins), ("canaries.npz", "'included'"),
                                                  run=True),
    "audit: canaries.npz is a directory": Case(_audit(_canaries_directory), ("canaries.npz", "directory"), run=True),
    # `dptrain report DIR`: sweep.json, record.json, predictions.parquet, config.yaml of the wrong kind
    "report: sweep.json garbage": Case(_report(lambda s: _write(s / "sweep.json", "{not json")),
                                       ("sweep.json", "not valid JSON"), run=True),
    "report: sweep.json a list": Case(_report(lambda s: _write(s / "sweep.json", "[1, 2]")),
                                      ("sweep.json", "not an object"), run=True),
    "report: sweep.json points not names": Case(_report(lambda s: _write(s / "sweep.json", '{"points": [1]}')),
                                                ("sweep.json", "'points'"), run=True),
    "report: record.json garbage": Case(_report(lambda s: _write(_p0(s, "private", "record.json"), "{\"form")),
                                        ("record.json", "not valid JSON"), run=True),
    "report: record.json not a record": Case(_report(lambda s: _write(_p0(s, "private", "record.json"), "{}")),
                                             ("record.json", "not a dptrain run record"), run=True),
    "report: record.json without training": Case(_report(_record_without_training),
                                                 ("record.json", "training.backend"), run=True),
    "report: predictions.parquet garbage": Case(_report(lambda s: _write(_p0(s, "private", "predictions.parquet"),
                                                                         b"PAR1garbage")),
                                                ("predictions.parquet", "not a readable Parquet"), run=True),
    "report: predictions.parquet missing": Case(_report(lambda s: _p0(s, "private", "predictions.parquet").unlink()),
                                                ("predictions.parquet", "missing"), run=True),
    "report: predictions without y_true": Case(_report(_predictions_without_labels),
                                               ("predictions.parquet", "'y_true'"), run=True),
    "report: config.yaml garbage": Case(_report(lambda s: _write(_p0(s, "release", "config.yaml"), "a: [b\n")),
                                        ("config.yaml", "not valid YAML"), run=True),
    "report: config.yaml missing": Case(_report(lambda s: _p0(s, "release", "config.yaml").unlink()),
                                        ("config.yaml", "missing"), run=True),
    # `dptrain predict RUN --data X`: a table of the wrong kind
    "predict: empty CSV": Case(_predict(b""), ("--data", "new.csv", "is empty"), run=True),
    "predict: binary CSV": Case(_predict(BINARY), ("--data", "new.csv", "binary"), run=True),
    "predict: not UTF-8": Case(_predict("a,b,grp\n0.1,0.2,caf\xe9\n".encode("latin-1")),
                               ("--data", "new.csv", "not UTF-8"), run=True),
    "predict: duplicate header": Case(_predict("a,a,b,grp\n0.1,0.5,0.2,x\n"), ("--data", "duplicate column names"),
                                      run=True),
    "predict: header only": Case(_predict("a,b,grp\n"), ("--data", "new.csv", "no records"), run=True),
    "predict: a directory": Case(_predict("DIR"), ("new.csv", "directory"), run=True),
}


# ---------------------------------------------------------------- the module's one finished run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """One tiny finished DP run with canaries (audit, report and predict cases copy it); about 10 s."""
    from dptrain.config import parse_recipe
    from dptrain.run import train

    tmp = tmp_path_factory.mktemp("finished")
    src = _write(tmp / "data.csv", _frame(60))
    tree = {"name": "tiny", "data": {"source": str(src), **TABLE, "validation_fraction": 0.2},
            "privacy": {**DP, "audit": {"canaries": 20}}, **TRAIN}
    train(parse_recipe(tree), tmp / "run", progress=False)
    return {"run": tmp / "run", "data": src}


def _snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": (path.stat().st_size, path.stat().st_mtime_ns)}
    return {str(p.relative_to(path)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def _quotes_a_count(msg: str, counts: tuple[int, ...], tmp: Path) -> list[int]:
    text = msg
    for p in sorted({str(tmp), str(tmp.resolve())}, key=len, reverse=True):
        text = text.replace(p, "")
    return [n for n in counts if re.search(rf"(?<![\w.]){n}(?![\w.])", text)]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clean_line(name, tmp_path, capsys, request, monkeypatch):
    case = CASES[name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a model source is never fetched from the network here
    env = request.getfixturevalue("finished") if case.run else {}
    built = case.build(tmp_path, env)
    before = _snapshot(built.watch)
    capsys.readouterr()
    rc = main(built.argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dptrain: error: "), err
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert _snapshot(built.watch) == before, f"{built.watch} changed"
    assert not _quotes_a_count(lines[0], built.counts, tmp_path), lines[0]


def test_the_table_covers_every_class_of_bad_input():
    kinds = {name.split(":")[0] for name in CASES}
    assert kinds >= {"table", "manifest", "medmnist", "synth", "audit", "report", "predict"}
    assert len(CASES) >= 30


# ---------------------------------------------------------------- controls: one defect each


def test_controls_are_valid(tmp_path, finished, monkeypatch):
    """A valid table, manifest and text file pass the checks that refuse their broken variants; the finished run's
    canaries, record and predictions read; predict scores a valid file."""
    from dptrain.audit.canaries import load_canaries
    from dptrain.config import load_recipe
    from dptrain.data import load_data
    from dptrain.report.analysis import load_runs
    from dptrain.synth.pipeline import _load

    table = _train(tmp_path / "t", _frame())
    assert load_data(load_recipe(table.argv[1]).data).num_units >= 8
    manifest = _manifest(tmp_path / "m", extra=[("sub/ok.png", 1)])
    _png(tmp_path / "m" / "imgs" / "sub" / "ok.png")
    assert load_data(load_recipe(manifest.argv[1]).data).x_train.ndim == 4  # a subfolder is inside
    outside = _dotdot(tmp_path / "o", {})
    recipe = load_recipe(outside.argv[1], ["data.image.allow_outside=true"])
    assert load_data(recipe.data).num_units >= 8  # the opt-out reads '../outside.png'
    synth = _synth(tmp_path / "s", _texts())
    assert len(_load(load_recipe(synth.argv[1])).texts_train) == 30
    assert len(load_canaries(finished["run"] / "private" / "canaries.npz", count=20)) == 20
    sweep = tmp_path / "sweep"
    shutil.copytree(finished["run"], sweep / "runs" / "p0")
    _, runs, _ = load_runs(sweep)
    assert len(runs) == 1 and set(runs[0].preds) >= {"y_true", "score"}
    new = _write(tmp_path / "new.csv", _frame(5).drop(columns="y"))
    assert main(["predict", str(finished["run"]), "--data", str(new), "--out", str(tmp_path / "s.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "s.csv")) == 5
