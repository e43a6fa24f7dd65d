"""Simulated Fengyuan / AI逢源 API, speaking either of its two envelopes.

``envelope = "documented"``: ``{"success", "data"}`` / ``{"success": false, "message",
"code": "ERROR_CODE"}`` with real HTTP statuses. ``envelope = "observed"``: ``{"code": 0,
"message", "data"}`` / ``{"code": N, "message", "data": null}``, errors usually with HTTP
200. Finished tasks keep their result URLs in a place that rotates from task to task,
so a client has to search for them, as the design asks.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath

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

log = logging.getLogger("proxy.sim.fengyuan")

Envelope = Literal["documented", "observed"]
ErrorKind = Literal[
    "auth",
    "credits",
    "bad_request",
    "blocked",
    "ai_error",
    "not_found",
    "rate_limited",
    "internal",
    "method",
]

# kind -> (documented HTTP status, documented code, observed code)
ERRORS: dict[str, tuple[int, str, int]] = {
    "auth": (401, "INVALID_API_KEY", 401),
    "credits": (403, "INSUFFICIENT_CREDITS", 40001),  # observed alternates 40001 / 300202
    "bad_request": (400, "INVALID_PARAMS", 400),
    "blocked": (400, "CONTENT_BLOCKED", 40003),
    "ai_error": (500, "AI_SERVICE_ERROR", 40002),
    "not_found": (404, "NOT_FOUND", 404),
    "rate_limited": (429, "RATE_LIMIT_EXCEEDED", 429),
    "internal": (500, "INTERNAL_ERROR", 500),
    "method": (405, "METHOD_NOT_ALLOWED", 405),
}


@dataclass
class FengyuanKey:
    credits: float
    vip_level: int = 0
    user_id: int = 1
    username: str = "user"
    vip_expire_at: str | None = None


FENGYUAN_DEMO_KEYS: dict[str, FengyuanKey] = {
    "sk-fy-demo-normal": FengyuanKey(10000.0, 0, 1001, "demo_normal"),
    "sk-fy-demo-vip": FengyuanKey(10000.0, 1, 1002, "demo_vip", "2099-12-31"),
    "sk-fy-demo-broke": FengyuanKey(0.0, 0, 1003, "demo_broke"),
}


@dataclass
class FengyuanService:
    id: int
    service_code: str
    name: str
    category: str  # image | video | audio
    description: str
    cost_per_request: float
    vip_discount: float
    model_endpoint: str
    required_params: tuple[str, ...] = ()  # invoke answers 400 "<name> is required" without them

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service_code": self.service_code,
            "name": self.name,
            "category": self.category,
            "description": self.description,
            "cost_per_request": self.cost_per_request,
            "vip_discount": self.vip_discount,
            "model_endpoint": self.model_endpoint,
            "is_active": 1,  # unknown extras: a client must ignore them
            "sort_order": self.id * 10,
        }


def default_services() -> list[FengyuanService]:
    return [
        FengyuanService(
            1,
            "image_generation",
            "通用图像生成",
            "image",
            "基于 AI 的图像生成服务",
            20.0,
            0.8,
            "/api/v1/jobs/createTask",
            ("prompt",),
        ),
        FengyuanService(
            2,
            "product_photo",
            "产品图生成",
            "image",
            "上传产品图,生成商品展示图",
            10.0,
            0.8,
            "/api/v1/jobs/createTask",
            ("product_image",),
        ),
        FengyuanService(
            3,
            "image-video",
            "图生视频",
            "video",
            "由图片或提示词生成短视频",
            50.0,
            0.8,
            "/api/v1/jobs/createVideoTask",
            ("prompt",),
        ),
    ]


@dataclass
class FengyuanTask:
    id: str
    seq: int  # creation order; picks the answer's dialect variants
    key: str
    service_code: str
    category: str
    prompt: str
    created: float  # time.monotonic()
    created_at: str  # ISO timestamp for display
    duration: float
    outcome: Outcome
    cost: float
    instant: bool = False  # finished at invoke
    params: dict[str, Any] = field(default_factory=dict)


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FengyuanSim(CallLog):
    """Mutable state of one simulated Fengyuan service; change attributes between requests."""

    def __init__(
        self,
        keys: dict[str, FengyuanKey] | None = None,
        *,
        envelope: Envelope = "documented",
        seed: int = 0,
        public_base: str = "",
    ) -> None:
        self._init = (keys, envelope, seed)
        source = keys if keys is not None else FENGYUAN_DEMO_KEYS
        self.keys: dict[str, FengyuanKey] = {k: replace(v) for k, v in source.items()}
        self.services: list[FengyuanService] = default_services()
        self.envelope: Envelope = envelope
        self.public_base = public_base  # e.g. "http://127.0.0.1:54321"; "" = from Host
        self.task_seconds = 0.3
        self.rate_limit_normal: int | None = 60  # calls per rate_window per key
        self.rate_limit_vip: int | None = 300  # for vip_level >= 1
        self.rate_window = 60.0
        self.rate_limited_count = 0  # every 429 answered
        self.observed_error_http = 200  # HTTP status of observed-envelope errors
        self.observed_rate_limit_http = 200  # ... and of observed rate-limit errors
        self.retry_after_header = False  # the docs promise no Retry-After
        self.result_variant: int | None = None  # force where results live (0..3); None rotates
        # /api/task/list: how many tasks a page holds at most (the docs: 100), whether it exists
        # (False: 404), an answer of a shape no client knows, and tasks it leaves out
        self.list_page_max = 100
        self.list_enabled = True
        self.list_garbled = False
        self.list_hidden: set[str] = set()
        self.last_invoke_body: dict[str, Any] | None = None
        self.tasks: dict[str, FengyuanTask] = {}
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.calls = []
        self._window = SlidingWindow()
        self._seq = 0
        self._credit_errors = 0

    def reset(self) -> None:
        """Back to construction defaults, keeping ``public_base`` (the server stays bound)."""
        keys, envelope, seed = self._init
        base = self.public_base
        self.__init__(keys, envelope=envelope, seed=seed, public_base=base)  # type: ignore[misc]

    # -- helpers ----------------------------------------------------------------------

    def service(self, code: object) -> FengyuanService | None:
        return next((s for s in self.services if s.service_code == code), None)

    def cost_for(self, service: FengyuanService, account: FengyuanKey) -> float:
        factor = service.vip_discount if account.vip_level >= 1 else 1.0
        return round(service.cost_per_request * factor, 2)

    def new_task_id(self) -> tuple[str, int]:
        self._seq += 1
        digest = hashlib.sha1(f"{self._init[2]}:{self._seq}".encode()).hexdigest()[:10]
        return f"task_{digest}", self._seq

    def file_url(self, request: Request[Any, Any, Any], name: str) -> str:
        base = self.public_base or str(request.base_url)
        return f"{base.rstrip('/')}/files/{name}"

    def draw(self) -> float:
        return self.rng.random()

    def is_poll_path(self, path: str) -> bool:
        return path.startswith("/api/service/task/") or path.rstrip("/") == "/api/task/list"

    def record_fault(self, scope: Scope, status: int) -> None:
        self._log(classify(str(scope.get("path", ""))), key_of(scope_headers(scope)), status)


def scope_headers(scope: Scope) -> dict[str, str]:
    return {name: value for name in ("x-api-key", "authorization") if (value := header(scope, name)) is not None}


def key_of(headers: Any) -> str | None:
    """X-API-Key wins; ``Authorization: Bearer`` is the documented alternative."""
    direct = headers.get("x-api-key")
    if direct and direct.strip():
        return str(direct).strip()
    return bearer(headers.get("authorization"))


def classify(path: str) -> str:
    if path.startswith("/api/service/task/"):
        return "task"
    if path.startswith("/files/"):
        return "file"
    return {
        "/api/service/invoke": "invoke",
        "/api/service/list": "service_list",
        "/api/user/info": "user_info",
        "/api/task/list": "task_list",
    }.get(path.rstrip("/"), "other")


def render_task(state: FengyuanSim, request: Request[Any, Any, Any], task: FengyuanTask) -> dict[str, Any]:
    """The task's ``data`` in the current envelope, its variant chosen by ``task.seq``."""
    phase, progress = task_phase(task.created, task.duration, task.outcome)
    observed = state.envelope == "observed"
    done = "success" if observed and (task.instant or task.seq % 2 == 0) else "completed"
    status = {"pending": "pending", "running": "processing", "success": done, "failed": "failed"}[phase]
    variant = (task.seq - 1) % 4 if state.result_variant is None else state.result_variant % 4
    url = state.file_url(request, f"fy-{task.id}.{EXTENSION.get(task.category, 'png')}")
    video = task.category == "video"
    data: dict[str, Any]
    if observed:
        data = {
            "task_id": task.id,
            "status": status,
            "progress": int(progress),
            "service_code": task.service_code,
            "cost": task.cost,
        }
        if phase == "success":
            names = (
                ("video_url", "video_urls", "result_url", "result_urls")
                if video
                else ("result_url", "result_urls", "image_url", "image_urls")
            )
            name = names[variant]
            data[name] = [url] if name.endswith("s") else url
        if phase == "failed":
            reason_key = ("error_msg", "error_message")[task.seq % 2]
            data[reason_key] = "AI 服务生成失败 (simulated [fail])"
    else:
        data = {
            "id": task.id,
            "status": status,
            "service_code": task.service_code,
            "created_at": task.created_at,
            "updated_at": iso_now(),
        }
        if task.seq % 2 == 0:  # the docs promise no progress: only some tasks carry it
            data["progress"] = int(progress)
        if phase == "success":
            if variant == 0:
                data["result"] = {"videos" if video else "images": [{"url": url}]}
            elif variant == 1:
                data["output"] = [url]
            elif variant == 2:
                data["urls"] = [url]
            else:
                data["result_url"] = url
        if phase == "failed":
            reason_key = ("message", "fail_reason", "reason")[task.seq % 3]
            data[reason_key] = "生成失败:simulated failure ([fail] in prompt)"
    data["queue_position"] = 0  # unknown extras, on purpose
    data["meta"] = {"node": "sim-gpu-1", "trace": f"tr-{task.seq:06d}"}
    return data


