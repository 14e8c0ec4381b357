"""One-run epsilon lower bounds and membership-inference metrics.

The SNJ23 bound comes from jax-privacy; here it is checked against an independent implementation of the
(eps, delta) theorem of Steinke, Nasr & Jagielski (2023), against jax-privacy's public API, and
statistically, on mechanisms whose epsilon is known (randomized response, Gaussian).
"""

import math
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from scipy.special import expit, logit
from scipy.stats import binom

from dptrain.audit import (
    abstention_grid,
    max_certifiable_epsilon,
    membership_inference_metrics,
    one_run_epsilon_lower_bound,
)

auditing = pytest.importorskip("jax_privacy.auditing")


# ------------------------------------------------ independent reference (SNJ23 (eps, delta) theorem)


def ref_p_value(m, r, v, eps, delta):
    """P[>= v of r guesses correct] under an (eps, delta)-DP mechanism with m canaries (upper bound).

    f(v) = P[Binomial(r, e^eps/(1+e^eps)) >= v];  p = f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i.
    The binomial pmf is summed in log space with lgamma (no scipy), independently of jax-privacy.
    """
    log_q = -math.log1p(math.exp(-eps))
    log_1mq = -eps + log_q
    pmf = [
        math.exp(
            math.lgamma(r + 1) - math.lgamma(j + 1) - math.lgamma(r - j + 1) + j * log_q + (r - j) * log_1mq
        )
        for j in range(r + 1)
    ]
    tail = math.fsum(pmf[v:])
    if delta == 0:
        return tail
    running, worst = 0.0, 0.0
    for i in range(1, v + 1):
        running += pmf[v - i]  # = f(v - i) - f(v)
        worst = max(worst, running / i)
    return min(1.0, tail + 2 * m * delta * worst)


def ref_bound(p_value, alpha):
    """Largest eps with p_value(eps) <= alpha (0 if none), by bisection."""
    if p_value(0.0) > alpha:
        return 0.0
    lo, hi = 0.0, 60.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(mid) <= alpha else (lo, mid)
    return lo


def guesses_case(m, k_pos, correct_pos, k_neg=0, correct_neg=0, seed=0):
    """Distinct descending scores; inclusion bits making exactly the requested guesses correct."""
    rng = np.random.default_rng(seed)
    scores = -np.arange(m, dtype=float)
    included = rng.random(m) < 0.5
    included[:k_pos] = np.arange(k_pos) < correct_pos
    if k_neg:
        included[m - k_neg :] = np.arange(k_neg) >= correct_neg
    return scores, included


@pytest.mark.parametrize(
    "m, r, v, delta",
    [
        (1000, 100, 80, 0.0),
        (1000, 500, 400, 0.0),
        (100, 50, 50, 0.0),
        (1000, 30, 25, 0.0),
        (1000, 100, 80, 1e-5),
        (1000, 500, 400, 1e-5),
        (10000, 2000, 1500, 1e-5),
        (1000, 1000, 1000, 1e-5),
        (200, 100, 90, 1e-3),
    ],
)
def test_bound_matches_independent_snj23_implementation(m, r, v, delta):
    scores, included = guesses_case(m, r, v)
    res = one_run_epsilon_lower_bound(scores, included, delta=delta, confidence=0.95, k_pos=r)
    assert (res["num_guesses"], res["num_correct"], res["num_hypotheses"]) == (r, v, 1)
    expected = ref_bound(lambda e: ref_p_value(m, r, v, e, delta), 0.05)
    assert expected > 0
    assert res["epsilon_lower_bound"] == pytest.approx(expected, abs=1e-4)


