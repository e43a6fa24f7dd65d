"""Each row of the error table, through the official SDK (and raw HTTP where the SDK cannot
send the mistake): status, SDK exception class, OpenAI's four-key error body, headers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, FENGYUAN_KEYS, XFFUW_KEYS, RunningProxy, Sims, serving, sim_providers
from helpers import chat, free_port, sdk_error
from openai_spec import validate_error

USER = [{"role": "user", "content": "你好"}]
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
FY_IMAGE = "fengyuan/image_generation"  # the plain id is shared with xffuw, so it is listed prefixed


def expect(exc: openai.APIStatusError, status: int, type_: str, code: str | None) -> None:
    assert exc.status_code == status, (exc.status_code, exc.body)
    assert exc.body["type"] == type_, exc.body
    assert exc.body["code"] == code, exc.body
    assert exc.body["message"], exc.body


def raw_error(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["x-request-id"].startswith("req_")
    body = reply.json()
    validate_error(body)
    assert set(body) == {"error"}, body
    assert "status_code" not in body and "detail" not in body  # not Litestar's own shape
    return body["error"]


@pytest.fixture(scope="module")
def edge(_sim_servers: Sims, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One proxy for the tests whose requests the edge refuses before any upstream call
    (client key, body, route, method): starting a proxy per case would dominate the runtime."""
    raw = {
        "clients": [{"name": "alice", "key": CLIENT_KEY}],
        "providers": sim_providers(_sim_servers),
        "log": {"format": "json"},
        "storage": {"path": str(tmp_path_factory.mktemp("edge") / "proxy.sqlite3")},
    }
    with serving(raw) as proxy:
        yield proxy


# ---- 401: the client key -----------------------------------------------------------


def test_unknown_client_key_is_401_invalid_api_key(edge: RunningProxy, sims: Sims) -> None:
    client = edge.client(api_key="sk-not-a-known-client-key")
    exc = sdk_error(openai.AuthenticationError, lambda: chat(client))
    expect(exc, 401, "invalid_request_error", "invalid_api_key")
    assert "sk-not-a-known-client-key" not in json.dumps(exc.body)
    exc = sdk_error(openai.AuthenticationError, lambda: client.images.generate(model="gpt-image-2", prompt="猫"))
    expect(exc, 401, "invalid_request_error", "invalid_api_key")
    exc = sdk_error(openai.AuthenticationError, lambda: client.models.list())
    expect(exc, 401, "invalid_request_error", "invalid_api_key")
    assert sims.xffuw.count("chat") == 0 and sims.xffuw.count("image") == 0


@pytest.mark.parametrize("headers", [{}, {"authorization": ""}, {"authorization": "Bearer"},
                                     {"authorization": f"Basic {CLIENT_KEY}"}, {"authorization": CLIENT_KEY}])
def test_missing_client_key_is_401(edge: RunningProxy, sims: Sims, headers: dict[str, str]) -> None:
    for path, body in (("/chat/completions", {"model": "gpt-4o-mini", "messages": USER}),
                       ("/images/generations", {"model": "gpt-image-2", "prompt": "猫"})):
        reply = httpx.post(edge.base_url + path, headers=headers, json=body)
        error = raw_error(reply, 401)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    error = raw_error(httpx.get(edge.base_url + "/models", headers=headers), 401)
    assert error["code"] == "invalid_api_key"
    assert sims.xffuw.count("chat") == 0


def test_auth_is_checked_before_the_body(edge: RunningProxy, sims: Sims) -> None:
    reply = httpx.post(edge.base_url + "/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert raw_error(reply, 401)["code"] == "invalid_api_key"


# ---- 404: unknown model ------------------------------------------------------------


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI, sims: Sims) -> None:
    exc = sdk_error(openai.NotFoundError, lambda: chat(client, model="no-such-model"))
    expect(exc, 404, "invalid_request_error", "model_not_found")
    assert exc.body["param"] == "model"
    assert "no-such-model" in exc.body["message"]
    exc = sdk_error(openai.NotFoundError, lambda: client.images.generate(model="xffuw/nope-image", prompt="猫"))
    expect(exc, 404, "invalid_request_error", "model_not_found")
    assert exc.body["param"] == "model"
    exc = sdk_error(openai.NotFoundError, lambda: client.models.retrieve("no-such-model"))
    expect(exc, 404, "invalid_request_error", "model_not_found")
    assert sims.xffuw.count("chat") == 0


