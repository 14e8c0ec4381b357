"""The DP text baseline of `dptrain synth` is an ordinary run: refused by the dataset budget, it writes nothing and
the synth evaluation records it as skipped."""

from __future__ import annotations

import numpy as np

import accounting as acc


def test_a_baseline_refused_by_the_budget_writes_nothing_and_is_recorded_as_skipped(tmp_path):
    from dptrain.synth.baseline import dp_text_classifier
    from dptrain.synth.evaluate import safe

    rng = np.random.default_rng(0)
    words = ["heart", "size", "is", "normal", "lungs", "clear", "small", "left", "effusion"]
    texts = [" ".join(rng.choice(words, 5)) for _ in range(60)]
    y = rng.integers(0, 2, 60)
    path = acc.budget_path("id:reports")  # under this test's $DPTRAIN_HOME
    path.parent.mkdir(parents=True)
    acc.DatasetBudget.create(path, epsilon=0.5, delta=1e-3, dataset="id:reports")
    before = path.read_bytes()
    out = tmp_path / "run" / "private" / "dp_baseline"
    got = safe(dp_text_classifier, out, texts, y, texts[:20], y[:20], epsilon=4.0, delta=1e-3, seed=0,
               released_units=60, dataset_id="id:reports")
    assert set(got) == {"skipped"} and got["skipped"].startswith("budget: run 'dp_baseline-")
    assert not (tmp_path / "run").exists() and path.read_bytes() == before
