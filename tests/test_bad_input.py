"""No request can produce a 500 or a traceback: every answer to bad input is OpenAI-shaped
with the right status. Hand-written cases, schemathesis against the proxy's own OpenAPI
document, and a hypothesis fuzz of the chat and image bodies."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import CLIENT_KEY, FENGYUAN_KEYS, XFFUW_KEYS, RunningProxy, Sims, serving, sim_providers
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from openai_spec import validate_error
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
ADMIN_KEY = "admin-bad-input-0123456789"
JSON = {**AUTH, "content-type": "application/json"}
MAX_BODY = 256 * 1024
USER = [{"role": "user", "content": "你好"}]
CHAT = {"model": "gpt-4o-mini", "messages": USER}
IMAGE = {"model": "gpt-image-2", "prompt": "一只橘猫"}


@pytest.fixture(scope="module")
def limited_edge(_sim_servers: Sims, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """One proxy for the whole module, with a small body limit and short tasks."""
    raw = {
        "server": {"max_body_bytes": MAX_BODY},
        "clients": [{"name": "alice", "key": CLIENT_KEY}],
        "admin": {"keys": [ADMIN_KEY]},
        "providers": sim_providers(_sim_servers),
        "tasks": {"poll_interval": 0.1, "first_poll": 0.05, "timeout": 5},
        "log": {"format": "json"},
        "storage": {"path": str(tmp_path_factory.mktemp("bad-input") / "proxy.sqlite3")},
    }
    with serving(raw) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def edge_http(limited_edge: RunningProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited_edge.url, timeout=30) as client:
        yield client


def openai_error(reply: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert reply.status_code in statuses, (reply.status_code, reply.text[:500])
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    validate_error(body)
    assert set(body) == {"error"}, body
    text = reply.text
    assert "Traceback" not in text and 'File "' not in text, text
    return body["error"]


def never_500(reply: httpx.Response) -> None:
    """2xx, or an OpenAI-shaped error that is not the proxy's own failure."""
    assert reply.status_code < 500 or reply.status_code in (502, 503, 504), (reply.status_code, reply.text[:500])
    if reply.status_code >= 400:
        openai_error(reply, reply.status_code)


# ---- hand-written bad requests --------------------------------------------------------------


def _nested(depth: int, open_: str, close: str) -> bytes:
    return (open_ * depth + close * depth).encode()


