"""The model card of a ``dptrain train`` run, rendered from its typed record (:class:`~dptrain.records.RunRecord`).

Two cards, one renderer (:func:`render_model_card`), written by :func:`write_model_cards` when a run finishes:

* ``MODEL_CARD.md`` next to the released model (``release/``; ``private/NOT-PRIVATE/`` for a non-private run):
  intended use, the data source and its declared preprocessing, the privacy statement in plain words, where the
  evaluation and the audit are, and known limitations;
* ``private/MODEL_CARD.md``: the same, plus test / validation metrics, the audit's results, the exact counts and
  the data-derived warnings. Never publish it.

Guarantee: the release card holds only public facts and DP outputs -- the privacy statement
(``release/privacy.json``, whose only number of the data is the released unit count), the recipe's declarations
(``release/config.yaml``: source as written, query, ``data.id``, seeds and fractions) and the declared encoding
(``release/model.json``: features, bounds, categories, missing rules, classes). It never holds a count of the
data, a metric, an audit result, the content hash of the data (a deterministic function of the records, so not
covered by the guarantee) or a warning computed from the data. Test metrics are measured on real held-out
records outside the mechanism: they are NOT covered by the DP guarantee, so they stay in ``private/``.

Sharp edge: whatever the recipe declares (paths, database URLs, queries, column names) is public by design;
keep secrets out of recipes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accounting.atomic import atomic_write_bytes
from accounting.statement import PrivacyStatement
from dptrain.records import COMMON, RunRecord

if TYPE_CHECKING:
    from dptrain.config import Recipe

CARD_FILE = "MODEL_CARD.md"
NOT_A_DEVICE = ("This is a research model trained with differential privacy. It is not a medical device, has not "
                "been clinically validated, and must not be used to diagnose, treat or triage patients or to make "
                "any decision about an individual.")
NOT_COVERED = ("Test metrics are computed on held-out real records, outside the DP mechanism: they are NOT covered "
               "by the DP guarantee.")
_MAX_CATEGORIES = 12


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.{digits}g}")


def _value(x: Any) -> str:
    """A metric: a number, or a mapping of them (e.g. the AUROC of each class)."""
    if isinstance(x, dict):
        return "; ".join(f"{k}: {_num(v)}" for k, v in x.items())
    return _num(x)


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def _unit_words(unit: str) -> str:
    if unit == "example":
        return "one training record (one row of the table, or one image)"
    return f"one `{unit}`: all training records that share its value (e.g. one patient)"


# --------------------------------------------------------------------------------------------------
# Sections (each returns Markdown lines)
# --------------------------------------------------------------------------------------------------


def _intended_use(record: RunRecord, recipe: Recipe | None) -> list[str]:
    d, pre = record.data, record.data.get("preprocessing") or {}
    classes = [str(c) for c in d.get("classes") or []]
    label = (pre.get("label") or {}).get("column")
    kind = "binary" if len(classes) == 2 else f"{len(classes)}-class"
    what = f"predict `{label}`" if label else "predict the declared label"
    lines = ["## Intended use", "",
             f"- Task: {kind} classification, to {what}; classes, in output order: "
             + ", ".join(f"`{c}`" for c in classes) + (" (the second is the positive class)." if len(classes) == 2
                                                     else "."),
             "- Inputs: " + ("images, preprocessed as below" if pre.get("resize") else
                             "the declared features below, encoded as in `model.json`") + "."]
    if recipe is not None:
        m = recipe.model
        arch = {"mlp": f"MLP, hidden layers {list(m.hidden)}", "logistic": "logistic regression",
                "cnn": f"CNN, channels {list(m.channels)}",
                "pretrained": "EfficientNet-Lite0 backbone with "
                              + ("public ImageNet" if m.backbone.startswith("builtin:") else "declared-public")
                              + f" pretrained weights (`{m.backbone}`, not trained on these records"
                              + (", frozen) and a DP-trained linear head" if m.finetune == "head" else
                                 ") fine-tuned with DP")}.get(m.name, m.name)
        lines.append(f"- Model: {arch}; backend `{recipe.trainer.backend}`; recipe `{recipe.name}`.")
    lines += ["- Use it with `dptrain predict RUN --data new.csv`, `dptrain.load_model(RUN)` or "
              "`dptrain export RUN --format onnx`.", "", f"**{NOT_A_DEVICE}**", ""]
    return lines


def _identity(record: RunRecord, recipe: Recipe | None, private: bool) -> str:
    ident = str(record.data.get("dataset_id") or "")
    if recipe is not None and recipe.data.id is not None:
        return f"`id:{recipe.data.id}` (declared `data.id`)"
    if ident.startswith(("id:", "builtin:")):
        return f"`{ident}`"
    if private and ident:
        return f"`{ident}` (content hash: private, never publish)"
    return ("a content hash of the data, kept in `private/record.json` (a hash of the records is not covered by the "
            "guarantee); declare `data.id` for a public name")


def _features(pre: dict[str, Any]) -> list[str]:
    rows = []
    for col, info in (pre.get("numeric") or {}).items():
        lo, hi = info.get("bounds", [None, None])
        rows.append([f"`{col}`", "numeric", f"[{_num(lo)}, {_num(hi)}], clipped", info.get("missing_rule", "refused"),
                     info.get("from", "")])
    for col, info in (pre.get("categorical") or {}).items():
        cats = [str(c) for c in info.get("categories", [])]
        shown = ", ".join(cats[:_MAX_CATEGORIES]) + (", ... (see model.json)" if len(cats) > _MAX_CATEGORIES else "")
        rows.append([f"`{col}`", "categorical (one-hot)", shown, info.get("missing_rule", "refused"),
                     info.get("from", "")])
    return _table(["feature", "type", "declared bounds / categories", "missing values", "declared in"], rows) if rows \
        else []


def _data(record: RunRecord, recipe: Recipe | None, private: bool) -> list[str]:
    from dptrain.config import DataConfig

    d, pre = record.data, record.data.get("preprocessing") or {}
    split = pre.get("split") or {}
    lines = ["## Data and preprocessing", "",
             f"- Source: `{DataConfig.masked_url(str(d.get('source', '')))}`"
             + (f", query: `{' '.join(str(pre['query']).split())}`" if pre.get("query") else ""),
             f"- Dataset identity (key of the dataset budget): {_identity(record, recipe, private)}",
             f"- Privacy unit: {_unit_words(str(record.privacy.privacy_unit))}"]
    if split:
        lines.append(f"- Split: {split.get('method', 'random')}, test fraction {split.get('test_fraction')}, "
                     f"validation fraction {split.get('validation_fraction')}, split seed {split.get('seed')} "
                     "(declared in the recipe).")
    if pre.get("row_filter"):
        lines.append(f"- Rows: {pre['row_filter']}.")
    sens = list((pre.get("sensitive") or {}).keys())
    if sens:
        lines.append("- Sensitive attributes (kept for fairness evaluation, not model inputs): "
                     + ", ".join(f"`{s}`" for s in sens) + ".")
    if pre.get("resize"):
        inten = pre.get("intensity") or {}
        lines.append(f"- Images: resized to {pre['resize'].get('size')} ({pre['resize'].get('method')}), "
                     f"{(pre.get('channels') or {}).get('rule', '')}; intensity range {inten.get('range')} "
                     f"({inten.get('from', '')}) mapped to [0, 1].")
    lines += ["- Every encoding decision is declared (recipe or built-in schema): no mean, range, quantile, vocabulary "
              "or count of the data was used (`statistics_of_data_used: none`).", ""]
    table = _features(pre)
    return lines + (table + [""] if table else [])


def _privacy(st: PrivacyStatement) -> list[str]:
    lines = ["## Privacy guarantee", ""]
    if not st.is_private or st.mode not in (None, "dp"):
        return lines + [f"**NOT PRIVATE** ({st.mode}): {st.warning or 'no noise was added'}. This model has no "
                        "differential-privacy guarantee: nothing protects the training records. Never publish it.", ""]
    eps, delta, unit = st.epsilon, st.delta, str(st.privacy_unit)
    ratio = "more than 10^300" if eps > 690 else _num(math.exp(eps), 3)
    one = "one record" if unit == "example" else f"one {unit} (all records with that {unit})"
    relation = "add/remove" if "add_or_remove" in st.neighbouring_relation else st.neighbouring_relation
    lines += [f"**(epsilon = {_num(eps)}, delta = {delta:g}) differential privacy**, {relation} relation, "
              f"{st.accountant} accountant. The protected unit is {_unit_words(unit)}.", "",
              f"In words: this model would have come out almost the same whether or not the records of any {one} had "
              f"been in the training data. No result of training is more than e^epsilon = {ratio} times more (or "
              f"less) likely with those records than without them, except with probability at most delta = "
              f"{delta:g}. This bounds what anyone holding the model, the recipe and this card can learn about one "
              "unit's records, including whether they were used at all.", "",
              "- Covered: " + (st.covers or "the released model and this statement") + ".",
              "- Public (not protected, declared in advance): " + (st.public or "the recipe") + "."]
    if st.noise_multiplier is not None:
        lines.append(f"- How: DP-SGD; each {unit}'s gradient is clipped to norm {_num(st.clipping_norm)}, Gaussian "
                     f"noise with standard deviation {_num(st.noise_multiplier)} x that norm is added to every "
                     f"step's sum; {st.steps} steps, {st.sampling} sampling with rate {_num(st.sampling_rate)}.")
    if st.units is not None:
        lines.append(f"- Number of units, as released: {st.units.meaning}.")
    if st.epsilon_independent_check is not None and st.epsilon_independent_check.epsilon is not None:
        lines.append(f"- Cross-check: epsilon recomputed independently = {_num(st.epsilon_independent_check.epsilon)}.")
    if not st.hyperparameter_selection_accounted:
        lines.append("- Not covered: choosing this model among several runs (a sweep); see that sweep's "
                     "`release/selection.json` for the cost of publishing a selected run.")
    if st.warning:
        lines.append(f"- Warning: {st.warning}")
    return lines + ["", "The full statement is `privacy.json`; every DP event composed is in `ledger.json`.", ""]


def _evaluation(record: RunRecord, private: bool) -> list[str]:
    lines = ["## Evaluation", "", f"**{NOT_COVERED}**", ""]
    if not private:
        return lines + ["They are therefore not in this folder: they are in `private/MODEL_CARD.md` and "
                        "`private/record.json` (`metrics`). Publishing them is the data owner's decision, outside "
                        "this guarantee.", ""]
    metrics = record.get("metrics") or {}
    for split, values in metrics.items():
        if not isinstance(values, dict):
            continue
        rows = [[k, _value(v) + (f" [{_num(values[k + '_ci'][0])}, {_num(values[k + '_ci'][1])}]"
                                 if isinstance(values.get(k + "_ci"), list | tuple) else "")]
                for k, v in values.items() if not k.endswith("_ci")]
        lines += [f"{split} split:", "", *_table(["metric", "value"], rows), ""]
    if not any(isinstance(v, dict) and "_ci" in "".join(v) for v in metrics.values()):
        lines.append("No confidence intervals in this record. Per-group metrics with bootstrap intervals: `dptrain "
                     "sweep` + `dptrain report` (private), or from `private/predictions.parquet` (labels, scores and "
                     "the sensitive attributes of the test records).")
    return lines + [""]


def _audit(record: RunRecord, recipe: Recipe | None, private: bool) -> list[str]:
    st = record.privacy
    canaries = st.units.added_by_dptrain if st.units is not None else (
        recipe.privacy.audit.canaries if recipe is not None else None)
    lines = ["## Privacy audit", "",
             (f"- Canary audit: {canaries} synthetic canaries, each inserted with a secret coin flip; an empirical "
              "lower bound on epsilon (one-run audit) checks the implementation, it cannot prove the guarantee."
              if canaries else "- Canary audit: none configured (`privacy.audit.canaries`)."),
             "- A loss-threshold membership attack on real training vs held-out records is run too."]
    if not private:
        return lines + ["- Results: `private/audit.json` and `private/MODEL_CARD.md`; they are computed on real "
                        "records and secret coins, so they are not published here.", ""]
    audit = record.get("audit") or {}
    rows = [[k, _num(v)] for k, v in audit.items() if not isinstance(v, dict | list)]
    return lines + ["", *_table(["audit", "value"], rows), ""]


def _limitations(record: RunRecord) -> list[str]:
    unit = str(record.privacy.privacy_unit)
    group = ("The guarantee is per record: a patient with k records is protected only by group privacy, with "
             "epsilon k times larger (and delta k e^((k-1) epsilon) times larger). Set `data.privacy_unit` to a "
             "patient id for a per-patient guarantee." if unit == "example" else
             f"The guarantee is per `{unit}`; people linked across units (relatives, one person under two ids) are "
             "protected only by group privacy.")
    return ["## Known limitations", "",
            f"- {group}",
            "- The protection weakens quickly as epsilon grows (the factor e^epsilon above); delta should be far "
            "below 1 / (number of units).",
            "- Differential privacy does not remove bias in the data or the labels, and DP training often costs small "
            "or under-represented groups more accuracy than large ones. Check per-group metrics before any use; "
            "estimates for small groups are unreliable (wide intervals).",
            "- Test metrics come from one split of one data source; performance on other sites, periods or "
            "populations is unknown.",
            "- Values outside the declared bounds are clipped; categories outside the declared lists are refused; "
            "missing values follow only the declared rules.",
            "- The guarantee is about the training records: scores of new patients reveal what they reveal about those "
            "patients.", ""]


def render_model_card(record: RunRecord, *, recipe: Recipe | None = None, private: bool = False) -> str:
    """The Markdown model card of a ``train`` run. ``private=False``: the publishable card (public facts and DP
    outputs only; see the module docstring); ``private=True``: adds metrics, the audit's results, exact counts
    and data warnings. ``recipe`` (optional) adds the model, ``data.id`` and the canary count."""
    st = record.privacy
    head = f"# Model card: {record.recipe}"
    banner = ("> PRIVATE: metrics, audit results and exact counts of real records. Never publish this file; the "
              "publishable card is next to the released model." if private else
              "> Publishable: covered by the DP guarantee or public by declaration. Test metrics and audit results "
              "are not here (they are not covered): see `private/`.")
    summary = (f"(epsilon = {_num(st.epsilon)}, delta = {st.delta:g})-DP per {st.privacy_unit}" if st.is_private
               else "NOT PRIVATE")
    lines = [head, "", banner, "", f"Privacy: **{summary}**.", ""]
    lines += _intended_use(record, recipe) + _data(record, recipe, private) + _privacy(st)
    lines += _evaluation(record, private) + _audit(record, recipe, private)
    if private:
        d = record.data
        counts = {k: d.get(k) for k in ("n_train", "n_validation", "n_test", "num_units", "audit_canary_units")}
        lines += ["## Exact counts (private)", "", *_table(["count", "value"], [[k, v] for k, v in counts.items()]),
                  ""]
        if d.get("warning"):
            lines += [f"**Data warning (computed from the data, private):** {d['warning']}", ""]
    lines += _limitations(record)
    return "\n".join(lines).rstrip() + "\n"


def write_model_cards(model_dir: Path, private_dir: Path, statement: PrivacyStatement | dict[str, Any],
                      record: dict[str, Any], recipe: Recipe | None = None) -> None:
    """Write ``model_dir/MODEL_CARD.md`` (publishable; ``model_dir`` is where the model went) and
    ``private_dir/MODEL_CARD.md`` (full), atomically, from a ``train`` run's statement and record sections."""
    if not isinstance(statement, PrivacyStatement):
        statement = PrivacyStatement.from_dict(statement)
    typed = RunRecord(command=str(record.get("command", "train")), recipe=recipe.name if recipe else "run",
                      run_id=str(record.get("run_id", "")), privacy=statement, data=dict(record.get("data") or {}),
                      sections={k: v for k, v in record.items() if k not in COMMON})
    atomic_write_bytes(Path(model_dir) / CARD_FILE, render_model_card(typed, recipe=recipe).encode())
    atomic_write_bytes(Path(private_dir) / CARD_FILE, render_model_card(typed, recipe=recipe, private=True).encode())


def write_private_card(private_dir: Path, record: dict[str, Any], recipe: Recipe | None = None) -> None:
    """Rewrite ``private_dir/MODEL_CARD.md`` from a finished record (``dptrain audit`` changes its audit);
    the publishable card holds no audit result, so it is left as it is."""
    typed = RunRecord.from_dict(record, str(Path(private_dir) / "record.json"))
    atomic_write_bytes(Path(private_dir) / CARD_FILE, render_model_card(typed, recipe=recipe, private=True).encode())


__all__ = ["CARD_FILE", "NOT_A_DEVICE", "NOT_COVERED", "render_model_card", "write_model_cards", "write_private_card"]
