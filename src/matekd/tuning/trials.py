"""What a study leaves besides the Optuna storage: per-epoch records of every trial, and its
MLflow runs (one parent run per study, one child run per trial).

Per-epoch records: the process that runs a trial writes one JSON line per epoch (val_acc,
train_loss, train_acc, lr, ... and the wall-clock time) to
`tuning/trials/<study>/trial-<number>.jsonl` (one file per trial, one writer each, flushed per
line; a line cut by a kill is ignored). The study itself keeps only what Optuna needs: the
reported val_acc per epoch and a short claim of the process (matekd.tuning.recovery).

MLflow: only the launching process (`matekd tune`) writes to the tracking store, so several
worker processes never write one SQLite store at once. The study's parent run id is kept in
the study (per tracking store and experiment), so a resumed study logs into the same run. A
trial's child run is written once the trial is finished: its dotted parameters, its per-epoch
curves (from the records file; the reported val_acc when the file is missing, e.g. a trial of
another machine), its state and duration. Everything goes through matekd.tracking, so
`tracking.mode: offline` and MATEKD_TRACKING=off work as for every stage.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from ..params import Params
from ..paths import TUNE_RECORDS_DIR
from ..plotting import pyplot
from ..tracking import (
    MlflowRun,
    NullRun,
    OfflineRun,
    closing_run,
    offline_root,
    reopen_run,
    start_run,
    tracking_mode,
    tracking_uri,
)
from .recovery import ATTR_DEVICE, ATTR_DIVERGED, ATTR_ERROR, ATTR_HOST, ATTR_PID, ATTR_SESSION, ATTR_WORKER
from .storage import mask_password
from .study import importance_evaluator

TrialState = optuna.trial.TrialState
ATTR_PARENT_RUNS = "matekd.mlflow_parent_runs"  # study user attribute: {store and experiment: run id}
TRIAL_STAGE = "tune-trial"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --------------------------------------------------------------------------------------
# Per-epoch records


def records_folder(study_name: str) -> Path:
    """Folder of a study's per-epoch records (absolute, for worker processes)."""
    return (TUNE_RECORDS_DIR / re.sub(r"[^A-Za-z0-9_.-]", "_", study_name)).resolve()


def records_path(folder: Path, number: int) -> Path:
    return folder / f"trial-{number:05d}.jsonl"


