"""The shared store: PostgreSQL through an asyncpg connection pool, for replicas on several
machines. It keeps the SQLite store's promises: writes are queued and grouped (batching.py),
one write transaction at a time per process, and every read waits for the writes queued
before it, so budgets see this process's own usage at once (other replicas' within
FLUSH_AFTER). Task claims lock with SKIP LOCKED, so two replicas never take the same task.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import msgspec
import structlog

from proxy.loop import running_loop
from proxy.store import UNFINISHED, IdempotencyRecord, TaskRecord, UsageRow, ledger
from proxy.store.batching import Batch, BatchedWrites, durations_decode, durations_encode, task_decode, task_encode
from proxy.store.migrations.postgres import upgrade

T = TypeVar("T")
log = structlog.get_logger("proxy.store")
_RAW_DAY = "floor(at / 86400)::integer"
_idem_decode = msgspec.msgpack.Decoder(IdempotencyRecord).decode
# a connection lost or refused: the batch is tried again, not dropped
_TRANSIENT = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError)
RETRY_FOR = 60.0  # seconds a batch is retried while the database is unreachable
_USAGE_COLUMNS = ["at", "client", "model", "upstream", "key", "cost", "outcome", "kind", "task_id", "request_id"]
ADD_TO_DAILY = (  # takes the columns of ledger.rollup_rows
    "INSERT INTO usage_daily AS d (day, client, model, upstream, requests, cost, failed) "
    "SELECT * FROM unnest($1::integer[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::float8[], $7::bigint[]) "
    "ON CONFLICT (day, client, model, upstream) DO UPDATE SET requests = d.requests + excluded.requests, "
    "cost = d.cost + excluded.cost, failed = d.failed + excluded.failed")


class StoreUnavailable(Exception):
    """The database named by [storage] url cannot be reached or refuses the proxy."""


def numbered(sql: str) -> str:
    """`?` placeholders (the ledger's shared statements) as PostgreSQL's $1, $2, …"""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


class PostgresStore(BatchedWrites):
    def __init__(self, pool: asyncpg.Pool, keep_usage_days: float) -> None:
        super().__init__()
        self._pool = pool
        self.keep_usage_days = keep_usage_days
        self._tail: asyncio.Task[None] | None = None  # the last write submitted: writes run one after another

    @classmethod
    async def open(cls, url: str, keep_usage_days: float = 90.0, max_size: int = 10) -> PostgresStore:
        """Connect (a pool of up to `max_size` connections) and bring the schema up to date."""
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=max_size,
                                             server_settings={"application_name": "xf-openai-proxy"})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            parts = urlsplit(url)
            raise StoreUnavailable(f"PostgreSQL at {parts.hostname}:{parts.port or 5432}{parts.path} cannot be used "
                                   f"([storage] url): {error}") from None
        try:
            async with pool.acquire() as db:
                await upgrade(db)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, keep_usage_days)

    # ---- the order of writes and reads ------------------------------------------------

    def _submit(self, batch: Batch) -> asyncio.Task[None]:
        self._tail = running_loop().create_task(self._write_after(self._tail, batch))
        return self._tail

    async def _write_after(self, previous: asyncio.Task[None] | None, batch: Batch) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):  # its failure is logged where it is reported
                await previous
        deadline = time.monotonic() + RETRY_FOR
        pause = 0.05
        while True:
            try:
                return await self._write(batch)
            except _TRANSIENT as error:
                if time.monotonic() > deadline:
                    raise
                log.warning("store_write_retried", error=repr(error), usage=len(batch.usage), tasks=len(batch.tasks))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _settled(self) -> None:
        """Submit what is queued and wait until every write submitted so far is done."""
        self._flush()
        tail = self._tail
        if tail is not None and not tail.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(tail)

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        await self._settled()
        async with self._pool.acquire() as db:
            return await work(db)

    async def _write(self, batch: Batch) -> None:
        """One batch, one transaction: raw usage rows and their daily rollups change together."""
        deltas = ledger.of_records(batch.usage)
        async with self._pool.acquire() as db, db.transaction():
            if not batch.tasks:
                # nobody waits on this one and a crash loses the queue anyway: no wait for the flush to disk
                await db.execute("SET LOCAL synchronous_commit = off")
            if batch.usage:  # binary COPY: a third of the time of an INSERT from arrays
                await db.copy_records_to_table("usage", columns=_USAGE_COLUMNS, records=[
                    (r.at, r.client, r.model, r.upstream, r.key, r.cost, r.outcome, r.kind, r.task_id, r.request_id)
                    for r in batch.usage])
            if batch.settles:
                rows = await db.fetch(
                    "SELECT id, at, client, model, upstream, cost, outcome, task_id FROM usage "
                    "WHERE task_id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                    sorted({task_id for task_id, _, _ in batch.settles}))
                changed = ledger.settle([tuple(r) for r in rows], batch.settles, deltas)  # type: ignore[misc]
                if changed:
                    await db.execute(
                        "UPDATE usage SET outcome = v.outcome, cost = v.cost "
                        "FROM unnest($1::text[], $2::float8[], $3::bigint[]) AS v(outcome, cost, id) "
                        "WHERE usage.id = v.id", *zip(*changed, strict=True))
            rollups = ledger.rollup_rows(deltas)
            if rollups:
                await db.execute(ADD_TO_DAILY, *zip(*rollups, strict=True))
            if batch.tasks:
                await db.execute(
                    "INSERT INTO tasks (id, state, owner, updated, record) "
                    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::bytea[]) "
                    "ON CONFLICT (id) DO UPDATE SET state = excluded.state, owner = excluded.owner, "
                    "updated = excluded.updated, record = excluded.record", *zip(*batch.last_task_rows(), strict=True))
            if batch.durations:
                keys = sorted(batch.durations)
                await db.execute(
                    "INSERT INTO durations (upstream, model, durations) "
                    "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) "
                    "ON CONFLICT (upstream, model) DO UPDATE SET durations = excluded.durations",
                    [u for u, _ in keys], [m for _, m in keys], [durations_encode(batch.durations[k]) for k in keys])
            if batch.calls:
                keys = sorted(batch.calls)
                await db.execute(
                    "INSERT INTO key_calls (upstream, key, calls) "
                    "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) "
                    "ON CONFLICT (upstream, key) DO UPDATE SET calls = excluded.calls",
                    [u for u, _ in keys], [k for _, k in keys], [durations_encode(batch.calls[k]) for k in keys])

    # ---- usage ----------------------------------------------------------------------

    async def spent(self, client: str, since: float) -> float:
        queries = ledger.spent_queries(client, since, _RAW_DAY)

        async def total(db: asyncpg.Connection) -> float:
            return float(sum([await db.fetchval(numbered(sql), *args) for sql, args in queries]))

        return await self._run(total)

    async def usage(self, *, client: str | None, model: str | None, since: float | None, until: float | None,
                    group_by: str, split_by: str | None = None) -> list[UsageRow]:
        queries = ledger.usage_queries(ledger.Span(since, until), client, model, group_by, split_by, _RAW_DAY)

        async def query(db: asyncpg.Connection) -> list[list[Any]]:
            return [await db.fetch(numbered(sql), *args) for sql, args in queries]

        return ledger.merge(await self._run(query), group_by)

    async def load_durations(self) -> dict[tuple[str, str], list[float]]:
        rows = await self._run(lambda db: db.fetch("SELECT upstream, model, durations FROM durations"))
        return {(r[0], r[1]): durations_decode(r[2]) for r in rows}

    async def load_calls(self) -> dict[tuple[str, str], list[float]]:
        rows = await self._run(lambda db: db.fetch("SELECT upstream, key, calls FROM key_calls"))
        return {(r[0], r[1]): durations_decode(r[2]) for r in rows}

    # ---- tasks ----------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        blob = await self._run(lambda db: db.fetchval("SELECT record FROM tasks WHERE id = $1", task_id))
        return task_decode(blob) if blob is not None else None

    async def task_counts(self) -> dict[str, int]:
        rows = await self._run(lambda db: db.fetch("SELECT state, COUNT(*) FROM tasks GROUP BY state"))
        return {r[0]: int(r[1]) for r in rows}

    async def recent_tasks(self, limit: int = 100, states: tuple[str, ...] | None = None) -> list[TaskRecord]:
        if states:
            rows = await self._run(lambda db: db.fetch(
                "SELECT record FROM tasks WHERE state = ANY($1::text[]) ORDER BY updated DESC LIMIT $2",
                list(states), limit))
        else:
            rows = await self._run(lambda db: db.fetch("SELECT record FROM tasks ORDER BY updated DESC LIMIT $1",
                                                       limit))
        return [task_decode(r[0]) for r in rows]

    async def unfinished_owners(self) -> list[str]:
        rows = await self._run(lambda db: db.fetch(
            "SELECT DISTINCT owner FROM tasks WHERE state = ANY($1::text[]) AND owner IS NOT NULL", list(UNFINISHED)))
        return [r[0] for r in rows]

    async def claim_unfinished(self, owner: str, stale_before: float,
                               dead: list[str] | None = None) -> list[TaskRecord]:
        """Take over unfinished tasks nobody polls: released ones, ones whose owner went silent,
        and ones of owners known to be dead. Rows another replica is claiming are skipped."""

        async def claim(db: asyncpg.Connection) -> list[TaskRecord]:
            now = time.time()
            async with db.transaction():
                # silent: neither the task nor its owner's heartbeat is newer than stale_before
                rows = await db.fetch(
                    "SELECT record FROM tasks WHERE state = ANY($1::text[]) AND (owner IS NULL "
                    "OR owner = ANY($2::text[]) OR (updated < $3 AND owner NOT IN "
                    "(SELECT owner FROM owners WHERE beat >= $3))) ORDER BY id FOR UPDATE SKIP LOCKED",
                    list(UNFINISHED), dead or [], stale_before)
                records = [task_decode(r[0]) for r in rows]
                for record in records:
                    record.owner, record.updated = owner, now
                if records:
                    await db.execute(
                        "UPDATE tasks SET owner = $1, updated = $2, record = v.record "
                        "FROM unnest($3::text[], $4::bytea[]) AS v(id, record) WHERE tasks.id = v.id",
                        owner, now, [r.id for r in records], [task_encode(r) for r in records])
            return records

        return await self._run(claim)

    async def heartbeat(self, owner: str) -> None:
        """One row per process, not an update of every task it polls ("The store's periodic work")."""
        await self._run(lambda db: db.execute(
            "INSERT INTO owners (owner, beat) VALUES ($1, $2) ON CONFLICT (owner) DO UPDATE SET beat = excluded.beat",
            owner, time.time()))

    async def release(self, owner: str) -> None:
        """On shutdown: unfinished tasks become claimable at once by the next process."""

        async def release(db: asyncpg.Connection) -> None:
            async with db.transaction():
                rows = await db.fetch("SELECT record FROM tasks WHERE owner = $1 AND state = ANY($2::text[]) "
                                      "ORDER BY id FOR UPDATE", owner, list(UNFINISHED))
                records = [task_decode(r[0]) for r in rows]
                for record in records:
                    record.owner = None
                if records:
                    await db.execute("UPDATE tasks SET owner = NULL, record = v.record "
                                     "FROM unnest($1::text[], $2::bytea[]) AS v(id, record) WHERE tasks.id = v.id",
                                     [r.id for r in records], [task_encode(r) for r in records])
                await db.execute("DELETE FROM owners WHERE owner = $1", owner)

        await self._run(release)

    async def purge(self, tasks_before: float, idempotency_before: float) -> None:
        """Old final tasks, idempotency records, owners long gone, and raw usage rows older than
        keep_usage_days (the daily rollups stay)."""
        usage_before = time.time() - self.keep_usage_days * ledger.DAY

        async def purge(db: asyncpg.Connection) -> None:
            await db.execute("DELETE FROM tasks WHERE state IN ('succeeded', 'failed', 'timeout') AND updated < $1",
                             tasks_before)
            await db.execute("DELETE FROM idempotency WHERE created < $1", idempotency_before)
            await db.execute("DELETE FROM owners WHERE beat < $1", tasks_before)
            await db.execute("DELETE FROM usage WHERE at < $1", usage_before)

        await self._run(purge)

    # ---- idempotency ----------------------------------------------------------------

    async def idempotency_begin(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        """Insert the record unless one exists; answer the existing one, or None when inserted.
        Atomic across replicas: the insert decides."""
        blob = msgspec.msgpack.encode(record)

        async def begin(db: asyncpg.Connection) -> IdempotencyRecord | None:
            while True:
                inserted = await db.fetchval(
                    "INSERT INTO idempotency (client, key, created, record) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (client, key) DO NOTHING RETURNING true",
                    record.client, record.key, record.created, blob)
                if inserted:
                    return None
                existing = await db.fetchval("SELECT record FROM idempotency WHERE client = $1 AND key = $2",
                                             record.client, record.key)
                if existing is not None:  # else dropped in between: insert again
                    return _idem_decode(existing)

        return await self._run(begin)

    async def idempotency_get(self, client: str, key: str) -> IdempotencyRecord | None:
        blob = await self._run(lambda db: db.fetchval(
            "SELECT record FROM idempotency WHERE client = $1 AND key = $2", client, key))
        return _idem_decode(blob) if blob is not None else None

    async def idempotency_finish(self, record: IdempotencyRecord) -> None:
        blob = msgspec.msgpack.encode(record)
        await self._run(lambda db: db.execute("UPDATE idempotency SET record = $1 WHERE client = $2 AND key = $3",
                                              blob, record.client, record.key))

    async def idempotency_drop(self, client: str, key: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM idempotency WHERE client = $1 AND key = $2", client, key))

    async def close(self) -> None:
        await self._settled()
        await self._pool.close()
