"""Cheap HTTP/1.1 clients, raw sockets, no HTTP library in the timed path: one blocking keep-alive
connection (`SyncConn`, `sequential`, `http_request`), N connections each waiting for one answer
(`image_storm`), and a closed-loop load generator for when wrk is missing (`pyload`)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from lib import nearest_rank

HOST = "127.0.0.1"
CURVE = [1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 99.99]  # as wrk_post.lua


def build_request(method: str, path: str, port: int, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {HOST}:{port}", "user-agent: bench/1",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    lines += [f"content-length: {len(body)}"] if body is not None else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class Response:
    """An HTTP/1.1 response read incrementally: Content-Length or chunked bodies."""

    __slots__ = ("buf", "chunked", "done", "headers", "length", "parts", "status")

    def __init__(self) -> None:
        self.buf, self.status, self.length, self.chunked, self.done = b"", 0, 0, False, False
        self.headers: dict[bytes, bytes] = {}
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.buf += data
        if not self.status:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].split(b"\r\n")
            self.status = int(head[0].split(b" ", 2)[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head[1:])}
            self.chunked = b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()
            self.length = int(self.headers.get(b"content-length", b"0"))
            self.buf = self.buf[end + 4:]
        while self.chunked and not self.done:
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(self.buf[:eol].split(b";", 1)[0], 16)
            if size == 0:  # the last chunk: done once the (empty) trailer is in
                self.done = self.buf.find(b"\r\n\r\n", eol) >= 0
                return
            if len(self.buf) < eol + 4 + size:
                return
            self.parts.append(self.buf[eol + 2:eol + 2 + size])
            self.buf = self.buf[eol + 4 + size:]
        if not self.chunked and len(self.buf) >= self.length:
            self.parts.append(self.buf[:self.length])
            self.done = True

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


class SyncConn:
    """One blocking keep-alive connection with TCP_NODELAY."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, raw: bytes) -> tuple[Response, int, int]:
        """(the response, ns to the first body bytes holding b'data:' or to its end, ns to its end)."""
        response, recv, first = Response(), self.sock.recv, 0
        started = time.perf_counter_ns()
        self.sock.sendall(raw)
        while not response.done:
            data = recv(262144)
            if not data:
                raise ConnectionError("connection closed mid-response")
            response.feed(data)
            if not first and any(b"data:" in p for p in response.parts):
                first = time.perf_counter_ns()
        ended = time.perf_counter_ns()
        return response, (first or ended) - started, ended - started


def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = SyncConn(port, timeout=timeout)
    try:
        response = conn.request(build_request(method, path, port, body, {"connection": "close", **(headers or {})}))[0]
    finally:
        conn.sock.close()
    return response.status, response.body


def http_json(port: int, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> Any:
    status, data = http_request(port, method, path, None, headers, timeout)
    if status != 200:
        raise RuntimeError(f"{method} {path} answered HTTP {status}: {data[:200]!r}")
    return json.loads(data)


def sequential(port: int, raw: bytes, count: int, warmup: int, expect: bytes,
               deadline: float) -> tuple[list[float], list[float], int]:
    """`count` requests one after another on one connection, until `deadline` (monotonic):
    (latencies ms, first-data ms, failures)."""
    conn = SyncConn(port)
    total: list[float] = []
    first: list[float] = []
    failures = 0
    try:
        for i in range(warmup + count):
            if time.monotonic() > deadline:
                break
            response, ttfb, whole = conn.request(raw)
            if i < warmup:
                continue
            if response.status != 200 or expect not in response.body:
                failures += 1
                continue
            total.append(whole / 1e6)
            first.append(ttfb / 1e6)
            if response.headers.get(b"connection", b"").lower() == b"close":
                conn.sock.close()
                conn = SyncConn(port)
    finally:
        conn.sock.close()
    return total, first, failures


class _Client(asyncio.Protocol):
    """One connection that sends `request`; `answered(response, ns)` says whether to send it again."""

    def __init__(self, request: bytes, answered: Callable[[Response, int], bool]) -> None:
        self.request, self.answered, self.response, self.started = request, answered, Response(), 0
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send()

    def send(self) -> None:
        self.response, self.started = Response(), time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.response.feed(data)
        if self.response.done:
            if self.answered(self.response, time.perf_counter_ns() - self.started):
                self.send()
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class Storm:
    """What `image_storm` saw, filled in as it goes: per request its status, body, answer time."""

    def __init__(self, count: int) -> None:
        self.statuses, self.bodies, self.errors = [0] * count, [b""] * count, list[str]()
        self.answered_at: list[float | None] = [None] * count


async def image_storm(port: int, request: bytes, storm: Storm, wait_limit: float, connect_parallel: int = 256) -> None:
    """One connection per request in `storm` (at most `connect_parallel` handshakes at a time),
    each sending `request` once and waiting for its answer."""
    loop = asyncio.get_running_loop()
    gate, deadline = asyncio.Semaphore(connect_parallel), loop.time() + wait_limit

    def answered(i: int, response: Response, _ns: int) -> bool:
        storm.statuses[i], storm.bodies[i], storm.answered_at[i] = response.status, response.body, time.monotonic()
        return False

    async def one(i: int) -> None:
        async with gate:
            try:
                transport, client = await asyncio.wait_for(loop.create_connection(
                    lambda: _Client(request, lambda r, ns: answered(i, r, ns)), HOST, port), timeout=30)
            except (TimeoutError, OSError) as error:
                storm.errors.append(f"connect: {error!r}")
                return
        try:
            lost = await asyncio.wait_for(client.closed, timeout=max(1.0, deadline - loop.time()))
            if storm.answered_at[i] is None:
                storm.errors.append(f"wait: {lost or ConnectionError('closed before the answer')!r}")
        except TimeoutError as error:
            storm.errors.append(f"wait: {error!r}")
        finally:
            transport.close()

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(storm.statuses))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def pyload(port: int, request: bytes, connections: int, seconds: float) -> dict[str, Any]:
    """A closed-loop load like `wrk -c N -d S`, answered in wrk_post.lua's shape (latency in µs)."""
    loop, latencies, counts = asyncio.get_running_loop(), list[float](), {"requests": 0, "non2xx": 0}
    started = time.monotonic()

    def answered(response: Response, ns: int) -> bool:
        latencies.append(ns / 1e3)
        counts["requests"] += 1
        counts["non2xx"] += response.status >= 400
        return time.monotonic() < started + seconds

    clients = [(await loop.create_connection(lambda: _Client(request, answered), HOST, port))[1]
               for _ in range(connections)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), timeout=seconds + 30)
        timeouts = 0
    except TimeoutError:
        timeouts = 1
    lat = latencies or [0.0]
    return {**counts, "duration_us": (time.monotonic() - started) * 1e6, "connect": 0, "read": 0, "write": 0,
            "timeout": timeouts, "percentiles": {str(p): nearest_rank(lat, p) for p in (50, 75, 90, 99, 99.9)},
            "curve": [[p, nearest_rank(lat, p)] for p in CURVE]}
