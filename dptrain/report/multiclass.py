"""Multi-class sweeps in the report: their predictions, utility and one-vs-rest fairness views.

A run's ``private/predictions.parquet`` holds ``y_true`` and, for two classes, ``score`` = P(classes[1]); for more
than two declared classes (``record.data.classes``) one ``prob_<class>`` column per class. Binary runs pass
through this module unchanged (one view per grouping, the same numbers as before). For a multi-class sweep:

* ``auroc`` is the macro average of the one-vs-rest AUROCs (= ``roc_auc_score(multi_class="ovr",
  average="macro")``), ``accuracy`` is top-1 (argmax; the threshold does not apply), ``auprc`` the macro
  one-vs-rest average precision, ``ece`` the top-label ECE; plus the one-vs-rest AUROC of each class.
* Fairness is per class, one-vs-rest: class k against the rest, score P(k), decision P(k) >= the report's
  threshold. Every grouping appears once per class, named ``GROUPING | class CLASS vs rest``.

Every replicate uses the one (B, n) resampling matrix of the sweep, as for binary runs (paired across runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dptrain.evaluate import fairness as fm

UTILITY = ("auroc", "accuracy", "auprc", "ece")
PROB = "prob_"
TITLES = {"auroc": "macro AUROC (one-vs-rest)", "accuracy": "accuracy (top-1)",
          "auprc": "macro AUPRC (one-vs-rest)", "ece": "top-label ECE"}
_ROW_SUM_ATOL = 1e-4  # float32 softmax outputs, as evaluate.metrics


def is_multiclass(classes: list[str]) -> bool:
    return len(classes) > 2


def run_classes(record: dict[str, Any]) -> list[str]:
    """The run's declared class names (``record.data.classes``), or [] when the record has none."""
    classes = (record.get("data") or {}).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else []


def prob_columns(classes: list[str]) -> list[str]:
    return [f"{PROB}{c}" for c in classes] if is_multiclass(classes) else []


def sensitive_columns(preds: pd.DataFrame, classes: list[str]) -> list[str]:
    skip = {"y_true", "score", *prob_columns(classes)}
    return [c for c in preds.columns if c not in skip]


def check_predictions(preds: pd.DataFrame, classes: list[str]) -> str | None:
    """None when ``preds`` fit ``classes`` (binary: a 0/1 ``y_true`` and a ``score``), else what is wrong (the
    caller names the file)."""
    y = preds.get("y_true")
    if not is_multiclass(classes):
        score = preds.get("score")
        if not (len(preds) and y is not None and score is not None and pd.api.types.is_numeric_dtype(y)
                and y.isin([0, 1]).all() and pd.api.types.is_float_dtype(score) and score.between(0, 1).all()):
            return "expected a 0/1 'y_true' and a 'score' in [0, 1] per test record"
        return None
    cols = prob_columns(classes)
    absent = [c for c in cols if c not in preds]
    if absent or y is None or not len(preds):
        return (f"expected 'y_true' and one probability column per class of the record's data.classes {classes}"
                + (f"; {absent[0]!r} is missing" if absent else ""))
    p = preds[cols]
    if not (pd.api.types.is_integer_dtype(y) and y.between(0, len(classes) - 1).all()):
        return f"expected 'y_true' to be a class index 0..{len(classes) - 1} per test record"
    if not (all(pd.api.types.is_float_dtype(p[c]) for c in cols) and ((p >= 0) & (p <= 1)).all().all()
            and np.allclose(p.to_numpy(np.float64).sum(axis=1), 1.0, rtol=0.0, atol=_ROW_SUM_ATOL)):
        return "expected class probabilities in [0, 1] that sum to 1 per test record"
    return None


