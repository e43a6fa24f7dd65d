"""The store, on both implementations (a real SQLite file and a real PostgreSQL): grouped task
saves, final states written at once but not waited for, reads that always see what was
queued before them, usage rolled up per day as it is written, and the schema migrations."""

from __future__ import annotations

import asyncio
import calendar
import os
import random
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from stores import (
    PgServer,
    StoreFactory,
    any_store,
    pg_server,
    store_kind,
    tasks_seen_by_another_process,
    unversioned_file,
)
from stores import task_record as record
from stores import usage_record as usage

from proxy.config import ConfigError, parse_config
from proxy.store import IdempotencyRecord, Store, UsageRecord, UsageRow, ledger
from proxy.store.migrations import SchemaTooNew
from proxy.store.postgres import PostgresStore, StoreUnavailable
from proxy.store.sqlite import ROWS_A_STATEMENT, SQLiteStore

__all__ = ["any_store", "pg_server", "store_kind"]  # fixtures, imported for pytest to find

DAY = 86400
D0 = calendar.timegm((2026, 3, 1, 0, 0, 0))  # a UTC midnight


def run_on_store(any_store: StoreFactory, test: Callable[[Store], Any]) -> None:
    async def main() -> None:
        store = await any_store.open()
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


# ---- tasks ----------------------------------------------------------------------------------


def test_concurrent_saves_are_all_committed_when_they_return(any_store: StoreFactory) -> None:
    async def test(store: Store) -> None:
        await asyncio.gather(*(store.save_task(record(n)) for n in range(500)))
        stored = await tasks_seen_by_another_process(any_store)  # committed: another connection sees every one
        assert sorted(stored) == sorted(f"task_{n}" for n in range(500))
        assert all(r.state == "pending" and r.updated > 0 for r in stored.values())
        # saves that arrive while a write is under way go in the next group, and still
        # return only once committed
        first = asyncio.gather(*(store.save_task(record(n, "running")) for n in range(0, 250)))
        await asyncio.sleep(0)
        second = asyncio.gather(*(store.save_task(record(n, "running")) for n in range(250, 500)))
        await asyncio.gather(first, second)
        assert {r.state for r in (await tasks_seen_by_another_process(any_store)).values()} == {"running"}

    run_on_store(any_store, test)


def test_a_final_state_is_written_without_being_awaited_and_reads_see_it(any_store: StoreFactory) -> None:
    async def test(store: Store) -> None:
        await store.save_task(record(1))
        done = record(1, "succeeded")
        done.urls = ["https://cdn.example/1.png"]
        store.finish_task(done)  # returns at once
        got = await store.get_task("task_1")  # a read in this process runs after the write
        assert got is not None and (got.state, got.urls) == ("succeeded", ["https://cdn.example/1.png"])
        for n in range(2, 202):  # a burst: rows queue behind the write under way
            store.finish_task(record(n, "failed"))
        store.finish_task(record(2, "succeeded"))  # the same task twice in one batch: the last one counts
        deadline = time.monotonic() + 5
        while len(seen := await tasks_seen_by_another_process(any_store)) < 201:  # with no read here
            assert time.monotonic() < deadline, "the queued final states never reached the store"
            await asyncio.sleep(0.01)
        assert seen["task_2"].state == "succeeded"
        assert {r.state for r in seen.values() if r.id not in ("task_1", "task_2")} == {"failed"}

    run_on_store(any_store, test)


