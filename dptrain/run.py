"""One training run, end to end: recipe -> data -> plan -> trainer -> THE loop -> run directory.

The run directory's layout, the release boundary, resume, budgets and the statement are the shared run
lifecycle of :mod:`dptrain.lifecycle`; this module composes it for classifiers. Everything that can be wrong
with the input is checked before the run directory is created, so a refused run writes nothing. During
training the checkpoint (private) is the single source of truth; ``resume`` continues from it with the same
ledger, so no step of privacy spending is lost or counted twice. When the run finishes, ``release/`` holds the
model weights (safetensors + model.json), the privacy statement, the ledger, the recipe and the model card
(``MODEL_CARD.md``, :mod:`dptrain.release.card`); ``private/`` the record with test metrics, predictions, the
audit, canary coins and the full model card; the checkpoint (secret DP seed) is removed
unless ``keep_checkpoint``.

Data-parallel: under ``torchrun --nproc_per_node N -m dptrain train ...`` (WORLD_SIZE > 1) ``train`` joins
the process group (gloo on CPU, NCCL on GPU ``LOCAL_RANK``), trains the same accounted mechanism on N
processes (see :mod:`dptrain.trainers.distributed`) and leaves the group at the end. Only rank 0 reads or
writes the run directory and shows progress; it broadcasts what the others need (the secret dp_seed, the
checkpoint on resume, the canaries, the released unit count), and its errors stop every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from accounting.atomic import atomic_write_bytes, atomic_write_json
from accounting.statement import PrivacyStatement
from dptrain.config import Recipe, RecipeError
from dptrain.data import TabularData, load_data
from dptrain.data.augment import make_augmenter
from dptrain.data.dp_bounds import attach, dp_columns, ledger_releases, statement_releases
from dptrain.evaluate.metrics import per_class_auroc, utility_metrics
from dptrain.lifecycle import CHECKPOINT, RunDir, RunError, RunResult, Session, jsonable, run_statement
from dptrain.trainers.base import TrainerError
from dptrain.trainers.checkpoint import CheckpointError
from dptrain.trainers.sampler import UnitSampler

COVERS = ("the training records (add/remove one privacy unit) for everything under release/: the model weights "
          "and their architecture, this statement, the ledger, the recipe and the model card. NOT covered, never to be published: "
          "private/ (test metrics and predictions on real held-out records, the audit, canary coins, the "
          "checkpoint with the secret DP seed)")
PUBLIC = ("the recipe (declared feature bounds and categories, model, optimiser, batch size, epochs, seeds of the "
          "split and the initialisation), the public initial weights, and the number of units as stated in 'units'")
BACKBONE_PUBLIC = "; the pretrained backbone weights (model.backbone; the file's hash is in the record) are public"
DP_BOUNDS_PUBLIC = ("; the coarse ranges of data.dp_bounds are declared public, the bounds estimated within them from "
                    "the training records are DP releases listed in 'releases' (dp_bounds:COLUMN)")


def build_trainer(recipe: Recipe, dist=None):
    t = recipe.trainer
    if t.backend == "opacus":
        from dptrain.trainers.context import LOCAL

        try:
            from dptrain.trainers.opacus_backend import OpacusTrainer
        except ImportError as err:
            raise TrainerError(f"trainer.backend: opacus needs torch and opacus ({err}); pip install "
                               "'dptrain[torch]', or use trainer.backend: jax") from None

        return OpacusTrainer(recipe.optimizer, grad_sample_mode=t.grad_sample_mode,
                             max_physical_batch_size=t.max_physical_batch_size, secure_rng=recipe.privacy.secure_rng,
                             device=t.device, dist=dist or LOCAL)
    if dist is not None and dist.active:
        raise TrainerError(f"trainer.backend: {t.backend}: data-parallel training (WORLD_SIZE={dist.world_size}) is "
                           "supported by the opacus backend only; use trainer.backend: opacus or run one process")
    if t.backend == "jax":
        try:
            from dptrain.trainers.jax_backend import JaxTrainer
        except ImportError as err:
            raise TrainerError(f"trainer.backend: jax needs the jax extra ({err}); pip install 'dptrain[jax]'") from None
        return JaxTrainer(recipe.optimizer, clipping=t.clipping, max_physical_batch_size=t.max_physical_batch_size,
                          secure_rng=recipe.privacy.secure_rng)
    raise TrainerError(f"trainer.backend: {t.backend!r} is unknown; use opacus or jax")


def build_model(recipe: Recipe, data: TabularData):
    shape = data.x_train.shape[1:]
    inputs = int(shape[0]) if len(shape) == 1 else tuple(int(d) for d in shape)
    try:
        if recipe.trainer.backend == "jax":
            from dptrain.models.flax_models import build_flax_model

            return build_flax_model(recipe.model, inputs, len(data.classes))
        import torch

        from dptrain.models.torch_models import build_torch_model

        with torch.random.fork_rng():  # deterministic init from the recipe seed, global RNG untouched
            torch.manual_seed(recipe.seed)
            return build_torch_model(recipe.model, inputs, len(data.classes))
    except ValueError as err:
        raise TrainerError(str(err)) from None


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, dp_seed: int | None = None,
          progress: bool = True, checkpoint_every: int | None = None, keep_checkpoint: bool = False) -> RunResult:
    """Train one run into ``out_dir``. See the module docstring for the crash-safety contract.

    Under torchrun (WORLD_SIZE > 1) every rank calls this and gets the same result; rank 0's ``dp_seed``
    is used. Without WORLD_SIZE it is the single-process run."""
    from dptrain.trainers.context import DistributedError
    from dptrain.trainers.launch import from_env

    if recipe.model.name == "causal_lm":
        raise RunError("model.name: causal_lm recipes fine-tune a language model for synthetic text; "
                       "run them with `dptrain synth RECIPE`")
    try:
        dist = from_env(recipe.trainer.device)
    except ValueError as err:
        raise RunError(str(err)) from None
    ok = False
    try:
        result = _train(recipe, Path(out_dir), dist, resume=resume, dp_seed=dp_seed, progress=progress,
                        checkpoint_every=checkpoint_every, keep_checkpoint=keep_checkpoint)
        ok = True
        return result
    except DistributedError as err:  # rank 0 failed and reported why; this rank stops with a clear line
        raise RunError(str(err)) from None
    finally:
        dist.close(ok=ok)


def _train(recipe: Recipe, out: Path, dist, *, resume: bool, dp_seed: int | None, progress: bool,
           checkpoint_every: int | None, keep_checkpoint: bool) -> RunResult:
    """``train`` on every rank. Each ``dist.on_main`` step (the file system) runs on rank 0 only and ends
    with a broadcast of its result or error; the rest is deterministic and the same on every rank. The session
    holds --out's lock throughout; a refusal before the run started leaves nothing behind."""
    with Session(recipe, out, resume=resume, dist=dist, keep_checkpoint=keep_checkpoint) as session:
        if session.finished is not None:
            return RunResult(out, session.finished)
        return _train_session(session, recipe, out, dist, resume=resume, dp_seed=dp_seed, progress=progress,
                              checkpoint_every=checkpoint_every)


