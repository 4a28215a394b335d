"""Import a folder of offline runs into an MLflow store (`matekd sync-runs DIR`), with MLflow's
client API, keeping names, steps, timestamps, statuses and the links between runs and models."""

from __future__ import annotations

import json
import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MatekdError, TrackingError
from . import roots
from .lifecycle import owned_by_live_process, process_identity
from .mlflow_private import relocate_store
from .mlflow_store import client_for, dataset_input, delete_runs, experiment_id, log_in_batches
from .models import ModelBuilder, ModelExportError, ModelRequestError, load_offline_model, log_to_store, set_alias
from .offline import RUN_FILE, OfflineRecord, OfflineRunError, load_image, parents_first, read_folder

OFFLINE_ID_TAG = "matekd.offline_run_id"
IMPORTING_TAG = "matekd.sync_importing"
SYNC_NOTE_TAG = "matekd.sync_note"
# Tags whose value is another run's id: an offline id there becomes the imported run's MLflow id
# (runs are imported in start order, so a training run comes before the evaluation naming it).
RUN_LINK_TAGS = ("training_run_id",)
MODEL_LINK_TAGS = ("logged_model_id",)   # likewise for a logged model's id


@dataclass
class SyncSummary:
    folder: Path
    tracking_uri: str
    imported: dict[str, str] = field(default_factory=dict)          # offline id -> new MLflow run id
    already_present: dict[str, str] = field(default_factory=dict)   # offline id -> existing MLflow run id
    still_running: list[str] = field(default_factory=list)          # skipped: process alive here (or a parent's)
    running_as_failed: list[str] = field(default_factory=list)      # imported as FAILED (process gone)
    replaced_partial: list[str] = field(default_factory=list)       # MLflow runs of an interrupted sync, removed
    models: list[str] = field(default_factory=list)                 # "<name> of run <offline id>[ -> <registered> vN]"
    models_failed: list[str] = field(default_factory=list)          # why a recorded model could not be exported
    unlinked: list[str] = field(default_factory=list)               # model links whose model this sync lacks
    aliases: list[str] = field(default_factory=list)                # "<registered name>@<alias> -> v<version>"

    def __str__(self) -> str:
        parts = [f"{len(self.imported)} runs imported", f"{len(self.already_present)} already present"]
        if self.still_running:
            parts.append(f"{len(self.still_running)} still running (skipped; sync again when they end)")
        if self.running_as_failed:
            parts.append(f"{len(self.running_as_failed)} left RUNNING by a dead process, imported as FAILED")
        if self.replaced_partial:
            parts.append(f"{len(self.replaced_partial)} partial imports of an interrupted sync redone")
        if self.models:
            parts.append(f"{len(self.models)} models logged")
        if self.models_failed:
            parts.append(f"{len(self.models_failed)} models could not be exported (see the warnings)")
        if self.unlinked:
            parts.append(f"{len(self.unlinked)} model metrics, inputs or aliases without their model (not "
                         "in this sync)")
        if self.aliases:
            parts.append(f"{len(self.aliases)} aliases set")
        return f"{self.folder} -> {self.tracking_uri}: " + ", ".join(parts)


