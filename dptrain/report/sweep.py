"""Sweeps: one recipe trained over a grid of epsilon x seed (x backend), each point a normal run directory.

Layout of a sweep directory ``DIR`` (the release boundary of a run directory, applied to the sweep)::

    DIR/sweep.json              the grid, the recipe it came from and the one split every point shares
                                (written first, atomically)
    DIR/runs/<backend>-eps<e>-seed<s>/   one ordinary run directory per point: release/ + private/
                                (see dptrain.lifecycle.RunDir)
    DIR/failures/<point>.txt    the error of a point that failed (removed when it later succeeds)
    DIR/private/                never publish: computed from real test and validation records and their
                                sensitive attributes -- written by dptrain.report.build_report
        report.html, report.md, summary.csv, plots/
    DIR/release/selection.json  the public statement of the selection (build_report): the configuration
                                chosen per backend, the composed epsilon of all private runs, the
                                RepeatAndSelect bound with its assumption, the delta and the wording of the
                                guarantee -- no metric values and no counts of records

Guarantees and sharp edges:

* One split for the whole sweep: a sweep varies only the training ``seed``; the train / validation / test
  split depends on ``data.split_seed`` and the declared fractions, so every run has the same training
  records, validation records and test records. A grid whose points would differ in the split is refused.
* Selection on validation records, reporting on test records: if the recipe has no validation split
  (``data.validation_fraction: 0``) the sweep sets ``data.validation_fraction`` to 0.2 for every point
  (said in the progress output, recorded in sweep.json under ``split``). The report chooses a configuration
  by validation AUROC only; test metrics never take part in the choice. Because the choice uses only the
  runs' DP outputs (their models' scores on non-training records), publishing the chosen model costs at
  most the composition of all private runs (stated in release/selection.json); RepeatAndSelect is stated
  too, with the assumption it needs (a random number of runs), which a fixed grid does not meet.
* Rerunning the same command resumes: finished points (``private/record.json`` present) are skipped,
  interrupted ones (``release/config.yaml`` or ``private/checkpoint.dptckpt`` present) continue with the same
  ledger, failed ones are retried. A rerun with a different grid, recipe or split in the same ``DIR`` is
  refused (the report would mix experiments).
* Every point is an independent run with its own ledger: the sweep does not make any run's epsilon
  smaller or larger. The cost of *choosing* among the runs is stated by the report, not hidden.
* ``executor="local"`` runs points in ``jobs`` spawned processes on this machine (each limited to its share
  of the CPU threads); ``executor="ray"`` submits each point as a Ray task, to a running cluster
  (``address``) or to a local Ray started with ``jobs`` CPUs. With a remote cluster, ``DIR`` must be on a
  filesystem every node sees.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accounting.atomic import atomic_write_bytes, atomic_write_json
from dptrain.config import TRAINER_FIELDS, Recipe, RecipeError, dump_recipe, parse_recipe
from dptrain.lifecycle import RunDir

SWEEP_FORMAT = "dptrain.sweep/2"
EXECUTORS = ("local", "ray")
DEFAULT_VALIDATION_FRACTION = 0.2  # set for every point when the recipe has no validation split
SPLIT_FIELDS = ("split_seed", "validation_fraction", "test_fraction")


class SweepError(ValueError):
    """The sweep cannot start; the message names the field, the value and the fix."""


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


@dataclass(frozen=True)
class SweepPoint:
    backend: str
    epsilon: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.backend}-eps{eps_label(self.epsilon)}-seed{self.seed}"


def parse_epsilons(text: str) -> list[float]:
    """``"0.5,1,2,inf"`` -> ``[0.5, 1.0, 2.0, inf]``; each > 0, no duplicates."""
    out: list[float] = []
    for raw in str(text).split(","):
        tok = raw.strip().lower()
        try:
            val = math.inf if tok in {"inf", "+inf", "infinity"} else float(tok)
        except ValueError:
            raise SweepError(f"--epsilons: {raw.strip()!r} is not a number; give a comma-separated list such as "
                             "0.5,1,2,4,8,inf (inf = non-private reference)") from None
        if not val > 0 or math.isnan(val):
            raise SweepError(f"--epsilons: {raw.strip()!r} must be > 0 (or inf for the non-private reference)")
        if val in out:
            raise SweepError(f"--epsilons: {raw.strip()!r} is listed twice; list each epsilon once")
        out.append(val)
    return out


def validation_fraction(recipe: Recipe) -> tuple[float, bool]:
    """(the validation fraction every point uses, whether the sweep set it): the recipe's, or
    ``DEFAULT_VALIDATION_FRACTION`` when the recipe has none (a sweep selects on validation records)."""
    v = float(recipe.data.validation_fraction)
    return (v, False) if v > 0 else (DEFAULT_VALIDATION_FRACTION, True)


def check_one_split(points: Sequence[tuple[SweepPoint, Recipe]]) -> dict[str, Any]:
    """Refuse a grid whose points would not share one train / validation / test split (it would make one
    run's test or validation records another run's training records); returns the shared split fields."""
    if not points:
        raise SweepError("sweep: no points; give --epsilons and --seeds")
    p0, r0 = points[0]
    ref = r0.data.model_dump(mode="json")
    for p, r in points[1:]:
        data = r.data.model_dump(mode="json")
        if data == ref:
            continue
        diff = [k for k in SPLIT_FIELDS if data.get(k) != ref.get(k)] or sorted(
            k for k in set(data) | set(ref) if data.get(k) != ref.get(k))
        what = ", ".join(f"data.{k} {ref.get(k)!r} vs {data.get(k)!r}" for k in diff)
        raise SweepError(f"sweep points {p0.name} and {p.name} would use different data splits ({what}); every run of "
                         "a sweep must share one train/validation/test split: set data.split_seed and "
                         "data.validation_fraction once in the recipe, not per point (a sweep varies only seed)")
    return {k: ref[k] for k in SPLIT_FIELDS}


def plan_points(recipe: Recipe, epsilons: Sequence[float], seeds: int,
                backends: Sequence[str] | None = None) -> list[tuple[SweepPoint, Recipe]]:
    """The grid, in run order (privately cheapest points last is not guaranteed; order is eps, seed, backend).

    Every point shares the recipe's split (``data.split_seed``); a recipe without a validation split gets
    ``data.validation_fraction = DEFAULT_VALIDATION_FRACTION`` for every point."""
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise SweepError(f"--seeds: got {seeds!r}; give the number of seeds per epsilon, an integer >= 1")
    if not epsilons:
        raise SweepError("--epsilons: empty; give e.g. 1,4,8,inf")
    backends = list(backends or [recipe.trainer.backend])
    for b in backends:
        if b not in ("opacus", "jax"):
            raise SweepError(f"--backends: {b!r} is unknown; use opacus, jax or opacus,jax")
    if len(set(backends)) != len(backends):
        raise SweepError(f"--backends: {','.join(backends)} lists a backend twice")
    if recipe.privacy.noise_multiplier is not None:
        raise SweepError("privacy.noise_multiplier is set in the recipe; a sweep sets privacy.epsilon per point, "
                         "so remove privacy.noise_multiplier (or --set privacy.noise_multiplier=null)")
    base = recipe.model_dump(mode="python")
    val, set_here = validation_fraction(recipe)
    base["data"]["validation_fraction"] = val
    out = []
    for eps in epsilons:
        for i in range(seeds):
            for b in backends:
                tree = copy.deepcopy(base)
                tree["privacy"]["epsilon"] = eps
                tree["trainer"]["backend"] = b
                for other, names in TRAINER_FIELDS.items():  # the other backend's options do not apply here
                    if other != b:
                        for name in names - TRAINER_FIELDS[b]:
                            tree["trainer"].pop(name, None)
                tree["seed"] = recipe.seed + i
                try:
                    r = parse_recipe(tree)
                except RecipeError as err:
                    fix = (f" (the sweep sets data.validation_fraction={val:g} because the recipe has no validation "
                           "split; set data.validation_fraction yourself, e.g. --set data.validation_fraction=0.1)"
                           if set_here and "validation_fraction" in str(err) else "")
                    raise SweepError(f"sweep point {b} eps={eps_label(eps)}: {err}{fix}") from None
                out.append((SweepPoint(b, eps, recipe.seed + i), r))
    check_one_split(out)
    return out


def _spec(recipe: Recipe, points: list[tuple[SweepPoint, Recipe]], threshold: float) -> dict[str, Any]:
    split = check_one_split(points)
    set_here = validation_fraction(recipe)[1]
    split["validation_fraction_source"] = (
        "set by the sweep (the recipe has data.validation_fraction 0): the report selects on validation records"
        if set_here else "the recipe")
    split["note"] = ("every run of the sweep shares this one train/validation/test split (the split seed is apart "
                     "from the training seed, which is what the sweep varies)")
    return {
        "format": SWEEP_FORMAT,
        "recipe": dump_recipe(recipe),
        "epsilons": sorted({eps_label(p.epsilon) for p, _ in points}, key=lambda s: float(s)),
        "seeds": sorted({p.seed for p, _ in points}),
        "backends": list(dict.fromkeys(p.backend for p, _ in points)),
        "points": [p.name for p, _ in points],
        "split": split,
        "threshold": threshold,
    }


# ---- one point (runs in a worker process or a Ray task) ----

def _limit_threads(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if threads == 1:
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def die_with_parent() -> None:
    """Worker initializer (Linux): the kernel kills this worker when the sweep process dies (PR_SET_PDEATHSIG),
    so a killed sweep leaves no point training behind. Elsewhere a no-op: a rerun then meets a worker still
    holding its run directory's lock and records that point as failed (never two writers in one directory)."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call: nothing would notify us
        os._exit(1)


