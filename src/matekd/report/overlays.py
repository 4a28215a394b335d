"""Overlay plot data for `dvc plots`: long format, one series per method, the mean over its
ablation seeds. val_acc.csv (epoch, series, val_acc), train_loss.csv (epoch, series,
train_loss), teacher_weights.csv (epoch, series = <method>/<teacher>, weight) and
corruption_accuracy.csv (corruption, series, accuracy)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .. import methods as method_table
from ..corruptions import EXTRA_4 as EXTRA_CORRUPTIONS
from ..corruptions import STANDARD_15 as STANDARD_CORRUPTIONS
from .inputs import Inputs
from .tables import corruption_frame, method_order, weight_evolution

# name -> (x, y) of each <name>.csv, columns x, series, y (dvc.yaml names these files; keep names and columns).
OVERLAYS = {"val_acc": ("epoch", "val_acc"), "train_loss": ("epoch", "train_loss"),
            "teacher_weights": ("epoch", "weight"), "corruption_accuracy": ("corruption", "accuracy")}


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


def overlay_frames(runs: pd.DataFrame, inputs: Inputs) -> tuple[dict[str, pd.DataFrame], set[str]]:
    """Every overlay OVERLAYS names, by name, from the ablation runs; and the sources of the
    teacher weights (see weight_overlay)."""
    weights, sources = weight_overlay(runs, inputs)
    return {"val_acc": epoch_overlay(runs, inputs.histories, "val_acc"),
            "train_loss": epoch_overlay(runs, inputs.histories, "train_loss"),
            "teacher_weights": weights,
            "corruption_accuracy": corruption_overlay(runs, inputs.evals)}, sources


def write_overlays(overlays: Mapping[str, pd.DataFrame], folder: Path) -> None:
    """<folder>/<name>.csv per overlay, with the columns OVERLAYS gives it: x, series, y."""
    for name, frame in overlays.items():
        x, y = OVERLAYS[name]
        frame[[x, "series", y]].to_csv(folder / f"{name}.csv", index=False)
