"""What a run hands back: the results table printed last (results.txt), the packs
(commands/pack.py) of what is packed and MANIFEST.txt (what is not, and why).

The table has every teacher and each method's mean ± std over seeds, on CIFAR-10 and
CIFAR-10-C-15 (%). A run cut short (the time limit) still gets every number that was finished:
the evaluation of each model (metrics/eval/, else what evaluate wrote as it went in
metrics/eval-partial/), and where a model was trained but not evaluated, the test accuracy
measured at the end of its training (marked *). Lines below the table say what was cut."""

from __future__ import annotations

import datetime as dt
import math
import statistics
from pathlib import Path
from typing import Any

from ..pack import MIB, Entry, LeftOut, manifest_text, pack_outputs
from .plan import MANIFEST, RECORD, RESULTS, TIMINGS, read_json_or_none

# --------------------------------------------------------------------------------------
# The results table

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
    from ...report.inputs import per_model_summary

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


# --------------------------------------------------------------------------------------
# The packs

MANIFEST_RESERVE = MIB                # bytes of the total kept for MANIFEST.txt (written after the packs)

# What to pack, by path in the project folder: (prefix, priority, required, kind, bundle depth).
# Priority 0 is packed first; a required file that cannot be packed is an error, an optional one
# is left out and listed in the manifest. A bundle depth d packs the files under each folder d
# levels down together or not at all (an offline run folder: sync-runs refuses a partial run).
PACK_RULES: tuple[tuple[str, int, bool, str, int], ...] = (
    (f"{RECORD}/", 0, True, "run record (logs, timings, params)", 0),
    ("reports/", 1, True, "reports", 0),
    ("metrics/", 1, True, "metrics", 0),
    ("methods/", 1, True, "method inputs", 0),
    ("prepared/manifest.json", 1, True, "data manifest", 0),
    ("cifar10c/manifest.json", 1, True, "CIFAR-10-C manifest", 0),
    ("plots/", 2, True, "per-epoch histories", 0),
    ("models/student/", 3, True, "student weights", 0),
    ("mlruns-offline/", 4, False, "offline tracking record (`matekd sync-runs mlruns-offline`)", 2),
    ("models/teachers/", 5, False, "teacher weights", 0),
)
# Never packed: inputs and intermediates that the commands named here rebuild.
EXCLUDE_RULES: tuple[tuple[str, str], ...] = (
    ("data/", "the CIFAR-10 archive itself (the run's input)"),
    ("prepared/", "decoded data arrays; `matekd prepare` rebuilds them from the archive"),
    ("cams/", "teacher caches (maps, logits); `matekd cache <teacher>` rebuilds them"),
    ("cifar10c/", "regenerated CIFAR-10-C (seeded, so `matekd corrupt` rebuilds it bit for bit)"),
    ("checkpoints/", "resume checkpoints of unfinished training"),
    ("params.yaml", f"the same file is packed as {RECORD}/params.yaml"),
)


def pack_entries(project: Path, record: Path) -> tuple[list[Entry], list[LeftOut]]:
    """What to pack from the project folder and the run record (PACK_RULES), and what is left
    out by rule (EXCLUDE_RULES) with the reason."""
    entries: list[Entry] = []
    excluded: list[LeftOut] = []
    files = [(p, p.relative_to(project).as_posix()) for p in sorted(project.rglob("*")) if p.is_file()]
    files += [(p, f"{RECORD}/{p.relative_to(record).as_posix()}") for p in sorted(record.rglob("*")) if p.is_file()]
    for path, rel in files:
        rule = next((r for r in PACK_RULES if rel.startswith(r[0])), None)
        if rule is not None:
            _, priority, required, kind, depth = rule
            parts = rel.split("/")
            bundle = "/".join(parts[:depth]) if depth and len(parts) > depth else ""
            entries.append(Entry(rel, path, priority, required, kind, bundle))
            continue
        reason = next((why for prefix, why in EXCLUDE_RULES if rel.startswith(prefix)),
                      "not an output this command hands back")
        excluded.append(LeftOut(rel, path.stat().st_size, reason))
    return entries, excluded


def manifest_header(params: Any, environment: dict[str, Any], profile: Path, status: str,
                    error: str | None) -> list[str]:
    return [
        f"# matekd gpu-run: {params.profile} ({profile})",
        f"status: {status}" + (f" - {error.splitlines()[0]}" if error else ""),
        f"written: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"gpu: {environment['gpu']}; python {environment['python']}; torch {environment['packages']['torch']}",
        f"code: {environment['git_commit']}; source sha256 {environment['source_sha256'][:16]}",
        f"params sha256: {environment['params_sha256']}",
        "unpack: mkdir run && for p in pack-*.tar.gz; do tar -xzf \"$p\" -C run; done",
        "tracking: `matekd sync-runs run/mlruns-offline` imports the offline runs into MLflow",
        f"timings: {TIMINGS} (per stage, per epoch, paper extrapolation); results: {RESULTS}",
    ]


def write_outputs(output: Path, project: Path, record: Path, header: list[str], *, max_files: int, file_limit: int,
                  total_limit: int) -> None:
    """Pack into `output` beside timings.json and results.txt (already there; they count against
    the limits), then write MANIFEST.txt, for which a file and MANIFEST_RESERVE bytes are kept."""
    from ...storage import write_text

    loose = [output / TIMINGS, output / RESULTS]
    entries, excluded = pack_entries(project, record)
    result = pack_outputs(entries, output, loose=loose, reserve_files=1, max_files=max_files,
                          file_limit=file_limit, total_limit=total_limit - MANIFEST_RESERVE)
    write_text(output / MANIFEST, manifest_text(result, header, excluded, loose + [output / MANIFEST]))
