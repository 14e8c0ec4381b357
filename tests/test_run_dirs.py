"""Run directories are safe (issue: every run directory safe): one process per --out (a lock), an attempt killed
before it started is neither stuck nor charged twice, temporary files (one may hold the seed) never survive,
a refused run leaves nothing -- not even its budget reservation -- and resume/audit check the recipe the run
was trained with (config.yaml deleted or edited, a checkpoint of another recipe).

Runs are the tiny ACTG175 recipe with a declared public size (deterministic plans, seconds each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import accounting as acc
from dptrain.cli import main
from dptrain.config import load_recipe
from dptrain.lifecycle import CHECKPOINT, RunDir, RunError, Session
from dptrain.run import train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
TINY = ["training.epochs=1", "training.batch_size=256", "model.hidden=[8]", "privacy.epsilon=",
        "privacy.noise_multiplier=1.5", "privacy.dataset_size=1604"]
DATASET = "builtin:actg175"


def tiny(*extra: str):
    return load_recipe(RECIPE, [*TINY, *extra])


def _cli(out: Path, *extra: str, flags: tuple[str, ...] = ()) -> int:
    sets = [a for o in [*TINY, *extra] for a in ("--set", o)]
    return main(["train", str(RECIPE), *sets, "--out", str(out), "--quiet", *flags])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("dptrain: error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    return err


def _budget_runs() -> dict:
    return acc.DatasetBudget(acc.budget_path(DATASET)).runs()


# ---------------------------------------------------------------- one process per run directory


def test_a_second_process_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, capsys):
    out = tmp_path / "run"
    with Session(tiny(), out):
        with pytest.raises(RunError, match="another dptrain process is using this run directory"):
            Session(tiny(), out, resume=True)
        assert _cli(out, flags=("--resume",)) == 2
        assert "another dptrain process" in _one_line(capsys)
    assert not out.exists()  # the holder never started: it leaves nothing behind
    assert _cli(out) == 0  # the lock is gone with the session


# ---------------------------------------------------------------- atomic start and reclaimable reservations


def _killed_before_start(out: Path, run_id: str) -> None:
    """What an attempt leaves when killed after reserving its budget and before config.yaml/state.json: the
    folders, private/run_id, and a temporary file of the interrupted atomic write."""
    (out / "release").mkdir(parents=True)
    (out / "private").mkdir()
    (out / "private" / "run_id").write_text(run_id)
    (out / "release" / ".config.yaml.x1y2.tmp").write_text("name: half a reci")


@pytest.mark.parametrize("flags", [(), ("--resume",)], ids=["restart", "resume"])
def test_an_attempt_killed_before_it_started_is_reused_and_charged_once(tmp_path, flags, capsys):
    out = tmp_path / "run"
    run_id = "run-killedattempt"
    planned = acc.PrivacyLedger(relation="add_or_remove", privacy_unit="example")
    planned.compose(acc.PoissonSampling(256 / 1604).step_event(1.5), 7)
    acc.reserve_run(DATASET, run_id, planned, delta=1e-5, declared_epsilon=50.0)
    _killed_before_start(out, run_id)
    assert _cli(out, "privacy.dataset_budget=50", flags=flags) == 0, capsys.readouterr().err
    runs = _budget_runs()
    assert list(runs) == [run_id] and runs[run_id]["status"] == "settled"  # one run, charged once
    assert json.loads((out / "private" / "record.json").read_text())["run_id"] == run_id
    assert not list(out.rglob("*.tmp"))


def test_resume_of_an_empty_or_missing_directory_is_refused_and_writes_nothing(tmp_path, capsys):
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert _cli(out, flags=("--resume",)) == 2
        assert "no interrupted run" in _one_line(capsys)
        assert (not out.exists()) if out.name == "missing" else not any(out.iterdir())


def test_a_run_refused_after_it_reserved_leaves_nothing_and_cancels_its_reservation(tmp_path):
    out = tmp_path / "deep" / "run"
    recipe = tiny("privacy.dataset_budget=50")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with Session(recipe, out) as session:
            session.make_plan(1604)
            session.reserve_budget(DATASET)
            assert session.run_id in _budget_runs()
            raise RuntimeError("disk on fire")  # anything between the reservation and the start
    assert _budget_runs() == {}
    assert not (tmp_path / "deep").exists()


def test_a_budget_refusal_writes_nothing(tmp_path, capsys):
    assert _cli(tmp_path / "a", "privacy.dataset_budget=0.5") == 2
    assert "budget" in _one_line(capsys)
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- temporary files


def test_temporary_files_are_removed_on_resume_and_never_survive_a_finished_run(tmp_path):
    out = tmp_path / "run"
    train(tiny(), out, progress=False, keep_checkpoint=True)
    stray = [out / "private" / f".{CHECKPOINT}.abc.tmp", out / "release" / ".ledger.json.q.tmp"]
    for p in stray:
        p.write_bytes(b"a copy of the secret seed")
    assert main(["train", str(RECIPE), *[a for o in TINY for a in ("--set", o)], "--out", str(out), "--quiet",
                 "--resume"]) == 0  # a finished run: nothing to do but clean up
    assert not any(p.exists() for p in stray)

    interrupted = tmp_path / "interrupted"
    shutil.copytree(out, interrupted)
    (interrupted / "private" / "record.json").unlink()
    (interrupted / "private" / f".{CHECKPOINT}.zz.tmp").write_bytes(b"seed")
    train(tiny(), interrupted, resume=True, progress=False)
    assert not list(interrupted.rglob("*.tmp")) and not (interrupted / "private" / CHECKPOINT).exists()


# ---------------------------------------------------------------- resume and audit integrity


@pytest.fixture
def interrupted(tmp_path) -> Path:
    """A finished run with its checkpoint kept, turned into an interrupted one (record removed)."""
    out = tmp_path / "run"
    train(tiny(), out, progress=False, keep_checkpoint=True)
    (out / "private" / "record.json").unlink()
    return out


def test_resume_after_config_yaml_was_deleted_checks_the_recorded_recipe(interrupted, capsys):
    (interrupted / "release" / "config.yaml").unlink()
    assert _cli(interrupted, "seed=7", flags=("--resume",)) == 2  # another recipe: refused
    assert "recorded when the run started" in _one_line(capsys)
    assert _cli(interrupted, flags=("--resume",)) == 0  # the same recipe resumes (config.yaml restored)
    assert (interrupted / "release" / "config.yaml").exists()


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path, interrupted, capsys):
    other = tmp_path / "other"
    train(tiny("seed=7"), other, progress=False, keep_checkpoint=True)
    (other / "private" / "record.json").unlink()
    shutil.copy(interrupted / "private" / CHECKPOINT, other / "private" / CHECKPOINT)  # valid checksum
    assert _cli(other, "seed=7", flags=("--resume",)) == 2
    assert "written by another recipe" in _one_line(capsys)


def test_audit_refuses_a_run_whose_config_was_edited(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(), out, progress=False)
    cfg = out / "release" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("split_seed: 0", "split_seed: 5"))
    before = (out / "private" / "record.json").read_bytes()
    assert main(["audit", str(out)]) == 2
    assert "differs from the recipe the run was trained with" in _one_line(capsys)
    assert (out / "private" / "record.json").read_bytes() == before  # nothing rewritten


def test_garbage_state_or_record_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(), out, progress=False)
    (out / "private" / "record.json").write_bytes(b"\x00\xff garbage")
    assert _cli(out, flags=("--resume",)) == 2
    assert "record.json" in _one_line(capsys)
    (out / "private" / "record.json").unlink()
    (out / "private" / "state.json").write_text("[1, 2]")
    assert _cli(out, flags=("--resume",)) == 2
    assert "state.json" in _one_line(capsys)


# ---------------------------------------------------------------- --out that cannot be written


@pytest.mark.parametrize("kind", ["a file", "under a file", "/proc"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, kind, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    out = {"a file": f, "under a file": f / "run", "/proc": Path("/proc/dptrain-test-run")}[kind]
    assert _cli(out) == 2
    assert "--out" in _one_line(capsys)
    assert f.read_text() == "x" and not Path("/proc/dptrain-test-run").exists()
    assert RunDir(tmp_path).root.exists()


# ---------------------------------------------------------------- a killed sweep leaves no worker training

_SWEEP = """
import sys
from dptrain.config import load_recipe
from dptrain.report.sweep import run_sweep
run_sweep(load_recipe(sys.argv[1], ["training.epochs=400", "model.hidden=[8]", "privacy.dataset_size=1604"]),
          sys.argv[2], epsilons=[1.0], seeds=1, jobs=1)
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killing_a_sweep_kills_its_workers(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _SWEEP, str(RECIPE), str(tmp_path / "sweep")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not list((tmp_path / "sweep").glob("runs/*/release/config.yaml")):  # a worker is training
            assert proc.poll() is None and time.monotonic() - t0 < 120, "the sweep never started a point"
            time.sleep(0.1)
        workers = [c for c in _children(proc.pid) if "python" in Path(f"/proc/{c}/cmdline").read_text(errors="ignore")]
        assert workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
                  for w in workers):
            assert time.monotonic() - t0 < 20, "a worker kept training after its sweep was killed"
            time.sleep(0.1)
    finally:
        proc.kill()
