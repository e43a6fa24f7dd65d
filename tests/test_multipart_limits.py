"""Multipart forms past the proxy's limits get 413 request_too_large in OpenAI's shape, not
400 (issue 18): too many parts, a part's headers too long, a body past max_body_bytes."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, RunningProxy

# A 1x1 PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAAB"
                       "JRU5ErkJggg==")
EDITS = "/v1/images/edits"


def assert_too_large(reply: httpx.Response) -> None:
    assert reply.status_code == 413, (reply.status_code, reply.text[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large"), error


def test_too_many_parts_get_413(proxy: RunningProxy) -> None:
    fields = [("prompt", "一只橘猫"), *((f"extra{i}", "x") for i in range(1001))]
    reply = httpx.post(proxy.url + EDITS, headers={"authorization": f"Bearer {CLIENT_KEY}"}, data=dict(fields),
                       files={"image": ("cat.png", PNG, "image/png")}, timeout=30)
    assert_too_large(reply)
    assert "segment count" in reply.json()["error"]["message"]


def test_a_part_header_too_long_gets_413_through_the_sdk(proxy: RunningProxy) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().images.edit(image=("c" * 5000 + ".png", PNG, "image/png"), prompt="一只橘猫")
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"


def test_a_body_past_max_body_bytes_gets_413(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                             proxy_config: dict[str, Any]) -> None:
    proxy_config["server"] = {"max_body_bytes": 64 * 1024}
    proxy = start_proxy(proxy_config)
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().images.edit(image=("cat.png", PNG + b"\0" * 100_000, "image/png"), prompt="一只橘猫")
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
