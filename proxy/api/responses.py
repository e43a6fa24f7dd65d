"""POST /v1/responses, GET and DELETE /v1/responses/{id}: the Responses API over chat.

The input becomes chat messages (instructions first, then the stored conversation of
`previous_response_id`, then the new input); function tools become chat tools. The answer
becomes an output message and one function_call item per tool call. The conversation, calls
and their outputs included, is kept for a while for the client that created it (conversations.py).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import FromPath
from litestar.response import Stream

from proxy.api.chat import TOOL_CHOICES, check_function, tool_calls_of
from proxy.api.common import hold_budget, json_body, json_response, note, stream_failure
from proxy.api.completions import check_text_route
from proxy.api.dependencies import CallerDep, RuntimeDep
from proxy.clients import check_model
from proxy.clip import clip
from proxy.conversations import Conversations, Stored
from proxy.errors import Kind, ProxyError, bad_request
from proxy.openai import sse
from proxy.openai.decode import convert
from proxy.openai.errors import error_payload
from proxy.openai.openapi import documented
from proxy.openai.responses import (
    ContentPartAdded,
    ContentPartDone,
    ErrorEvent,
    FunctionCall,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionTool,
    InputTokensDetails,
    OutputItemAdded,
    OutputItemDone,
    OutputMessage,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    OutputTokensDetails,
    ResponseCompleted,
    ResponseCreated,
    ResponseInProgress,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
    called_ids,
    encode,
    input_messages,
    sse_event,
)
from proxy.openai.usage import prompt_tokens, text_tokens
from proxy.providers.base import ChatCall

STREAM_PIECE = 24  # characters per output_text.delta
_decode_messages = msgspec.json.Decoder(list[dict[str, Any]]).decode

STREAM_NOTE = ("With stream=true: `event: <type>` / `data: <event>` pairs: response.created, "
               "response.in_progress, then per output item response.output_item.added, for a message "
               "response.content_part.added, response.output_text.delta..., response.output_text.done, "
               "response.content_part.done, for a function call response.function_call_arguments.delta..., "
               "response.function_call_arguments.done, then response.output_item.done; last "
               "response.completed; each with a sequence_number.")


class Deleted(msgspec.Struct, kw_only=True):
    id: str
    object: str = "response"
    deleted: bool = True


def conversations(request: Request[Any, Any, Any]) -> Conversations:
    """The app's conversation store, made on first use."""
    state = request.app.state
    found = state.get("conversations")
    if found is None:
        found = state["conversations"] = Conversations(shared=request.app.state.runtime.shared)
    return found  # type: ignore[no-any-return]


def _refuse_unsupported(body: ResponseRequest) -> None:
    if body.background:
        raise bad_request("'background' is not supported by this proxy; send the request without it.",
                          param="background")
    if body.conversation is not None:
        raise bad_request("'conversation' is not supported by this proxy; continue a conversation with "
                          "'previous_response_id'.", param="conversation")


def function_tools(tools: list[Any] | None) -> list[FunctionTool]:
    """The request's tools, which must all be functions: the upstreams run no built-in tool."""
    found = []
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"Invalid value for '{where}': expected a tool object.", param=where)
        kind = tool.get("type")
        if kind is None:
            raise bad_request(f"Missing required parameter: '{where}.type'.", param=f"{where}.type")
        if kind != "function":
            raise bad_request(f"Tool type '{kind}' in '{where}' is not supported by this proxy: its upstreams "
                              "cannot run built-in tools. Only 'function' tools can be sent.",
                              param=f"{where}.type")
        name = check_function(tool, where)
        found.append(FunctionTool(name=name, description=tool.get("description"), parameters=tool.get("parameters"),
                                  strict=tool.get("strict")))
    return found


def _chat_tool_choice(choice: str | dict[str, Any] | None, tools: list[FunctionTool]) -> str | dict[str, Any] | None:
    """Responses' tool_choice in chat's form."""
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise bad_request(f"Invalid value for 'tool_choice': expected one of {list(TOOL_CHOICES)} or a "
                              "function.", param="tool_choice")
        if choice == "required" and not tools:
            raise bad_request("'tool_choice' is 'required' but no function tools were sent in 'tools'.",
                              param="tool_choice")
        return choice
    if choice.get("type") != "function":
        raise bad_request(f"Invalid value for 'tool_choice.type': '{choice.get('type')}' is not supported by this "
                          "proxy, whose upstreams run function tools only.", param="tool_choice.type")
    name = choice.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request("Missing required parameter: 'tool_choice.name'.", param="tool_choice.name")
    if name not in {tool.name for tool in tools}:
        raise bad_request(f"'tool_choice' names the function '{name}', which is not in 'tools'.",
                          param="tool_choice.name")
    return {"type": "function", "function": {"name": name}}


