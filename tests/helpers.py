"""What many test files need: requests as a client makes them, waiting for a condition, reading
an error, counting the simulators' calls. One copy here; test files import from it."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import openai
from conftest import CLIENT_KEY, OTHER_CLIENT_KEY, Sims
from openai_spec import validate_error

ROOT = Path(__file__).resolve().parent.parent
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


def access_lines(text: str) -> list[dict[str, Any]]:
    """The access-log entries (one JSON line per request) in captured stderr."""
    lines = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "request":
            lines.append(entry)
    return lines


def logged_requests(capsys: Any, count: int, path: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The access-log entries once `count` of them (for `path`) are written: a stream's line is
    written after its last byte has gone out, so it may trail the client's read."""
    text = ""

    def enough() -> list[dict[str, Any]] | None:
        nonlocal text
        text += capsys.readouterr().err
        entries = [e for e in access_lines(text) if path is None or e["path"] == path]
        return entries if len(entries) >= count else None
    return wait_until(enough, timeout, f"{count} access-log lines")


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


# ---- config files (the standard library reads TOML but does not write it) --------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a proxy config dict: scalars, tables, arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = json.dumps(key) if not re.fullmatch(r"[A-Za-z0-9_-]+", key) else key
        if isinstance(value, dict) or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            tables.append((name, value))
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    for name, value in tables:
        path = f"{prefix}{name}"
        if isinstance(value, dict):
            lines.append(f"\n[{path}]")
            lines.append(to_toml(value, path + "."))
        else:
            for item in value:
                lines.append(f"\n[[{path}]]")
                lines.append(to_toml(item, path + "."))
    return "\n".join(lines)


def write_config(folder: Path, raw: dict[str, Any], name: str = "config.toml") -> Path:
    path = folder / name
    path.write_text(to_toml(raw) + "\n", encoding="utf-8")
    return path


# ---- the proxy as a process of its own -------------------------------------------------------


class Output:
    """Reads a process's stream on a thread, so neither side blocks."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


class Child(subprocess.Popen[str]):
    """A child process whose output is read as it comes (`out`, `err`): a full pipe nobody reads
    would stop it."""

    out: Output
    err: Output


def spawn(processes: list[subprocess.Popen[str]], *args: str, env: dict[str, str] | None = None) -> Child:
    """`python -m proxy <args>` as a child process, killed by the `processes` fixture at the end."""
    # a session of its own: the `processes` fixture ends the whole group (`--workers` children too)
    process = Child([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env, start_new_session=True,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.out, process.err = Output(process.stdout), Output(process.stderr)
    processes.append(process)
    return process


def wait_healthy(url: str, process: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the process exited with {process.returncode}"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url}/healthz did not answer 200 in {timeout} s")


def stop(process: subprocess.Popen[str], sig: signal.Signals, within: float) -> float:
    began = time.monotonic()
    process.send_signal(sig)
    try:
        process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the process did not exit within {within} s of {sig.name}") from None
    return time.monotonic() - began
