"""A fast upstream stub for the benchmark: xffuw's API and an OpenAI-compatible route.

Raw asyncio (uvloop when importable), one asyncio.Protocol per connection, TCP_NODELAY,
HTTP/1.1 keep-alive, the whole request body read (Content-Length or chunked) before the
answer, and one transport.write per response. Loopback only.

    python bench/stub.py --port 9100

Routes (authorization is accepted, never checked):
  GET  /api/v1/models.php               xffuw model list (gpt-4o-mini chat, gpt-image-2 image)
  POST /api/v1/chat.php                 {"choices":[{"message":{"content": CONTENT}}]}
  POST /api/v1/image.php                {"ok":true,"task_id":"N","type":"image"}
  GET  /api/v1/task.php?task_id=N       pending until the task's final time, then success
  POST /v1/chat/completions             OpenAI chat.completion with CONTENT (stream=true: SSE)
  GET  /v1/models                       OpenAI model list
Control (used by bench/images.py):
  POST /_reset?hold=1|0&base=S&spread=S&steps=K   forget tasks and counters
  POST /_release?after=S&spread=S&steps=K         held tasks become final at
                                                   release + after + (hash(N) mod K) / K * spread
  GET  /_stats?detail=1                            counters; with detail, per-task times

Task timing: with hold=0 a task is final at created + base + (hash(N) mod steps)/steps * spread;
with hold=1 it stays pending until /_release. All times are time.monotonic() (system-wide
CLOCK_MONOTONIC on Linux), so the benchmark compares them with its own clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from urllib.parse import parse_qs

# One answer for every route, so direct, this proxy and LiteLLM do the same work.
CONTENT = ("Hello! I am the benchmark stub. This sentence stands in for a short model answer, "
           "long enough to be split into several streamed chunks by a proxy, and short enough "
           "to keep the wire cost of each request small and identical.")
MODEL = "gpt-4o-mini"
IMAGE_MODEL = "gpt-image-2"
STREAM_PIECE = 24

CHAT_PHP = json.dumps({"choices": [{"message": {"content": CONTENT}}]}, ensure_ascii=False).encode()
MODELS_PHP = json.dumps({"data": [
    {"slug": MODEL, "name": "GPT-4o Mini", "type": "chat", "price": "0.5000", "description": "stub"},
    {"slug": IMAGE_MODEL, "name": "GPT Image 2", "type": "image", "price": "2.0000", "description": "stub"},
]}).encode()
OPENAI_MODELS = json.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "stub"}]}).encode()
# prompt/completion token counts are fixed so nobody has to count tokens
_USAGE = {"prompt_tokens": 12, "completion_tokens": 48, "total_tokens": 60}


def _completion() -> bytes:
    return json.dumps({
        "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT, "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": _USAGE, "system_fingerprint": None,
    }, ensure_ascii=False).encode()


def _stream_body() -> bytes:
    created = int(time.time())

    def event(delta: dict, finish: str | None) -> bytes:
        chunk = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": created, "model": MODEL,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"

    parts = [event({"role": "assistant", "content": ""}, None)]
    for start in range(0, len(CONTENT), STREAM_PIECE):
        parts.append(event({"content": CONTENT[start:start + STREAM_PIECE]}, None))
    parts.append(event({}, "stop"))
    parts.append(b"data: [DONE]\n\n")
    # chunked transfer encoding, every event one chunk, all of it in one write
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


_COMPLETION = _completion()
_STREAM = _stream_body()
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


def _response(status: int, body: bytes, keep_alive: bool, content_type: bytes = b"application/json") -> bytes:
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"OK")),
        b"content-type: ", content_type, b"\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n",
        body,
    ))


def _stream_response(keep_alive: bool) -> bytes:
    return b"".join((
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n",
        b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n",
        _STREAM,
    ))


# canned full responses for the hot routes
_CANNED = {
    (True, "chat.php"): _response(200, CHAT_PHP, True),
    (False, "chat.php"): _response(200, CHAT_PHP, False),
}


class Tasks:
    def __init__(self) -> None:
        self.reset()

    def reset(self, hold: bool = False, base: float = 2.0, spread: float = 4.0, steps: int = 1000) -> None:
        self.hold, self.base, self.spread, self.steps = hold, base, spread, max(1, steps)
        self.next_id = 0
        self.created: dict[int, float] = {}
        self.final_at: dict[int, float] = {}
        self.polls: dict[int, list[float]] = {}
        self.polls_per_second: dict[int, int] = {}
        self.poll_count = 0
        self.submits = 0
        self.chats = 0
        self.released_at: float | None = None
        self.after = 0.0

    def _offset(self, n: int) -> float:
        # a hash of N, not N itself: final times must not follow submit order, or every task
        # would meet the same phase of its polling cycle
        return ((n * 2654435761) % 2**32 % self.steps) / self.steps * self.spread

    def submit(self) -> int:
        self.next_id += 1
        n = self.next_id
        now = time.monotonic()
        self.submits += 1
        self.created[n] = now
        self.polls[n] = []
        if not self.hold:
            self.final_at[n] = now + self.base + self._offset(n)
        elif self.released_at is not None:
            self.final_at[n] = max(now, self.released_at + self.after) + self._offset(n)
        return n

    def release(self, after: float, spread: float, steps: int) -> float:
        now = time.monotonic()
        self.released_at, self.after, self.spread, self.steps = now, after, spread, max(1, steps)
        for n in self.created:
            if n not in self.final_at:
                self.final_at[n] = now + after + self._offset(n)
        return now

    def poll(self, n: int) -> bytes | None:
        if n not in self.created:
            return None
        now = time.monotonic()
        self.poll_count += 1
        self.polls[n].append(now)
        second = int(now)
        self.polls_per_second[second] = self.polls_per_second.get(second, 0) + 1
        final = self.final_at.get(n)
        if final is not None and now >= final:
            return (b'{"is_final":true,"state":"success","result_url":"https://cdn.stub.invalid/task/%d.png",'
                    b'"media_type":"image","progress":"100"}' % n)
        return b'{"is_final":false,"state":"running","result_url":"","media_type":"image","progress":"50"}'

    def stats(self, detail: bool) -> dict:
        out: dict = {"submits": self.submits, "polls": self.poll_count, "chats": self.chats,
                     "released_at": self.released_at, "now": time.monotonic(),
                     "polls_per_second": sorted(self.polls_per_second.items())}
        if detail:
            out["tasks"] = {n: {"created": self.created[n], "final_at": self.final_at.get(n),
                                "polls": self.polls[n]} for n in self.created}
        return out


TASKS = Tasks()


def _query(target: str) -> tuple[str, dict[str, str]]:
    path, _, query = target.partition("?")
    return path, {k: v[-1] for k, v in parse_qs(query).items()}


def handle(method: str, target: str, body: bytes, keep_alive: bool) -> bytes:
    # hot routes first, cheapest checks
    if target == "/api/v1/chat.php":
        TASKS.chats += 1
        return _CANNED[(keep_alive, "chat.php")]
    if target == "/v1/chat/completions":
        TASKS.chats += 1
        if b'"stream"' in body:
            try:
                stream = bool(json.loads(body).get("stream"))
            except ValueError:
                stream = False
            if stream:
                return _stream_response(keep_alive)
        return _response(200, _COMPLETION, keep_alive)
    path, query = _query(target)
    if path == "/api/v1/task.php":
        try:
            answer = TASKS.poll(int(query.get("task_id", "")))
        except ValueError:
            answer = None
        if answer is None:
            return _response(200, b'{"error":"task not found"}', keep_alive)
        return _response(200, answer, keep_alive)
    if path == "/api/v1/image.php":
        n = TASKS.submit()
        return _response(200, b'{"ok":true,"task_id":"%d","type":"image"}' % n, keep_alive)
    if path == "/api/v1/models.php":
        return _response(200, MODELS_PHP, keep_alive)
    if path == "/v1/models":
        return _response(200, OPENAI_MODELS, keep_alive)
    if path == "/_stats":
        return _response(200, json.dumps(TASKS.stats(query.get("detail") == "1")).encode(), keep_alive)
    if path == "/_reset":
        TASKS.reset(hold=query.get("hold") == "1", base=float(query.get("base", 2.0)),
                    spread=float(query.get("spread", 4.0)), steps=int(query.get("steps", 1000)))
        return _response(200, b'{"ok":true}', keep_alive)
    if path == "/_release":
        at = TASKS.release(float(query.get("after", 0.0)), float(query.get("spread", TASKS.spread)),
                           int(query.get("steps", TASKS.steps)))
        return _response(200, json.dumps({"ok": True, "released_at": at}).encode(), keep_alive)
    if path in ("/health", "/healthz"):
        return _response(200, b'{"status":"ok"}', keep_alive)
    return _response(404, b'{"error":"not found"}', keep_alive)


class HTTPProtocol(asyncio.Protocol):
    __slots__ = ("buffer", "transport")
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out: list[bytes] = []
        close = False
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            lines = head.split(b"\r\n")
            try:
                method, target, version = lines[0].decode("latin-1").split(" ", 2)
            except ValueError:
                out.append(_response(400, b'{"error":"bad request line"}', False))
                close = True
                buffer = b""
                break
            length = 0
            chunked = False
            keep_alive = version == "HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection":
                    v = value.strip().lower()
                    if v == b"close":
                        keep_alive = False
                    elif v == b"keep-alive":
                        keep_alive = True
            start = end + 4
            if chunked:
                parsed = _dechunk(buffer, start)
                if parsed is None:
                    break  # wait for the rest of the body
                body, consumed = parsed
            else:
                if len(buffer) - start < length:
                    break  # wait for the rest of the body
                body, consumed = buffer[start:start + length], start + length
            buffer = buffer[consumed:]
            out.append(handle(method, target, body, keep_alive))
            if not keep_alive:
                close = True
                buffer = b""
                break
        self.buffer = buffer
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.buffer = b""


def _dechunk(buffer: bytes, start: int) -> tuple[bytes, int] | None:
    parts: list[bytes] = []
    pos = start
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buffer[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                return None
            return b"".join(parts), trailer_end + 4
        if len(buffer) < pos + size + 2:
            return None
        parts.append(buffer[pos:pos + size])
        pos += size + 2


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HTTPProtocol, host, port, backlog=4096, reuse_address=True)
    print(f"stub listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the stub serves loopback only")
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
