"""The narrow interface every upstream implements, and the normalised values it trades in.

A provider knows one upstream's URLs, bodies and error dialect. It never sees the HTTP
edge, the pool or OpenAI's shapes: it gets a key and a normalised call, and answers a
normalised result or raises `ProxyError` with an upstream kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

import cachetools
import httpx
import msgspec

from proxy.errors import Kind, ProxyError
from proxy.upstream_http import UpstreamClient, never_sent, timed_out

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


class HTTPUpstream:
    """What both providers share: sending one call with timeouts, mapping transport failures."""

    def __init__(self, name: str, base_url: str, http: UpstreamClient, *,
                 connect_timeout: float, read_timeout: float, observe: Observe | None = None) -> None:
        self.name = name
        self.observe = observe
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.http = http
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout).as_dict()
        # Parsing a URL costs more than the rest of a call: each is parsed once (a task's poll
        # URL is asked for every few seconds while it runs).
        self._urls: cachetools.LRUCache[Any, httpx.URL] = cachetools.LRUCache(maxsize=32768)

    def url(self, path: str, params: dict[str, str] | None = None) -> httpx.URL:
        key = (path, *params.items()) if params else path
        url = self._urls.get(key)
        if url is None:
            text = self.base_url + path.lstrip("/")
            url = self._urls[key] = httpx.URL(text + "?" + urlencode(params) if params else text)
        return url

    async def send(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                   json: Any = None, params: dict[str, str] | None = None) -> Response:
        url = self.url(path, params)
        # Headers written out here, body as a stream: httpx then adds nothing of its own, and a
        # call skips the header merging that was its costliest step (bench/README.md, profile).
        raw = [(b"host", url.netloc), *_HEADERS]
        if headers:
            raw += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        content = b"" if json is None else _encode(json)
        if json is not None:
            raw.append((b"content-type", b"application/json"))
        if json is not None or method in ("POST", "PUT", "PATCH"):
            raw.append((b"content-length", str(len(content)).encode("ascii")))
        request = httpx.Request(method, url, headers=raw, stream=httpx.ByteStream(content),
                                extensions={"timeout": self.timeout})
        started = time.perf_counter()
        try:
            reply = await self.http.call(request)  # the transport times out connect, pool and read
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            self._observe(path, started)
            # The message names no URL or header: upstream addresses stay private.
            sent = not never_sent(exc)
            what = "timed out" if timed_out(exc) else "failed"
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name} upstream request {what}",
                             delivered=sent) from None
        self._observe(path, started)
        try:
            body = _decode(reply.content) if reply.content else None
        except msgspec.DecodeError:
            body = None
        return Response(reply.status_code, body, parse_retry_after(reply.headers.get("retry-after")))

    def _observe(self, path: str, started: float) -> None:
        if self.observe is not None:
            # ids in paths would make one label per task: "api/service/task/{id}"
            operation = "/".join("{id}" if any(c.isdigit() for c in part) else part for part in path.split("/"))
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
