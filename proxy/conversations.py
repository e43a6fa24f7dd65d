"""Stored Responses-API answers and the conversations behind them, in memory for a while.

`previous_response_id` continues a conversation the proxy kept; `GET /v1/responses/{id}`
shows a stored answer. Entries belong to the client that created them (another client
sees nothing), expire after `ttl` seconds and are bounded in total bytes.

The bound is shared fairly: when the store is full, entries are evicted (oldest first) from
the client holding the most bytes. A client flooding the store evicts only its own entries
once it holds more than anyone else, and no client loses entries while it holds less than
an equal share.

With shared state (Redis) entries are kept there instead, so a conversation continues on any
replica; each client may hold an equal share of the bound (its oldest entries make room for
its new ones). While Redis does not answer, entries are kept and looked up here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import msgspec

from proxy.shared import Shared, SharedDown

DEFAULT_TTL = 3600.0
DEFAULT_MAX_BYTES = 128 * 1024 * 1024
_OVERHEAD = 256  # bytes counted per entry beyond its payloads


@dataclass(frozen=True, slots=True)
class Stored:
    client: str
    response: bytes  # the response object as JSON, answered as is by GET
    messages: bytes  # the conversation so far as chat messages (JSON), instructions excluded


def _size(entry: Stored) -> int:
    return len(entry.response) + len(entry.messages) + _OVERHEAD


class _Shelf:
    """One client's entries, oldest first (the order they expire in: one ttl for all)."""

    __slots__ = ("bytes", "items")

    def __init__(self) -> None:
        self.items: dict[str, tuple[Stored, float]] = {}  # id -> (entry, expiry)
        self.bytes = 0

    def pop_oldest(self) -> None:
        oldest = next(iter(self.items))
        entry, _ = self.items.pop(oldest)
        self.bytes -= _size(entry)


_KIND = "conversations"


class Conversations:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, ttl: float = DEFAULT_TTL,
                 shared: Shared | None = None) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.shared = shared
        self._shelves: dict[str, _Shelf] = {}
        self._bytes = 0

    # With shared state: in Redis while it answers, else here.

    async def keep(self, response_id: str, entry: Stored, clients: int) -> bool:
        """`put`, in Redis when shared; there `clients` (how many there are) sets each one's share."""
        if self.shared is None or not self.shared.active:
            return self.put(response_id, entry)
        blob = msgspec.msgpack.encode((entry.client, entry.response, entry.messages))
        try:
            kept, _, _ = await self.shared.keep(_KIND, response_id, blob, owner=entry.client,
                                                share=self.max_bytes // max(1, clients), total=self.max_bytes,
                                                lives=self.ttl, evict=True)
        except SharedDown:
            return self.put(response_id, entry)
        return kept

    async def find(self, response_id: str, client: str) -> Stored | None:
        if self.shared is not None and self.shared.active:
            with contextlib.suppress(SharedDown):
                blob = await self.shared.blob(_KIND, response_id)
                if blob is not None:
                    owner, response, messages = msgspec.msgpack.decode(blob, type=tuple[str, bytes, bytes])
                    return Stored(owner, response, messages) if owner == client else None
        return self.get(response_id, client)  # kept here (while Redis was down, or without it)

    async def remove(self, response_id: str, client: str) -> bool:
        if await self.find(response_id, client) is None:
            return False
        if not self.delete(response_id, client) and self.shared is not None:
            with contextlib.suppress(SharedDown):
                await self.shared.forget(_KIND, [response_id])
        return True

    def put(self, response_id: str, entry: Stored) -> bool:
        """Keep an entry, making room as the class says; False when it alone is too large."""
        size = _size(entry)
        if size > self.max_bytes:
            return False
        now = time.monotonic()
        self._expire(now)
        shelf = self._shelves.setdefault(entry.client, _Shelf())
        replaced = shelf.items.pop(response_id, None)
        if replaced is not None:
            shelf.bytes -= _size(replaced[0])
            self._bytes -= _size(replaced[0])
        shelf.items[response_id] = (entry, now + self.ttl)
        shelf.bytes += size
        self._bytes += size
        while self._bytes > self.max_bytes:
            fullest = max(self._shelves.values(), key=lambda s: s.bytes)
            before = fullest.bytes
            fullest.pop_oldest()
            self._bytes -= before - fullest.bytes
        self._drop_empty()
        return response_id in shelf.items

    def get(self, response_id: str, client: str) -> Stored | None:
        shelf = self._shelves.get(client)
        found = shelf.items.get(response_id) if shelf is not None else None
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    def delete(self, response_id: str, client: str) -> bool:
        if self.get(response_id, client) is None:
            return False
        shelf = self._shelves[client]
        entry, _ = shelf.items.pop(response_id)
        shelf.bytes -= _size(entry)
        self._bytes -= _size(entry)
        self._drop_empty()
        return True

    def bytes_of(self, client: str) -> int:
        shelf = self._shelves.get(client)
        return shelf.bytes if shelf is not None else 0

    def _expire(self, now: float) -> None:
        for shelf in self._shelves.values():
            while shelf.items and next(iter(shelf.items.values()))[1] <= now:
                before = shelf.bytes
                shelf.pop_oldest()
                self._bytes -= before - shelf.bytes
        self._drop_empty()

    def _drop_empty(self) -> None:
        if any(not shelf.items for shelf in self._shelves.values()):
            self._shelves = {client: shelf for client, shelf in self._shelves.items() if shelf.items}
