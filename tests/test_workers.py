"""`proxy serve --workers N` without shared state: each worker keeps its part of every per-key
and per-client limit, so together they never exceed one."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from conftest import CLIENT_KEY, XFFUW_KEYS, Sims
from helpers import AUTH, free_port, spawn, wait_healthy, write_config


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
    url = f"http://127.0.0.1:{port}/v1"
    wait_healthy(f"http://127.0.0.1:{port}", process)

    def chat(key: str, i: int) -> int:
        with httpx.Client(timeout=10) as http:  # a connection each: the kernel spreads them over the workers
            return http.post(url + "/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i}"}]}
                             ).status_code

    with ThreadPoolExecutor(8) as pool:
        alice = list(pool.map(lambda i: chat(CLIENT_KEY, i), range(24)))
    assert alice.count(200) <= 8, alice  # the client's rpm across both workers
    with ThreadPoolExecutor(8) as pool:
        bob = list(pool.map(lambda i: chat("sk-test-bob-workers-1", i), range(24)))
    calls = sims.xffuw.count("chat") + sims.xffuw.count("models")
    assert calls <= 10, f"the upstream saw {calls} calls with a key limit of 10"
    assert sims.xffuw.rate_limited_count == 0
    assert set(bob) <= {200, 429}, bob  # the key's part in each worker is used up: 429, never more calls
    assert httpx.get(url + "/models", headers=AUTH).status_code in (200, 429)
