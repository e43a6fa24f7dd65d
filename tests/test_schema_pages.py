"""The proxy serves its OpenAPI document and no page that loads scripts or styles from another
host: teams run it in closed networks (issue 18)."""

from __future__ import annotations

import re

import httpx
import pytest
from conftest import RunningProxy
from openai_spec import validate_error

# Where Litestar serves its viewers (Swagger UI, ReDoc, Elements, RapiDoc) when they are on.
PAGES = ["/schema", "/schema/swagger", "/schema/redoc", "/schema/elements", "/schema/rapidoc",
         "/schema/oauth2-redirect.html"]
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


@pytest.mark.parametrize("path", PAGES)
def test_no_page_loads_anything_from_another_host(proxy: RunningProxy, path: str) -> None:
    reply = httpx.get(proxy.url + path)
    if reply.status_code == 200 and "html" in reply.headers.get("content-type", ""):
        assert not EXTERNAL.search(reply.text), EXTERNAL.findall(reply.text)
        assert "cdn." not in reply.text and "unpkg.com" not in reply.text


def test_the_document_is_served(proxy: RunningProxy) -> None:
    reply = httpx.get(proxy.url + "/schema/openapi.json")
    assert reply.status_code == 200
    assert "/v1/chat/completions" in reply.json()["paths"]


@pytest.mark.parametrize("path", [p for p in PAGES if p != "/schema"] + ["/schema/foo", "/schema/openapi.yaml"])
def test_a_page_not_served_is_the_json_404_of_any_unknown_route(proxy: RunningProxy, path: str) -> None:
    reply = httpx.get(proxy.url + path)
    assert reply.status_code == 404
    assert reply.headers["content-type"] == "application/json" and reply.headers["x-request-id"].startswith("req_")
    validate_error(reply.json())
    assert reply.json()["error"]["code"] == "not_found" and path in reply.json()["error"]["message"]
