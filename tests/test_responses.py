"""POST /v1/responses and GET/DELETE /v1/responses/{id}: the Responses API over upstream chat."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
from conftest import CLIENT_KEY, OTHER_CLIENT_KEY, RunningProxy, Sims
from helpers import error_of
from jsonschema import Draft202012Validator
from openai_spec import validate_response_object, validate_response_stream
from pydantic import BaseModel

from proxy.sim.chat_model import TOOL_RESULTS
from proxy.sim.xffuw import CHAT_PREFIX

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
WEATHER: dict[str, Any] = {
    "type": "function", "name": "get_weather", "description": "The weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": ["string", "null"], "enum": ["c", "f", None]}},
                   "required": ["city", "unit"], "additionalProperties": False}}
TIME: dict[str, Any] = {"type": "function", "name": "get_time",
                        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}
EVENT_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done", "response.completed"]


def _create(proxy: RunningProxy, body: dict[str, Any], key: str = CLIENT_KEY) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/responses", headers={"authorization": f"Bearer {key}"}, json=body,
                      timeout=30)


def _ok(reply: httpx.Response) -> dict[str, Any]:
    assert reply.status_code == 200, reply.text
    body = reply.json()
    validate_response_object(body)
    return body


def _events(proxy: RunningProxy, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The SSE events of a streamed response; each `event:` line must name its data's type."""
    with httpx.stream("POST", f"{proxy.base_url}/responses", headers=AUTH, json={**body, "stream": True},
                      timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = reply.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(lines) == {"event", "data"}, block
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append(data)
    return events


def test_plain_response_has_output_usage_and_is_retrievable(proxy: RunningProxy, sims: Sims) -> None:
    body = _ok(_create(proxy, {"model": "gpt-4o-mini", "input": "你好", "instructions": "Answer briefly.",
                               "temperature": 0.4, "max_output_tokens": 64, "metadata": {"team": "a"}}))
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["status"] == "completed"
    assert body["model"] == "gpt-4o-mini" and body["instructions"] == "Answer briefly."
    assert body["metadata"] == {"team": "a"} and body["temperature"] == 0.4 and body["max_output_tokens"] == 64
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": CHAT_PREFIX + "你好", "annotations": [],
                                   "logprobs": []}]
    usage = body["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    sent = sims.xffuw.last_chat_body
    assert sent is not None
    assert sent["messages"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你好"}]
    assert (sent["temperature"], sent["max_tokens"]) == (0.4, 64)
    assert not {"input", "instructions", "metadata", "max_output_tokens", "store"} & set(sent)
    again = httpx.get(f"{proxy.base_url}/responses/{body['id']}", headers=AUTH)
    assert _ok(again) == body


def test_sdk_output_text_and_previous_response_id(client: openai.OpenAI, sims: Sims) -> None:
    first = client.responses.create(model="gpt-4o-mini", input="first question", instructions="only for turn one")
    assert first.output_text == CHAT_PREFIX + "first question"
    second = client.responses.create(model="gpt-4o-mini", input="second question", previous_response_id=first.id,
                                     instructions="turn two")
    assert second.output_text == CHAT_PREFIX + "second question"
    assert second.previous_response_id == first.id
    assert sims.xffuw.last_chat_body is not None
    assert sims.xffuw.last_chat_body["messages"] == [
        {"role": "system", "content": "turn two"},  # instructions do not carry over, as at OpenAI
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": CHAT_PREFIX + "first question"},
        {"role": "user", "content": "second question"},
    ]
    third = client.responses.create(model="gpt-4o-mini", input="third", previous_response_id=second.id)
    assert len(sims.xffuw.last_chat_body["messages"]) == 5
    assert client.responses.retrieve(third.id).output_text == CHAT_PREFIX + "third"


def test_conversations_belong_to_their_client(proxy: RunningProxy, sims: Sims) -> None:
    mine = _ok(_create(proxy, {"model": "gpt-4o-mini", "input": "secret plans"}))
    other = error_of(_create(proxy, {"model": "gpt-4o-mini", "input": "tell me", "previous_response_id": mine["id"]},
                           key=OTHER_CLIENT_KEY), 404)
    assert other["param"] == "previous_response_id" and mine["id"] in other["message"]
    peek = httpx.get(f"{proxy.base_url}/responses/{mine['id']}",
                     headers={"authorization": f"Bearer {OTHER_CLIENT_KEY}"})
    error_of(peek, 404)
    assert sims.xffuw.count("chat") == 1  # the refused continuation reached no upstream


def test_unknown_previous_response_id_is_a_404(proxy: RunningProxy, sims: Sims) -> None:
    error = error_of(_create(proxy, {"model": "gpt-4o-mini", "input": "x", "previous_response_id": "resp_nope"}), 404)
    assert error["param"] == "previous_response_id"
    assert error["type"] == "invalid_request_error"


def test_store_false_keeps_nothing_and_delete_forgets(proxy: RunningProxy, sims: Sims) -> None:
    unstored = _ok(_create(proxy, {"model": "gpt-4o-mini", "input": "x", "store": False}))
    assert unstored["store"] is False
    error_of(httpx.get(f"{proxy.base_url}/responses/{unstored['id']}", headers=AUTH), 404)
    stored = _ok(_create(proxy, {"model": "gpt-4o-mini", "input": "y"}))
    assert stored["store"] is True
    deleted = httpx.delete(f"{proxy.base_url}/responses/{stored['id']}", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    error_of(httpx.get(f"{proxy.base_url}/responses/{stored['id']}", headers=AUTH), 404)
    error_of(_create(proxy, {"model": "gpt-4o-mini", "input": "z", "previous_response_id": stored["id"]}), 404)


def test_stream_sends_the_responses_event_sequence(proxy: RunningProxy, sims: Sims) -> None:
    prompt = "a prompt long enough that the answer comes in several deltas"
    events = _events(proxy, {"model": "gpt-4o-mini", "input": prompt})
    validate_response_stream(events)
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 3
    assert kinds == EVENT_ORDER[:4] + ["response.output_text.delta"] * deltas + EVENT_ORDER[5:]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == CHAT_PREFIX + prompt
    assert events[2]["item"]["id"] == final["output"][0]["id"] == events[4]["item_id"]
    stored = httpx.get(f"{proxy.base_url}/responses/{final['id']}", headers=AUTH)
    assert _ok(stored) == final


def test_sdk_stream_and_stream_helper(client: openai.OpenAI, sims: Sims) -> None:
    with client.responses.create(model="gpt-4o-mini", input="streamed", stream=True) as stream:
        events = list(stream)
    assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == CHAT_PREFIX + "streamed"
    with client.responses.stream(model="gpt-4o-mini", input="helper") as helper:
        text = "".join(e.delta for e in helper if e.type == "response.output_text.delta")
        final = helper.get_final_response()
    assert text == final.output_text == CHAT_PREFIX + "helper"


def test_message_items_with_images_become_chat_parts(client: openai.OpenAI, sims: Sims) -> None:
    picture = "https://images.example.test/cat.png"
    result = client.responses.create(model="gpt-4o-mini", input=[
        {"role": "developer", "content": "You describe pictures."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": picture, "detail": "low"},
        ]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "A cat.", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Sure?"}]},
    ])
    assert result.output_text == CHAT_PREFIX + "Sure?"
    assert sims.xffuw.last_chat_body is not None
    assert sims.xffuw.last_chat_body["messages"] == [
        {"role": "developer", "content": "You describe pictures."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": picture, "detail": "low"}}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]


BUILT_IN_TOOLS: list[dict[str, Any]] = [
    {"type": "web_search"}, {"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "computer_use_preview", "display_width": 1024, "display_height": 768, "environment": "browser"},
    {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example.test"},
    {"type": "image_generation"}, {"type": "local_shell"}, {"type": "custom", "name": "grammar"},
]


def test_built_in_tools_are_refused_naming_their_type(proxy: RunningProxy, sims: Sims) -> None:
    for tool in BUILT_IN_TOOLS:  # after a function tool, so the index is checked too
        error = error_of(_create(proxy, {"model": "gpt-4o-mini", "input": "x", "tools": [WEATHER, tool]}), 400)
        assert error["param"] == "tools[1].type", error
        assert tool["type"] in error["message"] and "cannot run" in error["message"]
    assert sims.xffuw.count("chat") == 0


def test_empty_tools_list_is_fine(proxy: RunningProxy, sims: Sims) -> None:
    body = _ok(_create(proxy, {"model": "gpt-4o-mini", "input": "x", "tools": [], "tool_choice": "auto"}))
    assert body["tools"] == [] and body["tool_choice"] == "auto"


# (body fields beside the model, the param the 400 must name)
BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input[0].name"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c"}]}, "input[1].output"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c",
                 "output": [{"type": "input_image", "image_url": "https://x.test/a.png"}]}]},
     "input[1].output[0].type"),
    ({"input": "x", "tools": ["get_weather"]}, "tools[0]"),
    ({"input": "x", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    ({"input": "x", "tools": [{"type": "function", "name": "get weather!"}]}, "tools[0].name"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": "{}"}]}, "tools[0].parameters"),
    ({"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name"),  # chat's form
    ({"input": "x", "tools": [{"name": "f"}]}, "tools[0].type"),
    ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice.name"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search_preview"}},
     "tool_choice.type"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function"}},
     "tool_choice.name"),
    ({"input": "x", "text": {"format": "x"}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x"}]}]},
     "input[0].content[0].image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "javascript:alert(1)"}]}]},
     "input[0].content[0].image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://a.example/x.png",
                                              "detail": "max"}]}]}, "input[0].content[0].detail"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "temperature": "warm"}, "temperature"),
]


