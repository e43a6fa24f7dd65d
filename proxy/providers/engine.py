"""The shared engine every dialect runs on: it sends what a dialect asks for over the one
HTTP transport (proxy/upstream_http.py), pipelines polls, times calls for the metrics, and
hands each answer to the dialect's pure `check` and `parse_*`.

A `Provider` is a dialect on a base URL with its timeouts: the gateway, the pool and the
task waiter drive providers and never a dialect's HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlencode

import cachetools
import httpx
import msgspec

from proxy.errors import Kind, ProxyError
from proxy.providers.base import (
    Answer,
    ChatAnswer,
    ChatCall,
    Dialect,
    ImageCall,
    KeyInfo,
    ModelInfo,
    TaskList,
    TaskState,
    UpstreamCall,
    parse_retry_after,
)
from proxy.redact import redact
from proxy.upstream_http import NotAnswered as NotAnswered  # what read_poll may raise, besides ProxyError
from proxy.upstream_http import Origin, Reply, UpstreamClient, head_of, never_sent, origin_of, timed_out

Observe = Callable[[str, str, float], None]  # (upstream, operation, seconds): latency metrics

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
# What every upstream call carries besides its key: some API front ends refuse a bare client.
_HEADERS = ((b"user-agent", b"xf-openai-proxy"), (b"accept", b"application/json"))


ECHOABLE_KEPT = 4096  # tasks remembered whose submit held pieces of secrets (see Provider._scrubbed)
PREPARED_MAX = 4096  # request heads kept per upstream: a few per key (polls keep theirs on the task)


class Sent(NamedTuple):
    """A GET under way (`HTTPUpstream.start_get`); `HTTPUpstream.answer` reads it once done."""
    reply: asyncio.Future[Reply]
    operation: str
    started: float

    def arrived(self) -> float | None:
        """time.monotonic() when its answer had arrived whole (None if none did), once done."""
        reply = self.reply
        return None if reply.cancelled() or reply.exception() else reply.result().at


class Prepared(NamedTuple):
    origin: Origin
    head: bytes  # request line and headers, no content-length, no blank line
    operation: str  # the metrics label


class HTTPUpstream:
    """One upstream's base URL over the shared transport: sending a call with timeouts,
    pipelined GETs, mapping transport failures to ProxyError."""

    def __init__(self, name: str, base_url: str, http: UpstreamClient, *,
                 connect_timeout: float, read_timeout: float, observe: Observe | None = None) -> None:
        self.name = name
        self.observe = observe
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.http = http
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout).as_dict()
        # A call's request head is written once and kept: a task's poll is the same request every
        # few seconds (bench/README.md, "Per call"). A plain dict, oldest out first when full: an
        # entry evicted while in use is only written again.
        self._prepared: dict[tuple[Any, ...], Prepared] = {}

    def prepare(self, method: str, path: str, headers: dict[str, str] | None, params: dict[str, str] | None,
                has_body: bool) -> Prepared:
        key = (method, path, has_body, *(params.items() if params else ()), None, *(headers or {}).items())
        prepared = self._prepared.get(key)
        if prepared is None:
            if len(self._prepared) >= PREPARED_MAX:
                del self._prepared[next(iter(self._prepared))]
            prepared = self._prepared[key] = self.build(method, path, headers, params, has_body)
        return prepared

    def build(self, method: str, path: str, headers: dict[str, str] | None, params: dict[str, str] | None,
              has_body: bool) -> Prepared:
        """A request's head, not kept here (`prepare` keeps it)."""
        text = self.base_url + path.lstrip("/")
        url = httpx.URL(text + "?" + urlencode(params) if params else text)
        raw = [(b"host", url.netloc), *_HEADERS]
        if headers:
            raw += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        if has_body:
            raw.append((b"content-type", b"application/json"))
        # ids in paths would make one metric label per task: "api/service/task/{id}"
        operation = "/".join("{id}" if any(c.isdigit() for c in part) else part for part in path.split("/"))
        return Prepared(origin_of(url), head_of(method, url, raw), operation)

    async def send(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                   json: Any = None, params: dict[str, str] | None = None) -> Answer:
        prepared = self.prepare(method, path, headers, params, json is not None)
        content = b"" if json is None else _encode(json)
        if json is not None or method in ("POST", "PUT", "PATCH"):
            head = prepared.head + b"content-length: %d\r\n\r\n" % len(content)
        else:
            head = prepared.head + b"\r\n"
        started = time.perf_counter()
        try:
            # the transport times out connect, pool and read
            reply = await self.http.transport.fetch(prepared.origin, method, head, content, self.timeout)
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            raise self._failed(prepared.operation, started, exc) from None
        return self._response(prepared.operation, started, reply)

    def start_get(self, path: str, *, headers: dict[str, str] | None = None,
                  params: dict[str, str] | None = None) -> Sent | None:
        """A GET queued with no wait, written with the other GETs of this turn of the event
        loop (pipelined); None where the transport cannot take it so (then `send`)."""
        return self.start(self.prepare("GET", path, headers, params, False))

    def start(self, get: Prepared) -> Sent | None:
        """`start_get` for a GET prepared before."""
        reply = self.http.transport.queue_get(get.origin, get.head + b"\r\n", self.timeout)
        return None if reply is None else Sent(reply, get.operation, time.perf_counter())

    def answer(self, sent: Sent) -> Answer:
        """The answer to a started GET whose future is done, as `send` would give it; raises
        ProxyError, or NotAnswered (the upstream never began it: `send` it again)."""
        try:
            reply = sent.reply.result()
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            raise self._failed(sent.operation, sent.started, exc) from None
        return self._response(sent.operation, sent.started, reply)

    def _failed(self, operation: str, started: float, exc: BaseException) -> ProxyError:
        self._observe(operation, started)
        # The message names no URL or header: upstream addresses stay private.
        what = "timed out" if timed_out(exc) else "failed"
        return ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name} upstream request {what}",
                          delivered=not never_sent(exc))

    def _response(self, operation: str, started: float, reply: Reply) -> Answer:
        self._observe(operation, started)
        try:
            body = _decode(reply.content) if reply.content else None
        except msgspec.DecodeError:
            body = None
        retry_after = reply.header(b"retry-after")
        return Answer(reply.status, body, parse_retry_after(retry_after.decode("latin-1") if retry_after else None))

    def _observe(self, operation: str, started: float) -> None:
        if self.observe is not None:
            self.observe(self.name, operation, time.perf_counter() - started)


