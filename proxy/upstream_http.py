"""The proxy's HTTP/1.1 client for upstream API calls: the submit and poll path.

Keep-alive connections as asyncio protocols, answers parsed by httptools (the llhttp parser
uvicorn uses) and read whole. The providers hand `Http1Transport.fetch` a request head
written once per call shape and get a plain `Reply`; GETs asked for in the same turn of the
event loop, such as the polls of many tasks, go out pipelined: several in one write on one
connection. Measured on this machine (bench/clients.py, 64 calls at once): httpx's default
pool costs 1,801 µs of CPU a call, httpx over aiohttp 375 µs, `fetch` 23 µs. Result
downloads (any host, redirects, large bodies) go through a stock client instead
(proxy/downloads.py).

Deliberately small: HTTP/1.1 only, answers read whole and capped, no cookies, no redirects;
an egress HTTP proxy (proxy/egress.py) is reached with CONNECT, for http and https upstreams
alike.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import httptools
import httpx

from proxy.egress import Egress, EgressProxy
from proxy.loop import running_loop

Origin = tuple[str, str, int]  # scheme, host, port: what a kept-alive connection is good for

PIPELINE_DEPTH = 16  # GETs at most in one write on one connection
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # an upstream API answer larger than this is an error
_SPLIT_WRITE = 65536  # a body at least this long is written after its head, not copied onto it


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
    """A request the upstream never began to answer: safe to send again if it is a GET."""


class AnswerTooLarge(httpx.RemoteProtocolError):
    """An answer longer than the transport reads; its connection is closed."""


class _Exchange:
    """One request's answer as it arrives, and the future waiting for it whole (uvicorn's
    RequestResponseCycle)."""

    __slots__ = ("begun", "encoded", "future", "headers", "parts", "size", "status", "until_eof")

    def __init__(self, future: asyncio.Future[Reply]) -> None:
        self.future = future
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.begun = False  # a byte of its answer arrived
        self.until_eof = False  # a body delimited by the connection's end
        self.encoded = False

    def answer(self) -> None:
        content = b"".join(self.parts)
        if self.encoded:
            content = _decoded(self.status, self.headers, content)
        if not self.future.done():  # its caller may have given up
            self.future.set_result(Reply(self.status, self.headers, content, time.monotonic()))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to one origin: requests written together (one call, or a
    pipeline of GETs), their answers parsed and handed to each exchange in order. `ended` is
    told once they are all over, answered or failed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin, ended: Callable[[_Connection], None],
                 max_bytes: int) -> None:
        self.loop = loop
        self.origin = origin
        self.ended = ended
        self.max_bytes = max_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.written = 0  # requests written on this connection, ever
        self.exchanges: collections.deque[_Exchange] = collections.deque()  # unanswered, in order
        self.batch = 0  # requests written together last
        self.answered = 0  # of those, answered whole
        self.told_close = False  # an answer said Connection: close
        self.timer: asyncio.TimerHandle | None = None  # the deadline of the whole batch

    def send(self, exchanges: list[_Exchange], head: bytes, body: bytes, read_timeout: float | None) -> None:
        """Write requests; their answers are due whole within `read_timeout` seconds."""
        self.exchanges.extend(exchanges)
        self.batch, self.answered, self.told_close = len(exchanges), 0, False
        self.written += len(exchanges)
        # A timer that fails the batch, not asyncio.timeout: a tenth of the cost on every call.
        self.timer = self.loop.call_later(read_timeout, self.time_out) if read_timeout is not None else None
        assert self.transport is not None
        if len(body) < _SPLIT_WRITE:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            self._fail(httpx.RemoteProtocolError(f"malformed upstream response: {exc}"))

    def eof_received(self) -> bool:
        self.closed = True  # never reused, even before connection_lost runs
        if self.exchanges and self.exchanges[0].status >= 200 and self.exchanges[0].until_eof:
            self._answered()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the upstream closed the connection"))

    # httptools callbacks: the answer under way belongs to the first exchange
    def on_message_begin(self) -> None:
        if not self.exchanges:  # an answer nobody asked for: the connection is out of step
            self.close()
            return
        self.exchanges[0].begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.exchanges:
            self.exchanges[0].headers.append((name, value))

    def on_headers_complete(self) -> None:
        if not self.exchanges:
            return
        exchange = self.exchanges[0]
        status = self.parser.get_status_code()
        if status < 200:  # 1xx: an interim answer; the real one follows
            exchange.headers = []
            return
        exchange.status = status
        length: bytes | None = None
        framed = False
        for name, value in exchange.headers:
            name = name.lower()
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                framed = True
            elif name == b"content-encoding":
                exchange.encoded = True
        exchange.until_eof = length is None and not framed and status not in (204, 304)
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            self._too_large()

    def on_body(self, body: bytes) -> None:
        if not self.exchanges:
            return
        exchange = self.exchanges[0]
        exchange.parts.append(body)
        exchange.size += len(body)
        if exchange.size > self.max_bytes:
            self._too_large()

    def on_message_complete(self) -> None:
        if self.exchanges and self.exchanges[0].status >= 200:
            self._answered()

    def _answered(self) -> None:
        """The first exchange's answer is whole: to its caller, and the parser to the next."""
        self.exchanges.popleft().answer()
        self.answered += 1
        if not self.parser.should_keep_alive():
            self.told_close = True
            self.close()
        if not self.exchanges:
            self._end()

    def _too_large(self) -> None:
        self.close()
        self._fail(AnswerTooLarge(f"the upstream answer is larger than {self.max_bytes} bytes"))

    def time_out(self) -> None:
        self.timer = None
        self.close()
        self._fail(httpx.ReadTimeout("the upstream did not answer in time"))

    def _fail(self, exc: BaseException) -> None:
        """The answer under way (or the one timed out) fails; those never begun may be sent
        again on their own."""
        if not self.exchanges:
            return
        first = self.exchanges.popleft()
        if first.begun or isinstance(exc, httpx.TimeoutException):
            first.fail(exc if isinstance(exc, httpx.TransportError) else _broken(exc))
        else:
            first.fail(NotAnswered())
        while self.exchanges:
            self.exchanges.popleft().fail(NotAnswered())
        self._end()

    def _end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.ended(self)  # at once: the connection is back in the pool before any caller runs on

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Tunnel(asyncio.Protocol):
    """An egress proxy's answer to CONNECT, read up to its blank line."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[bytes] = loop.create_future()
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data
        if not self.answer.done() and (b"\r\n\r\n" in self.data or len(self.data) > 65536):
            self.answer.set_result(self.data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or ConnectionResetError("the egress proxy closed the connection"))


class ProxyRefused(OSError):
    """The egress proxy would not open a tunnel to the upstream."""


async def _tunnel(loop: asyncio.AbstractEventLoop, proxy: EgressProxy, host: str, port: int) -> asyncio.Transport:
    """A connection to `host`:`port` through `proxy` (CONNECT), ready for the upstream's bytes."""
    raw, tunnel = await loop.create_connection(lambda: _Tunnel(loop), proxy.host, proxy.port)
    try:
        target = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")
        request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (target, target)
        if proxy.authorization is not None:
            request += b"Proxy-Authorization: " + proxy.authorization + b"\r\n"
        raw.write(request + b"\r\n")
        answer = await tunnel.answer
        head, end, rest = answer.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.") and b" " in head else b""
        if not (status.isdigit() and 200 <= int(status) < 300) or not end or rest:
            raise ProxyRefused(f"the egress proxy answered CONNECT with {head[:64]!r}")
    except BaseException:
        raw.close()
        raise
    return raw


