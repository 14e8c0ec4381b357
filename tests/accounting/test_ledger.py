"""The ledger: composition, persistence, relation/accountant honesty."""

import json
import math

import dp_accounting as dpa
import pytest

import accounting as acc

Q, SIGMA, T, DELTA = 256 / 60000, 1.12, 14040, 1e-5


def poisson_ledger(**kw) -> acc.PrivacyLedger:
    led = acc.PrivacyLedger(**kw)
    led.compose(acc.PoissonSampling(Q).step_event(SIGMA), T)
    return led


def test_step_by_step_equals_bulk():
    scheme = acc.PoissonSampling(0.01)
    one = acc.PrivacyLedger()
    for _ in range(300):
        one.compose(scheme.step_event(1.0))
    bulk = acc.PrivacyLedger()
    bulk.compose(scheme.step_event(1.0), 300)
    assert one.steps == bulk.steps == 300
    assert one.epsilon(DELTA) == bulk.epsilon(DELTA)
    assert len(one.to_dict()["entries"]) == 1  # run-length encoded


def test_reference_values_through_ledger():
    led = poisson_ledger()
    assert led.epsilon(DELTA) == pytest.approx(2.308, abs=2e-3)
    assert led.epsilon(DELTA, "rdp") == pytest.approx(2.516, abs=2e-3)
    eps = led.epsilon(DELTA)
    assert led.delta(eps) == pytest.approx(DELTA, rel=0.02)


def test_save_load_identical(tmp_path):
    led = poisson_ledger(privacy_unit="patient", metadata={"run": "x"})
    led.compose(acc.gaussian_release_event(10.0), 1, label="label_histogram")
    path = tmp_path / "ledger.json"
    led.save(path)
    back = acc.PrivacyLedger.load(path)
    assert back.epsilon(DELTA) == led.epsilon(DELTA)
    assert back.epsilon(DELTA, "rdp") == led.epsilon(DELTA, "rdp")
    assert back.privacy_unit == "patient" and back.relation == "add_or_remove"
    assert back.count("label_histogram") == 1 and back.steps == T
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no temporary left behind


def test_truncated_or_tampered_file_refused(tmp_path):
    path = tmp_path / "ledger.json"
    poisson_ledger().save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(acc.LedgerFormatError, match="truncated or corrupt"):
        acc.PrivacyLedger.load(path)
    data = json.loads(text)
    data["entries"][0]["event"]["type"] = "os.system"
    path.write_text(json.dumps(data))
    with pytest.raises(acc.LedgerFormatError, match="unknown DP event"):
        acc.PrivacyLedger.load(path)
    data = json.loads(text)
    data["format"] = "something/9"
    path.write_text(json.dumps(data))
    with pytest.raises(acc.LedgerFormatError, match="format"):
        acc.PrivacyLedger.load(path)


def test_unsupported_accountant_is_an_error_not_a_fallback():
    fixed = acc.FixedSizeSampling(1000, 10)
    led = acc.PrivacyLedger(relation="replace_one", accountant="pld")
    led.compose(fixed.step_event(1.0), 10)
    with pytest.raises(acc.UnsupportedAccountantError, match="use accountant 'rdp'"):
        led.epsilon(DELTA)
    assert led.epsilons(DELTA)["pld"] is None and led.epsilons(DELTA)["rdp"] > 0

    trunc = acc.PrivacyLedger(accountant="rdp")
    trunc.compose(acc.TruncatedPoissonSampling(1000, 0.01, 40).step_event(1.0), 10)
    with pytest.raises(acc.UnsupportedAccountantError, match="use accountant 'pld'"):
        trunc.epsilon(DELTA)

    sel = acc.PrivacyLedger()
    sel.compose(acc.repeat_and_select(dpa.SelfComposedDpEvent(acc.PoissonSampling(0.01).step_event(1.0), 100), 5))
    with pytest.raises(acc.UnsupportedAccountantError):
        sel.epsilon(DELTA)
    assert sel.epsilon(DELTA, "rdp") > 0


def test_repeat_and_select_costs_more_than_one_run():
    run = dpa.SelfComposedDpEvent(acc.PoissonSampling(0.01).step_event(1.0), 500)
    single = acc.PrivacyLedger(accountant="rdp")
    single.compose(run)
    selected = acc.PrivacyLedger(accountant="rdp")
    selected.compose(acc.repeat_and_select(run, mean=10, shape=math.inf))
    composed10 = acc.PrivacyLedger(accountant="rdp")
    composed10.compose(run, 10)
    e1, es, e10 = (x.epsilon(DELTA) for x in (single, selected, composed10))
    assert e1 < es < e10  # selection costs something, but far less than naive composition


