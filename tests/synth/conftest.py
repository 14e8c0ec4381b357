"""The tiny randomly initialised Llama (word-level vocabulary, digits split one by one) the synth tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = ["<eos>", "<unk>", "report", "(normal):", "(abnormal):", "heart", "size", "is", "normal", "lungs", "clear",
         "effusion", "no", "small", "left"] + [str(i) for i in range(10)]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Digits(individual_digits=True)])
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0,
                      pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d
