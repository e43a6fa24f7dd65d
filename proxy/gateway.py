"""The relay: route a normalised call to an upstream through its key pool, wait out tasks,
record what it cost.

Handlers call this and never a provider; nothing here knows an upstream's dialect or
OpenAI's shapes.
"""

from __future__ import annotations

import asyncio
import calendar
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from proxy.config import ClientConfig, Config
from proxy.downloads import Downloaded, Downloads
from proxy.errors import Kind, ProxyError
from proxy.pool import KeyPool, UpstreamKey
from proxy.providers import build_provider
from proxy.providers.base import ChatAnswer, ChatCall, ImageCall, ModelInfo, Observe, Provider, TaskState
from proxy.router import Catalogue, Route
from proxy.store import Store, TaskRecord, UsageRecord
from proxy.tasks import Task, TaskWaiter, new_task_id
from proxy.upstream_http import UpstreamClient

T = TypeVar("T")
log = structlog.get_logger("proxy.gateway")

HOUSEKEEPING_EVERY = 10.0  # seconds: heartbeat of owned tasks, adoption of orphaned ones, purge
ORPHANED_AFTER = 60.0  # seconds without a heartbeat before another process adopts a task


@dataclass(slots=True)
class Caller:
    """Who a call is for: a configured client, or someone who brought their own upstream key."""

    name: str
    client: ClientConfig | None
    request_id: str | None = None
    idempotency_key: str | None = None
    own_key: UpstreamKey | None = None
    on_task: Callable[[str], Awaitable[None]] | None = None  # told each task id as soon as it is recorded
    submits: list[asyncio.Task[Task]] | None = None  # where to list submits in flight for this request


@dataclass(slots=True)
class ChatResult:
    answer: ChatAnswer
    key: UpstreamKey


def owner_name() -> str:
    """host:pid:random: who polls a task, in the store; host and pid tell a crashed one."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _dead_here(owner: str) -> bool:
    """An owner on this host whose process is gone: its tasks need not wait for the timeout."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def period_start(period: str, now: float) -> float:
    if period == "total":
        return 0.0
    t = time.gmtime(now)
    day = 1 if period == "monthly" else t.tm_mday
    return float(calendar.timegm((t.tm_year, t.tm_mon, day, 0, 0, 0)))


