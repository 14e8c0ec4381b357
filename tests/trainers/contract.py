"""Contract tests every backend must pass. A backend's test module subclasses ``TrainerContract``.

Subclasses provide: ``make_trainer(opt_cfg)``, ``make_model(in_features, num_classes, seed)``,
``params(trainer) -> flat np.ndarray``, ``example_grad(trainer, x, y) -> flat np.ndarray`` (the plain
gradient of one example's cross-entropy loss at the current parameters, by the framework's autodiff).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import accounting as acc
from dptrain.config import OptimizerConfig
from dptrain.trainers.base import Batch, Trainer
from dptrain.trainers.plan import PrivacyPlan

N, D, C = 48, 6, 2


def make_plan(mode: str, *, sigma: float = 0.0, clip: float | None = 1.0, batch: float = 16.0,
              unit: str = "example", units: int = N) -> PrivacyPlan:
    return PrivacyPlan(scheme=acc.PoissonSampling(batch / units), noise_multiplier=sigma, clipping_norm=clip,
                       steps=10, expected_batch_size=batch, delta=1e-5, accountant="pld", mode=mode,
                       privacy_unit=unit, size=units)


class TrainerContract:
    SGD = OptimizerConfig(name="sgd", lr=0.1, momentum=0.0)

    @pytest.fixture
    def data(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(N, D)).astype(np.float32)
        y = (x[:, 0] + 0.5 * rng.normal(size=N) > 0).astype(np.int64)
        return x, y

    # -- to implement --
    def make_trainer(self, opt_cfg: OptimizerConfig, **kw):
        raise NotImplementedError

    def make_model(self, in_features: int, num_classes: int, seed: int):
        raise NotImplementedError

    def params(self, trainer) -> np.ndarray:
        raise NotImplementedError

    def example_grad(self, trainer, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- helpers --
    def trainer_for(self, plan, opt=None, **kw):
        tr = self.make_trainer(opt or self.SGD, **kw)
        tr.init(self.make_model(D, C, seed=0), plan, seed=0, dp_seed=1234)
        return tr

    # -- the contract --
    def test_no_clip_no_noise_equals_sgd(self, data):
        x, y = data
        rows = np.arange(20)
        tr = self.trainer_for(make_plan("clip_only", clip=1e9))
        before = self.params(tr)
        grads = np.stack([self.example_grad(tr, x[i:i + 1], y[i:i + 1]) for i in rows])
        tr.dp_step(Batch(x[rows], y[rows], rows))
        expected = before - self.SGD.lr * grads.sum(0) / 16.0  # normalised by the EXPECTED batch size
        np.testing.assert_allclose(self.params(tr), expected, rtol=1e-4, atol=1e-6)

    def test_non_private_step_equals_sgd(self, data):
        x, y = data
        rows = np.arange(30)
        tr = self.trainer_for(make_plan("non_private", clip=None))
        before = self.params(tr)
        grads = np.stack([self.example_grad(tr, x[i:i + 1], y[i:i + 1]) for i in rows])
        tr.dp_step(Batch(x[rows], y[rows], rows))
        np.testing.assert_allclose(self.params(tr), before - self.SGD.lr * grads.sum(0) / 16.0, rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("max_physical", [1000, 7])
    def test_clipped_sum_equals_brute_force(self, data, max_physical):
        x, y = data
        rows = np.arange(N)
        clip = 0.05
        tr = self.trainer_for(make_plan("clip_only", clip=clip), max_physical_batch_size=max_physical)
        before = self.params(tr)
        total = np.zeros_like(before)
        for i in rows:
            g = self.example_grad(tr, x[i:i + 1], y[i:i + 1])
            total += g * min(1.0, clip / (np.linalg.norm(g) + 1e-6))
        tr.dp_step(Batch(x[rows], y[rows], rows))
        np.testing.assert_allclose(self.params(tr), before - self.SGD.lr * total / 16.0, rtol=1e-4, atol=1e-6)

    def test_noise_has_the_right_std(self, data):
        """Empty batches take noise-only steps: update = -lr * N(0, (sigma C)^2) / B, per coordinate."""
        x, y = data
        sigma, clip, batch = 2.0, 0.5, 16.0
        tr = self.trainer_for(make_plan("dp", sigma=sigma, clip=clip, batch=batch))
        empty = np.zeros(0, dtype=np.int64)
        samples = []
        for _ in range(20):
            before = self.params(tr)
            tr.dp_step(Batch(x[empty], y[empty], empty))
            samples.append((self.params(tr) - before) / (-self.SGD.lr))
        z = np.concatenate(samples) * batch / (sigma * clip)  # should be N(0, 1)
        assert len(z) > 300
        assert abs(z.mean()) < 4 / np.sqrt(len(z))
        assert stats.kstest(z, "norm").pvalue > 1e-3
        assert abs(z.std() - 1) < 4 / np.sqrt(2 * len(z))

    def test_noise_std_with_data(self, data):
        """With data, the update is the clipped mean plus noise of the same std (two runs, same batch)."""
        x, y = data
        rows = np.arange(N)
        res = []
        for seed in (1, 2, 3, 4, 5, 6):
            tr = self.make_trainer(self.SGD)
            tr.init(self.make_model(D, C, seed=0), make_plan("dp", sigma=1.0, clip=0.1), seed=0, dp_seed=seed)
            before = self.params(tr)
            tr.dp_step(Batch(x[rows], y[rows], rows))
            res.append(self.params(tr) - before)
        diffs = np.concatenate([res[0] - r for r in res[1:]]) / self.SGD.lr * 16.0  # noise difference: std sqrt(2) sigma C
        assert abs(diffs.std() / (np.sqrt(2) * 0.1) - 1) < 0.1

    def test_per_unit_clipping_bounds_each_unit(self, data):
        """A unit with many rows moves the sum no more than a unit with one row (clip_only, no noise)."""
        x, y = data
        clip = 0.01
        units = np.zeros(N, dtype=np.int64)  # all rows are one patient...
        units[-1] = 1  # ...except the last
        tr = self.trainer_for(make_plan("clip_only", clip=clip, unit="patient", units=2, batch=1.0))
        before = self.params(tr)
        tr.dp_step(Batch(x, y, units))
        change = np.linalg.norm(self.params(tr) - before) / self.SGD.lr  # |sum of two clipped unit grads|
        assert change <= 2 * clip + 1e-6

    def test_state_round_trips_through_a_checkpoint_file(self, data, tmp_path):
        """state_dict -> checkpoint file (numpy + JSON, no pickle) -> load_state_dict: the next step (Adam, EMA)
        is the uninterrupted one, bit for bit; the Trainer protocol's members are there."""
        from dptrain.trainers.checkpoint import load_checkpoint, save_checkpoint

        x, y = data
        plan, opt = make_plan("dp", sigma=1.0, clip=1.0), OptimizerConfig(name="adam", lr=0.01)

        def fresh():
            tr = self.make_trainer(opt)
            tr.init(self.make_model(D, C, seed=0), plan, seed=0, dp_seed=1234, ema=0.9)
            return tr

        rows = np.arange(10)
        tr = fresh()
        for _ in range(2):
            tr.dp_step(Batch(x[rows], y[rows], rows))
        save_checkpoint(tmp_path / "c.dptckpt", tr.state_dict())
        tr2 = fresh()
        tr2.load_state_dict(load_checkpoint(tmp_path / "c.dptckpt"))
        assert tr2.steps_done == tr.steps_done == 2
        for t in (tr, tr2):
            t.dp_step(Batch(x[rows], y[rows], rows))
        np.testing.assert_array_equal(self.params(tr), self.params(tr2))
        np.testing.assert_array_equal(tr.predict(x), tr2.predict(x))  # the EMA parameters too
        w, w2 = tr.release_weights(), tr2.release_weights()
        assert w.keys() == w2.keys() and all(np.array_equal(w[k], w2[k]) for k in w)
        assert isinstance(tr, Trainer)  # every member of the protocol is there (names, not signatures)
        assert isinstance(tr.num_devices, int) and tr.num_devices >= 1
        assert tr.num_trainable_parameters() == self.params(tr).size
        assert tr.trained_model() is not None

    def test_state_round_trip(self, data):
        x, y = data
        tr = self.trainer_for(make_plan("dp", sigma=1.0, clip=1.0), opt=OptimizerConfig(name="adam", lr=0.01))
        rows = np.arange(10)
        tr.dp_step(Batch(x[rows], y[rows], rows))
        state = tr.state_dict()
        tr2 = self.trainer_for(make_plan("dp", sigma=1.0, clip=1.0), opt=OptimizerConfig(name="adam", lr=0.01))
        tr2.load_state_dict(state)
        np.testing.assert_array_equal(self.params(tr), self.params(tr2))
        tr.dp_step(Batch(x[rows], y[rows], rows))
        tr2.dp_step(Batch(x[rows], y[rows], rows))  # same step counter -> same noise
        np.testing.assert_allclose(self.params(tr), self.params(tr2), rtol=1e-6)
        p = tr.predict(x)
        assert p.shape == (N, C) and np.allclose(p.sum(1), 1, atol=1e-5)
