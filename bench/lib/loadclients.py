"""Cheap HTTP/1.1 clients for the benchmark: raw sockets, no HTTP library in the timed path.

- SyncConn: one blocking keep-alive connection (sequential latency, streamed time to first byte);
- http_request / http_json: one-shot requests (control calls, readiness);
- image_storm: N concurrent connections, each one POST and a long wait (asyncio Protocols);
- pyload: a fallback closed-loop load generator for when wrk is not available.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from lib.numbers import nearest_rank

HOST = "127.0.0.1"


def build_request(method: str, path: str, port: int, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {HOST}:{port}", "user-agent: bench/1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class ResponseParser:
    """Incremental HTTP/1.1 response parser: Content-Length or chunked bodies."""

    __slots__ = ("body_parts", "buf", "chunked", "done", "headers", "length", "pos", "saw_body", "status")

    def __init__(self) -> None:
        self.buf = b""
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.length = -1
        self.chunked = False
        self.body_parts: list[bytes] = []
        self.done = False
        self.pos = 0
        self.saw_body = False

    def feed(self, data: bytes) -> bytes:
        """Feed bytes; returns what was left over after a complete response (pipelining unused)."""
        self.buf += data
        if not self.status:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return b""
            head = self.buf[:end].split(b"\r\n")
            self.status = int(head[0].split(b" ", 2)[1])
            for line in head[1:]:
                name, _, value = line.partition(b":")
                self.headers[name.strip().lower()] = value.strip()
            if b"chunked" in self.headers.get(b"transfer-encoding", b"").lower():
                self.chunked = True
            else:
                self.length = int(self.headers.get(b"content-length", b"0"))
            self.buf = self.buf[end + 4:]
        if not self.chunked:
            if len(self.buf) >= self.length:
                self.body_parts.append(self.buf[:self.length])
                rest = self.buf[self.length:]
                self.buf = b""
                self.done = True
                return rest
            return b""
        # chunked
        while True:
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                return b""
            size = int(self.buf[:eol].split(b";", 1)[0], 16)
            if size == 0:
                end = self.buf.find(b"\r\n\r\n", eol)
                if end < 0:
                    return b""
                rest = self.buf[end + 4:]
                self.buf = b""
                self.done = True
                return rest
            if len(self.buf) < eol + 2 + size + 2:
                return b""
            self.body_parts.append(self.buf[eol + 2:eol + 2 + size])
            self.buf = self.buf[eol + 2 + size + 2:]

    @property
    def body(self) -> bytes:
        return b"".join(self.body_parts)


class SyncConn:
    """One blocking keep-alive connection with TCP_NODELAY."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def request(self, raw: bytes) -> tuple[ResponseParser, int, int]:
        """Send one request; returns (response, ns to the first body bytes holding b'data:' or
        the full response, ns to the complete response)."""
        parser = ResponseParser()
        recv = self.sock.recv
        started = time.perf_counter_ns()
        self.sock.sendall(raw)
        first = 0
        while not parser.done:
            data = recv(262144)
            if not data:
                raise ConnectionError("connection closed mid-response")
            parser.feed(data)
            if not first and parser.body_parts and any(b"data:" in p for p in parser.body_parts):
                first = time.perf_counter_ns()
        ended = time.perf_counter_ns()
        return parser, (first or ended) - started, ended - started


def http_request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 timeout: float = 30.0) -> tuple[int, bytes]:
    payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    hdrs = {"connection": "close", **(headers or {})}
    if payload is not None:
        hdrs.setdefault("content-type", "application/json")
    conn = SyncConn(port, timeout=timeout)
    try:
        parser, _, _ = conn.request(build_request(method, path, port, payload, hdrs))
        return parser.status, parser.body
    finally:
        conn.close()


def http_json(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 30.0) -> Any:
    status, data = http_request(port, method, path, body, headers, timeout)
    if status != 200:
        raise RuntimeError(f"{method} {path} answered HTTP {status}: {data[:200]!r}")
    return json.loads(data)


