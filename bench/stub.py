"""A fast upstream for the benchmark, loopback only: xffuw's API and an OpenAI-compatible route,
raw asyncio, one write per response (bench/README.md, "What it sets up by itself"; its routes
are in `handle`). Times are time.monotonic(), the benchmark's clock too.

    python bench/stub.py --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from contextlib import suppress
from typing import Any
from urllib.parse import parse_qs

import uvloop

# One answer for every route, so direct, this proxy and LiteLLM do the same work.
CONTENT = ("Hello! I am the benchmark stub. This sentence stands in for a short model answer, "
           "long enough to be split into several streamed chunks by a proxy, and short enough "
           "to keep the wire cost of each request small and identical.")
MODEL, IMAGE_MODEL, STREAM_PIECE = "gpt-4o-mini", "gpt-image-2", 24
USAGE = {"prompt_tokens": 12, "completion_tokens": 48, "total_tokens": 60}  # fixed: nobody counts tokens
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _response(status: int, body: bytes, keep_alive: bool) -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: %s\r\n\r\n%s"
            % (status, REASONS.get(status, b"OK"), len(body), b"keep-alive" if keep_alive else b"close", body))


def _stream(keep_alive: bool) -> bytes:
    """An OpenAI chat stream, every event one chunk of a chunked body, all in one write."""
    def event(delta: dict[str, str], finish: str | None) -> bytes:
        return b"data: " + _json({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": CREATED,
                                  "model": MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                               "logprobs": None}]}) + b"\n\n"

    parts = [event({"role": "assistant", "content": ""}, None),
             *(event({"content": CONTENT[i:i + STREAM_PIECE]}, None) for i in range(0, len(CONTENT), STREAM_PIECE)),
             event({}, "stop"), b"data: [DONE]\n\n"]
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: "
            b"chunked\r\nconnection: %s\r\n\r\n" % (b"keep-alive" if keep_alive else b"close")
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n")


CREATED = int(time.time())
STATIC = {  # path -> body of the routes that always answer the same
    "/api/v1/chat.php": _json({"choices": [{"message": {"content": CONTENT}}]}),
    "/v1/chat/completions": _json({
        "id": "chatcmpl-stub", "object": "chat.completion", "created": CREATED, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT, "refusal": None},
                     "finish_reason": "stop", "logprobs": None}], "usage": USAGE, "system_fingerprint": None}),
    "/api/v1/models.php": _json({"data": [
        {"slug": MODEL, "name": "GPT-4o Mini", "type": "chat", "price": "0.5000", "description": "stub"},
        {"slug": IMAGE_MODEL, "name": "GPT Image 2", "type": "image", "price": "2.0000", "description": "stub"}]}),
    "/v1/models": _json({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1700000000,
                                                     "owned_by": "stub"}]}),
    "/health": b'{"status":"ok"}', "/healthz": b'{"status":"ok"}',
}
CANNED = {(path, keep): _response(200, body, keep) for path, body in STATIC.items() for keep in (True, False)}
STREAM = {keep: _stream(keep) for keep in (True, False)}


class Tasks:
    """xffuw image tasks: when each was created, became final and was polled."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, hold: bool = False, base: float = 2.0, spread: float = 4.0, steps: int = 1000) -> None:
        self.hold, self.base, self.spread, self.steps = hold, base, spread, max(1, steps)
        self.created: dict[int, float] = {}
        self.final_at: dict[int, float] = {}
        self.polls: dict[int, list[float]] = {}
        self.polls_per_second: dict[int, int] = {}
        self.next_id = self.poll_count = self.submits = 0
        self.released_at: float | None = None
        self.after = 0.0

    def _offset(self, n: int) -> float:
        # a hash of N, not N: final times must not follow submit order, or every task would meet
        # the same phase of its polling cycle
        return ((n * 2654435761) % 2**32 % self.steps) / self.steps * self.spread

    def submit(self) -> int:
        self.next_id = self.submits = self.next_id + 1
        n, now = self.next_id, time.monotonic()
        self.created[n], self.polls[n] = now, []
        if not self.hold:
            self.final_at[n] = now + self.base + self._offset(n)
        elif self.released_at is not None:
            self.final_at[n] = max(now, self.released_at + self.after) + self._offset(n)
        return n

    def release(self, after: float, spread: float, steps: int) -> float:
        now = time.monotonic()
        self.released_at, self.after, self.spread, self.steps = now, after, spread, max(1, steps)
        for n in self.created:
            self.final_at.setdefault(n, now + after + self._offset(n))
        return now

    def poll(self, n: int) -> bytes:
        if n not in self.created:
            return b'{"error":"task not found"}'
        now = time.monotonic()
        self.poll_count += 1
        self.polls[n].append(now)
        self.polls_per_second[int(now)] = self.polls_per_second.get(int(now), 0) + 1
        if now >= self.final_at.get(n, now + 1):
            return (b'{"is_final":true,"state":"success","result_url":"https://cdn.stub.invalid/task/%d.png",'
                    b'"media_type":"image","progress":"100"}' % n)
        return b'{"is_final":false,"state":"running","result_url":"","media_type":"image","progress":"50"}'

    def stats(self, detail: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"submits": self.submits, "polls": self.poll_count,
                               "polls_per_second": sorted(self.polls_per_second.items())}
        if detail:
            out["tasks"] = {n: {"created": t, "final_at": self.final_at.get(n), "polls": self.polls[n]}
                            for n, t in self.created.items()}
        return out


