"""The report: tables, figures and plot data from the pipeline's metric files (no model is loaded).

Reads (from the project root; see `load_inputs`): metrics/teachers/<t>.json,
metrics/student/<output>.json, methods/<method>.json, metrics/eval/<model>.json,
metrics/eval/gradcam-<student>.json/.png, metrics/summary.json, plots/student/<output>.csv and
plots/student/<output>-weights.json. Writes into `out` (the stage swaps it in as reports/):

- results.md: every table, labelled with the data and the profile, figures inline;
- results.csv: every number in long format (table, model, metric, value; accuracies as fractions);
- figures/*.png: static figures, viewable offline;
- plots/*.csv: long-format overlay data for `dvc plots` (one series per method, the mean over
  the ablation seeds): val_acc.csv (epoch, series, val_acc), train_loss.csv (epoch, series,
  train_loss), teacher_weights.csv (epoch, series = <method>/<teacher>, weight) and
  corruption_accuracy.csv (corruption, series, accuracy).

Methods come from the method table (matekd.methods), in its order; the only method named here is
REFERENCE_METHOD, the method under test. Differences between methods carry 95% t-intervals over
seeds (`t_interval`); the experiment's departures from the paper setting come from the params
(`shortcuts`). Missing inputs are listed in the report; only a project with no results at all is
an error (raised by the stage).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import methods as method_table
from .corruptions import EXTRA_4 as EXTRA_CORRUPTIONS
from .corruptions import STANDARD_15 as STANDARD_CORRUPTIONS
from .errors import MatekdError
from .params import CIFAR_PER_CLASS_TEST, CIFAR_PER_CLASS_TRAIN, Params, Recipe
from .paths import METHOD_INPUTS_DIR, SUMMARY_METRICS, method_inputs_path, student_paths
from .storage import read_json, write_text

REFERENCE_METHOD = "mate_kd"
CONFIDENCE = 0.95
MIN_SEEDS_FOR_INTERVAL = 3
NO_INTERVAL = f"no interval (needs >= {MIN_SEEDS_FOR_INTERVAL} seeds)"
CLASSES = 10
ABLATION_NAME = re.compile(r"^(?P<method>.+)-seed(?P<seed>\d+)$")
DISTILL_OUTPUT = "distill"

# docs/method.md "Defaults" and "Claimed results": the setting the shortcuts are measured against.
PAPER_RECIPE = {"epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True,
                "weight_decay": 5e-4, "schedule": "cosine"}
PAPER_VAL_PER_CLASS = 500                      # 45k / 5k / 10k
PAPER_TEACHERS = ("resnet110", "densenet121", "vgg19_bn")
PAPER_STUDENT = "resnet20"
PAPER_DISTILL = {"ce_weight": 0.3, "kd_temperature": 3.0, "similarity_temperature": 0.2, "attribution_weight": 0.1}
CLAIMED = [("ResNet110", 93.5, "1.7M", "6.8MB", 74.05), ("DenseNet121", 94.2, "7.0M", "28MB", 75.89),
           ("VGG19", 93.8, "20M", "80MB", 73.47), ("Student ResNet20 (MATE-KD)", 90.22, "0.27M", "1.1MB", 68.51)]

# Overlay plot data for `dvc plots` (dvc.yaml names these files; keep names and columns).
OVERLAYS = {"val_acc": ("epoch", "val_acc"), "train_loss": ("epoch", "train_loss"),
            "teacher_weights": ("epoch", "weight"), "corruption_accuracy": ("corruption", "accuracy")}

__all__ = [
    "NO_INTERVAL",
    "REFERENCE_METHOD",
    "Inputs",
    "Interval",
    "ablation_runs",
    "ablation_summary",
    "build_report",
    "corruption_frame",
    "corruption_overlay",
    "epoch_overlay",
    "format_interval",
    "histogram_mean_weights",
    "load_inputs",
    "markdown_table",
    "method_order",
    "method_values",
    "model_frame",
    "paired_differences",
    "per_model_summary",
    "robustness_groups",
    "run_weighting",
    "safetensors_metadata",
    "severity_frame",
    "shortcuts",
    "t_interval",
    "weight_evolution",
    "weight_overlay",
    "weighting_frame",
]


# --------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Interval:
    """Mean of n values with its two-sided t-interval (half_width NaN when n is too small)."""

    n: int
    mean: float
    sd: float            # sample standard deviation (ddof 1); NaN for n < 2
    half_width: float    # t_{(1+confidence)/2, n-1} * sd / sqrt(n); NaN when n < MIN_SEEDS_FOR_INTERVAL
    confidence: float = CONFIDENCE

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.half_width)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE,
               min_n: int = MIN_SEEDS_FOR_INTERVAL) -> Interval:
    """Mean and Student-t confidence interval of independent values (seeds), NaNs dropped.

    half_width = t_{(1+confidence)/2, n-1} * sd / sqrt(n) with the sample sd (ddof 1). Below
    `min_n` values no interval is given: with 2 seeds the 95% t-quantile is 12.7 and the
    interval says nothing useful, with 1 there is no spread at all."""
    from scipy import stats

    x = np.asarray([v for v in (_num(v) for v in values) if not math.isnan(v)], dtype=float)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    half = math.nan
    if n >= max(min_n, 2):
        half = float(stats.t.ppf((1 + confidence) / 2, df=n - 1) * sd / math.sqrt(n))
    return Interval(n, mean, sd, half, confidence)


def format_interval(interval: Interval, scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    """`± h (lo to hi)` in the units of `scale` (100: percent / percentage points), or the
    NO_INTERVAL text."""
    if interval.n == 0:
        return "–"
    if not interval.has_interval:
        return NO_INTERVAL
    sign = "+" if signed else ""
    return (f"± {scale * interval.half_width:.{digits}f} ({scale * interval.low:{sign}.{digits}f} to "
            f"{scale * interval.high:{sign}.{digits}f})")


# --------------------------------------------------------------------------------------
# Shortcuts: how the params depart from the paper setting


def shortcuts(params: Params, devices: Sequence[str] = ()) -> list[str]:
    """Every way the configured experiment departs from the paper setting (docs/method.md,
    Defaults: 200 epochs, batch 128, SGD lr 0.1 with Nesterov momentum 0.9, weight decay 5e-4,
    cosine schedule; ResNet110/DenseNet121/VGG19 teachers, a ResNet20 student; 45k/5k/10k
    images; the full CIFAR-10-C), one plain sentence each, derived from the params (and from the
    `devices` the models were evaluated on: a GPU means bf16 autocast). Speed-ups that are exact
    by construction are listed too, and say so."""
    out: list[str] = []
    if tuple(sorted(params.teachers)) != tuple(sorted(PAPER_TEACHERS)):
        out.append(f"teachers {', '.join(params.teachers)} instead of the paper's {', '.join(PAPER_TEACHERS)}")
    if params.distill.student != PAPER_STUDENT:
        out.append(f"student {params.distill.student} instead of {PAPER_STUDENT}")
    recipes: dict[str, Recipe] = {f"teacher {name}": r for name, r in params.teachers.items()}
    recipes["students"] = params.distill.recipe
    out += _recipe_shortcuts(recipes)
    out += _data_shortcuts(params)
    out += _distill_shortcuts(params)
    gpus = sorted({d for d in devices if d and not str(d).startswith("cpu")})
    if gpus:
        out.append(f"bf16 autocast and channels_last on the GPU ({', '.join(gpus)}); the paper recipe is fp32")
    return out


def _recipe_shortcuts(recipes: Mapping[str, Recipe]) -> list[str]:
    out: list[str] = []
    paper = PAPER_RECIPE

    def listing(pairs: list[tuple[str, str]]) -> str:
        return ", ".join(f"{who} {what}" for who, what in pairs)

    fewer = [(who, str(r.epochs)) for who, r in recipes.items() if r.epochs < paper["epochs"]]
    more = [(who, str(r.epochs)) for who, r in recipes.items() if r.epochs > paper["epochs"]]
    if fewer:
        out.append(f"fewer epochs: {listing(fewer)} (paper: {paper['epochs']})")
    if more:
        out.append(f"more epochs: {listing(more)} (paper: {paper['epochs']})")
    alike: dict[tuple[int, float], list[str]] = {}     # recipes with the same batch and lr: one line
    for who, r in recipes.items():
        if r.batch_size != paper["batch_size"] or not math.isclose(r.lr, paper["lr"]):
            alike.setdefault((r.batch_size, r.lr), []).append(who)
    for (batch, lr), whom in alike.items():
        who = ", ".join(whom)
        if batch == paper["batch_size"]:
            out.append(f"{who}: learning rate {lr:g} (paper: {paper['lr']:g} at batch {paper['batch_size']})")
            continue
        scaled = paper["lr"] * batch / paper["batch_size"]
        kind = "larger" if batch > paper["batch_size"] else "smaller"
        rule = "the linear scaling rule" if math.isclose(lr, scaled) else f"linear scaling would give {scaled:g}"
        out.append(f"{kind} batches: {who} batch {batch} with learning rate {lr:g} "
                   f"(paper: batch {paper['batch_size']}, lr {paper['lr']:g}; {rule})")
    for key, label in (("momentum", "momentum"), ("weight_decay", "weight decay"), ("schedule", "schedule")):
        differ = [(who, f"{getattr(r, key):g}" if isinstance(getattr(r, key), float) else str(getattr(r, key)))
                  for who, r in recipes.items() if getattr(r, key) != paper[key]
                  and not (isinstance(paper[key], float) and math.isclose(getattr(r, key), paper[key]))]
        if differ:
            out.append(f"{label}: {listing(differ)} (paper: {paper[key]:g})" if isinstance(paper[key], float)
                       else f"{label}: {listing(differ)} (paper: {paper[key]})")
    plain = [who for who, r in recipes.items() if not r.nesterov]
    if plain:
        out.append(f"plain (not Nesterov) momentum: {', '.join(plain)}")
    warm = [(who, f"{r.warmup_epochs:g} epoch(s)") for who, r in recipes.items() if r.warmup_epochs > 0]
    if warm:
        out.append(f"linear learning-rate warm-up: {listing(warm)} (not in the paper recipe)")
    # Not a params key today; named here so that a recipe gaining it is reported, not hidden.
    smooth = [(who, f"{value:g}") for who, r in recipes.items() if (value := getattr(r, "label_smoothing", 0) or 0)]
    if smooth:
        out.append(f"label smoothing: {listing(smooth)} (not in the paper recipe)")
    return out


def _data_shortcuts(params: Params) -> list[str]:
    out: list[str] = []
    d, c = params.data, params.corrupt
    paper_train = CIFAR_PER_CLASS_TRAIN - PAPER_VAL_PER_CLASS
    train = d.train_per_class if d.train_per_class is not None else CIFAR_PER_CLASS_TRAIN - d.val_per_class
    if train != paper_train:
        kind = "training subset" if train < paper_train else "larger training split"
        out.append(f"{kind}: {train:,} images per class ({CLASSES * train:,} instead of {CLASSES * paper_train:,})")
    if d.val_per_class != PAPER_VAL_PER_CLASS:
        out.append(f"validation split: {d.val_per_class:,} images per class ({CLASSES * d.val_per_class:,} "
                   f"instead of {CLASSES * PAPER_VAL_PER_CLASS:,})")
    if d.test_per_class is not None and d.test_per_class < CIFAR_PER_CLASS_TEST:
        out.append(f"test subset: {d.test_per_class:,} images per class ({CLASSES * d.test_per_class:,} of the "
                   f"{CLASSES * CIFAR_PER_CLASS_TEST:,} test images)")
    if c.images_per_class is not None and c.images_per_class < CIFAR_PER_CLASS_TEST:
        out.append(f"CIFAR-10-C subset: {c.images_per_class:,} images per class and corruption and severity "
                   f"({CLASSES * c.images_per_class:,} instead of {CLASSES * CIFAR_PER_CLASS_TEST:,})")
    if c.corruptions is not None:
        chosen = set(c.corruptions)
        standard = [n for n in STANDARD_CORRUPTIONS if n not in chosen]
        extra = [n for n in EXTRA_CORRUPTIONS if n not in chosen]
        if standard:
            out.append(f"CIFAR-10-C without {', '.join(standard)}: the 15-corruption mean covers "
                       f"{len(STANDARD_CORRUPTIONS) - len(standard)} corruptions")
        if extra:
            out.append(f"CIFAR-10-C without the extra corruption(s) {', '.join(extra)} (19-corruption mean only)")
    return out


def _distill_shortcuts(params: Params) -> list[str]:
    out: list[str] = []
    d, a = params.distill, params.ablation
    changed = [f"{key} {getattr(d, key):g} (paper {value:g})" for key, value in PAPER_DISTILL.items()
               if not math.isclose(getattr(d, key), value)]
    if changed:
        out.append("shared distill values differ from the paper's seed configuration: " + ", ".join(changed))
    if a.tuned:
        out.append("ablation.tuned: each method trains with its own tuned values (tuning/best/<method>.yaml), "
                   "not the shared distill values")
    if d.data_seed is not None:
        out.append(f"one data stream for every student (distill.data_seed {d.data_seed}): every seed sees the same "
                   "order and augmentation, so seeds differ only in initialisation and the spread over seeds "
                   "understates run-to-run variation")

    used = [method_table.METHODS[m] for m in {*a.methods, d.method} if m in method_table.METHODS]
    if d.teacher_signals == "cached" and any(m.has_kd for m in used):
        out.append("teacher logits read from the cache (exact: each crop/flip variant's logits computed once by "
                   "the cache stage, the same numbers as running the teachers online)")
        if params.cache.logit_variants == "used":
            out.append("cache.logit_variants: used (exact for these runs: logits cached only for the crop/flip "
                       "variants these seeds and epochs draw; another seed or epoch count reruns `cache`)")
    if a.group_size > 1:
        out.append(f"ablation students trained {a.group_size} at a time as one network of grouped convolutions "
                   "(exact by construction: each keeps its own weights, data order, augmentation, teacher "
                   "signals and loss)")
    return out


# --------------------------------------------------------------------------------------
# Inputs


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


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file, read from its header only."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return dict(header.get("__metadata__") or {})


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
    for path in sorted((root / "metrics" / "teachers").glob("*.json")):
        if (entry := _read(path, found.problems)) is not None:
            found.teachers[path.stem] = entry
    for path in sorted((root / "metrics" / "student").glob("*.json")):
        if (entry := _read(path, found.problems)) is not None:
            found.students[path.stem] = entry
    for path in sorted((root / METHOD_INPUTS_DIR).glob("*.json")):
        if (entry := _read(path, found.problems)) is not None:
            found.method_inputs[path.stem] = entry
    for path in sorted((root / "metrics" / "eval").glob("*.json")):
        entry = _read(path, found.problems)
        if entry is None:
            continue
        if path.stem.startswith("gradcam-"):
            found.gradcam[path.stem.removeprefix("gradcam-")] = entry
        else:
            found.evals[entry.get("model", path.stem)] = entry
    for path in sorted((root / "metrics" / "eval").glob("gradcam-*.png")):
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
            found.student_meta[DISTILL_OUTPUT] = safetensors_metadata(weights)
        except (OSError, ValueError, struct.error) as exc:
            found.problems.append(f"unreadable: {weights} header ({exc})")
    return found


# --------------------------------------------------------------------------------------
# Tables (pure functions on dicts / DataFrames)


def method_order(present: Iterable[str]) -> list[str]:
    """Methods in the method table's order, then any unknown ones (old results) sorted."""
    present = {m for m in present if isinstance(m, str)}
    return [m for m in method_table.METHODS if m in present] + sorted(present - set(method_table.METHODS))


