"""Tabular datasets: read a file or a built-in, encode it without looking at private statistics, split by unit.

``load_tabular(cfg)`` turns a :class:`~dptrain.config.DataConfig` into a :class:`TabularData`, split with
``cfg.split_seed`` (``load_tabular(cfg, seed=S)`` overrides it, e.g. in tests). The split seed is apart from
the training seed (``recipe.seed``): every run of a sweep shares one train / validation / test split, so one
run's test records are never another run's training records.

Formal guarantees (what this module promises towards invariant 4 of DESIGN.md)
------------------------------------------------------------------------------
* The encoding of a record depends only on that record and on *declared* public facts: numeric bounds
  and category lists from the recipe, or from a built-in schema written from public domain knowledge.
  No mean, scale, min/max, quantile, vocabulary or class count of the data is computed to encode it.
  Changing (or removing) one record never changes how any other record is encoded -- except through the
  bounds of features declared ``dp`` (``data.numeric: {COL: dp}``): a DP release computed from the training
  records only (:mod:`dptrain.data.dp_bounds`), whose event the run composes into its ledger.
* The train / validation / test split depends only on the split seed, the declared fractions and the set
  of privacy-unit identifiers; every row of a unit lands on one side. With ``validation_fraction`` 0 there
  is no validation side and the train / test split is exactly the two-way split of earlier versions; a
  validation share is carved out of what would otherwise be train, the test side never changes.
* Class names and their number are public declarations, never read from the labels: a built-in's schema,
  ``data.positive_label`` (binary: ``LABEL!=POS`` / ``LABEL=POS``), a label coded 0 / 1 (``LABEL=0`` /
  ``LABEL=1``), or ``data.classes`` (the label values, in label order; labels outside it are refused).
* Row filters of built-ins (e.g. dropping records with a missing value) are per-record rules, applied
  the same way to every record; ``preprocessing`` records the rule, never a count.

Sharp edges
-----------
* Values outside declared bounds are clipped silently: that is the point of declared bounds, but bounds
  that are far too wide waste resolution, and bounds that are too narrow flatten real signal.
* Error messages never quote private facts of the data: no counts (of rows, values, missing values, units
  or classes), no row numbers, no numeric values of records, and no reader messages (which may quote them).
  They may name category and label *values* that break a declaration (e.g. a category outside the declared
  list), because the fix is to declare those values publicly; and column names, paths and recipe values.
  ``preprocessing`` (written next to released models) holds declarations and rules only, never a count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dptrain.data.core import (
    FROM_RECIPE,
    DataError,
    TabularData,
    _canon,
    _error,
    _few,
    _split3,
    _train_units,
    _words,
    read_table,
    split_info,
    split_seed,
)
from dptrain.data.dp_bounds import describe, public_range, release_bounds
from dptrain.data.labels import GENERIC_DERIVED, Derived, _encode_label, _sensitive_frame
from dptrain.data.registry import BUILTIN_DATASETS

if TYPE_CHECKING:
    from dptrain.config import DataConfig

FROM_BUILTIN = "built-in schema (public domain knowledge)"
_SUFFIXES = (".csv", ".parquet")

# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _read_file(source: str) -> pd.DataFrame:
    path = Path(source).expanduser()
    if path.suffix.lower() not in _SUFFIXES:
        raise _error("data.source", f"{source!r} is neither builtin:NAME nor a .csv / .parquet file",
                     f"convert the file to CSV or Parquet, or use one of: "
                     f"{', '.join('builtin:' + n for n in BUILTIN_DATASETS)}")
    if path.is_dir():
        raise _error("data.source", f"{str(path)!r} is a directory, not a table file",
                     "give the path of a .csv / .parquet file")
    if not path.is_file():
        raise _error("data.source", f"no file at {str(path)!r}",
                     "check the path (relative paths are taken from the working directory)")
    return read_table(path, "data.source")


@dataclass
class _Schema:
    """The resolved declaration: what to read, and from where each public fact came."""

    frame: pd.DataFrame
    label: str
    positive_label: int | str | bool | list | None
    class_names: tuple[str, str] | None
    numeric: dict[str, tuple[tuple[float, float], str]]
    categorical: dict[str, tuple[tuple[int | str, ...], str]]
    sensitive: list[str]
    derived: Mapping[str, Derived]
    row_filter: str | None
    notes: list[str]
    dp_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # dp feature -> public search range


def _resolve(cfg: DataConfig, given: pd.DataFrame | None = None) -> _Schema:
    declared_num = {k: (public_range(cfg, k), FROM_RECIPE) for k in cfg.numeric or {}}  # dp: the search range
    declared_cat = {k: (tuple(v), FROM_RECIPE) for k, v in (cfg.categorical or {}).items()}
    both = sorted(set(declared_num) & set(declared_cat))
    if both:
        raise _error(f"data.numeric.{both[0]}", f"column {both[0]!r} is declared both numeric and categorical",
                     "keep it in one of data.numeric / data.categorical")

    if cfg.source.startswith("builtin:"):
        name = cfg.source.removeprefix("builtin:")
        if name not in BUILTIN_DATASETS:
            raise _error("data.source", f"unknown built-in dataset {name!r}",
                         f"use one of: {', '.join('builtin:' + n for n in BUILTIN_DATASETS)}")
        b = BUILTIN_DATASETS[name]
        frame = b.read()
        label = cfg.label or b.label
        same_label = label == b.label
        own = cfg.positive_label is not None or cfg.label_threshold is not None
        positive = cfg.positive_label if own else (b.positive_label if same_label else None)
        numeric = {k: (v, FROM_BUILTIN) for k, v in b.numeric.items() if k not in declared_cat}
        categorical = {k: (v, FROM_BUILTIN) for k, v in b.categorical.items() if k not in declared_num}
        numeric.update(declared_num)
        categorical.update(declared_cat)
        notes = []
        if label in numeric or label in categorical:
            numeric.pop(label, None)
            categorical.pop(label, None)
            notes.append(f"{label!r} is the label, so it was removed from the built-in features")
        row_filter = None
        if b.drop_incomplete_rows:
            row_filter = ("records with a missing value in any used column (label, features, sensitive "
                          "attributes, privacy unit) are dropped before the split; a per-record rule "
                          "that looks at no other record")
        return _Schema(frame, label, positive,
                       b.class_names if same_label and not own else None,
                       numeric, categorical, list(cfg.sensitive if cfg.sensitive is not None else b.sensitive),
                       b.derived, row_filter, notes)

    frame = _read_file(cfg.source) if given is None else given
    if cfg.label is None:
        raise _error("data.label", f"no label column given for {cfg.source!r}",
                     f"set data.label to one of the columns: {_few(list(frame.columns), 12)}")
    if not declared_num and not declared_cat:
        cols = [c for c in frame.columns if c not in (cfg.label, cfg.privacy_unit)]
        example = ", ".join(f"{c}: [LOW, HIGH]" for c in cols[:2])
        raise _error("data.numeric", f"no features declared for {cfg.source!r} (columns: {_few(cols, 12)}); "
                     "features are never inferred from the data, whose ranges and categories are private",
                     f"declare public bounds, e.g. data.numeric: {{{example}}}, and category lists in "
                     "data.categorical")
    for col in (cfg.label, cfg.privacy_unit):
        if col is not None and (col in declared_num or col in declared_cat):
            where = "numeric" if col in declared_num else "categorical"
            what = "label" if col == cfg.label else "privacy unit"
            raise _error(f"data.{where}.{col}", f"the {what} column {col!r} is also declared as a feature",
                         f"remove {col!r} from data.{where}")
    return _Schema(frame, cfg.label, cfg.positive_label, None, declared_num, declared_cat,
                   list(cfg.sensitive or []), GENERIC_DERIVED, None, [])


# --------------------------------------------------------------------------------------------------
# Encoding (per record, declared facts only)
# --------------------------------------------------------------------------------------------------


def _encode_numeric(frame: pd.DataFrame, col: str, bounds: tuple[float, float]) -> np.ndarray:
    lo, hi = bounds
    x = np.clip(_numeric_values(frame, col), lo, hi)
    return 2.0 * (x - lo) / (hi - lo) - 1.0


def _numeric_values(frame: pd.DataFrame, col: str) -> np.ndarray:
    """The column as float64 (NaN where missing); refuses non-numeric values."""
    raw = frame[col]
    if pd.api.types.is_bool_dtype(raw) or pd.api.types.is_object_dtype(raw):
        raw = raw.map(lambda v: {"True": 1.0, "False": 0.0}.get(_canon(v), v))  # True / False: 1 / 0
    values = pd.to_numeric(raw, errors="coerce")
    bad = raw[values.isna() & raw.notna()]  # missing values (NaN) are the missing rules' business
    if len(bad):
        words = _words(set(map(str, bad)))
        raise _error(f"data.numeric.{col}", f"column {col!r} has non-numeric values"
                     + (f" like {_few(words)}" if words else " (not quoted: they hold digits, e.g. a number "
                        "written with a unit or a comma)"),
                     f"declare it in data.categorical.{col} with its categories, or clean the file")
    return values.to_numpy(dtype=np.float64)


def _encode_categorical(frame: pd.DataFrame, col: str, cats: tuple[int | str, ...]) -> np.ndarray:
    names = [_canon(c) for c in cats]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise _error(f"data.categorical.{col}", f"categories {_few(dup)} are listed twice",
                     f"list each category of {col!r} once")
    keys = frame[col].map(_canon).to_numpy(dtype=object)
    unexpected = sorted(set(keys) - set(names))
    if unexpected:
        raise _error(f"data.categorical.{col}", f"column {col!r} has values {_few(unexpected)} outside the "
                     f"declared categories {names}", f"add them to data.categorical.{col}")
    return (keys[:, None] == np.asarray(names, dtype=object)[None, :]).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# Missing values (declared rules only: data.missing)
# --------------------------------------------------------------------------------------------------


def _missing_rules(cfg: DataConfig, schema: _Schema) -> dict[str, dict]:
    """Per feature, the declared rule for a missing value as a JSON-able dict (also written into model.json):
    ``{"rule": "refuse"}``, ``{"rule": "fill", "value": V}``, ``{"rule": "indicator", "value": V, "column": NAME}``
    (numeric) or ``{"rule": "category", "value": NAME, "added": bool}`` (categorical). Declarations only: the same
    rules whatever the data holds, so the encoded columns never depend on which values are missing."""
    rules = dict(cfg.missing or {})
    default = rules.pop("default", None)
    features = list(schema.numeric) + list(schema.categorical)
    unknown = sorted(set(rules) - set(features))
    if unknown:
        raise _error("data.missing", f"{_few(unknown)} are not features of {cfg.source!r}",
                     f"name one of the features {_few(features, 12)}, or 'default' for all")
    out: dict[str, dict] = {}
    for col, ((lo, hi), _) in schema.numeric.items():
        r = rules.get(col, default)
        if r is None or r.rule == "refuse":
            out[col] = {"rule": "refuse"}
            continue
        if r.rule == "category":
            raise _error(f"data.missing.{col}", "category is for categorical features", "use indicator or {fill: NUMBER}")
        value = (lo + hi) / 2 if r.fill is None else r.fill
        lo, hi = schema.dp_ranges.get(col, (lo, hi))  # a dp feature: its declared range (the bounds clip the fill)
        if isinstance(value, str | bool) or not lo <= value <= hi:
            raise _error(f"data.missing.{col}", f"fill {value!r} is not a number within the declared bounds [{lo}, {hi}]",
                         "declare a fill value within the bounds")
        out[col] = {"rule": "fill", "value": float(value)}
        if r.rule == "indicator":
            out[col].update(rule="indicator", column=f"{col}_missing")
    for col, (cats, _) in schema.categorical.items():
        r = rules.get(col, default)
        names = [_canon(c) for c in cats]
        if r is None or r.rule == "refuse":
            out[col] = {"rule": "refuse"}
        elif r.rule == "fill":
            if _canon(r.fill) not in names:
                raise _error(f"data.missing.{col}", f"fill {r.fill!r} is not one of the declared categories {names}",
                             "fill with one of them, or use {category: missing} to add a category")
            out[col] = {"rule": "fill", "value": _canon(r.fill)}
        else:  # category, or indicator: the one-hot column of the missing category is the indicator
            name = "missing" if r.category is None else _canon(r.category)
            out[col] = {"rule": "category", "value": name, "added": name not in names}
    return out


def _missing_info(rule: dict) -> dict:
    """The rule and the rule in words, for the record's preprocessing section (nothing for refuse, the default)."""
    kind, value = rule["rule"], rule.get("value")
    if kind == "refuse":
        return {}
    return {"missing": rule, "missing_rule": "missing values " + {
            "fill": f"replaced by the declared value {value!r}",
            "indicator": f"replaced by the declared value {value!r}; column {rule.get('column')!r} is 1 where missing, "
                         "else 0",
            "category": f"encoded as the category {value!r}" + (" (added to the declared ones)" if rule.get("added")
                                                                else "")}[kind]}


