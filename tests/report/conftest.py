"""One small real sweep shared by the report tests (ACTG175, Opacus, 1 epoch, tiny MLP, 200 canaries).

The sweep sets data.validation_fraction=0.2 (the recipe has none): every run shares one train/validation/test
split; the report goes to DIR/private/, the selection statement to DIR/release/selection.json.

Both backends in one sweep are planned in test_sweep.py (plan_points); here JAX would only add compile time."""

from __future__ import annotations

from pathlib import Path

import pytest

from dptrain.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "actg175-mlp.yaml"
TINY = ["training.epochs=1", "model.hidden=[8]", "privacy.audit.canaries=200"]
EPSILONS = [1.0, 4.0, float("inf")]
SEEDS = 2
BACKENDS = ["opacus"]
THRESHOLD = 0.25


def tiny_recipe(*extra: str):
    return load_recipe(RECIPE, [*TINY, *extra])


_ANALYSIS = {}


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory) -> Path:
    from dptrain.report import analyse, run_sweep
    from dptrain.report.render import write_report

    out = tmp_path_factory.mktemp("sweep") / "actg175"
    lines: list[str] = []
    result = run_sweep(tiny_recipe(), out, epsilons=EPSILONS, seeds=SEEDS, backends=BACKENDS, jobs=2,
                       threshold=THRESHOLD, progress=lines.append)
    assert not result.failed, result.statuses
    (out / "progress.log").write_text("\n".join(lines))
    _ANALYSIS["an"] = analyse(out, n_boot=300)
    write_report(_ANALYSIS["an"], out)
    return out


@pytest.fixture(scope="session")
def sweep_analysis(sweep_dir):
    """The Analysis the sweep's report was written from (n_boot=300)."""
    return _ANALYSIS["an"]
