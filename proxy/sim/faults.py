"""Faults both simulators inject, and the few small pieces both of them share.

The fault layer wraps the whole Litestar ASGI handler (not a per-route middleware) so it
sees unknown paths too and receives uvicorn's own ``send``, through which it can reach the
socket and close it without answering: the one fault a framework cannot express.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Outcome = Literal["success", "fail", "never"]
Phase = Literal["pending", "running", "success", "failed"]

BAD_GATEWAY_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
UNAVAILABLE_HTML = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
    b"<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
# Cut mid-object on purpose: a 200 whose body is not JSON.
GARBAGE_JSON = b'{"code": 0, "data": {"status": "proc'


@dataclass
class Faults:
    """Fault switches, all off by default; tests flip them between requests.

    Rates are fractions 0..1 drawn from the owning sim's seeded ``rng``; they are
    exclusive and checked in the order drop, drop_after, error, garbage.
    """

    latency: float = 0.0  # seconds added before every answer, faulty or not
    error_rate: float = 0.0  # answered 500/502/503 with an nginx-style HTML body
    garbage_rate: float = 0.0  # answered 200 with a truncated JSON body
    drop_rate: float = 0.0  # connection closed before anything is sent (request not processed)
    drop_after_rate: float = 0.0  # request processed (charged, task made), then connection closed
    poll_fail_until: float = 0.0  # time.monotonic() deadline: the poll endpoint answers 503 until then
    down: bool = False  # every endpoint answers 503


class FaultHost(Protocol):
    """What the fault layer needs from a simulator state."""

    faults: Faults

    def draw(self) -> float: ...

    def is_poll_path(self, path: str) -> bool: ...

    def record_fault(self, scope: Scope, status: int) -> None: ...


def header(scope: Scope, name: str) -> str | None:
    """One request header from an ASGI scope (names compared lower-case)."""
    wanted = name.lower().encode("latin-1")
    for key, value in scope.get("headers", ()):
        if key.lower() == wanted:
            return bytes(value).decode("latin-1")
    return None


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class FaultMiddleware:
    """Applies ``host.faults`` around an ASGI app; reads the request body first, always."""

    def __init__(self, app: ASGIApp, host: FaultHost) -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        faults = self.host.faults
        if faults.latency > 0:
            await asyncio.sleep(faults.latency)
        path = str(scope.get("path", ""))
        if faults.down or (self.host.is_poll_path(path) and time.monotonic() < faults.poll_fail_until):
            self.host.record_fault(scope, 503)
            await _send_raw(send, 503, UNAVAILABLE_HTML, "text/html")
            return
        kind = self._pick(faults)
        if kind == "drop":
            self.host.record_fault(scope, 0)
            await _drop(send)
            return
        if kind == "error":
            status = (500, 502, 503)[int(self.host.draw() * 3) % 3]
            self.host.record_fault(scope, status)
            await _send_raw(send, status, BAD_GATEWAY_HTML, "text/html")
            return
        if kind == "garbage":
            self.host.record_fault(scope, 200)
            await _send_raw(send, 200, GARBAGE_JSON, "application/json")
            return
        replay = _replay(body, receive)
        if kind == "drop_after":
            # The app does all its work (charges, creates tasks); its answer is discarded.
            async def swallow(message: Message) -> None:
                return None

            await self.app(scope, replay, swallow)
            await _drop(send)
            return
        await self.app(scope, replay, send)

    def _pick(self, faults: Faults) -> str | None:
        rates = (
            ("drop", faults.drop_rate),
            ("drop_after", faults.drop_after_rate),
            ("error", faults.error_rate),
            ("garbage", faults.garbage_rate),
        )
        if not any(rate > 0 for _, rate in rates):
            return None  # leave the rng untouched so fault-free runs stay identical
        roll = self.host.draw()
        edge = 0.0
        for kind, rate in rates:
            edge += max(rate, 0.0)
            if roll < edge:
                return kind
        return None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message.get("type") != "http.request":
            break  # client went away; the app will see an empty body
        chunks.append(bytes(message.get("body", b"")))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for http.disconnect as usual

    return replay


async def _send_raw(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(body)).encode("latin-1")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _drop(send: Send) -> None:
    """Close the socket without a byte of response.

    uvicorn passes a bound method of its per-request cycle as ``send``; that cycle holds
    the transport. Closing it and letting ``connection_lost`` run marks the cycle
    disconnected, so uvicorn neither writes its own 500 nor logs an error. The client
    sees "server disconnected without sending a response".
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        # Unknown server: the nearest thing is a response cut after its head.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1000")],
            }
        )
        return
    transport.close()
    for _ in range(50):
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0.001)


