"""The one place that decides how the proxy talks HTTP to upstreams.

One `httpx.AsyncClient` per process, with a transport of our own underneath: HTTP/1.1
keep-alive connections as asyncio protocols, responses parsed by httptools (the llhttp
parser uvicorn uses). Streams and downloads use httpx's API (`httpx.Request` in,
`httpx.Response` out); the providers' calls use `Http1Transport.fetch` (a request head
written once per call shape in, a `Reply` out). GETs asked for in the same turn of the event
loop, such as the polls of many tasks, go out pipelined: several in one write on one
connection. Measured on this machine (bench/clients.py, 64 calls at once): httpx's default
pool costs 1,801 µs of CPU a call, httpx over aiohttp 375 µs, `fetch` 23 µs.
Change the transport here and nowhere else.

Deliberately small: HTTP/1.1 only, no proxies (the client never reads the environment), no
cookies, no redirects. Upstream APIs need none of them.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple

import httptools
import httpx

Origin = tuple[str, str, int]  # scheme, host, port: what a kept-alive connection is good for

PIPELINE_DEPTH = 16  # GETs at most in one write on one connection

# Reading stops while this much of a streamed body waits for its reader (a large download).
_HIGH_WATER = 256 * 1024


class Reply(NamedTuple):
    """An answer read whole: what `Http1Transport.fetch` gives the providers."""

    status: int
    headers: list[tuple[bytes, bytes]]  # as received: names in their own case
    content: bytes  # content-encoding undone
    at: float  # time.monotonic() when it had arrived whole

    def header(self, name: bytes) -> bytes | None:
        """The first value of the header `name` (lower case)."""
        return next((value for key, value in self.headers if key.lower() == name), None)


def _decoded(status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> bytes:
    """A body with its content-encoding undone, by httpx's decoders."""
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content)).read()


def _broken(exc: BaseException) -> httpx.ReadError:
    """A connection that failed mid-answer, as httpx names it."""
    return httpx.ReadError(str(exc) or "the upstream connection broke")


