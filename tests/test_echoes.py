"""Echoes (issue 18): a client's 1 MB value comes back, and is logged, cut to a few hundred
characters; an upstream's failure is logged once with its reason; an upstream that echoes a
key partly or transformed (a prefix, a suffix, URL-encoded, base64) has it scrubbed."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from conftest import CLIENT_KEY, RunningProxy
from helpers import asgi_request, key_fingerprint, send_json

from proxy.redact import Redactor
from proxy.server import BackgroundServer

MB = 1 << 20
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
USER = [{"role": "user", "content": "hi"}]
SMALL = 4096  # bytes an answer or a log line about a 1 MB value may take

# The echo upstream's keys: one it refuses, one it serves. The second has characters that
# URL-encoding changes, so its URL-encoded echo differs from the key itself.
REFUSED = "xf_echo_refused_Kd82nd7Qp1"
SERVED = "Echo+Served/Key=Zq81mB5vW0xR"


def transforms(key: str) -> dict[str, str]:
    """How an upstream might echo a key: partly, or transformed."""
    return {
        "prefix": key[:12],
        "suffix": key[-10:],
        "middle": key[5:15],
        "url": quote(key, safe=""),
        "url_plus": quote_plus(key),
        "base64": base64.b64encode(key.encode()).decode(),
        "base64_url": base64.urlsafe_b64encode(key.encode()).decode(),
        "basic_auth": base64.b64encode(f"api:{key}".encode()).decode(),  # the key at another alignment
        "bearer_cut": f"Bearer {key[:9]}...",
    }


# ---- an upstream in xffuw's dialect that echoes what it was sent -----------------------


async def echo_upstream(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if (request := await asgi_request(scope, receive, send)) is None:
        return
    key, body = request
    if key == REFUSED:
        await send_json(send, {"error": f"invalid api key: {key}"}, 401)
        return
    if scope["path"].endswith("models.php"):
        await send_json(send, {"data": [{"slug": "echo-chat", "name": "Echo", "type": "chat", "price": "0.1"}]})
        return
    said = json.loads(body)["messages"][-1]["content"]
    if said.startswith("transform:"):
        form = transforms(key)[said.removeprefix("transform:")]
        await send_json(send, {"error": f"backend rejected credential {form} for this call"}, 500)
    elif said.startswith("repeat:"):
        await send_json(send, {"error": f"cannot process input {said}"}, 500)
    else:
        await send_json(send, {"choices": [{"message": {"role": "assistant", "content": "echo ok"}}]})


@pytest.fixture
def echo_proxy(start_proxy: Callable[[dict[str, Any]], RunningProxy],
               proxy_config: dict[str, Any]) -> Iterator[RunningProxy]:
    upstream = BackgroundServer(echo_upstream).start()
    proxy_config["providers"]["echo"] = {"type": "xffuw", "base_url": f"{upstream.url}/api/v1/",
                                         "keys": [REFUSED, SERVED]}
    yield start_proxy(proxy_config)
    upstream.stop()


def log_lines(capsys: pytest.CaptureFixture[str], until: str | None = None) -> list[str]:
    """What was logged since the last call; with `until`, waits (up to 5 s) for a line that
    contains it: the access line is written after the answer is sent."""
    lines: list[str] = []
    deadline = time.monotonic() + 5
    while True:
        captured = capsys.readouterr()
        lines += [line for line in (captured.err + captured.out).splitlines() if line.strip()]
        if until is None or any(until in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


# ---- a client's long values -------------------------------------------------------------


def huge(size: int = MB) -> str:
    return "m" * size


def raw_request(url: str, method: str, path: str) -> httpx.Response:
    """A request httpx will not send (its URLs stop at 64 KiB), over a socket."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return httpx.Response(int(head.split()[1]), content=body)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/chat/completions", {"model": huge(), "messages": USER}, 404),
    ("POST", "/v1/images/generations", {"model": "gpt-image-2", "prompt": "p", "response_format": huge()}, 400),
    ("POST", "/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "previous_response_id": huge()}, 404),
    ("GET", "/v1/models/" + huge(60_000), None, 404),  # a path as long as a request head may be
    ("GET", "/v1/" + huge(60_000), None, 404),
    ("GET", "/v1/" + huge(), None, 431),  # longer: the head is refused before any handler sees it
], ids=["chat-model", "enum-value", "previous-response-id", "model-path", "unknown-path", "1mb-path"])
def test_a_huge_client_value_comes_back_and_is_logged_cut(proxy: RunningProxy, capsys: pytest.CaptureFixture[str],
                                                          method: str, path: str, body: Any, status: int) -> None:
    log_lines(capsys)
    if len(path) > 65536:
        reply = raw_request(proxy.url, method, path)
    else:
        reply = httpx.request(method, proxy.url + path, json=body, headers=AUTH, timeout=30)
    assert reply.status_code == status, reply.text[:300]
    assert len(reply.content) < SMALL, len(reply.content)
    error = reply.json()["error"]
    if status != 431:
        assert "characters)" in error["message"], error["message"][:300]  # cut, and says how long it was
    lines = log_lines(capsys, until='"event":"request"' if status != 431 else None)
    if status != 431:  # a refused head never reaches the app, so nothing is logged
        assert any('"event":"request"' in line for line in lines)
    for line in lines:
        assert len(line) < SMALL, line[:300]


