"""`type = "openai"`: a team pools the keys of an OpenAI-compatible upstream (the simulator in
proxy/sim/openai_compat.py) behind a `[providers.compat]` table, through a real proxy and the
official SDK. The dialect's every mapping is specified in test_dialect_openai.py; here: that
the pieces fit (catalogue, chat plain and streamed, tools, images, failover, key states, errors)."""

from __future__ import annotations

import base64
import json
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, OPENAI_COMPAT_KEYS, CompatSim, RunningProxy, serving
from helpers import ADMIN_KEY, admin_keys, calls_by_key, error_of
from openai_spec import validate_chat_completion, validate_images_response, validate_model_list

from proxy.config import parse_config
from proxy.pool import fingerprint
from proxy.sim.assets import PNG_BYTES
from proxy.sim.chat_model import TOOL_RESULTS
from proxy.sim.openai_compat import CHAT_PREFIX

ROOT = Path(__file__).resolve().parent.parent
ALPHA, BETA = OPENAI_COMPAT_KEYS
LISTED = {"gpt-4o-mini", "qwen2.5-7b-instruct", "dall-e-3", "gpt-image-1", "text-embedding-3-small"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def compat_config(sim: CompatSim, storage: str) -> dict[str, Any]:
    return {
        "clients": [{"name": "alice", "key": CLIENT_KEY}],
        "providers": {"compat": {"type": "openai", "base_url": sim.base_url, "keys": list(OPENAI_COMPAT_KEYS)}},
        "admin": {"keys": [ADMIN_KEY]},
        "log": {"format": "json"},
        "storage": {"path": storage},
    }


@pytest.fixture(scope="module")
def reader(_openai_sim_server: CompatSim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """One proxy for the tests that leave every key as it was (starting one per test would
    dominate the runtime); tests that change key states start their own."""
    storage = str(tmp_path_factory.mktemp("compat") / "proxy.sqlite3")
    with serving(compat_config(_openai_sim_server, storage)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def sdk(reader: RunningProxy) -> openai.OpenAI:
    return reader.client()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for the module: making one costs a TLS context, a tenth of a second or more."""
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture
def own_proxy(start_proxy: Callable[[dict[str, Any]], RunningProxy], openai_sim: CompatSim,
              tmp_path: Any) -> RunningProxy:
    return start_proxy(compat_config(openai_sim, str(tmp_path / "proxy.sqlite3")))


def say(client: openai.OpenAI, text: str, model: str = "gpt-4o-mini", **extra: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **extra)


def statuses(sim: CompatSim, key: str, since: int = 0) -> list[int]:
    """What the upstream answered each call made with `key` (the model list read included)."""
    return [c.status for c in sim.sim.calls[since:] if c.key == key]


# ---- reading: one proxy for these -----------------------------------------------------------


def test_models_are_listed_with_the_tables_name_as_owner(sdk: openai.OpenAI, openai_sim: CompatSim) -> None:
    raw = sdk.models.with_raw_response.list()
    body = raw.http_response.json()
    validate_model_list(body)
    assert {e["id"]: e["owned_by"] for e in body["data"]} == dict.fromkeys(LISTED, "compat")
    assert sdk.models.retrieve("compat/dall-e-3").owned_by == "compat"


def test_chat_answers_as_the_upstream_did(sdk: openai.OpenAI, openai_sim: CompatSim) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there"}], temperature=0.3, max_tokens=50)
    body = raw.http_response.json()
    validate_chat_completion(body)
    reply = raw.parse()
    assert reply.choices[0].message.content == CHAT_PREFIX + "hi there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "gpt-4o-mini"
    # the upstream's own token counts, not the proxy's estimate
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, len(CHAT_PREFIX + "hi there") // 4)
    # OpenAI's fields reached the upstream as they were sent
    sent = openai_sim.sim.last_chat_body
    assert sent == {"temperature": 0.3, "max_tokens": 50, "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi there"}]}


def test_chat_streams_from_one_upstream_answer(sdk: openai.OpenAI, openai_sim: CompatSim) -> None:
    stream = sdk.chat.completions.create(
        model="qwen2.5-7b-instruct", messages=[{"role": "user", "content": "a longer question to stream back"}],
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)  # the SDK's own parsing of the stream (its shape: test_chat.py)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == CHAT_PREFIX + "a longer question to stream back" and len(pieces) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    sent = openai_sim.sim.last_chat_body
    assert sent is not None and "stream" not in sent and "stream_options" not in sent
    assert openai_sim.sim.count("chat") == 1


def test_tool_calls_come_back(sdk: openai.OpenAI, openai_sim: CompatSim) -> None:
    client = sdk
    reply = say(client, "Paris", tools=TOOLS)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)  # valid for the tool's schema
    assert call.id.startswith("call_sim")  # the upstream's own id
    assert openai_sim.sim.last_chat_body["tools"] == TOOLS
    # the tool's answer goes back and the model answers in text
    follow = client.chat.completions.create(model="gpt-4o-mini", tools=TOOLS, messages=[
        {"role": "user", "content": "Paris"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content == TOOL_RESULTS + "get_weather: sunny"
    assert follow.choices[0].finish_reason == "stop"


def test_image_url_and_b64_json(sdk: openai.OpenAI, http: httpx.Client, openai_sim: CompatSim) -> None:
    client = sdk
    raw = client.images.with_raw_response.generate(model="dall-e-3", prompt="a cat", size="1792x1024", n=2)
    validate_images_response(raw.http_response.json())
    urls = [d.url for d in raw.parse().data]
    assert len(urls) == 2 and all(u.startswith(openai_sim.url + "/files/") for u in urls)
    assert http.get(urls[0]).content == PNG_BYTES
    # n images are n upstream calls of one image each, sized as asked, with no response_format
    assert openai_sim.sim.count("images") == 2
    assert openai_sim.sim.last_image_body == {"model": "dall-e-3", "prompt": "a cat", "n": 1, "size": "1792x1024"}
    b64 = client.images.generate(model="dall-e-3", prompt="a cat", response_format="b64_json").data[0].b64_json
    assert base64.b64decode(b64) == PNG_BYTES


def test_a_base64_only_model(sdk: openai.OpenAI, openai_sim: CompatSim) -> None:
    # b64_json, the default for gpt-image-* as OpenAI's own: the upstream's base64 as it came
    b64 = sdk.images.generate(model="gpt-image-1", prompt="a cat").data[0].b64_json
    assert base64.b64decode(b64) == PNG_BYTES
    assert "response_format" not in openai_sim.sim.last_image_body  # it would have been refused
    # url: the same image as a data: URL
    url = sdk.images.generate(model="gpt-image-1", prompt="a cat", response_format="url").data[0].url
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix) and base64.b64decode(url[len(prefix):]) == PNG_BYTES
    assert openai_sim.sim.count("images") == 2


def test_reference_images_go_to_json_edits(reader: RunningProxy, http: httpx.Client, openai_sim: CompatSim) -> None:
    ref = openai_sim.url + "/files/ref.png"
    reply = http.post(reader.base_url + "/images/generations", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                       json={"model": "gpt-image-1", "prompt": "add a hat", "images": [ref]}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert openai_sim.sim.count("edits") == 1 and openai_sim.sim.count("images") == 0
    assert openai_sim.sim.last_image_body["images"] == [{"image_url": ref}]


ERRORS = [
    # (model, prompt, status, type, code)
    ("gpt-4o-mini", "[blocked] hi", 400, "invalid_request_error", "content_policy_violation"),
    ("gpt-4o-mini", "[error] hi", 502, "server_error", "upstream_error"),
    ("text-embedding-3-small", "hi", 404, "invalid_request_error", "model_not_found"),  # listed, refused upstream
    ("compat/no-such-model", "hi", 404, "invalid_request_error", "model_not_found"),
]


@pytest.mark.parametrize(("model", "prompt", "status", "type_", "code"), ERRORS, ids=[r[1] + r[0] for r in ERRORS])
def test_errors_arrive_in_openais_shape(reader: RunningProxy, http: httpx.Client, openai_sim: CompatSim,
                                        model: str, prompt: str, status: int, type_: str, code: str) -> None:
    reply = http.post(reader.base_url + "/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                       json={"model": model, "messages": [{"role": "user", "content": prompt}]}, timeout=30)
    error = error_of(reply, status)
    assert (error["type"], error["code"]) == (type_, code)
    if status == 502:  # it reached an upstream that may have charged: no automatic retry
        assert reply.headers["x-should-retry"] == "false"
    assert all(k["state"] == "active" for k in admin_keys(reader).values())  # nothing here is a key's fault


def test_image_errors_arrive_in_openais_shape(sdk: openai.OpenAI, openai_sim: CompatSim) -> None:
    client = sdk
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="dall-e-3", prompt="[blocked] a cat")
    assert caught.value.code == "content_policy_violation"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="dall-e-3", prompt="a cat", size="640x480")  # the upstream refuses the size
    assert "640x480" in caught.value.message and caught.value.param == "size"  # the field the upstream named


# ---- the pool: each test its own proxy --------------------------------------------------------


def test_failover_past_a_rate_limited_key(own_proxy: RunningProxy, http: httpx.Client, openai_sim: CompatSim) -> None:
    openai_sim.sim.rate_limits[ALPHA] = 1
    direct = http.get(openai_sim.base_url + "/models", headers={"authorization": f"Bearer {ALPHA}"})
    assert direct.status_code == 200  # ALPHA's one call of the minute is spent
    since = len(openai_sim.sim.calls)
    client = own_proxy.client()
    for text in ("one", "two", "three"):
        assert say(client, text).choices[0].message.content == CHAT_PREFIX + text
    assert statuses(openai_sim, ALPHA, since) == [429]  # tried once (for the list or a chat), then rested
    assert calls_by_key(openai_sim.sim, "chat") == {BETA: 3}
    alpha = admin_keys(own_proxy)[fingerprint(ALPHA)]
    assert alpha["state"] == "cooling" and alpha["until"] is not None
    assert "Rate limit reached" in alpha["reason"]


def test_a_refused_key_is_disabled(own_proxy: RunningProxy, openai_sim: CompatSim) -> None:
    del openai_sim.sim.keys[ALPHA]  # revoked at the upstream
    client = own_proxy.client()
    for text in ("one", "two", "three"):
        assert say(client, text).choices[0].message.content == CHAT_PREFIX + text
    keys = admin_keys(own_proxy)
    assert keys[fingerprint(ALPHA)]["state"] == "disabled"
    assert keys[fingerprint(BETA)]["state"] == "active"
    assert statuses(openai_sim, ALPHA) == [401]  # refused once (for the list or a chat), never tried again
    assert calls_by_key(openai_sim.sim, "chat") == {BETA: 3}
    assert ALPHA not in json.dumps(keys) and "alpha-5555" not in json.dumps(keys)


def test_insufficient_quota_sets_the_key_aside(own_proxy: RunningProxy, openai_sim: CompatSim) -> None:
    openai_sim.sim.keys[ALPHA] = 0.0
    client = own_proxy.client()
    for text in ("one", "two"):
        assert say(client, text).choices[0].message.content == CHAT_PREFIX + text
    assert admin_keys(own_proxy)[fingerprint(ALPHA)]["state"] == "exhausted"
    assert calls_by_key(openai_sim.sim, "chat") == {ALPHA: 1, BETA: 2}  # ALPHA refused once, then set aside
    # both short: the client is told in OpenAI's words, and not to retry
    openai_sim.sim.keys[BETA] = 0.0
    with pytest.raises(openai.RateLimitError) as caught:
        say(client, "three")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert admin_keys(own_proxy)[fingerprint(BETA)]["state"] == "exhausted"
    assert calls_by_key(openai_sim.sim, "chat") == {ALPHA: 1, BETA: 3}


# ---- the simulator's own wire shapes ----------------------------------------------------------


def test_sim_answers_errors_in_openais_shape_with_real_statuses(http: httpx.Client, openai_sim: CompatSim) -> None:
    url, sim = openai_sim.base_url, openai_sim.sim
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    def post(path: str, body: Any, key: str | None = ALPHA) -> httpx.Response:
        return http.post(url + path, json=body, headers={"authorization": f"Bearer {key}"} if key else {})

    def error(reply: httpx.Response, status: int) -> tuple[str, str | None, str | None]:
        assert reply.status_code == status, reply.text
        body = reply.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return body["type"], body["param"], body["code"]

    assert error(post("/chat/completions", chat, None), 401) == ("invalid_request_error", None, "invalid_api_key")
    refused = post("/chat/completions", chat, "sk-unknown-key-0000")
    assert error(refused, 401)[2] == "invalid_api_key" and "sk-unknown-key-0000" not in refused.text
    assert error(post("/chat/completions", {**chat, "model": "gpt-5"}), 404)[2] == "model_not_found"
    assert error(post("/chat/completions", {**chat, "messages": []}), 400) == ("invalid_request_error", "messages",
                                                                               None)
    assert error(post("/images/generations", {"model": "gpt-image-1", "prompt": "p", "response_format": "url"}),
                 400) == ("invalid_request_error", "response_format", "unknown_parameter")
    assert error(http.get(url + "/nothing-here"), 404)[0] == "invalid_request_error"
    sim.rate_limits[BETA] = 1
    assert post("/chat/completions", chat, BETA).status_code == 200
    limited = post("/chat/completions", chat, BETA)
    assert error(limited, 429) == ("requests", None, "rate_limit_exceeded")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    sim.keys[ALPHA] = 0.0
    assert error(post("/chat/completions", chat), 429) == ("insufficient_quota", None, "insufficient_quota")
    assert sim.keys[ALPHA] == 0.0  # a refused call costs nothing
    sim.faults.down = True  # the shared fault layer: an nginx page, logged like any answer
    down = post("/chat/completions", chat, BETA)
    assert (down.status_code, down.headers["content-type"]) == (503, "text/html")
    assert sim.calls[-1].endpoint == "chat" and sim.calls[-1].status == 503


def test_sim_charges_each_key_its_models_price(http: httpx.Client, openai_sim: CompatSim) -> None:
    headers = {"authorization": f"Bearer {BETA}"}
    reply = http.post(openai_sim.base_url + "/images/generations", headers=headers,
                       json={"model": "dall-e-3", "prompt": "p", "n": 3})
    assert reply.status_code == 200 and len(reply.json()["data"]) == 3
    assert openai_sim.sim.keys[BETA] == pytest.approx(100.0 - 3 * 0.04)
    assert openai_sim.sim.keys[ALPHA] == 100.0


# ---- the documented example ---------------------------------------------------------------------


def test_the_commented_example_table_is_a_valid_config() -> None:
    lines = (ROOT / "config.example.toml").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# [providers.compat]"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line.removeprefix("# "))
    raw = {"clients": [{"name": "alice", "key": CLIENT_KEY}], **tomllib.loads("\n".join(block))}
    config = parse_config(raw, env={"COMPAT_KEY_1": "sk-one-0000", "COMPAT_KEY_2": "sk-two-0000"})
    compat = config.providers["compat"]
    assert (compat.type, compat.base_url, len(compat.keys), compat.rpm) == ("openai", "https://llm.example.com/v1",
                                                                          2, 500)
