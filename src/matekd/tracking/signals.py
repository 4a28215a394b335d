"""SIGTERM and SIGINT during a run: raise `RunInterrupted` in the main thread so that the run is
closed as KILLED (and every `finally` and context manager on the way runs) instead of the
process dying with the run left RUNNING.

`RunInterrupted` derives from KeyboardInterrupt, not Exception: code that catches Exception to
carry on (a crashed trial, a retried logging call) must not swallow a request to stop. Handlers
exist only while a run is open, only in the main thread, and never replace an ignored signal
(SIG_IGN, e.g. SIGINT of a background job); the previous handlers come back afterwards. While a
run is being closed, a signal is held back (so that a second Ctrl-C cannot leave the run
half-closed) and raised once the run is closed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state: dict[str, Any] = {"deferring": 0, "pending": None}  # nesting depth of signals_deferred; first held signal


class RunInterrupted(KeyboardInterrupt):
    """The process received SIGTERM or SIGINT while a run was open. `signum` says which;
    a CLI may exit with 128 + signum."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _handler(signum: int, frame) -> None:
    if _state["deferring"]:
        if _state["pending"] is None:
            _state["pending"] = signum
        return
    raise RunInterrupted(signum)


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise RunInterrupted in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, object] = {}
    for sig in SIGNALS:
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, _handler)
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
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        pending = _state["pending"]
        if not _state["deferring"]:
            _state["pending"] = None
        if pending is not None and reraise and not _state["deferring"]:
            raise RunInterrupted(pending)
