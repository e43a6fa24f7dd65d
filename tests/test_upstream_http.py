"""proxy/upstream_http.py over real loopback sockets.

Every upstream here is a small raw asyncio server in this file that reads the request bytes
and writes exact response bytes, so framing edge cases (chunks split mid-size-line, bodies
ended by the connection's close, interim 100 answers, dropped keep-alive connections) are
produced on purpose. Nothing of the transport is mocked.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from helpers import LoopbackServer, free_port

from proxy.providers.engine import HTTPUpstream
from proxy.upstream_http import (
    AnswerTooLarge,
    Reply,
    UpstreamClient,
    build_client,
    head_of,
    never_sent,
    origin_of,
    timed_out,
)

TIMEOUT = {"connect": 1.0, "read": 2.0, "write": 1.0, "pool": 1.0}


# ---- a raw upstream ------------------------------------------------------------------


@dataclass
class Req:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    conn: int  # which accepted connection (1-based) carried it


Handler = Callable[["Upstream", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Upstream(LoopbackServer):
    """A raw server that counts connections and records requests; `handler` serves each."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_context)
        self.handler = handler
        self.accepted = 0
        self.live = 0
        self.peak = 0
        self.ended: set[int] = set()  # connections whose handler has finished
        self.requests: list[Req] = []

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}{path}"

    def methods(self, method: str) -> list[Req]:
        return [r for r in self.requests if r.method == method]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = self.accepted
        self.live += 1
        self.peak = max(self.peak, self.live)
        try:
            await self.handler(self, reader, writer, conn)
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the client went away, or the test is over: this server's job is done
        finally:
            self.live -= 1
            self.ended.add(conn)
            writer.transport.abort()

    async def read(self, reader: asyncio.StreamReader, conn: int) -> Req | None:
        """One request, its body de-chunked; None when the client closed between requests."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += await reader.readexactly(size)
                assert await reader.readexactly(2) == b"\r\n"
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
        req = Req(method, target, headers, body, conn)
        self.requests.append(req)
        return req


def answer(status: int = 200, body: bytes = b"", headers: Iterable[tuple[str, str]] = (),
           reason: str = "OK") -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


def each(respond: Callable[[Upstream, Req], bytes], delay: float = 0.0) -> Handler:
    """A keep-alive server: every request on a connection gets `respond`'s bytes."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while (req := await up.read(reader, conn)) is not None:
            if delay:
                await asyncio.sleep(delay)
            writer.write(respond(up, req))
            await writer.drain()

    return handler


