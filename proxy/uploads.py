"""Images clients upload, kept in memory for a while at unguessable names.

The upstreams take reference images only as URLs, so an uploaded file is held here and
served at `<public_url>/v1/files/uploads/<name>` for the upstream to fetch. The name (a
256-bit random token plus the image's extension) is the only secret; entries expire after
`ttl` seconds and the total size is bounded.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from proxy.errors import Kind, ProxyError
from proxy.shared import Shared, SharedDown

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


_TYPES = {extension.lstrip("."): content_type for _, _, content_type, extension in _SIGNATURES}


def _full(share: int, which: str, wait: float) -> ProxyError:
    if which == "owner":
        return ProxyError(Kind.RATE_LIMITED, f"Your uploads still in use fill your share of the proxy's upload "
                          f"space ({share} bytes); retry later or send image URLs instead of files.",
                          retry_after=max(wait, 1.0))
    return ProxyError(Kind.RATE_LIMITED, "The proxy's upload space is full; retry later or send image URLs "
                      "instead of files.", retry_after=max(wait, 1.0))


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
    owner: str  # the client that uploaded it


class Uploads:
    """Uploaded images by name, bounded in total and per client: each client may hold at most
    its share, so one client's uploads never crowd out everyone else's. With shared state they
    are kept in Redis, so an upstream fetching one may reach any replica."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, ttl: float = DEFAULT_TTL,
                 shared: Shared | None = None) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.shared = shared
        self._items: OrderedDict[str, Upload] = OrderedDict()  # oldest first: expiry order
        self._bytes = 0
        self._by_owner: dict[str, int] = {}

    def _purge(self, now: float) -> None:
        while self._items:
            name, oldest = next(iter(self._items.items()))
            if oldest.expires > now:
                break
            self._forget(name)

    def _forget(self, name: str) -> None:
        found = self._items.pop(name, None)
        if found is None:
            return
        self._bytes -= len(found.data)
        left = self._by_owner[found.owner] - len(found.data)
        if left:
            self._by_owner[found.owner] = left
        else:
            del self._by_owner[found.owner]

    def put(self, data: bytes, content_type: str, extension: str, owner: str, share: int) -> str:
        """Keep an image for `owner`, who may hold `share` bytes at most; answer its name.
        Over the owner's share or the total: 429 with the time until space frees up."""
        now = time.monotonic()
        self._purge(now)
        limit = min(share, self.max_bytes)
        if len(data) > limit:
            raise ProxyError(Kind.PAYLOAD_TOO_LARGE, f"The image is larger than the {limit} bytes this "
                             "proxy keeps for one client's uploads; send its URL instead.", param="image")
        held = self._by_owner.get(owner, 0)
        if held + len(data) > limit:
            # Evicting a live upload could break a task still fetching it: refuse instead.
            raise _full(limit, "owner", next(u.expires for u in self._items.values() if u.owner == owner) - now)
        if self._bytes + len(data) > self.max_bytes:
            raise _full(limit, "total", next(iter(self._items.values())).expires - now)
        name = secrets.token_urlsafe(32) + extension
        self._items[name] = Upload(data, content_type, now + self.ttl, owner)
        self._bytes += len(data)
        self._by_owner[owner] = held + len(data)
        return name

    def drop(self, names: list[str]) -> None:
        """Uploads no longer needed (their request was refused, or its tasks are over)."""
        for name in names:
            self._forget(name)

    # With shared state: the same, in Redis while it answers, else here.

    async def keep(self, data: bytes, content_type: str, extension: str, owner: str, share: int) -> str:
        if self.shared is None or not self.shared.active:
            return self.put(data, content_type, extension, owner, share)
        limit = min(share, self.max_bytes)
        if len(data) > limit:
            return self.put(data, content_type, extension, owner, share)  # refused the same way
        name = secrets.token_urlsafe(32) + extension
        try:
            kept, which, wait = await self.shared.keep("uploads", name, data, owner=owner, share=limit,
                                                       total=self.max_bytes, lives=self.ttl, evict=False)
        except SharedDown:
            return self.put(data, content_type, extension, owner, share)
        if not kept:
            raise _full(limit, which, wait)
        return name

    async def fetch(self, name: str) -> Upload | None:
        if self.shared is not None and self.shared.active:
            with contextlib.suppress(SharedDown):
                data = await self.shared.blob("uploads", name)
                if data is not None:
                    return Upload(data, _TYPES.get(name.rpartition(".")[2], "application/octet-stream"), 0.0, "")
        return self.get(name)  # kept here (while Redis was down, or without it)

    async def forget(self, names: list[str]) -> None:
        self.drop(names)
        if self.shared is not None and self.shared.active:
            with contextlib.suppress(SharedDown):
                await self.shared.forget("uploads", names)

    def get(self, name: str) -> Upload | None:
        found = self._items.get(name)
        if found is None or found.expires <= time.monotonic():
            return None
        return found

    @property
    def size(self) -> int:
        return self._bytes

    def held_by(self, owner: str) -> int:
        return self._by_owner.get(owner, 0)
