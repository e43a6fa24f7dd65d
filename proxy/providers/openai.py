"""Any OpenAI-compatible API (`type = "openai"`): /models, /chat/completions, /images/generations.

For pooling the keys of an upstream that already speaks OpenAI's API (a vLLM server, a
one-api gateway, another vendor's compatible endpoint). Errors are OpenAI's
`{"error": {"message", "type", "code"}}` with real HTTP statuses; images come back at once.
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
    UpstreamCall,
    as_int,
    as_text,
    unreadable,
)

# OpenAI's error codes that say more than the status.
CODES: dict[str, Kind] = {
    "insufficient_quota": Kind.BALANCE, "billing_hard_limit_reached": Kind.BALANCE,
    "invalid_api_key": Kind.AUTH, "account_deactivated": Kind.AUTH,
    "model_not_found": Kind.MODEL_NOT_FOUND, "rate_limit_exceeded": Kind.RATE_LIMITED,
    "content_policy_violation": Kind.CONTENT_POLICY, "content_filter": Kind.CONTENT_POLICY,
}
STATUS_KINDS = {400: Kind.BAD_REQUEST, 401: Kind.AUTH, 403: Kind.AUTH, 404: Kind.MODEL_NOT_FOUND,
                429: Kind.RATE_LIMITED}
# /models gives no kind: ids with these words are image models, the rest chat.
IMAGE_WORDS = ("dall-e", "gpt-image", "image", "flux", "stable-diffusion", "sdxl", "midjourney")


def model_kind(model_id: str) -> ModelKind:
    lowered = model_id.lower()
    return "image" if any(word in lowered for word in IMAGE_WORDS) else "chat"


class OpenAICompatible(Dialect):
    def check(self, answer: Answer) -> dict[str, Any]:
        body = answer.body
        error = body.get("error") if isinstance(body, dict) else None
        if answer.status < 400 and isinstance(body, dict) and not error:
            return body
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("code") or "unknown error")
            code = error.get("code") or error.get("type")
        else:
            message, code = (str(error) if error else f"HTTP {answer.status}"), None
        kind = CODES.get(str(code)) if code else None
        kind = kind or STATUS_KINDS.get(answer.status)
        if kind is None:
            if not isinstance(body, dict):
                raise unreadable(self.name, answer)
            kind = Kind.UPSTREAM_UNAVAILABLE
        raise ProxyError(kind, f"{self.name}: {message}", retry_after=answer.retry_after)

    def models_request(self) -> UpstreamCall:
        return UpstreamCall("GET", "models")

    def parse_models(self, payload: dict[str, Any]) -> list[ModelInfo]:
        entries = payload.get("data")
        if not isinstance(entries, list):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: /models answered no data list")
        return [ModelInfo(id=str(entry["id"]), kind=model_kind(str(entry["id"])))
                for entry in entries if isinstance(entry, dict) and entry.get("id")]

    def chat_request(self, call: ChatCall) -> UpstreamCall:
        # The edge streams from the full answer: the upstream is asked for one answer.
        params = {k: v for k, v in call.params.items() if k not in ("stream", "stream_options", "n")}
        return UpstreamCall("POST", "chat/completions", json={**params, "model": call.model,
                                                              "messages": call.messages})

    def parse_chat(self, payload: dict[str, Any]) -> ChatAnswer:
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: chat/completions answered no choices")
        first = choices[0]
        message = first.get("message") if isinstance(first.get("message"), dict) else {}
        tool_calls = message.get("tool_calls")
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        return ChatAnswer(content=as_text(message.get("content")),
                          tool_calls=tool_calls if isinstance(tool_calls, list) and tool_calls else None,
                          finish_reason=as_text(first.get("finish_reason")),
                          prompt_tokens=as_int(usage.get("prompt_tokens")),
                          completion_tokens=as_int(usage.get("completion_tokens")))

    def submit_request(self, call: ImageCall) -> UpstreamCall:
        body: dict[str, Any] = {**call.extra, "model": call.model, "prompt": call.prompt, "n": 1,
                                "response_format": "url"}
        if call.size:
            body["size"] = call.size
        if call.references:
            body["images"] = call.references
        return UpstreamCall("POST", "images/generations", json=body)

    def parse_submit(self, payload: dict[str, Any]) -> TaskState:
        data = payload.get("data")
        urls = [str(item["url"]) for item in data if isinstance(item, dict) and isinstance(item.get("url"), str)] \
            if isinstance(data, list) else []
        if not urls:
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: images/generations answered no image URL")
        return TaskState(status="succeeded", urls=urls, media_type="image")
