"""Means over seeds with Student-t intervals, and the coercion of metric values to numbers.

Metric files may hold null, a string or nothing where a number is expected: `as_float` turns
any of them into NaN, and every mean here skips NaNs."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_SEEDS_FOR_INTERVAL = 3
NO_INTERVAL = f"no interval (needs >= {MIN_SEEDS_FOR_INTERVAL} seeds)"


def as_float(value: Any) -> float:
    """A metric value as a float; NaN for None, a string or anything else that is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def is_missing(value: Any) -> bool:
    """None or NaN: no value (0 and False are values)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


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
    x = np.asarray([v for v in (as_float(v) for v in values) if not math.isnan(v)], dtype=float)
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
