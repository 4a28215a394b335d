"""The results table printed last and kept as results.txt: every teacher, and each method's
mean ± std over seeds, on CIFAR-10 and CIFAR-10-C-15 (%)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .layout import read_json_or_none


def _evaluations(project: Path) -> list[tuple[Path, dict[str, Any]]]:
    """metrics/eval/<model>.json of every model (not the Grad-CAM analyses), in name order."""
    from ...paths import EVAL_DIR

    return [(path, read_json_or_none(path) or {}) for path in sorted((project / EVAL_DIR).glob("*.json"))
            if not path.stem.startswith("gradcam-")]


def model_scores(project: Path, evaluations: list[tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """{model: {test_acc, cifar10c_mean15}} from metrics/summary.json, else `evaluations` (_evaluations)."""
    from ...paths import SUMMARY_METRICS
    from ...report import per_model_summary

    summary = per_model_summary(read_json_or_none(project / SUMMARY_METRICS) or {})
    for path, entry in evaluations:
        row = summary.setdefault(entry.get("model", path.stem), {})
        row.setdefault("test_acc", entry.get("test_acc"))
        row.setdefault("cifar10c_mean15", (entry.get("cifar10c") or {}).get("standard_mean"))
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


def results_table(project: Path, params: Any) -> str:
    """Teachers and each method (mean ± std over seeds): CIFAR-10 and CIFAR-10-C-15 accuracy (%)."""
    from ...paths import ablation_output

    evaluations = _evaluations(project)
    scores = model_scores(project, evaluations)
    rows = [("model", "seeds", "CIFAR-10 (%)", "CIFAR-10-C-15 (%)")]
    for name in params.teachers:
        row = scores.get(name, {})
        rows.append((f"{name} (teacher)", "-", _cell([row.get("test_acc")]), _cell([row.get("cifar10c_mean15")])))
    for method in params.ablation.methods:
        found = [scores[key] for key in (f"student-{ablation_output(method, s)}" for s in params.ablation.seeds)
                 if key in scores]
        rows.append((method, f"{len(found)}/{len(params.ablation.seeds)}",
                     _cell([r.get("test_acc") for r in found]), _cell([r.get("cifar10c_mean15") for r in found])))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines = ["  ".join(r[k].ljust(widths[k]) if k == 0 else r[k].rjust(widths[k]) for k in range(4)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = evaluations[:1]
    label = first[0][1].get("dataset") if first else None
    c_label = first[0][1].get("corruption_dataset") if first else None
    head = f"Results ({params.profile}; {label or 'CIFAR-10'}; {c_label or 'CIFAR-10-C'}), mean ± std over seeds:"
    return head + "\n" + "\n".join(lines) + "\n"
