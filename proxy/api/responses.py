"""POST /v1/responses, GET and DELETE /v1/responses/{id}: the Responses API over chat.

The input becomes chat messages (instructions first, then the stored conversation of
`previous_response_id`, then the new input); the answer becomes one output message. The
conversation is kept in memory for a while for the client that created it.
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

from proxy.api.common import authenticate, json_body, json_response, note, runtime
from proxy.api.completions import answer_tokens, check_text_route
from proxy.clients import check_model
from proxy.clip import clip
from proxy.conversations import Conversations, Stored
from proxy.errors import Kind, ProxyError, bad_request
from proxy.openai import sse
from proxy.openai.decode import convert
from proxy.openai.openapi import documented
from proxy.openai.responses import (
    ContentPartAdded,
    ContentPartDone,
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
    encode,
    input_messages,
    sse_event,
)
from proxy.openai.usage import prompt_tokens
from proxy.providers.base import ChatCall

STREAM_PIECE = 24  # characters per output_text.delta
_decode_messages = msgspec.json.Decoder(list[dict[str, Any]]).decode

STREAM_NOTE = ("With stream=true: `event: <type>` / `data: <event>` pairs: response.created, "
               "response.in_progress, response.output_item.added, response.content_part.added, "
               "response.output_text.delta..., response.output_text.done, response.content_part.done, "
               "response.output_item.done, response.completed; each with a sequence_number.")


class Deleted(msgspec.Struct, kw_only=True):
    id: str
    object: str = "response"
    deleted: bool = True


def conversations(request: Request[Any, Any, Any]) -> Conversations:
    """The app's conversation store, made on first use."""
    state = request.app.state
    found = state.get("conversations")
    if found is None:
        found = state["conversations"] = Conversations()
    return found  # type: ignore[no-any-return]


def _refuse_unsupported(body: ResponseRequest) -> None:
    if body.tools:
        kinds = sorted({clip(t.get("type")) if isinstance(t, dict) else "?" for t in body.tools})
        raise bad_request(f"Tools are not supported by this proxy: its upstreams cannot run them (got "
                          f"{', '.join(kinds)}). Remove 'tools' or send an empty list.", param="tools")
    if body.tool_choice is not None and body.tool_choice not in ("auto", "none"):
        raise bad_request("'tool_choice' can only be 'auto' or 'none': this proxy's upstreams run no tools.",
                          param="tool_choice")
    if body.background:
        raise bad_request("'background' is not supported by this proxy; send the request without it.",
                          param="background")
    if body.conversation is not None:
        raise bad_request("'conversation' is not supported by this proxy; continue a conversation with "
                          "'previous_response_id'.", param="conversation")


def _chat_params(body: ResponseRequest) -> dict[str, Any]:
    """The Responses fields that chat has, under chat's names."""
    params: dict[str, Any] = {}
    if body.temperature is not None:
        params["temperature"] = body.temperature
    if body.top_p is not None:
        params["top_p"] = body.top_p
    if body.max_output_tokens is not None:
        params["max_tokens"] = body.max_output_tokens
    if body.user is not None:
        params["user"] = body.user
    form = (body.text or {}).get("format")
    if isinstance(form, dict) and form.get("type") == "json_object":
        params["response_format"] = {"type": "json_object"}
    elif isinstance(form, dict) and form.get("type") == "json_schema":
        schema = {k: form[k] for k in ("name", "schema", "strict", "description") if k in form}
        params["response_format"] = {"type": "json_schema", "json_schema": schema}
    return params


