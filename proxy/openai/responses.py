"""The Responses API on the wire: the request, the response object, the stream events, and
the input items translated to chat messages (the only thing the upstreams run): messages,
and function calls with their outputs, which become chat tool calls and `tool` messages.

Response Structs mirror `Response` and the `Response*Event` schemas of the OpenAI spec:
fields it requires have no default, so they are always sent (null included).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from proxy.clip import clip
from proxy.errors import bad_request
from proxy.openai.types import ModelId

_encode = msgspec.json.Encoder().encode


class ResponseRequest(msgspec.Struct, kw_only=True):
    model: ModelId
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = None  # null or absent: stored, as OpenAI does
    stream: bool | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    user: str | None = None
    background: bool | None = None
    conversation: Any = None


class OutputText(msgspec.Struct, kw_only=True):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class _Item(msgspec.Struct, kw_only=True, tag_field="type"):
    """An output item; its `type` is the tag."""


class OutputMessage(_Item, kw_only=True, tag="message"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCall(_Item, kw_only=True, tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | FunctionCall


class FunctionTool(msgspec.Struct, kw_only=True):
    """A function tool as the response echoes it (the spec requires strict and parameters, nullable)."""

    type: Literal["function"] = "function"
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed"]
    completed_at: int | None
    error: None = None
    incomplete_details: None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float | None
    top_p: float | None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[FunctionTool]
    truncation: str = "disabled"
    metadata: dict[str, str]
    # Left out (UNSET) rather than null where the spec does not allow null.
    usage: ResponseUsage | msgspec.UnsetType = msgspec.UNSET
    user: str | msgspec.UnsetType = msgspec.UNSET


# Every event carries its `type` (the tag) and `sequence_number`.
class _Event(msgspec.Struct, kw_only=True, tag_field="type"):
    sequence_number: int = 0


class ResponseCreated(_Event, tag="response.created"):
    response: ResponseObject


class ResponseInProgress(_Event, tag="response.in_progress"):
    response: ResponseObject


class ResponseCompleted(_Event, tag="response.completed"):
    response: ResponseObject


class OutputItemAdded(_Event, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class OutputItemDone(_Event, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class FunctionCallArgumentsDelta(_Event, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDone(_Event, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event, tag="error"):
    code: str | None
    message: str
    param: str | None


class ContentPartAdded(_Event, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ContentPartDone(_Event, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDelta(_Event, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any]


class OutputTextDone(_Event, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any]


def sse_event(event: _Event) -> bytes:
    """`event: <type>\\ndata: <json>\\n\\n`, as OpenAI streams Responses events."""
    kind = type(event).__struct_config__.tag
    return b"event: " + str(kind).encode() + b"\ndata: " + _encode(event) + b"\n\n"


def encode(value: Any) -> bytes:
    return _encode(value)


# ---- input items -> chat messages -----------------------------------------------------

INPUT_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal", "summary_text"})
# An image's URL: http(s) with a host, or data: with its comma (javascript:, file: and the like are refused).
IMAGE_URL = re.compile(r"(?i)(https?://[^\s/?#]+|data:[^,]*,)")
IMAGE_DETAILS = ("auto", "low", "high", "original")  # a Responses input_image's; chat's lacks original


def _text_of(part: dict[str, Any], where: str) -> str:
    value = part.get("refusal") if part.get("type") == "refusal" else part.get("text")
    if not isinstance(value, str):
        raise bad_request(f"Invalid value for '{where}.text': expected a string.", param=f"{where}.text")
    return value


def check_image_url(url: Any, where: str) -> str:
    """An image's URL as OpenAI takes it (chat's image_url.url, a Responses input_image's image_url):
    an http(s) URL with a host, or a data: URL; `where` is the field's name in the error."""
    if url is None:
        raise bad_request(f"Missing required parameter: '{where}'.", param=where)
    if not isinstance(url, str):
        raise bad_request(f"Invalid type for '{where}': expected a string.", param=where)
    if not IMAGE_URL.match(url):
        raise bad_request(f"Invalid value for '{where}': '{clip(url, 80)}'; expected an http(s) URL or a data: URL.",
                          param=where)
    return url


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = part.get("image_url")
    if url is None and part.get("file_id") is not None:
        raise bad_request(f"'{where}.file_id' is not supported by this proxy: send the image as 'image_url' "
                          "(an http(s) URL or a data: URL).", param=f"{where}.file_id")
    image: dict[str, Any] = {"url": check_image_url(url, f"{where}.image_url")}
    detail = part.get("detail")
    if detail is not None:
        if detail not in IMAGE_DETAILS:
            raise bad_request(f"Invalid value for '{where}.detail': expected one of {list(IMAGE_DETAILS)}.",
                              param=f"{where}.detail")
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _content(content: Any, role: str, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"Invalid type for '{where}': expected a string or an array of content parts.",
                          param=where)
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or not isinstance(kind, str):
            raise bad_request(f"Invalid value for '{here}': expected a content part with a 'type'.", param=here)
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": _text_of(part, here)})
        elif kind == "input_image" and role != "assistant":
            parts.append(_image_part(part, here))
        else:
            raise bad_request(f"Invalid value for '{here}.type': '{clip(kind)}' content is not supported by this "
                              "proxy's upstreams; use input_text or input_image.", param=f"{here}.type")
    if role == "assistant" or (len(parts) <= 1 and all(p["type"] == "text" for p in parts)):
        return "".join(p["text"] for p in parts if p["type"] == "text")
    return parts


