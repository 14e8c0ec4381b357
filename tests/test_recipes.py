"""Every ready recipe in recipes/ loads, validates, and says in its header how to run it."""

from pathlib import Path

import pytest
import yaml

from dptrain.config import Recipe, dump_recipe, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES, "recipes/ holds no *.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe  # round-trips


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_header_says_how_to_run_it(path):
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{path.name}: first line must be a comment"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    command = "dptrain synth" if load_recipe(path).model.name == "causal_lm" else "dptrain train"
    assert command in text, f"{path.name}: the header must say how to run it ({command} ...)"
    assert f"recipes/{path.name}" in text, f"{path.name}: the run command should name this file"
