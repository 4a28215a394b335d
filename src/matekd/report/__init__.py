"""The report: tables, figures and plot data from the pipeline's metric files (no model is loaded).

`load_inputs` reads the metric files, `build_report` writes results.md, results.csv, figures/ and
plots/. Names are imported on first use, so that training can draw its teacher-weight histograms
(report.weight_histograms) without importing the report's tables and pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "build_report": "document", "load_inputs": "inputs", "per_model_summary": "inputs", "shortcuts": "paper",
    "NO_INTERVAL": "statistics", "format_interval": "statistics", "t_interval": "statistics",
    "ablation_summary": "tables", "histogram_mean_weights": "tables", "paired_differences": "tables",
    "run_weighting": "tables", "weight_evolution": "tables",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
