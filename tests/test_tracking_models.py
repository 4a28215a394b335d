"""Trained models in MLflow (`run.log_model`): online, a pt2 logged model with signature and
input example, registered as a new version per run, while the run stays RUNNING; offline, the
weights and builder recorded and `sync_runs` logging the same model; corrupt model files refused
by name; failures warn and training goes on; a failed sync leaves no model behind."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from matekd.models import build_model
from matekd.tracking import ModelBuilder, NullRun, OfflineRunError, start_run, sync_runs
from matekd.tracking.models import BUILDER_KWARGS_TAG, BUILDER_TAG
from test_tracking_common import clear_tracking_env, fresh_store, make_git_repo

torch.set_num_threads(1)

EXPERIMENT = "models"
REGISTERED = "matekd-student-test"
BUILDER = ModelBuilder("matekd.models:build_model", {"name": "resnet20"})


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_tracking_env(monkeypatch)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_git_repo(tmp_path_factory.mktemp("models") / "repo")


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20")
    with torch.no_grad():  # BN statistics that differ from a fresh model's, so that loading them matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.train()  # as a stage hands it over: log_model must not change its mode


def example(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def expected_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).eval()(torch.from_numpy(x)).numpy()


def started(mode: str, offline_dir: Path | None = None, **kwargs: Any):
    return start_run(enabled=True, experiment=EXPERIMENT, stage="distill", params={"distill.method": "kd"},
                     tags={}, mode=mode, offline_dir=offline_dir, **kwargs)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def model_snapshot(uri: str, run_id: str) -> dict[str, Any]:
    """What the store holds about the one model of run `run_id`."""
    from mlflow.models import Model

    client = client_for(uri)
    run = client.get_run(run_id)
    (logged,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    root = Path(logged.artifact_location.removeprefix("file://"))
    signature = Model.load(str(root / "MLmodel")).signature
    return {"name": logged.name, "status": logged.status.value, "params": logged.params,
            "tags": {k: v for k, v in logged.tags.items() if k.startswith(("matekd.", "mlflow.modelVersions"))},
            "outputs": [(o.model_id, o.step) for o in run.outputs.model_outputs],
            "model_id": logged.model_id,
            "signature": signature.to_dict(),
            "files": sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()),
            "input_example": json.loads((root / "input_example.json").read_text()),
            "version": (version.name, str(version.version), version.source, version.status)}


def load_registered(uri: str, monkeypatch: pytest.MonkeyPatch, version: str = "1") -> Any:
    """The registered model loaded as a user would, with pickle deserialisation disallowed."""
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    return mlflow.pytorch.load_model(f"models:/{REGISTERED}/{version}")


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, repo: Path, student: torch.nn.Module) -> dict[str, Any]:
    """The student logged online into one store, and offline then synced into another."""
    import mlflow

    base = tmp_path_factory.mktemp("logged")
    online = fresh_store(tmp_path_factory, base / "online" / "mlflow.db")
    synced = fresh_store(tmp_path_factory, base / "synced" / "mlflow.db")
    out: dict[str, Any] = {"online": online, "synced": synced, "offline_dir": base / "offline"}
    with pytest.MonkeyPatch.context() as mp:
        clear_tracking_env(mp)
        mp.setenv("DVC_ROOT", str(repo))
        mp.setenv("MLFLOW_TRACKING_URI", online)
        global_uri = mlflow.tracking._tracking_service.utils._tracking_uri
        with started("online", run_name="online") as run:
            run.log_metrics({"final/val_acc": 0.5})
            run.log_model(student, name="kd-seed0", input_example=example(), registered_name=REGISTERED,
                          builder=BUILDER)
            out["status_inside"] = client_for(online).get_run(run.run_id).info.status
            out["online_run"] = run.run_id
        out["env_after"] = os.environ.get("MLFLOW_TRACKING_URI")
        out["global_uri_changed"] = mlflow.tracking._tracking_service.utils._tracking_uri != global_uri
        out["active_experiment"] = mlflow.tracking.fluent._active_experiment_id
        with started("offline", out["offline_dir"], run_name="offline") as run:
            run.log_metrics({"final/val_acc": 0.5})
            run.log_model(student, name="kd-seed0", input_example=example(), registered_name=REGISTERED,
                          builder=BUILDER)
            out["offline_id"] = run.run_id
        mp.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # sync must use its argument
        out["summary"] = sync_runs(out["offline_dir"], tracking_uri=synced)
    out["synced_run"] = out["summary"].imported[out["offline_id"]]
    return out


def test_online_model_is_logged_and_registered_while_the_run_goes_on(logged: dict[str, Any],
                                                                     student: torch.nn.Module) -> None:
    assert logged["status_inside"] == "RUNNING"  # log_model did not end the run
    assert client_for(logged["online"]).get_run(logged["online_run"]).info.status == "FINISHED"
    assert student.training  # the caller's model keeps its mode
    got = model_snapshot(logged["online"], logged["online_run"])
    assert got["name"] == "kd-seed0" and got["status"] == "READY"
    assert got["outputs"] == [(got["model_id"], 0)]
    assert got["signature"] == {
        "inputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, 32, 32]}}]',
        "outputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 10]}}]', "params": None}
    assert "data/model.pt2" in got["files"] and not [f for f in got["files"] if f.endswith((".pth", ".pkl"))]
    assert np.asarray(got["input_example"]).shape == (2, 3, 32, 32)
    assert got["version"] == (REGISTERED, "1", client_for(logged["online"]).get_logged_model(got["model_id"])
                              .artifact_location, "READY")
    assert json.loads(got["tags"]["mlflow.modelVersions"]) == [{"name": REGISTERED, "version": "1"}]
    assert got["tags"][BUILDER_TAG] == "matekd.models:build_model"
    assert json.loads(got["tags"][BUILDER_KWARGS_TAG]) == {"name": "resnet20"}
    assert got["params"]["distill.method"] == "kd"  # the run's params, as mlflow.pytorch.log_model copies them


def test_log_model_leaves_mlflow_global_state_alone(logged: dict[str, Any]) -> None:
    assert logged["env_after"] == logged["online"]  # MLFLOW_TRACKING_URI as the test set it, nothing exported
    assert not logged["global_uri_changed"] and logged["active_experiment"] is None


def test_registered_model_loads_without_pickle_and_takes_any_batch(logged: dict[str, Any], student: torch.nn.Module,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    x = example(batch=3, seed=1)
    for uri in (logged["online"], logged["synced"]):
        loaded = load_registered(uri, monkeypatch)
        assert isinstance(loaded, torch.fx.GraphModule)
        with torch.no_grad():
            got = loaded(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected_logits(student, x), rtol=1e-4, atol=1e-4)


def test_offline_model_syncs_like_online(logged: dict[str, Any]) -> None:
    folder = logged["offline_dir"] / logged["offline_id"]
    meta = json.loads((folder / "run.json").read_text())
    assert meta["format"] == "matekd-offline-run/2"
    (entry,) = meta["models"]
    assert entry["builder"] == BUILDER.to_json() and entry["registered_name"] == REGISTERED
    assert sorted(p.name for p in (folder / "models").rglob("*") if p.is_file()) == ["input_example.npy",
                                                                                      "weights.safetensors"]
    online = model_snapshot(logged["online"], logged["online_run"])
    synced = model_snapshot(logged["synced"], logged["synced_run"])
    for snapshot in (online, synced):
        snapshot.pop("model_id")
        snapshot["outputs"] = [step for _, step in snapshot["outputs"]]
        snapshot["version"] = snapshot["version"][:2] + snapshot["version"][3:]
    assert synced == online
    assert logged["summary"].models == [f"kd-seed0 of run {logged['offline_id']} -> {REGISTERED} v1"]


def test_each_run_adds_a_version(logged: dict[str, Any], student: torch.nn.Module, repo: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["online"])
    with started("online", run_name="again") as run:
        run.log_model(student, name="kd-seed1", input_example=example(), registered_name=REGISTERED, builder=BUILDER)
    (version,) = client_for(logged["online"]).search_model_versions(f"run_id = '{run.run_id}'")
    assert version.name == REGISTERED and str(version.version) == "2"


# ---------------------------------------------------------------------------------------
# corrupt offline models: refused by name before anything is imported


def _changed_weights(folder: Path) -> Path:
    (path,) = folder.rglob("weights.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _missing_example(folder: Path) -> Path:
    (path,) = folder.rglob("input_example.npy")
    path.unlink()
    return path


def _unknown_builder(folder: Path) -> Path:
    (path,) = folder.rglob("run.json")
    meta = json.loads(path.read_text())
    meta["models"][0]["builder"]["target"] = "matekd.nowhere:build_model"
    path.write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("damage", [_changed_weights, _missing_example, _unknown_builder],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupt_offline_model_is_refused_by_name(logged: dict[str, Any], tmp_path: Path,
                                                  tmp_path_factory: pytest.TempPathFactory,
                                                  damage: Callable[[Path], Path]) -> None:
    folder = tmp_path / "offline"
    shutil.copytree(logged["offline_dir"], folder)
    culprit = damage(folder)
    store = fresh_store(tmp_path_factory, tmp_path / "store" / "mlflow.db")
    with pytest.raises(OfflineRunError) as info:
        sync_runs(folder, tracking_uri=store)
    assert str(culprit) in str(info.value)
    assert client_for(store).get_experiment_by_name(EXPERIMENT) is None  # nothing imported
    assert client_for(store).search_registered_models() == []


def test_failed_sync_leaves_no_model_behind(logged: dict[str, Any], tmp_path: Path,
                                            tmp_path_factory: pytest.TempPathFactory,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    store = fresh_store(tmp_path_factory, tmp_path / "store" / "mlflow.db")

    def failing(self, *args, **kwargs):
        raise ConnectionError("store went away")

    monkeypatch.setattr(MlflowClient, "set_terminated", failing)  # after the model was logged and registered
    with pytest.raises(Exception, match="store went away"):
        sync_runs(logged["offline_dir"], tracking_uri=store)
    client = client_for(store)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert client.search_logged_models([experiment]) == []
    assert client.search_model_versions(f"name = '{REGISTERED}'") == []
    artifacts = Path(store.removeprefix("sqlite:///")).parent / "artifacts"
    assert not [p for p in artifacts.rglob("*") if p.is_file()]
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    summary = sync_runs(logged["offline_dir"], tracking_uri=store)
    (version,) = client.search_model_versions(f"name = '{REGISTERED}'")  # one version, of the run imported now
    assert version.run_id == summary.imported[logged["offline_id"]]
    assert str(version.version) == "2"  # MLflow never reuses the number of a deleted version


# ---------------------------------------------------------------------------------------
# what cannot be logged: warned, and training goes on


class DataDependent(torch.nn.Module):
    """A branch on tensor values: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.flatten(1))
        return y if y.sum() > 0 else -y