def test_two_sided_guesses_count_correct_outs():
    scores, included = guesses_case(1000, 100, 90, k_neg=100, correct_neg=80)
    res = one_run_epsilon_lower_bound(scores, included, delta=1e-5, k_pos=100, k_neg=100)
    assert (res["num_guesses"], res["num_correct"]) == (200, 170)
    expected = ref_bound(lambda e: ref_p_value(1000, 200, 170, e, 1e-5), 0.05)
    assert res["epsilon_lower_bound"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("r, v", [(100, 80), (500, 300), (40, 40)])
def test_delta_zero_is_a_binomial_tail(r, v):
    alpha = 0.05
    expected = ref_bound(lambda e: binom.sf(v - 1, r, expit(e)), alpha)
    scores, included = guesses_case(1000, r, v)
    got = one_run_epsilon_lower_bound(scores, included, delta=0.0, k_pos=r)["epsilon_lower_bound"]
    assert got == pytest.approx(expected, abs=1e-4)
    if v == r:  # q^r <= alpha  <=>  eps <= logit(alpha^(1/r))
        assert got == pytest.approx(logit(alpha ** (1 / r)), abs=1e-4)


def test_agrees_with_jax_privacy_public_api_at_a_fixed_threshold():
    rng = np.random.default_rng(3)
    included = rng.random(500) < 0.5
    scores = 1.5 * included + rng.normal(size=500)
    threshold = float(np.sort(scores)[-60])  # 60 guesses
    public = auditing.CanaryScoreAuditor(scores[included], scores[~included]).epsilon_one_run(
        0.05, 1e-5, threshold_strategy=auditing.Explicit(threshold)
    )
    ours = one_run_epsilon_lower_bound(scores, included, delta=1e-5, k_pos=60)
    assert ours["num_guesses"] == 60
    assert public > 0
    assert ours["epsilon_lower_bound"] == pytest.approx(public, abs=1e-5)


# ---------------------------------------------------------------- monotonicity and extremes


def test_more_correct_guesses_give_a_larger_bound():
    bounds = []
    for v in range(100, 201, 10):
        scores, included = guesses_case(1000, 200, v)
        bounds.append(
            one_run_epsilon_lower_bound(scores, included, delta=1e-5, k_pos=200)["epsilon_lower_bound"]
        )
    assert bounds[0] == 0.0  # chance level
    assert all(b1 <= b2 for b1, b2 in zip(bounds, bounds[1:], strict=False))
    positive = [b for b in bounds if b > 0]
    assert len(positive) >= 5 and all(b1 < b2 for b1, b2 in zip(positive, positive[1:], strict=False))


def test_higher_confidence_or_delta_gives_a_smaller_bound():
    scores, included = guesses_case(1000, 300, 250)
    kw = {"k_pos": 300}
    base = one_run_epsilon_lower_bound(scores, included, delta=1e-5, **kw)["epsilon_lower_bound"]
    assert (
        one_run_epsilon_lower_bound(scores, included, delta=1e-5, confidence=0.99, **kw)[
            "epsilon_lower_bound"
        ]
        < base
    )
    assert one_run_epsilon_lower_bound(scores, included, delta=1e-3, **kw)["epsilon_lower_bound"] < base


def test_all_guesses_correct_reaches_max_certifiable():
    m = 1000
    rng = np.random.default_rng(1)
    included = np.zeros(m, dtype=bool)
    included[rng.permutation(m)[: m // 2]] = True  # exactly M/2 members: every grid guess can be right
    scores = included + rng.uniform(0, 0.1, m)
    res = one_run_epsilon_lower_bound(scores, included, delta=1e-5)
    assert res["num_correct"] == res["num_guesses"]
    assert res["num_hypotheses"] == len(abstention_grid(m))
    assert res["epsilon_lower_bound"] == pytest.approx(max_certifiable_epsilon(m, delta=1e-5), abs=1e-4)


def test_max_certifiable_epsilon_closed_form_at_delta_zero():
    # delta = 0: the best grid point guesses on all M canaries; all correct <=> q^M <= alpha / |grid|.
    for m in (100, 1000):
        alpha = 0.05 / len(abstention_grid(m))
        assert max_certifiable_epsilon(m, delta=0.0) == pytest.approx(logit(alpha ** (1 / m)), abs=1e-4)


def test_max_certifiable_epsilon_is_small_with_few_canaries():
    eps = {m: max_certifiable_epsilon(m, delta=1e-5) for m in (100, 1000)}
    assert 2.5 < eps[100] < 3.0 and 4.8 < eps[1000] < 5.2
    assert max_certifiable_epsilon(1000, delta=1e-5, confidence=0.99) < eps[1000]


def test_chance_level_scores_certify_nothing():
    positive = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        res = one_run_epsilon_lower_bound(rng.normal(size=1000), included, delta=1e-5)
        positive += res["epsilon_lower_bound"] > 0
    assert positive <= 2  # the scores are 0-DP: a positive bound is a 5% event


# ---------------------------------------------------------------- statistical validity on known mechanisms


def randomized_response(seed, m=1000, eps=2.0):
    """Each canary's score reveals its bit through eps-DP randomized response (+ independent jitter)."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < expit(eps)
    return np.where(truthful, included, ~included) + rng.uniform(0, 0.5, m), included


def test_randomized_response_bound_is_valid_and_informative():
    bounds = np.array(
        [
            one_run_epsilon_lower_bound(*randomized_response(seed), delta=1e-5)["epsilon_lower_bound"]
            for seed in range(40)
        ]
    )
    # Valid 95% lower bound: above the true eps = 2 in at most ~5% of runs (measured ~1% with the
    # Bonferroni correction; ~19% without it, which this assertion catches).
    assert (bounds > 2.0).sum() <= 2
    assert bounds.mean() > 1.4  # randomized response is the case where SNJ23 is nearly tight


def test_gaussian_mechanism_bound_is_valid():
    eps, delta = 2.0, 1e-5
    sigma = dp_accounting.get_sigma_gaussian(eps, delta)  # score = bit + N(0, sigma^2) is (2, 1e-5)-DP
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        scores = included + sigma * rng.normal(size=1000)
        bounds.append(one_run_epsilon_lower_bound(scores, included, delta=delta)["epsilon_lower_bound"])
    assert max(bounds) <= eps
    assert np.mean(bounds) > 0.2


def test_non_private_model_certifies_close_to_the_maximum():
    rng = np.random.default_rng(7)
    included = rng.random(1000) < 0.5
    scores = -np.where(included, rng.uniform(0.0, 0.1, 1000), rng.uniform(1.0, 3.0, 1000))  # minus loss
    res = one_run_epsilon_lower_bound(scores, included, delta=1e-5)
    cap = max_certifiable_epsilon(1000, delta=1e-5)
    assert cap - 0.5 < res["epsilon_lower_bound"] <= cap + 1e-6


# ---------------------------------------------------------------- ties, result, inputs


def test_ties_across_the_cut_are_abstained_on_not_broken_by_order():
    included = np.r_[np.ones(50, dtype=bool), np.zeros(50, dtype=bool)]  # members listed first
    res = one_run_epsilon_lower_bound(np.zeros(100), included, delta=1e-5, k_pos=50)
    assert (res["num_guesses"], res["epsilon_lower_bound"]) == (0, 0.0)
    res = one_run_epsilon_lower_bound(np.zeros(100), included, delta=1e-5)
    assert (res["num_guesses"], res["epsilon_lower_bound"]) == (0, 0.0)
    scores = np.r_[3.0, 2.0, 2.0, np.zeros(97)]
    assert one_run_epsilon_lower_bound(scores, np.ones(100), delta=0, k_pos=2)["num_guesses"] == 1
    assert one_run_epsilon_lower_bound(scores, np.ones(100), delta=0, k_pos=3)["num_guesses"] == 3


def test_result_fields():
    scores, included = guesses_case(200, 50, 45)
    res = one_run_epsilon_lower_bound(scores, included, delta=1e-6, confidence=0.9)
    assert {
        "epsilon_lower_bound",
        "num_guesses",
        "num_correct",
        "k_pos",
        "k_neg",
        "confidence",
        "delta",
        "method",
        "num_canaries",
        "num_hypotheses",
        "significance_per_hypothesis",
    } <= set(res)
    assert (res["confidence"], res["delta"], res["num_canaries"]) == (0.9, 1e-6, 200)
    assert (res["k_pos"], res["k_neg"]) in abstention_grid(200)
    assert res["significance_per_hypothesis"] == pytest.approx(0.1 / res["num_hypotheses"])
    assert "Bonferroni" in res["method"]


def test_abstention_grid_depends_only_on_m():
    assert abstention_grid(1) == [(1, 0)]
    for m in (2, 10, 100, 1000, 10000):
        grid = abstention_grid(m)
        assert len(set(grid)) == len(grid)
        assert all(kp >= 1 and kn >= 0 and kp + kn <= m for kp, kn in grid)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scores": [1.0, np.nan], "included": [1, 0]}, "NaN"),
        ({"scores": [1.0, 2.0], "included": [1, 0, 1]}, "shape"),
        ({"scores": [1.0, 2.0], "included": [1, 2]}, "0/1"),
        ({"scores": [1.0, 2.0], "included": [1, 0], "delta": 1.0}, "delta"),
        ({"scores": [1.0, 2.0], "included": [1, 0], "confidence": 1.0}, "confidence"),
        ({"scores": [1.0, 2.0], "included": [1, 0], "k_pos": 2, "k_neg": 1}, "k_pos"),
        ({"scores": [1.0, 2.0], "included": [1, 0], "k_pos": 0}, "k_pos"),
    ],
)
def test_invalid_inputs(kwargs, match):
    kwargs.setdefault("delta", 1e-5)
    with pytest.raises(ValueError, match=match):
        one_run_epsilon_lower_bound(**kwargs)


def test_import_does_not_load_jax():
    code = "import sys, dptrain.audit; assert 'jax' not in sys.modules and 'jax_privacy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- membership-inference metrics


def test_mia_metrics_small_hand_case():
    res = membership_inference_metrics([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0])
    # Pairs (member, non-member) ranked correctly: 3 + 3 + 2 of 9. With 3 non-members, FPR <= 1% means no
    # false positive: the best rule is score >= 0.8, catching 2 of 3 members.
    assert res == {
        "auc": pytest.approx(8 / 9),
        "tpr_at_0.1%_fpr": pytest.approx(2 / 3),
        "tpr_at_1%_fpr": pytest.approx(2 / 3),
        "n_pos": 3,
        "n_neg": 3,
    }


def test_mia_metrics_distinguish_the_two_fprs():
    negatives = np.arange(1000) / 1000  # 0.000 .. 0.999
    positives = np.array([0.9995, 0.9985, 0.9905, 0.5])
    scores = np.r_[positives, negatives]
    labels = np.r_[np.ones(4), np.zeros(1000)]
    res = membership_inference_metrics(scores, labels)
    # FPR <= 0.1%: at most 1 false positive -> score >= 0.9985 (FP: 0.999) catches 2 members.
    # FPR <= 1%: at most 10 -> score >= 0.9905 (FP: 0.991..0.999) catches 3.
    assert res["tpr_at_0.1%_fpr"] == pytest.approx(0.5)
    assert res["tpr_at_1%_fpr"] == pytest.approx(0.75)
    # Non-members beaten: 1000, 999, 991 and 500 + a tie at 0.5 counted 1/2.
    assert res["auc"] == pytest.approx((1000 + 999 + 991 + 500.5) / 4000)
    assert (res["n_pos"], res["n_neg"]) == (4, 1000)


def test_mia_metrics_ties_infinities_and_single_class():
    res = membership_inference_metrics(np.zeros(10), np.r_[np.ones(5), np.zeros(5)])
    assert (res["auc"], res["tpr_at_0.1%_fpr"], res["tpr_at_1%_fpr"]) == (0.5, 0.0, 0.0)
    # Each score shared by one member and one non-member: the ROC is the diagonal through (i/n, i/n), and
    # the rule score >= t for the 10th-highest score has FPR = TPR = 1%.
    levels = np.arange(1000.0)
    res = membership_inference_metrics(np.r_[levels, levels], np.r_[np.ones(1000), np.zeros(1000)])
    assert (res["tpr_at_0.1%_fpr"], res["tpr_at_1%_fpr"]) == (0.001, 0.01)
    assert res["auc"] == pytest.approx(0.5)
    res = membership_inference_metrics([np.inf, 0.0, -np.inf, -np.inf], [1, 1, 0, 1])
    assert res["auc"] == pytest.approx(2.5 / 3)
    assert res["tpr_at_1%_fpr"] == pytest.approx(2 / 3)
    res = membership_inference_metrics([0.1, 0.2], [1, 1])
    assert math.isnan(res["auc"]) and math.isnan(res["tpr_at_1%_fpr"]) and res["n_neg"] == 0


def test_mia_metrics_against_jax_privacy():
    rng = np.random.default_rng(5)
    labels = rng.random(3000) < 0.5
    scores = np.round(labels + rng.normal(size=3000), 1)  # rounding makes ties
    res = membership_inference_metrics(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        pos.size * neg.size
    )
    assert res["auc"] == pytest.approx(pairwise, abs=1e-12)
    auditor = auditing.CanaryScoreAuditor(pos, neg)
    # jax-privacy's AUC is that of the ROC convex hull (randomised rules): an upper bound on ours.
    assert res["auc"] <= auditor.attack_auroc() + 1e-12
    # jax-privacy interpolates between thresholds (randomised rules), so it can only be higher.
    for key, fpr in (("tpr_at_0.1%_fpr", 0.001), ("tpr_at_1%_fpr", 0.01)):
        assert res[key] <= auditor.tpr_at_given_fpr(fpr) + 1e-12
        assert res[key] > 0
