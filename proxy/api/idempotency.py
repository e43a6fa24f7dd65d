"""`Idempotency-Key` on every POST: the same client sending the same key again gets the same
answer, and no second upstream call is made.

Wraps the app at the ASGI level so it sees the raw body and the whole response. A repeat
while the first is still running waits for it (in this process), or for the tasks it
started (after a restart, or in another worker). The same key with another body is a 409.
Answers worth keeping are stored: successes, and failures the client should not retry
(`x-should-retry: false`: a paid task that failed). Others free the key for a retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import Kind, ProxyError
from proxy.openai.errors import error_headers, error_payload, send_error
from proxy.store import IdempotencyRecord

if TYPE_CHECKING:
    from proxy.runtime import Runtime

_REPLAYED_HEADERS = ("retry-after", "x-should-retry", "x-proxy-task-ids")
ABANDONED_AFTER = 900.0  # seconds: a record still "running" without tasks is taken as lost after this
SUBMITS_SETTLE = 30.0  # seconds a repeat waits for the first request's submits to be recorded

Rebuild = Callable[["Runtime", list[str], str], Awaitable[tuple[int, dict[str, str], bytes]]]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class Idempotency:
    def __init__(self, rebuild: Rebuild) -> None:
        self.rebuild = rebuild  # answers a request again from the tasks it started
        self.inflight: dict[tuple[str, str], tuple[str, asyncio.Future[IdempotencyRecord | None]]] = {}

    async def __call__(self, app: ASGIApp, runtime: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
        key = _header(scope, b"idempotency-key")
        client = runtime.clients.identify(_header(scope, b"authorization"))
        if not key or client is None:
            await app(scope, receive, send)  # no key, or not a client: the handler answers as usual
            return
        body, complete = await self._read(receive, runtime.config.server.max_body_bytes)
        if not complete:
            await send_error(send, ProxyError(Kind.PAYLOAD_TOO_LARGE, "The request body is too large."))
            return
        target = f"{scope['method']} {scope['path']}\n".encode()
        fingerprint = hashlib.sha256(target + body).hexdigest()
        slot = (client, key)
        if slot in self.inflight:
            first_fingerprint, future = self.inflight[slot]
            if first_fingerprint != fingerprint:
                await send_error(send, _reused())
                return
            record = await asyncio.shield(future)
            if record is not None:
                await self._replay(send, record)
                return
        record = IdempotencyRecord(client=client, key=key, fingerprint=fingerprint, created=time.time())
        existing = await runtime.store.idempotency_begin(record)
        if existing is not None:
            if existing.fingerprint != fingerprint:
                await send_error(send, _reused())
                return
            if existing.done:
                await self._replay(send, existing)
                return
            if existing.task_ids:  # started before a restart or by another worker: wait on its tasks
                existing = await self._all_tasks_known(runtime, existing)
                if len(existing.task_ids) < existing.expected:  # some submits of the first request failed
                    error = ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"Only {len(existing.task_ids)} of the "
                                       f"{existing.expected} upstream tasks of this request were started.",
                                       task_ids=tuple(existing.task_ids))
                    existing.status, existing.headers = error.shape.status, error_headers(error)
                    existing.body = msgspec.json.encode(error_payload(error))
                else:
                    existing.status, existing.headers, existing.body = await self.rebuild(
                        runtime, existing.task_ids, existing.response_format)
                existing.content_type, existing.done = "application/json", True
                await runtime.store.idempotency_finish(existing)
                await self._replay(send, existing)
                return
            if time.time() - existing.created < ABANDONED_AFTER:
                await send_error(send, ProxyError(
                    Kind.CONFLICT, "A request with this Idempotency-Key is still in progress; retry shortly.",
                    code="idempotency_key_in_progress", retry_after=1.0))
                return
            record.created = existing.created  # abandoned: this request takes it over
        future: asyncio.Future[IdempotencyRecord | None] = asyncio.get_running_loop().create_future()
        self.inflight[slot] = (fingerprint, future)
        try:
            kept = await self._run(app, runtime, scope, receive, body, send, record)
            future.set_result(kept)
        except BaseException:
            future.set_result(None)
            if not record.task_ids:  # with tasks started, a repeat must answer from them, not pay again
                await runtime.store.idempotency_drop(client, key)
            raise
        finally:
            del self.inflight[slot]

    @staticmethod
    async def _all_tasks_known(runtime: Runtime, record: IdempotencyRecord) -> IdempotencyRecord:
        """The first request may still be submitting some of its n tasks: wait (bounded) until
        each is recorded, so the answer is not built from a part of them."""
        deadline = time.monotonic() + SUBMITS_SETTLE
        while len(record.task_ids) < record.expected and not record.submitted and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            fresh = await runtime.store.idempotency_get(record.client, record.key)
            if fresh is None:
                break
            record = fresh
        return record

    async def _run(self, app: ASGIApp, runtime: Runtime, scope: Scope, receive: Receive, body: bytes, send: Send,
                   record: IdempotencyRecord) -> IdempotencyRecord | None:
        async def on_tasks(task_ids: list[str], response_format: str, expected: int, submitted: bool = False) -> None:
            record.task_ids, record.response_format, record.expected = task_ids, response_format, expected
            record.submitted = submitted
            await runtime.store.idempotency_finish(record)

        scope.setdefault("state", {})["on_tasks"] = on_tasks  # type: ignore[typeddict-item]
        status, headers, chunks = 0, {}, []

        async def capture(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await app(scope, _replay_body(body, receive), capture)
        keep = 200 <= status < 300 or headers.get("x-should-retry") == "false"
        if not keep:
            if not record.task_ids:  # with tasks started (a download failed, say), a repeat answers from them
                await runtime.store.idempotency_drop(record.client, record.key)
            return None
        record.done, record.status, record.body = True, status, b"".join(chunks)
        record.content_type = headers.get("content-type", "application/json")
        record.headers = {k: v for k, v in headers.items() if k in _REPLAYED_HEADERS}
        await runtime.store.idempotency_finish(record)
        return record

    @staticmethod
    async def _read(receive: Receive, limit: int) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), True

    @staticmethod
    async def _replay(send: Send, record: IdempotencyRecord) -> None:
        headers = [(b"content-type", record.content_type.encode()), (b"idempotent-replayed", b"true")]
        headers += [(k.encode(), v.encode()) for k, v in record.headers.items()]
        await send({"type": "http.response.start", "status": record.status, "headers": headers})
        await send({"type": "http.response.body", "body": record.body, "more_body": False})



def _reused() -> ProxyError:
    return ProxyError(Kind.CONFLICT, "This Idempotency-Key was already used with a different request body.",
                      code="idempotency_key_reused")


def _replay_body(body: bytes, original: Receive) -> Receive:
    """The body already read, then whatever the client's connection says next (a disconnect)."""
    sent = False

    async def receive() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
