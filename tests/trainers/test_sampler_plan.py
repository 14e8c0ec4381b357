"""The unit sampler samples what the plan accounts; the plan computes q, delta and steps honestly."""

import math

import numpy as np
import pytest

import accounting as acc
from dptrain.config import parse_recipe
from dptrain.trainers.plan import PrivacyPlan, UnitCount, count_units, default_delta
from dptrain.trainers.sampler import UnitSampler


def test_poisson_rate_and_whole_units():
    units = np.repeat(np.arange(200), 3)  # 200 patients with 3 rows each
    s = UnitSampler(units, 200, acc.PoissonSampling(0.1), dp_seed=7)
    sizes = []
    for step in range(300):
        rows = s.sample(step)
        picked = units[rows]
        assert all((picked == u).sum() == 3 for u in np.unique(picked))  # a unit comes with all its rows
        sizes.append(len(np.unique(picked)))
    assert abs(np.mean(sizes) - 20) < 4 * math.sqrt(200 * 0.1 * 0.9 / 300)


def test_counter_based_randomness_resumes_exactly():
    units = np.arange(100)
    a = UnitSampler(units, 100, acc.PoissonSampling(0.2), dp_seed=1)
    b = UnitSampler(units, 100, acc.PoissonSampling(0.2), dp_seed=1)
    c = UnitSampler(units, 100, acc.PoissonSampling(0.2), dp_seed=2)
    assert np.array_equal(a.sample(17), b.sample(17))  # no state: step 17 is step 17
    assert not all(np.array_equal(a.sample(t), c.sample(t)) for t in range(5))


def test_empty_batches_happen_and_are_returned():
    s = UnitSampler(np.arange(10), 10, acc.PoissonSampling(0.01), dp_seed=3)
    assert any(len(s.sample(t)) == 0 for t in range(50))


def test_shuffled_epochs_visit_each_unit_once():
    s = UnitSampler(np.arange(50), 50, acc.ShuffledEpochs(50, 8), dp_seed=5)
    k = acc.ShuffledEpochs(50, 8).steps_per_epoch()
    for epoch in range(2):
        seen = np.concatenate([s.sample(epoch * k + i) for i in range(k)])
        assert sorted(seen) == list(range(50))
    with pytest.raises(ValueError, match="secure_rng"):
        UnitSampler(np.arange(50), 50, acc.ShuffledEpochs(50, 8), dp_seed=5, secure=True)
    # add/remove: one more unit changes no other unit's batch (the scheme's public size stays the same)
    bigger = UnitSampler(np.arange(51), 51, acc.ShuffledEpochs(50, 8), dp_seed=5)
    for t in range(2 * k):
        assert set(bigger.sample(t)) - {50} == set(s.sample(t))


def test_truncated_and_fixed_size():
    s = UnitSampler(np.arange(100), 100, acc.TruncatedPoissonSampling(100, 0.5, 40), dp_seed=0)
    assert max(len(s.sample(t)) for t in range(50)) <= 40
    f = UnitSampler(np.arange(100), 100, acc.FixedSizeSampling(100, 13), dp_seed=0)
    assert all(len(f.sample(t)) == 13 for t in range(10))


def test_secure_poisson_rate():
    s = UnitSampler(np.arange(1000), 1000, acc.PoissonSampling(0.3), dp_seed=0, secure=True)
    sizes = [len(s.sample(t)) for t in range(20)]
    assert abs(np.mean(sizes) - 300) < 4 * math.sqrt(1000 * 0.21 / 20)


def _recipe(**privacy):
    return parse_recipe({"data": {"source": "builtin:actg175"}, "privacy": {"epsilon": 4, **privacy},
                         "training": {"epochs": 2, "batch_size": 100}})


DECLARED = UnitCount(1000, "declared")


def test_plan_from_recipe_is_explicit_and_meets_the_target():
    plan = PrivacyPlan.from_recipe(_recipe(), DECLARED)
    assert plan.scheme.sampling_rate == pytest.approx(0.1) and plan.expected_batch_size == pytest.approx(100)
    assert plan.steps == 20 and plan.delta == default_delta(1000) == 1e-4
    assert plan.delta < 1 / 1000
    assert plan.planned_ledger().epsilon(plan.delta) <= 4
    assert plan.planned_ledger().steps == plan.steps
    shuffled = PrivacyPlan.from_recipe(_recipe(sampling="shuffled"), DECLARED)
    assert shuffled.relation == "add_or_remove" and shuffled.planned_ledger().epsilon(shuffled.delta) <= 4


def test_a_dp_count_is_released_composed_and_paid_for():
    """Under add/remove n is private: the plan uses a Gaussian DP count, composes its event into the planned
    ledger and calibrates the training noise so that count + training meet the target."""
    recipe = _recipe()
    counted = count_units(recipe, 1000)
    assert counted.source == "dp_count" and counted.noise_multiplier == recipe.privacy.count_noise_multiplier
    assert abs(counted.value - 1000) < 8 * recipe.privacy.count_noise_multiplier
    plan = PrivacyPlan.from_recipe(recipe, counted)
    assert [label for label, _ in plan.releases] == ["unit_count"]
    led = plan.planned_ledger()
    assert led.count("unit_count") == 1 and led.epsilon(plan.delta) <= 4
    assert plan.scheme.sampling_rate == pytest.approx(100 / counted.value)
    declared = PrivacyPlan.from_recipe(recipe, DECLARED)
    assert declared.noise_multiplier < plan.noise_multiplier or counted.value != 1000  # the count is paid for
    assert count_units(_recipe(dataset_size=1234), 1000) == UnitCount(1234, "declared")
    assert count_units(_recipe(epsilon=float("inf")), 1000).source == "exact"  # non-private: says so


def test_an_unreachable_target_says_the_count_needs_budget_too():
    with pytest.raises(acc.UnreachableTargetError):
        PrivacyPlan.from_recipe(_recipe(epsilon=0.05), count_units(_recipe(epsilon=0.05), 1000))


@pytest.mark.parametrize("privacy, field", [
    ({"delta": 0.01}, "privacy.delta"), ({"epsilon": None, "noise_multiplier": 0.0}, "privacy.noise_multiplier")])
def test_plan_refuses_dishonest_settings(privacy, field):
    with pytest.raises(acc.InvalidParameterError, match=field):
        PrivacyPlan.from_recipe(_recipe(**privacy), DECLARED)


def test_default_delta_is_well_below_one_over_n():
    for n in (10, 1604, 60000):
        assert default_delta(n) <= 1 / (10 * n) < 1 / n