class EpochRecords:
    """The writer of one trial's per-epoch records (truncates an older file of that name)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        path.write_text("")

    def append(self, epoch: int, record: dict[str, float]) -> None:
        line = json.dumps({"epoch": epoch, "time_ms": int(time.time() * 1000), **record}, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a trial ([] when there is no file); a line cut short by a kill
    is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


# --------------------------------------------------------------------------------------
# The study's parent run


def _store_key(params: Params, mode: str) -> str:
    where = tracking_uri() if mode == "online" else str(offline_root(params.tracking.offline_dir))
    return f"{mode}:{mask_password(where)}#{params.tracking.experiment}"


@contextlib.contextmanager
def study_run(params: Params, study: optuna.Study, *, log_params: dict[str, Any], tags: dict[str, Any]
              ) -> Iterator[NullRun]:
    """The study's MLflow run (a no-op run when tracking is off): the one this study already
    has in this tracking store, reopened, else a new run whose id is kept in the study."""
    mode = tracking_mode(params.tracking.enabled, params.tracking.mode)
    if mode == "off":
        yield NullRun()
        return
    key = _store_key(params, mode)
    known = dict(study.user_attrs.get(ATTR_PARENT_RUNS, {}))
    previous = reopen_run(known[key], mode=mode, offline_dir=params.tracking.offline_dir) if key in known else None
    if previous is not None:
        with closing_run(previous) as run:
            yield run
        return
    with start_run(enabled=params.tracking.enabled, mode=params.tracking.mode,
                   offline_dir=params.tracking.offline_dir, experiment=params.tracking.experiment,
                   run_name=f"tune {study.study_name}", stage="tune", params=log_params, tags=tags) as run:
        study.set_user_attr(ATTR_PARENT_RUNS, {**known, key: run.run_id})
        yield run


def _ms(when: Any) -> int | None:
    return int(when.timestamp() * 1000) if when is not None else None


def open_child_run(parent: NullRun, run_name: str, tags: dict[str, str], start_ms: int | None) -> NullRun:
    """A run nested under `parent` in the same store (online: starting at `start_ms`)."""
    if isinstance(parent, MlflowRun):
        experiment = parent.client.get_run(parent.run_id).info.experiment_id
        created = parent.client.create_run(experiment, run_name=run_name, start_time=start_ms,
                                           tags={**tags, "mlflow.parentRunId": parent.run_id})
        return MlflowRun(parent.client, created.info.run_id)
    if isinstance(parent, OfflineRun):
        return OfflineRun.create(parent.folder.parent, experiment=parent.record["experiment"], run_name=run_name,
                                 tags=tags, parent_run_id=parent.run_id)
    return NullRun()


# --------------------------------------------------------------------------------------
# One child run per trial


class TrialLogger:
    """Logs each finished trial of this session once as a child run of the study's run, and
    the killed trials of earlier sessions that this session failed (`adopt`)."""

    def __init__(self, run: NullRun, study_name: str, session: str, method: str, epochs: int, folder: Path):
        self.run, self.study_name, self.session = run, study_name, session
        self.method, self.epochs, self.folder = method, epochs, folder
        self.done: set[int] = set()
        self.adopted: set[int] = set()

    def adopt(self, numbers: list[int]) -> None:
        self.adopted.update(numbers)

    def sync(self, study: optuna.Study) -> int:
        """Log the finished trials not logged yet; returns how many were logged."""
        if not self.run.active:
            return 0
        logged = 0
        for trial in study.get_trials(deepcopy=False, states=FINISHED):
            if trial.number in self.done:
                continue
            if trial.user_attrs.get(ATTR_SESSION) != self.session and trial.number not in self.adopted:
                continue  # another session's trial: that session logs it
            try:
                self.log_trial(trial)
            except Exception as exc:  # a tracking hiccup never stops the study; the next sync retries
                warnings.warn(f"MLflow: logging trial {trial.number} failed ({exc}); will retry", stacklevel=2)
                continue
            self.done.add(trial.number)
            logged += 1
        return logged

    def log_trial(self, trial: optuna.trial.FrozenTrial) -> None:
        attrs = trial.user_attrs
        tags = {"stage": TRIAL_STAGE, "optuna.study": self.study_name,
                "optuna.trial_number": str(trial.number), "optuna.state": trial.state.name, "method": self.method,
                "worker": f"{attrs.get(ATTR_HOST, '?')} pid {attrs.get(ATTR_PID, '?')} "
                          f"(worker {attrs.get(ATTR_WORKER, '?')})",
                "device": str(attrs.get(ATTR_DEVICE, "?"))}
        if "failed_trial" in trial.system_attrs:
            tags["optuna.retry_of"] = str(trial.system_attrs["failed_trial"])
        for attr, tag in ((ATTR_DIVERGED, "diverged"), (ATTR_ERROR, "error")):
            if attr in attrs:
                tags[tag] = str(attrs[attr])[:500]
        child = open_child_run(self.run, f"trial {trial.number:03d}", tags, _ms(trial.datetime_start))
        child.log_params({**{k: repr(float(v)) for k, v in trial.params.items()},
                          "distill.method": self.method, "tune.epochs": self.epochs})
        records = read_records(records_path(self.folder, trial.number))
        if records:
            for record in records:
                child.log_metrics({k: v for k, v in record.items() if k not in ("epoch", "time_ms")
                                   and isinstance(v, (int, float))}, step=record["epoch"])
        else:  # records missing (another machine's trial): the reported values still give the curve
            for step, value in sorted(trial.intermediate_values.items()):
                child.log_metrics({"val_acc": value}, step=step)
        summary = {"epochs_run": float(len(trial.intermediate_values))}
        if trial.value is not None:
            summary["objective"] = float(trial.value)
        if trial.duration is not None:
            summary["duration_s"] = trial.duration.total_seconds()
        child.log_metrics(summary, step=0)
        child.finish("FAILED" if trial.state == TrialState.FAIL else "FINISHED")


# --------------------------------------------------------------------------------------
# The study's summary in its parent run


def log_summary(run: NullRun, study: optuna.Study, summary: dict[str, Any]) -> None:
    """Best value and values, trial counts, importances (when reported) and the figures."""
    if not run.active:
        return
    metrics = {f"trials/{k}": v for k, v in summary["trials"].items()}
    metrics["trials/target"] = summary["target_trials"]
    if summary["best_value"] is not None:
        metrics["best/val_acc"] = summary["best_value"]
        metrics["best/trial"] = summary["best_trial"]
        metrics.update({f"best/{k}": v for k, v in summary["best_values"].items()})
    metrics.update({f"importance/{k}": v for k, v in summary["importances"].items()})
    run.log_metrics(metrics, step=summary["trials"]["finished"])
    run.set_tags({"best_trial": summary["best_trial"], "best_value": summary["best_value"],
                  "importances": summary["importances_note"] or "reported"})
    run.log_dict(summary, "tune/summary.json")
    plt = pyplot()
    for name, figure in study_figures(study, with_importances=bool(summary["importances"])):
        run.log_figure(figure, f"tune/{name}.png")
        plt.close(figure)


def study_figures(study: optuna.Study, with_importances: bool) -> Iterator[tuple[str, Any]]:
    """Optimisation history, intermediate values (val_acc per epoch of every trial) and, when
    importances are reported, the importance bars; a figure that fails is skipped with a warning."""
    from optuna.visualization import matplotlib as plots

    makers = {"optimization_history": plots.plot_optimization_history,
              "intermediate_values": plots.plot_intermediate_values}
    if with_importances:
        makers["param_importances"] = lambda s: plots.plot_param_importances(s, evaluator=importance_evaluator())
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # its matplotlib plots
                axes = make(study)
        except Exception as exc:  # a figure is a nicety: never fail the study for it
            warnings.warn(f"optuna {name} figure skipped ({exc})", stacklevel=2)
            continue
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        yield name, figure
