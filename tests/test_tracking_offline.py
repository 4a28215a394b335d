"""Offline runs and `sync_runs`: the same calls tracked offline then synced give the same MLflow
runs as online tracking; a second sync adds nothing; a corrupt folder is refused naming the file
and nothing is imported; a store failure half-way removes what the sync created; a run left
RUNNING; and offline tracking where mlflow is not installed."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from matekd.errors import MatekdError, TrackingError
from matekd.tracking import (
    OfflineRun,
    OfflineRunError,
    artifact_root,
    interface,
    process_identity,
    start_run,
    sync_runs,
)
from matekd.tracking.sync import IMPORTING_TAG, OFFLINE_ID_TAG, SYNC_NOTE_TAG
from test_tracking_common import all_runs, clear_tracking_env, experiment_snapshot, fresh_store, git, make_git_repo

EXPERIMENT = "parity"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_tracking_env(monkeypatch)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_git_repo(tmp_path_factory.mktemp("offline") / "repo")


def scenario(start: Callable[..., Any], files: Path) -> dict[str, str]:
    """One parent and two children, every kind of call; returns {run name: run id}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (files / "tree" / "sub").mkdir(parents=True, exist_ok=True)
    (files / "tree" / "a.txt").write_text("alpha\n")
    (files / "tree" / "sub" / "b.bin").write_bytes(bytes(range(256)))
    figure = plt.figure(figsize=(2, 2))
    plt.plot([0, 1, 2], [2, 0, 1])
    ids = {}
    with start(run_name="study", stage="tune", params={"tune.trials": 4, "tune.method": "mate_kd"},
               tags={"profile": "tiny"}) as parent:
        ids["study"] = parent.run_id
        parent.log_metrics({"loss": 2.5, "acc": 0.25}, step=0)
        parent.log_metrics({"loss": 1.25, "acc": float("nan")}, step=1)
        parent.log_metrics({"final": 3.0})
        parent.set_tags({"best_value": 0.75})
        parent.log_artifact(files / "tree" / "a.txt", "inputs")
        parent.log_artifacts(files / "tree", "tree")
        parent.log_text("héllo\n", "notes/hello.txt")
        parent.log_dict({"k": [1, 2], "path": files}, "config/params.json")
        parent.log_figure(figure, "figures/curve.png")
        for step in (0, 3):
            parent.log_image(np.full((6, 5, 3), 40 * step, dtype=np.uint8), "teacher_weight_histogram", step)
        parent.log_input("cifar10", "ab" * 32, "/data/cifar10.tar.gz", "training")
        with start(run_name="trial ok", stage="distill", params={"distill.seed": 0}, tags={},
                   parent_run_id=parent.run_id) as child:
            ids["trial ok"] = child.run_id
            for step in range(3):
                child.log_metrics({"step/total": 1.0 / (step + 1)}, step=step * 5)
        with pytest.raises(ValueError, match="diverged"):
            with start(run_name="trial failed", stage="distill", params={"distill.seed": 1}, tags={},
                       parent_run_id=parent.run_id) as child:
                ids["trial failed"] = child.run_id
                child.log_metrics({"step/total": float("inf")}, step=1)
                raise ValueError("diverged")
    plt.close(figure)
    return ids


