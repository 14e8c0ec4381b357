"""Data-parallel JAX training: two (forced host) devices train the same model as one device.

JAX is already initialised with one CPU device in the pytest process, so each device count runs in its own
subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, ``JAX_PLATFORMS=cpu``) that trains:
  * the actg175 recipe (jax backend, 1 epoch) through the real plan, sampler and THE loop, once with
    ``privacy.clip_only`` (zero noise) and once with noise (sigma 1.5), with a fixed dp_seed;
  * per-unit runs driven directly on a few batches: patients of 3 rows (fast clipping, one chunk; vmap,
    several scanned chunks) and augmentation multiplicity (repeated units, weights 1/K), incl. an empty batch.
and writes ledgers, epsilons, parameters and predictions. The two subprocesses must agree: the ledger exactly,
parameters and predictions up to float summation order. Noise comes from the replicated key, so even the
noisy runs agree; adding the noise on every device, or summing only a device's own rows, would break this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import accounting as acc
from dptrain.config import ModelConfig, OptimizerConfig
from dptrain.models.flax_models import build_flax_model
from dptrain.trainers.base import Batch
from dptrain.trainers.jax_backend import JaxTrainer
from dptrain.trainers.plan import PrivacyPlan

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=1e-5, atol=1e-5)

SCRIPT = r'''
import json, sys
import numpy as np
import jax
from jax.sharding import PartitionSpec

import accounting as acc
from dptrain.config import ModelConfig, OptimizerConfig, load_recipe
from dptrain.data import load_data
from dptrain.models.flax_models import build_flax_model
from dptrain.run import build_model, build_trainer
from dptrain.trainers.base import Batch
from dptrain.trainers.jax_backend import JaxTrainer
from dptrain.trainers.loop import run_loop
from dptrain.trainers.plan import PrivacyPlan, UnitCount
from dptrain.trainers.sampler import UnitSampler

out_path = sys.argv[1]
DP_SEED = 123
res = {"local_devices": len(jax.local_devices())}
arrays = {}


def sharding_facts(tr, batch):
    xs = tr._device_batch(batch)[0]
    return {"num_devices": tr.num_devices,
            "batch_spec": None if tr.mesh is None else list(xs.sharding.spec),
            "batch_shape": list(xs.shape),
            "shard_shapes": sorted(list(s.data.shape) for s in xs.addressable_shards),
            "params_replicated": all(p.sharding.is_fully_replicated for p in jax.tree.leaves(tr.params))}


# 1) the recipe, example-level DP, through the plan, the sampler and THE loop
MODES = {"clip_only": ["privacy.clip_only=true"], "dp": ["privacy.epsilon=", "privacy.noise_multiplier=1.5"]}
for name, overrides in MODES.items():
    recipe = load_recipe("recipes/actg175-mlp.yaml",
                         ["trainer.backend=jax", "training.epochs=1", "model.hidden=[8]", *overrides])
    data = load_data(recipe.data)
    # the same declared public size in both subprocesses (a DP count would draw fresh noise in each)
    plan = PrivacyPlan.from_recipe(recipe, UnitCount(data.num_units, "declared"), data.privacy_unit)
    tr = build_trainer(recipe)
    tr.init(build_model(recipe, data), plan, seed=recipe.seed, dp_seed=DP_SEED)
    arrays[f"{name}_init"] = tr.flat_params()
    sampler = UnitSampler(data.units_train, plan.size, plan.scheme, dp_seed=DP_SEED)
    ledger = run_loop(tr, sampler, plan, plan.new_ledger(), data.x_train, data.y_train, data.units_train)
    rows = sampler.sample(0)
    res[name] = {"ledger": ledger.to_dict(), "steps": ledger.steps,
                 "epsilon": ledger.epsilon(plan.delta, quick=True) if plan.mode == "dp" else None,
                 **sharding_facts(tr, Batch(data.x_train[rows], data.y_train[rows], data.units_train[rows]))}
    arrays[f"{name}_params"] = tr.flat_params()
    arrays[f"{name}_pred"] = tr.predict(data.x_test)

# 2) per unit, driven directly on fixed batches of 6 units (one static shape per case, so one compilation):
#    patients of 3 rows (fast clipping, one chunk; step 2 is an empty batch: a noise-only step), and
#    augmentation multiplicity (2 weighted copies of each row; vmap clipping, 4 scanned chunks per device)
rng = np.random.default_rng(0)
x = rng.normal(size=(96, 6)).astype(np.float32)
y = (x[:, 0] + 0.3 * rng.normal(size=96) > 0).astype(np.int64)
CASES = {"patient_auto": ("patient", "auto", 1024), "augmult_vmap_chunks": ("example", "vmap", 4)}
for name, (unit, clipping, max_physical) in CASES.items():
    nu = 32 if unit == "patient" else 96
    units_all = np.arange(96) // 3 if unit == "patient" else np.arange(96)
    plan = PrivacyPlan(scheme=acc.TruncatedPoissonSampling(nu, 6 / nu, 20), noise_multiplier=1.0,
                       clipping_norm=0.5, steps=4, expected_batch_size=6.0, delta=1e-5, accountant="pld",
                       mode="dp", privacy_unit=unit, size=nu)
    tr = JaxTrainer(OptimizerConfig(name="sgd", lr=0.2, momentum=0.9), clipping=clipping,
                    max_physical_batch_size=max_physical)
    tr.init(build_flax_model(ModelConfig(hidden=[8]), 6, 2), plan, seed=0, dp_seed=DP_SEED, ema=0.9)
    for step in range(plan.steps):
        chosen = rng.choice(nu, 0 if (step == 2 and name == "patient_auto") else 6, replace=False)
        rows = np.flatnonzero(np.isin(units_all, chosen))
        if unit == "patient":
            batch = Batch(x[rows], y[rows], units_all[rows])
        else:  # augmult K=2: two perturbed copies of each sampled row, weight 1/2, clipped together
            batch = Batch(np.concatenate([x[rows], x[rows] + 0.1]), np.concatenate([y[rows], y[rows]]),
                          np.concatenate([rows, rows]), np.full(2 * len(rows), 0.5, np.float32))
        tr.dp_step(batch)
    res[name] = {"compilations": tr._step._cache_size(), **sharding_facts(tr, batch)}
    arrays[f"{name}_params"] = tr.flat_params()
    arrays[f"{name}_pred"] = tr.predict(x)

np.savez(out_path + ".npz", **arrays)
with open(out_path + ".json", "w") as f:
    json.dump(res, f)
'''


def _start(devices: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{devices: (facts, arrays)} for 1 and 2 devices; the two subprocesses run side by side."""
    tmp = tmp_path_factory.mktemp("multidevice")
    procs = {d: _start(d, tmp / f"devices{d}") for d in (1, 2)}
    logs = {}
    try:
        for d, proc in procs.items():
            logs[d] = proc.communicate(timeout=300)[0]
    finally:
        for proc in procs.values():
            proc.kill()  # no-op once it has exited
    out = {}
    for d, proc in procs.items():
        assert proc.returncode == 0, f"{d}-device run failed:\n{logs[d][-4000:]}"
        with np.load(tmp / f"devices{d}.npz") as z:
            out[d] = (json.loads((tmp / f"devices{d}.json").read_text()), dict(z))
    return out