def once(respond: Callable[[Upstream, Req], bytes]) -> Handler:
    """A server that answers one request per connection, then closes it."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        if (req := await up.read(reader, conn)) is not None:
            writer.write(respond(up, req))
            await writer.drain()

    return handler


def ok(up: Upstream, req: Req) -> bytes:
    return answer(200, f"{req.method} {req.target}".encode())


def run(main: Callable[[], Coroutine[Any, Any, None]], limit: float = 8.0) -> None:
    """pytest-asyncio is not a dependency: each test runs its own loop, with a hard limit."""

    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await main()

    asyncio.run(bounded())


async def call(client: UpstreamClient, method: str, url: str, content: bytes = b"",
               headers: Iterable[tuple[bytes, bytes]] = (), timeouts: dict[str, float] = TIMEOUT) -> Reply:
    """One call through `fetch`, its head written as HTTPUpstream writes it."""
    parsed = httpx.URL(url)
    raw = [(b"host", parsed.netloc), *headers]
    if content or method in ("POST", "PUT", "PATCH", "DELETE"):
        raw.append((b"content-length", b"%d" % len(content)))
    return await client.transport.fetch(origin_of(parsed), method, head_of(method, parsed, raw) + b"\r\n", content,
                                        timeouts)


async def until(condition: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def pieces(writer: asyncio.StreamWriter, data: bytes, size: int, pause: float = 0.002) -> None:
    """`data` in writes of `size` bytes with a pause between, so they arrive as separate reads."""
    for at in range(0, len(data), size):
        writer.write(data[at:at + size])
        await writer.drain()
        await asyncio.sleep(pause)


def chunked(parts: Iterable[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# ---- 1. keep-alive -------------------------------------------------------------------


def test_two_sequential_gets_reuse_one_connection() -> None:
    def respond(up: Upstream, req: Req) -> bytes:
        return answer(200, f"you asked {req.target}".encode(),
                      [("X-Served", str(len(up.requests))), ("Content-Type", "text/plain")])

    async def main() -> None:
        async with Upstream(each(respond)) as up:
            client = build_client()
            first = await call(client, "GET", up.url("/a?x=1&y=%20z"))
            second = await call(client, "GET", up.url("/b"))
            assert (first.status, first.header(b"x-served")) == (200, b"1")
            assert first.content == b"you asked /a?x=1&y=%20z"
            assert (second.status, second.content, second.header(b"x-served")) == (200, b"you asked /b", b"2")
            assert first.header(b"content-type") == b"text/plain"
            assert up.accepted == 1
            assert [r.conn for r in up.requests] == [1, 1]
            assert up.requests[0].headers["host"] == f"127.0.0.1:{up.port}"
            assert client.transport.idle_connections() == 1
            await client.aclose()

    run(main)


def test_aclose_closes_idle_connections_and_later_calls_fail_unsent() -> None:
    async def main() -> None:
        async with Upstream(each(ok)) as up:
            client = build_client()
            assert (await call(client, "GET", up.url())).status == 200
            assert up.ended == set()
            await client.aclose()
            await until(lambda: up.ended == {1})  # the server saw the idle connection end
            assert client.transport.idle_connections() == 0
            with pytest.raises(httpx.ConnectError) as caught:
                await call(client, "GET", up.url())
            assert never_sent(caught.value)
            assert len(up.requests) == 1

    run(main)


# ---- 2. response framing -------------------------------------------------------------


def test_content_length_body_with_repeated_headers() -> None:
    body = bytes(range(256)) * 40

    def respond(up: Upstream, req: Req) -> bytes:
        return answer(201, body, [("X-Dup", "1"), ("x-dup", "2"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
                      reason="Created")

    async def main() -> None:
        async with Upstream(each(respond)) as up:
            client = build_client()
            reply = await call(client, "GET", up.url())
            assert reply.status == 201
            assert reply.content == body
            assert reply.header(b"content-length") == str(len(body)).encode()
            assert [v for k, v in reply.headers if k.lower() == b"x-dup"] == [b"1", b"2"]
            assert [v for k, v in reply.headers if k.lower() == b"set-cookie"] == [b"a=1", b"b=2"]
            await client.aclose()

    run(main)


def test_head_arriving_one_byte_at_a_time() -> None:
    wire = answer(200, b"slowly", [("X-Long-Header-Name", "a value with spaces")])

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while await up.read(reader, conn) is not None:
            await pieces(writer, wire, 1, pause=0.0005)

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            for _ in range(2):
                reply = await call(client, "GET", up.url())
                assert reply.status == 200
                assert reply.header(b"x-long-header-name") == b"a value with spaces"
                assert reply.content == b"slowly"
            assert up.accepted == 1
            await client.aclose()

    run(main)


def test_chunked_body_split_across_writes() -> None:
    parts = [b"hello", b" world", b"!" * 30, b"\r\n0\r\n", b"x" * 4096, b"end"]
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n" + chunked(parts)

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while await up.read(reader, conn) is not None:
            if len(up.requests) == 1:  # the framing split mid size-line and mid chunk
                await pieces(writer, wire[:120], 7, pause=0.001)
                await pieces(writer, wire[120:], 1000, pause=0.001)
            else:
                writer.write(wire)

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            for _ in range(2):  # the second answer on the same connection: the first one ended cleanly
                reply = await call(client, "GET", up.url())
                assert reply.status == 200
                assert reply.header(b"x-kind") == b"chunked"
                assert reply.content == b"".join(parts)
            assert up.accepted == 1
            await client.aclose()

    run(main)


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200 OK\r\nConnection: close", b"HTTP/1.0 200 OK"],
                         ids=["1.1-close", "1.0"])
def test_body_delimited_by_connection_close(status_line: bytes) -> None:
    body = b"until the end " * 5000

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        await up.read(reader, conn)
        writer.write(status_line + b"\r\nX-Eof: yes\r\n\r\n")
        await pieces(writer, body, 10_000)
        writer.close()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            for _ in range(2):  # the second call must not try the closed connection
                reply = await call(client, "GET", up.url())
                assert reply.status == 200
                assert reply.header(b"x-eof") == b"yes"
                assert reply.content == body
            assert up.accepted == 2
            await client.aclose()

    run(main)


def test_post_right_after_a_body_delimited_by_close() -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        req = await up.read(reader, conn)
        assert req is not None
        if req.method == "POST":
            writer.write(answer(200, b"created"))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until eof")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            assert (await call(client, "GET", up.url())).content == b"body until eof"
            reply = await call(client, "POST", up.url(), b"{}")
            assert (reply.status, reply.content) == (200, b"created")
            await client.aclose()

    run(main)


def test_204_without_body_keeps_the_connection() -> None:
    def respond(up: Upstream, req: Req) -> bytes:
        if req.target == "/empty":
            return b"HTTP/1.1 204 No Content\r\nX-Note: nothing\r\n\r\n"
        return answer(200, b"after")

    async def main() -> None:
        async with Upstream(each(respond)) as up:
            client = build_client()
            empty = await call(client, "DELETE", up.url("/empty"))
            assert (empty.status, empty.content, empty.header(b"x-note")) == (204, b"", b"nothing")
            after = await call(client, "GET", up.url("/after"))
            assert (after.status, after.content) == (200, b"after")
            assert up.accepted == 1
            await client.aclose()

    run(main)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_truncated_body_is_an_error_not_a_short_body(framing: str) -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        await up.read(reader, conn)
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            with pytest.raises(httpx.ReadError) as caught:
                await call(client, "GET", up.url())
            assert not never_sent(caught.value)
            assert client.transport.idle_connections() == 0
            await client.aclose()

    run(main)


# ---- 3. request bodies ---------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, 1_000_000])
def test_post_bytes_body_arrives_intact(size: int) -> None:
    # every byte value, and what would end a head or a chunked body if it were misread as framing
    content = ((bytes(range(256)) + b"\r\n\r\n0\r\n\r\n") * (size // 265 + 1))[:size]

    async def main() -> None:
        async with Upstream(each(lambda up, req: answer(200, hashlib.sha256(req.body).hexdigest().encode()))) as up:
            client = build_client()
            reply = await call(client, "POST", up.url("/upload"), content,
                               [(b"content-type", b"application/octet-stream")])
            assert reply.content == hashlib.sha256(content).hexdigest().encode()
            (seen,) = up.requests
            assert seen.method == "POST"
            assert seen.headers["content-length"] == str(len(content))
            assert "transfer-encoding" not in seen.headers
            assert seen.headers["content-type"] == "application/octet-stream"
            assert seen.body == content
            # the connection is still in step: a second request on it is answered
            assert (await call(client, "GET", up.url())).status == 200
            assert up.accepted == 1
            await client.aclose()

    run(main)


# ---- 4. large, slow and endless answers --------------------------------------------------

BIG = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)  # 5 MiB


def big_body_handler(framing: str, piece: int = 64 * 1024, pause: float = 0.001) -> Handler:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while (req := await up.read(reader, conn)) is not None:
            if req.target == "/small":
                writer.write(answer(200, b"small"))
                await writer.drain()
            elif framing == "content-length":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG))
                await pieces(writer, BIG, piece, pause)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                await pieces(writer, chunked(BIG[at:at + piece] for at in range(0, len(BIG), piece)), piece, pause)

    return handler


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-eof"])
def test_an_answer_over_the_cap_is_an_error_and_its_connection_is_closed(framing: str) -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while (req := await up.read(reader, conn)) is not None:
            if req.target == "/small":
                writer.write(answer(200, b"small"))
                await writer.drain()
                continue
            if framing == "content-length":  # announced: refused from the head, before any of the body
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (300 * 1024 * 1024))
            elif framing == "chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            piece = b"x" * 65536
            for _ in range(10_000):  # 640 MiB if nobody stops reading
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
                await writer.drain()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client(max_connections=1, max_answer_bytes=1024 * 1024)
            started = time.monotonic()
            with pytest.raises(AnswerTooLarge) as caught:
                await call(client, "GET", up.url("/huge"))
            assert time.monotonic() - started < 2
            assert not never_sent(caught.value) and not timed_out(caught.value)
            await until(lambda: 1 in up.ended)  # the connection was closed, not left to drain
            # the only permit came back: the next call is answered, on a new connection
            assert (await call(client, "GET", up.url("/small"))).content == b"small"
            assert up.accepted == 2
            await client.aclose()

    run(main)


def test_an_answer_right_at_the_cap_is_read() -> None:
    async def main() -> None:
        async with Upstream(big_body_handler("chunked")) as up:
            client = build_client(max_answer_bytes=len(BIG))
            reply = await call(client, "GET", up.url("/big"))
            assert reply.content == BIG
            await client.aclose()

    run(main, limit=20.0)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_read_timeout_is_a_deadline_for_the_whole_answer(framing: str) -> None:
    """An upstream that sends one byte every 20 ms never goes quiet for a whole read timeout;
    it still fails after read_timeout, not after it has sent everything."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        if conn > 1:
            return await each(ok)(up, reader, writer, conn)
        await up.read(reader, conn)
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100_000):
            writer.write(b"1\r\nx\r\n" if framing == "chunked" else b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client(max_connections=1)
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout) as caught:
                await call(client, "GET", up.url(), timeouts={**TIMEOUT, "read": 0.3})
            assert 0.25 <= time.monotonic() - started < 1.0
            assert timed_out(caught.value)
            assert not never_sent(caught.value)
            assert client.transport.idle_connections() == 0
            # the dripping connection was dropped and its only permit freed: a new one answers
            assert (await call(client, "GET", up.url())).content == b"GET /"
            assert up.accepted == 2
            await client.aclose()

    run(main)


