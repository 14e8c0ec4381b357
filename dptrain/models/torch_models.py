"""PyTorch models: an MLP and logistic regression for tables; a MONAI CNN (GroupNorm) or a public pretrained
backbone (:mod:`dptrain.models.backbones`) for images."""

from __future__ import annotations

import torch
from torch import nn

from dptrain.config import ModelConfig

_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (per output channel: zero mean, unit variance; Qiao et al. 2019).

    Opacus has no dedicated per-sample gradient rule for it and computes them with functorch (slower)."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias)


def _standardise_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            ws = WSConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                          bias=child.bias is not None)
            ws.load_state_dict(child.state_dict())
            setattr(module, name, ws)
        else:
            _standardise_convs(child)


def build_cnn(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """MONAI ``Classifier``: conv(stride)-GroupNorm-ReLU blocks, a last conv, flatten, linear."""
    from monai.networks.nets import Classifier

    if len(cfg.channels) != len(cfg.strides):
        raise ValueError(f"model.channels ({len(cfg.channels)}) and model.strides ({len(cfg.strides)}) must have "
                         "the same length")
    bad = [c for c in cfg.channels[:-1] if c % cfg.groups]
    if bad:
        raise ValueError(f"model.groups={cfg.groups} must divide every model.channels entry but the last; "
                         f"{bad} do not")
    net = Classifier(in_shape=tuple(in_shape), classes=num_classes, channels=tuple(cfg.channels),
                     strides=tuple(cfg.strides), kernel_size=3, num_res_units=0, act="relu",
                     norm=("group", {"num_groups": cfg.groups}))
    if cfg.weight_standardization:
        _standardise_convs(net)
    return net


def build_torch_model(cfg: ModelConfig, in_features: int | tuple[int, ...], num_classes: int, *,
                      pretrained: bool = True) -> nn.Module:
    """Logits model: ``in_features`` (tables) or an image shape (C, H, W) -> ``num_classes`` logits.

    ``pretrained=False`` (a released model's skeleton) does not read ``model.backbone``'s weights file."""
    if cfg.name == "pretrained":
        from dptrain.models.backbones import build_torch_backbone_classifier

        if isinstance(in_features, int):
            raise ValueError("model.name: pretrained needs image data (data.image or builtin:br35h); use mlp for "
                             "tables")
        return build_torch_backbone_classifier(cfg.backbone if pretrained else None, in_features, num_classes,
                                               cfg.finetune)
    if cfg.name == "cnn":
        if isinstance(in_features, int):
            raise ValueError("model.name: cnn needs image data (data.image or builtin:br35h); use mlp for tables")
        return build_cnn(cfg, in_features, num_classes)
    if not isinstance(in_features, int):
        raise ValueError(f"model.name: {cfg.name} is for tables; use model.name: cnn for images")
    if cfg.name == "logistic":
        return nn.Sequential(nn.Linear(in_features, num_classes))
    layers: list[nn.Module] = []
    width = in_features
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), _ACT[cfg.activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
