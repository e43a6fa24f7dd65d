"""Stored conversations are shared fairly (issue 18): one client's flood evicts only its own
entries, never another client's that holds less than an equal share."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import CLIENT_KEY, OTHER_CLIENT_KEY, RunningProxy

from proxy.conversations import Conversations, Stored

KB = 1024


def entry(client: str, size: int) -> Stored:
    return Stored(client=client, response=b"r" * (size // 2), messages=b"m" * (size - size // 2))


def test_a_flood_evicts_only_the_flooders_own_entries() -> None:
    store = Conversations(max_bytes=100 * KB)
    for i in range(10):
        assert store.put(f"bob-{i}", entry("bob", 2 * KB))
    for i in range(500):
        assert store.put(f"alice-{i}", entry("alice", 2 * KB))
    assert all(store.get(f"bob-{i}", "bob") is not None for i in range(10))
    assert store.get("alice-499", "alice") is not None  # the flooder's newest stay, its oldest went
    assert store.get("alice-0", "alice") is None
    assert store.bytes_of("alice") + store.bytes_of("bob") <= 100 * KB


def test_two_flooders_share_what_the_small_client_leaves() -> None:
    store = Conversations(max_bytes=120 * KB)
    store.put("carol-0", entry("carol", 4 * KB))
    for i in range(300):
        store.put(f"alice-{i}", entry("alice", 2 * KB))
        store.put(f"bob-{i}", entry("bob", 3 * KB))
    assert store.get("carol-0", "carol") is not None
    alice, bob = store.bytes_of("alice"), store.bytes_of("bob")
    assert alice + bob + store.bytes_of("carol") <= 120 * KB
    assert abs(alice - bob) <= 4 * KB, (alice, bob)  # equal shares, to within an entry


def test_a_client_under_its_share_keeps_its_entries_when_many_flood() -> None:
    store = Conversations(max_bytes=64 * KB)
    store.put("quiet", entry("quiet", 5 * KB))  # well under 64 KB / 5 clients
    for i in range(200):
        for flooder in ("a", "b", "c", "d"):
            store.put(f"{flooder}-{i}", entry(flooder, 1 * KB))
    assert store.get("quiet", "quiet") is not None


@pytest.mark.parametrize(("size", "kept"), [(64 * KB, True), (65 * KB, False)])
def test_an_entry_larger_than_the_store_is_not_kept(size: int, kept: bool) -> None:
    store = Conversations(max_bytes=64 * KB + 256)
    assert store.put("big", entry("alice", size)) is kept
    assert (store.get("big", "alice") is not None) is kept


def test_expired_and_deleted_entries_free_their_bytes() -> None:
    store = Conversations(max_bytes=10 * KB, ttl=0.0)
    store.put("old", entry("alice", 4 * KB))
    assert store.get("old", "alice") is None  # expired at once
    store.put("new", entry("bob", 4 * KB))
    assert store.bytes_of("alice") == 0
    kept = Conversations(max_bytes=10 * KB)
    kept.put("x", entry("alice", 4 * KB))
    assert not kept.delete("x", "bob") and kept.get("x", "alice") is not None  # only its owner deletes it
    assert kept.delete("x", "alice") and kept.bytes_of("alice") == 0


def test_a_clients_flood_over_http_leaves_anothers_conversation(proxy: RunningProxy) -> None:
    app: Any = proxy.server.server.config.app
    app.state["conversations"] = Conversations(max_bytes=200 * KB)  # a small store, to fill it quickly

    def create(key: str, text: str, **more: str) -> httpx.Response:
        return httpx.post(f"{proxy.base_url}/responses", headers={"authorization": f"Bearer {key}"},
                          json={"model": "gpt-4o-mini", "input": text, **more}, timeout=30)

    mine = create(CLIENT_KEY, "remember the plan")
    assert mine.status_code == 200
    with httpx.Client(timeout=30) as flood:
        for i in range(40):
            reply = flood.post(f"{proxy.base_url}/responses", headers={"authorization": f"Bearer {OTHER_CLIENT_KEY}"},
                               json={"model": "gpt-4o-mini", "input": f"{i} " + "x" * 5000})
            assert reply.status_code == 200
    again = httpx.get(f"{proxy.base_url}/responses/{mine.json()['id']}",
                      headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert again.status_code == 200, again.text
    follow = create(CLIENT_KEY, "and then?", previous_response_id=mine.json()["id"])
    assert follow.status_code == 200
