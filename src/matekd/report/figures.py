"""The report's static figures (matplotlib, Agg backend, imported on first use): legends outside
the axes, constrained layout keeps titles off the labels, one fixed colour per method."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import methods as method_table
from ..corruptions import EXTRA_4 as EXTRA_CORRUPTIONS
from ..plotting import png_bytes, pyplot
from .statistics import t_interval
from .tables import method_order


def _figure(width: float, height: float, ncols: int = 1, **kwargs):
    plt = pyplot()
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
    path.write_bytes(png_bytes(fig))


def _colours(names: Sequence[str]) -> dict[str, Any]:
    """One colour per method, fixed by its place in the method table (stable across figures)."""
    plt = pyplot()
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
            iv = t_interval(values[ok])
            ax.hlines(iv.mean, x - 0.3, x + 0.3, color="black", linewidth=1.5, zorder=4,
                      label="mean" if x == 0 else None)
            if iv.has_interval:
                ax.errorbar(x + 0.33, iv.mean, yerr=iv.half_width, fmt="none", ecolor="black",
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


def lines_figure(frame: pd.DataFrame, xlabel: str, ylabel: str, title: str, path: Path, scale: float = 100.0) -> None:
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
