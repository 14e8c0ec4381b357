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


ACTG = Path(__file__).resolve().parents[1] / "recipes" / "actg175-mlp.yaml"


@pytest.mark.parametrize("override, field", [
    ("model.channels=[8]", "model.channels"),  # a cnn field on an mlp
    ("model.max_length=64", "model.max_length"),  # a causal_lm field on an mlp
    ("trainer.clipping=vmap", "trainer.clipping"),  # a jax field on opacus
])
def test_a_field_of_another_variant_is_refused_not_ignored(override, field):
    from dptrain.config import RecipeError

    with pytest.raises(RecipeError, match=field.replace(".", r"\.") + " is only read with"):
        load_recipe(ACTG, [override])
    with pytest.raises(RecipeError, match=r"trainer\.grad_sample_mode is only read with trainer\.backend: opacus"):
        load_recipe(ACTG, ["trainer.backend=jax", "trainer.grad_sample_mode=ghost"])
    with pytest.raises(RecipeError, match=r"model\.hidden is only read with model\.name: mlp"):
        load_recipe(ACTG, ["model.name=logistic", "model.hidden=[8]"])


def test_removed_and_dumped_fields():
    from dptrain.config import RecipeError

    with pytest.raises(RecipeError, match="training.eval_every_epochs: unknown field"):  # was accepted and ignored
        load_recipe(ACTG, ["training.eval_every_epochs=1"])
    r = load_recipe(ACTG, ["trainer.backend=jax"])
    assert parse_recipe(yaml.safe_load(dump_recipe(r))) == r  # defaults of other variants stay legal


def test_sweep_drops_the_other_backends_options():
    from dptrain.report.sweep import plan_points

    points = plan_points(load_recipe(ACTG, ["trainer.grad_sample_mode=ghost"]), [1.0], 1, ["opacus", "jax"])
    by = {p.backend: r for p, r in points}
    assert by["opacus"].trainer.grad_sample_mode == "ghost" and by["jax"].trainer.backend == "jax"


def test_steps_from_epochs_have_one_definition():
    import accounting as acc
    from dptrain.trainers.plan import PrivacyPlan, UnitCount

    r = load_recipe(ACTG, ["training.epochs=2.5", "training.batch_size=100"])
    plan = PrivacyPlan.from_recipe(r, UnitCount(1000, "declared"))
    assert plan.steps == acc.poisson_from_epochs(1000, 100, 2.5)[1] == 25
    shuffled = PrivacyPlan.from_recipe(load_recipe(ACTG, ["training.epochs=2.5", "training.batch_size=300",
                                                          "privacy.sampling=shuffled"]), UnitCount(1000, "declared"))
    assert shuffled.steps == acc.steps_for_epochs(acc.ShuffledEpochs(1000, 300), 2.5, 1000, 300) == 10
