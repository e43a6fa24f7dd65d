"""Regenerate ``openai-openapi.subset.json`` (beside this script) from OpenAI's full OpenAPI spec.

A developer tool, run by hand when OpenAI's spec changes; the tests read only its output::

    .venv/bin/python tests/openai_spec/regenerate.py path/to/openai-openapi.yaml

The full spec is ``openapi.yaml`` of https://github.com/openai/openai-openapi (MIT). The subset
keeps what ``tests/openai_spec.py`` validates against: the component schemas in ``ROOTS``, the
operations under ``PATHS``, and every schema those reach through ``$ref``. It is written already
normalised to JSON Schema 2020-12, so loading it is one ``json.loads``. The output depends only
on the input: running this twice gives the same bytes.

How the OpenAPI 3.1 document is made a valid JSON Schema 2020-12 (checked by grepping the spec):

* ``nullable: true`` (OpenAPI 3.0 leftover, ~110 places, e.g. the stream
  chunk's ``finish_reason`` and ``usage``) becomes ``type: [T, "null"]`` (and
  ``null`` is added to an ``enum``) or ``anyOf: [schema, {type: null}]``; an
  ``allOf`` member that is only ``{nullable: true}`` makes its parent nullable.
* ``exclusiveMinimum: true`` + ``minimum: m`` (3.0 boolean form) becomes
  ``exclusiveMinimum: m``.
* ``discriminator`` + ``oneOf``/``anyOf`` of ``$ref``\\ s is compiled into a
  dispatch on the property value (``if``/``then``), which is what the
  discriminator means and gives precise errors; unions it cannot resolve fall
  back to ``anyOf`` (overlapping ``oneOf`` branches would otherwise reject
  valid objects).
* ``$recursiveAnchor``/``$recursiveRef: "#"`` (2019-09, in ``CompoundFilter``)
  become a ``$ref`` to the enclosing component; repeated ``required`` names
  (``ContainerResource``) are de-duplicated.  Every normalised schema passes
  the 2020-12 metaschema (checked here before writing).
* ``x-*`` keys, ``description``, ``title``, ``example(s)`` are dropped.
* ``format`` (``unixtime``, ``uri``, ``double``, ``int64``, ``date``, ...) stays
  an annotation: not asserted.

Besides ``info`` (title, version), ``components.schemas`` and ``operations`` (path template ->
method -> status -> content type -> schema), the file holds ``unions`` (for a union of
``$ref``\\ s told apart by ``type``, e.g. ``ResponseStreamEvent``: type value -> schema name),
``source`` (the full spec's sha256 and the roots kept) and one derived schema that is not in the
spec, ``x-proxy-CreateCompletionStreamChunk``: OpenAI streams legacy completions as
``CreateCompletionResponse`` objects whose ``finish_reason`` is null until the end.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import yaml
from jsonschema import Draft202012Validator

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "openai-openapi.subset.json"

#: Component schemas the tests validate by name (tests/openai_spec.py's table).
ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "Response",
    "ResponseStreamEvent",
    "ImagesResponse",
    "ImageGenStreamEvent",
    "ImageEditStreamEvent",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "Error",
)
#: Operations kept, by path (with everything below it): the OpenAI routes the proxy serves.
PATHS = ("/chat/completions", "/completions", "/responses", "/images", "/models")

#: Derived schema (not in the spec) for one legacy ``/completions`` stream chunk.
COMPLETION_STREAM_CHUNK = "x-proxy-CreateCompletionStreamChunk"
_SCHEMAS_PTR = "/components/schemas/"

_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
_ONE_SCHEMA = frozenset(
    {
        "items",
        "additionalProperties",
        "not",
        "contains",
        "propertyNames",
        "if",
        "then",
        "else",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contentSchema",
    }
)
_SCHEMA_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_MAP = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas"})
_DROP = frozenset({"description", "title", "example", "examples", "$comment", "externalDocs", "xml"})
_COMPOSITE = frozenset({"$ref", "allOf", "anyOf", "oneOf", "not", "const", "if"})

Schema = dict[str, Any]


def _escape(segment: str) -> str:
    return quote(segment.replace("~", "~0").replace("/", "~1"), safe="~")


# --------------------------------------------------------------------------
# OpenAPI 3.1 (with 3.0 leftovers) -> JSON Schema 2020-12
# --------------------------------------------------------------------------


def _is_nullable_marker(schema: object) -> bool:
    """``{nullable: true}`` alone (plus annotations): an OpenAPI 3.0 idiom in allOf."""
    if not isinstance(schema, dict) or schema.get("nullable") is not True:
        return False
    return all(k == "nullable" or k in _DROP or k.startswith("x-") for k in schema)


def _norm(schema: Any, root: str) -> Any:
    """Normalise one schema; ``root`` is the JSON pointer of the enclosing component."""
    if not isinstance(schema, dict):
        return schema  # boolean schema
    nullable = schema.get("nullable") is True
    out: Schema = {}
    for key, value in schema.items():
        if key in _DROP or key.startswith("x-") or key in ("nullable", "$recursiveAnchor"):
            continue
        if key == "$recursiveRef":  # 2019-09 self-reference (CompoundFilter)
            out["$ref"] = f"#{root}" if value == "#" else value
        elif key in _ONE_SCHEMA:
            out[key] = _norm(value, root)
        elif key in _SCHEMA_LIST:
            members = value
            if key == "allOf" and any(_is_nullable_marker(m) for m in members):
                nullable = True
                members = [m for m in members if not _is_nullable_marker(m)]
                if not members:
                    continue
            out[key] = [_norm(m, root) for m in members]
        elif key in _SCHEMA_MAP:
            out[key] = {name: _norm(sub, root) for name, sub in value.items()}
        elif key == "required" and isinstance(value, list):
            out[key] = list(dict.fromkeys(value))  # the spec repeats some names
        else:
            out[key] = value
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(exclusive), bool):
            if out.pop(exclusive) and bound in out:
                out[exclusive] = out.pop(bound)
    if nullable:
        out = _make_nullable(out)
    return out


def _make_nullable(schema: Schema) -> Schema:
    kind = schema.get("type")
    if kind is not None and not _COMPOSITE.intersection(schema):
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if "null" not in kinds:
            schema["type"] = [*kinds, "null"]
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def _discriminator_values(
    schemas: Mapping[str, Any], branch: Any, prop: str, depth: int = 0
) -> list[Any] | None:
    """The values of ``prop`` a (normalised) union branch accepts, if stated."""
    if not isinstance(branch, dict) or depth > 8:
        return None
    ref = branch.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#" + _SCHEMAS_PTR):
            return None
        return _discriminator_values(schemas, schemas.get(ref[len(_SCHEMAS_PTR) + 1 :]), prop, depth + 1)
    sub = branch.get("properties", {}).get(prop)
    if isinstance(sub, dict):
        if "const" in sub:
            return [sub["const"]]
        if isinstance(sub.get("enum"), list):
            return [v for v in sub["enum"] if v is not None]
    for member in branch.get("allOf", []):
        found = _discriminator_values(schemas, member, prop, depth + 1)
        if found:
            return found
    return None


def _compile_discriminators(node: Any, schemas: Mapping[str, Any]) -> Any:
    """Replace ``discriminator`` unions by a dispatch on the property value."""
    if isinstance(node, list):
        return [_compile_discriminators(n, schemas) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _compile_discriminators(v, schemas) for k, v in node.items()}
    disc = node.pop("discriminator", None)
    if not isinstance(disc, dict):
        return node
    union_key = "oneOf" if "oneOf" in node else "anyOf" if "anyOf" in node else None
    if union_key is None:
        return node
    prop = disc.get("propertyName")
    branches = node[union_key]
    by_value: dict[Any, list[Any]] = {}
    for branch in branches:
        values = _discriminator_values(schemas, branch, prop) if isinstance(prop, str) else None
        if not values:
            node.pop(union_key)
            node["anyOf"] = branches  # unresolvable: at least one branch must match
            return node
        for value in values:
            by_value.setdefault(value, []).append(branch)
    node.pop(union_key)
    node.setdefault("type", "object")
    node["required"] = sorted({*node.get("required", []), prop})
    props = dict(node.get("properties", {}))
    props[prop] = (
        {"allOf": [props[prop], {"enum": list(by_value)}]} if prop in props else {"enum": list(by_value)}
    )
    node["properties"] = props
    dispatch = [
        {
            "if": {"properties": {prop: {"const": value}}, "required": [prop]},
            "then": group[0] if len(group) == 1 else {"anyOf": group},
        }
        for value, group in by_value.items()
    ]
    node["allOf"] = [*node.get("allOf", []), *dispatch]
    return node


def _union_tables(schemas: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """For unions of ``$ref``\\ s told apart by ``type``: type value -> schema name."""
    tables: dict[str, dict[str, str]] = {}
    for name, schema in schemas.items():
        branches = (schema.get("anyOf") or schema.get("oneOf")) if isinstance(schema, dict) else None
        if not branches or not all(isinstance(b, dict) and "$ref" in b for b in branches):
            continue
        table: dict[str, str] = {}
        for branch in branches:
            target = branch["$ref"].removeprefix("#" + _SCHEMAS_PTR)
            values = _discriminator_values(schemas, branch, "type")
            if not values or target not in schemas:
                table = {}
                break
            for value in values:
                table.setdefault(value, target)
        if table:
            tables[name] = table
    return tables


def _resolve_local(doc: Mapping[str, Any], obj: Any) -> Any:
    seen = 0
    while isinstance(obj, dict) and isinstance(obj.get("$ref"), str) and seen < 16:
        target: Any = doc
        for part in obj["$ref"].lstrip("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        obj, seen = target, seen + 1
    return obj


def _normalise(parsed: Mapping[str, Any]) -> dict[str, Any]:
    raw_schemas = parsed.get("components", {}).get("schemas", {})
    schemas = {name: _norm(s, _SCHEMAS_PTR + _escape(name)) for name, s in raw_schemas.items()}
    unions = _union_tables(schemas)
    schemas = {name: _compile_discriminators(s, schemas) for name, s in schemas.items()}
    operations: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for template, item in parsed.get("paths", {}).items():
        item = _resolve_local(parsed, item)
        for method, op in item.items():
            if method not in _HTTP_METHODS or not isinstance(op, dict):
                continue
            statuses: dict[str, dict[str, Any]] = {}
            for status, resp in op.get("responses", {}).items():
                resp = _resolve_local(parsed, resp)
                content = resp.get("content") or {}
                statuses[str(status)] = {
                    ctype: _compile_discriminators(_norm(media["schema"], ""), schemas)
                    for ctype, media in content.items()
                    if isinstance(media, dict) and "schema" in media
                }
            operations.setdefault(template, {})[method] = statuses
    schemas[COMPLETION_STREAM_CHUNK] = _completion_stream_chunk(schemas)
    return {"components": {"schemas": schemas}, "operations": operations, "unions": unions}


def _completion_stream_chunk(schemas: Mapping[str, Any]) -> Schema:
    """CreateCompletionResponse with the stream's ``finish_reason: null``/``usage: null``."""
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = _make_nullable(choice["properties"]["finish_reason"])
    if "usage" in chunk["properties"]:
        chunk["properties"]["usage"] = _make_nullable(chunk["properties"]["usage"])
    return chunk



