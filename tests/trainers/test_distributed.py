"""Data-parallel DP training (torchrun, gloo on localhost, 2 processes) is the single-process mechanism.

One torchrun launch (this file run as a script: ``_driver``) does everything that needs two processes, to keep
the test cheap on 2 CPU cores:

1. ``python -m dptrain train`` of recipes/actg175-mlp.yaml with noise (train() creates and destroys the process
   group; rank 0 draws the secret dp_seed);
2. in a process group of its own, a clip-only ``train(..., dp_seed=DP_SEED)`` run and trainer-level checks:
   distributed steps equal single-process steps (hooks, ghost, clip-only, non-private; a rank with an empty
   share; an empty global batch; units with several rows), the noise's std is sigma*C/B, ranks end identical,
   secure_rng noise and samples are rank 0's, a failure on rank 0 stops every rank.

The tests compare against single-process runs in this process, with the same dp_seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import accounting as acc
from dptrain.config import OptimizerConfig, load_recipe
from dptrain.lifecycle import CHECKPOINT
from dptrain.run import build_trainer, train
from dptrain.trainers.base import Batch, TrainerError
from dptrain.trainers.checkpoint import load_checkpoint
from dptrain.trainers.distributed import LOCAL, Distributed
from dptrain.trainers.plan import PrivacyPlan

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
TORCHRUN = Path(sys.executable).with_name("torchrun")
DP_SEED = 1234567890123
# a declared public size: the same q (and so the same batches for one dp_seed) in the two-process and the
# single-process run (a DP count would draw fresh noise per run)
NOISY = ["training.epochs=2", "model.hidden=[8]", "privacy.epsilon=", "privacy.noise_multiplier=1.5",
         "privacy.dataset_size=1604"]
CLIP_ONLY = ["training.epochs=1", "model.hidden=[8]", "privacy.clip_only=true", "privacy.dataset_size=1604"]
# a finished run's files (checkpoint kept on request: the tests compare trained parameters and read dp_seed)
RUN_FILES = {"release/config.yaml", "release/ledger.json", "release/privacy.json", "release/model.safetensors",
             "release/model.json", "private/run_id", "private/state.json", "private/metrics.jsonl",
             f"private/{CHECKPOINT}", "private/CHECKPOINT-HOLDS-SECRET-DP-SEED.txt", "private/predictions.parquet",
             "private/record.json", "private/audit.json", "release/MODEL_CARD.md", "private/MODEL_CARD.md"}
N, D, K = 64, 100, 100  # units, features, classes (a 100x100 linear layer: 10100 noise coordinates)
SIGMA, B, LR = 3.0, 16.0, 1.0


# ---------------------------------------------------------------- the two-process side (run by torchrun)


def _plan(mode: str, sigma: float = 0.0, unit: str = "example") -> PrivacyPlan:
    return PrivacyPlan(scheme=acc.PoissonSampling(B / N), noise_multiplier=sigma,
                       clipping_norm=None if mode == "non_private" else 1.0, steps=10, expected_batch_size=B,
                       delta=1e-5, accountant="pld", mode=mode, privacy_unit=unit, size=N)


def _model(hidden: bool) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if hidden:
            return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        return torch.nn.Linear(D, K)


def _batches(num_classes: int) -> dict[str, Batch]:
    rng = np.random.default_rng(0)

    def batch(units) -> Batch:
        units = np.asarray(units, dtype=np.int64)
        return Batch(rng.normal(size=(len(units), D)).astype(np.float32),
                     rng.integers(0, num_classes, len(units)).astype(np.int64), units)

    return {
        "mixed": batch(rng.permutation(16)),  # both ranks have rows
        "rank1_empty": batch([0, 2, 4, 6, 8, 10]),  # every unit on rank 0; rank 1 joins with zeros
        "empty": batch([]),  # the whole batch is empty: a noise-only step everywhere
        # several rows per unit, a unit's rows at odd and even positions: splitting rows (not units) would
        # clip half-units separately and differ from the single-process step
        "patients": batch([0, 1, 1, 2, 2, 2, 3, 5, 5, 4, 7, 7, 0, 6]),
    }


def _flat(trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.module.parameters()])


def _trainer(dist: Distributed, plan: PrivacyPlan, *, hidden: bool, mode: str = "hooks", secure: bool = False,
             momentum: float = 0.0):
    from dptrain.trainers.opacus_backend import OpacusTrainer

    tr = OpacusTrainer(OptimizerConfig(name="sgd", lr=LR, momentum=momentum), grad_sample_mode=mode,
                       secure_rng=secure, device="cpu", max_physical_batch_size=5, dist=dist)
    tr.init(_model(hidden), plan, seed=0, dp_seed=DP_SEED)
    return tr


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t)
    return out


def _steps_vs_single(dist: Distributed, mode: str, sigma: float, gsm: str, names: list[str]) -> dict:
    """Distributed trainer vs a single-process one (same dp_seed) over the same global batches."""
    plan = _plan(mode, sigma)
    batches = _batches(3)
    d = _trainer(dist, plan, hidden=True, mode=gsm, momentum=0.9)
    s = _trainer(LOCAL, plan, hidden=True, mode=gsm, momentum=0.9)
    rows = 0.0
    for name in names:
        sd, ss = d.dp_step(batches[name]), s.dp_step(batches[name])
        rows += abs(sd.rows - ss.rows) + abs(sd.loss_sum - ss.loss_sum)
    ranks = _gathered(_flat(d))
    return {"max_diff_vs_single": float((_flat(d) - _flat(s)).abs().max()),
            "moved": float((_flat(s) - _flat(_trainer(LOCAL, plan, hidden=True))).abs().max()),
            "ranks_identical": bool(all(torch.equal(ranks[0], r) for r in ranks)), "stats_diff": rows}


def _noise_std(dist: Distributed) -> dict:
    """One DP step of a 100x100 linear layer, minus the same clip-only step: what is left is the noise."""
    batch = _batches(K)["mixed"]
    d = _trainer(dist, _plan("dp", SIGMA), hidden=False)
    clip = _trainer(LOCAL, _plan("clip_only"), hidden=False)
    single = _trainer(LOCAL, _plan("dp", SIGMA), hidden=False)
    for tr in (d, clip, single):
        tr.dp_step(batch)
    noise = (_flat(d) - _flat(clip)) / LR  # = -(noise added) / B
    ranks = _gathered(_flat(d))
    return {"std_ratio": float(noise.std() / (SIGMA * 1.0 / B)), "mean": float(noise.mean()),
            "max_diff_vs_single": float((_flat(d) - _flat(single)).abs().max()),
            "ranks_identical": bool(all(torch.equal(ranks[0], r) for r in ranks))}


def _secure(dist: Distributed) -> dict:
    from dptrain.trainers.distributed import BroadcastSampler
    from dptrain.trainers.sampler import UnitSampler

    batches = _batches(3)
    d = _trainer(dist, _plan("dp", 1.0), hidden=True, secure=True)
    for name in ("mixed", "rank1_empty", "empty"):
        d.dp_step(batches[name])
    ranks = _gathered(_flat(d))
    raw = UnitSampler(np.arange(N), N, acc.PoissonSampling(0.5), dp_seed=DP_SEED, secure=True)
    shared = BroadcastSampler(raw, dist)
    same_shared = same_raw = True
    for step in range(3):
        a = torch.zeros(N, dtype=torch.int64)
        a[torch.from_numpy(shared.sample(step))] = 1
        b = torch.zeros(N, dtype=torch.int64)
        b[torch.from_numpy(raw.sample(step))] = 1
        ga, gb = _gathered(a), _gathered(b)
        same_shared &= all(torch.equal(ga[0], g) for g in ga)
        same_raw &= all(torch.equal(gb[0], g) for g in gb)
    return {"ranks_identical": bool(all(torch.equal(ranks[0], r) for r in ranks)),
            "noise_moved_params": float((_flat(d) - _flat(_trainer(LOCAL, _plan("dp", 1.0), hidden=True))).abs().max()),
            "broadcast_samples_identical": bool(same_shared), "raw_os_samples_identical": bool(same_raw)}


def _failure(dist: Distributed) -> str:
    from dptrain.run import RunError
    from dptrain.trainers.distributed import DistributedError

    def boom():
        raise RunError("disk full")

    try:
        dist.on_main(boom)
    except (RunError, DistributedError) as err:
        dist.barrier()  # still in step with each other
        return f"{type(err).__name__}: {err}"
    return "no error"


def _driver(work: Path) -> None:
    """Run under ``torchrun --nproc_per_node 2`` (see the module docstring)."""
    import runpy

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    # 1. the real entry point; train() owns (creates and destroys) the process group
    sys.argv = ["dptrain", "train", str(RECIPE), *[a for o in NOISY for a in ("--set", o)],
                "--out", str(work / "noisy"), "--quiet", "--keep-checkpoint"]
    try:
        runpy.run_module("dptrain", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if done.code:
            raise
    assert not torch.distributed.is_initialized()
    # 2. a group of our own (a fresh key prefix in torchrun's store), which train() uses and leaves up
    from dptrain.trainers.distributed import from_env

    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    torch.distributed.init_process_group("gloo", store=torch.distributed.PrefixStore("dptrain-tests", store),
                                         rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    train(load_recipe(RECIPE, CLIP_ONLY), work / "clip_only", dp_seed=DP_SEED, progress=False, keep_checkpoint=True)
    assert torch.distributed.is_initialized()
    dist = from_env("cpu")
    assert dist.active and not dist.owns_group
    every = ["mixed", "rank1_empty", "empty", "patients"]
    results = {
        "dp_hooks": _steps_vs_single(dist, "dp", 1.0, "hooks", every),
        "dp_ghost": _steps_vs_single(dist, "dp", 1.0, "ghost", ["mixed", "rank1_empty", "empty"]),
        "clip_only_hooks": _steps_vs_single(dist, "clip_only", 0.0, "hooks", every),
        "non_private": _steps_vs_single(dist, "non_private", 0.0, "hooks", every),
        "noise": _noise_std(dist),
        "secure": _secure(dist),
        "failure": [None] * dist.world_size,
    }
    torch.distributed.all_gather_object(results["failure"], _failure(dist))
    if rank == 0:
        (work / "unit.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the tests (pytest side)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", __file__, str(work)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    noisy_seed = int(load_checkpoint(work / "noisy" / "private" / CHECKPOINT)["dp_seed"])
    single = {
        "noisy": train(load_recipe(RECIPE, NOISY), work / "single_noisy", dp_seed=noisy_seed, progress=False,
                       keep_checkpoint=True),
        "clip_only": train(load_recipe(RECIPE, CLIP_ONLY), work / "single_clip_only", dp_seed=DP_SEED,
                           progress=False, keep_checkpoint=True),
    }
    return work, single, json.loads((work / "unit.json").read_text()), proc.stdout


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(run_dir / "private" / CHECKPOINT)["trainer"]["model"]  # numpy arrays


def test_two_process_run_writes_one_run_directory(runs):
    work, single, _, stdout = runs
    for name in ("noisy", "clip_only"):
        out = work / name
        files = RUN_FILES if name == "noisy" else {  # not DP: its model is kept out of release/
            f.replace("release/model", "private/NOT-PRIVATE/model").replace("release/MODEL", "private/NOT-PRIVATE/MODEL")
            for f in RUN_FILES}
        assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == files
        record = json.loads((out / "private" / "record.json").read_text())
        assert record["training"]["world_size"] == 2 and record["status"] == "finished"
        assert single[name].record["training"]["world_size"] == 1
        # every epoch logged once (rank 1 appended nothing), with the global training loss
        assert (out / "private" / "metrics.jsonl").read_text().count("\n") == len(
            (single[name].out_dir / "private" / "metrics.jsonl").read_text().splitlines())
    assert stdout.count("run directory:") == 1  # only rank 0 prints


def test_two_process_run_spends_the_same_epsilon(runs):
    work, single, _, _ = runs
    for name in ("noisy", "clip_only"):
        record = json.loads((work / name / "private" / "record.json").read_text())
        ref = single[name].record
        assert record["privacy"] == ref["privacy"]
        ledger, ref_ledger = acc.PrivacyLedger.load(work / name / "release" / "ledger.json"), acc.PrivacyLedger.load(
            single[name].out_dir / "release" / "ledger.json")
        assert ledger.to_dict()["entries"] == ref_ledger.to_dict()["entries"]
        assert ledger.steps == ref_ledger.steps == ref["privacy"]["planned_steps"]
    eps = json.loads((work / "noisy" / "private" / "record.json").read_text())["privacy"]["epsilon"]
    assert isinstance(eps, float) and 0 < eps < 100


@pytest.mark.parametrize("name", ["clip_only", "noisy"])
def test_two_process_run_trains_the_single_process_model(runs, name):
    """Same dp_seed: same global batches, the same clipped sum and (noisy run) the same noise, added once."""
    work, single, _, _ = runs
    two, one = _params(work / name), _params(single[name].out_dir)
    assert two.keys() == one.keys()
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-5, err_msg=k)
    p2 = pd.read_parquet(work / name / "private" / "predictions.parquet")["score"].to_numpy()
    p1 = pd.read_parquet(single[name].out_dir / "private" / "predictions.parquet")["score"].to_numpy()
    np.testing.assert_allclose(p2, p1, rtol=0, atol=1e-5)
    init = load_checkpoint(work / name / "private" / CHECKPOINT)["trainer"]["model"]
    assert any(np.abs(init[k]).sum() > 0 for k in init)


@pytest.mark.parametrize("case", ["dp_hooks", "dp_ghost", "clip_only_hooks", "non_private"])
def test_distributed_steps_equal_single_process_steps(runs, case):
    """Empty share on one rank, empty global batch, multi-row units: the step is the single-process one."""
    r = runs[2][case]
    assert r["ranks_identical"]
    assert r["moved"] > 1e-3  # the steps did something
    assert r["max_diff_vs_single"] < 1e-5, r
    assert r["stats_diff"] < 1e-4  # loss and row counts are the global ones


def test_noise_is_added_once_with_std_sigma_c_over_b(runs):
    """Per-rank noise summed would give sqrt(2) x the std, the same noise on each rank 2 x."""
    r = runs[2]["noise"]
    assert r["ranks_identical"]
    assert abs(r["std_ratio"] - 1.0) < 0.05, r
    assert abs(r["mean"]) < 0.01
    assert r["max_diff_vs_single"] < 1e-5  # and it is the single-process noise realisation


def test_secure_rng_noise_and_samples_are_rank_zeros(runs):
    r = runs[2]["secure"]
    assert r["ranks_identical"] and r["noise_moved_params"] > 1e-3
    assert r["broadcast_samples_identical"]
    assert not r["raw_os_samples_identical"]  # why BroadcastSampler is needed


def test_a_failure_on_rank_zero_stops_every_rank(runs):
    rank0, rank1 = runs[2]["failure"]
    assert rank0 == "RunError: disk full"
    assert rank1.startswith("DistributedError: rank 1: stopping because rank 0 failed") and "disk full" in rank1


# ---------------------------------------------------------------- single-process unit tests


def test_share_keeps_units_whole_and_covers_the_batch():
    units = np.array([3, 3, 0, 5, 2, 2, 7, 0, 4])
    masks = [Distributed(rank=r, world_size=3).share(units) for r in range(3)]
    assert np.array_equal(np.sum(masks, axis=0), np.ones(len(units)))  # every row exactly once
    for m in masks:
        assert not set(units[m]) & set(units[~m])  # no unit on two ranks
    with pytest.raises(ValueError, match="rank"):
        Distributed(rank=2, world_size=2)


def test_single_process_context_is_a_no_op():
    assert not LOCAL.active and LOCAL.is_main
    assert LOCAL.on_main(lambda: 7) == 7 and LOCAL.broadcast_object("x") == "x"
    t = torch.ones(3)
    LOCAL.sum_([t])
    assert torch.equal(t, torch.ones(3))


def test_jax_backend_is_refused_under_distributed():
    recipe = load_recipe(RECIPE, ["trainer.backend=jax"])
    with pytest.raises(TrainerError, match="opacus backend only"):
        build_trainer(recipe, Distributed(rank=0, world_size=2))


if __name__ == "__main__":
    _driver(Path(sys.argv[1]))
