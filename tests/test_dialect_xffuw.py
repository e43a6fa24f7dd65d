"""The xffuw dialect (proxy/providers/xffuw.py) as tables: every answer body the platform's page,
the field notes and the simulator (proxy/sim/xffuw.py) describe, written out here and fed to the
pure functions. No server: milliseconds each. One test per mapping rule."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import refusal

from proxy.errors import Kind
from proxy.providers.base import Answer, ChatAnswer, ChatCall, ImageCall, ModelInfo, TaskState, UpstreamCall
from proxy.providers.xffuw import Xffuw

D = Xffuw("xf")
CAT = "https://cdn.example.com/image.png"


# ---- check: the error dialect --------------------------------------------------------------

# {"error": text} whatever the status (the docs give none; the sim answers 200 by default):
# (status, body, Retry-After) -> (kind, message, retry_after)
ERRORS = [
    # the three the page documents
    (200, {"error": "invalid api key"}, None, Kind.AUTH, "xf: invalid api key"),
    (200, {"error": "insufficient balance"}, None, Kind.BALANCE, "xf: insufficient balance"),
    (200, {"error": "model not found"}, None, Kind.MODEL_NOT_FOUND, "xf: model not found"),
    # the same with a status, as some deployments send them
    (401, {"error": "invalid api key"}, None, Kind.AUTH, "xf: invalid api key"),
    (402, {"error": "insufficient balance"}, None, Kind.BALANCE, "xf: insufficient balance"),
    (404, {"error": "model not found"}, None, Kind.MODEL_NOT_FOUND, "xf: model not found"),
    # the sim's other texts
    (429, {"error": "rate limit exceeded"}, 7.0, Kind.RATE_LIMITED, "xf: rate limit exceeded"),
    (200, {"error": "prompt blocked by content moderation"}, None, Kind.CONTENT_POLICY,
     "xf: prompt blocked by content moderation"),
    (200, {"error": "upstream service error, please retry later"}, None, Kind.UPSTREAM_UNAVAILABLE,
     "xf: upstream service error, please retry later"),
    (200, {"error": "generation failed: simulated failure"}, None, Kind.TASK_FAILED,
     "xf: generation failed: simulated failure"),
    (200, {"error": "invalid json body"}, None, Kind.BAD_REQUEST, "xf: invalid json body"),
    (200, {"error": "messages required"}, None, Kind.BAD_REQUEST, "xf: messages required"),
    (200, {"error": "prompt required"}, None, Kind.BAD_REQUEST, "xf: prompt required"),
    (200, {"error": "images must be an array of urls"}, None, Kind.BAD_REQUEST,
     "xf: images must be an array of urls"),
    (200, {"error": "task_id required"}, None, Kind.BAD_REQUEST, "xf: task_id required"),
    (200, {"error": "task not found"}, None, Kind.NOT_FOUND, "xf: task not found"),
    (404, {"error": "not found"}, None, Kind.UPSTREAM_UNAVAILABLE, "xf: not found"),
    (405, {"error": "method not allowed"}, None, Kind.UPSTREAM_UNAVAILABLE, "xf: method not allowed"),
    (500, {"error": "internal server error"}, None, Kind.UPSTREAM_UNAVAILABLE, "xf: internal server error"),
    # matched loosely: case, dashes, underscores, Chinese
    (200, {"error": "Invalid-API_Key"}, None, Kind.AUTH, "xf: Invalid-API_Key"),
    (200, {"error": "Unauthorized"}, None, Kind.AUTH, "xf: Unauthorized"),
    (200, {"error": "API key expired"}, None, Kind.AUTH, "xf: API key expired"),
    (200, {"error": "密钥无效"}, None, Kind.AUTH, "xf: 密钥无效"),
    (200, {"error": "余额不足"}, None, Kind.BALANCE, "xf: 余额不足"),
    (200, {"error": "算力不足,请充值"}, None, Kind.BALANCE, "xf: 算力不足,请充值"),
    (200, {"error": "Insufficient"}, None, Kind.BALANCE, "xf: Insufficient"),
    (200, {"error": "no such model"}, None, Kind.MODEL_NOT_FOUND, "xf: no such model"),
    (200, {"error": "unknown model: x"}, None, Kind.MODEL_NOT_FOUND, "xf: unknown model: x"),
    (200, {"error": "模型不存在"}, None, Kind.MODEL_NOT_FOUND, "xf: 模型不存在"),
    (200, {"error": "Too Many Requests"}, None, Kind.RATE_LIMITED, "xf: Too Many Requests"),
    (200, {"error": "requests too frequent"}, 3.0, Kind.RATE_LIMITED, "xf: requests too frequent"),
    (200, {"error": "请求过于频繁"}, None, Kind.RATE_LIMITED, "xf: 请求过于频繁"),
    (200, {"error": "content blocked"}, None, Kind.CONTENT_POLICY, "xf: content blocked"),
    (200, {"error": "sensitive words"}, None, Kind.CONTENT_POLICY, "xf: sensitive words"),
    (200, {"error": "内容违规"}, None, Kind.CONTENT_POLICY, "xf: 内容违规"),
    (200, {"error": "包含敏感词"}, None, Kind.CONTENT_POLICY, "xf: 包含敏感词"),
    (200, {"error": "生成失败"}, None, Kind.TASK_FAILED, "xf: 生成失败"),
    # the first row that matches wins: a key problem before a balance one
    (200, {"error": "api key balance check failed"}, None, Kind.AUTH, "xf: api key balance check failed"),
    # an OpenAI-like {"error": {...}} is tolerated: message, then msg, then code
    (200, {"error": {"message": "invalid api key"}}, None, Kind.AUTH, "xf: invalid api key"),
    (200, {"error": {"msg": "rate limit"}}, None, Kind.RATE_LIMITED, "xf: rate limit"),
    (200, {"error": {"code": "insufficient balance"}}, None, Kind.BALANCE, "xf: insufficient balance"),
    # no body to read: the status decides
    (401, None, None, Kind.AUTH, "xf upstream answered HTTP 401"),
    (403, None, None, Kind.AUTH, "xf upstream answered HTTP 403"),
    (402, None, None, Kind.BALANCE, "xf upstream answered HTTP 402"),
    (429, None, 12.0, Kind.RATE_LIMITED, "xf upstream answered HTTP 429"),
    (429, {"message": "slow down"}, None, Kind.RATE_LIMITED, "xf upstream answered HTTP 429"),
    (401, [], None, Kind.AUTH, "xf upstream answered HTTP 401"),
    # nothing to go on: an upstream failure
    (502, None, None, Kind.UPSTREAM_UNAVAILABLE, "xf upstream answered HTTP 502 with an unreadable body"),
    (503, None, None, Kind.UPSTREAM_UNAVAILABLE, "xf upstream answered HTTP 503 with an unreadable body"),
    (200, None, None, Kind.UPSTREAM_UNAVAILABLE, "xf upstream answered HTTP 200 with an unreadable body"),
    (200, ["not", "an", "object"], None, Kind.UPSTREAM_UNAVAILABLE,
     "xf upstream answered HTTP 200 with an unreadable body"),
    (200, "text", None, Kind.UPSTREAM_UNAVAILABLE, "xf upstream answered HTTP 200 with an unreadable body"),
    (500, {"ok": False}, None, Kind.UPSTREAM_UNAVAILABLE, "xf upstream answered HTTP 500 with an unreadable body"),
    (404, {"detail": "nope"}, None, Kind.UPSTREAM_UNAVAILABLE, "xf upstream answered HTTP 404 with an unreadable body"),
]


@pytest.mark.parametrize(("status", "body", "retry_after", "kind", "message"), ERRORS,
                         ids=[f"{row[0]}-{row[1]!r}"[:60] for row in ERRORS])
def test_check_error(status: int, body: Any, retry_after: float | None, kind: Kind, message: str) -> None:
    assert refusal(D.check, Answer(status, body, retry_after)) == (kind, message, retry_after)


def test_check_unreadable_answer_keeps_retry_after() -> None:
    assert refusal(D.check, Answer(503, None, 30.0)) == (
        Kind.UPSTREAM_UNAVAILABLE, "xf upstream answered HTTP 503 with an unreadable body", 30.0)


# Bodies that are answers, not errors: check hands them back as they are.
ANSWERS = [
    {"data": [{"slug": "gpt-4o-mini", "name": "GPT-4o Mini", "type": "chat", "price": "0.5000",
               "description": "..."}]},
    {"choices": [{"message": {"content": "你好!我是 AI 助手..."}}]},
    {"ok": True, "task_id": "123456789", "type": "image"},
    {"ok": True, "result_url": "https://cdn.example.com/x.png", "type": "image"},
    {"is_final": True, "state": "success", "result_url": CAT, "media_type": "image", "progress": ""},
    # a failed task names its reason under "error": still an answer (it has a state)
    {"is_final": True, "state": "failed", "result_url": None, "error": "生成失败"},
    {"choices": [{"message": {"content": "x"}}], "error": "ignored beside an answer"},
    {"task_id": "1", "error": "ignored beside an answer"},
    {"error": "", "choices": []},  # an empty error is none
    {"error": None, "data": []},
    {"ok": True},  # no error, whatever else is missing (parse_* decide)
]


@pytest.mark.parametrize("body", ANSWERS, ids=[repr(b)[:50] for b in ANSWERS])
@pytest.mark.parametrize("status", [200, 201])
def test_check_answer_passes_through(body: dict[str, Any], status: int) -> None:
    assert D.check(Answer(status, body, None)) is body


def test_key_goes_as_a_bearer_token() -> None:
    assert D.auth("xf_abc") == {"authorization": "Bearer xf_abc"}


# ---- models.php ----------------------------------------------------------------------------


def test_models_request() -> None:
    assert D.models_request() == UpstreamCall("GET", "models.php")
    assert D.models_need_key is True  # the docs: every endpoint needs the key


MODELS = [
    # the page's example
    ({"slug": "gpt-4o-mini", "name": "GPT-4o Mini", "type": "chat", "price": "0.5000", "description": "..."},
     ModelInfo(id="gpt-4o-mini", kind="chat", price=0.5, name="GPT-4o Mini")),
    # the sim's list (as_json)
    ({"slug": "gpt-image-2", "name": "GPT Image 2", "type": "image", "price": "2.0000", "description": "异步图像生成"},
     ModelInfo(id="gpt-image-2", kind="image", price=2.0, name="GPT Image 2")),
    ({"slug": "kling-video", "name": "Kling Video", "type": "video", "price": "5.0000", "description": "异步视频生成"},
     ModelInfo(id="kling-video", kind="video", price=5.0, name="Kling Video")),
    ({"slug": "suno-music", "name": "Suno Music", "type": "audio", "price": "3.0000", "description": "异步音乐生成"},
     ModelInfo(id="suno-music", kind="audio", price=3.0, name="Suno Music")),
    # type words
    ({"slug": "t", "type": "text"}, ModelInfo(id="t", kind="chat")),
    ({"slug": "m", "type": "music"}, ModelInfo(id="m", kind="audio")),
    ({"slug": "i", "type": "IMAGE"}, ModelInfo(id="i", kind="image")),
    ({"slug": "e", "type": "embedding"}, ModelInfo(id="e", kind="other")),
    ({"slug": "n"}, ModelInfo(id="n", kind="other")),
    # prices come as decimal strings, numbers, or nothing usable
    ({"slug": "p1", "type": "chat", "price": 1}, ModelInfo(id="p1", kind="chat", price=1.0)),
    ({"slug": "p2", "type": "chat", "price": " 0.25 "}, ModelInfo(id="p2", kind="chat", price=0.25)),
    ({"slug": "p3", "type": "chat", "price": ""}, ModelInfo(id="p3", kind="chat")),
    ({"slug": "p4", "type": "chat", "price": "free"}, ModelInfo(id="p4", kind="chat")),
    ({"slug": "p5", "type": "chat", "price": None}, ModelInfo(id="p5", kind="chat")),
    # a slug that is a number; a name that is not text
    ({"slug": 123, "type": "chat", "name": 5}, ModelInfo(id="123", kind="chat")),
]


@pytest.mark.parametrize(("entry", "model"), MODELS, ids=[str(e["slug"]) for e, _ in MODELS])
def test_parse_models_entry(entry: dict[str, Any], model: ModelInfo) -> None:
    assert D.parse_models({"data": [entry]}) == [model]


def test_parse_models_skips_entries_without_a_slug_and_keeps_order() -> None:
    payload = {"data": [{"slug": "b", "type": "chat"}, {"name": "no slug"}, {"slug": ""}, "text", None,
                        {"slug": "a", "type": "image"}]}
    assert [m.id for m in D.parse_models(payload)] == ["b", "a"]
    assert D.parse_models({"data": []}) == []


@pytest.mark.parametrize("payload", [{}, {"data": {}}, {"data": None}, {"data": "x"}])
def test_parse_models_without_a_data_list(payload: dict[str, Any]) -> None:
    assert refusal(D.parse_models, payload) == (Kind.UPSTREAM_UNAVAILABLE, "xf: models.php answered no data list",
                                                None)


# ---- chat.php ------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "你好"}]

CHAT_REQUESTS = [
    ({}, {"model": "gpt-4o-mini", "messages": MESSAGES}),
    # sampling fields pass through (the upstream may ignore them)
    ({"temperature": 0.2, "top_p": 0.9, "max_tokens": 5, "stop": ["\n"]},
     {"temperature": 0.2, "top_p": 0.9, "max_tokens": 5, "stop": ["\n"], "model": "gpt-4o-mini",
      "messages": MESSAGES}),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
     {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto", "model": "gpt-4o-mini",
      "messages": MESSAGES}),
    # params never override the call's model and messages
    ({"model": "other", "messages": []}, {"model": "gpt-4o-mini", "messages": MESSAGES}),
]


@pytest.mark.parametrize(("params", "body"), CHAT_REQUESTS, ids=["bare", "sampling", "tools", "no-override"])
def test_chat_request(params: dict[str, Any], body: dict[str, Any]) -> None:
    call = ChatCall(model="gpt-4o-mini", messages=MESSAGES, params=params)
    assert D.chat_request(call) == UpstreamCall("POST", "chat.php", json=body)


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
XF_CALL = {"id": "call_xf0000000000000000001", "type": "function",
           "function": {"name": "get_weather", "arguments": "{\"city\": \"a\"}"}}
CHATS = [
    # the page's answer: choices[0].message.content, nothing else promised
    ({"choices": [{"message": {"content": "你好!我是 AI 助手..."}}]}, ChatAnswer(content="你好!我是 AI 助手...")),
    # the sim's
    ({"choices": [{"message": {"content": "你好!我是 AI 助手。You said: hi"}}]},
     ChatAnswer(content="你好!我是 AI 助手。You said: hi")),
    # the sim's when tools, tool results or response_format are sent (proxy/sim/chat_model.py)
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [XF_CALL]},
                   "finish_reason": "tool_calls"}]},
     ChatAnswer(content=None, tool_calls=[XF_CALL], finish_reason="tool_calls")),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Tool results: get_weather: sunny"},
                   "finish_reason": "stop"}]},
     ChatAnswer(content="Tool results: get_weather: sunny", finish_reason="stop")),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "{\"answer\": \"hi\"}"},
                   "finish_reason": "stop"}]},
     ChatAnswer(content="{\"answer\": \"hi\"}", finish_reason="stop")),
    # all OpenAI's fields when a deployment sends them
    ({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                              "finish_reason": "length"}],
      "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}},
     ChatAnswer(content="hi", finish_reason="length", prompt_tokens=9, completion_tokens=1)),
    ({"choices": [{"message": {"content": None, "tool_calls": [TOOL_CALL]}, "finish_reason": "tool_calls"}]},
     ChatAnswer(content=None, tool_calls=[TOOL_CALL], finish_reason="tool_calls")),
    # what is not of the right type is dropped, not trusted
    ({"choices": [{"message": {"content": "a", "tool_calls": []}}]}, ChatAnswer(content="a")),
    ({"choices": [{"message": {"content": "a", "tool_calls": "f()"}}]}, ChatAnswer(content="a")),
    ({"choices": [{"message": {"content": ["part"]}}]}, ChatAnswer(content=None)),
    ({"choices": [{"message": "hi"}]}, ChatAnswer(content=None)),
    ({"choices": [{}]}, ChatAnswer(content=None)),
    ({"choices": [{"message": {"content": "a"}, "finish_reason": 1}], "usage": {"prompt_tokens": "9",
                                                                               "completion_tokens": True}},
     ChatAnswer(content="a")),
    ({"choices": [{"message": {"content": "a"}}], "usage": "lots"}, ChatAnswer(content="a")),
    # only the first choice counts
    ({"choices": [{"message": {"content": "first"}}, {"message": {"content": "second"}}]},
     ChatAnswer(content="first")),
]


@pytest.mark.parametrize(("payload", "answer"), CHATS, ids=[str(i) for i in range(len(CHATS))])
def test_parse_chat(payload: dict[str, Any], answer: ChatAnswer) -> None:
    assert D.parse_chat(payload) == answer


@pytest.mark.parametrize("payload", [{}, {"choices": []}, {"choices": None}, {"choices": ["x"]},
                                     {"choices": "x"}])
def test_parse_chat_without_a_choice(payload: dict[str, Any]) -> None:
    assert refusal(D.parse_chat, payload) == (Kind.UPSTREAM_UNAVAILABLE, "xf: chat.php answered no choices", None)


# ---- image.php -----------------------------------------------------------------------------

REF = "https://example.com/uploads/ref.jpg"
SUBMITS = [
    (ImageCall(model="gpt-image-2", prompt="一只可爱的橘猫"), {"model": "gpt-image-2", "prompt": "一只可爱的橘猫"}),
    # reference images go as "images", whatever the kind
    (ImageCall(model="gpt-image-2", prompt="p", references=[REF]), {"model": "gpt-image-2", "prompt": "p",
                                                                    "images": [REF]}),
    (ImageCall(model="kling-video", prompt="p", kind="video", references=[REF, CAT]),
     {"model": "kling-video", "prompt": "p", "images": [REF, CAT]}),
    # xffuw has no size: OpenAI's size is not sent
    (ImageCall(model="gpt-image-2", prompt="p", size="1024x1024"), {"model": "gpt-image-2", "prompt": "p"}),
    # extras pass through ...
    (ImageCall(model="gpt-image-2", prompt="p", extra={"seed": 7, "style": "anime"}),
     {"seed": 7, "style": "anime", "model": "gpt-image-2", "prompt": "p"}),
    # ... and never override the call's own fields
    (ImageCall(model="gpt-image-2", prompt="p", references=[REF],
               extra={"model": "x", "prompt": "y", "images": ["https://other.example/z.png"]}),
     {"model": "gpt-image-2", "prompt": "p", "images": [REF]}),
]


@pytest.mark.parametrize(("call", "body"), SUBMITS, ids=["bare", "references", "video-references", "size",
                                                         "extras", "extras-do-not-override"])
def test_submit_request(call: ImageCall, body: dict[str, Any]) -> None:
    assert D.submit_request(call) == UpstreamCall("POST", "image.php", json=body)


SUBMITTED = [
    # the page's two answers
    ({"ok": True, "task_id": "123456789", "type": "image"},
     TaskState(status="pending", task_id="123456789", media_type="image")),
    ({"ok": True, "result_url": "https://cdn.example.com/a.png", "type": "image"},
     TaskState(status="succeeded", urls=["https://cdn.example.com/a.png"], media_type="image")),
    # the sim's (video, audio; a number id)
    ({"ok": True, "task_id": "123456790", "type": "video"},
     TaskState(status="pending", task_id="123456790", media_type="video")),
    ({"ok": True, "result_url": "http://127.0.0.1:1/files/xf-1.mp3", "type": "audio"},
     TaskState(status="succeeded", urls=["http://127.0.0.1:1/files/xf-1.mp3"], media_type="audio")),
    ({"task_id": 42}, TaskState(status="pending", task_id="42")),
    # a result URL wins over a task id; an empty one does not count
    ({"task_id": "1", "result_url": CAT}, TaskState(status="succeeded", urls=[CAT])),
    ({"task_id": "1", "result_url": "", "type": "image"}, TaskState(status="pending", task_id="1", media_type="image")),
    ({"task_id": "1", "type": 3}, TaskState(status="pending", task_id="1")),
]


@pytest.mark.parametrize(("payload", "state"), SUBMITTED, ids=[str(i) for i in range(len(SUBMITTED))])
def test_parse_submit(payload: dict[str, Any], state: TaskState) -> None:
    assert D.parse_submit(payload) == state


@pytest.mark.parametrize("payload", [{"ok": True}, {"task_id": ""}, {"task_id": None}, {"result_url": None}])
def test_parse_submit_with_neither_task_nor_result(payload: dict[str, Any]) -> None:
    assert refusal(D.parse_submit, payload) == (
        Kind.UPSTREAM_UNAVAILABLE, "xf: image.php answered neither task_id nor result_url", None)


# ---- task.php ------------------------------------------------------------------------------


def test_poll_request() -> None:
    assert D.poll_request("123456789") == UpstreamCall("GET", "task.php", params={"task_id": "123456789"})


NO_URL = "the task finished without a result URL"
# every state word (the docs: pending|running|success|failed; the others seen elsewhere)
STATE_WORDS = [
    ("pending", "pending"), ("queued", "pending"), ("waiting", "pending"),
    ("running", "running"), ("processing", "running"), ("in_progress", "running"),
    ("failed", "failed"), ("failure", "failed"), ("error", "failed"), ("cancelled", "failed"),
    ("canceled", "failed"),
    ("PENDING", "pending"), (" Running ", "running"),
    ("", "running"), ("weird", "running"),  # unknown: still running, poll on
]


@pytest.mark.parametrize(("word", "status"), STATE_WORDS)
def test_parse_poll_state_word(word: str, status: str) -> None:
    assert D.parse_poll("1", {"state": word}).status == status


@pytest.mark.parametrize("word", ["success", "succeeded", "completed", "done", "SUCCESS"])
def test_parse_poll_success_words(word: str) -> None:
    assert D.parse_poll("1", {"state": word, "result_url": CAT}) == TaskState(status="succeeded", task_id="1",
                                                                             urls=[CAT])
    # finished without its result: a failed task, not one to poll forever
    assert D.parse_poll("1", {"state": word, "result_url": ""}) == TaskState(status="failed", task_id="1",
                                                                            reason=NO_URL)


POLLS = [
    # the page's example
    ({"is_final": True, "state": "success", "result_url": CAT, "media_type": "image", "progress": ""},
     TaskState(status="succeeded", task_id="7", urls=[CAT], media_type="image")),
    # the sim's, with each progress form (a number, "40%", "") and result_url "" or null while running
    ({"is_final": False, "state": "pending", "result_url": None, "media_type": "image", "progress": 0},
     TaskState(status="pending", task_id="7", media_type="image", progress=0.0)),
    ({"is_final": False, "state": "running", "result_url": "", "media_type": "video", "progress": "40%"},
     TaskState(status="running", task_id="7", media_type="video", progress=40.0)),
    ({"is_final": False, "state": "running", "result_url": None, "media_type": "audio", "progress": ""},
     TaskState(status="running", task_id="7", media_type="audio")),
    ({"is_final": True, "state": "success", "result_url": "http://127.0.0.1:1/files/xf-7.mp4", "media_type": "video",
      "progress": 100}, TaskState(status="succeeded", task_id="7", urls=["http://127.0.0.1:1/files/xf-7.mp4"],
                                  media_type="video", progress=100.0)),
    ({"is_final": True, "state": "failed", "result_url": None, "media_type": "image", "progress": "100%",
      "fail_reason": "生成失败:simulated failure ([fail] in prompt)"},
     TaskState(status="failed", task_id="7", media_type="image", progress=100.0,
               reason="生成失败:simulated failure ([fail] in prompt)")),
    # progress: more forms
    ({"state": "running", "progress": 55.5}, TaskState(status="running", task_id="7", progress=55.5)),
    ({"state": "running", "progress": " 55 % "}, TaskState(status="running", task_id="7", progress=55.0)),
    ({"state": "running", "progress": "half"}, TaskState(status="running", task_id="7")),
    ({"state": "running", "progress": True}, TaskState(status="running", task_id="7")),
    # the docs: poll until is_final or a result_url. A URL ends the task whatever the state says ...
    ({"state": "running", "result_url": CAT}, TaskState(status="succeeded", task_id="7", urls=[CAT])),
    ({"is_final": False, "result_url": CAT}, TaskState(status="succeeded", task_id="7", urls=[CAT])),
    # ... except a failure
    ({"state": "failed", "result_url": CAT, "fail_reason": "x"},
     TaskState(status="failed", task_id="7", urls=[CAT], reason="x")),
    # is_final without success or a URL is a failure
    ({"is_final": True, "state": "running"}, TaskState(status="failed", task_id="7")),
    ({"is_final": True}, TaskState(status="failed", task_id="7")),
    ({"is_final": True, "state": "success"}, TaskState(status="failed", task_id="7", reason=NO_URL)),
    ({"is_final": "yes", "state": "running"}, TaskState(status="running", task_id="7")),  # only true is true
    # a result_url that is not text does not count
    ({"state": "running", "result_url": ["x"]}, TaskState(status="running", task_id="7")),
    ({"state": "running", "media_type": 5}, TaskState(status="running", task_id="7")),
]


@pytest.mark.parametrize(("payload", "state"), POLLS, ids=[str(i) for i in range(len(POLLS))])
def test_parse_poll(payload: dict[str, Any], state: TaskState) -> None:
    assert D.parse_poll("7", payload) == state


# A failure's reason: the first non-empty text of these fields, in this order.
REASONS = [
    ({"fail_reason": "a", "error": "b", "error_message": "c", "message": "d", "reason": "e", "msg": "f"}, "a"),
    ({"error": "b", "error_message": "c", "message": "d", "reason": "e", "msg": "f"}, "b"),
    ({"error_message": "c", "message": "d", "reason": "e", "msg": "f"}, "c"),
    ({"message": "d", "reason": "e", "msg": "f"}, "d"),
    ({"reason": "e", "msg": "f"}, "e"),
    ({"msg": "f"}, "f"),
    ({"fail_reason": "", "error": {"code": 1}, "msg": "f"}, "f"),  # empty and non-text are skipped
    ({}, None),
]


@pytest.mark.parametrize(("fields", "reason"), REASONS, ids=[str(i) for i in range(len(REASONS))])
def test_parse_poll_failure_reason(fields: dict[str, Any], reason: str | None) -> None:
    assert D.parse_poll("1", {"is_final": True, "state": "failed", **fields}).reason == reason
    # a task that is not failed carries no reason
    assert D.parse_poll("1", {"state": "running", **fields}).reason is None


# ---- what xffuw does not have: the base's defaults -------------------------------------------


def test_no_balance_endpoint_and_no_known_limit() -> None:
    assert D.has_balance is False
    assert D.balance_request() is None
    assert D.parse_balance({"credits": 5}) is None
    assert [D.key_limit(v) for v in (None, 0, 1, 5)] == [None, None, None, None]


def test_no_task_list() -> None:
    assert D.list_request(1) is None  # every task is polled on its own
    assert D.parse_list({"tasks": []}) is None
