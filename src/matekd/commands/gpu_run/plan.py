"""What a run runs, where and in what order: the checkout and the run's own files, the params
(the profile, the smoke pass's, the paper profile), the pipeline's stages in order (PIPELINE),
the project folders and their environment, and run_plan, which runs them with a StageRunner:
the smoke pass beside the run, corrupt in the background.

matekd.params (pydantic) is imported where it is used: cli.py imports this package to build
its parser, and that must stay quick."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .runner import Job, StageFailed, StageRunner

SOURCE_ROOT = Path(__file__).resolve().parents[3]      # src/ (put on the stages' PYTHONPATH)
REPO_ROOT = SOURCE_ROOT.parent
DEFAULT_PROFILE = "profiles/budget.yaml"
DEFAULT_PAPER_PROFILE = "profiles/paper.yaml"
DEFAULT_WORK = ".gpu-run/work"
DEFAULT_OUTPUT = ".gpu-run/out"
WORK_MARKER = ".matekd-gpu-run"       # a work folder with this file is the runner's own to clear
RECORD = "gpu-run"                    # the run's own files inside the packs: logs, timings, params
TIMINGS, RESULTS, MANIFEST = "timings.json", "results.txt", "MANIFEST.txt"
LOOSE_FILES = (TIMINGS, RESULTS, MANIFEST)               # beside the packs in OUTPUT_DIR

# The pipeline's stages after `matekd fetch`, in an order that dvc.yaml's deps and outs allow
# (tests/test_gpu_run.py checks it against dvc.yaml): (phase, `matekd` command, run once per
# "teachers" or "methods" like dvc.yaml's foreach, or once: None). A command's DVC stage is its
# name with '_' for '-'; bench is not a DVC stage, and distill (the one configured student) is
# not run: ablation trains every method's. How the stages overlap is run_plan's to say.
PIPELINE: tuple[tuple[str, str, str | None], ...] = (
    ("prepare", "prepare", None),
    ("corrupt", "corrupt", None),
    ("teachers", "train-teacher", "teachers"),
    ("caches", "cache", "teachers"),
    ("method-inputs", "method-inputs", "methods"),
    ("ablation", "ablation", None),
    ("evaluate", "evaluate", None),
    ("report", "report", None),
    ("bench", "bench", None),
)


def find_path(path: str | os.PathLike) -> Path:
    """A path as given, else relative to the project checkout (profiles/ when run elsewhere)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    beside = REPO_ROOT / given
    return beside if beside.exists() else given


