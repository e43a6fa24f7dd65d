"""The OpenAI-compatible dialect (proxy/providers/openai.py, `type = "openai"`) as tables: OpenAI's
own answers and errors, those of the servers people put behind that type (vLLM, new-api/one-api,
FastAPI-based ones) and what the simulator (proxy/sim/openai_compat.py) serves, written out here
and fed to the pure functions. No server: milliseconds each. One test per mapping rule."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import refusal

from proxy.errors import Kind, ProxyError
from proxy.providers.base import Answer, ChatAnswer, ChatCall, ImageCall, ModelInfo, TaskState, UpstreamCall
from proxy.providers.openai import OpenAICompatible, model_kind

D = OpenAICompatible("compat")
IMG = "https://files.example.com/img-1.png"
REF = "https://example.com/ref.png"


def error_json(message: str, type_: str | None = "invalid_request_error", code: Any = None,
               param: str | None = None) -> dict[str, Any]:
    """An error body as OpenAI-compatible servers write it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- check: OpenAI's errors, with real statuses ----------------------------------------------

# (status, body, Retry-After) -> (kind, message)
ERRORS = [
    # OpenAI's own (and the sim's)
    (401, error_json("Incorrect API key provided: sk-********2222.", code="invalid_api_key"), None,
     Kind.AUTH, "compat: Incorrect API key provided: sk-********2222."),
    (401, error_json("You didn't provide an API key.", code="invalid_api_key"), None,
     Kind.AUTH, "compat: You didn't provide an API key."),
    (401, error_json("You didn't provide an API key."), None, Kind.AUTH, "compat: You didn't provide an API key."),
    (401, error_json("This key is associated with a deactivated account.", code="account_deactivated"), None,
     Kind.AUTH, "compat: This key is associated with a deactivated account."),
    (403, error_json("Country, region, or territory not supported", code="unsupported_country_region_territory"),
     None, Kind.AUTH, "compat: Country, region, or territory not supported"),
    (429, error_json("Rate limit reached for requests", "requests", "rate_limit_exceeded"), 20.0,
     Kind.RATE_LIMITED, "compat: Rate limit reached for requests"),
    (429, error_json("Rate limit reached for tokens", "tokens", "rate_limit_exceeded"), None,
     Kind.RATE_LIMITED, "compat: Rate limit reached for tokens"),
    (429, error_json("You exceeded your current quota, please check your plan and billing details.",
                       "insufficient_quota", "insufficient_quota"), None,
     Kind.BALANCE, "compat: You exceeded your current quota, please check your plan and billing details."),
    (429, error_json("quota", "insufficient_quota", None), 5.0, Kind.BALANCE, "compat: quota"),  # the type says it
    (400, error_json("Billing hard limit has been reached", code="billing_hard_limit_reached"), None,
     Kind.BALANCE, "compat: Billing hard limit has been reached"),
    (429, error_json("Your account is not active", "billing_not_active", "billing_not_active"), None,
     Kind.BALANCE, "compat: Your account is not active"),
    (402, error_json("Payment required", None), None, Kind.BALANCE, "compat: Payment required"),
    (404, error_json("The model `gpt-5` does not exist or you do not have access to it.", code="model_not_found"),
     None, Kind.MODEL_NOT_FOUND, "compat: The model `gpt-5` does not exist or you do not have access to it."),
    (404, error_json("This is not a chat model and thus not supported in the v1/chat/completions endpoint.",
                       param="model"), None,
     Kind.MODEL_NOT_FOUND, "compat: This is not a chat model and thus not supported in the v1/chat/completions "
                           "endpoint."),
    (400, error_json("'messages' must contain at least one message.", param="messages"), None,
     Kind.BAD_REQUEST, "compat: 'messages' must contain at least one message."),
    (400, error_json("This model's maximum context length is 8192 tokens.", code="context_length_exceeded"), None,
     Kind.BAD_REQUEST, "compat: This model's maximum context length is 8192 tokens."),
    (400, error_json("Unknown parameter: 'response_format'.", code="unknown_parameter", param="response_format"),
     None, Kind.BAD_REQUEST, "compat: Unknown parameter: 'response_format'."),
    (400, error_json("Your request was rejected as a result of our safety system.",
                       code="content_policy_violation"), None,
     Kind.CONTENT_POLICY, "compat: Your request was rejected as a result of our safety system."),
    (400, error_json("Your request was rejected by the safety system.", code="moderation_blocked"), None,
     Kind.CONTENT_POLICY, "compat: Your request was rejected by the safety system."),
    (400, error_json("filtered", code="content_filter"), None, Kind.CONTENT_POLICY, "compat: filtered"),
    (413, error_json("Request too large"), None, Kind.BAD_REQUEST, "compat: Request too large"),
    (500, error_json("The server had an error while processing your request.", "server_error"), None,
     Kind.UPSTREAM_UNAVAILABLE, "compat: The server had an error while processing your request."),
    (503, error_json("The engine is currently overloaded, please try again later", "server_error"), 2.0,
     Kind.UPSTREAM_UNAVAILABLE, "compat: The engine is currently overloaded, please try again later"),
    (404, error_json("Invalid URL (POST /v1/chat/completion)"), None,
     Kind.MODEL_NOT_FOUND, "compat: Invalid URL (POST /v1/chat/completion)"),
    # new-api / one-api gateways: their codes say more than their statuses
    (403, error_json("用户额度不足", "new_api_error", "insufficient_user_quota"), None,
     Kind.BALANCE, "compat: 用户额度不足"),
    (500, error_json("预扣费额度失败", "new_api_error", "pre_consume_token_quota_failed"), None,
     Kind.BALANCE, "compat: 预扣费额度失败"),
    (503, error_json("当前分组 default 下对于模型 x 无可用渠道", "new_api_error", "model_not_found"), None,
     Kind.MODEL_NOT_FOUND, "compat: 当前分组 default 下对于模型 x 无可用渠道"),
    (400, error_json("敏感词检测失败", "new_api_error", "sensitive_words_detected"), None,
     Kind.CONTENT_POLICY, "compat: 敏感词检测失败"),
    (500, error_json("blocked", "new_api_error", "prompt_blocked"), None, Kind.CONTENT_POLICY, "compat: blocked"),
    (401, error_json("无效的令牌", "new_api_error", ""), None, Kind.AUTH, "compat: 无效的令牌"),
    (429, error_json("x", "rate_limit_error", None), None, Kind.RATE_LIMITED, "compat: x"),
    (401, error_json("x", "authentication_error", None), None, Kind.AUTH, "compat: x"),
    # vLLM: a numeric code; older versions answer the error at the top level
    (404, error_json("The model `x` does not exist.", "NotFoundError", 404), None,
     Kind.MODEL_NOT_FOUND, "compat: The model `x` does not exist."),
    (404, {"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError", "param": None,
           "code": 404}, None, Kind.MODEL_NOT_FOUND, "compat: The model `x` does not exist."),
    (400, {"object": "error", "message": "max_tokens must be at least 1", "type": "BadRequestError", "param": None,
           "code": 400}, None, Kind.BAD_REQUEST, "compat: max_tokens must be at least 1"),
    # a bare error text; FastAPI's detail, as text or as its validation list
    (401, {"error": "Unauthorized"}, None, Kind.AUTH, "compat: Unauthorized"),
    (500, {"error": "boom"}, None, Kind.UPSTREAM_UNAVAILABLE, "compat: boom"),
    (401, {"detail": "Not authenticated"}, None, Kind.AUTH, "compat: Not authenticated"),
    (422, {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]}, None,
     Kind.BAD_REQUEST, "compat: Field required"),
    # an error body with a success status is still an error
    (200, error_json("quota", "insufficient_quota", "insufficient_quota"), None, Kind.BALANCE, "compat: quota"),
    (200, error_json("boom", "server_error"), None, Kind.UPSTREAM_UNAVAILABLE, "compat: boom"),
    (200, {"error": "bad key", "data": []}, None, Kind.UPSTREAM_UNAVAILABLE, "compat: bad key"),
    # where the message is: message, else code, else type
    (401, {"error": {"code": "invalid_api_key"}}, None, Kind.AUTH, "compat: invalid_api_key"),
    (500, {"error": {"type": "server_error"}}, None, Kind.UPSTREAM_UNAVAILABLE, "compat: server_error"),
    # no error body: statuses that say it alone
    (401, None, None, Kind.AUTH, "compat: HTTP 401"),
    (403, None, None, Kind.AUTH, "compat: HTTP 403"),
    (402, None, None, Kind.BALANCE, "compat: HTTP 402"),
    (429, None, 7.0, Kind.RATE_LIMITED, "compat: HTTP 429"),
    (429, {"message": "slow down"}, 7.0, Kind.RATE_LIMITED, "compat: HTTP 429"),
]


