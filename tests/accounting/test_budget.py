"""Dataset budgets: spanning runs, refusing overspending without writing anything."""

import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

import accounting as acc

DELTA = 1e-5


def run_ledger(sigma: float, steps: int = 200, accountant: str = "pld") -> acc.PrivacyLedger:
    led = acc.PrivacyLedger(accountant=accountant)
    led.compose(acc.PoissonSampling(0.01).step_event(sigma), steps)
    return led


def test_budget_spans_runs_and_refuses_overspending(tmp_path):
    path = tmp_path / "budget.json"
    budget = acc.DatasetBudget.create(path, epsilon=3.0, delta=DELTA)
    first = run_ledger(1.0)
    e1 = first.epsilon(DELTA)
    assert 0.5 < e1 < 3.0
    assert budget.reserve("run-1", first) == pytest.approx(e1)
    assert budget.spent() == pytest.approx(e1)
    budget.reserve("run-2", run_ledger(1.0))  # composition of two runs, < 3
    before = path.read_bytes()
    with pytest.raises(acc.BudgetExceededError, match="Nothing was written"):
        budget.reserve("run-3", run_ledger(0.6, 2000))
    assert path.read_bytes() == before
    assert set(acc.DatasetBudget(path).runs()) == {"run-1", "run-2"}


def test_reserve_is_idempotent_for_resume(tmp_path):
    budget = acc.DatasetBudget.create(tmp_path / "b.json", epsilon=2.0, delta=DELTA)
    led = run_ledger(1.2)
    a = budget.reserve("run", led)
    b = budget.reserve("run", led)
    assert a == b == pytest.approx(budget.spent())


def test_settle_to_actual_and_never_above_reservation(tmp_path):
    budget = acc.DatasetBudget.create(tmp_path / "b.json", epsilon=5.0, delta=DELTA)
    budget.reserve("run", run_ledger(1.0, 400))
    budget.settle("run", run_ledger(1.0, 100))  # stopped early
    assert budget.spent() == pytest.approx(run_ledger(1.0, 100).epsilon(DELTA))
    with pytest.raises(acc.BudgetExceededError):
        budget.settle("run", run_ledger(1.0, 1000))


def test_budget_refuses_incompatible_relation_and_changed_totals(tmp_path):
    path = tmp_path / "b.json"
    budget = acc.DatasetBudget.create(path, epsilon=5.0, delta=DELTA)
    other = acc.PrivacyLedger(relation="replace_one")
    with pytest.raises(acc.InvalidParameterError, match="relation"):
        budget.reserve("x", other)
    with pytest.raises(acc.InvalidParameterError, match="cannot be changed"):
        acc.DatasetBudget.create(path, epsilon=10.0, delta=DELTA, exist_ok=True)
    assert acc.DatasetBudget.create(path, epsilon=5.0, delta=DELTA, exist_ok=True).epsilon == 5.0
    with pytest.raises(acc.InvalidParameterError):
        acc.DatasetBudget.create(path, epsilon=5.0, delta=DELTA)
    with pytest.raises(acc.InvalidParameterError, match="budget.epsilon"):
        acc.DatasetBudget.create(tmp_path / "c.json", epsilon=0, delta=DELTA)


def _reserve(args):
    path, name = args
    try:
        acc.DatasetBudget(path).reserve(name, run_ledger(1.0))
        return True
    except acc.BudgetExceededError:
        return False


def test_concurrent_reservations_never_overspend(tmp_path):
    path = tmp_path / "b.json"
    two = run_ledger(1.0, 400).epsilon(DELTA)  # == two 200-step runs composed
    three = run_ledger(1.0, 600).epsilon(DELTA)
    acc.DatasetBudget.create(path, epsilon=(two + three) / 2, delta=DELTA)  # room for 2 runs, not 3
    with mp.get_context("fork").Pool(3) as pool:
        ok = pool.map(_reserve, [(str(path), f"r{i}") for i in range(3)])
    assert sum(ok) == 2
    assert acc.DatasetBudget(path).spent() <= acc.DatasetBudget(path).epsilon


# ---- dataset budgets keyed to the dataset's identity, in one place (issue 14, finding 2) ----

@pytest.fixture(autouse=True)
def _dptrain_home(tmp_path, monkeypatch):
    """Every test keeps its budgets under tmp_path, never the real home."""
    home = tmp_path / "dptrain-home"
    monkeypatch.setenv("DPTRAIN_HOME", str(home))
    return home


