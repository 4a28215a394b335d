"""How the report writes values into its markdown: table cells (percent, millions, fixed
digits; "–" for a missing value), params values as params.yaml writes them, and tables."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .statistics import as_float, is_missing


def percent(value: Any, digits: int = 2, signed: bool = False) -> str:
    """A fraction as percent (0.8123 -> 81.23; signed: +81.23)."""
    x = as_float(value)
    return "–" if math.isnan(x) else f"{100 * x:{'+' if signed else ''}.{digits}f}"


def millions(value: Any) -> str:
    """A count in millions (270000 -> 0.27M)."""
    x = as_float(value)
    return "–" if math.isnan(x) else f"{x / 1e6:.2f}M"


def plain(value: Any, digits: int = 2) -> str:
    """A number with `digits` decimals."""
    x = as_float(value)
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def yaml_value(value: Any) -> str:
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


def model_label(row: Mapping) -> str:
    """A model_frame row as `student-<output> (<method>, seed <k>)`; a teacher by its name."""
    if row["kind"] == "teacher":
        return str(row["model"])
    detail = [str(row["method"])] if isinstance(row.get("method"), str) else []
    if not is_missing(row.get("seed")):
        detail.append(f"seed {int(row['seed'])}")
    return f"{row['model']} ({', '.join(detail)})" if detail else str(row["model"])


def per_seed_text(per_seed: Mapping[int, float]) -> str:
    """{seed: difference} in percentage points, signed: `0: +1.00, 1: -3.00`."""
    return ", ".join(f"{s}: {100 * v:+.2f}" for s, v in per_seed.items()) or "–"


def c15_cell(row: Mapping) -> str:
    """The 15-corruption mean of a model_frame row in percent, starred when corruptions are missing."""
    text = percent(row["c_mean15"])
    complete = row.get("c_mean15_complete")
    if text != "–" and not is_missing(complete) and not bool(complete):
        text += "*"   # mean over fewer than the 15 standard corruptions
    return text
