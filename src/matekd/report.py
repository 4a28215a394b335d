"""Stage report: tables and figures from the metric files only (no model is loaded).

Reads metrics/teachers/*.json, metrics/student/*.json, metrics/eval/*.json and
plots/student/*.csv / *-weights.json; writes reports/results.md, reports/results.csv (long
format: table, model, metric, value; accuracies as fractions) and reports/figures/*.png. The
reports/ folder is rebuilt in a temporary sibling and swapped in at the end. Missing inputs
are listed in the report; only a project with no results at all is an error.
"""

from __future__ import annotations

import math
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import MatekdError
from .evaluate import EXTRA_CORRUPTIONS, STANDARD_CORRUPTIONS
from .storage import atomic_dir
from .params import METHODS, Params
from .storage import read_json, write_text

REFERENCE_METHOD = "mate_kd"
ABLATION_NAME = re.compile(r"^(?P<method>" + "|".join(sorted(METHODS, key=len, reverse=True))
                           + r")-seed(?P<seed>\d+)$")
# method.md: the numbers the paper claims (CIFAR-10 %, CIFAR-10-C average %).
CLAIMED = [("ResNet110", 93.5, "1.7M", "6.8MB", 74.05), ("DenseNet121", 94.2, "7.0M", "28MB", 75.89),
           ("VGG19", 93.8, "20M", "80MB", 73.47), ("Student ResNet20 (MATE-KD)", 90.22, "0.27M", "1.1MB", 68.51)]

__all__ = ["Inputs", "load_inputs", "model_frame", "ablation_summary", "paired_differences",
           "corruption_frame", "severity_frame", "histogram_mean_weights", "weight_evolution",
           "markdown_table", "run_report"]


