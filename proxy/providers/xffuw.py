"""xffuw: models.php, chat.php, image.php and task.php, and its `{"error": "…"}` dialect."""

from __future__ import annotations

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

_KINDS: dict[str, ModelKind] = {"chat": "chat", "text": "chat", "image": "image", "video": "video",
                                "audio": "audio", "music": "audio"}

_STATES: dict[str, TaskStatus] = {
    "pending": "pending", "queued": "pending", "waiting": "pending",
    "running": "running", "processing": "running", "in_progress": "running",
    "success": "succeeded", "succeeded": "succeeded", "completed": "succeeded", "done": "succeeded",
    "failed": "failed", "failure": "failed", "error": "failed", "cancelled": "failed", "canceled": "failed",
}

# Known error phrases, matched loosely; the first hit wins.
_PHRASES: list[tuple[tuple[str, ...], Kind]] = [
    (("invalid api key", "invalid key", "api key", "unauthorized", "unauthorised", "密钥"), Kind.AUTH),
    (("insufficient balance", "balance", "insufficient", "余额", "算力不足"), Kind.BALANCE),
    (("model not found", "no such model", "unknown model", "模型不存在"), Kind.MODEL_NOT_FOUND),
    (("rate limit", "too many requests", "too frequent", "频繁"), Kind.RATE_LIMITED),
    (("blocked", "moderation", "sensitive", "违规", "敏感"), Kind.CONTENT_POLICY),
    # an immediate-result model that failed at submit: a finished, paid task, not a transport problem
    (("generation failed", "生成失败"), Kind.TASK_FAILED),
]

_STATUS_KINDS = {401: Kind.AUTH, 403: Kind.AUTH, 402: Kind.BALANCE, 429: Kind.RATE_LIMITED}


# Fields of a successful answer: a body with one of them is not an error body, even if a
# failed task carries an "error" reason.
_ANSWER_FIELDS = ("choices", "task_id", "result_url", "is_final", "state", "data")


def _error_text(body: Any) -> str | None:
    if not isinstance(body, dict) or not body.get("error") or any(f in body for f in _ANSWER_FIELDS):
        return None
    error = body["error"]
    if isinstance(error, dict):  # tolerate an OpenAI-like {"error": {"message": …}}
        error = error.get("message") or error.get("msg") or error.get("code")
    return str(error)


def classify(text: str) -> Kind:
    phrase = normalise_phrase(text)
    for needles, kind in _PHRASES:
        if any(needle in phrase for needle in needles):
            return kind
    return Kind.UPSTREAM_UNAVAILABLE  # the design: an unknown text is an upstream error, whatever the status


class Xffuw:
    has_balance = False
    def __init__(self, name: str, config: ProviderConfig, http: UpstreamClient,
                 observe: Observe | None = None) -> None:
        self.name = name
        self.upstream = HTTPUpstream(name, config.base_url, http, connect_timeout=config.connect_timeout,
                                     read_timeout=config.read_timeout, observe=observe)

    async def _call(self, method: str, path: str, key: str | None, *, json: Any = None,
                    params: dict[str, str] | None = None) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {key}"} if key else None
        response = await self.upstream.send(method, path, headers=headers, json=json, params=params)
        return self._check(response)

    def _check(self, response: Response) -> dict[str, Any]:
        # The status of an error is undocumented: the body decides, 200 included.
        text = _error_text(response.body)
        if text is not None:
            kind = classify(text)
            raise ProxyError(kind, f"{self.name}: {text}", retry_after=response.retry_after)
        if response.status >= 400 or not isinstance(response.body, dict):
            kind = _STATUS_KINDS.get(response.status)
            if kind is not None:
                raise ProxyError(kind, f"{self.name} upstream answered HTTP {response.status}",
                                 retry_after=response.retry_after)
            raise self.upstream.garbage(response)
        return response.body

    async def list_models(self, key: str) -> list[ModelInfo]:
        body = await self._call("GET", "models.php", key)
        entries = body.get("data")
        if not isinstance(entries, list):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: models.php answered no data list")
        models = []
        for entry in entries:
            if not isinstance(entry, dict) or not entry.get("slug"):
                continue
            kind = _KINDS.get(str(entry.get("type", "")).lower(), "other")
            models.append(ModelInfo(id=str(entry["slug"]), kind=kind, price=as_float(entry.get("price")),
                                    name=entry.get("name") if isinstance(entry.get("name"), str) else None))
        return models

    async def chat(self, key: str, call: ChatCall) -> ChatAnswer:
        body = await self._call("POST", "chat.php", key,
                                json={**call.params, "model": call.model, "messages": call.messages})
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: chat.php answered no choices")
        first = choices[0]
        message = first.get("message") if isinstance(first.get("message"), dict) else {}
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return ChatAnswer(
            content=content if isinstance(content, str) else None,
            tool_calls=tool_calls if isinstance(tool_calls, list) and tool_calls else None,
            finish_reason=first.get("finish_reason") if isinstance(first.get("finish_reason"), str) else None,
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
        )

    async def submit_image(self, key: str, call: ImageCall) -> TaskState:
        payload: dict[str, Any] = {**call.extra, "model": call.model, "prompt": call.prompt}
        if call.references:
            payload["images"] = call.references
        body = await self._call("POST", "image.php", key, json=payload)
        media = body.get("type") if isinstance(body.get("type"), str) else None
        url = body.get("result_url")
        if isinstance(url, str) and url:
            return TaskState(status="succeeded", urls=[url], media_type=media)
        task_id = body.get("task_id")
        if task_id in (None, ""):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: image.php answered neither task_id "
                             "nor result_url")
        return TaskState(status="pending", task_id=str(task_id), media_type=media)

    async def poll(self, key: str, task_id: str) -> TaskState:
        return self._poll_state(task_id, await self._call("GET", "task.php", key, params={"task_id": task_id}))

    def send_poll(self, key: str, task_id: str) -> Sent | None:
        return self.upstream.start_get("task.php", headers={"authorization": f"Bearer {key}"},
                                       params={"task_id": task_id})

    def read_poll(self, task_id: str, sent: Sent) -> TaskState:
        return self._poll_state(task_id, self._check(self.upstream.answer(sent)))

    def _poll_state(self, task_id: str, body: dict[str, Any]) -> TaskState:
        state = _STATES.get(str(body.get("state", "")).lower().strip())
        url = body.get("result_url")
        urls = [url] if isinstance(url, str) and url else []
        if state != "failed" and urls:
            state = "succeeded"  # the docs: poll until is_final or a result_url
        elif body.get("is_final") is True and state not in ("succeeded", "failed"):
            state = "failed"
        if state == "succeeded" and not urls:
            state, reason = "failed", "the task finished without a result URL"
        else:
            reason = _reason(body)
        return TaskState(
            status=state or "running",
            task_id=task_id,
            urls=urls,
            media_type=body.get("media_type") if isinstance(body.get("media_type"), str) else None,
            progress=as_float(body.get("progress")),
            reason=reason if state == "failed" else None,
        )

    async def balance(self, key: str) -> KeyInfo | None:
        return None  # xffuw has no balance endpoint

    def key_limit(self, vip_level: int | None) -> int | None:
        return None  # undocumented: set `rpm` in the config where a plan has one


def _reason(body: dict[str, Any]) -> str | None:
    for field in ("fail_reason", "error", "error_message", "message", "reason", "msg"):
        value = body.get(field)
        if isinstance(value, str) and value:
            return value
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
