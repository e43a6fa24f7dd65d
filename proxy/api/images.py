"""POST /v1/images/generations: submit upstream tasks, wait until final, answer like OpenAI."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from litestar import Request, Response, post

from proxy.api.common import authenticate, json_body, json_response, note, runtime
from proxy.clients import check_model
from proxy.errors import ProxyError, bad_request
from proxy.gateway import Caller
from proxy.openai.decode import convert
from proxy.openai.types import ImageData, ImageGenerationRequest, ImagesResponse
from proxy.providers.base import ImageCall
from proxy.router import Route
from proxy.tasks import Task

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


async def generate(request: Request[Any, Any, Any], caller: Caller, route: Route, call: ImageCall, n: int,
                   response_format: str | None) -> Response[bytes]:
    """Start n tasks at once, wait for all, answer urls or base64; shared by generations and edits."""
    gateway = runtime(request).gateway
    check_model(caller, route)
    await gateway.check_budget(caller, route, n)
    starts = await asyncio.gather(*(gateway.start_image(route, call, caller) for _ in range(n)),
                                  return_exceptions=True)
    tasks = [t for t in starts if isinstance(t, Task)]
    ids = tuple(t.id for t in tasks)
    note(request, task_ids=list(ids), key=tasks[0].key.fingerprint if tasks else None)
    outcomes = await asyncio.gather(*(gateway.tasks.result(t) for t in tasks), return_exceptions=True)
    problems = [o for o in (*starts, *outcomes) if isinstance(o, BaseException)]
    if problems:
        error = next((p for p in problems if isinstance(p, ProxyError)), None)
        if error is None:
            raise problems[0]
        error.task_ids = ids  # every task this request started stays retrievable
        raise error
    urls = [url for task in tasks for url in task.state.urls]
    if response_format == "b64_json":
        encoded = await asyncio.gather(*(gateway.download(url) for url in urls))
        data = [ImageData(b64_json=b64) for b64 in encoded]
    else:
        data = [ImageData(url=url) for url in urls]
    return json_response(ImagesResponse(created=int(time.time()), data=data),
                         headers={"x-proxy-task-ids": ",".join(ids)} if ids else None)


@post("/v1/images/generations", status_code=200)
async def images_generations(request: Request[Any, Any, Any]) -> Response[bytes]:
    caller = authenticate(request)
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
    gateway = runtime(request).gateway
    route = await gateway.catalogue.resolve(model)
    check_image_route(route)
    note(request, upstream=route.provider.name)
    call = ImageCall(model=route.upstream_model, prompt=body.prompt,
                     kind=route.model.kind if route.model else "image", size=body.size,
                     references=body.images or [],
                     extra={k: v for k, v in raw.items() if k not in _OPENAI_FIELDS})
    return await generate(request, caller, route, call, body.n, body.response_format)
