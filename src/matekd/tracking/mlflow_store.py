"""The online tracker: runs in an MLflow store through `MlflowClient` (mlflow imported lazily),
with retries; also the store's experiments, closing runs a dead process left RUNNING, and
deleting runs (sync's roll-back)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import TrackingError
from . import interface
from .interface import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    OFF_SWITCH,
    NullRun,
    dataset_record,
    first_line,
    metric_dataset,
)
from .lifecycle import STALE_TAG, owned_by_dead_process, process_identity, stale_note
from .mlflow_private import relocate_store
from .roots import artifact_root, is_default_store, uri_to_path

log = logging.getLogger("matekd.tracking")
_BATCH_SIZES = {"metrics": MAX_METRICS_PER_BATCH, "params": MAX_PARAMS_TAGS_PER_BATCH,
                "tags": MAX_PARAMS_TAGS_PER_BATCH}
RETRIES = 3
_sleep = time.sleep  # the retry back-off; tests replace it (patching time.sleep would hit mlflow's threads)


def call_with_retries(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `fn` and return its result, retrying transient failures with a doubling back-off;
    the last failure is raised (`what` names the call for the caller's message)."""
    for attempt in range(RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception:  # mlflow raises many types for I/O and HTTP errors
            if attempt == RETRIES - 1:
                raise
            _sleep(0.5 * 2 ** attempt)
    return None  # pragma: no cover


def retry_or_warn(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Call `fn`, retrying transient failures with a doubling back-off; after the last try,
    warn and return False so that a tracking hiccup never stops training."""
    try:
        call_with_retries(what, fn, *args, **kwargs)
        return True
    except Exception as exc:
        warnings.warn(f"MLflow: {what} failed after {RETRIES} tries ({exc}); training goes on", stacklevel=3)
        return False


def log_in_batches(call: Any, what: str, client: Any, run_id: str, kind: str, items: list[Any]) -> None:
    """`client.log_batch` of `items` (Metric, Param or RunTag entities; `kind` is "metrics",
    "params" or "tags") in MLflow's batch sizes; `call(what, fn, *args, **kwargs)` makes each call."""
    size = _BATCH_SIZES[kind]
    for start in range(0, len(items), size):
        call(what, client.log_batch, run_id, **{kind: items[start:start + size]})


class MlflowRun(NullRun):
    """A started MLflow run. Logging calls retry transient failures, then warn and go on,
    so a tracking hiccup never stops training (DVC outputs are still written)."""

    active = True
    mode = "online"

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    def _retry_or_warn(self, what: str, fn, *args, **kwargs) -> bool:
        return retry_or_warn(what, fn, *args, **kwargs)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, *, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        from mlflow.entities import Metric

        now = interface.now_ms()
        dataset_name, dataset_digest = metric_dataset(dataset)
        items = [Metric(key, float(value), now, step or 0, model_id=model_id, dataset_name=dataset_name,
                        dataset_digest=dataset_digest) for key, value in metrics.items()]
        log_in_batches(self._retry_or_warn, "log_metrics", self.client, self.run_id, "metrics", items)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:interface.MAX_PARAM_VALUE_LENGTH]) for key, value in params.items()]
        log_in_batches(self._retry_or_warn, "log_params", self.client, self.run_id, "params", items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)) for key, value in tags.items()]
        log_in_batches(self._retry_or_warn, "set_tags", self.client, self.run_id, "tags", items)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).is_file():
            self._retry_or_warn(f"log_artifact {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(local_dir).is_dir():
            self._retry_or_warn(f"log_artifacts {local_dir}", self.client.log_artifacts, self.run_id, str(local_dir),
                                artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._retry_or_warn(f"log_text {artifact_file}", self.client.log_text, self.run_id, text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._retry_or_warn(f"log_dict {artifact_file}", self.client.log_dict, self.run_id, obj, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._retry_or_warn(f"log_figure {artifact_file}", self.client.log_figure, self.run_id, figure, artifact_file)

    def log_image(self, image: Any, key: str, step: int) -> None:
        self._retry_or_warn(f"log_image {key}", self.client.log_image, self.run_id, image, key=key, step=step,
                            timestamp=interface.now_ms(), synchronous=True)

    def log_input(self, name: str, digest: str, source: str, context: str = "training", *,
                  source_type: str = "local", schema: str | None = None, profile: str | None = None,
                  tags: dict[str, Any] | None = None) -> None:
        record = dataset_record(name, digest, source, context, source_type=source_type, schema=schema,
                                profile=profile, tags=tags)
        self._retry_or_warn(f"log_input {name}", self.client.log_inputs, self.run_id, datasets=[dataset_input(record)])

    def log_model(self, model: Any, *, name: str, input_example: Any, registered_name: str | None = None,
                  builder: Any = None) -> str | None:
        from .models import ModelRequest, export_copy, log_to_store

        try:
            request = ModelRequest.check(name, registered_name, builder, input_example)
            return log_to_store(self.client, self.run_id, export_copy(model, request.builder), request,
                                call_with_retries).model_id
        except Exception as exc:  # an export, a builder, the store: warn and go on
            warnings.warn(f"MLflow: log_model {name} failed ({type(exc).__name__}: {first_line(exc)}); "
                          "training goes on", stacklevel=2)
            return None

    def log_model_input(self, model_id: str) -> None:
        from mlflow.entities import LoggedModelInput

        self._retry_or_warn(f"log_inputs model {model_id}", self.client.log_inputs, self.run_id,
                            models=[LoggedModelInput(model_id)])

    def set_model_alias(self, model_id: str, alias: str) -> None:
        from .models import set_alias

        try:
            set_alias(self.client, model_id, alias, call_with_retries)
        except Exception as exc:
            warnings.warn(f"MLflow: alias {alias} of model {model_id} failed ({type(exc).__name__}: "
                          f"{first_line(exc)})", stacklevel=2)

    def finish(self, status: str = "FINISHED") -> None:
        self._retry_or_warn("set_terminated", self.client.set_terminated, self.run_id, status,
                            end_time=interface.now_ms())


def dataset_input(record: dict[str, Any]):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(record["name"], record["digest"], record["source_type"], record["source"],
                      record.get("schema"), record.get("profile"))
    return DatasetInput(dataset, tags=[InputTag(k, v) for k, v in record.get("tags", {}).items()])


def client_for(uri: str):
    """An MlflowClient for `uri`. mlflow's global tracking URI is left alone on purpose:
    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which would pin every later
    `tracking_uri()` of the process (and its subprocesses) to this store."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise TrackingError(f"mlflow is not installed; install it, run with MATEKD_TRACKING=offline "
                            f"(and `matekd sync-runs` later), or with {OFF_SWITCH}") from exc
    return MlflowClient(tracking_uri=uri)


# MLflow's HTTP defaults (7 retries, 120 s timeout, doubling back-off) would keep a stage waiting
# for minutes on a dead server; unless the user set them, the first contact fails within ~20 s
# (3 tries of at most 5 s plus 3 s of back-off) and later logging calls within ~35 s.
_FIRST_CONTACT_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
                           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_LOGGING_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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
    """Get or create the experiment (artifacts beside a SQLite database); an unreachable store
    fails with the URI and the off switch. MLflow's own get-or-create, `mlflow.set_experiment`,
    cannot set the artifact location and changes the process's active experiment."""
    try:
        with _env_defaults(_FIRST_CONTACT_HTTP_ENV):
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
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
        for key, value in _LOGGING_HTTP_ENV.items():
            os.environ.setdefault(key, value)
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} in {uri} is deleted: restore it (`mlflow experiments "
                            f"restore --experiment-id {experiment.experiment_id}`), purge it (`mlflow gc`) or set "
                            "another tracking.experiment")
    return experiment.experiment_id


def create_run(*, experiment: str, run_name: str, stage: str, tags: dict[str, str],
               parent_run_id: str | None = None, uri: str) -> MlflowRun:
    """Open a new run; first close the runs of this stage that a dead process of this host left
    RUNNING. `tags` are complete (provenance.run_tags)."""
    if is_default_store(uri):
        relocate_store(uri)
    client = client_for(uri)
    exp_id = experiment_id(client, experiment, uri)
    close_stale_runs(client, exp_id, stage)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        created = client.create_run(exp_id, run_name=run_name, start_time=interface.now_ms(), tags=all_tags)
    except Exception as exc:
        raise TrackingError(f"MLflow tracking store {uri} refused a new run ({exc}); run with {OFF_SWITCH}") from exc
    return MlflowRun(client, created.info.run_id)


def reopen_run(run_id: str, uri: str) -> MlflowRun | None:
    """The run `run_id` marked RUNNING again and owned by this process (None when the store has
    no active run of that id)."""
    client = client_for(uri)
    try:
        with _env_defaults(_FIRST_CONTACT_HTTP_ENV):
            run = client.get_run(run_id)
    except Exception:
        return None
    if run.info.lifecycle_stage != "active":
        return None
    reopened = MlflowRun(client, run_id)
    reopened._retry_or_warn("update_run", client.update_run, run_id, status="RUNNING")
    reopened.set_tags(process_identity())
    return reopened


def close_stale_runs(client: Any, exp_id: str, stage: str) -> list[str]:
    """Mark FAILED the RUNNING runs of `stage` whose process (recorded in their host and pid
    tags) is dead on this host: a SIGKILL, OOM kill or power loss leaves a run RUNNING. Runs of
    live processes (parallel workers), of other hosts and without our tags are left alone."""
    closed: list[str] = []
    try:
        runs = client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    except Exception as exc:
        log.warning("matekd: could not look for stale RUNNING runs (%s)", exc)
        return closed
    for run in runs:
        tags = run.data.tags
        if tags.get("stage") != stage or not owned_by_dead_process(tags):
            continue
        try:
            client.set_tag(run.info.run_id, STALE_TAG, stale_note(tags, stage))
            client.set_terminated(run.info.run_id, "FAILED", end_time=interface.now_ms())
            closed.append(run.info.run_id)
        except Exception as exc:
            log.warning("matekd: could not close stale run %s (%s)", run.info.run_id, exc)
    return closed


# ---------------------------------------------------------------------------------------------
# deleting runs (sync roll-back)

def delete_runs(client: Any, run_ids: list[str]) -> tuple[bool, list[str]]:
    """Remove runs with their artifacts, logged models and registered versions: permanently
    where the store can (SQL stores; the steps of `mlflow gc --run-ids`), else soft-deleted.
    Returns (permanent, run ids that could not be removed)."""
    from .mlflow_private import delete_artifacts, hard_delete_run, hard_delete_store
    from .models import delete_models_of_run

    store = hard_delete_store(client)
    failed = []
    for run_id in reversed(run_ids):  # children before parents
        try:
            try:
                delete_models_of_run(client, run_id, store)
            except Exception as exc:  # e.g. a store without a model registry: the run still goes
                log.warning("matekd: could not remove the models of run %s (%s); delete them in MLflow", run_id, exc)
            artifact_uri = client.get_run(run_id).info.artifact_uri
            client.delete_run(run_id)
            if store is not None:
                with contextlib.suppress(Exception):
                    delete_artifacts(artifact_uri)
                    folder = uri_to_path(artifact_uri)
                    if folder is not None and folder.parent.is_dir() and not any(folder.parent.iterdir()):
                        shutil.rmtree(folder.parent, ignore_errors=True)  # the empty <run id>/ folder
                hard_delete_run(store, run_id)
        except Exception:
            failed.append(run_id)
    return store is not None, failed
