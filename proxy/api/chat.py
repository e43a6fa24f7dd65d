"""POST /v1/chat/completions: OpenAI's chat, plain and streamed, filled in where upstreams are terse."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, post
from litestar.response import Stream

from proxy.api.common import drop, first_answer, hold_budget, json_body, json_response, note, stream_failure
from proxy.api.completions import check_text_route
from proxy.api.dependencies import CallerDep, RuntimeDep
from proxy.clients import check_model
from proxy.clip import clip
from proxy.errors import Kind, ProxyError, bad_request
from proxy.gateway import ChatResult, StartedChat
from proxy.openai import sse
from proxy.openai.decode import convert
from proxy.openai.errors import error_payload
from proxy.openai.openapi import documented
from proxy.openai.responses import check_image_url
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
    ToolCallChunk,
    ToolCallChunkFunction,
    ToolCallFunction,
    Usage,
)
from proxy.openai.usage import prompt_tokens, text_tokens
from proxy.providers.base import ChatCall

log = structlog.get_logger("proxy")
_encode = msgspec.json.Encoder().encode

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 8
STREAM_PIECE = 24  # characters per streamed content chunk
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_CHOICES = ("auto", "none", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# The content part types OpenAI's spec takes in each role's message (a deprecated `function` message: text).
PART_TYPES = {"user": ("text", "image_url", "input_audio", "file"), "assistant": ("text", "refusal")}
# Each part type's own field: its name and type, and the type's name in an error message.
PART_FIELDS: dict[str, tuple[str, type, str]] = {
    "text": ("text", str, "a string"), "refusal": ("refusal", str, "a string"),
    "image_url": ("image_url", dict, "an object"), "input_audio": ("input_audio", dict, "an object"),
    "file": ("file", dict, "an object")}
# The string fields inside an object part, as OpenAI's spec has them: name, required, and the check of
# its value beyond being a string (None: any string). A file part needs file_data or file_id besides.
PART_OBJECT_FIELDS: dict[str, tuple[tuple[str, bool, Callable[[str, str], object] | None], ...]] = {
    "image_url": (("url", True, check_image_url),
                  ("detail", False, lambda value, where: _one_of(value, ("auto", "low", "high"), where))),
    "input_audio": (("data", True, None), ("format", True, lambda value, where: _one_of(value, ("wav", "mp3"), where))),
    "file": (("file_data", False, None), ("file_id", False, None), ("filename", False, None))}


def require(obj: dict[str, Any], field: str, kind: type, label: str, where: str) -> Any:
    """obj[field], which must be there and of this kind; `where` names obj in the error."""
    value = obj.get(field)
    if value is None:
        raise bad_request(f"Missing required parameter: '{where}.{field}'.", param=f"{where}.{field}")
    if not isinstance(value, kind):
        raise bad_request(f"Invalid type for '{where}.{field}': expected {label}.", param=f"{where}.{field}")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request(f"Invalid type for '{where}': expected an object.", param=where)
    return value


def _one_of(value: str, allowed: Sequence[str], where: str) -> None:
    if value not in allowed:
        raise bad_request(f"Invalid value for '{where}': '{clip(value, 80)}'; expected one of {list(allowed)}.",
                          param=where)


def check_function(function: dict[str, Any], where: str) -> str:
    """A function tool's name, description, parameters and strict (chat's `function`, or a Responses
    tool itself); its name."""
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        what = "Missing required parameter" if name is None else "Invalid value for"
        raise bad_request(f"{what} '{where}.name': expected a name of 1 to 64 letters, digits, '_' or '-'.",
                          param=f"{where}.name")
    for field, kinds, label in (("parameters", dict, "a JSON schema object"), ("strict", bool, "a boolean"),
                                ("description", str, "a string")):
        if function.get(field) is not None and not isinstance(function[field], kinds):
            raise bad_request(f"Invalid type for '{where}.{field}': expected {label}.", param=f"{where}.{field}")
    return name


def _check_parts(parts: list[Any], role: str, where: str) -> None:
    allowed = PART_TYPES.get(role, ("text",))
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        kind = require(_object(part, here), "type", str, "a string", here)
        _one_of(kind, allowed, f"{here}.type")
        inner = require(part, *PART_FIELDS[kind], here)
        for field, required, check in PART_OBJECT_FIELDS.get(kind, ()):
            if required or inner.get(field) is not None:
                value = require(inner, field, str, "a string", f"{here}.{kind}")
                if check is not None:
                    check(value, f"{here}.{kind}.{field}")
        if kind == "file" and inner.get("file_data") is None and inner.get("file_id") is None:
            raise bad_request(f"Missing required parameter: '{here}.file' needs 'file_data' or 'file_id'.",
                              param=f"{here}.file")


def _check_tool_calls(calls: Any, where: str) -> None:
    """An assistant message's earlier tool calls, as OpenAI's spec has them."""
    if not isinstance(calls, list):
        raise bad_request(f"Invalid type for '{where}': expected an array of tool calls.", param=where)
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        kind = require(_object(call, here), "type", str, "a string", here)
        _one_of(kind, ("function", "custom"), f"{here}.type")
        require(call, "id", str, "a string", here)
        body = require(call, kind, dict, "an object", here)
        require(body, "name", str, "a string", f"{here}.{kind}")
        require(body, "arguments" if kind == "function" else "input", str, "a string", f"{here}.{kind}")


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
        if isinstance(content, list):
            _check_parts(content, role, f"messages[{i}].content")
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"Invalid type for 'messages[{i}].content': expected a string or an array "
                              "of content parts.", param=f"messages[{i}].content")
        if message.get("tool_calls") is not None:
            _check_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")


def check_tools(tools: list[dict[str, Any]] | None) -> None:
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        kind = require(tool, "type", str, "a string", where)
        _one_of(kind, ("function", "custom"), f"{where}.type")
        if kind == "function":
            check_function(require(tool, "function", dict, "an object", where), f"{where}.function")
        else:
            require(require(tool, "custom", dict, "an object", where), "name", str, "a string", f"{where}.custom")


def check_tool_choice(choice: str | dict[str, Any] | None) -> None:
    if isinstance(choice, str):
        _one_of(choice, TOOL_CHOICES, "tool_choice")
    elif choice is not None:
        kind = require(choice, "type", str, "a string", "tool_choice")
        _one_of(kind, ("function", "custom", "allowed_tools"), "tool_choice.type")
        named = require(choice, kind, dict, "an object", "tool_choice")
        if kind != "allowed_tools":
            require(named, "name", str, "a string", f"tool_choice.{kind}")


def check_response_format(form: dict[str, Any] | None) -> None:
    if form is None:
        return
    kind = require(form, "type", str, "a string", "response_format")
    _one_of(kind, RESPONSE_FORMATS, "response_format.type")
    if kind == "json_schema":
        require(require(form, "json_schema", dict, "an object", "response_format"), "name", str, "a string",
                "response_format.json_schema")


def _usage(request: ChatCompletionRequest, results: list[ChatResult]) -> Usage:
    first = results[0].answer
    prompt = first.prompt_tokens if first.prompt_tokens is not None else prompt_tokens(request.messages)
    completion = 0
    for result in results:
        answer = result.answer
        calls = "".join(c.function.name + c.function.arguments for c in tool_calls_of(result) or ())
        completion += (answer.completion_tokens if answer.completion_tokens is not None
                       else text_tokens((answer.content or "") + calls) + 3)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finish(result: ChatResult) -> str:
    answer = result.answer
    if answer.tool_calls and answer.finish_reason in (None, "stop"):
        return "tool_calls"  # some upstreams say stop; OpenAI's clients look for tool_calls
    if answer.finish_reason in ("stop", "length", "tool_calls", "content_filter", "function_call"):
        return answer.finish_reason
    return "tool_calls" if answer.tool_calls else "stop"


def tool_calls_of(result: ChatResult) -> list[ToolCall] | None:
    """The upstream's tool calls in OpenAI's shape: arguments as a JSON string, an id for each."""
    calls = result.answer.tool_calls
    if not calls:
        return None
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str) or not name:
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{result.key.provider} answered a tool call without a "
                             "function name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):  # some upstreams send the object itself
            arguments = "{}" if arguments is None else _encode(arguments).decode()
        ident = call.get("id")
        out.append(ToolCall(id=ident if isinstance(ident, str) and ident else "call_" + secrets.token_hex(12),
                            type="function", function=ToolCallFunction(name=name, arguments=arguments)))
    return out


def _tool_call_deltas(calls: list[ToolCall]) -> list[list[ToolCallChunk]]:
    """As OpenAI streams tool calls: per call, one delta with its id, type, name and empty
    arguments, then the arguments in pieces carrying only the index."""
    deltas = []
    for index, call in enumerate(calls):
        deltas.append([ToolCallChunk(index=index, id=call.id, type="function",
                                     function=ToolCallChunkFunction(name=call.function.name, arguments=""))])
        arguments = call.function.arguments
        for at in range(0, len(arguments), STREAM_PIECE):
            piece = ToolCallChunkFunction(arguments=arguments[at:at + STREAM_PIECE])
            deltas.append([ToolCallChunk(index=index, function=piece)])
    return deltas


STREAM_NOTE = ("With stream=true: `data: <ChatCompletionChunk>` events, a last chunk with choices [] and usage "
               "when stream_options.include_usage, then `data: [DONE]`.")


@post("/v1/chat/completions", status_code=200,
      **documented(ChatCompletion, body=ChatCompletionRequest, stream=STREAM_NOTE))
async def chat_completions(request: Request[Any, Any, Any], caller: CallerDep,
                           runtime: RuntimeDep) -> Response[bytes] | Stream:
    gateway = runtime.gateway
    raw = await json_body(request)
    body = convert(raw, ChatCompletionRequest)
    check_messages(body.messages)
    check_tools(body.tools)
    check_tool_choice(body.tool_choice)
    check_response_format(body.response_format)
    if not 1 <= body.n <= MAX_N:
        raise bad_request(f"Invalid value for 'n': must be between 1 and {MAX_N}.", param="n")
    note(request, model=body.model)
    route = await gateway.catalogue.resolve(body.model)
    note(request, upstream=route.provider.name)
    check_text_route(route, "chat completions")
    check_model(caller, route)
    await hold_budget(request, caller, route, body.n)
    call = ChatCall(model=route.upstream_model, messages=body.messages,
                    params={k: v for k, v in raw.items() if k not in CHAT_OWN_FIELDS})
    completion_id = "chatcmpl-" + secrets.token_urlsafe(18)
    created = int(time.time())
    if body.stream:
        calls = gateway.start_chats(route, [call] * body.n, caller)
        first = await first_answer(calls)  # answers for n > 1 are awaited inside the stream
        note(request, key=first.key.fingerprint)
        try:
            tool_calls_of(first)  # an answer that cannot be streamed is an HTTP error while that is possible
        except ProxyError:
            drop(calls)
            raise
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return Stream(_stream(request, completion_id, created, body, calls, include_usage),
                      media_type="text/event-stream", headers=sse.HEADERS)
    if body.n == 1:  # the common case: no task to create
        results = [await gateway.chat(route, call, caller)]
    else:
        results = list(await asyncio.gather(*(gateway.chat(route, call, caller) for _ in range(body.n))))
    note(request, key=results[0].key.fingerprint)
    choices = [Choice(index=i, message=AssistantMessage(role="assistant", content=r.answer.content, refusal=None,
                                                        tool_calls=tool_calls_of(r)),
                      finish_reason=_finish(r), logprobs=None) for i, r in enumerate(results)]
    return json_response(ChatCompletion(id=completion_id, object="chat.completion", created=created,
                                        model=body.model, choices=choices, usage=_usage(body, results)))


async def _stream(request: Request[Any, Any, Any], completion_id: str, created: int, body: ChatCompletionRequest,
                  calls: Sequence[StartedChat], include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChunkChoice], chunk_usage: Usage | None = None) -> bytes:
        return sse.event(ChatCompletionChunk(id=completion_id, object="chat.completion.chunk", created=created,
                                             model=body.model, choices=choices, usage=chunk_usage))

    results: list[ChatResult] = []
    try:
        for i, pending in enumerate(calls):
            result = await asyncio.shield(pending.run)  # its client gone, a call sent still ends recorded
            results.append(result)
            content = result.answer.content or ""
            tool_calls = tool_calls_of(result)
            # OpenAI opens a tool-call answer with the role alone (its content is null)
            opening = Delta(role="assistant") if tool_calls and not content else Delta(role="assistant", content="")
            yield chunk([ChunkChoice(index=i, delta=opening, finish_reason=None)])
            for start in range(0, len(content), STREAM_PIECE):
                piece = content[start:start + STREAM_PIECE]
                yield chunk([ChunkChoice(index=i, delta=Delta(content=piece), finish_reason=None)])
            for delta in _tool_call_deltas(tool_calls or []):
                yield chunk([ChunkChoice(index=i, delta=Delta(tool_calls=delta), finish_reason=None)])
            yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=_finish(result))])
        if include_usage:
            yield chunk([], _usage(body, results))
    except Exception as error:  # once the stream began, an error can only travel inside it
        yield sse.event(error_payload(stream_failure(request, error)))
    finally:
        drop(calls)  # its client gone: calls not sent yet are cancelled, sent ones end recorded
    yield sse.DONE