def _output_text(output: Any, where: str) -> str:
    """A function_call_output's output: a string, or text parts (chat tool messages carry text only)."""
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise bad_request(f"Invalid type for '{where}': expected a string or an array of content parts.",
                          param=where)
    texts = []
    for i, part in enumerate(output):
        here = f"{where}[{i}]"
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "text", "output_text"):
            raise bad_request(f"Invalid value for '{here}': only text output (input_text) can go back to this "
                              "proxy's upstreams.", param=f"{here}.type")
        texts.append(_text_of(part, here))
    return "".join(texts)


def _string(item: dict[str, Any], field: str, where: str) -> str:
    value = item.get(field)
    if not isinstance(value, str) or not value:
        if value is None:
            raise bad_request(f"Missing required parameter: '{where}.{field}'.", param=f"{where}.{field}")
        raise bad_request(f"Invalid value for '{where}.{field}': expected a non-empty string.",
                          param=f"{where}.{field}")
    return value


def called_ids(messages: list[dict[str, Any]]) -> set[str]:
    """The ids of every tool call the assistant made in these chat messages."""
    return {str(call.get("id")) for m in messages if m.get("role") == "assistant"
            for call in m.get("tool_calls") or () if isinstance(call, dict)}


def input_messages(value: str | list[Any], earlier_calls: set[str] | None = None) -> list[dict[str, Any]]:
    """`input` as chat messages: a string is one user message; message items keep their role;
    function_call items become the assistant's tool_calls and function_call_output items
    `tool` messages, each answering a call made before (in `earlier_calls` or this input)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not value:
        raise bad_request("'input' must contain at least one item.", param="input")
    messages: list[dict[str, Any]] = []
    calls = set(earlier_calls or ())
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"Invalid value for '{where}': expected an input item object.", param=where)
        kind = item.get("type", "message")
        if kind == "function_call":
            call_id = _string(item, "call_id", where)
            arguments = item.get("arguments", "")
            if not isinstance(arguments, str):
                raise bad_request(f"Invalid type for '{where}.arguments': expected a JSON string.",
                                  param=f"{where}.arguments")
            call = {"id": call_id, "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": arguments}}
            previous = messages[-1] if messages else None
            if previous is not None and previous["role"] == "assistant":  # one turn: text and calls together
                previous.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            calls.add(call_id)
            continue
        if kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            if call_id not in calls:
                raise bad_request(f"No tool call found for function call output with call_id {clip(call_id)}.",
                                  param=f"{where}.call_id")
            if "output" not in item:
                raise bad_request(f"Missing required parameter: '{where}.output'.", param=f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _output_text(item["output"], f"{where}.output")})
            continue
        if kind != "message":
            raise bad_request(f"Invalid value for '{where}.type': '{clip(kind)}' items are not supported by this "
                              "proxy's upstreams; send messages, function_call and function_call_output items, "
                              "and continue a conversation with previous_response_id.", param=f"{where}.type")
        role = item.get("role")
        if role not in INPUT_ROLES:
            raise bad_request(f"Invalid value for '{where}.role': expected one of {sorted(INPUT_ROLES)}.",
                              param=f"{where}.role")
        if "content" not in item:
            raise bad_request(f"Missing required parameter: '{where}.content'.", param=f"{where}.content")
        messages.append({"role": role, "content": _content(item["content"], role, f"{where}.content")})
    return messages
