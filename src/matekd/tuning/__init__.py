"""Optuna tuning: one study per method, every method tuned alike (`matekd tune`).

Modules, one concern each:
    space     what each method searches (from the method table), pre-flight checks, sampling
              with dotted params.yaml names, the seeded TPE sampler and the pruner
    storage   tune.storage / --storage: SQLite file, journal file or RDB URL (password masked)
    recovery  killed trials: claimed by their process, failed when it is gone, retried once
    study     a method's study: name, signature, opening, counts, best trial, importances
    workers   the objective, a worker's loop, worker processes spread over the GPUs
    trials    per-epoch records and MLflow (parent run per study, child run per trial)

Only the tune stage (matekd.stages.tune) imports this package; optuna is imported here and
nowhere else.
"""

from __future__ import annotations

from .recovery import fail_orphans, retry_trial, this_host
from .space import (
                    apply_values,
                    check_space,
                    make_pruner,
                    make_sampler,
                    method_space,
                    select_methods,
                    suggest,
                    unused_keys,
)
from .storage import StorageSpec, mask_password, resolve_storage
from .study import (
                    MethodStudy,
                    counts,
                    importances,
                    metrics_record,
                    open_study,
                    study_name,
                    study_signature,
                    summarise,
                    teacher_identity,
                    tuned_meta,
)
from .trials import TrialLogger, log_summary, read_records, records_folder, records_path, study_run
from .workers import SignalsMemo, WorkerJob, optimise, run_worker, worker_devices

__all__ = [
    "MethodStudy", "SignalsMemo", "StorageSpec", "TrialLogger", "WorkerJob", "apply_values", "check_space",
    "counts", "fail_orphans", "importances", "log_summary", "make_pruner", "make_sampler", "mask_password",
    "method_space", "metrics_record", "open_study", "optimise", "read_records", "records_folder", "records_path",
    "resolve_storage", "retry_trial", "run_worker", "select_methods", "study_name", "study_run", "study_signature",
    "suggest", "summarise", "teacher_identity", "this_host", "tuned_meta", "unused_keys", "worker_devices",
]
