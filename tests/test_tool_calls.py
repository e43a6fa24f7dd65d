"""Tool calls through chat completions, plain and streamed, one and several, and tool results
going back up; JSON answers by response_format. The simulated xffuw answers as an
OpenAI-compatible model does (proxy/sim/chat_model.py); the openai SDK is the client."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, XFFUW_KEYS, RunningProxy, Sims
from helpers import logged_requests
from jsonschema import Draft202012Validator
from openai_spec import validate_chat_completion, validate_chat_stream, validate_error
from pydantic import BaseModel, Field

from proxy.sim.chat_model import TOOL_RESULTS, find_schema, instance
from proxy.sim.faults import parse_markers

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    }, "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"]}}}
NO_PARAMETERS = {"type": "function", "function": {"name": "ping"}}


def _chat_completion(proxy: RunningProxy, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(f"{proxy.base_url}/chat/completions", headers=AUTH, json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    payload: dict[str, Any] = reply.json()
    validate_chat_completion(payload)
    return payload


def _chunks(proxy: RunningProxy, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The stream's JSON chunks (spec-checked when valid) and its raw data lines."""
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", headers=AUTH, json={**body, "stream": True},
                      timeout=30) as reply:
        assert reply.status_code == 200
        lines = [line.removeprefix("data: ") for line in reply.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]], lines


def _tool_of(name: str) -> dict[str, Any]:
    return next(t["function"] for t in (WEATHER, TIME) if t["function"]["name"] == name)


def _valid_arguments(call: dict[str, Any]) -> dict[str, Any]:
    arguments: dict[str, Any] = json.loads(call["function"]["arguments"])
    Draft202012Validator(_tool_of(call["function"]["name"])["parameters"]).validate(arguments)
    return arguments


# ---- the simulated model: arguments valid against any schema models are given ------------


class Address(BaseModel):
    street: str
    zip_code: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str = Field(min_length=3, max_length=10)
    age: int = Field(ge=18, lt=120)
    score: float = Field(gt=0, le=1, multiple_of=0.25)
    role: Literal["admin", "user"]
    tags: list[str] = Field(min_length=2)
    address: Address
    previous: list[Address] | None = None
    manager: Person | None = None
    extra: dict[str, int] = {}


SCHEMAS: list[dict[str, Any]] = [
    Person.model_json_schema(),  # $defs, $ref, anyOf with null, recursion, constraints
    WEATHER["function"]["parameters"],  # type: ignore[index]
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                      "mail": {"type": "string", "format": "email"},
                                      "id": {"type": "string", "format": "uuid"}}, "required": ["when"]},
    {"type": "object", "properties": {"pet": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
         "required": ["kind"]},
        {"type": "object", "properties": {"kind": {"const": "dog"}}, "required": ["kind"]}]}}},
    {"type": "array", "items": {"type": "integer", "enum": [3, 5, 8]}, "minItems": 3, "uniqueItems": True},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}], "items": False},
    {"type": "object", "additionalProperties": {"type": "number"}, "minProperties": 2},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 7, "minimum": 10}},
                "required": ["a"]}, {"properties": {"b": {"type": ["null", "boolean"]}}}]},
    {"type": "string", "minLength": 8, "maxLength": 9},
    {"type": "number", "exclusiveMinimum": 2, "exclusiveMaximum": 3},
    {},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_generated_documents_are_valid_and_deterministic(schema: dict[str, Any]) -> None:
    document = instance(schema)
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(document)]
    assert not errors, (document, errors)
    assert instance(schema) == document


def test_pydantic_accepts_what_is_generated_for_its_schema() -> None:
    person = Person.model_validate(instance(Person.model_json_schema()))
    assert person.address.zip_code.isdigit() and len(person.tags) >= 2


def test_a_schema_is_found_in_a_prompt() -> None:
    schema = {"properties": {"name": {"type": "string"}}, "required": ["name"], "type": "object"}
    prompt = f"Answer {{in json}} matching this json_schema:\n\n{json.dumps(schema, indent=2)}\n\nNot the schema."
    assert find_schema(prompt) == schema
    assert find_schema("no {schema} here {\"a\": 1}") is None


