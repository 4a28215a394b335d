"""The run interface every tracker implements (NullRun, also the run of tracking off) and the
rules both trackers apply to what a run logs: MLflow's limits and key rules, dataset records, the
clock. Nothing here imports mlflow."""

from __future__ import annotations

import json
import os
import posixpath
import re
import time
from typing import Any

OFF_SWITCH = "MATEKD_TRACKING=off (or tracking.enabled: false in params.yaml)"

# MLflow's limits (mlflow.utils.validation, 3.x), mirrored so the offline tracker refuses what
# the store would refuse instead of writing a record that cannot be synced.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_DATASET_DIGEST_SIZE = 36
IMAGE_KEY = re.compile(r"^[a-zA-Z0-9_\-./ ]+$")  # mlflow.MlflowClient.log_image's rule for keys
DATASET_CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT
RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


def now_ms() -> int:
    """Wall-clock milliseconds: every timestamp the trackers record (tests replace it)."""
    return int(time.time() * 1000)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch.export and MLflow write pages)."""
    return (str(exc).strip().splitlines() or [""])[0]


def name_problem(kind: str, name: Any) -> str | None:
    """Why MLflow would refuse `name` as a metric, param or tag key (None when it is valid).
    Uses MLflow's own validators when mlflow is installed, else the same rules."""
    if not isinstance(name, str) or not name:
        return f"{kind} key {name!r} is not a non-empty string"
    try:
        from .mlflow_private import mlflow_name_problem

        problem = mlflow_name_problem(kind, name)
    except ImportError:
        if not re.match(r"^[/\w.\- :]*$", name):
            return (f"{kind} key {name!r} may only contain alphanumerics, underscores, dashes, periods, "
                    "spaces, colons and slashes")
        norm = posixpath.normpath(name)
        if norm != name or norm == "." or norm.startswith("..") or norm.startswith("/"):
            return f"{kind} key {name!r} would resolve to another path ({norm!r})"
    else:
        if problem:
            return problem
    if len(name) > MAX_KEY_LENGTH:
        return f"{kind} key {name[:40]!r}... is longer than {MAX_KEY_LENGTH} characters"
    return None


def metric_dataset(dataset: tuple[str, str] | None) -> tuple[str | None, str | None]:
    """(name, digest) of a metric's dataset, the digest cut as MLflow stores a dataset input's
    (so the metric names the same dataset as the run's input); (None, None) without one."""
    if dataset is None:
        return None, None
    name, digest = dataset
    return str(name), str(digest)[:MAX_DATASET_DIGEST_SIZE]


def dataset_record(name: str, digest: str, source: str, context: str = "training", *, source_type: str = "local",
                   schema: str | None = None, profile: str | None = None,
                   tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """A dataset input as plain data (what the offline tracker stores). The source is stored
    the way MLflow's file-system sources serialise themselves (`{"uri": ...}`); MLflow keeps 36
    characters of the digest, so a longer one is also kept whole in the input tag `digest`."""
    input_tags = {DATASET_CONTEXT_TAG: context, **{k: str(v) for k, v in (tags or {}).items()}}
    if len(str(digest)) > MAX_DATASET_DIGEST_SIZE:
        input_tags.setdefault("digest", str(digest))
    source_json = source if str(source).lstrip().startswith("{") else json.dumps({"uri": str(source)})
    return {"name": str(name), "digest": str(digest)[:MAX_DATASET_DIGEST_SIZE], "source_type": source_type,
            "source": source_json, "schema": schema, "profile": profile, "tags": input_tags}


class NullRun:
    """The run interface, doing nothing: what a stage gets when tracking is off.

    MlflowRun (online) and OfflineRun (a folder that `sync_runs` imports later) implement it."""

    run_id: str | None = None
    active = False
    mode = "off"   # the tracking mode (tracking_mode) whose ids run_id is one of

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, *, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """Metrics of the run; with `model_id` (what log_model returned, this run's or another's
        of the same mode) also of that logged model (MLflow 3's model metrics: the model's page
        and `search_logged_models` show them), measured on `dataset` = (name, digest) when given
        (the digest as log_input records it)."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict(self, obj: Any, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_image(self, image: Any, key: str, step: int) -> None:
        """A stepped image (MLflow's image card: `images/<key>+step+<step>+timestamp+...`).

        MLflow's UI (3.17) opens every image card on step 0 (its card config's default) and
        moves it only when the runs shown have images at one single step; the slider's marks
        are the image steps of the card's keys, independent of metric steps. So a series that
        starts at step 1 opens on "No image logged at this step": log the first image at step 0.
        The card's caption per run is the run name and, unless "Show run parameters" is switched
        off in the card's settings, every param of the run as `key=value`."""

    def log_input(self, name: str, digest: str, source: str, context: str = "training", *,
                  source_type: str = "local", schema: str | None = None, profile: str | None = None,
                  tags: dict[str, Any] | None = None) -> None:
        """Record a dataset the run read (MLflow's run inputs: the UI's Datasets column)."""

    def log_model(self, model: Any, *, name: str, input_example: Any, registered_name: str | None = None,
                  builder: Any = None) -> str | None:
        """Log a trained torch model as an MLflow model of this run: exported with torch.export
        (MLflow's pickle-free `pt2` format), with a tensor signature taken from `input_example`
        (float array or tensor, batch >= 2; the batch dimension stays free) and the model's output
        on it, the example itself, and, with `registered_name`, a new version of that registered
        model. `builder` (a tracking.ModelBuilder, e.g. ModelBuilder("matekd.models:build_model",
        {"name": "resnet20"})) says how to rebuild the architecture: offline runs need it (the
        weights are stored as safetensors and the model is rebuilt and exported at sync); online
        it is checked and recorded as a tag. Never ends the run; a failure warns and training
        goes on. Returns the logged model's id (offline: its offline id, which sync maps), None
        when nothing was logged."""
        return None

    def log_model_input(self, model_id: str) -> None:
        """Record a logged model (log_model's return value, of a run of the same mode) as an input
        of this run: an evaluation run lists the model it evaluated, the model lists the run."""

    def set_model_alias(self, model_id: str, alias: str) -> None:
        """Point `alias` of the registered model that `model_id` (log_model's return value, of a
        run of the same mode) was registered as at that version (`models:/<name>@<alias>`)."""

    def finish(self, status: str = "FINISHED") -> None: ...


__all__ = ["OFF_SWITCH", "NullRun", "dataset_record", "first_line", "metric_dataset", "name_problem", "now_ms"]
