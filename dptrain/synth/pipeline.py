"""`dptrain synth`: DP fine-tuning of a causal LM, label-conditioned generation, evaluation, datacard.

Order (each release is accounted in one ledger under add/remove one record, DESIGN invariants 1 and 9):

1. Real training records (optionally a public share ``synthesis.train_fraction``: each record kept
   independently by a keyed hash of its own text, so adding a record never changes whether another is used)
   + secret canary sentences (each copy its own privacy unit; inserted 1x / 10x to measure exposure).
2. The number of records: a Gaussian DP count (``unit_count``) or a declared public size; q = B / that.
3. Generation targets per label: a Gaussian-noised label histogram (sensitivity 1; ``label_histogram``),
   or a declared public prior (no cost). Raw counts are never used.
4. LoRA adapters trained with THE loop on the Opacus backend (prefix-LM loss: the prompt is public and
   not learned); per-record clipping, Poisson sampling, noise once per step. The training noise is
   calibrated so that count + histogram + training meet the target epsilon.
5. Generation (top-k / top-p, seeded) from the public prompt template: post-processing, no extra cost.
6. Evaluation against real records (downstream TF-IDF + LR, fidelity, memorisation, canary exposure): NOT
   covered by the guarantee, written to ``private/`` only.

The run lifecycle (directory, resume, budget, release boundary) is :mod:`dptrain.lifecycle`'s.
``release/``: synthetic.jsonl, DATACARD.md (statement, generation settings, statistics of the synthetic
text only), adapters/ (LoRA weights), privacy.json, ledger.json, config.yaml. ``private/``: record.json and
evaluation.md (the evaluation against real records), state.json (noisy counts, the secret canaries),
metrics.jsonl, the checkpoint while the run is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from accounting._io import atomic_write_bytes
from dptrain.config import Recipe
from dptrain.lifecycle import RunError, RunResult, Session, privacy_statement
from dptrain.trainers.base import TrainerError
from dptrain.trainers.plan import PrivacyPlan
from dptrain.trainers.sampler import UnitSampler

SYNTHETIC = "synthetic.jsonl"
DATACARD = "DATACARD.md"
EVALUATION = "evaluation.md"
COVERS = ("the training records (add/remove one record) for everything under release/: synthetic.jsonl, "
          "DATACARD.md, adapters/ (the LoRA weights), the noisy label counts, this statement and the ledger. NOT "
          "covered, never to be published: private/ (the evaluation computed on the real training and held-out "
          "records, including a separate DP classifier run; the secret canaries; the checkpoint with the secret "
          "noise seed)")
PUBLIC = ("the base model, tokenizer, prompt template and label names, the recipe (incl. synthesis.train_fraction), "
          "and the number of records as stated in 'units'")


def _load(recipe: Recipe):
    from dptrain.data.text import load_text_from_config

    return load_text_from_config(recipe.data)


def _subset(texts: list[str], fraction: float | None, seed: int) -> np.ndarray:
    """Indices of the records kept for training: each record independently, iff a keyed hash of its own text
    and the seed is below the public ``fraction`` -- whether a record is used never depends on the others or on
    how many there are."""
    n = len(texts)
    if fraction is None or fraction >= 1:
        return np.arange(n)
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}\x00{t}".encode()).digest()[:8], "little") / 2.0 ** 64
                  for t in texts])
    return np.flatnonzero(u < fraction)


def _canaries(recipe: Recipe, classes: list[str], rng: np.random.Generator | None = None) -> list[dict[str, Any]]:
    """Secret canary records: ``count`` distinct sentences per repetition count, from OS entropy."""
    from dptrain.synth.evaluate import make_canaries

    ev = recipe.synthesis.evaluation
    if not ev.canaries:
        return []
    rng = rng or np.random.default_rng(secrets.randbits(128))
    texts = make_canaries(rng, ev.canaries * len(ev.canary_repetitions))
    label = len(classes) - 1  # one public label for all canaries: one shared reference set
    return [{"text": t, "label": label, "repetitions": r}
            for t, r in zip(texts, [r for r in ev.canary_repetitions for _ in range(ev.canaries)], strict=True)]


def synthesize(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, dp_seed: int | None = None,
               progress: bool = True, keep_checkpoint: bool = False) -> RunResult:
    """Fine-tune, generate, evaluate; see the module docstring for what goes where."""
    import torch

    from dptrain.data.identity import dataset_identity
    from dptrain.synth.histogram import dp_label_counts, histogram_event, records_per_label
    from dptrain.synth.lm import PrefixLMTask, add_lora, encode_records, load_causal_lm
    from dptrain.trainers.opacus_backend import OpacusTrainer, resolve_device

    if recipe.synthesis is None:
        raise RunError("synthesis: this recipe has no synthesis section; `dptrain synth` needs model.name: "
                       "causal_lm and a synthesis section (see recipes/iu-xray-reports-synth.yaml)")
    if recipe.trainer.grad_sample_mode != "hooks":
        raise RunError("trainer.grad_sample_mode: LM fine-tuning uses per-sample hooks; set grad_sample_mode: hooks")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise RunError("dptrain synth runs in one process (data-parallel LM fine-tuning is not supported yet); "
                       "run it without torchrun")
    syn = recipe.synthesis
    out = Path(out_dir)
    session = Session(recipe, out, resume=resume, keep_checkpoint=keep_checkpoint)
    if session.finished is not None:
        return RunResult(out, session.finished)
    rd = session.rd

    # ---- validate before writing anything ----
    data = _load(recipe)
    if syn.prior is not None and len(syn.prior) != len(data.classes):
        raise RunError(f"synthesis.prior: {len(syn.prior)} weights for the {len(data.classes)} declared classes "
                       f"{data.classes}; give one weight per class")
    keep = _subset(data.texts_train, syn.train_fraction, recipe.seed)
    texts = [data.texts_train[i] for i in keep]
    labels = data.y_train[keep].astype(np.int64)
    ev_cfg = syn.evaluation
    n_canary_rows = ev_cfg.canaries * sum(ev_cfg.canary_repetitions)  # public: from the recipe
    hist_event = histogram_event(syn.histogram_noise_multiplier) if syn.label_counts == "dp_histogram" else None
    plan = session.make_plan(len(texts), public_extra=n_canary_rows, privacy_unit="example",
                             releases=(("label_histogram", hist_event),) if hist_event else ())
    model, tok = load_causal_lm(recipe.model.source)
    lm = recipe.model
    try:
        lora = add_lora(model, r=lm.lora.r, alpha=lm.lora.alpha, target_modules=lm.lora.target_modules,
                        top_layers=lm.lora.top_layers)
    except ValueError as err:
        raise TrainerError(f"model.lora: {err}") from None
    lora.to(resolve_device(recipe.trainer.device))
    prompts = {c: syn.prompt.format(label=c) for c in data.classes}
    for c in _canaries(recipe, data.classes, np.random.default_rng(0)):  # same format as the secret ones
        need = len(tok(prompts[data.classes[c["label"]]] + c["text"], add_special_tokens=False)["input_ids"]) + 1
        if need > lm.max_length:
            raise RunError(f"model.max_length: {lm.max_length} tokens cannot hold a canary with its prompt ({need}); "
                           "raise model.max_length or shorten synthesis.prompt")
    session.reserve_budget(dataset_identity(recipe.data))

    # ---- start or resume: the noisy counts and secret canaries are drawn once and kept in private/state.json
    def fresh_state() -> dict[str, Any]:
        state: dict[str, Any] = {"canaries": _canaries(recipe, data.classes), "noisy_label_counts": None}
        if hist_event is not None:
            noisy, _ = dp_label_counts(labels, len(data.classes), noise_multiplier=syn.histogram_noise_multiplier,
                                       secure=recipe.privacy.secure_rng)
            state["noisy_label_counts"] = noisy.tolist()
        return state

    session.start(dp_seed, fresh_state)
    canaries = session.state["canaries"]
    noisy = None if session.state["noisy_label_counts"] is None else np.asarray(session.state["noisy_label_counts"])
    all_texts = texts + [c["text"] for c in canaries for _ in range(c["repetitions"])]
    all_labels = np.concatenate([labels, np.array([c["label"] for c in canaries for _ in range(c["repetitions"])],
                                                  np.int64)])
    x_tok, y_tok = encode_records(tok, [prompts[data.classes[k]] for k in all_labels], all_texts,
                                  max_length=lm.max_length)
    num_units = len(all_texts)

    cache_below = lm.lora.top_layers if lm.lora.top_layers and lm.lora.cache_frozen_layers else None
    t0 = time.time()
    if session.start_step < plan.steps:
        with _bar(None, "caching frozen layers", progress and cache_below is not None) as bar:  # no exact count
            task = PrefixLMTask(lora, x_tok, cache_below=cache_below, progress=bar.update)
    else:
        task = PrefixLMTask(lora, x_tok)
    trainer = OpacusTrainer(recipe.optimizer, max_physical_batch_size=recipe.trainer.max_physical_batch_size,
                            secure_rng=recipe.privacy.secure_rng, task=task, device=recipe.trainer.device)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        trainer.init(lora, plan, seed=recipe.seed, dp_seed=session.dp_seed)
    if session.checkpoint is not None:
        trainer.load_state_dict(session.checkpoint["trainer"])
        session.checkpoint = None
    rows = np.arange(len(x_tok))[:, None]
    sampler = UnitSampler(np.arange(num_units), num_units, plan.scheme, dp_seed=session.dp_seed,
                          secure=recipe.privacy.secure_rng)
    session.fit(trainer, sampler, rows, y_tok, np.arange(num_units), progress=progress, log_loss=not canaries)
    train_seconds = time.time() - t0

    # ---- generate (post-processing) ----
    weights = noisy if noisy is not None else np.asarray(syn.prior, float)
    targets = records_per_label(weights, syn.records)
    gen = syn.generation
    model_out = trainer.module
    records: list[dict[str, str]] = []
    t1 = time.time()
    with _bar(syn.records, "generating", progress) as bar:
        for k, c in enumerate(data.classes):
            from dptrain.synth.lm import generate

            for text in generate(model_out, tok, prompts[c], int(targets[k]), top_k=gen.top_k, top_p=gen.top_p,
                                 temperature=gen.temperature, max_new_tokens=gen.max_new_tokens,
                                 batch_size=gen.batch_size, seed=gen.seed + 1000 * k, progress=bar.update):
                records.append({"text": text, "label": c})
    gen_seconds = time.time() - t1
    session.settle()  # a budget refusal stops the run before anything is released
    out_side = session.release_dir()  # release/ for a DP run, private/NOT-PRIVATE/ otherwise
    atomic_write_bytes(out_side / SYNTHETIC, "".join(json.dumps(r) + "\n" for r in records).encode())
    model_out.save_pretrained(out_side / "adapters")  # the released model: LoRA adapters only

    # ---- evaluate (uses the real training and held-out records: private) ----
    releases = {} if hist_event is None else {"label_histogram": {
        "noise_std": syn.histogram_noise_multiplier, "l2_sensitivity": 1.0}}
    statement = privacy_statement(plan, session.ledger, recipe, session.count, releases=releases, covers=COVERS,
                                  public=PUBLIC)
    t2 = time.time()
    evaluation = evaluate_synthetic(recipe, data, texts, labels, records, canaries, model_out, tok, prompts,
                                    statement, progress=progress)
    from dptrain.synth import evaluate as ev
    from dptrain.synth.datacard import render_datacard

    record = {
        "format": "dptrain.synth-record/1",
        "status": "finished",
        "recipe": recipe.name,
        "label_counts": {"mode": syn.label_counts,
                         "noisy_counts": None if noisy is None else dict(zip(data.classes, noisy.tolist(), strict=True)),
                         "prior": syn.prior, "generated": dict(zip(data.classes, targets.tolist(), strict=True))},
        "model": {"source": lm.source, "lora": lm.lora.model_dump(), "max_length": lm.max_length,
                  "trainable_parameters": int(sum(p.numel() for p in trainer.parameters()))},
        "generation": gen.model_dump(),
        "synthetic_stats": _safe(ev.text_stats, [r["text"] for r in records]),
        "data": {"source": data.source, "classes": data.classes, "n_train_available": len(data.texts_train),
                 "n_train_used": len(texts), "n_test": len(data.texts_test), "canary_rows": n_canary_rows,
                 "num_units": num_units, "privacy_unit": "example", "train_fraction": syn.train_fraction,
                 "preprocessing": data.preprocessing,
                 "note": "exact counts: private (the statement releases only 'units')"},
        "evaluation": evaluation,
        "metrics": session.metrics,
        "timing_seconds": {"training_this_session": round(train_seconds, 1), "generation": round(gen_seconds, 1),
                           "evaluation": round(time.time() - t2, 1)},
    }
    from dptrain.lifecycle import software_versions

    full = {**record, "privacy": statement, "versions": software_versions()}
    atomic_write_bytes(out_side / DATACARD, render_datacard(full, public=True).encode())
    atomic_write_bytes(rd.private / EVALUATION, render_datacard(full, public=False).encode())
    record = session.finish(statement, record)
    return RunResult(out, record)


class _bar:
    """A tqdm bar usable as a context manager whose ``update`` takes a count (disabled: no output)."""

    def __init__(self, total: int | None, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()


def _safe(fn, *args, **kwargs) -> dict[str, Any]:
    """A metric, or ``{"skipped": why}`` when the synthetic text cannot support it (e.g. no words at all)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        return {"skipped": str(err)}


