"""Evaluation of DP synthetic text against real records (records = text + binary label 0/1): downstream
utility (train on synthetic, test on real), fidelity, memorisation and canary exposure, gathered by
:func:`evaluate_synthetic` for ``dptrain synth``.

Not DP and not covered by the synthetic data's guarantee: every number here is computed from the real
training / held-out records (or the secret canaries), so the result belongs in the run's ``private/`` only.
A metric the synthetic text cannot support is recorded as ``{"skipped": why}``, never a crash.

The pieces: pure text metrics in :mod:`dptrain.synth.textmetrics`, scores under models in
:mod:`dptrain.synth.scoring`, canary exposure in :mod:`dptrain.audit.exposure`, the DP-SGD classifier on the
real records (a run of its own) in :mod:`dptrain.synth.baseline`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from dptrain.synth.textmetrics import text_list

CLASSIFIER = ("TF-IDF (1-2 grams, fitted on the classifier's training texts) + logistic regression; "
              "tested on the real held-out split. real_dp: the same task by DP-SGD logistic regression on "
              "hashed features of the real training records at the same epsilon -- a separate DP run "
              "(private/dp_baseline/: its own ledger and statement, charged to the dataset budget if the dataset "
              "has one) whose cost is not in this run's ledger: a private reference, never released")


def safe(fn, *args, **kwargs) -> dict[str, Any]:
    """``fn(*args, **kwargs)``, or ``{"skipped": why}`` when it raises ValueError (e.g. synthetic text without
    a single word, a DP run refused by the dataset budget); other errors propagate."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        return {"skipped": str(err)}


def _labels(y, n: int, name: str, texts_name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected shape (n,), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name}: has {arr.shape[0]} labels but {texts_name} has {n} texts; "
                         "fix: pass one label per text, in the same order")
    bad = np.setdiff1d(np.unique(arr), [0, 1])
    if bad.size:
        raise ValueError(f"{name}: labels must be 0 or 1, got other values {bad[:5].tolist()}")
    return arr.astype(np.int64)