def _train_session(session: Session, recipe: Recipe, out: Path, dist, *, resume: bool, dp_seed: int | None,
                   progress: bool, checkpoint_every: int | None) -> RunResult:
    from dptrain.data.identity import dataset_identity
    from dptrain.release import save_release_model
    from dptrain.release.card import write_model_cards

    rd = session.rd

    # ---- validate everything before writing anything ----
    data = _load_data(recipe, session, dist, resume)
    bounds = data.preprocessing.get("dp_bounds")  # DP bounds of `dp` features: releases paid for in calibration
    n_canaries = recipe.privacy.audit.canaries
    # canaries are extra privacy units 0..M-1 after the real ones; an excluded canary is an empty unit, so the
    # number of units (and q) does not depend on the secret inclusion coins
    plan = session.make_plan(data.num_units, public_extra=n_canaries, privacy_unit=data.privacy_unit,
                             releases=ledger_releases(bounds))
    if n_canaries:
        from dptrain.audit.bounds import require_jax_privacy

        try:
            require_jax_privacy()
        except ImportError as err:
            raise RunError(f"privacy.audit.canaries: {err}; or set privacy.audit.canaries=0") from None
    trainer = build_trainer(recipe, dist)
    model = build_model(recipe, data)
    if recipe.trainer.backend == "opacus":  # grad_sample_mode: auto -> hooks or ghost, from the layer shapes
        trainer.resolve_mode(model, np.zeros_like(data.x_train[:1]), per_example_rows=  # shapes only, no record
                             data.privacy_unit == "example"
                             and recipe.training.augmult <= 1)
    try:
        dataset_id = dist.on_main(lambda: dataset_identity(recipe.data))
    except ValueError as err:
        raise RunError(str(err)) from None
    session.reserve_budget(dataset_id)

    # ---- start or resume ----
    def canaries_for_run():
        if not n_canaries:
            return None
        from dptrain.audit.canaries import FILE, load_canaries, make_canaries, save_canaries

        rd.make()
        if resume and (rd.private / FILE).exists():
            return load_canaries(rd.private / FILE, count=n_canaries, shape=data.x_train.shape[1:],
                                 num_classes=len(data.classes))
        canaries = make_canaries(n_canaries, _numeric_mask(data), len(data.classes))
        save_canaries(rd.private / FILE, canaries)
        return canaries

    canaries = dist.on_main(canaries_for_run)
    backbone = getattr(model, "provenance", None)  # a public pretrained backbone: its file's hash
    fresh = {**({"dp_bounds": bounds} if bounds else {}), **({"backbone_sha256": backbone["sha256"]} if backbone else {})}
    session.start(dp_seed, (lambda: fresh) if fresh else None)  # persisted: resume never redraws
    if backbone and session.state.get("backbone_sha256", backbone["sha256"]) != backbone["sha256"]:
        raise RunError(f"--resume: model.backbone {recipe.model.backbone!r} is not the weights file this run started "
                       "with (its sha256 differs); restore the original file, or start a new run in a new --out")
    x_train, y_train, units_train = _with_canaries(data, canaries)
    trainer.init(model, plan, seed=recipe.seed, dp_seed=session.dp_seed, fix_batchnorm=recipe.model.fix_batchnorm,
                 ema=recipe.training.ema)
    session.restore(trainer)

    augment = make_augmenter(recipe.training.augment, recipe.training.augmult, recipe.seed)
    sampler = UnitSampler(units_train, data.num_units + n_canaries, plan.scheme, dp_seed=session.dp_seed,
                          secure=recipe.privacy.secure_rng)
    if dist.active and recipe.privacy.secure_rng:  # OS coins differ per rank: rank 0 samples for everybody
        from dptrain.trainers.distributed import BroadcastSampler

        sampler = BroadcastSampler(sampler, dist)
    seconds = session.fit(trainer, sampler, x_train, y_train, units_train, progress=progress,
                          checkpoint_every=checkpoint_every, augment=augment, log_loss=canaries is None)

    # ---- release, evaluate and record (rank 0) ----
    def finish() -> dict[str, Any]:
        probs = trainer.predict(data.x_test)
        metrics = {"test": _metrics(data.y_test, probs, data.classes)}
        if len(data.y_val):
            metrics["validation"] = _metrics(data.y_val, trainer.predict(data.x_val), data.classes)
        _write_predictions(rd.private / "predictions.parquet", data, probs)
        statement = run_statement(plan, session.ledger, recipe, session.count, releases=statement_releases(bounds),
                                  covers=COVERS, public=PUBLIC + (DP_BOUNDS_PUBLIC if bounds else "")
                                  + (BACKBONE_PUBLIC if backbone else ""))
        audit = _audit(trainer.predict, data, canaries, statement, recipe)
        atomic_write_json(rd.private / "audit.json", jsonable(audit))
        record = {
            "command": "train",
            "audit": _audit_summary(audit),
            "metrics": metrics,
            "data": {"source": data.source, "n_train": int(len(data.y_train)), "n_validation": int(len(data.y_val)),
                     "n_test": int(len(data.y_test)), "num_units": data.num_units, "audit_canary_units": n_canaries,
                     "privacy_unit": data.privacy_unit, "classes": data.classes, "features": data.feature_names,
                     "preprocessing": data.preprocessing, "dataset_id": dataset_id,
                     "warning": data.preprocessing.get("warning"),  # e.g. per-image DP on data with patient ids
                     "note": "exact counts: private (the statement releases only 'units')"},
            "training": {"backend": recipe.trainer.backend,
                         "clipping": trainer.mode_reason if recipe.trainer.backend == "opacus"
                         else recipe.trainer.clipping,
                         "steps": session.ledger.steps, "seconds_this_session": round(seconds, 2), "resumed": resume,
                         "world_size": dist.world_size, "devices": trainer.num_devices},
        }
        if backbone:  # a public pretrained backbone: which file, that it is public
            record["training"]["backbone"] = backbone
        record["model_files"] = str(session.release_dir().relative_to(rd.root))

        def write_release() -> None:  # the model, and its cards: publishable next to it, full in private/
            save_release_model(session.release_dir(), recipe, data, trainer.release_weights())
            write_model_cards(session.release_dir(), rd.private, statement, record, recipe)

        return session.finish(statement, record, write_release=write_release)

    return RunResult(out, dist.on_main(finish))


