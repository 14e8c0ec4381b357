"""The Ray executor: each point a Ray task on a local Ray started with 2 CPUs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.report.conftest import tiny_recipe

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'dptrain[ray]')")


def test_sweep_with_ray_executor(tmp_path):
    from dptrain.report import build_report, run_sweep

    out = tmp_path / "ray-sweep"
    lines: list[str] = []
    res = run_sweep(tiny_recipe("training.epochs=1"), out, epsilons=[2.0, float("inf")], seeds=1, executor="ray",
                    jobs=2, progress=lines.append)
    assert res.statuses == {"opacus-eps2-seed0": "finished", "opacus-epsinf-seed0": "finished"}
    assert any("ray: 2 CPUs" in s for s in lines), lines
    assert not ray.is_initialized()  # the local Ray this sweep started is shut down
    rec = json.loads((out / "runs" / "opacus-eps2-seed0" / "private" / "record.json").read_text())
    assert rec["privacy"]["epsilon"] <= 2.0
    paths = build_report(out, n_boot=200)
    summary = pd.read_csv(paths["csv"])
    assert paths["csv"] == out / "private" / "summary.csv" and (out / "release" / "selection.json").exists()
    assert sorted(summary.run) == ["opacus-eps2-seed0", "opacus-epsinf-seed0"]