class NotAnswered(Exception):
    """A pipelined GET the upstream never began to answer: safe to send again on its own."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection carrying one request at a time, or a pipeline of GETs whose
    answers are read whole (`start_pipeline`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.requests = 0
        self._head: asyncio.Future[None] | None = None
        self._more: asyncio.Future[None] | None = None  # a reader waiting for body bytes
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.until_eof = False
        self.encoded = False
        self.head_only = False
        self.received = False  # any byte of this request's answer
        self.error: BaseException | None = None
        # a pipeline: the answers still awaited, in order, and what to do once it is over
        self.waiting: collections.deque[asyncio.Future[Reply]] | None = None
        self.answered = 0
        self.told_close = False  # an answer said Connection: close
        self.on_end: Callable[[], None] | None = None  # called once the pipeline is over, either way

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed upstream response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(exc or ConnectionResetError("the upstream closed the connection"))

    def eof_received(self) -> bool:
        self.closed = True  # never reused, even before connection_lost runs
        if self.status >= 200 and self.until_eof:  # a body delimited by the connection's end
            if self.waiting is not None:
                self._answer()
                return False
            self.complete = True
            self._wake_head()
            self._wake_more()
        return False

    def on_message_begin(self) -> None:
        self.received = True

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # 1xx: an interim answer; the real one follows
            self.headers = []
            return
        if self.head_only:  # the parser cannot know a HEAD answer has no body: end here, never reuse
            self.complete = True
            self.close()
            self._wake_head()
            return
        names = {name.lower() for name, _ in self.headers}
        self.encoded = b"content-encoding" in names
        self.until_eof = b"content-length" not in names and b"transfer-encoding" not in names \
            and self.status not in (204, 304)
        if self.waiting is None:
            self._wake_head()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.waiting is not None:
            return  # read whole: nobody reads piece by piece, so reading never pauses
        if self.buffered > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake_more()

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        if self.waiting is not None:
            self._answer()
            return
        self.complete = True
        if not self.parser.should_keep_alive():
            self.close()
        self._wake_head()
        self._wake_more()

    def _answer(self) -> None:
        """A pipelined answer is complete: to its caller, and the parser state to the next."""
        assert self.waiting is not None
        content = self.body_so_far()
        reply = Reply(self.status, self.headers, _decoded(self.status, self.headers, content) if self.encoded
                      else content, time.monotonic())
        future = self.waiting.popleft()
        if not future.done():  # its caller may have given up
            future.set_result(reply)
        self.answered += 1
        self.status, self.headers, self.received, self.until_eof = 0, [], False, False
        if not self.parser.should_keep_alive():
            self.told_close = True
            self.close()
        if not self.waiting:
            self.complete = True
            self._end_pipeline()

    def _end_pipeline(self) -> None:
        end, self.on_end = self.on_end, None
        if end is not None:
            end()  # at once: the connection is back in the pool before any caller runs on

    # for the transport
    def _reset(self, requests: int, head_only: bool = False) -> None:
        """Fresh answer state for the next request (or pipeline) on this connection."""
        self.status, self.headers, self.complete, self.received, self.error = 0, [], False, False, None
        self.head_only = head_only
        self.chunks.clear()
        self.buffered = 0
        self.requests += requests

    def start_pipeline(self, futures: list[asyncio.Future[Reply]], heads: bytes, on_end: Callable[[], None]) -> None:
        self._reset(len(futures))
        self.waiting = collections.deque(futures)
        self.answered = 0
        self.told_close = False
        self.on_end = on_end
        assert self.transport is not None
        self.transport.write(heads)

    def start(self, head: bytes, body: bytes, head_only: bool = False) -> None:
        self._reset(1, head_only)
        self.waiting = None
        self._head = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)

    async def head(self) -> None:
        assert self._head is not None
        await self._head
        if self.error is not None and not self.status:
            raise self.error

    async def next_chunk(self, read_timeout: float | None) -> bytes | None:
        """The next piece of the body; None at its end."""
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.buffered <= _HIGH_WATER // 2 and self.transport is not None and not self.closed:
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self._more = self.loop.create_future()
            try:
                async with asyncio.timeout(read_timeout):
                    await self._more
            except TimeoutError:
                raise httpx.ReadTimeout("the upstream stopped sending") from None

    def body_so_far(self) -> bytes:
        body = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        return body

    def time_out(self) -> None:
        if self.waiting is not None:
            self._fail(httpx.ReadTimeout("the upstream did not answer in time"))
            self.close()
            return
        if self._head is not None and not self._head.done():
            self._head.set_exception(TimeoutError())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if self.waiting is not None:
            # the answer under way (or the one timed out) fails; those never begun may be sent
            # again on their own
            first = True
            while self.waiting:
                future = self.waiting.popleft()
                if not future.done():
                    if first and (self.received or isinstance(exc, httpx.ReadTimeout)):
                        future.set_exception(exc if isinstance(exc, httpx.TransportError) else _broken(exc))
                    else:
                        future.set_exception(NotAnswered())
                first = False
            self._end_pipeline()
            return
        self._wake_head()
        self._wake_more()

    def _wake_head(self) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def _wake_more(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)


class _BodyStream(httpx.AsyncByteStream):
    """A body still arriving: read on demand, the connection given back once it is read."""

    def __init__(self, transport: Http1Transport, origin: Origin, conn: _Connection,
                 read_timeout: float | None) -> None:
        self._transport, self._origin, self._conn = transport, origin, conn
        self._read_timeout = read_timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self._conn.next_chunk(self._read_timeout)) is not None:
                yield chunk
        except (OSError, httpx.RemoteProtocolError) as exc:
            raise _broken(exc) from exc

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._transport.done(self._origin, self._conn)


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive pool: at most `max_connections` open and as many in use (a call,
    or a pipeline of up to PIPELINE_DEPTH GETs); idle connections are kept `keepalive_expiry`
    seconds, and the oldest idle one makes way when a call to any upstream needs a new
    connection and the limit is reached.

    Pipelining is safe for GETs (RFC 9112 §9.3.2): answers come in order, and a GET the
    upstream never began to answer (its connection closed or said `Connection: close`
    midway) is sent again on its own. An upstream that answers part of a pipeline and then
    stops without saying why does not take pipelined requests: its GETs go one at a time
    from then on."""

    def __init__(self, *, max_connections: int = 1000, keepalive_expiry: float = 4.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.keepalive_expiry = keepalive_expiry
        self.max_connections = max_connections
        self._calls = asyncio.Semaphore(max_connections)  # one permit per call in flight
        self._open = 0  # connections open or opening
        self._idle: dict[Origin, list[_Connection]] = {}
        if isinstance(verify, ssl.SSLContext):
            self._ssl = verify
        else:
            self._ssl = httpx.create_ssl_context(verify=verify)
        self._closed = False
        self._swept = 0.0
        self._queued: dict[Origin, list[tuple[bytes, asyncio.Future[Reply]]]] = {}
        self._pipelines: set[asyncio.Task[None]] = set()
        self._unpipelined: set[Origin] = set()  # origins that broke a pipeline

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}", request=request)
        origin = origin_of(url)
        head = head_of(request.method, url, request.headers.raw) + b"\r\n"
        stream = request.stream
        body = b"".join(stream) if isinstance(stream, httpx.ByteStream) else await request.aread()
        if b"transfer-encoding" in head.lower():  # a streamed body, now read whole: send it as one chunk
            body = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
        try:
            conn = await self._send(origin, request.method, head, body, request.extensions.get("timeout") or {})
        except httpx.RequestError as exc:
            exc.request = request
            raise
        if conn.complete:  # the common case: the whole answer arrived with its head
            response = httpx.Response(conn.status, headers=conn.headers, stream=httpx.ByteStream(b""))
            self._finish(origin, conn, response, conn.body_so_far())
            return response
        rest = _BodyStream(self, origin, conn, (request.extensions.get("timeout") or {}).get("read"))
        return httpx.Response(conn.status, headers=conn.headers, stream=rest)

    async def fetch(self, origin: Origin, method: str, head: bytes, body: bytes,
                    timeouts: dict[str, float | None]) -> Reply:
        """One call, answered whole, with no httpx object built: the providers' path.

        `head` is the request line and header lines, up to and including the blank line
        (`head_of`); `origin` is `origin_of` the same URL. Raises httpx's transport errors.
        """
        if method == "GET" and not body:
            queued = self.queue_get(origin, head, timeouts)
            if queued is not None:
                try:
                    return await queued
                except NotAnswered:  # its pipeline broke before the upstream began this one
                    pass
        conn = await self._send(origin, method, head, body, timeouts)
        status, headers, encoded = conn.status, conn.headers, conn.encoded
        if conn.complete:
            content = conn.body_so_far()
        else:
            parts = []  # a body longer than its first packets: read the rest here
            try:
                while (chunk := await conn.next_chunk(timeouts.get("read"))) is not None:
                    parts.append(chunk)
            except BaseException as exc:
                self._forget(conn)
                self._calls.release()
                if isinstance(exc, OSError | httpx.RemoteProtocolError):
                    raise _broken(exc) from exc
                raise
            content = b"".join(parts)
        self.done(origin, conn)
        if encoded:  # httpx's decoders undo the content-encoding
            content = _decoded(status, headers, content)
        return Reply(status, headers, content, time.monotonic())

    def queue_get(self, origin: Origin, head: bytes,
                  timeouts: dict[str, float | None]) -> asyncio.Future[Reply] | None:
        """A GET with no body, sent without waiting: the future of its `Reply`, or None where it
        must go through `fetch` (an origin that takes no pipelined requests, a closed client).

        GETs asked for in one turn of the event loop go out together: up to PIPELINE_DEPTH
        of them in one write on one connection (HTTP/1.1 pipelining, answers in order).
        Polls of many tasks are such GETs; one write and one read for several polls costs a
        fraction of one each (bench/README.md). The future fails with httpx's transport errors,
        or with NotAnswered: the upstream never began this one; send it again with `fetch`."""
        if self._closed or origin in self._unpipelined:
            return None
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        queued = self._queued.get(origin)
        if queued is None:
            queued = self._queued[origin] = []
            future.get_loop().call_soon(self._send_queued, origin, timeouts)
        queued.append((head, future))
        return future

    def _send_queued(self, origin: Origin, timeouts: dict[str, float | None]) -> None:
        queued = self._queued.pop(origin, [])
        for at in range(0, len(queued), PIPELINE_DEPTH):
            batch = queued[at:at + PIPELINE_DEPTH]
            conn = self._free_now(origin)
            if conn is not None:  # the common case: written in this turn of the loop, with no task
                self._start_pipeline(origin, conn, batch, timeouts)
                continue
            runner = asyncio.ensure_future(self._pipeline(origin, batch, timeouts))
            self._pipelines.add(runner)
            runner.add_done_callback(self._pipelines.discard)

    def _free_now(self, origin: Origin) -> _Connection | None:
        """A call permit and a kept-alive connection to `origin`, if both are free right now."""
        if self._closed or not self._idle.get(origin) or not _acquired_now(self._calls):
            return None
        conn = self._kept_alive(origin)
        if conn is None:
            self._calls.release()
        return conn

    async def _pipeline(self, origin: Origin, batch: list[tuple[bytes, asyncio.Future[Reply]]],
                        timeouts: dict[str, float | None]) -> None:
        """A pipeline that waits for a permit or a new connection first."""
        try:
            await self._permit(timeouts)
            try:
                conn, _ = await self._connect(origin, timeouts)
            except BaseException:
                self._calls.release()
                raise
        except (httpx.TransportError, OSError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (shutting down): nobody is left waiting for nothing
            for _, future in batch:
                if not future.done():
                    future.set_exception(NotAnswered())
            raise
        self._start_pipeline(origin, conn, batch, timeouts)

    def _start_pipeline(self, origin: Origin, conn: _Connection, batch: list[tuple[bytes, asyncio.Future[Reply]]],
                        timeouts: dict[str, float | None]) -> None:
        """Write the batch; the caller holds a permit and the connection, given back at its end."""
        read = timeouts.get("read")
        timer = conn.loop.call_later(read, conn.time_out) if read is not None else None

        def ended() -> None:
            if timer is not None:
                timer.cancel()
            fresh_and_closed = conn.told_close and conn.answered == 1 and conn.requests == len(batch)
            if not conn.complete and conn.answered and (not conn.told_close or fresh_and_closed):
                # The upstream answered part of a pipeline, then stopped without saying why, or
                # closed a fresh connection after its first answer (it keeps none alive): its
                # GETs go one at a time from now on. A close it announces on a connection that
                # served before is a keep-alive limit, not a reason.
                self._unpipelined.add(origin)
            self.done(origin, conn)

        conn.start_pipeline([future for _, future in batch], b"".join(head for head, _ in batch), ended)

    def _finish(self, origin: Origin, conn: _Connection, response: httpx.Response, content: bytes) -> None:
        """The whole body has arrived: into the response, the connection back to the pool."""
        encoded = conn.encoded
        self.done(origin, conn)
        if encoded:
            response.stream = httpx.ByteStream(content)
            response.read()  # httpx's decoders undo the content-encoding
        else:
            response._content = content  # read already: skips httpx's decoder pipeline, 13 µs a call

    async def _send(self, origin: Origin, method: str, head: bytes, body: bytes,
                    timeouts: dict[str, float | None]) -> _Connection:
        """Send one request and wait for its answer's head; the caller then holds the call's
        permit and the connection, and gives both back through `done` once the body is read."""
        await self._permit(timeouts)
        conn: _Connection | None = None
        try:
            conn, reused = await self._connect(origin, timeouts)
            try:
                await self._exchange(conn, head, body, timeouts.get("read"), method)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                # A kept-alive connection the upstream had just closed: a GET is safe to try once
                # more on a fresh one when the upstream never answered a byte.
                if not (reused and not conn.received and method == "GET"):
                    raise
                self._forget(conn)
                conn, _ = await self._connect(origin, timeouts)
                await self._exchange(conn, head, body, timeouts.get("read"), method)
        except BaseException:
            if conn is not None:
                self._forget(conn)
            self._calls.release()
            raise
        return conn

    async def _permit(self, timeouts: dict[str, float | None]) -> None:
        if self._closed:
            raise httpx.ConnectError("the upstream client is closed")
        if self._calls.locked():
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._calls.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no upstream connection free in time") from None
        else:
            await self._calls.acquire()  # free: returns at once

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes, read_timeout: float | None,
                        method: str) -> None:
        conn.start(head, body, method == "HEAD")
        # A timer that fails the wait, not asyncio.timeout: a tenth of the cost on every call.
        timer = conn.loop.call_later(read_timeout, conn.time_out) if read_timeout is not None else None
        try:
            await conn.head()
        except TimeoutError:
            raise httpx.ReadTimeout("the upstream did not answer in time") from None
        except httpx.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None
        except OSError as exc:
            raise _broken(exc) from None
        finally:
            if timer is not None:
                timer.cancel()

    async def _connect(self, origin: Origin, timeouts: dict[str, float | None]) -> tuple[_Connection, bool]:
        """A kept-alive connection to `origin`, or a new one; the caller holds a call permit."""
        kept = self._kept_alive(origin)
        if kept is not None:
            return kept, True
        if self._open >= self.max_connections:
            self._evict_one()  # calls in flight < permits, so some connection is idle
        self._open += 1
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), host, port,
                    ssl=self._ssl if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None)
        except TimeoutError:
            self._open -= 1
            raise httpx.ConnectTimeout("connecting to the upstream timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._open -= 1
            raise httpx.ConnectError(f"connecting to the upstream failed: {exc.__class__.__name__}") from None
        except BaseException:
            self._open -= 1
            raise
        return conn, False

    def _kept_alive(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                return conn
            self._forget(conn)
        return None

    def done(self, origin: Origin, conn: _Connection) -> None:
        """A call is over: its connection is kept for the next one (or closed), its permit freed."""
        self._calls.release()
        if conn.closed or not conn.complete or self._closed:
            self._forget(conn)
            return
        now = conn.idle_since = time.monotonic()
        self._idle.setdefault(origin, []).append(conn)
        if now - self._swept > self.keepalive_expiry:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close idle connections that expired or that the upstream closed."""
        self._swept = now
        for origin, conns in list(self._idle.items()):
            keep = []
            for conn in conns:
                if conn.closed or now - conn.idle_since >= self.keepalive_expiry:
                    self._forget(conn)
                else:
                    keep.append(conn)
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]

    def _evict_one(self) -> None:
        oldest: Origin | None = None
        for origin, conns in self._idle.items():
            if conns and (oldest is None or conns[0].idle_since < self._idle[oldest][0].idle_since):
                oldest = origin
        if oldest is not None:
            self._forget(self._idle[oldest].pop(0))
            if not self._idle[oldest]:
                del self._idle[oldest]

    def _forget(self, conn: _Connection) -> None:
        """Close a connection that will not be reused (once)."""
        if conn.transport is None:
            return
        conn.close()
        conn.transport = None
        self._open -= 1

    def idle_connections(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                self._forget(conn)
        self._idle.clear()


class UpstreamClient(httpx.AsyncClient):
    """The process's one httpx client, plus `call`: a request straight to the transport.

    `call` skips what `send` wraps around the transport (auth flows, redirects, cookies,
    event hooks), none of which the proxy sets; that is ~85 µs of CPU per call measured
    (bench/README.md). `stream`, `get` and the rest work as in any httpx client.
    """

    def __init__(self, transport: Http1Transport, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self.transport = transport

    async def call(self, request: httpx.Request) -> httpx.Response:
        response = await self.transport.handle_async_request(request)
        response.request = request
        if not isinstance(response.stream, httpx.ByteStream):
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response


class _NoCookies(httpx.Cookies):
    """The one client serves every key and every client of the proxy: a cookie one upstream
    answer sets must not ride along on another's calls."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def build_client(max_connections: int = 1000, verify: ssl.SSLContext | bool = True) -> UpstreamClient:
    client = UpstreamClient(
        Http1Transport(max_connections=max_connections, verify=verify),
        timeout=httpx.Timeout(60.0, connect=5.0),
        follow_redirects=False,
        trust_env=False,
    )
    client._cookies = _NoCookies()  # the property setter would copy into a plain Cookies jar
    return client


def _acquired_now(semaphore: asyncio.Semaphore) -> bool:
    """`Semaphore.acquire` in this turn of the event loop, where it would not wait."""
    if semaphore.locked():
        return False
    step = semaphore.acquire()
    try:
        step.send(None)  # an unlocked semaphore's acquire returns without suspending
    except StopIteration:
        return True
    raise RuntimeError("an unlocked semaphore's acquire suspended")


def origin_of(url: httpx.URL) -> Origin:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def head_of(method: str, url: httpx.URL, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The request line and header lines, without the blank line that ends them."""
    parts = [method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    return b"".join(parts)


def timed_out(exc: BaseException) -> bool:
    """A timeout, as opposed to a refused or dropped connection."""
    return isinstance(exc, TimeoutError | httpx.TimeoutException)


def never_sent(exc: BaseException) -> bool:
    """True only when the request provably never reached the upstream: no connection was made."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