class Gateway:
    def __init__(self, config: Config, http: UpstreamClient, store: Store, owner: str,
                 observe: Observe | None = None, *, downloads: Downloads) -> None:
        self.http = http
        self.downloads = downloads
        self.observe = observe
        self.store = store
        self.owner = owner
        self.tasks = TaskWaiter(config.tasks, store, owner, self._task_final)
        self._loops: list[asyncio.Task[None]] = []
        self._submits: set[asyncio.Task[Task]] = set()
        self.configure(config)

    def configure(self, config: Config) -> None:
        """(Re)build providers, pools and catalogue; keys that stay keep their state (not disabled)."""
        old_pools = getattr(self, "pools", {})
        self.config = config
        self.providers: dict[str, Provider] = {
            name: build_provider(name, table, self.http, self.observe) for name, table in config.providers.items()}
        self.pools: dict[str, KeyPool] = {}
        for name, table in config.providers.items():
            provider = self.providers[name]
            pool = KeyPool(name, table, lambda key, p=provider: p.key_limit(key.vip_level))  # type: ignore[misc]
            if name in old_pools:
                pool.adopt(old_pools[name])
            self.pools[name] = pool
        self.catalogue = Catalogue(self.providers, {name: self._fetcher(name) for name in self.providers},
                                   config.aliases, {n: t.catalogue_ttl for n, t in config.providers.items()})
        self.tasks.config = config.tasks

    def _fetcher(self, name: str) -> Callable[[], Awaitable[list[ModelInfo]]]:
        async def fetch() -> list[ModelInfo]:
            models, _ = await self.pools[name].run(self.providers[name].list_models)
            return models

        return fetch

    # ---- money ----------------------------------------------------------------------

    @staticmethod
    def price(model: ModelInfo | None, key: UpstreamKey | None) -> float:
        """What one call costs with this key: the catalogue price, discounted on VIP keys."""
        if model is None or model.price is None:
            return 0.0
        if key is not None and model.vip_discount and (key.vip_level or 0) >= 1:
            return model.price * model.vip_discount
        return model.price

    async def check_budget(self, caller: Caller, route: Route, calls: int) -> None:
        client = caller.client
        if client is None or client.budget is None:
            return
        spent = await self.store.spent(client.name, period_start(client.budget_period, time.time()))
        expected = self._cheapest_price(route, caller) * calls
        if spent + expected > client.budget or (expected == 0 and spent >= client.budget):
            period = {"daily": "daily ", "monthly": "monthly ", "total": ""}[client.budget_period]
            raise ProxyError(Kind.BALANCE, f"The {period}budget of {client.budget:g} for client '{client.name}' "
                             f"is spent ({spent:g} used; this request would cost {expected:g}).",
                             code="insufficient_quota")

    def _cheapest_price(self, route: Route, caller: Caller) -> float:
        """The lowest price a usable key would pay: the key is chosen only when the call is made."""
        if caller.own_key is not None:
            return self.price(route.model, caller.own_key)
        keys = [k for k in self.pools[route.provider.name].keys if k.state != "disabled"]
        return min((self.price(route.model, k) for k in keys), default=self.price(route.model, None))

    def _record(self, caller: Caller, route: Route, key: UpstreamKey, cost: float, outcome: str, kind: str,
                task_id: str | None = None) -> None:
        self.store.add_usage(UsageRecord(
            at=time.time(), client=caller.name, model=route.public_id, upstream=route.provider.name,
            key=key.fingerprint, cost=cost, outcome=outcome, kind=kind, task_id=task_id,
            request_id=caller.request_id))

    # ---- calls ----------------------------------------------------------------------

    async def _run(self, route: Route, caller: Caller, call: Callable[[str], Awaitable[T]]) -> tuple[T, UpstreamKey]:
        provider = route.provider
        try:
            if caller.own_key is not None:
                try:
                    return await call(caller.own_key.secret), caller.own_key
                except ProxyError as error:
                    if error.kind is Kind.AUTH:
                        raise ProxyError(Kind.INVALID_API_KEY, f"{provider.name} refused the key you sent.") from None
                    raise
            return await self.pools[provider.name].run(call, lambda key: self.price(route.model, key))
        except ProxyError as error:
            if error.kind is Kind.MODEL_NOT_FOUND:
                error.param = "model"
                self.catalogue.forget(provider.name)  # the list we routed by is out of date
            raise

    async def chat(self, route: Route, call: ChatCall, caller: Caller) -> ChatResult:
        provider = route.provider
        answer, key = await self._run(route, caller, lambda secret: provider.chat(secret, call))
        cost = self.price(route.model, key)
        self._spend(key, cost)
        self._record(caller, route, key, cost, "ok", "chat")
        return ChatResult(answer, key)

    async def start_image(self, route: Route, call: ImageCall, caller: Caller) -> Task:
        """Submit one generation; the returned task is being waited on in the background.

        Submit and record run apart from the request (shielded): a request cancelled mid-POST
        (client gone, shutdown) still leaves the paid task recorded and waited on."""
        submit = asyncio.create_task(self._submit(route, call, caller))
        self._submits.add(submit)
        submit.add_done_callback(self._submits.discard)
        if caller.submits is not None:  # in flight only: a done one is of no use to anyone there
            caller.submits.append(submit)
            submit.add_done_callback(caller.submits.remove)
        return await asyncio.shield(submit)

    async def _submit(self, route: Route, call: ImageCall, caller: Caller) -> Task:
        provider = route.provider
        try:
            state, key = await self._run(route, caller, lambda secret: provider.submit_image(secret, call))
        except ProxyError as error:
            if error.kind is Kind.TASK_FAILED:  # finished and failed at submit: a task all the same
                await self._record_failed_at_submit(route, caller, error)
            raise
        cost = state.cost if state.cost is not None else self.price(route.model, key)
        self._spend(key, cost, state.balance)
        now = time.time()
        record = TaskRecord(
            id=new_task_id(), client=caller.name, request_id=caller.request_id,
            idempotency_key=caller.idempotency_key, upstream=provider.name, key=key.fingerprint,
            upstream_task_id=state.task_id, model=route.public_id, state="pending", created=now,
            deadline=now + self.config.tasks.timeout)
        self._record(caller, route, key, cost, "submitted", "image", record.id)
        pool = None if caller.own_key is not None else self.pools[provider.name]
        task = await self.tasks.start(Task(record=record, provider=provider, key=key, pool=pool, state=state))
        if caller.on_task is not None:
            await caller.on_task(task.id)
        return task

    async def _record_failed_at_submit(self, route: Route, caller: Caller, error: ProxyError) -> None:
        now = time.time()
        record = TaskRecord(
            id=new_task_id(), client=caller.name, request_id=caller.request_id,
            idempotency_key=caller.idempotency_key, upstream=route.provider.name, key="", upstream_task_id=None,
            model=route.public_id, state="failed", reason=error.message, created=now, deadline=now)
        await self.store.save_task(record)
        error.message = f"The upstream task {record.id} failed: {error.message}"
        error.task_ids = (record.id,)
        if caller.on_task is not None:
            await caller.on_task(record.id)

    def _spend(self, key: UpstreamKey, cost: float, balance: float | None = None) -> None:
        if balance is not None:
            key.credits = balance
        elif key.credits is not None:
            key.credits -= cost

    def _task_final(self, task: Task) -> None:
        outcome = {"succeeded": "ok", "failed": "failed", "timeout": "timeout"}.get(task.record.state, "failed")
        self.store.settle_usage(task.id, outcome, task.state.cost)

    # ---- background work ------------------------------------------------------------

    async def start(self) -> None:
        """Resume unfinished tasks left by a previous process; start the background loops."""
        await self._adopt(stale_before=time.time() - ORPHANED_AFTER)
        self._loops = [asyncio.create_task(self._housekeeping(), name="housekeeping"),
                       asyncio.create_task(self._balances(), name="balances")]

    async def _adopt(self, stale_before: float) -> None:
        dead = [o for o in await self.store.unfinished_owners() if o != self.owner and _dead_here(o)]
        for record in await self.store.claim_unfinished(self.owner, stale_before, dead):
            await self._resume(record)

    async def _resume(self, record: TaskRecord) -> None:
        provider = self.providers.get(record.upstream)
        pool = self.pools.get(record.upstream)
        key = pool.find(record.key) if pool else None
        if provider is None or pool is None or key is None:
            record.state, record.reason = "failed", "the upstream key that started it is no longer configured"
            await self.store.save_task(record)
            return
        log.info("task_resumed", task_id=record.id, upstream=record.upstream)
        state = TaskState(status="running", task_id=record.upstream_task_id)
        await self.tasks.start(Task(record=record, provider=provider, key=key, pool=pool, state=state))

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_EVERY)
            try:
                await self.store.heartbeat(self.owner)
                await self._adopt(stale_before=time.time() - ORPHANED_AFTER)
                now = time.time()
                await self.store.purge(now - self.config.tasks.keep_results * 3600,
                                       now - self.config.storage.idempotency_hours * 3600)
            except Exception as exc:
                log.error("housekeeping_failed", error=repr(exc))

    async def _balances(self) -> None:
        """Read each key's credits and VIP level at start and every balance_interval; bring
        exhausted keys back as soon as their credits can pay again."""
        while True:
            for name, pool in list(self.pools.items()):
                if not self.providers[name].has_balance:
                    continue
                for key in list(pool.keys):
                    if self._balance_due(pool, key):
                        await self._read_balance(name, pool, key)
            await asyncio.sleep(self._balance_tick())

    def _balance_tick(self) -> float:
        periods = [min(t.balance_interval, t.recheck_after) for t in self.config.providers.values()] or [30.0]
        return min(30.0, max(0.1, min(periods) / 4))

    def _balance_due(self, pool: KeyPool, key: UpstreamKey) -> bool:
        if key.state == "disabled":
            return False
        if key.checked_at is None:
            return True
        age = time.time() - key.checked_at
        if key.state == "exhausted":
            return age >= pool.config.recheck_after
        return age >= pool.config.balance_interval

    async def _read_balance(self, name: str, pool: KeyPool, key: UpstreamKey) -> None:
        try:
            await pool.slot(key, time.monotonic() + 5.0)
        except ProxyError:
            return  # the key is busy up to its limit: read it next round, it refused nothing
        try:
            info = await self.providers[name].balance(key.secret)
        except ProxyError as error:
            key.checked_at = time.time()
            pool.failed(key, error)
            log.warning("balance_read_failed", upstream=name, key=key.fingerprint, error=error.message)
            return
        key.checked_at = time.time()
        if info is None:  # an answer without user data: nothing learnt this time
            return
        key.credits, key.vip_level = info.credits, info.vip_level
        if key.state == "exhausted" and (info.credits or 0) >= await self._cheapest(name):
            pool.set_state(key, "active")
            log.info("key_recovered", upstream=name, key=key.fingerprint, credits=info.credits)

    async def _cheapest(self, name: str) -> float:
        models = [m for m in await self.catalogue.models_of(name) if m.price]
        return min((m.price or 0.0 for m in models), default=0.0) or 1e-9

    # ---- administration -------------------------------------------------------------

    def find_key(self, fp: str) -> tuple[KeyPool, UpstreamKey] | None:
        for pool in self.pools.values():
            key = pool.find(fp)
            if key is not None:
                return pool, key
        return None

    def download(self, results: list[tuple[str, str]]) -> Awaitable[Downloaded]:
        """Results (URL, the upstream that produced it) downloaded whole: proxy/downloads.py."""
        return self.downloads.fetch(results, self.config)

    async def close(self) -> None:
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._submits:  # submits in flight end recorded, to be resumed by the next process
            longest = max(t.connect_timeout + t.read_timeout for t in self.config.providers.values())
            await asyncio.wait(list(self._submits), timeout=longest)
        await self.tasks.close()
        await self.store.release(self.owner)
