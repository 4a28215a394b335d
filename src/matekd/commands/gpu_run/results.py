"""The results table printed last and kept as results.txt: every teacher, and each method's
mean ± std over seeds, on CIFAR-10 and CIFAR-10-C-15 (%).

A run cut short (the time limit) still gets a table of every number that was finished: the
evaluation of each model (metrics/eval/, else what evaluate wrote as it went in
metrics/eval-partial/), and where a model was trained but not evaluated, the test accuracy
measured at the end of its training (marked *). Lines below the table say what was cut."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .layout import read_json_or_none

TRAINING_MARK = "*"      # a CIFAR-10 cell holding training-time test accuracy


def _evaluations(project: Path) -> list[tuple[Path, dict[str, Any]]]:
    """metrics/eval/<model>.json of every model (not the Grad-CAM analyses), in name order, and
    for models not there the per-model results evaluate wrote before it was stopped."""
    from ...paths import EVAL_DIR, EVAL_PARTIAL_DIR

    found: dict[str, Path] = {}
    for folder in (EVAL_DIR, EVAL_PARTIAL_DIR):
        for path in sorted((project / folder).glob("*.json")):
            if not path.stem.startswith("gradcam-"):
                found.setdefault(path.stem, path)
    return [(path, read_json_or_none(path) or {}) for _, path in sorted(found.items())]


def model_scores(project: Path, evaluations: list[tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """{model: {test_acc, cifar10c_mean15}} from metrics/summary.json, else `evaluations`
    (_evaluations); a model with neither gets its training-time test accuracy, with
    `source: "training"`."""
    from ...paths import SUMMARY_METRICS
    from ...report import per_model_summary

    summary = per_model_summary(read_json_or_none(project / SUMMARY_METRICS) or {})
    for path, entry in evaluations:
        row = summary.setdefault(entry.get("model", path.stem), {})
        row.setdefault("test_acc", entry.get("test_acc"))
        row.setdefault("cifar10c_mean15", (entry.get("cifar10c") or {}).get("standard_mean"))
    trained = [(path.stem, path) for path in sorted((project / "metrics" / "teachers").glob("*.json"))]
    trained += [(f"student-{path.stem}", path) for path in sorted((project / "metrics" / "student").glob("*.json"))]
    for name, metrics in trained:
        if name in summary:
            continue
        test_acc = (read_json_or_none(metrics) or {}).get("test_acc")
        if isinstance(test_acc, (int, float)):
            summary[name] = {"test_acc": test_acc, "source": "training"}
    return summary


def _cell(values: list[Any]) -> str:
    """Percent: the one value, or mean ± sample std of the numbers among `values`; '-' if none."""
    numbers = [100 * v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return "-"
    mean = statistics.fmean(numbers)
    if len(values) == 1:
        return f"{mean:.2f}"
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def _test_cell(rows: list[dict[str, Any]]) -> str:
    cell = _cell([r.get("test_acc") for r in rows])
    return cell + TRAINING_MARK if cell != "-" and any(r.get("source") == "training" for r in rows) else cell


def cut_lines(model_names: list[str], scores: dict[str, dict[str, Any]]) -> list[str]:
    """What the table lacks, and why: models trained but not evaluated, models not trained."""
    unevaluated = [n for n in model_names if scores.get(n, {}).get("source") == "training"]
    missing = [n for n in model_names if n not in scores]
    lines = []
    if unevaluated:
        lines.append(f"Cut: not evaluated ({len(unevaluated)} of {len(model_names)} models; no CIFAR-10-C, "
                     f"CIFAR-10 {TRAINING_MARK} = test accuracy at the end of training): {', '.join(unevaluated)}")
    if missing:
        lines.append(f"Cut: not trained ({len(missing)} of {len(model_names)} models; no number): "
                     f"{', '.join(missing)}")
    return lines


def results_table(project: Path, params: Any, stopped: str | None = None) -> str:
    """Teachers and each method (mean ± std over seeds): CIFAR-10 and CIFAR-10-C-15 accuracy (%),
    then what was cut (cut_lines), after `stopped` (why the run ended early) when given."""
    from ...paths import ablation_output

    evaluations = _evaluations(project)
    scores = model_scores(project, evaluations)
    rows = [("model", "seeds", "CIFAR-10 (%)", "CIFAR-10-C-15 (%)")]
    for name in params.teachers:
        row = scores.get(name, {})
        rows.append((f"{name} (teacher)", "-", _test_cell([row]), _cell([row.get("cifar10c_mean15")])))
    students = []
    for method in params.ablation.methods:
        keys = [f"student-{ablation_output(method, s)}" for s in params.ablation.seeds]
        students += keys
        found = [scores[key] for key in keys if key in scores]
        rows.append((method, f"{len(found)}/{len(params.ablation.seeds)}",
                     _test_cell(found), _cell([r.get("cifar10c_mean15") for r in found])))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines = ["  ".join(r[k].ljust(widths[k]) if k == 0 else r[k].rjust(widths[k]) for k in range(4)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = evaluations[:1]
    label = first[0][1].get("dataset") if first else None
    c_label = first[0][1].get("corruption_dataset") if first else None
    head = f"Results ({params.profile}; {label or 'CIFAR-10'}; {c_label or 'CIFAR-10-C'}), mean ± std over seeds:"
    cut = cut_lines([*params.teachers, *students], scores)
    if stopped:
        cut.insert(0, f"Cut: the run stopped early ({stopped.splitlines()[0]})")
    return "\n".join([head, *lines, *cut]) + "\n"
