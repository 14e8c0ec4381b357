"""Private Evolution (`synthesis.method: private_evolution`): a record's influence on the votes (brute force),
the released histogram and its ledger (recomputed with dp_accounting), resume without re-spending, and the
tiny-model end to end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import accounting as acc
from dptrain.config import RecipeError
from dptrain.lifecycle import CHECKPOINT
from dptrain.synth import pe
from tests.synth.test_pipeline import _recipe, corpus  # noqa: F401  (the shared tiny corpus fixture)


def _pe_recipe(tiny, corpus, **over):  # noqa: F811
    base = {"synthesis.method": "private_evolution", "synthesis.prompt": "report ({label}) {topic}:",
            "synthesis.topics": {"normal": ["", "heart"], "abnormal": ["effusion"]},
            "synthesis.private_evolution": {"rounds": 3, "oversample": 2, "elite_fraction": 0.25,
                                            "variation_keep": [0.5]}, **over}
    drop = [k for k in ("model.lora", "optimizer", "training") if k not in over]  # PE trains nothing
    return _recipe(tiny, corpus, _drop=drop, **base)


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(30))
def test_one_record_moves_one_vote_brute_force(seed):
    """Adding or removing any one record changes the vote vector in exactly one bin by exactly 1 (or not at
    all when its label has no candidate): L1 = L2 sensitivity 1 under add/remove, for every record."""
    rng = np.random.default_rng(seed)
    n, m, d = int(rng.integers(1, 12)), int(rng.integers(1, 7)), int(rng.integers(1, 4))
    priv, py = _unit_rows(rng, n, d), rng.integers(0, 3, n)
    cand, cy = _unit_rows(rng, m, d), rng.integers(0, 2, m)  # label 2 may have no candidate
    full = pe.nearest_votes(priv, py, cand, cy)
    assert full.sum() == np.isin(py, cy).sum()  # one vote per record whose label has candidates
    for i in range(n):
        keep = np.arange(n) != i
        diff = full - pe.nearest_votes(priv[keep], py[keep], cand, cy)
        assert np.abs(diff).sum() == (1 if py[i] in cy else 0) and diff.min() >= 0
        assert np.linalg.norm(diff) <= 1.0
        if py[i] in cy:  # the vote went to the nearest candidate of the record's own label
            own = np.flatnonzero(cy == py[i])
            assert np.flatnonzero(diff)[0] == own[np.argmax(cand[own] @ priv[i])]


def test_votes_chunking_and_noise_are_exact():
    rng = np.random.default_rng(0)
    priv, cand = _unit_rows(rng, 50, 5), _unit_rows(rng, 9, 5)
    py, cy = rng.integers(0, 2, 50), rng.integers(0, 2, 9)
    assert (pe.nearest_votes(priv, py, cand, cy, chunk=7) == pe.nearest_votes(priv, py, cand, cy)).all()
    z = pe.round_noise(123, 2, 9)
    assert (z == pe.round_noise(123, 2, 9)).all() and not (z == pe.round_noise(123, 3, 9)).all()
    assert not (z == pe.round_noise(124, 2, 9)).all()
    v = pe.nearest_votes(priv, py, cand, cy)
    np.testing.assert_allclose(pe.vote_histogram(v, 2.5, noise=z), v + 2.5 * z)
    with pytest.raises(ValueError, match="noise"):
        pe.vote_histogram(v, 1.0, noise=z[:3])


def test_select_and_parents_follow_the_noisy_votes():
    noisy = np.array([5.0, -1.0, 3.0, 9.0, 0.5, 2.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert sorted(pe.select(noisy, labels, {0: 2, 1: 1}).tolist()) == [0, 2, 3]
    parents = pe.draw_parents(noisy, labels, {0: 200, 1: 200}, 2.5, np.random.default_rng(0))
    assert set(parents[:200]) == {0, 2} and set(parents[200:]) == {3}  # below the threshold: never a parent
    uniform = pe.draw_parents(np.zeros(6), labels, {0: 300}, 1.0, np.random.default_rng(0))
    assert set(uniform) == {0, 1, 2}  # nothing above the threshold: uniform over the label's candidates
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = pe.keep_prefix("a b c d e f", 0.5, rng)
        assert 1 <= len(p.split()) <= 5 and "a b c d e f".startswith(p)


def test_pe_recipe_rules(tiny, corpus):  # noqa: F811
    with pytest.raises(RecipeError, match="training"):
        _pe_recipe(tiny, corpus, training={"epochs": 3})
    with pytest.raises(RecipeError, match="topics"):
        _pe_recipe(tiny, corpus, **{"synthesis.prompt": "report ({label}):"})
    with pytest.raises(RecipeError, match="variation_keep"):
        _pe_recipe(tiny, corpus, **{"synthesis.private_evolution": {"variation_keep": [1.0]}})
    with pytest.raises(RecipeError, match="private_evolution"):
        _recipe(tiny, corpus, **{"synthesis.private_evolution": {"rounds": 2}})


def _ledger_epsilon_direct(p, rounds, count_std, hist_std):
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant

    direct = pld_privacy_accountant.PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                  value_discretization_interval=1e-4)
    direct.compose(dpa.GaussianDpEvent(count_std))
    direct.compose(dpa.GaussianDpEvent(hist_std))
    direct.compose(dpa.GaussianDpEvent(p["noise_multiplier"]), rounds)  # each round: Gaussian, sensitivity 1
    return direct.get_epsilon(p["delta"])


def test_private_evolution_end_to_end(tiny, corpus, tmp_path):  # noqa: F811
    from dptrain.synth.pipeline import synthesize

    torch.set_num_threads(1)
    recipe = _pe_recipe(tiny, corpus)
    out = tmp_path / "run"
    rec = synthesize(recipe, out, progress=False).record
    assert (out / "release" / "synthetic.jsonl").exists() and (out / "release" / "DATACARD.md").exists()
    assert not (out / "release" / "adapters").exists() and not (out / "private" / CHECKPOINT).exists()
    lines = [json.loads(x) for x in (out / "release" / "synthetic.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and sum(rec["label_counts"]["generated"].values()) == 12
    assert rec["method"] == "private_evolution" and rec["model"]["private_evolution"]["rounds"] == 3

    led = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    p = rec["privacy"]
    assert led.steps == p["steps"] == 3 and led.count("label_histogram") == 1 and led.count("unit_count") == 1
    assert p["sampling_rate"] == 1.0 and p["clipping_norm"] == 1.0
    # recomputed with dp_accounting alone: count (std 20) + histogram (std 5) + 3 Gaussian rounds (sensitivity 1)
    assert p["epsilon"] == pytest.approx(_ledger_epsilon_direct(p, 3, 20.0, 5.0), rel=2e-3)
    assert 7.5 < p["epsilon"] <= 8.0  # calibrated tight: the rounds pay for what the count and histogram left
    assert p["epsilon_independent_check"]["epsilon"] == pytest.approx(p["epsilon"], rel=2e-3)

    ev = rec["evaluation"]
    assert "heldout_nll_per_token" not in ev and "score" in ev["canaries"]
    assert set(ev["canaries"]["by_repetitions"]) == {"1", "3"}
    card = (out / "release" / "DATACARD.md").read_text()
    assert "Private Evolution" in card and "vote rounds" in card and "adapters/" not in card
    assert "Downstream" not in card and "kNN" not in card
    assert "not applicable" in (out / "private" / "evaluation.md").read_text()
    # the output is the candidates of the last population with the most noisy votes, and nothing else
    assert all(r["text"] is not None for r in lines)


def test_private_evolution_resumes_after_a_crash_without_re_spending(tiny, corpus, tmp_path, monkeypatch):  # noqa: F811
    """A crash after round 2: resuming recomputes nothing that was released (the ledger holds each round
    once) and gives exactly the output of an uninterrupted run with the same secret seed."""
    from dptrain.synth import pipeline

    torch.set_num_threads(1)
    # delta declared: the default depends on the DP count of units, which the two runs draw independently
    recipe = _pe_recipe(tiny, corpus, **{"synthesis.evaluation.canaries": 0, "privacy.delta": 1e-5,
                                         "synthesis.evaluation.dp_baseline": False})
    clean = pipeline.synthesize(recipe, tmp_path / "clean", progress=False, dp_seed=77).record

    real_vote = pe.nearest_votes
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_vote(*a, **k)

    monkeypatch.setattr(pe, "nearest_votes", crash_on_third)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pipeline.synthesize(recipe, out, progress=False, dp_seed=77)
    mid = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    assert mid.steps == 2  # rounds 1 and 2 released and accounted; round 3 never finished
    monkeypatch.undo()
    calls["n"] = 0
    monkeypatch.setattr(pe, "nearest_votes", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1),
                                                             real_vote(*a, **k))[1])
    rec = pipeline.synthesize(recipe, out, resume=True, progress=False).record
    assert calls["n"] == 1  # only round 3 voted again
    led = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    assert led.steps == 3 == rec["privacy"]["steps"] and led.count("label_histogram") == 1
    assert rec["privacy"]["epsilon"] == pytest.approx(clean["privacy"]["epsilon"], rel=5e-3)
    # the DP unit count and label histogram come from the OS CSPRNG, drawn independently by the two runs: the
    # outputs are identical whenever those releases coincide (the rounds' noise comes from the same seed)
    same = [json.loads((d / "private" / "state.json").read_text()) for d in (tmp_path / "clean", out)]
    if all(same[0][k] == same[1][k] for k in ("unit_count", "noisy_label_counts")):
        assert (out / "release" / "synthetic.jsonl").read_text() == (tmp_path / "clean" / "release" /
                                                                      "synthetic.jsonl").read_text()


def test_resume_without_the_checkpoint_never_releases_twice(tiny, corpus, tmp_path, monkeypatch):  # noqa: F811
    """Rounds released (ledger.json in release/), then the checkpoint (secret seed, population) is lost: a
    restart would redraw every round's noise and release again, so --resume refuses in one line."""
    from dptrain.lifecycle import RunError
    from dptrain.synth import pipeline

    torch.set_num_threads(1)
    recipe = _pe_recipe(tiny, corpus, **{"synthesis.evaluation.canaries": 0,
                                         "synthesis.evaluation.dp_baseline": False})
    real_vote = pe.nearest_votes
    calls = {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_vote(*a, **k)

    monkeypatch.setattr(pe, "nearest_votes", crash_on_second)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pipeline.synthesize(recipe, out, progress=False)
    monkeypatch.undo()
    (out / "private" / "checkpoint.dptckpt").unlink()
    before = sorted(p.name for p in (out / "release").iterdir())
    with pytest.raises(RunError, match=r"^--resume: .*already holds this run's outputs .*ledger\.json.*start a new run"):
        pipeline.synthesize(recipe, out, resume=True, progress=False)
    assert sorted(p.name for p in (out / "release").iterdir()) == before  # nothing new written