# ---- 5. errors -----------------------------------------------------------------------


def test_connection_refused_is_never_sent() -> None:
    async def main() -> None:
        client = build_client()
        with pytest.raises(httpx.ConnectError) as caught:
            await call(client, "POST", f"http://127.0.0.1:{free_port()}/x", b"{}")
        assert never_sent(caught.value)
        assert not timed_out(caught.value)
        await client.aclose()

    run(main)


def test_silent_server_read_timeout() -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        await up.read(reader, conn)
        await asyncio.sleep(30)

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout) as caught:
                await call(client, "POST", up.url(), b"{}", timeouts={**TIMEOUT, "read": 0.3})
            assert 0.25 <= time.monotonic() - started < 2
            assert timed_out(caught.value)
            assert not never_sent(caught.value)
            assert len(up.requests) == 1
            assert client.transport.idle_connections() == 0
            await client.aclose()

    run(main)


def test_server_closing_after_a_post_without_answering() -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        await up.read(reader, conn)
        writer.close()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            with pytest.raises(httpx.TransportError) as caught:
                await call(client, "POST", up.url(), b'{"a": 1}')
            assert isinstance(caught.value, httpx.ReadError | httpx.RemoteProtocolError)
            assert not never_sent(caught.value)
            assert not timed_out(caught.value)
            assert len(up.methods("POST")) == 1
            await client.aclose()

    run(main)


