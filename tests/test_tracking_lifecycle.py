"""How runs end and where they go: SIGTERM closes a run as KILLED; a run a SIGKILLed process
left RUNNING becomes FAILED at the next start of its stage (never one of a live process or of
another host); a copied or moved checkout logs into its own mlruns/; a DVC experiment executor
folder logs into the repository that queued it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from matekd.tracking import (
    OfflineRun,
    RunInterrupted,
    process_identity,
    read_folder,
    start_run,
    store_root,
    tracking_uri,
    workspace_root,
)
from matekd.tracking.lifecycle import STALE_TAG, host_identity, owned_by_dead_process
from matekd.tracking.roots import split_exps
from test_tracking_common import clear_tracking_env, fresh_store, git, local_path, make_git_repo


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_tracking_env(monkeypatch)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working copy


def kwargs(**overrides: Any) -> dict[str, Any]:
    values = dict(enabled=True, experiment="lifecycle", run_name="unit", stage="distill", params={"a": 1}, tags={})
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_git_repo(tmp_path_factory.mktemp("lifecycle") / "repo")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fresh_store(tmp_path_factory, tmp_path_factory.mktemp("lifecycle-store") / "mlflow.db")


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ---------------------------------------------------------------------------------------
# signals

HOLD_RUN = r"""
import sys, time
from matekd.tracking import start_run
with start_run(enabled=True, experiment="lifecycle", run_name=sys.argv[1], stage=sys.argv[2], params={},
               tags={}) as run:
    print(run.run_id, flush=True)
    while True:
        time.sleep(0.05)
"""


def hold_run(tmp_path: Path, repo: Path, store: str, name: str, stage: str) -> subprocess.Popen:
    """A process that opens a run and waits (its first output line is the run id)."""
    script = tmp_path / "hold_run.py"
    script.write_text(HOLD_RUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MATEKD_"))}
    env.update(MLFLOW_TRACKING_URI=store, DVC_ROOT=str(repo), MATEKD_TRACKING="online")
    proc = subprocess.Popen([sys.executable, str(script), name, stage], env=env, cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()[-3000:]
    return line


def test_sigterm_and_sigkill(repo: Path, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM: the run ends KILLED. SIGKILL: the run stays RUNNING, and the next start of the
    same stage on this host closes it as FAILED, leaving alone the runs of live processes, of
    other hosts, of other stages and the one whose pid now belongs to another process."""
    termed = hold_run(tmp_path, repo, store, "termed", "evaluate")
    killed = hold_run(tmp_path, repo, store, "killed", "distill")
    termed_id, killed_id = first_line(termed), first_line(killed)
    termed.send_signal(signal.SIGTERM)
    killed.kill()
    assert termed.wait(timeout=60) != 0
    killed.wait(timeout=60)  # reaped: a zombie would still answer kill(pid, 0)
    client = client_for(store)
    termed_run = client.get_run(termed_id)
    assert termed_run.info.status == "KILLED" and termed_run.info.end_time is not None
    assert client.get_run(killed_id).info.status == "RUNNING"

    experiment = client.get_experiment_by_name("lifecycle").experiment_id
    me = process_identity()
    live = client.create_run(experiment, run_name="live worker", tags={"stage": "distill", **me}).info.run_id
    elsewhere = client.create_run(experiment, run_name="other host", tags={
        "stage": "distill", "matekd.host": "elsewhere.example", "matekd.pid": str(killed.pid)}).info.run_id
    # Another container with our host name: its pids are not ours to check.
    container = client.create_run(experiment, run_name="other container", tags={
        "stage": "distill", "matekd.host": f"{socket.gethostname()}/0123456789ab/1", "matekd.pid": str(killed.pid)}
    ).info.run_id
    reused = client.create_run(experiment, run_name="reused pid", tags={
        "stage": "distill", **me, "matekd.pid_start": "1"}).info.run_id  # our pid, but not our process
    untagged = client.create_run(experiment, run_name="no pid tags", tags={"stage": "distill"}).info.run_id
    dead_process = {k: v for k, v in client.get_run(killed_id).data.tags.items() if k.startswith("matekd.")}
    other_stage_id = client.create_run(experiment, run_name="other stage",
                                       tags={"stage": "cache", **dead_process}).info.run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    before = int(time.time() * 1000)
    with start_run(**kwargs(run_name="next")) as run:
        new_id = run.run_id
        killed_run = client.get_run(killed_id)
        assert killed_run.info.status == "FAILED" and killed_run.info.end_time >= before
        assert f"process {killed.pid} on {host_identity()} ended" in killed_run.data.tags[STALE_TAG]
        assert client.get_run(reused).info.status == "FAILED"
        for run_id in (live, elsewhere, container, untagged, other_stage_id):
            assert client.get_run(run_id).info.status == "RUNNING"
        assert client.get_run(new_id).info.status == "RUNNING"
    assert client.get_run(new_id).info.status == "FINISHED"
    for run_id in (live, elsewhere, container, untagged, other_stage_id):
        client.set_terminated(run_id, "FINISHED")


