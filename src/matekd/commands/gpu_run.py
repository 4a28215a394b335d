"""`matekd gpu-run`: a whole profile on a bare GPU machine in one command, outputs packed small.

    scripts/gpu-run.sh [PROFILE] [OUTPUT_DIR] [options]      (PROFILE default profiles/budget.yaml)

What it does, in order (every stage is the pipeline's own `matekd <stage>` command, run in a
subprocess in a scratch project folder; no DVC, no MLflow: tracking is offline):

1. Pre-flight: the params validate, the CIFAR-10 archive ($MATEKD_CIFAR10) and the frost
   textures ($MATEKD_FROST, when CIFAR-10-C is regenerated with frost) exist, the output
   folder is empty. Fails at once, naming what is missing.
2. Smoke pass: every stage on a few images and one epoch (the same profile with
   `smoke_overrides`), in `<work>/smoke`. A failure stops the run there, before the long part,
   with the failing stage and the end of its log. Meanwhile the full data is decoded (prepare)
   and CIFAR-10-C regenerated in the background by CPU worker processes (corrupt.workers).
3. The run, in `<work>/main`: the teachers (all at once, sharing the GPU, or one per GPU),
   their caches (all at once), method-inputs for every method, `matekd ablation` (every student
   group, spread over the visible GPUs), evaluate (after the background corrupt), report, and
   `matekd bench`. Each stage's wall time is printed as it ends and kept in timings.json, with
   the measured seconds per epoch of every model and the paper profile's time extrapolated
   from them.
4. Packing (matekd.commands.pack): reports, metrics, per-epoch histories, logs, timings,
   student weights, the offline tracking record and the teacher weights that fit, in at most
   8 files of 16 MiB (64 MiB in all) in OUTPUT_DIR, with MANIFEST.txt (every file, its pack, and
   what was left out and why). The results table is printed last.

`--time-limit S` stops a stage still running S seconds after the start (minus the time packing
needs), packs what exists and exits with an error: a run cut short still hands back its logs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MatekdError
from .pack import (
    FILE_LIMIT,
    MAX_FILES,
    MIB,
    PACK_PREFIX,
    SAFE_NAME,
    TOTAL_LIMIT,
    Entry,
    LeftOut,
    PackError,
    check_output_layout,
    manifest_text,
    pack_outputs,
)

PACKAGE_DIR = Path(__file__).resolve().parents[1]       # src/matekd
SOURCE_ROOT = PACKAGE_DIR.parent                         # src/ (put on the stages' PYTHONPATH)
REPO_ROOT = SOURCE_ROOT.parent
DEFAULT_PROFILE = "profiles/budget.yaml"
DEFAULT_PAPER_PROFILE = "profiles/paper.yaml"
DEFAULT_WORK = ".gpu-run/work"
DEFAULT_OUTPUT = ".gpu-run/out"
WORK_MARKER = ".matekd-gpu-run"       # a work folder with this file is the runner's own to clear
RECORD = "gpu-run"                    # the run's own files inside the packs: logs, timings, params
TIMINGS, RESULTS, MANIFEST = "timings.json", "results.txt", "MANIFEST.txt"
LOOSE_FILES = (TIMINGS, RESULTS, MANIFEST)               # beside the packs in OUTPUT_DIR
PACK_RESERVE_S = 30.0                 # time kept for packing when --time-limit is set
MANIFEST_RESERVE = MIB                # bytes of the total kept for MANIFEST.txt (written after the packs)
KILL_GRACE_S = 10.0
LOG_TAIL_LINES = 40

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


# --------------------------------------------------------------------------------------
# Params


def smoke_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """The smoke pass: the profile with a few images per class, one epoch everywhere, one
    CIFAR-10-C image per class and corruption, and few Grad-CAM images. Everything else (the
    models, batch sizes, methods, seeds, group size, cache settings, workers) stays, so the
    smoke pass runs the same code paths as the run."""
    out: dict[str, Any] = {
        "profile": f"{raw.get('profile', 'profile')}-smoke",
        "data.train_per_class": 8, "data.val_per_class": 2, "data.test_per_class": 4,
        "distill.recipe.epochs": 1,
        "corrupt.images_per_class": 1,
        "evaluate.gradcam_images": 8, "evaluate.grid_images": 2,
    }
    for name in raw.get("teachers") or {}:
        out[f"teachers.{name}.epochs"] = 1
    workers = int((raw.get("corrupt") or {}).get("workers") or 1)
    out["corrupt.workers"] = min(workers, 2)
    return out


def resolved_params(profile: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the profile's YAML with `overrides` applied, its validated Params)."""
    from ..params import load_params, set_dotted

    params = load_params(profile, overrides)      # validates; names the bad key
    raw = yaml.safe_load(profile.read_text()) or {}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return raw, params


