"""A newcomer's first hour: every command's help is clear, and common mistakes give one line with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from dptrain.cli import build_parser, main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SUBCOMMANDS = ["privacy", "train", "synth", "audit", "sweep", "report", "datasets"]


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help_with_a_description(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dptrain {name}")
    sub = build_parser()._subparsers._group_actions[0].choices[name]
    assert sub.description, f"dptrain {name}: give the subcommand a description"
    nested = sub._subparsers._group_actions[0].choices.values() if sub._subparsers else []
    for parser in [sub, *nested]:
        undocumented = [a.dest for a in parser._actions if not a.help and a.dest != "privacy_command"]
        assert not undocumented, f"{parser.prog}: options without help: {undocumented}"


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dptrain: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_common_mistakes_give_the_field_and_the_fix(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,y\n1,2,0\n3,4,1\n")
    base = ["train", str(RECIPES / "actg175-mlp.yaml"), "--out", str(tmp_path / "run")]
    # epsilon 0
    _one_line_error(capsys, [*base, "--set", "privacy.epsilon=0"], "privacy.epsilon must be > 0", "inf")
    # a wrong column name: the available columns are listed
    own = [*base, "--set", f"data.source={csv}", "--set", "data.categorical=null", "--set", "data.sensitive=null",
           "--set", "data.numeric={a: [0, 5], b: [0, 5]}"]
    _one_line_error(capsys, [*own, "--set", "data.label=outcome"], "data.label", "'outcome'", "fix", "a, b, y")
    # a missing data file and a missing recipe
    _one_line_error(capsys, [*base, "--set", f"data.source={tmp_path / 'nope.csv'}"], "data.source", "no file", "fix")
    _one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")], "recipe: no file", "recipes/")
    # a typo in a field name
    _one_line_error(capsys, [*base, "--set", "privacy.epsilom=2"], "privacy.epsilom", "unknown field")
    # a language-model recipe given to train
    _one_line_error(capsys, ["train", str(RECIPES / "iu-xray-reports-synth.yaml"), "--out", str(tmp_path / "lm")],
                    "dptrain synth")
    assert not (tmp_path / "run").exists() and not (tmp_path / "lm").exists()  # a refused run writes nothing


def test_a_batchnorm_model_is_refused_with_the_fix():
    from torch import nn

    from dptrain.trainers.base import TrainerError
    from dptrain.trainers.opacus_backend import check_model

    with pytest.raises(TrainerError, match=r"BatchNorm cannot be trained with DP.*fix_batchnorm: true"):
        check_model(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), fix=False)
