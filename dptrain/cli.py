"""`dptrain ...`: parses arguments, calls the library, prints. No logic of its own.

Every bad input -- a wrong or missing argument, a number out of range, a bad recipe -- is one line
``dptrain: error: ...`` on stderr and exit status 2, checked before any work (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import accounting as acc
from accounting.errors import (
    MAX_STEPS,
    check_delta,
    check_noise_range,
    check_positive_int,
    check_probability,
    check_steps,
    check_target_epsilon,
)
from accounting.statement import encode_float

MAX_SEEDS = 1000  # each seed is a full training run per epsilon and backend
MAX_JOBS = 256  # processes (or Ray CPUs) at a time
MAX_DATASET_SIZE = 10**12

EPILOG_PRIVACY = """\
examples:
  dptrain privacy epsilon --sampling-rate 0.004267 --noise-multiplier 1.12 --steps 14040 --delta 1e-5
  dptrain privacy calibrate --epsilon 8 --delta 1e-5 --dataset-size 60000 --batch-size 256 --epochs 60
"""


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.4f}"


def _statement_lines(scheme, sigma: float, steps: int, delta: float, accountant: str) -> list[str]:
    return [
        f"  sampling          {scheme.name} (q = {scheme.sampling_rate:.6g}), one DP event per step",
        f"  relation          {scheme.relation}, privacy unit: example",
        f"  noise multiplier  {sigma:.6g}",
        f"  steps             {steps}",
        f"  delta             {delta:g}",
        f"  accountant        {accountant} (dp-accounting {acc.software_versions()['dp-accounting']})",
    ]


def _cmd_epsilon(args) -> int:
    check_probability(args.sampling_rate, "sampling_rate")
    check_noise_range(args.noise_multiplier, "noise_multiplier")
    check_steps(args.steps, "steps")
    check_delta(args.delta)
    from accounting.calibrate import check_evaluable

    scheme = acc.PoissonSampling(args.sampling_rate)
    if args.accountant != "rdp":  # the PLD accountant's memory grows with epsilon: refuse absurd runs first
        check_evaluable(scheme, args.noise_multiplier, args.steps, args.delta)
    ledger = acc.PrivacyLedger(accountant="pld" if args.accountant == "all" else args.accountant)
    ledger.compose(scheme.step_event(args.noise_multiplier), args.steps)
    which = acc.ACCOUNTANTS if args.accountant == "all" else (args.accountant,)
    eps = {a: ledger.epsilon(args.delta, a) for a in which}
    main = eps[ledger.accountant]
    if args.json:
        print(json.dumps({
            "epsilon": encode_float(main), "epsilons": {a: encode_float(e) for a, e in eps.items()}, "delta": args.delta,
            "accountant": ledger.accountant, "sampling": scheme.name, "sampling_rate": scheme.sampling_rate,
            "noise_multiplier": args.noise_multiplier, "steps": args.steps,
            "neighbouring_relation": scheme.relation, "privacy_unit": "example",
            "versions": acc.software_versions(),
        }))
        return 0
    print("accountant   epsilon")
    for a, e in eps.items():
        print(f"{a:<12} {_fmt(e)}")
    print("\nprivacy statement")
    print("\n".join(_statement_lines(scheme, args.noise_multiplier, args.steps, args.delta, ledger.accountant)))
    print(f"  => ({_fmt(main)}, {args.delta:g})-DP")
    return 0


def _cmd_calibrate(args) -> int:
    check_target_epsilon(args.epsilon, "epsilon")
    check_delta(args.delta)
    by_rate = [f"--{f.replace('_', '-')}" for f in ("sampling_rate", "steps") if getattr(args, f) is not None]
    by_size = [f"--{f.replace('_', '-')}" for f in ("dataset_size", "batch_size", "epochs") if getattr(args, f) is not None]
    how = "give --sampling-rate Q --steps T, or --dataset-size N --batch-size B --epochs E"
    if by_rate and by_size:
        raise acc.PrivacyError(f"{' '.join(by_rate)} and {' '.join(by_size)} both describe the run; {how}, "
                               "not both")
    if by_rate:
        if args.steps is None:
            raise acc.InvalidParameterError("--steps", None, "an integer >= 1 with --sampling-rate")
        if args.sampling_rate is None:
            raise acc.InvalidParameterError("--sampling-rate", None, "a number in (0, 1] with --steps")
        check_probability(args.sampling_rate, "sampling_rate")
        scheme, steps = acc.PoissonSampling(args.sampling_rate), check_steps(args.steps, "steps")
    else:
        missing = [f for f in ("dataset_size", "batch_size", "epochs") if getattr(args, f) is None]
        if missing:
            raise acc.InvalidParameterError("--" + missing[0].replace("_", "-"), None, f"a value: {how}")
        check_positive_int(args.dataset_size, "dataset_size", 1, MAX_DATASET_SIZE)
        check_positive_int(args.batch_size, "batch_size", 1, args.dataset_size)
        if not (math.isfinite(args.epochs) and args.epochs > 0):
            raise acc.InvalidParameterError("epochs", args.epochs, "a finite number > 0")
        steps = math.ceil(args.epochs * args.dataset_size / args.batch_size)
        if steps > MAX_STEPS:
            raise acc.PrivacyError(
                f"--epochs {args.epochs:g} with --dataset-size {args.dataset_size} and --batch-size {args.batch_size} "
                f"makes {steps} steps; at most {MAX_STEPS} are evaluated (the PLD accountant's memory grows with the "
                "steps): lower --epochs or raise --batch-size")
        scheme, steps = acc.poisson_from_epochs(args.dataset_size, args.batch_size, args.epochs)
    sigma = acc.calibrate_noise_multiplier(args.epsilon, args.delta, scheme, steps, accountant=args.accountant)
    ledger = acc.PrivacyLedger(accountant=args.accountant)
    ledger.compose(scheme.step_event(sigma), steps)
    eps = ledger.epsilons(args.delta)
    if args.json:
        print(json.dumps({
            "noise_multiplier": sigma, "target_epsilon": args.epsilon, "epsilon": ledger.epsilon(args.delta),
            "epsilons": eps, "delta": args.delta, "accountant": args.accountant, "sampling": scheme.name,
            "sampling_rate": scheme.sampling_rate, "steps": steps, "neighbouring_relation": scheme.relation,
            "privacy_unit": "example", "versions": acc.software_versions(),
        }))
        return 0
    print(f"noise multiplier {sigma:.6g} meets epsilon <= {args.epsilon:g} at delta {args.delta:g} "
          f"({args.accountant}, verified)")
    print("\naccountant   epsilon at this noise multiplier")
    for a, e in eps.items():
        print(f"{a:<12} {_fmt(e)}")
    print("\nprivacy statement")
    print("\n".join(_statement_lines(scheme, sigma, steps, args.delta, args.accountant)))
    return 0




def _cmd_train(args) -> int:
    from dptrain.config import load_recipe
    from dptrain.run import train

    recipe = load_recipe(args.recipe, args.set)
    out = args.out or f"runs/{recipe.name}"
    result = train(recipe, out, resume=args.resume, progress=not args.quiet, keep_checkpoint=args.keep_checkpoint)
    if int(os.environ.get("RANK", "0")) > 0:  # data-parallel: rank 0 reports (and owns the run directory)
        return 0
    rec = result.run_record
    print(f"run directory: {result.out_dir}  (publishable: release/; keep in-house: private/)")
    for w in (rec.privacy.warning, rec.data.get("warning")):
        if w:
            print(f"WARNING: {w}")
    print(f"privacy: {rec.privacy.summary()}")
    print("test (private): " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in rec["metrics"]["test"].items()))
    _print_kept(rec, result.out_dir)
    return _print_audit(rec["audit"], result.out_dir)


def _print_kept(rec, out) -> None:
    if rec.checkpoint_kept:
        from dptrain.lifecycle import CHECKPOINT

        print(f"WARNING: {out}/private/{CHECKPOINT} was kept and holds the SECRET DP SEED: never copy it out; "
              "delete it when you no longer need to resume", file=sys.stderr)


def _cmd_synth(args) -> int:
    from dptrain.config import load_recipe
    from dptrain.synth.pipeline import synthesize

    recipe = load_recipe(args.recipe, args.set)
    out = args.out or f"runs/{recipe.name}"
    rec = synthesize(recipe, out, resume=args.resume, progress=not args.quiet,
                     keep_checkpoint=args.keep_checkpoint).run_record
    p, ev = rec.privacy, rec["evaluation"]
    fmt = lambda v: "n/a" if v is None else (v if isinstance(v, str) else f"{v:.4g}")  # noqa: E731
    adapters = ", adapters/" if recipe.synthesis.method == "dp_finetune" else ""
    print(f"run directory: {out}  (publishable: release/ synthetic.jsonl, DATACARD.md{adapters}; keep in-house: "
          "private/ evaluation.md, record.json)")
    if p.warning:
        print(f"WARNING: {p.warning}")
    print(f"privacy: {p.summary()}" + (" + DP label histogram" if rec["label_counts"]["mode"] == "dp_histogram"
                                       else ""))
    print(f"generated {sum(rec['label_counts']['generated'].values())} records: {rec['label_counts']['generated']}")
    ds = ev["downstream"]
    print("evaluation (private) downstream accuracy / AUROC on real held-out: "
          + ", ".join(f"{k} {fmt(v['accuracy'])} / {fmt(v['auroc'])}" for k, v in ds.items() if isinstance(v, dict)))
    if "canaries" in ev:
        print("canary exposure (bits): " + ", ".join(f"{r}x {v['mean_exposure_bits']:.2f}"
                                                     for r, v in ev["canaries"]["by_repetitions"].items()))
    _print_kept(rec, out)
    return 0


def _print_audit(a: dict, out) -> int:
    """Print an audit summary (canaries only: the loss attack stays in private/audit.json); returns 3 on a
    violation (loud), else 0."""
    fmt = lambda v: "n/a" if v is None else (v if isinstance(v, str) else f"{v:.4f}")  # noqa: E731
    print(f"audit ({out}/private/audit.json): claimed epsilon {fmt(a['claimed_epsilon'])}, empirical lower bound "
          f"{fmt(a['epsilon_lower_bound'])} at {a['confidence']:.0%} confidence (max certifiable "
          f"{fmt(a['max_certifiable_epsilon'])}), canary AUC {fmt(a['canary_auc'])}")
    if a["status"] == "VIOLATION":
        bar = "!" * 100
        print(f"{bar}\n{a['message']}\n{bar}", file=sys.stderr)
        return 3
    return 0


def _cmd_audit(args) -> int:
    from dptrain.run import audit_run

    return _print_audit(audit_run(args.run_dir), args.run_dir)


def _cmd_predict(args) -> int:
    from dptrain.release import predict

    path = predict(args.run_dir, args.data, args.out)
    print(f"scores: {path}")
    return 0


def _cmd_export(args) -> int:
    from dptrain.release import export_onnx

    out = args.out or str(__import__("pathlib").Path(args.run_dir) / "release" / "model.onnx")
    print(f"exported: {export_onnx(args.run_dir, out)}")
    return 0


def _check_sweep_options(args) -> list[float]:
    """Every option of ``dptrain sweep`` that can be checked without the recipe, before any work: the grid would
    otherwise train for hours before the report refuses its options."""
    from dptrain.report import parse_epsilons
    from dptrain.report.analysis import check_report_options
    from dptrain.report.sweep import SweepError

    check_report_options(args.threshold, args.bootstrap, args.min_group_size)
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise SweepError(f"--seeds: got {args.seeds}; give 1 to {MAX_SEEDS} seeds per epsilon (each is a full run)")
    if not 1 <= args.jobs <= MAX_JOBS:
        raise SweepError(f"--jobs: got {args.jobs}; give the number of runs at a time, an integer from 1 to {MAX_JOBS}")
    for tok in args.epsilons.split(","):  # "1e400" parses to inf: a typo must not become a non-private run
        t = tok.strip().lower().lstrip("+")
        try:
            val = float(t)
        except ValueError:
            continue  # parse_epsilons names it
        if math.isinf(val) and t not in ("inf", "infinity"):
            raise SweepError(f"--epsilons: {tok.strip()!r} overflows to infinity; write inf for the non-private "
                             "reference, or a finite epsilon")
    epsilons = parse_epsilons(args.epsilons)
    too_large = [e for e in epsilons if acc.errors.MAX_TARGET_EPSILON < e < math.inf]
    if too_large:
        raise SweepError(f"--epsilons: {too_large[0]:g} is above {acc.errors.MAX_TARGET_EPSILON:g} (a larger epsilon "
                         "bounds nothing useful); write inf for the non-private reference")
    return epsilons


def _cmd_sweep(args) -> int:
    from dptrain.config import load_recipe
    from dptrain.report import build_report, run_sweep

    epsilons = _check_sweep_options(args)
    recipe = load_recipe(args.recipe, args.set)
    out = args.out or f"sweeps/{recipe.name}"
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    result = run_sweep(recipe, out, epsilons=epsilons, seeds=args.seeds, backends=backends,
                       executor=args.executor, jobs=args.jobs, address=args.address, threshold=args.threshold)
    paths = build_report(out, n_boot=args.bootstrap, min_group_size=args.min_group_size)
    _print_report_paths(paths)
    if result.failed:
        print(f"{len(result.failed)} run(s) failed (see {out}/failures/); rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


def _print_report_paths(paths) -> None:
    print(f"report (private: computed on real test records): {paths['html']}")
    print(f"        {paths['md']}")
    print(f"        {paths['csv']}")
    if "selection" in paths:
        print(f"selection statement (publishable): {paths['selection']}")


def _cmd_report(args) -> int:
    from dptrain.report import build_report
    from dptrain.report.analysis import check_report_options

    check_report_options(args.threshold, args.bootstrap, args.min_group_size)
    paths = build_report(args.dir, threshold=args.threshold, n_boot=args.bootstrap,
                         min_group_size=args.min_group_size)
    _print_report_paths(paths)
    return 0


def _cmd_datasets(args) -> int:
    from dptrain.data.registry import list_builtins

    rows = list_builtins()
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        print(f"builtin:{r['name']:<16} {r['rows']:>6} rows  label={r['label']:<12} "
              f"sensitive={','.join(r['sensitive'])}  {r['description']}")
    return 0


class UsageError(Exception):
    """A wrong, missing or unknown command-line argument (argparse's message, on one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``dptrain: error: ...`` (exit 2) instead of usage + message."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)")


def _number(text: str, integer: bool = False) -> float | int:
    """A number as a user writes it: 8, 0.5, 1e-5, 1E5, inf, nan (the range is checked by the command); an integer
    option also takes an integral float such as 1e6."""
    t = text.strip()
    try:
        return int(t, 10)
    except ValueError:
        pass
    try:
        val = float(t)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind} (e.g. {'1000 or 1e3' if integer else '0.5, 1e-5 or inf'})") \
            from None
    if integer:
        if not (math.isfinite(val) and val.is_integer()):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
        return int(val)
    return val


