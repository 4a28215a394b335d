"""Run tracking: one run per stage execution, in MLflow (online), in a folder that `sync_runs`
imports later (offline: machines without mlflow or a store), or nowhere (off). The mode is
`tracking.enabled`/`tracking.mode` of params.yaml, overridden by MATEKD_TRACKING. mlflow is
imported lazily: `import matekd.tracking` and offline runs work where it is not installed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ..errors import TrackingError
from . import mlflow_store
from .interface import NullRun
from .lifecycle import RunInterrupted, closing_run, process_identity
from .mlflow_store import MlflowRun, client_for, experiment_id
from .models import ModelBuilder
from .offline import OfflineRun, OfflineRunError, close_stale_offline_runs, read_folder
from .provenance import git_state, installed_packages, producing_run, record_output, run_for_digest, run_tags
from .roots import artifact_root, offline_root, store_root, tracking_uri, workspace_root
from .sync import SyncSummary, sync_runs

MODES = ("online", "offline")
_OFF_VALUES = {"off", "0", "false", "no"}
_KEEP_PARAMS_VALUES = {"on", "1", "true", "yes"}  # MATEKD_TRACKING values that keep params.yaml's mode


def tracking_mode(enabled: bool = True, mode: str = "online") -> str:
    """The effective mode, "off", "online" or "offline": MATEKD_TRACKING when set, else the
    params (`tracking.enabled`, `tracking.mode`)."""
    if mode not in MODES:
        raise TrackingError(f"tracking.mode {mode!r} is not one of {', '.join(MODES)}")
    value = os.environ.get("MATEKD_TRACKING", "").strip().lower()
    if value in _OFF_VALUES:
        return "off"
    if value in MODES:
        return value
    if value and value not in _KEEP_PARAMS_VALUES:
        raise TrackingError(f"MATEKD_TRACKING={value!r} is not one of off, online, offline (or on, to keep "
                            "tracking.enabled and tracking.mode of params.yaml)")
    return mode if enabled else "off"


def tracking_enabled(enabled_param: bool = True) -> bool:
    return tracking_mode(enabled_param) != "off"


@contextlib.contextmanager
def start_run(*, enabled: bool, experiment: str, run_name: str, stage: str, params: dict[str, Any],
              tags: dict[str, Any], parent_run_id: str | None = None, mode: str = "online",
              offline_dir: str | os.PathLike | None = None) -> Iterator[NullRun]:
    """Open a run with flattened params, provenance tags and the pip freeze; close it with the
    outcome (FINISHED; FAILED on an exception; KILLED on Ctrl-C or SIGTERM).

    `parent_run_id` nests the run (an MLflow run id online, the parent's offline id offline).
    Online, an unreachable store stops here with TrackingError (the stage never starts)."""
    effective = tracking_mode(enabled, mode)
    if effective == "off":
        yield NullRun()
        return
    all_tags = run_tags(stage, tags)
    run: NullRun
    if effective == "offline":
        root = offline_root(offline_dir)
        close_stale_offline_runs(root, experiment, stage)
        run = OfflineRun.create(root, experiment=experiment, run_name=run_name, tags=all_tags,
                                parent_run_id=parent_run_id)
    else:
        run = mlflow_store.create_run(experiment=experiment, run_name=run_name, stage=stage, tags=all_tags,
                                      parent_run_id=parent_run_id, uri=tracking_uri())
    with closing_run(run):
        run.log_params(params)
        run.log_text(installed_packages(), "provenance/pip-freeze.txt")
        yield run


def reopen_run(run_id: str, *, mode: str = "online", offline_dir: str | os.PathLike | None = None,
               uri: str | None = None) -> NullRun | None:
    """An existing run marked RUNNING again and owned by this process, for a stage that resumes
    one (tune reopens its study's parent run); close it with `closing_run`. `mode` is the
    effective mode (`tracking_mode(...)`): "online" (store `uri`, default `tracking_uri()`) or
    "offline" (folder `offline_dir`). None when there is no such active run."""
    if mode == "offline":
        return OfflineRun.reopen(offline_root(offline_dir), run_id)
    if mode != "online":
        raise TrackingError(f"cannot reopen a run with tracking mode {mode!r}")
    return mlflow_store.reopen_run(run_id, uri or tracking_uri())


__all__ = [
    "MODES", "MlflowRun", "ModelBuilder", "NullRun", "OfflineRun", "OfflineRunError", "RunInterrupted", "SyncSummary",
    "TrackingError", "artifact_root", "client_for", "closing_run", "experiment_id", "git_state", "offline_root",
    "process_identity", "producing_run", "read_folder", "record_output", "reopen_run", "run_for_digest", "start_run",
    "store_root", "sync_runs", "tracking_enabled", "tracking_mode", "tracking_uri", "workspace_root",
]
