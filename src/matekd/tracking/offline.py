"""The offline tracker: each run is a folder that `sync_runs` imports into MLflow later (works
without mlflow: the GPU machine), and the reading and checking of such folders. A folder is
built as `.<id>.tmp` and renamed into place; a truncated or unparsable file, a record without its
fields, a listed file missing or changed is corruption, refused naming the file."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MatekdError, TrackingError
from ..storage import atomic_dir, atomic_path, save_tensors, sha256_file
from . import interface
from .interface import OFF_SWITCH, NullRun, dataset_record, first_line, metric_dataset, name_problem
from .lifecycle import (
    STALE_TAG,
    host_identity,
    owned_by_dead_process,
    owned_by_live_process,
    process_identity,
    stale_note,
)
from .models import (
    ModelBuilder,
    ModelRequest,
    ModelRequestError,
    example_output,
    rebuild,
    request_problems,
    state_dict_of,
)

# `<offline_dir>/<run id>/` (a uuid4 hex, like MLflow's run ids) holds:
#   run.json         the run (format, run_id, experiment, run_name, parent_run_id, status, start_time,
#                    end_time, tags, params, inputs, host, pid; models, aliases, model_inputs), replaced
#                    atomically on every change
#   metrics.jsonl    append-only {key, value, step, timestamp[, model_id, dataset_name, dataset_digest]}
#   artifacts.jsonl  append-only {path, size, sha256} of artifacts/<path>
#   images.jsonl     append-only {key, step, timestamp, file} of images/ (.npy arrays, .png PIL images)
#   models/<id>/     weights.safetensors and input_example.npy of a logged model (sync rebuilds it)
FORMAT = "matekd-offline-run/1"
FORMAT_WITH_MODELS = "matekd-offline-run/2"  # /1 plus `models` in run.json: an older matekd refuses it
FORMATS = (FORMAT, FORMAT_WITH_MODELS)
RUN_FILE, METRICS_FILE, ARTIFACTS_FILE, IMAGES_FILE = "run.json", "metrics.jsonl", "artifacts.jsonl", "images.jsonl"


class OfflineRunError(MatekdError):
    """An offline run folder is corrupt or incomplete (the message names the file)."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Replace `path` by `obj` as JSON, synced to disk first (a power loss keeps the old or the
    new record, never a torn one). Raises MatekdError naming the file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _safe_artifact_path(path: str) -> str | None:
    """A normalised relative posix path, or None when it would leave the artifact folder."""
    if not path or "\\" in path or path.startswith("/"):
        return None
    norm = posixpath.normpath(path)  # leaves ".." only at the start
    if norm == "." or norm.split("/", 1)[0] == "..":
        return None
    return norm


