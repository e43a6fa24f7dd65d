"""Both store implementations for the tests: `any_store` opens a fresh, empty store of each
kind (parametrised by `store_kind`), SQLite in tmp_path and PostgreSQL in a schema of its own
inside a database this session creates and drops (other users of the server are untouched).

PostgreSQL comes from DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test). When it
cannot be reached the PostgreSQL cases skip with the reason, except in CI (CI=true), where
they fail. Import the fixtures into a test module: `from stores import any_store, store_kind`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import msgspec
import pytest

from proxy.store import IdempotencyRecord, Store, TaskRecord, UsageRecord
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
_schemas = itertools.count(1)


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&search_path={schema}" if parts.query else f"search_path={schema}"
    return urlunsplit(parts._replace(query=query))


async def _execute(url: str, *statements: str) -> None:
    db = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await db.execute(statement)
    finally:
        await db.close()


@dataclass
class PgServer:
    admin_url: str  # the database given by DATABASE_URL: only CREATE/DROP DATABASE run there
    url: str  # this session's own database

    def fresh_database(self) -> str:
        """A new empty database (dropped at the end of the session), for tests that need one."""
        name = f"xfp_store_{os.getpid()}_{secrets.token_hex(4)}"
        asyncio.run(_execute(self.admin_url, f'CREATE DATABASE "{name}"'))
        self._extra.append(name)
        return _with_database(self.admin_url, name)

    def fresh_schema(self) -> str:
        """A URL whose tables land in a new empty schema of the session's database."""
        name = f"t{next(_schemas)}_{secrets.token_hex(3)}"
        asyncio.run(_execute(self.url, f'CREATE SCHEMA "{name}"'))
        return _with_schema(self.url, name)

    def __post_init__(self) -> None:
        self._extra: list[str] = []


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    admin_url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    name = f"xfp_store_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        asyncio.run(_execute(admin_url, f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        where = urlsplit(admin_url)
        first_line = (str(error).splitlines() or [""])[0]
        reason = f"PostgreSQL at {where.hostname}:{where.port or 5432} is not usable ({type(error).__name__}: " \
                 f"{first_line}); set DATABASE_URL"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = PgServer(admin_url, _with_database(admin_url, name))
    yield server
    for database in [name, *server._extra]:
        asyncio.run(_execute(admin_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


@dataclass
class StoreFactory:
    """Opens stores (inside the test's own event loop) on one fresh location."""

    kind: str
    where: str  # a SQLite path or a PostgreSQL URL

    async def open(self) -> Store:
        if self.kind == "sqlite":
            return SQLiteStore(self.where)
        return await PostgresStore.open(self.where)


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def any_store(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> StoreFactory:
    if store_kind == "sqlite":
        return StoreFactory("sqlite", str(tmp_path / "store.sqlite3"))
    server: PgServer = request.getfixturevalue("pg_server")
    return StoreFactory("postgres", server.fresh_schema())


async def tasks_seen_by_another_process(factory: StoreFactory) -> dict[str, TaskRecord]:
    """Every task row, read over a connection of its own (committed rows only)."""
    if factory.kind == "sqlite":
        with closing(sqlite3.connect(f"file:{factory.where}?mode=ro", uri=True, timeout=5)) as db:
            blobs = [row[0] for row in db.execute("SELECT record FROM tasks")]
    else:
        db = await asyncpg.connect(factory.where, timeout=5)
        try:
            blobs = [row[0] for row in await db.fetch("SELECT record FROM tasks")]
        finally:
            await db.close()
    return {r.id: r for r in (msgspec.msgpack.decode(blob, type=TaskRecord) for blob in blobs)}


# ---- records and files for the tests -----------------------------------------------------------


def task_record(n: int, state: str = "pending", owner: str | None = None) -> TaskRecord:
    now = time.time()
    return TaskRecord(id=f"task_{n}", client="alice", request_id=f"req_{n}", idempotency_key=None,
                      upstream="xffuw", key="fp", upstream_task_id=str(n), model="m", state=state,  # type: ignore[arg-type]
                      created=now, deadline=now + 60, owner=owner)


def usage_record(at: float, client: str, model: str = "gpt-4o-mini", upstream: str = "xffuw", cost: float = 0.5,
                 outcome: str = "ok", task_id: str | None = None) -> UsageRecord:
    return UsageRecord(at=at, client=client, model=model, upstream=upstream, key="fp", cost=cost, outcome=outcome,
                       kind="image" if task_id else "chat", task_id=task_id, request_id=f"req_{at}")


# The schema of every file written before schema versions were recorded: version 1.
UNVERSIONED_SCHEMA = """
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


def unversioned_file(path: Path, rows: list[UsageRecord], tasks: list[TaskRecord]) -> None:
    """A store file as the proxy wrote it before versions: that exact schema, and rows."""
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(UNVERSIONED_SCHEMA)
        db.executemany("INSERT INTO usage (at, client, model, upstream, key, cost, outcome, kind, task_id, request_id) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(r.at, r.client, r.model, r.upstream, r.key, r.cost, r.outcome, r.kind, r.task_id,
                         r.request_id) for r in rows])
        db.executemany("INSERT INTO tasks (id, state, owner, updated, record) VALUES (?, ?, ?, ?, ?)",
                       [(t.id, t.state, t.owner, time.time(), msgspec.msgpack.encode(t)) for t in tasks])
        idem = IdempotencyRecord(client="alice", key="order-1", fingerprint="f", created=time.time(), done=True,
                                 status=200, body=b"{}")
        db.execute("INSERT INTO idempotency (client, key, created, record) VALUES (?, ?, ?, ?)",
                   (idem.client, idem.key, idem.created, msgspec.msgpack.encode(idem)))
