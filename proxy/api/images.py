"""POST /v1/images/generations: submit upstream tasks, wait until final, answer like OpenAI."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response, post
from litestar.response import Stream

from proxy.api.common import hold_budget, json_body, note
from proxy.api.dependencies import CallerDep, RuntimeDep
from proxy.clients import check_model
from proxy.downloads import Downloaded, data_url_base64
from proxy.errors import Kind, ProxyError, bad_request
from proxy.gateway import Caller, Gateway
from proxy.openai.decode import convert
from proxy.openai.errors import error_headers, error_payload
from proxy.openai.openapi import documented
from proxy.openai.types import ImageData, ImageGenerationRequest, ImagesResponse
from proxy.providers.base import ImageCall
from proxy.router import Route
from proxy.runtime import Runtime
from proxy.store import UNFINISHED
from proxy.tasks import Task, error_of, still_running

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode

MAX_N = 10
DEFAULT_MODEL = "dall-e-2"  # what OpenAI assumes without a model; route it with an alias
# OpenAI fields with no upstream equivalent: read, never rejected, not forwarded.
_OPENAI_FIELDS = frozenset({"prompt", "model", "n", "size", "quality", "style", "response_format",
                            "output_format", "output_compression", "background", "moderation", "user",
                            "images", "partial_images", "stream", "input_fidelity"})


def check_image_route(route: Route) -> None:
    kind = route.model.kind if route.model else None
    if kind == "chat":
        raise bad_request(f"The model '{route.public_id}' is a chat model and cannot generate images; use "
                          "/v1/chat/completions.", param="model", code="model_not_supported")


async def admit(request: Request[Any, Any, Any], caller: Caller, route: Route, n: int) -> None:
    """May the caller have n images of this model: its allowlist, then its budget (held)."""
    check_model(caller, route)
    await hold_budget(request, caller, route, n)


async def generate(request: Request[Any, Any, Any], gateway: Gateway, caller: Caller, route: Route,
                   call: ImageCall, n: int, response_format: str | None) -> Response[Any]:
    """Start n tasks at once, wait for all, answer urls or base64; shared by generations and edits,
    which `admit` the request first."""
    response_format = response_format or gateway.config.images.default_format(route.public_id)
    started: list[str] = []
    note(request, task_ids=started)
    on_tasks = request.scope["state"].get("on_tasks")  # an Idempotency-Key wants to know them

    async def on_task(task_id: str) -> None:
        # Called by the submit itself, even if this request is cut off meanwhile: the ids reach
        # the access log, a shutdown answer and the Idempotency-Key record whatever happens.
        started.append(task_id)
        if on_tasks is not None:
            await on_tasks(list(started), response_format or "url", n)

    caller.on_task = on_task
    caller.submits = request.scope["state"].setdefault("submits", [])
    starts = await _settled([gateway.start_image(route, call, caller) for _ in range(n)])
    tasks = [t for t in starts if isinstance(t, Task)]
    ids = tuple(t.id for t in tasks)
    note(request, key=tasks[0].key.fingerprint if tasks else None)
    if on_tasks is not None and started:
        await on_tasks(list(started), response_format or "url", n, True)
    outcomes = await _settled([gateway.tasks.result(t) for t in tasks])
    problems = [o for o in (*starts, *outcomes) if isinstance(o, BaseException)]
    if problems:
        error = next((p for p in problems if isinstance(p, ProxyError)), None)
        if error is None:
            raise problems[0]
        error.task_ids = tuple(started)  # every task this request started stays retrievable
        raise error
    try:
        body = await _images_body(gateway, [(url, task.record.upstream) for task in tasks for url in task.state.urls],
                                  response_format)
    except ProxyError as error:
        error.task_ids = ids  # the tasks succeeded: their results stay retrievable
        raise
    headers = {"x-proxy-task-ids": ",".join(ids)} if ids else None
    if isinstance(body, bytes):
        return Response(body, media_type="application/json", headers=headers)
    return Stream(body, media_type="application/json", headers=headers)


async def _settled(calls: list[Coroutine[Any, Any, T]]) -> list[T | BaseException]:
    """Like gather(return_exceptions=True), with no task made for a single call: a waiting
    request holds one task fewer (bench/README.md, "One timer per waiting task")."""
    if len(calls) == 1:
        try:
            return [await calls[0]]
        except Exception as exc:
            return [exc]
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def _images_body(gateway: Gateway, results: list[tuple[str, str]],
                       response_format: str | None) -> bytes | AsyncIterator[bytes]:
    """The answer for these results (URL, upstream): URLs as such, or base64 written as the
    downloads are let go of, never built whole."""
    created = int(time.time())
    if response_format != "b64_json":
        if not all(url.startswith(("http://", "https://")) or data_url_base64(url) for url, _ in results):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "The upstream gave a result URL that is not http(s).")
        return _encode(ImagesResponse(created=created, data=[ImageData(url=url) for url, _ in results]))
    return _b64_json(created, await gateway.download(results))


_SLOT = "\x00"  # stands for a result's base64 in the answer's shape; encoded as below
_SLOT_JSON = b'"\\u0000"'


async def _b64_json(created: int, downloaded: Downloaded) -> AsyncIterator[bytes]:
    """The same bytes as the ImagesResponse encoded whole, each b64_json written piece by piece."""
    try:
        slots = [ImageData(b64_json=_SLOT) for _ in range(len(downloaded))]
        around = _encode(ImagesResponse(created=created, data=slots)).split(_SLOT_JSON)
        for index, before in enumerate(around[:-1]):
            yield before + b'"'
            for piece in downloaded.base64(index):
                yield piece
            yield b'"'
        yield around[-1]
    finally:
        downloaded.release()


async def answer_from_tasks(runtime: Runtime, task_ids: list[str],
                            response_format: str) -> tuple[int, dict[str, str], bytes, bool]:
    """The answer of a request that started these tasks, from the tasks alone (an idempotent
    repeat after a restart, or in another worker): waits up to tasks.timeout for each to be
    final. The last value says whether the answer is final (False: the tasks still run)."""
    waiter = runtime.gateway.tasks
    deadline = time.monotonic() + runtime.config.tasks.timeout
    headers = {"x-proxy-task-ids": ",".join(task_ids)}

    def answer(error: ProxyError, final: bool = True) -> tuple[int, dict[str, str], bytes, bool]:
        error.task_ids = tuple(task_ids)
        return error.shape.status, {**headers, **error_headers(error)}, _encode(error_payload(error)), final

    records = []
    for task_id in task_ids:
        while True:
            found = await waiter.find(task_id)
            if isinstance(found, Task):
                with contextlib.suppress(ProxyError):
                    await waiter.result(found, late_wait=max(0.0, deadline - time.monotonic()))
                found = found.record
            if found is None or found.state not in UNFINISHED:
                break
            if time.monotonic() >= deadline:
                return answer(still_running(task_id, runtime.config.tasks.timeout), final=False)
            await asyncio.sleep(min(1.0, runtime.config.tasks.poll_interval))
        records.append(found)
    for record in records:
        error = error_of(record) if record is not None else ProxyError(Kind.NOT_FOUND, "the task is gone")
        if error is not None:
            return answer(error)
    results = [(url, record.upstream) for record in records if record is not None for url in record.urls]
    try:
        body = await _images_body(runtime.gateway, results, response_format)
        return 200, headers, body if isinstance(body, bytes) else b"".join([piece async for piece in body]), True
    except ProxyError as error:
        return answer(error)


@post("/v1/images/generations", status_code=200, **documented(ImagesResponse, body=ImageGenerationRequest))
async def images_generations(request: Request[Any, Any, Any], caller: CallerDep,
                             runtime: RuntimeDep) -> Response[bytes]:
    gateway = runtime.gateway
    raw = await json_body(request)
    body = convert(raw, ImageGenerationRequest)
    if not body.prompt.strip():
        raise bad_request("'prompt' must not be empty.", param="prompt")
    if not 1 <= body.n <= MAX_N:
        raise bad_request(f"Invalid value for 'n': must be between 1 and {MAX_N}.", param="n")
    for i, url in enumerate(body.images or []):
        if not url.startswith(("http://", "https://")):
            raise bad_request("Reference images must be http(s) URLs.", param=f"images[{i}]")
    model = body.model or DEFAULT_MODEL
    note(request, model=model)
    route = await gateway.catalogue.resolve(model)
    check_image_route(route)
    note(request, upstream=route.provider.name)
    await admit(request, caller, route, body.n)
    call = ImageCall(model=route.upstream_model, prompt=body.prompt,
                     kind=route.model.kind if route.model else "image", size=body.size,
                     references=body.images or [],
                     extra={k: v for k, v in raw.items() if k not in _OPENAI_FIELDS})
    return await generate(request, gateway, caller, route, call, body.n, body.response_format)
