"""Validate what the proxy returns against OpenAI's official OpenAPI spec.

The spec is the part of OpenAI's OpenAPI document (https://github.com/openai/openai-openapi,
MIT) that the tests use, vendored in ``tests/openai_spec/openai-openapi.subset.json``: the
component schemas named below and the operations of the routes the proxy serves, with their
``$ref`` closure, already normalised to JSON Schema 2020-12 (``tests/openai_spec/README.md``
says which spec version, ``regenerate.py`` there makes it from the full spec and explains the
normalisation). Nothing outside the repository is read. The file is loaded once per process;
validators are built lazily, once per schema, with jsonschema's Draft 2020-12 validator and a
``referencing`` registry holding the whole document, so internal ``$ref``\\ s resolve.

Every ``validate*`` function returns ``None`` or raises ``AssertionError``
whose message names the schema, the spec version, the JSON path of each failure
and the validator's message (first few errors).

Schema names to use, per endpoint (all under ``#/components/schemas/``)
-----------------------------------------------------------------------
============================================  =========================================
``POST /v1/chat/completions``                 ``CreateChatCompletionResponse``
  stream chunk (``text/event-stream``)        ``CreateChatCompletionStreamResponse``
``POST /v1/completions`` (legacy)             ``CreateCompletionResponse``
  stream chunk                                the spec declares none; OpenAI streams
                                              ``CreateCompletionResponse`` objects with
                                              ``finish_reason: null`` until the end, so
                                              use ``validate_completion_stream``
                                              (``COMPLETION_STREAM_CHUNK``, derived here)
``POST /v1/responses``, ``GET .../{id}``      ``Response``
  stream event (``text/event-stream``)        ``ResponseStreamEvent`` (a union of 58);
                                              by ``type``, e.g. ``response.created`` ->
                                              ``ResponseCreatedEvent``,
                                              ``response.in_progress`` ->
                                              ``ResponseInProgressEvent``,
                                              ``response.output_item.added`` ->
                                              ``ResponseOutputItemAddedEvent``,
                                              ``response.content_part.added`` ->
                                              ``ResponseContentPartAddedEvent``,
                                              ``response.output_text.delta`` ->
                                              ``ResponseTextDeltaEvent``,
                                              ``response.output_text.done`` ->
                                              ``ResponseTextDoneEvent``,
                                              ``response.content_part.done`` ->
                                              ``ResponseContentPartDoneEvent``,
                                              ``response.output_item.done`` ->
                                              ``ResponseOutputItemDoneEvent``,
                                              ``response.completed`` ->
                                              ``ResponseCompletedEvent``,
                                              ``response.failed`` -> ``ResponseFailedEvent``,
                                              ``response.incomplete`` ->
                                              ``ResponseIncompleteEvent``,
                                              ``error`` -> ``ResponseErrorEvent``;
                                              ``response_stream_event_schemas()`` has all
``POST /v1/images/generations`` and ``edits``  ``ImagesResponse`` (stream events:
                                              ``ImageGenStreamEvent`` /
                                              ``ImageEditStreamEvent``)
``GET /v1/models``                            ``ListModelsResponse``
``GET /v1/models/{model}``                    ``Model``
any error (HTTP >= 400)                       ``ErrorResponse`` (``{"error": Error}``)
============================================  =========================================

A schema or route the subset lacks: add it to ``ROOTS`` or ``PATHS`` in
``tests/openai_spec/regenerate.py`` and regenerate.

Where the spec is stricter than OpenAI's own examples (so send it this way):
a chat ``message`` requires ``refusal`` (null) and a choice ``logprobs``
(null); ``system_fingerprint``, ``Response.user`` and ``Response.usage`` are
not nullable (omit them rather than send null); ``output_text`` content needs
``annotations`` and ``logprobs`` (``[]``); Responses ``usage`` needs
``input_tokens_details.cache_write_tokens``; every stream event needs
``sequence_number``.
"""

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match, relevance
from referencing import Registry
from referencing.jsonschema import DRAFT202012

