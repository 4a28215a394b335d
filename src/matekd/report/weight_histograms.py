"""Teacher-weight histogram figures of one student's training, one per epoch, logged to its run
(MLflow image cards) once training has finished."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..plotting import figure_to_array, pyplot
from ..weighting import histogram_edges


def histogram_figure(counts: torch.Tensor, names: Sequence[str], epoch: int, method: str):
    plt = pyplot()
    edges = histogram_edges(counts.shape[-1]).numpy()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for j, name in enumerate(names):
        ax.stairs(counts[j].cpu().numpy(), edges, label=name)
    ax.set(xlabel="teacher weight", ylabel="samples", title=f"{method}: teacher weights, epoch {epoch}")
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
    fig.tight_layout()
    return fig


def log_histogram_figures(run: Any, history: Sequence[dict], names: Sequence[str], method: str) -> None:
    """Log each epoch's teacher-weight histogram figure of one student (`history`: its entries
    {epoch, bins, counts: {teacher: [...]}}) as image `teacher_weights` at step epoch - 1."""
    if not getattr(run, "active", False):
        return
    for entry in history:
        counts = torch.tensor([entry["counts"][n] for n in names])
        figure = histogram_figure(counts, names, entry["epoch"], method)
        run.log_image(figure_to_array(figure), key="teacher_weights", step=entry["epoch"] - 1)
