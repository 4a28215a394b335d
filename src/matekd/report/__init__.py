"""The report: tables, figures and plot data from the pipeline's metric files (no model is loaded).

`load_inputs` reads the metric files (report.inputs), `build_report` writes results.md,
results.csv, figures/ and plots/ (report.document) from the tables (report.tables), the
t-intervals over seeds (report.statistics), the departures from the paper setting
(report.paper), the overlay data for `dvc plots` (report.overlays) and the figures
(report.figures, matplotlib imported on first use); report.formatting writes the cells.
"""

from .document import build_report
from .formatting import markdown_table
from .inputs import Inputs, load_inputs, per_model_summary, safetensors_metadata
from .overlays import corruption_overlay, epoch_overlay, weight_overlay
from .paper import shortcuts
from .statistics import NO_INTERVAL, Interval, format_interval, t_interval
from .tables import (
    REFERENCE_METHOD,
    ablation_runs,
    ablation_summary,
    corruption_frame,
    histogram_mean_weights,
    method_order,
    method_values,
    model_frame,
    paired_differences,
    robustness_groups,
    run_weighting,
    severity_frame,
    weight_evolution,
    weighting_frame,
)

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
