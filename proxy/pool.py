"""Upstream keys per provider: choose one, respect its limits, set bad ones aside, bring them back.

States: active; cooling (rate limited, until Retry-After); exhausted (balance short: Fengyuan
keys are re-read, others get one request through after `recheck_after`); disabled (the
upstream refused the key; back on reload or by an admin). Every upstream call made with a
key, polls included, counts against the key's own rate limit, so the proxy never causes an
upstream 429 by itself: when every key is at its limit a request waits up to
`queue_timeout`, then gets 429 with Retry-After.

A call counts from the moment it is sent until its answer lands, and then stays in the
window counted from the answer's arrival: the upstream saw it somewhere between the two, so
its own sliding window lets go of it before ours does, never after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import structlog

from proxy.config import ProviderConfig, UpstreamKeyConfig
from proxy.errors import Kind, ProxyError
from proxy.providers.base import KeyInfo
from proxy.shared import Shared, SharedDown, StateChange, Window

T = TypeVar("T")
log = structlog.get_logger("proxy.pool")
KeyState = Literal["active", "cooling", "exhausted", "disabled"]
CostOf = Callable[["UpstreamKey"], float | None]

DEFAULT_COOLDOWN = 10.0  # seconds a rate-limited key rests when the upstream names no Retry-After
# Our count of a key's calls must stay below the upstream's even though the upstream sees each
# call a little later than we send it: count over a slightly longer window.
WINDOW_MARGIN = 0.5
CALL_BUCKET = 0.01  # seconds: calls this close together are counted as one entry of the window
ANSWER_WAIT = 0.05  # seconds to wait for room when only calls under way fill a key's window


@dataclass(slots=True)
class Admission:
    """A request of a client with an rpm, not yet counted in its shared window: counted with
    its first upstream call's key window (one Redis round trip for both), alone where that key
    keeps no window in Redis, and at the request's end if it made no upstream call. The
    request's other calls wait for that count, and answer its 429 if it was refused."""

    window: Window
    refused: Callable[[float], ProxyError]  # the 429 for a full window, given the seconds to wait
    counted_alone: Callable[[], Awaitable[None]]  # counts it by itself: 429 if the window is full
    counted: bool = False
    refusal: ProxyError | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one call of the request counts it

    def settled(self) -> bool:
        """Whether it is counted; its 429 if it was refused."""
        if self.refusal is not None:
            raise self.refusal
        return self.counted

    async def count(self) -> None:
        """Counted alone, unless it is already: 429 if the window is full."""
        async with self.lock:
            if self.settled():
                return
            try:
                await self.counted_alone()
            except ProxyError as error:
                self.refusal = error
                raise
            self.counted = True

    async def count_late(self) -> None:
        """The request ended without an upstream call: it counts all the same."""
        with contextlib.suppress(ProxyError):  # a full window: too late to refuse, and it is full anyway
            await self.count()


class CallWindow:
    """A key's recent calls as (end, count) buckets, oldest first: a bucket per CALL_BUCKET,
    not a timestamp per call, keeps a busy key's window small (bench/README.md, "Memory per
    waiting request"). A call counts as made at its bucket's end: it leaves the window late,
    never early."""

    __slots__ = ("_buckets", "count")

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque()
        self.count = 0

    def add(self, now: float) -> None:
        buckets = self._buckets
        if buckets and buckets[-1][0] >= now:
            buckets[-1][1] += 1
        else:
            buckets.append([now + CALL_BUCKET, 1])
        self.count += 1

    def add_old(self, at: float, count: int) -> None:
        """Calls made before any this process made (a previous process's, restored)."""
        self._buckets.append([at, count])
        self.count += count

    def entries(self) -> list[tuple[float, int]]:
        return [(end, int(count)) for end, count in self._buckets]

    def drop_until(self, horizon: float) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] <= horizon:
            self.count -= int(buckets.popleft()[1])

    def wait_below(self, limit: int, horizon: float) -> float:
        """Seconds until fewer than `limit` calls are left after `horizon` moves on."""
        leave = self.count - limit + 1  # this many must leave the window
        for end, count in self._buckets:
            leave -= int(count)
            if leave <= 0:
                return end - horizon
        return 0.0