def _sent(request: UpstreamCall | None, key: str | None) -> str:
    """The client's values in a request (its JSON and query), never its key."""
    if request is None:
        return ""
    text = (_encode(request.json).decode() if request.json is not None else "") + \
        "\n".join((request.params or {}).values())
    return text.replace(key, "") if key else text


class Provider:
    """A dialect on a base URL: the calls the gateway, the pool and the task waiter make."""

    def __init__(self, name: str, dialect: Dialect, base_url: str, http: UpstreamClient, *,
                 connect_timeout: float, read_timeout: float, observe: Observe | None = None) -> None:
        self.name = name
        self.dialect = dialect
        self.upstream = HTTPUpstream(name, base_url, http, connect_timeout=connect_timeout,
                                     read_timeout=read_timeout, observe=observe)
        # upstream task id -> the pieces of secrets its submit held, for the few tasks whose did
        self._echoable: cachetools.LRUCache[str, str] = cachetools.LRUCache(ECHOABLE_KEPT)

    @property
    def has_balance(self) -> bool:
        return self.dialect.has_balance

    async def call(self, request: UpstreamCall, key: str | None) -> Any:
        """Send one request with the key's headers; the payload the dialect's check lets through."""
        answer = await self.upstream.send(request.method, request.path, json=request.json, params=request.params,
                                          headers=self.dialect.auth(key) if key else None)
        return self._check(answer, request, key)

    # Where upstream text comes in: an upstream may quote a key, whole or cut short, in an error
    # or a task's reason; it is scrubbed here, before it is logged, kept or answered. What it
    # quotes of the request it was sent (a client's value) is kept: scrubbed, it would answer
    # whether a guess holds a piece of a secret (proxy/redact.py).
    def _check(self, answer: Answer, request: UpstreamCall | None = None, key: str | None = None) -> Any:
        try:
            return self.dialect.check(answer)
        except ProxyError as error:
            sent = _sent(request, key)
            error.message = redact(error.message, sent)
            error.param = redact(error.param, sent) if error.param else error.param  # a dialect may pass the upstream's
            error.code = redact(error.code, sent) if error.code else error.code
            raise

    def _scrubbed(self, state: TaskState, sent: str | None = None) -> TaskState:
        """A task's reason scrubbed, but of what its submit held (`sent`, else kept by its id)."""
        if state.reason:
            state.reason = redact(state.reason, self._echoable.get(state.task_id or "", "") if sent is None else sent)
        return state

    async def list_models(self, key: str) -> list[ModelInfo]:
        dialect = self.dialect
        return dialect.parse_models(await self.call(dialect.models_request(), key if dialect.models_need_key
                                                    else None))

    async def chat(self, key: str, call: ChatCall) -> ChatAnswer:
        return self.dialect.parse_chat(await self.call(self.dialect.chat_request(call), key))

    async def submit_image(self, key: str, call: ImageCall) -> TaskState:
        request = self.dialect.submit_request(call)
        state = self.dialect.parse_submit(await self.call(request, key))
        sent = redact.pieces_in(_sent(request, key))
        if sent and state.task_id:  # a reason polled later may quote the prompt back
            self._echoable[state.task_id] = sent
        return self._scrubbed(state, sent)

    async def poll(self, key: str, task_id: str) -> TaskState:
        return self._scrubbed(self.dialect.parse_poll(task_id, await self.call(self.dialect.poll_request(task_id),
                                                                             key)))

    # The same poll in three parts, so that thousands of them need no coroutine each: written
    # once for the task's life (None where it is no GET: use `poll`), queued with no wait (None
    # where it cannot be: use `poll`), then read once `sent.reply` is done (raises ProxyError,
    # or NotAnswered: the upstream never began it, use `poll`).
    def prepare_poll(self, key: str, task_id: str) -> Prepared | None:
        request = self.dialect.poll_request(task_id)
        if request.method != "GET":
            return None
        return self.upstream.build("GET", request.path, self.dialect.auth(key), request.params, False)

    def send_poll(self, poll: Prepared) -> Sent | None:
        return self.upstream.start(poll)

    def read_poll(self, task_id: str, sent: Sent) -> TaskState:
        return self._scrubbed(self.dialect.parse_poll(task_id, self._check(self.upstream.answer(sent))))

    @property
    def lists_tasks(self) -> bool:
        return self.dialect.list_request(1) is not None

    def send_list(self, key: str, page: int) -> Sent | None:
        """A page of the key's tasks, queued like a poll; None where it cannot be (use `list_tasks`)."""
        request = self.dialect.list_request(page)
        if request is None:
            return None
        return self.upstream.start_get(request.path, headers=self.dialect.auth(key), params=request.params)

    def read_list(self, sent: Sent) -> TaskList | None:
        return self._scrubbed_list(self.dialect.parse_list(self._check(self.upstream.answer(sent))))

    async def list_tasks(self, key: str, page: int) -> TaskList | None:
        request = self.dialect.list_request(page)
        return None if request is None else self._scrubbed_list(self.dialect.parse_list(await self.call(request, key)))

    def _scrubbed_list(self, page: TaskList | None) -> TaskList | None:
        if page is not None:
            for state in page.tasks:
                self._scrubbed(state)
        return page

    async def balance(self, key: str) -> KeyInfo | None:
        request = self.dialect.balance_request()
        if request is None:
            return None
        return self.dialect.parse_balance(await self.call(request, key))

    def key_limit(self, vip_level: int | None) -> int | None:
        return self.dialect.key_limit(vip_level)