def downstream(train_texts, train_y, test_texts, test_y, *, seed: int = 0) -> dict:
    """Train-on-synthetic, test-on-real: TF-IDF (1-2 grams) + logistic regression, scored on the test set.

    The vectoriser (``ngram_range=(1, 2)``, ``sublinear_tf=True``, ``min_df=1``) is fitted on the train
    texts only, so test-only words carry no weight. ``LogisticRegression(C=1.0, max_iter=2000,
    random_state=seed)``; the lbfgs solver is deterministic, so ``seed`` rarely matters.

    Returns ``{"accuracy", "balanced_accuracy", "auroc", "n_train"}`` (plus ``"n_test"``).
    Sharp edges:
      * train with one class only: no classifier is fitted; the metrics are those of always predicting that
        class, ``auroc = 0.5`` and a ``"note"`` says so.
      * test with one class only: AUROC is undefined and returned as ``None`` (strict JSON has no NaN),
        with a ``"note"``; balanced accuracy is then the recall of that one class.
      * sklearn's default token pattern drops one-character tokens (e.g. single digits).

    Raises ValueError (naming the argument) on length mismatches, labels other than 0/1, empty inputs,
    or train texts without a single word.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    train_texts = text_list(train_texts, "train_texts")
    test_texts = text_list(test_texts, "test_texts")
    ytr = _labels(train_y, len(train_texts), "train_y", "train_texts")
    yte = _labels(test_y, len(test_texts), "test_y", "test_texts")
    notes = []
    classes = np.unique(ytr)
    if classes.size == 1:
        pred = np.full(yte.shape, classes[0])
        score = None
        notes.append(f"train_y has one class ({int(classes[0])}): constant prediction, auroc set to 0.5")
    else:
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        try:
            xtr = vec.fit_transform(train_texts)
        except ValueError as e:  # "empty vocabulary"
            raise ValueError(f"train_texts: no word features ({e})") from e
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(xtr, ytr)
        xte = vec.transform(test_texts)
        pred = clf.predict(xte)
        score = clf.predict_proba(xte)[:, list(clf.classes_).index(1)]
    if score is None:
        auroc = 0.5
    elif np.unique(yte).size < 2:
        auroc = None
        notes.append("test_y has one class: auroc undefined (None)")
    else:
        auroc = float(roc_auc_score(yte, score))
    with warnings.catch_warnings():  # one-class y_true: sklearn warns, the recall of that class is returned
        warnings.simplefilter("ignore")
        bacc = float(balanced_accuracy_score(yte, pred))
    out = {"accuracy": float(accuracy_score(yte, pred)), "balanced_accuracy": bacc, "auroc": auroc,
           "n_train": len(train_texts), "n_test": len(test_texts)}
    if notes:
        out["note"] = "; ".join(notes)
    return out


def evaluate_synthetic(recipe, data, train_texts: list[str], train_y: np.ndarray, records, canaries, model, tok,
                       prompts: dict[str, str], *, real_dp: dict[str, Any] | None = None,
                       fine_tuned: bool = True) -> dict[str, Any]:
    """Downstream utility, fidelity, memorisation and canary exposure of the synthetic ``records``.

    ``train_texts`` / ``train_y``: the real records the LM was trained on; ``data``: the loaded text data (its
    held-out split is the test set); ``model``: the fine-tuned LM (with its LoRA adapters, to compare against
    the base model); ``fine_tuned=False`` (Private Evolution: the model is the public base model) skips the
    held-out NLL and measures canary exposure in the embedding space instead -- a canary's rank, among
    same-format references, by its similarity to the nearest synthetic record; ``real_dp``: the DP baseline's result (:mod:`dptrain.synth.baseline`), placed under
    ``downstream``. Uses the real records: the result is for the data owner, not covered by the DP guarantee."""
    from dptrain.audit.exposure import canary_exposure
    from dptrain.synth import scoring
    from dptrain.synth import textmetrics as tm

    cfg = recipe.synthesis.evaluation
    classes = data.classes
    max_length = recipe.model.max_length
    syn_texts = [r["text"] for r in records]
    syn_y = np.array([classes.index(r["label"]) for r in records], np.int64)
    out: dict[str, Any] = {"covered_by_dp": False}
    out["downstream"] = {
        "synthetic": safe(downstream, syn_texts, syn_y, data.texts_test, data.y_test, seed=recipe.seed),
        "real_non_private": downstream(train_texts, train_y, data.texts_test, data.y_test, seed=recipe.seed),
        "classifier": CLASSIFIER,
    }
    if real_dp is not None:
        out["downstream"]["real_dp"] = real_dp
    rng = np.random.default_rng([recipe.seed, 23])
    n_fid = min(cfg.fidelity_records, len(data.texts_test))
    real_fid = [data.texts_test[i] for i in np.sort(rng.choice(len(data.texts_test), n_fid, replace=False))]
    try:
        encoder = scoring.load_sentence_encoder()
        pr = safe(tm.knn_precision_recall, encoder(real_fid), encoder(syn_texts), k=5)
    except (ValueError, ImportError) as err:
        pr = {"skipped": str(err)}
    out["fidelity"] = {"knn_precision_recall_minilm": pr, "synthetic": safe(tm.text_stats, syn_texts),
                       "real_heldout": tm.text_stats(real_fid),
                       "distances": safe(tm.distribution_distances, syn_texts, real_fid)}
    n_mem = min(len(train_texts), len(data.texts_test))
    tr = [train_texts[i] for i in np.sort(rng.choice(len(train_texts), n_mem, replace=False))]
    ho = [data.texts_test[i] for i in np.sort(rng.choice(len(data.texts_test), n_mem, replace=False))]
    out["memorisation"] = {"ngram_overlap": safe(tm.ngram_overlap, syn_texts, tr, ho, n=cfg.ngram)}
    if fine_tuned:
        n_nll = min(64, cfg.fidelity_records)
        out["heldout_nll_per_token"] = scoring.heldout_nll(model, tok, prompts, classes, data, recipe.seed,
                                                           max_length, n_nll)
        if hasattr(model, "disable_adapter"):  # the same records under the base model: did fine-tuning help?
            with model.disable_adapter():
                out["heldout_nll_per_token_base"] = scoring.heldout_nll(model, tok, prompts, classes, data,
                                                                        recipe.seed, max_length, n_nll)
    if canaries and fine_tuned:
        prompt = prompts[classes[canaries[0]["label"]]]

        def score(texts: list[str]) -> np.ndarray:
            return scoring.sequence_nll(model, tok, [prompt] * len(texts), texts, batch_size=64,
                                        max_length=max_length)

        out["canaries"] = canary_exposure(score, canaries, syn_texts, references=cfg.canary_references)
    elif canaries:  # the released text is the only channel: is a canary closer to it than a random candidate?
        encoder = scoring.load_sentence_encoder()
        syn_emb = encoder(syn_texts)

        def score(texts: list[str]) -> np.ndarray:  # lower = closer to the synthetic data (like an NLL)
            return 1.0 - (encoder(texts) @ syn_emb.T).max(axis=1)

        out["canaries"] = canary_exposure(score, canaries, syn_texts, references=cfg.canary_references)
        out["canaries"]["score"] = "1 - cosine similarity to the nearest synthetic record (all-MiniLM-L6-v2)"
    return out


__all__ = ["CLASSIFIER", "downstream", "evaluate_synthetic", "safe"]
