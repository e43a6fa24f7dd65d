"""Client-sent values cut to a readable length before they go into an error message or a log line."""

from __future__ import annotations

# Long enough for any real model id, path or field name; a 20 MB one is an attack or a bug.
LIMIT = 256


def clip(value: object, limit: int = LIMIT) -> str:
    """`value` as text, cut to `limit` characters with an ellipsis and its length when longer."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"
