"""matekd tune: space validation, storages, pruning, resume after SIGKILL, MLflow nesting, workers.

Most tests replace the student training by `fake_train`, whose validation accuracy is a known
function of the trial's parameters, so pruning and "best trial" have independent expected
answers. One slow test runs the real student on the tiny profile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml

import helpers_data as h
from matekd import cli, tune
from matekd.errors import MatekdError, ParamsError
from matekd.params import load_params

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TrialState = optuna.trial.TrialState

GOOD = {"kd_temperature": 4.0, "similarity_temperature": 0.2, "attribution_weight": 0.1}


# ----------------------------------------------------------------------------------------
# The fake student: accuracy is a known function of the parameters


def fake_accuracy(ce_weight: float, epoch: int) -> float:
    """Bad region ce_weight >= 0.5: stuck at chance. Good region: rises with epochs, and the
    lower ce_weight, the better (so the best trial is the good one with the smallest ce_weight)."""
    if ce_weight >= 0.5:
        return 0.1
    return 0.5 + 0.1 * epoch - 0.2 * ce_weight


def fake_train(params, method, seed, data, device, run, checkpoint, progress=True, epoch_hook=None,
               with_test=True, signals_loader=None):
    """Stands in for student.train_student (same signature)."""
    if with_test:
        raise AssertionError("the tuning objective must never ask for the test set")
    delay = float(os.environ.get("FAKE_EPOCH_SECONDS", "0"))
    barrier(os.environ.get("FAKE_BARRIER_DIR"), int(os.environ.get("FAKE_BARRIER_N", "0")))
    history = []
    for epoch in range(1, params.distill.recipe.epochs + 1):
        time.sleep(delay)
        record = {"epoch": epoch, "val_acc": fake_accuracy(params.distill.ce_weight, epoch),
                  "train_loss": 1.0 / epoch, "lr": params.distill.recipe.lr}
        history.append(record)
        if epoch_hook is not None:
            epoch_hook(epoch, record)
        kill_once(os.environ.get("FAKE_KILL_ONCE_FILE"))
    return SimpleNamespace(result=SimpleNamespace(history=history))


def kill_once(marker: str | None) -> None:
    """The first process to claim `marker` dies by SIGKILL in the middle of its trial."""
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def barrier(folder: str | None, parties: int, timeout: float = 120.0) -> None:
    """Hold every worker's first trial until `parties` worker processes have started one, so
    that a fast worker cannot take all the trials before a slow one has imported torch."""
    if not folder or parties < 2:
        return
    Path(folder, str(os.getpid())).touch()
    deadline = time.time() + timeout
    while len(list(Path(folder).iterdir())) < parties:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(list(Path(folder).iterdir()))} of {parties} workers started")
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------
# Workspaces


def build_workspace(root: Path, train_teachers: bool = False) -> Path:
    """Tiny-profile project folder with prepared synthetic data and teacher files (placeholder
    bytes, or really trained teachers and CAM caches)."""
    root.mkdir(parents=True)
    shutil.copy(ROOT / "profiles" / "tiny.yaml", root / "params.yaml")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        h.write_image_folder(root / "data", train_per_class=8, test_per_class=3, fmt="png", as_dir=True)
        params = load_params("params.yaml", {"device": "cpu"})
        from matekd.data import run_prepare

        run_prepare(params)
        if train_teachers:
            from matekd.cache import run_cache
            from matekd.teachers import run_train_teacher

            for name in params.teachers:
                run_train_teacher(params, name, progress=False)
                run_cache(params, name)
        else:
            for name in params.teachers:
                for path in (root / "models" / "teachers" / f"{name}.safetensors", root / "cams" / f"{name}.safetensors"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(f"placeholder {name}".encode())
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="session")
def base_workspace(tmp_path_factory) -> Path:
    old = os.environ.get("MATEKD_TRACKING")
    os.environ["MATEKD_TRACKING"] = "off"
    try:
        return build_workspace(tmp_path_factory.mktemp("tune") / "ws")
    finally:
        if old is None:
            os.environ.pop("MATEKD_TRACKING", None)
        else:
            os.environ["MATEKD_TRACKING"] = old


@pytest.fixture
def ws(base_workspace, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(base_workspace, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0")
    return root


def tiny(**overrides):
    base = {"device": "cpu", "tune.n_trials": 6, "tune.epochs": 3, "tune.pruner_startup_trials": 2,
            "tune.pruner_warmup_epochs": 1}
    base.update(overrides)
    return load_params("params.yaml", base)


def load(study_name: str = "matekd-tiny", storage: str = "tuning/optuna.db"):
    return optuna.load_study(study_name=study_name, storage=tune.resolve_storage(storage).open())


def enqueue(params, rows: list[dict]) -> None:
    study = optuna.create_study(study_name=params.tune.study_name, direction="maximize",
                                storage=tune.resolve_storage(params.tune.storage).open())
    for row in rows:
        study.enqueue_trial({**GOOD, **row})


# ----------------------------------------------------------------------------------------
# Space and storage


@pytest.mark.parametrize("override, needle", [
    ({"tune.space.kd_temperature": {"low": 9, "high": 8}}, "low (9.0) must not exceed high (8.0)"),
    ({"tune.space.ce_weight": {"low": 0, "high": 1, "log": True}}, "log range needs low > 0"),
    ({"tune.space.dropout": {"low": 0, "high": 1}}, "unknown parameter 'dropout'"),
])
def test_invalid_space_refused_at_load(ws, override, needle):
    with pytest.raises(ParamsError, match="tune.space") as err:
        load_params("params.yaml", override)
    assert needle in str(err.value)


def test_invalid_space_refused_by_the_cli(ws, capsys):
    code = cli.main(["tune", "-S", "tune.space.similarity_temperature={low: 0, high: 2, log: true}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid params") and "tune.space.similarity_temperature" in err
    assert not Path("tuning/optuna.db").exists()


@pytest.mark.parametrize("override, needle", [
    ({"tune.space.ce_weight": {"low": 0, "high": 2}}, "tune.space.ce_weight.high = 2.0 is not a valid distill.ce_weight"),
    ({"tune.space.lr": {"low": 0, "high": 0.1}}, "tune.space.lr.low = 0.0 is not a valid distill.recipe.lr"),
    ({"tune.space.similarity_temperature_end": {"low": 0.1, "high": 1}}, "similarity_schedule_epochs"),
    ({"tune.method": "kd"}, "distill.similarity_temperature has no effect with tune.method 'kd'"),
    ({"data.val_per_class": 0}, "needs a validation split"),
])
def test_space_checked_against_the_method_and_schema(ws, override, needle):
    params = tiny(**override)
    with pytest.raises(ParamsError) as err:
        tune.run_tune(params, trainer=fake_train)
    assert needle in str(err.value)
    assert not Path("tuning/optuna.db").exists()  # refused before any study is created


def test_resolve_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tune.resolve_storage("tuning/optuna.db")
    assert (spec.kind, spec.target) == ("sqlite", f"sqlite:///{tmp_path}/tuning/optuna.db")
    assert tune.resolve_storage("tuning/study.log").kind == "journal"
    assert tune.resolve_storage("journal:x/study.any").target == str(tmp_path / "x" / "study.any")
    pg = tune.resolve_storage("postgresql://alice:s3cret@db.example:5432/optuna")
    assert pg.kind == "rdb" and "s3cret" not in pg.shown and "alice:***@db.example" in pg.shown
    assert pg.target.endswith("s3cret@db.example:5432/optuna")
    with pytest.raises(ParamsError, match="not a SQLite file"):
        tune.resolve_storage("tuning/optuna.txt")


def test_apply_values_maps_recipe_keys_and_validates(ws):
    params = tiny()
    out = tune.apply_values(params, {"lr": 0.02, "ce_weight": 0.7}, method="kd", epochs=5)
    assert out.distill.recipe.lr == 0.02 and out.distill.ce_weight == 0.7
    assert out.distill.method == "kd" and out.distill.recipe.epochs == 5
    assert params.distill.recipe.lr == 0.05 and params.distill.ce_weight == 0.3  # the original is untouched
    assert tune.param_key("lr") == "distill.recipe.lr" and tune.param_key("ce_weight") == "distill.ce_weight"


def test_pruners(ws):
    median = tune.make_pruner(tiny(**{"tune.pruner": "median"}).tune)
    assert isinstance(median, optuna.pruners.MedianPruner)
    hyper = tune.make_pruner(tiny(**{"tune.pruner": "hyperband", "tune.epochs": 9}).tune)
    assert isinstance(hyper, optuna.pruners.HyperbandPruner)
    assert (hyper._min_resource, hyper._max_resource) == (1, 9)
    assert isinstance(tune.make_pruner(tiny(**{"tune.pruner": "none"}).tune), optuna.pruners.NopPruner)


# ----------------------------------------------------------------------------------------
# Pruning, outputs, resume


def test_bad_region_is_pruned_and_best_params_written(ws):
    params = tiny()
    # Two good startup trials, then bad (ce_weight >= 0.5) and good ones alternating. Every good
    # trial after the startup beats the median of the completed ones at each epoch
    # (trial 5 at epoch 1: 0.57 > median(0.54, 0.56, 0.58)); the bad ones sit at 0.1.
    ce = [0.3, 0.2, 0.9, 0.1, 0.6, 0.15]
    enqueue(params, [{"ce_weight": c} for c in ce])
    summary = tune.run_tune(params, trainer=fake_train)

    trials = load().get_trials()
    assert [t.number for t in trials] == list(range(6))
    for trial, c in zip(trials, ce):
        assert trial.params["ce_weight"] == c
        if c >= 0.5:  # chance level after epoch 1, below the median of the completed trials
            assert trial.state == TrialState.PRUNED
            assert sorted(trial.intermediate_values) == [1]  # stopped after the first epoch
        else:
            assert trial.state == TrialState.COMPLETE
            assert sorted(trial.intermediate_values) == [1, 2, 3]
            assert trial.value == pytest.approx(fake_accuracy(c, 3))
        assert trial.user_attrs[tune.ATTR_PID] == os.getpid()
    # The best trial is the good one with the lowest ce_weight (0.1 -> trial 3).
    assert summary["best_trial"] == 3 and summary["best_value"] == pytest.approx(0.5 + 0.3 - 0.02)
    metrics = json.loads(Path("metrics/tune.json").read_text())
    assert metrics["trials"]["complete"] == 4 and metrics["trials"]["pruned"] == 2
    assert metrics["best_params_dotted"]["distill.ce_weight"] == 0.1
    assert set(metrics["importances"]) <= set(params.tune.space) and metrics["importances"]
    best = yaml.safe_load(Path("tuning/best_params.yaml").read_text())
    assert best["params"] == {"distill.kd_temperature": 4.0, "distill.similarity_temperature": 0.2,
                              "distill.ce_weight": 0.1, "distill.attribution_weight": 0.1}
    assert best["command"] == ("dvc exp run -S distill.method=mate_kd -S distill.kd_temperature=4.0 "
                               "-S distill.similarity_temperature=0.2 -S distill.ce_weight=0.1 "
                               "-S distill.attribution_weight=0.1")


def test_the_applied_command_validates_as_params(ws):
    params = tiny(**{"tune.space.lr": {"low": 0.01, "high": 0.2, "log": True}, "tune.n_trials": 2})
    summary = tune.run_tune(params, trainer=fake_train)
    sets = summary["command"].removeprefix("dvc exp run ").split(" ")
    pairs = dict(s.split("=", 1) for s in sets if s != "-S")
    applied = load_params("params.yaml", {k: yaml.safe_load(v) for k, v in pairs.items()})
    best = load().best_trial.params
    assert applied.distill.recipe.lr == best["lr"] and applied.distill.ce_weight == best["ce_weight"]


def test_sampled_study_is_seeded(ws, tmp_path):
    params = tiny(**{"tune.n_trials": 3, "tune.pruner": "none"})
    tune.run_tune(params, trainer=fake_train)
    first = [t.params for t in load().get_trials()]
    tune.run_tune(params, storage=str(tmp_path / "other.db"), trainer=fake_train)
    second = [t.params for t in load(storage=str(tmp_path / "other.db")).get_trials()]
    assert first == second and len({json.dumps(p) for p in first}) == 3


def test_resume_tops_up_and_n_trials_adds(ws):
    tune.run_tune(tiny(**{"tune.n_trials": 2}), trainer=fake_train)
    tune.run_tune(tiny(**{"tune.n_trials": 4}), trainer=fake_train)
    trials = load().get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    sessions = [t.user_attrs[tune.ATTR_SESSION] for t in trials]
    assert sessions[0] == sessions[1] != sessions[2] == sessions[3]
    tune.run_tune(tiny(**{"tune.n_trials": 4}), trainer=fake_train)  # complete: runs nothing
    assert len(load().get_trials()) == 4
    tune.run_tune(tiny(**{"tune.n_trials": 4}), n_trials=1, trainer=fake_train)  # --n-trials 1: one more
    assert len(load().get_trials()) == 5


def test_changed_settings_refused_on_resume(ws):
    tune.run_tune(tiny(**{"tune.n_trials": 1}), trainer=fake_train)
    with pytest.raises(ParamsError, match=r"other settings \(epochs: 3 -> 2\).*new tune.study_name"):
        tune.run_tune(tiny(**{"tune.n_trials": 2, "tune.epochs": 2}), trainer=fake_train)


def test_crashing_trials_fail_and_stop_the_worker(ws):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(MatekdError, match="3 trials in a row failed.*RuntimeError: boom"):
        tune.run_tune(tiny(), trainer=broken)
    assert [t.state for t in load().get_trials()] == [TrialState.FAIL] * 3


def test_missing_teacher_files_fail_before_the_study(ws):
    Path("cams/resnet56.safetensors").unlink()
    with pytest.raises(MatekdError, match=r"missing CAM cache cams/resnet56.safetensors; run `dvc repro cache@resnet56`"):
        tune.run_tune(tiny(), trainer=fake_train)


def test_journal_storage(ws):
    params = tiny(**{"tune.storage": "tuning/optuna.log", "tune.n_trials": 2})
    tune.run_tune(params, trainer=fake_train)
    assert Path("tuning/optuna.log").exists() and not Path("tuning/optuna.db").exists()
    assert len(load(storage="tuning/optuna.log").get_trials(states=(TrialState.COMPLETE,))) == 2


# ----------------------------------------------------------------------------------------
# A killed worker


KILLED_RUN = textwrap.dedent("""
    import sys
    sys.path[:0] = [{src!r}, {tests!r}]
    import torch
    torch.set_num_threads(1)
    from matekd.params import load_params
    from matekd.tune import run_tune
    from test_tune import fake_train
    params = load_params("params.yaml", {{"device": "cpu", "tune.n_trials": 3, "tune.epochs": 3,
                                         "tune.pruner": "none"}})
    run_tune(params, trainer=fake_train)
