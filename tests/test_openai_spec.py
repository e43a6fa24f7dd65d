"""The spec helper accepts what OpenAI sends and, above all, can fail."""

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import openai_spec
import pytest
from openai_spec import (
    validate,
    validate_chat_completion,
    validate_chat_stream,
    validate_completion_stream,
    validate_error,
    validate_response,
    validate_response_object,
    validate_response_stream,
)

CREATED = 1_700_000_000


def chat_completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": CREATED,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }


def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        **extra,
    }


def chat_stream() -> list[dict[str, Any]]:
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    return [
        chunk({"role": "assistant", "content": "", "refusal": None}, usage=None),
        chunk({"content": "Hel"}, usage=None),
        chunk({"content": "lo!"}, usage=None),
        chunk({}, "stop", usage=None),
        {**chunk({}), "choices": [], "usage": usage},
    ]


def error_body() -> dict[str, Any]:
    return {
        "error": {
            "message": "Incorrect API key provided: sk-xxx.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def model() -> dict[str, Any]:
    return {"id": "gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "system"}


def response_object(status: str = "completed", text: str = "Hi there") -> dict[str, Any]:
    done = status == "completed"
    return {
        "id": "resp_123",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": "gpt-4o-mini",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "output": [message_item(text)] if done else [],
        **(
            {
                "usage": {
                    "input_tokens": 5,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": 2,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 7,
                }
            }
            if done
            else {}
        ),
    }


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_1",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text else [],
    }


def response_stream() -> list[dict[str, Any]]:
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": "msg_1", "output_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response_object("in_progress")},
        {"type": "response.in_progress", "response": response_object("in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": message_item("", "in_progress")},
        {"type": "response.content_part.added", **where, "content_index": 0, "part": part},
        {"type": "response.output_text.delta", **where, "content_index": 0, "delta": "Hi", "logprobs": []},
        {
            "type": "response.output_text.delta",
            **where,
            "content_index": 0,
            "delta": " there",
            "logprobs": [],
        },
        {
            "type": "response.output_text.done",
            **where,
            "content_index": 0,
            "text": "Hi there",
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            **where,
            "content_index": 0,
            "part": {**part, "text": "Hi there"},
        },
        {"type": "response.output_item.done", "output_index": 0, "item": message_item("Hi there")},
        {"type": "response.completed", "response": response_object()},
    ]
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


# -- chat completion --------------------------------------------------------


def test_valid_chat_completion_passes() -> None:
    validate_chat_completion(chat_completion())
    validate("CreateChatCompletionResponse", chat_completion())
    validate_response("/v1/chat/completions", "POST", 200, chat_completion())


def test_chat_completion_without_choices_fails() -> None:
    body = chat_completion()
    del body["choices"]
    with pytest.raises(AssertionError, match=r"at \$: 'choices' is a required property"):
        validate("CreateChatCompletionResponse", body)


def test_failure_names_the_json_path() -> None:
    body = chat_completion()
    body["choices"][0]["finish_reason"] = "done"
    with pytest.raises(AssertionError, match=r"at \$\.choices\[0\]\.finish_reason: 'done' is not one of"):
        validate_chat_completion(body)


# -- errors -------------------------------------------------------------------


def test_valid_error_passes() -> None:
    validate_error(error_body())


def test_error_without_param_fails() -> None:
    body = error_body()
    del body["error"]["param"]
    with pytest.raises(AssertionError, match="param"):
        validate_error(body)


def test_upstream_style_error_fails() -> None:
    with pytest.raises(AssertionError, match=r"at \$\.error: 'invalid api key' is not of type 'object'"):
        validate_error({"error": "invalid api key"})


def test_error_status_is_validated_as_error_response() -> None:
    # 401 is declared nowhere in the spec; 404 on DELETE /responses/{id} is declared as bare Error.
    validate_response("/v1/chat/completions", "post", 401, error_body())
    validate_response("/v1/responses/resp_123", "delete", 404, error_body())
    with pytest.raises(AssertionError, match="code"):
        validate_response("/v1/models/x", "get", 404, {"error": {"message": "m", "type": "t", "param": None}})


# -- chat stream ----------------------------------------------------------------


def test_valid_chat_stream_passes() -> None:
    validate_chat_stream(chat_stream())
    validate_chat_stream(chat_stream()[:-1])  # without a usage chunk


def test_chat_stream_with_two_finish_reasons_fails() -> None:
    chunks = chat_stream()
    chunks[2]["choices"][0]["finish_reason"] = "length"
    with pytest.raises(AssertionError, match="exactly one chunk must carry a finish_reason"):
        validate_chat_stream(chunks)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda c: c[0]["choices"][0]["delta"].pop("role"), "role"),
        (lambda c: c[1].update(id="chatcmpl-other"), r"chunk\[1\]\.id"),
        (lambda c: c.insert(1, c.pop()), "not the last chunk"),
        (lambda c: c[3]["choices"][0].update(finish_reason=None), "found 0"),
        (lambda c: c[1]["choices"][0].update(finish_reason="sideways"), "is not one of"),
        (lambda c: c[4].update(choices=c[3]["choices"]), "choices is not"),
    ],
    ids=["no-role", "other-id", "usage-not-last", "no-finish", "bad-finish", "usage-with-choices"],
)
def test_broken_chat_streams_fail(breakage: Any, message: str) -> None:
    chunks = copy.deepcopy(chat_stream())
    breakage(chunks)
    with pytest.raises(AssertionError, match=message):
        validate_chat_stream(chunks)


