"""proxy/store/sqlite.py on a real SQLite file: grouped task saves, final states that are
written at once but not waited for, and reads that always see what was queued before them."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import msgspec

from proxy.store import TaskRecord
from proxy.store.sqlite import SQLiteStore


def record(n: int, state: str = "pending") -> TaskRecord:
    now = time.time()
    return TaskRecord(id=f"task_{n}", client="alice", request_id=f"req_{n}", idempotency_key=None,
                      upstream="xffuw", key="fp", upstream_task_id=str(n), model="m", state=state,  # type: ignore[arg-type]
                      created=now, deadline=now + 60)


def on_disk(path: Path) -> dict[str, TaskRecord]:
    """What another process sees: a separate read-only connection to the file."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        rows = db.execute("SELECT record FROM tasks").fetchall()
    return {r.id: r for r in (msgspec.msgpack.decode(row[0], type=TaskRecord) for row in rows)}


def test_concurrent_saves_are_all_committed_when_they_return(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"

    async def main() -> None:
        store = SQLiteStore(str(path))
        try:
            await asyncio.gather(*(store.save_task(record(n)) for n in range(500)))
            stored = on_disk(path)  # committed: another connection sees every one
            assert sorted(stored) == sorted(f"task_{n}" for n in range(500))
            assert all(r.state == "pending" and r.updated > 0 for r in stored.values())
            # saves that arrive while a write is under way go in the next group, and still
            # return only once committed
            first = asyncio.gather(*(store.save_task(record(n, "running")) for n in range(0, 250)))
            await asyncio.sleep(0)
            second = asyncio.gather(*(store.save_task(record(n, "running")) for n in range(250, 500)))
            await asyncio.gather(first, second)
            assert {r.state for r in on_disk(path).values()} == {"running"}
        finally:
            await store.close()

    asyncio.run(main())


def test_a_final_state_is_written_without_being_awaited_and_reads_see_it(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"

    async def main() -> None:
        store = SQLiteStore(str(path))
        try:
            await store.save_task(record(1))
            done = record(1, "succeeded")
            done.urls = ["https://cdn.example/1.png"]
            store.finish_task(done)  # returns at once
            got = await store.get_task("task_1")  # a read in this process runs after the write
            assert got is not None and (got.state, got.urls) == ("succeeded", ["https://cdn.example/1.png"])
            for n in range(2, 202):  # a burst: rows queue behind the write under way
                store.finish_task(record(n, "failed"))
            deadline = time.monotonic() + 5
            while len(on_disk(path)) < 201:  # another process sees them shortly, with no read here
                assert time.monotonic() < deadline, "the queued final states never reached the file"
                await asyncio.sleep(0.01)
            assert {r.state for r in on_disk(path).values() if r.id != "task_1"} == {"failed"}
        finally:
            await store.close()

    asyncio.run(main())


def test_a_task_is_adopted_only_when_it_and_its_owner_have_gone_silent(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(str(tmp_path / "store.sqlite3"))
        try:
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
        finally:
            await store.close()

    asyncio.run(main())
