"""The JAX backend against the shared trainer contract, plus JAX-specific behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import accounting as acc
from dptrain.config import ModelConfig, OptimizerConfig
from dptrain.models.flax_models import build_flax_model
from dptrain.trainers import fast_clip
from dptrain.trainers.base import Batch, TrainerError
from dptrain.trainers.checkpoint import load_checkpoint, save_checkpoint
from dptrain.trainers.jax_backend import JaxTrainer, secure_normal
from dptrain.trainers.plan import PrivacyPlan

from .contract import TrainerContract, make_plan


class JaxContract(TrainerContract):
    clipping = "auto"

    def make_trainer(self, opt_cfg, **kw):
        return JaxTrainer(opt_cfg, clipping=self.clipping, **kw)

    def make_model(self, in_features, num_classes, seed):
        return build_flax_model(ModelConfig(hidden=[8]), in_features, num_classes)  # params come from init seed

    def params(self, trainer):
        return trainer.flat_params().astype(np.float64)

    def example_grad(self, trainer, x, y):
        flat, unravel = ravel_pytree(trainer.params)

        def loss(v):
            return jnp.sum(fast_clip.cross_entropy(trainer.apply_fn(unravel(v), jnp.asarray(x)), jnp.asarray(y)))

        return np.asarray(jax.grad(loss)(flat)).astype(np.float64)


class TestJaxFastClipping(JaxContract):
    clipping = "auto"


class TestJaxVmap(JaxContract):
    clipping = "vmap"


def _truncated_plan(mode="dp", max_batch=24, unit="example", units=48):
    scheme = acc.TruncatedPoissonSampling(units, 16 / units, max_batch)
    return PrivacyPlan(scheme=scheme, noise_multiplier=1.0 if mode == "dp" else 0.0,
                       clipping_norm=None if mode == "non_private" else 1.0, steps=10, expected_batch_size=16.0,
                       delta=1e-5, accountant="pld", mode=mode, privacy_unit=unit, size=units)


def _data(n=48, d=6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def test_truncated_poisson_compiles_once_and_refuses_oversized_batches():
    x, y = _data()
    tr = JaxTrainer(OptimizerConfig(name="sgd", lr=0.1))
    tr.init(build_flax_model(ModelConfig(hidden=[8]), 6, 2), _truncated_plan(), seed=0, dp_seed=1)
    for n in (0, 5, 17, 24):
        rows = np.arange(n)
        tr.dp_step(Batch(x[rows], y[rows], rows))
    assert tr._step._cache_size() == 1  # one static shape for every batch size
    rows = np.arange(25)
    with pytest.raises(TrainerError, match="more rows than the plan's max_batch_size 24"):
        tr.dp_step(Batch(x[rows], y[rows], rows))


def test_per_unit_chunks_never_split_a_unit_and_match_one_chunk():
    x, y = _data()
    units = np.arange(48) // 3  # 16 patients, 3 rows each
    plan = make_plan("clip_only", clip=0.05, unit="patient", units=16, batch=4.0)
    out = []
    for max_physical, clipping in ((1024, "auto"), (7, "auto"), (1024, "vmap")):
        tr = JaxTrainer(OptimizerConfig(name="sgd", lr=0.1), clipping=clipping, max_physical_batch_size=max_physical)
        tr.init(build_flax_model(ModelConfig(hidden=[8]), 6, 2), plan, seed=0, dp_seed=1)
        tr.dp_step(Batch(x, y, units))
        out.append(tr.flat_params())
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[2], out[0], rtol=1e-5, atol=1e-7)
    tr = JaxTrainer(OptimizerConfig(name="sgd", lr=0.1), max_physical_batch_size=2)
    tr.init(build_flax_model(ModelConfig(hidden=[8]), 6, 2), plan, seed=0, dp_seed=1)
    with pytest.raises(TrainerError, match="a sampled privacy unit has more rows than"):
        tr.dp_step(Batch(x, y, units))


def test_checkpoint_round_trip(tmp_path):
    x, y = _data()
    plan = _truncated_plan()
    make = lambda: JaxTrainer(OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))  # noqa: E731
    tr = make()
    tr.init(build_flax_model(ModelConfig(hidden=[8]), 6, 2), plan, seed=0, dp_seed=7)
    rows = np.arange(10)
    tr.dp_step(Batch(x[rows], y[rows], rows))
    save_checkpoint(tmp_path / "c.dptckpt", tr.state_dict())
    tr2 = make()
    tr2.init(build_flax_model(ModelConfig(hidden=[8]), 6, 2), plan, seed=1, dp_seed=7)
    tr2.load_state_dict(load_checkpoint(tmp_path / "c.dptckpt"))
    assert tr2.steps_done == 1
    tr.dp_step(Batch(x[rows], y[rows], rows))
    tr2.dp_step(Batch(x[rows], y[rows], rows))
    np.testing.assert_array_equal(tr.flat_params(), tr2.flat_params())


def test_secure_rng_noise():
    z = secure_normal(20000)
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    x, y = _data()
    tr = JaxTrainer(OptimizerConfig(name="sgd", lr=0.1), secure_rng=True)
    tr.init(build_flax_model(ModelConfig(hidden=[8]), 6, 2), _truncated_plan(), seed=0, dp_seed=0)
    before = tr.flat_params()
    empty = np.zeros(0, np.int64)
    tr.dp_step(Batch(x[empty], y[empty], empty))
    z = (tr.flat_params() - before) / -0.1 * 16.0  # N(0, (sigma C)^2) = N(0, 1)
    assert 0.6 < z.std() < 1.4


def test_refuses_modules_that_are_not_dptrain_flax_models():
    import flax.linen as nn

    tr = JaxTrainer(OptimizerConfig())
    with pytest.raises(TrainerError, match="flax module from dptrain.models.flax_models"):
        tr.init(nn.Dense(2), _truncated_plan(), seed=0, dp_seed=0)
    with pytest.raises(TrainerError, match="expected 'auto' or 'vmap'"):
        JaxTrainer(OptimizerConfig(), clipping="fast")
