"""create_app(config) -> Litestar: routes, OpenAI-shaped exception handlers, one shared HTTP client."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.types import Message, Receive, Scope, Send

from proxy.api import ROUTES
from proxy.clients import Clients
from proxy.config import Config
from proxy.errors import Kind, ProxyError
from proxy.gateway import Gateway
from proxy.log import setup_logging
from proxy.openai.errors import error_response
from proxy.redact import redact
from proxy.runtime import Runtime
from proxy.upstream_http import build_client

access_log = structlog.get_logger("proxy.access")
log = structlog.get_logger("proxy")

# Litestar's own exceptions, by status, in OpenAI's terms.
_HTTP_KINDS = {404: Kind.NOT_FOUND, 405: Kind.METHOD_NOT_ALLOWED, 413: Kind.PAYLOAD_TOO_LARGE,
               415: Kind.UNSUPPORTED_MEDIA_TYPE, 401: Kind.INVALID_API_KEY}


def _proxy_error(_: Request[Any, Any, Any], error: ProxyError) -> Response[bytes]:
    return error_response(error)


def _http_error(request: Request[Any, Any, Any], error: HTTPException) -> Response[bytes]:
    kind = _HTTP_KINDS.get(error.status_code, Kind.BAD_REQUEST if error.status_code < 500 else Kind.INTERNAL)
    if kind is Kind.NOT_FOUND:
        message = f"Unknown request URL: {request.method} {request.url.path}. Please check the URL."
    elif kind is Kind.METHOD_NOT_ALLOWED:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    elif kind is Kind.PAYLOAD_TOO_LARGE:
        message = "The request body is larger than this proxy accepts."
    else:
        message = str(error.detail) if error.detail else "Bad request."
    return error_response(ProxyError(kind, message))


def _unexpected(request: Request[Any, Any, Any], error: Exception) -> Response[bytes]:
    request_id = request.scope["state"].get("request_id", "")
    log.error("unhandled_error", request_id=request_id, exc_info=error)
    return error_response(ProxyError(Kind.INTERNAL, f"The proxy had an internal error (request {request_id})."))


class ProxyApp(Litestar):
    """Litestar, plus what must wrap every request, unknown routes included: the request id
    header and one access-log line."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = "req_" + secrets.token_hex(12)
        state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await super().__call__(scope, receive, send_with_id)
        finally:
            access = state.get("access", {})
            access_log.info("request", request_id=request_id, method=scope["method"], path=scope["path"],
                            status=status, latency_ms=round((time.perf_counter() - started) * 1000, 2),
                            **access)


def create_app(config: Config) -> Litestar:
    redact.add(config.secrets())
    setup_logging(config.log.level, config.log.format)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        http = build_client()
        gateway = Gateway(config, http)
        app.state.runtime = Runtime(config=config, http=http, gateway=gateway, clients=Clients(config.clients))
        try:
            yield
        finally:
            await gateway.close()
            await http.aclose()

    return ProxyApp(
        route_handlers=ROUTES,
        lifespan=[lifespan],
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error, Exception: _unexpected},
        request_max_body_size=config.server.max_body_bytes,
        logging_config=None,
        debug=False,
    )