def audit_run(out_dir: str | Path) -> dict[str, Any]:
    """Re-run the audit of a finished run from its released model and private canaries; rewrites
    private/audit.json and the record's audit summary."""
    from dptrain.config import load_recipe
    from dptrain.lifecycle import recipe_hash
    from dptrain.release import ReleaseError, load_model

    rd = RunDir(out_dir)
    if not rd.root.is_dir():
        raise RunError(f"audit: {rd.root} is not a run directory; give the --out of a finished `dptrain train` run")
    record = rd.finished_record()
    if record is None:
        raise RunError(f"{rd.root}: no private/record.json (not a finished `dptrain train` run); give the --out of a "
                       "finished run, or finish it with --resume first")
    if not rd.config.is_file():
        raise RunError(f"audit: {rd.config} is missing; restore the run's recipe (it is part of release/)")
    state = rd.read_state()
    text = rd.config.read_bytes().decode("utf-8", errors="replace")
    if state is None or state.get("recipe_sha256") != recipe_hash(text):
        raise RunError(f"audit: {rd.config} differs from the recipe the run was trained with (recorded in "
                       f"{rd.state}); restore the original config.yaml -- an audit on another split or seed would "
                       "not audit this run")
    recipe = load_recipe(rd.config)
    try:
        model = load_model(rd.root / record.get("model_files", "release"))
    except ReleaseError as err:
        raise RunError(str(err)) from None
    data = load_data(recipe.data if not dp_columns(recipe.data) else
                     attach(recipe.data, released=(state or {}).get("dp_bounds")))  # the run's own release
    canaries = None
    if recipe.privacy.audit.canaries:
        from dptrain.audit.canaries import FILE, load_canaries

        canaries = load_canaries(rd.private / FILE, count=recipe.privacy.audit.canaries,
                                 shape=data.x_train.shape[1:], num_classes=len(data.classes))
    statement = PrivacyStatement.from_dict(record["privacy"])
    audit = jsonable(_audit(model.predict_proba, data, canaries, statement, recipe))
    atomic_write_json(rd.private / "audit.json", audit)
    record["audit"] = _audit_summary(audit)
    atomic_write_json(rd.record, jsonable(record))
    from dptrain.release.card import write_private_card

    write_private_card(rd.private, jsonable(record), recipe)  # the publishable card holds no audit result
    return audit


