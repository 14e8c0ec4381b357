"""Sweeps: one recipe trained over a grid of epsilon x seed (x backend), each point a normal run directory.

Layout of a sweep directory ``DIR``::

    DIR/sweep.json              the grid and the recipe it came from (written first, atomically)
    DIR/runs/<backend>-eps<e>-seed<s>/   one ordinary run directory per point (see dptrain.run)
    DIR/failures/<point>.txt    the error of a point that failed (removed when it later succeeds)
    DIR/report.html, report.md, summary.csv, plots/   written by dptrain.report.build_report

Guarantees and sharp edges:

* Rerunning the same command resumes: finished points (``record.json`` present) are skipped, interrupted
  ones continue from their checkpoint with the same ledger, failed ones are retried. A rerun with a
  different grid or recipe in the same ``DIR`` is refused (the report would mix experiments).
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

from accounting._io import atomic_write_bytes, atomic_write_json
from dptrain.config import Recipe, RecipeError, dump_recipe, parse_recipe

SWEEP_FORMAT = "dptrain.sweep/1"
EXECUTORS = ("local", "ray")


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


def plan_points(recipe: Recipe, epsilons: Sequence[float], seeds: int,
                backends: Sequence[str] | None = None) -> list[tuple[SweepPoint, Recipe]]:
    """The grid, in run order (privately cheapest points last is not guaranteed; order is eps, seed, backend)."""
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
    out = []
    for eps in epsilons:
        for i in range(seeds):
            for b in backends:
                tree = copy.deepcopy(base)
                tree["privacy"]["epsilon"] = eps
                tree["trainer"]["backend"] = b
                tree["seed"] = recipe.seed + i
                try:
                    r = parse_recipe(tree)
                except RecipeError as err:
                    raise SweepError(f"sweep point {b} eps={eps_label(eps)}: {err}") from None
                out.append((SweepPoint(b, eps, recipe.seed + i), r))
    return out


def _spec(recipe: Recipe, points: list[tuple[SweepPoint, Recipe]], threshold: float) -> dict[str, Any]:
    return {
        "format": SWEEP_FORMAT,
        "recipe": dump_recipe(recipe),
        "epsilons": sorted({eps_label(p.epsilon) for p, _ in points}, key=lambda s: float(s)),
        "seeds": sorted({p.seed for p, _ in points}),
        "backends": list(dict.fromkeys(p.backend for p, _ in points)),
        "points": [p.name for p, _ in points],
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


def run_point(recipe_yaml: str, run_dir: str, threads: int) -> dict[str, Any]:
    """Train one point; never raises (a failure is returned as status 'failed' with the error)."""
    import yaml

    _limit_threads(threads)
    from dptrain.run import train

    out = Path(run_dir)
    try:
        recipe = parse_recipe(yaml.safe_load(recipe_yaml))
        resume = out.exists() and ((out / "config.yaml").exists() or (out / "checkpoint.pt").exists())
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
        if {k: old.get(k) for k in ("recipe", "points")} != {k: spec[k] for k in ("recipe", "points")}:
            raise SweepError(f"--out {out}: holds a different sweep (other recipe or grid); rerun the same command "
                             "to resume it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec_path, spec)

    statuses: dict[str, str] = {}
    todo: list[tuple[SweepPoint, Recipe]] = []
    for p, r in points:
        if (out / "runs" / p.name / "record.json").exists():
            statuses[p.name] = "skipped"
        else:
            todo.append((p, r))
    skipped = len(points) - len(todo)
    say(f"sweep {out}: {len(points)} runs ({skipped} already finished, {len(todo)} to run) "
        f"with executor={executor}, jobs={jobs}")
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
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
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


__all__ = ["EXECUTORS", "SweepError", "SweepPoint", "SweepResult", "eps_label", "parse_epsilons",
           "plan_points", "run_point", "run_sweep"]
