"""The audit of one trained run: canary one-run lower bound + membership inference, -> ``audit.json``.

Two attacks, both scored by the per-example loss (score = -loss; higher = more likely a member):

* canaries (if the run has them): the Steinke-Nasr-Jagielski one-run lower bound on epsilon at the
  configured confidence, the largest bound the audit could certify with that many canaries, and the
  canary membership-inference AUC / TPR at 0.1% and 1% FPR;
* real records: a loss-threshold attack on the (real) training examples vs the held-out test examples
  (AUC, TPR at low FPR). Only these aggregates are stored, never a per-example loss of a real record.

A lower bound above the claimed epsilon is impossible for a correct implementation (up to the
``1 - confidence`` chance the statement allows): the audit's ``status`` is then ``VIOLATION``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from accounting.statement import encode_float
from dptrain.audit.bounds import (
    max_certifiable_epsilon,
    membership_inference_metrics,
    one_run_epsilon_lower_bound,
)
from dptrain.audit.canaries import Canaries, canary_losses

FORMAT = "dptrain.audit/1"


def _mia(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    m = membership_inference_metrics(scores, labels)
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in m.items()}


def compute_audit(predict: Callable[[np.ndarray], np.ndarray], *, canaries: Canaries | None,
                  x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  claimed_epsilon: float, delta: float, confidence: float = 0.95) -> dict[str, Any]:
    """Run both attacks with the trained model's ``predict`` (class probabilities) and return audit.json."""
    out: dict[str, Any] = {"format": FORMAT, "claimed_epsilon": encode_float(claimed_epsilon), "delta": delta, "confidence": confidence, "score": "minus cross-entropy loss"}
    loss_in = canary_losses(predict(x_train), y_train)
    loss_out = canary_losses(predict(x_test), y_test)
    out["loss_attack"] = {"members": "real training examples", "non_members": "held-out test examples",
                          **_mia(-np.concatenate([loss_in, loss_out]),
                                 np.r_[np.ones(len(loss_in), bool), np.zeros(len(loss_out), bool)])}
    if canaries is None or len(canaries) == 0:
        out.update({"epsilon_lower_bound": None, "max_certifiable_epsilon": None, "canary_auc": None,
                    "status": "no canaries",
                    "message": "no canary audit (set privacy.audit.canaries, e.g. 1000); loss attack only"})
        return out
    scores = -canary_losses(predict(canaries.x), canaries.y)
    bound = one_run_epsilon_lower_bound(scores, canaries.included, delta=delta, confidence=confidence)
    mia = _mia(scores, canaries.included)
    lb = float(bound["epsilon_lower_bound"])
    out.update({
        "epsilon_lower_bound": lb,
        "max_certifiable_epsilon": float(max_certifiable_epsilon(len(canaries), delta=delta, confidence=confidence)),
        "canary_auc": mia["auc"],
        "canaries": {"num_canaries": len(canaries), "kind": "out-of-distribution, random label (synthetic)",
                     **{k: v for k, v in bound.items() if k not in ("epsilon_lower_bound", "confidence", "delta")},
                     **{k: v for k, v in mia.items() if k != "auc"}},
    })
    if math.isfinite(claimed_epsilon) and lb > claimed_epsilon:
        out["status"] = "VIOLATION"
        out["message"] = (f"PRIVACY VIOLATION: the audit certifies epsilon >= {lb:.3f} with {confidence:.0%} "
                          f"confidence, above the claimed epsilon {claimed_epsilon:.3f}. The sampling, clipping or "
                          "noise of this run does not deliver its accounted guarantee: do not release it; "
                          "report a bug.")
    else:
        out["status"] = "ok"
        out["message"] = (f"empirical lower bound {lb:.3f} <= claimed epsilon "
                          f"{'inf' if math.isinf(claimed_epsilon) else f'{claimed_epsilon:.3f}'} "
                          f"(this audit could certify at most {out['max_certifiable_epsilon']:.3f})")
    return out


__all__ = ["FORMAT", "compute_audit"]
