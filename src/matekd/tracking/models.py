"""Trained models as MLflow models, logged the same way online and at sync: a checked request,
the architecture's builder (how to rebuild it without pickle), the `pt2` export (torch.export:
no pickle payload, so a downloaded model loads without running its code; the batch dimension is
free only for an input example with a batch of 2 or more) and the store calls that log and
register it. mlflow is imported only where the store is written."""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MatekdError
from .interface import first_line
from .roots import uri_to_path

LOGGED_MODEL_BAD_CHARS = ("/", ":", ".", "%", '"', "'")  # mlflow.utils.validation._validate_logged_model_name
REGISTERED_MODEL_BAD_CHARS = ("/", ":")                  # mlflow.utils.validation._validate_model_name
BUILDER_TAG, BUILDER_KWARGS_TAG, FORMAT_TAG = "matekd.builder", "matekd.builder_kwargs", "matekd.serialization"
SERIALIZATION = "pt2"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS
_BUILDER_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class ModelRequestError(MatekdError):
    """A log_model call that cannot be honoured (the message says why and how to fix it)."""


@dataclass(frozen=True)
class ModelBuilder:
    """How to rebuild a model's architecture without pickle: a callable named `module:attribute`
    (e.g. `matekd.models:build_model`) and JSON keyword arguments. An offline run records it with
    the weights; `sync_runs` imports the callable, builds the model and loads the weights."""

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: ModelBuilder | str | tuple[str, Mapping[str, Any]] | None) -> ModelBuilder | None:
        if value is None or isinstance(value, ModelBuilder):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, tuple) and len(value) == 2:
            return cls(value[0], dict(value[1]))
        raise ModelRequestError(f"builder {value!r} is not a ModelBuilder, 'module:callable' or "
                                "('module:callable', {kwargs})")

    def problem(self) -> str | None:
        """Why this builder cannot be recorded (None when it can)."""
        if not isinstance(self.target, str) or not _BUILDER_TARGET.match(self.target):
            return f"builder target {self.target!r} is not of the form 'package.module:callable'"
        try:
            if json.loads(json.dumps(dict(self.kwargs))) != dict(self.kwargs):
                return f"builder kwargs {dict(self.kwargs)!r} do not survive JSON unchanged"
        except (TypeError, ValueError) as exc:
            return f"builder kwargs {self.kwargs!r} are not JSON ({exc})"
        return None

    def resolve(self) -> Callable[..., Any]:
        """The callable (imported now)."""
        module_name, _, attribute = self.target.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ModelRequestError(f"builder {self.target!r} cannot be imported ({exc}); install the package "
                                    "that defines it") from exc
        if not callable(target):
            raise ModelRequestError(f"builder {self.target!r} is not callable")
        return target

    def build(self) -> Any:
        return self.resolve()(**dict(self.kwargs))

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, obj: Any) -> ModelBuilder:
        if not (isinstance(obj, dict) and isinstance(obj.get("target"), str) and isinstance(obj.get("kwargs"), dict)):
            raise ModelRequestError(f"builder record {obj!r} lacks target or kwargs")
        return cls(obj["target"], obj["kwargs"])

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(dict(self.kwargs).items()))
        return f"{self.target}({args})"


def _name_problems(name: Any, registered_name: Any) -> list[str]:
    problems = []
    if not isinstance(name, str) or not name or any(c in name for c in LOGGED_MODEL_BAD_CHARS):
        problems.append(f"model name {name!r} must be a non-empty string without any of "
                        f"{' '.join(LOGGED_MODEL_BAD_CHARS)}")
    if registered_name is not None:
        import posixpath

        if (not isinstance(registered_name, str) or not registered_name.strip()
                or any(c in registered_name for c in REGISTERED_MODEL_BAD_CHARS)
                or posixpath.normpath(registered_name) != registered_name):
            problems.append(f"registered model name {registered_name!r} must be a non-empty string without "
                            f"{' or '.join(REGISTERED_MODEL_BAD_CHARS)} that is not a relative path")
    return problems


def request_problems(name: Any, registered_name: Any, builder: ModelBuilder | None) -> list[str]:
    """Why MLflow would refuse these names, or the builder could not be recorded (empty when fine)."""
    problems = _name_problems(name, registered_name)
    if builder is not None and (problem := builder.problem()):
        problems.append(problem)
    return problems


def example_array(input_example: Any):
    """The input example as a contiguous float numpy array with a batch of at least 2."""
    import numpy as np

    try:
        import torch

        if isinstance(input_example, torch.Tensor):
            input_example = input_example.detach().to("cpu").contiguous().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if not isinstance(input_example, np.ndarray):
        raise ModelRequestError(f"input_example must be a numpy array or a torch tensor, not "
                                f"{type(input_example).__name__}")
    if input_example.dtype.kind != "f" or input_example.ndim < 2:
        raise ModelRequestError(f"input_example must be a float array [batch, ...], got {input_example.dtype} "
                                f"{tuple(input_example.shape)}")
    if input_example.shape[0] < 2:
        # torch.export specialises a size-1 dimension to a constant: the model would take batches of 1 only.
        raise ModelRequestError(f"input_example has a batch of {input_example.shape[0]}; pass at least 2 samples "
                                "so that the exported model takes any batch size")
    return np.ascontiguousarray(input_example)