def evaluate_synthetic(recipe: Recipe, data, train_texts: list[str], train_y: np.ndarray, records, canaries,
                       model, tok, prompts: dict[str, str], statement: dict[str, Any], *, progress: bool = True):
    """Downstream utility, fidelity, memorisation and canary exposure of the synthetic records.

    Uses the real training and held-out records: the result is for the data owner, not covered by the DP
    guarantee. A metric the synthetic text cannot support is recorded as skipped, never a crash."""
    from dptrain.synth import evaluate as ev

    cfg = recipe.synthesis.evaluation
    classes = data.classes
    syn_texts = [r["text"] for r in records]
    syn_y = np.array([classes.index(r["label"]) for r in records], np.int64)
    out: dict[str, Any] = {"covered_by_dp": False}
    out["downstream"] = {
        "synthetic": _safe(ev.downstream, syn_texts, syn_y, data.texts_test, data.y_test, seed=recipe.seed),
        "real_non_private": ev.downstream(train_texts, train_y, data.texts_test, data.y_test, seed=recipe.seed),
        "classifier": "TF-IDF (1-2 grams, fitted on the classifier's training texts) + logistic regression; "
                      "tested on the real held-out split. real_dp: the same task by DP-SGD logistic regression on "
                      "hashed features of the real training records at the same epsilon -- a separate DP run "
                      "whose cost is not in this run's ledger: a private reference, never released",
    }
    eps = statement["epsilon"]
    if cfg.dp_baseline and eps != "inf":  # a second DP run on the same records: private, never released
        # the main run's released count (never a new draw, never the exact n); a failure is recorded, not raised
        out["downstream"]["real_dp"] = _safe(
            dp_text_classifier, train_texts, train_y, data.texts_test, data.y_test, epsilon=float(eps),
            delta=statement["delta"], seed=recipe.seed, released_units=int(statement["units"]["value"]))
    rng = np.random.default_rng([recipe.seed, 23])
    n_fid = min(cfg.fidelity_records, len(data.texts_test))
    real_fid = [data.texts_test[i] for i in np.sort(rng.choice(len(data.texts_test), n_fid, replace=False))]
    try:
        encoder = ev.load_sentence_encoder()
        pr = _safe(ev.knn_precision_recall, encoder(real_fid), encoder(syn_texts), k=5)
    except (ValueError, ImportError) as err:
        pr = {"skipped": str(err)}
    out["fidelity"] = {"knn_precision_recall_minilm": pr, "synthetic": _safe(ev.text_stats, syn_texts),
                       "real_heldout": ev.text_stats(real_fid),
                       "distances": _safe(ev.distribution_distances, syn_texts, real_fid)}
    n_mem = min(len(train_texts), len(data.texts_test))
    tr = [train_texts[i] for i in np.sort(rng.choice(len(train_texts), n_mem, replace=False))]
    ho = [data.texts_test[i] for i in np.sort(rng.choice(len(data.texts_test), n_mem, replace=False))]
    out["memorisation"] = {"ngram_overlap": _safe(ev.ngram_overlap, syn_texts, tr, ho, n=cfg.ngram)}
    n_nll = min(64, cfg.fidelity_records)
    out["heldout_nll_per_token"] = _heldout_nll(model, tok, prompts, classes, data, recipe.seed, recipe.model.max_length,
                                                n_nll)
    if hasattr(model, "disable_adapter"):  # the same records under the base model: did fine-tuning help?
        with model.disable_adapter():
            out["heldout_nll_per_token_base"] = _heldout_nll(model, tok, prompts, classes, data, recipe.seed,
                                                             recipe.model.max_length, n_nll)
    if canaries:
        out["canaries"] = canary_exposure(model, tok, canaries, prompts[classes[canaries[0]["label"]]], syn_texts,
                                          references=cfg.canary_references, max_length=recipe.model.max_length)
    return out


