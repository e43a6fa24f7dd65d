"""OpenAI routes the proxy does not serve answer a 404 that says so, and every refusal can be
diagnosed from the proxy's access log alone: its error code and param are on the line."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from helpers import logged_requests
from openai_spec import validate_error

from proxy.app import _error_fields, _not_found_message

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
# (method, path, the service the message names)
UNSERVED = [
    ("POST", "/v1/embeddings", "embeddings"),
    ("POST", "/v1/audio/speech", "audio"),
    ("POST", "/v1/audio/transcriptions", "audio"),
    ("POST", "/v1/moderations", "moderation"),
    ("GET", "/v1/files", "file storage"),
    ("POST", "/v1/files", "file storage"),
    ("POST", "/v1/uploads", "file storage"),
    ("POST", "/v1/batches", "batch"),
    ("GET", "/v1/fine_tuning/jobs", "fine-tuning"),
    ("POST", "/v1/vector_stores", "vector store"),
    ("POST", "/v1/assistants", "Assistants"),
    ("POST", "/v1/threads/thread_1/runs", "Assistants"),
    ("POST", "/v1/realtime/client_secrets", "Realtime"),
    ("POST", "/v1/images/variations", "image variation"),
    ("GET", "/v1/chat/completions/chatcmpl-1", "stored chat completion"),
    ("GET", "/v1/responses/resp_1/input_items", "response input-item"),
    ("POST", "/v1/conversations", "such"),
]


@pytest.mark.parametrize(("method", "path", "service"), UNSERVED, ids=[f"{m} {p}" for m, p, _ in UNSERVED])
def test_unserved_route_message(method: str, path: str, service: str) -> None:
    message = _not_found_message(method, path)
    assert f"offer no {service}" in message and f"{method} {path}" in message
    assert "It serves chat completions" in message


@pytest.mark.parametrize("path", ["/v1/nope", "/nope", "/v1/embeddingsx", "/v2/embeddings"])
def test_unknown_paths_keep_the_generic_message(path: str) -> None:
    assert _not_found_message("GET", path) == f"Unknown request URL: GET {path}. Please check the URL."


def test_unserved_routes_are_openai_shaped_404s(proxy: RunningProxy, sims: Sims) -> None:
    with httpx.Client(base_url=proxy.url, headers=AUTH, timeout=30) as http:
        for method, path, service in UNSERVED:
            reply = http.request(method, path, json={"model": "text-embedding-3-small", "input": "x"})
            assert reply.status_code == 404, (path, reply.text)
            body = reply.json()
            validate_error(body)
            assert f"offer no {service}" in body["error"]["message"], body
            assert body["error"]["type"] == "invalid_request_error"
        unknown = http.get("/v1/nope").json()["error"]["message"]
        assert unknown == "Unknown request URL: GET /v1/nope. Please check the URL."
    with pytest.raises(openai.NotFoundError, match="no embeddings service"):
        proxy.client().embeddings.create(model="text-embedding-3-small", input="hello")
    assert sims.xffuw.count("chat") == 0


def test_every_refusal_logs_its_code_and_param(proxy: RunningProxy, sims: Sims,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("POST", "/v1/chat/completions", AUTH, {"model": "gpt-4o-mini", "messages": [], "n": 1}),
        ("POST", "/v1/chat/completions", AUTH, {"model": "no-such-model", "messages": [{"role": "user",
                                                                                     "content": "x"}]}),
        ("POST", "/v1/chat/completions", {"authorization": "Bearer sk-wrong"}, {}),
        ("POST", "/v1/responses", AUTH, {"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "web_search"}]}),
        ("POST", "/v1/responses", AUTH, {"model": "gpt-4o-mini", "input": "x", "metadata": {"k": 5}}),
        ("POST", "/v1/embeddings", AUTH, {"input": "x"}),
        ("POST", "/v1/chat/completions", AUTH, {"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                                   "content": "x"}]}),
    ]
    capsys.readouterr()
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        ids = [http.request(method, path, headers=headers, json=body).headers["x-request-id"]
               for method, path, headers, body in requests]
    by_id = {entry["request_id"]: entry for entry in logged_requests(capsys, len(ids))}
    empty, unknown, unauthorised, built_in, metadata, unserved, fine = (by_id[i] for i in ids)
    assert (empty["status"], empty["error_param"], "error_code" in empty) == (400, "messages", False)
    assert (unknown["status"], unknown["error_code"], unknown["error_param"]) == (404, "model_not_found", "model")
    assert (unauthorised["status"], unauthorised["error_code"]) == (401, "invalid_api_key")
    assert "error_param" not in unauthorised
    assert built_in["error_param"] == "tools[0].type"
    assert metadata["status"] == 400 and metadata["error_param"].startswith("metadata")
    assert (unserved["status"], unserved["error_code"]) == (404, "not_found")
    assert fine["status"] == 200 and not {"error_code", "error_param", "stream_error"} & set(fine)


def test_logged_error_fields_are_cut_short_and_need_an_openai_error() -> None:
    long = _error_fields(b'{"error": {"message": "m", "code": "bad", "param": "' + b"p" * 5000 + b'"}}')
    assert long["error_code"] == "bad" and long["error_param"] == "p" * 300  # a client may send anything
    assert _error_fields(b'{"error": {"message": "m", "param": null, "code": null}}') == {}
    assert _error_fields(b"<html>502</html>") == _error_fields(b'{"error": "text"}') == {}
