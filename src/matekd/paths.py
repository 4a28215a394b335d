"""Where every pipeline output lives (relative to the project root, as dvc.yaml names them)."""

from __future__ import annotations

import re
from pathlib import Path

PREPARED_DIR = Path("prepared")
EVAL_DIR = Path("metrics") / "eval"
EVAL_PARTIAL_DIR = Path("metrics") / "eval-partial"   # evaluate's per-model results while it runs (a cut keeps them)
SUMMARY_METRICS = Path("metrics") / "summary.json"   # stage evaluate's DVC metrics: per model, numbers
REPORT_DIR = Path("reports")
METHOD_INPUTS_DIR = Path("methods")          # stage method_inputs: what each method trains with
TUNED_DIR = Path("tuning") / "best"          # `matekd tune`: a method's tuned values
TUNE_METRICS_DIR = Path("metrics") / "tune"
TUNE_RECORDS_DIR = Path("tuning") / "trials"     # per-epoch records of trials, for the launching process
GROUP_STORE_DIR = Path("checkpoints") / "groups"  # students trained together, until each is written


def teacher_paths(name: str, root: Path = Path(".")) -> dict[str, Path]:
    return {
        "weights": root / "models" / "teachers" / f"{name}.safetensors",
        "metrics": root / "metrics" / "teachers" / f"{name}.json",
        "plots": root / "plots" / "teachers" / f"{name}.csv",
        "checkpoint": root / "checkpoints" / "teachers" / f"{name}.pt",
    }


def student_paths(output_name: str, root: Path = Path(".")) -> dict[str, Path]:
    return {
        "weights": root / "models" / "student" / f"{output_name}.safetensors",
        "metrics": root / "metrics" / "student" / f"{output_name}.json",
        "plots": root / "plots" / "student" / f"{output_name}.csv",
        "checkpoint": root / "checkpoints" / "student" / f"{output_name}.pt",
        "histograms": root / "plots" / "student" / f"{output_name}-weights.json",
    }


def ablation_output(method: str, seed: int) -> str:
    """Output name of an ablation run (its stage is `ablation@<method>-<seed>`)."""
    return f"{method}-seed{seed}"


_ABLATION_OUTPUT = re.compile(r"^(?P<method>.+)-seed(?P<seed>\d+)$")


def parse_ablation_output(name: str) -> tuple[str, int] | None:
    """(method, seed) of an ablation output name, None for any other output (e.g. `distill`)."""
    match = _ABLATION_OUTPUT.match(name)
    return (match["method"], int(match["seed"])) if match else None


def cache_path(name: str, root: Path = Path(".")) -> Path:
    return root / "cams" / f"{name}.safetensors"


def cache_metrics_path(name: str, root: Path = Path(".")) -> Path:
    return root / "metrics" / "cache" / f"{name}.json"


def method_inputs_path(method: str, root: Path = Path(".")) -> Path:
    return root / METHOD_INPUTS_DIR / f"{method}.json"


def tuned_values_path(method: str, root: Path = Path(".")) -> Path:
    return root / TUNED_DIR / f"{method}.yaml"