@pytest.mark.parametrize(("status", "body", "retry_after", "kind", "message"), ERRORS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(ERRORS)])
def test_check_error(status: int, body: Any, retry_after: float | None, kind: Kind, message: str) -> None:
    assert refusal(D.check, Answer(status, body, retry_after)) == (kind, message, retry_after)


# (status, body) -> (param, code) the client sees: the upstream's param always, its code for a bad request
# only (for the other kinds the proxy's own code says what it did, e.g. no_upstream_key), strings only.
NAMED = [
    (400, error_json("Invalid value: '640x480'.", param="size"), "size", None),
    (400, error_json("Unknown parameter: 'response_format'.", code="unknown_parameter", param="response_format"),
     "response_format", "unknown_parameter"),
    (400, error_json("too long", code="context_length_exceeded", param="messages"), "messages",
     "context_length_exceeded"),
    (401, error_json("Incorrect API key provided.", code="invalid_api_key"), None, None),
    (400, {"object": "error", "message": "bad", "type": "BadRequestError", "param": "top_p", "code": 400}, "top_p",
     None),
    (400, error_json("x", code="c" * 500, param="p" * 500), "p" * 100 + "… (500 characters)",
     "c" * 100 + "… (500 characters)"),
    (400, {"error": {"message": "x", "param": ["size"], "code": ""}}, None, None),
]


