"""Killed trials: found, failed and retried once with the same parameters.

Every trial is claimed by the process that runs it (trial user attributes: host identity,
pid and its start time, the `matekd tune` session, the worker number and its device). A
RUNNING trial whose process on this host is gone (SIGKILL, OOM kill, a crashed worker) is
marked FAIL as soon as any `matekd tune` on this host looks (at start, between trials, when a
worker process exits) and queued again once (MAX_RETRY). On RDB storages Optuna's heartbeat
does the same for workers on other machines once their heartbeat is GRACE_PERIOD_S old
(matekd.tuning.storage).
"""

from __future__ import annotations

import os
import warnings

import optuna

from ..tracking.lifecycle import host_identity, pid_alive, process_start

TrialState = optuna.trial.TrialState
MAX_RETRY = 1  # a killed trial is rerun once with the same parameters

# Trial user attributes written by the process that runs the trial: the only ones a trial
# carries (the per-epoch curves go to MLflow, not into the study).
ATTR_HOST, ATTR_PID, ATTR_PID_START = "matekd.host", "matekd.pid", "matekd.pid_start"
ATTR_SESSION, ATTR_WORKER, ATTR_DEVICE = "matekd.session", "matekd.worker", "matekd.device"
ATTR_DIVERGED, ATTR_ERROR = "matekd.diverged", "matekd.error"


def claim(trial: optuna.Trial, session: str, worker: int, device: str) -> None:
    """Record which process runs `trial` (first thing a trial does: the orphan check reads it)."""
    pid = os.getpid()
    trial.set_user_attr(ATTR_HOST, host_identity())
    trial.set_user_attr(ATTR_PID, pid)
    trial.set_user_attr(ATTR_PID_START, process_start(pid) or "")
    trial.set_user_attr(ATTR_SESSION, session)
    trial.set_user_attr(ATTR_WORKER, worker)
    trial.set_user_attr(ATTR_DEVICE, device)


def retry_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed (killed) trial again with the same parameters, at most MAX_RETRY times.

    Same bookkeeping as Optuna's RetryHeartbeatStaleTrialCallback (`failed_trial`,
    `retry_history`), but the dead worker's claim is not copied, so that the copy is never
    mistaken for an orphan before its new worker claims it."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return
    system_attrs = {**trial.system_attrs, "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                    "retry_history": history}
    user_attrs = {k: v for k, v in trial.user_attrs.items() if not k.startswith("matekd.")}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=user_attrs,
                                              system_attrs=system_attrs))


def _process_gone(trial: optuna.trial.FrozenTrial, host: str, pids: set[int] | None) -> bool:
    pid = trial.user_attrs.get(ATTR_PID)
    if trial.user_attrs.get(ATTR_HOST) != host or not isinstance(pid, int):
        return False  # another machine's trial (the heartbeat's business) or not claimed yet
    if pids is not None:
        return pid in pids
    return not pid_alive(pid, trial.user_attrs.get(ATTR_PID_START) or None)


def fail_orphans(study: optuna.Study, pids: set[int] | None = None) -> list[int]:
    """Mark FAIL, and retry, the RUNNING trials whose process on this host is gone (or, with
    `pids`, is one of these dead worker processes). Returns their numbers."""
    host = host_identity()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _process_gone(trial, host, pids):
            continue
        try:
            frozen = study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # finished meanwhile, or another process failed it first
        retry_trial(study, frozen)
        failed.append(trial.number)
    return failed


def fail_stale(study: optuna.Study) -> None:
    """Local orphans now; remote ones once their heartbeat is older than the grace period.

    Called by a worker before it counts the study's trials to decide whether to start one.
    `study.optimize` runs Optuna's `fail_stale_trials` too, but only when it starts a trial: a
    dead remote worker's trial, still RUNNING, would be counted as running and could stop every
    worker short of the target, so nothing would ever start the trial that fails it. The local
    check (fail_orphans) is not Optuna's: it acts at once and also on journal files, which have
    no heartbeat."""
    fail_orphans(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
