"""Stage report: reports/ (results.md, results.csv, figures/, plots/) from the metric files,
logged to the tracked run named `report`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import MatekdError
from ..params import Params, flatten
from ..paths import REPORT_DIR, parse_ablation_output
from ..report.document import build_report
from ..report.inputs import load_inputs
from ..storage import atomic_dir
from ..tracking import run_for_digest
from .context import tracked_run


def run_report(params: Params, root: str | Path = ".") -> dict[str, Any]:
    """Write reports/ (rebuilt in a temporary sibling and swapped in) and log it to MLflow."""
    root = Path(root)
    inputs = load_inputs(root)
    if inputs.empty():
        raise MatekdError("nothing to report: no metrics/teachers, metrics/student, metrics/eval or "
                          "metrics/summary.json; run `dvc repro` (at least train_teacher, distill and evaluate) first")
    out_dir = root / REPORT_DIR
    with atomic_dir(out_dir) as tmp:
        summary = build_report(inputs, params, tmp)
    data_hash = next((e.get("dataset_sha256") for e in inputs.evals.values() if e.get("dataset_sha256")), None)
    # Not stages.context.stage: the report needs no device (params may name cuda on a CPU-only machine).
    logged = {"profile": params.profile, **flatten({"ablation": params.ablation.model_dump(mode="json")})}
    with tracked_run(params, run_name="report", stage="report", log_params=logged,
                     tags={"profile": params.profile, "params_sha256": params.digest(),
                           "dataset_sha256": data_hash or "none"}) as run:
        run.log_dict(params.model_dump(mode="json"), "config/params.json")
        run.log_text("\n".join(summary["shortcuts"]) + "\n", "report/shortcuts.txt")
        run.log_artifact(out_dir / "results.md", "report")
        run.log_artifact(out_dir / "results.csv", "report")
        for path in sorted((out_dir / "figures").glob("*.png")):
            run.log_artifact(path, "report/figures")
        for path in sorted((out_dir / "plots").glob("*.csv")):
            run.log_artifact(path, "report/plots")
        run.log_metrics({k: v for k, v in summary["headline"].items() if not math.isnan(v)})
        mark_reported_models(run, inputs.evals)
    return summary


def report_alias(output: str) -> str:
    """The registered-model alias of the version a report used: `report-seed<k>` for a student
    of the ablation matrix (its registered model is its method's), `report-<output>` otherwise
    (`report-distill` for the configured run's student)."""
    parsed = parse_ablation_output(output)
    return f"report-seed{parsed[1]}" if parsed else f"report-{output}"


def mark_reported_models(run: Any, evals: dict[str, dict]) -> list[str]:
    """Point each reported student's alias (report_alias) at the registered version of the
    logged model its training run made, when this store holds that run; returns the aliases set.
    The weights' hash recorded by evaluate finds the run (tracking.run_for_digest)."""
    done = []
    for entry in evals.values():
        if entry.get("kind") != "student" or not entry.get("weights_sha256") or not entry.get("output"):
            continue
        made = run_for_digest(entry["weights_sha256"]) or {}
        if made.get("model_id") and made.get("mode") == run.mode:
            run.set_model_alias(made["model_id"], report_alias(entry["output"]))
            done.append(report_alias(entry["output"]))
    return done