@pytest.mark.parametrize("garbage", [b"NOT HTTP\r\n\r\n", b"HTTP/1.1 2OO OK\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"],
                         ids=["not-http", "bad-status", "two-lengths"])
def test_garbage_response_is_a_protocol_error(garbage: bytes) -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        await up.read(reader, conn)
        writer.write(garbage)
        await writer.drain()
        await asyncio.sleep(1)

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await call(client, "GET", up.url())
            assert not never_sent(caught.value)
            assert client.transport.idle_connections() == 0
            await client.aclose()

    run(main)


def test_pool_timeout_is_never_sent() -> None:
    async def main() -> None:
        async with Upstream(each(ok, delay=0.5)) as up:
            client = build_client(max_connections=1)
            held = asyncio.ensure_future(call(client, "POST", up.url("/slow"), b"{}"))  # holds the only permit
            await until(lambda: len(up.requests) == 1)
            with pytest.raises(httpx.PoolTimeout) as caught:
                await call(client, "POST", up.url("/small"), b"{}", timeouts={**TIMEOUT, "pool": 0.1})
            assert never_sent(caught.value)
            assert timed_out(caught.value)
            assert (await held).content == b"POST /slow"
            assert [r.target for r in up.requests] == ["/slow"]
            await client.aclose()

    run(main)


def test_callers_waiting_for_a_permit_are_served_in_order_and_one_that_gives_up_takes_none() -> None:
    async def main() -> None:
        async with Upstream(each(ok, delay=0.05)) as up:
            client = build_client(max_connections=1)
            calls = [asyncio.ensure_future(call(client, "POST", up.url(f"/{n}"), b"{}")) for n in range(4)]
            await until(lambda: len(up.requests) == 1)
            calls[2].cancel()  # waiting in line: leaves it, and the permit it never had stays counted right
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(results[2], asyncio.CancelledError)
            assert [r.content for r in results if not isinstance(r, BaseException)] == [b"POST /0", b"POST /1",
                                                                                           b"POST /3"]
            assert [r.target for r in up.requests] == ["/0", "/1", "/3"]
            assert client.transport._busy == 0 and not client.transport._line
            assert (await call(client, "GET", up.url("/after"))).content == b"GET /after"
            await client.aclose()

    run(main)


# ---- 6. stale keep-alive connections ---------------------------------------------------


def test_idle_connection_closed_by_the_server_is_not_used() -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        req = await up.read(reader, conn)
        assert req is not None
        writer.write(answer(200, b"once", [("Connection", "keep-alive")]))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # an idle timeout on the upstream's side

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            assert (await call(client, "GET", up.url())).content == b"once"
            await until(lambda: 1 in up.ended)
            await asyncio.sleep(0.05)
            assert (await call(client, "GET", up.url())).content == b"once"
            assert up.accepted == 2
            assert len(up.requests) == 2
            await client.aclose()

    run(main)