class Http1Transport:
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
                 verify: ssl.SSLContext | bool = True, egress: Egress | None = None,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.keepalive_expiry = keepalive_expiry
        self.max_connections = max_connections
        self.max_answer_bytes = max_answer_bytes
        self._egress = egress
        # Permits, one per call or pipeline in flight, counted here: a waiter is a future in line.
        self._busy = 0
        self._line: collections.deque[asyncio.Future[None]] = collections.deque()
        self._open = 0  # connections open or opening
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
        self._closed = False
        self._swept = 0.0
        self._queued: dict[Origin, list[tuple[bytes, asyncio.Future[Reply]]]] = {}
        self._pipelines: set[asyncio.Task[None]] = set()
        self._unpipelined: set[Origin] = set()  # origins that broke a pipeline

    async def fetch(self, origin: Origin, method: str, head: bytes, body: bytes,
                    timeouts: dict[str, float | None]) -> Reply:
        """One call, answered whole: the providers' path.

        `head` is the request line and header lines, up to and including the blank line
        (`head_of`); `origin` is `origin_of` the same URL. `timeouts["read"]` is a deadline for
        the whole answer. Raises httpx's transport errors (`AnswerTooLarge` past
        `max_answer_bytes`).
        """
        if method == "HEAD":
            raise ValueError("fetch reads an answer's body, and a HEAD answer has none")
        if method != "GET" or body:
            return await self._call(origin, head, body, timeouts, again=False)
        queued = self.queue_get(origin, head, timeouts)
        if queued is not None:
            try:
                return await queued
            except NotAnswered:  # its pipeline broke before the upstream began this one
                pass
        return await self._call(origin, head, body, timeouts, again=True)

    async def _call(self, origin: Origin, head: bytes, body: bytes, timeouts: dict[str, float | None],
                    again: bool, fresh: bool = False) -> Reply:
        await self._take(timeouts.get("pool"))
        try:
            conn, reused = await self._connect(origin, timeouts, fresh)
        except BaseException:
            self._give()
            raise
        future: asyncio.Future[Reply] = conn.loop.create_future()
        conn.send([_Exchange(future)], head, body, timeouts.get("read"))
        try:
            return await future
        except NotAnswered:
            # A kept-alive connection the upstream had just closed: a GET is safe to send once
            # more, on a new connection; anything else may have been acted on.
            if again and reused:
                return await self._call(origin, head, body, timeouts, False, fresh=True)
            raise _broken(ConnectionResetError("the upstream closed the connection without answering")) from None

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
        future: asyncio.Future[Reply] = running_loop().create_future()
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
                self._pipeline_on(conn, batch, timeouts)
                continue
            runner = asyncio.ensure_future(self._pipeline(origin, batch, timeouts))
            self._pipelines.add(runner)
            runner.add_done_callback(self._pipelines.discard)

    def _free_now(self, origin: Origin) -> _Connection | None:
        """A permit and a kept-alive connection to `origin`, if both are free right now."""
        if self._closed or not self._idle.get(origin) or not self._take_now():
            return None
        conn = self._kept_alive(origin)
        if conn is None:
            self._give()
        return conn

    async def _pipeline(self, origin: Origin, batch: list[tuple[bytes, asyncio.Future[Reply]]],
                        timeouts: dict[str, float | None]) -> None:
        """A pipeline that waits for a permit or a new connection first."""
        try:
            await self._take(timeouts.get("pool"))
            try:
                conn, _ = await self._connect(origin, timeouts)
            except BaseException:
                self._give()
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
        self._pipeline_on(conn, batch, timeouts)

    @staticmethod
    def _pipeline_on(conn: _Connection, batch: list[tuple[bytes, asyncio.Future[Reply]]],
                     timeouts: dict[str, float | None]) -> None:
        """Write the batch; the caller holds a permit and the connection, given back at its end."""
        conn.send([_Exchange(future) for _, future in batch], b"".join(head for head, _ in batch), b"",
                  timeouts.get("read"))

    def _ended(self, conn: _Connection) -> None:
        """What was written on `conn` is over: its permit freed, the connection kept (or closed)."""
        if conn.answered and conn.answered < conn.batch:
            fresh = conn.written == conn.batch
            if not conn.told_close or (fresh and conn.answered == 1):
                # The upstream answered part of a pipeline, then stopped without saying why, or
                # closed a fresh connection after its first answer (it keeps none alive): its
                # GETs go one at a time from now on. A close it announces on a connection that
                # served before is a keep-alive limit, not a reason.
                self._unpipelined.add(conn.origin)
        self._give()
        if conn.closed or self._closed:
            self._forget(conn)
            return
        now = conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, []).append(conn)
        if now - self._swept > self.keepalive_expiry:
            self._sweep(now)

    # ---- permits ------------------------------------------------------------------------

    def _take_now(self) -> bool:
        if self._busy < self.max_connections and not self._line:
            self._busy += 1
            return True
        return False

    async def _take(self, pool_timeout: float | None) -> None:
        if self._closed:
            raise httpx.ConnectError("the upstream client is closed")
        if self._take_now():
            return
        waiter: asyncio.Future[None] = running_loop().create_future()
        self._line.append(waiter)
        try:
            async with asyncio.timeout(pool_timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._give()  # handed a permit just as the wait ended: pass it on
            elif waiter in self._line:
                self._line.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout("no upstream connection free in time") from None
            raise

    def _give(self) -> None:
        while self._line:
            waiter = self._line.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the permit goes straight to the first in line
                return
        self._busy -= 1

    # ---- connections --------------------------------------------------------------------

    async def _connect(self, origin: Origin, timeouts: dict[str, float | None],
                       fresh: bool = False) -> tuple[_Connection, bool]:
        """A kept-alive connection to `origin` (unless `fresh`), or a new one; the caller holds a permit."""
        kept = None if fresh else self._kept_alive(origin)
        if kept is not None:
            return kept, True
        if self._open >= self.max_connections:
            self._evict_one()  # calls in flight < permits, so some connection is idle
        self._open += 1
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                conn = await self._open_connection(origin)
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

    async def _open_connection(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        loop = running_loop()
        conn = _Connection(loop, origin, self._ended, self.max_answer_bytes)
        tls = self._ssl if scheme == "https" else None
        proxy = self._egress.for_origin(scheme, host) if self._egress is not None else None
        if proxy is None:
            await loop.create_connection(lambda: conn, host, port, ssl=tls, server_hostname=host if tls else None)
            return conn
        raw = await _tunnel(loop, proxy, host, port)
        try:
            if tls is None:
                raw.set_protocol(conn)
                conn.connection_made(raw)
            else:  # TLS with the upstream inside the tunnel: the certificate names the upstream
                secure = await loop.start_tls(raw, conn, tls, server_hostname=host)
                assert secure is not None
                conn.connection_made(secure)
        except BaseException:
            raw.close()
            raise
        return conn

    def _kept_alive(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                return conn
            self._forget(conn)
        return None

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


class UpstreamClient:
    """The process's one upstream client, as the providers hold it: `transport.fetch` and
    `transport.queue_get`."""

    def __init__(self, transport: Http1Transport) -> None:
        self.transport = transport

    async def aclose(self) -> None:
        await self.transport.aclose()


def build_client(max_connections: int = 1000, verify: ssl.SSLContext | bool = True, *,
                 egress: Egress | None = None, max_answer_bytes: int = MAX_ANSWER_BYTES) -> UpstreamClient:
    return UpstreamClient(Http1Transport(max_connections=max_connections, verify=verify, egress=egress,
                                         max_answer_bytes=max_answer_bytes))


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
