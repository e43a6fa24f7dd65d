"""What every handler needs: the runtime, the caller, the body, notes for the access log."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
from litestar import Request, Response

from proxy.errors import Kind, ProxyError
from proxy.gateway import Caller, ChatResult, StartedChat
from proxy.openai.decode import parse_object
from proxy.router import Route
from proxy.runtime import Runtime

_encode = msgspec.json.Encoder().encode
log = structlog.get_logger("proxy")
PARAM_LOGGED = 300  # characters of an error's param kept in the access log: a client may send anything


def runtime(request: Request[Any, Any, Any]) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def note(request: Request[Any, Any, Any], **fields: Any) -> None:
    """Add fields to this request's access-log line."""
    request.scope["state"].setdefault("access", {}).update(fields)


async def authenticate(request: Request[Any, Any, Any]) -> Caller:
    """The caller, within its request rate; 401 or 429 otherwise."""
    clients = runtime(request).clients
    source = request.scope.get("client")
    caller = clients.authenticate(request.headers.get("authorization"), request.scope["state"].get("request_id"),
                                  source[0] if source else None)
    if caller.own_key is not None:
        caller.on_key_verdict = clients.own_key_verdict
    caller.idempotency_key = request.headers.get("idempotency-key")
    # A POST calls the upstream: its rpm is counted with that call's key window, in one step
    await clients.admit(caller, defer=request.method == "POST")
    if caller.admission is not None:
        request.scope["state"]["admission"] = caller.admission  # counted at the end if it made no call
    note(request, client=caller.name)
    return caller


async def hold_budget(request: Request[Any, Any, Any], caller: Caller, route: Route, calls: int) -> None:
    """Reserve the expected cost of `calls` upstream calls on the caller's budget (429 when it
    cannot pay); whatever the calls do not use is released when the request ends (app.py)."""
    reservation = await runtime(request).gateway.reserve(caller, route, calls)
    if reservation is not None:
        request.scope["state"]["reservation"] = reservation


async def json_body(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return parse_object(await request.body())


async def first_answer(calls: Sequence[StartedChat]) -> ChatResult:
    """For streams: the first answer comes before the headers go out, so upstream errors keep
    their HTTP status. If it fails, the other calls are dropped (those sent end recorded)."""
    try:
        return await asyncio.shield(calls[0].run)
    except BaseException:
        drop(calls)
        raise


def drop(calls: Sequence[StartedChat]) -> None:
    for call in calls:
        call.drop()


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(_encode(payload), status_code=status, media_type="application/json", headers=headers)



def stream_failure(request: Request[Any, Any, Any], error: BaseException) -> ProxyError:
    """An error raised after a stream's headers went out, as the ProxyError to send inside the
    stream; noted for the access log, whose status (200) cannot say it."""
    if not isinstance(error, ProxyError):
        request_id = request.scope["state"].get("request_id", "")
        log.error("stream_failed", request_id=request_id, exc_info=error)
        error = ProxyError(Kind.INTERNAL, f"The proxy had an internal error (request {request_id}).")
    note(request, stream_error=error.code or error.shape.code)
    if error.param is not None:
        note(request, error_param=error.param[:PARAM_LOGGED])
    return error