def write_params(folder: Path, raw: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Write `raw` + `overrides` as folder/params.yaml; returns the validated Params."""
    from ..params import set_dotted, validate_params
    from ..storage import write_text

    tree = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    params = validate_params(tree)
    write_text(folder / "params.yaml", yaml.safe_dump(tree, sort_keys=False))
    return params


# --------------------------------------------------------------------------------------
# Stages in subprocesses


class StageFailed(MatekdError):
    """A stage exited with an error (the message names it and quotes its log)."""


class TimeLimitReached(MatekdError):
    """--time-limit ran out while stages were running (they were stopped)."""


@dataclass
class Job:
    name: str
    phase: str
    proc: subprocess.Popen
    log: Path
    started: float
    on_done: Callable[[Job], None] | None = None
    ended: float | None = None
    status: str = "running"


@dataclass
class StageRunner:
    """Starts `matekd <stage> ... --params params.yaml --no-progress` subprocesses in a project
    folder, waits for them, records and prints their times.

    Any job that fails, also a background one, stops every running job and raises StageFailed
    (fail fast). Each job runs in its own process group, so stopping it stops its workers."""

    record: Path
    env: dict[str, str]
    python: str = sys.executable
    deadline: float | None = None                      # monotonic time at which stages are stopped
    clock0: float = field(default_factory=time.monotonic)
    running: list[Job] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    on_record: Callable[[], None] | None = None         # called after every finished job

    def elapsed(self) -> float:
        return time.monotonic() - self.clock0

    def say(self, text: str) -> None:
        """Print a progress line and keep it in the record (runner.log, packed with the logs)."""
        print(text, flush=True)
        with open(self.record / "runner.log", "a") as handle:
            handle.write(text + "\n")

    def start(self, phase: str, name: str, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
              on_done: Callable[[Job], None] | None = None) -> Job:
        logs = self.record / "logs" / phase
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{_slug(name)}.log"
        command = [self.python, "-m", "matekd.cli", *args, "--params", "params.yaml", "--no-progress"]
        with open(log, "w") as handle:
            handle.write(f"$ (cd {cwd} && {' '.join(command)})\n")
            handle.flush()
            proc = subprocess.Popen(command, cwd=cwd, env=env or self.env, stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        job = Job(name, phase, proc, log, self.elapsed(), on_done)
        self.running.append(job)
        return job

    def wait(self, *jobs: Job) -> None:
        """Until `jobs` have ended (others keep running). Raises StageFailed when any job fails
        and TimeLimitReached past the deadline; both stop every running job first."""
        while any(j.status == "running" for j in jobs):
            self.poll()
            if any(j.status == "running" for j in jobs):
                if self.deadline is not None and time.monotonic() > self.deadline:
                    names = ", ".join(f"{j.phase}: {j.name}" for j in self.running)
                    self.stop_all("stopped: time limit")
                    raise TimeLimitReached(f"the time limit ran out while running {names}")
                time.sleep(0.2)

    def poll(self) -> None:
        for job in list(self.running):
            code = job.proc.poll()
            if code is None:
                continue
            self.running.remove(job)
            self._finish(job, "ok" if code == 0 else f"failed (exit {code})")
            if code != 0:
                self.stop_all("stopped: another stage failed")
                raise StageFailed(f"{job.phase} stage `{job.name}` failed (exit {code}); log {job.log}:\n"
                                  f"{log_tail(job.log)}")
            if job.on_done is not None:
                job.on_done(job)

    def run_all(self, phase: str, commands: Sequence[tuple[str, Sequence[str]]], cwd: Path,
                envs: Sequence[dict[str, str] | None] | None = None) -> None:
        """Start every (name, args) at once, wait for all."""
        envs = envs or [None] * len(commands)
        jobs = [self.start(phase, name, args, cwd, env) for (name, args), env in zip(commands, envs, strict=True)]
        self.wait(*jobs)

    def stop_all(self, status: str) -> None:
        """SIGTERM every running job's process group, SIGKILL what is left after a grace period."""
        for job in self.running:
            _signal_group(job.proc, signal.SIGTERM)
        limit = time.monotonic() + KILL_GRACE_S
        for job in self.running:
            try:
                job.proc.wait(timeout=max(limit - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(job.proc, signal.SIGKILL)
                job.proc.wait()
        for job in list(self.running):
            self._finish(job, status)
        self.running.clear()

    def _finish(self, job: Job, status: str) -> None:
        job.ended, job.status = self.elapsed(), status
        seconds = job.ended - job.started
        self.timings.append({"phase": job.phase, "stage": job.name, "status": status,
                             "start_s": round(job.started, 2), "end_s": round(job.ended, 2),
                             "seconds": round(seconds, 2), "log": str(job.log.relative_to(self.record.parent))})
        self.say(f"[{job.ended:7.1f} s] {status.split(' ')[0]:<7} {job.phase:<14} {job.name:<28} {seconds:7.1f} s")
        if self.on_record is not None:
            self.on_record()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)      # the job's own group (start_new_session): it and its workers
    except (ProcessLookupError, PermissionError):
        pass


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


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


# --------------------------------------------------------------------------------------
# The pipeline


def stage_env(base: dict[str, str], project: Path) -> dict[str, str]:
    """The stages' environment: matekd importable from anywhere, offline tracking into the
    project's mlruns-offline/, no DVC variables (stages must not find another repository)."""
    env = {k: v for k, v in base.items() if not k.startswith("DVC_")}
    paths = [str(SOURCE_ROOT)] + [str(Path(p).resolve()) for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["MATEKD_TRACKING"] = "offline"
    env["MATEKD_OFFLINE_DIR"] = str(project / "mlruns-offline")
    for key in ("MATEKD_CIFAR10", "MATEKD_FROST"):
        if base.get(key):
            env[key] = str(Path(base[key]).expanduser().resolve())
    return env


def gpu_slots(device: str, env: dict[str, str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES values to spread concurrent stages over (one per GPU), or [None]
    (no pinning: one GPU, or the CPU)."""
    if device == "cpu":
        return [None]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return [None]
        ids = [str(k) for k, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]
    return ids if len(ids) > 1 else [None]


def _pinned(env: dict[str, str], slots: list[str | None], k: int) -> dict[str, str] | None:
    slot = slots[k % len(slots)]
    return None if slot is None else {**env, "CUDA_VISIBLE_DEVICES": slot}


def run_pipeline(runner: StageRunner, project: Path, params: Any, env: dict[str, str], bench_args: Sequence[str],
                 corrupt: Job, phase: Callable[[str], str] = lambda name: name) -> None:
    """The stages after prepare, in order; evaluate waits for `corrupt` (started in the
    background when prepare ended). `phase` names each phase (the smoke pass: all `smoke`)."""
    slots = gpu_slots(params.device, env)
    teachers = list(params.teachers)
    envs = [_pinned(env, slots, k) or env for k in range(len(teachers))]
    runner.run_all(phase("teachers"), [(f"train-teacher {t}", ["train-teacher", t]) for t in teachers], project,
                   envs)
    runner.run_all(phase("caches"), [(f"cache {t}", ["cache", t]) for t in teachers], project, envs)
    methods = params.ablation.methods
    runner.run_all(phase("method-inputs"), [(f"method-inputs {m}", ["method-inputs", m]) for m in methods], project,
                   [env] * len(methods))
    runner.run_all(phase("ablation"), [("ablation", ["ablation"])], project, [env])
    runner.wait(corrupt)
    for name, args in (("evaluate", ["evaluate"]), ("report", ["report"]), ("bench", ["bench", *bench_args])):
        runner.run_all(phase(name), [(name, args)], project, [env])


def smoke_run(runner: StageRunner, smoke_dir: Path, params: Any, env: dict[str, str]) -> None:
    """Every stage of the run on the smoke params, in the smoke folder (phase `smoke`)."""
    runner.run_all("smoke", [("prepare", ["prepare"])], smoke_dir, [env])
    corrupt = runner.start("smoke", "corrupt", ["corrupt"], smoke_dir, env)
    run_pipeline(runner, smoke_dir, params, env, SMOKE_BENCH.args(), corrupt, phase=lambda name: "smoke")


@dataclass
class BenchOptions:
    batch_size: int = 512
    repeats: int = 20
    warmup: int = 5
    together: int | None = None      # default: max(ablation.group_size, 4)

    def args(self) -> list[str]:
        out = ["--batch-size", str(self.batch_size), "--repeats", str(self.repeats), "--warmup", str(self.warmup)]
        return out + (["--together", str(self.together)] if self.together else [])


SMOKE_BENCH = BenchOptions(batch_size=16, repeats=1, warmup=1, together=2)


# --------------------------------------------------------------------------------------
# Measurements: per-epoch costs, the paper profile extrapolated, bench targets, results table


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def epoch_costs(project: Path, params: Any) -> dict[str, Any]:
    """Seconds per epoch of training (evaluation excluded) as measured by every teacher and
    student of the run (from metrics/teachers and metrics/student)."""
    out: dict[str, Any] = {"teachers": {}, "student_groups": {}}
    for name, recipe in params.teachers.items():
        metrics = _read_json(project / "metrics" / "teachers" / f"{name}.json")
        if metrics and metrics.get("epochs"):
            out["teachers"][name] = {
                "seconds": metrics["seconds"], "epochs": metrics["epochs"],
                "seconds_per_epoch": metrics["seconds"] / metrics["epochs"], "batch_size": recipe.batch_size,
                "images_per_second": metrics.get("images_per_second"), "train_images": metrics.get("train_images")}
    from ..paths import student_paths
    from ..report import safetensors_metadata

    groups: dict[str, dict[str, Any]] = {}
    for path in sorted((project / "metrics" / "student").glob("*.json")):
        metrics = _read_json(path)
        if not (metrics and metrics.get("epochs")):
            continue
        try:   # students trained together carry their group's digest (and share its time)
            key = safetensors_metadata(student_paths(path.stem, project)["weights"]).get("group_digest") or path.stem
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
    path = project / "cams" / f"{teacher}.safetensors"
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
                        bench: dict | None) -> dict[str, Any]:
    """The paper profile's GPU time from this run's measured per-epoch costs: per model
    (seconds per epoch measured here) x (the paper's epochs). Same data sizes, so evaluate and
    report are taken as measured. Caveats are listed with the numbers."""
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
        metrics = _read_json(project / "metrics" / "cache" / f"{name}.json")
        if not metrics:
            continue
        pairs = _logit_pairs(project, name)
        logit_seconds = metrics.get("logit_seconds", 0.0)
        seconds = metrics.get("map_seconds", 0.0)
        if paper.distill.teacher_signals == "cached" and logit_seconds and pairs and n_train:
            from ..augment import num_variants
            from ..train import PAD

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
            "mate_kd_cached_vs_ce": ratio, "mate_kd_cached_target": 1.3,
            "mate_kd_cached_ok": None if ratio is None else ratio <= 1.3,
            "together_speedup": speedup, "together_target": 4.0,
            "together_ok": None if speedup is None else speedup >= 4.0}


def model_scores(project: Path) -> dict[str, dict[str, float]]:
    """{model: {test_acc, cifar10c_mean15}} from metrics/summary.json, else metrics/eval/."""
    from ..report import per_model_summary

    summary = per_model_summary(_read_json(project / "metrics" / "summary.json") or {})
    for path in sorted((project / "metrics" / "eval").glob("*.json")):
        if path.stem.startswith("gradcam-"):
            continue
        entry = _read_json(path) or {}
        row = summary.setdefault(entry.get("model", path.stem), {})
        row.setdefault("test_acc", entry.get("test_acc"))
        row.setdefault("cifar10c_mean15", (entry.get("cifar10c") or {}).get("standard_mean"))
    return summary


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def results_table(project: Path, params: Any) -> str:
    """Teachers and each method (mean ± std over seeds): CIFAR-10 and CIFAR-10-C-15 accuracy (%)."""
    from ..paths import ablation_output

    scores = model_scores(project)

    def cell(values: list[float | None]) -> str:
        stats = _mean_std([100 * v for v in values if isinstance(v, (int, float)) and math.isfinite(v)])
        if stats is None:
            return "-"
        return f"{stats[0]:.2f}" if len(values) == 1 else f"{stats[0]:.2f} ± {stats[1]:.2f}"

    rows = [("model", "seeds", "CIFAR-10 (%)", "CIFAR-10-C-15 (%)")]
    for name in params.teachers:
        row = scores.get(name, {})
        rows.append((f"{name} (teacher)", "-", cell([row.get("test_acc")]), cell([row.get("cifar10c_mean15")])))
    for method in params.ablation.methods:
        found = [scores[f"student-{ablation_output(method, s)}"] for s in params.ablation.seeds
                 if f"student-{ablation_output(method, s)}" in scores]
        rows.append((method, f"{len(found)}/{len(params.ablation.seeds)}",
                     cell([r.get("test_acc") for r in found]) if found else "-",
                     cell([r.get("cifar10c_mean15") for r in found]) if found else "-"))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines = ["  ".join(r[k].ljust(widths[k]) if k == 0 else r[k].rjust(widths[k]) for k in range(4)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    evals = [_read_json(p) or {} for p in sorted((project / "metrics" / "eval").glob("*.json"))
             if not p.stem.startswith("gradcam-")][:1]
    label = evals[0].get("dataset") if evals else None
    c_label = evals[0].get("corruption_dataset") if evals else None
    head = f"Results ({params.profile}; {label or 'CIFAR-10'}; {c_label or 'CIFAR-10-C'}), mean ± std over seeds:"
    return head + "\n" + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Provenance


def environment_record(params: Any) -> dict[str, Any]:
    """Python, packages, GPU (nvidia-smi, so this process never opens a CUDA context), code."""
    versions = {}
    for name in ("torch", "numpy", "pydantic", "scipy", "pillow", "matplotlib", "safetensors"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    gpu = "none"
    if params.device != "cpu":
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False)
            gpu = "; ".join(line.strip() for line in query.stdout.splitlines() if line.strip()) or "none"
        except (OSError, subprocess.TimeoutExpired):
            gpu = "nvidia-smi not available"
    commit = None
    if (REPO_ROOT / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=30, check=False)
            dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src", "profiles"],
                                   capture_output=True, text=True, timeout=30, check=False)
            commit = head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
        except (OSError, subprocess.TimeoutExpired):
            commit = None
    return {"python": sys.version.split()[0], "packages": versions, "gpu": gpu,
            "cpu_count": os.cpu_count(), "git_commit": commit or "unknown (no git checkout: a copied working tree)",
            "source_sha256": source_sha256(), "params_sha256": params.digest()}


def source_sha256() -> str:
    """sha256 over matekd's source files (paths and contents), to name the code that ran."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Pre-flight


def _clear_output(output: Path) -> None:
    """The output folder must be new, empty, or hold only what this command writes there."""
    if output.exists() and not output.is_dir():
        raise MatekdError(f"output {output} is a file; give a folder")
    if not output.exists():
        output.mkdir(parents=True)
        return
    ours = [p for p in output.iterdir() if p.name in LOOSE_FILES or
            (p.name.startswith(PACK_PREFIX) and p.name.endswith(".tar.gz")) or p.name.startswith(f".{PACK_PREFIX}")]
    others = sorted(p.name for p in output.iterdir() if p not in ours)
    if others:
        raise MatekdError(f"output folder {output} holds other files ({', '.join(others[:5])}); give an empty or "
                          "new folder (only the packs, MANIFEST.txt, timings.json and results.txt go there)")
    for path in ours:
        path.unlink()


def _clear_work(work: Path) -> None:
    """The work folder is the runner's scratch space: new, empty, or one it made before."""
    if work.exists():
        if (work / WORK_MARKER).is_file():
            shutil.rmtree(work)
        elif any(work.iterdir()):
            raise MatekdError(f"work folder {work} is not empty and was not made by `matekd gpu-run`; give a new "
                              "folder with --work-dir (everything in it is deleted at the next run)")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("scratch folder of `matekd gpu-run`; deleted at its next run\n")


def preflight(params: Any, env: dict[str, str], output: Path, work: Path) -> None:
    """Fail before any stage runs: data archive, frost textures, output name and folders."""
    from ..cifar10c import resolve_corruptions
    from ..corruptions import FrostUnavailable, frost_texture_files

    archive = env.get("MATEKD_CIFAR10", "")
    if not archive:
        raise MatekdError("MATEKD_CIFAR10 is not set: point it at the CIFAR-10 archive (cifar-10-python.tar.gz, or "
                          "the JPEG mirror cifar10-jpeg.tar.gz), e.g. copied into the ignored folder .gpu-data/ "
                          "that the device call carries: MATEKD_CIFAR10=.gpu-data/cifar10-jpeg.tar.gz")
    if not Path(archive).exists():
        raise MatekdError(f"MATEKD_CIFAR10={archive}: no such file or folder (copy the archive into .gpu-data/ and "
                          "name that folder in the device call's carry)")
    cp = params.corrupt
    if not cp.source and "frost" in resolve_corruptions(cp.corruptions):
        try:
            frost_texture_files(cp.frost_dir or env.get("MATEKD_FROST", ""))
        except FrostUnavailable as exc:
            raise MatekdError(f"CIFAR-10-C with frost needs its textures: {exc}. Set MATEKD_FROST (e.g. "
                              "MATEKD_FROST=.gpu-data/frost), or leave frost out with -S corrupt.corruptions=[...]"
                              ) from None
    for part in (output.name,):
        if not SAFE_NAME.match(part):
            raise MatekdError(f"output folder name {part!r}: use letters, digits, '.', '_' and '-' only (the names "
                              "a GPU machine hands back)")
    out, wk = output.resolve(), work.resolve()
    if out == wk or wk in out.parents or out in wk.parents:
        raise MatekdError(f"the output folder {output} and the work folder {work} must not contain each other")


# --------------------------------------------------------------------------------------
# Packing


def pack_entries(project: Path, record: Path) -> tuple[list[Entry], list[LeftOut]]:
    """What to pack from the project folder and the run record (PACK_RULES), and what is left
    out by rule (EXCLUDE_RULES) with the reason."""
    entries: list[Entry] = []
    excluded: list[LeftOut] = []
    files = [(p, p.relative_to(project).as_posix()) for p in sorted(project.rglob("*")) if p.is_file()]
    files += [(p, f"{RECORD}/{p.relative_to(record).as_posix()}") for p in sorted(record.rglob("*")) if p.is_file()]
    for path, rel in files:
        rule = next((r for r in PACK_RULES if rel == r[0] or rel.startswith(r[0])), None)
        if rule is not None:
            prefix, priority, required, kind, depth = rule
            parts = rel.split("/")
            bundle = "/".join(parts[:depth]) if depth and len(parts) > depth else ""
            entries.append(Entry(rel, path, priority, required, kind, bundle))
            continue
        reason = next((why for prefix, why in EXCLUDE_RULES if rel == prefix or rel.startswith(prefix)),
                      "not an output this command hands back")
        excluded.append(LeftOut(rel, path.stat().st_size, reason))
    return entries, excluded


def write_outputs(output: Path, project: Path, record: Path, header: list[str], limits: dict[str, int]) -> list[Path]:
    """Pack into `output` beside timings.json and results.txt; write MANIFEST.txt; check the
    layout. Returns the files in `output`."""
    from ..storage import write_text

    loose = [output / TIMINGS, output / RESULTS]
    entries, excluded = pack_entries(project, record)
    result = pack_outputs(entries, output, loose=loose, reserve_files=1, max_files=limits["max_files"],
                          file_limit=limits["file_limit"], total_limit=limits["total_limit"] - MANIFEST_RESERVE)
    write_text(output / MANIFEST, manifest_text(result, header, excluded, loose + [output / MANIFEST]))
    return check_output_layout(output, max_files=limits["max_files"], file_limit=limits["file_limit"],
                               total_limit=limits["total_limit"])


# --------------------------------------------------------------------------------------
# The command


@dataclass
class RunOutcome:
    status: str                     # ok | smoke failed | failed | time limit
    error: str | None
    files: list[Path]
    timings: dict[str, Any]
    table: str


def run_gpu(profile: str | os.PathLike = DEFAULT_PROFILE, output: str | os.PathLike = DEFAULT_OUTPUT, *,
            overrides: dict[str, Any] | None = None, work_dir: str | os.PathLike = DEFAULT_WORK, smoke: bool = True,
            time_limit: float | None = None, bench: BenchOptions | None = None,
            paper_profile: str | os.PathLike | None = DEFAULT_PAPER_PROFILE, max_files: int = MAX_FILES,
            file_limit: int = FILE_LIMIT, total_limit: int = TOTAL_LIMIT,
            environ: dict[str, str] | None = None) -> RunOutcome:
    """Run `profile` (+ `overrides`) end to end; see the module docstring. Raises MatekdError
    (after packing what exists, when anything does) unless every stage succeeded."""
    from ..storage import write_json, write_text

    clock0 = time.monotonic()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    overrides = dict(overrides or {})
    bench = bench or BenchOptions()
    base_env = dict(os.environ if environ is None else environ)
    profile, output, work = _find(profile), Path(output), Path(work_dir)
    raw, params = resolved_params(profile, overrides)
    preflight(params, base_env, output, work)
    paper = None
    if paper_profile:
        from ..params import load_params

        paper_path = _find(paper_profile)
        paper = load_params(paper_path) if paper_path.is_file() else None
    _clear_output(output)
    _clear_work(work)
    project, smoke_dir, record = work / "main", work / "smoke", work / RECORD
    for folder in (project, smoke_dir, record):
        folder.mkdir()
    params = write_params(project, raw, {})
    smoke_params = write_params(smoke_dir, raw, smoke_overrides(raw))
    shutil.copyfile(project / "params.yaml", record / "params.yaml")
    shutil.copyfile(smoke_dir / "params.yaml", record / "smoke-params.yaml")
    environment = environment_record(params)
    write_json(record / "environment.json", environment)
    env, smoke_env = stage_env(base_env, project.resolve()), stage_env(base_env, smoke_dir.resolve())
    deadline = clock0 + time_limit - PACK_RESERVE_S if time_limit else None
    runner = StageRunner(record, env, deadline=deadline, clock0=clock0)
    timings: dict[str, Any] = {"profile": params.profile, "profile_file": str(profile), "overrides": overrides,
                               "started": started, "time_limit_s": time_limit, "environment": environment}

    def save_timings() -> None:
        timings.update(stages=runner.timings, phases=phase_times(runner.timings), elapsed_s=round(runner.elapsed(), 2))
        write_json(record / TIMINGS, timings)
        write_json(output / TIMINGS, timings)       # kept current: a run cut off from outside still tells

    runner.on_record = save_timings
    runner.say(f"matekd gpu-run: profile {profile} ({params.profile}), device {params.device}, "
               f"GPU {environment['gpu']}; work {work}, output {output}")
    status, error = "ok", None
    background: dict[str, Job] = {}
    started_run = False          # True once the long part (the teachers) begins
    on_sigterm = _stop_on_sigterm()
    try:
        fetches = [runner.start("fetch", "fetch", ["fetch"], project)]
        if smoke:
            fetches.append(runner.start("smoke", "fetch", ["fetch"], smoke_dir, smoke_env))
        runner.wait(*fetches)

        def start_corrupt(job: Job) -> None:   # CPU work, beside everything that follows
            background["corrupt"] = runner.start("corrupt", "corrupt (background)", ["corrupt"], project)

        prepare = runner.start("prepare", "prepare", ["prepare"], project, on_done=start_corrupt)
        if smoke:
            smoke_run(runner, smoke_dir, smoke_params, smoke_env)
            runner.say(f"[{runner.elapsed():7.1f} s] smoke pass ok: every stage ran on a few images; starting the run")
        runner.wait(prepare)
        started_run = True
        run_pipeline(runner, project, params, env, bench.args(), background["corrupt"])
    except TimeLimitReached as exc:
        status, error = "time limit", f"{exc}; packed what exists"
    except StageFailed as exc:
        if smoke and not started_run:
            status, error = "smoke failed", f"smoke pass failed, the run was not started: {exc}"
        else:
            status, error = "failed", str(exc)
    finally:
        if runner.running:       # an interruption (Ctrl-C, SIGTERM): stop the stages too
            runner.stop_all("stopped: run ended")
        on_sigterm()
    timings["status"] = status
    timings["error"] = error
    phases = phase_times(runner.timings)
    bench_report = _read_json(project / "metrics" / "bench.json")
    timings["epochs"] = epoch_costs(project, params)
    timings["bench"] = bench_summary(bench_report)
    if paper is not None:
        timings["paper_extrapolation"] = paper_extrapolation(project, params, paper, phases, bench_report)
    table = results_table(project, params)
    save_timings()
    write_text(record / RESULTS, table)
    write_text(output / RESULTS, table)
    tic = time.monotonic()
    header = manifest_header(params, environment, profile, status, error)
    limits = {"max_files": max_files, "file_limit": file_limit, "total_limit": total_limit}
    try:
        files = write_outputs(output, project, record, header, limits)
    except PackError as exc:
        raise MatekdError(f"{exc} (run status: {status}{'; ' + error if error else ''})") from None
    timings["pack_seconds"] = round(time.monotonic() - tic, 2)
    timings["total_seconds"] = round(time.monotonic() - clock0, 2)
    write_json(output / TIMINGS, timings)      # the packed copy was written before packing
    files = check_output_layout(output, **limits)
    print_summary(timings, files)
    print(table, flush=True)
    outcome = RunOutcome(status, error, files, timings, table)
    if error:
        raise MatekdError(error)
    return outcome


def _stop_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into SystemExit while the stages run, so that `finally` stops them (they
    run in sessions of their own, which a signal to this process alone would not reach).
    Returns the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _find(path: str | os.PathLike) -> Path:
    """A path as given, else relative to the project checkout (profiles/ when run elsewhere)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    beside = REPO_ROOT / given
    return beside if beside.exists() else given


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


def print_summary(timings: dict[str, Any], files: list[Path]) -> None:
    print("\nWall time per phase:")
    for name, phase in timings.get("phases", {}).items():
        print(f"  {name:<16} {phase['seconds']:8.1f} s  ({phase['stages']} stage(s), from {phase['start_s']:.1f} s)")
    print(f"  {'pack':<16} {timings.get('pack_seconds', 0):8.1f} s")
    print(f"  {'total':<16} {timings.get('total_seconds', 0):8.1f} s")
    costs = timings.get("epochs") or {}
    if costs.get("teachers") or costs.get("student_groups"):
        print("Measured seconds per epoch (training only):")
        for name, cost in costs.get("teachers", {}).items():
            print(f"  {name:<16} {cost['seconds_per_epoch']:8.2f} s  (batch {cost['batch_size']}, "
                  f"{cost['epochs']} epochs)")
        for name, cost in costs.get("student_groups", {}).items():
            print(f"  {name:<16} {cost['seconds_per_epoch']:8.2f} s  ({len(cost['students'])} students together, "
                  f"batch {cost['batch_size']})")
    bench = timings.get("bench")
    if bench:
        print(f"Bench ({bench['device']}, batch {bench['batch_size']}): cached MATE-KD step "
              f"{bench['mate_kd_cached_vs_ce']:.2f}x a CE step (target <= 1.3); {bench['together']} students together "
              f"{bench['together_speedup']:.2f}x one at a time (target >= 4)")
    paper = timings.get("paper_extrapolation")
    if paper:
        parts = [f"teachers {sum(t['seconds'] for t in paper['teachers'].values()):,.0f} s",
                 f"caches {sum(c['seconds'] for c in paper['caches'].values()):,.0f} s"]
        if "students" in paper:
            parts.append(f"students {paper['students']['seconds']:,.0f} s ({paper['students']['counted_as']})")
        parts += [f"{name} {paper[name]['seconds']:,.0f} s" for name in ("evaluate", "report") if name in paper]
        print(f"Paper profile from the measured per-epoch costs (x paper epochs): {' + '.join(parts)} = "
              f"{paper['total_seconds']:,.0f} s ({paper['total_hours']:.2f} h of GPU time; notes in {TIMINGS})")
    print(f"Outputs ({len(files)} files):")
    for path in files:
        print(f"  {path}  {path.stat().st_size / MIB:6.2f} MiB")
    print()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `matekd gpu-run` (cli.py and `python -m matekd.commands.gpu_run`)."""
    parser.add_argument("profile", nargs="?", default=DEFAULT_PROFILE,
                        help=f"params profile to run (default {DEFAULT_PROFILE})")
    parser.add_argument("output", nargs="?", default=DEFAULT_OUTPUT,
                        help="folder for the packs, MANIFEST.txt, timings.json and results.txt "
                             f"(default {DEFAULT_OUTPUT})")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param of the profile (dotted key, YAML value); repeatable")
    parser.add_argument("--work-dir", default=DEFAULT_WORK,
                        help=f"scratch folder, deleted at the next run (default {DEFAULT_WORK})")
    parser.add_argument("--no-smoke", action="store_true", help="skip the smoke pass")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop stages this long after the start (less 30 s for packing) and pack what exists")
    parser.add_argument("--bench-batch-size", type=int, default=512)
    parser.add_argument("--bench-repeats", type=int, default=20)
    parser.add_argument("--bench-warmup", type=int, default=5)
    parser.add_argument("--bench-together", type=int, default=None,
                        help="students together in the bench (default: max(ablation.group_size, 4))")
    parser.add_argument("--paper-profile", default=DEFAULT_PAPER_PROFILE,
                        help="profile whose time is extrapolated from the measured epochs ('' to skip)")
    parser.add_argument("--max-files", type=int, default=MAX_FILES)
    parser.add_argument("--file-mib", type=float, default=FILE_LIMIT / MIB)
    parser.add_argument("--total-mib", type=float, default=TOTAL_LIMIT / MIB)


def cmd_gpu_run(args: argparse.Namespace, overrides: dict[str, Any]) -> RunOutcome:
    bench = BenchOptions(args.bench_batch_size, args.bench_repeats, args.bench_warmup, args.bench_together)
    return run_gpu(args.profile, args.output, overrides=overrides, work_dir=args.work_dir, smoke=not args.no_smoke,
                   time_limit=args.time_limit, bench=bench,
                   paper_profile=args.paper_profile or None, max_files=args.max_files,
                   file_limit=int(args.file_mib * MIB), total_limit=int(args.total_mib * MIB))


def main(argv: list[str] | None = None) -> int:
    from ..cli import _overrides

    parser = argparse.ArgumentParser(prog="matekd gpu-run", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cmd_gpu_run(args, _overrides(args.set))
    except MatekdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