def test_bad_requests_name_the_field(proxy: RunningProxy, sims: Sims) -> None:
    for body, param in BAD_REQUESTS:  # one proxy for the whole table
        error = error_of(_create(proxy, {"model": "gpt-4o-mini", **body}), 400)
        assert error["param"] == param, (body, error)
    assert sims.xffuw.count("chat") == 0


def test_image_model_is_refused(proxy: RunningProxy, sims: Sims) -> None:
    error = error_of(_create(proxy, {"model": "gpt-image-2", "input": "x"}), 400)
    assert (error["param"], error["code"]) == ("model", "model_not_supported")


# ---- function tools ---------------------------------------------------------------------


def test_function_tools_become_chat_tools_and_calls_come_back_as_items(proxy: RunningProxy, sims: Sims) -> None:
    body = _ok(_create(proxy, {"model": "gpt-4o-mini", "input": "weather and time? [tools:2]",
                               "tools": [WEATHER, TIME], "tool_choice": "auto", "parallel_tool_calls": True}))
    assert [item["type"] for item in body["output"]] == ["function_call", "function_call"]
    first, second = body["output"]
    assert (first["name"], second["name"]) == ("get_weather", "get_time")
    for item in body["output"]:
        assert item["id"].startswith("fc_") and item["call_id"].startswith("call_") and item["status"] == "completed"
    arguments = json.loads(first["arguments"])
    Draft202012Validator(WEATHER["parameters"]).validate(arguments)
    assert body["tools"] == [WEATHER, {**TIME, "description": None, "strict": None}]  # echoed, nulls included
    assert body["tool_choice"] == "auto" and body["usage"]["output_tokens"] > 3
    sent = sims.xffuw.last_chat_body
    assert sent is not None
    assert sent["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                          "parameters": WEATHER["parameters"], "strict": True}},
        {"type": "function", "function": {"name": "get_time", "parameters": TIME["parameters"]}}]
    assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("auto", True)
    forced = _ok(_create(proxy, {"model": "gpt-4o-mini", "input": "time?", "tools": [WEATHER, TIME],
                                 "tool_choice": {"type": "function", "name": "get_time"}}))
    assert [item["name"] for item in forced["output"]] == ["get_time"]
    assert sims.xffuw.last_chat_body["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert forced["tool_choice"] == {"type": "function", "name": "get_time"}
    plain = _ok(_create(proxy, {"model": "gpt-4o-mini", "input": "hi", "tools": [WEATHER], "tool_choice": "none"}))
    assert [item["type"] for item in plain["output"]] == ["message"]


def test_two_turns_with_function_call_output_and_previous_response_id(client: openai.OpenAI, sims: Sims) -> None:
    first = client.responses.create(model="gpt-4o-mini", input="weather in Oslo?", tools=[WEATHER])  # type: ignore[list-item]
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"]
    second = client.responses.create(model="gpt-4o-mini", previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "-3°C, snow"}])
    assert second.output_text == TOOL_RESULTS + "get_weather: -3°C, snow"
    sent = sims.xffuw.last_chat_body
    assert sent is not None and sent["messages"] == [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "-3°C, snow"}]
    third = client.responses.create(model="gpt-4o-mini", previous_response_id=second.id, input="thanks")
    assert third.output_text == CHAT_PREFIX + "thanks"
    assert len(sims.xffuw.last_chat_body["messages"]) == 5  # the stored conversation kept the call and its output
    assert client.responses.retrieve(first.id).output[0].type == "function_call"