__all__ = [
    "COMPLETION_STREAM_CHUNK",
    "SPEC_FILE",
    "find_operation",
    "load_info",
    "response_schema",
    "response_stream_event_schemas",
    "schema_names",
    "spec_path",
    "validate",
    "validate_chat_completion",
    "validate_chat_stream",
    "validate_chat_stream_chunk",
    "validate_completion",
    "validate_completion_stream",
    "validate_error",
    "validate_images_response",
    "validate_model",
    "validate_model_list",
    "validate_response",
    "validate_response_object",
    "validate_response_stream",
    "validate_response_stream_event",
]

#: The vendored, normalised subset of OpenAI's spec (see tests/openai_spec/README.md).
SPEC_FILE = Path(__file__).resolve().parent / "openai_spec" / "openai-openapi.subset.json"
_REGENERATE = "tests/openai_spec/regenerate.py"
_BASE_URI = "urn:openai-openapi"
_SCHEMAS_PTR = "/components/schemas/"
_MAX_ERRORS = 5
_MAX_MESSAGE = 400

#: Derived schema (not in the spec) for one legacy ``/completions`` stream chunk.
COMPLETION_STREAM_CHUNK = "x-proxy-CreateCompletionStreamChunk"

Schema = dict[str, Any]


# --------------------------------------------------------------------------
# Loading the spec
# --------------------------------------------------------------------------


def spec_path() -> Path:
    """The vendored spec subset, inside the repository."""
    return SPEC_FILE


_LOAD_INFO: dict[str, Any] = {}


def load_info() -> dict[str, Any]:
    """What was loaded in this process: the file, the spec's title and version, seconds taken."""
    _spec()
    return dict(_LOAD_INFO)


@cache
def _spec() -> dict[str, Any]:
    """The normalised spec: ``info``, ``components.schemas``, ``operations``, ``unions``."""
    started = time.perf_counter()
    doc: dict[str, Any] = json.loads(SPEC_FILE.read_bytes())
    _LOAD_INFO.update(
        spec=str(SPEC_FILE),
        title=doc["info"]["title"],
        version=doc["info"]["version"],
        seconds=time.perf_counter() - started,
    )
    return doc


def _spec_name() -> str:
    info = _spec()["info"]
    return f"{info['title']} {info['version']}"


# --------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------


@cache
def _registry() -> Registry:
    return Registry().with_resource(_BASE_URI, DRAFT202012.create_resource(_spec()))


def _escape(segment: str) -> str:
    return quote(segment.replace("~", "~0").replace("/", "~1"), safe="~")


