"""POST /v1/completions (legacy): prompts become user messages, answers text_completion."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from openai_spec import validate_completion, validate_completion_stream, validate_error

from proxy.sim.xffuw import CHAT_PREFIX

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}


def _post_completion(proxy: RunningProxy, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/completions", headers=AUTH, json=body, timeout=30)


def _stream(proxy: RunningProxy, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{proxy.base_url}/completions", headers=AUTH, json={**body, "stream": True},
                      timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_prompt_is_one_user_message_and_sampling_fields_pass_through(proxy: RunningProxy, sims: Sims) -> None:
    reply = _post_completion(proxy, {"model": "gpt-4o-mini", "prompt": "Say hi", "max_tokens": 20, "temperature": 0.2,
                          "stop": ["\n"], "top_p": 0.5, "seed": 3, "best_of": 1, "echo": False})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    validate_completion(body)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "gpt-4o-mini"
    assert body["choices"] == [{"text": CHAT_PREFIX + "Say hi", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    sent = sims.xffuw.last_chat_body
    assert sent is not None
    assert sent["messages"] == [{"role": "user", "content": "Say hi"}]
    assert (sent["max_tokens"], sent["temperature"], sent["stop"], sent["top_p"], sent["seed"]) == (20, 0.2, ["\n"],
                                                                                                     0.5, 3)
    assert not {"prompt", "echo", "best_of", "stream", "n"} & set(sent)


def test_prompt_list_gives_one_choice_per_prompt_and_n(proxy: RunningProxy, sims: Sims) -> None:
    reply = _post_completion(proxy, {"model": "gpt-4o-mini", "prompt": ["one", "two"], "n": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    validate_completion(body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [CHAT_PREFIX + p for p in ("one", "one", "two", "two")]
    assert sims.xffuw.count("chat") == 4


def test_stream_sends_text_completion_chunks_usage_and_done(proxy: RunningProxy, sims: Sims) -> None:
    prompt = "a longer prompt so that the answer needs several chunks"
    chunks = _stream(proxy, {"model": "my-chat", "prompt": prompt, "stream_options": {"include_usage": True}})
    validate_completion_stream(chunks)
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len(chunks) > 3
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == CHAT_PREFIX + prompt
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_stream_of_two_prompts_without_usage(proxy: RunningProxy, sims: Sims) -> None:
    chunks = _stream(proxy, {"model": "gpt-4o-mini", "prompt": ["a", "b"]})
    validate_completion_stream(chunks)
    assert all("usage" not in c for c in chunks)
    texts = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)}
    assert texts == {0: CHAT_PREFIX + "a", 1: CHAT_PREFIX + "b"}


def test_sdk_completions_plain_and_stream(client: openai.OpenAI, sims: Sims) -> None:
    result = client.completions.create(model="gpt-4o-mini", prompt="hello", max_tokens=16)
    assert result.object == "text_completion"
    assert result.choices[0].text == CHAT_PREFIX + "hello"
    assert result.usage is not None and result.usage.total_tokens > 0
    stream = client.completions.create(model="gpt-4o-mini", prompt="hello", stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == CHAT_PREFIX + "hello"


# (extra fields, param the 400 must name, words its message must contain)
BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"echo": True}, "echo", "echo"),
    ({"logprobs": 2}, "logprobs", "logprobs"),
    ({"logprobs": 0}, "logprobs", "logprobs"),
    ({"suffix": "end"}, "suffix", "suffix"),
    ({"best_of": 3}, "best_of", "best_of"),
    ({"prompt": [1, 2, 3]}, "prompt", "Token ids"),
    ({"prompt": [[1, 2], [3]]}, "prompt", "Token ids"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": ["ok", {"x": 1}]}, "prompt[1]", "string"),
    ({"prompt": None}, "prompt", "Missing"),
    ({"n": 0}, "n", "between"),
    ({"temperature": "hot"}, "temperature", "temperature"),
]


def test_unsupported_or_bad_fields_are_a_400_naming_the_field(proxy: RunningProxy, sims: Sims) -> None:
    # One proxy for the whole table: starting one per case would cost more than the cases.
    for extra, param, words in BAD_REQUESTS:
        reply = _post_completion(proxy, {"model": "gpt-4o-mini", "prompt": "hi", **extra})
        assert reply.status_code == 400, (extra, reply.text)
        body = reply.json()
        validate_error(body)
        assert body["error"]["param"] == param, (extra, body)
        assert words in body["error"]["message"], (extra, body)
        assert body["error"]["type"] == "invalid_request_error"
    assert sims.xffuw.count("chat") == 0


def test_image_model_is_refused(client: openai.OpenAI, sims: Sims) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="gpt-image-2", prompt="hi")
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert caught.value.code == "model_not_supported"


def test_the_refusal_names_the_model_kind_with_its_article(client: openai.OpenAI, sims: Sims) -> None:
    for model, words in (("gpt-image-2", "is an image model"), ("fengyuan/image-video", "is a video model")):
        with pytest.raises(openai.BadRequestError) as completion:
            client.completions.create(model=model, prompt="hi")
        with pytest.raises(openai.BadRequestError) as chat:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        for caught in (completion, chat):
            assert words in caught.value.message, caught.value.message
