"""xffuw: models.php, chat.php, image.php and task.php, and its `{"error": "…"}` dialect.

The status of an error is undocumented: the body decides, 200 included. A chat answer
promises only `choices[0].message.content`; image.php answers a task id to poll, or a
result URL at once.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import Kind, ProxyError
from proxy.providers.base import (
    Answer,
    ChatAnswer,
    ChatCall,
    Dialect,
    ImageCall,
    ModelInfo,
    ModelKind,
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

KINDS: dict[str, ModelKind] = {"chat": "chat", "text": "chat", "image": "image", "video": "video",
                               "audio": "audio", "music": "audio"}

STATES: dict[str, TaskStatus] = {
    "pending": "pending", "queued": "pending", "waiting": "pending",
    "running": "running", "processing": "running", "in_progress": "running",
    "success": "succeeded", "succeeded": "succeeded", "completed": "succeeded", "done": "succeeded",
    "failed": "failed", "failure": "failed", "error": "failed", "cancelled": "failed", "canceled": "failed",
}

# Known error phrases, matched loosely; the first hit wins. An unknown text is an upstream error.
PHRASES: list[tuple[tuple[str, ...], Kind]] = [
    (("invalid api key", "invalid key", "api key", "unauthorized", "unauthorised", "密钥"), Kind.AUTH),
    (("insufficient balance", "balance", "insufficient", "余额", "算力不足"), Kind.BALANCE),
    (("task not found", "no such task", "任务不存在"), Kind.NOT_FOUND),  # a poll of a task it forgot
    (("model not found", "no such model", "unknown model", "模型不存在"), Kind.MODEL_NOT_FOUND),
    (("rate limit", "too many requests", "too frequent", "频繁"), Kind.RATE_LIMITED),
    (("blocked", "moderation", "sensitive", "违规", "敏感"), Kind.CONTENT_POLICY),
    # an immediate-result model that failed at submit: a finished, paid task, not a transport problem
    (("generation failed", "生成失败"), Kind.TASK_FAILED),
    # its own validation of a request: refused before any work, nothing paid
    (("required", "invalid json", "must be", "invalid parameter"), Kind.BAD_REQUEST),
]

STATUS_KINDS = {401: Kind.AUTH, 403: Kind.AUTH, 402: Kind.BALANCE, 429: Kind.RATE_LIMITED}

# Fields of a successful answer: a body with one of them is not an error body, even if a
# failed task carries an "error" reason.
ANSWER_FIELDS = ("choices", "task_id", "result_url", "is_final", "state", "data")
REASON_FIELDS = ("fail_reason", "error", "error_message", "message", "reason", "msg")


def error_text(body: Any) -> str | None:
    """The error an answer body carries, if it is an error body."""
    if not isinstance(body, dict) or not body.get("error") or any(f in body for f in ANSWER_FIELDS):
        return None
    error = body["error"]
    if isinstance(error, dict):  # tolerate an OpenAI-like {"error": {"message": …}}
        error = error.get("message") or error.get("msg") or error.get("code")
    return str(error)


def classify(text: str) -> Kind:
    return first_match(normalise_phrase(text), PHRASES) or Kind.UPSTREAM_UNAVAILABLE


class Xffuw(Dialect):
    def check(self, answer: Answer) -> dict[str, Any]:
        text = error_text(answer.body)
        if text is not None:
            raise ProxyError(classify(text), f"{self.name}: {text}", retry_after=answer.retry_after)
        if answer.status >= 400 or not isinstance(answer.body, dict):
            kind = STATUS_KINDS.get(answer.status)
            if kind is not None:
                raise ProxyError(kind, f"{self.name} upstream answered HTTP {answer.status}",
                                 retry_after=answer.retry_after)
            raise unreadable(self.name, answer)
        return answer.body

    def models_request(self) -> UpstreamCall:
        return UpstreamCall("GET", "models.php")

    def parse_models(self, payload: dict[str, Any]) -> list[ModelInfo]:
        entries = payload.get("data")
        if not isinstance(entries, list):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: models.php answered no data list")
        return [ModelInfo(id=str(entry["slug"]), kind=KINDS.get(str(entry.get("type", "")).lower(), "other"),
                          price=as_float(entry.get("price")), name=as_text(entry.get("name")))
                for entry in entries if isinstance(entry, dict) and entry.get("slug")]

    def chat_request(self, call: ChatCall) -> UpstreamCall:
        return UpstreamCall("POST", "chat.php", json={**call.params, "model": call.model, "messages": call.messages})

    def parse_chat(self, payload: dict[str, Any]) -> ChatAnswer:
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: chat.php answered no choices")
        first: dict[str, Any] = choices[0]
        message: dict[str, Any] = first["message"] if isinstance(first.get("message"), dict) else {}
        tool_calls = message.get("tool_calls")
        usage: dict[str, Any] = payload["usage"] if isinstance(payload.get("usage"), dict) else {}
        return ChatAnswer(
            content=as_text(message.get("content")),
            tool_calls=tool_calls if isinstance(tool_calls, list) and tool_calls else None,
            finish_reason=as_text(first.get("finish_reason")),
            prompt_tokens=as_int(usage.get("prompt_tokens")),
            completion_tokens=as_int(usage.get("completion_tokens")),
        )

    def submit_request(self, call: ImageCall) -> UpstreamCall:
        payload: dict[str, Any] = {**call.extra, "model": call.model, "prompt": call.prompt}
        if call.references:
            payload["images"] = call.references
        return UpstreamCall("POST", "image.php", json=payload)

    def parse_submit(self, payload: dict[str, Any]) -> TaskState:
        media = as_text(payload.get("type"))
        url = payload.get("result_url")
        if isinstance(url, str) and url:
            return TaskState(status="succeeded", urls=[url], media_type=media)
        task_id = payload.get("task_id")
        if task_id in (None, ""):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: image.php answered neither task_id "
                             "nor result_url")
        return TaskState(status="pending", task_id=str(task_id), media_type=media)

    def poll_request(self, task_id: str) -> UpstreamCall:
        return UpstreamCall("GET", "task.php", params={"task_id": task_id})

    def parse_poll(self, task_id: str, payload: dict[str, Any]) -> TaskState:
        state = STATES.get(str(payload.get("state", "")).lower().strip())
        url = payload.get("result_url")
        urls = [url] if isinstance(url, str) and url else []
        if state != "failed" and urls:
            state = "succeeded"  # the docs: poll until is_final or a result_url
        elif payload.get("is_final") is True and state not in ("succeeded", "failed"):
            state = "failed"
        reason = None
        if state == "succeeded" and not urls:
            state, reason = "failed", "the task finished without a result URL"
        elif state == "failed":
            reason = next((v for f in REASON_FIELDS if isinstance(v := payload.get(f), str) and v), None)
        return TaskState(status=state or "running", task_id=task_id, urls=urls,
                         media_type=as_text(payload.get("media_type")), progress=as_float(payload.get("progress")),
                         reason=reason)
