"""Fengyuan (AI逢源): services, invoke, task polling, the task list, user info; both envelopes in use.

Documented: `{"success": true|false, "data"|"message"+"code": "ERROR_CODE"}` with HTTP
status codes. Seen from the running service: `{"code": 0|N, "message", "data"}`, errors
often with HTTP 200. Every endpoint accepts both.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from proxy.errors import Kind, ProxyError
from proxy.providers.base import (
    Answer,
    Dialect,
    ImageCall,
    KeyInfo,
    ModelInfo,
    ModelKind,
    TaskList,
    TaskState,
    TaskStatus,
    UpstreamCall,
    as_float,
    as_int,
    as_text,
    first_match,
    normalise_phrase,
    unreadable,
)

KINDS: dict[str, ModelKind] = {"image": "image", "video": "video", "audio": "audio", "music": "audio"}

STATES: dict[str, TaskStatus] = {
    "pending": "pending", "queued": "pending", "waiting": "pending", "created": "pending",
    "processing": "running", "running": "running", "in_progress": "running",
    "completed": "succeeded", "success": "succeeded", "succeeded": "succeeded", "done": "succeeded",
    "failed": "failed", "failure": "failed", "error": "failed", "cancelled": "failed",
    "canceled": "failed", "timeout": "failed",
}

BUSINESS_CODES = {400: Kind.BAD_REQUEST, 40001: Kind.BALANCE, 300202: Kind.BALANCE, 40002: Kind.UPSTREAM_UNAVAILABLE,
                  40003: Kind.CONTENT_POLICY, 401: Kind.AUTH, 403: Kind.BALANCE, 429: Kind.RATE_LIMITED,
                  404: Kind.MODEL_NOT_FOUND}
STATUS_KINDS = {401: Kind.AUTH, 403: Kind.BALANCE, 404: Kind.MODEL_NOT_FOUND, 429: Kind.RATE_LIMITED}
# Words in an error code or message, matched loosely when the number says nothing.
WORDS: list[tuple[tuple[str, ...], Kind]] = [
    (("credit", "balance", "quota", "积分", "余额"), Kind.BALANCE),
    (("rate limit", "too many", "too frequent", "频繁"), Kind.RATE_LIMITED),
    (("api key", "apikey", "unauthorized", "unauthorised", "invalid key", "auth", "密钥"), Kind.AUTH),
    (("moderation", "blocked", "sensitive", "violation", "违规", "敏感"), Kind.CONTENT_POLICY),
    (("not found", "not exist", "不存在"), Kind.MODEL_NOT_FOUND),
]

# Where a finished task may keep its result (undocumented): URLs under these keys, at any depth.
URL_KEYS = frozenset({
    "result_url", "result_urls", "url", "urls", "image", "images", "image_url", "image_urls",
    "video_url", "video_urls", "audio_url", "audio_urls", "file_url", "file_urls", "output", "outputs",
    "result", "results", "data",
})
# Echoed request parameters hold reference images, not results.
SKIP_KEYS = frozenset({"params", "input", "inputs", "request", "image_input", "product_image"})
REASON_KEYS = ("error_msg", "error_message", "fail_reason", "reason", "error", "message", "msg")
# Where a task list keeps its tasks (undocumented): the first of these that is a list.
LIST_KEYS = ("tasks", "list", "items", "records", "rows", "data")

# OpenAI's size -> Fengyuan's aspect_ratio (the nearest of these) and size class (by the longer side).
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "5:4", "4:5")
SIZE_CLASSES = ((1600, "1K"), (3000, "2K"), (math.inf, "4K"))
# Reference images by model kind: (the parameter with the whole list, the one with the first URL).
REFERENCE_PARAMS: dict[str, tuple[str, str]] = {"video": ("image_urls", "image_url")}
DEFAULT_REFERENCE_PARAMS = ("image_input", "product_image")

NORMAL_LIMIT, VIP_LIMIT = 60, 300  # calls a minute per key (the docs)
LIST_LIMIT = 100  # tasks per page of /api/task/list at most (the docs)


def collect_urls(value: Any, under_url_key: bool = False, found: list[str] | None = None) -> list[str]:
    found = [] if found is None else found
    if isinstance(value, dict):
        for key, item in value.items():
            lowered = str(key).lower()
            if lowered not in SKIP_KEYS:
                collect_urls(item, lowered in URL_KEYS, found)
    elif isinstance(value, list):
        for item in value:
            collect_urls(item, under_url_key, found)
    elif under_url_key and isinstance(value, str) and re.match(r"https?://", value) and value not in found:
        found.append(value)
    return found


def size_params(size: str | None) -> dict[str, str]:
    """OpenAI's "1536x1024" -> {"aspect_ratio": "3:2", "size": "1K"}; "2K" or "16:9" pass as such."""
    if not size or size == "auto":
        return {}
    if re.fullmatch(r"[124]K", size, re.I):
        return {"size": size.upper()}
    if re.fullmatch(r"\d+:\d+", size):
        return {"aspect_ratio": size}
    match = re.fullmatch(r"(\d+)\s*[x×*]\s*(\d+)", size.strip().lower())
    if not match or not int(match[1]) or not int(match[2]):
        return {}
    width, height = int(match[1]), int(match[2])

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(width / height) - math.log(int(w) / int(h)))

    longest = max(width, height)
    return {"aspect_ratio": min(ASPECT_RATIOS, key=distance),
            "size": next(name for bound, name in SIZE_CLASSES if longest <= bound)}


