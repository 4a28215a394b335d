"""What the run measured: wall time per phase, seconds per epoch of every model, the bench's
two GPU targets, and the paper profile's GPU time extrapolated from them (timings.json)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .layout import TIMINGS, read_json_or_none

MATE_KD_CACHED_TARGET = 1.3     # a cached MATE-KD student step costs at most this many CE steps
TOGETHER_TARGET = 4.0           # students trained together: at least this many times one at a time


def phase_times(timings: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Wall time of each phase: from its first stage's start to its last stage's end."""
    out: dict[str, dict[str, float]] = {}
    for entry in timings:
        phase = out.setdefault(entry["phase"], {"start_s": entry["start_s"], "end_s": entry["end_s"], "stages": 0})
        phase["start_s"] = min(phase["start_s"], entry["start_s"])
        phase["end_s"] = max(phase["end_s"], entry["end_s"])
        phase["stages"] += 1
    for phase in out.values():
        phase["seconds"] = round(phase["end_s"] - phase["start_s"], 2)
    return out


def epoch_costs(project: Path, params: Any) -> dict[str, Any]:
    """Seconds per epoch of training (evaluation excluded) as measured by every teacher and
    student of the run (from metrics/teachers and metrics/student)."""
    from ...paths import student_paths, teacher_paths
    from ...storage import read_safetensors_metadata

    out: dict[str, Any] = {"teachers": {}, "student_groups": {}}
    for name, recipe in params.teachers.items():
        metrics = read_json_or_none(teacher_paths(name, project)["metrics"])
        if metrics and metrics.get("epochs"):
            out["teachers"][name] = {
                "seconds": metrics["seconds"], "epochs": metrics["epochs"],
                "seconds_per_epoch": metrics["seconds"] / metrics["epochs"], "batch_size": recipe.batch_size,
                "images_per_second": metrics.get("images_per_second"), "train_images": metrics.get("train_images")}
    groups: dict[str, dict[str, Any]] = {}
    for path in sorted((project / "metrics" / "student").glob("*.json")):
        metrics = read_json_or_none(path)
        if not (metrics and metrics.get("epochs")):
            continue
        try:   # students trained together carry their group's digest (and share its time)
            weights = student_paths(path.stem, project)["weights"]
            key = read_safetensors_metadata(weights).get("group_digest") or path.stem
        except (OSError, ValueError):
            key = path.stem
        group = groups.setdefault(key, {"students": [], "seconds": metrics["seconds"], "epochs": metrics["epochs"],
                                        "seconds_per_epoch": metrics["seconds"] / metrics["epochs"],
                                        "batch_size": params.distill.recipe.batch_size})
        group["students"].append(path.stem)
    out["student_groups"] = {f"group{k}": g for k, g in enumerate(groups.values(), start=1)}
    return out


def _logit_pairs(project: Path, teacher: str) -> int | None:
    """(image, variant) pairs whose logits the cache computed (its mask), without loading logits."""
    from ...paths import cache_path

    path = cache_path(teacher, project)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            if "train_logits_mask" not in handle.keys():
                return None
            return int(handle.get_tensor("train_logits_mask").sum())
    except Exception:  # noqa: BLE001 - an unreadable cache only drops this estimate
        return None


