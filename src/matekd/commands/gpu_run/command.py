"""run_gpu, the command end to end: the pre-flight checks, the output and work folders made
ready, the stages (plan.run_plan), the measurements, the results table and the packs."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import MatekdError
from ..pack import FILE_LIMIT, MAX_FILES, MIB, SAFE_NAME, TOTAL_LIMIT, PackError, check_output_layout, is_pack_file
from .measure import (
    EXCLUSIVE_MODES,
    GpuState,
    clock_record,
    environment_record,
    gpu_states,
    measurements,
    phase_times,
    plan_lines,
    predicted_phases,
    summary_lines,
)
from .outputs import manifest_header, results_table, write_outputs
from .plan import (
    DEFAULT_OUTPUT,
    DEFAULT_PAPER_PROFILE,
    DEFAULT_PROFILE,
    DEFAULT_WORK,
    LOOSE_FILES,
    RECORD,
    RESULTS,
    TIMINGS,
    WORK_MARKER,
    BenchOptions,
    Project,
    SmokeFailed,
    find_path,
    new_project,
    paper_params,
    resolved_params,
    run_plan,
    smoke_overrides,
)
from .runner import StageFailed, StageRunner, TimeLimitReached

PACK_RESERVE_S = 30.0           # time kept for packing when --time-limit is set
MEMORY_IN_USE_WARNING = 0.9     # free below this share of the total: another process holds the GPU


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
    main = new_project(work / "main", raw, {}, base_env, one_at_a_time)
    smoke_project = new_project(work / "smoke", raw, smoke_overrides(raw), base_env, one_at_a_time)
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


# --------------------------------------------------------------------------------------
# Before any stage runs: the inputs are there and the output and work folders can be used,
# else an error naming what is missing and how to fix it; then both folders made ready.


def preflight(params: Any, env: dict[str, str], output: Path, work: Path) -> None:
    """Fail before any stage runs: data archive, frost textures, output name and folders."""
    from ...cifar10c import resolve_corruptions, resolve_frost_dir
    from ...corruptions import FrostUnavailable, frost_texture_files

    archive = env.get("MATEKD_CIFAR10", "")
    if not archive:
        raise MatekdError("MATEKD_CIFAR10 is not set: point it at the CIFAR-10 archive (cifar-10-python.tar.gz, or "
                          "the JPEG mirror cifar10-jpeg.tar.gz), e.g. copied into the ignored folder .gpu-data/ "
                          "that the device call carries: MATEKD_CIFAR10=.gpu-data/cifar10-jpeg.tar.gz")
    if not Path(archive).exists():
        raise MatekdError(f"MATEKD_CIFAR10={archive}: no such file or folder (copy the archive into .gpu-data/ and "
                          "name that folder in the device call's carry)")
    cp = params.corrupt
    if not cp.source and "frost" in resolve_corruptions(cp.corruptions):
        try:
            frost_texture_files(resolve_frost_dir(cp.frost_dir, env))
        except FrostUnavailable as exc:
            raise MatekdError(f"CIFAR-10-C with frost needs its textures: {exc}. Set MATEKD_FROST (e.g. "
                              "MATEKD_FROST=.gpu-data/frost), or leave frost out with -S corrupt.corruptions=[...]"
                              ) from None
    if not SAFE_NAME.match(output.name):
        raise MatekdError(f"output folder name {output.name!r}: use letters, digits, '.', '_' and '-' only (the "
                          "names a GPU machine hands back)")
    out, wk = output.resolve(), work.resolve()
    if out == wk or wk in out.parents or out in wk.parents:
        raise MatekdError(f"the output folder {output} and the work folder {work} must not contain each other")


def check_gpus(device: str, states: Sequence[GpuState] | None,
               visible: str | None = None) -> tuple[list[str], bool]:
    """The lines preflight prints about the GPUs (compute mode, free memory), and whether the
    stages that share a GPU must run one at a time. An exclusive compute mode admits one process
    per GPU, and the runner starts the teachers (and their caches) together: they run one after
    another there instead of failing. Raises MatekdError where no stage could use the GPU."""
    if device == "cpu":
        return [], False
    if states is not None and visible is not None:     # CUDA_VISIBLE_DEVICES: only those count
        ids = {v.strip() for v in visible.split(",") if v.strip()}
        if ids and all(v.isdigit() for v in ids):     # indices (UUIDs: keep every GPU)
            states = [g for g in states if g.index in ids]
    if states is None:
        return ["GPUs: nvidia-smi not available; compute mode and free memory unknown"], False
    if not states:
        if device == "cuda":
            raise MatekdError("device is cuda but nvidia-smi lists no GPU")
        return ["GPUs: none found by nvidia-smi; device auto runs the stages on the CPU"], False
    prohibited = [g.index for g in states if g.compute_mode == "Prohibited"]
    if prohibited:
        raise MatekdError(f"GPU {', '.join(prohibited)} is in compute mode Prohibited: no process may use it "
                          "(nvidia-smi -c DEFAULT, or hide it with CUDA_VISIBLE_DEVICES)")
    lines = [g.line() for g in states]
    for g in states:
        if g.free_mib is not None and g.total_mib and g.free_mib < MEMORY_IN_USE_WARNING * g.total_mib:
            lines.append(f"warning: GPU {g.index}: {g.total_mib - g.free_mib:,} MiB already in use by another "
                         "process; the stages have less memory than the profile assumes")
    one_at_a_time = any(g.compute_mode in EXCLUSIVE_MODES for g in states)
    if one_at_a_time:
        lines.append("exclusive compute mode: stages that would share a GPU (teachers, caches) run one at a time")
    return lines, one_at_a_time


def clear_output(output: Path) -> None:
    """The output folder must be new, empty, or hold only what this command writes there."""
    if output.exists() and not output.is_dir():
        raise MatekdError(f"output {output} is a file; give a folder")
    if not output.exists():
        output.mkdir(parents=True)
        return
    ours = [p for p in output.iterdir() if p.name in LOOSE_FILES or is_pack_file(p.name)]
    others = sorted(p.name for p in output.iterdir() if p not in ours)
    if others:
        raise MatekdError(f"output folder {output} holds other files ({', '.join(others[:5])}); give an empty or "
                          "new folder (only the packs, MANIFEST.txt, timings.json and results.txt go there)")
    for path in ours:
        path.unlink()


def clear_work(work: Path) -> None:
    """The work folder is the runner's scratch space: new, empty, or one it made before."""
    if work.exists():
        if (work / WORK_MARKER).is_file():
            shutil.rmtree(work)
        elif any(work.iterdir()):
            raise MatekdError(f"work folder {work} is not empty and was not made by `matekd gpu-run`; give a new "
                              "folder with --work-dir (everything in it is deleted at the next run)")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("scratch folder of `matekd gpu-run`; deleted at its next run\n")
