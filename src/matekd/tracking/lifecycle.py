"""How a run ends, whatever happens to its process: FINISHED, FAILED on an exception, KILLED on
SIGTERM/SIGINT (`closing_run`), and FAILED at the next start of its stage when the process that
owns it (host, pid: `process_identity`) died without closing it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .interface import NullRun

HOST_TAG, PID_TAG, PID_START_TAG = "matekd.host", "matekd.pid", "matekd.pid_start"
STALE_TAG = "matekd.closed_as_stale"  # on a run closed as FAILED because its process had died
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# closing a run; SIGTERM and SIGINT while it is open


class RunInterrupted(KeyboardInterrupt):
    """The process received SIGTERM or SIGINT while a run was open. `signum` says which;
    a CLI may exit with 128 + signum. A KeyboardInterrupt, not an Exception: code that catches
    Exception to carry on (a crashed trial, a retried logging call) must not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# While a run is being closed, a stop signal is held back (a second Ctrl-C cannot leave the run
# half-closed): the nesting depth of signals_deferred and the first signal held.
_held_back: dict[str, Any] = {"depth": 0, "signal": None}


def _raise_run_interrupted(signum: int, frame) -> None:
    if _held_back["depth"]:
        if _held_back["signal"] is None:
            _held_back["signal"] = signum
        return
    raise RunInterrupted(signum)


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise RunInterrupted in the main thread (never
    replacing an ignored signal, e.g. SIGINT of a background job); the previous handlers come
    back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, object] = {}
    for sig in STOP_SIGNALS:
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, _raise_run_interrupted)
        except (ValueError, OSError):  # not the main interpreter, or the platform refuses
            continue
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred(reraise: bool) -> Iterator[None]:
    """Hold SIGTERM/SIGINT back during the block (closing a run); afterwards raise the first
    one that came as RunInterrupted when `reraise`, else drop it (an interrupt or error is
    already on its way out)."""
    _held_back["depth"] += 1
    try:
        yield
    finally:
        _held_back["depth"] -= 1
        pending = _held_back["signal"]
        if not _held_back["depth"]:
            _held_back["signal"] = None
        if pending is not None and reraise and not _held_back["depth"]:
            raise RunInterrupted(pending)


@contextlib.contextmanager
def closing_run(run: NullRun) -> Iterator[NullRun]:
    """Mark the run with the block's outcome: FINISHED, FAILED on an exception, KILLED on Ctrl-C
    or SIGTERM (which raise RunInterrupted, a KeyboardInterrupt, while the block runs in the
    main thread). A signal that comes while the run is being closed waits until it is closed."""
    with interrupts_as_exceptions():
        try:
            yield run
        except KeyboardInterrupt:
            with signals_deferred(reraise=False):
                run.finish("KILLED")
            raise
        except BaseException:
            with signals_deferred(reraise=False):
                run.finish("FAILED")
            raise
        with signals_deferred(reraise=True):
            run.finish("FINISHED")


# ---------------------------------------------------------------------------------------------
# the process that owns a run: a run left RUNNING by a dead one is closed as FAILED


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), None when unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def host_identity() -> str:
    """The pid space this process lives in, `<host name>/<machine id>/<pid namespace inode>` (the
    parts that can be read): two containers may share a host name, and a store, while their pids
    name different processes. Runs (tracking) and trials (tuning) record it to tell whether a pid
    they name can be checked from here."""
    machine = ""
    for path in MACHINE_ID_FILES:
        with contextlib.suppress(OSError):
            machine = Path(path).read_text().strip()[:12]
            break
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    return "/".join(part for part in (socket.gethostname(), machine, namespace) if part)


def process_identity() -> dict[str, str]:
    """The tags that name this process as a run's owner (host identity, pid, start ticks)."""
    tags = {HOST_TAG: host_identity(), PID_TAG: str(os.getpid())}
    start = process_start(os.getpid())
    if start:
        tags[PID_START_TAG] = start
    return tags


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` (started at `start` ticks, when known) still runs on this host.
    A zombie counts as dead; a pid now owned by a later process counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OSError:
        return True  # cannot tell: never touch it
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields and fields[0] == "Z":
        return False
    return not (start and len(fields) > 19 and fields[19] != start)


def _owner_on_this_host(tags: dict[str, Any]) -> tuple[int, str | None] | None:
    """(pid, start ticks) of the process the tags name when it is one of this host, else None."""
    if tags.get(HOST_TAG) != host_identity():
        return None  # another machine or container: we cannot know
    pid = str(tags.get(PID_TAG, ""))
    return (int(pid), tags.get(PID_START_TAG)) if pid.isdigit() else None


def owned_by_dead_process(tags: dict[str, Any]) -> bool:
    """True when the tags name this host and a process of it that no longer runs."""
    owner = _owner_on_this_host(tags)
    return owner is not None and not pid_alive(*owner)


def owned_by_live_process(tags: dict[str, Any]) -> bool:
    """True when the tags name this host and a process of it that still runs."""
    owner = _owner_on_this_host(tags)
    return owner is not None and pid_alive(*owner)


def stale_note(tags: dict[str, Any], stage: str) -> str:
    """The STALE_TAG value of a run of `stage` that a dead process left RUNNING."""
    return (f"process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)} ended without closing the run (killed?); "
            f"closed as FAILED by pid {os.getpid()} at the next start of stage {stage}")