RECIPE_RUNS = ("clip_only", "dp")
UNIT_RUNS = ("patient_auto", "augmult_vmap_chunks")


def test_two_devices_really_shard_the_batch(runs):
    one, two = runs[1][0], runs[2][0]
    assert one["local_devices"] == 1 and two["local_devices"] == 2
    for name in RECIPE_RUNS + UNIT_RUNS:
        assert one[name]["num_devices"] == 1 and one[name]["batch_spec"] is None, name
        assert two[name]["num_devices"] == 2 and two[name]["batch_spec"] == ["data"], name
        assert two[name]["params_replicated"], name
        assert one[name].get("compilations", 1) == two[name].get("compilations", 1) == 1, name
        shape = two[name]["batch_shape"]
        assert shape[0] == 2 and two[name]["shard_shapes"] == [[1, *shape[1:]]] * 2, name  # one half per device
    # example level, the recipe: the padded global batch is max_batch_size rounded up to a multiple of 2
    rows_one = int(np.prod(one["dp"]["batch_shape"][:2]))
    rows_two = int(np.prod(two["dp"]["batch_shape"][:3]))
    assert rows_two == rows_one + rows_one % 2


def test_same_ledger_and_epsilon_on_two_devices(runs):
    one, two = runs[1][0], runs[2][0]
    for name in RECIPE_RUNS:
        assert two[name]["ledger"] == one[name]["ledger"], name
        assert two[name]["steps"] == one[name]["steps"] == 7
    assert two["dp"]["epsilon"] == one["dp"]["epsilon"] and 0 < one["dp"]["epsilon"] < 10