def run_point(recipe_yaml: str, run_dir: str, threads: int) -> dict[str, Any]:
    """Train one point; never raises (a failure is returned as status 'failed' with the error)."""
    import yaml

    _limit_threads(threads)
    from dptrain.run import train

    out = Path(run_dir)
    try:
        recipe = parse_recipe(yaml.safe_load(recipe_yaml))
        rd = RunDir(out)
        resume = rd.config.exists() or rd.checkpoint.exists()
        t0 = time.time()
        train(recipe, out, resume=resume, progress=False)
        return {"status": "finished", "seconds": round(time.time() - t0, 1), "resumed": resume}
    except Exception as err:  # noqa: BLE001 - a failed point must not stop the sweep
        return {"status": "failed", "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=20)}


# ---- the sweep ----

@dataclass
class SweepResult:
    out_dir: Path
    statuses: dict[str, str]  # point name -> finished | failed | skipped

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.statuses.items() if v == "failed"]


def _printer() -> Callable[[str], None]:
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    return say


def run_sweep(recipe: Recipe, out_dir: str | Path, *, epsilons: Sequence[float], seeds: int,
              backends: Sequence[str] | None = None, executor: str = "local", jobs: int = 1,
              address: str | None = None, threshold: float = 0.5,
              progress: Callable[[str], None] | None = None) -> SweepResult:
    """Run (or resume) the grid into ``out_dir``. Does not build the report (see ``build_report``)."""
    say = progress or _printer()
    if executor not in EXECUTORS:
        raise SweepError(f"--executor: {executor!r} is unknown; use local or ray")
    if not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"--jobs: got {jobs!r}; give the number of runs at a time, an integer >= 1")
    if address and executor != "ray":
        raise SweepError("--address is for --executor ray; drop it or use --executor ray")
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise SweepError(f"--threshold: got {threshold!r}; give the fixed decision threshold in (0, 1)")
    points = plan_points(recipe, epsilons, seeds, backends)
    out = Path(out_dir)
    spec = _spec(recipe, points, float(threshold))
    spec_path = out / "sweep.json"
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        keys = ("recipe", "points", "split")
        if {k: old.get(k) for k in keys} != {k: spec[k] for k in keys}:
            raise SweepError(f"--out {out}: holds a different sweep (other recipe, grid or split, or one from an "
                             "earlier dptrain without a validation split); rerun the same command to resume it, or "
                             "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec_path, spec)

    statuses: dict[str, str] = {}
    todo: list[tuple[SweepPoint, Recipe]] = []
    for p, r in points:
        if RunDir(out / "runs" / p.name).record.exists():
            statuses[p.name] = "skipped"
        else:
            todo.append((p, r))
    skipped = len(points) - len(todo)
    say(f"sweep {out}: {len(points)} runs ({skipped} already finished, {len(todo)} to run) "
        f"with executor={executor}, jobs={jobs}")
    split = spec["split"]
    if validation_fraction(recipe)[1]:
        say(f"  the recipe has no validation split, so every run uses data.validation_fraction="
            f"{split['validation_fraction']:g} (recorded in sweep.json): the report selects a configuration on "
            "validation records and reports it on test records")
    say(f"  one train/validation/test split for every run (data.split_seed={split['split_seed']}, "
        f"test_fraction={split['test_fraction']:g}, validation_fraction={split['validation_fraction']:g})")
    if todo:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        tasks = [(p, dump_recipe(r), str(out / "runs" / p.name)) for p, r in todo]
        run = _run_local if executor == "local" else _run_ray
        counts = {"done": skipped, "failed": 0}

        def on_done(p: SweepPoint, res: dict[str, Any], running: int) -> None:
            statuses[p.name] = res["status"]
            fail_file = out / "failures" / f"{p.name}.txt"
            if res["status"] == "failed":
                counts["failed"] += 1
                fail_file.parent.mkdir(exist_ok=True)
                atomic_write_bytes(fail_file, (res["error"] + "\n\n" + res.get("traceback", "")).encode())
                say(f"  FAILED {p.name}: {res['error']}")
            else:
                counts["done"] += 1
                fail_file.unlink(missing_ok=True)
            left = len(points) - counts["done"] - counts["failed"] - running
            say(f"  runs done {counts['done']}/{len(points)}, running {running}, left {left}"
                + (f", failed {counts['failed']}" if counts["failed"] else "") + f"  [{p.name}: {res['status']}]")

        run(tasks, jobs=jobs, threads=threads, address=address, on_done=on_done, say=say)
    return SweepResult(out, statuses)


def _run_local(tasks, *, jobs, threads, address, on_done, say) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # torch and jax are not fork-safe
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=die_with_parent) as pool:
        pending = {pool.submit(run_point, text, run_dir, threads): p for p, text, run_dir in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                p = pending.pop(fut)
                try:
                    res = fut.result()
                except Exception as err:  # noqa: BLE001 - a worker process died (e.g. killed, out of memory)
                    res = {"status": "failed", "error": f"worker process died: {type(err).__name__}: {err}"}
                on_done(p, res, running=min(len(pending), jobs))


def _run_ray(tasks, *, jobs, threads, address, on_done, say) -> None:
    try:
        import ray
    except ImportError:
        raise SweepError("--executor ray needs Ray: pip install 'dptrain[ray]' (or use --executor local)") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
    say(f"  ray: {ray.cluster_resources().get('CPU', 0):g} CPUs in the cluster")
    remote = ray.remote(num_cpus=1, max_retries=0)(run_point)
    pending = {remote.remote(text, run_dir, threads): p for p, text, run_dir in tasks}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                p = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - the task's worker died
                    res = {"status": "failed", "error": f"ray task failed: {type(err).__name__}: {err}"}
                on_done(p, res, running=min(len(pending), jobs))
    finally:
        if started_here:
            ray.shutdown()


__all__ = ["DEFAULT_VALIDATION_FRACTION", "EXECUTORS", "SweepError", "SweepPoint", "SweepResult", "check_one_split",
           "eps_label", "parse_epsilons", "plan_points", "run_point", "run_sweep", "validation_fraction"]
