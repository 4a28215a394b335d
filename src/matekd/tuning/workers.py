"""Running trials: the objective, a worker's loop, and N worker processes spread over the GPUs.

The objective trains one student (matekd.training.students.train_students, or an injected trainer with
the same signature) for tune.epochs with the trial's values and reports validation accuracy
after every epoch, so that the pruner can stop a hopeless trial; the test set is never used.
A diverged trial is pruned (TPE learns to avoid the region); an unexpected error fails the
trial and the study goes on (a worker stops after MAX_CONSECUTIVE_FAILURES in a row); a
user-facing error (a missing cache, ...) stops the study.

`--workers N` starts N processes that join the study; on a machine with G visible GPUs
worker k trains on GPU k mod G (`worker_devices`). Each worker stops once the study holds its
target of finished trials, counting the ones still running elsewhere; the launching process
meanwhile logs finished trials to MLflow and fails the trials of a worker that died.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from ..data.prepared import Prepared, load_prepared
from ..errors import MatekdError, ParamsError, TrainingDiverged
from ..methods import Method
from ..methods import get as get_method
from ..params import Params, validate_params
from ..precision import use_precision
from ..tracking import NullRun
from ..training.loop import assign_round_robin, configure_determinism, visible_devices
from ..training.students import resolve_spec, train_students
from ..training.teacher_outputs import TeacherOutputs, TeacherOutputsLoader, load_teacher_outputs
from .recovery import ATTR_DIVERGED, ATTR_ERROR, claim, fail_orphans, fail_stale
from .space import apply_values, make_pruner, make_sampler, method_space, suggest
from .storage import StorageSpec
from .study import MethodStudy, counts
from .trials import EpochRecords, TrialLogger, records_folder, records_path

TrialState = optuna.trial.TrialState
Trainer = Callable[..., Any]  # the signature of matekd.training.students.train_students
MAX_CONSECUTIVE_FAILURES = 3  # a worker stops when this many of its trials in a row crash
POLL_S = 1.0


class TrialCrashed(Exception):
    """A trial raised an unexpected error: it is marked FAIL and the study goes on."""


def worker_devices(workers: int, devices: Sequence[str]) -> list[str]:
    """The device of each worker: worker k on devices[k mod len(devices)]."""
    if workers < 1:
        raise ParamsError(f"--workers {workers}: at least one worker is needed")
    assigned = [""] * workers
    for device, ranks in assign_round_robin(range(workers), list(devices)):
        for rank in ranks:
            assigned[rank] = device
    return assigned


class TeacherOutputsMemo:
    """Teacher weights and caches do not change between trials (the study signature pins
    their hashes): a worker loads them once and hands the same tensors to every trial."""

    def __init__(self, load: TeacherOutputsLoader = load_teacher_outputs):
        self.load = load
        self.memo: dict[tuple, TeacherOutputs] = {}

    def __call__(self, params: Params, names: Sequence[str], need_maps: bool, data: Prepared,
                 device: torch.device) -> TeacherOutputs:
        key = (tuple(names), need_maps, params.distill.teacher_signals, data.manifest_hash, str(device))
        if key not in self.memo:
            self.memo[key] = self.load(params, names, need_maps, data, device)
        return self.memo[key]


@dataclass
class WorkerJob:
    """Everything a worker process needs (picklable: it crosses a spawn)."""

    params: dict                # Params.model_dump(mode="json")
    method: str
    study_name: str
    storage: StorageSpec
    target: int                 # stop once the study holds this many finished trials
    session: str
    worker: int
    device: str
    prepared_dir: str
    records: str                # folder of the per-epoch records
    trainer: Trainer | None = None
    threads: int | None = None
    progress: bool = False


def make_objective(params: Params, method: Method, data: Prepared, device: torch.device, trainer: Trainer,
                   job: WorkerJob, outputs_loader: TeacherOutputsLoader) -> Callable[[optuna.Trial], float]:
    """The trial function: claim, sample, train the student for tune.epochs, report val_acc
    after every epoch (and write the epoch's record for MLflow)."""
    tune = params.tune
    space = method_space(tune, method)
    folder = Path(job.records)

    def objective(trial: optuna.Trial) -> float:
        claim(trial, job.session, job.worker, str(device))
        values = suggest(trial, space)
        trial_params = apply_values(params, values, epochs=tune.epochs)
        spec = resolve_spec(trial_params, method.name, trial_params.distill.seed, output=f"trial-{trial.number}")
        records = EpochRecords(records_path(folder, trial.number))
        last: dict[str, float] = {}

        def epoch_hook(epoch: int, epoch_records: list[dict]) -> None:
            record = {k: float(v) for k, v in epoch_records[0].items()
                      if k != "epoch" and isinstance(v, (int, float))}
            records.append(epoch, record)
            last.clear()
            last.update(record)
            value = record["val_acc"]
            trial.report(value, epoch)
            if math.isnan(value) or trial.should_prune():
                raise optuna.TrialPruned(f"val_acc {value:.4f} at epoch {epoch} is below the pruner's bar")

        try:
            trainer(trial_params, [spec], data, device, [NullRun()], None, job.progress, epoch_hook,
                    with_test=False, outputs_loader=outputs_loader)
        except TrainingDiverged as exc:
            # A diverged run cannot recover; pruning (not failing) lets TPE learn to avoid the region.
            trial.set_user_attr(ATTR_DIVERGED, str(exc)[:500])
            raise optuna.TrialPruned(f"training diverged: {exc}") from None
        except (MatekdError, optuna.TrialPruned):
            raise  # user-facing problems (missing cache, ...) stop the study
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr(ATTR_ERROR, message[:500])
            raise TrialCrashed(message) from exc
        if "val_acc" not in last:
            raise MatekdError("the student training reported no epoch")
        return last["val_acc"]

    return objective


def run_worker(job: WorkerJob, data: Prepared | None = None,
               on_trial_end: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None) -> int:
    """Run trials of one study until it holds `job.target` finished trials (counting the ones
    still running elsewhere). Returns the number of trials this worker ran."""
    if job.threads:
        torch.set_num_threads(job.threads)
    params = validate_params(job.params)
    method = get_method(job.method)
    device = torch.device(job.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configure_determinism(params.distill.seed, params.deterministic)
    use_precision(params.precision, device)
    data = data if data is not None else load_prepared(job.prepared_dir)
    study = optuna.load_study(study_name=job.study_name, storage=job.storage.open(),
                              sampler=make_sampler(params.tune, job.worker), pruner=make_pruner(params.tune))
    objective = make_objective(params, method, data, device, job.trainer or train_students, job, TeacherOutputsMemo())
    ran: list[optuna.trial.FrozenTrial] = []  # this worker's trials, as Optuna hands them to callbacks
    callbacks = [lambda _, trial: ran.append(trial), *([on_trial_end] if on_trial_end else [])]
    failures = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            fail_stale(study)
            state = counts(study)
            if state["finished"] + state["running"] >= job.target:
                return len(ran)
            study.optimize(objective, n_trials=1, catch=(TrialCrashed,), callbacks=callbacks)
            last = ran[-1]
            failures = failures + 1 if last.state == TrialState.FAIL else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise MatekdError(f"{failures} trials in a row failed (last: trial {last.number}, "
                                  f"{last.user_attrs.get(ATTR_ERROR, 'see the log above')}); stopping this "
                                  "worker. Fix the error, then run `matekd tune` again to resume")


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


def run_processes(jobs: list[WorkerJob], study: optuna.Study, logger: TrialLogger) -> None:
    """One spawned process per job; log trials as they finish; fail the trials of a worker
    that died (they are queued again once)."""
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
            for k in sorted(pending):
                procs[k].join(timeout=POLL_S / len(pending))
                code = procs[k].exitcode
                if code is None:
                    continue
                pending.discard(k)
                if code != 0:
                    fail_orphans(study, pids={procs[k].pid})  # its running trial would stay RUNNING
                    crashed.append(f"worker {k} ({jobs[k].device}) " + (f"was killed by signal {-code}" if code < 0
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
        except queue.Empty:
            break
        messages.append(f"worker {worker}: {message}")
    if messages:
        raise MatekdError("; ".join(messages))
    if crashed:
        raise MatekdError(f"{'; '.join(crashed)}; a trial it was running is marked failed and queued again. "
                          "Run `matekd tune` again to finish the study")


def optimise(opened: MethodStudy, run: NullRun, data: Prepared, *, workers: int = 1, n_trials: int | None = None,
             prepared_dir: str | Path = "prepared", trainer: Trainer | None = None, progress: bool = False) -> int:
    """Run the study up to its target: tune.n_trials finished trials (so a rerun resumes an
    interrupted study), or `n_trials` more than it holds now. In this process with one worker,
    else in `workers` processes spread over the visible GPUs. Returns the target."""
    params, study = opened.params, opened.study
    state = counts(study)
    target = params.tune.n_trials if n_trials is None else state["finished"] + n_trials
    folder = records_folder(opened.name)
    logger = TrialLogger(run, opened.name, opened.session, opened.method.name, params.tune.epochs, folder)
    logger.adopt(opened.killed_at_start)
    logger.sync(study)
    if state["finished"] >= target:
        print(f"study {opened.name!r} already holds {state['finished']} finished trials (target {target}); "
              "nothing to run", file=sys.stderr)
        return target
    devices = worker_devices(workers, [str(d) for d in visible_devices(params.device)])
    on_cpu = all(d == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // workers) if on_cpu and workers > 1 else None
    jobs = [WorkerJob(params.model_dump(mode="json"), opened.method.name, opened.name, opened.storage, target,
                      opened.session, k, device, str(Path(prepared_dir).resolve()), str(folder), trainer, threads,
                      progress and workers == 1)
            for k, device in enumerate(devices)]
    if workers == 1:
        run_worker(jobs[0], data=data, on_trial_end=lambda s, t: logger.sync(s))
    else:
        print(f"study {opened.name!r}: {workers} worker processes on {', '.join(devices)}", file=sys.stderr)
        run_processes(jobs, study, logger)
    logger.adopt(fail_orphans(study))
    logger.sync(study)
    return target