@pytest.mark.parametrize(("status", "body", "param", "code"), NAMED, ids=[str(i) for i in range(len(NAMED))])
def test_check_passes_the_upstreams_param_and_code(status: int, body: Any, param: str | None,
                                                    code: str | None) -> None:
    with pytest.raises(ProxyError) as caught:
        D.check(Answer(status, body, None))
    assert (caught.value.param, caught.value.code) == (param, code)


# Nothing readable, and a status that does not say enough: an upstream failure (a 404 without
# an error body is a wrong base URL, not an unknown model).
UNREADABLE = [(404, None), (404, "<html>Not Found</html>"), (400, None), (502, None), (503, None), (200, None),
              (200, []), (200, "ok"), (500, {"x": 1}), (404, {"x": 1}), (500, {"error": {}}),
              (400, {"error": None})]


@pytest.mark.parametrize(("status", "body"), UNREADABLE, ids=[f"{s}-{b!r}" for s, b in UNREADABLE])
def test_check_unreadable(status: int, body: Any) -> None:
    assert refusal(D.check, Answer(status, body, 9.0)) == (
        Kind.UPSTREAM_UNAVAILABLE, f"compat upstream answered HTTP {status} with an unreadable body", 9.0)


CHAT_COMPLETION = {
    "id": "chatcmpl-sim000001", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
    "system_fingerprint": "fp_sim",
    "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello from a compatible server. You said: hi"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 11, "total_tokens": 12},
}
ANSWERS = [
    {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "openai"}]},
    CHAT_COMPLETION,
    {"created": 1700000000, "data": [{"url": IMG, "revised_prompt": "a cat"}]},
    {"created": 1700000000, "data": [{"b64_json": "iVBORw0KGgo="}], "output_format": "png"},
    {"error": None, "data": []},  # an empty error is none
    {"error": {}, "data": []},
    {"detail": "x", "data": []},  # a detail beside an answer is not an error
]