def test_sigterm_in_process_raises_and_restores_handlers(tmp_path: Path, repo: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(repo))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RunInterrupted) as info:
        with start_run(**kwargs(mode="offline", offline_dir=tmp_path, run_name="parent")) as run:
            assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
            with start_run(**kwargs(mode="offline", offline_dir=tmp_path, run_name="child",
                                    parent_run_id=run.run_id)) as child:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
    assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    records = read_folder(tmp_path)
    assert records[run.run_id].meta["status"] == records[child.run_id].meta["status"] == "KILLED"


def test_ignored_sigint_stays_ignored_and_threads_are_left_alone(tmp_path: Path, repo: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(repo))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with start_run(**kwargs(mode="offline", offline_dir=tmp_path)):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with start_run(**kwargs(mode="offline", offline_dir=tmp_path, run_name="thread")):
                pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors == []
    assert sorted(r.meta["status"] for r in read_folder(tmp_path).values()) == ["FINISHED", "FINISHED"]


def test_stale_offline_run_is_closed_at_the_next_start(tmp_path: Path, repo: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(repo))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = OfflineRun.create(tmp_path, experiment="lifecycle", run_name="killed",
                              tags={"stage": "distill", **process_identity(), "matekd.pid": str(dead.pid)})
    live = OfflineRun.create(tmp_path, experiment="lifecycle", run_name="live",
                             tags={"stage": "distill", **process_identity()})
    with start_run(**kwargs(mode="offline", offline_dir=tmp_path)):
        pass
    records = read_folder(tmp_path)
    assert records[stale.run_id].meta["status"] == "FAILED" and STALE_TAG in records[stale.run_id].meta["tags"]
    assert records[live.run_id].meta["status"] == "RUNNING"
    live.finish()


