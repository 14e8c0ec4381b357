"""Private Evolution for text (Aug-PE, Xie et al., ICML 2024; PE: Lin et al., ICLR 2024): DP synthetic text
without a gradient ever touching the private records.

Algorithm (``synthesis.method: private_evolution``; what :func:`evolve` runs):

1. RANDOM_API: for each label ``y``, ``N_y * oversample`` candidates sampled from the public model with the
   public label prompt (optionally a public topic per candidate, ``synthesis.topics``). ``N_y`` (records per
   label) comes from the run's DP label histogram or a declared prior.
2. For round t = 1..T:
   a. every private record votes for its nearest candidate *of its own label* in a public embedding space
      (all-MiniLM-L6-v2, cosine): ``h_t[c] = #{i : c = argmax_{c': y(c') = y_i} <e(x_i), e(c')>}``;
   b. the vote histogram over all candidates of all labels is released with the Gaussian mechanism:
      ``h~_t = h_t + N(0, sigma^2 I)``. Adding or removing one record changes exactly one bin by 1, so the
      L2 sensitivity is 1 under add/remove (:func:`vote_histogram`);
   c. if t < T: the next population is the best candidates (elites: largest ``h~_t``) plus VARIATIONs of
      parents drawn with probability proportional to ``max(h~_t - threshold, 0)`` -- a parent's first words
      kept and the rest rewritten by the public model (prefix continuation, a fill-in-the-end variation).
3. Output: per label, the ``N_y`` candidates of the last population with the largest ``h~_T``.

Formal guarantee (Lin et al. 2024, Thm. 1; Xie et al. 2024, Sec. 3): each round is a Gaussian mechanism of
sensitivity 1 on a histogram whose candidates depend only on earlier *released* histograms, public models
and public randomness, so T rounds compose adaptively; with the DP count of records and the DP label
histogram, all are composed in the run's one ledger (PLD accountant) and sigma is calibrated so the whole
meets the target epsilon. Every output is post-processing of those releases. The noise of round t is drawn
from the run's secret DP seed and t (or the OS CSPRNG with ``privacy.secure_rng``). A round counts as released
once its state and ledger entry are persisted (:func:`evolve` calls ``on_round`` after every round, before
anything else happens); a crash before that point released nothing from the round, and a resume redoes it
once. A resume whose checkpoint is gone is refused (it would redraw released rounds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def nearest_votes(private_emb: np.ndarray, private_labels: np.ndarray, cand_emb: np.ndarray,
                  cand_labels: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """Each private record's one vote for its nearest (largest inner product) candidate of the same label.

    Returns integer counts, one per candidate. A record whose label has no candidate casts no vote (the
    sensitivity stays <= 1). Rows should be L2-normalised (cosine similarity)."""
    pe, ce = np.asarray(private_emb, np.float32), np.asarray(cand_emb, np.float32)
    py, cy = np.asarray(private_labels), np.asarray(cand_labels)
    if pe.ndim != 2 or ce.ndim != 2 or pe.shape[1] != ce.shape[1]:
        raise ValueError(f"embeddings: expected (n, d) and (m, d), got {pe.shape} and {ce.shape}")
    if len(py) != len(pe) or len(cy) != len(ce):
        raise ValueError("labels: one label per embedding row")
    counts = np.zeros(len(ce), np.int64)
    for y in np.unique(py):
        cidx = np.flatnonzero(cy == y)
        if not len(cidx):
            continue
        pidx = np.flatnonzero(py == y)
        for s in range(0, len(pidx), chunk):
            sim = pe[pidx[s:s + chunk]] @ ce[cidx].T
            np.add.at(counts, cidx[np.argmax(sim, axis=1)], 1)
    return counts


def vote_histogram(votes: np.ndarray, sigma: float, *, noise: np.ndarray) -> np.ndarray:
    """The released histogram: ``votes + sigma * noise`` (``noise``: standard normal, one per bin).

    Sensitivity: one record contributes one vote, so adding or removing it changes one bin by 1 (L2 = 1)."""
    v = np.asarray(votes, np.float64)
    z = np.asarray(noise, np.float64)
    if z.shape != v.shape:
        raise ValueError(f"noise: expected shape {v.shape}, got {z.shape}")
    if not sigma >= 0:
        raise ValueError(f"sigma: expected >= 0, got {sigma}")
    return v + float(sigma) * z


def round_noise(dp_seed: int, round_index: int, size: int, *, secure: bool = False) -> np.ndarray:
    """Standard normal noise for round ``round_index``: from the secret DP seed (a resumed round redraws the
    same numbers), or from the OS CSPRNG (``privacy.secure_rng``)."""
    if secure:
        from dptrain.trainers.sampler import secure_normal

        return np.asarray(secure_normal(size), np.float64)
    return np.random.default_rng([int(dp_seed) & (2**63 - 1), 0x5045, int(round_index)]).standard_normal(size)


def select(noisy: np.ndarray, labels: np.ndarray, per_label: dict[int, int]) -> np.ndarray:
    """Indices of the ``per_label[y]`` candidates of each label with the largest noisy votes (ties: first)."""
    noisy, labels = np.asarray(noisy, np.float64), np.asarray(labels)
    out = []
    for y, k in per_label.items():
        idx = np.flatnonzero(labels == y)
        out.append(idx[np.argsort(-noisy[idx], kind="stable")[:k]])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def draw_parents(noisy: np.ndarray, labels: np.ndarray, per_label: dict[int, int], threshold: float,
                 rng: np.random.Generator) -> np.ndarray:
    """``per_label[y]`` parents of each label drawn with replacement, probability ~ max(noisy - threshold, 0)
    (uniform over the label's candidates when nothing clears the threshold)."""
    out = []
    for y, k in per_label.items():
        idx = np.flatnonzero(np.asarray(labels) == y)
        if not len(idx) or k <= 0:
            continue
        w = np.clip(np.asarray(noisy, np.float64)[idx] - threshold, 0.0, None)
        p = w / w.sum() if w.sum() > 0 else np.full(len(idx), 1.0 / len(idx))
        out.append(idx[rng.choice(len(idx), size=k, p=p)])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def keep_prefix(text: str, keep: float, rng: np.random.Generator) -> str:
    """The first words of ``text`` (a share drawn around ``keep``; at least one word, never all)."""
    words = text.split()
    if len(words) < 2:
        return ""
    share = float(np.clip(rng.uniform(keep - 0.15, keep + 0.15), 0.05, 0.95))
    k = int(np.clip(round(share * len(words)), 1, len(words) - 1))
    return " ".join(words[:k])


@dataclass
class PEConfigView:
    """What :func:`evolve` needs from the recipe (``synthesis.private_evolution`` + generation)."""

    rounds: int
    oversample: float
    elite_fraction: float
    threshold: float
    variation_keep: Sequence[float]


def evolve(*, prompts: dict[int, list[str]], targets: dict[int, int], private_emb: np.ndarray,
           private_labels: np.ndarray, embed: Callable[[list[str]], np.ndarray],
           generate: Callable[[list[str], int, list[int] | None], list[str]], cfg: PEConfigView, sigma: float, dp_seed: int,
           seed: int, secure: bool, state: dict[str, Any] | None,
           on_round: Callable[[dict[str, Any]], None], progress: Callable[[str], None] | None = None,
           ) -> tuple[list[tuple[int, str]], dict[str, Any]]:
    """Run PE (module docstring). ``prompts[y]``: the public prompt(s) of label y (one drawn per initial
    candidate); ``targets[y]``: records to output; ``generate(prompts, seed, budgets)`` returns one continuation per
    prompt (``budgets``: new tokens per prompt, None for the configured maximum); ``embed``: L2-normalised embeddings. ``state``: a previous session's state (resume) or None;
    ``on_round(state)`` is called after every round, before anything else happens, to persist it (and
    compose the round's release into the ledger). Returns ((label, text) records, final state)."""
    rng0 = np.random.default_rng([seed, 0x5045])
    size = {y: max(int(np.ceil(t * cfg.oversample)), t) for y, t in targets.items() if t > 0}
    if state is None:
        cand: list[tuple[int, str]] = []
        for y, m in sorted(size.items()):
            ps = [prompts[y][int(j)] for j in rng0.integers(0, len(prompts[y]), m)]
            cand += [(y, t) for t in generate(ps, seed + 7919 * y, None)]
        state = {"round": 0, "candidates": [[y, t] for y, t in cand], "noisy": None}
        on_round({**state, "released": None})
    while state["round"] < cfg.rounds:
        t = state["round"]
        labels = np.array([c[0] for c in state["candidates"]], np.int64)
        texts = [c[1] for c in state["candidates"]]
        if progress:
            progress(f"round {t + 1}/{cfg.rounds}: votes on {len(texts)} candidates")
        votes = nearest_votes(private_emb, private_labels, embed(texts), labels)
        noisy = vote_histogram(votes, sigma, noise=round_noise(dp_seed, t, len(votes), secure=secure))
        del votes  # only the noisy histogram leaves this function
        nxt = None
        if t + 1 < cfg.rounds:
            rng = np.random.default_rng([seed, 0x5045, t + 1])
            keep = float(cfg.variation_keep[min(t, len(cfg.variation_keep) - 1)])
            n_elite = {y: int(round(cfg.elite_fraction * m)) for y, m in size.items()}
            elites = select(noisy, labels, n_elite)
            parents = draw_parents(noisy, labels, {y: size[y] - n_elite[y] for y in size}, cfg.threshold, rng)
            prefixes = [keep_prefix(texts[i], keep, rng) for i in parents]
            var_prompts = [prompts[int(labels[i])][0] + p for i, p in zip(parents, prefixes, strict=True)]
            if progress:
                progress(f"round {t + 1}/{cfg.rounds}: {len(parents)} variations")
            # a variation rewrites the parent's remaining words: budget ~2 tokens per word left (+8)
            budgets = [8 + 2 * (len(texts[i].split()) - len(p.split())) for i, p in zip(parents, prefixes, strict=True)]
            conts = generate(var_prompts, seed + 104729 * (t + 1), budgets)
            nxt = [[int(labels[i]), texts[i]] for i in elites]
            nxt += [[int(labels[i]), (p + " " + c).strip() if p else c]
                    for i, p, c in zip(parents, prefixes, conts, strict=True)]
        released = {"round": t, "noisy_votes": noisy.tolist()}
        state = {"round": t + 1, "candidates": nxt if nxt is not None else state["candidates"],
                 "noisy": noisy.tolist()}
        on_round({**state, "released": released})
    labels = np.array([c[0] for c in state["candidates"]], np.int64)
    final = select(np.asarray(state["noisy"]), labels, {y: t for y, t in targets.items() if t > 0})
    return [(int(labels[i]), state["candidates"][i][1]) for i in final], state




def pe_plan(recipe, count, privacy_unit: str = "example", releases: tuple = ()):
    """The :class:`~dptrain.trainers.plan.PrivacyPlan` of Private Evolution: ``rounds`` steps in which every
    record takes part (sampling rate 1), each a Gaussian release of sensitivity 1 (a vote has norm 1: the
    clipping norm is 1 by construction) with noise multiplier sigma -- declared (``privacy.noise_multiplier``)
    or calibrated so that the DP count, the other ``releases`` and all rounds meet ``privacy.epsilon``."""
    import math

    import accounting as acc
    from dptrain.trainers.plan import PrivacyPlan, plan_delta

    p, rounds = recipe.privacy, recipe.synthesis.private_evolution.rounds
    n = count.total
    if count.release() is not None:
        releases = (count.release(), *releases)
    delta = plan_delta(recipe, n)
    scheme = acc.PoissonSampling(1.0, n)  # every record votes in every round
    common = dict(scheme=scheme, steps=rounds, expected_batch_size=float(n), delta=delta, accountant=p.accountant,
                  privacy_unit=privacy_unit, size=n, releases=tuple(releases))
    if p.non_private:
        return PrivacyPlan(noise_multiplier=0.0, clipping_norm=None, mode="non_private", target_epsilon=math.inf,
                           **common)
    if p.clip_only:
        raise acc.InvalidParameterError("privacy.clip_only", True, "false with synthesis.method: private_evolution "
                                        "(votes are bounded already)", "remove privacy.clip_only")
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = acc.calibrate_noise_multiplier(p.epsilon, delta, scheme, rounds, accountant=p.accountant,
                                               extra_events=[(event, 1) for _, event in releases])
    return PrivacyPlan(noise_multiplier=sigma, clipping_norm=1.0, mode="dp", target_epsilon=p.epsilon, **common)


__all__ = ["PEConfigView", "draw_parents", "evolve", "keep_prefix", "nearest_votes", "pe_plan", "round_noise", "select",
           "vote_histogram"]