@pytest.mark.parametrize(("path", "body"), [
    ("/chat/completions", {"messages": USER}), ("/completions", {"prompt": "hi"}),
    ("/responses", {"input": "hi"}), ("/images/generations", {"prompt": "猫"}),
    ("/images/edits", {"prompt": "猫", "images": [{"image_url": "https://example.com/cat.png"}]})])
def test_empty_model_is_400_not_404(edge: RunningProxy, sims: Sims, path: str, body: dict[str, Any]) -> None:
    error = raw_error(httpx.post(edge.base_url + path, headers=AUTH, json={"model": "", **body}), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", "model"), error
    assert sims.xffuw.count("chat") == 0 and sims.xffuw.count("image") == 0


def test_an_empty_model_field_of_a_form_is_400(edge: RunningProxy, sims: Sims) -> None:
    reply = httpx.post(edge.base_url + "/images/edits", headers=AUTH, files={"mask": ("m.png", b"-", "image/png")},
                       data={"model": "", "prompt": "猫", "image": "https://example.com/cat.png"})
    error = raw_error(reply, 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", "model"), error
    assert sims.xffuw.count("image") == 0


def test_model_the_upstream_no_longer_has_is_404(client: openai.OpenAI, sims: Sims) -> None:
    chat(client)  # loads the catalogue
    sims.xffuw.models = [m for m in sims.xffuw.models if m.slug != "deepseek-chat"]
    exc = sdk_error(openai.NotFoundError, lambda: chat(client, model="deepseek-chat"))
    expect(exc, 404, "invalid_request_error", "model_not_found")
    assert exc.body["param"] == "model"


# ---- 400: the request body ---------------------------------------------------------


@pytest.mark.parametrize("content", [b"{not json", b'{"model": "gpt-4o-mini", "messages": [', b"", b"\xff\xfe"])
def test_malformed_json_is_400(edge: RunningProxy, sims: Sims, content: bytes) -> None:
    reply = httpx.post(edge.base_url + "/chat/completions", content=content,
                       headers={**AUTH, "content-type": "application/json"})
    error = raw_error(reply, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert sims.xffuw.count("chat") == 0


@pytest.mark.parametrize("content", [b"[]", b'"text"', b"42", b"null"])
def test_body_not_an_object_is_400(edge: RunningProxy, sims: Sims, content: bytes) -> None:
    for path in ("/chat/completions", "/images/generations"):
        reply = httpx.post(edge.base_url + path, content=content,
                           headers={**AUTH, "content-type": "application/json"})
        error = raw_error(reply, 400)
        assert error["type"] == "invalid_request_error"
        assert "object" in error["message"].lower()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER}, "model"),
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": "gpt-4o-mini", "messages": "x"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": [{"role": 5, "content": "hi"}]}, "messages[0].role"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages"),
        ({"model": 7, "messages": USER}, "model"),
        ({"model": "gpt-4o-mini", "messages": USER, "max_tokens": "many"}, "max_tokens"),
        ({"model": "gpt-4o-mini", "messages": USER, "n": 0}, "n"),
        # tools, tool_choice, response_format, content parts and earlier tool calls, as OpenAI's spec has them
        ({"model": "gpt-4o-mini", "messages": USER, "tools": "x"}, "tools"),
        ({"model": "gpt-4o-mini", "messages": USER, "tools": [1]}, "tools[0]"),
        ({"model": "gpt-4o-mini", "messages": USER, "tools": [{"function": {"name": "f"}}]}, "tools[0].type"),
        ({"model": "gpt-4o-mini", "messages": USER, "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "gpt-4o-mini", "messages": USER, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"model": "gpt-4o-mini", "messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
         "tools[0].function.name"),
        ({"model": "gpt-4o-mini", "messages": USER, "tool_choice": 5}, "tool_choice"),
        ({"model": "gpt-4o-mini", "messages": USER, "tool_choice": "sometimes"}, "tool_choice"),
        ({"model": "gpt-4o-mini", "messages": USER, "tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"model": "gpt-4o-mini", "messages": USER, "response_format": "json"}, "response_format"),
        ({"model": "gpt-4o-mini", "messages": USER, "response_format": {"type": "yaml"}}, "response_format.type"),
        ({"model": "gpt-4o-mini", "messages": USER, "response_format": {"type": "json_schema"}},
         "response_format.json_schema"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "bogus"}]}]},
         "messages[0].content[0].type"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": "https://a.example/x.png"}}]}]}, "messages[0].content[0].type"),
        *[({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": kind, kind: inner}]}]},
           f"messages[0].content[0].{kind}{field}") for kind, inner, field in [
            ("image_url", {}, ".url"), ("image_url", {"url": 5}, ".url"), ("image_url", {"url": ""}, ".url"),
            ("image_url", {"url": "javascript:alert(1)"}, ".url"), ("image_url", {"url": "data:image/png"}, ".url"),
            ("image_url", {"url": "https://a.example/x.png", "detail": "max"}, ".detail"),
            ("input_audio", {"format": "wav"}, ".data"), ("input_audio", {"data": "UklG", "format": "ogg"}, ".format"),
            ("file", {}, ""), ("file", {"file_id": 7}, ".file_id")]],
        ({"model": "gpt-4o-mini", "messages": [*USER, {"role": "assistant", "content": None, "tool_calls": "x"}]},
         "messages[1].tool_calls"),
        ({"model": "gpt-4o-mini", "messages": [*USER, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"model": "", "messages": USER}, "model"),
    ],
)
def test_missing_or_wrong_chat_field_is_400_naming_it(edge: RunningProxy, sims: Sims, body: dict[str, Any],
                                                      param: str) -> None:
    client = edge.client()
    # The SDK's generic post: its typed create() refuses to send a body without model/messages.
    exc = sdk_error(openai.BadRequestError, lambda: client.post("/chat/completions", body=body, cast_to=object))
    assert exc.status_code == 400
    assert exc.body["type"] == "invalid_request_error"
    assert exc.body["param"] == param, exc.body
    assert sims.xffuw.count("chat") == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-image-2"}, "prompt"),
        ({"model": "gpt-image-2", "prompt": 5}, "prompt"),
        ({"model": "gpt-image-2", "prompt": "   "}, "prompt"),
        ({"model": "gpt-image-2", "prompt": "猫", "n": "two"}, "n"),
        ({"model": "gpt-image-2", "prompt": "猫", "response_format": "gif"}, "response_format"),
    ],
)
def test_missing_or_wrong_image_field_is_400_naming_it(edge: RunningProxy, sims: Sims, body: dict[str, Any],
                                                       param: str) -> None:
    reply = httpx.post(edge.base_url + "/images/generations", headers=AUTH, json=body)
    error = raw_error(reply, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert sims.xffuw.count("image") == 0


# ---- 429 insufficient_quota: every key short of balance or credits ------------------


def assert_insufficient_quota(exc: openai.APIStatusError) -> None:
    expect(exc, 429, "insufficient_quota", "insufficient_quota")
    assert exc.response.headers["x-should-retry"] == "false"


def test_every_xffuw_key_short_of_balance_is_429_insufficient_quota(client: openai.OpenAI, sims: Sims) -> None:
    for key in XFFUW_KEYS:
        sims.xffuw.keys[key] = 0.0
    exc = sdk_error(openai.RateLimitError, lambda: chat(client))
    assert_insufficient_quota(exc)
    assert {c.key for c in sims.xffuw.calls if c.endpoint == "chat"} == set(XFFUW_KEYS)  # both were tried
    exc = sdk_error(openai.RateLimitError, lambda: client.images.generate(model="gpt-image-2", prompt="猫"))
    assert_insufficient_quota(exc)


def credits_read(sims: Sims, keys: list[str], timeout: float = 3.0) -> None:
    """Wait until the proxy has read each Fengyuan key's credits once (it does at start): after
    that, what the sim's credits say is news to the proxy, learnt from an invoke."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(sims.fengyuan.count("user_info", key) for key in keys):
        time.sleep(0.02)


@pytest.mark.parametrize("case", ["documented-403", "observed-40001", "observed-300202"])
def test_every_fengyuan_key_short_of_credits_is_429_insufficient_quota(client: openai.OpenAI, sims: Sims,
                                                                       case: str) -> None:
    envelope, _, code = case.partition("-")
    sims.fengyuan.envelope = envelope  # type: ignore[assignment]
    credits_read(sims, FENGYUAN_KEYS)
    for key in FENGYUAN_KEYS:
        sims.fengyuan.keys[key].credits = 0.0
    if code == "300202":  # the sim alternates 40001 / 300202: take the first one out of the way
        reply = httpx.post(f"{sims.fengyuan_url}/api/service/invoke", headers={"x-api-key": FENGYUAN_KEYS[0]},
                           json={"service_code": "image_generation", "params": {"prompt": "x"}})
        assert reply.json()["code"] == 40001
    exc = sdk_error(openai.RateLimitError, lambda: client.images.generate(model=FY_IMAGE, prompt="一只橘猫"))
    assert_insufficient_quota(exc)
    refused = [c for c in sims.fengyuan.calls if c.endpoint == "invoke"]
    assert refused and all(c.status == int(code) if envelope == "documented" else c.status == 200
                           for c in refused), refused
    assert sims.fengyuan.count("task") == 0


def test_fengyuan_observed_credit_errors_with_http_403_too(client: openai.OpenAI, sims: Sims) -> None:
    sims.fengyuan.envelope = "observed"
    sims.fengyuan.observed_error_http = 403
    credits_read(sims, FENGYUAN_KEYS)
    sims.fengyuan.keys[FENGYUAN_KEYS[0]].credits = 1.0
    exc = sdk_error(openai.RateLimitError, lambda: client.images.generate(model=FY_IMAGE, prompt="一只橘猫"))
    assert_insufficient_quota(exc)
    assert sims.fengyuan.count("invoke") == 1


def test_fengyuan_credits_known_short_is_429_without_an_invoke(start_proxy: Callable[..., RunningProxy],
                                                               proxy_config: dict[str, Any], sims: Sims) -> None:
    for key in FENGYUAN_KEYS:
        sims.fengyuan.keys[key].credits = 0.0
    client = start_proxy(proxy_config).client()
    credits_read(sims, FENGYUAN_KEYS)
    exc = sdk_error(openai.RateLimitError, lambda: client.images.generate(model=FY_IMAGE, prompt="一只橘猫"))
    assert_insufficient_quota(exc)
    assert sims.fengyuan.count("invoke") <= len(FENGYUAN_KEYS)


# ---- 429 rate_limit_exceeded: every key rate limited --------------------------------


def assert_rate_limited(exc: openai.APIStatusError) -> float:
    expect(exc, 429, "requests", "rate_limit_exceeded")
    retry_after = exc.response.headers.get("retry-after")
    assert retry_after is not None and float(retry_after) >= 1, exc.response.headers
    assert exc.response.headers.get("x-should-retry") != "false"
    return float(retry_after)


def test_every_xffuw_key_rate_limited_is_429_with_retry_after(client: openai.OpenAI, sims: Sims) -> None:
    chat(client)  # the catalogue is loaded before the limit bites
    sims.xffuw.rate_limit, sims.xffuw.rate_window = 0, 60.0
    exc = sdk_error(openai.RateLimitError, lambda: chat(client))
    wait = assert_rate_limited(exc)
    assert 30 <= wait <= 60
    assert sims.xffuw.count("chat") == 1 + len(XFFUW_KEYS)  # each key tried once, then the answer
    # The keys now rest: the next request is answered without asking the upstream again.
    exc = sdk_error(openai.RateLimitError, lambda: client.images.generate(model="gpt-image-2", prompt="猫"))
    assert_rate_limited(exc)
    assert sims.xffuw.count("image") == 0


def test_xffuw_rate_limit_by_window_is_429(client: openai.OpenAI, sims: Sims) -> None:
    chat(client)
    sims.xffuw.rate_limit, sims.xffuw.rate_window = 1, 20.0
    chat(client)
    chat(client)  # one call per key per window: both keys now used up
    exc = sdk_error(openai.RateLimitError, lambda: chat(client))
    assert 10 <= assert_rate_limited(exc) <= 20


@pytest.mark.parametrize("envelope", ["documented", "observed"])
def test_every_fengyuan_key_rate_limited_is_429_with_retry_after(client: openai.OpenAI, sims: Sims,
                                                                 envelope: str) -> None:
    sims.fengyuan.envelope = envelope  # type: ignore[assignment]
    sims.fengyuan.rate_limit_normal = 0
    exc = sdk_error(openai.RateLimitError, lambda: client.images.generate(model=FY_IMAGE, prompt="一只橘猫"))
    assert_rate_limited(exc)
    assert sims.fengyuan.count("invoke") == len(FENGYUAN_KEYS)


def test_fengyuan_retry_after_header_is_passed_on(client: openai.OpenAI, sims: Sims) -> None:
    sims.fengyuan.rate_limit_normal, sims.fengyuan.rate_window = 0, 7.0
    sims.fengyuan.retry_after_header = True
    exc = sdk_error(openai.RateLimitError, lambda: client.images.generate(model=FY_IMAGE, prompt="一只橘猫"))
    assert 6 <= assert_rate_limited(exc) <= 7


# ---- 400 content_policy_violation -------------------------------------------------


@pytest.mark.parametrize("envelope", ["documented", "observed"])
def test_prompt_blocked_by_fengyuan_is_400_content_policy_violation(client: openai.OpenAI, sims: Sims,
                                                                    envelope: str) -> None:
    sims.fengyuan.envelope = envelope  # type: ignore[assignment]
    exc = sdk_error(openai.BadRequestError,
                    lambda: client.images.generate(model=FY_IMAGE, prompt="[blocked] 违规内容"))
    expect(exc, 400, "invalid_request_error", "content_policy_violation")
    assert sims.fengyuan.count("invoke") == 1  # not retried on another key
    assert sims.fengyuan.count("task") == 0


def test_prompt_blocked_by_xffuw_is_400_content_policy_violation(client: openai.OpenAI, sims: Sims) -> None:
    exc = sdk_error(openai.BadRequestError, lambda: chat(client, content="[blocked] 违规"))
    expect(exc, 400, "invalid_request_error", "content_policy_violation")
    assert sims.xffuw.count("chat") == 1


# ---- 502/504: tasks ----------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-image-2", FY_IMAGE])
def test_upstream_task_failed_is_502_upstream_task_failed(client: openai.OpenAI, sims: Sims, model: str) -> None:
    exc = sdk_error(openai.InternalServerError,
                    lambda: client.images.generate(model=model, prompt="[fail] 一只橘猫"))
    expect(exc, 502, "server_error", "upstream_task_failed")
    assert exc.response.headers["x-should-retry"] == "false"
    task_id = exc.response.headers["x-proxy-task-ids"]
    assert task_id.startswith("task_") and task_id in exc.body["message"]
    assert "simulated" in exc.body["message"]  # the upstream's reason


def test_task_not_final_in_time_is_504_upstream_timeout(start_proxy: Callable[..., RunningProxy],
                                                        proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["tasks"] = {"poll_interval": 0.1, "first_poll": 0.05, "timeout": 0.6}
    client = start_proxy(proxy_config).client()
    started = time.monotonic()
    exc = sdk_error(openai.InternalServerError,
                    lambda: client.images.generate(model="gpt-image-2", prompt="[never] 一只橘猫"))
    elapsed = time.monotonic() - started
    expect(exc, 504, "server_error", "upstream_timeout")
    assert exc.status_code == 504 and isinstance(exc, openai.APIStatusError)
    task_id = exc.response.headers["x-proxy-task-ids"]
    assert task_id in exc.body["message"]
    assert 0.5 <= elapsed < 3
    assert sims.xffuw.count("task") >= 2


# ---- 502 upstream_error: unreachable or garbage ------------------------------------


def test_unreachable_upstream_is_502_upstream_error_quickly(start_proxy: Callable[..., RunningProxy],
                                                            proxy_config: dict[str, Any], sims: Sims) -> None:
    port = free_port()
    proxy_config["providers"]["xffuw"]["base_url"] = f"http://127.0.0.1:{port}/api/v1/"
    proxy_config["providers"]["fengyuan"]["base_url"] = f"http://127.0.0.1:{port}"
    client = start_proxy(proxy_config).client()
    for call in (lambda: chat(client, model="xffuw/gpt-4o-mini"),
                 lambda: client.images.generate(model="xffuw/gpt-image-2", prompt="猫"),
                 lambda: client.images.generate(model=FY_IMAGE, prompt="猫")):
        started = time.monotonic()
        exc = sdk_error(openai.InternalServerError, call)
        assert time.monotonic() - started < 5
        expect(exc, 502, "server_error", "upstream_error")
        assert str(port) not in exc.body["message"]  # upstream addresses stay private


@pytest.mark.parametrize("fault", ["garbage_rate", "error_rate"])
def test_garbage_answer_is_502_upstream_error(client: openai.OpenAI, sims: Sims, fault: str) -> None:
    chat(client)  # catalogue loaded
    setattr(sims.xffuw.faults, fault, 1.0)
    exc = sdk_error(openai.InternalServerError, lambda: chat(client))
    expect(exc, 502, "server_error", "upstream_error")
    exc = sdk_error(openai.InternalServerError, lambda: client.images.generate(model="gpt-image-2", prompt="猫"))
    expect(exc, 502, "server_error", "upstream_error")


def test_fengyuan_garbage_answer_is_502_upstream_error(client: openai.OpenAI, sims: Sims) -> None:
    client.models.list()
    sims.fengyuan.faults.garbage_rate = 1.0
    exc = sdk_error(openai.InternalServerError, lambda: client.images.generate(model=FY_IMAGE, prompt="猫"))
    expect(exc, 502, "server_error", "upstream_error")


def test_fengyuan_ai_service_error_is_502_upstream_error(client: openai.OpenAI, sims: Sims) -> None:
    sims.fengyuan.envelope = "observed"  # business code 40002 with HTTP 200
    exc = sdk_error(openai.InternalServerError,
                    lambda: client.images.generate(model=FY_IMAGE, prompt="[error] 一只橘猫"))
    expect(exc, 502, "server_error", "upstream_error")


# ---- 503 no_upstream_key -----------------------------------------------------------


def test_no_usable_key_is_503_no_upstream_key(start_proxy: Callable[..., RunningProxy],
                                              proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["providers"]["xffuw"]["keys"] = ["xf_unknown_to_sim_1", "xf_unknown_to_sim_2"]
    proxy_config["providers"]["fengyuan"]["keys"] = ["sk-fy-unknown-to-sim"]
    client = start_proxy(proxy_config).client()
    for call in (lambda: chat(client, model="xffuw/gpt-4o-mini"),
                 lambda: client.images.generate(model=FY_IMAGE, prompt="猫")):
        exc = sdk_error(openai.InternalServerError, call)
        expect(exc, 503, "server_error", "no_upstream_key")
        assert "unknown_to_sim" not in exc.body["message"]
    # The refused keys are disabled: the next request does not knock again.
    before = len(sims.xffuw.calls)
    exc = sdk_error(openai.InternalServerError, lambda: chat(client, model="xffuw/gpt-4o-mini"))
    expect(exc, 503, "server_error", "no_upstream_key")
    assert len(sims.xffuw.calls) == before


@pytest.mark.parametrize("case", ["unreachable", "keys_invalid", "rate_limited"])
def test_plain_model_id_while_its_upstream_cannot_list_answers_the_upstream_error(
        start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any], sims: Sims, case: str) -> None:
    """A user sends the model id /v1/models shows (no provider prefix). When the upstream
    cannot be asked for its list (down, every key refused, every key rate limited) the
    answer must be that upstream's error, not a 404 saying the model does not exist."""
    expected = {"unreachable": (502, "upstream_error"), "keys_invalid": (503, "no_upstream_key"),
                "rate_limited": (429, "rate_limit_exceeded")}[case]
    if case == "unreachable":
        proxy_config["providers"]["xffuw"]["base_url"] = f"http://127.0.0.1:{free_port()}/api/v1/"
    elif case == "keys_invalid":
        proxy_config["providers"]["xffuw"]["keys"] = ["xf_unknown_to_sim_1"]
    else:
        sims.xffuw.rate_limit = 0
    client = start_proxy(proxy_config).client()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, model="gpt-4o-mini")
    exc = caught.value
    validate_error({"error": exc.body})
    assert (exc.status_code, exc.body["code"]) == expected, (exc.status_code, exc.body)