# ---- pieces both simulators share -------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One answered request, for tests counting polls per key and proving rate limits."""

    endpoint: str
    key: str | None
    at: float  # time.monotonic()
    status: int  # HTTP status answered; 0 when the connection was dropped


class CallLog:
    """Mixin: ``calls`` plus counting."""

    calls: list[Call]

    def count(self, endpoint: str | None = None, key: str | None = None) -> int:
        return sum(
            1
            for call in list(self.calls)
            if (endpoint is None or call.endpoint == endpoint) and (key is None or call.key == key)
        )

    def _log(self, endpoint: str, key: str | None, status: int) -> None:
        self.calls.append(Call(endpoint, key, time.monotonic(), status))


@dataclass
class SlidingWindow:
    """Per-key sliding-window counter of accepted calls (refused calls do not count)."""

    hits: dict[str, deque[float]] = field(default_factory=dict)

    def admit(self, key: str, limit: int | None, window: float) -> float | None:
        """Count a call; None if admitted, else seconds until a slot frees up."""
        if limit is None:
            return None
        now = time.monotonic()
        hits = self.hits.setdefault(key, deque())
        while hits and hits[0] <= now - window:
            hits.popleft()
        if len(hits) >= limit:
            return max(hits[0] + window - now, 0.0) if hits else window
        hits.append(now)
        return None


def retry_after_header(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


@dataclass(frozen=True)
class Markers:
    """Prompt markers, case-insensitive, anywhere in the prompt."""

    fail: bool = False  # the task ends failed
    never: bool = False  # the task never ends
    delay: float | None = None  # [delay=2.5]: the task takes that long
    instant: bool = False  # finished at submit time
    blocked: bool = False  # refused by moderation at submit
    error: bool = False  # refused at submit with an upstream/AI-service error
    tool_calls: int | Literal["all"] | None = None  # [tools:2], [tools:all]: how many tools a chat answer calls
    no_tools: bool = False  # [no-tools]: a chat answer ignores the tools sent

    @property
    def outcome(self) -> Outcome:
        return "never" if self.never else "fail" if self.fail else "success"


_DELAY = re.compile(r"\[\s*delay\s*=\s*(\d+(?:\.\d*)?|\.\d+)\s*\]", re.IGNORECASE)
_NO_TOOLS = re.compile(r"\[\s*no-tools\s*\]", re.IGNORECASE)
_TOOLS = re.compile(r"\[\s*tools\s*:\s*(all|\d+)\s*\]", re.IGNORECASE)


def parse_markers(prompt: str) -> Markers:
    low = prompt.lower()
    match = _DELAY.search(prompt)
    tools = _TOOLS.search(prompt)
    return Markers(
        fail="[fail]" in low,
        never="[never]" in low,
        delay=float(match.group(1)) if match else None,
        instant="[instant]" in low,
        blocked="[blocked]" in low,
        error="[error]" in low,
        tool_calls=None if tools is None else "all" if tools[1].lower() == "all" else max(1, int(tools[1])),
        no_tools=_NO_TOOLS.search(prompt) is not None,
    )


def task_phase(created: float, duration: float, outcome: Outcome, now: float | None = None) -> tuple[Phase, float]:
    """State and progress (0..100) of a simulated task at ``now``.

    Pending for the first quarter, then running with progress proportional to elapsed
    time; ``never`` tasks creep towards 99 and stay there.
    """
    elapsed = max((time.monotonic() if now is None else now) - created, 0.0)
    if outcome == "never":
        if elapsed < 0.05:
            return "pending", 0.0
        return "running", min(99.0, 1.0 + 98.0 * (1.0 - math.exp(-elapsed / 20.0)))
    if elapsed >= duration:
        return ("success" if outcome == "success" else "failed"), 100.0
    if elapsed < duration * 0.25:
        return "pending", 0.0
    return "running", min(99.0, max(1.0, 100.0 * elapsed / duration))