def dies_on_second_request(dying: set[int]) -> Handler:
    """Answers the first request of a connection; on connections in `dying` it reads the
    next request and closes without a byte: the race where an upstream's idle timeout
    fires just as a kept-alive connection is reused."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        served = 0
        while (req := await up.read(reader, conn)) is not None:
            if served and conn in dying:
                writer.close()
                return
            served += 1
            writer.write(answer(200, f"{req.method} on {conn}".encode()))
            await writer.drain()

    return handler


def test_get_on_a_connection_dropped_at_reuse_is_retried_once() -> None:
    async def main() -> None:
        async with Upstream(dies_on_second_request({1})) as up:
            client = build_client()
            assert (await call(client, "GET", up.url())).content == b"GET on 1"
            reply = await call(client, "GET", up.url())
            assert (reply.status, reply.content) == (200, b"GET on 2")
            assert [r.conn for r in up.methods("GET")] == [1, 1, 2]
            await client.aclose()

    run(main)


def test_get_is_retried_only_once() -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        req = await up.read(reader, conn)
        if conn == 1:
            assert req is not None
            writer.write(answer(200, b"first"))
            await writer.drain()
            await up.read(reader, conn)
        writer.close()  # every later request: read, then dropped unanswered

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            assert (await call(client, "GET", up.url())).content == b"first"
            with pytest.raises(httpx.TransportError) as caught:
                await call(client, "GET", up.url())
            assert not never_sent(caught.value)
            assert [r.conn for r in up.methods("GET")] == [1, 1, 2]  # one retry, on a fresh connection
            assert up.accepted == 2
            await client.aclose()

    run(main)


def test_post_on_a_connection_dropped_at_reuse_is_never_retried() -> None:
    async def main() -> None:
        async with Upstream(dies_on_second_request({1, 2, 3})) as up:
            client = build_client()
            assert (await call(client, "GET", up.url())).content == b"GET on 1"
            with pytest.raises(httpx.TransportError) as caught:
                await call(client, "POST", up.url(), b'{"prompt": "a cat"}')
            assert not never_sent(caught.value)
            assert not timed_out(caught.value)
            await asyncio.sleep(0.1)
            assert len(up.methods("POST")) == 1
            assert up.methods("POST")[0].body == b'{"prompt": "a cat"}'
            assert up.accepted == 1
            await client.aclose()

    run(main)


# ---- 7. the pool's limit -----------------------------------------------------------------


async def five_at_once(client: UpstreamClient, up: Upstream) -> list[Reply | BaseException]:
    return await asyncio.gather(*(call(client, "POST", up.url(f"/{i}"), b"{}") for i in range(5)),
                                return_exceptions=True)


def test_pool_limit_caps_open_connections_without_keepalive() -> None:
    def respond(up: Upstream, req: Req) -> bytes:
        return answer(200, req.target.encode(), [("Connection", "close")])

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        req = await up.read(reader, conn)
        assert req is not None
        await asyncio.sleep(0.2)
        writer.write(respond(up, req))
        await writer.drain()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client(max_connections=2)
            started = time.monotonic()
            replies = await five_at_once(client, up)
            assert [r.content for r in replies if isinstance(r, Reply)] == [b"/%d" % i for i in range(5)]
            assert up.peak == 2
            assert up.accepted == 5
            assert time.monotonic() - started >= 0.55  # three rounds of 0.2 s
            await client.aclose()

    run(main)


def test_pool_limit_with_keepalive_all_five_succeed() -> None:
    async def main() -> None:
        async with Upstream(each(lambda up, req: answer(200, req.target.encode()), delay=0.2)) as up:
            client = build_client(max_connections=2)
            replies = await five_at_once(client, up)
            assert up.peak <= 2
            assert [r.content if isinstance(r, Reply) else repr(r) for r in replies] == \
                [b"/%d" % i for i in range(5)]
            await client.aclose()

    run(main)


def test_idle_connection_to_one_upstream_does_not_block_another() -> None:
    async def main() -> None:
        async with Upstream(each(ok)) as one, Upstream(each(ok)) as two:
            client = build_client(max_connections=1)
            assert (await call(client, "GET", one.url("/one"))).content == b"GET /one"
            assert (await call(client, "GET", two.url("/two"))).content == b"GET /two"
            await client.aclose()

    run(main)


# ---- 8. interim answers ----------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_100_continue_then_the_real_answer(split: bool) -> None:
    interim = b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n"
    final = answer(200, b'{"id": "task-1"}', [("Content-Type", "application/json")])

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while await up.read(reader, conn) is not None:
            writer.write(interim)
            if split:
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(final)
            await writer.drain()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            for _ in range(2):
                reply = await call(client, "POST", up.url(), b"{}")
                assert reply.status == 200
                assert reply.content == b'{"id": "task-1"}'
                assert reply.header(b"content-type") == b"application/json"
                assert reply.header(b"x-interim") is None
            assert up.accepted == 1
            await client.aclose()

    run(main)


# ---- 9. TLS --------------------------------------------------------------------------------


def test_tls_with_the_test_ca(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with Upstream(each(ok), ssl_context=server_ctx) as up:
            client = build_client(verify=client_ctx)
            for path in ("/a", "/b"):
                reply = await call(client, "GET", up.url(path, host="localhost"))
                assert (reply.status, reply.content) == (200, f"GET {path}".encode())
            assert up.accepted == 1  # keep-alive over TLS
            reply = await call(client, "POST", up.url("/ip"), b"x" * 100_000)
            assert reply.content == b"POST /ip"
            assert up.requests[-1].body == b"x" * 100_000
            assert up.accepted == 2  # another origin (127.0.0.1): its own connection
            await client.aclose()

    run(main)


def test_tls_large_bodies_and_bodies_ended_by_close(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    body = b"tls until eof " * 20_000

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        req = await up.read(reader, conn)
        while req is not None and req.target == "/big":  # kept alive
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG))
            await pieces(writer, BIG, 256 * 1024, 0)
            req = await up.read(reader, conn)
        if req is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        await pieces(writer, body, 50_000)
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        async with Upstream(handler, ssl_context=server_ctx) as up:
            client = build_client(verify=client_ctx)
            assert (await call(client, "GET", up.url("/eof"))).content == body
            for _ in range(2):
                assert (await call(client, "GET", up.url("/big"))).content == BIG
            assert up.accepted == 2
            await client.aclose()

    run(main, limit=20.0)


def test_tls_with_system_cas_rejects_the_test_cert(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = tls

    async def main() -> None:
        async with Upstream(each(ok), ssl_context=server_ctx) as up:
            client = build_client()
            with pytest.raises(httpx.ConnectError) as caught:
                await call(client, "GET", up.url(host="localhost"))
            assert never_sent(caught.value)
            assert not timed_out(caught.value)
            assert up.requests == []
            await client.aclose()
            unverified = build_client(verify=False)
            assert (await call(unverified, "GET", up.url())).status == 200
            await unverified.aclose()

    run(main)


# ---- 10. no cookies, no HEAD -----------------------------------------------------------------


def test_cookies_an_answer_sets_never_ride_along_on_later_calls() -> None:
    def respond(up: Upstream, req: Req) -> bytes:
        return answer(200, b"hi " + req.body, [("Set-Cookie", "session=abc123; Path=/"), ("Set-Cookie", "x=1")])

    async def main() -> None:
        async with Upstream(each(respond)) as up:
            client = build_client()
            first = await call(client, "GET", up.url("/first"))
            assert [v for k, v in first.headers if k.lower() == b"set-cookie"] == [b"session=abc123; Path=/", b"x=1"]
            assert (await call(client, "POST", up.url("/second"), b'{"k":"v"}')).content == b'hi {"k":"v"}'
            assert [r.target for r in up.requests] == ["/first", "/second"]
            assert all("cookie" not in r.headers for r in up.requests)
            await client.aclose()

    run(main)


def test_fetch_refuses_head() -> None:
    async def main() -> None:
        client = build_client()
        with pytest.raises(ValueError):  # its answer's length would be taken for a body to wait for
            await call(client, "HEAD", "http://127.0.0.1:9/")
        await client.aclose()

    run(main)


# ---- 11. fetch: the providers' path, and HTTPUpstream's prepared heads ----------------


def raw_head(method: str, url: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> tuple[Any, bytes]:
    parsed = httpx.URL(url)
    return origin_of(parsed), head_of(method, parsed, [(b"host", parsed.netloc), *headers])


def test_fetch_get_and_post_over_one_connection() -> None:
    async def main() -> None:
        async with Upstream(each(lambda up, req: answer(201, req.body or b"empty", [("Retry-After", "3")]))) as up:
            client = build_client()
            origin, head = raw_head("GET", up.url("/poll?id=7"), [(b"authorization", b"Bearer k")])
            first = await client.transport.fetch(origin, "GET", head + b"\r\n", b"", TIMEOUT)
            origin, head = raw_head("POST", up.url("/submit"))
            second = await client.transport.fetch(origin, "POST", head + b"content-length: 2\r\n\r\n", b"{}",
                                                  TIMEOUT)
            assert (first.status, first.content, first.header(b"retry-after")) == (201, b"empty", b"3")
            assert (second.status, second.content) == (201, b"{}")
            assert [(r.method, r.target, r.conn) for r in up.requests] == [("GET", "/poll?id=7", 1),
                                                                          ("POST", "/submit", 1)]
            assert up.requests[0].headers["authorization"] == "Bearer k"
            assert up.requests[0].headers["host"] == f"127.0.0.1:{up.port}"
            assert client.transport.idle_connections() == 1
            await client.aclose()

    run(main)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_fetch_reads_a_large_slow_body_whole(framing: str) -> None:
    async def main() -> None:
        async with Upstream(big_body_handler(framing)) as up:
            client = build_client(max_connections=1)
            origin, head = raw_head("GET", up.url("/big"))
            reply = await client.transport.fetch(origin, "GET", head + b"\r\n", b"", TIMEOUT)
            assert hashlib.sha256(reply.content).digest() == hashlib.sha256(BIG).digest()
            origin, head = raw_head("GET", up.url("/small"))
            assert (await client.transport.fetch(origin, "GET", head + b"\r\n", b"", TIMEOUT)).content == b"small"
            assert up.accepted == 1  # the connection (and the one permit) came back
            await client.aclose()

    run(main, limit=20.0)


def test_fetch_decodes_a_gzip_body() -> None:
    packed = gzip.compress(b'{"state": "running"}')

    async def main() -> None:
        async with Upstream(each(lambda up, req: answer(200, packed, [("Content-Encoding", "gzip")]))) as up:
            client = build_client()
            origin, head = raw_head("GET", up.url())
            reply = await client.transport.fetch(origin, "GET", head + b"\r\n", b"", TIMEOUT)
            assert reply.content == b'{"state": "running"}'
            await client.aclose()

    run(main)


def test_fetch_timeout_and_a_broken_body_give_the_permit_back() -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while (req := await up.read(reader, conn)) is not None:
            if req.target == "/silent":
                await asyncio.sleep(10)
            elif req.target == "/cut":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70000)
                await writer.drain()
                await asyncio.sleep(0.05)
                return  # the connection ends 30,000 bytes short
            else:
                writer.write(answer(200, b"fine"))
                await writer.drain()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client(max_connections=1)
            timeouts = {**TIMEOUT, "read": 0.2}
            origin, head = raw_head("GET", up.url("/silent"))
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.transport.fetch(origin, "GET", head + b"\r\n", b"", timeouts)
            assert timed_out(caught.value) and not never_sent(caught.value)
            origin, head = raw_head("POST", up.url("/cut"))
            with pytest.raises(httpx.ReadError):
                await client.transport.fetch(origin, "POST", head + b"content-length: 0\r\n\r\n", b"", timeouts)
            origin, head = raw_head("GET", up.url("/fine"))
            reply = await client.transport.fetch(origin, "GET", head + b"\r\n", b"", timeouts)
            assert reply.content == b"fine"
            await client.aclose()

    run(main)


def test_http_upstream_sends_the_same_prepared_head_for_repeated_polls() -> None:
    async def main() -> None:
        async with Upstream(each(lambda up, req: answer(200, b'{"ok": true}'))) as up:
            client = build_client()
            upstream = HTTPUpstream("demo", up.url("/api/v1"), client, connect_timeout=1.0, read_timeout=1.0)
            for key in ("k1", "k1", "k2"):
                reply = await upstream.send("GET", "task.php", headers={"authorization": f"Bearer {key}"},
                                            params={"task_id": "42"})
                assert (reply.status, reply.body) == (200, {"ok": True})
            reply = await upstream.send("POST", "image.php", json={"prompt": "猫"})
            assert reply.body == {"ok": True}
            polls = up.methods("GET")
            assert [r.target for r in polls] == ["/api/v1/task.php?task_id=42"] * 3
            assert [r.headers["authorization"] for r in polls] == ["Bearer k1", "Bearer k1", "Bearer k2"]
            post = up.methods("POST")[0]
            assert post.body == '{"prompt":"猫"}'.encode()
            assert (post.headers["content-type"], post.headers["content-length"]) == \
                ("application/json", str(len(post.body)))
            assert "content-length" not in polls[0].headers
            await client.aclose()

    run(main)


# ---- 12. GETs asked for together go out pipelined ---------------------------------------


async def fetch_get(client: UpstreamClient, url: str, timeouts: dict[str, float] = TIMEOUT) -> Any:
    origin, head = raw_head("GET", url)
    return await client.transport.fetch(origin, "GET", head + b"\r\n", b"", timeouts)


def test_gets_asked_together_share_one_connection_and_each_gets_its_own_answer() -> None:
    async def main() -> None:
        async with Upstream(each(ok)) as up:
            client = build_client()
            replies = await asyncio.gather(*(fetch_get(client, up.url(f"/task?id={n}")) for n in range(40)))
            assert [r.content for r in replies] == [f"GET /task?id={n}".encode() for n in range(40)]
            # 16 per write and connection: 40 GETs on 3 connections, not 40
            assert up.accepted == 3
            assert sorted(Counter(r.conn for r in up.requests).values()) == [8, 16, 16]
            replies = await asyncio.gather(*(fetch_get(client, up.url(f"/again?id={n}")) for n in range(5)))
            assert [r.content for r in replies] == [f"GET /again?id={n}".encode() for n in range(5)]
            assert up.accepted == 3  # kept alive and used again
            await client.aclose()

    run(main)


def test_a_pipeline_answered_with_connection_close_midway_is_finished_one_by_one() -> None:
    """Like a server's keep-alive request limit: it says close after two answers."""

    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        served = 0
        while (req := await up.read(reader, conn)) is not None:
            served += 1
            last = served == 2
            writer.write(answer(200, f"{req.target} on {conn}".encode(), [("Connection", "close")] if last else []))
            await writer.drain()
            if last:
                return

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            replies = await asyncio.gather(*(fetch_get(client, up.url(f"/t{n}")) for n in range(5)))
            assert [r.content.split(b" on ")[0] for r in replies] == [f"/t{n}".encode() for n in range(5)]
            assert all(r.status == 200 for r in replies)
            assert [r.conn for r in up.requests[:2]] == [1, 1]  # the first two went together
            # a server that says so is not one that cannot pipeline: GETs still go together
            assert not client.transport._unpipelined
            replies = await asyncio.gather(*(fetch_get(client, up.url(f"/u{n}")) for n in range(2)))
            assert [r.content.split(b" on ")[0] for r in replies] == [b"/u0", b"/u1"]
            await client.aclose()

    run(main)


