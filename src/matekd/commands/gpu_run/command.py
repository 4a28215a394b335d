"""run_gpu: a profile end to end (see the package docstring): pre-flight, the folders, the
stages (plan.run_plan), the measurements, the results table and the packs."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import MatekdError
from ..pack import FILE_LIMIT, MAX_FILES, MIB, TOTAL_LIMIT, PackError, check_output_layout
from .clock import clock_record, plan_lines, predicted_phases
from .layout import (
    DEFAULT_OUTPUT,
    DEFAULT_PAPER_PROFILE,
    DEFAULT_PROFILE,
    DEFAULT_WORK,
    RECORD,
    RESULTS,
    TIMINGS,
    find_path,
)
from .machine import environment_record, gpu_states
from .outputs import manifest_header, write_outputs
from .plan import BenchOptions, Project, SmokeFailed, run_plan, stage_env
from .preflight import check_gpus, clear_output, clear_work, preflight
from .profile import paper_params, resolved_params, smoke_overrides, write_params
from .results import results_table
from .runner import StageFailed, StageRunner, TimeLimitReached
from .timings import measurements, phase_times, summary_lines

PACK_RESERVE_S = 30.0                 # time kept for packing when --time-limit is set


@dataclass
class RunOutcome:
    status: str                     # ok | smoke failed | failed | time limit
    error: str | None
    files: list[Path]
    timings: dict[str, Any]
    table: str


def run_gpu(profile: str | os.PathLike = DEFAULT_PROFILE, output: str | os.PathLike = DEFAULT_OUTPUT, *,
            overrides: dict[str, Any] | None = None, work_dir: str | os.PathLike = DEFAULT_WORK, smoke: bool = True,
            time_limit: float | None = None, bench: BenchOptions | None = None,
            paper_profile: str | os.PathLike | None = DEFAULT_PAPER_PROFILE, max_files: int = MAX_FILES,
            file_limit: int = FILE_LIMIT, total_limit: int = TOTAL_LIMIT,
            environ: dict[str, str] | None = None) -> RunOutcome:
    """Run `profile` (+ `overrides`) end to end; see the package docstring. Raises MatekdError
    (after packing what exists, when anything does) unless every stage succeeded."""
    from ...storage import write_json, write_text

    clock0 = time.monotonic()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    overrides = dict(overrides or {})
    base_env = dict(os.environ if environ is None else environ)
    profile, output, work = find_path(profile), Path(output), Path(work_dir)
    raw, params = resolved_params(profile, overrides)
    preflight(params, base_env, output, work)
    gpus = None if params.device == "cpu" else gpu_states()
    gpu_lines, one_at_a_time = check_gpus(params.device, gpus, base_env.get("CUDA_VISIBLE_DEVICES"))
    paper = paper_params(paper_profile)
    clear_output(output)
    clear_work(work)
    main = _project(work / "main", raw, {}, base_env, one_at_a_time)
    smoke_project = _project(work / "smoke", raw, smoke_overrides(raw), base_env, one_at_a_time)
    record = work / RECORD
    record.mkdir()
    shutil.copyfile(main.folder / "params.yaml", record / "params.yaml")
    shutil.copyfile(smoke_project.folder / "params.yaml", record / "smoke-params.yaml")
    params = main.params
    environment = environment_record(params, gpus)
    write_json(record / "environment.json", environment)
    deadline = clock0 + time_limit - PACK_RESERVE_S if time_limit else None
    runner = StageRunner(record, main.env, deadline=deadline, clock0=clock0)
    timings: dict[str, Any] = {"profile": params.profile, "profile_file": str(profile), "overrides": overrides,
                               "started": started, "time_limit_s": time_limit, "environment": environment}

    def save_timings() -> None:
        phases = phase_times(runner.timings)
        timings.update(stages=runner.timings, phases=phases, elapsed_s=round(runner.elapsed(), 2))
        if "clock" in timings:
            timings["clock"] = clock_record(predicted, clock_notes, phases)
        write_json(record / TIMINGS, timings)
        write_json(output / TIMINGS, timings)       # kept current: a run cut off from outside still tells

    runner.on_record = save_timings
    runner.say(f"matekd gpu-run: profile {profile} ({params.profile}), device {params.device}, "
               f"GPU {environment['gpu']}; work {work}, output {output}")
    for line in gpu_lines:
        runner.say(line)
    predicted, clock_notes = predicted_phases(params)
    for line in plan_lines(predicted):
        runner.say(line)
    timings["clock"] = clock_record(predicted, clock_notes, {})
    status, error = _run_stages(runner, main, smoke_project if smoke else None, bench or BenchOptions())
    timings.update(status=status, error=error,
                   **measurements(main.folder, params, paper, phase_times(runner.timings)))
    table = results_table(main.folder, params, stopped=error)
    save_timings()
    write_text(record / RESULTS, table)
    write_text(output / RESULTS, table)
    tic = time.monotonic()
    limits = {"max_files": max_files, "file_limit": file_limit, "total_limit": total_limit}
    try:
        write_outputs(output, main.folder, record, manifest_header(params, environment, profile, status, error),
                      **limits)
        timings["pack_seconds"] = round(time.monotonic() - tic, 2)
        timings["total_seconds"] = round(time.monotonic() - clock0, 2)
        write_json(output / TIMINGS, timings)      # the packed copy was written before packing
        files = check_output_layout(output, **limits)
    except PackError as exc:
        raise MatekdError(f"{exc} (run status: {status}{'; ' + error if error else ''})") from None
    print_summary(timings, files)
    print(table, flush=True)
    outcome = RunOutcome(status, error, files, timings, table)
    if error:
        raise MatekdError(error)
    return outcome


def _project(folder: Path, raw: dict[str, Any], overrides: dict[str, Any], base_env: dict[str, str],
             one_at_a_time: bool = False) -> Project:
    """A new project folder with its params.yaml (`raw` + `overrides`) and its stages' environment."""
    folder.mkdir()
    return Project(folder, write_params(folder, raw, overrides), stage_env(base_env, folder.resolve()),
                   one_at_a_time)


def _run_stages(runner: StageRunner, main: Project, smoke: Project | None,
                bench: BenchOptions) -> tuple[str, str | None]:
    """(status, error) of plan.run_plan; the stages still running when it ends otherwise (an
    exception, Ctrl-C, SIGTERM) are stopped before it returns or raises."""
    restore_sigterm = _stop_on_sigterm()
    try:
        run_plan(runner, main, smoke, bench)
    except TimeLimitReached as exc:
        return "time limit", f"{exc}; packed what exists"
    except SmokeFailed as exc:
        return "smoke failed", str(exc)
    except StageFailed as exc:
        return "failed", str(exc)
    finally:
        if runner.running:       # an interruption (Ctrl-C, SIGTERM): stop the stages too
            runner.stop_all("stopped: run ended")
        restore_sigterm()
    return "ok", None


def _stop_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into SystemExit while the stages run, so that `finally` stops them (they
    run in sessions of their own, which a signal to this process alone would not reach).
    Returns the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, previous)


def print_summary(timings: dict[str, Any], files: list[Path]) -> None:
    lines = ["", *summary_lines(timings), f"Outputs ({len(files)} files):"]
    lines += [f"  {path}  {path.stat().st_size / MIB:6.2f} MiB" for path in files]
    print("\n".join(lines) + "\n")
