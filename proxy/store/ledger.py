"""The usage ledger's arithmetic, shared by both stores: raw rows rolled up per (UTC day,
client, model, upstream) at write time, and reads that take whole days from the rollups and
only the partial days at either end of a range from the raw rows."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from typing import Any

from proxy.store import UsageRecord, UsageRow

DAY = 86400.0
DIMENSIONS = ("client", "model", "upstream")
GROUPS = ("client", "model", "day", "upstream")
_EPOCH = dt.date(1970, 1, 1)

Key = tuple[int, str, str, str]  # (UTC day number since 1970-01-01, client, model, upstream)
Deltas = dict[Key, list[Any]]  # key -> [requests, cost, failed], added to the rollup row
# a raw row as a settle needs it: (id, at, client, model, upstream, cost, outcome, task_id)
RawRow = tuple[int, float, str, str, str, float, str, str]


def day_of(at: float) -> int:
    return int(at // DAY)


def day_name(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=day)).isoformat()


def add(deltas: Deltas, key: Key, requests: int, cost: float, failed: int) -> None:
    total = deltas.get(key)
    if total is None:
        deltas[key] = [requests, cost, failed]
    else:
        total[0] += requests
        total[1] += cost
        total[2] += failed


def of_records(records: Iterable[UsageRecord], deltas: Deltas | None = None) -> Deltas:
    """What new raw rows add to the rollups."""
    deltas = {} if deltas is None else deltas
    for r in records:  # add() inlined: this runs for every row written
        key = (int(r.at // DAY), r.client, r.model, r.upstream)
        total = deltas.get(key)
        if total is None:
            deltas[key] = [1, r.cost, int(r.outcome == "failed")]
        else:
            total[0] += 1
            total[1] += r.cost
            total[2] += r.outcome == "failed"
    return deltas


def settle(rows: Sequence[RawRow], settles: Sequence[tuple[str, str, float | None]],
           deltas: Deltas) -> list[tuple[str, float, int]]:
    """Apply tasks' final outcomes (and costs, when the upstream reported one) to their raw
    rows, in the order they came; add what changed to `deltas`. Answers (outcome, cost, id)
    for each row that changed."""
    by_task: dict[str, list[list[Any]]] = {}
    for raw in rows:
        by_task.setdefault(raw[7], []).append(list(raw))
    changed: dict[int, list[Any]] = {}
    for task_id, outcome, cost in settles:
        for row in by_task.get(task_id, []):
            row_id, at, client, model, upstream, old_cost, old_outcome, _ = row
            new_cost = old_cost if cost is None else cost
            add(deltas, (day_of(at), client, model, upstream), 0, new_cost - old_cost,
                int(outcome == "failed") - int(old_outcome == "failed"))
            row[5], row[6] = new_cost, outcome
            changed[row_id] = row
    return [(row[6], row[5], row_id) for row_id, row in changed.items()]


def rollup_rows(deltas: Deltas) -> list[tuple[int, str, str, str, int, float, int]]:
    """Sorted by key, so that two replicas updating the same rows lock them in one order."""
    return [(*key, int(v[0]), float(v[1]), int(v[2])) for key, v in sorted(deltas.items()) if any(v)]


# ---- reads --------------------------------------------------------------------------------

class Span:
    """Which part of [since, until) the rollups answer (whole UTC days [first, end)) and which
    the raw rows answer (the partial days at either end)."""

    def __init__(self, since: float | None, until: float | None) -> None:
        self.first = None if since is None else math.ceil(since / DAY)
        self.end = None if until is None else math.floor(until / DAY)
        self.raw: list[tuple[float, float]] = []
        self.whole_days = self.first is None or self.end is None or self.first < self.end
        if not self.whole_days:  # within one day, or across one boundary without a whole day
            if since is not None and until is not None and since < until:
                self.raw.append((since, until))
            return
        if since is not None and self.first is not None and since < self.first * DAY:
            self.raw.append((since, self.first * DAY))
        if until is not None and self.end is not None and self.end * DAY < until:
            self.raw.append((self.end * DAY, until))


def usage_queries(span: Span, client: str | None, model: str | None, group_by: str, split_by: str | None,
                  raw_day: str) -> list[tuple[str, list[Any]]]:
    """The statements (with ? placeholders) whose rows `merge` adds up: one on the rollups for
    the whole days, one on the raw rows per partial day. `raw_day` is the dialect's day number
    of the raw column `at`."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {GROUPS}")
    if split_by is not None and split_by not in DIMENSIONS:
        raise ValueError(f"split_by must be one of {DIMENSIONS}")
    split, by = (split_by, "GROUP BY 1, 2") if split_by else ("NULL", "GROUP BY 1")
    queries = []
    if span.whole_days:
        where, args = _filters(client, model)
        if span.first is not None:
            where.append("day >= ?")
            args.append(span.first)
        if span.end is not None:
            where.append("day < ?")
            args.append(span.end)
        queries.append((f"SELECT {group_by}, {split}, SUM(requests), SUM(cost), SUM(failed) FROM usage_daily"
                        f"{_where(where)} {by}", args))
    group = raw_day if group_by == "day" else group_by
    for lo, hi in span.raw:
        where, args = _filters(client, model)
        where += ["at >= ?", "at < ?"]
        args += [lo, hi]
        queries.append((f"SELECT {group}, {split}, COUNT(*), SUM(cost), "
                        f"SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) FROM usage"
                        f"{_where(where)} {by}", args))
    return queries


def spent_queries(client: str, since: float, raw_day: str) -> list[tuple[str, list[Any]]]:
    """The statements whose single values add up to what `client` spent since `since`."""
    span = Span(since, None)
    queries: list[tuple[str, list[Any]]] = [
        ("SELECT COALESCE(SUM(cost), 0) FROM usage_daily WHERE client = ? AND day >= ?", [client, span.first])]
    queries += [("SELECT COALESCE(SUM(cost), 0) FROM usage WHERE client = ? AND at >= ? AND at < ?", [client, lo, hi])
                for lo, hi in span.raw]
    return queries


def merge(results: Iterable[Iterable[Sequence[Any]]], group_by: str) -> list[UsageRow]:
    totals: dict[tuple[Any, Any], list[Any]] = {}
    for rows in results:
        for group, split, requests, cost, failed in rows:
            key = (int(group) if group_by == "day" else str(group), split)
            total = totals.setdefault(key, [0, 0.0, 0])
            total[0] += int(requests or 0)
            total[1] += float(cost or 0.0)
            total[2] += int(failed or 0)
    return [UsageRow(group=day_name(g) if group_by == "day" else g, split=s, requests=n, cost=round(c, 6), failed=f)
            for (g, s), (n, c, f) in sorted(totals.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
            if n or c or f]


def _filters(client: str | None, model: str | None) -> tuple[list[str], list[Any]]:
    where, args = [], []
    for clause, value in (("client = ?", client), ("model = ?", model)):
        if value is not None:
            where.append(clause)
            args.append(value)
    return where, args


def _where(clauses: list[str]) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""
