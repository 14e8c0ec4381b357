"""Image runs end to end on a manifest with patient ids: patient-level vs per-image DP in the record."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import accounting as acc
from dptrain.config import parse_recipe
from dptrain.run import train


@pytest.fixture
def manifest(tmp_path):
    """12 patients x 4 images (16x16 PNG); label = patient parity, visible in the pixels."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(12):
        for k in range(4):
            img = (rng.random((16, 16)) * 80 + (150 if p % 2 else 0)).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"p{p}_{k}.png")
            rows.append((f"p{p}_{k}.png", f"P{p}", p % 2))
    pd.DataFrame(rows, columns=["path", "patient_id", "label"]).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def recipe(manifest, **data):
    return parse_recipe({
        "name": "img", "data": {"source": str(manifest), "label": "label", "positive_label": 1, "test_fraction": 0.25,
                                "image": {"size": 16}, **data},
        "model": {"name": "cnn", "channels": [8, 8], "strides": [2, 2], "groups": 4},
        "privacy": {"epsilon": 4}, "optimizer": {"lr": 0.5, "momentum": 0.9},
        "training": {"epochs": 2, "batch_size": 4, "augment": "flip_shift", "augmult": 2, "ema": 0.9}})


def test_patient_level_run(manifest, tmp_path, pinned_count):  # pinned: a DP count of 9 patients could be < 4
    out = tmp_path / "patient"
    rec = train(recipe(manifest, privacy_unit="patient_id"), out, progress=False).record
    p = rec["privacy"]
    assert p["privacy_unit"] == "patient_id" and rec["data"]["num_units"] == 9  # 9 train patients, 36 images
    assert p["sampling_rate"] == pytest.approx(4 / p["units"]["value"]) and "per patient_id" in p["clipping_granularity"]
    assert "warning" not in p
    led = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    assert led.privacy_unit == "patient_id" and led.epsilon(p["delta"]) == pytest.approx(p["epsilon"])
    assert p["epsilon"] <= 4 and rec["metrics"]["test"]["n"] == 12  # 3 test patients x 4 images


def test_per_image_run_on_data_with_patient_ids_warns(manifest, tmp_path, pinned_count):
    with pytest.warns(UserWarning, match="guarantee is per image"):
        rec = train(recipe(manifest), tmp_path / "image", progress=False).record
    p = rec["privacy"]
    assert p["privacy_unit"] == "example" and p["sampling_rate"] == pytest.approx(4 / p["units"]["value"])
    # the warning reads the data (a manifest column, DICOM tags): in the private record, not the statement
    assert "per image, not per patient" in rec["data"]["warning"] and "warning" not in p
    # per image at q = 4/36 vs per patient at q = 4/9 with the same steps: the epsilon of each is for its own
    # unit; a patient with 4 images under per-image DP is only protected by group privacy (k = 4)
    assert json.loads((tmp_path / "image" / "private" / "record.json").read_text())["data"]["warning"] == \
        rec["data"]["warning"]
