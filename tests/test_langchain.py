"""LangChain's ChatOpenAI (chat completions and the Responses API) and DallEAPIWrapper."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from proxy.sim.xffuw import CHAT_PREFIX


def _chat_openai(proxy: RunningProxy, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(model=options.pop("model", "gpt-4o-mini"), base_url=proxy.base_url, api_key=CLIENT_KEY,
                      max_retries=0, **options)


def _sum(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def test_invoke_sends_the_messages_and_reads_usage(proxy: RunningProxy, sims: Sims) -> None:
    reply = _chat_openai(proxy, temperature=0.2).invoke([SystemMessage("be brief"), HumanMessage("你好")])
    assert isinstance(reply, AIMessage) and reply.content == CHAT_PREFIX + "你好"
    assert reply.usage_metadata is not None and reply.usage_metadata["total_tokens"] > 0
    assert reply.response_metadata["finish_reason"] == "stop"
    assert sims.xffuw.last_chat_body is not None
    assert sims.xffuw.last_chat_body["messages"] == [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "你好"}]
    assert sims.xffuw.last_chat_body["temperature"] == 0.2


@pytest.mark.parametrize("stream_usage", [True, False])
def test_stream_with_and_without_usage(proxy: RunningProxy, sims: Sims, stream_usage: bool) -> None:
    chunks = list(_chat_openai(proxy, stream_usage=stream_usage).stream("a prompt long enough for several chunks"))
    assert len(chunks) > 2
    total = _sum(chunks)
    assert total.content == CHAT_PREFIX + "a prompt long enough for several chunks"
    if stream_usage:
        assert total.usage_metadata is not None and total.usage_metadata["total_tokens"] > 0
    else:
        assert total.usage_metadata is None


def test_batch_and_ainvoke(proxy: RunningProxy, sims: Sims) -> None:
    llm = _chat_openai(proxy, stream_usage=True)
    replies = llm.batch(["one", "two", "three"])
    assert [r.content for r in replies] == [CHAT_PREFIX + p for p in ("one", "two", "three")]
    assert sims.xffuw.count("chat") == 3
    reply = asyncio.run(llm.ainvoke("async"))
    assert reply.content == CHAT_PREFIX + "async"
    assert reply.usage_metadata is not None


def test_responses_api_conversation_invoke_and_stream(proxy: RunningProxy, sims: Sims) -> None:
    llm = _chat_openai(proxy, use_responses_api=True)
    history = [SystemMessage("You are terse."), HumanMessage("first"), AIMessage("an earlier answer"),
               HumanMessage("second")]
    reply = llm.invoke(history)
    assert reply.text == CHAT_PREFIX + "second"
    assert str(reply.response_metadata["id"]).startswith("resp_")
    assert reply.usage_metadata is not None and reply.usage_metadata["total_tokens"] > 0
    assert sims.xffuw.last_chat_body is not None
    assert sims.xffuw.last_chat_body["messages"] == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an earlier answer"}, {"role": "user", "content": "second"}]
    chunks = list(llm.stream("streamed through responses"))
    assert _sum(chunks).text == CHAT_PREFIX + "streamed through responses"


def test_responses_api_with_a_tool_is_a_clear_400(proxy: RunningProxy, sims: Sims) -> None:
    llm = _chat_openai(proxy, use_responses_api=True).bind_tools([{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError) as caught:
        llm.invoke("search the web")
    assert caught.value.body["param"] == "tools[0].type"  # type: ignore[index]
    assert sims.xffuw.count("chat") == 0


def test_unknown_model_raises_the_sdk_error(proxy: RunningProxy, sims: Sims) -> None:
    with pytest.raises(openai.NotFoundError):
        _chat_openai(proxy, model="no-such-model").invoke("hi")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # langchain-community announces its sunset
def test_dalle_wrapper_returns_the_image_url(proxy: RunningProxy, sims: Sims) -> None:
    from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper

    sims.xffuw.task_seconds = 0.04
    dalle = DallEAPIWrapper(model="dall-e-3", base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0)
    url = dalle.run("a watercolor fox")
    assert url.startswith(sims.xffuw_url + "/files/xf-")
    assert sims.xffuw.last_image_body is not None
    assert sims.xffuw.last_image_body["prompt"] == "a watercolor fox"
