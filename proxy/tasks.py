"""Waits on upstream async tasks: polling schedule, deadline, results kept for retrieval.

A task the proxy started belongs to the client that asked. It is written to the store
before anyone waits on it; its waiter runs apart from the request, so a client that goes
away does not stop it; a restart resumes it from the store; its outcome stays retrievable
for `keep_results` hours.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from proxy.config import TasksConfig
from proxy.errors import Kind, ProxyError
from proxy.pool import KeyPool, UpstreamKey
from proxy.providers.base import TaskState
from proxy.providers.engine import NotAnswered, Provider, Sent
from proxy.store import Store, TaskRecord

log = structlog.get_logger("proxy.tasks")
POLL_TICK = 0.005  # seconds: the polls due within one tick go out together


@dataclass(eq=False)
class Task:
    record: TaskRecord
    provider: Provider
    key: UpstreamKey  # polls use the key that created the task
    pool: KeyPool | None  # None for a client's own key: no shared limits to respect
    state: TaskState
    error: ProxyError | None = None
    cost: float = 0.0  # what the submit was recorded as costing
    polls: int = 0
    ended: bool = False  # final, error or not, or let go at shutdown
    waiters: list[asyncio.Future[None]] = field(default_factory=list)  # one per request waiting for the end
    deadline: float = 0.0  # time.monotonic() when its request times out; once late, when it is given up
    last_problem: str | None = None  # the last failed poll's message
    timer: asyncio.TimerHandle | None = None  # the time-out, when it comes before the next poll
    late: bool = False  # its request timed out: polled every late_poll_interval until final or given up

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
        return ProxyError(Kind.TASK_TIMEOUT, f"The upstream task {record.id} was given up: "
                          f"{record.reason or 'not final in time'}.", task_ids=(record.id,))
    return None


def still_running(task_id: str, waited: float, problem: str | None = None) -> ProxyError:
    """A request's timeout: its task goes on, and its result will be retrievable."""
    why = f" (last poll: {problem})" if problem else ""
    return ProxyError(Kind.TASK_TIMEOUT, f"The upstream task {task_id} was not finished after {waited:g} s{why}. "
                      f"It keeps running: GET /v1/tasks/{task_id} returns its result once it is final.",
                      task_ids=(task_id,), unfinished=True)


