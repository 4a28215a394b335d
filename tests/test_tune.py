"""matekd tune: one study per method, alike; space checks, storages, pruning, resume after
SIGKILL, MLflow parent/child runs, worker processes, worker-to-GPU assignment.

Most tests replace the student training by `fake_train`, whose validation accuracy is a known
function of the trial's values, so pruning and "best trial" have independent expected answers.
One slow test runs the real student on the tiny profile.
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
from matekd import cli, methods, tuning
from matekd.errors import MatekdError, ParamsError
from matekd.params import load_params
from matekd.stages.tune import run_tune
from matekd.training.students import resolve_spec
from matekd.tuning import recovery

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TrialState = optuna.trial.TrialState
ALL_METHODS = list(methods.METHODS)
# The values of mate_kd's other keys in enqueued trials.
GOOD = {"distill.kd_temperature": 4.0, "distill.similarity_temperature": 0.2, "distill.attribution_weight": 0.1,
        "distill.recipe.lr": 0.05}
CLAIM = {recovery.ATTR_HOST, recovery.ATTR_PID, recovery.ATTR_PID_START, recovery.ATTR_SESSION,
         recovery.ATTR_WORKER, recovery.ATTR_DEVICE}


# ----------------------------------------------------------------------------------------
# The fake student: accuracy is a known function of the values


def fake_accuracy(ce_weight: float, epoch: int) -> float:
    """Bad region ce_weight >= 0.5: stuck at chance. Good region: rises with epochs, and the
    lower ce_weight, the better (so the best trial is the good one with the smallest ce_weight)."""
    if ce_weight >= 0.5:
        return 0.1
    return 0.5 + 0.1 * epoch - 0.2 * ce_weight


def fake_train(params, specs, data, device, runs, checkpoint, progress=True, epoch_hook=None, with_test=True,
               outputs_loader=None):
    """Stands in for students.train_students (same signature)."""
    if with_test:
        raise AssertionError("the tuning objective must never ask for the test set")
    assert len(specs) == 1 and len(runs) == 1 and checkpoint is None
    distill = specs[0].distill
    delay = float(os.environ.get("FAKE_EPOCH_SECONDS", "0"))
    barrier(os.environ.get("FAKE_BARRIER_DIR"), int(os.environ.get("FAKE_BARRIER_N", "0")))
    history = []
    for epoch in range(1, distill.recipe.epochs + 1):
        time.sleep(delay)
        record = {"epoch": epoch, "val_acc": fake_accuracy(distill.ce_weight, epoch) - 0.1 * distill.recipe.lr,
                  "train_loss": 1.0 / epoch, "train_acc": 0.2 * epoch, "lr": distill.recipe.lr}
        history.append(record)
        if epoch_hook is not None:
            epoch_hook(epoch, [record])
        kill_once(os.environ.get("FAKE_KILL_ONCE_FILE"))
    return [SimpleNamespace(spec=specs[0], result=SimpleNamespace(history=history))]


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
        from matekd.stages.prepare import run_prepare

        run_prepare(params)
        if train_teachers:
            from matekd.stages.cache import run_cache
            from matekd.stages.train_teacher import run_train_teacher

            for name in params.teachers:
                run_train_teacher(params, name, progress=False)
                run_cache(params, name)
        else:
            for name in params.teachers:
                for path in (root / "models" / "teachers" / f"{name}.safetensors",
                             root / "cams" / f"{name}.safetensors"):
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
    base = {"device": "cpu", "tune.methods": ["mate_kd"], "tune.n_trials": 6, "tune.epochs": 3,
            "tune.pruner_startup_trials": 2, "tune.pruner_warmup_epochs": 1}
    base.update(overrides)
    return load_params("params.yaml", base)


def tune(params, **kwargs):
    kwargs.setdefault("trainer", fake_train)
    kwargs.setdefault("progress", False)
    return run_tune(params, **kwargs)


def load(method: str = "mate_kd", storage: str = "tuning/optuna.db", prefix: str = "matekd-tiny"):
    return optuna.load_study(study_name=f"{prefix}-{method}", storage=tuning.resolve_storage(storage).open())


def enqueue(params, method: str, rows: list[dict]) -> None:
    study = optuna.create_study(study_name=f"{params.tune.study_name}-{method}", direction="maximize",
                                storage=tuning.resolve_storage(params.tune.storage).open(), load_if_exists=True)
    for row in rows:
        study.enqueue_trial({**GOOD, **row})


# ----------------------------------------------------------------------------------------
# Space: per method, from the method table; checked before any study


@pytest.mark.parametrize("override, needle", [
    ({"tune.space.kd_temperature": {"low": 9, "high": 8}}, "low (9.0) must not exceed high (8.0)"),
    ({"tune.space.ce_weight": {"low": 0, "high": 1, "log": True}}, "log range needs low > 0"),
    ({"tune.space.dropout": {"low": 0, "high": 1}}, "unknown parameter 'dropout'"),
    ({"tune.methods": ["mate_kd", "dino"]}, "unknown method 'dino'"),
])
def test_invalid_space_refused_at_load(ws, override, needle):
    with pytest.raises(ParamsError, match="tune") as err:
        load_params("params.yaml", override)
    assert needle in str(err.value)


def test_invalid_space_refused_by_the_cli(ws, capsys):
    code = cli.main(["tune", "-S", "tune.space.similarity_temperature={low: 0, high: 2, log: true}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid params") and "tune.space.similarity_temperature" in err
    assert not Path("tuning/optuna.db").exists()


@pytest.mark.parametrize("override, needle", [
    ({"tune.space.ce_weight": {"low": 0, "high": 2}},
     "tune.space.ce_weight.high = 2.0 is not a valid distill.ce_weight"),
    ({"tune.space.lr": {"low": 0, "high": 0.1}}, "tune.space.lr.low = 0.0 is not a valid distill.recipe.lr"),
    ({"tune.space.similarity_temperature_end": {"low": 0.1, "high": 1}}, "similarity_schedule_epochs"),
    ({"data.val_per_class": 0}, "needs a validation split"),
    ({"tune.methods": ["ce", "mate_kd"], "tune.space": {"attribution_weight": {"low": 0, "high": 1}}},
     "tune.space has no key that method 'ce' uses (attribution_weight); add one of lr, weight_decay to tune.space"),
])
def test_space_checked_before_any_study(ws, override, needle):
    params = tiny(**override)
    with pytest.raises(ParamsError) as err:
        tune(params)
    assert needle in str(err.value)
    assert not Path("tuning/optuna.db").exists()  # refused before any study is created


def test_method_space_derives_from_the_table(ws):
    space = tiny().tune
    assert list(tuning.method_space(space, methods.get("ce"))) == ["distill.recipe.lr"]
    assert list(tuning.method_space(space, methods.get("kd"))) == [
        "distill.kd_temperature", "distill.ce_weight", "distill.recipe.lr"]
    assert list(tuning.method_space(space, methods.get("mate_kd"))) == [
        "distill.kd_temperature", "distill.similarity_temperature", "distill.ce_weight",
        "distill.attribution_weight", "distill.recipe.lr"]
    assert tuning.unused_keys(space, [methods.get("ce"), methods.get("kd")]) == [
        "similarity_temperature", "attribution_weight"]


def test_apply_values_sets_dotted_keys_and_validates(ws):
    params = tiny()
    out = tuning.apply_values(params, {"distill.recipe.lr": 0.02, "distill.ce_weight": 0.7}, epochs=5)
    assert out.distill.recipe.lr == 0.02 and out.distill.ce_weight == 0.7 and out.distill.recipe.epochs == 5
    assert params.distill.recipe.lr == 0.05 and params.distill.ce_weight == 0.3  # the original is untouched
    with pytest.raises(Exception, match="less than or equal to 1"):
        tuning.apply_values(params, {"distill.ce_weight": 1.5})


def test_pruners(ws):
    median = tuning.make_pruner(tiny(**{"tune.pruner": "median"}).tune)
    assert isinstance(median, optuna.pruners.MedianPruner)
    hyper = tuning.make_pruner(tiny(**{"tune.pruner": "hyperband", "tune.epochs": 9}).tune)
    assert isinstance(hyper, optuna.pruners.HyperbandPruner)
    assert (hyper._min_resource, hyper._max_resource) == (1, 9)
    assert isinstance(tuning.make_pruner(tiny(**{"tune.pruner": "none"}).tune), optuna.pruners.NopPruner)


def test_resolve_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tuning.resolve_storage("tuning/optuna.db")
    assert (spec.kind, spec.target, spec.shown) == ("sqlite", f"sqlite:///{tmp_path}/tuning/optuna.db",
                                                    "tuning/optuna.db")
    assert tuning.resolve_storage("tuning/study.log").kind == "journal"
    assert tuning.resolve_storage("journal:x/study.any").target == str(tmp_path / "x" / "study.any")
    pg = tuning.resolve_storage("postgresql://alice:s3cret@db.example:5432/optuna")
    assert pg.kind == "rdb" and "s3cret" not in pg.shown and "alice:***@db.example" in pg.shown
    assert pg.target.endswith("s3cret@db.example:5432/optuna") and pg.target.startswith("postgresql")
    with pytest.raises(ParamsError, match="not a SQLite file"):
        tuning.resolve_storage("tuning/optuna.txt")
    with pytest.raises(ParamsError, match="tune.storage is empty"):
        tuning.resolve_storage("  ")


# ----------------------------------------------------------------------------------------
# Every method alike; one method's study never touches another's outputs


def test_each_method_searches_only_its_keys_with_the_same_budget_seed_and_pruner(ws, monkeypatch):
    seeds, pruners = [], []
    real_sampler, real_pruner = tuning.workers.make_sampler, tuning.workers.make_pruner

    def sampler_spy(tune_params, worker=0):
        seeds.append(tune_params.sampler_seed + worker)
        return real_sampler(tune_params, worker)

    def pruner_spy(tune_params):
        pruners.append(real_pruner(tune_params))
        return pruners[-1]

    monkeypatch.setattr(tuning.workers, "make_sampler", sampler_spy)
    monkeypatch.setattr(tuning.workers, "make_pruner", pruner_spy)
    params = tiny(**{"tune.methods": ["ce", "mate_kd"], "tune.n_trials": 3, "tune.pruner": "hyperband",
                     "tune.sampler_seed": 7})
    summaries = tune(params)

    assert list(summaries) == ["ce", "mate_kd"] and seeds == [7, 7]
    ce, mate = load("ce"), load("mate_kd")
    assert {frozenset(t.params) for t in ce.trials} == {frozenset({"distill.recipe.lr"})}
    assert {frozenset(t.params) for t in mate.trials} == {frozenset(tuning.method_space(params.tune,
                                                                                        methods.get("mate_kd")))}
    assert ce.trials[0].distributions["distill.recipe.lr"] == mate.trials[0].distributions["distill.recipe.lr"]
    assert [s["trials"]["finished"] for s in summaries.values()] == [3, 3]
    assert ce.user_attrs["matekd.signature"]["pruner"] == mate.user_attrs["matekd.signature"]["pruner"] == {
        "name": "hyperband", "warmup_epochs": 1, "startup_trials": 2}
    assert [(type(p), p._max_resource) for p in pruners] == [(optuna.pruners.HyperbandPruner, 3)] * 2
    # ce's study depends on nothing but its own settings: tuned alone, it draws the same values.
    tune(params, methods=["ce"], storage="other.db")
    assert [t.params for t in load("ce", "other.db").trials] == [t.params for t in ce.trials]


def test_one_methods_study_never_changes_another_methods_values(ws):
    params = tiny(**{"tune.n_trials": 2})
    tune(params, methods=["mate_kd"])
    mate_file, mate_metrics = Path("tuning/best/mate_kd.yaml"), Path("metrics/tune/mate_kd.json")
    before = mate_file.read_bytes(), mate_metrics.read_bytes()
    assert not Path("tuning/best/ce.yaml").exists()

    tune(params, methods=["ce"])
    assert (mate_file.read_bytes(), mate_metrics.read_bytes()) == before
    mate = yaml.safe_load(mate_file.read_text())
    ce = yaml.safe_load(Path("tuning/best/ce.yaml").read_text())
    assert mate["method"] == "mate_kd" and mate["study"] == "matekd-tiny-mate_kd"
    assert set(mate["values"]) == set(tuning.method_space(params.tune, methods.get("mate_kd")))
    assert ce["method"] == "ce" and set(ce["values"]) == {"distill.recipe.lr"}
    assert ce["trials"] == 2 and ce["objective"] == "val_acc after 3 epoch(s)"
    best = load("ce").best_trial
    assert (ce["best_trial"], ce["best_value"], ce["values"]) == (best.number, best.value, best.params)
    # The ablation reads each method's own file (ablation.tuned: true).
    spec = resolve_spec(params, "ce", 0, "ce-seed0", tuned=True)
    assert spec.distill.recipe.lr == best.params["distill.recipe.lr"]
    assert spec.distill.ce_weight == params.distill.ce_weight and spec.tuned_from == "tuning/best/ce.yaml"


def test_study_is_tidy_objective_named_dotted_params_compact_attrs(ws):
    params = tiny(**{"tune.n_trials": 3})
    tune(params)
    study = load()
    assert study.metric_names == ["val_acc"]
    for trial in study.trials:
        assert all(name.startswith("distill.") for name in trial.params)
        assert set(trial.user_attrs) == CLAIM  # no per-epoch curves in the study
        assert sorted(trial.intermediate_values) == [1, 2, 3]
    # The per-epoch records are beside the study, one file per trial.
    records = tuning.read_records(tuning.records_path(tuning.records_folder("matekd-tiny-mate_kd"), 2))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["val_acc"] for r in records] == [study.trials[2].intermediate_values[e] for e in (1, 2, 3)]
    assert {"train_loss", "train_acc", "lr", "time_ms"} <= set(records[0])


def test_bad_region_is_pruned_and_best_values_written(ws, capsys):
    params = tiny()
    # Two good startup trials, then bad (ce_weight >= 0.5) and good ones alternating. Every good
    # trial after the startup beats the median of the completed ones at each epoch; the bad
    # ones sit at chance.
    ce = [0.3, 0.2, 0.9, 0.1, 0.6, 0.15]
    enqueue(params, "mate_kd", [{"distill.ce_weight": c} for c in ce])
    summary = tune(params)["mate_kd"]

    trials = load().get_trials()
    assert [t.number for t in trials] == list(range(6))
    for trial, c in zip(trials, ce):
        assert trial.params["distill.ce_weight"] == c
        if c >= 0.5:
            assert trial.state == TrialState.PRUNED
            assert sorted(trial.intermediate_values) == [1]  # stopped after the first epoch
        else:
            assert trial.state == TrialState.COMPLETE
            assert trial.value == pytest.approx(fake_accuracy(c, 3) - 0.005)
        assert trial.user_attrs[recovery.ATTR_PID] == os.getpid()
    assert summary["best_trial"] == 3 and summary["best_value"] == pytest.approx(0.5 + 0.3 - 0.02 - 0.005)
    metrics = json.loads(Path("metrics/tune/mate_kd.json").read_text())
    assert metrics["trials"]["complete"] == 4 and metrics["trials"]["pruned"] == 2
    assert metrics["best_trial"] == 3 and "importances" not in metrics  # 4 completed < 8
    best = yaml.safe_load(Path("tuning/best/mate_kd.yaml").read_text())
    assert best["values"] == {**GOOD, "distill.ce_weight": 0.1}
    out = capsys.readouterr().out
    assert "importances need at least 8 completed trials; have 4" in out
    assert "dvc exp run -S ablation.tuned=true" in out


def test_importances_reported_only_from_the_minimum_on(ws):
    params = tiny(**{"tune.n_trials": 3, "tune.pruner": "none", "tune.min_trials_for_importance": 4,
                     "tune.epochs": 1})
    summary = tune(params)["mate_kd"]
    assert summary["importances"] == {}
    assert summary["importances_note"] == "importances need at least 4 completed trials; have 3"
    assert "importances" not in json.loads(Path("metrics/tune/mate_kd.json").read_text())

    summary = tune(params, n_trials=2)["mate_kd"]
    assert summary["importances_note"] is None
    importances = json.loads(Path("metrics/tune/mate_kd.json").read_text())["importances"]
    assert set(importances) == set(tuning.method_space(params.tune, methods.get("mate_kd")))
    assert sum(importances.values()) == pytest.approx(1.0)


def test_sampled_study_is_seeded(ws, tmp_path):
    params = tiny(**{"tune.n_trials": 3, "tune.pruner": "none"})
    tune(params)
    first = [t.params for t in load().get_trials()]
    tune(params, storage=str(tmp_path / "other.db"))
    second = [t.params for t in load(storage=str(tmp_path / "other.db")).get_trials()]
    assert first == second and len({json.dumps(p) for p in first}) == 3


def test_resume_tops_up_and_n_trials_adds(ws):
    tune(tiny(**{"tune.n_trials": 2}))
    tune(tiny(**{"tune.n_trials": 4}))
    trials = load().get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    sessions = [t.user_attrs[recovery.ATTR_SESSION] for t in trials]
    assert sessions[0] == sessions[1] != sessions[2] == sessions[3]
    tune(tiny(**{"tune.n_trials": 4}))  # complete: runs nothing
    assert len(load().get_trials()) == 4
    tune(tiny(**{"tune.n_trials": 4}), n_trials=1)  # --n-trials 1: one more
    assert len(load().get_trials()) == 5
    with pytest.raises(ParamsError, match="--n-trials 0"):
        tune(tiny(), n_trials=0)
    with pytest.raises(ParamsError, match="--workers 0"):
        tune(tiny(), workers=0)


def test_changed_settings_refused_on_resume(ws):
    tune(tiny(**{"tune.n_trials": 1}))
    with pytest.raises(ParamsError, match=r"other settings \(epochs: 3 -> 2\).*new tune.study_name"):
        tune(tiny(**{"tune.n_trials": 2, "tune.epochs": 2}))
    with pytest.raises(ParamsError, match=r"values.distill.similarity: 'cosine' -> 'pearson'"):
        tune(tiny(**{"tune.n_trials": 2, "distill.similarity": "pearson"}))
    # A value mate_kd does not use leaves its study alone; one it searches is no fixed setting.
    tune(tiny(**{"tune.n_trials": 2, "distill.kd_teacher": "resnet20", "distill.ce_weight": 0.9}))
    assert len(load().get_trials()) == 2


def test_crashing_trials_fail_and_stop_the_worker(ws):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(MatekdError, match="3 trials in a row failed.*RuntimeError: boom"):
        tune(tiny(), trainer=broken)
    trials = load().get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert trials[0].user_attrs[recovery.ATTR_ERROR] == "RuntimeError: boom"


def test_missing_teacher_files_fail_before_any_study(ws):
    Path("cams/resnet56.safetensors").unlink()
    with pytest.raises(MatekdError,
                       match=r"missing CAM cache cams/resnet56.safetensors; run `dvc repro cache@resnet56`"):
        tune(tiny(**{"tune.methods": ["ce", "kd", "mate_kd"]}))
    assert not Path("tuning/optuna.db").exists()
    tune(tiny(**{"tune.n_trials": 1}), methods=["kd"])  # kd reads no cache (online teacher logits)


def test_dvc_lists_the_tuning_metrics_and_the_student_artifacts(ws):
    """metrics/tune is written by a plain command, not a stage: dvc.yaml declares it at the top
    level, so `dvc metrics show` reads what `matekd tune` wrote; the students are model artifacts."""
    shutil.copy(ROOT / "dvc.yaml", "dvc.yaml")
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([str(dvc), "init", "-q"], check=True)
    tune(tiny(**{"tune.n_trials": 2}))
    shown = subprocess.run([str(dvc), "metrics", "show", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(shown.stdout[shown.stdout.index("{"):])[""]["data"]
    written = json.loads(Path("metrics/tune/mate_kd.json").read_text())
    assert data["metrics/tune/mate_kd.json"]["data"] == written and written["trials"]["complete"] == 2
    from dvc.repo import Repo

    artifacts = Repo(".").artifacts.read()["dvc.yaml"]
    assert {name: (a.path, a.type) for name, a in artifacts.items()} == {
        "student": ("models/student/distill.safetensors", "model"), "students": ("models/student", "model")}


def test_journal_storage(ws):
    params = tiny(**{"tune.storage": "tuning/optuna.log", "tune.n_trials": 2})
    tune(params)
    assert Path("tuning/optuna.log").exists() and not Path("tuning/optuna.db").exists()
    study = load(storage="tuning/optuna.log")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2 and study.metric_names == ["val_acc"]


# ----------------------------------------------------------------------------------------
# Workers and GPUs


def test_worker_devices_round_robin():
    assert tuning.worker_devices(5, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert tuning.worker_devices(2, ["cuda:0", "cuda:1", "cuda:2"]) == ["cuda:0", "cuda:1"]
    assert tuning.worker_devices(3, ["cpu"]) == ["cpu", "cpu", "cpu"]
    with pytest.raises(ParamsError, match="--workers 0"):
        tuning.worker_devices(0, ["cpu"])


def test_worker_processes_are_spread_over_the_visible_gpus(ws, monkeypatch):
    jobs = []
    monkeypatch.setattr(tuning.workers, "visible_devices", lambda choice: [torch.device("cuda", 0),
                                                                           torch.device("cuda", 1)])
    monkeypatch.setattr(tuning.workers, "run_processes", lambda batch, study, logger: jobs.extend(batch))
    with pytest.raises(MatekdError, match="has no completed trial"):  # the stand-in ran no trial
        tune(tiny(**{"tune.storage": "tuning/optuna.log"}), workers=3)
    assert [(j.worker, j.device, j.threads) for j in jobs] == [(0, "cuda:0", None), (1, "cuda:1", None),
                                                               (2, "cuda:0", None)]
    assert len({j.session for j in jobs}) == 1 and {j.target for j in jobs} == {6}


def test_signals_are_loaded_once_per_worker():
    calls = []
    memo = tuning.TeacherOutputsMemo(lambda *args: calls.append(args) or object())
    params = SimpleNamespace(distill=SimpleNamespace(teacher_signals="online"))
    data = SimpleNamespace(manifest_hash="abc")
    first = memo(params, ["resnet56"], True, data, torch.device("cpu"))
    assert memo(params, ["resnet56"], True, data, torch.device("cpu")) is first and len(calls) == 1
    memo(params, ["resnet56"], False, data, torch.device("cpu"))
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------
# A killed worker


KILLED_RUN = textwrap.dedent("""
    import sys
    sys.path[:0] = [{src!r}, {tests!r}]
    import torch
    torch.set_num_threads(1)
    from matekd.params import load_params
    from matekd.stages.tune import run_tune
    from test_tune import fake_train
    params = load_params("params.yaml", {{"device": "cpu", "tune.methods": ["mate_kd"], "tune.n_trials": 3,
                                         "tune.epochs": 3, "tune.pruner": "none"}})
    run_tune(params, trainer=fake_train, progress=False)