def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deterministic clock: the n-th timestamp a tracker asks for is the same in both modes."""
    ticks = itertools.count()
    monkeypatch.setattr(interface, "now_ms", lambda: 1_700_000_000_000 + 1000 * next(ticks))


def tracked(mode: str, offline_dir: Path | None = None) -> Callable[..., Any]:
    return functools.partial(start_run, enabled=True, experiment=EXPERIMENT, mode=mode, offline_dir=offline_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> dict[str, Any]:
    """The scenario tracked online into one store, and offline then synced into another."""
    base = tmp_path_factory.mktemp("parity")
    online_uri = fresh_store(tmp_path_factory, base / "online" / "mlflow.db")
    synced_uri = fresh_store(tmp_path_factory, base / "synced" / "mlflow.db")
    offline_dir = base / "offline"
    with pytest.MonkeyPatch.context() as mp:
        clear_tracking_env(mp)
        mp.setenv("DVC_ROOT", str(repo))
        clock(mp)
        mp.setenv("MLFLOW_TRACKING_URI", online_uri)
        online_ids = scenario(tracked("online"), base / "files")
        clock(mp)
        offline_ids = scenario(tracked("offline", offline_dir), base / "files")
        mp.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # sync must use its argument, not the env
        summary = sync_runs(offline_dir, tracking_uri=synced_uri)
    return {"online": online_uri, "synced": synced_uri, "offline_dir": offline_dir, "summary": summary,
            "online_ids": online_ids, "offline_ids": offline_ids, "base": base}


def test_offline_folder_layout(runs: dict[str, Any]) -> None:
    folder = runs["offline_dir"] / runs["offline_ids"]["study"]
    assert sorted(p.name for p in folder.iterdir()) == ["artifacts", "artifacts.jsonl", "images", "images.jsonl",
                                                        "metrics.jsonl", "run.json"]
    meta = json.loads((folder / "run.json").read_text())
    assert meta["status"] == "FINISHED" and meta["experiment"] == EXPERIMENT and meta["parent_run_id"] is None
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {"key": "loss", "value": 1.25, "step": 1, "timestamp": lines[2]["timestamp"]} in lines
    child = json.loads((runs["offline_dir"] / runs["offline_ids"]["trial ok"] / "run.json").read_text())
    assert child["parent_run_id"] == runs["offline_ids"]["study"]
    assert not [p for p in runs["offline_dir"].iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_sync_reproduces_the_online_runs(runs: dict[str, Any]) -> None:
    online = experiment_snapshot(runs["online"], EXPERIMENT)
    synced = experiment_snapshot(runs["synced"], EXPERIMENT)
    assert sorted(online) == ["study", "trial failed", "trial ok"]
    assert runs["summary"].imported.keys() == set(runs["offline_ids"].values())
    for name in online:
        assert synced[name] == online[name], name
    study = online["study"]
    assert study["status"] == "FINISHED" and online["trial failed"]["status"] == "FAILED"
    assert online["trial ok"]["parent"] == online["trial failed"]["parent"] == "study"
    assert study["metrics"]["loss"] == [(0, 1_700_000_000_000 + 1000, 2.5), (1, 1_700_000_000_000 + 2000, 1.25)]
    assert [step for step, _, _ in study["metrics"]["acc"]] == [0, 1] and study["metrics"]["acc"][1][2] == "nan"
    images = sorted(p for p in study["artifacts"] if p.startswith("images/"))
    assert [p.split("+")[2] for p in images] == ["0", "0", "3", "3"]  # the UI's step slider
    assert {"inputs/a.txt", "tree/a.txt", "tree/sub/b.bin", "notes/hello.txt", "config/params.json",
            "figures/curve.png", "provenance/pip-freeze.txt"} <= set(study["artifacts"])
    assert study["inputs"][0][:2] == ("cifar10", "ab" * 18)


def test_synced_runs_carry_their_offline_id(runs: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=runs["synced"])
    for offline_id, run_id in runs["summary"].imported.items():
        tags = client.get_run(run_id).data.tags
        assert tags[OFFLINE_ID_TAG] == offline_id and IMPORTING_TAG not in tags
        assert client.get_run(run_id).info.artifact_uri.startswith((runs["base"] / "synced" / "artifacts").as_uri())


def test_second_sync_adds_nothing(runs: dict[str, Any]) -> None:
    before = experiment_snapshot(runs["synced"], EXPERIMENT)
    summary = sync_runs(runs["offline_dir"], tracking_uri=runs["synced"])
    assert summary.imported == {} and summary.already_present == runs["summary"].imported
    assert experiment_snapshot(runs["synced"], EXPERIMENT) == before
    assert len(all_runs(runs["synced"])) == 3


# ---------------------------------------------------------------------------------------
# corrupt folders: refused naming the file, nothing imported


def _truncate_metrics(folder: Path, ids: dict[str, str]) -> Path:
    path = folder / ids["trial ok"] / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:-7])
    return path


def _bad_json_line(folder: Path, ids: dict[str, str]) -> Path:
    path = folder / ids["study"] / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1] + ['{"key": "loss", "value": \n'] + lines[1:]))
    return path


def _metric_without_step(folder: Path, ids: dict[str, str]) -> Path:
    path = folder / ids["trial ok"] / "metrics.jsonl"
    record = json.loads(path.read_text().splitlines()[0])
    del record["step"]
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    return path


def _missing_run_json(folder: Path, ids: dict[str, str]) -> Path:
    path = folder / ids["trial failed"] / "run.json"
    path.unlink()
    return path


def _missing_artifact(folder: Path, ids: dict[str, str]) -> Path:
    path = folder / ids["study"] / "artifacts" / "notes" / "hello.txt"
    path.unlink()
    return path


def _changed_artifact(folder: Path, ids: dict[str, str]) -> Path:
    path = folder / ids["study"] / "artifacts" / "tree" / "a.txt"
    path.write_text("omega\n")
    return path


def _missing_image(folder: Path, ids: dict[str, str]) -> Path:
    (path,) = list((folder / ids["study"] / "images").glob("*.npy"))[:1]
    path.unlink()
    return path


def _dangling_parent(folder: Path, ids: dict[str, str]) -> Path:
    path = folder / ids["trial ok"] / "run.json"
    meta = json.loads(path.read_text())
    meta["parent_run_id"] = "f" * 32
    path.write_text(json.dumps(meta))
    return path


def _bad_status(folder: Path, ids: dict[str, str]) -> Path:
    path = folder / ids["study"] / "run.json"
    meta = json.loads(path.read_text())
    meta["status"] = "DONE"
    path.write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def untouched_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fresh_store(tmp_path_factory, tmp_path_factory.mktemp("corrupt-store") / "mlflow.db")


@pytest.mark.parametrize("damage", [_truncate_metrics, _bad_json_line, _metric_without_step, _missing_run_json,
                                    _missing_artifact, _changed_artifact, _missing_image, _dangling_parent,
                                    _bad_status], ids=lambda f: f.__name__.strip("_"))
def test_corrupt_folder_is_refused_naming_the_file(runs: dict[str, Any], untouched_store: str, tmp_path: Path,
                                                   damage: Callable[[Path, dict[str, str]], Path]) -> None:
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "offline"
    shutil.copytree(runs["offline_dir"], folder)
    culprit = damage(folder, runs["offline_ids"])
    with pytest.raises(OfflineRunError) as info:
        sync_runs(folder, tracking_uri=untouched_store)
    assert isinstance(info.value, MatekdError)
    assert str(culprit) in str(info.value)
    assert all_runs(untouched_store) == []
    assert MlflowClient(tracking_uri=untouched_store).get_experiment_by_name(EXPERIMENT) is None


def test_not_a_folder_is_refused(tmp_path: Path, untouched_store: str) -> None:
    with pytest.raises(OfflineRunError, match=str(tmp_path / "nowhere")):
        sync_runs(tmp_path / "nowhere", tracking_uri=untouched_store)


# ---------------------------------------------------------------------------------------
# a store failing half-way, a sync killed half-way, runs left RUNNING


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> str:
    return fresh_store(tmp_path_factory, tmp_path / "store" / "mlflow.db")


def test_store_failure_rolls_back(runs: dict[str, Any], store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    real = MlflowClient.set_terminated
    calls = []

    def failing(self, run_id, *args, **kwargs):
        calls.append(run_id)
        if len(calls) == 2:  # the first run is complete, the second half-imported
            raise ConnectionError("store went away")
        return real(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", failing)
    with pytest.raises(TrackingError, match="store went away") as info:
        sync_runs(runs["offline_dir"], tracking_uri=store)
    assert "2 runs this sync had created were deleted permanently" in str(info.value)
    assert all_runs(store) == []  # hard-deleted: not even in the deleted view
    artifacts = Path(store.removeprefix("sqlite:///")).parent / "artifacts"
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))
    monkeypatch.setattr(MlflowClient, "set_terminated", real)
    summary = sync_runs(runs["offline_dir"], tracking_uri=store)  # nothing was left to block a retry
    assert len(summary.imported) == 3 and len(all_runs(store)) == 3


def test_interrupted_sync_is_redone(runs: dict[str, Any], store: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = json.dumps({**process_identity(), "matekd.pid": str(dead.pid)})
    offline_id = runs["offline_ids"]["study"]
    experiment = client.create_experiment(EXPERIMENT, artifact_location=artifact_root(store))
    partial = client.create_run(experiment, run_name="study", tags={OFFLINE_ID_TAG: offline_id, IMPORTING_TAG: owner})
    summary = sync_runs(runs["offline_dir"], tracking_uri=store)
    assert summary.replaced_partial == [partial.info.run_id] and len(summary.imported) == 3
    assert partial.info.run_id not in {r.info.run_id for r in all_runs(store)}


def test_running_runs(repo: Path, tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RUNNING run whose process is gone is imported as FAILED (end time: its last record);
    one whose process is alive on this host is skipped with its children."""
    monkeypatch.setenv("DVC_ROOT", str(repo))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "offline"
    killed = OfflineRun.create(folder, experiment="e", run_name="killed",
                               tags={"stage": "distill", **process_identity(), "matekd.pid": str(dead.pid)})
    killed.log_metrics({"loss": 1.0}, step=7)
    last = json.loads((killed.folder / "metrics.jsonl").read_text())["timestamp"]
    alive = OfflineRun.create(folder, experiment="e", run_name="alive", tags={"stage": "tune", **process_identity()})
    child = OfflineRun.create(folder, experiment="e", run_name="child", tags={"stage": "distill"},
                              parent_run_id=alive.run_id)
    child.finish("FINISHED")
    summary = sync_runs(folder, tracking_uri=store)
    assert summary.still_running == sorted([alive.run_id, child.run_id])
    assert list(summary.imported) == [killed.run_id] and summary.running_as_failed == [killed.run_id]
    from mlflow.tracking import MlflowClient

    imported = MlflowClient(tracking_uri=store).get_run(summary.imported[killed.run_id])
    assert imported.info.status == "FAILED" and imported.info.end_time == last
    assert "imported as FAILED" in imported.data.tags[SYNC_NOTE_TAG]
    alive.finish("FINISHED")  # once it ends, the next sync brings it and its child
    summary = sync_runs(folder, tracking_uri=store)
    assert set(summary.imported) == {alive.run_id, child.run_id} and not summary.still_running


