"""`proxy store migrate`: copy a team's history from a SQLite file to PostgreSQL.

The file is only read (a running proxy may keep using it). Run it again after stopping that
proxy, and it copies what changed since: every row is keyed by where it came from, so
nothing is copied twice. Daily totals are copied as the file has them (or, from a file of
before versioned schemas, as its rows add up), and what each file contributed is recorded,
so a second run adds only the difference.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from proxy.store import ledger
from proxy.store.migrations import SchemaTooNew
from proxy.store.migrations.sqlite import LATEST as SQLITE_LATEST
from proxy.store.postgres import ADD_TO_DAILY, PostgresStore

CHUNK = 5000


class Counts(dict[str, dict[str, int]]):
    """table -> {"read": n, "new": n, "changed": n}"""

    def line(self, table: str) -> str:
        c = self[table]
        return f"{table}: {c['read']} read, {c['new']} new, {c['changed']} changed"


def sqlite_to_postgres(path: str, url: str, say: Callable[[str], Any] = print) -> Counts:
    """Copy the file at `path` into the database at `url` (schema created or upgraded first)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no SQLite file at {path}")
    source = f"sqlite:{os.path.realpath(path)}"  # the origin of every copied row
    counts = asyncio.run(_copy_all(path, source, url))
    say(f"copied {source} to PostgreSQL:")
    for table in counts:
        say("  " + counts.line(table))
    return counts


async def _copy_all(path: str, source: str, url: str) -> Counts:
    counts = Counts()
    target = await PostgresStore.open(url, max_size=2)
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            db.execute("BEGIN")  # one snapshot of the file for the whole copy
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "schema_version" in tables:
                version = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
                if version > SQLITE_LATEST:
                    raise SchemaTooNew(version, SQLITE_LATEST)
            async with target._pool.acquire() as pg:
                counts["usage rows"] = await _usage(db, pg, source)
                counts["daily totals"] = await _daily(db, pg, source, "usage_daily" in tables)
                counts["tasks"] = await _copy(pg, _rows(db, "SELECT id, state, owner, updated, record FROM tasks"),
                                              _TASKS)
                counts["idempotency records"] = await _copy(
                    pg, _rows(db, "SELECT client, key, created, record FROM idempotency"), _IDEMPOTENCY)
                durations = _rows(db, "SELECT upstream, model, durations FROM durations") \
                    if "durations" in tables else iter([])
                counts["durations"] = await _copy(pg, durations, _DURATIONS)
            db.execute("COMMIT")
    finally:
        await target.close()
    return counts


def _rows(db: sqlite3.Connection, sql: str) -> Iterator[list[tuple[Any, ...]]]:
    cursor = db.execute(sql)
    while chunk := cursor.fetchmany(CHUNK):
        yield chunk


def _tally(read: int, returned: list[Any]) -> dict[str, int]:
    new = sum(1 for r in returned if r[0])
    return {"read": read, "new": new, "changed": len(returned) - new}


# (xmax = 0) is true for a row the statement inserted, false for one it updated
_TASKS = ("INSERT INTO tasks (id, state, owner, updated, record) "
          "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::bytea[]) "
          "ON CONFLICT (id) DO UPDATE SET state = excluded.state, owner = excluded.owner, updated = excluded.updated, "
          "record = excluded.record WHERE tasks.updated < excluded.updated RETURNING (xmax = 0)")
_IDEMPOTENCY = ("INSERT INTO idempotency (client, key, created, record) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::bytea[]) "
                "ON CONFLICT (client, key) DO UPDATE SET created = excluded.created, record = excluded.record "
                "WHERE idempotency.record <> excluded.record RETURNING (xmax = 0)")
_DURATIONS = ("INSERT INTO durations (upstream, model, durations) "
              "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) "
              "ON CONFLICT (upstream, model) DO UPDATE SET durations = excluded.durations "
              "WHERE durations.durations <> excluded.durations RETURNING (xmax = 0)")


