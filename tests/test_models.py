"""GET /v1/models and /v1/models/{id}: the merged, cached catalogue of both upstreams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from helpers import sdk_error_body
from openai_spec import validate_error, validate_model, validate_model_list

# What the simulators list (proxy/sim/xffuw.py default_models, proxy/sim/fengyuan.py default_services).
XFFUW_ONLY = {"gpt-4o-mini", "deepseek-chat", "gpt-image-2", "flux-schnell", "kling-video", "suno-music"}
FENGYUAN_ONLY = {"product_photo", "image-video"}
SHARED = "image_generation"


def _listing(client: openai.OpenAI) -> dict[str, Any]:
    """GET /v1/models through the SDK; the raw body, checked against the spec."""
    raw = client.models.with_raw_response.list()
    assert raw.http_response.status_code == 200
    body = raw.http_response.json()
    validate_model_list(body)
    for entry in body["data"]:
        validate_model(entry)
    page = raw.parse()
    assert [m.id for m in page.data] == [e["id"] for e in body["data"]]
    return body


def test_list_merges_both_upstreams_with_owners(client: openai.OpenAI, sims: Sims) -> None:
    body = _listing(client)
    assert body["object"] == "list"
    owners = {e["id"]: e["owned_by"] for e in body["data"]}
    assert len(owners) == len(body["data"]), "an id is listed twice"
    assert set(owners.values()) == {"xffuw", "fengyuan"}
    for model_id in XFFUW_ONLY:
        assert owners.get(model_id) == "xffuw", model_id
    for model_id in FENGYUAN_ONLY:
        assert owners.get(model_id) == "fengyuan", model_id
    assert all(e["object"] == "model" and isinstance(e["created"], int) for e in body["data"])


def test_shared_id_is_listed_only_with_provider_prefixes(client: openai.OpenAI, sims: Sims) -> None:
    owners = {e["id"]: e["owned_by"] for e in _listing(client)["data"]}
    assert SHARED not in owners
    assert owners["xffuw/image_generation"] == "xffuw"
    assert owners["fengyuan/image_generation"] == "fengyuan"
    # unique ids are never prefixed
    assert not any(i.startswith(("xffuw/", "fengyuan/")) for i in owners if i.split("/", 1)[-1] != SHARED)


def test_aliases_are_listed_with_their_targets_owner(
    start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims
) -> None:
    proxy_config["aliases"]["my-photo"] = "product_photo"
    proxy_config["aliases"]["missing-alias"] = "no-such-model"
    client = start_proxy(proxy_config).client()
    entries = {e["id"]: e for e in _listing(client)["data"]}
    assert entries["dall-e-3"]["owned_by"] == "xffuw"
    assert entries["my-chat"]["owned_by"] == "xffuw"
    assert entries["my-photo"]["owned_by"] == "fengyuan"
    assert "missing-alias" not in entries  # an alias to nothing is not advertised
    assert entries["dall-e-3"]["created"] == entries["gpt-image-2"]["created"]


def test_alias_over_an_upstream_id_is_listed_once_as_it_routes(
    start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims
) -> None:
    # An alias named like an upstream model wins when routing, so the listing must show only it.
    proxy_config["aliases"]["gpt-image-2"] = "fengyuan/image_generation"
    client = start_proxy(proxy_config).client()
    ids = [e["id"] for e in _listing(client)["data"]]
    assert ids.count("gpt-image-2") == 1, "gpt-image-2 is listed twice"
    listed = next(e for e in _listing(client)["data"] if e["id"] == "gpt-image-2")
    assert client.models.retrieve("gpt-image-2").owned_by == "fengyuan"
    assert listed["owned_by"] == "fengyuan"


def test_retrieve_plain_id(client: openai.OpenAI, sims: Sims) -> None:
    raw = client.models.with_raw_response.retrieve("gpt-4o-mini")
    body = raw.http_response.json()
    validate_model(body)
    model = raw.parse()
    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "xffuw")
    fy = client.models.retrieve("product_photo")
    assert (fy.id, fy.owned_by) == ("product_photo", "fengyuan")


@pytest.mark.parametrize("provider", ["xffuw", "fengyuan"])
def test_retrieve_prefixed_id_through_the_sdk(client: openai.OpenAI, sims: Sims, provider: str) -> None:
    # The SDK percent-encodes the "/" of the id as %2F in the path.
    model_id = f"{provider}/image_generation"
    raw = client.models.with_raw_response.retrieve(model_id)
    assert raw.http_response.status_code == 200
    body = raw.http_response.json()
    validate_model(body)
    assert body["id"] == model_id
    assert body["owned_by"] == provider


@pytest.mark.parametrize("path", ["fengyuan/image_generation", "fengyuan%2Fimage_generation"])
def test_retrieve_prefixed_id_raw_path(proxy: RunningProxy, sims: Sims, path: str) -> None:
    reply = httpx.get(f"{proxy.base_url}/models/{path}", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert reply.status_code == 200, reply.text
    validate_model(reply.json())
    assert (reply.json()["id"], reply.json()["owned_by"]) == ("fengyuan/image_generation", "fengyuan")


def test_retrieve_alias(client: openai.OpenAI, sims: Sims) -> None:
    raw = client.models.with_raw_response.retrieve("dall-e-3")
    validate_model(raw.http_response.json())
    model = raw.parse()
    assert (model.id, model.owned_by) == ("dall-e-3", "xffuw")
    assert client.models.retrieve("my-chat").owned_by == "xffuw"


def test_retrieve_unknown_model_is_404(client: openai.OpenAI, sims: Sims) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    error = sdk_error_body(caught.value)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert "no-such-model" in error["message"]
    # a known provider prefix with an unknown id is just as unknown
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("xffuw/product_photo")
    assert sdk_error_body(caught.value)["code"] == "model_not_found"


def test_catalogue_is_cached(client: openai.OpenAI, sims: Sims) -> None:
    first = _listing(client)
    second = _listing(client)
    assert [e["id"] for e in first["data"]] == [e["id"] for e in second["data"]]
    client.models.retrieve("gpt-4o-mini")
    assert sims.xffuw.count("models") == 1
    assert sims.fengyuan.count("service_list") == 1


def test_concurrent_first_requests_fetch_the_catalogue_once(proxy: RunningProxy, sims: Sims) -> None:
    sims.xffuw.faults.latency = 0.2

    async def many() -> list[int]:
        async with proxy.async_client() as client:
            pages = await asyncio.gather(*(client.models.list() for _ in range(5)))
        return [len(p.data) for p in pages]

    sizes = asyncio.run(many())
    assert len(set(sizes)) == 1 and sizes[0] > 0
    assert sims.xffuw.count("models") == 1


def test_catalogue_is_served_stale_while_upstream_is_down(
    start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims
) -> None:
    proxy_config["providers"]["xffuw"]["catalogue_ttl"] = 0.2
    client = start_proxy(proxy_config).client()
    before = {e["id"]: e for e in _listing(client)["data"] if e["owned_by"] == "xffuw"}
    assert "gpt-4o-mini" in before
    assert sims.xffuw.count("models") == 1

    sims.xffuw.faults.down = True
    time.sleep(0.35)  # past the TTL
    after = {e["id"]: e for e in _listing(client)["data"] if e["owned_by"] == "xffuw"}
    assert sims.xffuw.count("models") == 2, "the proxy did not try to refresh the expired list"
    assert after == before
    # routing still works from the stale list: the call reaches xffuw (which is down), not model_not_found
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert sdk_error_body(caught.value)["code"] == "upstream_error"
    assert sims.xffuw.count("chat") == 1
    assert client.models.retrieve("my-chat").owned_by == "xffuw"

    sims.xffuw.faults.down = False
    result = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert result.choices[0].message.content.endswith("You said: hi")


def test_upstream_down_before_its_list_was_ever_read_is_not_model_not_found(
    start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims
) -> None:
    # xffuw is down from the start: its list is unknown, which does not prove gpt-4o-mini is gone.
    sims.xffuw.faults.down = True
    client = start_proxy(proxy_config).client()
    listing = _listing(client)
    assert {e["owned_by"] for e in listing["data"]} == {"fengyuan"}  # only what is known is listed
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    error = sdk_error_body(caught.value)
    assert (caught.value.status_code, error["code"]) == (502, "upstream_error"), error
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(model="gpt-image-2", prompt="a cat")
    error = sdk_error_body(caught.value)
    assert (caught.value.status_code, error["code"]) == (502, "upstream_error"), error
    # a prefixed id already routes on trust
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(model="xffuw/gpt-image-2", prompt="a cat")
    assert caught.value.status_code == 502


def test_provider_absent_from_config(
    start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims
) -> None:
    del proxy_config["providers"]["fengyuan"]
    client = start_proxy(proxy_config).client()
    entries = {e["id"]: e for e in _listing(client)["data"]}
    assert {e["owned_by"] for e in entries.values()} == {"xffuw"}
    assert not FENGYUAN_ONLY & set(entries)
    assert not any(i.startswith("fengyuan/") for i in entries)
    # the id no other upstream shares any more is listed plain
    assert entries[SHARED]["owned_by"] == "xffuw"
    for model_id in ("fengyuan/image_generation", "product_photo"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(model_id)
        error = sdk_error_body(caught.value)
        assert (error["code"], error["param"]) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="fengyuan/image_generation", prompt="a cat")
    assert sdk_error_body(caught.value)["code"] == "model_not_found"
    assert sims.fengyuan.calls == []


@pytest.mark.parametrize("path", ["/models", "/models/gpt-4o-mini"])
def test_models_need_a_client_key(proxy: RunningProxy, sims: Sims, path: str) -> None:
    reply = httpx.get(proxy.base_url + path)
    assert reply.status_code == 401
    validate_error(reply.json())
    assert reply.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as caught:
        proxy.client(api_key="sk-not-a-client").models.list()
    assert sdk_error_body(caught.value)["code"] == "invalid_api_key"
    assert sims.xffuw.count("models") == 0
