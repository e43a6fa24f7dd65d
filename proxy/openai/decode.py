"""Request bodies: JSON to typed Structs, every failure a 400 that names the field."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from proxy.errors import bad_request
from proxy.struct_errors import explain

T = TypeVar("T")

_decode_json = msgspec.json.Decoder().decode

NOT_JSON = ("We could not parse the JSON body of your request. The body must be a JSON object sent "
            "with Content-Type: application/json.")


def parse_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise bad_request("The request body is empty; a JSON object is expected.")
    try:
        raw = _decode_json(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise bad_request(NOT_JSON) from None
    if not isinstance(raw, dict):
        raise bad_request("The request body must be a JSON object.")
    return raw


def convert(raw: dict[str, Any], kind: type[T]) -> T:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        message, field = explain(exc)
        if message.startswith("Object missing required field"):
            raise bad_request(f"Missing required parameter: '{field}'.", param=field) from None
        raise bad_request(f"Invalid value for '{field}': {message}.", param=field) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.") from None