class OfflineRun(NullRun):
    """A run recorded in a folder; same interface as MlflowRun. A failed write warns and
    training goes on, as for the online tracker."""

    active = True
    mode = "offline"

    def __init__(self, folder: Path, record: dict[str, Any]):
        self.folder = folder
        self.record = record
        self.run_id = record["run_id"]
        self._lock = threading.Lock()
        self._metrics_file = None

    # ---- opening

    @classmethod
    def create(cls, root: str | os.PathLike, *, experiment: str, run_name: str, tags: dict[str, Any],
               parent_run_id: str | None = None) -> OfflineRun:
        root = Path(root)
        run_id = new_run_id()
        record = {"format": FORMAT, "run_id": run_id, "experiment": experiment, "run_name": run_name,
                  "parent_run_id": parent_run_id, "status": "RUNNING", "start_time": interface.now_ms(),
                  "end_time": None, "tags": {str(k): str(v) for k, v in tags.items()}, "params": {},
                  "inputs": [], "host": host_identity(), "pid": os.getpid()}
        try:
            with atomic_dir(root / run_id) as staging:
                for name in (METRICS_FILE, ARTIFACTS_FILE, IMAGES_FILE):
                    (staging / name).touch()
                _write_json_atomic(staging / RUN_FILE, record)
        except MatekdError as exc:
            raise TrackingError(f"cannot create an offline run in {root} ({exc}); "
                                f"point MATEKD_OFFLINE_DIR elsewhere or run with {OFF_SWITCH}") from exc
        return cls(root / run_id, record)

    @classmethod
    def reopen(cls, root: str | os.PathLike, run_id: str) -> OfflineRun | None:
        """The offline run `run_id` marked RUNNING again and owned by this process (None when the
        folder has no such run)."""
        folder = Path(root) / run_id
        try:
            record = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        run = cls(folder, record)
        run.record.update(status="RUNNING", end_time=None, host=host_identity(), pid=os.getpid())
        run.record["tags"].update(process_identity())
        run._save_record("reopen")
        return run

    # ---- helpers

    def _warn(self, what: str, why: Any) -> None:
        warnings.warn(f"offline tracking: {what} failed ({why}); training goes on", stacklevel=3)

    def _save_record(self, what: str) -> bool:
        try:
            _write_json_atomic(self.folder / RUN_FILE, self.record)
            return True
        except MatekdError as exc:
            self._warn(what, exc)
            return False

    def _append_lines(self, name: str, lines: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
        if name == METRICS_FILE:
            if self._metrics_file is None:
                self._metrics_file = open(self.folder / METRICS_FILE, "a", encoding="utf-8")
            self._metrics_file.write(text)
            self._metrics_file.flush()
        else:
            with open(self.folder / name, "a", encoding="utf-8") as handle:
                handle.write(text)

    @contextlib.contextmanager
    def _new_artifact(self, what: str, artifact_file: str) -> Iterator[Path | None]:
        """Yield a temporary path named like the artifact; on success move it to
        artifacts/<artifact_file> and list it in artifacts.jsonl."""
        rel = _safe_artifact_path(artifact_file)
        if rel is None:
            self._warn(what, f"artifact path {artifact_file!r} leaves the run's artifact folder")
            yield None
            return
        with self._lock:
            try:
                staging = Path(tempfile.mkdtemp(prefix=".artifact.", dir=self.folder))
            except OSError as exc:
                self._warn(what, exc.strerror or exc)
                yield None
                return
            try:
                tmp = staging / posixpath.basename(rel)
                yield tmp
                if not tmp.is_file():
                    return
                target = self.folder / "artifacts" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                size, digest = tmp.stat().st_size, sha256_file(tmp)
                os.replace(tmp, target)
                self._append_lines(ARTIFACTS_FILE, [{"path": rel, "size": size, "sha256": digest}])
            except Exception as exc:  # a figure type, a serialisation, the disk: warn and go on
                self._warn(what, getattr(exc, "strerror", None) or exc)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    # ---- the run interface

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, *, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        now = interface.now_ms()
        dataset_name, dataset_digest = metric_dataset(dataset)
        # The links are written only when present: a plain metric's line stays as before.
        links = {key: value for key, value in (("model_id", model_id), ("dataset_name", dataset_name),
                                               ("dataset_digest", dataset_digest)) if value is not None}
        try:
            lines = [{"key": key, "value": float(value), "step": int(step or 0), "timestamp": now, **links}
                     for key, value in metrics.items()]
        except (TypeError, ValueError) as exc:
            self._warn("log_metrics", exc)
            return
        problems = [p for p in (name_problem("metric", line["key"]) for line in lines) if p]
        if problems:  # MLflow refuses the whole batch: so do we
            self._warn("log_metrics", "; ".join(problems))
            return
        with self._lock:
            try:
                self._append_lines(METRICS_FILE, lines)
            except OSError as exc:
                self._warn("log_metrics", exc.strerror or exc)

    def log_params(self, params: dict[str, Any]) -> None:
        values = {str(k): str(v)[:interface.MAX_PARAM_VALUE_LENGTH] for k, v in params.items()}
        problems = [p for p in (name_problem("param", k) for k in values) if p]
        known = self.record["params"]
        problems += [f"param {k!r} was already logged as {known[k]!r}, not {v!r} (params are immutable)"
                     for k, v in values.items() if k in known and known[k] != v]
        if problems:
            self._warn("log_params", "; ".join(problems))
            return
        with self._lock:
            known.update(values)
            self._save_record("log_params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        values = {str(k): str(v)[:interface.MAX_TAG_VALUE_LENGTH] for k, v in tags.items()}
        problems = [p for p in (name_problem("tag", k) for k in values) if p]
        if problems:
            self._warn("set_tags", "; ".join(problems))
            return
        with self._lock:
            self.record["tags"].update(values)
            self._save_record("set_tags")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        source = Path(path)
        if not source.is_file():
            return  # as MlflowRun: a missing file is skipped
        name = f"{artifact_path.strip('/')}/{source.name}" if artifact_path else source.name
        with self._new_artifact(f"log_artifact {path}", name) as tmp:
            if tmp is not None:
                shutil.copyfile(source, tmp)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        folder = Path(local_dir)
        if not folder.is_dir():
            return
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = file.relative_to(folder).as_posix()
            name = f"{artifact_path.strip('/')}/{rel}" if artifact_path else rel
            with self._new_artifact(f"log_artifacts {local_dir}", name) as tmp:
                if tmp is not None:
                    shutil.copyfile(file, tmp)

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._new_artifact(f"log_text {artifact_file}", artifact_file) as tmp:
            if tmp is not None:
                tmp.write_text(text, encoding="utf-8")

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """As MlflowClient.log_dict: YAML for .yml/.yaml, else JSON (indent 2, str() for the rest)."""
        with self._new_artifact(f"log_dict {artifact_file}", artifact_file) as tmp:
            if tmp is None:
                return
            with open(tmp, "w") as handle:
                if posixpath.splitext(artifact_file)[1] in (".yml", ".yaml"):
                    import yaml

                    yaml.dump(obj, handle, indent=2, default_flow_style=False)
                else:
                    json.dump(obj, handle, indent=2, default=str)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """As MlflowClient.log_figure: a matplotlib figure saved by savefig (format from the
        extension), a plotly figure as HTML or an image."""
        import sys

        with self._new_artifact(f"log_figure {artifact_file}", artifact_file) as tmp:
            if tmp is None:
                return
            if "matplotlib" in sys.modules and _is_matplotlib_figure(figure):
                figure.savefig(tmp)
            elif "plotly" in sys.modules and _is_plotly_figure(figure):
                if tmp.suffix == ".html":
                    figure.write_html(tmp, include_plotlyjs="cdn", auto_open=False)
                else:
                    figure.write_image(tmp)
            else:
                raise TypeError(f"Unsupported figure object type: '{type(figure)}'")

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A stepped image (the UI's image slider after sync): kept as given, numpy arrays as
        .npy and PIL images as lossless PNG, and replayed through MlflowClient.log_image."""
        now = interface.now_ms()
        if not isinstance(key, str) or not interface.IMAGE_KEY.match(key):
            self._warn(f"log_image {key}", "the key may only contain alphanumerics, _, -, ., spaces and /")
            return
        writer = _image_writer(image)
        if writer is None:
            self._warn(f"log_image {key}", f"unsupported image type {type(image).__name__}")
            return
        suffix, write = writer
        with self._lock:
            name = f"images/{uuid.uuid4().hex}{suffix}"
            try:
                with atomic_path(self.folder / name) as tmp, open(tmp, "wb") as handle:
                    write(handle)
                self._append_lines(IMAGES_FILE, [{"key": key, "step": int(step or 0), "timestamp": now, "file": name}])
            except (OSError, ValueError, TypeError, MatekdError) as exc:
                self._warn(f"log_image {key}", getattr(exc, "strerror", None) or exc)

    def log_input(self, name: str, digest: str, source: str, context: str = "training", *,
                  source_type: str = "local", schema: str | None = None, profile: str | None = None,
                  tags: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.record["inputs"].append(dataset_record(name, digest, source, context, source_type=source_type,
                                                        schema=schema, profile=profile, tags=tags))
            self._save_record(f"log_input {name}")

    def log_model(self, model: Any, *, name: str, input_example: Any, registered_name: str | None = None,
                  builder: Any = None) -> str | None:
        """Record the model for sync: its state dict as safetensors, the input example as .npy,
        its builder, name and registered name. The builder is checked now (the weights must
        load into the model it builds, whose output on the example must be one tensor), so
        that a run does not record a model that sync cannot rebuild."""
        try:
            request = ModelRequest.check(name, registered_name, builder, input_example)
            if request.builder is None:
                raise ModelRequestError("an offline run needs builder= (e.g. ModelBuilder('matekd.models:build_model',"
                                        " {'name': 'resnet20'})) to rebuild the model when it is synced")
            state = state_dict_of(model)
            example_output(rebuild(request.builder, state), request.example)
        except Exception as exc:
            self._warn(f"log_model {name}", f"{type(exc).__name__}: {first_line(exc)}")
            return None
        import numpy as np

        model_id = new_run_id()
        with self._lock:
            try:
                with atomic_dir(self.folder / "models" / model_id) as staging:
                    save_tensors(staging / "weights.safetensors", state,
                                 metadata={"builder": json.dumps(request.builder.to_json(), sort_keys=True)})
                    with open(staging / "input_example.npy", "wb") as handle:
                        np.save(handle, request.example, allow_pickle=False)
                    files = {key: {"path": f"models/{model_id}/{file_name}",
                                   "size": (staging / file_name).stat().st_size,
                                   "sha256": sha256_file(staging / file_name)}
                             for key, file_name in (("weights", "weights.safetensors"),
                                                    ("input_example", "input_example.npy"))}
            except Exception as exc:
                self._warn(f"log_model {name}", getattr(exc, "strerror", None) or exc)
                return None
            self.record.setdefault("models", []).append(
                {"name": request.name, "registered_name": request.registered_name,
                 "builder": request.builder.to_json(), **files})
            self.record["format"] = FORMAT_WITH_MODELS
            self._save_record(f"log_model {name}")
        return model_id

    def log_model_input(self, model_id: str) -> None:
        """Recorded in run.json's `model_inputs`; sync maps the id and logs it."""
        with self._lock:
            self.record.setdefault("model_inputs", []).append(str(model_id))
            self._save_record(f"log_model_input {model_id}")

    def set_model_alias(self, model_id: str, alias: str) -> None:
        """Recorded in run.json's `aliases`; sync sets it once the model is imported."""
        with self._lock:
            self.record.setdefault("aliases", []).append({"model_id": str(model_id), "alias": str(alias)})
            self._save_record(f"alias {alias}")

    def finish(self, status: str = "FINISHED") -> None:
        with self._lock:
            self.record["status"] = status
            self.record["end_time"] = interface.now_ms()
            if self._metrics_file is not None:
                with contextlib.suppress(OSError):
                    self._metrics_file.close()
                self._metrics_file = None
            self._save_record("finish")


def _is_matplotlib_figure(figure: Any) -> bool:
    import matplotlib.figure

    return isinstance(figure, matplotlib.figure.Figure)


def _is_plotly_figure(figure: Any) -> bool:
    import plotly

    return isinstance(figure, plotly.graph_objects.Figure)


def _image_writer(image: Any) -> tuple[str, Callable[[Any], None]] | None:
    """(suffix, write(binary handle)) for the image types MlflowClient.log_image accepts."""
    import numpy as np

    if isinstance(image, np.ndarray):
        return ".npy", lambda handle: np.save(handle, image, allow_pickle=False)
    if hasattr(image, "to_pil") and type(image).__module__.startswith("mlflow"):
        image = image.to_pil()
    try:
        import PIL.Image
    except ImportError:
        return None
    if isinstance(image, PIL.Image.Image):
        return ".png", lambda handle: image.save(handle, format="PNG")
    return None


def load_image(path: Path) -> Any:
    """An image file of an offline run as MlflowClient.log_image takes it."""
    if path.suffix == ".npy":
        import numpy as np

        return np.load(path, allow_pickle=False)
    import PIL.Image

    with PIL.Image.open(path) as image:
        image.load()
        return image.copy()


def close_stale_offline_runs(root: Path, experiment: str, stage: str) -> list[str]:
    """As online: mark FAILED the offline runs of `stage` that a dead process of this host left
    RUNNING (end time: the last write to the run's folder)."""
    closed: list[str] = []
    if not root.is_dir():
        return closed
    for folder in sorted(root.iterdir()):
        run_file = folder / RUN_FILE
        if folder.name.startswith(".") or not run_file.is_file():
            continue
        try:
            record = json.loads(run_file.read_text(encoding="utf-8"))
            tags = record.get("tags", {})
            if (record.get("status") != "RUNNING" or record.get("experiment") != experiment
                    or tags.get("stage") != stage or not owned_by_dead_process(tags)):
                continue
            last = max((p.stat().st_mtime for p in folder.iterdir() if p.is_file()), default=0)
            record["status"] = "FAILED"
            record["end_time"] = max(int(last * 1000), int(record.get("start_time") or 0))
            tags[STALE_TAG] = stale_note(tags, stage)
            _write_json_atomic(run_file, record)
            closed.append(folder.name)
        except (OSError, ValueError, AttributeError, TypeError, MatekdError):
            continue  # sync reports a damaged folder; starting a stage must not fail on it
    return closed


# ---------------------------------------------------------------------------------------------
# reading and checking a folder of offline runs (sync)

@dataclass
class OfflineRecord:
    """One offline run, read and checked."""

    run_id: str
    folder: Path
    meta: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> last record
    images: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_activity(self) -> int:
        stamps = [m["timestamp"] for m in self.metrics] + [i["timestamp"] for i in self.images]
        return max([int(self.meta["start_time"]), *stamps])

    @property
    def process_alive_here(self) -> bool:
        """Still RUNNING and its process is alive on this host (a run in progress)."""
        return self.meta["status"] == "RUNNING" and owned_by_live_process(self.meta.get("tags", {}))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_jsonl(path: Path, check: Callable[[dict[str, Any]], str | None]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise OfflineRunError(f"{path}: missing (the run folder is incomplete)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OfflineRunError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if data and not data.endswith(b"\n"):
        raise OfflineRunError(f"{path}: the last line is truncated (no newline at the end)")
    lines = []
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            item = json.loads(raw)
        except ValueError as exc:
            raise OfflineRunError(f"{path}, line {number}: not valid JSON ({exc})") from None
        problem = check(item) if isinstance(item, dict) else "not a JSON object"
        if problem:
            raise OfflineRunError(f"{path}, line {number}: {problem}")
        lines.append(item)
    return lines


def _check_metric(item: dict[str, Any]) -> str | None:
    for name in ("key", "value", "step", "timestamp"):
        if name not in item:
            return f"metric record without {name!r}"
    if not _is_int(item["step"]) or not _is_int(item["timestamp"]):
        return "metric step and timestamp must be integers"
    if not isinstance(item["value"], (int, float)) or isinstance(item["value"], bool):
        return f"metric value {item['value']!r} is not a number"
    links = [item.get(k) for k in ("model_id", "dataset_name", "dataset_digest")]
    if any(v is not None and not isinstance(v, str) for v in links) or (links[1] is None) != (links[2] is None):
        return "metric model_id, dataset_name and dataset_digest must be strings (name and digest together)"
    return name_problem("metric", item["key"])


def _check_artifact(item: dict[str, Any]) -> str | None:
    if not isinstance(item.get("path"), str) or _safe_artifact_path(item["path"]) != item["path"]:
        return f"artifact path {item.get('path')!r} is missing or leaves the artifact folder"
    if not _is_int(item.get("size")) or not isinstance(item.get("sha256"), str):
        return "artifact record without size or sha256"
    return None


def _check_image(item: dict[str, Any]) -> str | None:
    if not isinstance(item.get("key"), str) or not interface.IMAGE_KEY.match(item["key"]):
        return f"image key {item.get('key')!r} is missing or invalid"
    if not _is_int(item.get("step")) or not _is_int(item.get("timestamp")):
        return "image record without an integer step and timestamp"
    file = item.get("file")
    if not isinstance(file, str) or _safe_artifact_path(file) != file or not file.startswith("images/"):
        return f"image file {file!r} is missing or outside images/"
    return None


def _check_meta(meta: Any, folder: Path) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") not in FORMATS:
        return (f"unknown format {meta.get('format')!r} (expected {' or '.join(map(repr, FORMATS))}; "
                "a newer matekd wrote it? upgrade matekd to sync it)")
    if meta.get("run_id") != folder.name:
        return f"run_id {meta.get('run_id')!r} does not match the folder name"
    for name in ("experiment", "run_name"):
        if not isinstance(meta.get(name), str) or not meta[name]:
            return f"{name!r} is missing"
    if meta.get("status") not in interface.RUN_STATUSES:
        return f"status {meta.get('status')!r} is not one of {', '.join(interface.RUN_STATUSES)}"
    if not _is_int(meta.get("start_time")):
        return "start_time is missing"
    if meta.get("end_time") is not None and not _is_int(meta["end_time"]):
        return "end_time is not an integer"
    if meta["status"] not in ("RUNNING", "SCHEDULED") and meta.get("end_time") is None:
        return f"status {meta['status']} without an end_time"
    parent = meta.get("parent_run_id")
    if parent is not None and (not isinstance(parent, str) or not parent):
        return "parent_run_id is not a string"
    for name in ("tags", "params"):
        value = meta.get(name)
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return f"{name!r} must map strings to strings"
    for key in meta["tags"]:
        if problem := name_problem("tag", key):
            return problem
    for key in meta["params"]:
        if problem := name_problem("param", key):
            return problem
    inputs = meta.get("inputs")
    if not isinstance(inputs, list):
        return "'inputs' must be a list"
    for item in inputs:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in
                                                 ("name", "digest", "source_type", "source")):
            return f"dataset input {item!r} lacks name, digest, source_type or source"
        if not isinstance(item.get("tags", {}), dict):
            return f"dataset input {item.get('name')!r}: tags must be a mapping"
    model_inputs = meta.get("model_inputs", [])
    if not isinstance(model_inputs, list) or not all(isinstance(m, str) for m in model_inputs):
        return "'model_inputs' must be a list of model ids"
    aliases = meta.get("aliases", [])
    if not isinstance(aliases, list) or not all(
            isinstance(a, dict) and isinstance(a.get("model_id"), str) and isinstance(a.get("alias"), str)
            for a in aliases):
        return "'aliases' must be a list of {model_id, alias}"
    models = meta.get("models", [])
    if not isinstance(models, list) or (models and meta["format"] != FORMAT_WITH_MODELS):
        return f"'models' must be a list, in format {FORMAT_WITH_MODELS!r}"
    for item in models:
        if problem := _check_model(item):
            return problem
    return None


def _check_model(item: Any) -> str | None:
    if not isinstance(item, dict):
        return f"model record {item!r} is not a mapping"
    name = item.get("name")
    for key in ("weights", "input_example"):
        file = item.get(key)
        if (not isinstance(file, dict) or not isinstance(file.get("path"), str)
                or _safe_artifact_path(file["path"]) != file["path"] or not file["path"].startswith("models/")
                or not _is_int(file.get("size")) or not isinstance(file.get("sha256"), str)):
            return f"model {name!r}: {key} must be {{path under models/, size, sha256}}"
    try:
        builder = ModelBuilder.from_json(item.get("builder"))
    except ModelRequestError as exc:
        return f"model {name!r}: {exc}"
    problems = request_problems(name, item.get("registered_name"), builder)
    return f"model {name!r}: {'; '.join(problems)}" if problems else None


def _differs_from_record(file: Path, entry: dict[str, Any]) -> bool:
    """Whether `file` lacks the size or sha256 that its record `entry` gives."""
    return file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]


def read_run(folder: Path) -> OfflineRecord:
    """Read and check one run folder; OfflineRunError names the offending file."""
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        raise OfflineRunError(f"{run_file}: missing (not an offline run folder, or an incomplete copy)")
    try:
        meta = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OfflineRunError(f"{run_file}: not valid JSON ({exc})") from None
    if problem := _check_meta(meta, folder):
        raise OfflineRunError(f"{run_file}: {problem}")
    record = OfflineRecord(folder.name, folder, meta)
    record.metrics = _read_jsonl(folder / METRICS_FILE, _check_metric)
    for item in _read_jsonl(folder / ARTIFACTS_FILE, _check_artifact):
        record.artifacts[item["path"]] = item  # a path logged twice: the last copy is on disk
    for path, item in record.artifacts.items():
        file = folder / "artifacts" / path
        if not file.is_file():
            raise OfflineRunError(f"{file}: listed in {folder / ARTIFACTS_FILE} but missing")
        if _differs_from_record(file, item):
            raise OfflineRunError(f"{file}: differs from what {folder / ARTIFACTS_FILE} recorded (size or sha256)")
    record.images = _read_jsonl(folder / IMAGES_FILE, _check_image)
    for item in record.images:
        if not (folder / item["file"]).is_file():
            raise OfflineRunError(f"{folder / item['file']}: listed in {folder / IMAGES_FILE} but missing")
    record.models = list(meta.get("models", []))
    for item in record.models:
        for key in ("weights", "input_example"):
            file = folder / item[key]["path"]
            if not file.is_file():
                raise OfflineRunError(f"{file}: the {key} of model {item['name']!r} in {run_file} is missing")
            if _differs_from_record(file, item[key]):
                raise OfflineRunError(f"{file}: the {key} of model {item['name']!r} differs from what {run_file} "
                                      "recorded (size or sha256)")
    return record


def read_folder(root: str | os.PathLike) -> dict[str, OfflineRecord]:
    """Every run of an offline folder, checked (not against a store: see sync.sync_runs)."""
    root = Path(root)
    if not root.is_dir():
        raise OfflineRunError(f"{root}: no such folder of offline runs")
    records: dict[str, OfflineRecord] = {}
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue  # temp folders of runs being created, and stray files
        records[folder.name] = read_run(folder)
    for record in records.values():  # cycles among parents would never import
        seen, parent = {record.run_id}, record.meta.get("parent_run_id")
        while parent in records:
            if parent in seen:
                raise OfflineRunError(f"{record.folder / RUN_FILE}: its parent chain loops back to {parent}")
            seen.add(parent)
            parent = records[parent].meta.get("parent_run_id")
    return records


def parents_first(records: dict[str, OfflineRecord]) -> list[OfflineRecord]:
    """Runs ordered so that every parent in the folder comes before its children."""
    ordered: list[OfflineRecord] = []
    placed: set[str] = set()

    def place(record: OfflineRecord) -> None:
        if record.run_id in placed:
            return
        parent = record.meta.get("parent_run_id")
        if parent in records:
            place(records[parent])
        placed.add(record.run_id)
        ordered.append(record)

    for record in sorted(records.values(), key=lambda r: (r.meta["start_time"], r.run_id)):
        place(record)
    return ordered

