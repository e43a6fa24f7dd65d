"""The embedded store: one SQLite file (WAL), every statement on one dedicated thread.

The event loop never blocks on the disk: calls hop to the store's thread and back. Usage
inserts are not awaited by requests (`add_usage` queues them); every later read runs after
them on the same thread, so budgets always see them. Task saves are awaited but committed
in groups: those that arrive while a write is under way go together in the next one (when
thousands of tasks end within seconds, one transaction each kept answers waiting for seconds).
A task's final state is queued like usage: nobody waits for it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog

from proxy.store import UNFINISHED, IdempotencyRecord, TaskRecord, UsageRecord, UsageRow

T = TypeVar("T")
log = structlog.get_logger("proxy.store")
FLUSH_AFTER = 0.2  # seconds a usage record may wait to be written with others

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL,
    upstream TEXT NOT NULL, key TEXT NOT NULL, cost REAL NOT NULL, outcome TEXT NOT NULL,
    kind TEXT NOT NULL, task_id TEXT, request_id TEXT);
CREATE INDEX IF NOT EXISTS usage_client_at ON usage (client, at);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
CREATE INDEX IF NOT EXISTS usage_task ON usage (task_id) WHERE task_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, state TEXT NOT NULL, owner TEXT,
    updated REAL NOT NULL, record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state, updated);
CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, beat REAL NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (client TEXT NOT NULL, key TEXT NOT NULL, created REAL NOT NULL,
    record BLOB NOT NULL, PRIMARY KEY (client, key));
"""

_IS_UNFINISHED = f"state IN ({','.join('?' * len(UNFINISHED))})"  # takes *UNFINISHED as arguments
_GROUPS = {"client": "client", "model": "model", "day": "date(at, 'unixepoch')", "upstream": "upstream"}

_task_encode = msgspec.msgpack.Encoder().encode
_task_decode = msgspec.msgpack.Decoder(TaskRecord).decode
_idem_decode = msgspec.msgpack.Decoder(IdempotencyRecord).decode