def test_zero_noise_two_devices_train_the_same_model(runs):
    a1, a2 = runs[1][1], runs[2][1]
    np.testing.assert_array_equal(a2["clip_only_init"], a1["clip_only_init"])
    # training moved the parameters far more than the tolerance (the comparison is not vacuous)
    assert np.abs(a1["clip_only_params"] - a1["clip_only_init"]).max() > 1e-2
    for key in ("clip_only_params", "clip_only_pred"):
        np.testing.assert_allclose(a2[key], a1[key], **TOL, err_msg=key)


def test_noise_added_once_from_the_same_key_on_two_devices(runs):
    a1, a2 = runs[1][1], runs[2][1]
    for name in ("dp", *UNIT_RUNS):
        for part in ("params", "pred"):
            key = f"{name}_{part}"
            np.testing.assert_allclose(a2[key], a1[key], **TOL, err_msg=key)


def test_layout_spreads_whole_units_over_devices():
    """Host-side layout for D devices (no devices needed): every row exactly once, a unit's rows in one chunk
    of one device, shapes a multiple of D; D=1 is the one-device layout."""
    rng = np.random.default_rng(1)
    units = np.repeat(np.arange(30), rng.integers(1, 5, 30))
    x = rng.normal(size=(len(units), 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    plan = PrivacyPlan(scheme=acc.TruncatedPoissonSampling(30, 10 / 30, 30), noise_multiplier=1.0,
                       clipping_norm=1.0, steps=1, expected_batch_size=10.0, delta=1e-5, accountant="pld",
                       mode="dp", privacy_unit="patient", size=30)
    example_plan = PrivacyPlan(scheme=acc.TruncatedPoissonSampling(len(units), 10 / len(units), 100),
                               noise_multiplier=1.0, clipping_norm=1.0, steps=1, expected_batch_size=10.0,
                               delta=1e-5, accountant="pld", mode="dp", privacy_unit="example",
                               size=len(units))
    for p, batch_units in ((plan, units), (example_plan, np.arange(len(units)))):
        for max_physical in (1024, 16, 5):
            for d in (1, 2, 3):
                tr = JaxTrainer(OptimizerConfig(), max_physical_batch_size=max_physical)
                tr.init(build_flax_model(ModelConfig(hidden=[4]), 6, 2), p, seed=0, dp_seed=0)
                tr.num_devices = d  # the layout only reads the device count
                idx, seg = tr._layout(Batch(x, y, batch_units))
                assert idx.shape[0] == d
                real = idx[idx >= 0]
                np.testing.assert_array_equal(np.sort(real), np.arange(len(units)))
                if seg is not None:
                    for u in np.unique(units):
                        where = np.argwhere(np.isin(idx, np.flatnonzero(units == u)))
                        assert len({(dev, k) for dev, k, _ in where}) == 1  # one device, one chunk
                        assert len({seg[dev, k, r] for dev, k, r in where}) == 1
                    assert idx.shape[2] <= max_physical
                else:
                    assert idx.shape[2] * d <= max_physical + d - 1
                    counts = (idx >= 0).sum(axis=(1, 2))
                    assert counts.max() - counts.min() <= 1  # real rows spread evenly
