"""Labelled text records: CSV / JSONL files and the built-in IU chest X-ray reports.

``load_text(source, *, text_column="text", label_column="label", positive_label=None, classes=None,
test_fraction=0.2, validation_fraction=0.0, split_seed=0)`` returns a :class:`TextData` split by record
(each report is one privacy unit) into train / validation / test with the same seeded split rule as tables
and images. ``load_text_from_config(cfg)`` does the same from a :class:`~dptrain.config.DataConfig`.

The split seed is apart from the training seed: callers pass ``cfg.split_seed`` (``seed=`` is the older name
of the same argument), so that every run of a sweep shares one split.

Labels are binary: ``classes[1]`` is the positive class. Class names are public declarations, never read
from the data: ``classes`` (``data.classes``; required for files) lists the label values, and labels outside
it are refused. With two declared classes and no ``positive_label`` the second is positive; with
``positive_label`` it is positive and the other declared classes are its negative (named ``not POS`` when
more than one). The built-in has fixed public classes ``["normal", "abnormal"]`` (positive: ``abnormal``).

``builtin:iu-xray-reports``: the 3955 de-identified Indiana University chest X-ray reports shipped in
``torchxrayvision`` (``data/NLMCXR_reports.tgz``; install it with ``pip install --no-deps torchxrayvision``,
its declared dependencies are not needed and would replace torch). Text = FINDINGS + IMPRESSION; label
``normal`` iff the report's MeSH major terms are exactly ``["normal"]``, else ``abnormal``. Reports with
no text or indexed "No Indexing" are dropped (counts of dropped records are not recorded: only the rule).
The de-identification token ``XXXX`` is kept as is.
"""

from __future__ import annotations

import json
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dptrain.data.core import (
    FROM_RECIPE,
    DataError,
    _canon,
    _error,
    _few,
    _reader_failure,
    _split3,
    check_trainable,
    read_table,
    read_text_file,
)
from dptrain.data.labels import declared_classes
from dptrain.data.registry import IU_XRAY, IU_XRAY_CLASSES

if TYPE_CHECKING:
    from dptrain.config import DataConfig


@dataclass(frozen=True)
class TextData:
    """Split text records; ``texts_val`` / ``y_val`` (the validation split) are empty when there is none."""

    texts_train: list[str]
    y_train: np.ndarray
    texts_test: list[str]
    y_test: np.ndarray
    classes: list[str]
    source: str
    preprocessing: dict
    texts_val: list[str] = field(default_factory=list)
    y_val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self):
        if (len(self.texts_train) != len(self.y_train) or len(self.texts_test) != len(self.y_test)
                or len(self.texts_val) != len(self.y_val)):
            raise ValueError("TextData: texts and labels must be aligned")

    @property
    def num_units(self) -> int:  # one record = one privacy unit
        return len(self.texts_train)


def _iu_xray_path() -> Path:
    from importlib.util import find_spec

    spec = find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise _error("data.source", "builtin:iu-xray-reports needs the torchxrayvision package (its data file only)",
                     "pip install --no-deps torchxrayvision")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "NLMCXR_reports.tgz"
    if not path.exists():
        raise _error("data.source", f"{path} is missing from the torchxrayvision package",
                     "reinstall it: pip install --no-deps --force-reinstall torchxrayvision")
    return path


