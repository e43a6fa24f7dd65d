"""What the simulated chat model answers when a request asks for more than an echo: tool
calls, an answer to tool results, JSON shaped by a schema. A real model decides; this one
follows rules, so tests know what comes back.

- `tools` sent and `tool_choice` not "none": with the last message from the user (or a
  forced `tool_choice`: "required" or a named function, whatever the last message), it
  calls a tool, finish_reason "tool_calls", content null. Which tool: the one
  `tool_choice` names; else the first not yet called in this conversation (else the first).
  In the last user message, `[tools:N]` makes N calls (the tools in order from that one,
  round again if needed) and `[tools:all]` one call per tool; `[no-tools]` answers as if
  no tools had been sent.
- Arguments are generated from the tool's JSON-schema `parameters`: valid (types, enums,
  consts, bounds, lengths, formats, required fields, nested objects and arrays, `$ref`s,
  unions), and the same for the same schema.
- With the last message(s) `tool` results and no forced tool: a text answer naming every
  result, `TOOL_RESULTS` + "name: content; name: content", finish_reason "stop".
- `response_format` json_schema: the content is a JSON document valid against the schema;
  json_object: one valid against the first JSON schema found in the messages (instructor's
  JSON mode and the AI SDK put it in the system prompt), else `{"answer": <last user text>}`.
"""

from __future__ import annotations

import json
import re
import re._parser as _regex  # type: ignore[import-not-found]  # the stdlib's regex parser: patterns are spelled from its tree
from collections.abc import Callable
from typing import Any

from proxy.sim.faults import Markers

TOOL_RESULTS = "Tool results: "
DEEP = 4  # below this depth objects get only their required fields, arrays their minimum
_FORMATS = {
    "date-time": "2024-01-01T12:00:00Z", "date": "2024-01-01", "time": "12:00:00Z", "duration": "PT1H",
    "email": "user@example.com", "idn-email": "user@example.com", "uri": "https://example.com/",
    "url": "https://example.com/", "iri": "https://example.com/", "uri-reference": "https://example.com/",
    "uuid": "123e4567-e89b-42d3-a456-426614174000", "hostname": "example.com", "idn-hostname": "example.com",
    "ipv4": "192.0.2.1", "ipv6": "2001:db8::1",
}