@pytest.mark.parametrize("body", ANSWERS, ids=[str(i) for i in range(len(ANSWERS))])
@pytest.mark.parametrize("status", [200, 201])
def test_check_answer_passes_through(body: dict[str, Any], status: int) -> None:
    assert D.check(Answer(status, body, None)) is body


def test_key_goes_as_a_bearer_token() -> None:
    assert D.auth("sk-abc") == {"authorization": "Bearer sk-abc"}


# ---- /models -------------------------------------------------------------------------------


def test_models_request() -> None:
    assert D.models_request() == UpstreamCall("GET", "models")  # relative: the base URL ends in /v1
    assert D.models_need_key is True


# /models names no kind: image models by the words in their ids, the rest are chat models.
KINDS = [
    ("gpt-4o-mini", "chat"), ("qwen2.5-7b-instruct", "chat"), ("meta-llama/Llama-3.1-8B-Instruct", "chat"),
    ("text-embedding-3-small", "chat"),
    ("dall-e-3", "image"), ("DALL-E-2", "image"), ("gpt-image-1", "image"), ("imagen-3.0-generate-002", "image"),
    ("grok-2-image", "image"), ("black-forest-labs/FLUX.1-schnell", "image"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "image"), ("sdxl-turbo", "image"), ("sd3-medium", "image"),
    ("midjourney", "image"), ("doubao-seedream-3-0-t2i", "image"), ("cogview-4", "image"),
    ("Kwai-Kolors/Kolors", "image"), ("recraft-v3", "image"), ("ideogram-v2", "image"),
]


@pytest.mark.parametrize(("model_id", "kind"), KINDS)
def test_model_kind(model_id: str, kind: str) -> None:
    assert model_kind(model_id) == kind


def test_parse_models() -> None:
    payload = {"object": "list", "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "openai"},
        {"id": "dall-e-3", "object": "model", "created": 1700000000, "owned_by": "openai"},
        {"id": "openai/gpt-4o", "object": "model"},  # an OpenRouter-style id, kept whole
        {"id": 7},
        {"object": "model"}, {"id": ""}, "gpt-4", None,
    ]}
    assert D.parse_models(payload) == [ModelInfo(id="gpt-4o-mini", kind="chat"), ModelInfo(id="dall-e-3", kind="image"),
                                       ModelInfo(id="openai/gpt-4o", kind="chat"), ModelInfo(id="7", kind="chat")]
    assert D.parse_models({"data": []}) == []


@pytest.mark.parametrize("payload", [{}, {"data": None}, {"data": {}}, {"object": "list", "models": []}])
def test_parse_models_without_a_data_list(payload: dict[str, Any]) -> None:
    assert refusal(D.parse_models, payload) == (Kind.UPSTREAM_UNAVAILABLE, "compat: /models answered no data list",
                                                None)


# ---- /chat/completions ---------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CHAT_REQUESTS = [
    ({}, {"model": "gpt-4o-mini", "messages": MESSAGES}),
    # OpenAI's fields pass through as they are ...
    ({"temperature": 0, "max_tokens": 9, "response_format": {"type": "json_object"}, "seed": 1, "user": "u"},
     {"temperature": 0, "max_tokens": 9, "response_format": {"type": "json_object"}, "seed": 1, "user": "u",
      "model": "gpt-4o-mini", "messages": MESSAGES}),
    ({"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False},
     {"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False, "model": "gpt-4o-mini",
      "messages": MESSAGES}),
    # ... but one whole answer is asked for: the edge streams it and asks n times
    ({"stream": True, "stream_options": {"include_usage": True}, "n": 3, "temperature": 1},
     {"temperature": 1, "model": "gpt-4o-mini", "messages": MESSAGES}),
    # and the call's model and messages are not overridden
    ({"model": "x", "messages": []}, {"model": "gpt-4o-mini", "messages": MESSAGES}),
]