def test_parent_already_imported_is_found(repo: Path, tmp_path: Path, store: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A child synced from another folder than its parent nests under the imported parent."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DVC_ROOT", str(repo))
    with start_run(enabled=True, experiment="e", run_name="parent", stage="tune", params={}, tags={},
                   mode="offline", offline_dir=tmp_path / "first") as parent:
        pass
    with start_run(enabled=True, experiment="e", run_name="child", stage="distill", params={}, tags={},
                   mode="offline", offline_dir=tmp_path / "second", parent_run_id=parent.run_id) as child:
        pass
    with pytest.raises(OfflineRunError, match="parent run"):
        sync_runs(tmp_path / "second", tracking_uri=store)
    first = sync_runs(tmp_path / "first", tracking_uri=store)
    second = sync_runs(tmp_path / "second", tracking_uri=store)
    run = MlflowClient(tracking_uri=store).get_run(second.imported[child.run_id])
    assert run.data.tags["mlflow.parentRunId"] == first.imported[parent.run_id]


def test_offline_logging_problems_warn_like_online(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What MLflow would refuse is refused at logging time (warned, training goes on), so the
    folder stays syncable."""
    monkeypatch.setenv("DVC_ROOT", str(repo))
    with start_run(enabled=True, experiment="e", run_name="r", stage="s", params={"a": 1}, tags={},
                   mode="offline", offline_dir=tmp_path) as run:
        with pytest.warns(UserWarning, match="already logged"):
            run.log_params({"a": 2})
        with pytest.warns(UserWarning, match="metric key"):
            run.log_metrics({"bad|key": 1.0}, step=0)
        with pytest.warns(UserWarning, match="leaves the run's artifact folder"):
            run.log_text("x", "../escape.txt")
        with pytest.warns(UserWarning, match="unsupported image type"):
            run.log_image([[0, 1]], "maps", 0)
        run.log_artifact(tmp_path / "missing.txt")  # skipped silently, as online
    from matekd.tracking import read_folder

    (record,) = read_folder(tmp_path).values()
    assert record.meta["params"]["a"] == "1" and record.metrics == [] and list(record.artifacts) == [
        "provenance/pip-freeze.txt"]


# ---------------------------------------------------------------------------------------
# no mlflow (the GPU machine)

NO_MLFLOW = r"""
import json, os, sys
for name in ("mlflow", "dvc", "optuna", "pydantic", "git"):  # git: GitPython
    sys.modules[name] = None
import numpy as np
from matekd import tracking
from matekd.errors import TrackingError

os.environ["MATEKD_TRACKING"] = "offline"
kwargs = dict(enabled=True, experiment="gpu", stage="distill", params={"distill.seed": 0}, tags={"device": "H200"},
              offline_dir=sys.argv[1])
with tracking.start_run(run_name="parent", **kwargs) as parent:
    parent.log_metrics({"loss": 1.5}, step=3)
    parent.log_image(np.arange(16, dtype=np.uint8).reshape(4, 4), "maps", 2)
    parent.log_artifact(__file__, "code")
    parent.log_dict({"a": 1}, "config/params.json")
    parent.log_input("cifar10", "cd" * 32, "/data/cifar10.tar.gz")
    import torch  # a torch-only builder: matekd.models imports params (pydantic)
    parent.log_model(torch.nn.Linear(4, 3), name="student", input_example=np.ones((2, 4), np.float32),
                     registered_name="matekd-student-gpu",
                     builder=tracking.ModelBuilder("torch.nn:Linear", {"in_features": 4, "out_features": 3}))
    with tracking.start_run(run_name="child", parent_run_id=parent.run_id, **kwargs) as child:
        child.log_metrics({"loss": 0.5}, step=1)
os.environ["MATEKD_TRACKING"] = "online"
try:
    with tracking.start_run(run_name="online", **kwargs):
        pass
    online_error = None
except TrackingError as exc:
    online_error = str(exc)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "dvc", "optuna", "pydantic", "git")
                and sys.modules[m] is not None)
