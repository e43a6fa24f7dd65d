"""A key's calls outlive a process killed with SIGKILL (issue 13): the upstream still counts
what the dead process sent since its last save, so the next process counts it too, as the
rest of the key's limit until that part of the window has passed. Never an upstream 429."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
from conftest import CLIENT_KEY, XFFUW_KEYS, Sims
from helpers import AUTH, free_port, spawn, wait_healthy, write_config

WINDOW, LIMIT = 600.0, 6  # a window far longer than a kill and a start take, even on a loaded machine


def _config(sims: Sims, folder: Path) -> Path:
    raw: dict[str, Any] = {
        "clients": [{"name": "alice", "key": CLIENT_KEY}],
        "providers": {"xffuw": {"base_url": f"{sims.xffuw_url}/api/v1/", "rate_window": WINDOW,
                                "queue_timeout": 0.2, "key": [{"value": XFFUW_KEYS[0], "rpm": LIMIT}]}},
        "storage": {"path": str(folder / "proxy.sqlite3")},
        "log": {"format": "json"},
    }
    return write_config(folder, raw)


def _chats(url: str, count: int) -> list[int]:
    return [httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=10,
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i}"}]}).status_code
            for i in range(count)]


def test_calls_a_killed_process_never_saved_still_count(processes: list[subprocess.Popen[str]], sims: Sims,
                                                         tmp_path: Path) -> None:
    sims.xffuw.rate_limit, sims.xffuw.rate_window = LIMIT, WINDOW
    path = _config(sims, tmp_path)
    port = free_port()
    first = spawn(processes, "serve", "--config", str(path), "--port", str(port))
    wait_healthy(f"http://127.0.0.1:{port}", first)
    assert _chats(f"http://127.0.0.1:{port}", 3) == [200] * 3  # made after its last save
    sent = sims.xffuw.count(key=XFFUW_KEYS[0])
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    port = free_port()
    second = spawn(processes, "serve", "--config", str(path), "--port", str(port))
    wait_healthy(f"http://127.0.0.1:{port}", second)
    statuses = _chats(f"http://127.0.0.1:{port}", LIMIT)
    assert sims.xffuw.rate_limited_count == 0, "the restarted proxy pushed the key past its limit"
    assert sims.xffuw.count(key=XFFUW_KEYS[0]) == sent  # it waits out the unsaved part of the window
    assert set(statuses) == {429}, statuses  # its own 429: every key is at its limit
