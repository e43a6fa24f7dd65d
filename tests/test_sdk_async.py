"""The official SDK's async client against the proxy: every surface, and each error class of
the error table (README: Errors)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from conftest import RunningProxy, Sims
from openai_spec import validate_error

from proxy.sim.assets import PNG_BYTES
from proxy.sim.xffuw import CHAT_PREFIX

PUBLIC_URL = "https://proxy.example.test"
USER = [{"role": "user", "content": "你好"}]
pytestmark = pytest.mark.usefixtures("fast_sim_tasks")  # tests/conftest.py


def test_every_surface_through_the_async_client(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["server"] = {"public_url": PUBLIC_URL}
    proxy = start_proxy(proxy_config)

    async def main() -> None:
        async with proxy.async_client() as client:
            chat = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
            assert chat.choices[0].message.content == CHAT_PREFIX + "你好"
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True,
                                                          stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHAT_PREFIX + "你好"
            assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

            image = await client.images.generate(model="dall-e-3", prompt="a cat")
            assert image.data and image.data[0].url and image.data[0].url.startswith(sims.xffuw_url)
            edited = await client.images.edit(image=("cat.png", PNG_BYTES, "image/png"), prompt="blue",
                                              model="dall-e-3")
            assert edited.data and edited.data[0].url
            assert sims.xffuw.last_image_body is not None
            assert sims.xffuw.last_image_body["images"][0].startswith(PUBLIC_URL + "/v1/files/uploads/")
            by_url = await client.post("/images/edits", cast_to=openai.types.ImagesResponse,
                                       body={"images": [{"image_url": "https://img.example.test/a.png"}],
                                             "prompt": "blue", "model": "dall-e-3"})
            assert by_url.data
            assert sims.xffuw.last_image_body["images"] == ["https://img.example.test/a.png"]

            models = [m.id async for m in client.models.list()]
            assert "gpt-4o-mini" in models and "product_photo" in models
            assert (await client.models.retrieve("gpt-4o-mini")).owned_by == "xffuw"

            first = await client.responses.create(model="gpt-4o-mini", input="first")
            assert first.output_text == CHAT_PREFIX + "first"
            events = await client.responses.create(model="gpt-4o-mini", input="second", stream=True,
                                                   previous_response_id=first.id)
            kinds, text = [], ""
            async for event in events:
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
            assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
            assert text == CHAT_PREFIX + "second"
            assert sims.xffuw.last_chat_body is not None and len(sims.xffuw.last_chat_body["messages"]) == 3

            completion = await client.completions.create(model="gpt-4o-mini", prompt="legacy")
            assert completion.choices[0].text == CHAT_PREFIX + "legacy"
            pieces = await client.completions.create(model="gpt-4o-mini", prompt="legacy", stream=True)
            assert "".join([c.choices[0].text async for c in pieces]) == CHAT_PREFIX + "legacy"

    asyncio.run(main())


@dataclass
class Case:
    exc: type[openai.APIStatusError]
    status: int
    code: str | None
    call: Callable[[openai.AsyncOpenAI], Awaitable[Any]]
    setup: Callable[[dict[str, Any], Sims], None] = lambda config, sims: None
    api_key: str | None = None


def _chat(model: str = "gpt-4o-mini", content: str = "你好") -> Callable[[openai.AsyncOpenAI], Awaitable[Any]]:
    return lambda c: c.chat.completions.create(model=model, messages=[{"role": "user", "content": content}])


def _image(model: str = "gpt-image-2", prompt: str = "猫") -> Callable[[openai.AsyncOpenAI], Awaitable[Any]]:
    return lambda c: c.images.generate(model=model, prompt=prompt)


def _no_balance(config: dict[str, Any], sims: Sims) -> None:
    for key in sims.xffuw.keys:
        sims.xffuw.keys[key] = 0.0


def _one_request_per_minute(config: dict[str, Any], sims: Sims) -> None:
    config["clients"][0]["rpm"] = 1


async def _twice(client: openai.AsyncOpenAI) -> Any:
    await client.models.list()
    return await client.models.list()


def _allow_only_mini(config: dict[str, Any], sims: Sims) -> None:
    config["clients"][0]["models"] = ["gpt-4o-mini"]


def _short_tasks(config: dict[str, Any], sims: Sims) -> None:
    config["tasks"] = {"poll_interval": 0.1, "first_poll": 0.05, "timeout": 0.5}


def _broken_upstream(config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.faults.error_rate = 1.0


def _unknown_keys(config: dict[str, Any], sims: Sims) -> None:
    config["providers"]["xffuw"]["keys"] = ["xf_unknown_to_sim_1"]


CASES = {
    "400 invalid field": Case(openai.BadRequestError, 400, "model_not_supported", _chat(model="gpt-image-2")),
    "400 content policy": Case(openai.BadRequestError, 400, "content_policy_violation", _chat(content="[blocked] x")),
    "401 unknown key": Case(openai.AuthenticationError, 401, "invalid_api_key", _chat(), api_key="sk-who-is-this"),
    "403 model not allowed": Case(openai.PermissionDeniedError, 403, "model_not_allowed", _chat("deepseek-chat"),
                                  _allow_only_mini),
    "404 unknown model": Case(openai.NotFoundError, 404, "model_not_found", _chat("no-such-model")),
    "404 unknown route": Case(openai.NotFoundError, 404, "not_found", lambda c: c.get("/nowhere", cast_to=object)),
    "429 insufficient quota": Case(openai.RateLimitError, 429, "insufficient_quota", _chat(), _no_balance),
    "429 rate limited": Case(openai.RateLimitError, 429, "rate_limit_exceeded", _twice, _one_request_per_minute),
    "502 task failed": Case(openai.InternalServerError, 502, "upstream_task_failed", _image(prompt="[fail] 猫")),
    "502 upstream error": Case(openai.InternalServerError, 502, "upstream_error", _chat(), _broken_upstream),
    "503 no upstream key": Case(openai.InternalServerError, 503, "no_upstream_key", _chat("xffuw/gpt-4o-mini"),
                                _unknown_keys),
    "504 task timeout": Case(openai.InternalServerError, 504, "upstream_timeout", _image(prompt="[never] 猫"),
                             _short_tasks),
}


@pytest.mark.parametrize("name", list(CASES))
def test_error_classes_through_the_async_client(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                proxy_config: dict[str, Any], sims: Sims, name: str) -> None:
    case = CASES[name]
    case.setup(proxy_config, sims)
    proxy = start_proxy(proxy_config)

    async def main() -> openai.APIStatusError:
        options = {"api_key": case.api_key} if case.api_key else {}
        async with proxy.async_client(**options) as client:
            with pytest.raises(case.exc) as caught:
                await case.call(client)
        return caught.value

    exc = asyncio.run(main())
    assert exc.status_code == case.status
    body = exc.response.json()
    validate_error(body)
    assert body["error"]["code"] == case.code
    assert exc.code == case.code