def reference_params(kind: str, references: list[str]) -> dict[str, Any]:
    if not references:
        return {}
    many, first = REFERENCE_PARAMS.get(kind, DEFAULT_REFERENCE_PARAMS)
    return {many: references, first: references[0]}


def classify(code: Any, message: str, status: int) -> Kind:
    if isinstance(code, int | str) and str(code).isdigit() and int(code) in BUSINESS_CODES:
        return BUSINESS_CODES[int(code)]
    if status in STATUS_KINDS:
        return STATUS_KINDS[status]
    found = first_match(normalise_phrase(f"{code if isinstance(code, str) else ''} {message}"), WORDS)
    if found is not None:
        return found
    return Kind.BAD_REQUEST if status == 400 else Kind.UPSTREAM_UNAVAILABLE


def text(value: Any) -> str:
    """A reason as text: as given, or as JSON when the upstream sent a structure."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def task_state(data: dict[str, Any], task_id: str | None, whole: bool = True) -> TaskState:
    """A task as the invoke, detail and list endpoints describe it. `whole`: the answer is the
    task's full record, so a finished task without a result URL has failed (a list entry may
    leave its result out: it stays "succeeded" with no URLs, to be read in full)."""
    raw_id = data.get("task_id") or data.get("id") or task_id
    status = STATES.get(str(data.get("status", "")).lower().strip(), "running")
    urls = collect_urls(data) if status == "succeeded" else []
    reason = None
    if status == "succeeded" and not urls and whole:
        status, reason = "failed", "the task finished without a result URL"
    elif status == "failed":
        reason = next((text(data[k]) for k in REASON_KEYS if data.get(k)), None)
    return TaskState(status=status, task_id=None if raw_id is None else str(raw_id), urls=urls,
                     progress=as_float(data.get("progress")), reason=reason,
                     cost=as_float(data.get("cost")), balance=as_float(data.get("balance")))


class Fengyuan(Dialect):
    has_balance = True
    models_need_key = False  # the service list is the one endpoint without auth

    def auth(self, key: str) -> dict[str, str]:
        return {"x-api-key": key, "authorization": f"Bearer {key}"}

    def check(self, answer: Answer) -> Any:
        body = answer.body
        if not isinstance(body, dict):
            kind = STATUS_KINDS.get(answer.status)
            if kind is not None:
                raise ProxyError(kind, f"{self.name} upstream answered HTTP {answer.status}",
                                 retry_after=answer.retry_after)
            raise unreadable(self.name, answer)
        code = body.get("code")
        ok = body.get("success") is True or (body.get("success") is None and (
            code in (0, "0", 200, "200") or (code is None and "data" in body)))
        if ok and answer.status < 400:
            return body.get("data")
        message = str(body.get("message") or body.get("msg") or body.get("error") or "unknown error")
        raise ProxyError(classify(code, message, answer.status), f"{self.name}: {message}",
                         retry_after=answer.retry_after)

    def models_request(self) -> UpstreamCall:
        return UpstreamCall("GET", "api/service/list")

    def parse_models(self, payload: Any) -> list[ModelInfo]:
        services = payload.get("services") if isinstance(payload, dict) else payload
        if not isinstance(services, list):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: service list answered no services")
        return [ModelInfo(id=str(service["service_code"]),
                          kind=KINDS.get(str(service.get("category") or "").lower(), "other"),
                          price=as_float(service.get("cost_per_request")), name=as_text(service.get("name")),
                          vip_discount=as_float(service.get("vip_discount")))
                for service in services if isinstance(service, dict) and service.get("service_code")]

    def submit_request(self, call: ImageCall) -> UpstreamCall:
        params: dict[str, Any] = {**size_params(call.size), **call.extra, "prompt": call.prompt}
        for name, value in reference_params(call.kind, call.references).items():
            params.setdefault(name, value)
        return UpstreamCall("POST", "api/service/invoke", json={"service_code": call.model, "params": params})

    def parse_submit(self, payload: Any) -> TaskState:
        if not isinstance(payload, dict):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: invoke answered no task")
        state = task_state(payload, None)
        if state.task_id is None and not state.final:
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: invoke answered no task id")
        return state

    def poll_request(self, task_id: str) -> UpstreamCall:
        return UpstreamCall("GET", f"api/service/task/{task_id}")

    def parse_poll(self, task_id: str, payload: Any) -> TaskState:
        if not isinstance(payload, dict):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: task {task_id} answered no data")
        return task_state(payload, task_id)

    def list_request(self, page: int) -> UpstreamCall:
        """One page of the key's tasks, newest first."""
        return UpstreamCall("GET", "api/task/list", params={"page": str(page), "limit": str(LIST_LIMIT)})

    def parse_list(self, payload: Any) -> TaskList | None:
        """The tasks of a list page (each with its id), or None when the shape is not one we know."""
        tasks = payload
        if isinstance(payload, dict):
            tasks = next((v for k in LIST_KEYS if isinstance(v := payload.get(k), list)), None)
        if not isinstance(tasks, list):
            return None
        states = [task_state(t, None, whole=False) for t in tasks if isinstance(t, dict)]
        meta = payload if isinstance(payload, dict) else {}
        # A full page means more may follow: full by the page size the answer names (an upstream
        # may give fewer than asked), and short of the total when it names one.
        limit = as_int(meta.get("limit")) or LIST_LIMIT
        total, page = as_int(meta.get("total")), as_int(meta.get("page"))
        more = bool(tasks) and len(tasks) >= limit and (total is None or page is None or page * limit < total)
        return TaskList([s for s in states if s.task_id is not None], full=more)

    def balance_request(self) -> UpstreamCall:
        return UpstreamCall("GET", "api/user/info")

    def parse_balance(self, payload: Any) -> KeyInfo | None:
        if not isinstance(payload, dict):
            return None
        return KeyInfo(credits=as_float(payload.get("credits")), vip_level=as_int(payload.get("vip_level")))

    def key_limit(self, vip_level: int | None) -> int | None:
        return VIP_LIMIT if (vip_level or 0) >= 1 else NORMAL_LIMIT