def test_non_private_is_infinite_and_empty_is_zero():
    led = acc.PrivacyLedger()
    assert led.epsilon(DELTA) == 0.0
    led.compose(acc.PoissonSampling(0.1).step_event(0.0))
    assert math.isinf(led.epsilon(DELTA)) and math.isinf(led.epsilon(DELTA, "rdp"))
    st = led.statement(DELTA)
    assert math.isinf(st.epsilon) and not st.is_private
    assert st.to_dict()["epsilon"] == "inf"  # JSON has no infinity: the one serialisation writes "inf" ...
    assert math.isinf(acc.PrivacyStatement.from_dict(json.loads(json.dumps(st.to_dict()))).epsilon)  # ... and reads it


def test_statement_has_the_full_record():
    st = poisson_ledger(privacy_unit="patient").statement(DELTA).to_dict()
    for key in ("format", "epsilon", "delta", "accountant", "accountant_version", "neighbouring_relation",
                "privacy_unit", "steps"):
        assert key in st
    assert st["privacy_unit"] == "patient" and st["steps"] == T
    assert "0.6" in st["accountant_version"]


def test_statement_round_trips_and_refuses_malformed_files(tmp_path):
    st = poisson_ledger(privacy_unit="patient").statement(DELTA)
    st.save(tmp_path / "privacy.json")
    assert acc.PrivacyStatement.load(tmp_path / "privacy.json") == st
    bad = st.to_dict()
    bad["epsilon"] = "lots"
    with pytest.raises(acc.LedgerFormatError, match="'epsilon'"):
        acc.PrivacyStatement.from_dict(bad)
    del bad["epsilon"]
    with pytest.raises(acc.LedgerFormatError, match="missing or malformed"):
        acc.PrivacyStatement.from_dict(bad)
    with pytest.raises(acc.LedgerFormatError, match="format"):
        acc.PrivacyStatement.from_dict({**st.to_dict(), "format": "other/1"})
    (tmp_path / "garbage.json").write_bytes(b"\xff\x00")
    with pytest.raises(acc.LedgerFormatError, match="not valid JSON"):
        acc.PrivacyStatement.load(tmp_path / "garbage.json")


def test_fixed_size_uses_replace_one_sensitivity_two():
    """Replace-one doubles the clipped sum's sensitivity: the event must carry sigma / 2."""
    ev = acc.FixedSizeSampling(1000, 10).step_event(2.0)
    assert isinstance(ev, dpa.SampledWithoutReplacementDpEvent)
    assert ev.event.noise_multiplier == pytest.approx(1.0)


def test_extend_refuses_mixed_relations():
    a = acc.PrivacyLedger()
    b = acc.PrivacyLedger(relation="replace_one")
    with pytest.raises(acc.InvalidParameterError, match="relation"):
        a.extend(b)


@pytest.mark.parametrize("bad", [
    dict(relation="swap"), dict(accountant="moments"), dict(privacy_unit=""), dict(pld_discretization=0.5)])
def test_bad_constructor_arguments(bad):
    with pytest.raises(acc.InvalidParameterError):
        acc.PrivacyLedger(**bad)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, 2.0])
def test_bad_delta(delta):
    with pytest.raises(acc.InvalidParameterError, match="delta"):
        poisson_ledger().epsilon(delta)


def test_truncated_poisson_with_headroom_costs_almost_nothing():
    trunc = acc.TruncatedPoissonSampling.with_headroom(256, 1604)
    assert trunc.sampling_rate == pytest.approx(256 / 1604) and 256 < trunc.max_batch_size < 1604
    a, b = acc.PrivacyLedger(), acc.PrivacyLedger()
    a.compose(trunc.step_event(1.5), 100)
    b.compose(acc.PoissonSampling(256 / 1604).step_event(1.5), 100)
    assert b.epsilon(DELTA) <= a.epsilon(DELTA) <= b.epsilon(DELTA) * 1.001
    tight = acc.TruncatedPoissonSampling(1604, 256 / 1604, 260)  # truncation is frequent: must cost more
    c = acc.PrivacyLedger()
    c.compose(tight.step_event(1.5), 100)
    assert c.epsilon(DELTA) > a.epsilon(DELTA) * 1.05
