"""No client key and no upstream key in any response body, response header or log line,
through a whole session of successes and every kind of error; and the access log: one JSON
line per request that says who, what, where and how it went, with a key fingerprint only."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from conftest import (
    CLIENT_KEY,
    FENGYUAN_KEYS,
    OPENAI_COMPAT_KEYS,
    OTHER_CLIENT_KEY,
    XFFUW_KEYS,
    CompatSim,
    RunningProxy,
    Sims,
)
from helpers import ADMIN_KEY, asgi_request, key_fingerprint, logged_requests, send_json

from proxy.server import BackgroundServer

XF_REJECTED = "xf_nope_by_sim_7777"  # no English word of 8: the redactor is one per process
FY_REJECTED = "sk-fy-nope-by-sim-8888"
# Shaped like no known key (no xf_ / sk- prefix): only the configured-secret scrubbing can catch
# them. The echo upstream answers by key: a failure, no balance, rate limited, revoked.
ECHO_KEY = "echo-fails-Q7w8e9r0t1y2"
ECHO_BROKE = "echo-broke-A1s2d3f4g5h6"
ECHO_LIMITED = "echo-limited-Z1x2c3v4b5"
ECHO_REVOKED = "echo-revoked-P0o9i8u7y6"
ECHOES = {"echo": ECHO_KEY, "echo_broke": ECHO_BROKE, "echo_limited": ECHO_LIMITED, "echo_revoked": ECHO_REVOKED}
USER = [{"role": "user", "content": "你好"}]


# ---- an upstream that puts the key it was sent into every error text ------------------


async def key_naming_upstream(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """xffuw's dialect; lists a chat and an image model for any key, then answers chat and
    image calls with errors that name the caller's key."""
    if (request := await asgi_request(scope, receive, send)) is None:
        return
    key, _ = request
    path = scope["path"]
    if path.endswith("models.php"):
        await send_json(send, {"data": [{"slug": "echo-chat", "name": "Echo", "type": "chat", "price": "0.1"},
                                         {"slug": "echo-image", "name": "Echo", "type": "image", "price": "1"}]})
    elif key == ECHO_BROKE:
        await send_json(send, {"error": f"insufficient balance on {key}"})
    elif key == ECHO_LIMITED:
        await send_json(send, {"error": f"rate limit exceeded for {key}"}, 429, [(b"retry-after", b"30")])
    elif key == ECHO_REVOKED:
        await send_json(send, {"error": f"invalid api key: {key}"}, 401)
    elif path.endswith("chat.php"):
        await send_json(send, {"error": f"backend failure while serving token {key} (Bearer {key})"}, 500)
    elif path.endswith("image.php"):
        await send_json(send, {"ok": True, "task_id": "777", "type": "image"})
    else:  # task.php: every poll fails, naming the key
        await send_json(send, {"error": f"lookup failed for caller {key}"})


@pytest.fixture
def echo_url() -> Iterator[str]:
    server = BackgroundServer(key_naming_upstream).start()
    yield server.url
    server.stop()


# ---- recording every answer --------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    status: int
    headers: list[tuple[str, str]]
    body: str


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def hook(self, response: httpx.Response) -> None:
        response.read()
        self.seen.append(Seen(response.request.method, response.request.url.path, response.status_code,
                              list(response.headers.multi_items()), response.text))

    def http(self) -> httpx.Client:
        return httpx.Client(event_hooks={"response": [self.hook]}, timeout=30)

    def sdk(self, proxy: RunningProxy, api_key: str = CLIENT_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=proxy.base_url, api_key=api_key, max_retries=0, http_client=self.http())


