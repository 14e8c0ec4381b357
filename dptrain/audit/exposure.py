"""Canary exposure for language models (Carlini et al. 2019, "The Secret Sharer"): secret canary sentences,
reference candidates of the same format, and rank-based exposure from NLLs.

The text counterpart of :mod:`dptrain.audit.canaries` (which makes out-of-distribution *feature vectors* for
the one-run epsilon audit of tabular/image runs). Here a canary is a sentence ``fmt.format(code=...)`` whose
digit code is the secret; it is inserted into the training text (usually 1, 10, 100 times) and its exposure
measured after training. Exposure is an empirical memorisation measure, not an epsilon bound.

The canaries are secrets of the run (kept in ``private/``); exposures are computed from the model's scores
of them and are private too. This module loads no model: :func:`canary_exposure` takes a scoring function.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

CANARY_FORMAT = "The patient's record number is {code}."
MAX_CANARY_DIGITS = 18  # 10**18 codes still fit an int64


def _check_canary_args(digits, fmt: str) -> int:
    if isinstance(digits, bool) or not isinstance(digits, int | np.integer) or not 1 <= digits <= MAX_CANARY_DIGITS:
        raise ValueError(f"digits: must be an integer in [1, {MAX_CANARY_DIGITS}], got {digits!r}")
    if "{code}" not in fmt:
        raise ValueError(f"fmt: must contain '{{code}}', got {fmt!r}")
    return int(digits)


def _render(codes: Iterable[int], digits: int, fmt: str) -> list[str]:
    return [fmt.format(code=f"{int(c):0{digits}d}") for c in codes]


def make_canary_sentences(rng: np.random.Generator, count: int, *, digits: int = 6,
                          fmt: str = CANARY_FORMAT) -> list[str]:
    """``count`` distinct secret sentences ``fmt.format(code=...)``, codes uniform over the 10**digits
    zero-padded strings (sampled without replacement, so no two canaries coincide).

    The format is public, the code is the secret; insert each canary into the training data (usually
    repeated 1, 10, 100 times) and measure its ``exposure`` after training. Sharp edge: how a subword
    tokenizer splits the code differs from code to code, which adds noise to ranks. ``{code}`` is the plain
    digit string; choose ``fmt`` so that your tokenizer keeps the rest of the sentence identical.
    """
    digits = _check_canary_args(digits, fmt)
    space = 10 ** digits
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or not 0 <= count <= space:
        raise ValueError(f"count: must be an integer in [0, {space}] for digits={digits}, got {count!r}")
    return _render(rng.choice(space, size=int(count), replace=False), digits, fmt)


def canary_candidates(rng: np.random.Generator, count: int | None, *, digits: int = 6, exclude: Iterable[str] = (),
                      fmt: str = CANARY_FORMAT) -> list[str]:
    """Reference candidates for ``exposure``: ``count`` distinct sentences of the canary format whose codes
    are uniform over the code space minus the sentences in ``exclude`` (pass the inserted canaries).

    ``count=None`` enumerates the whole space minus ``exclude`` (in code order; ``rng`` unused) -- with
    every candidate as reference, ``exposure`` is Carlini's exact rank-based exposure. Raises ValueError
    when fewer than ``count`` candidates exist.
    """
    digits = _check_canary_args(digits, fmt)
    space = 10 ** digits
    excluded = set(exclude)
    if count is None:
        if space > 10 ** 7:
            raise ValueError(f"count=None would enumerate {space} candidates; pass a sample size")
        return [t for t in _render(range(space), digits, fmt) if t not in excluded]
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
        raise ValueError(f"count: must be a non-negative integer or None, got {count!r}")
    draw = min(space, int(count) + len(excluded))  # at most len(excluded) drawn codes get dropped
    # a uniformly ordered sample of distinct codes; dropping excluded ones and keeping the first `count`
    # leaves a uniform sample of the non-excluded codes.
    out = [t for t in _render(rng.choice(space, size=draw, replace=False), digits, fmt) if t not in excluded]
    if len(out) < count:
        raise ValueError(f"count: only {len(out)} candidates of {digits} digits remain after exclude, "
                         f"asked for {count}")
    return out[:int(count)]


def exposure(canary_nll: float, reference_nll) -> float:
    """Rank-based exposure of one canary (Carlini et al. 2019), from its NLL and those of reference candidates.

    Carlini's definition over the full candidate space R (canary included): ``exposure = log2|R| -
    log2 rank``, rank 1 = lowest NLL. This function returns, with m = ``len(reference_nll)``::

        exposure = log2(m + 1) - log2(1 + #{reference_nll <= canary_nll})

    i.e. -log2 of the estimated share of the space ranked at or before the canary. When the references are
    the whole space minus the canary (m + 1 = |R|, see ``canary_candidates(count=None)``) this *is*
    Carlini's exposure, with ties broken against the canary (a tied candidate ranks first: conservative).
    With m sampled references it is an estimate of it, capped at ``log2(m + 1)`` (a canary beating every
    reference gets exactly the cap; it says "at least this much", so sample more references, or fit the
    NLL distribution as Carlini et al. do, to resolve higher exposures). The prior for a canary the model
    never saw is a uniform rank: exposure about 1/ln 2 = 1.44 bits on average, rarely above a few bits.
    """
    c = float(canary_nll)
    ref = np.asarray(reference_nll, dtype=np.float64)
    if ref.ndim != 1 or ref.size == 0:
        raise ValueError(f"reference_nll: expected a non-empty 1-d array, got shape {ref.shape}")
    if not math.isfinite(c):
        raise ValueError(f"canary_nll: must be finite, got {c}")
    if not np.isfinite(ref).all():
        raise ValueError("reference_nll: contains NaN or inf")
    at_or_before = 1 + int(np.count_nonzero(ref <= c))
    return float(math.log2(ref.size + 1) - math.log2(at_or_before))


def canary_exposure(score: Callable[[list[str]], np.ndarray], canaries: list[dict[str, Any]],
                    synthetic_texts: list[str], *, references: int) -> dict[str, Any]:
    """Exposure (bits) of each inserted canary among ``references`` random same-format candidates (default
    format, codes from OS entropy), and whether any synthetic record contains a canary's secret code.

    ``score(texts)``: the NLL of each text under the trained model, the same prompt for all (e.g. a
    :func:`dptrain.synth.scoring.sequence_nll` partial). ``canaries``: ``{"text", "repetitions"}`` dicts.
    Sharp edge: with sampled references the exposure saturates at ``log2(references + 1)``."""
    secrets_ = [c["text"] for c in canaries]
    refs = canary_candidates(np.random.default_rng(secrets.randbits(64)), references, exclude=secrets_)
    ref_nll = score(refs)
    can_nll = score(secrets_)
    rows = []
    for c, nll in zip(canaries, can_nll, strict=True):
        code = "".join(ch for ch in c["text"] if ch.isdigit())
        rows.append({"repetitions": c["repetitions"], "exposure_bits": exposure(float(nll), ref_nll),
                     "in_synthetic": any(code in t for t in synthetic_texts)})
    by_rep = {}
    for r in sorted({c["repetitions"] for c in canaries}):
        vals = [row["exposure_bits"] for row in rows if row["repetitions"] == r]
        by_rep[str(r)] = {"mean_exposure_bits": float(np.mean(vals)), "n": len(vals)}
    return {"references": len(refs), "max_measurable_bits": math.log2(len(refs) + 1), "by_repetitions": by_rep,
            "canaries": rows, "secret_in_synthetic": any(r["in_synthetic"] for r in rows),
            "note": "exposure = log2(candidates) - log2(rank), estimated from random same-format candidates "
                    "(Carlini et al. 2019); ~1 bit is chance, the maximum is log2(references + 1)"}


__all__ = ["CANARY_FORMAT", "canary_candidates", "canary_exposure", "exposure", "make_canary_sentences"]