BAD_BODIES: list[tuple[str, str, bytes, dict[str, str], int]] = [
    # (id, path, body, extra headers, status)
    ("wrong-type-messages", "/v1/chat/completions", json.dumps({"model": "gpt-4o-mini", "messages": {"a": 1}}).encode(),
     {}, 400),
    ("wrong-type-message-items", "/v1/chat/completions",
     json.dumps({"model": "gpt-4o-mini", "messages": [1, 2]}).encode(), {}, 400),
    ("wrong-type-content", "/v1/chat/completions",
     json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": {"x": 1}}]}).encode(), {}, 400),
    ("wrong-type-stream", "/v1/chat/completions", json.dumps({**CHAT, "stream": "yes"}).encode(), {}, 400),
    ("negative-n", "/v1/images/generations", json.dumps({**IMAGE, "n": -3}).encode(), {}, 400),
    ("float-n", "/v1/images/generations", json.dumps({**IMAGE, "n": 1.5}).encode(), {}, 400),
    ("wrong-type-size", "/v1/images/generations", json.dumps({**IMAGE, "size": 1024}).encode(), {}, 400),
    ("wrong-type-images", "/v1/images/generations", json.dumps({**IMAGE, "images": "x"}).encode(), {}, 400),
    ("non-http-reference", "/v1/images/generations", json.dumps({**IMAGE, "images": ["file:///etc/passwd"]}).encode(),
     {}, 400),
    ("missing-everything", "/v1/images/generations", b"{}", {}, 400),
    ("null-fields", "/v1/chat/completions", b'{"model": null, "messages": null}', {}, 400),
    ("empty-body", "/v1/chat/completions", b"", {}, 400),
    ("whitespace-body", "/v1/images/generations", b"  \n ", {}, 400),
    ("json-array", "/v1/images/generations", b"[1, 2, 3]", {}, 400),
    ("json-string", "/v1/chat/completions", b'"hello"', {}, 400),
    ("nan", "/v1/chat/completions", b'{"model": "gpt-4o-mini", "messages": [], "temperature": NaN}', {}, 400),
    ("duplicate-keys", "/v1/chat/completions", b'{"model": 1, "model": [], "messages": 2}', {}, 400),
    ("trailing-garbage", "/v1/chat/completions", json.dumps(CHAT).encode() + b"}}}", {}, 400),
    ("invalid-utf8", "/v1/chat/completions", b'\xff\xfe{}', {}, 400),
    ("invalid-utf8-in-a-string", "/v1/chat/completions", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", '
                                                        b'"content": "\xff\xfe\xc3"}]}', {}, 400),
    ("invalid-utf8-in-a-prompt", "/v1/images/generations", b'{"model": "gpt-image-2", "prompt": "\xc3\x28"}', {},
     400),
    ("invalid-utf8-in-a-key", "/v1/responses", b'{"model": "gpt-4o-mini", "\xed\xa0\x80": "x", "input": "hi"}', {},
     400),
    ("utf16", "/v1/images/generations", json.dumps(IMAGE).encode("utf-16"), {}, 400),
    ("nul-bytes", "/v1/chat/completions", b"\x00" * 64, {}, 400),
    ("deep-lists", "/v1/chat/completions", _nested(100_000, "[", "]"), {}, 400),
    ("deep-objects", "/v1/images/generations", b'{"a":' * 40_000 + b"1" + b"}" * 40_000, {}, 400),
    ("deep-inside-a-field", "/v1/chat/completions",
     b'{"model": "gpt-4o-mini", "messages": ' + _nested(60_000, "[", "]") + b"}", {}, 400),
    ("deep-nested-content", "/v1/images/generations",
     b'{"model": "gpt-image-2", "prompt": "x", "extra": ' + _nested(60_000, "[", "]") + b"}", {}, 400),
    ("text-plain-garbage", "/v1/chat/completions", b"model=gpt-4o-mini", {"content-type": "text/plain"}, 400),
    ("form-urlencoded", "/v1/images/generations", b"model=gpt-image-2&prompt=cat",
     {"content-type": "application/x-www-form-urlencoded"}, 400),
    ("multipart-to-json-endpoint", "/v1/chat/completions",
     b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-mini\r\n--xyz--\r\n',
     {"content-type": "multipart/form-data; boundary=xyz"}, 400),
    ("multipart-without-boundary", "/v1/images/edits", b"--xyz\r\n\r\n--xyz--",
     {"content-type": "multipart/form-data"}, 400),
    ("edits-json-garbage", "/v1/images/edits", b"{not json", {"content-type": "application/json"}, 400),
    ("over-the-body-limit", "/v1/chat/completions",
     json.dumps({**CHAT, "pad": "x" * (MAX_BODY + 1)}).encode(), {}, 413),
    ("over-the-limit-multipart", "/v1/images/edits",
     b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
     + b"\x89PNG" + b"\x00" * (MAX_BODY + 10) + b"\r\n--xyz--\r\n",
     {"content-type": "multipart/form-data; boundary=xyz"}, 413),
    ("over-the-limit-with-idempotency-key", "/v1/images/generations",
     json.dumps({**IMAGE, "pad": "x" * (MAX_BODY + 1)}).encode(), {"idempotency-key": "big-1"}, 413),
]


@pytest.mark.parametrize(("path", "body", "headers", "status"), [c[1:] for c in BAD_BODIES],
                         ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_are_answered_in_openai_shape(edge_http: httpx.Client, path: str, body: bytes,
                                                 headers: dict[str, str], status: int) -> None:
    reply = edge_http.post(path, content=body, headers={**JSON, **headers})
    error = openai_error(reply, status)
    assert error["type"] == "invalid_request_error", error
    assert reply.headers["x-request-id"].startswith("req_")


def raw_http(proxy: RunningProxy, request: bytes, wait: float = 3.0) -> bytes:
    """Send bytes no HTTP client library would, and read the answer until the server is done."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length and len(body) >= int(length.group(1)):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_a_declared_length_over_the_limit_is_413_before_the_body(limited_edge: RunningProxy) -> None:
    started = time.monotonic()
    answer = raw_http(limited_edge, (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MAX_BODY * 1000}\r\n\r\n{{}}").encode())
    assert time.monotonic() - started < 2.5, "the proxy waited for a body it will refuse anyway"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    validate_error(json.loads(body))


def test_a_chunked_body_over_the_limit_is_413(edge_http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "gpt-4o-mini", "pad": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    for path, extra in (("/v1/chat/completions", {}), ("/v1/images/generations", {"idempotency-key": "chunked"})):
        reply = edge_http.post(path, content=chunks(), headers={**JSON, **extra})
        assert openai_error(reply, 413)["code"] == "request_too_large"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json; charset=latin-1",
                                          "application/octet-stream", "application/xml"])
def test_other_content_types_with_a_json_body_are_never_500(edge_http: httpx.Client, sims: Sims,
                                                            content_type: str | None) -> None:
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/images/generations", IMAGE)):
        reply = edge_http.post(path, content=json.dumps(body).encode(), headers=headers)
        # lenient (the body is read as JSON whatever the header says) or 415, never a crash
        assert reply.status_code in (200, 400, 415), (reply.status_code, reply.text)
        never_500(reply)


def test_lone_surrogates_and_control_characters_are_never_500(edge_http: httpx.Client, sims: Sims) -> None:
    bodies = [b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800"}]}',
              b'{"model": "gpt-image-2", "prompt": "\\udfff\\u0000\\u001b[31m"}',
              b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}']
    for path, body in zip(("/v1/chat/completions", "/v1/images/generations", "/v1/chat/completions"), bodies,
                          strict=True):
        reply = edge_http.post(path, content=body, headers=JSON)
        assert reply.status_code in (200, 400, 404), (reply.status_code, reply.text)
        never_500(reply)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/tasks", 404), ("GET", "/v1/tasks/", 404), ("GET", "/v1/%ff%fe", 404),
    ("GET", "/v1/models/" + "m" * 5000, 404), ("GET", "/v1//chat//completions", (404, 405)),
    ("GET", "/v1/models/%2e%2e/%2e%2e/admin/keys", 404), ("POST", "/v2/chat/completions", 404),
    ("GET", "/v1/tasks/" + "%00" * 3, 404), ("GET", "/v1/tasks/task_nope?x=%ff", 404),
    ("PUT", "/v1/chat/completions", 405), ("PATCH", "/v1/images/generations", 405),
    ("DELETE", "/v1/models", 405), ("POST", "/v1/tasks/task_nope", 405), ("PUT", "/v1/models/gpt-4o-mini", 405),
    ("OPTIONS", "/v1/chat/completions", (200, 204, 405)), ("TRACE", "/v1/models", 405),
])
def test_unknown_routes_and_wrong_methods(edge_http: httpx.Client, method: str, path: str,
                                          status: int | tuple[int, ...]) -> None:
    reply = edge_http.request(method, path, headers=AUTH)
    if reply.status_code in (200, 204):
        return  # an OPTIONS answer
    error = openai_error(reply, status)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer " + "k" * 20_000},
    {"authorization": "Bearer \u00ff\u00fe-latin1"},
    {"authorization": f"Bearer {CLIENT_KEY}", "idempotency-key": "k" * 5000},
    {"authorization": f"Bearer {CLIENT_KEY}", "idempotency-key": ""},
    {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json; boundary=\u00ff"},
])
def test_odd_headers_are_never_500(limited_edge: RunningProxy, sims: Sims, headers: dict[str, str]) -> None:
    try:
        reply = httpx.post(limited_edge.url + "/v1/chat/completions", json=CHAT,
                           headers={k: v.encode("latin-1") for k, v in headers.items()})  # type: ignore[misc]
    except httpx.RemoteProtocolError:
        return  # the HTTP server refused the request line itself: no app answer to judge
    never_500(reply)


# ---- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [XFFUW_KEYS[0], FENGYUAN_KEYS[0]])
def test_an_upstream_key_as_bearer_is_401_without_echoing_it(edge_http: httpx.Client, sims: Sims, secret: str) -> None:
    headers = {"authorization": f"Bearer {secret}"}
    for reply in (edge_http.post("/v1/chat/completions", json=CHAT, headers=headers),
                  edge_http.post("/v1/images/generations", json=IMAGE, headers={**headers, "idempotency-key": "k"}),
                  edge_http.get("/v1/models", headers=headers), edge_http.get("/v1/tasks/task_x", headers=headers),
                  edge_http.get("/admin/keys", headers=headers)):
        error = openai_error(reply, 401)
        assert error["code"] == "invalid_api_key"
        assert secret not in reply.text and secret[-8:] not in reply.text
        assert all(secret not in v for v in reply.headers.values())
    assert sims.xffuw.count() == 0 and sims.fengyuan.count("invoke") == 0


# ---- schemathesis against the proxy's own OpenAPI document ------------------------------------


@schemathesis.check
def openai_shaped(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """No 5xx of the proxy's own; every error is `{"error": {message, type, param, code}}`."""
    status = response.status_code
    if status >= 500 and status not in (502, 503, 504):
        raise AssertionError(f"{case.method} {case.path} answered {status}: {response.text[:300]}")
    if status >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]
        if not content_type.startswith("application/json"):
            raise AssertionError(f"{status} with content-type {content_type!r}: {response.text[:300]}")
        validate_error(json.loads(response.content), context=f"{case.method} {case.path} -> {status}")
        if "Traceback" in response.text:
            raise AssertionError("a traceback in the answer")


SCHEMATHESIS_EXAMPLES = 8  # per operation and generation mode: ~30 operations-modes, < 30 s in all


def test_schemathesis_finds_no_500_and_only_openai_shaped_errors(limited_edge: RunningProxy, sims: Sims) -> None:
    """schemathesis, from the proxy's live OpenAPI document, positive and negative cases for
    every operation; every failure across all operations is reported at once."""
    sims.xffuw.task_seconds = sims.fengyuan.task_seconds = 0.05
    schema = schemathesis.openapi.from_url(limited_edge.url + "/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/images/generations", "GET /v1/tasks/{task_id}"} <= labels, labels
    failures: list[str] = []
    calls = 0
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                admin = case.path.startswith(("/admin", "/metrics"))
                headers = {"authorization": f"Bearer {ADMIN_KEY}"} if admin else dict(AUTH)
                case.call_and_validate(base_url=limited_edge.url, headers=headers, timeout=15,
                                       checks=[openai_shaped, status_code_conformance])

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to negate (no parameters, no body): nothing to send
            except (Exception, BaseExceptionGroup) as exc:  # one failure must not hide another
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")
    assert calls >= len(operations) * 4, calls
    assert not failures, "\n\n".join(failures)


# ---- hypothesis: fuzzed request bodies -------------------------------------------------------

# text with lone surrogates now and then: serialised with "surrogatepass" they become bytes
# that are not UTF-8 inside otherwise well-formed JSON
# (st.text drops surrogates, hence lists of characters)
TEXT = st.lists(st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]),
                max_size=12).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
