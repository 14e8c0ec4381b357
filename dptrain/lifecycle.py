"""The run directory and the privacy statement every command shares (DESIGN: one run lifecycle).

A run directory is split by the release boundary (DESIGN invariant 8)::

    RUN/release/   what the guarantee covers or what is public; safe to publish
        privacy.json        the public privacy statement (no exact count of the data)
        ledger.json         every DP event composed (the proof of the statement)
        config.yaml         the resolved recipe: the user's public declarations
        model.safetensors   the trained weights (train) + model.json: architecture and public preprocessing
        MODEL_CARD.md       (train) the model card: public facts and the statement in words, no metric
        synthetic.jsonl, DATACARD.md, adapters/   (synth) synthetic records, their card, the LoRA weights
    RUN/private/   never publish: computed from real records outside the mechanism, or secret
        record.json         the full run record: statement + metrics on real test records + audit + counts
        checkpoint.dptckpt  the resumable state incl. the secret DP seed (no pickle: see
                            dptrain.trainers.checkpoint); removed when the run finishes
                            unless kept on request (then loudly labelled)
        state.json          what a resume needs besides the checkpoint (the released unit count, ...)
        metrics.jsonl, predictions.parquet, audit.json, canaries.npz, evaluation.md, run_id, MODEL_CARD.md

Guarantees: a refused run writes nothing; every file is written atomically; a finished run keeps no secret
seed unless asked to; ``Session`` draws the DP unit count once (rank 0), persists it before training and
reuses it on resume, composes every release of the plan into the run's ledger at the start, and charges the
dataset budget (keyed by the dataset's identity) of every run on a budgeted dataset.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import accounting as acc
from accounting.atomic import atomic_write_bytes, atomic_write_json
from accounting.statement import IndependentCheck, PrivacyStatement, ReleasedUnits, encode_float
from dptrain.config import Recipe, dump_recipe
from dptrain.records import RunRecord
from dptrain.rundir import (
    CHECKPOINT,
    KEPT_CHECKPOINT_NOTE,
    LEGACY_CHECKPOINT,
    PRIVATE,
    RELEASE,
    RunDir,
    RunError,
    RunResult,
    recipe_hash,
)
from dptrain.trainers.plan import PrivacyPlan, UnitCount
from dptrain.values import jsonable


def software_versions() -> dict[str, str]:
    from importlib import metadata

    out = acc.software_versions()
    for pkg in ("torch", "opacus", "jax", "flax", "optax", "pydantic", "transformers", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def independent_epsilon(statement: PrivacyStatement | dict[str, Any]) -> float | None:
    """The statement's epsilon recomputed with dp_accounting directly from the statement's own serialised
    numbers (q, sigma, steps, scheme, the releases' noise), NOT from the ledger or ``accounting``: a
    cross-check of the ledger. None when the statement cannot be recomputed this way (e.g. RDP-only events)."""
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    st = statement.to_dict() if isinstance(statement, PrivacyStatement) else statement
    if st["mode"] != "dp":
        return math.inf
    sigma, q, steps = float(st["noise_multiplier"]), float(st["sampling_rate"]), int(st["steps"])
    events: list[Any] = []
    if st["sampling"] == "poisson":
        events.append(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    elif st["sampling"] == "shuffled":
        k = int(st["steps_per_epoch"])
        events.append(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma), math.ceil(steps / k)))
    else:
        return None
    for rel in (st.get("releases") or {}).values():
        events.append(dpa.GaussianDpEvent(rel["noise_std"] / rel["l2_sensitivity"]))
    event = dpa.ComposedDpEvent(events)
    relation = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    if st["accountant"] == "pld":
        accountant = pld_privacy_accountant.PLDAccountant(
            relation, value_discretization_interval=float(st.get("pld_discretization") or 1e-3))
    else:
        accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    accountant.compose(event)
    return float(accountant.get_epsilon(float(st["delta"])))


def run_statement(plan: PrivacyPlan, ledger: acc.PrivacyLedger, recipe: Recipe, count: UnitCount, *,
                  releases: dict[str, dict[str, float]] | None = None, covers: str, public: str,
                  warning: str | None = None) -> PrivacyStatement:
    """The full public privacy statement of a run (DESIGN invariant 5). Holds no exact count of the data:
    the number of units appears only as released (declared, or a DP count)."""
    unit = plan.privacy_unit
    releases = dict(releases or {})
    if count.source == "dp_count":
        releases = {"unit_count": {"noise_std": float(count.noise_multiplier), "l2_sensitivity": 1.0}, **releases}
    warnings = [warning] if warning else []
    if plan.mode == "non_private":
        warnings.insert(0, "NOT PRIVATE: non-private baseline (no clipping, no noise); epsilon is infinite")
    elif plan.mode == "clip_only":
        warnings.insert(0, "NOT PRIVATE: clip_only debugging mode (clipping without noise); epsilon is infinite")
    st = replace(
        ledger.statement(plan.delta),
        relation_meaning=f"{plan.relation}: datasets differing by adding or removing all records of one {unit}",
        mode=plan.mode, sampling=plan.scheme.name, sampling_rate=plan.scheme.sampling_rate,
        expected_batch_size=plan.expected_batch_size, steps_per_epoch=plan.scheme.steps_per_epoch(),
        max_batch_size=getattr(plan.scheme, "max_batch_size", None),
        units=ReleasedUnits(count.value, count.public_extra, count.source, count.describe()),
        noise_multiplier=plan.noise_multiplier, planned_steps=plan.steps, clipping_norm=plan.clipping_norm,
        clipping_granularity=None if plan.mode == "non_private" else (
            "per example" if unit == "example" else f"per {unit} (all rows of a unit summed, then clipped)"),
        target_epsilon=plan.target_epsilon, releases=releases, hyperparameter_selection_accounted=False,
        dp_randomness="OS CSPRNG" if recipe.privacy.secure_rng else "PRNG seeded from OS entropy (secret seed)",
        covers=covers, public=public, warning="; ".join(warnings) if warnings else None)
    check = independent_epsilon(st) if ledger.steps == plan.steps else None
    return replace(st, epsilon_independent_check=IndependentCheck(
        check, "dp_accounting's own accountant on events rebuilt from this statement's numbers (q, sigma, steps, "
               "releases), not from the ledger"))


class Session:
    """One run's lifecycle on every rank: directory check, unit count, plan, budget, start or resume (secret
    seed, ledger), atomic checkpoints, finish (statement, record, budget settled, seed removed).

    File work happens on rank 0 only (``dist.on_main`` broadcasts its result or error to the other ranks)."""

    def __init__(self, recipe: Recipe, out_dir: str | Path, *, resume: bool = False, dist=None,
                 keep_checkpoint: bool = False, command: str = "train", data_parallel: bool = True):
        from dptrain.trainers.context import LOCAL

        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and not data_parallel:
            raise RunError(f"dptrain {command} runs in one process (WORLD_SIZE={world}: data-parallel {command} is not "
                           "supported yet); run it without torchrun")
        self.command = command
        self.recipe, self.rd, self.resume = recipe, RunDir(out_dir), resume
        self.dist = dist or LOCAL
        self.keep_checkpoint = keep_checkpoint
        self.config_text = dump_recipe(recipe)
        self._lock_fd: int | None = None
        self._created = False
        self._created_top: Path | None = None
        self.count: UnitCount | None = None
        self.plan: PrivacyPlan | None = None
        self.budget = None
        self.run_id: str | None = None
        self.ledger: acc.PrivacyLedger | None = None
        self.start_step = 0
        self.dp_seed: int | None = None
        self.checkpoint: dict[str, Any] | None = None
        self.state: dict[str, Any] = {}
        self.metrics: list[dict[str, Any]] = []
        self.finished = self.dist.on_main(self._open)

    def _open(self) -> dict[str, Any] | None:
        """Rank 0: check --out, create it and hold an exclusive lock on it (flock on the directory) for the
        session's lifetime, so a second process on the same --out gets one line and exits."""
        import fcntl

        rd = self.rd
        rd.probe_writable()
        self._created = not rd.root.exists()
        # the topmost folder this session creates (--out may name missing parents): removed again on a refusal
        self._created_top = next((q for q in reversed([rd.root, *rd.root.parents]) if not q.exists()), None)
        rd.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(rd.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(f"--out {rd.root}: another dptrain process is using this run directory; wait for it to "
                           "finish (then --resume if it was interrupted) or choose another --out") from None
        self._lock_fd = fd
        try:
            finished = rd.check(self.resume)
        except BaseException:
            self.abandon()
            raise
        if finished is not None:
            self.close()
        return finished

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, err, tb) -> None:
        """``with Session(...) as session:`` -- on leaving (an error, Ctrl-C, or done) undo an attempt that never
        started (:meth:`abandon`) and release the lock."""
        self.abandon()  # keeps a started run (for --resume); undoes an attempt that never started

    def close(self) -> None:
        """Release the run directory's lock (also released when the process exits)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def abandon(self) -> None:
        """After a refusal (rank 0): if nothing started (no config, state, checkpoint or record), cancel this
        attempt's budget reservation, remove what it created (its run_id, the empty folders, --out itself if
        this session created it) and release the lock -- a refused run leaves nothing. A started run is kept
        for --resume."""
        if not self.dist.is_main:
            return
        rd = self.rd
        try:
            if rd.root.is_dir() and not rd.started() and rd.only_skeleton():
                if self.budget is not None and self.run_id is not None:
                    self.budget.cancel(self.run_id)
                rd.clean_temp()
                rd.run_id_file.unlink(missing_ok=True)
                for side in (rd.private, rd.release):
                    if side.is_dir() and not any(side.rglob("*")):
                        side.rmdir()
                if self._created and self._created_top is not None:
                    folder = rd.root
                    while not any(folder.iterdir()):
                        folder.rmdir()
                        if folder == self._created_top:
                            break
                        folder = folder.parent
        finally:
            self.close()

    # ---- before anything is written ----
    def make_plan(self, true_units: int, *, public_extra: int = 0, privacy_unit: str = "example",
                  releases: tuple = (), build: Callable[..., PrivacyPlan] | None = None) -> PrivacyPlan:
        """Count (or restore the count of) the units, build and check the plan; refuses a changed recipe on
        resume. Writes nothing. ``build``: the plan's constructor (default ``PrivacyPlan.from_recipe``; Private
        Evolution passes its own, same signature)."""
        from dptrain.trainers.plan import count_units

        def restore_or_count() -> dict[str, Any]:
            if self.resume:
                if self.rd.config.exists() and self.rd.config.read_text() != self.config_text:
                    raise RunError(f"--resume: the recipe differs from {self.rd.config}; resume with the same recipe "
                                   "and --set overrides as the original run")
                state = self.rd.read_state()
                if state is not None:
                    if state.get("recipe_sha256") not in (None, recipe_hash(self.config_text)):
                        raise RunError(f"--resume: the recipe differs from the one {self.rd.state} recorded when the "
                                       "run started (config.yaml was changed or removed); resume with the original "
                                       "recipe and --set overrides, or start a new run")
                    return state
                if self.rd.checkpoint.exists():  # the released count is gone: a new draw would be a second release
                    raise RunError(f"--resume: {self.rd.state} is missing next to a checkpoint; the run cannot be "
                                   "resumed without re-releasing the unit count; start a new run")
            return {"unit_count": count_units(self.recipe, true_units, public_extra).to_dict()}

        self.state = self.dist.on_main(restore_or_count)
        self.count = UnitCount.from_dict(self.state["unit_count"])
        if self.count.public_extra != public_extra:
            raise RunError(f"--resume: {self.rd.root} was started with other dptrain-added units; start a new run")
        try:
            plan = (build or PrivacyPlan.from_recipe)(self.recipe, self.count, privacy_unit, releases=releases)
        except acc.UnreachableTargetError as err:
            raise RunError(f"{err}; the target must also cover the DP count of units (privacy."
                           "count_noise_multiplier) and other releases, or declare privacy.dataset_size") from None
        if plan.mode == "dp" and plan.target_epsilon is not None:
            planned = plan.planned_ledger().epsilon(plan.delta)
            if planned > plan.target_epsilon:  # calibration guarantees this never happens; check anyway
                raise RunError(f"plan: planned epsilon {planned:.4g} exceeds target {plan.target_epsilon}; refusing")
        self.plan = plan
        return plan

    def reserve_budget(self, dataset_id: str) -> None:
        """Charge the dataset budget (if the dataset has one, or the recipe declares one): refuses a run that
        would overspend it, writing nothing. Rank 0 only."""
        def reserve():
            # the run id is persisted before the reservation, so an attempt killed after reserving is charged
            # once: its rerun in this --out (resume or a fresh start of the unstarted directory) reuses the id
            run_id = self.rd.run_id() or f"{self.rd.root.name}-{uuid.uuid4().hex[:12]}"
            self.rd.make()
            atomic_write_bytes(self.rd.run_id_file, run_id.encode())
            try:
                budget = acc.reserve_run(dataset_id, run_id, self.plan.planned_ledger(), delta=self.plan.delta,
                                         declared_epsilon=self.recipe.privacy.dataset_budget)
            except acc.InvalidParameterError as err:
                raise RunError(f"privacy.dataset_budget: {err}") from None
            return run_id, budget

        self.run_id, self.budget = self.dist.on_main(reserve, share=False) or (None, None)

    # ---- start or resume ----
    def start(self, dp_seed: int | None = None, fresh_state: Callable[[], dict[str, Any]] | None = None) -> None:
        """Resume from the checkpoint, or start fresh: a secret dp_seed, a ledger holding every release of the
        plan, and (rank 0) config.yaml, run_id and state.json written before any training. ``fresh_state()``
        (fresh starts only, rank 0) returns more JSON state to persist, e.g. released noisy counts."""
        rd, plan = self.rd, self.plan

        def begin() -> tuple[dict | None, dict[str, Any], int | None]:
            from dptrain.trainers.checkpoint import CheckpointError, load_checkpoint

            rd.make()
            if self.resume and not rd.config.exists():  # deleted; make_plan checked the recipe against state.json
                atomic_write_bytes(rd.config, self.config_text.encode())
            if self.resume and rd.checkpoint.exists():
                ckpt = load_checkpoint(rd.checkpoint)
                if ckpt.get("recipe_sha256") != recipe_hash(self.config_text):
                    raise RunError(f"--resume: {rd.checkpoint} was written by another recipe (its recipe hash differs "
                                   "from this run's); resume with the original recipe, or start a new run")
                return ckpt, self.state, None
            if self.resume and rd.release.is_dir():  # outputs released, seed and noise gone: a restart re-releases
                out = sorted(p.name for p in rd.release.iterdir() if p.name != rd.config.name)
                if out:
                    raise RunError(f"--resume: {rd.release} already holds this run's outputs ({', '.join(out[:3])}) but "
                                   f"{rd.checkpoint.name} is gone, so a restart would release them again with new "
                                   "noise (a second, unaccounted release); start a new run in a new --out")
            if self.resume and (rd.private / LEGACY_CHECKPOINT).exists():  # never unpickled, never silently redone
                raise CheckpointError(f"checkpoint {rd.private / LEGACY_CHECKPOINT}: written by an older dptrain in the "
                                      "torch/pickle format, which is no longer loaded; refusing to load it: finish the "
                                      "run with the dptrain version that started it, or start a new run")
            state = dict(self.state)
            if fresh_state is not None and not (self.resume and "fresh" in state):
                state.update(fresh_state())
            state["fresh"] = True
            state["recipe_sha256"] = recipe_hash(self.config_text)
            atomic_write_bytes(rd.config, self.config_text.encode())
            atomic_write_bytes(rd.run_id_file, (self.run_id or f"{rd.root.name}-{uuid.uuid4().hex[:12]}").encode())
            atomic_write_json(rd.state, jsonable(state))
            return None, state, secrets.randbits(63) if dp_seed is None else int(dp_seed)

        ckpt, self.state, new_seed = self.dist.on_main(begin)
        if ckpt is not None:
            self.ledger = acc.PrivacyLedger.from_dict(json.loads(ckpt["ledger"]))
            self.dp_seed, self.start_step = int(ckpt["dp_seed"]), int(ckpt["step"])
            self.metrics = json.loads(ckpt["metrics"])
            self.checkpoint = ckpt
        else:
            self.dp_seed, self.start_step = new_seed, 0
            self.ledger = plan.new_ledger(run=rd.root.name, recipe=self.recipe.name)
            for label, event in plan.releases:
                self.ledger.compose(event, label=label)

    def restore(self, trainer) -> None:
        """On resume: load the checkpoint's trainer state into ``trainer`` (initialised the same way) and drop it."""
        if self.checkpoint is not None:
            trainer.load_state_dict(self.checkpoint["trainer"])
            self.checkpoint = None

    # ---- training ----
    def fit(self, trainer, sampler, x, y, units, *, progress: bool, checkpoint_every: int | None = None,
            augment=None, log_loss: bool = True) -> float:
        """THE loop with a progress bar, per-epoch metrics (private/metrics.jsonl) and atomic checkpoints
        (every epoch and at the end: trainer state, ledger, step, secret dp_seed, metrics). The progress bar
        shows step, epoch, epsilon and ETA; the training loss only for non-private runs (for a DP run it is an
        un-noised statistic of the private batches). Returns the seconds this session trained."""
        from dptrain.trainers.checkpoint import save_checkpoint
        from dptrain.trainers.loop import run_loop

        plan, rd, ledger, metrics = self.plan, self.rd, self.ledger, self.metrics
        writer = self.dist.is_main
        show_loss = log_loss and plan.mode == "non_private"
        k = plan.scheme.steps_per_epoch()
        every = checkpoint_every or k
        bar = _Progress(plan, self.start_step, progress and writer, show_loss)
        epoch_loss = {"sum": 0.0, "rows": 0}

        def save(done: int) -> None:
            save_checkpoint(rd.checkpoint, {
                "trainer": trainer.state_dict(), "ledger": json.dumps(ledger.to_dict()), "step": done,
                "recipe_sha256": recipe_hash(self.config_text),
                "dp_seed": self.dp_seed, "metrics": json.dumps(metrics)})
            ledger.save(rd.ledger)
            atomic_write_bytes(rd.metrics, "".join(json.dumps(m) + "\n" for m in metrics).encode())

        def on_step(done: int, stats, led) -> None:
            epoch_loss["sum"] += stats.loss_sum
            epoch_loss["rows"] += stats.rows
            if done % k == 0 or done == plan.steps:
                eps = led.epsilon(plan.delta, quick=True)  # per-epoch upper bound; the record has the final number
                metrics.append({"epoch": round(plan.epochs_done(done), 3), "step": done,
                                "epsilon_upper_bound": encode_float(eps),
                                "train_loss_mean": epoch_loss["sum"] / max(epoch_loss["rows"], 1)
                                if show_loss else None})
                epoch_loss.update(sum=0.0, rows=0)
            if done % every == 0 or done == plan.steps:
                save(done)

        t0 = time.time()
        try:
            run_loop(trainer, sampler, plan, ledger, x, y, units, start_step=self.start_step,
                     callbacks=[bar, on_step] if writer else [], augment=augment)
        finally:
            bar.close()
        return time.time() - t0

    # ---- finish ----
    def settle(self) -> None:
        """Replace the budget reservation by what the run spent (once; before anything is released)."""
        if self.budget is not None and not getattr(self, "_settled", False):
            self.budget.settle(self.run_id, self.ledger)
            self._settled = True

    def release_dir(self) -> Path:
        """Where the trained model and generated data go: release/ for a DP run; private/NOT-PRIVATE/ for a
        non-private or clip-only run (nothing protects it, so it is never on the publishable side)."""
        if self.plan.mode == "dp":
            return self.rd.release
        out = self.rd.private / "NOT-PRIVATE"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def finish(self, statement: PrivacyStatement | dict[str, Any], record: dict[str, Any],
               write_release: Callable[[], None] | None = None) -> dict[str, Any]:
        """Rank 0, in this order: settle the budget (a refusal stops the run before anything is released), write
        release/ (``write_release()``, ledger.json, privacy.json), write private/record.json (a
        :class:`~dptrain.records.RunRecord`; its presence marks the run finished), then remove the checkpoint and
        any temporary copy (the secret seed) unless kept. ``record``: the command's sections, plus ``command``
        (or a legacy ``format``), ``data``. Returns the record as written (JSON)."""
        rd = self.rd
        if not isinstance(statement, PrivacyStatement):
            statement = PrivacyStatement.from_dict(statement)
        self.settle()
        if write_release is not None:
            write_release()
        self.ledger.save(rd.ledger)
        statement.save(rd.statement)
        sections = dict(record)
        fmt = str(sections.pop("format", ""))
        command = sections.pop("command", "synth" if "synth" in fmt else self.command)
        for key in ("status", "recipe", "privacy", "run_id", "checkpoint_kept", "versions", "files", "training_log"):
            sections.pop(key, None)
        data = sections.pop("data", {})
        if self.keep_checkpoint:
            atomic_write_bytes(rd.private / KEPT_CHECKPOINT_NOTE, (
                f"{CHECKPOINT} in this folder holds the secret DP seed: with it and the initial weights the noise "
                "of every step can be regenerated and subtracted, which voids the privacy guarantee. Never copy it "
                "out of the hospital; delete it when you no longer need to resume or extend this run.\n").encode())
        files = rd.files()
        files[PRIVATE] = sorted({*files.get(PRIVATE, []), "record.json"} - ({CHECKPOINT} if not self.keep_checkpoint
                                                                             else set()))
        out = RunRecord(command=command, recipe=self.recipe.name, run_id=self.run_id or rd.run_id(),
                        privacy=statement, data=data, training_log=list(self.metrics), sections=sections,
                        checkpoint_kept=self.keep_checkpoint, versions=software_versions(), files=files)
        written = out.to_dict()
        atomic_write_json(rd.record, written)
        if not self.keep_checkpoint:
            rd.remove_secrets()
        rd.clean_temp()
        return written


class _Progress:
    """Progress bar: step, epoch, epsilon spent so far, ETA (tqdm); the running loss only if ``show_loss``."""

    def __init__(self, plan: PrivacyPlan, start: int, enabled: bool, show_loss: bool):
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
        post = {"epoch": f"{self.plan.epochs_done(done):.1f}"}
        if self.show_loss:
            post["loss"] = f"{self.loss / max(self.rows, 1):.4f}"
        post["eps"] = "n/a" if self.eps is None else f"{self.eps:.3g}"
        self.bar.set_postfix(post, refresh=False)

    def close(self):
        self.bar.close()


__all__ = ["CHECKPOINT", "PRIVATE", "RELEASE", "RunDir", "RunError", "RunResult", "Session", "independent_epsilon",
           "jsonable", "run_statement", "software_versions"]
