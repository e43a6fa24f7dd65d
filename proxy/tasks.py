"""Waits on upstream async tasks: polling schedule, deadline, results kept for retrieval.

A task the proxy started belongs to the client that asked. It is written to the store
before anyone waits on it; its waiter runs apart from the request, so a client that goes
away does not stop it; a restart resumes it from the store; its outcome stays retrievable
for `keep_results` hours.

The schedule spends a key's calls where they pay: a task's first poll falls near the early
end of its model's learnt durations (proxy/durations.py), then one every poll_interval,
never faster. A key's polls share its rate window fairly: when it is full, due polls wait in
the key's queue, the longest-waiting first, and a request waiting to submit goes before a
poll that can be late by an interval. An upstream that lists a key's tasks (Fengyuan) is
polled with one list call for all the key's tasks that are due, a task the list does not
show with a poll of its own.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from proxy.config import TasksConfig
from proxy.durations import Durations, Model
from proxy.errors import Kind, ProxyError
from proxy.loop import running_loop
from proxy.pool import KeyPool, UpstreamKey
from proxy.providers.base import TaskList, TaskState
from proxy.providers.engine import NotAnswered, Prepared, Provider, Sent
from proxy.store import Store, TaskRecord

log = structlog.get_logger("proxy.tasks")
POLL_TICK = 0.005  # seconds: the polls due within one tick go out together
MAX_LIST_PAGES = 5  # pages of a key's task list read for one round of polls, at most
PROGRESS_HORIZON = 3  # intervals a task's progress may put between its polls, at most
UNKNOWN_AFTER = 3  # polls in a row answering "no such task" before the task counts as lost upstream


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
    model: Model | None = None  # (upstream, upstream model): whose durations it teaches; None: resumed
    due_at: float = 0.0  # time.monotonic() its next (or current) poll falls due
    keyed: KeyPolls | None = None  # its key's poll queue (pooled keys only)
    detail: bool = False  # its next poll asks for the task itself, not the key's task list
    unknown: int = 0  # polls in a row the upstream answered it knows no such task
    progress_seen: tuple[float, float] | None = None  # (time.monotonic(), progress) of the last poll that had one
    poll: Prepared | None = None  # its poll's request, written at the first poll

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def upstream_id(self) -> str:
        return self.record.upstream_task_id or ""


class KeyPolls:
    """One pooled key's polls: due tasks wait here when the key has no room, the longest-waiting
    first; with an upstream task list, one list call answers every due task of the key."""

    __slots__ = ("detail", "draining", "due", "key", "listing", "lists", "model", "pool", "provider", "tasks",
                 "timer")

    def __init__(self, provider: Provider, pool: KeyPool, key: UpstreamKey) -> None:
        self.provider, self.pool, self.key = provider, pool, key
        self.tasks: dict[str, Task] = {}  # upstream task id -> this process's unfinished task on the key
        self.due: deque[Task] = deque()  # due tasks waiting for room (or for the list), oldest first
        self.detail: deque[Task] = deque()  # due tasks the list did not answer: polled one by one
        self.lists = provider.lists_tasks
        self.listing = False  # a list call is under way
        self.model: Model | None = None  # the model of its latest task: how soon a new one falls due
        self.timer: asyncio.TimerHandle | None = None
        self.draining: asyncio.Task[None] | None = None  # asking Redis for room (shared state)


def _no_list(error: ProxyError) -> bool:
    """A list call's failure that says the upstream has no such list (not that it is down)."""
    return error.kind in (Kind.MODEL_NOT_FOUND, Kind.NOT_FOUND, Kind.BAD_REQUEST)


def new_task_id() -> str:
    return "task_" + secrets.token_urlsafe(12)