CHAT_FIELDS = ["model", "messages", "temperature", "top_p", "n", "stream", "stop", "max_tokens",
               "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "user", "tools",
               "tool_choice", "response_format", "seed", "stream_options", "logprobs", "top_logprobs"]
IMAGE_FIELDS = ["model", "prompt", "n", "size", "quality", "style", "response_format", "user", "images",
                "background", "output_format"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 3]),
                                 "content": JSON_VALUES})


FUZZ_PHASES = [Phase.explicit, Phase.generate]  # no shrinking: a failure stays quick to report


def body_strategy(fields: list[str], valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    wrong_typed = st.dictionaries(st.sampled_from(fields), JSON_VALUES, max_size=6)
    near_valid = st.builds(lambda base, extra: {**base, **extra}, st.just(valid),
                           st.dictionaries(st.sampled_from(fields), JSON_VALUES, max_size=2))
    return st.one_of(JSON_VALUES, wrong_typed, near_valid)


def encoded(value: Any, raw: bool) -> bytes:
    if raw:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()  # escapes: "\ud800" stays ASCII


def without_markers(body: Any) -> Any:
    """No simulator markers ([never], [delay=…]) in prompts; no streams (their errors are events)."""
    if isinstance(body, dict):
        body = dict(body)
        if isinstance(body.get("prompt"), str):
            body["prompt"] = body["prompt"].replace("[", "(")
        if body.get("stream") is True:
            body["stream"] = False
    return body


@settings(max_examples=80, deadline=None, database=None, phases=FUZZ_PHASES,
          suppress_health_check=list(HealthCheck))
@given(body=st.one_of(body_strategy(CHAT_FIELDS, CHAT),
                      st.fixed_dictionaries({"model": st.just("gpt-4o-mini"),
                                             "messages": st.lists(MESSAGE, max_size=3)})),
       raw=st.booleans())
def test_fuzzed_chat_bodies_never_break_the_proxy(edge_http: httpx.Client, sims: Sims, body: Any, raw: bool) -> None:
    reply = edge_http.post("/v1/chat/completions", content=encoded(without_markers(body), raw), headers=JSON)
    never_500(reply)


@settings(max_examples=60, deadline=None, database=None, phases=FUZZ_PHASES,
          suppress_health_check=list(HealthCheck))
@given(body=body_strategy(IMAGE_FIELDS, IMAGE), raw=st.booleans())
def test_fuzzed_image_bodies_never_break_the_proxy(edge_http: httpx.Client, sims: Sims, body: Any, raw: bool) -> None:
    reply = edge_http.post("/v1/images/generations", content=encoded(without_markers(body), raw), headers=JSON)
    never_500(reply)


@settings(max_examples=40, deadline=None, database=None, phases=FUZZ_PHASES,
          suppress_health_check=list(HealthCheck))
@given(content=st.binary(max_size=200), path=st.sampled_from(["/v1/chat/completions", "/v1/images/generations",
                                                               "/v1/responses", "/v1/completions"]))
def test_fuzzed_raw_bytes_never_break_the_proxy(edge_http: httpx.Client, content: bytes, path: str) -> None:
    never_500(edge_http.post(path, content=content, headers=JSON))
