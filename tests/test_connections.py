"""Connection attacks on raw sockets (issue 18, item 7): a huge request head gets 431 without
the memory or the event loop paying for it; heads that never complete are closed after
`header_timeout`; past `max_connections` the connections idle longest make room; a process at
its open-file limit still answers. `/healthz` answers on a fresh connection through all of it."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLIENT_KEY, XFFUW_KEYS, RunningProxy, Sims
from helpers import logged_requests, wait_until
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.app import create_app
from proxy.config import parse_config
from proxy.http_server import MAX_HEAD_BYTES, ConnectionLimits, LimitedConfig, LimitedHttpToolsProtocol
from proxy.server import BackgroundServer

ROOT = Path(__file__).resolve().parent.parent
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
MB = 1 << 20


def open_raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_answer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def healthz_seconds(url: str) -> float:
    """Time for /healthz on a fresh connection to answer 200 (fails after 5 s)."""
    began = time.monotonic()
    with open_raw(url) as sock:
        sock.sendall(HEALTHZ)
        sock.settimeout(5)
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return time.monotonic() - began


def closed_by_server(socks: list[socket.socket], within: float) -> int:
    """How many of `socks` the server closes (EOF or reset) within `within` seconds."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    closed = 0
    deadline = time.monotonic() + within
    while selector.get_map() and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(timeout=left):
            try:
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            except ConnectionResetError:
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                closed += 1
    selector.close()
    return closed


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples this process's resident memory (the servers run in it) on a thread."""

    def __init__(self) -> None:
        self.base = resident_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


@pytest.fixture
def start_limited(proxy_config: dict[str, Any]) -> Iterator[Callable[[ConnectionLimits], BackgroundServer]]:
    started: list[BackgroundServer] = []

    def start(limits: ConnectionLimits) -> BackgroundServer:
        server = BackgroundServer(create_app(parse_config(proxy_config)), limits=limits).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ---- the size of a request head ------------------------------------------------------


def send_head_of(url: str, size: int, answers: list[bytes]) -> None:
    """A GET whose one header is `size` bytes, sent in 64 KiB pieces (so this process does not
    hold it); whatever the server answers goes to `answers`."""
    piece = b"a" * 65536
    with open_raw(url) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nX-Big: ")
            for _ in range(size // len(piece)):
                sock.sendall(piece)
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before taking it all
        answers.append(read_answer(sock))


def test_a_huge_request_head_gets_431_fast_without_memory_and_healthz_answers(proxy: RunningProxy) -> None:
    memory = PeakMemory()
    answers: list[bytes] = []
    began = time.monotonic()
    senders = [threading.Thread(target=send_head_of, args=(proxy.url, 32 << 20, answers)) for _ in range(4)]
    for sender in senders:
        sender.start()
    health = [healthz_seconds(proxy.url) for _ in range(5)]
    for sender in senders:
        sender.join(timeout=30)
    elapsed = time.monotonic() - began
    growth = memory.growth()
    assert len(answers) == 4
    for raw in answers:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), raw[:300]
        assert b"connection: close" in head
        error = json.loads(body)["error"]
        assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
        assert str(MAX_HEAD_BYTES) in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert elapsed < 5, elapsed  # four 32 MB heads, refused after their first 64 KiB
    assert max(health) < 1.0, health
    assert growth < 16 << 20, f"resident memory grew {growth / 2**20:.1f} MiB"


def test_a_huge_head_pipelined_behind_a_request_closes_the_connection(proxy: RunningProxy) -> None:
    with open_raw(proxy.url) as sock:
        try:
            sock.sendall(HEALTHZ + b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * MB + b"\r\n\r\n")
        except OSError:
            pass  # closed before it took it all
        answer = read_answer(sock, timeout=5)
    assert answer.count(b"HTTP/1.1 200") <= 1  # the first request's answer at most; never the second's
    assert b"431" in answer or answer.count(b"HTTP/1.1") <= 1


