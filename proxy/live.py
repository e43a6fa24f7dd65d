"""Requests and errors of the last 15 minutes, in 10-second buckets: what the console's Live
page draws. Per process (each worker and replica counts what it answered), kept in memory."""

from __future__ import annotations

import time

BUCKET = 10  # seconds per bucket
SPAN = 900  # seconds kept: 15 minutes
_SLOTS = SPAN // BUCKET


class LiveCounts:
    """A ring of buckets, one slot per 10 s; a slot is reset when the ring comes round to it."""

    __slots__ = ("_errors", "_failed", "_requests", "_stamp")

    def __init__(self) -> None:
        self._stamp = [-1] * _SLOTS  # which bucket (unix time // BUCKET) each slot holds
        self._requests = [0] * _SLOTS
        self._errors = [0] * _SLOTS  # answered 5xx: the proxy or its upstreams failed
        self._failed = [0] * _SLOTS  # answered 4xx: refused (bad input, keys, limits, budgets)

    def add(self, status: int, now: float | None = None) -> None:
        bucket = int((time.time() if now is None else now) // BUCKET)
        slot = bucket % _SLOTS
        if self._stamp[slot] != bucket:  # the ring came round: this slot's old counts are 15 min old
            self._stamp[slot], self._requests[slot], self._errors[slot], self._failed[slot] = bucket, 0, 0, 0
        self._requests[slot] += 1
        if status >= 500 or status == 0:  # 0: no answer started (the connection or the proxy failed)
            self._errors[slot] += 1
        elif status >= 400:
            self._failed[slot] += 1

    def series(self, now: float | None = None) -> list[tuple[int, int, int, int]]:
        """(bucket start as unix seconds, requests, 5xx, 4xx) for each bucket of the last 15
        minutes, oldest first; the newest bucket is the one under way."""
        last = int((time.time() if now is None else now) // BUCKET)
        rows = []
        for bucket in range(last - _SLOTS + 1, last + 1):
            slot = bucket % _SLOTS
            held = self._stamp[slot] == bucket
            rows.append((bucket * BUCKET, self._requests[slot] if held else 0, self._errors[slot] if held else 0,
                         self._failed[slot] if held else 0))
        return rows