def error_of(record: TaskRecord) -> ProxyError | None:
    reason = record.reason  # the upstream's, scrubbed where it came in (proxy/providers/engine.py)
    if record.state == "failed":
        return ProxyError(Kind.TASK_FAILED, f"The upstream task {record.id} failed: "
                          f"{reason or 'no reason given'}", task_ids=(record.id,))
    if record.state == "timeout":
        return ProxyError(Kind.TASK_TIMEOUT, f"The upstream task {record.id} was given up: "
                          f"{reason or 'not final in time'}.", task_ids=(record.id,))
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
    its timer, and each answer, read in a callback, schedules the next; a waiting task costs a
    list entry between polls (bench/README.md, "One timer per waiting task").
    """

    def __init__(self, config: TasksConfig, store: Store, owner: str,
                 on_final: Callable[[Task], None]) -> None:
        self.config = config
        self.store = store
        self.owner = owner  # this process, in the store: who polls which task
        self.on_final = on_final
        self.durations = Durations(store)
        self.live: dict[str, Task] = {}  # unfinished tasks of this process; finished ones are in the store
        self._running: set[asyncio.Task[None]] = set()  # polls under way as coroutines
        # per tick: its timer, and the tasks whose next poll falls due in it
        self._ticks: dict[int, tuple[asyncio.TimerHandle, list[Task]]] = {}
        self._keys: dict[tuple[str, str], KeyPolls] = {}  # (upstream, key fingerprint) -> its polls
        self._lists_off: set[tuple[str, str]] = set()  # keys whose task list failed: said once in the log

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
        if task.pool is not None:
            task.keyed = self._key_polls(task)
            task.keyed.tasks[task.upstream_id] = task
            task.keyed.model = task.model or task.keyed.model
        self._next(task, self._first_poll(task))
        return task

    def _first_poll(self, task: Task) -> float:
        """Near the early end of the model's learnt durations; the configured delay without them
        (and for a resumed task, asked once soon)."""
        if task.model is None:
            return self.config.first_poll
        return max(0.0, self._first_poll_of(task.model) - (time.time() - task.record.created))

    def _key_polls(self, task: Task) -> KeyPolls:
        assert task.pool is not None
        slot = (task.provider.name, task.key.fingerprint)
        polls = self._keys.get(slot)
        if polls is None or polls.key is not task.key or polls.provider is not task.provider:
            polls = self._keys[slot] = KeyPolls(task.provider, task.pool, task.key)
            polls.lists = polls.lists and slot not in self._lists_off
        return polls

    def poll_reserve(self, upstream: str, key: UpstreamKey, window: float) -> int:
        """Calls of the key's next `window` seconds its tasks' polls will need, counting the
        submits under way (each becomes a task): one list call an interval from when the first
        falls due, for an upstream that lists tasks; else a poll for each task due by then."""
        keyed = self._keys.get((upstream, key.fingerprint))
        if keyed is None:
            return key.in_flight
        now = time.monotonic()
        horizon = now + window
        # a submit under way is due at its model's first poll (the key's latest model says which)
        first = self._first_poll_of(keyed.model) if key.in_flight else math.inf
        dues = [t.due_at for t in keyed.tasks.values()]
        if keyed.lists:
            soonest = min(min(dues, default=math.inf), now + first)
            return 0 if soonest >= horizon else math.ceil((horizon - max(now, soonest)) / self.config.poll_interval)
        return sum(1 for due in dues if due < horizon) + (key.in_flight if now + first < horizon else 0)

    def _first_poll_of(self, model: Model | None) -> float:
        learnt = self.durations.first_poll(model) if model is not None else None
        return self.config.first_poll if learnt is None else learnt

    async def result(self, task: Task, late_wait: float | None = None) -> TaskState:
        """Wait for the task to end; answer its final state or raise its error. Raises the
        timeout error when its request's deadline passes (or, for a task already late, after
        `late_wait` seconds): the task itself goes on.

        Each caller waits on a future of its own, which the end resolves directly: cancelling
        the caller (client gone) leaves the polling and the other waiters alone, and the answer
        is one turn of the event loop nearer than through `shield`.
        """
        if not task.ended:
            loop = running_loop()
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

    def _interval(self, task: Task) -> float:
        return self.config.late_poll_interval if task.late else self.config.poll_interval

    # ---- when the next poll falls due -------------------------------------------------

    def _next(self, task: Task, delay: float, since: float | None = None) -> None:
        """Schedule the next poll, `delay` s from `since` (default: now), or the time-out if
        that comes first (never before a first poll: a task resumed late is asked once).

        Polls fall due on POLL_TICK boundaries, rounded up (never sooner than `delay`), and one
        timer starts all the polls of a tick in one turn of the event loop: they go out
        together, pipelined on a few connections (bench/README.md, "Polls pipelined")."""
        loop = running_loop()
        now = time.monotonic()
        due = (now if since is None else since) + delay
        if due >= task.deadline and task.polls:
            task.timer = loop.call_later(max(0.0, task.deadline - now), self._time_out, task)
            return
        tick = math.ceil(due / POLL_TICK)
        task.due_at = tick * POLL_TICK
        if tick not in self._ticks:
            self._ticks[tick] = (loop.call_later(task.due_at - now, self._run_tick, tick), [])
        self._ticks[tick][1].append(task)

    def _run_tick(self, tick: int) -> None:
        _, due = self._ticks.pop(tick)
        at = tick * POLL_TICK + POLL_TICK / 2
        queued: set[KeyPolls] = set()
        for task in due:
            # ended meanwhile, or a list answer moved its poll later (a newer entry stands for it)
            if not task.ended and task.due_at <= at:
                keyed = self._send_poll(task)
                if keyed is not None:
                    queued.add(keyed)
        for keyed in queued:  # after the whole tick: one list call answers all of a key's due tasks
            self._drain(keyed)

    def _send_poll(self, task: Task) -> KeyPolls | None:
        """Most polls: sent from their tick's timer and read in a callback, with no coroutine
        or asyncio task each ("Polls with no task each"). A poll whose key has no room now, or that
        the key's task list answers, waits in the key's queue, which is answered."""
        task.timer = None
        keyed = task.keyed
        if keyed is None:
            self._poll_now(task)  # someone's own key: no shared limits
        elif keyed.due or keyed.detail or keyed.lists or keyed.pool.waiting or not keyed.pool.take_now(keyed.key):
            keyed.due.append(task)
            return keyed
        else:
            self._poll_now(task)
        return None

    # ---- a key's queue of due polls ---------------------------------------------------

    def _drain(self, keyed: KeyPolls) -> None:
        """Send what the key has room for, the longest-waiting poll first; come back when
        the key has room again, or when a queued task's deadline comes first. A key counted in
        Redis (shared state) is asked there, from a coroutine of its own."""
        if keyed.timer is not None:
            keyed.timer.cancel()
            keyed.timer = None
        if keyed.pool.counted_shared(keyed.key):
            if keyed.draining is None:
                keyed.draining = asyncio.ensure_future(self._drain_shared(keyed))
            return
        while (up := self._up_next(keyed)) is not None:
            queue, head, listed = up
            now = time.monotonic()
            wait = self._deferred(keyed, head, now, keyed.pool.wait(keyed.key))
            if wait > 0 or not keyed.pool.take_now(keyed.key):
                self._wake(keyed, max(wait, 0.005), now)
                return
            self._send_head(keyed, queue, head, listed)

    async def _drain_shared(self, keyed: KeyPolls) -> None:
        try:
            while (up := self._up_next(keyed)) is not None:
                queue, head, listed = up
                wait = self._deferred(keyed, head, time.monotonic(), 0.0)
                if wait <= 0:
                    wait = await keyed.pool.take(keyed.key)
                if wait > 0:
                    keyed.draining = None
                    self._wake(keyed, max(wait, 0.005), time.monotonic())
                    return
                if up == self._up_next(keyed):  # nothing changed while Redis answered
                    self._send_head(keyed, queue, head, listed)
                else:
                    keyed.pool.landed(keyed.key)  # the room taken is given back unused
        finally:
            if keyed.draining is asyncio.current_task():
                keyed.draining = None

    def _up_next(self, keyed: KeyPolls) -> tuple[deque[Task], Task, bool] | None:
        """The queue to serve next, its longest-waiting task, and whether a list call answers it."""
        while True:
            if keyed.detail:
                queue, listed = keyed.detail, False
            elif keyed.due and not keyed.listing:
                queue, listed = keyed.due, keyed.lists
            else:
                return None
            if not queue[0].ended:
                return queue, queue[0], listed
            queue.popleft()

    def _deferred(self, keyed: KeyPolls, head: Task, now: float, wait: float) -> float:
        """A request waiting to submit goes first when this room is not the polls' reserve,
        unless the poll is already an interval late."""
        if wait <= 0 and keyed.pool.waiting and keyed.pool.requests_may_call(keyed.key):
            return head.due_at + self._interval(head) - now
        return wait

    def _send_head(self, keyed: KeyPolls, queue: deque[Task], head: Task, listed: bool) -> None:
        """The key's call is counted: a list call for every due task, or the head's own poll."""
        if listed:
            wanted = {t.upstream_id: t for t in keyed.due if not t.ended}
            keyed.due.clear()
            keyed.listing = True
            self._send_list(keyed, 1, wanted)
        else:
            queue.popleft()
            self._poll_now(head)

    def _wake(self, keyed: KeyPolls, wait: float, now: float) -> None:
        """Drain again after `wait`, or at the first deadline of a queued task if sooner."""
        soonest = min((t.deadline for q in (keyed.due, keyed.detail) for t in q if not t.ended), default=math.inf)
        keyed.timer = running_loop().call_later(min(wait, max(0.0, soonest - now)), self._wake_up, keyed)

    def _wake_up(self, keyed: KeyPolls) -> None:
        keyed.timer = None
        now = time.monotonic()
        for queue in (keyed.due, keyed.detail):
            for task in [t for t in queue if not t.ended and t.deadline <= now]:
                self._deadline(task, queued=True)
        self._drain(keyed)

    # ---- one task's poll ------------------------------------------------------------

    def _poll_now(self, task: Task) -> None:
        """Send a task's poll, its call already counted in its key's window (pooled keys)."""
        task.detail = False
        poll = task.poll or task.provider.prepare_poll(task.key.secret, task.upstream_id)
        sent = None if poll is None else task.provider.send_poll(poll)
        task.poll = poll
        if sent is None:
            self._spawn(task)
            return
        task.polls += 1
        sent.reply.add_done_callback(functools.partial(self._polled, task, sent))

    def _polled(self, task: Task, sent: Sent, _: object) -> None:
        # The next poll counts from the moment the answer arrived, which the upstream had
        # the poll before: not from this callback's turn, later by however busy the loop is.
        try:
            arrived = sent.arrived()
            state = task.provider.read_poll(task.upstream_id, sent)
        except NotAnswered:  # its pipeline broke before the upstream began it: once more, alone
            task.polls -= 1
            if not task.ended:
                self._spawn(task)
            elif task.pool is not None:
                task.pool.landed(task.key)
            return
        except ProxyError as error:
            self._landed(task, arrived)
            if not task.ended:
                self._poll_failed(task, error)
            return
        except (Exception, asyncio.CancelledError) as exc:  # a bug, not the upstream: the task goes on
            self._landed(task, None)
            log.error("poll_unreadable", task_id=task.id, upstream=task.provider.name, error=repr(exc))
            if not task.ended:
                self._poll_failed(task, ProxyError(Kind.UPSTREAM_UNAVAILABLE,
                                                   f"{task.provider.name}: the poll's answer could not be read"))
            return
        self._landed(task, arrived)
        if not task.ended and self._took(task, state, arrived):
            self._settle(task)

    @staticmethod
    def _landed(task: Task, at: float | None) -> None:
        if task.pool is not None:
            task.pool.landed(task.key, at)

    def _spawn(self, task: Task) -> None:
        task.timer = None
        runner = asyncio.ensure_future(self._poll(task))
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)

    async def _poll(self, task: Task) -> None:
        """A poll as a coroutine (where it cannot be pipelined); its call is counted already."""
        try:
            task.polls += 1
            try:
                state = await task.provider.poll(task.key.secret, task.upstream_id)
            except ProxyError as error:
                self._poll_failed(task, error)
                return
            finally:
                self._landed(task, None)
            if self._took(task, state):
                self._settle(task)
        except asyncio.CancelledError:
            self._abandon(task)
            raise

    def _took(self, task: Task, state: TaskState, arrived: float | None = None) -> bool:
        """A poll's answer: True when final (to settle), else the next poll is scheduled."""
        task.state = state
        task.unknown = 0
        task.record.progress = state.progress
        if state.final:
            return True
        # Counted from the answer: a slow or delayed poll never brings the next one closer.
        self._next(task, self._after(task, state), arrived)
        return False

    def _after(self, task: Task, state: TaskState) -> float:
        """When to poll next: an interval, or later where the task's progress, advancing at the
        rate seen between two polls, says it has far to go (never more than PROGRESS_HORIZON
        intervals: a progress may be coarse). A progress that does not move says nothing."""
        interval = self._interval(task)
        progress, last = state.progress, task.progress_seen
        if progress is None or not 0 <= progress < 100:
            return interval
        now = time.monotonic()
        task.progress_seen = (now, progress)
        if last is None or progress <= last[1] or now <= last[0]:
            return interval
        remaining = (100 - progress) * (now - last[0]) / (progress - last[1])
        return max(interval, min(remaining, PROGRESS_HORIZON * interval))

    def _poll_failed(self, task: Task, error: ProxyError) -> None:
        # A poll that fails is not a task that failed: try again at the next interval, unless the
        # upstream keeps saying it knows no such task.
        task.last_problem = error.message
        task.unknown = task.unknown + 1 if error.kind in (Kind.NOT_FOUND, Kind.MODEL_NOT_FOUND) else 0
        if task.unknown >= UNKNOWN_AFTER:
            task.state = TaskState(status="failed", task_id=task.upstream_id,
                                   reason=f"the upstream no longer knows the task ({error.message})")
            self._settle(task)
            return
        if task.pool is not None and error.kind is Kind.RATE_LIMITED:
            task.pool.failed(task.key, error)
        log.warning("poll_failed", task_id=task.id, upstream=task.provider.name, error=error.message)
        self._next(task, self._interval(task))

    # ---- a key's task list: one call for many polls -----------------------------------------

    def _send_list(self, keyed: KeyPolls, page: int, wanted: dict[str, Task]) -> None:
        """A page of the key's tasks, its call counted; `wanted`: the due tasks it should answer."""
        sent = keyed.provider.send_list(keyed.key.secret, page)
        if sent is None:
            runner = asyncio.ensure_future(self._list(keyed, page, wanted))
            self._running.add(runner)
            runner.add_done_callback(self._running.discard)
            return
        sent.reply.add_done_callback(functools.partial(self._listed, keyed, page, wanted, sent))

    def _listed(self, keyed: KeyPolls, page: int, wanted: dict[str, Task], sent: Sent, _: object) -> None:
        try:
            arrived = sent.arrived()
            listing: TaskList | ProxyError | None = keyed.provider.read_list(sent)
        except NotAnswered:
            arrived, listing = None, ProxyError(Kind.UPSTREAM_UNAVAILABLE, "the task list was not answered")
        except ProxyError as error:
            listing = error
        except (Exception, asyncio.CancelledError) as exc:  # a bug, not the upstream
            log.error("task_list_unreadable", upstream=keyed.provider.name, error=repr(exc))
            listing = None
        self._take_list(keyed, page, wanted, listing, arrived)

    async def _list(self, keyed: KeyPolls, page: int, wanted: dict[str, Task]) -> None:
        try:
            listing: TaskList | ProxyError | None = await keyed.provider.list_tasks(keyed.key.secret, page)
        except ProxyError as error:
            listing = error
        self._take_list(keyed, page, wanted, listing, None)

    def _take_list(self, keyed: KeyPolls, page: int, wanted: dict[str, Task],
                   listing: TaskList | ProxyError | None, arrived: float | None) -> None:
        """What a page of the key's task list says: each task on it that this process waits on
        takes its state; due tasks it does not show are polled one by one."""
        keyed.pool.landed(keyed.key, arrived)
        keyed.listing = False
        if isinstance(listing, ProxyError) and not _no_list(listing):
            # A list call that failed is a poll that failed, for each task it was to answer.
            for task in wanted.values():
                if not task.ended:
                    self._poll_failed(task, listing)
            self._drain(keyed)
            return
        if not isinstance(listing, TaskList):
            self._list_off(keyed, listing)
        else:
            for state in listing.tasks:
                found = keyed.tasks.get(state.task_id or "")
                if found is None or found.ended:
                    continue
                task = found
                if state.status == "succeeded" and not state.urls:
                    continue  # finished, its result not on the list: its own poll reads it
                due = wanted.pop(task.upstream_id, None) is not None
                task.polls += due
                state.task_id = task.upstream_id
                if due:
                    if self._took(task, state, arrived):
                        self._settle(task)
                elif state.final:  # not due yet, but the list says it is over: no need to wait
                    task.state = state
                    self._settle(task)
                else:  # not due yet, and as good as polled: its next poll joins the next list call
                    task.state = state
                    task.record.progress = state.progress
                    self._push_back(task, arrived)
            if wanted and listing.full and page < MAX_LIST_PAGES and keyed.pool.take_now(keyed.key):
                keyed.listing = True  # older tasks are on the next page
                self._send_list(keyed, page + 1, wanted)
                return
        for task in wanted.values():  # not on the list (or no list): asked one by one
            if not task.ended:
                task.detail = True
                keyed.detail.append(task)
        self._drain(keyed)

    def _push_back(self, task: Task, arrived: float | None) -> None:
        """Move a task's next poll to an interval after fresh news of it, never earlier."""
        since = time.monotonic() if arrived is None else arrived
        after = self._after(task, task.state)
        if task.due_at < since + after < task.deadline:
            self._next(task, after, since)

    def _list_off(self, keyed: KeyPolls, error: ProxyError | None) -> None:
        """The key's upstream has no task list we can read: its tasks are polled one by one."""
        keyed.lists = False
        slot = (keyed.provider.name, keyed.key.fingerprint)
        if slot not in self._lists_off:
            self._lists_off.add(slot)
            log.warning("task_list_unavailable", upstream=keyed.provider.name, key=keyed.key.fingerprint,
                        error=error.message if error is not None else "an answer of an unknown shape",
                        now="each task is polled on its own")

    # ---- deadlines and ends -----------------------------------------------------------

    def _time_out(self, task: Task) -> None:
        task.timer = None
        self._deadline(task, queued=False)

    def _deadline(self, task: Task, queued: bool) -> None:
        """Its request's deadline: the waiting requests get their 504 and the task goes on,
        polled every late_poll_interval; once late, this is give_up_after, and the end.
        `queued`: it waits in its key's queue for room, and is polled from there."""
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
        if not queued:
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

    def _end(self, task: Task) -> None:
        task.ended = True
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        if task.keyed is not None:
            task.keyed.tasks.pop(task.upstream_id, None)
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
        if record.state == "succeeded" and task.model is not None:
            self.durations.record(task.model, time.time() - record.created)
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
        for keyed in self._keys.values():
            if keyed.timer is not None:
                keyed.timer.cancel()
            if keyed.draining is not None:
                keyed.draining.cancel()
            keyed.due.clear()
            keyed.detail.clear()
        for task in list(self.live.values()):
            self._abandon(task)
        for runner in list(self._running):
            runner.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        self.durations.close()
