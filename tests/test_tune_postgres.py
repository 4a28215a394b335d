"""Distributed tuning: two worker processes on one study in a throw-away PostgreSQL server.

The server runs from Debian's `postgresql` binaries in a temporary folder, listens on loopback
only and is stopped at the end. Without the binaries (or psycopg2) the test is skipped, unless
MATEKD_REQUIRE_POSTGRES=1 (CI) turns the skip into a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml

import helpers_data as h
from matekd import tuning
from matekd.params import load_params
from matekd.stages.tune import run_tune
from matekd.tuning.recovery import ATTR_DEVICE, ATTR_PID, ATTR_WORKER

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TrialState = optuna.trial.TrialState
pytestmark = pytest.mark.postgres


def fake_train(params, specs, data, device, runs, checkpoint, progress=True, epoch_hook=None,
               with_test=True, outputs_loader=None):
    """Stands in for students.train_students: val_acc is a known function of the learning rate.
    Every worker's first trial waits until both workers have one, so both must contribute."""
    if with_test:
        raise AssertionError("the tuning objective must never ask for the test set")
    folder = Path(os.environ["FAKE_BARRIER_DIR"])
    (folder / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(folder.iterdir())) < 2:
        if time.time() > deadline:
            raise TimeoutError("the second worker never started a trial")
        time.sleep(0.05)
    recipe = specs[0].distill.recipe
    history = []
    for epoch in range(1, recipe.epochs + 1):
        time.sleep(0.2)
        record = {"epoch": epoch, "val_acc": 0.5 + 0.1 * epoch - recipe.lr}
        history.append(record)
        if epoch_hook is not None:
            epoch_hook(epoch, [record])
    return [SimpleNamespace(spec=specs[0], result=SimpleNamespace(history=history))]


def _unavailable(reason: str) -> None:
    if os.environ.get("MATEKD_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL test required but {reason}")
    pytest.skip(reason)


def pg_bin() -> Path:
    """The folder with initdb/pg_ctl: on PATH, else the newest /usr/lib/postgresql/<ver>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        _unavailable("no PostgreSQL server binaries (apt-get install postgresql)")
    return Path(candidates[-1]).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A PostgreSQL cluster in a temporary folder, run as `postgres` when we are root
    (initdb refuses to run as root)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.prefix: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                _unavailable("running as root and there is no `postgres` user to run the server")
            runuser = shutil.which("runuser")
            if runuser is None:
                _unavailable("running as root without `runuser`")
            self.prefix = [runuser, "-u", "postgres", "--"]
        # Under /tmp (not pytest's 0700 tmp_path) so that the `postgres` user can reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="matekd-pg-"))
        if owner is not None:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        self.data = self.folder / "data"
        self.port = free_port()

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}\n{tail}")
        return proc

    def start(self) -> str:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "matekd", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")
        return f"postgresql://matekd@127.0.0.1:{self.port}/postgres"

    def running(self) -> bool:
        return self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def stop(self) -> None:
        if self.data.exists() and self.running():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_two_workers_share_one_study_in_postgresql(tmp_path, monkeypatch):
    try:
        import psycopg2
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install psycopg2-binary)")
    server = Server(pg_bin())
    try:
        url = server.start()
        assert accepts_connections(server.port)

        root = tmp_path / "ws"
        root.mkdir()
        shutil.copy(ROOT / "profiles" / "tiny.yaml", root / "params.yaml")
        monkeypatch.chdir(root)
        h.write_image_folder(root / "data", train_per_class=8, test_per_class=3, fmt="png", as_dir=True)
        from matekd.stages.prepare import run_prepare

        run_prepare(load_params("params.yaml", {"device": "cpu"}))
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        monkeypatch.setenv("FAKE_BARRIER_DIR", str(barrier))
        # The `ce` student needs no teacher files: this test is about the storage and the workers.
        params = load_params("params.yaml", {
            "device": "cpu", "tune.methods": ["ce"], "tune.n_trials": 6, "tune.epochs": 2, "tune.pruner": "none",
            "tune.study_name": "pg-study", "tune.space": {"lr": {"low": 0.01, "high": 0.3, "log": True}}})
        summary = run_tune(params, storage=url, workers=2, trainer=fake_train, progress=False)["ce"]

        assert not Path("tuning/optuna.db").exists()  # nothing went to the default SQLite file
        study = optuna.load_study(study_name="pg-study-ce", storage=tuning.resolve_storage(url).open())
        assert study.metric_names == ["val_acc"]
        trials = study.get_trials()
        numbers = [t.number for t in trials]
        assert sorted(numbers) == list(range(6)) and len(set(t._trial_id for t in trials)) == 6
        assert all(t.state == TrialState.COMPLETE for t in trials)
        for t in trials:  # each trial's value is the one its own parameters give
            assert t.value == pytest.approx(0.7 - t.params["distill.recipe.lr"])
        workers = [t.user_attrs[ATTR_WORKER] for t in trials]
        pids = {t.user_attrs[ATTR_PID] for t in trials}
        assert set(workers) == {0, 1} and len(pids) == 2 and os.getpid() not in pids
        assert {t.user_attrs[ATTR_DEVICE] for t in trials} == {"cpu"}
        assert yaml.safe_load(Path("tuning/best/ce.yaml").read_text())["values"] == {
            "distill.recipe.lr": study.best_trial.params["distill.recipe.lr"]}
        assert summary["trials"]["complete"] == 6 and summary["storage"] == url
        # Every trial recorded once, directly in the database.
        with psycopg2.connect(host="127.0.0.1", port=server.port, user="matekd", dbname="postgres") as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT number, count(*) FROM trials GROUP BY number HAVING count(*) > 1")
                assert cur.fetchall() == []
                cur.execute("SELECT count(*) FROM trials")
                assert cur.fetchone()[0] == 6
        conn.close()
    finally:
        server.stop()
        stopped = not server.running()
        port = server.port
        server.remove()
    assert stopped and not accepts_connections(port)
