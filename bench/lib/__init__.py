"""What the benchmark programs share: paths, printing, percentiles, Markdown tables, TOML configs;
processes and /proc (`procs`), raw-socket HTTP clients (`loadclients`), the stub, this proxy and
LiteLLM as targets (`targets`), the machine, its tools and py-spy (`environment`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
ROOT, OUT = BENCH.parent, BENCH / "out"
say = partial(print, flush=True)


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
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] if ordered else float("nan")


def fmt(value: Any, digits: int = 2) -> str:
    """Thousands separated; a dash for nothing or NaN."""
    if value is None or value != value:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(header: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A Markdown table, one line a row; cells as given (format them first)."""
    return ["|" + "|".join(f" {name} " if name else " " for name in header) + "|", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def toml(config: dict[str, Any]) -> str:
    """A proxy config as TOML, every table inline: JSON's strings, numbers and booleans are TOML's."""
    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        return "[" + ", ".join(value(x) for x in v) + "]" if isinstance(v, list) else json.dumps(v)

    return "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in config.items())
