"""create_app(config) -> Litestar: routes, OpenAI-shaped exception handlers, one shared HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import structlog
from litestar import Litestar, Request, Response, Router
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.types import HTTPScope, LifeSpanReceive, LifeSpanScope, LifeSpanSend, Message, Receive, Scope, Send

from proxy.api import ROUTES
from proxy.api.admin import ADMIN_ROUTES, admin_only
from proxy.api.admin_console import CONSOLE_ADMIN_ROUTES
from proxy.api.common import PARAM_LOGGED
from proxy.api.dependencies import DEPENDENCIES
from proxy.api.idempotency import Idempotency
from proxy.api.images import answer_from_tasks
from proxy.api.tasks import retrieve_task
from proxy.balances import Balances
from proxy.clients import Clients
from proxy.clip import clip
from proxy.config import Config, ConfigError
from proxy.console import CONSOLE_ROUTES
from proxy.downloads import Downloads
from proxy.errors import Kind, ProxyError
from proxy.gateway import Gateway
from proxy.http_server import BODY_CUT
from proxy.live import LiveCounts
from proxy.log import setup_logging
from proxy.metrics import Metrics
from proxy.openai.errors import error_response, send_error
from proxy.recovery import Recovery, owner_name
from proxy.redact import redact
from proxy.runtime import Runtime
from proxy.shared import Shared
from proxy.store import open_store
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


# OpenAI API routes the upstreams have nothing behind, and what to call their service.
_UNSERVED = [(re.compile(pattern), service) for pattern, service in (
    (r"/v1/embeddings\b", "embeddings"),
    (r"/v1/audio\b", "audio (speech, transcription, translation)"),
    (r"/v1/moderations\b", "moderation"),
    (r"/v1/(files|uploads)\b", "file storage"),
    (r"/v1/batches\b", "batch"),
    (r"/v1/fine[_-]tun", "fine-tuning"),
    (r"/v1/vector_stores\b", "vector store"),
    (r"/v1/(assistants|threads)\b", "Assistants"),
    (r"/v1/realtime\b", "Realtime"),
    (r"/v1/images/variations\b", "image variation"),
    (r"/v1/chat/completions/", "stored chat completion"),
    (r"/v1/responses/[^/]+/(input_items|cancel)\b", "response input-item listing or cancellation"),
    (r"/v1/responses/(compact|input_tokens)\b", "response compaction or token counting"),
    (r"/v1/(conversations|containers|evals|graders|videos|chatkit|organization|projects|certificates)\b",
     "such"),
)]
SERVED = ("chat completions, completions, responses, images (generations and edits), models and "
          "tasks")


def _not_found_message(method: str, path: str) -> str:
    service = next((service for pattern, service in _UNSERVED if pattern.match(path)), None)
    if service is None:
        return f"Unknown request URL: {method} {clip(path)}. Please check the URL."
    return (f"The upstreams behind this proxy offer no {service} service: {method} {clip(path)} is an OpenAI API "
            f"route this proxy does not serve. It serves {SERVED}.")


class _ErrorFields(msgspec.Struct):
    code: Any = None
    param: Any = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorFields


_decode_error = msgspec.json.Decoder(_ErrorBody).decode


def _error_fields(body: bytes) -> dict[str, str]:
    """code and param of an OpenAI-shaped error body, for the access log."""
    try:
        error = _decode_error(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return {}
    fields = {"error_code": error.code, "error_param": error.param}
    return {k: str(v)[:PARAM_LOGGED] for k, v in fields.items() if v is not None}


# Headers that make a POST a possible repeat of an earlier one (proxy/api/idempotency.py).
_REPEAT_HEADERS = frozenset({b"idempotency-key", b"x-stainless-retry-count"})


def _proxy_error(request: Request[Any, Any, Any], error: ProxyError) -> Response[bytes]:
    if error.reflects_upstream_work:  # an answer worth keeping for a repeat of this request
        request.scope["state"]["upstream_work"] = "unfinished" if error.unfinished else "final"
    return error_response(error)


def _http_error(request: Request[Any, Any, Any], error: HTTPException) -> Response[bytes]:
    kind = _HTTP_KINDS.get(error.status_code, Kind.BAD_REQUEST if error.status_code < 500 else Kind.INTERNAL)
    if kind is Kind.NOT_FOUND:
        message = _not_found_message(request.method, request.url.path)
    elif kind is Kind.METHOD_NOT_ALLOWED:
        message = f"Method {request.method} is not allowed for {clip(request.url.path)}."
    elif kind is Kind.PAYLOAD_TOO_LARGE:
        message = "The request body is larger than this proxy accepts."
    else:
        message = clip(error.detail) if error.detail else "Bad request."
    return error_response(ProxyError(kind, message))


def _json_not_found(response: Response[Any]) -> Response[Any]:
    """Litestar answers an unknown /schema/ path with an HTML page of its own: the proxy answers
    every unknown route in JSON."""
    if response.status_code == 404:
        raise NotFoundException
    return response


def _refused_preflight(scope: HTTPScope, cors: CORSConfig | None) -> ProxyError | None:
    """A CORS preflight from an origin not in [server] cors_origins, which Litestar would answer
    in plain text (methods and headers are all allowed: the origin is all it can refuse)."""
    if cors is None or scope["method"] != "OPTIONS":
        return None
    origin = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"origin"), "")
    if not origin or cors.is_origin_allowed(origin):
        return None
    return ProxyError(Kind.BAD_REQUEST, f"CORS preflight refused: the origin '{clip(origin, 200)}' is not in this "
                      "proxy's [server] cors_origins.", code="cors_origin_not_allowed")


def _unexpected(request: Request[Any, Any, Any], error: Exception) -> Response[bytes]:
    request_id = request.scope["state"].get("request_id", "")
    log.error("unhandled_error", request_id=request_id, exc_info=error)
    return error_response(ProxyError(Kind.INTERNAL, f"The proxy had an internal error (request {request_id})."))


class ProxyApp(Litestar):
    """Litestar, plus what must wrap every request, unknown routes included: the request id
    header and one access-log line."""

    idempotency: Idempotency

    async def __call__(self, scope: Scope | LifeSpanScope, receive: Receive | LifeSpanReceive,
                       send: Send | LifeSpanSend) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope, receive, send = cast(HTTPScope, scope), cast(Receive, receive), cast(Send, send)
        started = time.perf_counter()
        request_id = f"req_{_ID_PREFIX}{next(_ids):08x}"
        state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
        state["request_id"] = request_id
        status = 0
        answered = False  # the whole answer was sent
        failure: dict[str, str] | None = None  # code and param of an error answer

        async def send_with_id(message: Message) -> None:
            nonlocal status, failure, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                # a new list: a framework may reuse the one it passes
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            else:
                answered = not message.get("more_body", False)
                if status >= 400 and failure is None:
                    failure = _error_fields(message.get("body", b""))  # type: ignore[arg-type]
            await send(message)

        try:
            refused = _refused_preflight(scope, self.cors_config)
            if refused is not None:
                await send_error(send_with_id, refused)
            elif scope["method"] == "POST" and any(k in _REPEAT_HEADERS for k, _ in scope["headers"]):
                await self.idempotency(super().__call__, self.state.runtime, scope, receive, send_with_id)
            else:
                await super().__call__(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # The server is shutting down past its grace period. Answer in OpenAI's shape while
            # the connection is still there: the tasks go on after the restart.
            task = asyncio.current_task()
            if answered and task is not None:  # cut only in its bookkeeping, after the answer: done
                task.uncancel()
                return
            if status:
                raise
            if task is not None:
                task.uncancel()
            with contextlib.suppress(Exception):
                submits = state.get("submits")
                if submits:  # a paid submit still under way: wait for its id so the answer can name it
                    await asyncio.wait(submits, timeout=5.0)
                await send_error(send_with_id, _restarting(state))
        finally:
            admission, shared = state.get("admission"), self.state.runtime.shared
            if admission is not None and not admission.counted and shared is not None:
                shared.soon(admission.count_late())  # a request that made no upstream call still counts
            reservation = state.get("reservation")
            if reservation is not None:  # what the request's calls did not use of its budget hold
                self.state.runtime.gateway.billing.release(reservation)
            access = state.get("access", {})
            cut = state.get(BODY_CUT)
            if cut is not None:  # the body never came whole: what was "sent" after went nowhere
                status, failure = cut[0], {"error_code": cut[1]}
            if scope["path"].startswith("/v1/"):  # the API's traffic, not the console's own polling
                self.state.live.add(status)
            # only resolved models label the counter: clients cannot invent label values
            self.state.metrics.count_request(access.get("client", ""), access.get("model", "") if "upstream" in access
                                             else "", status)
            access_log.info("request", request_id=request_id, method=scope["method"], path=loggable_path(scope["path"]),
                            status=status, latency_ms=round((time.perf_counter() - started) * 1000, 2),
                            **{**access, **(failure or {})})


def _restarting(state: dict[str, Any]) -> ProxyError:
    ids = tuple(state.get("access", {}).get("task_ids") or ())
    if not ids:
        return ProxyError(Kind.RESTARTING, "The proxy is restarting; retry shortly.", retry_after=2.0)
    # Tasks were started and paid: a repeat would pay again, so the answer says where they are.
    return ProxyError(Kind.RESTARTING, f"The proxy is restarting; the upstream tasks this request started go on: "
                      f"GET /v1/tasks/{{id}} for {', '.join(ids)}.", retry_after=2.0, task_ids=ids)


# Objects allocated between young collections; Python's default is 700.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path (bench/README.md, "The garbage
    collector"): short-lived objects die young between rarer young collections, and what the
    process holds from startup (modules, config, routes) is frozen out of every later one.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


def _on_sighup(runtime: Runtime) -> None:
    try:
        runtime.reload()
    except (ConfigError, ValueError) as error:
        log.error("config_reload_refused", error=str(error))


def _on_reload(runtime: Runtime) -> None:
    """Another replica re-read its config: so does this one, from its own file."""
    try:
        runtime.reload(tell_replicas=False)
    except (ConfigError, ValueError) as error:
        log.error("config_reload_refused", error=str(error), asked_by="another replica")


def create_app(config: Config, config_path: str | Path | None = None, workers: int = 1) -> Litestar:
    """The proxy as a Litestar app; `config_path` enables /admin/reload and SIGHUP. `workers`
    processes serve it together, each keeping its part of every per-key and per-client limit."""
    redact.add_config(config)
    setup_logging(config.log.level, config.log.format)
    metrics = Metrics()
    egress = config.server.egress()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        tls = httpx.create_ssl_context()  # one CA bundle loaded, for upstream calls and downloads alike
        http = build_client(verify=tls, egress=egress, max_answer_bytes=config.server.max_answer_bytes)
        store = await open_store(config.storage)
        owner = owner_name()
        shared = Shared(config.shared.redis_url, config.shared.prefix, owner) if config.shared.redis_url else None
        # the download memory is the machine's: each worker holds its part
        downloads = Downloads(max(1, config.images.download_memory_bytes // workers), egress, verify=tls)
        gateway = Gateway(config, http, store, owner, observe=metrics.observe_upstream, share=workers, shared=shared,
                          downloads=downloads)
        metrics.gateway, metrics.shared = gateway, shared
        recovery, balances = Recovery(gateway, config.shared.lease), Balances(gateway)
        runtime = Runtime(config=config, config_path=Path(config_path) if config_path else None, http=http,
                          store=store, gateway=gateway, recovery=recovery, clients=Clients(config, workers, shared),
                          share=workers, shared=shared, workers=workers)
        app.state.runtime = runtime
        if shared is not None:
            shared.on_states, shared.on_change = gateway.apply_shared, runtime.shared_changed
            shared.on_reload = functools.partial(_on_reload, runtime)
            shared.live = app.state.live
            await shared.start()
        await recovery.start()
        balances.start()
        tune_gc()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(signal.SIGHUP, _on_sighup, runtime)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signal.SIGHUP)
            await balances.close()
            await gateway.close()
            await recovery.close()
            await store.close()
            if shared is not None:
                await shared.close()
            await http.aclose()

    app = ProxyApp(
        route_handlers=[*ROUTES, retrieve_task, *CONSOLE_ROUTES,
                        Router("/", route_handlers=[*ADMIN_ROUTES, *CONSOLE_ADMIN_ROUTES], guards=[admin_only])],
        dependencies=DEPENDENCIES,
        lifespan=[lifespan],
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error, Exception: _unexpected},
        request_max_body_size=config.server.max_body_bytes,
        cors_config=CORSConfig(allow_origins=config.server.cors_origins, allow_headers=["*"],
                               expose_headers=["x-request-id", "x-proxy-task-ids", "retry-after"])
        if config.server.cors_origins else None,
        logging_config=None,
        # The document only: Litestar's viewer pages load their scripts from CDNs, which the
        # closed networks teams run the proxy in cannot reach.
        openapi_config=OpenAPIConfig(title="xf-openai-proxy", version="1.0.0", render_plugins=[JsonRenderPlugin()],
                                     openapi_router=Router("/schema", route_handlers=[], include_in_schema=False,
                                                           after_request=_json_not_found)),
        debug=False,
    )
    app.state.metrics = metrics
    app.state.live = LiveCounts()
    app.idempotency = Idempotency(answer_from_tasks)
    return app
