"""`dptrain privacy ...`: tables, JSON, and one clear line for bad input."""

import json
import subprocess
import sys

import pytest

import accounting as acc
from dptrain.cli import main

REF = ["--sampling-rate", str(256 / 60000), "--noise-multiplier", "1.12", "--steps", "14040", "--delta", "1e-5"]


def test_epsilon_table_shows_both_accountants_and_statement(capsys):
    assert main(["privacy", "epsilon", *REF]) == 0
    out = capsys.readouterr().out
    assert "pld          2.308" in out and "rdp          2.516" in out
    for word in ("privacy statement", "poisson", "add_or_remove", "noise multiplier", "14040", "dp-accounting"):
        assert word in out


def test_epsilon_json(capsys):
    assert main(["privacy", "epsilon", *REF, "--accountant", "pld", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["epsilon"] == pytest.approx(2.308, abs=2e-3)
    assert data["accountant"] == "pld" and data["delta"] == 1e-5
    assert data["sampling_rate"] == pytest.approx(256 / 60000) and data["steps"] == 14040
    assert set(data["epsilons"]) == {"pld"}


def test_calibrate_json_round_trips(capsys):
    args = ["privacy", "calibrate", "--epsilon", "2", "--delta", "1e-5", "--sampling-rate", "0.01",
            "--steps", "500", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    sigma = data["noise_multiplier"]
    led = acc.PrivacyLedger()
    led.compose(acc.PoissonSampling(0.01).step_event(sigma), 500)
    assert led.epsilon(1e-5) <= 2.0
    assert data["epsilon"] == led.epsilon(1e-5)
    assert {"delta", "accountant", "sampling_rate", "steps"} <= set(data)


def test_calibrate_from_dataset_size(capsys):
    args = ["privacy", "calibrate", "--epsilon", "4", "--delta", "1e-5", "--dataset-size", "2000",
            "--batch-size", "100", "--epochs", "5", "--accountant", "rdp", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"] == 100 and data["sampling_rate"] == pytest.approx(0.05)
    assert data["epsilons"]["rdp"] <= 4.0


@pytest.mark.parametrize("args, field", [
    (["epsilon", "--sampling-rate", "1.5", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"], "sampling_rate"),
    (["epsilon", "--sampling-rate", "0", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"], "sampling_rate"),
    (["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "-1", "--steps", "3", "--delta", "1e-5"], "noise_multiplier"),
    (["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "0", "--delta", "1e-5"], "steps"),
    (["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "3", "--delta", "1"], "delta"),
    (["calibrate", "--epsilon", "0", "--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "3"], "epsilon"),
    (["calibrate", "--epsilon", "1", "--delta", "1e-5", "--sampling-rate", "0.1"], "--steps"),
    (["calibrate", "--epsilon", "1", "--delta", "1e-5", "--dataset-size", "100"], "--batch-size"),
    (["calibrate", "--epsilon", "1", "--delta", "1e-5", "--dataset-size", "100", "--batch-size", "200",
      "--epochs", "1"], "batch_size"),
])
def test_bad_input_is_one_clear_line(args, field, capsys):
    assert main(["privacy", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err


def test_unreachable_step_target_and_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "dptrain.cli", "privacy", "epsilon", "--sampling-rate", "2", "--noise-multiplier",
         "1", "--steps", "3", "--delta", "1e-5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "sampling_rate" in proc.stderr
