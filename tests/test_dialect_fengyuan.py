"""The Fengyuan dialect (proxy/providers/fengyuan.py) as tables: both envelopes, every answer body
the API page, the field notes and the simulator (proxy/sim/fengyuan.py, `render_task` with its
rotating result places and reason keys) describe, written out here and fed to the pure
functions. No server: milliseconds each. One test per mapping rule."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import refusal

from proxy.errors import Kind
from proxy.providers.base import Answer, ImageCall, KeyInfo, ModelInfo, TaskState, UpstreamCall
from proxy.providers.fengyuan import Fengyuan, size_params

D = Fengyuan("fy")
URL = "http://127.0.0.1:1/files/fy-task_a.png"
VIDEO = "http://127.0.0.1:1/files/fy-task_a.mp4"
REF = "https://example.com/product.jpg"
META = {"node": "sim-gpu-1", "trace": "tr-000001"}  # the sim's unknown extras, on purpose


# ---- check: two envelopes ------------------------------------------------------------------

TASK = {"id": "task_abc123", "status": "pending", "created_at": "2025-01-20T10:00:00Z"}
# (status, body) -> the payload check hands on: the envelope's data
SUCCESSES = [
    # documented
    (200, {"success": True, "data": TASK}, TASK),
    (200, {"success": True, "data": TASK, "request_id": "req-00000001"}, TASK),
    (200, {"success": True, "data": None}, None),
    (200, {"success": True}, None),
    # observed from the running service
    (200, {"code": 0, "message": "success", "data": TASK}, TASK),
    (200, {"code": "0", "message": "success", "data": TASK}, TASK),
    (200, {"code": 200, "message": "ok", "data": TASK}, TASK),
    (200, {"code": "200", "data": TASK}, TASK),
    (200, {"code": 0, "message": "success", "data": [1, 2]}, [1, 2]),
    (200, {"code": 0, "message": "ok"}, None),  # code 0 without data: a success with nothing in it
    # neither: a bare data
    (200, {"data": {"services": []}}, {"services": []}),
    (201, {"success": True, "data": TASK}, TASK),
]


@pytest.mark.parametrize(("status", "body", "payload"), SUCCESSES, ids=[str(i) for i in range(len(SUCCESSES))])
def test_check_success(status: int, body: dict[str, Any], payload: Any) -> None:
    assert D.check(Answer(status, body, None)) == payload


# The page's error format, {"success": false, "message": "错误信息", "code": "ERROR_CODE"}, with
# each status its table lists: the status decides.
DOC_ERROR = {"success": False, "message": "错误信息", "code": "ERROR_CODE"}
DOC_STATUSES = [(400, Kind.BAD_REQUEST), (401, Kind.AUTH), (403, Kind.BALANCE), (404, Kind.MODEL_NOT_FOUND),
                (429, Kind.RATE_LIMITED), (500, Kind.UPSTREAM_UNAVAILABLE)]


@pytest.mark.parametrize(("status", "kind"), DOC_STATUSES)
def test_check_documented_error_status(status: int, kind: Kind) -> None:
    assert refusal(D.check, Answer(status, DOC_ERROR, None)) == (kind, "fy: 错误信息", None)


# (status, body, Retry-After) -> (kind, message); retry_after goes along whenever a body was read
ERRORS = [
    # documented: {"success": false, "message", "code": "ERROR_CODE"} with the sim's statuses and texts
    (401, {"success": False, "message": "API密钥无效或已过期 (invalid api key)", "code": "INVALID_API_KEY",
           "request_id": "req-00000001"}, None,
     Kind.AUTH, "fy: API密钥无效或已过期 (invalid api key)"),
    (403, {"success": False, "message": "积分不足 (insufficient credits)", "code": "INSUFFICIENT_CREDITS"}, None,
     Kind.BALANCE, "fy: 积分不足 (insufficient credits)"),
    (400, {"success": False, "message": "service_code is required", "code": "INVALID_PARAMS"}, None,
     Kind.BAD_REQUEST, "fy: service_code is required"),
    (400, {"success": False, "message": "提示词包含违规内容 (prompt blocked by content moderation)",
           "code": "CONTENT_BLOCKED"}, None,
     Kind.CONTENT_POLICY, "fy: 提示词包含违规内容 (prompt blocked by content moderation)"),
    (500, {"success": False, "message": "AI 服务调用失败 (AI service error)", "code": "AI_SERVICE_ERROR"}, None,
     Kind.UPSTREAM_UNAVAILABLE, "fy: AI 服务调用失败 (AI service error)"),
    (404, {"success": False, "message": "service not found: x", "code": "SERVICE_NOT_FOUND"}, None,
     Kind.MODEL_NOT_FOUND, "fy: service not found: x"),
    (404, {"success": False, "message": "任务不存在 (task not found)", "code": "TASK_NOT_FOUND"}, None,
     Kind.MODEL_NOT_FOUND, "fy: 任务不存在 (task not found)"),
    (404, {"success": False, "message": "接口不存在 (not found)", "code": "NOT_FOUND"}, None,
     Kind.MODEL_NOT_FOUND, "fy: 接口不存在 (not found)"),
    (429, {"success": False, "message": "请求过于频繁,请稍后再试", "code": "RATE_LIMIT_EXCEEDED"}, 42.0,
     Kind.RATE_LIMITED, "fy: 请求过于频繁,请稍后再试"),
    (429, {"success": False, "message": "请求过于频繁,请稍后再试", "code": "RATE_LIMIT_EXCEEDED"}, None,
     Kind.RATE_LIMITED, "fy: 请求过于频繁,请稍后再试"),
    (500, {"success": False, "message": "服务器内部错误", "code": "INTERNAL_ERROR"}, None,
     Kind.UPSTREAM_UNAVAILABLE, "fy: 服务器内部错误"),
    (405, {"success": False, "message": "method not allowed", "code": "METHOD_NOT_ALLOWED"}, None,
     Kind.UPSTREAM_UNAVAILABLE, "fy: method not allowed"),
    # observed: {"code": N, "message", "data": null}, usually with HTTP 200; the number decides
    (200, {"code": 401, "message": "API密钥无效或已过期 (invalid api key)", "data": None,
           "request_id": "req-00000002"}, None,
     Kind.AUTH, "fy: API密钥无效或已过期 (invalid api key)"),
    (200, {"code": 40001, "message": "积分不足 (insufficient credits)", "data": None}, None,
     Kind.BALANCE, "fy: 积分不足 (insufficient credits)"),
    (200, {"code": 300202, "message": "积分不足 (insufficient credits)", "data": None}, None,
     Kind.BALANCE, "fy: 积分不足 (insufficient credits)"),
    (200, {"code": "40001", "message": "积分不足", "data": None}, None, Kind.BALANCE, "fy: 积分不足"),
    (200, {"code": 40002, "message": "AI 服务调用失败 (AI service error)", "data": None}, None,
     Kind.UPSTREAM_UNAVAILABLE, "fy: AI 服务调用失败 (AI service error)"),
    (200, {"code": 40003, "message": "提示词包含违规内容 (prompt blocked by content moderation)", "data": None},
     None, Kind.CONTENT_POLICY, "fy: 提示词包含违规内容 (prompt blocked by content moderation)"),
    (200, {"code": 403, "message": "no permission", "data": None}, None, Kind.BALANCE, "fy: no permission"),
    (200, {"code": 404, "message": "任务不存在 (task not found)", "data": None}, None,
     Kind.MODEL_NOT_FOUND, "fy: 任务不存在 (task not found)"),
    (200, {"code": 429, "message": "请求过于频繁,请稍后再试", "data": None}, None,
     Kind.RATE_LIMITED, "fy: 请求过于频繁,请稍后再试"),
    (429, {"code": 429, "message": "请求过于频繁,请稍后再试", "data": None}, 5.0,
     Kind.RATE_LIMITED, "fy: 请求过于频繁,请稍后再试"),
    (200, {"code": 500, "message": "服务器内部错误", "data": None}, None,
     Kind.UPSTREAM_UNAVAILABLE, "fy: 服务器内部错误"),
    # the observed envelope's 400 has no word to go on and no 400 status: an upstream error
    (200, {"code": 400, "message": "service_code is required", "data": None}, None,
     Kind.BAD_REQUEST, "fy: service_code is required"),
    (400, {"code": 400, "message": "params is required", "data": None}, None,
     Kind.BAD_REQUEST, "fy: params is required"),
    # a known business code wins over the status ...
    (500, {"code": 40003, "message": "x", "data": None}, None, Kind.CONTENT_POLICY, "fy: x"),
    # ... the status over words
    (401, {"success": False, "message": "积分不足"}, None, Kind.AUTH, "fy: 积分不足"),
    # words in the code or the message, when numbers say nothing
    (200, {"code": 99999, "message": "积分不足", "data": None}, None, Kind.BALANCE, "fy: 积分不足"),
    (200, {"code": 99999, "message": "余额不足", "data": None}, None, Kind.BALANCE, "fy: 余额不足"),
    (200, {"success": False, "message": "quota used up", "code": "X"}, None, Kind.BALANCE, "fy: quota used up"),
    (200, {"success": False, "message": "x", "code": "QUOTA_EXCEEDED"}, None, Kind.BALANCE, "fy: x"),
    (200, {"success": False, "message": "x", "code": "INSUFFICIENT_CREDITS"}, None, Kind.BALANCE, "fy: x"),
    (500, {"success": False, "message": "Too many requests", "code": "X"}, None,
     Kind.RATE_LIMITED, "fy: Too many requests"),
    (200, {"code": 7, "message": "请求过于频繁"}, None, Kind.RATE_LIMITED, "fy: 请求过于频繁"),
    (200, {"success": False, "message": "x", "code": "RATE_LIMIT_EXCEEDED"}, None, Kind.RATE_LIMITED, "fy: x"),
    (200, {"success": False, "message": "x", "code": "INVALID_API_KEY"}, None, Kind.AUTH, "fy: x"),
    (200, {"success": False, "message": "x", "code": "UNAUTHORIZED"}, None, Kind.AUTH, "fy: x"),
    (200, {"code": 7, "message": "API密钥无效"}, None, Kind.AUTH, "fy: API密钥无效"),
    (200, {"code": 7, "message": "apikey missing"}, None, Kind.AUTH, "fy: apikey missing"),
    (200, {"success": False, "message": "x", "code": "CONTENT_BLOCKED"}, None, Kind.CONTENT_POLICY, "fy: x"),
    (200, {"code": 7, "message": "内容违规"}, None, Kind.CONTENT_POLICY, "fy: 内容违规"),
    (200, {"code": 7, "message": "sensitive content"}, None, Kind.CONTENT_POLICY, "fy: sensitive content"),
    (200, {"success": False, "message": "x", "code": "SERVICE_NOT_FOUND"}, None, Kind.MODEL_NOT_FOUND, "fy: x"),
    (200, {"code": 7, "message": "服务不存在"}, None, Kind.MODEL_NOT_FOUND, "fy: 服务不存在"),
    (200, {"code": 7, "message": "service does not exist"}, None, Kind.MODEL_NOT_FOUND, "fy: service does not exist"),
    # no words: 400 is the caller's mistake, anything else the upstream's
    (400, {"success": False, "message": "prompt must be a string", "code": "INVALID_PARAMS"}, None,
     Kind.BAD_REQUEST, "fy: prompt must be a string"),
    (200, {"success": False, "message": "something odd", "code": "ODD"}, None,
     Kind.UPSTREAM_UNAVAILABLE, "fy: something odd"),
    # where the message is: message, msg, error, else "unknown error"
    (200, {"success": False, "msg": "from msg"}, None, Kind.UPSTREAM_UNAVAILABLE, "fy: from msg"),
    (200, {"success": False, "error": "from error"}, None, Kind.UPSTREAM_UNAVAILABLE, "fy: from error"),
    (200, {"success": False}, None, Kind.UPSTREAM_UNAVAILABLE, "fy: unknown error"),
    (200, {"code": 1, "message": "failed", "data": {}}, None, Kind.UPSTREAM_UNAVAILABLE, "fy: failed"),
    (200, {"success": "true", "data": {}}, None, Kind.UPSTREAM_UNAVAILABLE, "fy: unknown error"),
    # a success envelope with an error status is an error
    (500, {"success": True, "data": {}}, None, Kind.UPSTREAM_UNAVAILABLE, "fy: unknown error"),
    (429, {"code": 0, "data": {}}, 9.0, Kind.RATE_LIMITED, "fy: unknown error"),
]


@pytest.mark.parametrize(("status", "body", "retry_after", "kind", "message"), ERRORS,
                         ids=[f"{r[0]}-{r[1].get('code')}-{i}" for i, r in enumerate(ERRORS)])
def test_check_error(status: int, body: dict[str, Any], retry_after: float | None, kind: Kind, message: str) -> None:
    assert refusal(D.check, Answer(status, body, retry_after)) == (kind, message, retry_after)


# No JSON object to read (an nginx page, a cut body): the status decides, else an upstream failure.
BODILESS = [
    (401, None, None, Kind.AUTH, "fy upstream answered HTTP 401"),
    (403, None, None, Kind.BALANCE, "fy upstream answered HTTP 403"),
    (404, None, None, Kind.MODEL_NOT_FOUND, "fy upstream answered HTTP 404"),
    (429, None, 3.0, Kind.RATE_LIMITED, "fy upstream answered HTTP 429"),
    (429, [], None, Kind.RATE_LIMITED, "fy upstream answered HTTP 429"),
    (502, None, None, Kind.UPSTREAM_UNAVAILABLE, "fy upstream answered HTTP 502 with an unreadable body"),
    (503, None, 20.0, Kind.UPSTREAM_UNAVAILABLE, "fy upstream answered HTTP 503 with an unreadable body"),
    (500, "oops", None, Kind.UPSTREAM_UNAVAILABLE, "fy upstream answered HTTP 500 with an unreadable body"),
    (200, None, None, Kind.UPSTREAM_UNAVAILABLE, "fy upstream answered HTTP 200 with an unreadable body"),
    (200, [{"id": 1}], None, Kind.UPSTREAM_UNAVAILABLE, "fy upstream answered HTTP 200 with an unreadable body"),
]


@pytest.mark.parametrize(("status", "body", "retry_after", "kind", "message"), BODILESS,
                         ids=[f"{r[0]}-{r[1]!r}" for r in BODILESS])
def test_check_without_an_object(status: int, body: Any, retry_after: float | None, kind: Kind,
                                 message: str) -> None:
    assert refusal(D.check, Answer(status, body, retry_after)) == (kind, message, retry_after)


def test_key_goes_in_both_documented_headers() -> None:
    assert D.auth("sk-k") == {"x-api-key": "sk-k", "authorization": "Bearer sk-k"}


# ---- the service list ----------------------------------------------------------------------

DOC_SERVICE = {"id": 1, "service_code": "image_generation", "name": "通用图像生成", "category": "image",
               "description": "基于 AI 的图像生成服务", "cost_per_request": 20.00, "vip_discount": 0.8,
               "model_endpoint": "/api/v1/jobs/createTask"}


def test_models_request_needs_no_key() -> None:
    assert D.models_request() == UpstreamCall("GET", "api/service/list")
    assert D.models_need_key is False  # the page: the one endpoint without auth


SERVICES = [
    # the page's example
    (DOC_SERVICE, ModelInfo(id="image_generation", kind="image", price=20.0, name="通用图像生成", vip_discount=0.8)),
    # the sim's, with its unknown extras
    ({"id": 3, "service_code": "image-video", "name": "图生视频", "category": "video",
      "description": "由图片或提示词生成短视频", "cost_per_request": 50.0, "vip_discount": 0.8,
      "model_endpoint": "/api/v1/jobs/createVideoTask", "is_active": 1, "sort_order": 30},
     ModelInfo(id="image-video", kind="video", price=50.0, name="图生视频", vip_discount=0.8)),
    # categories
    ({"service_code": "a", "category": "audio"}, ModelInfo(id="a", kind="audio")),
    ({"service_code": "m", "category": "music"}, ModelInfo(id="m", kind="audio")),
    ({"service_code": "i", "category": "IMAGE"}, ModelInfo(id="i", kind="image")),
    ({"service_code": "t", "category": "text"}, ModelInfo(id="t", kind="other")),
    ({"service_code": "n", "category": None}, ModelInfo(id="n", kind="other")),
    ({"service_code": "n2"}, ModelInfo(id="n2", kind="other")),
    # numbers as strings, or not numbers
    ({"service_code": "s", "category": "image", "cost_per_request": "20", "vip_discount": "0.8"},
     ModelInfo(id="s", kind="image", price=20.0, vip_discount=0.8)),
    ({"service_code": "z", "category": "image", "cost_per_request": "", "vip_discount": None, "name": 3},
     ModelInfo(id="z", kind="image")),
]


@pytest.mark.parametrize(("service", "model"), SERVICES, ids=[s["service_code"] for s, _ in SERVICES])
def test_parse_models_service(service: dict[str, Any], model: ModelInfo) -> None:
    assert D.parse_models({"services": [service]}) == [model]
    assert D.parse_models([service]) == [model]  # a bare list is read the same


def test_parse_models_skips_services_without_a_code() -> None:
    payload = {"services": [{"service_code": "b"}, {"name": "none"}, {"service_code": ""}, "x", None,
                            {"service_code": "a"}]}
    assert [m.id for m in D.parse_models(payload)] == ["b", "a"]


@pytest.mark.parametrize("payload", [None, {}, {"services": {}}, {"services": None}, "x", 3])
def test_parse_models_without_services(payload: Any) -> None:
    assert refusal(D.parse_models, payload) == (Kind.UPSTREAM_UNAVAILABLE, "fy: service list answered no services",
                                                None)


def test_no_chat() -> None:
    assert refusal(D.chat_request, None) == (Kind.BAD_REQUEST, "fy offers no chat models", None)


# ---- invoke: parameter mappings --------------------------------------------------------------

# OpenAI's size -> aspect_ratio (the nearest) and size class (by the longer side)
SIZES = [
    (None, {}), ("", {}), ("auto", {}),
    ("1024x1024", {"aspect_ratio": "1:1", "size": "1K"}),
    ("256x256", {"aspect_ratio": "1:1", "size": "1K"}),
    ("512x512", {"aspect_ratio": "1:1", "size": "1K"}),
    ("1536x1024", {"aspect_ratio": "3:2", "size": "1K"}),
    ("1024x1536", {"aspect_ratio": "2:3", "size": "1K"}),
    ("1792x1024", {"aspect_ratio": "16:9", "size": "2K"}),
    ("1024x1792", {"aspect_ratio": "9:16", "size": "2K"}),
    ("1024x768", {"aspect_ratio": "4:3", "size": "1K"}),
    ("768x1024", {"aspect_ratio": "3:4", "size": "1K"}),
    ("1280x1024", {"aspect_ratio": "5:4", "size": "1K"}),
    ("1024x1280", {"aspect_ratio": "4:5", "size": "1K"}),
    ("2560x1080", {"aspect_ratio": "21:9", "size": "2K"}),
    ("2048x2048", {"aspect_ratio": "1:1", "size": "2K"}),
    ("3840x2160", {"aspect_ratio": "16:9", "size": "4K"}),
    ("1000x900", {"aspect_ratio": "1:1", "size": "1K"}),  # the nearest ratio
    # the class boundaries: 1600 and 3000 on the longer side
    ("1600x900", {"aspect_ratio": "16:9", "size": "1K"}),
    ("1601x900", {"aspect_ratio": "16:9", "size": "2K"}),
    ("3000x3000", {"aspect_ratio": "1:1", "size": "2K"}),
    ("3001x3001", {"aspect_ratio": "1:1", "size": "4K"}),
    # other separators and spaces
    ("1024×768", {"aspect_ratio": "4:3", "size": "1K"}),
    ("1024*768", {"aspect_ratio": "4:3", "size": "1K"}),
    (" 1024 X 768 ", {"aspect_ratio": "4:3", "size": "1K"}),
    # Fengyuan's own values pass as they are
    ("1K", {"size": "1K"}), ("2k", {"size": "2K"}), ("4K", {"size": "4K"}),
    ("16:9", {"aspect_ratio": "16:9"}), ("7:3", {"aspect_ratio": "7:3"}),
    # nothing usable
    ("3K", {}), ("big", {}), ("0x100", {}), ("100x0", {}), ("1024x", {}), ("1.5:1", {}),
]


@pytest.mark.parametrize(("size", "params"), SIZES, ids=[repr(s) for s, _ in SIZES])
def test_size_mapping(size: str | None, params: dict[str, str]) -> None:
    assert size_params(size) == params
    call = ImageCall(model="image_generation", prompt="猫", size=size)
    assert D.submit_request(call) == UpstreamCall("POST", "api/service/invoke", json={
        "service_code": "image_generation", "params": {**params, "prompt": "猫"}})


# Reference images by model kind: (the whole list, the first URL) under each kind's names.
REFERENCES = [
    ("image", [REF], {"image_input": [REF], "product_image": REF}),
    ("image", [REF, URL], {"image_input": [REF, URL], "product_image": REF}),
    ("video", [REF], {"image_urls": [REF], "image_url": REF}),
    ("video", [REF, URL], {"image_urls": [REF, URL], "image_url": REF}),
    ("audio", [REF], {"image_input": [REF], "product_image": REF}),
    ("other", [REF], {"image_input": [REF], "product_image": REF}),
    ("image", [], {}),
    ("video", [], {}),
]


@pytest.mark.parametrize(("kind", "references", "params"), REFERENCES,
                         ids=[f"{k}-{len(r)}" for k, r, _ in REFERENCES])
def test_reference_images_by_kind(kind: Any, references: list[str], params: dict[str, Any]) -> None:
    call = ImageCall(model="m", prompt="p", kind=kind, references=references)
    assert D.submit_request(call).json == {"service_code": "m", "params": {"prompt": "p", **params}}


EXTRAS = [
    # public clients' parameters pass through
    (ImageCall(model="image_generation", prompt="p", extra={"model": "nano-banana-2", "seed": 1}),
     {"model": "nano-banana-2", "seed": 1, "prompt": "p"}),
    (ImageCall(model="image-video", prompt="p", kind="video", extra={"duration": 5, "resolution": "720p"}),
     {"duration": 5, "resolution": "720p", "prompt": "p"}),
    # an extra wins over what size maps to ...
    (ImageCall(model="m", prompt="p", size="1792x1024", extra={"aspect_ratio": "1:1"}),
     {"aspect_ratio": "1:1", "size": "2K", "prompt": "p"}),
    (ImageCall(model="m", prompt="p", size="1024x1024", extra={"size": "4K"}),
     {"aspect_ratio": "1:1", "size": "4K", "prompt": "p"}),
    # ... and over the reference names it sets itself; the others are still added
    (ImageCall(model="m", prompt="p", references=[REF], extra={"image_input": ["https://x.example/a.png"]}),
     {"image_input": ["https://x.example/a.png"], "prompt": "p", "product_image": REF}),
    (ImageCall(model="m", prompt="p", kind="video", references=[REF], extra={"image_url": "https://x.example/b.png"}),
     {"image_url": "https://x.example/b.png", "prompt": "p", "image_urls": [REF]}),
    # but never over the prompt
    (ImageCall(model="m", prompt="p", extra={"prompt": "other"}), {"prompt": "p"}),
]


@pytest.mark.parametrize(("call", "params"), EXTRAS, ids=["pass", "video-pass", "over-aspect", "over-size",
                                                          "over-image-input", "over-image-url", "not-prompt"])
def test_extras(call: ImageCall, params: dict[str, Any]) -> None:
    assert D.submit_request(call).json == {"service_code": call.model, "params": params}


# ---- invoke: answers -----------------------------------------------------------------------

NO_URL = "the task finished without a result URL"
SUBMITTED = [
    # the page's answer (documented: id)
    ({"id": "task_abc123", "status": "pending", "created_at": "2025-01-20T10:00:00Z"},
     TaskState(status="pending", task_id="task_abc123")),
    # observed: task_id, with cost and balance
    ({"task_id": "task_b", "status": "pending", "cost": 20.0, "balance": 980.0},
     TaskState(status="pending", task_id="task_b", cost=20.0, balance=980.0)),
    # already finished at invoke: nothing to poll
    ({"task_id": "task_c", "status": "success", "progress": 100, "service_code": "image_generation", "cost": 16.0,
      "result_url": URL, "queue_position": 0, "meta": META, "balance": 9984.0},
     TaskState(status="succeeded", task_id="task_c", urls=[URL], progress=100.0, cost=16.0, balance=9984.0)),
    ({"status": "completed", "result_urls": [URL]}, TaskState(status="succeeded", urls=[URL])),
    ({"id": "task_d", "status": "completed"}, TaskState(status="failed", task_id="task_d", reason=NO_URL)),
    ({"id": "task_e", "status": "failed", "error_msg": "bad"}, TaskState(status="failed", task_id="task_e",
                                                                          reason="bad")),
    # no status: running
    ({"id": "task_f"}, TaskState(status="running", task_id="task_f")),
    ({"id": 17, "status": "pending"}, TaskState(status="pending", task_id="17")),
]


@pytest.mark.parametrize(("payload", "state"), SUBMITTED, ids=[str(i) for i in range(len(SUBMITTED))])
def test_parse_submit(payload: dict[str, Any], state: TaskState) -> None:
    assert D.parse_submit(payload) == state


@pytest.mark.parametrize("payload", [{"status": "pending"}, {"id": "", "status": "processing"}, {}])
def test_parse_submit_without_a_task_id(payload: dict[str, Any]) -> None:
    assert refusal(D.parse_submit, payload) == (Kind.UPSTREAM_UNAVAILABLE, "fy: invoke answered no task id", None)


@pytest.mark.parametrize("payload", [None, [], "task_x", 3])
def test_parse_submit_without_a_task(payload: Any) -> None:
    assert refusal(D.parse_submit, payload) == (Kind.UPSTREAM_UNAVAILABLE, "fy: invoke answered no task", None)


# ---- the task detail -----------------------------------------------------------------------


def test_poll_request() -> None:
    assert D.poll_request("task_abc123") == UpstreamCall("GET", "api/service/task/task_abc123")


STATE_WORDS = [
    ("pending", "pending"), ("queued", "pending"), ("waiting", "pending"), ("created", "pending"),
    ("processing", "running"), ("running", "running"), ("in_progress", "running"),
    ("failed", "failed"), ("failure", "failed"), ("error", "failed"), ("cancelled", "failed"),
    ("canceled", "failed"), ("timeout", "failed"),
    (" PROCESSING ", "running"), ("", "running"), ("paused", "running"),
]


@pytest.mark.parametrize(("word", "status"), STATE_WORDS)
def test_parse_poll_state_word(word: str, status: str) -> None:
    assert D.parse_poll("t", {"status": word}).status == status


@pytest.mark.parametrize("word", ["completed", "success", "succeeded", "done", "Completed"])
def test_parse_poll_finished_words(word: str) -> None:
    assert D.parse_poll("t", {"status": word, "result_url": URL}) == TaskState(status="succeeded", task_id="t",
                                                                              urls=[URL])
    assert D.parse_poll("t", {"status": word}) == TaskState(status="failed", task_id="t", reason=NO_URL)


def test_parse_poll_without_a_status_is_running() -> None:
    assert D.parse_poll("t", {"progress": 10}) == TaskState(status="running", task_id="t", progress=10.0)


# Every place a finished task may keep its result: the field notes' keys, the sim's rotation
# (render_task: observed variants 0-3 for images and videos, documented variants 0-3), and more.
RESULTS = [
    # observed, images
    ({"result_url": URL}, [URL]), ({"result_urls": [URL]}, [URL]),
    ({"image_url": URL}, [URL]), ({"image_urls": [URL]}, [URL]),
    # observed, videos
    ({"video_url": VIDEO}, [VIDEO]), ({"video_urls": [VIDEO]}, [VIDEO]),
    # documented envelope in the sim
    ({"result": {"images": [{"url": URL}]}}, [URL]), ({"result": {"videos": [{"url": VIDEO}]}}, [VIDEO]),
    ({"output": [URL]}, [URL]), ({"urls": [URL]}, [URL]),
    # other names, any depth
    ({"audio_url": URL}, [URL]), ({"audio_urls": [URL]}, [URL]), ({"file_url": URL}, [URL]),
    ({"file_urls": [URL]}, [URL]), ({"outputs": [{"url": URL}]}, [URL]), ({"results": [{"image": URL}]}, [URL]),
    ({"data": {"images": [URL]}}, [URL]), ({"result": {"data": [{"url": URL}]}}, [URL]),
    ({"output": {"video": {"url": VIDEO}}}, [VIDEO]), ({"URL": URL}, [URL]),
    # several, in order, each once
    ({"result_urls": [URL, VIDEO], "image_url": URL}, [URL, VIDEO]),
    # echoed request parameters hold reference images, not results
    ({"params": {"image_input": [REF]}, "result_url": URL}, [URL]),
    ({"input": {"image_url": REF}, "request": {"url": REF}, "inputs": [{"url": REF}], "image_urls": [URL]}, [URL]),
    ({"image_input": [REF], "product_image": REF, "urls": [URL]}, [URL]),
    # only http(s) strings under a result key count
    ({"meta": {"trace": "https://trace.example/1"}, "result_url": URL}, [URL]),
    ({"result_url": "/files/x.png", "urls": ["ftp://x/y.png", 5, None, URL]}, [URL]),
    ({"result_url": "HTTPS://upper.example/a.png"}, []),
]


@pytest.mark.parametrize(("fields", "urls"), RESULTS, ids=[next(iter(f)) + str(i) for i, (f, _) in enumerate(RESULTS)])
def test_parse_poll_result_place(fields: dict[str, Any], urls: list[str]) -> None:
    state = D.parse_poll("t", {"status": "completed", **fields})
    assert (state.status, state.urls) == (("succeeded", urls) if urls else ("failed", []))
    # a task still running has no results yet, whatever it carries
    assert D.parse_poll("t", {"status": "processing", **fields}).urls == []


PROGRESS = [(40, 40.0), (0, 0.0), (99.5, 99.5), ("40%", 40.0), ("40", 40.0), ("", None), (None, None),
            ("n/a", None), (False, None)]


@pytest.mark.parametrize(("value", "progress"), PROGRESS, ids=[repr(v) for v, _ in PROGRESS])
def test_parse_poll_progress(value: Any, progress: float | None) -> None:
    assert D.parse_poll("t", {"status": "processing", "progress": value}).progress == progress


# A failure's reason: the first non-empty of these keys, in this order (text or not).
REASONS = [
    ({"error_msg": "a", "error_message": "b", "fail_reason": "c", "reason": "d", "error": "e", "message": "f",
      "msg": "g"}, "a"),
    ({"error_message": "b", "fail_reason": "c", "reason": "d", "error": "e", "message": "f", "msg": "g"}, "b"),
    ({"fail_reason": "c", "reason": "d", "error": "e", "message": "f", "msg": "g"}, "c"),
    ({"reason": "d", "error": "e", "message": "f", "msg": "g"}, "d"),
    ({"error": "e", "message": "f", "msg": "g"}, "e"),
    ({"message": "f", "msg": "g"}, "f"),
    ({"msg": "g"}, "g"),
    ({"error_msg": "", "error": None, "msg": "g"}, "g"),
    ({"error": {"code": 40002}}, '{"code":40002}'),  # a structure, as JSON
    ({}, None),
]


@pytest.mark.parametrize(("fields", "reason"), REASONS, ids=[str(i) for i in range(len(REASONS))])
def test_parse_poll_failure_reason(fields: dict[str, Any], reason: str | None) -> None:
    assert D.parse_poll("t", {"status": "failed", **fields}).reason == reason
    assert D.parse_poll("t", {"status": "processing", **fields}).reason is None


# The sim's render_task answers, whole: each envelope, phase, result variant and reason key.
SIM_TASKS = [
    # observed, pending / processing
    ({"task_id": "task_a", "status": "pending", "progress": 0, "service_code": "image_generation", "cost": 20.0,
      "queue_position": 0, "meta": META},
     TaskState(status="pending", task_id="task_a", progress=0.0, cost=20.0)),
    ({"task_id": "task_a", "status": "processing", "progress": 57, "service_code": "image_generation", "cost": 20.0,
      "queue_position": 0, "meta": META},
     TaskState(status="running", task_id="task_a", progress=57.0, cost=20.0)),
    # observed, done: "completed" for odd tasks, "success" for even ones
    ({"task_id": "task_a", "status": "completed", "progress": 100, "service_code": "image_generation", "cost": 20.0,
      "result_url": URL, "queue_position": 0, "meta": META},
     TaskState(status="succeeded", task_id="task_a", urls=[URL], progress=100.0, cost=20.0)),
    ({"task_id": "task_a", "status": "success", "progress": 100, "service_code": "image_generation", "cost": 20.0,
      "result_urls": [URL], "queue_position": 0, "meta": META},
     TaskState(status="succeeded", task_id="task_a", urls=[URL], progress=100.0, cost=20.0)),
    ({"task_id": "task_a", "status": "completed", "progress": 100, "service_code": "image-video", "cost": 50.0,
      "video_urls": [VIDEO], "queue_position": 0, "meta": META},
     TaskState(status="succeeded", task_id="task_a", urls=[VIDEO], progress=100.0, cost=50.0)),
    # observed, failed: error_msg or error_message
    ({"task_id": "task_a", "status": "failed", "progress": 100, "service_code": "image_generation", "cost": 20.0,
      "error_msg": "AI 服务生成失败 (simulated [fail])", "queue_position": 0, "meta": META},
     TaskState(status="failed", task_id="task_a", progress=100.0, cost=20.0,
               reason="AI 服务生成失败 (simulated [fail])")),
    ({"task_id": "task_a", "status": "failed", "progress": 100, "service_code": "image_generation", "cost": 20.0,
      "error_message": "AI 服务生成失败 (simulated [fail])", "queue_position": 0, "meta": META},
     TaskState(status="failed", task_id="task_a", progress=100.0, cost=20.0,
               reason="AI 服务生成失败 (simulated [fail])")),
    # documented: id, no cost, progress only on some tasks
    ({"id": "task_a", "status": "processing", "service_code": "image_generation",
      "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:01Z", "queue_position": 0, "meta": META},
     TaskState(status="running", task_id="task_a")),
    ({"id": "task_a", "status": "completed", "service_code": "image_generation", "created_at": "2026-01-01T00:00:00Z",
      "updated_at": "2026-01-01T00:00:01Z", "progress": 100, "result": {"images": [{"url": URL}]},
      "queue_position": 0, "meta": META},
     TaskState(status="succeeded", task_id="task_a", urls=[URL], progress=100.0)),
    ({"id": "task_a", "status": "completed", "service_code": "image-video", "created_at": "2026-01-01T00:00:00Z",
      "updated_at": "2026-01-01T00:00:01Z", "output": [VIDEO], "queue_position": 0, "meta": META},
     TaskState(status="succeeded", task_id="task_a", urls=[VIDEO])),
    # documented, failed: message, fail_reason or reason
    ({"id": "task_a", "status": "failed", "service_code": "image_generation", "created_at": "2026-01-01T00:00:00Z",
      "updated_at": "2026-01-01T00:00:01Z", "message": "生成失败:simulated failure ([fail] in prompt)",
      "queue_position": 0, "meta": META},
     TaskState(status="failed", task_id="task_a", reason="生成失败:simulated failure ([fail] in prompt)")),
    ({"id": "task_a", "status": "failed", "fail_reason": "生成失败:simulated failure ([fail] in prompt)"},
     TaskState(status="failed", task_id="task_a", reason="生成失败:simulated failure ([fail] in prompt)")),
    ({"id": "task_a", "status": "failed", "reason": "生成失败:simulated failure ([fail] in prompt)"},
     TaskState(status="failed", task_id="task_a", reason="生成失败:simulated failure ([fail] in prompt)")),
]


@pytest.mark.parametrize(("payload", "state"), SIM_TASKS, ids=[str(i) for i in range(len(SIM_TASKS))])
def test_parse_poll_sim_task(payload: dict[str, Any], state: TaskState) -> None:
    assert D.parse_poll("asked", payload) == state


def test_parse_poll_task_id_comes_from_the_answer_else_the_request() -> None:
    assert D.parse_poll("asked", {"status": "pending", "task_id": "t1", "id": "t2"}).task_id == "t1"
    assert D.parse_poll("asked", {"status": "pending", "id": "t2"}).task_id == "t2"
    assert D.parse_poll("asked", {"status": "pending", "id": ""}).task_id == "asked"
    assert D.parse_poll("asked", {"status": "pending"}).task_id == "asked"


def test_parse_poll_cost_and_balance() -> None:
    state = D.parse_poll("t", {"status": "pending", "cost": "16", "balance": 984})
    assert (state.cost, state.balance) == (16.0, 984.0)


@pytest.mark.parametrize("payload", [None, [], "done"])
def test_parse_poll_without_data(payload: Any) -> None:
    assert refusal(D.parse_poll, "task_z", payload) == (Kind.UPSTREAM_UNAVAILABLE,
                                                        "fy: task task_z answered no data", None)


# ---- the task list -------------------------------------------------------------------------


def test_list_request() -> None:
    # a full page every time (the page size the docs allow at most): one call polls many tasks
    assert D.list_request(1) == UpstreamCall("GET", "api/task/list", params={"page": "1", "limit": "100"})
    assert D.list_request(3) == UpstreamCall("GET", "api/task/list", params={"page": "3", "limit": "100"})


ROWS = [{"id": "task_1", "status": "completed", "result_url": URL},
        {"task_id": "task_2", "status": "processing", "progress": 40},
        {"id": "task_3", "status": "failed", "error_msg": "bad"}]
LISTED = [TaskState(status="succeeded", task_id="task_1", urls=[URL]),
          TaskState(status="running", task_id="task_2", progress=40.0),
          TaskState(status="failed", task_id="task_3", reason="bad")]
LIST_SHAPES = [
    ({"tasks": ROWS, "total": 3, "page": 1, "limit": 100}, LISTED),  # the documented envelope in the sim
    ({"list": ROWS, "total": 3, "page": 1, "limit": 100}, LISTED),  # the observed one
    ({"items": ROWS}, LISTED), ({"records": ROWS}, LISTED), ({"rows": ROWS}, LISTED), ({"data": ROWS}, LISTED),
    (ROWS, LISTED),  # data itself
    ({"tasks": [], "total": 0}, []),
    ([], []),
    # the first of the keys that is a list
    ({"tasks": None, "list": ROWS}, LISTED),
    ({"tasks": ROWS[:1], "list": ROWS}, LISTED[:1]),
    # rows without an id, or not objects, are left out
    ({"tasks": [*ROWS, {"status": "completed"}, "task_9", None, {"id": "", "status": "pending"}]}, LISTED),
    # a list entry may leave a finished task's result out: still succeeded, read in full by a poll
    ({"tasks": [{"id": "task_4", "status": "completed"}, {"task_id": "task_5", "status": "success"}]},
     [TaskState(status="succeeded", task_id="task_4"), TaskState(status="succeeded", task_id="task_5")]),
    # the sim's rows, whole
    ({"list": [{"task_id": "task_a", "status": "success", "progress": 100, "service_code": "image_generation",
                "cost": 20.0, "image_urls": [URL], "queue_position": 0, "meta": META}], "total": 1, "page": 1,
      "limit": 100},
     [TaskState(status="succeeded", task_id="task_a", urls=[URL], progress=100.0, cost=20.0)]),
]


@pytest.mark.parametrize(("payload", "states"), LIST_SHAPES, ids=[str(i) for i in range(len(LIST_SHAPES))])
def test_parse_list(payload: Any, states: list[TaskState]) -> None:
    page = D.parse_list(payload)
    assert page is not None and page.tasks == states and page.full is False


def rows(count: int) -> list[Any]:
    """A page of `count` rows, the last one unreadable (it counts for the page all the same)."""
    return [{"id": f"t{i}", "status": "pending"} for i in range(count - 1)] + [{"status": "x"}]


# Whether more may follow: the page holds as many as its size (the answer's `limit`, else the
# 100 asked for) and, when the answer names its total and page, those pages hold fewer.
FULL = [
    (rows(99), False), (rows(100), True), (rows(101), True), ([], False),
    ({"tasks": rows(100)}, True), ({"list": rows(99)}, False),
    ({"tasks": rows(20), "limit": 20}, True),  # an upstream that gives fewer than asked
    ({"tasks": rows(19), "limit": 20}, False),
    ({"tasks": rows(20), "limit": 20, "page": 1, "total": 20}, False),
    ({"tasks": rows(20), "limit": 20, "page": 2, "total": 45}, True),
    ({"tasks": rows(20), "limit": 20, "page": 2, "total": 40}, False),
    ({"tasks": rows(20), "limit": 20, "total": 20}, True),  # a total without its page says nothing
    ({"tasks": rows(20), "limit": "20"}, False),  # a size that is not a number: the 100 asked for
    ({"tasks": [], "limit": 20, "page": 1, "total": 0}, False),
]


@pytest.mark.parametrize(("payload", "full"), FULL, ids=[str(i) for i in range(len(FULL))])
def test_parse_list_page_is_full(payload: Any, full: bool) -> None:
    page = D.parse_list(payload)
    assert page is not None and page.full is full
    count = len(payload if isinstance(payload, list) else payload.get("tasks", payload.get("list")))
    assert len(page.tasks) == max(count - 1, 0)


# The sim's garbled list ({"result", "count"}), and other shapes no client knows.
@pytest.mark.parametrize("payload", [{"result": "ok", "count": 3}, {"total": 0}, {"tasks": {}}, {"list": "x"}, {},
                                     None, "x", 5])
def test_parse_list_of_an_unknown_shape_is_none(payload: Any) -> None:
    assert D.parse_list(payload) is None


# ---- user info -----------------------------------------------------------------------------


def test_balance_request() -> None:
    assert D.has_balance is True
    assert D.balance_request() == UpstreamCall("GET", "api/user/info")


BALANCES = [
    # the page's example
    ({"id": 1, "username": "user123", "credits": 1000, "vip_level": 1, "vip_expire_at": "2025-12-31"},
     KeyInfo(credits=1000.0, vip_level=1)),
    # the sim's, with its unknown extra
    ({"id": 1001, "username": "demo_normal", "credits": 9980.0, "vip_level": 0, "vip_expire_at": None,
      "email": "demo_normal@example.invalid"}, KeyInfo(credits=9980.0, vip_level=0)),
    ({"credits": "12.5", "vip_level": "1"}, KeyInfo(credits=12.5)),  # a VIP level must be a number
    ({"credits": None, "vip_level": True}, KeyInfo()),
    ({}, KeyInfo()),
    (None, None), ([], None), ("x", None),
]


@pytest.mark.parametrize(("payload", "info"), BALANCES, ids=[str(i) for i in range(len(BALANCES))])
def test_parse_balance(payload: Any, info: KeyInfo | None) -> None:
    assert D.parse_balance(payload) == info


@pytest.mark.parametrize(("vip_level", "limit"), [(None, 60), (0, 60), (1, 300), (2, 300), (-1, 60)])
def test_key_limit_by_vip_level(vip_level: int | None, limit: int) -> None:
    assert D.key_limit(vip_level) == limit
