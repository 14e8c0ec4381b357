"""How many synthetic records per label: from a DP histogram of the real label counts, never raw counts.

``dp_label_counts`` releases the label histogram with the Gaussian mechanism (each privacy unit counted
once, L2 sensitivity 1 under add/remove, sqrt(2) under replace-one) and returns the noisy counts with the
DP event to compose into the run's ledger (``ledger.compose(event, label="label_histogram")``), so the
histogram's cost is part of the same epsilon as the fine-tuning. ``records_per_label`` turns noisy counts
(or a user-declared public prior) into integer generation targets summing to ``total``: negative noisy
counts count as 0 (post-processing), rounding by largest remainder.
"""

from __future__ import annotations

import numpy as np

import accounting as acc
from dptrain.trainers.sampler import secure_normal


def histogram_event(noise_multiplier: float, relation: str = acc.ADD_OR_REMOVE):
    """The DP event of ``dp_label_counts`` (known before the counts are drawn, for calibration)."""
    sens = acc.histogram_sensitivity(relation)
    return acc.gaussian_release_event(noise_multiplier * sens, sens)


def dp_label_counts(labels: np.ndarray, num_classes: int, *, noise_multiplier: float,
                    relation: str = acc.ADD_OR_REMOVE, rng: np.random.Generator | None = None,
                    secure: bool = False):
    """(noisy counts (float, one per class), DP event). Noise std = noise_multiplier x sensitivity.

    ``secure``: noise from the OS CSPRNG (as ``privacy.secure_rng``); else from ``rng`` or a generator
    seeded from OS entropy."""
    y = np.asarray(labels)
    if y.ndim != 1 or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"labels: expected class indices in [0, {num_classes}), got shape {y.shape}")
    if not noise_multiplier > 0:
        raise acc.InvalidParameterError("noise_multiplier", noise_multiplier,
                                        "a number > 0 (a histogram without noise would leak the raw counts)")
    sens = acc.histogram_sensitivity(relation)
    counts = np.bincount(y.astype(np.int64), minlength=num_classes).astype(np.float64)
    if secure:
        noise = secure_normal(num_classes)
    else:
        rng = rng or np.random.default_rng(int.from_bytes(np.random.SeedSequence().generate_state(2).tobytes(), "little"))
        noise = rng.normal(0.0, 1.0, num_classes)
    return counts + noise_multiplier * sens * noise, histogram_event(noise_multiplier, relation)


def records_per_label(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer targets proportional to ``max(weights, 0)`` summing to ``total`` (largest remainder)."""
    w = np.clip(np.asarray(weights, np.float64), 0.0, None)
    if not isinstance(total, (int, np.integer)) or total < 0:
        raise ValueError(f"total: expected an integer >= 0, got {total!r}")
    if w.sum() == 0:
        w = np.ones_like(w)  # no information left after noise: uniform
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[: total - out.sum()]] += 1
    return out
