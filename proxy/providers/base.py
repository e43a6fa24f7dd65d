"""The narrow interface every upstream implements, and the normalised values it trades in.

A provider knows one upstream's URLs, bodies and error dialect. It never sees the HTTP
edge, the pool or OpenAI's shapes: it gets a key and a normalised call, and answers a
normalised result or raises `ProxyError` with an upstream kind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol
from urllib.parse import urlencode

import httpx
import msgspec

from proxy.errors import Kind, ProxyError
from proxy.upstream_http import NotAnswered as NotAnswered  # what read_poll may raise, besides ProxyError
from proxy.upstream_http import Origin, Reply, UpstreamClient, head_of, never_sent, origin_of, timed_out

ModelKind = Literal["chat", "image", "video", "audio", "other"]
Observe = Callable[[str, str, float], None]  # (upstream, operation, seconds): latency metrics
TaskStatus = Literal["pending", "running", "succeeded", "failed"]


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # the upstream's own id (slug, service_code)
    kind: ModelKind
    price: float | None = None  # what one call costs, in the upstream's units
    name: str | None = None
    vip_discount: float | None = None


class ChatCall(msgspec.Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]  # sampling and other fields, passed through as given


class ChatAnswer(msgspec.Struct, kw_only=True):
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ImageCall(msgspec.Struct, kw_only=True):
    model: str
    prompt: str
    kind: ModelKind = "image"
    size: str | None = None  # OpenAI's "WxH", translated where the upstream has one
    references: list[str] = []  # reference image URLs
    extra: dict[str, Any] = {}  # upstream-specific parameters from the client or an alias


class TaskState(msgspec.Struct, kw_only=True):
    status: TaskStatus
    task_id: str | None = None  # the upstream's id; None when the answer came at once
    urls: list[str] = []
    media_type: str | None = None
    progress: float | None = None
    reason: str | None = None
    cost: float | None = None  # what the upstream says it charged
    balance: float | None = None  # the key's balance after the call, when the upstream says

    @property
    def final(self) -> bool:
        return self.status in ("succeeded", "failed")


class KeyInfo(msgspec.Struct, kw_only=True):
    credits: float | None = None
    vip_level: int | None = None


class Provider(Protocol):
    name: str  # the config table's name: also the model prefix and owned_by
    has_balance: bool  # whether balance() asks the upstream

    async def list_models(self, key: str) -> list[ModelInfo]: ...

    async def chat(self, key: str, call: ChatCall) -> ChatAnswer: ...

    async def submit_image(self, key: str, call: ImageCall) -> TaskState: ...

    async def poll(self, key: str, task_id: str) -> TaskState: ...

    # The same poll in two halves, so that thousands of them need no coroutine each: queued
    # with no wait (None where it cannot be: use `poll`), then read once `sent.reply` is done
    # (raises ProxyError, or NotAnswered: the upstream never began it, use `poll`).
    def send_poll(self, key: str, task_id: str) -> Sent | None: ...

    def read_poll(self, task_id: str, sent: Sent) -> TaskState: ...

    async def balance(self, key: str) -> KeyInfo | None: ...

    def key_limit(self, vip_level: int | None) -> int | None:
        """Calls per rate window the upstream allows one key; None: no known limit."""
        ...


class Response(msgspec.Struct):
    status: int
    body: Any  # decoded JSON, or None when the body was not JSON
    retry_after: float | None


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
# What every upstream call carries besides its key: some API front ends refuse a bare client.
_HEADERS = ((b"user-agent", b"xf-openai-proxy"), (b"accept", b"application/json"))


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare upstream, treat as unknown


PREPARED_MAX = 32768  # request heads kept per upstream: one per waiting task and a few


class Sent(NamedTuple):
    """A GET under way (`HTTPUpstream.start_get`); `HTTPUpstream.answer` reads it once done."""
    reply: asyncio.Future[Reply]
    operation: str
    started: float

    def arrived(self) -> float | None:
        """time.monotonic() when its answer had arrived whole (None if none did), once done."""
        reply = self.reply
        return None if reply.cancelled() or reply.exception() else reply.result().at


class _Prepared(NamedTuple):
    origin: Origin
    head: bytes  # request line and headers, no content-length, no blank line
    operation: str  # the metrics label


class HTTPUpstream:
    """What both providers share: sending one call with timeouts, mapping transport failures."""

    def __init__(self, name: str, base_url: str, http: UpstreamClient, *,
                 connect_timeout: float, read_timeout: float, observe: Observe | None = None) -> None:
        self.name = name
        self.observe = observe
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.http = http
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout).as_dict()
        # A call's request head is written once and kept: a task's poll is the same request
        # every few seconds while it runs, and writing it (URL, headers) cost more than the rest
        # of the call (bench/README.md, profile of 10,000 waiting tasks). A plain dict, oldest
        # entry out first when full: a lookup costs a twentieth of cachetools' LRU, and an
        # entry evicted while in use is only written again.
        self._prepared: dict[tuple[Any, ...], _Prepared] = {}

    def prepare(self, method: str, path: str, headers: dict[str, str] | None, params: dict[str, str] | None,
                has_body: bool) -> _Prepared:
        key = (method, path, has_body, *(params.items() if params else ()), None, *(headers or {}).items())
        prepared = self._prepared.get(key)
        if prepared is None:
            text = self.base_url + path.lstrip("/")
            url = httpx.URL(text + "?" + urlencode(params) if params else text)
            raw = [(b"host", url.netloc), *_HEADERS]
            if headers:
                raw += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
            if has_body:
                raw.append((b"content-type", b"application/json"))
            # ids in paths would make one metric label per task: "api/service/task/{id}"
            operation = "/".join("{id}" if any(c.isdigit() for c in part) else part for part in path.split("/"))
            if len(self._prepared) >= PREPARED_MAX:
                del self._prepared[next(iter(self._prepared))]
            prepared = self._prepared[key] = _Prepared(origin_of(url), head_of(method, url, raw), operation)
        return prepared

    async def send(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                   json: Any = None, params: dict[str, str] | None = None) -> Response:
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
        prepared = self.prepare("GET", path, headers, params, False)
        reply = self.http.transport.queue_get(prepared.origin, prepared.head + b"\r\n", self.timeout)
        return None if reply is None else Sent(reply, prepared.operation, time.perf_counter())

    def answer(self, sent: Sent) -> Response:
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

    def _response(self, operation: str, started: float, reply: Reply) -> Response:
        self._observe(operation, started)
        try:
            body = _decode(reply.content) if reply.content else None
        except msgspec.DecodeError:
            body = None
        retry_after = reply.header(b"retry-after")
        return Response(reply.status, body, parse_retry_after(retry_after.decode("latin-1") if retry_after else None))

    def _observe(self, operation: str, started: float) -> None:
        if self.observe is not None:
            self.observe(self.name, operation, time.perf_counter() - started)

    def garbage(self, response: Response) -> ProxyError:
        return ProxyError(Kind.UPSTREAM_UNAVAILABLE,
                          f"{self.name} upstream answered HTTP {response.status} with an unreadable body")


def as_float(value: Any) -> float | None:
    """Prices and progress arrive as numbers, numeric strings, "40%" or ""."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip().rstrip("%").strip()
        try:
            return float(text) if text else None
        except ValueError:
            return None
    return None


def normalise_phrase(text: str) -> str:
    """Lower case, any run of spaces, dashes or underscores as one space: for loose matching."""
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())