def _load_data(recipe: Recipe, session: Session, dist, resume: bool) -> TabularData:
    """The run's data. Bounds of `dp` features (data.dp_bounds) are a DP release: drawn once on rank 0 with the OS
    CSPRNG and broadcast, or on resume restored from private/state.json (a second draw would be a second release)."""
    if not dp_columns(recipe.data):
        return load_data(recipe.data)
    held: dict[str, TabularData] = {}

    def on_main() -> dict[str, Any]:
        from dptrain.trainers.sampler import secure_normal

        state = session.rd.read_state() if resume else None
        if state is not None and "dp_bounds" not in state:
            raise RunError(f"--resume: {session.rd.state} holds no released dp bounds (the run started with another "
                           "recipe); resume with the original recipe and --set overrides, or start a new run")
        cfg = attach(recipe.data, released=state["dp_bounds"]) if state else attach(recipe.data, noise=secure_normal)
        held["data"] = load_data(cfg)
        return held["data"].preprocessing["dp_bounds"]

    released = dist.on_main(on_main)
    return held["data"] if "data" in held else load_data(attach(recipe.data, released=released))


def _numeric_mask(data: TabularData) -> np.ndarray | tuple[int, ...]:
    """Tables: which columns are numeric (the rest one-hot). Images: the image shape."""
    if data.x_train.ndim > 2:
        return tuple(data.x_train.shape[1:])
    n_num = len(data.preprocessing.get("numeric", {}))
    return np.arange(len(data.feature_names)) < n_num