""")


def test_sigkilled_worker_trial_is_failed_and_retried_on_rerun(ws):
    env = {**os.environ, "FAKE_EPOCH_SECONDS": "2.0", "MATEKD_TRACKING": "off"}
    script = KILLED_RUN.format(src=str(ROOT / "src"), tests=str(TESTS))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ws, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and victim is None:
            time.sleep(0.2)
            if proc.poll() is not None:
                pytest.fail(f"the worker ended early:\n{proc.stdout.read().decode()[-3000:]}")
            if not Path("tuning/optuna.db").exists():
                continue
            try:
                trials = load().get_trials()
            except (KeyError, ValueError):  # study not created yet
                continue
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            # One epoch of three done: the kill lands mid-trial, well before it could complete.
            running = [t for t in trials if t.state == TrialState.RUNNING and len(t.intermediate_values) == 1]
            if done and running:
                victim = running[0]
        assert victim is not None, "no trial reached the middle of its training in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load().get_trials()[victim.number].state == TrialState.RUNNING  # left behind by the kill

    params = tiny(**{"tune.n_trials": 3, "tune.pruner": "none"})
    summary = tune.run_tune(params, trainer=fake_train)

    trials = load().get_trials()
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == victim.params
    assert retries[0].user_attrs[tune.ATTR_PID] == os.getpid()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and victim.number not in [t.number for t in complete]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert summary["trials"]["fail"] == 1 and summary["killed_trials_failed_at_start"] == [victim.number]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_orphan_check_spares_live_and_foreign_trials(ws):
    params = tiny(**{"tune.n_trials": 1})
    tune.run_tune(params, trainer=fake_train)
    study = load()
    alive = study.ask()
    alive.set_user_attr(tune.ATTR_HOST, tune.this_host())
    alive.set_user_attr(tune.ATTR_PID, os.getpid())
    foreign = study.ask()
    foreign.set_user_attr(tune.ATTR_HOST, "elsewhere/123")
    foreign.set_user_attr(tune.ATTR_PID, 999_999_999)
    assert tune.fail_orphans(study) == []
    assert {t.state for t in study.get_trials()[1:]} == {TrialState.RUNNING}


# ----------------------------------------------------------------------------------------
# MLflow


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("matekd")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_mlflow_parent_and_nested_trial_runs(ws, monkeypatch):
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    (ws / "mlruns").mkdir()
    monkeypatch.delenv("MATEKD_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tiny(**{"tune.n_trials": 4})
    enqueue(params, [{"ce_weight": c} for c in (0.3, 0.2, 0.9, 0.1)])
    summary = tune.run_tune(params, trainer=fake_train)

    client, runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(parents) == 1 and parents[0].info.run_id == summary["mlflow_parent_run_id"]
    parent = parents[0]
    children = {int(r.data.tags["optuna.trial_number"]): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == [0, 1, 2, 3]
    assert [children[n].data.tags["optuna.state"] for n in range(4)] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert {children[n].info.status for n in range(4)} == {"FINISHED"}
    curve = client.get_metric_history(children[3].info.run_id, "val_acc")
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [
        (e, pytest.approx(fake_accuracy(0.1, e))) for e in (1, 2, 3)]
    assert [m.step for m in client.get_metric_history(children[2].info.run_id, "val_acc")] == [1]
    assert children[3].data.params["ce_weight"] == "0.1"
    assert parent.data.metrics["best/val_acc"] == pytest.approx(fake_accuracy(0.1, 3))
    assert parent.data.metrics["best/ce_weight"] == 0.1
    assert any(k.startswith("importance/") for k in parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/param_importances.png", "tune/summary.json"} <= artifacts

    # Resuming the study continues the same parent run and logs only the new trial.
    tune.run_tune(tiny(**{"tune.n_trials": 5}), trainer=fake_train)
    client, runs = _runs(uri)
    assert len([r for r in runs if r.data.tags.get("stage") == "tune"]) == 1
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs
                     if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert numbers == [0, 1, 2, 3, 4]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


# ----------------------------------------------------------------------------------------
# Several worker processes on the default SQLite file, one of them killed


def test_worker_processes_share_the_sqlite_study_and_a_killed_one_is_failed(ws, monkeypatch, tmp_path):
    (tmp_path / "barrier").mkdir()
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.2")
    monkeypatch.setenv("FAKE_BARRIER_DIR", str(tmp_path / "barrier"))
    monkeypatch.setenv("FAKE_BARRIER_N", "2")
    monkeypatch.setenv("FAKE_KILL_ONCE_FILE", str(tmp_path / "killed"))
    params = tiny(**{"tune.n_trials": 4, "tune.epochs": 2, "tune.pruner": "none"})
    with pytest.raises(MatekdError, match=r"worker [01] was killed by signal 9.*Run `matekd tune` again"):
        tune.run_tune(params, workers=2, trainer=fake_train)

    victim_pid = int((tmp_path / "killed").read_text())
    trials = load().get_trials()
    pids = {t.user_attrs.get(tune.ATTR_PID) for t in trials} - {None}
    assert victim_pid in pids and len(pids) == 2 and os.getpid() not in pids  # both workers took trials
    victims = [t for t in trials if t.user_attrs.get(tune.ATTR_PID) == victim_pid]
    assert len(victims) == 1 and victims[0].state == TrialState.FAIL
    assert sorted(victims[0].intermediate_values) == [1]  # it died in the middle of its trial
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victims[0].number]
    assert len(retry) == 1 and retry[0].params == victims[0].params

    summary = tune.run_tune(params, trainer=fake_train)  # the rerun finishes the study
    trials = load().get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert trials[retry[0].number].state == TrialState.COMPLETE
    assert summary["trials"]["complete"] == 4 and summary["trials"]["fail"] == 1


# ----------------------------------------------------------------------------------------
# The real student on the tiny profile (acceptance)


@pytest.mark.slow
def test_six_trial_study_on_the_tiny_profile(tmp_path, monkeypatch):
    root = build_workspace(tmp_path / "ws", train_teachers=True)
    monkeypatch.chdir(root)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    monkeypatch.delenv("MATEKD_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from matekd import student

    loads = {"cache": 0, "teacher": 0}
    real_cache, real_teacher = student.load_cache, student.load_teacher

    def counting_cache(*a, **k):
        loads["cache"] += 1
        return real_cache(*a, **k)

    def counting_teacher(*a, **k):
        loads["teacher"] += 1
        return real_teacher(*a, **k)

    monkeypatch.setattr(student, "load_cache", counting_cache)
    monkeypatch.setattr(student, "load_teacher", counting_teacher)
    # The learning-rate range reaches values that make training diverge: that region is pruned.
    params = load_params("params.yaml", {"device": "cpu", "tune.n_trials": 6, "tune.epochs": 2,
                                         "tune.space.lr": {"low": 0.01, "high": 1.0e4, "log": True}})
    summary = tune.run_tune(params)

    trials = load().get_trials()
    assert len(trials) == 6 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert summary["trials"]["pruned"] >= 1 and summary["trials"]["complete"] >= 1
    assert loads == {"cache": 2, "teacher": 2}  # two teachers, loaded once for all six trials
    client, runs = _runs(uri)
    parent = next(r for r in runs if r.data.tags.get("stage") == "tune")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 6
    for child in children:
        trial = trials[int(child.data.tags["optuna.trial_number"])]
        assert child.data.tags["optuna.state"] == trial.state.name
        curve = client.get_metric_history(child.info.run_id, "val_acc")
        assert sorted(m.step for m in curve) == sorted(trial.intermediate_values)
        assert {"train_loss", "train_acc"} <= set(child.data.metrics) or not trial.intermediate_values
    best = yaml.safe_load(Path("tuning/best_params.yaml").read_text())
    assert best["best_trial"] == summary["best_trial"] and "distill.recipe.lr" in best["params"]