def _heldout_nll(model, tok, prompts, classes, data, seed: int, max_length: int, n: int = 64) -> float | None:
    """Mean NLL per text token of ``n`` real held-out records (those that fit max_length) under ``model`` (nats)."""
    from dptrain.synth.evaluate import sequence_nll

    def fits(i: int) -> bool:
        p, t = prompts[classes[data.y_test[i]]], data.texts_test[i]
        return len(tok(p, add_special_tokens=False)["input_ids"]) + len(tok(t, add_special_tokens=False)["input_ids"]) < max_length

    idx = [int(i) for i in np.random.default_rng([seed, 29]).permutation(len(data.texts_test)) if fits(int(i))][:n]
    ps = [prompts[classes[data.y_test[i]]] for i in idx]
    ts = [data.texts_test[i] for i in idx]
    if not idx:
        return None  # no held-out record fits max_length
    n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in ts)  # text + eos
    nll = sequence_nll(model, tok, ps, ts, max_length=max_length, batch_size=16)
    return float(nll.sum() / max(n_tok, 1))


def canary_exposure(model, tok, canaries, prompt: str, synthetic_texts: list[str], *, references: int,
                    max_length: int) -> dict[str, Any]:
    """Exposure (bits) of each inserted canary among ``references`` random same-format candidates, and
    whether any synthetic record contains a canary's secret."""
    from dptrain.synth.evaluate import canary_candidates, exposure, sequence_nll

    secrets_ = [c["text"] for c in canaries]
    refs = canary_candidates(np.random.default_rng(secrets.randbits(64)), references, exclude=secrets_)
    ref_nll = sequence_nll(model, tok, [prompt] * len(refs), refs, batch_size=64, max_length=max_length)
    can_nll = sequence_nll(model, tok, [prompt] * len(secrets_), secrets_, batch_size=64, max_length=max_length)
    rows = []
    for c, nll in zip(canaries, can_nll, strict=True):
        code = "".join(ch for ch in c["text"] if ch.isdigit())
        rows.append({"repetitions": c["repetitions"], "exposure_bits": exposure(float(nll), ref_nll),
                     "in_synthetic": any(code in t for t in synthetic_texts)})
    by_rep = {}
    for r in sorted({c["repetitions"] for c in canaries}):
        vals = [row["exposure_bits"] for row in rows if row["repetitions"] == r]
        by_rep[str(r)] = {"mean_exposure_bits": float(np.mean(vals)), "n": len(vals)}
    return {"references": len(refs), "max_measurable_bits": math.log2(len(refs) + 1), "by_repetitions": by_rep,
            "canaries": rows, "secret_in_synthetic": any(r["in_synthetic"] for r in rows),
            "note": "exposure = log2(candidates) - log2(rank), estimated from random same-format candidates "
                    "(Carlini et al. 2019); ~1 bit is chance, the maximum is log2(references + 1)"}