@post("/v1/responses", status_code=200, **documented(ResponseObject, body=ResponseRequest, stream=STREAM_NOTE))
async def create_response(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """A model response to `input`, continuing `previous_response_id` if given."""
    caller = authenticate(request)
    raw = await json_body(request)
    body = convert(raw, ResponseRequest)
    _refuse_unsupported(body)
    if body.input is None:
        raise bad_request("Missing required parameter: 'input'.", param="input")
    new = input_messages(body.input)
    store = conversations(request)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id, caller.name)
        if previous is None:
            raise ProxyError(Kind.NOT_FOUND, f"Previous response with id '{clip(body.previous_response_id)}' "
                             "not found.", param="previous_response_id")
        history = _decode_messages(previous.messages)
    # Instructions apply to this turn only; they are not kept with the conversation (as OpenAI does).
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = [*system, *history, *new]
    note(request, model=body.model)
    gateway = runtime(request).gateway
    route = await gateway.catalogue.resolve(body.model)
    check_text_route(route, "responses")
    check_model(caller, route)
    await gateway.check_budget(caller, route, 1)
    note(request, upstream=route.provider.name)
    result = await gateway.chat(route, ChatCall(model=route.upstream_model, messages=messages,
                                                params=_chat_params(body)), caller)
    note(request, key=result.key.fingerprint)
    answer = result.answer
    text = answer.content or ""
    response_id = "resp_" + secrets.token_hex(24)
    note(request, response_id=response_id)
    input_tokens = answer.prompt_tokens if answer.prompt_tokens is not None else prompt_tokens(messages)
    output_tokens = answer_tokens(answer)
    now = int(time.time())
    stored = body.store is not False
    response = ResponseObject(
        id=response_id, created_at=now, status="completed", completed_at=now, instructions=body.instructions,
        max_output_tokens=body.max_output_tokens, model=body.model,
        output=[OutputMessage(id="msg_" + secrets.token_hex(24), status="completed",
                              content=[OutputText(text=text, annotations=[], logprobs=[])])],
        parallel_tool_calls=body.parallel_tool_calls is not False, previous_response_id=body.previous_response_id,
        store=stored, temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0, text=body.text or {"format": {"type": "text"}},
        tool_choice=body.tool_choice or "auto", tools=[], metadata=body.metadata or {},
        usage=ResponseUsage(input_tokens=input_tokens, input_tokens_details=InputTokensDetails(),
                            output_tokens=output_tokens, output_tokens_details=OutputTokensDetails(),
                            total_tokens=input_tokens + output_tokens),
        user=body.user if body.user is not None else msgspec.UNSET)
    encoded = encode(response)
    if stored:
        kept = [*history, *new, {"role": "assistant", "content": text}]
        store.put(response_id, Stored(client=caller.name, response=encoded, messages=encode(kept)))
    if body.stream:
        return Stream(_events(response), media_type="text/event-stream", headers=sse.HEADERS)
    return Response(encoded, status_code=200, media_type="application/json")


def _sequence(done: ResponseObject) -> Iterator[Any]:
    """The events OpenAI sends for one text answer, in order (without sequence numbers)."""
    started = msgspec.structs.replace(done, status="in_progress", completed_at=None, output=[], usage=msgspec.UNSET)
    yield ResponseCreated(response=started)
    yield ResponseInProgress(response=started)
    message = done.output[0]
    item_id, text = message.id, message.content[0].text
    yield OutputItemAdded(output_index=0, item=msgspec.structs.replace(message, status="in_progress", content=[]))
    yield ContentPartAdded(item_id=item_id, output_index=0, content_index=0,
                           part=OutputText(text="", annotations=[], logprobs=[]))
    for start in range(0, len(text), STREAM_PIECE):
        yield OutputTextDelta(item_id=item_id, output_index=0, content_index=0,
                              delta=text[start:start + STREAM_PIECE], logprobs=[])
    yield OutputTextDone(item_id=item_id, output_index=0, content_index=0, text=text, logprobs=[])
    yield ContentPartDone(item_id=item_id, output_index=0, content_index=0, part=message.content[0])
    yield OutputItemDone(output_index=0, item=message)
    yield ResponseCompleted(response=done)


async def _events(done: ResponseObject) -> AsyncIterator[bytes]:
    for number, event in enumerate(_sequence(done)):
        event.sequence_number = number
        yield sse_event(event)


@get("/v1/responses/{response_id:str}", **documented(ResponseObject, errors=(401, 404)))
async def retrieve_response(request: Request[Any, Any, Any], response_id: FromPath[str]) -> Response[bytes]:
    """A stored response of this client."""
    caller = authenticate(request)
    found = conversations(request).get(response_id, caller.name)
    if found is None:
        raise ProxyError(Kind.NOT_FOUND, f"Response with id '{clip(response_id)}' not found.")
    return Response(found.response, status_code=200, media_type="application/json")


@delete("/v1/responses/{response_id:str}", status_code=200, **documented(Deleted, errors=(401, 404)))
async def delete_response(request: Request[Any, Any, Any], response_id: FromPath[str]) -> Response[bytes]:
    """Forget a stored response of this client (a later previous_response_id to it is a 404)."""
    caller = authenticate(request)
    if not conversations(request).delete(response_id, caller.name):
        raise ProxyError(Kind.NOT_FOUND, f"Response with id '{clip(response_id)}' not found.")
    return json_response(Deleted(id=response_id))