# ---- xffuw: the body decides, whatever the status ----------------------------------


@pytest.mark.parametrize("status", [200, 400, 401, 402, 500])
def test_xffuw_error_status_does_not_change_the_mapping(start_proxy: Callable[..., RunningProxy],
                                                        proxy_config: dict[str, Any], sims: Sims, status: int) -> None:
    proxy_config["providers"]["xffuw"]["recheck_after"] = 0.0  # a topped-up key is usable at once
    client = start_proxy(proxy_config).client()
    chat(client)  # catalogue loaded with the status at 200
    sims.xffuw.error_status = status
    # balance short on both keys
    for key in XFFUW_KEYS:
        sims.xffuw.keys[key] = 0.1
    assert_insufficient_quota(sdk_error(openai.RateLimitError, lambda: chat(client)))
    for key in XFFUW_KEYS:
        sims.xffuw.keys[key] = 100.0
    # a model the upstream says it does not have
    sims.xffuw.models = [m for m in sims.xffuw.models if m.slug != "deepseek-chat"]
    exc = sdk_error(openai.NotFoundError, lambda: chat(client, model="deepseek-chat"))
    expect(exc, 404, "invalid_request_error", "model_not_found")
    # a blocked prompt
    exc = sdk_error(openai.BadRequestError, lambda: chat(client, content="[blocked]"))
    expect(exc, 400, "invalid_request_error", "content_policy_violation")
    chat(client)  # none of the above set a key aside
    # every key refused
    sims.xffuw.keys = {}
    exc = sdk_error(openai.InternalServerError, lambda: chat(client))
    expect(exc, 503, "server_error", "no_upstream_key")