class SQLiteStore:
    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._pending: list[tuple[Any, ...]] = []
        self._settles: list[tuple[Any, ...]] = []
        self._tasks: list[tuple[Any, ...]] = []  # task rows to upsert, and who waits for them
        self._task_waiters: list[asyncio.Future[None]] = []
        self._writing = 0  # writes submitted and not yet done
        self._soon = False  # a flush of awaited task rows is scheduled
        self._later = False  # the FLUSH_AFTER timer for what nobody waits for is pending
        self._db = self._pool.submit(self._open, path).result()

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL keeps it fast
        db.executescript(_SCHEMA)
        return db

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self._flush()  # queued usage first: the store's one thread keeps the order
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, self._db)

    # ---- usage ----------------------------------------------------------------------

    def add_usage(self, record: UsageRecord) -> None:
        """Queue a record; queued ones are written together, one transaction every FLUSH_AFTER
        seconds or before any other statement, so every read sees them."""
        self._pending.append((record.at, record.client, record.model, record.upstream, record.key, record.cost,
                              record.outcome, record.kind, record.task_id, record.request_id))
        self._flush_later()

    def settle_usage(self, task_id: str, outcome: str, cost: float | None) -> None:
        """A task's final outcome, and the cost the upstream reported at the end, if any; queued
        like new records (thousands of tasks may end within a second), so reads see it."""
        self._settles.append((outcome, cost, task_id))
        self._flush_later()

    def _flush_later(self) -> None:
        if self._later:
            return
        try:
            asyncio.get_running_loop().call_later(FLUSH_AFTER, self._flush_due)
            self._later = True
        except RuntimeError:  # called outside the event loop (tools, tests): write now
            self._flush()

    def _flush_due(self) -> None:
        self._later = False
        self._flush()

    def _flush(self) -> None:
        """Submit everything queued as one transaction (before any other statement: order)."""
        self._soon = False
        if not self._pending and not self._settles and not self._tasks:
            return
        rows, self._pending = self._pending, []
        settles, self._settles = self._settles, []
        tasks, self._tasks = self._tasks, []
        waiters, self._task_waiters = self._task_waiters, []

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.executemany(
                    "INSERT INTO usage (at, client, model, upstream, key, cost, outcome, kind, task_id, request_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                db.executemany("UPDATE usage SET outcome = ?, cost = COALESCE(?, cost) WHERE task_id = ?", settles)
                # an upsert, not INSERT OR REPLACE (a delete and an insert): 7 µs a row, not 11
                db.executemany("INSERT INTO tasks (id, state, owner, updated, record) VALUES (?, ?, ?, ?, ?) "
                               "ON CONFLICT (id) DO UPDATE SET state = excluded.state, owner = excluded.owner, "
                               "updated = excluded.updated, record = excluded.record", tasks)

        done = self._pool.submit(write, self._db)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the event loop (tools, tests): nobody awaits
            done.add_done_callback(_log_failure)
            return
        self._writing += 1
        done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._written, f, waiters))

    def _written(self, done: Any, waiters: list[asyncio.Future[None]]) -> None:
        self._writing -= 1
        error = done.exception()
        if error is not None:
            log.error("store_write_failed", error=repr(error))
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)
        if self._task_waiters and not self._writing:
            self._flush()  # the awaited task rows that arrived meanwhile: the next group

    async def spent(self, client: str, since: float) -> float:
        def total(db: sqlite3.Connection) -> float:
            row = db.execute("SELECT COALESCE(SUM(cost), 0) FROM usage WHERE client = ? AND at >= ?",
                             (client, since)).fetchone()
            return float(row[0])

        return await self._run(total)

    async def usage(self, *, client: str | None, model: str | None, since: float | None, until: float | None,
                    group_by: str) -> list[UsageRow]:
        group = _GROUPS[group_by]
        where, args = [], []
        for clause, value in (("client = ?", client), ("model = ?", model), ("at >= ?", since), ("at < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = (f"SELECT {group} AS g, COUNT(*), COALESCE(SUM(cost), 0), SUM(outcome = 'failed') FROM usage "
               f"{'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY g ORDER BY g")

        def query(db: sqlite3.Connection) -> list[UsageRow]:
            return [UsageRow(group=str(g), requests=n, cost=round(float(c), 6), failed=int(f or 0))
                    for g, n, c, f in db.execute(sql, args)]

        return await self._run(query)

    # ---- tasks ----------------------------------------------------------------------

    async def save_task(self, record: TaskRecord) -> None:
        """Written and committed when this returns, together with the saves around it."""
        self._queue_task(record)
        waiter = asyncio.get_running_loop().create_future()
        self._task_waiters.append(waiter)
        if not self._writing and not self._soon:
            self._soon = True  # the other saves of this turn of the loop join in
            asyncio.get_running_loop().call_soon(self._flush)
        await waiter

    def finish_task(self, record: TaskRecord) -> None:
        """A task's final state, queued like usage and written with it, within FLUSH_AFTER
        seconds, and not waited for: its answer need not wait on the disk. When thousands of
        tasks end within seconds, a transaction each cost the store thread a core's fifth
        (bench/README.md). Reads in this process flush it first; if the process dies before the
        write, the task is still unfinished in the store and the next process polls it to its
        end again."""
        self._queue_task(record)
        self._flush_later()

    def _queue_task(self, record: TaskRecord) -> None:
        record.updated = time.time()
        self._tasks.append((record.id, record.state, record.owner, record.updated, _task_encode(record)))

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def get(db: sqlite3.Connection) -> TaskRecord | None:
            row = db.execute("SELECT record FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return _task_decode(row[0]) if row else None

        return await self._run(get)

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
                records = [_task_decode(r[0]) for r in rows]
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
        """One row per process, not an update of every task it polls (10,000 rows every 10 s)."""
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO owners (owner, beat) VALUES (?, ?)",
                                              (owner, time.time())))

    async def release(self, owner: str) -> None:
        """On shutdown: unfinished tasks become claimable at once by the next process."""
        def release(db: sqlite3.Connection) -> None:
            rows = db.execute(f"SELECT record FROM tasks WHERE owner = ? AND {_IS_UNFINISHED}",
                              (owner, *UNFINISHED)).fetchall()
            for (blob,) in rows:
                record = _task_decode(blob)
                record.owner = None
                db.execute("UPDATE tasks SET owner = NULL, record = ? WHERE id = ?", (_task_encode(record), record.id))
            db.execute("DELETE FROM owners WHERE owner = ?", (owner,))

        await self._run(release)

    async def purge(self, tasks_before: float, idempotency_before: float) -> None:

        def purge(db: sqlite3.Connection) -> None:
            # by final state, so that the (state, updated) index finds them: no scan of every task
            db.execute("DELETE FROM tasks WHERE state IN ('succeeded', 'failed', 'timeout') AND updated < ?",
                       (tasks_before,))
            db.execute("DELETE FROM idempotency WHERE created < ?", (idempotency_before,))
            db.execute("DELETE FROM owners WHERE beat < ?", (tasks_before,))  # processes long gone

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


def _log_failure(future: Any) -> None:
    if future.exception() is not None:
        log.error("store_write_failed", error=repr(future.exception()))
