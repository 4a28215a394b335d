"""`matekd tune`: one Optuna study per method, every method tuned alike.

Not a DVC stage on purpose: an open-ended, resumable search would keep `dvc status` dirty. Its
committed outputs, `tuning/best/<method>.yaml` (each method's own best values), enter the
pipeline through the method_inputs stage when `ablation.tuned: true`. It also writes
`metrics/tune/<method>.json` (numbers only) and logs one MLflow parent run per study with a
child run per trial. The studies live in tune.storage (default tuning/optuna.db); a rerun tops
each study up to tune.n_trials finished trials, `--n-trials K` adds K more.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .. import tuning
from ..data.prepared import load_prepared
from ..errors import MatekdError, ParamsError
from ..methods import Method, method_teachers
from ..params import Params
from ..paths import TUNE_METRICS_DIR, tuned_values_path
from ..storage import write_json
from ..training.loop import device_name, resolve_device
from ..training.students import logged_params, resolve_spec
from ..tuned import write_tuned_values

APPLY_COMMAND = "dvc exp run -S ablation.tuned=true"


def study_params(opened: tuning.MethodStudy) -> dict[str, Any]:
    """The parent run's params: what the method trains with besides the searched keys (flat
    params.yaml keys), the ranges it searches and the tuning settings."""
    params, method, tune = opened.params, opened.method, opened.params.tune
    base = tuning.apply_values(params, {}, epochs=tune.epochs)
    spec = resolve_spec(base, method.name, base.distill.seed, output="")
    teachers = method_teachers(method, list(params.teachers), params.distill.kd_teacher)
    out = {k: v for k, v in logged_params(spec, base, teachers).items() if k not in opened.space}
    out.pop("ablation.tuned", None)
    out.update({f"tune.space.{key}": f"[{e.low:g}, {e.high:g}]{' log' if e.log else ''}"
                for key, e in opened.space.items()})
    out.update({"tune.study_name": opened.name, "tune.storage": opened.storage.shown, "tune.epochs": tune.epochs,
                "tune.n_trials": tune.n_trials, "tune.sampler_seed": tune.sampler_seed, "tune.pruner": tune.pruner,
                "tune.pruner_warmup_epochs": tune.pruner_warmup_epochs,
                "tune.pruner_startup_trials": tune.pruner_startup_trials,
                "tune.min_trials_for_importance": tune.min_trials_for_importance})
    return out


def _report(summary: dict[str, Any], written: Path) -> str:
    t = summary["trials"]
    line = (f"study {summary['study_name']!r}: {t['complete']} complete, {t['pruned']} pruned, {t['fail']} failed; "
            f"best val_acc {summary['best_value']:.4f} (trial {summary['best_trial']}) -> {written}")
    if summary["importances_note"]:
        line += f"\n  {summary['importances_note']} (tune.min_trials_for_importance)"
    else:
        ranked = sorted(summary["importances"].items(), key=lambda kv: -kv[1])
        line += "\n  importances: " + ", ".join(f"{k} {v:.2f}" for k, v in ranked)
    return line


def tune_method(params: Params, method: Method, storage: tuning.StorageSpec, data: Any, teachers: dict,
                workers: int, n_trials: int | None, prepared_dir: str | Path, trainer: Any,
                progress: bool) -> dict[str, Any]:
    """One method's study: run it, write its tuned values and metrics, log its summary."""
    opened = tuning.open_study(params, method, storage, data.manifest_hash, teachers)
    tags = {"profile": params.profile, "device": device_name(resolve_device(params.device)), "workers": workers,
            "params_sha256": params.digest(), "dataset_sha256": data.manifest_hash, "method": method.name,
            "optuna.study": opened.name, "optuna.storage": storage.shown}
    with tuning.study_run(params, opened.study, log_params=study_params(opened), tags=tags) as run:
        target = tuning.optimise(opened, run, data, workers=workers, n_trials=n_trials, prepared_dir=prepared_dir,
                                 trainer=trainer, progress=progress)
        summary = tuning.summarise(opened, target)
        if summary["best_value"] is None:
            t = summary["trials"]
            raise MatekdError(f"study {opened.name!r} has no completed trial ({t['pruned']} pruned, {t['fail']} "
                              "failed); widen tune.space, prune less (tune.pruner) or add trials (--n-trials)")
        written = write_tuned_values(method, summary["best_values"], tuning.tuned_meta(summary))
        write_json(TUNE_METRICS_DIR / f"{method.name}.json", tuning.metrics_record(summary))
        tuning.log_summary(run, opened.study, summary)
        summary["mlflow_run_id"] = run.run_id
    print(_report(summary, written))
    return summary


def run_tune(params: Params, methods: list[str] | None = None, storage: str | None = None, workers: int = 1,
             n_trials: int | None = None, *, prepared_dir: str | Path = "prepared", trainer: Any = None,
             progress: bool = True) -> dict[str, dict[str, Any]]:
    """Tune `methods` (default tune.methods) one after the other. Everything that can be
    checked (the space of every method, the storage, the teacher files) is checked before the
    first trial. `trainer` replaces training.students.train_students (tests). Returns each method's summary."""
    if workers < 1:
        raise ParamsError(f"--workers {workers}: at least one worker is needed")
    if n_trials is not None and n_trials < 1:
        raise ParamsError(f"--n-trials {n_trials}: at least one trial is needed")
    chosen = tuning.select_methods(params, methods)
    tuning.check_space(params, chosen)
    spec = tuning.resolve_storage(storage or params.tune.storage)
    tuning.check_workers(spec, workers)
    data = load_prepared(prepared_dir)
    teachers = {m.name: tuning.teacher_identity(params, m) for m in chosen}
    unused = tuning.unused_keys(params.tune, chosen)
    if unused:
        print(f"tune.space: {', '.join(unused)} not used by {', '.join(m.name for m in chosen)}; not searched",
              file=sys.stderr)
    summaries = {m.name: tune_method(params, m, spec, data, teachers[m.name], workers, n_trials, prepared_dir,
                                     trainer, progress)
                 for m in chosen}
    print(f"Commit {', '.join(str(tuned_values_path(m)) for m in summaries)}; train the ablation with "
          f"each method's own tuned values:\n  {APPLY_COMMAND}")
    return summaries