def _student_method(output: str, inputs: Inputs, params: Params) -> tuple[str | None, str]:
    """The method of a student output and where it came from."""
    match = ABLATION_NAME.match(output)
    if match:
        return match["method"], "output name"
    for source, entry in (("metrics", inputs.students.get(output)), ("evaluate", inputs.evals.get(f"student-{output}")),
                          ("weights metadata", inputs.student_meta.get(output))):
        if entry and isinstance(entry.get("method"), str):
            return entry["method"], source
    if output == DISTILL_OUTPUT:
        return params.distill.method, "params.distill.method"
    return None, "unknown"


def model_frame(inputs: Inputs, params: Params) -> pd.DataFrame:
    """One row per model: kind, output, method, seed, ablation, test_acc, params, size_mb,
    CIFAR-10-C means. Accuracies come from metrics/eval when present, else metrics/summary.json,
    else the training metrics (column acc_source says which)."""
    rows: list[dict] = []
    teacher_order = list(params.teachers)
    teachers = [t for t in teacher_order if t in inputs.teachers or t in inputs.evals or t in inputs.summary]
    teachers += sorted(set(inputs.teachers) - set(teachers))
    teachers += sorted(name for name, e in inputs.evals.items() if e.get("kind") == "teacher" and name not in teachers)
    for name in teachers:
        rows.append(_row(name, "teacher", inputs.teachers.get(name, {}), inputs.evals.get(name),
                         inputs.summary.get(name)))
    outputs = set(inputs.students)
    outputs |= {e.get("output") or n.removeprefix("student-") for n, e in inputs.evals.items()
                if e.get("kind") == "student" or n.startswith("student-")}
    outputs |= {n.removeprefix("student-") for n in inputs.summary if n.startswith("student-")}
    for output in outputs:
        name = f"student-{output}"
        train = inputs.students.get(output, {})
        row = _row(name, "student", train, inputs.evals.get(name), inputs.summary.get(name))
        match = ABLATION_NAME.match(output)
        row["method"], row["method_source"] = _student_method(output, inputs, params)
        row.update(output=output, ablation=bool(match))
        if match:
            row["seed"] = int(match["seed"])
        elif _isnan(row.get("seed")) and output == DISTILL_OUTPUT:
            row["seed"] = params.distill.seed
        rows.append(row)
    columns = ["model", "kind", "output", "method", "method_source", "seed", "ablation", "test_acc", "acc_source",
               "params", "size_mb", "c_mean15", "c_mean15_complete", "c_missing", "c_mean19", "device"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["ablation"] = frame["ablation"].fillna(False).astype(bool)
    order = {m: i for i, m in enumerate(method_order(frame["method"].dropna()))}
    frame["_k"] = [0 if k == "teacher" else (1 if not a else 2) for k, a in zip(frame["kind"], frame["ablation"])]
    frame["_t"] = [teachers.index(m) if m in teachers else 0 for m in frame["model"]]
    frame["_m"] = [order.get(m, len(order)) for m in frame["method"]]
    frame["_s"] = pd.to_numeric(frame["seed"], errors="coerce").fillna(-1)
    frame = frame.sort_values(["_k", "_t", "_m", "_s", "model"], kind="stable")
    return frame.drop(columns=["_k", "_t", "_m", "_s"]).reset_index(drop=True)


def _row(model: str, kind: str, train: Mapping, evaluation: Mapping | None, summary: Mapping | None) -> dict:
    row: dict[str, Any] = {"model": model, "kind": kind, "output": None, "ablation": False, "method": None,
                           "method_source": None, "seed": train.get("seed"), "test_acc": train.get("test_acc"),
                           "acc_source": "training metrics" if train.get("test_acc") is not None else None,
                           "params": train.get("params"), "size_mb": train.get("size_mb"),
                           "c_mean15": None, "c_mean15_complete": None, "c_missing": None, "c_mean19": None,
                           "device": None}
    if evaluation:
        c = evaluation.get("cifar10c") or {}
        row.update({"test_acc": evaluation.get("test_acc"), "acc_source": "evaluate",
                    "params": evaluation.get("params", row["params"]),
                    "size_mb": evaluation.get("size_mb", row["size_mb"]),
                    "c_mean15": c.get("standard_mean"), "c_mean15_complete": c.get("standard_mean_complete"),
                    "c_missing": ", ".join(c.get("standard_missing") or []) or None,
                    "c_mean19": c.get("all_mean"), "device": evaluation.get("device")})
        if _isnan(row["seed"]) and evaluation.get("seed") is not None:
            row["seed"] = evaluation["seed"]
    elif summary:
        row.update({"test_acc": summary.get("test_acc", row["test_acc"]), "acc_source": "metrics/summary.json",
                    "c_mean15": summary.get("cifar10c_mean15"), "c_mean19": summary.get("cifar10c_mean19")})
    return row


def ablation_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The ablation students (output `<method>-seed<k>`) of a model frame."""
    return frame[frame["ablation"]].reset_index(drop=True)


def ablation_summary(runs: pd.DataFrame, metrics: Sequence[str] = ("test_acc", "c_mean15")) -> pd.DataFrame:
    """Per method (table order): n seeds, the seeds, and per metric its t_interval over seeds
    (columns <metric>_n, _mean, _sd, _half, _low, _high). `runs`: columns method, seed, metrics."""
    rows = []
    for method in method_order(runs["method"]):
        group = runs[runs["method"] == method].sort_values("seed")
        row: dict[str, Any] = {"method": method, "n": len(group),
                               "seeds": " ".join(str(int(s)) for s in group["seed"])}
        for metric in metrics:
            iv = t_interval(group[metric])
            row.update({f"{metric}_n": iv.n, f"{metric}_mean": iv.mean, f"{metric}_sd": iv.sd,
                        f"{metric}_half": iv.half_width, f"{metric}_low": iv.low, f"{metric}_high": iv.high,
                        f"{metric}_interval": iv})
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(runs: pd.DataFrame, metric: str, reference: str = REFERENCE_METHOD) -> pd.DataFrame:
    """reference - baseline, paired by seed over the seeds both have a value for, per baseline
    (table order): n, seeds, mean, sd, the t-interval (half, low, high; NaN below
    MIN_SEEDS_FOR_INTERVAL pairs), per_seed {seed: difference} and the Interval itself."""
    columns = ["baseline", "n", "seeds", "mean", "sd", "half", "low", "high", "per_seed", "interval"]
    numeric = runs.assign(**{metric: pd.to_numeric(runs[metric], errors="coerce")})
    table = numeric.pivot_table(index="seed", columns="method", values=metric, aggfunc="first", dropna=False)
    if reference not in table.columns:
        return pd.DataFrame(columns=columns)
    rows = []
    for baseline in [m for m in method_order(table.columns) if m != reference]:
        pair = table[[reference, baseline]].dropna()
        diff = pair[reference] - pair[baseline]
        iv = t_interval(diff)
        rows.append({"baseline": baseline, "n": iv.n, "seeds": " ".join(str(int(s)) for s in pair.index),
                     "mean": iv.mean, "sd": iv.sd, "half": iv.half_width, "low": iv.low, "high": iv.high,
                     "per_seed": {int(s): float(v) for s, v in diff.items()}, "interval": iv})
    return pd.DataFrame(rows, columns=columns)


def _flat_numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(_flat_numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


def run_weighting(metrics: Mapping | None, history: pd.DataFrame | None) -> dict[str, Any]:
    """One student's teacher-weight summary: entropy relative to uniform at the last epoch
    (metrics `weighting.entropy_relative`, nested or flat, else the history's last row), its
    mean over all epochs (history; from train_entropy / log K when the relative column is absent),
    and the last epoch's mean weight per teacher."""
    flat = _flat_numbers(metrics or {})
    final = flat.get("weighting.entropy_relative", math.nan)
    weights = {key.removeprefix("weighting.weight_mean."): v for key, v in flat.items()
               if key.startswith("weighting.weight_mean.")}
    over_epochs = math.nan
    relative = None
    if history is not None and "train_entropy_relative" in history:
        relative = pd.to_numeric(history["train_entropy_relative"], errors="coerce")
    elif history is not None and "train_entropy" in history:
        # Older histories: entropy in nats only; K = the teachers with a weight column.
        k = sum(str(c).startswith("train_weight_mean/") for c in history.columns)
        if k > 1:
            relative = pd.to_numeric(history["train_entropy"], errors="coerce") / math.log(k)
    if relative is not None:
        series = relative.dropna()
        if len(series):
            over_epochs = float(series.mean())
            if math.isnan(final):
                final = float(series.iloc[-1])
    if not weights and history is not None and len(history):
        last = history.iloc[-1]
        weights = {c.removeprefix("train_weight_mean/"): _num(last[c]) for c in history.columns
                   if str(c).startswith("train_weight_mean/")}
    return {"final": final, "over_epochs": over_epochs, "weights": weights}


def weighting_frame(runs: pd.DataFrame, inputs: Inputs) -> pd.DataFrame:
    """Per method whose teacher weights vary per sample (method table): the runs, the entropy
    of the weights relative to uniform (1 = equal weights, 0 = one teacher per sample) at the
    last epoch (mean and range over seeds) and over all epochs, and the mean weight per teacher."""
    rows = []
    for method in method_order(runs["method"]):
        row_of_table = method_table.METHODS.get(method)
        if row_of_table is None or not row_of_table.per_sample_weights:
            continue
        outputs = runs[runs["method"] == method]["output"]
        found = [run_weighting(inputs.students.get(o), inputs.histories.get(o)) for o in outputs]
        finals = np.array([f["final"] for f in found], dtype=float)
        finals = finals[~np.isnan(finals)]
        epochs = [f["over_epochs"] for f in found if not math.isnan(f["over_epochs"])]
        teachers = sorted({t for f in found for t in f["weights"]})
        rows.append({"method": method, "weighting": row_of_table.weighting, "runs": len(found),
                     "n": int(finals.size),
                     "entropy_relative": float(finals.mean()) if finals.size else math.nan,
                     "entropy_relative_min": float(finals.min()) if finals.size else math.nan,
                     "entropy_relative_max": float(finals.max()) if finals.size else math.nan,
                     "entropy_relative_epochs": float(np.mean(epochs)) if epochs else math.nan,
                     "weight_mean": {t: float(np.nanmean([f["weights"].get(t, math.nan) for f in found]))
                                     for t in teachers}})
    return pd.DataFrame(rows, columns=["method", "weighting", "runs", "n", "entropy_relative",
                                       "entropy_relative_min", "entropy_relative_max",
                                       "entropy_relative_epochs", "weight_mean"])


def method_values(methods: Sequence[str], inputs: Inputs, params: Params) -> list[dict[str, Any]]:
    """Per method: the values its ablation students trained with and where they came from
    (methods/<method>.json, i.e. tuned or shared; else params.distill, flagged as a fallback)."""
    rows = []
    for method in methods:
        record = inputs.method_inputs.get(method)
        if record is not None:
            values = {k.removeprefix("distill."): v for k, v in (record.get("values") or {}).items()}
            recipe = {k.removeprefix("distill.recipe."): v for k, v in (record.get("recipe") or {}).items()}
            tuned = record.get("tuned")
            if tuned:
                source = f"tuned ({tuned.get('trials', '?')} trials, from {tuned.get('from', '?')})"
            else:
                source = "shared distill.* values"
            fallback = False
        else:
            row_of_table = method_table.METHODS.get(method)
            names = row_of_table.hyperparameters if row_of_table else ()
            values = {name: getattr(params.distill, name) for name in names}
            recipe = params.distill.recipe.model_dump(mode="json")
            source = (f"params.yaml distill.* (fallback: {method_inputs_path(method)} missing"
                      + ("; ablation.tuned is true, so the runs may have used tuned values" if params.ablation.tuned
                         else "") + ")")
            tuned, fallback = None, True
        rows.append({"method": method, "source": source, "tuned": bool(tuned), "fallback": fallback,
                     "values": values, "recipe": recipe})
    return rows


def corruption_frame(evals: Mapping[str, Mapping], models: Sequence[str]) -> pd.DataFrame:
    """Rows = corruptions (15 standard, their mean, the 4 extras, the 19-mean), columns =
    models; accuracy averaged over severities 1-5 (NaN where a corruption is absent)."""
    data: dict[str, list[float]] = {}
    index = [*STANDARD_CORRUPTIONS, "mean (15 standard)", *EXTRA_CORRUPTIONS, "mean (all 19)"]
    for model in models:
        c = (evals.get(model) or {}).get("cifar10c") or {}
        per = c.get("per_corruption") or {}
        column = [_num(per.get(n)) for n in STANDARD_CORRUPTIONS] + [_num(c.get("standard_mean"))]
        column += [_num(per.get(n)) for n in EXTRA_CORRUPTIONS] + [_num(c.get("all_mean"))]
        data[model] = column
    return pd.DataFrame(data, index=pd.Index(index, name="corruption"))


def severity_frame(evals: Mapping[str, Mapping], models: Sequence[str], kind: str = "standard") -> pd.DataFrame:
    """Rows = clean, severity 1..5 (mean over the standard corruptions, or all with
    kind='all'); columns = models."""
    data = {}
    for model in models:
        e = evals.get(model) or {}
        per = (e.get("cifar10c") or {}).get(f"per_severity_{kind}") or [None] * 5
        data[model] = [_num(e.get("test_acc"))] + [_num(v) for v in per]
    return pd.DataFrame(data, index=pd.Index(["clean", "1", "2", "3", "4", "5"], name="severity"))


def histogram_mean_weights(entries: Sequence[Mapping]) -> pd.DataFrame:
    """Mean teacher weight per epoch from per-epoch histograms ({epoch, bins, counts:
    {teacher: [..]}}) of weights in [0,1], each sample placed at its bin centre."""
    rows = []
    for entry in entries:
        bins = int(entry["bins"])
        centres = (np.arange(bins) + 0.5) / bins
        row: dict[str, float] = {"epoch": int(entry["epoch"])}
        for teacher, counts in entry["counts"].items():
            counts = np.asarray(counts, dtype=float)
            row[teacher] = float((counts * centres).sum() / counts.sum()) if counts.sum() else math.nan
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).set_index("epoch").sort_index()


def weight_evolution(history: pd.DataFrame | None, histograms: Sequence[Mapping] | None
                     ) -> tuple[pd.DataFrame, str] | None:
    """Mean weight per teacher per epoch: exact from the history's train_weight_mean/<teacher>
    columns, else approximated from the histograms; None when neither has it."""
    if history is not None and "epoch" in history:
        columns = [c for c in history.columns if str(c).startswith("train_weight_mean/")]
        if columns:
            frame = history.set_index("epoch")[columns]
            frame.columns = [c.removeprefix("train_weight_mean/") for c in columns]
            return frame, "per-epoch training means"
    if histograms:
        frame = histogram_mean_weights(histograms)
        if not frame.empty:
            return frame, "histogram bin centres (approximate)"
    return None


# --------------------------------------------------------------------------------------
# Overlay plot data (long format: one series per method, the mean over its ablation seeds)


def epoch_overlay(runs: pd.DataFrame, histories: Mapping[str, pd.DataFrame], column: str) -> pd.DataFrame:
    """(epoch, series, <column>): per method (table order), the per-epoch mean of `column` over
    its ablation runs' histories that have it."""
    parts = []
    for method in method_order(runs["method"]):
        frames = [histories[o][["epoch", column]] for o in runs[runs["method"] == method]["output"]
                  if o in histories and {"epoch", column} <= set(histories[o].columns)]
        if not frames:
            continue
        mean = pd.concat(frames).apply(pd.to_numeric, errors="coerce").groupby("epoch", as_index=False)[column].mean()
        parts.append(mean.assign(series=method)[["epoch", "series", column]])
    if not parts:
        return pd.DataFrame(columns=["epoch", "series", column])
    out = pd.concat(parts, ignore_index=True)
    out["epoch"] = out["epoch"].astype(int)
    return out


def weight_overlay(runs: pd.DataFrame, inputs: Inputs) -> tuple[pd.DataFrame, set[str]]:
    """(epoch, series = <method>/<teacher>, weight): mean teacher weight per epoch, averaged
    over each weighting method's ablation runs; and the sources used (exact / histograms)."""
    parts, sources = [], set()
    for method in method_order(runs["method"]):
        row_of_table = method_table.METHODS.get(method)
        if row_of_table is None or not row_of_table.per_sample_weights:
            continue
        frames = []
        for output in runs[runs["method"] == method]["output"]:
            found = weight_evolution(inputs.histories.get(output), inputs.histograms.get(output))
            if found is not None:
                frames.append(found[0])
                sources.add(found[1])
        if not frames:
            continue
        mean = pd.concat(frames).groupby(level=0).mean()
        for teacher in mean.columns:
            parts.append(pd.DataFrame({"epoch": mean.index.astype(int), "series": f"{method}/{teacher}",
                                       "weight": mean[teacher].to_numpy(dtype=float)}))
    if not parts:
        return pd.DataFrame(columns=["epoch", "series", "weight"]), sources
    return pd.concat(parts, ignore_index=True), sources


def corruption_overlay(runs: pd.DataFrame, evals: Mapping[str, Mapping]) -> pd.DataFrame:
    """(corruption, series, accuracy): per method (table order), each corruption's accuracy
    (mean over severities 1-5) averaged over the method's evaluated ablation runs."""
    rows = []
    corruptions = [*STANDARD_CORRUPTIONS, *EXTRA_CORRUPTIONS]
    for method in method_order(runs["method"]):
        models = [m for m in runs[runs["method"] == method]["model"] if m in evals]
        if not models:
            continue
        per = corruption_frame(evals, models).loc[corruptions].mean(axis=1, skipna=True)
        rows += [{"corruption": c, "series": method, "accuracy": float(per[c])} for c in corruptions
                 if not math.isnan(per[c])]
    return pd.DataFrame(rows, columns=["corruption", "series", "accuracy"])


# --------------------------------------------------------------------------------------
# Rendering helpers


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _isnan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(value: Any, digits: int = 2, signed: bool = False) -> str:
    x = _num(value)
    return "–" if math.isnan(x) else f"{100 * x:{'+' if signed else ''}.{digits}f}"


def _count(value: Any) -> str:
    x = _num(value)
    return "–" if math.isnan(x) else f"{x / 1e6:.2f}M"


def _plain(value: Any, digits: int = 2) -> str:
    x = _num(value)
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def _value(value: Any) -> str:
    """A params value as params.yaml writes it (0.1, true, null)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed and pipes escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _display(row: Mapping) -> str:
    if row["kind"] == "teacher":
        return str(row["model"])
    detail = [str(row["method"])] if isinstance(row.get("method"), str) else []
    if not _isnan(row.get("seed")):
        detail.append(f"seed {int(row['seed'])}")
    return f"{row['model']} ({', '.join(detail)})" if detail else str(row["model"])


def _per_seed(per_seed: Mapping[int, float]) -> str:
    return ", ".join(f"{s}: {100 * v:+.2f}" for s, v in per_seed.items()) or "–"


@dataclass
class Labels:
    dataset: str
    corruption: str
    profile: str
    notes: list[str]

    def heading(self) -> str:
        return f"{self.dataset}; {self.corruption}; profile `{self.profile}`"


def data_labels(inputs: Inputs, params: Params) -> Labels:
    """The data labels every table heading carries, taken from metrics/eval."""
    notes: list[str] = []
    evals = list(inputs.evals.values())

    def unique(key: str) -> list[str]:
        return sorted({str(e.get(key)) for e in evals if e.get(key) is not None})

    datasets, corruptions, profiles = unique("dataset"), unique("corruption_dataset"), unique("profile")
    if len(datasets) > 1 or len(corruptions) > 1:
        notes.append("models were evaluated on different data: " + "; ".join(datasets + corruptions))
    stale = sorted(e.get("model", "?") for e in evals if e.get("cifar10c_matches_prepared") is False)
    if stale:
        notes.append(f"CIFAR-10-C was built from other prepared data than the test set of {', '.join(stale)}; "
                     "rerun `dvc repro corrupt evaluate`")
    skipped: dict[str, str] = {}
    for e in evals:
        skipped.update(e.get("cifar10c_skipped") or {})
    dataset = " + ".join(datasets) or "dataset unknown (metrics/eval missing)"
    corruption = " + ".join(corruptions) or "CIFAR-10-C not evaluated"
    if skipped:
        corruption += ", " + ", ".join(sorted(skipped)) + " skipped"
    profile = " + ".join(profiles) or params.profile
    if profiles and profiles != [params.profile]:
        notes.append(f"params.yaml now says profile `{params.profile}` but metrics/eval were produced under "
                     f"`{profile}`; rerun `dvc repro` to refresh them")
    return Labels(dataset, corruption, profile, notes)


def _c15_cell(row: Mapping) -> str:
    text = _pct(row["c_mean15"])
    complete = row.get("c_mean15_complete")
    if text != "–" and not _isnan(complete) and not bool(complete):
        text += "*"   # mean over fewer than the 15 standard corruptions
    return text


# --------------------------------------------------------------------------------------
# Figures (legends outside the axes; constrained layout keeps titles off the labels)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float, height: float, ncols: int = 1, **kwargs):
    plt = _pyplot()
    return plt.subplots(1, ncols, figsize=(width, height), dpi=100, layout="constrained", squeeze=False, **kwargs)


def _title(fig, text: str) -> None:
    # Headings carry markdown backticks; a figure shows plain text.
    fig.suptitle(textwrap.fill(text.replace("`", ""), int(15 * fig.get_figwidth())), fontsize=9)


def _marker(points: int) -> dict[str, Any]:
    """Dots on short curves only: on long ones they hide the line."""
    return {"marker": "o", "markersize": 3} if points <= 15 else {}


def _legend_outside(ax, **kwargs) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=7, frameon=False, **kwargs)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png")
    plt.close(fig)


def _colours(names: Sequence[str]) -> dict[str, Any]:
    """One colour per method, fixed by its place in the method table (stable across figures)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    known = list(method_table.METHODS)
    return {n: cmap((known.index(n) if n in known else len(known) + i) % 10) for i, n in enumerate(names)}


def methods_figure(runs: pd.DataFrame, title: str, path: Path) -> None:
    """Two panels (CIFAR-10 test accuracy, CIFAR-10-C 15-corruption mean): per method (table
    order) one dot per seed, the mean as a bar marker and its 95% t-interval as an error bar."""
    methods = method_order(runs["method"])
    colours = _colours(methods)
    fig, axes = _figure(max(6.0, 1.6 + 1.1 * len(methods)), 3.8, ncols=2)
    for ax, (metric, label) in zip(axes[0], (("test_acc", "CIFAR-10 test accuracy (%)"),
                                             ("c_mean15", "CIFAR-10-C mean, 15 standard (%)"))):
        for x, method in enumerate(methods):
            group = runs[runs["method"] == method]
            values = 100 * pd.to_numeric(group[metric], errors="coerce").to_numpy(dtype=float)
            ok = ~np.isnan(values)
            if not ok.any():
                continue
            offsets = np.linspace(-0.15, 0.15, int(ok.sum())) if ok.sum() > 1 else np.zeros(1)
            ax.scatter(x + offsets, values[ok], s=14, color=colours[method], alpha=0.7, zorder=3,
                       label="one seed" if x == 0 else None)
            iv = t_interval(values[ok] / 100)
            ax.hlines(100 * iv.mean, x - 0.3, x + 0.3, color="black", linewidth=1.5, zorder=4,
                      label="mean" if x == 0 else None)
            if iv.has_interval:
                ax.errorbar(x + 0.33, 100 * iv.mean, yerr=100 * iv.half_width, fmt="none", ecolor="black",
                            capsize=3, linewidth=1, zorder=4, label="95% t-interval" if x == 0 else None)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.6, len(methods) - 0.4)
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    _title(fig, title)
    _save(fig, path)


