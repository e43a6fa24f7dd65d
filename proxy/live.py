"""Requests and errors of the last 15 minutes, in 10-second buckets: what the console's Live
page draws. Each process counts what it answered, in memory; with Redis configured every
process adds its counts there once a second, and the series is the whole proxy's."""

from __future__ import annotations

import time

BUCKET = 10  # seconds per bucket
SPAN = 900  # seconds kept: 15 minutes
_SLOTS = SPAN // BUCKET

Counts = list[int]  # requests, errors (5xx), refused (4xx)


class LiveCounts:
    """A ring of buckets, one slot per 10 s; a slot is reset when the ring comes round to it."""

    __slots__ = ("_errors", "_failed", "_requests", "_stamp", "_unsent")

    def __init__(self) -> None:
        self._stamp = [-1] * _SLOTS  # which bucket (unix time // BUCKET) each slot holds
        self._requests = [0] * _SLOTS
        self._errors = [0] * _SLOTS  # answered 5xx: the proxy or its upstreams failed
        self._failed = [0] * _SLOTS  # answered 4xx: refused (bad input, keys, limits, budgets)
        self._unsent: dict[int, Counts] = {}  # bucket -> counts not yet added to Redis

    def add(self, status: int, now: float | None = None) -> None:
        bucket = int((time.time() if now is None else now) // BUCKET)
        slot = bucket % _SLOTS
        if self._stamp[slot] != bucket:  # the ring came round: this slot's old counts are 15 min old
            self._stamp[slot], self._requests[slot], self._errors[slot], self._failed[slot] = bucket, 0, 0, 0
        unsent = self._unsent.get(bucket)
        if unsent is None:  # a new bucket: drop those past the span (Redis may be away for days)
            for old in [b for b in self._unsent if b <= bucket - _SLOTS]:
                del self._unsent[old]
            unsent = self._unsent[bucket] = [0, 0, 0]
        self._requests[slot] += 1
        unsent[0] += 1
        if status >= 500 or status == 0:  # 0: no answer started (the connection or the proxy failed)
            self._errors[slot] += 1
            unsent[1] += 1
        elif status >= 400:
            self._failed[slot] += 1
            unsent[2] += 1

    def series(self, now: float | None = None) -> list[tuple[int, int, int, int]]:
        """(bucket start as unix seconds, requests, 5xx, 4xx) for each bucket of the last 15
        minutes, oldest first; the newest bucket is the one under way."""
        rows = []
        for bucket in buckets(now):
            slot = bucket % _SLOTS
            held = self._stamp[slot] == bucket
            rows.append((bucket * BUCKET, self._requests[slot] if held else 0, self._errors[slot] if held else 0,
                         self._failed[slot] if held else 0))
        return rows

    def take_unsent(self, now: float | None = None) -> dict[int, Counts]:
        """The counts since the last take, for Redis; buckets older than the span are dropped."""
        unsent, self._unsent = self._unsent, {}
        first = buckets(now)[0]
        return {bucket: counts for bucket, counts in unsent.items() if bucket >= first}

    def give_back(self, counts: dict[int, Counts]) -> None:
        """Counts Redis did not take: sent with the next."""
        for bucket, (requests, errors, refused) in counts.items():
            unsent = self._unsent.setdefault(bucket, [0, 0, 0])
            unsent[0] += requests
            unsent[1] += errors
            unsent[2] += refused

    def with_unsent(self, totals: dict[int, Counts], now: float | None = None) -> list[tuple[int, int, int, int]]:
        """The series from every process's counts in Redis, plus this process's not yet sent."""
        rows = []
        for bucket in buckets(now):
            total = totals.get(bucket, (0, 0, 0))
            unsent = self._unsent.get(bucket, (0, 0, 0))
            rows.append((bucket * BUCKET, total[0] + unsent[0], total[1] + unsent[1], total[2] + unsent[2]))
        return rows


def buckets(now: float | None = None) -> range:
    """The buckets of the last 15 minutes, oldest first."""
    last = int((time.time() if now is None else now) // BUCKET)
    return range(last - _SLOTS + 1, last + 1)
