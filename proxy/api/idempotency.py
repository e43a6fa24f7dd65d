"""A repeated POST is answered from the first, and no second upstream call is made.

Two kinds of repeat are recognised:
- `Idempotency-Key`: the same client sending the same key again (within
  `[storage] idempotency_hours`) gets the same answer; the same key with another body is a 409.
- an SDK's own retry: OpenAI's SDKs retry a 5xx, a 429, a timeout or a dropped connection
  twice by default, without any key, marking each attempt with `x-stainless-retry-count`.
  An attempt with a count of 1 or more is matched to the one before it (same client, same
  method, path and body, within RETRY_WINDOW) and answered from it, so even a retry the SDK
  insists on pays nothing more. A count of 0 is a new request, however alike.

Wraps the app at the ASGI level so it sees the raw body and the whole response. A repeat
while the first is still running waits for it (in this process), or for the tasks it
started (after a restart, or in another worker). Answers that tell of upstream work are
stored (successes, and failures after a paid call or a started task); refusals made before
any upstream call free the key for a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import Kind, ProxyError, bad_request
from proxy.loop import running_loop
from proxy.openai.errors import error_headers, error_payload, send_error
from proxy.shared import SharedDown
from proxy.store import IdempotencyRecord

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = structlog.get_logger("proxy.idempotency")

_REPLAYED_HEADERS = ("retry-after", "x-should-retry", "x-proxy-task-ids")
ABANDONED_AFTER = 900.0  # seconds: a record still "running" without tasks is taken as lost after this
MARK_LIFE = 6.0  # seconds a replica's mark on a request it runs lasts unrenewed (it renews it every third)
# Answers larger than this (images as base64) are not stored: a repeat builds them again from
# the tasks (their results are kept), rather than the store holding megabytes per request.
MAX_KEPT_BODY = 1024 * 1024
# An answer with no tasks behind it (a chat) cannot be built again without paying again: kept
# up to this size (a chat's upstream answers are capped by [server] max_answer_bytes, 16 MiB).
MAX_KEPT_UNREBUILDABLE = 32 * 1024 * 1024
SUBMITS_SETTLE = 30.0  # seconds a repeat waits for the first request's submits to be recorded
RETRY_WINDOW = 600.0  # seconds after its end an answer still serves an SDK's retry of its request
MAX_KEY_LENGTH = 255

# (status, headers, body, final): final is False while the tasks still run
Rebuild = Callable[["Runtime", list[str], str], Awaitable[tuple[int, dict[str, str], bytes, bool]]]


def _cap(record: IdempotencyRecord) -> int:
    """The largest answer kept: small where its tasks can build it again."""
    return MAX_KEPT_BODY if record.task_ids else MAX_KEPT_UNREBUILDABLE


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def key_digest(key: str) -> str:
    """How an Idempotency-Key is stored: its hash, never the client's bytes."""
    return "key:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Repeat:
    """What makes a request a possible repeat: the stored key and how it was found."""

    key: str
    retry: int | None  # the SDK's attempt number for an implicit key; None for an Idempotency-Key


def repeat_of(scope: Scope) -> tuple[str | None, int | None]:
    """The request's Idempotency-Key and x-stainless-retry-count (None where absent or unreadable)."""
    key = _header(scope, b"idempotency-key")
    count = _header(scope, b"x-stainless-retry-count")
    retry = int(count) if count is not None and count.strip().isdigit() and len(count) < 6 else None
    return (key or None), retry


@dataclass(frozen=True, slots=True)
class _Holder:
    """The request of this process that holds a key (client's) now: the others wait on it."""

    owner: asyncio.Future[str]  # the fingerprint of the body the key belongs to, once the store has said
    decided: asyncio.Future[IdempotencyRecord | None]  # its answer kept for a repeat; None: ask again