def corruption_heatmap(frame: pd.DataFrame, title: str, path: Path) -> None:
    """Rows = series (methods, then teachers), columns = corruptions; accuracy (%) in each cell."""
    values = 100 * frame.to_numpy(dtype=float)
    fig, axes = _figure(max(7.0, 0.42 * frame.shape[1] + 2.5), 0.32 * frame.shape[0] + 2.0)
    ax = axes[0, 0]
    finite = values[np.isfinite(values)]
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto",
                      vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 100)
    middle = (finite.min() + finite.max()) / 2 if finite.size else 50
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                    color="black" if v > middle else "white")
    ax.set_xticks(range(frame.shape[1]), frame.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(frame.shape[0]), frame.index, fontsize=7)
    # Separate the benchmark's 15 corruptions from the extras, and methods from teachers.
    extras = [j for j, c in enumerate(frame.columns) if c in EXTRA_CORRUPTIONS]
    if extras and extras[0] > 0:
        ax.axvline(extras[0] - 0.5, color="white", linewidth=2)
    teachers = [i for i, name in enumerate(frame.index) if str(name).startswith("teacher ")]
    if teachers and teachers[0] > 0:
        ax.axhline(teachers[0] - 0.5, color="white", linewidth=2)
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    _title(fig, title)
    _save(fig, path)