def _chat_tools(tools: list[FunctionTool]) -> list[dict[str, Any]]:
    chat = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name}
        function.update({k: v for k, v in (("description", tool.description), ("parameters", tool.parameters),
                                           ("strict", tool.strict)) if v is not None})
        chat.append({"type": "function", "function": function})
    return chat


def _chat_response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """Responses' `text.format` as chat's `response_format` (None: plain text)."""
    if text is None or "format" not in text:
        return None
    form = text["format"]
    if not isinstance(form, dict):
        raise bad_request("Invalid type for 'text.format': expected an object.", param="text.format")
    kind = form.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request(f"Invalid value for 'text.format.type': '{clip(str(kind), 80)}'; expected one of "
                          "'text', 'json_object', 'json_schema'.", param="text.format.type")
    for field, wanted in (("name", str), ("schema", dict)):
        if not isinstance(form.get(field), wanted):
            raise bad_request(f"Missing required parameter: 'text.format.{field}'.", param=f"text.format.{field}")
    return {"type": "json_schema", "json_schema": {k: form[k] for k in ("name", "schema", "strict", "description")
                                                   if k in form}}


def _chat_params(body: ResponseRequest, tools: list[FunctionTool]) -> dict[str, Any]:
    """The Responses fields that chat has, under chat's names."""
    params: dict[str, Any] = {}
    choice = _chat_tool_choice(body.tool_choice, tools)
    if tools:
        params["tools"] = _chat_tools(tools)
        if choice is not None:
            params["tool_choice"] = choice
        if body.parallel_tool_calls is not None:
            params["parallel_tool_calls"] = body.parallel_tool_calls
    if body.temperature is not None:
        params["temperature"] = body.temperature
    if body.top_p is not None:
        params["top_p"] = body.top_p
    if body.max_output_tokens is not None:
        params["max_tokens"] = body.max_output_tokens
    if body.user is not None:
        params["user"] = body.user
    response_format = _chat_response_format(body.text)
    if response_format is not None:
        params["response_format"] = response_format
    return params


@post("/v1/responses", status_code=200, **documented(ResponseObject, body=ResponseRequest, stream=STREAM_NOTE))
async def create_response(request: Request[Any, Any, Any], caller: CallerDep,
                          runtime: RuntimeDep) -> Response[bytes] | Stream:
    """A model response to `input`, continuing `previous_response_id` if given."""
    gateway = runtime.gateway
    raw = await json_body(request)
    body = convert(raw, ResponseRequest)
    _refuse_unsupported(body)
    tools = function_tools(body.tools)
    params = _chat_params(body, tools)
    if body.input is None:
        raise bad_request("Missing required parameter: 'input'.", param="input")
    store = conversations(request)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await store.find(body.previous_response_id, caller.name)
        if previous is None:
            raise ProxyError(Kind.NOT_FOUND, f"Previous response with id '{clip(body.previous_response_id)}' "
                             "not found.", param="previous_response_id")
        history = _decode_messages(previous.messages)
    new = input_messages(body.input, called_ids(history))
    # Instructions apply to this turn only; they are not kept with the conversation (as OpenAI does).
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = [*system, *history, *new]
    note(request, model=body.model)
    route = await gateway.catalogue.resolve(body.model)
    check_text_route(route, "responses")
    check_model(caller, route)
    await hold_budget(request, caller, route, 1)
    note(request, upstream=route.provider.name)
    result = await gateway.chat(route, ChatCall(model=route.upstream_model, messages=messages, params=params),
                                caller)
    note(request, key=result.key.fingerprint)
    answer = result.answer
    text = answer.content or ""
    calls = tool_calls_of(result) or []
    response_id = "resp_" + secrets.token_hex(24)
    note(request, response_id=response_id)
    input_tokens = answer.prompt_tokens if answer.prompt_tokens is not None else prompt_tokens(messages)
    output_tokens = (answer.completion_tokens if answer.completion_tokens is not None
                     else text_tokens(text + "".join(c.function.name + c.function.arguments for c in calls)) + 3)
    output: list[OutputMessage | FunctionCall] = []
    if text or not calls:
        output.append(OutputMessage(id="msg_" + secrets.token_hex(24), status="completed",
                                    content=[OutputText(text=text, annotations=[], logprobs=[])]))
    output += [FunctionCall(id="fc_" + secrets.token_hex(24), call_id=call.id, name=call.function.name,
                            arguments=call.function.arguments, status="completed") for call in calls]
    now = int(time.time())
    stored = body.store is not False
    response = ResponseObject(
        id=response_id, created_at=now, status="completed", completed_at=now, instructions=body.instructions,
        max_output_tokens=body.max_output_tokens, model=body.model, output=output,
        parallel_tool_calls=body.parallel_tool_calls is not False, previous_response_id=body.previous_response_id,
        store=stored, temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0, text=body.text or {"format": {"type": "text"}},
        tool_choice=body.tool_choice or "auto", tools=tools, metadata=body.metadata or {},
        usage=ResponseUsage(input_tokens=input_tokens, input_tokens_details=InputTokensDetails(),
                            output_tokens=output_tokens, output_tokens_details=OutputTokensDetails(),
                            total_tokens=input_tokens + output_tokens),
        user=body.user if body.user is not None else msgspec.UNSET)
    encoded = encode(response)
    if stored:
        reply: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            reply["tool_calls"] = calls
        await store.keep(response_id, Stored(client=caller.name, response=encoded,
                                              messages=encode([*history, *new, reply])), len(gateway.config.clients))
    if body.stream:
        return Stream(_events(request, response), media_type="text/event-stream", headers=sse.HEADERS)
    return Response(encoded, status_code=200, media_type="application/json")