def read_iu_xray_reports(path: str | Path | None = None) -> pd.DataFrame:
    """Columns ``id, text, label`` (label ``normal`` / ``abnormal``), one row per usable report."""
    rows = []
    with tarfile.open(path or _iu_xray_path()) as tar:
        for member in tar.getmembers():
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            sections = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
            text = " ".join(s for s in (sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")) if s)
            majors = [(m.text or "").strip().lower() for m in root.iter("major")]
            if not text or majors == ["no indexing"] or not majors:
                continue
            rid = root.find("IUXRId")
            rows.append((rid.get("id") if rid is not None else member.name, text,
                         "normal" if majors == ["normal"] else "abnormal"))
    return pd.DataFrame(rows, columns=["id", "text", "label"]).sort_values("id", key=lambda s: s.astype(str))


_JSONL_FIX = "one JSON object per line, e.g. {\"text\": \"...\", \"label\": \"normal\"}"


def _read_jsonl(path: Path, source: str) -> pd.DataFrame:
    rows = []
    for line in read_text_file(path, "data.source", "JSON Lines file").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise _error("data.source", f"{source} is not valid JSON Lines ({_reader_failure(err)})",
                         _JSONL_FIX) from None
        if not isinstance(row, dict):
            raise _error("data.source", f"{source} is not JSON Lines of records (a line holds a JSON "
                         f"{type(row).__name__}, not an object)", _JSONL_FIX)
        rows.append(row)
    return pd.DataFrame(rows)


def _read_records(source: str, text_column: str, label_column: str) -> pd.DataFrame:
    path = Path(source)
    if path.is_dir():
        raise _error("data.source", f"{source} is a directory, not a file",
                     "give a .csv or .jsonl file with text and label columns")
    if not path.exists():
        raise _error("data.source", f"no file at {source}", "give a .csv or .jsonl file with text and label columns")
    if path.suffix == ".csv":
        frame = read_table(path, "data.source", "CSV file")
    elif path.suffix in (".jsonl", ".json"):
        frame = _read_jsonl(path, source)
    else:
        raise _error("data.source", f"{source!r} has suffix {path.suffix!r}", "use a .csv or .jsonl file")
    for col, field_name in ((text_column, "data.text_column"), (label_column, "data.label")):
        if col not in frame.columns:
            raise _error(field_name, f"column {col!r} is not in {source} (columns: {list(frame.columns)[:8]})",
                         "name the column that holds it")
    frame = frame.rename(columns={text_column: "text", label_column: "label"})
    frame = frame[frame["text"].notna() & (frame["text"].astype(str).str.strip() != "")]
    if frame["label"].isna().any():
        raise _error("data.label", f"column {label_column!r} has missing values",
                     "label every record, or drop the unlabelled ones")
    return frame[["text", "label"]].reset_index(drop=True)


def _text_classes(source: str, builtin: bool, positive_label: str | int | None,
                  classes: list[str | int] | None) -> tuple[list[str], str, str]:
    """(the declared label values in label order, the positive one, where they come from); no data is read."""
    if classes is not None:
        names, origin = declared_classes(classes), FROM_RECIPE + " (data.classes)"
    elif builtin:
        names, origin = list(IU_XRAY_CLASSES), f"built-in {IU_XRAY} (its public labelling rule)"
        positive_label = IU_XRAY_CLASSES[1] if positive_label is None else positive_label
    else:
        raise _error("data.classes", f"the classes of {source!r} are not declared; class names are never read "
                     "from the data (which labels occur is private)",
                     "declare the label values in label order, e.g. data.classes: [normal, abnormal] (the "
                     "second is positive; or name the positive one in data.positive_label)")
    if positive_label is None:
        if len(names) != 2:
            raise _error("data.classes", f"text labels are binary, and {names} are not two classes",
                         "declare two classes, or name the positive one in data.positive_label (the others "
                         "are then its negative)")
        return names, names[1], origin
    pos = _canon(positive_label)
    if pos not in names:
        raise _error("data.positive_label", f"{positive_label!r} is not one of the classes {names}",
                     "set data.positive_label to one of them")
    return names, pos, origin


def load_text(source: str, *, text_column: str = "text", label_column: str = "label",
              positive_label: str | int | None = None, classes: list[str | int] | None = None,
              test_fraction: float = 0.2, validation_fraction: float = 0.0, split_seed: int | None = None,
              seed: int | None = None) -> TextData:
    """Read, label and split text records (each record is one privacy unit).

    ``classes`` are the declared label values (``data.classes``), required for files; labels outside them
    are refused. ``split_seed`` (default 0, the default of ``data.split_seed``) seeds the split; callers
    pass ``cfg.split_seed``, never the training seed. ``seed`` is the older name of the same argument.
    Raises :class:`DataError` (one line: field, value, fix).
    """
    if split_seed is not None and seed is not None and split_seed != seed:
        raise TypeError("load_text: give split_seed or seed (the same argument), not both")
    seed = split_seed if split_seed is not None else (seed if seed is not None else 0)
    builtin = source == f"builtin:{IU_XRAY}"
    if source.startswith("builtin:") and not builtin:
        raise _error("data.source", f"unknown built-in text dataset {source!r}", f"use builtin:{IU_XRAY}")
    frame = read_iu_xray_reports() if builtin else _read_records(source, text_column, label_column)
    names, pos, origin = _text_classes(source, builtin, positive_label, classes)  # declarations only
    keys = frame["label"].map(_canon)
    unknown = sorted(set(keys) - set(names))
    if unknown:
        raise _error("data.classes", f"labels {_few(unknown)} of {source!r} are outside the declared classes "
                     f"{names}", "add them to data.classes, or fix the labels in the file")
    negative = [n for n in names if n != pos]
    class_names = negative + [pos] if len(negative) == 1 else [f"not {pos}", pos]
    y = (keys == pos).to_numpy(np.int64)
    texts = frame["text"].astype(str).tolist()
    test, val = _split3(np.arange(len(texts)).astype(str), test_fraction, validation_fraction, seed)
    train = ~(test | val)
    pick = lambda mask: [t for t, m in zip(texts, mask, strict=True) if m]  # noqa: E731
    return TextData(pick(train), y[train], pick(test), y[test], class_names, source, {
        "source": source,
        "label": {"positive": pos, "classes": class_names, "declared_classes": names, "from": origin,
                  "encoding": f"1 if label == {pos!r} else 0"},
        "rule": "IU X-ray: FINDINGS + IMPRESSION; normal iff MeSH major terms == ['normal']; reports without "
                "text or 'No Indexing' dropped" if builtin else "records with empty text dropped",
        "privacy_unit": "example (one report)",
        "split": {"method": "random by record", "seed": seed,
                  "seed_note": "the split seed (data.split_seed), apart from the training seed",
                  "test_fraction": test_fraction, "validation_fraction": validation_fraction},
        "statistics_of_data_used": "none",
    }, texts_val=pick(val), y_val=y[val])


def load_text_from_config(cfg: DataConfig, *, seed: int | None = None) -> TextData:
    """:func:`load_text` with every argument from ``cfg``: text column ``cfg.text`` (default ``text``), label
    ``cfg.label`` (default ``label``), ``positive_label``, ``classes``, the fractions and ``cfg.split_seed``
    (``seed`` overrides it explicitly)."""
    return load_text(cfg.source, text_column=cfg.text or "text", label_column=cfg.label or "label",
                     positive_label=cfg.positive_label, classes=cfg.classes, test_fraction=cfg.test_fraction,
                     validation_fraction=cfg.validation_fraction,
                     split_seed=cfg.split_seed if seed is None else seed)


def check_text_trainable(data: TextData) -> None:
    """Refuse text records that cannot train and test a classifier (the rule of
    :func:`~dptrain.data.core.check_trainable`: one record is one privacy unit); quotes no count."""
    check_trainable(y_train=data.y_train, y_test=data.y_test, y_val=data.y_val, num_units=data.num_units,
                    classes=data.classes, source=data.source)


__all__ = ["IU_XRAY", "IU_XRAY_CLASSES", "DataError", "TextData", "check_text_trainable", "load_text",
           "load_text_from_config", "read_iu_xray_reports"]
