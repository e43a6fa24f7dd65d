"""LlamaIndex's OpenAILike: /v1/completions with its defaults, chat with is_chat_model=True."""

from __future__ import annotations

import asyncio

import openai
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

from proxy.sim.xffuw import CHAT_PREFIX


def _openai_like(proxy: RunningProxy, **options: object) -> OpenAILike:
    return OpenAILike(model=str(options.pop("model", "gpt-4o-mini")), api_base=proxy.base_url, api_key=CLIENT_KEY,
                      max_retries=0, **options)


def test_defaults_use_the_legacy_completions_endpoint(proxy: RunningProxy, sims: Sims) -> None:
    llm = _openai_like(proxy)
    reply = llm.complete("Once upon a time")
    assert reply.text == CHAT_PREFIX + "Once upon a time"
    assert reply.raw is not None and reply.raw.object == "text_completion"  # answered by /v1/completions
    assert sims.xffuw.last_chat_body is not None
    assert sims.xffuw.last_chat_body["messages"] == [{"role": "user", "content": "Once upon a time"}]
    streamed = "".join(part.delta or "" for part in llm.stream_complete("streamed prompt"))
    assert streamed == CHAT_PREFIX + "streamed prompt"
    assert asyncio.run(llm.acomplete("async")).text == CHAT_PREFIX + "async"


def test_chat_model_complete_chat_stream_chat_achat(proxy: RunningProxy, sims: Sims) -> None:
    llm = _openai_like(proxy, is_chat_model=True)
    completed = llm.complete("你好")
    assert completed.text == CHAT_PREFIX + "你好"
    assert completed.raw is not None and completed.raw.object == "chat.completion"
    history = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="Hello")]
    reply = llm.chat(history)
    assert reply.message.role == "assistant" and reply.message.content == CHAT_PREFIX + "Hello"
    assert sims.xffuw.last_chat_body is not None
    assert sims.xffuw.last_chat_body["messages"] == [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "Hello"}]
    parts = list(llm.stream_chat([ChatMessage(role="user", content="a prompt long enough to stream")]))
    assert len(parts) > 2
    assert parts[-1].message.content == CHAT_PREFIX + "a prompt long enough to stream"
    reply = asyncio.run(llm.achat([ChatMessage(role="user", content="async chat")]))
    assert reply.message.content == CHAT_PREFIX + "async chat"


def test_unknown_model_raises_the_sdk_error(proxy: RunningProxy, sims: Sims) -> None:
    with pytest.raises(openai.NotFoundError):
        _openai_like(proxy, model="no-such-model", is_chat_model=True).chat([ChatMessage(role="user", content="hi")])