def dp_text_classifier(train_texts, train_y, test_texts, test_y, *, epsilon: float, delta: float, seed: int,
                       released_units: int, n_features: int = 2 ** 14, epochs: float = 30,
                       batch_size: int = 64) -> dict[str, Any]:
    """The downstream classifier trained on the real records with DP-SGD at the same (epsilon, delta).

    Features are data-independent (hashed binary 1-2 grams, L2-normalised per record: no vocabulary or IDF
    from the data, which would leak); logistic regression through THE loop and the Opacus backend."""
    import torch
    from sklearn.feature_extraction.text import HashingVectorizer

    from dptrain.config import parse_recipe
    from dptrain.evaluate.metrics import utility_metrics
    from dptrain.models.torch_models import build_torch_model
    from dptrain.trainers.loop import run_loop
    from dptrain.trainers.opacus_backend import OpacusTrainer

    vec = HashingVectorizer(ngram_range=(1, 2), n_features=n_features, alternate_sign=False, binary=True, norm="l2")
    x = vec.transform(train_texts).toarray().astype(np.float32)
    xt = vec.transform(test_texts).toarray().astype(np.float32)
    y = np.asarray(train_y, np.int64)
    rec = parse_recipe({"name": "dp-text-baseline", "data": {"source": "texts"}, "model": {"name": "logistic"},
                        "privacy": {"epsilon": epsilon, "delta": delta, "clipping_norm": 1.0},
                        "optimizer": {"name": "adam", "lr": 0.05},
                        "training": {"epochs": epochs, "batch_size": min(batch_size, released_units)},
                        "seed": seed})
    from dptrain.trainers.plan import UnitCount

    # q and the steps from the main run's released (DP) count: a private reference, no new release of n
    plan = PrivacyPlan.from_recipe(rec, UnitCount(int(released_units), "declared"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_torch_model(rec.model, n_features, 2)
    trainer = OpacusTrainer(rec.optimizer)
    dp_seed = secrets.randbits(63)
    trainer.init(model, plan, seed=seed, dp_seed=dp_seed)
    ledger = plan.new_ledger(run="dp-text-baseline")
    for label, event in plan.releases:
        ledger.compose(event, label=label)
    units = np.arange(len(y))
    run_loop(trainer, UnitSampler(units, len(y), plan.scheme, dp_seed=dp_seed), plan, ledger, x, y, units)
    m = utility_metrics(np.asarray(test_y), trainer.predict(xt)[:, 1])
    return {"accuracy": m["accuracy"], "auroc": m["auroc"], "epsilon": ledger.epsilon(delta), "delta": delta,
            "noise_multiplier": plan.noise_multiplier, "steps": plan.steps,
            "features": f"hashed binary 1-2 grams ({n_features}), L2-normalised", "optimizer": "adam 0.05, C=1"}


__all__ = ["DATACARD", "SYNTHETIC", "canary_exposure", "dp_text_classifier", "evaluate_synthetic", "synthesize"]