@dataclass
class ModelRequest:
    """A checked log_model call."""

    name: str
    registered_name: str | None
    builder: ModelBuilder | None
    example: Any  # numpy array

    @classmethod
    def check(cls, name: Any, registered_name: Any, builder: Any, input_example: Any) -> ModelRequest:
        built = ModelBuilder.coerce(builder)
        problems = request_problems(name, registered_name, built)
        if problems:
            raise ModelRequestError("; ".join(problems))
        return cls(name, registered_name, built, example_array(input_example))

    def tags(self) -> dict[str, str]:
        tags = {FORMAT_TAG: SERIALIZATION}
        if self.builder is not None:
            tags[BUILDER_TAG] = self.builder.target
            tags[BUILDER_KWARGS_TAG] = json.dumps(dict(self.builder.kwargs), sort_keys=True)
        return tags


def state_dict_of(model: Any) -> dict[str, Any]:
    """The model's weights and buffers as separate CPU tensors (safetensors refuses shared memory)."""
    return {key: value.detach().to("cpu").clone().contiguous() for key, value in model.state_dict().items()}


def rebuild(builder: ModelBuilder, state: Mapping[str, Any]) -> Any:
    """The builder's model with `state` loaded (strict), in eval mode on the CPU."""
    model = builder.build()
    try:
        model.load_state_dict(dict(state), strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelRequestError(f"the weights do not fit the model {builder} builds ({str(exc).splitlines()[0]})"
                                ) from exc
    return model.to("cpu").eval()


def export_copy(model: Any, builder: ModelBuilder | None) -> Any:
    """A CPU, eval-mode copy of `model` to export (the caller's model keeps its device and mode).
    With a builder the copy is rebuilt from it, as sync will do, so a builder that does not fit
    the model is found while the run is online."""
    if builder is not None:
        return rebuild(builder, state_dict_of(model))
    return copy.deepcopy(model).to("cpu").eval()


def example_output(model: Any, example: Any) -> Any:
    """The model's output on the example as a numpy array (it must be one tensor)."""
    import torch

    with torch.no_grad():
        output = model(torch.from_numpy(example))
    if not isinstance(output, torch.Tensor):
        raise ModelRequestError(f"the model returns {type(output).__name__}; log_model needs a model whose "
                                "output is one tensor")
    return output.numpy()


def signature_for(model: Any, example: Any):
    """A tensor signature: the example's dtype and shape with the batch dimension free, and the
    model's output on it likewise (for a CIFAR student: float32 [-1, 3, 32, 32] -> [-1, 10])."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    output = example_output(model, example)
    return ModelSignature(inputs=Schema([TensorSpec(example.dtype, (-1, *example.shape[1:]))]),
                          outputs=Schema([TensorSpec(np.dtype(output.dtype), (-1, *output.shape[1:]))]))


def pip_requirements() -> list[str]:
    """What loading the model needs, pinned (MLflow's own inference of them takes ~10 s)."""
    import mlflow
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


@dataclass
class LoggedModelResult:
    model_id: str
    registered_version: str | None = None


class ModelExportError(ModelRequestError):
    """torch.export (through mlflow.pytorch.save_model) could not export the model."""


def log_to_store(client: Any, run_id: str, model: Any, request: ModelRequest,
                 call: Callable[..., Any]) -> LoggedModelResult:
    """Log `model` (CPU, eval mode) as an MLflow LoggedModel of run `run_id`, in the run's
    experiment, and register it as a new version of `request.registered_name`.

    These are the steps of `mlflow.pytorch.log_model` (Model.log), done with this client: the
    fluent call resolves the store from the process-wide tracking URI (which
    `mlflow.set_tracking_uri` exports to every subprocess) and the active experiment, and
    `with mlflow.start_run(run_id=...)` around it ends the run. The run's status is never touched
    here. `call(what, fn, *args, **kwargs)` makes each store call (with retries online). As
    Model.log does, a model that fails to export stays in the store as a FAILED logged model
    (ModelExportError is raised); nothing is registered then."""
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    signature = signature_for(model, request.example)
    run = call("get_run", client.get_run, run_id)
    tags = request.tags()
    logged = call("create_logged_model", client.create_logged_model, run.info.experiment_id, name=request.name,
                  source_run_id=run_id, params=dict(run.data.params), tags=tags)
    try:
        call("log_outputs", client.log_outputs, run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="matekd-model-") as tmp:
            path = os.path.join(tmp, "model")
            description = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                                model_id=logged.model_id)
            try:
                mlflow.pytorch.save_model(model, path, mlflow_model=description, signature=signature,
                                          input_example=request.example, serialization_format=SERIALIZATION,
                                          pip_requirements=pip_requirements())
            except Exception as exc:
                raise ModelExportError(f"torch.export cannot export model {request.name!r} "
                                       f"({type(exc).__name__}: {first_line(exc)})") from exc
            call("log_model_artifacts", client.log_model_artifacts, logged.model_id, path)
        call("finalize_logged_model", client.finalize_logged_model, logged.model_id, "READY")
    except BaseException:
        try:
            client.finalize_logged_model(logged.model_id, "FAILED")
        except Exception:
            pass
        raise
    result = LoggedModelResult(logged.model_id)
    if request.registered_name:
        def create_registered_model() -> None:
            try:
                client.create_registered_model(request.registered_name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise

        call("create_registered_model", create_registered_model)
        # The source is the model's artifact location, not `models:/<model id>`: for that URI
        # MLflow's SQL registry looks the model up through `MlflowClient()`, i.e. the
        # process-wide tracking URI, not this client's store (a TODO in its create_model_version).
        version = call("create_model_version", client.create_model_version, request.registered_name,
                       source=logged.artifact_location, run_id=run_id, tags=tags, model_id=logged.model_id)
        result.registered_version = str(version.version)
        # What mlflow.register_model adds: the UI lists a logged model's versions from this tag.
        link = [{"name": version.name, "version": str(version.version)}]
        call("set_logged_model_tags", client.set_logged_model_tags, logged.model_id,
             {MODEL_VERSIONS_TAG: json.dumps(link)})
    return result


def set_alias(client: Any, model_id: str, alias: str, call: Callable[..., Any]) -> str | None:
    """Point `alias` at the registered version of logged model `model_id` (found through the
    model's `mlflow.modelVersions` tag, which log_to_store sets as mlflow.register_model does);
    returns "<name>@<alias> -> v<version>", None when the model was not registered."""
    logged = call("get_logged_model", client.get_logged_model, model_id)
    versions = json.loads(logged.tags.get(MODEL_VERSIONS_TAG) or "[]")
    if not versions:
        return None
    name, version = versions[-1]["name"], versions[-1]["version"]
    call("set_registered_model_alias", client.set_registered_model_alias, name, alias, version)
    return f"{name}@{alias} -> v{version}"


def delete_models_of_run(client: Any, run_id: str, store: Any = None) -> None:
    """Remove the registered versions and logged models of run `run_id` (before the run itself
    is removed by sync's roll-back or by the redo of an interrupted import), so that a run
    imported again does not leave an extra version behind. With a SQL `store`
    (mlflow_private.hard_delete_store), the logged models are deleted permanently (as `mlflow gc`
    does), else soft-deleted. Raises on failure."""
    from .mlflow_private import delete_artifacts, hard_delete_logged_model

    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        client.delete_model_version(version.name, version.version)
    experiment = client.get_run(run_id).info.experiment_id
    for logged in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
        try:
            delete_artifacts(logged.artifact_location)
        except Exception:
            pass  # no artifacts (an export that failed) or already gone
        folder = uri_to_path(logged.artifact_location or "")
        if folder is not None and folder.name == "artifacts" and folder.parent.name == logged.model_id:
            shutil.rmtree(folder.parent, ignore_errors=True)
        if store is None or not hard_delete_logged_model(store, logged.model_id):
            client.delete_logged_model(logged.model_id)


def load_offline_model(folder: Path, record: Mapping[str, Any]) -> tuple[Any, ModelRequest]:
    """The model and request of an offline model record (files already checked by read_run)."""
    import numpy as np

    from ..storage import load_tensors

    builder = ModelBuilder.from_json(record["builder"])
    weights = folder / record["weights"]["path"]
    try:
        state, _ = load_tensors(weights)
    except MatekdError as exc:
        raise ModelRequestError(f"{weights}: {exc}") from exc
    try:
        model = rebuild(builder, state)
    except ModelRequestError as exc:
        raise ModelRequestError(f"{weights}: {exc}") from exc
    example_file = folder / record["input_example"]["path"]
    try:
        example = np.load(example_file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelRequestError(f"{example_file}: not a numpy array file ({exc})") from exc
    return model, ModelRequest.check(record["name"], record.get("registered_name"), builder, example)


__all__ = ["LoggedModelResult", "ModelBuilder", "ModelExportError", "ModelRequest", "ModelRequestError",
           "delete_models_of_run", "example_output", "export_copy", "load_offline_model", "log_to_store", "rebuild",
           "request_problems", "set_alias", "signature_for", "state_dict_of"]
