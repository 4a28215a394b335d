"""What a run measured, kept in timings.json: the machine (Python, packages, GPUs, code; the
GPUs' compute mode and free memory for the pre-flight), each phase's wall time, every model's
seconds per epoch, the bench's two GPU targets, the paper profile's time extrapolated from them,
and the plan's clock: each phase's time predicted from the H100 rates, beside the measured one."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import REPO_ROOT, TIMINGS, command_output, read_json_or_none

# --------------------------------------------------------------------------------------
# The machine. The GPU is asked of nvidia-smi, not torch.cuda (mem_get_info would open a CUDA
# context): the runner process never opens one, since the stages, its subprocesses, need the GPU's
# memory, and in an exclusive compute mode the runner's own context would lock them out of it.

PACKAGES = ("torch", "numpy", "pydantic", "scipy", "pillow", "matplotlib", "safetensors")


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    import importlib.metadata  # here: slow to import, and only a run needs it

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def gpu_description() -> str:
    """Name, memory and driver of every GPU, `none`, or why nvidia-smi could not say."""
    query = command_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    if query is None:
        return "nvidia-smi not available"
    return "; ".join(line.strip() for line in query.splitlines() if line.strip()) or "none"


GPU_QUERY = ("nvidia-smi", "--query-gpu=index,name,compute_mode,memory.free,memory.total",
             "--format=csv,noheader,nounits")
EXCLUSIVE_MODES = ("Exclusive_Process", "Exclusive_Thread")


@dataclass(frozen=True)
class GpuState:
    """One GPU as nvidia-smi reports it (memory in MiB; None where it printed no number)."""

    index: str
    name: str
    compute_mode: str
    free_mib: int | None
    total_mib: int | None

    def line(self) -> str:
        memory = (f"{self.free_mib:,} MiB free of {self.total_mib:,} MiB"
                  if self.free_mib is not None and self.total_mib is not None else "free memory unknown")
        return f"GPU {self.index} ({self.name}): compute mode {self.compute_mode}, {memory}"


def _mib_or_none(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:      # "[N/A]", "[Not Supported]"
        return None


def parse_gpu_states(text: str) -> list[GpuState]:
    """The GPUs in nvidia-smi's answer to GPU_QUERY (csv, no header, no units)."""
    states = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue        # a warning line, or an empty one
        index, name, mode, free, total = fields
        states.append(GpuState(index, name, mode, _mib_or_none(free), _mib_or_none(total)))
    return states


def gpu_states() -> list[GpuState] | None:
    """Every GPU's compute mode and free memory; None when nvidia-smi cannot run."""
    answer = command_output(GPU_QUERY)
    return None if answer is None else parse_gpu_states(answer)


def git_commit() -> str | None:
    """The checkout's commit, marked when src/ or profiles/ differ from it; None without git."""
    if not (REPO_ROOT / ".git").exists():
        return None
    head = command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src", "profiles"])
    if head is None or dirty is None:
        return None
    return head.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def environment_record(params: Any, gpus: Sequence[GpuState] | None = None) -> dict[str, Any]:
    """Python, packages, GPU, CPUs, code (the commit and storage.source_digest, the digest the
    tracked runs carry as their `matekd.source_sha256` tag) and the params' digest."""
    from ...storage import source_digest

    return {"python": sys.version.split()[0], "packages": package_versions(),
            "gpu": "none" if params.device == "cpu" else gpu_description(), "cpu_count": os.cpu_count(),
            "git_commit": git_commit() or "unknown (no git checkout: a copied working tree)",
            "source_sha256": source_digest(), "params_sha256": params.digest(),
            "gpu_state": [vars(g) for g in gpus or ()]}


# --------------------------------------------------------------------------------------
# Measured: phases, epochs, bench, the paper profile

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
            from ...training.loop import PAD

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


# --------------------------------------------------------------------------------------
# The plan's clock: the seconds each phase should take on an H100, from the profile and the
# rates measured there (docs/anchors.md), so that the next window's epochs are set from a
# measurement of how far off the assumed rates were. Only the phases on the run's critical path
# are predicted: the smoke pass runs beside the run and corrupt on the CPU in the background.

# One H100, PyTorch 2.11, bf16 autocast, channels_last, batch 512, data on the GPU (docs/anchors.md).
H100_RATES: dict[str, tuple[float, float]] = {     # model: (training img/s, inference img/s)
    "resnet20": (42_960, 170_131), "resnet56": (20_268, 66_727), "resnet110": (11_534, 44_831),
    "vgg19_bn": (60_704, 182_434), "densenet121": (7_323, 27_437),
}
CACHED_STEP_RATE = 52_213       # img/s of one cached MATE-KD ResNet20 student step (the ablation's)
FUSED_SPEEDUP = 4.0             # students trained or evaluated together: the >= 4x bench target (assumed)
STAGE_START_S = 8.0             # python, torch and CUDA initialisation of a stage
FIXED_S = {"method-inputs": 5.0, "report": 15.0, "bench": 20.0}
GRADCAM_S = 8.0                 # evaluate's Grad-CAM analysis and its figures
CORRUPTION_SEVERITIES = 5