def test_function_call_items_echoed_back_without_previous_response_id(client: openai.OpenAI, sims: Sims) -> None:
    """As stateless clients do (openai-agents with store off, the AI SDK): the whole history each turn."""
    first = client.responses.create(model="gpt-4o-mini", input="time and weather [tools:all]",
                                    tools=[WEATHER, TIME], store=False)  # type: ignore[list-item]
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 2
    history: list[Any] = [{"role": "user", "content": "time and weather [tools:all]"},
                          *[c.model_dump(exclude_none=True) for c in calls],
                          *[{"type": "function_call_output", "call_id": c.call_id,
                             "output": [{"type": "input_text", "text": f"result {i}"}]} for i, c in enumerate(calls)]]
    second = client.responses.create(model="gpt-4o-mini", input=history, tools=[WEATHER, TIME])  # type: ignore[list-item]
    assert second.output_text == TOOL_RESULTS + "get_weather: result 0; get_time: result 1"
    messages = sims.xffuw.last_chat_body["messages"]  # type: ignore[index]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == [c.call_id for c in calls]  # one turn, both calls


def test_streamed_function_calls_send_the_function_call_events(proxy: RunningProxy, sims: Sims) -> None:
    events = _events(proxy, {"model": "gpt-4o-mini", "input": "both [tools:2]", "tools": [WEATHER, TIME]})
    validate_response_stream(events)
    kinds = [e["type"] for e in events]
    per_call = ["response.output_item.added", "response.function_call_arguments.delta",
                "response.function_call_arguments.done", "response.output_item.done"]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == ["response.created", "response.in_progress", *per_call, *per_call, "response.completed"]
    final = events[-1]["response"]
    for index, item in enumerate(final["output"]):
        added = next(e for e in events if e["type"] == "response.output_item.added" and e["output_index"] == index)
        assert added["item"]["status"] == "in_progress" and added["item"]["arguments"] == ""
        assert added["item"]["id"] == item["id"] and added["item"]["call_id"] == item["call_id"]
        deltas = "".join(e["delta"] for e in events
                         if e["type"] == "response.function_call_arguments.delta" and e["item_id"] == item["id"])
        done = next(e for e in events if e["type"] == "response.function_call_arguments.done"
                    and e["item_id"] == item["id"])
        assert deltas == done["arguments"] == item["arguments"] and done["name"] == item["name"]
    assert _ok(httpx.get(f"{proxy.base_url}/responses/{final['id']}", headers=AUTH)) == final


def test_sdk_stream_helper_collects_function_calls(client: openai.OpenAI, sims: Sims) -> None:
    with client.responses.stream(model="gpt-4o-mini", input="weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    Draft202012Validator(WEATHER["parameters"]).validate(json.loads(call.arguments))


def test_structured_output_with_text_format_still_works(client: openai.OpenAI, sims: Sims) -> None:
    class Film(BaseModel):
        title: str
        year: int

    parsed = client.responses.parse(model="gpt-4o-mini", input="a film", text_format=Film)
    assert isinstance(parsed.output_parsed, Film)
    sent = sims.xffuw.last_chat_body
    assert sent is not None and sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["name"] == "Film"