def _int(text: str) -> int:
    return _number(text, integer=True)


def _float(text: str) -> float:
    return float(_number(text))


def build_parser() -> argparse.ArgumentParser:
    from dptrain import __version__

    p = _Parser(prog="dptrain", description="Differentially private training and honest privacy reports.")
    p.add_argument("--version", action="version", version=f"dptrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    priv = sub.add_parser("privacy", help="privacy accounting: epsilon of a run, noise calibration",
                          description="Privacy accounting with the shared accountant (PLD by default, RDP too).",
                          epilog=EPILOG_PRIVACY, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = priv.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")

    e = psub.add_parser("epsilon", help="epsilon of Poisson-sampled DP-SGD",
                        description="Epsilon of T steps of the Poisson-subsampled Gaussian mechanism.")
    e.add_argument("--sampling-rate", type=_float, required=True, metavar="Q", help="q = expected batch / units, in (0, 1]")
    e.add_argument("--noise-multiplier", type=_float, required=True, metavar="S", help="noise std / clipping norm (0, or 0.3 to 1e4)")
    e.add_argument("--steps", type=_int, required=True, metavar="T", help="number of training steps (1 to 1e7)")
    e.add_argument("--delta", type=_float, required=True, metavar="D", help="target delta, in (0, 1)")
    e.add_argument("--accountant", choices=["pld", "rdp", "all"], default="all",
                   help="pld (tight, default main number), rdp, or all side by side (default)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_cmd_epsilon)

    c = psub.add_parser("calibrate", help="noise multiplier for a target (epsilon, delta)",
                        description="Smallest noise multiplier meeting a target epsilon (verified with the accountant).")
    c.add_argument("--epsilon", type=_float, required=True, metavar="E", help="target epsilon (> 0, at most 100)")
    c.add_argument("--delta", type=_float, required=True, metavar="D", help="target delta, in (0, 1)")
    c.add_argument("--sampling-rate", type=_float, metavar="Q", help="q (with --steps)")
    c.add_argument("--steps", type=_int, metavar="T", help="number of steps, 1 to 1e7 (with --sampling-rate)")
    c.add_argument("--dataset-size", type=_int, metavar="N", help="number of privacy units (with --batch-size, --epochs)")
    c.add_argument("--batch-size", type=_int, metavar="B", help="expected batch size")
    c.add_argument("--epochs", type=_float, metavar="E", help="epochs (steps = ceil(E * N / B))")
    c.add_argument("--accountant", choices=["pld", "rdp"], default="pld", help="accountant to calibrate with")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_cmd_calibrate)

    t = sub.add_parser("train", help="train one run from a recipe",
                       description="Train a model with DP from a YAML recipe and write a run directory: "
                                   "release/ (model.safetensors + model.json, privacy.json, ledger.json, config.yaml: "
                                   "publishable) and private/ (record.json with test metrics, predictions.parquet, "
                                   "audit.json, canaries: keep in-house).")
    _run_options(t, "recipes/actg175-mlp.yaml", "privacy.epsilon=2")
    t.set_defaults(func=_cmd_train)

    sy = sub.add_parser("synth", help="release DP synthetic text (DP fine-tuning or Private Evolution)",
                        description="Label-conditioned DP synthetic records from a causal LM, by DP fine-tuning of LoRA "
                                    "adapters (synthesis.method: dp_finetune) or Private Evolution (private_evolution: DP "
                                    "votes of the records on public-model candidates), evaluated against real records; writes "
                                    "release/ (synthetic.jsonl, DATACARD.md, adapters/ when fine-tuned, privacy.json) and "
                                    "private/ (evaluation.md, record.json).",
                        epilog="example:\n  dptrain synth recipes/iu-xray-reports-synth.yaml --set privacy.epsilon=4",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_options(sy, "recipes/iu-xray-reports-synth.yaml", "synthesis.records=500")
    sy.set_defaults(func=_cmd_synth)

    au = sub.add_parser("audit", help="empirical privacy audit of a finished run (canaries + membership inference)",
                        description="Recompute the run's audit from its released model and private canaries; "
                                    "write private/audit.json. "
                                    "Exit status 3 if the empirical lower bound exceeds the claimed epsilon.")
    au.add_argument("run_dir", help="a run directory (the --out of dptrain train)")
    au.set_defaults(func=_cmd_audit)

    pr = sub.add_parser("predict", help="apply a run's released model to new records",
                        description="Score new records with RUN_DIR/release/ (model.safetensors + model.json), "
                                    "applying the same declared preprocessing; writes a CSV with one row per record.",
                        epilog="example:\n  dptrain predict runs/actg-eps8 --data new_patients.csv --out scores.csv",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("run_dir", help="a finished run directory (the --out of dptrain train)")
    pr.add_argument("--data", required=True, help="a CSV/Parquet table (or, for image models, a manifest CSV)")
    pr.add_argument("--out", required=True, help="where to write the scores CSV")
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="export a run's released model (ONNX)",
                        description="Export RUN_DIR/release/ to ONNX (default RUN_DIR/release/model.onnx).")
    ex.add_argument("run_dir", help="a finished run directory (the --out of dptrain train)")
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    ex.add_argument("--out", help="output file (default RUN_DIR/release/model.onnx)")
    ex.set_defaults(func=_cmd_export)

    sw = sub.add_parser(
        "sweep", help="train a recipe over epsilon x seed and write a privacy-utility-fairness report",
        description="Run the grid (each point a normal run directory; finished points are skipped, so rerunning "
                    "the same command resumes), then write the report (computed on real test records: DIR/private/report.html, "
                    "report.md, summary.csv) and the public selection statement DIR/release/selection.json.",
        epilog="example:\n  dptrain sweep recipes/actg175-mlp.yaml --epsilons 0.5,1,2,4,8,inf --seeds 3 --jobs 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("recipe", help="path to a recipe")
    sw.add_argument("--epsilons", required=True, metavar="LIST", help="comma-separated, e.g. 0.5,1,2,4,8,inf")
    sw.add_argument("--seeds", type=_int, default=3, metavar="N", help="seeds per epsilon, 1 to 1000 (default 3)")
    sw.add_argument("--backends", metavar="LIST", help="e.g. opacus,jax (default: the recipe's backend)")
    sw.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local processes (default) or Ray tasks")
    sw.add_argument("--jobs", type=_int, default=1, metavar="N", help="runs at a time, 1 to 256 (default 1)")
    sw.add_argument("--address", help="Ray cluster address (with --executor ray; default: start a local Ray)")
    sw.add_argument("--out", help="sweep directory (default sweeps/<recipe name>)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    _report_options(sw, threshold_default=0.5)
    sw.set_defaults(func=_cmd_sweep)

    rp = sub.add_parser("report", help="re-render a sweep's report from its run records (no retraining)",
                        description="Rebuild DIR/private/report.html, report.md, summary.csv and DIR/release/selection.json "
                                    "from DIR/runs/*.")
    rp.add_argument("dir", help="a sweep directory")
    _report_options(rp, threshold_default=None)
    rp.set_defaults(func=_cmd_report)

    d = sub.add_parser("datasets", help="list built-in datasets",
                       description="List the built-in datasets (tables, images, texts) with their size, label and "
                                   "sensitive attributes; they load from installed packages, never from the internet.")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=_cmd_datasets)
    return p


def _run_options(p: argparse.ArgumentParser, example_recipe: str, example_set: str) -> None:
    p.add_argument("recipe", help=f"path to a recipe, e.g. {example_recipe}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe field, e.g. --set {example_set} (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep private/checkpoint.dptckpt after the run (it holds the SECRET DP seed; default: removed)")


def _report_options(p: argparse.ArgumentParser, threshold_default: float | None) -> None:
    p.add_argument("--threshold", type=_float, default=threshold_default, metavar="T",
                   help="fixed decision threshold for TPR/FPR/selection rate, chosen without test data "
                        + ("(default 0.5)" if threshold_default else "(default: the sweep's)"))
    p.add_argument("--bootstrap", type=_int, default=1000, metavar="B", help="bootstrap replicates, 100 to 20000 (default 1000)")
    p.add_argument("--min-group-size", type=_int, default=30, metavar="N",
                   help="groups with fewer test examples are flagged and left out of the gaps (default 30)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(f"dptrain: error: {err}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (acc.PrivacyError, *_user_errors()) as err:
        print(f"dptrain: error: {err}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's input, reported as one clear message (never a traceback)."""
    from dptrain.config import RecipeError

    errors: list[type[Exception]] = [RecipeError]
    try:
        from dptrain.data import DataError
        from dptrain.run import CheckpointError, RunError
        from dptrain.trainers.base import TrainerError

        errors += [DataError, RunError, CheckpointError, TrainerError]
        from dptrain.release import ReleaseError

        errors += [ReleaseError]
        from dptrain.records import RecordError

        errors += [RecordError]
        from dptrain.report import ReportError, SweepError

        errors += [ReportError, SweepError]
    except ImportError:  # a backend extra is not installed: accounting commands still work
        pass
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
