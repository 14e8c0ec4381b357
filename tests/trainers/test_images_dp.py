"""Image CNNs under DP on both backends: patient-level clipping, augmentation multiplicity, EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import accounting as acc
from dptrain.config import ModelConfig, OptimizerConfig
from dptrain.data.augment import flip_shift, make_augmenter
from dptrain.models.flax_models import build_flax_model
from dptrain.models.torch_models import build_torch_model
from dptrain.trainers.base import Batch, TrainerError
from dptrain.trainers.jax_backend import JaxTrainer
from dptrain.trainers.opacus_backend import OpacusTrainer
from dptrain.trainers.plan import PrivacyPlan

SHAPE = (1, 16, 16)
CNN = ModelConfig(name="cnn", channels=[8, 8], strides=[2, 2], groups=4)
SGD = OptimizerConfig(name="sgd", lr=1.0, momentum=0.0)


def plan(mode="clip_only", *, clip=0.01, unit="patient", units=2, sigma=0.0):
    return PrivacyPlan(scheme=acc.PoissonSampling(1.0 / units), noise_multiplier=sigma, clipping_norm=clip, steps=5,
                       expected_batch_size=1.0, delta=1e-5, accountant="pld", mode=mode, privacy_unit=unit,
                       size=units)


def trainer(backend, p, ema=None):
    if backend == "opacus":
        tr = OpacusTrainer(SGD)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_torch_model(CNN, SHAPE, 2)
    else:
        tr = JaxTrainer(SGD)
        model = build_flax_model(CNN, SHAPE, 2)
    tr.init(model, p, seed=0, dp_seed=1, ema=ema)
    return tr


def params(tr) -> np.ndarray:
    if isinstance(tr, OpacusTrainer):
        return torch.cat([q.detach().reshape(-1) for q in tr.module.parameters()]).numpy().astype(np.float64)
    return tr.flat_params().astype(np.float64)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.integers(0, 2, n)


@pytest.mark.parametrize("backend", ["opacus", "jax"])
def test_patient_with_50_images_moves_the_sum_no_more_than_one_with_1(backend):
    clip = 0.01
    x, y = images(51)
    y[:] = 1  # one label: the 50 images' gradients align
    units = np.r_[np.zeros(50, np.int64), 1]
    moves = {}
    for name, rows in {"fifty": np.arange(50), "one": np.array([50])}.items():
        tr = trainer(backend, plan(clip=clip))
        before = params(tr)
        tr.dp_step(Batch(x[rows], y[rows], units[rows]))
        moves[name] = np.linalg.norm(params(tr) - before)  # lr 1, expected batch 1: |clipped unit gradient|
    assert moves["fifty"] <= clip * (1 + 1e-4) and moves["one"] <= clip * (1 + 1e-4)
    assert moves["fifty"] > 0.5 * clip  # clipping is active, not a no-op
    # per image, the same 50 images move the parameters up to 50 clips: the guarantee is per image only
    tr = trainer(backend, plan(clip=clip, unit="example", units=51))
    before = params(tr)
    tr.dp_step(Batch(x[:50], y[:50], np.arange(50)))
    assert np.linalg.norm(params(tr) - before) > 10 * clip


@pytest.mark.parametrize("backend", ["opacus", "jax"])
def test_augmentation_multiplicity_averages_before_clipping(backend):
    clip = 0.01
    x, y = images(6, seed=1)
    units = np.arange(6)
    # K identical copies with weight 1/K: exactly the update of one copy
    ref = trainer(backend, plan(clip=clip, unit="example", units=6))
    ref.dp_step(Batch(x, y, units))
    k = 4
    tr = trainer(backend, plan(clip=clip, unit="example", units=6))
    tr.dp_step(Batch(np.tile(x, (k, 1, 1, 1)), np.tile(y, k), np.tile(units, k), np.full(6 * k, 1 / k, np.float32)))
    np.testing.assert_allclose(params(tr), params(ref), atol=1e-6)
    # real augmentations: one unit's K augmented rows still move the parameters by at most C
    aug = make_augmenter("flip_shift", 8, seed=0)
    tr = trainer(backend, plan(clip=clip, unit="example", units=6))
    before = params(tr)
    b = aug(Batch(x[:1], y[:1], units[:1]), 0)
    assert len(b) == 8 and np.allclose(b.weights, 1 / 8) and (b.units == 0).all()
    tr.dp_step(b)
    assert np.linalg.norm(params(tr) - before) <= clip * (1 + 1e-4)


def test_ghost_clipping_refuses_several_rows_per_unit():
    tr = OpacusTrainer(SGD, grad_sample_mode="ghost")
    tr.init(build_torch_model(CNN, SHAPE, 2), plan(mode="dp", sigma=1.0, clip=1.0, unit="example", units=6),
            seed=0, dp_seed=1)
    x, y = images(4)
    with pytest.raises(TrainerError, match="use grad_sample_mode: hooks"):
        tr.dp_step(Batch(np.tile(x, (2, 1, 1, 1)), np.tile(y, 2), np.tile(np.arange(4), 2), np.full(8, 0.5)))


def test_flip_shift_is_a_flip_and_a_shift():
    x = np.zeros((64, 1, 12, 12), np.float32)
    x[:, 0, 5, 5] = 1.0  # one bright pixel, away from the border
    out = flip_shift(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == np.float32
    for img in out[:, 0]:
        r, c = np.argwhere(img == 1.0)[0]
        assert abs(r - 5) <= 4 and (abs(c - 5) <= 4 or abs(c - 6) <= 4)
    assert len({tuple(np.argwhere(i[0] == 1.0)[0]) for i in out}) > 10  # random, not constant


@pytest.mark.parametrize("backend", ["opacus", "jax"])
def test_ema_is_used_for_prediction_and_survives_a_round_trip(backend):
    x, y = images(8, seed=2)
    p = plan(mode="dp", sigma=0.5, clip=1.0, unit="example", units=8)
    tr, plain = trainer(backend, p, ema=0.9), trainer(backend, p)
    for _ in range(3):
        tr.dp_step(Batch(x, y, np.arange(8)))
        plain.dp_step(Batch(x, y, np.arange(8)))
    np.testing.assert_allclose(params(tr), params(plain), atol=1e-5)  # same raw parameters (same noise)
    assert not np.allclose(tr.predict(x), plain.predict(x), atol=1e-4)  # but predictions use the average
    state = tr.state_dict()
    tr2 = trainer(backend, p, ema=0.9)
    tr2.load_state_dict(state)
    np.testing.assert_allclose(tr2.predict(x), tr.predict(x), atol=1e-6)
    with pytest.raises(TrainerError, match="no EMA"):
        trainer(backend, p, ema=0.9).load_state_dict(plain.state_dict())
