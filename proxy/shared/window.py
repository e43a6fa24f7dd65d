"""A sliding window of calls, as shared state counts them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding window of calls to count one more in: a client's rpm, an upstream key's calls."""

    name: str
    limit: int | None  # calls in the window at the most (None: none)
    seconds: float
    reserve: int = 0  # room kept for others (a key's polls)
    hold: float = 0.0  # a call under way counts from this far ahead until it lands
    most: int | None = None  # calls in flight at the most (None: no limit)