# --------------------------------------------------------------------------
# The subset: roots, operations and their $ref closure
# --------------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _ref_name(ref: str) -> str:
    """``#/components/schemas/<name>[/...]`` -> ``<name>``; any other target is an error."""
    if not ref.startswith("#" + _SCHEMAS_PTR):
        raise SystemExit(f"unexpected $ref {ref!r}: the subset holds component schemas only")
    first = ref[len(_SCHEMAS_PTR) + 1 :].split("/")[0]
    return unquote(first).replace("~1", "/").replace("~0", "~")


def _closure(schemas: Mapping[str, Any], start: list[Any]) -> list[str]:
    """Names of the schemas reachable through ``$ref`` from the nodes in ``start``."""
    seen: set[str] = set()
    todo = [_ref_name(ref) for node in start for ref in _refs(node)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise SystemExit(f"$ref to a schema the spec lacks: {name!r}")
        seen.add(name)
        todo.extend(_ref_name(ref) for ref in _refs(schemas[name]))
    return sorted(seen)


def _kept(template: str) -> bool:
    path = template.partition("?")[0]
    return any(path == p or path.startswith(p + "/") for p in PATHS)


def subset(parsed: Mapping[str, Any], digest: str) -> dict[str, Any]:
    full = _normalise(parsed)
    schemas = full["components"]["schemas"]
    missing = [name for name in ROOTS if name not in schemas]
    if missing:
        raise SystemExit(f"the spec has no schema {missing}")
    operations = {t: ops for t, ops in full["operations"].items() if _kept(t)}
    if not operations:
        raise SystemExit(f"the spec has no operation under {PATHS}")
    start = [{"$ref": f"#{_SCHEMAS_PTR}{_escape(name)}"} for name in (*ROOTS, COMPLETION_STREAM_CHUNK)]
    names = _closure(schemas, [*start, operations])
    info = parsed.get("info", {})
    return {
        "info": {"title": info.get("title"), "version": info.get("version")},
        "source": {
            "url": "https://github.com/openai/openai-openapi",
            "sha256": digest,
            "schemas": list(ROOTS),
            "paths": list(PATHS),
        },
        "unions": {name: table for name, table in full["unions"].items() if name in names},
        "operations": operations,
        "components": {"schemas": {name: schemas[name] for name in names}},
    }


def _check_schemas(doc: Mapping[str, Any]) -> None:
    """Every schema passes the 2020-12 metaschema and every ``$ref`` resolves inside the file."""
    schemas = doc["components"]["schemas"]
    everything = [*schemas.values()] + [
        schema
        for methods in doc["operations"].values()
        for statuses in methods.values()
        for content in statuses.values()
        for schema in content.values()
    ]
    for schema in everything:
        Draft202012Validator.check_schema(schema)
        for ref in _refs(schema):
            if _ref_name(ref) not in schemas:
                raise SystemExit(f"$ref {ref!r} does not resolve inside the subset")


# --------------------------------------------------------------------------
# Writing: one schema (or operation) a line, so a spec update diffs by schema
# --------------------------------------------------------------------------


def _one(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _lines(mapping: Mapping[str, Any]) -> str:
    return "{\n" + ",\n".join(f"{_one(k)}:{_one(v)}" for k, v in mapping.items()) + "\n}"


def dumps(doc: Mapping[str, Any]) -> str:
    text = (
        "{\n"
        f'"info":{_one(doc["info"])},\n'
        f'"source":{_one(doc["source"])},\n'
        f'"unions":{_lines(doc["unions"])},\n'
        f'"operations":{_lines(doc["operations"])},\n'
        f'"components":{{"schemas":{_lines(doc["components"]["schemas"])}}}\n'
        "}\n"
    )
    if json.loads(text) != doc:
        raise SystemExit("the writer lost something: its output does not read back as the subset")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="OpenAI's full openapi.yaml")
    args = parser.parse_args(argv)
    if not args.spec.is_file():
        parser.error(f"no spec at {args.spec}: pass the path of OpenAI's openapi.yaml")
    raw = args.spec.read_bytes()
    parsed = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    doc = subset(parsed, hashlib.sha256(raw).hexdigest())
    _check_schemas(doc)
    text = dumps(doc).encode()
    tmp = OUTPUT.with_name(f"{OUTPUT.name}.{os.getpid()}.tmp")
    tmp.write_bytes(text)
    os.replace(tmp, OUTPUT)
    schemas, operations = len(doc["components"]["schemas"]), len(doc["operations"])
    print(
        f"{OUTPUT}: {doc['info']['title']} {doc['info']['version']},"
        f" {schemas} schemas, {operations} paths, {len(text)} bytes",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
