"""MLflow tracking: unreachable stores fail fast and clearly, the off switch, and what a run records."""

from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from matekd.errors import MatekdError, TrackingError
from matekd.tracking import (
    MlflowRun,
    NullRun,
    artifact_root,
    git_state,
    mlflow_store,
    offline_root,
    start_run,
    tracking_enabled,
    tracking_mode,
    tracking_uri,
)
from matekd.tracking.lifecycle import host_identity
from test_tracking_common import fresh_store

torch.set_num_threads(1)

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


def run_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs = dict(enabled=True, experiment="matekd-test", run_name="unit", stage="distill",
                  params={"distill.ce_weight": 0.3, "teachers.resnet110.lr": 0.05, "data.train_per_class": None},
                  tags={"profile": "tiny", "dataset_sha256": "abc123"})
    kwargs.update(overrides)
    return kwargs


def free_port() -> int:
    """A port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MATEKD_TRACKING", "MATEKD_OFFLINE_DIR", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key in HTTP_ENV:  # tracking may set defaults; monkeypatch removes them again afterwards
        monkeypatch.delenv(key, raising=False)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed git repository standing in for the project root (DVC_ROOT)."""
    root = tmp_path_factory.mktemp("repo")
    git(root, "init", "-q")
    (root / "params.yaml").write_text("profile: tiny\n")
    git(root, "add", "params.yaml")
    git(root, "commit", "-q", "-m", "init")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: MLflow's schema migration takes seconds."""
    return fresh_store(tmp_path_factory, tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.fixture
def client(store: str, repo: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    return MlflowClient(tracking_uri=store)


# ---------------------------------------------------------------------------------------
# where the store is


def test_default_uri_is_absolute_under_the_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # DVC runs experiments in copies; the store must not follow cwd
    uri = tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert Path(uri.removeprefix("sqlite:///")).is_absolute()
    assert (tmp_path / "mlruns").is_dir()
    assert artifact_root() == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()


def test_env_uri_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri() == "http://tracking.example:5000"


def test_sqlite_artifacts_live_beside_the_database(tmp_path: Path) -> None:
    assert artifact_root(f"sqlite:///{tmp_path}/db/mlflow.db") == (tmp_path / "db" / "artifacts").as_uri()


# ---------------------------------------------------------------------------------------
# unreachable store and the off switch


def _start_and_fail(uri: str) -> tuple[str, float]:
    entered = []
    tic = time.monotonic()
    with pytest.raises(TrackingError) as info:
        with start_run(**run_kwargs()):
            entered.append(True)
    assert not entered  # the stage never started
    assert isinstance(info.value, MatekdError)
    return str(info.value), time.monotonic() - tic


def test_unreachable_server_fails_fast_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    message, seconds = _start_and_fail(uri)
    assert uri in message and "MATEKD_TRACKING=off" in message
    assert seconds < 15


def test_unreachable_server_with_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any MLFLOW_HTTP_* settings the first contact still gives up within ~30 s."""
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    message, seconds = _start_and_fail(uri)
    assert uri in message and "MATEKD_TRACKING=off" in message
    assert seconds < 30


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false"])
def test_off_switch_gives_a_null_run(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    # an unreachable store proves nothing is contacted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MATEKD_TRACKING", value)
    with start_run(**run_kwargs()) as run:
        assert type(run) is NullRun and not run.active and run.run_id is None
        run.log_metrics({"loss": 1.0}, step=1)
        run.log_params({"a": 1})
        run.set_tags({"b": 2})
        run.log_text("x", "x.txt")
        run.log_dict({"a": 1}, "a.json")


def test_disabled_param_gives_a_null_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with start_run(**run_kwargs(enabled=False)) as run:
        assert type(run) is NullRun


# ---------------------------------------------------------------------------------------
# git provenance


def test_git_state_clean_dirty_and_outside(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(repo))
    head = git(repo, "rev-parse", "HEAD")
    assert git_state() == {"git_commit": head, "git_dirty": "false"}
    (repo / "params.yaml").write_text("profile: changed\n")
    try:
        assert git_state() == {"git_commit": head, "git_dirty": "true"}
    finally:
        (repo / "params.yaml").write_text("profile: tiny\n")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # not a repository
    assert git_state() == {"git_commit": "unknown", "git_dirty": "unknown"}


# ---------------------------------------------------------------------------------------
# a real run in a SQLite store


def test_run_records_params_tags_metrics_and_provenance(client, repo: Path, store: str, tmp_path: Path) -> None:
    with start_run(**run_kwargs()) as run:
        assert isinstance(run, MlflowRun) and run.active
        for step, loss in enumerate([2.0, 1.5, 0.75]):
            run.log_metrics({"train/loss": loss, "train/acc": 0.1 * step}, step=step)
        run.set_tags({"extra": "yes"})
        run_id = run.run_id
        assert client.get_run(run_id).info.status == "RUNNING"
    data = client.get_run(run_id)
    assert data.info.status == "FINISHED"
    assert data.info.run_name == "unit"
    assert data.data.params == {"distill.ce_weight": "0.3", "teachers.resnet110.lr": "0.05",
                                "data.train_per_class": "None"}
    tags = data.data.tags
    assert tags["stage"] == "distill" and tags["profile"] == "tiny" and tags["dataset_sha256"] == "abc123"
    assert tags["git_commit"] == git(repo, "rev-parse", "HEAD") and tags["git_dirty"] == "false"
    assert tags["torch_version"] == torch.__version__
    assert tags["python"].count(".") == 2 and tags["extra"] == "yes"
    # the code that ran, which under a DVC executor is not the workspace's (an editable install)
    import matekd
    from matekd.storage import source_digest

    assert tags["matekd.source_sha256"] == source_digest() and len(tags["matekd.source_sha256"]) == 64
    assert tags["matekd.source_dir"] == str(Path(matekd.__file__).resolve().parent)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.5), (2, 0.75)]
    assert [m.step for m in client.get_metric_history(run_id, "train/acc")] == [0, 1, 2]
    artifacts = [a.path for a in client.list_artifacts(run_id, "provenance")]
    assert artifacts == ["provenance/pip-freeze.txt"]
    freeze = Path(client.download_artifacts(run_id, "provenance/pip-freeze.txt", str(tmp_path))).read_text()
    lines = freeze.splitlines()
    assert f"torch=={importlib.metadata.version('torch')}" in lines
    assert f"mlflow=={importlib.metadata.version('mlflow')}" in lines
    # artifacts went beside the database, not into the working copy's mlruns/
    store_dir = Path(store.removeprefix("sqlite:///")).parent
    assert any((store_dir / "artifacts").rglob("pip-freeze.txt"))


def test_parent_run_tag(client) -> None:
    with start_run(**run_kwargs(run_name="parent")) as parent:
        with start_run(**run_kwargs(run_name="child", parent_run_id=parent.run_id)) as child:
            child_id = child.run_id
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_exception_marks_the_run_failed(client) -> None:
    with pytest.raises(ValueError, match="diverged"):
        with start_run(**run_kwargs()) as run:
            run_id = run.run_id
            raise ValueError("diverged")
    assert client.get_run(run_id).info.status == "FAILED"


def test_ctrl_c_marks_the_run_killed(client) -> None:
    with pytest.raises(KeyboardInterrupt):
        with start_run(**run_kwargs()) as run:
            run_id = run.run_id
            raise KeyboardInterrupt
    assert client.get_run(run_id).info.status == "KILLED"


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(mlflow_store, "_sleep", slept.append)
    return slept


def test_transient_failure_is_retried(client, monkeypatch: pytest.MonkeyPatch, no_sleep: list[float],
                                      recwarn: pytest.WarningsRecorder) -> None:
    with start_run(**run_kwargs()) as run:
        real = run.client.log_batch
        calls: list[int] = []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) <= 2:
                raise ConnectionError("server hiccup")
            return real(*args, **kwargs)

        monkeypatch.setattr(run.client, "log_batch", flaky)
        run.log_metrics({"val/acc": 0.625}, step=4)
        run_id = run.run_id
    assert len(calls) == 3 and len(no_sleep) == 2
    assert all(s > 0 for s in no_sleep) and no_sleep == sorted(no_sleep)  # backing off
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/acc")] == [(4, 0.625)]
    assert not [w for w in recwarn if "MLflow:" in str(w.message)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_permanent_failure_warns_and_goes_on(client, monkeypatch: pytest.MonkeyPatch,
                                             no_sleep: list[float]) -> None:
    with start_run(**run_kwargs()) as run:
        def broken(*args, **kwargs):
            raise ConnectionError("server gone")

        monkeypatch.setattr(run.client, "log_batch", broken)
        with pytest.warns(UserWarning, match=r"log_metrics failed.*server gone"):
            run.log_metrics({"val/acc": 0.5}, step=1)
        with pytest.warns(UserWarning, match="set_tags failed"):
            run.set_tags({"a": "b"})
        run_id = run.run_id
        reached_end = True
    assert reached_end
    assert client.get_metric_history(run_id, "val/acc") == []
    assert client.get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------
# modes


@pytest.mark.parametrize(("env", "enabled", "mode", "expected"), [
    (None, True, "online", "online"), (None, True, "offline", "offline"), (None, False, "offline", "off"),
    ("off", True, "offline", "off"), ("no", True, "online", "off"), ("FALSE", True, "online", "off"),
    ("offline", True, "online", "offline"), ("offline", False, "online", "offline"),
    ("online", True, "offline", "online"), ("on", True, "offline", "offline"), ("on", False, "online", "off"),
    ("1", True, "online", "online"),
])
def test_tracking_mode(monkeypatch: pytest.MonkeyPatch, env: str | None, enabled: bool, mode: str,
                       expected: str) -> None:
    if env is not None:
        monkeypatch.setenv("MATEKD_TRACKING", env)
    assert tracking_mode(enabled, mode) == expected
    assert tracking_enabled(enabled) == (tracking_mode(enabled) != "off")


def test_bad_mode_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TrackingError, match="tracking.mode 'remote'"):
        tracking_mode(True, "remote")
    monkeypatch.setenv("MATEKD_TRACKING", "ofline")
    with pytest.raises(TrackingError, match="MATEKD_TRACKING='ofline'"):
        tracking_mode(True, "online")


def test_offline_folder_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert offline_root() == tmp_path.resolve() / "mlruns-offline"
    assert offline_root("runs/offline") == tmp_path.resolve() / "runs" / "offline"
    assert offline_root(tmp_path / "abs") == tmp_path / "abs"
    monkeypatch.setenv("MATEKD_OFFLINE_DIR", str(tmp_path / "env"))
    assert offline_root("ignored") == tmp_path / "env"


# ---------------------------------------------------------------------------------------
# MLflow's source and git tags, DVC's experiment, the owning process


def test_source_git_and_dvc_tags(client, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import socket

    monkeypatch.setenv("DVC_EXP_NAME", "hasty-gnu")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    monkeypatch.setenv("DVC_STAGE", "ablation@kd-0")
    git(repo, "remote", "add", "origin", "https://user:secret@example.org/team/matekd.git")
    try:
        with start_run(**run_kwargs(stage="ablation")) as run:
            run_id = run.run_id
    finally:
        git(repo, "remote", "remove", "origin")
    data = client.get_run(run_id)
    tags = data.data.tags
    assert tags["mlflow.source.git.commit"] == git(repo, "rev-parse", "HEAD") == tags["git_commit"]
    assert tags["mlflow.source.git.branch"] == git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    assert tags["mlflow.source.git.repoURL"] == "https://example.org/team/matekd.git"  # credentials stripped
    assert tags["mlflow.source.git.dirty"] == "false"
    assert tags["mlflow.source.name"] == "matekd ablation" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and data.info.user_id == tags["mlflow.user"]
    assert tags["dvc.exp_name"] == "hasty-gnu" and tags["dvc.exp_baseline_rev"] == "0" * 40
    assert tags["dvc.stage"] == "ablation@kd-0"
    assert tags["matekd.host"] == host_identity() and tags["matekd.pid"] == str(os.getpid())
    assert tags["matekd.host"].startswith(f"{socket.gethostname()}/")


def test_no_dvc_tags_outside_dvc(client) -> None:
    with start_run(**run_kwargs()) as run:
        run_id = run.run_id
    assert not [key for key in client.get_run(run_id).data.tags if key.startswith("dvc.")]


def test_dataset_input(client) -> None:
    sha = "ab" * 32
    with start_run(**run_kwargs()) as run:
        run.log_input("cifar10-jpeg", sha, "/data/cifar10.tar.gz", "training")
        run_id = run.run_id
    (entry,) = client.get_run(run_id).inputs.dataset_inputs
    assert entry.dataset.name == "cifar10-jpeg" and entry.dataset.digest == sha[:36]
    assert entry.dataset.source_type == "local" and '"/data/cifar10.tar.gz"' in entry.dataset.source
    assert {t.key: t.value for t in entry.tags} == {"mlflow.data.context": "training", "digest": sha}


def test_prepared_dataset_input_online_and_offline(client, tmp_path: Path) -> None:
    """The call the stages make for the prepared data: the same dataset input online and synced."""
    from matekd.tracking import sync_runs

    manifest_sha = "0123456789abcdef" * 4
    call = dict(name="cifar10-prepared", digest=manifest_sha, source="data/cifar10-jpeg.tar.gz", context="training",
                profile=json.dumps({"train": 45000, "val": 5000, "test": 10000}),
                tags={"dataset": "CIFAR-10 (JPEG mirror)", "source_sha256": "ab" * 32})
    with start_run(**run_kwargs(run_name="online data")) as run:
        run.log_input(**call)
    with start_run(**run_kwargs(run_name="offline data", mode="offline", offline_dir=tmp_path)) as offline:
        offline.log_input(**call)
    synced = sync_runs(tmp_path).imported[offline.run_id]

    def inputs(run_id: str) -> list[tuple]:
        return [(d.dataset.name, d.dataset.digest, d.dataset.source_type, d.dataset.source, d.dataset.profile,
                 sorted((t.key, t.value) for t in d.tags)) for d in client.get_run(run_id).inputs.dataset_inputs]

    assert inputs(run.run_id) == inputs(synced) == [(
        "cifar10-prepared", manifest_sha[:36], "local", '{"uri": "data/cifar10-jpeg.tar.gz"}', call["profile"],
        sorted({"mlflow.data.context": "training", "digest": manifest_sha, **call["tags"]}.items()))]


def test_deleted_experiment_is_named_with_the_fix(client, store: str) -> None:
    experiment = client.create_experiment("matekd-deleted", artifact_location=artifact_root(store))
    client.delete_experiment(experiment)
    with pytest.raises(TrackingError, match=r"'matekd-deleted' .* is deleted: restore it"):
        with start_run(**run_kwargs(experiment="matekd-deleted")):
            pass


def test_reopen_run(client, tmp_path: Path) -> None:
    """tune reopens its study's parent run: RUNNING again, owned by this process, closed with
    the outcome; an unknown run gives None."""
    import os

    from matekd.tracking import closing_run, reopen_run

    with start_run(**run_kwargs(run_name="study")) as run:
        run_id = run.run_id
    client.set_tag(run_id, "matekd.pid", "1")  # as if another process had opened it
    reopened = reopen_run(run_id)
    assert isinstance(reopened, MlflowRun) and reopened.run_id == run_id
    got = client.get_run(run_id)
    assert got.info.status == "RUNNING" and got.data.tags["matekd.pid"] == str(os.getpid())
    with closing_run(reopened) as again:
        again.log_metrics({"best": 0.5}, step=2)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert reopen_run("0" * 32) is None

    with start_run(**run_kwargs(mode="offline", offline_dir=tmp_path)) as offline:
        pass
    again = reopen_run(offline.run_id, mode="offline", offline_dir=tmp_path)
    assert again is not None and again.record["status"] == "RUNNING"
    with pytest.raises(ValueError):
        with closing_run(again):
            raise ValueError("crash")
    assert again.record["status"] == "FAILED"
    assert reopen_run("0" * 32, mode="offline", offline_dir=tmp_path) is None