def test_an_upstream_that_drops_pipelined_requests_gets_them_one_at_a_time() -> None:
    """It answers the first request of a connection and closes without a word: every caller
    still gets its own answer, and later GETs to it are no longer pipelined."""

    async def main() -> None:
        async with Upstream(once(lambda up, req: answer(200, req.target.encode()))) as up:
            client = build_client()
            replies = await asyncio.gather(*(fetch_get(client, up.url(f"/t{n}")) for n in range(4)))
            assert [r.content for r in replies] == [f"/t{n}".encode() for n in range(4)]
            before = up.accepted
            replies = await asyncio.gather(*(fetch_get(client, up.url(f"/u{n}")) for n in range(3)))
            assert [r.content for r in replies] == [f"/u{n}".encode() for n in range(3)]
            later = [r for r in up.requests if r.target.startswith("/u")]
            assert up.accepted - before == 3 and len({r.conn for r in later}) == 3  # one each, none lost
            assert len(client.transport._unpipelined) == 1
            await client.aclose()

    run(main)


def test_a_silent_pipeline_times_out_and_the_connection_is_not_reused() -> None:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while (req := await up.read(reader, conn)) is not None:
            if req.target.startswith("/slow"):
                await asyncio.sleep(10)
            writer.write(answer(200, req.target.encode()))
            await writer.drain()

    async def main() -> None:
        async with Upstream(handler) as up:
            client = build_client()
            timeouts = {**TIMEOUT, "read": 0.3}
            started = time.monotonic()
            results = await asyncio.gather(*(fetch_get(client, up.url(f"/slow{n}"), timeouts) for n in range(3)),
                                           return_exceptions=True)
            assert all(isinstance(r, httpx.ReadTimeout) for r in results), results
            assert time.monotonic() - started < 2.0  # each waited about one read timeout, not forever
            reply = await fetch_get(client, up.url("/fast"), timeouts)
            assert reply.content == b"/fast"
            assert up.requests[-1].conn != up.requests[0].conn  # a fresh connection, not the stuck one
            await client.aclose()

    run(main)