def _images(params: Any) -> tuple[int, int, int]:
    """(train, validation, test) image counts of the profile (CIFAR-10: 10 classes, 50k + 10k)."""
    d = params.data
    val = 10 * d.val_per_class
    train = 10 * d.train_per_class if d.train_per_class is not None else 50_000 - val
    test = 10 * d.test_per_class if d.test_per_class is not None else 10_000
    return train, val, test


def predicted_phases(params: Any) -> tuple[dict[str, float], list[str]]:
    """({phase: predicted seconds}, notes): teachers (sharing one GPU: their times add), caches,
    method-inputs, ablation, evaluate, report and bench. A model without a measured rate leaves
    its phases out, named in the notes."""
    from ...cifar10c import resolve_corruptions

    train, val, test = _images(params)
    notes: list[str] = []
    unknown = sorted({n for n in [*params.teachers, params.distill.student] if n not in H100_RATES})
    if unknown:
        notes.append(f"no H100 rate for {', '.join(unknown)}: phases using them are not predicted")
    out: dict[str, float] = {}
    students = len(params.ablation.methods) * len(params.ablation.seeds)
    teachers = [n for n in params.teachers if n in H100_RATES]
    if teachers and len(teachers) == len(params.teachers):
        out["teachers"] = STAGE_START_S + sum(
            r.epochs * train / H100_RATES[n][0] + (r.epochs * val + test) / H100_RATES[n][1]
            for n, r in ((n, params.teachers[n]) for n in teachers))
        # Grad-CAM maps of the train and validation images, and the logits of every view the
        # students draw (one stream per distinct data order).
        streams = 1 if params.distill.data_seed is not None else len(params.ablation.seeds)
        views = streams * params.distill.recipe.epochs * train if params.distill.teacher_signals == "cached" else 0
        out["caches"] = STAGE_START_S + sum((train + val + views) / H100_RATES[n][1] for n in teachers)
    out["method-inputs"] = FIXED_S["method-inputs"]
    student = params.distill.student
    if student in H100_RATES:
        together = FUSED_SPEEDUP if params.ablation.group_size > 1 else 1.0
        epochs = params.distill.recipe.epochs
        out["ablation"] = STAGE_START_S + (students * epochs * train / (CACHED_STEP_RATE * together)
                                           + students * (epochs * val + test) / (H100_RATES[student][1] * together))
        corruptions = len(resolve_corruptions(params.corrupt.corruptions))
        per_class = params.corrupt.images_per_class
        c_images = corruptions * CORRUPTION_SEVERITIES * (10 * per_class if per_class is not None else test)
        if not unknown:
            out["evaluate"] = STAGE_START_S + GRADCAM_S + sum(
                (c_images + test) / H100_RATES[n][1] for n in params.teachers) + students * (c_images + test) / (
                H100_RATES[student][1] * together)
    out["report"] = FIXED_S["report"]
    out["bench"] = FIXED_S["bench"]
    notes.append(f"H100 rates of docs/anchors.md at batch 512; students together {FUSED_SPEEDUP:g}x one "
                 f"(assumed, the bench target); {STAGE_START_S:g} s start-up per stage")
    return {k: round(v, 1) for k, v in out.items()}, notes


def plan_lines(predicted: dict[str, float]) -> list[str]:
    """The prediction printed before the run starts."""
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in predicted.items())
    return [f"plan (H100 rates, docs/anchors.md): {parts}; {sum(predicted.values()):.0f} s in all"]


def clock_lines(predicted: dict[str, float], phases: dict[str, dict[str, float]]) -> list[str]:
    """Measured seconds per phase beside the predicted ones, and their ratio."""
    lines = ["Predicted vs measured seconds per phase:"]
    for name, seconds in predicted.items():
        measured = phases.get(name, {}).get("seconds")
        if measured is None:
            shown = "not run"
        else:
            shown = f"{measured:8.1f} s" + (f"  ({measured / seconds:5.2f}x)" if seconds else "")
        lines.append(f"  {name:<16} {seconds:8.1f} s  {shown}")
    return lines


def clock_record(predicted: dict[str, float], notes: list[str],
                 phases: dict[str, dict[str, float]]) -> dict[str, Any]:
    """timings.json's `clock`: per phase the predicted and the measured seconds."""
    return {"phases": {name: {"predicted_s": seconds, "measured_s": phases.get(name, {}).get("seconds")}
                       for name, seconds in predicted.items()}, "notes": notes}