def _multiclass(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """UTILITY per row of ``w`` and the one-vs-rest AUROC of each class per row of ``w``."""
    ovr = [fm.weighted_metrics((y == k).astype(np.int64), probs[:, k], w, threshold=0.5)
           for k in range(probs.shape[1])]
    correct = (probs.argmax(axis=1) == y).astype(np.int64)
    top = fm.weighted_metrics(correct, probs.max(axis=1), w, threshold=0.5)  # ece: top-label calibration
    wf = np.asarray(w, np.float64).reshape(-1, len(y))
    aurocs = [m["auroc"] for m in ovr]
    with np.errstate(all="ignore"):
        out = {"auroc": np.mean(np.stack(aurocs), axis=0),  # nan when a class is absent (as evaluate.metrics)
               "accuracy": (wf @ correct) / wf.sum(axis=1),
               "auprc": np.mean(np.stack([m["auprc"] for m in ovr]), axis=0),
               "ece": top["ece"]}
    return out, aurocs


def utility(preds: pd.DataFrame, classes: list[str], w: np.ndarray, threshold: float):
    """(point, replicates) of UTILITY, then (point, replicates) of each class's one-vs-rest AUROC ({} for binary).
    Points use unit weights (the test set as is), replicates the rows of ``w``."""
    y, ones = preds["y_true"].to_numpy(), np.ones((1, len(preds)))
    if not is_multiclass(classes):
        s = preds["score"].to_numpy()
        point = fm.weighted_metrics(y, s, ones, threshold=threshold)
        boot = fm.weighted_metrics(y, s, w, threshold=threshold)
        return {m: float(point[m][0]) for m in UTILITY}, {m: boot[m] for m in UTILITY}, {}, {}
    probs = preds[prob_columns(classes)].to_numpy(np.float64)
    point, per_point = _multiclass(y, probs, ones)
    boot, per_boot = _multiclass(y, probs, w)
    return ({m: float(point[m][0]) for m in UTILITY}, boot, {c: float(v[0]) for c, v in zip(classes, per_point,
            strict=True)}, dict(zip(classes, per_boot, strict=True)))


@dataclass(frozen=True)
class View:
    """One binary problem a fairness section is computed on: the run's own (binary) or class ``cls`` vs rest."""

    name: str
    grouping: fm.Grouping
    y: np.ndarray
    s: np.ndarray
    single: bool  # a single attribute (not the intersection): counts for the worst group
    cls: str | None = None

    def label(self, group: str) -> str:
        return f"{self.grouping.name}={group}" + ("" if self.cls is None else f" (class {self.cls} vs rest)")


def view_name(grouping: str, cls: str) -> str:
    return f"{grouping} | class {cls} vs rest"


def views(preds: pd.DataFrame, classes: list[str], groupings: list[fm.Grouping], n_single: int) -> list[View]:
    """Binary: one view per grouping (named as the grouping). Multi-class: per class (class-major), one
    one-vs-rest view per grouping."""
    y = preds["y_true"].to_numpy()
    if not is_multiclass(classes):
        s = preds["score"].to_numpy()
        return [View(g.name, g, y, s, i < n_single) for i, g in enumerate(groupings)]
    return [View(view_name(g.name, c), g, (y == k).astype(np.int64), preds[f"{PROB}{c}"].to_numpy(np.float64),
                 i < n_single, c) for k, c in enumerate(classes) for i, g in enumerate(groupings)]


def view_rows(names: list[str], classes: list[str]) -> list[list[str]]:
    """The view names as plot rows: [names] for binary, one row per class for multi-class."""
    if not is_multiclass(classes) or not names:
        return [names]
    n = len(names) // len(classes)
    return [names[i * n:(i + 1) * n] for i in range(len(classes))]


def intro_line(classes: list[str], threshold: float) -> str:
    return (f"Multi-class ({len(classes)} declared classes: {', '.join(classes)}): AUROC is the macro average of the "
            "one-vs-rest AUROCs (the validation AUROC of the selection too), accuracy is top-1 (argmax: the "
            "threshold does not apply), AUPRC the macro one-vs-rest average precision, ECE the top-label ECE. "
            "Fairness is reported per class, one-vs-rest: 'GROUPING | class CLASS vs rest' is class CLASS against "
            f"all the others, score P(CLASS), decision P(CLASS) >= {threshold:g}; a group is SMALL per class. "
            "Worst-group AUROC = lowest one-vs-rest AUROC over every class and every group of a single attribute.")


def per_class_table(configs: list[dict[str, Any]], classes: list[str], ci, sd, eps_label):
    """(id, title, header, rows) of each configuration's one-vs-rest AUROC per class."""
    hdr = ["backend", "epsilon", "seeds"] + [f"AUROC {c} vs rest [95% CI] (sd over seeds)" for c in classes]
    rows = [[c["backend"], eps_label(c["epsilon"]), str(len(c["seeds"]))]
            + [f"{ci(c['per_class_auroc'][k])} {sd(c['per_class_auroc'][k])}" for k in classes] for c in configs]
    return ("per-class", "Per-class AUROC vs epsilon (one-vs-rest, test records)", hdr, rows)