def _imported_runs(client: Any) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Runs of the store that came from offline runs: ({offline id: run id} of complete
    imports, [(offline id, run id, importing tag)] of imports a sync did not finish)."""
    from mlflow.entities import ViewType

    experiments, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        experiments += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    complete: dict[str, str] = {}
    partial: list[tuple[str, str, str]] = []
    for start in range(0, len(experiments), 100):
        token = None
        while True:
            page = client.search_runs(experiments[start:start + 100], filter_string=f"tags.`{OFFLINE_ID_TAG}` LIKE '%'",
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=10000, page_token=token)
            for run in page:
                tags = run.data.tags
                if IMPORTING_TAG in tags:
                    partial.append((tags[OFFLINE_ID_TAG], run.info.run_id, tags[IMPORTING_TAG]))
                else:
                    complete.setdefault(tags[OFFLINE_ID_TAG], run.info.run_id)
            token = page.token
            if not token:
                break
    return complete, partial


def _active_run_exists(client: Any, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


def _importing_sync_alive(tag: str) -> bool:
    try:
        owner = json.loads(tag)
    except ValueError:
        return False
    return owned_by_live_process(owner)


def _call_once(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)  # sync does not retry: a failure rolls the sync back


def offline_model_id(entry: dict[str, Any]) -> str:
    """The offline id of a recorded model (its folder, models/<id>/, as log_model returned it)."""
    return entry["weights"]["path"].split("/")[1]


def _import_models(client: Any, run_id: str, record: OfflineRecord, summary: SyncSummary,
                   models: dict[str, str]) -> None:
    for entry in record.models:
        try:
            model, request = load_offline_model(record.folder, entry)
        except ModelRequestError as exc:
            raise OfflineRunError(str(exc)) from exc
        label = f"{request.name} of run {record.run_id}"
        try:
            result = log_to_store(client, run_id, model, request, _call_once)
        except ModelExportError as exc:
            warnings.warn(f"sync: {label} was not logged: {exc}", stacklevel=3)
            summary.models_failed.append(f"{label}: {exc}")
            continue
        models[offline_model_id(entry)] = result.model_id
        if result.registered_version:
            label += f" -> {request.registered_name} v{result.registered_version}"
        summary.models.append(label)


def _metric_entity(line: dict[str, Any], models: dict[str, str], summary: SyncSummary, record: OfflineRecord):
    """An offline metric line as an MLflow Metric, its model link mapped to the synced model (a
    model this sync did not import, e.g. one synced earlier, leaves the metric unlinked)."""
    from mlflow.entities import Metric

    model_id = line.get("model_id")
    if model_id is not None and model_id not in models:
        summary.unlinked.append(f"{line['key']} of run {record.run_id} (model {model_id})")
    return Metric(line["key"], float(line["value"]), line["timestamp"], line["step"], model_id=models.get(model_id),
                  dataset_name=line.get("dataset_name"), dataset_digest=line.get("dataset_digest"))


def _import_run(client: Any, uri: str, record: OfflineRecord, parent: str | None, experiments: dict[str, str],
                note: str | None, summary: SyncSummary, mapping: dict[str, str], models: dict[str, str]) -> str:
    from mlflow.entities import Param

    meta = record.meta
    name = meta["experiment"]
    if name not in experiments:
        experiments[name] = experiment_id(client, name, uri)
    tags = dict(meta["tags"])
    tags[OFFLINE_ID_TAG] = record.run_id
    tags[IMPORTING_TAG] = json.dumps(process_identity(), sort_keys=True)
    for keys, ids in ((RUN_LINK_TAGS, mapping), (MODEL_LINK_TAGS, models)):
        for key in keys:
            if tags.get(key) in ids:
                tags[key] = ids[tags[key]]
    if parent:
        tags["mlflow.parentRunId"] = parent
    status, end_time = meta["status"], meta["end_time"]
    if note:
        tags[SYNC_NOTE_TAG] = note
        status, end_time = "FAILED", record.last_activity
    run_id = client.create_run(experiments[name], start_time=meta["start_time"], tags=tags,
                               run_name=meta["run_name"]).info.run_id
    try:
        log_in_batches(_call_once, "log_params", client, run_id, "params",
                       [Param(k, v) for k, v in meta["params"].items()])
        if meta["inputs"]:
            client.log_inputs(run_id, datasets=[dataset_input(item) for item in meta["inputs"]])
        for path in sorted(record.artifacts):
            client.log_artifact(run_id, str(record.folder / "artifacts" / path), posixpath.dirname(path) or None)
        for image in record.images:
            client.log_image(run_id, load_image(record.folder / image["file"]), key=image["key"], step=image["step"],
                             timestamp=image["timestamp"], synchronous=True)
        _import_models(client, run_id, record, summary, models)
        model_inputs = [models[m] for m in meta.get("model_inputs", []) if m in models]
        summary.unlinked += [f"model input of run {record.run_id} (model {m})"
                                     for m in meta.get("model_inputs", []) if m not in models]
        if model_inputs:
            from mlflow.entities import LoggedModelInput

            client.log_inputs(run_id, models=[LoggedModelInput(m) for m in model_inputs])
        for item in meta.get("aliases", []):
            if item["model_id"] not in models:
                summary.unlinked.append(f"alias {item['alias']} of run {record.run_id} "
                                                f"(model {item['model_id']})")
            elif label := set_alias(client, models[item["model_id"]], item["alias"], _call_once):
                summary.aliases.append(label)
        # After the models: a metric of this run's own model links to it.
        log_in_batches(_call_once, "log_metrics", client, run_id, "metrics",
                       [_metric_entity(m, models, summary, record) for m in record.metrics])
        client.set_terminated(run_id, status, end_time=end_time)
        client.delete_tag(run_id, IMPORTING_TAG)
    except BaseException as exc:
        exc.created_run_id = run_id  # type: ignore[attr-defined]  # for the roll-back
        raise
    return run_id


def sync_runs(folder: str | Path, tracking_uri: str | None = None) -> SyncSummary:
    """Import every offline run of `folder` into the MLflow store at `tracking_uri` (default:
    the store `tracking_uri()` resolves: MLFLOW_TRACKING_URI or `<repo>/mlruns/mlflow.db`), as
    online logging would have recorded it, parents before children; returns what was done.

    - Checked first: the whole folder is read and checked, every parent must be in the folder or
      the store and every model's builder importable, before anything is written; else
      OfflineRunError (a MatekdError) names the file. A model torch.export cannot export is
      reported (`models_failed`) and its run imported without it.
    - Idempotent: an imported run carries `matekd.offline_run_id` and is skipped next time; one
      left half-imported (`matekd.sync_importing`) by a sync that died is removed and redone.
    - All or nothing: when the store fails, the runs this sync created are removed (permanently
      on SQL stores) and TrackingError says so; experiments it created stay (a deleted one's name
      stays taken).
    - A run still RUNNING is skipped, with its children, while its process lives on this host,
      else imported as FAILED (`matekd.sync_note`) ending at its last record.
    - Links are mapped to the new ids: the tags `training_run_id` and `logged_model_id`, model
      metrics, model inputs and aliases; a link to a model not in this sync is counted in
      `unlinked`."""
    folder = Path(folder)
    records = read_folder(folder)  # every local check before the store is contacted
    uri = tracking_uri or roots.tracking_uri()
    if roots.is_default_store(uri):
        relocate_store(uri)
    client = client_for(uri)
    summary = SyncSummary(folder=folder, tracking_uri=uri)
    try:
        present, partial = _imported_runs(client)
    except Exception as exc:
        raise TrackingError(f"MLflow tracking store {uri} is unreachable ({type(exc).__name__}: {exc}); "
                            "start it or point MLFLOW_TRACKING_URI (or --tracking-uri) elsewhere") from exc

    for record in records.values():
        for entry in record.models:
            try:
                ModelBuilder.from_json(entry["builder"]).resolve()
            except ModelRequestError as exc:
                raise OfflineRunError(f"{record.folder / RUN_FILE}: model {entry['name']!r}: {exc}") from None
    for record in records.values():
        parent = record.meta.get("parent_run_id")
        if parent and parent not in records and parent not in present and not _active_run_exists(client, parent):
            raise OfflineRunError(f"{record.folder / RUN_FILE}: parent run {parent} is neither in {folder} "
                                  f"nor in the store {uri}")
    redo = [(offline_id, run_id, owner) for offline_id, run_id, owner in partial if offline_id in records]
    for offline_id, _, owner in redo:
        if _importing_sync_alive(owner):
            raise MatekdError(f"another sync (pid {json.loads(owner).get('matekd.pid')}) is importing offline "
                              f"run {offline_id} into {uri} right now; wait for it to end")

    ordered = parents_first(records)
    deferred: set[str] = set()
    for record in ordered:
        if record.process_alive_here or record.meta.get("parent_run_id") in deferred:
            deferred.add(record.run_id)
    summary.still_running = sorted(deferred)
    summary.already_present = {k: v for k, v in present.items() if k in records}
    todo = [r for r in ordered if r.run_id not in present and r.run_id not in deferred]
    if not todo:
        return summary

    if redo:
        permanent, failed = delete_runs(client, [run_id for _, run_id, _ in redo])
        if failed:
            raise TrackingError(f"could not remove the partial imports {', '.join(failed)} that an interrupted "
                                f"sync left in {uri}; delete them in MLflow and sync again")
        summary.replaced_partial = [run_id for _, run_id, _ in redo]

    mapping = dict(present)
    models: dict[str, str] = {}   # offline model id -> logged model id, filled as runs are imported
    experiments: dict[str, str] = {}
    created: list[str] = []
    current = None
    try:
        for current in todo:
            note = None
            if current.meta["status"] in ("RUNNING", "SCHEDULED"):
                note = (f"recorded offline as {current.meta['status']}, but its process had ended (killed?); "
                        "imported as FAILED with its last record's time as end time")
            parent = current.meta.get("parent_run_id")
            run_id = _import_run(client, uri, current, mapping.get(parent, parent), experiments, note, summary,
                                 mapping, models)
            created.append(run_id)
            mapping[current.run_id] = run_id
            summary.imported[current.run_id] = run_id
            if note:
                summary.running_as_failed.append(current.run_id)
    except BaseException as exc:
        partial_id = getattr(exc, "created_run_id", None)
        if partial_id:
            created.append(partial_id)
        permanent, failed = delete_runs(client, created)
        if not isinstance(exc, Exception):
            raise
        how = ("deleted permanently" if permanent else
               "soft-deleted (this store cannot delete permanently; purge them with "
               f"`mlflow gc --run-ids {','.join(created)}`)")
        left = f"; could not remove {', '.join(failed)}" if failed else ""
        raise TrackingError(f"importing {current.folder if current else folder} into {uri} failed "
                            f"({type(exc).__name__}: {exc}); the {len(created)} runs this sync had created were "
                            f"{how}{left}") from exc
    return summary