TASKS = Tasks()


def handle(target: str, body: bytes, keep_alive: bool) -> bytes:
    """GET /api/v1/models.php, POST chat.php, POST image.php ({"task_id"}), GET task.php?task_id=N
    (pending until final); POST /v1/chat/completions (stream: true too), GET /v1/models; control
    (images.py): POST /_reset?hold=&base=&spread=&steps=, POST /_release?after=&spread=&steps=,
    GET /_stats?detail=1 (counters; with detail, every task's times)."""
    if b'"stream"' in body and target == "/v1/chat/completions":
        with suppress(ValueError):
            if json.loads(body).get("stream"):
                return STREAM[keep_alive]
    if (target, keep_alive) in CANNED:  # the hot routes (chat) and every other fixed answer first
        return CANNED[target, keep_alive]
    path, _, query = target.partition("?")
    q = {k: v[-1] for k, v in parse_qs(query).items()}
    if path == "/api/v1/task.php":
        answer = TASKS.poll(int(q["task_id"])) if q.get("task_id", "").isdigit() else b'{"error":"task not found"}'
    elif path == "/api/v1/image.php":
        answer = b'{"ok":true,"task_id":"%d","type":"image"}' % TASKS.submit()
    elif (path, keep_alive) in CANNED:
        return CANNED[path, keep_alive]
    elif path == "/_stats":
        answer = json.dumps(TASKS.stats(q.get("detail") == "1")).encode()
    elif path == "/_reset":
        TASKS.reset(q.get("hold") == "1", float(q.get("base", 2.0)), float(q.get("spread", 4.0)),
                    int(q.get("steps", 1000)))
        answer = b'{"ok":true}'
    elif path == "/_release":
        at = TASKS.release(float(q.get("after", 0.0)), float(q.get("spread", TASKS.spread)),
                           int(q.get("steps", TASKS.steps)))
        answer = json.dumps({"ok": True, "released_at": at}).encode()
    else:
        return _response(404, b'{"error":"not found"}', keep_alive)
    return _response(200, answer, keep_alive)


def _body(buffer: bytes, start: int, length: int, chunked: bool) -> tuple[bytes, int] | None:
    """The request's body and where it ends in `buffer`; None until all of it is there."""
    if not chunked:
        return (buffer[start:start + length], start + length) if len(buffer) - start >= length else None
    parts: list[bytes] = []
    pos = start
    while (eol := buffer.find(b"\r\n", pos)) >= 0:
        size, pos = int(buffer[pos:eol].split(b";", 1)[0], 16), eol + 2
        if size == 0:
            end = buffer.find(b"\r\n\r\n", pos - 2)
            return (b"".join(parts), end + 4) if end >= 0 else None
        if len(buffer) < pos + size + 2:
            return None
        parts.append(buffer[pos:pos + size])
        pos += size + 2
    return None


class HTTPProtocol(asyncio.Protocol):
    __slots__ = ("buffer", "transport")
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.buffer = transport, b""  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out: list[bytes] = []
        close = False
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            lines = buffer[:end].split(b"\r\n")
            try:
                _method, target, version = lines[0].decode("latin-1").split(" ", 2)
            except ValueError:
                out.append(_response(400, b'{"error":"bad request line"}', False))
                close, buffer = True, b""
                break
            length, chunked, keep_alive = 0, False, version == "HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value
                elif name == b"connection" and value in (b"close", b"keep-alive"):
                    keep_alive = value == b"keep-alive"
            if (found := _body(buffer, end + 4, length, chunked)) is None:
                break  # wait for the rest of the body
            buffer = buffer[found[1]:]
            out.append(handle(target, found[0], keep_alive))
            if not keep_alive:
                close, buffer = True, b""
                break
        self.buffer = buffer
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(HTTPProtocol, host, port, backlog=4096, reuse_address=True)
    print(f"stub listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9100)
    with suppress(KeyboardInterrupt):
        uvloop.run(serve("127.0.0.1", parser.parse_args().port))  # loopback only


if __name__ == "__main__":
    main()
