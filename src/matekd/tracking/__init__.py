"""Run tracking: one run per stage execution, in MLflow (online), in a folder that
`sync_runs` imports into MLflow later (offline, for machines without mlflow or a store), or
nowhere (off).

mlflow is imported lazily: `import matekd.tracking` and offline runs work where it is not
installed. The mode comes from `tracking.enabled` / `tracking.mode` in params.yaml, overridden by
MATEKD_TRACKING (`off`/`0`/`false`/`no`, `online`, `offline`; `on`/`1`/`true`/`yes` keep the
params). The online store is MLFLOW_TRACKING_URI, else `<repo>/mlruns/mlflow.db` with artifacts
in `<repo>/mlruns/artifacts` (absolute; a DVC experiment executor folder under
`<repo>/.dvc/tmp/exps/` logs into `<repo>`'s store, and a copied or moved checkout's store is
relocated to the copy). The offline folder is MATEKD_OFFLINE_DIR, else `tracking.offline_dir`
(default `mlruns-offline`, relative to the repo).

Every run records its process (host, pid): SIGTERM/SIGINT close it as KILLED, an exception as
FAILED, and a run a killed process left RUNNING is closed as FAILED at the next start of the
same stage on the same host. Every run also records the sha256 and folder of the matekd source
that runs (`matekd.source_sha256`, `matekd.source_dir`).

Runs log metrics, params, tags, artifacts, stepped images, dataset inputs and trained models
(`run.log_model`: an MLflow model in the pickle-free pt2 format with signature and input example,
registered as a new version; see tracking.models).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ._base import NullRun, OfflineRunError, TrackingError
from .context import git_state, installed_packages, process_identity, run_tags
from .mlflow_store import MlflowRun, client_for, experiment_id
from .models import ModelBuilder
from .offline import OfflineRun, close_stale_offline_runs, read_folder
from .provenance import producing_run, record_output, run_for_digest
from .roots import artifact_root, offline_root, store_root, tracking_uri, workspace_root
from .signals import RunInterrupted, interrupts_as_exceptions, signals_deferred
from .sync import SyncSummary, sync_runs

MODES = ("online", "offline")
_OFF = {"off", "0", "false", "no"}
_ON = {"on", "1", "true", "yes"}


def tracking_mode(enabled: bool = True, mode: str = "online") -> str:
    """The effective mode, "off", "online" or "offline": MATEKD_TRACKING when set, else the
    params (`tracking.enabled`, `tracking.mode`)."""
    if mode not in MODES:
        raise TrackingError(f"tracking.mode {mode!r} is not one of {', '.join(MODES)}")
    value = os.environ.get("MATEKD_TRACKING", "").strip().lower()
    if value in _OFF:
        return "off"
    if value in MODES:
        return value
    if value and value not in _ON:
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
        from .mlflow_store import create_run

        run = create_run(experiment=experiment, run_name=run_name, stage=stage, tags=all_tags,
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
    from .mlflow_store import reopen_run as _reopen

    return _reopen(run_id, uri or tracking_uri())


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


__all__ = [
    "MODES", "ModelBuilder", "NullRun", "MlflowRun", "OfflineRun", "OfflineRunError", "RunInterrupted",
    "TrackingError",
    "artifact_root", "client_for", "closing_run", "experiment_id", "git_state", "offline_root", "process_identity",
    "producing_run", "read_folder", "record_output", "reopen_run", "start_run", "store_root", "SyncSummary",
    "run_for_digest", "sync_runs", "tracking_enabled",
    "tracking_mode", "tracking_uri", "workspace_root",
]
