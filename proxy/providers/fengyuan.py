"""Fengyuan (AI逢源): services, invoke, task polling, user info; both envelopes in use.

Documented: `{"success": true|false, "data"|"message"+"code": "ERROR_CODE"}` with HTTP
status codes. Seen from the running service: `{"code": 0|N, "message", "data"}`, errors
often with HTTP 200. Every endpoint accepts both.
"""

from __future__ import annotations

import math
import re
from typing import Any

from proxy.config import ProviderConfig
from proxy.errors import Kind, ProxyError
from proxy.providers.base import (
    ChatAnswer,
    ChatCall,
    HTTPUpstream,
    ImageCall,
    KeyInfo,
    ModelInfo,
    ModelKind,
    Observe,
    Response,
    Sent,
    TaskState,
    TaskStatus,
    as_float,
    normalise_phrase,
)
from proxy.upstream_http import UpstreamClient

_KINDS: dict[str, ModelKind] = {"image": "image", "video": "video", "audio": "audio", "music": "audio"}

_STATES: dict[str, TaskStatus] = {
    "pending": "pending", "queued": "pending", "waiting": "pending", "created": "pending",
    "processing": "running", "running": "running", "in_progress": "running",
    "completed": "succeeded", "success": "succeeded", "succeeded": "succeeded", "done": "succeeded",
    "failed": "failed", "failure": "failed", "error": "failed", "cancelled": "failed",
    "canceled": "failed", "timeout": "failed",
}

_BUSINESS_CODES = {40001: Kind.BALANCE, 300202: Kind.BALANCE, 40002: Kind.UPSTREAM_UNAVAILABLE,
                   40003: Kind.CONTENT_POLICY, 401: Kind.AUTH, 403: Kind.BALANCE, 429: Kind.RATE_LIMITED,
                   404: Kind.MODEL_NOT_FOUND}
_STATUS_KINDS = {401: Kind.AUTH, 403: Kind.BALANCE, 404: Kind.MODEL_NOT_FOUND, 429: Kind.RATE_LIMITED,
                 400: Kind.BAD_REQUEST}
# Words in an error code or message, matched loosely when the number says nothing.
_WORDS: list[tuple[tuple[str, ...], Kind]] = [
    (("credit", "balance", "quota", "积分", "余额"), Kind.BALANCE),
    (("rate limit", "too many", "too frequent", "频繁"), Kind.RATE_LIMITED),
    (("api key", "apikey", "unauthorized", "unauthorised", "invalid key", "auth", "密钥"), Kind.AUTH),
    (("moderation", "blocked", "sensitive", "violation", "违规", "敏感"), Kind.CONTENT_POLICY),
    (("not found", "not exist", "不存在"), Kind.MODEL_NOT_FOUND),
]

# Where a finished task may keep its result (undocumented): URLs under these keys, at any depth.
_URL_KEYS = frozenset({
    "result_url", "result_urls", "url", "urls", "image", "images", "image_url", "image_urls",
    "video_url", "video_urls", "audio_url", "audio_urls", "file_url", "file_urls", "output", "outputs",
    "result", "results", "data",
})
# Echoed request parameters hold reference images, not results.
_SKIP_KEYS = frozenset({"params", "input", "inputs", "request", "image_input", "product_image"})
_REASON_KEYS = ("error_msg", "error_message", "fail_reason", "reason", "error", "message", "msg")

_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "5:4", "4:5")


def collect_urls(value: Any, under_url_key: bool = False, found: list[str] | None = None) -> list[str]:
    found = [] if found is None else found
    if isinstance(value, dict):
        for key, item in value.items():
            lowered = str(key).lower()
            if lowered not in _SKIP_KEYS:
                collect_urls(item, lowered in _URL_KEYS, found)
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
    return {"aspect_ratio": min(_RATIOS, key=distance),
            "size": "1K" if longest <= 1600 else "2K" if longest <= 3000 else "4K"}


def _classify(code: Any, message: str, status: int) -> Kind:
    if isinstance(code, int | str) and str(code).isdigit() and int(code) in _BUSINESS_CODES:
        return _BUSINESS_CODES[int(code)]
    if status in _STATUS_KINDS and status != 400:
        return _STATUS_KINDS[status]
    phrase = normalise_phrase(f"{code if isinstance(code, str) else ''} {message}")
    for needles, kind in _WORDS:
        if any(needle in phrase for needle in needles):
            return kind
    if status == 400:
        return Kind.BAD_REQUEST
    return Kind.UPSTREAM_UNAVAILABLE


def _auth(key: str) -> dict[str, str]:
    return {"x-api-key": key, "authorization": f"Bearer {key}"}


