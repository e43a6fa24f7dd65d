"""Client input read strictly: multipart forms whose text fields are decoded one by one, so a
field that is not text in its charset is a 400 naming it (Litestar's parser raised a bare
UnicodeDecodeError or LookupError: a 500), and whole numbers in plain ASCII digits only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from litestar import Request
from multipart import (  # type: ignore[import-untyped]
    MultipartSegment,
    ParserError,
    ParserLimitReached,
    PushMultipartParser,
)

from proxy.clip import clip
from proxy.errors import Kind, ProxyError, bad_request

# The charsets a text part may declare: UTF-8 and the single-byte ones it is read as elsewhere.
TEXT_CHARSETS = {"utf-8": "utf-8", "utf8": "utf-8", "us-ascii": "ascii", "ascii": "ascii",
                 "iso-8859-1": "latin-1", "latin-1": "latin-1", "latin1": "latin-1"}
_WHOLE = re.compile(r"[+-]?[0-9]+")  # int() would also take "1_0", " 1 " and non-ASCII digits such as "١"


@dataclass
class FormFile:
    """A part that came with a filename."""

    filename: str
    content_type: str
    data: bytes


def whole_number(value: str) -> int | None:
    """`value` as an int if it is plain ASCII digits with an optional sign; None otherwise."""
    if not _WHOLE.fullmatch(value):
        return None
    try:
        return int(value)
    except ValueError:  # past Python's digit limit
        return None


def _text(name: str, data: bytes, charset: str | None) -> str:
    codec = TEXT_CHARSETS.get((charset or "utf-8").lower())
    if codec is None:
        raise bad_request(f"Invalid charset for '{clip(name)}': send form text as UTF-8.", param=clip(name))
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        raise bad_request(f"Invalid value for '{clip(name)}': not valid {codec} text (a file needs a filename).",
                          param=clip(name)) from None


async def read_form(request: Request[Any, Any, Any]) -> list[tuple[str, str | FormFile]]:
    """The parts of a multipart/form-data body in order: text fields as str, files as FormFile.
    The body is already bounded by max_body_bytes (Litestar's stream), the parts by the app's limit."""
    boundary = request.content_type[1].get("boundary")
    if not boundary:
        raise bad_request("Invalid multipart/form-data: the Content-Type has no boundary.")
    parts: list[tuple[str, str | FormFile]] = []
    segment: Any = None  # the parser yields a part's MultipartSegment before its bytes and end
    data, stream = bytearray(), request.stream()
    try:
        with PushMultipartParser(boundary.encode(), max_segment_count=request.app.multipart_form_part_limit) \
                as parser:
            while not parser.closed:
                chunk = await anext(stream, b"")  # b"": the end, which the parser checks is complete
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        segment = event
                    elif event is not None:
                        data += event
                    else:  # the part's end
                        name, raw = segment.name or "", bytes(data)
                        if segment.filename is not None:
                            parts.append((name, FormFile(segment.filename, segment.content_type or "", raw)))
                        else:
                            parts.append((name, _text(name, raw, segment.charset)))
                        data.clear()
    except ParserLimitReached as error:
        raise ProxyError(Kind.PAYLOAD_TOO_LARGE, f"The multipart form exceeds this proxy's limits ({error}).") \
            from None
    except ParserError as error:
        # the parser's own words, where it names a decode error, hold a Python exception's repr
        said = str(error) if "Error(" not in str(error) else "a part's header is not readable"
        raise bad_request(f"Invalid multipart/form-data: {clip(said, 200)}.") from None
    return parts
