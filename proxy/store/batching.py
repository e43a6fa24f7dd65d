"""The write queue both stores share: what nobody waits for (usage, settled outcomes, final
task states, learned durations) is written together, one transaction every FLUSH_AFTER
seconds or before any read; awaited task saves are committed in groups (those that arrive
while a write is under way go together in the next one: when thousands of tasks end within
seconds, one transaction each kept answers waiting for seconds)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import msgspec
import structlog

from proxy.loop import running_loop
from proxy.store import TaskRecord, UsageRecord

log = structlog.get_logger("proxy.store")
FLUSH_AFTER = 0.2  # seconds a usage record may wait to be written with others

TaskRow = tuple[str, str, str | None, float, bytes]  # id, state, owner, updated, record
task_encode = msgspec.msgpack.Encoder().encode
task_decode = msgspec.msgpack.Decoder(TaskRecord).decode
durations_encode = msgspec.msgpack.Encoder().encode
durations_decode = msgspec.msgpack.Decoder(list[float]).decode


class Batch:
    """Everything one write transaction carries, in the order it is applied."""

    __slots__ = ("calls", "durations", "settles", "tasks", "usage")

    def __init__(self) -> None:
        self.usage: list[UsageRecord] = []
        self.settles: list[tuple[str, str, float | None]] = []  # task id, outcome, cost
        self.tasks: list[TaskRow] = []
        self.durations: dict[tuple[str, str], list[float]] = {}
        self.calls: dict[tuple[str, str], list[float]] = {}

    def __bool__(self) -> bool:
        return bool(self.usage or self.settles or self.tasks or self.durations or self.calls)

    def last_task_rows(self) -> list[TaskRow]:
        """One row per task, the latest queued, sorted by id (one lock order across replicas)."""
        return sorted({row[0]: row for row in self.tasks}.values())


class Done(Protocol):  # a concurrent.futures.Future or an asyncio.Task
    def add_done_callback(self, fn: Any, /) -> Any: ...

    def exception(self) -> BaseException | None: ...

    def cancelled(self) -> bool: ...


class BatchedWrites:
    """Subclasses submit a Batch as one transaction (`_submit`); the queueing is here."""

    def __init__(self) -> None:
        self._batch = Batch()
        self._task_waiters: list[asyncio.Future[None]] = []
        self._writing = 0  # writes submitted and not yet done
        self._soon = False  # a flush of awaited task rows is scheduled
        self._later = False  # the FLUSH_AFTER timer for what nobody waits for is pending

    def _submit(self, batch: Batch) -> Done:
        raise NotImplementedError

    def add_usage(self, record: UsageRecord) -> None:
        """Queue a record; queued ones are written together, so every read sees them."""
        self._batch.usage.append(record)
        self._flush_later()

    def settle_usage(self, task_id: str, outcome: str, cost: float | None) -> None:
        """A task's final outcome, and the cost the upstream reported at the end, if any; queued
        like new records (thousands of tasks may end within a second), so reads see it."""
        self._batch.settles.append((task_id, outcome, cost))
        self._flush_later()

    def save_durations(self, upstream: str, model: str, durations: list[float]) -> None:
        """Replace the learned task durations of (upstream, model); queued like usage."""
        self._batch.durations[upstream, model] = list(durations)
        self._flush_later()

    def save_calls(self, upstream: str, key: str, calls: list[float]) -> None:
        """Replace a key's recent calls (wall time, count, flattened); queued like usage."""
        self._batch.calls[upstream, key] = list(calls)
        self._flush_later()

    async def save_task(self, record: TaskRecord) -> None:
        """Written and committed when this returns, together with the saves around it."""
        self._queue_task(record)
        waiter = running_loop().create_future()
        self._task_waiters.append(waiter)
        if not self._writing and not self._soon:
            self._soon = True  # the other saves of this turn of the loop join in
            running_loop().call_soon(self._flush)
        await waiter

    def finish_task(self, record: TaskRecord) -> None:
        """A task's final state, queued like usage and written with it, within FLUSH_AFTER
        seconds, and not waited for: its answer need not wait on the disk (bench/README.md, "The
        burst of answers"). Reads in this process flush it first; if the process dies before the
        write, the task is still unfinished in the store and the next process polls it to its
        end again."""
        self._queue_task(record)
        self._flush_later()

    def _queue_task(self, record: TaskRecord) -> None:
        record.updated = time.time()
        self._batch.tasks.append((record.id, record.state, record.owner, record.updated, task_encode(record)))

    def _flush_later(self) -> None:
        if self._later:
            return
        try:
            running_loop().call_later(FLUSH_AFTER, self._flush_due)
            self._later = True
        except RuntimeError:  # called outside the event loop (tools, tests): write now
            self._flush()

    def _flush_due(self) -> None:
        self._later = False
        self._flush()

    def _flush(self) -> None:
        """Submit everything queued as one transaction (before any other statement: order)."""
        self._soon = False
        if not self._batch:
            return
        batch, self._batch = self._batch, Batch()
        waiters, self._task_waiters = self._task_waiters, []
        done = self._submit(batch)
        try:
            loop = running_loop()
        except RuntimeError:  # outside the event loop (tools, tests): nobody awaits
            done.add_done_callback(_log_failure)
            return
        self._writing += 1
        done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._written, f, waiters))

    def _written(self, done: Done, waiters: list[asyncio.Future[None]]) -> None:
        self._writing -= 1
        error = _error_of(done)
        if error is not None:
            log.error("store_write_failed", error=repr(error))
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)
        if self._task_waiters and not self._writing:
            self._flush()  # the awaited task rows that arrived meanwhile: the next group


def _error_of(done: Done) -> BaseException | None:
    if done.cancelled():
        return asyncio.CancelledError()
    return done.exception()


def _log_failure(done: Done) -> None:
    error = _error_of(done)
    if error is not None:
        log.error("store_write_failed", error=repr(error))
