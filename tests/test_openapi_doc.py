"""The proxy's own OpenAPI document (/schema/openapi.json): every route with its request body
and answers declared, errors in OpenAI's shape, and no secret in it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import CLIENT_KEY, FENGYUAN_KEYS, OTHER_CLIENT_KEY, XFFUW_KEYS, RunningProxy, Sims

from proxy.api import ROUTES

# (path, method) -> (request body component or None, 200 answer component, or None for a binary answer)
EXPECTED: dict[tuple[str, str], tuple[str | None, str | None]] = {
    ("/v1/chat/completions", "post"): ("ChatCompletionRequest", "ChatCompletion"),
    ("/v1/completions", "post"): ("CompletionRequest", "Completion"),
    ("/v1/responses", "post"): ("ResponseRequest", "ResponseObject"),
    ("/v1/responses/{response_id}", "get"): (None, "ResponseObject"),
    ("/v1/responses/{response_id}", "delete"): (None, "Deleted"),
    ("/v1/images/generations", "post"): ("ImageGenerationRequest", "ImagesResponse"),
    ("/v1/images/edits", "post"): ("ImageEditRequest", "ImagesResponse"),
    ("/v1/files/uploads/{name}", "get"): (None, None),
    ("/v1/models", "get"): (None, "ModelList"),
    ("/v1/models/{model_id}", "get"): (None, "Model"),
}
STREAMED = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
def document(proxy: RunningProxy) -> dict[str, Any]:
    reply = httpx.get(f"{proxy.url}/schema/openapi.json")
    assert reply.status_code == 200
    assert "json" in reply.headers["content-type"]  # application/vnd.oai.openapi+json
    return reply.json()  # type: ignore[no-any-return]


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(path, method): op for path, item in document["paths"].items() for method, op in item.items()
            if method in METHODS}


def _ref(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.removeprefix("#/components/schemas/") if isinstance(ref, str) else None


def test_every_route_of_the_edge_is_documented(document: dict[str, Any]) -> None:
    operations = _operations(document)
    documented_handlers = {(path, m.lower()) for h in ROUTES if h.include_in_schema is not False
                           for path in h.paths for m in h.http_methods}
    assert len(documented_handlers) == len(EXPECTED)  # a new handler needs a row above
    for (path, method), (body, answer) in EXPECTED.items():
        op = operations.get((path, method))
        assert op is not None, f"{method.upper()} {path} is missing from the document"
        if body is None:
            assert "requestBody" not in op, (path, method)
        else:
            content = op.get("requestBody", {}).get("content", {})
            assert _ref(content.get("application/json", {}).get("schema", {})) == body, (path, method, content)
        ok = op["responses"]["200"]["content"]
        if answer is None:
            assert ok["application/octet-stream"]["schema"]["type"] == "string"
        else:
            assert _ref(ok["application/json"]["schema"]) == answer, (path, method, ok)
        assert ("text/event-stream" in ok) == (path in STREAMED and method == "post"), (path, method)


def test_component_schemas_describe_the_fields(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert set(schemas["CompletionRequest"]["required"]) == {"model"}
    assert {"prompt", "max_tokens", "stream", "echo"} <= set(schemas["CompletionRequest"]["properties"])
    assert {"input", "instructions", "previous_response_id", "store", "stream"} <= set(
        schemas["ResponseRequest"]["properties"])
    assert {"id", "output", "usage", "status"} <= set(schemas["ResponseObject"]["properties"])
    assert set(schemas["ImageEditRequest"]["required"]) == {"prompt", "images"}
    assert set(schemas["ErrorBody"]["required"]) == {"message", "type", "param", "code"}


def test_image_edits_document_both_forms(document: dict[str, Any]) -> None:
    content = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]
    assert form["properties"]["image"] == {"type": "string", "format": "binary"}
    assert form["properties"]["image[]"]["items"] == {"type": "string", "format": "binary"}
    assert "prompt" in form["required"]


def test_every_operation_answers_a_schema_and_errors_in_openai_shape(document: dict[str, Any]) -> None:
    """Every route, the admin ones included: Litestar's defaults (an empty or `string` schema for
    handlers that answer raw bytes, its own 400 shape) would tell clients wrong things."""
    problems = []
    for (path, method), op in _operations(document).items():
        where = f"{method.upper()} {path}"
        ok = op["responses"].get("200") or op["responses"].get("201")
        content = (ok or {}).get("content") or {}
        json_schema = content.get("application/json", {}).get("schema")
        if not content or json_schema in ({}, {"type": "string"}) or not all(m.get("schema") for m in content.values()):
            problems.append(f"{where}: the success answer has no real schema: {ok}")
        for status, answer in op["responses"].items():
            schema = (answer.get("content") or {}).get("application/json", {}).get("schema", {})
            if int(status) >= 400 and _ref(schema) != "ErrorResponse":
                problems.append(f"{where} -> {status}: not OpenAI's error shape: {schema}")
    assert not problems, "\n".join(problems)


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    names = set(document["components"]["schemas"])
    refs = {part.split('"', 1)[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}
    assert refs and refs <= names, refs - names


def test_no_secret_or_upstream_address_in_the_document(proxy: RunningProxy, sims: Sims,
                                                       document: dict[str, Any]) -> None:
    text = json.dumps(document)
    for secret in (CLIENT_KEY, OTHER_CLIENT_KEY, *XFFUW_KEYS, *FENGYUAN_KEYS, sims.xffuw_url, sims.fengyuan_url):
        assert secret not in text