def test_a_task_is_adopted_only_when_it_and_its_owner_have_gone_silent(any_store: StoreFactory) -> None:
    async def test(store: Store) -> None:
        task = record(1)
        task.owner = "worker-a"
        await store.save_task(task)
        await asyncio.sleep(0.05)
        between = time.time()
        await asyncio.sleep(0.05)
        await store.heartbeat("worker-a")  # one row for the process, not one per task
        # the task's own row is older than `between`, but its owner beat after it: still its own
        assert await store.claim_unfinished("worker-b", stale_before=between) == []
        # both silent since: worker-b takes it over
        (adopted,) = await store.claim_unfinished("worker-b", stale_before=time.time() + 1)
        assert (adopted.id, adopted.owner) == ("task_1", "worker-b")
        assert (await store.get_task("task_1")).owner == "worker-b"  # type: ignore[union-attr]
        await store.release("worker-b")  # shutting down: claimable by anyone at once
        (again,) = await store.claim_unfinished("worker-c", stale_before=0.0)
        assert again.owner == "worker-c"
        # an owner known to be dead loses its tasks at once, however recently it beat
        await store.heartbeat("worker-c")
        assert await store.claim_unfinished("worker-d", stale_before=0.0) == []
        (taken,) = await store.claim_unfinished("worker-d", stale_before=0.0, dead=["worker-c"])
        assert taken.owner == "worker-d"
        assert await store.unfinished_owners() == ["worker-d"]

    run_on_store(any_store, test)


def test_task_counts_and_recent_tasks(any_store: StoreFactory) -> None:
    async def test(store: Store) -> None:
        assert await store.task_counts() == {}
        assert await store.recent_tasks() == []
        for n in range(6):
            await store.save_task(record(n))
        for n, state in ((1, "succeeded"), (2, "failed"), (4, "succeeded"), (5, "running")):
            store.finish_task(record(n, state))  # queued: the reads below see them
        assert await store.task_counts() == {"pending": 2, "succeeded": 2, "failed": 1, "running": 1}
        newest = [t.id for t in await store.recent_tasks()]
        assert newest == ["task_5", "task_4", "task_2", "task_1", "task_3", "task_0"]
        assert [t.id for t in await store.recent_tasks(limit=2, states=("pending",))] == ["task_3", "task_0"]
        assert {t.id for t in await store.recent_tasks(states=("succeeded", "failed"))} == {
            "task_1", "task_2", "task_4"}
        assert len(await store.recent_tasks(limit=3)) == 3
        later = record(0, "timeout")
        store.finish_task(later)
        assert (await store.recent_tasks(limit=1))[0].id == "task_0"

    run_on_store(any_store, test)


# ---- idempotency and durations ---------------------------------------------------------------


def test_idempotency_records(any_store: StoreFactory) -> None:
    async def test(store: Store) -> None:
        first = IdempotencyRecord(client="alice", key="k1", fingerprint="f", created=time.time())
        assert await store.idempotency_begin(first) is None
        again = await store.idempotency_begin(IdempotencyRecord(client="alice", key="k1", fingerprint="g",
                                                                created=time.time()))
        assert again is not None and again.fingerprint == "f"
        assert await store.idempotency_begin(IdempotencyRecord(client="bob", key="k1", fingerprint="b",
                                                               created=time.time())) is None
        first.done, first.status, first.body, first.task_ids = True, 200, b'{"ok": 1}', ["task_1"]
        await store.idempotency_finish(first)
        got = await store.idempotency_get("alice", "k1")
        assert got is not None and (got.done, got.status, got.body, got.task_ids) == (True, 200, b'{"ok": 1}',
                                                                                     ["task_1"])
        await store.idempotency_drop("alice", "k1")
        assert await store.idempotency_get("alice", "k1") is None
        assert await store.idempotency_get("bob", "k1") is not None
        await store.purge(tasks_before=0, idempotency_before=time.time() + 1)
        assert await store.idempotency_get("bob", "k1") is None

    run_on_store(any_store, test)