def text_of(content: object) -> str:
    """Text of a message content: a string or a list of parts (text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return ""


def answer(body: dict[str, Any], markers: Markers, new_call_id: Callable[[], str]) -> dict[str, Any] | None:
    """The first choice of a chat answer (message and finish_reason), or None where the plain
    echo answers (no usable tools, no response_format, no tool results). `markers` are those of
    the last user message."""
    messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
    last = messages[-1] if messages else {}
    tools = [t["function"] for t in body.get("tools") or () if isinstance(t, dict)
             and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)]
    choice = body.get("tool_choice")
    user_text = next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    forced = choice == "required" or isinstance(choice, dict)
    if tools and choice != "none" and not markers.no_tools and (forced or last.get("role") == "user"):
        calls = _tool_calls(tools, choice, messages, markers, new_call_id)
        return {"message": {"role": "assistant", "content": None, "tool_calls": calls}, "finish_reason": "tool_calls"}
    form = body.get("response_format")
    if isinstance(form, dict) and form.get("type") in ("json_schema", "json_object"):
        content = json.dumps(_document(form, messages, user_text), ensure_ascii=False)
        return {"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if last.get("role") == "tool":
        return {"message": {"role": "assistant", "content": TOOL_RESULTS + tool_results(messages)},
                "finish_reason": "stop"}
    return None


def _called(messages: list[dict[str, Any]]) -> dict[str, str]:
    """Tool call id -> function name, for every call the assistant made in the conversation."""
    names: dict[str, str] = {}
    for message in messages:
        if message.get("role") != "assistant" or not isinstance(message.get("tool_calls"), list):
            continue
        for call in message["tool_calls"]:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                names[str(call.get("id"))] = str(function.get("name"))
    return names


def tool_results(messages: list[dict[str, Any]]) -> str:
    """The trailing `tool` messages as "name: content; name: content"."""
    names = _called(messages)
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        name = names.get(str(message.get("tool_call_id"))) or message.get("name") or "tool"
        results.append(f"{name}: {text_of(message.get('content'))}")
    return "; ".join(reversed(results))


def _tool_calls(tools: list[dict[str, Any]], choice: Any, messages: list[dict[str, Any]], markers: Markers,
                new_call_id: Callable[[], str]) -> list[dict[str, Any]]:
    names = [t["name"] for t in tools]
    named = None
    if isinstance(choice, dict):  # chat's {"type": "function", "function": {"name": ...}}, or Responses' form
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else choice.get("name")
    if named in names:
        order = [named]
    else:
        called = set(_called(messages).values())
        start = next((i for i, name in enumerate(names) if name not in called), 0)
        order = names[start:] + names[:start]
    if markers.tool_calls == "all":
        order = names
    count = len(order) if markers.tool_calls == "all" else markers.tool_calls or 1
    chosen = [order[i % len(order)] for i in range(count)]
    by_name = {t["name"]: t for t in tools}
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": name,
                          "arguments": json.dumps(instance(by_name[name].get("parameters") or {"type": "object"}),
                                                  ensure_ascii=False)}}
            for name in chosen]


def _document(form: dict[str, Any], messages: list[dict[str, Any]], user_text: str) -> Any:
    if form["type"] == "json_schema":
        spec = form.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return instance(schema)
    found = find_schema(" ".join(text_of(m.get("content")) for m in messages))
    return instance(found) if found is not None else {"answer": user_text}


def find_schema(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text` that looks like a JSON schema."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict) and ("properties" in value or "$defs" in value or value.get("type") == "object"):
            return value
        start = text.find("{", end)
    return None


# ---- a valid instance of a JSON schema ---------------------------------------------------


def instance(schema: Any) -> Any:
    """A deterministic document valid against `schema` (the subset models are given)."""
    return _Maker(schema if isinstance(schema, dict) else {}).make(schema, "value", 0, 0)


class _Maker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def resolve(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        """The schema with its `$ref` and `allOf` folded in."""
        while isinstance(schema.get("$ref"), str) and depth < 64:
            target: Any = self.root
            for part in schema["$ref"].lstrip("#").split("/"):
                if part:
                    part = part.replace("~1", "/").replace("~0", "~")
                    target = target.get(part, {}) if isinstance(target, dict) else {}
            schema = {**(target if isinstance(target, dict) else {}),
                      **{k: v for k, v in schema.items() if k != "$ref"}}
            depth += 1
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    part = self.resolve(part, depth + 1)
                    merged["properties"] = {**part.get("properties", {}), **merged.get("properties", {})}
                    merged["required"] = [*part.get("required", []), *merged.get("required", [])]
                    merged.update({k: v for k, v in part.items() if k not in ("properties", "required")
                                   and k not in merged})
            schema = merged
        return schema

    def make(self, schema: Any, name: str, depth: int, variant: int) -> Any:
        if schema is True or not isinstance(schema, dict):
            return name
        schema = self.resolve(schema, depth)
        deep = depth >= DEEP
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            options = schema["enum"]
            return None if deep and None in options else options[variant % len(options)]
        for union in ("anyOf", "oneOf"):
            branches = [b for b in schema.get(union) or () if isinstance(b, dict)]
            if branches:
                null = [b for b in branches if b.get("type") == "null"]
                others = [b for b in branches if b.get("type") != "null"]
                if (deep and null) or not others:
                    return None
                base = {k: v for k, v in schema.items() if k != union}
                return self.make({**base, **others[0]}, name, depth, variant)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            if (deep and "null" in kind) or not kinds:
                return None
            kind = kinds[0]
        if kind is None:
            kind = ("object" if "properties" in schema or "additionalProperties" in schema
                    else "array" if "items" in schema or "prefixItems" in schema else "string")
        if kind == "object":
            return self.object(schema, depth, variant)
        if kind == "array":
            return self.array(schema, name, depth)
        if kind == "integer":
            return self.number(schema, 1 + variant, integer=True)
        if kind == "number":
            return self.number(schema, 1.5 + variant, integer=False)
        if kind == "boolean":
            return variant % 2 == 0
        if kind == "null":
            return None
        return self.string(schema, name, variant)

    def object(self, schema: dict[str, Any], depth: int, variant: int) -> dict[str, Any]:
        found = schema.get("properties")
        properties: dict[str, Any] = found if isinstance(found, dict) else {}
        required = [r for r in schema.get("required") or () if isinstance(r, str)]
        names = [n for n in properties if n in required] if depth >= DEEP else list(properties)
        out = {n: self.make(properties[n], n, depth + 1, variant) for n in names}
        for n in required:
            if n not in out:  # required but not described: any value does
                out[n] = self.make(schema.get("additionalProperties", {}), n, depth + 1, variant)
        extra = schema.get("additionalProperties")
        wanted = _count(schema, "minProperties") or 0
        i = 0
        while len(out) < wanted and extra is not False:
            i += 1
            out[f"key{i}"] = self.make(extra if isinstance(extra, dict) else {}, f"key{i}", depth + 1, variant)
        return out

    def array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        prefix = [p for p in schema.get("prefixItems") or () if isinstance(p, dict)]
        low, high = _count(schema, "minItems") or 0, _count(schema, "maxItems")
        count = max(low, len(prefix), 0 if depth >= DEEP else 1)
        if high is not None:
            count = min(count, high)
        items = schema.get("items", {})
        item = name[:-1] if name.endswith("s") and len(name) > 1 else name
        return [self.make(prefix[i] if i < len(prefix) else items, item, depth + 1, i) for i in range(count)]

    @staticmethod
    def number(schema: dict[str, Any], value: float, integer: bool) -> int | float:
        def bound(key: str) -> float | None:
            found = schema.get(key)
            return float(found) if isinstance(found, int | float) and not isinstance(found, bool) else None

        low, high, above, below, step = (bound(k) for k in ("minimum", "maximum", "exclusiveMinimum",
                                                             "exclusiveMaximum", "multipleOf"))

        def fits(v: float) -> bool:
            return ((low is None or v >= low) and (high is None or v <= high) and (above is None or v > above)
                    and (below is None or v < below) and (not integer or v == int(v))
                    and (not step or abs(v / step - round(v / step)) < 1e-9))

        floor = max((b for b in (low, above) if b is not None), default=None)
        ceiling = min((b for b in (high, below) if b is not None), default=None)
        candidates = [value]
        for edge in (floor, ceiling):
            if edge is not None:
                candidates += [edge, edge + 1, edge - 1, edge + 0.5, edge - 0.5]
        if floor is not None and ceiling is not None:
            candidates.append((floor + ceiling) / 2)
        if step:
            anchor = floor if floor is not None else ceiling if ceiling is not None else value
            k = -(-anchor // step)
            candidates += [step * (k + i) for i in (0, 1, -1, 2, -2)]
        for candidate in candidates:
            candidate = float(int(candidate)) if integer and candidate == int(candidate) else candidate
            if fits(candidate):
                return int(candidate) if integer else candidate
        if integer and floor is not None:
            for candidate in range(int(floor), int(floor) + 3):
                if fits(candidate):
                    return candidate
        return int(value) if integer else value

    @staticmethod
    def string(schema: dict[str, Any], name: str, variant: int) -> str:
        form = schema.get("format")
        if isinstance(form, str) and form in _FORMATS:
            return _FORMATS[form]
        value = name if variant == 0 else f"{name} {variant + 1}"
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            value = _matching(pattern, value)
        low, high = _count(schema, "minLength") or 0, _count(schema, "maxLength")
        if len(value) < low:
            value += "x" * (low - len(value))
        if high is not None:
            value = value[:high]
        return value


def _count(schema: dict[str, Any], key: str) -> int | None:
    """A length bound (minItems, maxLength, ...) if the schema gives a usable one."""
    value = schema.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _matching(pattern: str, preferred: str) -> str:
    """`preferred` if the pattern matches it, else the shortest string the pattern's parse
    tree spells (literals, classes, repeats at their minimum, first branches)."""
    try:
        if re.search(pattern, preferred):
            return preferred
        made = "".join(_spell(node) for node in _regex.parse(pattern))
        return made if re.search(pattern, made) else preferred
    except (re.error, ValueError, TypeError, IndexError):  # a pattern beyond this little speller
        return preferred


_CATEGORY_CHARS = {"CATEGORY_DIGIT": "0", "CATEGORY_NOT_DIGIT": "a", "CATEGORY_WORD": "a",
                   "CATEGORY_NOT_WORD": "-", "CATEGORY_SPACE": " ", "CATEGORY_NOT_SPACE": "a"}


def _spell(node: tuple[Any, Any]) -> str:
    op, value = node
    kind = str(op)
    if kind == "LITERAL":
        return chr(value)
    if kind == "AT":
        return ""
    if kind == "NOT_LITERAL":
        return "a" if value != ord("a") else "b"
    if kind == "ANY":
        return "a"
    if kind == "IN":
        return _one_of(value)
    if kind in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        low, _high, inner = value
        return "".join(_spell(n) for n in inner) * low
    if kind == "SUBPATTERN":
        return "".join(_spell(n) for n in value[-1])
    if kind == "ATOMIC_GROUP":
        return "".join(_spell(n) for n in value)
    if kind == "BRANCH":
        return "".join(_spell(n) for n in value[1][0])
    raise ValueError(kind)


def _one_of(items: list[tuple[Any, Any]]) -> str:
    """A character a [class] accepts."""
    negate = any(str(op) == "NEGATE" for op, _ in items)
    if not negate:
        op, value = items[0]
        kind = str(op)
        return (chr(value) if kind == "LITERAL" else chr(value[0]) if kind == "RANGE"
                else _CATEGORY_CHARS[str(value)])
    excluded = "[" + "".join(_class_text(op, value) for op, value in items) + "]"
    return next(c for c in "aAx0_-. " if re.fullmatch(excluded, c))


def _class_text(op: Any, value: Any) -> str:
    kind = str(op)
    if kind == "NEGATE":
        return "^"
    if kind == "LITERAL":
        return re.escape(chr(value))
    if kind == "RANGE":
        return re.escape(chr(value[0])) + "-" + re.escape(chr(value[1]))
    return {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_WORD": r"\w",
            "CATEGORY_NOT_WORD": r"\W", "CATEGORY_SPACE": r"\s", "CATEGORY_NOT_SPACE": r"\S"}[str(value)]
