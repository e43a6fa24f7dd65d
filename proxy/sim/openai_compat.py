"""Simulated OpenAI-compatible API (``/v1/models``, ``/v1/chat/completions``,
``/v1/images/generations``, JSON ``/v1/images/edits``): what a vLLM, LiteLLM or new-api server answers.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with real statuses: 401
``invalid_api_key``, 429 ``rate_limit_exceeded`` (with Retry-After) or ``insufficient_quota``,
404 ``model_not_found``, 400 ``invalid_request_error``. Each key has a balance and a rate limit;
every call is charged at its model's price. Chat echoes the last user message after
``CHAT_PREFIX``; with ``tools``, tool results or ``response_format`` it answers by the rules in
``chat_model.py``, always as one JSON body (``stream`` is not simulated: the proxy never asks for
it). A GPT image model answers base64 only and refuses ``response_format``, as OpenAI's does.
Prompt markers (proxy/sim/faults.py): ``[blocked]``, ``[error]``, ``[delay=s]``, ``[tools:N]``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException

from proxy.sim import chat_model
from proxy.sim.assets import PNG_BYTES, files_route
from proxy.sim.faults import (
    CallLog,
    FaultMiddleware,
    Faults,
    Scope,
    SlidingWindow,
    bearer,
    header,
    parse_markers,
    retry_after_header,
)

log = logging.getLogger("proxy.sim.openai_compat")

OPENAI_COMPAT_DEMO_KEYS: dict[str, float] = {
    "sk-compat-demo-alpha": 100.0,
    "sk-compat-demo-beta": 100.0,
    "sk-compat-demo-broke": 0.0,
}
CHAT_PREFIX = "Hello from a compatible server. You said: "
SIZES = frozenset({"auto", "256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536"})
CREATED = 1_700_000_000


@dataclass
class CompatModel:
    id: str
    kind: str  # chat | image | embedding
    price: float  # charged per call, or per image
    owned_by: str = "system"
    b64_only: bool = False  # a GPT image model: base64 answers, response_format refused

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": CREATED, "owned_by": self.owned_by}


def default_models() -> list[CompatModel]:
    return [
        CompatModel("gpt-4o-mini", "chat", 0.01, "openai"),
        CompatModel("qwen2.5-7b-instruct", "chat", 0.002, "vllm"),
        CompatModel("dall-e-3", "image", 0.04, "openai"),
        CompatModel("gpt-image-1", "image", 0.05, "openai", b64_only=True),
        CompatModel("text-embedding-3-small", "embedding", 0.0001, "openai"),
    ]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class OpenAICompatSim(CallLog):
    """Mutable state of one simulated OpenAI-compatible service; change attributes between requests."""

    def __init__(self, keys: dict[str, float] | None = None, *, seed: int = 0, public_base: str = "") -> None:
        self._init_keys = dict(keys) if keys is not None else None
        self._seed = seed
        self.keys: dict[str, float] = dict(keys if keys is not None else OPENAI_COMPAT_DEMO_KEYS)  # balances
        self.models: list[CompatModel] = default_models()
        self.public_base = public_base  # e.g. "http://127.0.0.1:54321"; "" = from Host
        self.rate_limit: int | None = None  # calls per key per rate_window; None = unlimited
        self.rate_limits: dict[str, int] = {}  # per key, over rate_limit
        self.rate_window = 60.0
        self.rate_limited_count = 0
        self.last_chat_body: dict[str, Any] | None = None
        self.last_image_body: dict[str, Any] | None = None
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.calls = []
        self._window = SlidingWindow()
        self._seq = 0

    def reset(self) -> None:
        """Back to construction defaults, keeping ``public_base`` (the server stays bound)."""
        base = self.public_base
        self.__init__(self._init_keys, seed=self._seed, public_base=base)  # type: ignore[misc]

    # -- helpers the handlers and the fault layer use --------------------------------

    def model(self, model_id: object) -> CompatModel | None:
        return next((m for m in self.models if m.id == model_id), None)

    def charge(self, key: str, cost: float) -> bool:
        if self.keys.get(key, 0.0) + 1e-9 < cost:
            return False
        self.keys[key] = round(self.keys[key] - cost, 6)
        return True

    def next_id(self) -> int:
        self._seq += 1
        return self._seq

    def file_url(self, request: Request[Any, Any, Any], name: str) -> str:
        base = self.public_base or str(request.base_url)
        return f"{base.rstrip('/')}/files/{name}"

    def draw(self) -> float:
        return self.rng.random()

    def is_poll_path(self, path: str) -> bool:
        return False  # images are answered at once: nothing to poll

    def record_fault(self, scope: Scope, status: int) -> None:
        self._log(classify(str(scope.get("path", ""))), bearer(header(scope, "authorization")), status)


def classify(path: str) -> str:
    if path.startswith("/files/"):
        return "file"
    return {"/v1/models": "models", "/v1/chat/completions": "chat", "/v1/images/generations": "images",
            "/v1/images/edits": "edits"}.get(path.rstrip("/"), "other")


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return chat_model.text_of(message.get("content"))
    return ""


def tokens(text: str) -> int:
    return max(1, len(text) // 4)


def create_openai_compat_app(state: OpenAICompatSim) -> Litestar:
    def reply(endpoint: str, key: str | None, payload: Any, status: int = 200,
              headers: dict[str, str] | None = None) -> Response[bytes]:
        state._log(endpoint, key, status)
        return Response(msgspec.json.encode(payload), status_code=status, media_type="application/json",
                        headers=headers)

    def refuse(endpoint: str, key: str | None, status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> Response[bytes]:
        return reply(endpoint, key, error_body(message, type_, param, code), status)

    def gate(endpoint: str, request: Request[Any, Any, Any]) -> tuple[str | None, Response[bytes] | None]:
        """Auth then the key's rate limit: the key, or the error answer to send."""
        key = bearer(request.headers.get("authorization"))
        if key is None:
            return None, refuse(endpoint, None, 401, "You didn't provide an API key.", code="invalid_api_key")
        if key not in state.keys:
            masked = f"{key[:3]}{'*' * 8}{key[-4:]}" if len(key) > 8 else "***"
            return key, refuse(endpoint, key, 401, f"Incorrect API key provided: {masked}.", code="invalid_api_key")
        limit = state.rate_limits.get(key, state.rate_limit)
        wait = state._window.admit(key, limit, state.rate_window)
        if wait is not None:
            state.rate_limited_count += 1
            return key, reply(endpoint, key, error_body(f"Rate limit reached for requests: limit {limit} per "
                                                        f"{state.rate_window:g}s.", "requests", None,
                                                        "rate_limit_exceeded"),
                              429, {"Retry-After": retry_after_header(wait)})
        return key, None

    def short_of_quota(endpoint: str, key: str | None) -> Response[bytes]:
        return refuse(endpoint, key, 429, "You exceeded your current quota, please check your plan and billing "
                      "details.", "insufficient_quota", None, "insufficient_quota")

    async def json_body(request: Request[Any, Any, Any]) -> dict[str, Any] | None:
        try:
            body = msgspec.json.decode(await request.body())
        except msgspec.DecodeError:
            return None
        return body if isinstance(body, dict) else None

    def unknown_model(endpoint: str, key: str | None, model_id: Any) -> Response[bytes]:
        return refuse(endpoint, key, 404, f"The model `{model_id}` does not exist or you do not have access to it.",
                      code="model_not_found")

    @get("/v1/models", status_code=200)
    async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
        await request.body()
        key, refused = gate("models", request)
        if refused is not None:
            return refused
        return reply("models", key, {"object": "list", "data": [m.as_json() for m in state.models]})

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[bytes]:
        body = await json_body(request)  # read before any answer: keeps keep-alive sane
        key, refused = gate("chat", request)
        if refused is not None:
            return refused
        if body is None:
            return refuse("chat", key, 400, "We could not parse the JSON body of your request.")
        state.last_chat_body = body
        if not body.get("model"):
            return refuse("chat", key, 400, "you must provide a model parameter", param="model")
        model = state.model(body["model"])
        if model is None:
            return unknown_model("chat", key, body["model"])
        if model.kind != "chat":
            return refuse("chat", key, 404, "This is not a chat model and thus not supported in the "
                          "v1/chat/completions endpoint.", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return refuse("chat", key, 400, "'messages' must contain at least one message.", param="messages")
        text = last_user_text(messages)
        markers = parse_markers(text)
        if markers.blocked:
            return refuse("chat", key, 400, "Your request was rejected as a result of our safety system.",
                          code="content_policy_violation")
        if markers.error:
            return refuse("chat", key, 500, "The server had an error while processing your request.",
                          "server_error")
        assert key is not None
        if not state.charge(key, model.price):
            return short_of_quota("chat", key)
        if markers.delay:
            await asyncio.sleep(markers.delay)  # a slow model, for timeout tests
        # tools, tool results, response_format: answered as the other sims' chat model does
        choice = chat_model.answer(body, markers, lambda: f"call_sim{state.next_id():06d}")
        if choice is None:
            choice = {"message": {"role": "assistant", "content": CHAT_PREFIX + text}, "finish_reason": "stop"}
        message = choice["message"]
        prompt = tokens(" ".join(chat_model.text_of(m.get("content")) for m in messages if isinstance(m, dict)))
        completion = tokens(message.get("content") or str(message.get("tool_calls")))
        return reply("chat", key, {
            "id": f"chatcmpl-sim{state.next_id():06d}", "object": "chat.completion", "created": int(time.time()),
            "model": model.id, "system_fingerprint": "fp_sim",
            "choices": [{"index": 0, "logprobs": None, **choice}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        })

    async def images(endpoint: str, request: Request[Any, Any, Any]) -> Response[bytes]:
        body = await json_body(request)
        key, refused = gate(endpoint, request)
        if refused is not None:
            return refused
        if body is None:
            return refuse(endpoint, key, 400, "We could not parse the JSON body of your request.")
        state.last_image_body = body
        model = state.model(body.get("model") or "dall-e-3")
        if model is None:
            return unknown_model(endpoint, key, body.get("model"))
        if model.kind != "image":
            return refuse(endpoint, key, 400, f"Invalid value: '{model.id}'. It is not an image model.",
                          param="model")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return refuse(endpoint, key, 400, "Missing required parameter: 'prompt'.", param="prompt")
        if endpoint == "edits":
            refs = body.get("images")
            if not (isinstance(refs, list) and 1 <= len(refs) <= 16 and all(
                    isinstance(r, dict) and isinstance(r.get("image_url"), str) for r in refs)):
                return refuse(endpoint, key, 400, "'images' must be 1 to 16 objects with an image_url.",
                              param="images")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            return refuse(endpoint, key, 400, f"Invalid value: {n!r}. 'n' must be between 1 and 10.", param="n")
        size = body.get("size", "auto")
        if size not in SIZES:
            return refuse(endpoint, key, 400, f"Invalid value: '{size}'. Supported values are: "
                          f"{', '.join(sorted(SIZES))}.", param="size")
        form = body.get("response_format")
        if model.b64_only and form is not None:
            return refuse(endpoint, key, 400, "Unknown parameter: 'response_format'.", param="response_format",
                          code="unknown_parameter")
        if form not in (None, "url", "b64_json"):
            return refuse(endpoint, key, 400, f"Invalid value: '{form}'. Supported values are: 'url' and "
                          "'b64_json'.", param="response_format")
        markers = parse_markers(prompt)
        if markers.blocked:
            code = "moderation_blocked" if model.b64_only else "content_policy_violation"
            return refuse(endpoint, key, 400, "Your request was rejected as a result of our safety system.",
                          code=code)
        if markers.error:
            return refuse(endpoint, key, 500, "The server had an error while processing your request.",
                          "server_error")
        assert key is not None
        if not state.charge(key, model.price * n):
            return short_of_quota(endpoint, key)
        if markers.delay:
            await asyncio.sleep(markers.delay)
        data: list[dict[str, Any]] = []
        for _ in range(n):
            if model.b64_only or form == "b64_json":
                data.append({"b64_json": base64.b64encode(PNG_BYTES).decode("ascii")})
            else:
                data.append({"url": state.file_url(request, f"oa-{state.next_id()}.png"), "revised_prompt": prompt})
        answer: dict[str, Any] = {"created": int(time.time()), "data": data}
        if model.b64_only:
            answer["output_format"] = "png"
        return reply(endpoint, key, answer)

    @post("/v1/images/generations", status_code=200)
    async def generations(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await images("images", request)

    @post("/v1/images/edits", status_code=200)
    async def edits(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await images("edits", request)  # the JSON form (images by URL); multipart is not simulated

    def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        where = f"{request.method} {request.url.path}"
        message = {404: f"Invalid URL ({where})", 405: f"Method not allowed ({where})"}.get(
            exc.status_code, str(exc.detail))
        return refuse(classify(request.url.path), None, exc.status_code, message)

    def on_crash(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        log.exception("openai-compatible sim handler failed")
        return refuse(classify(request.url.path), None, 500, "The server had an error while processing your "
                      "request.", "server_error")

    app = Litestar(
        route_handlers=[files_route(state), models, chat, generations, edits],
        exception_handlers={HTTPException: on_http_error, Exception: on_crash},
        openapi_config=None,
        logging_config=None,
    )
    # Outermost wrapper: sees every request and uvicorn's raw send (see faults.py).
    app.asgi_handler = FaultMiddleware(app.asgi_handler, state)  # type: ignore[arg-type,assignment]
    return app
