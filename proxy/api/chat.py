"""POST /v1/chat/completions: OpenAI's chat, plain and streamed, filled in where upstreams are terse."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from proxy.api.common import authenticate, first_answer, hold_budget, json_body, json_response, note, runtime
from proxy.clients import check_model
from proxy.errors import ProxyError, bad_request
from proxy.gateway import ChatResult
from proxy.openai import sse
from proxy.openai.decode import convert
from proxy.openai.errors import error_payload
from proxy.openai.openapi import documented
from proxy.openai.types import (
    CHAT_OWN_FIELDS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ToolCall,
    Usage,
)
from proxy.openai.usage import prompt_tokens, text_tokens
from proxy.providers.base import ChatCall
from proxy.router import Route

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 8
STREAM_PIECE = 24  # characters per streamed content chunk


def check_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise bad_request("'messages' must contain at least one message.", param="messages")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"Invalid value for 'messages[{i}].role': expected one of {sorted(ROLES)}.",
                              param=f"messages[{i}].role")
        content = message.get("content")
        if content is None and role in ("system", "developer", "user"):
            raise bad_request(f"Missing required parameter: 'messages[{i}].content'.",
                              param=f"messages[{i}].content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(f"Invalid type for 'messages[{i}].content': expected a string or an array "
                              "of content parts.", param=f"messages[{i}].content")


def check_route(route: Route, endpoint: str) -> None:
    kind = route.model.kind if route.model else None
    if endpoint == "chat" and kind not in (None, "chat"):
        raise bad_request(f"The model '{route.public_id}' is an {kind} model and does not support chat "
                          "completions; use /v1/images/generations.", param="model", code="model_not_supported")


def _usage(request: ChatCompletionRequest, results: list[ChatResult]) -> Usage:
    first = results[0].answer
    prompt = first.prompt_tokens if first.prompt_tokens is not None else prompt_tokens(request.messages)
    completion = 0
    for result in results:
        answer = result.answer
        completion += (answer.completion_tokens if answer.completion_tokens is not None
                       else text_tokens(answer.content or "") + 3)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finish(result: ChatResult) -> str:
    answer = result.answer
    if answer.finish_reason in ("stop", "length", "tool_calls", "content_filter", "function_call"):
        return answer.finish_reason
    return "tool_calls" if answer.tool_calls else "stop"


def _tool_calls(result: ChatResult) -> list[ToolCall] | None:
    calls = result.answer.tool_calls
    if not calls:
        return None
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        out.append(ToolCall(id=str(call.get("id") or f"call_{i}_{secrets.token_hex(6)}"), type="function",
                            function={"name": str(function.get("name", "")),  # type: ignore[arg-type]
                                      "arguments": str(function.get("arguments", "{}"))}))
    return out


STREAM_NOTE = ("With stream=true: `data: <ChatCompletionChunk>` events, a last chunk with choices [] and usage "
               "when stream_options.include_usage, then `data: [DONE]`.")


@post("/v1/chat/completions", status_code=200,
      **documented(ChatCompletion, body=ChatCompletionRequest, stream=STREAM_NOTE))
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    caller = authenticate(request)
    raw = await json_body(request)
    body = convert(raw, ChatCompletionRequest)
    check_messages(body.messages)
    if not 1 <= body.n <= MAX_N:
        raise bad_request(f"Invalid value for 'n': must be between 1 and {MAX_N}.", param="n")
    note(request, model=body.model)
    gateway = runtime(request).gateway
    route = await gateway.catalogue.resolve(body.model)
    note(request, upstream=route.provider.name)
    check_route(route, "chat")
    check_model(caller, route)
    await hold_budget(request, caller, route, body.n)
    call = ChatCall(model=route.upstream_model, messages=body.messages,
                    params={k: v for k, v in raw.items() if k not in CHAT_OWN_FIELDS})
    completion_id = "chatcmpl-" + secrets.token_urlsafe(18)
    created = int(time.time())
    if body.stream:
        calls = [asyncio.ensure_future(gateway.chat(route, call, caller)) for _ in range(body.n)]
        first = await first_answer(calls)  # answers for n > 1 are awaited inside the stream
        note(request, key=first.key.fingerprint)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return Stream(_stream(completion_id, created, body, calls, include_usage),
                      media_type="text/event-stream", headers=sse.HEADERS)
    if body.n == 1:  # the common case: no task to create
        results = [await gateway.chat(route, call, caller)]
    else:
        results = list(await asyncio.gather(*(gateway.chat(route, call, caller) for _ in range(body.n))))
    note(request, key=results[0].key.fingerprint)
    choices = [Choice(index=i, message=AssistantMessage(role="assistant", content=r.answer.content, refusal=None,
                                                        tool_calls=_tool_calls(r)),
                      finish_reason=_finish(r), logprobs=None) for i, r in enumerate(results)]
    return json_response(ChatCompletion(id=completion_id, object="chat.completion", created=created,
                                        model=body.model, choices=choices, usage=_usage(body, results)))


async def _stream(completion_id: str, created: int, body: ChatCompletionRequest,
                  calls: list[asyncio.Future[ChatResult]], include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChunkChoice], chunk_usage: Usage | None = None) -> bytes:
        return sse.event(ChatCompletionChunk(id=completion_id, object="chat.completion.chunk", created=created,
                                             model=body.model, choices=choices, usage=chunk_usage))

    results: list[ChatResult] = []
    try:
        for i, pending in enumerate(calls):
            result = await pending
            results.append(result)
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""), finish_reason=None)])
            content = result.answer.content or ""
            for start in range(0, len(content), STREAM_PIECE):
                piece = content[start:start + STREAM_PIECE]
                yield chunk([ChunkChoice(index=i, delta=Delta(content=piece), finish_reason=None)])
            tool_calls = _tool_calls(result)
            if tool_calls:
                deltas = [{"index": n, "id": c.id, "type": "function",
                           "function": {"name": c.function.name, "arguments": c.function.arguments}}
                          for n, c in enumerate(tool_calls)]
                yield chunk([ChunkChoice(index=i, delta=Delta(tool_calls=deltas), finish_reason=None)])
            yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=_finish(result))])
        if include_usage:
            yield chunk([], _usage(body, results))
    except ProxyError as error:  # once the stream began, an error can only travel inside it
        yield sse.event(error_payload(error))
    finally:
        for pending in calls:
            pending.cancel()
    yield sse.DONE
