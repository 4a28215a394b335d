"""Every non-public MLflow call matekd makes (matekd.tracking.mlflow_private), and every MLflow
constant it mirrors, checked against the installed mlflow: an upgrade that moves or changes one
fails here, by name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils import mlflow_tags, validation

from matekd.tracking import client_for, interface, mlflow_private, models


@pytest.fixture
def client(tmp_path):
    return client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _experiment(client, tmp_path: Path) -> str:
    return client.create_experiment("private", artifact_location=(tmp_path / "artifacts").as_uri())


@pytest.mark.parametrize("kind", ["metric", "param", "tag"])
def test_mlflow_validators_accept_and_refuse_keys(kind):
    assert mlflow_private.mlflow_name_problem(kind, "final/val_acc") is None
    assert mlflow_private.mlflow_name_problem(kind, "a b:c-d.e_f") is None
    for bad in ("bad!name", "../up", "/absolute"):
        problem = mlflow_private.mlflow_name_problem(kind, bad)
        assert problem and problem.startswith(f"{kind} key {bad!r}: "), (bad, problem)
    assert interface.name_problem(kind, "bad!name") == mlflow_private.mlflow_name_problem(kind, "bad!name")


def test_context_tags_come_from_mlflows_providers_without_git(monkeypatch):
    tags = mlflow_private.context_tags()
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert not [key for key in tags if key.startswith("mlflow.source.git")]
    monkeypatch.setenv("MLFLOW_RUN_CONTEXT", '{"team": "vision"}')   # honoured by MLflow's env provider
    assert mlflow_private.context_tags()["team"] == "vision"


def test_runs_and_logged_models_are_deleted_for_good_with_their_artifacts(client, tmp_path):
    experiment = _experiment(client, tmp_path)
    run_id = client.create_run(experiment).info.run_id
    (tmp_path / "note.txt").write_text("x")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    logged = client.create_logged_model(experiment, name="student", source_run_id=run_id)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    client.log_model_artifacts(logged.model_id, str(tmp_path / "model"))
    store = mlflow_private.hard_delete_store(client)
    assert store is not None   # a SQL store

    run_folder = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert (run_folder / "note.txt").is_file()
    mlflow_private.delete_artifacts(client.get_run(run_id).info.artifact_uri)
    assert not (run_folder / "note.txt").exists()

    model_folder = Path(client.get_logged_model(logged.model_id).artifact_location.removeprefix("file://"))
    assert (model_folder / "MLmodel").is_file()
    mlflow_private.delete_artifacts(client.get_logged_model(logged.model_id).artifact_location)
    assert not (model_folder / "MLmodel").exists()
    assert mlflow_private.hard_delete_logged_model(store, logged.model_id)
    with pytest.raises(MlflowException):
        client.get_logged_model(logged.model_id)
    client.delete_run(run_id)
    mlflow_private.hard_delete_run(store, run_id)
    with pytest.raises(MlflowException, match="not found"):
        client.get_run(run_id)


def test_a_store_without_permanent_deletion_is_told_apart():
    assert mlflow_private.hard_delete_store(object()) is None
    assert mlflow_private.hard_delete_logged_model(object(), "m-1") is False


def test_relocate_store_rewrites_the_artifact_locations_of_a_copied_store(tmp_path, monkeypatch):
    old = tmp_path / "old"
    (old / "mlruns").mkdir(parents=True)
    (old / "params.yaml").write_text("{}\n")   # a project root (storage.ROOT_MARKERS)
    old_client = client_for(f"sqlite:///{old / 'mlruns' / 'mlflow.db'}")
    experiment = old_client.create_experiment("moved", artifact_location=(old / "mlruns" / "artifacts").as_uri())
    run_id = old_client.create_run(experiment).info.run_id
    old_client.create_logged_model(experiment, name="student", source_run_id=run_id)
    new = tmp_path / "new"
    shutil.copytree(old, new)
    monkeypatch.chdir(new)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    uri = f"sqlite:///{new / 'mlruns' / 'mlflow.db'}"
    assert mlflow_private.relocate_store(uri) == 3   # experiment, run, logged model
    new_client = client_for(uri)
    assert new_client.get_experiment(experiment).artifact_location == (new / "mlruns" / "artifacts").as_uri()
    assert new_client.get_run(run_id).info.artifact_uri.startswith((new / "mlruns" / "artifacts").as_uri() + "/")
    (logged,) = new_client.search_logged_models([experiment])
    assert logged.artifact_location.startswith((new / "mlruns" / "artifacts").as_uri() + "/")
    assert old_client.get_run(run_id).info.artifact_uri.startswith((old / "mlruns").as_uri())   # untouched
    assert mlflow_private.relocate_store(uri) == 0   # done once
    assert os.environ.get("MLFLOW_TRACKING_URI") is None


def test_mirrored_constants_equal_mlflows():
    assert interface.DATASET_CONTEXT_TAG == mlflow_tags.MLFLOW_DATASET_CONTEXT
    assert models.MODEL_VERSIONS_TAG == mlflow_tags.MLFLOW_MODEL_VERSIONS
    assert (interface.MAX_KEY_LENGTH, interface.MAX_PARAM_VALUE_LENGTH, interface.MAX_TAG_VALUE_LENGTH) == (
        validation.MAX_ENTITY_KEY_LENGTH, validation.MAX_PARAM_VAL_LENGTH, validation.MAX_TAG_VAL_LENGTH)
    assert (interface.MAX_PARAMS_TAGS_PER_BATCH, interface.MAX_METRICS_PER_BATCH,
            interface.MAX_DATASET_DIGEST_SIZE) == (
        validation.MAX_PARAMS_TAGS_PER_BATCH, validation.MAX_METRICS_PER_BATCH, validation.MAX_DATASET_DIGEST_SIZE)
    # the characters matekd refuses in model names before MLflow would
    for char in models.LOGGED_MODEL_BAD_CHARS:
        assert models.request_problems(f"a{char}b", None, None)
        with pytest.raises(MlflowException):
            validation._validate_logged_model_name(f"a{char}b")
    for char in models.REGISTERED_MODEL_BAD_CHARS:
        with pytest.raises(MlflowException):
            validation._validate_model_name(f"a{char}b")
