"""The release boundary of `dptrain synth` (see tests/test_release_scan.py for the scanner)."""

from __future__ import annotations

import numpy as np

from dptrain.config import parse_recipe
from tests.test_release_scan import DP_SEED, scan_release


def test_synth_release_is_clean(tmp_path, pinned_count, tiny):
    from dptrain.synth.pipeline import synthesize

    corpus = tmp_path / "reports.csv"
    rng = np.random.default_rng(0)
    words = ["heart size is normal lungs clear", "small left effusion", "no effusion lungs clear"]
    import pandas as pd

    pd.DataFrame({"text": [str(rng.choice(words)) for _ in range(150)],
                  "label": rng.choice(["normal", "abnormal"], 150)}).to_csv(corpus, index=False)
    recipe = parse_recipe({
        "name": "scan-synth",
        "data": {"source": str(corpus), "positive_label": "abnormal", "classes": ["normal", "abnormal"]},
        "model": {"name": "causal_lm", "source": str(tiny), "max_length": 32, "lora": {"r": 2, "top_layers": 1}},
        "privacy": {"epsilon": 8.0}, "optimizer": {"name": "adam", "lr": 0.01},
        "training": {"epochs": 1, "batch_size": 16},
        "synthesis": {"prompt": "report ({label}):", "records": 8, "histogram_noise_multiplier": 5.0,
                      "generation": {"max_new_tokens": 4, "batch_size": 8},
                      "evaluation": {"canaries": 1, "canary_repetitions": [1], "canary_references": 20,
                                     "fidelity_records": 10, "dp_baseline": False}},
    })
    rec = synthesize(recipe, tmp_path / "run", dp_seed=DP_SEED, progress=False).record
    d = rec["data"]
    counts = {c for c in (d["n_train_available"], d["n_train_used"], d["n_test"], d["num_units"]) if c > 20}
    release = tmp_path / "run" / "release"
    assert scan_release(release, exact_counts=counts, seed=DP_SEED) == []
    card = (release / "DATACARD.md").read_text()
    assert "Evaluation" not in card.split("private/evaluation.md")[0].split("## The synthetic text")[0]
    assert "kNN" not in card and "exposure" not in card.lower().replace("canary exposure", "")
    assert (tmp_path / "run" / "private" / "evaluation.md").exists()