def lines_figure(frame: pd.DataFrame, xlabel: str, ylabel: str, title: str, path: Path, scale: float = 100.0,
                 reference: float | None = None) -> None:
    """One line per column of `frame` over its (ordered) index; legend outside the axes. Methods
    keep their table colour; other series (teachers) are grey shades, dashed."""
    fig, axes = _figure(6.5, 3.6)
    ax = axes[0, 0]
    colours = _colours([c for c in frame.columns if c in method_table.METHODS])
    others = [c for c in frame.columns if c not in colours]
    for column in frame.columns:
        series = pd.to_numeric(frame[column], errors="coerce")
        style = ({"color": colours[column]} if column in colours else
                 {"color": str(0.2 + 0.5 * others.index(column) / max(len(others), 1)), "linestyle": "--"})
        ax.plot(range(len(frame.index)), scale * series.to_numpy(dtype=float), linewidth=1.2, label=str(column),
                **_marker(len(frame.index)), **style)
    if reference is not None:
        ax.axhline(scale * reference, color="grey", linestyle="--", linewidth=1, label="equal weights")
    step = max(1, len(frame.index) // 12)
    ax.set_xticks(range(0, len(frame.index), step), [str(i) for i in frame.index[::step]], fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    _title(fig, title)
    _save(fig, path)


def weights_figure(overlay: pd.DataFrame, title: str, path: Path) -> None:
    """One panel per teacher: mean weight per epoch, one line per weighting method, the equal
    weight 1/K dashed."""
    teachers = list(dict.fromkeys(s.split("/", 1)[1] for s in overlay["series"]))   # as the histories list them
    methods = method_order({s.split("/", 1)[0] for s in overlay["series"]})
    colours = _colours(methods)
    fig, axes = _figure(max(6.5, 2.6 * len(teachers) + 1.6), 3.2, ncols=len(teachers), sharey=True)
    for ax, teacher in zip(axes[0], teachers):
        for method in methods:
            part = overlay[overlay["series"] == f"{method}/{teacher}"].sort_values("epoch")
            if len(part):
                ax.plot(part["epoch"], part["weight"], linewidth=1.2, color=colours[method], label=method,
                        **_marker(len(part)))
        ax.axhline(1 / len(teachers), color="grey", linestyle="--", linewidth=1, label="equal weights (1/K)")
        ax.set_title(teacher, fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, 0].set_ylabel("mean teacher weight", fontsize=8)
    _legend_outside(axes[0, -1])
    _title(fig, title)
    _save(fig, path)


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: Path) -> None:
    m = np.asarray(matrix)
    fig, axes = _figure(5.2, 4.8)
    ax = axes[0, 0]
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true")
    _title(fig, title)
    _save(fig, path)


# --------------------------------------------------------------------------------------
# The report


@dataclass
class _Doc:
    """results.md lines, results.csv rows and the MLflow headline metrics, built together."""

    md: list[str] = field(default_factory=list)
    long: list[dict] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)

    def number(self, table: str, model: str, metric: str, value: Any) -> None:
        self.long.append({"table": table, "model": model, "metric": metric, "value": _num(value)})


