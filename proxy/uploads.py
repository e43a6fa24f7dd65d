"""Images clients upload, kept in memory for a while at unguessable names.

The upstreams take reference images only as URLs, so an uploaded file is held here and
served at `<public_url>/v1/files/uploads/<name>` for the upstream to fetch. The name (a
256-bit random token plus the image's extension) is the only secret; entries expire after
`ttl` seconds and the total size is bounded.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from proxy.errors import Kind, ProxyError

DEFAULT_TTL = 3600.0  # seconds: long enough for any upstream task to fetch its references
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
PATH = "/v1/files/uploads/"

# Leading bytes of the image types OpenAI accepts for edits (and GIF, which upstreams take).
_SIGNATURES: tuple[tuple[bytes, int, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png", ".png"),
    (b"\xff\xd8\xff", 0, "image/jpeg", ".jpg"),
    (b"GIF87a", 0, "image/gif", ".gif"),
    (b"GIF89a", 0, "image/gif", ".gif"),
    (b"WEBP", 8, "image/webp", ".webp"),
)


def loggable_path(path: str) -> str:
    """A request path fit for a log line: an upload's name is its only secret."""
    return PATH + "<name>" if path.startswith(PATH) else path


def image_type(data: bytes) -> tuple[str, str] | None:
    """(content type, extension) of an image, from its leading bytes; None if not one we take."""
    for magic, offset, content_type, extension in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic and (offset == 0 or data[:4] == b"RIFF"):
            return content_type, extension
    return None


@dataclass(frozen=True, slots=True)
class Upload:
    data: bytes
    content_type: str
    expires: float  # time.monotonic()


class Uploads:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, ttl: float = DEFAULT_TTL) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._items: OrderedDict[str, Upload] = OrderedDict()  # oldest first: expiry order
        self._bytes = 0

    def _purge(self, now: float) -> None:
        while self._items:
            name, oldest = next(iter(self._items.items()))
            if oldest.expires > now:
                break
            del self._items[name]
            self._bytes -= len(oldest.data)

    def put(self, data: bytes, content_type: str, extension: str) -> str:
        """Keep an image; answer its name. Full: 429 with the time until space frees up."""
        now = time.monotonic()
        self._purge(now)
        if len(data) > self.max_bytes:
            raise ProxyError(Kind.PAYLOAD_TOO_LARGE, f"The image is larger than the {self.max_bytes} bytes this "
                             "proxy keeps for uploads; send its URL instead.", param="image")
        if self._bytes + len(data) > self.max_bytes:
            # Evicting a live upload could break a task still fetching it: refuse instead.
            wait = next(iter(self._items.values())).expires - now
            raise ProxyError(Kind.RATE_LIMITED, "The proxy's upload space is full; retry later or send image "
                             "URLs instead of files.", retry_after=max(wait, 1.0))
        name = secrets.token_urlsafe(32) + extension
        self._items[name] = Upload(data, content_type, now + self.ttl)
        self._bytes += len(data)
        return name

    def get(self, name: str) -> Upload | None:
        found = self._items.get(name)
        if found is None or found.expires <= time.monotonic():
            return None
        return found

    @property
    def size(self) -> int:
        return self._bytes
