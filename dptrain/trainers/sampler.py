"""The privacy-unit sampler: draws each step's batch by sampling *units* (examples or patients).

It is built from an ``accounting`` sampling scheme, so what is sampled is what is accounted
(DESIGN invariant 2). Randomness is counter-based: step t uses a generator derived from
``(dp_seed, t)``, so resuming at step t needs no saved RNG state and replays nothing twice. With
``secure=True`` the coins come from the OS CSPRNG instead (not reproducible, by design).

Sharp edge: ``dp_seed`` determines which units were sampled; it is a secret. It lives only in the
checkpoint, never in the config, record or logs.
"""

from __future__ import annotations

import os

import numpy as np

import accounting as acc


def secure_uniform(n: int) -> np.ndarray:
    """n floats uniform in [0, 1) from the OS CSPRNG (53 random bits each)."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def secure_normal(n: int) -> np.ndarray:
    """n standard Gaussians from os.urandom: Box-Muller, 4 draws summed and halved (std 1; Opacus's
    floating-point attack mitigation)."""
    u = secure_uniform(8 * n).reshape(4, 2, n) + 0.5 / (1 << 53)  # in (0, 1): log is finite
    z = np.sqrt(-2.0 * np.log(u[:, 0])) * np.cos(2.0 * np.pi * u[:, 1])
    return z.sum(0) / 2.0


class UnitSampler:
    def __init__(self, units: np.ndarray, num_units: int, scheme: acc.SamplingScheme, *, dp_seed: int,
                 secure: bool = False):
        units = np.asarray(units, dtype=np.int64)
        if units.ndim != 1 or (len(units) and (units.min() < 0 or units.max() >= num_units)):
            raise ValueError("units: expected unit indices in [0, number of units); a row's unit is out of range "
                             "(an internal error: units come from the data loader)")
        if isinstance(scheme, (acc.FixedSizeSampling, acc.TruncatedPoissonSampling)):
            if scheme.dataset_size != num_units:
                raise ValueError("sampling: this scheme needs dataset_size equal to the number of units it samples")
        if secure and isinstance(scheme, acc.ShuffledEpochs):
            raise ValueError("privacy.secure_rng: shuffled epochs need one permutation per epoch that survives a "
                             "resume; use sampling: poisson with secure_rng")
        self.scheme, self.num_units, self.dp_seed, self.secure = scheme, num_units, int(dp_seed), secure
        order = np.argsort(units, kind="stable")
        self._rows = order  # rows grouped by unit
        self._starts = np.searchsorted(units[order], np.arange(num_units + 1))

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.dp_seed, *key])

    def _uniform(self, n: int, stream: int, step: int) -> np.ndarray:
        return secure_uniform(n) if self.secure else self._rng(stream, step).random(n)

    def sample_units(self, step: int) -> np.ndarray:
        s = self.scheme
        if isinstance(s, acc.PoissonSampling):
            return np.flatnonzero(self._uniform(self.num_units, 1, step) < s.sampling_rate)
        if isinstance(s, acc.TruncatedPoissonSampling):
            chosen = np.flatnonzero(self._uniform(self.num_units, 1, step) < s.sampling_rate)
            if len(chosen) > s.max_batch_size:  # truncate by a uniformly random subset
                keys = self._uniform(len(chosen), 4, step)
                chosen = np.sort(chosen[np.argsort(keys)[: s.max_batch_size]])
            return chosen
        if isinstance(s, acc.FixedSizeSampling):
            keys = self._uniform(self.num_units, 3, step)
            return np.sort(np.argsort(keys)[: s.batch_size])
        if isinstance(s, acc.ShuffledEpochs):  # each unit picks one of k batches per epoch, independently
            k = s.steps_per_epoch()
            epoch, pos = divmod(step, k)
            bins = np.minimum((self._rng(2, epoch).random(self.num_units) * k).astype(np.int64), k - 1)
            return np.flatnonzero(bins == pos)
        raise TypeError(f"sampling: unsupported scheme {s!r}")

    def sample(self, step: int) -> np.ndarray:
        """Row indices of the examples of every sampled unit (possibly empty)."""
        units = self.sample_units(step)
        if not len(units):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self._rows[self._starts[u]:self._starts[u + 1]] for u in units])