@pytest.mark.parametrize("status", [200, 400, 401, 402, 500])
def test_xffuw_unknown_error_text_is_an_upstream_error_whatever_the_status(client: openai.OpenAI, sims: Sims,
                                                                          status: int) -> None:
    """The design: an unknown `error` text is an upstream error that keeps its message; the
    status xffuw sends with it is undocumented and says nothing."""
    chat(client)
    sims.xffuw.error_status = status
    exc = sdk_error(openai.InternalServerError, lambda: chat(client, content="[error]"))
    expect(exc, 502, "server_error", "upstream_error")
    assert "retry later" in exc.body["message"]  # the upstream's own words
    assert sims.xffuw.count("chat") == 2  # a POST the upstream may have taken is not retried
    chat(client)  # and no key was set aside for it


# ---- the edge: unknown routes and methods ------------------------------------------


@pytest.mark.parametrize("path", ["/v1/nope", "/nope", "/v1/chat/completion", "/v1/images/generate"])
@pytest.mark.parametrize("authorized", [True, False])
def test_unknown_route_is_404_in_openai_shape(edge: RunningProxy, path: str, authorized: bool) -> None:
    for method in ("GET", "POST"):
        reply = httpx.request(method, edge.url + path, headers=AUTH if authorized else {}, json={})
        error = raw_error(reply, 404)
        assert error["type"] == "invalid_request_error"
        assert path in error["message"]