def test_a_head_just_under_the_cap_and_a_body_after_it_are_served(proxy: RunningProxy) -> None:
    filler = "b" * (MAX_HEAD_BYTES - 1024)
    reply = httpx.post(proxy.base_url + "/chat/completions", headers={"x-filler": filler},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi" * 40_000}]})
    assert reply.status_code == 401  # a head of 63 KiB and an 80 KB body: read whole, answered by the app
    assert reply.json()["error"]["code"] == "invalid_api_key"


def test_unparseable_requests_are_answered_in_openai_shape(proxy: RunningProxy,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with open_raw(proxy.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nBad Header Name: x\r\n\r\n")
        head, _, body = read_answer(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == "invalid_http_request"
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()]  # uvicorn's warning too: JSON
    assert any(e["event"] == "Invalid HTTP request received." and e["level"] == "warning" for e in logged), logged



@pytest.mark.parametrize("framing", [b"zz\r\n{}\r\n", b"1\r\n{}\r\n0\r\n\r\n", b"ffffffffffffffffffff\r\n"])
def test_a_body_whose_chunks_do_not_parse_is_answered_400_in_openai_shape(
        proxy: RunningProxy, capsys: pytest.CaptureFixture[str], framing: bytes) -> None:
    """The head parsed, the app waiting for the body: httptools' error in the chunk framing was
    a connection closed with no answer, logged as a 500."""
    with open_raw(proxy.url) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.1)  # the head alone first: the request is under way when the framing breaks
        sock.sendall(framing)
        head, _, body = read_answer(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == "invalid_http_request"
    [entry] = logged_requests(capsys, 1, "/v1/chat/completions")
    assert entry["status"] == 400 and entry["error_code"] == "invalid_http_request", entry

# ---- the time a request head may take ---------------------------------------------------


def trickle(sock: socket.socket, stop: threading.Event) -> None:
    """One byte of a head that never ends, every 0.1 s."""
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        while not stop.wait(0.1):
            sock.sendall(b"z")
    except OSError:
        pass


def test_heads_that_do_not_arrive_in_time_are_closed_and_healthz_answers(
        start_limited: Callable[[ConnectionLimits], BackgroundServer]) -> None:
    server = start_limited(ConnectionLimits(max_connections=10_000, header_timeout=1.0))
    silent = [open_raw(server.url) for _ in range(200)]
    # a kept-alive connection: one request answered, then a head that stops halfway
    kept = open_raw(server.url)
    kept.sendall(HEALTHZ)
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: pro")
    slow = open_raw(server.url)
    stop = threading.Event()
    threading.Thread(target=trickle, args=(slow, stop), daemon=True).start()
    began = time.monotonic()
    try:
        assert healthz_seconds(server.url) < 1.0
        assert closed_by_server([*silent, kept, slow], within=0.5) == 0  # not before their time
        assert healthz_seconds(server.url) < 1.0
        closed = closed_by_server([*silent, kept, slow], within=3.0)
    finally:
        stop.set()
    assert closed == 202, closed  # the silent ones, the half head and the one-byte-at-a-time one
    assert time.monotonic() - began < 3.5
    assert healthz_seconds(server.url) < 1.0


# ---- the time a request body may take -----------------------------------------------------


def stall_body(url: str) -> socket.socket:
    """A chat request whose head says 1000 bytes of body and whose body stops after one."""
    sock = open_raw(url)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{")
    return sock


def test_a_body_that_stalls_gets_408_within_body_timeout_and_is_logged_as_such(
        start_limited: Callable[[ConnectionLimits], BackgroundServer], capsys: pytest.CaptureFixture[str]) -> None:
    server = start_limited(ConnectionLimits(max_connections=10_000, body_timeout=1.0))
    began = time.monotonic()
    with stall_body(server.url) as sock:
        assert healthz_seconds(server.url) < 1.0
        assert closed_by_server([sock], within=0.5) == 0  # not before its time
        sock.setblocking(True)
        head, _, body = read_answer(sock, timeout=3).partition(b"\r\n\r\n")
    assert time.monotonic() - began < 2.0
    assert head.startswith(b"HTTP/1.1 408 Request Timeout"), head
    assert b"connection: close" in head
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error", error
    assert set(error) == {"message", "type", "param", "code"}
    assert healthz_seconds(server.url) < 1.0
    [entry] = logged_requests(capsys, 1, "/v1/chat/completions")
    assert entry["status"] == 408 and entry["error_code"] == "request_timeout", entry


def test_a_request_answered_before_its_body_gets_no_second_answer_when_the_body_stalls(
        start_limited: Callable[[ConnectionLimits], BackgroundServer]) -> None:
    server = start_limited(ConnectionLimits(max_connections=10_000, body_timeout=0.5))
    with open_raw(server.url) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer sk-no-such-key\r\nContent-Length: 1000\r\n\r\n{")
        answers = read_answer(sock, timeout=3)
    assert answers.startswith(b"HTTP/1.1 401"), answers
    assert answers.count(b"HTTP/1.1 ") == 1, answers  # no 408 after it at the body's deadline


def test_a_client_gone_mid_body_is_logged_as_such_not_as_an_internal_error(
        proxy: RunningProxy, capsys: pytest.CaptureFixture[str]) -> None:
    stall_body(proxy.url).close()
    [entry] = logged_requests(capsys, 1, "/v1/chat/completions")
    assert entry["status"] == 408 and entry["error_code"] == "client_disconnected", entry


def test_stalled_bodies_at_max_connections_lock_no_one_out_past_body_timeout(
        start_limited: Callable[[ConnectionLimits], BackgroundServer]) -> None:
    server = start_limited(ConnectionLimits(max_connections=20, body_timeout=1.0))
    stalled = []
    for _ in range(25):  # past the cap: the last ones are refused, every connection has a request in flight
        stalled.append(stall_body(server.url))
        time.sleep(0.01)
    wait_until(lambda: len(server.server.server_state.tasks) >= 20, what="20 requests in flight")
    began = time.monotonic()

    def healthz_answers() -> bool:
        try:
            return healthz_seconds(server.url) < 1.0
        except (OSError, AssertionError):
            return False  # reset: no room
    try:
        wait_until(healthz_answers, timeout=2.0, what="/healthz on a new connection")
    finally:
        for sock in stalled:
            sock.close()
    assert time.monotonic() - began < 1.5


# ---- the number of connections -----------------------------------------------------------


def test_past_max_connections_the_idle_longest_make_room(
        start_limited: Callable[[ConnectionLimits], BackgroundServer], sims: Sims) -> None:
    server = start_limited(ConnectionLimits(max_connections=50, header_timeout=30.0))
    sims.xffuw.faults.latency = 1.0
    busy_result: list[httpx.Response] = []
    busy = threading.Thread(target=lambda: busy_result.append(httpx.post(
        server.url + "/v1/chat/completions", timeout=10, headers={"authorization": f"Bearer {CLIENT_KEY}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})))
    busy.start()
    deadline = time.monotonic() + 5
    while not server.server.server_state.tasks:  # the chat's request is in: a request in flight
        assert time.monotonic() < deadline
        time.sleep(0.005)
    flood = [open_raw(server.url) for _ in range(150)]
    assert healthz_seconds(server.url) < 1.0
    closed = closed_by_server(flood, within=1.0)
    # 50 connections at most: the chat's, and the newest idle ones (the healthz one was among them)
    assert closed >= 150 - 49, closed
    busy.join(timeout=10)
    assert busy_result and busy_result[0].status_code == 200, busy_result  # never evicted: it was busy


def test_a_proxy_at_its_open_file_limit_still_answers(sims: Sims, tmp_path: Path) -> None:
    """`proxy serve` with 300 open files: the default connection cap lies below them."""
    from helpers import free_port, wait_healthy, write_config

    raw = {"clients": [{"name": "alice", "key": CLIENT_KEY}],
           "providers": {"xffuw": {"base_url": f"{sims.xffuw_url}/api/v1/", "keys": XFFUW_KEYS}},
           "storage": {"path": str(tmp_path / "proxy.sqlite3")}, "log": {"format": "json"}}
    port = free_port()
    files = 300

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(write_config(tmp_path, raw)),
                                "--port", str(port)], cwd=ROOT, preexec_fn=lower_limit,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    flood: list[socket.socket] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)
        flood = [open_raw(url) for _ in range(files + 100)]
        assert healthz_seconds(url) < 2.0
        assert process.poll() is None
    finally:
        for sock in flood:
            sock.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    assert "Traceback" not in (process.stderr.read() if process.stderr else "")



async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    pass


def test_the_limits_cost_a_connection_no_more_memory_than_uvicorns_own_protocol() -> None:
    # Past 30 attributes CPython gives each instance an unshared dict: 1.3 KB more a connection,
    # 13 MB with 10,000 waiting image requests.
    async def sizes() -> tuple[int, int]:
        config = LimitedConfig(_no_app)
        config.load()
        state = ServerState()
        plain = HttpToolsProtocol(config, state, {})
        limited = LimitedHttpToolsProtocol(config, state, {})
        return sys.getsizeof(vars(plain)), sys.getsizeof(vars(limited)) + sys.getsizeof(limited.guard)

    plain, limited = asyncio.run(sizes())
    assert limited <= plain + 128, (plain, limited)
