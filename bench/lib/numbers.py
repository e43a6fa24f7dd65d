"""Percentiles, number formatting and Markdown tables."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def pct(values: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks (statistics.quantiles' inclusive method)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def nearest_rank(values: list[float], p: float) -> float:
    """The nearest-rank percentile, no interpolation (capacity.py, the fallback load generator)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def fmt(value: Any, digits: int = 2) -> str:
    """Thousands separated; a dash for nothing or NaN."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A Markdown table, one line a row; cells as given (format them first)."""
    names = list(header)
    return ["|" + "|".join(f" {name} " if name else " " for name in names) + "|", "|" + "---|" * len(names),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]