def test_online_failures_warn_and_the_run_finishes(repo: Path, tmp_path: Path,
                                                   tmp_path_factory: pytest.TempPathFactory,
                                                   monkeypatch: pytest.MonkeyPatch, student: torch.nn.Module) -> None:
    store = fresh_store(tmp_path_factory, tmp_path / "store" / "mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with started("online", run_name="failures") as run:
        with pytest.warns(UserWarning, match=r"log_model bad failed \(ModelExportError: torch.export cannot export"):
            run.log_model(DataDependent(), name="bad", input_example=example(), registered_name=REGISTERED)
        with pytest.warns(UserWarning, match="batch of 1; pass at least 2"):
            run.log_model(student, name="one", input_example=example(batch=1), registered_name=REGISTERED)
        with pytest.warns(UserWarning, match=r"model name 'a\.b' must be"):
            run.log_model(student, name="a.b", input_example=example())
        with pytest.warns(UserWarning, match="do not fit the model"):
            run.log_model(student, name="wrong", input_example=example(),
                          builder=ModelBuilder("matekd.models:build_model", {"name": "resnet56"}))
    client = client_for(store)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    (failed,) = client.search_logged_models([client.get_run(run.run_id).info.experiment_id])
    assert failed.name == "bad" and failed.status.value == "FAILED"  # as mlflow.pytorch.log_model leaves it
    assert client.search_registered_models() == []


def test_offline_failures_warn(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               student: torch.nn.Module) -> None:
    monkeypatch.setenv("DVC_ROOT", str(repo))
    with started("offline", tmp_path, run_name="failures") as run:
        with pytest.warns(UserWarning, match="an offline run needs builder="):
            run.log_model(student, name="nobuilder", input_example=example())
        with pytest.warns(UserWarning, match="builder target 'build_model' is not of the form"):
            run.log_model(student, name="badtarget", input_example=example(), builder="build_model")
    meta = json.loads((tmp_path / run.run_id / "run.json").read_text())
    assert meta["status"] == "FINISHED" and "models" not in meta and meta["format"] == "matekd-offline-run/1"
    assert not (tmp_path / run.run_id / "models").exists()


def test_null_run_log_model_does_nothing(student: torch.nn.Module) -> None:
    assert NullRun().log_model(student, name="x", input_example=example()) is None


def test_builder_coercion_and_checks() -> None:
    assert ModelBuilder.coerce(("matekd.models:build_model", {"name": "resnet20"})) == BUILDER
    assert ModelBuilder.coerce("matekd.models:build_model") == ModelBuilder("matekd.models:build_model")
    assert str(BUILDER) == "matekd.models:build_model(name='resnet20')"
    assert ModelBuilder("matekd.models:build_model", {"path": Path("/x")}).problem() is not None
    assert ModelBuilder("matekd.models.build_model").problem() is not None
    assert ModelBuilder.from_json(BUILDER.to_json()).build().__class__ is build_model("resnet20").__class__
