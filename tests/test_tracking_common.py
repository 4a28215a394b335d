"""Helpers shared by the tracking tests (no tests here): fresh SQLite stores copied from one
template database per session (MLflow's schema creation takes seconds, a copy milliseconds),
git repositories, and reading back everything a run holds for comparisons."""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

TRACKING_ENV = ("MATEKD_TRACKING", "MATEKD_OFFLINE_DIR", "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME",
                "DVC_EXP_BASELINE_REV", "DVC_STAGE", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_RUN_CONTEXT")


def clear_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in TRACKING_ENV:
        monkeypatch.delenv(key, raising=False)


def fresh_store(factory: pytest.TempPathFactory, database: Path) -> str:
    """An empty MLflow SQLite store at `database` (a copy of a session-wide template)."""
    template = factory.getbasetemp() / "mlflow-template" / "mlflow.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        template.parent.mkdir(parents=True, exist_ok=True)
        building = template.with_name("building.db")
        MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments()
        building.rename(template)
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, database)
    return f"sqlite:///{database}"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout.strip()


def make_git_repo(root: Path, content: str = "profile: tiny\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    (root / "params.yaml").write_text(content)
    (root / "dvc.yaml").write_text("stages: {}\n")
    git(root, "add", "params.yaml", "dvc.yaml")
    git(root, "commit", "-q", "-m", "init")
    return root


def local_path(uri: str) -> Path:
    from matekd.tracking.roots import uri_to_path

    path = uri_to_path(uri)
    assert path is not None, uri
    return path


_IMAGE_UUID = re.compile(r"\+[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(\+compressed)?\.")


def artifact_files(uri: str) -> dict[str, str]:
    """{relative path: sha256} of a run's artifact folder; the random uuid in MLflow's image
    file names is replaced by 'UUID'."""
    root = local_path(uri)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = _IMAGE_UUID.sub(lambda m: f"+UUID{m.group(1) or ''}.", path.relative_to(root).as_posix())
        files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _value(value: float) -> Any:
    return "nan" if math.isnan(value) else value


def run_snapshot(client: Any, run: Any, names: dict[str, str]) -> dict[str, Any]:
    """Everything a run holds, with run ids replaced by run names (`names`: id -> name)."""
    tags = dict(run.data.tags)
    parent = tags.pop("mlflow.parentRunId", None)
    tags.pop("matekd.offline_run_id", None)
    histories = {key: sorted((m.step, m.timestamp, _value(m.value))
                             for m in client.get_metric_history(run.info.run_id, key))
                 for key in run.data.metrics}
    inputs = sorted((d.dataset.name, d.dataset.digest, d.dataset.source_type, d.dataset.source,
                     tuple(sorted((t.key, t.value) for t in d.tags))) for d in run.inputs.dataset_inputs)
    return {"name": run.info.run_name, "status": run.info.status, "start_time": run.info.start_time,
            "end_time": run.info.end_time, "user": run.info.user_id, "parent": names.get(parent, parent),
            "tags": tags, "params": dict(run.data.params), "metrics": histories, "inputs": inputs,
            "artifacts": artifact_files(run.info.artifact_uri)}


def experiment_snapshot(uri: str, experiment: str) -> dict[str, dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {uri}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    names = {r.info.run_id: r.info.run_name for r in runs}
    assert len(set(names.values())) == len(runs), "run names are not unique"
    return {r.info.run_name: run_snapshot(client, r, names) for r in runs}


def all_runs(uri: str) -> list[Any]:
    """Every run of the store, deleted ones included."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000)
