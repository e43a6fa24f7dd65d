"""Simulated xffuw API (``/api/v1/models.php``, ``chat.php``, ``image.php``, ``task.php``).

Faithful to the published page plus the field notes: errors are ``{"error": text}`` with
an HTTP status the docs never give (``error_status``, 200 by default), chat answers only
``choices[0].message.content``, ``task.php`` progress comes as a number, a ``"40%"``
string or ``""`` depending on the task.

Chat echoes the last user message after ``CHAT_PREFIX``, unless the request sends ``tools``,
``response_format`` or tool results: then it answers as an OpenAI-compatible model does,
tool calls and JSON included, by the rules in ``chat_model.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException

from proxy.sim import chat_model
from proxy.sim.assets import EXTENSION, files_route
from proxy.sim.faults import (
    CallLog,
    FaultMiddleware,
    Faults,
    Outcome,
    Scope,
    SlidingWindow,
    bearer,
    header,
    parse_markers,
    retry_after_header,
    task_phase,
)

log = logging.getLogger("proxy.sim.xffuw")

XFFUW_DEMO_KEYS: dict[str, float] = {
    "xf_demo_alpha": 1000.0,
    "xf_demo_beta": 1000.0,
    "xf_demo_broke": 0.0,
}
CHAT_PREFIX = "你好!我是 AI 助手。You said: "
MEDIA_TYPES = frozenset({"image", "video", "audio"})


@dataclass
class XffuwModel:
    slug: str
    name: str
    type: str  # chat | image | video | audio
    price: str  # a decimal string, as the platform sends it
    description: str = ""
    instant: bool = False  # image.php answers result_url at once (not listed by models.php)

    def as_json(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "name": self.name,
            "type": self.type,
            "price": self.price,
            "description": self.description,
        }


def default_models() -> list[XffuwModel]:
    return [
        XffuwModel("gpt-4o-mini", "GPT-4o Mini", "chat", "0.5000", "OpenAI 轻量对话模型"),
        XffuwModel("deepseek-chat", "DeepSeek Chat", "chat", "0.2000", "DeepSeek 对话模型"),
        XffuwModel("gpt-image-2", "GPT Image 2", "image", "2.0000", "异步图像生成"),
        XffuwModel("flux-schnell", "FLUX Schnell", "image", "1.0000", "即时图像生成", True),
        XffuwModel("kling-video", "Kling Video", "video", "5.0000", "异步视频生成"),
        XffuwModel("suno-music", "Suno Music", "audio", "3.0000", "异步音乐生成"),
        # Same id as a Fengyuan service_code, for the proxy's id-collision handling.
        XffuwModel("image_generation", "通用图像生成", "image", "1.5000", "异步图像生成"),
    ]


@dataclass
class XffuwTask:
    id: str  # digits
    key: str
    model: str
    media_type: str
    prompt: str
    created: float  # time.monotonic()
    duration: float
    outcome: Outcome


class XffuwSim(CallLog):
    """Mutable state of one simulated xffuw service; change attributes between requests."""

    def __init__(self, keys: dict[str, float] | None = None, *, seed: int = 0, public_base: str = "") -> None:
        self._init_keys = dict(keys) if keys is not None else None
        self._seed = seed
        self.keys: dict[str, float] = dict(keys if keys is not None else XFFUW_DEMO_KEYS)
        self.models: list[XffuwModel] = default_models()
        self.public_base = public_base  # e.g. "http://127.0.0.1:54321"; "" = from Host
        self.error_status = 200  # HTTP status of every {"error": ...} body
        self.content_type = "application/json; charset=utf-8"  # PHP hosts may say text/html
        self.models_require_auth = True  # the docs: every endpoint needs the key
        self.task_seconds = 0.3
        self.rate_limit: int | None = None  # calls per key per rate_window; None = unlimited
        self.rate_window = 60.0
        self.rate_limited_count = 0
        self.chat_extra: dict[str, Any] = {}  # merged into every chat answer
        self.chat_error_keys: set[str] = set()  # chat with these keys answers an upstream error
        self.last_chat_body: dict[str, Any] | None = None
        self.last_image_body: dict[str, Any] | None = None
        self.tasks: dict[str, XffuwTask] = {}
        self.polled: dict[str, list[float]] = {}  # task id -> time.monotonic() of each poll it answered
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.calls = []
        self._window = SlidingWindow()
        self._seq = 0
        self._call_seq = 0

    def reset(self) -> None:
        """Back to construction defaults, keeping ``public_base`` (the server stays bound)."""
        base = self.public_base
        self.__init__(self._init_keys, seed=self._seed, public_base=base)  # type: ignore[misc]

    # -- helpers the handlers and the fault layer use --------------------------------

    def model(self, slug: object) -> XffuwModel | None:
        return next((m for m in self.models if m.slug == slug), None)

    def charge(self, key: str, price: str) -> bool:
        cost = float(price)
        if self.keys.get(key, 0.0) + 1e-9 < cost:
            return False
        self.keys[key] = round(self.keys[key] - cost, 4)
        return True

    def new_task_id(self) -> str:
        self._seq += 1
        return str(123456788 + self._seq)

    def new_call_id(self) -> str:
        self._call_seq += 1
        return f"call_xf{self._call_seq:019d}"

    def file_url(self, request: Request[Any, Any, Any], name: str) -> str:
        base = self.public_base or str(request.base_url)
        return f"{base.rstrip('/')}/files/{name}"

    def draw(self) -> float:
        return self.rng.random()

    def is_poll_path(self, path: str) -> bool:
        return path.endswith("/task.php")

    def record_fault(self, scope: Scope, status: int) -> None:
        key = bearer(header(scope, "authorization"))
        self._log(classify(str(scope.get("path", ""))), key, status)


def classify(path: str) -> str:
    if path.startswith("/files/"):
        return "file"
    name = path.rsplit("/", 1)[-1]
    return {"models.php": "models", "chat.php": "chat", "image.php": "image", "task.php": "task"}.get(name, "other")


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return chat_model.text_of(message.get("content"))
    return ""


def create_xffuw_app(state: XffuwSim, base_path: str = "/api/v1") -> Litestar:
    base = "/" + base_path.strip("/") if base_path.strip("/") else ""

    def reply(
        endpoint: str, key: str | None, payload: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response[bytes]:
        state._log(endpoint, key, status)
        # An explicit header, because Litestar would append a second charset to text/* types.
        return Response(
            msgspec.json.encode(payload),
            status_code=status,
            headers={"content-type": state.content_type, **(headers or {})},
        )

    def error(endpoint: str, key: str | None, text: str) -> Response[bytes]:
        return reply(endpoint, key, {"error": text}, state.error_status)

    def gate(endpoint: str, request: Request[Any, Any, Any]) -> tuple[str | None, Response[bytes] | None]:
        """Auth then rate limit: the key, or the error answer to send."""
        key = bearer(request.headers.get("authorization"))
        if key is None or key not in state.keys:
            return key, error(endpoint, key, "invalid api key")
        wait = state._window.admit(key, state.rate_limit, state.rate_window)
        if wait is not None:
            state.rate_limited_count += 1
            return key, reply(
                endpoint,
                key,
                {"error": "rate limit exceeded"},
                429,
                {"Retry-After": retry_after_header(wait)},
            )
        return key, None

    async def json_body(request: Request[Any, Any, Any]) -> dict[str, Any] | None:
        raw = await request.body()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return None
        return body if isinstance(body, dict) else None

    @get(f"{base}/models.php", status_code=200)
    async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
        await request.body()
        key = bearer(request.headers.get("authorization"))
        if state.models_require_auth:
            key, refused = gate("models", request)
            if refused is not None:
                return refused
        return reply("models", key, {"data": [m.as_json() for m in state.models]})

    @post(f"{base}/chat.php", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[bytes]:
        body = await json_body(request)  # read before any answer: keeps keep-alive sane
        key, refused = gate("chat", request)
        if refused is not None:
            return refused
        if body is None:
            return error("chat", key, "invalid json body")
        state.last_chat_body = body
        model = state.model(body.get("model"))
        if model is None or model.type != "chat":
            return error("chat", key, "model not found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error("chat", key, "messages required")
        text = last_user_text(messages)
        markers = parse_markers(text)
        if markers.blocked:
            return error("chat", key, "prompt blocked by content moderation")
        if markers.error or key in state.chat_error_keys:
            return error("chat", key, "upstream service error, please retry later")
        assert key is not None
        if not state.charge(key, model.price):
            return error("chat", key, "insufficient balance")
        if markers.delay:
            await asyncio.sleep(markers.delay)  # a slow model, for proxy timeout tests
        choice = chat_model.answer(body, markers, state.new_call_id)
        answer: dict[str, Any] = {"choices": [{"message": {"content": CHAT_PREFIX + text}}] if choice is None
                                  else [{"index": 0, **choice}]}
        answer.update(state.chat_extra)
        return reply("chat", key, answer)

    @post(f"{base}/image.php", status_code=200)
    async def image(request: Request[Any, Any, Any]) -> Response[bytes]:
        body = await json_body(request)
        key, refused = gate("image", request)
        if refused is not None:
            return refused
        if body is None:
            return error("image", key, "invalid json body")
        state.last_image_body = body
        model = state.model(body.get("model"))
        if model is None or model.type not in MEDIA_TYPES:
            return error("image", key, "model not found")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return error("image", key, "prompt required")
        images = body.get("images")
        if images is not None and not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
            return error("image", key, "images must be an array of urls")
        markers = parse_markers(prompt)
        if markers.blocked:
            return error("image", key, "prompt blocked by content moderation")
        if markers.error:
            return error("image", key, "upstream service error, please retry later")
        instant = model.instant or markers.instant
        if instant and markers.fail:
            return error("image", key, "generation failed: simulated failure")
        assert key is not None
        if not state.charge(key, model.price):
            return error("image", key, "insufficient balance")
        task_id = state.new_task_id()
        ext = EXTENSION.get(model.type, "png")
        if instant:
            if markers.delay:
                await asyncio.sleep(markers.delay)  # instant models answer slowly, synchronously
            url = state.file_url(request, f"xf-{task_id}.{ext}")
            return reply("image", key, {"ok": True, "result_url": url, "type": model.type})
        state.tasks[task_id] = XffuwTask(
            id=task_id,
            key=key,
            model=model.slug,
            media_type=model.type,
            prompt=prompt,
            created=time.monotonic(),
            duration=markers.delay if markers.delay is not None else state.task_seconds,
            outcome=markers.outcome,
        )
        return reply("image", key, {"ok": True, "task_id": task_id, "type": model.type})

    @get(f"{base}/task.php", status_code=200)
    async def task(request: Request[Any, Any, Any]) -> Response[bytes]:
        await request.body()
        key, refused = gate("task", request)
        if refused is not None:
            return refused
        task_id = request.query_params.get("task_id")
        if not task_id:
            return error("task", key, "task_id required")
        found = state.tasks.get(task_id)
        if found is None or found.key != key:
            return error("task", key, "task not found")
        state.polled.setdefault(task_id, []).append(time.monotonic())
        phase, progress = task_phase(found.created, found.duration, found.outcome)
        number = int(found.id)
        # The platform's progress has no fixed form: a number, "40%", or "".
        shown: int | str = (int(progress), f"{int(progress)}%", "")[number % 3]
        result: str | None = "" if number % 2 == 0 else None
        if phase == "success":
            result = state.file_url(request, f"xf-{found.id}.{EXTENSION.get(found.media_type, 'png')}")
        answer: dict[str, Any] = {
            "is_final": phase in ("success", "failed"),
            "state": phase,
            "result_url": result,
            "media_type": found.media_type,
            "progress": shown,
        }
        if phase == "failed":
            answer["fail_reason"] = "生成失败:simulated failure ([fail] in prompt)"
        return reply("task", key, answer)

    def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        text = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return reply(classify(request.url.path), None, {"error": text}, exc.status_code)

    def on_crash(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        log.exception("xffuw sim handler failed")
        return reply(classify(request.url.path), None, {"error": "internal server error"}, 500)

    app = Litestar(
        route_handlers=[files_route(state), models, chat, image, task],
        exception_handlers={HTTPException: on_http_error, Exception: on_crash},
        openapi_config=None,
        logging_config=None,
    )
    # Outermost wrapper: sees every request and uvicorn's raw send (see faults.py).
    app.asgi_handler = FaultMiddleware(app.asgi_handler, state)  # type: ignore[arg-type,assignment]
    return app