class Fengyuan:
    has_balance = True
    def __init__(self, name: str, config: ProviderConfig, http: UpstreamClient,
                 observe: Observe | None = None) -> None:
        self.name = name
        self.upstream = HTTPUpstream(name, config.base_url, http, connect_timeout=config.connect_timeout,
                                     read_timeout=config.read_timeout, observe=observe)

    async def _call(self, method: str, path: str, key: str | None, *, json: Any = None,
                    params: dict[str, str] | None = None) -> Any:
        response = await self.upstream.send(method, path, headers=_auth(key) if key else None, json=json,
                                            params=params)
        return self._unwrap(response)

    def _unwrap(self, response: Response) -> Any:
        body = response.body
        if not isinstance(body, dict):
            kind = _STATUS_KINDS.get(response.status)
            if kind is not None and kind is not Kind.BAD_REQUEST:
                raise ProxyError(kind, f"{self.name} upstream answered HTTP {response.status}",
                                 retry_after=response.retry_after)
            raise self.upstream.garbage(response)
        code = body.get("code")
        ok = body.get("success") is True or (
            body.get("success") is None and code in (0, "0", 200, "200", None) and "data" in body)
        if ok and response.status < 400:
            return body.get("data")
        message = body.get("message") or body.get("msg") or body.get("error") or "unknown error"
        message = str(message)
        kind = _classify(code, message, response.status)
        raise ProxyError(kind, f"{self.name}: {message}", retry_after=response.retry_after)

    async def list_models(self, key: str) -> list[ModelInfo]:
        data = await self._call("GET", "api/service/list", None)  # the one endpoint without auth
        services = data.get("services") if isinstance(data, dict) else data
        if not isinstance(services, list):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: service list answered no services")
        models = []
        for service in services:
            if not isinstance(service, dict) or not service.get("service_code"):
                continue
            category = str(service.get("category") or "").lower()
            name = service.get("name")
            models.append(ModelInfo(
                id=str(service["service_code"]), kind=_KINDS.get(category, "other"),
                price=as_float(service.get("cost_per_request")), name=name if isinstance(name, str) else None,
                vip_discount=as_float(service.get("vip_discount")),
            ))
        return models

    async def chat(self, key: str, call: ChatCall) -> ChatAnswer:
        raise ProxyError(Kind.BAD_REQUEST, f"{self.name} offers no chat models", param="model")

    async def submit_image(self, key: str, call: ImageCall) -> TaskState:
        params: dict[str, Any] = {**size_params(call.size), **call.extra, "prompt": call.prompt}
        if call.references:
            if call.kind == "video":
                params.setdefault("image_url", call.references[0])
                params.setdefault("image_urls", call.references)
            else:
                params.setdefault("image_input", call.references)
                params.setdefault("product_image", call.references[0])
        data = await self._call("POST", "api/service/invoke", key,
                                json={"service_code": call.model, "params": params})
        if not isinstance(data, dict):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: invoke answered no task")
        state = self._state(data, None)
        if state.task_id is None and not state.final:
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: invoke answered no task id")
        return state

    async def poll(self, key: str, task_id: str) -> TaskState:
        return self._poll_state(task_id, await self._call("GET", f"api/service/task/{task_id}", key))

    def send_poll(self, key: str, task_id: str) -> Sent | None:
        return self.upstream.start_get(f"api/service/task/{task_id}", headers=_auth(key))

    def read_poll(self, task_id: str, sent: Sent) -> TaskState:
        return self._poll_state(task_id, self._unwrap(self.upstream.answer(sent)))

    def _poll_state(self, task_id: str, data: Any) -> TaskState:
        if not isinstance(data, dict):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: task {task_id} answered no data")
        return self._state(data, task_id)

    def _state(self, data: dict[str, Any], task_id: str | None) -> TaskState:
        raw_id = data.get("task_id") or data.get("id") or task_id
        status = _STATES.get(str(data.get("status", "")).lower().strip(), "running")
        urls = collect_urls(data) if status == "succeeded" else []
        reason = None
        if status == "succeeded" and not urls:
            status, reason = "failed", "the task finished without a result URL"
        elif status == "failed":
            reason = next((str(data[k]) for k in _REASON_KEYS if data.get(k)), None)
        return TaskState(status=status, task_id=None if raw_id is None else str(raw_id), urls=urls,
                         progress=as_float(data.get("progress")), reason=reason,
                         cost=as_float(data.get("cost")), balance=as_float(data.get("balance")))

    def key_limit(self, vip_level: int | None) -> int | None:
        return 300 if (vip_level or 0) >= 1 else 60  # the docs: 60/min, 300/min for VIP users

    async def balance(self, key: str) -> KeyInfo | None:
        data = await self._call("GET", "api/user/info", key)
        if not isinstance(data, dict):
            return None
        vip = data.get("vip_level")
        return KeyInfo(credits=as_float(data.get("credits")),
                       vip_level=vip if isinstance(vip, int) and not isinstance(vip, bool) else None)