def build_report(inputs: Inputs, params: Params, out: Path) -> dict[str, Any]:
    """Write results.md, results.csv, figures/ and plots/ into `out`; return a summary
    (models, missing inputs, headline metrics for MLflow, labels, shortcuts, figures)."""
    figures, plots = out / "figures", out / "plots"
    figures.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    labels = data_labels(inputs, params)
    frame = model_frame(inputs, params)
    runs = ablation_runs(frame)
    cuts = shortcuts(params, [str(d) for d in frame["device"].dropna()] if "device" in frame else ())
    doc = _Doc()
    missing = list(inputs.problems) + labels.notes + _missing_inputs(inputs, params, frame)
    doc.md.append(f"# MATE-KD results ({labels.heading()})\n")
    _setup_section(doc, inputs, params, labels, cuts)
    summary_at = len(doc.md)
    _summary_section(doc, runs, inputs, labels, figures)
    _seed_table(doc, frame, labels)
    _ablation_section(doc, runs, inputs, params, labels)
    _robustness_sections(doc, frame, runs, inputs, labels, figures)
    _gradcam_section(doc, inputs, labels)
    _training_section(doc, runs, inputs, frame, labels, figures, plots)
    if missing:
        doc.md.insert(summary_at, "## Missing or inconsistent inputs\n\n" + "".join(f"- {m}\n" for m in missing))
    doc.md.append(_provenance(inputs, params, frame))
    write_text(out / "results.md", re.sub(r"\n{3,}", "\n\n", "\n".join(doc.md)).strip() + "\n")
    pd.DataFrame(doc.long, columns=["table", "model", "metric", "value"]).to_csv(out / "results.csv", index=False)
    for _, row in frame.iterrows():
        doc.headline[f"{row['model']}/test_acc"] = _num(row["test_acc"])
        doc.headline[f"{row['model']}/cifar10c_mean15"] = _num(row["c_mean15"])
    return {"models": frame["model"].tolist(), "missing": missing, "headline": doc.headline,
            "labels": labels.__dict__, "shortcuts": cuts, "figures": sorted(p.name for p in figures.glob("*.png"))}


