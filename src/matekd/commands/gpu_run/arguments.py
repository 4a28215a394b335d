"""The options of `matekd gpu-run` (cli.py adds them to its parser) and `python -m
matekd.commands.gpu_run` (scripts/gpu-run.sh), and the command that runs with them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ...errors import MatekdError
from ..pack import FILE_LIMIT, MAX_FILES, MIB, TOTAL_LIMIT
from .command import PACK_RESERVE_S, RunOutcome, run_gpu
from .layout import DEFAULT_OUTPUT, DEFAULT_PAPER_PROFILE, DEFAULT_PROFILE, DEFAULT_WORK
from .plan import BenchOptions


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
    from ...cli import _overrides
    from . import __doc__ as overview

    parser = argparse.ArgumentParser(prog="matekd gpu-run", description=overview.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cmd_gpu_run(args, _overrides(args.set))
    except MatekdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
