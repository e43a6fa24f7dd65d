"""What many test files need: requests as a client makes them, waiting for a condition, reading
an error, counting the simulators' calls. One copy here; test files import from it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from contextlib import closing
from typing import Any

import httpx
import openai
from conftest import CLIENT_KEY, OTHER_CLIENT_KEY, Sims
from openai_spec import validate_error

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
BOB = {"authorization": f"Bearer {OTHER_CLIENT_KEY}"}
ADMIN_KEY = "admin-secret-key-0123456789"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def wait_until(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
               interval: float = 0.02) -> Any:
    """The first truthy value of `check()`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat(client: openai.OpenAI, content: str = "你好", model: str = "gpt-4o-mini", **extra: Any) -> Any:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **extra)
    assert reply.choices[0].message.content.endswith(content)
    return reply


def post_image(url: str, prompt: str, model: str = "gpt-image-2", headers: dict[str, str] | None = None,
               timeout: float = 30, **extra: Any) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", headers={**AUTH, **(headers or {})},
                      json={"model": model, "prompt": prompt, **extra}, timeout=timeout)


def error_of(reply: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of an answer that must have `status`."""
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    validate_error(body)
    return body["error"]  # type: ignore[no-any-return]


def task_ids(reply: httpx.Response) -> list[str]:
    return [t for t in reply.headers.get("x-proxy-task-ids", "").split(",") if t]


def fast_tasks(config: dict[str, Any], sims: Sims) -> None:
    config["tasks"] = {"poll_interval": 0.05, "first_poll": 0.05, "timeout": 10}
    sims.xffuw.task_seconds = sims.fengyuan.task_seconds = 0.05


def with_admin(config: dict[str, Any]) -> dict[str, Any]:
    config["admin"] = {"keys": [ADMIN_KEY]}
    return config


def admin_get(url: str, path: str, **params: Any) -> httpx.Response:
    reply = httpx.get(f"{url}{path}", params=params, headers=ADMIN, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply


def calls_by_key(sim: Any, endpoint: str, since: int = 0) -> dict[str | None, int]:
    """How many calls of `endpoint` each upstream key made (from the simulator's call log)."""
    counts: dict[str | None, int] = {}
    for call in list(sim.calls)[since:]:
        if call.endpoint == endpoint:
            counts[call.key] = counts.get(call.key, 0) + 1
    return counts