def _apply_missing(col: pd.Series, rule: dict) -> tuple[pd.Series, np.ndarray | None]:
    """The column with missing values replaced by the declared value, and the 0/1 indicator (rule indicator)."""
    na = col.isna()
    indicator = na.to_numpy().astype(np.float64) if rule["rule"] == "indicator" else None
    if rule["rule"] == "refuse" or not na.any():
        return col, indicator
    return col.astype(object).mask(na, rule["value"]), indicator


def _refuse_missing(refused: list[str], used: dict[str, str], rules: dict[str, dict], numeric: Mapping) -> DataError:
    """One line: the features with missing values (never how many) and the YAML that declares a rule for them."""
    fix = ", ".join(f"{c}: {'indicator' if c in numeric else 'category'}" for c in refused)
    also = f" (so do {_few(refused[1:], 8)})" if len(refused) > 1 else ""
    return _error(used[refused[0]], f"column {refused[0]!r} has missing values{also} and data.missing says refuse "
                  "(the default)", f"declare a public rule in the data section, e.g. missing: {{{fix}}} (or "
                  "{fill: VALUE} with a declared value), or drop those rows in the file")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_tabular(cfg: DataConfig, *, seed: int | None = None, frame: pd.DataFrame | None = None) -> TabularData:
    """Read, validate, encode and split the data described by ``cfg`` (``frame``: the table already read, e.g.
    a SQL query's result, instead of reading ``cfg.source``).

    The split uses ``cfg.split_seed`` unless ``seed`` is given explicitly (never pass the training seed:
    every run on a dataset must share one split). Raises :class:`DataError` (one line: field, value, fix)
    for any unusable declaration or file.
    """
    seed = split_seed(cfg, seed)
    schema = _resolve(cfg, frame)
    frame = schema.frame
    schema.dp_ranges = {c: b for c, (b, _) in schema.numeric.items() if (cfg.numeric or {}).get(c) == "dp"}

    # Every column the run will touch, with the recipe field that asked for it.
    used: dict[str, str] = {schema.label: "data.label"}
    for col in schema.numeric:
        used.setdefault(col, f"data.numeric.{col}")
    for col in schema.categorical:
        used.setdefault(col, f"data.categorical.{col}")
    for name in schema.sensitive:
        if name in schema.derived:
            used.setdefault(schema.derived[name].source, "data.sensitive")
        elif name in frame.columns:
            used.setdefault(name, "data.sensitive")
        else:
            derivable = [f"{k} (from {d.source})" for k, d in schema.derived.items()]
            raise _error("data.sensitive", f"{name!r} is not a column of {cfg.source!r}"
                         + (f" nor a derived attribute {derivable}" if derivable else ""),
                         f"use one of the columns {_few(list(frame.columns), 12)} or remove it")
    if cfg.privacy_unit is not None:
        used.setdefault(cfg.privacy_unit, "data.privacy_unit")

    missing = [c for c in used if c not in frame.columns]
    if missing:
        col = missing[0]
        raise _error(used[col], f"column {col!r} is not in {cfg.source!r}",
                     f"use one of the available columns: {', '.join(map(str, frame.columns))}")

    rules = _missing_rules(cfg, schema)
    kept = {schema.label, cfg.privacy_unit} | {schema.derived[n].source if n in schema.derived else n
                                               for n in schema.sensitive}
    strict = [c for c in used if c in kept or rules[c]["rule"] == "refuse"]  # no rule: missing is refused
    if schema.row_filter is not None:
        frame = frame.loc[frame[strict].notna().all(axis=1)]
    nans = frame[strict].isna().any()
    refused = [c for c in strict if nans[c] and c not in kept]
    for col in strict:
        if nans[col] and col in kept:
            raise _error(used[col], f"column {col!r} has missing values",
                         "clean the file or drop those rows (missing labels, privacy units and sensitive attributes "
                         "have no rule)")
    if refused:
        raise _refuse_missing(refused, used, rules, schema.numeric)
    frame = frame.reset_index(drop=True)
    schema.frame = frame

    y, classes, label_info = _encode_label(frame, schema.label, schema.positive_label, schema.class_names,
                                           cfg.classes, threshold=cfg.label_threshold)
    if cfg.privacy_unit is None:
        unit_keys = np.arange(len(frame))
    else:
        unit_keys = frame[cfg.privacy_unit].map(_canon).to_numpy(dtype=str)
    test, val = _split3(unit_keys, cfg.test_fraction, cfg.validation_fraction, seed)
    train = ~(test | val)
    units_train = _train_units(unit_keys, train)
    dp_release = None
    if schema.dp_ranges:  # DP bounds from the training records only (a release: data.dp_bounds), then every split
        dp_release = release_bounds(cfg, {c: _numeric_values(frame, c)[train] for c in schema.dp_ranges}, units_train)
        for col, info in dp_release["columns"].items():
            schema.numeric[col] = (tuple(info["bounds"]), describe(info))
        rules = _missing_rules(cfg, schema)  # a default fill is the midpoint of the released bounds
    blocks, feature_names = [], []
    for col, (bounds, _) in schema.numeric.items():
        filled, indicator = _apply_missing(frame[col], rules[col])
        blocks.append(_encode_numeric(filled.to_frame(col), col, bounds)[:, None])
        feature_names.append(col)
        if indicator is not None:
            blocks.append(indicator[:, None])
            feature_names.append(rules[col]["column"])
    for col, (cats, _) in schema.categorical.items():
        if rules[col].get("added"):
            cats = (*cats, rules[col]["value"])
            schema.categorical[col] = (cats, schema.categorical[col][1])
        filled, _ = _apply_missing(frame[col], rules[col])
        blocks.append(_encode_categorical(filled.to_frame(col), col, cats))
        feature_names.extend(f"{col}={_canon(c)}" for c in cats)
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    sensitive, sensitive_info = _sensitive_frame(frame, schema.sensitive, schema.derived)

    preprocessing = {
        "source": cfg.source,
        "label": label_info,
        "numeric": {col: {"bounds": [float(lo), float(hi)], "from": origin,
                          "transform": "clip to bounds, then 2 * (x - low) / (high - low) - 1", **_missing_info(rules[col])}
                    for col, ((lo, hi), origin) in schema.numeric.items()},
        "categorical": {col: {"categories": [_canon(c) for c in cats], "from": origin, "encoding": "one-hot",
                              **_missing_info(rules[col])}
                        for col, (cats, origin) in schema.categorical.items()},
        "missing_values": "refused unless data.missing declares a rule (then under the feature: missing, missing_rule)",
        "sensitive": sensitive_info,
        "row_filter": schema.row_filter,
        "privacy_unit": cfg.privacy_unit or "example",
        "split": split_info(cfg, seed),
        "statistics_of_data_used": "none" if dp_release is None else (
            f"only the DP bounds of {sorted(dp_release['columns'])} (releases in the run's ledger, see dp_bounds)"),
        "notes": schema.notes,
    }
    if dp_release is not None:
        preprocessing["dp_bounds"] = dp_release
    return TabularData(
        x_train=x[train], y_train=y[train], units_train=units_train, num_units=int(units_train.max(initial=-1) + 1),
        x_test=x[test], y_test=y[test],
        sensitive_train=sensitive.loc[train].reset_index(drop=True),
        sensitive_test=sensitive.loc[test].reset_index(drop=True),
        feature_names=feature_names, classes=classes, privacy_unit=cfg.privacy_unit or "example",
        source=cfg.source, preprocessing=preprocessing,
        x_val=x[val], y_val=y[val], sensitive_val=sensitive.loc[val].reset_index(drop=True),
    )


# DataError and TabularData are re-exported: dptrain.release imports them from here.
__all__ = ["FROM_BUILTIN", "DataError", "TabularData", "load_tabular"]
