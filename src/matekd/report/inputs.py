"""What the report reads (from the project root; no model is loaded): metrics/teachers/<t>.json,
metrics/student/<output>.json, methods/<method>.json, metrics/eval/<model>.json,
metrics/eval/gradcam-<student>.json/.png, metrics/summary.json, plots/student/<output>.csv,
plots/student/<output>-weights.json and the header of models/student/distill.safetensors.
Unreadable files become entries of `Inputs.problems`, listed in the report."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import MatekdError
from ..paths import EVAL_DIR, METHOD_INPUTS_DIR, SUMMARY_METRICS, student_paths
from ..storage import read_json, read_safetensors_metadata

DISTILL_OUTPUT = "distill"                                              # the output of the configured run


@dataclass
class Inputs:
    """Everything the report reads. Keys: teachers by name, students by output name, evals by
    model name (teacher `<name>`, student `student-<output>`), method_inputs by method."""

    teachers: dict[str, dict] = field(default_factory=dict)
    students: dict[str, dict] = field(default_factory=dict)
    method_inputs: dict[str, dict] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)
    summary: dict[str, dict] = field(default_factory=dict)          # metrics/summary.json, per model
    gradcam: dict[str, dict] = field(default_factory=dict)          # key: student model name
    gradcam_png: dict[str, Path] = field(default_factory=dict)
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)   # key: output name
    histograms: dict[str, list] = field(default_factory=dict)          # key: output name
    student_meta: dict[str, dict] = field(default_factory=dict)        # weights metadata of `distill`
    problems: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.teachers or self.students or self.evals or self.summary)


def _read(path: Path, problems: list[str]) -> Any:
    try:
        return read_json(path)
    except MatekdError as exc:
        problems.append(f"unreadable: {exc}")
        return None


def per_model_summary(content: Any) -> dict[str, dict]:
    """metrics/summary.json as {model: {metric: number}}, from either a nested mapping or flat
    `<model>/<metric>` keys."""
    out: dict[str, dict] = {}
    if not isinstance(content, Mapping):
        return out
    for key, value in content.items():
        if isinstance(value, Mapping):
            out.setdefault(str(key), {}).update(value)
        elif "/" in str(key):
            model, _, metric = str(key).rpartition("/")
            out.setdefault(model, {})[metric] = value
    return out


def load_inputs(root: Path = Path(".")) -> Inputs:
    """Read every metric/plot file; unreadable files become entries of `problems`."""
    found = Inputs()
    for folder, by_stem in (("metrics/teachers", found.teachers), ("metrics/student", found.students),
                            (METHOD_INPUTS_DIR, found.method_inputs)):
        for path in sorted((root / folder).glob("*.json")):
            if (entry := _read(path, found.problems)) is not None:
                by_stem[path.stem] = entry
    for path in sorted((root / EVAL_DIR).glob("*.json")):
        entry = _read(path, found.problems)
        if entry is None:
            continue
        if path.stem.startswith("gradcam-"):
            found.gradcam[path.stem.removeprefix("gradcam-")] = entry
        else:
            found.evals[entry.get("model", path.stem)] = entry
    for path in sorted((root / EVAL_DIR).glob("gradcam-*.png")):
        found.gradcam_png[path.stem.removeprefix("gradcam-")] = path
    if (root / SUMMARY_METRICS).is_file():
        found.summary = per_model_summary(_read(root / SUMMARY_METRICS, found.problems))
    for path in sorted((root / "plots" / "student").glob("*.csv")):
        try:
            found.histories[path.stem] = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            found.problems.append(f"unreadable: {path} ({exc})")
    for path in sorted((root / "plots" / "student").glob("*-weights.json")):
        if (entry := _read(path, found.problems)) is not None:
            found.histograms[path.name.removesuffix("-weights.json")] = entry
    # Only the configured run's method is nowhere but in its weights' metadata (ablation outputs are
    # named after theirs): one header, so the stage depends on one weights file.
    weights = student_paths(DISTILL_OUTPUT, root)["weights"]
    if weights.is_file():
        try:
            found.student_meta[DISTILL_OUTPUT] = read_safetensors_metadata(weights)
        except (OSError, ValueError, struct.error) as exc:
            found.problems.append(f"unreadable: {weights} header ({exc})")
    return found