# ---------------------------------------------------------------------------------------
# where the store is: copied and moved checkouts, DVC experiment executor folders


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with its default store (mlruns/mlflow.db) and one finished run in it."""
    root = make_git_repo(tmp_path_factory.mktemp("checkout") / "original")
    fresh_store(tmp_path_factory, root / "mlruns" / "mlflow.db")
    return root


def _run_in(root: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    monkeypatch.setenv("DVC_ROOT", str(root))
    with start_run(**kwargs(run_name=name)) as run:
        run.log_text(f"written by {name}\n", "notes/who.txt")
        run_id = run.run_id
    client = client_for(tracking_uri())
    return run_id, client.get_run(run_id)


def test_copied_and_moved_checkout_log_into_their_own_store(checkout: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    original_id, original = _run_in(checkout, "original", monkeypatch)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # (mlflow.set_tracking_uri would export it)
    assert tracking_uri() == f"sqlite:///{checkout}/mlruns/mlflow.db"
    assert local_path(original.info.artifact_uri).is_relative_to(checkout / "mlruns" / "artifacts")

    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy)
    copy_id, copied = _run_in(copy, "in the copy", monkeypatch)
    folder = local_path(copied.info.artifact_uri)
    assert folder.is_relative_to(copy / "mlruns" / "artifacts")
    assert (folder / "notes" / "who.txt").read_text() == "written by in the copy\n"
    assert not (checkout / "mlruns" / "artifacts" / copy_id).exists()
    # the copy's store shows its copies of the old artifacts; the original's store is untouched
    old_in_copy = client_for(tracking_uri()).get_run(original_id)
    assert local_path(old_in_copy.info.artifact_uri).is_relative_to(copy / "mlruns" / "artifacts")
    experiment = client_for(tracking_uri()).get_experiment_by_name("lifecycle")
    assert local_path(experiment.artifact_location) == copy / "mlruns" / "artifacts"
    original_store = client_for(f"sqlite:///{checkout}/mlruns/mlflow.db")
    assert original_store.get_run(original_id).info.artifact_uri == original.info.artifact_uri
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="not found"):
        original_store.get_run(copy_id)

    moved = tmp_path / "moved"
    copy.rename(moved)
    moved_id, in_moved = _run_in(moved, "after the move", monkeypatch)
    assert local_path(in_moved.info.artifact_uri).is_relative_to(moved / "mlruns" / "artifacts")
    assert (local_path(in_moved.info.artifact_uri) / "notes" / "who.txt").exists()
    previous = client_for(tracking_uri()).get_run(copy_id)
    assert (local_path(previous.info.artifact_uri) / "notes" / "who.txt").read_text() == "written by in the copy\n"


def test_split_exps() -> None:
    assert split_exps(Path("/r/.dvc/tmp/exps/tmpab12/src")) == (Path("/r"), Path("/r/.dvc/tmp/exps/tmpab12"))
    assert split_exps(Path("/r/.dvc/tmp/exps/standalone/tmpab12"))[0] == Path("/r")
    assert split_exps(Path("/r/.dvc/tmp/exps")) is None
    assert split_exps(Path("/r/src")) is None


@pytest.mark.parametrize(("executor_dir", "dvc_root"), [("tmp2xuevslx", "queuing repo"),
                                                     ("standalone/tmpei65gn7z", "queuing repo"),
                                                     ("standalone/tmpbyhand", "unset")])
def test_dvc_executor_folder_logs_into_the_queuing_repo(checkout: Path, monkeypatch: pytest.MonkeyPatch,
                                                        executor_dir: str, dvc_root: str) -> None:
    """Queued experiments run in <repo>/.dvc/tmp/exps/<tmp>/, `dvc exp run --temp` in
    <repo>/.dvc/tmp/exps/standalone/<tmp>/: git checkouts of their own. DVC >= 3 sets DVC_ROOT to
    <repo> there; a command run by hand in such a folder has no DVC_ROOT. Either way: the store
    is <repo>'s, the git provenance the executor's."""
    executor = checkout / ".dvc" / "tmp" / "exps" / executor_dir
    make_git_repo(executor, content=f"profile: tiny\nexecutor: {executor_dir}\n")
    (executor / "src").mkdir()
    monkeypatch.chdir(executor / "src")
    if dvc_root == "queuing repo":
        monkeypatch.setenv("DVC_ROOT", str(checkout))
    monkeypatch.setenv("DVC_EXP_NAME", "quick-wren")
    assert store_root() == checkout and workspace_root() == executor
    assert tracking_uri() == f"sqlite:///{checkout}/mlruns/mlflow.db"
    with start_run(**kwargs(run_name=f"executor {executor_dir}")) as run:
        run.log_text("x", "x.txt")
        run_id = run.run_id
    got = client_for(f"sqlite:///{checkout}/mlruns/mlflow.db").get_run(run_id)
    assert local_path(got.info.artifact_uri).is_relative_to(checkout / "mlruns" / "artifacts")
    assert got.data.tags["dvc.exp_name"] == "quick-wren"
    assert got.data.tags["mlflow.source.git.commit"] == got.data.tags["git_commit"] == git(executor, "rev-parse",
                                                                                               "HEAD")
    assert got.data.tags["mlflow.source.git.commit"] != git(checkout, "rev-parse", "HEAD")
    assert not (executor / "mlruns").exists() and not (executor / "src" / "mlruns").exists()


def test_one_host_identity_for_runs_and_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host name, machine id and pid namespace: tracking's run tags and tuning's trial claims
    record the same identity, and a pid recorded under another identity is never judged here."""
    import optuna

    from matekd.tuning import recovery

    monkeypatch.setattr(socket, "gethostname", lambda: "box")
    identity = host_identity()
    parts = identity.split("/")
    assert parts[0] == "box" and parts[-1] == str(os.stat("/proc/self/ns/pid").st_ino)
    machine = next((Path(p).read_text().strip()[:12] for p in ("/etc/machine-id", "/var/lib/dbus/machine-id")
                    if Path(p).is_file()), None)
    assert parts[1:-1] == ([machine] if machine else [])
    assert process_identity()["matekd.host"] == identity
    study = optuna.create_study()
    recovery.claim(study.ask(), "session", 0, "cpu")
    assert study.trials[0].user_attrs[recovery.ATTR_HOST] == identity
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert owned_by_dead_process({"matekd.host": identity, "matekd.pid": str(dead.pid)})
    assert not owned_by_dead_process({"matekd.host": "box", "matekd.pid": str(dead.pid)})   # host name only
    assert not owned_by_dead_process({"matekd.host": f"box/{'f' * 12}/1", "matekd.pid": str(dead.pid)})
