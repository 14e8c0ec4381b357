"""Sweeps: the grid, run directories, resume by skipping, refusals, failures that do not stop the sweep."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

import accounting as acc
from dptrain.cli import main
from dptrain.lifecycle import RunDir
from dptrain.report import SweepError, parse_epsilons, run_sweep
from dptrain.report.sweep import DEFAULT_VALIDATION_FRACTION, check_one_split, plan_points
from tests.report.conftest import BACKENDS, EPSILONS, RECIPE, SEEDS, THRESHOLD, tiny_recipe


def test_parse_epsilons():
    assert parse_epsilons("0.5, 1,2,inf") == [0.5, 1.0, 2.0, math.inf]
    for bad, word in [("1,x", "'x' is not a number"), ("0,1", "must be > 0"), ("1,1", "listed twice"),
                      ("-2", "must be > 0"), ("nan", "must be > 0")]:
        with pytest.raises(SweepError, match=word):
            parse_epsilons(bad)


def test_plan_points_grid_and_refusals():
    pts = plan_points(tiny_recipe("seed=5"), [1.0, math.inf], 2, ["opacus", "jax"])
    assert [p.name for p, _ in pts] == ["opacus-eps1-seed5", "jax-eps1-seed5", "opacus-eps1-seed6", "jax-eps1-seed6",
                                        "opacus-epsinf-seed5", "jax-epsinf-seed5", "opacus-epsinf-seed6",
                                        "jax-epsinf-seed6"]
    for p, r in pts:
        assert (r.privacy.epsilon, r.seed, r.trainer.backend) == (p.epsilon, p.seed, p.backend)
    with pytest.raises(SweepError, match="--seeds"):
        plan_points(tiny_recipe(), [1.0], 0)
    with pytest.raises(SweepError, match="--backends: 'tf'"):
        plan_points(tiny_recipe(), [1.0], 1, ["tf"])
    with pytest.raises(SweepError, match="noise_multiplier"):
        plan_points(tiny_recipe("privacy.epsilon=", "privacy.noise_multiplier=1.0"), [1.0], 1)


def test_every_point_shares_one_split_with_a_validation_part():
    pts = plan_points(tiny_recipe("seed=3"), [1.0, 4.0], 3, ["opacus", "jax"])
    assert {(r.data.split_seed, r.data.validation_fraction) for _, r in pts} == {(0, DEFAULT_VALIDATION_FRACTION)}
    assert len({r.seed for _, r in pts}) == 3  # only the training seed varies
    kept = plan_points(tiny_recipe("data.validation_fraction=0.1", "data.split_seed=7"), [1.0], 2)
    assert {(r.data.split_seed, r.data.validation_fraction) for _, r in kept} == {(7, 0.1)}
    with pytest.raises(SweepError, match=r"sets data.validation_fraction=0.2 .*--set data.validation_fraction"):
        plan_points(tiny_recipe("data.test_fraction=0.85"), [1.0], 1)


def test_grid_with_different_splits_is_refused():
    """Points of one grid cannot differ in the split today; the check reads the point recipes anyway."""
    pts = plan_points(tiny_recipe(), [1.0], 2)
    (p1, r1) = pts[1]
    for field, value in (("split_seed", 1), ("validation_fraction", 0.3)):
        other = r1.model_copy(update={"data": r1.data.model_copy(update={field: value})})
        with pytest.raises(SweepError, match=rf"different data splits \(data.{field} .* vs .*\).*one "
                                             r"train/validation/test split.*not per point") as err:
            check_one_split([pts[0], (p1, other)])
        assert "\n" not in str(err.value)


def test_every_point_is_a_normal_finished_run(sweep_dir):
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(spec["points"]) == len(EPSILONS) * SEEDS * len(BACKENDS)
    assert spec["threshold"] == THRESHOLD
    assert spec["format"] == "dptrain.sweep/2"
    assert spec["split"] == {**spec["split"], "split_seed": 0, "validation_fraction": DEFAULT_VALIDATION_FRACTION}
    for name in spec["points"]:
        rd = RunDir(sweep_dir / "runs" / name)
        rec = rd.finished_record()
        assert set(rd.files()) == {"release", "private"}
        assert not rd.checkpoint.exists()
        backend, rest = name.split("-eps")
        eps = float(rest.split("-seed")[0])
        assert rec["training"]["backend"] == backend
        if math.isfinite(eps):
            # each point's own ledger, recomputed independently, meets its target
            led = acc.PrivacyLedger.load(rd.ledger)
            assert led.epsilon(rec["privacy"]["delta"]) == pytest.approx(rec["privacy"]["epsilon"], rel=1e-9)
            assert rec["privacy"]["epsilon"] <= eps
        else:
            assert rec["privacy"]["mode"] == "non_private" and "NOT PRIVATE" in rec["privacy"]["warning"]
    log = (sweep_dir / "progress.log").read_text()
    n = len(spec["points"])
    assert f"runs done {n}/{n}, running 0, left 0" in log and "running 2" in log


def test_rerun_skips_finished_and_resumes_interrupted(sweep_dir, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    mtimes = {p: p.stat().st_mtime_ns for p in copy.glob("runs/*/private/record.json")}
    assert len(mtimes) == len(EPSILONS) * SEEDS * len(BACKENDS)
    # an interrupted point: killed before its first checkpoint, so nothing was released and no record written
    # (release/config.yaml is there: resumable). A point whose outputs were released but whose checkpoint is gone
    # is refused instead (tests/synth/test_pe.py): a restart would release them again with new noise.
    victim = RunDir(copy / "runs" / "opacus-eps1-seed1")
    victim.record.unlink()
    for f in victim.release.iterdir():
        if f != victim.config:
            f.unlink() if f.is_file() else shutil.rmtree(f)
    assert victim.config.exists()
    lines: list[str] = []
    res = run_sweep(tiny_recipe(), copy, epsilons=EPSILONS, seeds=SEEDS, backends=BACKENDS, jobs=1,
                    threshold=THRESHOLD, progress=lines.append)
    assert res.statuses["opacus-eps1-seed1"] == "finished"
    assert sum(v == "skipped" for v in res.statuses.values()) == len(mtimes) - 1
    assert f"{len(mtimes) - 1} already finished, 1 to run" in lines[0]
    for p, t in mtimes.items():
        if p != victim.record:
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    rec = victim.finished_record()
    assert rec["training"]["resumed"] is True
    # the resumed run's ledger holds exactly the planned steps (nothing counted twice)
    assert acc.PrivacyLedger.load(victim.ledger).steps == rec["privacy"]["planned_steps"]


def test_other_grid_in_same_dir_is_refused(sweep_dir, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("runs"))
    with pytest.raises(SweepError, match="different sweep"):
        run_sweep(tiny_recipe(), copy, epsilons=[2.0], seeds=1, progress=lambda s: None)
    # a sweep.json of an earlier dptrain (no split recorded) is another sweep too: the splits would differ
    spec = json.loads((copy / "sweep.json").read_text())
    del spec["split"]
    (copy / "sweep.json").write_text(json.dumps(spec))
    with pytest.raises(SweepError, match="without a validation split"):
        run_sweep(tiny_recipe(), copy, epsilons=EPSILONS, seeds=SEEDS, backends=BACKENDS, threshold=THRESHOLD,
                  progress=lambda s: None)


def test_failed_point_does_not_stop_the_sweep(tmp_path, capsys):
    """A dataset budget of 1.2 admits one eps-1 run; the second is refused and reported, the sweep goes on."""
    out = tmp_path / "budget"
    rc = main(["sweep", str(RECIPE), "--epsilons", "1", "--seeds", "2", "--out", str(out), "--bootstrap", "200",
               "--set", "training.epochs=1", "--set", "model.hidden=[8]", "--set", "privacy.dataset_budget=1.2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED opacus-eps1-seed1: BudgetExceededError" in err
    assert (out / "failures" / "opacus-eps1-seed1.txt").exists()
    summary = pd.read_csv(out / "private" / "summary.csv")
    assert dict(zip(summary["run"], summary["status"], strict=True)) == {
        "opacus-eps1-seed0": "finished", "opacus-eps1-seed1": "failed"}
    assert "NOT IN THIS REPORT: opacus-eps1-seed1 (failed: BudgetExceededError" in (
        out / "private" / "report.md").read_text()
    assert json.loads((out / "release" / "selection.json").read_text())["backends"]["opacus"]["selected"]["run"] == \
        "opacus-eps1-seed0"


def test_cli_errors_are_one_line(tmp_path, capsys):
    for args, word in [(["--epsilons", "1,zero"], "--epsilons"), (["--epsilons", "1", "--jobs", "0"], "--jobs"),
                       (["--epsilons", "1", "--address", "x:1"], "--address")]:
        rc = main(["sweep", str(RECIPE), "--out", str(tmp_path / "x"), *args, "--set", "training.epochs=1"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("dptrain: error: ") and word in err and "Traceback" not in err
