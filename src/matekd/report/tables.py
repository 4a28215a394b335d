"""The report's tables as pure functions of the inputs: one row per model, the ablation runs and
their summaries over seeds, paired differences against the method under test, teacher
weighting, each method's values, and CIFAR-10-C per corruption and per severity.

Methods come from the method table (matekd.methods), in its order; the only method named here
is REFERENCE_METHOD, the method under test."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import methods as method_table
from ..corruptions import EXTRA_4 as EXTRA_CORRUPTIONS
from ..corruptions import STANDARD_15 as STANDARD_CORRUPTIONS
from ..params import Params, flatten
from ..paths import method_inputs_path, parse_ablation_output
from .inputs import DISTILL_OUTPUT, Inputs
from .statistics import as_float, is_missing, t_interval

REFERENCE_METHOD = "mate_kd"    # the method under test: paired differences are it minus each baseline


def method_order(present: Iterable[str]) -> list[str]:
    """Methods in the method table's order, then any unknown ones (old results) sorted."""
    present = {m for m in present if isinstance(m, str)}
    return [m for m in method_table.METHODS if m in present] + sorted(present - set(method_table.METHODS))


def _student_method(output: str, inputs: Inputs, params: Params) -> tuple[str | None, str]:
    """The method of a student output and where it came from."""
    parsed = parse_ablation_output(output)
    if parsed:
        return parsed[0], "output name"
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
        parsed = parse_ablation_output(output)
        row["method"], row["method_source"] = _student_method(output, inputs, params)
        row.update(output=output, ablation=parsed is not None)
        if parsed:
            row["seed"] = parsed[1]
        elif is_missing(row.get("seed")) and output == DISTILL_OUTPUT:
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
        if is_missing(row["seed"]) and evaluation.get("seed") is not None:
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


def run_weighting(metrics: Mapping | None, history: pd.DataFrame | None) -> dict[str, Any]:
    """One student's teacher-weight summary: entropy relative to uniform at the last epoch
    (metrics `weighting.entropy_relative`, nested or flat, else the history's last row), its
    mean over all epochs (history; from train_entropy / log K when the relative column is absent),
    and the last epoch's mean weight per teacher."""
    flat = {key: float(value) for key, value in flatten(metrics or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
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
        weights = {c.removeprefix("train_weight_mean/"): as_float(last[c]) for c in history.columns
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
            names = row_of_table.keys if row_of_table else ()
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
        column = [as_float(per.get(n)) for n in STANDARD_CORRUPTIONS] + [as_float(c.get("standard_mean"))]
        column += [as_float(per.get(n)) for n in EXTRA_CORRUPTIONS] + [as_float(c.get("all_mean"))]
        data[model] = column
    return pd.DataFrame(data, index=pd.Index(index, name="corruption"))


def severity_frame(evals: Mapping[str, Mapping], models: Sequence[str], kind: str = "standard") -> pd.DataFrame:
    """Rows = clean, severity 1..5 (mean over the standard corruptions, or all with
    kind='all'); columns = models."""
    data = {}
    for model in models:
        e = evals.get(model) or {}
        per = (e.get("cifar10c") or {}).get(f"per_severity_{kind}") or [None] * 5
        data[model] = [as_float(e.get("test_acc"))] + [as_float(v) for v in per]
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


def grouped_mean(table: pd.DataFrame, groups: Mapping[str, list[str]]) -> pd.DataFrame:
    """Per group, the mean of its models' columns (NaNs skipped)."""
    return pd.DataFrame({name: table[models].mean(axis=1, skipna=True) for name, models in groups.items()})
