"""Any OpenAI-compatible API (`type = "openai"`): /models, /chat/completions, /images/generations
and /images/edits.

For pooling the keys of an upstream that already speaks OpenAI's API (a vLLM or LiteLLM server,
a one-api/new-api gateway, another vendor's compatible endpoint; its base URL ends in /v1).
Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with real HTTP statuses;
images come back at once, as URLs or as base64.
"""

from __future__ import annotations

from typing import Any

from proxy.clip import clip
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

# Error codes (or types) that say more than the status: OpenAI's own, and the gateways' (new-api).
CODES: dict[str, Kind] = {
    "invalid_api_key": Kind.AUTH, "account_deactivated": Kind.AUTH, "authentication_error": Kind.AUTH,
    "insufficient_quota": Kind.BALANCE, "billing_hard_limit_reached": Kind.BALANCE,
    "billing_not_active": Kind.BALANCE, "insufficient_user_quota": Kind.BALANCE,
    "pre_consume_token_quota_failed": Kind.BALANCE,
    "rate_limit_exceeded": Kind.RATE_LIMITED, "rate_limit_error": Kind.RATE_LIMITED,
    "model_not_found": Kind.MODEL_NOT_FOUND,
    "content_policy_violation": Kind.CONTENT_POLICY, "content_filter": Kind.CONTENT_POLICY,
    "moderation_blocked": Kind.CONTENT_POLICY, "sensitive_words_detected": Kind.CONTENT_POLICY,
    "prompt_blocked": Kind.CONTENT_POLICY,
}
# Statuses that name the problem whatever the body (a proxy in front may answer its own page).
STATUS_KINDS = {401: Kind.AUTH, 402: Kind.BALANCE, 403: Kind.AUTH, 429: Kind.RATE_LIMITED}
# Statuses that name it only with an error body: an HTML 404 is a wrong base URL, not a model.
ERROR_BODY_KINDS = {400: Kind.BAD_REQUEST, 404: Kind.MODEL_NOT_FOUND, 413: Kind.BAD_REQUEST,
                    422: Kind.BAD_REQUEST}
UPSTREAM_WORD = 100  # characters kept of an upstream error's param or code
# /models gives no kind: ids with these words are image models, the rest chat.
IMAGE_WORDS = ("dall-e", "gpt-image", "image", "flux", "stable-diffusion", "sdxl", "sd3", "midjourney",
               "seedream", "cogview", "kolors", "recraft", "ideogram")


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def model_kind(model_id: str) -> ModelKind:
    lowered = model_id.lower()
    return "image" if any(word in lowered for word in IMAGE_WORDS) else "chat"


def error_of(body: Any) -> tuple[str, tuple[Any, ...]] | None:
    """The (message, codes) of an error body, if it is one: OpenAI's `{"error": {…}}`, a bare
    `{"error": "text"}`, vLLM's older top-level `{"object": "error", …}`, FastAPI's `{"detail"}`."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and error:
        message = error.get("message") or error.get("code") or error.get("type") or "unknown error"
        return str(message), (error.get("code"), error.get("type"))
    if isinstance(error, str) and error:
        return error, ()
    if body.get("object") == "error":
        return str(body.get("message") or "unknown error"), (body.get("code"), body.get("type"))
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI's validation
        detail = detail[0].get("msg")
    if isinstance(detail, str) and detail and "choices" not in body and "data" not in body:
        return detail, ()
    return None


def error_word(value: Any) -> str | None:
    """An upstream error's param or code when a non-empty string, clipped: an upstream may send anything."""
    return clip(value, UPSTREAM_WORD) if isinstance(value, str) and value else None


def image_urls(payload: dict[str, Any]) -> list[str]:
    """Each image of an images answer as a URL: its `url`, or its `b64_json` as a data: URL."""
    data = payload.get("data")
    image_type = as_text(payload.get("output_format")) or "png"
    urls = []
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict):
            continue
        if isinstance(url := item.get("url"), str) and url:
            urls.append(url)
        elif isinstance(b64 := item.get("b64_json"), str) and b64:
            urls.append(f"data:image/{image_type};base64,{b64}")
    return urls


class OpenAICompatible(Dialect):
    def check(self, answer: Answer) -> dict[str, Any]:
        body = answer.body
        found = error_of(body)
        if found is None and answer.status < 400 and isinstance(body, dict):
            return body
        message, codes = found if found is not None else (f"HTTP {answer.status}", ())
        kind = next((CODES[c] for c in codes if isinstance(c, str) and c in CODES), None)
        kind = kind or STATUS_KINDS.get(answer.status)
        if kind is None and found is not None:
            kind = ERROR_BODY_KINDS.get(answer.status, Kind.UPSTREAM_UNAVAILABLE)
        if kind is None:
            raise unreadable(self.name, answer)
        outer = as_dict(body)
        fields = as_dict(outer.get("error")) or (outer if outer.get("object") == "error" else {})
        # The field the upstream names, and for the client's own mistake its code, as OpenAI would answer.
        raise ProxyError(kind, f"{self.name}: {message}", retry_after=answer.retry_after,
                         param=error_word(fields.get("param")),
                         code=error_word(fields.get("code")) if kind is Kind.BAD_REQUEST else None)

    def models_request(self) -> UpstreamCall:
        return UpstreamCall("GET", "models")

    def parse_models(self, payload: dict[str, Any]) -> list[ModelInfo]:
        entries = payload.get("data")
        if not isinstance(entries, list):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: /models answered no data list")
        return [ModelInfo(id=str(entry["id"]), kind=model_kind(str(entry["id"])))
                for entry in entries if isinstance(entry, dict) and entry.get("id")]

    def chat_request(self, call: ChatCall) -> UpstreamCall:
        # The edge streams from the full answer and asks n times: the upstream is asked for one answer.
        params = {k: v for k, v in call.params.items() if k not in ("stream", "stream_options", "n")}
        return UpstreamCall("POST", "chat/completions", json={**params, "model": call.model,
                                                              "messages": call.messages})

    def parse_chat(self, payload: dict[str, Any]) -> ChatAnswer:
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: chat/completions answered no choices")
        first = choices[0]
        message = as_dict(first.get("message"))
        tool_calls = message.get("tool_calls")
        usage = as_dict(payload.get("usage"))
        return ChatAnswer(content=as_text(message.get("content")),
                          tool_calls=tool_calls if isinstance(tool_calls, list) and tool_calls else None,
                          finish_reason=as_text(first.get("finish_reason")),
                          prompt_tokens=as_int(usage.get("prompt_tokens")),
                          completion_tokens=as_int(usage.get("completion_tokens")))

    def submit_request(self, call: ImageCall) -> UpstreamCall:
        # One image a call (n images are n calls, each on a key of its own). No response_format:
        # GPT image models refuse it (400 unknown_parameter) and answer base64 anyway.
        body: dict[str, Any] = {**call.extra, "model": call.model, "prompt": call.prompt, "n": 1}
        if call.size:
            body["size"] = call.size
        if call.references:  # OpenAI's JSON edits: reference images by URL
            body["images"] = [{"image_url": url} for url in call.references]
            return UpstreamCall("POST", "images/edits", json=body)
        return UpstreamCall("POST", "images/generations", json=body)

    def parse_submit(self, payload: dict[str, Any]) -> TaskState:
        urls = image_urls(payload)
        if not urls:
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name}: the images answer held no image")
        return TaskState(status="succeeded", urls=urls, media_type="image")
