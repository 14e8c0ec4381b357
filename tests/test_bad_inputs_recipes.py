"""Every bad recipe, number and argument is one clear line, before any work.

Each row of ``CASES`` runs ``dptrain.cli.main`` and must give exit status 2, exactly one line on stderr starting
``dptrain: error:`` that names the field, flag or file, no traceback, and nothing written under ``--out``. No row
trains: every one fails while the recipe and the arguments are checked. ``ACCEPTED`` lists what must now be read
as the user meant it (YAML 1.2-style numbers and booleans, see ``dptrain.config``).

``CASES`` is plain data (``{out}``: the run or sweep directory, ``{files}``: the folder of ``FILES``) so the same
rows can be replayed against another checkout with ``python -m dptrain``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACTG = str(ROOT / "recipes" / "actg175-mlp.yaml")
SYNTH = str(ROOT / "recipes" / "iu-xray-reports-synth-finetune.yaml")
ACTG_TEXT = (ROOT / "recipes" / "actg175-mlp.yaml").read_text()


def _bomb() -> bytes:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**10 leaves
    return ("\n".join(lines) + "\n").encode()


# Recipe files of the wrong kind: name -> content (None: a directory).
FILES: dict[str, bytes | None] = {
    "folder.yaml": None,
    "binary.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10",
    "utf16.yaml": ACTG_TEXT.encode("utf-16"),
    "utf16-nobom.yaml": ACTG_TEXT.encode("utf-16-le"),
    "latin1.yaml": ACTG_TEXT.replace("actg175-mlp", "caf\u00e9").encode("latin-1"),
    "empty.yaml": b"",
    "comments.yaml": b"# only a comment\n",
    "list.yaml": b"- data\n- privacy\n",
    "scalar.yaml": b"privacy epsilon 8\n",
    "number.yaml": b"8\n",
    "bomb.yaml": _bomb(),
    "alias.yaml": ACTG_TEXT.replace("  epsilon: 8", "  epsilon: &e 8\n  delta: *e").encode(),
    "deep.yaml": b"data: " + b"[" * 20000 + b"]" * 20000 + b"\n",
    "duplicate.yaml": ACTG_TEXT.replace("  epsilon: 8", "  epsilon: 1\n  epsilon: 8").encode(),
    "syntax.yaml": b"privacy:\n  epsilon: [8\n",
    "tabs.yaml": b"privacy:\n\tepsilon: 8\n",
    "huge.yaml": b"# padding\n" * 200_000,
    "nan.yaml": ACTG_TEXT.replace("  epsilon: 8", "  epsilon: .nan").encode(),
    "control.yaml": ACTG_TEXT.replace("name: actg175-mlp", "name: a\x07b").encode(),
}


def _train(*sets: str, recipe: str = ACTG) -> list[str]:
    """``dptrain train`` with overrides (1 epoch: a replay on a checkout that accepts the value trains briefly)."""
    argv = ["train", recipe, "--out", "{out}", "--quiet", "--set", "training.epochs=1"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _synth(*sets: str) -> list[str]:
    argv = ["synth", SYNTH, "--out", "{out}", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _file(name: str, command: str = "train") -> list[str]:
    return [command, "{files}/" + name, "--out", "{out}", "--quiet"]


EPS = ["privacy", "epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "100", "--delta", "1e-5"]
CAL = ["privacy", "calibrate", "--epsilon", "2", "--delta", "1e-5"]
RATE = ["--sampling-rate", "0.01", "--steps", "100"]
SIZE = ["--dataset-size", "10000", "--batch-size", "100", "--epochs", "2"]
SWEEP = ["sweep", ACTG, "--epsilons", "1", "--seeds", "1", "--out", "{out}", "--set", "training.epochs=1"]


def _eps(flag: str, value: str) -> list[str]:
    argv = list(EPS)
    argv[argv.index(flag) + 1] = value
    return argv


# (id, argv, what the one line must name)
CASES: list[tuple[str, list[str], str]] = [
    # ---- numbers in recipes: YAML spellings, non-finite and out-of-range values ----
    ("epsilon-nan", _train("privacy.epsilon=nan"), "privacy.epsilon"),
    ("epsilon-neg-inf", _train("privacy.epsilon=-inf"), "privacy.epsilon"),
    ("epsilon-1e9", _train("privacy.epsilon=1e9"), "privacy.epsilon"),
    ("epsilon-text", _train("privacy.epsilon=eight"), "privacy.epsilon"),
    ("delta-1.5", _train("privacy.delta=1.5"), "privacy.delta"),
    ("delta-nan", _train("privacy.delta=nan"), "privacy.delta"),
    ("delta-quoted", _train("privacy.delta='1e-5'"), "privacy.delta"),
    ("epochs-inf", _train("training.epochs=inf"), "training.epochs"),
    ("epochs-1e6", _train("training.epochs=1e6"), "training.epochs"),
    ("epochs-0", _train("training.epochs=0"), "training.epochs"),
    ("seed-neg", _train("seed=-1"), "seed"),
    ("seed-2**70", _train(f"seed={2**70}"), "seed"),
    ("seed-float", _train("seed=1.5"), "seed"),
    ("split-seed-neg", _train("data.split_seed=-5"), "data.split_seed"),
    ("split-seed-2**32", _train(f"data.split_seed={2**32}"), "data.split_seed"),
    ("hidden-neg", _train("model.hidden=[-1]"), "model.hidden"),
    ("hidden-0", _train("model.hidden=[0]"), "model.hidden"),
    ("hidden-1e9", _train("model.hidden=[1e9]"), "model.hidden"),
    ("hidden-fraction", _train("model.hidden=[1.5]"), "model.hidden"),
    ("hidden-too-deep", _train("model.hidden=[" + ",".join(["4"] * 65) + "]"), "model.hidden"),
    ("clipping-inf", _train("privacy.clipping_norm=inf"), "privacy.clipping_norm"),
    ("clipping-0", _train("privacy.clipping_norm=0"), "privacy.clipping_norm"),
    ("lr-inf", _train("optimizer.lr=inf"), "optimizer.lr"),
    ("lr-nan", _train("optimizer.lr=nan"), "optimizer.lr"),
    ("lr-1e6", _train("optimizer.lr=1e6"), "optimizer.lr"),
    ("momentum-1", _train("optimizer.momentum=1"), "optimizer.momentum"),
    ("canaries-1e8", _train("privacy.audit.canaries=1e8"), "privacy.audit.canaries"),
    ("canaries-5", _train("privacy.audit.canaries=5"), "privacy.audit.canaries"),
    ("confidence-nan", _train("privacy.audit.confidence=nan"), "privacy.audit.confidence"),
    ("sigma-0.01", _train("privacy.epsilon=", "privacy.noise_multiplier=0.01"), "privacy.noise_multiplier"),
    ("sigma-inf", _train("privacy.epsilon=", "privacy.noise_multiplier=inf"), "privacy.noise_multiplier"),
    ("sigma-1e300", _train("privacy.epsilon=", "privacy.noise_multiplier=1e300"), "privacy.noise_multiplier"),
    ("count-sigma-0", _train("privacy.count_noise_multiplier=0"), "privacy.count_noise_multiplier"),
    ("dataset-size-0", _train("privacy.dataset_size=0"), "privacy.dataset_size"),
    ("budget-inf", _train("privacy.dataset_budget=inf"), "privacy.dataset_budget"),
    ("batch-0", _train("training.batch_size=0"), "training.batch_size"),
    ("batch-1e9", _train("training.batch_size=1e9"), "training.batch_size"),
    ("physical-batch-neg", _train("trainer.max_physical_batch_size=-3"), "trainer.max_physical_batch_size"),
    ("test-fraction-inf", _train("data.test_fraction=inf"), "data.test_fraction"),
    ("ema-1", _train("training.ema=1"), "training.ema"),
    ("augmult-65", _train("training.augment=flip_shift", "training.augmult=65"), "training.augmult"),
    ("bool-yes", _train("privacy.clip_only=yes"), "privacy.clip_only"),
    ("label-inf-unquoted", _train("data.label=inf"), "data.label"),
    ("cnn-strides-mismatch", _train("model.name=cnn", "model.channels=[16,32]", "model.hidden=[64,64]"),
     "model.strides"),
    ("cnn-groups", _train("model.name=cnn", "model.groups=5", "model.hidden=[64,64]"), "model.groups"),
    ("cnn-channels-0", _train("model.name=cnn", "model.channels=[0,32,64]", "model.hidden=[64,64]"), "model.channels"),
    ("synth-seed-neg", _synth("synthesis.generation.seed=-1"), "synthesis.generation.seed"),
    ("synth-temperature-inf", _synth("synthesis.generation.temperature=inf"), "synthesis.generation.temperature"),
    ("synth-histogram-sigma-0", _synth("synthesis.histogram_noise_multiplier=0"),
     "synthesis.histogram_noise_multiplier"),
    ("synth-prior-inf", _synth("synthesis.label_counts=prior", "synthesis.prior=[inf,1]"), "synthesis.prior"),
    ("synth-lora-alpha-1e6", _synth("model.lora.alpha=1e6"), "model.lora.alpha"),
    # ---- --set itself ----
    ("set-no-equals", _train("privacy.epsilon"), "--set"),
    ("set-empty-part", _train("privacy..epsilon=2"), "--set"),
    ("set-bad-yaml", _train("data.source=[oops"), "--set"),
    ("set-alias", _train("privacy.epsilon=*a"), "--set"),
    # ---- recipe files of the wrong kind ----
    ("file-directory", _file("folder.yaml"), "folder.yaml"),
    ("file-binary", _file("binary.yaml"), "binary.yaml"),
    ("file-utf16", _file("utf16.yaml"), "utf16.yaml"),
    ("file-utf16-no-bom", _file("utf16-nobom.yaml"), "utf16-nobom.yaml"),
    ("file-latin1", _file("latin1.yaml"), "latin1.yaml"),
    ("file-empty", _file("empty.yaml"), "empty.yaml"),
    ("file-only-comments", _file("comments.yaml"), "comments.yaml"),
    ("file-list", _file("list.yaml"), "list.yaml"),
    ("file-scalar", _file("scalar.yaml"), "scalar.yaml"),
    ("file-number", _file("number.yaml"), "number.yaml"),
    ("file-billion-laughs", _file("bomb.yaml"), "bomb.yaml"),
    ("file-alias", _file("alias.yaml"), "alias.yaml"),
    ("file-deep-nesting", _file("deep.yaml"), "deep.yaml"),
    ("file-duplicate-key", _file("duplicate.yaml"), "duplicate.yaml"),
    ("file-syntax", _file("syntax.yaml"), "syntax.yaml"),
    ("file-tabs", _file("tabs.yaml"), "tabs.yaml"),
    ("file-huge", _file("huge.yaml"), "huge.yaml"),
    ("file-epsilon-nan", _file("nan.yaml"), "privacy.epsilon"),
    ("file-control-char", _file("control.yaml"), "control.yaml"),
    ("file-missing", _file("missing.yaml"), "missing.yaml"),
    ("file-directory-synth", _file("folder.yaml", "synth"), "folder.yaml"),
    ("file-directory-sweep", ["sweep", "{files}/folder.yaml", "--epsilons", "1", "--out", "{out}"], "folder.yaml"),
    # ---- dptrain privacy epsilon ----
    ("eps-steps-1e15", _eps("--steps", "1e15"), "steps"),
    ("eps-steps-fraction", _eps("--steps", "1.5"), "--steps"),
    ("eps-steps-text", _eps("--steps", "many"), "--steps"),
    ("eps-steps-0", _eps("--steps", "0"), "steps"),
    ("eps-sigma-0.01", _eps("--noise-multiplier", "0.01"), "noise_multiplier"),
    ("eps-sigma-1e300", _eps("--noise-multiplier", "1e300"), "noise_multiplier"),
    ("eps-sigma-nan", _eps("--noise-multiplier", "nan"), "noise_multiplier"),
    ("eps-rate-nan", _eps("--sampling-rate", "nan"), "sampling_rate"),
    ("eps-rate-inf", _eps("--sampling-rate", "inf"), "sampling_rate"),
    ("eps-delta-0", _eps("--delta", "0"), "delta"),
    ("eps-delta-inf", _eps("--delta", "inf"), "delta"),
    ("eps-unevaluable", ["privacy", "epsilon", "--sampling-rate", "0.5", "--noise-multiplier", "1", "--steps",
                         "1000000", "--delta", "1e-5"], "--steps"),
    ("eps-missing-delta", EPS[:-2], "--delta"),
    ("eps-unknown-flag", [*EPS, "--epsilon", "3"], "--epsilon"),
    # ---- dptrain privacy calibrate ----
    ("cal-both-pairs", [*CAL, *RATE, *SIZE], "--sampling-rate"),
    ("cal-both-pairs-partial", [*CAL, "--steps", "100", *SIZE], "--steps"),
    ("cal-no-pair", CAL, "--dataset-size"),
    ("cal-rate-without-steps", [*CAL, "--sampling-rate", "0.01"], "--steps"),
    ("cal-epsilon-1e9", ["privacy", "calibrate", "--epsilon", "1e9", "--delta", "1e-5", *RATE], "epsilon"),
    ("cal-epsilon-1e-6", ["privacy", "calibrate", "--epsilon", "1e-6", "--delta", "1e-5", *RATE], "unreachable"),
    ("cal-epsilon-nan", ["privacy", "calibrate", "--epsilon", "nan", "--delta", "1e-5", *RATE], "epsilon"),
    ("cal-epsilon-inf", ["privacy", "calibrate", "--epsilon", "inf", "--delta", "1e-5", *RATE], "epsilon"),
    ("cal-epsilon-above-floor", ["privacy", "calibrate", "--epsilon", "50", "--delta", "1e-5", "--sampling-rate", "1",
                                 "--steps", "1"], "epsilon"),
    ("cal-delta-nan", ["privacy", "calibrate", "--epsilon", "2", "--delta", "nan", *RATE], "delta"),
    ("cal-steps-1e15", [*CAL, "--sampling-rate", "0.01", "--steps", "1e15"], "steps"),
    ("cal-epochs-1e12", [*CAL, "--dataset-size", "10000", "--batch-size", "100", "--epochs", "1e12"], "--epochs"),
    ("cal-epochs-nan", [*CAL, "--dataset-size", "10000", "--batch-size", "100", "--epochs", "nan"], "epochs"),
    ("cal-batch-0", [*CAL, "--dataset-size", "10000", "--batch-size", "0", "--epochs", "1"], "batch_size"),
    ("cal-dataset-neg", [*CAL, "--dataset-size", "-5", "--batch-size", "1", "--epochs", "1"], "dataset_size"),
    ("cal-accountant", [*CAL, *RATE, "--accountant", "gdp"], "--accountant"),
    # ---- dptrain sweep / report: every option before the grid trains ----
    ("sweep-bootstrap-50", [*SWEEP, "--bootstrap", "50"], "--bootstrap"),
    ("sweep-bootstrap-1e9", [*SWEEP, "--bootstrap", "1e9"], "--bootstrap"),
    ("sweep-min-group-0", [*SWEEP, "--min-group-size", "0"], "--min-group-size"),
    ("sweep-threshold-1.5", [*SWEEP, "--threshold", "1.5"], "--threshold"),
    ("sweep-threshold-nan", [*SWEEP, "--threshold", "nan"], "--threshold"),
    ("sweep-seeds-0", [*SWEEP, "--seeds", "0"], "--seeds"),
    ("sweep-seeds-1e9", [*SWEEP, "--seeds", "1e9"], "--seeds"),
    ("sweep-jobs-1e6", [*SWEEP, "--jobs", "1e6"], "--jobs"),
    ("sweep-epsilons-overflow", ["sweep", ACTG, "--epsilons", "1,1e400", "--out", "{out}"], "--epsilons"),
    ("sweep-epsilons-nan", ["sweep", ACTG, "--epsilons", "nan", "--out", "{out}"], "--epsilons"),
    ("sweep-epsilons-1e9", ["sweep", ACTG, "--epsilons", "1e9", "--out", "{out}"], "--epsilons"),
    ("sweep-missing-epsilons", ["sweep", ACTG, "--out", "{out}"], "--epsilons"),
    ("sweep-bad-recipe-number", [*SWEEP, "--set", "model.hidden=[0]"], "model.hidden"),
    ("report-bootstrap-50", ["report", "{out}", "--bootstrap", "50"], "--bootstrap"),
    ("report-threshold-inf", ["report", "{out}", "--threshold", "inf"], "--threshold"),
    ("report-min-group-text", ["report", "{out}", "--min-group-size", "ten"], "--min-group-size"),
    # ---- the other subcommands' arguments ----
    ("train-no-recipe", ["train"], "recipe"),
    ("train-unknown-flag", [*_train(), "--epochs", "3"], "--epochs"),
    ("audit-no-run", ["audit"], "run_dir"),
    ("predict-no-data", ["predict", "{out}", "--out", "{out}/scores.csv"], "--data"),
    ("export-format", ["export", "{out}", "--format", "pdf"], "--format"),
    ("unknown-command", ["fit", ACTG], "fit"),
]


def materialise(files: Path) -> None:
    """Write ``FILES`` into ``files``."""
    files.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        if data is None:
            (files / name).mkdir(exist_ok=True)
        else:
            (files / name).write_bytes(data)


def fill(argv: list[str], out: Path, files: Path) -> list[str]:
    return [a.replace("{out}", str(out)).replace("{files}", str(files)) for a in argv]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes")
    materialise(path)
    return path


def test_there_are_enough_rows():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("argv", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(argv, needle, files, tmp_path, capsys):
    from dptrain.cli import main

    out = tmp_path / "out"
    rc = main(fill(argv, out, files))
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, err, captured.out[-500:])
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("dptrain: error: ") and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


# ---- what must now be accepted (read as the user wrote it) ----

def _load_file(tmp_path: Path, text: str):
    from dptrain.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)


ACCEPTED = [  # (override, field path, expected value)
    ("privacy.delta=1e-5", ("privacy", "delta"), 1e-5),
    ("privacy.delta=1E-5", ("privacy", "delta"), 1e-5),
    ("privacy.delta=.00001", ("privacy", "delta"), 1e-5),
    ("privacy.epsilon=inf", ("privacy", "epsilon"), math.inf),
    ("privacy.epsilon=.inf", ("privacy", "epsilon"), math.inf),
    ("privacy.epsilon=+Infinity", ("privacy", "epsilon"), math.inf),
    ("privacy.epsilon=1e1", ("privacy", "epsilon"), 10.0),
    ("privacy.dataset_size=6e4", ("privacy", "dataset_size"), 60000),
    ("privacy.dataset_size=60_000", ("privacy", "dataset_size"), 60000),
    ("training.batch_size=1E2", ("training", "batch_size"), 100),
    ("seed=012", ("seed",), 12),
    (f"seed={2**32 - 1}", ("seed",), 2**32 - 1),
    ("model.hidden=[65536]", ("model", "hidden"), [65536]),
    ("data.positive_label=yes", ("data", "positive_label"), "yes"),
    ("data.positive_label=no", ("data", "positive_label"), "no"),
    ("data.positive_label=on", ("data", "positive_label"), "on"),
    ("data.positive_label=off", ("data", "positive_label"), "off"),
    ("data.positive_label='inf'", ("data", "positive_label"), "inf"),
    ("data.positive_label=1", ("data", "positive_label"), 1),
    ("name=2024-01-31", ("name",), "2024-01-31"),
    ("privacy.clip_only=True", ("privacy", "clip_only"), True),
    ("privacy.audit.canaries=1e3", ("privacy", "audit", "canaries"), 1000),
]


@pytest.mark.parametrize(("override", "field", "expected"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_what_a_user_writes_is_read_as_meant(override, field, expected):
    from dptrain.config import load_recipe

    value = load_recipe(ACTG, [override])
    for name in field:
        value = getattr(value, name)
    assert value == expected and type(value) is type(expected)


def test_numbers_and_words_in_a_recipe_file(tmp_path):
    text = ACTG_TEXT.replace("  epsilon: 8", "  epsilon: inf\n  delta: 1e-5\n  dataset_size: 2.139e3")
    text = text.replace("  test_fraction: 0.25", "  test_fraction: 2.5E-1\n  positive_label: yes\n"
                                                  "  categorical: {karnof_hi: [yes, no, on, off]}")
    r = _load_file(tmp_path, text)
    assert r.privacy.non_private and r.privacy.delta == 1e-5 and r.privacy.dataset_size == 2139
    assert r.data.test_fraction == 0.25 and r.data.positive_label == "yes"
    assert r.data.categorical == {"karnof_hi": ["yes", "no", "on", "off"]}
    # a UTF-8 byte order mark (Windows editors) is fine
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + ACTG_TEXT.encode())
    from dptrain.config import load_recipe

    assert load_recipe(tmp_path / "bom.yaml") == load_recipe(ACTG)


def test_the_dump_reads_back_identically_with_both_yaml_rules():
    from dptrain.config import dump_recipe, load_recipe, parse_recipe
    from dptrain.recipe_yaml import read_yaml as _read_yaml

    tricky = ["name='1e5'", "data.label='inf'", "data.positive_label='yes'", "data.id='012'", "privacy.epsilon=inf",
              "privacy.delta=1e-5"]
    r = load_recipe(ACTG, tricky)
    text = dump_recipe(r)
    assert parse_recipe(yaml.safe_load(text)) == r == parse_recipe(_read_yaml(text))


def test_every_ready_recipe_reads_the_same_with_yaml_safe_load():
    from dptrain.recipe_yaml import read_yaml as _read_yaml

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert _read_yaml(path.read_text()) == yaml.safe_load(path.read_text()), path.name


@pytest.mark.parametrize("argv", [
    [*EPS[:7], "1e2", *EPS[8:], "--json"],  # --steps 1e2
    ["privacy", "calibrate", "--epsilon", "2", "--delta", "1e-5", "--dataset-size", "1e4", "--batch-size", "1e2",
     "--epochs", "2", "--accountant", "rdp", "--json"],
], ids=["epsilon-steps-1e2", "calibrate-sizes-1e4"])
def test_cli_integers_may_be_written_as_integral_floats(argv, capsys):
    import json

    from dptrain.cli import main

    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["steps"] in (100, 200)


def test_a_tiny_target_on_a_tiny_rate_is_calibrated_not_a_math_error():
    """Used to be ``ValueError: math domain error`` (log of an epsilon of exactly 0 in the search)."""
    import accounting as acc

    scheme = acc.PoissonSampling(1e-6)
    sigma = acc.calibrate_noise_multiplier(1e-6, 1e-5, scheme, 1, accountant="rdp")
    led = acc.PrivacyLedger(accountant="rdp")
    led.compose(scheme.step_event(sigma), 1)
    assert led.epsilon(1e-5) <= 1e-6


def test_a_target_met_below_the_smallest_noise_is_refused_with_the_numbers():
    import accounting as acc

    with pytest.raises(acc.InvalidParameterError, match=r"target_epsilon: expected at most 19\.\d+ for this run"):
        acc.calibrate_noise_multiplier(50, 1e-5, acc.PoissonSampling(1.0), 1)
