"""Statistical core of the empirical privacy audit: one-run epsilon lower bounds and membership inference.

Setting (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run", arXiv:2305.08846):
``M`` canaries are each included in training independently with probability 1/2. After training the
auditor, who knows the inclusion bits, gets one score per canary (higher = more likely a member, e.g.
minus the loss), guesses "in" on the ``k_pos`` highest-scored canaries and "out" on the ``k_neg``
lowest-scored ones, abstains on the rest, and counts the correct guesses.

Guarantee. If training is (eps, delta)-DP with respect to adding or removing one canary, then with
probability >= ``confidence`` over the inclusion coins (and the training randomness), the bound returned
by :func:`one_run_epsilon_lower_bound` is <= eps. Equivalently: with probability >= confidence, the
mechanism is not (eps', delta)-DP for any eps' below the bound. It is a *lower* bound on the true epsilon,
never an estimate of it, and it is not an epsilon from the accountant: report it as "empirical lower bound".

The bound itself (SNJ23's theorem for (eps, delta)-DP, as in the paper's reference code: p-value
``f(v) + 2 m delta max_i (f(v-i) - f(v)) / i`` with ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``,
solved for eps by root finding) is computed by jax-privacy (``jax_privacy.auditing._epsilon_one_run``, the
routine behind the public ``CanaryScoreAuditor.epsilon_one_run``); the tests cross-check it against an
independent implementation and against the public method. jax-privacy is imported lazily, only when a
bound is computed.

Choice of abstention level (k_pos, k_neg). Unless both are given (fixed before looking at the scores), the
bound is the best over :func:`abstention_grid` (``M``), a fixed grid that depends only on ``M``, and every
grid point is tested at significance ``(1 - confidence) / len(grid)`` (Bonferroni), so the search is paid
for and the guarantee above holds for the maximum. (jax-privacy's own ``Bonferroni()`` strategy searches
every score threshold and divides by the number of thresholds on the data's ROC Pareto frontier, a count
that depends on the data; we use a data-independent grid instead so the union bound is exact.)

Sharp edges:

- One-run bounds are loose. With ``M`` canaries even a perfect attack on a non-private model certifies
  at most :func:`max_certifiable_epsilon` (``M``): at delta=1e-5 and 95%, about 2.8 for M=100, 5.0 for
  M=1000, 5.4 for M=3000 and 5.2 for M=10000. More canaries stop helping once ``2 M delta`` is not small
  (the delta term of the theorem grows with M). So "bound << theoretical epsilon" is the expected
  outcome, not evidence of privacy: compare the bound with the maximum certifiable value too.
- The guarantee needs the inclusion coins to be independent fair coins, drawn after the canaries are
  fixed and hidden from everything except the training data set: not in file order, ids, logs, sampling
  seeds, hyperparameter or early-stopping decisions. Each canary must be one privacy unit (one patient
  under patient-level DP).
- Guesses depend on the scores only. Canaries tied in score across the top-k (or bottom-k) cut are
  abstained on instead of broken by canary order, which could leak the coins; so ``num_guesses`` can be
  smaller than ``k_pos + k_neg``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "abstention_grid",
    "max_certifiable_epsilon",
    "membership_inference_metrics",
    "one_run_epsilon_lower_bound",
]

METHOD = "steinke-nasr-jagielski-2023 one-run (jax_privacy.auditing)"

# Abstention grid, as fractions of the number of canaries M. Two-sided: k_pos = k_neg = floor(f * M).
# One-sided: k_pos = max(1, floor(f * M)), k_neg = 0. A perfect attack gets every guess right up to
# about f = 0.45 two-sided (the number of members is M/2 +- O(sqrt(M))), hence the points near 1/2.
_TWO_SIDED_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5)
_ONE_SIDED_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def require_jax_privacy() -> None:
    """Raise ImportError (with the install command) if the bound's implementation is missing."""
    _auditing()


def _auditing():
    try:
        from jax_privacy import auditing
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dptrain.audit needs jax-privacy for the one-run epsilon bound; fix: pip install jax-privacy "
            "(2.0.0, Python >= 3.11)"
        ) from e
    return auditing