def _setup_section(doc: _Doc, inputs: Inputs, params: Params, labels: Labels, cuts: list[str]) -> None:
    d, c = params.data, params.corrupt
    train = d.train_per_class if d.train_per_class is not None else CIFAR_PER_CLASS_TRAIN - d.val_per_class
    test = d.test_per_class if d.test_per_class is not None else CIFAR_PER_CLASS_TEST
    evaluated = sorted({int(e["test_images"]) for e in inputs.evals.values() if e.get("test_images") is not None})
    c_images = sorted({int(e["cifar10c_images_per_severity"]) for e in inputs.evals.values()
                       if e.get("cifar10c_images_per_severity") is not None})
    c_per_class = c.images_per_class if c.images_per_class is not None else test
    lines = [
        f"## Setup ({labels.heading()})\n",
        f"- Data: {labels.dataset}; training {CLASSES * train:,} images ({train:,} per class), validation "
        f"{CLASSES * d.val_per_class:,} ({d.val_per_class:,} per class), test {CLASSES * test:,} ({test:,} per class)"
        + (f"; evaluated on {', '.join(f'{n:,}' for n in evaluated)} test images" if evaluated else "") + ".",
        f"- CIFAR-10-C: {labels.corruption}; {CLASSES * c_per_class:,} images per corruption and severity "
        f"({c_per_class:,} per class)"
        + (f", {', '.join(f'{n:,}' for n in c_images)} evaluated" if c_images else "")
        + f"; corruptions: {'all 19' if c.corruptions is None else ', '.join(c.corruptions)}.",
        (f"- Profile: `{params.profile}`. Methods (table order): "
         f"{', '.join(method_order(params.ablation.methods))}; seeds {', '.join(map(str, params.ablation.seeds))}; "
         f"the method under test is `{REFERENCE_METHOD}`; the configured run `distill` uses "
         f"`{params.distill.method}`."),
        ("- Shortcuts compared with the paper setting (docs/method.md, Defaults: 200 epochs, batch 128, SGD lr 0.1 "
         "with Nesterov momentum 0.9, weight decay 5e-4, cosine schedule; 45,000/5,000/10,000 images; the full "
         "CIFAR-10-C):") + ("" if cuts else " none."),
    ]
    lines += [f"  - {cut}" for cut in cuts]
    doc.md.append("\n".join(lines) + "\n")
    changing = [cut for cut in cuts if "(exact" not in cut]
    if changing:
        doc.md.append(f"> Profile `{params.profile}` departs from the paper setting in {len(changing)} way(s) that "
                      "change the result (listed above): compare methods with each other here, not these numbers "
                      "with the paper's.\n")


def _summary_section(doc: _Doc, runs: pd.DataFrame, inputs: Inputs, labels: Labels, figures: Path) -> None:
    doc.md.append(f"## Summary: does {REFERENCE_METHOD} beat the baselines? ({labels.heading()})\n")
    if runs.empty:
        doc.md.append("_No ablation runs (metrics/student/<method>-seed<k>.json): run `dvc repro` (stages "
                      "ablation@<method>-<seed>) or `matekd ablation`._\n")
        return
    methods_figure(runs, f"Accuracy per method: one dot per seed, mean (bar) and 95% t-interval ({labels.heading()})",
                   figures / "methods-accuracy.png")
    doc.md.append("Each method's CIFAR-10 test accuracy and CIFAR-10-C 15-corruption mean: one dot per seed, the "
                  f"mean as a bar, the 95% t-interval over seeds as an error bar (from {MIN_SEEDS_FOR_INTERVAL} "
                  "seeds on).\n\n![methods-accuracy](figures/methods-accuracy.png)\n")
    doc.md.append(f"### Paired difference {REFERENCE_METHOD} − baseline over common seeds ({labels.heading()})\n")
    if REFERENCE_METHOD not in set(runs["method"]):
        doc.md.append(f"_No {REFERENCE_METHOD} ablation run: nothing to pair._\n")
    else:
        acc, rob = paired_differences(runs, "test_acc"), paired_differences(runs, "c_mean15")
        merged = acc.merge(rob, on="baseline", how="left", suffixes=("_acc", "_c"))
        rows = []
        for r in merged.itertuples():
            rows.append([r.baseline, r.n_acc, r.seeds_acc or "–", _pct(r.mean_acc, signed=True),
                         format_interval(r.interval_acc, signed=True), _per_seed(r.per_seed_acc),
                         _pct(r.mean_c, signed=True),
                         format_interval(r.interval_c, signed=True) if isinstance(r.interval_c, Interval) else "–",
                         _per_seed(r.per_seed_c) if isinstance(r.per_seed_c, dict) else "–"])
        doc.md.append(markdown_table(
            ["baseline", "pairs", "common seeds", "Δ CIFAR-10 (pp)", "95% CI (pp)", "Δ per seed (pp)",
             "Δ CIFAR-10-C-15 (pp)", "95% CI (pp)", "Δ per seed (pp)"], rows))
        doc.md.append(f"\nPositive: {REFERENCE_METHOD} is better. pp = percentage points. The 95% interval is "
                      "mean ± t(0.975, n−1) · sd / √n over the per-seed differences (Student t, n−1 degrees of "
                      f"freedom); an interval that excludes 0 is a difference these seeds resolve. With fewer than "
                      f"{MIN_SEEDS_FOR_INTERVAL} common seeds: {NO_INTERVAL}.\n")
        for name, table in (("test_acc", acc), ("cifar10c_mean15", rob)):
            for r in table.itertuples():
                model = f"{REFERENCE_METHOD}-{r.baseline}"
                for stat in ("mean", "sd", "half", "low", "high", "n"):
                    doc.number("ablation_paired", model, f"{name}_diff_{stat}", getattr(r, stat))
                for seed, value in r.per_seed.items():
                    doc.number("ablation_paired", model, f"{name}_diff/seed{seed}", value)
                doc.headline[f"paired/{model}/{name}_diff_mean"] = _num(r.mean)
                if r.interval.has_interval:
                    doc.headline[f"paired/{model}/{name}_diff_half"] = r.half
    _weighting_table(doc, runs, inputs, labels)


def _weighting_table(doc: _Doc, runs: pd.DataFrame, inputs: Inputs, labels: Labels) -> None:
    doc.md.append(f"### Teacher weighting: how far the learned weights are from equal ({labels.heading()})\n")
    table = weighting_frame(runs, inputs)
    fixed = [f"`{m}` ({method_table.METHODS[m].weighting})" for m in method_order(runs["method"])
             if m in method_table.METHODS and not method_table.METHODS[m].per_sample_weights]
    if table.empty:
        doc.md.append("_No ablation run of a method with per-sample teacher weights._\n")
    else:
        rows = []
        for r in table.itertuples():
            spread = ("–" if math.isnan(r.entropy_relative_min)
                      else f"{r.entropy_relative_min:.3f}–{r.entropy_relative_max:.3f}")
            weights = ", ".join(f"{t} {w:.3f}" for t, w in r.weight_mean.items()) or "–"
            rows.append([r.method, r.weighting, r.runs, _plain(r.entropy_relative, 3), spread,
                         _plain(r.entropy_relative_epochs, 3), weights])
            doc.number("weighting", r.method, "entropy_relative", r.entropy_relative)
            doc.number("weighting", r.method, "entropy_relative_epochs", r.entropy_relative_epochs)
            doc.headline[f"weighting/{r.method}/entropy_relative"] = _num(r.entropy_relative)
            for teacher, weight in r.weight_mean.items():
                doc.number("weighting", r.method, f"weight_mean/{teacher}", weight)
        doc.md.append(markdown_table(
            ["method", "weighting", "runs", "entropy relative to uniform, last epoch (mean over seeds)",
             "range over seeds", "mean over all epochs", "mean weight per teacher, last epoch"], rows))
        doc.md.append("\nEntropy of each training sample's teacher weights divided by log K (K teachers), "
                      "averaged over the samples: 1 = equal weights for every sample (the weighting does nothing), "
                      "0 = one teacher takes each sample. Values near 1 mean the method is close to equal-weight "
                      "multi-teacher KD.\n")
    if fixed:
        doc.md.append("Fixed weights by construction (no entropy to measure): " + ", ".join(fixed) + ".\n")


def _seed_table(doc: _Doc, frame: pd.DataFrame, labels: Labels) -> None:
    doc.md.append(f"## 1. Seed's table: {labels.heading()}\n")
    rows = []
    for _, row in frame.iterrows():
        rows.append([_display(row), _pct(row["test_acc"]), _count(row["params"]), _plain(row["size_mb"]),
                     _c15_cell(row), _pct(row["c_mean19"])])
        for metric, name in (("test_acc", "test_acc"), ("params", "params"), ("size_mb", "size_mb"),
                             ("c_mean15", "cifar10c_mean15"), ("c_mean19", "cifar10c_mean19")):
            doc.number("seed", row["model"], name, row[metric])
    doc.md.append(markdown_table(["model", "CIFAR-10 acc. (%)", "parameters", "size (MB)",
                                  "CIFAR-10-C mean, 15 standard (%)", "CIFAR-10-C mean, all 19 (%)"], rows))
    incomplete = frame[frame["c_mean15_complete"].eq(False)]
    if len(incomplete):
        gaps = sorted({str(m) for m in incomplete["c_missing"].dropna()})
        doc.md.append(f"\n\\* mean over the available standard corruptions only (missing: {'; '.join(gaps)}); "
                      "not comparable with published 15-corruption means.\n")
    sources = sorted({s for s in frame["acc_source"].dropna()} - {"evaluate"})
    if sources:
        doc.md.append(f"\nSome accuracies come from {', '.join(sources)} (no metrics/eval file for those models): "
                      "the test accuracy measured at the end of training or copied by evaluate, without the "
                      "per-corruption detail.\n")
    doc.md.append("\nThe 19-corruption mean includes the 4 extra corruptions and is not comparable with "
                  "published 15-means. Sizes are fp32 parameters + BatchNorm statistics, in MB (10^6 bytes).\n")
    doc.md.append("\nFor reference, the paper claims (canonical CIFAR-10, official CIFAR-10-C, 200 epochs):\n\n")
    doc.md.append(markdown_table(["model", "CIFAR-10 (%)", "parameters", "size", "CIFAR-10-C average (%)"], CLAIMED))


