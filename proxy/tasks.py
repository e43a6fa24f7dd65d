"""Waits on upstream async tasks: polling schedule, deadline, results kept for retrieval.

A task the proxy started belongs to the client that asked. It is written to the store
before anyone waits on it; its waiter runs apart from the request, so a client that goes
away does not stop it; a restart resumes it from the store; its outcome stays retrievable
for `keep_results` hours.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from proxy.config import TasksConfig
from proxy.errors import Kind, ProxyError
from proxy.pool import KeyPool, UpstreamKey
from proxy.providers.base import Provider, TaskState
from proxy.store import Store, TaskRecord

log = structlog.get_logger("proxy.tasks")


@dataclass(eq=False)
class Task:
    record: TaskRecord
    provider: Provider
    key: UpstreamKey  # polls use the key that created the task
    pool: KeyPool | None  # None for a client's own key: no shared limits to respect
    state: TaskState
    error: ProxyError | None = None
    polls: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.record.id


def new_task_id() -> str:
    return "task_" + secrets.token_urlsafe(12)


def error_of(record: TaskRecord) -> ProxyError | None:
    if record.state == "failed":
        return ProxyError(Kind.TASK_FAILED, f"The upstream task {record.id} failed: "
                          f"{record.reason or 'no reason given'}", task_ids=(record.id,))
    if record.state == "timeout":
        return ProxyError(Kind.TASK_TIMEOUT, f"The upstream task {record.id} was not finished in time"
                          f"{': ' + record.reason if record.reason else ''}.", task_ids=(record.id,))
    return None


class TaskWaiter:
    def __init__(self, config: TasksConfig, store: Store, owner: str,
                 on_final: Callable[[Task], Awaitable[None]]) -> None:
        self.config = config
        self.store = store
        self.owner = owner  # this process, in the store: who polls which task
        self.on_final = on_final
        self.live: dict[str, Task] = {}  # unfinished tasks of this process; finished ones are in the store
        self._running: set[asyncio.Task[None]] = set()

    async def start(self, task: Task) -> Task:
        """Persist the task, then (unless it is already final) wait on it in the background."""
        task.record.owner = self.owner
        self.live[task.id] = task
        if task.state.final:
            await self._settle(task)
            return task
        await self.store.save_task(task.record)
        runner = asyncio.create_task(self._wait(task), name=f"wait {task.id}")
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)
        return task

    async def result(self, task: Task) -> TaskState:
        """Wait for the task to end; answer its final state or raise its error.

        The wait is shielded: cancelling the caller (client gone) leaves the waiter running.
        """
        await asyncio.shield(task.done.wait())
        if task.error is not None:
            raise task.error
        return task.state

    async def find(self, task_id: str) -> Task | TaskRecord | None:
        return self.live.get(task_id) or await self.store.get_task(task_id)

    @property
    def waiting(self) -> int:
        return len(self._running)

    async def _wait(self, task: Task) -> None:
        deadline = time.monotonic() + max(0.0, task.record.deadline - time.time())
        next_poll = time.monotonic() + self.config.first_poll
        last_problem: str | None = None
        try:
            while True:
                now = time.monotonic()
                if next_poll >= deadline and task.polls:  # never time out unasked (a task resumed late)
                    await asyncio.sleep(max(0.0, deadline - now))
                    break
                await asyncio.sleep(max(0.0, next_poll - now))
                if task.pool is not None:
                    # A busy key stretches the spacing rather than exceeding its limit.
                    try:
                        await task.pool.slot(task.key, max(deadline, time.monotonic() + self.config.poll_interval))
                    except ProxyError:
                        break
                task.polls += 1
                try:
                    state = await task.provider.poll(task.key.secret, task.record.upstream_task_id or "")
                except ProxyError as error:
                    next_poll = time.monotonic() + self.config.poll_interval
                    # A poll that fails is not a task that failed: try again at the next interval.
                    last_problem = error.message
                    if task.pool is not None and error.kind is Kind.RATE_LIMITED:
                        task.pool.failed(task.key, error)
                    log.warning("poll_failed", task_id=task.id, upstream=task.provider.name, error=error.message)
                    continue
                # Counted from the answer: a slow or delayed poll never brings the next one closer.
                next_poll = time.monotonic() + self.config.poll_interval
                task.state = state
                task.record.progress = state.progress
                if state.final:
                    await self._settle(task)
                    return
            task.record.reason = f"last poll: {last_problem}" if last_problem else \
                f"not final after {self.config.timeout:g} s"
            task.record.state = "timeout"
            await self._settle(task)
        except asyncio.CancelledError:
            # Shutting down: the record stays unfinished and the next process resumes it.
            task.error = ProxyError(Kind.TASK_TIMEOUT, f"The proxy is restarting; task {task.id} goes on and "
                                    f"its result will be at GET /v1/tasks/{task.id}.", task_ids=(task.id,))
            task.done.set()
            raise

    async def _settle(self, task: Task) -> None:
        record, state = task.record, task.state
        if record.state != "timeout":
            record.state = "succeeded" if state.status == "succeeded" else "failed"
            record.urls, record.media_type = state.urls, state.media_type
            record.reason = state.reason if state.status == "failed" else None
        task.error = error_of(record)
        try:
            await self.store.save_task(record)
            await self.on_final(task)
        except Exception as exc:  # the answer must still reach the client
            log.error("task_settle_failed", task_id=task.id, error=repr(exc))
        task.done.set()
        self.live.pop(task.id, None)  # the store has it now; waiters hold the object itself

    async def close(self) -> None:
        for runner in list(self._running):
            runner.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
