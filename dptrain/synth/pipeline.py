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
6. Evaluation against real records (downstream TF-IDF + LR, fidelity, memorisation, canary exposure;
   :mod:`dptrain.synth.evaluate`): NOT covered by the guarantee, written to ``private/`` only. The DP-SGD
   classifier on the real records is a run of its own in ``private/dp_baseline/`` (:mod:`dptrain.synth.baseline`:
   its own ledger, charged to the dataset budget like any run), reusing this run's released record count.

The run lifecycle (directory, resume, budget, release boundary) is :mod:`dptrain.lifecycle`'s.
``release/``: synthetic.jsonl, DATACARD.md (statement, generation settings, statistics of the synthetic
text only), adapters/ (LoRA weights), privacy.json, ledger.json, config.yaml. ``private/``: record.json and
evaluation.md (the evaluation against real records), state.json (noisy counts, the secret canaries),
metrics.jsonl, the checkpoint while the run is unfinished, dp_baseline/ (the baseline's run directory).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from accounting.atomic import atomic_write_bytes
from dptrain.config import Recipe
from dptrain.lifecycle import RunError, RunResult, Session, run_statement
from dptrain.synth.evaluate import evaluate_synthetic, safe
from dptrain.trainers.base import TrainerError
from dptrain.trainers.sampler import UnitSampler

SYNTHETIC = "synthetic.jsonl"
DATACARD = "DATACARD.md"
EVALUATION = "evaluation.md"
COVERS = ("the training records (add/remove one record) for everything under release/: synthetic.jsonl, "
          "DATACARD.md, adapters/ (the LoRA weights), the records per label drawn from the noisy label counts, this statement and the ledger. NOT "
          "covered, never to be published: private/ (the evaluation computed on the real training and held-out "
          "records, including a separate DP classifier run; the secret canaries; the checkpoint with the secret "
          "noise seed)")
PE_COVERS = ("the training records (add/remove one record) for everything under release/: synthetic.jsonl, "
             "DATACARD.md, the records per label drawn from the noisy label counts, this statement and the ledger (its steps are Private Evolution's "
             "vote rounds: every record votes once per round for its nearest candidate, a histogram of L2 "
             "sensitivity 1 released with Gaussian noise). NOT covered, never to be published: private/ (the "
             "evaluation on real records, including a separate DP classifier run; the secret canaries; the "
             "checkpoint with the secret noise seed and the candidates)")
PE_PUBLIC = ("the base model, tokenizer, prompt template, topics and label names, the sentence encoder "
             "(all-MiniLM-L6-v2), the recipe, and the number of records as stated in 'units'")
PUBLIC = ("the base model, tokenizer, prompt template and label names, the recipe (incl. synthesis.train_fraction), "
          "and the number of records as stated in 'units'")


def _load(recipe: Recipe):
    """The text records and the model source, checked before anything heavy is loaded or anything written: data
    that can train and test a classifier (:func:`~dptrain.data.text.check_text_trainable`, a public rule; no count
    is quoted) and a ``model.source`` that can be a causal LM (:func:`~dptrain.synth.lm.check_model_source`)."""
    from dptrain.data.text import check_text_trainable, load_text_from_config
    from dptrain.synth.lm import check_model_source

    data = load_text_from_config(recipe.data)
    check_text_trainable(data)
    check_model_source(recipe.model.source)
    return data


def _check_subset(labels: np.ndarray, num_classes: int, fraction: float | None) -> None:
    """The records kept by ``synthesis.train_fraction`` must still meet the rule of the training split."""
    from dptrain.data.core import MIN_TRAIN_UNITS, TRAINABLE_RULE, DataError

    if fraction is not None and (len(labels) < MIN_TRAIN_UNITS or len(np.unique(labels)) < num_classes):
        raise DataError(f"synthesis.train_fraction: the share {fraction} of the training records leaves too few "
                        f"records or not every class (the rule: {TRAINABLE_RULE}); fix: a larger "
                        "synthesis.train_fraction, or more data")


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
    from dptrain.audit.exposure import make_canary_sentences

    ev = recipe.synthesis.evaluation
    if not ev.canaries:
        return []
    rng = rng or np.random.default_rng(secrets.randbits(128))
    texts = make_canary_sentences(rng, ev.canaries * len(ev.canary_repetitions))
    label = len(classes) - 1  # one public label for all canaries: one shared reference set
    return [{"text": t, "label": label, "repetitions": r}
            for t, r in zip(texts, [r for r in ev.canary_repetitions for _ in range(ev.canaries)], strict=True)]


def synthesize(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, dp_seed: int | None = None,
               progress: bool = True, keep_checkpoint: bool = False) -> RunResult:
    """Fine-tune, generate, evaluate; see the module docstring for what goes where."""
    if recipe.synthesis is None:
        raise RunError("synthesis: this recipe has no synthesis section; `dptrain synth` needs model.name: "
                       "causal_lm and a synthesis section (see recipes/iu-xray-reports-synth.yaml)")
    if recipe.trainer.grad_sample_mode != "hooks":
        raise RunError("trainer.grad_sample_mode: LM fine-tuning uses per-sample hooks; set grad_sample_mode: hooks")
    out = Path(out_dir)
    # the shared check refuses torchrun: data-parallel LM fine-tuning is not supported yet
    with Session(recipe, out, resume=resume, keep_checkpoint=keep_checkpoint, command="synth",
                 data_parallel=False) as session:
        if session.finished is not None:
            return RunResult(out, session.finished)
        return _synthesize(session, recipe, out, resume=resume, dp_seed=dp_seed, progress=progress)


def _synthesize(session: Session, recipe: Recipe, out: Path, *, resume: bool, dp_seed: int | None,
                progress: bool) -> RunResult:
    from dptrain.config_synth import fill_prompt
    from dptrain.data.identity import dataset_identity
    from dptrain.synth.histogram import dp_label_counts, histogram_event, records_per_label
    from dptrain.synth.lm import load_causal_lm

    syn = recipe.synthesis
    rd = session.rd
    pe = syn.method == "private_evolution"

    # ---- validate before writing anything ----
    data = _load(recipe)
    if syn.prior is not None and len(syn.prior) != len(data.classes):
        raise RunError(f"synthesis.prior: {len(syn.prior)} weights for the {len(data.classes)} declared classes "
                       f"{data.classes}; give one weight per class")
    if syn.topics is not None and sorted(syn.topics) != sorted(data.classes):
        raise RunError(f"synthesis.topics: keys {sorted(syn.topics)} must be the declared classes {data.classes}; "
                       "give one topic list per class")
    keep = _subset(data.texts_train, syn.train_fraction, recipe.seed)
    texts = [data.texts_train[i] for i in keep]
    labels = data.y_train[keep].astype(np.int64)
    _check_subset(labels, len(data.classes), syn.train_fraction)
    ev_cfg = syn.evaluation
    n_canary_rows = ev_cfg.canaries * sum(ev_cfg.canary_repetitions)  # public: from the recipe
    hist_event = histogram_event(syn.histogram_noise_multiplier) if syn.label_counts == "dp_histogram" else None
    from dptrain.synth.pe import pe_plan

    plan = session.make_plan(len(texts), public_extra=n_canary_rows, privacy_unit="example",
                             releases=(("label_histogram", hist_event),) if hist_event else (),
                             build=pe_plan if pe else None)
    model, tok = load_causal_lm(recipe.model.source)
    prompts = {c: fill_prompt(syn.prompt, c) for c in data.classes}
    lm = recipe.model
    for c in _canaries(recipe, data.classes, np.random.default_rng(0)):  # same format as the secret ones
        need = len(tok(prompts[data.classes[c["label"]]] + c["text"], add_special_tokens=False)["input_ids"]) + 1
        if need > lm.max_length and not pe:
            raise RunError(f"model.max_length: {lm.max_length} tokens cannot hold a canary with its prompt ({need}); "
                           "raise model.max_length or shorten synthesis.prompt")
    dataset_id = dataset_identity(recipe.data)
    session.reserve_budget(dataset_id)

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
    weights = noisy if noisy is not None else np.asarray(syn.prior, float)
    targets = records_per_label(weights, syn.records)
    t0 = time.time()
    if pe:
        records, model_out, info = _evolve(session, recipe, data, model, tok, all_texts, all_labels, targets,
                                           progress=progress)
        train_seconds, gen_seconds = 0.0, time.time() - t0
    else:
        model_out, info = _finetune(session, recipe, model, tok, prompts, all_texts, all_labels, data.classes,
                                    log_loss=not canaries, progress=progress)
        train_seconds = time.time() - t0
        records, gen_seconds = _sample(model_out, tok, prompts, targets, data.classes, syn.generation, progress)
    session.settle()  # a budget refusal stops the run before anything is released
    out_side = session.release_dir()  # release/ for a DP run, private/NOT-PRIVATE/ otherwise
    atomic_write_bytes(out_side / SYNTHETIC, "".join(json.dumps(r) + "\n" for r in records).encode())
    if not pe:
        model_out.save_pretrained(out_side / "adapters")  # the released model: LoRA adapters only

    # ---- evaluate (uses the real training and held-out records: private) ----
    releases = {} if hist_event is None else {"label_histogram": {
        "noise_std": syn.histogram_noise_multiplier, "l2_sensitivity": 1.0}}
    statement = run_statement(plan, session.ledger, recipe, session.count, releases=releases,
                              covers=PE_COVERS if pe else COVERS, public=PE_PUBLIC if pe else PUBLIC)
    t2 = time.time()
    real_dp = None
    if ev_cfg.dp_baseline and statement.is_private:  # a second DP run on the same records: private
        from dptrain.synth.baseline import BASELINE_DIR, dp_text_classifier

        # this run's released count (never a new draw, never the exact n); a failure is recorded, not raised
        real_dp = safe(dp_text_classifier, rd.private / BASELINE_DIR, texts, labels, data.texts_test, data.y_test,
                       epsilon=statement.epsilon, delta=statement.delta, seed=recipe.seed,
                       released_units=statement.units.value, dataset_id=dataset_id,
                       dataset_budget=recipe.privacy.dataset_budget, resume=resume, progress=progress)
    evaluation = evaluate_synthetic(recipe, data, texts, labels, records, canaries, model_out, tok, prompts,
                                    real_dp=real_dp, fine_tuned=not pe)
    from dptrain.synth.datacard import render_datacard
    from dptrain.synth.textmetrics import text_stats

    record = {
        "command": "synth",
        "method": syn.method,
        "label_counts": {"mode": syn.label_counts,
                         "noisy_counts": None if noisy is None else dict(zip(data.classes, noisy.tolist(), strict=True)),
                         "prior": syn.prior, "generated": dict(zip(data.classes, targets.tolist(), strict=True))},
        "model": {"source": lm.source, "max_length": lm.max_length, **info},
        "generation": syn.generation.model_dump(),
        "synthetic_stats": safe(text_stats, [r["text"] for r in records]),
        "data": {"source": data.source, "classes": data.classes, "n_train_available": len(data.texts_train),
                 "n_train_used": len(texts), "n_test": len(data.texts_test), "canary_rows": n_canary_rows,
                 "num_units": len(all_texts), "privacy_unit": "example", "train_fraction": syn.train_fraction,
                 "preprocessing": data.preprocessing,
                 "note": "exact counts: private (the statement releases only 'units')"},
        "evaluation": evaluation,
        "timing_seconds": {"training_this_session": round(train_seconds, 1), "generation": round(gen_seconds, 1),
                           "evaluation": round(time.time() - t2, 1)},
    }
    from dptrain.lifecycle import software_versions

    full = {**record, "recipe": recipe.name, "versions": software_versions()}
    atomic_write_bytes(out_side / DATACARD, render_datacard(full, statement, public=True).encode())
    atomic_write_bytes(rd.private / EVALUATION, render_datacard(full, statement, public=False).encode())
    record = session.finish(statement, record)
    return RunResult(out, record)


def _finetune(session: Session, recipe: Recipe, model, tok, prompts: dict[str, str], all_texts: list[str],
              all_labels: np.ndarray, classes: list[str], *, log_loss: bool, progress: bool):
    """DP fine-tuning of LoRA adapters through THE loop (resumable); returns (model, record info)."""
    import torch

    from dptrain.synth.lm import PrefixLMTask, add_lora, encode_records
    from dptrain.trainers.opacus_backend import OpacusTrainer, resolve_device

    lm, plan = recipe.model, session.plan
    try:
        lora = add_lora(model, r=lm.lora.r, alpha=lm.lora.alpha, target_modules=lm.lora.target_modules,
                        top_layers=lm.lora.top_layers)
    except ValueError as err:
        raise TrainerError(f"model.lora: {err}") from None
    lora.to(resolve_device(recipe.trainer.device))
    x_tok, y_tok = encode_records(tok, [prompts[classes[k]] for k in all_labels], all_texts,
                                  max_length=lm.max_length)
    num_units = len(all_texts)
    cache_below = lm.lora.top_layers if lm.lora.top_layers and lm.lora.cache_frozen_layers else None
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
    session.restore(trainer)
    rows = np.arange(len(x_tok))[:, None]
    sampler = UnitSampler(np.arange(num_units), num_units, plan.scheme, dp_seed=session.dp_seed,
                          secure=recipe.privacy.secure_rng)
    session.fit(trainer, sampler, rows, y_tok, np.arange(num_units), progress=progress, log_loss=log_loss)
    return trainer.trained_model(), {"lora": lm.lora.model_dump(),
                                     "trainable_parameters": trainer.num_trainable_parameters()}


def _sample(model, tok, prompts: dict[str, str], targets: np.ndarray, classes: list[str], gen, progress: bool):
    """``targets[k]`` samples per class from the fine-tuned model (post-processing); (records, seconds)."""
    from dptrain.synth.lm import generate

    records: list[dict[str, str]] = []
    t1 = time.time()
    with _bar(int(targets.sum()), "generating", progress) as bar:
        for k, c in enumerate(classes):
            for text in generate(model, tok, prompts[c], int(targets[k]), top_k=gen.top_k, top_p=gen.top_p,
                                 temperature=gen.temperature, max_new_tokens=gen.max_new_tokens,
                                 batch_size=gen.batch_size, seed=gen.seed + 1000 * k, progress=bar.update):
                records.append({"text": text, "label": c})
    return records, time.time() - t1


def _evolve(session: Session, recipe: Recipe, data, model, tok, all_texts: list[str], all_labels: np.ndarray,
            targets: np.ndarray, *, progress: bool):
    """Private Evolution (:mod:`dptrain.synth.pe`) with the session's ledger and checkpoint: the state after
    every round (population, round, ledger with that round's release) is saved atomically to the checkpoint,
    so a resumed run continues from the last finished round and never re-spends one. (records, model, info)."""
    from accounting.statement import encode_float
    from dptrain.config_synth import fill_prompt
    from dptrain.rundir import recipe_hash
    from dptrain.synth.lm import generate_many
    from dptrain.synth.pe import PEConfigView, evolve
    from dptrain.synth.scoring import load_sentence_encoder
    from dptrain.trainers.checkpoint import save_checkpoint

    syn, plan, rd, ledger = recipe.synthesis, session.plan, session.rd, session.ledger
    pe, gen = syn.private_evolution, syn.generation
    topics = syn.topics or {c: [""] for c in data.classes}
    prompts = {k: [fill_prompt(syn.prompt, c, t) for t in topics[c]] for k, c in enumerate(data.classes)}
    log = (lambda msg: print(f"private evolution: {msg}", flush=True)) if progress else None
    encoder = load_sentence_encoder()
    private_emb = encoder(all_texts)
    restored = session.checkpoint["trainer"]["pe"] if session.checkpoint is not None else None
    session.checkpoint = None
    if restored is not None and int(restored["round"]) != ledger.steps:
        raise RunError(f"--resume: {rd.checkpoint} holds round {restored['round']} but its ledger {ledger.steps} "
                       "rounds; start a new run")

    def on_round(state: dict[str, Any]) -> None:
        released = state.pop("released")
        if released is not None:
            ledger.compose(plan.step_event(released["round"]))
            session.metrics.append({"round": released["round"] + 1, "step": ledger.steps,
                                    "epsilon_upper_bound": encode_float(ledger.epsilon(plan.delta, quick=True))})
        save_checkpoint(rd.checkpoint, {"trainer": {"pe": state}, "ledger": json.dumps(ledger.to_dict()),
                                        "step": ledger.steps, "recipe_sha256": recipe_hash(session.config_text),
                                        "dp_seed": session.dp_seed, "metrics": json.dumps(session.metrics)})
        ledger.save(rd.ledger)

    def generate(ps: list[str], seed: int, budgets: list[int] | None) -> list[str]:
        caps = gen.max_new_tokens if budgets is None else [min(b, gen.max_new_tokens) for b in budgets]
        with _bar(len(ps), "generating", progress) as bar:
            return generate_many(model, tok, ps, top_k=gen.top_k, top_p=gen.top_p, temperature=gen.temperature,
                                 max_new_tokens=caps, batch_size=gen.batch_size, seed=gen.seed + seed,
                                 progress=bar.update)

    cfg = PEConfigView(rounds=pe.rounds, oversample=pe.oversample, elite_fraction=pe.elite_fraction,
                       threshold=pe.threshold, variation_keep=pe.variation_keep)
    out, _ = evolve(prompts=prompts, targets={k: int(t) for k, t in enumerate(targets)}, private_emb=private_emb,
                    private_labels=all_labels, embed=encoder, generate=generate, cfg=cfg,
                    sigma=plan.noise_multiplier, dp_seed=session.dp_seed, seed=recipe.seed,
                    secure=recipe.privacy.secure_rng, state=restored, on_round=on_round, progress=log)
    records = [{"text": t, "label": data.classes[k]} for k, t in out]
    return records, model, {"method": "private_evolution", "private_evolution": pe.model_dump(),
                            "topics": syn.topics, "embedding": "all-MiniLM-L6-v2 (public)"}


class _bar:
    """A tqdm bar usable as a context manager whose ``update`` takes a count (disabled: no output)."""

    def __init__(self, total: int | None, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()


__all__ = ["DATACARD", "SYNTHETIC", "synthesize"]