@pytest.mark.parametrize(("params", "body"), CHAT_REQUESTS, ids=["bare", "fields", "tools", "one-answer",
                                                                 "no-override"])
def test_chat_request(params: dict[str, Any], body: dict[str, Any]) -> None:
    call = ChatCall(model="gpt-4o-mini", messages=MESSAGES, params=params)
    assert D.chat_request(call) == UpstreamCall("POST", "chat/completions", json=body)


TOOL_CALL = {"id": "call_sim000001", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"hi\"}"}}
CHATS = [
    (CHAT_COMPLETION, ChatAnswer(content="Hello from a compatible server. You said: hi", finish_reason="stop",
                                 prompt_tokens=1, completion_tokens=11)),
    # a tool call (the sim's, when tools are sent)
    ({"id": "chatcmpl-sim000002", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
      "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                   "logprobs": None, "finish_reason": "tool_calls"}],
      "usage": {"prompt_tokens": 1, "completion_tokens": 20, "total_tokens": 21}},
     ChatAnswer(content=None, tool_calls=[TOOL_CALL], finish_reason="tool_calls", prompt_tokens=1,
                completion_tokens=20)),
    # a filtered answer (Azure-style)
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}]},
     ChatAnswer(content=None, finish_reason="content_filter")),
    # terse servers: no usage, no finish_reason
    ({"choices": [{"message": {"content": "ok"}}]}, ChatAnswer(content="ok")),
    ({"choices": [{"message": {"content": "ok", "tool_calls": []}}], "usage": None}, ChatAnswer(content="ok")),
    ({"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 1.5, "completion_tokens": "2"}},
     ChatAnswer(content="ok")),
    ({"choices": [{"message": None, "finish_reason": "stop"}]}, ChatAnswer(content=None, finish_reason="stop")),
    ({"choices": [{"message": {"content": "first"}}, {"message": {"content": "second"}}]},
     ChatAnswer(content="first")),
]


@pytest.mark.parametrize(("payload", "answer"), CHATS, ids=[str(i) for i in range(len(CHATS))])
def test_parse_chat(payload: dict[str, Any], answer: ChatAnswer) -> None:
    assert D.parse_chat(payload) == answer


@pytest.mark.parametrize("payload", [{}, {"choices": []}, {"choices": [None]}, {"choices": {}}])
def test_parse_chat_without_a_choice(payload: dict[str, Any]) -> None:
    assert refusal(D.parse_chat, payload) == (Kind.UPSTREAM_UNAVAILABLE,
                                              "compat: chat/completions answered no choices", None)


# ---- /images/generations and /images/edits -------------------------------------------------

SUBMITS = [
    # one image per call (n images are n calls, each on a key of its own); no response_format
    # (GPT image models refuse it, 400 unknown_parameter)
    (ImageCall(model="dall-e-3", prompt="a cat"),
     UpstreamCall("POST", "images/generations", json={"model": "dall-e-3", "prompt": "a cat", "n": 1})),
    # size goes as OpenAI's own, unmapped
    (ImageCall(model="dall-e-3", prompt="a cat", size="1792x1024"),
     UpstreamCall("POST", "images/generations", json={"model": "dall-e-3", "prompt": "a cat", "n": 1,
                                                      "size": "1792x1024"})),
    (ImageCall(model="gpt-image-1", prompt="a cat", size="auto"),
     UpstreamCall("POST", "images/generations", json={"model": "gpt-image-1", "prompt": "a cat", "n": 1,
                                                      "size": "auto"})),
    # reference images: OpenAI's JSON edits, images by URL
    (ImageCall(model="gpt-image-1", prompt="add a hat", references=[REF]),
     UpstreamCall("POST", "images/edits", json={"model": "gpt-image-1", "prompt": "add a hat", "n": 1,
                                                "images": [{"image_url": REF}]})),
    (ImageCall(model="gpt-image-1", prompt="mix", references=[REF, IMG], size="1024x1024"),
     UpstreamCall("POST", "images/edits", json={"model": "gpt-image-1", "prompt": "mix", "n": 1,
                                                "size": "1024x1024",
                                                "images": [{"image_url": REF}, {"image_url": IMG}]})),
    # extras pass through ...
    (ImageCall(model="flux-dev", prompt="p", extra={"negative_prompt": "blur", "seed": 3}),
     UpstreamCall("POST", "images/generations", json={"negative_prompt": "blur", "seed": 3, "model": "flux-dev",
                                                      "prompt": "p", "n": 1})),
    # ... and never override the call's own fields
    (ImageCall(model="dall-e-3", prompt="p", size="1024x1024", references=[REF],
               extra={"model": "x", "prompt": "y", "n": 4, "size": "256x256", "images": ["z"]}),
     UpstreamCall("POST", "images/edits", json={"model": "dall-e-3", "prompt": "p", "n": 1, "size": "1024x1024",
                                                "images": [{"image_url": REF}]})),
]