def test_unknown_route_via_sdk_is_not_found(client: openai.OpenAI) -> None:
    exc = sdk_error(openai.NotFoundError, lambda: client.get("/nope", cast_to=object))
    assert exc.status_code == 404


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/chat/completions"), ("DELETE", "/v1/chat/completions"),
                                              ("GET", "/v1/images/generations"), ("POST", "/v1/models"),
                                              ("POST", "/healthz")])
def test_wrong_method_is_405_in_openai_shape(edge: RunningProxy, method: str, path: str) -> None:
    reply = httpx.request(method, edge.url + path, headers=AUTH)
    error = raw_error(reply, 405)
    assert error["type"] == "invalid_request_error"
    assert method in error["message"]
    allowed = {m.strip() for m in reply.headers.get("allow", "").split(",")}
    assert allowed and method not in allowed, reply.headers  # the methods the route does take


def test_cors_preflight_from_another_origin_is_refused_in_openai_shape(
        start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any]) -> None:
    proxy_config["server"] = {"cors_origins": ["https://app.example"]}
    proxy = start_proxy(proxy_config)
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
    refused = httpx.options(proxy.base_url + "/chat/completions", headers={**preflight, "origin": "https://evil.example"})
    error = raw_error(refused, 400)
    assert (error["type"], error["code"]) == ("invalid_request_error", "cors_origin_not_allowed")
    assert "access-control-allow-origin" not in refused.headers
    allowed = httpx.options(proxy.base_url + "/chat/completions", headers={**preflight, "origin": "https://app.example"})
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == "https://app.example"


