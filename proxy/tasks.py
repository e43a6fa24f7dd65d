"""Waits on upstream async tasks: polling schedule, deadline, results kept for retrieval.

A task the proxy started belongs to the client that asked. Its waiter runs apart from the
request: a client that goes away does not stop it, and its outcome stays retrievable for
`keep_results` hours.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

import cachetools
import structlog

from proxy.config import TasksConfig
from proxy.errors import Kind, ProxyError
from proxy.pool import UpstreamKey
from proxy.providers.base import Provider, TaskState

log = structlog.get_logger("proxy.tasks")


@dataclass(eq=False)
class Task:
    id: str  # the proxy's id, shown to clients
    client: str
    provider: Provider
    key: UpstreamKey  # polls use the key that created the task
    model: str
    state: TaskState
    created: float = field(default_factory=time.time)
    error: ProxyError | None = None
    polls: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def upstream_id(self) -> str | None:
        return self.state.task_id


def new_task_id() -> str:
    return "task_" + secrets.token_urlsafe(12)


class TaskWaiter:
    def __init__(self, config: TasksConfig) -> None:
        self.config = config
        self.tasks: cachetools.TTLCache[str, Task] = cachetools.TTLCache(
            maxsize=1_000_000, ttl=config.keep_results * 3600)
        self._running: set[asyncio.Task[None]] = set()

    def start(self, task: Task) -> Task:
        """Record the task and, unless it is already final, wait on it in the background."""
        self.tasks[task.id] = task
        if task.state.final:
            self._settle(task)
        else:
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

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    @property
    def waiting(self) -> int:
        return len(self._running)

    async def _wait(self, task: Task) -> None:
        deadline = time.monotonic() + self.config.timeout
        next_poll = time.monotonic() + self.config.first_poll
        last_problem: str | None = None
        try:
            while True:
                now = time.monotonic()
                if next_poll >= deadline:
                    await asyncio.sleep(max(0.0, deadline - now))
                    break
                await asyncio.sleep(max(0.0, next_poll - now))
                next_poll = time.monotonic() + self.config.poll_interval  # never faster than this
                task.polls += 1
                try:
                    state = await task.provider.poll(task.key.secret, task.upstream_id or "")
                except ProxyError as error:
                    # A poll that fails is not a task that failed: try again at the next interval.
                    last_problem = error.message
                    log.warning("poll_failed", task_id=task.id, upstream=task.provider.name,
                                error=error.message)
                    continue
                task.state = state
                if state.final:
                    self._settle(task)
                    return
            detail = f" (last poll: {last_problem})" if last_problem else ""
            task.error = ProxyError(
                Kind.TASK_TIMEOUT,
                f"The upstream task {task.id} was not finished after {self.config.timeout:g} s{detail}.",
                task_ids=(task.id,))
        except asyncio.CancelledError:
            task.error = ProxyError(Kind.TASK_TIMEOUT, f"The proxy stopped waiting for task {task.id}.",
                                    task_ids=(task.id,))
            raise
        finally:
            task.done.set()

    def _settle(self, task: Task) -> None:
        if task.state.status == "failed":
            reason = task.state.reason or "no reason given"
            task.error = ProxyError(Kind.TASK_FAILED,
                                    f"The upstream task {task.id} failed: {reason}", task_ids=(task.id,))
        task.done.set()

    async def close(self) -> None:
        for runner in list(self._running):
            runner.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
