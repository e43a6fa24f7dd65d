"""Turn msgspec's validation messages into (message, field path) pairs people can read."""

from __future__ import annotations

import re

import msgspec

from proxy.clip import clip

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def explain(exc: msgspec.ValidationError | msgspec.DecodeError, prefix: str = "") -> tuple[str, str | None]:
    """`Expected int, got str - at $.a.b[0]` -> ("Expected int, got str", "a.b[0]")."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    message = clip(match["msg"].replace("`", "'"))  # it may quote a value or a field name the client sent
    path = (match["path"] or "").lstrip(".")
    # An unknown or missing field names the object; the field itself is in the message.
    named = re.search(r"(?:unknown|missing required) field '([^']+)'", message)
    if named:
        path = f"{path}.{named[1]}" if path else named[1]
    if prefix:
        path = f"{prefix}.{path}" if path and not path.startswith("[") else f"{prefix}{path}"
    return message, clip(path) if path else None