async def _copy(pg: asyncpg.Connection, chunks: Iterator[list[tuple[Any, ...]]], sql: str) -> dict[str, int]:
    total = {"read": 0, "new": 0, "changed": 0}
    for chunk in chunks:
        chunk = sorted(chunk)  # by primary key: one lock order
        returned = await pg.fetch(sql, *zip(*chunk, strict=True))
        for name, n in _tally(len(chunk), returned).items():
            total[name] += n
    return total


async def _usage(db: sqlite3.Connection, pg: asyncpg.Connection, source: str) -> dict[str, int]:
    """Raw rows, keyed by their origin; a row settled since the last run gets its new outcome."""
    total = {"read": 0, "new": 0, "changed": 0}
    for chunk in _rows(db, "SELECT id, at, client, model, upstream, key, cost, outcome, kind, task_id, request_id "
                           "FROM usage ORDER BY id"):
        columns = list(zip(*chunk, strict=True))
        origins = [f"{source}#{row_id}" for row_id in columns[0]]
        returned = await pg.fetch(
            "INSERT INTO usage (at, client, model, upstream, key, cost, outcome, kind, task_id, request_id, origin) "
            "SELECT * FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[], "
            "$7::text[], $8::text[], $9::text[], $10::text[], $11::text[]) "
            "ON CONFLICT (origin) DO UPDATE SET outcome = excluded.outcome, cost = excluded.cost "
            "WHERE (usage.outcome, usage.cost) IS DISTINCT FROM (excluded.outcome, excluded.cost) "
            "RETURNING (xmax = 0)", *columns[1:], origins)
        for name, n in _tally(len(chunk), returned).items():
            total[name] += n
    return total


async def _daily(db: sqlite3.Connection, pg: asyncpg.Connection, source: str, has_rollups: bool) -> dict[str, int]:
    """Add to the daily totals what the file holds beyond what earlier runs added from it."""
    sql = "SELECT day, client, model, upstream, requests, cost, failed FROM usage_daily" if has_rollups else (
        "SELECT CAST(at / 86400 AS INTEGER), client, model, upstream, COUNT(*), SUM(cost), SUM(outcome = 'failed') "
        "FROM usage GROUP BY 1, 2, 3, 4")
    now = {(r[0], r[1], r[2], r[3]): r[4:] for r in db.execute(sql)}
    async with pg.transaction():
        await pg.execute("LOCK TABLE usage_imports IN EXCLUSIVE MODE")  # two runs at once add once
        before = {(r[0], r[1], r[2], r[3]): tuple(r[4:]) for r in await pg.fetch(
            "SELECT day, client, model, upstream, requests, cost, failed FROM usage_imports WHERE source = $1", source)}
        deltas: ledger.Deltas = {}
        for key in now.keys() | before.keys():
            n, c, f = now.get(key, (0, 0.0, 0))
            n0, c0, f0 = before.get(key, (0, 0.0, 0))
            if (n, c, f) != (n0, c0, f0):
                ledger.add(deltas, key, n - n0, c - c0, f - f0)
        rows = ledger.rollup_rows(deltas)
        if rows:
            await pg.execute(ADD_TO_DAILY, *zip(*rows, strict=True))
        changed = [(*key, *now.get(key, (0, 0.0, 0))) for key in sorted(deltas)]
        if changed:
            await pg.execute(
                "INSERT INTO usage_imports (source, day, client, model, upstream, requests, cost, failed) "
                "SELECT $1, * FROM unnest($2::integer[], $3::text[], $4::text[], $5::text[], $6::bigint[], "
                "$7::float8[], $8::bigint[]) ON CONFLICT (source, day, client, model, upstream) DO UPDATE SET "
                "requests = excluded.requests, cost = excluded.cost, failed = excluded.failed",
                source, *zip(*changed, strict=True))
    new = sum(1 for k in deltas if k not in before)
    return {"read": len(now), "new": new, "changed": len(deltas) - new}
