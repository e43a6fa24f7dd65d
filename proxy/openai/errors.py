"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`, all four keys."""

from __future__ import annotations

import math

import msgspec
from litestar import Response
from litestar.types import Send

from proxy.clip import clip
from proxy.errors import ProxyError
from proxy.openai.types import ErrorBody, ErrorResponse
from proxy.redact import redact

_encode = msgspec.json.Encoder().encode
# Messages quote upstream texts, which may echo what a client sent: cut before they go out.
MESSAGE_LIMIT = 2048


def error_payload(error: ProxyError) -> ErrorResponse:
    shape = error.shape
    return ErrorResponse(error=ErrorBody(message=redact.whole(clip(error.message, MESSAGE_LIMIT)), type=shape.type,
                                         param=redact.whole(clip(error.param)) if error.param else error.param,
                                         code=error.code or shape.code))


def error_headers(error: ProxyError) -> dict[str, str]:
    headers: dict[str, str] = {}
    retry = error.should_retry
    if retry is not None:
        headers["x-should-retry"] = "true" if retry else "false"
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
    if error.task_ids:
        headers["x-proxy-task-ids"] = ",".join(error.task_ids)
    return headers


async def send_error(send: Send, error: ProxyError) -> None:
    """Answer at the ASGI level, where no Litestar response object is at hand."""
    headers = [(b"content-type", b"application/json")]
    headers += [(k.encode(), v.encode()) for k, v in error_headers(error).items()]
    await send({"type": "http.response.start", "status": error.shape.status, "headers": headers})
    await send({"type": "http.response.body", "body": _encode(error_payload(error)), "more_body": False})


def error_response(error: ProxyError) -> Response[bytes]:
    return Response(_encode(error_payload(error)), status_code=error.shape.status,
                    media_type="application/json", headers=error_headers(error))
