"""`proxy serve --workers N` without shared state: each worker keeps its part of every per-key
and per-client limit, so together they never exceed one."""

from __future__ import annotations

import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from conftest import CLIENT_KEY, XFFUW_KEYS, Sims
from helpers import AUTH, free_port, post_chat, spawn, wait_healthy, write_config
from test_shared_state import REDIS_URL, forget_prefix, redis_or_skip


def test_two_workers_keep_a_key_and_a_client_under_their_limits(
        processes: list[subprocess.Popen[str]], sims: Sims, tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "clients": [{"name": "alice", "key": CLIENT_KEY, "rpm": 8}, {"name": "bob", "key": "sk-test-bob-workers-1"}],
        "providers": {"xffuw": {"base_url": f"{sims.xffuw_url}/api/v1/", "queue_timeout": 0.2,
                                "key": [{"value": XFFUW_KEYS[0], "rpm": 10}]}},
        "storage": {"path": str(tmp_path / "proxy.sqlite3")},
        "log": {"format": "json"},
    }
    port = free_port()
    process = spawn(processes, "serve", "--config", str(write_config(tmp_path, raw)), "--port", str(port),
                    "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, process)

    # a connection each (post_chat opens its own): the kernel spreads them over the workers
    with ThreadPoolExecutor(8) as pool:
        alice = list(pool.map(lambda i: post_chat(base, f"{i}", key=CLIENT_KEY, timeout=10).status_code, range(24)))
    assert alice.count(200) <= 8, alice  # the client's rpm across both workers
    with ThreadPoolExecutor(8) as pool:
        bob = list(pool.map(lambda i: post_chat(base, f"{i}", key="sk-test-bob-workers-1", timeout=10).status_code,
                            range(24)))
    calls = sims.xffuw.count("chat") + sims.xffuw.count("models")
    assert calls <= 10, f"the upstream saw {calls} calls with a key limit of 10"
    assert sims.xffuw.rate_limited_count == 0
    assert set(bob) <= {200, 429}, bob  # the key's part in each worker is used up: 429, never more calls
    assert httpx.get(base + "/v1/models", headers=AUTH).status_code in (200, 429)


def test_two_workers_never_spend_more_than_a_budget_together(
        processes: list[subprocess.Popen[str]], sims: Sims, tmp_path: Path) -> None:
    """Thirty slow chats at once against a budget of ten: each worker holds only its part of
    what is left, so together they never overspend (once 16 answered, 8.0 spent of 5)."""
    raw: dict[str, Any] = {
        "clients": [{"name": "erin", "key": "sk-test-erin-workers-1", "budget": 5}],
        "providers": {"xffuw": {"base_url": f"{sims.xffuw_url}/api/v1/", "keys": [XFFUW_KEYS[0]]}},
        "storage": {"path": str(tmp_path / "proxy.sqlite3")},
        "log": {"format": "json"},
    }
    port = free_port()
    process = spawn(processes, "serve", "--config", str(write_config(tmp_path, raw)), "--port", str(port),
                    "--workers", "2")
    wait_healthy(f"http://127.0.0.1:{port}", process)
    time.sleep(1.5)  # the second worker is up too: the kernel spreads new connections over both
    before = sims.xffuw.keys[XFFUW_KEYS[0]]

    with ThreadPoolExecutor(30) as pool:
        replies = list(pool.map(lambda i: post_chat(f"http://127.0.0.1:{port}", f"{i} [delay=0.5]",
                                                    key="sk-test-erin-workers-1"), range(30)))
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 429}, statuses
    assert 2 <= statuses.count(200) <= 10, statuses  # 0.5 a chat: ten fit the budget at most
    spent = before - sims.xffuw.keys[XFFUW_KEYS[0]]
    assert spent <= 5 + 1e-9, f"{spent} spent upstream of a budget of 5"
    refusals = [r.json()["error"] for r in replies if r.status_code == 429]
    assert {e["code"] for e in refusals} == {"insufficient_quota"}
    assert any("[shared] redis_url" in e["message"] for e in refusals)  # a worker's part said so


def test_two_workers_with_redis_keep_one_whole_limit(processes: list[subprocess.Popen[str]], sims: Sims,
                                                     tmp_path: Path) -> None:
    """With [shared] redis_url the workers count in Redis: a client on one keep-alive connection
    (one worker) gets its whole rpm, not half of it, and still not more."""
    redis_or_skip(REDIS_URL)
    prefix = f"xfp-test-{uuid.uuid4().hex[:12]}"
    raw: dict[str, Any] = {
        "clients": [{"name": "alice", "key": CLIENT_KEY, "rpm": 8}],
        "providers": {"xffuw": {"base_url": f"{sims.xffuw_url}/api/v1/", "keys": [XFFUW_KEYS[0]]}},
        "shared": {"redis_url": REDIS_URL, "prefix": prefix},
        "storage": {"path": str(tmp_path / "proxy.sqlite3")},
        "log": {"format": "json"},
    }
    port = free_port()
    process = spawn(processes, "serve", "--config", str(write_config(tmp_path, raw)), "--port", str(port),
                    "--workers", "2")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        with httpx.Client(timeout=10) as http:  # one connection: one worker serves all
            statuses = [http.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=AUTH,
                                  json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i}"}]}
                                  ).status_code for i in range(12)]
        assert statuses == [200] * 8 + [429] * 4, statuses  # split, one worker would have allowed 4
    finally:
        forget_prefix(REDIS_URL, prefix)