def test_tool_markers() -> None:
    assert parse_markers("go [TOOLS:3]").tool_calls == 3
    assert parse_markers("go [tools: all]").tool_calls == "all"
    assert parse_markers("go [no-tools]").no_tools and parse_markers("go").tool_calls is None


# ---- chat completions with tools, plain --------------------------------------------------


def test_a_tool_call_comes_back_in_openai_shape(proxy: RunningProxy, sims: Sims) -> None:
    body = _chat_completion(proxy, {"model": "gpt-4o-mini",
                                    "messages": [{"role": "user", "content": "weather in Paris?"}],
                                    "tools": [WEATHER, TIME]})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["refusal"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"  # the first tool
    assert _valid_arguments(call)["unit"] == "celsius"
    assert body["usage"]["completion_tokens"] > 3  # the call's arguments count
    sent = sims.xffuw.last_chat_body
    assert sent is not None and sent["tools"] == [WEATHER, TIME]  # tools travel to the upstream as sent


def test_sdk_named_tool_choice_and_several_calls(client: openai.OpenAI, sims: Sims) -> None:
    forced = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "what time is it?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = forced.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_time"]  # type: ignore[union-attr]
    several = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "both please [tools:all]"}], tools=[WEATHER, TIME])
    calls = several.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert len({c.id for c in calls}) == 2
    three = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "[tools:3] three cities"}], tools=[WEATHER])
    calls = three.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_weather"] * 3  # type: ignore[union-attr]
    for call in calls:
        _valid_arguments(call.model_dump())
    none = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                          tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    assert none.choices[0].message.content and none.choices[0].message.content.endswith("You said: hi")
    bare = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}],
                                          tools=[NO_PARAMETERS])  # type: ignore[list-item]
    assert bare.choices[0].message.tool_calls[0].function.arguments == "{}"  # type: ignore[index]


def test_tool_results_go_back_up_and_come_back_in_the_answer(client: openai.OpenAI, sims: Sims) -> None:
    question: list[Any] = [{"role": "user", "content": "weather and time in Paris? [tools:2]"}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=question, tools=[WEATHER, TIME])
    calls = first.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 2
    results = [{"role": "tool", "tool_call_id": calls[0].id, "content": "18°C, light rain"},
               {"role": "tool", "tool_call_id": calls[1].id, "content": "14:05 CET"}]
    history = [*question, first.choices[0].message.model_dump(exclude_none=True), *results]
    second = client.chat.completions.create(model="gpt-4o-mini", messages=history, tools=[WEATHER, TIME])
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None
    assert answer.message.content == TOOL_RESULTS + "get_weather: 18°C, light rain; get_time: 14:05 CET"
    sent = sims.xffuw.last_chat_body
    assert sent is not None
    assert sent["messages"][1]["role"] == "assistant" and len(sent["messages"][1]["tool_calls"]) == 2
    assert sent["messages"][2:] == results  # the tool messages travel up unchanged


def test_a_forced_tool_after_results_calls_the_next_tool(client: openai.OpenAI, sims: Sims) -> None:
    """As pydantic-ai's structured output needs: tool_choice required, a tool already called."""
    question: list[Any] = [{"role": "user", "content": "weather?"}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=question, tools=[WEATHER, TIME],
                                           tool_choice="required")
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history = [*question, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = client.chat.completions.create(model="gpt-4o-mini", messages=history, tools=[WEATHER, TIME],
                                            tool_choice="required")
    assert [c.function.name for c in second.choices[0].message.tool_calls or ()] == ["get_time"]


def test_response_format_json_schema_and_json_object(client: openai.OpenAI, sims: Sims) -> None:
    class City(BaseModel):
        name: str
        population: int = Field(gt=0)
        districts: list[str]

    parsed = client.chat.completions.parse(model="gpt-4o-mini", messages=[{"role": "user", "content": "Paris"}],
                                           response_format=City)
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.population > 0 and city.districts
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"]}
    instructed = client.chat.completions.create(model="gpt-4o-mini", response_format={"type": "json_object"}, messages=[
        {"role": "system", "content": f"Answer in JSON matching this json_schema:\n\n{json.dumps(schema)}"},
        {"role": "user", "content": "a film"}])
    Draft202012Validator(schema).validate(json.loads(instructed.choices[0].message.content or ""))
    loose = client.chat.completions.create(model="gpt-4o-mini", response_format={"type": "json_object"},
                                           messages=[{"role": "user", "content": "any json"}])
    assert json.loads(loose.choices[0].message.content or "") == {"answer": "any json"}


# Every form OpenAI's spec gives these fields (tests/test_errors.py has the ones it refuses).
VALID_SHAPES: list[dict[str, Any]] = [
    {"tools": [WEATHER, NO_PARAMETERS, {"type": "custom", "custom": {"name": "run_sql"}}], "tool_choice": "auto"},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}}},
    {"tools": [{"type": "custom", "custom": {"name": "run_sql"}}],
     "tool_choice": {"type": "custom", "custom": {"name": "run_sql"}}},
    {"response_format": {"type": "text"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
    {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "https://a.example/x.png"}}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "c2", "type": "custom", "custom": {"name": "run_sql", "input": "select 1"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "1"},
        {"role": "user", "content": "thanks"}]},
    {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "HTTPS://a.example/x.png?size=2", "detail": "auto"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}]}]},
]