def _sequence(done: ResponseObject) -> Iterator[Any]:
    """The events OpenAI sends for this response, in order (without sequence numbers)."""
    started = msgspec.structs.replace(done, status="in_progress", completed_at=None, output=[], usage=msgspec.UNSET)
    yield ResponseCreated(response=started)
    yield ResponseInProgress(response=started)
    for index, item in enumerate(done.output):
        if isinstance(item, OutputMessage):
            yield from _message_events(index, item)
        else:
            yield from _function_call_events(index, item)
    yield ResponseCompleted(response=done)


def _message_events(index: int, message: OutputMessage) -> Iterator[Any]:
    item_id, text = message.id, message.content[0].text
    yield OutputItemAdded(output_index=index, item=msgspec.structs.replace(message, status="in_progress", content=[]))
    yield ContentPartAdded(item_id=item_id, output_index=index, content_index=0,
                           part=OutputText(text="", annotations=[], logprobs=[]))
    for start in range(0, len(text), STREAM_PIECE):
        yield OutputTextDelta(item_id=item_id, output_index=index, content_index=0,
                              delta=text[start:start + STREAM_PIECE], logprobs=[])
    yield OutputTextDone(item_id=item_id, output_index=index, content_index=0, text=text, logprobs=[])
    yield ContentPartDone(item_id=item_id, output_index=index, content_index=0, part=message.content[0])
    yield OutputItemDone(output_index=index, item=message)


def _function_call_events(index: int, call: FunctionCall) -> Iterator[Any]:
    yield OutputItemAdded(output_index=index, item=msgspec.structs.replace(call, status="in_progress", arguments=""))
    for start in range(0, len(call.arguments), STREAM_PIECE):
        yield FunctionCallArgumentsDelta(item_id=call.id, output_index=index,
                                         delta=call.arguments[start:start + STREAM_PIECE])
    yield FunctionCallArgumentsDone(item_id=call.id, output_index=index, name=call.name, arguments=call.arguments)
    yield OutputItemDone(output_index=index, item=call)


async def _events(request: Request[Any, Any, Any], done: ResponseObject) -> AsyncIterator[bytes]:
    sent = 0
    try:
        for event in _sequence(done):
            event.sequence_number = sent
            data = sse_event(event)
            yield data
            sent += 1
    except Exception as exc:  # once the stream began, an error can only travel inside it
        error = error_payload(stream_failure(request, exc)).error
        yield sse_event(ErrorEvent(sequence_number=sent, code=error.code, message=error.message, param=error.param))


@get("/v1/responses/{response_id:str}", **documented(ResponseObject, errors=(401, 404)))
async def retrieve_response(request: Request[Any, Any, Any], response_id: FromPath[str],
                            caller: CallerDep) -> Response[bytes]:
    """A stored response of this client."""
    found = await conversations(request).find(response_id, caller.name)
    if found is None:
        raise ProxyError(Kind.NOT_FOUND, f"Response with id '{clip(response_id)}' not found.")
    return Response(found.response, status_code=200, media_type="application/json")


@delete("/v1/responses/{response_id:str}", status_code=200, **documented(Deleted, errors=(401, 404)))
async def delete_response(request: Request[Any, Any, Any], response_id: FromPath[str],
                          caller: CallerDep) -> Response[bytes]:
    """Forget a stored response of this client (a later previous_response_id to it is a 404)."""
    if not await conversations(request).remove(response_id, caller.name):
        raise ProxyError(Kind.NOT_FOUND, f"Response with id '{clip(response_id)}' not found.")
    return json_response(Deleted(id=response_id))
