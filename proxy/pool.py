"""Upstream keys per provider: choose one, respect its limits, set bad ones aside, bring them back.

States: active; cooling (rate limited, until Retry-After); exhausted (balance short: Fengyuan
keys are re-read, others get one request through after `recheck_after`); disabled (the
upstream refused the key; back on reload or by an admin). Every upstream call made with a
key, polls included, counts against the key's own rate limit, so the proxy never causes an
upstream 429 by itself: when every key is at its limit a request waits up to
`queue_timeout`, then gets 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import structlog

from proxy.config import ProviderConfig, UpstreamKeyConfig
from proxy.errors import Kind, ProxyError

T = TypeVar("T")
log = structlog.get_logger("proxy.pool")
KeyState = Literal["active", "cooling", "exhausted", "disabled"]
CostOf = Callable[["UpstreamKey"], float | None]

DEFAULT_COOLDOWN = 10.0  # seconds a rate-limited key rests when the upstream names no Retry-After
# Our count of a key's calls must stay below the upstream's even though the upstream sees each
# call a little later than we send it: count over a slightly longer window.
WINDOW_MARGIN = 0.5
CALL_BUCKET = 0.01  # seconds: calls this close together are counted as one entry of the window


class CallWindow:
    """A key's recent calls as (end, count) buckets, oldest first.

    At 5,000 polls a second, a 60-second window is 6,000 buckets rather than 300,000
    timestamps (about 10 MB; bench/README.md). A call counts as made at its bucket's end, at
    most CALL_BUCKET after it really was: it leaves the window late, never early.
    """

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
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    credits: float | None = None
    vip_level: int | None = None
    checked_at: float | None = None  # unix time of the last balance read
    calls: CallWindow = field(default_factory=CallWindow)  # monotonic send times inside the window
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
                 limit_of: Callable[[UpstreamKey], int | None] = lambda key: None) -> None:
        self.provider = provider
        self.config = config
        self.limit_of = limit_of  # the upstream's own limit for a key (Fengyuan: by VIP level)
        self.keys = [self._key(k, config) for k in config.all_keys()]
        self._rr = 0
        self._changed = asyncio.Event()

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
                key.state, key.until, key.reason = "active", 0.0, None
            self.keys[i] = key

    def find(self, fp: str) -> UpstreamKey | None:
        return next((k for k in self.keys if k.fingerprint == fp), None)

    # ---- limits ---------------------------------------------------------------------

    def limit(self, key: UpstreamKey) -> int | None:
        return key.rpm if key.rpm is not None else self.limit_of(key)

    def _window(self) -> float:
        return self.config.rate_window + WINDOW_MARGIN

    def _rate_wait(self, key: UpstreamKey, now: float) -> float:
        """Seconds until the key may make one more call (0 when it may now)."""
        limit = self.limit(key)
        calls = key.calls
        horizon = now - self._window()
        calls.drop_until(horizon)
        if limit is None or calls.count < limit:
            return 0.0
        return calls.wait_below(limit, horizon)

    def _wait(self, key: UpstreamKey, now: float) -> float:
        """Seconds until the key may be called: its rate window, and a cooling period if any."""
        wait = self._rate_wait(key, now)
        if key.state == "cooling" and key.until > now:
            wait = max(wait, key.until - now)
        return wait

    def calls_in_window(self, key: UpstreamKey) -> int:
        self._rate_wait(key, time.monotonic())  # drops calls that left the window
        return key.calls.count

    def note_call(self, key: UpstreamKey) -> None:
        key.calls.add(time.monotonic())

    def take_now(self, key: UpstreamKey) -> bool:
        """Count one call of `key` if it may make it now; False (nothing counted) if it must wait."""
        if self._wait(key, time.monotonic()) > 0:
            return False
        self.note_call(key)
        return True

    async def slot(self, key: UpstreamKey, deadline: float | None = None) -> None:
        """Wait until `key` may make one more call (polls, balance reads), then count it."""
        while True:
            now = time.monotonic()
            wait = self._wait(key, now)
            if wait <= 0:
                self.note_call(key)
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
            wait = self._wait(key, now)
            busy = key.max_concurrent is not None and key.in_flight >= key.max_concurrent
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

    async def acquire(self, exclude: set[str], cost_of: CostOf | None = None,
                      last: ProxyError | None = None) -> UpstreamKey:
        """A key that may take one more call now, waiting up to queue_timeout for one."""
        deadline = time.monotonic() + self.config.queue_timeout
        while True:
            now = time.monotonic()
            ready, soonest, short = self._candidates(exclude, cost_of, now)
            if ready:
                key = self._pick(ready)
                self.note_call(key)
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
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(soonest, deadline - now))
            except TimeoutError:
                pass

    def release(self, key: UpstreamKey) -> None:
        key.in_flight -= 1
        self._changed.set()

    # ---- outcomes -------------------------------------------------------------------

    def succeeded(self, key: UpstreamKey) -> None:
        if key.state != "disabled":
            key.state, key.until, key.reason = "active", 0.0, None

    def failed(self, key: UpstreamKey, error: ProxyError) -> None:
        key.failures += 1
        now = time.monotonic()
        if error.kind is Kind.AUTH:
            key.state, key.until, key.reason = "disabled", 0.0, error.message
        elif error.kind is Kind.BALANCE:
            key.state, key.until, key.reason = "exhausted", now + self.config.recheck_after, error.message
        elif error.kind is Kind.RATE_LIMITED:
            pause = error.retry_after if error.retry_after is not None else DEFAULT_COOLDOWN
            key.state, key.until, key.reason = "cooling", now + pause, error.message

    def set_state(self, key: UpstreamKey, state: KeyState, reason: str | None = None) -> None:
        key.state, key.until, key.reason = state, 0.0, reason
        self._changed.set()

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

    async def run(self, call: Callable[[str], Awaitable[T]], cost_of: CostOf | None = None) -> tuple[T, UpstreamKey]:
        """Run `call(secret)` on one key after another until one answers or none is left.

        Moves on only when the failure proves the upstream did not take the call: a paid
        request is never sent twice, and never twice to the same key.
        """
        tried: set[str] = set()
        last: ProxyError | None = None
        while True:
            key = await self.acquire(tried, cost_of, last)
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
