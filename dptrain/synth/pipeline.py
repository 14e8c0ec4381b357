"""`dptrain synth`: DP fine-tuning of a causal LM, label-conditioned generation, evaluation, datacard.

Order (each step's privacy is accounted in one ledger, DESIGN invariant 1):

1. Real training records (optionally a seeded random subset: a public choice) + secret canary sentences
   (each copy its own privacy unit; inserted 1x / 10x to measure exposure). One record = one unit.
2. Generation targets per label: a Gaussian-noised label histogram (its event composed into the ledger as
   ``label_histogram``; the training noise is calibrated so histogram + training meet the target epsilon),
   or a declared public prior (no cost). Raw counts are never used.
3. LoRA adapters trained with THE loop on the Opacus backend (prefix-LM loss: the prompt is public and
   not learned); per-record clipping, Poisson sampling, noise once per step.
4. Generation (top-k / top-p, seeded) from the public prompt template: post-processing, no extra cost.
5. Evaluation against real held-out records (downstream TF-IDF + LR, fidelity, memorisation, canary
   exposure). The evaluation numbers use real data and are NOT covered by the guarantee (stated).

Crash safety as ``dptrain train``: an atomic checkpoint (adapters, optimiser, ledger, step, secret seed,
noisy label counts, canaries) per epoch; ``--resume`` continues without re-spending privacy.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import accounting as acc
from accounting._io import atomic_write_bytes, atomic_write_json
from dptrain.config import Recipe, dump_recipe
from dptrain.run import (
    CHECKPOINT,
    RunError,
    RunResult,
    _jsonable,
    _read_run_id,
    _versions,
    check_out_dir,
    fit,
)
from dptrain.trainers.base import TrainerError
from dptrain.trainers.checkpoint import load_checkpoint
from dptrain.trainers.plan import PrivacyPlan
from dptrain.trainers.sampler import UnitSampler

SYNTHETIC = "synthetic.jsonl"
DATACARD = "DATACARD.md"


def _load(recipe: Recipe):
    from dptrain.data.text import load_text

    d = recipe.data
    return load_text(d.source, text_column=d.text or "text", label_column=d.label or "label",
                     positive_label=d.positive_label, test_fraction=d.test_fraction, seed=recipe.seed)


def _subset(texts: list[str], size: int | None, seed: int) -> np.ndarray:
    """Indices of a random subset of about ``size`` records: each record is kept independently, by a keyed
    hash of its own text and the seed with probability size / n, so whether a record is used never depends
    on the other records (the guarantee then holds with respect to the whole pool, n treated as public)."""
    import hashlib

    n = len(texts)
    if size is None or size >= n:
        return np.arange(n)
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}\x00{t}".encode()).digest()[:8], "little") / 2.0 ** 64
                  for t in texts])
    return np.flatnonzero(u < size / n)


def _canaries(recipe: Recipe, classes: list[str]) -> list[dict[str, Any]]:
    """Secret canary records: ``count`` distinct sentences per repetition count, from OS entropy."""
    from dptrain.synth.evaluate import make_canaries

    ev = recipe.synthesis.evaluation
    if not ev.canaries:
        return []
    rng = np.random.default_rng(secrets.randbits(128))
    texts = make_canaries(rng, ev.canaries * len(ev.canary_repetitions))
    label = len(classes) - 1  # one public label for all canaries: one shared reference set
    return [{"text": t, "label": label, "repetitions": r}
            for t, r in zip(texts, [r for r in ev.canary_repetitions for _ in range(ev.canaries)], strict=True)]


def synthesize(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, dp_seed: int | None = None,
               progress: bool = True) -> RunResult:
    """Fine-tune, generate, evaluate; writes synthetic.jsonl, DATACARD.md, record.json (see module doc)."""
    import torch

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
    finished = check_out_dir(out, resume)
    if finished is not None:
        return RunResult(out, finished)

    # ---- validate before writing anything ----
    data = _load(recipe)
    if syn.prior is not None and len(syn.prior) != len(data.classes):
        raise RunError(f"synthesis.prior: {len(syn.prior)} weights for {len(data.classes)} classes {data.classes}; "
                       "give one weight per class")
    config_text = dump_recipe(recipe)
    if resume and (out / "config.yaml").exists() and (out / "config.yaml").read_text() != config_text:
        raise RunError(f"--resume: the recipe differs from {out / 'config.yaml'}; resume with the same recipe")
    keep = _subset(data.texts_train, syn.max_train_records, recipe.seed)
    texts = [data.texts_train[i] for i in keep]
    labels = data.y_train[keep].astype(np.int64)
    state = load_checkpoint(out / CHECKPOINT) if resume and (out / CHECKPOINT).exists() else None
    canaries = json.loads(state["canaries"]) if state else _canaries(recipe, data.classes)
    n_canary_rows = sum(c["repetitions"] for c in canaries)
    num_units = len(texts) + n_canary_rows
    # the number of units is public (as q = B/n is): the histogram is charged at the replace-one sensitivity
    # sqrt(2), so it stays DP when n is known (the add/remove sensitivity 1 would not)
    hist_event = (histogram_event(syn.histogram_noise_multiplier, acc.REPLACE_ONE)
                  if syn.label_counts == "dp_histogram" else None)
    plan = PrivacyPlan.from_recipe(recipe, num_units, "example",
                                   releases=(("label_histogram", hist_event),) if hist_event else ())
    if plan.mode == "dp" and plan.target_epsilon is not None and plan.planned_ledger().epsilon(plan.delta) > \
            plan.target_epsilon:  # calibration guarantees this never happens; check anyway
        raise RunError("plan: planned epsilon exceeds the target; refusing")
    model, tok = load_causal_lm(recipe.model.source)
    lm = recipe.model
    try:
        lora = add_lora(model, r=lm.lora.r, alpha=lm.lora.alpha, target_modules=lm.lora.target_modules,
                        top_layers=lm.lora.top_layers)
    except ValueError as err:
        raise TrainerError(f"model.lora: {err}") from None
    lora.to(resolve_device(recipe.trainer.device))
    prompts = {c: syn.prompt.format(label=c) for c in data.classes}
    for c in canaries:  # exposure scores whole canaries: they must fit untruncated
        need = len(tok(prompts[data.classes[c["label"]]] + c["text"], add_special_tokens=False)["input_ids"]) + 1
        if need > lm.max_length:
            raise RunError(f"model.max_length: {lm.max_length} tokens cannot hold a canary with its prompt ({need}); "
                           "raise model.max_length or shorten synthesis.prompt")
    all_texts = texts + [c["text"] for c in canaries for _ in range(c["repetitions"])]
    all_labels = np.concatenate([labels, np.array([c["label"] for c in canaries for _ in range(c["repetitions"])],
                                                  np.int64)])
    x_tok, y_tok = encode_records(tok, [prompts[data.classes[k]] for k in all_labels], all_texts,
                                  max_length=lm.max_length)

    # ---- start or resume ----
    out.mkdir(parents=True, exist_ok=True)
    metrics: list[dict[str, Any]] = []
    if state is not None:
        ledger = acc.PrivacyLedger.from_dict(json.loads(state["ledger"]))
        dp_seed, start = int(state["dp_seed"]), int(state["step"])
        metrics = json.loads(state["metrics"])
        noisy = np.array(json.loads(state["noisy_label_counts"]), float) if hist_event else None
    else:
        dp_seed = secrets.randbits(63) if dp_seed is None else int(dp_seed)
        ledger, start = plan.new_ledger(run=out.name, recipe=recipe.name), 0
        noisy = None
        if hist_event is not None:
            noisy, event = dp_label_counts(labels, len(data.classes), noise_multiplier=syn.histogram_noise_multiplier,
                                           relation=acc.REPLACE_ONE, secure=recipe.privacy.secure_rng)
            ledger.compose(event, label="label_histogram")
        atomic_write_bytes(out / "config.yaml", config_text.encode())
        atomic_write_bytes(out / "run_id", f"{out.name}-{uuid.uuid4().hex[:12]}".encode())
    extra = {"canaries": json.dumps(canaries), "noisy_label_counts": json.dumps(None if noisy is None else noisy.tolist())}

    cache_below = lm.lora.top_layers if lm.lora.top_layers and lm.lora.cache_frozen_layers else None
    t0 = time.time()
    if start < plan.steps:
        with _bar(len(x_tok), "caching frozen layers", progress and cache_below is not None) as bar:
            task = PrefixLMTask(lora, x_tok, cache_below=cache_below, progress=bar.update)
    else:
        task = PrefixLMTask(lora, x_tok)
    trainer = OpacusTrainer(recipe.optimizer, max_physical_batch_size=recipe.trainer.max_physical_batch_size,
                            secure_rng=recipe.privacy.secure_rng, task=task, device=recipe.trainer.device)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        trainer.init(lora, plan, seed=recipe.seed, dp_seed=dp_seed)
    if state is not None:
        trainer.load_state_dict(state["trainer"])
    rows = np.arange(len(x_tok))[:, None]
    sampler = UnitSampler(np.arange(num_units), num_units, plan.scheme, dp_seed=dp_seed,
                          secure=recipe.privacy.secure_rng)
    fit(trainer, sampler, plan, ledger, rows, y_tok, np.arange(num_units), out, start=start, dp_seed=dp_seed,
        metrics=metrics, progress=progress, log_loss=not canaries, state_extra=extra)
    train_seconds = time.time() - t0
    ledger.save(out / "ledger.json")

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
    atomic_write_bytes(out / SYNTHETIC, "".join(json.dumps(r) + "\n" for r in records).encode())

    # the released model: LoRA adapters only (checkpoint.pt also holds the secret noise seed: never publish it)
    model_out.save_pretrained(out / "adapters")

    # ---- evaluate (uses the real training and held-out records: not covered by the guarantee) ----
    from dptrain.run import privacy_statement

    statement = privacy_statement(plan, ledger, recipe)
    sens = acc.histogram_sensitivity(acc.REPLACE_ONE)
    statement["releases"] = {"label_histogram": None if hist_event is None else {
        "noise_std": syn.histogram_noise_multiplier * sens, "l2_sensitivity": sens}}
    statement["public"] = ("the number of training records (n; q = B/n as in all DP-SGD accounting), the base "
                           "model, tokenizer, prompt template and label names, the recipe")
    statement["covers"] = ("the training records (one record = one unit) for what is meant for release: "
                           "synthetic.jsonl, adapters/, the noisy label counts. NOT covered: the evaluation "
                           "(computed on the real training and held-out records, including a separate DP "
                           "classifier run) and checkpoint.pt (it holds the secret noise seed); keep both private")
    t2 = time.time()
    evaluation = evaluate_synthetic(recipe, data, texts, labels, records, canaries, model_out, tok, prompts,
                                    statement, progress=progress)
    record = {
        "format": "dptrain.synth-record/1",
        "status": "finished",
        "recipe": recipe.name,
        "privacy": statement,
        "label_counts": {"mode": syn.label_counts,
                         "noisy_counts": None if noisy is None else dict(zip(data.classes, noisy.tolist(), strict=True)),
                         "prior": syn.prior, "generated": dict(zip(data.classes, targets.tolist(), strict=True))},
        "model": {"source": lm.source, "lora": lm.lora.model_dump(), "max_length": lm.max_length,
                  "trainable_parameters": int(sum(p.numel() for p in trainer.parameters()))},
        "generation": gen.model_dump(),
        "data": {"source": data.source, "classes": data.classes, "n_train_available": len(data.texts_train),
                 "n_train_used": len(texts), "n_test": len(data.texts_test), "canary_rows": n_canary_rows,
                 "num_units": num_units, "privacy_unit": "record", "preprocessing": data.preprocessing},
        "evaluation": evaluation,
        "metrics": metrics,
        "timing_seconds": {"training_this_session": round(train_seconds, 1), "generation": round(gen_seconds, 1),
                           "evaluation": round(time.time() - t2, 1)},
        "files": {"synthetic": SYNTHETIC, "datacard": DATACARD, "ledger": "ledger.json", "adapters": "adapters/",
                  "private": ["checkpoint.pt (secret noise seed, canaries)"]},
        "run_id": _read_run_id(out),
        "versions": _versions(),
    }
    record = _jsonable(record)
    from dptrain.synth.datacard import render_datacard

    atomic_write_bytes(out / DATACARD, render_datacard(record).encode())
    atomic_write_json(out / "record.json", record)
    return RunResult(out, record)


class _bar:
    """A tqdm bar usable as a context manager whose ``update`` takes a count (disabled: no output)."""

    def __init__(self, total: int, desc: str, enabled: bool):
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
                      "whose cost is not in this run's ledger (a reference, not for release)",
    }
    eps = statement["epsilon"]
    if cfg.dp_baseline and eps != "inf":
        out["downstream"]["real_dp"] = dp_text_classifier(
            train_texts, train_y, data.texts_test, data.y_test, epsilon=float(eps), delta=statement["delta"],
            seed=recipe.seed)
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
                       n_features: int = 2 ** 14, epochs: float = 30, batch_size: int = 64) -> dict[str, Any]:
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
                        "training": {"epochs": epochs, "batch_size": min(batch_size, len(y))}, "seed": seed})
    plan = PrivacyPlan.from_recipe(rec, len(y))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_torch_model(rec.model, n_features, 2)
    trainer = OpacusTrainer(rec.optimizer)
    dp_seed = secrets.randbits(63)
    trainer.init(model, plan, seed=seed, dp_seed=dp_seed)
    ledger = plan.new_ledger(run="dp-text-baseline")
    units = np.arange(len(y))
    run_loop(trainer, UnitSampler(units, len(y), plan.scheme, dp_seed=dp_seed), plan, ledger, x, y, units)
    m = utility_metrics(np.asarray(test_y), trainer.predict(xt)[:, 1])
    return {"accuracy": m["accuracy"], "auroc": m["auroc"], "epsilon": ledger.epsilon(delta), "delta": delta,
            "noise_multiplier": plan.noise_multiplier, "steps": plan.steps,
            "features": f"hashed binary 1-2 grams ({n_features}), L2-normalised", "optimizer": "adam 0.05, C=1"}


__all__ = ["DATACARD", "SYNTHETIC", "canary_exposure", "dp_text_classifier", "evaluate_synthetic", "synthesize"]