@cache
def _validator(pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{_BASE_URI}#{pointer}"}, registry=_registry())


def schema_names() -> list[str]:
    """All component schema names (including the derived ``COMPLETION_STREAM_CHUNK``)."""
    return sorted(_spec()["components"]["schemas"])


def _json_path(error: ValidationError) -> str:
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _describe(errors: Iterable[ValidationError]) -> list[str]:
    lines: list[str] = []
    ordered = sorted(errors, key=relevance, reverse=True)
    for error in ordered[:_MAX_ERRORS]:
        deepest = best_match([error]) or error
        message = deepest.message
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        lines.append(f"  at {_json_path(deepest)}: {message}")
    if len(ordered) > _MAX_ERRORS:
        lines.append(f"  ... and {len(ordered) - _MAX_ERRORS} more error(s)")
    return lines


def _check(pointer: str, label: str, instance: object, context: str = "") -> None:
    errors = list(_validator(pointer).iter_errors(instance))
    if errors:
        where = f"{context}: " if context else ""
        raise AssertionError(f"{where}not a valid {label} ({_spec_name()}):\n" + "\n".join(_describe(errors)))


def validate(schema_name: str, instance: object, *, context: str = "") -> None:
    """Assert ``instance`` is valid against ``#/components/schemas/<schema_name>``.

    For a union of objects told apart by ``type`` (e.g. ``ResponseStreamEvent``),
    the member named by ``instance["type"]`` is used, for precise messages.
    """
    schemas = _spec()["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"no schema {schema_name!r} in {SPEC_FILE}; add it to ROOTS in {_REGENERATE}")
    table = _spec()["unions"].get(schema_name)
    if table is not None and isinstance(instance, dict) and instance.get("type") in table:
        member = table[instance["type"]]
        _check(_SCHEMAS_PTR + _escape(member), f"{schema_name} ({member})", instance, context)
        return
    _check(_SCHEMAS_PTR + _escape(schema_name), schema_name, instance, context)


# --------------------------------------------------------------------------
# Operations (paths)
# --------------------------------------------------------------------------


@cache
def _path_patterns() -> list[tuple[re.Pattern[str], str, str, int]]:
    """(regex, template, required query, literal segment count), most specific first."""
    patterns: list[tuple[re.Pattern[str], str, str, int]] = []
    for key in _spec()["operations"]:
        template, _, query = key.partition("?")
        parts = template.strip("/").split("/")
        regex = "/".join(
            "".join(
                "[^/]+" if piece.startswith("{") else re.escape(piece)
                for piece in re.split(r"(\{[^}/]+\})", part)
                if piece
            )
            for part in parts
        )
        literal = sum(1 for part in parts if "{" not in part)
        patterns.append((re.compile(f"/{regex}"), key, query, literal))
    patterns.sort(key=lambda p: (-p[3], -len(p[2])))
    return patterns


def find_operation(path: str, method: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``(template, {status: {content type: schema}})`` for a concrete or template path.

    ``/v1/models/gpt-4o-mini``, ``/models/gpt-4o-mini`` and ``/v1/models/{model}``
    all find ``/models/{model}``.
    """
    operations = _spec()["operations"]
    concrete, _, query = path.partition("?")
    if not concrete.startswith("/"):
        concrete = "/" + concrete
    if concrete == "/v1" or concrete.startswith("/v1/"):
        concrete = concrete[3:] or "/"
    concrete = concrete.rstrip("/") or "/"
    verb = method.lower()
    for regex, key, needs_query, _ in _path_patterns():
        if needs_query and needs_query not in query.split("&"):
            continue
        if regex.fullmatch(concrete) and verb in operations[key]:
            return key, operations[key][verb]
    raise AssertionError(
        f"the vendored OpenAI spec ({_spec_name()}) has no operation {method.upper()} {path};"
        f" if OpenAI has it, add its path to PATHS in {_REGENERATE}"
    )


def response_schema(
    path: str, method: str, status: int, content_type: str = "application/json"
) -> Schema | None:
    """The declared response schema (status, then ``4XX``-style, then ``default``)."""
    _, responses = find_operation(path, method)
    for key in (str(status), f"{str(status)[0]}XX", "default"):
        if key in responses:
            return responses[key].get(content_type)
    return None


def validate_response(
    path: str,
    method: str,
    status: int,
    body: object,
    content_type: str = "application/json",
) -> None:
    """Validate a response body as the spec declares it for this operation and status.

    Error statuses (>= 400) are always validated as ``ErrorResponse`` with
    ``validate_error``: OpenAI sends ``{"error": {...}}`` even where the spec
    declares nothing or (e.g. ``DELETE /responses/{id}`` 404) a bare ``Error``.
    For ``text/event-stream``, ``body`` is one event's JSON data.
    """
    template, responses = find_operation(path, method)
    if status >= 400:
        validate_error(body, context=f"{method.upper()} {path} -> {status}")
        return
    key = next((k for k in (str(status), f"{str(status)[0]}XX", "default") if k in responses), None)
    schema = responses[key].get(content_type) if key is not None else None
    if key is None or schema is None:
        raise AssertionError(
            f"the OpenAI spec declares no {content_type} schema for {method.upper()} {template} -> {status}"
            f" (declared: { {k: sorted(v) for k, v in responses.items()} })"
        )
    context = f"{method.upper()} {path} -> {status}"
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if isinstance(ref, str) and ref.startswith("#" + _SCHEMAS_PTR) and len(schema) == 1:
        validate(ref[len(_SCHEMAS_PTR) + 1 :], body, context=context)
        return
    pointer = "/operations/" + "/".join(_escape(p) for p in (template, method.lower(), key, content_type))
    _check(pointer, f"{method.upper()} {template} {key} {content_type} response", body, context)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

_ERROR_KEYS = ("message", "type", "param", "code")


def validate_error(body: object, *, context: str = "") -> None:
    """``ErrorResponse``, and ``error`` carries message, type, param and code (maybe null)."""
    validate("ErrorResponse", body, context=context)
    assert isinstance(body, dict)
    error = body["error"]
    missing = [k for k in _ERROR_KEYS if not isinstance(error, dict) or k not in error]
    if missing:
        where = f"{context}: " if context else ""
        raise AssertionError(
            f"{where}OpenAI errors always carry {list(_ERROR_KEYS)}; missing {missing}: {error!r}"
        )


# --------------------------------------------------------------------------
# Thin named wrappers
# --------------------------------------------------------------------------


def validate_chat_completion(body: object, *, context: str = "") -> None:
    """``POST /v1/chat/completions`` body: ``CreateChatCompletionResponse``."""
    validate("CreateChatCompletionResponse", body, context=context)


def validate_chat_stream_chunk(body: object, *, context: str = "") -> None:
    """One chat stream chunk (``data:`` line): ``CreateChatCompletionStreamResponse``."""
    validate("CreateChatCompletionStreamResponse", body, context=context)


def validate_completion(body: object, *, context: str = "") -> None:
    """Legacy ``POST /v1/completions`` body: ``CreateCompletionResponse``."""
    validate("CreateCompletionResponse", body, context=context)


def validate_response_object(body: object, *, context: str = "") -> None:
    """Responses API object (``POST /v1/responses``): ``Response``."""
    validate("Response", body, context=context)


def validate_response_stream_event(body: object, *, context: str = "") -> None:
    """One Responses API stream event, checked as the schema of its ``type``: ``ResponseStreamEvent``."""
    validate("ResponseStreamEvent", body, context=context)


def validate_images_response(body: object, *, context: str = "") -> None:
    """``POST /v1/images/generations`` / ``edits`` body: ``ImagesResponse``."""
    validate("ImagesResponse", body, context=context)


def validate_model(body: object, *, context: str = "") -> None:
    """``GET /v1/models/{model}`` body: ``Model``."""
    validate("Model", body, context=context)


def validate_model_list(body: object, *, context: str = "") -> None:
    """``GET /v1/models`` body: ``ListModelsResponse``."""
    validate("ListModelsResponse", body, context=context)


def response_stream_event_schemas() -> dict[str, str]:
    """Responses API stream event ``type`` -> schema name, from ``ResponseStreamEvent``."""
    return dict(_spec()["unions"]["ResponseStreamEvent"])


# --------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------


def _fail(what: str, problems: Sequence[str]) -> None:
    if problems:
        raise AssertionError(f"invalid {what}:\n" + "\n".join(f"  {p}" for p in problems[:10]))


def _check_choice_stream(chunks: Sequence[Mapping[str, Any]], problems: list[str], chat: bool) -> None:
    """Shared sequence rules of chat and legacy completion streams."""
    first = chunks[0]
    ident = {k: first.get(k) for k in ("id", "created", "model")}
    for i, chunk in enumerate(chunks[1:], start=1):
        for key, value in ident.items():
            if chunk.get(key) != value:
                problems.append(f"chunk[{i}].{key} is {chunk.get(key)!r}, chunk[0] has {value!r}")
    usage_at = [i for i, c in enumerate(chunks) if c.get("usage") is not None]
    last = len(chunks) - 1
    if len(usage_at) > 1:
        problems.append(f"usage is set on more than one chunk: {usage_at}")
    for i in usage_at:
        if i != last:
            problems.append(f"chunk[{i}] carries usage but is not the last chunk")
        if chunks[i].get("choices") != []:
            problems.append(f"chunk[{i}] carries usage but its choices is not []")
    for i, chunk in enumerate(chunks):
        if chunk.get("choices") == [] and i not in usage_at:
            problems.append(f"chunk[{i}] has choices == [] but is not the usage chunk")
    if chat:
        choices = first.get("choices") or [{}]
        role = (choices[0].get("delta") or {}).get("role")
        if role != "assistant":
            problems.append(f'chunk[0] must have choices[0].delta.role == "assistant", got {role!r}')
    started: dict[int, int] = {}
    finished: dict[int, list[int]] = {}
    for i, chunk in enumerate(chunks):
        for choice in chunk.get("choices") or []:
            index = choice.get("index")
            if index not in started:
                started[index] = i
                role = (choice.get("delta") or {}).get("role")
                if chat and role != "assistant":
                    problems.append(
                        f'chunk[{i}]: first delta of choice {index} has role {role!r}, not "assistant"'
                    )
            if index in finished and choice.get("finish_reason") is None:
                after = finished[index][0]
                problems.append(
                    f"chunk[{i}]: choice {index} continues after its finish_reason (chunk {after})"
                )
            if choice.get("finish_reason") is not None:
                finished.setdefault(index, []).append(i)
    for index in started:
        marks = finished.get(index, [])
        if len(marks) != 1:
            problems.append(
                f"choice {index}: exactly one chunk must carry a finish_reason,"
                f" found {len(marks)} (chunks {marks})"
            )


def validate_chat_stream(chunks: Sequence[Mapping[str, Any]]) -> None:
    """Each chunk is a ``CreateChatCompletionStreamResponse``, and the sequence is OpenAI's.

    Same id/created/model on every chunk; the first chunk's delta has role
    "assistant"; per choice index exactly one chunk carries a finish_reason and
    nothing follows it for that index; a usage chunk, if any, is last with
    ``choices == []``.
    """
    if not chunks:
        raise AssertionError("invalid chat stream: no chunks")
    for i, chunk in enumerate(chunks):
        validate("CreateChatCompletionStreamResponse", chunk, context=f"chunk[{i}]")
    problems: list[str] = []
    _check_choice_stream(chunks, problems, chat=True)
    _fail("chat stream", problems)


def validate_completion_stream(chunks: Sequence[Mapping[str, Any]]) -> None:
    """Legacy ``/completions`` stream: each chunk a ``CreateCompletionResponse`` whose
    ``finish_reason`` may be null (``COMPLETION_STREAM_CHUNK``), with the chat stream's
    sequence rules except the role (completions have none)."""
    if not chunks:
        raise AssertionError("invalid completion stream: no chunks")
    for i, chunk in enumerate(chunks):
        validate(COMPLETION_STREAM_CHUNK, chunk, context=f"chunk[{i}]")
    problems: list[str] = []
    _check_choice_stream(chunks, problems, chat=False)
    _fail("completion stream", problems)


_TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
_START_EVENTS = frozenset({"response.created", "response.queued"})


def validate_response_stream(events: Sequence[Mapping[str, Any]]) -> None:
    """Responses API stream: each event valid for its ``type``, and the sequence is OpenAI's.

    Starts with response.created (or response.queued), ``sequence_number``
    counts up by one, exactly one terminal event (response.completed /
    failed / incomplete, or error) and it is last, one response id throughout,
    and output_text deltas add up to each ``response.output_text.done`` text.
    """
    if not events:
        raise AssertionError("invalid response stream: no events")
    for i, event in enumerate(events):
        validate("ResponseStreamEvent", event, context=f"event[{i}] ({event.get('type')!r})")
    problems: list[str] = []
    if events[0]["type"] not in _START_EVENTS:
        problems.append(f"event[0] is {events[0]['type']!r}, expected one of {sorted(_START_EVENTS)}")
    for i in range(1, len(events)):
        before, now = events[i - 1]["sequence_number"], events[i]["sequence_number"]
        if now != before + 1:
            problems.append(f"event[{i}].sequence_number is {now}, previous is {before}")
    terminal = [i for i, e in enumerate(events) if e["type"] in _TERMINAL_EVENTS]
    if terminal != [len(events) - 1]:
        problems.append(
            f"exactly one terminal event {sorted(_TERMINAL_EVENTS)} must end the stream; at {terminal}"
        )
    ids = {e["response"].get("id") for e in events if isinstance(e.get("response"), dict)}
    if len(ids) > 1:
        problems.append(f"events carry different response ids: {sorted(map(str, ids))}")
    texts: dict[tuple[Any, ...], str] = {}
    for i, event in enumerate(events):
        key = (event.get("item_id"), event.get("output_index"), event.get("content_index"))
        if event["type"] == "response.output_text.delta":
            texts[key] = texts.get(key, "") + event["delta"]
        elif event["type"] == "response.output_text.done" and texts.get(key, "") != event["text"]:
            problems.append(
                f"event[{i}]: output_text.done text {event['text']!r} != joined deltas {texts.get(key, '')!r}"
            )
    _fail("response stream", problems)