def sequential(port: int, raw: bytes, count: int, warmup: int, expect: bytes,
               deadline: float) -> tuple[list[float], list[float], int]:
    """`count` requests one after another on one connection; returns (latencies ms,
    first-data ms, failures). Stops at `deadline` (monotonic)."""
    conn = SyncConn(port)
    total: list[float] = []
    first: list[float] = []
    failures = 0
    try:
        for i in range(warmup + count):
            if time.monotonic() > deadline:
                break
            parser, ttfb, whole = conn.request(raw)
            if i < warmup:
                continue
            if parser.status != 200 or expect not in parser.body:
                failures += 1
                continue
            total.append(whole / 1e6)
            first.append(ttfb / 1e6)
            if parser.headers.get(b"connection", b"").lower() == b"close":
                conn.close()
                conn = SyncConn(port)
    finally:
        conn.close()
    return total, first, failures


# ---------------------------------------------------------------- 10,000 waiting requests

class _Waiter(asyncio.Protocol):
    def __init__(self, request: bytes, done: asyncio.Future[tuple[int, bytes, float]]) -> None:
        self.request = request
        self.done = done
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if self.parser.done and not self.done.done():
            self.done.set_result((self.parser.status, self.parser.body, time.monotonic()))
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the answer"))


@dataclass
class StormResult:
    sent_at: list[float] = field(default_factory=list)
    answered_at: list[float | None] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def image_storm(port: int, request: bytes, count: int, wait_limit: float, connect_parallel: int = 256,
                      result: StormResult | None = None) -> StormResult:
    """Open `count` connections (at most `connect_parallel` handshakes at a time), each sending
    `request` once and waiting for its answer; fills `result` as it goes."""
    loop = asyncio.get_running_loop()
    result = result or StormResult()
    result.sent_at = [0.0] * count
    result.answered_at = [None] * count
    result.statuses = [0] * count
    result.bodies = [b""] * count
    gate = asyncio.Semaphore(connect_parallel)
    deadline = loop.time() + wait_limit

    async def one(i: int) -> None:
        done: asyncio.Future[tuple[int, bytes, float]] = loop.create_future()
        async with gate:
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Waiter(request, done), HOST, port), timeout=30)
            except (TimeoutError, OSError) as error:
                result.errors.append(f"connect: {error!r}")
                return
            result.sent_at[i] = time.monotonic()
        try:
            status, body, at = await asyncio.wait_for(done, timeout=max(1.0, deadline - loop.time()))
        except (TimeoutError, OSError, ConnectionError) as error:
            result.errors.append(f"wait: {error!r}")
            return
        finally:
            transport.close()
        result.statuses[i], result.bodies[i], result.answered_at[i] = status, body, at

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return result


# ---------------------------------------------------------------- fallback load generator

class _Closed(asyncio.Protocol):
    def __init__(self, request: bytes, stats: dict[str, Any], stop_at: float) -> None:
        self.request = request
        self.stats = stats
        self.stop_at = stop_at
        self.parser = ResponseParser()
        self.started = 0
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        self.parser = ResponseParser()
        self.started = time.perf_counter_ns()
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if not self.parser.done:
            return
        now = time.perf_counter_ns()
        self.stats["latencies"].append((now - self.started) / 1e3)
        if self.parser.status >= 400:
            self.stats["non2xx"] += 1
        self.stats["requests"] += 1
        if time.monotonic() < self.stop_at:
            self._send()
        else:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def pyload(port: int, request: bytes, connections: int, seconds: float) -> dict[str, Any]:
    """A closed-loop load like `wrk -c N -d S`: answers in wrk's result shape (latency in us)."""
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"latencies": [], "non2xx": 0, "requests": 0, "errors": 0}
    started = time.monotonic()
    stop_at = started + seconds
    protocols = []
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: _Closed(request, stats, stop_at), HOST, port)
        protocols.append(proto)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.closed for p in protocols)), timeout=seconds + 30)
    except TimeoutError:
        stats["errors"] += 1
    elapsed = time.monotonic() - started
    lat = stats["latencies"] or [0.0]
    return {"requests": stats["requests"], "duration_us": elapsed * 1e6, "non2xx": stats["non2xx"],
            "connect": 0, "read": 0, "write": 0, "timeout": stats["errors"],
            "percentiles": {str(p): nearest_rank(lat, p) for p in (50, 75, 90, 99, 99.9)},
            "curve": [[p, nearest_rank(lat, p)] for p in CURVE]}


CURVE = [1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 99.99]  # as wrk_post.lua
