"""create_app(config) -> Litestar: routes, OpenAI-shaped exception handlers, one shared HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import secrets
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.types import Message, Receive, Scope, Send
from multipart import ParserLimitReached  # type: ignore[import-untyped]  # Litestar's form parser

from proxy.api import ROUTES
from proxy.api.admin import ADMIN_ROUTES
from proxy.api.idempotency import Idempotency
from proxy.api.images import answer_from_tasks
from proxy.api.tasks import retrieve_task
from proxy.clients import Clients
from proxy.clip import clip
from proxy.config import Config, ConfigError
from proxy.errors import Kind, ProxyError
from proxy.gateway import Gateway, owner_name
from proxy.log import setup_logging
from proxy.metrics import Metrics
from proxy.openai.errors import error_response, send_error
from proxy.redact import redact
from proxy.runtime import Runtime
from proxy.store.sqlite import SQLiteStore
from proxy.uploads import loggable_path
from proxy.upstream_http import build_client

access_log = structlog.get_logger("proxy.access")
# Request ids: unique per process start and cheap (no system call per request); not secrets.
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count(1)
log = structlog.get_logger("proxy")

# Litestar's own exceptions, by status, in OpenAI's terms.
_HTTP_KINDS = {404: Kind.NOT_FOUND, 405: Kind.METHOD_NOT_ALLOWED, 413: Kind.PAYLOAD_TOO_LARGE,
               415: Kind.UNSUPPORTED_MEDIA_TYPE, 401: Kind.INVALID_API_KEY}


def _proxy_error(_: Request[Any, Any, Any], error: ProxyError) -> Response[bytes]:
    return error_response(error)


def _http_error(request: Request[Any, Any, Any], error: HTTPException) -> Response[bytes]:
    kind = _HTTP_KINDS.get(error.status_code, Kind.BAD_REQUEST if error.status_code < 500 else Kind.INTERNAL)
    if isinstance(error.__context__, ParserLimitReached):  # Litestar 2 answers its multipart limits with 400
        return error_response(ProxyError(Kind.PAYLOAD_TOO_LARGE, "The multipart form exceeds this proxy's limits "
                                         f"({error.__context__})."))
    if kind is Kind.NOT_FOUND:
        message = f"Unknown request URL: {request.method} {clip(request.url.path)}. Please check the URL."
    elif kind is Kind.METHOD_NOT_ALLOWED:
        message = f"Method {request.method} is not allowed for {clip(request.url.path)}."
    elif kind is Kind.PAYLOAD_TOO_LARGE:
        message = "The request body is larger than this proxy accepts."
    else:
        message = clip(error.detail) if error.detail else "Bad request."
    return error_response(ProxyError(kind, message))


def _unexpected(request: Request[Any, Any, Any], error: Exception) -> Response[bytes]:
    request_id = request.scope["state"].get("request_id", "")
    log.error("unhandled_error", request_id=request_id, exc_info=error)
    return error_response(ProxyError(Kind.INTERNAL, f"The proxy had an internal error (request {request_id})."))


class ProxyApp(Litestar):
    """Litestar, plus what must wrap every request, unknown routes included: the request id
    header and one access-log line."""

    idempotency: Idempotency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = f"req_{_ID_PREFIX}{next(_ids):08x}"
        state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
        state["request_id"] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # a new list: a framework may reuse the one it passes
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if scope["method"] == "POST" and any(k == b"idempotency-key" for k, _ in scope["headers"]):
                await self.idempotency(super().__call__, self.state.runtime, scope, receive, send_with_id)
            else:
                await super().__call__(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # The server is shutting down past its grace period. Answer in OpenAI's shape while
            # the connection is still there: the tasks go on after the restart.
            if status:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            with contextlib.suppress(Exception):
                submits = state.get("submits")
                if submits:  # a paid submit still under way: wait for its id so the answer can name it
                    await asyncio.wait(submits, timeout=5.0)
                await send_error(send_with_id, _restarting(state))
        finally:
            access = state.get("access", {})
            # only resolved models label the counter: clients cannot invent label values
            self.state.metrics.requests.labels(access.get("client", ""), access.get("model", "") if "upstream" in access
                                               else "", str(status)).inc()
            access_log.info("request", request_id=request_id, method=scope["method"], path=loggable_path(scope["path"]),
                            status=status, latency_ms=round((time.perf_counter() - started) * 1000, 2),
                            **access)


def _restarting(state: dict[str, Any]) -> ProxyError:
    ids = tuple(state.get("access", {}).get("task_ids") or ())
    tasks = f" Its tasks go on: GET /v1/tasks/{{id}} for {', '.join(ids)}." if ids else ""
    return ProxyError(Kind.RESTARTING, f"The proxy is restarting; retry shortly.{tasks}", retry_after=2.0, task_ids=ids)


# Objects allocated between young collections; Python's default is 700.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path (bench/README.md, "Garbage collector").

    With 10,000 requests waiting, every poll's short-lived objects outlived Python's default
    young-generation threshold of 700 allocations, reached the oldest generation, and
    triggered full collections over ~2 million objects: 0.6 s pauses, a third of the CPU.
    Young collections every 50,000 allocations let those objects die young; what the process
    holds from startup (modules, config, routes) is frozen out of every later collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


def _on_sighup(runtime: Runtime) -> None:
    try:
        runtime.reload()
    except (ConfigError, ValueError) as error:
        log.error("config_reload_refused", error=str(error))


def create_app(config: Config, config_path: str | Path | None = None) -> Litestar:
    """The proxy as a Litestar app; `config_path` enables /admin/reload and SIGHUP."""
    redact.add_config(config)
    setup_logging(config.log.level, config.log.format)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        http = build_client()
        store = SQLiteStore(config.storage.path)
        gateway = Gateway(config, http, store, owner_name(), observe=metrics.observe_upstream)
        metrics.gateway = gateway
        runtime = Runtime(config=config, config_path=Path(config_path) if config_path else None, http=http,
                          store=store, gateway=gateway, clients=Clients(config))
        app.state.runtime = runtime
        await gateway.start()
        tune_gc()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(signal.SIGHUP, _on_sighup, runtime)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signal.SIGHUP)
            await gateway.close()
            await store.close()
            await http.aclose()

    app = ProxyApp(
        route_handlers=[*ROUTES, retrieve_task, *ADMIN_ROUTES],
        lifespan=[lifespan],
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error, Exception: _unexpected},
        request_max_body_size=config.server.max_body_bytes,
        cors_config=CORSConfig(allow_origins=config.server.cors_origins, allow_headers=["*"],
                               expose_headers=["x-request-id", "x-proxy-task-ids", "retry-after"])
        if config.server.cors_origins else None,
        logging_config=None,
        # The document only: Litestar's viewer pages load their scripts from CDNs, which the
        # closed networks teams run the proxy in cannot reach.
        openapi_config=OpenAPIConfig(title="xf-openai-proxy", version="1.0.0", path="/schema",
                                     render_plugins=[JsonRenderPlugin()]),
        debug=False,
    )
    app.state.metrics = metrics
    app.idempotency = Idempotency(answer_from_tasks)
    return app