def test_legacy_completion_stream() -> None:
    def piece(text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": CREATED,
            "model": "m",
            "choices": [choice],
        }

    chunks = [piece("Hel", None), piece("lo", None), piece("", "stop")]
    validate_completion_stream(chunks)
    validate("CreateCompletionResponse", chunks[-1])
    with pytest.raises(AssertionError, match="found 0"):
        validate_completion_stream(chunks[:-1])


# -- models ---------------------------------------------------------------------


def test_model_response_by_concrete_path() -> None:
    validate_response("/v1/models/x", "get", 200, model())
    validate_response("/models/gpt-4o-mini", "GET", 200, model())
    validate_response("/v1/models", "get", 200, {"object": "list", "data": [model()]})


def test_model_without_owned_by_fails() -> None:
    body = model()
    del body["owned_by"]
    with pytest.raises(AssertionError, match="'owned_by' is a required property"):
        validate_response("/v1/models/x", "get", 200, body)
    with pytest.raises(AssertionError, match=r"\$\.data\[0\]: 'owned_by'"):
        validate_response("/v1/models", "get", 200, {"object": "list", "data": [body]})


def test_path_templates_resolve() -> None:
    assert openai_spec.find_operation("/v1/models/gpt-4o-mini", "get")[0] == "/models/{model}"
    assert openai_spec.find_operation("/v1/models/{model}", "delete")[0] == "/models/{model}"
    assert openai_spec.find_operation("/v1/responses/compact", "post")[0] == "/responses/compact"
    assert openai_spec.find_operation("/v1/responses/resp_1", "get")[0] == "/responses/{response_id}"
    with pytest.raises(AssertionError, match="no operation"):
        openai_spec.find_operation("/v1/nothing/here", "get")
    with pytest.raises(AssertionError, match="declares no application/json schema"):
        validate_response("/v1/responses/resp_1", "delete", 200, {})


# -- images, responses API --------------------------------------------------------


def test_images_response() -> None:
    validate_response(
        "/v1/images/generations", "post", 200, {"created": CREATED, "data": [{"url": "https://x/y.png"}]}
    )
    with pytest.raises(AssertionError, match="'created' is a required property"):
        openai_spec.validate_images_response({"data": [{"url": "https://x/y.png"}]})


def test_responses_object_and_stream() -> None:
    validate_response_object(response_object())
    validate_response("/v1/responses", "post", 200, response_object())
    validate_response_stream(response_stream())
    validate_response("/v1/responses", "post", 200, response_stream()[4], content_type="text/event-stream")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda e: e[4].update(delta=3), r"(?s)ResponseTextDeltaEvent.*\$\.delta: 3 is not of type 'string'"),
        (lambda e: e[5].update(delta=" where"), "joined deltas"),
        (lambda e: e.pop(), "terminal event"),
        (lambda e: e[3].update(sequence_number=9), "sequence_number"),
        (lambda e: e[0].update(type="response.begun"), "'response.begun' is not one of"),
        (lambda e: e[-1]["response"].update(id="resp_other"), "different response ids"),
    ],
    ids=["bad-delta", "text-mismatch", "no-terminal", "sequence-gap", "unknown-type", "other-response-id"],
)
def test_broken_response_streams_fail(breakage: Any, message: str) -> None:
    events = copy.deepcopy(response_stream())
    breakage(events)
    with pytest.raises(AssertionError, match=message):
        validate_response_stream(events)


# -- the spec itself --------------------------------------------------------------


def test_documented_schema_names_exist() -> None:
    names = set(openai_spec.schema_names())
    documented = {
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        "CreateCompletionResponse",
        openai_spec.COMPLETION_STREAM_CHUNK,
        "Response",
        "ResponseStreamEvent",
        "ImagesResponse",
        "ListModelsResponse",
        "Model",
        "ErrorResponse",
        "Error",
    }
    assert documented <= names, documented - names
    events = openai_spec.response_stream_event_schemas()
    assert events["response.created"] == "ResponseCreatedEvent"
    assert events["response.output_text.delta"] == "ResponseTextDeltaEvent"
    assert events["response.completed"] == "ResponseCompletedEvent"


def test_spec_is_the_vendored_subset_inside_the_repository() -> None:
    info = openai_spec.load_info()
    assert Path(info["spec"]) == openai_spec.spec_path() == openai_spec.SPEC_FILE
    assert openai_spec.SPEC_FILE.is_relative_to(Path(__file__).resolve().parent)
    assert info["title"] == "OpenAI API"
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"]), info["version"]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if isinstance(node.get("$ref"), str) else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def test_vendored_subset_is_closed_under_ref() -> None:
    """Every ``$ref`` in the vendored file, and every union member, is a schema the file holds."""
    doc = json.loads(openai_spec.SPEC_FILE.read_bytes())
    schemas = doc["components"]["schemas"]
    prefix = "#/components/schemas/"
    refs = _refs(doc)
    assert len(refs) > 1000
    names = {unquote(r[len(prefix) :].split("/")[0]) if r.startswith(prefix) else r for r in refs}
    dangling = sorted(names - schemas.keys())
    assert dangling == []
    members = {name for table in doc["unions"].values() for name in table.values()}
    assert members <= schemas.keys(), members - schemas.keys()
