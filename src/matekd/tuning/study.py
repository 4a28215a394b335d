"""One method's study: its name, what it is pinned to (the signature), opening it, and what it
found (counts, best trial, importances).

Every selected method gets its own study, `<tune.study_name>-<method>`, in the same storage,
with the same budget (tune.n_trials), sampler seed, pruner and ranges for shared keys. The
study records a signature of everything that makes its trials comparable (the method, epochs,
the ranges it searches, the method's other values, the data, the teachers and their caches,
the pruner); resuming it with other settings is refused, naming what changed.
"""

from __future__ import annotations

import math
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna

from .. import teachers as teacher_files
from ..errors import MatekdError, ParamsError
from ..methods import Method, method_teachers
from ..params import Params, SpaceEntry, param_key
from .recovery import fail_orphans
from .space import describe_space, make_pruner, make_sampler, method_space
from .storage import StorageSpec

TrialState = optuna.trial.TrialState
ATTR_SIGNATURE = "matekd.signature"  # study user attribute
OBJECTIVE = "val_acc"


@dataclass
class MethodStudy:
    """An opened study of one method, for one `matekd tune` session."""

    params: Params
    method: Method
    space: dict[str, SpaceEntry]           # dotted params.yaml key -> range
    storage: StorageSpec
    study: optuna.Study
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    killed_at_start: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.study.study_name


def study_name(params: Params, method: Method) -> str:
    return f"{params.tune.study_name}-{method.name}"


def teacher_identity(params: Params, method: Method) -> dict[str, dict[str, str]]:
    """sha256 of the teacher weights (and caches, when the method reads them) the method uses;
    a missing file fails here, before any study is opened, with the command that makes it."""
    names = method_teachers(method, list(params.teachers), params.distill.kd_teacher)
    return teacher_files.teacher_identity(names, method.reads_cache(params.distill.teacher_signals))


def study_signature(params: Params, method: Method, space: dict[str, SpaceEntry], data_hash: str,
                    teachers: dict[str, dict[str, str]]) -> dict[str, Any]:
    """What makes this method's trials comparable (JSON-safe: compared with the stored copy)."""
    tune, distill = params.tune, params.distill
    fixed = {param_key(h): getattr(distill, h) for h in method.keys if param_key(h) not in space}
    recipe = {f"distill.recipe.{k}": v for k, v in distill.recipe.model_dump(mode="json").items()
              if f"distill.recipe.{k}" not in space and k != "epochs"}
    return {"method": method.name, "epochs": tune.epochs, "space": describe_space(space),
            "student": distill.student, "seed": distill.seed,
            "teacher_signals": distill.teacher_signals if method.has_kd else None,
            "values": fixed, "recipe": recipe,
            "pruner": {"name": tune.pruner, "warmup_epochs": tune.pruner_warmup_epochs,
                       "startup_trials": tune.pruner_startup_trials},
            "dataset_sha256": data_hash, "teachers_sha256": teachers}


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def open_study(params: Params, method: Method, storage: StorageSpec, data_hash: str,
               teachers: dict[str, dict[str, str]]) -> MethodStudy:
    """Create or join the method's study; refuse one created with other settings or another
    direction; name its objective `val_acc`; fail (and retry) trials killed on this host."""
    space = method_space(params.tune, method)
    signature = study_signature(params, method, space, data_hash, teachers)
    name = study_name(params, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(study_name=name, storage=storage.open(), direction="maximize",
                                    sampler=make_sampler(params.tune), pruner=make_pruner(params.tune),
                                    load_if_exists=True)
        if study.directions != [optuna.study.StudyDirection.MAXIMIZE]:
            raise MatekdError(f"study {name!r} in {storage.shown} does not maximise one objective; it is not a "
                              "matekd study. Choose another tune.study_name")
        old = study.user_attrs.get(ATTR_SIGNATURE)
        if old is None:
            study.set_user_attr(ATTR_SIGNATURE, signature)
        elif old != signature:
            changes = _diff(old, signature)
            raise ParamsError(f"study {name!r} in {storage.shown} was run with other settings "
                              f"({'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''}); its trials would "
                              "not be comparable. Set a new tune.study_name (or delete the study) to start afresh")
        if study.metric_names != [OBJECTIVE]:
            study.set_metric_names([OBJECTIVE])
    opened = MethodStudy(params, method, space, storage, study)
    opened.killed_at_start = fail_orphans(study)
    return opened


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state (lower-case names), plus `finished` = complete + pruned: the trials
    that count towards tune.n_trials."""
    out = {s.name.lower(): 0 for s in TrialState}
    for trial in study.get_trials(deepcopy=False):
        out[trial.state.name.lower()] += 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


def importance_evaluator() -> optuna.importance.BaseImportanceEvaluator:
    """PED-ANOVA (Optuna 5's default): deterministic and without scikit-learn."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.importance.PedAnovaImportanceEvaluator()


def importances(study: optuna.Study, min_trials: int) -> tuple[dict[str, float], str | None]:
    """({dotted key: importance}, None) from `min_trials` completed trials on; below that
    ({}, why): with a handful of trials the numbers are noise (see tune.min_trials_for_importance)."""
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if complete < min_trials:
        return {}, f"importances need at least {min_trials} completed trials; have {complete}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            values = optuna.importance.get_param_importances(study, evaluator=importance_evaluator())
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return {}, f"importances could not be computed ({exc})"
    return {k: float(v) for k, v in values.items() if math.isfinite(v)}, None


def summarise(opened: MethodStudy, target: int) -> dict[str, Any]:
    """What the study found, as plain data (printed, logged to MLflow, the source of the outputs)."""
    study, tune = opened.study, opened.params.tune
    state = counts(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value) if complete else None  # ties: the earliest trial
    values, note = importances(study, tune.min_trials_for_importance)
    return {
        "method": opened.method.name, "study_name": opened.name, "storage": opened.storage.shown,
        "objective": f"{OBJECTIVE} after {tune.epochs} epoch(s)", "direction": "maximize",
        "epochs": tune.epochs, "sampler": f"TPE(seed={tune.sampler_seed} + worker, constant liar)",
        "pruner": tune.pruner, "space": describe_space(opened.space), "target_trials": target,
        "trials": {k: state[k] for k in ("finished", "complete", "pruned", "fail", "running", "waiting")},
        "best_value": float(best.value) if best else None,
        "best_trial": best.number if best else None,
        "best_values": {k: float(v) for k, v in best.params.items()} if best else {},
        "importances": values, "importances_note": note,
        "killed_trials_failed_at_start": opened.killed_at_start,
    }


def tuned_meta(summary: dict[str, Any]) -> dict[str, Any]:
    """The provenance a method's tuned-values file carries next to its values."""
    return {"study": summary["study_name"], "objective": summary["objective"],
            "trials": summary["trials"]["finished"], "best_trial": summary["best_trial"],
            "best_value": summary["best_value"]}


def metrics_record(summary: dict[str, Any]) -> dict[str, Any]:
    """metrics/tune/<method>.json: numbers only (DVC metrics)."""
    out: dict[str, Any] = {"best_value": summary["best_value"], "best_trial": summary["best_trial"],
                           "epochs": summary["epochs"], "target_trials": summary["target_trials"],
                           "trials": summary["trials"]}
    if summary["importances"]:
        out["importances"] = summary["importances"]
    return out