def test_pipelined_answers_of_every_framing_and_a_caller_that_gives_up() -> None:
    packed = gzip.compress(b"unpacked")

    def respond(up: Upstream, req: Req) -> bytes:
        if req.target == "/gzip":
            return answer(200, packed, [("Content-Encoding", "gzip")])
        if req.target == "/chunked":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked([b"a", b"bc"])
        if req.target == "/empty":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return answer(404, b"missing", reason="Not Found")

    async def main() -> None:
        async with Upstream(each(respond, delay=0.02)) as up:
            client = build_client()
            calls = [asyncio.ensure_future(fetch_get(client, up.url(path)))
                     for path in ("/gzip", "/gone", "/chunked", "/empty", "/nope")]
            await asyncio.sleep(0.01)
            calls[1].cancel()  # its answer still arrives and is passed over
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(results[1], asyncio.CancelledError)
            assert (results[0].status, results[0].content) == (200, b"unpacked")
            assert (results[2].status, results[2].content) == (200, b"abc")
            assert (results[3].status, results[3].content) == (204, b"")
            assert (results[4].status, results[4].content) == (404, b"missing")
            assert up.accepted == 1
            assert (await fetch_get(client, up.url("/chunked"))).content == b"abc"
            assert up.accepted == 1
            await client.aclose()

    run(main)


def test_an_upstream_that_closes_after_every_answer_gets_its_gets_one_at_a_time() -> None:
    async def main() -> None:
        async with Upstream(once(lambda up, req: answer(200, req.target.encode(), [("Connection", "close")]))) as up:
            client = build_client()
            replies = await asyncio.gather(*(fetch_get(client, up.url(f"/t{n}")) for n in range(4)))
            assert [r.content for r in replies] == [f"/t{n}".encode() for n in range(4)]
            assert len(client.transport._unpipelined) == 1  # no request is sent twice from now on
            sent = len(up.requests)
            replies = await asyncio.gather(*(fetch_get(client, up.url(f"/u{n}")) for n in range(4)))
            assert [r.content for r in replies] == [f"/u{n}".encode() for n in range(4)]
            assert len(up.requests) - sent == 4
            await client.aclose()

    run(main)