class TaskWaiter:
    """Polls every unfinished task of this process on its own schedule.

    Event-loop timers, not a sleeping coroutine per task: the polls due in a tick are sent by
    its timer, and each answer, read in a callback, schedules the next. 10,000 waiting tasks
    then cost a list entry each between polls, and a poll no coroutine or asyncio task
    (bench/README.md).
    """

    def __init__(self, config: TasksConfig, store: Store, owner: str,
                 on_final: Callable[[Task], None]) -> None:
        self.config = config
        self.store = store
        self.owner = owner  # this process, in the store: who polls which task
        self.on_final = on_final
        self.live: dict[str, Task] = {}  # unfinished tasks of this process; finished ones are in the store
        self._running: set[asyncio.Task[None]] = set()  # polls and settlements under way
        # per tick: its timer, and the tasks whose next poll falls due in it
        self._ticks: dict[int, tuple[asyncio.TimerHandle, list[Task]]] = {}

    async def start(self, task: Task) -> Task:
        """Persist the task, then (unless it is already final) poll it in the background."""
        task.record.owner = self.owner
        self.live[task.id] = task
        if task.state.final:
            self._settle(task)
            return task
        await self.store.save_task(task.record)
        remaining = task.record.deadline - time.time()
        if remaining > 0:
            task.deadline = time.monotonic() + remaining
        else:  # resumed after its request's deadline: late from the start
            self._go_late(task)
        self._next(task, self.config.first_poll)
        return task

    async def result(self, task: Task, late_wait: float | None = None) -> TaskState:
        """Wait for the task to end; answer its final state or raise its error. Raises the
        timeout error when its request's deadline passes (or, for a task already late, after
        `late_wait` seconds): the task itself goes on.

        Each caller waits on a future of its own, which the end resolves directly: cancelling
        the caller (client gone) leaves the polling and the other waiters alone, and the answer
        is one turn of the event loop nearer than through `shield`.
        """
        if not task.ended:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            task.waiters.append(waiter)
            timer = loop.call_later(late_wait, self._expire, task, waiter, late_wait) \
                if late_wait is not None and task.late else None
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in task.waiters:
                    task.waiters.remove(waiter)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
        if task.error is not None:
            raise task.error
        return task.state

    @staticmethod
    def _expire(task: Task, waiter: asyncio.Future[None], waited: float) -> None:
        if waiter in task.waiters:
            task.waiters.remove(waiter)
        if not waiter.done():
            waiter.set_exception(still_running(task.id, waited, task.last_problem))

    async def find(self, task_id: str) -> Task | TaskRecord | None:
        return self.live.get(task_id) or await self.store.get_task(task_id)

    @property
    def waiting(self) -> int:
        return len(self.live)

    def _next(self, task: Task, delay: float, since: float | None = None) -> None:
        """Schedule the next poll, `delay` s from `since` (default: now), or the time-out if
        that comes first (never before a first poll: a task resumed late is asked once).

        Polls fall due on POLL_TICK boundaries, rounded up (never sooner than `delay`), and one
        timer starts all the polls of a tick in one turn of the event loop: they go out
        together, pipelined on a few connections (proxy/upstream_http.py), rather than one
        write each (bench/README.md)."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        due = (now if since is None else since) + delay
        if due >= task.deadline and task.polls:
            task.timer = loop.call_later(max(0.0, task.deadline - now), self._time_out, task)
            return
        tick = math.ceil(due / POLL_TICK)
        if tick not in self._ticks:
            self._ticks[tick] = (loop.call_later(tick * POLL_TICK - now, self._run_tick, tick), [])
        self._ticks[tick][1].append(task)

    def _run_tick(self, tick: int) -> None:
        _, due = self._ticks.pop(tick)
        for task in due:
            self._send_poll(task)

    def _send_poll(self, task: Task) -> None:
        """Most polls: sent from their tick's timer and read in a callback, with no coroutine
        or asyncio task each (bench/README.md). A poll whose key must wait for its rate window,
        or that the transport cannot pipeline, goes through `_poll` instead."""
        task.timer = None
        if task.pool is not None and not task.pool.take_now(task.key):
            self._spawn(self._poll, task)
            return
        sent = task.provider.send_poll(task.key.secret, task.record.upstream_task_id or "")
        if sent is None:
            self._spawn(self._poll_counted, task)
            return
        task.polls += 1
        sent.reply.add_done_callback(functools.partial(self._polled, task, sent))

    def _polled(self, task: Task, sent: Sent, _: object) -> None:
        if task.ended:  # let go at shutdown meanwhile
            return
        # The next poll counts from the moment the answer arrived, which the upstream had
        # the poll before: not from this callback's turn, later by however busy the loop is.
        try:
            arrived = sent.arrived()
            state = task.provider.read_poll(task.record.upstream_task_id or "", sent)
        except NotAnswered:  # its pipeline broke before the upstream began it: once more, alone
            task.polls -= 1
            self._spawn(self._poll_counted, task)
            return
        except ProxyError as error:
            self._poll_failed(task, error)
            return
        except (Exception, asyncio.CancelledError) as exc:  # a bug, not the upstream: the task goes on
            log.error("poll_unreadable", task_id=task.id, upstream=task.provider.name, error=repr(exc))
            self._poll_failed(task, ProxyError(Kind.UPSTREAM_UNAVAILABLE,
                                               f"{task.provider.name}: the poll's answer could not be read"))
            return
        if self._took(task, state, arrived):
            self._settle(task)

    def _interval(self, task: Task) -> float:
        return self.config.late_poll_interval if task.late else self.config.poll_interval

    def _spawn(self, step: Callable[[Task], Awaitable[None]], task: Task) -> None:
        task.timer = None
        runner = asyncio.ensure_future(step(task))
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)

    async def _poll(self, task: Task, counted: bool = False) -> None:
        """A poll as a coroutine: `counted` when its call is already in the key's window."""
        try:
            if task.pool is not None and not counted:
                # A busy key stretches the spacing rather than exceeding its limit.
                try:
                    await task.pool.slot(task.key, max(task.deadline, time.monotonic() + self._interval(task)))
                except ProxyError:
                    self._time_out(task)
                    return
            task.polls += 1
            try:
                state = await task.provider.poll(task.key.secret, task.record.upstream_task_id or "")
            except ProxyError as error:
                self._poll_failed(task, error)
                return
            if self._took(task, state):
                self._settle(task)
        except asyncio.CancelledError:
            self._abandon(task)
            raise

    async def _poll_counted(self, task: Task) -> None:
        await self._poll(task, counted=True)

    def _took(self, task: Task, state: TaskState, arrived: float | None = None) -> bool:
        """A poll's answer: True when final (to settle), else the next poll is scheduled."""
        task.state = state
        task.record.progress = state.progress
        if state.final:
            return True
        # Counted from the answer: a slow or delayed poll never brings the next one closer.
        self._next(task, self._interval(task), arrived)
        return False

    def _poll_failed(self, task: Task, error: ProxyError) -> None:
        # A poll that fails is not a task that failed: try again at the next interval.
        task.last_problem = error.message
        if task.pool is not None and error.kind is Kind.RATE_LIMITED:
            task.pool.failed(task.key, error)
        log.warning("poll_failed", task_id=task.id, upstream=task.provider.name, error=error.message)
        self._next(task, self._interval(task))

    def _time_out(self, task: Task) -> None:
        """Its request's deadline: the waiting requests get their 504 and the task goes on,
        polled every late_poll_interval; once late, this is give_up_after, and the end."""
        task.timer = None
        if task.late:
            task.record.reason = f"not final after {self.config.give_up_after:g} h" + \
                (f"; last poll: {task.last_problem}" if task.last_problem else "")
            task.record.state = "timeout"
            self._settle(task)
            return
        waiters, task.waiters = task.waiters, []
        for waiter in waiters:
            if not waiter.done():  # an error each: a request adds its own task ids to it
                waiter.set_exception(still_running(task.id, self.config.timeout, task.last_problem))
        self._go_late(task)
        log.info("task_late", task_id=task.id, upstream=task.provider.name)
        self._next(task, self.config.late_poll_interval)

    def _go_late(self, task: Task) -> None:
        task.late = True
        give_up = task.record.created + self.config.give_up_after * 3600
        task.deadline = time.monotonic() + max(0.0, give_up - time.time())

    def _abandon(self, task: Task) -> None:
        """Shutting down: the record stays unfinished and the next process resumes it."""
        if task.ended:
            return
        task.error = ProxyError(Kind.TASK_TIMEOUT, f"The proxy is restarting; task {task.id} goes on and "
                                f"its result will be at GET /v1/tasks/{task.id}.", task_ids=(task.id,))
        self._end(task)

    @staticmethod
    def _end(task: Task) -> None:
        task.ended = True
        for waiter in task.waiters:
            if not waiter.done():
                waiter.set_result(None)
        task.waiters.clear()

    def _settle(self, task: Task) -> None:
        """The task's end, in this turn of the event loop: the store and the usage record are
        queued, and the waiting requests resumed."""
        record, state = task.record, task.state
        if record.state != "timeout":
            record.state = "succeeded" if state.status == "succeeded" else "failed"
            record.urls, record.media_type = state.urls, state.media_type
            record.reason = state.reason if state.status == "failed" else None
        task.error = error_of(record)
        try:
            self.store.finish_task(record)
            self.on_final(task)
        except Exception as exc:  # the answer must still reach the client
            log.error("task_settle_failed", task_id=task.id, error=repr(exc))
        if not task.ended:
            self._end(task)
        self.live.pop(task.id, None)  # the store has it now; waiters hold the object itself

    async def close(self) -> None:
        """Let go of every unfinished task (the next process resumes it) before anything else
        runs: an answer that arrives meanwhile then schedules no poll after the close."""
        for timer, _ in self._ticks.values():
            timer.cancel()
        self._ticks.clear()
        for task in list(self.live.values()):
            if task.timer is not None:
                task.timer.cancel()
                task.timer = None
            self._abandon(task)
        for runner in list(self._running):
            runner.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
