"""One training run, end to end: recipe -> data -> plan -> trainer -> THE loop -> run directory.

Everything that can be wrong with the input is checked before the run directory is created, so a
refused run writes nothing. During training the checkpoint is the single source of truth (one atomic
file holding model, optimiser, ledger, step and the secret DP seed); ``ledger.json`` and
``metrics.jsonl`` are rewritten from it. ``resume`` continues from the checkpoint with the same
ledger, so no step of privacy spending is lost or counted twice.

Data-parallel: under ``torchrun --nproc_per_node N -m dptrain train ...`` (WORLD_SIZE > 1) ``train`` joins
the process group (gloo on CPU, NCCL on GPU ``LOCAL_RANK``), trains the same accounted mechanism on N
processes (see :mod:`dptrain.trainers.distributed`) and leaves the group at the end. Only rank 0 reads or
writes the run directory and shows progress; it broadcasts what the others need (the secret dp_seed, the
checkpoint on resume, the canaries), and its errors stop every rank.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import accounting as acc
from accounting._io import atomic_write_bytes, atomic_write_json
from dptrain.config import Recipe, RecipeError, dump_recipe
from dptrain.data import TabularData, load_data
from dptrain.data.augment import make_augmenter
from dptrain.evaluate.metrics import utility_metrics
from dptrain.trainers.base import TrainerError
from dptrain.trainers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dptrain.trainers.distributed import LOCAL, BroadcastSampler, Distributed, DistributedError, from_env
from dptrain.trainers.loop import run_loop
from dptrain.trainers.plan import PrivacyPlan
from dptrain.trainers.sampler import UnitSampler

CHECKPOINT = "checkpoint.pt"


class RunError(ValueError):
    """The run cannot start or resume; the message says why and what to do."""


@dataclass
class RunResult:
    out_dir: Path
    record: dict[str, Any]


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", source.removeprefix("builtin:").split("/")[-1]).strip("-") or "data"


def build_trainer(recipe: Recipe, dist: Distributed = LOCAL):
    t = recipe.trainer
    if t.backend == "opacus":
        from dptrain.trainers.opacus_backend import OpacusTrainer

        return OpacusTrainer(recipe.optimizer, grad_sample_mode=t.grad_sample_mode,
                             max_physical_batch_size=t.max_physical_batch_size, secure_rng=recipe.privacy.secure_rng,
                             device=t.device, dist=dist)
    if dist.active:
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


def privacy_statement(plan: PrivacyPlan, ledger: acc.PrivacyLedger, recipe: Recipe) -> dict[str, Any]:
    """The full privacy statement of a run (DESIGN invariant 5)."""
    st = ledger.statement(plan.delta)
    independent = plan.planned_ledger().epsilon(plan.delta) if ledger.steps == plan.steps else None
    unit = plan.privacy_unit
    st.update({
        "mode": plan.mode,
        "sampling": plan.scheme.name,
        "sampling_rate": plan.scheme.sampling_rate,
        "expected_batch_size": plan.expected_batch_size,
        "noise_multiplier": plan.noise_multiplier,
        "planned_steps": plan.steps,
        "clipping_norm": plan.clipping_norm,
        "clipping_granularity": None if plan.mode == "non_private" else (
            "per example" if unit == "example" else f"per {unit} (all rows of a unit summed, then clipped)"),
        "target_epsilon": plan.target_epsilon if plan.target_epsilon is None or math.isfinite(plan.target_epsilon)
        else "inf",
        "epsilon_recomputed_from_plan": independent if independent is None or math.isfinite(independent) else "inf",
        "hyperparameter_selection_accounted": False,
        "dp_randomness": "OS CSPRNG" if recipe.privacy.secure_rng else "PRNG seeded from OS entropy (secret seed)",
        "covers": "training records only; test-set metrics and the test predictions are not protected",
    })
    if plan.mode == "non_private":
        st["warning"] = "NOT PRIVATE: non-private baseline (no clipping, no noise); epsilon is infinite"
    elif plan.mode == "clip_only":
        st["warning"] = "NOT PRIVATE: clip_only debugging mode (clipping without noise); epsilon is infinite"
    return st


class _Progress:
    """Progress bar: step, epoch, running loss, epsilon spent so far, ETA (tqdm)."""

    def __init__(self, plan: PrivacyPlan, start: int, enabled: bool, show_loss: bool = True):
        from tqdm.auto import tqdm

        self.show_loss = show_loss
        self.plan, self.k = plan, plan.scheme.steps_per_epoch()
        self.bar = tqdm(total=plan.steps, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
        self.loss, self.rows, self.eps = 0.0, 0, None

    def __call__(self, done: int, stats, ledger) -> None:
        self.loss += stats.loss_sum
        self.rows += stats.rows
        if done % self.k == 0 or done == self.plan.steps:
            self.eps = ledger.epsilon(self.plan.delta, quick=True)
        self.bar.update(1)
        self.bar.set_postfix(epoch=f"{self.plan.epochs_done(done):.1f}",
                             loss=f"{self.loss / max(self.rows, 1):.4f}" if self.show_loss else "n/a",
                             eps="n/a" if self.eps is None else f"{self.eps:.3g}", refresh=False)

    def close(self):
        self.bar.close()


def check_out_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """Refuse to overwrite a run; on ``resume`` of a finished run return its record (nothing to do)."""
    if (out / "record.json").exists() and not resume:
        raise RunError(f"--out {out}: a finished run is already there; choose another --out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunError(f"--out {out}: directory is not empty (an interrupted run?); pass --resume or another --out")
    if resume and not (out / CHECKPOINT).exists() and not (out / "config.yaml").exists():
        raise RunError(f"--resume: no interrupted run in {out}; start a new run without --resume")
    if resume and (out / "record.json").exists():
        return json.loads((out / "record.json").read_text())
    return None


def fit(trainer, sampler: UnitSampler, plan: PrivacyPlan, ledger: acc.PrivacyLedger, x, y, units, out: Path, *,
        start: int, dp_seed: int, metrics: list[dict[str, Any]], progress: bool, log_loss: bool = True,
        checkpoint_every: int | None = None, augment=None, state_extra: dict[str, Any] | None = None,
        writer: bool = True) -> float:
    """THE loop with a progress bar, per-epoch metrics and atomic checkpoints (every epoch, and at the end).

    The checkpoint holds trainer state, ledger, step, secret dp_seed, metrics and ``state_extra``; it is
    the single source of truth a resume starts from. The mean training loss is an un-noised statistic of
    the private batches: it is shown on the progress bar (the data owner's terminal; ``log_loss=False``
    hides it, e.g. when batches hold canaries) and written to metrics.jsonl only for non-private runs. ``writer=False`` (data-parallel ranks other than 0): no bar, metrics or files.
    Returns the seconds this session trained."""
    k = plan.scheme.steps_per_epoch()
    every = checkpoint_every or k
    bar = _Progress(plan, start, progress and writer, show_loss=log_loss)
    epoch_loss = {"sum": 0.0, "rows": 0}
    ckpt_path = out / CHECKPOINT

    def save(done: int) -> None:
        save_checkpoint(ckpt_path, {
            "trainer": trainer.state_dict(), "ledger": json.dumps(ledger.to_dict()), "step": done,
            "dp_seed": dp_seed, "metrics": json.dumps(metrics), **(state_extra or {})})
        ledger.save(out / "ledger.json")
        atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())

    def on_step(done: int, stats, led) -> None:
        epoch_loss["sum"] += stats.loss_sum
        epoch_loss["rows"] += stats.rows
        if done % k == 0 or done == plan.steps:
            eps = led.epsilon(plan.delta, quick=True)  # per-epoch upper bound; the record has the final number
            metrics.append({"epoch": round(plan.epochs_done(done), 3), "step": done,
                            "epsilon_upper_bound": eps if math.isfinite(eps) else "inf",
                            "train_loss_mean": epoch_loss["sum"] / max(epoch_loss["rows"], 1)
                            if log_loss and plan.mode == "non_private" else None})
            epoch_loss.update(sum=0.0, rows=0)
        if done % every == 0 or done == plan.steps:
            save(done)

    t0 = time.time()
    try:
        run_loop(trainer, sampler, plan, ledger, x, y, units, start_step=start,
                 callbacks=[bar, on_step] if writer else [], augment=augment)
    finally:
        bar.close()
    return time.time() - t0


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, dp_seed: int | None = None,
          progress: bool = True, checkpoint_every: int | None = None) -> RunResult:
    """Train one run into ``out_dir``. See the module docstring for the crash-safety contract.

    Under torchrun (WORLD_SIZE > 1) every rank calls this and gets the same result; rank 0's ``dp_seed``
    is used. Without WORLD_SIZE it is the single-process run."""
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
                        checkpoint_every=checkpoint_every)
        ok = True
        return result
    except DistributedError as err:  # rank 0 failed and reported why; this rank stops with a clear line
        raise RunError(str(err)) from None
    finally:
        dist.close(ok=ok)


def _train(recipe: Recipe, out: Path, dist: Distributed, *, resume: bool, dp_seed: int | None, progress: bool,
           checkpoint_every: int | None) -> RunResult:
    """``train`` on every rank. Each ``dist.on_main`` step (the file system) runs on rank 0 only and ends
    with a broadcast of its result or error; the rest is deterministic and the same on every rank."""
    ckpt_path = out / CHECKPOINT
    finished = dist.on_main(lambda: check_out_dir(out, resume))
    if finished is not None:
        return RunResult(out, finished)

    # ---- validate everything before writing anything ----
    data = load_data(recipe.data, seed=recipe.seed)
    n_canaries = recipe.privacy.audit.canaries
    # canaries are extra privacy units 0..M-1 after the real ones; an excluded canary is an empty unit, so the
    # number of units (and q) is public and does not depend on the secret inclusion coins
    plan = PrivacyPlan.from_recipe(recipe, data.num_units + n_canaries, data.privacy_unit)
    if plan.mode == "dp" and plan.target_epsilon is not None:
        planned = plan.planned_ledger().epsilon(plan.delta)
        if planned > plan.target_epsilon:  # calibration guarantees this never happens; check anyway
            raise RunError(f"plan: planned epsilon {planned:.4g} exceeds target {plan.target_epsilon}; refusing")
    if n_canaries:
        from dptrain.audit.bounds import require_jax_privacy

        try:
            require_jax_privacy()
        except ImportError as err:
            raise RunError(f"privacy.audit.canaries: {err}; or set privacy.audit.canaries=0") from None
    config_text = dump_recipe(recipe)

    def check_same_recipe() -> None:
        if resume and (out / "config.yaml").exists() and (out / "config.yaml").read_text() != config_text:
            raise RunError(f"--resume: the recipe differs from {out / 'config.yaml'}; resume with the same recipe "
                           "and --set overrides as the original run")

    dist.on_main(check_same_recipe)
    trainer = build_trainer(recipe, dist)
    model = build_model(recipe, data)

    def reserve() -> tuple[str, acc.DatasetBudget | None]:
        budget = None
        run_id = _read_run_id(out) if resume else None
        run_id = run_id or f"{out.name}-{uuid.uuid4().hex[:12]}"  # unique: a reused --out is charged again
        if recipe.privacy.dataset_budget is not None:
            budget_path = out.parent / f"{_slug(recipe.data.source)}.budget.json"
            planned = plan.planned_ledger()
            if not budget_path.exists() and planned.epsilon(plan.delta) > recipe.privacy.dataset_budget:
                raise acc.BudgetExceededError(
                    f"budget: this run alone would spend epsilon={planned.epsilon(plan.delta):.4g} at delta="
                    f"{plan.delta:g}, over privacy.dataset_budget={recipe.privacy.dataset_budget:g}; lower "
                    "privacy.epsilon or train fewer steps. Nothing was written.")
            budget = acc.DatasetBudget.create(
                budget_path, epsilon=recipe.privacy.dataset_budget, delta=plan.delta, relation=plan.relation,
                privacy_unit=plan.privacy_unit, accountant=plan.accountant, exist_ok=True)
            budget.reserve(run_id, planned)  # refuses (writing nothing) if it would overspend
        return run_id, budget

    run_id, budget = dist.on_main(reserve, share=False) or (None, None)  # the budget is rank 0's business

    # ---- start or resume ----
    def start_state() -> tuple[Any, dict | None, int | None]:
        """(canaries, checkpoint state on resume, else a fresh secret dp_seed), on every rank."""
        out.mkdir(parents=True, exist_ok=True)
        canaries = None
        if n_canaries:
            from dptrain.audit.canaries import FILE, load_canaries, make_canaries, save_canaries

            if resume and (out / FILE).exists():
                canaries = load_canaries(out / FILE)
            else:
                canaries = make_canaries(n_canaries, _numeric_mask(data), len(data.classes))
                save_canaries(out / FILE, canaries)
        if resume and ckpt_path.exists():
            return canaries, load_checkpoint(ckpt_path), None
        return canaries, None, secrets.randbits(63) if dp_seed is None else int(dp_seed)

    metrics: list[dict[str, Any]] = []
    canaries, state, new_seed = dist.on_main(start_state)
    x_train, y_train, units_train = _with_canaries(data, canaries)
    if state is not None:
        ledger = acc.PrivacyLedger.from_dict(json.loads(state["ledger"]))
        dp_seed, start = int(state["dp_seed"]), int(state["step"])
        metrics = json.loads(state["metrics"])
        trainer.init(model, plan, seed=recipe.seed, dp_seed=dp_seed, fix_batchnorm=recipe.model.fix_batchnorm,
                     ema=recipe.training.ema)
        trainer.load_state_dict(state["trainer"])
    else:
        dp_seed = new_seed
        ledger, start = plan.new_ledger(run=out.name, recipe=recipe.name), 0
        trainer.init(model, plan, seed=recipe.seed, dp_seed=dp_seed, fix_batchnorm=recipe.model.fix_batchnorm,
                     ema=recipe.training.ema)

        def write_start() -> None:
            atomic_write_bytes(out / "config.yaml", config_text.encode())
            atomic_write_bytes(out / "run_id", run_id.encode())

        dist.on_main(write_start)
    del state

    augment = make_augmenter(recipe.training.augment, recipe.training.augmult, recipe.seed)
    sampler = UnitSampler(units_train, plan.num_units, plan.scheme, dp_seed=dp_seed,
                          secure=recipe.privacy.secure_rng)
    if dist.active and recipe.privacy.secure_rng:  # OS coins differ per rank: rank 0 samples for everybody
        sampler = BroadcastSampler(sampler, dist)
    seconds = fit(trainer, sampler, plan, ledger, x_train, y_train, units_train, out, start=start, dp_seed=dp_seed,
                  metrics=metrics, progress=progress, log_loss=canaries is None,
                  checkpoint_every=checkpoint_every, augment=augment, writer=dist.is_main)

    # ---- evaluate and record (rank 0) ----
    def finish() -> dict[str, Any]:
        probs = trainer.predict(data.x_test)
        scores = probs[:, 1] if probs.shape[1] == 2 else probs
        test_metrics = utility_metrics(data.y_test, scores)
        _write_predictions(out / "predictions.parquet", data, probs)
        ledger.save(out / "ledger.json")
        if budget is not None:
            budget.settle(run_id, ledger)
        statement = privacy_statement(plan, ledger, recipe)
        if "warning" in data.preprocessing:  # e.g. per-image DP on data that has patient ids
            statement["warning"] = "; ".join(filter(None, [statement.get("warning"), data.preprocessing["warning"]]))
        audit = _audit(trainer, data, canaries, statement, recipe)
        atomic_write_json(out / "audit.json", _jsonable(audit))
        record = {
            "format": "dptrain.run-record/1",
            "status": "finished",
            "recipe": recipe.name,
            "privacy": statement,
            "audit": _audit_summary(audit),
            "metrics": {"test": test_metrics},
            "data": {"source": data.source, "n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
                     "num_units": data.num_units, "audit_canary_units": n_canaries, "privacy_unit": data.privacy_unit, "classes": data.classes,
                     "features": data.feature_names, "preprocessing": data.preprocessing},
            "training": {"backend": recipe.trainer.backend,
                         "clipping": recipe.trainer.grad_sample_mode if recipe.trainer.backend == "opacus"
                         else recipe.trainer.clipping,
                         "steps": ledger.steps, "seconds_this_session": round(seconds, 2), "resumed": resume,
                         "world_size": dist.world_size, "devices": getattr(trainer, "num_devices", 1)},
            "versions": _versions(),
        }
        atomic_write_json(out / "record.json", _jsonable(record))
        return record

    return RunResult(out, dist.on_main(finish))


def restore(out_dir: str | Path):
    """(recipe, data, trainer) of a run directory, the trainer loaded from its checkpoint (for audits)."""
    import yaml

    from dptrain.config import parse_recipe

    out = Path(out_dir)
    if not (out / "config.yaml").exists() or not (out / CHECKPOINT).exists():
        raise RunError(f"{out}: not a run directory (config.yaml and {CHECKPOINT} are needed); "
                       "give the --out of a `dptrain train` run")
    recipe = parse_recipe(yaml.safe_load((out / "config.yaml").read_text()))
    data = load_data(recipe.data, seed=recipe.seed)
    plan = PrivacyPlan.from_recipe(recipe, data.num_units + recipe.privacy.audit.canaries, data.privacy_unit)
    state = load_checkpoint(out / CHECKPOINT)
    trainer = build_trainer(recipe)
    trainer.init(build_model(recipe, data), plan, seed=recipe.seed, dp_seed=int(state["dp_seed"]),
                 fix_batchnorm=recipe.model.fix_batchnorm, ema=recipe.training.ema)
    trainer.load_state_dict(state["trainer"])
    return recipe, data, trainer


def audit_run(out_dir: str | Path) -> dict[str, Any]:
    """Re-run the audit of a finished run from its checkpoint; rewrites audit.json and the record's audit."""
    out = Path(out_dir)
    if not (out / "record.json").exists():
        raise RunError(f"{out}: no record.json (the run has not finished); finish it with --resume first")
    recipe, data, trainer = restore(out)
    canaries = None
    if recipe.privacy.audit.canaries:
        from dptrain.audit.canaries import FILE, load_canaries

        canaries = load_canaries(out / FILE)
    record = json.loads((out / "record.json").read_text())
    audit = _jsonable(_audit(trainer, data, canaries, record["privacy"], recipe))
    atomic_write_json(out / "audit.json", audit)
    record["audit"] = _audit_summary(audit)
    atomic_write_json(out / "record.json", _jsonable(record))
    return audit


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


