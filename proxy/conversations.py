"""Stored Responses-API answers and the conversations behind them, in memory for a while.

`previous_response_id` continues a conversation the proxy kept; `GET /v1/responses/{id}`
shows a stored answer. Entries belong to the client that created them (another client
sees nothing), expire after `ttl` seconds and are bounded in total bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cachetools

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


class Conversations:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, ttl: float = DEFAULT_TTL) -> None:
        self._items: cachetools.TTLCache[str, Stored] = cachetools.TTLCache(
            maxsize=max_bytes, ttl=ttl, getsizeof=_size)

    def put(self, response_id: str, entry: Stored) -> bool:
        """Keep an entry, evicting the oldest when full; False when it alone is too large."""
        try:
            self._items[response_id] = entry
        except ValueError:  # larger than the whole budget
            return False
        return True

    def get(self, response_id: str, client: str) -> Stored | None:
        found = self._items.get(response_id)
        return found if found is not None and found.client == client else None

    def delete(self, response_id: str, client: str) -> bool:
        if self.get(response_id, client) is None:
            return False
        self._items.pop(response_id, None)
        return True
