"""Labels, class names and sensitive attributes, from declarations only (shared by tables, images and text).

Class names and their number are public declarations, never read from the labels: a built-in's schema,
``data.positive_label`` (binary: ``LABEL!=POS`` / ``LABEL=POS``), a label coded 0 / 1 (``LABEL=0`` /
``LABEL=1``), or ``data.classes`` (the label values, in label order; labels outside it are refused). More than two
declared classes make a multi-class label (class index = position in ``data.classes``); ``positive_label`` with
them is refused (it is for binary labels).
Sensitive attributes are columns as written, or :class:`Derived` record by record from one column (fixed,
data-independent codings and bins), never from statistics of the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from dptrain.data.core import FROM_RECIPE, _canon, _error, _few

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
# Labels and classes (declared facts only)
# --------------------------------------------------------------------------------------------------


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


def _positives(label: str, positive: Any) -> tuple[list[str], str, str, str]:
    """A positive label or a list of them: (canonical values, negative class name, positive class name, rule)."""
    pk = [_canon(v) for v in (positive if isinstance(positive, list) else [positive])]
    if len(pk) == 1:
        return pk, f"{label}!={pk[0]}", f"{label}={pk[0]}", f"1 if {label} == {pk[0]!r} else 0"
    shown = "[" + ", ".join(pk) + "]"
    return pk, f"{label} not in {shown}", f"{label} in {shown}", f"1 if {label} is one of {pk} else 0"


def _encode_threshold(col: pd.Series, label: str, threshold: float) -> tuple[np.ndarray, list[str], dict]:
    """``data.label_threshold``: a numeric label above the declared threshold is positive."""
    values = pd.to_numeric(col.map(lambda v: {"True": 1, "False": 0}.get(_canon(v), v)), errors="coerce")
    if values.isna().any():
        words = sorted(v for v in set(col[values.isna()].map(_canon)) if not any(ch.isdigit() for ch in v))
        raise _error("data.label_threshold", f"column {label!r} has non-numeric labels"
                     + (f" like {_few(words)}" if words else ""),
                     "use data.positive_label (a value or a list of values) for a non-numeric label")
    t = f"{threshold:g}"
    y = (values.to_numpy(dtype=np.float64) > threshold).astype(np.int64)
    classes = [f"{label}<={t}", f"{label}>{t}"]
    return y, classes, {"column": label, "label_threshold": threshold, "encoding": f"1 if {label} > {t} else 0",
                        "classes": classes}


def _encode_declared(keys: pd.Series, label: str, positive: Any, declared: Sequence[int | str],
                     origin: str = FROM_RECIPE) -> tuple[np.ndarray, list[str], dict]:
    """Labels (canonical spellings) against declared classes: unknown labels refused, no class read from data."""
    names = declared_classes(declared)
    if positive is not None and len(names) > 2:
        raise _error("data.positive_label", f"{positive!r} is given with {len(names)} declared classes {names} "
                     "(positive_label makes a binary label; data.classes with more than two classes a multi-class "
                     "one)", "remove data.positive_label to train a multi-class classifier on data.classes, or "
                     "remove data.classes to train positive_label against the rest")
    unknown = sorted(set(keys) - set(names))
    if unknown:
        raise _error("data.classes", f"column {label!r} has labels {_few(unknown)} outside the declared classes "
                     f"{names}", "add them to data.classes, or fix the labels in the file")
    if positive is None:
        index = {n: i for i, n in enumerate(names)}
        y = keys.map(index).to_numpy(dtype=np.int64)
        return y, names, {"column": label, "encoding": "index of the label in the declared classes",
                          "classes": names, "from": origin}
    pk, negative, positive_name, rule = _positives(label, positive)
    outside = [p for p in pk if p not in names]
    if outside:
        shown = f"{outside[0]!r} is" if len(outside) == 1 else f"{_few(outside)} are"
        raise _error("data.positive_label", f"{shown} not one of the declared classes {names}",
                     "set data.positive_label to one of data.classes (or a list of them)")
    y = keys.isin(pk).to_numpy().astype(np.int64)
    classes = binary_classes(names, pk[0], negative) if len(pk) == 1 else [negative, positive_name]
    return y, classes, {"column": label, "positive_label": positive, "declared_classes": names,
                        "encoding": rule, "classes": classes, "from": origin}


def _encode_label(frame: pd.DataFrame, label: str, positive: Any,
                  class_names: tuple[str, str] | None,
                  declared: Sequence[int | str] | None = None, *,
                  threshold: float | None = None) -> tuple[np.ndarray, list[str], dict]:
    """y and class names. The names come from declarations only: ``declared`` (data.classes), the positive
    label(s), the threshold, the built-in's ``class_names``, or the fixed ``LABEL=0`` / ``LABEL=1`` of a 0/1
    label (``LABEL=False`` / ``LABEL=True`` of a boolean one)."""
    col = frame[label]
    if threshold is not None:
        return _encode_threshold(col, label, threshold)
    if declared is not None:
        return _encode_declared(col.map(_canon), label, positive, declared)
    if positive is None:
        numeric = pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
        keys = set(col.map(_canon))
        if keys <= {"True", "False"}:
            y = (col.map(_canon) == "True").to_numpy().astype(np.int64)
            classes = list(class_names or (f"{label}=False", f"{label}=True"))
            return y, classes, {"column": label, "encoding": "boolean: 1 if True else 0", "classes": classes}
        if numeric and keys <= {"0", "1"}:
            y = col.to_numpy().astype(np.int64)
            classes = list(class_names or (f"{label}=0", f"{label}=1"))
            return y, classes, {"column": label, "encoding": "numeric 0/1 used as is", "classes": classes}
        kind = "numeric but not 0/1" if numeric else f"not numeric (values like {_few(sorted(keys))})"
        raise _error("data.label", f"column {label!r} is {kind}",
                     "set data.positive_label to the value that counts as positive, or declare the label "
                     "values in label order in data.classes")
    keys = col.map(_canon)
    pk, negative, positive_name, rule = _positives(label, positive)
    y = keys.isin(pk).to_numpy().astype(np.int64)
    if not y.any():
        numeric = pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
        like = "" if numeric else f" (values like {_few(sorted(set(keys)))})"  # numeric values are never quoted
        raise _error("data.positive_label", f"{positive!r} never occurs in column {label!r}{like}",
                     "set data.positive_label to one of its values")
    classes = list(class_names or (negative, positive_name))
    return y, classes, {"column": label, "positive_label": positive, "encoding": rule, "classes": classes}


def _sensitive_frame(frame: pd.DataFrame, sensitive: Sequence[str],
                     derived: Mapping[str, Derived]) -> tuple[pd.DataFrame, dict[str, str]]:
    """One readable column per sensitive attribute (``data.sensitive``), row-aligned with ``frame``: a column
    as written, a coded column shown as ``NAME=VALUE``, or a :class:`Derived` attribute."""
    out, described = {}, {}
    for name in sensitive:
        if name in derived:
            d = derived[name]
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