def _audit(trainer, data: TabularData, canaries, statement: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    from dptrain.audit.audit import compute_audit

    eps = statement["epsilon"]
    return compute_audit(trainer.predict, canaries=canaries, x_train=data.x_train, y_train=data.y_train,
                         x_test=data.x_test, y_test=data.y_test,
                         claimed_epsilon=math.inf if eps == "inf" else float(eps), delta=statement["delta"],
                         confidence=recipe.privacy.audit.confidence)


AUDIT_SUMMARY_KEYS = ("status", "epsilon_lower_bound", "max_certifiable_epsilon", "claimed_epsilon", "canary_auc",
                      "confidence", "message")


def _audit_summary(audit: dict[str, Any]) -> dict[str, Any]:
    out = {k: audit.get(k) for k in AUDIT_SUMMARY_KEYS}
    out["loss_attack_auc"] = audit["loss_attack"]["auc"]
    out["file"] = "audit.json"
    return out


def _read_run_id(out: Path) -> str | None:
    try:
        return (out / "run_id").read_text().strip() or None
    except FileNotFoundError:
        return None


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


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = acc.software_versions()
    for pkg in ("torch", "opacus", "jax", "flax", "optax", "pydantic"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return obj


__all__ = ["RunError", "RunResult", "audit_run", "restore", "train", "CheckpointError", "RecipeError"]