def test_learned_durations_are_replaced_and_outlive_the_process(any_store: StoreFactory) -> None:
    async def first(store: Store) -> None:
        assert await store.load_durations() == {}
        store.save_durations("xffuw", "gpt-image-2", [10.0, 12.5])
        store.save_durations("fengyuan", "image", [30.0])
        store.save_durations("xffuw", "gpt-image-2", [11.0, 12.5, 14.25])  # replaces: the caller keeps the window
        assert await store.load_durations() == {("xffuw", "gpt-image-2"): [11.0, 12.5, 14.25],
                                                ("fengyuan", "image"): [30.0]}
        store.save_durations("fengyuan", "image", [31.0, 29.5])  # queued when the store closes: written

    async def second(store: Store) -> None:
        assert await store.load_durations() == {("xffuw", "gpt-image-2"): [11.0, 12.5, 14.25],
                                                ("fengyuan", "image"): [31.0, 29.5]}

    run_on_store(any_store, first)
    run_on_store(any_store, second)


def test_a_models_first_poll_follows_what_is_learnt_and_what_a_restart_loads(any_store: StoreFactory) -> None:
    from proxy.durations import Durations

    model = ("xffuw", "gpt-image-2")

    async def learn(store: Store) -> None:
        durations = Durations(store)
        for seconds in (50.0, 40.0, 30.0, 20.0):
            durations.record(model, seconds)
        assert durations.first_poll(model) is None  # fewer than MIN_SAMPLES: the configured schedule
        durations.record(model, 10.0)
        assert durations.first_poll(model) == 10.0  # the early quantile of 10..50
        for seconds in (60.0, 70.0, 80.0, 90.0, 100.0):  # learnt after it was asked: its quantile stays
            durations.record(model, seconds)
        assert durations.first_poll(model) == 10.0
        durations.record(model, 5.0)  # learnt after it was asked: asked again, it moves
        durations.record(model, 6.0)
        assert durations.first_poll(model) == 6.0  # nearest rank: the 2nd of 12
        durations.close()

    async def restart(store: Store) -> None:
        durations = Durations(store)
        await durations.load()
        assert durations.first_poll(model) == 6.0

    run_on_store(any_store, learn)
    run_on_store(any_store, restart)


def test_close_writes_everything_queued(any_store: StoreFactory) -> None:
    async def first(store: Store) -> None:
        await store.save_task(record(1))
        for n in range(50):
            store.add_usage(usage(D0 + n, "alice", task_id="task_1" if n == 0 else None))
        store.settle_usage("task_1", "failed", 5.0)
        store.finish_task(record(1, "failed"))
        # no read, no wait: close (what SIGTERM leads to) must write all of it

    async def second(store: Store) -> None:
        assert await store.usage(client=None, model=None, since=None, until=None, group_by="client") == [
            UsageRow(group="alice", requests=50, cost=49 * 0.5 + 5.0, failed=1)]
        assert (await store.get_task("task_1")).state == "failed"  # type: ignore[union-attr]

    run_on_store(any_store, first)
    run_on_store(any_store, second)


# ---- usage ----------------------------------------------------------------------------------


def reference(rows: list[UsageRecord], since: float | None, until: float | None, client: str | None,
              model: str | None, group_by: str, split_by: str | None) -> list[UsageRow]:
    """What /admin/usage must answer, counted from every raw row."""
    totals: dict[tuple[str, str | None], list[Any]] = {}
    for r in rows:
        if (since is not None and r.at < since) or (until is not None and r.at >= until) or \
                (client is not None and r.client != client) or (model is not None and r.model != model):
            continue
        group = time.strftime("%Y-%m-%d", time.gmtime(r.at)) if group_by == "day" else getattr(r, group_by)
        split = getattr(r, split_by) if split_by else None
        total = totals.setdefault((group, split), [0, 0.0, 0])
        total[0] += 1
        total[1] += r.cost
        total[2] += r.outcome == "failed"
    return [UsageRow(group=g, split=s, requests=n, cost=round(c, 6), failed=f)
            for (g, s), (n, c, f) in sorted(totals.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))]