def test_an_upstream_echo_of_a_long_input_is_cut(echo_proxy: RunningProxy,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    log_lines(capsys)
    reply = httpx.post(echo_proxy.base_url + "/chat/completions", headers=AUTH, timeout=30, json={
        "model": "echo/echo-chat", "messages": [{"role": "user", "content": "repeat:" + huge()}]})
    assert reply.status_code == 502
    assert len(reply.content) < SMALL and "cannot process input repeat:mmm" in reply.json()["error"]["message"]
    for line in log_lines(capsys, until='"event":"request"'):
        assert len(line) < SMALL, line[:300]


# ---- upstream failures are logged, with their reason and without the key ---------------


def test_an_upstream_refusal_is_logged_with_its_reason_and_no_key(echo_proxy: RunningProxy,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    log_lines(capsys)
    reply = httpx.post(echo_proxy.base_url + "/chat/completions", headers=AUTH, timeout=30,
                       json={"model": "echo/echo-chat", "messages": USER})
    assert reply.status_code == 200  # the refused key was set aside, the other one served
    lines = log_lines(capsys, until='"event":"request"')
    failures = [json.loads(line) for line in lines if '"upstream_call_failed"' in line]
    assert len(failures) == 1, lines
    failure = failures[0]
    assert failure["level"] == "warning"
    # the first call, the model list, went to the first key
    assert (failure["upstream"], failure["key"], failure["operation"], failure["kind"]) == (
        "echo", key_fingerprint(REFUSED), "list_models", "auth")
    assert failure["error"] == "echo: invalid api key: [redacted]"
    for line in lines:
        assert REFUSED not in line and SERVED not in line


# ---- keys echoed partly or transformed ------------------------------------------------


@pytest.mark.parametrize("name", list(transforms(SERVED)))
def test_a_key_echoed_partly_or_transformed_is_scrubbed(echo_proxy: RunningProxy, capsys: pytest.CaptureFixture[str],
                                                        name: str) -> None:
    form = transforms(SERVED)[name]
    log_lines(capsys)
    reply = httpx.post(echo_proxy.base_url + "/chat/completions", headers=AUTH, timeout=30,
                       json={"model": "echo/echo-chat", "messages": [{"role": "user", "content": f"transform:{name}"}]})
    assert reply.status_code == 502
    message = reply.json()["error"]["message"]
    assert message.startswith("echo: backend rejected credential ") and "[redacted]" in message, message
    lines = log_lines(capsys, until='"event":"request"')
    failures = [json.loads(line) for line in lines if '"upstream_call_failed"' in line and '"chat"' in line]
    assert [(f["key"], f["kind"]) for f in failures] == [(key_fingerprint(SERVED), "upstream_unavailable")], lines
    assert "[redacted] for this call" in failures[0]["error"], failures
    for text in [reply.text, *lines]:
        assert form not in text, (name, text)
        for fragment in (form[i:i + 8] for i in range(len(form) - 7)):
            assert fragment not in text or fragment in "backend rejected credential", (name, fragment, text)


# ---- the redactor alone: what it scrubs, what it leaves -------------------------------


KEYS = ["xf_live_9fK2mQ7rT4wZ8pL1", "sk-fy-Hq3Vn8Rt6Yb2Mk5Jd9", "Tok+With/Odd=Chars~7Gh3Jk", "short", "with space 7Yh",
        "sk-backend-bot-Q7w8e9r0t1"]
NAMES = ["backend-bot"]  # a client named like its key


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    scrub = Redactor()
    scrub.add(KEYS, public=NAMES)
    return scrub


def _aligned_base64(key: str) -> list[str]:
    """The key base64-encoded inside longer data, at each of the three alignments."""
    return [base64.b64encode(prefix.encode() + key.encode() + b"!tail").decode() for prefix in ("", "a", "ab")]


SCRUBBED = [(f"{name} of {key}", text) for key in KEYS[:3] for name, text in transforms(key).items()] + [
    (f"base64 at alignment {i} of {key}", text) for key in KEYS[:3] for i, text in enumerate(_aligned_base64(key))
] + [
    ("inside a word", f"token={KEYS[0]}&x=1"),
    ("in JSON", json.dumps({"key": KEYS[1]})),
    ("the first 8 characters", f"key {KEYS[0][:8]} is invalid"),
    ("the last 8 characters", f"key ...{KEYS[1][-8:]} is invalid"),
    ("a short key whole", "got short here"),
    ("a key with a space whole", "got with space 7Yh here"),
    ("a key-shaped unknown key", "client sent xf_unknown_key_1234"),
    ("a named key's own part", "key backend-bot-Q7w8 refused"),
]


@pytest.mark.parametrize(("what", "text"), SCRUBBED, ids=[case[0] for case in SCRUBBED])
def test_the_redactor_scrubs_partial_and_transformed_keys(redactor: Redactor, what: str, text: str) -> None:
    scrubbed = redactor(text)
    assert "[redacted]" in scrubbed, (what, scrubbed)
    for key in KEYS:
        for form in [key, *transforms(key).values()]:
            if len(form) >= 8:
                assert not any(form[i:i + 8] in scrubbed for i in range(len(form) - 7)), (what, form, scrubbed)


KEPT = [
    '{"request_id":"req_0a1b2c3d4e5f00000001","method":"POST","path":"/v1/chat/completions","status":200}',
    '{"timestamp":"2026-05-01T10:11:12.123456Z","model":"gpt-4o-mini","upstream":"xffuw","key":"3f9a1c2b4d5e"}',
    "xffuw: insufficient balance",
    "invalid key xf_l...pL1",  # a masked form shows too little of the key to be scrubbed
    "a fragment of seven: 9fK2mQ7",
    "你好!我是 AI 助手。",
    '{"client":"backend-bot","status":200}',  # a name inside a key stays a name
]


@pytest.mark.parametrize("text", KEPT)
def test_the_redactor_leaves_other_text_alone(redactor: Redactor, text: str) -> None:
    assert redactor(text) == text


WHOLE = [  # what goes back to a client: whole secrets and key shapes scrubbed, pieces kept
    (f"path /v1/{KEYS[0]}", "path /v1/[redacted]"),
    (f"model m-{KEYS[2]}", "model m-[redacted]"),
    ("got short here", "got [redacted] here"),
    (f"guess /v1/{KEYS[0][:8]}", "guess /v1/[redacted]"),  # a key shape, secret or not
    (f"guess /v1/{KEYS[2][:10]}", f"guess /v1/{KEYS[2][:10]}"),
    (f"guess /v1/{KEYS[2][:9]}Q", f"guess /v1/{KEYS[2][:9]}Q"),
    ("client sent xf_unknown_key_1234", "client sent [redacted]"),
]


@pytest.mark.parametrize(("text", "shown"), WHOLE)
def test_what_a_client_sent_is_scrubbed_of_whole_secrets_only(redactor: Redactor, text: str, shown: str) -> None:
    assert redactor.whole(text) == shown


GUESS = KEYS[1][6:15]  # 9 characters from inside a key: no key shape, only its pieces tell

SENT = [  # upstream text quoting the request it was sent: the client's own pieces kept, others scrubbed
    (f"bad size '{GUESS}'", f'{{"size": "{GUESS}"}}', f"bad size '{GUESS}'"),
    (f"bad size '{GUESS}'", '{"size": "1024x1024"}', "bad size '[redacted]'"),
    (f"bad size '{GUESS}' for key {KEYS[0][-9:]}", f'{{"size": "{GUESS}"}}',
     f"bad size '{GUESS}' for key [redacted]"),
    (f"key {KEYS[1]}", f'{{"size": "{KEYS[1]}"}}', "key [redacted]"),  # a whole secret, sent or not
]


@pytest.mark.parametrize(("text", "sent", "shown"), SENT)
def test_what_the_request_held_is_not_scrubbed_as_a_piece(redactor: Redactor, text: str, sent: str,
                                                          shown: str) -> None:
    assert redactor(text, sent) == shown


@pytest.mark.parametrize(("text", "found"), [
    ("一只橘猫 in 1024x1024", ""),
    (f"a cat {GUESS} please", "\n".join(sorted({GUESS[:8], GUESS[1:]}))),
    (f"{KEYS[0]}", "\n".join(sorted({KEYS[0][i:i + 8] for i in range(len(KEYS[0]) - 7)}))),
])
def test_the_pieces_a_request_holds_are_listed_to_be_kept(redactor: Redactor, text: str, found: str) -> None:
    assert redactor.pieces_in(text) == found