# ---- x-request-id on every answer --------------------------------------------------


def test_every_answer_carries_a_distinct_x_request_id(proxy: RunningProxy, sims: Sims) -> None:
    chat_body = {"model": "gpt-4o-mini", "messages": USER}
    image_body = {"model": "flux-schnell", "prompt": "猫"}
    replies = [
        httpx.post(proxy.base_url + "/chat/completions", headers=AUTH, json=chat_body),
        httpx.post(proxy.base_url + "/images/generations", headers=AUTH, json=image_body),
        httpx.get(proxy.base_url + "/models", headers=AUTH),
        httpx.get(proxy.base_url + "/models/gpt-4o-mini", headers=AUTH),
        httpx.get(proxy.url + "/healthz"),
        httpx.post(proxy.base_url + "/chat/completions", json={"model": "gpt-4o-mini", "messages": USER}),
        httpx.post(proxy.base_url + "/chat/completions", headers=AUTH, content=b"{"),
        httpx.get(proxy.url + "/nope"),
        httpx.get(proxy.base_url + "/chat/completions"),
        httpx.post(proxy.base_url + "/chat/completions", headers=AUTH, json={"model": "nope", "messages": USER}),
    ]
    with httpx.stream("POST", proxy.base_url + "/chat/completions", headers=AUTH,
                      json={"model": "gpt-4o-mini", "messages": USER, "stream": True}) as streamed:
        streamed.read()
        replies.append(streamed)
    assert [r.status_code for r in replies] == [200, 200, 200, 200, 200, 401, 400, 404, 405, 404, 200]
    ids = [r.headers.get("x-request-id") for r in replies]
    assert all(i and i.startswith("req_") and len(i) > 10 for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert all(len(r.headers.get_list("x-request-id")) == 1 for r in replies)
