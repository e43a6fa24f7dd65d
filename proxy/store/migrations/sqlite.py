"""The SQLite file's schema, by version. Version 1 is the schema files had before versions
were recorded (its statements are IF NOT EXISTS, so such a file takes it as a no-op); every
later version is applied once, in a write transaction that other processes opening the same
file wait behind."""

from __future__ import annotations

import sqlite3
import time

from proxy.store.migrations import SchemaTooNew

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        "CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY, at REAL NOT NULL, client TEXT NOT NULL, "
        "model TEXT NOT NULL, upstream TEXT NOT NULL, key TEXT NOT NULL, cost REAL NOT NULL, outcome TEXT NOT NULL, "
        "kind TEXT NOT NULL, task_id TEXT, request_id TEXT)",
        "CREATE INDEX IF NOT EXISTS usage_client_at ON usage (client, at)",
        "CREATE INDEX IF NOT EXISTS usage_at ON usage (at)",
        "CREATE INDEX IF NOT EXISTS usage_task ON usage (task_id) WHERE task_id IS NOT NULL",
        "CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, state TEXT NOT NULL, owner TEXT, "
        "updated REAL NOT NULL, record BLOB NOT NULL)",
        "CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state, updated)",
        "CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, beat REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS idempotency (client TEXT NOT NULL, key TEXT NOT NULL, created REAL NOT NULL, "
        "record BLOB NOT NULL, PRIMARY KEY (client, key))",
    ]),
    (2, [
        # usage per UTC day (day number since 1970-01-01), kept as rows are written
        "CREATE TABLE usage_daily (day INTEGER NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL, "
        "upstream TEXT NOT NULL, requests INTEGER NOT NULL, cost REAL NOT NULL, failed INTEGER NOT NULL, "
        "PRIMARY KEY (day, client, model, upstream)) WITHOUT ROWID",
        "CREATE INDEX usage_daily_client ON usage_daily (client, day)",
        "INSERT INTO usage_daily SELECT CAST(at / 86400 AS INTEGER), client, model, upstream, COUNT(*), SUM(cost), "
        "SUM(outcome = 'failed') FROM usage GROUP BY 1, 2, 3, 4",
        "CREATE TABLE durations (upstream TEXT NOT NULL, model TEXT NOT NULL, durations BLOB NOT NULL, "
        "PRIMARY KEY (upstream, model))",
        "CREATE INDEX tasks_updated ON tasks (updated)",
        "CREATE INDEX idempotency_created ON idempotency (created)",
    ]),
    (3, [
        # each upstream key's recent calls (wall time, count), so a restart keeps counting its window
        "CREATE TABLE key_calls (upstream TEXT NOT NULL, key TEXT NOT NULL, calls BLOB NOT NULL, "
        "PRIMARY KEY (upstream, key))",
    ]),
]
LATEST = MIGRATIONS[-1][0]


def upgrade(db: sqlite3.Connection) -> int:
    """Bring the file to the latest version; answers the version it was at."""
    db.execute("BEGIN IMMEDIATE")  # the write lock: another process opening the file waits here
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
        found = int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
        if found > LATEST:
            raise SchemaTooNew(found, LATEST)
        for version, statements in MIGRATIONS:
            if version > found:
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (version, time.time()))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found
