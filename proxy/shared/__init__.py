"""State every worker and replica of one proxy shares, in Redis (`[shared] redis_url`).

What lives here: every upstream key's call window and calls in flight, every client's rpm
window, key states, budget holds, Idempotency-Key marks, who is alive (owner leases, replica
heartbeats), uploaded images and Responses conversations. Each check-and-change is one Lua
script (proxy/shared/scripts.py), atomic across all of them.

Without Redis configured nothing here runs and each process keeps its own state. With Redis
configured but unreachable, `active` is False: the callers serve from their local state with
every limit split across the replicas last seen, and sharing resumes when Redis answers again
(checked every BEAT). Nothing here ever raises into a request: a failed call marks Redis down
and answers as if it were not configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

import structlog

from proxy.live import BUCKET, SPAN, LiveCounts, buckets
from proxy.loop import running_loop
from proxy.shared import scripts
from proxy.shared.ahead import SlotsAhead
from proxy.shared.window import Window

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("proxy.shared")
T = TypeVar("T")

BEAT = 1.0  # seconds between health checks, replica heartbeats and key-state refreshes
SEEN_FOR = 5 * BEAT  # a replica not heard from for this long is gone
HOLD_LIFE = 10 * BEAT  # a budget hold lapses this long after its process last renewed it
TIMEOUT = 0.5  # seconds any Redis call may take before Redis counts as down
# Seconds a landed call may wait to be told to Redis, unless the next take carries it sooner:
# meanwhile it counts from its hold's end, later than it should, so never too few.
LANDING_DELAY = 0.05
MOST_LANDINGS = 256  # told in one call at the most
NEVER_MADE = -1.0  # a landing's time that says the call was never made: it leaves its window

StateChange = tuple[str, float, str, str]  # (state, until as unix time (0: no end), reason, who wrote it)


class SharedDown(Exception):
    """Redis is configured but did not answer: serve from local state."""


class Shared:
    def __init__(self, url: str, prefix: str, owner: str) -> None:
        self.prefix = prefix.rstrip(":") + ":"
        self.owner = owner  # this process, as the store knows it
        import redis.asyncio as redis  # loaded only by a proxy configured with Redis (6 MB)
        from redis.exceptions import RedisError

        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError)  # what marks Redis down
        self.client: Redis = redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
                                                  retry_on_timeout=False, health_check_interval=0)
        self.active = False  # Redis answered the last time it was asked
        self.replicas = 1  # processes heard from within SEEN_FOR (this one included), last known
        self.on_states: Callable[[dict[str, StateChange]], None] | None = None  # key states, every BEAT
        self.on_reload: Callable[[], None] | None = None  # another replica re-read its config
        self.on_change: Callable[[bool], None] | None = None  # Redis came back (True) or went away
        self.live: LiveCounts | None = None  # this process's answers, added to every replica's each BEAT
        self._reloads = -1
        self._loop: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._holds: dict[tuple[str, float], set[str]] = {}  # (client, period) -> this process's holds
        self._landings: list[tuple[str, str, float]] = []  # (window, member, time.monotonic() it landed)
        self._landings_due: asyncio.TimerHandle | None = None
        self._ahead = SlotsAhead()
        self._scripts = {name: self.client.register_script(getattr(scripts, name)) for name in
                         ("TAKE", "RESERVE", "SETTLE", "RELEASE", "RENEW", "HELD", "OWNED", "KEEP", "FORGET")}

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # ---- health --------------------------------------------------------------------

    async def start(self) -> None:
        await self._beat()
        self._loop = asyncio.create_task(self._beats(), name="shared-state")

    async def close(self) -> None:
        self._ahead.closing = True
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        if self._background:  # writes under way (a call's answer, a state, a slot) reach Redis first
            await asyncio.wait(list(self._background), timeout=2 * TIMEOUT)
        self._give_back(self._ahead.stale(every=True))
        await _quietly(self._tell_landings())
        await self._send_live()  # the last second's answers count too
        self.active = False  # what comes late (a landing, an unmark) is dropped, not sent on a closed client
        with contextlib.suppress(*self._failures):
            await self.client.zrem(self.key("replicas"), self.owner)
        await self.client.aclose()

    async def _beats(self) -> None:
        while True:
            await asyncio.sleep(BEAT)
            await self._beat()
            self._give_back(self._ahead.stale())
            await self._send_live()
            with contextlib.suppress(SharedDown):
                await self._renew_holds()

    async def _beat(self) -> None:
        """Heartbeat, replica count, key states and reloads, in one round trip."""
        now = time.time()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(self.key("replicas"), {self.owner: now})
                pipe.zremrangebyscore(self.key("replicas"), "-inf", now - SEEN_FOR)
                pipe.zcard(self.key("replicas"))
                pipe.hgetall(self.key("states"))
                pipe.get(self.key("reloads"))
                _, _, replicas, states, reloads = await pipe.execute()
        except self._failures as exc:
            self._down(exc)
            return
        self.replicas = max(1, int(replicas))
        if not self.active:
            self.active = True
            log.info("shared_state_up", replicas=self.replicas)
            if self.on_change is not None:
                self.on_change(True)
        if self.on_states is not None:
            self.on_states({k.decode(): _state(v) for k, v in states.items()})
        count = int(reloads or 0)
        if self._reloads >= 0 and count != self._reloads and self.on_reload is not None:
            self.on_reload()
        self._reloads = count

    # ---- live counts (the console's Live page) ------------------------------------------

    async def _send_live(self) -> None:
        if self.live is None or not self.active:
            return
        counts = self.live.take_unsent()
        if not counts:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket, (requests, errors, refused) in counts.items():
                    key = self.key("live", str(bucket))
                    pipe.hincrby(key, "requests", requests)
                    pipe.hincrby(key, "errors", errors)
                    pipe.hincrby(key, "refused", refused)
                    pipe.expire(key, SPAN + 2 * BUCKET)
                await pipe.execute()
        except self._failures as exc:
            self.live.give_back(counts)  # an outage's counts reach Redis once it is back
            self._down(exc)

    async def live_totals(self) -> dict[int, list[int]]:
        """Every replica's counts of the last 15 minutes that reached Redis, by bucket."""
        spans = buckets()

        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket in spans:
                    pipe.hmget(self.key("live", str(bucket)), "requests", "errors", "refused")
                return await pipe.execute()  # type: ignore[no-any-return]

        rows = await self._run(read())
        return {bucket: [int(v or 0) for v in row] for bucket, row in zip(spans, rows, strict=True) if any(row)}

    def _down(self, exc: BaseException) -> None:
        if self.active or self._reloads == -1:
            log.warning("shared_state_down", error=repr(exc), serving="each process's own state, limits split "
                        f"across {self.replicas} replicas")
            self._reloads = max(self._reloads, 0)
        self._ahead.clear()
        if self.active:
            self.active = False
            if self.on_change is not None:
                self.on_change(False)

    async def _run(self, call: Awaitable[T]) -> T:
        if not self.active:
            if asyncio.iscoroutine(call):
                call.close()
            raise SharedDown
        try:
            return await call
        except self._failures as exc:
            self._down(exc)
            raise SharedDown from None

    def soon(self, work: Coroutine[Any, Any, Any]) -> asyncio.Future[None]:
        """A write nobody waits for, done in the background; failing only marks Redis down."""
        runner = asyncio.ensure_future(_quietly(work))
        self._background.add(runner)
        runner.add_done_callback(self._background.discard)
        return runner

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        return self._scripts[name](keys=keys, args=args)

    # ---- call windows and calls in flight (upstream keys, client rpm) -----------------

    async def take(self, *windows: Window) -> tuple[str | None, int, float]:
        """Count one call in every window if each has room: (its member, -1, 0). Else nothing is
        counted: (None, the index of a window without room, seconds to wait). A slot taken
        ahead is used when one is ready; else one round trip, which carries the landings not
        yet told. Either way the next slot is taken ahead, where the windows allow."""
        if not self.active:
            raise SharedDown
        ready = self._ahead.pop(windows)
        if ready is not None:
            slot, fresh = ready
            if fresh:
                for w in windows:
                    if not w.hold:
                        self.landed(w.name, slot)  # it counts from now, not from when it was taken
                self._take_next(windows)
                return slot, -1, 0.0
            self._give_back([(tuple(w.name for w in windows), slot)])
        member, which, wait = await self._take(windows)
        if member is not None:
            self._take_next(windows)
        return member, which, wait

    async def _take(self, windows: tuple[Window, ...]) -> tuple[str | None, int, float]:
        member = secrets.token_hex(8)
        keys: list[str] = []
        args: list[Any] = [len(windows), 0]
        for w in windows:
            keys += [self.key("calls", w.name), self.key("busy", w.name)]
            args += [w.seconds, -1 if w.limit is None else w.limit, w.reserve, member, w.hold,
                     -1 if w.most is None else w.most]
        args[1] = self._carry_landings(keys, args)
        taken, which, wait = await self._run(self._script("TAKE", keys, args))
        return (member, -1, 0.0) if int(taken) else (None, int(which) - 1, float(wait))

    def _take_next(self, windows: tuple[Window, ...]) -> None:
        """Take the next call's slot in the background, where the windows are wide enough."""
        ahead = self._ahead.ahead(windows, self.replicas)
        if ahead is None:
            return
        epoch = self._ahead.fetching(windows)

        async def fetch() -> None:
            member = None
            try:
                member, _, _ = await self._take(ahead)
            finally:
                if not self._ahead.fetched(windows, member, epoch) and member is not None:
                    self._give_back([(tuple(w.name for w in windows), member)])

        self.soon(fetch())

    def _give_back(self, slots: list[tuple[tuple[str, ...], str]]) -> None:
        """Slots taken ahead that no call used: out of their windows."""
        for names, member in slots:
            for name in names:
                self.landed(name, member, NEVER_MADE)

    def landed(self, name: str, member: str, at: float | None = None) -> None:
        """The answer to a call counted in `name` landed at `at` (time.monotonic(); NEVER_MADE: it
        leaves the window): told with the next take, or within LANDING_DELAY."""
        if not self.active:
            return  # Redis lets it lapse at its hold's end
        self._landings.append((name, member, time.monotonic() if at is None else at))
        if self._landings_due is None:
            self._landings_due = running_loop().call_later(
                LANDING_DELAY, lambda: self.soon(self._tell_landings()))

    def _carry_landings(self, keys: list[str], args: list[Any]) -> int:
        """Add the landings not yet told (up to MOST_LANDINGS) to a TAKE's keys and args."""
        carried, self._landings = self._landings[:MOST_LANDINGS], self._landings[MOST_LANDINGS:]
        if not self._landings and self._landings_due is not None:
            self._landings_due.cancel()
            self._landings_due = None
        now = time.monotonic()
        for name, member, at in carried:
            keys += [self.key("calls", name), self.key("busy", name)]
            args += [member, -1 if at == NEVER_MADE else max(0.0, now - at)]
        return len(carried)

    async def _tell_landings(self) -> None:
        if self._landings_due is not None:
            self._landings_due.cancel()
            self._landings_due = None
        try:
            while self._landings:
                await self._take(())  # a TAKE in no window: only the landings it carries
        except SharedDown:
            self._landings.clear()  # Redis lets them lapse at their hold's end
            raise

    # ---- key states --------------------------------------------------------------------

    async def set_state(self, key: str, state: str, until: float, reason: str | None) -> None:
        """A key's state for every replica (`until`: unix time it ends; 0: no end)."""
        value = f"{state}\t{until}\t{self.owner}\t{reason or ''}"
        await self._run(self.client.hset(self.key("states"), key, value))

    async def reloaded(self) -> None:
        await self._run(self.client.incr(self.key("reloads")))

    # ---- budget holds --------------------------------------------------------------------

    def _budget_keys(self, client: str, period: float) -> list[str]:
        base = self.key("budget", client, f"{period:.0f}")
        return [base, base + ":holds", base + ":amounts"]

    async def reserve(self, client: str, period: float, *, known_spent: float, budget: float, expected: float,
                      hold: str, period_ends: float) -> tuple[bool, float, float]:
        """Hold `expected` of the client's budget, if it has room. The hold lives while this
        process renews it (every beat) and lapses HOLD_LIFE after it stops: a dead process's
        holds free the budget within seconds."""
        ok, spent, held = await self._run(self._script(
            "RESERVE", self._budget_keys(client, period),
            # the period's keys outlive it by a day (a budget for all time: a year, then read anew from the store)
            [known_spent, budget, expected, hold, HOLD_LIFE,
             min(max(HOLD_LIFE, period_ends - time.time()), 366 * 86_400) + 86_400]))
        if int(ok):
            self._holds.setdefault((client, period), set()).add(hold)
        return bool(int(ok)), float(spent), float(held)

    async def settle(self, client: str, period: float, hold: str, share: float, cost: float) -> None:
        await self._run(self._script("SETTLE", self._budget_keys(client, period), [hold, share, cost]))

    async def release(self, client: str, period: float, hold: str) -> None:
        holds = self._holds.get((client, period))
        if holds is not None:
            holds.discard(hold)
            if not holds:
                del self._holds[(client, period)]
        await self._run(self._script("RELEASE", self._budget_keys(client, period), [hold]))

    async def held(self, client: str, period: float) -> float:
        """What every replica's requests under way hold of the client's budget for the period."""
        return float(await self._run(self._script("HELD", self._budget_keys(client, period), [])))

    async def _renew_holds(self) -> None:
        """Every hold this process has under way, renewed in one round trip."""
        if not self._holds:
            return
        renew = self._scripts["RENEW"]
        async with self.client.pipeline(transaction=False) as pipe:
            for (client, period), holds in list(self._holds.items()):
                await renew(keys=self._budget_keys(client, period)[1:2], args=[HOLD_LIFE, *holds], client=pipe)
            await self._run(pipe.execute())

    async def adjust(self, client: str, period: float, cost: float) -> None:
        """A recorded cost changed after the fact (a task's final cost): the spend follows."""
        await self._run(self._script("SETTLE", self._budget_keys(client, period), ["", 0, cost]))

    # ---- marks and leases ----------------------------------------------------------------

    async def mark(self, name: str, lives: float) -> bool:
        """Claim `name` for this process for `lives` seconds; False if another holds it."""
        return bool(await self._run(self.client.set(self.key("mark", name), self.owner, nx=True,
                                                    px=int(lives * 1000))))

    async def renew(self, name: str, lives: float) -> bool:
        return bool(await self._run(self._script("OWNED", [self.key("mark", name)], [self.owner, int(lives * 1000)])))

    async def unmark(self, name: str) -> None:
        await self._run(self._script("OWNED", [self.key("mark", name)], [self.owner, 0]))

    async def holder(self, name: str) -> str | None:
        found = cast(bytes | None, await self._run(self.client.get(self.key("mark", name))))
        return found.decode() if found is not None else None

    async def alive(self, owners: list[str]) -> set[str]:
        """Those of `owners` whose process renewed its lease (marked "owner:<name>")."""
        if not owners:
            return set()
        async with self.client.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(self.key("mark", "owner", owner))
            found = await self._run(pipe.execute())
        return {owner for owner, exists in zip(owners, found, strict=True) if exists}

    async def lease(self, lives: float) -> None:
        """This process's own lease: its tasks are adopted by another once it lapses."""
        await self._run(self.client.set(self.key("mark", "owner", self.owner), self.owner, px=int(lives * 1000)))

    # ---- blobs: uploads, conversations -------------------------------------------------------

    def _blob_keys(self, kind: str) -> tuple[list[str], str]:
        base = self.key(kind)
        return [base + ":expiries", base + ":meta", base + ":bytes"], base + ":"

    async def keep(self, kind: str, name: str, data: bytes, *, owner: str, share: int, total: int, lives: float,
                   evict: bool) -> tuple[bool, str, float]:
        """Keep a blob within its owner's share; (False, 'owner'|'total', seconds until room) if refused."""
        keys, prefix = self._blob_keys(kind)
        answer = await self._run(self._script("KEEP", [*keys, prefix + name],
                                              [data, name, owner, share, total, lives, int(evict), prefix]))
        if int(answer[0]):
            return True, "", 0.0
        return False, answer[1].decode(), float(answer[2])

    async def blob(self, kind: str, name: str) -> bytes | None:
        _, prefix = self._blob_keys(kind)
        return cast(bytes | None, await self._run(self.client.get(prefix + name)))

    async def forget(self, kind: str, names: list[str]) -> None:
        if names:
            keys, prefix = self._blob_keys(kind)
            await self._run(self._script("FORGET", keys, [prefix, *names]))


async def _quietly(work: Coroutine[Any, Any, Any]) -> None:
    with contextlib.suppress(SharedDown):
        await work


def _state(value: bytes) -> StateChange:
    state, until, who, reason = value.decode().split("\t", 3)
    return state, float(until), reason, who