def read_json_or_none(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable: a run, perhaps cut short,
    leaves what it got to, and the measurements and the table are made of what is there."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def command_output(command: Sequence[str]) -> str | None:
    """The standard output of `command`, or None when it cannot run (not installed, hung)."""
    try:
        return subprocess.run(list(command), capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


# --------------------------------------------------------------------------------------
# The params


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
    from ...params import load_params, set_dotted

    params = load_params(profile, overrides)      # validates; names the bad key
    raw = yaml.safe_load(profile.read_text()) or {}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return raw, params


def write_params(folder: Path, raw: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Write `raw` + `overrides` as folder/params.yaml; returns the validated Params."""
    from ...params import set_dotted, validate_params
    from ...storage import write_text

    tree = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    params = validate_params(tree)
    write_text(folder / "params.yaml", yaml.safe_dump(tree, sort_keys=False))
    return params


def paper_params(path: str | os.PathLike | None) -> Any:
    """The validated profile whose time is extrapolated from this run's measurements, or None
    when none is given or the file is not there."""
    if not path:
        return None
    from ...params import load_params

    found = find_path(path)
    return load_params(found) if found.is_file() else None


# --------------------------------------------------------------------------------------
# Where the stages run


class SmokeFailed(StageFailed):
    """A stage failed during the smoke pass, or beside it: the run proper was not started."""


@dataclass(frozen=True)
class Project:
    """A project folder the stages run in, its params (written there as params.yaml) and the
    stages' environment."""

    folder: Path
    params: Any
    env: dict[str, str]
    one_at_a_time: bool = False      # an exclusive compute mode: one process per GPU (command.check_gpus)


def new_project(folder: Path, raw: dict[str, Any], overrides: dict[str, Any], base_env: dict[str, str],
                one_at_a_time: bool = False) -> Project:
    """A new project folder with its params.yaml (`raw` + `overrides`) and its stages' environment."""
    folder.mkdir()
    return Project(folder, write_params(folder, raw, overrides), stage_env(base_env, folder.resolve()),
                   one_at_a_time)


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
        listing = command_output(["nvidia-smi", "-L"])
        if listing is None:
            return [None]
        ids = [str(k) for k, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]
    return ids if len(ids) > 1 else [None]


def _pinned(env: dict[str, str], slot: str | None) -> dict[str, str]:
    return env if slot is None else {**env, "CUDA_VISIBLE_DEVICES": slot}


def stage_commands(params: Any, phase: str, extra: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """A phase's stages as (name, `matekd` arguments + `extra`): one per teacher or method where
    PIPELINE says so."""
    _, command, each = next(stage for stage in PIPELINE if stage[0] == phase)
    if each is None:
        return [(command, [command, *extra])]
    keys = list(params.teachers) if each == "teachers" else params.ablation.methods
    return [(f"{command} {key}", [command, key, *extra]) for key in keys]


# --------------------------------------------------------------------------------------
# The plan: the smoke pass beside the run


def run_plan(runner: StageRunner, main: Project, smoke: Project | None, bench: BenchOptions) -> None:
    """Every stage of the run in `main`, and the smoke pass in `smoke` (None: no smoke pass)
    beside it: the smoke pass's stages run one after another while the run's own go on, and a
    failure of either stops both (SmokeFailed for the smoke pass's). With an exclusive GPU
    (one process per GPU) the smoke pass runs first, before the run starts."""
    try:
        _fetch(runner, main, smoke)
    except StageFailed as exc:
        if smoke is None:
            raise
        raise SmokeFailed(f"smoke pass failed, the run was not started: {exc}") from None
    try:
        corrupt = _prepare(runner, main, smoke)
        run_pipeline(runner, main, bench.args(), corrupt)
        if smoke is not None and not main.one_at_a_time:
            runner.wait_for(lambda: runner.smoke_done)     # normally long over
    except StageFailed as exc:
        if exc.phase != "smoke":
            raise
        ran = "was not started" if main.one_at_a_time else "was stopped"
        raise SmokeFailed(f"smoke pass failed, the run {ran}: {exc}") from None


def _fetch(runner: StageRunner, main: Project, smoke: Project | None) -> None:
    """`matekd fetch` in both folders at once."""
    fetches = [runner.start("fetch", "fetch", ["fetch"], main.folder, main.env)]
    if smoke is not None:
        fetches.append(runner.start("smoke", "fetch", ["fetch"], smoke.folder, smoke.env))
    runner.wait(*fetches)


def _prepare(runner: StageRunner, main: Project, smoke: Project | None) -> Job:
    """prepare: corrupt starts in the background when it ends (CPU work, beside everything that
    follows), and the smoke pass starts beside it (smoke_chain), or runs to its end first with
    an exclusive GPU (smoke_run). Returns that corrupt."""
    background: list[Job] = []

    def start_corrupt(job: Job) -> None:
        background.append(runner.start("corrupt", "corrupt (background)", ["corrupt"], main.folder, main.env))

    prepare = runner.start("prepare", "prepare", ["prepare"], main.folder, main.env, on_done=start_corrupt)
    if smoke is not None and main.one_at_a_time:
        smoke_run(runner, smoke)
        runner.say("smoke pass ok: every stage ran on a few images; starting the run", at=runner.elapsed())
    elif smoke is not None:
        smoke_chain(runner, smoke)
    runner.wait(prepare)
    return background[0]


def smoke_steps(smoke: Project) -> list[list[tuple[str, list[str]]]]:
    """The smoke pass's stages in steps whose stages run together: PIPELINE's phases one after
    another, corrupt (CPU) beside the teachers as in the run."""
    phases = [phase for phase, _, _ in PIPELINE]
    steps = [stage_commands(smoke.params, p, SMOKE_BENCH.args() if p == "bench" else ()) for p in phases]
    corrupt = phases.index("corrupt")
    steps[corrupt:corrupt + 2] = [steps[corrupt] + steps[corrupt + 1]]
    return steps


def smoke_chain(runner: StageRunner, smoke: Project) -> None:
    """Start the smoke pass without waiting for it: each step's stages start when the step
    before has ended (from the runner's poll, whoever is waiting); runner.smoke_done turns true
    at the end. A failure fails fast as any stage's does."""
    steps = smoke_steps(smoke)
    runner.smoke_done = False
    pending: list[Job] = []

    def next_step(job: Job | None = None) -> None:
        if job is not None:
            pending.remove(job)
            if pending:
                return
        if not steps:
            runner.smoke_done = True
            runner.say("smoke pass ok: every stage ran on a few images, beside the run", at=runner.elapsed())
            return
        pending.extend(runner.start("smoke", name, args, smoke.folder, smoke.env, on_done=next_step)
                       for name, args in steps.pop(0))

    next_step()


def smoke_run(runner: StageRunner, smoke: Project) -> None:
    """Every stage of the run on the smoke params, in the smoke folder (phase `smoke`)."""
    runner.run_all("smoke", [("prepare", ["prepare"])], smoke.folder, [smoke.env])
    corrupt = runner.start("smoke", "corrupt", ["corrupt"], smoke.folder, smoke.env)
    run_pipeline(runner, smoke, SMOKE_BENCH.args(), corrupt, phase=lambda name: "smoke")


def run_pipeline(runner: StageRunner, project: Project, bench_args: Sequence[str], corrupt: Job,
                 phase: Callable[[str], str] = lambda name: name) -> None:
    """PIPELINE's stages after prepare and corrupt, phase after phase, each phase's stages
    together; evaluate waits for `corrupt` (started in the background when prepare ended).
    `phase` names each phase (the smoke pass: all `smoke`)."""
    params = project.params

    def together(name: str, envs: list[dict[str, str]] | None = None, gpu: bool = False,
                 extra: Sequence[str] = ()) -> None:
        commands = stage_commands(params, name, extra)
        envs = envs or [project.env] * len(commands)
        if gpu and project.one_at_a_time:
            for command, env in zip(commands, envs, strict=True):
                runner.run_all(phase(name), [command], project.folder, [env])
            return
        runner.run_all(phase(name), commands, project.folder, envs)

    slots = gpu_slots(params.device, project.env)
    pinned = [_pinned(project.env, slots[k % len(slots)]) for k in range(len(params.teachers))]
    together("teachers", pinned, gpu=True)
    together("caches", pinned, gpu=True)
    together("method-inputs")
    together("ablation")
    runner.wait(corrupt)
    together("evaluate")
    if project.one_at_a_time:
        together("report")
        together("bench", extra=bench_args)
        return
    # The report (CPU: tables, figures) does not read the bench: both at once.
    last = stage_commands(params, "report") + stage_commands(params, "bench", bench_args)
    runner.wait(*[runner.start(phase(name), name, args, project.folder, project.env) for name, args in last])
