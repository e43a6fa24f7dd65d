"""Server-Sent Events as OpenAI sends them: `data: <json>\n\n`, closed by `data: [DONE]`."""

from __future__ import annotations

from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode

DONE = b"data: [DONE]\n\n"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def event(payload: Any) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"