class Idempotency:
    def __init__(self, rebuild: Rebuild) -> None:
        self.rebuild = rebuild  # answers a request again from the tasks it started
        self.inflight: dict[tuple[str, str], _Holder] = {}

    async def __call__(self, app: ASGIApp, runtime: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
        explicit, retry = repeat_of(scope)
        client = runtime.clients.identify(_header(scope, b"authorization"))
        if client is None or (explicit is None and retry is None):
            await app(scope, receive, send)  # nothing to match, or not a client: the handler answers as usual
            return
        if explicit is not None and len(explicit) > MAX_KEY_LENGTH:
            await send_error(send, bad_request(f"The Idempotency-Key header is longer than {MAX_KEY_LENGTH} "
                                               "characters.", param="Idempotency-Key"))
            return
        body, complete = await self._read(receive, runtime.config.server.max_body_bytes)
        if not complete:
            await send_error(send, ProxyError(Kind.PAYLOAD_TOO_LARGE, "The request body is too large."))
            return
        target = f"{scope.get('method')} {scope['path']}\n".encode()
        fingerprint = hashlib.sha256(target + body).hexdigest()
        if explicit is not None:
            repeat = Repeat(key_digest(explicit), None)
        else:
            repeat = Repeat("retry:" + fingerprint, retry)
        await self._handle(app, runtime, scope, receive, send, client, repeat, fingerprint, body)

    async def _handle(self, app: ASGIApp, runtime: Runtime, scope: Scope, receive: Receive, send: Send,
                      client: str, repeat: Repeat, fingerprint: str, body: bytes) -> None:
        slot = (client, repeat.key)
        fresh_attempt = repeat.retry == 0
        while (first := self.inflight.get(slot)) is not None:
            if not first.owner.done():
                # The holder is still asking the store whose key this is: its own body is no
                # answer to that (the key may be another's), so wait until it knows or is done.
                await asyncio.wait((first.owner, first.decided), return_when=asyncio.FIRST_COMPLETED)
                continue
            if first.owner.result() != fingerprint:
                await send_error(send, _reused())
                return
            if fresh_attempt:  # an identical request while the first runs: a request of its own
                await app(scope, _replay_body(body, receive), send)
                return
            kept = await asyncio.shield(first.decided)
            if kept is not None:
                await self._replay(send, kept)
                return
        # Marked in flight before any await: a concurrent repeat in this process waits on it.
        loop = running_loop()
        holder = _Holder(owner=loop.create_future(), decided=loop.create_future())
        self.inflight[slot] = holder

        def settle(kept: IdempotencyRecord | None) -> None:
            """The first request is decided: a repeat in this process may go on."""
            if not holder.decided.done():
                holder.decided.set_result(kept)
            if self.inflight.get(slot) is holder:
                del self.inflight[slot]

        record = IdempotencyRecord(client=client, key=repeat.key, fingerprint=fingerprint, created=time.time())
        try:
            settle(await self._first_or_repeat(app, runtime, scope, receive, send, record, fresh_attempt, body,
                                               holder.owner, settle))
        finally:
            settle(None)

    async def _first_or_repeat(self, app: ASGIApp, runtime: Runtime, scope: Scope, receive: Receive, send: Send,
                               record: IdempotencyRecord, fresh_attempt: bool, body: bytes,
                               owner: asyncio.Future[str],
                               settle: Callable[[IdempotencyRecord | None], None]) -> IdempotencyRecord | None:
        """Answer from what the store knows of this key, or run the request as its first;
        `owner` is told the fingerprint the key belongs to as soon as the store says."""
        store = runtime.store
        existing = await store.idempotency_begin(record)
        owner.set_result(record.fingerprint if existing is None else existing.fingerprint)
        if existing is not None and existing.fingerprint != record.fingerprint:
            await send_error(send, _reused())
            return None
        if existing is not None and (fresh_attempt or _expired_retry(existing)):
            if fresh_attempt and not existing.done:  # an identical request still running elsewhere
                await app(scope, _replay_body(body, receive), send)
                return None
            # the earlier request is over: this one is new, and takes the record over
            await store.idempotency_drop(record.client, record.key)
            existing = await store.idempotency_begin(record)
            if existing is not None:  # another process took it meanwhile: this one runs apart
                await app(scope, _replay_body(body, receive), send)
                return None
        shared = runtime.shared if runtime.shared is not None and runtime.shared.active else None
        mark = f"idem:{record.client}:{record.key}"
        running = existing is not None and not existing.done and not existing.task_ids
        if running and (record.key.startswith("retry:") or shared is not None):
            # The first request still runs in another process (an SDK's retry, or a replica that
            # shares state says so): wait for its answer, or take over if it is gone.
            assert existing is not None
            existing, gone = await self._wait_done(runtime, existing, mark if shared is not None else None)
            if gone:
                assert existing is not None
                record.created = existing.created
                existing = None  # its process died mid-request: this request takes it over
            elif existing is None and await store.idempotency_begin(record) is not None:
                await app(scope, _replay_body(body, receive), send)
                return None
        if existing is not None:
            if existing.done or existing.task_ids:
                own_key = runtime.clients.own_key(_header(scope, b"authorization"))
                for task_id in existing.task_ids if own_key is not None and not existing.done else ():
                    await runtime.recovery.unpark(task_id, own_key)  # its owner is back with its key
                return await self._answer_repeat(runtime, send, existing)
            if time.time() - existing.created < ABANDONED_AFTER:
                await send_error(send, ProxyError(
                    Kind.CONFLICT, "A request with this Idempotency-Key is still in progress; retry shortly.",
                    code="idempotency_key_in_progress", retry_after=1.0))
                return None
            record.created = existing.created  # abandoned: this request takes it over
        return await self._run(app, runtime, scope, receive, body, send, record, settle,
                               mark if runtime.shared is not None else None)

    @staticmethod
    def _hold_mark(runtime: Runtime, mark: str) -> asyncio.Task[None]:
        """Tell every replica this process runs the request, for as long as it lives."""
        shared = runtime.shared
        assert shared is not None

        async def hold() -> None:
            with contextlib.suppress(SharedDown):
                await shared.mark(mark, MARK_LIFE)
                while True:
                    await asyncio.sleep(MARK_LIFE / 3)
                    await shared.renew(mark, MARK_LIFE)

        return asyncio.ensure_future(hold())

    @staticmethod
    async def _wait_done(runtime: Runtime, record: IdempotencyRecord,
                         mark: str | None) -> tuple[IdempotencyRecord | None, bool]:
        """(the record once done or with tasks, False); (None, False) if the first request
        dropped it (it failed before any upstream work: this is a first attempt now); (the
        record, True) when the process running it is gone (its mark in Redis lapsed)."""
        deadline = time.monotonic() + ABANDONED_AFTER
        checked = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            fresh = await runtime.store.idempotency_get(record.client, record.key)
            if fresh is None or fresh.done or fresh.task_ids:
                return fresh, False
            if mark is not None and runtime.shared is not None and time.monotonic() - checked > MARK_LIFE / 3:
                checked = time.monotonic()
                try:
                    if await runtime.shared.holder(mark) is None:
                        # read again: its answer may have been kept just before its mark went
                        again = await runtime.store.idempotency_get(record.client, record.key)
                        if again is None or again.done or again.task_ids:
                            return again, False
                        return again, True
                except SharedDown:
                    mark = None  # no one can tell now: wait as without shared state
        return record, False

    async def _answer_repeat(self, runtime: Runtime, send: Send,
                             existing: IdempotencyRecord) -> IdempotencyRecord | None:
        """A repeat of a request that is done, or that started tasks (answered from them)."""
        if not existing.done:  # started before a restart or by another worker: wait on its tasks
            existing = await self._all_tasks_known(runtime, existing)
            if len(existing.task_ids) < existing.expected:  # some submits of the first request failed
                error = ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"Only {len(existing.task_ids)} of the "
                                   f"{existing.expected} upstream tasks of this request were started.",
                                   task_ids=tuple(existing.task_ids))
                existing.status, existing.headers = error.shape.status, error_headers(error)
                existing.body = msgspec.json.encode(error_payload(error))
            else:
                existing.status, existing.headers, existing.body, final = await self.rebuild(
                    runtime, existing.task_ids, existing.response_format)
                if not final or len(existing.body) > MAX_KEPT_BODY:  # not the answer to keep: rebuilt each time
                    await self._replay(send, existing)
                    return None
            existing.content_type, existing.done, existing.finished = "application/json", True, time.time()
            await runtime.store.idempotency_finish(existing)
        await self._replay(send, existing)
        return existing

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
                   record: IdempotencyRecord, settle: Callable[[IdempotencyRecord | None], None],
                   mark: str | None) -> IdempotencyRecord | None:
        """Run the request as the first of its key, marked as running for every replica (`mark`)."""
        async def on_tasks(task_ids: list[str], response_format: str, expected: int, submitted: bool = False) -> None:
            record.task_ids, record.response_format, record.expected = task_ids, response_format, expected
            record.submitted = submitted
            await runtime.store.idempotency_finish(record)

        state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
        state["on_tasks"] = on_tasks
        status, size = 0, 0
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        kept: IdempotencyRecord | None = None
        decided = False
        shared = runtime.shared
        renewing = self._hold_mark(runtime, mark) if shared is not None and mark is not None else None

        async def unmark() -> None:
            nonlocal renewing
            if renewing is not None and shared is not None and mark is not None:
                renewing.cancel()
                renewing = None
                with contextlib.suppress(SharedDown):
                    await shared.unmark(mark)

        async def decide() -> None:
            """Keep the answer or free the key, then let a repeat go on: done before the answer's
            last byte, so a client that retries at once finds the key as this left it."""
            nonlocal kept, decided
            decided = True
            try:
                kept = await self._keep(runtime, record, state.get("upstream_work"), status, headers, chunks, size)
                await unmark()  # before a repeat in this process may mark it as its own
            except Exception as exc:  # the store failed: the answer still goes out whole
                log.warning("idempotency_record_failed", key=record.key[:16], error=repr(exc))
            settle(kept)

        async def capture(message: Message) -> None:
            nonlocal status, headers, size
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
                if size <= _cap(record):  # a larger answer (images as base64) is not kept
                    chunks.append(message.get("body", b""))
                if not message.get("more_body", False) and not decided:
                    try:
                        await decide()
                    except asyncio.CancelledError:  # a shutdown past its grace: the answer still goes out
                        await send(message)
                        raise
            await send(message)

        try:
            await app(scope, _replay_body(body, receive), capture)
            if not decided:  # the app ended without a last body message
                await decide()
        except BaseException:
            # Cut before it was decided (once decided, the key may be another request's now).
            # With tasks started or an answer kept, a repeat answers from them.
            if not decided and not record.task_ids and not record.done:
                await runtime.store.idempotency_drop(record.client, record.key)
            raise
        finally:
            if renewing is not None and shared is not None and mark is not None:
                renewing.cancel()
                shared.soon(shared.unmark(mark))
        return kept

    @staticmethod
    async def _keep(runtime: Runtime, record: IdempotencyRecord, work: str | None, status: int,
                    headers: dict[str, str], chunks: list[bytes], size: int) -> IdempotencyRecord | None:
        """Store the answer if it tells of upstream work (a success, or a failure after a paid
        call or a started task, as the error handler marks it); else free the key for a retry."""
        if work == "unfinished" and record.task_ids:  # its tasks go on: a repeat answers from them
            return None
        paid = 200 <= status < 300 or work is not None
        if paid and size > _cap(record) and not record.task_ids:
            # Too large to keep, and nothing to build it again from: a repeat is told so, not paid again.
            error = _not_kept(record.key, size)
            status, headers = error.shape.status, {"content-type": "application/json", **error_headers(error)}
            chunks, size = [msgspec.json.encode(error_payload(error))], 0
        elif not paid or size > _cap(record):
            if not record.task_ids:  # with tasks started (a download failed, say), a repeat answers from them
                await asyncio.shield(runtime.store.idempotency_drop(record.client, record.key))
            return None
        record.done, record.status, record.body, record.finished = True, status, b"".join(chunks), time.time()
        record.content_type = headers.get("content-type", "application/json")
        record.headers = {k: v for k, v in headers.items() if k in _REPLAYED_HEADERS}
        # Written even if a shutdown cuts this request now: its answer is being sent, a repeat must find it.
        await asyncio.shield(runtime.store.idempotency_finish(record))
        return record

    @staticmethod
    async def _read(receive: Receive, limit: int) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
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


def _expired_retry(record: IdempotencyRecord) -> bool:
    """A record of an SDK's retries that no longer serves them: done long ago, or abandoned."""
    if not record.key.startswith("retry:"):
        return False
    if record.done:
        return time.time() - (record.finished or record.created) > RETRY_WINDOW
    return not record.task_ids and time.time() - record.created >= ABANDONED_AFTER


def _not_kept(key: str, size: int) -> ProxyError:
    """Paid (so an SDK does not retry it); what to do differs for an SDK's own retries."""
    first, again = (("the first attempt of this request", "Send it again as a new request") if key.startswith("retry:")
                    else ("the first request with this Idempotency-Key", "Send a new Idempotency-Key"))
    return ProxyError(Kind.CONFLICT, f"The answer to {first} ({size:,} bytes) was paid for, but is too large to "
                      f"keep for repeats. {again} to pay for a new answer.", code="idempotency_answer_not_kept",
                      paid=True)


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