def ledger_rows(seed: int = 7, count: int = 400) -> tuple[list[UsageRecord], list[tuple[str, str, float | None]]]:
    """Usage over five days, and the settles some of its tasks get later."""
    rng = random.Random(seed)
    rows = []
    for n in range(count):
        task = f"t{n}" if n % 3 == 0 else None
        rows.append(usage(D0 + rng.uniform(0, 5 * DAY), rng.choice(["alice", "bob", "carol"]),
                          rng.choice(["gpt-4o-mini", "gpt-image-2", "flux"]), rng.choice(["xffuw", "fengyuan"]),
                          rng.choice([0.25, 0.5, 1.0, 20.0]), "submitted" if task else rng.choice(["ok", "failed"]),
                          task))
    settles = [(f"t{n}", rng.choice(["ok", "failed", "timeout"]), rng.choice([None, 0.0, 2.0, 30.0]))
               for n in range(0, count, 3) if n % 2 == 0]
    return rows, settles


def settled(rows: list[UsageRecord], settles: list[tuple[str, str, float | None]]) -> list[UsageRecord]:
    final = {s[0]: s for s in settles}
    out = []
    for r in rows:
        if r.task_id in final:
            _, outcome, cost = final[r.task_id]
            r = msgspec.structs.replace(r, outcome=outcome, cost=r.cost if cost is None else cost)
        out.append(r)
    return out


RANGES = {
    "everything": (None, None),
    "whole days": (D0 + DAY, D0 + 4 * DAY),
    "partial days at both ends": (D0 + 3600.5, D0 + 4 * DAY - 7200),
    "within one day": (D0 + 2 * DAY + 100, D0 + 2 * DAY + 30000),
    "across one midnight": (D0 + 2 * DAY + 50000, D0 + 3 * DAY + 100),
    "from before the first row": (D0 - 10 * DAY, None),
    "until a partial day": (None, D0 + 3 * DAY + 1),
    "since a partial day": (D0 + 3 * DAY - 1, None),
    "empty": (D0 + 3 * DAY, D0 + 3 * DAY),
    "after everything": (D0 + 9 * DAY, None),
}


def test_usage_from_the_rollups_matches_the_raw_rows(any_store: StoreFactory) -> None:
    # more rows and settles in one batch than one statement writes (sqlite.ROWS_A_STATEMENT)
    rows, settles = ledger_rows(count=3400)
    assert len(rows) - 200 > 2 * ROWS_A_STATEMENT and len(settles) > ROWS_A_STATEMENT

    async def test(store: Store) -> None:
        for r in rows[:200]:
            store.add_usage(r)
        await store.spent("alice", 0)  # written: the settles below change rows already in the store
        for r in rows[200:]:
            store.add_usage(r)
        for s in settles:  # some of them in the same batch as their rows
            store.settle_usage(*s)
        final = settled(rows, settles)
        assert sum(r.outcome == "timeout" for r in final) > 5 and sum(r.outcome == "failed" for r in final) > 20
        for name, (since, until) in RANGES.items():
            for group_by in ledger.GROUPS:
                split = "model" if group_by == "client" else "client"
                for split_by in (None, split):
                    for client, model in ((None, None), ("bob", None), (None, "flux")):
                        got = await store.usage(client=client, model=model, since=since, until=until,
                                                group_by=group_by, split_by=split_by)
                        want = reference(final, since, until, client, model, group_by, split_by)
                        assert got == want, (name, group_by, split_by, client, model)
            for client in ("alice", "bob", "nobody"):
                if until is None and since is not None:
                    want_spent = sum(r.cost for r in final if r.client == client and r.at >= since)
                    assert await store.spent(client, since) == pytest.approx(want_spent), (name, client)

    run_on_store(any_store, test)