@pytest.mark.parametrize("fields", VALID_SHAPES)
def test_every_shape_openai_takes_passes(proxy: RunningProxy, sims: Sims, fields: dict[str, Any]) -> None:
    _chat_completion(proxy, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_upstream_tool_calls_are_put_in_openai_shape(client: openai.OpenAI, sims: Sims) -> None:
    """An upstream that sends arguments as an object, no id and finish_reason stop."""
    sims.xffuw.chat_extra = {"choices": [{"finish_reason": "stop", "message": {"content": None, "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]}}]}
    result = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                            tools=[WEATHER])
    assert result.choices[0].finish_reason == "tool_calls"
    [call] = result.choices[0].message.tool_calls or []
    assert call.id.startswith("call_") and json.loads(call.function.arguments) == {"city": "Oslo", "unit": "celsius"}
    sims.xffuw.chat_extra = {"choices": [{"message": {"content": None, "tool_calls": [{"function": {}}]}}]}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                       tools=[WEATHER], stream=True)
    assert caught.value.status_code == 502  # not streamable: an HTTP error while that is possible
    validate_error(caught.value.body and {"error": caught.value.body})


# ---- streamed ------------------------------------------------------------------------------


def test_streamed_tool_calls_are_openai_chunks(proxy: RunningProxy, sims: Sims) -> None:
    chunks, _ = _chunks(proxy, {"model": "gpt-4o-mini", "tools": [WEATHER, TIME],
                                "messages": [{"role": "user", "content": "weather and time [tools:2]"}],
                                "stream_options": {"include_usage": True}})
    validate_chat_stream(chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant"}
    pieces = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert all(len(p) == 1 for p in pieces)
    firsts = [p[0] for p in pieces if "id" in p[0]]
    assert [(f["index"], f["type"], f["function"]["name"], f["function"]["arguments"]) for f in firsts] == [
        (0, "function", "get_weather", ""), (1, "function", "get_time", "")]
    later = [p[0] for p in pieces if "id" not in p[0]]
    assert later and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in later)
    assert len([p for p in later if p["index"] == 0]) > 1  # long arguments come in several pieces
    calls: dict[int, dict[str, Any]] = {}
    for piece in (p[0] for p in pieces):
        call = calls.setdefault(piece["index"], {"id": piece.get("id"), "function": {"name": "", "arguments": ""}})
        call["function"]["name"] += piece["function"].get("name", "")
        call["function"]["arguments"] += piece["function"].get("arguments", "")
    _valid_arguments(calls[0])
    _valid_arguments(calls[1])
    finishing = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["finish_reason"] for f in finishing] == ["tool_calls"] and finishing[0]["delta"] == {}
    assert chunks[-1]["usage"]["completion_tokens"] > 3


def test_sdk_stream_helpers_reassemble_tool_calls(client: openai.OpenAI, sims: Sims) -> None:
    class Weather(BaseModel):
        city: str
        unit: Literal["celsius", "fahrenheit"]

    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    with client.chat.completions.stream(model="gpt-4o-mini", tools=[tool, TIME],  # type: ignore[list-item]
                                        messages=[{"role": "user", "content": "[tools:all] Oslo"}]) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    calls = final.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert isinstance(calls[0].function.parsed_arguments, Weather)  # strict: parsed by the SDK
    assert final.choices[0].finish_reason == "tool_calls"
    # the plain stream, accumulated by hand as most frameworks do
    arguments: dict[int, str] = {}
    finish = None
    for chunk in client.chat.completions.create(model="gpt-4o-mini", tools=[WEATHER], stream=True,
                                                messages=[{"role": "user", "content": "Oslo"}]):
        for delta_call in chunk.choices[0].delta.tool_calls or ():
            arguments[delta_call.index] = arguments.get(delta_call.index, "") + (delta_call.function.arguments or "")  # type: ignore[union-attr]
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(arguments) == [0]
    _valid_arguments({"function": {"name": "get_weather", "arguments": arguments[0]}})


def test_streamed_answer_to_tool_results_and_n_two(proxy: RunningProxy, sims: Sims) -> None:
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    chunks, _ = _chunks(proxy, {"model": "gpt-4o-mini", "messages": history, "tools": [WEATHER]})
    validate_chat_stream(chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == TOOL_RESULTS + "get_weather: sunny"
    two, _ = _chunks(proxy, {"model": "gpt-4o-mini", "n": 2, "tools": [WEATHER],
                             "messages": [{"role": "user", "content": "Oslo"}]})
    validate_chat_stream(two)
    names = {(c["choices"][0]["index"], p["function"]["name"]) for c in two for p in
             c["choices"][0]["delta"].get("tool_calls", ()) if "id" in p}
    assert names == {(0, "get_weather"), (1, "get_weather")}


def test_a_failure_mid_stream_ends_it_with_an_error_event_and_is_logged(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims,
        capsys: pytest.CaptureFixture[str]) -> None:
    """n=2: the first choice streams, the second one's upstream call fails. With least_busy the
    calls take the keys in order (the first is busy when the second starts), and the second
    key answers an error."""
    proxy_config["providers"]["xffuw"]["strategy"] = "least_busy"
    proxy = start_proxy(proxy_config)
    sims.xffuw.chat_error_keys = {XFFUW_KEYS[1]}
    capsys.readouterr()
    chunks, lines = _chunks(proxy, {"model": "gpt-4o-mini", "n": 2, "messages": [{"role": "user", "content": "hi"}]})
    *streamed, failure = chunks
    validate_chat_stream(streamed)  # choice 0 whole
    assert {c["choices"][0]["index"] for c in streamed} == {0}
    validate_error(failure)
    assert failure["error"]["code"] == "upstream_error" and failure["error"]["type"] == "server_error"
    assert lines[-1] == "[DONE]"
    [entry] = logged_requests(capsys, 1, "/v1/chat/completions")
    assert entry["status"] == 200 and entry["stream_error"] == "upstream_error"
    with pytest.raises(openai.APIError, match="upstream"):  # the SDK raises on the error event
        list(proxy.client().chat.completions.create(model="gpt-4o-mini", n=2, stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]))


def test_any_exception_inside_a_stream_becomes_an_error_event() -> None:
    """A bug after the headers went out (here a RuntimeError from a choice's call) is never a
    silent 200: an internal_error event, noted for the access log."""
    import asyncio

    from litestar import Request

    from proxy.api.chat import _stream
    from proxy.gateway import StartedChat
    from proxy.openai.types import ChatCompletionRequest

    async def run() -> tuple[list[bytes], dict[str, Any]]:
        scope: Any = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b"",
                      "state": {"request_id": "req_test"}}
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(RuntimeError("a bug"))
        body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
        call = StartedChat(failed, [True])  # type: ignore[arg-type]  # a future in a task's place
        out = [piece async for piece in _stream(Request(scope), "chatcmpl-1", 0, body, [call], False)]
        return out, scope["state"]["access"]

    out, access = asyncio.run(run())
    assert out[-1] == b"data: [DONE]\n\n"
    error = json.loads(out[-2].removeprefix(b"data: "))
    validate_error(error)
    assert error["error"]["code"] == "internal_error" and "req_test" in error["error"]["message"]
    assert access == {"stream_error": "internal_error"}
