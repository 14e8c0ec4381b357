"""The Opacus backend against the shared trainer contract, plus Opacus-specific behaviour."""

import numpy as np
import pytest
import torch
from torch import nn

from dptrain.config import ModelConfig
from dptrain.models.torch_models import build_torch_model
from dptrain.trainers.base import TrainerError
from dptrain.trainers.opacus_backend import OpacusTrainer, check_model, secure_gaussian

from .contract import TrainerContract, make_plan


class OpacusContract(TrainerContract):
    mode = "hooks"

    def make_trainer(self, opt_cfg, **kw):
        return OpacusTrainer(opt_cfg, grad_sample_mode=self.mode, **kw)

    def make_model(self, in_features, num_classes, seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_torch_model(ModelConfig(hidden=[8]), in_features, num_classes)

    def params(self, trainer):
        return torch.cat([p.detach().reshape(-1) for p in trainer.module.parameters()]).numpy().astype(np.float64)

    def example_grad(self, trainer, x, y):
        model = trainer.module
        wrapper = getattr(trainer, "model", None)
        hooked = wrapper is not model and hasattr(wrapper, "disable_hooks")
        if hooked:
            wrapper.disable_hooks()  # plain autograd, without Opacus recording per-sample state
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y), reduction="sum")
        grads = torch.autograd.grad(loss, list(model.parameters()))
        if hooked:
            wrapper.enable_hooks()
        return torch.cat([g.reshape(-1) for g in grads]).numpy().astype(np.float64)


class TestOpacusHooks(OpacusContract):
    mode = "hooks"


class TestOpacusGhost(OpacusContract):
    mode = "ghost"

    def test_per_unit_clipping_bounds_each_unit(self, data):
        with pytest.raises(TrainerError, match="use grad_sample_mode: hooks"):
            super().test_per_unit_clipping_bounds_each_unit(data)


def test_batchnorm_refused_with_a_teaching_message_or_fixed():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(TrainerError, match="BatchNorm cannot be trained with DP.*GroupNorm"):
        check_model(model, fix=False)
    fixed = check_model(model, fix=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())


def test_secure_gaussian_has_unit_std():
    z = secure_gaussian(torch.Size([20000]), 1.0, torch.float64).numpy()
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03


def test_secure_rng_trainer_runs(data=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    tr = OpacusTrainer(OpacusContract.SGD, secure_rng=True)
    tr.init(OpacusContract().make_model(6, 2, 0), make_plan("dp", sigma=1.0, units=32), seed=0, dp_seed=0)
    a = OpacusContract().params(tr)
    from dptrain.trainers.base import Batch
    rows = np.arange(32)
    tr.dp_step(Batch(x[rows], y[rows], rows))
    assert not np.allclose(a, OpacusContract().params(tr))


def test_device_choice_is_explicit():
    import torch

    from dptrain.trainers.base import TrainerError
    from dptrain.trainers.opacus_backend import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainerError, match="trainer.device: cuda"):
            resolve_device("cuda")
