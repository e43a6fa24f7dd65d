"""uvicorn's httptools protocol with the limits a server open to any client needs.

- A request head (request line and headers) larger than `max_head_bytes` gets 431 and the
  connection is closed: httptools buffers a header whole before it hands it over, so an
  unbounded one costs memory and event-loop time (a 128 MB header: 6 s, 486 MB). A head
  pipelined behind another request may pass the cap by less than HEAD_PIECE; if that request
  is still being answered, the connection is closed without a 431.
- A head must arrive complete within `header_timeout` of the connection opening, or of its
  first byte on a kept-alive connection (uvicorn's keep-alive timeout covers the silence
  between requests). A deadline, not an idle timer: one byte a second does not extend it.
- A request's body must arrive whole within `body_timeout` of its head, or it gets 408 (if no
  answer has started) and the connection is closed: otherwise a body that never ends holds its
  connection, a request in flight the cap cannot close, for ever. The same one timer a
  connection has for its head, so a connection costs no more.
- A request whose body never arrived whole is marked in its scope's state (BODY_CUT: why), so
  the access log and metrics say its status (408, 400) and why, not the 500 the framework
  answers into the void.
- At most `max_connections` connections are open, below the process's open-file limit: past
  it, the connection idle longest (no request in flight: silent, mid-head or kept alive) is
  closed for the new one, so a flood of idle connections cannot lock everyone out; only
  when every connection carries a request in flight is the new one closed at once. One answered
  with an error and lingering before it closes (431, 408, ...) counts as idle.
"""

from __future__ import annotations

import asyncio
import http
import resource
import weakref
from dataclasses import dataclass
from typing import Any

import msgspec
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.openai.types import ErrorBody, ErrorResponse

MAX_HEAD_BYTES = 64 * 1024
HEAD_PIECE = 16 * 1024
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
# The scope's state key that says why a request's body never arrived whole: (status, error code)
BODY_CUT = "body_cut"
# Seconds a connection refused with an answer is still read (and what comes dropped) before it
# is closed: closing a socket with unread input resets it, and the client would lose the answer.
LINGER = 2.0
# Open files kept for everything but client connections: the upstream pool (build_client's
# max_connections), the connections one accept burst takes before any is seen (the listen
# backlog), and the store, logs, Redis, PostgreSQL and DNS.
UPSTREAM_CONNECTIONS = 1000
OTHER_FILES = 128


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_head_bytes: int = MAX_HEAD_BYTES


def open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one, as Go's runtime does at start: the usual
    soft default, 1024, is less than a proxy's upstream pool alone may hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # a system cap below the hard limit (macOS): the soft limit stays


