"""The `matekd` command: one subcommand per pipeline stage (dvc.yaml calls these)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import yaml

from .errors import MatekdError


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MatekdError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise MatekdError(f"--set {key.strip()}: {value!r} is not a valid YAML value "
                              f"({str(exc).splitlines()[0]})") from exc
    return out


def _params(args: argparse.Namespace):
    """Validated params; stages call it before importing torch, so bad params fail at once."""
    from .params import load_params

    return load_params(args.params, _overrides(args.set))


def cmd_fetch(args):
    from .data.fetch import fetch

    result = fetch(args.source, download=args.download)
    print(f"data/: {result.action} {result.path} ({result.kind}); dvc: {result.dvc}")


def cmd_prepare(args):
    params = _params(args)
    from .stages.prepare import run_prepare

    run_prepare(params)


def cmd_train_teacher(args):
    params = _params(args)
    from .stages.train_teacher import run_train_teacher

    run_train_teacher(params, args.name, progress=not args.no_progress)


def cmd_cache(args):
    params = _params(args)
    from .stages.cache import run_cache

    run_cache(params, args.name)


def cmd_method_inputs(args):
    params = _params(args)
    from .stages.method_inputs import run_method_inputs

    run_method_inputs(params, args.method)


def cmd_distill(args):
    params = _params(args)
    from .stages.distill import run_distill

    run_distill(params, method=args.method, seed=args.seed, output_name=args.output_name, ablation=args.ablation,
                progress=not args.no_progress)


def cmd_ablation(args):
    params = _params(args)
    from .stages.distill import run_ablation

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    run_ablation(params, devices=devices, progress=not args.no_progress)


def cmd_corrupt(args):
    params = _params(args)
    from .stages.corrupt import run_corrupt

    run_corrupt(params, progress=not args.no_progress)


def cmd_evaluate(args):
    params = _params(args)
    from .stages.evaluate import run_evaluate

    run_evaluate(params, progress=not args.no_progress)


def cmd_report(args):
    params = _params(args)
    from .stages.report import run_report

    run_report(params)


def cmd_tune(args):
    params = _params(args)
    from .stages.tune import run_tune

    run_tune(params, methods=args.method or None, storage=args.storage, workers=args.workers,
             n_trials=args.n_trials, progress=not args.no_progress)


def cmd_bench(args):
    params = _params(args)
    from .commands.bench import run_bench

    run_bench(params, batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, together=args.together)


def cmd_sync_runs(args):
    from .tracking import offline_root, sync_runs

    folder = args.folder
    if folder is None:
        folder = offline_root(_params(args).tracking.offline_dir)
    print(sync_runs(folder, tracking_uri=args.tracking_uri))


def cmd_gpu_run(args):
    from .commands.gpu_run import cmd_gpu_run as run

    run(args, _overrides(args.set))


def cmd_methods(args):
    from . import methods

    for m in methods.METHODS.values():
        print(f"{m.name:<16} teachers={m.teachers:<4} weighting={m.weighting:<11} "
              f"terms={'+'.join(m.terms):<10} {m.summary}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matekd", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this call only (dotted key, YAML value)")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    def add(name: str, fn: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=fn)
        return p

    p = add("fetch", cmd_fetch, "put the raw CIFAR-10 source into data/ and record it in data.dvc")
    p.add_argument("source", nargs="?", help="archive or folder (default: $MATEKD_CIFAR10)")
    p.add_argument("--download", action="store_true", help="download canonical CIFAR-10 (needs internet)")
    add("prepare", cmd_prepare, "decode the raw data into train/validation/test arrays")
    p = add("train-teacher", cmd_train_teacher, "train one teacher")
    p.add_argument("name", help="teacher architecture (a key of `teachers` in params.yaml)")
    p = add("cache", cmd_cache, "cache a teacher's Grad-CAM maps of the training and validation images")
    p.add_argument("name", help="teacher architecture")
    p = add("method-inputs", cmd_method_inputs, "record what a method's students train with (methods/<method>.json)")
    p.add_argument("method", help="a method of ablation.methods")
    p = add("distill", cmd_distill, "train the student with the configured (or given) method")
    p.add_argument("--method", help="override distill.method (a method of the table, see `matekd methods`)")
    p.add_argument("--seed", type=int, help="override distill.seed")
    p.add_argument("--output-name", help="name of the outputs (default: distill; ablation: <method>-seed<k>)")
    p.add_argument("--ablation", action="store_true",
                   help="one student of the ablation matrix (its method's tuned values with ablation.tuned; "
                        "trained with its group when ablation.group_size > 1)")
    p = add("ablation", cmd_ablation, "train every student of the ablation matrix, in groups, over the GPUs")
    p.add_argument("--devices", help="comma-separated devices (default: every visible GPU, else the CPU)")
    add("corrupt", cmd_corrupt, "read or regenerate CIFAR-10-C for the prepared test set")
    add("evaluate", cmd_evaluate, "accuracy, CIFAR-10-C robustness and Grad-CAM analysis of every model")
    add("report", cmd_report, "write reports/results.md, results.csv and figures")
    p = add("tune", cmd_tune, "Optuna studies over each method's hyperparameters (one study per method)")
    p.add_argument("--method", action="append", help="tune this method (repeatable; default: tune.methods)")
    p.add_argument("--storage", help="Optuna storage URL or journal file (default: tune.storage)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--n-trials", type=int, help="trials for this invocation (default: tune.n_trials)")
    p = add("bench", cmd_bench, "time CE, online-teacher MATE-KD and cached MATE-KD student steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--together", type=int, default=None,
                   help="students trained together in the last row (default: max(ablation.group_size, 4))")
    p = add("sync-runs", cmd_sync_runs, "import runs tracked offline (tracking.mode: offline) into the MLflow store")
    p.add_argument("folder", nargs="?", help="the offline runs folder (default: tracking.offline_dir, mlruns-offline)")
    p.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else <repo>/mlruns)")
    add("methods", cmd_methods, "list the distillation methods (the method table)")
    # Its own options (a profile path, -S overrides of it): not the stages' shared ones.
    from .commands.gpu_run import add_arguments as gpu_run_arguments

    help_text = "run a profile end to end on a (bare) GPU machine; smoke pass first, outputs packed small"
    p = sub.add_parser("gpu-run", help=help_text, description=help_text)
    gpu_run_arguments(p)
    p.set_defaults(func=cmd_gpu_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MatekdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM turned into an exception while a run was open
        signum = getattr(exc, "signum", 2)
        print(f"interrupted (signal {signum})", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