def _with_canaries(data: TabularData, canaries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training arrays with the included canaries appended, canary j being privacy unit num_units + j."""
    if canaries is None:
        return data.x_train, data.y_train, data.units_train
    idx = np.flatnonzero(canaries.included)
    return (np.concatenate([data.x_train, canaries.x[idx]]), np.concatenate([data.y_train, canaries.y[idx]]),
            np.concatenate([data.units_train, data.num_units + idx]))


def _audit(predict, data: TabularData, canaries, statement: PrivacyStatement, recipe: Recipe) -> dict[str, Any]:
    """The audit (private: the loss attack counts individual training records)."""
    from dptrain.audit.audit import compute_audit

    return compute_audit(predict, canaries=canaries, x_train=data.x_train, y_train=data.y_train,
                         x_test=data.x_test, y_test=data.y_test,
                         claimed_epsilon=statement.epsilon, delta=statement.delta,
                         confidence=recipe.privacy.audit.confidence)


AUDIT_SUMMARY_KEYS = ("status", "epsilon_lower_bound", "max_certifiable_epsilon", "claimed_epsilon", "canary_auc",
                      "confidence", "message")


def _audit_summary(audit: dict[str, Any]) -> dict[str, Any]:
    out = {k: audit.get(k) for k in AUDIT_SUMMARY_KEYS}
    out["loss_attack_auc"] = audit["loss_attack"]["auc"]
    out["file"] = "private/audit.json"
    return out


def _metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """utility_metrics; with more than two classes (softmax head) ``auroc`` is the macro one-vs-rest AUROC, and the
    one-vs-rest AUROC of each class is added under ``auroc_per_class``."""
    if probs.shape[1] == 2:
        return utility_metrics(y, probs[:, 1])
    return {**utility_metrics(y, probs), "auroc_average": "macro one-vs-rest",
            "auroc_per_class": per_class_auroc(y, probs, classes)}


def _write_predictions(path: Path, data: TabularData, probs: np.ndarray) -> None:
    import io

    import pandas as pd

    frame = pd.DataFrame({"y_true": data.y_test})
    if probs.shape[1] == 2:
        frame["score"] = probs[:, 1]
    else:
        for i, c in enumerate(data.classes):
            frame[f"prob_{c}"] = probs[:, i]
    for col in data.sensitive_test.columns:
        frame[col] = data.sensitive_test[col].to_numpy()
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["CHECKPOINT", "RunError", "RunResult", "audit_run", "train", "CheckpointError", "RecipeError"]
