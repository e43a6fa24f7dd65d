"""proxy/tasks.py polling real loopback upstreams: polls sent from their tick's timer with no
task each, pipelined, and what happens when the upstream breaks a pipeline.

The upstream is a raw server from test_upstream_http.py speaking xffuw's task.php; the
provider, the transport, the waiter and the store are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from test_upstream_http import Handler, Req, Upstream, answer, once, run

from proxy.config import TasksConfig
from proxy.pool import UpstreamKey
from proxy.providers.base import TaskState
from proxy.providers.engine import Provider
from proxy.providers.xffuw import Xffuw
from proxy.store import TaskRecord
from proxy.store.sqlite import SQLiteStore
from proxy.tasks import Task, TaskWaiter
from proxy.upstream_http import build_client

TASKS = 20
RUNNING_POLLS = 2  # each task answers "running" this many times, then its result


def task_answer(up: Upstream, req: Req) -> bytes:
    """task.php: running for the first polls of a task, then done with its URL."""
    task_id = parse_qs(urlsplit(req.target).query)["task_id"][0]
    seen = sum(1 for r in up.requests if r.target == req.target)
    if seen <= RUNNING_POLLS:
        return json.dumps({"state": "running", "progress": 50}).encode()
    return json.dumps({"ok": True, "result_url": f"https://cdn.example/{task_id}.png"}).encode()


def keep_alive_limit(limit: int) -> Handler:
    """Like nginx's keepalive_requests: the limit-th answer says close, and the pipelined
    requests behind it are never read."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        served = 0
        while (req := await up.read(reader, conn)) is not None:
            served += 1
            last = served == limit
            writer.write(answer(200, task_answer(up, req), [("Connection", "close")] if last else []))
            await writer.drain()
            if last:
                return

    return handler


def poll_all(handler: Handler, store_path: Path) -> tuple[list[Task], Counter[str], Upstream]:
    outcome: dict[str, object] = {}

    async def main() -> None:
        async with Upstream(handler) as up:
            http = build_client()
            store = SQLiteStore(str(store_path))
            xffuw = Provider("xffuw", Xffuw("xffuw"), up.url("/"), http, connect_timeout=5, read_timeout=120)
            ended: list[str] = []
            waiter = TaskWaiter(TasksConfig(poll_interval=0.05, first_poll=0.01, timeout=5), store, "test",
                                lambda task: ended.append(task.id))
            key = UpstreamKey(provider="xffuw", secret="sk-xf-secret", fingerprint="fp")
            now = time.time()
            tasks = []
            for n in range(TASKS):
                record = TaskRecord(id=f"task_{n}", client="alice", request_id=f"req_{n}", idempotency_key=None,
                                    upstream="xffuw", key="fp", upstream_task_id=str(n), model="m", state="pending",
                                    created=now, deadline=now + 5)
                tasks.append(await waiter.start(Task(record=record, provider=xffuw, key=key, pool=None,
                                                     state=TaskState(status="pending", task_id=str(n)))))
            states = await asyncio.gather(*(waiter.result(task) for task in tasks))
            assert all(state.status == "succeeded" for state in states)
            assert sorted(ended) == sorted(task.id for task in tasks)
            await waiter.close()
            await store.close()
            await http.aclose()
            outcome.update(tasks=tasks, up=up, per_task=Counter(r.target for r in up.requests))

    run(main, limit=20)
    return outcome["tasks"], outcome["per_task"], outcome["up"]  # type: ignore[return-value]


def check(tasks: list[Task], per_task: Counter[str]) -> None:
    for n, task in enumerate(tasks):
        assert task.state.urls == [f"https://cdn.example/{n}.png"]
        assert task.last_problem is None, task.last_problem  # no poll failed: broken pipelines are re-sent
        # every poll reached the upstream exactly once: none lost, none sent twice
        assert per_task[f"/task.php?task_id={n}"] == RUNNING_POLLS + 1 == task.polls


def test_polls_of_one_tick_share_a_connection_and_each_task_gets_its_answer(tmp_path: Path) -> None:
    async def keep_alive(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while (req := await up.read(reader, conn)) is not None:
            writer.write(answer(200, task_answer(up, req)))
            await writer.drain()

    tasks, per_task, up = poll_all(keep_alive, tmp_path / "store.sqlite3")
    check(tasks, per_task)
    assert up.accepted <= 3  # 20 tasks' polls went pipelined on a few connections, not one each
    assert all(r.headers["authorization"] == "Bearer sk-xf-secret" for r in up.requests)


def test_polls_behind_a_keep_alive_limit_are_sent_again_at_once(tmp_path: Path) -> None:
    tasks, per_task, up = poll_all(keep_alive_limit(3), tmp_path / "store.sqlite3")
    check(tasks, per_task)
    assert up.accepted > 3  # the limit closed connections midway through pipelines


def test_an_upstream_that_drops_pipelined_polls_gets_them_one_at_a_time(tmp_path: Path) -> None:
    tasks, per_task, up = poll_all(once(lambda up, req: answer(200, task_answer(up, req))),
                                   tmp_path / "store.sqlite3")
    check(tasks, per_task)
    assert up.accepted == len(up.requests)  # one connection per poll once it is known