def default_max_connections(backlog: int) -> int:
    limit = open_file_limit()
    return max(limit - (UPSTREAM_CONNECTIONS + backlog + OTHER_FILES), limit // 2)


def connection_limits(max_connections: int | None = None, header_timeout: float = HEADER_TIMEOUT,
                      backlog: int = 2048, body_timeout: float = BODY_TIMEOUT) -> ConnectionLimits:
    return ConnectionLimits(max_connections=max_connections or default_max_connections(backlog),
                            header_timeout=header_timeout, body_timeout=body_timeout)


class LimitedConfig(Config):
    """uvicorn's Config with the limits: picklable, so `--workers` processes get them too."""

    def __init__(self, app: Any, *, limits: ConnectionLimits | None = None, **options: Any) -> None:
        options.setdefault("http", LimitedHttpToolsProtocol)
        options.setdefault("ws", "none")  # the proxy serves no WebSocket, and no upgrade escapes the limits
        super().__init__(app, **options)
        self.limits = limits or connection_limits(backlog=self.backlog)


def answer(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 answer in OpenAI's error shape that closes the connection."""
    body = msgspec.json.encode(ErrorResponse(error=ErrorBody(message=message, type="invalid_request_error",
                                                             param=None, code=code)))
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class _Connections:
    """What the protocols of one server share."""

    __slots__ = ("closing", "idle")

    def __init__(self) -> None:
        # connections without a request in flight, idle longest first (dicts keep insertion order)
        self.idle: dict[LimitedHttpToolsProtocol, None] = {}
        self.closing = 0  # closed to make room, not yet gone


_SHARED: weakref.WeakKeyDictionary[ServerState, _Connections] = weakref.WeakKeyDictionary()


class _Guard:
    """One connection's limits and reading state, in one slotted attribute of its protocol:
    uvicorn's protocol already has 27 attributes, and past 30 CPython gives each instance a
    dict of its own, not one sharing its keys (1.3 KB more a connection; bench/README.md)."""

    __slots__ = ("evicted", "head_bytes", "limits", "reading_head", "refused", "shared", "timer")

    def __init__(self, limits: ConnectionLimits, shared: _Connections) -> None:
        self.limits = limits
        self.shared = shared
        self.reading_head = True  # no complete head since the last request (or ever)
        self.head_bytes = 0
        # the deadline of the head being read or, once it is in, of its body
        self.timer: asyncio.TimerHandle | None = None
        self.refused = False  # answered (or dropped) and closing: input is read and dropped
        self.evicted = False


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        shared = _SHARED.get(server_state)
        if shared is None:
            shared = _SHARED[server_state] = _Connections()
        self.guard = _Guard(getattr(config, "limits", None) or connection_limits(backlog=config.backlog), shared)

    # ---- the connection cap ----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        shared = guard.shared
        if len(self.connections) - shared.closing > guard.limits.max_connections and not self._make_room():
            guard.refused = True
            transport.close()  # every connection carries a request: this one cannot be served now
            return
        shared.idle[self] = None
        guard.timer = self.loop.call_later(guard.limits.header_timeout, self._timed_out)

    def _make_room(self) -> bool:
        """Close the connection idle longest; False when none is idle."""
        shared = self.guard.shared
        victim = next(iter(shared.idle), None)
        if victim is None:
            return False
        del shared.idle[victim]
        victim.guard.evicted = True
        shared.closing += 1
        victim.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        guard = self.guard
        guard.shared.idle.pop(self, None)
        self._stop_timer()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_started and not cycle.disconnected:
            cycle.scope["state"][BODY_CUT] = (408, "client_disconnected")  # gone before its body was in
        if guard.evicted:
            guard.evicted = False
            guard.shared.closing -= 1
        super().connection_lost(exc)

    # ---- heads: size and time --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # While a head is read, the parser gets it at most HEAD_PIECE bytes at a time, never past
        # the cap: a request ending inside a piece starts the next head's count there, which is
        # then short by less than a piece (the next head is pipelined behind it).
        guard = self.guard
        while not guard.refused:
            if not guard.reading_head:
                super().data_received(data)
                break
            room = guard.limits.max_head_bytes - guard.head_bytes
            if room <= 0:
                self._refuse(431, f"The request head (request line and headers) is larger than the "
                                  f"{guard.limits.max_head_bytes} bytes this proxy accepts.",
                             "request_header_fields_too_large")
                return
            cut = min(room, HEAD_PIECE)
            piece, data = data[:cut], data[cut:]
            guard.head_bytes += len(piece)
            super().data_received(piece)
            if not data:
                break
        if guard.timer is not None or guard.refused:
            return
        if guard.reading_head:
            if guard.head_bytes and not self.transport.is_closing():
                guard.timer = self.loop.call_later(guard.limits.header_timeout, self._timed_out)
        elif self.cycle.more_body and not self.transport.is_closing():
            # a head in, its body not whole: started here, so a request read whole in one go sets none
            guard.timer = self.loop.call_later(guard.limits.body_timeout, self._timed_out)

    def on_headers_complete(self) -> None:
        guard = self.guard
        guard.reading_head = False
        self._stop_timer()
        guard.shared.idle.pop(self, None)  # a request in flight
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        guard = self.guard
        guard.reading_head, guard.head_bytes = True, 0  # what comes next is the next request's head
        self._stop_timer()  # its body's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline and self.cycle.response_complete:
            self.guard.shared.idle[self] = None  # kept alive, waiting for the next request

    def _stop_timer(self) -> None:
        guard = self.guard
        if guard.timer is not None:
            guard.timer.cancel()
            guard.timer = None

    def _timed_out(self) -> None:
        guard = self.guard
        guard.timer = None
        if self.transport.is_closing() or guard.refused:
            return
        if guard.reading_head:
            self.transport.close()
            return
        if self.pipeline:  # queued behind a request being answered, its input paused: not its fault yet
            guard.timer = self.loop.call_later(guard.limits.body_timeout, self._timed_out)
            return
        if self.cycle.response_complete:  # answered without its body (a 401, a 404): nothing more to say
            guard.refused = True
            self.transport.close()
            return
        self._cut_body(408, "request_timeout")
        self._refuse(408, f"The request body did not arrive within {guard.limits.body_timeout:g} seconds.",
                     "request_timeout")

    def _cut_body(self, status: int, code: str) -> None:
        """The request under way never gets its body whole: the app, waiting for it, gets a
        disconnect and its answer goes nowhere, so ours can be sent (unless it answered already)."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.response_started or cycle.disconnected:
            return
        cycle.scope["state"][BODY_CUT] = (status, code)
        cycle.disconnected = True
        cycle.message_event.set()

    # ---- answering and closing ---------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what httptools cannot parse, in OpenAI's shape: a head, or a body's
        framing (chunk sizes) while the app waits for the body."""
        self._cut_body(400, "invalid_http_request")
        self._refuse(400, "The proxy could not parse this HTTP request.", "invalid_http_request")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer (unless another answer is being written on this connection) and close."""
        self.guard.refused = True
        self._stop_timer()
        transport = self.transport
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.disconnected:
            transport.close()  # an answer in progress: a second one would garble it
            return
        transport.write(answer(status, message, code))
        if transport.can_write_eof():
            transport.write_eof()  # the answer, then our end of the stream; the client's end closes it
        self.guard.shared.idle[self] = None  # answered, no request in flight: the cap may close it for a new one
        self.loop.call_later(LINGER, transport.close)
