"""Which stages run, in what order, where and with which environment: fetch, prepare (corrupt
in the background once it ends), the smoke pass beside the run, then teachers, caches, method
inputs, ablation, evaluate, report and bench."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layout import SOURCE_ROOT
from .machine import command_output
from .runner import Job, StageFailed, StageRunner


class SmokeFailed(StageFailed):
    """A stage failed during the smoke pass, or beside it: the run proper was not started."""


@dataclass(frozen=True)
class Project:
    """A project folder the stages run in, its params (written there as params.yaml) and the
    stages' environment."""

    folder: Path
    params: Any
    env: dict[str, str]
    one_at_a_time: bool = False      # an exclusive compute mode: one process per GPU (preflight.check_gpus)


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
    """The smoke pass's stages, in steps whose stages run together: run_pipeline's order."""
    teachers = list(smoke.params.teachers)
    return [[("prepare", ["prepare"])],
            [("corrupt", ["corrupt"]), *[(f"train-teacher {t}", ["train-teacher", t]) for t in teachers]],
            [(f"cache {t}", ["cache", t]) for t in teachers],
            [(f"method-inputs {m}", ["method-inputs", m]) for m in smoke.params.ablation.methods],
            [("ablation", ["ablation"])], [("evaluate", ["evaluate"])], [("report", ["report"])],
            [("bench", ["bench", *SMOKE_BENCH.args()])]]


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
    """The stages after prepare, in order; evaluate waits for `corrupt` (started in the
    background when prepare ended). `phase` names each phase (the smoke pass: all `smoke`)."""

    def together(name: str, commands: list[tuple[str, list[str]]], envs: list[dict[str, str]] | None = None,
                 gpu: bool = False) -> None:
        envs = envs or [project.env] * len(commands)
        if gpu and project.one_at_a_time:
            for command, env in zip(commands, envs, strict=True):
                runner.run_all(phase(name), [command], project.folder, [env])
            return
        runner.run_all(phase(name), commands, project.folder, envs)

    params = project.params
    slots = gpu_slots(params.device, project.env)
    teachers = list(params.teachers)
    pinned = [_pinned(project.env, slots[k % len(slots)]) for k in range(len(teachers))]
    together("teachers", [(f"train-teacher {t}", ["train-teacher", t]) for t in teachers], pinned, gpu=True)
    together("caches", [(f"cache {t}", ["cache", t]) for t in teachers], pinned, gpu=True)
    together("method-inputs", [(f"method-inputs {m}", ["method-inputs", m]) for m in params.ablation.methods])
    together("ablation", [("ablation", ["ablation"])])
    runner.wait(corrupt)
    together("evaluate", [("evaluate", ["evaluate"])])
    last = [("report", ["report"]), ("bench", ["bench", *bench_args])]
    if project.one_at_a_time:
        for name, args in last:
            together(name, [(name, args)])
        return
    # The report (CPU: tables, figures) does not read the bench: both at once.
    runner.wait(*[runner.start(phase(name), name, args, project.folder, project.env) for name, args in last])