""")


def test_sigkilled_worker_trial_is_failed_and_retried_on_rerun(ws):
    env = {**os.environ, "FAKE_EPOCH_SECONDS": "1.5", "MATEKD_TRACKING": "off"}
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

    summary = tune(tiny(**{"tune.n_trials": 3, "tune.pruner": "none"}))["mate_kd"]

    trials = load().get_trials()
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == victim.params
    assert retries[0].user_attrs[recovery.ATTR_PID] == os.getpid()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and victim.number not in [t.number for t in complete]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert summary["trials"]["fail"] == 1 and summary["killed_trials_failed_at_start"] == [victim.number]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_orphan_check_spares_live_and_foreign_trials(ws):
    tune(tiny(**{"tune.n_trials": 1}))
    study = load()
    alive = study.ask()
    recovery.claim(alive, "s", 0, "cpu")
    foreign = study.ask()
    foreign.set_user_attr(recovery.ATTR_HOST, "elsewhere/123")
    foreign.set_user_attr(recovery.ATTR_PID, 999_999_999)
    dead = study.ask()
    recovery.claim(dead, "s", 0, "cpu")
    dead.set_user_attr(recovery.ATTR_PID, 999_999_999)  # this host, no such process
    assert tuning.fail_orphans(study) == [dead.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert (states[alive.number], states[foreign.number], states[dead.number]) == (
        TrialState.RUNNING, TrialState.RUNNING, TrialState.FAIL)
    retry = study.get_trials()[-1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == dead.number
    assert not set(retry.user_attrs) & CLAIM  # the copy is not mistaken for an orphan


# ----------------------------------------------------------------------------------------
# MLflow


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("matekd")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_mlflow_parent_and_child_runs_hold_the_curves(ws, monkeypatch):
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    (ws / "mlruns").mkdir()
    monkeypatch.setenv("MATEKD_TRACKING", "online")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tiny(**{"tune.n_trials": 4, "tune.min_trials_for_importance": 3})
    enqueue(params, "mate_kd", [{"distill.ce_weight": c} for c in (0.3, 0.2, 0.9, 0.1)])
    summary = tune(params)["mate_kd"]

    client, runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(parents) == 1 and parents[0].info.run_id == summary["mlflow_run_id"]
    parent = parents[0]
    assert parent.info.run_name == "tune matekd-tiny-mate_kd" and parent.data.tags["method"] == "mate_kd"
    assert parent.data.params["tune.space.distill.recipe.lr"] == "[0.01, 0.4] log"
    assert "distill.ce_weight" not in parent.data.params and "distill.kd_teacher" not in parent.data.params
    assert (parent.data.params["distill.similarity"], parent.data.params["teachers"]) == ("cosine", "resnet20,resnet56")
    assert parent.data.params["distill.recipe.epochs"] == "3"
    children = {int(r.data.tags["optuna.trial_number"]): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == [0, 1, 2, 3]
    assert [children[n].data.tags["optuna.state"] for n in range(4)] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert {children[n].info.status for n in range(4)} == {"FINISHED"}
    for key, expected in (("val_acc", [fake_accuracy(0.1, e) - 0.005 for e in (1, 2, 3)]),
                          ("train_loss", [1.0, 0.5, 1 / 3])):
        curve = sorted(client.get_metric_history(children[3].info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in curve] == [(e, pytest.approx(v)) for e, v in zip((1, 2, 3), expected)]
    assert [m.step for m in client.get_metric_history(children[2].info.run_id, "val_acc")] == [1]
    assert children[3].data.params["distill.ce_weight"] == "0.1"
    assert children[3].data.params["distill.method"] == "mate_kd"
    assert parent.data.metrics["best/val_acc"] == pytest.approx(fake_accuracy(0.1, 3) - 0.005)
    assert parent.data.metrics["best/distill.ce_weight"] == 0.1
    assert {f"importance/{k}" for k in tuning.method_space(params.tune, methods.get("mate_kd"))} <= set(
        parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/intermediate_values.png", "tune/param_importances.png",
            "tune/summary.json"} <= artifacts

    # Resuming the study continues the same parent run and logs only the new trial.
    tune(tiny(**{"tune.n_trials": 5, "tune.min_trials_for_importance": 3}))
    client, runs = _runs(uri)
    assert len([r for r in runs if r.data.tags.get("stage") == "tune"]) == 1
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs
                     if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert numbers == [0, 1, 2, 3, 4]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_offline_tracking_writes_parent_and_child_run_folders(ws, monkeypatch):
    monkeypatch.setenv("MATEKD_TRACKING", "offline")
    monkeypatch.setenv("MATEKD_OFFLINE_DIR", str(ws / "offline"))
    summary = tune(tiny(**{"tune.n_trials": 2, "tune.pruner": "none"}))["mate_kd"]
    from matekd.tracking import read_folder

    records = read_folder(ws / "offline")
    parent = records[summary["mlflow_run_id"]]
    children = [r for r in records.values() if r.meta.get("parent_run_id") == summary["mlflow_run_id"]]
    assert parent.meta["status"] == "FINISHED" and len(children) == 2
    assert {c.meta["status"] for c in children} == {"FINISHED"}
    steps = sorted(m["step"] for m in children[0].metrics if m["key"] == "val_acc")
    assert steps == [1, 2, 3]


# ----------------------------------------------------------------------------------------
# Several worker processes: refused on SQLite; on a journal file, one of them killed


@pytest.mark.parametrize("storage", ["tuning/optuna.db", "sqlite:///tuning/other.sqlite"])
def test_several_workers_on_a_sqlite_file_are_refused_with_the_storage_to_use(ws, storage, capsys):
    with pytest.raises(ParamsError, match=r"--workers 2 on the SQLite file .*--storage tuning/(optuna|other)\.log"
                                          r".*postgresql://"):
        tune(tiny(**{"tune.storage": storage}), workers=2)
    assert not Path("tuning/optuna.db").exists() and not Path("tuning/other.sqlite").exists()  # refused first
    assert cli.main(["tune", "--workers", "2", "--storage", storage]) == 2
    assert "PostgreSQL" in capsys.readouterr().err and not list(Path("tuning").glob("*.db"))


def test_worker_processes_share_the_journal_study_and_a_killed_one_is_failed(ws, monkeypatch, tmp_path):
    (tmp_path / "barrier").mkdir()
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.2")
    monkeypatch.setenv("FAKE_BARRIER_DIR", str(tmp_path / "barrier"))
    monkeypatch.setenv("FAKE_BARRIER_N", "2")
    monkeypatch.setenv("FAKE_KILL_ONCE_FILE", str(tmp_path / "killed"))
    params = tiny(**{"tune.n_trials": 4, "tune.epochs": 2, "tune.pruner": "none", "tune.storage": "tuning/optuna.log"})
    with pytest.raises(MatekdError, match=r"worker [01] \(cpu\) was killed by signal 9.*Run `matekd tune` again"):
        tune(params, workers=2)

    victim_pid = int((tmp_path / "killed").read_text())
    trials = load(storage="tuning/optuna.log").get_trials()
    pids = {t.user_attrs.get(recovery.ATTR_PID) for t in trials} - {None}
    assert victim_pid in pids and len(pids) == 2 and os.getpid() not in pids  # both workers took trials
    assert {t.user_attrs.get(recovery.ATTR_WORKER) for t in trials} - {None} == {0, 1}
    assert {t.user_attrs.get(recovery.ATTR_DEVICE) for t in trials} - {None} == {"cpu"}
    victims = [t for t in trials if t.user_attrs.get(recovery.ATTR_PID) == victim_pid]
    assert len(victims) == 1 and victims[0].state == TrialState.FAIL
    assert sorted(victims[0].intermediate_values) == [1]  # it died in the middle of its trial
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victims[0].number]
    assert len(retry) == 1 and retry[0].params == victims[0].params

    summary = tune(params)["mate_kd"]  # the rerun finishes the study
    trials = load(storage="tuning/optuna.log").get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert trials[retry[0].number].state == TrialState.COMPLETE
    assert summary["trials"]["complete"] == 4 and summary["trials"]["fail"] == 1


# ----------------------------------------------------------------------------------------
# The real student on the tiny profile (acceptance)


@pytest.mark.slow
def test_real_students_on_the_tiny_profile(tmp_path, monkeypatch):
    root = build_workspace(tmp_path / "ws", train_teachers=True)
    monkeypatch.chdir(root)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    monkeypatch.setenv("MATEKD_TRACKING", "online")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from matekd.training import teacher_outputs as students

    loads = {"cache": 0, "teacher": 0}
    real_cache, real_teacher = students.load_cache, students.load_teacher

    def counting_cache(*a, **k):
        loads["cache"] += 1
        return real_cache(*a, **k)

    def counting_teacher(*a, **k):
        loads["teacher"] += 1
        return real_teacher(*a, **k)

    monkeypatch.setattr(students, "load_cache", counting_cache)
    monkeypatch.setattr(students, "load_teacher", counting_teacher)
    # The learning-rate range reaches values that make training diverge: that region is pruned.
    params = load_params("params.yaml", {"device": "cpu", "tune.methods": ["ce", "mate_kd"], "tune.n_trials": 4,
                                         "tune.epochs": 2, "tune.space.lr": {"low": 0.01, "high": 1.0e4, "log": True}})
    summaries = run_tune(params, progress=False)

    for method in ("ce", "mate_kd"):
        trials = load(method).get_trials()
        assert len(trials) == 4 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
        assert summaries[method]["trials"]["complete"] >= 1
    assert sum(s["trials"]["pruned"] for s in summaries.values()) >= 1
    assert loads == {"cache": 2, "teacher": 2}  # mate_kd's two teachers, loaded once for all its trials
    client, runs = _runs(uri)
    parent = next(r for r in runs if r.data.tags.get("stage") == "tune" and r.data.tags["method"] == "mate_kd")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = load("mate_kd").get_trials()
    assert len(children) == 4
    for child in children:
        trial = trials[int(child.data.tags["optuna.trial_number"])]
        curve = client.get_metric_history(child.info.run_id, "val_acc")
        assert sorted(m.step for m in curve) == sorted(trial.intermediate_values)
        assert {"train_loss", "train_acc", "train_attr"} <= set(child.data.metrics) or not trial.intermediate_values
    best = yaml.safe_load(Path("tuning/best/mate_kd.yaml").read_text())
    assert best["best_trial"] == summaries["mate_kd"]["best_trial"] and "distill.recipe.lr" in best["values"]
