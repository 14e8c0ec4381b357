"""Which torch device a torch trainer runs on (imports torch: only the torch side uses it)."""

from __future__ import annotations

import torch

from dptrain.values import TrainerError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the CUDA GPU when torch has one, else the CPU; ``cuda`` without a GPU is refused clearly."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainerError("trainer.device: cuda, but this torch build sees no CUDA GPU (torch "
                           f"{torch.__version__}); use device: cpu or install a CUDA build of torch")
    return torch.device(name)


__all__ = ["resolve_device"]
