"""The report: tables, figures and plot data from the pipeline's metric files (no model is loaded).

`load_inputs` reads the metric files (report.inputs), `build_report` writes results.md,
results.csv, figures/ and plots/ (report.document) from the tables (report.tables), the
t-intervals over seeds (report.statistics), the departures from the paper setting
(report.paper), the overlay data for `dvc plots` (report.overlays) and the figures
(report.figures, matplotlib imported on first use); report.formatting writes the cells.
"""

from .document import build_report
from .inputs import load_inputs, per_model_summary
from .paper import shortcuts
from .statistics import NO_INTERVAL, format_interval, t_interval
from .tables import ablation_summary, histogram_mean_weights, paired_differences, run_weighting, weight_evolution

__all__ = [
    "NO_INTERVAL",
    "ablation_summary",
    "build_report",
    "format_interval",
    "histogram_mean_weights",
    "load_inputs",
    "paired_differences",
    "per_model_summary",
    "run_weighting",
    "shortcuts",
    "t_interval",
    "weight_evolution",
]