def _ablation_section(doc: _Doc, runs: pd.DataFrame, inputs: Inputs, params: Params, labels: Labels) -> None:
    doc.md.append(f"\n## 2. Ablation: mean and 95% t-interval over seeds ({labels.heading()})\n")
    if runs.empty:
        doc.md.append("_No ablation runs (metrics/student/<method>-seed<k>.json) found: run `dvc repro`._\n")
    else:
        summary = ablation_summary(runs)
        doc.md.append(markdown_table(
            ["method", "n seeds", "seeds", "CIFAR-10 mean (%)", "95% CI (pp)", "CIFAR-10-C-15 mean (%)",
             "95% CI (pp)"],
            [[r.method, r.n, r.seeds, _pct(r.test_acc_mean), format_interval(r.test_acc_interval),
              _pct(r.c_mean15_mean), format_interval(r.c_mean15_interval)] for r in summary.itertuples()]))
        doc.md.append(f"\n95% CI: mean ± t(0.975, n−1) · sd / √n over the seeds, as (low to high); "
                      f"{NO_INTERVAL} below {MIN_SEEDS_FOR_INTERVAL} seeds.\n")
        for r in summary.itertuples():
            for metric, name in (("test_acc", "test_acc"), ("c_mean15", "cifar10c_mean15")):
                for stat in ("mean", "sd", "half", "low", "high", "n"):
                    doc.number("ablation", r.method, f"{name}_{stat}", getattr(r, f"{metric}_{stat}"))
                doc.headline[f"ablation/{r.method}/{name}_mean"] = _num(getattr(r, f"{metric}_mean"))
    methods = method_order({*params.ablation.methods, *runs["method"]})
    doc.md.append(f"\n### Values each method trained with ({labels.heading()})\n")
    values = method_values(methods, inputs, params)
    rows = []
    for v in values:
        own = "; ".join(f"{k} {_value(x)}" for k, x in v["values"].items()) or "– (no hyperparameters)"
        recipe = v["recipe"]
        rows.append([v["method"], v["source"], own, _value(recipe.get("lr", "–")),
                     _value(recipe.get("weight_decay", "–")), recipe.get("epochs", "–"), recipe.get("batch_size", "–")])
        for key, x in {**v["values"], **{f"recipe.{k}": y for k, y in recipe.items()}}.items():
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                doc.number("values", v["method"], key, x)
        doc.number("values", v["method"], "tuned", 1.0 if v["tuned"] else 0.0)
    doc.md.append(markdown_table(["method", "values from", "its hyperparameters", "lr", "weight decay", "epochs",
                                  "batch"], rows))
    doc.md.append("\nShared: the distill.* values of params.yaml, the same for every method. Tuned: the method's own "
                  "Optuna study (`matekd tune --method <m>`), used when ablation.tuned is true. The configured run "
                  "`distill` always trains with the shared values.\n")