def test_budgets_live_under_dptrain_home_keyed_only_by_dataset_id(tmp_path, monkeypatch, _dptrain_home):
    path = acc.budget_path("builtin:actg175")
    assert acc.budget_home() == _dptrain_home
    assert path.parent == _dptrain_home / "budgets" and path.suffix == ".json"
    monkeypatch.chdir(tmp_path)  # the path depends on nothing but the id (not cwd, not --out)
    assert acc.budget_path("builtin:actg175") == path
    assert acc.budget_path("builtin:actg175", tmp_path / "other") == tmp_path / "other" / "budgets" / path.name
    assert acc.budget_path("builtin:actg175x") != path
    assert acc.budget_path("id:a/b") != acc.budget_path("id:a_b")  # same slug, different ids
    for hostile in ("id:../../../etc/passwd", "id:" + "x" * 500, "id:/", "sha256:" + "f" * 64, "id:ä ö"):
        p = acc.budget_path(hostile)
        assert p.parent == _dptrain_home / "budgets"
        slug, digest = p.stem.rsplit("-", 1)
        assert len(slug) <= 40 and len(digest) == 16 and "/" not in p.name
    monkeypatch.setenv("DPTRAIN_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert acc.budget_home() == tmp_path / "user" / ".dptrain"
    # a run started from anywhere lands in the one budget under $DPTRAIN_HOME
    monkeypatch.setenv("DPTRAIN_HOME", str(_dptrain_home))
    acc.reserve_run("builtin:actg175", "r", run_ledger(1.0), delta=DELTA, declared_epsilon=5.0)
    assert path.exists() and set(acc.DatasetBudget(path).runs()) == {"r"}


def test_first_run_declaring_a_budget_creates_it_with_the_run_reserved():
    planned = run_ledger(1.0)
    budget = acc.reserve_run("id:trial", "run-1", planned, delta=DELTA, declared_epsilon=3.0)
    assert isinstance(budget, acc.DatasetBudget)
    assert budget.path == acc.budget_path("id:trial")
    assert (budget.epsilon, budget.delta, budget.dataset) == (3.0, DELTA, "id:trial")
    assert (budget.relation, budget.privacy_unit, budget.accountant) == ("add_or_remove", "example", "pld")
    reopened = acc.DatasetBudget(budget.path)
    assert reopened.runs() == {"run-1": {"status": "reserved"}}
    assert reopened.spent() == pytest.approx(planned.epsilon(DELTA))
    budget.settle("run-1", run_ledger(1.0, 100))
    assert reopened.runs() == {"run-1": {"status": "settled"}}


def test_run_on_a_dataset_without_a_budget_writes_nothing(_dptrain_home):
    assert acc.reserve_run("builtin:actg175", "r", run_ledger(1.0), delta=DELTA) is None
    assert not acc.budget_path("builtin:actg175").exists()


def test_run_not_declaring_a_budget_is_charged_on_a_dataset_that_has_one():
    total = run_ledger(1.0, 400).epsilon(DELTA) * 1.01  # room for two runs, not three
    acc.reserve_run("builtin:actg175", "declares", run_ledger(1.0), delta=DELTA, declared_epsilon=total)
    # omitting privacy.dataset_budget does not side-step it; the run's own delta does not matter either
    budget = acc.reserve_run("builtin:actg175", "omits", run_ledger(1.0), delta=1e-3)
    assert budget is not None and budget.delta == DELTA
    assert set(budget.runs()) == {"declares", "omits"}
    assert budget.spent() == pytest.approx(run_ledger(1.0, 400).epsilon(DELTA))
    before = budget.path.read_bytes()
    with pytest.raises(acc.BudgetExceededError, match="Nothing was written"):
        acc.reserve_run("builtin:actg175", "third", run_ledger(1.0), delta=DELTA)
    assert budget.path.read_bytes() == before


def test_refused_first_run_leaves_no_budget_file():
    path = acc.budget_path("id:small")
    with pytest.raises(acc.BudgetExceededError, match="Nothing was written"):
        acc.reserve_run("id:small", "big", run_ledger(0.6, 2000), delta=DELTA, declared_epsilon=0.5)
    assert not path.exists()
    # nothing was created, so a later run without a declared budget is still not charged
    assert acc.reserve_run("id:small", "next", run_ledger(1.0), delta=DELTA) is None
    assert not path.exists()


def test_declaring_a_different_budget_is_refused():
    acc.reserve_run("id:d", "a", run_ledger(1.0), delta=DELTA, declared_epsilon=4.0)
    path = acc.budget_path("id:d")
    before = path.read_bytes()
    with pytest.raises(acc.InvalidParameterError) as err:
        acc.reserve_run("id:d", "b", run_ledger(1.0), delta=DELTA, declared_epsilon=8.0)
    msg = str(err.value)
    assert "privacy.dataset_budget" in msg and "8.0" in msg and "4.0" in msg
    assert "remove privacy.dataset_budget or set it to 4.0" in msg
    assert path.read_bytes() == before
    # declaring the same budget again is fine
    assert set(acc.reserve_run("id:d", "b", run_ledger(1.0), delta=DELTA, declared_epsilon=4.0).runs()) == {"a", "b"}


def test_resumed_run_is_not_charged_twice():
    led = run_ledger(1.2)
    b1 = acc.reserve_run("id:r", "run", led, delta=DELTA, declared_epsilon=led.epsilon(DELTA) * 1.5)
    before = b1.path.read_bytes()
    b2 = acc.reserve_run("id:r", "run", led, delta=DELTA, declared_epsilon=b1.epsilon)
    b3 = acc.reserve_run("id:r", "run", led, delta=DELTA)
    assert b2.path == b3.path == b1.path and b1.path.read_bytes() == before
    assert b3.spent() == pytest.approx(led.epsilon(DELTA))


def test_reserve_run_refuses_another_relation_or_privacy_unit():
    acc.reserve_run("id:u", "a", run_ledger(1.0), delta=DELTA, declared_epsilon=5.0)
    for other in (acc.PrivacyLedger(relation="replace_one"), acc.PrivacyLedger(privacy_unit="patient")):
        with pytest.raises(acc.InvalidParameterError, match="relation and privacy unit"):
            acc.reserve_run("id:u", "b", other, delta=DELTA)
    assert set(acc.DatasetBudget(acc.budget_path("id:u")).runs()) == {"a"}


def test_budget_file_records_the_dataset_and_older_files_still_open(tmp_path):
    path = acc.DatasetBudget.create(tmp_path / "old.json", epsilon=2.0, delta=DELTA).path
    assert "dataset" not in json.loads(path.read_text())  # optional: budgets written before it was recorded
    assert acc.DatasetBudget(path).dataset is None
    b = acc.reserve_run("sha256:" + "ab" * 32, "r", run_ledger(1.0), delta=DELTA, declared_epsilon=2.0)
    assert json.loads(b.path.read_text())["dataset"] == "sha256:" + "ab" * 32


def _first_run(args):
    home, name, total = args
    try:
        acc.reserve_run("id:shared", name, run_ledger(1.0, accountant="rdp"), delta=DELTA,
                        declared_epsilon=total, home=Path(home))
        return True
    except acc.BudgetExceededError:
        return False


def test_concurrent_first_runs_admit_exactly_one_when_two_do_not_fit(tmp_path):
    one = run_ledger(1.0, accountant="rdp").epsilon(DELTA)  # rdp: quick to compose
    two = run_ledger(1.0, 400, accountant="rdp").epsilon(DELTA)
    total = (one + two) / 2  # each run alone fits, any two together exceed it
    with mp.get_context("fork").Pool(4) as pool:
        ok = pool.map(_first_run, [(str(tmp_path), f"r{i}", total) for i in range(4)])
    assert sum(ok) == 1
    budget = acc.DatasetBudget(acc.budget_path("id:shared", tmp_path))
    assert len(budget.runs()) == 1 and budget.epsilon == total
    assert budget.spent() <= budget.epsilon


def test_concurrent_first_runs_that_all_fit_are_all_recorded(tmp_path):
    total = run_ledger(1.0, 800, accountant="rdp").epsilon(DELTA) * 1.01
    with mp.get_context("fork").Pool(4) as pool:
        ok = pool.map(_first_run, [(str(tmp_path), f"r{i}", total) for i in range(4)])
    assert all(ok)
    budget = acc.DatasetBudget(acc.budget_path("id:shared", tmp_path))
    assert set(budget.runs()) == {f"r{i}" for i in range(4)}
    assert budget.spent() <= budget.epsilon


def _create_then_reserve(path, name, index, barrier, done):
    """Process ``index`` holds its first write until every process has looked for the file (the
    barrier) and ``index`` reservations are in (``done``); waits time out where the lock makes them
    impossible. Old code (check, then write, outside the lock) then overwrites earlier reservations."""
    import accounting.budget as budget_mod

    write, calls = budget_mod.atomic_write_json, []

    def held_write(p, obj):
        if not calls:
            try:
                barrier.wait(timeout=3.0)
            except threading.BrokenBarrierError:  # the others wait on the lock instead
                pass
            deadline = time.monotonic() + 2.0
            while done.value < index and time.monotonic() < deadline:
                time.sleep(0.01)
        calls.append(p)
        write(p, obj)

    budget_mod.atomic_write_json = held_write
    budget = acc.DatasetBudget.create(path, epsilon=50.0, delta=DELTA, accountant="rdp", exist_ok=True)
    budget.reserve(name, run_ledger(1.0, accountant="rdp"))
    with done.get_lock():
        done.value += 1


def test_concurrent_creates_never_lose_a_reservation(tmp_path):
    path = tmp_path / "b.json"
    ctx = mp.get_context("fork")
    barrier, done = ctx.Barrier(4), ctx.Value("i", 0)
    procs = [ctx.Process(target=_create_then_reserve, args=(path, f"r{i}", i, barrier, done)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert set(acc.DatasetBudget(path).runs()) == {f"r{i}" for i in range(4)}