def session_config(proxy_config: dict[str, Any], sims: Sims, echo_url: str) -> dict[str, Any]:
    providers = proxy_config["providers"]
    providers["xffuw"]["keys"] = [XFFUW_KEYS[0], XF_REJECTED, XFFUW_KEYS[1]]
    providers["fengyuan"]["keys"] = [FENGYUAN_KEYS[0], FY_REJECTED]
    for name, key in ECHOES.items():
        providers[name] = {"type": "xffuw", "base_url": f"{echo_url}/api/v1/", "keys": [key]}
    proxy_config["tasks"] = {"poll_interval": 0.1, "first_poll": 0.05, "timeout": 1.5}
    return proxy_config


SECRETS = [CLIENT_KEY, OTHER_CLIENT_KEY, *XFFUW_KEYS, *FENGYUAN_KEYS, XF_REJECTED, FY_REJECTED, *ECHOES.values()]


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def run_session(proxy: RunningProxy, sims: Sims, recorder: Recorder) -> None:
    alice = recorder.sdk(proxy)
    bob = recorder.sdk(proxy, OTHER_CLIENT_KEY)
    raw = recorder.http()
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}

    def fails(call: Callable[[], Any], status: int) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert caught.value.status_code == status, (caught.value.status_code, caught.value.body)
        return caught.value

    # successes
    alice.models.list()
    alice.models.retrieve("gpt-4o-mini")
    for i in range(3):
        alice.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {i}"}])
    bob.chat.completions.create(model="deepseek-chat", messages=USER)
    chunks = list(alice.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True,
                                                stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None
    assert alice.images.generate(model="gpt-image-2", prompt="一只橘猫").data[0].url
    assert alice.images.generate(model="flux-schnell", prompt="一只橘猫", response_format="b64_json").data[0].b64_json
    assert bob.images.generate(model="fengyuan/image_generation", prompt="一只橘猫", n=2).data[1].url
    sims.fengyuan.envelope = "observed"
    assert alice.images.generate(model="fengyuan/image_generation", prompt="一只橘猫").data[0].url
    # the edge's errors
    fails(lambda: recorder.sdk(proxy, api_key=XFFUW_KEYS[1]).models.list(), 401)  # an upstream key as client key
    fails(lambda: recorder.sdk(proxy, api_key=FENGYUAN_KEYS[0]).chat.completions.create(
        model="gpt-4o-mini", messages=USER), 401)
    assert raw.post(proxy.base_url + "/chat/completions", json={"model": "gpt-4o-mini"}).status_code == 401
    fails(lambda: alice.chat.completions.create(model="no-such-model", messages=USER), 404)
    assert raw.post(proxy.base_url + "/chat/completions", headers=auth, content=b"{oops").status_code == 400
    fails(lambda: alice.chat.completions.create(model="gpt-4o-mini", messages=USER, temperature="hot"), 400)
    assert raw.get(proxy.url + "/v1/nope", headers=auth).status_code == 404
    assert raw.get(proxy.base_url + "/chat/completions", headers=auth).status_code == 405
    # the upstreams' errors
    fails(lambda: alice.images.generate(model="fengyuan/image_generation", prompt="[blocked] 违规"), 400)
    fails(lambda: alice.images.generate(model="gpt-image-2", prompt="[fail] 一只橘猫"), 502)
    echoed = fails(lambda: alice.chat.completions.create(model="echo/echo-chat", messages=USER), 502)
    assert "[redacted]" in echoed.body["message"]  # the upstream's text was kept, its key scrubbed
    timed_out = fails(lambda: alice.images.generate(model="echo/echo-image", prompt="一只橘猫"), 504)
    assert "lookup failed" in timed_out.body["message"] and "[redacted]" in timed_out.body["message"]
    for model, status in (("echo_broke/echo-chat", 429), ("echo_limited/echo-chat", 429),
                          ("echo_revoked/echo-chat", 503)):
        fails(lambda: alice.chat.completions.create(model=model, messages=USER), status)  # noqa: B023
    fails(lambda: alice.images.generate(model="echo_broke/echo-image", prompt="一只橘猫"), 429)
    sims.xffuw.faults.error_rate = 1.0
    fails(lambda: alice.images.generate(model="gpt-image-2", prompt="一只橘猫"), 502)
    sims.xffuw.faults.error_rate = 0.0
    for key in FENGYUAN_KEYS:
        sims.fengyuan.keys[key].credits = 0.0
    fails(lambda: alice.images.generate(model="fengyuan/image_generation", prompt="一只橘猫"), 429)
    sims.xffuw.rate_limit = 0
    fails(lambda: alice.chat.completions.create(model="gpt-4o-mini", messages=USER), 429)


def test_no_secret_in_any_response_or_log_line(start_proxy: Callable[..., RunningProxy],
                                               proxy_config: dict[str, Any], sims: Sims, echo_url: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    proxy = start_proxy(session_config(proxy_config, sims, echo_url))
    capsys.readouterr()
    recorder = Recorder()
    run_session(proxy, sims, recorder)
    captured = capsys.readouterr()
    logged = (captured.err + captured.out).splitlines()

    # The session did use every key it had to (else the test proves nothing).
    for key in [*XFFUW_KEYS, XF_REJECTED]:
        assert sims.xffuw.count(key=key) > 0, key
    for key in [*FENGYUAN_KEYS, FY_REJECTED]:
        assert sims.fengyuan.count(key=key) > 0, key
    statuses = {seen.status for seen in recorder.seen}
    assert {200, 400, 401, 404, 405, 429, 502, 503, 504} <= statuses, statuses
    assert len(recorder.seen) >= 25

    # Nothing leaks in answers...
    for seen in recorder.seen:
        assert not leaks(seen.body), (seen.method, seen.path, seen.status, leaks(seen.body))
        for name, value in seen.headers:
            assert not leaks(f"{name}: {value}"), (seen.path, name, value)
    # ...nor in the log, where upstream errors naming the key were written (scrubbed).
    assert len(logged) >= len(recorder.seen)
    for line in logged:
        assert not leaks(line), line
    assert any("[redacted]" in line for line in logged), "no log line carried a scrubbed upstream error"


# ---- the access log ----------------------------------------------------------------


def test_access_log_has_one_json_line_per_request(proxy: RunningProxy, sims: Sims,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    recorder = Recorder()
    alice = recorder.sdk(proxy)
    bob = recorder.sdk(proxy, OTHER_CLIENT_KEY)
    raw = recorder.http()
    alice.chat.completions.create(model="gpt-4o-mini", messages=USER)
    bob.chat.completions.create(model="my-chat", messages=USER)
    list(alice.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True))
    alice.images.generate(model="gpt-image-2", prompt="一只橘猫", n=2)
    bob.images.generate(model="fengyuan/image_generation", prompt="一只橘猫")
    with pytest.raises(openai.InternalServerError):
        alice.images.generate(model="gpt-image-2", prompt="[fail] 一只橘猫")
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model="no-such-model", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        recorder.sdk(proxy, api_key="sk-wrong").models.list()
    alice.models.list()
    raw.get(proxy.url + "/healthz")
    raw.get(proxy.url + "/nope")
    entries = logged_requests(capsys, 11)

    assert len(entries) == len(recorder.seen) == 11
    by_id = {entry["request_id"]: entry for entry in entries}
    assert len(by_id) == len(entries)  # one line per request
    fingerprints = {key_fingerprint(k): k for k in [*XFFUW_KEYS, *FENGYUAN_KEYS]}
    for seen in recorder.seen:
        request_id = dict(seen.headers)["x-request-id"]
        entry = by_id[request_id]
        assert entry["status"] == seen.status
        assert entry["path"] == seen.path and entry["method"] == seen.method
        assert isinstance(entry["latency_ms"], int | float) and entry["latency_ms"] >= 0
        assert entry.get("level") == "info" and entry.get("timestamp")
        assert not leaks(json.dumps(entry))

    def entry_for(index: int) -> dict[str, Any]:
        return by_id[dict(recorder.seen[index].headers)["x-request-id"]]

    chat, aliased, streamed, images, fy_image, failed, unknown, unauth, models, health, nope = (
        entry_for(i) for i in range(11))
    for entry, client, model, upstream in ((chat, "alice", "gpt-4o-mini", "xffuw"),
                                           (aliased, "bob", "my-chat", "xffuw"),
                                           (streamed, "alice", "gpt-4o-mini", "xffuw"),
                                           (images, "alice", "gpt-image-2", "xffuw"),
                                           (fy_image, "bob", "fengyuan/image_generation", "fengyuan"),
                                           (failed, "alice", "gpt-image-2", "xffuw")):
        assert (entry["client"], entry["model"], entry["upstream"]) == (client, model, upstream), entry
        assert re.fullmatch(r"[0-9a-f]{12}", entry["key"]), entry
        assert entry["key"] in fingerprints  # names a configured key without showing it
        assert fingerprints[entry["key"]].startswith("xf_" if upstream == "xffuw" else "sk-")
    # image requests name their tasks, as the x-proxy-task-ids header does
    for entry, index in ((images, 3), (fy_image, 4), (failed, 5)):
        header = dict(recorder.seen[index].headers)["x-proxy-task-ids"]
        assert entry["task_ids"] == header.split(","), (entry, header)
    assert len(images["task_ids"]) == 2
    assert (unknown["client"], unknown["model"], unknown["status"]) == ("alice", "no-such-model", 404)
    assert unauth["status"] == 401 and "client" not in unauth and "key" not in unauth
    assert models["client"] == "alice" and models["status"] == 200
    assert health["status"] == 200 and nope["status"] == 404 and "client" not in nope


# ---- passthrough must not forward the proxy's own (mistyped) client keys ---------------


def test_passthrough_never_forwards_a_mistyped_client_key_upstream(start_proxy: Callable[..., RunningProxy],
                                                                   proxy_config: dict[str, Any],
                                                                   sims: Sims) -> None:
    """With [auth] passthrough, a bearer token with an upstream's key prefix is used as that
    upstream's key. Client keys look like OpenAI keys ("sk-…", as in the example config) and so
    do Fengyuan keys: a client who mistypes their proxy key must get a 401, not have the
    mistyped secret sent to Fengyuan. A config where the two can collide may be refused."""
    from proxy.config import ConfigError

    proxy_config["auth"] = {"passthrough": True}
    try:
        proxy = start_proxy(proxy_config)
    except ConfigError as error:  # refusing the ambiguity at start is a fix too
        assert "passthrough" in str(error) or "prefix" in str(error), error
        return
    typo = CLIENT_KEY[:-1] + "X"
    client = proxy.client(api_key=typo)
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(model="fengyuan/image_generation", prompt="一只橘猫")
    assert caught.value.status_code == 401, caught.value.body
    seen = {call.key for call in sims.fengyuan.calls} | {call.key for call in sims.xffuw.calls}
    assert typo not in seen, "the mistyped client key was sent to an upstream"


# ---- a client's own text is echoed as sent: no oracle for guessing a secret -----------


@pytest.mark.parametrize("secret", [ADMIN_KEY, XFFUW_KEYS[0], OTHER_CLIENT_KEY])
def test_an_echoed_guess_answers_alike_whether_or_not_it_holds_a_piece_of_a_secret(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], secret: str) -> None:
    """Scrubbing 8-character pieces out of what a client sent would answer "[redacted]" exactly
    when a guess matches: a key read back one character at a time, with no key at all."""
    proxy_config["admin"] = {"keys": [ADMIN_KEY]}
    proxy = start_proxy(proxy_config)
    piece, wrong = secret[3:11], secret[3:10] + ("Z" if secret[10] != "Z" else "Y")
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        for guess in (piece, wrong):
            unknown_route = http.get(f"/v1/{guess}")  # no key: the 404 quotes the path
            assert unknown_route.status_code == 404, unknown_route.text
            assert f"/v1/{guess}" in unknown_route.json()["error"]["message"], unknown_route.text
            unknown_model = http.post("/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                                      json={"model": f"m-{guess}", "messages": USER})
            assert unknown_model.status_code in (400, 404), unknown_model.text
            assert f"m-{guess}" in unknown_model.json()["error"]["message"], unknown_model.text
        whole = http.get(f"/v1/{secret}")  # the whole secret, which only its holder can send, stays scrubbed
        assert secret not in whole.text and "[redacted]" in whole.json()["error"]["message"], whole.text



def test_an_upstream_quoting_a_guess_answers_alike_whether_or_not_it_holds_a_piece_of_a_secret(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any],
        openai_sim: CompatSim) -> None:
    """The OpenAI-compatible upstream quotes an invalid `size` back: its text is scrubbed of
    pieces of secrets, but not of what the request to it held, or the same oracle opens there."""
    proxy_config["admin"] = {"keys": [ADMIN_KEY]}
    proxy_config["providers"]["compat"] = {"type": "openai", "base_url": openai_sim.base_url,
                                           "keys": list(OPENAI_COMPAT_KEYS)}
    proxy = start_proxy(proxy_config)
    piece = ADMIN_KEY[3:11]
    wrong = piece[:-1] + ("Z" if piece[-1] != "Z" else "Y")
    with httpx.Client(base_url=proxy.base_url, headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=10) as http:
        for guess in (piece, wrong):
            reply = http.post("/images/generations", json={"model": "compat/gpt-image-1", "prompt": "cat",
                                                           "size": guess})
            assert reply.status_code == 400, reply.text
            assert f"'{guess}'" in reply.json()["error"]["message"], reply.text


def prompt_quoting_upstream() -> Callable[..., Any]:
    """xffuw's dialect; every image task fails, its reason quoting the task's prompt."""
    prompts: dict[str, str] = {}

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if (request := await asgi_request(scope, receive, send)) is None:
            return
        path, body = scope["path"], request[1]
        if path.endswith("models.php"):
            await send_json(send, {"data": [{"slug": "quote-image", "name": "Q", "type": "image", "price": "1"}]})
        elif path.endswith("image.php"):
            prompts[task := str(len(prompts) + 1)] = json.loads(body)["prompt"]
            await send_json(send, {"ok": True, "task_id": task, "type": "image"})
        else:  # task.php
            task = scope["query_string"].decode().rsplit("=", 1)[-1]
            await send_json(send, {"state": "failed", "is_final": True,
                                   "fail_reason": f"prompt refused: {prompts.get(task, '?')}"})
    return app


def test_a_task_reason_quoting_a_guess_answers_alike_whether_or_not_it_holds_a_piece_of_a_secret(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any]) -> None:
    """The same oracle through a reason polled later: the prompt is no longer in the request."""
    server = BackgroundServer(prompt_quoting_upstream()).start()
    try:
        proxy_config["admin"] = {"keys": [ADMIN_KEY]}
        proxy_config["providers"]["quote"] = {"type": "xffuw", "base_url": f"{server.url}/api/v1/",
                                              "keys": ["qk-Zq9Xw7Vb3Lm2"]}
        proxy = start_proxy(proxy_config)
        piece = ADMIN_KEY[3:11]
        wrong = piece[:-1] + ("Z" if piece[-1] != "Z" else "Y")
        with httpx.Client(base_url=proxy.base_url, headers={"authorization": f"Bearer {CLIENT_KEY}"},
                          timeout=30) as http:
            for guess in (piece, wrong):
                reply = http.post("/images/generations", json={"model": "quote/quote-image", "prompt": guess,
                                                               "response_format": "url"})
                assert reply.status_code == 502, reply.text
                assert f"prompt refused: {guess}" in reply.json()["error"]["message"], reply.text
    finally:
        server.stop()