def robustness_groups(frame: pd.DataFrame, runs: pd.DataFrame, evals: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """The columns of the robustness views and the evaluated models each averages: every method
    (its ablation seeds, table order), every other student (e.g. distill), every teacher."""
    groups: dict[str, list[str]] = {}
    for method in method_order(runs["method"]):
        models = [m for m in runs[runs["method"] == method]["model"] if m in evals]
        if models:
            groups[method] = models
    for model in frame[(frame["kind"] == "student") & ~frame["ablation"]]["model"]:
        if model in evals:
            groups[str(model)] = [model]
    for model in frame[frame["kind"] == "teacher"]["model"]:
        if model in evals:
            groups[f"teacher {model}"] = [model]
    return groups


def _grouped(table: pd.DataFrame, groups: Mapping[str, list[str]]) -> pd.DataFrame:
    """Per group, the mean of its models' columns (NaNs skipped)."""
    return pd.DataFrame({name: table[models].mean(axis=1, skipna=True) for name, models in groups.items()})


def _robustness_sections(doc: _Doc, frame: pd.DataFrame, runs: pd.DataFrame, inputs: Inputs, labels: Labels,
                         figures: Path) -> None:
    evaluated = [m for m in frame["model"] if m in inputs.evals]
    doc.md.append(f"\n## 3. Robustness per corruption: accuracy (%) averaged over severities 1-5 "
                  f"({labels.heading()})\n")
    if not evaluated:
        doc.md.append("_No metrics/eval files: run `dvc repro evaluate`._\n")
        return
    groups = robustness_groups(frame, runs, inputs.evals)
    sizes = {name: len(models) for name, models in groups.items()}
    header = [f"{name} (mean of {n})" if n > 1 else name for name, n in sizes.items()]
    per_model_c = corruption_frame(inputs.evals, evaluated)
    per_c = _grouped(per_model_c, groups)
    doc.md.append(markdown_table(["corruption", *header], [[i, *(_pct(v) for v in per_c.loc[i])] for i in per_c.index]))
    doc.md.append("\nMethods: mean over their ablation seeds (each model's numbers are in results.csv, table "
                  "`robustness`). – : corruption not evaluated. Extra corruptions (speckle_noise, gaussian_blur, "
                  "spatter, saturate) are outside the 15-corruption benchmark mean.\n")
    for model in evaluated:
        for corruption, accs in ((inputs.evals[model].get("cifar10c") or {}).get("accuracy") or {}).items():
            for s, a in enumerate(accs, start=1):
                doc.number("robustness", model, f"{corruption}/severity{s}", a)
    corruptions = [c for c in [*STANDARD_CORRUPTIONS, *EXTRA_CORRUPTIONS] if per_c.loc[c].notna().any()]
    if corruptions:
        corruption_heatmap(per_c.loc[corruptions].T, f"Accuracy (%) per corruption, mean over severities 1-5; methods: "
                                                     f"mean over ablation seeds ({labels.heading()})",
                           figures / "corruption-accuracy.png")
    doc.md.append(f"\n## 4. Robustness per severity: mean over the standard corruptions (%) ({labels.heading()})\n")
    per_model_s = severity_frame(inputs.evals, evaluated)
    per_s = _grouped(per_model_s, groups)
    doc.md.append(markdown_table(["severity", *header], [[i, *(_pct(v) for v in per_s.loc[i])] for i in per_s.index]))
    per_s_all = _grouped(severity_frame(inputs.evals, evaluated, "all"), groups)
    doc.md.append("\nMean over all evaluated corruptions (incl. the extras) per severity (%) "
                  f"({labels.heading()}):\n\n")
    doc.md.append(markdown_table(["severity", *header],
                                 [[i, *(_pct(v) for v in per_s_all.loc[i])] for i in per_s_all.index]))
    for model in evaluated:
        for i in per_model_s.index:
            doc.number("severity", model, "clean" if i == "clean" else f"severity{i}", per_model_s.loc[i, model])
    # Severity is ordered, so lines are right here.
    lines_figure(per_s, "severity", "accuracy (%)",
                 f"Accuracy per severity, mean over the standard corruptions; methods: mean over ablation seeds "
                 f"({labels.heading()})", figures / "severity-accuracy.png")


def _gradcam_section(doc: _Doc, inputs: Inputs, labels: Labels) -> None:
    doc.md.append(f"\n## 5. Grad-CAM agreement of students with teachers ({labels.heading()})\n")
    if not inputs.gradcam:
        doc.md.append("_No metrics/eval/gradcam-*.json: run `dvc repro evaluate`._\n")
        return
    rows = []
    for student, g in sorted(inputs.gradcam.items()):
        teachers = g.get("teachers", [])
        entropy = _num(g.get("weight_entropy"))
        relative = entropy / math.log(len(teachers)) if len(teachers) > 1 else math.nan
        for teacher in teachers:
            rows.append([student, teacher, _plain(g["similarity_mean"].get(teacher), 3),
                         _plain(g["similarity_std"].get(teacher), 3), _plain(g["weight_mean"].get(teacher), 3),
                         _pct(g["dominant_fraction"].get(teacher), 1), _plain(relative, 3)])
            for key in ("similarity_mean", "similarity_std", "weight_mean", "dominant_fraction"):
                doc.number("gradcam", student, f"{key}/{teacher}", g[key].get(teacher))
        doc.number("gradcam", student, "weight_entropy_relative", relative)
    any_g = next(iter(inputs.gradcam.values()))
    doc.md.append(f"\n{any_g.get('images')} test images (classes interleaved), Grad-CAM of the true class; "
                  f"similarity `{any_g.get('similarity')}`, weights softmax(sim / {any_g.get('tau')}); weight entropy "
                  "relative to uniform as in the summary (1 = equal weights).\n\n")
    doc.md.append(markdown_table(["student", "teacher", "similarity mean", "similarity std", "weight mean",
                                  "dominant (% of images)", "weight entropy / log K"], rows))


def _training_section(doc: _Doc, runs: pd.DataFrame, inputs: Inputs, frame: pd.DataFrame, labels: Labels,
                      figures: Path, plots: Path) -> None:
    doc.md.append(f"\n## 6. Training curves and figures ({labels.heading()})\n")
    lines: list[str] = []
    overlays = {"val_acc": epoch_overlay(runs, inputs.histories, "val_acc"),
                "train_loss": epoch_overlay(runs, inputs.histories, "train_loss")}
    weights, weight_sources = weight_overlay(runs, inputs)
    overlays["teacher_weights"] = weights
    overlays["corruption_accuracy"] = corruption_overlay(runs, inputs.evals)
    for name, frame_ in overlays.items():
        x, y = OVERLAYS[name]
        frame_[[x, "series", y]].to_csv(plots / f"{name}.csv", index=False)
    for name, ylabel, caption, scale in (
            ("val_acc", "validation accuracy (%)", "Validation accuracy per epoch", 100.0),
            ("train_loss", "training loss", ("Training loss per epoch (each method's own total loss: its terms "
                                             "differ, so compare shapes, not levels)"), 1.0)):
        data = overlays[name]
        if data.empty:
            continue
        wide = data.pivot(index="epoch", columns="series", values=name)[method_order(data["series"])]
        lines_figure(wide, "epoch", ylabel, f"{caption.split(' (')[0]}; mean over ablation seeds ({labels.heading()})",
                     figures / f"{name.replace('_', '-')}.png", scale=scale)
        lines.append(f"{caption}, mean over each method's ablation seeds ({labels.dataset}; profile "
                     f"`{labels.profile}`):\n\n![{name}](figures/{name.replace('_', '-')}.png)\n")
    if not weights.empty:
        weights_figure(weights, f"Mean teacher weight per epoch; mean over ablation seeds ({labels.heading()})",
                       figures / "teacher-weights.png")
        lines.append("Teacher-weight evolution per teacher, one line per weighting method "
                     f"({', '.join(sorted(weight_sources))}; training images of {labels.dataset}):\n\n"
                     "![teacher-weights](figures/teacher-weights.png)\n")
    for name, caption in (("corruption-accuracy", "Accuracy per corruption (methods: mean over ablation seeds)"),
                          ("severity-accuracy", "Accuracy per severity")):
        if (figures / f"{name}.png").exists():
            lines.append(f"{caption} ({labels.corruption}, profile `{labels.profile}`):\n\n"
                         f"![{name}](figures/{name}.png)\n")
    pick = _confusion_model(inputs, frame)
    if pick is not None:
        e = inputs.evals[pick]
        names = e.get("class_names") or [str(i) for i in range(len(e["confusion_matrix"]))]
        confusion_figure(e["confusion_matrix"], names, f"{pick}: confusion matrix, {e.get('dataset')} test set",
                         figures / f"confusion-{pick}.png")
        lines.append(f"Confusion matrix of {pick} (rows true, columns predicted; {labels.dataset}, "
                     f"profile `{labels.profile}`):\n\n![confusion](figures/confusion-{pick}.png)\n")
    for student, path in sorted(inputs.gradcam_png.items()):
        shutil.copyfile(path, figures / f"gradcam-{student}.png")
        lines.append(f"Grad-CAM of {student} vs the teachers (first rows of the analysed test images; "
                     f"{labels.dataset}):\n\n![gradcam-{student}](figures/gradcam-{student}.png)\n")
    doc.md += lines or ["_No figures: no evaluation or training plots found._\n"]
    doc.md.append("\nOverlay data for `dvc plots` (one series per method, mean over its ablation seeds): "
                  + ", ".join(f"`plots/{name}.csv` ({', '.join((OVERLAYS[name][0], 'series', OVERLAYS[name][1]))})"
                              for name in OVERLAYS) + ".\n")


def _confusion_model(inputs: Inputs, frame: pd.DataFrame) -> str | None:
    students = [m for m in frame[frame["kind"] == "student"]["model"] if m in inputs.evals]
    pick = f"student-{DISTILL_OUTPUT}" if f"student-{DISTILL_OUTPUT}" in students else None
    if pick is None and students:
        pick = max(students, key=lambda m: _num(inputs.evals[m].get("test_acc")))
    if pick is None and inputs.evals:
        pick = max(inputs.evals, key=lambda m: _num(inputs.evals[m].get("test_acc")))
    return pick if pick is not None and inputs.evals[pick].get("confusion_matrix") else None


def _missing_inputs(inputs: Inputs, params: Params, frame: pd.DataFrame) -> list[str]:
    out = []
    for name in params.teachers:
        if name not in inputs.teachers:
            out.append(f"metrics/teachers/{name}.json is missing: run `dvc repro train_teacher@{name}`")
        if name not in inputs.evals:
            out.append(f"metrics/eval/{name}.json is missing: run `dvc repro evaluate`")
    if not inputs.students:
        out.append("no metrics/student/*.json: run `dvc repro` (stages distill and ablation@<method>-<seed>)")
    for output in sorted(inputs.students):
        if f"student-{output}" not in inputs.evals:
            out.append(f"metrics/eval/student-{output}.json is missing: run `dvc repro evaluate`")
    expected = {f"{m}-seed{s}" for m in params.ablation.methods for s in params.ablation.seeds}
    absent = sorted(expected - set(inputs.students))
    if absent:
        out.append(f"ablation runs missing ({len(absent)} of {len(expected)}): {', '.join(absent)}; "
                   "run `dvc repro` (or `matekd ablation`)")
    for method in method_order(params.ablation.methods):
        if method not in inputs.method_inputs:
            out.append(f"{method_inputs_path(method)} is missing: its values are shown from params.yaml; "
                       f"run `dvc repro method_inputs@{method}`")
        elif bool(inputs.method_inputs[method].get("tuned")) != params.ablation.tuned:
            out.append(f"{method_inputs_path(method)} says tuned = {bool(inputs.method_inputs[method].get('tuned'))} "
                       f"but params.yaml has ablation.tuned: {str(params.ablation.tuned).lower()}; run `dvc repro`")
    distill = frame[frame["output"] == DISTILL_OUTPUT]
    if len(distill) and distill["method_source"].iloc[0] == "params.distill.method":
        out.append("the method of student-distill comes from params.distill.method (models/student/"
                   "distill.safetensors and metrics/eval hold none)")
    return out


def _provenance(inputs: Inputs, params: Params, frame: pd.DataFrame) -> str:
    from .tracking import git_state

    def unique(values: Iterable[Any]) -> list[str]:
        return sorted({str(v) for v in values if v not in (None, "") and not _isnan(v)})

    everything = [*inputs.teachers.values(), *inputs.students.values(), *inputs.evals.values()]
    data_hashes = unique(e.get("dataset_sha256") for e in everything)
    data_hashes += unique(m.get("dataset_sha256") for m in inputs.student_meta.values() if
                          m.get("dataset_sha256") not in data_hashes)
    c_hashes = unique(e.get("cifar10c_manifest_sha256") for e in inputs.evals.values())
    eval_digests = unique(e.get("params_sha256") for e in inputs.evals.values())
    devices = unique(frame["device"])
    git = git_state()
    lines = ["\n## How these numbers were obtained\n",
             "Commands (from the project root):\n",
             "```",
             "dvc repro                      # the whole pipeline: prepare, train_teacher@<t>, cache@<t>,",
             "                               #   method_inputs@<m>, distill, ablation@<m>-<seed>, corrupt,",
             "                               #   evaluate, report",
             "matekd ablation --devices cuda:0,cuda:1   # every ablation student at once, over the GPUs",
             "matekd tune --method mate_kd   # one Optuna study per method -> tuning/best/<method>.yaml",
             "dvc exp run -S ablation.tuned=true          # the ablation with each method's tuned values",
             "dvc exp run -S 'ablation.seeds=[0,1,2,3,4]' # more seeds: narrower intervals",
             "cp profiles/paper.yaml params.yaml && dvc repro   # the paper-scale setting",
             "matekd report                  # this report only",
             "```\n",
             f"- profile: `{params.profile}`; params digest (validated params): `{params.digest()}`",
             f"- params digest recorded by evaluate: {', '.join(f'`{d}`' for d in eval_digests) or 'unknown'}"
             + (" (differs from the current params: rerun `dvc repro`)"
                if eval_digests and eval_digests != [params.digest()] else ""),
             f"- prepared data (manifest sha256): {', '.join(f'`{h}`' for h in data_hashes) or 'unknown'}",
             f"- CIFAR-10-C manifest sha256: {', '.join(f'`{h}`' for h in c_hashes) or 'unknown'}",
             f"- device(s) of evaluate: {', '.join(devices) or 'unknown'}",
             f"- git commit: `{git['git_commit']}`"
             + (f" (uncommitted changes: {git['git_dirty']})" if git["git_commit"] != "unknown" else ""),
             ("- accuracies: top-1 on the prepared test split; CIFAR-10-C accuracies per corruption x severity "
              "on the corrupt stage's images; all runs tracked in MLflow (experiment "
              f"`{params.tracking.experiment}`, this report in the run named `report`)."),
             ("- results.csv holds every number above in long format (table, model, metric, value; accuracies "
              "as fractions); plots/*.csv hold the overlay data for `dvc plots show`.\n")]
    return "\n".join(lines)
