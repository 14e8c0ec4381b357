"""Pure text metrics for synthetic text: corpus statistics, distribution distances, n-gram memorisation and
k-NN precision/recall on embeddings. No model is loaded here (embeddings come from the caller, e.g.
:func:`dptrain.synth.scoring.load_sentence_encoder`).

Every function takes lists / arrays and returns a JSON-serialisable dict of plain floats and ints; none is
DP. Fed with real records, the outputs describe those records: publishing them is a release of its own,
outside any privacy guarantee (they belong in a run's ``private/``).

Word tokenisation everywhere is ``re.findall(r"\\w+", text.lower())``: lowercased runs of letters,
digits and underscore; punctuation is dropped ("patient's" -> "patient", "s").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased word tokens (``\\w+`` runs); the tokenisation all text metrics here share."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def text_list(texts, name: str, *, allow_empty: bool = False) -> list[str]:
    """``texts`` as a list of str; ValueError naming ``name`` for a single string, a non-str record or (unless
    ``allow_empty``) no texts at all."""
    if isinstance(texts, str):
        raise ValueError(f"{name}: expected a sequence of strings, got a single string")
    out = list(texts)
    bad = [type(t).__name__ for t in out if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{name}: every record must be a str, got {bad[0]}")
    if not out and not allow_empty:
        raise ValueError(f"{name}: no texts given")
    return out


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


def text_stats(texts) -> dict:
    """Length and diversity of a corpus (lowercased ``\\w+`` word tokens, see ``words``).

    ``distinct_n`` = unique n-grams / total n-grams, n-grams taken within each text and pooled over the
    corpus (0.0 when the corpus has no n-gram at all). Sharp edge: distinct-n falls as the corpus grows, so
    compare corpora of equal size. Returns ``{"n_texts", "mean_words", "median_words", "distinct_1",
    "distinct_2", "vocab_size"}``.
    """
    texts = text_list(texts, "texts")
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

    synth = [words(t) for t in text_list(synth_texts, "synth_texts")]
    real = [words(t) for t in text_list(real_texts, "real_texts")]
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
    synth = [words(t) for t in text_list(synth_texts, "synth_texts")]
    train = text_list(train_texts, "train_texts")
    heldout = text_list(heldout_texts, "heldout_texts")
    out: dict = {"n": int(n)}
    for name, corpus in (("train", train), ("heldout", heldout)):
        ref = {g for t in corpus for g in _ngrams(words(t), n)}
        out[f"{name}_overlap"] = float(np.mean([not ref.isdisjoint(_ngrams(t, n)) for t in synth]))
    out["excess_overlap"] = out["train_overlap"] - out["heldout_overlap"]
    out.update(n_synth=len(synth), n_synth_short=sum(len(t) < n for t in synth), n_train=len(train),
               n_heldout=len(heldout))
    return out


__all__ = ["distribution_distances", "knn_precision_recall", "ngram_overlap", "text_list", "text_stats", "words"]
