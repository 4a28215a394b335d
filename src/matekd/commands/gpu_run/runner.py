"""StageRunner: `matekd <stage>` commands in subprocesses, several at once, fail fast, with a
deadline; every stage's wall time recorded and printed as it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import MatekdError

KILL_GRACE_S = 10.0       # SIGTERM first; SIGKILL what still runs after this long
LOG_TAIL_LINES = 40       # of a failed stage's log, quoted in the error


class StageFailed(MatekdError):
    """A stage exited with an error (the message names it and quotes its log)."""

    def __init__(self, message: str, phase: str = ""):
        super().__init__(message)
        self.phase = phase          # the failed stage's phase ("smoke" for the smoke pass)


class TimeLimitReached(MatekdError):
    """--time-limit ran out while stages were running (they were stopped)."""


@dataclass
class Job:
    name: str
    phase: str
    proc: subprocess.Popen
    log: Path
    started: float
    on_done: Callable[[Job], None] | None = None
    status: str = "running"


@dataclass
class StageRunner:
    """Starts `matekd <stage> ... --params params.yaml --no-progress` subprocesses in a project
    folder, waits for them, records and prints their times.

    Any job that fails, also a background one, stops every running job and raises StageFailed
    (fail fast). Each job runs in its own process group, so stopping it stops its workers."""

    record: Path
    env: dict[str, str]
    python: str = sys.executable
    deadline: float | None = None                      # monotonic time at which stages are stopped
    clock0: float = field(default_factory=time.monotonic)
    running: list[Job] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    on_record: Callable[[], None] | None = None         # called after every finished job
    smoke_done: bool = True                             # plan.smoke_chain: false while the smoke pass runs

    def elapsed(self) -> float:
        return time.monotonic() - self.clock0

    def say(self, text: str, at: float | None = None) -> None:
        """Print a progress line (stamped with the seconds since the start `at`, when given) and
        keep it in the record (runner.log, packed with the logs)."""
        if at is not None:
            text = f"[{at:7.1f} s] {text}"
        print(text, flush=True)
        with open(self.record / "runner.log", "a") as handle:
            handle.write(text + "\n")

    def start(self, phase: str, name: str, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
              on_done: Callable[[Job], None] | None = None) -> Job:
        logs = self.record / "logs" / phase
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{_slug(name)}.log"
        command = [self.python, "-m", "matekd.cli", *args, "--params", "params.yaml", "--no-progress"]
        with open(log, "w") as handle:
            handle.write(f"$ (cd {cwd} && {' '.join(command)})\n")
            handle.flush()
            proc = subprocess.Popen(command, cwd=cwd, env=env or self.env, stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        job = Job(name, phase, proc, log, self.elapsed(), on_done)
        self.running.append(job)
        return job

    def wait(self, *jobs: Job) -> None:
        """Until `jobs` have ended (others keep running). Raises StageFailed when any job fails
        and TimeLimitReached past the deadline; both stop every running job first."""
        self.wait_for(lambda: all(j.status != "running" for j in jobs))

    def wait_for(self, done: Callable[[], bool]) -> None:
        """Poll every job (starting what their on_done starts) until `done()`; as `wait`."""
        while not done():
            self.poll()
            if not done():
                if self.deadline is not None and time.monotonic() > self.deadline:
                    names = ", ".join(f"{j.phase}: {j.name}" for j in self.running)
                    self.stop_all("stopped: time limit")
                    raise TimeLimitReached(f"the time limit ran out while running {names}")
                time.sleep(0.2)

    def poll(self) -> None:
        for job in list(self.running):
            code = job.proc.poll()
            if code is None:
                continue
            self.running.remove(job)
            self._finish(job, "ok" if code == 0 else f"failed (exit {code})")
            if code != 0:
                self.stop_all("stopped: another stage failed")
                raise StageFailed(f"{job.phase} stage `{job.name}` failed (exit {code}); log {job.log}:\n"
                                  f"{log_tail(job.log)}", job.phase)
            if job.on_done is not None:
                job.on_done(job)

    def run_all(self, phase: str, commands: Sequence[tuple[str, Sequence[str]]], cwd: Path,
                envs: Sequence[dict[str, str]]) -> None:
        """Start every (name, args), each with its environment in `envs`, at once; wait for all."""
        jobs = [self.start(phase, name, args, cwd, env) for (name, args), env in zip(commands, envs, strict=True)]
        self.wait(*jobs)

    def stop_all(self, status: str) -> None:
        """SIGTERM every running job's process group, SIGKILL what is left after a grace period."""
        for job in self.running:
            _signal_group(job.proc, signal.SIGTERM)
        limit = time.monotonic() + KILL_GRACE_S
        for job in self.running:
            try:
                job.proc.wait(timeout=max(limit - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(job.proc, signal.SIGKILL)
                job.proc.wait()
        for job in list(self.running):
            self._finish(job, status)
        self.running.clear()

    def _finish(self, job: Job, status: str) -> None:
        ended, job.status = self.elapsed(), status
        seconds = ended - job.started
        self.timings.append({"phase": job.phase, "stage": job.name, "status": status,
                             "start_s": round(job.started, 2), "end_s": round(ended, 2),
                             "seconds": round(seconds, 2), "log": str(job.log.relative_to(self.record.parent))})
        self.say(f"{status.split(' ')[0]:<7} {job.phase:<14} {job.name:<28} {seconds:7.1f} s", at=ended)
        if self.on_record is not None:
            self.on_record()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)      # the job's own group (start_new_session): it and its workers
    except (ProcessLookupError, PermissionError):
        pass


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])
