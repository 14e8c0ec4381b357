"""Empirical privacy audit: one-run epsilon lower bounds and membership-inference metrics (``bounds``, with the
tabular/image canaries of ``canaries``), and canary-sentence exposure for language models (``exposure``)."""

from dptrain.audit.bounds import (
    abstention_grid,
    max_certifiable_epsilon,
    membership_inference_metrics,
    one_run_epsilon_lower_bound,
)

__all__ = [
    "abstention_grid",
    "max_certifiable_epsilon",
    "membership_inference_metrics",
    "one_run_epsilon_lower_bound",
]
