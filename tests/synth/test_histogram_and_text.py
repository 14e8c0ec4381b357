"""Groundwork of DP synthetic text: the accounted label histogram and the text loaders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

import accounting as acc
from dptrain.data import DataError
from dptrain.data.text import load_text, read_iu_xray_reports
from dptrain.synth import dp_label_counts, records_per_label


def test_histogram_noise_has_the_stated_std_and_is_accounted():
    y = np.r_[np.zeros(300, int), np.ones(700, int)]
    rng = np.random.default_rng(0)
    draws = np.array([dp_label_counts(y, 2, noise_multiplier=5.0, rng=rng)[0] for _ in range(2000)])
    for c, true in enumerate((300, 700)):
        z = (draws[:, c] - true) / 5.0
        assert stats.kstest(z, "norm").pvalue > 0.01
    _, ev = dp_label_counts(y, 2, noise_multiplier=5.0, rng=rng)
    led = acc.PrivacyLedger()
    led.compose(ev, label="label_histogram")
    # one Gaussian release with sigma 5 at sensitivity 1: the analytic Gaussian mechanism's epsilon
    eps = led.epsilon(1e-5)

    def delta_of(e, s=5.0):  # Balle & Wang (2018), analytic Gaussian mechanism, sensitivity 1
        return stats.norm.cdf(-e * s + 1 / (2 * s)) - math.exp(e) * stats.norm.cdf(-e * s - 1 / (2 * s))

    from scipy.optimize import brentq

    assert eps == pytest.approx(brentq(lambda e: delta_of(e) - 1e-5, 1e-6, 10), rel=2e-3)
    _, ev2 = dp_label_counts(y, 2, noise_multiplier=5.0, relation=acc.REPLACE_ONE, rng=rng)
    rep = acc.PrivacyLedger(relation=acc.REPLACE_ONE)
    rep.compose(ev2)
    assert rep.epsilon(1e-5) == pytest.approx(eps, rel=1e-3)  # std scales with the sqrt(2) sensitivity
    with pytest.raises(acc.InvalidParameterError, match="raw counts"):
        dp_label_counts(y, 2, noise_multiplier=0.0)


def test_records_per_label():
    assert records_per_label(np.array([30.2, 69.8]), 10).tolist() == [3, 7]
    assert records_per_label(np.array([-4.0, 10.0]), 5).tolist() == [0, 5]
    assert records_per_label(np.array([-1.0, -2.0]), 3).sum() == 3
    assert records_per_label(np.array([1.0, 1.0, 1.0]), 10).sum() == 10


def test_iu_xray_reports_builtin():
    from importlib.util import find_spec

    if find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision is not installed (pip install --no-deps torchxrayvision)")
    frame = read_iu_xray_reports()
    assert 3700 < len(frame) <= 3955 and set(frame.label) == {"normal", "abnormal"}
    assert (frame.text.str.len() > 0).all() and frame.id.is_unique
    assert 1300 < (frame.label == "normal").sum() < 1450
    data = load_text("builtin:iu-xray-reports", test_fraction=0.2, seed=0)
    assert data.classes == ["normal", "abnormal"] and math.isclose(len(data.texts_test) / len(frame), 0.2, abs_tol=0.01)
    assert len(data.texts_train) == len(data.y_train) and data.y_train.mean() > 0.5  # most reports are abnormal


def test_csv_and_jsonl_records(tmp_path):
    rows = [{"report": f"text {i}", "dx": "pos" if i % 3 else "neg"} for i in range(20)] + [{"report": "", "dx": "neg"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = load_text(str(tmp_path / "r.jsonl"), text_column="report", label_column="dx", positive_label="pos",
                  classes=["neg", "pos"], seed=1)
    assert d.classes == ["neg", "pos"] and len(d.texts_train) + len(d.texts_test) == 20
    assert all(t.startswith("text") for t in d.texts_train)
    with pytest.raises(DataError, match="data.text_column"):
        load_text(str(tmp_path / "r.jsonl"), text_column="body", label_column="dx", classes=["neg", "pos"])
    with pytest.raises(DataError, match="data.positive_label"):
        load_text(str(tmp_path / "r.jsonl"), text_column="report", label_column="dx", positive_label="x",
                  classes=["neg", "pos"])
    with pytest.raises(DataError, match="data.classes"):  # class names are declared, never read from the data
        load_text(str(tmp_path / "r.jsonl"), text_column="report", label_column="dx", positive_label="pos")


def test_text_builtin_is_listed_like_the_other_builtins():
    from dptrain.data import list_datasets
    from dptrain.data.registry import list_text_datasets

    rows = list_text_datasets()
    assert [r["name"] for r in rows] == ["iu-xray-reports"] and set(rows[0]) == set(list_datasets()[0])
