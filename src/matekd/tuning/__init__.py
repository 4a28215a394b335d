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

from .recovery import fail_orphans
from .space import apply_values, check_space, make_pruner, method_space, select_methods, unused_keys
from .storage import StorageSpec, check_workers, resolve_storage
from .study import MethodStudy, metrics_record, open_study, summarise, teacher_identity, tuned_meta
from .trials import log_summary, read_records, records_folder, records_path, study_run
from .workers import TeacherOutputsMemo, optimise, worker_devices

__all__ = [
    "MethodStudy", "TeacherOutputsMemo", "StorageSpec", "apply_values", "check_space", "check_workers", "fail_orphans",
    "log_summary",
    "make_pruner", "method_space", "metrics_record", "open_study", "optimise", "read_records", "records_folder",
    "records_path", "resolve_storage", "select_methods", "study_run", "summarise", "teacher_identity", "tuned_meta",
    "unused_keys", "worker_devices",
]
