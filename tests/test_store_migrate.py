"""`proxy store migrate --from sqlite:PATH --to postgresql://…` on a real SQLite file and a real
PostgreSQL: the history arrives whole, a second run copies nothing twice, and a run after
the file changed copies what changed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from stores import PgServer, pg_server, task_record, unversioned_file, usage_record

from proxy.cli import main
from proxy.store import IdempotencyRecord, Store, UsageRow, ledger
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

__all__ = ["pg_server"]

DAY = 86400.0
NOW = time.time()
RANGES = [(None, None), (NOW - 3 * DAY, None), (NOW - 2.5 * DAY, NOW - 0.5 * DAY), (None, NOW - 200 * DAY)]


def migrate(path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["store", "migrate", "--from", f"sqlite:{path}", "--to", url]) == 0
    return capsys.readouterr().out


async def answers(store: Store) -> dict[str, Any]:
    """Everything a team would look at, as one comparable value."""
    seen: dict[str, Any] = {}
    for since, until in RANGES:
        for group_by in ledger.GROUPS:
            seen[f"{since}-{until}-{group_by}"] = await store.usage(client=None, model=None, since=since, until=until,
                                                                    group_by=group_by, split_by=None)
    seen["spent"] = [await store.spent(c, s) for c in ("alice", "bob") for s in (0.0, NOW - 2.5 * DAY)]
    seen["tasks"] = sorted((t.id, t.state, t.owner, t.urls) for t in await store.recent_tasks(limit=1000))
    seen["idempotency"] = await store.idempotency_get("alice", "order-1")
    seen["durations"] = await store.load_durations()
    return seen


def read(store_of: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        store = await store_of()
        try:
            return await answers(store)
        finally:
            await store.close()

    return asyncio.run(main())


def sqlite_at(path: Path) -> Any:
    async def open_store() -> Store:
        return SQLiteStore(str(path))

    return open_store


def write_history(path: Path) -> None:
    """A team's file: old usage already purged to its daily totals, recent usage, tasks."""
    async def main() -> None:
        store = SQLiteStore(str(path), keep_usage_days=90)
        for n in range(30):  # 300 days ago: only the daily totals will be left of these
            store.add_usage(usage_record(NOW - 300 * DAY + n * 3000, "alice" if n % 3 else "bob", cost=1.0))
        for n in range(60):
            task = f"task_{n}" if n % 4 == 0 else None
            store.add_usage(usage_record(NOW - n * 4000, "alice" if n % 2 else "bob", "gpt-image-2" if task else "m",
                                         cost=2.0, outcome="submitted" if task else "ok", task_id=task))
            if task:
                await store.save_task(task_record(n, "running", owner="old-host:1"))
        for n in range(0, 60, 8):
            store.settle_usage(f"task_{n}", "failed" if n % 16 else "ok", 3.0)
            store.finish_task(task_record(n, "failed" if n % 16 else "succeeded"))
        await store.purge(tasks_before=0, idempotency_before=0)
        await store.idempotency_begin(IdempotencyRecord(client="alice", key="order-1", fingerprint="f",
                                                        created=NOW, task_ids=["task_0"]))
        store.save_durations("xffuw", "gpt-image-2", [10.0, 11.5])
        await store.close()

    asyncio.run(main())


def test_a_teams_history_moves_to_postgresql_once(tmp_path: Path, pg_server: PgServer,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, url = tmp_path / "team.sqlite3", pg_server.fresh_schema()
    write_history(path)
    want = read(sqlite_at(path))
    assert want["tasks"] and want["durations"] and want["idempotency"] is not None
    assert sum(r.requests for r in want["None-None-client"]) == 90  # 30 of them only in the daily totals

    out = migrate(path, url, capsys)
    assert "usage rows: 60 read, 60 new, 0 changed" in out
    assert "tasks: 15 read, 15 new, 0 changed" in out
    assert "idempotency records: 1 read, 1 new, 0 changed" in out
    assert "durations: 1 read, 1 new, 0 changed" in out
    assert read(lambda: PostgresStore.open(url)) == want

    out = migrate(path, url, capsys)  # again: nothing is new, nothing doubles
    for table in ("usage rows", "daily totals", "tasks", "idempotency records", "durations"):
        assert f"{table}: " in out and " 0 new, 0 changed" in out.split(f"{table}: ")[1].split("\n")[0], out
    assert read(lambda: PostgresStore.open(url)) == want

    async def more() -> None:  # the old proxy went on a little before it was stopped
        store = SQLiteStore(str(path))
        store.add_usage(usage_record(NOW + 1, "carol", cost=5.0))
        store.settle_usage("task_4", "failed", 7.0)
        store.finish_task(task_record(4, "failed"))
        store.save_durations("xffuw", "gpt-image-2", [12.0])
        await store.close()

    asyncio.run(more())
    want = read(sqlite_at(path))
    out = migrate(path, url, capsys)
    assert "usage rows: 61 read, 1 new, 1 changed" in out
    assert "tasks: 15 read, 0 new, 1 changed" in out
    assert "durations: 1 read, 0 new, 1 changed" in out
    assert read(lambda: PostgresStore.open(url)) == want


def test_a_file_from_before_schema_versions_moves_too(tmp_path: Path, pg_server: PgServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path, url = tmp_path / "old.sqlite3", pg_server.fresh_schema()
    rows = [usage_record(NOW - n * 5000, "alice" if n % 2 else "bob", cost=0.5 * n) for n in range(40)]
    unversioned_file(path, rows, [task_record(1, "running", owner="old-host:1")])
    before = path.read_bytes()
    out = migrate(path, url, capsys)
    assert path.read_bytes() == before, "the file was changed: it is only read"
    assert "usage rows: 40 read, 40 new, 0 changed" in out and "tasks: 1 read, 1 new, 0 changed" in out
    got = read(lambda: PostgresStore.open(url))
    assert got["None-None-client"] == [UsageRow(group="alice", requests=20, cost=200.0, failed=0),
                                       UsageRow(group="bob", requests=20, cost=190.0, failed=0)]
    assert got["tasks"] == [("task_1", "running", "old-host:1", [])]


@pytest.mark.parametrize(("argv", "status", "message"), [
    (["--from", "nothing.sqlite3", "--to", "postgresql://db/x"], 2, "--from: expected sqlite:PATH"),
    (["--from", "sqlite:x.sqlite3", "--to", "mysql://db/x"], 2, "--to: expected a postgresql:// URL"),
    (["--from", "sqlite:/no/such/file.sqlite3", "--to", "postgresql://db/x"], 1, "no SQLite file at"),
])
def test_bad_arguments_are_named(argv: list[str], status: int, message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["store", "migrate", *argv]) == status
    assert message in capsys.readouterr().err


def test_an_unreachable_database_is_said_without_its_password(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.sqlite3"
    asyncio.run(SQLiteStore(str(path)).close())
    assert main(["store", "migrate", "--from", f"sqlite:{path}",
                 "--to", "postgresql://proxy:hunter2-secret@127.0.0.1:1/proxy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("store migrate failed: ") and "hunter2-secret" not in err
