"""Chat completions through the proxy with the official SDK, plain and streamed."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from openai_spec import validate, validate_chat_stream, validate_error

USER = [{"role": "user", "content": "你好"}]


def test_plain_chat_fills_in_every_openai_field(proxy: RunningProxy, sims: Sims) -> None:
    reply = httpx.post(f"{proxy.base_url}/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                       json={"model": "gpt-4o-mini", "messages": USER})
    assert reply.status_code == 200
    assert reply.headers["x-request-id"].startswith("req_")
    body = reply.json()
    validate("CreateChatCompletionResponse", body)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "你好!我是 AI 助手。You said: 你好", "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_sdk_chat_passes_messages_and_sampling_fields_through(client: openai.OpenAI, sims: Sims) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "first"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    result = client.chat.completions.create(model="gpt-4o-mini", messages=messages, temperature=0.3, top_p=0.9,
                                            max_tokens=50, stop=["\n"], seed=7)
    assert result.choices[0].message.content.endswith("You said: second")
    sent = sims.xffuw.last_chat_body
    assert sent is not None
    assert sent["messages"] == messages
    sampling = (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"], sent["seed"])
    assert sampling == (0.3, 0.9, 50, ["\n"], 7)
    assert "stream" not in sent


def test_upstream_usage_is_used_when_given(client: openai.OpenAI, sims: Sims) -> None:
    sims.xffuw.chat_extra = {"usage": {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}}
    result = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (11, 22, 33)


def test_streamed_chat_sends_openai_chunks(proxy: RunningProxy, sims: Sims) -> None:
    chunks = []
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions",
                      headers={"authorization": f"Bearer {CLIENT_KEY}"},
                      json={"model": "gpt-4o-mini", "messages": USER, "stream": True,
                            "stream_options": {"include_usage": True}}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    validate_chat_stream(chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "你好!我是 AI 助手。You said: 你好"


def test_sdk_stream_without_usage(client: openai.OpenAI, sims: Sims) -> None:
    stream = client.chat.completions.create(model="my-chat", messages=USER, stream=True)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).endswith("You said: 你好")
    assert {c.model for c in chunks} == {"my-chat"}


def test_chat_for_an_image_model_is_a_400(client: openai.OpenAI, sims: Sims) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-image-2", messages=USER)
    validate_error(caught.value.body and {"error": caught.value.body})
    assert caught.value.body["param"] == "model"
    assert "image" in caught.value.message


def test_n_two_gives_two_choices(client: openai.OpenAI, sims: Sims) -> None:
    result = client.chat.completions.create(model="gpt-4o-mini", messages=USER, n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert sims.xffuw.count("chat") == 2
