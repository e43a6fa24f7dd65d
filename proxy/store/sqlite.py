"""The embedded store: one SQLite file (WAL), every statement on one dedicated thread.

The event loop never blocks on the disk: calls hop to the store's thread and back. Writes
are queued and grouped (proxy/store/batching.py); every later read runs after them on the
same thread, so budgets always see them. The file is created readable by its owner only.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from proxy.loop import running_loop
from proxy.store import UNFINISHED, IdempotencyRecord, TaskRecord, UsageRow, ledger
from proxy.store.batching import FLUSH_AFTER, Batch, BatchedWrites, durations_decode, durations_encode, task_decode
from proxy.store.batching import task_encode as _task_encode
from proxy.store.migrations.sqlite import upgrade

__all__ = ["FLUSH_AFTER", "SQLiteStore"]

T = TypeVar("T")

_IS_UNFINISHED = f"state IN ({','.join('?' * len(UNFINISHED))})"  # takes *UNFINISHED as arguments
_RAW_DAY = "CAST(at / 86400 AS INTEGER)"  # the UTC day number of a raw row (at is never negative)
_idem_decode = msgspec.msgpack.Decoder(IdempotencyRecord).decode


def _use_wal(db: sqlite3.Connection, within: float = 120.0) -> None:
    """WAL mode. Processes opening a new file at once race to switch it, and SQLite answers
    the losers 'locked' at once rather than through the busy timeout: they try again."""
    deadline = time.monotonic() + within
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class SQLiteStore(BatchedWrites):
    def __init__(self, path: str, keep_usage_days: float = 90.0) -> None:
        super().__init__()
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.keep_usage_days = keep_usage_days
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db = self._pool.submit(self._open, path).result()

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        if path != ":memory:":
            # owner-only from the first byte; SQLite gives the -wal and -shm files the same mode
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=120.0)
        _use_wal(db)
        db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL keeps it fast
        upgrade(db)  # waits (up to the timeout above) while another process upgrades the same file
        db.execute("PRAGMA busy_timeout = 10000")
        return db

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self._flush()  # queued writes first: the store's one thread keeps the order
        return await running_loop().run_in_executor(self._pool, work, self._db)

    def _submit(self, batch: Batch) -> Any:
        return self._pool.submit(_write, self._db, batch)

    # ---- usage ----------------------------------------------------------------------

    async def spent(self, client: str, since: float) -> float:
        queries = ledger.spent_queries(client, since, _RAW_DAY)
        return await self._run(lambda db: float(sum(db.execute(sql, args).fetchone()[0] for sql, args in queries)))

    async def usage(self, *, client: str | None, model: str | None, since: float | None, until: float | None,
                    group_by: str, split_by: str | None = None) -> list[UsageRow]:
        queries = ledger.usage_queries(ledger.Span(since, until), client, model, group_by, split_by, _RAW_DAY)
        results = await self._run(lambda db: [db.execute(sql, args).fetchall() for sql, args in queries])
        return ledger.merge(results, group_by)

    async def load_durations(self) -> dict[tuple[str, str], list[float]]:
        rows = await self._run(lambda db: db.execute("SELECT upstream, model, durations FROM durations").fetchall())
        return {(upstream, model): durations_decode(blob) for upstream, model, blob in rows}

    async def load_calls(self) -> dict[tuple[str, str], list[float]]:
        rows = await self._run(lambda db: db.execute("SELECT upstream, key, calls FROM key_calls").fetchall())
        return {(upstream, key): durations_decode(blob) for upstream, key, blob in rows}

    # ---- tasks ----------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def get(db: sqlite3.Connection) -> TaskRecord | None:
            row = db.execute("SELECT record FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return task_decode(row[0]) if row else None

        return await self._run(get)

    async def task_counts(self) -> dict[str, int]:
        return dict(await self._run(lambda db: db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state")
                                    .fetchall()))

    async def recent_tasks(self, limit: int = 100, states: tuple[str, ...] | None = None) -> list[TaskRecord]:
        where = f"WHERE state IN ({','.join('?' * len(states))}) " if states else ""
        sql = f"SELECT record FROM tasks {where}ORDER BY updated DESC LIMIT ?"
        rows = await self._run(lambda db: db.execute(sql, (*(states or ()), limit)).fetchall())
        return [task_decode(r[0]) for r in rows]

    async def unfinished_owners(self) -> list[str]:
        return await self._run(lambda db: [r[0] for r in db.execute(
            f"SELECT DISTINCT owner FROM tasks WHERE {_IS_UNFINISHED} AND owner IS NOT NULL", UNFINISHED)])

    async def claim_unfinished(self, owner: str, stale_before: float,
                               dead: list[str] | None = None) -> list[TaskRecord]:
        """Take over unfinished tasks nobody polls: released ones, ones whose owner went silent,
        and ones of owners known to be dead."""
        dead = dead or []
        dead_marks = ",".join("?" * len(dead)) or "NULL"

        def claim(db: sqlite3.Connection) -> list[TaskRecord]:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                # silent: neither the task nor its owner's heartbeat is newer than stale_before
                rows = db.execute(
                    f"SELECT record FROM tasks WHERE {_IS_UNFINISHED} AND (owner IS NULL OR owner IN ({dead_marks}) "
                    "OR (updated < ? AND owner NOT IN (SELECT owner FROM owners WHERE beat >= ?)))",
                    (*UNFINISHED, *dead, stale_before, stale_before)).fetchall()
                records = [task_decode(r[0]) for r in rows]
                for record in records:
                    record.owner, record.updated = owner, now
                    db.execute("UPDATE tasks SET owner = ?, updated = ?, record = ? WHERE id = ?",
                               (owner, now, _task_encode(record), record.id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return records

        return await self._run(claim)

    async def heartbeat(self, owner: str) -> None:
        """One row per process, not an update of every task it polls ("The store's periodic work")."""
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO owners (owner, beat) VALUES (?, ?)",
                                              (owner, time.time())))

    async def release(self, owner: str) -> None:
        """On shutdown: unfinished tasks become claimable at once by the next process."""
        def release(db: sqlite3.Connection) -> None:
            rows = db.execute(f"SELECT record FROM tasks WHERE owner = ? AND {_IS_UNFINISHED}",
                              (owner, *UNFINISHED)).fetchall()
            for (blob,) in rows:
                record = task_decode(blob)
                record.owner = None
                db.execute("UPDATE tasks SET owner = NULL, record = ? WHERE id = ?", (_task_encode(record), record.id))
            db.execute("DELETE FROM owners WHERE owner = ?", (owner,))

        await self._run(release)

    async def purge(self, tasks_before: float, idempotency_before: float) -> None:
        """Old final tasks, idempotency records, owners long gone, and raw usage rows older than
        keep_usage_days (the daily rollups stay)."""
        usage_before = time.time() - self.keep_usage_days * ledger.DAY

        def purge(db: sqlite3.Connection) -> None:
            # by final state, so that the (state, updated) index finds them: no scan of every task
            db.execute("DELETE FROM tasks WHERE state IN ('succeeded', 'failed', 'timeout') AND updated < ?",
                       (tasks_before,))
            db.execute("DELETE FROM idempotency WHERE created < ?", (idempotency_before,))
            db.execute("DELETE FROM owners WHERE beat < ?", (tasks_before,))  # processes long gone
            db.execute("DELETE FROM usage WHERE at < ?", (usage_before,))

        await self._run(purge)

    # ---- idempotency ----------------------------------------------------------------

    async def idempotency_begin(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        """Insert the record unless one exists; answer the existing one, or None when inserted."""
        blob = msgspec.msgpack.encode(record)

        def begin(db: sqlite3.Connection) -> IdempotencyRecord | None:
            row = db.execute("SELECT record FROM idempotency WHERE client = ? AND key = ?",
                             (record.client, record.key)).fetchone()
            if row:
                return _idem_decode(row[0])
            db.execute("INSERT INTO idempotency (client, key, created, record) VALUES (?, ?, ?, ?)",
                       (record.client, record.key, record.created, blob))
            return None

        return await self._run(begin)

    async def idempotency_get(self, client: str, key: str) -> IdempotencyRecord | None:
        def get(db: sqlite3.Connection) -> IdempotencyRecord | None:
            row = db.execute("SELECT record FROM idempotency WHERE client = ? AND key = ?", (client, key)).fetchone()
            return _idem_decode(row[0]) if row else None

        return await self._run(get)

    async def idempotency_finish(self, record: IdempotencyRecord) -> None:
        blob = msgspec.msgpack.encode(record)
        await self._run(lambda db: db.execute(
            "UPDATE idempotency SET record = ? WHERE client = ? AND key = ?", (blob, record.client, record.key)))

    async def idempotency_drop(self, client: str, key: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM idempotency WHERE client = ? AND key = ?", (client, key)))

    async def close(self) -> None:
        await self._run(lambda db: db.close())
        self._pool.shutdown(wait=True)


def _write(db: sqlite3.Connection, batch: Batch) -> None:
    """One batch, one transaction: raw usage rows and their daily rollups change together."""
    deltas = ledger.of_records(batch.usage)
    with db:
        db.execute("BEGIN")
        _execute_rows(db, "INSERT INTO usage (at, client, model, upstream, key, cost, outcome, kind, task_id, "
                          "request_id) VALUES {rows}",
                      [(r.at, r.client, r.model, r.upstream, r.key, r.cost, r.outcome, r.kind, r.task_id,
                        r.request_id) for r in batch.usage])
        if batch.settles:
            tasks = sorted({task_id for task_id, _, _ in batch.settles})
            rows = []
            for start in range(0, len(tasks), 500):  # under SQLite's limit on bound values
                chunk = tasks[start:start + 500]
                rows += db.execute("SELECT id, at, client, model, upstream, cost, outcome, task_id FROM usage "
                                   f"WHERE task_id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            _execute_rows(db, "UPDATE usage SET outcome = s.column1, cost = s.column2 FROM (VALUES {rows}) AS s "
                              "WHERE usage.id = s.column3", ledger.settle(rows, batch.settles, deltas))
        _execute_rows(db, "INSERT INTO usage_daily (day, client, model, upstream, requests, cost, failed) "
                          "VALUES {rows} ON CONFLICT (day, client, model, upstream) DO UPDATE SET "
                          "requests = requests + excluded.requests, cost = cost + excluded.cost, "
                          "failed = failed + excluded.failed", ledger.rollup_rows(deltas))
        # an upsert, not INSERT OR REPLACE (a delete and an insert): one write a row, not two
        _execute_rows(db, "INSERT INTO tasks (id, state, owner, updated, record) VALUES {rows} "
                          "ON CONFLICT (id) DO UPDATE SET state = excluded.state, owner = excluded.owner, "
                          "updated = excluded.updated, record = excluded.record", batch.tasks)
        _execute_rows(db, "INSERT INTO durations (upstream, model, durations) VALUES {rows} "
                          "ON CONFLICT (upstream, model) DO UPDATE SET durations = excluded.durations",
                      [(u, m, durations_encode(d)) for (u, m), d in batch.durations.items()])
        _execute_rows(db, "INSERT INTO key_calls (upstream, key, calls) VALUES {rows} "
                          "ON CONFLICT (upstream, key) DO UPDATE SET calls = excluded.calls",
                      [(u, k, durations_encode(c)) for (u, k), c in batch.calls.items()])


ROWS_A_STATEMENT = 256
# A few statement lengths, not one for every count: each length is a prepared statement in the
# connection's cache.
_LENGTHS = (ROWS_A_STATEMENT, 64, 16, 4, 1)


def _execute_rows(db: sqlite3.Connection, template: str, rows: Sequence[Sequence[Any]]) -> None:
    """`template` with its {rows} a VALUES list of up to ROWS_A_STATEMENT rows, not once a row as
    executemany does: Python's sqlite3 lets the GIL go around each statement it runs, and each
    time this thread waits up to sys.getswitchinterval() for the event loop's thread to give it
    back (bench/README.md, "The store's writes and the GIL")."""
    start = 0
    for length in _LENGTHS:
        while len(rows) - start >= length:
            chunk = rows[start:start + length]
            marks = f"({','.join('?' * len(chunk[0]))})"
            db.execute(template.format(rows=",".join([marks] * length)), [value for row in chunk for value in row])
            start += length
