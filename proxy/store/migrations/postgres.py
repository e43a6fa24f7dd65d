"""The PostgreSQL schema, by version. Replicas that start together all call `upgrade`; a
transaction-scoped advisory lock lets one apply each version while the others wait, then find
it recorded. (The statements are plain CREATEs: one run twice would fail, not pass silently.)"""

from __future__ import annotations

import time

import asyncpg  # type: ignore[import-untyped]

from proxy.store.migrations import SchemaTooNew

LOCK = 0x7866_5F70_726F_7879  # "xf_proxy": the advisory lock id of schema upgrades

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        "CREATE TABLE usage (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at DOUBLE PRECISION NOT NULL, "
        "client TEXT NOT NULL, model TEXT NOT NULL, upstream TEXT NOT NULL, key TEXT NOT NULL, "
        "cost DOUBLE PRECISION NOT NULL, outcome TEXT NOT NULL, kind TEXT NOT NULL, task_id TEXT, request_id TEXT, "
        "origin TEXT)",  # origin: where `proxy store migrate` copied the row from (copied once)
        "CREATE INDEX usage_client_at ON usage (client, at)",
        "CREATE INDEX usage_at ON usage (at)",
        "CREATE INDEX usage_task ON usage (task_id) WHERE task_id IS NOT NULL",
        "CREATE UNIQUE INDEX usage_origin ON usage (origin)",
        # usage per UTC day (day number since 1970-01-01), kept as rows are written
        "CREATE TABLE usage_daily (day INTEGER NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL, "
        "upstream TEXT NOT NULL, requests BIGINT NOT NULL, cost DOUBLE PRECISION NOT NULL, failed BIGINT NOT NULL, "
        "PRIMARY KEY (day, client, model, upstream))",
        "CREATE INDEX usage_daily_client ON usage_daily (client, day)",
        # what `proxy store migrate` added to usage_daily per source, so that a second run adds the difference
        "CREATE TABLE usage_imports (source TEXT NOT NULL, day INTEGER NOT NULL, client TEXT NOT NULL, "
        "model TEXT NOT NULL, upstream TEXT NOT NULL, requests BIGINT NOT NULL, cost DOUBLE PRECISION NOT NULL, "
        "failed BIGINT NOT NULL, PRIMARY KEY (source, day, client, model, upstream))",
        "CREATE TABLE tasks (id TEXT PRIMARY KEY, state TEXT NOT NULL, owner TEXT, updated DOUBLE PRECISION NOT NULL, "
        "record BYTEA NOT NULL)",
        "CREATE INDEX tasks_state ON tasks (state, updated)",
        "CREATE INDEX tasks_updated ON tasks (updated)",
        "CREATE TABLE owners (owner TEXT PRIMARY KEY, beat DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE idempotency (client TEXT NOT NULL, key TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, "
        "record BYTEA NOT NULL, PRIMARY KEY (client, key))",
        "CREATE INDEX idempotency_created ON idempotency (created)",
        "CREATE TABLE durations (upstream TEXT NOT NULL, model TEXT NOT NULL, durations BYTEA NOT NULL, "
        "PRIMARY KEY (upstream, model))",
    ]),
    (2, [
        # each upstream key's recent calls (wall time, count), so a restart keeps counting its window
        "CREATE TABLE key_calls (upstream TEXT NOT NULL, key TEXT NOT NULL, calls BYTEA NOT NULL, "
        "PRIMARY KEY (upstream, key))",
    ]),
]
LATEST = MIGRATIONS[-1][0]


async def upgrade(db: asyncpg.Connection) -> int:
    """Bring the database to the latest version; answers the version it was at."""
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                         "applied DOUBLE PRECISION NOT NULL)")
        found = int(await db.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
        if found > LATEST:
            raise SchemaTooNew(found, LATEST)
        for version, statements in MIGRATIONS:
            if version > found:
                for statement in statements:
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version, applied) VALUES ($1, $2)", version, time.time())
    return found
