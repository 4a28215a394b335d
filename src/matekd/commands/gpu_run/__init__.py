"""`matekd gpu-run`: a whole profile on a bare GPU machine in one command, outputs packed small.

    scripts/gpu-run.sh [PROFILE] [OUTPUT_DIR] [options]      (PROFILE default profiles/budget.yaml)

What it does, in order (every stage is the pipeline's own `matekd <stage>` command, run in a
subprocess in a scratch project folder; no DVC, no MLflow: tracking is offline):

1. Pre-flight: the params validate, the CIFAR-10 archive ($MATEKD_CIFAR10) and the frost
   textures ($MATEKD_FROST, when CIFAR-10-C is regenerated with frost) exist, the output
   folder is empty, no GPU is in compute mode Prohibited. Fails at once, naming what is
   missing. Prints each GPU's compute mode and free memory.
2. Smoke pass: every stage on a few images and one epoch (the same profile with
   `smoke_overrides`), in `<work>/smoke`, one stage after another beside the run (with an
   exclusive-mode GPU, which admits one process, it runs first). A failure stops everything,
   with the failing stage and the end of its log. The full data is decoded (prepare) and
   CIFAR-10-C regenerated in the background by CPU worker processes (corrupt.workers).
3. The run, in `<work>/main`: the teachers (all at once, sharing the GPU, or one per GPU),
   their caches (all at once), method-inputs for every method, `matekd ablation` (every student
   group, spread over the visible GPUs), evaluate (after the background corrupt), report, and
   `matekd bench`. Each stage's wall time is printed as it ends and kept in timings.json, with
   the measured seconds per epoch of every model and the paper profile's time extrapolated
   from them.
4. Packing (matekd.commands.pack): reports, metrics, per-epoch histories, logs, timings,
   student weights, the offline tracking record and the teacher weights that fit, in at most
   8 files of 16 MiB (64 MiB in all) in OUTPUT_DIR, with MANIFEST.txt (every file, its pack, and
   what was left out and why). The results table is printed last.

`--time-limit S` stops a stage still running S seconds after the start (minus the time packing
needs), packs what exists and exits with an error: a run cut short still hands back its logs.

The modules, one concern each; at import time they need only the standard library, yaml,
matekd.errors and commands.pack (cli.py imports this package to build its parser: no torch,
no pydantic), and nothing here needs mlflow, dvc or optuna:

    plan      what runs, where, in what order: the params, PIPELINE, the smoke pass beside the run
    runner    `matekd <stage>` subprocesses: fail fast, time limit, every stage's wall time
    measure   the machine, phase times, seconds per epoch, the clock predicted from H100 rates
    outputs   the results table, the packs and MANIFEST.txt
    command   run_gpu: pre-flight, then all of the above in order
    (here)    the command-line options
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ...errors import MatekdError
from ..pack import FILE_LIMIT, MAX_FILES, MIB, TOTAL_LIMIT
from .command import PACK_RESERVE_S, RunOutcome, run_gpu
from .measure import paper_extrapolation
from .plan import (
    DEFAULT_OUTPUT,
    DEFAULT_PAPER_PROFILE,
    DEFAULT_PROFILE,
    DEFAULT_WORK,
    BenchOptions,
    smoke_overrides,
    write_params,
)

__all__ = ["BenchOptions", "RunOutcome", "add_arguments", "cmd_gpu_run", "main", "paper_extrapolation", "run_gpu",
           "smoke_overrides", "write_params"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `matekd gpu-run` (cli.py and `python -m matekd.commands.gpu_run`)."""
    bench = BenchOptions()
    parser.add_argument("profile", nargs="?", default=DEFAULT_PROFILE,
                        help=f"params profile to run (default {DEFAULT_PROFILE})")
    parser.add_argument("output", nargs="?", default=DEFAULT_OUTPUT,
                        help="folder for the packs, MANIFEST.txt, timings.json and results.txt "
                             f"(default {DEFAULT_OUTPUT})")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param of the profile (dotted key, YAML value); repeatable")
    parser.add_argument("--work-dir", default=DEFAULT_WORK,
                        help=f"scratch folder, deleted at the next run (default {DEFAULT_WORK})")
    parser.add_argument("--no-smoke", action="store_true", help="skip the smoke pass")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help=f"stop stages this long after the start (less {PACK_RESERVE_S:g} s for packing) "
                             "and pack what exists")
    parser.add_argument("--bench-batch-size", type=int, default=bench.batch_size)
    parser.add_argument("--bench-repeats", type=int, default=bench.repeats)
    parser.add_argument("--bench-warmup", type=int, default=bench.warmup)
    parser.add_argument("--bench-together", type=int, default=bench.together,
                        help="students together in the bench (default: max(ablation.group_size, 4))")
    parser.add_argument("--paper-profile", default=DEFAULT_PAPER_PROFILE,
                        help="profile whose time is extrapolated from the measured epochs ('' to skip)")
    parser.add_argument("--max-files", type=int, default=MAX_FILES)
    parser.add_argument("--file-mib", type=float, default=FILE_LIMIT / MIB)
    parser.add_argument("--total-mib", type=float, default=TOTAL_LIMIT / MIB)


def cmd_gpu_run(args: argparse.Namespace, overrides: dict[str, Any]) -> RunOutcome:
    bench = BenchOptions(args.bench_batch_size, args.bench_repeats, args.bench_warmup, args.bench_together)
    return run_gpu(args.profile, args.output, overrides=overrides, work_dir=args.work_dir, smoke=not args.no_smoke,
                   time_limit=args.time_limit, bench=bench,
                   paper_profile=args.paper_profile or None, max_files=args.max_files,
                   file_limit=int(args.file_mib * MIB), total_limit=int(args.total_mib * MIB))


def main(argv: list[str] | None = None) -> int:
    """`python -m matekd.commands.gpu_run` (scripts/gpu-run.sh): `matekd gpu-run` without the
    rest of the matekd CLI."""
    from ...cli import _overrides

    parser = argparse.ArgumentParser(prog="matekd gpu-run", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cmd_gpu_run(args, _overrides(args.set))
    except MatekdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