def _snj23_epsilon(eps_lo: float, m: int, r: int, v: int, significance: float, delta: float) -> float:
    """Largest eps >= eps_lo that r guesses with v correct reject at ``significance``, else eps_lo."""
    if r == 0:
        return eps_lo
    return float(_auditing()._epsilon_one_run(eps_lo, m, r, v, significance, delta))


def _check_delta_confidence(delta: float, confidence: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta: expected a value in [0, 1), got {delta!r}; fix: pass the run's delta")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence!r}; fix: e.g. 0.95")


def _as_scores(scores, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{name}: contains NaN; fix: score every canary (+-inf is allowed)")
    return s


def _as_bits(bits, n: int, name: str) -> np.ndarray:
    b = np.asarray(bits)
    if b.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) to match the scores, got {b.shape}")
    if b.dtype != bool:
        if not np.isin(b, (0, 1)).all():
            raise ValueError(f"{name}: expected booleans or 0/1, got values {np.unique(b)[:5]}")
        b = b.astype(bool)
    return b


def abstention_grid(num_canaries: int) -> list[tuple[int, int]]:
    """The fixed (k_pos, k_neg) grid searched when no abstention level is given; depends only on M."""
    m = int(num_canaries)
    if m < 1:
        raise ValueError(f"num_canaries: expected >= 1, got {num_canaries!r}")
    grid: list[tuple[int, int]] = []
    for f in _TWO_SIDED_FRACTIONS:
        k = math.floor(f * m + 1e-9)
        if k >= 1 and (k, k) not in grid:
            grid.append((k, k))
    for f in _ONE_SIDED_FRACTIONS:
        k = max(1, math.floor(f * m + 1e-9))
        if (k, 0) not in grid:
            grid.append((k, 0))
    return grid


def _guess_masks(scores: np.ndarray, k_pos: int, k_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """Canaries guessed "in" (top k_pos) and "out" (bottom k_neg), abstaining on ties across the cut."""
    m = scores.size
    ascending = np.sort(scores)
    if k_pos == 0:
        top = np.zeros(m, dtype=bool)
    elif k_pos == m:
        top = np.ones(m, dtype=bool)
    else:
        top = scores > ascending[m - k_pos - 1]  # strictly above the (k_pos + 1)-th largest score
    if k_neg == 0:
        bottom = np.zeros(m, dtype=bool)
    elif k_neg == m:
        bottom = np.ones(m, dtype=bool)
    else:
        bottom = scores < ascending[k_neg]  # strictly below the (k_neg + 1)-th smallest score
    assert not (top & bottom).any(), "top and bottom guesses overlap"
    return top, bottom


def one_run_epsilon_lower_bound(
    scores,
    included,
    *,
    delta: float,
    confidence: float = 0.95,
    k_pos: int | None = None,
    k_neg: int | None = None,
) -> dict:
    """One-run (SNJ23) empirical epsilon lower bound from canary scores and inclusion bits.

    With probability >= ``confidence`` over the inclusion coins, the mechanism is not (eps, delta)-DP for
    any eps below ``epsilon_lower_bound``. Valid only if ``included`` holds independent fair coins hidden
    from everything but training, and the scores were computed without using them.

    Args:
        scores: shape (M,), one per canary; higher means "more likely a member" (e.g. minus the loss).
        included: shape (M,), bool or 0/1: whether each canary was in the training data.
        delta: the delta of the DP claim being audited (usually the run's delta).
        confidence: probability that the bound is valid, e.g. 0.95.
        k_pos, k_neg: guess "in" on the k_pos highest and "out" on the k_neg lowest scores. Pass them only
            if fixed before seeing the scores (a missing one counts as 0). If both are None, the best over
            :func:`abstention_grid` (M) is returned, each point tested at (1 - confidence) / len(grid).

    Returns:
        dict with ``epsilon_lower_bound`` (>= 0), ``num_guesses`` and ``num_correct`` at the chosen level,
        the chosen ``k_pos``/``k_neg`` (requested sizes; ties at the cut are abstained on), ``confidence``,
        ``delta``, ``method``, ``num_canaries``, ``num_hypotheses`` (grid size, 1 if k was given) and
        ``significance_per_hypothesis``.
    """
    s = _as_scores(scores)
    inc = _as_bits(included, s.size, "included")
    _check_delta_confidence(delta, confidence)
    m = s.size
    if k_pos is None and k_neg is None:
        grid = abstention_grid(m)
    else:
        kp, kn = int(k_pos or 0), int(k_neg or 0)
        if kp < 0 or kn < 0 or kp + kn > m or kp + kn == 0:
            raise ValueError(
                f"k_pos, k_neg: expected non-negative with 1 <= k_pos + k_neg <= M={m}, got {k_pos}, {k_neg}"
            )
        grid = [(kp, kn)]
    significance = (1.0 - confidence) / len(grid)

    best = None
    for kp, kn in grid:
        top, bottom = _guess_masks(s, kp, kn)
        r = int(top.sum() + bottom.sum())
        v = int(inc[top].sum() + (~inc[bottom]).sum())
        eps_lo = 0.0 if best is None else best["epsilon_lower_bound"]
        eps = _snj23_epsilon(eps_lo, m, r, v, significance, delta)
        if best is None or eps > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": eps, "num_guesses": r, "num_correct": v, "k_pos": kp, "k_neg": kn}
    assert best is not None
    best.update(
        confidence=float(confidence),
        delta=float(delta),
        method=METHOD
        + (", fixed k" if len(grid) == 1 else f", Bonferroni over {len(grid)} abstention levels"),
        num_canaries=m,
        num_hypotheses=len(grid),
        significance_per_hypothesis=significance,
    )
    return best


def max_certifiable_epsilon(num_canaries: int, *, delta: float, confidence: float = 0.95) -> float:
    """Largest bound :func:`one_run_epsilon_lower_bound` (default grid) can return with M canaries.

    It is the bound when every guess is correct, maximised over the same abstention grid with the same
    Bonferroni correction. A model that memorises its canaries perfectly certifies about this much, and
    no more, however non-private it is; a true epsilon above it cannot be detected with M canaries.
    """
    _check_delta_confidence(delta, confidence)
    grid = abstention_grid(num_canaries)
    significance = (1.0 - confidence) / len(grid)
    best = 0.0
    for r in sorted({kp + kn for kp, kn in grid}):
        best = max(best, _snj23_epsilon(0.0, int(num_canaries), r, r, significance, delta))
    return best


def _tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, n_neg: int, target: float) -> float:
    fp = np.rint(fpr * n_neg)
    return float(tpr[fp <= target * n_neg * (1 + 1e-12)].max())


def membership_inference_metrics(scores, labels) -> dict:
    """Membership-inference attack quality: AUC and TPR at 0.1% and 1% FPR.

    ``labels`` are 1 (or True) for members. ``auc`` is the empirical ROC AUC, i.e. the probability that a
    member outscores a non-member, ties counting 1/2 (not the AUC of the ROC convex hull, which
    jax-privacy's ``attack_auroc`` reports and which can only be larger). ``tpr_at_X_fpr`` is
    the largest true-positive rate of a deterministic threshold rule ``score >= t`` whose empirical
    false-positive rate is <= X, with no interpolation between thresholds (so with fewer than 1000
    non-members, 0.1% FPR means zero false positives). Scores may be +-inf (only their order matters).
    If one class is absent every rate is ``nan``. Keys: ``auc``, ``tpr_at_0.1%_fpr``, ``tpr_at_1%_fpr``,
    ``n_pos``, ``n_neg``.
    """
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score, roc_curve

    s = _as_scores(scores)
    y = _as_bits(labels, s.size, "labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    out = {"auc": math.nan, "tpr_at_0.1%_fpr": math.nan, "tpr_at_1%_fpr": math.nan}
    if n_pos and n_neg:
        ranks = rankdata(s)  # order-preserving, keeps ties, makes +-inf finite for sklearn
        fpr, tpr, _ = roc_curve(y, ranks, drop_intermediate=False)
        out = {
            "auc": float(roc_auc_score(y, ranks)),
            "tpr_at_0.1%_fpr": _tpr_at_fpr(fpr, tpr, n_neg, 0.001),
            "tpr_at_1%_fpr": _tpr_at_fpr(fpr, tpr, n_neg, 0.01),
        }
    out.update(n_pos=n_pos, n_neg=n_neg)
    return out
