"""MLflow tracking: one run per stage execution, or a no-op tracker when tracking is off.

mlflow is imported lazily so the training core runs where it is not installed (tracking off).
The default store is `<repo>/mlruns/mlflow.db` (SQLite) with artifacts in `<repo>/mlruns/artifacts`,
as absolute URIs so DVC experiment copies log to the same store; `MLFLOW_TRACKING_URI`
overrides it and `MATEKD_TRACKING=off` (or `tracking.enabled: false`) switches it off.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from .errors import TrackingError
from .storage import repo_root

OFF_SWITCH = "MATEKD_TRACKING=off (or tracking.enabled: false in params.yaml)"
_RETRIES = 3
_sleep = time.sleep  # the retry back-off; tests replace it (patching time.sleep would hit mlflow's threads)


def tracking_enabled(enabled_param: bool = True) -> bool:
    if os.environ.get("MATEKD_TRACKING", "").lower() in {"off", "0", "false", "no"}:
        return False
    return enabled_param


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = repo_root() / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root(uri: str | None = None) -> str:
    """Artifact folder of a SQLite store: `artifacts/` beside its database file (so a store
    named by MLFLOW_TRACKING_URI keeps its artifacts with it), else `<repo>/mlruns/artifacts`."""
    if uri and uri.startswith("sqlite:///") and ":memory:" not in uri:
        database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        return (database.resolve().parent / "artifacts").as_uri()
    return (repo_root() / "mlruns" / "artifacts").as_uri()


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the repo; 'unknown' outside git."""
    root = repo_root()
    unknown = {"git_commit": "unknown", "git_dirty": "unknown"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return unknown  # not a repository, or no commit yet
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return unknown
    dirty = str(bool(status.stdout.strip())).lower() if status.returncode == 0 else "unknown"
    return {"git_commit": head.stdout.strip(), "git_dirty": dirty}


def installed_packages() -> str:
    """pip-freeze style list of the installed distributions."""
    names = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                    if d.metadata["Name"]}, key=str.lower)
    return "\n".join(names) + "\n"


class NullRun:
    """Stands in for a run when tracking is off: every call does nothing."""

    run_id: str | None = None
    active = False

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict(self, obj: Any, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_image(self, image: Any, key: str, step: int) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowRun(NullRun):
    """A started MLflow run. Logging calls retry transient failures, then warn and go on,
    so a tracking hiccup never stops training (DVC outputs are still written)."""

    active = True

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        for attempt in range(_RETRIES):
            try:
                fn(*args, **kwargs)
                return
            except Exception as exc:  # mlflow raises many types for I/O and HTTP errors
                if attempt == _RETRIES - 1:
                    warnings.warn(f"MLflow: {what} failed after {_RETRIES} tries ({exc}); training goes on")
                    return
                _sleep(0.5 * 2 ** attempt)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        for start in range(0, len(items), 500):
            self._call("log_metrics", self.client.log_batch, self.run_id, metrics=items[start:start + 500])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self._call("log_params", self.client.log_batch, self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call("set_tags", self.client.log_batch, self.run_id,
                   tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call(f"log_artifact {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"log_text {artifact_file}", self.client.log_text, self.run_id, text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._call(f"log_dict {artifact_file}", self.client.log_dict, self.run_id, obj, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._call(f"log_figure {artifact_file}", self.client.log_figure, self.run_id, figure, artifact_file)

    def log_image(self, image: Any, key: str, step: int) -> None:
        self._call(f"log_image {key}", self.client.log_image, self.run_id, image, key=key, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", self.client.set_terminated, self.run_id, status)


def _client_for(uri: str):
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise TrackingError(f"mlflow is not installed; install it or run with {OFF_SWITCH}") from exc
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


# MLflow's HTTP defaults (7 retries, 120 s timeout, doubling back-off) would keep a stage waiting
# for minutes on a dead server; unless the user set them, the first contact fails within ~20 s
# (3 tries of at most 5 s plus 3 s of back-off) and later logging calls within ~35 s.
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_RUN_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set the environment variables the user left unset, for the duration of the block."""
    added = [key for key in values if key not in os.environ]
    os.environ.update({key: values[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def experiment_id(client: Any, name: str, uri: str) -> str:
    """Get or create the experiment; an unreachable store fails with the URI and the off switch."""
    try:
        with _env_defaults(_PROBE_ENV):
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            location = artifact_root(uri) if uri.startswith("sqlite:") else None
            try:
                return client.create_experiment(name, artifact_location=location)
            except Exception:  # another process created it first
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                return experiment.experiment_id
    except Exception as exc:
        raise TrackingError(f"MLflow tracking store {uri} is unreachable ({type(exc).__name__}: {exc}); "
                            f"start it, point MLFLOW_TRACKING_URI elsewhere, or run with {OFF_SWITCH}") from exc
    finally:
        for key, value in _RUN_ENV.items():
            os.environ.setdefault(key, value)


@contextlib.contextmanager
def start_run(*, enabled: bool, experiment: str, run_name: str, stage: str, params: dict[str, Any],
              tags: dict[str, Any], parent_run_id: str | None = None) -> Iterator[NullRun]:
    """Open a run with flattened params, provenance tags and the pip freeze; close it with the
    outcome (FAILED on an exception, KILLED on Ctrl-C)."""
    if not tracking_enabled(enabled):
        yield NullRun()
        return
    uri = tracking_uri()
    client = _client_for(uri)
    exp_id = experiment_id(client, experiment, uri)
    all_tags = {"stage": stage, "torch_version": _torch_version(), "python": sys.version.split()[0],
                **git_state(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        created = client.create_run(exp_id, run_name=run_name,
                                    tags={k: str(v) for k, v in all_tags.items()})
    except Exception as exc:
        raise TrackingError(f"MLflow tracking store {uri} refused a new run ({exc}); run with {OFF_SWITCH}") from exc
    run = MlflowRun(client, created.info.run_id)
    run.log_params(params)
    run.log_text(installed_packages(), "provenance/pip-freeze.txt")
    with closing_run(run):
        yield run


@contextlib.contextmanager
def closing_run(run: "MlflowRun") -> Iterator["MlflowRun"]:
    """Mark the run with the block's outcome: FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
    try:
        yield run
    except KeyboardInterrupt:
        run.finish("KILLED")
        raise
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "absent"
