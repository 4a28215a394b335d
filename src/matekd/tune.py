"""Stage tune: an Optuna study over the distillation hyperparameters (outside `dvc repro`).

Objective: the student's validation accuracy after `tune.epochs` epochs (never the test set),
reported after every epoch so that the pruner (median by default, Hyperband as an option) can
stop hopeless trials. The sampler is a seeded TPE; the search space is `tune.space`.

Storage: a SQLite file in the repo by default, a journal file (`*.log`, `*.jsonl`,
`journal:PATH`) or an RDB URL (`postgresql://...`). `--workers N` starts N processes that join
the same study (`load_if_exists`). The study is topped up to `tune.n_trials` finished trials
(complete or pruned), so an interrupted study resumes with `matekd tune` again. Every trial
records its worker's host and pid: a RUNNING trial whose process on this host is gone is marked
FAIL at once and retried once with the same parameters; on RDB storages a heartbeat does the
same for workers on other machines after `GRACE_PERIOD_S`.

MLflow: one parent run per study (its id is kept in the study, so a resumed study logs into
the same run) and one child run per finished trial, written by the launching process from the
Optuna storage (params, per-epoch curves, final state), so worker processes never write to
the tracking store concurrently.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import multiprocessing as mp
import os
import socket
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import yaml

from .errors import MatekdError, ParamsError, TrainingDiverged
from .params import Params, SpaceEntry, TuneParams
from .storage import sha256_file, write_json, write_text

BEST_PARAMS_PATH = Path("tuning") / "best_params.yaml"
METRICS_PATH = Path("metrics") / "tune.json"
HEARTBEAT_INTERVAL_S = 20
GRACE_PERIOD_S = 90
MAX_RETRY = 1  # a killed trial is rerun once with the same parameters
SQLITE_TIMEOUT_S = 60  # several local workers share one SQLite file: wait for its lock
POLL_S = 1.0

# Trial user attributes written by the worker that runs the trial.
ATTR_HOST, ATTR_PID, ATTR_SESSION, ATTR_WORKER = "matekd.host", "matekd.pid", "matekd.session", "matekd.worker"
ATTR_EPOCH = "matekd.epoch."  # + 3-digit epoch: that epoch's record (val_acc, train_loss, ...)
ATTR_DIVERGED = "matekd.diverged"
ATTR_ERROR = "matekd.error"
# Study user attributes.
ATTR_SIGNATURE = "matekd.signature"
ATTR_PARENT_RUN, ATTR_TRACKING_URI = "matekd.mlflow_parent_run_id", "matekd.mlflow_tracking_uri"

RECIPE_KEYS = ("lr", "weight_decay")  # tunable names that live in distill.recipe
TEACHER_METHODS = {"kd", "mtkd_equal", "mate_kd_noattr", "mate_kd"}
ATTRIBUTION_METHODS = {"mate_kd_noattr", "mate_kd"}
# Which methods a tunable parameter has an effect on (others would only add noise to the study).
RELEVANT: dict[str, set[str]] = {
    "kd_temperature": TEACHER_METHODS,
    "ce_weight": TEACHER_METHODS,
    "similarity_temperature": ATTRIBUTION_METHODS,
    "similarity_temperature_end": ATTRIBUTION_METHODS,
    "attribution_weight": {"mate_kd"},
    "lr": {"ce", *TEACHER_METHODS},
    "weight_decay": {"ce", *TEACHER_METHODS},
}

MAX_CONSECUTIVE_FAILURES = 3  # a worker stops when this many of its trials in a row crash
Trainer = Callable[..., Any]  # signature of matekd.student.train_student


class TrialCrashed(Exception):
    """A trial raised an unexpected error: it is marked FAIL and the study goes on."""


# --------------------------------------------------------------------------------------
# Search space


def param_key(name: str) -> str:
    """The dotted params.yaml key of a tunable name (`lr` -> `distill.recipe.lr`)."""
    return f"distill.recipe.{name}" if name in RECIPE_KEYS else f"distill.{name}"


def apply_values(params: Params, values: dict[str, float], method: str | None = None,
                 epochs: int | None = None) -> Params:
    """A deep copy of `params` with trial values set (validated on assignment)."""
    out = params.model_copy(deep=True)
    if method is not None:
        out.distill.method = method
    if epochs is not None:
        out.distill.recipe.epochs = epochs
    for name, value in values.items():
        target = out.distill.recipe if name in RECIPE_KEYS else out.distill
        setattr(target, name, float(value))
    return out


def validate_space(params: Params) -> None:
    """Refuse a space whose parameters do nothing for `tune.method`, or whose bounds the
    distill schema rejects (e.g. ce_weight above 1), before any trial runs."""
    from pydantic import ValidationError

    tune = params.tune
    for name, entry in tune.space.items():
        if tune.method not in RELEVANT.get(name, set()):
            raise ParamsError(f"tune.space.{name}: {param_key(name)} has no effect with tune.method "
                              f"{tune.method!r}; remove it from tune.space")
        for bound in ("low", "high"):
            value = getattr(entry, bound)
            if not math.isfinite(value):
                raise ParamsError(f"tune.space.{name}.{bound} = {value!r}: bounds must be finite numbers")
            try:
                apply_values(params, {name: value}, method=tune.method)
            except ValidationError as exc:
                reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise ParamsError(f"tune.space.{name}.{bound} = {value!r} is not a valid "
                                  f"{param_key(name)}: {reason}") from None
    if params.data.val_per_class == 0:
        raise ParamsError("data.val_per_class = 0: tuning needs a validation split (the objective is "
                          "validation accuracy; the test set is never used)")


def suggest(trial: Any, space: dict[str, SpaceEntry]) -> dict[str, float]:
    """Sample every parameter of the space (names as in tune.space)."""
    return {name: trial.suggest_float(name, e.low, e.high, log=e.log) for name, e in space.items()}


def make_sampler(tune: TuneParams, worker: int = 0):
    import optuna

    # Each worker gets its own seed so parallel workers do not draw the same startup points.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=tune.sampler_seed + worker, constant_liar=True)


def make_pruner(tune: TuneParams):
    """Median (no pruning before `pruner_warmup_epochs` epochs nor during the first
    `pruner_startup_trials` trials), Hyperband over [warmup, epochs] epochs, or none."""
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials,
                                           n_warmup_steps=tune.pruner_warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, min(tune.pruner_warmup_epochs, tune.epochs)),
                                              max_resource=tune.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------------------
# Storage


@dataclass(frozen=True)
class StorageSpec:
    kind: str     # sqlite | journal | rdb
    target: str   # SQLAlchemy URL (sqlite, rdb) or journal file path
    shown: str    # for messages, tags and metrics: the password masked

    def open(self):
        """The Optuna storage; RDB storages get a heartbeat so killed trials become FAIL."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            if self.kind == "journal":
                from optuna.storages.journal import JournalFileBackend

                Path(self.target).parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(JournalFileBackend(self.target))
            engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if self.kind == "sqlite" else {}
            # Optuna < 4.9 calls the stale-trial callback `failed_trial_callback`.
            callback = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                        else "failed_trial_callback")
            for attempt in range(5):
                try:
                    return optuna.storages.RDBStorage(
                        self.target, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                        grace_period=GRACE_PERIOD_S, **{callback: retry_trial})
                except ImportError as exc:
                    raise MatekdError(f"Optuna storage {self.shown} needs a database driver that is not installed "
                                      f"({exc.__cause__ or exc}); for PostgreSQL: pip install psycopg2-binary") from exc
                except Exception as exc:  # sqlalchemy errors: unreachable server, bad credentials
                    # Two processes creating the tables of a new database at once: the loser retries.
                    if "already exists" in str(exc) and attempt < 4:
                        time.sleep(0.2 * (attempt + 1))
                        continue
                    raise MatekdError(f"cannot open Optuna storage {self.shown}: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
            raise AssertionError("unreachable")


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _with_driver(url: str) -> str:
    """`postgresql://` through whichever driver is installed (SQLAlchemy 2.1 defaults to
    psycopg 3, 2.0 to psycopg2; matekd's `postgres` extra installs psycopg2-binary)."""
    import importlib.util

    scheme, rest = url.split("://", 1)
    if scheme.lower() not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    return f"postgresql://{rest}"


def _relative(path: Path) -> str:
    """A path as the user would write it: relative to the project folder when inside it
    (keeps machine-specific prefixes out of metrics/tune.json)."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def resolve_storage(text: str) -> StorageSpec:
    """Interpret `tune.storage` / `--storage`: a SQLite file (*.db, *.sqlite, *.sqlite3, or a
    sqlite:/// URL), a journal file (*.log, *.jsonl, *.journal or journal:PATH), or an RDB URL
    (postgresql://user:password@host:port/db, mysql+pymysql://...). Relative paths are taken
    from the current folder (the project root under DVC)."""
    text = text.strip()
    if not text:
        raise ParamsError("tune.storage is empty; give a SQLite file, a journal file or a database URL")
    if text.startswith("journal:"):
        path = Path(text.removeprefix("journal:").removeprefix("//")).expanduser().resolve()
        return StorageSpec("journal", str(path), f"journal:{_relative(path)}")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme.startswith("sqlite"):
            db = text.split("://", 1)[1].removeprefix("/")
            if db and db != ":memory:":
                Path(db).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            return StorageSpec("sqlite", text, text)
        return StorageSpec("rdb", _with_driver(text), _mask(text))
    path = Path(text).expanduser().resolve()
    shown = _relative(path)
    if path.suffix in JOURNAL_SUFFIXES:
        return StorageSpec("journal", str(path), f"journal:{shown}")
    if path.suffix in SQLITE_SUFFIXES:
        path.parent.mkdir(parents=True, exist_ok=True)
        return StorageSpec("sqlite", f"sqlite:///{path}", shown)
    raise ParamsError(f"tune.storage = {text!r}: not a SQLite file ({', '.join(SQLITE_SUFFIXES)}), a journal "
                      f"file ({', '.join(JOURNAL_SUFFIXES)} or journal:PATH) nor a database URL "
                      "(postgresql://user:password@host:port/db)")


# --------------------------------------------------------------------------------------
# Killed trials


def this_host() -> str:
    """Host identity for the pid check: host name plus machine id (containers differ in both)."""
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            machine = Path(path).read_text().strip()[:12]
            break
    return f"{socket.gethostname()}/{machine}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def retry_trial(study: Any, trial: Any) -> None:
    """Queue a failed (killed) trial again with the same parameters, at most MAX_RETRY times.

    Same bookkeeping as Optuna's RetryHeartbeatStaleTrialCallback (`failed_trial`,
    `retry_history`), but the dead worker's host/pid/epoch records are not copied, so the copy
    is never mistaken for an orphan before its new worker claims it."""
    import optuna

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return
    system_attrs = {**trial.system_attrs, "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                    "retry_history": history}
    user_attrs = {k: v for k, v in trial.user_attrs.items() if not k.startswith("matekd.")}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=user_attrs,
                                              system_attrs=system_attrs))


def fail_orphans(study: Any, host: str | None = None, pids: set[int] | None = None) -> list[int]:
    """Mark FAIL (and retry) the RUNNING trials whose worker process on this host is gone
    (or, with `pids`, belongs to one of these dead workers). Returns their numbers."""
    import optuna

    TrialState = optuna.trial.TrialState
    host = host or this_host()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get(ATTR_PID)
        if trial.user_attrs.get(ATTR_HOST) != host or not isinstance(pid, int):
            continue
        alive = (pid not in pids) if pids is not None else pid_alive(pid)
        if alive:
            continue
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process got there first
        retry_trial(study, study._storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    return failed


def fail_stale(study: Any) -> None:
    """Local orphans now; remote ones once their heartbeat is older than the grace period."""
    import optuna

    fail_orphans(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def counts(study: Any) -> dict[str, int]:
    import optuna

    out = {s.name.lower(): 0 for s in optuna.trial.TrialState}
    for trial in study.get_trials(deepcopy=False):
        out[trial.state.name.lower()] += 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


# --------------------------------------------------------------------------------------
# Worker


@dataclass
class WorkerJob:
    params: dict                # Params.model_dump(mode="json")
    storage: StorageSpec
    target: int                 # stop once the study holds this many finished trials
    session: str
    worker: int
    prepared_dir: str
    trainer: Trainer | None = None
    threads: int | None = None


class _SignalsMemo:
    """Teacher weights and CAM caches do not change between trials (the study signature pins
    their hashes): load them once per worker and hand the same tensors to every trial."""

    def __init__(self):
        self.memo: dict[tuple, Any] = {}

    def load(self, params: Params, method: str, data: Any, device: Any) -> Any:
        from .student import load_signals, method_teachers

        key = (method, tuple(method_teachers(params, method)), params.distill.teacher_signals,
               data.manifest_hash, str(device))
        if key not in self.memo:
            self.memo[key] = load_signals(params, method, data, device)
        return self.memo[key]


def make_objective(params: Params, data: Any, device: Any, trainer: Trainer, session: str,
                   worker: int, signals_loader: Callable[..., Any], progress: bool = False
                   ) -> Callable[[Any], float]:
    """The trial function: sample, train the student for tune.epochs, report val_acc per epoch."""
    import optuna

    tune = params.tune
    host = this_host()

    def objective(trial: Any) -> float:
        # Claim the trial first: the orphan check identifies its process by these attributes.
        trial.set_user_attr(ATTR_HOST, host)
        trial.set_user_attr(ATTR_PID, os.getpid())
        trial.set_user_attr(ATTR_SESSION, session)
        trial.set_user_attr(ATTR_WORKER, worker)
        values = suggest(trial, tune.space)
        trial_params = apply_values(params, values, method=tune.method, epochs=tune.epochs)
        last: dict[str, float] = {}

        def hook(epoch: int, record: dict) -> None:
            clean = {k: float(v) for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}
            last.clear()
            last.update(clean)
            trial.set_user_attr(f"{ATTR_EPOCH}{epoch:03d}", clean)
            value = clean["val_acc"]
            trial.report(value, epoch)
            if math.isnan(value) or trial.should_prune():
                raise optuna.TrialPruned(f"val_acc {value:.4f} at epoch {epoch} is below the pruner's bar")

        try:
            trainer(trial_params, tune.method, trial_params.distill.seed, data, device, _null_run(), None,
                    progress, hook, with_test=False, signals_loader=signals_loader)
        except TrainingDiverged as exc:
            # A diverged run cannot recover; pruning (not failing) lets TPE learn to avoid the region.
            trial.set_user_attr(ATTR_DIVERGED, str(exc))
            raise optuna.TrialPruned(f"training diverged: {exc}") from None
        except (MatekdError, optuna.TrialPruned):
            raise  # user-facing problems (missing cache, ...) stop the study
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr(ATTR_ERROR, message[:2000])
            raise TrialCrashed(message) from exc
        if "val_acc" not in last:
            raise MatekdError("the student training reported no epoch")
        return last["val_acc"]

    return objective


def _null_run():
    from .tracking import NullRun

    return NullRun()


def run_worker(job: WorkerJob, on_trial_end: Callable[[Any, Any], None] | None = None) -> int:
    """Run trials of one study until it holds `job.target` finished trials (counting the ones
    still running elsewhere). Returns the number of trials this worker ran."""
    import optuna
    import torch

    from .data import load_prepared
    from .params import validate_params
    from .train import configure_determinism, resolve_device

    if job.threads:
        torch.set_num_threads(job.threads)
    params = validate_params(job.params)
    tune = params.tune
    trainer = job.trainer
    if trainer is None:
        from .student import train_student as trainer
    device = resolve_device(params.device)
    if params.deterministic:
        configure_determinism(params.distill.seed, True)
    else:  # what configure_determinism(False) sets, minus the seconds-long import it triggers
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
    data = load_prepared(job.prepared_dir)
    study = optuna.create_study(study_name=tune.study_name, storage=job.storage.open(), direction="maximize",
                                sampler=make_sampler(tune, job.worker), pruner=make_pruner(tune),
                                load_if_exists=True)
    objective = make_objective(params, data, device, trainer, job.session, job.worker, _SignalsMemo().load)
    ran, failures = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            fail_stale(study)
            state = counts(study)
            if state["finished"] + state["running"] >= job.target:
                break
            study.optimize(objective, n_trials=1, catch=(TrialCrashed,),
                           callbacks=[on_trial_end] if on_trial_end else None)
            ran += 1
            last = max(study.get_trials(deepcopy=False), key=_mine(job.session, os.getpid()))
            failures = failures + 1 if last.state == optuna.trial.TrialState.FAIL else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise MatekdError(f"{failures} trials in a row failed (last: trial {last.number}, "
                                  f"{last.user_attrs.get(ATTR_ERROR, 'see the log above')}); stopping this "
                                  "worker. Fix the error, then run `matekd tune` again to resume")
    return ran


def _mine(session: str, pid: int) -> Callable[[Any], tuple]:
    """Sort key that ranks this worker's latest trial highest."""
    return lambda t: (t.user_attrs.get(ATTR_SESSION) == session and t.user_attrs.get(ATTR_PID) == pid, t.number)


def _worker_process(job: WorkerJob, errors: Any) -> None:
    """Entry point of a spawned worker: user-facing errors travel back as messages."""
    try:
        run_worker(job)
    except MatekdError as exc:
        errors.put((job.worker, str(exc)))
        sys.exit(2)
    except Exception as exc:
        errors.put((job.worker, f"{type(exc).__name__}: {exc}"))
        raise


# --------------------------------------------------------------------------------------
# MLflow: parent run per study, child run per trial (written by the launching process)


def _ms(when: dt.datetime | None) -> int | None:
    return int(when.timestamp() * 1000) if when is not None else None


class TrialLogger:
    """Logs each finished trial once as a child run of the study's parent run."""

    def __init__(self, run: Any, session: str, tune: TuneParams):
        self.run, self.session, self.tune = run, session, tune
        self.done: set[int] = set()
        if run.active:
            self.experiment = run.client.get_run(run.run_id).info.experiment_id
            self.done = self._logged()

    def _logged(self) -> set[int]:
        numbers, token = set(), None
        while True:
            page = self.run.client.search_runs(
                [self.experiment], filter_string=f"tags.mlflow.parentRunId = '{self.run.run_id}'",
                max_results=1000, page_token=token)
            numbers |= {int(r.data.tags["optuna.trial_number"]) for r in page
                        if "optuna.trial_number" in r.data.tags}
            token = page.token
            if not token:
                return numbers

    def sync(self, study: Any) -> int:
        """Log the finished trials of this session, and failed ones of dead sessions."""
        import optuna

        if not self.run.active:
            return 0
        logged = 0
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        for trial in study.get_trials(deepcopy=False, states=states):
            if trial.number in self.done:
                continue
            mine = trial.user_attrs.get(ATTR_SESSION) == self.session
            if not mine and trial.state != optuna.trial.TrialState.FAIL:
                continue  # another machine's session logs it
            try:
                self.log_trial(trial)
            except Exception as exc:  # a tracking hiccup never stops the study; the next sync retries
                warnings.warn(f"MLflow: logging trial {trial.number} failed ({exc}); will retry")
                continue
            self.done.add(trial.number)
            logged += 1
        return logged

    def log_trial(self, trial: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self.run.client
        tags = {"mlflow.parentRunId": self.run.run_id, "stage": "tune-trial",
                "optuna.study": self.tune.study_name, "optuna.trial_number": str(trial.number),
                "optuna.state": trial.state.name, "method": self.tune.method,
                "worker": f"{trial.user_attrs.get(ATTR_HOST, '?')} pid {trial.user_attrs.get(ATTR_PID, '?')}"}
        if "failed_trial" in trial.system_attrs:
            tags["optuna.retry_of"] = str(trial.system_attrs["failed_trial"])
        if ATTR_DIVERGED in trial.user_attrs:
            tags["diverged"] = trial.user_attrs[ATTR_DIVERGED][:500]
        if ATTR_ERROR in trial.user_attrs:
            tags["error"] = trial.user_attrs[ATTR_ERROR][:500]
        created = client.create_run(self.experiment, run_name=f"trial {trial.number:03d}",
                                    start_time=_ms(trial.datetime_start), tags=tags)
        run_id = created.info.run_id
        params = [Param(name, repr(float(value))) for name, value in trial.params.items()]
        params += [Param("tune.epochs", str(self.tune.epochs)), Param("tune.method", self.tune.method)]
        stamp = _ms(trial.datetime_complete) or int(time.time() * 1000)
        metrics = []
        epochs = sorted(k for k in trial.user_attrs if k.startswith(ATTR_EPOCH))
        for key in epochs:
            step = int(key.removeprefix(ATTR_EPOCH))
            metrics += [Metric(name, float(v), stamp, step) for name, v in trial.user_attrs[key].items()]
        if not epochs:  # records missing (e.g. a retried copy): the reported values still give the curve
            metrics += [Metric("val_acc", float(v), stamp, int(s)) for s, v in trial.intermediate_values.items()]
        metrics.append(Metric("epochs_run", float(len(trial.intermediate_values)), stamp, 0))
        if trial.value is not None:
            metrics.append(Metric("objective", float(trial.value), stamp, 0))
        if trial.duration is not None:
            metrics.append(Metric("duration_s", trial.duration.total_seconds(), stamp, 0))
        for start in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[start:start + 500], params=params if start == 0 else [],
                             tags=[RunTag("optuna.state", trial.state.name)] if start == 0 else [])
        if not metrics:
            client.log_batch(run_id, params=params)
        status = "FAILED" if trial.state.name == "FAIL" else "FINISHED"
        client.set_terminated(run_id, status, end_time=stamp)


@contextlib.contextmanager
def parent_run(params: Params, study: Any, storage: StorageSpec, data_hash: str, device_label: str
               ) -> Iterator[Any]:
    """The study's MLflow run: reopened when the study already has one in this tracking store."""
    from .tracking import (MlflowRun, NullRun, _client_for, closing_run, start_run, tracking_enabled,
                           tracking_uri)

    if not tracking_enabled(params.tracking.enabled):
        yield NullRun()
        return
    uri = tracking_uri()
    previous = study.user_attrs.get(ATTR_PARENT_RUN)
    client = None
    if previous and study.user_attrs.get(ATTR_TRACKING_URI) == uri:
        client = _client_for(uri)
        try:
            if client.get_run(previous).info.lifecycle_stage != "active":
                previous = None
        except Exception:  # deleted or from another store
            previous = None
    else:
        previous = None
    if previous:
        client.update_run(previous, status="RUNNING")
        with closing_run(MlflowRun(client, previous)) as run:
            yield run
        return
    tags = {"profile": params.profile, "device": device_label, "params_sha256": params.digest(),
            "dataset_sha256": data_hash, "optuna.study": params.tune.study_name, "optuna.storage": storage.shown}
    with start_run(enabled=True, experiment=params.tracking.experiment, run_name=f"study {params.tune.study_name}",
                   stage="tune", params=params.flat(), tags=tags) as run:
        study.set_user_attr(ATTR_PARENT_RUN, run.run_id)
        study.set_user_attr(ATTR_TRACKING_URI, uri)
        yield run


def log_study_summary(run: Any, study: Any, summary: dict, seed: int) -> None:
    """Best value and params, importances and the history/importance/curve figures."""
    if not run.active:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    metrics = {f"trials/{k}": v for k, v in summary["trials"].items()}
    if summary["best_value"] is not None:
        metrics["best/val_acc"] = summary["best_value"]
        metrics["best/trial"] = summary["best_trial"]
        metrics.update({f"best/{k}": v for k, v in summary["best_params"].items()})
    metrics.update({f"importance/{k}": v for k, v in summary["importances"].items()})
    run.log_metrics(metrics, step=summary["trials"]["finished"])
    run.set_tags({"best_trial": summary["best_trial"], "best_value": summary["best_value"]})
    run.log_dict(summary, "tune/summary.json")
    plots = {"optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
             "intermediate_values": optuna.visualization.matplotlib.plot_intermediate_values}
    if summary["importances"]:
        plots["param_importances"] = lambda s: optuna.visualization.matplotlib.plot_param_importances(
            s, evaluator=_importance_evaluator(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in plots.items():
            try:
                axes = plot(study)
            except Exception as exc:  # a figure is a nicety: never fail the study for it
                warnings.warn(f"optuna {name} figure skipped ({exc})")
                continue
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            figure.set_size_inches(7, 4.5)
            figure.tight_layout()
            run.log_figure(figure, f"tune/{name}.png")
            plt.close(figure)


def _importance_evaluator(seed: int):
    """PED-ANOVA (Optuna 5's default): deterministic and without scikit-learn; fANOVA with a
    fixed seed on older Optuna."""
    import optuna

    if hasattr(optuna.importance, "PedAnovaImportanceEvaluator"):
        return optuna.importance.PedAnovaImportanceEvaluator()
    return optuna.importance.FanovaImportanceEvaluator(seed=seed)


def importances(study: Any, seed: int) -> dict[str, float]:
    """Parameter importances of the completed trials ({} with fewer than two)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, evaluator=_importance_evaluator(seed))
    except (ValueError, RuntimeError, ZeroDivisionError, ImportError):
        return {}
    return {k: float(v) for k, v in values.items() if math.isfinite(v)}


# --------------------------------------------------------------------------------------
# Outputs


def apply_command(best_params: dict[str, float], method: str) -> str:
    """A `dvc exp run` that runs the pipeline with the best values (dotted params.yaml keys)."""
    sets = [f"-S distill.method={method}"] + [f"-S {param_key(k)}={v!r}" for k, v in best_params.items()]
    return "dvc exp run " + " ".join(sets)


def summarise(study: Any, params: Params, storage: StorageSpec, target: int) -> dict:
    import optuna

    tune = params.tune
    state = counts(study)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value) if complete else None
    best_params = {k: float(v) for k, v in best.params.items()} if best else {}
    return {
        "study_name": tune.study_name, "storage": storage.shown, "direction": "maximize",
        "objective": f"val_acc after {tune.epochs} epoch(s) of {tune.method}",
        "method": tune.method, "epochs": tune.epochs, "sampler": f"TPE(seed={tune.sampler_seed})",
        "pruner": tune.pruner, "target_trials": target,
        "trials": {k: state[k] for k in ("finished", "complete", "pruned", "fail", "running", "waiting")},
        "best_value": float(best.value) if best else None,
        "best_trial": best.number if best else None,
        "best_params": best_params,
        "best_params_dotted": {param_key(k): v for k, v in best_params.items()},
        "importances": importances(study, tune.sampler_seed),
        "command": apply_command(best_params, tune.method) if best else None,
    }


def write_outputs(summary: dict) -> None:
    header = (f"# Best trial of the Optuna study {summary['study_name']!r} ({summary['objective']}).\n"
              "# Written by `matekd tune`. Run the pipeline with these values:\n"
              f"#   {summary['command']}\n")
    body = {"study_name": summary["study_name"], "objective": summary["objective"],
            "best_value": summary["best_value"], "best_trial": summary["best_trial"],
            "params": summary["best_params_dotted"], "command": summary["command"]}
    write_text(BEST_PARAMS_PATH, header + yaml.safe_dump(body, sort_keys=False, width=10 ** 6))
    write_json(METRICS_PATH, {k: v for k, v in summary.items() if k != "command"})


# --------------------------------------------------------------------------------------
# Stage


def study_signature(params: Params, data_hash: str, teacher_shas: dict[str, str]) -> dict:
    """What makes trials comparable: a study resumed with other settings would mix results."""
    tune = params.tune
    distill = params.distill.model_dump(mode="json")
    for name in tune.space:
        if name in RECIPE_KEYS:
            distill["recipe"].pop(name, None)
        else:
            distill.pop(name, None)
    for key in ("method", "log_every", "histogram_bins"):
        distill.pop(key, None)
    distill["recipe"].pop("epochs", None)
    return {"method": tune.method, "epochs": tune.epochs,
            "space": {k: v.model_dump() for k, v in sorted(tune.space.items())},
            "distill": distill, "dataset_sha256": data_hash, "teachers_sha256": teacher_shas}


def teacher_files(params: Params, method: str) -> dict[str, str]:
    """Hashes of the teacher weights the method uses; missing weights or caches fail here."""
    from .cache import cache_path
    from .student import method_teachers
    from .teachers import teacher_paths

    shas = {}
    needs_cache = method in ATTRIBUTION_METHODS or params.distill.teacher_signals == "cached"
    for name in method_teachers(params, method):
        weights = teacher_paths(name)["weights"]
        if not weights.exists():
            raise MatekdError(f"missing teacher weights {weights}; run `dvc repro train_teacher@{name}` first")
        if needs_cache and not cache_path(name).exists():
            raise MatekdError(f"missing CAM cache {cache_path(name)}; run `dvc repro cache@{name}` first")
        shas[name] = sha256_file(weights)
    return shas


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def open_study(params: Params, storage: StorageSpec, signature: dict):
    """Create or join the study; refuse one created with other settings or direction."""
    import optuna

    optuna_storage = storage.open()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(study_name=params.tune.study_name, storage=optuna_storage,
                                    direction="maximize", sampler=make_sampler(params.tune),
                                    pruner=make_pruner(params.tune), load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise MatekdError(f"study {params.tune.study_name!r} in {storage.shown} minimises; it is not a matekd "
                          "study. Choose another tune.study_name")
    old = study.user_attrs.get(ATTR_SIGNATURE)
    if old is None:
        study.set_user_attr(ATTR_SIGNATURE, signature)
    elif old != signature:
        changes = _diff(old, signature)
        raise ParamsError(f"study {params.tune.study_name!r} in {storage.shown} was run with other settings "
                          f"({'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''}); its trials would "
                          "not be comparable. Set a new tune.study_name (or delete the study) to start afresh")
    return study


def run_tune(params: Params, storage: str | None = None, workers: int = 1, n_trials: int | None = None, *,
             prepared_dir: str | Path = "prepared", trainer: Trainer | None = None,
             progress: bool = False) -> dict:
    """Stage tune. Without `n_trials` the study is topped up to `tune.n_trials` finished trials
    (so a rerun resumes an interrupted study); with it, this call adds `n_trials` more.
    `trainer` replaces `student.train_student` (tests). Returns the summary written to
    metrics/tune.json."""
    from .data import load_prepared
    from .runtime import device_name
    from .train import resolve_device

    if workers < 1:
        raise ParamsError(f"--workers {workers}: at least one worker is needed")
    if n_trials is not None and n_trials < 1:
        raise ParamsError(f"--n-trials {n_trials}: at least one trial is needed")
    tune = params.tune
    validate_space(params)
    spec = resolve_storage(storage or tune.storage)
    data = load_prepared(prepared_dir)
    signature = study_signature(params, data.manifest_hash, teacher_files(params, tune.method))
    device = resolve_device(params.device)
    study = open_study(params, spec, signature)
    session = uuid.uuid4().hex[:12]
    killed = fail_orphans(study)
    state = counts(study)
    target = tune.n_trials if n_trials is None else state["finished"] + n_trials
    prepared_dir = str(Path(prepared_dir).resolve())
    cpu_threads = max(1, (os.cpu_count() or 1) // workers) if device.type == "cpu" and workers > 1 else None
    jobs = [WorkerJob(params.model_dump(mode="json"), spec, target, session, k, prepared_dir, trainer, cpu_threads)
            for k in range(workers)]
    with parent_run(params, study, spec, data.manifest_hash, device_name(device)) as run:
        logger = TrialLogger(run, session, tune)
        logger.sync(study)  # trials failed above (killed in an earlier session)
        if state["finished"] < target:
            if workers == 1:
                run_worker(jobs[0], on_trial_end=lambda s, t: logger.sync(s))
            else:
                _run_processes(jobs, study, logger)
        else:
            print(f"study {tune.study_name!r} already holds {state['finished']} finished trials "
                  f"(target {target}); nothing to run", file=sys.stderr)
        fail_orphans(study)
        logger.sync(study)
        summary = summarise(study, params, spec, target)
        summary["killed_trials_failed_at_start"] = killed
        if summary["best_value"] is None:
            raise MatekdError(f"study {tune.study_name!r} has no completed trial "
                              f"({summary['trials']['pruned']} pruned, {summary['trials']['fail']} failed); "
                              "widen tune.space, lower pruner aggressiveness or add trials (--n-trials)")
        write_outputs(summary)
        log_study_summary(run, study, summary, tune.sampler_seed)
        summary["mlflow_parent_run_id"] = run.run_id
    short = state_line(summary)
    print(f"study {tune.study_name!r}: {short}; best val_acc {summary['best_value']:.4f} (trial "
          f"{summary['best_trial']}). Apply with:\n  {summary['command']}")
    return summary


def state_line(summary: dict) -> str:
    t = summary["trials"]
    return f"{t['complete']} complete, {t['pruned']} pruned, {t['fail']} failed"


def _run_processes(jobs: list[WorkerJob], study: Any, logger: TrialLogger) -> None:
    """Spawn one process per job; log trials as they finish; fail the trials of crashed workers."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_worker_process, args=(job, errors), name=f"matekd-tune-{job.worker}")
             for job in jobs]
    for proc in procs:
        proc.start()
    crashed: list[str] = []
    try:
        pending = set(range(len(procs)))
        while pending:
            for k in list(pending):
                procs[k].join(timeout=POLL_S / max(len(pending), 1))
                if procs[k].exitcode is not None:
                    pending.discard(k)
                    if procs[k].exitcode != 0:
                        # Its running trial would stay RUNNING: fail (and retry) it now.
                        fail_orphans(study, pids={procs[k].pid})
                        code = procs[k].exitcode
                        crashed.append(f"worker {k} " + (f"was killed by signal {-code}" if code < 0
                                                         else f"exited with code {code}"))
            logger.sync(study)
    except BaseException:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
        fail_orphans(study, pids={p.pid for p in procs if p.pid is not None})
        raise
    messages = []
    while True:
        try:
            worker, message = errors.get(timeout=0.2)
        except Exception:  # queue.Empty
            break
        messages.append(f"worker {worker}: {message}")
    if messages:
        raise MatekdError("; ".join(messages))
    if crashed:
        raise MatekdError(f"{'; '.join(crashed)}; a trial it was running is marked failed and queued again. "
                          "Run `matekd tune` again to finish the study")
