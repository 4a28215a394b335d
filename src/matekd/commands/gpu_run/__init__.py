"""`matekd gpu-run`: a whole profile on a bare GPU machine in one command, outputs packed small.

    scripts/gpu-run.sh [PROFILE] [OUTPUT_DIR] [options]      (PROFILE default profiles/budget.yaml)

What it does, in order (every stage is the pipeline's own `matekd <stage>` command, run in a
subprocess in a scratch project folder; no DVC, no MLflow: tracking is offline):

1. Pre-flight: the params validate, the CIFAR-10 archive ($MATEKD_CIFAR10) and the frost
   textures ($MATEKD_FROST, when CIFAR-10-C is regenerated with frost) exist, the output
   folder is empty, no GPU is in compute mode Prohibited. Fails at once, naming what is
   missing. Prints each GPU's compute mode and free memory.
2. Smoke pass: every stage on a few images and one epoch (the same profile with
   `smoke_overrides`), in `<work>/smoke`, one stage after another beside the run (it no longer
   delays it; with an exclusive-mode GPU, which admits one process, it runs first). A failure
   stops everything, with the failing stage and the end of its log. The full data is decoded
   (prepare) and CIFAR-10-C regenerated in the background by CPU worker processes
   (corrupt.workers).
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

The modules, one concern each. At import time they need only the standard library, yaml,
matekd.errors and commands.pack (cli.py imports this package to build its parser: no torch,
no pydantic); the rest of matekd is imported where it is used, and nothing here needs mlflow,
dvc or optuna (the stages run offline on a bare GPU machine):

    layout      the checkout, the default folders, the run's own file names
    profile     the params: the profile with overrides, the smoke pass's, the paper profile
    preflight   checks before anything runs; the output and work folders made ready
    runner      StageRunner: `matekd <stage>` subprocesses, fail fast, time limit, per-stage times
    plan        which stages run in what order, where, with which environment
    machine     what ran where: Python, packages, GPU, code (environment.json)
    timings     per-phase times, seconds per epoch, the paper profile extrapolated, bench targets
    clock       each phase's time predicted from the profile and the H100 rates, beside the measured
    results     the results table (teachers, each method's mean ± std over seeds)
    outputs     what is packed (and what is not, and why), MANIFEST.txt
    command     run_gpu: all of the above in order
    arguments   the command-line options (`matekd gpu-run`, `python -m matekd.commands.gpu_run`)
"""

from .arguments import add_arguments, cmd_gpu_run, main
from .command import RunOutcome, run_gpu
from .plan import BenchOptions
from .profile import smoke_overrides, write_params
from .timings import paper_extrapolation

__all__ = ["BenchOptions", "RunOutcome", "add_arguments", "cmd_gpu_run", "main", "paper_extrapolation", "run_gpu",
           "smoke_overrides", "write_params"]