print(json.dumps({"parent": parent.run_id, "child": child.run_id, "online_error": online_error, "loaded": loaded}))
"""


def test_offline_tracking_without_mlflow(repo: Path, tmp_path: Path, store: str) -> None:
    from mlflow.tracking import MlflowClient

    script = tmp_path / "no_mlflow.py"
    script.write_text(NO_MLFLOW)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MATEKD_"))}
    env["DVC_ROOT"] = str(repo)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "offline")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert "mlflow is not installed" in out["online_error"] and "MATEKD_TRACKING=offline" in out["online_error"]
    meta = json.loads((tmp_path / "offline" / out["parent"] / "run.json").read_text())
    assert meta["tags"]["mlflow.source.git.commit"] == git(repo, "rev-parse", "HEAD")  # by the git CLI
    assert meta["tags"]["mlflow.source.name"] == "matekd distill" and meta["tags"]["mlflow.user"]
    assert len(meta["tags"]["matekd.source_sha256"]) == 64 and len(meta["models"]) == 1
    summary = sync_runs(tmp_path / "offline", tracking_uri=store)  # what the GPU box wrote syncs here
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(summary.imported[out["parent"]])
    child = client.get_run(summary.imported[out["child"]])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "loss")] == [(3, 1.5)]
    images = [a.path for a in client.list_artifacts(parent.info.run_id, "images")]
    assert len(images) == 2 and all(p.startswith("images/maps+step+2+") for p in images)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"code", "config", "provenance", "images"}
    (version,) = client.search_model_versions("name = 'matekd-student-gpu'")  # recorded without mlflow, logged here
    assert version.run_id == parent.info.run_id and summary.models == [
        f"student of run {out['parent']} -> matekd-student-gpu v1"]


# ---------------------------------------------------------------------------------------
# a record file missing is refused (never read as empty); run.json is replaced atomically


def _small_run(root: Path) -> OfflineRun:
    run = OfflineRun.create(root, experiment="e", run_name="r", tags={"t": 1})
    run.log_metrics({"loss": 0.5}, step=1)
    return run


@pytest.mark.parametrize("name", ["metrics.jsonl", "artifacts.jsonl", "images.jsonl"])
def test_a_missing_record_file_is_refused_not_read_as_empty(tmp_path: Path, name: str) -> None:
    from matekd.tracking import read_folder

    run = _small_run(tmp_path / "offline")
    run.finish()
    (run.folder / "images.jsonl").write_text("")       # present and empty: a run that logged none
    assert len(read_folder(tmp_path / "offline")[run.run_id].metrics) == 1
    (run.folder / name).unlink()
    with pytest.raises(OfflineRunError, match=f"{run.folder / name}: missing"):
        read_folder(tmp_path / "offline")
    with pytest.raises(OfflineRunError, match=f"{run.folder / name}: missing"):
        sync_runs(tmp_path / "offline", tracking_uri=f"sqlite:///{tmp_path / 'never.db'}")
    assert not (tmp_path / "never.db").exists()          # refused before the store was touched


def test_a_run_record_write_failing_part_way_keeps_the_old_record(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from matekd.tracking.offline import read_run

    run = _small_run(tmp_path / "offline")
    run.set_tags({"stage": "one"})
    before = (run.folder / "run.json").read_bytes()
    real_dump = json.dump

    def dump_half_then_fail(obj: Any, handle: Any, **kwargs: Any) -> None:
        text = json.dumps(obj, **kwargs)
        handle.write(text[: len(text) // 2])           # the disk fills half-way through the record
        handle.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_half_then_fail)
    with pytest.warns(UserWarning, match="set_tags failed .*No space left on device"):
        run.set_tags({"stage": "two"})
    monkeypatch.setattr(json, "dump", real_dump)
    assert (run.folder / "run.json").read_bytes() == before
    assert read_run(run.folder).meta["tags"]["stage"] == "one"
    assert sorted(p.name for p in run.folder.iterdir()) == ["artifacts.jsonl", "images.jsonl", "metrics.jsonl",
                                                            "run.json"]   # no temp file left behind
    run.finish()                                         # the next write carries the change that failed
    assert read_run(run.folder).meta["tags"]["stage"] == "two"
