"""The relay: route a normalised call to an upstream through its key pool, wait out tasks,
record what it cost.

Handlers call this and never a provider; nothing here knows an upstream's dialect or
OpenAI's shapes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from proxy.billing import Billing, Reservation, price
from proxy.config import ClientConfig, Config
from proxy.downloads import Downloaded, Downloads
from proxy.errors import Kind, ProxyError
from proxy.pool import Admission, KeyPool, UpstreamKey
from proxy.providers import DIALECTS
from proxy.providers.base import ChatAnswer, ChatCall, ImageCall, ModelInfo
from proxy.providers.engine import Observe, Provider
from proxy.router import Catalogue, Route
from proxy.shared import Shared, StateChange
from proxy.store import Store, TaskRecord, UsageRecord
from proxy.tasks import Task, TaskWaiter, new_task_id
from proxy.upstream_http import UpstreamClient

T = TypeVar("T")
log = structlog.get_logger("proxy.gateway")



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
    reservation: Reservation | None = None  # what this request holds of the client's budget
    source: str | None = None  # the caller's address, for passthrough callers (refusals are counted)
    admission: Admission | None = None  # its client rpm, to be counted with its first upstream call
    on_key_verdict: Callable[[Caller, bool], None] | None = None  # told whether the upstream accepted an own key


@dataclass(slots=True)
class ChatResult:
    answer: ChatAnswer
    key: UpstreamKey


@dataclass(frozen=True, slots=True)
class StartedChat:
    """A call `Gateway.start_chats` started: its task, and whether it went upstream yet."""

    run: asyncio.Task[ChatResult]
    sent: list[bool]

    def drop(self) -> None:
        """Not wanted any more: cancelled if it has not gone upstream; else it ends recorded."""
        if not self.run.done() and not self.sent[0]:
            self.run.cancel()


class Gateway:
    def __init__(self, config: Config, http: UpstreamClient, store: Store, owner: str,
                 observe: Observe | None = None, share: int = 1, shared: Shared | None = None, *,
                 downloads: Downloads) -> None:
        self.http = http
        self.downloads = downloads
        self.share = share  # processes keeping a part each of every key's limits
        self.shared = shared  # state every replica shares (Redis), when configured
        self.observe = observe
        self.store = store
        self.billing = Billing(store, shared, share)
        self.owner = owner
        self.tasks = TaskWaiter(config.tasks, store, owner, self._task_final)
        self._submits: set[asyncio.Task[Task]] = set()
        self._chats: set[asyncio.Task[ChatResult]] = set()  # calls start_chats started, run to their end
        self.configure(config)

    def configure(self, config: Config) -> None:
        """(Re)build providers, pools and catalogue; keys that stay keep their state (not disabled)."""
        old_pools = getattr(self, "pools", {})
        self.config = config
        self.providers: dict[str, Provider] = {
            name: Provider(name, DIALECTS[table.type or name].dialect(name), table.base_url, self.http,
                           connect_timeout=table.connect_timeout, read_timeout=table.read_timeout, observe=self.observe)
            for name, table in config.providers.items()}
        self.pools: dict[str, KeyPool] = {}
        for name, table in config.providers.items():
            provider = self.providers[name]
            pool = KeyPool(name, table, lambda key, p=provider: p.key_limit(key.vip_level),  # type: ignore[misc]
                           share=self.share, shared=self.shared)
            if name in old_pools:
                pool.adopt(old_pools[name])
            pool.poll_reserve = functools.partial(self.tasks.poll_reserve, name)
            self.pools[name] = pool
        self.catalogue = Catalogue(self.providers, {name: self._fetcher(name) for name in self.providers},
                                   config.aliases, {n: t.catalogue_ttl for n, t in config.providers.items()})
        self.tasks.config = config.tasks
        self.billing.configure(config)

    def set_share(self, share: int) -> None:
        """How many processes now keep a part each of every key's limits."""
        self.share = share
        self.billing.share = share
        for pool in self.pools.values():
            pool.share = share

    def save_calls(self, final: bool = False) -> None:
        """Each key's calls in its window, to the store (queued): a restart keeps counting them.
        A save made while serving ends with a checkpoint, (now, -1): calls after it may be
        missing if the process dies, and the next one counts them as the whole limit."""
        checkpoint = [] if final else [time.time(), -1.0]
        for name, pool in self.pools.items():
            for key in pool.keys:
                if pool.limit(key) is not None:
                    self.store.save_calls(name, key.fingerprint, pool.recent_calls(key) + checkpoint)

    async def restore_calls(self, unsaved_for: float) -> None:
        """The last process's calls; `unsaved_for`: how long after a checkpoint it may have died.
        A checkpoint is a crash only where this process serves alone: with shared state the
        windows are in Redis, and among workers the checkpoint may be a live sibling's."""
        alone = self.shared is None and self.share == 1
        saved = await self.store.load_calls()
        for name, pool in self.pools.items():
            for key in pool.keys:
                pool.restore_calls(key, saved.get((name, key.fingerprint), []), unsaved_for if alone else None)

    def apply_shared(self, states: dict[str, StateChange]) -> None:
        for pool in self.pools.values():
            pool.apply_shared(states, self.owner)

    def _fetcher(self, name: str) -> Callable[[], Awaitable[list[ModelInfo]]]:
        async def fetch() -> list[ModelInfo]:
            models, _ = await self.pools[name].run(self.providers[name].list_models)
            return models

        return fetch

    # ---- money ----------------------------------------------------------------------

    async def reserve(self, caller: Caller, route: Route, calls: int) -> Reservation | None:
        """Hold the expected cost of `calls` upstream calls on the caller's budget (429 if it
        cannot pay); each call settles its share, the request releases the rest at its end."""
        if caller.own_key is not None:
            return None  # someone's own key: no budget of ours
        keys = self.billing.usable_keys(self.pools[route.provider.name])
        caller.reservation = await self.billing.reserve(caller.client, route.model, keys, calls)
        return caller.reservation

    def _record(self, caller: Caller, route: Route, key: UpstreamKey, cost: float, outcome: str, kind: str,
                task_id: str | None = None) -> None:
        self.billing.call_ended(caller.reservation, caller.name, cost)
        self.billing.record(UsageRecord(
            at=time.time(), client=caller.name, model=route.public_id, upstream=route.provider.name,
            key=key.fingerprint, cost=cost, outcome=outcome, kind=kind, task_id=task_id,
            request_id=caller.request_id))

    # ---- calls ----------------------------------------------------------------------

    async def _run(self, route: Route, caller: Caller, call: Callable[[str], Awaitable[T]]) -> tuple[T, UpstreamKey]:
        provider = route.provider
        try:
            if caller.own_key is not None:
                if caller.admission is not None:
                    await caller.admission.count()
                try:
                    answer = await call(caller.own_key.secret)
                except ProxyError as error:
                    if error.kind is Kind.AUTH:
                        if caller.on_key_verdict is not None:
                            caller.on_key_verdict(caller, False)
                        raise ProxyError(Kind.INVALID_API_KEY, f"{provider.name} refused the key you sent.") from None
                    raise
                if caller.on_key_verdict is not None:
                    caller.on_key_verdict(caller, True)
                return answer, caller.own_key
            return await self.pools[provider.name].run(call, lambda key: price(route.model, key), caller.admission)
        except ProxyError as error:
            if error.kind is Kind.MODEL_NOT_FOUND:
                error.param = "model"
                self.catalogue.forget(provider.name)  # the list we routed by is out of date
            elif error.kind is Kind.UPSTREAM_UNAVAILABLE and error.delivered:
                error.paid = True  # a timeout, a 5xx or garbage after the call arrived: it may be charged
            raise

    async def chat(self, route: Route, call: ChatCall, caller: Caller, sent: list[bool] | None = None) -> ChatResult:
        """One upstream chat call; `sent` (if given) becomes [True] as the call goes upstream."""
        provider = route.provider

        def send(secret: str) -> Awaitable[ChatAnswer]:
            if sent is not None:
                sent[0] = True
            return provider.chat(secret, call)

        self.billing.call_started(caller.reservation)
        try:
            answer, key = await self._run(route, caller, send)
        except BaseException:
            self.billing.call_ended(caller.reservation, caller.name, None)
            raise
        cost = price(route.model, key)
        if caller.own_key is None:
            self.pools[provider.name].spent(key, cost)
        self._record(caller, route, key, cost, "ok", "chat")
        return ChatResult(answer, key)

    def start_chats(self, route: Route, calls: Sequence[ChatCall], caller: Caller) -> list[StartedChat]:
        """A request's calls, started at once. One its request no longer wants (a stream's client
        hung up, another call failed) is `drop`ped: cancelled while it waits for a key, run to its
        end and recorded once it went upstream, which charges a call it got. The shutdown waits
        for them like for submits; the request's budget hold lasts until they end."""
        started = []
        for call in calls:
            sent: list[bool] = [False]
            run = asyncio.create_task(self.chat(route, call, caller, sent))
            self._chats.add(run)
            run.add_done_callback(self._chat_done)
            started.append(StartedChat(run, sent))
        return started

    def _chat_done(self, run: asyncio.Task[ChatResult]) -> None:
        self._chats.discard(run)
        if not run.cancelled():
            run.exception()  # read: its stream may have no one left to read it

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
        self.billing.call_started(caller.reservation)
        try:
            state, key = await self._run(route, caller, lambda secret: provider.submit_image(secret, call))
        except BaseException as error:
            self.billing.call_ended(caller.reservation, caller.name, None)
            if isinstance(error, ProxyError) and error.kind is Kind.TASK_FAILED:  # failed at submit: a task still
                await self._record_failed_at_submit(route, caller, error)
            raise
        cost = state.cost if state.cost is not None else price(route.model, key)
        if caller.own_key is None:
            self.pools[provider.name].spent(key, cost, state.balance)
        now = time.time()
        record = TaskRecord(
            id=new_task_id(), client=caller.name, request_id=caller.request_id,
            idempotency_key=caller.idempotency_key, upstream=provider.name, key=key.fingerprint,
            upstream_task_id=state.task_id, model=route.public_id, state="pending", created=now,
            deadline=now + self.config.tasks.timeout)
        self._record(caller, route, key, cost, "submitted", "image", record.id)
        pool = None if caller.own_key is not None else self.pools[provider.name]
        task = await self.tasks.start(Task(record=record, provider=provider, key=key, pool=pool, state=state,
                                           cost=cost, model=(provider.name, call.model)))
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

    def _task_final(self, task: Task) -> None:
        outcome = {"succeeded": "ok", "failed": "failed", "timeout": "timeout"}.get(task.record.state, "failed")
        self.store.settle_usage(task.id, outcome, task.state.cost)
        if task.state.cost is not None:  # the upstream's final word on what it charged
            self.billing.adjust(task.record.client, task.state.cost - task.cost, task.record.created)

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
        """Submits and started chat calls in flight end recorded, then every unfinished task is let
        go (the next process resumes it)."""
        if self._submits or self._chats:
            longest = max(t.connect_timeout + t.read_timeout for t in self.config.providers.values())
            await asyncio.wait([*self._submits, *self._chats], timeout=longest)
        await self.tasks.close()
        self.save_calls(final=True)