def part(limit: int | None, share: int) -> int | None:
    """One process's part of a limit shared by `share` processes (at least 1, so it can serve)."""
    return None if limit is None else max(1, limit // share)


def fingerprint(secret: str) -> str:
    """A stable, non-reversible name for a key, safe for logs and admin pages."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(eq=False)
class UpstreamKey:
    provider: str
    secret: str = field(repr=False)
    fingerprint: str
    weight: int = 1
    rpm: int | None = None  # configured limit; None: the upstream's known limit (limit_of)
    max_concurrent: int | None = None
    state: KeyState = "active"
    until: float = 0.0  # monotonic time the current state ends (cooling, exhausted)
    reason: str | None = None
    in_flight: int = 0  # requests (chat, submits) under way: max_concurrent
    unanswered: int = 0  # calls of any kind sent whose answer has not landed: in the window already
    requests: int = 0
    failures: int = 0
    credits: float | None = None
    vip_level: int | None = None
    checked_at: float | None = None  # unix time of the last balance read
    calls: CallWindow = field(default_factory=CallWindow)  # monotonic send times inside the window
    # its calls under way counted in Redis: requests' (counted in flight too), and the others
    shared_requests: deque[str] = field(default_factory=deque)
    shared_calls: deque[str] = field(default_factory=deque)
    current: int = 0  # smooth weighted round robin

    def usable(self, now: float) -> bool:
        if self.state == "active":
            return True
        if self.state in ("cooling", "exhausted") and now >= self.until:
            return True  # let the next request through: it proves whether the key is back
        return False


def passthrough_key(provider: str, secret: str) -> UpstreamKey:
    """A client's own upstream key: used as is, outside any pool."""
    return UpstreamKey(provider, secret, fingerprint(secret))


class KeyPool:
    def __init__(self, provider: str, config: ProviderConfig,
                 limit_of: Callable[[UpstreamKey], int | None] = lambda key: None, share: int = 1,
                 shared: Shared | None = None) -> None:
        self.provider = provider
        self.config = config
        self.limit_of = limit_of  # the upstream's own limit for a key (Fengyuan: by VIP level)
        # How many processes share each key's limits, each keeping its part (workers with no
        # shared state): a key's limit is never exceeded by their sum.
        self.share = share
        # With shared state, every key's calls are counted in Redis, across every replica, and its
        # state changes are published there (a replica reads them every second).
        self.shared = shared
        self.keys = [self._key(k, config) for k in config.all_keys()]
        self._rr = 0
        self._changed = asyncio.Event()
        self.waiting = 0  # requests waiting in `acquire` for a key with room
        # Calls of a key's window that requests leave to the polls of its tasks (the task waiter
        # says how many): a burst of submits never leaves its own tasks no room to be polled.
        self.poll_reserve: Callable[[UpstreamKey, float], int] = lambda key, window: 0

    def _key(self, table: UpstreamKeyConfig, config: ProviderConfig) -> UpstreamKey:
        return UpstreamKey(self.provider, table.value, fingerprint(table.value), weight=table.weight,
                           rpm=table.rpm if table.rpm is not None else config.rpm,
                           max_concurrent=table.max_concurrent if table.max_concurrent is not None
                           else config.max_concurrent)

    def adopt(self, old: KeyPool) -> None:
        """After a reload: keys that stay are the same objects (calls in flight and task polls
        still hold them) with the new settings; a disabled one gets another chance."""
        known = {k.fingerprint: k for k in old.keys}
        for i, fresh in enumerate(self.keys):
            key = known.get(fresh.fingerprint)
            if key is None:
                continue
            key.weight, key.rpm, key.max_concurrent = fresh.weight, fresh.rpm, fresh.max_concurrent
            if key.state == "disabled":
                self.set_state(key, "active")
            self.keys[i] = key

    def find(self, fp: str) -> UpstreamKey | None:
        return next((k for k in self.keys if k.fingerprint == fp), None)

    # ---- limits ---------------------------------------------------------------------

    def limit(self, key: UpstreamKey) -> int | None:
        """Calls per rate window this process may make with the key: its part of the key's limit."""
        return part(key.rpm if key.rpm is not None else self.limit_of(key), self.share)

    def concurrency(self, key: UpstreamKey) -> int | None:
        return part(key.max_concurrent, self.share)

    def _window(self) -> float:
        return self.config.rate_window + WINDOW_MARGIN

    def _rate_wait(self, key: UpstreamKey, now: float, reserve: int = 0) -> float:
        """Seconds until the key may make one more call (0 when it may now), leaving `reserve`
        calls of its window unused."""
        limit = self.limit(key)
        calls = key.calls
        horizon = now - self._window()
        calls.drop_until(horizon)
        if limit is None or calls.count + key.unanswered < limit - reserve:
            return 0.0
        limit -= reserve
        if key.unanswered >= limit:
            return ANSWER_WAIT  # calls under way fill the window: the next answer to land frees room
        return calls.wait_below(limit - key.unanswered, horizon)

    def _wait(self, key: UpstreamKey, now: float, reserve: int = 0) -> float:
        """Seconds until the key may be called: its rate window, and a cooling period if any."""
        wait = self._rate_wait(key, now, reserve)
        if key.state == "cooling" and key.until > now:
            wait = max(wait, key.until - now)
        return wait

    def _reserve(self, key: UpstreamKey) -> int:
        limit = self.limit(key)
        if limit is None:
            return 0
        return min(limit // 2, self.poll_reserve(key, self.config.rate_window))

    def recent_calls(self, key: UpstreamKey) -> list[float]:
        """The key's calls in its window, as [unix time, count, ...]: what a restart keeps counting."""
        self._rate_wait(key, time.monotonic())
        offset = time.time() - time.monotonic()
        return [value for end, count in key.calls.entries() for value in (end + offset, float(count))]

    def restore_calls(self, key: UpstreamKey, calls: list[float], unsaved_for: float | None = None) -> None:
        """A previous process's calls with `key` (from `recent_calls`), still in the window. A
        checkpoint (time, -1) says it may have died up to `unsaved_for` later with calls it
        never saved: the upstream counted them, so they are taken as the rest of the limit
        (None: checkpoints are not read as a crash)."""
        now = time.monotonic()
        offset, horizon = now - time.time(), now - self._window()
        checkpoint = None
        for i in range(0, len(calls) - 1, 2):
            at, count = calls[i] + offset, int(calls[i + 1])
            if count < 0:
                checkpoint = at
            elif horizon < at <= now:
                key.calls.add_old(at, count)
        limit = self.limit(key)
        if checkpoint is not None and unsaved_for is not None and limit is not None and key.calls.count < limit:
            died_by = min(checkpoint + unsaved_for, now)
            if died_by > horizon:
                key.calls.add_old(died_by, limit - key.calls.count)

    def calls_in_window(self, key: UpstreamKey) -> int:
        self._rate_wait(key, time.monotonic())  # drops calls that left the window
        return key.calls.count + key.unanswered

    def wait(self, key: UpstreamKey) -> float:
        """Seconds until `key` may make one more call (0: now)."""
        return self._wait(key, time.monotonic())

    def requests_may_call(self, key: UpstreamKey) -> bool:
        """Whether a request (not a poll) may call with `key` now: room beyond the poll reserve."""
        return self._wait(key, time.monotonic(), self._reserve(key)) <= 0

    def counted_shared(self, key: UpstreamKey) -> bool:
        """Whether the key's calls are counted in Redis now (it has limits, and Redis answers)."""
        return self.shared is not None and self.shared.active and (
            self.limit(key) is not None or self.concurrency(key) is not None)

    def take_now(self, key: UpstreamKey) -> bool:
        """Count one call of `key` if it may make it now; False (nothing counted) if it must wait,
        or ask Redis (`take`). Its answer must be reported with `landed`."""
        if self.counted_shared(key) or self._wait(key, time.monotonic()) > 0:
            return False
        key.unanswered += 1
        return True

    async def take(self, key: UpstreamKey, reserve: int = 0, requests: bool = False,
                   admission: Admission | None = None) -> float:
        """Count one call of `key` if it may make it now (0), else the seconds to wait; across
        every replica when shared. `requests`: a request's call (max_concurrent counts it).
        `admission`: the request's client rpm if not counted yet, counted with it (429 if full)."""
        wait = self._wait(key, time.monotonic(), reserve)
        if wait > 0:
            return wait
        if self.counted_shared(key):
            try:
                wait = await self._take_shared(key, reserve, requests, admission)
            except SharedDown:
                return await self.take(key, reserve, requests, admission)  # counted here, split across the replicas
            if wait > 0:
                return wait
        elif admission is not None:
            await admission.count()  # Redis just went away: counted here
        key.unanswered += 1
        return 0.0

    async def _take_shared(self, key: UpstreamKey, reserve: int, requests: bool,
                           admission: Admission | None) -> float:
        """`take` in Redis: the client's window first, so a client over its rpm hears so at once."""
        assert self.shared is not None
        window = Window(self._name(key), self.limit(key), self._window(), reserve, self._hold(),
                        self.concurrency(key) if requests else None)
        member: str | None = None
        if admission is not None and not admission.settled():
            async with admission.lock:  # the request's other calls wait for its count
                if not admission.settled():
                    member, full, wait = await self.shared.take(admission.window, window)
                    if member is None and full == 0:
                        admission.refusal = admission.refused(wait)
                        raise admission.refusal
                    admission.counted = member is not None  # else with the next key tried, or at the end
                    if member is None:
                        return wait
        if member is None:
            member, _, wait = await self.shared.take(window)
            if member is None:
                return wait
        (key.shared_requests if requests else key.shared_calls).append(member)
        return 0.0

    def landed(self, key: UpstreamKey, at: float | None = None, request: bool = False) -> None:
        """The answer to a counted call arrived (or it failed) at `at` (time.monotonic());
        `request`: a call from `acquire`."""
        key.unanswered -= 1
        key.calls.add(time.monotonic() if at is None else at)
        members = key.shared_requests if request else key.shared_calls
        if members and self.shared is not None:
            self.shared.landed(self._name(key), members.popleft(), at)
        self._changed.set()

    def _name(self, key: UpstreamKey) -> str:
        return f"{self.provider}:{key.fingerprint}"

    def _hold(self) -> float:
        """How long a call counted in Redis may stay unanswered: then its process is gone."""
        return self.config.connect_timeout + self.config.read_timeout + 5.0

    async def slot(self, key: UpstreamKey, deadline: float | None = None) -> None:
        """Wait until `key` may make one more call (polls, balance reads), then count it; its
        answer must be reported with `landed`."""
        while True:
            now = time.monotonic()
            wait = await self.take(key)
            if wait <= 0:
                return
            if deadline is not None and now + wait > deadline:
                raise ProxyError(Kind.RATE_LIMITED, f"the {self.provider} key is at its rate limit",
                                 retry_after=wait)
            await asyncio.sleep(wait)

    # ---- choosing -------------------------------------------------------------------

    def _candidates(self, exclude: set[str], cost_of: CostOf | None,
                    now: float) -> tuple[list[UpstreamKey], float, bool]:
        """Keys that can take a call now; the soonest one of the others can (inf: never); and
        whether a key was passed over because its credits cannot pay."""
        ready: list[UpstreamKey] = []
        soonest = float("inf")
        short = False
        for key in self.keys:
            if key.fingerprint in exclude or key.state == "disabled":
                continue
            if key.state == "exhausted" and now < key.until:
                continue
            if cost_of is not None and key.credits is not None:
                cost = cost_of(key)
                if cost is not None and key.credits < cost:
                    short = True
                    continue  # cannot pay: skip it before a request is wasted on it
            wait = self._wait(key, now, self._reserve(key))
            most = self.concurrency(key)
            busy = most is not None and key.in_flight >= most
            if wait <= 0 and not busy:
                ready.append(key)
            else:
                soonest = min(soonest, wait if wait > 0 else 0.05)  # busy: woken by a release
        return ready, soonest, short

    def _pick(self, ready: list[UpstreamKey]) -> UpstreamKey:
        strategy = self.config.strategy
        if strategy == "least_busy":
            return min(ready, key=lambda k: (k.in_flight / k.weight, -k.weight, self._order(k)))
        if strategy == "most_credits" and any(k.credits is not None for k in ready):
            return max(ready, key=lambda k: (k.credits if k.credits is not None else float("-inf"), -self._order(k)))
        # smooth weighted round robin (nginx): even spread, weights respected
        total = sum(k.weight for k in ready)
        for key in ready:
            key.current += key.weight
        chosen = max(ready, key=lambda k: k.current)
        chosen.current -= total
        self._rr += 1
        return chosen

    def _order(self, key: UpstreamKey) -> int:
        return (self.keys.index(key) - self._rr) % len(self.keys)

    async def acquire(self, exclude: set[str], cost_of: CostOf | None = None, last: ProxyError | None = None,
                      admission: Admission | None = None) -> UpstreamKey:
        """A key that may take one more call now, waiting up to queue_timeout for one.
        `admission`: the request's client rpm, counted with the key's window (429 if full)."""
        deadline = time.monotonic() + self.config.queue_timeout
        while True:
            now = time.monotonic()
            ready, soonest, short = self._candidates(exclude, cost_of, now)
            while ready:
                key = self._pick(ready)
                if self.counted_shared(key):  # room here; Redis says whether there is room everywhere
                    wait = await self.take(key, self._reserve(key), requests=True, admission=admission)
                    if wait > 0:
                        ready.remove(key)
                        soonest = min(soonest, wait)
                        continue
                elif admission is not None and not admission.settled():
                    await admission.count()  # the key keeps no window in Redis to count it with
                    ready, soonest, short = self._candidates(exclude, cost_of, time.monotonic())  # read anew
                    continue
                else:
                    key.unanswered += 1
                key.requests += 1
                key.in_flight += 1
                return key
            if soonest == float("inf"):
                raise self.nobody_left(last, short)
            if now + soonest > deadline:
                raise ProxyError(Kind.RATE_LIMITED,
                                 f"every {self.provider} key is at its rate or concurrency limit; retry later",
                                 retry_after=max(1.0, soonest))
            self._changed.clear()
            self.waiting += 1  # polls that can be late by an interval leave the next room to this
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(soonest, deadline - now))
            except TimeoutError:
                pass
            finally:
                self.waiting -= 1

    def release(self, key: UpstreamKey) -> None:
        """A call from `acquire` is over: its answer landed now."""
        key.in_flight -= 1
        self.landed(key, request=True)

    # ---- outcomes -------------------------------------------------------------------

    def succeeded(self, key: UpstreamKey) -> None:
        if key.state not in ("active", "disabled"):
            self.set_state(key, "active")

    def failed(self, key: UpstreamKey, error: ProxyError) -> None:
        key.failures += 1
        now = time.monotonic()
        if error.kind is Kind.AUTH:
            self.set_state(key, "disabled", error.message)
        elif error.kind is Kind.BALANCE:
            self.set_state(key, "exhausted", error.message, now + self.config.recheck_after)
        elif error.kind is Kind.RATE_LIMITED:
            pause = error.retry_after if error.retry_after is not None else DEFAULT_COOLDOWN
            self.set_state(key, "cooling", error.message, now + pause)

    def balance_read(self, key: UpstreamKey, info: KeyInfo | None, cheapest: float) -> bool:
        """The upstream told the key's credits: True when that brings an exhausted key back."""
        key.checked_at = time.time()
        if info is None:  # an answer without user data: nothing learnt this time
            return False
        key.credits, key.vip_level = info.credits, info.vip_level
        if key.state == "exhausted" and (info.credits or 0) >= cheapest:
            self.set_state(key, "active")
            return True
        return False

    def balance_unread(self, key: UpstreamKey, error: ProxyError) -> None:
        key.checked_at = time.time()
        self.failed(key, error)

    def spent(self, key: UpstreamKey, cost: float, balance: float | None = None) -> None:
        """A paid call: the key's known credits go down (or are what the upstream says)."""
        if balance is not None:
            key.credits = balance
        elif key.credits is not None:
            key.credits -= cost

    def set_state(self, key: UpstreamKey, state: KeyState, reason: str | None = None, until: float = 0.0,
                  publish: bool = True) -> None:
        """A key's state (until: time.monotonic() it ends; 0: none), told to every replica when
        shared (`publish`: not when it came from one)."""
        changed = (state, reason, until) != (key.state, key.reason, key.until)
        key.state, key.until, key.reason = state, until, reason
        self._changed.set()
        if changed and publish and self.shared is not None:
            wall = time.time() + (until - time.monotonic()) if until else 0.0
            self.shared.soon(self.shared.set_state(self._name(key), state, wall, reason))

    def apply_shared(self, states: dict[str, StateChange], me: str) -> None:
        """Key states other replicas published (every second): each key takes the latest."""
        for key in self.keys:
            change = states.get(self._name(key))
            if change is None or change[3] == me:
                continue
            state, wall, reason, _ = change
            until = time.monotonic() + (wall - time.time()) if wall else 0.0
            if (state, reason) != (key.state, key.reason) or abs(until - key.until) > 0.5:
                self.set_state(key, state, reason or None, until, publish=False)  # type: ignore[arg-type]  # a KeyState

    def nobody_left(self, last: ProxyError | None, short: bool = False) -> ProxyError:
        """The error to answer when no key can take the call: the most hopeful state wins."""
        now = time.monotonic()
        cooling = [k.until - now for k in self.keys if k.state == "cooling" and k.until > now]
        if cooling or (last is not None and last.kind is Kind.RATE_LIMITED):
            wait = max(1.0, min(cooling)) if cooling else DEFAULT_COOLDOWN
            return ProxyError(Kind.RATE_LIMITED, f"every {self.provider} key is rate limited; retry later",
                              retry_after=wait)
        if short or any(k.state == "exhausted" for k in self.keys) or (last is not None and last.kind is Kind.BALANCE):
            return ProxyError(Kind.BALANCE, f"every {self.provider} key is short of balance or credits")
        if last is not None and last.kind is Kind.UPSTREAM_UNAVAILABLE:
            return last
        return ProxyError(Kind.NO_UPSTREAM_KEY, f"no usable {self.provider} key: every key is disabled")

    async def run(self, call: Callable[[str], Awaitable[T]], cost_of: CostOf | None = None,
                  admission: Admission | None = None) -> tuple[T, UpstreamKey]:
        """Run `call(secret)` on one key after another until one answers or none is left.

        Moves on only when the failure proves the upstream did not take the call: a paid
        request is never sent twice, and never twice to the same key.
        """
        tried: set[str] = set()
        last: ProxyError | None = None
        while True:
            key = await self.acquire(tried, cost_of, last, admission)
            tried.add(key.fingerprint)
            pending: Awaitable[T] | None = None
            try:
                pending = call(key.secret)
                result = await pending
            except ProxyError as error:
                self.failed(key, error)
                # the upstream's own words (scrubbed and cut by the log setup), once per failed call
                log.warning("upstream_call_failed", upstream=self.provider, key=key.fingerprint,
                            operation=getattr(pending, "__name__", "call"),  # the provider method: "chat"
                            kind=error.kind.value, error=error.message)
                if not error.retryable_elsewhere:
                    raise
                last = error
                continue
            finally:
                self.release(key)
            self.succeeded(key)
            return result, key
