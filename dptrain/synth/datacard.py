"""DATACARD.md for a synthetic dataset: source, privacy statement, model, generation, evaluation.

Rendered from the run's record only (every number in the card is in record.json), so the card and the
record cannot disagree. ``public=True`` (release/DATACARD.md) renders only what the guarantee covers or
what is public: the statement, the model and generation settings, the noisy label counts and statistics of
the synthetic text itself -- no exact count of the real data and nothing computed from real records.
``public=False`` (private/evaluation.md) adds the evaluation against the real records.
"""

from __future__ import annotations

from typing import Any

from accounting.statement import PrivacyStatement


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _downstream_rows(ds: dict[str, Any]) -> list[str]:
    names = {"synthetic": "trained on synthetic", "real_non_private": "trained on real (non-private)",
             "real_dp": "trained on real with DP (same epsilon)"}
    rows = ["| classifier training data | accuracy | AUROC | training records |", "|---|---|---|---|"]
    for key, name in names.items():
        m = ds.get(key)
        if m:
            rows.append(f"| {name} | {_f(m.get('accuracy'))} | {_f(m.get('auroc'))} | {_f(m.get('n_train', '-'))} |"
                        + (f" skipped: {m['skipped']}" if "skipped" in m else ""))
    return rows


def render_datacard(record: dict[str, Any], p: PrivacyStatement, *, public: bool = True) -> str:
    """``record``: the synth record's sections (+ recipe, versions); ``p``: the run's statement."""
    d, ev = record["data"], record["evaluation"]
    m, g, lc = record["model"], record["generation"], record["label_counts"]
    warning = p.warning
    pe = record.get("method") == "private_evolution"
    how = ("selected and varied by Private Evolution (Xie et al. 2024): the public model's candidates voted on by "
           "the private records under differential privacy, no gradient on the private data" if pe else
           "fine-tuned with LoRA adapters under differential privacy")
    lines = [f"# Datacard: DP synthetic text `{record['recipe']}`", ""]
    if warning:
        lines += [f"> **{warning}**", ""]
    lines += [
        "## What this is",
        f"{sum(lc['generated'].values())} synthetic records (`synthetic.jsonl`: one JSON object per line with "
        f"`text` and `label`) sampled from `{m['source']}` {how}, on `{d['source']}`.", "",
        "## Privacy statement",
        f"- **({_f(p.epsilon, 4) if p.is_private else 'inf'}, {p.delta:g})-DP** per {d['privacy_unit']} "
        f"({p.neighbouring_relation.replace('_', '-')} neighbouring relation), accountant {p.accountant} "
        f"({p.accountant_version}).",
        f"- Covers: {p.covers}.",
        (f"- Mechanisms composed in one ledger (`ledger.json`): {p.steps} vote rounds (every record votes once "
         f"per round for its nearest candidate of its label; the histogram, L2 sensitivity 1, released with "
         f"Gaussian noise std {_f(p.noise_multiplier, 4)})" if pe else
         f"- Mechanisms composed in one ledger (`ledger.json`): {p.steps} DP-SGD steps ({p.sampling} sampling, "
         f"q={_f(p.sampling_rate, 5)}, noise multiplier {_f(p.noise_multiplier, 4)}, per-record clipping "
         f"norm {p.clipping_norm})")
        + ("" if lc["mode"] != "dp_histogram" else
           f", a Gaussian label histogram (noise std {_f(p.releases['label_histogram']['noise_std'], 2)})")
        + ("" if "unit_count" not in (p.releases or {}) else
           f", and the Gaussian count of records (noise std {_f(p.releases['unit_count']['noise_std'], 2)})")
        + ".",
        "- Records per label: " + ("noisy DP histogram (post-processed: negative counts -> 0, largest remainder)"
                                   if lc["mode"] == "dp_histogram" else f"declared public prior {lc['prior']}")
        + f"; generated: {lc['generated']}.",
        "- Public (not protected, not private): the base model, the tokenizer, the prompt template and label "
        "names, the recipe (hyperparameters chosen without looking at this data's results is the user's duty: "
        "hyperparameter search on the private data costs extra privacy, see `dptrain sweep`).",
        f"- Records: {p.units.meaning}. Public: {p.public}.",
        "- Sharp edge: the unit is one record; a person with several records is protected less (group "
        "privacy).", ("- No model is released (the base model is public and unchanged)." if pe else
                      "- The released model is `adapters/` (LoRA weights only).")
        + " `private/` (the evaluation, the secret canaries, any kept checkpoint with the secret noise seed) is "
        "never published.", "",
        "## Model and generation",
        (f"- Base model `{m['source']}` (public, not trained); Private Evolution {m['private_evolution']}; "
         f"topics {m['topics']}; embeddings {m['embedding']}." if pe else
         f"- Base model `{m['source']}`; LoRA r={m['lora']['r']}, alpha={m['lora']['alpha']}, modules "
         f"{m['lora']['target_modules']}, layers: {'all' if m['lora']['top_layers'] is None else 'last ' + str(m['lora']['top_layers'])}; "
         f"{m['trainable_parameters']:,} trainable parameters; max {m['max_length']} tokens per record "
         "(prompt + text); prefix-LM loss (no loss on the prompt)."),
        f"- Sampling: top-k {g['top_k']}, top-p {g['top_p']}, temperature {g['temperature']}, max "
        f"{g['max_new_tokens']} new tokens, seed {g['seed']}.", "",
    ]
    ss = record.get("synthetic_stats") or {}
    if public:
        lines += ["## The synthetic text (computed from the synthetic records only)",
                  "| corpus | mean words | median words | distinct-1 | distinct-2 | vocabulary |",
                  "|---|---|---|---|---|---|",
                  f"| synthetic | {_f(ss.get('mean_words'), 1)} | {_f(ss.get('median_words'), 1)} | "
                  f"{_f(ss.get('distinct_1'))} | {_f(ss.get('distinct_2'))} | {_f(ss.get('vocab_size'))} |", "",
                  "The evaluation against real records (utility, fidelity, memorisation, canary exposure) is kept by "
                  "the data owner in `private/evaluation.md`: it is computed on real records outside the "
                  "mechanism, so it is not covered by the guarantee and not published with the data.", "",
                  "## Provenance", f"- Software: {record['versions']}." if "versions" in record else "",
                  "- Files: `synthetic.jsonl`, `DATACARD.md`, " + ("" if pe else "`adapters/`, ") + "`privacy.json` (the statement), "
                  "`ledger.json` (every DP event), `config.yaml` (the recipe).", ""]
        return "\n".join(lines)
    lines += [
        "## Evaluation (for the data owner: computed on the real training and held-out records, NOT covered by "
        "the DP guarantee; do not publish this section with the data)",
        "### Downstream utility (train on X, test on real held-out)",
        *_downstream_rows(ev["downstream"]),
        "", f"Classifier: {ev['downstream']['classifier']}.", "",
        "### Fidelity",
    ]
    pr = ev["fidelity"]["knn_precision_recall_minilm"]
    if "skipped" in pr:
        lines.append(f"- kNN precision/recall skipped: {pr['skipped']}")
    else:
        lines.append(f"- kNN precision {_f(pr['precision'])} / recall {_f(pr['recall'])} (k={pr['k']}, "
                     f"all-MiniLM-L6-v2 embeddings, {pr['n_synth']} synthetic vs {pr['n_real']} real held-out).")
    s, r, dist = ev["fidelity"]["synthetic"], ev["fidelity"]["real_heldout"], ev["fidelity"]["distances"]
    lines += [
        "| corpus | mean words | median words | distinct-1 | distinct-2 | vocabulary |", "|---|---|---|---|---|---|",
        *[f"| {n} | {_f(c.get('mean_words'), 1)} | {_f(c.get('median_words'), 1)} | {_f(c.get('distinct_1'))} | "
          f"{_f(c.get('distinct_2'))} | {_f(c.get('vocab_size'))} |" for n, c in (("synthetic", s), ("real held-out", r))],
        f"- Length KS statistic {_f(dist.get('ks_length'))}; unigram Jensen-Shannon distance "
        f"{_f(dist.get('js_unigram'))}.",
        "- Held-out NLL: not applicable (no model was trained)." if pe else
        f"- Held-out NLL per token under the fine-tuned model: {_f(ev.get('heldout_nll_per_token'))} nats"
        + (f" (base model: {_f(ev['heldout_nll_per_token_base'])})" if "heldout_nll_per_token_base" in ev else "")
        + ".", "",
        "### Memorisation",
    ]
    ng = ev["memorisation"]["ngram_overlap"]
    lines.append(f"- Synthetic records sharing a {ng.get('n', '?')}-word sequence with a training record: "
                 f"{_f(ng.get('train_overlap'))}; with an equally large held-out set: {_f(ng.get('heldout_overlap'))} "
                 "(reports share boilerplate; the excess over held-out is the memorisation signal).")
    if "canaries" in ev:
        c = ev["canaries"]
        for rep, v in c["by_repetitions"].items():
            lines.append(f"- Canaries inserted {rep}x: mean exposure {_f(v['mean_exposure_bits'], 2)} bits "
                         f"(n={v['n']}; chance ~1 bit, max measurable {_f(c['max_measurable_bits'], 1)}"
                         + (f"; score: {c['score']}" if "score" in c else "") + ").")
        lines.append(f"- A canary secret appears in the synthetic data: {'YES' if c['secret_in_synthetic'] else 'no'}.")
    t = record["timing_seconds"]
    lines += ["", "## Provenance",
              f"- Training {t['training_this_session']} s, generation {t['generation']} s, evaluation "
              f"{t['evaluation']} s (this session). Software: {record.get('versions')}.",
              "- PRIVATE: this file and `private/record.json` hold the evaluation against real records; the "
              "releasable files are under `release/`.", ""]
    return "\n".join(lines)