# --------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    """Everything the report reads, keyed by model name (teacher `<name>`, student
    `student-<output>`) or by student output name for plots."""

    teachers: dict[str, dict] = field(default_factory=dict)
    students: dict[str, dict] = field(default_factory=dict)      # key: output name
    evals: dict[str, dict] = field(default_factory=dict)         # key: model name
    gradcam: dict[str, dict] = field(default_factory=dict)       # key: student model name
    gradcam_png: dict[str, Path] = field(default_factory=dict)
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)   # key: output name
    histograms: dict[str, list] = field(default_factory=dict)          # key: output name
    problems: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.teachers or self.students or self.evals)


def _read(path: Path, problems: list[str]) -> Any:
    try:
        return read_json(path)
    except MatekdError as exc:
        problems.append(f"unreadable: {exc}")
        return None


def load_inputs(root: Path = Path(".")) -> Inputs:
    """Read every metric/plot file; unreadable files become entries of `problems`."""
    found = Inputs()
    for path in sorted((root / "metrics" / "teachers").glob("*.json")):
        if (entry := _read(path, found.problems)) is not None:
            found.teachers[path.stem] = entry
    for path in sorted((root / "metrics" / "student").glob("*.json")):
        if (entry := _read(path, found.problems)) is not None:
            found.students[path.stem] = entry
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
    for path in sorted((root / "plots" / "student").glob("*.csv")):
        try:
            found.histories[path.stem] = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            found.problems.append(f"unreadable: {path} ({exc})")
    for path in sorted((root / "plots" / "student").glob("*-weights.json")):
        if (entry := _read(path, found.problems)) is not None:
            found.histograms[path.name.removesuffix("-weights.json")] = entry
    return found


# --------------------------------------------------------------------------------------
# Tables (pure functions on dicts / DataFrames)


def model_frame(inputs: Inputs, teacher_order: Sequence[str] = ()) -> pd.DataFrame:
    """One row per model: kind, output, method, seed, test_acc, params, size_mb, CIFAR-10-C
    means. Accuracy and sizes come from metrics/eval when present, else from the training
    metrics (column acc_source says which)."""
    rows: list[dict] = []
    teachers = [t for t in teacher_order if t in inputs.teachers or t in inputs.evals]
    teachers += sorted(set(inputs.teachers) - set(teachers))
    teachers += sorted(name for name, e in inputs.evals.items()
                       if e.get("kind") == "teacher" and name not in teachers)
    for name in teachers:
        rows.append(_row(name, "teacher", inputs.teachers.get(name, {}), inputs.evals.get(name)))
    outputs = set(inputs.students)
    outputs |= {e.get("output") or n.removeprefix("student-") for n, e in inputs.evals.items()
                if e.get("kind") == "student" or n.startswith("student-")}
    for output in outputs:
        train = inputs.students.get(output, {})
        row = _row(f"student-{output}", "student", train, inputs.evals.get(f"student-{output}"))
        row["output"] = output
        match = ABLATION_NAME.match(output)
        row["ablation"] = bool(match)
        if row.get("method") is None and match:
            row["method"] = match["method"]
        if row.get("seed") is None and match:
            row["seed"] = int(match["seed"])
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["model", "kind", "output", "method", "seed", "ablation", "test_acc",
                                        "acc_source", "params", "size_mb", "c_mean15", "c_mean15_complete",
                                        "c_missing", "c_mean19", "device"])
    frame["ablation"] = frame["ablation"].fillna(False).astype(bool)
    order = {m: i for i, m in enumerate(METHODS)}
    frame["_k"] = [0 if k == "teacher" else (1 if not a else 2) for k, a in zip(frame["kind"], frame["ablation"])]
    frame["_t"] = [teachers.index(m) if m in teachers else 0 for m in frame["model"]]
    frame["_m"] = [order.get(m, len(order)) if isinstance(m, str) else -1 for m in frame["method"]]
    frame["_s"] = pd.to_numeric(frame["seed"], errors="coerce").fillna(-1)
    frame = frame.sort_values(["_k", "_t", "_m", "_s", "model"], kind="stable")
    return frame.drop(columns=["_k", "_t", "_m", "_s"]).reset_index(drop=True)


def _row(model: str, kind: str, train: Mapping, evaluation: Mapping | None) -> dict:
    row: dict[str, Any] = {"model": model, "kind": kind, "output": None, "ablation": False,
                           "method": train.get("method"), "seed": train.get("seed"),
                           "test_acc": train.get("test_acc"), "acc_source": "training metrics" if train else None,
                           "params": train.get("params"), "size_mb": train.get("size_mb"),
                           "c_mean15": None, "c_mean15_complete": None, "c_missing": None, "c_mean19": None,
                           "device": train.get("device")}
    if evaluation:
        c = evaluation.get("cifar10c") or {}
        row.update({"test_acc": evaluation.get("test_acc"), "acc_source": "evaluate",
                    "params": evaluation.get("params", row["params"]),
                    "size_mb": evaluation.get("size_mb", row["size_mb"]),
                    "c_mean15": c.get("standard_mean"), "c_mean15_complete": c.get("standard_mean_complete"),
                    "c_missing": ", ".join(c.get("standard_missing") or []) or None,
                    "c_mean19": c.get("all_mean"), "device": evaluation.get("device", row["device"])})
        for key in ("method", "seed"):
            if row[key] is None and evaluation.get(key) is not None:
                row[key] = evaluation[key]
    return row


def ablation_summary(runs: pd.DataFrame, metrics: Sequence[str] = ("test_acc", "c_mean15"),
                     method_order: Sequence[str] = METHODS) -> pd.DataFrame:
    """Per method: number of seeds, the seeds, and mean and sample std (ddof 1; NaN for one
    seed) of each metric over seeds. `runs` has columns method, seed and the metrics."""
    rows = []
    present = [m for m in method_order if m in set(runs["method"])]
    present += sorted(set(runs["method"]) - set(present))
    for method in present:
        group = runs[runs["method"] == method].sort_values("seed")
        row: dict[str, Any] = {"method": method, "n": int(len(group)),
                               "seeds": " ".join(str(int(s)) for s in group["seed"])}
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").dropna().to_numpy(dtype=float)
            row[f"{metric}_n"] = int(values.size)
            row[f"{metric}_mean"] = float(values.mean()) if values.size else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(runs: pd.DataFrame, metric: str, reference: str = REFERENCE_METHOD,
                       method_order: Sequence[str] = METHODS) -> pd.DataFrame:
    """reference - baseline, paired by seed over the seeds both have a value for: mean,
    sample std (ddof 1; NaN for one pair) and n, per baseline method."""
    numeric = runs.assign(**{metric: pd.to_numeric(runs[metric], errors="coerce")})
    table = numeric.pivot_table(index="seed", columns="method", values=metric, aggfunc="first", dropna=False)
    rows = []
    if reference not in table.columns:
        return pd.DataFrame(columns=["baseline", "n", "seeds", "mean", "std"])
    baselines = [m for m in method_order if m in table.columns and m != reference]
    baselines += sorted(set(table.columns) - set(baselines) - {reference})
    for baseline in baselines:
        pair = table[[reference, baseline]].apply(pd.to_numeric, errors="coerce").dropna()
        diff = (pair[reference] - pair[baseline]).to_numpy(dtype=float)
        rows.append({"baseline": baseline, "n": int(diff.size),
                     "seeds": " ".join(str(int(s)) for s in pair.index),
                     "mean": float(diff.mean()) if diff.size else math.nan,
                     "std": float(diff.std(ddof=1)) if diff.size > 1 else math.nan})
    return pd.DataFrame(rows, columns=["baseline", "n", "seeds", "mean", "std"])


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
# Rendering


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _pct(value: Any, digits: int = 2) -> str:
    x = _num(value)
    return "–" if math.isnan(x) else f"{100 * x:.{digits}f}"


def _count(value: Any) -> str:
    x = _num(value)
    return "–" if math.isnan(x) else f"{x / 1e6:.2f}M"


def _plain(value: Any, digits: int = 2) -> str:
    x = _num(value)
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


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


def _isnan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: Path) -> None:
    plt = _pyplot()
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=90)
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(textwrap.fill(title, int(12 * fig.get_figwidth())), fontsize=8)
    _save(fig, path)


def lines_figure(frame: pd.DataFrame, xlabel: str, title: str, path: Path, rotate: bool = False) -> None:
    """One line per column of `frame` (accuracy %, x = its index)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8 if rotate else 5.5, 3.6), dpi=90)
    x = np.arange(len(frame.index))
    for column in frame.columns:
        ax.plot(x, 100 * frame[column].to_numpy(dtype=float), marker="o", markersize=3, linewidth=1, label=column)
    ax.set_xticks(x, [str(i) for i in frame.index], rotation=60 if rotate else 0, fontsize=7,
                  ha="right" if rotate else "center")
    ax.set(xlabel=xlabel, ylabel="accuracy (%)")
    ax.set_title(textwrap.fill(title, int(12 * fig.get_figwidth())), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def weights_figure(frame: pd.DataFrame, title: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    for column in frame.columns:
        ax.plot(frame.index, frame[column].to_numpy(dtype=float), marker="o", markersize=3, label=column)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="mean teacher weight")
    ax.set_title(textwrap.fill(title, int(12 * fig.get_figwidth())), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


# --------------------------------------------------------------------------------------
# Stage


def run_report(params: Params, root: str | Path = ".") -> dict[str, Any]:
    """Write reports/ (results.md, results.csv, figures/) and log it to MLflow (stage report)."""
    from .tracking import start_run

    root = Path(root)
    inputs = load_inputs(root)
    if inputs.empty():
        raise MatekdError("nothing to report: no metrics/teachers, metrics/student or metrics/eval files; "
                          "run `dvc repro` (at least train_teacher, distill and evaluate) first")
    out_dir = root / "reports"
    with atomic_dir(out_dir) as tmp:
        summary = _build(inputs, params, tmp)
    data_hash = next((e.get("dataset_sha256") for e in inputs.evals.values() if e.get("dataset_sha256")), None)
    # Not runtime.stage: the report needs no device (params may name cuda on a CPU-only machine).
    with start_run(enabled=params.tracking.enabled, experiment=params.tracking.experiment, run_name="report",
                   stage="report", params=params.flat(),
                   tags={"profile": params.profile, "params_sha256": params.digest(),
                         "dataset_sha256": data_hash or "none"}) as run:
        run.log_dict(params.model_dump(mode="json"), "config/params.json")
        run.log_artifact(out_dir / "results.md", "report")
        run.log_artifact(out_dir / "results.csv", "report")
        for path in sorted((out_dir / "figures").glob("*.png")):
            run.log_artifact(path, "report/figures")
        run.log_metrics({k: v for k, v in summary["headline"].items() if not math.isnan(v)})
    return summary


def _build(inputs: Inputs, params: Params, out: Path) -> dict[str, Any]:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    labels = data_labels(inputs, params)
    frame = model_frame(inputs, list(params.teachers))
    long: list[dict] = []
    missing = list(inputs.problems) + labels.notes
    md: list[str] = [f"# MATE-KD results ({labels.heading()})\n"]
    if labels.profile == "quick":
        md.append("> Profile `quick`: a small stratified subset and a few epochs. These numbers are a smoke "
                  "test of the pipeline, not a result.\n")
    missing += _missing_inputs(inputs, params, frame)

    # (a) seed's table
    md.append(f"## 1. Seed's table: {labels.heading()}\n")
    rows = []
    for _, row in frame.iterrows():
        rows.append([_display(row), _pct(row["test_acc"]), _count(row["params"]), _plain(row["size_mb"]),
                     _c15_cell(row), _pct(row["c_mean19"])])
        for metric in ("test_acc", "params", "size_mb", "c_mean15", "c_mean19"):
            long.append({"table": "seed", "model": row["model"], "metric": _metric_name(metric),
                         "value": _num(row[metric])})
    md.append(markdown_table(["model", "CIFAR-10 acc. (%)", "parameters", "size (MB)",
                              "CIFAR-10-C mean, 15 standard (%)", "CIFAR-10-C mean, all 19 (%)"], rows))
    incomplete = frame[frame["c_mean15_complete"].eq(False)]
    if len(incomplete):
        gaps = sorted({str(m) for m in incomplete["c_missing"].dropna()})
        md.append(f"\n\\* mean over the available standard corruptions only (missing: {'; '.join(gaps)}); "
                  "not comparable with published 15-corruption means.\n")
    md.append("\nThe 19-corruption mean includes the 4 extra corruptions and is not comparable with "
              "published 15-means. Sizes are fp32 parameters + BatchNorm statistics, in MB (10^6 bytes).\n")
    md.append("\nFor reference, the paper claims (canonical CIFAR-10, official CIFAR-10-C):\n\n")
    md.append(markdown_table(["model", "CIFAR-10 (%)", "parameters", "size", "CIFAR-10-C average (%)"], CLAIMED))

    # (b) ablation
    md.append(f"\n## 2. Ablation: mean and std over seeds ({labels.heading()})\n")
    runs = frame[frame["ablation"]]
    if runs.empty:
        md.append("_No ablation runs (metrics/student/<method>-seed<k>.json) found: run `dvc repro ablation`._\n")
    else:
        summary = ablation_summary(runs)
        md.append(markdown_table(
            ["method", "n seeds", "seeds", "CIFAR-10 mean (%)", "std (pp)", "CIFAR-10-C-15 mean (%)", "std (pp)"],
            [[r.method, r.n, r.seeds, _pct(r.test_acc_mean), _pct(r.test_acc_std), _pct(r.c_mean15_mean),
              _pct(r.c_mean15_std)] for r in summary.itertuples()]))
        md.append("\nstd: sample standard deviation over seeds (– with one seed).\n")
        for r in summary.itertuples():
            for metric in ("test_acc", "c_mean15"):
                long += [{"table": "ablation", "model": r.method, "metric": f"{_metric_name(metric)}_{stat}",
                          "value": getattr(r, f"{metric}_{stat}")} for stat in ("mean", "std")]
                long.append({"table": "ablation", "model": r.method, "metric": f"{_metric_name(metric)}_n",
                             "value": getattr(r, f"{metric}_n")})
        md.append(f"\n### Paired difference {REFERENCE_METHOD} − baseline over common seeds "
                  f"({labels.heading()})\n")
        if REFERENCE_METHOD not in set(runs["method"]):
            md.append(f"_No {REFERENCE_METHOD} ablation run: nothing to pair._\n")
        else:
            acc, rob = paired_differences(runs, "test_acc"), paired_differences(runs, "c_mean15")
            merged = acc.merge(rob, on="baseline", suffixes=("_acc", "_c"))
            md.append(markdown_table(
                ["baseline", "n (CIFAR-10)", "common seeds", "Δ CIFAR-10 mean (pp)", "std (pp)",
                 "n (C-15)", "Δ CIFAR-10-C-15 mean (pp)", "std (pp)"],
                [[r.baseline, r.n_acc, r.seeds_acc, _pct(r.mean_acc), _pct(r.std_acc), r.n_c, _pct(r.mean_c),
                  _pct(r.std_c)] for r in merged.itertuples()]))
            md.append("\nPositive: mate_kd is better. pp = percentage points.\n")
            for name, table in (("test_acc", acc), ("cifar10c_mean15", rob)):
                for r in table.itertuples():
                    for stat in ("mean", "std", "n"):
                        long.append({"table": "ablation_paired", "model": f"{REFERENCE_METHOD}-{r.baseline}",
                                     "metric": f"{name}_diff_{stat}", "value": float(getattr(r, stat))})

    # (c) robustness
    evaluated = [m for m in frame["model"] if m in inputs.evals]
    md.append(f"\n## 3. Robustness per corruption: accuracy (%) averaged over severities 1-5 "
              f"({labels.heading()})\n")
    if not evaluated:
        md.append("_No metrics/eval files: run `dvc repro evaluate`._\n")
    else:
        per_c = corruption_frame(inputs.evals, evaluated)
        md.append(markdown_table(["corruption", *evaluated],
                                 [[i, *(_pct(v) for v in per_c.loc[i])] for i in per_c.index]))
        md.append("\n– : corruption not evaluated. Extra corruptions (speckle_noise, gaussian_blur, spatter, "
                  "saturate) are outside the 15-corruption benchmark mean.\n")
        for model in evaluated:
            for corruption, accs in ((inputs.evals[model].get("cifar10c") or {}).get("accuracy") or {}).items():
                long += [{"table": "robustness", "model": model, "metric": f"{corruption}/severity{s}",
                          "value": _num(a)} for s, a in enumerate(accs, start=1)]
        md.append(f"\n## 4. Robustness per severity: mean over the standard corruptions (%) "
                  f"({labels.heading()})\n")
        per_s = severity_frame(inputs.evals, evaluated)
        md.append(markdown_table(["severity", *evaluated], [[i, *(_pct(v) for v in per_s.loc[i])] for i in per_s.index]))
        per_s_all = severity_frame(inputs.evals, evaluated, "all")
        md.append(f"\nMean over all evaluated corruptions (incl. the extras) per severity (%) "
                  f"({labels.heading()}):\n\n")
        md.append(markdown_table(["severity", *evaluated],
                                 [[i, *(_pct(v) for v in per_s_all.loc[i])] for i in per_s_all.index]))
        for model in evaluated:
            long += [{"table": "severity", "model": model, "metric": f"severity{i}" if i != "clean" else "clean",
                      "value": _num(per_s.loc[i, model])} for i in per_s.index]
        lines_figure(per_c.drop(index=["mean (15 standard)", "mean (all 19)"]).dropna(how="all"), "corruption",
                     f"Accuracy per corruption, mean over severities 1-5 ({labels.heading()})",
                     figures / "accuracy-per-corruption.png", rotate=True)
        lines_figure(per_s, "severity", f"Accuracy per severity, standard corruptions ({labels.heading()})",
                     figures / "accuracy-per-severity.png")

    # Grad-CAM agreement
    md.append(f"\n## 5. Grad-CAM agreement of students with teachers ({labels.heading()})\n")
    if not inputs.gradcam:
        md.append("_No metrics/eval/gradcam-*.json: run `dvc repro evaluate`._\n")
    else:
        rows = []
        for student, g in sorted(inputs.gradcam.items()):
            for teacher in g.get("teachers", []):
                rows.append([student, teacher, _plain(g["similarity_mean"].get(teacher), 3),
                             _plain(g["similarity_std"].get(teacher), 3), _plain(g["weight_mean"].get(teacher), 3),
                             _pct(g["dominant_fraction"].get(teacher), 1)])
                for key in ("similarity_mean", "similarity_std", "weight_mean", "dominant_fraction"):
                    long.append({"table": "gradcam", "model": student, "metric": f"{key}/{teacher}",
                                 "value": _num(g[key].get(teacher))})
        any_g = next(iter(inputs.gradcam.values()))
        md.append(f"\n{any_g.get('images')} test images (classes interleaved), Grad-CAM of the true class; "
                  f"similarity `{any_g.get('similarity')}`, weights softmax(sim / {any_g.get('tau')}).\n\n")
        md.append(markdown_table(["student", "teacher", "similarity mean", "similarity std", "weight mean",
                                  "dominant (% of images)"], rows))

    # (d) figures
    md.append(f"\n## 6. Figures ({labels.heading()})\n")
    figure_lines = _figures(inputs, frame, labels, figures)
    md += figure_lines or ["_No figures: no evaluation or training plots found._\n"]

    # missing inputs and provenance
    if missing:
        md.insert(2 if labels.profile == "quick" else 1,
                  "## Missing or inconsistent inputs\n\n" + "".join(f"- {m}\n" for m in missing))
    md.append(_provenance(inputs, params, frame))
    write_text(out / "results.md", re.sub(r"\n{3,}", "\n\n", "\n".join(md)).strip() + "\n")
    csv = pd.DataFrame(long, columns=["table", "model", "metric", "value"])
    csv.to_csv(out / "results.csv", index=False)
    headline = {}
    for _, row in frame.iterrows():
        headline[f"{row['model']}/test_acc"] = _num(row["test_acc"])
        headline[f"{row['model']}/cifar10c_mean15"] = _num(row["c_mean15"])
    return {"models": frame["model"].tolist(), "missing": missing, "headline": headline,
            "labels": labels.__dict__}


def _metric_name(column: str) -> str:
    return {"c_mean15": "cifar10c_mean15", "c_mean19": "cifar10c_mean19"}.get(column, column)


def _missing_inputs(inputs: Inputs, params: Params, frame: pd.DataFrame) -> list[str]:
    out = []
    for name in params.teachers:
        if name not in inputs.teachers:
            out.append(f"metrics/teachers/{name}.json is missing: run `dvc repro train_teacher@{name}`")
        if name not in inputs.evals:
            out.append(f"metrics/eval/{name}.json is missing: run `dvc repro evaluate`")
    if not inputs.students:
        out.append("no metrics/student/*.json: run `dvc repro distill ablation`")
    for output in sorted(inputs.students):
        if f"student-{output}" not in inputs.evals:
            out.append(f"metrics/eval/student-{output}.json is missing: run `dvc repro evaluate`")
    expected = {f"{m}-seed{s}" for m in params.ablation.methods for s in params.ablation.seeds}
    absent = sorted(expected - set(inputs.students))
    if absent:
        out.append(f"ablation runs missing ({len(absent)} of {len(expected)}): {', '.join(absent)}; "
                   "run `dvc repro ablation`")
    return out


def _figures(inputs: Inputs, frame: pd.DataFrame, labels: Labels, figures: Path) -> list[str]:
    lines: list[str] = []
    students = [m for m in frame[frame["kind"] == "student"]["model"] if m in inputs.evals]
    pick = "student-distill" if "student-distill" in students else None
    if pick is None and students:
        pick = max(students, key=lambda m: _num(inputs.evals[m].get("test_acc")))
    if pick is None and inputs.evals:
        pick = max(inputs.evals, key=lambda m: _num(inputs.evals[m].get("test_acc")))
    if pick is not None and inputs.evals[pick].get("confusion_matrix"):
        e = inputs.evals[pick]
        names = e.get("class_names") or [str(i) for i in range(len(e["confusion_matrix"]))]
        confusion_figure(e["confusion_matrix"], names, f"{pick}: confusion matrix, {e.get('dataset')} test set",
                         figures / f"confusion-{pick}.png")
        lines.append(f"Confusion matrix of {pick} (rows true, columns predicted; {labels.dataset}, "
                     f"profile `{labels.profile}`):\n\n![confusion](figures/confusion-{pick}.png)\n")
    for name, caption in (("accuracy-per-corruption", "Accuracy per corruption"),
                          ("accuracy-per-severity", "Accuracy per severity")):
        if (figures / f"{name}.png").exists():
            lines.append(f"{caption} ({labels.corruption}, profile `{labels.profile}`):\n\n"
                         f"![{name}](figures/{name}.png)\n")
    for student, path in sorted(inputs.gradcam_png.items()):
        shutil.copyfile(path, figures / f"gradcam-{student}.png")
        lines.append(f"Grad-CAM of {student} vs the teachers (first rows of the analysed test images; "
                     f"{labels.dataset}):\n\n![gradcam-{student}](figures/gradcam-{student}.png)\n")
    for output in sorted(set(inputs.histories) | set(inputs.histograms)):
        if output.endswith("-weights"):
            continue
        found = weight_evolution(inputs.histories.get(output), inputs.histograms.get(output))
        if found is None:
            continue
        weights, source = found
        weights_figure(weights, f"student-{output}: mean teacher weight per epoch", figures /
                       f"teacher-weights-{output}.png")
        lines.append(f"Teacher-weight evolution of student-{output} ({source}; training images of "
                     f"{labels.dataset}):\n\n![weights-{output}](figures/teacher-weights-{output}.png)\n")
    return lines


def _provenance(inputs: Inputs, params: Params, frame: pd.DataFrame) -> str:
    from .tracking import git_state

    def unique(values: Iterable[Any]) -> list[str]:
        return sorted({str(v) for v in values if v not in (None, "") and not _isnan(v)})

    everything = [*inputs.teachers.values(), *inputs.students.values(), *inputs.evals.values()]
    data_hashes = unique(e.get("dataset_sha256") for e in everything)
    c_hashes = unique(e.get("cifar10c_manifest_sha256") for e in inputs.evals.values())
    eval_digests = unique(e.get("params_sha256") for e in inputs.evals.values())
    devices = unique(frame["device"])
    git = git_state()
    lines = ["\n## How these numbers were obtained\n",
             "Commands (from the project root):\n",
             "```",
             "dvc repro            # prepare, train_teacher@*, cache@*, distill, ablation, corrupt, evaluate, report",
             "# or stage by stage: matekd prepare; matekd train-teacher <name>; matekd cache <name>;",
             "#   matekd distill [--method M --seed S --output-name M-seedS]; matekd corrupt;",
             "#   matekd evaluate; matekd report",
             "```\n",
             f"- profile: `{params.profile}`; params.yaml sha256 digest (validated params): `{params.digest()}`",
             f"- params digest recorded by evaluate: {', '.join(f'`{d}`' for d in eval_digests) or 'unknown'}"
             + (" (differs from the current params: rerun `dvc repro`)"
                if eval_digests and eval_digests != [params.digest()] else ""),
             f"- prepared data (manifest sha256): {', '.join(f'`{h}`' for h in data_hashes) or 'unknown'}",
             f"- CIFAR-10-C manifest sha256: {', '.join(f'`{h}`' for h in c_hashes) or 'unknown'}",
             f"- device(s): {', '.join(devices) or 'unknown'}",
             f"- git commit: `{git['git_commit']}`"
             + (f" (uncommitted changes: {git['git_dirty']})" if git["git_commit"] != "unknown" else ""),
             "- accuracies: top-1 on the prepared test split; CIFAR-10-C accuracies per corruption x severity "
             "on the corrupt stage's images; all runs tracked in MLflow (experiment "
             f"`{params.tracking.experiment}`).",
             "- results.csv holds every number above in long format (table, model, metric, value; accuracies "
             "as fractions).\n"]
    return "\n".join(lines)
