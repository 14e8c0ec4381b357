"""PyTorch models for tables: an MLP and logistic regression (one linear layer)."""

from __future__ import annotations

from torch import nn

from dptrain.config import ModelConfig

_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def build_torch_model(cfg: ModelConfig, in_features: int, num_classes: int) -> nn.Module:
    """Logits model: ``in_features`` -> ``num_classes`` logits (2 for binary)."""
    if cfg.name == "logistic":
        return nn.Sequential(nn.Linear(in_features, num_classes))
    layers: list[nn.Module] = []
    width = in_features
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), _ACT[cfg.activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
