"""The core of dptrain.data: the dataset value, errors that quote no private fact, and the split by privacy unit.

Every loader (:mod:`~dptrain.data.tabular`, :mod:`~dptrain.data.images`, :mod:`~dptrain.data.medmnist`,
:mod:`~dptrain.data.image_builtins`, :mod:`~dptrain.data.text`) builds on this module; it imports none of them.
:func:`~dptrain.data.load.load_data` picks the loader of a source.

Formal guarantees (towards invariant 4 of DESIGN.md)
----------------------------------------------------
* The train / validation / test split depends only on the split seed, the declared fractions and the set
  of privacy-unit identifiers; every row of a unit lands on one side. With ``validation_fraction`` 0 there
  is no validation side and the train / test split is exactly the two-way split of earlier versions; a
  validation share is carved out of what would otherwise be train, the test side never changes.
* The split seed is ``data.split_seed``, apart from the training seed (``recipe.seed``): every run of a
  sweep shares one train / validation / test split, so one run's test records are never another run's
  training records.

* One reader for every table file (:func:`read_table`: tables, image manifests, text CSVs, records to score)
  refuses an empty, binary or non-UTF-8 file, a header without records and duplicate column names (found in
  the raw header: pandas would rename a second ``x`` to ``x.1``) with one line naming the file.
* Data that cannot train a classifier is refused before anything is trained or written, by a public rule
  (:func:`check_trainable`, applied by :func:`~dptrain.data.load.load_data` and by ``dptrain synth``): at least
  :data:`MIN_TRAIN_UNITS` privacy units in the training split and every class in the training, validation and
  test splits. The message says "too few" / "fewer than two classes", never a count or which class is absent.

Sharp edges
-----------
* Error messages (:class:`DataError`, built with ``_error``) never quote private facts of the data: no counts
  (of rows, values, missing values, units or classes), no row numbers, no numeric values of records, and no
  reader messages (``_reader_failure``: they may quote them). They may name category and label *values* that
  break a declaration (``_words``, ``_few``), because the fix is to declare those values publicly; and column
  names, paths and recipe values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from dptrain.config import DataConfig

FROM_RECIPE = "declared in recipe"


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
    """One spelling per value, so that 1, 1.0, np.int64(1) and '1' all match a declared 1. Booleans are spelled
    ``True`` / ``False``: a boolean (a file's true / True / TRUE as pandas reads it, a YAML ``true``) and the
    strings 'true' / 'false' in any case all match; 1 / 0 and yes / no are values of their own."""
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.capitalize()
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


# --------------------------------------------------------------------------------------------------
# Reading a table file (tables, image manifests, text records, records to score)
# --------------------------------------------------------------------------------------------------

_SNIFF_BYTES = 1 << 16


def read_text_file(path: Path, field_name: str, what: str) -> str:
    """The UTF-8 text of ``path`` (a file the caller checked exists); one :class:`DataError` naming the file for
    an empty, binary or non-UTF-8 file. Never quotes the file's content or a position in it."""
    shown = repr(str(path))
    raw = path.read_bytes()
    if not raw.strip():
        raise _error(field_name, f"{shown} is empty", f"give a {what} with a header row and records")
    if b"\x00" in raw[:_SNIFF_BYTES]:
        raise _error(field_name, f"{shown} holds binary data, not {what} text", f"give a UTF-8 text {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _error(field_name, f"{shown} is not UTF-8 text", f"save the {what} as UTF-8") from None


def read_table(path: str | Path, field_name: str = "data.source", what: str = "CSV / Parquet table") -> pd.DataFrame:
    """The CSV / Parquet file at ``path`` (the caller checked the suffix and that it is a file) as a frame.

    One :class:`DataError` naming ``field_name`` and the file for: an empty file, a binary or non-UTF-8 CSV, a
    file the reader refuses (its message is not shown: it may quote the data), a header without records, and
    duplicate column names (pandas silently renames a second ``x`` to ``x.1``, so they are found in the raw
    header). Messages quote no count, row number or value of the data."""
    path = Path(path).expanduser()
    shown = repr(str(path))
    csv = path.suffix.lower() != ".parquet"
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
        if not head.strip():
            raise _error(field_name, f"{shown} is empty", f"give a {what} with a header row and records")
        if csv and b"\x00" in head:
            raise _error(field_name, f"{shown} holds binary data, not CSV text", "give a UTF-8 text CSV file")
        if csv:
            header = [str(c) for c in pd.read_csv(path, header=None, nrows=1, dtype=str,
                                                   keep_default_na=False).iloc[0].tolist()]
            frame = pd.read_csv(path)
        else:
            frame = pd.read_parquet(path)
            header = [str(c) for c in frame.columns]
    except DataError:
        raise
    except UnicodeDecodeError:
        raise _error(field_name, f"{shown} is not UTF-8 text", "save the CSV file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise _error(field_name, f"{shown} is empty", f"give a {what} with a header row and records") from None
    except Exception as exc:  # any reader failure becomes one clear line
        raise _error(field_name, f"could not read {shown} ({_reader_failure(exc)})",
                     f"check that the file is a valid {what}") from None
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise _error(field_name, f"{shown} has duplicate column names {_few(dup)}",
                     "give every column a unique name in the header row")
    if len(frame) == 0:
        raise _error(field_name, f"{shown} has a header but no records", "give a file with at least one record")
    return frame


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


def _assemble(cfg: DataConfig, x: np.ndarray, y: np.ndarray, classes: list[str], unit_keys: np.ndarray,
              sensitive: pd.DataFrame, preprocessing: dict, *, seed: int) -> TabularData:
    """Split by privacy unit (the tables' rule) and wrap everything in a TabularData."""
    test, val = _split3(unit_keys, cfg.test_fraction, cfg.validation_fraction, seed)
    train = ~(test | val)
    units_train = _train_units(unit_keys, train)
    preprocessing.update({
        "privacy_unit": cfg.privacy_unit or "example",
        "split": split_info(cfg, seed),
        "statistics_of_data_used": "none",
    })
    return TabularData(
        x_train=x[train], y_train=y[train], units_train=units_train,
        num_units=int(units_train.max(initial=-1) + 1), x_test=x[test], y_test=y[test],
        sensitive_train=sensitive.loc[train].reset_index(drop=True),
        sensitive_test=sensitive.loc[test].reset_index(drop=True),
        feature_names=[], classes=classes, privacy_unit=cfg.privacy_unit or "example",
        source=cfg.source, preprocessing=preprocessing,
        x_val=x[val], y_val=y[val], sensitive_val=sensitive.loc[val].reset_index(drop=True),
    )


# --------------------------------------------------------------------------------------------------
# Can it train a classifier? (a public rule, checked before anything is trained or written)
# --------------------------------------------------------------------------------------------------

MIN_TRAIN_UNITS = 8
TRAINABLE_RULE = (f"at least {MIN_TRAIN_UNITS} privacy units in the training split, and every class in the training, "
                  "validation and test splits")


def check_trainable(*, y_train: np.ndarray, y_test: np.ndarray, y_val: np.ndarray, num_units: int,
                    classes: Sequence[str], source: str) -> None:
    """Refuse data that cannot train and test a classifier, by the public rule :data:`TRAINABLE_RULE`: a label with
    fewer than two classes, too few training units, a class missing from the training split, or a test (or a
    non-empty validation) split without every class (its AUROC would be undefined). Raises :class:`DataError`;
    the message says "too few" and "fewer than two", never a count or which class is absent."""
    k = len(classes)
    y_all = np.concatenate([np.asarray(y, np.int64).ravel() for y in (y_train, y_val, y_test)])
    if len(np.unique(y_all)) < 2:
        raise _error("data.label", f"the label of {source!r} takes fewer than two classes in the data, so no "
                     "classifier can be trained or tested", "check data.label, data.positive_label and "
                     "data.classes against the file (a classifier needs records of at least two classes)")
    if num_units < MIN_TRAIN_UNITS:
        raise _error("data.source", f"{source!r} has too few privacy units for training (the rule: {TRAINABLE_RULE})",
                     "use more data, or a smaller data.test_fraction / data.validation_fraction")
    what = "fewer than two classes" if k == 2 else f"some of the classes {list(classes)} missing"
    for name, y, field_name, fix in (
            ("training", y_train, "data.label", "use more data, declare only classes the data holds (data.classes), "
                                                "or another data.split_seed"),
            ("test", y_test, "data.test_fraction", "use more data or a larger data.test_fraction"),
            ("validation", y_val, "data.validation_fraction", "use more data or a larger data.validation_fraction")):
        if name == "validation" and len(y) == 0:
            continue
        if len(np.unique(np.asarray(y, np.int64))) < k:
            raise _error(field_name, f"the {name} split of {source!r} has {what} (the rule: {TRAINABLE_RULE})", fix)


def check_split_trainable(cfg: DataConfig, y: np.ndarray, unit_keys: np.ndarray, classes: Sequence[str], *,
                          seed: int) -> None:
    """:func:`check_trainable` on the split of ``unit_keys`` that :func:`_assemble` will make, before the costly
    part of loading (e.g. reading the pixels of every image)."""
    test, val = _split3(unit_keys, cfg.test_fraction, cfg.validation_fraction, seed)
    train = ~(test | val)
    check_trainable(y_train=y[train], y_test=y[test], y_val=y[val], num_units=len(np.unique(unit_keys[train])),
                    classes=classes, source=cfg.source)