def test_purge_drops_raw_rows_after_keep_usage_days_and_keeps_the_daily_totals(any_store: StoreFactory) -> None:
    now = time.time()
    old = [usage(now - 100 * DAY - n * 60, "alice", cost=1.0) for n in range(20)]
    recent = [usage(now - n * 60, "alice", cost=2.0) for n in range(5)]

    async def test(store: Store) -> None:
        for r in old + recent:
            store.add_usage(r)
        before = await store.usage(client=None, model=None, since=None, until=None, group_by="day")
        await store.purge(tasks_before=0, idempotency_before=0)  # keep_usage_days is 90 by default
        after = await store.usage(client=None, model=None, since=None, until=None, group_by="day")
        assert after == before and sum(r.requests for r in after) == 25
        assert await store.spent("alice", 0) == 30.0
        # a range that starts inside a purged day reads that day's raw rows: gone
        start = old[0].at - 1  # not a midnight
        partial = await store.usage(client=None, model=None, since=start, until=start + 10, group_by="client")
        assert partial == []
        kept = await store.usage(client=None, model=None, since=now - DAY, until=now + 1, group_by="client")
        assert kept == [UsageRow(group="alice", requests=5, cost=10.0, failed=0)]

    run_on_store(any_store, test)


@pytest.mark.parametrize(("since", "until", "first", "end", "raw"), [
    (None, None, None, None, []),
    (D0, D0 + DAY, D0 // DAY, D0 // DAY + 1, []),
    (D0 + 1, D0 + 2 * DAY - 1, D0 // DAY + 1, D0 // DAY + 1, [(D0 + 1, D0 + 2 * DAY - 1)]),
    (D0 + 1, D0 + 3 * DAY - 1, D0 // DAY + 1, D0 // DAY + 2, [(D0 + 1, D0 + DAY), (D0 + 2 * DAY, D0 + 3 * DAY - 1)]),
    (D0 + 5, D0 + 5, D0 // DAY + 1, D0 // DAY, []),
    (D0 - 0.5, None, D0 // DAY, None, [(D0 - 0.5, D0)]),
    (None, D0 + 0.5, None, D0 // DAY, [(D0, D0 + 0.5)]),
])
def test_a_range_is_whole_days_from_the_rollups_and_partial_days_from_raw_rows(
        since: float | None, until: float | None, first: int | None, end: int | None,
        raw: list[tuple[float, float]]) -> None:
    span = ledger.Span(since, until)
    assert (span.first, span.end, span.raw) == (first, end, raw)


def test_a_settle_moves_cost_and_failures_between_the_right_rollup_rows() -> None:
    deltas: ledger.Deltas = {}
    rows = [(1, D0 + 10.0, "alice", "m", "x", 2.0, "submitted", "t1"), (2, D0 + DAY + 5.0, "bob", "m", "x", 1.0,
                                                                         "failed", "t2")]
    changed = ledger.settle(rows, [("t1", "failed", 3.0), ("t2", "ok", None), ("t1", "ok", None), ("t9", "ok", 1.0)],
                            deltas)
    assert sorted(changed, key=lambda c: c[2]) == [("ok", 3.0, 1), ("ok", 1.0, 2)]
    assert ledger.rollup_rows(deltas) == [(D0 // DAY, "alice", "m", "x", 0, 1.0, 0),
                                          (D0 // DAY + 1, "bob", "m", "x", 0, 0.0, -1)]


# ---- SQLite only ------------------------------------------------------------------------------

def test_a_file_from_before_schema_versions_opens_upgraded_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    rows, settles = ledger_rows(seed=3)
    unversioned_file(path, rows, [record(7, "running", owner="old-process")])

    async def main() -> None:
        store = SQLiteStore(str(path))
        try:
            for group_by in ledger.GROUPS:  # the rollups were built from the rows already there
                got = await store.usage(client=None, model=None, since=None, until=None, group_by=group_by)
                assert got == reference(rows, None, None, None, None, group_by, None)
            for s in settles:
                store.settle_usage(*s)
            got = await store.usage(client=None, model=None, since=D0 + DAY, until=None, group_by="day")
            assert got == reference(settled(rows, settles), D0 + DAY, None, None, None, "day", None)
            task = await store.get_task("task_7")
            assert task is not None and (task.state, task.owner) == ("running", "old-process")
            (adopted,) = await store.claim_unfinished("new-process", stale_before=0.0, dead=["old-process"])
            assert adopted.id == "task_7"
            idem = await store.idempotency_get("alice", "order-1")
            assert idem is not None and idem.done and idem.status == 200
        finally:
            await store.close()

    asyncio.run(main())
    with closing(sqlite3.connect(path)) as db:
        assert [v for v, in db.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3]
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == len(rows)
    SQLiteStore(str(path))._pool.shutdown()  # opening again changes nothing
    with closing(sqlite3.connect(path)) as db:
        assert [v for v, in db.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3]


def test_processes_opening_a_new_file_together_upgrade_it_once(tmp_path: Path) -> None:
    path = str(tmp_path / "together.sqlite3")
    opened: list[SQLiteStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(SQLiteStore(path))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 6
    for store in opened:
        asyncio.run(store.close())
    with closing(sqlite3.connect(path)) as db:
        assert [v for v, in db.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3]


def test_a_file_from_a_newer_proxy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite3"
    asyncio.run(SQLiteStore(str(path)).close())
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO schema_version (version, applied) VALUES (99, 0)")
    with pytest.raises(SchemaTooNew, match="version 99"):
        SQLiteStore(str(path))


def test_the_file_and_its_journal_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "private" / "proxy.sqlite3"
    old = os.umask(0o022)
    try:
        store = SQLiteStore(str(path))
    finally:
        os.umask(old)

    async def main() -> None:
        try:
            store.add_usage(usage(D0, "alice"))
            await store.spent("alice", 0)  # the WAL and shared-memory files exist while it is open
            files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert all(f.exists() for f in files)
            assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
        finally:
            await store.close()

    asyncio.run(main())


# ---- PostgreSQL only -------------------------------------------------------------------------


def test_replicas_starting_together_on_a_fresh_database_migrate_it_once(pg_server: PgServer) -> None:
    url = pg_server.fresh_database()

    async def main() -> None:
        stores = await asyncio.gather(*(PostgresStore.open(url, max_size=2) for _ in range(8)))
        try:
            # each migration is a plain CREATE: had two replicas applied one, an opener would have failed
            async with stores[0]._pool.acquire() as db:
                assert sorted(r[0] for r in await db.fetch("SELECT version FROM schema_version")) == [1, 2]
            for n, store in enumerate(stores):  # all of them work on the one schema
                store.add_usage(usage(D0 + n, f"replica-{n}"))
            for store in stores:
                await store.close()
            again = await PostgresStore.open(url)
            got = await again.usage(client=None, model=None, since=None, until=None, group_by="client")
            await again.close()
            assert [r.group for r in got] == [f"replica-{n}" for n in range(8)]
        finally:
            for store in stores:
                if not store._pool.is_closing():
                    await store.close()

    asyncio.run(main())


def test_two_replicas_share_tasks_usage_and_idempotency(pg_server: PgServer) -> None:
    url = pg_server.fresh_schema()

    async def main() -> None:
        a, b = await PostgresStore.open(url), await PostgresStore.open(url)
        try:
            for n in range(40):
                task = record(n)
                task.owner = "gone"
                await a.save_task(task)
            a.add_usage(usage(D0, "alice", cost=1.0))
            b.add_usage(usage(D0 + 1, "alice", cost=2.0))
            await a.spent("alice", 0)
            assert await b.spent("alice", 0) == 3.0  # each sees the other's written usage
            # both adopt a dead owner's tasks at once: every task goes to exactly one of them (a task
            # just claimed is not silent, so the one that comes second finds none of the first's)
            took_a, took_b = await asyncio.gather(a.claim_unfinished("a", time.time() - 60, dead=["gone"]),
                                                  b.claim_unfinished("b", time.time() - 60, dead=["gone"]))
            ids_a, ids_b = {t.id for t in took_a}, {t.id for t in took_b}
            assert not ids_a & ids_b and len(ids_a | ids_b) == 40
            # the same Idempotency-Key on both at once: exactly one of them begins
            key = [IdempotencyRecord(client="alice", key="k", fingerprint=f"f{n}", created=time.time())
                   for n in range(2)]
            answers = await asyncio.gather(a.idempotency_begin(key[0]), b.idempotency_begin(key[1]))
            assert sorted(x is None for x in answers) == [False, True]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_database_from_a_newer_proxy_is_refused(pg_server: PgServer) -> None:
    url = pg_server.fresh_schema()

    async def main() -> None:
        store = await PostgresStore.open(url)
        async with store._pool.acquire() as db:
            await db.execute("INSERT INTO schema_version (version, applied) VALUES (99, 0)")
        await store.close()
        with pytest.raises(SchemaTooNew, match="version 99"):
            await PostgresStore.open(url)

    asyncio.run(main())


# ---- [storage] in the config ----------------------------------------------------------------

BASE = {"clients": [{"name": "a", "key": "sk-a-0123456789"}]}


@pytest.mark.parametrize(("storage", "env", "expect"), [
    ({}, {}, ("data/proxy.sqlite3", "", 90.0)),
    ({"url": "postgresql://u:p@db:5432/proxy"}, {}, ("data/proxy.sqlite3", "postgresql://u:p@db:5432/proxy", 90.0)),
    ({"url": "${DATABASE_URL}", "keep_usage_days": 30}, {"DATABASE_URL": "postgres://db/x"},
     ("data/proxy.sqlite3", "postgres://db/x", 30.0)),
    ({"url": "${DATABASE_URL:-}"}, {}, ("data/proxy.sqlite3", "", 90.0)),  # unset: the SQLite file
    ({"url": "mysql://db/x"}, {}, "storage.url"),
    ({"url": "${DATABASE_URL}"}, {}, "storage.url: environment variable DATABASE_URL is not set"),
    ({"keep_usage_days": 0}, {}, "storage.keep_usage_days"),
    ({"rollups": True}, {}, "storage"),
])
def test_storage_config(storage: dict[str, Any], env: dict[str, str], expect: Any) -> None:
    raw = {**BASE, "storage": storage}
    if isinstance(expect, str):
        with pytest.raises(ConfigError, match=expect.replace("$", r"\$")):
            parse_config(raw, env)
        return
    config = parse_config(raw, env)
    assert (config.storage.path, config.storage.url, config.storage.keep_usage_days) == expect


@pytest.mark.parametrize(("version", "storage", "refused"), [
    ((3, 32, 3), {}, True),  # no UPDATE ... FROM: the file store cannot write
    ((3, 32, 3), {"url": "postgresql://u:p@db:5432/proxy"}, False),  # not used
    ((3, 33, 0), {}, False),
    ((3, 46, 1), {}, False),
])
def test_a_python_linked_to_an_sqlite_too_old_for_the_store_is_told_at_start(
        version: tuple[int, int, int], storage: dict[str, Any], refused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", version)
    monkeypatch.setattr(sqlite3, "sqlite_version", ".".join(map(str, version)))
    if refused:
        with pytest.raises(ConfigError, match=r"storage.path: SQLite 3.33.0 or newer is needed .* uses 3.32.3"):
            parse_config({**BASE, "storage": storage}, {})
    else:
        parse_config({**BASE, "storage": storage}, {})


def test_the_database_password_is_a_secret() -> None:
    config = parse_config({**BASE, "storage": {"url": "postgresql://proxy:s3cr%40t@db:5432/proxy"}}, {})
    assert "s3cr@t" in config.secrets()


def test_an_unreachable_database_is_named_without_its_password() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        asyncio.run(PostgresStore.open("postgresql://proxy:hunter2-secret@127.0.0.1:1/ledger"))
    assert "PostgreSQL at 127.0.0.1:1/ledger cannot be used ([storage] url)" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)