def create_fengyuan_app(state: FengyuanSim) -> Litestar:
    def envelope_ok(endpoint: str, key: str | None, data: Any) -> Response[bytes]:
        body: dict[str, Any]
        if state.envelope == "observed":
            body = {"code": 0, "message": "success", "data": data}
        else:
            body = {"success": True, "data": data}
        body["request_id"] = f"req-{len(state.calls) + 1:08d}"  # an unknown extra
        state._log(endpoint, key, 200)
        return Response(msgspec.json.encode(body), status_code=200, media_type="application/json")

    def fail(
        endpoint: str,
        key: str | None,
        kind: ErrorKind,
        message: str,
        *,
        code: str | None = None,
        http: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response[bytes]:
        doc_status, doc_code, obs_code = ERRORS[kind]
        body: dict[str, Any]
        if state.envelope == "observed":
            if kind == "credits":  # the running service uses both codes for this
                obs_code = (40001, 300202)[state._credit_errors % 2]
                state._credit_errors += 1
            body = {"code": obs_code, "message": message, "data": None}
            status = state.observed_rate_limit_http if kind == "rate_limited" else (state.observed_error_http)
        else:
            body = {"success": False, "message": message, "code": code or doc_code}
            status = doc_status
        body["request_id"] = f"req-{len(state.calls) + 1:08d}"  # an unknown extra
        if http is not None:
            status = http
        if status == 429 or kind == "rate_limited":
            state.rate_limited_count += 1
        state._log(endpoint, key, status)
        return Response(
            msgspec.json.encode(body),
            status_code=status,
            media_type="application/json",
            headers=headers,
        )

    def gate(endpoint: str, request: Request[Any, Any, Any]) -> tuple[str, FengyuanKey | None, Response[bytes] | None]:
        """Auth then the per-key rate limit."""
        key = key_of(request.headers)
        account = state.keys.get(key) if key else None
        if key is None or account is None:
            return key or "", None, fail(endpoint, key, "auth", "API密钥无效或已过期 (invalid api key)")
        limit = state.rate_limit_vip if account.vip_level >= 1 else state.rate_limit_normal
        wait = state._window.admit(key, limit, state.rate_window)
        if wait is not None:
            headers = {"Retry-After": retry_after_header(wait)} if state.retry_after_header else None
            return key, None, fail(endpoint, key, "rate_limited", "请求过于频繁,请稍后再试", headers=headers)
        return key, account, None

    @get("/api/service/list", status_code=200)
    async def service_list(request: Request[Any, Any, Any]) -> Response[bytes]:
        await request.body()
        return envelope_ok("service_list", key_of(request.headers), {"services": [s.as_json() for s in state.services]})

    @post("/api/service/invoke", status_code=200)
    async def invoke(request: Request[Any, Any, Any]) -> Response[bytes]:
        raw = await request.body()  # read first: an unread body corrupts keep-alive
        key, account, refused = gate("invoke", request)
        if refused is not None or account is None:
            assert refused is not None
            return refused
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return fail("invoke", key, "bad_request", "请求体不是合法的 JSON (invalid json)")
        if not isinstance(body, dict):
            return fail("invoke", key, "bad_request", "请求体必须是 JSON 对象 (body must be an object)")
        state.last_invoke_body = body
        code = body.get("service_code")
        if not isinstance(code, str) or not code:
            return fail("invoke", key, "bad_request", "service_code is required")
        params = body.get("params")
        if not isinstance(params, dict):
            return fail("invoke", key, "bad_request", "params is required")
        service = state.service(code)
        if service is None:
            return fail("invoke", key, "not_found", f"service not found: {code}", code="SERVICE_NOT_FOUND")
        for name in service.required_params:
            if not params.get(name):
                return fail("invoke", key, "bad_request", f"{name} is required")
        prompt = params.get("prompt", "")
        if not isinstance(prompt, str):
            return fail("invoke", key, "bad_request", "prompt must be a string")
        markers = parse_markers(prompt)
        if markers.blocked:
            return fail("invoke", key, "blocked", "提示词包含违规内容 (prompt blocked by content moderation)")
        if markers.error:
            return fail("invoke", key, "ai_error", "AI 服务调用失败 (AI service error)")
        cost = state.cost_for(service, account)
        if account.credits + 1e-9 < cost:
            return fail("invoke", key, "credits", "积分不足 (insufficient credits)")
        account.credits = round(account.credits - cost, 2)
        task_id, seq = state.new_task_id()
        duration = 0.0 if markers.instant else (markers.delay if markers.delay is not None else state.task_seconds)
        task = FengyuanTask(
            id=task_id,
            seq=seq,
            key=key,
            service_code=service.service_code,
            category=service.category,
            prompt=prompt,
            created=time.monotonic(),
            created_at=iso_now(),
            duration=duration,
            outcome=markers.outcome,
            cost=cost,
            instant=markers.instant,
            params=params,
        )
        state.tasks[task_id] = task
        if markers.instant:
            data = render_task(state, request, task)
        elif state.envelope == "observed":
            data = {"task_id": task_id, "status": "pending"}
        else:
            data = {"id": task_id, "status": "pending", "created_at": task.created_at}
        if state.envelope == "observed":
            data["cost"] = cost
            data["balance"] = account.credits
        return envelope_ok("invoke", key, data)

    @get("/api/service/task/{task_id:str}", status_code=200)
    async def task(request: Request[Any, Any, Any], task_id: FromPath[str]) -> Response[bytes]:
        await request.body()
        key, _account, refused = gate("task", request)
        if refused is not None:
            return refused
        found = state.tasks.get(task_id)
        if found is None or found.key != key:
            return fail("task", key, "not_found", "任务不存在 (task not found)", code="TASK_NOT_FOUND")
        return envelope_ok("task", key, render_task(state, request, found))

    @get("/api/user/info", status_code=200)
    async def user_info(request: Request[Any, Any, Any]) -> Response[bytes]:
        await request.body()
        key, account, refused = gate("user_info", request)
        if refused is not None or account is None:
            assert refused is not None
            return refused
        return envelope_ok(
            "user_info",
            key,
            {
                "id": account.user_id,
                "username": account.username,
                "credits": account.credits,
                "vip_level": account.vip_level,
                "vip_expire_at": account.vip_expire_at,
                "email": f"{account.username}@example.invalid",  # unknown extra
            },
        )

    @get("/api/task/list", status_code=200)
    async def task_list(request: Request[Any, Any, Any]) -> Response[bytes]:
        await request.body()
        key, _account, refused = gate("task_list", request)
        if refused is not None:
            return refused
        if not state.list_enabled:
            return fail("task_list", key, "not_found", "接口不存在 (not found)", http=404)
        query = request.query_params
        try:
            page = int(query.get("page") or 1)
            limit = int(query.get("limit") or 20)
        except ValueError:
            return fail("task_list", key, "bad_request", "page and limit must be integers")
        page, limit = max(page, 1), min(max(limit, 1), state.list_page_max)
        wanted = query.get("status") or None
        if state.list_garbled:
            return envelope_ok("task_list", key, {"result": "ok", "count": len(state.tasks)})
        rows = [render_task(state, request, t) for t in reversed(list(state.tasks.values()))
                if t.key == key and t.id not in state.list_hidden]
        if wanted:
            # "completed" and "success" both name a finished task.
            finished = {"completed", "success"}
            rows = [r for r in rows if r["status"] == wanted or (wanted in finished and r["status"] in finished)]
        chunk = rows[(page - 1) * limit : page * limit]
        if state.envelope == "observed":
            data = {"list": chunk, "total": len(rows), "page": page, "limit": limit}
        else:
            data = {"tasks": chunk, "total": len(rows), "page": page, "limit": limit}
        return envelope_ok("task_list", key, data)

    def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        endpoint = classify(request.url.path)
        if exc.status_code == 405:
            return fail(endpoint, None, "method", "method not allowed", http=405)
        if exc.status_code == 404:
            return fail(endpoint, None, "not_found", "接口不存在 (not found)", http=404)
        return fail(endpoint, None, "bad_request", str(exc.detail), http=exc.status_code)

    def on_crash(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        log.exception("fengyuan sim handler failed")
        return fail(classify(request.url.path), None, "internal", "服务器内部错误", http=500)

    app = Litestar(
        route_handlers=[files_route(state), service_list, invoke, task, user_info, task_list],
        exception_handlers={HTTPException: on_http_error, Exception: on_crash},
        openapi_config=None,
        logging_config=None,
    )
    # Outermost wrapper: sees every request and uvicorn's raw send (see faults.py).
    app.asgi_handler = FaultMiddleware(app.asgi_handler, state)  # type: ignore[arg-type,assignment]
    return app