def paper_extrapolation(project: Path, params: Any, paper: Any, phases: dict[str, dict[str, float]],
                        bench: dict | None, costs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The paper profile's GPU time from this run's measured per-epoch costs (`costs`, default
    read from `project` by epoch_costs): per model (seconds per epoch measured here) x (the
    paper's epochs). Same data sizes, so evaluate and report are taken as measured. Caveats are
    listed with the numbers."""
    from ...paths import cache_metrics_path

    if costs is None:
        costs = epoch_costs(project, params)
    out: dict[str, Any] = {"teachers": {}, "caches": {}, "notes": []}
    total = 0.0
    for name, recipe in paper.teachers.items():
        cost = costs["teachers"].get(name)
        if cost is None:
            out["notes"].append(f"teacher {name} was not trained in this run: not extrapolated")
            continue
        seconds = cost["seconds_per_epoch"] * recipe.epochs
        out["teachers"][name] = {"measured_seconds_per_epoch": round(cost["seconds_per_epoch"], 3),
                                 "measured_batch_size": cost["batch_size"], "paper_epochs": recipe.epochs,
                                 "paper_batch_size": recipe.batch_size, "seconds": round(seconds, 1)}
        total += seconds
    n_train = next((c.get("train_images") for c in costs["teachers"].values() if c.get("train_images")), None)
    for name in paper.teachers:
        metrics = read_json_or_none(cache_metrics_path(name, project))
        if not metrics:
            continue
        pairs = _logit_pairs(project, name)
        logit_seconds = metrics.get("logit_seconds", 0.0)
        seconds = metrics.get("map_seconds", 0.0)
        if paper.distill.teacher_signals == "cached" and logit_seconds and pairs and n_train:
            from ...augment import num_variants
            from ...train import PAD

            paper_pairs = n_train * num_variants(PAD) if paper.cache.logit_variants == "all" else pairs
            seconds += logit_seconds * paper_pairs / pairs
            out["caches"][name] = {"map_seconds": metrics.get("map_seconds"), "logit_seconds": logit_seconds,
                                   "logit_pairs": pairs, "paper_logit_pairs": paper_pairs, "seconds": round(seconds, 1)}
        else:
            out["caches"][name] = {"map_seconds": metrics.get("map_seconds"), "seconds": round(seconds, 1)}
        total += seconds
    groups = costs["student_groups"]
    paper_students = len(paper.ablation.methods) * len(paper.ablation.seeds)
    if groups:
        # Students as this run trained them: groups of its size, at its measured s/epoch per group.
        size = max(len(g["students"]) for g in groups.values())
        per_epoch = max(g["seconds_per_epoch"] for g in groups.values())
        n_groups = math.ceil(paper_students / size)
        fused = per_epoch * paper.distill.recipe.epochs * n_groups
        students: dict[str, Any] = {
            "measured_seconds_per_epoch_per_group": round(per_epoch, 3), "measured_group_size": size,
            "measured_batch_size": params.distill.recipe.batch_size, "paper_students": paper_students,
            "paper_epochs": paper.distill.recipe.epochs, "paper_batch_size": paper.distill.recipe.batch_size,
            "paper_group_size": paper.ablation.group_size, "fused_seconds": round(fused, 1), "seconds": round(fused, 1),
            "counted_as": f"groups of {size} as in this run"}
        # The paper profile's own grouping: one at a time is the bench's single cached MATE-KD step rate.
        alone = ((bench or {}).get("steps", {}).get("mate_kd_cached") or {}).get("images_per_second")
        if alone and n_train:
            students["one_at_a_time_seconds"] = round(paper_students * paper.distill.recipe.epochs * n_train / alone, 1)
            if paper.ablation.group_size == 1:
                students["seconds"] = students["one_at_a_time_seconds"]
                students["counted_as"] = (f"one at a time (the paper profile's ablation.group_size: 1), at the bench's "
                                          f"cached MATE-KD step rate ({alone:,.0f} images/s at batch "
                                          f"{(bench or {}).get('batch_size')}); CE and KD steps are a little cheaper")
        elif paper.ablation.group_size != size:
            out["notes"].append(f"students counted in groups of {size} as in this run (no bench for the paper "
                                f"profile's ablation.group_size: {paper.ablation.group_size})")
        out["students"] = students
        total += students["seconds"]
    for name in ("evaluate", "report"):
        if name in phases:
            out[name] = {"seconds": phases[name]["seconds"]}
            total += phases[name]["seconds"]
    out["total_seconds"] = round(total, 1)
    out["total_hours"] = round(total / 3600, 2)
    out["notes"] += [
        "teachers trained concurrently here share the GPU, so their per-epoch times overstate a teacher alone",
        "per-epoch times are at this run's batch sizes; the paper's batch 128 takes longer per epoch on a GPU",
        "corrupt runs on the CPU beside the GPU stages and is not counted",
    ]
    return out


def bench_summary(bench: dict | None) -> dict[str, Any] | None:
    """The two GPU targets: cached MATE-KD step <= 1.3x a CE step; K students together >= 4x the
    throughput of one at a time."""
    if not bench:
        return None
    steps = bench.get("steps", {})
    ratio = steps.get("mate_kd_cached", {}).get("ratio_to_ce")
    speedup = bench.get("together_speedup")
    return {"device": bench.get("device"), "batch_size": bench.get("batch_size"), "together": bench.get("together"),
            "mate_kd_cached_vs_ce": ratio, "mate_kd_cached_target": MATE_KD_CACHED_TARGET,
            "mate_kd_cached_ok": None if ratio is None else ratio <= MATE_KD_CACHED_TARGET,
            "together_speedup": speedup, "together_target": TOGETHER_TARGET,
            "together_ok": None if speedup is None else speedup >= TOGETHER_TARGET}


def measurements(project: Path, params: Any, paper: Any, phases: dict[str, dict[str, float]]) -> dict[str, Any]:
    """timings.json's measured part: seconds per epoch, the bench targets (metrics/bench.json)
    and, given a paper profile, its extrapolated time."""
    bench = read_json_or_none(project / "metrics" / "bench.json")
    out = {"epochs": epoch_costs(project, params), "bench": bench_summary(bench)}
    if paper is not None:
        out["paper_extrapolation"] = paper_extrapolation(project, params, paper, phases, bench, out["epochs"])
    return out


def summary_lines(timings: dict[str, Any]) -> list[str]:
    """timings.json for the terminal: wall time per phase, seconds per epoch, bench, paper time."""
    lines = ["Wall time per phase:"]
    for name, phase in timings.get("phases", {}).items():
        lines.append(f"  {name:<16} {phase['seconds']:8.1f} s  ({phase['stages']} stage(s), "
                     f"from {phase['start_s']:.1f} s)")
    lines.append(f"  {'pack':<16} {timings.get('pack_seconds', 0):8.1f} s")
    lines.append(f"  {'total':<16} {timings.get('total_seconds', 0):8.1f} s")
    clock = timings.get("clock") or {}
    if clock.get("phases"):
        from .clock import clock_lines

        lines += clock_lines({k: v["predicted_s"] for k, v in clock["phases"].items()}, timings.get("phases", {}))
    costs = timings.get("epochs") or {}
    if costs.get("teachers") or costs.get("student_groups"):
        lines.append("Measured seconds per epoch (training only):")
        for name, cost in costs.get("teachers", {}).items():
            lines.append(f"  {name:<16} {cost['seconds_per_epoch']:8.2f} s  (batch {cost['batch_size']}, "
                         f"{cost['epochs']} epochs)")
        for name, cost in costs.get("student_groups", {}).items():
            lines.append(f"  {name:<16} {cost['seconds_per_epoch']:8.2f} s  ({len(cost['students'])} students "
                         f"together, batch {cost['batch_size']})")
    bench = timings.get("bench")
    if bench:
        lines.append(f"Bench ({bench['device']}, batch {bench['batch_size']}): cached MATE-KD step "
                     f"{bench['mate_kd_cached_vs_ce']:.2f}x a CE step (target <= {MATE_KD_CACHED_TARGET:g}); "
                     f"{bench['together']} students together {bench['together_speedup']:.2f}x one at a time "
                     f"(target >= {TOGETHER_TARGET:g})")
    paper = timings.get("paper_extrapolation")
    if paper:
        parts = [f"teachers {sum(t['seconds'] for t in paper['teachers'].values()):,.0f} s",
                 f"caches {sum(c['seconds'] for c in paper['caches'].values()):,.0f} s"]
        if "students" in paper:
            parts.append(f"students {paper['students']['seconds']:,.0f} s ({paper['students']['counted_as']})")
        parts += [f"{name} {paper[name]['seconds']:,.0f} s" for name in ("evaluate", "report") if name in paper]
        lines.append(f"Paper profile from the measured per-epoch costs (x paper epochs): {' + '.join(parts)} = "
                     f"{paper['total_seconds']:,.0f} s ({paper['total_hours']:.2f} h of GPU time; notes in {TIMINGS})")
    return lines
