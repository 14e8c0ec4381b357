"""Dataset budgets: spanning runs, refusing overspending without writing anything."""

import multiprocessing as mp

import pytest

import accounting as acc

DELTA = 1e-5


def run_ledger(sigma: float, steps: int = 200) -> acc.PrivacyLedger:
    led = acc.PrivacyLedger()
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
