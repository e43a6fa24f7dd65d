"""Result files the simulators serve (a real tiny PNG, small fake MP4/MP3 bytes), and their route."""

from __future__ import annotations

import struct
import zlib
from typing import Any

from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from proxy.sim.faults import CallLog


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def make_png(width: int = 8, height: int = 8) -> bytes:
    """An RGB gradient PNG; decoders accept it, so b64_json results are real images."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type "none" for each scanline
        for x in range(width):
            rows += bytes((x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), 160))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + _png_chunk(b"IEND", b"")
    )


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


PNG_BYTES: bytes = make_png()
# An ISO-BMFF "ftyp" box plus filler: enough for a sniffer to say video/mp4.
MP4_BYTES: bytes = _box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2avc1mp41") + _box(
    b"free", b"simulated video" + bytes(64)
)
# An ID3v2 header (empty tag) and one MPEG-1 Layer III frame header with silence.
MP3_BYTES: bytes = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + bytes(413)

# extension -> (content type, bytes)
FILES: dict[str, tuple[str, bytes]] = {
    "png": ("image/png", PNG_BYTES),
    "mp4": ("video/mp4", MP4_BYTES),
    "mp3": ("audio/mpeg", MP3_BYTES),
}

# media kind (xffuw model type / Fengyuan category) -> file extension
EXTENSION: dict[str, str] = {"image": "png", "video": "mp4", "audio": "mp3"}


def file_for(name: str) -> tuple[str, bytes] | None:
    """Content type and bytes for a served file name, by its extension."""
    _, dot, ext = name.rpartition(".")
    if not dot:
        return None
    return FILES.get(ext.lower())


def files_route(log: CallLog) -> HTTPRouteHandler:
    """GET /files/{name}: the result files both simulators hand out, logged as "file" calls."""

    @get("/files/{name:str}", status_code=200)
    async def files(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
        await request.body()
        found = file_for(name)
        if found is None:
            log._log("file", None, 404)
            return Response(b"not found", status_code=404, media_type="text/plain")
        log._log("file", None, 200)
        return Response(found[1], status_code=200, media_type=found[0])

    return files