@pytest.mark.parametrize(("call", "request_"), SUBMITS, ids=["bare", "size", "size-auto", "reference",
                                                             "references", "extras", "extras-do-not-override"])
def test_submit_request(call: ImageCall, request_: UpstreamCall) -> None:
    assert D.submit_request(call) == request_
    assert "response_format" not in request_.json


SUBMITTED = [
    # DALL-E style: URLs (the sim's, with revised_prompt)
    ({"created": 1700000000, "data": [{"url": IMG, "revised_prompt": "a cat"}]}, [IMG]),
    ({"created": 1700000000, "data": [{"url": IMG}, {"url": REF}]}, [IMG, REF]),
    # GPT image style: base64 only, as a data: URL of its output_format
    ({"created": 1700000000, "data": [{"b64_json": "iVBORw0KGgo="}], "output_format": "png",
      "usage": {"total_tokens": 100}}, ["data:image/png;base64,iVBORw0KGgo="]),
    ({"data": [{"b64_json": "UklGRg=="}], "output_format": "webp"}, ["data:image/webp;base64,UklGRg=="]),
    ({"data": [{"b64_json": "iVBORw0KGgo="}]}, ["data:image/png;base64,iVBORw0KGgo="]),
    # a URL is preferred when both come; empty and odd items are skipped
    ({"data": [{"url": IMG, "b64_json": "AAAA"}]}, [IMG]),
    ({"data": [{"url": ""}, {"b64_json": ""}, "x", None, {"url": 5}, {"url": IMG}]}, [IMG]),
]


@pytest.mark.parametrize(("payload", "urls"), SUBMITTED, ids=[str(i) for i in range(len(SUBMITTED))])
def test_parse_submit(payload: dict[str, Any], urls: list[str]) -> None:
    # answered at once: a finished task with nothing to poll
    assert D.parse_submit(payload) == TaskState(status="succeeded", urls=urls, media_type="image")


@pytest.mark.parametrize("payload", [{}, {"data": []}, {"data": None}, {"data": [{}]}, {"created": 1}])
def test_parse_submit_without_an_image(payload: dict[str, Any]) -> None:
    assert refusal(D.parse_submit, payload) == (Kind.UPSTREAM_UNAVAILABLE,
                                                "compat: the images answer held no image", None)


# ---- what it does not have: the base's defaults --------------------------------------------


def test_no_tasks_to_poll() -> None:
    assert refusal(D.poll_request, "t") == (Kind.UPSTREAM_UNAVAILABLE, "compat has no tasks to poll", None)


def test_no_balance_endpoint_and_no_known_limit() -> None:
    assert D.has_balance is False
    assert D.balance_request() is None
    assert D.parse_balance({"credits": 1}) is None
    assert [D.key_limit(v) for v in (None, 0, 1)] == [None, None, None]


def test_no_task_list() -> None:
    assert D.list_request(1) is None  # every task is polled on its own
    assert D.parse_list({"tasks": []}) is None
