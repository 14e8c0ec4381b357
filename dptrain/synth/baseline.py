"""The DP text baseline of ``dptrain synth``: the downstream classifier trained on the *real* training records
with DP-SGD at the synth run's (epsilon, delta) -- what the synthetic data has to beat.

It is an ordinary run of the shared lifecycle (:class:`dptrain.lifecycle.Session`: its own run directory,
ledger, statement, atomic checkpoints, resume, dataset budget), nested in the synth run's private side
(``RUN/private/dp_baseline/``): its only output is its accuracy on real held-out records, which is not covered
by any guarantee, so nothing of it is ever published; its own ``release/`` holds its statement and ledger.

Guarantees: the number of records is the synth run's released count (declared to this run: no new draw, never
the exact count); a dataset with a budget is charged for this run too (``Session.reserve_budget``), and a
refused run writes nothing; a run that fails with ValueError leaves no secret DP seed behind (the synth run
records the failure and finishes). Sharp edge: its cost is NOT in the synth run's ledger (a separate run), so
whoever publishes both outputs must compose the two statements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dptrain.config import Recipe, parse_recipe
from dptrain.lifecycle import RunDir, Session, run_statement
from dptrain.trainers.sampler import UnitSampler

BASELINE_DIR = "dp_baseline"
FEATURES = "hashed binary 1-2 grams ({n}), L2-normalised"
COVERS = ("the real training records of the synth run (add/remove one record) for this baseline classifier's "
          "training: its weights (not kept), this statement and this ledger. NOT covered: its accuracy on the real "
          "held-out records; everything here lies under the synth run's private/ and is never published")
PUBLIC = ("the hashing features (data-independent: no vocabulary or IDF from the data), the recipe, and the number "
          "of records in 'units': the synth run's released count, declared to this run (no second release)")


def baseline_recipe(*, epsilon: float, delta: float, seed: int, released_units: int,
                    dataset_budget: float | None = None, epochs: float = 30, batch_size: int = 64) -> Recipe:
    """The baseline's recipe: logistic regression, adam 0.05, C=1, Poisson sampling, the synth run's released
    count declared as ``privacy.dataset_size`` (so q and the steps use it and nothing is counted again)."""
    privacy: dict[str, Any] = {"epsilon": epsilon, "delta": delta, "clipping_norm": 1.0,
                               "dataset_size": int(released_units)}
    if dataset_budget is not None:
        privacy["dataset_budget"] = dataset_budget
    return parse_recipe({"name": "dp-text-baseline", "data": {"source": "texts"}, "model": {"name": "logistic"},
                         "privacy": privacy, "optimizer": {"name": "adam", "lr": 0.05},
                         "training": {"epochs": epochs, "batch_size": min(batch_size, int(released_units))},
                         "seed": seed})


def dp_text_classifier(out_dir: str | Path, train_texts, train_y, test_texts, test_y, *, epsilon: float,
                       delta: float, seed: int, released_units: int, dataset_id: str,
                       dataset_budget: float | None = None, resume: bool = False, progress: bool = False,
                       n_features: int = 2 ** 14, epochs: float = 30, batch_size: int = 64) -> dict[str, Any]:
    """Train (or, on ``resume``, finish or re-read) the baseline run in ``out_dir``; returns its summary for
    the synth evaluation (accuracy and AUROC on ``test_texts``, epsilon, delta, noise, steps, run id).

    Features are data-independent (hashed binary 1-2 grams, L2-normalised per record: no vocabulary or IDF
    from the data, which would leak); logistic regression through THE loop and the Opacus backend. Raises
    ValueError (RunError, BudgetExceededError, ...) when the run is refused: nothing written then."""
    rd = RunDir(out_dir)
    recipe = baseline_recipe(epsilon=epsilon, delta=delta, seed=seed, released_units=released_units,
                             dataset_budget=dataset_budget, epochs=epochs, batch_size=batch_size)
    with Session(recipe, rd.root, resume=resume and rd.root.exists(), command="dp-baseline",
                 data_parallel=False) as session:
        record = session.finished
        if record is None:
            try:
                record = _train(session, train_texts, train_y, test_texts, test_y, dataset_id=dataset_id,
                                n_features=n_features, progress=progress)
            except ValueError:
                rd.remove_secrets()  # the synth run records the failure and finishes: no seed may stay behind
                raise
    p = record["privacy"]
    test = record["metrics"]["test"]
    return {"accuracy": test["accuracy"], "auroc": test["auroc"], "epsilon": p["epsilon"], "delta": p["delta"],
            "noise_multiplier": p["noise_multiplier"], "steps": p["steps"], "features": record["features"],
            "optimizer": "adam 0.05, C=1", "run_id": record["run_id"]}


def _train(session: Session, train_texts, train_y, test_texts, test_y, *, dataset_id: str, n_features: int,
           progress: bool) -> dict[str, Any]:
    import torch
    from sklearn.feature_extraction.text import HashingVectorizer

    from dptrain.evaluate.metrics import utility_metrics
    from dptrain.models.torch_models import build_torch_model
    from dptrain.trainers.opacus_backend import OpacusTrainer

    recipe = session.recipe
    y = np.asarray(train_y, np.int64)
    plan = session.make_plan(len(y))  # the declared (released) count: q and the steps never see the exact n
    vec = HashingVectorizer(ngram_range=(1, 2), n_features=n_features, alternate_sign=False, binary=True, norm="l2")
    x = vec.transform(train_texts).toarray().astype(np.float32)
    xt = vec.transform(test_texts).toarray().astype(np.float32)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        model = build_torch_model(recipe.model, n_features, 2)
    trainer = OpacusTrainer(recipe.optimizer)
    session.reserve_budget(dataset_id)  # last check before anything is written
    session.start()
    trainer.init(model, plan, seed=recipe.seed, dp_seed=session.dp_seed)
    session.restore(trainer)
    units = np.arange(len(y))
    session.fit(trainer, UnitSampler(units, len(y), plan.scheme, dp_seed=session.dp_seed), x, y, units,
                progress=progress)
    metrics = utility_metrics(np.asarray(test_y), trainer.predict(xt)[:, 1])
    statement = run_statement(plan, session.ledger, recipe, session.count, covers=COVERS, public=PUBLIC)
    record = {"command": "dp_text_baseline", "metrics": {"test": metrics},
              "features": FEATURES.format(n=n_features),
              "data": {"dataset_id": dataset_id, "n_train": int(len(y)), "n_test": int(len(test_y)),
                       "privacy_unit": "example", "note": "exact counts: private (the statement releases only "
                                                          "'units', the synth run's released count)"}}
    return session.finish(statement, record)


__all__ = ["BASELINE_DIR", "baseline_recipe", "dp_text_classifier"]
